//! Randomized tests of the core's untrusted-input parsers, on stable Rust and in every
//! `cargo test`: the invariant checks of the cargo-fuzz targets `access_token`,
//! `client_assertion`, `jwks` and `redirect_uri` (`fuzz/src/{tokens,redirects}.rs`, included
//! below) driven by a seeded PRNG (`fuzz/src/rng.rs`) with structured inputs and edits of
//! known-tricky cases. `PARSERS_FUZZ_SEED` and `PARSERS_FUZZ_ITERATIONS` as in docs/fuzzing.md.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

#[path = "../../../fuzz/src/bytes.rs"]
mod bytes;
#[path = "../../../fuzz/src/redirects.rs"]
#[allow(dead_code)]
mod redirects;
#[path = "../../../fuzz/src/rng.rs"]
mod rng;
#[path = "../../../fuzz/src/tokens.rs"]
mod tokens;

use std::sync::OnceLock;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use portcullis_core::crypto::jwk::{ASSERTION_ALGORITHMS, ClientKey};
use portcullis_core::crypto::jws::MAX_JWS_LEN;
use portcullis_core::tokens::{SKEW_SECS, TokenError};
use redirects::*;
use rng::*;
use serde_json::{Value, json};
use tokens::*;

fn fx() -> &'static TokenFixture {
    static FX: OnceLock<TokenFixture> = OnceLock::new();
    FX.get_or_init(TokenFixture::new)
}

// ---- access tokens --------------------------------------------------------------------------

