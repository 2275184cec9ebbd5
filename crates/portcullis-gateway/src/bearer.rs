//! Local validation of bearer access tokens (DESIGN §3 and §5): the gateway checks the control
//! plane's RFC 9068 JWTs itself, without a round trip per request.
//!
//! This module owns:
//! - [`KeyCache`]: the token signing keys by `kid`, refreshed in the background
//!   ([`KeyCache::run_refresh`]) and on an unknown `kid` (one fetch at a time, at most one per
//!   [`BearerConfig::min_refetch_interval`]); a failed or empty fetch keeps the last good set
//!   ("stale-if-error"), so neither key rotation nor a control-plane outage produces 401s for
//!   good tokens;
//! - [`RevokedJtis`]: the revoked `jti`s learnt from the change feed, bounded;
//! - [`TokenCache`]: verified tokens keyed by the SHA-256 of the token string (never the token
//!   itself), each valid until its `exp`, bounded;
//! - [`BearerVerifier`]: the checks, in order, and what a good token becomes ([`VerifiedToken`],
//!   an [`Identity`] with [`AuthMethod::Bearer`]);
//! - [`BearerError`]: why a token was refused, as `x-error` text and a `WWW-Authenticate`
//!   challenge (RFC 6750 §3).
//!
//! What it does not do: `aud` is not checked here (every `aud` entry goes into
//! [`Identity::audiences`] and the route policy checks the route's audience), nor roles, scopes
//! or permissions.
//!
//! Only our own claim set is accepted ([`AccessClaims`] refuses unknown members): a token with
//! `nbf` or any other claim we do not issue is refused as [`BearerError::InvalidClaims`]. A
//! `cnf` other than exactly `{"x5t#S256": "<43 base64url characters>"}` is refused the same way:
//! a token bound to something we cannot check is never treated as unbound.
//!
//! Nothing here logs or prints a token; [`VerifiedToken`] holds only claims.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use aws_lc_rs::digest;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use portcullis_core::clock::{Clock, UnixTime};
use portcullis_core::crypto::jws::{self, JwsError, MAX_JWS_LEN};
use portcullis_core::crypto::signing::{Algorithm, VerifyingKey};
use portcullis_core::tokens::{ACCESS_TOKEN_TYP, AccessClaims, Audience, SKEW_SECS};

use crate::config::AuthMethod;
use crate::control::{Changes, ControlPlane, RevokedToken, Unavailable};
use crate::policy::Identity;

/// Default for [`BearerConfig::min_refetch_interval`].
pub const DEFAULT_MIN_REFETCH_INTERVAL: Duration = Duration::from_secs(10);
/// Default period of [`KeyCache::run_refresh`].
pub const DEFAULT_REFRESH_EVERY: Duration = Duration::from_secs(5 * 60);
/// Default for [`BearerConfig::token_cache_capacity`].
pub const DEFAULT_TOKEN_CACHE_CAPACITY: usize = 100_000;
/// Default for [`BearerConfig::revoked_capacity`].
pub const DEFAULT_REVOKED_CAPACITY: usize = 200_000;

/// Number of independently locked parts of a [`TokenCache`].
const TOKEN_CACHE_SHARDS: usize = 16;
/// Shortest period [`KeyCache::run_refresh`] accepts (a zero period would spin).
const MIN_REFRESH_EVERY: Duration = Duration::from_millis(10);

/// Why a bearer token was refused. `Display` is the `x-error` text: precise, safe to show to the
/// presenter, never containing the token or a claim value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum BearerError {
    /// Not three canonical base64url segments, or a header that is not a JSON object of the
    /// expected shape.
    #[error("bearer token is malformed")]
    Malformed,
    /// Longer than [`MAX_JWS_LEN`]; refused before any other work.
    #[error("bearer token is too large")]
    TooLarge,
    /// The header names `crit`, `jku`, `jwk`, `x5u`, `x5c` or `b64`.
    #[error("bearer token header uses a member that is not accepted (crit, jku, jwk, x5u, x5c or b64)")]
    ForbiddenHeader,
    /// `typ` is not `at+jwt` (an ID token, a logout token, a plain JWT).
    #[error("bearer token is not an access token (typ must be at+jwt)")]
    WrongType,
    /// No `kid`, or a `kid` that is not among the control plane's signing keys, even after a
    /// refetch (or while refetches are rate-limited).
    #[error("bearer token is signed by an unknown key")]
    UnknownKey,
    /// The header's `alg`, or the algorithm of the key its `kid` names, is not accepted here
    /// (`none` and HMAC never are).
    #[error("bearer token signing algorithm is not accepted")]
    AlgorithmNotAllowed,
    /// The signature does not verify with the key its `kid` names (including a header `alg`
    /// that differs from that key's algorithm).
    #[error("bearer token signature is invalid")]
    BadSignature,
    /// The claims are not exactly our access-token claims: a missing or mistyped claim, an
    /// unknown one (`nbf` included), or a `cnf` we cannot check.
    #[error("bearer token claims are malformed")]
    InvalidClaims,
    /// `iss` is not the control plane's issuer.
    #[error("bearer token was issued by another issuer")]
    WrongIssuer,
    /// `exp` has passed (beyond the allowed clock skew).
    #[error("bearer token has expired")]
    Expired,
    /// `iat` is in the future (beyond the allowed clock skew).
    #[error("bearer token is not valid yet")]
    NotYetValid,
    /// Its `jti` is on the revocation list.
    #[error("bearer token has been revoked")]
    Revoked,
    /// A certificate-bound token (`cnf.x5t#S256`) arrived without a client certificate.
    #[error("bearer token is bound to a client certificate; present that certificate over mutual TLS")]
    CertificateRequired,
    /// A certificate-bound token arrived with a different client certificate.
    #[error("bearer token is bound to a different client certificate")]
    CertificateMismatch,
    /// No signing keys could ever be fetched from the control plane: the token cannot be checked
    /// (answer 503, not 401).
    #[error("bearer tokens cannot be checked right now")]
    Unavailable,
}

impl From<JwsError> for BearerError {
    fn from(e: JwsError) -> Self {
        match e {
            JwsError::Malformed => Self::Malformed,
            JwsError::TooLarge => Self::TooLarge,
            JwsError::ForbiddenHeader => Self::ForbiddenHeader,
            JwsError::WrongType => Self::WrongType,
            JwsError::UnknownKey => Self::UnknownKey,
            JwsError::BadSignature => Self::BadSignature,
        }
    }
}

impl BearerError {
    /// The control plane could not be reached for keys: the caller answers 503.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable)
    }

    /// The HTTP status this refusal maps to: 503 for [`BearerError::Unavailable`], else 401.
    pub fn status(&self) -> u16 {
        if self.is_unavailable() { 503 } else { 401 }
    }

    /// The `WWW-Authenticate` value (RFC 6750 §3): `Bearer error="invalid_token",
    /// error_description="<Display>"`. The description keeps only the characters RFC 6750 allows
    /// there (printable ASCII without `"` and `\`). [`BearerError::Unavailable`] is not a problem
    /// with the token, so it gets the bare challenge `Bearer`.
    pub fn www_authenticate(&self) -> String {
        if self.is_unavailable() {
            return "Bearer".to_owned();
        }
        let description: String =
            self.to_string().chars().filter(|c| matches!(c, ' ' | '!' | '#'..='[' | ']'..='~')).collect();
        format!("Bearer error=\"invalid_token\", error_description=\"{description}\"")
    }
}

type KeyMap = HashMap<String, Arc<VerifyingKey>>;

/// The single-flight state of [`KeyCache`] fetches, behind an async mutex.
#[derive(Debug, Default)]
struct FetchState {
    /// When the last unknown-`kid` refetch finished (clock seconds).
    last_unknown_kid_fetch: Option<UnixTime>,
}

/// The control plane's token signing keys by `kid`.
///
/// Reads take a `std::sync::RwLock` read guard for a hash lookup (writers only swap an `Arc`,
/// once per fetch). Fetches, whether background ([`KeyCache::refresh`]) or for an unknown `kid`
/// ([`KeyCache::key`]), run one at a time behind an async mutex; a generation counter, bumped by
/// every finished fetch (good or not), lets requests that queued behind a fetch use its result
/// instead of fetching again. A fetch that fails or answers no keys keeps the last good set.
pub struct KeyCache {
    control: Arc<dyn ControlPlane>,
    clock: Arc<dyn Clock>,
    keys: RwLock<Arc<KeyMap>>,
    fetch: tokio::sync::Mutex<FetchState>,
    generation: AtomicU64,
    /// [`BearerConfig::min_refetch_interval`] in whole clock seconds (rounded up).
    min_refetch_secs: i64,
}

