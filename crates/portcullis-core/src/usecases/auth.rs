//! The Auth API: login sessions confirmed by an emailed code, API keys, the codes themselves,
//! password checks behind a concurrency limit, attempt limits and lockout, and the mail queue's
//! delivery loop.
//!
//! Invariants: session tokens, API secrets and codes exist in clear only in the response that
//! hands them out (and, for a pending session's token, sealed until its code is verified);
//! the store keeps keyed hashes. Unknown email, wrong password, disabled and locked accounts
//! give the same answer after the same work (one Argon2id verification). Validation of a
//! session or an API key reads caches and writes nothing (last use is recorded at most once a
//! minute).

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use super::{Credential, Portcullis, Principal, RequestContext};
use crate::clock::UnixTime;
use crate::crypto::password;
use crate::crypto::secrets::{SecretHash, plausible_secret};
use crate::error::{Error, Result};
use crate::ids::{Email, RoleName, new_id};
use crate::mail::{Mailer, MemoryMailer, Message, OutgoingMail};
use crate::model::*;
use crate::ratelimit::SharedLimiter;
use crate::settings::AuthSettings;

pub const SESSION_TOKEN_PREFIX: &str = "pcs_";
pub const API_KEY_PREFIX: &str = "pck_";
/// Digits in an emailed code: with five tries per code, a guess succeeds with p = 5·10⁻⁶.
pub const CODE_DIGITS: usize = 6;
/// Last-use times are written at most this often (seconds), so validation stays read-only.
const TOUCH_INTERVAL: i64 = 60;
const INVALID_LOGIN: &str = "invalid email or password";

/// In-memory state of the Auth API on this node.
pub(crate) struct AuthState {
    pub(crate) mailer: Arc<dyn Mailer>,
    /// Wakes the delivery loop when mail is queued.
    pub(crate) mail_queued: tokio::sync::Notify,
    password_slots: tokio::sync::Semaphore,
    password_wait: Duration,
    pub(crate) account_attempts: SharedLimiter,
    ip_attempts: SharedLimiter,
    /// Password resets asked for per address (known or not): 3 per 15 minutes.
    pub(crate) reset_requests: SharedLimiter,
    /// Self-service actions that send mail (adding an address, creating an API key), per user:
    /// 10 an hour.
    pub(crate) mail_actions: SharedLimiter,
    /// By the token's keyed hash.
    sessions: RwLock<HashMap<[u8; 32], Cached<SessionEntry>>>,
    /// By the public `api-key` value.
    api_keys: RwLock<HashMap<String, Cached<ApiKeyEntry>>>,
    /// Bumped by every invalidation (see `Caches::generation`).
    generation: std::sync::atomic::AtomicU64,
    /// An Argon2id hash of nothing anyone knows: verified against when the account does not
    /// exist, so that answer costs what a wrong password costs.
    dummy_hash: tokio::sync::OnceCell<String>,
}

impl AuthState {
    pub(crate) fn new(s: &AuthSettings) -> Self {
        Self {
            mailer: Arc::new(MemoryMailer::default()),
            mail_queued: tokio::sync::Notify::new(),
            password_slots: tokio::sync::Semaphore::new(s.password_hash_concurrency.max(1)),
            password_wait: Duration::from_millis(s.password_queue_wait_ms),
            account_attempts: SharedLimiter::new("account", s.attempts_per_account_per_minute.max(1), 60),
            ip_attempts: SharedLimiter::new("ip", s.attempts_per_ip_per_minute.max(1), 60),
            reset_requests: SharedLimiter::new("reset", 3, 900),
            mail_actions: SharedLimiter::new("mail", 10, 3600),
            sessions: RwLock::new(HashMap::new()),
            api_keys: RwLock::new(HashMap::new()),
            generation: std::sync::atomic::AtomicU64::new(0),
            dummy_hash: tokio::sync::OnceCell::new(),
        }
    }
}

/// A cache entry and when it must be re-read.
type Cached<T> = (UnixTime, Arc<T>);

/// A cached session with what validation needs beside it.
#[derive(Debug)]
pub struct SessionEntry {
    pub session: Session,
    pub user: User,
    pub org_slug: String,
    last_used: AtomicI64,
}

impl SessionEntry {
    /// When it was last used (as cached: at most a minute behind the store).
    pub fn last_used(&self) -> UnixTime {
        self.last_used.load(Ordering::Relaxed)
    }

    /// Whether this use should be written down (at most once per `TOUCH_INTERVAL`, by one
    /// caller): the idle timeout counts from the last recorded use.
    pub(crate) fn claim_touch(&self, now: UnixTime) -> bool {
        let last = self.last_used.load(Ordering::Relaxed);
        now - last >= TOUCH_INTERVAL
            && self.last_used.compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed).is_ok()
    }
}

/// A cached API key with its owner.
#[derive(Debug)]
pub struct ApiKeyEntry {
    pub key: ApiKey,
    pub user: User,
    pub org_slug: String,
    last_used: AtomicI64,
}

// ---- requests and answers ----------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    pub email: String,
    pub password: SecretString,
    /// Needed only when the address is registered in several organisations.
    #[serde(default)]
    pub organisation: Option<String>,
}

impl std::fmt::Debug for LoginRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoginRequest").field("email", &self.email).finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CodeSubmission {
    pub verification_id: String,
    pub code: SecretString,
}

impl std::fmt::Debug for CodeSubmission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CodeSubmission").field("verification_id", &self.verification_id).finish_non_exhaustive()
    }
}

/// `202` of a login: the token works once the emailed code is verified.
#[derive(Debug)]
pub struct PendingSession {
    pub session_token: SecretString,
    pub verification_id: String,
    pub expires_at: UnixTime,
}

#[derive(Debug)]
pub struct VerifiedSession {
    pub session_token: SecretString,
    pub expires_at: UnixTime,
    pub user: User,
    pub org_slug: String,
}

#[derive(Debug, Serialize)]
pub struct SessionView {
    pub id: String,
    pub user_id: String,
    pub state: CredentialState,
    pub created_at: UnixTime,
    pub verified_at: Option<UnixTime>,
    pub last_used_at: UnixTime,
    pub expires_at: UnixTime,
    pub ip: Option<String>,
    pub user_agent: Option<String>,
    pub revoked_at: Option<UnixTime>,
}

impl From<&Session> for SessionView {
    fn from(s: &Session) -> Self {
        Self {
            id: s.id.clone(),
            user_id: s.user_id.clone(),
            state: s.state,
            created_at: s.created_at,
            verified_at: s.verified_at,
            last_used_at: s.last_used_at,
            expires_at: s.expires_at,
            ip: s.ip.clone(),
            user_agent: s.user_agent.clone(),
            revoked_at: s.revoked_at,
        }
    }
}

