//! `private_key_jwt` client assertions: `ClientAuth::assertion` names the form's client or the
//! assertion's `sub` and nothing else; an edited assertion never verifies under a client key
//! (`ClientKeyMaterial::verify`, every algorithm a client may use), and no key verifies with an
//! algorithm its type does not allow. See `src/tokens.rs`.
#![no_main]

use std::sync::OnceLock;

use portcullis_core::crypto::jwk::{ASSERTION_ALGORITHMS, ClientKey};
use portcullis_fuzz::invariants::mutate_token;
use portcullis_fuzz::tokens::{TokenFixture, check_assertion_client_id, check_assertion_signature};

struct Fixture {
    keys: Vec<ClientKey>,
    assertions: Vec<(String, String)>,
}

static FX: OnceLock<Fixture> = OnceLock::new();

fn fixture() -> Fixture {
    let fx = TokenFixture::new();
    let keys: Vec<ClientKey> = fx.client_jwks().iter().filter_map(ClientKey::from_jwk).collect();
    let claims = serde_json::json!({
        "iss": "acme$billing", "sub": "acme$billing", "aud": "https://idp.test/oauth2/token",
        "exp": 1_900_000_060, "jti": "a-1"
    });
    let assertions =
        ASSERTION_ALGORITHMS.iter().map(|alg| ((*alg).to_owned(), fx.assertion(alg, Some("k1"), &claims))).collect();
    Fixture { keys, assertions }
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let fx = FX.get_or_init(fixture);
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let (_, original) = &fx.assertions[usize::from(sel >> 2) % fx.assertions.len()];
    let token = if sel & 1 == 0 { mutate_token(original, rest) } else { String::from_utf8_lossy(rest).into_owned() };
    let form = match sel & 2 {
        0 => None,
        _ => Some(if rest.first().is_some_and(|b| b & 1 == 0) { "acme$billing" } else { "acme$other" }),
    };
    check_assertion_client_id(form, &token);
    check_assertion_signature(&fx.keys, &fx.assertions, &token);
});
