//! Invariants of redirect URIs: registration-time validation (`check_redirect_uri`,
//! `check_jwks_uri` in the core's `usecases/admin.rs`), the URL the browser is sent back to
//! (`ClientRedirect::url`) and authorization-time matching (`Portcullis::authorize`: exact
//! strings, errors in `redirect_uri` never redirect). Shared by the cargo-fuzz target
//! `redirect_uri` and the stable runners of portcullis-core (registration, URLs) and
//! portcullis-web (matching, through the real use case on SQLite).
//!
//! A browser's view of a URL is the WHATWG parser's (`url` crate), independent of the code
//! under test.

use portcullis_core::usecases::{Authorize, ClientRedirect, check_jwks_uri, check_redirect_uri};

use crate::bytes::Bytes;

const LOOPBACK: [&str; 3] = ["127.0.0.1", "[::1]", "localhost"];

/// The authority of `u` as the registration rules see it: after `://`, up to `/` or `?`.
fn authority(u: &str) -> &str {
    u.split_once("://").map(|(_, rest)| rest.split(['/', '?']).next().unwrap_or("")).unwrap_or("")
}

/// `http://` + a loopback host, then the end, a port, a path or (when `query_ok`) a query.
fn http_loopback(u: &str, end_ok: bool, query_ok: bool) -> bool {
    LOOPBACK.iter().any(|h| {
        u.strip_prefix("http://").and_then(|r| r.strip_prefix(h)).is_some_and(|rest| {
            (end_ok && rest.is_empty()) || rest.starts_with([':', '/']) || (query_ok && rest.starts_with('?'))
        })
    })
}

/// The registration rules of a redirect URI, from its documentation: `https://`, or `http://`
/// only to 127.0.0.1, [::1] or localhost; a non-empty authority without userinfo; no
/// fragment, no wildcard, no backslash; visible ASCII only; at most 2048 bytes.
pub fn redirect_uri_spec_ok(u: &str) -> bool {
    (u.starts_with("https://") || http_loopback(u, true, true))
        && !authority(u).is_empty()
        && !authority(u).contains('@')
        && u.len() <= 2048
        && !u.contains(['#', '*', '\\'])
        && u.bytes().all(|b| b.is_ascii_graphic())
}

/// What a browser makes of an accepted URI, when it can parse it at all: an `https` URL, or an
/// `http` one to a loopback host; no user name or password; no fragment.
fn check_browser_view(u: &str) {
    let Ok(parsed) = url::Url::parse(u) else {
        return;
    };
    let host = parsed.host_str().unwrap_or_default();
    match parsed.scheme() {
        "https" => assert!(!host.is_empty(), "{u:?}: no host"),
        "http" => assert!(LOOPBACK.contains(&host), "{u:?}: http to {host:?}"),
        other => panic!("{u:?} was accepted but a browser reads scheme {other:?}"),
    }
    assert!(parsed.username().is_empty() && parsed.password().is_none(), "{u:?} carries credentials");
    assert!(parsed.fragment().is_none(), "{u:?} has a fragment");
}

/// `check_redirect_uri` accepts exactly [`redirect_uri_spec_ok`], returns an accepted URI
/// unchanged, and a browser reads it as the documented kind of URL.
pub fn check_registered_redirect_uri(u: &str) {
    let got = check_redirect_uri(u);
    assert_eq!(got.is_ok(), redirect_uri_spec_ok(u), "check_redirect_uri({u:?}) = {got:?}");
    if let Ok(back) = got {
        assert_eq!(back, u);
        check_browser_view(u);
    }
}

/// `check_jwks_uri`: `https://`, or `http://` to a loopback host with a port or path; no
/// fragment and no `@` anywhere; no whitespace or control character; at most 2048 bytes. An
/// accepted URI is returned unchanged and a browser-grade parser reads it as such a URL.
pub fn check_registered_jwks_uri(u: &str) {
    let got = check_jwks_uri(u);
    let spec = (u.starts_with("https://") || http_loopback(u, false, false))
        && u.len() <= 2048
        && !u.contains(['#', '@'])
        && !u.chars().any(|c| c.is_whitespace() || c.is_control());
    assert_eq!(got.is_ok(), spec, "check_jwks_uri({u:?}) = {got:?}");
    if let Ok(back) = got {
        assert_eq!(back, u);
        check_browser_view(u);
    }
}

