//! Invariants of the core's token parsers: access-token claims (`tokens.rs`), `private_key_jwt`
//! client assertions (`ClientAuth::assertion`, `ClientKeyMaterial::verify`) and clients' JWKs
//! (`jwk.rs`). Shared by the cargo-fuzz targets `access_token`, `client_assertion` and `jwks`
//! and by `crates/portcullis-core/tests/parsers_fuzz.rs` (stable, seeded).
//!
//! The expectations are written from the documentation (DESIGN §3, the module docs of
//! `tokens.rs`, `jws.rs` and `jwk.rs`), not copied from the implementations.

use std::collections::BTreeSet;
use std::fmt;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair, RsaKeyPair};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use portcullis_core::crypto::jwk::{ASSERTION_ALGORITHMS, ClientKey, ClientKeyMaterial};
use portcullis_core::crypto::jws::{self, JwsError, MAX_JWS_LEN};
use portcullis_core::crypto::keyring::{KeySet, seal_purpose};
use portcullis_core::crypto::signing::{Algorithm, SigningKey};
use portcullis_core::crypto::vault::{KeyVault, LocalKeyVault};
use portcullis_core::model::{KeyState, StoredSigningKey};
use portcullis_core::tokens::{ACCESS_TOKEN_TYP, AccessClaims, SKEW_SECS, TokenError, verify_access_token};
use portcullis_core::usecases::ClientAuth;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::{Value, json};

use crate::bytes::Bytes;

/// The issuer every fixture token names.
pub const ISSUER: &str = "https://idp.test";
/// The fixture's "now": tokens are issued at `NOW - 60` and expire at `NOW + 600`.
pub const NOW: i64 = 1_900_000_000;

/// One signing key per algorithm in a loaded [`KeySet`], the keys' PKCS#8 (to sign client
/// assertions with the same key pairs) and an access token signed by each.
pub struct TokenFixture {
    pub keys: Vec<SigningKey>,
    pub pkcs8: Vec<Vec<u8>>,
    pub set: KeySet,
    pub claims: AccessClaims,
    pub tokens: Vec<String>,
    /// A P-384 key pair (PKCS#8), which our own keys do not use but clients may.
    pub p384: Vec<u8>,
}

impl TokenFixture {
    pub fn new() -> Self {
        let vault = LocalKeyVault::new(&[7u8; 32]).expect("vault");
        let mut keys = Vec::new();
        let mut pkcs8 = Vec::new();
        let mut stored = Vec::new();
        for alg in Algorithm::ALL {
            let (k, der) = SigningKey::generate(alg).expect("key generation");
            stored.push(StoredSigningKey {
                kid: k.kid().to_owned(),
                alg,
                state: KeyState::Current,
                sealed_private_key: vault.seal(&seal_purpose(k.kid()), &der).expect("seal"),
                created_at: 0,
                activated_at: Some(0),
                expires_at: None,
            });
            keys.push(k);
            pkcs8.push(der.to_vec());
        }
        let set = KeySet::load(&stored, &vault, NOW, &Algorithm::ALL).expect("key set");
        let claims = AccessClaims {
            iss: ISSUER.into(),
            sub: "acme$billing".into(),
            aud: portcullis_core::tokens::Audience::Many(vec!["https://api.test".into(), "https://b.test".into()]),
            exp: NOW + 600,
            iat: NOW - 60,
            jti: "jti-1".into(),
            client_id: "acme$billing".into(),
            scope: "payments/read openid".into(),
            roles: vec!["payments:reader".into()],
            org: "acme".into(),
            cnf: Some(json!({ "x5t#S256": "abc" })),
        };
        let payload = serde_json::to_vec(&claims).expect("claims");
        let tokens = keys.iter().map(|k| jws::sign(k, ACCESS_TOKEN_TYP, &payload).expect("sign")).collect();
        let p384 = EcdsaKeyPair::generate(&signature::ECDSA_P384_SHA384_FIXED_SIGNING)
            .and_then(|k| k.to_pkcs8v1())
            .expect("P-384 key")
            .as_ref()
            .to_vec();
        TokenFixture { keys, pkcs8, set, claims, tokens, p384 }
    }

    fn pkcs8_of(&self, alg: Algorithm) -> &[u8] {
        self.keys.iter().position(|k| k.alg() == alg).and_then(|i| self.pkcs8.get(i)).map_or(&[], Vec::as_slice)
    }

