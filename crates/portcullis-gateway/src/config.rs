//! Route configuration: the `[gateway]` table of DESIGN §5 as written in TOML
//! ([`GatewayConfig`], [`RouteConfig`]), its validated form ([`ValidatedConfig`], [`Route`]),
//! request-path checking ([`normalise_path`]) and route selection ([`ValidatedConfig::route`]).
//!
//! Everything here is pure: no I/O (files named in the configuration are only checked for being
//! non-empty, the forwarder reads them), no clock, no HTTP status codes.
//!
//! # Shape
//!
//! ```toml
//! [gateway]
//! listen = "127.0.0.1:8443"
//! server_names = ["localhost"]          # default: localhost, 127.0.0.1, ::1
//! mtls = "optional"                     # "required" | "optional" (default) | "off"
//! trusted_proxies = ["10.0.0.0/8"]      # peers whose x-forwarded-* / forwarded are believed
//!
//! [gateway.login]                       # the browser sign-in of `session` routes
//! client_id = "acme$gateway"            # standalone: defaults to the gateway's own client_id
//! public_url = "https://gw.acme.test"   # default: https:// + first server name + listen port
//!
//! [[gateway.routes]]
//! path = "/payments/"                   # prefix, matched on segment boundaries (below)
//! methods = ["GET", "post"]             # omitted: every method of the fixed set; GET implies HEAD
//! upstream = "https://payments.internal:9001"
//! kind = "rest"                         # "rest" (default) | "soap"
//! auth = ["bearer", "api_key", "mtls"]  # required, non-empty; also "session"
//! require_roles = ["payments:reader"]
//! roles_mode = "any"                    # "any" (default) | "all"
//! require_scopes = ["payments/read"]    # all of them
//! require_permissions = []              # all of them
//! audience = "https://payments.acme.test"   # checked on bearer tokens only
//! timeout_ms = 30000                    # default 30 s
//! connect_timeout_ms = 5000             # default min(5 s, timeout_ms)
//! max_body_bytes = 10485760             # default 10 MiB; 0 = requests without a body only
//! rate_limit = { per_identity = 600, per_ip = 1200 }   # requests per minute; each optional
//! upstream_ca_file = "/etc/portcullis/payments-ca.pem" # https upstreams: pin this CA
//! upstream_client_certificate = true   # https upstreams: present the platform transport certificate
//! preserve_host = false                 # default: the upstream's authority is sent as Host
//! ```
//!
//! Unknown keys are errors at every level. [`GatewayConfig::validate`] turns the raw form into a
//! [`ValidatedConfig`]; its [`ConfigError`] names the route (index in the file, counted from 0,
//! and path), the field and the expected form.
//!
//! # Route paths and matching
//!
//! A route `path` is a prefix made of `A-Z a-z 0-9 - . _ ~` and `/`: it starts with `/`, and has
//! no `%`, query, `;`, empty segment (`//`) or `.`/`..` segment. Matching is on **segment
//! boundaries**:
//!
//! * a prefix ending in `/` (`/payments/`) matches every path starting with it: `/payments/` and
//!   `/payments/x`, but not `/payments`;
//! * a prefix without the trailing `/` (`/payments`) matches exactly `/payments` and everything
//!   under `/payments/`, never `/paymentsX`;
//! * `/` matches every path.
//!
//! The longest matching prefix wins. Among the routes with that prefix the method decides; if none
//! of them accepts the method the answer is [`RouteError::MethodNotAllowed`] — there is **no
//! fallback** to a shorter prefix, so a `GET`-only route under a permissive `/` route cannot be
//! reached with `DELETE` through the `/` route's policy. Matching is **case-sensitive**
//! (RFC 3986): `/Payments` does not match `/payments/`.
//!
//! # Request paths
//!
//! [`normalise_path`] does not rewrite anything: it refuses every path that has another spelling
//! an upstream could resolve differently from the gateway, so the bytes matched are the bytes
//! forwarded. See its documentation for the exact rules. What it cannot know is an upstream's own
//! canonicalisation beyond RFC 3986: an upstream that folds case (IIS, ASP.NET), strips trailing
//! dots or spaces, or decodes twice must not sit behind a route whose path differs only in that way
//! from a stricter one.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use http::Method;
use portcullis_core::ids::{PermissionName, RoleName, ScopeName};
use serde::{Deserialize, Serialize};

use crate::headers::{IpNet, is_trusted_proxy};

/// Default `timeout_ms`: 30 seconds.
pub const DEFAULT_TIMEOUT_MS: u64 = 30_000;
/// Default `connect_timeout_ms` (capped at `timeout_ms`).
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 5_000;
/// Largest `timeout_ms` / `connect_timeout_ms`: one hour.
pub const MAX_TIMEOUT_MS: u64 = 3_600_000;
/// Default `max_body_bytes`: 10 MiB.
pub const DEFAULT_MAX_BODY_BYTES: u64 = 10 * 1024 * 1024;
/// Largest `rate_limit.per_identity` / `rate_limit.per_ip` (requests per minute).
pub const MAX_RATE_PER_MINUTE: u32 = 1_000_000;
/// Longest route path, in bytes.
pub const MAX_ROUTE_PATH_LEN: usize = 1024;

// ---- the raw form (serde) -------------------------------------------------------------------

/// The `[gateway]` table as written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// `ADDR:PORT` of the TLS listener; port 0 picks a free one.
    pub listen: String,
    /// Host names (or IP addresses) the listener's server certificate is issued for.
    #[serde(default = "default_server_names")]
    pub server_names: Vec<String>,
    /// Client certificates on the listener.
    #[serde(default)]
    pub mtls: MtlsMode,
    /// Peers (CIDRs, or single addresses) whose `x-forwarded-*` / `forwarded` headers are believed.
    /// Empty (default): such headers from clients are never believed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trusted_proxies: Vec<String>,
    /// `[gateway.login]`: the browser sign-in of `session` routes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub login: Option<LoginConfig>,
    /// `[[gateway.routes]]`, in file order.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
}

/// `[gateway.login]` as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginConfig {
    /// The application (`org$app`) whose authorization codes the gateway redeems: enabled,
    /// with the `authorization_code` grant and `<public_url>/.portcullis/callback` among its
    /// redirect URIs. Omitted: a standalone gateway's own `client_id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// The gateway's origin as browsers reach it (`https://host[:port]`, no path). Omitted:
    /// `https://` + the first of `server_names` + the listen port (left out when 443).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_url: Option<String>,
}

fn default_server_names() -> Vec<String> {
    vec!["localhost".into(), "127.0.0.1".into(), "::1".into()]
}

/// One `[[gateway.routes]]` entry as written. Methods and authentication methods are strings
/// here so that [`GatewayConfig::validate`] can name the route in its error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub path: String,
    /// Omitted: every method of [`KNOWN_METHODS`]. Present: non-empty, any letter case.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub methods: Option<Vec<String>>,
    pub upstream: String,
    #[serde(default)]
    pub kind: RouteKind,
    /// Accepted authentication methods: `bearer`, `api_key`, `mtls`, `session`.
    pub auth: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub require_roles: Vec<String>,
    #[serde(default)]
    pub roles_mode: RolesMode,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub require_scopes: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub require_permissions: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout_ms: Option<u64>,
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: u64,
    #[serde(default)]
    pub rate_limit: RateLimitConfig,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_ca_file: Option<PathBuf>,
    #[serde(default)]
    pub upstream_client_certificate: bool,
    #[serde(default)]
    pub preserve_host: bool,
}

fn default_timeout_ms() -> u64 {
    DEFAULT_TIMEOUT_MS
}
fn default_max_body_bytes() -> u64 {
    DEFAULT_MAX_BODY_BYTES
}

/// `rate_limit = { per_identity = N, per_ip = M }`: requests per minute, each optional (omitted:
/// no limit of that kind). "Identity" is the authenticated subject within its organisation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_identity: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_ip: Option<u32>,
}

/// `mtls` on the listener.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MtlsMode {
    /// The handshake fails without a valid client certificate.
    Required,
    /// A client certificate is verified when presented; routes decide whether they need one.
    #[default]
    Optional,
    /// No client certificates are asked for; no route may accept `mtls`.
    Off,
}

/// What the upstream speaks; decides the error body (a SOAP Fault on `soap` routes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RouteKind {
    #[default]
    Rest,
    Soap,
}