impl fmt::Debug for KeyCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let keys = self.snapshot();
        let mut kids: Vec<&str> = keys.keys().map(String::as_str).collect();
        kids.sort_unstable();
        f.debug_struct("KeyCache")
            .field("kids", &kids)
            .field("generation", &self.generation.load(Ordering::Relaxed))
            .field("min_refetch_secs", &self.min_refetch_secs)
            .finish_non_exhaustive()
    }
}

impl KeyCache {
    /// An empty cache: call [`KeyCache::refresh`] (or spawn [`KeyCache::run_refresh`]) to load
    /// it. Until keys arrive, an unknown `kid` still triggers a (rate-limited) fetch.
    /// `min_refetch_interval` is measured on `clock` in whole seconds, rounded up.
    pub fn new(control: Arc<dyn ControlPlane>, clock: Arc<dyn Clock>, min_refetch_interval: Duration) -> Self {
        let secs = min_refetch_interval.as_secs().saturating_add(u64::from(min_refetch_interval.subsec_nanos() > 0));
        Self {
            control,
            clock,
            keys: RwLock::new(Arc::new(KeyMap::new())),
            fetch: tokio::sync::Mutex::new(FetchState::default()),
            generation: AtomicU64::new(0),
            min_refetch_secs: i64::try_from(secs).unwrap_or(i64::MAX),
        }
    }

    /// The current key set (a cheap `Arc` clone).
    pub fn snapshot(&self) -> Arc<HashMap<String, Arc<VerifyingKey>>> {
        Arc::clone(&self.keys.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// The cached key named `kid`, without fetching.
    pub fn get(&self, kid: &str) -> Option<Arc<VerifyingKey>> {
        self.keys.read().unwrap_or_else(PoisonError::into_inner).get(kid).cloned()
    }

    /// Whether `kid` is in the cached set, without fetching.
    pub fn contains(&self, kid: &str) -> bool {
        self.keys.read().unwrap_or_else(PoisonError::into_inner).contains_key(kid)
    }

    /// Number of cached keys.
    pub fn len(&self) -> usize {
        self.keys.read().unwrap_or_else(PoisonError::into_inner).len()
    }

    /// No key was ever fetched successfully.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Fetches the key set now (waiting for a fetch already under way, then fetching anyway: the
    /// caller was told the keys changed). Replaces the whole set on success, so keys dropped from
    /// the JWKS stop verifying. On failure or an empty answer, logs a warning and keeps the last
    /// good set. Returns the number of keys now held.
    pub async fn refresh(&self) -> Result<usize, Unavailable> {
        let _flight = self.fetch.lock().await;
        self.fetch_locked().await
    }

    /// The key named `kid`. When it is not cached, refetches the set once: requests that arrive
    /// while a fetch is under way wait for it and use its result; and at most one such
    /// unknown-`kid` refetch happens per `min_refetch_interval` (after that, a still-unknown
    /// `kid` is refused without a fetch). [`BearerError::Unavailable`] when no keys have ever been
    /// fetched, [`BearerError::UnknownKey`] otherwise.
    pub async fn key(&self, kid: &str) -> Result<Arc<VerifyingKey>, BearerError> {
        // The generation is read before the set: a fetch that completes after this read shows
        // up as a changed generation below, so it is never missed nor repeated.
        let seen = self.generation.load(Ordering::Acquire);
        if let Some(key) = self.get(kid) {
            return Ok(key);
        }
        {
            let mut state = self.fetch.lock().await;
            if self.generation.load(Ordering::Acquire) == seen {
                let started = self.clock.now();
                let allowed = match state.last_unknown_kid_fetch {
                    None => true,
                    // A clock that went backwards does not block refetches.
                    Some(last) => started < last || started.saturating_sub(last) >= self.min_refetch_secs,
                };
                if allowed {
                    // Failures are logged by fetch_locked; the lookup below tells the outcome.
                    let _ = self.fetch_locked().await;
                    // Recorded after the fetch finished: a leader cancelled mid-fetch (its client
                    // went away) does not use up the window for those queued behind it.
                    state.last_unknown_kid_fetch = Some(started);
                } else {
                    tracing::debug!(kid, "unknown token kid; key refetch is rate-limited");
                }
            }
        }
        match self.get(kid) {
            Some(key) => Ok(key),
            None if self.is_empty() => Err(BearerError::Unavailable),
            None => Err(BearerError::UnknownKey),
        }
    }

    /// Refreshes the keys every `every` (at least 10 ms), starting immediately, until `shutdown`
    /// completes; a refresh under way when it does is abandoned. Meant to be spawned by the
    /// server with [`DEFAULT_REFRESH_EVERY`]; failures are logged by [`KeyCache::refresh`] and
    /// retried at the next tick.
    pub async fn run_refresh(self: Arc<Self>, every: Duration, shutdown: impl Future<Output = ()>) {
        let mut ticks = tokio::time::interval(every.max(MIN_REFRESH_EVERY));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            tokio::select! {
                biased;
                () = &mut shutdown => return,
                _ = ticks.tick() => {}
            }
            tokio::select! {
                biased;
                () = &mut shutdown => return,
                _ = self.refresh() => {}
            }
        }
    }

    /// One fetch; the caller holds `self.fetch`.
    async fn fetch_locked(&self) -> Result<usize, Unavailable> {
        let answer = self.control.signing_keys().await;
        let result = match answer {
            Ok(keys) if keys.is_empty() => {
                tracing::warn!(
                    kept = self.len(),
                    "control plane returned no token signing keys; keeping the last good set"
                );
                Err(Unavailable("the control plane returned no signing keys".to_owned()))
            }
            Ok(keys) => {
                let map: KeyMap = keys.into_iter().map(|k| (k.kid().to_owned(), Arc::new(k))).collect();
                let n = map.len();
                *self.keys.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(map);
                tracing::debug!(keys = n, "token signing keys refreshed");
                Ok(n)
            }
            Err(e) => {
                tracing::warn!(error = %e, kept = self.len(), "could not fetch token signing keys; keeping the last good set");
                Err(e)
            }
        };
        self.generation.fetch_add(1, Ordering::AcqRel);
        result
    }
}

/// The revoked access-token `jti`s, each with the `exp` of its token (after which the token is
/// refused for expiry anyway and the entry can go).
///
/// Bounded: at most `capacity` entries ([`DEFAULT_REVOKED_CAPACITY`] by default, about 20 MB at
/// worst). Revocations are rare, so the bound is only reached under abuse; then the entries
/// closest to expiry (expired ones first) are dropped, down to 90 % of the bound, with an error
/// in the log.
pub struct RevokedJtis {
    map: RwLock<HashMap<String, UnixTime>>,
    capacity: usize,
}

impl fmt::Debug for RevokedJtis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RevokedJtis").field("len", &self.len()).field("capacity", &self.capacity).finish()
    }
}

impl Default for RevokedJtis {
    fn default() -> Self {
        Self::new(DEFAULT_REVOKED_CAPACITY)
    }
}

impl RevokedJtis {
    /// An empty set holding at most `capacity` (at least 1) entries.
    pub fn new(capacity: usize) -> Self {
        Self { map: RwLock::new(HashMap::new()), capacity: capacity.max(1) }
    }

    /// Adds revocations (a change-feed page). A `jti` already present keeps the later expiry.
    pub fn extend(&self, tokens: &[RevokedToken]) {
        let mut map = self.map.write().unwrap_or_else(PoisonError::into_inner);
        for t in tokens {
            let exp = map.entry(t.jti.clone()).or_insert(t.expires_at);
            *exp = (*exp).max(t.expires_at);
        }
        shrink_to_capacity(&mut map, self.capacity);
    }

    /// Replaces the whole set (a reset of the change feed).
    pub fn replace(&self, tokens: &[RevokedToken]) {
        let mut fresh = HashMap::with_capacity(tokens.len().min(self.capacity));
        for t in tokens {
            let exp = fresh.entry(t.jti.clone()).or_insert(t.expires_at);
            *exp = (*exp).max(t.expires_at);
        }
        shrink_to_capacity(&mut fresh, self.capacity);
        *self.map.write().unwrap_or_else(PoisonError::into_inner) = fresh;
    }

