//! The audit log's hash chain on both backends (format and verification: the core's
//! `audit_chain`): appending a row under the chain head's lock, sealing a new head, and
//! streaming the chain from one snapshot for `audit verify`.
//!
//! One linear chain however many nodes write: an append first bumps the head row (`UPDATE …
//! RETURNING`, which on PostgreSQL takes the row's lock until commit), so appends queue there
//! and commit in `seq` order, and `seq` has no gaps. The append is the last statement of every
//! audited transaction, so a transaction holding the head lock never waits for another lock:
//! appends cannot deadlock with each other or with the rows the transactions changed first.

use std::sync::{Arc, RwLock};

use portcullis_core::StoreError;
use portcullis_core::audit_chain::AuditChainKey;
use portcullis_core::store::StoreResult;

/// The chain key, shared by every clone of a store; set once the master key is known.
#[derive(Clone, Default)]
pub(crate) struct ChainKeySlot(Arc<RwLock<Option<AuditChainKey>>>);

impl std::fmt::Debug for ChainKeySlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChainKeySlot { .. }")
    }
}

impl ChainKeySlot {
    pub(crate) fn set(&self, key: AuditChainKey) {
        *self.0.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(key);
    }

    pub(crate) fn key(&self) -> StoreResult<AuditChainKey> {
        self.0.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone().ok_or_else(|| {
            StoreError::Internal("the audit chain key is not set (start_audit_chain was not called)".into())
        })
    }
}

