//! SQLite and PostgreSQL adapters for the core's [`Store`] port.
//!
//! Both adapters share one SQL text (placeholders `$1…`, which both drivers accept, and a
//! portable schema), generated for each pool type by [`sql_store!`]; only connection set-up
//! and migration locking differ. sqlx errors are mapped to the core's opaque [`StoreError`].

// Audit chain and backup: macros instantiated for both stores below.
#[macro_use]
mod audit;
#[macro_use]
pub mod backup;
mod migrate;

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use portcullis_core::StoreError;
use portcullis_core::clock::UnixTime;
use portcullis_core::crypto::secrets::SecretHash;
use portcullis_core::crypto::signing::Algorithm;
use portcullis_core::ids::{ClientId, Email, PermissionName, RoleName, ScopeName, Slug};
use portcullis_core::model::*;
use portcullis_core::store::{BackupSummary, KeyRotation, Store, StoreResult};
use sqlx::Row;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use tokio::sync::{Notify, mpsc, oneshot};

pub use migrate::checksum;

/// Maps a driver error to the core's opaque storage error. Details go to the log only.
fn db_err(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::Database(d) if d.is_unique_violation() => StoreError::Conflict(d.message().to_owned()),
        sqlx::Error::Database(d) => {
            let code = d.code().map(|c| c.into_owned()).unwrap_or_default();
            let detail = format!("{code}: {}", d.message());
            let backend = if d.try_downcast_ref::<sqlx::postgres::PgDatabaseError>().is_some() {
                Backend::Postgres
            } else {
                Backend::Sqlite
            };
            match classify(backend, &code) {
                Failure::Full => StoreError::Full(detail),
                Failure::Unavailable => StoreError::Unavailable(detail),
                Failure::Other => StoreError::Internal(detail),
            }
        }
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) | sqlx::Error::Tls(_) => {
            StoreError::Unavailable(e.to_string())
        }
        _ => StoreError::Internal(e.to_string()),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Sqlite,
    Postgres,
}

/// What a database error means for the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// The disk is full: nothing of the write was kept (507).
    Full,
    /// A passing shortage: retry soon (503).
    Unavailable,
    Other,
}