    /// Whether `jti` is revoked.
    pub fn contains(&self, jti: &str) -> bool {
        self.map.read().unwrap_or_else(PoisonError::into_inner).contains_key(jti)
    }

    /// Drops every entry whose `expires_at` is before `before`; returns how many. Pass the
    /// earliest `exp` a token can still have and be accepted (now minus the allowed skew), as
    /// [`BearerVerifier::apply_changes`] does.
    pub fn purge(&self, before: UnixTime) -> usize {
        let mut map = self.map.write().unwrap_or_else(PoisonError::into_inner);
        let n = map.len();
        map.retain(|_, exp| *exp >= before);
        n - map.len()
    }

    /// Number of revoked `jti`s held.
    pub fn len(&self) -> usize {
        self.map.read().unwrap_or_else(PoisonError::into_inner).len()
    }

    /// No revoked `jti` is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Over `capacity`: drops the entries closest to expiry down to 90 % of it.
fn shrink_to_capacity(map: &mut HashMap<String, UnixTime>, capacity: usize) {
    if map.len() <= capacity {
        return;
    }
    let target = capacity - capacity / 10;
    let excess = map.len() - target;
    let mut by_expiry: Vec<(UnixTime, String)> = map.iter().map(|(j, e)| (*e, j.clone())).collect();
    by_expiry.sort_unstable();
    for (_, jti) in by_expiry.into_iter().take(excess) {
        map.remove(&jti);
    }
    tracing::error!(
        capacity,
        dropped = excess,
        "revoked-token list is full; dropped the revocations closest to expiry"
    );
}

/// A token that passed every check that does not depend on the request: what the route policy
/// and the forwarded identity headers are built from. Holds claims only, never the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedToken {
    /// `sub`, `client_id`, `org`, `roles`, `scope` (split on spaces), every `aud` entry;
    /// `auth_method` is [`AuthMethod::Bearer`].
    pub identity: Identity,
    pub jti: String,
    /// Unix seconds.
    pub exp: UnixTime,
    /// Unix seconds.
    pub iat: UnixTime,
    /// The key that signed it (a cached token is dropped once its key leaves the key set).
    pub kid: String,
    /// `cnf.x5t#S256` (RFC 8705): the base64url SHA-256 of the client certificate the token is
    /// bound to, 43 characters.
    pub cnf_x5t: Option<String>,
}

type Shard = HashMap<[u8; 32], Arc<VerifiedToken>>;

/// Verified tokens by the SHA-256 of the token string, each until its `exp`.
///
/// Sixteen shards, each behind its own mutex (a hash lookup under it). Bounded: each shard holds
/// at most `capacity / 16` entries (rounded up); inserting into a full shard first drops its
/// expired entries and, if it is still full, empties it (those tokens are verified again on
/// their next use). Failed verifications are never cached.
pub struct TokenCache {
    shards: Box<[Mutex<Shard>]>,
    shard_capacity: usize,
}

impl fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenCache")
            .field("len", &self.len())
            .field("capacity", &self.shard_capacity.saturating_mul(self.shards.len()))
            .finish()
    }
}

impl Default for TokenCache {
    fn default() -> Self {
        Self::new(DEFAULT_TOKEN_CACHE_CAPACITY)
    }
}

impl TokenCache {
    /// A cache of about `capacity` entries (at least one per shard).
    pub fn new(capacity: usize) -> Self {
        Self::with_shards(capacity, TOKEN_CACHE_SHARDS)
    }

    fn with_shards(capacity: usize, shards: usize) -> Self {
        let shards = shards.max(1);
        Self {
            shards: (0..shards).map(|_| Mutex::new(Shard::new())).collect(),
            shard_capacity: capacity.div_ceil(shards).max(1),
        }
    }

    /// The cache key of `token`: its SHA-256. `None` never happens in practice (a digest of
    /// another length); callers then skip the cache rather than share a key.
    pub fn key(token: &str) -> Option<[u8; 32]> {
        digest::digest(&digest::SHA256, token.as_bytes()).as_ref().try_into().ok()
    }

    fn shard(&self, key: &[u8; 32]) -> Option<&Mutex<Shard>> {
        let [a, b, ..] = *key;
        let i = usize::from(u16::from_le_bytes([a, b])) % self.shards.len().max(1);
        self.shards.get(i)
    }

    /// The cached token, expired or not (the caller checks `exp`).
    pub fn get(&self, key: &[u8; 32]) -> Option<Arc<VerifiedToken>> {
        self.shard(key)?.lock().unwrap_or_else(PoisonError::into_inner).get(key).cloned()
    }

    /// Caches `token` under `key`, making room as described on [`TokenCache`].
    pub fn insert(&self, key: [u8; 32], token: Arc<VerifiedToken>, now: UnixTime) {
        let Some(shard) = self.shard(&key) else { return };
        let mut shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
        if shard.len() >= self.shard_capacity && !shard.contains_key(&key) {
            shard.retain(|_, t| t.exp > now);
            if shard.len() >= self.shard_capacity {
                shard.clear();
            }
        }
        shard.insert(key, token);
    }

    /// Forgets one token.
    pub fn remove(&self, key: &[u8; 32]) {
        if let Some(shard) = self.shard(key) {
            shard.lock().unwrap_or_else(PoisonError::into_inner).remove(key);
        }
    }

    /// Forgets every token.
    pub fn clear(&self) {
        for shard in &*self.shards {
            shard.lock().unwrap_or_else(PoisonError::into_inner).clear();
        }
    }

    /// Number of cached tokens (expired ones not yet dropped included).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).len()).sum()
    }

    /// No token is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Settings of a [`BearerVerifier`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BearerConfig {
    /// Accepted signing algorithms, checked against the header's `alg` and the key's own
    /// algorithm. Default: ES256, RS256, PS256, EdDSA.
    pub algorithms: Vec<Algorithm>,
    /// Allowed clock skew for `exp` and `iat`, seconds (negative counts as 0). Default
    /// [`SKEW_SECS`].
    pub skew_secs: i64,
    /// At most one unknown-`kid` key refetch per this interval. Default
    /// [`DEFAULT_MIN_REFETCH_INTERVAL`].
    pub min_refetch_interval: Duration,
    /// Bound of the [`TokenCache`]. Default [`DEFAULT_TOKEN_CACHE_CAPACITY`].
    pub token_cache_capacity: usize,
    /// Bound of the [`RevokedJtis`]. Default [`DEFAULT_REVOKED_CAPACITY`].
    pub revoked_capacity: usize,
}

impl Default for BearerConfig {
    fn default() -> Self {
        Self {
            algorithms: Algorithm::ALL.to_vec(),
            skew_secs: SKEW_SECS,
            min_refetch_interval: DEFAULT_MIN_REFETCH_INTERVAL,
            token_cache_capacity: DEFAULT_TOKEN_CACHE_CAPACITY,
            revoked_capacity: DEFAULT_REVOKED_CAPACITY,
        }
    }
}

/// Verifies bearer access tokens locally.
///
/// [`BearerVerifier::verify`] checks, in this order, and stops at the first failure:
///
/// 1. size ([`MAX_JWS_LEN`]) before anything else; then the SHA-256 of the token is looked up
///    in the [`TokenCache`]: a hit whose key is still in the key set skips to step 12;
/// 2. compact-JWS strictness (core `jws::parse`: three canonical base64url segments, no
///    duplicate or forbidden header members);
/// 3. `typ` is `at+jwt` (or `application/at+jwt`);
/// 4. the header's `alg` is an accepted algorithm (so `none` and `HS256` never reach a key);
/// 5. `kid` names a known key (refetching the key set as [`KeyCache::key`] describes);
/// 6. that key's algorithm is accepted;
/// 7. core `jws::verify` with that key only: the header's `alg` equals the key's algorithm, and
///    the signature verifies under the key's algorithm, never the header's;
/// 8. the claims parse as exactly [`AccessClaims`] and `cnf`, if any, is a well-formed
///    `x5t#S256`;
/// 9. `iss` is the control plane's issuer;
/// 10. `exp` is after now minus the skew; 11. `iat` is not after now plus the skew;
///
/// and the token is cached. Then on every request, cache hit or not:
///
/// 12. `exp` again (a cached token expires in the cache);
/// 13. its `jti` is not revoked (revocation wins over the cache);
/// 14. certificate binding (RFC 8705): a token with `cnf.x5t#S256` is accepted only with a
///     client certificate whose SHA-256, base64url-encoded, equals it; a token without `cnf` is
///     accepted with or without a certificate.
pub struct BearerVerifier {
    control: Arc<dyn ControlPlane>,
    clock: Arc<dyn Clock>,
    keys: Arc<KeyCache>,
    tokens: TokenCache,
    revoked: RevokedJtis,
    algorithms: Vec<Algorithm>,
    skew: i64,
}

