//! TLS for the gateway: the listener's rustls configuration, the client-certificate trust that
//! follows the control plane's CA set and CRLs, and hot-swappable certificates (the listener's
//! server certificate and the platform transport certificate for upstream mTLS), so renewal and
//! revocation take effect without a restart.
//!
//! Client certificates must chain to one of our CAs ([`TrustBundle::anchors`]) and must not be on
//! a CRL; self-signed and foreign certificates fail the handshake. TLS session resumption is off
//! (no session cache, no tickets): every connection proves its certificate against the CRL of
//! the moment, so a revoked certificate cannot come back on a resumed session.

use std::sync::{Arc, RwLock};

use rustls::client::ResolvesClientCert;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, NoServerSessionStorage, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};

use crate::control::{IssuedKeyPair, TrustBundle};

/// The crypto provider of every TLS object here (aws-lc-rs).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The current client-certificate verifier, rebuilt from each new [`TrustBundle`].
#[derive(Default)]
pub struct ClientTrust {
    current: RwLock<Option<Arc<dyn ClientCertVerifier>>>,
}

impl std::fmt::Debug for ClientTrust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let loaded = self.current.read().map(|c| c.is_some()).unwrap_or(false);
        f.debug_struct("ClientTrust").field("loaded", &loaded).finish()
    }
}

impl ClientTrust {
    /// Replaces the trust with `bundle`. On error (no anchors, an unparsable certificate or CRL)
    /// the previous trust stays.
    pub fn update(&self, bundle: &TrustBundle) -> Result<(), String> {
        let mut roots = RootCertStore::empty();
        for der in &bundle.anchors {
            roots.add(CertificateDer::from(der.clone())).map_err(|e| format!("CA certificate: {e}"))?;
        }
        if roots.is_empty() {
            return Err("the control plane sent no CA certificate".into());
        }
        let crls = bundle.crls.iter().map(|d| CertificateRevocationListDer::from(d.clone())).collect::<Vec<_>>();
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .with_crls(crls)
            .only_check_end_entity_revocation()
            .allow_unauthenticated()
            .build()
            .map_err(|e| format!("client verifier: {e}"))?;
        let mut cur = self.current.write().map_err(|_| "trust lock poisoned".to_owned())?;
        *cur = Some(verifier);
        Ok(())
    }

    fn get(&self) -> Result<Arc<dyn ClientCertVerifier>, rustls::Error> {
        self.current
            .read()
            .ok()
            .and_then(|c| c.clone())
            .ok_or_else(|| rustls::Error::General("client certificate trust is not loaded yet".into()))
    }

    pub fn is_loaded(&self) -> bool {
        self.current.read().map(|c| c.is_some()).unwrap_or(false)
    }
}

/// The listener's [`ClientCertVerifier`]: asks for a certificate, requires one when `mandatory`
/// (mTLS `required`), and verifies it with the current [`ClientTrust`].
#[derive(Debug)]
struct Verifier {
    trust: Arc<ClientTrust>,
    mandatory: bool,
}

impl ClientCertVerifier for Verifier {
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
        self.trust.get()?.verify_client_cert(end_entity, intermediates, now)
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &provider().signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &provider().signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider().signature_verification_algorithms.supported_schemes()
    }
}

/// A certificate + key that can be replaced while connections use the old one.
#[derive(Default)]
pub struct CertSlot {
    current: RwLock<Option<(Arc<CertifiedKey>, i64)>>,
}

impl std::fmt::Debug for CertSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertSlot").field("not_after", &self.not_after()).finish()
    }
}

impl CertSlot {
    /// Installs `issued` (chain + PKCS#8 key) as the certificate to present.
    pub fn set(&self, issued: &IssuedKeyPair) -> Result<(), String> {
        let chain = issued.chain.iter().map(|d| CertificateDer::from(d.clone())).collect::<Vec<_>>();
        let key = PrivateKeyDer::Pkcs8(issued.key_pkcs8.to_vec().into());
        let signing_key = provider().key_provider.load_private_key(key).map_err(|e| format!("private key: {e}"))?;
        let certified = Arc::new(CertifiedKey::new(chain, signing_key));
        let mut cur = self.current.write().map_err(|_| "certificate lock poisoned".to_owned())?;
        *cur = Some((certified, issued.not_after));
        Ok(())
    }

    fn get(&self) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().and_then(|c| c.as_ref().map(|(k, _)| k.clone()))
    }

    /// When the installed certificate expires (Unix seconds).
    pub fn not_after(&self) -> Option<i64> {
        self.current.read().ok().and_then(|c| c.as_ref().map(|(_, t)| *t))
    }
}

/// Serves the [`CertSlot`] to every TLS client (one certificate for all configured names).
#[derive(Debug)]
struct ServerCert(Arc<CertSlot>);

impl ResolvesServerCert for ServerCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.get()
    }
}

/// Presents the platform transport certificate to upstreams that ask for one.
#[derive(Debug)]
pub struct ClientCert(pub Arc<CertSlot>);

impl ResolvesClientCert for ClientCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.0.get()
    }
    fn has_certs(&self) -> bool {
        self.0.get().is_some()
    }
}

/// How the listener treats client certificates (`[gateway] mtls`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    Off,
    Optional,
    Required,
}

/// The listener's configuration: HTTP/2 and HTTP/1.1 by ALPN, the certificate of `cert`, client
/// certificates per `auth` checked against `trust`, no session resumption.
pub fn server_config(
    cert: Arc<CertSlot>,
    trust: Arc<ClientTrust>,
    auth: ClientAuth,
) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
    let builder = rustls::ServerConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let builder = match auth {
        ClientAuth::Off => builder.with_no_client_auth(),
        ClientAuth::Optional | ClientAuth::Required => {
            builder.with_client_cert_verifier(Arc::new(Verifier { trust, mandatory: auth == ClientAuth::Required }))
        }
    };
    let mut config = builder.with_cert_resolver(Arc::new(ServerCert(cert)));
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// SHA-256 of a certificate's DER.
pub fn sha256(der: &[u8]) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// What the gateway tells an upstream about a verified client certificate (XFCC).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCertificate {
    pub der: Arc<Vec<u8>>,
    pub sha256: [u8; 32],
    pub sha256_hex: String,
    /// RFC 4514 subject DN.
    pub subject: String,
    /// The first URI subject alternative name.
    pub san_uri: Option<String>,
}

impl PeerCertificate {
    /// Reads a verified leaf. `None` when the DER does not parse (the TLS layer verified it, so
    /// this does not happen in practice).
    pub fn from_der(der: Vec<u8>) -> Option<Self> {
        use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
        let (subject, san_uri) = {
            let (_, cert) = X509Certificate::from_der(&der).ok()?;
            let san_uri = cert.subject_alternative_name().ok().flatten().and_then(|san| {
                san.value.general_names.iter().find_map(|n| match n {
                    GeneralName::URI(u) => Some((*u).to_owned()),
                    _ => None,
                })
            });
            (cert.subject().to_string(), san_uri)
        };
        let sha256 = sha256(&der);
        let sha256_hex = portcullis_core::pki::hex(&sha256);
        Some(Self { der: Arc::new(der), sha256, sha256_hex, subject, san_uri })
    }
}
