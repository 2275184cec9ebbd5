//! Upstream connections: one pooled HTTP/1.1 client per route (plain HTTP, or HTTPS trusting the
//! route's pinned CA — else our own CA — and presenting the platform transport certificate when
//! the route asks for upstream mTLS), the rewrite of a request's target onto the upstream, and
//! the classification of upstream failures into 502 and 504.

use std::sync::Arc;
use std::time::Duration;

use http::Uri;
use http::uri::{Authority, PathAndQuery, Scheme};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;

use crate::config::Route;
use crate::respond::Body;
use crate::tls::{CertSlot, ClientCert, provider};

/// The pooled client of one route.
pub type UpstreamClient = Client<HttpsConnector<HttpConnector>, Body>;

/// Reads every certificate of a PEM file (the core's strict reader); an empty file is refused.
fn read_pem_certificates(path: &std::path::Path) -> Result<Vec<Vec<u8>>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let certs = portcullis_core::pki::pem_certificates(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no CERTIFICATE", path.display()));
    }
    Ok(certs)
}

/// Builds the client for `route`. `our_anchors` are the platform CA certificates (trusted for
/// HTTPS upstreams without `upstream_ca_file`); `transport` is the platform transport
/// certificate, presented when the route sets `upstream_client_certificate`.
pub fn client_for(route: &Route, our_anchors: &[Vec<u8>], transport: &Arc<CertSlot>) -> Result<UpstreamClient, String> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(route.connect_timeout));
    let mut roots = RootCertStore::empty();
    if route.upstream.https {
        let pinned = match &route.upstream_ca_file {
            Some(path) => read_pem_certificates(path)?,
            None => our_anchors.to_vec(),
        };
        for der in pinned {
            roots.add(CertificateDer::from(der)).map_err(|e| format!("upstream CA certificate: {e}"))?;
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    // No ALPN here: the connector sets it (http/1.1) and panics if it is already set.
    let tls = if route.upstream_client_certificate {
        builder.with_client_cert_resolver(Arc::new(ClientCert(transport.clone())))
    } else {
        builder.with_no_client_auth()
    };
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(512)
        .pool_timer(TokioTimer::new())
        .build(connector))
}

/// The upstream URI for a request: the route's scheme and authority, the upstream's base path
/// (without its trailing `/`) followed by the request's path and query, unchanged.
pub fn upstream_uri(route: &Route, path_and_query: Option<&PathAndQuery>) -> Result<Uri, String> {
    let base = route.upstream.uri.path().trim_end_matches('/');
    let pq = path_and_query.map_or("/", PathAndQuery::as_str);
    let joined = if base.is_empty() { pq.to_owned() } else { format!("{base}{pq}") };
    let scheme = if route.upstream.https { Scheme::HTTPS } else { Scheme::HTTP };
    let authority: Authority =
        route.upstream.uri.authority().cloned().ok_or_else(|| "the upstream URL has no authority".to_owned())?;
    Uri::builder().scheme(scheme).authority(authority).path_and_query(joined).build().map_err(|e| e.to_string())
}

/// Why forwarding failed, for the status and the `x-error` text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamFailure {
    /// The request body exceeded the route's `max_body_bytes` while streaming (413).
    BodyTooLarge,
    /// No connection (refused, DNS, TLS handshake): 502.
    Connect,
    /// The connection broke or the upstream answered something that is not HTTP: 502.
    Protocol,
}

/// Classifies a client error by walking its source chain.
pub fn classify(err: &hyper_util::client::legacy::Error) -> UpstreamFailure {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(err);
    while let Some(e) = source {
        if e.is::<http_body_util::LengthLimitError>() {
            return UpstreamFailure::BodyTooLarge;
        }
        source = e.source();
    }
    if err.is_connect() { UpstreamFailure::Connect } else { UpstreamFailure::Protocol }
}
