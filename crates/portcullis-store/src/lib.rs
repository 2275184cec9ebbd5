//! SQLite and PostgreSQL adapters for the core's [`Store`] port.
//!
//! Both adapters share one SQL text (placeholders `$1…`, which both drivers accept, and a
//! portable schema), generated for each pool type by [`sql_store!`]; only connection set-up
//! and migration locking differ. sqlx errors are mapped to the core's opaque [`StoreError`].

mod migrate;

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use portcullis_core::StoreError;
use portcullis_core::clock::UnixTime;
use portcullis_core::crypto::secrets::SecretHash;
use portcullis_core::crypto::signing::Algorithm;
use portcullis_core::ids::{ClientId, Email, PermissionName, RoleName, ScopeName, Slug};
use portcullis_core::model::*;
use portcullis_core::store::{KeyRotation, Store, StoreResult};
use sqlx::Row;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};

pub use migrate::checksum;

/// Maps a driver error to the core's opaque storage error. Details go to the log only.
fn db_err(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::Database(d) if d.is_unique_violation() => StoreError::Conflict(d.message().to_owned()),
        sqlx::Error::Database(d) => {
            let code = d.code().map(|c| c.into_owned()).unwrap_or_default();
            // SQLITE_FULL (13) / PostgreSQL disk_full (53100), and SQLite I/O errors (10).
            if code == "13" || code == "53100" || d.message().contains("database or disk is full") {
                StoreError::Full(d.message().to_owned())
            } else {
                StoreError::Internal(format!("{code}: {}", d.message()))
            }
        }
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) | sqlx::Error::Tls(_) => {
            StoreError::Unavailable(e.to_string())
        }
        _ => StoreError::Internal(e.to_string()),
    }
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Internal(format!("stored {what} is malformed"))
}

fn json_list<T>(s: &str, parse: impl Fn(&str) -> Result<T, portcullis_core::Error>, what: &str) -> StoreResult<Vec<T>> {
    let raw: Vec<String> = serde_json::from_str(s).map_err(|_| corrupt(what))?;
    raw.iter().map(|x| parse(x).map_err(|_| corrupt(what))).collect()
}

fn to_json<T: ToString>(v: &[T]) -> String {
    serde_json::to_string(&v.iter().map(ToString::to_string).collect::<Vec<_>>()).unwrap_or_else(|_| "[]".into())
}

fn hash_from(b: Option<Vec<u8>>) -> StoreResult<Option<SecretHash>> {
    b.map(|b| SecretHash::from_slice(&b).ok_or_else(|| corrupt("secret hash"))).transpose()
}

fn limit(p: Page) -> (i64, i64) {
    (i64::from(p.limit), i64::try_from(p.offset).unwrap_or(i64::MAX))
}

