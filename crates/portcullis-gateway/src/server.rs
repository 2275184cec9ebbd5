//! The running gateway: the TLS listener and the request pipeline
//! `route → authenticate → authorize → forward → record`, plus the background work that keeps
//! its local state fresh (the change feed, a periodic resync, certificate renewal) and hot reload
//! of the routes.
//!
//! Per request:
//! 1. framing checks (request smuggling: 400), then the route (404, 405 with `Allow`, 400 for a
//!    path with a second spelling);
//! 2. the per-IP rate limit (429), authentication with the first credential the route accepts
//!    that the request carries — bearer JWT, `api-key` + `api-secret`, session cookie, client
//!    certificate — (401 with `WWW-Authenticate`; a presented credential that fails is never
//!    skipped in favour of another), the per-identity rate limit (429);
//! 3. the route policy (403), the body limit (413);
//! 4. forwarding: identity headers set from verified state after every client-sent header of
//!    that namespace is removed, hop-by-hop headers removed, `x-forwarded-*` rewritten, the
//!    `api-secret` header and the gateway session cookie never sent upstream; the response
//!    streamed back; WebSocket upgrades spliced; upstream failures as 502/504;
//! 5. an access-log line (no credentials, no query string) and Prometheus metrics per route and
//!    outcome.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use portcullis_core::clock::Clock;
use portcullis_core::ratelimit::FailureLimiter;
use tokio::net::TcpListener;

use crate::bearer::{BearerConfig, BearerVerifier};
use crate::config::{AuthMethod, MtlsMode, Route, RouteError, RouteKind, ValidatedConfig};
use crate::control::{CertificatePurpose, Changes, ControlPlane, Refusal as ControlRefusal, Unavailable};
use crate::forward::{UpstreamClient, UpstreamFailure};
use crate::headers::{self, ClientCert, IdentityHeaders, Proto};
use crate::login;
use crate::policy::{self, Identity, PermissionGrants};
use crate::respond::{self, Body, Refusal, Shape};
use crate::soap::SoapVersion;
use crate::tls::{CertSlot, ClientAuth, ClientTrust, PeerCertificate};

/// The gateway's own endpoints on its listener (never routed, never authenticated).
pub const OWN_PREFIX: &str = "/.portcullis/";
/// The header carrying an API key's secret; never forwarded.
pub const API_SECRET: &str = "api-secret";
/// The header carrying an API key's id.
pub const API_KEY: &str = "api-key";
/// The session cookie of browser (`session`) routes.
pub const SESSION_COOKIE: &str = "portcullis_session";

/// How long a control-plane answer about an API key, session or certificate is reused. Any
/// revocation or change reported by the feed clears the cache at once.
const PRINCIPAL_TTL: Duration = Duration::from_secs(10);
/// Bound of the principal cache (cleared when full).
const PRINCIPAL_CACHE_MAX: usize = 50_000;
/// The long-poll wait of the change feed.
const FEED_WAIT: Duration = Duration::from_secs(25);
/// A full refetch of keys, trust and grants, whatever the feed said (a missed change cannot stay
/// stale longer than this).
const RESYNC_EVERY: Duration = Duration::from_secs(60);
/// How often certificate lifetimes are checked.
const RENEW_CHECK_EVERY: Duration = Duration::from_secs(60);
/// How long a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// At most this much of a refused request's body is read and discarded ([`drain`]).
const DRAIN_BODY_MAX: usize = 1024 * 1024;
/// … for at most this long.
const DRAIN_BODY_TIME: Duration = Duration::from_secs(3);
/// How long graceful shutdown waits for in-flight requests.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// The outcomes a request is counted under (`portcullis_gateway_requests_total{outcome}`).
const OUTCOMES: [&str; 13] = [
    "forwarded",
    "unauthenticated",
    "forbidden",
    "rate_limited",
    "too_large",
    "bad_request",
    "no_route",
    "upstream_error",
    "upstream_timeout",
    "unavailable",
    "internal",
    "own",
    "refused",
];

/// One route's metric handles, registered once (no label hashing per request).
struct RouteMetrics {
    /// The route's path (`-` before a route is known).
    path: Arc<str>,
    requests: Vec<metrics::Counter>,
    duration: metrics::Histogram,
}

impl RouteMetrics {
    fn new(path: &str) -> Arc<Self> {
        let label = path.to_owned();
        Arc::new(Self {
            path: Arc::from(path),
            requests: OUTCOMES
                .iter()
                .map(|o| metrics::counter!("portcullis_gateway_requests_total", "route" => label.clone(), "outcome" => *o))
                .collect(),
            duration: metrics::histogram!("portcullis_gateway_request_duration_seconds", "route" => label),
        })
    }

    fn record(&self, outcome: &str, elapsed: Duration) {
        if let Some(c) = OUTCOMES.iter().position(|o| *o == outcome).and_then(|i| self.requests.get(i)) {
            c.increment(1);
        }
        self.duration.record(elapsed.as_secs_f64());
    }
}

/// Numbers every [`Runtime`], so a listener thread knows when its upstream clients are stale.
static GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

thread_local! {
    /// This thread's upstream clients and the [`Runtime`] generation they were built for. Each
    /// listener thread has its own pools, so a request and the upstream connection it uses are
    /// driven by the same thread (no cross-thread wakeups per request).
    static CLIENTS: std::cell::RefCell<(u64, Vec<UpstreamClient>)> = const { std::cell::RefCell::new((0, Vec::new())) };
}

/// The routes and what was built for them; replaced as a whole on reload.
struct Runtime {
    generation: u64,
    anchors: Arc<Vec<Vec<u8>>>,
    transport: Arc<CertSlot>,
    config: ValidatedConfig,
    /// By route index.
    metrics: Vec<Arc<RouteMetrics>>,
    /// By route index.
    clients: Vec<UpstreamClient>,
    per_ip: Vec<Option<FailureLimiter>>,
    per_identity: Vec<Option<FailureLimiter>>,
}

impl Runtime {
    fn build(config: ValidatedConfig, anchors: Arc<Vec<Vec<u8>>>, transport: &Arc<CertSlot>) -> Result<Self, String> {
        let clients = Self::clients_for(&config, &anchors, transport)?;
        let per_ip = config.routes().iter().map(|r| r.rate_limit.per_ip.map(|n| FailureLimiter::new(n, 60))).collect();
        let per_identity =
            config.routes().iter().map(|r| r.rate_limit.per_identity.map(|n| FailureLimiter::new(n, 60))).collect();
        let metrics = config.routes().iter().map(|r| RouteMetrics::new(&r.path)).collect();
        let generation = GENERATION.fetch_add(1, Ordering::Relaxed);
        Ok(Self { generation, anchors, transport: transport.clone(), config, metrics, clients, per_ip, per_identity })
    }