impl fmt::Debug for BearerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BearerVerifier")
            .field("issuer", &self.control.issuer())
            .field("keys", &self.keys)
            .field("tokens", &self.tokens)
            .field("revoked", &self.revoked)
            .field("algorithms", &self.algorithms)
            .field("skew", &self.skew)
            .finish_non_exhaustive()
    }
}

impl BearerVerifier {
    /// A verifier with an empty key cache: load it with `keys().refresh()` and spawn
    /// `keys().clone().run_refresh(…)`; feed it the change feed with
    /// [`BearerVerifier::apply_changes`].
    pub fn new(control: Arc<dyn ControlPlane>, clock: Arc<dyn Clock>, config: BearerConfig) -> Self {
        let keys = Arc::new(KeyCache::new(Arc::clone(&control), Arc::clone(&clock), config.min_refetch_interval));
        Self {
            control,
            clock,
            keys,
            tokens: TokenCache::new(config.token_cache_capacity),
            revoked: RevokedJtis::new(config.revoked_capacity),
            algorithms: config.algorithms,
            skew: config.skew_secs.max(0),
        }
    }

    /// The signing-key cache (to load it at start and spawn its background refresh).
    pub fn keys(&self) -> &Arc<KeyCache> {
        &self.keys
    }

    /// The revoked `jti`s.
    pub fn revoked(&self) -> &RevokedJtis {
        &self.revoked
    }

    /// The verified-token cache.
    pub fn token_cache(&self) -> &TokenCache {
        &self.tokens
    }

    /// Verifies `token` (the bearer credential, without `Bearer `) presented with the client
    /// certificate whose DER has SHA-256 `peer_cert_sha256` (if the connection has one), as
    /// described on [`BearerVerifier`].
    pub async fn verify(
        &self,
        token: &str,
        peer_cert_sha256: Option<&[u8; 32]>,
    ) -> Result<Arc<VerifiedToken>, BearerError> {
        if token.len() > MAX_JWS_LEN {
            return Err(BearerError::TooLarge);
        }
        let now = self.clock.now();
        let cache_key = TokenCache::key(token);
        let cached = cache_key.as_ref().and_then(|k| self.tokens.get(k));
        let verified = match cached {
            Some(v) if self.keys.contains(&v.kid) => v,
            stale => {
                if let (Some(_), Some(k)) = (stale, cache_key.as_ref()) {
                    // Its key left the key set: verify again (and most likely refuse).
                    self.tokens.remove(k);
                }
                let v = Arc::new(self.verify_uncached(token, now).await?);
                if let Some(k) = cache_key {
                    self.tokens.insert(k, Arc::clone(&v), now);
                }
                v
            }
        };
        self.check_request(&verified, now, peer_cert_sha256)?;
        Ok(verified)
    }

    /// Applies one page of the change feed: revoked `jti`s are added (replaced on `reset`) and
    /// expired ones purged; on `keys` or `reset` the signing keys are fetched again (a failure
    /// keeps the old ones and is logged); on `reset` the token cache is emptied.
    pub async fn apply_changes(&self, changes: &Changes) {
        if changes.reset {
            self.revoked.replace(&changes.revoked_tokens);
            self.tokens.clear();
        } else if !changes.revoked_tokens.is_empty() {
            self.revoked.extend(&changes.revoked_tokens);
        }
        self.revoked.purge(self.clock.now().saturating_sub(self.skew));
        if changes.keys || changes.reset {
            // Logged inside; the last good keys stay.
            let _ = self.keys.refresh().await;
        }
    }

    /// Steps 2–11 of [`BearerVerifier`].
    async fn verify_uncached(&self, token: &str, now: UnixTime) -> Result<VerifiedToken, BearerError> {
        let parsed = jws::parse(token)?;
        let header = parsed.header;
        if !header.typ.as_deref().is_some_and(is_access_token_typ) {
            return Err(BearerError::WrongType);
        }
        if !self.algorithms.iter().any(|a| a.as_str() == header.alg) {
            return Err(BearerError::AlgorithmNotAllowed);
        }
        let kid = header.kid.as_deref().ok_or(BearerError::UnknownKey)?;
        let key = self.keys.key(kid).await?;
        if !self.algorithms.contains(&key.alg()) {
            return Err(BearerError::AlgorithmNotAllowed);
        }
        let (_, payload) = jws::verify(token, ACCESS_TOKEN_TYP, |k| (k == key.kid()).then_some(&*key))?;
        let claims: AccessClaims = serde_json::from_slice(&payload).map_err(|_| BearerError::InvalidClaims)?;
        let cnf_x5t = confirmation(claims.cnf.as_ref())?;
        if claims.iss != self.control.issuer() {
            return Err(BearerError::WrongIssuer);
        }
        if claims.exp <= now.saturating_sub(self.skew) {
            return Err(BearerError::Expired);
        }
        if claims.iat > now.saturating_add(self.skew) {
            return Err(BearerError::NotYetValid);
        }
        let scopes = claims.scopes().map(str::to_owned).collect();
        let audiences = match claims.aud {
            Audience::One(a) => vec![a],
            Audience::Many(v) => v,
        };
        Ok(VerifiedToken {
            identity: Identity {
                subject: claims.sub,
                client_id: claims.client_id,
                org: claims.org,
                roles: claims.roles,
                scopes,
                audiences,
                auth_method: AuthMethod::Bearer,
            },
            jti: claims.jti,
            exp: claims.exp,
            iat: claims.iat,
            kid: key.kid().to_owned(),
            cnf_x5t,
        })
    }

    /// Steps 12–14 of [`BearerVerifier`]: what must hold on every request.
    fn check_request(
        &self,
        token: &VerifiedToken,
        now: UnixTime,
        peer_cert_sha256: Option<&[u8; 32]>,
    ) -> Result<(), BearerError> {
        if token.exp <= now.saturating_sub(self.skew) {
            return Err(BearerError::Expired);
        }
        if self.revoked.contains(&token.jti) {
            return Err(BearerError::Revoked);
        }
        if let Some(bound) = &token.cnf_x5t {
            let peer = peer_cert_sha256.ok_or(BearerError::CertificateRequired)?;
            let mut buf = [0u8; 43];
            let n = B64URL.encode_slice(peer, &mut buf).map_err(|_| BearerError::CertificateMismatch)?;
            if buf.get(..n) != Some(bound.as_bytes()) {
                return Err(BearerError::CertificateMismatch);
            }
        }
        Ok(())
    }
}

/// `typ` as core `jws::verify` accepts it: `at+jwt` or `application/at+jwt`, any case.
fn is_access_token_typ(typ: &str) -> bool {
    const PREFIX: &str = "application/";
    let bare = match typ.get(..PREFIX.len()) {
        Some(p) if p.eq_ignore_ascii_case(PREFIX) => typ.get(PREFIX.len()..).unwrap_or_default(),
        _ => typ,
    };
    bare.eq_ignore_ascii_case(ACCESS_TOKEN_TYP)
}

