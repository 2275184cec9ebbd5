//! Server-generated secrets (client secrets, later API secrets and session tokens): 256 bits
//! from the OS CSPRNG, shown once, stored only as a keyed hash and compared in constant time.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use secrecy::{ExposeSecret, SecretString};
use subtle::ConstantTimeEq;

use crate::crypto::vault::KeyVault;
use crate::error::{Error, Result};

/// A keyed hash of a secret (HMAC-SHA-256). Its `Debug` shows only that it exists.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretHash(pub [u8; 32]);

impl std::fmt::Debug for SecretHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretHash(..)")
    }
}

impl SecretHash {
    pub fn of(vault: &dyn KeyVault, secret: &str) -> Self {
        Self(vault.secret_hash(secret.as_bytes()))
    }
    /// Constant-time comparison of two hashes.
    pub fn matches(&self, other: &SecretHash) -> bool {
        self.0.ct_eq(&other.0).into()
    }
    pub fn from_slice(b: &[u8]) -> Option<Self> {
        <[u8; 32]>::try_from(b).ok().map(Self)
    }
}

/// 32 random bytes, base64url without padding (43 characters).
pub fn generate_secret() -> Result<SecretString> {
    let mut b = zeroize::Zeroizing::new([0u8; 32]);
    aws_lc_rs::rand::fill(b.as_mut()).map_err(Error::internal)?;
    Ok(SecretString::from(URL_SAFE_NO_PAD.encode(b.as_ref())))
}

/// A generated password a person can type: 24 characters of base64url (144 bits).
pub fn generate_password() -> Result<SecretString> {
    let mut b = zeroize::Zeroizing::new([0u8; 18]);
    aws_lc_rs::rand::fill(b.as_mut()).map_err(Error::internal)?;
    Ok(SecretString::from(URL_SAFE_NO_PAD.encode(b.as_ref())))
}

/// Accept only secrets a client could have got from us: bounded length, printable ASCII.
/// Anything else is rejected before hashing so huge inputs cost nothing.
pub fn plausible_secret(s: &SecretString) -> bool {
    let s = s.expose_secret();
    (1..=512).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::vault::LocalKeyVault;

    #[test]
    fn secrets_are_long_random_and_hash_compare() {
        let a = generate_secret().unwrap();
        let b = generate_secret().unwrap();
        assert_eq!(a.expose_secret().len(), 43);
        assert_ne!(a.expose_secret(), b.expose_secret());
        let v = LocalKeyVault::new(&[3u8; 32]).unwrap();
        let ha = SecretHash::of(&v, a.expose_secret());
        assert!(ha.matches(&SecretHash::of(&v, a.expose_secret())));
        assert!(!ha.matches(&SecretHash::of(&v, b.expose_secret())));
        assert!(!format!("{a:?}").contains(a.expose_secret()));
        assert_eq!(format!("{ha:?}"), "SecretHash(..)");
    }
}