    fn clients_for(
        config: &ValidatedConfig,
        anchors: &[Vec<u8>],
        transport: &Arc<CertSlot>,
    ) -> Result<Vec<UpstreamClient>, String> {
        config
            .routes()
            .iter()
            .map(|route| {
                crate::forward::client_for(route, anchors, transport)
                    .map_err(|e| format!("route {} ({}): {e}", route.index, route.path))
            })
            .collect()
    }

    /// The calling thread's client for route `index`, built on first use for this generation
    /// (falling back to the shared one if building fails).
    fn client(&self, index: usize) -> Option<UpstreamClient> {
        CLIENTS
            .with(|cell| {
                let mut here = cell.try_borrow_mut().ok()?;
                if here.0 != self.generation {
                    let built = Self::clients_for(&self.config, &self.anchors, &self.transport).ok()?;
                    *here = (self.generation, built);
                }
                here.1.get(index).cloned()
            })
            .or_else(|| self.clients.get(index).cloned())
    }
}

/// Control-plane answers about API keys, sessions and certificates, by SHA-256 of the credential.
#[derive(Default)]
struct PrincipalCache {
    map: Mutex<HashMap<[u8; 32], CachedPrincipal>>,
}

/// An identity and when it stops being reused.
type CachedPrincipal = (Arc<Identity>, Instant);

impl PrincipalCache {
    fn get(&self, key: &[u8; 32]) -> Option<Arc<Identity>> {
        let map = self.map.lock().ok()?;
        map.get(key).filter(|(_, until)| *until > Instant::now()).map(|(id, _)| id.clone())
    }
    fn put(&self, key: [u8; 32], id: Arc<Identity>) {
        if let Ok(mut map) = self.map.lock() {
            if map.len() >= PRINCIPAL_CACHE_MAX {
                map.clear();
            }
            map.insert(key, (id, Instant::now() + PRINCIPAL_TTL));
        }
    }
    fn clear(&self) {
        if let Ok(mut map) = self.map.lock() {
            map.clear();
        }
    }
}

