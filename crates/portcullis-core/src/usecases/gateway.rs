//! The control plane's side of the gateway interface (DESIGN §5; the wire format is in
//! `docs/gateway-control-plane.md`): the use cases behind every method of the data plane's
//! `ControlPlane` trait, called in-process by `portcullis serve`'s gateway and over HTTPS (the
//! `/api/v1/gateway/…` endpoints) by a standalone `portcullis gateway`.
//!
//! - [`Portcullis::gateway_changes`]: the long-polled change feed. It reads the audit log —
//!   every mutation writes its audit row in the same transaction — by **position** (the log's
//!   `seq`), not by time, so nodes with different clocks cannot hide events from each other.
//!   A position that was skipped (on PostgreSQL a transaction takes its position when it inserts
//!   the row and may commit after later positions are visible) is looked for again for
//!   [`FEED_OVERLAP_SECS`]; once seen, an event is never reported again. The cursor also
//!   carries a digest of the stored CRL numbers, so a CRL signed after a revocation committed
//!   (or re-signed on schedule) raises `trust` too. See [`feed_effect`] for which actions
//!   raise which flag.
//! - [`Portcullis::gateway_trust`], [`Portcullis::gateway_grants`], [`Portcullis::verifying_keys`]:
//!   the snapshots the data plane refetches when a flag says so.
//! - [`Portcullis::gateway_api_key`], [`Portcullis::gateway_session`],
//!   [`Portcullis::gateway_certificate`]: one credential each, answered as an identity or a
//!   refusal; an `Err` means the control plane could not answer (the gateway says 503).
//!   API keys and sessions go through the same code as the Auth API (rate limits, audit of
//!   failures), reading past this node's cache so another node's revocation counts at once.
//! - [`Portcullis::gateway_issue`] and [`Portcullis::gateway_issue_local`]: the gateway's own
//!   certificates (not in the inventory; audited as `gateway.certificate.issue`).

use std::collections::HashSet;
use std::net::IpAddr;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use zeroize::Zeroizing;

use super::*;
use crate::crypto::jwk::ClientKeyMaterial;
use crate::crypto::signing::VerifyingKey;
use crate::model::{AuditMark, CertificateType, CredentialState, GrantType, OrgRoleGrant, Session};
use crate::pki::{self, PlatformUse};
use secrecy::{ExposeSecret, SecretString};

/// Longest a `changes` call waits for news.
pub const MAX_CHANGES_WAIT: Duration = Duration::from_secs(30);
/// A cursor older than this (by the control plane's clock) gives a reset.
pub const CURSOR_MAX_AGE_SECS: i64 = 600;
/// How long a skipped audit position is looked for again, and how far before a revocation's
/// own timestamp revoked tokens are read back.
pub const FEED_OVERLAP_SECS: i64 = 10;
/// Lifetime of the gateway's own certificates (it renews them at two thirds of it).
pub const GATEWAY_CERT_DAYS: i64 = 30;
/// Most names a gateway server certificate may carry.
pub const MAX_GATEWAY_NAMES: usize = 16;
/// Subject CN of the gateway's upstream client certificate.
pub const GATEWAY_CLIENT_CN: &str = "portcullis-gateway";
/// The feed re-reads the log this often while it waits.
const POLL_INTERVAL: Duration = Duration::from_millis(300);
/// Audit rows read per query.
const MARKS_PER_QUERY: u32 = 1000;
/// Most skipped positions a cursor remembers (the newest are kept).
const MAX_GAPS: usize = 64;
/// Most revoked tokens one answer lists.
const MAX_REVOKED_TOKENS: u32 = 100_000;
const CURSOR_VERSION: u8 = 1;

/// Who a credential checked for the gateway belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayIdentity {
    /// The user (sessions, API keys) or the application's client id (certificates).
    pub subject: String,
    /// `session`, `api-key`, or the application's client id.
    pub client_id: String,
    /// Organisation slug.
    pub org: String,
    pub roles: Vec<String>,
    pub scopes: Vec<String>,
}

/// Why a credential was refused. `message` is safe to show the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayRefusal {
    /// 401, 403 or 429.
    pub status: u16,
    pub message: String,
    /// With 429 only.
    pub retry_after_secs: Option<u64>,
}

/// The answer about one credential.
pub type GatewayVerdict = std::result::Result<GatewayIdentity, GatewayRefusal>;

/// A browser session minted for a gateway's cookie ([`Portcullis::gateway_browser_session`]).
pub struct GatewayBrowserSession {
    /// The session token: shown once (the cookie), stored only as a keyed hash.
    pub token: SecretString,
    pub expires_at: UnixTime,
}

impl std::fmt::Debug for GatewayBrowserSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayBrowserSession").field("expires_at", &self.expires_at).finish_non_exhaustive()
    }
}

/// What client certificates are checked against: every unexpired CA certificate (root and
/// issuing, DER) and each issuing CA's current CRL (DER).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GatewayTrust {
    pub anchors: Vec<Vec<u8>>,
    pub crls: Vec<Vec<u8>>,
}

/// A revoked access token, to be refused until `expires_at`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevokedJti {
    pub jti: String,
    pub expires_at: UnixTime,
}

/// One page of the change feed (see the module documentation).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GatewayChanges {
    pub cursor: String,
    pub revoked_tokens: Vec<RevokedJti>,
    pub principals: bool,
    pub grants: bool,
    pub trust: bool,
    pub keys: bool,
    pub reset: bool,
}

impl GatewayChanges {
    fn has_news(&self) -> bool {
        self.principals || self.grants || self.trust || self.keys || !self.revoked_tokens.is_empty()
    }
}

/// Which certificate the gateway asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GatewayCertPurpose {
    /// A TLS server certificate for the listener's names.
    Server,
    /// The client (transport) certificate presented to upstreams that require mTLS.
    UpstreamClient,
}

impl GatewayCertPurpose {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Server => "server",
            Self::UpstreamClient => "upstream_client",
        }
    }
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "server" => Ok(Self::Server),
            "upstream_client" => Ok(Self::UpstreamClient),
            _ => Err(Error::invalid("purpose must be \"server\" or \"upstream_client\"")),
        }
    }
}

