//! Domain records as the store keeps them. Secrets appear only as [`SecretHash`]es or sealed
//! (AEAD-encrypted) blobs, and every `Debug` here is safe to log.

use serde::{Deserialize, Serialize};

use crate::clock::UnixTime;
use crate::crypto::secrets::SecretHash;
use crate::crypto::signing::Algorithm;
use crate::error::{Error, Result};
use crate::ids::{ClientId, Email, PermissionName, RoleName, ScopeName, Slug};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Organisation {
    pub id: String,
    pub slug: Slug,
    pub name: String,
    /// DNS names (and their subdomains) its `server-transport` certificates may carry.
    pub allowed_domains: Vec<String>,
    /// People may sign themselves up on `/register` (off by default).
    pub self_registration: bool,
    pub created_at: UnixTime,
    pub updated_at: UnixTime,
}

/// A resource server: the audience its tokens carry, and the scopes, roles and permissions it defines.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Service {
    pub id: String,
    pub org_id: String,
    pub slug: Slug,
    pub name: String,
    pub audience: String,
    pub scopes: Vec<ScopeName>,
    pub roles: Vec<RoleName>,
    pub permissions: Vec<PermissionName>,
    pub created_at: UnixTime,
    pub updated_at: UnixTime,
}

/// One permission granted to one role within an organisation.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct RoleGrant {
    pub role: RoleName,
    pub permission: PermissionName,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrantType {
    ClientCredentials,
    AuthorizationCode,
    RefreshToken,
}

impl GrantType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClientCredentials => "client_credentials",
            Self::AuthorizationCode => "authorization_code",
            Self::RefreshToken => "refresh_token",
        }
    }
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "client_credentials" => Ok(Self::ClientCredentials),
            "authorization_code" => Ok(Self::AuthorizationCode),
            "refresh_token" => Ok(Self::RefreshToken),
            _ => Err(Error::invalid(format!(
                "unknown grant type {s:?}: expected client_credentials, authorization_code or refresh_token"
            ))),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMethod {
    ClientSecretBasic,
    ClientSecretPost,
    PrivateKeyJwt,
    TlsClientAuth,
    None,
}

impl AuthMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClientSecretBasic => "client_secret_basic",
            Self::ClientSecretPost => "client_secret_post",
            Self::PrivateKeyJwt => "private_key_jwt",
            Self::TlsClientAuth => "tls_client_auth",
            Self::None => "none",
        }
    }
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "client_secret_basic" => Ok(Self::ClientSecretBasic),
            "client_secret_post" => Ok(Self::ClientSecretPost),
            "private_key_jwt" => Ok(Self::PrivateKeyJwt),
            "tls_client_auth" => Ok(Self::TlsClientAuth),
            "none" => Ok(Self::None),
            _ => Err(Error::invalid(format!(
                "unknown token_endpoint_auth_method {s:?}: expected client_secret_basic, client_secret_post, private_key_jwt, tls_client_auth or none"
            ))),
        }
    }
    pub fn uses_secret(self) -> bool {
        matches!(self, Self::ClientSecretBasic | Self::ClientSecretPost)
    }
}

