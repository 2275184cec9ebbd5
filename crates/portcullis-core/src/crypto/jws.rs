//! Compact JWS (RFC 7515) as Portcullis uses it: sign with a [`SigningKey`], verify strictly.
//! Verification takes the algorithm from the key, never from the header (RFC 8725 §3.1),
//! refuses `jku`/`jwk`/`x5u`/`x5c`/`crit`, non-canonical base64url, duplicate header members,
//! and anything over [`MAX_JWS_LEN`] before any cryptographic work.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use serde::{Deserialize, Serialize};

use crate::crypto::signing::{SigningKey, VerifyingKey};
use crate::error::{Error, Result};

pub const MAX_JWS_LEN: usize = 16 * 1024;

#[derive(Serialize)]
struct HeaderOut<'a> {
    alg: &'a str,
    kid: &'a str,
    typ: &'a str,
}

/// The protected header of a token we verify.
#[derive(Debug, Deserialize)]
pub struct Header {
    pub alg: String,
    pub kid: Option<String>,
    pub typ: Option<String>,
    // Present only to be refused: we never take keys or extensions from the token itself.
    crit: Option<serde::de::IgnoredAny>,
    jku: Option<serde::de::IgnoredAny>,
    jwk: Option<serde::de::IgnoredAny>,
    x5u: Option<serde::de::IgnoredAny>,
    x5c: Option<serde::de::IgnoredAny>,
    b64: Option<serde::de::IgnoredAny>,
}

/// Why a JWS was refused. The text is safe to show to the presenter of the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwsError {
    #[error("token is malformed")]
    Malformed,
    #[error("token is too large")]
    TooLarge,
    #[error("token header uses a member that is not accepted (crit, jku, jwk, x5u, x5c or b64)")]
    ForbiddenHeader,
    #[error("token has an unexpected type")]
    WrongType,
    #[error("token is signed by an unknown key")]
    UnknownKey,
    #[error("token signature is invalid")]
    BadSignature,
}

/// Signs `claims` (already-serialised JSON) into a compact JWS with `typ`.
pub fn sign(key: &SigningKey, typ: &str, claims_json: &[u8]) -> Result<String> {
    let mut out = String::with_capacity(claims_json.len() * 4 / 3 + 200);
    if typ == crate::tokens::ACCESS_TOKEN_TYP {
        out.push_str(key.at_jwt_header());
    } else {
        let header =
            serde_json::to_vec(&HeaderOut { alg: key.alg().as_str(), kid: key.kid(), typ }).map_err(Error::internal)?;
        B64.encode_string(&header, &mut out);
    }
    out.push('.');
    B64.encode_string(claims_json, &mut out);
    let sig = key.sign(out.as_bytes())?;
    out.push('.');
    B64.encode_string(&sig, &mut out);
    Ok(out)
}

/// A compact JWS split and decoded, signature not yet checked.
pub struct Parsed<'a> {
    pub header: Header,
    pub payload: Vec<u8>,
    pub signing_input: &'a str,
    pub signature: Vec<u8>,
}

/// Splits and decodes a compact JWS without checking the signature.
pub fn parse(token: &str) -> Result<Parsed<'_>, JwsError> {
    if token.len() > MAX_JWS_LEN {
        return Err(JwsError::TooLarge);
    }
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(JwsError::Malformed);
    };
    if h.is_empty() || p.is_empty() || s.is_empty() {
        return Err(JwsError::Malformed);
    }
    let header_json = B64.decode(h).map_err(|_| JwsError::Malformed)?;
    let header: Header = serde_json::from_slice(&header_json).map_err(|_| JwsError::Malformed)?;
    if header.crit.is_some()
        || header.jku.is_some()
        || header.jwk.is_some()
        || header.x5u.is_some()
        || header.x5c.is_some()
        || header.b64.is_some()
    {
        return Err(JwsError::ForbiddenHeader);
    }
    let payload = B64.decode(p).map_err(|_| JwsError::Malformed)?;
    let sig = B64.decode(s).map_err(|_| JwsError::Malformed)?;
    let signing_input = token.get(..h.len() + 1 + p.len()).ok_or(JwsError::Malformed)?;
    Ok(Parsed { header, payload, signing_input, signature: sig })
}