/// A certificate issued for a key the gateway holds (it sent a CSR).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayCertificate {
    /// The leaf, then its issuing CA, then the root (DER).
    pub chain: Vec<Vec<u8>>,
    /// The same chain as PEM.
    pub chain_pem: String,
    pub serial: String,
    pub not_after: UnixTime,
}

/// A certificate with a key generated here (the in-process gateway).
pub struct GatewayKeyPair {
    /// The leaf, then its issuing CA, then the root (DER).
    pub chain: Vec<Vec<u8>>,
    pub key_pkcs8: Zeroizing<Vec<u8>>,
    pub not_after: UnixTime,
}

impl std::fmt::Debug for GatewayKeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayKeyPair")
            .field("chain_len", &self.chain.len())
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

// ---- audit action → feed flags ---------------------------------------------------------------

/// What one successful audited action means for a gateway's cached state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FeedEffect {
    /// Access tokens were put on the revocation list: read them back.
    pub revoked_tokens: bool,
    /// Cached API-key, session and certificate answers may be wrong.
    pub principals: bool,
    /// Role → permission grants changed.
    pub grants: bool,
    /// Trust anchors or CRLs changed.
    pub trust: bool,
    /// Token signing keys changed.
    pub keys: bool,
}

impl std::ops::BitOrAssign for FeedEffect {
    fn bitor_assign(&mut self, o: Self) {
        self.revoked_tokens |= o.revoked_tokens;
        self.principals |= o.principals;
        self.grants |= o.grants;
        self.trust |= o.trust;
        self.keys |= o.keys;
    }
}

const NOTHING: FeedEffect =
    FeedEffect { revoked_tokens: false, principals: false, grants: false, trust: false, keys: false };
const PRINCIPALS: FeedEffect = FeedEffect { principals: true, ..NOTHING };
const TOKENS: FeedEffect = FeedEffect { revoked_tokens: true, ..NOTHING };
const GRANTS: FeedEffect = FeedEffect { grants: true, ..NOTHING };
const TRUST: FeedEffect = FeedEffect { trust: true, ..NOTHING };
const KEYS: FeedEffect = FeedEffect { keys: true, ..NOTHING };

/// Every action the use cases audit, and what it means for a gateway. Reads, failed attempts
/// and the issuance of new credentials change nothing a gateway holds; an action missing here
/// counts as `principals` (the safe side).
pub const FEED_ACTIONS: &[(&str, FeedEffect)] = &[
    // Credentials ending or changing: cached answers about sessions, keys, users, apps.
    ("session.revoke", PRINCIPALS),
    ("session.revoke_all", PRINCIPALS),
    ("session.logout", PRINCIPALS),
    ("session.refresh", PRINCIPALS),
    ("api_key.revoke", PRINCIPALS),
    ("user.update", PRINCIPALS),
    ("user.delete", PRINCIPALS),
    ("user.role.grant", PRINCIPALS),
    ("user.role.revoke", PRINCIPALS),
    ("user.password.change", PRINCIPALS),
    ("user.password.reset.confirm", PRINCIPALS),
    ("user.email.primary", PRINCIPALS),
    ("user.email.remove", PRINCIPALS),
    ("application.update", PRINCIPALS),
    ("application.delete", PRINCIPALS),
    ("application.rotate_secret", PRINCIPALS),
    ("totp.reset", PRINCIPALS),
    ("consent.revoke", PRINCIPALS),
    ("oauth.refresh.reuse", PRINCIPALS),
    // Access tokens on the revocation list (RFC 7009, a replayed authorization code).
    ("token.revoke", TOKENS),
    ("oauth.code.replay", FeedEffect { revoked_tokens: true, principals: true, ..NOTHING }),
    // Role → permission grants.
    ("role.set_permissions", GRANTS),
    ("service.create", GRANTS),
    ("service.delete", GRANTS),
    // Client-certificate trust.
    ("certificate.revoke", FeedEffect { trust: true, principals: true, ..NOTHING }),
    ("ca.create", TRUST),
    ("ca.rotate", TRUST),
    ("ca.stage", TRUST),
    ("ca.promote", TRUST),
    ("ca.import", TRUST),
    // Token signing keys.
    ("signing_key.create", KEYS),
    ("signing_key.rotate", KEYS),
    // New things and new credentials: nothing a gateway cached is wrong.
    ("organisation.create", NOTHING),
    ("organisation.update", NOTHING),
    ("application.create", NOTHING),
    ("user.create", NOTHING),
    ("user.invite", NOTHING),
    ("user.invite.accept", NOTHING),
    ("user.email.add", NOTHING),
    ("user.email.verify", NOTHING),
    ("user.password.reset", NOTHING),
    ("session.login", NOTHING),
    ("session.login.reset_failures", NOTHING),
    ("session.verify", NOTHING),
    ("api_key.create", NOTHING),
    ("api_key.verify", NOTHING),
    ("totp.enrol", NOTHING),
    ("totp.confirm", NOTHING),
    ("totp.use", NOTHING),
    ("consent.grant", NOTHING),
    ("oauth.authorize", NOTHING),
    ("oauth.token.authorization_code", NOTHING),
    ("oauth.token.refresh_token", NOTHING),
    ("certificate.issue", NOTHING),
    ("certificate.renew", NOTHING),
    ("gateway.certificate.issue", NOTHING),
    ("gateway.session.create", NOTHING),
    // Recorded only as failures (refused credentials, wrong codes): reads.
    ("client.authenticate", NOTHING),
    ("api.authenticate", NOTHING),
    ("session.authenticate", NOTHING),
    ("session.use_revoked", NOTHING),
    ("api_key.authenticate", NOTHING),
    ("api_key.use_revoked", NOTHING),
    ("email.verify", NOTHING),
    ("password_reset.verify", NOTHING),
    ("invite.verify", NOTHING),
];

/// What a successful audited `action` means for a gateway (unknown actions: `principals`).
pub fn feed_effect(action: &str) -> FeedEffect {
    FEED_ACTIONS.iter().find(|(a, _)| *a == action).map_or(PRINCIPALS, |(_, e)| *e)
}

// ---- the cursor ------------------------------------------------------------------------------

