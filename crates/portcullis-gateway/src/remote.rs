//! [`ControlPlane`] over HTTP(S): what the standalone `portcullis gateway` uses to reach a
//! control plane (DESIGN §5, the endpoints are documented in `docs/gateway.md`).
//!
//! The gateway authenticates as an application holding the role `portcullis:gateway`: it gets an
//! access token from `POST {issuer}/oauth2/token` (`client_credentials`, `client_secret_basic`),
//! keeps it until 30 s before its `expires_in`, and fetches a new one on expiry or when an
//! endpoint answers 401 (that request is then retried once with the new token). Concurrent
//! callers share one token fetch.
//!
//! Every endpoint is relative to the issuer (the control plane's external base URL):
//!
//! | call | request | answer |
//! |---|---|---|
//! | [`ControlPlane::signing_keys`] | `GET /oauth2/jwks` (no token) | JWKS |
//! | [`ControlPlane::trust`] | `GET /api/v1/gateway/trust` | `{anchors: [b64 DER], crls: [b64 DER]}` |
//! | [`ControlPlane::grants`] | `GET /api/v1/gateway/grants` | `{grants: [{org, role, permission}]}` |
//! | [`ControlPlane::changes`] | `GET /api/v1/gateway/changes?cursor=C&wait=S` | `{cursor, revoked_tokens: [{jti, expires_at}], principals, grants, trust, keys, reset}` |
//! | [`ControlPlane::api_key`] | `POST /api/v1/gateway/api-keys/check` `{api_key, api_secret, client_ip?}` | verdict |
//! | [`ControlPlane::session`] | `POST /api/v1/gateway/sessions/check` `{session_token, client_ip?}` | verdict |
//! | [`ControlPlane::certificate`] | `POST /api/v1/gateway/certificates/check` `{certificate: b64 DER}` | verdict |
//! | [`ControlPlane::issue`] | `POST /api/v1/gateway/certificates` `{purpose, names, csr}` | 201 `{chain_pem, not_after}` |
//!
//! A verdict is `{valid: true, identity: {subject, client_id, org, roles, scopes}}` or
//! `{valid: false, status, message, retry_after?}` (a status other than 401, 403 or 429 counts as
//! 401). Any other HTTP status, a transport error, a timeout, an answer over [`MAX_BODY_BYTES`] or
//! a malformed answer is [`Unavailable`], whose text (for the log) names the endpoint, the status
//! and the control plane's `x-error` / `x-error-id`.
//!
//! Bounds: each HTTP exchange is limited to [`RemoteConfig::request_timeout`] (the change feed to
//! `wait` + that), so one call takes at most two token fetches and two exchanges.
//!
//! The client secret, the access token, API secrets and session tokens are never logged and never
//! in a `Debug` output. Issued certificates' private keys are generated here and never sent.

use std::error::Error as StdError;
use std::fmt;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use portcullis_core::crypto::signing::VerifyingKey;
use portcullis_core::ids::{PermissionName, RoleName, Slug};
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode, Url};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::config::AuthMethod;
use crate::control::{
    BrowserSession, BrowserVerdict, CertificatePurpose, Changes, ControlPlane, IssuedKeyPair, Refusal, RevokedToken,
    TrustBundle, Unavailable, Verdict,
};
use crate::policy::{Identity, PermissionGrants};

/// [`RemoteConfig::request_timeout`] unless configured otherwise.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest answer read from the control plane (CRLs can be large).
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;
/// The longest long-poll [`ControlPlane::changes`] asks for.
pub const MAX_WAIT: Duration = Duration::from_secs(30);
/// A cached access token is replaced this long before it expires.
const TOKEN_EXPIRY_MARGIN: Duration = Duration::from_secs(30);
/// Lifetime assumed when the token answer has no `expires_in`.
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);
/// A token is never kept longer than this, whatever `expires_in` says.
const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// The longest accepted [`RemoteConfig::request_timeout`].
const MAX_REQUEST_TIMEOUT: Duration = Duration::from_secs(300);
/// Texts taken from the control plane (`x-error`, refusal messages) are cut to this many chars.
const MAX_TEXT_CHARS: usize = 300;
/// The subject common name of the platform transport (upstream client) certificate.
const UPSTREAM_CLIENT_CN: &str = "portcullis-gateway";

/// How to reach and authenticate to the control plane. `Debug` never shows the secret.
pub struct RemoteConfig {
    /// The control plane's external base URL (e.g. `https://idp.example:8080`): the `iss` of its
    /// tokens and the base of every endpoint. `https`, or `http` to a loopback address only.
    pub issuer: String,
    /// The gateway application's client id (`org$app`), holding the role `portcullis:gateway`.
    pub client_id: String,
    pub client_secret: Zeroizing<String>,
    /// Extra trust anchors (PEM) for the control plane's TLS, added to the system's roots (e.g.
    /// our own `/pki/ca.pem`).
    pub ca_pem: Option<String>,
    /// The bound on each HTTP exchange (connect, send, read the answer).
    pub request_timeout: Duration,
}

impl RemoteConfig {
    /// A configuration with no extra trust anchor and [`DEFAULT_REQUEST_TIMEOUT`].
    pub fn new(issuer: impl Into<String>, client_id: impl Into<String>, client_secret: Zeroizing<String>) -> Self {
        Self {
            issuer: issuer.into(),
            client_id: client_id.into(),
            client_secret,
            ca_pem: None,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        }
    }
}

impl fmt::Debug for RemoteConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteConfig")
            .field("issuer", &self.issuer)
            .field("client_id", &self.client_id)
            .field("client_secret", &"<redacted>")
            .field("ca_pem", &self.ca_pem.as_ref().map(|_| "<pem>"))
            .field("request_timeout", &self.request_timeout)
            .finish()
    }
}

/// A [`RemoteConfig`] that cannot work (bad issuer URL, unreadable CA PEM, …).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid control plane settings: {0}")]
pub struct RemoteConfigError(pub String);

/// The endpoint URLs, built once from the issuer.
struct Endpoints {
    token: Url,
    jwks: Url,
    trust: Url,
    grants: Url,
    changes: Url,
    api_key_check: Url,
    session_check: Url,
    certificate_check: Url,
    certificates: Url,
    browser_sessions: Url,
}

/// The cached access token, as a ready (sensitive) `Authorization` header value.
struct CachedToken {
    header: HeaderValue,
    generation: u64,
    refresh_at: Instant,
}

#[derive(Default)]
struct TokenState {
    current: Option<CachedToken>,
    /// Incremented on every fetch, so a 401 invalidates only the token it was answered to.
    generation: u64,
}

/// The HTTP(S) [`ControlPlane`] (see the module documentation).
pub struct Remote {
    issuer: String,
    client_id: String,
    client_secret: Zeroizing<String>,
    http: reqwest::Client,
    request_timeout: Duration,
    endpoints: Endpoints,
    /// Held across a token fetch: the single flight.
    token: tokio::sync::Mutex<TokenState>,
}

impl fmt::Debug for Remote {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Remote")
            .field("issuer", &self.issuer)
            .field("client_id", &self.client_id)
            .field("request_timeout", &self.request_timeout)
            .finish_non_exhaustive()
    }
}

fn is_loopback(url: &Url) -> bool {
    let host = url.host_str().unwrap_or_default();
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    host.eq_ignore_ascii_case("localhost") || host.parse::<IpAddr>().is_ok_and(|a| a.is_loopback())
}