/// Edits spelled as `mutate_token` reads them (4 bytes each), re-implemented here so this file
/// does not need the gateway's `invariants.rs`: replace, insert, delete, truncate, flip.
fn edit_token(rng: &mut Rng, t: &str) -> String {
    let mut b = t.as_bytes().to_vec();
    for _ in 0..1 + rng.below(3) {
        let pos = rng.below(b.len() + 1);
        match rng.below(6) {
            0 => {
                if pos < b.len() {
                    b[pos] = *rng.pick(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=");
                }
            }
            1 => b.insert(pos, *rng.pick(b"A_-.=e")),
            2 => {
                if pos < b.len() {
                    b.remove(pos);
                }
            }
            3 => b.truncate(pos),
            4 => {
                if pos < b.len() {
                    b[pos] ^= 1 << rng.below(7);
                }
            }
            _ => {
                // Another token's segment in place of this one's.
                let other = rng.pick(&fx().tokens);
                let seg = rng.below(3);
                let mut parts: Vec<String> = String::from_utf8_lossy(&b).split('.').map(str::to_owned).collect();
                if let (Some(p), Some(o)) = (parts.get_mut(seg), other.split('.').nth(seg)) {
                    *p = o.to_owned();
                }
                b = parts.join(".").into_bytes();
            }
        }
    }
    String::from_utf8_lossy(&b).into_owned()
}

#[test]
fn edited_access_tokens_never_verify() {
    let fx = fx();
    for t in &fx.tokens {
        check_access_token(fx, t);
    }
    run("access_token", 4_000, |rng| {
        let original = rng.pick(&fx.tokens);
        let t = edit_token(rng, original);
        check_access_token(fx, &t);
    });
    let mut long = fx.tokens[0].clone();
    long.push_str(&"A".repeat(MAX_JWS_LEN));
    check_access_token(fx, &long);
}

fn gen_claim_value(rng: &mut Rng, name: &str) -> Value {
    let good = match name {
        "iss" => json!(*rng.pick(&[ISSUER, ISSUER, "https://idp.test/", "https://IDP.test", ""])),
        "exp" => json!(NOW - SKEW_SECS - 1 + rng.below(4) as i64 + if rng.percent(50) { 600 } else { 0 }),
        "iat" => json!(NOW + SKEW_SECS - 1 + rng.below(4) as i64 - if rng.percent(50) { 600 } else { 0 }),
        "aud" => {
            if rng.percent(50) {
                json!("https://api.test")
            } else {
                json!(["https://api.test", "x"])
            }
        }
        "roles" => json!(["a:b", "c:d"]),
        "cnf" => json!({ "x5t#S256": "t" }),
        "scope" => json!(*rng.pick(&["", "a/b openid", " "])),
        _ => json!(*rng.pick(&["acme$app", "acme", "x", "é\u{0}"])),
    };
    if rng.percent(85) {
        return good;
    }
    rng.pick(&[
        json!(null),
        json!(1),
        json!(-1),
        json!(1.5),
        json!(1e3),
        json!(u64::MAX),
        json!(i64::MIN),
        json!("1900000000"),
        json!(true),
        json!([]),
        json!([1]),
        json!({}),
    ])
    .clone()
}

/// A claims payload: the documented members, each sometimes missing, duplicated (in the text),
/// of another JSON type, or next to an unknown member.
fn gen_claims_payload(rng: &mut Rng) -> Vec<u8> {
    const NAMES: [&str; 11] = ["iss", "sub", "aud", "exp", "iat", "jti", "client_id", "scope", "roles", "org", "cnf"];
    let mut members: Vec<String> = Vec::new();
    for name in NAMES {
        let optional = matches!(name, "scope" | "roles" | "cnf");
        if rng.percent(if optional { 50 } else { 4 }) {
            continue;
        }
        members.push(format!("\"{name}\":{}", gen_claim_value(rng, name)));
        if rng.percent(2) {
            members.push(format!("\"{name}\":{}", gen_claim_value(rng, name)));
        }
    }
    if rng.percent(5) {
        members.push(format!("\"{}\":1", rng.pick(&["nbf", "Iss", "extra", "exp ", "\\u0069ss"])));
    }
    for i in (1..members.len()).rev() {
        members.swap(i, rng.below(i + 1));
    }
    let sep = *rng.pick(&[",", ", ", " ,\n"]);
    format!("{{{}}}", members.join(sep)).into_bytes()
}

#[test]
fn signed_claims_are_accepted_exactly_as_documented() {
    let fx = fx();
    run("access_claims", 1_500, |rng| {
        let key = rng.below(fx.keys.len());
        let now = NOW + rng.below(11) as i64 - 5;
        let payload = match rng.below(10) {
            0..=6 => gen_claims_payload(rng),
            7 | 8 => access_payload_from_bytes(fx, &rng.some_bytes(24)).1,
            _ => {
                let base = String::from_utf8(gen_claims_payload(rng)).unwrap();
                mutate(rng, &base, &["\"", ",", ":", "{", "}", "\\", "1", "null", "é"], &[]).into_bytes()
            }
        };
        check_access_claims(fx, key, &payload, now);
    });
}

#[test]
fn known_claim_cases() {
    let fx = fx();
    let ok = r#"{"iss":"https://idp.test","sub":"s","aud":"a","exp":1900000600,"iat":1899999000,"jti":"j","client_id":"c","org":"o"}"#;
    assert!(expected_access_claims(ok.as_bytes(), NOW).is_ok());
    for (payload, want) in [
        (ok.replace("\"sub\":\"s\"", "\"sub\":\"s\",\"sub\":\"t\""), Some(TokenError::Claims)),
        (ok.replace("1900000600", "\"1900000600\""), Some(TokenError::Claims)),
        (ok.replace("1900000600", "1900000600.0"), Some(TokenError::Claims)),
        (ok.replace("\"org\":\"o\"", "\"org\":\"o\",\"nbf\":1"), Some(TokenError::Claims)),
        (ok.replace("\"aud\":\"a\"", "\"aud\":[\"a\",1]"), Some(TokenError::Claims)),
        (ok.replace("https://idp.test", "https://idp.test/"), Some(TokenError::Issuer)),
        (ok.replace("1900000600", &(NOW - SKEW_SECS).to_string()), Some(TokenError::Expired)),
        (ok.replace("1900000600", &(NOW - SKEW_SECS + 1).to_string()), None),
        (ok.replace("1899999000", &(NOW + SKEW_SECS + 1).to_string()), Some(TokenError::NotYetValid)),
        (ok.replace("1899999000", &(NOW + SKEW_SECS).to_string()), None),
        (ok.replace("\"org\":\"o\"", "\"org\":\"o\",\"cnf\":null,\"scope\":\"\""), None),
        ("[]".to_owned(), Some(TokenError::Claims)),
    ] {
        assert_eq!(expected_access_claims(payload.as_bytes(), NOW).err(), want, "{payload}");
        for key in 0..fx.keys.len() {
            check_access_claims(fx, key, payload.as_bytes(), NOW);
        }
    }
}

// ---- client assertions ----------------------------------------------------------------------

struct AssertionFixture {
    keys: Vec<ClientKey>,
    assertions: Vec<(String, String)>,
}

fn assertions() -> &'static AssertionFixture {
    static A: OnceLock<AssertionFixture> = OnceLock::new();
    A.get_or_init(|| {
        let fx = fx();
        let keys: Vec<ClientKey> = fx.client_jwks().iter().filter_map(ClientKey::from_jwk).collect();
        assert_eq!(keys.len(), 4, "RSA, P-256, Ed25519 and P-384 client keys");
        let claims =
            json!({ "iss": "acme$billing", "sub": "acme$billing", "aud": ISSUER, "exp": NOW + 60, "jti": "a" });
        let assertions =
            ASSERTION_ALGORITHMS.iter().map(|a| ((*a).to_owned(), fx.assertion(a, None, &claims))).collect();
        AssertionFixture { keys, assertions }
    })
}

