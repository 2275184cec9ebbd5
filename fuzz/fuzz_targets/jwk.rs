//! `VerifyingKey::from_jwk` on arbitrary JSON and on edited public JWKs: never a panic, never a
//! key from an object with a private member, and what is accepted is consistent and reads back.
//! See `src/invariants.rs`.
#![no_main]

use std::sync::OnceLock;

use portcullis_fuzz::invariants::{BearerFixture, check_jwk, jwk_from_bytes};

static JWKS: OnceLock<Vec<serde_json::Value>> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let jwks = JWKS.get_or_init(|| BearerFixture::new().jwks());
    if let Some(v) = jwk_from_bytes(jwks, data) {
        check_jwk(&v);
    }
});