impl Remote {
    /// Checks the configuration and builds the HTTP client; nothing is sent yet.
    pub fn new(config: RemoteConfig) -> Result<Self, RemoteConfigError> {
        let RemoteConfig { issuer, client_id, client_secret, ca_pem, request_timeout } = config;
        let bad = |m: String| RemoteConfigError(m);
        let base = Url::parse(&issuer).map_err(|e| bad(format!("issuer {issuer:?} is not a URL: {e}")))?;
        match base.scheme() {
            "https" => {}
            "http" if is_loopback(&base) => {}
            "http" => return Err(bad(format!("issuer {issuer:?}: plain http only to a loopback address; use https"))),
            other => return Err(bad(format!("issuer {issuer:?}: unsupported scheme {other:?}"))),
        }
        if base.host_str().is_none_or(str::is_empty)
            || base.query().is_some()
            || base.fragment().is_some()
            || !base.username().is_empty()
            || base.password().is_some()
        {
            return Err(bad(format!("issuer {issuer:?}: expected scheme://host[:port][/path], nothing else")));
        }
        if client_id.is_empty() || client_secret.is_empty() {
            return Err(bad("the gateway's client id and client secret are required".into()));
        }
        if request_timeout.is_zero() || request_timeout > MAX_REQUEST_TIMEOUT {
            return Err(bad(format!("request timeout {request_timeout:?}: expected more than 0 and at most 5 min")));
        }

        let root = issuer.trim_end_matches('/');
        let url = |path: &str| {
            Url::parse(&format!("{root}{path}")).map_err(|e| bad(format!("issuer {issuer:?} + {path}: {e}")))
        };
        let endpoints = Endpoints {
            token: url("/oauth2/token")?,
            jwks: url("/oauth2/jwks")?,
            trust: url("/api/v1/gateway/trust")?,
            grants: url("/api/v1/gateway/grants")?,
            changes: url("/api/v1/gateway/changes")?,
            api_key_check: url("/api/v1/gateway/api-keys/check")?,
            session_check: url("/api/v1/gateway/sessions/check")?,
            browser_sessions: url("/api/v1/gateway/browser-sessions")?,
            certificate_check: url("/api/v1/gateway/certificates/check")?,
            certificates: url("/api/v1/gateway/certificates")?,
        };

        let mut builder = reqwest::Client::builder()
            // Credentials go to the configured control plane only.
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(request_timeout)
            .user_agent(concat!("portcullis-gateway/", env!("CARGO_PKG_VERSION")));
        if let Some(pem) = &ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem.as_bytes())
                .map_err(|e| bad(format!("control plane CA: expected PEM certificates: {}", error_chain(&e))))?;
            if certs.is_empty() {
                return Err(bad("control plane CA: no PEM certificate in it".into()));
            }
            if base.scheme() != "https" {
                tracing::warn!(issuer = %issuer, "a control plane CA is configured but the issuer is plain http");
            }
            builder = builder.tls_certs_merge(certs);
        }
        let http = builder.build().map_err(|e| bad(format!("building the HTTP client: {}", error_chain(&e))))?;

        Ok(Self {
            issuer,
            client_id,
            client_secret,
            http,
            request_timeout,
            endpoints,
            token: tokio::sync::Mutex::new(TokenState::default()),
        })
    }

    // ---- the access token -------------------------------------------------------------------

    /// The current access token (fetching one if none is cached, it is about to expire, or it is
    /// the one with generation `rejected`), with its generation.
    async fn bearer(&self, rejected: Option<u64>) -> Result<(HeaderValue, u64), Unavailable> {
        let mut state = self.token.lock().await;
        if let Some(t) = &state.current
            && rejected != Some(t.generation)
            && Instant::now() < t.refresh_at
        {
            return Ok((t.header.clone(), t.generation));
        }
        state.current = None;
        let asked = Instant::now();
        let (header, lifetime) = self.fetch_token().await?;
        state.generation = state.generation.wrapping_add(1);
        let keep = lifetime.min(MAX_TOKEN_LIFETIME).saturating_sub(TOKEN_EXPIRY_MARGIN);
        let refresh_at = asked.checked_add(keep).unwrap_or(asked);
        let generation = state.generation;
        state.current = Some(CachedToken { header: header.clone(), generation, refresh_at });
        tracing::debug!(generation, lifetime_secs = lifetime.as_secs(), "gateway access token obtained");
        Ok((header, generation))
    }

    /// `POST /oauth2/token` with `client_credentials` and `client_secret_basic`.
    async fn fetch_token(&self) -> Result<(HeaderValue, Duration), Unavailable> {
        const WHAT: &str = "POST /oauth2/token";
        // RFC 6749 §2.3.1: both parts form-urlencoded before base64.
        let pair = Zeroizing::new(format!(
            "{}:{}",
            form_urlencode(&self.client_id).as_str(),
            form_urlencode(&self.client_secret).as_str()
        ));
        let basic = Zeroizing::new(format!("Basic {}", B64.encode(pair.as_bytes())));
        let mut basic = HeaderValue::from_str(&basic)
            .map_err(|_| Unavailable(format!("{WHAT}: the client credentials do not fit in a header")))?;
        basic.set_sensitive(true);

        let resp = self
            .http
            .post(self.endpoints.token.clone())
            .timeout(self.request_timeout)
            .header(AUTHORIZATION, basic)
            .header(ACCEPT, "application/json")
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body("grant_type=client_credentials")
            .send()
            .await
            .map_err(|e| transport_error(WHAT, &e))?;
        if resp.status() != StatusCode::OK {
            let mut e = http_error(WHAT, resp.status(), resp.headers());
            if resp.status() == StatusCode::UNAUTHORIZED || resp.status() == StatusCode::BAD_REQUEST {
                e.0.push_str(" (are the gateway's client id and secret right?)");
            }
            return Err(e);
        }
        let body = Zeroizing::new(read_capped(resp, WHAT).await?);

        #[derive(Deserialize)]
        struct TokenAnswer {
            access_token: String,
            token_type: String,
            expires_in: Option<u64>,
        }
        // No serde detail in the error: it could quote the token.
        let answer: TokenAnswer = serde_json::from_slice(&body).map_err(|e| {
            Unavailable(format!(
                "{WHAT}: malformed answer ({:?} error at line {} column {})",
                e.classify(),
                e.line(),
                e.column()
            ))
        })?;
        let token = Zeroizing::new(answer.access_token);
        if !answer.token_type.eq_ignore_ascii_case("bearer") {
            return Err(Unavailable(format!("{WHAT}: token_type {:?}, expected Bearer", clean(&answer.token_type))));
        }
        if token.is_empty() {
            return Err(Unavailable(format!("{WHAT}: empty access_token")));
        }
        let value = Zeroizing::new(format!("Bearer {}", token.as_str()));
        let mut header = HeaderValue::from_str(&value)
            .map_err(|_| Unavailable(format!("{WHAT}: the access_token is not a valid header value")))?;
        header.set_sensitive(true);
        let lifetime = answer.expires_in.map_or(DEFAULT_TOKEN_LIFETIME, Duration::from_secs);
        Ok((header, lifetime))
    }

    // ---- requests ---------------------------------------------------------------------------

    /// Sends one request with the access token, retrying once with a new token after a 401, and
    /// returns the body of an `expect` answer.
    async fn call(
        &self,
        method: Method,
        url: Url,
        body: Option<Bytes>,
        timeout: Duration,
        expect: StatusCode,
        what: &str,
    ) -> Result<Vec<u8>, Unavailable> {
        let (header, generation) = self.bearer(None).await?;
        let mut resp = self.send(method.clone(), url.clone(), body.clone(), timeout, header, what).await?;
        if resp.status() == StatusCode::UNAUTHORIZED {
            tracing::debug!(endpoint = what, "control plane refused the access token; fetching a new one");
            let (header, _) = self.bearer(Some(generation)).await?;
            resp = self.send(method, url, body, timeout, header, what).await?;
        }
        if resp.status() != expect {
            return Err(http_error(what, resp.status(), resp.headers()));
        }
        read_capped(resp, what).await
    }

    async fn send(
        &self,
        method: Method,
        url: Url,
        body: Option<Bytes>,
        timeout: Duration,
        bearer: HeaderValue,
        what: &str,
    ) -> Result<reqwest::Response, Unavailable> {
        let mut rb = self
            .http
            .request(method, url)
            .timeout(timeout)
            .header(AUTHORIZATION, bearer)
            .header(ACCEPT, "application/json");
        if let Some(b) = body {
            rb = rb.header(CONTENT_TYPE, "application/json").body(b);
        }
        rb.send().await.map_err(|e| transport_error(what, &e))
    }

    async fn get_json<T: DeserializeOwned>(&self, url: &Url, what: &str) -> Result<T, Unavailable> {
        let body = self.call(Method::GET, url.clone(), None, self.request_timeout, StatusCode::OK, what).await?;
        parse_json(&body, what)
    }

    /// POSTs `request` (JSON) to a `…/check` endpoint and reads the verdict.
    async fn check<B: Serialize>(
        &self,
        url: &Url,
        request: &B,
        method: AuthMethod,
        what: &str,
    ) -> Result<Verdict, Unavailable> {
        let body = Zeroizing::new(
            serde_json::to_vec(request).map_err(|e| Unavailable(format!("{what}: encoding the request: {e}")))?,
        );
        let answer = self
            .call(
                Method::POST,
                url.clone(),
                Some(Bytes::copy_from_slice(&body)),
                self.request_timeout,
                StatusCode::OK,
                what,
            )
            .await?;
        verdict(parse_json(&answer, what)?, method, what)
    }
}

// ---- wire formats -------------------------------------------------------------------------------

#[derive(Deserialize)]
struct JwksAnswer {
    keys: Vec<serde_json::Value>,
}

#[derive(Deserialize)]
struct TrustAnswer {
    anchors: Vec<String>,
    #[serde(default)]
    crls: Vec<String>,
}

#[derive(Deserialize)]
struct GrantsAnswer {
    grants: Vec<serde_json::Value>,
}

#[derive(Deserialize)]
struct GrantEntry {
    org: String,
    role: String,
    permission: String,
}

#[derive(Deserialize)]
struct ChangesAnswer {
    cursor: String,
    #[serde(default)]
    revoked_tokens: Vec<RevokedEntry>,
    #[serde(default)]
    principals: bool,
    #[serde(default)]
    grants: bool,
    #[serde(default)]
    trust: bool,
    #[serde(default)]
    keys: bool,
    #[serde(default)]
    reset: bool,
}

#[derive(Deserialize)]
struct RevokedEntry {
    jti: String,
    expires_at: i64,
}

#[derive(Serialize)]
struct ApiKeyCheck<'a> {
    api_key: &'a str,
    api_secret: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_ip: Option<IpAddr>,
}

#[derive(Serialize)]
struct BrowserSessionRequest<'a> {
    client_id: &'a str,
    code: &'a str,
    code_verifier: &'a str,
    redirect_uri: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_ip: Option<IpAddr>,
}