/// An OAuth client. `secret_hash` is the keyed hash of the current secret; during a rotation
/// grace period `previous_secret_hash` is accepted until `previous_secret_expires_at`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Application {
    pub id: String,
    pub org_id: String,
    pub slug: Slug,
    pub client_id: ClientId,
    pub name: String,
    pub grant_types: Vec<GrantType>,
    pub scopes: Vec<ScopeName>,
    pub roles: Vec<RoleName>,
    pub auth_method: AuthMethod,
    pub redirect_uris: Vec<String>,
    /// A JWKS URL for `private_key_jwt`, used besides the application's signing certificates.
    pub jwks_uri: Option<String>,
    pub access_token_lifetime: i64,
    pub signing_alg: Algorithm,
    /// The ID token's algorithm (`id_token_signed_response_alg`).
    pub id_token_signing_alg: Algorithm,
    /// Trusted by the organisation: its users are not asked for consent.
    pub first_party: bool,
    /// Where RP-initiated logout may send the browser afterwards (exact match).
    pub post_logout_redirect_uris: Vec<String>,
    /// Back-channel logout endpoint (OIDC Back-Channel Logout 1.0).
    pub backchannel_logout_uri: Option<String>,
    /// Refresh tokens for the authorization code grant even without `offline_access`.
    pub always_issue_refresh_token: bool,
    pub enabled: bool,
    pub secret_hash: Option<SecretHash>,
    pub previous_secret_hash: Option<SecretHash>,
    pub previous_secret_expires_at: Option<UnixTime>,
    pub created_at: UnixTime,
    pub updated_at: UnixTime,
}

#[derive(Clone, PartialEq, Eq)]
pub struct User {
    pub id: String,
    pub org_id: String,
    pub email: Email,
    pub name: Option<String>,
    /// Argon2id PHC string.
    pub password_hash: Option<String>,
    pub roles: Vec<RoleName>,
    pub enabled: bool,
    /// Consecutive failed logins since the last success (lockout counter).
    pub failed_logins: u32,
    /// Logins are refused until then, whatever the password.
    pub locked_until: Option<UnixTime>,
    pub created_at: UnixTime,
    pub updated_at: UnixTime,
}

impl std::fmt::Debug for User {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("User")
            .field("id", &self.id)
            .field("org_id", &self.org_id)
            .field("email", &self.email)
            .field("roles", &self.roles)
            .field("enabled", &self.enabled)
            .field("locked_until", &self.locked_until)
            .finish_non_exhaustive()
    }
}

/// One of a user's email addresses. The primary one is also `User::email`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UserEmail {
    pub id: String,
    pub user_id: String,
    pub org_id: String,
    pub email: Email,
    pub verified_at: Option<UnixTime>,
    pub created_at: UnixTime,
}

impl UserEmail {
    /// The row a new user's primary address gets: the user's own id, not yet verified.
    pub fn primary_of(u: &User) -> Self {
        Self {
            id: u.id.clone(),
            user_id: u.id.clone(),
            org_id: u.org_id.clone(),
            email: u.email.clone(),
            verified_at: None,
            created_at: u.created_at,
        }
    }
}

/// Lifecycle shared by login sessions and API keys: usable only once an emailed code is verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CredentialState {
    /// Created; waiting for its emailed code.
    Pending,
    Active,
    Revoked,
}

impl CredentialState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Active => "active",
            Self::Revoked => "revoked",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "pending" => Some(Self::Pending),
            "active" => Some(Self::Active),
            "revoked" => Some(Self::Revoked),
            _ => None,
        }
    }
}

/// A login session. The token itself is never stored: only its keyed hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub id: String,
    pub user_id: String,
    pub org_id: String,
    pub token_hash: SecretHash,
    pub state: CredentialState,
    pub created_at: UnixTime,
    pub verified_at: Option<UnixTime>,
    /// Refreshed at most once a minute (idle timeout), so validation stays read-only.
    pub last_used_at: UnixTime,
    /// Absolute end, whatever the activity.
    pub expires_at: UnixTime,
    pub ip: Option<String>,
    pub user_agent: Option<String>,
    pub revoked_at: Option<UnixTime>,
    /// A gateway browser session: the SSO session it was signed in with. It is refused once
    /// that one has ended, and never outlives it.
    pub parent_id: Option<String>,
}

/// An API key: a public identifier (`api-key` header) and a secret (`api-secret`), of which
/// only the keyed hash is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    pub id: String,
    pub org_id: String,
    /// The user who created it; its roles are a subset of theirs, checked again on every use.
    pub user_id: String,
    pub name: String,
    pub key: String,
    pub secret_hash: SecretHash,
    pub roles: Vec<RoleName>,
    pub state: CredentialState,
    pub expires_at: Option<UnixTime>,
    pub last_used_at: Option<UnixTime>,
    pub created_at: UnixTime,
    pub revoked_at: Option<UnixTime>,
}