/// How `require_roles` is read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RolesMode {
    /// At least one of the listed roles (DESIGN §5's reading of `require_roles`).
    #[default]
    Any,
    /// Every listed role.
    All,
}

/// A way a request proves who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMethod {
    /// `Authorization: Bearer <JWT access token>`.
    Bearer,
    /// `api-key` + `api-secret` headers.
    ApiKey,
    /// A verified client certificate on the listener, alone.
    Mtls,
    /// A browser session cookie.
    Session,
}

impl AuthMethod {
    pub const ALL: [AuthMethod; 4] = [AuthMethod::Bearer, AuthMethod::ApiKey, AuthMethod::Mtls, AuthMethod::Session];

    /// The configuration spelling (`bearer`, `api_key`, `mtls`, `session`).
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::Bearer => "bearer",
            AuthMethod::ApiKey => "api_key",
            AuthMethod::Mtls => "mtls",
            AuthMethod::Session => "session",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        AuthMethod::ALL.into_iter().find(|m| m.as_str() == s)
    }
}

impl fmt::Display for AuthMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// ---- methods --------------------------------------------------------------------------------

/// The methods a route can name. Anything else (`TRACE`, `CONNECT`, extension methods) is never
/// routed.
pub const KNOWN_METHODS: [Method; 7] =
    [Method::GET, Method::HEAD, Method::POST, Method::PUT, Method::PATCH, Method::DELETE, Method::OPTIONS];

/// A set of [`KNOWN_METHODS`]. The sets held by a [`Route`] are effective: `HEAD` is in every set
/// that has `GET`.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct MethodSet(u8);

impl MethodSet {
    pub const EMPTY: MethodSet = MethodSet(0);
    pub const ALL: MethodSet = MethodSet(0b111_1111);

    fn bit(m: &Method) -> Option<u8> {
        KNOWN_METHODS.iter().position(|k| k == m).map(|i| 1u8 << i)
    }
    pub fn contains(self, m: &Method) -> bool {
        Self::bit(m).is_some_and(|b| self.0 & b != 0)
    }
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
    #[must_use]
    pub fn with(self, m: &Method) -> MethodSet {
        MethodSet(self.0 | Self::bit(m).unwrap_or(0))
    }
    #[must_use]
    pub fn union(self, other: MethodSet) -> MethodSet {
        MethodSet(self.0 | other.0)
    }
    #[must_use]
    pub fn intersection(self, other: MethodSet) -> MethodSet {
        MethodSet(self.0 & other.0)
    }
    /// In the order of [`KNOWN_METHODS`].
    pub fn iter(self) -> impl Iterator<Item = Method> {
        KNOWN_METHODS.into_iter().filter(move |m| self.contains(m))
    }
}

/// `GET, HEAD, POST`: the form of an `Allow` header.
impl fmt::Display for MethodSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for m in self.iter() {
            if !first {
                f.write_str(", ")?;
            }
            first = false;
            f.write_str(m.as_str())?;
        }
        Ok(())
    }
}

impl fmt::Debug for MethodSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MethodSet[{self}]")
    }
}

// ---- the validated form ---------------------------------------------------------------------

/// Where an upstream lives. The URI is absolute `http` or `https`, without userinfo, query or
/// fragment, with a host and a port of 1 to 65535 if one is given; its path is `/` or a prefix
/// with the same character rules as a route path. How that path is joined with the request's is
/// the forwarder's to define (not decided yet); the scheme's letter case is not significant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    pub uri: http::Uri,
    pub https: bool,
}

/// Requests per minute; `None`: no limit of that kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateLimit {
    pub per_identity: Option<u32>,
    pub per_ip: Option<u32>,
}

/// A validated route. Only [`GatewayConfig::validate`] makes them (outside this crate).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Route {
    /// Position in the file's `[[gateway.routes]]`, from 0.
    pub index: usize,
    pub path: String,
    /// Effective methods (`HEAD` wherever `GET` is).
    pub methods: MethodSet,
    pub upstream: Upstream,
    pub kind: RouteKind,
    /// Non-empty, no duplicates, in file order.
    pub auth: Vec<AuthMethod>,
    pub require_roles: Vec<RoleName>,
    pub roles_mode: RolesMode,
    /// All of them.
    pub require_scopes: Vec<ScopeName>,
    /// All of them.
    pub require_permissions: Vec<PermissionName>,
    /// Required in a bearer token's `aud`; other authentication methods carry no audience.
    pub audience: Option<String>,
    /// Deadline for the upstream's response head, counted from the start of the upstream request
    /// (connect included). Streamed bodies and upgraded connections are not cut by it.
    pub timeout: Duration,
    /// Deadline for the upstream connection (TCP and TLS); never above `timeout`.
    pub connect_timeout: Duration,
    pub max_body_bytes: u64,
    pub rate_limit: RateLimit,
    /// PEM file of the CA the upstream's certificate must chain to (https only). `None`: the
    /// platform's own CA.
    pub upstream_ca_file: Option<PathBuf>,
    /// Present the platform transport certificate to the upstream (https only).
    pub upstream_client_certificate: bool,
    /// Forward the client's `Host` instead of the upstream's authority.
    pub preserve_host: bool,
}

impl Route {
    pub fn accepts(&self, method: AuthMethod) -> bool {
        self.auth.contains(&method)
    }
    /// Whether this route's prefix covers `path` (an already checked request path).
    pub fn matches_path(&self, path: &str) -> bool {
        prefix_matches(&self.path, path)
    }
}

fn prefix_matches(prefix: &str, path: &str) -> bool {
    path.strip_prefix(prefix).is_some_and(|rest| prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'))
}

/// The gateway configuration after [`GatewayConfig::validate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidatedConfig {
    listen: SocketAddr,
    server_names: Vec<String>,
    mtls: MtlsMode,
    trusted_proxies: Vec<IpNet>,
    login: Login,
    /// In file order.
    routes: Vec<Route>,
    /// Indices into `routes`, longest path first, then by path, then file order.
    by_length: Vec<usize>,
}

/// `[gateway.login]`, checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Login {
    /// `org$app`, when configured.
    pub client_id: Option<String>,
    /// `https://host[:port]`, lower-cased, no trailing `/`, when configured.
    pub public_origin: Option<String>,
}

/// Why [`ValidatedConfig::route`] found no route.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// The path is refused outright (400).
    #[error(transparent)]
    BadPath(#[from] PathError),
    /// No route's prefix covers the path (404).
    #[error("no route for this path")]
    NotFound,
    /// The longest matching prefix has routes, none for this method (405 with `Allow`).
    #[error("method not allowed on this route; allowed: {allow}")]
    MethodNotAllowed { allow: MethodSet },
}

impl ValidatedConfig {
    pub fn listen(&self) -> SocketAddr {
        self.listen
    }
    /// Lower-cased, no duplicates.
    pub fn server_names(&self) -> &[String] {
        &self.server_names
    }
    pub fn mtls(&self) -> MtlsMode {
        self.mtls
    }
    pub fn trusted_proxies(&self) -> &[IpNet] {
        &self.trusted_proxies
    }
    pub fn login(&self) -> &Login {
        &self.login
    }
    /// Whether any route accepts browser sessions (and so needs the sign-in flow).
    pub fn has_session_routes(&self) -> bool {
        self.routes.iter().any(|r| r.accepts(AuthMethod::Session))
    }
    pub fn is_trusted_proxy(&self, peer: IpAddr) -> bool {
        is_trusted_proxy(peer, &self.trusted_proxies)
    }
    /// In file order.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The route for a request: `raw_path` is the request's path as received (no query), checked
    /// with [`normalise_path`] first. Longest prefix on segment boundaries, then method; no
    /// fallback to a shorter prefix when the method does not match (see the module docs).
    pub fn route(&self, method: &Method, raw_path: &str) -> Result<&Route, RouteError> {
        let path = normalise_path(raw_path)?;
        let mut candidates = self.by_length.iter().filter_map(|&i| self.routes.get(i));
        let Some(first) = candidates.by_ref().find(|r| r.matches_path(path)) else {
            return Err(RouteError::NotFound);
        };
        if first.methods.contains(method) {
            return Ok(first);
        }
        let mut allow = first.methods;
        // Routes with the same path are adjacent in `by_length`.
        for r in candidates.take_while(|r| r.path == first.path) {
            if r.methods.contains(method) {
                return Ok(r);
            }
            allow = allow.union(r.methods);
        }
        Err(RouteError::MethodNotAllowed { allow })
    }
}

