//! The [`KeyVault`] port and its local adapter: one 256-bit master key from which an AEAD key
//! (AES-256-GCM, for private keys at rest) and a MAC key (HMAC-SHA-256, for secrets stored as
//! keyed hashes) are derived, and the audit chain's HMAC key. The master key never leaves this
//! module.

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::hmac;
use zeroize::{Zeroize, Zeroizing};

use crate::audit_chain::AuditChainKey;
use crate::error::{Error, Result};

pub const MASTER_KEY_LEN: usize = 32;
const SEALED_VERSION: u8 = 1;

/// Encrypts private keys at rest and computes keyed hashes of secrets.
pub trait KeyVault: Send + Sync + 'static {
    /// AEAD-encrypts `plaintext`; `purpose` is bound as associated data, so a sealed blob
    /// cannot be moved to another use (e.g. one key's row to another's).
    fn seal(&self, purpose: &str, plaintext: &[u8]) -> Result<Vec<u8>>;
    fn open(&self, purpose: &str, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>>;
    /// HMAC-SHA-256 of a secret under the server's secret-hash key.
    fn secret_hash(&self, secret: &[u8]) -> [u8; 32];
    /// The key of the audit log's hash chain (never stored).
    fn audit_chain_key(&self) -> AuditChainKey;
}

pub struct LocalKeyVault {
    aead: LessSafeKey,
    mac: hmac::Key,
    chain: AuditChainKey,
}

impl std::fmt::Debug for LocalKeyVault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LocalKeyVault { .. }")
    }
}

impl LocalKeyVault {
    pub fn new(master: &[u8]) -> Result<Self> {
        if master.len() != MASTER_KEY_LEN {
            return Err(Error::invalid(format!(
                "master key must be {MASTER_KEY_LEN} bytes (base64 of 32 random bytes), got {}",
                master.len()
            )));
        }
        let root = hmac::Key::new(hmac::HMAC_SHA256, master);
        let mut aead_key = derive(&root, b"portcullis/v1/aead");
        let mut mac_key = derive(&root, b"portcullis/v1/secret-hash");
        let mut chain_key = derive(&root, b"portcullis/v1/audit-chain");
        let unbound = UnboundKey::new(&AES_256_GCM, &aead_key).map_err(Error::internal)?;
        let mac = hmac::Key::new(hmac::HMAC_SHA256, &mac_key);
        let chain = AuditChainKey::new(&chain_key);
        aead_key.zeroize();
        mac_key.zeroize();
        chain_key.zeroize();
        Ok(Self { aead: LessSafeKey::new(unbound), mac, chain })
    }

    /// 32 fresh random bytes for a new master key.
    pub fn generate_master_key() -> Result<Zeroizing<[u8; MASTER_KEY_LEN]>> {
        let mut k = Zeroizing::new([0u8; MASTER_KEY_LEN]);
        aws_lc_rs::rand::fill(k.as_mut()).map_err(Error::internal)?;
        Ok(k)
    }
}

fn derive(root: &hmac::Key, label: &[u8]) -> [u8; 32] {
    let tag = hmac::sign(root, label);
    let mut out = [0u8; 32];
    out.copy_from_slice(tag.as_ref());
    out
}

impl KeyVault for LocalKeyVault {
    fn seal(&self, purpose: &str, plaintext: &[u8]) -> Result<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce).map_err(Error::internal)?;
        let mut buf = plaintext.to_vec();
        let res = self.aead.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(purpose.as_bytes()),
            &mut buf,
        );
        if let Err(e) = res {
            buf.zeroize();
            return Err(Error::internal(e));
        }
        let mut out = Vec::with_capacity(1 + NONCE_LEN + buf.len());
        out.push(SEALED_VERSION);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&buf);
        Ok(out)
    }

    fn open(&self, purpose: &str, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
        let (version, rest) = sealed.split_first().ok_or_else(|| Error::internal("sealed blob is empty"))?;
        if *version != SEALED_VERSION || rest.len() < NONCE_LEN {
            return Err(Error::internal("sealed blob has an unknown format"));
        }
        let (nonce, ct) = rest.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(Error::internal)?;
        let mut buf = Zeroizing::new(ct.to_vec());
        let len = self
            .aead
            .open_in_place(nonce, Aad::from(purpose.as_bytes()), buf.as_mut_slice())
            .map_err(|_| Error::internal("cannot decrypt a sealed key: wrong master key or tampered data"))?
            .len();
        buf.truncate(len);
        Ok(buf)
    }

    fn secret_hash(&self, secret: &[u8]) -> [u8; 32] {
        let tag = hmac::sign(&self.mac, secret);
        let mut out = [0u8; 32];
        out.copy_from_slice(tag.as_ref());
        out
    }

    fn audit_chain_key(&self) -> AuditChainKey {
        self.chain.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_round_trip_and_binding() {
        let v = LocalKeyVault::new(&[7u8; 32]).unwrap();
        let sealed = v.seal("key:a", b"private").unwrap();
        assert!(!sealed.windows(7).any(|w| w == b"private"));
        assert_eq!(v.open("key:a", &sealed).unwrap().as_slice(), b"private");
        assert!(v.open("key:b", &sealed).is_err(), "purpose is bound");
        let mut tampered = sealed.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert!(v.open("key:a", &tampered).is_err());
        let other = LocalKeyVault::new(&[8u8; 32]).unwrap();
        assert!(other.open("key:a", &sealed).is_err(), "another master key cannot open it");
        assert!(LocalKeyVault::new(&[1u8; 16]).is_err());
    }

    #[test]
    fn secret_hash_is_keyed() {
        let a = LocalKeyVault::new(&[1u8; 32]).unwrap();
        let b = LocalKeyVault::new(&[2u8; 32]).unwrap();
        assert_eq!(a.secret_hash(b"s"), a.secret_hash(b"s"));
        assert_ne!(a.secret_hash(b"s"), b.secret_hash(b"s"));
        assert_eq!(format!("{a:?}"), "LocalKeyVault { .. }");
    }
}