/// The shared implementation; `$pool` is `SqlitePool` or `PgPool`, `$row` its row type.
macro_rules! sql_store {
    ($store:ident, $pool:ty, $row:ty) => {
        impl $store {
            fn org_row(r: &$row) -> StoreResult<Organisation> {
                Ok(Organisation {
                    id: r.try_get("id").map_err(db_err)?,
                    slug: Slug::parse(r.try_get::<&str, _>("slug").map_err(db_err)?).map_err(|_| corrupt("slug"))?,
                    name: r.try_get("name").map_err(db_err)?,
                    created_at: r.try_get("created_at").map_err(db_err)?,
                    updated_at: r.try_get("updated_at").map_err(db_err)?,
                })
            }

            fn service_row(r: &$row) -> StoreResult<Service> {
                Ok(Service {
                    id: r.try_get("id").map_err(db_err)?,
                    org_id: r.try_get("org_id").map_err(db_err)?,
                    slug: Slug::parse(r.try_get::<&str, _>("slug").map_err(db_err)?).map_err(|_| corrupt("slug"))?,
                    name: r.try_get("name").map_err(db_err)?,
                    audience: r.try_get("audience").map_err(db_err)?,
                    scopes: json_list(r.try_get("scopes").map_err(db_err)?, ScopeName::parse, "scopes")?,
                    roles: json_list(r.try_get("roles").map_err(db_err)?, RoleName::parse, "roles")?,
                    permissions: json_list(r.try_get("permissions").map_err(db_err)?, PermissionName::parse, "permissions")?,
                    created_at: r.try_get("created_at").map_err(db_err)?,
                    updated_at: r.try_get("updated_at").map_err(db_err)?,
                })
            }

            fn app_row(r: &$row) -> StoreResult<Application> {
                Ok(Application {
                    id: r.try_get("id").map_err(db_err)?,
                    org_id: r.try_get("org_id").map_err(db_err)?,
                    slug: Slug::parse(r.try_get::<&str, _>("slug").map_err(db_err)?).map_err(|_| corrupt("slug"))?,
                    client_id: ClientId::parse(r.try_get::<&str, _>("client_id").map_err(db_err)?).map_err(|_| corrupt("client id"))?,
                    name: r.try_get("name").map_err(db_err)?,
                    grant_types: json_list(r.try_get("grant_types").map_err(db_err)?, GrantType::parse, "grant types")?,
                    scopes: json_list(r.try_get("scopes").map_err(db_err)?, ScopeName::parse, "scopes")?,
                    roles: json_list(r.try_get("roles").map_err(db_err)?, RoleName::parse, "roles")?,
                    auth_method: AuthMethod::parse(r.try_get("auth_method").map_err(db_err)?).map_err(|_| corrupt("auth method"))?,
                    redirect_uris: json_list(r.try_get("redirect_uris").map_err(db_err)?, |s| Ok(s.to_owned()), "redirect uris")?,
                    access_token_lifetime: r.try_get("access_token_lifetime").map_err(db_err)?,
                    signing_alg: Algorithm::parse(r.try_get("signing_alg").map_err(db_err)?).map_err(|_| corrupt("algorithm"))?,
                    enabled: r.try_get("enabled").map_err(db_err)?,
                    secret_hash: hash_from(r.try_get("secret_hash").map_err(db_err)?)?,
                    previous_secret_hash: hash_from(r.try_get("previous_secret_hash").map_err(db_err)?)?,
                    previous_secret_expires_at: r.try_get("previous_secret_expires_at").map_err(db_err)?,
                    created_at: r.try_get("created_at").map_err(db_err)?,
                    updated_at: r.try_get("updated_at").map_err(db_err)?,
                })
            }

            fn user_row(r: &$row) -> StoreResult<User> {
                Ok(User {
                    id: r.try_get("id").map_err(db_err)?,
                    org_id: r.try_get("org_id").map_err(db_err)?,
                    email: Email::parse(r.try_get("email").map_err(db_err)?).map_err(|_| corrupt("email"))?,
                    name: r.try_get("name").map_err(db_err)?,
                    password_hash: r.try_get("password_hash").map_err(db_err)?,
                    roles: json_list(r.try_get("roles").map_err(db_err)?, RoleName::parse, "roles")?,
                    enabled: r.try_get("enabled").map_err(db_err)?,
                    created_at: r.try_get("created_at").map_err(db_err)?,
                    updated_at: r.try_get("updated_at").map_err(db_err)?,
                })
            }

            fn key_row(r: &$row) -> StoreResult<StoredSigningKey> {
                Ok(StoredSigningKey {
                    kid: r.try_get("kid").map_err(db_err)?,
                    alg: Algorithm::parse(r.try_get("alg").map_err(db_err)?).map_err(|_| corrupt("algorithm"))?,
                    state: KeyState::parse(r.try_get("state").map_err(db_err)?).ok_or_else(|| corrupt("key state"))?,
                    sealed_private_key: r.try_get("sealed_private_key").map_err(db_err)?,
                    created_at: r.try_get("created_at").map_err(db_err)?,
                    activated_at: r.try_get("activated_at").map_err(db_err)?,
                    expires_at: r.try_get("expires_at").map_err(db_err)?,
                })
            }

            fn ca_row(r: &$row) -> StoreResult<CaCertificate> {
                Ok(CaCertificate {
                    id: r.try_get("id").map_err(db_err)?,
                    kind: CaKind::parse(r.try_get("kind").map_err(db_err)?).ok_or_else(|| corrupt("CA kind"))?,
                    subject: r.try_get("subject").map_err(db_err)?,
                    certificate_pem: r.try_get("certificate_pem").map_err(db_err)?,
                    sealed_private_key: r.try_get("sealed_private_key").map_err(db_err)?,
                    not_before: r.try_get("not_before").map_err(db_err)?,
                    not_after: r.try_get("not_after").map_err(db_err)?,
                    active: r.try_get("active").map_err(db_err)?,
                    created_at: r.try_get("created_at").map_err(db_err)?,
                })
            }

            fn audit_row(r: &$row) -> StoreResult<AuditEvent> {
                Ok(AuditEvent {
                    id: r.try_get("id").map_err(db_err)?,
                    at: r.try_get("at").map_err(db_err)?,
                    org_id: r.try_get("org_id").map_err(db_err)?,
                    actor: r.try_get("actor").map_err(db_err)?,
                    action: r.try_get("action").map_err(db_err)?,
                    target: r.try_get("target").map_err(db_err)?,
                    outcome: r.try_get("outcome").map_err(db_err)?,
                    ip: r.try_get("ip").map_err(db_err)?,
                    details: serde_json::from_str(r.try_get("details").map_err(db_err)?).map_err(|_| corrupt("audit details"))?,
                })
            }

            async fn insert_audit<'c, E>(ex: E, e: &AuditEvent) -> StoreResult<()>
            where
                E: sqlx::Executor<'c, Database = <$pool as PoolDb>::Db>,
            {
                sqlx::query("INSERT INTO audit_events (id, at, org_id, actor, action, target, outcome, ip, details) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)")
                    .bind(&e.id)
                    .bind(e.at)
                    .bind(&e.org_id)
                    .bind(&e.actor)
                    .bind(&e.action)
                    .bind(&e.target)
                    .bind(&e.outcome)
                    .bind(&e.ip)
                    .bind(e.details.to_string())
                    .execute(ex)
                    .await
                    .map_err(db_err)?;
                Ok(())
            }

            async fn run_migrations(&self, lock: Option<&'static str>, migrations: &[migrate::Migration], now: UnixTime) -> StoreResult<()> {
                let mut tx = self.pool.begin().await.map_err(db_err)?;
                if let Some(lock) = lock {
                    sqlx::query(lock).execute(&mut *tx).await.map_err(db_err)?;
                }
                sqlx::query(migrate::CREATE_TABLE).execute(&mut *tx).await.map_err(db_err)?;
                for m in migrations {
                    let applied: Option<String> = sqlx::query("SELECT checksum FROM portcullis_migrations WHERE version = $1")
                        .bind(m.version)
                        .fetch_optional(&mut *tx)
                        .await
                        .map_err(db_err)?
                        .map(|r| r.try_get::<String, _>("checksum"))
                        .transpose()
                        .map_err(db_err)?;
                    match applied {
                        Some(sum) if sum == migrate::checksum(m.sql) => continue,
                        Some(_) => {
                            return Err(StoreError::Internal(format!("migration {} was changed after it was applied", m.name)));
                        }
                        None => {}
                    }
                    sqlx::raw_sql(m.sql).execute(&mut *tx).await.map_err(db_err)?;
                    sqlx::query("INSERT INTO portcullis_migrations (version, name, checksum, applied_at) VALUES ($1, $2, $3, $4)")
                        .bind(m.version)
                        .bind(m.name)
                        .bind(migrate::checksum(m.sql))
                        .bind(now)
                        .execute(&mut *tx)
                        .await
                        .map_err(db_err)?;
                    tracing::info!(migration = m.name, "applied migration");
                }
                tx.commit().await.map_err(db_err)
            }
        }

        #[async_trait]
        impl Store for $store {
            async fn ping(&self) -> StoreResult<()> {
                sqlx::query("SELECT 1").execute(&self.pool).await.map_err(db_err)?;
                Ok(())
            }

            async fn setting(&self, key: &str) -> StoreResult<Option<String>> {
                let r = sqlx::query("SELECT value FROM settings WHERE key = $1").bind(key).fetch_optional(&self.pool).await.map_err(db_err)?;
                r.map(|r| r.try_get("value")).transpose().map_err(db_err)
            }

            async fn insert_setting(&self, key: &str, value: &str) -> StoreResult<bool> {
                let r = sqlx::query("INSERT INTO settings (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING")
                    .bind(key)
                    .bind(value)
                    .execute(&self.pool)
                    .await
                    .map_err(db_err)?;
                Ok(r.rows_affected() == 1)
            }

            async fn create_organisation(&self, o: &Organisation, audit: &AuditEvent) -> StoreResult<()> {
                let mut tx = self.pool.begin().await.map_err(db_err)?;
                sqlx::query("INSERT INTO organisations (id, slug, name, created_at, updated_at) VALUES ($1, $2, $3, $4, $5)")
                    .bind(&o.id)
                    .bind(o.slug.as_str())
                    .bind(&o.name)
                    .bind(o.created_at)
                    .bind(o.updated_at)
                    .execute(&mut *tx)
                    .await
                    .map_err(db_err)?;
                Self::insert_audit(&mut *tx, audit).await?;
                tx.commit().await.map_err(db_err)
            }

            async fn organisation(&self, slug: &str) -> StoreResult<Option<Organisation>> {
                let r = sqlx::query("SELECT * FROM organisations WHERE slug = $1").bind(slug).fetch_optional(&self.pool).await.map_err(db_err)?;
                r.as_ref().map(Self::org_row).transpose()
            }

            async fn organisation_by_id(&self, id: &str) -> StoreResult<Option<Organisation>> {
                let r = sqlx::query("SELECT * FROM organisations WHERE id = $1").bind(id).fetch_optional(&self.pool).await.map_err(db_err)?;
                r.as_ref().map(Self::org_row).transpose()
            }

            async fn organisations(&self, page: Page) -> StoreResult<Vec<Organisation>> {
                let (l, o) = limit(page);
                let rows = sqlx::query("SELECT * FROM organisations ORDER BY slug LIMIT $1 OFFSET $2").bind(l).bind(o).fetch_all(&self.pool).await.map_err(db_err)?;
                rows.iter().map(Self::org_row).collect()
            }

            async fn create_service(&self, s: &Service, grants: &[RoleGrant], audit: &AuditEvent) -> StoreResult<()> {
                let mut tx = self.pool.begin().await.map_err(db_err)?;
                sqlx::query("INSERT INTO services (id, org_id, slug, name, audience, scopes, roles, permissions, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)")
                    .bind(&s.id)
                    .bind(&s.org_id)
                    .bind(s.slug.as_str())
                    .bind(&s.name)
                    .bind(&s.audience)
                    .bind(to_json(&s.scopes))
                    .bind(to_json(&s.roles))
                    .bind(to_json(&s.permissions))
                    .bind(s.created_at)
                    .bind(s.updated_at)
                    .execute(&mut *tx)
                    .await
                    .map_err(db_err)?;
                for g in grants {
                    sqlx::query("INSERT INTO role_permissions (org_id, role, permission) VALUES ($1, $2, $3)")
                        .bind(&s.org_id)
                        .bind(g.role.as_str())
                        .bind(g.permission.as_str())
                        .execute(&mut *tx)
                        .await
                        .map_err(db_err)?;
                }
                Self::insert_audit(&mut *tx, audit).await?;
                tx.commit().await.map_err(db_err)
            }

            async fn service(&self, org_id: &str, slug: &str) -> StoreResult<Option<Service>> {
                let r = sqlx::query("SELECT * FROM services WHERE org_id = $1 AND slug = $2").bind(org_id).bind(slug).fetch_optional(&self.pool).await.map_err(db_err)?;
                r.as_ref().map(Self::service_row).transpose()
            }

            async fn services(&self, org_id: &str) -> StoreResult<Vec<Service>> {
                let rows = sqlx::query("SELECT * FROM services WHERE org_id = $1 ORDER BY slug").bind(org_id).fetch_all(&self.pool).await.map_err(db_err)?;
                rows.iter().map(Self::service_row).collect()
            }

            async fn service_by_audience(&self, audience: &str) -> StoreResult<Option<Service>> {
                let r = sqlx::query("SELECT * FROM services WHERE audience = $1").bind(audience).fetch_optional(&self.pool).await.map_err(db_err)?;
                r.as_ref().map(Self::service_row).transpose()
            }

            async fn delete_service(&self, org_id: &str, slug: &str, audit: &AuditEvent) -> StoreResult<bool> {
                let mut tx = self.pool.begin().await.map_err(db_err)?;
                let n = sqlx::query("DELETE FROM services WHERE org_id = $1 AND slug = $2").bind(org_id).bind(slug).execute(&mut *tx).await.map_err(db_err)?.rows_affected();
                if n == 0 {
                    return Ok(false);
                }
                sqlx::query("DELETE FROM role_permissions WHERE org_id = $1 AND substr(role, 1, length($2) + 1) = $2 || ':'")
                    .bind(org_id)
                    .bind(slug)
                    .execute(&mut *tx)
                    .await
                    .map_err(db_err)?;
                Self::insert_audit(&mut *tx, audit).await?;
                tx.commit().await.map_err(db_err)?;
                Ok(true)
            }

            async fn role_grants(&self, org_id: &str) -> StoreResult<Vec<RoleGrant>> {
                let rows = sqlx::query("SELECT role, permission FROM role_permissions WHERE org_id = $1 ORDER BY role, permission").bind(org_id).fetch_all(&self.pool).await.map_err(db_err)?;
                rows.iter()
                    .map(|r| {
                        Ok(RoleGrant {
                            role: RoleName::parse(r.try_get("role").map_err(db_err)?).map_err(|_| corrupt("role"))?,
                            permission: PermissionName::parse(r.try_get("permission").map_err(db_err)?).map_err(|_| corrupt("permission"))?,
                        })
                    })
                    .collect()
            }

            async fn set_role_permissions(&self, org_id: &str, role: &RoleName, permissions: &[PermissionName], audit: &AuditEvent) -> StoreResult<()> {
                let mut tx = self.pool.begin().await.map_err(db_err)?;
                sqlx::query("DELETE FROM role_permissions WHERE org_id = $1 AND role = $2").bind(org_id).bind(role.as_str()).execute(&mut *tx).await.map_err(db_err)?;
                for p in permissions {
                    sqlx::query("INSERT INTO role_permissions (org_id, role, permission) VALUES ($1, $2, $3)")
                        .bind(org_id)
                        .bind(role.as_str())
                        .bind(p.as_str())
                        .execute(&mut *tx)
                        .await
                        .map_err(db_err)?;
                }
                Self::insert_audit(&mut *tx, audit).await?;
                tx.commit().await.map_err(db_err)
            }

            async fn create_application(&self, a: &Application, audit: &AuditEvent) -> StoreResult<()> {
                let mut tx = self.pool.begin().await.map_err(db_err)?;
                let q = sqlx::query("INSERT INTO applications (name, grant_types, scopes, roles, auth_method, redirect_uris, access_token_lifetime, signing_alg, enabled, secret_hash, previous_secret_hash, previous_secret_expires_at, updated_at, id, org_id, slug, client_id, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)");
                Self::bind_app_settings(q, a)?
                    .bind(&a.id)
                    .bind(&a.org_id)
                    .bind(a.slug.as_str())
                    .bind(a.client_id.as_str())
                    .bind(a.created_at)
                    .execute(&mut *tx)
                    .await
                    .map_err(db_err)?;
                Self::insert_audit(&mut *tx, audit).await?;
                tx.commit().await.map_err(db_err)
            }

            async fn application(&self, client_id: &str) -> StoreResult<Option<Application>> {
                let r = sqlx::query("SELECT * FROM applications WHERE client_id = $1").bind(client_id).fetch_optional(&self.pool).await.map_err(db_err)?;
                r.as_ref().map(Self::app_row).transpose()
            }

            async fn applications(&self, org_id: &str, page: Page) -> StoreResult<Vec<Application>> {
                let (l, o) = limit(page);
                let rows = sqlx::query("SELECT * FROM applications WHERE org_id = $1 ORDER BY slug LIMIT $2 OFFSET $3").bind(org_id).bind(l).bind(o).fetch_all(&self.pool).await.map_err(db_err)?;
                rows.iter().map(Self::app_row).collect()
            }

            async fn update_application(&self, a: &Application, expected_updated_at: UnixTime, audit: &AuditEvent) -> StoreResult<()> {
                let mut tx = self.pool.begin().await.map_err(db_err)?;
                let q = sqlx::query("UPDATE applications SET name = $1, grant_types = $2, scopes = $3, roles = $4, auth_method = $5, redirect_uris = $6, access_token_lifetime = $7, signing_alg = $8, enabled = $9, secret_hash = $10, previous_secret_hash = $11, previous_secret_expires_at = $12, updated_at = $13 WHERE id = $14 AND updated_at = $15");
                let n = Self::bind_app_settings(q, a)?
                    .bind(&a.id)
                    .bind(expected_updated_at)
                    .execute(&mut *tx)
                    .await
                    .map_err(db_err)?
                    .rows_affected();
                if n != 1 {
                    return Err(StoreError::Conflict("application was changed concurrently".into()));
                }
                Self::insert_audit(&mut *tx, audit).await?;
                tx.commit().await.map_err(db_err)
            }

            async fn delete_application(&self, client_id: &str, audit: &AuditEvent) -> StoreResult<bool> {
                let mut tx = self.pool.begin().await.map_err(db_err)?;
                let n = sqlx::query("DELETE FROM applications WHERE client_id = $1").bind(client_id).execute(&mut *tx).await.map_err(db_err)?.rows_affected();
                if n == 0 {
                    return Ok(false);
                }
                Self::insert_audit(&mut *tx, audit).await?;
                tx.commit().await.map_err(db_err)?;
                Ok(true)
            }

            async fn create_user(&self, u: &User, audit: &AuditEvent) -> StoreResult<()> {
                let mut tx = self.pool.begin().await.map_err(db_err)?;
                sqlx::query("INSERT INTO users (id, org_id, email, name, password_hash, roles, enabled, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)")
                    .bind(&u.id)
                    .bind(&u.org_id)
                    .bind(u.email.as_str())
                    .bind(&u.name)
                    .bind(&u.password_hash)
                    .bind(to_json(&u.roles))
                    .bind(u.enabled)
                    .bind(u.created_at)
                    .bind(u.updated_at)
                    .execute(&mut *tx)
                    .await
                    .map_err(db_err)?;
                Self::insert_audit(&mut *tx, audit).await?;
                tx.commit().await.map_err(db_err)
            }

            async fn user(&self, org_id: &str, id: &str) -> StoreResult<Option<User>> {
                let r = sqlx::query("SELECT * FROM users WHERE org_id = $1 AND id = $2").bind(org_id).bind(id).fetch_optional(&self.pool).await.map_err(db_err)?;
                r.as_ref().map(Self::user_row).transpose()
            }

            async fn user_by_email(&self, org_id: &str, email: &str) -> StoreResult<Option<User>> {
                let r = sqlx::query("SELECT * FROM users WHERE org_id = $1 AND email = $2").bind(org_id).bind(email).fetch_optional(&self.pool).await.map_err(db_err)?;
                r.as_ref().map(Self::user_row).transpose()
            }

            async fn users(&self, org_id: &str, page: Page) -> StoreResult<Vec<User>> {
                let (l, o) = limit(page);
                let rows = sqlx::query("SELECT * FROM users WHERE org_id = $1 ORDER BY email LIMIT $2 OFFSET $3").bind(org_id).bind(l).bind(o).fetch_all(&self.pool).await.map_err(db_err)?;
                rows.iter().map(Self::user_row).collect()
            }

            async fn signing_keys(&self) -> StoreResult<Vec<StoredSigningKey>> {
                let rows = sqlx::query("SELECT * FROM signing_keys ORDER BY created_at, kid").fetch_all(&self.pool).await.map_err(db_err)?;
                rows.iter().map(Self::key_row).collect()
            }

            async fn insert_signing_keys(&self, keys: &[StoredSigningKey], audit: &AuditEvent) -> StoreResult<()> {
                let mut tx = self.pool.begin().await.map_err(db_err)?;
                for k in keys {
                    Self::insert_key(&mut *tx, k).await?;
                }
                Self::insert_audit(&mut *tx, audit).await?;
                tx.commit().await.map_err(db_err)
            }

            async fn rotate_signing_key(&self, r: &KeyRotation, audit: &AuditEvent) -> StoreResult<()> {
                let mut tx = self.pool.begin().await.map_err(db_err)?;
                let retired = sqlx::query("UPDATE signing_keys SET state = 'retired', expires_at = $1 WHERE kid = $2 AND alg = $3 AND state = 'current'")
                    .bind(r.retired_until)
                    .bind(&r.current_kid)
                    .bind(r.alg.as_str())
                    .execute(&mut *tx)
                    .await
                    .map_err(db_err)?
                    .rows_affected();
                let promoted = sqlx::query("UPDATE signing_keys SET state = 'current', activated_at = $1 WHERE kid = $2 AND alg = $3 AND state = 'next'")
                    .bind(r.now)
                    .bind(&r.next_kid)
                    .bind(r.alg.as_str())
                    .execute(&mut *tx)
                    .await
                    .map_err(db_err)?
                    .rows_affected();
                if retired != 1 || promoted != 1 {
                    return Err(StoreError::Conflict("signing keys were rotated concurrently".into()));
                }
                Self::insert_key(&mut *tx, &r.new_next).await?;
                Self::insert_audit(&mut *tx, audit).await?;
                tx.commit().await.map_err(db_err)
            }

            async fn delete_expired_signing_keys(&self, now: UnixTime) -> StoreResult<u64> {
                let r = sqlx::query("DELETE FROM signing_keys WHERE state = 'retired' AND expires_at <= $1").bind(now).execute(&self.pool).await.map_err(db_err)?;
                Ok(r.rows_affected())
            }

            async fn ca_certificates(&self) -> StoreResult<Vec<CaCertificate>> {
                let rows = sqlx::query("SELECT * FROM ca_certificates ORDER BY created_at, id").fetch_all(&self.pool).await.map_err(db_err)?;
                rows.iter().map(Self::ca_row).collect()
            }

            async fn insert_ca_certificates(&self, certs: &[CaCertificate], audit: &AuditEvent) -> StoreResult<()> {
                let mut tx = self.pool.begin().await.map_err(db_err)?;
                for c in certs {
                    sqlx::query("INSERT INTO ca_certificates (id, kind, subject, certificate_pem, sealed_private_key, not_before, not_after, active, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)")
                        .bind(&c.id)
                        .bind(c.kind.as_str())
                        .bind(&c.subject)
                        .bind(&c.certificate_pem)
                        .bind(&c.sealed_private_key)
                        .bind(c.not_before)
                        .bind(c.not_after)
                        .bind(c.active)
                        .bind(c.created_at)
                        .execute(&mut *tx)
                        .await
                        .map_err(db_err)?;
                }
                Self::insert_audit(&mut *tx, audit).await?;
                tx.commit().await.map_err(db_err)
            }

            async fn revoke_token(&self, t: &RevokedToken, audit: &AuditEvent) -> StoreResult<()> {
                let mut tx = self.pool.begin().await.map_err(db_err)?;
                sqlx::query("INSERT INTO revoked_tokens (jti, client_id, expires_at, revoked_at) VALUES ($1, $2, $3, $4) ON CONFLICT (jti) DO NOTHING")
                    .bind(&t.jti)
                    .bind(&t.client_id)
                    .bind(t.expires_at)
                    .bind(t.revoked_at)
                    .execute(&mut *tx)
                    .await
                    .map_err(db_err)?;
                Self::insert_audit(&mut *tx, audit).await?;
                tx.commit().await.map_err(db_err)
            }

            async fn is_token_revoked(&self, jti: &str) -> StoreResult<bool> {
                let r = sqlx::query("SELECT 1 FROM revoked_tokens WHERE jti = $1").bind(jti).fetch_optional(&self.pool).await.map_err(db_err)?;
                Ok(r.is_some())
            }

            async fn purge_expired_revocations(&self, now: UnixTime) -> StoreResult<u64> {
                let r = sqlx::query("DELETE FROM revoked_tokens WHERE expires_at < $1").bind(now).execute(&self.pool).await.map_err(db_err)?;
                Ok(r.rows_affected())
            }

            async fn append_audit(&self, event: &AuditEvent) -> StoreResult<()> {
                Self::insert_audit(&self.pool, event).await
            }

            async fn audit_events(&self, org_id: Option<&str>, page: Page) -> StoreResult<Vec<AuditEvent>> {
                let (l, o) = limit(page);
                let rows = match org_id {
                    Some(org) => sqlx::query("SELECT * FROM audit_events WHERE org_id = $1 ORDER BY seq DESC LIMIT $2 OFFSET $3").bind(org).bind(l).bind(o).fetch_all(&self.pool).await,
                    None => sqlx::query("SELECT * FROM audit_events ORDER BY seq DESC LIMIT $1 OFFSET $2").bind(l).bind(o).fetch_all(&self.pool).await,
                }
                .map_err(db_err)?;
                rows.iter().map(Self::audit_row).collect()
            }
        }

        impl $store {
            /// Binds, as `$1…$13`, the application columns that both INSERT and UPDATE write,
            /// in one order kept in one place.
            fn bind_app_settings<'q>(
                q: sqlx::query::Query<'q, <$pool as PoolDb>::Db, <<$pool as PoolDb>::Db as sqlx::Database>::Arguments>,
                a: &'q Application,
            ) -> StoreResult<sqlx::query::Query<'q, <$pool as PoolDb>::Db, <<$pool as PoolDb>::Db as sqlx::Database>::Arguments>> {
                let grant_types = a.grant_types.iter().map(|g| g.as_str()).collect::<Vec<_>>();
                Ok(q.bind(&a.name)
                    .bind(serde_json::to_string(&grant_types).map_err(|_| corrupt("grant types"))?)
                    .bind(to_json(&a.scopes))
                    .bind(to_json(&a.roles))
                    .bind(a.auth_method.as_str())
                    .bind(serde_json::to_string(&a.redirect_uris).map_err(|_| corrupt("redirect uris"))?)
                    .bind(a.access_token_lifetime)
                    .bind(a.signing_alg.as_str())
                    .bind(a.enabled)
                    .bind(a.secret_hash.as_ref().map(|h| h.0.to_vec()))
                    .bind(a.previous_secret_hash.as_ref().map(|h| h.0.to_vec()))
                    .bind(a.previous_secret_expires_at)
                    .bind(a.updated_at))
            }

            async fn insert_key<'c, E>(ex: E, k: &StoredSigningKey) -> StoreResult<()>
            where
                E: sqlx::Executor<'c, Database = <$pool as PoolDb>::Db>,
            {
                sqlx::query("INSERT INTO signing_keys (kid, alg, state, sealed_private_key, created_at, activated_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7)")
                    .bind(&k.kid)
                    .bind(k.alg.as_str())
                    .bind(k.state.as_str())
                    .bind(&k.sealed_private_key)
                    .bind(k.created_at)
                    .bind(k.activated_at)
                    .bind(k.expires_at)
                    .execute(ex)
                    .await
                    .map_err(db_err)?;
                Ok(())
            }
        }
    };
}