/// Inherent methods of `$store` for the chain; the `Store` impl delegates to them.
macro_rules! audit_chain_store {
    ($store:ident, $pool:ty, $row:ty) => {
        impl $store {
            /// Appends `e` to the chain on `conn`. Must be the last statement of its transaction
            /// (see the module docs). Refuses to extend a head whose MAC does not match: that
            /// would make a cut-off end look whole.
            async fn chain_audit(
                conn: &mut <<$pool as PoolDb>::Db as sqlx::Database>::Connection,
                chain: &$crate::audit::ChainKeySlot,
                e: &AuditEvent,
            ) -> StoreResult<()> {
                use portcullis_core::audit_chain::AuditRow;
                let key = chain.key()?;
                let head = sqlx::query(
                    "UPDATE audit_chain SET seq = seq + 1 WHERE id = 1 RETURNING first_seq, pre_rows, seq, mac, head_mac",
                )
                .fetch_optional(&mut *conn)
                .await
                .map_err(db_err)?
                .ok_or_else(|| StoreError::Internal("the audit chain head is missing".into()))?;
                let first_seq: i64 = head.try_get("first_seq").map_err(db_err)?;
                let pre_rows: i64 = head.try_get("pre_rows").map_err(db_err)?;
                let seq: i64 = head.try_get("seq").map_err(db_err)?;
                let prev: Option<Vec<u8>> = head.try_get("mac").map_err(db_err)?;
                let head_mac: Option<Vec<u8>> = head.try_get("head_mac").map_err(db_err)?;
                let expected = key.head_mac(first_seq, pre_rows, seq - 1, prev.as_deref());
                if head_mac.as_deref() != Some(expected.as_slice()) {
                    return Err(StoreError::Internal(
                        "the audit chain head does not match its MAC (altered or never sealed); run `portcullis audit verify`".into(),
                    ));
                }
                let row = AuditRow {
                    seq,
                    id: e.id.clone(),
                    at: e.at,
                    org_id: e.org_id.clone(),
                    actor: e.actor.clone(),
                    action: e.action.clone(),
                    target: e.target.clone(),
                    outcome: e.outcome.clone(),
                    ip: e.ip.clone(),
                    details: e.details.to_string(),
                    mac: None,
                };
                let mac = key.row_mac(prev.as_deref(), &row);
                sqlx::query(
                    "INSERT INTO audit_events (seq, id, at, org_id, actor, action, target, outcome, ip, details, mac) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
                )
                .bind(row.seq)
                .bind(&row.id)
                .bind(row.at)
                .bind(&row.org_id)
                .bind(&row.actor)
                .bind(&row.action)
                .bind(&row.target)
                .bind(&row.outcome)
                .bind(&row.ip)
                .bind(&row.details)
                .bind(mac.to_vec())
                .execute(&mut *conn)
                .await
                .map_err(db_err)?;
                sqlx::query("UPDATE audit_chain SET mac = $1, head_mac = $2 WHERE id = 1")
                    .bind(mac.to_vec())
                    .bind(key.head_mac(first_seq, pre_rows, seq, Some(&mac)).to_vec())
                    .execute(&mut *conn)
                    .await
                    .map_err(db_err)?;
                Ok(())
            }

            /// Keeps the key, and seals a head that holds no chained row yet and was never sealed
            /// (the state migration 0006 leaves). Nodes starting together write the same value.
            async fn start_chain(&self, key: portcullis_core::audit_chain::AuditChainKey) -> StoreResult<()> {
                self.chain.set(key.clone());
                let Some(h) = self.chain_head(&self.pool).await? else {
                    return Err(StoreError::Internal("the audit chain head is missing".into()));
                };
                if h.head_mac.is_none() && h.mac.is_none() && h.seq == h.first_seq - 1 {
                    sqlx::query("UPDATE audit_chain SET head_mac = $1 WHERE id = 1 AND head_mac IS NULL AND mac IS NULL AND seq = $2")
                        .bind(key.head_mac(h.first_seq, h.pre_rows, h.seq, None).to_vec())
                        .bind(h.seq)
                        .execute(&self.pool)
                        .await
                        .map_err(db_err)?;
                }
                Ok(())
            }

            async fn chain_head<'c, E>(&self, ex: E) -> StoreResult<Option<portcullis_core::audit_chain::ChainHead>>
            where
                E: sqlx::Executor<'c, Database = <$pool as PoolDb>::Db>,
            {
                let r = sqlx::query("SELECT first_seq, pre_rows, seq, mac, head_mac FROM audit_chain WHERE id = 1")
                    .fetch_optional(ex)
                    .await
                    .map_err(db_err)?;
                r.map(|r| {
                    Ok(portcullis_core::audit_chain::ChainHead {
                        first_seq: r.try_get("first_seq").map_err(db_err)?,
                        pre_rows: r.try_get("pre_rows").map_err(db_err)?,
                        seq: r.try_get("seq").map_err(db_err)?,
                        mac: r.try_get("mac").map_err(db_err)?,
                        head_mac: r.try_get("head_mac").map_err(db_err)?,
                    })
                })
                .transpose()
            }

            /// The head, then every row by `seq`, from one read-only snapshot.
            async fn scan_chain(&self, visitor: &mut (dyn portcullis_core::audit_chain::AuditChainVisitor + Send)) -> StoreResult<()> {
                use futures_util::TryStreamExt;
                let mut tx = self.pool.begin_with(<$pool as $crate::backup::BackendSql>::SNAPSHOT_BEGIN).await.map_err(db_err)?;
                let head = self.chain_head(&mut *tx).await?;
                if visitor.head(head).is_continue() {
                    let mut rows = sqlx::query("SELECT seq, id, at, org_id, actor, action, target, outcome, ip, details, mac FROM audit_events ORDER BY seq")
                        .fetch(&mut *tx);
                    while let Some(r) = rows.try_next().await.map_err(db_err)? {
                        let row = portcullis_core::audit_chain::AuditRow {
                            seq: r.try_get("seq").map_err(db_err)?,
                            id: r.try_get("id").map_err(db_err)?,
                            at: r.try_get("at").map_err(db_err)?,
                            org_id: r.try_get("org_id").map_err(db_err)?,
                            actor: r.try_get("actor").map_err(db_err)?,
                            action: r.try_get("action").map_err(db_err)?,
                            target: r.try_get("target").map_err(db_err)?,
                            outcome: r.try_get("outcome").map_err(db_err)?,
                            ip: r.try_get("ip").map_err(db_err)?,
                            details: r.try_get("details").map_err(db_err)?,
                            mac: r.try_get("mac").map_err(db_err)?,
                        };
                        if visitor.row(row).is_break() {
                            break;
                        }
                    }
                }
                tx.rollback().await.map_err(db_err)
            }
        }
    };
}