fn credential_key(parts: &[&[u8]]) -> [u8; 32] {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    for p in parts {
        ctx.update(&(p.len() as u64).to_be_bytes());
        ctx.update(p);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// The authenticated caller: a verified token (shared with the token cache) or a control-plane
/// answer (shared with the principal cache). Either way no identity is copied per request.
#[derive(Debug, Clone)]
enum Who {
    Token(Arc<crate::bearer::VerifiedToken>),
    Principal(Arc<Identity>),
}

impl Who {
    fn identity(&self) -> &Identity {
        match self {
            Who::Token(t) => &t.identity,
            Who::Principal(p) => p,
        }
    }
}

/// What one connection knows about its peer.
#[derive(Debug, Clone)]
pub struct Connection {
    pub peer: SocketAddr,
    /// The client certificate the TLS layer verified.
    pub certificate: Option<Arc<PeerCertificate>>,
}

/// The gateway. Build with [`Gateway::new`], load state with [`Gateway::prepare`], then
/// [`Gateway::spawn_background`] and [`Gateway::serve`].
pub struct Gateway {
    control: Arc<dyn ControlPlane>,
    clock: Arc<dyn Clock>,
    runtime: RwLock<Arc<Runtime>>,
    bearer: BearerVerifier,
    grants: RwLock<Arc<PermissionGrants>>,
    principals: PrincipalCache,
    trust: Arc<ClientTrust>,
    anchors: RwLock<Arc<Vec<Vec<u8>>>>,
    server_cert: Arc<CertSlot>,
    transport_cert: Arc<CertSlot>,
    ready: AtomicBool,
    /// Metrics of requests that matched no route.
    unrouted: Arc<RouteMetrics>,
    /// Where the change feed resumes (set by [`Gateway::prepare`]).
    cursor: Mutex<Option<String>>,
    /// The listener's port once [`Gateway::serve`] runs (the default public origin's port).
    bound_port: std::sync::atomic::AtomicU16,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway").field("ready", &self.ready.load(Ordering::Relaxed)).finish_non_exhaustive()
    }
}

impl Gateway {
    /// A gateway for `config` that reaches the control plane through `control`. Nothing is
    /// fetched yet: call [`Gateway::prepare`].
    pub fn new(
        config: ValidatedConfig,
        control: Arc<dyn ControlPlane>,
        clock: Arc<dyn Clock>,
    ) -> Result<Arc<Self>, String> {
        check_login(&config, control.as_ref())?;
        let transport_cert = Arc::new(CertSlot::default());
        // Routes are built again in `prepare`, once the CA anchors are known; this catches bad
        // files (a missing `upstream_ca_file`) before anything is fetched.
        let runtime = Runtime::build(config, Arc::new(Vec::new()), &transport_cert)?;
        Ok(Arc::new(Self {
            bearer: BearerVerifier::new(control.clone(), clock.clone(), BearerConfig::default()),
            control,
            clock,
            runtime: RwLock::new(Arc::new(runtime)),
            grants: RwLock::new(Arc::new(PermissionGrants::new())),
            principals: PrincipalCache::default(),
            trust: Arc::new(ClientTrust::default()),
            anchors: RwLock::new(Arc::new(Vec::new())),
            server_cert: Arc::new(CertSlot::default()),
            transport_cert,
            ready: AtomicBool::new(false),
            unrouted: RouteMetrics::new("-"),
            cursor: Mutex::new(None),
            bound_port: std::sync::atomic::AtomicU16::new(0),
        }))
    }

    fn runtime(&self) -> Arc<Runtime> {
        match self.runtime.read() {
            Ok(r) => r.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn grants(&self) -> Arc<PermissionGrants> {
        match self.grants.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The listen address of the current configuration.
    pub fn listen_addr(&self) -> SocketAddr {
        self.runtime().config.listen()
    }

    /// Whether keys, trust, grants and the server certificate are loaded.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// Fetches everything the data plane needs before it can answer: signing keys, trust,
    /// grants, the server certificate (and the transport certificate when a route presents one).
    pub async fn prepare(&self) -> Result<(), Unavailable> {
        // The feed's starting point first, then the state: a change made while the state is
        // being fetched is then reported by the feed rather than lost between the two.
        let start = self.control.changes(None, Duration::ZERO).await?;
        self.bearer.apply_changes(&start).await;
        match self.cursor.lock() {
            Ok(mut c) => *c = Some(start.cursor),
            Err(p) => *p.into_inner() = Some(start.cursor),
        }
        self.bearer.keys().refresh().await?;
        self.refresh_trust().await?;
        self.refresh_grants().await?;
        let names = self.runtime().config.server_names().to_vec();
        let issued = self.control.issue(CertificatePurpose::Server, &names).await?;
        self.server_cert.set(&issued).map_err(Unavailable)?;
        if self.needs_transport_certificate() {
            let issued = self.control.issue(CertificatePurpose::UpstreamClient, &[]).await?;
            self.transport_cert.set(&issued).map_err(Unavailable)?;
        }
        let config = self.runtime().config.clone();
        self.install(config).map_err(Unavailable)?;
        self.ready.store(true, Ordering::Relaxed);
        Ok(())
    }

    fn needs_transport_certificate(&self) -> bool {
        self.runtime().config.routes().iter().any(|r| r.upstream.https && r.upstream_client_certificate)
    }

    /// Builds the routes' clients for `config` with the current CA anchors and swaps them in.
    fn install(&self, config: ValidatedConfig) -> Result<(), String> {
        let anchors = match self.anchors.read() {
            Ok(a) => a.clone(),
            Err(p) => p.into_inner().clone(),
        };
        let runtime = Arc::new(Runtime::build(config, anchors, &self.transport_cert)?);
        match self.runtime.write() {
            Ok(mut r) => *r = runtime,
            Err(p) => *p.into_inner() = runtime,
        }
        Ok(())
    }

    /// Hot reload: replaces the routes without dropping connections (in-flight requests finish on
    /// the routes they started with). The listen address, server names and mTLS mode are read at
    /// start only; a change to them is refused with a message saying a restart is needed.
    pub async fn reload(&self, config: ValidatedConfig) -> Result<(), String> {
        let current = self.runtime();
        let old = &current.config;
        if config.listen() != old.listen() || config.mtls() != old.mtls() || config.server_names() != old.server_names()
        {
            return Err(
                "listen, server_names and mtls take effect only after a restart; routes were not reloaded".into()
            );
        }
        check_login(&config, self.control.as_ref())?;
        if config.routes().iter().any(|r| r.upstream.https && r.upstream_client_certificate)
            && self.transport_cert.not_after().is_none()
        {
            let issued =
                self.control.issue(CertificatePurpose::UpstreamClient, &[]).await.map_err(|e| e.to_string())?;
            self.transport_cert.set(&issued)?;
        }
        let routes = config.routes().len();
        self.install(config)?;
        tracing::info!(routes, "gateway routes reloaded");
        Ok(())
    }

    async fn refresh_trust(&self) -> Result<(), Unavailable> {
        let bundle = self.control.trust().await?;
        self.trust.update(&bundle).map_err(Unavailable)?;
        let changed = match self.anchors.read() {
            Ok(a) => **a != bundle.anchors,
            Err(_) => true,
        };
        if changed {
            match self.anchors.write() {
                Ok(mut a) => *a = Arc::new(bundle.anchors),
                Err(p) => *p.into_inner() = Arc::new(bundle.anchors),
            }
            if self.ready.load(Ordering::Relaxed) {
                let config = self.runtime().config.clone();
                if let Err(e) = self.install(config) {
                    tracing::warn!(error = %e, "rebuilding upstream clients for new CA anchors failed");
                }
            }
        }
        Ok(())
    }

    async fn refresh_grants(&self) -> Result<(), Unavailable> {
        let grants = Arc::new(self.control.grants().await?);
        match self.grants.write() {
            Ok(mut g) => *g = grants,
            Err(p) => *p.into_inner() = grants,
        }
        Ok(())
    }

    /// Applies one page of the change feed.
    async fn apply(&self, changes: &Changes) {
        self.bearer.apply_changes(changes).await;
        if changes.principals || changes.trust || changes.reset {
            self.principals.clear();
        }
        if (changes.trust || changes.reset)
            && let Err(e) = self.refresh_trust().await
        {
            tracing::warn!(error = %e, "refreshing client-certificate trust failed; keeping the last one");
        }
        if (changes.grants || changes.reset)
            && let Err(e) = self.refresh_grants().await
        {
            tracing::warn!(error = %e, "refreshing permission grants failed; keeping the last ones");
        }
    }

    /// Spawns the change feed, the periodic resync and certificate renewal; they stop when
    /// `shutdown` turns true.
    pub fn spawn_background(self: &Arc<Self>, shutdown: tokio::sync::watch::Receiver<bool>) {
        let me = self.clone();
        let mut stop = shutdown.clone();
        tokio::spawn(async move {
            let mut cursor: Option<String> = me.cursor.lock().ok().and_then(|c| c.clone());
            let mut backoff = Duration::from_millis(500);
            loop {
                let page = tokio::select! {
                    _ = stop.changed() => return,
                    page = me.control.changes(cursor.as_deref(), FEED_WAIT) => page,
                };
                match page {
                    Ok(changes) => {
                        backoff = Duration::from_millis(500);
                        me.apply(&changes).await;
                        cursor = Some(changes.cursor);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "gateway change feed failed; retrying");
                        tokio::select! {
                            _ = stop.changed() => return,
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(10));
                    }
                }
            }
        });

        let me = self.clone();
        let mut stop = shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(RESYNC_EVERY);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = stop.changed() => return,
                    _ = tick.tick() => {}
                }
                if let Err(e) = me.bearer.keys().refresh().await {
                    tracing::warn!(error = %e, "periodic signing-key refresh failed");
                }
                if let Err(e) = me.refresh_trust().await {
                    tracing::warn!(error = %e, "periodic trust refresh failed");
                }
                if let Err(e) = me.refresh_grants().await {
                    tracing::warn!(error = %e, "periodic grants refresh failed");
                }
            }
        });

        let me = self.clone();
        let mut stop = shutdown;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(RENEW_CHECK_EVERY);
            loop {
                tokio::select! {
                    _ = stop.changed() => return,
                    _ = tick.tick() => {}
                }
                me.renew_if_due().await;
            }
        });
    }

    /// Renews the server (and transport) certificate once less than a third of a 30-day
    /// lifetime (10 days) is left. New connections get the new certificate at once.
    pub async fn renew_if_due(&self) {
        let now = self.clock.now();
        let due = |slot: &CertSlot| slot.not_after().is_some_and(|t| t - now < 10 * 86_400);
        if due(&self.server_cert) {
            let names = self.runtime().config.server_names().to_vec();
            match self.control.issue(CertificatePurpose::Server, &names).await {
                Ok(issued) => match self.server_cert.set(&issued) {
                    Ok(()) => tracing::info!(not_after = issued.not_after, "gateway server certificate renewed"),
                    Err(e) => tracing::warn!(error = %e, "installing the renewed server certificate failed"),
                },
                Err(e) => tracing::warn!(error = %e, "renewing the gateway server certificate failed; will retry"),
            }
        }
        if due(&self.transport_cert) {
            match self.control.issue(CertificatePurpose::UpstreamClient, &[]).await {
                Ok(issued) => {
                    if let Err(e) = self.transport_cert.set(&issued) {
                        tracing::warn!(error = %e, "installing the renewed transport certificate failed");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "renewing the transport certificate failed; will retry"),
            }
        }
    }

    /// Serves TLS on `listener` until `shutdown` resolves, then stops accepting and lets
    /// in-flight requests finish (up to 30 s).
    ///
    /// One listener thread per core, each with its own single-threaded runtime accepting from the
    /// shared socket (nginx's model): a connection, its requests and the upstream connections
    /// they use stay on one thread. Background work stays on the caller's runtime.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: impl std::future::Future<Output = ()> + Send) {
        if let Ok(addr) = listener.local_addr() {
            self.bound_port.store(addr.port(), Ordering::Relaxed);
        }
        let auth = match self.runtime().config.mtls() {
            MtlsMode::Off => ClientAuth::Off,
            MtlsMode::Optional => ClientAuth::Optional,
            MtlsMode::Required => ClientAuth::Required,
        };
        let tls = match crate::tls::server_config(self.server_cert.clone(), self.trust.clone(), auth) {
            Ok(c) => c,
            Err(e) => return tracing::error!(error = %e, "gateway TLS configuration failed"),
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let std_listener = match listener.into_std() {
            Ok(l) => l,
            Err(e) => return tracing::error!(error = %e, "gateway listener"),
        };
        let threads = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get).clamp(1, 64);
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut finished = Vec::with_capacity(threads);
        for i in 0..threads {
            let socket = match std_listener.try_clone() {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "gateway listener thread");
                    continue;
                }
            };
            let (me, acceptor, stop) = (self.clone(), acceptor.clone(), stop_rx.clone());
            let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
            let spawned = std::thread::Builder::new().name(format!("gateway-{i}")).spawn(move || {
                match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt.block_on(async move {
                        match TcpListener::from_std(socket) {
                            Ok(listener) => me.accept_loop(listener, acceptor, stop).await,
                            Err(e) => tracing::error!(error = %e, "gateway listener thread"),
                        }
                    }),
                    Err(e) => tracing::error!(error = %e, "gateway listener thread runtime"),
                }
                let _ = done_tx.send(());
            });
            match spawned {
                Ok(_) => finished.push(done_rx),
                Err(e) => tracing::error!(error = %e, "gateway listener thread"),
            }
        }
        drop(std_listener);
        shutdown.await;
        let _ = stop_tx.send(true);
        for done in finished {
            let _ = done.await;
        }
    }

    /// One listener thread: accepts until `stop`, then drains its connections.
    async fn accept_loop(
        self: Arc<Self>,
        listener: TcpListener,
        acceptor: tokio_rustls::TlsAcceptor,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        loop {
            let (tcp, peer) = tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "gateway accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let me = self.clone();
            let watcher = graceful.watcher();
            tokio::spawn(async move {
                let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        metrics::counter!("portcullis_gateway_handshake_failures_total").increment(1);
                        return tracing::debug!(%peer, error = %e, "gateway TLS handshake refused");
                    }
                    Err(_) => return tracing::debug!(%peer, "gateway TLS handshake timed out"),
                };
                let certificate = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|c| PeerCertificate::from_der(c.to_vec()))
                    .map(Arc::new);
                let conn = Arc::new(Connection { peer, certificate });
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let me = me.clone();
                    let conn = conn.clone();
                    async move { Ok::<_, std::convert::Infallible>(me.handle(req, &conn).await) }
                });
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let served = builder.serve_connection_with_upgrades(TokioIo::new(tls), svc).into_owned();
                if let Err(e) = watcher.watch(served).await {
                    tracing::debug!(%peer, error = %e, "gateway connection ended with an error");
                }
            });
        }
        drop(listener);
        if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown()).await.is_err() {
            tracing::warn!("gateway shutdown: connections still open after the drain timeout");
        }
    }

    /// One request, start to end (see the module documentation).
    pub async fn handle(&self, req: Request<Incoming>, conn: &Connection) -> Response<Body> {
        let started = Instant::now();
        let method = req.method().clone();
        // A cheap clone (shared bytes): the access log's path, read only when it is written.
        let uri = req.uri().clone();
        let mut log = Outcome::default();
        let http1 = req.version() < http::Version::HTTP_2;
        // The body is held apart: forwarding takes it; a refusal drains it (bounded) and keeps
        // it alive until the refusal is sent (HTTP/2 would otherwise reset the stream, CANCEL,
        // before the answer).
        let (parts, body) = req.into_parts();
        let mut body = Some(body);
        let resp = match self.pipeline(Request::from_parts(parts, ()), &mut body, conn, &mut log).await {
            Ok(resp) => resp,
            Err((refusal, shape)) => {
                let (mut resp, id) = refusal.render(shape);
                log.error_id = Some(id);
                log.error = Some(refusal.message);
                let misframed = http1 && log.outcome == Some("bad_request");
                if misframed {
                    // A request whose framing or target was refused: nothing after it on this
                    // connection can be trusted to start where the gateway thinks it does.
                    resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                if let Some(mut held) = body.take() {
                    if !misframed {
                        drain(&mut held).await;
                    }
                    resp = resp.map(|b| Holding { inner: b, _held: held }.boxed());
                }
                resp
            }
        };
        let status = resp.status().as_u16();
        let elapsed = started.elapsed();
        let route = log.route.take().unwrap_or_else(|| self.unrouted.clone());
        let outcome = log.outcome.unwrap_or(if status < 400 { "forwarded" } else { "refused" });
        route.record(outcome, elapsed);
        let identity = log.who.as_ref().map(Who::identity);
        tracing::info!(
            target: "portcullis::gateway::access",
            peer = %conn.peer.ip(),
            client_ip = %log.client_ip.unwrap_or(conn.peer.ip()),
            %method,
            path = %uri.path(),
            route = %route.path,
            status,
            outcome,
            latency_us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
            subject = identity.map_or("-", |i| i.subject.as_str()),
            client_id = identity.map_or("-", |i| i.client_id.as_str()),
            auth = identity.map_or("-", |i| i.auth_method.as_str()),
            error_id = log.error_id.as_deref().unwrap_or("-"),
            error = log.error.as_deref().unwrap_or("-"),
            "gateway request"
        );
        resp
    }

    async fn pipeline(
        &self,
        mut req: Request<()>,
        body_slot: &mut Option<Incoming>,
        conn: &Connection,
        log: &mut Outcome,
    ) -> Result<Response<Body>, (Refusal, Shape)> {
        let runtime = self.runtime();
        let config = &runtime.config;
        let soap = SoapVersion::detect(req.headers(), &[]);

        if let Some(own) = req.uri().path().strip_prefix(OWN_PREFIX) {
            log.outcome = Some("own");
            return self.own_endpoint(own, &req, conn, config).await.map_err(|r| (r, Shape::Json));
        }

        let framing = headers::check_framing(req.headers()).map_err(|e| {
            log.outcome = Some("bad_request");
            (Refusal::new(e.status(), format!("request refused: {e}")), Shape::Json)
        })?;

        let route = match config.route(req.method(), req.uri().path()) {
            Ok(r) => r,
            Err(e) => {
                log.outcome = Some(if matches!(e, RouteError::NotFound) { "no_route" } else { "bad_request" });
                let shape = soap.map_or(Shape::Json, Shape::Soap);
                return Err((route_refusal(&e), shape));
            }
        };
        log.route = runtime.metrics.get(route.index).cloned();
        let shape = match (route.kind, soap) {
            (RouteKind::Soap, Some(v)) => Shape::Soap(v),
            (RouteKind::Soap, None) => Shape::Soap(SoapVersion::V11),
            (RouteKind::Rest, _) => Shape::Json,
        };
        let fail = |log: &mut Outcome, outcome: &'static str, r: Refusal| {
            log.outcome = Some(outcome);
            (r, shape)
        };

        let original_host = request_host(&req);
        let forwarded = headers::forwarded_for(
            req.headers(),
            conn.peer.ip(),
            Proto::Https,
            original_host.as_deref(),
            config.trusted_proxies(),
        );
        log.client_ip = Some(forwarded.client_ip);
        let now = self.clock.now();
        if let Some(Some(limiter)) = runtime.per_ip.get(route.index)
            && let Err(retry) = limiter.fail(&[&forwarded.client_ip.to_string()], now)
        {
            return Err(fail(log, "rate_limited", too_many(retry)));
        }

        let who = match self.authenticate(route, &req, conn, forwarded.client_ip).await {
            Ok(who) => who,
            Err((outcome, r)) => {
                // A browser with no (or a dead) session goes to the sign-in page instead.
                let r = if r.status == StatusCode::UNAUTHORIZED
                    && route.accepts(AuthMethod::Session)
                    && !carries_api_credential(req.headers())
                    && login::is_navigation(req.method(), req.headers())
                {
                    self.to_sign_in(config, &req).unwrap_or(r)
                } else {
                    r
                };
                return Err(fail(log, outcome, r));
            }
        };
        log.who = Some(who.clone());
        let identity = who.identity();

        if let Some(Some(limiter)) = runtime.per_identity.get(route.index)
            && let Err(retry) = limiter.fail(&[&format!("{}\u{0}{}", identity.client_id, identity.subject)], now)
        {
            return Err(fail(log, "rate_limited", too_many(retry)));
        }

        match policy::authorize(route, identity, &self.grants()) {
            Ok(()) => {}
            // A token for another audience is not a credential for this route at all (RFC 6750
            // §3.1 `invalid_token`), unlike a valid credential that lacks a role.
            Err(denied @ policy::Denied::Audience { .. }) => {
                let message = denied.to_string();
                let challenge = challenge(route, Some(("invalid_token", &message)));
                return Err(fail(log, "unauthenticated", Refusal::unauthorized(message, challenge)));
            }
            Err(denied) => {
                return Err(fail(log, "forbidden", Refusal::new(StatusCode::FORBIDDEN, denied.to_string())));
            }
        }

        if let headers::Framing::ContentLength(n) = framing
            && n > route.max_body_bytes
        {
            return Err(fail(
                log,
                "too_large",
                Refusal::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("request body exceeds this route's limit of {} bytes", route.max_body_bytes),
                ),
            ));
        }

        // ---- the upstream request ----------------------------------------------------------
        let websocket = headers::is_websocket_upgrade(req.headers());
        let client_upgrade = websocket.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, ()) = req.into_parts();
        let Some(body) = body_slot.take() else {
            return Err(fail(
                log,
                "internal",
                Refusal::new(StatusCode::INTERNAL_SERVER_ERROR, "request body already taken"),
            ));
        };
        let uri = crate::forward::upstream_uri(route, parts.uri.path_and_query())
            .map_err(|e| fail(log, "bad_request", Refusal::new(StatusCode::BAD_REQUEST, e)))?;
        parts.uri = uri;
        parts.version = http::Version::HTTP_11;
        let h = &mut parts.headers;
        headers::remove_hop_by_hop(h, websocket);
        headers::apply_forwarded(h, &forwarded);
        h.remove(API_SECRET);
        strip_session_cookie(h);
        h.remove(header::HOST);
        if route.preserve_host
            && let Some(host) = original_host.as_deref().and_then(|v| HeaderValue::from_str(v).ok())
        {
            h.insert(header::HOST, host);
        }
        let client_cert = conn.certificate.as_deref().map(|c| ClientCert {
            sha256_hex: &c.sha256_hex,
            subject: &c.subject,
            san_uri: c.san_uri.as_deref(),
        });
        let report = headers::set_identity_headers(
            h,
            &IdentityHeaders {
                subject: &identity.subject,
                client_id: Some(identity.client_id.as_str()).filter(|s| !s.is_empty()),
                org: Some(identity.org.as_str()).filter(|s| !s.is_empty()),
                roles: &identity.roles,
                scopes: &identity.scopes,
                auth_method: identity.auth_method.as_str(),
                client_cert,
            },
        );
        if report.subject_missing() {
            return Err(fail(
                log,
                "internal",
                Refusal::new(StatusCode::INTERNAL_SERVER_ERROR, "the caller's identity cannot be sent upstream"),
            ));
        }
        if !report.is_complete() {
            tracing::warn!(omitted = ?report.omitted, "identity values left out of the upstream request");
        }
        let max = usize::try_from(route.max_body_bytes).unwrap_or(usize::MAX);
        let body: Body = Limited::new(body, max).map_err(|e| -> respond::BoxError { e }).boxed();
        let upstream_req = Request::from_parts(parts, body);

        let Some(client) = runtime.client(route.index) else {
            return Err(fail(
                log,
                "internal",
                Refusal::new(StatusCode::INTERNAL_SERVER_ERROR, "route has no upstream"),
            ));
        };
        let mut resp = match tokio::time::timeout(route.timeout, client.request(upstream_req)).await {
            Err(_) => {
                return Err(fail(
                    log,
                    "upstream_timeout",
                    Refusal::new(StatusCode::GATEWAY_TIMEOUT, "the upstream did not answer in time"),
                ));
            }
            Ok(Err(e)) => {
                tracing::debug!(error = ?e, route = %route.path, "upstream request failed");
                return Err(match crate::forward::classify(&e) {
                    UpstreamFailure::BodyTooLarge => fail(
                        log,
                        "too_large",
                        Refusal::new(
                            StatusCode::PAYLOAD_TOO_LARGE,
                            format!("request body exceeds this route's limit of {} bytes", route.max_body_bytes),
                        ),
                    ),
                    UpstreamFailure::Connect => fail(
                        log,
                        "upstream_error",
                        Refusal::new(StatusCode::BAD_GATEWAY, "the upstream could not be reached"),
                    ),
                    UpstreamFailure::Protocol => fail(
                        log,
                        "upstream_error",
                        Refusal::new(StatusCode::BAD_GATEWAY, "the upstream connection failed"),
                    ),
                });
            }
            Ok(Ok(resp)) => resp,
        };
        log.outcome = Some("forwarded");

        if resp.status() == StatusCode::SWITCHING_PROTOCOLS
            && let Some(client_upgrade) = client_upgrade
        {
            let upstream_upgrade = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                match tokio::try_join!(client_upgrade, upstream_upgrade) {
                    Ok((client, upstream)) => {
                        let mut client = TokioIo::new(client);
                        let mut upstream = TokioIo::new(upstream);
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                    }
                    Err(e) => tracing::debug!(error = %e, "WebSocket upgrade failed"),
                }
            });
            let (parts, _) = resp.into_parts();
            return Ok(Response::from_parts(parts, respond::full(Bytes::new())));
        }
        headers::remove_hop_by_hop(resp.headers_mut(), false);
        Ok(resp.map(|b| b.map_err(|e| -> respond::BoxError { Box::new(e) }).boxed()))
    }

    /// The browser sign-in settings: the application and this gateway's public origin.
    fn login_settings(&self, config: &ValidatedConfig) -> Option<(String, String)> {
        let login = config.login();
        let client_id = login.client_id.clone().or_else(|| self.control.own_client_id().map(str::to_owned))?;
        let origin = match &login.public_origin {
            Some(o) => o.clone(),
            None => {
                let name = config.server_names().first()?;
                let host = if name.contains(':') { format!("[{name}]") } else { name.clone() };
                match self.bound_port.load(Ordering::Relaxed) {
                    0 => return None,
                    443 => format!("https://{host}"),
                    port => format!("https://{host}:{port}"),
                }
            }
        };
        Some((client_id, origin))
    }

    /// The redirect (302) that starts a browser sign-in for `req`.
    fn to_sign_in(&self, config: &ValidatedConfig, req: &Request<()>) -> Option<Refusal> {
        let (client_id, origin) = self.login_settings(config)?;
        let back = req.uri().path_and_query().map_or("/", http::uri::PathAndQuery::as_str);
        match login::start(self.control.issuer(), &client_id, &origin, back) {
            Ok(started) => {
                let mut r = Refusal::new(StatusCode::FOUND, "sign-in required: continue at the sign-in page");
                r.location = Some(started.location);
                r.set_cookies.push(started.set_cookie);
                Some(r)
            }
            Err(e) => {
                tracing::error!(error = %e, "could not start a browser sign-in");
                None
            }
        }
    }

    /// `/.portcullis/callback`: the end of a browser sign-in (see [`crate::login`]).
    async fn sign_in_callback(
        &self,
        req: &Request<()>,
        conn: &Connection,
        config: &ValidatedConfig,
    ) -> Result<Response<Body>, Refusal> {
        if req.method() != http::Method::GET {
            let mut r = Refusal::new(StatusCode::METHOD_NOT_ALLOWED, "the sign-in callback takes GET only");
            r.allow = Some("GET".into());
            return Err(r);
        }
        let Some((client_id, origin)) = self.login_settings(config) else {
            return Err(Refusal::new(StatusCode::NOT_FOUND, "browser sign-in is not configured on this gateway"));
        };
        let bad = |m: String| Refusal::new(StatusCode::BAD_REQUEST, m);
        let (code, state, iss) = match login::callback_params(req.uri().query()).map_err(bad)? {
            login::CallbackParams::Code { code, state, iss } => (code, state, iss),
            login::CallbackParams::Refused { error, description, state } => {
                let mut r = Refusal::new(
                    StatusCode::FORBIDDEN,
                    format!(
                        "the sign-in was not completed: {}{}",
                        error.chars().take(64).collect::<String>(),
                        description
                            .map(|d| format!(" ({})", d.chars().take(200).collect::<String>()))
                            .unwrap_or_default()
                    ),
                );
                if let Some(clear) = state.as_deref().and_then(|s| login::clear_flow_cookie(s).ok()) {
                    r.set_cookies.push(clear);
                }
                return Err(r);
            }
        };
        // RFC 9207: an answer that names another issuer is not ours to redeem.
        if iss.as_deref().is_some_and(|i| i != self.control.issuer()) {
            return Err(bad("the sign-in answer names another issuer".into()));
        }
        let Some(flow) = login::flow_of(req.headers(), &state) else {
            return Err(bad(
                "this sign-in was not started in this browser or took longer than 10 minutes: open the page again"
                    .into(),
            ));
        };
        let client_ip =
            headers::forwarded_for(req.headers(), conn.peer.ip(), Proto::Https, None, config.trusted_proxies())
                .client_ip;
        let redirect_uri = format!("{origin}{}", login::CALLBACK_PATH);
        let clear_flow =
            login::clear_flow_cookie(&state).map_err(|e| Refusal::new(StatusCode::INTERNAL_SERVER_ERROR, e))?;
        let verdict = self
            .control
            .browser_session(&client_id, &code, &flow.verifier, &redirect_uri, Some(client_ip))
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "control plane could not finish a browser sign-in");
                unavailable()
            })?;
        let session = match verdict {
            Ok(s) => s,
            Err(ControlRefusal { status, message, retry_after_secs }) => {
                let mut r = match status {
                    429 => too_many(retry_after_secs.unwrap_or(60)),
                    403 => Refusal::new(StatusCode::FORBIDDEN, message),
                    _ => Refusal::new(StatusCode::UNAUTHORIZED, message),
                };
                r.set_cookies.push(clear_flow);
                return Err(r);
            }
        };
        let max_age = session.expires_at - self.clock.now();
        let cookie = login::session_set_cookie(&session.token, max_age)
            .map_err(|e| Refusal::new(StatusCode::INTERNAL_SERVER_ERROR, e))?;
        let mut resp = Response::new(respond::full(Bytes::new()));
        *resp.status_mut() = StatusCode::SEE_OTHER;
        let h = resp.headers_mut();
        if let Ok(v) = HeaderValue::from_str(&flow.return_to) {
            h.insert(header::LOCATION, v);
        }
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        h.append(header::SET_COOKIE, cookie);
        h.append(header::SET_COOKIE, clear_flow);
        Ok(resp)
    }

    /// `/.portcullis/healthz` (alive), `/.portcullis/readyz` (keys, trust, grants and the
    /// server certificate loaded), `/.portcullis/callback` (browser sign-in) and
    /// `/.portcullis/logout` (ends the session cookie, then the control plane's sign-out).
    async fn own_endpoint(
        &self,
        path: &str,
        req: &Request<()>,
        conn: &Connection,
        config: &ValidatedConfig,
    ) -> Result<Response<Body>, Refusal> {
        if path == "callback" {
            return self.sign_in_callback(req, conn, config).await;
        }
        if path == "logout" {
            let mut resp = Response::new(respond::full(Bytes::new()));
            *resp.status_mut() = StatusCode::SEE_OTHER;
            let h = resp.headers_mut();
            let to = format!("{}/oauth2/logout", self.control.issuer().trim_end_matches('/'));
            if let Ok(v) = HeaderValue::from_str(&to) {
                h.insert(header::LOCATION, v);
            }
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            if let Ok(c) = login::clear_session_cookie() {
                h.append(header::SET_COOKIE, c);
            }
            return Ok(resp);
        }
        let text = |status: StatusCode, body: &'static str| {
            let mut r = Response::new(respond::full(body));
            *r.status_mut() = status;
            r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            r
        };
        match path {
            "healthz" => Ok(text(StatusCode::OK, "ok\n")),
            "readyz" if self.is_ready() => Ok(text(StatusCode::OK, "ready\n")),
            "readyz" => Err(Refusal::new(StatusCode::SERVICE_UNAVAILABLE, "the gateway has not loaded its state yet")),
            _ => Err(Refusal::new(StatusCode::NOT_FOUND, "no such gateway endpoint")),
        }
    }

    /// The first credential the route accepts that the request carries. A credential that is
    /// presented and refused ends authentication (no fallback to a weaker one).
    async fn authenticate(
        &self,
        route: &Route,
        req: &Request<()>,
        conn: &Connection,
        client_ip: IpAddr,
    ) -> Result<Who, (&'static str, Refusal)> {
        let h = req.headers();
        let unauthenticated = |message: String, error: Option<(&str, &str)>| {
            ("unauthenticated", Refusal::unauthorized(message, challenge(route, error)))
        };

        if let Some(auth) = h.get(header::AUTHORIZATION) {
            let value = auth.to_str().unwrap_or("");
            let (scheme, token) = value.split_once(' ').unwrap_or((value, ""));
            if !scheme.eq_ignore_ascii_case("bearer") {
                return Err(unauthenticated("only Bearer authorization is accepted".into(), None));
            }
            if !route.accepts(AuthMethod::Bearer) {
                return Err(unauthenticated(not_accepted(route, AuthMethod::Bearer), None));
            }
            let token = token.trim_start_matches(' ');
            let peer = conn.certificate.as_deref().map(|c| &c.sha256);
            return match self.bearer.verify(token, peer).await {
                Ok(verified) => Ok(Who::Token(verified)),
                Err(e) if e.is_unavailable() => Err(("unavailable", unavailable())),
                Err(e) => Err(("unauthenticated", Refusal::unauthorized(e.to_string(), e.www_authenticate()))),
            };
        }

        let key = h.get(API_KEY);
        let secret = h.get(API_SECRET);
        if key.is_some() || secret.is_some() {
            if !route.accepts(AuthMethod::ApiKey) {
                return Err(unauthenticated(not_accepted(route, AuthMethod::ApiKey), None));
            }
            let (Some(key), Some(secret)) = (key.and_then(|v| v.to_str().ok()), secret.and_then(|v| v.to_str().ok()))
            else {
                return Err(unauthenticated("api-key and api-secret must both be sent, as visible ASCII".into(), None));
            };
            let cache_key = credential_key(&[b"api_key", key.as_bytes(), secret.as_bytes()]);
            return self
                .ask(cache_key, AuthMethod::ApiKey, route, self.control.api_key(key, secret, Some(client_ip)))
                .await;
        }

        if let Some(token) = session_cookie(h) {
            if !route.accepts(AuthMethod::Session) {
                return Err(unauthenticated(not_accepted(route, AuthMethod::Session), None));
            }
            let cache_key = credential_key(&[b"session", token.as_bytes()]);
            return self
                .ask(cache_key, AuthMethod::Session, route, self.control.session(&token, Some(client_ip)))
                .await;
        }

        if let Some(cert) = &conn.certificate
            && route.accepts(AuthMethod::Mtls)
        {
            let cache_key = credential_key(&[b"mtls", &cert.sha256]);
            return self.ask(cache_key, AuthMethod::Mtls, route, self.control.certificate(&cert.der)).await;
        }

        Err(unauthenticated(
            format!(
                "authentication required: this route accepts {}",
                route.auth.iter().map(|m| m.as_str()).collect::<Vec<_>>().join(", ")
            ),
            None,
        ))
    }

    /// A control-plane verdict about a credential, cached by `cache_key` when positive.
    async fn ask(
        &self,
        cache_key: [u8; 32],
        method: AuthMethod,
        route: &Route,
        question: impl std::future::Future<Output = Result<crate::control::Verdict, Unavailable>>,
    ) -> Result<Who, (&'static str, Refusal)> {
        if let Some(id) = self.principals.get(&cache_key) {
            return Ok(Who::Principal(id));
        }
        match question.await {
            Ok(Ok(mut id)) => {
                id.auth_method = method;
                id.audiences.clear();
                let id = Arc::new(id);
                self.principals.put(cache_key, id.clone());
                Ok(Who::Principal(id))
            }
            Ok(Err(ControlRefusal { status, message, retry_after_secs })) => Err(match status {
                429 => ("rate_limited", too_many(retry_after_secs.unwrap_or(60))),
                403 => ("forbidden", Refusal::new(StatusCode::FORBIDDEN, message)),
                _ => ("unauthenticated", Refusal::unauthorized(message, challenge(route, None))),
            }),
            Err(e) => {
                tracing::warn!(error = %e, "control plane could not check a credential");
                Err(("unavailable", unavailable()))
            }
        }
    }
}

