//! The [`Store`] port. Every mutating method is one transaction and takes the audit event that
//! records it, so a change and its audit row are written together or not at all.

use async_trait::async_trait;

use crate::clock::UnixTime;
use crate::crypto::signing::Algorithm;
use crate::error::StoreError;
use crate::ids::{PermissionName, RoleName};
use crate::model::*;

pub type StoreResult<T> = Result<T, StoreError>;

/// One signing-key rotation for one algorithm, applied atomically: `current` becomes retired
/// (published until `retired_until`), `next` becomes current, `new_next` is inserted.
#[derive(Debug, Clone)]
pub struct KeyRotation {
    pub alg: Algorithm,
    pub current_kid: String,
    pub next_kid: String,
    pub retired_until: UnixTime,
    pub new_next: StoredSigningKey,
    pub now: UnixTime,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Cheap round trip for readiness.
    async fn ping(&self) -> StoreResult<()>;

    async fn setting(&self, key: &str) -> StoreResult<Option<String>>;
    /// Inserts unless present; returns whether it inserted.
    async fn insert_setting(&self, key: &str, value: &str) -> StoreResult<bool>;

    async fn create_organisation(&self, org: &Organisation, audit: &AuditEvent) -> StoreResult<()>;
    async fn organisation(&self, slug: &str) -> StoreResult<Option<Organisation>>;
    async fn organisation_by_id(&self, id: &str) -> StoreResult<Option<Organisation>>;
    async fn organisations(&self, page: Page) -> StoreResult<Vec<Organisation>>;

    async fn create_service(&self, service: &Service, grants: &[RoleGrant], audit: &AuditEvent) -> StoreResult<()>;
    async fn service(&self, org_id: &str, slug: &str) -> StoreResult<Option<Service>>;
    async fn services(&self, org_id: &str) -> StoreResult<Vec<Service>>;
    async fn service_by_audience(&self, audience: &str) -> StoreResult<Option<Service>>;
    /// Deletes the service and its role grants.
    async fn delete_service(&self, org_id: &str, slug: &str, audit: &AuditEvent) -> StoreResult<bool>;

    async fn role_grants(&self, org_id: &str) -> StoreResult<Vec<RoleGrant>>;
    /// Replaces the permissions granted to `role`.
    async fn set_role_permissions(
        &self,
        org_id: &str,
        role: &RoleName,
        permissions: &[PermissionName],
        audit: &AuditEvent,
    ) -> StoreResult<()>;

    async fn create_application(&self, app: &Application, audit: &AuditEvent) -> StoreResult<()>;
    async fn application(&self, client_id: &str) -> StoreResult<Option<Application>>;
    async fn applications(&self, org_id: &str, page: Page) -> StoreResult<Vec<Application>>;
    /// Replaces the row with `app.id` if its `updated_at` still equals `expected_updated_at`
    /// (optimistic concurrency); `Conflict` otherwise.
    async fn update_application(
        &self,
        app: &Application,
        expected_updated_at: UnixTime,
        audit: &AuditEvent,
    ) -> StoreResult<()>;
    async fn delete_application(&self, client_id: &str, audit: &AuditEvent) -> StoreResult<bool>;

    async fn create_user(&self, user: &User, audit: &AuditEvent) -> StoreResult<()>;
    async fn user(&self, org_id: &str, id: &str) -> StoreResult<Option<User>>;
    async fn user_by_email(&self, org_id: &str, email: &str) -> StoreResult<Option<User>>;
    async fn users(&self, org_id: &str, page: Page) -> StoreResult<Vec<User>>;

    async fn signing_keys(&self) -> StoreResult<Vec<StoredSigningKey>>;
    /// Inserts keys; `Conflict` if one for the same algorithm and state (next/current) exists.
    async fn insert_signing_keys(&self, keys: &[StoredSigningKey], audit: &AuditEvent) -> StoreResult<()>;
    /// `Conflict` when another rotation got there first.
    async fn rotate_signing_key(&self, rotation: &KeyRotation, audit: &AuditEvent) -> StoreResult<()>;
    async fn delete_expired_signing_keys(&self, now: UnixTime) -> StoreResult<u64>;

    async fn ca_certificates(&self) -> StoreResult<Vec<CaCertificate>>;
    async fn insert_ca_certificates(&self, certs: &[CaCertificate], audit: &AuditEvent) -> StoreResult<()>;

    /// Idempotent: revoking a revoked token changes nothing.
    async fn revoke_token(&self, revoked: &RevokedToken, audit: &AuditEvent) -> StoreResult<()>;
    async fn is_token_revoked(&self, jti: &str) -> StoreResult<bool>;
    async fn purge_expired_revocations(&self, now: UnixTime) -> StoreResult<u64>;

    async fn append_audit(&self, event: &AuditEvent) -> StoreResult<()>;
    /// Newest first.
    async fn audit_events(&self, org_id: Option<&str>, page: Page) -> StoreResult<Vec<AuditEvent>>;
}