/// What an emailed code confirms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum VerificationPurpose {
    Session,
    ApiKey,
    Email,
    PasswordReset,
    /// An invitation link (admin invite or self-registration): set a password, verify the address.
    Invite,
}

impl VerificationPurpose {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Session => "session",
            Self::ApiKey => "api_key",
            Self::Email => "email",
            Self::PasswordReset => "password_reset",
            Self::Invite => "invite",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "session" => Some(Self::Session),
            "api_key" => Some(Self::ApiKey),
            "email" => Some(Self::Email),
            "password_reset" => Some(Self::PasswordReset),
            "invite" => Some(Self::Invite),
            _ => None,
        }
    }
}

/// An emailed one-time code: only its keyed hash (bound to this verification's id) is kept.
#[derive(Clone, PartialEq, Eq)]
pub struct Verification {
    pub id: String,
    pub purpose: VerificationPurpose,
    pub org_id: String,
    pub user_id: String,
    /// The session, API key or email-address row it confirms (the user id for a reset).
    pub subject_id: String,
    pub code_hash: SecretHash,
    /// Tries so far, counted before each comparison.
    pub attempts: u32,
    pub expires_at: UnixTime,
    pub consumed_at: Option<UnixTime>,
    pub created_at: UnixTime,
    /// A pending session's token, sealed (AEAD) until the code is verified, then erased, so
    /// the verify answer can return the very token the client already holds.
    pub sealed_token: Option<Vec<u8>>,
}

impl std::fmt::Debug for Verification {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verification")
            .field("id", &self.id)
            .field("purpose", &self.purpose)
            .field("subject_id", &self.subject_id)
            .field("attempts", &self.attempts)
            .field("expires_at", &self.expires_at)
            .field("consumed_at", &self.consumed_at)
            .finish_non_exhaustive()
    }
}

/// What consuming a verification changes, in the same transaction.
#[derive(Clone, PartialEq, Eq)]
pub enum VerificationEffect {
    /// The pending session becomes active; the user's primary email counts as verified.
    ActivateSession {
        session_id: String,
    },
    ActivateApiKey {
        key_id: String,
    },
    VerifyEmail {
        email_id: String,
    },
    /// New password hash; every session of the user ends, every API key is revoked; the
    /// lockout is lifted.
    ResetPassword {
        user_id: String,
        password_hash: String,
    },
    /// An accepted invitation: the password is set, the address (`email_id`) verified, the
    /// lockout lifted.
    AcceptInvite {
        user_id: String,
        email_id: String,
        password_hash: String,
    },
}

impl std::fmt::Debug for VerificationEffect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::ActivateSession { session_id } => write!(f, "ActivateSession({session_id})"),
            Self::ActivateApiKey { key_id } => write!(f, "ActivateApiKey({key_id})"),
            Self::VerifyEmail { email_id } => write!(f, "VerifyEmail({email_id})"),
            Self::ResetPassword { user_id, .. } => write!(f, "ResetPassword({user_id})"),
            Self::AcceptInvite { user_id, email_id, .. } => write!(f, "AcceptInvite({user_id}, {email_id})"),
        }
    }
}

/// An email waiting for delivery. The body (which may hold a code) is sealed at rest and
/// erased once sent; failed deliveries are retried with backoff, never dropped.
#[derive(Clone, PartialEq, Eq)]
pub struct QueuedMail {
    pub id: String,
    pub to: String,
    pub subject: String,
    /// Sealed JSON `{text, html}`; empty once sent.
    pub sealed_body: Vec<u8>,
    pub attempts: u32,
    pub next_attempt_at: UnixTime,
    pub last_error: Option<String>,
    pub created_at: UnixTime,
    pub sent_at: Option<UnixTime>,
}