// ---- errors ---------------------------------------------------------------------------------

/// A refused configuration: where (`gateway.<field>` or the route's index, path and field) and
/// what was expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// `Some((index, path))` for a route's field.
    pub route: Option<(usize, String)>,
    /// The key, e.g. `methods` or `rate_limit.per_ip`.
    pub field: &'static str,
    /// What is wrong and the expected form.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.route {
            Some((i, path)) => {
                write!(f, "gateway.routes[{i}] (path {:?}): {}: {}", truncate(path), self.field, self.message)
            }
            None => write!(f, "gateway.{}: {}", self.field, self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

/// Keeps messages short when the input is huge.
fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

// ---- validation -----------------------------------------------------------------------------

impl GatewayConfig {
    /// Checks everything and builds the matching table. The first problem found is returned.
    pub fn validate(&self) -> Result<ValidatedConfig, ConfigError> {
        let top = |field: &'static str, message: String| ConfigError { route: None, field, message };
        let listen: SocketAddr = self.listen.parse().map_err(|_| {
            top(
                "listen",
                format!("invalid address {:?}: expected ADDR:PORT, e.g. 127.0.0.1:8443", truncate(&self.listen)),
            )
        })?;
        if self.server_names.is_empty() {
            return Err(top("server_names", "expected at least one host name or IP address".into()));
        }
        let mut server_names: Vec<String> = Vec::with_capacity(self.server_names.len());
        for n in &self.server_names {
            let n = check_server_name(n).map_err(|m| top("server_names", m))?;
            if server_names.contains(&n) {
                return Err(top("server_names", format!("{n:?} is listed twice")));
            }
            server_names.push(n);
        }
        let mut trusted_proxies = Vec::with_capacity(self.trusted_proxies.len());
        for p in &self.trusted_proxies {
            let c: IpNet =
                p.parse().map_err(|e| top("trusted_proxies", format!("invalid network {:?}: {e}", truncate(p))))?;
            if trusted_proxies.contains(&c) {
                return Err(top("trusted_proxies", format!("{c} is listed twice")));
            }
            trusted_proxies.push(c);
        }

        let login = match &self.login {
            None => Login::default(),
            Some(l) => Login {
                client_id: l
                    .client_id
                    .as_deref()
                    .map(check_client_id)
                    .transpose()
                    .map_err(|m| top("login.client_id", m))?,
                public_origin: l
                    .public_url
                    .as_deref()
                    .map(check_public_origin)
                    .transpose()
                    .map_err(|m| top("login.public_url", m))?,
            },
        };

        let mut routes: Vec<Route> = Vec::with_capacity(self.routes.len());
        for (index, rc) in self.routes.iter().enumerate() {
            let route = rc.validate(index, self.mtls)?;
            // Two routes with the same prefix must not share a method (GET implies HEAD).
            if let Some(other) =
                routes.iter().find(|o| o.path == route.path && !o.methods.intersection(route.methods).is_empty())
            {
                let both = other.methods.intersection(route.methods);
                let implied = both.iter().all(|m| m == Method::HEAD);
                return Err(ConfigError {
                    route: Some((index, rc.path.clone())),
                    field: "methods",
                    message: format!(
                        "{both} on {:?} {} already routed by gateway.routes[{}]{}",
                        route.path,
                        if both.iter().count() == 1 { "is" } else { "are" },
                        other.index,
                        if implied { " (GET implies HEAD)" } else { "" }
                    ),
                });
            }
            routes.push(route);
        }
        let mut by_length: Vec<usize> = (0..routes.len()).collect();
        by_length.sort_by(|&a, &b| {
            let (ra, rb) = (routes.get(a), routes.get(b));
            let key = |r: Option<&Route>| r.map(|r| (std::cmp::Reverse(r.path.len()), r.path.clone(), r.index));
            key(ra).cmp(&key(rb))
        });
        Ok(ValidatedConfig { listen, server_names, mtls: self.mtls, trusted_proxies, login, routes, by_length })
    }
}

impl RouteConfig {
    fn validate(&self, index: usize, listener_mtls: MtlsMode) -> Result<Route, ConfigError> {
        let err = |field: &'static str, message: String| ConfigError {
            route: Some((index, self.path.clone())),
            field,
            message,
        };

        check_route_path(&self.path).map_err(|m| err("path", m))?;

        let methods = match &self.methods {
            None => MethodSet::ALL,
            Some(list) if list.is_empty() => {
                return Err(err("methods", "expected at least one method; omit `methods` to allow all".into()));
            }
            Some(list) => {
                let mut set = MethodSet::EMPTY;
                for m in list {
                    let upper = m.to_ascii_uppercase();
                    let Some(method) = KNOWN_METHODS.into_iter().find(|k| k.as_str() == upper) else {
                        return Err(err(
                            "methods",
                            format!("invalid method {:?}: expected one of {}", truncate(m), MethodSet::ALL),
                        ));
                    };
                    if set.contains(&method) {
                        return Err(err("methods", format!("{method} is listed twice")));
                    }
                    set = set.with(&method);
                }
                if set.contains(&Method::GET) { set.with(&Method::HEAD) } else { set }
            }
        };

        let upstream = check_upstream(&self.upstream).map_err(|m| err("upstream", m))?;

        if self.auth.is_empty() {
            return Err(err("auth", "expected at least one of bearer, api_key, mtls, session".into()));
        }
        let mut auth = Vec::with_capacity(self.auth.len());
        for a in &self.auth {
            let Some(m) = AuthMethod::parse(a) else {
                return Err(err(
                    "auth",
                    format!(
                        "invalid authentication method {:?}: expected bearer, api_key, mtls or session",
                        truncate(a)
                    ),
                ));
            };
            if auth.contains(&m) {
                return Err(err("auth", format!("{m} is listed twice")));
            }
            auth.push(m);
        }
        if auth.contains(&AuthMethod::Mtls) && listener_mtls == MtlsMode::Off {
            return Err(err(
                "auth",
                "mtls needs client certificates on the listener: set gateway.mtls to \"optional\" or \"required\""
                    .into(),
            ));
        }

        let require_roles = parse_all(&self.require_roles, RoleName::parse).map_err(|m| err("require_roles", m))?;
        let require_scopes = parse_all(&self.require_scopes, ScopeName::parse).map_err(|m| err("require_scopes", m))?;
        let require_permissions =
            parse_all(&self.require_permissions, PermissionName::parse).map_err(|m| err("require_permissions", m))?;

        if let Some(a) = &self.audience {
            check_audience(a).map_err(|m| err("audience", m))?;
        }

        if !(1..=MAX_TIMEOUT_MS).contains(&self.timeout_ms) {
            return Err(err("timeout_ms", format!("expected 1 to {MAX_TIMEOUT_MS} milliseconds")));
        }
        let connect_timeout_ms = match self.connect_timeout_ms {
            None => DEFAULT_CONNECT_TIMEOUT_MS.min(self.timeout_ms),
            Some(c) if (1..=self.timeout_ms).contains(&c) => c,
            Some(_) => {
                return Err(err(
                    "connect_timeout_ms",
                    format!("expected 1 to {} milliseconds (at most timeout_ms)", self.timeout_ms),
                ));
            }
        };

        let rate = |field: &'static str, v: Option<u32>| match v {
            Some(n) if !(1..=MAX_RATE_PER_MINUTE).contains(&n) => Err(err(
                field,
                format!("expected 1 to {MAX_RATE_PER_MINUTE} requests per minute; omit it for no limit"),
            )),
            _ => Ok(v),
        };
        let rate_limit = RateLimit {
            per_identity: rate("rate_limit.per_identity", self.rate_limit.per_identity)?,
            per_ip: rate("rate_limit.per_ip", self.rate_limit.per_ip)?,
        };

        if let Some(f) = &self.upstream_ca_file {
            if !upstream.https {
                return Err(err("upstream_ca_file", "needs an https upstream".into()));
            }
            if f.as_os_str().is_empty() {
                return Err(err("upstream_ca_file", "expected the path of a PEM file".into()));
            }
        }
        if self.upstream_client_certificate && !upstream.https {
            return Err(err("upstream_client_certificate", "needs an https upstream".into()));
        }

        Ok(Route {
            index,
            path: self.path.clone(),
            methods,
            upstream,
            kind: self.kind,
            auth,
            require_roles,
            roles_mode: self.roles_mode,
            require_scopes,
            require_permissions,
            audience: self.audience.clone(),
            timeout: Duration::from_millis(self.timeout_ms),
            connect_timeout: Duration::from_millis(connect_timeout_ms),
            max_body_bytes: self.max_body_bytes,
            rate_limit,
            upstream_ca_file: self.upstream_ca_file.clone(),
            upstream_client_certificate: self.upstream_client_certificate,
            preserve_host: self.preserve_host,
        })
    }
}