#[derive(Deserialize)]
struct BrowserSessionAnswer {
    valid: bool,
    session_token: Option<String>,
    expires_at: Option<i64>,
    status: Option<u16>,
    message: Option<String>,
    retry_after: Option<u64>,
}

#[derive(Serialize)]
struct SessionCheck<'a> {
    session_token: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_ip: Option<IpAddr>,
}

#[derive(Serialize)]
struct CertificateCheck {
    certificate: String,
}

#[derive(Deserialize)]
struct VerdictAnswer {
    valid: bool,
    identity: Option<IdentityAnswer>,
    status: Option<u16>,
    message: Option<String>,
    retry_after: Option<u64>,
}

#[derive(Deserialize)]
struct IdentityAnswer {
    subject: String,
    client_id: String,
    org: String,
    #[serde(default)]
    roles: Vec<String>,
    #[serde(default)]
    scopes: Vec<String>,
}

#[derive(Serialize)]
struct IssueRequest<'a> {
    purpose: &'static str,
    names: &'a [String],
    csr: String,
}

#[derive(Deserialize)]
struct IssueAnswer {
    chain_pem: String,
    not_after: i64,
}

fn verdict(answer: VerdictAnswer, auth_method: AuthMethod, what: &str) -> Result<Verdict, Unavailable> {
    if answer.valid {
        let id = answer.identity.ok_or_else(|| Unavailable(format!("{what}: valid answer without an identity")))?;
        if id.subject.is_empty() {
            return Err(Unavailable(format!("{what}: identity without a subject")));
        }
        return Ok(Ok(Identity {
            subject: id.subject,
            client_id: id.client_id,
            org: id.org,
            roles: id.roles,
            scopes: id.scopes,
            audiences: Vec::new(),
            auth_method,
        }));
    }
    Ok(Err(refusal(answer.status, answer.message, answer.retry_after, "the credential was refused")))
}

/// A refusal as the wire has it: 401, 403 or 429 (anything else is a 401), a cleaned message
/// (`default` when there is none).
fn refusal(status: Option<u16>, message: Option<String>, retry_after: Option<u64>, default: &str) -> Refusal {
    let status = status.filter(|s| matches!(s, 401 | 403 | 429)).unwrap_or(401);
    let message = message.map(|m| clean(&m)).filter(|m| !m.is_empty()).unwrap_or_else(|| default.to_owned());
    Refusal { status, message, retry_after_secs: retry_after }
}

fn purpose_str(p: CertificatePurpose) -> &'static str {
    match p {
        CertificatePurpose::Server => "server",
        CertificatePurpose::UpstreamClient => "upstream_client",
    }
}

/// A CSR (PEM) for a fresh P-256 key; returns the key too.
fn make_csr(purpose: CertificatePurpose, names: &[String]) -> Result<(rcgen::KeyPair, String), Unavailable> {
    let fail = |e: rcgen::Error| Unavailable(format!("building the certificate request: {e}"));
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(fail)?;
    let mut params = match purpose {
        CertificatePurpose::Server => {
            if names.is_empty() || names.iter().any(|n| n.trim().is_empty()) {
                return Err(Unavailable("a server certificate needs at least one non-empty name".into()));
            }
            rcgen::CertificateParams::new(names.to_vec()).map_err(fail)?
        }
        CertificatePurpose::UpstreamClient => rcgen::CertificateParams::default(),
    };
    let cn = match purpose {
        CertificatePurpose::Server => names.first().map_or(UPSTREAM_CLIENT_CN, String::as_str),
        CertificatePurpose::UpstreamClient => UPSTREAM_CLIENT_CN,
    };
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, cn);
    params.distinguished_name = dn;
    let csr = params.serialize_request(&key).map_err(fail)?.pem().map_err(fail)?;
    Ok((key, csr))
}

/// The certificates (DER, in order) of a PEM chain (the core's strict reader: anything but
/// `CERTIFICATE` blocks is refused), each of which must parse as X.509.
fn parse_chain(pem: &str, what: &str) -> Result<Vec<Vec<u8>>, Unavailable> {
    let chain = portcullis_core::pki::pem_certificates(pem)
        .map_err(|e| Unavailable(format!("{what}: malformed chain_pem: {e}")))?;
    if chain.iter().any(|der| x509_parser::parse_x509_certificate(der).is_err()) {
        return Err(Unavailable(format!("{what}: a chain_pem certificate does not parse")));
    }
    if chain.is_empty() {
        return Err(Unavailable(format!("{what}: chain_pem holds no certificate")));
    }
    Ok(chain)
}

#[async_trait]
impl ControlPlane for Remote {
    fn issuer(&self) -> &str {
        &self.issuer
    }

    async fn signing_keys(&self) -> Result<Vec<VerifyingKey>, Unavailable> {
        const WHAT: &str = "GET /oauth2/jwks";
        // Public: no access token.
        let resp = self
            .http
            .get(self.endpoints.jwks.clone())
            .timeout(self.request_timeout)
            .header(ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| transport_error(WHAT, &e))?;
        if resp.status() != StatusCode::OK {
            return Err(http_error(WHAT, resp.status(), resp.headers()));
        }
        let body = read_capped(resp, WHAT).await?;
        let jwks: JwksAnswer = parse_json(&body, WHAT)?;
        let mut keys = Vec::with_capacity(jwks.keys.len());
        for jwk in &jwks.keys {
            match VerifyingKey::from_jwk(jwk) {
                Some(k) => keys.push(k),
                None => {
                    let kid = jwk.get("kid").and_then(serde_json::Value::as_str).map(clean);
                    tracing::warn!(kid = ?kid, "skipping a JWKS key the gateway cannot use");
                }
            }
        }
        if keys.is_empty() {
            return Err(Unavailable(format!("{WHAT}: no usable signing key among {} published", jwks.keys.len())));
        }
        Ok(keys)
    }

    async fn trust(&self) -> Result<TrustBundle, Unavailable> {
        const WHAT: &str = "GET /api/v1/gateway/trust";
        let answer: TrustAnswer = self.get_json(&self.endpoints.trust, WHAT).await?;
        // Fail closed: a bundle missing one CRL would let that CA's revoked certificates through,
        // so one bad entry refuses the whole answer (the caller keeps its previous bundle).
        let decode =
            |v: &str, kind: &str| B64.decode(v).map_err(|e| Unavailable(format!("{WHAT}: {kind} is not base64: {e}")));
        let mut bundle = TrustBundle::default();
        for a in &answer.anchors {
            let der = decode(a, "an anchor")?;
            if x509_parser::parse_x509_certificate(&der).is_err() {
                return Err(Unavailable(format!("{WHAT}: an anchor is not an X.509 certificate")));
            }
            bundle.anchors.push(der);
        }
        for c in &answer.crls {
            let der = decode(c, "a CRL")?;
            if x509_parser::parse_x509_crl(&der).is_err() {
                return Err(Unavailable(format!("{WHAT}: a CRL does not parse")));
            }
            bundle.crls.push(der);
        }
        Ok(bundle)
    }

    async fn grants(&self) -> Result<PermissionGrants, Unavailable> {
        const WHAT: &str = "GET /api/v1/gateway/grants";
        let answer: GrantsAnswer = self.get_json(&self.endpoints.grants, WHAT).await?;
        let mut grants = PermissionGrants::new();
        for entry in answer.grants {
            let Ok(g) = serde_json::from_value::<GrantEntry>(entry) else {
                tracing::warn!("skipping a malformed permission grant (expected {{org, role, permission}})");
                continue;
            };
            match (Slug::parse(&g.org), RoleName::parse(&g.role), PermissionName::parse(&g.permission)) {
                (Ok(org), Ok(role), Ok(permission)) => grants.grant(org.as_str(), &role, &permission),
                _ => tracing::warn!(
                    org = %clean(&g.org), role = %clean(&g.role), permission = %clean(&g.permission),
                    "skipping a malformed permission grant"
                ),
            }
        }
        Ok(grants)
    }

    async fn changes(&self, cursor: Option<&str>, wait: Duration) -> Result<Changes, Unavailable> {
        const WHAT: &str = "GET /api/v1/gateway/changes";
        let wait_secs = wait.min(MAX_WAIT).as_secs();
        let mut url = self.endpoints.changes.clone();
        {
            let mut q = url.query_pairs_mut();
            if let Some(c) = cursor {
                q.append_pair("cursor", c);
            }
            q.append_pair("wait", &wait_secs.to_string());
        }
        let timeout = Duration::from_secs(wait_secs).saturating_add(self.request_timeout);
        let body = self.call(Method::GET, url, None, timeout, StatusCode::OK, WHAT).await?;
        let answer: ChangesAnswer = parse_json(&body, WHAT)?;
        if answer.cursor.is_empty() {
            return Err(Unavailable(format!("{WHAT}: empty cursor")));
        }
        Ok(Changes {
            cursor: answer.cursor,
            revoked_tokens: answer
                .revoked_tokens
                .into_iter()
                .map(|r| RevokedToken { jti: r.jti, expires_at: r.expires_at })
                .collect(),
            principals: answer.principals,
            grants: answer.grants,
            trust: answer.trust,
            keys: answer.keys,
            reset: answer.reset,
        })
    }

