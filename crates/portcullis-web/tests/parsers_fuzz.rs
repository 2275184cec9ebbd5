//! Randomized tests of portcullis-web's untrusted-input parsers, on stable Rust and in every
//! `cargo test`: the invariant checks of the cargo-fuzz targets `form_body`, `json_body` and
//! `return_to` (`fuzz/src/web.rs`) and authorization-time redirect URI matching
//! (`fuzz/src/redirects.rs`, through the real `Portcullis::authorize` on SQLite), driven by a
//! seeded PRNG (`fuzz/src/rng.rs`). `PARSERS_FUZZ_SEED` and `PARSERS_FUZZ_ITERATIONS` as in
//! docs/fuzzing.md.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

#[path = "../../../fuzz/src/bytes.rs"]
mod bytes;
#[path = "../../../fuzz/src/redirects.rs"]
#[allow(dead_code)]
mod redirects;
#[path = "../../../fuzz/src/rng.rs"]
mod rng;
#[allow(dead_code)]
mod support;
#[path = "../../../fuzz/src/web.rs"]
mod web;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use portcullis_core::usecases::RequestContext;
use portcullis_web::body::{API_BODY_LIMIT, OAUTH_BODY_LIMIT};
use rng::*;
use serde_json::{Value, json};
use tower::ServiceExt;
use web::*;

// ---- form bodies ----------------------------------------------------------------------------

const FORM_PIECES: &[&str] = &[
    "grant_type",
    "client_id",
    "code",
    "=",
    "=",
    "&",
    "&",
    "&&",
    "+",
    "%",
    "%2",
    "%20",
    "%26",
    "%3D",
    "%3d",
    "%2B",
    "%zz",
    "%C3%A9",
    "%FF",
    "%00",
    "a",
    "b",
    "a",
    "é",
    "\u{0}",
    " ",
    "\r\n",
    ";",
    "grant%5Ftype",
    "GRANT_TYPE",
];

const CONTENT_TYPES: &[&str] = &[
    "application/x-www-form-urlencoded",
    "application/x-www-form-urlencoded; charset=UTF-8",
    "APPLICATION/X-WWW-FORM-URLENCODED",
    " application/x-www-form-urlencoded ;x",
    "application/x-www-form-urlencodedx",
    "application/json",
    "application/json; charset=utf-8",
    "Application/JSON",
    "application/jsonx",
    "text/plain",
    "multipart/form-data; boundary=x",
    "",
    ";application/json",
    "application/x-www-form-urlencoded\u{7f}",
];

fn gen_content_type(rng: &mut Rng) -> Option<Vec<u8>> {
    match rng.below(10) {
        0 => None,
        1 => Some(rng.some_bytes(12)),
        _ => Some(rng.pick(CONTENT_TYPES).as_bytes().to_vec()),
    }
}

#[test]
fn form_bodies_randomized() {
    run("form_body", 6_000, |rng| {
        let body = match rng.below(10) {
            0..=6 => concat(rng, FORM_PIECES, 12).into_bytes(),
            7 | 8 => {
                let base = "grant_type=client_credentials&scope=a+b&client_id=acme%24app";
                mutate(rng, base, FORM_PIECES, &[]).into_bytes()
            }
            _ => rng.some_bytes(40),
        };
        check_oauth_form(gen_content_type(rng).as_deref(), &body);
    });
}

#[test]
fn form_body_limits_and_repeats() {
    let ct = Some(b"application/x-www-form-urlencoded".as_slice());
    for body in [
        &b"a=1&a=2"[..],
        b"a=1&%61=2",
        b"a=1&a",
        b"a=&a=",
        b"a=1&b=&c=x%2By+z",
        b"&&a=1&&",
        b"\xff=1",
        b"a=%ff",
        b"a=%ff&a=%fe",
        b"=1&=2",
    ] {
        check_oauth_form(ct, body);
        check_form_parse(body);
    }
    for len in [OAUTH_BODY_LIMIT, OAUTH_BODY_LIMIT + 1] {
        let body = format!("a={}", "x".repeat(len - 2));
        check_oauth_form(ct, body.as_bytes());
    }
}

