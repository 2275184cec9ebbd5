//! Property tests of access-token claim round trips (`tokens.rs`): any claims, signed by the
//! key of each algorithm (ES256, RS256, PS256, EdDSA; keys made once), verify back to exactly
//! the same claims; a token changed in any one byte is refused; a token past `exp` (beyond
//! `SKEW_SECS`), not yet valid, or of another issuer is refused with the documented error.
//! (The audience is the route's or the admin API's business: see the gateway's
//! `tests/policy_props.rs`.)
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

#[path = "../../../fuzz/src/bytes.rs"]
mod bytes;
#[path = "../../../fuzz/src/tokens.rs"]
#[allow(dead_code)]
mod tokens;

use std::sync::OnceLock;

use portcullis_core::crypto::jws;
use portcullis_core::tokens::{ACCESS_TOKEN_TYP, AccessClaims, Audience, SKEW_SECS, TokenError, verify_access_token};
use proptest::prelude::*;
use serde_json::json;
use tokens::{ISSUER, NOW, TokenFixture};

fn fx() -> &'static TokenFixture {
    static FX: OnceLock<TokenFixture> = OnceLock::new();
    FX.get_or_init(TokenFixture::new)
}

/// Any text a claim may carry (control characters, quotes, non-ASCII included).
fn text() -> impl Strategy<Value = String> {
    prop_oneof!["[a-z0-9$._:/-]{1,24}", any::<String>().prop_map(|s| s.chars().take(24).collect()), Just(String::new()),]
}

fn claims() -> impl Strategy<Value = AccessClaims> {
    (
        (text(), text(), text(), text()),
        prop::collection::vec(text(), 1..4),
        (SKEW_SECS + 1..1_000_000i64, -1_000_000..=SKEW_SECS),
        prop::collection::vec("[a-z]{1,6}/[a-z]{1,6}|openid", 0..4),
        prop::collection::vec(text(), 0..4),
        proptest::option::of(text()),
    )
        .prop_map(|((sub, jti, client_id, org), aud, (exp, iat), scopes, roles, cnf)| AccessClaims {
            iss: ISSUER.into(),
            sub,
            aud: if aud.len() == 1 { Audience::One(aud[0].clone()) } else { Audience::Many(aud) },
            exp: NOW + exp,
            iat: NOW + iat,
            jti,
            client_id,
            scope: scopes.join(" "),
            roles,
            org,
            cnf: cnf.map(|t| json!({ "x5t#S256": t })),
        })
}

fn sign(key: usize, c: &AccessClaims) -> String {
    jws::sign(&fx().keys[key], ACCESS_TOKEN_TYP, &serde_json::to_vec(c).unwrap()).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn claims_round_trip_under_every_algorithm(c in claims(), key in 0usize..4) {
        let token = sign(key, &c);
        prop_assert_eq!(verify_access_token(&token, &fx().set, ISSUER, NOW), Ok(c));
    }

    #[test]
    fn any_changed_byte_is_refused(c in claims(), key in 0usize..4, at in any::<prop::sample::Index>(), to in 0u8..128) {
        let token = sign(key, &c);
        let mut bytes = token.clone().into_bytes();
        let i = at.index(bytes.len());
        prop_assume!(bytes[i] != to);
        bytes[i] = to;
        let changed = String::from_utf8(bytes).unwrap();
        let got = verify_access_token(&changed, &fx().set, ISSUER, NOW);
        prop_assert!(got.is_err(), "byte {} of {} changed to {:?} still verifies", i, token, char::from(to));
    }

    #[test]
    fn lifetime_and_issuer_are_enforced(c in claims(), key in 0usize..4, late in 0i64..100_000, early in 1i64..100_000) {
        let set = &fx().set;
        // `exp` is reached once `now - SKEW_SECS` gets to it.
        let expired = AccessClaims { exp: NOW - SKEW_SECS - late, iat: NOW - 2_000_000, ..c.clone() };
        prop_assert_eq!(verify_access_token(&sign(key, &expired), set, ISSUER, NOW), Err(TokenError::Expired));
        let still = AccessClaims { exp: NOW - SKEW_SECS + 1, iat: NOW - 2_000_000, ..c.clone() };
        prop_assert!(verify_access_token(&sign(key, &still), set, ISSUER, NOW).is_ok());
        let future = AccessClaims { iat: NOW + SKEW_SECS + early, exp: NOW + 2_000_000, ..c.clone() };
        prop_assert_eq!(verify_access_token(&sign(key, &future), set, ISSUER, NOW), Err(TokenError::NotYetValid));
        let token = sign(key, &c);
        for other in ["https://idp.test/", "https://IDP.test", "http://idp.test", ""] {
            prop_assert_eq!(verify_access_token(&token, set, other, NOW), Err(TokenError::Issuer));
        }
    }
}
