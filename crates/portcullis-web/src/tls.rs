//! The optional TLS listener of `serve`: rustls with a server certificate (given, or issued by
//! our own CA at start), and client certificates `off`, `optional` or `required`. Client
//! certificates must chain to one of our issuing CAs and not be on its CRL: the verifier is
//! rebuilt whenever the CA set changes (every revocation signs a new CRL), and sessions are
//! never resumed, so a revoked certificate fails its next handshake. The verified leaf reaches
//! handlers as a [`PeerCertificate`] request extension (`tls_client_auth`, `POST /pki/renew`).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioExecutor, TokioIo};
use portcullis_core::Portcullis;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use tower::ServiceExt;

/// The DER of the client certificate the TLS layer verified for this connection.
#[derive(Debug, Clone)]
pub struct PeerCertificate(pub Arc<Vec<u8>>);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientCertMode {
    Off,
    Optional,
    Required,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Verifies client certificates against the core's current CA set and CRLs.
struct CaVerifier {
    core: Arc<Portcullis>,
    mandatory: bool,
    current: Mutex<(u64, Option<Arc<dyn ClientCertVerifier>>)>,
}

impl std::fmt::Debug for CaVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaVerifier").field("mandatory", &self.mandatory).finish_non_exhaustive()
    }
}

impl CaVerifier {
    /// The webpki verifier for the current CA set, rebuilt when the set changed.
    fn inner(&self) -> Result<Arc<dyn ClientCertVerifier>, rustls::Error> {
        let set = self.core.ca_set();
        let mut cur = self.current.lock().map_err(|_| rustls::Error::General("verifier lock poisoned".into()))?;
        if cur.0 == set.version
            && let Some(v) = &cur.1
        {
            return Ok(v.clone());
        }
        let mut roots = RootCertStore::empty();
        // Issuing CAs are anchors too, so a client that sends only its leaf is accepted.
        for der in set.anchors() {
            roots.add(CertificateDer::from(der)).map_err(|e| rustls::Error::General(format!("CA certificate: {e}")))?;
        }
        let crls =
            set.crl_ders().into_iter().map(rustls::pki_types::CertificateRevocationListDer::from).collect::<Vec<_>>();
        let mut b = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .with_crls(crls)
            .only_check_end_entity_revocation();
        if !self.mandatory {
            b = b.allow_unauthenticated();
        }
        let v = b.build().map_err(|e| rustls::Error::General(format!("client verifier: {e}")))?;
        *cur = (set.version, Some(v.clone()));
        Ok(v)
    }
}

impl ClientCertVerifier for CaVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }
    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner()?.verify_client_cert(end_entity, intermediates, now)
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner()?.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner()?.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider().signature_verification_algorithms.supported_schemes()
    }
}

/// The rustls configuration of the listener. `chain` is the server certificate then its
/// issuers; `key` its PKCS#8 key.
pub fn server_config(
    core: Arc<Portcullis>,
    chain: Vec<Vec<u8>>,
    key: Vec<u8>,
    mode: ClientCertMode,
) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
    let builder = rustls::ServerConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let builder = match mode {
        ClientCertMode::Off => builder.with_no_client_auth(),
        ClientCertMode::Optional | ClientCertMode::Required => {
            builder.with_client_cert_verifier(Arc::new(CaVerifier {
                core,
                mandatory: mode == ClientCertMode::Required,
                current: Mutex::new((0, None)),
            }))
        }
    };
    let chain = chain.into_iter().map(CertificateDer::from).collect();
    let key = PrivateKeyDer::Pkcs8(key.into());
    let mut config = builder.with_single_cert(chain, key)?;
    // No resumption: every connection proves its certificate against the current CRL.
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Serves `app` over TLS until `shutdown` resolves. Handshakes that fail (a refused client
/// certificate, a plain-HTTP client) are logged at debug level and closed.
pub async fn serve(
    listener: tokio::net::TcpListener,
    config: Arc<rustls::ServerConfig>,
    app: Router,
    shutdown: impl std::future::Future<Output = ()> + Send,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::pin!(shutdown);
    loop {
        let (tcp, addr) = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "TLS listener accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => return tracing::debug!(peer = %addr, error = %e, "TLS handshake refused"),
                Err(_) => return tracing::debug!(peer = %addr, "TLS handshake timed out"),
            };
            let peer = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| PeerCertificate(Arc::new(c.to_vec())));
            let svc = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(ConnectInfo::<SocketAddr>(addr));
                if let Some(p) = &peer {
                    req.extensions_mut().insert(p.clone());
                }
                app.clone().oneshot(req.map(axum::body::Body::new))
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            if let Err(e) = builder.serve_connection(TokioIo::new(tls), svc).await {
                tracing::debug!(peer = %addr, error = %e, "TLS connection ended with an error");
            }
        });
    }
}