/// Classifies a database error by its code. SQLite: the primary result code (the low byte of
/// the extended code sqlx reports); SQLITE_FULL (13) is a full disk, SQLITE_BUSY (5) (another
/// writer held the lock past the busy timeout) is passing. PostgreSQL: the SQLSTATE;
/// `53100 disk_full` is a full disk; the rest of class 53 (insufficient resources: out of
/// memory, too many connections), class 08 (connection exceptions) and `57P01`–`57P03` (the
/// server shutting down or not accepting connections yet) are passing.
fn classify(backend: Backend, code: &str) -> Failure {
    match backend {
        Backend::Sqlite => match code.parse::<i64>().map(|c| c & 0xff) {
            Ok(13) => Failure::Full,
            Ok(5) => Failure::Unavailable,
            _ => Failure::Other,
        },
        Backend::Postgres => match code {
            "53100" => Failure::Full,
            "57P01" | "57P02" | "57P03" => Failure::Unavailable,
            c if c.starts_with("53") || c.starts_with("08") => Failure::Unavailable,
            _ => Failure::Other,
        },
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

/// A list of plain strings as JSON text.
fn string_list(v: &[String]) -> StoreResult<String> {
    serde_json::to_string(v).map_err(|_| corrupt("string list"))
}

/// Exactly the names [`RevocationReason::as_str`] writes.
fn revocation_reason(s: &str) -> StoreResult<RevocationReason> {
    RevocationReason::ALL.into_iter().find(|r| r.as_str() == s).ok_or_else(|| corrupt("revocation reason"))
}

/// A `u64` counter stored as BIGINT.
fn to_bigint(v: u64, what: &str) -> StoreResult<i64> {
    i64::try_from(v).map_err(|_| StoreError::Internal(format!("{what} {v} does not fit a BIGINT")))
}

fn hash_from(b: Option<Vec<u8>>) -> StoreResult<Option<SecretHash>> {
    b.map(|b| SecretHash::from_slice(&b).ok_or_else(|| corrupt("secret hash"))).transpose()
}

/// A `u32` counter stored as INTEGER (read as `i32`: PostgreSQL's INTEGER is 4 bytes).
fn counter(v: i32, what: &str) -> StoreResult<u32> {
    u32::try_from(v).map_err(|_| corrupt(what))
}

fn required_hash(b: Vec<u8>) -> StoreResult<SecretHash> {
    SecretHash::from_slice(&b).ok_or_else(|| corrupt("secret hash"))
}

/// A `LIKE … ESCAPE '\'` pattern matching `query` as a lower-cased substring: `%`, `_` and
/// `\` in the query match themselves.
fn contains_pattern(query: &str) -> String {
    format!("%{}", prefix_pattern(&query.to_lowercase()))
}

/// A `LIKE … ESCAPE '\'` pattern for a JSON array of roles holding `role`. The role's own JSON
/// form, quotes included, occurs in the text only as a whole element. SQLite's LIKE ignores
/// ASCII case, so callers check the decoded list again ([`holds_role`]).
fn role_pattern(role: &str) -> StoreResult<String> {
    let quoted = serde_json::to_string(role).map_err(|_| corrupt("role"))?;
    Ok(format!("%{}", prefix_pattern(&quoted)))
}

/// Whether `roles` holds exactly `role` (the check after [`role_pattern`]).
fn holds_role(roles: &[RoleName], role: &str) -> bool {
    roles.iter().any(|r| r.as_str() == role)
}

/// A `LIKE … ESCAPE '\'` pattern matching what starts with `prefix` (as is).
fn prefix_pattern(prefix: &str) -> String {
    let mut p = String::with_capacity(prefix.len() + 1);
    for c in prefix.chars() {
        if matches!(c, '%' | '_' | '\\') {
            p.push('\\');
        }
        p.push(c);
    }
    p.push('%');
    p
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
                    allowed_domains: json_list(r.try_get("allowed_domains").map_err(db_err)?, |s| Ok(s.to_owned()), "allowed domains")?,
                    self_registration: r.try_get("self_registration").map_err(db_err)?,
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
                    jwks_uri: r.try_get("jwks_uri").map_err(db_err)?,
                    access_token_lifetime: r.try_get("access_token_lifetime").map_err(db_err)?,
                    signing_alg: Algorithm::parse(r.try_get("signing_alg").map_err(db_err)?).map_err(|_| corrupt("algorithm"))?,
                    id_token_signing_alg: Algorithm::parse(r.try_get("id_token_signing_alg").map_err(db_err)?).map_err(|_| corrupt("algorithm"))?,
                    first_party: r.try_get("first_party").map_err(db_err)?,
                    post_logout_redirect_uris: json_list(r.try_get("post_logout_redirect_uris").map_err(db_err)?, |s| Ok(s.to_owned()), "post-logout redirect uris")?,
                    backchannel_logout_uri: r.try_get("backchannel_logout_uri").map_err(db_err)?,
                    always_issue_refresh_token: r.try_get("always_issue_refresh_token").map_err(db_err)?,
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
                    failed_logins: counter(r.try_get("failed_logins").map_err(db_err)?, "failed login count")?,
                    locked_until: r.try_get("locked_until").map_err(db_err)?,
                    created_at: r.try_get("created_at").map_err(db_err)?,
                    updated_at: r.try_get("updated_at").map_err(db_err)?,
                })
            }

            fn user_email_row(r: &$row) -> StoreResult<UserEmail> {
                Ok(UserEmail {
                    id: r.try_get("id").map_err(db_err)?,
                    user_id: r.try_get("user_id").map_err(db_err)?,
                    org_id: r.try_get("org_id").map_err(db_err)?,
                    email: Email::parse(r.try_get("email").map_err(db_err)?).map_err(|_| corrupt("email"))?,
                    verified_at: r.try_get("verified_at").map_err(db_err)?,
                    created_at: r.try_get("created_at").map_err(db_err)?,
                })
            }

            fn session_row(r: &$row) -> StoreResult<Session> {
                Ok(Session {
                    id: r.try_get("id").map_err(db_err)?,
                    user_id: r.try_get("user_id").map_err(db_err)?,
                    org_id: r.try_get("org_id").map_err(db_err)?,
                    token_hash: required_hash(r.try_get("token_hash").map_err(db_err)?)?,
                    state: CredentialState::parse(r.try_get("state").map_err(db_err)?).ok_or_else(|| corrupt("session state"))?,
                    created_at: r.try_get("created_at").map_err(db_err)?,
                    verified_at: r.try_get("verified_at").map_err(db_err)?,
                    last_used_at: r.try_get("last_used_at").map_err(db_err)?,
                    expires_at: r.try_get("expires_at").map_err(db_err)?,
                    ip: r.try_get("ip").map_err(db_err)?,
                    user_agent: r.try_get("user_agent").map_err(db_err)?,
                    revoked_at: r.try_get("revoked_at").map_err(db_err)?,
                    parent_id: r.try_get("parent_id").map_err(db_err)?,
                })
            }

            fn api_key_row(r: &$row) -> StoreResult<ApiKey> {
                Ok(ApiKey {
                    id: r.try_get("id").map_err(db_err)?,
                    org_id: r.try_get("org_id").map_err(db_err)?,
                    user_id: r.try_get("user_id").map_err(db_err)?,
                    name: r.try_get("name").map_err(db_err)?,
                    key: r.try_get("api_key").map_err(db_err)?,
                    secret_hash: required_hash(r.try_get("secret_hash").map_err(db_err)?)?,
                    roles: json_list(r.try_get("roles").map_err(db_err)?, RoleName::parse, "roles")?,
                    state: CredentialState::parse(r.try_get("state").map_err(db_err)?).ok_or_else(|| corrupt("API key state"))?,
                    expires_at: r.try_get("expires_at").map_err(db_err)?,
                    last_used_at: r.try_get("last_used_at").map_err(db_err)?,
                    created_at: r.try_get("created_at").map_err(db_err)?,
                    revoked_at: r.try_get("revoked_at").map_err(db_err)?,
                })
            }

            fn verification_row(r: &$row) -> StoreResult<Verification> {
                Ok(Verification {
                    id: r.try_get("id").map_err(db_err)?,
                    purpose: VerificationPurpose::parse(r.try_get("purpose").map_err(db_err)?).ok_or_else(|| corrupt("verification purpose"))?,
                    org_id: r.try_get("org_id").map_err(db_err)?,
                    user_id: r.try_get("user_id").map_err(db_err)?,
                    subject_id: r.try_get("subject_id").map_err(db_err)?,
                    code_hash: required_hash(r.try_get("code_hash").map_err(db_err)?)?,
                    attempts: counter(r.try_get("attempts").map_err(db_err)?, "verification attempts")?,
                    expires_at: r.try_get("expires_at").map_err(db_err)?,
                    consumed_at: r.try_get("consumed_at").map_err(db_err)?,
                    created_at: r.try_get("created_at").map_err(db_err)?,
                    sealed_token: r.try_get("sealed_token").map_err(db_err)?,
                })
            }

            fn mail_row(r: &$row) -> StoreResult<QueuedMail> {
                Ok(QueuedMail {
                    id: r.try_get("id").map_err(db_err)?,
                    to: r.try_get("to_addr").map_err(db_err)?,
                    subject: r.try_get("subject").map_err(db_err)?,
                    sealed_body: r.try_get("sealed_body").map_err(db_err)?,
                    attempts: counter(r.try_get("attempts").map_err(db_err)?, "mail attempts")?,
                    next_attempt_at: r.try_get("next_attempt_at").map_err(db_err)?,
                    last_error: r.try_get("last_error").map_err(db_err)?,
                    created_at: r.try_get("created_at").map_err(db_err)?,
                    sent_at: r.try_get("sent_at").map_err(db_err)?,
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

            fn cert_row(r: &$row) -> StoreResult<IssuedCertificate> {
                Ok(IssuedCertificate {
                    id: r.try_get("id").map_err(db_err)?,
                    org_id: r.try_get("org_id").map_err(db_err)?,
                    app_id: r.try_get("app_id").map_err(db_err)?,
                    client_id: ClientId::parse(r.try_get::<&str, _>("client_id").map_err(db_err)?).map_err(|_| corrupt("client id"))?,
                    cert_type: CertificateType::parse(r.try_get("cert_type").map_err(db_err)?).map_err(|_| corrupt("certificate type"))?,
                    serial: r.try_get("serial").map_err(db_err)?,
                    issuer_id: r.try_get("issuer_id").map_err(db_err)?,
                    subject: r.try_get("subject").map_err(db_err)?,
                    sans: json_list(r.try_get("sans").map_err(db_err)?, |s| Ok(s.to_owned()), "subject alternative names")?,
                    key_type: r.try_get("key_type").map_err(db_err)?,
                    spki_sha256: r.try_get("spki_sha256").map_err(db_err)?,
                    fingerprint: r.try_get("fingerprint").map_err(db_err)?,
                    certificate_pem: r.try_get("certificate_pem").map_err(db_err)?,
                    not_before: r.try_get("not_before").map_err(db_err)?,
                    not_after: r.try_get("not_after").map_err(db_err)?,
                    revoked_at: r.try_get("revoked_at").map_err(db_err)?,
                    revocation_reason: r.try_get::<Option<&str>, _>("revocation_reason").map_err(db_err)?.map(revocation_reason).transpose()?,
                    renewed_from: r.try_get("renewed_from").map_err(db_err)?,
                    expiry_notified_at: r.try_get("expiry_notified_at").map_err(db_err)?,
                    created_by: r.try_get("created_by").map_err(db_err)?,
                    created_at: r.try_get("created_at").map_err(db_err)?,
                })
            }

            fn crl_row(r: &$row) -> StoreResult<StoredCrl> {
                Ok(StoredCrl {
                    issuer_id: r.try_get("issuer_id").map_err(db_err)?,
                    number: u64::try_from(r.try_get::<i64, _>("number").map_err(db_err)?).map_err(|_| corrupt("CRL number"))?,
                    this_update: r.try_get("this_update").map_err(db_err)?,
                    next_update: r.try_get("next_update").map_err(db_err)?,
                    der: r.try_get("der").map_err(db_err)?,
                })
            }

            fn code_row(r: &$row) -> StoreResult<AuthorizationCode> {
                Ok(AuthorizationCode {
                    code_hash: required_hash(r.try_get("code_hash").map_err(db_err)?)?,
                    client_id: r.try_get("client_id").map_err(db_err)?,
                    org_id: r.try_get("org_id").map_err(db_err)?,
                    user_id: r.try_get("user_id").map_err(db_err)?,
                    session_id: r.try_get("session_id").map_err(db_err)?,
                    redirect_uri: r.try_get("redirect_uri").map_err(db_err)?,
                    scope: r.try_get("scope").map_err(db_err)?,
                    nonce: r.try_get("nonce").map_err(db_err)?,
                    code_challenge: r.try_get("code_challenge").map_err(db_err)?,
                    auth_time: r.try_get("auth_time").map_err(db_err)?,
                    amr: json_list(r.try_get("amr").map_err(db_err)?, |s| Ok(s.to_owned()), "amr")?,
                    created_at: r.try_get("created_at").map_err(db_err)?,
                    expires_at: r.try_get("expires_at").map_err(db_err)?,
                    consumed_at: r.try_get("consumed_at").map_err(db_err)?,
                    issued_jti: r.try_get("issued_jti").map_err(db_err)?,
                    issued_jti_expires_at: r.try_get("issued_jti_expires_at").map_err(db_err)?,
                    issued_family: r.try_get("issued_family").map_err(db_err)?,
                    issued_session: r.try_get("issued_session").map_err(db_err)?,
                })
            }

            fn refresh_row(r: &$row) -> StoreResult<RefreshToken> {
                Ok(RefreshToken {
                    id: r.try_get("id").map_err(db_err)?,
                    token_hash: required_hash(r.try_get("token_hash").map_err(db_err)?)?,
                    family_id: r.try_get("family_id").map_err(db_err)?,
                    client_id: r.try_get("client_id").map_err(db_err)?,
                    org_id: r.try_get("org_id").map_err(db_err)?,
                    user_id: r.try_get("user_id").map_err(db_err)?,
                    session_id: r.try_get("session_id").map_err(db_err)?,
                    scope: r.try_get("scope").map_err(db_err)?,
                    auth_time: r.try_get("auth_time").map_err(db_err)?,
                    amr: json_list(r.try_get("amr").map_err(db_err)?, |s| Ok(s.to_owned()), "amr")?,
                    created_at: r.try_get("created_at").map_err(db_err)?,
                    expires_at: r.try_get("expires_at").map_err(db_err)?,
                    used_at: r.try_get("used_at").map_err(db_err)?,
                    revoked_at: r.try_get("revoked_at").map_err(db_err)?,
                })
            }

            fn consent_row(r: &$row) -> StoreResult<Consent> {
                Ok(Consent {
                    user_id: r.try_get("user_id").map_err(db_err)?,
                    client_id: r.try_get("client_id").map_err(db_err)?,
                    org_id: r.try_get("org_id").map_err(db_err)?,
                    scopes: json_list(r.try_get("scopes").map_err(db_err)?, |s| Ok(s.to_owned()), "consented scopes")?,
                    granted_at: r.try_get("granted_at").map_err(db_err)?,
                })
            }

            fn logout_row(r: &$row) -> StoreResult<LogoutDelivery> {
                Ok(LogoutDelivery {
                    id: r.try_get("id").map_err(db_err)?,
                    client_id: r.try_get("client_id").map_err(db_err)?,
                    uri: r.try_get("uri").map_err(db_err)?,
                    logout_token: r.try_get("logout_token").map_err(db_err)?,
                    attempts: counter(r.try_get("attempts").map_err(db_err)?, "logout delivery attempts")?,
                    next_attempt_at: r.try_get("next_attempt_at").map_err(db_err)?,
                    created_at: r.try_get("created_at").map_err(db_err)?,
                    delivered_at: r.try_get("delivered_at").map_err(db_err)?,
                    failed_at: r.try_get("failed_at").map_err(db_err)?,
                })
            }

            fn totp_row(r: &$row) -> StoreResult<UserTotp> {
                Ok(UserTotp {
                    user_id: r.try_get("user_id").map_err(db_err)?,
                    sealed_secret: r.try_get("sealed_secret").map_err(db_err)?,
                    confirmed_at: r.try_get("confirmed_at").map_err(db_err)?,
                    last_step: r.try_get("last_step").map_err(db_err)?,
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

            /// Appends the audit row to the hash chain: the last statement of its transaction.
            async fn insert_audit(&self, conn: &mut <<$pool as PoolDb>::Db as sqlx::Database>::Connection, e: &AuditEvent) -> StoreResult<()> {
                Self::chain_audit(conn, &self.chain, e).await
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
                sqlx::query("INSERT INTO organisations (id, slug, name, allowed_domains, self_registration, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7)")
                    .bind(&o.id)
                    .bind(o.slug.as_str())
                    .bind(&o.name)
                    .bind(string_list(&o.allowed_domains)?)
                    .bind(o.self_registration)
                    .bind(o.created_at)
                    .bind(o.updated_at)
                    .execute(&mut *tx)
                    .await
                    .map_err(db_err)?;
                self.insert_audit(&mut *tx, audit).await?;
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

            async fn search_organisations(&self, query: &str, page: Page) -> StoreResult<Vec<Organisation>> {
                let (l, o) = limit(page);
                let rows = sqlx::query("SELECT * FROM organisations WHERE LOWER(slug) LIKE $1 ESCAPE '\\' OR LOWER(name) LIKE $1 ESCAPE '\\' ORDER BY slug LIMIT $2 OFFSET $3")
                    .bind(contains_pattern(query))
                    .bind(l)
                    .bind(o)
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db_err)?;
                rows.iter().map(Self::org_row).collect()
            }

            async fn set_organisation_domains(&self, org_id: &str, domains: &[String], now: UnixTime, audit: &AuditEvent) -> StoreResult<bool> {
                let mut tx = self.pool.begin().await.map_err(db_err)?;
                let n = sqlx::query("UPDATE organisations SET allowed_domains = $1, updated_at = $2 WHERE id = $3")
                    .bind(string_list(domains)?)
                    .bind(now)
                    .bind(org_id)
                    .execute(&mut *tx)
                    .await
                    .map_err(db_err)?
                    .rows_affected();
                if n == 0 {
                    return Ok(false);
                }
                self.insert_audit(&mut *tx, audit).await?;
                tx.commit().await.map_err(db_err)?;
                Ok(true)
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
                self.insert_audit(&mut *tx, audit).await?;
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
                self.insert_audit(&mut *tx, audit).await?;
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
                self.insert_audit(&mut *tx, audit).await?;
                tx.commit().await.map_err(db_err)
            }

            async fn create_application(&self, a: &Application, audit: &AuditEvent) -> StoreResult<()> {
                let mut tx = self.pool.begin().await.map_err(db_err)?;
                let q = sqlx::query("INSERT INTO applications (name, grant_types, scopes, roles, auth_method, redirect_uris, access_token_lifetime, signing_alg, enabled, secret_hash, previous_secret_hash, previous_secret_expires_at, updated_at, jwks_uri, id_token_signing_alg, first_party, post_logout_redirect_uris, backchannel_logout_uri, always_issue_refresh_token, id, org_id, slug, client_id, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22, $23, $24)");
                Self::bind_app_settings(q, a)?
                    .bind(&a.id)
                    .bind(&a.org_id)
                    .bind(a.slug.as_str())
                    .bind(a.client_id.as_str())
                    .bind(a.created_at)
                    .execute(&mut *tx)
                    .await
                    .map_err(db_err)?;
                self.insert_audit(&mut *tx, audit).await?;
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

            async fn search_applications(&self, org_id: &str, query: &str, page: Page) -> StoreResult<Vec<Application>> {
                let (l, o) = limit(page);
                let rows = sqlx::query("SELECT * FROM applications WHERE org_id = $1 AND (LOWER(slug) LIKE $2 ESCAPE '\\' OR LOWER(name) LIKE $2 ESCAPE '\\') ORDER BY slug LIMIT $3 OFFSET $4")
                    .bind(org_id)
                    .bind(contains_pattern(query))
                    .bind(l)
                    .bind(o)
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db_err)?;
                rows.iter().map(Self::app_row).collect()
            }

            async fn role_applications(&self, org_id: &str, role: &str, page: Page) -> StoreResult<Vec<Application>> {
                let (l, o) = limit(page);
                let rows = sqlx::query("SELECT * FROM applications WHERE org_id = $1 AND roles LIKE $2 ESCAPE '\\' ORDER BY slug LIMIT $3 OFFSET $4")
                    .bind(org_id)
                    .bind(role_pattern(role)?)
                    .bind(l)
                    .bind(o)
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db_err)?;
                let apps: Vec<Application> = rows.iter().map(Self::app_row).collect::<StoreResult<_>>()?;
                Ok(apps.into_iter().filter(|a| holds_role(&a.roles, role)).collect())
            }

            async fn update_application(&self, a: &Application, expected_updated_at: UnixTime, audit: &AuditEvent) -> StoreResult<()> {
                let mut tx = self.pool.begin().await.map_err(db_err)?;
                let q = sqlx::query("UPDATE applications SET name = $1, grant_types = $2, scopes = $3, roles = $4, auth_method = $5, redirect_uris = $6, access_token_lifetime = $7, signing_alg = $8, enabled = $9, secret_hash = $10, previous_secret_hash = $11, previous_secret_expires_at = $12, updated_at = $13, jwks_uri = $14, id_token_signing_alg = $15, first_party = $16, post_logout_redirect_uris = $17, backchannel_logout_uri = $18, always_issue_refresh_token = $19 WHERE id = $20 AND updated_at = $21");
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
                self.insert_audit(&mut *tx, audit).await?;
                tx.commit().await.map_err(db_err)
            }

            async fn delete_application(&self, client_id: &str, audit: &AuditEvent) -> StoreResult<bool> {
                let mut tx = self.pool.begin().await.map_err(db_err)?;
                let n = sqlx::query("DELETE FROM applications WHERE client_id = $1").bind(client_id).execute(&mut *tx).await.map_err(db_err)?.rows_affected();
                if n == 0 {
                    return Ok(false);
                }
                self.insert_audit(&mut *tx, audit).await?;
                tx.commit().await.map_err(db_err)?;
                Ok(true)
            }

            async fn create_user(&self, u: &User, audit: &AuditEvent) -> StoreResult<()> {
                let mut tx = self.pool.begin().await.map_err(db_err)?;
                Self::insert_user(&mut *tx, u).await?;
                Self::insert_user_email(&mut *tx, &UserEmail::primary_of(u)).await?;
                self.insert_audit(&mut *tx, audit).await?;
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

            async fn search_users(&self, org_id: &str, query: &str, page: Page) -> StoreResult<Vec<User>> {
                let (l, o) = limit(page);
                let rows = sqlx::query("SELECT * FROM users WHERE org_id = $1 AND (LOWER(email) LIKE $2 ESCAPE '\\' OR LOWER(name) LIKE $2 ESCAPE '\\') ORDER BY email LIMIT $3 OFFSET $4")
                    .bind(org_id)
                    .bind(contains_pattern(query))
                    .bind(l)
                    .bind(o)
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db_err)?;
                rows.iter().map(Self::user_row).collect()
            }

            async fn users_with_email(&self, email: &str, max: u32) -> StoreResult<Vec<User>> {
                let rows = sqlx::query("SELECT * FROM users WHERE email = $1 ORDER BY created_at, id LIMIT $2")
                    .bind(email)
                    .bind(i64::from(max))
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db_err)?;
                rows.iter().map(Self::user_row).collect()
            }

            async fn users_with_role(&self, org_id: &str, role: &str, max: u32) -> StoreResult<Vec<User>> {
                let rows = sqlx::query("SELECT * FROM users WHERE org_id = $1 AND enabled = $2 AND roles LIKE $3 ESCAPE '\\' ORDER BY email LIMIT $4")
                    .bind(org_id)
                    .bind(true)
                    .bind(role_pattern(role)?)
                    .bind(i64::from(max))
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db_err)?;
                let users: Vec<User> = rows.iter().map(Self::user_row).collect::<StoreResult<_>>()?;
                Ok(users.into_iter().filter(|u| holds_role(&u.roles, role)).collect())
            }

            async fn role_users(&self, org_id: &str, role: &str, page: Page) -> StoreResult<Vec<User>> {
                // Disabled users included (unlike users_with_role).
                let (l, o) = limit(page);
                let rows = sqlx::query("SELECT * FROM users WHERE org_id = $1 AND roles LIKE $2 ESCAPE '\\' ORDER BY email LIMIT $3 OFFSET $4")
                    .bind(org_id)
                    .bind(role_pattern(role)?)
                    .bind(l)
                    .bind(o)
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db_err)?;
                let users: Vec<User> = rows.iter().map(Self::user_row).collect::<StoreResult<_>>()?;
                Ok(users.into_iter().filter(|u| holds_role(&u.roles, role)).collect())
            }

            async fn update_user(&self, u: &User, expected_updated_at: UnixTime, end_sessions: bool, audit: &AuditEvent) -> StoreResult<()> {
                let mut tx = self.pool.begin().await.map_err(db_err)?;
                let n = sqlx::query("UPDATE users SET email = $1, name = $2, password_hash = $3, roles = $4, enabled = $5, failed_logins = $6, locked_until = $7, updated_at = $8 WHERE id = $9 AND org_id = $10 AND updated_at = $11")
                    .bind(u.email.as_str())
                    .bind(&u.name)
                    .bind(&u.password_hash)
                    .bind(to_json(&u.roles))
                    .bind(u.enabled)
                    .bind(i64::from(u.failed_logins))
                    .bind(u.locked_until)
                    .bind(u.updated_at)
                    .bind(&u.id)
                    .bind(&u.org_id)
                    .bind(expected_updated_at)
                    .execute(&mut *tx)
                    .await
                    .map_err(db_err)?
                    .rows_affected();
                if n != 1 {
                    return Err(StoreError::Conflict("user was changed concurrently".into()));
                }
                // The primary address is always one of the user's addresses.
                let owned = sqlx::query("SELECT 1 FROM user_emails WHERE user_id = $1 AND email = $2")
                    .bind(&u.id)
                    .bind(u.email.as_str())
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(db_err)?;
                if owned.is_none() {
                    return Err(StoreError::Conflict("the user's email is not one of its addresses".into()));
                }
                if end_sessions {
                    Self::revoke_sessions_of(&mut *tx, &u.id, u.updated_at).await?;
                }
                self.insert_audit(&mut *tx, audit).await?;
                tx.commit().await.map_err(db_err)
            }

            async fn set_login_failures(&self, user_id: &str, failed_logins: u32, locked_until: Option<UnixTime>, audit: &AuditEvent) -> StoreResult<()> {
                let mut tx = self.pool.begin().await.map_err(db_err)?;
                sqlx::query("UPDATE users SET failed_logins = $1, locked_until = $2 WHERE id = $3")
                    .bind(i64::from(failed_logins))
                    .bind(locked_until)
                    .bind(user_id)
                    .execute(&mut *tx)
                    .await
                    .map_err(db_err)?;
                self.insert_audit(&mut *tx, audit).await?;
                tx.commit().await.map_err(db_err)
            }

            async fn record_login_failure(&self, user_id: &str, now: UnixTime, threshold: u32, lock_until: UnixTime, audit: &AuditEvent) -> StoreResult<Option<(u32, Option<UnixTime>)>> {
                let mut tx = self.pool.begin().await.map_err(db_err)?;
                // Every right-hand side sees the row as it was: one atomic step per failure.
                let row = sqlx::query(
                    "UPDATE users SET \
                       failed_logins = CASE WHEN locked_until IS NOT NULL AND locked_until <= $2 THEN 1 ELSE failed_logins + 1 END, \
                       locked_until = CASE \
                         WHEN locked_until IS NOT NULL AND locked_until > $2 THEN locked_until \
                         WHEN (CASE WHEN locked_until IS NOT NULL AND locked_until <= $2 THEN 1 ELSE failed_logins + 1 END) >= $3 THEN $4 \
                         ELSE NULL END \
                     WHERE id = $1 RETURNING failed_logins, locked_until",
                )
                .bind(user_id)
                .bind(now)
                .bind(i64::from(threshold))
                .bind(lock_until)
                .fetch_optional(&mut *tx)
                .await
                .map_err(db_err)?;
                let Some(row) = row else { return Ok(None) };
                let failures: i32 = row.try_get("failed_logins").map_err(db_err)?;
                let failures = u32::try_from(failures).map_err(|_| corrupt("failed_logins"))?;
                let locked: Option<UnixTime> = row.try_get("locked_until").map_err(db_err)?;
                self.insert_audit(&mut *tx, audit).await?;
                tx.commit().await.map_err(db_err)?;
                Ok(Some((failures, locked)))
            }

            async fn delete_user(&self, org_id: &str, id: &str, audit: &AuditEvent) -> StoreResult<bool> {
                let mut tx = self.pool.begin().await.map_err(db_err)?;
                // Explicit (the foreign keys cascade too), and scoped to the organisation: a user id
                // of another organisation deletes nothing.
                for sql in [
                    "DELETE FROM verifications WHERE user_id = $1 AND org_id = $2",
                    "DELETE FROM authorization_codes WHERE user_id = $1 AND org_id = $2",
                    "DELETE FROM refresh_tokens WHERE user_id = $1 AND org_id = $2",
                    "DELETE FROM consents WHERE user_id = $1 AND org_id = $2",
                    "DELETE FROM user_totp WHERE user_id = $1 AND EXISTS (SELECT 1 FROM users u WHERE u.id = $1 AND u.org_id = $2)",
                    "DELETE FROM session_clients WHERE session_id IN (SELECT s.id FROM sessions s WHERE s.user_id = $1 AND s.org_id = $2)",
                    "DELETE FROM sessions WHERE user_id = $1 AND org_id = $2",
                    "DELETE FROM api_keys WHERE user_id = $1 AND org_id = $2",
                    "DELETE FROM user_emails WHERE user_id = $1 AND org_id = $2",
                ] {
                    sqlx::query(sql).bind(id).bind(org_id).execute(&mut *tx).await.map_err(db_err)?;
                }
                let n = sqlx::query("DELETE FROM users WHERE id = $1 AND org_id = $2").bind(id).bind(org_id).execute(&mut *tx).await.map_err(db_err)?.rows_affected();
                if n == 0 {
                    return Ok(false);
                }
                self.insert_audit(&mut *tx, audit).await?;
                tx.commit().await.map_err(db_err)?;
                Ok(true)
            }

            async fn user_emails(&self, user_id: &str) -> StoreResult<Vec<UserEmail>> {
                let rows = sqlx::query("SELECT * FROM user_emails WHERE user_id = $1 ORDER BY created_at, id").bind(user_id).fetch_all(&self.pool).await.map_err(db_err)?;
                rows.iter().map(Self::user_email_row).collect()
            }

            async fn add_user_email(&self, e: &UserEmail, v: &Verification, mail: &QueuedMail, audit: &AuditEvent) -> StoreResult<()> {
                let mut tx = self.pool.begin().await.map_err(db_err)?;
                Self::insert_user_email(&mut *tx, e).await?;
                Self::insert_verification(&mut *tx, v).await?;
                Self::insert_mail(&mut *tx, mail).await?;
                self.insert_audit(&mut *tx, audit).await?;
                tx.commit().await.map_err(db_err)
            }

            async fn set_primary_email(&self, user_id: &str, email_id: &str, now: UnixTime, audit: &AuditEvent) -> StoreResult<bool> {
                let mut tx = self.pool.begin().await.map_err(db_err)?;
                let n = sqlx::query(
                    "UPDATE users SET email = (SELECT e.email FROM user_emails e WHERE e.id = $1 AND e.user_id = $2 AND e.verified_at IS NOT NULL), updated_at = $3 \
                     WHERE id = $2 AND EXISTS (SELECT 1 FROM user_emails e WHERE e.id = $1 AND e.user_id = $2 AND e.verified_at IS NOT NULL)",
                )
                .bind(email_id)
                .bind(user_id)
                .bind(now)
                .execute(&mut *tx)
                .await
                .map_err(db_err)?
                .rows_affected();
                if n == 0 {
                    return Ok(false);
                }
                self.insert_audit(&mut *tx, audit).await?;
                tx.commit().await.map_err(db_err)?;
                Ok(true)
            }

            async fn remove_user_email(&self, user_id: &str, email_id: &str, audit: &AuditEvent) -> StoreResult<bool> {
                let mut tx = self.pool.begin().await.map_err(db_err)?;
                let n = sqlx::query("DELETE FROM user_emails WHERE id = $1 AND user_id = $2 AND email <> (SELECT u.email FROM users u WHERE u.id = $2)")
                    .bind(email_id)
                    .bind(user_id)
                    .execute(&mut *tx)
                    .await
                    .map_err(db_err)?
                    .rows_affected();
                if n == 0 {
                    return Ok(false);
                }
                // A code still on its way for the removed address must not verify anything.
                sqlx::query("DELETE FROM verifications WHERE purpose = 'email' AND subject_id = $1 AND user_id = $2")
                    .bind(email_id)
                    .bind(user_id)
                    .execute(&mut *tx)
                    .await
                    .map_err(db_err)?;
                self.insert_audit(&mut *tx, audit).await?;
                tx.commit().await.map_err(db_err)?;
                Ok(true)
            }

            async fn create_session(&self, session: &Session, v: &Verification, mail: Option<&QueuedMail>, audit: &AuditEvent) -> StoreResult<()> {
                let mut tx = self.pool.begin().await.map_err(db_err)?;
                Self::insert_session(&mut *tx, session).await?;
                Self::insert_verification(&mut *tx, v).await?;
                if let Some(mail) = mail {
                    Self::insert_mail(&mut *tx, mail).await?;
                }
                self.insert_audit(&mut *tx, audit).await?;
                tx.commit().await.map_err(db_err)
            }

            async fn session(&self, id: &str) -> StoreResult<Option<Session>> {
                let r = sqlx::query("SELECT * FROM sessions WHERE id = $1").bind(id).fetch_optional(&self.pool).await.map_err(db_err)?;
                r.as_ref().map(Self::session_row).transpose()
            }

            async fn session_by_token(&self, token_hash: &SecretHash) -> StoreResult<Option<Session>> {
                let r = sqlx::query("SELECT * FROM sessions WHERE token_hash = $1").bind(token_hash.0.to_vec()).fetch_optional(&self.pool).await.map_err(db_err)?;
                r.as_ref().map(Self::session_row).transpose()
            }

            async fn user_sessions(&self, user_id: &str, page: Page) -> StoreResult<Vec<Session>> {
                let (l, o) = limit(page);
                let rows = sqlx::query("SELECT * FROM sessions WHERE user_id = $1 ORDER BY created_at DESC, id DESC LIMIT $2 OFFSET $3").bind(user_id).bind(l).bind(o).fetch_all(&self.pool).await.map_err(db_err)?;
                rows.iter().map(Self::session_row).collect()
            }

            async fn touch_session(&self, id: &str, now: UnixTime) -> StoreResult<()> {
                sqlx::query("UPDATE sessions SET last_used_at = $1 WHERE id = $2").bind(now).bind(id).execute(&self.pool).await.map_err(db_err)?;
                Ok(())
            }

            async fn rotate_session_token(&self, id: &str, old: &SecretHash, new: &SecretHash, now: UnixTime, audit: &AuditEvent) -> StoreResult<bool> {
                let mut tx = self.pool.begin().await.map_err(db_err)?;
                let n = sqlx::query("UPDATE sessions SET token_hash = $1, last_used_at = $2 WHERE id = $3 AND token_hash = $4 AND state = 'active'")
                    .bind(new.0.to_vec())
                    .bind(now)
                    .bind(id)
                    .bind(old.0.to_vec())
                    .execute(&mut *tx)
                    .await
                    .map_err(db_err)?
                    .rows_affected();
                if n == 0 {
                    return Ok(false);
                }
                self.insert_audit(&mut *tx, audit).await?;
                tx.commit().await.map_err(db_err)?;
                Ok(true)
            }

            async fn revoke_session(&self, id: &str, now: UnixTime, audit: &AuditEvent) -> StoreResult<bool> {
                let mut tx = self.pool.begin().await.map_err(db_err)?;
                let n = sqlx::query("UPDATE sessions SET state = 'revoked', revoked_at = $1 WHERE id = $2 AND state IN ('pending', 'active')")
                    .bind(now)
                    .bind(id)
                    .execute(&mut *tx)
                    .await
                    .map_err(db_err)?
                    .rows_affected();
                if n == 0 {
                    return Ok(false);
                }
                self.insert_audit(&mut *tx, audit).await?;
                tx.commit().await.map_err(db_err)?;
                Ok(true)
            }

            async fn revoke_user_sessions(&self, user_id: &str, now: UnixTime, audit: &AuditEvent) -> StoreResult<u64> {
                let mut tx = self.pool.begin().await.map_err(db_err)?;
                let n = Self::revoke_sessions_of(&mut *tx, user_id, now).await?;
                self.insert_audit(&mut *tx, audit).await?;
                tx.commit().await.map_err(db_err)?;
                Ok(n)
            }

            async fn purge_sessions(&self, before: UnixTime) -> StoreResult<u64> {
                let r = sqlx::query("DELETE FROM sessions WHERE expires_at < $1 OR (state = 'revoked' AND revoked_at < $1)").bind(before).execute(&self.pool).await.map_err(db_err)?;
                Ok(r.rows_affected())
            }

            async fn create_api_key(&self, k: &ApiKey, v: &Verification, mail: &QueuedMail, audit: &AuditEvent) -> StoreResult<()> {
                let mut tx = self.pool.begin().await.map_err(db_err)?;
                sqlx::query("INSERT INTO api_keys (id, org_id, user_id, name, api_key, secret_hash, roles, state, expires_at, last_used_at, created_at, revoked_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)")
                    .bind(&k.id)
                    .bind(&k.org_id)
                    .bind(&k.user_id)
                    .bind(&k.name)
                    .bind(&k.key)
                    .bind(k.secret_hash.0.to_vec())
                    .bind(to_json(&k.roles))
                    .bind(k.state.as_str())
                    .bind(k.expires_at)
                    .bind(k.last_used_at)
                    .bind(k.created_at)
                    .bind(k.revoked_at)
                    .execute(&mut *tx)
                    .await
                    .map_err(db_err)?;
                Self::insert_verification(&mut *tx, v).await?;
                Self::insert_mail(&mut *tx, mail).await?;
                self.insert_audit(&mut *tx, audit).await?;
                tx.commit().await.map_err(db_err)
            }

            async fn api_key(&self, org_id: &str, id: &str) -> StoreResult<Option<ApiKey>> {
                let r = sqlx::query("SELECT * FROM api_keys WHERE org_id = $1 AND id = $2").bind(org_id).bind(id).fetch_optional(&self.pool).await.map_err(db_err)?;
                r.as_ref().map(Self::api_key_row).transpose()
            }

            async fn api_key_by_key(&self, key: &str) -> StoreResult<Option<ApiKey>> {
                let r = sqlx::query("SELECT * FROM api_keys WHERE api_key = $1").bind(key).fetch_optional(&self.pool).await.map_err(db_err)?;
                r.as_ref().map(Self::api_key_row).transpose()
            }

            async fn api_keys(&self, org_id: &str, user_id: Option<&str>, page: Page) -> StoreResult<Vec<ApiKey>> {
                let (l, o) = limit(page);
                let rows = match user_id {
                    Some(user) => sqlx::query("SELECT * FROM api_keys WHERE org_id = $1 AND user_id = $2 ORDER BY created_at DESC, id DESC LIMIT $3 OFFSET $4").bind(org_id).bind(user).bind(l).bind(o).fetch_all(&self.pool).await,
                    None => sqlx::query("SELECT * FROM api_keys WHERE org_id = $1 ORDER BY created_at DESC, id DESC LIMIT $2 OFFSET $3").bind(org_id).bind(l).bind(o).fetch_all(&self.pool).await,
                }
                .map_err(db_err)?;
                rows.iter().map(Self::api_key_row).collect()
            }

            async fn search_user_api_keys(&self, org_id: &str, user_id: &str, query: &str, page: Page) -> StoreResult<Vec<ApiKey>> {
                let (l, o) = limit(page);
                let rows = sqlx::query("SELECT * FROM api_keys WHERE org_id = $1 AND user_id = $2 AND (LOWER(name) LIKE $3 ESCAPE '\\' OR api_key LIKE $4 ESCAPE '\\') ORDER BY created_at DESC, id DESC LIMIT $5 OFFSET $6")
                    .bind(org_id)
                    .bind(user_id)
                    .bind(contains_pattern(query))
                    .bind(prefix_pattern(query))
                    .bind(l)
                    .bind(o)
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db_err)?;
                rows.iter().map(Self::api_key_row).collect()
            }

            async fn touch_api_key(&self, id: &str, now: UnixTime) -> StoreResult<()> {
                sqlx::query("UPDATE api_keys SET last_used_at = $1 WHERE id = $2").bind(now).bind(id).execute(&self.pool).await.map_err(db_err)?;
                Ok(())
            }

            async fn revoke_api_key(&self, id: &str, now: UnixTime, audit: &AuditEvent) -> StoreResult<bool> {
                let mut tx = self.pool.begin().await.map_err(db_err)?;
                let n = sqlx::query("UPDATE api_keys SET state = 'revoked', revoked_at = $1 WHERE id = $2 AND state IN ('pending', 'active')")
                    .bind(now)
                    .bind(id)
                    .execute(&mut *tx)
                    .await
                    .map_err(db_err)?
                    .rows_affected();
                if n == 0 {
                    return Ok(false);
                }
                self.insert_audit(&mut *tx, audit).await?;
                tx.commit().await.map_err(db_err)?;
                Ok(true)
            }

            async fn create_verification(&self, v: &Verification, mail: &QueuedMail, audit: &AuditEvent) -> StoreResult<()> {
                let mut tx = self.pool.begin().await.map_err(db_err)?;
                Self::insert_verification(&mut *tx, v).await?;
                Self::insert_mail(&mut *tx, mail).await?;
                self.insert_audit(&mut *tx, audit).await?;
                tx.commit().await.map_err(db_err)
            }

            async fn verification(&self, id: &str) -> StoreResult<Option<Verification>> {
                let r = sqlx::query("SELECT * FROM verifications WHERE id = $1").bind(id).fetch_optional(&self.pool).await.map_err(db_err)?;
                r.as_ref().map(Self::verification_row).transpose()
            }

            async fn count_verification_attempt(&self, id: &str) -> StoreResult<Option<u32>> {
                let mut tx = self.pool.begin().await.map_err(db_err)?;
                let n = sqlx::query("UPDATE verifications SET attempts = attempts + 1 WHERE id = $1 AND consumed_at IS NULL")
                    .bind(id)
                    .execute(&mut *tx)
                    .await
                    .map_err(db_err)?
                    .rows_affected();
                if n == 0 {
                    return Ok(None);
                }
                let r = sqlx::query("SELECT attempts FROM verifications WHERE id = $1").bind(id).fetch_one(&mut *tx).await.map_err(db_err)?;
                let attempts = counter(r.try_get("attempts").map_err(db_err)?, "verification attempts")?;
                tx.commit().await.map_err(db_err)?;
                Ok(Some(attempts))
            }

            async fn consume_verification(&self, id: &str, now: UnixTime, effect: &VerificationEffect, audit: &AuditEvent) -> StoreResult<bool> {
                let mut tx = self.pool.begin().await.map_err(db_err)?;
                let n = sqlx::query("UPDATE verifications SET consumed_at = $1, sealed_token = NULL WHERE id = $2 AND consumed_at IS NULL")
                    .bind(now)
                    .bind(id)
                    .execute(&mut *tx)
                    .await
                    .map_err(db_err)?
                    .rows_affected();
                if n == 0 {
                    return Ok(false);
                }
                match effect {
                    VerificationEffect::ActivateSession { session_id } => {
                        sqlx::query("UPDATE sessions SET state = 'active', verified_at = $1, last_used_at = $1 WHERE id = $2 AND state = 'pending'")
                            .bind(now)
                            .bind(session_id)
                            .execute(&mut *tx)
                            .await
                            .map_err(db_err)?;
                        // The code reached the user's primary address: it is verified now.
                        sqlx::query(
                            "UPDATE user_emails SET verified_at = COALESCE(verified_at, $1) \
                             WHERE user_id = (SELECT s.user_id FROM sessions s WHERE s.id = $2) \
                             AND email = (SELECT u.email FROM users u JOIN sessions s ON s.user_id = u.id WHERE s.id = $2)",
                        )
                        .bind(now)
                        .bind(session_id)
                        .execute(&mut *tx)
                        .await
                        .map_err(db_err)?;
                    }
                    VerificationEffect::ActivateApiKey { key_id } => {
                        sqlx::query("UPDATE api_keys SET state = 'active' WHERE id = $1 AND state = 'pending'").bind(key_id).execute(&mut *tx).await.map_err(db_err)?;
                    }
                    VerificationEffect::VerifyEmail { email_id } => {
                        sqlx::query("UPDATE user_emails SET verified_at = $1 WHERE id = $2").bind(now).bind(email_id).execute(&mut *tx).await.map_err(db_err)?;
                    }
                    VerificationEffect::ResetPassword { user_id, password_hash } => {
                        sqlx::query("UPDATE users SET password_hash = $1, failed_logins = 0, locked_until = NULL, updated_at = $2 WHERE id = $3")
                            .bind(password_hash)
                            .bind(now)
                            .bind(user_id)
                            .execute(&mut *tx)
                            .await
                            .map_err(db_err)?;
                        Self::revoke_sessions_of(&mut *tx, user_id, now).await?;
                        // An account being recovered may have been compromised: its keys go too.
                        sqlx::query("UPDATE api_keys SET state = 'revoked', revoked_at = $1 WHERE user_id = $2 AND state IN ('pending', 'active')")
                            .bind(now)
                            .bind(user_id)
                            .execute(&mut *tx)
                            .await
                            .map_err(db_err)?;
                    }
                    VerificationEffect::AcceptInvite { user_id, email_id, password_hash } => {
                        sqlx::query("UPDATE users SET password_hash = $1, failed_logins = 0, locked_until = NULL, updated_at = $2 WHERE id = $3")
                            .bind(password_hash)
                            .bind(now)
                            .bind(user_id)
                            .execute(&mut *tx)
                            .await
                            .map_err(db_err)?;
                        // The link reached the address: verified, if it is the user's.
                        sqlx::query("UPDATE user_emails SET verified_at = $1 WHERE id = $2 AND user_id = $3")
                            .bind(now)
                            .bind(email_id)
                            .bind(user_id)
                            .execute(&mut *tx)
                            .await
                            .map_err(db_err)?;
                    }
                }
                self.insert_audit(&mut *tx, audit).await?;
                tx.commit().await.map_err(db_err)?;
                Ok(true)
            }

            async fn cancel_verifications(&self, user_id: &str, purpose: VerificationPurpose, now: UnixTime) -> StoreResult<u64> {
                let r = sqlx::query("UPDATE verifications SET consumed_at = $1, sealed_token = NULL WHERE user_id = $2 AND purpose = $3 AND consumed_at IS NULL")
                    .bind(now)
                    .bind(user_id)
                    .bind(purpose.as_str())
                    .execute(&self.pool)
                    .await
                    .map_err(db_err)?;
                Ok(r.rows_affected())
            }

            async fn purge_verifications(&self, before: UnixTime) -> StoreResult<u64> {
                let r = sqlx::query("DELETE FROM verifications WHERE expires_at < $1").bind(before).execute(&self.pool).await.map_err(db_err)?;
                Ok(r.rows_affected())
            }

            async fn purge_api_keys(&self, before: UnixTime) -> StoreResult<u64> {
                let r = sqlx::query("DELETE FROM api_keys WHERE (state = 'revoked' AND revoked_at < $1) OR expires_at < $1 OR (state = 'pending' AND created_at < $1)")
                    .bind(before)
                    .execute(&self.pool)
                    .await
                    .map_err(db_err)?;
                Ok(r.rows_affected())
            }

            async fn purge_sent_mail(&self, before: UnixTime) -> StoreResult<u64> {
                let r = sqlx::query("DELETE FROM mail_queue WHERE sent_at IS NOT NULL AND sent_at < $1").bind(before).execute(&self.pool).await.map_err(db_err)?;
                Ok(r.rows_affected())
            }

            async fn enqueue_mail(&self, mail: &QueuedMail) -> StoreResult<()> {
                Self::insert_mail(&self.pool, mail).await
            }

            async fn due_mail(&self, now: UnixTime, max: u32) -> StoreResult<Vec<QueuedMail>> {
                let rows = sqlx::query("SELECT * FROM mail_queue WHERE sent_at IS NULL AND next_attempt_at <= $1 ORDER BY created_at, id LIMIT $2")
                    .bind(now)
                    .bind(i64::from(max))
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db_err)?;
                rows.iter().map(Self::mail_row).collect()
            }

            async fn mail_sent(&self, id: &str, now: UnixTime) -> StoreResult<()> {
                sqlx::query("UPDATE mail_queue SET sent_at = $1, sealed_body = $2 WHERE id = $3")
                    .bind(now)
                    .bind(Vec::<u8>::new())
                    .bind(id)
                    .execute(&self.pool)
                    .await
                    .map_err(db_err)?;
                Ok(())
            }

            async fn mail_failed(&self, id: &str, attempts: u32, next_attempt_at: UnixTime, error: &str) -> StoreResult<()> {
                sqlx::query("UPDATE mail_queue SET attempts = $1, next_attempt_at = $2, last_error = $3 WHERE id = $4 AND sent_at IS NULL")
                    .bind(i64::from(attempts))
                    .bind(next_attempt_at)
                    .bind(error)
                    .bind(id)
                    .execute(&self.pool)
                    .await
                    .map_err(db_err)?;
                Ok(())
            }

            async fn pending_mail_count(&self) -> StoreResult<u64> {
                let r = sqlx::query("SELECT COUNT(*) AS n FROM mail_queue WHERE sent_at IS NULL").fetch_one(&self.pool).await.map_err(db_err)?;
                u64::try_from(r.try_get::<i64, _>("n").map_err(db_err)?).map_err(|_| corrupt("mail count"))
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
                self.insert_audit(&mut *tx, audit).await?;
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
                self.insert_audit(&mut *tx, audit).await?;
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
                    Self::insert_ca(&mut *tx, c, c.active).await?;
                }
                self.insert_audit(&mut *tx, audit).await?;
                tx.commit().await.map_err(db_err)
            }

            async fn activate_ca_certificates(&self, certs: &[CaCertificate], audit: &AuditEvent) -> StoreResult<()> {
                let mut tx = self.pool.begin().await.map_err(db_err)?;
                // Writes first: a SQLite transaction that read before writing could not wait for the lock.
                let mut kinds: Vec<CaKind> = Vec::new();
                for c in certs {
                    if !kinds.contains(&c.kind) {
                        kinds.push(c.kind);
                    }
                }
                for kind in kinds {
                    sqlx::query("UPDATE ca_certificates SET active = $1 WHERE kind = $2 AND active = $3")
                        .bind(false)
                        .bind(kind.as_str())
                        .bind(true)
                        .execute(&mut *tx)
                        .await
                        .map_err(db_err)?;
                }
                for c in certs {
                    Self::insert_ca(&mut *tx, c, true).await?;
                }
                self.insert_audit(&mut *tx, audit).await?;
                tx.commit().await.map_err(db_err)
            }

            async fn promote_issuing_ca(&self, id: &str, audit: &AuditEvent) -> StoreResult<()> {
                let mut tx = self.pool.begin().await.map_err(db_err)?;
                // The promotion first: it is the write that decides between racing nodes.
                let n = sqlx::query("UPDATE ca_certificates SET active = $1 WHERE id = $2 AND kind = $3 AND active = $4")
                    .bind(true)
                    .bind(id)
                    .bind(CaKind::Issuing.as_str())
                    .bind(false)
                    .execute(&mut *tx)
                    .await
                    .map_err(db_err)?
                    .rows_affected();
                if n != 1 {
                    return Err(StoreError::Conflict(format!("issuing CA {id} is not a staged successor")));
                }
                sqlx::query("UPDATE ca_certificates SET active = $1 WHERE kind = $2 AND active = $3 AND id <> $4")
                    .bind(false)
                    .bind(CaKind::Issuing.as_str())
                    .bind(true)
                    .bind(id)
                    .execute(&mut *tx)
                    .await
                    .map_err(db_err)?;
                self.insert_audit(&mut *tx, audit).await?;
                tx.commit().await.map_err(db_err)
            }

            async fn insert_certificate(&self, c: &IssuedCertificate, audit: &AuditEvent) -> StoreResult<()> {
                self.store_certificate(c, audit).await
            }

            async fn certificate(&self, org_id: &str, id: &str) -> StoreResult<Option<IssuedCertificate>> {
                let r = sqlx::query("SELECT * FROM certificates WHERE org_id = $1 AND id = $2").bind(org_id).bind(id).fetch_optional(&self.pool).await.map_err(db_err)?;
                r.as_ref().map(Self::cert_row).transpose()
            }

            async fn certificate_by_fingerprint(&self, fingerprint: &str) -> StoreResult<Option<IssuedCertificate>> {
                let r = sqlx::query("SELECT * FROM certificates WHERE fingerprint = $1").bind(fingerprint).fetch_optional(&self.pool).await.map_err(db_err)?;
                r.as_ref().map(Self::cert_row).transpose()
            }

            async fn certificates(&self, org_id: &str, f: &CertificateFilter, page: Page) -> StoreResult<Vec<IssuedCertificate>> {
                let (l, o) = limit(page);
                let rows = sqlx::query(
                    "SELECT * FROM certificates WHERE org_id = $1 \
                     AND ($2 IS NULL OR app_id = $2) AND ($3 IS NULL OR cert_type = $3) AND ($4 IS NULL OR serial = $4) \
                     AND ($5 IS NULL OR fingerprint = $5) AND ($6 IS NULL OR spki_sha256 = $6) AND ($7 IS NULL OR not_after < $7) \
                     AND ($8 IS NULL \
                          OR ($8 = 'active' AND revoked_at IS NULL AND not_after > $9) \
                          OR ($8 = 'revoked' AND revoked_at IS NOT NULL) \
                          OR ($8 = 'expired' AND revoked_at IS NULL AND not_after <= $9)) \
                     ORDER BY created_at DESC, id DESC LIMIT $10 OFFSET $11",
                )
                .bind(org_id)
                .bind(f.app_id.as_deref())
                .bind(f.cert_type.map(CertificateType::as_str))
                .bind(f.serial.as_deref())
                .bind(f.fingerprint.as_deref())
                .bind(f.spki_sha256.as_deref())
                .bind(f.expires_before)
                .bind(f.status.map(CertificateStatus::as_str))
                .bind(f.now)
                .bind(l)
                .bind(o)
                .fetch_all(&self.pool)
                .await
                .map_err(db_err)?;
                rows.iter().map(Self::cert_row).collect()
            }

            async fn active_signing_certificates(&self, app_id: &str, now: UnixTime) -> StoreResult<Vec<IssuedCertificate>> {
                let rows = sqlx::query(
                    "SELECT * FROM certificates WHERE app_id = $1 AND cert_type = $2 AND revoked_at IS NULL AND not_after > $3 \
                     ORDER BY created_at DESC, id DESC",
                )
                .bind(app_id)
                .bind(CertificateType::Signing.as_str())
                .bind(now)
                .fetch_all(&self.pool)
                .await
                .map_err(db_err)?;
                rows.iter().map(Self::cert_row).collect()
            }

            async fn revoke_certificate(&self, id: &str, reason: RevocationReason, at: UnixTime, mails: &[QueuedMail], audit: &AuditEvent) -> StoreResult<bool> {
                let mut tx = self.pool.begin().await.map_err(db_err)?;
                // Conditional: of concurrent revocations exactly one changes the row.
                let n = sqlx::query("UPDATE certificates SET revoked_at = $1, revocation_reason = $2 WHERE id = $3 AND revoked_at IS NULL")
                    .bind(at)
                    .bind(reason.as_str())
                    .bind(id)
                    .execute(&mut *tx)
                    .await
                    .map_err(db_err)?
                    .rows_affected();
                if n == 0 {
                    return Ok(false);
                }
                for m in mails {
                    Self::insert_mail(&mut *tx, m).await?;
                }
                self.insert_audit(&mut *tx, audit).await?;
                tx.commit().await.map_err(db_err)?;
                Ok(true)
            }

            async fn revoked_certificates(&self, issuer_id: &str) -> StoreResult<Vec<RevokedEntry>> {
                let rows = sqlx::query("SELECT serial, revoked_at, revocation_reason FROM certificates WHERE issuer_id = $1 AND revoked_at IS NOT NULL ORDER BY serial")
                    .bind(issuer_id)
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db_err)?;
                rows.iter()
                    .map(|r| {
                        Ok(RevokedEntry {
                            serial: r.try_get("serial").map_err(db_err)?,
                            revoked_at: r.try_get::<Option<UnixTime>, _>("revoked_at").map_err(db_err)?.ok_or_else(|| corrupt("revocation time"))?,
                            reason: revocation_reason(r.try_get::<Option<&str>, _>("revocation_reason").map_err(db_err)?.ok_or_else(|| corrupt("revocation reason"))?)?,
                        })
                    })
                    .collect()
            }

            async fn next_crl_number(&self, issuer_id: &str) -> StoreResult<u64> {
                // One statement: an insert or an increment, atomic on both backends.
                let r = sqlx::query(
                    "INSERT INTO crl_numbers (issuer_id, last_number) VALUES ($1, 1) \
                     ON CONFLICT (issuer_id) DO UPDATE SET last_number = crl_numbers.last_number + 1 RETURNING last_number",
                )
                .bind(issuer_id)
                .fetch_one(&self.pool)
                .await
                .map_err(db_err)?;
                u64::try_from(r.try_get::<i64, _>("last_number").map_err(db_err)?).map_err(|_| corrupt("CRL number"))
            }

            async fn save_crl(&self, c: &StoredCrl) -> StoreResult<()> {
                sqlx::query(
                    "INSERT INTO crls (issuer_id, number, this_update, next_update, der) VALUES ($1, $2, $3, $4, $5) \
                     ON CONFLICT (issuer_id) DO UPDATE SET number = excluded.number, this_update = excluded.this_update, \
                     next_update = excluded.next_update, der = excluded.der WHERE crls.number < excluded.number",
                )
                .bind(&c.issuer_id)
                .bind(to_bigint(c.number, "CRL number")?)
                .bind(c.this_update)
                .bind(c.next_update)
                .bind(&c.der)
                .execute(&self.pool)
                .await
                .map_err(db_err)?;
                Ok(())
            }

            async fn crls(&self) -> StoreResult<Vec<StoredCrl>> {
                let rows = sqlx::query("SELECT * FROM crls ORDER BY issuer_id").fetch_all(&self.pool).await.map_err(db_err)?;
                rows.iter().map(Self::crl_row).collect()
            }

            async fn crl_numbers(&self) -> StoreResult<Vec<(String, u64)>> {
                let rows = sqlx::query("SELECT issuer_id, number FROM crls ORDER BY issuer_id")
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db_err)?;
                rows.iter()
                    .map(|r| {
                        let n = r.try_get::<i64, _>("number").map_err(db_err)?;
                        Ok((r.try_get("issuer_id").map_err(db_err)?, u64::try_from(n).map_err(|_| corrupt("CRL number"))?))
                    })
                    .collect()
            }

            async fn certificates_expiring(&self, now: UnixTime, before: UnixTime, max: u32) -> StoreResult<Vec<IssuedCertificate>> {
                let rows = sqlx::query(
                    "SELECT * FROM certificates WHERE revoked_at IS NULL AND expiry_notified_at IS NULL AND not_after > $1 AND not_after < $2 \
                     ORDER BY not_after, id LIMIT $3",
                )
                .bind(now)
                .bind(before)
                .bind(i64::from(max))
                .fetch_all(&self.pool)
                .await
                .map_err(db_err)?;
                rows.iter().map(Self::cert_row).collect()
            }

            async fn mark_expiry_notified(&self, id: &str, now: UnixTime, mails: &[QueuedMail]) -> StoreResult<()> {
                let mut tx = self.pool.begin().await.map_err(db_err)?;
                // Once: when two nodes warn about the same certificate, only the first queues mail.
                let n = sqlx::query("UPDATE certificates SET expiry_notified_at = $1 WHERE id = $2 AND expiry_notified_at IS NULL")
                    .bind(now)
                    .bind(id)
                    .execute(&mut *tx)
                    .await
                    .map_err(db_err)?
                    .rows_affected();
                if n == 0 {
                    return Ok(());
                }
                for m in mails {
                    Self::insert_mail(&mut *tx, m).await?;
                }
                tx.commit().await.map_err(db_err)
            }

            async fn record_assertion_jti(&self, client_id: &str, jti: &str, expires_at: UnixTime) -> StoreResult<bool> {
                let r = sqlx::query("INSERT INTO assertion_jtis (client_id, jti, expires_at) VALUES ($1, $2, $3) ON CONFLICT (client_id, jti) DO NOTHING")
                    .bind(client_id)
                    .bind(jti)
                    .bind(expires_at)
                    .execute(&self.pool)
                    .await
                    .map_err(db_err)?;
                Ok(r.rows_affected() == 1)
            }

            async fn purge_assertion_jtis(&self, now: UnixTime) -> StoreResult<u64> {
                let r = sqlx::query("DELETE FROM assertion_jtis WHERE expires_at < $1").bind(now).execute(&self.pool).await.map_err(db_err)?;
                Ok(r.rows_affected())
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
                self.insert_audit(&mut *tx, audit).await?;
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

            // ---- audit chain, backup and restore (audit.rs, backup.rs) ---------------------

            async fn start_audit_chain(&self, key: portcullis_core::audit_chain::AuditChainKey) -> StoreResult<()> {
                self.start_chain(key).await
            }

            async fn scan_audit_chain(&self, visitor: &mut (dyn portcullis_core::audit_chain::AuditChainVisitor + Send)) -> StoreResult<()> {
                self.scan_chain(visitor).await
            }

            async fn backup(&self, out: &mut (dyn std::io::Write + Send)) -> StoreResult<BackupSummary> {
                self.backup_to(out).await
            }

            async fn restore(&self, input: &mut (dyn std::io::BufRead + Send), replace: bool) -> StoreResult<BackupSummary> {
                self.restore_from(input, replace).await
            }

            async fn append_audit(&self, event: &AuditEvent) -> StoreResult<()> {
                let mut tx = self.pool.begin().await.map_err(db_err)?;
                self.insert_audit(&mut *tx, event).await?;
                tx.commit().await.map_err(db_err)
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

            async fn search_audit_events(&self, org_id: &str, f: &AuditFilter, page: Page) -> StoreResult<Vec<AuditEvent>> {
                let (l, o) = limit(page);
                let action = prefix_pattern(f.action_prefix.as_deref().unwrap_or(""));
                let rows = sqlx::query(
                    "SELECT * FROM audit_events WHERE org_id = $1 AND action LIKE $2 ESCAPE '\\' \
                     AND ($3 IS NULL OR actor = $3) AND ($4 IS NULL OR target = $4) AND ($5 IS NULL OR outcome = $5) \
                     AND ($6 IS NULL OR at >= $6) AND ($7 IS NULL OR at < $7) ORDER BY seq DESC LIMIT $8 OFFSET $9",
                )
                .bind(org_id)
                .bind(action)
                .bind(f.actor.as_deref())
                .bind(f.target.as_deref())
                .bind(f.outcome.as_deref())
                .bind(f.since)
                .bind(f.until)
                .bind(l)
                .bind(o)
                .fetch_all(&self.pool)
                .await
                .map_err(db_err)?;
                rows.iter().map(Self::audit_row).collect()
            }

            // ---- gateway control plane ---------------------------------------------------

            async fn latest_audit_seq(&self) -> StoreResult<i64> {
                let r = sqlx::query("SELECT COALESCE(MAX(seq), 0) AS seq FROM audit_events").fetch_one(&self.pool).await.map_err(db_err)?;
                r.try_get::<i64, _>("seq").map_err(db_err)
            }

            async fn audit_marks(&self, after: i64, also: &[i64], max: u32) -> StoreResult<Vec<AuditMark>> {
                let mark = |r: &$row| -> StoreResult<AuditMark> {
                    Ok(AuditMark {
                        seq: r.try_get("seq").map_err(db_err)?,
                        at: r.try_get("at").map_err(db_err)?,
                        action: r.try_get("action").map_err(db_err)?,
                        outcome: r.try_get("outcome").map_err(db_err)?,
                    })
                };
                let rows = sqlx::query("SELECT seq, at, action, outcome FROM audit_events WHERE seq > $1 ORDER BY seq LIMIT $2")
                    .bind(after)
                    .bind(i64::from(max))
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db_err)?;
                let mut out = rows.iter().map(mark).collect::<StoreResult<Vec<_>>>()?;
                let mut wanted: Vec<i64> = also.iter().copied().filter(|s| *s <= after).collect();
                wanted.sort_unstable();
                wanted.dedup();
                // Placeholders only: no value ever becomes SQL text.
                for chunk in wanted.chunks(100) {
                    let list: Vec<String> = (1..=chunk.len()).map(|i| format!("${i}")).collect();
                    let sql = format!("SELECT seq, at, action, outcome FROM audit_events WHERE seq IN ({})", list.join(", "));
                    let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
                    for s in chunk {
                        q = q.bind(*s);
                    }
                    let rows = q.fetch_all(&self.pool).await.map_err(db_err)?;
                    for r in &rows {
                        out.push(mark(r)?);
                    }
                }
                out.sort_by_key(|m| m.seq);
                out.dedup_by_key(|m| m.seq);
                Ok(out)
            }

            async fn revoked_tokens_since(&self, since: UnixTime, unexpired_at: UnixTime, max: u32) -> StoreResult<Vec<RevokedToken>> {
                let rows = sqlx::query("SELECT jti, client_id, expires_at, revoked_at FROM revoked_tokens WHERE revoked_at >= $1 AND expires_at >= $2 ORDER BY revoked_at, jti LIMIT $3")
                    .bind(since)
                    .bind(unexpired_at)
                    .bind(i64::from(max))
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db_err)?;
                let mut out = rows
                    .iter()
                    .map(|r| {
                        Ok(RevokedToken {
                            jti: r.try_get("jti").map_err(db_err)?,
                            client_id: r.try_get("client_id").map_err(db_err)?,
                            expires_at: r.try_get("expires_at").map_err(db_err)?,
                            revoked_at: r.try_get("revoked_at").map_err(db_err)?,
                        })
                    })
                    .collect::<StoreResult<Vec<_>>>()?;
                // The same order on both backends, whatever the database's collation.
                out.sort_by(|a, b| (a.revoked_at, &a.jti).cmp(&(b.revoked_at, &b.jti)));
                Ok(out)
            }

            async fn all_role_grants(&self) -> StoreResult<Vec<OrgRoleGrant>> {
                let rows = sqlx::query("SELECT o.slug AS slug, r.role AS role, r.permission AS permission FROM role_permissions r JOIN organisations o ON o.id = r.org_id")
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db_err)?;
                let mut out = rows
                    .iter()
                    .map(|r| {
                        Ok(OrgRoleGrant {
                            org: Slug::parse(r.try_get::<&str, _>("slug").map_err(db_err)?).map_err(|_| corrupt("slug"))?,
                            role: RoleName::parse(r.try_get("role").map_err(db_err)?).map_err(|_| corrupt("role"))?,
                            permission: PermissionName::parse(r.try_get("permission").map_err(db_err)?).map_err(|_| corrupt("permission"))?,
                        })
                    })
                    .collect::<StoreResult<Vec<_>>>()?;
                out.sort();
                Ok(out)
            }

            // ---- OpenID Connect ----------------------------------------------------------

            async fn set_organisation_self_registration(&self, org_id: &str, enabled: bool, now: UnixTime, audit: &AuditEvent) -> StoreResult<bool> {
                let mut tx = self.pool.begin().await.map_err(db_err)?;
                let n = sqlx::query("UPDATE organisations SET self_registration = $1, updated_at = $2 WHERE id = $3")
                    .bind(enabled)
                    .bind(now)
                    .bind(org_id)
                    .execute(&mut *tx)
                    .await
                    .map_err(db_err)?
                    .rows_affected();
                if n == 0 {
                    return Ok(false);
                }
                self.insert_audit(&mut *tx, audit).await?;
                tx.commit().await.map_err(db_err)?;
                Ok(true)
            }

            async fn create_invited_user(&self, u: &User, e: &UserEmail, v: &Verification, mail: &QueuedMail, audit: &AuditEvent) -> StoreResult<()> {
                let mut tx = self.pool.begin().await.map_err(db_err)?;
                Self::insert_user(&mut *tx, u).await?;
                Self::insert_user_email(&mut *tx, e).await?;
                Self::insert_verification(&mut *tx, v).await?;
                Self::insert_mail(&mut *tx, mail).await?;
                self.insert_audit(&mut *tx, audit).await?;
                tx.commit().await.map_err(db_err)
            }

            async fn insert_authorization_code(&self, c: &AuthorizationCode, audit: &AuditEvent) -> StoreResult<()> {
                let mut tx = self.pool.begin().await.map_err(db_err)?;
                sqlx::query(
                    "INSERT INTO authorization_codes (code_hash, client_id, org_id, user_id, session_id, redirect_uri, scope, nonce, code_challenge, auth_time, amr, \
                     created_at, expires_at, consumed_at, issued_jti, issued_jti_expires_at, issued_family) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)",
                )
                .bind(c.code_hash.0.to_vec())
                .bind(&c.client_id)
                .bind(&c.org_id)
                .bind(&c.user_id)
                .bind(&c.session_id)
                .bind(&c.redirect_uri)
                .bind(&c.scope)
                .bind(&c.nonce)
                .bind(&c.code_challenge)
                .bind(c.auth_time)
                .bind(string_list(&c.amr)?)
                .bind(c.created_at)
                .bind(c.expires_at)
                .bind(c.consumed_at)
                .bind(&c.issued_jti)
                .bind(c.issued_jti_expires_at)
                .bind(&c.issued_family)
                .execute(&mut *tx)
                .await
                .map_err(db_err)?;
                self.insert_audit(&mut *tx, audit).await?;
                tx.commit().await.map_err(db_err)
            }

            async fn authorization_code(&self, code_hash: &SecretHash) -> StoreResult<Option<AuthorizationCode>> {
                let r = sqlx::query("SELECT * FROM authorization_codes WHERE code_hash = $1").bind(code_hash.0.to_vec()).fetch_optional(&self.pool).await.map_err(db_err)?;
                r.as_ref().map(Self::code_row).transpose()
            }

            async fn redeem_authorization_code(&self, code_hash: &SecretHash, now: UnixTime, issue: &CodeIssue, audit: &AuditEvent) -> StoreResult<bool> {
                let mut tx = self.pool.begin().await.map_err(db_err)?;
                // Conditional, and the transaction's first statement: of concurrent redemptions
                // exactly one changes the row.
                let row = sqlx::query(
                    "UPDATE authorization_codes SET consumed_at = $1, issued_jti = $2, issued_jti_expires_at = $3, issued_family = $4 \
                     WHERE code_hash = $5 AND consumed_at IS NULL RETURNING session_id, client_id",
                )
                .bind(now)
                .bind(&issue.jti)
                .bind(issue.jti_expires_at)
                .bind(issue.refresh.as_ref().map(|r| r.family_id.as_str()))
                .bind(code_hash.0.to_vec())
                .fetch_optional(&mut *tx)
                .await
                .map_err(db_err)?;
                if !Self::code_signed_in(&mut tx, row, now).await? {
                    return Ok(false);
                }
                if let Some(refresh) = &issue.refresh {
                    Self::insert_refresh_token(&mut *tx, refresh).await?;
                }
                self.insert_audit(&mut *tx, audit).await?;
                tx.commit().await.map_err(db_err)?;
                Ok(true)
            }

            async fn redeem_code_for_session(&self, code_hash: &SecretHash, now: UnixTime, session: &Session, audit: &AuditEvent) -> StoreResult<bool> {
                let mut tx = self.pool.begin().await.map_err(db_err)?;
                // As in redeem_authorization_code: conditional, and the transaction's first
                // statement.
                let row = sqlx::query(
                    "UPDATE authorization_codes SET consumed_at = $1, issued_session = $2 \
                     WHERE code_hash = $3 AND consumed_at IS NULL RETURNING session_id, client_id",
                )
                .bind(now)
                .bind(&session.id)
                .bind(code_hash.0.to_vec())
                .fetch_optional(&mut *tx)
                .await
                .map_err(db_err)?;
                if !Self::code_signed_in(&mut tx, row, now).await? {
                    return Ok(false);
                }
                Self::insert_session(&mut *tx, session).await?;
                self.insert_audit(&mut *tx, audit).await?;
                tx.commit().await.map_err(db_err)?;
                Ok(true)
            }

            async fn revoke_code_grant(&self, code_hash: &SecretHash, now: UnixTime, audit: &AuditEvent) -> StoreResult<bool> {
                let mut tx = self.pool.begin().await.map_err(db_err)?;
                // Once per redeemed code (marked first, so concurrent replays revoke once).
                let row = sqlx::query(
                    "UPDATE authorization_codes SET grant_revoked_at = $1 WHERE code_hash = $2 AND consumed_at IS NOT NULL AND grant_revoked_at IS NULL \
                     RETURNING client_id, issued_jti, issued_jti_expires_at, issued_family, issued_session",
                )
                .bind(now)
                .bind(code_hash.0.to_vec())
                .fetch_optional(&mut *tx)
                .await
                .map_err(db_err)?;
                let Some(row) = row else { return Ok(false) };
                let client_id: String = row.try_get("client_id").map_err(db_err)?;
                let jti: Option<String> = row.try_get("issued_jti").map_err(db_err)?;
                let jti_expires_at: Option<UnixTime> = row.try_get("issued_jti_expires_at").map_err(db_err)?;
                let family: Option<String> = row.try_get("issued_family").map_err(db_err)?;
                if let Some(jti) = &jti {
                    sqlx::query("INSERT INTO revoked_tokens (jti, client_id, expires_at, revoked_at) VALUES ($1, $2, $3, $4) ON CONFLICT (jti) DO NOTHING")
                        .bind(jti)
                        .bind(&client_id)
                        .bind(jti_expires_at.unwrap_or(now))
                        .bind(now)
                        .execute(&mut *tx)
                        .await
                        .map_err(db_err)?;
                }
                if let Some(family) = &family {
                    Self::revoke_family(&mut *tx, family, now).await?;
                }
                let browser: Option<String> = row.try_get("issued_session").map_err(db_err)?;
                if let Some(id) = &browser {
                    sqlx::query("UPDATE sessions SET state = 'revoked', revoked_at = $1 WHERE id = $2 AND state IN ('pending', 'active')")
                        .bind(now)
                        .bind(id)
                        .execute(&mut *tx)
                        .await
                        .map_err(db_err)?;
                }
                self.insert_audit(&mut *tx, audit).await?;
                tx.commit().await.map_err(db_err)?;
                Ok(true)
            }

            async fn refresh_token_by_hash(&self, token_hash: &SecretHash) -> StoreResult<Option<RefreshToken>> {
                let r = sqlx::query("SELECT * FROM refresh_tokens WHERE token_hash = $1").bind(token_hash.0.to_vec()).fetch_optional(&self.pool).await.map_err(db_err)?;
                r.as_ref().map(Self::refresh_row).transpose()
            }

            async fn rotate_refresh_token(&self, old_id: &str, now: UnixTime, new: &RefreshToken, audit: &AuditEvent) -> StoreResult<bool> {
                let mut tx = self.pool.begin().await.map_err(db_err)?;
                // Conditional: of concurrent uses of one token exactly one rotates it.
                let n = sqlx::query("UPDATE refresh_tokens SET used_at = $1 WHERE id = $2 AND used_at IS NULL AND revoked_at IS NULL")
                    .bind(now)
                    .bind(old_id)
                    .execute(&mut *tx)
                    .await
                    .map_err(db_err)?
                    .rows_affected();
                if n == 0 || !Self::lock_active_session(&mut tx, &new.session_id).await? {
                    return Ok(false);
                }
                Self::insert_refresh_token(&mut *tx, new).await?;
                self.insert_audit(&mut *tx, audit).await?;
                tx.commit().await.map_err(db_err)?;
                Ok(true)
            }

            async fn revoke_refresh_family(&self, family_id: &str, now: UnixTime, audit: &AuditEvent) -> StoreResult<u64> {
                let mut tx = self.pool.begin().await.map_err(db_err)?;
                let n = Self::revoke_family(&mut *tx, family_id, now).await?;
                self.insert_audit(&mut *tx, audit).await?;
                tx.commit().await.map_err(db_err)?;
                Ok(n)
            }

            async fn end_sso_session(&self, session_id: &str, now: UnixTime, deliveries: &[LogoutDelivery], audit: &AuditEvent) -> StoreResult<bool> {
                let mut tx = self.pool.begin().await.map_err(db_err)?;
                // Conditional: a session ends once, and only its first ending queues logouts.
                let n = sqlx::query("UPDATE sessions SET state = 'revoked', revoked_at = $1 WHERE id = $2 AND state IN ('pending', 'active')")
                    .bind(now)
                    .bind(session_id)
                    .execute(&mut *tx)
                    .await
                    .map_err(db_err)?
                    .rows_affected();
                if n == 0 {
                    return Ok(false);
                }
                sqlx::query("UPDATE refresh_tokens SET revoked_at = $1 WHERE session_id = $2 AND revoked_at IS NULL")
                    .bind(now)
                    .bind(session_id)
                    .execute(&mut *tx)
                    .await
                    .map_err(db_err)?;
                for d in deliveries {
                    sqlx::query(
                        "INSERT INTO logout_deliveries (id, client_id, uri, logout_token, attempts, next_attempt_at, created_at, delivered_at, failed_at) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                    )
                    .bind(&d.id)
                    .bind(&d.client_id)
                    .bind(&d.uri)
                    .bind(&d.logout_token)
                    .bind(i64::from(d.attempts))
                    .bind(d.next_attempt_at)
                    .bind(d.created_at)
                    .bind(d.delivered_at)
                    .bind(d.failed_at)
                    .execute(&mut *tx)
                    .await
                    .map_err(db_err)?;
                }
                self.insert_audit(&mut *tx, audit).await?;
                tx.commit().await.map_err(db_err)?;
                Ok(true)
            }

            async fn session_clients(&self, session_id: &str) -> StoreResult<Vec<String>> {
                let rows = sqlx::query("SELECT client_id FROM session_clients WHERE session_id = $1 ORDER BY first_at, client_id")
                    .bind(session_id)
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db_err)?;
                rows.iter().map(|r| r.try_get("client_id").map_err(db_err)).collect()
            }

            async fn consent(&self, user_id: &str, client_id: &str) -> StoreResult<Option<Consent>> {
                let r = sqlx::query("SELECT * FROM consents WHERE user_id = $1 AND client_id = $2").bind(user_id).bind(client_id).fetch_optional(&self.pool).await.map_err(db_err)?;
                r.as_ref().map(Self::consent_row).transpose()
            }

            async fn save_consent(&self, c: &Consent, audit: &AuditEvent) -> StoreResult<()> {
                let mut tx = self.pool.begin().await.map_err(db_err)?;
                sqlx::query(
                    "INSERT INTO consents (user_id, client_id, org_id, scopes, granted_at) VALUES ($1, $2, $3, $4, $5) \
                     ON CONFLICT (user_id, client_id) DO UPDATE SET org_id = excluded.org_id, scopes = excluded.scopes, granted_at = excluded.granted_at",
                )
                .bind(&c.user_id)
                .bind(&c.client_id)
                .bind(&c.org_id)
                .bind(string_list(&c.scopes)?)
                .bind(c.granted_at)
                .execute(&mut *tx)
                .await
                .map_err(db_err)?;
                self.insert_audit(&mut *tx, audit).await?;
                tx.commit().await.map_err(db_err)
            }

            async fn user_consents(&self, user_id: &str) -> StoreResult<Vec<Consent>> {
                let rows = sqlx::query("SELECT * FROM consents WHERE user_id = $1 ORDER BY granted_at DESC, client_id DESC").bind(user_id).fetch_all(&self.pool).await.map_err(db_err)?;
                rows.iter().map(Self::consent_row).collect()
            }

            async fn revoke_consent(&self, user_id: &str, client_id: &str, now: UnixTime, audit: &AuditEvent) -> StoreResult<bool> {
                let mut tx = self.pool.begin().await.map_err(db_err)?;
                let n = sqlx::query("DELETE FROM consents WHERE user_id = $1 AND client_id = $2")
                    .bind(user_id)
                    .bind(client_id)
                    .execute(&mut *tx)
                    .await
                    .map_err(db_err)?
                    .rows_affected();
                if n == 0 {
                    return Ok(false);
                }
                sqlx::query("UPDATE refresh_tokens SET revoked_at = $1 WHERE user_id = $2 AND client_id = $3 AND revoked_at IS NULL")
                    .bind(now)
                    .bind(user_id)
                    .bind(client_id)
                    .execute(&mut *tx)
                    .await
                    .map_err(db_err)?;
                self.insert_audit(&mut *tx, audit).await?;
                tx.commit().await.map_err(db_err)?;
                Ok(true)
            }

            async fn due_logout_deliveries(&self, now: UnixTime, max: u32) -> StoreResult<Vec<LogoutDelivery>> {
                let rows = sqlx::query(
                    "SELECT * FROM logout_deliveries WHERE delivered_at IS NULL AND failed_at IS NULL AND next_attempt_at <= $1 ORDER BY created_at, id LIMIT $2",
                )
                .bind(now)
                .bind(i64::from(max))
                .fetch_all(&self.pool)
                .await
                .map_err(db_err)?;
                rows.iter().map(Self::logout_row).collect()
            }

            async fn logout_delivered(&self, id: &str, now: UnixTime) -> StoreResult<()> {
                sqlx::query("UPDATE logout_deliveries SET delivered_at = $1, logout_token = '' WHERE id = $2 AND delivered_at IS NULL AND failed_at IS NULL")
                    .bind(now)
                    .bind(id)
                    .execute(&self.pool)
                    .await
                    .map_err(db_err)?;
                Ok(())
            }

            async fn logout_delivery_failed(&self, id: &str, attempts: u32, next_attempt_at: Option<UnixTime>, now: UnixTime) -> StoreResult<()> {
                let q = match next_attempt_at {
                    Some(next) => sqlx::query("UPDATE logout_deliveries SET attempts = $1, next_attempt_at = $2 WHERE id = $3 AND delivered_at IS NULL AND failed_at IS NULL")
                        .bind(i64::from(attempts))
                        .bind(next)
                        .bind(id),
                    None => sqlx::query("UPDATE logout_deliveries SET attempts = $1, failed_at = $2 WHERE id = $3 AND delivered_at IS NULL AND failed_at IS NULL")
                        .bind(i64::from(attempts))
                        .bind(now)
                        .bind(id),
                };
                q.execute(&self.pool).await.map_err(db_err)?;
                Ok(())
            }

            async fn user_totp(&self, user_id: &str) -> StoreResult<Option<UserTotp>> {
                let r = sqlx::query("SELECT * FROM user_totp WHERE user_id = $1").bind(user_id).fetch_optional(&self.pool).await.map_err(db_err)?;
                r.as_ref().map(Self::totp_row).transpose()
            }

            async fn save_user_totp(&self, t: &UserTotp, audit: &AuditEvent) -> StoreResult<()> {
                let mut tx = self.pool.begin().await.map_err(db_err)?;
                let n = sqlx::query(
                    "INSERT INTO user_totp (user_id, sealed_secret, confirmed_at, last_step, created_at) VALUES ($1, $2, $3, $4, $5) \
                     ON CONFLICT (user_id) DO UPDATE SET sealed_secret = excluded.sealed_secret, confirmed_at = excluded.confirmed_at, \
                     last_step = excluded.last_step, created_at = excluded.created_at WHERE user_totp.confirmed_at IS NULL",
                )
                .bind(&t.user_id)
                .bind(&t.sealed_secret)
                .bind(t.confirmed_at)
                .bind(t.last_step)
                .bind(t.created_at)
                .execute(&mut *tx)
                .await
                .map_err(db_err)?
                .rows_affected();
                if n == 0 {
                    return Err(StoreError::Conflict("an authenticator app is already enrolled".into()));
                }
                self.insert_audit(&mut *tx, audit).await?;
                tx.commit().await.map_err(db_err)
            }

            async fn use_totp_step(&self, user_id: &str, step: i64, confirm: bool, now: UnixTime, audit: &AuditEvent) -> StoreResult<bool> {
                let mut tx = self.pool.begin().await.map_err(db_err)?;
                // Conditional: a step (or an older one) is accepted at most once, even concurrently.
                let q = if confirm {
                    sqlx::query("UPDATE user_totp SET last_step = $1, confirmed_at = $2 WHERE user_id = $3 AND (last_step IS NULL OR last_step < $1)").bind(step).bind(now).bind(user_id)
                } else {
                    sqlx::query("UPDATE user_totp SET last_step = $1 WHERE user_id = $2 AND (last_step IS NULL OR last_step < $1)").bind(step).bind(user_id)
                };
                let n = q.execute(&mut *tx).await.map_err(db_err)?.rows_affected();
                if n == 0 {
                    return Ok(false);
                }
                self.insert_audit(&mut *tx, audit).await?;
                tx.commit().await.map_err(db_err)?;
                Ok(true)
            }

            async fn delete_user_totp(&self, user_id: &str, audit: &AuditEvent) -> StoreResult<bool> {
                let mut tx = self.pool.begin().await.map_err(db_err)?;
                let n = sqlx::query("DELETE FROM user_totp WHERE user_id = $1").bind(user_id).execute(&mut *tx).await.map_err(db_err)?.rows_affected();
                if n == 0 {
                    return Ok(false);
                }
                self.insert_audit(&mut *tx, audit).await?;
                tx.commit().await.map_err(db_err)?;
                Ok(true)
            }

            async fn purge_oidc(&self, before: UnixTime) -> StoreResult<u64> {
                let mut tx = self.pool.begin().await.map_err(db_err)?;
                let mut n = 0;
                for sql in [
                    "DELETE FROM authorization_codes WHERE expires_at < $1",
                    "DELETE FROM refresh_tokens WHERE expires_at < $1",
                    "DELETE FROM logout_deliveries WHERE delivered_at < $1 OR failed_at < $1",
                ] {
                    n += sqlx::query(sql).bind(before).execute(&mut *tx).await.map_err(db_err)?.rows_affected();
                }
                tx.commit().await.map_err(db_err)?;
                Ok(n)
            }

            // ---- the portal -------------------------------------------------------------------

            async fn organisation_counts(
                &self,
                org_id: &str,
                now: UnixTime,
                expiring_before: UnixTime,
                failures_since: UnixTime,
            ) -> StoreResult<OrganisationCounts> {
                let r = sqlx::query(
                    "SELECT \
                       (SELECT COUNT(*) FROM applications WHERE org_id = $1) AS applications, \
                       (SELECT COUNT(*) FROM users WHERE org_id = $1) AS users, \
                       (SELECT COUNT(*) FROM certificates WHERE org_id = $1 AND revoked_at IS NULL \
                          AND not_after > $2 AND not_after < $3) AS expiring, \
                       (SELECT COUNT(*) FROM audit_events WHERE org_id = $1 AND outcome = 'failure' \
                          AND action IN ('session.login', 'session.verify') AND at >= $4) AS failures",
                )
                .bind(org_id)
                .bind(now)
                .bind(expiring_before)
                .bind(failures_since)
                .fetch_one(&self.pool)
                .await
                .map_err(db_err)?;
                let n = |col: &str| -> StoreResult<u64> {
                    u64::try_from(r.try_get::<i64, _>(col).map_err(db_err)?).map_err(|_| corrupt("count"))
                };
                Ok(OrganisationCounts {
                    applications: n("applications")?,
                    users: n("users")?,
                    certificates_expiring: n("expiring")?,
                    failed_sign_ins: n("failures")?,
                })
            }

            // ---- several nodes on one database ------------------------------------------------

            async fn count_attempts(&self, keys: &[String], window_secs: i64, now: UnixTime) -> StoreResult<Vec<(u32, UnixTime)>> {
                let mut tx = self.pool.begin().await.map_err(db_err)?;
                let mut out = Vec::with_capacity(keys.len());
                for key in keys {
                    // Every SET expression sees the row as it was: a window that ended restarts.
                    let r = sqlx::query(
                        "INSERT INTO attempt_counters (key, events, window_end) VALUES ($1, 1, $2) \
                         ON CONFLICT (key) DO UPDATE SET \
                           events = CASE WHEN attempt_counters.window_end <= $3 THEN 1 ELSE attempt_counters.events + 1 END, \
                           window_end = CASE WHEN attempt_counters.window_end <= $3 THEN $2 ELSE attempt_counters.window_end END \
                         RETURNING events, window_end",
                    )
                    .bind(key)
                    .bind(now.saturating_add(window_secs))
                    .bind(now)
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(db_err)?;
                    out.push(Self::attempt_row(&r)?);
                }
                tx.commit().await.map_err(db_err)?;
                Ok(out)
            }

            async fn attempt_count(&self, key: &str, now: UnixTime) -> StoreResult<Option<(u32, UnixTime)>> {
                let r = sqlx::query("SELECT events, window_end FROM attempt_counters WHERE key = $1 AND window_end > $2")
                    .bind(key)
                    .bind(now)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(db_err)?;
                r.as_ref().map(Self::attempt_row).transpose()
            }

            async fn forgive_attempt(&self, key: &str, now: UnixTime) -> StoreResult<()> {
                sqlx::query("UPDATE attempt_counters SET events = events - 1 WHERE key = $1 AND events > 0 AND window_end > $2")
                    .bind(key)
                    .bind(now)
                    .execute(&self.pool)
                    .await
                    .map_err(db_err)?;
                Ok(())
            }

            async fn purge_attempt_counters(&self, now: UnixTime) -> StoreResult<u64> {
                let r = sqlx::query("DELETE FROM attempt_counters WHERE window_end < $1").bind(now).execute(&self.pool).await.map_err(db_err)?;
                Ok(r.rows_affected())
            }

            async fn take_lease(&self, name: &str, holder: &str, now: UnixTime, ttl_secs: i64) -> StoreResult<bool> {
                let r = sqlx::query(
                    "INSERT INTO leases (name, holder, expires_at) VALUES ($1, $2, $3) \
                     ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at \
                     WHERE leases.holder = excluded.holder OR leases.expires_at <= $4 \
                     RETURNING holder",
                )
                .bind(name)
                .bind(holder)
                .bind(now.saturating_add(ttl_secs))
                .bind(now)
                .fetch_optional(&self.pool)
                .await
                .map_err(db_err)?;
                Ok(r.is_some())
            }

            async fn release_lease(&self, name: &str, holder: &str) -> StoreResult<()> {
                sqlx::query("DELETE FROM leases WHERE name = $1 AND holder = $2").bind(name).bind(holder).execute(&self.pool).await.map_err(db_err)?;
                Ok(())
            }

            async fn change_signal(&self) -> StoreResult<Option<Arc<tokio::sync::Notify>>> {
                self.change_notifier().await
            }
        }

        impl $store {
            fn attempt_row(r: &$row) -> StoreResult<(u32, UnixTime)> {
                let events: i64 = r.try_get("events").map_err(db_err)?;
                Ok((u32::try_from(events.max(0)).unwrap_or(u32::MAX), r.try_get("window_end").map_err(db_err)?))
            }

            /// Binds, as `$1…$19`, the application columns that both INSERT and UPDATE write,
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
                    .bind(a.updated_at)
                    .bind(&a.jwks_uri)
                    .bind(a.id_token_signing_alg.as_str())
                    .bind(a.first_party)
                    .bind(string_list(&a.post_logout_redirect_uris)?)
                    .bind(&a.backchannel_logout_uri)
                    .bind(a.always_issue_refresh_token))
            }

            async fn insert_user<'c, E>(ex: E, u: &User) -> StoreResult<()>
            where
                E: sqlx::Executor<'c, Database = <$pool as PoolDb>::Db>,
            {
                sqlx::query("INSERT INTO users (id, org_id, email, name, password_hash, roles, enabled, failed_logins, locked_until, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)")
                    .bind(&u.id)
                    .bind(&u.org_id)
                    .bind(u.email.as_str())
                    .bind(&u.name)
                    .bind(&u.password_hash)
                    .bind(to_json(&u.roles))
                    .bind(u.enabled)
                    .bind(i64::from(u.failed_logins))
                    .bind(u.locked_until)
                    .bind(u.created_at)
                    .bind(u.updated_at)
                    .execute(ex)
                    .await
                    .map_err(db_err)?;
                Ok(())
            }

            async fn insert_refresh_token<'c, E>(ex: E, t: &RefreshToken) -> StoreResult<()>
            where
                E: sqlx::Executor<'c, Database = <$pool as PoolDb>::Db>,
            {
                sqlx::query(
                    "INSERT INTO refresh_tokens (id, token_hash, family_id, client_id, org_id, user_id, session_id, scope, auth_time, amr, created_at, expires_at, used_at, revoked_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
                )
                .bind(&t.id)
                .bind(t.token_hash.0.to_vec())
                .bind(&t.family_id)
                .bind(&t.client_id)
                .bind(&t.org_id)
                .bind(&t.user_id)
                .bind(&t.session_id)
                .bind(&t.scope)
                .bind(t.auth_time)
                .bind(string_list(&t.amr)?)
                .bind(t.created_at)
                .bind(t.expires_at)
                .bind(t.used_at)
                .bind(t.revoked_at)
                .execute(ex)
                .await
                .map_err(db_err)?;
                Ok(())
            }

            async fn insert_user_email<'c, E>(ex: E, e: &UserEmail) -> StoreResult<()>
            where
                E: sqlx::Executor<'c, Database = <$pool as PoolDb>::Db>,
            {
                sqlx::query("INSERT INTO user_emails (id, user_id, org_id, email, verified_at, created_at) VALUES ($1, $2, $3, $4, $5, $6)")
                    .bind(&e.id)
                    .bind(&e.user_id)
                    .bind(&e.org_id)
                    .bind(e.email.as_str())
                    .bind(e.verified_at)
                    .bind(e.created_at)
                    .execute(ex)
                    .await
                    .map_err(db_err)?;
                Ok(())
            }

            async fn insert_session<'c, E>(ex: E, session: &Session) -> StoreResult<()>
            where
                E: sqlx::Executor<'c, Database = <$pool as PoolDb>::Db>,
            {
                sqlx::query("INSERT INTO sessions (id, user_id, org_id, token_hash, state, created_at, verified_at, last_used_at, expires_at, ip, user_agent, revoked_at, parent_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)")
                    .bind(&session.id)
                    .bind(&session.user_id)
                    .bind(&session.org_id)
                    .bind(session.token_hash.0.to_vec())
                    .bind(session.state.as_str())
                    .bind(session.created_at)
                    .bind(session.verified_at)
                    .bind(session.last_used_at)
                    .bind(session.expires_at)
                    .bind(&session.ip)
                    .bind(&session.user_agent)
                    .bind(session.revoked_at)
                    .bind(&session.parent_id)
                    .execute(ex)
                    .await
                    .map_err(db_err)?;
                Ok(())
            }

            async fn insert_verification<'c, E>(ex: E, v: &Verification) -> StoreResult<()>
            where
                E: sqlx::Executor<'c, Database = <$pool as PoolDb>::Db>,
            {
                sqlx::query("INSERT INTO verifications (id, purpose, org_id, user_id, subject_id, code_hash, attempts, expires_at, consumed_at, created_at, sealed_token) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)")
                    .bind(&v.id)
                    .bind(v.purpose.as_str())
                    .bind(&v.org_id)
                    .bind(&v.user_id)
                    .bind(&v.subject_id)
                    .bind(v.code_hash.0.to_vec())
                    .bind(i64::from(v.attempts))
                    .bind(v.expires_at)
                    .bind(v.consumed_at)
                    .bind(v.created_at)
                    .bind(&v.sealed_token)
                    .execute(ex)
                    .await
                    .map_err(db_err)?;
                Ok(())
            }

            async fn insert_mail<'c, E>(ex: E, m: &QueuedMail) -> StoreResult<()>
            where
                E: sqlx::Executor<'c, Database = <$pool as PoolDb>::Db>,
            {
                sqlx::query("INSERT INTO mail_queue (id, to_addr, subject, sealed_body, attempts, next_attempt_at, last_error, created_at, sent_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)")
                    .bind(&m.id)
                    .bind(&m.to)
                    .bind(&m.subject)
                    .bind(&m.sealed_body)
                    .bind(i64::from(m.attempts))
                    .bind(m.next_attempt_at)
                    .bind(&m.last_error)
                    .bind(m.created_at)
                    .bind(m.sent_at)
                    .execute(ex)
                    .await
                    .map_err(db_err)?;
                Ok(())
            }

            /// Revokes the family's unrevoked refresh tokens; returns how many.
            async fn revoke_family<'c, E>(ex: E, family_id: &str, now: UnixTime) -> StoreResult<u64>
            where
                E: sqlx::Executor<'c, Database = <$pool as PoolDb>::Db>,
            {
                let r = sqlx::query("UPDATE refresh_tokens SET revoked_at = $1 WHERE family_id = $2 AND revoked_at IS NULL")
                    .bind(now)
                    .bind(family_id)
                    .execute(ex)
                    .await
                    .map_err(db_err)?;
                Ok(r.rows_affected())
            }

            /// Revokes the user's pending and active sessions; returns how many.
            /// `false` when the SSO session was revoked (signed out); otherwise holds its row until
            /// the transaction ends, so a concurrent sign-out (which updates the session first)
            /// either finished before (then `false`) or waits, and then sees — and revokes — what
            /// this transaction inserts. (Expiry and existence are the core's checks.)
            /// After a code's conditional consumption (`row`: what it returned, `session_id` and
            /// `client_id`): locks the code's SSO session, which must still be active, and
            /// records that the session signed in to the client. `false` when no code was
            /// consumed or the session has ended; the caller then drops the transaction.
            async fn code_signed_in(conn: &mut <<$pool as PoolDb>::Db as sqlx::Database>::Connection, row: Option<$row>, now: UnixTime) -> StoreResult<bool> {
                let Some(row) = row else { return Ok(false) };
                let session_id: String = row.try_get("session_id").map_err(db_err)?;
                let client_id: String = row.try_get("client_id").map_err(db_err)?;
                if !Self::lock_active_session(&mut *conn, &session_id).await? {
                    return Ok(false);
                }
                sqlx::query("INSERT INTO session_clients (session_id, client_id, first_at) VALUES ($1, $2, $3) ON CONFLICT (session_id, client_id) DO NOTHING")
                    .bind(&session_id)
                    .bind(&client_id)
                    .bind(now)
                    .execute(&mut *conn)
                    .await
                    .map_err(db_err)?;
                Ok(true)
            }

            async fn lock_active_session(conn: &mut <<$pool as PoolDb>::Db as sqlx::Database>::Connection, session_id: &str) -> StoreResult<bool> {
                let r = sqlx::query("UPDATE sessions SET last_used_at = last_used_at WHERE id = $1 RETURNING state")
                    .bind(session_id)
                    .fetch_optional(&mut *conn)
                    .await
                    .map_err(db_err)?;
                match r {
                    Some(row) => Ok(row.try_get::<String, _>("state").map_err(db_err)? != "revoked"),
                    None => Ok(true),
                }
            }

            /// Ends every session of the user, and with them every refresh token it holds.
            async fn revoke_sessions_of(conn: &mut <<$pool as PoolDb>::Db as sqlx::Database>::Connection, user_id: &str, now: UnixTime) -> StoreResult<u64> {
                let r = sqlx::query("UPDATE sessions SET state = 'revoked', revoked_at = $1 WHERE user_id = $2 AND state IN ('pending', 'active')")
                    .bind(now)
                    .bind(user_id)
                    .execute(&mut *conn)
                    .await
                    .map_err(db_err)?;
                sqlx::query("UPDATE refresh_tokens SET revoked_at = $1 WHERE user_id = $2 AND revoked_at IS NULL")
                    .bind(now)
                    .bind(user_id)
                    .execute(&mut *conn)
                    .await
                    .map_err(db_err)?;
                Ok(r.rows_affected())
            }

            async fn insert_ca<'c, E>(ex: E, c: &CaCertificate, active: bool) -> StoreResult<()>
            where
                E: sqlx::Executor<'c, Database = <$pool as PoolDb>::Db>,
            {
                sqlx::query("INSERT INTO ca_certificates (id, kind, subject, certificate_pem, sealed_private_key, not_before, not_after, active, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)")
                    .bind(&c.id)
                    .bind(c.kind.as_str())
                    .bind(&c.subject)
                    .bind(&c.certificate_pem)
                    .bind(&c.sealed_private_key)
                    .bind(c.not_before)
                    .bind(c.not_after)
                    .bind(active)
                    .bind(c.created_at)
                    .execute(ex)
                    .await
                    .map_err(db_err)?;
                Ok(())
            }

            /// The inventory row and its audit row, on `conn` (a transaction or savepoint).
            async fn insert_certificate_rows(conn: &mut <<$pool as PoolDb>::Db as sqlx::Database>::Connection, chain: &audit::ChainKeySlot, c: &IssuedCertificate, audit: &AuditEvent) -> StoreResult<()> {
                sqlx::query(
                    "INSERT INTO certificates (id, org_id, app_id, client_id, cert_type, serial, issuer_id, subject, sans, key_type, spki_sha256, fingerprint, \
                     certificate_pem, not_before, not_after, revoked_at, revocation_reason, renewed_from, expiry_notified_at, created_by, created_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21)",
                )
                .bind(&c.id)
                .bind(&c.org_id)
                .bind(&c.app_id)
                .bind(c.client_id.as_str())
                .bind(c.cert_type.as_str())
                .bind(&c.serial)
                .bind(&c.issuer_id)
                .bind(&c.subject)
                .bind(string_list(&c.sans)?)
                .bind(&c.key_type)
                .bind(&c.spki_sha256)
                .bind(&c.fingerprint)
                .bind(&c.certificate_pem)
                .bind(c.not_before)
                .bind(c.not_after)
                .bind(c.revoked_at)
                .bind(c.revocation_reason.map(RevocationReason::as_str))
                .bind(&c.renewed_from)
                .bind(c.expiry_notified_at)
                .bind(&c.created_by)
                .bind(c.created_at)
                .execute(&mut *conn)
                .await
                .map_err(db_err)?;
                Self::chain_audit(conn, chain, audit).await
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

/// Embedded SQLite: WAL with `synchronous=FULL`, foreign keys on, a busy timeout, and a small
/// pool (readers share the WAL; SQLite admits one writer at a time).
///
/// Certificate issuance goes through a group commit ([`certificate_writer`]): every commit is
/// an fsync, which would cap issuance at the disk's commit rate.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    certificates: mpsc::Sender<PendingCertificate>,
    chain: audit::ChainKeySlot,
}

