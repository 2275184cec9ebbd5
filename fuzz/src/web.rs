//! Invariants of portcullis-web's parsers of untrusted input: strict form bodies (`body.rs`:
//! `oauth_form`, `Form::parse`, `has_media_type`), JSON bodies and their error messages
//! (`json_body`), and the `return_to` sanitiser (`pages.rs`: `safe_return_to`). Shared by the
//! cargo-fuzz targets `form_body`, `json_body` and `return_to` and by
//! `crates/portcullis-web/tests/parsers_fuzz.rs` (stable, seeded).
//!
//! The body functions are `async` only because they read an axum `Body`; a body built from
//! bytes is ready at once, so [`ready`] polls them to completion without a runtime.

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use axum::body::Body;
use http::header::{self, HeaderMap, HeaderValue};
use portcullis_web::body::{API_BODY_LIMIT, Form, OAUTH_BODY_LIMIT, has_media_type, json_body, oauth_form};
use portcullis_web::error::ApiError;
use portcullis_web::pages::safe_return_to;

use crate::bytes::Bytes;

/// Runs a future that needs no I/O (a body already in memory) to completion.
pub fn ready<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    for _ in 0..1000 {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
    }
    panic!("an in-memory body did not complete")
}

fn content_type_headers(content_type: Option<&[u8]>) -> HeaderMap {
    let mut h = HeaderMap::new();
    if let Some(v) = content_type.and_then(|ct| HeaderValue::from_bytes(ct).ok()) {
        h.insert(header::CONTENT_TYPE, v);
    }
    h
}

/// The media type rule: the `Content-Type` before any `;`, trimmed, compared ignoring case.
fn spec_media_type(h: &HeaderMap, expected: &str) -> bool {
    h.get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(';').next().unwrap_or_default().trim().eq_ignore_ascii_case(expected))
}