    /// Signs `signing_input` as a client would with `alg` (one of [`ASSERTION_ALGORITHMS`]).
    pub fn client_sign(&self, alg: &str, signing_input: &[u8]) -> Vec<u8> {
        let rng = SystemRandom::new();
        let rsa = |padding: &'static dyn signature::RsaEncoding| {
            let kp = RsaKeyPair::from_pkcs8(self.pkcs8_of(Algorithm::RS256)).expect("RSA key");
            let mut sig = vec![0u8; kp.public_modulus_len()];
            kp.sign(padding, &rng, signing_input, &mut sig).expect("RSA signature");
            sig
        };
        let ec = |alg: &'static signature::EcdsaSigningAlgorithm, pkcs8: &[u8]| {
            let kp = EcdsaKeyPair::from_pkcs8(alg, pkcs8).expect("EC key");
            kp.sign(&rng, signing_input).expect("EC signature").as_ref().to_vec()
        };
        match alg {
            "ES256" => ec(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, self.pkcs8_of(Algorithm::ES256)),
            "ES384" => ec(&signature::ECDSA_P384_SHA384_FIXED_SIGNING, &self.p384),
            "EdDSA" => Ed25519KeyPair::from_pkcs8(self.pkcs8_of(Algorithm::EdDSA))
                .expect("Ed25519 key")
                .sign(signing_input)
                .as_ref()
                .to_vec(),
            "RS256" => rsa(&signature::RSA_PKCS1_SHA256),
            "RS384" => rsa(&signature::RSA_PKCS1_SHA384),
            "RS512" => rsa(&signature::RSA_PKCS1_SHA512),
            "PS256" => rsa(&signature::RSA_PSS_SHA256),
            "PS384" => rsa(&signature::RSA_PSS_SHA384),
            _ => rsa(&signature::RSA_PSS_SHA512),
        }
    }

    /// The clients' public keys as they would register them: the JWKs of the RSA, P-256 and
    /// Ed25519 keys, and the P-384 key's.
    pub fn client_jwks(&self) -> Vec<Value> {
        let mut out: Vec<Value> = self
            .keys
            .iter()
            .filter(|k| k.alg() != Algorithm::PS256)
            .map(|k| {
                let mut j = k.verifying_key().jwk();
                if let Some(o) = j.as_object_mut() {
                    // A client's RSA key may sign with any RSA algorithm: no `alg` pins it.
                    if o.get("kty").is_some_and(|t| t == "RSA") {
                        o.remove("alg");
                    }
                }
                j
            })
            .collect();
        let p384 = EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P384_SHA384_FIXED_SIGNING, &self.p384).expect("P-384");
        let mut j = Value::Object(ClientKeyMaterial::P384(p384.public_key().as_ref().to_vec()).jwk_members());
        j["kid"] = "p384".into();
        out.push(j);
        out
    }

    /// A client assertion signed with `alg`, over `claims`, with `kid` in its header.
    pub fn assertion(&self, alg: &str, kid: Option<&str>, claims: &Value) -> String {
        let mut header = json!({ "alg": alg, "typ": "JWT" });
        if let Some(k) = kid {
            header["kid"] = k.into();
        }
        let mut t = B64.encode(header.to_string());
        t.push('.');
        B64.encode_string(claims.to_string(), &mut t);
        let sig = self.client_sign(alg, t.as_bytes());
        t.push('.');
        B64.encode_string(sig, &mut t);
        t
    }
}

impl Default for TokenFixture {
    fn default() -> Self {
        Self::new()
    }
}

// =============================================================================================
// Access tokens (tokens.rs)
// =============================================================================================

/// `verify_access_token` on any text: an access token verifies only if it is, byte for byte, a
/// token one of the key set's keys signed, and then its claims are exactly the issued ones;
/// anything over `MAX_JWS_LEN` is `TooLarge` before any other work.
pub fn check_access_token(fx: &TokenFixture, token: &str) {
    let got = verify_access_token(token, &fx.set, ISSUER, NOW);
    if token.len() > MAX_JWS_LEN {
        assert_eq!(got, Err(TokenError::Jws(JwsError::TooLarge)), "{} bytes", token.len());
    }
    if let Ok(claims) = got {
        assert!(fx.tokens.iter().any(|t| t == token), "a changed access token verified: {token:?}");
        assert_eq!(claims, fx.claims);
    }
}

