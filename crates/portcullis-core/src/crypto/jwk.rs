//! Public keys of *clients*, for `private_key_jwt` (RFC 7523): built from a certificate's
//! subject public key info or parsed from a registered JWKS. Unlike our own
//! [`VerifyingKey`](crate::crypto::signing::VerifyingKey)s, a client key accepts every JWS
//! algorithm its key type allows (ES256 for P-256, RS256…PS512 for RSA, …) — never `none`,
//! never HMAC — and the algorithm is checked against the key type before any verification.

use aws_lc_rs::signature::{self, UnparsedPublicKey};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;
use x509_parser::x509::SubjectPublicKeyInfo;

/// The key material, by type (public keys only, so `Debug` is safe).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientKeyMaterial {
    /// Uncompressed point 0x04 || x || y.
    P256(Vec<u8>),
    P384(Vec<u8>),
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
    },
    Ed25519(Vec<u8>),
}

/// A client's public key as published in its JWKS.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientKey {
    pub kid: Option<String>,
    pub material: ClientKeyMaterial,
}

impl std::fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClientKey {{ kid: {:?}, type: {} }}", self.kid, self.material.describe())
    }
}

/// The JWS algorithms a client assertion may use.
pub const ASSERTION_ALGORITHMS: [&str; 9] =
    ["ES256", "ES384", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "EdDSA"];

impl ClientKeyMaterial {
    /// `EC P-256`, `RSA 3072`, … (as the certificate inventory shows it).
    pub fn describe(&self) -> String {
        match self {
            Self::P256(_) => "EC P-256".into(),
            Self::P384(_) => "EC P-384".into(),
            Self::Rsa { n, .. } => {
                let lead = n.iter().take_while(|b| **b == 0).count();
                let bytes = n.len() - lead;
                let top = n.get(lead).map_or(0, |b| 8 - b.leading_zeros() as usize);
                format!("RSA {}", bytes.saturating_sub(1) * 8 + top)
            }
            Self::Ed25519(_) => "Ed25519".into(),
        }
    }

    /// Reads a DER SubjectPublicKeyInfo. `None` for key types we do not accept.
    pub fn from_spki(der: &[u8]) -> Option<Self> {
        let (rest, spki) = SubjectPublicKeyInfo::from_der(der).ok()?;
        if !rest.is_empty() {
            return None;
        }
        Self::from_parsed(&spki)
    }

    pub(crate) fn from_parsed(spki: &SubjectPublicKeyInfo<'_>) -> Option<Self> {
        use x509_parser::oid_registry::{
            OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION, OID_SIG_ED25519,
        };
        let alg = &spki.algorithm.algorithm;
        let raw = spki.subject_public_key.data.to_vec();
        if *alg == OID_SIG_ED25519 {
            return (raw.len() == 32).then_some(Self::Ed25519(raw));
        }
        if *alg == OID_KEY_TYPE_EC_PUBLIC_KEY {
            let curve = spki.algorithm.parameters.as_ref()?.as_oid().ok()?;
            return if curve == OID_EC_P256 && raw.len() == 65 && raw.first() == Some(&4) {
                Some(Self::P256(raw))
            } else if curve == OID_NIST_EC_P384 && raw.len() == 97 && raw.first() == Some(&4) {
                Some(Self::P384(raw))
            } else {
                None
            };
        }
        if *alg == OID_PKCS1_RSAENCRYPTION {
            let Ok(PublicKey::RSA(rsa)) = spki.parsed() else {
                return None;
            };
            return Some(Self::Rsa { n: rsa.modulus.to_vec(), e: rsa.exponent.to_vec() });
        }
        None
    }

    /// Whether `alg` may be used with this key type.
    pub fn allows(&self, alg: &str) -> bool {
        matches!(
            (self, alg),
            (Self::P256(_), "ES256")
                | (Self::P384(_), "ES384")
                | (Self::Ed25519(_), "EdDSA")
                | (Self::Rsa { .. }, "RS256" | "RS384" | "RS512" | "PS256" | "PS384" | "PS512")
        )
    }

