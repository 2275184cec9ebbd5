//! Access tokens (`tokens::verify_access_token` against a key set with one key per algorithm):
//! an edited token never verifies, and a correctly signed token around any claims payload is
//! accepted or refused exactly as RFC 9068 and `AccessClaims` document (types, duplicates,
//! unknown claims, issuer, `exp`/`iat` with skew), its claims reading back unchanged. See
//! `src/tokens.rs`.
#![no_main]

use std::sync::OnceLock;

use portcullis_fuzz::invariants::mutate_token;
use portcullis_fuzz::tokens::{TokenFixture, access_payload_from_bytes, check_access_claims, check_access_token};

static FX: OnceLock<TokenFixture> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let fx = FX.get_or_init(TokenFixture::new);
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    if sel & 1 == 0 {
        let original = &fx.tokens[usize::from(sel >> 1) % fx.tokens.len()];
        check_access_token(fx, &mutate_token(original, rest));
    } else {
        let (key, payload, now) = access_payload_from_bytes(fx, rest);
        check_access_claims(fx, key, &payload, now);
    }
});