#[test]
fn client_assertions_randomized() {
    let a = assertions();
    for (_, t) in &a.assertions {
        check_assertion_signature(&a.keys, &a.assertions, t);
    }
    run("client_assertion", 3_000, |rng| {
        let (_, original) = rng.pick(&a.assertions);
        let token = match rng.below(4) {
            0 | 1 => edit_token(rng, original),
            2 => {
                // The header re-encoded: another algorithm for the same signature.
                let parts: Vec<&str> = original.split('.').collect();
                let other =
                    rng.pick(&ASSERTION_ALGORITHMS.iter().chain(&["none", "HS256"]).collect::<Vec<_>>()).to_string();
                let h = B64.encode(format!(r#"{{"alg":"{other}","typ":"JWT"}}"#));
                format!("{h}.{}.{}", parts[1], parts[2])
            }
            _ => {
                // Another payload (sub present or not, of another type) under a valid header.
                let sub = rng.pick(&[json!("acme$billing"), json!("acme$other"), json!(1), json!(null)]).clone();
                let mut claims = json!({ "iss": "acme$billing", "aud": ISSUER });
                if rng.percent(80) {
                    claims["sub"] = sub;
                }
                let parts: Vec<&str> = original.split('.').collect();
                format!("{}.{}.{}", parts[0], B64.encode(claims.to_string()), parts[2])
            }
        };
        let form = rng.pick(&[None, Some("acme$billing"), Some("acme$other"), Some("")]).to_owned();
        check_assertion_client_id(form, &token);
        check_assertion_signature(&a.keys, &a.assertions, &token);
    });
}

// ---- clients' JWKS --------------------------------------------------------------------------

fn gen_json(rng: &mut Rng, depth: usize) -> Value {
    const KEYS: [&str; 14] = ["kty", "crv", "x", "y", "n", "e", "kid", "alg", "use", "d", "k", "oth", "keys", "p"];
    match rng.below(if depth == 0 { 4 } else { 6 }) {
        0 => Value::Null,
        1 => json!(rng.next() as i64),
        2 => json!(*rng.pick(&["EC", "RSA", "OKP", "P-256", "P-384", "Ed25519", "sig", "ES384", "RS512", "AQAB"])),
        3 => json!(B64.encode(rng.some_bytes(300))),
        4 => Value::Array((0..rng.below(3)).map(|_| gen_json(rng, depth - 1)).collect()),
        _ => {
            Value::Object((0..rng.below(8)).map(|_| (rng.pick(&KEYS).to_string(), gen_json(rng, depth - 1))).collect())
        }
    }
}

#[test]
fn client_jwks_randomized() {
    let jwks = fx().client_jwks();
    check_jwks_document(&json!({ "keys": jwks }));
    run("jwks", 6_000, |rng| {
        let doc = match rng.below(4) {
            0..=2 => {
                let n = 4 * (1 + rng.below(5));
                let mut data = vec![1u8];
                data.extend(rng.bytes(n));
                jwks_from_bytes(&jwks, &data)
            }
            _ => Some(json!({ "keys": [gen_json(rng, 2), gen_json(rng, 2)] })),
        };
        if let Some(doc) = doc {
            check_jwks_document(&doc);
        }
    });
}

// ---- redirect URIs --------------------------------------------------------------------------

const URI_CORPUS: &[&str] = &[
    "https://app.test/cb",
    "https://app.test:8443/cb?x=1&y=%20",
    "https://app.test",
    "http://localhost:3000/cb",
    "http://127.0.0.1/cb",
    "http://[::1]:8080",
    "http://localhost",
    "http://localhost.evil.test/cb",
    "http://localhost@evil.test/",
    "https://user:pw@app.test/",
    "https://app.test/cb#x",
    "https://*.app.test/cb",
    "https://app.test\\@evil.test",
    "https:///cb",
    "https://?x",
    "HTTPS://app.test/",
    "https://app.test/c b",
    "https://app.test/é",
    "javascript:alert(1)",
    "https://app.test/cb?@evil.test",
    "https://app.test;@evil.test/",
    "https://[::1/",
    "https://app.test:99999/",
];

#[test]
fn redirect_uris_randomized() {
    for u in URI_CORPUS {
        check_registered_redirect_uri(u);
        check_registered_jwks_uri(u);
    }
    run("redirect_uri", 8_000, |rng| {
        let u = match rng.below(3) {
            0 => concat(rng, &URI_PIECES, 8),
            1 => {
                let base = *rng.pick(URI_CORPUS);
                mutate(rng, base, &URI_PIECES, URI_CORPUS)
            }
            _ => format!(
                "{}{}",
                rng.pick(&["https://", "http://localhost", "http://127.0.0.1"]),
                concat(rng, &URI_PIECES, 5)
            ),
        };
        check_registered_redirect_uri(&u);
        check_registered_jwks_uri(&u);
        let params: Vec<(String, String)> = (0..rng.below(4))
            .map(|_| {
                let text =
                    |rng: &mut Rng| concat(rng, &["a", "&", "=", "?", "#", "+", "%", "%26", " ", "é", "\0", "code"], 4);
                (text(rng), text(rng))
            })
            .collect();
        check_client_redirect(&u, &params);
    });
}

// ---- the fuzz targets' own decoders on random bytes -----------------------------------------

#[test]
fn fuzz_decoders_on_random_bytes() {
    let fx = fx();
    let jwks = fx.client_jwks();
    run("core_raw_bytes", 1_000, |rng| {
        let n = rng.below(100);
        let data = rng.bytes(n);
        let (key, payload, now) = access_payload_from_bytes(fx, &data);
        check_access_claims(fx, key, &payload, now);
        if let Some(doc) = jwks_from_bytes(&jwks, &data) {
            check_jwks_document(&doc);
        }
        let mut b = bytes::Bytes(&data);
        let uri = bytes::from_pieces(&URI_PIECES, b.field(b'\n'));
        check_registered_redirect_uri(&uri);
        check_registered_jwks_uri(&uri);
        check_client_redirect(&uri, &params_from_bytes(b.rest()));
    });
}