impl std::fmt::Debug for QueuedMail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueuedMail")
            .field("id", &self.id)
            .field("to", &self.to)
            .field("subject", &self.subject)
            .field("attempts", &self.attempts)
            .field("sent_at", &self.sent_at)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyState {
    /// Published in the JWKS, not yet signing.
    Next,
    /// Signing.
    Current,
    /// Published until every token it signed has expired.
    Retired,
}

impl KeyState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Next => "next",
            Self::Current => "current",
            Self::Retired => "retired",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "next" => Some(Self::Next),
            "current" => Some(Self::Current),
            "retired" => Some(Self::Retired),
            _ => None,
        }
    }
}

/// A token signing key at rest: the private key is sealed with the master key.
#[derive(Clone, PartialEq, Eq)]
pub struct StoredSigningKey {
    pub kid: String,
    pub alg: Algorithm,
    pub state: KeyState,
    pub sealed_private_key: Vec<u8>,
    pub created_at: UnixTime,
    pub activated_at: Option<UnixTime>,
    /// For retired keys: when it may leave the JWKS.
    pub expires_at: Option<UnixTime>,
}

impl std::fmt::Debug for StoredSigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredSigningKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaKind {
    Root,
    Issuing,
}

impl CaKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Root => "root",
            Self::Issuing => "issuing",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "root" => Some(Self::Root),
            "issuing" => Some(Self::Issuing),
            _ => None,
        }
    }
}

/// A CA certificate and its sealed private key.
#[derive(Clone, PartialEq, Eq)]
pub struct CaCertificate {
    pub id: String,
    pub kind: CaKind,
    pub subject: String,
    pub certificate_pem: String,
    pub sealed_private_key: Vec<u8>,
    pub not_before: UnixTime,
    pub not_after: UnixTime,
    pub active: bool,
    pub created_at: UnixTime,
}

impl std::fmt::Debug for CaCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaCertificate")
            .field("id", &self.id)
            .field("kind", &self.kind)
            .field("subject", &self.subject)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// An access token revoked before its expiry (RFC 7009): kept until `expires_at`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevokedToken {
    pub jti: String,
    pub client_id: String,
    pub expires_at: UnixTime,
    pub revoked_at: UnixTime,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditEvent {
    pub id: String,
    pub at: UnixTime,
    pub org_id: Option<String>,
    /// Who acted: a client id, user id, `system` or, for failed authentication, what was presented.
    pub actor: String,
    pub action: String,
    pub target: String,
    /// `success` or `failure`.
    pub outcome: String,
    pub ip: Option<String>,
    pub details: serde_json::Value,
}

/// An audit row as the change feeds read it: its position in the log (`seq`; since the hash
/// chain, positions are taken under the chain head's lock and so commit in order, but the
/// feeds still handle a position appearing late, as databases written before it may) and what
/// happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditMark {
    pub seq: i64,
    pub at: UnixTime,
    pub action: String,
    pub outcome: String,
}

/// One role → permission grant, with the slug of the organisation that made it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OrgRoleGrant {
    pub org: Slug,
    pub role: RoleName,
    pub permission: PermissionName,
}

/// What the portal's dashboard shows of an organisation (see `Store::organisation_counts`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct OrganisationCounts {
    pub applications: u64,
    pub users: u64,
    /// Active (not revoked, not expired) certificates whose `not_after` is before a bound.
    pub certificates_expiring: u64,
    /// Failed password or second-factor steps of sign-ins (`session.login`, `session.verify`)
    /// since a bound.
    pub failed_sign_ins: u64,
}

/// Criteria for querying audit events; `None` matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditFilter {
    /// `session.` matches `session.login`, `session.verify`, …
    pub action_prefix: Option<String>,
    pub actor: Option<String>,
    pub target: Option<String>,
    /// `success` or `failure`.
    pub outcome: Option<String>,
    /// Unix seconds, inclusive.
    pub since: Option<UnixTime>,
    /// Unix seconds, exclusive.
    pub until: Option<UnixTime>,
}

