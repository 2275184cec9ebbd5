//! Token signing-key lifecycle. Per algorithm there is always a `current` key (signs) and a
//! `next` key (already published). Rotation promotes `next`, retires `current` (still
//! published until every token it signed has expired) and creates a new `next`, so a key is
//! in the JWKS long before it signs and long after it stops.

use super::*;
use crate::crypto::keyring::{KeySet, seal_purpose};
use crate::crypto::signing::{Algorithm, SigningKey};
use crate::error::StoreError;
use crate::model::{KeyState, StoredSigningKey};
use crate::store::KeyRotation;

impl Portcullis {
    fn new_stored_key(&self, alg: Algorithm, state: KeyState) -> Result<StoredSigningKey> {
        let (key, pkcs8) = SigningKey::generate(alg)?;
        let now = self.now();
        Ok(StoredSigningKey {
            kid: key.kid().to_owned(),
            alg,
            state,
            sealed_private_key: self.vault.seal(&seal_purpose(key.kid()), &pkcs8)?,
            created_at: now,
            activated_at: (state == KeyState::Current).then_some(now),
            expires_at: None,
        })
    }

    /// Creates whatever current/next keys are missing. Returns whether it created any.
    pub(crate) async fn ensure_signing_keys(&self) -> Result<bool> {
        let existing = self.store.signing_keys().await?;
        let mut missing = Vec::new();
        for alg in &self.settings.signing_algorithms {
            for state in [KeyState::Current, KeyState::Next] {
                if !existing.iter().any(|k| k.alg == *alg && k.state == state) {
                    missing.push(self.new_stored_key(*alg, state)?);
                }
            }
        }
        if missing.is_empty() {
            return Ok(false);
        }
        let kids: Vec<_> = missing.iter().map(|k| k.kid.clone()).collect();
        let ev = self.audit(
            &RequestContext::default(),
            "system",
            None,
            "signing_key.create",
            &kids.join(","),
            serde_json::json!({}),
        );
        match self.store.insert_signing_keys(&missing, &ev).await {
            Ok(()) => Ok(true),
            // Another node created them first: theirs are as good as ours.
            Err(StoreError::Conflict(_)) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Re-reads the key table into the in-memory ring (also drops expired retired keys).
    pub async fn reload_keys(&self) -> Result<()> {
        let stored = self.store.signing_keys().await?;
        let set = KeySet::load(&stored, self.vault.as_ref(), self.now(), &self.settings.signing_algorithms)?;
        for alg in &self.settings.signing_algorithms {
            if set.signer(*alg).is_none() {
                return Err(Error::internal(format!("no current signing key for {alg}")));
            }
        }
        self.keys.replace(set);
        Ok(())
    }

    /// Rotates the keys of every configured algorithm now. Returns the new current kids.
    /// Unless `force`d (a compromised key), a `next` key that has not been published for
    /// [`CoreSettings::key_publish_delay`](crate::settings::CoreSettings::key_publish_delay)
    /// is not promoted: caches may not have it yet. Nothing changes then (409).
    pub async fn rotate_signing_keys(&self, actor: &str, force: bool) -> Result<Vec<String>> {
        self.ensure_signing_keys().await?;
        let stored = self.store.signing_keys().await?;
        let now = self.now();
        if !force {
            let delay = self.settings.key_publish_delay();
            let youngest = stored
                .iter()
                .filter(|k| k.state == KeyState::Next && self.settings.signing_algorithms.contains(&k.alg))
                .map(|k| k.created_at)
                .max();
            if let Some(created) = youngest
                && now - created < delay
            {
                return Err(Error::Conflict(format!(
                    "the next signing keys were published {} s ago; promoting them before {delay} s could sign with a key caches have not fetched yet. Retry in {} s, or force the rotation (compromised key)",
                    now - created,
                    delay - (now - created)
                )));
            }
        }
        let mut promoted = Vec::new();
        for alg in &self.settings.signing_algorithms {
            let find = |s: KeyState| stored.iter().find(|k| k.alg == *alg && k.state == s);
            let (Some(cur), Some(next)) = (find(KeyState::Current), find(KeyState::Next)) else {
                return Err(Error::internal(format!("signing keys for {alg} are incomplete")));
            };
            let rotation = KeyRotation {
                alg: *alg,
                current_kid: cur.kid.clone(),
                next_kid: next.kid.clone(),
                retired_until: now + self.settings.retired_key_publish_secs(),
                new_next: self.new_stored_key(*alg, KeyState::Next)?,
                now,
            };
            let ev = self.audit(
                &RequestContext::default(),
                actor,
                None,
                "signing_key.rotate",
                &next.kid,
                serde_json::json!({ "alg": alg.as_str(), "retired": cur.kid, "next": rotation.new_next.kid }),
            );
            match self.store.rotate_signing_key(&rotation, &ev).await {
                Ok(()) | Err(StoreError::Conflict(_)) => {}
                Err(e) => return Err(e.into()),
            }
            promoted.push(next.kid.clone());
        }
        self.store.delete_expired_signing_keys(now).await?;
        self.reload_keys().await?;
        Ok(promoted)
    }

    /// The automatic schedule: rotates when the oldest current key is older than the
    /// configured interval, and always refreshes the ring (so keys rotated elsewhere — the
    /// CLI, another node — are picked up). Returns whether it rotated.
    pub async fn maintain_keys(&self) -> Result<bool> {
        let rotated = self.rotate_keys_if_due().await?;
        self.reload_keys().await?;
        Ok(rotated)
    }

    /// Rotates when the oldest current key is older than the configured interval (run by the
    /// node holding the maintenance lease). Returns whether it rotated.
    pub(crate) async fn rotate_keys_if_due(&self) -> Result<bool> {
        let interval = self.settings.key_rotation_interval;
        if interval <= 0 {
            return Ok(false);
        }
        let stored = self.store.signing_keys().await?;
        let now = self.now();
        let due = stored
            .iter()
            .filter(|k| k.state == KeyState::Current)
            .any(|k| k.activated_at.unwrap_or(k.created_at) + interval <= now);
        if !due {
            return Ok(false);
        }
        match self.rotate_signing_keys("system:schedule", false).await {
            Ok(_) => Ok(true),
            // The next keys are too fresh (a manual rotation just happened): later.
            Err(Error::Conflict(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }
}