    async fn api_key(&self, key: &str, secret: &str, client_ip: Option<IpAddr>) -> Result<Verdict, Unavailable> {
        let request = ApiKeyCheck { api_key: key, api_secret: secret, client_ip };
        self.check(&self.endpoints.api_key_check, &request, AuthMethod::ApiKey, "POST /api/v1/gateway/api-keys/check")
            .await
    }

    async fn session(&self, token: &str, client_ip: Option<IpAddr>) -> Result<Verdict, Unavailable> {
        let request = SessionCheck { session_token: token, client_ip };
        self.check(&self.endpoints.session_check, &request, AuthMethod::Session, "POST /api/v1/gateway/sessions/check")
            .await
    }

    fn own_client_id(&self) -> Option<&str> {
        Some(&self.client_id)
    }

    async fn browser_session(
        &self,
        client_id: &str,
        code: &str,
        code_verifier: &str,
        redirect_uri: &str,
        client_ip: Option<IpAddr>,
    ) -> Result<BrowserVerdict, Unavailable> {
        const WHAT: &str = "POST /api/v1/gateway/browser-sessions";
        let request = BrowserSessionRequest { client_id, code, code_verifier, redirect_uri, client_ip };
        let body = Zeroizing::new(
            serde_json::to_vec(&request).map_err(|e| Unavailable(format!("{WHAT}: encoding the request: {e}")))?,
        );
        let answer = self
            .call(
                Method::POST,
                self.endpoints.browser_sessions.clone(),
                Some(Bytes::copy_from_slice(&body)),
                self.request_timeout,
                StatusCode::OK,
                WHAT,
            )
            .await?;
        let answer: BrowserSessionAnswer = parse_json(&answer, WHAT)?;
        if answer.valid {
            let token = Zeroizing::new(
                answer.session_token.ok_or_else(|| Unavailable(format!("{WHAT}: valid answer without a token")))?,
            );
            let expires_at =
                answer.expires_at.ok_or_else(|| Unavailable(format!("{WHAT}: valid answer without expires_at")))?;
            if token.is_empty() || token.len() > 512 || !token.bytes().all(|b| b.is_ascii_graphic() && b != b';') {
                return Err(Unavailable(format!("{WHAT}: the session token is not a cookie value")));
            }
            return Ok(Ok(BrowserSession { token, expires_at }));
        }
        Ok(Err(refusal(answer.status, answer.message, answer.retry_after, "the sign-in was refused")))
    }

    async fn certificate(&self, leaf_der: &[u8]) -> Result<Verdict, Unavailable> {
        let request = CertificateCheck { certificate: B64.encode(leaf_der) };
        self.check(
            &self.endpoints.certificate_check,
            &request,
            AuthMethod::Mtls,
            "POST /api/v1/gateway/certificates/check",
        )
        .await
    }

    async fn issue(&self, purpose: CertificatePurpose, names: &[String]) -> Result<IssuedKeyPair, Unavailable> {
        const WHAT: &str = "POST /api/v1/gateway/certificates";
        let (key, csr) = make_csr(purpose, names)?;
        let request = IssueRequest { purpose: purpose_str(purpose), names, csr };
        let body =
            serde_json::to_vec(&request).map_err(|e| Unavailable(format!("{WHAT}: encoding the request: {e}")))?;
        let answer = self
            .call(
                Method::POST,
                self.endpoints.certificates.clone(),
                Some(Bytes::from(body)),
                self.request_timeout,
                StatusCode::CREATED,
                WHAT,
            )
            .await?;
        let answer: IssueAnswer = parse_json(&answer, WHAT)?;
        let chain = parse_chain(&answer.chain_pem, WHAT)?;
        let (ours, leaf_not_after) = chain
            .first()
            .and_then(|der| x509_parser::parse_x509_certificate(der).ok())
            .map(|(_, leaf)| {
                (
                    leaf.public_key().subject_public_key.data.as_ref() == key.public_key_raw(),
                    leaf.validity().not_after.timestamp(),
                )
            })
            .ok_or_else(|| Unavailable(format!("{WHAT}: chain_pem holds no certificate")))?;
        if !ours {
            return Err(Unavailable(format!("{WHAT}: the issued certificate is not for the key we sent")));
        }
        // Renew by the earlier of what the answer says and what the certificate says.
        let not_after = answer.not_after.min(leaf_not_after);
        Ok(IssuedKeyPair { chain, key_pkcs8: Zeroizing::new(key.serialize_der()), not_after })
    }
}

// ---- helpers ------------------------------------------------------------------------------------

/// `application/x-www-form-urlencoded` (the WHATWG byte serializer): `*-._` and alphanumerics
/// as-is, space as `+`, every other byte `%XX`.
fn form_urlencode(s: &str) -> Zeroizing<String> {
    use std::fmt::Write as _;
    let mut out = Zeroizing::new(String::with_capacity(s.len().saturating_mul(3)));
    for &b in s.as_bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'*' | b'-' | b'.' | b'_' => out.push(char::from(b)),
            b' ' => out.push('+'),
            // Writing to a String cannot fail.
            _ => _ = write!(out, "%{b:02X}"),
        }
    }
    out
}

/// A text from the control plane made safe for a log line or an `x-error`: no control
/// characters, at most [`MAX_TEXT_CHARS`].
fn clean(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).take(MAX_TEXT_CHARS).collect()
}

/// An error with its sources, for the log (reqwest's own text is terse).
fn error_chain(e: &dyn StdError) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

fn transport_error(what: &str, e: &reqwest::Error) -> Unavailable {
    let kind = if e.is_timeout() { "timed out" } else { "failed" };
    Unavailable(format!("{what}: {kind}: {}", error_chain(e)))
}

/// A non-expected HTTP status, with the control plane's `x-error` and `x-error-id`.
fn http_error(what: &str, status: StatusCode, headers: &HeaderMap) -> Unavailable {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(clean);
    let mut text = format!("{what}: HTTP {}", status.as_u16());
    if let Some(e) = header("x-error") {
        text.push_str(": ");
        text.push_str(&e);
    }
    if let Some(id) = header("x-error-id") {
        text.push_str(&format!(" (x-error-id {id})"));
    }
    Unavailable(text)
}