/// Where a gateway is in the feed. Opaque to clients: base64url (no padding) of
/// `version u8 | at i64 | seq i64 | crls u64 | n u8 | n × (gap seq i64, noticed i64)`,
/// big-endian.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FeedCursor {
    /// When this page was made (control-plane clock).
    at: UnixTime,
    /// Every audit position up to here was read, or is in `gaps`.
    seq: i64,
    /// Digest of the stored CRL numbers.
    crls: u64,
    /// Positions at or before `seq` not seen yet, with when they were first missed.
    gaps: Vec<(i64, UnixTime)>,
}

impl FeedCursor {
    fn encode(&self) -> String {
        let mut b = Vec::with_capacity(26 + 16 * self.gaps.len());
        b.push(CURSOR_VERSION);
        b.extend_from_slice(&self.at.to_be_bytes());
        b.extend_from_slice(&self.seq.to_be_bytes());
        b.extend_from_slice(&self.crls.to_be_bytes());
        let gaps = self.gaps.get(..MAX_GAPS).unwrap_or(&self.gaps);
        b.push(u8::try_from(gaps.len()).unwrap_or(0));
        for (g, noticed) in gaps {
            b.extend_from_slice(&g.to_be_bytes());
            b.extend_from_slice(&noticed.to_be_bytes());
        }
        B64URL.encode(b)
    }

    fn decode(s: &str) -> Option<Self> {
        if s.len() > 4 * (26 + 16 * MAX_GAPS) / 3 + 4 {
            return None;
        }
        let b = B64URL.decode(s).ok()?;
        let (&version, rest) = b.split_first()?;
        if version != CURSOR_VERSION {
            return None;
        }
        let mut words = rest.get(..24)?.chunks_exact(8).map(|c| <[u8; 8]>::try_from(c).ok());
        let at = i64::from_be_bytes(words.next()??);
        let seq = i64::from_be_bytes(words.next()??);
        let crls = u64::from_be_bytes(words.next()??);
        let (&n, tail) = rest.get(24..)?.split_first()?;
        if usize::from(n) > MAX_GAPS || tail.len() != 16 * usize::from(n) || seq < 0 {
            return None;
        }
        let mut gaps = Vec::with_capacity(usize::from(n));
        for c in tail.chunks_exact(16) {
            let g = i64::from_be_bytes(c.get(..8)?.try_into().ok()?);
            let noticed = i64::from_be_bytes(c.get(8..)?.try_into().ok()?);
            if g < 1 || g > seq || gaps.iter().any(|(x, _)| *x == g) {
                return None;
            }
            gaps.push((g, noticed));
        }
        Some(Self { at, seq, crls, gaps })
    }
}

impl FeedCursor {
    /// Forgets skipped positions missed for longer than [`FEED_OVERLAP_SECS`]: a transaction
    /// that took a position and had not committed by then is not waited for any longer.
    fn expire_gaps(&mut self, now: UnixTime) {
        self.gaps.retain(|(_, noticed)| (now - noticed).abs() <= FEED_OVERLAP_SECS);
    }

    /// Moves past `marks` (what `audit_marks(self.seq, <the gaps>, …)` returned, in position
    /// order): a skipped position that shows up leaves the gaps, positions skipped on the way
    /// to a new one join them (at most [`MAX_GAPS`], the newest kept). Returns what the
    /// successful actions mean, and the earliest time of an action that revoked tokens.
    fn absorb(&mut self, marks: &[AuditMark], now: UnixTime) -> (FeedEffect, Option<UnixTime>) {
        let mut effect = FeedEffect::default();
        let mut tokens_since: Option<UnixTime> = None;
        let mut next = self.seq + 1;
        for m in marks {
            if m.seq < next {
                self.gaps.retain(|(g, _)| *g != m.seq);
            } else {
                // Positions skipped on the way: possibly transactions still committing.
                let from = next.max(m.seq - MAX_GAPS as i64);
                self.gaps.extend((from..m.seq).map(|g| (g, now)));
                next = m.seq + 1;
            }
            if m.outcome == "failure" {
                continue;
            }
            let e = feed_effect(&m.action);
            if e.revoked_tokens {
                tokens_since = Some(tokens_since.map_or(m.at, |t| t.min(m.at)));
            }
            effect |= e;
        }
        self.seq = next - 1;
        if self.gaps.len() > MAX_GAPS {
            self.gaps.sort_unstable();
            let extra = self.gaps.len() - MAX_GAPS;
            self.gaps.drain(..extra);
        }
        (effect, tokens_since)
    }
}

