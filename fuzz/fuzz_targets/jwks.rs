//! JWKS documents (a client's registered JWKS or fetched `jwks_uri`, and the control plane's
//! JWKS as a gateway reads it): every key through `ClientKey::from_jwk` and
//! `VerifyingKey::from_jwk`, never trusting a private, symmetric or malformed key, and reading
//! back what is accepted. See `src/tokens.rs`.
#![no_main]

use std::sync::OnceLock;

use portcullis_fuzz::tokens::{TokenFixture, check_jwks_document, jwks_from_bytes};

static JWKS: OnceLock<Vec<serde_json::Value>> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let jwks = JWKS.get_or_init(|| TokenFixture::new().client_jwks());
    if let Some(doc) = jwks_from_bytes(jwks, data) {
        check_jwks_document(&doc);
    }
});