/// The body, refused past [`MAX_BODY_BYTES`] whatever `Content-Length` says.
async fn read_capped(mut resp: reqwest::Response, what: &str) -> Result<Vec<u8>, Unavailable> {
    let too_large = || Unavailable(format!("{what}: answer larger than {MAX_BODY_BYTES} bytes"));
    if resp.content_length().is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Err(too_large());
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| transport_error(what, &e))? {
        if body.len().saturating_add(chunk.len()) > MAX_BODY_BYTES {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

fn parse_json<T: DeserializeOwned>(body: &[u8], what: &str) -> Result<T, Unavailable> {
    serde_json::from_slice(body).map_err(|e| Unavailable(format!("{what}: malformed answer: {e}")))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

    use std::collections::{HashMap, HashSet};
    use std::convert::Infallible;
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use http_body_util::{BodyExt, Full};
    use hyper::body::Incoming;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use portcullis_core::crypto::signing::{Algorithm, SigningKey};
    use serde_json::{Value, json};
    use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
    use tokio::net::TcpListener;
    use x509_parser::prelude::FromDer;

    use super::*;

    const CLIENT_ID: &str = "acme$gateway";
    /// Needs form-urlencoding: `+`, `/`, `=`, `:`, space, `%` and a non-ASCII character.
    const SECRET: &str = "s3cr+t/=:x y%é";
    /// `base64("acme%24gateway:s3cr%2Bt%2F%3D%3Ax+y%25%C3%A9")`, computed independently.
    const EXPECTED_BASIC: &str = "Basic YWNtZSUyNGdhdGV3YXk6czNjciUyQnQlMkYlM0QlM0F4K3klMjUlQzMlQTk=";

    #[derive(Clone)]
    struct Canned {
        status: u16,
        headers: Vec<(&'static str, String)>,
        body: Vec<u8>,
    }

    fn canned(status: u16, body: &Value) -> Canned {
        Canned { status, headers: vec![], body: serde_json::to_vec(body).unwrap() }
    }

    #[derive(Clone, Debug)]
    struct Recorded {
        method: String,
        path: String,
        query: Option<String>,
        authorization: Option<String>,
        body: Vec<u8>,
    }

    /// A fake control plane: checks Basic auth on the token endpoint and the Bearer token on the
    /// gateway endpoints, answers canned bodies, counts and records calls.
    struct Stub {
        hits: Mutex<HashMap<String, usize>>,
        requests: Mutex<Vec<Recorded>>,
        canned: Mutex<HashMap<String, Canned>>,
        tokens_issued: AtomicUsize,
        expires_in: AtomicU64,
        token_delay_ms: AtomicU64,
        endpoint_delay_ms: AtomicU64,
        /// Tokens answered with 401 (`"*"`: every token).
        rejected: Mutex<HashSet<String>>,
        /// Sign issued certificates for some other key.
        wrong_key: AtomicBool,
        ca: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
        /// (common name, SANs) of the last CSR, after checking its signature.
        last_csr: Mutex<Option<(String, Vec<String>)>>,
    }

    fn test_ca(cn: &str) -> rcgen::CertifiedIssuer<'static, rcgen::KeyPair> {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        p.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        rcgen::CertifiedIssuer::self_signed(p, rcgen::KeyPair::generate().unwrap()).unwrap()
    }

    impl Stub {
        fn new() -> Arc<Self> {
            Arc::new(Self {
                hits: Mutex::default(),
                requests: Mutex::default(),
                canned: Mutex::default(),
                tokens_issued: AtomicUsize::new(0),
                expires_in: AtomicU64::new(3600),
                token_delay_ms: AtomicU64::new(0),
                endpoint_delay_ms: AtomicU64::new(0),
                rejected: Mutex::default(),
                wrong_key: AtomicBool::new(false),
                ca: test_ca("Stub CA"),
                last_csr: Mutex::default(),
            })
        }
        fn hits(&self, path: &str) -> usize {
            self.hits.lock().unwrap().get(path).copied().unwrap_or(0)
        }
        fn set(&self, path: &str, c: Canned) {
            self.canned.lock().unwrap().insert(path.to_owned(), c);
        }
        fn last(&self, path: &str) -> Recorded {
            self.requests.lock().unwrap().iter().rev().find(|r| r.path == path).cloned().unwrap()
        }
        fn all(&self) -> Vec<Recorded> {
            self.requests.lock().unwrap().clone()
        }

        async fn handle(self: Arc<Self>, req: hyper::Request<Incoming>) -> hyper::Response<Full<Bytes>> {
            let method = req.method().to_string();
            let path = req.uri().path().to_owned();
            let query = req.uri().query().map(str::to_owned);
            let header = |n: &str| req.headers().get(n).map(|v| v.to_str().unwrap().to_owned());
            let authorization = header("authorization");
            let content_type = header("content-type");
            let body = req.into_body().collect().await.unwrap().to_bytes().to_vec();
            *self.hits.lock().unwrap().entry(path.clone()).or_default() += 1;
            self.requests.lock().unwrap().push(Recorded {
                method: method.clone(),
                path: path.clone(),
                query,
                authorization: authorization.clone(),
                body: body.clone(),
            });
            let reply = |c: Canned| {
                let mut r = hyper::Response::builder().status(c.status);
                for (k, v) in c.headers {
                    r = r.header(k, v);
                }
                r.body(Full::new(Bytes::from(c.body))).unwrap()
            };
            let refuse = |status: u16, why: &str| {
                reply(Canned { status, headers: vec![("x-error", why.to_owned())], body: vec![] })
            };

            if path == "/oauth2/token" {
                if method != "POST" || authorization.as_deref() != Some(EXPECTED_BASIC) {
                    return refuse(401, "invalid client");
                }
                if body != b"grant_type=client_credentials"
                    || content_type.as_deref() != Some("application/x-www-form-urlencoded")
                {
                    return refuse(400, "bad token request");
                }
                tokio::time::sleep(Duration::from_millis(self.token_delay_ms.load(Ordering::SeqCst))).await;
                if let Some(c) = self.canned.lock().unwrap().get(&path).cloned() {
                    return reply(c);
                }
                let n = self.tokens_issued.fetch_add(1, Ordering::SeqCst) + 1;
                let answer = json!({
                    "access_token": format!("tok-{n}"),
                    "token_type": "Bearer",
                    "expires_in": self.expires_in.load(Ordering::SeqCst),
                });
                return reply(canned(200, &answer));
            }
            if path.starts_with("/api/v1/gateway/") {
                let issued = self.tokens_issued.load(Ordering::SeqCst);
                let token = authorization.as_deref().and_then(|a| a.strip_prefix("Bearer ")).unwrap_or("");
                let known = (1..=issued).any(|n| format!("tok-{n}") == token);
                let rejected = {
                    let r = self.rejected.lock().unwrap();
                    r.contains(token) || r.contains("*")
                };
                if !known || rejected {
                    return refuse(401, "invalid access token");
                }
                tokio::time::sleep(Duration::from_millis(self.endpoint_delay_ms.load(Ordering::SeqCst))).await;
            }
            if let Some(c) = self.canned.lock().unwrap().get(&path).cloned() {
                return reply(c);
            }
            if path == "/api/v1/gateway/certificates" && method == "POST" {
                return reply(self.sign(&body));
            }
            refuse(404, "no such endpoint")
        }

        /// The issuing endpoint: checks the CSR and signs it with the stub CA.
        fn sign(&self, body: &[u8]) -> Canned {
            let req: Value = serde_json::from_slice(body).unwrap();
            let pem = req["csr"].as_str().unwrap();
            let block = x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes()).next().unwrap().unwrap();
            assert_eq!(block.label, "CERTIFICATE REQUEST");
            let (_, csr) =
                x509_parser::certification_request::X509CertificationRequest::from_der(&block.contents).unwrap();
            csr.verify_signature().expect("the CSR's self-signature verifies");
            let info = &csr.certification_request_info;
            let cn = info.subject.iter_common_name().next().unwrap().as_str().unwrap().to_owned();
            let mut sans = Vec::new();
            for ext in csr.requested_extensions().into_iter().flatten() {
                if let x509_parser::extensions::ParsedExtension::SubjectAlternativeName(san) = ext {
                    for n in &san.general_names {
                        sans.push(match n {
                            x509_parser::extensions::GeneralName::DNSName(d) => (*d).to_owned(),
                            x509_parser::extensions::GeneralName::IPAddress(ip) => match ip.len() {
                                4 => IpAddr::from(<[u8; 4]>::try_from(*ip).unwrap()).to_string(),
                                _ => IpAddr::from(<[u8; 16]>::try_from(*ip).unwrap()).to_string(),
                            },
                            other => panic!("unexpected SAN {other:?}"),
                        });
                    }
                }
            }
            *self.last_csr.lock().unwrap() = Some((cn, sans));
            let params = rcgen::CertificateSigningRequestParams::from_der(&block.contents.clone().into()).unwrap();
            let leaf = if self.wrong_key.load(Ordering::SeqCst) {
                let other = rcgen::KeyPair::generate().unwrap();
                params.params.signed_by(&other, &self.ca).unwrap()
            } else {
                params.signed_by(&self.ca).unwrap()
            };
            let chain_pem = format!("{}{}", leaf.pem(), self.ca.pem());
            canned(201, &json!({ "chain_pem": chain_pem, "not_after": 4_102_444_800_i64 }))
        }
    }

    async fn serve_conn<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(io: S, stub: Arc<Stub>) {
        let svc = service_fn(move |req| {
            let stub = stub.clone();
            async move { Ok::<_, Infallible>(stub.handle(req).await) }
        });
        let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(io), svc).await;
    }

    async fn start_plain(stub: Arc<Stub>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                tokio::spawn(serve_conn(tcp, stub.clone()));
            }
        });
        addr
    }

    fn config(issuer: String) -> RemoteConfig {
        RemoteConfig::new(issuer, CLIENT_ID, Zeroizing::new(SECRET.to_owned()))
    }

    async fn setup() -> (Arc<Stub>, Remote) {
        let stub = Stub::new();
        let addr = start_plain(stub.clone()).await;
        let remote = Remote::new(config(format!("http://{addr}"))).unwrap();
        (stub, remote)
    }

    const GRANTS: &str = "/api/v1/gateway/grants";
    const TOKEN: &str = "/oauth2/token";

    fn grants_answer() -> Canned {
        canned(
            200,
            &json!({"grants": [
                {"org": "acme", "role": "payments:admin", "permission": "payments.invoice.read"},
                {"org": "acme", "role": "payments:admin", "permission": "payments.invoice.write"},
                {"org": "globex", "role": "payments:reader", "permission": "payments.invoice.read"},
                {"org": "acme", "role": "not a role", "permission": "payments.invoice.read"},
                {"org": "acme", "role": "payments:admin", "permission": "payments-read"},
                {"org": "Bad Org", "role": "payments:admin", "permission": "payments.invoice.read"},
                {"org": "acme", "role": "payments:admin"},
                "nonsense",
            ]}),
        )
    }

    fn perm(s: &str) -> PermissionName {
        PermissionName::parse(s).unwrap()
    }

    // ---- token handling ---------------------------------------------------------------------

    #[tokio::test]
    async fn token_is_fetched_once_with_basic_auth_and_reused() {
        let (stub, remote) = setup().await;
        stub.set(GRANTS, grants_answer());
        remote.grants().await.unwrap();
        remote.grants().await.unwrap();
        remote.trust().await.unwrap_err(); // 404, but with the same token
        assert_eq!(stub.hits(TOKEN), 1);
        assert_eq!(stub.hits(GRANTS), 2);
        for r in stub.all().iter().filter(|r| r.path.starts_with("/api/")) {
            assert_eq!(r.authorization.as_deref(), Some("Bearer tok-1"), "{}", r.path);
        }
    }

    #[tokio::test]
    async fn concurrent_callers_share_one_token_fetch() {
        let (stub, remote) = setup().await;
        stub.set(GRANTS, grants_answer());
        stub.token_delay_ms.store(200, Ordering::SeqCst);
        let remote = Arc::new(remote);
        let calls: Vec<_> = (0..8)
            .map(|_| {
                let r = remote.clone();
                tokio::spawn(async move { r.grants().await })
            })
            .collect();
        for c in calls {
            c.await.unwrap().unwrap();
        }
        assert_eq!(stub.hits(TOKEN), 1);
        assert_eq!(stub.hits(GRANTS), 8);
    }

    #[tokio::test]
    async fn token_is_replaced_30_seconds_before_it_expires() {
        let (stub, remote) = setup().await;
        stub.set(GRANTS, grants_answer());
        stub.expires_in.store(30, Ordering::SeqCst);
        remote.grants().await.unwrap();
        remote.grants().await.unwrap();
        assert_eq!(stub.hits(TOKEN), 2, "a token with 30 s left is not used again");
        assert_eq!(stub.last(GRANTS).authorization.as_deref(), Some("Bearer tok-2"));
        stub.expires_in.store(31, Ordering::SeqCst);
        remote.grants().await.unwrap();
        remote.grants().await.unwrap();
        assert_eq!(stub.hits(TOKEN), 3, "31 s: kept for a second");
    }

    #[tokio::test]
    async fn a_401_gets_a_new_token_and_one_retry() {
        let (stub, remote) = setup().await;
        stub.set(GRANTS, grants_answer());
        stub.rejected.lock().unwrap().insert("tok-1".into());
        let g = remote.grants().await.unwrap();
        assert_eq!(g.len(), 3);
        assert_eq!(stub.hits(TOKEN), 2);
        assert_eq!(stub.hits(GRANTS), 2);
        assert_eq!(stub.last(GRANTS).authorization.as_deref(), Some("Bearer tok-2"));
        // The new token is kept.
        remote.grants().await.unwrap();
        assert_eq!(stub.hits(TOKEN), 2);
        assert_eq!(stub.hits(GRANTS), 3);
    }

    #[tokio::test]
    async fn a_second_401_is_unavailable_without_more_retries() {
        let (stub, remote) = setup().await;
        stub.set(GRANTS, grants_answer());
        stub.rejected.lock().unwrap().insert("*".into());
        let e = remote.grants().await.unwrap_err();
        assert!(e.0.contains("HTTP 401") && e.0.contains("invalid access token"), "{e}");
        assert_eq!(stub.hits(TOKEN), 2);
        assert_eq!(stub.hits(GRANTS), 2);
    }

    #[tokio::test]
    async fn refused_client_credentials_are_unavailable_and_never_reach_endpoints() {
        let stub = Stub::new();
        let addr = start_plain(stub.clone()).await;
        let mut c = config(format!("http://{addr}"));
        c.client_secret = Zeroizing::new("wrong".into());
        let remote = Remote::new(c).unwrap();
        stub.set(GRANTS, grants_answer());
        let e = remote.grants().await.unwrap_err();
        assert!(e.0.contains("/oauth2/token") && e.0.contains("HTTP 401") && e.0.contains("invalid client"), "{e}");
        assert_eq!(stub.hits(GRANTS), 0);
        assert!(!e.0.contains("wrong"));
    }

    #[tokio::test]
    async fn a_token_answer_that_is_not_bearer_is_unavailable() {
        let (stub, remote) = setup().await;
        stub.set(GRANTS, grants_answer());
        stub.set(TOKEN, canned(200, &json!({"access_token": "t", "token_type": "DPoP", "expires_in": 60})));
        assert!(remote.grants().await.unwrap_err().0.contains("token_type"));
        stub.set(TOKEN, canned(200, &json!({"access_token": 7, "token_type": "Bearer"})));
        assert!(remote.grants().await.unwrap_err().0.contains("malformed"));
        assert_eq!(stub.hits(GRANTS), 0);
    }

    // ---- each endpoint ------------------------------------------------------------------------

    #[tokio::test]
    async fn signing_keys_read_the_public_jwks_and_skip_unusable_keys() {
        let (stub, remote) = setup().await;
        let (es, _) = SigningKey::generate(Algorithm::ES256).unwrap();
        let (ed, _) = SigningKey::generate(Algorithm::EdDSA).unwrap();
        let mut private = es.verifying_key().jwk();
        private["d"] = "AAAA".into();
        let jwks = json!({"keys": [
            es.verifying_key().jwk(),
            {"kty": "oct", "k": "c2VjcmV0", "alg": "HS256", "kid": "hmac"},
            private,
            ed.verifying_key().jwk(),
        ]});
        stub.set("/oauth2/jwks", canned(200, &jwks));
        let keys = remote.signing_keys().await.unwrap();
        assert_eq!(keys, vec![es.verifying_key().clone(), ed.verifying_key().clone()]);
        let sig = es.sign(b"m").unwrap();
        assert!(keys[0].verify(b"m", &sig));
        let r = stub.last("/oauth2/jwks");
        assert_eq!((r.method.as_str(), r.authorization), ("GET", None), "the JWKS is fetched without credentials");
        assert_eq!(stub.hits(TOKEN), 0);

        stub.set("/oauth2/jwks", canned(200, &json!({"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "h"}]})));
        assert!(remote.signing_keys().await.unwrap_err().0.contains("no usable signing key"));
        stub.set("/oauth2/jwks", canned(200, &json!({"keys": []})));
        assert!(remote.signing_keys().await.is_err());
    }

    #[tokio::test]
    async fn trust_decodes_anchors_and_crls_and_refuses_any_bad_entry() {
        let (stub, remote) = setup().await;
        let ca = test_ca("Client CA");
        let crl = rcgen::CertificateRevocationListParams {
            this_update: rcgen::date_time_ymd(2025, 1, 1),
            next_update: rcgen::date_time_ymd(2025, 1, 2),
            crl_number: rcgen::SerialNumber::from_slice(&[1]),
            issuing_distribution_point: None,
            revoked_certs: vec![],
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        }
        .signed_by(&ca)
        .unwrap();
        let (ca_der, crl_der) = (ca.der().to_vec(), crl.der().to_vec());
        let path = "/api/v1/gateway/trust";
        stub.set(path, canned(200, &json!({"anchors": [B64.encode(&ca_der)], "crls": [B64.encode(&crl_der)]})));
        let t = remote.trust().await.unwrap();
        assert_eq!(t, TrustBundle { anchors: vec![ca_der.clone()], crls: vec![crl_der.clone()] });
        assert_eq!(stub.last(path).method, "GET");

        for bad in [
            json!({"anchors": [B64.encode(&ca_der)], "crls": ["!!not base64"]}),
            json!({"anchors": [B64.encode(&ca_der)], "crls": [B64.encode(&ca_der)]}),
            json!({"anchors": [B64.encode(&crl_der)], "crls": []}),
            json!({"anchors": [B64.encode(b"junk")]}),
            json!({"crls": []}),
        ] {
            stub.set(path, canned(200, &bad));
            assert!(remote.trust().await.is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn grants_parse_and_skip_malformed_entries() {
        let (stub, remote) = setup().await;
        stub.set(GRANTS, grants_answer());
        let g = remote.grants().await.unwrap();
        assert_eq!(g.len(), 3);
        let admin = vec!["payments:admin".to_owned()];
        let reader = vec!["payments:reader".to_owned()];
        assert!(g.holds("acme", &admin, &perm("payments.invoice.read")));
        assert!(g.holds("acme", &admin, &perm("payments.invoice.write")));
        assert!(g.holds("globex", &reader, &perm("payments.invoice.read")));
        assert!(!g.holds("acme", &reader, &perm("payments.invoice.read")));
        assert!(!g.holds("globex", &admin, &perm("payments.invoice.read")));
    }

    #[tokio::test]
    async fn changes_pass_cursor_and_wait_and_parse_the_page() {
        let (stub, remote) = setup().await;
        let path = "/api/v1/gateway/changes";
        stub.set(
            path,
            canned(
                200,
                &json!({
                    "cursor": "c-2",
                    "revoked_tokens": [{"jti": "j1", "expires_at": 1_700_000_000}],
                    "principals": true, "grants": false, "trust": true, "keys": false, "reset": true,
                }),
            ),
        );
        let c = remote.changes(None, Duration::from_secs(45)).await.unwrap();
        assert_eq!(
            c,
            Changes {
                cursor: "c-2".into(),
                revoked_tokens: vec![RevokedToken { jti: "j1".into(), expires_at: 1_700_000_000 }],
                principals: true,
                grants: false,
                trust: true,
                keys: false,
                reset: true,
            }
        );
        assert_eq!(stub.last(path).query.as_deref(), Some("wait=30"), "no cursor; wait capped to 30 s");

        let cursor = "a b&c=d/é+%";
        remote.changes(Some(cursor), Duration::from_millis(2_900)).await.unwrap();
        let q = stub.last(path).query.unwrap();
        let pairs: Vec<(String, String)> =
            Url::parse(&format!("http://x/?{q}")).unwrap().query_pairs().into_owned().collect();
        assert_eq!(pairs, vec![("cursor".into(), cursor.into()), ("wait".into(), "2".into())], "{q}");

        // Flags default to false; a missing cursor is malformed.
        stub.set(path, canned(200, &json!({"cursor": "c-3"})));
        assert_eq!(
            remote.changes(None, Duration::ZERO).await.unwrap(),
            Changes { cursor: "c-3".into(), ..Changes::default() }
        );
        stub.set(path, canned(200, &json!({"revoked_tokens": []})));
        assert!(remote.changes(None, Duration::ZERO).await.is_err());
    }

    #[tokio::test]
    async fn the_change_feed_may_take_wait_plus_the_request_timeout() {
        let stub = Stub::new();
        let addr = start_plain(stub.clone()).await;
        let mut c = config(format!("http://{addr}"));
        c.request_timeout = Duration::from_millis(1_000);
        let remote = Remote::new(c).unwrap();
        stub.set("/api/v1/gateway/changes", canned(200, &json!({"cursor": "c"})));
        stub.set(GRANTS, grants_answer());
        remote.grants().await.unwrap(); // the token, before the endpoints slow down
        stub.endpoint_delay_ms.store(1_600, Ordering::SeqCst);
        assert_eq!(remote.changes(None, Duration::from_secs(1)).await.unwrap().cursor, "c");
        let e = remote.grants().await.unwrap_err();
        assert!(e.0.contains("timed out"), "{e}");
    }

    fn identity_answer() -> Value {
        json!({"valid": true, "identity": {
            "subject": "u-1", "client_id": "acme$web", "org": "acme",
            "roles": ["payments:admin"], "scopes": ["payments/read"],
        }})
    }

    fn expected_identity(auth_method: AuthMethod) -> Identity {
        Identity {
            subject: "u-1".into(),
            client_id: "acme$web".into(),
            org: "acme".into(),
            roles: vec!["payments:admin".into()],
            scopes: vec!["payments/read".into()],
            audiences: vec![],
            auth_method,
        }
    }

    #[tokio::test]
    async fn credential_checks_send_their_fields_and_read_identities() {
        let (stub, remote) = setup().await;
        let ip: IpAddr = "203.0.113.7".parse().unwrap();
        for p in ["api-keys", "sessions", "certificates"] {
            stub.set(&format!("/api/v1/gateway/{p}/check"), canned(200, &identity_answer()));
        }
        let body = |p: &str| -> Value {
            let r = stub.last(&format!("/api/v1/gateway/{p}/check"));
            assert_eq!(r.method, "POST");
            serde_json::from_slice(&r.body).unwrap()
        };

        let v = remote.api_key("ak-1", "as-secret", Some(ip)).await.unwrap();
        assert_eq!(v, Ok(expected_identity(AuthMethod::ApiKey)));
        assert_eq!(body("api-keys"), json!({"api_key": "ak-1", "api_secret": "as-secret", "client_ip": "203.0.113.7"}));
        remote.api_key("ak-1", "as-secret", None).await.unwrap().unwrap();
        assert_eq!(body("api-keys"), json!({"api_key": "ak-1", "api_secret": "as-secret"}));

        let v = remote.session("st-1", Some(ip)).await.unwrap();
        assert_eq!(v, Ok(expected_identity(AuthMethod::Session)));
        assert_eq!(body("sessions"), json!({"session_token": "st-1", "client_ip": "203.0.113.7"}));
        remote.session("st-1", None).await.unwrap().unwrap();
        assert_eq!(body("sessions"), json!({"session_token": "st-1"}));

        let v = remote.certificate(b"\x30\x03der").await.unwrap();
        assert_eq!(v, Ok(expected_identity(AuthMethod::Mtls)));
        assert_eq!(body("certificates"), json!({"certificate": "MANkZXI="}));

        // Roles and scopes may be omitted; an identity is required when valid.
        stub.set(
            "/api/v1/gateway/sessions/check",
            canned(200, &json!({"valid": true, "identity": {"subject": "u", "client_id": "a$b", "org": "a"}})),
        );
        let id = remote.session("st", None).await.unwrap().unwrap();
        assert!(id.roles.is_empty() && id.scopes.is_empty());
        stub.set("/api/v1/gateway/sessions/check", canned(200, &json!({"valid": true})));
        assert!(remote.session("st", None).await.is_err());
    }

    #[tokio::test]
    async fn browser_sign_ins_send_the_code_and_read_a_session_or_a_refusal() {
        let (stub, remote) = setup().await;
        assert_eq!(remote.own_client_id(), Some(remote.client_id.as_str()));
        let path = "/api/v1/gateway/browser-sessions";
        let ip: IpAddr = "203.0.113.7".parse().unwrap();
        stub.set(path, canned(200, &json!({"valid": true, "session_token": "pcs_tok", "expires_at": 1_900_000_000})));
        let s = remote.browser_session("acme$gw", "c0de", "v3rifier", "https://gw/.portcullis/callback", Some(ip));
        let s = s.await.unwrap().unwrap();
        assert_eq!((s.token.as_str(), s.expires_at), ("pcs_tok", 1_900_000_000));
        assert!(!format!("{s:?}").contains("pcs_tok"), "Debug hides the token");
        let sent: Value = serde_json::from_slice(&stub.last(path).body).unwrap();
        assert_eq!(
            sent,
            json!({"client_id": "acme$gw", "code": "c0de", "code_verifier": "v3rifier",
                   "redirect_uri": "https://gw/.portcullis/callback", "client_ip": "203.0.113.7"})
        );

        // Refusals keep their status and cleaned message.
        stub.set(path, canned(200, &json!({"valid": false, "status": 401, "message": "sign-in refused: used"})));
        let r = remote.browser_session("acme$gw", "c", "v", "https://gw/cb", None).await.unwrap().unwrap_err();
        assert_eq!((r.status, r.message.as_str()), (401, "sign-in refused: used"));
        // A "valid" answer without a token, or with one that is no cookie value, is unusable.
        for bad in [
            json!({"valid": true, "expires_at": 1}),
            json!({"valid": true, "session_token": "pcs_x"}),
            json!({"valid": true, "session_token": "a;b", "expires_at": 1}),
            json!({"valid": true, "session_token": "", "expires_at": 1}),
        ] {
            stub.set(path, canned(200, &bad));
            assert!(remote.browser_session("acme$gw", "c", "v", "https://gw/cb", None).await.is_err(), "{bad}");
        }
        stub.set(path, canned(503, &json!({"error": "down"})));
        assert!(remote.browser_session("acme$gw", "c", "v", "https://gw/cb", None).await.is_err());
    }

    #[tokio::test]
    async fn refusals_map_status_message_and_retry_after() {
        let (stub, remote) = setup().await;
        let path = "/api/v1/gateway/api-keys/check";
        let cases = [
            (json!({"valid": false, "status": 401, "message": "unknown API key"}), 401, "unknown API key", None),
            (json!({"valid": false, "status": 403, "message": "API key disabled"}), 403, "API key disabled", None),
            (
                json!({"valid": false, "status": 429, "message": "too many failures", "retry_after": 30}),
                429,
                "too many failures",
                Some(30),
            ),
            (json!({"valid": false, "status": 500, "message": "odd"}), 401, "odd", None),
            (json!({"valid": false, "status": 404, "message": "gone"}), 401, "gone", None),
            (json!({"valid": false}), 401, "the credential was refused", None),
            (
                json!({"valid": false, "status": 403, "message": "line\r\nx-injected: 1"}),
                403,
                "linex-injected: 1",
                None,
            ),
        ];
        for (answer, status, message, retry_after_secs) in cases {
            stub.set(path, canned(200, &answer));
            let v = remote.api_key("k", "s", None).await.unwrap();
            assert_eq!(v, Err(Refusal { status, message: message.into(), retry_after_secs }), "{answer}");
        }
    }

    #[tokio::test]
    async fn non_200_answers_are_unavailable_with_status_and_x_error() {
        let (stub, remote) = setup().await;
        let path = "/api/v1/gateway/sessions/check";
        for status in [500, 503, 400, 403, 404, 201] {
            stub.set(
                path,
                Canned {
                    status,
                    headers: vec![("x-error", "database down".into()), ("x-error-id", "e-42".into())],
                    body: serde_json::to_vec(&identity_answer()).unwrap(),
                },
            );
            let e = remote.session("secret-session-token", None).await.unwrap_err();
            assert!(e.0.contains(&format!("HTTP {status}")), "{e}");
            assert!(e.0.contains("database down") && e.0.contains("e-42") && e.0.contains("sessions/check"), "{e}");
            assert!(!e.0.contains("secret-session-token"));
        }
        assert_eq!(stub.hits(TOKEN), 1, "only a 401 fetches a new token");
        stub.set("/oauth2/jwks", Canned { status: 502, headers: vec![], body: vec![] });
        assert!(remote.signing_keys().await.unwrap_err().0.contains("HTTP 502"));
    }

    #[tokio::test]
    async fn oversized_answers_are_unavailable() {
        let (stub, remote) = setup().await;
        let mut big = br#"{"grants": [], "pad": ""#.to_vec();
        big.resize(MAX_BODY_BYTES + 1 - 2, b'x');
        big.extend_from_slice(br#""}"#);
        assert_eq!(big.len(), MAX_BODY_BYTES + 1);
        stub.set(GRANTS, Canned { status: 200, headers: vec![], body: big.clone() });
        assert!(remote.grants().await.unwrap_err().0.contains("larger than"));
        // Exactly at the limit is fine.
        big.remove(big.len() - 3);
        assert_eq!(big.len(), MAX_BODY_BYTES);
        stub.set(GRANTS, Canned { status: 200, headers: vec![], body: big });
        assert!(remote.grants().await.unwrap().is_empty());
    }

    /// A raw HTTP/1.1 responder for `/oauth2/jwks` that answers chunked (no Content-Length) with
    /// more than the limit.
    #[tokio::test]
    async fn oversized_chunked_answers_are_unavailable() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = tokio::io::AsyncReadExt::read(&mut tcp, &mut buf).await;
                    let head =
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n";
                    if tcp.write_all(head.as_bytes()).await.is_err() {
                        return;
                    }
                    let chunk = vec![b' '; 64 * 1024];
                    for _ in 0..(MAX_BODY_BYTES / chunk.len() + 2) {
                        let mut c = format!("{:x}\r\n", chunk.len()).into_bytes();
                        c.extend_from_slice(&chunk);
                        c.extend_from_slice(b"\r\n");
                        if tcp.write_all(&c).await.is_err() {
                            return;
                        }
                    }
                    let _ = tcp.write_all(b"0\r\n\r\n").await;
                });
            }
        });
        let remote = Remote::new(config(format!("http://{addr}"))).unwrap();
        let e = remote.signing_keys().await.unwrap_err();
        assert!(e.0.contains("larger than"), "{e}");
    }

    #[tokio::test]
    async fn malformed_json_is_unavailable() {
        let (stub, remote) = setup().await;
        for body in [&b"{not json"[..], b"", br#"{"grants": {}}"#, b"[]"] {
            stub.set(GRANTS, Canned { status: 200, headers: vec![], body: body.to_vec() });
            assert!(remote.grants().await.unwrap_err().0.contains("malformed"), "{body:?}");
        }
        stub.set("/api/v1/gateway/api-keys/check", canned(200, &json!({"valid": "yes"})));
        assert!(remote.api_key("k", "s", None).await.is_err());
        stub.set("/api/v1/gateway/api-keys/check", Canned { status: 200, headers: vec![], body: b"<html>".to_vec() });
        assert!(remote.api_key("k", "s", None).await.is_err());
    }

    // ---- issue ----------------------------------------------------------------------------------

    #[tokio::test]
    async fn issue_sends_a_valid_csr_and_returns_the_matching_key() {
        let (stub, remote) = setup().await;
        let names = vec!["gw.acme.test".to_owned(), "127.0.0.1".to_owned()];
        let kp = remote.issue(CertificatePurpose::Server, &names).await.unwrap();
        let req: Value = serde_json::from_slice(&stub.last("/api/v1/gateway/certificates").body).unwrap();
        assert_eq!(req["purpose"], "server");
        assert_eq!(req["names"], json!(names));
        assert_eq!(
            stub.last_csr.lock().unwrap().clone().unwrap(),
            ("gw.acme.test".to_owned(), names.clone()),
            "CN and DNS + IP SANs"
        );
        assert_eq!(kp.chain.len(), 2);
        assert_eq!(kp.chain[1], stub.ca.der().to_vec());
        let (_, leaf) = x509_parser::parse_x509_certificate(&kp.chain[0]).unwrap();
        assert_eq!(kp.not_after, leaf.validity().not_after.timestamp().min(4_102_444_800));
        // The private key is the leaf's: sign with it, verify with the certificate's key.
        let signer = aws_lc_rs::signature::EcdsaKeyPair::from_pkcs8(
            &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            &kp.key_pkcs8,
        )
        .unwrap();
        let sig = signer.sign(&aws_lc_rs::rand::SystemRandom::new(), b"hello").unwrap();
        aws_lc_rs::signature::UnparsedPublicKey::new(
            &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1,
            leaf.public_key().subject_public_key.data.as_ref(),
        )
        .verify(b"hello", sig.as_ref())
        .unwrap();
        assert!(!format!("{kp:?}").contains("key_pkcs8"));

        let kp = remote.issue(CertificatePurpose::UpstreamClient, &[]).await.unwrap();
        let req: Value = serde_json::from_slice(&stub.last("/api/v1/gateway/certificates").body).unwrap();
        assert_eq!(req["purpose"], "upstream_client");
        assert_eq!(stub.last_csr.lock().unwrap().clone().unwrap(), ("portcullis-gateway".to_owned(), vec![]));
        assert_eq!(kp.chain.len(), 2);
    }

    #[tokio::test]
    async fn issue_refuses_a_certificate_for_another_key_and_bad_answers() {
        let (stub, remote) = setup().await;
        stub.wrong_key.store(true, Ordering::SeqCst);
        let names = vec!["gw.acme.test".to_owned()];
        let e = remote.issue(CertificatePurpose::Server, &names).await.unwrap_err();
        assert!(e.0.contains("not for the key"), "{e}");
        stub.wrong_key.store(false, Ordering::SeqCst);

        let path = "/api/v1/gateway/certificates";
        for (status, body) in [
            (200, json!({"chain_pem": stub.ca.pem(), "not_after": 1})),
            (201, json!({"chain_pem": "", "not_after": 1})),
            (
                201,
                json!({"chain_pem": "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "not_after": 1}),
            ),
            (
                201,
                json!({"chain_pem": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "not_after": 1}),
            ),
            (201, json!({"chain_pem": stub.ca.pem()})),
        ] {
            stub.set(path, canned(status, &body));
            assert!(remote.issue(CertificatePurpose::Server, &names).await.is_err(), "{status} {body}");
        }

        // A server certificate needs a name; nothing is sent.
        let before = stub.hits(path);
        assert!(remote.issue(CertificatePurpose::Server, &[]).await.is_err());
        assert!(remote.issue(CertificatePurpose::Server, &["".to_owned()]).await.is_err());
        assert_eq!(stub.hits(path), before);
    }

    // ---- configuration, TLS, secrets ------------------------------------------------------------

    #[test]
    fn configuration_is_checked() {
        let ok = |issuer: &str| Remote::new(config(issuer.into()));
        assert!(ok("https://idp.example:8080").is_ok());
        assert!(ok("https://idp.example/portcullis/").is_ok());
        assert!(ok("http://127.0.0.1:8080").is_ok());
        assert!(ok("http://localhost:8080").is_ok());
        assert!(ok("http://[::1]:8080").is_ok());
        for bad in [
            "http://idp.example",
            "ftp://idp.example",
            "idp.example",
            "https://u:p@idp.example",
            "https://idp.example/?a=b",
            "https://idp.example/#f",
        ] {
            assert!(ok(bad).is_err(), "{bad}");
        }
        let mut c = config("https://idp.example".into());
        c.request_timeout = Duration::ZERO;
        assert!(Remote::new(c).is_err());
        let mut c = config("https://idp.example".into());
        c.ca_pem = Some("not a pem".into());
        assert!(Remote::new(c).is_err());
        let mut c = config("https://idp.example".into());
        c.client_secret = Zeroizing::new(String::new());
        assert!(Remote::new(c).is_err());
        assert_eq!(ok("https://idp.example/").unwrap().issuer(), "https://idp.example/");
    }

    #[test]
    fn form_urlencoding_follows_rfc_6749_2_3_1() {
        assert_eq!(form_urlencode("aZ09*-._").as_str(), "aZ09*-._");
        assert_eq!(form_urlencode("a b+c/=:%$é~").as_str(), "a+b%2Bc%2F%3D%3A%25%24%C3%A9%7E");
    }

    #[tokio::test]
    async fn secrets_never_show_in_debug_output() {
        let (stub, remote) = setup().await;
        stub.set(GRANTS, grants_answer());
        remote.grants().await.unwrap();
        let c = config("https://idp.example".into());
        let shown = format!("{c:?} {remote:?}");
        assert!(!shown.contains(SECRET) && !shown.contains("tok-1"), "{shown}");
        assert!(shown.contains(CLIENT_ID));
    }

    /// The stub behind TLS with a server certificate from `ca`.
    async fn start_tls(stub: Arc<Stub>, ca: &rcgen::CertifiedIssuer<'static, rcgen::KeyPair>) -> SocketAddr {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap().signed_by(&key, ca).unwrap();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, stub) = (acceptor.clone(), stub.clone());
                tokio::spawn(async move {
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        serve_conn(tls, stub).await;
                    }
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn https_trusts_the_configured_ca_and_nothing_foreign() {
        let stub = Stub::new();
        let ca = test_ca("Control plane CA");
        let addr = start_tls(stub.clone(), &ca).await;
        stub.set(GRANTS, grants_answer());

        let mut c = config(format!("https://{addr}"));
        c.ca_pem = Some(ca.pem());
        let remote = Remote::new(c).unwrap();
        assert_eq!(remote.grants().await.unwrap().len(), 3);

        let mut c = config(format!("https://{addr}"));
        c.ca_pem = Some(test_ca("Other CA").pem());
        let remote = Remote::new(c).unwrap();
        let e = remote.grants().await.unwrap_err();
        assert!(e.0.contains("/oauth2/token"), "{e}");
        assert_eq!(stub.hits(TOKEN), 1, "the handshake fails before any request");
    }
}