    /// Verifies a JWS signature; `false` for any algorithm the key type does not allow.
    pub fn verify(&self, alg: &str, msg: &[u8], sig: &[u8]) -> bool {
        let rsa = |n: &[u8], e: &[u8], params: &'static signature::RsaParameters| {
            signature::RsaPublicKeyComponents { n, e }.verify(params, msg, sig).is_ok()
        };
        match (self, alg) {
            (Self::P256(p), "ES256") => {
                UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, p).verify(msg, sig).is_ok()
            }
            (Self::P384(p), "ES384") => {
                UnparsedPublicKey::new(&signature::ECDSA_P384_SHA384_FIXED, p).verify(msg, sig).is_ok()
            }
            (Self::Ed25519(p), "EdDSA") => UnparsedPublicKey::new(&signature::ED25519, p).verify(msg, sig).is_ok(),
            (Self::Rsa { n, e }, "RS256") => rsa(n, e, &signature::RSA_PKCS1_2048_8192_SHA256),
            (Self::Rsa { n, e }, "RS384") => rsa(n, e, &signature::RSA_PKCS1_2048_8192_SHA384),
            (Self::Rsa { n, e }, "RS512") => rsa(n, e, &signature::RSA_PKCS1_2048_8192_SHA512),
            (Self::Rsa { n, e }, "PS256") => rsa(n, e, &signature::RSA_PSS_2048_8192_SHA256),
            (Self::Rsa { n, e }, "PS384") => rsa(n, e, &signature::RSA_PSS_2048_8192_SHA384),
            (Self::Rsa { n, e }, "PS512") => rsa(n, e, &signature::RSA_PSS_2048_8192_SHA512),
            _ => false,
        }
    }

    /// The public JWK members (`kty`, `crv`, `x`, `y`, `n`, `e`) and, where the key type has
    /// only one, `alg`.
    pub fn jwk_members(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut m = serde_json::Map::new();
        let mut put = |k: &str, v: String| {
            m.insert(k.to_owned(), v.into());
        };
        match self {
            Self::P256(p) | Self::P384(p) => {
                let half = (p.len() - 1) / 2;
                let (crv, alg) = if matches!(self, Self::P256(_)) { ("P-256", "ES256") } else { ("P-384", "ES384") };
                put("kty", "EC".into());
                put("crv", crv.into());
                put("x", B64.encode(p.get(1..=half).unwrap_or_default()));
                put("y", B64.encode(p.get(half + 1..).unwrap_or_default()));
                put("alg", alg.into());
            }
            Self::Rsa { n, e } => {
                put("kty", "RSA".into());
                let strip = |v: &[u8]| v.iter().skip_while(|b| **b == 0).copied().collect::<Vec<u8>>();
                put("n", B64.encode(strip(n)));
                put("e", B64.encode(strip(e)));
            }
            Self::Ed25519(x) => {
                put("kty", "OKP".into());
                put("crv", "Ed25519".into());
                put("x", B64.encode(x));
                put("alg", "EdDSA".into());
            }
        }
        m
    }
}

impl ClientKey {
    /// Reads one JWK of a registered JWKS. Private members, symmetric keys, unknown curves and
    /// malformed values give `None` (the key is ignored, never trusted).
    pub fn from_jwk(v: &serde_json::Value) -> Option<Self> {
        let o = v.as_object()?;
        if ["d", "p", "q", "dp", "dq", "qi", "k"].iter().any(|k| o.contains_key(*k)) {
            return None;
        }
        if o.get("use").is_some_and(|u| u != "sig") {
            return None;
        }
        let s = |k: &str| o.get(k).and_then(|v| v.as_str());
        let b = |k: &str| s(k).and_then(|v| B64.decode(v).ok());
        let material = match (s("kty")?, s("crv")) {
            ("EC", Some(crv @ ("P-256" | "P-384"))) => {
                let (x, y) = (b("x")?, b("y")?);
                let len = if crv == "P-256" { 32 } else { 48 };
                if x.len() != len || y.len() != len {
                    return None;
                }
                let mut p = Vec::with_capacity(1 + 2 * len);
                p.push(4);
                p.extend_from_slice(&x);
                p.extend_from_slice(&y);
                if crv == "P-256" { ClientKeyMaterial::P256(p) } else { ClientKeyMaterial::P384(p) }
            }
            ("RSA", _) => {
                let (n, e) = (b("n")?, b("e")?);
                if n.len() < 256 || n.len() > 1024 || e.is_empty() || e.len() > 8 {
                    return None;
                }
                ClientKeyMaterial::Rsa { n, e }
            }
            ("OKP", Some("Ed25519")) => {
                let x = b("x")?;
                if x.len() != 32 {
                    return None;
                }
                ClientKeyMaterial::Ed25519(x)
            }
            _ => return None,
        };
        if let Some(alg) = s("alg")
            && !material.allows(alg)
        {
            return None;
        }
        Some(Self { kid: s("kid").map(str::to_owned), material })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
    use super::*;
    use aws_lc_rs::signature::{EcdsaKeyPair, KeyPair};

    #[test]
    fn ec_key_round_trips_through_its_jwk_and_refuses_other_algorithms() {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let kp = EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref()).unwrap();
        let material = ClientKeyMaterial::P256(kp.public_key().as_ref().to_vec());
        let sig = kp.sign(&rng, b"m").unwrap();
        let jwk = serde_json::Value::Object(material.jwk_members());
        let key = ClientKey::from_jwk(&jwk).unwrap();
        assert_eq!(key.material, material);
        assert!(key.material.verify("ES256", b"m", sig.as_ref()));
        assert!(!key.material.verify("ES256", b"n", sig.as_ref()));
        for alg in ["HS256", "none", "RS256", "ES384", ""] {
            assert!(!key.material.verify(alg, b"m", sig.as_ref()), "{alg}");
        }
        let mut private = jwk.clone();
        private["d"] = "AAAA".into();
        assert!(ClientKey::from_jwk(&private).is_none());
        let mut hmac = jwk.clone();
        hmac["alg"] = "HS256".into();
        assert!(ClientKey::from_jwk(&hmac).is_none());
        assert!(ClientKey::from_jwk(&serde_json::json!({"kty": "oct", "k": "c2VjcmV0"})).is_none());
        assert_eq!(material.describe(), "EC P-256");
        assert_eq!(ClientKeyMaterial::Rsa { n: vec![0, 0x80, 0, 0], e: vec![1, 0, 1] }.describe(), "RSA 24");
    }
}