/// A certificate waiting for the group commit, and where to send its outcome.
type PendingCertificate = (IssuedCertificate, AuditEvent, oneshot::Sender<StoreResult<()>>);

/// The most certificates one group commit takes.
const CERTIFICATE_BATCH: usize = 128;

/// Group commit for certificate issuance on SQLite. It takes every insert queued while the
/// previous commit was being flushed (up to [`CERTIFICATE_BATCH`]) and writes them in one
/// transaction, each in its own savepoint, so a conflict (a duplicate serial, say) undoes and
/// fails only that insert. Each caller is answered only after the shared commit is durable;
/// if the commit fails, every caller in the batch gets the error and nothing of it is stored.
/// The task ends when the last [`SqliteStore`] clone is dropped.
async fn certificate_writer(
    pool: SqlitePool,
    chain: audit::ChainKeySlot,
    mut queue: mpsc::Receiver<PendingCertificate>,
) {
    let mut batch = Vec::with_capacity(CERTIFICATE_BATCH);
    while queue.recv_many(&mut batch, CERTIFICATE_BATCH).await > 0 {
        match commit_certificates(&pool, &chain, &batch).await {
            Ok(outcomes) => {
                for ((_, _, reply), outcome) in batch.drain(..).zip(outcomes) {
                    // A caller that went away still has its certificate stored: nothing to undo.
                    let _ = reply.send(outcome);
                }
            }
            Err(e) => {
                for (_, _, reply) in batch.drain(..) {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }
}

/// One transaction for the batch; the outer error is a failure of the whole transaction.
async fn commit_certificates(
    pool: &SqlitePool,
    chain: &audit::ChainKeySlot,
    batch: &[PendingCertificate],
) -> StoreResult<Vec<StoreResult<()>>> {
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await.map_err(db_err)?;
    let mut outcomes = Vec::with_capacity(batch.len());
    for (cert, audit, _) in batch {
        let mut savepoint = sqlx::Acquire::begin(&mut *tx).await.map_err(db_err)?;
        let outcome = SqliteStore::insert_certificate_rows(&mut savepoint, chain, cert, audit).await;
        if outcome.is_ok() {
            savepoint.commit().await.map_err(db_err)?;
        } else {
            savepoint.rollback().await.map_err(db_err)?;
        }
        outcomes.push(outcome);
    }
    tx.commit().await.map_err(db_err)?;
    Ok(outcomes)
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
            // On some errors (SQLITE_FULL above all) SQLite ends the transaction itself; sqlx
            // still counts it open, its rollback then fails, and the connection would go back
            // to the pool believing it is inside a transaction: every later `BEGIN` there
            // becomes a savepoint (deferred, so liable to SQLITE_BUSY_SNAPSHOT) and `BEGIN
            // IMMEDIATE` fails outright — until a restart. A connection released in that state
            // is closed instead. (The ping first runs the rollback a dropped transaction queued.)
            .after_release(|conn, _| {
                Box::pin(async move {
                    sqlx::Connection::ping(conn).await?;
                    Ok(!sqlx::Connection::is_in_transaction(conn))
                })
            })
            .connect_with(opts)
            .await
            .map_err(db_err)?;
        let (certificates, queue) = mpsc::channel(4 * CERTIFICATE_BATCH);
        let chain = audit::ChainKeySlot::default();
        tokio::spawn(certificate_writer(pool.clone(), chain.clone(), queue));
        let store = Self { pool, certificates, chain };
        store.run_migrations(None, migrate::SQLITE, now).await?;
        Ok(store)
    }

    /// Queues the certificate for the next group commit and waits for its outcome.
    async fn store_certificate(&self, c: &IssuedCertificate, audit: &AuditEvent) -> StoreResult<()> {
        let stopped = || StoreError::Unavailable("the certificate writer has stopped".into());
        let (reply, outcome) = oneshot::channel();
        self.certificates.send((c.clone(), audit.clone(), reply)).await.map_err(|_| stopped())?;
        outcome.await.map_err(|_| stopped())?
    }

    /// `PRAGMA integrity_check`; `ok` when the file is sound.
    pub async fn integrity_check(&self) -> StoreResult<String> {
        let r = sqlx::query("PRAGMA integrity_check").fetch_one(&self.pool).await.map_err(db_err)?;
        r.try_get::<String, _>(0).map_err(db_err)
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// One SQLite file has one serving node: there is nobody else's change to hear of.
    async fn change_notifier(&self) -> StoreResult<Option<Arc<Notify>>> {
        Ok(None)
    }
}

sql_store!(SqliteStore, SqlitePool, sqlx::sqlite::SqliteRow);
audit_chain_store!(SqliteStore, SqlitePool, sqlx::sqlite::SqliteRow);
backup_store!(SqliteStore, SqlitePool, sqlx::sqlite::SqliteRow);

/// PostgreSQL for scale-out: several nodes share one database. Migrations take an advisory
/// lock so nodes starting together apply them once.
///
/// Every committed transaction that wrote a successful audit event notifies the channel
/// [`CHANGES_CHANNEL`] (a trigger, migration 0007); [`Store::change_signal`] listens on it.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    chain: audit::ChainKeySlot,
    /// The `LISTEN` connection's wake-up, made on first use.
    changes: Arc<tokio::sync::OnceCell<Arc<Notify>>>,
}

/// The `NOTIFY` channel of committed changes.
pub const CHANGES_CHANNEL: &str = "portcullis_changes";

impl PgStore {
    pub async fn connect(url: &str, now: UnixTime) -> StoreResult<Self> {
        let opts = PgConnectOptions::from_str(url).map_err(db_err)?;
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(opts)
            .await
            .map_err(db_err)?;
        let store = Self { pool, chain: audit::ChainKeySlot::default(), changes: Arc::default() };
        store.run_migrations(Some("SELECT pg_advisory_xact_lock(7261426469)"), migrate::POSTGRES, now).await?;
        Ok(store)
    }

    /// Listens on [`CHANGES_CHANNEL`] from a connection of its own and wakes the returned
    /// `Notify` on every notification, and after the connection was lost (notifications sent
    /// meanwhile are gone: the reader polls then). The listening task ends when the pool is
    /// closed, or at the first notification after the `Notify` was dropped.
    async fn change_notifier(&self) -> StoreResult<Option<Arc<Notify>>> {
        let notify = self
            .changes
            .get_or_try_init(|| async {
                let mut listener = sqlx::postgres::PgListener::connect_with(&self.pool).await.map_err(db_err)?;
                listener.listen(CHANGES_CHANNEL).await.map_err(db_err)?;
                let notify = Arc::new(Notify::new());
                let weak = Arc::downgrade(&notify);
                tokio::spawn(async move {
                    loop {
                        let got = listener.try_recv().await;
                        let Some(wake) = weak.upgrade() else { return };
                        // A lost connection (`None`, reconnected on the next call) or an error
                        // may have swallowed notifications: wake the reader to poll.
                        wake.notify_one();
                        match got {
                            Ok(Some(_)) => {}
                            Ok(None) => tracing::warn!("change notifications interrupted; reconnecting"),
                            Err(sqlx::Error::PoolClosed) => return,
                            Err(e) => {
                                tracing::warn!(error = %e, "change notifications failed; retrying");
                                tokio::time::sleep(Duration::from_secs(1)).await;
                            }
                        }
                    }
                });
                Ok::<_, StoreError>(notify)
            })
            .await?;
        Ok(Some(notify.clone()))
    }

    /// PostgreSQL flushes the WAL of concurrent commits together itself: one transaction each.
    async fn store_certificate(&self, c: &IssuedCertificate, audit: &AuditEvent) -> StoreResult<()> {
        let mut tx = self.pool.begin().await.map_err(db_err)?;
        Self::insert_certificate_rows(&mut tx, &self.chain, c, audit).await?;
        tx.commit().await.map_err(db_err)
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

sql_store!(PgStore, PgPool, sqlx::postgres::PgRow);
audit_chain_store!(PgStore, PgPool, sqlx::postgres::PgRow);
backup_store!(PgStore, PgPool, sqlx::postgres::PgRow);

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn full_disks_and_passing_shortages_are_told_apart() {
        use Backend::{Postgres, Sqlite};
        // SQLite result codes, primary or extended (the low byte is the primary code).
        assert_eq!(classify(Sqlite, "13"), Failure::Full);
        assert_eq!(classify(Sqlite, &(13 | (1 << 8)).to_string()), Failure::Full);
        assert_eq!(classify(Sqlite, "5"), Failure::Unavailable);
        assert_eq!(classify(Sqlite, "517"), Failure::Unavailable, "SQLITE_BUSY_SNAPSHOT");
        for other in ["1", "10", "778", "11", "19", "", "abc"] {
            assert_eq!(classify(Sqlite, other), Failure::Other, "{other:?}");
        }
        // PostgreSQL SQLSTATEs.
        assert_eq!(classify(Postgres, "53100"), Failure::Full, "disk_full");
        for passing in ["53000", "53200", "53300", "53400", "08006", "08001", "57P01", "57P02", "57P03"] {
            assert_eq!(classify(Postgres, passing), Failure::Unavailable, "{passing}");
        }
        for other in ["42P01", "23503", "22001", "40001", "57014", "XX000", "13"] {
            assert_eq!(classify(Postgres, other), Failure::Other, "{other}");
        }
    }

    /// A real SQLITE_FULL (the database may not grow past `max_page_count`) through `db_err`:
    /// `StoreError::Full`, and the connection is fine for the next statement.
    #[tokio::test]
    async fn sqlite_full_is_storage_full() {
        let dir = tempfile::tempdir().unwrap();
        let opts = SqliteConnectOptions::new()
            .filename(dir.path().join("full.db"))
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal);
        let pool = SqlitePoolOptions::new().max_connections(1).connect_with(opts).await.unwrap();
        sqlx::query("CREATE TABLE t (b BLOB)").execute(&pool).await.unwrap();
        sqlx::query("PRAGMA max_page_count = 8").execute(&pool).await.unwrap();
        let err = sqlx::query("INSERT INTO t VALUES (zeroblob(100000))").execute(&pool).await.unwrap_err();
        match db_err(err) {
            StoreError::Full(m) => assert!(m.starts_with("13: "), "{m}"),
            other => panic!("want StoreError::Full, got {other:?}"),
        }
        sqlx::query("INSERT INTO t VALUES (x'00')").execute(&pool).await.unwrap();
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM t").fetch_one(&pool).await.unwrap();
        assert_eq!(n, 1, "the refused insert left nothing behind");
    }

    /// PostgreSQL's own errors, raised with their SQLSTATE, through `db_err`: `disk_full` is
    /// `StoreError::Full`, a shortage of connections or memory `Unavailable`.
    #[tokio::test]
    async fn postgres_disk_full_is_storage_full() {
        let url = std::env::var("PORTCULLIS_TEST_PG_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .connect(&url)
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL (PORTCULLIS_TEST_PG_URL) is required: {e}"));
        for (sqlstate, want) in
            [("53100", "full"), ("53200", "unavailable"), ("53300", "unavailable"), ("XX000", "internal")]
        {
            let raise = format!("DO $$ BEGIN RAISE EXCEPTION 'simulated' USING ERRCODE = '{sqlstate}'; END $$");
            let err = sqlx::query(sqlx::AssertSqlSafe(raise)).execute(&pool).await.unwrap_err();
            let got = match db_err(err) {
                StoreError::Full(m) => ("full", m),
                StoreError::Unavailable(m) => ("unavailable", m),
                StoreError::Internal(m) => ("internal", m),
                other => panic!("{sqlstate}: {other:?}"),
            };
            assert_eq!(got.0, want, "{sqlstate}: {}", got.1);
            assert!(got.1.starts_with(sqlstate), "{}", got.1);
        }
        pool.close().await;
    }

    /// SQLite may end a transaction itself on SQLITE_FULL; sqlx then still counts it open and
    /// its ROLLBACK fails. Such a connection must not be reused: the next `BEGIN IMMEDIATE` on
    /// it would fail, and a plain `BEGIN` would become a savepoint that never commits alone.
    #[tokio::test]
    async fn a_transaction_ended_by_a_full_disk_does_not_poison_the_pool() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("full.db"), 0).await.unwrap();
        let pool = store.pool.clone();
        sqlx::query("CREATE TABLE t (b BLOB)").execute(&pool).await.unwrap();
        for _ in 0..8 {
            let mut conn = pool.acquire().await.unwrap();
            sqlx::query("PRAGMA max_page_count = 200").execute(&mut *conn).await.unwrap();
            let mut tx = sqlx::Connection::begin(&mut *conn).await.unwrap();
            sqlx::query("INSERT INTO t VALUES (x'01')").execute(&mut *tx).await.unwrap();
            let err = sqlx::query("INSERT INTO t VALUES (zeroblob(2000000))").execute(&mut *tx).await.unwrap_err();
            assert!(matches!(db_err(err), StoreError::Full(_)));
            drop(tx);
            sqlx::query("PRAGMA max_page_count = 1000000").execute(&mut *conn).await.unwrap();
        }
        for _ in 0..8 {
            let mut tx = pool.begin_with("BEGIN IMMEDIATE").await.unwrap();
            sqlx::query("INSERT INTO t VALUES (x'02')").execute(&mut *tx).await.unwrap();
            tx.commit().await.unwrap();
        }
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM t").fetch_one(&pool).await.unwrap();
        assert_eq!(n, 8, "only the committed rows");
        store.close().await;
    }

    #[test]
    fn unreachable_databases_are_unavailable() {
        assert!(matches!(db_err(sqlx::Error::PoolTimedOut), StoreError::Unavailable(_)));
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        assert!(matches!(db_err(sqlx::Error::Io(io)), StoreError::Unavailable(_)));
    }
}
