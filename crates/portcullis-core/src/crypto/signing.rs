//! Token signing keys: generation, PKCS#8 (de)serialisation, signing, public JWKs and
//! verification keys. Each key is bound to exactly one JWS algorithm (RFC 8725 §3.1).

use std::fmt;

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::KeySize;
use aws_lc_rs::signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair, RsaKeyPair, UnparsedPublicKey};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::error::{Error, Result};

/// The JWS algorithms Portcullis signs with. Never `none`, never HMAC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
pub enum Algorithm {
    ES256,
    RS256,
    PS256,
    EdDSA,
}

impl Algorithm {
    pub const ALL: [Algorithm; 4] = [Algorithm::ES256, Algorithm::RS256, Algorithm::PS256, Algorithm::EdDSA];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::ES256 => "ES256",
            Self::RS256 => "RS256",
            Self::PS256 => "PS256",
            Self::EdDSA => "EdDSA",
        }
    }
    pub fn parse(s: &str) -> Result<Self> {
        Self::ALL.into_iter().find(|a| a.as_str() == s).ok_or_else(|| {
            Error::invalid(format!("unsupported signing algorithm {s:?}: expected one of ES256, RS256, PS256, EdDSA"))
        })
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

enum Signer {
    Ec(EcdsaKeyPair),
    Rsa(RsaKeyPair),
    Ed(Ed25519KeyPair),
}

/// A private signing key. `Debug` shows only its `kid` and algorithm.
pub struct SigningKey {
    kid: String,
    alg: Algorithm,
    signer: Signer,
    verifier: VerifyingKey,
    rng: SystemRandom,
    /// base64url of the `at+jwt` protected header, built once per key.
    at_jwt_header: String,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey {{ kid: {:?}, alg: {} }}", self.kid, self.alg)
    }
}

impl SigningKey {
    /// A fresh key pair; returns the key and its PKCS#8 DER (to be sealed before storage).
    pub fn generate(alg: Algorithm) -> Result<(Self, Zeroizing<Vec<u8>>)> {
        let pkcs8: Zeroizing<Vec<u8>> = match alg {
            Algorithm::ES256 => {
                let kp =
                    EcdsaKeyPair::generate(&signature::ECDSA_P256_SHA256_FIXED_SIGNING).map_err(Error::internal)?;
                Zeroizing::new(kp.to_pkcs8v1().map_err(Error::internal)?.as_ref().to_vec())
            }
            Algorithm::RS256 | Algorithm::PS256 => {
                let kp = RsaKeyPair::generate(KeySize::Rsa2048).map_err(Error::internal)?;
                let der = AsDer::<aws_lc_rs::encoding::Pkcs8V1Der>::as_der(&kp).map_err(Error::internal)?;
                Zeroizing::new(der.as_ref().to_vec())
            }
            Algorithm::EdDSA => {
                let kp = Ed25519KeyPair::generate().map_err(Error::internal)?;
                Zeroizing::new(kp.to_pkcs8v1().map_err(Error::internal)?.as_ref().to_vec())
            }
        };
        let key = Self::from_pkcs8(alg, &pkcs8)?;
        Ok((key, pkcs8))
    }

    pub fn from_pkcs8(alg: Algorithm, pkcs8: &[u8]) -> Result<Self> {
        let bad = |e: aws_lc_rs::error::KeyRejected| Error::internal(format!("stored signing key rejected: {e}"));
        let signer = match alg {
            Algorithm::ES256 => {
                Signer::Ec(EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8).map_err(bad)?)
            }
            Algorithm::RS256 | Algorithm::PS256 => Signer::Rsa(RsaKeyPair::from_pkcs8(pkcs8).map_err(bad)?),
            Algorithm::EdDSA => Signer::Ed(Ed25519KeyPair::from_pkcs8(pkcs8).map_err(bad)?),
        };
        let public = match &signer {
            Signer::Ec(k) => PublicKeyMaterial::Ec(k.public_key().as_ref().to_vec()),
            Signer::Rsa(k) => PublicKeyMaterial::Rsa {
                n: k.public_key().modulus().big_endian_without_leading_zero().to_vec(),
                e: k.public_key().exponent().big_endian_without_leading_zero().to_vec(),
            },
            Signer::Ed(k) => PublicKeyMaterial::Ed(k.public_key().as_ref().to_vec()),
        };
        let kid = public.thumbprint()?;
        let verifier = VerifyingKey { kid: kid.clone(), alg, public };
        let header = serde_json::json!({ "alg": alg.as_str(), "kid": kid, "typ": crate::tokens::ACCESS_TOKEN_TYP });
        let at_jwt_header = B64.encode(serde_json::to_vec(&header).map_err(Error::internal)?);
        Ok(Self { kid, alg, signer, verifier, rng: SystemRandom::new(), at_jwt_header })
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }
    pub fn alg(&self) -> Algorithm {
        self.alg
    }
    /// The encoded protected header for access tokens.
    pub fn at_jwt_header(&self) -> &str {
        &self.at_jwt_header
    }
    pub fn verifying_key(&self) -> &VerifyingKey {
        &self.verifier
    }

    pub fn sign(&self, msg: &[u8]) -> Result<Vec<u8>> {
        match &self.signer {
            Signer::Ec(k) => k.sign(&self.rng, msg).map(|s| s.as_ref().to_vec()).map_err(Error::internal),
            Signer::Rsa(k) => {
                let mut sig = vec![0u8; k.public_modulus_len()];
                let padding: &'static dyn signature::RsaEncoding = match self.alg {
                    Algorithm::PS256 => &signature::RSA_PSS_SHA256,
                    _ => &signature::RSA_PKCS1_SHA256,
                };
                k.sign(padding, &self.rng, msg, &mut sig).map_err(Error::internal)?;
                Ok(sig)
            }
            Signer::Ed(k) => Ok(k.sign(msg).as_ref().to_vec()),
        }
    }
}