/// Reads and discards what is left of a refused request's body, up to [`DRAIN_BODY_MAX`] bytes
/// or [`DRAIN_BODY_TIME`]. Over HTTP/2 a stream whose request side is finished ends cleanly,
/// where an unread one is reset; over HTTP/1.1 closing a connection with unread bytes makes the
/// kernel send a reset. Either way a client still sending (curl 7.x) can lose the refusal it
/// was sent. Not done for misframed HTTP/1.1 requests, whose connection is closed instead.
async fn drain(body: &mut Incoming) {
    let deadline = tokio::time::sleep(DRAIN_BODY_TIME);
    tokio::pin!(deadline);
    let mut read = 0usize;
    while read < DRAIN_BODY_MAX && !hyper::body::Body::is_end_stream(body) {
        tokio::select! {
            _ = &mut deadline => break,
            frame = body.frame() => match frame {
                Some(Ok(f)) => read += f.data_ref().map_or(0, Bytes::len),
                _ => break,
            },
        }
    }
}

/// A refusal's body that keeps the request's body alive until the refusal has been sent.
struct Holding {
    inner: Body,
    _held: Incoming,
}

impl hyper::body::Body for Holding {
    type Data = Bytes;
    type Error = respond::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// What the access log and metrics say about one request.
#[derive(Default)]
struct Outcome {
    route: Option<Arc<RouteMetrics>>,
    outcome: Option<&'static str>,
    client_ip: Option<IpAddr>,
    who: Option<Who>,
    error_id: Option<String>,
    error: Option<String>,
}

/// Whether the request carries a credential meant for an API (a bearer token or an API key):
/// such requests get a 401, never the sign-in redirect.
fn carries_api_credential(h: &http::HeaderMap) -> bool {
    h.contains_key(header::AUTHORIZATION) || h.contains_key(API_KEY) || h.contains_key(API_SECRET)
}

/// `session` routes need a sign-in application: the configured one or the gateway's own.
fn check_login(config: &ValidatedConfig, control: &dyn ControlPlane) -> Result<(), String> {
    if config.has_session_routes() && config.login().client_id.is_none() && control.own_client_id().is_none() {
        return Err("routes accept `session` but no sign-in application is set: add [gateway.login] client_id \
                    (an application with the authorization_code grant)"
            .into());
    }
    Ok(())
}

fn too_many(retry_after: u64) -> Refusal {
    Refusal::new(StatusCode::TOO_MANY_REQUESTS, "too many requests; retry later").with_retry_after(Some(retry_after))
}

fn unavailable() -> Refusal {
    Refusal::new(StatusCode::SERVICE_UNAVAILABLE, "the credential cannot be checked right now; retry shortly")
        .with_retry_after(Some(2))
}

fn not_accepted(route: &Route, method: AuthMethod) -> String {
    format!(
        "this route does not accept {method} authentication; it accepts {}",
        route.auth.iter().map(|m| m.as_str()).collect::<Vec<_>>().join(", ")
    )
}

/// The `WWW-Authenticate` challenges for a route's accepted methods.
fn challenge(route: &Route, bearer_error: Option<(&str, &str)>) -> String {
    let mut parts = Vec::new();
    for m in &route.auth {
        match m {
            AuthMethod::Bearer => parts.push(respond::bearer_challenge(bearer_error)),
            AuthMethod::ApiKey => parts.push("ApiKey realm=\"portcullis\"".to_owned()),
            AuthMethod::Session => parts.push("Cookie realm=\"portcullis\"".to_owned()),
            AuthMethod::Mtls => parts.push("ClientCertificate realm=\"portcullis\"".to_owned()),
        }
    }
    parts.join(", ")
}

fn route_refusal(e: &RouteError) -> Refusal {
    match e {
        RouteError::BadPath(p) => Refusal::new(StatusCode::BAD_REQUEST, format!("request path refused: {p}")),
        RouteError::NotFound => Refusal::new(StatusCode::NOT_FOUND, "no route for this path"),
        RouteError::MethodNotAllowed { allow } => {
            let mut r = Refusal::new(StatusCode::METHOD_NOT_ALLOWED, e.to_string());
            r.allow = Some(allow.iter().map(|m| m.as_str().to_owned()).collect::<Vec<_>>().join(", "));
            r
        }
    }
}

/// The request's own host: the `Host` header, or the URI authority (HTTP/2).
fn request_host<B>(req: &Request<B>) -> Option<String> {
    req.headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| req.uri().authority().map(|a| a.as_str().to_owned()))
}