/// FNV-1a over the sorted `(issuer, number)` pairs: changes whenever any CRL is re-signed.
fn crl_digest(mut numbers: Vec<(String, u64)>) -> u64 {
    numbers.sort();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (issuer, n) in &numbers {
        for b in issuer.bytes().chain([0]).chain(n.to_be_bytes()) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

// ---- credentials -----------------------------------------------------------------------------

fn identity_of(p: Principal) -> GatewayIdentity {
    GatewayIdentity { subject: p.subject, client_id: p.client_id, org: p.org, roles: p.roles, scopes: p.scopes }
}

fn refuse(status: u16, message: impl Into<String>) -> GatewayVerdict {
    Err(refusal(status, message))
}

fn refusal(status: u16, message: impl Into<String>) -> GatewayRefusal {
    GatewayRefusal { status, message: message.into(), retry_after_secs: None }
}

/// A use case's error as a verdict: a refusal of the credential, or `Err` when the control
/// plane itself failed (storage, internal) and the gateway must answer 503.
fn verdict_of(e: Error) -> Result<GatewayVerdict> {
    match e {
        Error::Unauthenticated(m) | Error::InvalidInput(m) | Error::Conflict(m) => Ok(refuse(401, m)),
        e @ Error::NotFound(_) => Ok(refuse(401, e.to_string())),
        Error::Forbidden(m) => Ok(refuse(403, m)),
        Error::RateLimited { retry_after_secs } => Ok(Err(GatewayRefusal {
            status: 429,
            message: "too many failed attempts; try again later".into(),
            retry_after_secs: Some(retry_after_secs.max(1)),
        })),
        other => Err(other),
    }
}

fn client_context(client_ip: Option<IpAddr>) -> RequestContext {
    RequestContext { ip: client_ip.map(|ip| ip.to_string()), request_id: None }
}

/// The names of a gateway server certificate: 1 to [`MAX_GATEWAY_NAMES`], each an IP address
/// (not unspecified, not multicast) or a DNS host name (lowercased; letters, digits and `-`
/// in dot-separated labels; no wildcard, no trailing dot, no port; not all-numeric at the
/// end). Duplicates are dropped; IP addresses are written in their canonical form.
pub fn gateway_server_names(names: &[String]) -> Result<Vec<String>> {
    if names.is_empty() {
        return Err(Error::invalid("a server certificate needs at least one name (DNS name or IP address)"));
    }
    if names.len() > MAX_GATEWAY_NAMES {
        return Err(Error::invalid(format!("a server certificate carries at most {MAX_GATEWAY_NAMES} names")));
    }
    let mut out: Vec<String> = Vec::with_capacity(names.len());
    for n in names {
        let shown: String = n.chars().take(64).filter(|c| !c.is_control()).collect();
        let name = match n.parse::<IpAddr>() {
            Ok(ip) if ip.is_unspecified() || ip.is_multicast() => {
                return Err(Error::invalid(format!("{shown:?} is not an address a server can be reached at")));
            }
            Ok(ip) => ip.to_string(),
            Err(_) => {
                let d = n.to_ascii_lowercase();
                let numeric_tld = d.rsplit('.').next().is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()));
                if !super::pki::valid_hostname(&d) || numeric_tld {
                    return Err(Error::invalid(format!(
                        "{shown:?} is neither an IP address nor a DNS host name (no wildcards, ports or trailing dots)"
                    )));
                }
                d
            }
        };
        if !out.contains(&name) {
            out.push(name);
        }
    }
    Ok(out)
}

impl Principal {
    /// The caller of the gateway endpoints: an application's access token holding
    /// `portcullis:gateway`.
    pub fn ensure_gateway(&self) -> Result<()> {
        if matches!(self.credential, Credential::AccessToken) && self.roles.iter().any(|r| r == ROLE_GATEWAY) {
            Ok(())
        } else {
            Err(Error::Forbidden(format!("requires an application access token with role {ROLE_GATEWAY}")))
        }
    }
}

impl Portcullis {
    /// The published token verifying keys (what `/oauth2/jwks` serves), by `kid`.
    pub fn verifying_keys(&self) -> Vec<VerifyingKey> {
        self.keys.current().verifying_keys()
    }

    /// The trust anchors and CRLs, as stored (this node's CA set is reloaded first, so another
    /// node's rotation or newer CRL counts at once).
    pub async fn gateway_trust(&self) -> Result<GatewayTrust> {
        self.load_ca().await?;
        let set = self.ca_set();
        Ok(GatewayTrust { anchors: set.anchors(), crls: set.crl_ders() })
    }

    /// Every organisation's role → permission grants.
    pub async fn gateway_grants(&self) -> Result<Vec<OrgRoleGrant>> {
        Ok(self.store.all_role_grants().await?)
    }

    /// An API key and its secret, checked as the Auth API checks them (the client's IP counts
    /// for the failure limit; failures are audited), past this node's cache.
    pub async fn gateway_api_key(&self, key: &str, secret: &str, client_ip: Option<IpAddr>) -> Result<GatewayVerdict> {
        match self.api_key_principal(&client_context(client_ip), key, secret, true).await {
            Ok(p) => Ok(Ok(identity_of(p))),
            Err(e) => verdict_of(e),
        }
    }

    /// A session token, checked as the Auth API checks it, past this node's cache.
    pub async fn gateway_session(&self, token: &str, client_ip: Option<IpAddr>) -> Result<GatewayVerdict> {
        match self.checked_session(&client_context(client_ip), token, true).await {
            Ok(e) => Ok(Ok(identity_of(Self::session_principal(&e)))),
            Err(e) => verdict_of(e),
        }
    }

    /// The application a client certificate (leaf DER) was issued to. Only an active
    /// `transport` certificate of ours authenticates (401 otherwise: unknown, revoked, expired,
    /// another type); a disabled application is refused with 403.
    pub async fn gateway_certificate(&self, leaf_der: &[u8]) -> Result<GatewayVerdict> {
        let cert = match self.presented_certificate(leaf_der).await {
            Ok(c) => c,
            Err(e) => return verdict_of(e),
        };
        if cert.cert_type != CertificateType::Transport {
            return Ok(refuse(
                401,
                format!(
                    "a {} certificate does not authenticate a client: use a transport certificate",
                    cert.cert_type.as_str()
                ),
            ));
        }
        let Some(app) = self.store.application(cert.client_id.as_str()).await?.filter(|a| a.id == cert.app_id) else {
            return Ok(refuse(401, format!("the certificate's application {} no longer exists", cert.client_id)));
        };
        if !app.enabled {
            return Ok(refuse(403, format!("application {} is disabled", app.client_id)));
        }
        let Some(org) = self.store.organisation_by_id(&app.org_id).await? else {
            return Ok(refuse(401, "the certificate's organisation no longer exists"));
        };
        Ok(Ok(GatewayIdentity {
            subject: app.client_id.to_string(),
            client_id: app.client_id.to_string(),
            org: org.slug.to_string(),
            roles: app.roles.iter().map(ToString::to_string).collect(),
            scopes: vec![],
        }))
    }