/// The members of an object as written, duplicates kept (a `serde_json::Value` would keep only
/// the last one).
struct Members(Option<Vec<(String, Value)>>);

impl<'de> serde::Deserialize<'de> for Members {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Members;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Members, A::Error> {
                let mut out = Vec::new();
                while let Some(kv) = m.next_entry::<String, Value>()? {
                    out.push(kv);
                }
                Ok(Members(Some(out)))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Members, E> {
                Ok(Members(None))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Members, E> {
                Ok(Members(None))
            }
            fn visit_u64<E>(self, _: u64) -> Result<Members, E> {
                Ok(Members(None))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Members, E> {
                Ok(Members(None))
            }
            fn visit_str<E>(self, _: &str) -> Result<Members, E> {
                Ok(Members(None))
            }
            fn visit_unit<E>(self) -> Result<Members, E> {
                Ok(Members(None))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut s: A) -> Result<Members, A::Error> {
                while s.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(Members(None))
            }
        }
        d.deserialize_any(V)
    }
}

/// The members of the JSON object `payload`, duplicates kept; `None` when it is not one.
pub fn object_members(payload: &[u8]) -> Option<Vec<(String, Value)>> {
    serde_json::from_slice::<Members>(payload).ok().and_then(|m| m.0)
}

const STRING_CLAIMS: [&str; 6] = ["iss", "sub", "jti", "client_id", "org", "scope"];
const REQUIRED_CLAIMS: [&str; 8] = ["iss", "sub", "aud", "exp", "iat", "jti", "client_id", "org"];

/// What `verify_access_token` must answer for a correctly signed token carrying `payload`, from
/// RFC 9068 and the `AccessClaims` documentation: a JSON object with each member at most once,
/// only the known claims, each of its JSON type (`exp`/`iat` integers, `aud` a string or an
/// array of strings, `roles` an array of strings, `cnf` anything), the required ones present;
/// then the issuer, then `exp` and `iat` with `SKEW_SECS` of skew. `Ok` carries the payload's
/// members, with `roles` defaulting to `[]`, and an empty `scope` and a null `cnf` dropped.
pub fn expected_access_claims(payload: &[u8], now: i64) -> Result<Value, TokenError> {
    let members = object_members(payload).ok_or(TokenError::Claims)?;
    let names: Vec<&str> = members.iter().map(|(k, _)| k.as_str()).collect();
    let unique: BTreeSet<&str> = names.iter().copied().collect();
    if unique.len() != names.len() {
        return Err(TokenError::Claims);
    }
    let string_array = |v: &Value| v.as_array().is_some_and(|a| a.iter().all(Value::is_string));
    for (k, v) in &members {
        let ok = match k.as_str() {
            k if STRING_CLAIMS.contains(&k) => v.is_string(),
            "exp" | "iat" => v.as_i64().is_some(),
            "aud" => v.is_string() || string_array(v),
            "roles" => string_array(v),
            "cnf" => true,
            _ => false,
        };
        if !ok {
            return Err(TokenError::Claims);
        }
    }
    if REQUIRED_CLAIMS.iter().any(|r| !unique.contains(r)) {
        return Err(TokenError::Claims);
    }
    let mut o: serde_json::Map<String, Value> = members.into_iter().collect();
    let int = |o: &serde_json::Map<String, Value>, k: &str| o.get(k).and_then(Value::as_i64).unwrap_or_default();
    if o.get("iss").and_then(Value::as_str) != Some(ISSUER) {
        return Err(TokenError::Issuer);
    }
    if int(&o, "exp") <= now - SKEW_SECS {
        return Err(TokenError::Expired);
    }
    if int(&o, "iat") > now + SKEW_SECS {
        return Err(TokenError::NotYetValid);
    }
    o.entry("roles").or_insert_with(|| json!([]));
    if o.get("scope").is_some_and(|s| s == "") {
        o.remove("scope");
    }
    if o.get("cnf").is_some_and(Value::is_null) {
        o.remove("cnf");
    }
    Ok(Value::Object(o))
}

/// A correctly signed token (key `key` of the fixture) around any payload: the answer is
/// [`expected_access_claims`], and the claims that come back re-serialise to the same members.
pub fn check_access_claims(fx: &TokenFixture, key: usize, payload: &[u8], now: i64) {
    let Some(k) = fx.keys.get(key % fx.keys.len().max(1)) else {
        return;
    };
    let token = jws::sign(k, ACCESS_TOKEN_TYP, payload).expect("sign");
    let got = verify_access_token(&token, &fx.set, ISSUER, now);
    if token.len() > MAX_JWS_LEN {
        assert_eq!(got, Err(TokenError::Jws(JwsError::TooLarge)));
        return;
    }
    let got = got.map(|c| serde_json::to_value(&c).expect("claims serialise"));
    // An empty segment is not a JWS at all (jws.rs).
    let want = if payload.is_empty() {
        Err(TokenError::Jws(JwsError::Malformed))
    } else {
        expected_access_claims(payload, now)
    };
    assert_eq!(got, want, "claims {:?} at {now}", String::from_utf8_lossy(payload));
}

const CLAIM_NAMES: [&str; 14] =
    ["iss", "sub", "aud", "exp", "iat", "jti", "client_id", "scope", "roles", "org", "cnf", "nbf", "Iss", "extra"];

/// A claims payload from fuzzer bytes: an even first byte edits the fixture's claims (members
/// set to other values and types, removed, duplicated in the text, times moved around `NOW`
/// by a few seconds of skew); an odd one takes the rest as the payload.
pub fn access_payload_from_bytes(fx: &TokenFixture, data: &[u8]) -> (usize, Vec<u8>, i64) {
    let mut b = Bytes(data);
    let sel = b.byte();
    let key = usize::from(sel >> 1);
    let now = NOW + i64::from(b.byte() as i8) * 10 + i64::from(b.byte() % 12) - 6;
    if sel & 1 == 1 {
        return (key, b.rest().to_vec(), now);
    }
    let mut v = serde_json::to_value(&fx.claims).expect("claims");
    let mut duplicate = None;
    while !b.0.is_empty() {
        let (op, name, x) = (b.byte(), *b.pick(&CLAIM_NAMES).unwrap_or(&"iss"), b.byte());
        let value = match op % 9 {
            0 => Value::String(["", ISSUER, "https://idp.test/", "x", "é", "acme"][usize::from(x) % 6].into()),
            1 => json!(NOW + i64::from(x as i8) - 64),
            2 => json!(NOW - 600 - i64::from(x % 12)),
            3 => json!(f64::from(x) + 0.5),
            4 => [Value::Null, json!(true), json!([]), json!({}), json!(["a", 1]), json!(["a", "b"])]
                [usize::from(x) % 6]
                .clone(),
            5 => json!(u64::MAX - u64::from(x)),
            6 => {
                if let Some(o) = v.as_object_mut() {
                    o.remove(name);
                }
                continue;
            }
            7 => {
                duplicate = Some((name, x));
                continue;
            }
            _ => json!(i64::MIN + i64::from(x)),
        };
        v[name] = value;
    }
    let mut text = v.to_string();
    if let Some((name, x)) = duplicate
        && text.len() > 1
    {
        text.insert_str(1, &format!("\"{name}\":{x},"));
    }
    (key, text.into_bytes(), now)
}

// =============================================================================================
// Client assertions (private_key_jwt)
// =============================================================================================

/// `ClientAuth::assertion`: the client the token endpoint authenticates is the form's
/// `client_id` when given, else the assertion's `sub` (a string member of a decodable payload);
/// when both are there they must agree; with neither it is refused. Never anything else.
pub fn check_assertion_client_id(form_client_id: Option<&str>, assertion: &str) {
    let sub = jws::parse(assertion)
        .ok()
        .and_then(|p| serde_json::from_slice::<Value>(&p.payload).ok())
        .and_then(|v| v.get("sub").and_then(Value::as_str).map(str::to_owned));
    let got = ClientAuth::assertion(form_client_id.map(str::to_owned), assertion.to_owned());
    let expected = match (form_client_id, sub.as_deref()) {
        (Some(f), Some(s)) if f != s => None,
        (Some(f), _) => Some(f),
        (None, Some(s)) => Some(s),
        (None, None) => None,
    };
    match (&got, expected) {
        (Ok(auth), Some(id)) => {
            assert_eq!(auth.client_id(), id);
            assert!(matches!(auth, ClientAuth::Assertion { assertion: a, .. } if a.as_str() == assertion));
        }
        (Err(_), None) => {}
        _ => panic!("ClientAuth::assertion({form_client_id:?}, {assertion:?}) = {got:?}, expected {expected:?}"),
    }
}

/// The signature side of `private_key_jwt` on an edited assertion: a client key verifies it
/// only with an algorithm its key type allows, and only if it is, byte for byte, an assertion
/// that key signed with that algorithm.
pub fn check_assertion_signature(keys: &[ClientKey], originals: &[(String, String)], token: &str) {
    let Ok(p) = jws::parse(token) else {
        return;
    };
    for k in keys {
        for alg in ASSERTION_ALGORITHMS.iter().chain(&["none", "HS256", "es256", ""]) {
            let ok = k.material.verify(alg, p.signing_input.as_bytes(), &p.signature);
            if !k.material.allows(alg) {
                assert!(!ok, "{alg} verified with a {} key", k.material.describe());
            }
            if ok {
                assert!(
                    originals.iter().any(|(a, t)| a == alg && t == token),
                    "an edited assertion verified with {alg} under {k:?}: {token:?}"
                );
            }
        }
    }
}

// =============================================================================================
// Clients' JWKs (jwk.rs)
// =============================================================================================

/// The members that only a private or symmetric key has.
pub const CLIENT_PRIVATE_MEMBERS: [&str; 7] = ["d", "p", "q", "dp", "dq", "qi", "k"];

fn strip_zeros(v: &[u8]) -> &[u8] {
    let lead = v.iter().take_while(|b| **b == 0).count();
    v.get(lead..).unwrap_or_default()
}

/// `ClientKey::from_jwk` never panics and never trusts a private or symmetric key, an `enc`
/// key, an unknown key type or curve, an `alg` the key type does not allow, or key material of
/// the wrong size; what it accepts keeps the JWK's `kid`, has the documented material for its
/// `kty`/`crv`, and reads back from its own public members.
pub fn check_client_jwk(v: &Value) {
    let got = ClientKey::from_jwk(v);
    let Some(o) = v.as_object() else {
        assert!(got.is_none(), "a non-object JWK was accepted: {v}");
        return;
    };
    let Some(k) = got else {
        return;
    };
    assert!(!CLIENT_PRIVATE_MEMBERS.iter().any(|m| o.contains_key(*m)), "private member accepted: {v}");
    assert!(o.get("use").is_none_or(|u| u == "sig"), "{v}");
    let s = |name: &str| o.get(name).and_then(Value::as_str);
    let b = |name: &str| s(name).and_then(|x| B64.decode(x).ok()).unwrap_or_default();
    assert_eq!(k.kid.as_deref(), s("kid"), "{v}");
    if let Some(alg) = s("alg") {
        assert!(k.material.allows(alg), "alg {alg} accepted for {k:?}");
    }
    match (&k.material, s("kty"), s("crv")) {
        (ClientKeyMaterial::P256(p), Some("EC"), Some("P-256"))
        | (ClientKeyMaterial::P384(p), Some("EC"), Some("P-384")) => {
            assert_eq!(p.first(), Some(&4));
            assert_eq!(p.get(1..), Some([b("x"), b("y")].concat().as_slice()), "{v}");
            assert!(p.len() == 65 || p.len() == 97, "{v}");
        }
        (ClientKeyMaterial::Ed25519(x), Some("OKP"), Some("Ed25519")) => {
            assert_eq!(x, &b("x"));
            assert_eq!(x.len(), 32);
        }
        (ClientKeyMaterial::Rsa { n, e }, Some("RSA"), _) => {
            assert_eq!((n, e), (&b("n"), &b("e")));
            assert!((256..=1024).contains(&n.len()) && (1..=8).contains(&e.len()), "{v}");
        }
        (m, kty, crv) => panic!("{} material from kty {kty:?} crv {crv:?}: {v}", m.describe()),
    }
    // The public members read back (an RSA modulus or exponent without its leading zeros).
    let back = ClientKey::from_jwk(&Value::Object(k.material.jwk_members()));
    match (&k.material, back.map(|b| b.material)) {
        (ClientKeyMaterial::Rsa { n, e }, Some(ClientKeyMaterial::Rsa { n: n2, e: e2 })) => {
            assert_eq!((strip_zeros(n), strip_zeros(e)), (n2.as_slice(), e2.as_slice()));
        }
        (ClientKeyMaterial::Rsa { n, e }, None) => {
            assert!(strip_zeros(n).len() < 256 || strip_zeros(e).is_empty(), "{v} does not read back");
        }
        (m, back) => assert_eq!(Some(m), back.as_ref(), "{v} does not read back"),
    }
    let _ = k.material.describe();
}

/// A JWKS document (a client's registered JWKS or a fetched `jwks_uri`): every member of
/// `keys` through [`check_client_jwk`] and, as the gateway reads the control plane's JWKS,
/// through the signing-key check of `invariants.rs`'s sibling (`VerifyingKey::from_jwk`).
pub fn check_jwks_document(doc: &Value) {
    for k in doc.get("keys").and_then(Value::as_array).into_iter().flatten().take(100) {
        check_client_jwk(k);
        check_signing_jwk(k);
    }
}

/// `VerifyingKey::from_jwk` (our own keys, as a gateway reads them): never a key from an object
/// with a private member, and what is accepted reads back from its own `jwk()`.
pub fn check_signing_jwk(v: &Value) {
    use portcullis_core::crypto::signing::VerifyingKey;
    let Some(k) = VerifyingKey::from_jwk(v) else {
        return;
    };
    let o = v.as_object().expect("an accepted JWK is an object");
    assert!(!CLIENT_PRIVATE_MEMBERS.iter().chain(&["oth"]).any(|m| o.contains_key(*m)), "{v}");
    assert_eq!(o.get("kid").and_then(Value::as_str), Some(k.kid()), "{v}");
    assert_eq!(VerifyingKey::from_jwk(&k.jwk()).as_ref(), Some(&k), "{v}");
}

const JWK_NAMES: [&str; 16] =
    ["kty", "crv", "x", "y", "n", "e", "kid", "alg", "use", "d", "k", "p", "key_ops", "oth", "x5c", "Kty"];
const JWK_VALUES: [&str; 24] = [
    "EC", "RSA", "OKP", "oct", "P-256", "P-384", "P-521", "Ed25519", "Ed448", "X25519", "ES256", "ES384", "RS256",
    "PS512", "EdDSA", "none", "HS256", "sig", "enc", "", "AQAB", "AA", "es256", "ec",
];

/// A JWKS document from fuzzer bytes: an odd first byte edits the fixture's client JWKs
/// (members set to names, base64url of chosen lengths, other JSON types, or removed); an even
/// one parses the rest as JSON.
pub fn jwks_from_bytes(jwks: &[Value], data: &[u8]) -> Option<Value> {
    let mut b = Bytes(data);
    let sel = b.byte();
    if sel & 1 == 0 {
        return serde_json::from_slice(b.rest()).ok();
    }
    let mut keys: Vec<Value> = jwks.to_vec();
    while !b.0.is_empty() {
        let which = usize::from(b.byte()) % keys.len().max(1);
        let (op, name, x) = (b.byte(), *b.pick(&JWK_NAMES).unwrap_or(&"kty"), b.byte());
        let value = match op % 5 {
            0 => Value::String((*JWK_VALUES.get(usize::from(x) % JWK_VALUES.len()).unwrap_or(&"")).into()),
            1 => {
                let len = [0, 1, 3, 31, 32, 33, 47, 48, 49, 255, 256, 257, 512, 1024, 1025][usize::from(x) % 15];
                let mut raw = vec![x | 1; len];
                if let Some(first) = raw.first_mut() {
                    *first = x & 0x3; // sometimes a leading zero
                }
                Value::String(B64.encode(raw))
            }
            2 => [Value::Null, json!(1), json!([]), json!({}), json!("=="), json!("AQAB=")][usize::from(x) % 6].clone(),
            3 => {
                if let Some(o) = keys.get_mut(which).and_then(Value::as_object_mut) {
                    o.remove(name);
                }
                continue;
            }
            _ => {
                if let Some(k) = keys.get(which).cloned() {
                    keys.push(k);
                }
                continue;
            }
        };
        if let Some(o) = keys.get_mut(which).and_then(Value::as_object_mut) {
            o.insert(name.to_owned(), value);
        }
    }
    Some(json!({ "keys": keys }))
}
