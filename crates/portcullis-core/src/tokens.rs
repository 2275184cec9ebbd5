//! RFC 9068 JWT access tokens: the claims Portcullis issues (DESIGN §3) and strict parsing of
//! them when we verify our own tokens (introspection, the admin API, later the gateway).

use serde::{Deserialize, Serialize};

use crate::clock::UnixTime;
use crate::crypto::jws::{self, JwsError};
use crate::crypto::keyring::KeySet;

pub const ACCESS_TOKEN_TYP: &str = "at+jwt";
/// Allowed clock skew when checking `exp`/`iat` of our own tokens.
pub const SKEW_SECS: i64 = 5;

/// `aud` is a string when there is one audience and an array otherwise (RFC 7519 §4.1.3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Audience {
    One(String),
    Many(Vec<String>),
}

impl Audience {
    pub fn from_vec(mut v: Vec<String>) -> Self {
        if v.len() == 1 { Audience::One(v.remove(0)) } else { Audience::Many(v) }
    }
    pub fn contains(&self, a: &str) -> bool {
        match self {
            Audience::One(x) => x == a,
            Audience::Many(v) => v.iter().any(|x| x == a),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessClaims {
    pub iss: String,
    pub sub: String,
    pub aud: Audience,
    pub exp: i64,
    pub iat: i64,
    pub jti: String,
    pub client_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub scope: String,
    #[serde(default)]
    pub roles: Vec<String>,
    pub org: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cnf: Option<serde_json::Value>,
}

impl AccessClaims {
    pub fn scopes(&self) -> impl Iterator<Item = &str> {
        self.scope.split(' ').filter(|s| !s.is_empty())
    }
}

/// The claims as issued, borrowing everything: serialises exactly like [`AccessClaims`]
/// without copying a string per claim on the token path.
#[derive(Debug, Serialize)]
pub struct AccessClaimsRef<'a> {
    pub iss: &'a str,
    pub sub: &'a str,
    pub aud: AudienceRef<'a>,
    pub exp: i64,
    pub iat: i64,
    pub jti: &'a str,
    pub client_id: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub scope: &'a str,
    pub roles: &'a [&'a str],
    pub org: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cnf: Option<CnfRef<'a>>,
}

/// RFC 8705 §3.1 confirmation: the SHA-256 thumbprint of the client certificate.
#[derive(Debug, Serialize)]
pub struct CnfRef<'a> {
    #[serde(rename = "x5t#S256")]
    pub x5t_s256: &'a str,
}

#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum AudienceRef<'a> {
    One(&'a str),
    Many(&'a [&'a str]),
}