    /// A gateway's browser sign-in, finished: `code` came back to the gateway's callback
    /// `redirect_uri` from `/oauth2/authorize`, requested by `client_id` (the gateway's own
    /// application: enabled, with the `authorization_code` grant) with PKCE. The code is
    /// redeemed — once, like at the token endpoint, a replay revoking what it gave — for a new
    /// session of the signed-in person: active at once (the sign-in was complete), ending no
    /// later than the SSO session it was signed in with, and refused as soon as that one ends
    /// ([`Session::parent_id`]). Its token is the gateway's session cookie.
    pub async fn gateway_browser_session(
        &self,
        client_id: &str,
        code: &str,
        code_verifier: &str,
        redirect_uri: &str,
        client_ip: Option<IpAddr>,
    ) -> Result<std::result::Result<GatewayBrowserSession, GatewayRefusal>> {
        let ctx = client_context(client_ip);
        let Some(entry) = self.client(client_id).await? else {
            return Ok(Err(refusal(401, format!("the gateway's sign-in application {client_id} does not exist"))));
        };
        let app = &entry.app;
        if !app.enabled || !app.grant_types.contains(&GrantType::AuthorizationCode) {
            return Ok(Err(refusal(
                403,
                format!("application {client_id} is disabled or lacks the authorization_code grant"),
            )));
        }
        let redeemable = match self.redeemable_code(app, code, Some(redirect_uri), Some(code_verifier), &ctx).await {
            Ok(r) => r,
            Err(e) if e.code == crate::error::OAuthErrorCode::ServerError => {
                return Err(Error::Internal(e.internal.unwrap_or(e.description)));
            }
            Err(e) => return Ok(Err(refusal(401, format!("sign-in refused: {}", e.description)))),
        };
        if redeemable.row.code_challenge.is_none() {
            return Ok(Err(refusal(401, "sign-in refused: the authorization request carried no PKCE challenge")));
        }
        let now = self.now();
        let sso = &redeemable.session;
        let token = super::auth::new_token(super::auth::SESSION_TOKEN_PREFIX)?;
        let session = Session {
            id: new_id(),
            user_id: redeemable.user.id.clone(),
            org_id: redeemable.user.org_id.clone(),
            token_hash: SecretHash::of(self.vault.as_ref(), token.expose_secret()),
            state: CredentialState::Active,
            created_at: now,
            verified_at: Some(now),
            last_used_at: now,
            expires_at: sso.expires_at.min(now + self.settings.auth.session_lifetime),
            ip: ctx.ip.clone(),
            user_agent: Some(format!("gateway {client_id}")),
            revoked_at: None,
            // One level: a session minted from another gateway session belongs to that one's
            // SSO session.
            parent_id: Some(sso.parent_id.clone().unwrap_or_else(|| sso.id.clone())),
        };
        let ev = self.audit(
            &ctx,
            &redeemable.user.id,
            Some(&redeemable.user.org_id),
            "gateway.session.create",
            &session.id,
            serde_json::json!({ "client_id": client_id, "sso_session_id": sso.id }),
        );
        if !self.store.redeem_code_for_session(&redeemable.hash, now, &session, &ev).await? {
            let replay = self.code_replayed(&ctx, app, &redeemable.row, &redeemable.hash, now).await;
            return Ok(Err(refusal(401, format!("sign-in refused: {}", replay.description))));
        }
        Ok(Ok(GatewayBrowserSession { token, expires_at: session.expires_at }))
    }

    // ---- the change feed ----------------------------------------------------------------------

    /// What changed since `cursor` (see the module documentation), waiting up to `wait`
    /// (at most [`MAX_CHANGES_WAIT`]) for news. No cursor: a cursor for "now" and every
    /// unexpired revoked token, at once. A malformed cursor, one older than
    /// [`CURSOR_MAX_AGE_SECS`] or one from another database: the same, at once, with `reset`
    /// and every flag set.
    pub async fn gateway_changes(&self, cursor: Option<&str>, wait: Duration) -> Result<GatewayChanges> {
        let deadline = tokio::time::Instant::now() + wait.min(MAX_CHANGES_WAIT);
        let now = self.now();
        let given = match cursor {
            None => return self.feed_restart(false).await,
            Some(c) => FeedCursor::decode(c),
        };
        let latest = self.store.latest_audit_seq().await?;
        let Some(mut c) = given.filter(|c| (now - c.at).abs() <= CURSOR_MAX_AGE_SECS && c.seq <= latest) else {
            return self.feed_restart(true).await;
        };
        loop {
            let (mut page, full) = self.feed_poll(&mut c).await?;
            if page.has_news() || tokio::time::Instant::now() >= deadline {
                page.cursor = c.encode();
                return Ok(page);
            }
            if !full {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                tokio::time::sleep(left.min(POLL_INTERVAL)).await;
            }
        }
    }

    /// A page that starts over: a cursor for the log as it is now, every unexpired revoked
    /// token, and (for a reset) every flag.
    async fn feed_restart(&self, reset: bool) -> Result<GatewayChanges> {
        let now = self.now();
        let latest = self.store.latest_audit_seq().await?;
        // Positions just before the newest that hold nothing yet may belong to transactions
        // still committing: look for them like any other skipped position.
        let tail_from = (latest - MAX_GAPS as i64).max(0);
        let present: HashSet<i64> =
            self.store.audit_marks(tail_from, &[], MAX_GAPS as u32).await?.iter().map(|m| m.seq).collect();
        let gaps = (tail_from + 1..=latest).filter(|s| !present.contains(s)).map(|s| (s, now)).collect();
        let crls = crl_digest(self.store.crl_numbers().await?);
        let cursor = FeedCursor { at: now, seq: latest, crls, gaps };
        let revoked = self.store.revoked_tokens_since(i64::MIN, self.revocation_floor(now), MAX_REVOKED_TOKENS).await?;
        if revoked.len() >= MAX_REVOKED_TOKENS as usize {
            tracing::warn!(listed = revoked.len(), "the gateway feed lists only the oldest revoked tokens");
        }
        Ok(GatewayChanges {
            cursor: cursor.encode(),
            revoked_tokens: revoked.into_iter().map(|t| RevokedJti { jti: t.jti, expires_at: t.expires_at }).collect(),
            principals: reset,
            grants: reset,
            trust: reset,
            keys: reset,
            reset,
        })
    }

    /// Revocations of tokens that can no longer be accepted (past `exp` plus skew) are left out.
    fn revocation_floor(&self, now: UnixTime) -> UnixTime {
        now - crate::tokens::SKEW_SECS
    }