/// The value of the gateway session cookie: the sign-in's `__Host-portcullis_session`, else
/// `portcullis_session`; `None` when neither is sent or the one used is sent twice.
fn session_cookie(h: &http::HeaderMap) -> Option<String> {
    for name in [login::HOST_SESSION_COOKIE, SESSION_COOKIE] {
        let mut values = login::cookies(h).filter(|(n, _)| *n == name).map(|(_, v)| v);
        if let Some(first) = values.next() {
            return values.next().is_none().then(|| first.to_owned());
        }
    }
    None
}

/// Removes the gateway's cookies (session and sign-in flow) from every `Cookie` header (the
/// upstream never sees them).
fn strip_session_cookie(h: &mut http::HeaderMap) {
    let values: Vec<HeaderValue> = h.get_all(header::COOKIE).iter().cloned().collect();
    if values.is_empty() {
        return;
    }
    h.remove(header::COOKIE);
    for v in values {
        let Ok(s) = v.to_str() else { continue };
        let kept: Vec<&str> = s
            .split(';')
            .map(str::trim)
            .filter(|p| !p.is_empty() && p.split_once('=').is_none_or(|(n, _)| !login::is_gateway_cookie(n.trim())))
            .collect();
        if !kept.is_empty()
            && let Ok(v) = HeaderValue::from_str(&kept.join("; "))
        {
            h.append(header::COOKIE, v);
        }
    }
}
