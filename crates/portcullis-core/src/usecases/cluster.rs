//! Several nodes on one database. This module owns what a node learns of the other nodes'
//! changes, and the jobs only one node at a time does.
//!
//! - **Following changes.** Every change is an audit row written in its own transaction, so
//!   the audit log's positions are a durable change feed: [`Portcullis::follow_changes`] reads
//!   what was committed since a cursor (the gateway feed's reader, with its handling of
//!   positions PostgreSQL commits out of order) and drops or reloads whatever it invalidates
//!   (cached clients, sessions and API keys; service lists; the key ring; the CA set and
//!   CRLs). The binary runs it when the store's change signal fires (PostgreSQL
//!   `LISTEN/NOTIFY`) and at least every few seconds besides, so a missed notification delays
//!   a refresh by one resync interval at most.
//! - **Maintenance by one node.** [`Portcullis::maintain`] takes the `maintenance` lease before
//!   the scheduled jobs: signing-key rotation, issuing-CA rotation (stage a successor,
//!   publish it, then promote it), purges and expiry notices. Every node reloads keys and CAs
//!   whatever happens. A crashed holder's lease runs out and another node takes over.
//!
//! Rotations stay safe if two nodes ever did them at once: each is a conditional update that
//! only one can win (`Conflict` for the other).

use std::time::Duration;

use super::*;
use crate::error::StoreError;
use crate::model::CaKind;

/// The lease of the scheduled jobs.
pub const MAINTENANCE_LEASE: &str = "maintenance";

/// What one round of [`Portcullis::follow_changes`] refreshed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Refreshed {
    /// Cached clients, sessions and API keys were dropped.
    pub principals: bool,
    /// Cached service lists were dropped.
    pub services: bool,
    /// The key ring was re-read.
    pub keys: bool,
    /// The CA set and CRLs were re-read.
    pub trust: bool,
}

/// What one round of [`Portcullis::maintain`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Maintenance {
    /// This node held the lease and ran the scheduled jobs.
    pub leader: bool,
    pub keys_rotated: bool,
    /// A successor issuing CA was created and published (not issuing yet).
    pub ca_staged: Option<String>,
    /// A published successor became the issuing CA.
    pub ca_promoted: Option<String>,
}

impl Portcullis {
    /// Drops every cached client, session and API key.
    pub(crate) fn forget_principals(&self) {
        self.caches.generation.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        if let Ok(mut map) = self.caches.clients.write() {
            map.clear();
        }
        self.forget_all_credentials();
    }

    /// Drops every cached service list.
    pub(crate) fn forget_all_services(&self) {
        self.caches.generation.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        if let Ok(mut map) = self.caches.services.write() {
            map.clear();
        }
    }

    /// One round of following the changes committed since `cursor` on any node (none: start
    /// from now, refreshing nothing). Returns the next cursor and what was refreshed.
    pub async fn follow_changes(&self, cursor: Option<&str>) -> Result<(String, Refreshed)> {
        let Some(cursor) = cursor else {
            let page = self.gateway_changes(None, Duration::ZERO).await?;
            return Ok((page.cursor, Refreshed::default()));
        };
        let page = self.gateway_changes(Some(cursor), Duration::ZERO).await?;
        let r = Refreshed {
            principals: page.principals || page.reset,
            services: page.grants || page.reset,
            keys: page.keys || page.reset,
            trust: page.trust || page.reset,
        };
        if r.principals {
            self.forget_principals();
        }
        if r.services {
            self.forget_all_services();
        }
        if r.keys {
            self.reload_keys().await?;
        }
        if r.trust {
            self.load_ca().await?;
        }
        Ok((page.cursor, r))
    }

    /// The store's change signal (PostgreSQL `LISTEN/NOTIFY`), if it has one.
    pub async fn change_signal(&self) -> Result<Option<Arc<tokio::sync::Notify>>> {
        Ok(self.store.change_signal().await?)
    }

    /// One round of upkeep on node `node` (a name unique to this process). With the
    /// maintenance lease (held for `lease_secs`, renewed each round): signing keys rotated when
    /// due, the issuing CA staged or promoted when due, ended rows purged, expiry notices sent.
    /// On every node: the key ring and the CA set re-read (another node's rotation is picked
    /// up here at the latest).
    pub async fn maintain(&self, node: &str, lease_secs: i64) -> Result<Maintenance> {
        let mut m = Maintenance {
            leader: self.store.take_lease(MAINTENANCE_LEASE, node, self.now(), lease_secs).await?,
            ..Maintenance::default()
        };
        if m.leader {
            // A failed job is logged and the round goes on: one broken job must not stop the
            // others, nor this node's reloads below.
            match self.rotate_keys_if_due().await {
                Ok(rotated) => m.keys_rotated = rotated,
                Err(e) => tracing::error!(error = %e, "signing-key rotation failed"),
            }
            match self.maintain_issuing_ca().await {
                Ok((staged, promoted)) => {
                    m.ca_staged = staged;
                    m.ca_promoted = promoted;
                }
                Err(e) => tracing::error!(error = %e, "issuing CA rotation failed"),
            }
            if let Err(e) = self.purge_expired_revocations().await {
                tracing::warn!(error = %e, "purging expired revocations failed");
            }
            if let Err(e) = self.purge_ended_credentials().await {
                tracing::warn!(error = %e, "purging ended sessions and codes failed");
            }
            if let Err(e) = self.store.purge_attempt_counters(self.now()).await {
                tracing::warn!(error = %e, "purging ended failure counters failed");
            }
            if let Err(e) = self.send_expiry_notices().await {
                tracing::warn!(error = %e, "certificate expiry notices failed");
            }
        }
        self.reload_keys().await?;
        self.load_ca().await?;
        Ok(m)
    }