// ---- JSON bodies ----------------------------------------------------------------------------

#[test]
fn json_bodies_randomized() {
    run("json_body", 4_000, |rng| {
        let mut data = vec![rng.byte() | 1];
        let n = 2 * rng.below(8);
        data.extend(rng.bytes(n));
        let body = match rng.below(10) {
            0..=7 => json_from_bytes(&data),
            _ => {
                let base = r#"{"password":"s3cr3t-pw","n":1,"kind":"transport","tags":["s3cr3t"]}"#;
                mutate(rng, base, &["\"", ",", ":", "{", "}", "s3cr3t", "1", "null", "é", "\\"], &[]).into_bytes()
            }
        };
        let ct = if rng.percent(90) { Some(b"application/json".to_vec()) } else { gen_content_type(rng) };
        check_json_body(ct.as_deref(), &body);
    });
}

#[test]
fn json_error_messages_never_quote_values() {
    let ct = Some(b"application/json".as_slice());
    for body in [
        r#"{"password": 123456789, "n": 1}"#,
        r#"{"password": "x", "n": "s3cr3t"}"#,
        r#"{"password": "x", "n": 1, "kind": "s3cr3t"}"#,
        r#"{"password": "x", "n": 1, "kind": {"s3cr3t": 1}}"#,
        r#"{"password": "x", "n": 1, "tags": "s3cr3t"}"#,
        r#"{"password": ["s3cr3t"], "n": 1}"#,
        r#"{"s3cr3t": 1}"#,
        r#"{"password": "x", "password": "s3cr3t", "n": 1}"#,
        r#"{"password": "x", "n": "y, expected s3cr3t"}"#,
        r#"{"password": "x", "n": 1, "kind": "a, expected s3cr3t"}"#,
    ] {
        check_json_body(ct, body.as_bytes());
    }
    let big = format!(r#"{{"password":"{}","n":1}}"#, "x".repeat(API_BODY_LIMIT));
    check_json_body(ct, big.as_bytes());
}

// ---- return_to ------------------------------------------------------------------------------

const RETURN_CORPUS: &[&str] = &[
    "/account",
    "/account/totp",
    "/portal/orgs/acme",
    "/oauth2/authorize?client_id=acme%24app&scope=openid",
    "/account/../admin",
    "/account/.%2e/admin",
    "/account/%2e%2E/admin",
    "/portal/%2e./x",
    "/account/%2e/x",
    "//evil.test",
    "/\\evil.test",
    "/account?next=//evil",
    "/oauth2/authorize?/../../x",
    "/oauth2/authorize#?",
    "/account#/../x",
];

#[test]
fn return_to_randomized() {
    for s in RETURN_CORPUS {
        check_return_to(s);
    }
    run("return_to", 20_000, |rng| {
        let s = match rng.below(3) {
            0 => concat(rng, &RETURN_PIECES, 8),
            1 => {
                let base = *rng.pick(RETURN_CORPUS);
                mutate(rng, base, &RETURN_PIECES, RETURN_CORPUS)
            }
            _ => format!(
                "{}{}",
                rng.pick(&["/account", "/portal", "/oauth2/authorize?"]),
                concat(rng, &RETURN_PIECES, 5)
            ),
        };
        check_return_to(&s);
    });
}

// ---- authorization-time redirect URI matching ----------------------------------------------

const SINGLE: &[&str] = &["https://app.test/cb"];
const SEVERAL: &[&str] =
    &["https://app.test/cb", "https://app.test/cb?x=1", "http://localhost:8080/cb", "https://app.test/Cb/"];

async fn api(e: &support::Env, path: &str, token: &str, body: Value) -> (StatusCode, Value) {
    let req = Request::post(path)
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    let resp = e.app.clone().oneshot(req).await.unwrap();
    let s = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX).await.unwrap();
    (s, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

async fn admin_token(e: &support::Env) -> String {
    use base64::Engine;
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("portcullis$admin:{}", support::ADMIN_SECRET));
    let req = Request::post("/oauth2/token")
        .header(header::AUTHORIZATION, format!("Basic {basic}"))
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from("grant_type=client_credentials"))
        .unwrap();
    let resp = e.app.clone().oneshot(req).await.unwrap();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX).await.unwrap();
    let v: Value = serde_json::from_slice(&bytes).unwrap();
    v["access_token"].as_str().unwrap().to_owned()
}

