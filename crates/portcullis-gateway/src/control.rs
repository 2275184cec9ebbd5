//! The gateway's view of the control plane (DESIGN §5): everything the data plane needs to know
//! and may ask, as one trait, so the same pipeline runs inside `portcullis serve`
//! ([`crate::inprocess::InProcess`], direct calls into the core) and alone as
//! `portcullis gateway` ([`crate::remote::Remote`], HTTPS calls to a control plane's internal
//! gateway endpoints, documented in `docs/gateway-control-plane.md`).
//!
//! What the data plane holds locally and refreshes: the token signing keys ([`ControlPlane::signing_keys`]),
//! the trust anchors and CRLs for client certificates ([`ControlPlane::trust`]), the role →
//! permission grants ([`ControlPlane::grants`]), the set of revoked token `jti`s. What it asks
//! per credential, caching answers briefly: API keys, session tokens, and which application a
//! client certificate belongs to. [`ControlPlane::changes`] is the long-polled feed that tells it
//! when any of that went stale.

use std::net::IpAddr;
use std::time::Duration;

use async_trait::async_trait;
use portcullis_core::crypto::signing::VerifyingKey;
use zeroize::Zeroizing;

use crate::policy::{Identity, PermissionGrants};

/// The control plane could not answer (unreachable, timed out, 5xx, malformed answer). The text
/// is for the log; callers answer 503 without it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("control plane unavailable: {0}")]
pub struct Unavailable(pub String);

/// Why the control plane refused a credential. `message` is safe to show to the caller (it goes
/// into `x-error`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// 401 (not authenticated), 403 (authenticated but disabled/not allowed) or 429 (too many
    /// failures; `retry_after_secs` set).
    pub status: u16,
    pub message: String,
    pub retry_after_secs: Option<u64>,
}

/// The answer about one credential: who it is (its `auth_method` set by the caller), or why not.
pub type Verdict = Result<Identity, Refusal>;

/// Trust for client certificates: every CA certificate a client chain may end at (roots and
/// issuing CAs, DER), and the current CRL of every issuing CA (DER).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustBundle {
    pub anchors: Vec<Vec<u8>>,
    pub crls: Vec<Vec<u8>>,
}

/// What kind of certificate the gateway needs for itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertificatePurpose {
    /// The listener's TLS server certificate, for the configured host names.
    Server,
    /// The platform transport certificate presented to upstreams that require mTLS.
    UpstreamClient,
}

/// A certificate issued to the gateway itself, with its private key (PKCS#8 DER).
pub struct IssuedKeyPair {
    /// The leaf, then its issuers (DER).
    pub chain: Vec<Vec<u8>>,
    pub key_pkcs8: Zeroizing<Vec<u8>>,
    /// Unix seconds.
    pub not_after: i64,
}

impl std::fmt::Debug for IssuedKeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedKeyPair")
            .field("chain_len", &self.chain.len())
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// A revoked access token: refuse its `jti` until `expires_at` (Unix seconds), after which the
/// token is refused for expiry anyway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevokedToken {
    pub jti: String,
    pub expires_at: i64,
}

/// One page of the change feed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// Pass back to get what happened after this page. Opaque.
    pub cursor: String,
    /// Access tokens revoked since the previous cursor (with no cursor: every revoked token that
    /// has not expired yet).
    pub revoked_tokens: Vec<RevokedToken>,
    /// Sessions, API keys, users or applications changed (revoked, disabled, roles changed):
    /// drop every cached API-key, session and certificate answer.
    pub principals: bool,
    /// Roles, permissions or services changed: fetch [`ControlPlane::grants`] again.
    pub grants: bool,
    /// A certificate was revoked or the CA set changed: fetch [`ControlPlane::trust`] again.
    pub trust: bool,
    /// The token signing keys changed: fetch [`ControlPlane::signing_keys`] again.
    pub keys: bool,
    /// The cursor was too old or unknown: everything may be stale, so treat all four flags as
    /// set and replace (not extend) the revoked-token set with [`Changes::revoked_tokens`].
    pub reset: bool,
}

/// A browser session minted for the gateway's session cookie ([`ControlPlane::browser_session`]).
pub struct BrowserSession {
    /// The session token: the cookie's value. Never logged.
    pub token: Zeroizing<String>,
    /// Unix seconds; the cookie's lifetime.
    pub expires_at: i64,
}

impl std::fmt::Debug for BrowserSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrowserSession").field("expires_at", &self.expires_at).finish_non_exhaustive()
    }
}

/// The answer to a finished browser sign-in: a session, or why not.
pub type BrowserVerdict = Result<BrowserSession, Refusal>;

/// The interfaces of DESIGN §5 "a separate `portcullis gateway` …": the data plane's only way to
/// reach the control plane. Implementations never panic and time out on their own (a call
/// returns [`Unavailable`] rather than hanging longer than its documented bound).
#[async_trait]
pub trait ControlPlane: Send + Sync + 'static {
    /// The issuer every access token must name in `iss` (the control plane's external base URL).
    fn issuer(&self) -> &str;

    /// The public keys in the control plane's JWKS (`/oauth2/jwks`): published, current and
    /// retired-but-still-valid token signing keys.
    async fn signing_keys(&self) -> Result<Vec<VerifyingKey>, Unavailable>;

    /// The CA certificates and CRLs client certificates are checked against.
    async fn trust(&self) -> Result<TrustBundle, Unavailable>;

    /// Every organisation's role → permission grants.
    async fn grants(&self) -> Result<PermissionGrants, Unavailable>;

    /// What changed since `cursor` (`None`: start from now, with every unexpired revoked token).
    /// Waits up to `wait` for news before answering with an empty page.
    async fn changes(&self, cursor: Option<&str>, wait: Duration) -> Result<Changes, Unavailable>;

    /// Checks an API key and its secret (`api-key`, `api-secret` headers).
    async fn api_key(&self, key: &str, secret: &str, client_ip: Option<IpAddr>) -> Result<Verdict, Unavailable>;

    /// Checks an Auth API / browser session token.
    async fn session(&self, token: &str, client_ip: Option<IpAddr>) -> Result<Verdict, Unavailable>;

    /// The application a client certificate (leaf DER, already verified against [`Self::trust`]
    /// by the TLS layer) was issued to, with that application's roles.
    async fn certificate(&self, leaf_der: &[u8]) -> Result<Verdict, Unavailable>;

    /// The application this gateway authenticates to the control plane as, if any (a standalone
    /// gateway's `client_id`): the default sign-in application of `session` routes.
    fn own_client_id(&self) -> Option<&str> {
        None
    }

    /// Finishes a browser sign-in: `code` came back to the gateway's callback `redirect_uri`
    /// from an authorization request of application `client_id` with PKCE (`code_verifier`).
    /// The control plane redeems it, once, for a session of the person who signed in, whose
    /// token becomes the session cookie.
    async fn browser_session(
        &self,
        client_id: &str,
        code: &str,
        code_verifier: &str,
        redirect_uri: &str,
        client_ip: Option<IpAddr>,
    ) -> Result<BrowserVerdict, Unavailable>;

    /// A certificate from our CA for the gateway itself: a server certificate for `names` (DNS
    /// names or IP addresses), or the platform transport (client) certificate.
    async fn issue(&self, purpose: CertificatePurpose, names: &[String]) -> Result<IssuedKeyPair, Unavailable>;
}