impl<'a> AudienceRef<'a> {
    pub fn of(v: &'a [&'a str]) -> Self {
        match v {
            [one] => AudienceRef::One(one),
            many => AudienceRef::Many(many),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error(transparent)]
    Jws(#[from] JwsError),
    #[error("token claims are malformed")]
    Claims,
    #[error("token was issued by another issuer")]
    Issuer,
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet")]
    NotYetValid,
    #[error("token has been revoked")]
    Revoked,
    #[error("token's client is disabled or deleted")]
    ClientGone,
    #[error("token cannot be checked right now")]
    Unavailable,
}

/// Verifies signature, type, issuer and lifetime of one of our access tokens.
pub fn verify_access_token(
    token: &str,
    keys: &KeySet,
    issuer: &str,
    now: UnixTime,
) -> Result<AccessClaims, TokenError> {
    let (_, payload) = jws::verify(token, ACCESS_TOKEN_TYP, |kid| keys.verifier(kid))?;
    let claims: AccessClaims = serde_json::from_slice(&payload).map_err(|_| TokenError::Claims)?;
    if claims.iss != issuer {
        return Err(TokenError::Issuer);
    }
    if claims.exp <= now - SKEW_SECS {
        return Err(TokenError::Expired);
    }
    if claims.iat > now + SKEW_SECS {
        return Err(TokenError::NotYetValid);
    }
    Ok(claims)
}

/// 122 random bits (a v4 UUID from a thread-local CSPRNG, no system call), base64url.
pub fn new_jti() -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(uuid::Uuid::new_v4().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::signing::{Algorithm, SigningKey};
    use crate::crypto::vault::{KeyVault, LocalKeyVault};
    use crate::model::{KeyState, StoredSigningKey};

    fn set() -> (KeySet, std::sync::Arc<SigningKey>) {
        let v = LocalKeyVault::new(&[1u8; 32]).unwrap();
        let (k, pkcs8) = SigningKey::generate(Algorithm::ES256).unwrap();
        let stored = StoredSigningKey {
            kid: k.kid().into(),
            alg: Algorithm::ES256,
            state: KeyState::Current,
            sealed_private_key: v.seal(&crate::crypto::keyring::seal_purpose(k.kid()), &pkcs8).unwrap(),
            created_at: 0,
            activated_at: Some(0),
            expires_at: None,
        };
        let s = KeySet::load(&[stored], &v, 0, &[Algorithm::ES256]).unwrap();
        let signer = s.signer(Algorithm::ES256).unwrap().clone();
        (s, signer)
    }

    fn claims(exp: i64) -> AccessClaims {
        AccessClaims {
            iss: "https://iss".into(),
            sub: "a$b".into(),
            aud: Audience::One("https://api".into()),
            exp,
            iat: 1000,
            jti: new_jti(),
            client_id: "a$b".into(),
            scope: "x/y".into(),
            roles: vec![],
            org: "a".into(),
            cnf: None,
        }
    }

    #[test]
    fn borrowed_claims_serialise_like_owned_ones() {
        let owned = AccessClaims {
            aud: Audience::Many(vec!["a".into(), "b".into()]),
            cnf: Some(serde_json::json!({ "x5t#S256": "thumb" })),
            ..claims(2000)
        };
        let auds = ["a", "b"];
        let borrowed = AccessClaimsRef {
            iss: &owned.iss,
            sub: &owned.sub,
            aud: AudienceRef::of(&auds),
            exp: owned.exp,
            iat: owned.iat,
            jti: &owned.jti,
            client_id: &owned.client_id,
            scope: &owned.scope,
            roles: &[],
            org: &owned.org,
            cnf: Some(CnfRef { x5t_s256: "thumb" }),
        };
        assert_eq!(serde_json::to_string(&borrowed).unwrap(), serde_json::to_string(&owned).unwrap());
        let one = ["a"];
        assert_eq!(serde_json::to_value(AudienceRef::of(&one)).unwrap(), serde_json::json!("a"));
    }

    #[test]
    fn verify_checks_issuer_expiry_and_claim_types() {
        let (s, k) = set();
        let t = jws::sign(&k, ACCESS_TOKEN_TYP, &serde_json::to_vec(&claims(2000)).unwrap()).unwrap();
        assert!(verify_access_token(&t, &s, "https://iss", 1500).is_ok());
        assert_eq!(verify_access_token(&t, &s, "https://other", 1500).unwrap_err(), TokenError::Issuer);
        assert_eq!(verify_access_token(&t, &s, "https://iss", 2010).unwrap_err(), TokenError::Expired);
        assert_eq!(verify_access_token(&t, &s, "https://iss", 900).unwrap_err(), TokenError::NotYetValid);
        // `exp` of the wrong JSON type is refused, not treated as absent (CVE-2026-25537's class).
        let bad = br#"{"iss":"https://iss","sub":"s","aud":"a","exp":"9999999999","iat":1000,"jti":"j","client_id":"c","org":"o"}"#;
        let t = jws::sign(&k, ACCESS_TOKEN_TYP, bad).unwrap();
        assert_eq!(verify_access_token(&t, &s, "https://iss", 1500).unwrap_err(), TokenError::Claims);
        // Duplicate claim names are refused.
        let dup = br#"{"iss":"https://iss","sub":"s","sub":"t","aud":"a","exp":2000,"iat":1000,"jti":"j","client_id":"c","org":"o"}"#;
        let t = jws::sign(&k, ACCESS_TOKEN_TYP, dup).unwrap();
        assert_eq!(verify_access_token(&t, &s, "https://iss", 1500).unwrap_err(), TokenError::Claims);
        // A token of another type (e.g. an ID token) is not an access token.
        let t = jws::sign(&k, "JWT", &serde_json::to_vec(&claims(2000)).unwrap()).unwrap();
        assert!(matches!(verify_access_token(&t, &s, "https://iss", 1500), Err(TokenError::Jws(JwsError::WrongType))));
    }
}