#[derive(Clone, PartialEq, Eq)]
enum PublicKeyMaterial {
    /// Uncompressed P-256 point: 0x04 || x || y.
    Ec(Vec<u8>),
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
    },
    Ed(Vec<u8>),
}

impl PublicKeyMaterial {
    /// The members of the JWK that RFC 7638 hashes, in its lexicographic order.
    fn required_members(&self) -> Result<Vec<(&'static str, String)>> {
        Ok(match self {
            Self::Ec(p) => {
                let (x, y) =
                    p.get(1..33).zip(p.get(33..65)).ok_or_else(|| Error::internal("malformed P-256 public key"))?;
                vec![("crv", "P-256".into()), ("kty", "EC".into()), ("x", B64.encode(x)), ("y", B64.encode(y))]
            }
            Self::Rsa { n, e } => vec![("e", B64.encode(e)), ("kty", "RSA".into()), ("n", B64.encode(n))],
            Self::Ed(x) => vec![("crv", "Ed25519".into()), ("kty", "OKP".into()), ("x", B64.encode(x))],
        })
    }

    /// RFC 7638 JWK thumbprint (SHA-256, base64url): a stable `kid`.
    fn thumbprint(&self) -> Result<String> {
        let mut m = serde_json::Map::new();
        for (k, v) in self.required_members()? {
            m.insert(k.into(), v.into());
        }
        // serde_json's Map is a BTreeMap here, so members serialise sorted and without spaces.
        let canonical = serde_json::to_vec(&m).map_err(Error::internal)?;
        Ok(B64.encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &canonical)))
    }
}

/// A public key bound to one algorithm, for verifying our own tokens and publishing the JWKS.
#[derive(Clone, PartialEq, Eq)]
pub struct VerifyingKey {
    kid: String,
    alg: Algorithm,
    public: PublicKeyMaterial,
}

impl fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VerifyingKey {{ kid: {:?}, alg: {} }}", self.kid, self.alg)
    }
}

impl VerifyingKey {
    pub fn kid(&self) -> &str {
        &self.kid
    }
    pub fn alg(&self) -> Algorithm {
        self.alg
    }