/// `expires_at` of a new API key: Unix seconds or an RFC 3339 time.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum TimeInput {
    Unix(i64),
    Text(String),
}

impl TimeInput {
    fn unix(&self) -> Result<UnixTime> {
        match self {
            Self::Unix(t) => Ok(*t),
            Self::Text(s) => time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                .map(|d| d.unix_timestamp())
                .map_err(|_| Error::invalid("expires_at: expected Unix seconds or an RFC 3339 time")),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewApiKey {
    pub name: String,
    /// Default: all of the creator's roles. Must be a subset of them.
    #[serde(default)]
    pub roles: Option<Vec<String>>,
    #[serde(default)]
    pub expires_at: Option<TimeInput>,
}

/// `202` of an API key: the secret is shown here and never again.
#[derive(Debug)]
pub struct CreatedApiKey {
    pub key: ApiKey,
    pub api_secret: SecretString,
    pub verification_id: String,
}

#[derive(Debug, Serialize)]
pub struct ApiKeyView {
    pub id: String,
    pub name: String,
    pub api_key: String,
    pub user_id: String,
    pub roles: Vec<String>,
    pub state: CredentialState,
    pub expires_at: Option<UnixTime>,
    pub last_used_at: Option<UnixTime>,
    pub created_at: UnixTime,
    pub revoked_at: Option<UnixTime>,
}

impl From<&ApiKey> for ApiKeyView {
    fn from(k: &ApiKey) -> Self {
        Self {
            id: k.id.clone(),
            name: k.name.clone(),
            api_key: k.key.clone(),
            user_id: k.user_id.clone(),
            roles: k.roles.iter().map(ToString::to_string).collect(),
            state: k.state,
            expires_at: k.expires_at,
            last_used_at: k.last_used_at,
            created_at: k.created_at,
            revoked_at: k.revoked_at,
        }
    }
}

// ---- helpers ----------------------------------------------------------------------------

/// A new opaque token: `prefix` + 256 bits, base64url.
pub(crate) fn new_token(prefix: &str) -> Result<SecretString> {
    let s = crate::crypto::secrets::generate_secret()?;
    Ok(SecretString::from(format!("{prefix}{}", s.expose_secret())))
}

/// `CODE_DIGITS` decimal digits, uniform (rejection sampling on the CSPRNG's bytes).
pub(crate) fn new_code() -> Result<SecretString> {
    let mut out = String::with_capacity(CODE_DIGITS);
    let mut buf = zeroize::Zeroizing::new([0u8; 32]);
    while out.len() < CODE_DIGITS {
        aws_lc_rs::rand::fill(buf.as_mut()).map_err(Error::internal)?;
        for b in buf.iter() {
            // 250 = 25 × 10: bytes above it would bias the digits.
            if *b < 250 && out.len() < CODE_DIGITS {
                out.push(char::from(b'0' + b % 10));
            }
        }
    }
    Ok(SecretString::from(out))
}

fn looks_like_code(c: &SecretString) -> bool {
    let c = c.expose_secret();
    (6..=10).contains(&c.len()) && c.bytes().all(|b| b.is_ascii_digit())
}

pub(crate) fn code_hash(p: &Portcullis, verification_id: &str, code: &str) -> SecretHash {
    SecretHash::of(p.vault.as_ref(), &format!("code:{verification_id}:{code}"))
}

fn token_purpose(verification_id: &str) -> String {
    format!("session-token:{verification_id}")
}

/// The unit an IP address is counted in: the address for IPv4, its /64 for IPv6 (one host
/// usually holds a whole /64, so per-address counting would give it 2⁶⁴ budgets).
pub(crate) fn ip_bucket(ip: Option<&str>) -> String {
    match ip.map(str::parse::<std::net::IpAddr>) {
        Some(Ok(std::net::IpAddr::V6(v6))) if v6.to_ipv4_mapped().is_none() => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
        Some(Ok(std::net::IpAddr::V6(v6))) => v6.to_ipv4_mapped().map(|v4| v4.to_string()).unwrap_or_default(),
        Some(Ok(std::net::IpAddr::V4(v4))) => v4.to_string(),
        _ => ip.unwrap_or("unknown").to_owned(),
    }
}

/// Ids we hand out are UUIDs; anything else (NUL bytes included, which PostgreSQL refuses in
/// text) never reaches the store.
pub(crate) fn plausible_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// A token we could have issued: our prefix, bounded, printable ASCII (checked before hashing,
/// without copying it, on the validation path).
fn plausible_token(t: &str, prefix: &str) -> bool {
    t.starts_with(prefix) && t.len() <= 128 && t.bytes().all(|b| b.is_ascii_graphic())
}

impl Portcullis {
    // ---- passwords ------------------------------------------------------------------------

    /// Runs Argon2id work on a blocking thread, at most `password_hash_concurrency` at once;
    /// a request that waits longer than `password_queue_wait_ms` for a turn gets 429.
    pub(crate) async fn with_password_slot<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T> {
        let permit = match tokio::time::timeout(self.auth.password_wait, self.auth.password_slots.acquire()).await {
            Ok(Ok(p)) => p,
            Ok(Err(_)) => return Err(Error::internal("password slots closed")),
            Err(_) => {
                metrics::counter!("portcullis_password_hash_rejected_total").increment(1);
                return Err(Error::RateLimited { retry_after_secs: 1 });
            }
        };
        let out = tokio::task::spawn_blocking(work).await.map_err(Error::internal)?;
        drop(permit);
        Ok(out)
    }

    pub(crate) async fn hash_password_limited(&self, p: SecretString) -> Result<String> {
        password::check_password_policy(&p)?;
        self.with_password_slot(move || password::hash_password(&p)).await?
    }

    /// Verifies `p` against `phc`, or — when there is no hash to check — against a dummy
    /// hash, so that both cost the same; `false` then.
    pub(crate) async fn verify_password_limited(&self, p: SecretString, phc: Option<String>) -> Result<bool> {
        let real = phc.is_some();
        let phc = match phc {
            Some(h) => h,
            None => self.dummy_hash().await?,
        };
        let ok = self.with_password_slot(move || password::verify_password(&p, &phc)).await?;
        Ok(ok && real)
    }

    async fn dummy_hash(&self) -> Result<String> {
        self.auth
            .dummy_hash
            .get_or_try_init(|| async {
                let p = crate::crypto::secrets::generate_password()?;
                tokio::task::spawn_blocking(move || password::hash_password(&p)).await.map_err(Error::internal)?
            })
            .await
            .cloned()
    }

    // ---- attempt limits -------------------------------------------------------------------

    /// Counts an attempt for the client IP and the account (if known), across every node:
    /// 429 when either has used up its minute.
    pub(crate) async fn count_attempt(&self, ctx: &RequestContext, account: Option<&str>) -> Result<()> {
        let now = self.now();
        let ip_key = format!("ip:{}", ip_bucket(ctx.ip.as_deref()));
        let store = self.store.as_ref();
        self.auth
            .ip_attempts
            .fail(store, &[&ip_key], now)
            .await
            .map_err(|retry_after_secs| Error::RateLimited { retry_after_secs })?;
        if let Some(a) = account {
            self.auth
                .account_attempts
                .fail(store, &[&format!("account:{a}")], now)
                .await
                .map_err(|retry_after_secs| Error::RateLimited { retry_after_secs })?;
        }
        Ok(())
    }

    /// Self-service actions that send mail are limited per user (no mail bombing through a
    /// stolen session, no unbounded rows).
    pub(crate) async fn count_mail_action(&self, user_id: &str) -> Result<()> {
        self.auth
            .mail_actions
            .fail(self.store.as_ref(), &[user_id], self.now())
            .await
            .map_err(|retry_after_secs| Error::RateLimited { retry_after_secs })
    }

    // ---- mail -----------------------------------------------------------------------------

    /// Renders `msg` for `to` and seals it for the queue.
    pub(crate) fn queued_mail(&self, to: &Email, msg: &Message<'_>) -> Result<QueuedMail> {
        let r = msg.render();
        let id = new_id();
        let body = serde_json::json!({ "text": r.text.as_str(), "html": r.html.as_str() }).to_string();
        let body = zeroize::Zeroizing::new(body);
        let sealed_body = self.vault.seal(&format!("mail:{id}"), body.as_bytes())?;
        let now = self.now();
        Ok(QueuedMail {
            id,
            to: to.to_string(),
            subject: r.subject,
            sealed_body,
            attempts: 0,
            next_attempt_at: now,
            last_error: None,
            created_at: now,
            sent_at: None,
        })
    }

    /// After a commit that queued mail: wake the delivery loop; with the local outbox, also
    /// log the code so a first run works without a mail server.
    pub(crate) fn mail_queued(&self, to: &Email, msg: &Message<'_>) {
        self.auth.mail_queued.notify_one();
        if self.auth.mailer.is_local()
            && let Some(code) = msg.code()
        {
            tracing::info!(to = %to, kind = msg.kind(), code, "no SMTP configured: the code is in the outbox and here");
        }
    }

    /// Queues a message that is not part of another change (lockout and password notices).
    pub(crate) async fn send_notice(&self, to: &Email, msg: &Message<'_>) {
        let queued = match self.queued_mail(to, msg) {
            Ok(m) => m,
            Err(e) => return tracing::error!(error = %e, "could not prepare a notice"),
        };
        match self.store.enqueue_mail(&queued).await {
            Ok(()) => self.mail_queued(to, msg),
            Err(e) => tracing::error!(error = %e, kind = msg.kind(), "could not queue a notice"),
        }
    }

    /// Waits until mail is queued or `timeout` passes (the delivery loop's sleep).
    pub async fn wait_for_mail(&self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.auth.mail_queued.notified()).await;
    }

    /// Delivers what is due; returns how many were sent. Failures are kept with backoff.
    pub async fn deliver_mail(&self) -> Result<usize> {
        let due = self.store.due_mail(self.now(), 50).await?;
        let mut sent = 0;
        for m in due {
            let body = match self.vault.open(&format!("mail:{}", m.id), &m.sealed_body) {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(mail_id = %m.id, error = %e, "queued mail cannot be opened; kept for inspection");
                    let attempts = m.attempts.saturating_add(1);
                    self.store.mail_failed(&m.id, attempts, self.now() + 86_400, "cannot be opened").await?;
                    continue;
                }
            };
            #[derive(Deserialize)]
            struct Body {
                text: String,
                html: String,
            }
            let Ok(b) = serde_json::from_slice::<Body>(&body) else {
                tracing::error!(mail_id = %m.id, "queued mail body is malformed; kept for inspection");
                self.store.mail_failed(&m.id, m.attempts.saturating_add(1), self.now() + 86_400, "malformed").await?;
                continue;
            };
            let out = OutgoingMail {
                id: m.id.clone(),
                to: m.to.clone(),
                subject: m.subject.clone(),
                text: b.text,
                html: b.html,
            };
            let result = self.auth.mailer.send(&out).await;
            drop(zeroize::Zeroizing::new(out.text));
            drop(zeroize::Zeroizing::new(out.html));
            match result {
                Ok(()) => {
                    self.store.mail_sent(&m.id, self.now()).await?;
                    metrics::counter!("portcullis_mail_sent_total").increment(1);
                    sent += 1;
                }
                Err(e) => {
                    let attempts = m.attempts.saturating_add(1);
                    let next = self.now() + crate::mail::retry_delay(attempts, e.permanent);
                    tracing::warn!(mail_id = %m.id, attempts, permanent = e.permanent, error = %e.message, "mail delivery failed; will retry");
                    metrics::counter!("portcullis_mail_failed_total").increment(1);
                    self.store.mail_failed(&m.id, attempts, next, &e.message).await?;
                }
            }
        }
        Ok(sent)
    }

    /// Deletes sessions that ended, verifications that expired and delivered mail records
    /// older than a week, and API keys that ended (revoked, expired, never activated) more than
    /// 30 days ago — kept that long so users and admins can still see them.
    pub async fn purge_ended_credentials(&self) -> Result<u64> {
        let now = self.now();
        let week = now - 7 * 86_400;
        Ok(self.store.purge_sessions(week).await?
            + self.store.purge_verifications(week).await?
            + self.store.purge_sent_mail(week).await?
            + self.store.purge_api_keys(now - 30 * 86_400).await?
            + self.store.purge_oidc(now - 86_400).await?)
    }

    // ---- codes ----------------------------------------------------------------------------

    pub(crate) fn new_verification(
        &self,
        purpose: VerificationPurpose,
        user: &User,
        subject_id: &str,
        code: &SecretString,
    ) -> Verification {
        let id = new_id();
        let now = self.now();
        Verification {
            code_hash: code_hash(self, &id, code.expose_secret()),
            id,
            purpose,
            org_id: user.org_id.clone(),
            user_id: user.id.clone(),
            subject_id: subject_id.to_owned(),
            attempts: 0,
            expires_at: now + self.settings.auth.code_lifetime,
            consumed_at: None,
            created_at: now,
            sealed_token: None,
        }
    }

    pub(crate) fn code_minutes(&self) -> i64 {
        (self.settings.auth.code_lifetime / 60).max(1)
    }

    /// Checks a submitted code: the verification exists for `purpose`, is neither used nor
    /// expired, has tries left (counted before comparing), and the code matches.
    pub(crate) async fn check_code(
        &self,
        ctx: &RequestContext,
        sub: &CodeSubmission,
        purpose: VerificationPurpose,
    ) -> Result<Verification> {
        self.count_attempt(ctx, None).await?;
        if !looks_like_code(&sub.code) {
            return Err(Error::invalid(format!("code must be {CODE_DIGITS} digits")));
        }
        if !plausible_id(&sub.verification_id) {
            return Err(Error::invalid("verification_id is malformed: expected the id the server returned"));
        }
        // A password reset hands out a verification id whether or not the address has an
        // account: its refusals must all read alike, or a guessed code would tell a real id
        // ("tries left") from a made-up one.
        let uniform = purpose == VerificationPurpose::PasswordReset;
        let refuse =
            |why: &str| Error::Unauthenticated(if uniform { "invalid or expired code" } else { why }.to_owned());
        let Some(v) = self.store.verification(&sub.verification_id).await?.filter(|v| v.purpose == purpose) else {
            return Err(refuse("invalid or expired code"));
        };
        // Per account too: wrong codes across all of a user's verifications (e.g. repeated
        // logins) share one budget a minute. Not for resets: a 429 that only real accounts can
        // reach would tell them from made-up ids (resets are limited per address when asked for).
        // Counted before comparing (so parallel guesses all count) and given back when right.
        let account_key = format!("verify:{}", v.user_id);
        if !uniform {
            self.auth
                .account_attempts
                .fail(self.store.as_ref(), &[&account_key], self.now())
                .await
                .map_err(|retry_after_secs| Error::RateLimited { retry_after_secs })?;
        }
        if v.consumed_at.is_some() {
            self.audit_code_failure(ctx, &v, "code already used").await;
            return Err(refuse("this code was already used"));
        }
        if v.expires_at <= self.now() {
            self.audit_code_failure(ctx, &v, "code expired").await;
            return Err(refuse("this code has expired; ask for a new one"));
        }
        let Some(tries) = self.store.count_verification_attempt(&v.id).await? else {
            return Err(refuse("this code was already used"));
        };
        if tries > self.settings.auth.code_max_attempts {
            self.audit_code_failure(ctx, &v, "too many wrong codes").await;
            return Err(refuse("too many wrong codes; start again to get a new one"));
        }
        if !code_hash(self, &v.id, sub.code.expose_secret()).matches(&v.code_hash) {
            self.audit_code_failure(ctx, &v, "wrong code").await;
            let left = self.settings.auth.code_max_attempts.saturating_sub(tries);
            return Err(refuse(&format!("wrong code ({left} tries left)")));
        }
        if !uniform {
            self.auth.account_attempts.forgive(self.store.as_ref(), &account_key, self.now()).await;
        }
        Ok(v)
    }

    pub(crate) async fn audit_code_failure(&self, ctx: &RequestContext, v: &Verification, reason: &str) {
        let mut ev = self.audit(
            ctx,
            &v.user_id,
            Some(&v.org_id),
            &format!("{}.verify", v.purpose.as_str()),
            &v.subject_id,
            serde_json::json!({ "reason": reason, "verification_id": v.id }),
        );
        ev.outcome = "failure".to_owned();
        if let Err(e) = self.store.append_audit(&ev).await {
            tracing::error!(error = %e, "could not record a failed verification");
        }
    }

    pub(crate) async fn consume(
        &self,
        ctx: &RequestContext,
        v: &Verification,
        effect: VerificationEffect,
        action: &str,
    ) -> Result<()> {
        let ev = self.audit(ctx, &v.user_id, Some(&v.org_id), action, &v.subject_id, serde_json::json!({}));
        if !self.store.consume_verification(&v.id, self.now(), &effect, &ev).await? {
            return Err(Error::Unauthenticated("this code was already used".into()));
        }
        Ok(())
    }

    // ---- sessions -------------------------------------------------------------------------

    /// `POST /api/v1/sessions`: checks the password (same answer and cost for every failure),
    /// creates a pending session and emails its code.
    pub async fn login(
        &self,
        ctx: &RequestContext,
        req: LoginRequest,
        user_agent: Option<&str>,
    ) -> Result<PendingSession> {
        Ok(self.login_with(ctx, req, user_agent, false).await?.0)
    }

    /// The login. With `app_factor` (the sign-in pages), a person with a confirmed
    /// authenticator app gets no mail: the verification waits for an app code instead. The
    /// `bool` says which: `true` for the app.
    pub(crate) async fn login_with(
        &self,
        ctx: &RequestContext,
        req: LoginRequest,
        user_agent: Option<&str>,
        app_factor: bool,
    ) -> Result<(PendingSession, bool)> {
        let email = Email::parse(&req.email)?;
        self.count_attempt(ctx, Some(email.as_str())).await?;
        let user = self.login_candidate(&email, req.organisation.as_deref()).await?;
        let now = self.now();
        let locked = user.as_ref().is_some_and(|u| u.locked_until.is_some_and(|t| t > now));
        let hash = user.as_ref().filter(|u| !locked && u.enabled).and_then(|u| u.password_hash.clone());
        let ok = self.verify_password_limited(req.password, hash).await?;
        let Some(user) = user else {
            self.audit_failed_authentication(ctx, email.as_str(), "session.login", "unknown email").await;
            return Err(Error::Unauthenticated(INVALID_LOGIN.into()));
        };
        if !ok {
            self.login_failed(ctx, &user, locked).await;
            return Err(Error::Unauthenticated(INVALID_LOGIN.into()));
        }
        let org_slug = self.org_slug(&user.org_id).await?;
        let uses_app = app_factor && self.totp_enrolled(&user.id).await?;
        let email_code = !uses_app;
        let token = new_token(SESSION_TOKEN_PREFIX)?;
        let code = new_code()?;
        let session = Session {
            id: new_id(),
            user_id: user.id.clone(),
            org_id: user.org_id.clone(),
            token_hash: SecretHash::of(self.vault.as_ref(), token.expose_secret()),
            state: CredentialState::Pending,
            created_at: now,
            verified_at: None,
            last_used_at: now,
            expires_at: now + self.settings.auth.session_lifetime,
            ip: ctx.ip.clone(),
            user_agent: user_agent.map(|u| u.chars().filter(|c| !c.is_control()).take(256).collect()),
            revoked_at: None,
            parent_id: None,
        };
        let mut v = self.new_verification(VerificationPurpose::Session, &user, &session.id, &code);
        v.sealed_token = Some(self.vault.seal(&token_purpose(&v.id), token.expose_secret().as_bytes())?);
        let msg =
            Message::LoginCode { code: code.expose_secret(), ip: ctx.ip.as_deref(), minutes: self.code_minutes() };
        let mail = if email_code { Some(self.queued_mail(&user.email, &msg)?) } else { None };
        if user.failed_logins > 0 {
            let ev = self.audit(
                ctx,
                &user.id,
                Some(&user.org_id),
                "session.login.reset_failures",
                &user.id,
                serde_json::json!({}),
            );
            self.store.set_login_failures(&user.id, 0, None, &ev).await?;
        }
        let ev = self.audit(
            ctx,
            &user.id,
            Some(&user.org_id),
            "session.login",
            &session.id,
            serde_json::json!({ "org": org_slug, "verification_id": v.id }),
        );
        self.store.create_session(&session, &v, mail.as_ref(), &ev).await?;
        if email_code {
            self.mail_queued(&user.email, &msg);
        }
        Ok((PendingSession { session_token: token, verification_id: v.id, expires_at: session.expires_at }, uses_app))
    }

    /// The account an email address names: in `organisation` if given, else the only
    /// account with that address (several → none: the caller must name the organisation).
    pub(crate) async fn login_candidate(&self, email: &Email, organisation: Option<&str>) -> Result<Option<User>> {
        match organisation {
            Some(slug) => match self.store.organisation(crate::ids::Slug::parse(slug)?.as_str()).await? {
                Some(org) => Ok(self.store.user_by_email(&org.id, email.as_str()).await?),
                None => Ok(None),
            },
            None => {
                let mut found = self.store.users_with_email(email.as_str(), 2).await?;
                Ok(if found.len() == 1 { found.pop() } else { None })
            }
        }
    }

    /// Counts a failed login against an existing account (atomically, so parallel guesses
    /// all count), locks it at the threshold and tells its owner by email.
    async fn login_failed(&self, ctx: &RequestContext, user: &User, locked: bool) {
        let now = self.now();
        let reason = if locked {
            "account locked"
        } else if !user.enabled {
            "account disabled"
        } else {
            "wrong password"
        };
        let threshold = self.settings.auth.lockout_threshold;
        let lock_until = now + self.settings.auth.lockout_duration;
        let mut ev = self.audit(
            ctx,
            &user.id,
            Some(&user.org_id),
            "session.login",
            &user.id,
            serde_json::json!({ "reason": reason }),
        );
        ev.outcome = "failure".to_owned();
        match self.store.record_login_failure(&user.id, now, threshold, lock_until, &ev).await {
            // Exactly the failure that reached the threshold locked it (later ones count on).
            Ok(Some((failures, Some(until)))) if failures == threshold && until == lock_until => {
                self.send_notice(&user.email, &Message::AccountLocked { until, failures }).await;
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "could not record a failed login"),
        }
    }

    async fn org_slug(&self, org_id: &str) -> Result<String> {
        self.store
            .organisation_by_id(org_id)
            .await?
            .map(|o| o.slug.to_string())
            .ok_or_else(|| Error::internal("user without organisation"))
    }

    /// `POST /api/v1/sessions/verify`: the code activates the session; the answer carries the
    /// token the login returned.
    pub async fn verify_session(&self, ctx: &RequestContext, sub: CodeSubmission) -> Result<VerifiedSession> {
        let v = self.check_code(ctx, &sub, VerificationPurpose::Session).await?;
        let token = match &v.sealed_token {
            Some(sealed) => {
                let b = self.vault.open(&token_purpose(&v.id), sealed)?;
                SecretString::from(String::from_utf8(b.to_vec()).map_err(Error::internal)?)
            }
            None => return Err(Error::Unauthenticated("this code was already used".into())),
        };
        self.consume(
            ctx,
            &v,
            VerificationEffect::ActivateSession { session_id: v.subject_id.clone() },
            "session.verify",
        )
        .await?;
        self.forget_session(&SecretHash::of(self.vault.as_ref(), token.expose_secret()));
        let entry = self.session_entry(token.expose_secret()).await?;
        let Some(entry) = entry.filter(|e| e.session.state == CredentialState::Active) else {
            return Err(Error::Unauthenticated("the session ended before it was verified".into()));
        };
        Ok(VerifiedSession {
            session_token: token,
            expires_at: entry.session.expires_at,
            user: entry.user.clone(),
            org_slug: entry.org_slug.clone(),
        })
    }

    /// Reads a session (cache first) by its token.
    pub(crate) async fn session_entry(&self, token: &str) -> Result<Option<Arc<SessionEntry>>> {
        self.session_entry_with(token, false).await
    }

    /// Reads a session by its token: `fresh` skips the cache (and refreshes it), for callers
    /// that must see another node's revocation at once (the gateway's checks).
    async fn session_entry_with(&self, token: &str, fresh: bool) -> Result<Option<Arc<SessionEntry>>> {
        if !plausible_token(token, SESSION_TOKEN_PREFIX) {
            return Ok(None);
        }
        let hash = SecretHash::of(self.vault.as_ref(), token);
        let now = self.now();
        if !fresh
            && let Ok(map) = self.auth.sessions.read()
            && let Some((until, e)) = map.get(&hash.0)
            && *until > now
        {
            return Ok(Some(e.clone()));
        }
        let generation = self.auth.generation.load(Ordering::Acquire);
        let found = match self.store.session_by_token(&hash).await? {
            Some(session) => self.store.user(&session.org_id, &session.user_id).await?.map(|user| (session, user)),
            None => None,
        };
        let Some((session, user)) = found else {
            if fresh {
                self.forget_session(&hash);
            }
            return Ok(None);
        };
        let org_slug = self.org_slug(&user.org_id).await?;
        let entry = Arc::new(SessionEntry { last_used: AtomicI64::new(session.last_used_at), session, user, org_slug });
        if let Ok(mut map) = self.auth.sessions.write()
            && self.auth.generation.load(Ordering::Acquire) == generation
        {
            if map.len() > 200_000 {
                map.retain(|_, (until, _)| *until > now);
            }
            map.insert(hash.0, (now + self.settings.cache_ttl, entry.clone()));
        }
        Ok(Some(entry))
    }

    /// Drops one cached session (after it changed: verified, refreshed, revoked).
    pub(crate) fn forget_session(&self, token_hash: &SecretHash) {
        self.auth.generation.fetch_add(1, Ordering::AcqRel);
        if let Ok(mut map) = self.auth.sessions.write() {
            map.remove(&token_hash.0);
        }
    }

    /// Drops one cached API key (after it was activated or revoked).
    fn forget_api_key(&self, key: &str) {
        self.auth.generation.fetch_add(1, Ordering::AcqRel);
        if let Ok(mut map) = self.auth.api_keys.write() {
            map.remove(key);
        }
    }

    /// Drops every cached session and API key (another node changed some).
    pub(crate) fn forget_all_credentials(&self) {
        self.auth.generation.fetch_add(1, Ordering::AcqRel);
        if let Ok(mut map) = self.auth.sessions.write() {
            map.clear();
        }
        if let Ok(mut map) = self.auth.api_keys.write() {
            map.clear();
        }
    }

    /// Drops every cached session and API key of `user_id` (after a change to the user, or to
    /// all its sessions at once). Scans both caches: for the rarer changes only.
    pub(crate) fn forget_user_credentials(&self, user_id: &str) {
        self.auth.generation.fetch_add(1, Ordering::AcqRel);
        if let Ok(mut map) = self.auth.sessions.write() {
            map.retain(|_, (_, e)| e.user.id != user_id);
        }
        if let Ok(mut map) = self.auth.api_keys.write() {
            map.retain(|_, (_, e)| e.user.id != user_id);
        }
    }

    /// Validates a session token (`GET /api/v1/sessions/current` and every session-authenticated
    /// request): active, within both lifetimes, its user enabled.
    pub async fn validate_session(&self, ctx: &RequestContext, token: &str) -> Result<Arc<SessionEntry>> {
        self.checked_session(ctx, token, false).await
    }

    /// [`Self::validate_session`], reading the session past the cache when `fresh`.
    pub(crate) async fn checked_session(
        &self,
        ctx: &RequestContext,
        token: &str,
        fresh: bool,
    ) -> Result<Arc<SessionEntry>> {
        let Some(e) = self.session_entry_with(token, fresh).await? else {
            return Err(self
                .credential_refused(ctx, "session", None, "session.authenticate", "unknown session token")
                .await);
        };
        let now = self.now();
        let s = &e.session;
        let why = match s.state {
            CredentialState::Pending => Some("session is not verified yet: submit the emailed code"),
            CredentialState::Revoked => Some("session was revoked"),
            CredentialState::Active if s.expires_at <= now => Some("session expired"),
            CredentialState::Active
                if e.last_used.load(Ordering::Relaxed) + self.settings.auth.session_idle_timeout <= now =>
            {
                Some("session expired (idle)")
            }
            CredentialState::Active if !e.user.enabled => Some("user is disabled"),
            CredentialState::Active => match &s.parent_id {
                // A gateway browser session lives only as long as its SSO session.
                Some(parent) => match self.store.session(parent).await? {
                    Some(p) if p.state == CredentialState::Active && p.expires_at > now => None,
                    _ => Some("the sign-in this session belongs to has ended"),
                },
                None => None,
            },
        };
        if let Some(why) = why {
            let action =
                if s.state == CredentialState::Revoked { "session.use_revoked" } else { "session.authenticate" };
            return Err(self.credential_refused(ctx, &s.id, Some(&e.user), action, why).await);
        }
        if e.claim_touch(now)
            && let Err(err) = self.store.touch_session(&s.id, now).await
        {
            tracing::warn!(error = %err, "could not record a session's last use");
        }
        Ok(e)
    }

    /// A refused session or API key: 429 once the client IP has used up its failures, else
    /// one audit event (in the user's organisation when the credential is known) and 401.
    async fn credential_refused(
        &self,
        ctx: &RequestContext,
        presented: &str,
        user: Option<&User>,
        action: &str,
        reason: &str,
    ) -> Error {
        if let Some(ip) = &ctx.ip
            && let Err(retry_after_secs) = self
                .auth_failures
                .fail(self.store.as_ref(), &[&format!("credential-ip:{}", ip_bucket(Some(ip)))], self.now())
                .await
        {
            return Error::RateLimited { retry_after_secs };
        }
        match user {
            Some(u) => {
                let mut ev =
                    self.audit(ctx, &u.id, Some(&u.org_id), action, presented, serde_json::json!({ "reason": reason }));
                ev.outcome = "failure".to_owned();
                if let Err(e) = self.store.append_audit(&ev).await {
                    tracing::error!(error = %e, "could not record a refused credential");
                }
            }
            None => self.audit_failed_authentication(ctx, presented, action, reason).await,
        }
        Error::Unauthenticated(reason.to_owned())
    }

    pub fn session_principal(e: &SessionEntry) -> Principal {
        Principal {
            subject: e.user.id.clone(),
            client_id: "session".into(),
            org: e.org_slug.clone(),
            roles: e.user.roles.iter().map(ToString::to_string).collect(),
            scopes: vec![],
            credential: Credential::Session { id: e.session.id.clone() },
        }
    }

    /// `POST /api/v1/sessions/refresh`: a new token for the same session; the old one dies at
    /// once (a second refresh with it fails).
    pub async fn refresh_session(&self, ctx: &RequestContext, token: &str) -> Result<(SecretString, UnixTime)> {
        let e = self.validate_session(ctx, token).await?;
        let new = new_token(SESSION_TOKEN_PREFIX)?;
        let old_hash = SecretHash::of(self.vault.as_ref(), token);
        let new_hash = SecretHash::of(self.vault.as_ref(), new.expose_secret());
        let ev =
            self.audit(ctx, &e.user.id, Some(&e.user.org_id), "session.refresh", &e.session.id, serde_json::json!({}));
        let rotated = self.store.rotate_session_token(&e.session.id, &old_hash, &new_hash, self.now(), &ev).await?;
        self.forget_session(&old_hash);
        if !rotated {
            return Err(Error::Unauthenticated("session token was already refreshed or revoked".into()));
        }
        Ok((new, e.session.expires_at))
    }

    /// `DELETE /api/v1/sessions/current` (and a user revoking one of their own sessions).
    pub async fn revoke_session(&self, ctx: &RequestContext, who: &Principal, session_id: &str) -> Result<()> {
        let user_id = who.ensure_user()?;
        let Some(s) = self.store.session(session_id).await?.filter(|s| s.user_id == user_id) else {
            return Err(Error::NotFound(format!("session {session_id:?}")));
        };
        self.end_session(ctx, &who.subject, &s).await
    }

    /// Revokes a session, and with it what was signed in with it (OIDC refresh tokens,
    /// back-channel logout).
    async fn end_session(&self, ctx: &RequestContext, actor: &str, s: &Session) -> Result<()> {
        match self.store.user(&s.org_id, &s.user_id).await? {
            Some(user) => self.sign_out(ctx, actor, "session.revoke", &s.id, &user).await,
            None => Err(Error::NotFound(format!("session {:?}", s.id))),
        }
    }

    /// The caller's own sessions, newest first.
    pub async fn my_sessions(&self, who: &Principal, page: Page) -> Result<Vec<Session>> {
        let user_id = who.ensure_user()?;
        Ok(self.store.user_sessions(user_id, page).await?)
    }

    /// Admins: a user's sessions.
    pub async fn user_sessions(
        &self,
        who: &Principal,
        org_slug: &str,
        user_id: &str,
        page: Page,
    ) -> Result<Vec<Session>> {
        let org = self.administered_org(who, org_slug).await?;
        let user =
            self.store.user(&org.id, user_id).await?.ok_or_else(|| Error::NotFound(format!("user {user_id:?}")))?;
        super::users::ensure_may_manage_user(who, &user)?;
        Ok(self.store.user_sessions(&user.id, page).await?)
    }

    /// Admins: ends one session of their organisation.
    pub async fn admin_revoke_session(
        &self,
        who: &Principal,
        ctx: &RequestContext,
        org_slug: &str,
        id: &str,
    ) -> Result<()> {
        let org = self.administered_org(who, org_slug).await?;
        let Some(s) = self.store.session(id).await?.filter(|s| s.org_id == org.id) else {
            return Err(Error::NotFound(format!("session {id:?}")));
        };
        if let Some(owner) = self.store.user(&org.id, &s.user_id).await? {
            super::users::ensure_may_manage_user(who, &owner)?;
        }
        self.end_session(ctx, &who.subject, &s).await
    }

    /// Admins: ends every session of a user.
    pub async fn admin_revoke_user_sessions(
        &self,
        who: &Principal,
        ctx: &RequestContext,
        org_slug: &str,
        user_id: &str,
    ) -> Result<u64> {
        let org = self.administered_org(who, org_slug).await?;
        let user =
            self.store.user(&org.id, user_id).await?.ok_or_else(|| Error::NotFound(format!("user {user_id:?}")))?;
        super::users::ensure_may_manage_user(who, &user)?;
        let signed_out = self.sign_out_everywhere(ctx, &who.subject, &user).await?;
        let ev = self.audit(ctx, &who.subject, Some(&org.id), "session.revoke_all", &user.id, serde_json::json!({}));
        // Pending sessions (and any that appeared meanwhile) end here.
        let n = self.store.revoke_user_sessions(&user.id, self.now(), &ev).await?;
        self.forget_user_credentials(&user.id);
        Ok(signed_out + n)
    }

    // ---- API keys ---------------------------------------------------------------------------

    /// `POST /api/v1/api-keys`: a signed-in user creates a key with a subset of their roles;
    /// it works once the emailed code is verified.
    pub async fn create_api_key(&self, ctx: &RequestContext, who: &Principal, req: NewApiKey) -> Result<CreatedApiKey> {
        let user_id = who.ensure_user()?.to_owned();
        self.count_mail_action(&user_id).await?;
        let org = self.organisation_or_404(&who.org).await?;
        let user = self.store.user(&org.id, &user_id).await?.ok_or_else(|| Error::NotFound("user".into()))?;
        let name = req.name.trim();
        if name.is_empty() || name.chars().count() > 100 || name.chars().any(char::is_control) {
            return Err(Error::invalid("name must be 1 to 100 characters without control characters"));
        }
        let roles = match &req.roles {
            None => user.roles.clone(),
            Some(list) => {
                let mut roles = list.iter().map(|r| RoleName::parse(r)).collect::<Result<Vec<_>>>()?;
                roles.sort();
                roles.dedup();
                if let Some(extra) = roles.iter().find(|r| !user.roles.contains(r)) {
                    return Err(Error::Forbidden(format!(
                        "role {extra} is not one of yours: an API key gets a subset of its creator's roles"
                    )));
                }
                roles
            }
        };
        let now = self.now();
        let expires_at = req.expires_at.as_ref().map(TimeInput::unix).transpose()?;
        if let Some(t) = expires_at
            && (t <= now || t > now + self.settings.auth.api_key_max_lifetime)
        {
            return Err(Error::invalid(format!(
                "expires_at must be in the future and at most {} days away",
                self.settings.auth.api_key_max_lifetime / 86_400
            )));
        }
        let secret = crate::crypto::secrets::generate_secret()?;
        let key_id = crate::crypto::secrets::generate_password()?;
        let key = ApiKey {
            id: new_id(),
            org_id: org.id.clone(),
            user_id: user.id.clone(),
            name: name.to_owned(),
            key: format!("{API_KEY_PREFIX}{}", key_id.expose_secret()),
            secret_hash: SecretHash::of(self.vault.as_ref(), secret.expose_secret()),
            roles,
            state: CredentialState::Pending,
            expires_at,
            last_used_at: None,
            created_at: now,
            revoked_at: None,
        };
        let code = new_code()?;
        let v = self.new_verification(VerificationPurpose::ApiKey, &user, &key.id, &code);
        let msg = Message::ApiKeyCode { code: code.expose_secret(), key_name: &key.name, minutes: self.code_minutes() };
        let mail = self.queued_mail(&user.email, &msg)?;
        let ev = self.audit(
            ctx,
            &user.id,
            Some(&org.id),
            "api_key.create",
            &key.id,
            serde_json::json!({ "name": key.name, "api_key": key.key, "roles": key.roles, "verification_id": v.id }),
        );
        self.store.create_api_key(&key, &v, &mail, &ev).await?;
        self.mail_queued(&user.email, &msg);
        Ok(CreatedApiKey { key, api_secret: secret, verification_id: v.id })
    }

    /// `POST /api/v1/api-keys/verify`: the code activates the key.
    pub async fn verify_api_key(&self, ctx: &RequestContext, sub: CodeSubmission) -> Result<ApiKey> {
        let v = self.check_code(ctx, &sub, VerificationPurpose::ApiKey).await?;
        self.consume(ctx, &v, VerificationEffect::ActivateApiKey { key_id: v.subject_id.clone() }, "api_key.verify")
            .await?;
        let key =
            self.store.api_key(&v.org_id, &v.subject_id).await?.ok_or_else(|| Error::NotFound("API key".into()))?;
        self.forget_api_key(&key.key);
        Ok(key)
    }

    /// Authenticates `api-key` + `api-secret` headers: an active, unexpired key whose secret
    /// matches, of an enabled user; its roles are those it was given that the user still holds.
    pub async fn authenticate_api_key(&self, ctx: &RequestContext, key: &str, secret: &str) -> Result<Principal> {
        self.api_key_principal(ctx, key, secret, false).await
    }

    /// [`Self::authenticate_api_key`], reading the key past the cache when `fresh`.
    pub(crate) async fn api_key_principal(
        &self,
        ctx: &RequestContext,
        key: &str,
        secret: &str,
        fresh: bool,
    ) -> Result<Principal> {
        let secret = SecretString::from(secret.to_owned());
        let entry = if key.starts_with(API_KEY_PREFIX) && key.len() <= 64 && plausible_secret(&secret) {
            self.api_key_entry(key, fresh).await?
        } else {
            None
        };
        let presented: String = key.chars().take(64).collect();
        let Some(e) = entry else {
            return Err(self
                .credential_refused(ctx, &presented, None, "api_key.authenticate", "unknown API key or wrong secret")
                .await);
        };
        if !SecretHash::of(self.vault.as_ref(), secret.expose_secret()).matches(&e.key.secret_hash) {
            return Err(self
                .credential_refused(
                    ctx,
                    &e.key.id,
                    Some(&e.user),
                    "api_key.authenticate",
                    "unknown API key or wrong secret",
                )
                .await);
        }
        let now = self.now();
        let why = match e.key.state {
            CredentialState::Pending => Some("API key is not activated yet: submit the emailed code"),
            CredentialState::Revoked => Some("API key was revoked"),
            CredentialState::Active if e.key.expires_at.is_some_and(|t| t <= now) => Some("API key expired"),
            CredentialState::Active if !e.user.enabled => Some("the API key's user is disabled"),
            CredentialState::Active => None,
        };
        if let Some(why) = why {
            let action =
                if e.key.state == CredentialState::Revoked { "api_key.use_revoked" } else { "api_key.authenticate" };
            return Err(self.credential_refused(ctx, &e.key.id, Some(&e.user), action, why).await);
        }
        let last = e.last_used.load(Ordering::Relaxed);
        if now - last >= TOUCH_INTERVAL
            && e.last_used.compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed).is_ok()
            && let Err(err) = self.store.touch_api_key(&e.key.id, now).await
        {
            tracing::warn!(error = %err, "could not record an API key's last use");
        }
        Ok(Principal {
            subject: e.user.id.clone(),
            client_id: "api-key".into(),
            org: e.org_slug.clone(),
            roles: e.key.roles.iter().filter(|r| e.user.roles.contains(r)).map(ToString::to_string).collect(),
            scopes: vec![],
            credential: Credential::ApiKey { id: e.key.id.clone() },
        })
    }