/// Verifies a compact JWS of type `typ` against keys found by `kid`; returns the payload.
pub fn verify<'k>(
    token: &str,
    typ: &str,
    lookup: impl FnOnce(&str) -> Option<&'k VerifyingKey>,
) -> Result<(Header, Vec<u8>), JwsError> {
    let Parsed { header, payload, signing_input, signature: sig } = parse(token)?;
    if !header
        .typ
        .as_deref()
        .is_some_and(|t| t.eq_ignore_ascii_case(typ) || t.eq_ignore_ascii_case(&format!("application/{typ}")))
    {
        return Err(JwsError::WrongType);
    }
    let kid = header.kid.as_deref().ok_or(JwsError::UnknownKey)?;
    let key = lookup(kid).ok_or(JwsError::UnknownKey)?;
    if key.alg().as_str() != header.alg {
        return Err(JwsError::BadSignature);
    }
    if !key.verify(signing_input.as_bytes(), &sig) {
        return Err(JwsError::BadSignature);
    }
    Ok((header, payload))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::signing::Algorithm;

    fn key() -> SigningKey {
        SigningKey::generate(Algorithm::ES256).unwrap().0
    }

    #[test]
    fn round_trip_and_refusals() {
        let k = key();
        let t = sign(&k, "at+jwt", br#"{"sub":"x"}"#).unwrap();
        let vk = k.verifying_key().clone();
        let (h, p) = verify(&t, "at+jwt", |kid| (kid == vk.kid()).then_some(&vk)).unwrap();
        assert_eq!(h.alg, "ES256");
        assert_eq!(p, br#"{"sub":"x"}"#);

        assert_eq!(verify(&t, "logout+jwt", |_| Some(&vk)).unwrap_err(), JwsError::WrongType);
        assert_eq!(verify(&t, "at+jwt", |_| None).unwrap_err(), JwsError::UnknownKey);
        let other = key();
        assert_eq!(verify(&t, "at+jwt", |_| Some(other.verifying_key())).unwrap_err(), JwsError::BadSignature);

        // Tampered payload.
        let parts: Vec<&str> = t.split('.').collect();
        let forged = format!("{}.{}.{}", parts[0], B64.encode(br#"{"sub":"y"}"#), parts[2]);
        assert_eq!(verify(&forged, "at+jwt", |_| Some(&vk)).unwrap_err(), JwsError::BadSignature);
        // alg none and empty signature.
        let none_h = B64.encode(format!(r#"{{"alg":"none","kid":"{}","typ":"at+jwt"}}"#, vk.kid()));
        assert_eq!(
            verify(&format!("{none_h}.{}.", parts[1]), "at+jwt", |_| Some(&vk)).unwrap_err(),
            JwsError::Malformed
        );
        assert_eq!(
            verify(&format!("{none_h}.{}.{}", parts[1], parts[2]), "at+jwt", |_| Some(&vk)).unwrap_err(),
            JwsError::BadSignature
        );
        // HS256 confusion.
        let hs = B64.encode(format!(r#"{{"alg":"HS256","kid":"{}","typ":"at+jwt"}}"#, vk.kid()));
        assert!(verify(&format!("{hs}.{}.{}", parts[1], parts[2]), "at+jwt", |_| Some(&vk)).is_err());
        // Embedded keys and crit are refused.
        for member in [r#""jku":"http://x""#, r#""jwk":{}"#, r#""x5c":[]"#, r#""crit":["b64"]"#] {
            let h = B64.encode(format!(r#"{{"alg":"ES256","kid":"{}","typ":"at+jwt",{member}}}"#, vk.kid()));
            assert_eq!(
                verify(&format!("{h}.{}.{}", parts[1], parts[2]), "at+jwt", |_| Some(&vk)).unwrap_err(),
                JwsError::ForbiddenHeader
            );
        }
        // Duplicate header member.
        let dup = B64.encode(format!(r#"{{"alg":"ES256","alg":"ES256","kid":"{}","typ":"at+jwt"}}"#, vk.kid()));
        assert_eq!(
            verify(&format!("{dup}.{}.{}", parts[1], parts[2]), "at+jwt", |_| Some(&vk)).unwrap_err(),
            JwsError::Malformed
        );
        // Padding / non-canonical base64 and wrong segment counts.
        assert_eq!(verify(&format!("{t}="), "at+jwt", |_| Some(&vk)).unwrap_err(), JwsError::Malformed);
        assert_eq!(verify("a.b", "at+jwt", |_| Some(&vk)).unwrap_err(), JwsError::Malformed);
        assert_eq!(verify(&format!("{t}.x"), "at+jwt", |_| Some(&vk)).unwrap_err(), JwsError::Malformed);
        assert_eq!(verify(&"a".repeat(MAX_JWS_LEN + 1), "at+jwt", |_| Some(&vk)).unwrap_err(), JwsError::TooLarge);
    }
}
