//! Compact JWS parsing and verification (`portcullis_core::crypto::jws`) against fixed keys (one
//! per algorithm): never a panic, `TooLarge` over `MAX_JWS_LEN`, canonical base64url only, and a
//! token changed anywhere never verifies. See `src/invariants.rs`.
#![no_main]

use std::sync::OnceLock;

use portcullis_fuzz::invariants::{BearerFixture, bearer_token_from_bytes, check_bearer};

static KEYS: OnceLock<BearerFixture> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let fx = KEYS.get_or_init(BearerFixture::new);
    check_bearer(fx, &bearer_token_from_bytes(fx, data));
});