/// Parses each item with the core's parser (its message names the expected form); duplicates
/// are refused.
fn parse_all<T: PartialEq + fmt::Display>(
    items: &[String],
    parse: impl Fn(&str) -> portcullis_core::Result<T>,
) -> Result<Vec<T>, String> {
    let mut out: Vec<T> = Vec::with_capacity(items.len());
    for s in items {
        let v = parse(s).map_err(|e| e.to_string())?;
        if out.contains(&v) {
            return Err(format!("{v} is listed twice"));
        }
        out.push(v);
    }
    Ok(out)
}

const ROUTE_PATH_FORM: &str = "expected a path prefix of A-Z a-z 0-9 - . _ ~ and /, starting with /, e.g. /payments/";

fn check_route_path(p: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("invalid path {:?}: {why}; {ROUTE_PATH_FORM}", truncate(p)));
    if !p.starts_with('/') {
        return bad("it must start with /");
    }
    if p.len() > MAX_ROUTE_PATH_LEN {
        return bad(&format!("longer than {MAX_ROUTE_PATH_LEN} bytes"));
    }
    if p.contains('?') || p.contains('#') {
        return bad("no query or fragment");
    }
    if p.contains('%') {
        return bad("no percent-encoding");
    }
    if p.contains("//") {
        return bad("no empty segments (//)");
    }
    if p.split('/').any(|s| s == "." || s == "..") {
        return bad("no . or .. segments");
    }
    if !p.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._~/".contains(&b)) {
        return bad("unexpected character");
    }
    Ok(())
}

fn check_upstream(u: &str) -> Result<Upstream, String> {
    let form =
        "expected an absolute http:// or https:// URL without user, query or fragment, e.g. http://127.0.0.1:9001";
    let bad = |why: &str| Err(format!("invalid upstream {:?}: {why}; {form}", truncate(u)));
    let Some((scheme, rest)) = u.split_once("://") else {
        return bad("no scheme");
    };
    let https = match scheme.to_ascii_lowercase().as_str() {
        "http" => false,
        "https" => true,
        _ => return bad("the scheme must be http or https"),
    };
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.contains('@') {
        return bad("no user information");
    }
    if u.contains('?') {
        return bad("no query");
    }
    if u.contains('#') {
        return bad("no fragment");
    }
    if u.bytes().any(|b| !b.is_ascii_graphic()) {
        return bad("unexpected character");
    }
    // `http::Uri` is lenient about the authority (`a:x`, `a:99999` and `a:` all parse): check it here.
    let (host, port) = match authority.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((ip, port)) if ip.parse::<std::net::Ipv6Addr>().is_ok() => (ip, port),
            _ => return bad("invalid IPv6 address"),
        },
        None => authority.find(':').and_then(|i| authority.split_at_checked(i)).unwrap_or((authority, "")),
    };
    if host.is_empty() {
        return bad("no host");
    }
    if !authority.starts_with('[') && !host.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b)) {
        return bad("invalid host");
    }
    if !port.is_empty() {
        let ok = port
            .strip_prefix(':')
            .filter(|p| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|p| p.parse::<u16>().ok())
            .is_some_and(|p| p != 0);
        if !ok {
            return bad("the port must be 1 to 65535");
        }
    }
    let uri: http::Uri = match u.parse() {
        Ok(uri) => uri,
        Err(_) => return bad("not a URL"),
    };
    let path = uri.path();
    if path != "/" && !path.is_empty() {
        check_route_path(path).map_err(|m| format!("{m} (the upstream's path)"))?;
    }
    Ok(Upstream { uri, https })
}

/// Audiences are absolute URIs (RFC 8707 §2), the same rule as the control plane's services: a
/// scheme, no fragment, no whitespace, at most 512 bytes.
fn check_audience(a: &str) -> Result<(), String> {
    let scheme_ok = a.split_once(':').is_some_and(|(s, rest)| {
        s.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
            && s.chars().all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
            && !rest.is_empty()
    });
    if !scheme_ok || a.len() > 512 || a.contains('#') || a.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "invalid audience {:?}: expected an absolute URI without fragment, e.g. https://payments.example.com",
            truncate(a)
        ));
    }
    Ok(())
}

/// A DNS name (letters, digits, `-`, dots; no wildcard) or an IP address; lower-cased.
fn check_server_name(n: &str) -> Result<String, String> {
    if n.parse::<IpAddr>().is_ok() {
        return Ok(n.to_owned());
    }
    let lower = n.to_ascii_lowercase();
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if lower.len() <= 253 && lower.split('.').all(label_ok) {
        Ok(lower)
    } else {
        Err(format!(
            "invalid server name {:?}: expected a DNS name (letters, digits, - and dots, no wildcard) or an IP address",
            truncate(n)
        ))
    }
}

/// A client id `org$app`: two slugs (lower-case letters, digits, `-`; 1–63 characters each).
fn check_client_id(id: &str) -> Result<String, String> {
    let slug = |s: &str| {
        !s.is_empty()
            && s.len() <= 63
            && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !s.starts_with('-')
    };
    match id.split_once('$') {
        Some((org, app)) if slug(org) && slug(app) => Ok(id.to_owned()),
        _ => Err(format!("invalid client id {:?}: expected org$app (e.g. acme$gateway)", truncate(id))),
    }
}

/// An origin `https://host[:port]`: https only, a host name or IP literal, no user, path (but
/// a lone `/`), query or fragment. Lower-cased, without the trailing `/`.
fn check_public_origin(url: &str) -> Result<String, String> {
    let expected = || format!("invalid public_url {:?}: expected https://host[:port] with no path", truncate(url));
    let lower = url.to_ascii_lowercase();
    let rest = lower.strip_prefix("https://").ok_or_else(expected)?;
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.is_empty() || authority.contains(['/', '?', '#', '@', '\\', ' ']) || authority.len() > 260 {
        return Err(expected());
    }
    let (host, port) = match authority.strip_prefix('[') {
        Some(v6) => {
            let (addr, after) = v6.split_once(']').ok_or_else(expected)?;
            addr.parse::<std::net::Ipv6Addr>().map_err(|_| expected())?;
            (None, after.strip_prefix(':'))
        }
        None => match authority.split_once(':') {
            Some((h, p)) => (Some(h), Some(p)),
            None => (Some(authority), None),
        },
    };
    if let Some(h) = host {
        check_server_name(h).map_err(|_| expected())?;
    }
    if let Some(p) = port
        && !p.parse::<u16>().is_ok_and(|p| p > 0)
    {
        return Err(expected());
    }
    Ok(format!("https://{authority}"))
}

// ---- request paths --------------------------------------------------------------------------

