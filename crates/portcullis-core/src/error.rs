//! The error types that cross the core's boundary. Adapters map their own failures into
//! [`StoreError`]; the web crate maps [`Error`] and [`OAuthError`] to HTTP once.

use std::fmt;

/// Opaque storage failure: the core never sees sqlx. `Unavailable`, `Full` and `Internal` carry a
/// description for the log only; it is never shown to a client.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("not found")]
    NotFound,
    /// The database cannot be reached or is short of a passing resource (connections,
    /// memory, shutting down): retry soon.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// The disk under the database is full (SQLITE_FULL, PostgreSQL `disk_full`): nothing of
    /// the write was kept; retry once space has been freed.
    #[error("storage full: {0}")]
    Full(String),
    #[error("storage error: {0}")]
    Internal(String),
}

/// What a write refused for a full disk tells the client: HTTP 507 on the API, 503
/// `temporarily_unavailable` on OAuth endpoints (RFC 6749 clients know no 507).
pub const STORAGE_FULL: &str = "storage full: the change was not saved; retry once disk space has been freed";
/// `Retry-After` (seconds) of a refusal for a full disk: space comes back only when an
/// operator frees some.
pub const STORAGE_FULL_RETRY_AFTER: u64 = 30;
/// `Retry-After` (seconds) when the database was unreachable.
pub const STORAGE_UNAVAILABLE_RETRY_AFTER: u64 = 2;

/// A use-case failure. Every variant maps to exactly one HTTP status in `portcullis-web`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Ill-formed input; the message names the expected form.
    #[error("{0}")]
    InvalidInput(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    /// Missing or bad credentials (401).
    #[error("{0}")]
    Unauthenticated(String),
    /// Authenticated but not allowed (403).
    #[error("{0}")]
    Forbidden(String),
    #[error("too many requests")]
    RateLimited { retry_after_secs: u64 },
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A failure that must not be described to the client (keys, crypto, invariants).
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidInput(msg.into())
    }
    pub fn internal(msg: impl fmt::Display) -> Self {
        Error::Internal(msg.to_string())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// RFC 6749 §5.2 (and RFC 7009 / RFC 8707) error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OAuthErrorCode {
    InvalidRequest,
    InvalidClient,
    InvalidGrant,
    UnauthorizedClient,
    UnsupportedGrantType,
    InvalidScope,
    InvalidTarget,
    UnsupportedTokenType,
    /// Not an RFC code on the wire: mapped to 429 with `slow_down`-style text.
    TooManyRequests,
    /// `server_error`: details go to the log only.
    ServerError,
    TemporarilyUnavailable,
}

impl OAuthErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidRequest => "invalid_request",
            Self::InvalidClient => "invalid_client",
            Self::InvalidGrant => "invalid_grant",
            Self::UnauthorizedClient => "unauthorized_client",
            Self::UnsupportedGrantType => "unsupported_grant_type",
            Self::InvalidScope => "invalid_scope",
            Self::InvalidTarget => "invalid_target",
            Self::UnsupportedTokenType => "unsupported_token_type",
            Self::TooManyRequests => "slow_down",
            Self::ServerError => "server_error",
            Self::TemporarilyUnavailable => "temporarily_unavailable",
        }
    }
}

/// An error on an OAuth endpoint: code plus a description safe to show the client.
#[derive(Debug, thiserror::Error)]
#[error("{}: {description}", code.as_str())]
pub struct OAuthError {
    pub code: OAuthErrorCode,
    pub description: String,
    /// For `ServerError`: what went wrong, for the log only.
    pub internal: Option<String>,
    pub retry_after_secs: Option<u64>,
}

impl OAuthError {
    pub fn new(code: OAuthErrorCode, description: impl Into<String>) -> Self {
        Self { code, description: description.into(), internal: None, retry_after_secs: None }
    }
    pub fn invalid_request(d: impl Into<String>) -> Self {
        Self::new(OAuthErrorCode::InvalidRequest, d)
    }
    pub fn invalid_client(d: impl Into<String>) -> Self {
        Self::new(OAuthErrorCode::InvalidClient, d)
    }
}

impl From<Error> for OAuthError {
    fn from(e: Error) -> Self {
        match e {
            Error::InvalidInput(m) => OAuthError::invalid_request(m),
            Error::Unauthenticated(m) => OAuthError::invalid_client(m),
            Error::RateLimited { retry_after_secs } => OAuthError {
                retry_after_secs: Some(retry_after_secs),
                ..OAuthError::new(OAuthErrorCode::TooManyRequests, "too many requests")
            },
            Error::Store(StoreError::Unavailable(m)) => OAuthError {
                internal: Some(m),
                retry_after_secs: Some(STORAGE_UNAVAILABLE_RETRY_AFTER),
                ..OAuthError::new(OAuthErrorCode::TemporarilyUnavailable, "try again later")
            },
            Error::Store(StoreError::Full(m)) => OAuthError {
                internal: Some(m),
                retry_after_secs: Some(STORAGE_FULL_RETRY_AFTER),
                ..OAuthError::new(OAuthErrorCode::TemporarilyUnavailable, STORAGE_FULL)
            },
            other => OAuthError {
                internal: Some(other.to_string()),
                ..OAuthError::new(OAuthErrorCode::ServerError, "internal error")
            },
        }
    }
}

impl From<StoreError> for OAuthError {
    fn from(e: StoreError) -> Self {
        Error::Store(e).into()
    }
}