/// Offset pagination, bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Page {
    pub limit: u32,
    pub offset: u64,
}

impl Page {
    pub const MAX_LIMIT: u32 = 500;
    pub fn new(limit: Option<u32>, offset: Option<u64>) -> Self {
        Self { limit: limit.unwrap_or(100).clamp(1, Self::MAX_LIMIT), offset: offset.unwrap_or(0) }
    }
}

impl Default for Page {
    fn default() -> Self {
        Self::new(None, None)
    }
}

/// The certificate profiles (DESIGN §4): what a certificate of each type is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CertificateType {
    /// mTLS client (EKU clientAuth).
    Transport,
    /// A resource server's TLS (EKU serverAuth, DNS SANs within the organisation's domains).
    ServerTransport,
    /// `private_key_jwt` signing key (digitalSignature only, no EKU); published in the JWKS.
    Signing,
}

impl CertificateType {
    pub const ALL: [Self; 3] = [Self::Transport, Self::ServerTransport, Self::Signing];
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Transport => "transport",
            Self::ServerTransport => "server-transport",
            Self::Signing => "signing",
        }
    }
    pub fn parse(s: &str) -> Result<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s).ok_or_else(|| {
            Error::invalid(format!("unknown certificate type {s:?}: expected transport, server-transport or signing"))
        })
    }
}

/// RFC 5280 §5.3.1 reason codes a revocation may carry. `certificateHold` and `removeFromCRL`
/// are not offered: a revocation here is final.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RevocationReason {
    Unspecified,
    KeyCompromise,
    CaCompromise,
    AffiliationChanged,
    Superseded,
    CessationOfOperation,
    PrivilegeWithdrawn,
    AaCompromise,
}

impl RevocationReason {
    pub const ALL: [Self; 8] = [
        Self::Unspecified,
        Self::KeyCompromise,
        Self::CaCompromise,
        Self::AffiliationChanged,
        Self::Superseded,
        Self::CessationOfOperation,
        Self::PrivilegeWithdrawn,
        Self::AaCompromise,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unspecified => "unspecified",
            Self::KeyCompromise => "key_compromise",
            Self::CaCompromise => "ca_compromise",
            Self::AffiliationChanged => "affiliation_changed",
            Self::Superseded => "superseded",
            Self::CessationOfOperation => "cessation_of_operation",
            Self::PrivilegeWithdrawn => "privilege_withdrawn",
            Self::AaCompromise => "aa_compromise",
        }
    }
    /// The CRLReason code.
    pub fn code(self) -> u8 {
        match self {
            Self::Unspecified => 0,
            Self::KeyCompromise => 1,
            Self::CaCompromise => 2,
            Self::AffiliationChanged => 3,
            Self::Superseded => 4,
            Self::CessationOfOperation => 5,
            Self::PrivilegeWithdrawn => 9,
            Self::AaCompromise => 10,
        }
    }
    /// Accepts our snake_case names, RFC 5280's camelCase names and the numeric codes.
    pub fn parse(s: &str) -> Result<Self> {
        let folded: String = s.chars().filter(|c| *c != '_' && *c != '-').collect::<String>().to_ascii_lowercase();
        Self::ALL.into_iter().find(|r| r.as_str().replace('_', "") == folded || r.code().to_string() == s).ok_or_else(
            || {
                Error::invalid(format!(
                    "unknown revocation reason {s:?}: expected one of unspecified, key_compromise, ca_compromise, \
                     affiliation_changed, superseded, cessation_of_operation, privilege_withdrawn, aa_compromise \
                     (or the RFC 5280 code)"
                ))
            },
        )
    }
}