/// `ClientRedirect::url` for an accepted redirect URI: the URI is kept as registered, the
/// client's own query parameters come first, then exactly ours (whatever they contain: a
/// `state` cannot add or hide a parameter).
pub fn check_client_redirect(redirect_uri: &str, params: &[(String, String)]) {
    if check_redirect_uri(redirect_uri).is_err() {
        return;
    }
    let r = ClientRedirect { redirect_uri: redirect_uri.to_owned(), params: params.to_vec(), form_post: false };
    let url = r.url();
    let added =
        url.strip_prefix(redirect_uri).unwrap_or_else(|| panic!("{url:?} does not start with {redirect_uri:?}"));
    let (own_query, sep) = match redirect_uri.split_once('?') {
        Some((_, q)) => (q, '&'),
        None => ("", '?'),
    };
    let ours = added.strip_prefix(sep).unwrap_or_else(|| panic!("{url:?}: expected {sep:?} after the URI"));
    assert!(!ours.contains('#'), "{url:?}");
    let decoded = |q: &str| form_urlencoded::parse(q.as_bytes()).into_owned().collect::<Vec<(String, String)>>();
    let mut want = decoded(own_query);
    want.extend(params.iter().cloned());
    let all_query = url.split_once('?').map_or("", |(_, q)| q);
    assert_eq!(decoded(all_query), want, "{url:?}");
    if let (Ok(a), Ok(b)) = (url::Url::parse(&url), url::Url::parse(redirect_uri)) {
        assert_eq!((a.origin(), a.path()), (b.origin(), b.path()), "{url:?}");
    }
}

/// Authorization-time matching, for a request that is valid but for its `redirect_uri` and asks
/// for `prompt=none` without a session (so a trusted redirect URI gets `login_required`): an
/// unregistered `redirect_uri` (not one of the registered strings exactly) is an error page; a
/// missing one is allowed only when exactly one is registered; whatever redirects goes to a
/// registered string, the requested one when given.
pub fn check_authorize_redirect(
    registered: &[String],
    requested: Option<&str>,
    outcome: &Result<Authorize, portcullis_core::Error>,
) {
    let expected: Option<&str> = match requested {
        Some(u) => registered.iter().any(|r| r == u).then_some(u),
        None => match registered {
            [only] => Some(only.as_str()),
            _ => None,
        },
    };
    match (outcome, expected) {
        (Err(_), None) => {}
        (Ok(Authorize::Redirect(r)), Some(want)) => {
            assert_eq!(r.redirect_uri, want, "registered {registered:?}, requested {requested:?}");
            assert!(registered.contains(&r.redirect_uri));
            assert!(r.params.iter().any(|(k, v)| k == "error" && v == "login_required"), "{r:?}");
        }
        (other, _) => {
            panic!("registered {registered:?}, requested {requested:?}: {other:?}, expected a redirect to {expected:?}")
        }
    }
}

/// Pieces redirect URIs are made of: schemes in several spellings, loopback and look-alike
/// hosts, userinfo, ports, dot segments, encodings, and characters a browser treats specially.
pub const URI_PIECES: [&str; 48] = [
    "https://",
    "http://",
    "HTTPS://",
    "https:",
    "https:/",
    "//",
    "https://\\",
    "localhost",
    "127.0.0.1",
    "[::1]",
    "localhost.evil.test",
    "127.0.0.1.nip.io",
    "[::1",
    "evil.test",
    "app.test",
    "@",
    "user:pw@",
    ":",
    ":8443",
    ":0",
    ":99999",
    "/",
    "/cb",
    "/../",
    "/./",
    "%2e%2e",
    "%2F",
    "%40",
    "%",
    "?",
    "?a=1&b=2",
    "&",
    "#",
    "#frag",
    "*",
    "\\",
    " ",
    "\t",
    "\r\n",
    "\0",
    "é",
    "xn--e1afmkfd",
    "%00",
    ";",
    "=",
    "+",
    "~",
    ".",
];

/// Redirect parameters from fuzzer bytes (`\n`-separated names and values).
pub fn params_from_bytes(data: &[u8]) -> Vec<(String, String)> {
    let mut b = Bytes(data);
    let mut out = Vec::new();
    while !b.0.is_empty() && out.len() < 8 {
        let k = b.text(b'\n');
        let v = b.text(b'\n');
        out.push((k, v));
    }
    out
}