    /// Gives the maintenance lease up (a clean shutdown), so another node need not wait for it
    /// to run out.
    pub async fn release_maintenance(&self, node: &str) -> Result<()> {
        Ok(self.store.release_lease(MAINTENANCE_LEASE, node).await?)
    }

    /// The issuing CA's schedule: an active issuing CA older than its rotation age gets a
    /// successor, created inactive — published in `/pki/ca.pem`, the trust anchors and the
    /// gateways' trust, but not issuing; a successor published for
    /// [`CoreSettings::key_publish_delay`](crate::settings::CoreSettings::key_publish_delay)
    /// becomes the issuing CA. So every node and gateway trusts a CA before anything it
    /// signed is presented. Imported CAs (no key of their root here) are never rotated.
    /// Returns the ids staged and promoted.
    pub async fn maintain_issuing_ca(&self) -> Result<(Option<String>, Option<String>)> {
        let now = self.now();
        let records = self.store.ca_certificates().await?;
        let Some(active) = records.iter().find(|r| r.kind == CaKind::Issuing && r.active) else {
            return Ok((None, None));
        };
        let successor = records
            .iter()
            .filter(|r| r.kind == CaKind::Issuing && !r.active && r.created_at > active.created_at && r.not_after > now)
            .max_by_key(|r| r.created_at);
        if let Some(next) = successor {
            if now - next.created_at < self.settings.key_publish_delay() {
                return Ok((None, None));
            }
            let ev = self.audit(
                &RequestContext::default(),
                "system:schedule",
                None,
                "ca.promote",
                &next.id,
                serde_json::json!({ "subject": next.subject, "retired": active.id }),
            );
            return match self.store.promote_issuing_ca(&next.id, &ev).await {
                Ok(()) => {
                    self.load_ca().await?;
                    Ok((None, Some(next.id.clone())))
                }
                Err(StoreError::Conflict(_)) => Ok((None, None)),
                Err(e) => Err(e.into()),
            };
        }
        // The CA's age counts from when it was made; its lifetime is its certificate's.
        if now - active.created_at < issuing_ca_rotation_age(&self.settings.ca, active.not_after - active.not_before) {
            return Ok((None, None));
        }
        let Some(root) = records.iter().find(|r| r.kind == CaKind::Root && r.active) else {
            return Ok((None, None));
        };
        if root.sealed_private_key.is_empty() {
            return Ok((None, None));
        }
        let mut new = self.new_issuing_ca(root, &records)?;
        new.active = false;
        let ev = self.audit(
            &RequestContext::default(),
            "system:schedule",
            None,
            "ca.stage",
            &new.id,
            serde_json::json!({ "subject": new.subject, "not_after": new.not_after, "successor_of": active.id }),
        );
        self.store.insert_ca_certificates(std::slice::from_ref(&new), &ev).await?;
        self.load_ca().await?;
        Ok((Some(new.id), None))
    }
}

/// How old an issuing CA of `lifetime` seconds gets before its successor is staged: early
/// enough that the longest certificate a profile allows, plus 30 days, still fits in its
/// remaining life (certificates never outlive their issuer); at least half its life.
fn issuing_ca_rotation_age(c: &crate::settings::CaSettings, lifetime: i64) -> i64 {
    let longest =
        c.transport_max_validity_days.max(c.server_transport_max_validity_days).max(c.signing_max_validity_days);
    (lifetime - (longest + 30) * 86_400).max(lifetime / 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rotation_age_leaves_room_for_the_longest_certificate() {
        let ca = crate::settings::CaSettings::default();
        let five_years = 5 * 365 * 86_400;
        let longest = ca.signing_max_validity_days.max(ca.transport_max_validity_days);
        assert_eq!(issuing_ca_rotation_age(&ca, five_years), five_years - (longest + 30) * 86_400);
        assert_eq!(issuing_ca_rotation_age(&ca, 400 * 86_400), 200 * 86_400, "at least half of a short life");
    }
}