/// Requested `redirect_uri`s near the registered ones: the same, or with letter case, a
/// trailing slash, an encoding, a query, a fragment, a prefix or suffix changed.
fn gen_requested(rng: &mut Rng, registered: &[&str]) -> Option<String> {
    if rng.percent(15) {
        return None;
    }
    let base = *rng.pick(registered);
    Some(match rng.below(4) {
        0 => base.to_owned(),
        1 => rng
            .pick(&[
                base.to_ascii_uppercase(),
                format!("{base}/"),
                format!("{base}?"),
                format!("{base}#"),
                format!("{base} "),
                base.replace("/cb", "/%63b"),
                base.replace("https://", "http://"),
                base.replace("app.test", "app.test."),
                base.replace("app.test", "APP.test"),
                base.trim_end_matches('/').to_owned(),
                base.replace("8080", "8081"),
            ])
            .clone(),
        _ => mutate(rng, base, &["/", "?", "#", "%2F", ".", "..", "é", "x=1", "&", "@evil.test"], registered),
    })
}

#[tokio::test]
async fn authorization_uses_only_registered_redirect_uris() {
    let e = support::env().await;
    let admin = admin_token(&e).await;
    let (s, v) = api(&e, "/api/v1/organisations", &admin, json!({"slug": "acme", "name": "Acme"})).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let mut clients = Vec::new();
    for (slug, uris) in [("one", SINGLE), ("several", SEVERAL)] {
        let app = json!({
            "slug": slug, "name": slug, "grant_types": ["authorization_code"],
            "token_endpoint_auth_method": "client_secret_basic", "redirect_uris": uris, "first_party": true,
        });
        let (s, v) = api(&e, "/api/v1/organisations/acme/applications", &admin, app).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        clients.push((v["client_id"].as_str().unwrap().to_owned(), uris));
    }
    let ctx = RequestContext::default();
    let base = env_number("PARSERS_FUZZ_SEED").unwrap_or(0x0070_6f72_7463_756c);
    let n = env_number("PARSERS_FUZZ_ITERATIONS").map_or(1_500, |n| n as usize);
    let mut rng = Rng(base ^ 0x7265_6469_7265_6374);
    for i in 0..n {
        let (client_id, uris) = rng.pick(&clients).clone();
        let registered: Vec<String> = uris.iter().map(|s| (*s).to_owned()).collect();
        let requested = gen_requested(&mut rng, uris);
        let mut pairs: Vec<(String, String)> = [
            ("response_type", "code"),
            ("client_id", client_id.as_str()),
            ("scope", "openid"),
            ("state", "st"),
            ("prompt", "none"),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
        if let Some(u) = &requested {
            pairs.push(("redirect_uri".into(), u.clone()));
        }
        let repeated = requested.is_some() && rng.percent(5);
        if repeated {
            pairs.push(("redirect_uri".into(), registered[0].clone()));
        }
        let outcome = e.core.authorize(&ctx, &pairs, None, None).await;
        if repeated {
            assert!(outcome.is_err(), "case {i}: a repeated redirect_uri redirected: {outcome:?}");
        } else {
            redirects::check_authorize_redirect(&registered, requested.as_deref(), &outcome);
        }
    }
}

// ---- the fuzz targets' own decoders on random bytes -----------------------------------------

#[test]
fn fuzz_decoders_on_random_bytes() {
    run("web_raw_bytes", 3_000, |rng| {
        let n = rng.below(120);
        let data = rng.bytes(n);
        let (ct, body) = body_case_from_bytes(&data, "application/x-www-form-urlencoded");
        check_oauth_form(ct.as_deref(), body);
        check_form_parse(body);
        let (ct, body) = body_case_from_bytes(&data, "application/json");
        check_json_body(ct.as_deref(), &json_from_bytes(body));
        check_return_to(&bytes::from_pieces(&RETURN_PIECES, &data));
    });
}