/// Names the database type of a pool inside the macro.
trait PoolDb {
    type Db: sqlx::Database;
}
impl PoolDb for SqlitePool {
    type Db = sqlx::Sqlite;
}
impl PoolDb for PgPool {
    type Db = sqlx::Postgres;
}

/// Embedded SQLite: WAL, foreign keys on, a busy timeout, and a single writer connection
/// pool (readers share the WAL).
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    pub async fn open(path: &Path, now: UnixTime) -> StoreResult<Self> {
        let opts = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5));
        Self::with_options(opts, now).await
    }

    pub async fn open_url(url: &str, now: UnixTime) -> StoreResult<Self> {
        let opts = SqliteConnectOptions::from_str(url)
            .map_err(db_err)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5));
        Self::with_options(opts, now).await
    }

    async fn with_options(opts: SqliteConnectOptions, now: UnixTime) -> StoreResult<Self> {
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(opts)
            .await
            .map_err(db_err)?;
        let store = Self { pool };
        store.run_migrations(None, migrate::SQLITE, now).await?;
        Ok(store)
    }

    /// `PRAGMA integrity_check`; `ok` when the file is sound.
    pub async fn integrity_check(&self) -> StoreResult<String> {
        let r = sqlx::query("PRAGMA integrity_check").fetch_one(&self.pool).await.map_err(db_err)?;
        r.try_get::<String, _>(0).map_err(db_err)
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

sql_store!(SqliteStore, SqlitePool, sqlx::sqlite::SqliteRow);

/// PostgreSQL for scale-out: several nodes share one database. Migrations take an advisory
/// lock so nodes starting together apply them once.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
}

impl PgStore {
    pub async fn connect(url: &str, now: UnixTime) -> StoreResult<Self> {
        let opts = PgConnectOptions::from_str(url).map_err(db_err)?;
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(opts)
            .await
            .map_err(db_err)?;
        let store = Self { pool };
        store.run_migrations(Some("SELECT pg_advisory_xact_lock(7261426469)"), migrate::POSTGRES, now).await?;
        Ok(store)
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

sql_store!(PgStore, PgPool, sqlx::postgres::PgRow);