/// A certificate issued to an application, as kept in the inventory. `serial` is lowercase
/// hex; `fingerprint` the lowercase hex SHA-256 of the DER (its base64url form is `x5t#S256`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCertificate {
    pub id: String,
    pub org_id: String,
    pub app_id: String,
    pub client_id: ClientId,
    pub cert_type: CertificateType,
    pub serial: String,
    /// The id of the issuing CA certificate that signed it.
    pub issuer_id: String,
    pub subject: String,
    /// `DNS:…` and `URI:…` entries, as issued.
    pub sans: Vec<String>,
    /// `EC P-256`, `EC P-384`, `RSA 3072`, `Ed25519`, …
    pub key_type: String,
    /// Lowercase hex SHA-256 of the subject public key info (the same key across renewals).
    pub spki_sha256: String,
    pub fingerprint: String,
    pub certificate_pem: String,
    pub not_before: UnixTime,
    pub not_after: UnixTime,
    pub revoked_at: Option<UnixTime>,
    pub revocation_reason: Option<RevocationReason>,
    /// The certificate this one renewed.
    pub renewed_from: Option<String>,
    /// When the organisation's admins were warned of its expiry.
    pub expiry_notified_at: Option<UnixTime>,
    pub created_by: String,
    pub created_at: UnixTime,
}

impl IssuedCertificate {
    pub fn status(&self, now: UnixTime) -> CertificateStatus {
        if self.revoked_at.is_some() {
            CertificateStatus::Revoked
        } else if self.not_after <= now {
            CertificateStatus::Expired
        } else {
            CertificateStatus::Active
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CertificateStatus {
    Active,
    Revoked,
    Expired,
}

impl CertificateStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Revoked => "revoked",
            Self::Expired => "expired",
        }
    }
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "active" => Ok(Self::Active),
            "revoked" => Ok(Self::Revoked),
            "expired" => Ok(Self::Expired),
            _ => Err(Error::invalid(format!("unknown certificate status {s:?}: expected active, revoked or expired"))),
        }
    }
}

/// Inventory search: every given criterion must match. `status` is judged at `now`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CertificateFilter {
    pub app_id: Option<String>,
    pub cert_type: Option<CertificateType>,
    pub status: Option<CertificateStatus>,
    /// Lowercase hex, as stored.
    pub serial: Option<String>,
    pub fingerprint: Option<String>,
    pub spki_sha256: Option<String>,
    /// `not_after` strictly before this.
    pub expires_before: Option<UnixTime>,
    pub now: UnixTime,
}

/// One entry of a CRL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevokedEntry {
    pub serial: String,
    pub revoked_at: UnixTime,
    pub reason: RevocationReason,
}

/// The latest CRL an issuing CA signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredCrl {
    pub issuer_id: String,
    pub number: u64,
    pub this_update: UnixTime,
    pub next_update: UnixTime,
    pub der: Vec<u8>,
}

// ---- OpenID Connect (people signing in to applications) ----------------------------------

/// An authorization code (RFC 6749 §4.1) as stored: only its keyed hash. Single use; what its
/// redemption issued is recorded so a replay can revoke it (RFC 6749 §4.1.2).
#[derive(Clone, PartialEq, Eq)]
pub struct AuthorizationCode {
    pub code_hash: SecretHash,
    pub client_id: String,
    pub org_id: String,
    pub user_id: String,
    /// The SSO session (login session) it was issued in: the ID token's `sid`.
    pub session_id: String,
    pub redirect_uri: String,
    /// Granted scopes, space-separated.
    pub scope: String,
    pub nonce: Option<String>,
    /// PKCE S256 challenge (RFC 7636), if the request carried one.
    pub code_challenge: Option<String>,
    pub auth_time: UnixTime,
    pub amr: Vec<String>,
    pub created_at: UnixTime,
    pub expires_at: UnixTime,
    pub consumed_at: Option<UnixTime>,
    /// The access token its redemption issued (`jti`, and when it expires) …
    pub issued_jti: Option<String>,
    pub issued_jti_expires_at: Option<UnixTime>,
    /// … and the refresh-token family, if any.
    pub issued_family: Option<String>,
    /// Or, redeemed by a gateway for a browser session, that session's id.
    pub issued_session: Option<String>,
}