fn spec_percent_decode(s: &[u8]) -> Vec<u8> {
    let hex = |b: u8| char::from(b).to_digit(16).and_then(|d| u8::try_from(d).ok());
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while let Some(&c) = s.get(i) {
        let escaped = (c == b'%').then(|| Some(hex(*s.get(i + 1)?)? * 16 + hex(*s.get(i + 2)?)?)).flatten();
        match (c, escaped) {
            (_, Some(v)) => {
                out.push(v);
                i += 3;
            }
            (b'+', None) => {
                out.push(b' ');
                i += 1;
            }
            (c, None) => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

/// `application/x-www-form-urlencoded` as the WHATWG URL standard decodes it: `&`-separated,
/// empty sequences skipped, the name up to the first `=`, `+` a space, `%XX` a byte (a `%`
/// without two hex digits kept), then UTF-8 with replacement characters.
pub fn spec_form_pairs(body: &[u8]) -> Vec<(String, String)> {
    body.split(|b| *b == b'&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = match p.iter().position(|b| *b == b'=') {
                Some(i) => (p.get(..i).unwrap_or_default(), p.get(i + 1..).unwrap_or_default()),
                None => (p, &[][..]),
            };
            let text = |x: &[u8]| String::from_utf8_lossy(&spec_percent_decode(x)).into_owned();
            (text(k), text(v))
        })
        .collect()
}

/// `Form::parse` against the decoding rules: refused exactly when a (decoded) name repeats;
/// otherwise every name has its value, and empty values count as absent (RFC 6749 §3.1).
pub fn check_form_parse(body: &[u8]) {
    let pairs = spec_form_pairs(body);
    let got = Form::parse(body);
    let repeated = pairs.iter().enumerate().find(|(i, (k, _))| pairs.iter().skip(i + 1).any(|(k2, _)| k2 == k));
    match (got, repeated) {
        (Err(e), Some(_)) => assert!(e.description.contains("is repeated"), "{e:?}"),
        (Ok(mut form), None) => {
            for (k, v) in &pairs {
                let want = (!v.is_empty()).then_some(v.as_str());
                assert_eq!(form.get(k), want, "parameter {k:?} of {:?}", String::from_utf8_lossy(body));
                assert_eq!(form.take(k).as_deref(), want);
                assert_eq!(form.get(k), None, "take() leaves {k:?}");
            }
        }
        (got, repeated) => panic!("Form::parse({:?}) = {got:?}, repeated: {repeated:?}", String::from_utf8_lossy(body)),
    }
}

/// `oauth_form` (the token, introspection and revocation endpoints): the content type first
/// (`has_media_type`), then 413 over `OAUTH_BODY_LIMIT`, then UTF-8, then [`check_form_parse`]'s
/// rules; an error is always `invalid_request`.
pub fn check_oauth_form(content_type: Option<&[u8]>, body: &[u8]) {
    let h = content_type_headers(content_type);
    let ct_ok = spec_media_type(&h, "application/x-www-form-urlencoded");
    assert_eq!(has_media_type(&h, "application/x-www-form-urlencoded"), ct_ok, "{h:?}");
    let got = ready(oauth_form(&h, Body::from(body.to_vec())));
    let status = got.as_ref().err().and_then(|e| e.status).map(|s| s.as_u16());
    if let Err(e) = &got {
        assert_eq!(e.err.code, portcullis_core::OAuthErrorCode::InvalidRequest, "{e:?}");
    }
    if !ct_ok {
        assert!(got.as_ref().is_err_and(|e| e.err.description.contains("content type")), "{h:?}: {got:?}");
    } else if body.len() > OAUTH_BODY_LIMIT {
        assert_eq!(status, Some(413), "{} bytes", body.len());
    } else if std::str::from_utf8(body).is_err() {
        assert!(got.as_ref().is_err_and(|e| e.err.description.contains("UTF-8")), "{got:?}");
    } else {
        assert_eq!(status, None);
        assert_eq!(got.is_ok(), Form::parse(body).is_ok());
        check_form_parse(body);
    }
}

/// A JSON body as endpoints declare them: unknown fields refused, an enum, a number, strings.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct Probe {
    pub password: String,
    pub n: u32,
    #[serde(default)]
    pub kind: Option<ProbeKind>,
    #[serde(default)]
    pub tags: Vec<String>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProbeKind {
    Transport,
    ServerTransport,
}

/// What a caller may put in a JSON body by mistake (a password in the wrong field): the error
/// message of a 400 must never repeat it.
pub const SECRET_MARKER: &str = "s3cr3t";

/// Whether serde's message names a member (`unknown field` or `duplicate field`): member
/// names are echoed on purpose, values never.
fn names_a_member(message: &str) -> bool {
    let m = message.strip_prefix("invalid JSON body: ").unwrap_or(message);
    m.starts_with("unknown field `") || m.starts_with("duplicate field `")
}

/// `json_body`: the content type first, then 413 over `API_BODY_LIMIT`, then serde's verdict
/// (unknown fields and duplicates refused) as a 400 whose message never quotes a value
/// ([`SECRET_MARKER`] in a value never shows up in it).
pub fn check_json_body(content_type: Option<&[u8]>, body: &[u8]) {
    let h = content_type_headers(content_type);
    let got = ready(json_body::<Probe>(&h, Body::from(body.to_vec())));
    if !spec_media_type(&h, "application/json") {
        assert!(matches!(&got, Err(ApiError::BadRequest(m)) if m.contains("content type")), "{h:?}: {got:?}");
        return;
    }
    if body.len() > API_BODY_LIMIT {
        assert!(matches!(got, Err(ApiError::PayloadTooLarge(_))), "{} bytes", body.len());
        return;
    }
    let serde_says = serde_json::from_slice::<Probe>(body);
    assert_eq!(got.is_ok(), serde_says.is_ok(), "{:?}: {got:?}", String::from_utf8_lossy(body));
    match got {
        Ok(_) => {}
        Err(ApiError::BadRequest(m)) => {
            assert!(
                !m.contains(SECRET_MARKER) || names_a_member(&m),
                "the error message quotes a value: {m:?} for {:?}",
                String::from_utf8_lossy(body)
            );
        }
        Err(other) => panic!("{other:?}"),
    }
}

/// The allowed places (documentation of `safe_return_to`).
fn under(path: &str, root: &str) -> bool {
    path.strip_prefix(root).is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// `safe_return_to`: the input unchanged or `/account`; an accepted one is a same-origin path
/// (one leading `/`, no `//` or `/\` start, printable ASCII without `\`, at most 4096 bytes),
/// and where a browser resolves it (WHATWG rules, `%2e` dot segments included) stays on the
/// same origin under `/account`, `/portal`, or exactly `/oauth2/authorize` with a query.
pub fn check_return_to(s: &str) {
    let out = safe_return_to(s);
    assert!(out == s || out == "/account", "safe_return_to({s:?}) = {out:?}");
    if out != s {
        return;
    }
    assert!(s.starts_with('/') && !s.starts_with("//") && !s.starts_with("/\\"), "{s:?}");
    assert!(s.len() <= 4096 && s.bytes().all(|b| b.is_ascii_graphic() && b != b'\\'), "{s:?}");
    let base = url::Url::parse("https://idp.test/oauth2/authorize?x=1").expect("base");
    let resolved = base.join(s).unwrap_or_else(|e| panic!("{s:?} does not resolve: {e}"));
    assert_eq!(resolved.origin(), base.origin(), "{s:?} leaves the origin: {resolved}");
    let path = resolved.path();
    let authorize = path == "/oauth2/authorize" && resolved.query().is_some();
    assert!(
        authorize || under(path, "/account") || under(path, "/portal"),
        "{s:?} resolves to {path:?}, outside /account, /portal and /oauth2/authorize"
    );
}

/// Pieces of `return_to` values: the allowed roots, dot segments in every spelling, slashes and
/// backslashes, schemes, encodings, control characters.
pub const RETURN_PIECES: [&str; 40] = [
    "/account",
    "/portal",
    "/oauth2/authorize?",
    "/oauth2/authorize",
    "/",
    "//",
    "\\",
    "/\\",
    ".",
    "..",
    "%2e",
    "%2E",
    ".%2e",
    "%2e.",
    "%2e%2e",
    "%2E%2e",
    "%2f",
    "%5c",
    "?",
    "#",
    "&",
    "=",
    "x",
    "admin",
    "https://evil.test",
    "evil.test",
    "@",
    ":",
    ";",
    "%0a",
    "\r\n",
    "\t",
    " ",
    "\0",
    "é",
    "%00",
    "/..",
    "/.",
    "s",
    "/%2e%2e",
];

/// Fuzzer bytes for the body targets: the first byte says whether there is a content type and
/// whether it is the right one (with odd spellings); the rest is the body.
pub fn body_case_from_bytes<'a>(data: &'a [u8], media: &str) -> (Option<Vec<u8>>, &'a [u8]) {
    let mut b = Bytes(data);
    let sel = b.byte();
    let ct = match sel % 8 {
        0 => None,
        1 => Some(media.as_bytes().to_vec()),
        2 => Some(format!("{}; charset=UTF-8", media.to_ascii_uppercase()).into_bytes()),
        3 => Some(format!(" {media} ;x").into_bytes()),
        4 => Some(b"text/plain".to_vec()),
        5 => Some(format!("{media}x").into_bytes()),
        6 => Some(b.field(b'\n').to_vec()),
        _ => Some(format!("multipart/form-data;{media}").into_bytes()),
    };
    (ct, b.rest())
}

/// JSON bodies from fuzzer bytes: the first byte picks raw bytes or a template whose values
/// (strings with [`SECRET_MARKER`], numbers, enum variants) sit in right and wrong places.
pub fn json_from_bytes(data: &[u8]) -> Vec<u8> {
    let mut b = Bytes(data);
    if b.byte() & 1 == 0 {
        return b.rest().to_vec();
    }
    const VALUES: [&str; 13] = [
        "\"s3cr3t-1\"",
        "\"hunter2 s3cr3t\"",
        "1",
        "-1",
        "4294967296",
        "1.5",
        "true",
        "null",
        "[\"s3cr3t\"]",
        "{\"a\":\"s3cr3t\"}",
        "\"transport\"",
        "\"s3cr3t\\\"x\"",
        "\"x, expected s3cr3t\"",
    ];
    const KEYS: [&str; 6] = ["password", "n", "kind", "tags", "extra", "Password"];
    let mut members = Vec::new();
    while !b.0.is_empty() && members.len() < 8 {
        let k = b.pick(&KEYS).copied().unwrap_or("n");
        let v = b.pick(&VALUES).copied().unwrap_or("1");
        members.push(format!("\"{k}\":{v}"));
    }
    format!("{{{}}}", members.join(",")).into_bytes()
}