/// Why a request path was refused (400). The messages are fit for `x-error`; they never echo
/// the path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("invalid request path: it must start with /")]
    NotAbsolute,
    #[error("invalid request path: a query or fragment is not part of the path")]
    QueryOrFragment,
    #[error("invalid request path: empty segment (//)")]
    EmptySegment,
    #[error("invalid request path: . or .. segment")]
    DotSegment,
    #[error("invalid request path: backslash")]
    Backslash,
    #[error("invalid request path: path parameters (;) are not accepted")]
    PathParameter,
    #[error("invalid request path: encoded / or \\ (%2F, %5C)")]
    EncodedSeparator,
    #[error("invalid request path: a letter, digit or one of - . _ ~ is percent-encoded")]
    EncodedUnreserved,
    #[error("invalid request path: malformed percent-encoding")]
    BadPercentEncoding,
    #[error("invalid request path: control character")]
    ControlCharacter,
    #[error("invalid request path: character not allowed in a path")]
    ForbiddenCharacter,
    #[error("invalid request path: percent-encoded bytes are not UTF-8")]
    InvalidUtf8,
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Checks a request path (the path component only, as received) and returns it unchanged, or
/// refuses it. There is no rewriting: a path passes only if no other spelling of it exists that
/// an RFC 3986 (or servlet-style) upstream could resolve differently, so the bytes routed on are
/// the bytes forwarded. Refused:
///
/// * anything not starting with `/` (including `*` and absolute-form targets);
/// * `?` and `#` (the caller passes the path without the query);
/// * empty segments (`//`, but a trailing `/` is fine) and `.` / `..` segments;
/// * `\` and `;` — `;` because servlet containers strip path parameters before routing
///   (`/admin;x` is `/admin` there, `/..;/admin` climbs), so they are never treated literally;
/// * control characters and non-ASCII bytes, raw or percent-encoded (`%00`–`%1F`, `%7F`);
/// * characters outside RFC 3986 `pchar` other than `[ ] | ^` (which browsers send raw): space,
///   `"`, `<`, `>`, `` ` ``, `{`, `}`;
/// * malformed `%` escapes; `%2F` and `%5C` (encoded separators, any case); a percent-encoded
///   unreserved character (`%2E`, `%41`, …), which RFC 3986 says is the same as the character and
///   which would spell a route's prefix or a dot segment differently;
/// * percent-encoded bytes that do not decode to UTF-8 (overlong `/` such as `%C0%AF`).
///
/// Other escapes (`%20`, `%25`, `%3B`, `%C3%A9`, …) stay as they are: no route path contains
/// them, so they cannot change which route matches. `%25` (a literal `%`) is accepted; an
/// upstream that decodes twice is outside what the gateway can protect.
///
/// Letter case is significant: `/Payments` is another path than `/payments`.
pub fn normalise_path(raw: &str) -> Result<&str, PathError> {
    let b = raw.as_bytes();
    if b.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    let mut encoded_high = false;
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        match c {
            b'%' => {
                let (Some(h), Some(l)) = (b.get(i + 1).copied().and_then(hex), b.get(i + 2).copied().and_then(hex))
                else {
                    return Err(PathError::BadPercentEncoding);
                };
                let v = (h << 4) | l;
                match v {
                    b'/' | b'\\' => return Err(PathError::EncodedSeparator),
                    0..=0x1f | 0x7f => return Err(PathError::ControlCharacter),
                    v if is_unreserved(v) => return Err(PathError::EncodedUnreserved),
                    0x80.. => encoded_high = true,
                    _ => {}
                }
                i += 3;
                continue;
            }
            b'?' | b'#' => return Err(PathError::QueryOrFragment),
            b'\\' => return Err(PathError::Backslash),
            b';' => return Err(PathError::PathParameter),
            0..=0x1f | 0x7f => return Err(PathError::ControlCharacter),
            c if is_unreserved(c) => {}
            b'/' | b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b'=' | b':' | b'@' => {}
            b'[' | b']' | b'|' | b'^' => {}
            _ => return Err(PathError::ForbiddenCharacter),
        }
        i += 1;
    }
    let mut segments = raw.split('/').skip(1).peekable();
    while let Some(s) = segments.next() {
        if s.is_empty() && segments.peek().is_some() {
            return Err(PathError::EmptySegment);
        }
        if s == "." || s == ".." {
            return Err(PathError::DotSegment);
        }
    }
    if encoded_high && std::str::from_utf8(&percent_decode(b)).is_err() {
        return Err(PathError::InvalidUtf8);
    }
    Ok(raw)
}