    pub fn verify(&self, msg: &[u8], sig: &[u8]) -> bool {
        match (&self.public, self.alg) {
            (PublicKeyMaterial::Ec(p), Algorithm::ES256) => {
                UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, p).verify(msg, sig).is_ok()
            }
            (PublicKeyMaterial::Rsa { n, e }, Algorithm::RS256) => signature::RsaPublicKeyComponents { n, e }
                .verify(&signature::RSA_PKCS1_2048_8192_SHA256, msg, sig)
                .is_ok(),
            (PublicKeyMaterial::Rsa { n, e }, Algorithm::PS256) => signature::RsaPublicKeyComponents { n, e }
                .verify(&signature::RSA_PSS_2048_8192_SHA256, msg, sig)
                .is_ok(),
            (PublicKeyMaterial::Ed(p), Algorithm::EdDSA) => {
                UnparsedPublicKey::new(&signature::ED25519, p).verify(msg, sig).is_ok()
            }
            _ => false,
        }
    }

    /// Reads a public JWK as published in our JWKS (`kid`, `alg`, key members), for a data plane
    /// that verifies tokens away from the keys (the standalone gateway). The algorithm comes from
    /// the JWK's own `alg` and must match its key type: `ES256` (EC P-256), `RS256`/`PS256` (RSA,
    /// 2048–8192 bits), `EdDSA` (OKP Ed25519). Private members, `use` other than `sig`, a missing
    /// or empty `kid`, and malformed values give `None`.
    pub fn from_jwk(v: &serde_json::Value) -> Option<Self> {
        let o = v.as_object()?;
        if ["d", "p", "q", "dp", "dq", "qi", "k", "oth"].iter().any(|k| o.contains_key(*k)) {
            return None;
        }
        if o.get("use").is_some_and(|u| u != "sig") {
            return None;
        }
        let s = |k: &str| o.get(k).and_then(|v| v.as_str());
        let b = |k: &str| s(k).and_then(|v| B64.decode(v).ok());
        let kid = s("kid").filter(|k| !k.is_empty() && k.len() <= 256)?.to_owned();
        let alg = Algorithm::parse(s("alg")?).ok()?;
        let public = match (alg, s("kty")?, s("crv")) {
            (Algorithm::ES256, "EC", Some("P-256")) => {
                let (x, y) = (b("x")?, b("y")?);
                if x.len() != 32 || y.len() != 32 {
                    return None;
                }
                let mut p = Vec::with_capacity(65);
                p.push(4);
                p.extend_from_slice(&x);
                p.extend_from_slice(&y);
                PublicKeyMaterial::Ec(p)
            }
            (Algorithm::RS256 | Algorithm::PS256, "RSA", None) => {
                let (n, e) = (b("n")?, b("e")?);
                // 2048..=8192 bits, no leading zero octet (RFC 7518 §6.3.1.1), a sane exponent.
                if n.len() < 256 || n.len() > 1024 || n.first() == Some(&0) || e.is_empty() || e.len() > 8 {
                    return None;
                }
                PublicKeyMaterial::Rsa { n, e }
            }
            (Algorithm::EdDSA, "OKP", Some("Ed25519")) => {
                let x = b("x")?;
                if x.len() != 32 {
                    return None;
                }
                PublicKeyMaterial::Ed(x)
            }
            _ => return None,
        };
        Some(VerifyingKey { kid, alg, public })
    }

    /// The public JWK with `kid`, `alg` and `use: sig`.
    pub fn jwk(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        for (k, v) in self.public.required_members().unwrap_or_default() {
            m.insert(k.into(), v.into());
        }
        m.insert("kid".into(), self.kid.clone().into());
        m.insert("alg".into(), self.alg.as_str().into());
        m.insert("use".into(), "sig".into());
        serde_json::Value::Object(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_algorithm_signs_verifies_and_reloads_with_the_same_kid() {
        for alg in Algorithm::ALL {
            let (k, pkcs8) = SigningKey::generate(alg).unwrap();
            let sig = k.sign(b"payload").unwrap();
            assert!(k.verifying_key().verify(b"payload", &sig), "{alg}");
            assert!(!k.verifying_key().verify(b"payload2", &sig), "{alg}");
            let again = SigningKey::from_pkcs8(alg, &pkcs8).unwrap();
            assert_eq!(again.kid(), k.kid());
            let jwk = k.verifying_key().jwk();
            assert_eq!(jwk["alg"], alg.as_str());
            assert_eq!(jwk["kid"], k.kid());
            assert!(jwk.get("d").is_none(), "no private member in a public JWK");
            assert!(!format!("{k:?}").contains("d\":"));
        }
    }

    #[test]
    fn published_jwks_read_back_into_verifying_keys() {
        for alg in Algorithm::ALL {
            let (k, _) = SigningKey::generate(alg).unwrap();
            let jwk = k.verifying_key().jwk();
            let back = VerifyingKey::from_jwk(&jwk).unwrap();
            assert_eq!(&back, k.verifying_key(), "{alg}");
            let sig = k.sign(b"m").unwrap();
            assert!(back.verify(b"m", &sig), "{alg}");
            // Another algorithm for the same key material, a private member, a foreign use, no kid.
            let mut wrong = jwk.clone();
            wrong["alg"] = (if alg == Algorithm::ES256 { "EdDSA" } else { "ES256" }).into();
            assert!(VerifyingKey::from_jwk(&wrong).is_none(), "{alg}");
            for (member, value) in [("d", "AAAA"), ("use", "enc"), ("kid", "")] {
                let mut bad = jwk.clone();
                bad[member] = value.into();
                assert!(VerifyingKey::from_jwk(&bad).is_none(), "{alg} {member}");
            }
        }
        let hs = serde_json::json!({"kty": "oct", "k": "c2VjcmV0", "alg": "HS256", "kid": "h"});
        assert!(VerifyingKey::from_jwk(&hs).is_none());
    }

    #[test]
    fn a_key_verifies_only_its_own_algorithm() {
        let (k, pkcs8) = SigningKey::generate(Algorithm::RS256).unwrap();
        let sig = k.sign(b"m").unwrap();
        let as_pss = SigningKey::from_pkcs8(Algorithm::PS256, &pkcs8).unwrap();
        assert!(!as_pss.verifying_key().verify(b"m", &sig));
        assert!(Algorithm::parse("none").is_err());
        assert!(Algorithm::parse("HS256").is_err());
    }
}