    async fn api_key_entry(&self, key: &str, fresh: bool) -> Result<Option<Arc<ApiKeyEntry>>> {
        let now = self.now();
        if !fresh
            && let Ok(map) = self.auth.api_keys.read()
            && let Some((until, e)) = map.get(key)
            && *until > now
        {
            return Ok(Some(e.clone()));
        }
        let generation = self.auth.generation.load(Ordering::Acquire);
        let found = match self.store.api_key_by_key(key).await? {
            Some(k) => self.store.user(&k.org_id, &k.user_id).await?.map(|user| (k, user)),
            None => None,
        };
        let Some((k, user)) = found else {
            if fresh {
                self.forget_api_key(key);
            }
            return Ok(None);
        };
        let org_slug = self.org_slug(&user.org_id).await?;
        let entry =
            Arc::new(ApiKeyEntry { last_used: AtomicI64::new(k.last_used_at.unwrap_or(0)), key: k, user, org_slug });
        if let Ok(mut map) = self.auth.api_keys.write()
            && self.auth.generation.load(Ordering::Acquire) == generation
        {
            if map.len() > 200_000 {
                map.retain(|_, (until, _)| *until > now);
            }
            map.insert(key.to_owned(), (now + self.settings.cache_ttl, entry.clone()));
        }
        Ok(Some(entry))
    }