/// Decodes `%XX` escapes (already checked to be well-formed).
fn percent_decode(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        if c == b'%'
            && let (Some(h), Some(l)) = (b.get(i + 1).copied().and_then(hex), b.get(i + 2).copied().and_then(hex))
        {
            out.push((h << 4) | l);
            i += 3;
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

    use super::*;

    fn parse(toml_text: &str) -> GatewayConfig {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct File {
            gateway: GatewayConfig,
        }
        toml::from_str::<File>(toml_text).unwrap().gateway
    }

    fn validated(toml_text: &str) -> ValidatedConfig {
        parse(toml_text).validate().unwrap()
    }

    /// The error for a config with one route made of `route_lines` (plus `path`, `upstream`, `auth`
    /// unless given).
    fn route_error(route_lines: &str) -> String {
        let mut lines = String::from("[gateway]\nlisten = \"127.0.0.1:8443\"\n[[gateway.routes]]\n");
        for (key, default) in [
            ("path", "path = \"/p/\""),
            ("upstream", "upstream = \"http://127.0.0.1:9001\""),
            ("auth", "auth = [\"bearer\"]"),
        ] {
            if !route_lines.lines().any(|l| l.trim_start().starts_with(&format!("{key} ="))) {
                lines.push_str(default);
                lines.push('\n');
            }
        }
        lines.push_str(route_lines);
        parse(&lines).validate().unwrap_err().to_string()
    }

    const DESIGN_EXAMPLE: &str = r#"
        [gateway]
        listen = "127.0.0.1:8443"        # TLS, server certificate issued by our CA
        server_names = ["localhost"]
        mtls = "optional"                # "required" | "optional" | "off"

        [[gateway.routes]]
        path = "/payments/"              # prefix match
        methods = ["GET", "POST"]        # omitted: all
        upstream = "http://127.0.0.1:9001"
        kind = "rest"                    # "rest" | "soap"
        auth = ["bearer", "api_key", "mtls"]   # also "session" for browser routes
        require_roles = ["payments:reader"]    # any of them
        require_scopes = ["payments/read"]     # all of them
        require_permissions = []
        audience = "https://payments.acme.test"
    "#;

    #[test]
    fn the_design_example_parses_with_defaults() {
        let c = validated(DESIGN_EXAMPLE);
        assert_eq!(c.listen(), "127.0.0.1:8443".parse().unwrap());
        assert_eq!(c.server_names(), ["localhost"]);
        assert_eq!(c.mtls(), MtlsMode::Optional);
        assert!(c.trusted_proxies().is_empty());
        let r = &c.routes()[0];
        assert_eq!(r.index, 0);
        assert_eq!(r.path, "/payments/");
        assert_eq!(r.methods.to_string(), "GET, HEAD, POST");
        assert_eq!(r.upstream.uri.to_string(), "http://127.0.0.1:9001/");
        assert!(!r.upstream.https);
        assert_eq!(r.kind, RouteKind::Rest);
        assert_eq!(r.auth, [AuthMethod::Bearer, AuthMethod::ApiKey, AuthMethod::Mtls]);
        assert_eq!(r.require_roles, [RoleName::parse("payments:reader").unwrap()]);
        assert_eq!(r.roles_mode, RolesMode::Any);
        assert_eq!(r.require_scopes, [ScopeName::parse("payments/read").unwrap()]);
        assert!(r.require_permissions.is_empty());
        assert_eq!(r.audience.as_deref(), Some("https://payments.acme.test"));
        assert_eq!(r.timeout, Duration::from_secs(30));
        assert_eq!(r.connect_timeout, Duration::from_secs(5));
        assert_eq!(r.max_body_bytes, 10 * 1024 * 1024);
        assert_eq!(r.rate_limit, RateLimit::default());
        assert_eq!(r.upstream_ca_file, None);
        assert!(!r.upstream_client_certificate);
        assert!(!r.preserve_host);
    }

    #[test]
    fn minimal_config_defaults() {
        let c = parse("[gateway]\nlisten = \"[::1]:0\"\n");
        assert_eq!(c.server_names, ["localhost", "127.0.0.1", "::1"]);
        assert_eq!(c.mtls, MtlsMode::Optional);
        let v = c.validate().unwrap();
        assert!(v.routes().is_empty());
        assert_eq!(v.route(&Method::GET, "/x"), Err(RouteError::NotFound));
    }

    #[test]
    fn every_extra_field_is_read() {
        let c = validated(
            r#"
            [gateway]
            listen = "0.0.0.0:8443"
            server_names = ["API.Example.com", "10.0.0.1"]
            mtls = "required"
            trusted_proxies = ["10.0.0.0/8", "192.168.1.7", "fd00::/8"]

            [[gateway.routes]]
            path = "/soap"
            methods = ["post"]
            upstream = "https://soap.internal:8443/ws"
            kind = "soap"
            auth = ["mtls", "session"]
            require_roles = ["billing:admin", "billing:auditor"]
            roles_mode = "all"
            require_permissions = ["billing.invoice.read"]
            timeout_ms = 2000
            max_body_bytes = 0
            rate_limit = { per_identity = 60 }
            upstream_ca_file = "/etc/ca.pem"
            upstream_client_certificate = true
            preserve_host = true
        "#,
        );
        assert_eq!(c.server_names(), ["api.example.com", "10.0.0.1"]);
        assert_eq!(c.mtls(), MtlsMode::Required);
        assert_eq!(c.trusted_proxies().len(), 3);
        let r = &c.routes()[0];
        assert_eq!(r.methods.to_string(), "POST");
        assert!(r.upstream.https);
        assert_eq!(r.upstream.uri.path(), "/ws");
        assert_eq!(r.kind, RouteKind::Soap);
        assert_eq!(r.roles_mode, RolesMode::All);
        assert_eq!(r.timeout, Duration::from_secs(2));
        assert_eq!(r.connect_timeout, Duration::from_secs(2), "the connect default is capped at the total");
        assert_eq!(r.max_body_bytes, 0);
        assert_eq!(r.rate_limit, RateLimit { per_identity: Some(60), per_ip: None });
        assert_eq!(r.upstream_ca_file.as_deref(), Some(std::path::Path::new("/etc/ca.pem")));
        assert!(r.upstream_client_certificate);
        assert!(r.preserve_host);
    }

    #[test]
    fn unknown_keys_and_bad_enums_are_refused_by_serde() {
        let unknown_route_key = "[gateway]\nlisten = \"127.0.0.1:1\"\n[[gateway.routes]]\npath = \"/\"\nupstream = \"http://a\"\nauth = [\"bearer\"]\nrequire_role = [\"a:b\"]\n";
        let e = toml::from_str::<toml::Table>(unknown_route_key)
            .unwrap()
            .get("gateway")
            .cloned()
            .unwrap()
            .try_into::<GatewayConfig>()
            .unwrap_err()
            .to_string();
        assert!(e.contains("require_role"), "{e}");
        for (bad, needle) in [
            ("[gateway]\nlisten = \"x\"\nmtls = \"on\"\n", "required"),
            ("[gateway]\nlisten = \"x\"\ntls = true\n", "tls"),
            (
                "[gateway]\nlisten = \"x\"\n[[gateway.routes]]\npath = \"/\"\nupstream = \"http://a\"\nauth = [\"bearer\"]\nkind = \"grpc\"\n",
                "soap",
            ),
            (
                "[gateway]\nlisten = \"x\"\n[[gateway.routes]]\npath = \"/\"\nupstream = \"http://a\"\nauth = [\"bearer\"]\nroles_mode = \"some\"\n",
                "all",
            ),
            (
                "[gateway]\nlisten = \"x\"\n[[gateway.routes]]\npath = \"/\"\nupstream = \"http://a\"\nauth = [\"bearer\"]\nrate_limit = { per_user = 1 }\n",
                "per_user",
            ),
            ("[gateway]\nlisten = \"x\"\n[[gateway.routes]]\npath = \"/\"\nupstream = \"http://a\"\n", "auth"),
        ] {
            let e = toml::from_str::<toml::Table>(bad)
                .unwrap()
                .get("gateway")
                .cloned()
                .unwrap()
                .try_into::<GatewayConfig>()
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle), "{bad}: {e}");
        }
    }

    #[test]
    fn gateway_level_errors_name_the_field() {
        let e = |t: &str| parse(t).validate().unwrap_err().to_string();
        assert!(
            e("[gateway]\nlisten = \"localhost\"\n")
                .starts_with("gateway.listen: invalid address \"localhost\": expected ADDR:PORT")
        );
        assert!(
            e("[gateway]\nlisten = \"127.0.0.1:1\"\nserver_names = []\n").starts_with("gateway.server_names: expected")
        );
        assert!(e("[gateway]\nlisten = \"127.0.0.1:1\"\nserver_names = [\"*.acme.test\"]\n").contains("no wildcard"));
        assert!(e("[gateway]\nlisten = \"127.0.0.1:1\"\nserver_names = [\"a..b\"]\n").contains("expected a DNS name"));
        assert!(e("[gateway]\nlisten = \"127.0.0.1:1\"\nserver_names = [\"a\", \"A\"]\n").contains("twice"));
        assert!(
            e("[gateway]\nlisten = \"127.0.0.1:1\"\ntrusted_proxies = [\"10.0.0.1/8\"]\n")
                .contains("bits set after the prefix")
        );
        assert!(
            e("[gateway]\nlisten = \"127.0.0.1:1\"\ntrusted_proxies = [\"10.0.0.0/33\"]\n")
                .starts_with("gateway.trusted_proxies: invalid network")
        );
        assert!(
            e("[gateway]\nlisten = \"127.0.0.1:1\"\ntrusted_proxies = [\"10.0.0.0/+8\"]\n")
                .contains("expected e.g. 10.0.0.0/8")
        );
        assert!(
            e("[gateway]\nlisten = \"127.0.0.1:1\"\ntrusted_proxies = [\"0.0.0.0/0\"]\n")
                .contains("trusts every address")
        );
        assert!(e("[gateway]\nlisten = \"127.0.0.1:1\"\ntrusted_proxies = [\"::1\", \"::1/128\"]\n").contains("twice"));
        assert!(
            e("[gateway]\nlisten = \"127.0.0.1:1\"\ntrusted_proxies = [\"example.com\"]\n")
                .starts_with("gateway.trusted_proxies: invalid network \"example.com\": not an IP address")
        );
    }

    #[test]
    fn route_errors_name_route_field_and_form() {
        let e = route_error("path = \"payments\"");
        assert!(e.starts_with("gateway.routes[0] (path \"payments\"): path: invalid path"), "{e}");
        assert!(e.contains("must start with /") && e.contains("e.g. /payments/"), "{e}");
        for (lines, field, needle) in [
            ("path = \"/a/../b\"", "path", ". or .."),
            ("path = \"/a/./b\"", "path", ". or .."),
            ("path = \"/a//b\"", "path", "empty segments"),
            ("path = \"//\"", "path", "empty segments"),
            ("path = \"/a%2fb\"", "path", "percent"),
            ("path = \"/a?b=1\"", "path", "query"),
            ("path = \"/a;b\"", "path", "unexpected character"),
            ("path = \"/a b\"", "path", "unexpected character"),
            ("path = \"/é\"", "path", "unexpected character"),
            ("path = \"\"", "path", "start with /"),
            ("methods = []", "methods", "omit `methods`"),
            ("methods = [\"FETCH\"]", "methods", "expected one of GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
            ("methods = [\"TRACE\"]", "methods", "expected one of"),
            ("methods = [\"get\", \"GET\"]", "methods", "GET is listed twice"),
            ("upstream = \"127.0.0.1:9001\"", "upstream", "no scheme"),
            ("upstream = \"ftp://a\"", "upstream", "http or https"),
            ("upstream = \"http://user:pw@a\"", "upstream", "no user"),
            ("upstream = \"http://a/?x=1\"", "upstream", "no query"),
            ("upstream = \"http://a/#x\"", "upstream", "no fragment"),
            ("upstream = \"http://\"", "upstream", "absolute http"),
            ("upstream = \"http://a b\"", "upstream", "unexpected character"),
            ("upstream = \"http://a/x/../y\"", "upstream", "the upstream's path"),
            ("upstream = \"http://a:99999\"", "upstream", "port"),
            ("upstream = \"http://a:0\"", "upstream", "port"),
            ("upstream = \"http://a:/\"", "upstream", "port"),
            ("upstream = \"http://a:x\"", "upstream", "port"),
            ("upstream = \"http://a::1\"", "upstream", "port"),
            ("upstream = \"http://a/b c\"", "upstream", "unexpected character"),
            ("upstream = \"http://a/{x}\"", "upstream", "the upstream's path"),
            ("upstream = \"http://[::1\"", "upstream", "IPv6"),
            ("upstream = \"http://[::1]x\"", "upstream", "port"),
            ("upstream = \"http://a!b\"", "upstream", "invalid host"),
            ("upstream = \"http:///x\"", "upstream", "no host"),
            ("auth = []", "auth", "expected at least one"),
            ("auth = [\"jwt\"]", "auth", "expected bearer, api_key, mtls or session"),
            ("auth = [\"bearer\", \"bearer\"]", "auth", "twice"),
            ("require_roles = [\"payments\"]", "require_roles", "expected service:level"),
            ("require_roles = [\"a:b\", \"a:b\"]", "require_roles", "twice"),
            ("require_scopes = [\"payments:read\"]", "require_scopes", "expected service/capability"),
            ("require_permissions = [\"payments.read\"]", "require_permissions", "expected service.resource.action"),
            ("audience = \"payments\"", "audience", "expected an absolute URI"),
            ("audience = \"https://a#b\"", "audience", "without fragment"),
            ("audience = \"https://a b\"", "audience", "absolute URI"),
            ("timeout_ms = 0", "timeout_ms", "expected 1 to 3600000"),
            ("timeout_ms = 3600001", "timeout_ms", "expected 1 to"),
            ("timeout_ms = 1000\nconnect_timeout_ms = 1001", "connect_timeout_ms", "at most timeout_ms"),
            ("connect_timeout_ms = 0", "connect_timeout_ms", "expected 1 to 30000"),
            ("rate_limit = { per_ip = 0 }", "rate_limit.per_ip", "omit it for no limit"),
            ("rate_limit = { per_identity = 1000001 }", "rate_limit.per_identity", "requests per minute"),
            ("upstream_ca_file = \"/ca.pem\"", "upstream_ca_file", "needs an https upstream"),
            ("upstream = \"https://a\"\nupstream_ca_file = \"\"", "upstream_ca_file", "PEM file"),
            ("upstream_client_certificate = true", "upstream_client_certificate", "https"),
        ] {
            let e = route_error(lines);
            assert!(e.starts_with("gateway.routes[0] (path "), "{lines}: {e}");
            assert!(e.contains(&format!("): {field}: ")), "{lines}: {e}");
            assert!(e.contains(needle), "{lines}: {e}");
        }
    }

    #[test]
    fn mtls_auth_needs_client_certificates_on_the_listener() {
        let t = |mode: &str| {
            parse(&format!(
                "[gateway]\nlisten = \"127.0.0.1:1\"\nmtls = \"{mode}\"\n[[gateway.routes]]\npath = \"/\"\nupstream = \"http://a\"\nauth = [\"mtls\"]\n"
            ))
            .validate()
        };
        assert!(t("optional").is_ok());
        assert!(t("required").is_ok());
        let e = t("off").unwrap_err();
        assert_eq!(e.route, Some((0, "/".into())));
        assert_eq!(e.field, "auth");
        assert!(e.message.contains("gateway.mtls"));
        // Session alongside a required-mTLS listener is allowed.
        let s = parse(
            "[gateway]\nlisten = \"127.0.0.1:1\"\nmtls = \"required\"\n[[gateway.routes]]\npath = \"/\"\nupstream = \"http://a\"\nauth = [\"session\"]\n",
        );
        assert!(s.validate().is_ok());
    }

    #[test]
    fn the_second_route_is_named_in_errors() {
        let e = parse(
            r#"
            [gateway]
            listen = "127.0.0.1:1"
            [[gateway.routes]]
            path = "/a/"
            upstream = "http://a"
            auth = ["bearer"]
            [[gateway.routes]]
            path = "/b/"
            upstream = "http://a"
            auth = ["bearer"]
            require_scopes = ["nope"]
        "#,
        )
        .validate()
        .unwrap_err();
        assert_eq!(e.route, Some((1, "/b/".into())));
        assert_eq!(e.field, "require_scopes");
        assert!(
            e.to_string().starts_with("gateway.routes[1] (path \"/b/\"): require_scopes: invalid scope \"nope\""),
            "{e}"
        );
    }

    fn two_routes(a: &str, b: &str) -> Result<ValidatedConfig, ConfigError> {
        parse(&format!(
            "[gateway]\nlisten = \"127.0.0.1:1\"\n[[gateway.routes]]\nupstream = \"http://a\"\nauth = [\"bearer\"]\n{a}\n[[gateway.routes]]\nupstream = \"http://b\"\nauth = [\"bearer\"]\n{b}\n"
        ))
        .validate()
    }

    #[test]
    fn duplicate_path_and_method_pairs_are_refused() {
        let e =
            two_routes("path = \"/p/\"\nmethods = [\"GET\", \"PUT\"]", "path = \"/p/\"\nmethods = [\"put\", \"POST\"]")
                .unwrap_err();
        assert_eq!(e.route, Some((1, "/p/".into())));
        assert_eq!(e.field, "methods");
        assert!(e.message.contains("PUT on \"/p/\" is already routed by gateway.routes[0]"), "{e}");
        // Omitted methods mean all of them: any second route on the same path collides.
        assert!(two_routes("path = \"/p/\"", "path = \"/p/\"\nmethods = [\"DELETE\"]").is_err());
        assert!(two_routes("path = \"/p/\"", "path = \"/p/\"").is_err());
        // GET implies HEAD.
        let e = two_routes("path = \"/p/\"\nmethods = [\"GET\"]", "path = \"/p/\"\nmethods = [\"HEAD\"]").unwrap_err();
        assert!(e.message.contains("GET implies HEAD"), "{e}");
        // Disjoint methods on one path, and the same methods on different paths, are fine.
        assert!(two_routes("path = \"/p/\"\nmethods = [\"GET\"]", "path = \"/p/\"\nmethods = [\"POST\"]").is_ok());
        assert!(two_routes("path = \"/p\"", "path = \"/p/\"").is_ok());
    }

    #[test]
    fn longest_segment_prefix_wins() {
        let c = validated(
            r#"
            [gateway]
            listen = "127.0.0.1:1"
            [[gateway.routes]]
            path = "/"
            upstream = "http://root"
            auth = ["session"]
            [[gateway.routes]]
            path = "/payments"
            upstream = "http://exact"
            auth = ["bearer"]
            [[gateway.routes]]
            path = "/payments/"
            upstream = "http://tree"
            auth = ["bearer"]
            [[gateway.routes]]
            path = "/payments/admin"
            upstream = "http://admin"
            auth = ["mtls"]
        "#,
        );
        let to = |p: &str| c.route(&Method::GET, p).map(|r| r.index);
        assert_eq!(to("/"), Ok(0));
        assert_eq!(to("/paymentsX"), Ok(0), "segment boundary: /payments does not cover /paymentsX");
        assert_eq!(to("/payments"), Ok(1));
        assert_eq!(to("/payments/"), Ok(2));
        assert_eq!(to("/payments/x"), Ok(2));
        assert_eq!(to("/payments/admin"), Ok(3));
        assert_eq!(to("/payments/admin/"), Ok(3));
        assert_eq!(to("/payments/admin/users"), Ok(3));
        assert_eq!(to("/payments/administrator"), Ok(2));
        assert_eq!(to("/Payments/admin"), Ok(0), "case-sensitive");
    }

    #[test]
    fn trailing_slash_prefix_does_not_cover_the_bare_name() {
        let c = validated(
            "[gateway]\nlisten = \"127.0.0.1:1\"\n[[gateway.routes]]\npath = \"/payments/\"\nupstream = \"http://a\"\nauth = [\"bearer\"]\n",
        );
        assert!(c.route(&Method::GET, "/payments/").is_ok());
        assert!(c.route(&Method::GET, "/payments/x/y").is_ok());
        assert_eq!(c.route(&Method::GET, "/payments"), Err(RouteError::NotFound));
        assert_eq!(c.route(&Method::GET, "/paymentsX"), Err(RouteError::NotFound));
        assert_eq!(c.route(&Method::GET, "/Payments/x"), Err(RouteError::NotFound));
    }

    #[test]
    fn methods_filter_without_falling_back_to_a_shorter_prefix() {
        let c = validated(
            r#"
            [gateway]
            listen = "127.0.0.1:1"
            [[gateway.routes]]
            path = "/"
            upstream = "http://root"
            auth = ["session"]
            [[gateway.routes]]
            path = "/p/"
            methods = ["GET"]
            upstream = "http://read"
            auth = ["bearer"]
            [[gateway.routes]]
            path = "/p/"
            methods = ["POST", "put"]
            upstream = "http://write"
            auth = ["bearer"]
        "#,
        );
        let to = |m: Method, p: &str| c.route(&m, p).map(|r| r.index);
        assert_eq!(to(Method::GET, "/p/x"), Ok(1));
        assert_eq!(to(Method::HEAD, "/p/x"), Ok(1), "HEAD where GET is");
        assert_eq!(to(Method::POST, "/p/x"), Ok(2));
        assert_eq!(to(Method::PUT, "/p/x"), Ok(2));
        let allow = MethodSet::EMPTY.with(&Method::GET).with(&Method::HEAD).with(&Method::POST).with(&Method::PUT);
        assert_eq!(c.route(&Method::DELETE, "/p/x"), Err(RouteError::MethodNotAllowed { allow }));
        assert_eq!(allow.to_string(), "GET, HEAD, POST, PUT");
        // Methods outside the fixed set never match, not even a route without `methods`.
        assert!(matches!(c.route(&Method::TRACE, "/other"), Err(RouteError::MethodNotAllowed { .. })));
        assert!(matches!(c.route(&Method::CONNECT, "/other"), Err(RouteError::MethodNotAllowed { .. })));
        let ext = Method::from_bytes(b"PROPFIND").unwrap();
        assert!(matches!(c.route(&ext, "/other"), Err(RouteError::MethodNotAllowed { .. })));
        assert_eq!(to(Method::OPTIONS, "/other"), Ok(0));
    }

    #[test]
    fn head_only_route_does_not_allow_get() {
        let c = validated(
            "[gateway]\nlisten = \"127.0.0.1:1\"\n[[gateway.routes]]\npath = \"/\"\nmethods = [\"HEAD\"]\nupstream = \"http://a\"\nauth = [\"bearer\"]\n",
        );
        assert!(c.route(&Method::HEAD, "/").is_ok());
        assert!(matches!(c.route(&Method::GET, "/"), Err(RouteError::MethodNotAllowed { .. })));
    }

    #[test]
    fn bypass_spellings_are_refused_before_matching() {
        let c = validated(
            r#"
            [gateway]
            listen = "127.0.0.1:1"
            [[gateway.routes]]
            path = "/"
            upstream = "http://public"
            auth = ["session"]
            [[gateway.routes]]
            path = "/admin"
            upstream = "http://admin"
            auth = ["mtls"]
        "#,
        );
        for (p, e) in [
            ("/payments/../admin", PathError::DotSegment),
            ("/payments/./../admin", PathError::DotSegment),
            ("/payments%2f..%2fadmin", PathError::EncodedSeparator),
            ("/payments%2F..%2Fadmin", PathError::EncodedSeparator),
            ("/payments%5c..%5cadmin", PathError::EncodedSeparator),
            ("/payments/%2e%2e/admin", PathError::EncodedUnreserved),
            ("/payments/.%2e/admin", PathError::EncodedUnreserved),
            ("/%61dmin", PathError::EncodedUnreserved),
            ("/adm%69n", PathError::EncodedUnreserved),
            ("//admin", PathError::EmptySegment),
            ("/x//admin", PathError::EmptySegment),
            ("/payments\\..\\admin", PathError::Backslash),
            ("/admin;jsessionid=x", PathError::PathParameter),
            ("/payments;x/..", PathError::PathParameter),
            ("/..;/admin", PathError::PathParameter),
            ("/admin%00", PathError::ControlCharacter),
            ("/admin\0", PathError::ControlCharacter),
            ("/admin\t", PathError::ControlCharacter),
            ("/admin%0a", PathError::ControlCharacter),
            ("/admin%7F", PathError::ControlCharacter),
            ("/x/%c0%af../admin", PathError::InvalidUtf8),
            ("/x%c0%ae%c0%ae/admin", PathError::InvalidUtf8),
            ("/admin%", PathError::BadPercentEncoding),
            ("/admin%2", PathError::BadPercentEncoding),
            ("/admin%zz", PathError::BadPercentEncoding),
            ("/admin?x", PathError::QueryOrFragment),
            ("/admin#x", PathError::QueryOrFragment),
            ("admin", PathError::NotAbsolute),
            ("", PathError::NotAbsolute),
            ("*", PathError::NotAbsolute),
            ("http://h/admin", PathError::NotAbsolute),
            ("/a dmin", PathError::ForbiddenCharacter),
            ("/admin{}", PathError::ForbiddenCharacter),
            ("/<admin>", PathError::ForbiddenCharacter),
            ("/admin\"", PathError::ForbiddenCharacter),
            ("/admin`", PathError::ForbiddenCharacter),
            ("/admïn", PathError::ForbiddenCharacter),
            ("/admin/.", PathError::DotSegment),
            ("/admin/..", PathError::DotSegment),
            ("/.", PathError::DotSegment),
        ] {
            assert_eq!(normalise_path(p), Err(e), "{p:?}");
            assert_eq!(c.route(&Method::GET, p), Err(RouteError::BadPath(e)), "{p:?}");
        }
        // Case matters: /Admin is not /admin (it goes to the `/` route).
        assert_eq!(c.route(&Method::GET, "/Admin").map(|r| r.index), Ok(0));
        assert_eq!(c.route(&Method::GET, "/admin/x").map(|r| r.index), Ok(1));
    }

    #[test]
    fn ordinary_paths_pass_unchanged() {
        for p in [
            "/",
            "/payments",
            "/payments/",
            "/payments/x/y.json",
            "/a/.well-known/x",
            "/a/...",
            "/a/..b/.c",
            "/search/caf%C3%A9",
            "/files/100%25",
            "/a%20b",
            "/a%3Bb",
            "/a%3Fb",
            "/v1/things:batchGet",
            "/u/@me",
            "/x!$&'()*+,=",
            "/a[0]|b^c",
            "/~user/_x-y",
        ] {
            assert_eq!(normalise_path(p), Ok(p), "{p:?}");
        }
    }

    #[test]
    fn every_valid_route_path_is_a_valid_request_path() {
        for p in ["/", "/a", "/a/", "/a.b/c~d/_e-f/", "/.well-known/"] {
            assert!(check_route_path(p).is_ok(), "{p}");
            assert_eq!(normalise_path(p), Ok(p));
        }
    }

    #[test]
    fn upstreams_keep_their_form() {
        let u = check_upstream("HTTPS://Payments.internal:8443/base/").unwrap();
        assert!(u.https);
        assert_eq!(u.uri.port_u16(), Some(8443));
        assert_eq!(u.uri.path(), "/base/");
        assert!(check_upstream("http://[::1]:9001").is_ok());
        assert!(check_upstream("http://a/").is_ok());
        assert!(check_upstream("http://a/b%20c").is_err());
        assert!(check_upstream("http://@a").is_err());
    }

    #[test]
    fn trusted_proxies_are_parsed_and_matched() {
        let v = validated("[gateway]\nlisten = \"127.0.0.1:1\"\ntrusted_proxies = [\"127.0.0.1\", \"::1\"]\n");
        assert!(v.is_trusted_proxy("127.0.0.1".parse().unwrap()));
        assert!(v.is_trusted_proxy("::ffff:127.0.0.1".parse().unwrap()));
        assert!(v.is_trusted_proxy("::1".parse().unwrap()));
        assert!(!v.is_trusted_proxy("127.0.0.2".parse().unwrap()));
    }

    #[test]
    fn the_module_doc_example_is_valid() {
        let src = include_str!("config.rs");
        let example: String = src
            .lines()
            .skip_while(|l| *l != "//! ```toml")
            .skip(1)
            .take_while(|l| *l != "//! ```")
            .map(|l| format!("{}\n", l.trim_start_matches("//!").trim_start()))
            .collect();
        assert!(example.contains("[[gateway.routes]]"));
        let c = validated(&example);
        let r = &c.routes()[0];
        assert_eq!(r.rate_limit, RateLimit { per_identity: Some(600), per_ip: Some(1200) });
        assert!(r.upstream_client_certificate && r.upstream.https);
    }

    #[test]
    fn config_round_trips_through_serde() {
        let c = parse(DESIGN_EXAMPLE);
        let text = toml::to_string(&c).unwrap();
        let back: GatewayConfig = toml::from_str(&text).unwrap();
        assert_eq!(back, c);
    }
}
