//! The in-memory token key ring: the signing key per algorithm and every published verifying
//! key, swapped atomically when the store's key table changes. Readers never block.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::clock::UnixTime;
use crate::crypto::signing::{Algorithm, SigningKey, VerifyingKey};
use crate::crypto::vault::KeyVault;
use crate::error::{Error, Result};
use crate::model::{KeyState, StoredSigningKey};

/// The sealing purpose of a signing key: binds each sealed blob to its `kid`.
pub fn seal_purpose(kid: &str) -> String {
    format!("signing-key:{kid}")
}

#[derive(Debug, Default)]
pub struct KeySet {
    signers: HashMap<Algorithm, Arc<SigningKey>>,
    verifiers: HashMap<String, VerifyingKey>,
    /// The JWKS document, serialised once per change.
    jwks: Arc<str>,
}

impl KeySet {
    /// Builds the set from stored keys: `current` keys of the `enabled` algorithms sign;
    /// `next`, `current` and unexpired `retired` keys are published (so tokens signed with an
    /// algorithm since disabled still verify).
    pub fn load(
        keys: &[StoredSigningKey],
        vault: &dyn KeyVault,
        now: UnixTime,
        enabled: &[crate::crypto::signing::Algorithm],
    ) -> Result<Self> {
        let mut signers = HashMap::new();
        let mut verifiers = HashMap::new();
        let mut published: Vec<(u8, i64, serde_json::Value)> = Vec::new();
        for k in keys {
            if k.state == KeyState::Retired && k.expires_at.is_some_and(|e| e <= now) {
                continue;
            }
            let pkcs8 = vault.open(&seal_purpose(&k.kid), &k.sealed_private_key)?;
            let key = SigningKey::from_pkcs8(k.alg, &pkcs8)?;
            if key.kid() != k.kid {
                return Err(Error::internal(format!("stored key {} does not match its kid", k.kid)));
            }
            let order = match k.state {
                KeyState::Current => 0,
                KeyState::Next => 1,
                KeyState::Retired => 2,
            };
            published.push((order, -k.created_at, key.verifying_key().jwk()));
            verifiers.insert(k.kid.clone(), key.verifying_key().clone());
            if k.state == KeyState::Current && enabled.contains(&k.alg) {
                signers.insert(k.alg, Arc::new(key));
            }
        }
        published.sort_by_key(|p| (p.0, p.1));
        let keys: Vec<_> = published.into_iter().map(|(_, _, j)| j).collect();
        let jwks = serde_json::to_string(&serde_json::json!({ "keys": keys })).map_err(Error::internal)?;
        Ok(Self { signers, verifiers, jwks: jwks.into() })
    }

    pub fn signer(&self, alg: Algorithm) -> Option<&Arc<SigningKey>> {
        self.signers.get(&alg)
    }
    pub fn verifier(&self, kid: &str) -> Option<&VerifyingKey> {
        self.verifiers.get(kid)
    }
    pub fn jwks(&self) -> Arc<str> {
        self.jwks.clone()
    }
    pub fn published_kids(&self) -> impl Iterator<Item = &str> {
        self.verifiers.keys().map(String::as_str)
    }
    /// Every published verifying key (next, current and unexpired retired ones), by `kid`.
    pub fn verifying_keys(&self) -> Vec<VerifyingKey> {
        let mut keys: Vec<VerifyingKey> = self.verifiers.values().cloned().collect();
        keys.sort_by(|a, b| a.kid().cmp(b.kid()));
        keys
    }
}

#[derive(Debug, Default)]
pub struct KeyRing {
    set: ArcSwap<KeySet>,
}

impl KeyRing {
    pub fn current(&self) -> Arc<KeySet> {
        self.set.load_full()
    }
    pub fn replace(&self, set: KeySet) {
        self.set.store(Arc::new(set));
    }
}