    /// The caller's own keys (a signed-in user or one of their keys).
    /// The caller's own API keys, newest first; with `q`, only those whose name contains it
    /// (any case) or whose key starts with it.
    pub async fn my_api_keys(&self, who: &Principal, q: Option<&str>, page: Page) -> Result<Vec<ApiKey>> {
        if matches!(who.credential, Credential::AccessToken) {
            return Err(Error::Forbidden("this endpoint needs a signed-in user or an API key".into()));
        }
        let org = self.organisation_or_404(&who.org).await?;
        match super::admin::search_text(q)? {
            Some(q) => Ok(self.store.search_user_api_keys(&org.id, &who.subject, q, page).await?),
            None => Ok(self.store.api_keys(&org.id, Some(&who.subject), page).await?),
        }
    }

    /// Admins: the organisation's keys, or one user's.
    pub async fn org_api_keys(
        &self,
        who: &Principal,
        org_slug: &str,
        user_id: Option<&str>,
        page: Page,
    ) -> Result<Vec<ApiKey>> {
        let org = self.administered_org(who, org_slug).await?;
        Ok(self.store.api_keys(&org.id, user_id, page).await?)
    }

    /// Revokes a key: its owner, or an admin of its organisation.
    pub async fn revoke_api_key(
        &self,
        ctx: &RequestContext,
        who: &Principal,
        org_slug: Option<&str>,
        id: &str,
    ) -> Result<()> {
        let org = match org_slug {
            Some(slug) => self.administered_org(who, slug).await?,
            None => self.organisation_or_404(&who.org).await?,
        };
        let key = self.store.api_key(&org.id, id).await?.ok_or_else(|| Error::NotFound(format!("API key {id:?}")))?;
        let owner = matches!(who.credential, Credential::Session { .. } | Credential::ApiKey { .. })
            && key.user_id == who.subject;
        if org_slug.is_none() && !owner {
            return Err(Error::NotFound(format!("API key {id:?}")));
        }
        if !owner && let Some(key_user) = self.store.user(&org.id, &key.user_id).await? {
            super::users::ensure_may_manage_user(who, &key_user)?;
        }
        let ev = self.audit(
            ctx,
            &who.subject,
            Some(&org.id),
            "api_key.revoke",
            &key.id,
            serde_json::json!({ "api_key": key.key }),
        );
        self.store.revoke_api_key(&key.id, self.now(), &ev).await?;
        self.forget_api_key(&key.key);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_digits_and_vary() {
        let a = new_code().unwrap();
        assert_eq!(a.expose_secret().len(), CODE_DIGITS);
        assert!(looks_like_code(&a));
        let distinct: std::collections::HashSet<String> =
            (0..50).map(|_| new_code().unwrap().expose_secret().to_owned()).collect();
        assert!(distinct.len() > 45);
        assert!(!looks_like_code(&SecretString::from("12345a")));
        assert!(!looks_like_code(&SecretString::from("12345")));
    }

    #[test]
    fn ipv6_clients_are_counted_per_64() {
        assert_eq!(ip_bucket(Some("2001:db8:1:2:aaaa::1")), ip_bucket(Some("2001:db8:1:2:ffff::9")));
        assert_ne!(ip_bucket(Some("2001:db8:1:2::1")), ip_bucket(Some("2001:db8:1:3::1")));
        assert_eq!(ip_bucket(Some("::ffff:192.0.2.7")), "192.0.2.7");
        assert_eq!(ip_bucket(Some("192.0.2.7")), "192.0.2.7");
        assert_eq!(ip_bucket(None), "unknown");
    }

    #[test]
    fn tokens_have_their_prefix_and_256_bits() {
        let t = new_token(SESSION_TOKEN_PREFIX).unwrap();
        assert!(plausible_token(t.expose_secret(), SESSION_TOKEN_PREFIX));
        assert_eq!(t.expose_secret().len(), SESSION_TOKEN_PREFIX.len() + 43);
        assert!(!plausible_token("pcs_a b", SESSION_TOKEN_PREFIX));
        assert!(!plausible_token("eyJ.x.y", SESSION_TOKEN_PREFIX));
    }
}