    /// Reads what was written since `c` once and moves `c` past it. Returns the page (its
    /// cursor not yet filled in) and whether the read was cut at [`MARKS_PER_QUERY`].
    async fn feed_poll(&self, c: &mut FeedCursor) -> Result<(GatewayChanges, bool)> {
        let now = self.now();
        c.expire_gaps(now);
        let wanted: Vec<i64> = c.gaps.iter().map(|(g, _)| *g).collect();
        let marks = self.store.audit_marks(c.seq, &wanted, MARKS_PER_QUERY).await?;
        let full = marks.iter().filter(|m| m.seq > c.seq).count() >= MARKS_PER_QUERY as usize;
        let (mut effect, tokens_since) = c.absorb(&marks, now);
        let crls = crl_digest(self.store.crl_numbers().await?);
        if crls != c.crls {
            effect.trust = true;
            c.crls = crls;
        }
        c.at = now;
        let revoked_tokens = match tokens_since {
            // The revocation rows carry the same node's clock as their audit rows.
            Some(t) => self
                .store
                .revoked_tokens_since(t - FEED_OVERLAP_SECS, self.revocation_floor(now), MAX_REVOKED_TOKENS)
                .await?
                .into_iter()
                .map(|t| RevokedJti { jti: t.jti, expires_at: t.expires_at })
                .collect(),
            None => vec![],
        };
        let page = GatewayChanges {
            cursor: String::new(),
            revoked_tokens,
            principals: effect.principals,
            grants: effect.grants,
            trust: effect.trust,
            keys: effect.keys,
            reset: false,
        };
        Ok((page, full))
    }

    // ---- the gateway's own certificates ---------------------------------------------------------

    /// Issues the gateway's own certificate for the key of `csr_pem` (its self-signature is
    /// checked; its subject and extensions are ignored): `Server` for `names` (see
    /// [`gateway_server_names`]), or `UpstreamClient` (`CN=portcullis-gateway`, EKU
    /// clientAuth; `names` are ignored). Valid [`GATEWAY_CERT_DAYS`] days (never past the
    /// issuing CA), signed by the active issuing CA, audited, not in the inventory.
    pub async fn gateway_issue(
        &self,
        who: &Principal,
        ctx: &RequestContext,
        purpose: GatewayCertPurpose,
        names: &[String],
        csr_pem: &str,
    ) -> Result<GatewayCertificate> {
        who.ensure_gateway()?;
        let csr = pki::parse_csr(csr_pem)?;
        let public = rcgen::SubjectPublicKeyInfo::from_der(&csr.spki_der).map_err(Error::internal)?;
        let rsa = matches!(csr.key, ClientKeyMaterial::Rsa { .. });
        let (chain, serial, not_after) = self.sign_gateway_certificate(purpose, names, &public, rsa)?;
        self.audit_gateway_certificate(ctx, &who.subject, purpose, &chain, &serial, not_after).await?;
        let chain_pem = chain.iter().map(|d| pki::pem_encode("CERTIFICATE", d)).collect();
        Ok(GatewayCertificate { chain, chain_pem, serial, not_after })
    }