/// The `x5t#S256` of a `cnf` claim: absent, or exactly one member `x5t#S256` whose value is the
/// canonical unpadded base64url of 32 bytes. Anything else is refused.
fn confirmation(cnf: Option<&serde_json::Value>) -> Result<Option<String>, BearerError> {
    let Some(cnf) = cnf else { return Ok(None) };
    let members = cnf.as_object().ok_or(BearerError::InvalidClaims)?;
    if members.len() != 1 {
        return Err(BearerError::InvalidClaims);
    }
    let x5t = members.get("x5t#S256").and_then(serde_json::Value::as_str).ok_or(BearerError::InvalidClaims)?;
    match B64URL.decode(x5t) {
        Ok(bytes) if bytes.len() == 32 => Ok(Some(x5t.to_owned())),
        _ => Err(BearerError::InvalidClaims),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

    use std::net::IpAddr;
    use std::sync::atomic::AtomicUsize;

    use async_trait::async_trait;
    use portcullis_core::clock::ManualClock;
    use portcullis_core::crypto::signing::SigningKey;
    use portcullis_core::tokens::new_jti;

    use super::*;
    use crate::control::{CertificatePurpose, IssuedKeyPair, TrustBundle, Verdict};
    use crate::policy::PermissionGrants;

    const ISS: &str = "https://id.example.test";
    const T0: UnixTime = 1_800_000_000;

    /// A control plane whose key set tests set, count fetches of, or make fail.
    struct Fake {
        keys: Mutex<Option<Vec<VerifyingKey>>>,
        calls: AtomicUsize,
        delay: Duration,
    }

    impl Fake {
        fn new(keys: &[&SigningKey], delay: Duration) -> Arc<Self> {
            Arc::new(Self { keys: Mutex::new(Some(vks(keys))), calls: AtomicUsize::new(0), delay })
        }
        fn set(&self, keys: &[&SigningKey]) {
            *self.keys.lock().unwrap() = Some(vks(keys));
        }
        fn fail(&self) {
            *self.keys.lock().unwrap() = None;
        }
        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }
    }

    fn vks(keys: &[&SigningKey]) -> Vec<VerifyingKey> {
        keys.iter().map(|k| k.verifying_key().clone()).collect()
    }

    fn na() -> Unavailable {
        Unavailable("not used here".into())
    }

    #[async_trait]
    impl ControlPlane for Fake {
        fn issuer(&self) -> &str {
            ISS
        }
        async fn signing_keys(&self) -> Result<Vec<VerifyingKey>, Unavailable> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if !self.delay.is_zero() {
                tokio::time::sleep(self.delay).await;
            }
            self.keys.lock().unwrap().clone().ok_or_else(|| Unavailable("down".into()))
        }
        async fn trust(&self) -> Result<TrustBundle, Unavailable> {
            Err(na())
        }
        async fn grants(&self) -> Result<PermissionGrants, Unavailable> {
            Err(na())
        }
        async fn changes(&self, _: Option<&str>, _: Duration) -> Result<Changes, Unavailable> {
            Err(na())
        }
        async fn api_key(&self, _: &str, _: &str, _: Option<IpAddr>) -> Result<Verdict, Unavailable> {
            Err(na())
        }
        async fn session(&self, _: &str, _: Option<IpAddr>) -> Result<Verdict, Unavailable> {
            Err(na())
        }
        async fn certificate(&self, _: &[u8]) -> Result<Verdict, Unavailable> {
            Err(na())
        }
        async fn issue(&self, _: CertificatePurpose, _: &[String]) -> Result<IssuedKeyPair, Unavailable> {
            Err(na())
        }
        async fn browser_session(
            &self,
            _: &str,
            _: &str,
            _: &str,
            _: &str,
            _: Option<IpAddr>,
        ) -> Result<crate::control::BrowserVerdict, Unavailable> {
            Err(na())
        }
    }

    struct H {
        fake: Arc<Fake>,
        clock: Arc<ManualClock>,
        v: Arc<BearerVerifier>,
    }

    async fn harness_with(keys: &[&SigningKey], delay: Duration, config: BearerConfig) -> H {
        let fake = Fake::new(keys, delay);
        let clock = Arc::new(ManualClock::new(T0));
        let v = Arc::new(BearerVerifier::new(fake.clone(), clock.clone(), config));
        if !keys.is_empty() {
            assert_eq!(v.keys().refresh().await.unwrap(), keys.len());
            assert_eq!(fake.calls(), 1);
        }
        H { fake, clock, v }
    }

    async fn harness(keys: &[&SigningKey]) -> H {
        harness_with(keys, Duration::ZERO, BearerConfig::default()).await
    }

    fn key(alg: Algorithm) -> SigningKey {
        SigningKey::generate(alg).unwrap().0
    }

    fn claims(now: UnixTime) -> AccessClaims {
        AccessClaims {
            iss: ISS.into(),
            sub: "acme$billing".into(),
            aud: Audience::Many(vec!["https://payments.acme.test".into(), "https://ledger.acme.test".into()]),
            exp: now + 300,
            iat: now,
            jti: new_jti(),
            client_id: "acme$billing".into(),
            scope: "payments/read  payments/write".into(),
            roles: vec!["payments:reader".into()],
            org: "acme".into(),
            cnf: None,
        }
    }

    fn sign_json(k: &SigningKey, typ: &str, json: &[u8]) -> String {
        jws::sign(k, typ, json).unwrap()
    }

    fn token(k: &SigningKey, c: &AccessClaims) -> String {
        sign_json(k, ACCESS_TOKEN_TYP, &serde_json::to_vec(c).unwrap())
    }

    /// A token with a hand-written header, signed by `k` over exactly that header.
    fn with_header(k: &SigningKey, header: &str, payload: &[u8]) -> String {
        let input = format!("{}.{}", B64URL.encode(header), B64URL.encode(payload));
        let sig = k.sign(input.as_bytes()).unwrap();
        format!("{input}.{}", B64URL.encode(sig))
    }

    fn thumb(der: &[u8]) -> [u8; 32] {
        TokenCache::key(std::str::from_utf8(der).unwrap()).unwrap()
    }

    fn revoked(jti: &str, expires_at: UnixTime) -> RevokedToken {
        RevokedToken { jti: jti.into(), expires_at }
    }

    #[tokio::test]
    async fn valid_es256_token_becomes_a_bearer_identity() {
        let k = key(Algorithm::ES256);
        let h = harness(&[&k]).await;
        let c = claims(T0);
        let v = h.v.verify(&token(&k, &c), None).await.unwrap();
        assert_eq!(v.identity.subject, "acme$billing");
        assert_eq!(v.identity.client_id, "acme$billing");
        assert_eq!(v.identity.org, "acme");
        assert_eq!(v.identity.roles, ["payments:reader"]);
        assert_eq!(v.identity.scopes, ["payments/read", "payments/write"]);
        assert_eq!(v.identity.audiences, ["https://payments.acme.test", "https://ledger.acme.test"]);
        assert_eq!(v.identity.auth_method, AuthMethod::Bearer);
        assert_eq!((v.jti.as_str(), v.exp, v.iat, v.kid.as_str()), (c.jti.as_str(), c.exp, c.iat, k.kid()));
        assert_eq!(v.cnf_x5t, None);
        // A single audience is one entry; a client certificate does not hurt an unbound token.
        let one = AccessClaims { aud: Audience::One("https://payments.acme.test".into()), ..claims(T0) };
        let v = h.v.verify(&token(&k, &one), Some(&thumb(b"any cert"))).await.unwrap();
        assert_eq!(v.identity.audiences, ["https://payments.acme.test"]);
    }

    #[tokio::test]
    async fn valid_rs256_ps256_and_eddsa_tokens() {
        let (rs, ps, ed) = (key(Algorithm::RS256), key(Algorithm::PS256), key(Algorithm::EdDSA));
        let h = harness(&[&rs, &ps, &ed]).await;
        for k in [&rs, &ps, &ed] {
            let v = h.v.verify(&token(k, &claims(T0)), None).await.unwrap();
            assert_eq!(v.kid, k.kid());
        }
    }

    #[tokio::test]
    async fn structural_refusals() {
        let k = key(Algorithm::ES256);
        let h = harness(&[&k]).await;
        let good = token(&k, &claims(T0));
        let parts: Vec<&str> = good.split('.').collect();

        assert_eq!(h.v.verify(&"a".repeat(MAX_JWS_LEN + 1), None).await.unwrap_err(), BearerError::TooLarge);
        for bad in
            ["", "a.b", "a.b.c", &format!("{good}.x"), &format!("{good}="), &format!("{}..{}", parts[0], parts[2])]
        {
            assert_eq!(h.v.verify(bad, None).await.unwrap_err(), BearerError::Malformed, "{bad}");
        }
        let payload = serde_json::to_vec(&claims(T0)).unwrap();
        for member in [r#""jku":"https://evil.test/jwks""#, r#""jwk":{}"#, r#""x5c":[]"#, r#""crit":["exp"]"#] {
            let header = format!(r#"{{"alg":"ES256","kid":"{}","typ":"at+jwt",{member}}}"#, k.kid());
            assert_eq!(
                h.v.verify(&with_header(&k, &header, &payload), None).await.unwrap_err(),
                BearerError::ForbiddenHeader,
                "{member}"
            );
        }
        // An ID token or a plain JWT from the same key, or no typ at all.
        assert_eq!(h.v.verify(&sign_json(&k, "JWT", &payload), None).await.unwrap_err(), BearerError::WrongType);
        let untyped = format!(r#"{{"alg":"ES256","kid":"{}"}}"#, k.kid());
        assert_eq!(h.v.verify(&with_header(&k, &untyped, &payload), None).await.unwrap_err(), BearerError::WrongType);
        let media = format!(r#"{{"alg":"ES256","kid":"{}","typ":"application/AT+JWT"}}"#, k.kid());
        h.v.verify(&with_header(&k, &media, &payload), None).await.unwrap();
        // Tampered payload: a signature over other claims.
        let other = AccessClaims { roles: vec!["platform:admin".into()], ..claims(T0) };
        let forged = format!("{}.{}.{}", parts[0], B64URL.encode(serde_json::to_vec(&other).unwrap()), parts[2]);
        assert_eq!(h.v.verify(&forged, None).await.unwrap_err(), BearerError::BadSignature);
        // Signed by another key under the same kid.
        let impostor = key(Algorithm::ES256);
        let header = format!(r#"{{"alg":"ES256","kid":"{}","typ":"at+jwt"}}"#, k.kid());
        assert_eq!(
            h.v.verify(&with_header(&impostor, &header, &payload), None).await.unwrap_err(),
            BearerError::BadSignature
        );
        // None of these fetched keys.
        assert_eq!(h.fake.calls(), 1);
        assert!(h.v.token_cache().len() <= 1);
    }

    #[tokio::test]
    async fn alg_none_and_hmac_with_the_public_key_are_refused() {
        let k = key(Algorithm::ES256);
        let h = harness(&[&k]).await;
        let payload = B64URL.encode(serde_json::to_vec(&claims(T0)).unwrap());
        let none = B64URL.encode(format!(r#"{{"alg":"none","kid":"{}","typ":"at+jwt"}}"#, k.kid()));
        assert_eq!(h.v.verify(&format!("{none}.{payload}."), None).await.unwrap_err(), BearerError::Malformed);
        assert_eq!(
            h.v.verify(&format!("{none}.{payload}.AAAA"), None).await.unwrap_err(),
            BearerError::AlgorithmNotAllowed
        );
        // HS256 keyed with the public key as published (the classic confusion attack).
        let hs = B64URL.encode(format!(r#"{{"alg":"HS256","kid":"{}","typ":"at+jwt"}}"#, k.kid()));
        let input = format!("{hs}.{payload}");
        let public = serde_json::to_vec(&k.verifying_key().jwk()).unwrap();
        let mac =
            aws_lc_rs::hmac::sign(&aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &public), input.as_bytes());
        let forged = format!("{input}.{}", B64URL.encode(mac.as_ref()));
        assert_eq!(h.v.verify(&forged, None).await.unwrap_err(), BearerError::AlgorithmNotAllowed);
        assert_eq!(h.fake.calls(), 1, "a refused algorithm never triggers a key fetch");
    }

    #[tokio::test]
    async fn algorithm_allow_list_applies_to_header_and_key() {
        let (es, rs) = (key(Algorithm::ES256), key(Algorithm::RS256));
        let config = BearerConfig { algorithms: vec![Algorithm::ES256], ..BearerConfig::default() };
        let h = harness_with(&[&es, &rs], Duration::ZERO, config).await;
        let payload = serde_json::to_vec(&claims(T0)).unwrap();
        h.v.verify(&token(&es, &claims(T0)), None).await.unwrap();
        assert_eq!(h.v.verify(&token(&rs, &claims(T0)), None).await.unwrap_err(), BearerError::AlgorithmNotAllowed);
        // The header claims an allowed algorithm but the kid names an RS256 key.
        let lying = format!(r#"{{"alg":"ES256","kid":"{}","typ":"at+jwt"}}"#, rs.kid());
        assert_eq!(
            h.v.verify(&with_header(&rs, &lying, &payload), None).await.unwrap_err(),
            BearerError::AlgorithmNotAllowed
        );
        // With both allowed, a header alg that differs from the key's is a bad signature.
        let h = harness(&[&es, &rs]).await;
        assert_eq!(h.v.verify(&with_header(&rs, &lying, &payload), None).await.unwrap_err(), BearerError::BadSignature);
        let lying = format!(r#"{{"alg":"RS256","kid":"{}","typ":"at+jwt"}}"#, es.kid());
        assert_eq!(h.v.verify(&with_header(&es, &lying, &payload), None).await.unwrap_err(), BearerError::BadSignature);
    }

    #[tokio::test]
    async fn claim_refusals_issuer_lifetime_unknown_claims_and_cnf() {
        let k = key(Algorithm::ES256);
        let h = harness(&[&k]).await;
        let refuse = |c: AccessClaims, e: BearerError| {
            let (v, t) = (h.v.clone(), token(&k, &c));
            async move { assert_eq!(v.verify(&t, None).await.unwrap_err(), e) }
        };
        refuse(AccessClaims { iss: "https://evil.test".into(), ..claims(T0) }, BearerError::WrongIssuer).await;
        refuse(AccessClaims { iss: format!("{ISS}/"), ..claims(T0) }, BearerError::WrongIssuer).await;
        // exp within the 5 s skew passes, at the skew it is expired.
        h.v.verify(&token(&k, &AccessClaims { exp: T0 - 4, ..claims(T0 - 300) }), None).await.unwrap();
        refuse(AccessClaims { exp: T0 - 5, ..claims(T0 - 300) }, BearerError::Expired).await;
        h.v.verify(&token(&k, &AccessClaims { iat: T0 + 5, ..claims(T0) }), None).await.unwrap();
        refuse(AccessClaims { iat: T0 + 6, ..claims(T0) }, BearerError::NotYetValid).await;
        for cnf in [
            serde_json::json!("x"),
            serde_json::json!({}),
            serde_json::json!({ "jkt": "abc" }),
            serde_json::json!({ "x5t#S256": 5 }),
            serde_json::json!({ "x5t#S256": "too-short" }),
            serde_json::json!({ "x5t#S256": format!("{}=", B64URL.encode([7u8; 32])) }),
            serde_json::json!({ "x5t#S256": B64URL.encode([7u8; 32]), "jkt": "abc" }),
        ] {
            refuse(AccessClaims { cnf: Some(cnf), ..claims(T0) }, BearerError::InvalidClaims).await;
        }
        // Unknown claims (nbf included), a missing claim, a mistyped one.
        let mut extra = serde_json::to_value(claims(T0)).unwrap();
        extra["nbf"] = T0.into();
        let t = sign_json(&k, ACCESS_TOKEN_TYP, &serde_json::to_vec(&extra).unwrap());
        assert_eq!(h.v.verify(&t, None).await.unwrap_err(), BearerError::InvalidClaims);
        let mut missing = serde_json::to_value(claims(T0)).unwrap();
        missing.as_object_mut().unwrap().remove("jti");
        let t = sign_json(&k, ACCESS_TOKEN_TYP, &serde_json::to_vec(&missing).unwrap());
        assert_eq!(h.v.verify(&t, None).await.unwrap_err(), BearerError::InvalidClaims);
        let mut typed = serde_json::to_value(claims(T0)).unwrap();
        typed["exp"] = "soon".into();
        let t = sign_json(&k, ACCESS_TOKEN_TYP, &serde_json::to_vec(&typed).unwrap());
        assert_eq!(h.v.verify(&t, None).await.unwrap_err(), BearerError::InvalidClaims);
        assert_eq!(h.v.token_cache().len(), 2, "only the two good tokens were cached");
    }

    #[tokio::test]
    async fn certificate_bound_tokens_need_the_same_certificate() {
        let k = key(Algorithm::ES256);
        let h = harness(&[&k]).await;
        let cert = thumb(b"the client's certificate DER");
        let bound = AccessClaims { cnf: Some(serde_json::json!({ "x5t#S256": B64URL.encode(cert) })), ..claims(T0) };
        let t = token(&k, &bound);
        assert_eq!(h.v.verify(&t, None).await.unwrap_err(), BearerError::CertificateRequired);
        // Now cached: the binding is still checked on every hit.
        assert_eq!(h.v.token_cache().len(), 1);
        assert_eq!(
            h.v.verify(&t, Some(&thumb(b"another certificate"))).await.unwrap_err(),
            BearerError::CertificateMismatch
        );
        assert_eq!(h.v.verify(&t, None).await.unwrap_err(), BearerError::CertificateRequired);
        let v = h.v.verify(&t, Some(&cert)).await.unwrap();
        assert_eq!(v.cnf_x5t.as_deref(), Some(B64URL.encode(cert).as_str()));
        assert_eq!(
            h.v.verify(&t, Some(&thumb(b"another certificate"))).await.unwrap_err(),
            BearerError::CertificateMismatch
        );
    }

    #[tokio::test]
    async fn second_verification_is_a_cache_hit_keyed_by_hash() {
        let k = key(Algorithm::ES256);
        let h = harness(&[&k]).await;
        let t = token(&k, &claims(T0));
        let first = h.v.verify(&t, None).await.unwrap();
        let second = h.v.verify(&t, None).await.unwrap();
        assert!(Arc::ptr_eq(&first, &second), "served from the cache, not verified again");
        assert!(h.v.token_cache().get(&TokenCache::key(&t).unwrap()).is_some());
        // A different token with the same claims is another entry.
        let again = h.v.verify(&token(&k, &claims(T0)), None).await.unwrap();
        assert!(!Arc::ptr_eq(&first, &again));
        assert_eq!(h.v.token_cache().len(), 2);
        assert!(!format!("{:?}", h.v).contains(&t));
    }

    #[tokio::test]
    async fn revocation_wins_over_the_cache() {
        let k = key(Algorithm::ES256);
        let h = harness(&[&k]).await;
        let c = claims(T0);
        let t = token(&k, &c);
        h.v.verify(&t, None).await.unwrap();
        h.v.apply_changes(&Changes { revoked_tokens: vec![revoked(&c.jti, c.exp)], ..Changes::default() }).await;
        assert_eq!(h.v.verify(&t, None).await.unwrap_err(), BearerError::Revoked);
        assert_eq!(h.v.token_cache().len(), 1, "refused although cached");
        // A revoked token never seen before is refused too.
        let c2 = claims(T0);
        h.v.revoked().extend(&[revoked(&c2.jti, c2.exp)]);
        assert_eq!(h.v.verify(&token(&k, &c2), None).await.unwrap_err(), BearerError::Revoked);
        // A reset replaces the set (and empties the cache, and refetches keys).
        h.v.apply_changes(&Changes { reset: true, ..Changes::default() }).await;
        assert!(h.v.revoked().is_empty());
        assert_eq!(h.fake.calls(), 2);
        h.v.verify(&t, None).await.unwrap();
    }

    #[tokio::test]
    async fn cached_token_expires_by_the_clock() {
        let k = key(Algorithm::ES256);
        let h = harness(&[&k]).await;
        let c = AccessClaims { exp: T0 + 60, ..claims(T0) };
        let t = token(&k, &c);
        let first = h.v.verify(&t, None).await.unwrap();
        h.clock.set(T0 + 64);
        assert!(Arc::ptr_eq(&first, &h.v.verify(&t, None).await.unwrap()), "still valid within the skew");
        h.clock.set(T0 + 65);
        assert_eq!(h.v.verify(&t, None).await.unwrap_err(), BearerError::Expired);
        assert_eq!(h.v.token_cache().len(), 1, "refused as a cache hit");
    }

    #[tokio::test]
    async fn rotation_new_kid_is_fetched_and_accepted_without_a_401() {
        let (old, new) = (key(Algorithm::ES256), key(Algorithm::ES256));
        let h = harness(&[&old]).await;
        h.fake.set(&[&old, &new]);
        let v = h.v.verify(&token(&new, &claims(T0)), None).await.unwrap();
        assert_eq!(v.kid, new.kid());
        assert_eq!(h.fake.calls(), 2);
        h.v.verify(&token(&old, &claims(T0)), None).await.unwrap();
        h.v.verify(&token(&new, &claims(T0)), None).await.unwrap();
        assert_eq!(h.fake.calls(), 2, "known kids never fetch");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn unknown_kid_single_flight_and_rate_limit() {
        let (k1, k2, stranger) = (key(Algorithm::ES256), key(Algorithm::ES256), key(Algorithm::ES256));
        let h = harness_with(&[&k1], Duration::from_millis(100), BearerConfig::default()).await;
        h.fake.set(&[&k1, &k2]);
        // Many concurrent requests with the new kid share one fetch.
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..32 {
            let (v, t) = (h.v.clone(), token(&k2, &claims(T0)));
            set.spawn(async move { v.verify(&t, None).await.map(|v| v.kid.clone()) });
        }
        while let Some(r) = set.join_next().await {
            assert_eq!(r.unwrap().unwrap(), k2.kid());
        }
        assert_eq!(h.fake.calls(), 2);

        // An unknown kid within the window: refused without a fetch, however many ask.
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..16 {
            let (v, t) = (h.v.clone(), token(&stranger, &claims(T0)));
            set.spawn(async move { v.verify(&t, None).await.map(|_| ()) });
        }
        while let Some(r) = set.join_next().await {
            assert_eq!(r.unwrap().unwrap_err(), BearerError::UnknownKey);
        }
        assert_eq!(h.fake.calls(), 2, "rate-limited");
        h.clock.advance(9);
        assert_eq!(h.v.verify(&token(&stranger, &claims(T0)), None).await.unwrap_err(), BearerError::UnknownKey);
        assert_eq!(h.fake.calls(), 2);

        // After the window: one fetch shared by concurrent unknown kids, then limited again.
        h.clock.advance(1);
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..16 {
            let (v, t) = (h.v.clone(), token(&stranger, &claims(T0)));
            set.spawn(async move { v.verify(&t, None).await.map(|_| ()) });
        }
        while let Some(r) = set.join_next().await {
            assert_eq!(r.unwrap().unwrap_err(), BearerError::UnknownKey);
        }
        assert_eq!(h.fake.calls(), 3);
        // Missing kid: never fetched.
        let no_kid = with_header(&k1, r#"{"alg":"ES256","typ":"at+jwt"}"#, &serde_json::to_vec(&claims(T0)).unwrap());
        h.clock.advance(60);
        assert_eq!(h.v.verify(&no_kid, None).await.unwrap_err(), BearerError::UnknownKey);
        assert_eq!(h.fake.calls(), 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn single_flight_holds_without_the_rate_limit() {
        // No rate limit: only the single flight keeps concurrent unknown kids to one fetch.
        let (k1, k2, stranger) = (key(Algorithm::ES256), key(Algorithm::ES256), key(Algorithm::ES256));
        let config = BearerConfig { min_refetch_interval: Duration::ZERO, ..BearerConfig::default() };
        let h = harness_with(&[&k1], Duration::from_millis(200), config).await;
        h.fake.set(&[&k1, &k2]);
        for (signer, expected, calls) in
            [(&k2, Ok(k2.kid().to_owned()), 2), (&stranger, Err(BearerError::UnknownKey), 3)]
        {
            let mut set = tokio::task::JoinSet::new();
            for _ in 0..24 {
                let (v, t) = (h.v.clone(), token(signer, &claims(T0)));
                set.spawn(async move { v.verify(&t, None).await.map(|v| v.kid.clone()) });
            }
            while let Some(r) = set.join_next().await {
                assert_eq!(r.unwrap(), expected);
            }
            assert_eq!(h.fake.calls(), calls);
        }
        // One after the other, each unknown kid fetches.
        assert_eq!(h.v.verify(&token(&stranger, &claims(T0)), None).await.unwrap_err(), BearerError::UnknownKey);
        assert_eq!(h.fake.calls(), 4);
    }

    #[tokio::test]
    async fn failed_or_empty_fetch_keeps_the_last_good_keys() {
        let (k, new) = (key(Algorithm::ES256), key(Algorithm::ES256));
        let h = harness(&[&k]).await;
        let t = token(&k, &claims(T0));
        h.fake.fail();
        assert!(h.v.keys().refresh().await.is_err());
        h.v.apply_changes(&Changes { keys: true, ..Changes::default() }).await;
        assert_eq!(h.fake.calls(), 3);
        assert!(h.v.keys().contains(k.kid()));
        h.v.verify(&t, None).await.unwrap();
        // An unknown kid while the control plane is down: 401 (keys exist), not a crash.
        assert_eq!(h.v.verify(&token(&new, &claims(T0)), None).await.unwrap_err(), BearerError::UnknownKey);
        assert_eq!(h.fake.calls(), 4);
        // An empty answer is a failure too.
        h.fake.set(&[]);
        assert!(h.v.keys().refresh().await.is_err());
        assert_eq!(h.v.keys().len(), 1);
        h.v.verify(&token(&k, &claims(T0)), None).await.unwrap();
    }

    #[tokio::test]
    async fn no_keys_ever_is_unavailable() {
        let k = key(Algorithm::ES256);
        let h = harness(&[]).await;
        h.fake.fail();
        let t = token(&k, &claims(T0));
        let e = h.v.verify(&t, None).await.unwrap_err();
        assert_eq!(e, BearerError::Unavailable);
        assert!(e.is_unavailable());
        assert_eq!((e.status(), e.www_authenticate().as_str()), (503, "Bearer"));
        assert_eq!(h.fake.calls(), 1);
        // Rate-limited retries answer the same without fetching; after the window, recovery.
        assert_eq!(h.v.verify(&t, None).await.unwrap_err(), BearerError::Unavailable);
        assert_eq!(h.fake.calls(), 1);
        h.fake.set(&[&k]);
        h.clock.advance(10);
        h.v.verify(&t, None).await.unwrap();
        assert_eq!(h.fake.calls(), 2);
    }

    #[tokio::test]
    async fn a_cached_token_whose_key_left_the_set_is_refused() {
        let (old, new) = (key(Algorithm::ES256), key(Algorithm::ES256));
        let h = harness(&[&old]).await;
        let t = token(&old, &claims(T0));
        h.v.verify(&t, None).await.unwrap();
        h.fake.set(&[&new]);
        h.v.apply_changes(&Changes { keys: true, ..Changes::default() }).await;
        assert_eq!(h.fake.calls(), 2);
        assert_eq!(h.v.verify(&t, None).await.unwrap_err(), BearerError::UnknownKey);
        assert!(h.v.token_cache().is_empty());
    }

    #[tokio::test]
    async fn apply_changes_extends_purges_and_resets() {
        let k = key(Algorithm::ES256);
        let h = harness(&[&k]).await;
        let t = token(&k, &claims(T0));
        h.v.verify(&t, None).await.unwrap();
        let page = Changes {
            revoked_tokens: vec![revoked("a", T0 + 100), revoked("old", T0 - 6), revoked("edge", T0 - 5)],
            ..Changes::default()
        };
        h.v.apply_changes(&page).await;
        assert_eq!(h.fake.calls(), 1, "no key refresh without keys or reset");
        assert!(h.v.revoked().contains("a") && h.v.revoked().contains("edge") && !h.v.revoked().contains("old"));
        h.v.apply_changes(&Changes { revoked_tokens: vec![revoked("b", T0 + 100)], ..Changes::default() }).await;
        assert!(h.v.revoked().contains("a") && h.v.revoked().contains("b"));
        assert_eq!(h.v.token_cache().len(), 1);
        h.v.apply_changes(&Changes { reset: true, revoked_tokens: vec![revoked("c", T0 + 100)], ..Changes::default() })
            .await;
        assert!(!h.v.revoked().contains("a") && h.v.revoked().contains("c"));
        assert!(h.v.token_cache().is_empty());
        assert_eq!(h.fake.calls(), 2);
    }

    #[test]
    fn revoked_jtis_keep_the_latest_expiry_and_stay_bounded() {
        let r = RevokedJtis::new(10);
        r.extend(&[revoked("x", 100), revoked("x", 50)]);
        assert_eq!(r.purge(60), 0);
        assert!(r.contains("x"));
        assert_eq!(r.purge(101), 1);
        assert!(r.is_empty());
        // Over the bound: the soonest-expiring go first, down to 90 %.
        let many: Vec<_> = (0..11).map(|i| revoked(&format!("j{i}"), 1000 + i)).collect();
        r.extend(&many);
        assert_eq!(r.len(), 9);
        assert!(!r.contains("j0") && !r.contains("j1") && r.contains("j2") && r.contains("j10"));
        r.replace(&many);
        assert_eq!(r.len(), 9);
        r.replace(&[]);
        assert!(r.is_empty());
    }

    #[test]
    fn token_cache_is_bounded_and_drops_expired_entries_first() {
        let entry = |exp| {
            Arc::new(VerifiedToken {
                identity: Identity {
                    subject: "s".into(),
                    client_id: "o$a".into(),
                    org: "o".into(),
                    roles: vec![],
                    scopes: vec![],
                    audiences: vec![],
                    auth_method: AuthMethod::Bearer,
                },
                jti: "j".into(),
                exp,
                iat: 0,
                kid: "k".into(),
                cnf_x5t: None,
            })
        };
        let c = TokenCache::with_shards(3, 1);
        let key = |i: u32| TokenCache::key(&i.to_string()).unwrap();
        c.insert(key(1), entry(10), 0);
        c.insert(key(2), entry(100), 0);
        c.insert(key(3), entry(100), 0);
        // Full: the expired one (exp 10 at now 50) makes room.
        c.insert(key(4), entry(100), 50);
        assert_eq!(c.len(), 3);
        assert!(c.get(&key(1)).is_none() && c.get(&key(2)).is_some() && c.get(&key(4)).is_some());
        // Replacing an entry in a full shard keeps the others.
        c.insert(key(4), entry(200), 50);
        assert_eq!(c.len(), 3);
        // Full of live entries: emptied, then the new one goes in.
        c.insert(key(5), entry(100), 50);
        assert_eq!(c.len(), 1);
        assert!(c.get(&key(5)).is_some());
        // Sharded: the total stays near the bound.
        let c = TokenCache::new(64);
        for i in 0..10_000 {
            c.insert(key(i), entry(100), 0);
        }
        assert!(c.len() <= 64, "{}", c.len());
        c.clear();
        assert!(c.is_empty());
        assert_eq!(TokenCache::key("t").unwrap().len(), 32);
    }

    #[tokio::test]
    async fn run_refresh_ticks_until_shutdown() {
        let (k, new) = (key(Algorithm::ES256), key(Algorithm::ES256));
        let fake = Fake::new(&[&k], Duration::ZERO);
        let keys = Arc::new(KeyCache::new(fake.clone(), Arc::new(ManualClock::new(T0)), DEFAULT_MIN_REFETCH_INTERVAL));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(keys.clone().run_refresh(Duration::from_millis(20), async move {
            let _ = stopped.await;
        }));
        tokio::time::timeout(Duration::from_secs(5), async {
            while !keys.contains(k.kid()) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap();
        fake.set(&[&new]);
        tokio::time::timeout(Duration::from_secs(5), async {
            while !keys.contains(new.kid()) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap();
        assert!(!keys.contains(k.kid()), "a refresh replaces the set");
        assert!(fake.calls() >= 2);
        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), task).await.unwrap().unwrap();
        let after = fake.calls();
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(fake.calls(), after, "no refresh after shutdown");
    }

    #[test]
    fn error_texts_and_challenges() {
        use BearerError::*;
        let all = [
            Malformed,
            TooLarge,
            ForbiddenHeader,
            WrongType,
            UnknownKey,
            AlgorithmNotAllowed,
            BadSignature,
            InvalidClaims,
            WrongIssuer,
            Expired,
            NotYetValid,
            Revoked,
            CertificateRequired,
            CertificateMismatch,
            Unavailable,
        ];
        let texts: std::collections::HashSet<String> = all.iter().map(ToString::to_string).collect();
        assert_eq!(texts.len(), all.len(), "every refusal has its own text");
        for e in all.into_iter().filter(|e| !e.is_unavailable()) {
            assert_eq!(e.status(), 401);
            let c = e.www_authenticate();
            let description = c
                .strip_prefix("Bearer error=\"invalid_token\", error_description=\"")
                .and_then(|d| d.strip_suffix('"'))
                .unwrap();
            assert_eq!(description, e.to_string(), "nothing lost to sanitising");
            assert!(description.chars().all(|ch| matches!(ch, ' ' | '!' | '#'..='[' | ']'..='~')), "{c}");
        }
        assert_eq!(BearerError::from(JwsError::WrongType), WrongType);
        assert!(is_access_token_typ("at+JWT") && is_access_token_typ("Application/at+jwt"));
        assert!(
            !is_access_token_typ("application/")
                && !is_access_token_typ("jwt")
                && !is_access_token_typ("xapplication/at+jwt")
        );
    }
}