impl std::fmt::Debug for AuthorizationCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthorizationCode")
            .field("client_id", &self.client_id)
            .field("user_id", &self.user_id)
            .field("session_id", &self.session_id)
            .field("expires_at", &self.expires_at)
            .field("consumed_at", &self.consumed_at)
            .finish_non_exhaustive()
    }
}

/// What redeeming a code issued: recorded on the code in the redemption's transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodeIssue {
    pub jti: String,
    pub jti_expires_at: UnixTime,
    /// The first refresh token of a new family, if one was issued.
    pub refresh: Option<RefreshToken>,
}

/// A refresh token as stored: only its keyed hash. Single use: each use marks it used and
/// inserts its successor in the same family; using a used one revokes the whole family.
#[derive(Clone, PartialEq, Eq)]
pub struct RefreshToken {
    pub id: String,
    pub token_hash: SecretHash,
    pub family_id: String,
    pub client_id: String,
    pub org_id: String,
    pub user_id: String,
    /// The SSO session it was issued in; ending that session revokes it.
    pub session_id: String,
    pub scope: String,
    pub auth_time: UnixTime,
    pub amr: Vec<String>,
    pub created_at: UnixTime,
    pub expires_at: UnixTime,
    pub used_at: Option<UnixTime>,
    pub revoked_at: Option<UnixTime>,
}

impl std::fmt::Debug for RefreshToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RefreshToken")
            .field("id", &self.id)
            .field("family_id", &self.family_id)
            .field("client_id", &self.client_id)
            .field("user_id", &self.user_id)
            .field("expires_at", &self.expires_at)
            .field("used_at", &self.used_at)
            .field("revoked_at", &self.revoked_at)
            .finish_non_exhaustive()
    }
}

/// A user's consent to an application for a set of scopes (remembered until revoked).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Consent {
    pub user_id: String,
    pub client_id: String,
    pub org_id: String,
    /// Sorted, deduplicated.
    pub scopes: Vec<String>,
    pub granted_at: UnixTime,
}

/// A back-channel logout token waiting to be POSTed to an application, retried with backoff.
#[derive(Clone, PartialEq, Eq)]
pub struct LogoutDelivery {
    pub id: String,
    pub client_id: String,
    pub uri: String,
    /// The signed logout token (a JWT).
    pub logout_token: String,
    pub attempts: u32,
    pub next_attempt_at: UnixTime,
    pub created_at: UnixTime,
    pub delivered_at: Option<UnixTime>,
    /// Set when it was given up after the last retry.
    pub failed_at: Option<UnixTime>,
}

impl std::fmt::Debug for LogoutDelivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogoutDelivery")
            .field("id", &self.id)
            .field("client_id", &self.client_id)
            .field("uri", &self.uri)
            .field("attempts", &self.attempts)
            .field("next_attempt_at", &self.next_attempt_at)
            .field("delivered_at", &self.delivered_at)
            .field("failed_at", &self.failed_at)
            .finish_non_exhaustive()
    }
}

/// A user's TOTP second factor (RFC 6238): the secret sealed, the last accepted time step
/// (a code is never accepted twice).
#[derive(Clone, PartialEq, Eq)]
pub struct UserTotp {
    pub user_id: String,
    pub sealed_secret: Vec<u8>,
    /// `None` while enrolment waits for the first code.
    pub confirmed_at: Option<UnixTime>,
    pub last_step: Option<i64>,
    pub created_at: UnixTime,
}

impl std::fmt::Debug for UserTotp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserTotp")
            .field("user_id", &self.user_id)
            .field("confirmed_at", &self.confirmed_at)
            .field("last_step", &self.last_step)
            .finish_non_exhaustive()
    }
}