    /// [`Self::gateway_issue`] for the in-process gateway: the key (P-256) is generated here.
    pub async fn gateway_issue_local(&self, purpose: GatewayCertPurpose, names: &[String]) -> Result<GatewayKeyPair> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(Error::internal)?;
        let (chain, serial, not_after) = self.sign_gateway_certificate(purpose, names, &key, false)?;
        self.audit_gateway_certificate(&RequestContext::default(), "system", purpose, &chain, &serial, not_after)
            .await?;
        Ok(GatewayKeyPair { chain, key_pkcs8: Zeroizing::new(key.serialize_der()), not_after })
    }

    fn sign_gateway_certificate(
        &self,
        purpose: GatewayCertPurpose,
        names: &[String],
        public: &impl rcgen::PublicKeyData,
        rsa: bool,
    ) -> Result<(Vec<Vec<u8>>, String, UnixTime)> {
        let (use_, cn, names) = match purpose {
            GatewayCertPurpose::Server => {
                let names = gateway_server_names(names)?;
                let cn = names.first().cloned().unwrap_or_else(|| GATEWAY_CLIENT_CN.to_owned());
                (PlatformUse::Server, cn, names)
            }
            GatewayCertPurpose::UpstreamClient => (PlatformUse::Client, GATEWAY_CLIENT_CN.to_owned(), vec![]),
        };
        let set = self.ca_set();
        let ca = set.active().ok_or_else(|| Error::internal("no active issuing CA is loaded"))?;
        let now = self.now();
        let not_after = (now + GATEWAY_CERT_DAYS * 86_400).min(ca.record.not_after);
        let (leaf, serial) =
            pki::issue_platform_certificate(use_, &cn, &names, public, rsa, now - 60, not_after, &ca.issuer)?;
        let mut chain = vec![leaf, ca.der.clone()];
        if let Some((_, root)) = &set.root {
            chain.push(root.clone());
        }
        Ok((chain, serial, not_after))
    }

    async fn audit_gateway_certificate(
        &self,
        ctx: &RequestContext,
        actor: &str,
        purpose: GatewayCertPurpose,
        chain: &[Vec<u8>],
        serial: &str,
        not_after: UnixTime,
    ) -> Result<()> {
        let fingerprint = chain.first().map(|d| pki::fingerprint(d)).unwrap_or_default();
        let ev = self.audit(
            ctx,
            actor,
            None,
            "gateway.certificate.issue",
            serial,
            serde_json::json!({ "purpose": purpose.as_str(), "not_after": not_after, "fingerprint": fingerprint }),
        );
        // Issued but not recorded would be an unaudited certificate: refuse instead.
        Ok(self.store.append_audit(&ev).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table a reader checks: what each audited action raises in the feed.
    #[test]
    fn audited_actions_map_to_feed_flags() {
        let flags = |a: &str| {
            let e = feed_effect(a);
            let mut v = Vec::new();
            for (on, name) in [
                (e.revoked_tokens, "revoked_tokens"),
                (e.principals, "principals"),
                (e.grants, "grants"),
                (e.trust, "trust"),
                (e.keys, "keys"),
            ] {
                if on {
                    v.push(name);
                }
            }
            v.join("+")
        };
        let expected: &[(&str, &str)] = &[
            ("session.revoke", "principals"),
            ("session.revoke_all", "principals"),
            ("session.logout", "principals"),
            ("session.refresh", "principals"),
            ("api_key.revoke", "principals"),
            ("user.update", "principals"),
            ("user.delete", "principals"),
            ("user.role.grant", "principals"),
            ("user.role.revoke", "principals"),
            ("user.password.change", "principals"),
            ("user.password.reset.confirm", "principals"),
            ("user.email.primary", "principals"),
            ("user.email.remove", "principals"),
            ("application.update", "principals"),
            ("application.delete", "principals"),
            ("application.rotate_secret", "principals"),
            ("totp.reset", "principals"),
            ("consent.revoke", "principals"),
            ("oauth.refresh.reuse", "principals"),
            ("token.revoke", "revoked_tokens"),
            ("oauth.code.replay", "revoked_tokens+principals"),
            ("role.set_permissions", "grants"),
            ("service.create", "grants"),
            ("service.delete", "grants"),
            ("certificate.revoke", "principals+trust"),
            ("ca.create", "trust"),
            ("ca.rotate", "trust"),
            ("ca.stage", "trust"),
            ("ca.promote", "trust"),
            ("ca.import", "trust"),
            ("signing_key.create", "keys"),
            ("signing_key.rotate", "keys"),
            ("organisation.create", ""),
            ("organisation.update", ""),
            ("application.create", ""),
            ("user.create", ""),
            ("user.invite", ""),
            ("user.invite.accept", ""),
            ("user.email.add", ""),
            ("user.email.verify", ""),
            ("user.password.reset", ""),
            ("session.login", ""),
            ("session.login.reset_failures", ""),
            ("session.verify", ""),
            ("api_key.create", ""),
            ("api_key.verify", ""),
            ("totp.enrol", ""),
            ("totp.confirm", ""),
            ("totp.use", ""),
            ("consent.grant", ""),
            ("oauth.authorize", ""),
            ("oauth.token.authorization_code", ""),
            ("oauth.token.refresh_token", ""),
            ("certificate.issue", ""),
            ("certificate.renew", ""),
            ("gateway.certificate.issue", ""),
            ("gateway.session.create", ""),
            ("client.authenticate", ""),
            ("api.authenticate", ""),
            ("session.authenticate", ""),
            ("session.use_revoked", ""),
            ("api_key.authenticate", ""),
            ("api_key.use_revoked", ""),
            ("email.verify", ""),
            ("password_reset.verify", ""),
            ("invite.verify", ""),
            // Not in the table: the safe side.
            ("something.new", "principals"),
            ("", "principals"),
        ];
        for (action, want) in expected {
            assert_eq!(flags(action), *want, "{action}");
        }
        assert_eq!(expected.len() - 2, FEED_ACTIONS.len(), "every listed action is in this table");
        let mut names: Vec<&str> = FEED_ACTIONS.iter().map(|(a, _)| *a).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), FEED_ACTIONS.len(), "no action listed twice");
    }

    /// Every literal action the use cases pass to the audit log is classified explicitly
    /// (so a new action is a decision, not an accident of the default).
    #[test]
    fn every_audited_action_in_the_use_cases_is_listed() {
        let sources = [
            include_str!("admin.rs"),
            include_str!("auth.rs"),
            include_str!("bootstrap.rs"),
            include_str!("keys.rs"),
            include_str!("oauth.rs"),
            include_str!("oidc.rs"),
            include_str!("pki.rs"),
            include_str!("users.rs"),
            include_str!("gateway.rs"),
            include_str!("mod.rs"),
        ];
        let listed: HashSet<&str> = FEED_ACTIONS.iter().map(|(a, _)| *a).collect();
        let prefixes = [
            "session.",
            "api_key.",
            "user.",
            "application.",
            "totp.",
            "consent.",
            "oauth.",
            "token.",
            "role.",
            "service.",
            "certificate.",
            "ca.",
            "signing_key.",
            "organisation.",
            "gateway.",
            "client.",
            "api.",
        ];
        // Not actions: an example host name, file names in this test.
        let ignored = ["api.example.com", "oauth.rs", "gateway.rs"];
        let mut missing = Vec::new();
        for src in sources {
            // Every piece between two quotes (escaped quotes may shift which pieces are string
            // literals; code never looks like an action, so checking all pieces is safe).
            for quoted in src.split('"') {
                let looks_like_action = prefixes.iter().any(|p| quoted.starts_with(p))
                    && !ignored.contains(&quoted)
                    && quoted.bytes().all(|b| b.is_ascii_lowercase() || b == b'.' || b == b'_')
                    && quoted.contains('.')
                    && !quoted.ends_with('.');
                if looks_like_action && !listed.contains(quoted) {
                    missing.push(quoted);
                }
            }
        }
        assert!(missing.is_empty(), "audited actions missing from FEED_ACTIONS: {missing:?}");
    }

    #[test]
    fn cursors_round_trip_and_malformed_ones_are_refused() {
        let c = FeedCursor {
            at: 1_900_000_000,
            seq: 1234,
            crls: 0xdead_beef,
            gaps: vec![(1200, 1_899_999_995), (1230, 1_900_000_000)],
        };
        let s = c.encode();
        assert!(s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'), "URL-safe: {s}");
        assert_eq!(FeedCursor::decode(&s), Some(c.clone()));
        let empty = FeedCursor { gaps: vec![], ..c.clone() };
        assert_eq!(FeedCursor::decode(&empty.encode()), Some(empty));
        let raw = B64URL.decode(&s).unwrap();
        let bad = |b: Vec<u8>| FeedCursor::decode(&B64URL.encode(b));
        assert_eq!(bad(raw[..raw.len() - 1].to_vec()), None, "truncated");
        assert_eq!(bad([raw.clone(), vec![0]].concat()), None, "trailing byte");
        let mut v2 = raw.clone();
        v2[0] = 2;
        assert_eq!(bad(v2), None, "unknown version");
        let mut gap_past_seq = c.clone();
        gap_past_seq.gaps[0].0 = 5000;
        assert_eq!(FeedCursor::decode(&gap_past_seq.encode()), None);
        let mut twice = c.clone();
        twice.gaps[1].0 = 1200;
        assert_eq!(FeedCursor::decode(&twice.encode()), None);
        let negative = FeedCursor { seq: -1, gaps: vec![], ..c };
        assert_eq!(FeedCursor::decode(&negative.encode()), None);
        for junk in ["", "!!!", "AAAA", "not a cursor", &"A".repeat(10_000)] {
            assert_eq!(FeedCursor::decode(junk), None, "{junk}");
        }
    }

    fn mark(seq: i64, at: UnixTime, action: &str, outcome: &str) -> AuditMark {
        AuditMark { seq, at, action: action.into(), outcome: outcome.into() }
    }

    #[test]
    fn skipped_positions_are_looked_for_until_the_overlap_ends_and_reported_once() {
        let now = 1_900_000_000;
        let mut c = FeedCursor { at: now, seq: 10, crls: 0, gaps: vec![] };
        // 13 and 14 are skipped: on PostgreSQL, transactions that may still commit.
        let (e, since) = c.absorb(
            &[
                mark(11, now, "session.login", "success"),
                mark(12, now, "api_key.revoke", "failure"),
                mark(15, now, "user.create", "success"),
            ],
            now,
        );
        assert_eq!((e, since), (FeedEffect::default(), None), "nothing that matters; a failure counts for nothing");
        assert_eq!((c.seq, c.gaps.clone()), (15, vec![(13, now), (14, now)]));
        // 13 commits late (a revocation, by a node whose clock is behind); 16 is new.
        let (e, since) = c.absorb(
            &[mark(13, now - 40, "token.revoke", "success"), mark(16, now + 1, "role.set_permissions", "success")],
            now + 1,
        );
        assert_eq!(e, FeedEffect { revoked_tokens: true, grants: true, ..FeedEffect::default() });
        assert_eq!(since, Some(now - 40), "revoked tokens are read back from the revocation's own time");
        assert_eq!((c.seq, c.gaps.clone()), (16, vec![(14, now)]), "13 is not looked for again");
        // 14 never shows: forgotten once the overlap has passed, not before.
        c.expire_gaps(now + FEED_OVERLAP_SECS);
        assert_eq!(c.gaps, vec![(14, now)]);
        c.expire_gaps(now + FEED_OVERLAP_SECS + 1);
        assert!(c.gaps.is_empty());
        // Nothing new: nothing moves.
        assert_eq!(c.absorb(&[], now + 20), (FeedEffect::default(), None));
        assert_eq!(c.seq, 16);
        // A jump far ahead (a sequence that skipped a block) remembers only the newest positions.
        let (e, _) = c.absorb(&[mark(5000, now, "something.unknown", "success")], now + 20);
        assert_eq!(e, FeedEffect { principals: true, ..FeedEffect::default() }, "unknown actions: principals");
        assert_eq!(c.seq, 5000);
        assert_eq!(c.gaps.len(), MAX_GAPS);
        assert_eq!(c.gaps.first().map(|g| g.0), Some(5000 - MAX_GAPS as i64));
        let (_, _) = c.absorb(&[mark(5002, now, "user.create", "success")], now + 21);
        assert_eq!(c.gaps.len(), MAX_GAPS, "the oldest give way");
        assert_eq!(c.gaps.last(), Some(&(5001, now + 21)));
        assert!(FeedCursor::decode(&c.encode()).is_some(), "a full cursor still encodes");
    }

    #[test]
    fn crl_digests_follow_every_number() {
        let a = crl_digest(vec![("i1".into(), 3), ("i2".into(), 7)]);
        assert_eq!(a, crl_digest(vec![("i2".into(), 7), ("i1".into(), 3)]), "order does not matter");
        assert_ne!(a, crl_digest(vec![("i1".into(), 4), ("i2".into(), 7)]));
        assert_ne!(a, crl_digest(vec![("i1".into(), 3)]));
        assert_ne!(crl_digest(vec![("i1".into(), 1)]), crl_digest(vec![("i".into(), 1)]));
    }

    #[test]
    fn server_names_are_checked_strictly() {
        let ok = |v: &[&str]| gateway_server_names(&v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>());
        assert_eq!(
            ok(&["GW.Example", "127.0.0.1", "gw.example", "::1", "localhost", "0:0:0:0:0:0:0:1"]).unwrap(),
            ["gw.example", "127.0.0.1", "::1", "localhost"]
        );
        for bad in [
            "*.example",
            "gw.example.",
            "gw.example:443",
            "[::1]",
            "0.0.0.0",
            "::",
            "224.0.0.1",
            "gw_1.example",
            "-gw.example",
            "",
            "10.0.0.256",
            "1.2.3",
            "fe80::1%eth0",
            "gw example",
            "gw.exämple",
        ] {
            assert!(ok(&[bad]).is_err(), "{bad:?} accepted");
        }
        assert!(ok(&[]).is_err(), "at least one name");
        let many: Vec<String> = (0..17).map(|i| format!("gw{i}.example")).collect();
        assert!(gateway_server_names(&many).is_err());
        assert_eq!(gateway_server_names(&many[..16]).unwrap().len(), 16);
    }

    #[test]
    fn refusals_and_failures_are_told_apart() {
        let v = verdict_of(Error::Unauthenticated("API key was revoked".into())).unwrap().unwrap_err();
        assert_eq!((v.status, v.message.as_str(), v.retry_after_secs), (401, "API key was revoked", None));
        assert_eq!(verdict_of(Error::Forbidden("no".into())).unwrap().unwrap_err().status, 403);
        let v = verdict_of(Error::RateLimited { retry_after_secs: 30 }).unwrap().unwrap_err();
        assert_eq!((v.status, v.retry_after_secs), (429, Some(30)));
        assert!(verdict_of(Error::Store(crate::StoreError::Unavailable("down".into()))).is_err());
        assert!(verdict_of(Error::Internal("boom".into())).is_err());
    }

    #[test]
    fn debug_of_a_key_pair_shows_no_key() {
        let kp = GatewayKeyPair {
            chain: vec![vec![1]],
            key_pkcs8: Zeroizing::new(b"PRIVATE-KEY-BYTES".to_vec()),
            not_after: 5,
        };
        let d = format!("{kp:?}");
        assert!(!d.contains("PRIVATE") && !d.contains("80, 82"), "{d}");
    }
}
