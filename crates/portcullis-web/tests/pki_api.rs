//! Handler tests of the certificate authority (DESIGN §3–4, docs/pki.md): issuance of every
//! profile for every key type, hostile and malformed CSRs, organisations' allowed domains,
//! the inventory and its filters, revocation with the CRL and its mail, renewal, the
//! per-application JWKS, `private_key_jwt` client assertions, `tls_client_auth`, expiry
//! notices and issuing-CA rotation. The real router over a real SQLite store, driven with
//! `oneshot`, a manual clock and an in-memory mailer; CSRs come from rcgen, certificates and
//! CRLs are read back with x509-parser, assertions are signed here with aws-lc-rs.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use aws_lc_rs::signature::{self as sig};
use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode, header};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD as B64, URL_SAFE_NO_PAD as B64URL};
use portcullis_core::clock::Clock;
use portcullis_web::tls::PeerCertificate;
use rcgen::{CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, PublicKeyData, SanType};
use serde_json::{Value, json};
use tower::ServiceExt;
use x509_parser::extensions::{DistributionPointName, GeneralName, ParsedExtension};

#[allow(dead_code)]
mod support;

use support::{ADMIN_SECRET, Env, ISS, env, env_with};

const ORG: &str = "acme";
const BILLING: &str = "acme$billing";
const SIGNER: &str = "acme$signer";
const MTLS: &str = "acme$mtls";
const PW: &str = "correct-horse-battery";
/// A user who administers acme: revocation and expiry mail goes to her.
const OLGA: &str = "olga@acme.test";
/// A plain user of acme.
const ANN: &str = "ann@acme.test";
/// The admin of the other organisation: never mailed about acme's certificates.
const BOB: &str = "bob@beta.test";
const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
const DAY: i64 = 86_400;

/// RSA 1024 (`openssl req -new -newkey rsa:1024 -subj '/CN=acme$billing/O=acme'`).
const RSA_1024_CSR: &str = "-----BEGIN CERTIFICATE REQUEST-----
MIIBZTCBzwIBADAmMRUwEwYDVQQDDAxhY21lJGJpbGxpbmcxDTALBgNVBAoMBGFj
bWUwgZ8wDQYJKoZIhvcNAQEBBQADgY0AMIGJAoGBAPOLFFgM/fA9bj37aJovElOw
rO/ALYNO4QcYZfFXAo1Qn5KUDsOGXqXd9JH6IBqlJGH+Ui8mvjHmiZH87f6FnetO
Hbx7XO4CWY0NXhgmcUMfXGV1m/mfavc0NQU0xr8x7+TPWWL0U0CHXwrwbiy4p+WU
ibUlSUuySghHuWcup02lAgMBAAGgADANBgkqhkiG9w0BAQsFAAOBgQDv6FXD8PFz
cot0rQID0R939CcCQcNH0eA0h7b2KWtvLWXkiAeLR0+bVvlmRKKZUMPHbtvdXE+9
5J1YdG64m3j+ebDREzBHPKwuXVxrZEr2b/3uYnnQofhG7rg2k0+q00haSrVoNqwZ
w0joBFcrF9JLzHdVyJjtiMaDF1Pd7t2gvw==
-----END CERTIFICATE REQUEST-----
";

/// P-256 signed with ecdsa-with-SHA1 (`openssl req … -sha1`), subject CN=acme$billing, O=acme.
const SHA1_CSR: &str = "-----BEGIN CERTIFICATE REQUEST-----
MIHgMIGIAgEAMCYxFTATBgNVBAMMDGFjbWUkYmlsbGluZzENMAsGA1UECgwEYWNt
ZTBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABJAWFR0vhoNqgu/smE8f079rTuJH
s4Kli86DyfWoKN6UCgCINsE9X/7jxGFBz6Ki2kkXRS8dH3i81aD4fkOFtligADAJ
BgcqhkjOPQQBA0gAMEUCICBvFeZDVGF6M6e+TJ27wNBHcihgCnz25/2w67EMVz0M
AiEAsjrFS+HZs2uLWj0yXoj7TiECz78rvFJN/MB+lDM1tbk=
-----END CERTIFICATE REQUEST-----
";

/// secp256k1 (a curve we do not accept), subject CN=acme$billing, O=acme.
const SECP256K1_CSR: &str = "-----BEGIN CERTIFICATE REQUEST-----
MIHfMIGFAgEAMCYxFTATBgNVBAMMDGFjbWUkYmlsbGluZzENMAsGA1UECgwEYWNt
ZTBWMBAGByqGSM49AgEGBSuBBAAKA0IABCRw+5a3IML7UvP5xRQLd2pn+Q70zZoP
rhcLjgjs9p7Vr1xEUcUM4lAoVhS9Tm3jnGn4x7KwUWVo/esqOv2lGJSgADAKBggq
hkjOPQQDAgNJADBGAiEA85ohbddiFapzNqDYUlamgjBhHzL3eXhkkpYJS7Lwc9wC
IQCoo3pdKSpy5bFxDHcOWndRdAqDnRzc43UftCwgohzoug==
-----END CERTIFICATE REQUEST-----
";

/// `-subj '/CN=acme$billing/CN=acme$billing'`: two attributes, but no O.
const CN_TWICE_CSR: &str = "-----BEGIN CERTIFICATE REQUEST-----
MIHoMIGQAgEAMC4xFTATBgNVBAMMDGFjbWUkYmlsbGluZzEVMBMGA1UEAwwMYWNt
ZSRiaWxsaW5nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE6U+Az9gf4kvxfrkO
sKzvxLEVNK89tjMNHshpKDbdNLnc9L4BkZXbkghvi52A+YQ+xPVQC7lPMO+yaFWC
X4h1x6AAMAoGCCqGSM49BAMCA0cAMEQCIFjYD/mKAu0vhZdhncq0V8MtsOBqn+7y
Jb+KqMEsIT5bAiA7zlfnp6dpDp+X4oq0XnC812tMzRRU7W8uvJKqWyGGvQ==
-----END CERTIFICATE REQUEST-----
";

/// `-subj '/CN=acme$billing/O=acme/O=acme'`.
const O_TWICE_CSR: &str = "-----BEGIN CERTIFICATE REQUEST-----
MIHwMIGXAgEAMDUxFTATBgNVBAMMDGFjbWUkYmlsbGluZzENMAsGA1UECgwEYWNt
ZTENMAsGA1UECgwEYWNtZTBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABEJuKf/d
YvuoPJgJ1GQtX/iZ2rX6nt7IbAXWUfIaqNNvK7xwEB62MGu6Q9Y1a7uGurtLsK6a
o4wTWJY3Syb4Rn+gADAKBggqhkjOPQQDAgNIADBFAiAT4WyZa759dMPRCT9IdRtZ
bm3slitGHorVjWBS/9s9YwIhANjS7kqNR7mKg1WB89co+Sg/qVlxAdooGO1Vj6oB
73GU
-----END CERTIFICATE REQUEST-----
";

// ---- HTTP harness ------------------------------------------------------------------------------

struct Resp {
    s: StatusCode,
    h: HeaderMap,
    bytes: Vec<u8>,
    v: Value,
}

impl Resp {
    /// The `x-error` header.
    fn err(&self) -> String {
        self.h.get("x-error").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default()
    }
    fn str(&self, k: &str) -> String {
        self.v[k].as_str().unwrap_or_else(|| panic!("no string {k:?} in {}", self.v)).to_owned()
    }
    fn text(&self) -> String {
        String::from_utf8(self.bytes.clone()).unwrap()
    }
    fn header(&self, h: header::HeaderName) -> String {
        self.h.get(h).map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default()
    }
    /// The ids of a list response.
    fn ids(&self) -> BTreeSet<String> {
        self.v["items"]
            .as_array()
            .unwrap_or_else(|| panic!("no items in {}", self.v))
            .iter()
            .map(|c| c["id"].as_str().unwrap().to_owned())
            .collect()
    }
}

async fn send(e: &Env, req: Request<Body>) -> Resp {
    let resp = e.app.clone().oneshot(req).await.unwrap();
    let s = resp.status();
    let h = resp.headers().clone();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX).await.unwrap().to_vec();
    let v = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    if !s.is_success() {
        assert!(h.contains_key("x-error") && h.contains_key("x-error-id"), "{s} without x-error/x-error-id: {v}");
    }
    Resp { s, h, bytes, v }
}

fn request(method: &str, path: &str, bearer: Option<&str>, body: Option<&Value>) -> Request<Body> {
    let mut b = Request::builder().method(method).uri(path);
    if let Some(t) = bearer {
        b = b.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let body = match body {
        Some(v) => {
            b = b.header(header::CONTENT_TYPE, "application/json");
            Body::from(v.to_string())
        }
        None => Body::empty(),
    };
    b.body(body).unwrap()
}

async fn call(e: &Env, method: &str, path: &str, bearer: &str, body: Option<Value>) -> Resp {
    send(e, request(method, path, Some(bearer), body.as_ref())).await
}

async fn public(e: &Env, path: &str) -> Resp {
    send(e, request("GET", path, None, None)).await
}

fn basic(id: &str, secret: &str) -> String {
    format!("Basic {}", B64.encode(format!("{id}:{secret}")))
}

/// `POST /oauth2/token` with a form body, optionally HTTP Basic, optionally a TLS client certificate.
async fn token_request(e: &Env, form: &str, basic_auth: Option<(&str, &str)>, peer: Option<&[u8]>) -> Resp {
    let mut b = Request::post("/oauth2/token").header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
    if let Some((id, secret)) = basic_auth {
        b = b.header(header::AUTHORIZATION, basic(id, secret));
    }
    let mut req = b.body(Body::from(form.to_owned())).unwrap();
    if let Some(der) = peer {
        req.extensions_mut().insert(PeerCertificate(Arc::new(der.to_vec())));
    }
    send(e, req).await
}

async fn secret_token(e: &Env, id: &str, secret: &str) -> String {
    let r = token_request(e, "grant_type=client_credentials", Some((id, secret)), None).await;
    assert_eq!(r.s, StatusCode::OK, "{}", r.v);
    r.str("access_token")
}

fn claims_of(jwt: &str) -> Value {
    serde_json::from_slice(&B64URL.decode(jwt.split('.').nth(1).unwrap()).unwrap()).unwrap()
}

// ---- fixture -----------------------------------------------------------------------------------

struct Fx {
    /// Platform admin (`portcullis$admin`).
    admin: String,
    /// An application holding `portcullis:org-admin` in acme.
    acme_admin: String,
    /// An application holding `portcullis:org-admin` in beta.
    beta_admin: String,
    /// An application holding `portcullis:gateway`: a valid platform token, but no admin.
    gateway: String,
    billing_secret: String,
    /// (client id, secret) of ops, beta's ops and gw, for fresh tokens after the clock moved.
    creds: [(String, String); 3],
}

impl Fx {
    /// New access tokens (the old ones expire when a test moves the clock by days).
    async fn refresh(&mut self, e: &Env) {
        self.admin = secret_token(e, "portcullis$admin", ADMIN_SECRET).await;
        let [ops, beta, gw] = &self.creds;
        self.acme_admin = secret_token(e, &ops.0, &ops.1).await;
        self.beta_admin = secret_token(e, &beta.0, &beta.1).await;
        self.gateway = secret_token(e, &gw.0, &gw.1).await;
    }
}

async fn create_app(e: &Env, admin: &str, org: &str, body: Value) -> Value {
    let r = call(e, "POST", &format!("/api/v1/organisations/{org}/applications"), admin, Some(body)).await;
    assert_eq!(r.s, StatusCode::CREATED, "{}", r.v);
    r.v
}

async fn add_user(e: &Env, admin: &str, org: &str, email: &str, roles: &[&str]) {
    let body = json!({"email": email, "password": PW, "roles": roles});
    let r = call(e, "POST", &format!("/api/v1/organisations/{org}/users"), admin, Some(body)).await;
    assert_eq!(r.s, StatusCode::CREATED, "{}", r.v);
}

/// Organisations `acme` and `beta`; in acme the applications `billing` (client_secret_basic),
/// `signer` (private_key_jwt), `mtls` (tls_client_auth), `ops` (org admin), `gw` (gateway);
/// users olga (org admin) and ann; in beta `ops` (org admin) and user bob (org admin).
async fn setup(e: &Env) -> Fx {
    let admin = secret_token(e, "portcullis$admin", ADMIN_SECRET).await;
    for (slug, name) in [("acme", "Acme"), ("beta", "Beta")] {
        let r = call(e, "POST", "/api/v1/organisations", &admin, Some(json!({"slug": slug, "name": name}))).await;
        assert_eq!(r.s, StatusCode::CREATED, "{}", r.v);
    }
    let billing = create_app(e, &admin, ORG, json!({"slug": "billing", "name": "Billing"})).await;
    let signer = create_app(
        e,
        &admin,
        ORG,
        json!({"slug": "signer", "name": "Signer", "token_endpoint_auth_method": "private_key_jwt"}),
    )
    .await;
    assert!(signer.get("client_secret").is_none_or(Value::is_null), "no secret for private_key_jwt: {signer}");
    create_app(
        e,
        &admin,
        ORG,
        json!({"slug": "mtls", "name": "Mtls", "token_endpoint_auth_method": "tls_client_auth"}),
    )
    .await;
    let ops =
        create_app(e, &admin, ORG, json!({"slug": "ops", "name": "Ops", "roles": ["portcullis:org-admin"]})).await;
    let gw = create_app(e, &admin, ORG, json!({"slug": "gw", "name": "Gw", "roles": ["portcullis:gateway"]})).await;
    let beta_ops =
        create_app(e, &admin, "beta", json!({"slug": "ops", "name": "Ops", "roles": ["portcullis:org-admin"]})).await;
    add_user(e, &admin, ORG, OLGA, &["portcullis:org-admin"]).await;
    add_user(e, &admin, ORG, ANN, &[]).await;
    add_user(e, &admin, "beta", BOB, &["portcullis:org-admin"]).await;
    let tok =
        |v: &Value| (v["client_id"].as_str().unwrap().to_owned(), v["client_secret"].as_str().unwrap().to_owned());
    let mut f = Fx {
        admin,
        acme_admin: String::new(),
        beta_admin: String::new(),
        gateway: String::new(),
        billing_secret: tok(&billing).1,
        creds: [tok(&ops), tok(&beta_ops), tok(&gw)],
    };
    f.refresh(e).await;
    f
}

async fn set_domains(e: &Env, bearer: &str, org: &str, domains: &[&str]) -> Resp {
    call(e, "PATCH", &format!("/api/v1/organisations/{org}"), bearer, Some(json!({"allowed_domains": domains}))).await
}

// ---- keys, CSRs, certificates --------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kt {
    P256,
    P384,
    Rsa3072,
    Ed25519,
}

impl Kt {
    const ALL: [Self; 4] = [Self::P256, Self::P384, Self::Rsa3072, Self::Ed25519];
    fn key(self) -> KeyPair {
        match self {
            Self::P256 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256),
            Self::P384 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384),
            Self::Rsa3072 => KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_3072),
            Self::Ed25519 => KeyPair::generate_for(&rcgen::PKCS_ED25519),
        }
        .unwrap()
    }
    fn inventory_name(self) -> &'static str {
        match self {
            Self::P256 => "EC P-256",
            Self::P384 => "EC P-384",
            Self::Rsa3072 => "RSA 3072",
            Self::Ed25519 => "Ed25519",
        }
    }
}

fn p256() -> KeyPair {
    Kt::P256.key()
}

fn dns(name: &str) -> SanType {
    SanType::DnsName(name.try_into().unwrap())
}

fn uri(u: &str) -> SanType {
    SanType::URI(u.try_into().unwrap())
}

/// A CSR signed by `key` with exactly the given subject attributes and SANs.
fn csr_with(key: &KeyPair, subject: &[(DnType, &str)], sans: Vec<SanType>, ask_ca: bool) -> String {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    for (t, v) in subject {
        dn.push(t.clone(), *v);
    }
    p.distinguished_name = dn;
    p.subject_alt_names = sans;
    if ask_ca {
        p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    }
    p.serialize_request(key).unwrap().pem().unwrap()
}

fn subject_of(client_id: &str) -> Vec<(DnType, &str)> {
    let org = client_id.split('$').next().unwrap();
    vec![(DnType::CommonName, client_id), (DnType::OrganizationName, org)]
}

/// The CSR the template asks for: `CN=<client id>, O=<org>`, with optional SANs.
fn csr(key: &KeyPair, client_id: &str, sans: Vec<SanType>) -> String {
    csr_with(key, &subject_of(client_id), sans, false)
}

fn pem_blocks(text: &str, label: &str) -> Vec<Vec<u8>> {
    let (begin, end) = (format!("-----BEGIN {label}-----"), format!("-----END {label}-----"));
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find(&begin) {
        let after = &rest[i + begin.len()..];
        let j = after.find(&end).unwrap_or_else(|| panic!("unterminated {label} block"));
        let b64: String = after[..j].split_whitespace().collect();
        out.push(B64.decode(b64).unwrap());
        rest = &after[j + end.len()..];
    }
    assert_eq!(text.matches("-----BEGIN ").count(), out.len(), "only {label} blocks expected in {text}");
    // Strict tools want every armour line on a line of its own.
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.iter().filter(|l| **l == begin).count(), out.len(), "BEGIN lines of their own: {text}");
    assert_eq!(lines.iter().filter(|l| **l == end).count(), out.len(), "END lines of their own: {text}");
    out
}

fn cert_der(pem: &str) -> Vec<u8> {
    let mut blocks = pem_blocks(pem, "CERTIFICATE");
    assert_eq!(blocks.len(), 1, "one certificate expected");
    blocks.remove(0)
}

fn sha256(data: &[u8]) -> Vec<u8> {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data).as_ref().to_vec()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn x5t(der: &[u8]) -> String {
    B64URL.encode(sha256(der))
}

/// What a test needs to know of a certificate, owned.
#[derive(Debug)]
struct Info {
    serial: Vec<u8>,
    subject: Vec<(String, String)>,
    issuer: String,
    uris: Vec<String>,
    dns: Vec<String>,
    other_sans: usize,
    /// (clientAuth, serverAuth, anything else)
    eku: Option<(bool, bool, bool)>,
    ku: Option<u16>,
    /// (critical, CA)
    basic_constraints: Option<(bool, bool)>,
    not_before: i64,
    not_after: i64,
    spki: Vec<u8>,
    crl_urls: Vec<String>,
    ski: Option<Vec<u8>>,
    aki: Option<Vec<u8>>,
}

fn inspect(der: &[u8]) -> Info {
    let (rest, c) = x509_parser::parse_x509_certificate(der).unwrap();
    assert!(rest.is_empty());
    let subject = c
        .subject()
        .iter_attributes()
        .map(|a| {
            let k = match a.attr_type().to_id_string().as_str() {
                "2.5.4.3" => "CN".to_owned(),
                "2.5.4.10" => "O".to_owned(),
                "2.5.4.11" => "OU".to_owned(),
                other => other.to_owned(),
            };
            (k, a.as_str().unwrap().to_owned())
        })
        .collect();
    let (mut uris, mut dns, mut other_sans) = (Vec::new(), Vec::new(), 0);
    if let Some(san) = c.subject_alternative_name().unwrap() {
        for g in &san.value.general_names {
            match g {
                GeneralName::URI(u) => uris.push((*u).to_owned()),
                GeneralName::DNSName(d) => dns.push((*d).to_owned()),
                _ => other_sans += 1,
            }
        }
    }
    let eku = c.extended_key_usage().unwrap().map(|e| {
        let v = e.value;
        let other =
            v.any || v.code_signing || v.email_protection || v.time_stamping || v.ocsp_signing || !v.other.is_empty();
        (v.client_auth, v.server_auth, other)
    });
    let ku = c.key_usage().unwrap().map(|k| k.value.flags);
    let (mut basic_constraints, mut crl_urls, mut ski, mut aki) = (None, Vec::new(), None, None);
    for ext in c.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::BasicConstraints(bc) => basic_constraints = Some((ext.critical, bc.ca)),
            ParsedExtension::CRLDistributionPoints(points) => {
                for p in points.iter() {
                    if let Some(DistributionPointName::FullName(names)) = &p.distribution_point {
                        for n in names {
                            if let GeneralName::URI(u) = n {
                                crl_urls.push((*u).to_owned());
                            }
                        }
                    }
                }
            }
            ParsedExtension::SubjectKeyIdentifier(k) => ski = Some(k.0.to_vec()),
            ParsedExtension::AuthorityKeyIdentifier(a) => aki = a.key_identifier.as_ref().map(|k| k.0.to_vec()),
            _ => {}
        }
    }
    Info {
        serial: c.raw_serial().to_vec(),
        subject,
        issuer: c.issuer().to_string(),
        uris,
        dns,
        other_sans,
        eku,
        ku,
        basic_constraints,
        not_before: c.validity().not_before.timestamp(),
        not_after: c.validity().not_after.timestamp(),
        spki: c.public_key().raw.to_vec(),
        crl_urls,
        ski,
        aki,
    }
}

fn subject_name(der: &[u8]) -> String {
    x509_parser::parse_x509_certificate(der).unwrap().1.subject().to_string()
}

/// Whether `der` is signed by the key of the certificate `issuer_der`.
fn signed_by(der: &[u8], issuer_der: &[u8]) -> bool {
    let (_, c) = x509_parser::parse_x509_certificate(der).unwrap();
    let (_, i) = x509_parser::parse_x509_certificate(issuer_der).unwrap();
    c.verify_signature(Some(i.public_key())).is_ok()
}

#[derive(Debug)]
struct CrlInfo {
    number: u64,
    /// (serial hex, reason code)
    entries: Vec<(String, Option<u8>)>,
    issuer: String,
    this_update: i64,
    next_update: i64,
}

/// Parses a DER CRL and checks its signature against `issuer_der`.
fn crl_info(der: &[u8], issuer_der: &[u8]) -> CrlInfo {
    let (rest, crl) = x509_parser::parse_x509_crl(der).unwrap();
    assert!(rest.is_empty());
    let (_, i) = x509_parser::parse_x509_certificate(issuer_der).unwrap();
    crl.verify_signature(i.public_key()).expect("the CRL is signed by its issuing CA");
    CrlInfo {
        number: crl.crl_number().expect("a CRL number").to_string().parse().unwrap(),
        entries: crl
            .iter_revoked_certificates()
            .map(|r| (hex(r.raw_serial()), r.reason_code().map(|(_, c)| c.0)))
            .collect(),
        issuer: crl.issuer().to_string(),
        this_update: crl.last_update().timestamp(),
        next_update: crl.next_update().expect("nextUpdate").timestamp(),
    }
}

/// `/pki/ca.pem` as DER certificates.
async fn ca_chain(e: &Env) -> Vec<Vec<u8>> {
    let r = public(e, "/pki/ca.pem").await;
    assert_eq!(r.s, StatusCode::OK);
    assert_eq!(r.header(header::CONTENT_TYPE), "application/x-pem-file");
    pem_blocks(&r.text(), "CERTIFICATE")
}

async fn issue(e: &Env, bearer: &str, org: &str, ty: &str, app: &str, csr: &str, validity_days: Option<i64>) -> Resp {
    let mut body = json!({"type": ty, "application": app, "csr": csr});
    if let Some(d) = validity_days {
        body["validity_days"] = json!(d);
    }
    call(e, "POST", &format!("/api/v1/organisations/{org}/certificates"), bearer, Some(body)).await
}

/// Issues in acme and asserts 201; returns the response body.
async fn issue_ok(e: &Env, bearer: &str, ty: &str, app: &str, csr: &str, validity_days: Option<i64>) -> Value {
    let r = issue(e, bearer, ORG, ty, app, csr, validity_days).await;
    assert_eq!(r.s, StatusCode::CREATED, "{ty} for {app}: {} {}", r.err(), r.v);
    r.v
}

fn der_of(v: &Value) -> Vec<u8> {
    cert_der(v["certificate_pem"].as_str().unwrap())
}

fn cert_path(id: &str) -> String {
    format!("/api/v1/organisations/{ORG}/certificates/{id}")
}

async fn list(e: &Env, bearer: &str, query: &str) -> Resp {
    call(e, "GET", &format!("/api/v1/organisations/{ORG}/certificates{query}"), bearer, None).await
}

fn ids_of(vs: &[&Value]) -> BTreeSet<String> {
    vs.iter().map(|v| v["id"].as_str().unwrap().to_owned()).collect()
}

async fn revoke(e: &Env, bearer: &str, id: &str, reason: Option<&str>) -> Resp {
    let body = reason.map(|r| json!({"reason": r}));
    call(e, "POST", &format!("{}/revoke", cert_path(id)), bearer, body).await
}

async fn current_crl(e: &Env) -> CrlInfo {
    let r = public(e, "/pki/crl").await;
    assert_eq!(r.s, StatusCode::OK);
    assert_eq!(r.header(header::CONTENT_TYPE), "application/pkix-crl");
    let issuing = ca_chain(e).await.remove(0);
    crl_info(&r.bytes, &issuing)
}

/// Delivers queued mail; every message `to` received whose subject contains `needle`.
async fn mails(e: &Env, to: &str, needle: &str) -> Vec<portcullis_core::mail::OutgoingMail> {
    e.core.deliver_mail().await.unwrap();
    e.mailer.sent().into_iter().filter(|m| m.to == to && m.subject.contains(needle)).collect()
}

// ---- client assertions -------------------------------------------------------------------------

static JTI: AtomicUsize = AtomicUsize::new(0);

fn jti() -> String {
    format!("jti-{}", JTI.fetch_add(1, Ordering::SeqCst))
}

fn b64u(b: &[u8]) -> String {
    B64URL.encode(b)
}

/// A JWS signature over `msg` by `key` with `alg` (which the key must support).
fn jws_sign(key: &KeyPair, alg: &str, msg: &[u8]) -> Vec<u8> {
    let pkcs8 = key.serialize_der();
    let rng = aws_lc_rs::rand::SystemRandom::new();
    match alg {
        "ES256" => sig::EcdsaKeyPair::from_pkcs8(&sig::ECDSA_P256_SHA256_FIXED_SIGNING, &pkcs8)
            .unwrap()
            .sign(&rng, msg)
            .unwrap()
            .as_ref()
            .to_vec(),
        "ES384" => sig::EcdsaKeyPair::from_pkcs8(&sig::ECDSA_P384_SHA384_FIXED_SIGNING, &pkcs8)
            .unwrap()
            .sign(&rng, msg)
            .unwrap()
            .as_ref()
            .to_vec(),
        "EdDSA" => sig::Ed25519KeyPair::from_pkcs8_maybe_unchecked(&pkcs8).unwrap().sign(msg).as_ref().to_vec(),
        "RS256" | "PS256" => {
            let kp = sig::RsaKeyPair::from_pkcs8(&pkcs8).unwrap();
            let mut out = vec![0u8; kp.public_modulus_len()];
            let enc: &'static dyn sig::RsaEncoding =
                if alg == "RS256" { &sig::RSA_PKCS1_SHA256 } else { &sig::RSA_PSS_SHA256 };
            kp.sign(enc, &rng, msg, &mut out).unwrap();
            out
        }
        other => panic!("no signer for {other}"),
    }
}

fn compact(header: &Value, claims: &Value, sign: impl FnOnce(&[u8]) -> Vec<u8>) -> String {
    let input = format!("{}.{}", b64u(header.to_string().as_bytes()), b64u(claims.to_string().as_bytes()));
    let s = sign(input.as_bytes());
    format!("{input}.{}", b64u(&s))
}

fn assertion_claims(e: &Env, client_id: &str, aud: &str) -> Value {
    let now = e.clock.now();
    json!({"iss": client_id, "sub": client_id, "aud": aud, "exp": now + 60, "iat": now, "jti": jti()})
}

/// An assertion signed by `key` with `alg`, naming `kid`.
fn assertion(key: &KeyPair, alg: &str, kid: &str, claims: &Value) -> String {
    compact(&json!({"alg": alg, "kid": kid, "typ": "JWT"}), claims, |m| jws_sign(key, alg, m))
}

async fn assertion_token(e: &Env, assertion: &str, extra: &str) -> Resp {
    let form = format!(
        "grant_type=client_credentials&client_assertion_type={}&client_assertion={assertion}{extra}",
        JWT_BEARER.replace(':', "%3A")
    );
    token_request(e, &form, None, None).await
}

fn assert_invalid_client(r: &Resp, what: &str) {
    assert_eq!(r.s, StatusCode::UNAUTHORIZED, "{what}: {}", r.v);
    assert_eq!(r.v["error"], "invalid_client", "{what}: {}", r.v);
}

// =================================================================================================
// 1. issuance: every profile, every key type
// =================================================================================================

#[tokio::test]
async fn every_profile_is_issued_for_every_key_type_with_only_the_profile_extensions() {
    let e = env().await;
    let f = setup(&e).await;
    assert_eq!(set_domains(&e, &f.admin, ORG, &["acme.example"]).await.s, StatusCode::OK);
    let chain = ca_chain(&e).await;
    assert_eq!(chain.len(), 2, "issuing CA and root");
    let (issuing, root) = (&chain[0], &chain[1]);
    assert!(signed_by(issuing, root) && signed_by(root, root), "the trust chain verifies");
    let now = e.clock.now();
    let mut serials = HashSet::new();

    for kt in Kt::ALL {
        let key = kt.key();
        let spki = key.subject_public_key_info();
        for ty in ["transport", "server-transport", "signing"] {
            // The CSR asks for CA:TRUE and, where the profile ignores SANs, for names of its own.
            let sans = if ty == "server-transport" {
                vec![dns("api.acme.example")]
            } else {
                vec![dns("evil.example"), uri("urn:portcullis:client:acme$ops"), dns("api.acme.example")]
            };
            let pem = csr_with(&key, &subject_of(BILLING), sans, true);
            let r = issue(&e, &f.acme_admin, ORG, ty, "billing", &pem, None).await;
            let what = format!("{kt:?} {ty}");
            assert_eq!(r.s, StatusCode::CREATED, "{what}: {} {}", r.err(), r.v);
            let v = &r.v;
            let id = r.str("id");
            assert!(!id.is_empty());
            assert_eq!(r.header(header::LOCATION), cert_path(&id), "{what}");
            let der = der_of(v);
            assert_eq!(v["x5t#S256"], x5t(&der), "{what}: x5t#S256 is base64url(SHA-256(DER))");
            assert_eq!(v["fingerprint_sha256"], hex(&sha256(&der)), "{what}");
            assert_eq!((v["type"].as_str(), v["application"].as_str()), (Some(ty), Some(BILLING)), "{what}");
            assert_eq!(v["status"], "active", "{what}");
            assert_eq!(v["key_type"], kt.inventory_name(), "{what}");
            assert!(v["revoked_at"].is_null() && v["renewed_from"].is_null(), "{what}: {v}");
            assert_eq!(pem_blocks(v["chain_pem"].as_str().unwrap(), "CERTIFICATE"), chain, "{what}: chain_pem");
            for k in ["not_before", "not_after"] {
                assert!(v[k].as_str().is_some_and(|s| s.ends_with('Z') && s.contains('T')), "{what}: {k} = {}", v[k]);
            }

            let c = inspect(&der);
            // Serial: the response's, positive, at least 64 bits, unique.
            assert_eq!(hex(&c.serial), r.str("serial"), "{what}");
            assert!(c.serial.len() >= 8 && c.serial[0] != 0 && c.serial[0] < 0x80, "{what}: serial {:?}", c.serial);
            assert!(serials.insert(c.serial.clone()), "{what}: serial reused");
            // Subject exactly CN=<client id>, O=<org>; the CSR's key, nothing else of it.
            assert_eq!(c.subject, vec![("CN".into(), BILLING.into()), ("O".into(), ORG.into())], "{what}");
            assert_eq!(c.spki, spki, "{what}: the certificate carries the CSR's key");
            assert_eq!(c.issuer, subject_name(issuing), "{what}");
            assert!(signed_by(&der, issuing), "{what}: signed by the issuing CA");
            // SANs: the application URI; DNS names only for server-transport.
            assert_eq!(c.uris, vec![format!("urn:portcullis:client:{BILLING}")], "{what}");
            let want_dns: Vec<String> = if ty == "server-transport" { vec!["api.acme.example".into()] } else { vec![] };
            assert_eq!(c.dns, want_dns, "{what}: the CSR's own SANs are never copied");
            assert_eq!(c.other_sans, 0, "{what}");
            // EKU per profile.
            let want_eku = match ty {
                "transport" => Some((true, false, false)),
                "server-transport" => Some((false, true, false)),
                _ => None,
            };
            assert_eq!(c.eku, want_eku, "{what}: EKU");
            // Never a CA, though the CSR asked.
            assert_eq!(c.basic_constraints, Some((true, false)), "{what}: BasicConstraints CA:FALSE, critical");
            // Key usage: digitalSignature only for signing (and EC/Ed25519 transport);
            // keyEncipherment for RSA transport; never keyCertSign or cRLSign.
            let want_ku: u16 = if ty != "signing" && kt == Kt::Rsa3072 { 0b101 } else { 0b1 };
            assert_eq!(c.ku, Some(want_ku), "{what}: key usage flags");
            // Key identifiers and the CRL distribution point.
            assert!(c.ski.is_some(), "{what}: subject key identifier");
            assert_eq!(c.aki, inspect(issuing).ski, "{what}: authority key identifier = issuing CA's SKI");
            assert_eq!(c.crl_urls, vec![format!("{ISS}/pki/crl/{}", r.str("issuer_id"))], "{what}");
            // Validity: the profile's default from now.
            let days = if ty == "signing" { 365 } else { 90 };
            assert!(c.not_before <= now && c.not_before >= now - 300, "{what}: not_before {}", c.not_before);
            assert_eq!(c.not_after, now + days * DAY, "{what}: default validity");
        }
    }
}

#[tokio::test]
async fn serials_are_large_random_and_unique_across_many_issues() {
    let e = env().await;
    let f = setup(&e).await;
    let key = p256();
    let pem = csr(&key, BILLING, vec![]);
    let (mut serials, mut ids, mut prints) = (HashSet::new(), HashSet::new(), HashSet::new());
    let mut top_bits = HashSet::new();
    for _ in 0..60 {
        let v = issue_ok(&e, &f.admin, "transport", BILLING, &pem, None).await;
        let serial = v["serial"].as_str().unwrap().to_owned();
        assert_eq!(serial.len(), 32, "16 bytes: {serial}");
        let raw = inspect(&der_of(&v)).serial;
        assert!(raw[0] != 0 && raw[0] < 0x80, "{serial}");
        top_bits.insert(raw[0]);
        assert!(serials.insert(serial), "duplicate serial");
        assert!(ids.insert(v["id"].as_str().unwrap().to_owned()));
        assert!(prints.insert(v["x5t#S256"].as_str().unwrap().to_owned()));
    }
    // Same key, same subject, same second: only the random serial makes them differ, and it
    // is random from its first byte on.
    assert!(top_bits.len() > 20, "the leading serial byte barely varies: {top_bits:?}");
    let r = list(&e, &f.admin, "?limit=500").await;
    assert_eq!(r.ids(), ids.into_iter().collect::<BTreeSet<_>>());
}

// =================================================================================================
// 2. refusals
// =================================================================================================

#[tokio::test]
async fn hostile_and_malformed_requests_are_refused_with_the_reason() {
    let e = env().await;
    let f = setup(&e).await;
    let key = p256();
    let good = csr(&key, BILLING, vec![]);

    // A tampered CSR: one bit of the signature flipped.
    let mut der = pem_blocks(&good, "CERTIFICATE REQUEST").remove(0);
    *der.last_mut().unwrap() ^= 0x01;
    let tampered =
        format!("-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n", B64.encode(&der));
    // A tampered subject: the CN of another application spliced into a signed CSR.
    let mut der = pem_blocks(&csr(&key, "acme$billinx", vec![]), "CERTIFICATE REQUEST").remove(0);
    let at = der.windows(12).position(|w| w == b"acme$billinx").unwrap();
    der[at + 11] = b'g';
    let spliced =
        format!("-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n", B64.encode(&der));
    let ca_pem = public(&e, "/pki/ca.pem").await.text();
    let first_cert =
        format!("{}-----END CERTIFICATE-----\n", ca_pem.split("-----END CERTIFICATE-----").next().unwrap());

    let cases: Vec<(&str, String, &str)> = vec![
        ("tampered signature", tampered, "signature"),
        ("spliced subject", spliced, "signature"),
        ("RSA 1024", RSA_1024_CSR.into(), "2048"),
        ("SHA-1", SHA1_CSR.into(), "not accepted"),
        ("secp256k1", SECP256K1_CSR.into(), "key type"),
        ("CN of another application", csr(&key, SIGNER, vec![]), "subject"),
        (
            "extra OU",
            csr_with(
                &key,
                &[
                    (DnType::CommonName, BILLING),
                    (DnType::OrganizationName, ORG),
                    (DnType::OrganizationalUnitName, "x"),
                ],
                vec![],
                false,
            ),
            "subject",
        ),
        ("no O", csr_with(&key, &[(DnType::CommonName, BILLING)], vec![], false), "subject"),
        (
            "O of another organisation",
            csr_with(&key, &[(DnType::CommonName, BILLING), (DnType::OrganizationName, "beta")], vec![], false),
            "subject",
        ),
        ("CN twice, no O", CN_TWICE_CSR.into(), "subject"),
        ("O twice", O_TWICE_CSR.into(), "subject"),
        ("a certificate instead of a CSR", first_cert, "not a certificate signing request"),
        ("garbage", "hello, I am a CSR".into(), "PEM"),
        ("empty", String::new(), "PEM"),
        ("two PEM blocks", format!("{good}{good}"), "exactly one"),
        ("trailing text", format!("{good}and more"), "exactly one"),
        ("leading text", format!("subject=acme\n{good}"), "PEM"),
        (
            "bad base64",
            "-----BEGIN CERTIFICATE REQUEST-----\n!!!!\n-----END CERTIFICATE REQUEST-----\n".into(),
            "base64",
        ),
        ("over 16 KiB", format!("{good}{}", " ".repeat(17 * 1024)), "larger"),
    ];
    for (what, pem, needle) in &cases {
        let r = issue(&e, &f.admin, ORG, "transport", "billing", pem, None).await;
        assert_eq!(r.s, StatusCode::BAD_REQUEST, "{what}: {}", r.v);
        assert!(r.err().contains(needle), "{what}: x-error {:?} should mention {needle:?}", r.err());
    }

    // The request itself.
    let r = issue(&e, &f.admin, ORG, "client", "billing", &good, None).await;
    assert_eq!(r.s, StatusCode::BAD_REQUEST, "unknown type");
    assert!(r.err().contains("certificate type"), "{}", r.err());
    let r = issue(&e, &f.admin, ORG, "Transport", "billing", &good, None).await;
    assert_eq!(r.s, StatusCode::BAD_REQUEST, "types are exact");
    let r = issue(&e, &f.admin, ORG, "transport", "nope", &good, None).await;
    assert_eq!(r.s, StatusCode::NOT_FOUND, "unknown application: {}", r.v);
    let r = issue(&e, &f.admin, ORG, "transport", "beta$ops", &csr(&key, "beta$ops", vec![]), None).await;
    assert_eq!(r.s, StatusCode::NOT_FOUND, "another organisation's application by client id: {}", r.v);
    let r = issue(&e, &f.admin, "nope", "transport", "billing", &good, None).await;
    assert_eq!(r.s, StatusCode::NOT_FOUND, "unknown organisation");
    for (ty, days) in [("transport", 398), ("signing", 826), ("transport", 0), ("signing", -5)] {
        let r = issue(&e, &f.admin, ORG, ty, "billing", &good, Some(days)).await;
        assert_eq!(r.s, StatusCode::BAD_REQUEST, "{ty} for {days} days: {}", r.v);
        assert!(r.err().contains("validity_days"), "{}", r.err());
    }
    let body = json!({"type": "transport", "application": "billing", "csr": good, "is_ca": true});
    let r = call(&e, "POST", "/api/v1/organisations/acme/certificates", &f.admin, Some(body)).await;
    assert_eq!(r.s, StatusCode::BAD_REQUEST, "unknown fields are refused");
    let r =
        call(&e, "POST", "/api/v1/organisations/acme/certificates", &f.admin, Some(json!({"type": "transport"}))).await;
    assert_eq!(r.s, StatusCode::BAD_REQUEST, "missing fields");

    // The longest allowed validity is accepted, and nothing refused was recorded.
    let v = issue_ok(&e, &f.admin, "transport", "billing", &good, Some(397)).await;
    assert_eq!(inspect(&der_of(&v)).not_after, e.clock.now() + 397 * DAY);
    assert_eq!(list(&e, &f.admin, "").await.ids().len(), 1, "refused requests leave no certificate behind");
}

#[tokio::test]
async fn only_admins_of_the_organisation_manage_its_certificates() {
    let e = env().await;
    let f = setup(&e).await;
    let key = p256();
    let pem = csr(&key, BILLING, vec![]);

    // A plain user's verified session.
    let r = send(&e, request("POST", "/api/v1/sessions", None, Some(&json!({"email": ANN, "password": PW})))).await;
    assert_eq!(r.s, StatusCode::ACCEPTED, "{}", r.v);
    let code_mail = mails(&e, ANN, "").await.pop().unwrap();
    let code =
        code_mail.text.split_whitespace().find(|w| w.len() == 6 && w.bytes().all(|b| b.is_ascii_digit())).unwrap();
    let body = json!({"verification_id": r.str("verification_id"), "code": code});
    let v = send(&e, request("POST", "/api/v1/sessions/verify", None, Some(&body))).await;
    assert_eq!(v.s, StatusCode::OK, "{}", v.v);
    let ann = r.str("session_token");

    let outsiders =
        [("plain user", ann.as_str()), ("gateway", f.gateway.as_str()), ("beta's admin", f.beta_admin.as_str())];
    for (who, token) in outsiders {
        let r = issue(&e, token, ORG, "transport", "billing", &pem, None).await;
        assert_eq!(r.s, StatusCode::FORBIDDEN, "{who} issues: {}", r.v);
    }
    let r = send(&e, request("POST", "/api/v1/organisations/acme/certificates", None, Some(&json!({})))).await;
    assert_eq!(r.s, StatusCode::UNAUTHORIZED, "anonymous");

    // acme's own admin and the platform admin may.
    let mine = issue_ok(&e, &f.acme_admin, "transport", "billing", &pem, None).await;
    let id = mine["id"].as_str().unwrap();
    issue_ok(&e, &f.admin, "signing", "billing", &pem, None).await;

    let template = format!("/api/v1/organisations/{ORG}/applications/billing/csr-template?type=transport");
    for (who, token) in outsiders {
        for (method, path, body) in [
            ("GET", format!("/api/v1/organisations/{ORG}/certificates"), None),
            ("GET", cert_path(id), None),
            ("GET", format!("{}/pem", cert_path(id)), None),
            ("GET", format!("{}/chain", cert_path(id)), None),
            ("GET", template.clone(), None),
            ("POST", format!("{}/renew", cert_path(id)), Some(json!({"csr": pem}))),
            ("POST", format!("{}/revoke", cert_path(id)), Some(json!({"reason": "key_compromise"}))),
        ] {
            let r = call(&e, method, &path, token, body).await;
            assert_eq!(r.s, StatusCode::FORBIDDEN, "{who}: {method} {path}: {}", r.v);
        }
    }
    // beta's admin cannot reach acme's certificate through its own organisation either.
    let r = call(&e, "GET", &format!("/api/v1/organisations/beta/certificates/{id}"), &f.beta_admin, None).await;
    assert_eq!(r.s, StatusCode::NOT_FOUND, "{}", r.v);
    let r = call(&e, "POST", &format!("/api/v1/organisations/beta/certificates/{id}/revoke"), &f.admin, None).await;
    assert_eq!(r.s, StatusCode::NOT_FOUND, "a certificate is addressed within its organisation: {}", r.v);
    let r = call(&e, "GET", "/api/v1/organisations/beta/certificates", &f.beta_admin, None).await;
    assert_eq!((r.s, r.ids().len()), (StatusCode::OK, 0), "beta lists none of acme's");

    let got = call(&e, "GET", &cert_path(id), &f.acme_admin, None).await;
    assert_eq!((got.s, got.v["status"].as_str()), (StatusCode::OK, Some("active")), "nothing was revoked");
    assert_eq!(list(&e, &f.acme_admin, "").await.ids().len(), 2, "nothing more was issued");
}

// =================================================================================================
// 3. allowed domains and server-transport
// =================================================================================================

#[tokio::test]
async fn server_transport_names_must_lie_within_the_organisations_allowed_domains() {
    let e = env().await;
    let f = setup(&e).await;
    let key = p256();
    let st = |sans: Vec<SanType>| csr(&key, BILLING, sans);

    let r = issue(&e, &f.admin, ORG, "server-transport", "billing", &st(vec![dns("api.acme.example")]), None).await;
    assert_eq!(r.s, StatusCode::BAD_REQUEST, "no allowed domains yet: {}", r.v);
    assert!(r.err().contains("no allowed domains"), "{}", r.err());

    // Only a platform admin sets them.
    for (who, token) in [("acme's admin", &f.acme_admin), ("beta's admin", &f.beta_admin), ("gateway", &f.gateway)] {
        let r = set_domains(&e, token, ORG, &["acme.example"]).await;
        assert_eq!(r.s, StatusCode::FORBIDDEN, "{who}: {}", r.v);
    }
    for bad in [
        "*.acme.example",
        "https://acme.example",
        "localhost",
        "",
        "acme..example",
        "acme.example/x",
        "-acme.example",
        "ac me.example",
    ] {
        let r = set_domains(&e, &f.admin, ORG, &[bad]).await;
        assert_eq!(r.s, StatusCode::BAD_REQUEST, "{bad:?}: {}", r.v);
    }
    let r = call(&e, "PATCH", "/api/v1/organisations/acme", &f.admin, Some(json!({"allowed_domains": "acme.example"})))
        .await;
    assert_eq!(r.s, StatusCode::BAD_REQUEST, "a string, not a list");
    assert_eq!(set_domains(&e, &f.admin, "nope", &["acme.example"]).await.s, StatusCode::NOT_FOUND);
    let r = call(&e, "GET", "/api/v1/organisations/acme", &f.admin, None).await;
    assert_eq!(r.v["allowed_domains"], json!([]), "refused updates changed nothing");

    let r = set_domains(&e, &f.admin, ORG, &["Acme.Example.", "acme.example", "svc.test"]).await;
    assert_eq!(r.s, StatusCode::OK, "{}", r.v);
    assert_eq!(r.v["allowed_domains"], json!(["acme.example", "svc.test"]), "normalised and deduplicated");
    let r = call(&e, "GET", "/api/v1/organisations/acme", &f.acme_admin, None).await;
    assert_eq!(r.v["allowed_domains"], json!(["acme.example", "svc.test"]));
    let beta = call(&e, "GET", "/api/v1/organisations/beta", &f.admin, None).await;
    assert_eq!(beta.v["allowed_domains"], json!([]), "only acme changed");

    let refused: Vec<(&str, Vec<SanType>)> = vec![
        ("no DNS name", vec![]),
        ("outside", vec![dns("api.other.example")]),
        ("suffix without a dot", vec![dns("evilacme.example")]),
        ("allowed domain as a prefix", vec![dns("acme.example.evil.test")]),
        ("one good, one outside", vec![dns("api.acme.example"), dns("evil.example")]),
        ("wildcard", vec![dns("*.acme.example")]),
        ("URI SAN", vec![dns("api.acme.example"), uri("https://api.acme.example")]),
        ("IP SAN", vec![dns("api.acme.example"), SanType::IpAddress("10.0.0.1".parse().unwrap())]),
        ("e-mail SAN", vec![dns("api.acme.example"), SanType::Rfc822Name("a@acme.example".try_into().unwrap())]),
    ];
    for (what, sans) in refused {
        let r = issue(&e, &f.acme_admin, ORG, "server-transport", "billing", &st(sans), None).await;
        assert_eq!(r.s, StatusCode::BAD_REQUEST, "{what}: {}", r.v);
    }

    let v = issue_ok(
        &e,
        &f.acme_admin,
        "server-transport",
        "billing",
        &st(vec![dns("api.acme.example"), dns("API.svc.test"), dns("acme.example")]),
        None,
    )
    .await;
    let c = inspect(&der_of(&v));
    assert_eq!(c.dns, ["api.acme.example", "api.svc.test", "acme.example"], "lower-cased, in order");
    assert_eq!(c.eku, Some((false, true, false)));
    assert!(v["sans"].as_array().unwrap().iter().any(|s| s == "DNS:api.acme.example"), "{}", v["sans"]);

    // Emptied again: no more server certificates.
    assert_eq!(set_domains(&e, &f.admin, ORG, &[]).await.s, StatusCode::OK);
    let r = issue(&e, &f.admin, ORG, "server-transport", "billing", &st(vec![dns("api.acme.example")]), None).await;
    assert_eq!(r.s, StatusCode::BAD_REQUEST, "{}", r.v);
}

#[tokio::test]
async fn certificate_types_and_csr_templates_describe_what_is_issued() {
    let e = env().await;
    let f = setup(&e).await;
    let r = call(&e, "GET", "/api/v1/pki/certificate-types", &f.gateway, None).await;
    assert_eq!(r.s, StatusCode::OK);
    let types: Vec<&str> = r.v["types"].as_array().unwrap().iter().map(|t| t["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["transport", "server-transport", "signing"]);
    assert_eq!(r.v["types"][2]["max_validity_days"], 825);

    let path = |q: &str| format!("/api/v1/organisations/{ORG}/applications/billing/csr-template{q}");
    let r = call(&e, "GET", &path("?type=signing&key=ed25519"), &f.acme_admin, None).await;
    assert_eq!(r.s, StatusCode::OK, "{}", r.v);
    assert_eq!(r.v["subject_openssl"], "/CN=acme$billing/O=acme");
    assert_eq!(r.v["san_uri"], "urn:portcullis:client:acme$billing");
    assert!(r.str("openssl_command").contains("-newkey ed25519"), "{}", r.v);
    assert_eq!(r.v["dns_names_required"], false);
    let r = call(&e, "GET", &path("?type=server-transport"), &f.acme_admin, None).await;
    assert_eq!(r.v["dns_names_required"], true);
    assert!(r.str("openssl_command").contains("subjectAltName=DNS:"), "{}", r.v);
    for q in ["?type=bogus", "?type=transport&key=dsa", "?type=transport&colour=red"] {
        assert_eq!(call(&e, "GET", &path(q), &f.acme_admin, None).await.s, StatusCode::BAD_REQUEST, "{q}");
    }
    let r =
        call(&e, "GET", &format!("/api/v1/organisations/{ORG}/applications/nope/csr-template"), &f.admin, None).await;
    assert_eq!(r.s, StatusCode::NOT_FOUND);

    // The template's subject is what issuance accepts.
    let subj = r#"/CN=acme$billing/O=acme"#;
    let parts: Vec<(DnType, &str)> = subj
        .trim_start_matches('/')
        .split('/')
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap();
            (if k == "CN" { DnType::CommonName } else { DnType::OrganizationName }, v)
        })
        .collect();
    issue_ok(&e, &f.acme_admin, "signing", "billing", &csr_with(&p256(), &parts, vec![], false), None).await;
}

// =================================================================================================
// 4. inventory
// =================================================================================================

#[tokio::test]
async fn the_inventory_filters_by_application_type_status_serial_fingerprint_and_expiry() {
    let e = env().await;
    let mut f = setup(&e).await;
    assert_eq!(set_domains(&e, &f.admin, ORG, &["acme.example"]).await.s, StatusCode::OK);
    let key = p256();
    let a = issue_ok(&e, &f.admin, "transport", "billing", &csr(&key, BILLING, vec![]), Some(10)).await;
    let b = issue_ok(&e, &f.admin, "signing", SIGNER, &csr(&key, SIGNER, vec![]), None).await;
    let c =
        issue_ok(&e, &f.admin, "server-transport", "billing", &csr(&key, BILLING, vec![dns("api.acme.example")]), None)
            .await;
    let d = issue_ok(&e, &f.admin, "transport", "signer", &csr(&key, SIGNER, vec![]), Some(1)).await;
    let id = |v: &Value| v["id"].as_str().unwrap().to_owned();
    let all = ids_of(&[&a, &b, &c, &d]);
    // acme's admin; replaced by a fresh token once the clock has moved.
    let t = std::cell::RefCell::new(f.acme_admin.clone());
    let tok = || t.borrow().clone();

    let check = async |query: &str, want: &[&Value]| {
        let r = list(&e, &tok(), query).await;
        assert_eq!(r.s, StatusCode::OK, "{query}: {} {}", r.err(), r.v);
        assert_eq!(r.ids(), ids_of(want), "{query}");
    };
    check("", &[&a, &b, &c, &d]).await;
    check("?application=billing", &[&a, &c]).await;
    check("?application=acme%24billing", &[&a, &c]).await;
    check("?application=signer&type=transport", &[&d]).await;
    check("?type=signing", &[&b]).await;
    check("?type=server-transport", &[&c]).await;
    check("?status=active", &[&a, &b, &c, &d]).await;
    check("?status=revoked", &[]).await;

    // Serial: as stored, upper case, with colons.
    let serial = a["serial"].as_str().unwrap();
    let colons: Vec<String> =
        serial.as_bytes().chunks(2).map(|p| std::str::from_utf8(p).unwrap().to_uppercase()).collect();
    check(&format!("?serial={serial}"), &[&a]).await;
    check(&format!("?serial={}", colons.join("%3A")), &[&a]).await;
    check(&format!("?serial={}", serial.to_uppercase()), &[&a]).await;
    check("?serial=00", &[]).await;
    // Fingerprint: SHA-256 hex (any case, colons) or x5t#S256.
    let fp = b["fingerprint_sha256"].as_str().unwrap();
    check(&format!("?fingerprint={fp}"), &[&b]).await;
    check(&format!("?fingerprint={}", fp.to_uppercase()), &[&b]).await;
    check(&format!("?fingerprint={}", b["x5t#S256"].as_str().unwrap()), &[&b]).await;
    // Expiring: a (10 days) and d (1 day) within 30 days; nothing within 0.
    check("?expiring_within_days=30", &[&a, &d]).await;
    check("?expiring_within_days=5", &[&d]).await;
    check("?expiring_within_days=0", &[]).await;
    check("?expiring_within_days=400&type=signing", &[&b]).await;
    // Paging, newest first.
    let page1 = list(&e, &tok(), "?limit=2").await.ids();
    let page2 = list(&e, &tok(), "?limit=2&offset=2").await.ids();
    assert_eq!((page1.len(), page2.len()), (2, 2));
    assert_eq!(page1.union(&page2).cloned().collect::<BTreeSet<_>>(), all, "the pages cover all");

    for bad in [
        "?type=bogus",
        "?status=bogus",
        "?serial=zz",
        "?serial=",
        "?fingerprint=not-hex",
        "?expiring_within_days=-1",
        "?expiring_within_days=5000",
        "?expiring_within_days=soon",
        "?colour=red",
    ] {
        let r = list(&e, &tok(), bad).await;
        assert_eq!(r.s, StatusCode::BAD_REQUEST, "{bad}: {}", r.v);
    }
    assert_eq!(list(&e, &tok(), "?application=nope").await.s, StatusCode::NOT_FOUND);
    assert_eq!(list(&e, &tok(), "?application=beta%24ops").await.s, StatusCode::NOT_FOUND, "another organisation's");

    // Revoked and expired.
    assert_eq!(revoke(&e, &tok(), &id(&c), Some("superseded")).await.s, StatusCode::OK);
    check("?status=revoked", &[&c]).await;
    check("?status=active", &[&a, &b, &d]).await;
    e.clock.advance(DAY + 1);
    f.refresh(&e).await;
    *t.borrow_mut() = f.acme_admin.clone();
    check("?status=expired", &[&d]).await;
    check("?status=active", &[&a, &b]).await;
    check("?status=expired&application=billing", &[]).await;
    let r = call(&e, "GET", &cert_path(&id(&d)), &tok(), None).await;
    assert_eq!(r.v["status"], "expired");
    let r = call(&e, "GET", &cert_path(&id(&c)), &tok(), None).await;
    assert_eq!((r.v["status"].as_str(), r.v["revocation_reason"].as_str()), (Some("revoked"), Some("superseded")));
    assert!(r.v["revoked_at"].is_string());
}

#[tokio::test]
async fn a_certificate_is_fetched_as_json_pem_pem_with_chain_and_chain() {
    let e = env().await;
    let f = setup(&e).await;
    let v = issue_ok(&e, &f.admin, "transport", "billing", &csr(&p256(), BILLING, vec![]), None).await;
    let id = v["id"].as_str().unwrap();
    let chain = ca_chain(&e).await;
    let der = der_of(&v);

    let r = call(&e, "GET", &cert_path(id), &f.acme_admin, None).await;
    assert_eq!(r.s, StatusCode::OK);
    for k in ["id", "serial", "type", "application", "status", "certificate_pem", "x5t#S256", "not_after", "issuer_id"]
    {
        assert_eq!(r.v[k], v[k], "{k}");
    }
    assert_eq!(pem_blocks(r.v["chain_pem"].as_str().unwrap(), "CERTIFICATE"), chain);

    let r = call(&e, "GET", &format!("{}/pem", cert_path(id)), &f.acme_admin, None).await;
    assert_eq!(r.s, StatusCode::OK);
    assert_eq!(r.header(header::CONTENT_TYPE), "application/x-pem-file");
    assert_eq!(r.text(), v["certificate_pem"].as_str().unwrap());
    let r = call(&e, "GET", &format!("{}/pem?chain=true", cert_path(id)), &f.acme_admin, None).await;
    let blocks = pem_blocks(&r.text(), "CERTIFICATE");
    assert_eq!(blocks.len(), 3, "leaf, issuing CA, root");
    assert_eq!((&blocks[0], &blocks[1..]), (&der, &chain[..]));
    let r = call(&e, "GET", &format!("{}/pem?chain=false", cert_path(id)), &f.acme_admin, None).await;
    assert_eq!(pem_blocks(&r.text(), "CERTIFICATE"), vec![der.clone()]);
    let r = call(&e, "GET", &format!("{}/chain", cert_path(id)), &f.acme_admin, None).await;
    assert_eq!(r.header(header::CONTENT_TYPE), "application/x-pem-file");
    assert_eq!(pem_blocks(&r.text(), "CERTIFICATE"), chain);
    assert!(signed_by(&der, &chain[0]) && signed_by(&chain[0], &chain[1]));

    let r = call(&e, "GET", &format!("{}/pem?chain=maybe", cert_path(id)), &f.acme_admin, None).await;
    assert_eq!(r.s, StatusCode::BAD_REQUEST);
    for p in [cert_path("nope"), format!("{}/pem", cert_path("nope")), format!("{}/chain", cert_path("nope"))] {
        assert_eq!(call(&e, "GET", &p, &f.admin, None).await.s, StatusCode::NOT_FOUND, "{p}");
    }
}

// =================================================================================================
// 5. revocation, CRL, mail
// =================================================================================================

#[tokio::test]
async fn revocation_takes_any_reason_spelling_lands_on_the_crl_and_mails_the_admins() {
    let e = env().await;
    let mut f = setup(&e).await;
    let key = p256();
    let pem = csr(&key, BILLING, vec![]);
    let mut certs = Vec::new();
    for _ in 0..6 {
        certs.push(issue_ok(&e, &f.admin, "transport", "billing", &pem, None).await);
    }
    let short = issue_ok(&e, &f.admin, "signing", "billing", &pem, Some(1)).await;
    let id = |v: &Value| v["id"].as_str().unwrap().to_owned();
    let serial = |v: &Value| v["serial"].as_str().unwrap().to_owned();

    let first = current_crl(&e).await;
    assert!(first.entries.is_empty(), "{first:?}");
    assert_eq!(first.issuer, subject_name(&ca_chain(&e).await[0]));
    assert_eq!(first.next_update - first.this_update, 86_400, "ca.crl_lifetime");

    // Refused reasons change nothing.
    for bad in ["bogus", "7", "certificateHold", "certificate_hold", "remove_from_crl", ""] {
        let r = revoke(&e, &f.admin, &id(&certs[0]), Some(bad)).await;
        assert_eq!(r.s, StatusCode::BAD_REQUEST, "reason {bad:?}: {}", r.v);
    }
    let r =
        call(&e, "POST", &format!("{}/revoke", cert_path(&id(&certs[0]))), &f.admin, Some(json!({"why": "x"}))).await;
    assert_eq!(r.s, StatusCode::BAD_REQUEST, "unknown field");
    assert_eq!(current_crl(&e).await.number, first.number, "no CRL was signed for refusals");
    assert_eq!(list(&e, &f.admin, "?status=revoked").await.ids().len(), 0);

    let cases: [(Option<&str>, &str, Option<u8>); 6] = [
        (Some("key_compromise"), "key_compromise", Some(1)),
        (Some("keyCompromise"), "key_compromise", Some(1)),
        (Some("1"), "key_compromise", Some(1)),
        (None, "unspecified", None),
        (Some("superseded"), "superseded", Some(4)),
        (Some("cessationOfOperation"), "cessation_of_operation", Some(5)),
    ];
    let mut last = first.number;
    for ((given, stored, code), cert) in cases.iter().zip(&certs) {
        let r = revoke(&e, &f.acme_admin, &id(cert), *given).await;
        assert_eq!(r.s, StatusCode::OK, "{given:?}: {}", r.v);
        assert_eq!((r.v["status"].as_str(), r.v["revocation_reason"].as_str()), (Some("revoked"), Some(*stored)));
        let crl = current_crl(&e).await;
        assert!(crl.number > last, "the CRL number increases with each revocation: {} then {}", last, crl.number);
        last = crl.number;
        let entry = crl.entries.iter().find(|(s, _)| *s == serial(cert));
        assert_eq!(entry.map(|(_, c)| *c), Some(*code), "{given:?}: the CRL lists the serial with reason {code:?}");
    }
    let crl = current_crl(&e).await;
    assert_eq!(crl.entries.len(), 6);
    assert!(crl.entries.iter().all(|(s, _)| certs.iter().any(|c| serial(c) == *s)), "only revoked serials are listed");

    // A second revocation conflicts and changes nothing.
    let r = revoke(&e, &f.admin, &id(&certs[0]), Some("superseded")).await;
    assert_eq!(r.s, StatusCode::CONFLICT, "{}", r.v);
    let r = call(&e, "GET", &cert_path(&id(&certs[0])), &f.admin, None).await;
    assert_eq!(r.v["revocation_reason"], "key_compromise");
    assert_eq!(current_crl(&e).await.number, last);
    assert_eq!(revoke(&e, &f.admin, "nope", None).await.s, StatusCode::NOT_FOUND);

    // An expired certificate can still be revoked, and is listed.
    e.clock.advance(DAY + 10);
    f.refresh(&e).await;
    assert_eq!(call(&e, "GET", &cert_path(&id(&short)), &f.admin, None).await.v["status"], "expired");
    let r = revoke(&e, &f.admin, &id(&short), Some("privilege_withdrawn")).await;
    assert_eq!(r.s, StatusCode::OK, "{}", r.v);
    assert_eq!(r.v["status"], "revoked");
    let crl = current_crl(&e).await;
    assert!(crl.number > last);
    assert!(crl.entries.contains(&(serial(&short), Some(9))), "{crl:?}");
    assert!(crl.this_update >= e.clock.now() - 5, "a fresh CRL");

    // The PEM form holds the same CRL.
    let r = public(&e, "/pki/crl.pem").await;
    assert_eq!(r.s, StatusCode::OK);
    assert_eq!(r.header(header::CONTENT_TYPE), "application/x-pem-file");
    let pems = pem_blocks(&r.text(), "X509 CRL");
    let der = public(&e, "/pki/crl").await.bytes;
    assert_eq!(pems, vec![der]);

    // Mail: every admin of acme, once per revocation; not the plain user, not beta's admin.
    let to_olga = mails(&e, OLGA, "was revoked").await;
    assert_eq!(to_olga.len(), 7, "{:?}", to_olga.iter().map(|m| &m.subject).collect::<Vec<_>>());
    for c in certs.iter().chain([&short]) {
        assert!(to_olga.iter().any(|m| m.text.contains(&serial(c))), "a mail names serial {}", serial(c));
    }
    assert!(to_olga[0].subject.contains(BILLING), "{}", to_olga[0].subject);
    assert!(mails(&e, ANN, "").await.is_empty(), "a plain user is not mailed");
    assert!(mails(&e, BOB, "").await.is_empty(), "another organisation's admin is not mailed");
}

// =================================================================================================
// 6. renewal
// =================================================================================================

#[tokio::test]
async fn renewal_links_a_new_certificate_and_leaves_the_old_one_alone() {
    let e = env().await;
    let f = setup(&e).await;
    assert_eq!(set_domains(&e, &f.admin, ORG, &["acme.example"]).await.s, StatusCode::OK);
    let (k1, k2) = (p256(), Kt::P384.key());
    let old = issue_ok(&e, &f.admin, "transport", "billing", &csr(&k1, BILLING, vec![]), Some(30)).await;
    let old_id = old["id"].as_str().unwrap();
    let renew_path = format!("{}/renew", cert_path(old_id));

    let r = call(&e, "POST", &renew_path, &f.acme_admin, Some(json!({"csr": csr(&k2, BILLING, vec![])}))).await;
    assert_eq!(r.s, StatusCode::CREATED, "{}", r.v);
    let new = r.v;
    assert_ne!(new["id"], old["id"]);
    assert_ne!(new["serial"], old["serial"]);
    assert_eq!(new["renewed_from"], old["id"]);
    assert_eq!((new["type"].as_str(), new["application"].as_str()), (Some("transport"), Some(BILLING)));
    assert_eq!(new["key_type"], "EC P-384");
    let c = inspect(&der_of(&new));
    assert_eq!(c.spki, k2.subject_public_key_info(), "the renewal carries the new key");
    assert_eq!(c.eku, Some((true, false, false)), "same profile");
    assert_eq!(c.not_after, e.clock.now() + 90 * DAY, "the type's default validity, not the old one's");
    let r = call(&e, "GET", &cert_path(old_id), &f.admin, None).await;
    assert_eq!(r.v["status"], "active", "the old certificate stays valid");
    assert!(r.v["renewed_from"].is_null());

    // Renewal checks like issuance.
    let bad = [
        (json!({"csr": csr(&k2, SIGNER, vec![])}), "another application's subject"),
        (json!({"csr": "garbage"}), "garbage"),
        (json!({"csr": csr(&k2, BILLING, vec![]), "validity_days": 398}), "too long"),
        (json!({"csr": csr(&k2, BILLING, vec![]), "type": "signing"}), "unknown field"),
        (json!({}), "no csr"),
    ];
    for (body, what) in bad {
        let r = call(&e, "POST", &renew_path, &f.admin, Some(body)).await;
        assert_eq!(r.s, StatusCode::BAD_REQUEST, "{what}: {}", r.v);
    }
    // Same key, shorter validity.
    let r =
        call(&e, "POST", &renew_path, &f.admin, Some(json!({"csr": csr(&k1, BILLING, vec![]), "validity_days": 7})))
            .await;
    assert_eq!(r.s, StatusCode::CREATED, "{}", r.v);
    assert_eq!(inspect(&der_of(&r.v)).not_after, e.clock.now() + 7 * DAY);

    // A server-transport renewal checks its names again.
    let st =
        issue_ok(&e, &f.admin, "server-transport", "billing", &csr(&k1, BILLING, vec![dns("api.acme.example")]), None)
            .await;
    let st_renew = format!("{}/renew", cert_path(st["id"].as_str().unwrap()));
    let r = call(&e, "POST", &st_renew, &f.admin, Some(json!({"csr": csr(&k2, BILLING, vec![])}))).await;
    assert_eq!(r.s, StatusCode::BAD_REQUEST, "no DNS name: {}", r.v);
    let r =
        call(&e, "POST", &st_renew, &f.admin, Some(json!({"csr": csr(&k2, BILLING, vec![dns("evil.example")])}))).await;
    assert_eq!(r.s, StatusCode::BAD_REQUEST, "outside the domains: {}", r.v);
    let r =
        call(&e, "POST", &st_renew, &f.admin, Some(json!({"csr": csr(&k2, BILLING, vec![dns("www.acme.example")])})))
            .await;
    assert_eq!(r.s, StatusCode::CREATED, "{}", r.v);
    assert_eq!(inspect(&der_of(&r.v)).dns, ["www.acme.example"]);
    assert_eq!(r.v["type"], "server-transport");

    // Revoked: no renewal.
    assert_eq!(revoke(&e, &f.admin, old_id, Some("superseded")).await.s, StatusCode::OK);
    let before = list(&e, &f.admin, "").await.ids().len();
    let r = call(&e, "POST", &renew_path, &f.admin, Some(json!({"csr": csr(&k2, BILLING, vec![])}))).await;
    assert_eq!(r.s, StatusCode::CONFLICT, "{}", r.v);
    assert_eq!(list(&e, &f.admin, "").await.ids().len(), before);
    let r = call(
        &e,
        "POST",
        &format!("{}/renew", cert_path("nope")),
        &f.admin,
        Some(json!({"csr": csr(&k2, BILLING, vec![])})),
    )
    .await;
    assert_eq!(r.s, StatusCode::NOT_FOUND);
}

// =================================================================================================
// 7. per-application JWKS
// =================================================================================================

async fn jwks(e: &Env, client_id: &str) -> Vec<Value> {
    let r = public(e, &format!("/applications/{client_id}/jwks.json")).await;
    assert_eq!(r.s, StatusCode::OK, "{}", r.v);
    assert_eq!(r.header(header::CONTENT_TYPE), "application/jwk-set+json");
    assert_eq!(r.header(header::CACHE_CONTROL), "no-store");
    r.v["keys"].as_array().unwrap().clone()
}

fn kids(keys: &[Value]) -> BTreeSet<String> {
    keys.iter().map(|k| k["kid"].as_str().unwrap().to_owned()).collect()
}

#[tokio::test]
async fn the_application_jwks_holds_exactly_its_active_signing_certificates() {
    let e = env().await;
    let f = setup(&e).await;
    let (k1, k2, k3) = (p256(), Kt::Ed25519.key(), Kt::Rsa3072.key());
    let s1 = issue_ok(&e, &f.admin, "signing", SIGNER, &csr(&k1, SIGNER, vec![]), None).await;
    let s2 = issue_ok(&e, &f.admin, "signing", SIGNER, &csr(&k2, SIGNER, vec![]), None).await;
    let s3 = issue_ok(&e, &f.admin, "signing", SIGNER, &csr(&k3, SIGNER, vec![]), Some(1)).await;
    let transport = issue_ok(&e, &f.admin, "transport", SIGNER, &csr(&p256(), SIGNER, vec![]), None).await;
    let other_app = issue_ok(&e, &f.admin, "signing", BILLING, &csr(&p256(), BILLING, vec![]), None).await;
    let kid = |v: &Value| v["x5t#S256"].as_str().unwrap().to_owned();
    let issuing = ca_chain(&e).await.remove(0);

    let keys = jwks(&e, SIGNER).await;
    assert_eq!(kids(&keys), [kid(&s1), kid(&s2), kid(&s3)].into_iter().collect(), "signing only, this app only");
    assert!(!kids(&keys).contains(&kid(&transport)) && !kids(&keys).contains(&kid(&other_app)));
    assert_eq!(jwks(&e, "acme%24signer").await.len(), 3, "the client id percent-encoded");

    let ec = keys.iter().find(|k| k["kid"] == kid(&s1)).unwrap();
    let der = der_of(&s1);
    assert_eq!(ec["x5t#S256"], x5t(&der));
    assert_eq!(ec["kid"], ec["x5t#S256"]);
    assert_eq!((ec["kty"].as_str(), ec["crv"].as_str(), ec["use"].as_str()), (Some("EC"), Some("P-256"), Some("sig")));
    assert_eq!(ec["alg"], "ES256");
    let point = k1.public_key_raw();
    assert_eq!(point.len(), 65);
    assert_eq!(ec["x"], b64u(&point[1..33]));
    assert_eq!(ec["y"], b64u(&point[33..]));
    let x5c: Vec<Vec<u8>> =
        ec["x5c"].as_array().unwrap().iter().map(|c| B64.decode(c.as_str().unwrap()).unwrap()).collect();
    assert_eq!(x5c, vec![der, issuing.clone()], "x5c = [certificate, issuing CA], standard base64");
    for k in &keys {
        assert!(k.get("d").is_none() && k.get("p").is_none(), "no private members: {k}");
        assert_eq!(k["x5c"].as_array().unwrap().len(), 2);
    }
    let ed = keys.iter().find(|k| k["kid"] == kid(&s2)).unwrap();
    assert_eq!((ed["kty"].as_str(), ed["crv"].as_str()), (Some("OKP"), Some("Ed25519")), "{ed}");
    assert_eq!(ed["x"], b64u(k2.public_key_raw()));
    let rsa = keys.iter().find(|k| k["kid"] == kid(&s3)).unwrap();
    assert_eq!(rsa["kty"], "RSA", "{rsa}");
    assert_eq!(rsa["e"], "AQAB");

    // Revoked: gone at once.
    assert_eq!(revoke(&e, &f.acme_admin, s1["id"].as_str().unwrap(), Some("key_compromise")).await.s, StatusCode::OK);
    assert_eq!(kids(&jwks(&e, SIGNER).await), [kid(&s2), kid(&s3)].into_iter().collect());
    // Expired: gone at once.
    e.clock.advance(DAY + 1);
    assert_eq!(kids(&jwks(&e, SIGNER).await), [kid(&s2)].into_iter().collect());

    assert!(jwks(&e, MTLS).await.is_empty(), "an application without signing certificates");
    for bad in ["acme$nope", "nope", "acme%24"] {
        assert_eq!(public(&e, &format!("/applications/{bad}/jwks.json")).await.s, StatusCode::NOT_FOUND, "{bad}");
    }
}

// =================================================================================================
// 8. private_key_jwt
// =================================================================================================

#[tokio::test]
async fn a_private_key_jwt_client_authenticates_with_an_assertion_from_its_signing_certificate() {
    let e = env().await;
    let f = setup(&e).await;
    let key = p256();
    let cert = issue_ok(&e, &f.admin, "signing", SIGNER, &csr(&key, SIGNER, vec![]), None).await;
    let kid = cert["x5t#S256"].as_str().unwrap().to_owned();

    // aud = the issuer, then aud = the token endpoint.
    for aud in [ISS.to_owned(), format!("{ISS}/oauth2/token")] {
        let a = assertion(&key, "ES256", &kid, &assertion_claims(&e, SIGNER, &aud));
        let r = assertion_token(&e, &a, "").await;
        assert_eq!(r.s, StatusCode::OK, "aud {aud}: {} {}", r.err(), r.v);
        let c = claims_of(&r.str("access_token"));
        assert_eq!((c["sub"].as_str(), c["client_id"].as_str()), (Some(SIGNER), Some(SIGNER)));
        assert!(c.get("cnf").is_none(), "not certificate-bound: {c}");
    }
    // With the form's client_id naming the same client, and the longest allowed lifetime.
    let mut claims = assertion_claims(&e, SIGNER, ISS);
    claims["exp"] = json!(e.clock.now() + 300);
    let a = assertion(&key, "ES256", &kid, &claims);
    let r = assertion_token(&e, &a, "&client_id=acme%24signer").await;
    assert_eq!(r.s, StatusCode::OK, "{} {}", r.err(), r.v);
    // The same client authentication works at the introspection endpoint.
    let token = r.str("access_token");
    let a = assertion(&key, "ES256", &kid, &assertion_claims(&e, SIGNER, ISS));
    let form = format!("token={token}&client_assertion_type={}&client_assertion={a}", JWT_BEARER.replace(':', "%3A"));
    let req = Request::post("/oauth2/introspect")
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from(form))
        .unwrap();
    let r = send(&e, req).await;
    assert_eq!((r.s, r.v["active"].as_bool()), (StatusCode::OK, Some(true)), "{}", r.v);
    // `typ` may be absent or client-authentication+jwt.
    for header in
        [json!({"alg": "ES256", "kid": kid}), json!({"alg": "ES256", "kid": kid, "typ": "client-authentication+jwt"})]
    {
        let a = compact(&header, &assertion_claims(&e, SIGNER, ISS), |m| jws_sign(&key, "ES256", m));
        let r = assertion_token(&e, &a, "").await;
        assert_eq!(r.s, StatusCode::OK, "{header}: {}", r.v);
    }
}

#[tokio::test]
async fn forged_replayed_and_misaddressed_assertions_are_refused() {
    // More refusals than the default 30 per minute per client: the limit is not under test here.
    let e = env_with(|s| s.auth_failures_per_minute = 1000).await;
    let f = setup(&e).await;
    let key = p256();
    let cert = issue_ok(&e, &f.admin, "signing", SIGNER, &csr(&key, SIGNER, vec![]), None).await;
    let kid = cert["x5t#S256"].as_str().unwrap().to_owned();
    let der = der_of(&cert);
    // A transport certificate of the same application, and a signing certificate of another.
    let tkey = p256();
    let transport = issue_ok(&e, &f.admin, "transport", SIGNER, &csr(&tkey, SIGNER, vec![]), None).await;
    let bkey = p256();
    let billing_signing = issue_ok(&e, &f.admin, "signing", BILLING, &csr(&bkey, BILLING, vec![]), None).await;
    let stranger = p256();
    let now = e.clock.now();
    let ok = || assertion_claims(&e, SIGNER, ISS);
    let with = |k: &str, v: Value| {
        let mut c = ok();
        c[k] = v;
        c
    };
    let without = |k: &str| {
        let mut c = ok();
        c.as_object_mut().unwrap().remove(k);
        c
    };

    // The good one works once; its replay fails.
    let good = assertion(&key, "ES256", &kid, &ok());
    assert_eq!(assertion_token(&e, &good, "").await.s, StatusCode::OK);
    assert_invalid_client(&assertion_token(&e, &good, "").await, "replay");
    // Replay with a new signature over the same jti.
    let mut c = ok();
    c["jti"] = json!("fixed-jti");
    assert_eq!(assertion_token(&e, &assertion(&key, "ES256", &kid, &c), "").await.s, StatusCode::OK);
    c["exp"] = json!(now + 120);
    assert_invalid_client(&assertion_token(&e, &assertion(&key, "ES256", &kid, &c), "").await, "jti reused");

    let pubkey = key.subject_public_key_info();
    let hmac = |secret: &[u8], m: &[u8]| {
        let k = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, secret);
        aws_lc_rs::hmac::sign(&k, m).as_ref().to_vec()
    };
    let h = |alg: &str| json!({"alg": alg, "kid": kid, "typ": "JWT"});
    let es = |m: &[u8]| jws_sign(&key, "ES256", m);
    let forged: Vec<(&str, String)> = vec![
        ("expired", assertion(&key, "ES256", &kid, &with("exp", json!(now - 30)))),
        ("exp too far ahead", assertion(&key, "ES256", &kid, &with("exp", json!(now + 600)))),
        ("no exp", assertion(&key, "ES256", &kid, &without("exp"))),
        ("exp as a string", assertion(&key, "ES256", &kid, &with("exp", json!((now + 60).to_string())))),
        ("no jti", assertion(&key, "ES256", &kid, &without("jti"))),
        ("empty jti", assertion(&key, "ES256", &kid, &with("jti", json!("")))),
        ("nbf in the future", assertion(&key, "ES256", &kid, &with("nbf", json!(now + 60)))),
        ("iat in the future", assertion(&key, "ES256", &kid, &with("iat", json!(now + 60)))),
        ("wrong aud", assertion(&key, "ES256", &kid, &with("aud", json!("https://elsewhere.test")))),
        (
            "aud another endpoint",
            assertion(&key, "ES256", &kid, &with("aud", json!(format!("{ISS}/oauth2/introspect")))),
        ),
        ("no aud", assertion(&key, "ES256", &kid, &without("aud"))),
        ("iss is another client", assertion(&key, "ES256", &kid, &with("iss", json!(BILLING)))),
        ("no iss", assertion(&key, "ES256", &kid, &without("iss"))),
        ("alg none, no signature", compact(&h("none"), &ok(), |_| vec![])),
        ("alg none, junk signature", compact(&h("none"), &ok(), |_| b"junk".to_vec())),
        ("HS256 keyed with the public key", compact(&h("HS256"), &ok(), |m| hmac(&pubkey, m))),
        ("HS256 keyed with the certificate", compact(&h("HS256"), &ok(), |m| hmac(&der, m))),
        ("HS256 keyed with the kid", compact(&h("HS256"), &ok(), |m| hmac(kid.as_bytes(), m))),
        ("ES384 header on a P-256 key", compact(&h("ES384"), &ok(), es)),
        ("EdDSA header on a P-256 key", compact(&h("EdDSA"), &ok(), es)),
        (
            "DER-encoded ECDSA signature",
            compact(&h("ES256"), &ok(), |m| {
                let kp =
                    sig::EcdsaKeyPair::from_pkcs8(&sig::ECDSA_P256_SHA256_ASN1_SIGNING, &key.serialize_der()).unwrap();
                kp.sign(&aws_lc_rs::rand::SystemRandom::new(), m).unwrap().as_ref().to_vec()
            }),
        ),
        ("unknown kid", assertion(&key, "ES256", "not-a-kid", &ok())),
        ("signed by another key", assertion(&stranger, "ES256", &kid, &ok())),
        ("another key, no kid", compact(&json!({"alg": "ES256"}), &ok(), |m| jws_sign(&stranger, "ES256", m))),
        ("the transport certificate's key", assertion(&tkey, "ES256", transport["x5t#S256"].as_str().unwrap(), &ok())),
        (
            "another application's signing certificate",
            assertion(&bkey, "ES256", billing_signing["x5t#S256"].as_str().unwrap(), &ok()),
        ),
        ("typ at+jwt", compact(&json!({"alg": "ES256", "kid": kid, "typ": "at+jwt"}), &ok(), es)),
        ("x5c in the header", compact(&json!({"alg": "ES256", "kid": kid, "x5c": [B64.encode(&der)]}), &ok(), es)),
        ("jwk in the header", compact(&json!({"alg": "ES256", "kid": kid, "jwk": {"kty": "EC"}}), &ok(), es)),
        ("crit in the header", compact(&json!({"alg": "ES256", "kid": kid, "crit": ["exp"]}), &ok(), es)),
        ("not a JWT", "a.b".into()),
        ("an unknown client", assertion(&key, "ES256", &kid, &assertion_claims(&e, "acme$nope", ISS))),
        ("a malformed client id", assertion(&key, "ES256", &kid, &assertion_claims(&e, "nope", ISS))),
    ];
    for (what, a) in &forged {
        let r = assertion_token(&e, a, "").await;
        assert_invalid_client(&r, what);
        assert!(r.h.contains_key("x-error-id"));
    }
    // The form's client_id disagrees with the assertion.
    let r = assertion_token(&e, &assertion(&key, "ES256", &kid, &ok()), "&client_id=acme%24billing").await;
    assert_invalid_client(&r, "client_id is another client");
    // Malformed requests: 400 invalid_request.
    let a = assertion(&key, "ES256", &kid, &ok());
    for (what, form) in [
        (
            "wrong assertion type",
            format!("grant_type=client_credentials&client_assertion_type=urn%3Aexample%3Ajwt&client_assertion={a}"),
        ),
        ("no assertion type", format!("grant_type=client_credentials&client_assertion={a}")),
        (
            "type without assertion",
            format!("grant_type=client_credentials&client_assertion_type={}", JWT_BEARER.replace(':', "%3A")),
        ),
        (
            "assertion and secret",
            format!(
                "grant_type=client_credentials&client_assertion_type={}&client_assertion={a}&client_id=acme%24signer&client_secret=x",
                JWT_BEARER.replace(':', "%3A")
            ),
        ),
    ] {
        let r = token_request(&e, &form, None, None).await;
        assert_eq!((r.s, r.v["error"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_request")), "{what}: {}", r.v);
    }
    // The unused good assertion `a` still works: none of the refusals burnt it.
    assert_eq!(assertion_token(&e, &a, "").await.s, StatusCode::OK);

    // After the certificate is revoked its key no longer authenticates.
    let fresh = assertion(&key, "ES256", &kid, &ok());
    assert_eq!(revoke(&e, &f.admin, cert["id"].as_str().unwrap(), Some("key_compromise")).await.s, StatusCode::OK);
    assert_invalid_client(&assertion_token(&e, &fresh, "").await, "revoked certificate");
}

#[tokio::test]
async fn assertions_expire_with_their_certificate_and_work_for_every_key_type() {
    let e = env().await;
    let f = setup(&e).await;
    let mut made = Vec::new();
    for (kt, algs) in
        [(Kt::P384, &["ES384"][..]), (Kt::Ed25519, &["EdDSA"][..]), (Kt::Rsa3072, &["RS256", "PS256"][..])]
    {
        let key = kt.key();
        let cert = issue_ok(&e, &f.admin, "signing", SIGNER, &csr(&key, SIGNER, vec![]), Some(2)).await;
        let kid = cert["x5t#S256"].as_str().unwrap().to_owned();
        for alg in algs {
            let r = assertion_token(&e, &assertion(&key, alg, &kid, &assertion_claims(&e, SIGNER, ISS)), "").await;
            assert_eq!(r.s, StatusCode::OK, "{kt:?} {alg}: {} {}", r.err(), r.v);
        }
        // Without a kid the right key is found too.
        let a = compact(&json!({"alg": algs[0]}), &assertion_claims(&e, SIGNER, ISS), |m| jws_sign(&key, algs[0], m));
        assert_eq!(assertion_token(&e, &a, "").await.s, StatusCode::OK, "{kt:?} without kid");
        made.push((key, algs[0], kid));
    }
    // An RSA key signing with an EC algorithm name.
    let (rsa_key, _, rsa_kid) = &made[2];
    let bad = compact(&json!({"alg": "ES256", "kid": rsa_kid}), &assertion_claims(&e, SIGNER, ISS), |m| {
        jws_sign(rsa_key, "RS256", m)
    });
    assert_invalid_client(&assertion_token(&e, &bad, "").await, "RS256 signature labelled ES256");

    // Past the certificates' not_after: refused, though the assertion itself is fresh.
    e.clock.advance(2 * DAY + 1);
    for (key, alg, kid) in &made {
        let r = assertion_token(&e, &assertion(key, alg, kid, &assertion_claims(&e, SIGNER, ISS)), "").await;
        assert_invalid_client(&r, &format!("{alg} after expiry"));
    }
}

#[tokio::test]
async fn the_registered_authentication_method_is_enforced_both_ways() {
    let e = env().await;
    let f = setup(&e).await;
    // billing (client_secret_basic) holds a signing certificate, yet an assertion is no way in.
    let key = p256();
    let cert = issue_ok(&e, &f.admin, "signing", BILLING, &csr(&key, BILLING, vec![]), None).await;
    let a = assertion(&key, "ES256", cert["x5t#S256"].as_str().unwrap(), &assertion_claims(&e, BILLING, ISS));
    assert_invalid_client(&assertion_token(&e, &a, "").await, "assertion for a client_secret_basic client");
    // Its secret still works.
    secret_token(&e, BILLING, &f.billing_secret).await;

    // signer (private_key_jwt) has no secret; any secret is refused, in either form.
    let r = token_request(&e, "grant_type=client_credentials", Some((SIGNER, &f.billing_secret)), None).await;
    assert_invalid_client(&r, "basic for a private_key_jwt client");
    let form = format!("grant_type=client_credentials&client_id=acme%24signer&client_secret={}", f.billing_secret);
    assert_invalid_client(&token_request(&e, &form, None, None).await, "post for a private_key_jwt client");
    // Nor a client certificate (tls_client_auth) in place of the assertion.
    let skey = p256();
    let t = issue_ok(&e, &f.admin, "transport", SIGNER, &csr(&skey, SIGNER, vec![]), None).await;
    let r = token_request(&e, "grant_type=client_credentials&client_id=acme%24signer", None, Some(&der_of(&t))).await;
    assert_invalid_client(&r, "certificate for a private_key_jwt client");
}

// =================================================================================================
// tls_client_auth (RFC 8705)
// =================================================================================================

#[tokio::test]
async fn tls_client_auth_takes_only_an_active_transport_certificate_of_that_application() {
    let e = env().await;
    let mut f = setup(&e).await;
    let key = p256();
    let t = issue_ok(&e, &f.admin, "transport", MTLS, &csr(&key, MTLS, vec![]), Some(2)).await;
    let s = issue_ok(&e, &f.admin, "signing", MTLS, &csr(&key, MTLS, vec![]), None).await;
    let other = issue_ok(&e, &f.admin, "transport", BILLING, &csr(&key, BILLING, vec![]), None).await;
    let form = "grant_type=client_credentials&client_id=acme%24mtls";

    let r = token_request(&e, form, None, Some(&der_of(&t))).await;
    assert_eq!(r.s, StatusCode::OK, "{} {}", r.err(), r.v);
    let c = claims_of(&r.str("access_token"));
    assert_eq!(c["sub"], MTLS);
    assert_eq!(c["cnf"]["x5t#S256"], t["x5t#S256"], "certificate-bound: {c}");

    assert_invalid_client(&token_request(&e, form, None, Some(&der_of(&s))).await, "a signing certificate");
    assert_invalid_client(&token_request(&e, form, None, Some(&der_of(&other))).await, "another app's certificate");
    assert_eq!(token_request(&e, form, None, None).await.s, StatusCode::UNAUTHORIZED, "no certificate");
    // A certificate we never issued, with the right subject and URI, self-signed.
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, MTLS);
    p.distinguished_name.push(DnType::OrganizationName, ORG);
    p.subject_alt_names = vec![uri("urn:portcullis:client:acme$mtls")];
    let selfsigned = p.self_signed(&key).unwrap().der().to_vec();
    assert_invalid_client(&token_request(&e, form, None, Some(&selfsigned)).await, "self-signed");
    // billing's certificate does not make billing (a secret client) authenticate without its secret.
    let r =
        token_request(&e, "grant_type=client_credentials&client_id=acme%24billing", None, Some(&der_of(&other))).await;
    assert_invalid_client(&r, "certificate for a client_secret_basic client");
    // With its secret, over mTLS, billing gets a token bound to the certificate (RFC 8705 §3).
    let r = token_request(
        &e,
        "grant_type=client_credentials",
        Some(("acme$billing", &f.billing_secret)),
        Some(&der_of(&other)),
    )
    .await;
    assert_eq!(r.s, StatusCode::OK, "{}", r.v);
    let c = claims_of(&r.str("access_token"));
    assert_eq!(c["cnf"]["x5t#S256"], other["x5t#S256"], "bound to the presented certificate: {c}");

    // Expired, then (another one) revoked.
    let t2 = issue_ok(&e, &f.admin, "transport", MTLS, &csr(&key, MTLS, vec![]), None).await;
    e.clock.advance(2 * DAY + 1);
    f.refresh(&e).await;
    assert_invalid_client(&token_request(&e, form, None, Some(&der_of(&t))).await, "expired");
    let r = token_request(&e, form, None, Some(&der_of(&t2))).await;
    assert_eq!(r.s, StatusCode::OK, "{} {}", r.err(), r.v);
    assert_eq!(revoke(&e, &f.admin, t2["id"].as_str().unwrap(), None).await.s, StatusCode::OK);
    assert_invalid_client(&token_request(&e, form, None, Some(&der_of(&t2))).await, "revoked");
}

// =================================================================================================
// 9. expiry notices
// =================================================================================================

#[tokio::test]
async fn expiry_notices_reach_the_organisations_admins_once() {
    let e = env().await;
    let f = setup(&e).await;
    let key = p256();
    let t = issue_ok(&e, &f.admin, "transport", "billing", &csr(&key, BILLING, vec![]), None).await;
    let revoked = issue_ok(&e, &f.admin, "transport", "billing", &csr(&key, BILLING, vec![]), None).await;
    assert_eq!(revoke(&e, &f.admin, revoked["id"].as_str().unwrap(), None).await.s, StatusCode::OK);
    let later = issue_ok(&e, &f.admin, "signing", "billing", &csr(&key, BILLING, vec![]), Some(200)).await;
    let beta_app = create_app(&e, &f.admin, "beta", json!({"slug": "svc", "name": "Svc"})).await;
    let r = issue(&e, &f.admin, "beta", "transport", "svc", &csr(&key, "beta$svc", vec![]), Some(200)).await;
    assert_eq!(r.s, StatusCode::CREATED, "{} {beta_app}", r.v);
    let not_after = inspect(&der_of(&t)).not_after;

    assert_eq!(e.core.send_expiry_notices().await.unwrap(), 0, "nothing is due");
    e.clock.set(not_after - 15 * DAY);
    assert_eq!(e.core.send_expiry_notices().await.unwrap(), 0, "15 days ahead is outside the 14-day window");
    assert!(mails(&e, OLGA, "expires").await.is_empty());

    e.clock.set(not_after - 13 * DAY);
    assert_eq!(e.core.send_expiry_notices().await.unwrap(), 1, "only the active certificate within the window");
    let got = mails(&e, OLGA, "expires").await;
    assert_eq!(got.len(), 1, "{:?}", got.iter().map(|m| &m.subject).collect::<Vec<_>>());
    assert!(got[0].subject.contains(BILLING), "{}", got[0].subject);
    assert!(got[0].text.contains(t["serial"].as_str().unwrap()), "{}", got[0].text);
    assert!(!got[0].text.contains(later["serial"].as_str().unwrap()));
    assert!(mails(&e, ANN, "").await.is_empty(), "not a plain user");
    assert!(mails(&e, BOB, "").await.is_empty(), "not another organisation's admin");

    // Once.
    assert_eq!(e.core.send_expiry_notices().await.unwrap(), 0);
    e.clock.advance(DAY);
    assert_eq!(e.core.send_expiry_notices().await.unwrap(), 0);
    assert_eq!(mails(&e, OLGA, "expires").await.len(), 1, "no second notice");
}

// =================================================================================================
// 10. issuing-CA rotation
// =================================================================================================

#[tokio::test]
async fn after_issuing_ca_rotation_old_certificates_stay_valid_revocable_and_on_their_own_crl() {
    let e = env().await;
    let f = setup(&e).await;
    let key = p256();
    let before = ca_chain(&e).await;
    let old_ca = before[0].clone();
    let root = before[1].clone();
    let old = issue_ok(&e, &f.admin, "transport", "billing", &csr(&key, BILLING, vec![]), None).await;
    let old_signing = issue_ok(&e, &f.admin, "signing", SIGNER, &csr(&key, SIGNER, vec![]), None).await;
    let old_mtls = issue_ok(&e, &f.admin, "transport", MTLS, &csr(&key, MTLS, vec![]), None).await;
    let old_issuer = old["issuer_id"].as_str().unwrap().to_owned();
    let old_crl_number = current_crl(&e).await.number;

    e.clock.advance(60);
    let rotated = e.core.rotate_issuing_ca("test").await.unwrap();
    assert_ne!(rotated.id, old_issuer);

    // ca.pem: the new issuing CA, the old one, the root.
    let after = ca_chain(&e).await;
    assert_eq!(after.len(), 3, "both issuing CAs and the root");
    let new_ca = after[0].clone();
    assert_eq!((&after[1], &after[2]), (&old_ca, &root));
    assert_ne!(new_ca, old_ca);
    assert!(signed_by(&new_ca, &root) && signed_by(&old_ca, &root));
    assert_ne!(subject_name(&new_ca), subject_name(&old_ca), "distinguishable issuing CAs");

    // New issuance uses the new CA.
    let new = issue_ok(&e, &f.admin, "transport", "billing", &csr(&key, BILLING, vec![]), None).await;
    assert_eq!(new["issuer_id"].as_str(), Some(rotated.id.as_str()));
    assert_ne!(new["issuer_id"], old["issuer_id"]);
    let new_der = der_of(&new);
    assert!(signed_by(&new_der, &new_ca) && !signed_by(&new_der, &old_ca));
    assert_eq!(inspect(&new_der).crl_urls, vec![format!("{ISS}/pki/crl/{}", rotated.id)]);
    assert_eq!(pem_blocks(new["chain_pem"].as_str().unwrap(), "CERTIFICATE"), vec![new_ca.clone(), root.clone()]);

    // The old certificate still verifies, still comes with its own chain, still works.
    let old_der = der_of(&old);
    assert!(signed_by(&old_der, &old_ca));
    let r = call(&e, "GET", &format!("{}/chain", cert_path(old["id"].as_str().unwrap())), &f.admin, None).await;
    assert_eq!(pem_blocks(&r.text(), "CERTIFICATE"), vec![old_ca.clone(), root.clone()]);
    let keys = jwks(&e, SIGNER).await;
    assert_eq!(keys.len(), 1);
    assert_eq!(B64.decode(keys[0]["x5c"][1].as_str().unwrap()).unwrap(), old_ca, "x5c names the old issuing CA");
    let r =
        token_request(&e, "grant_type=client_credentials&client_id=acme%24mtls", None, Some(&der_of(&old_mtls))).await;
    assert_eq!(r.s, StatusCode::OK, "an old transport certificate authenticates: {}", r.v);
    let a = assertion(&key, "ES256", old_signing["x5t#S256"].as_str().unwrap(), &assertion_claims(&e, SIGNER, ISS));
    assert_eq!(assertion_token(&e, &a, "").await.s, StatusCode::OK, "an old signing certificate authenticates");

    // Revoking it lands on the old CA's CRL, the one its distribution point names.
    let url = format!("{ISS}/pki/crl/{old_issuer}");
    assert_eq!(inspect(&old_der).crl_urls, vec![url.clone()]);
    let r = revoke(&e, &f.admin, old["id"].as_str().unwrap(), Some("key_compromise")).await;
    assert_eq!(r.s, StatusCode::OK, "{}", r.v);
    let r = public(&e, url.strip_prefix(ISS).unwrap()).await;
    assert_eq!(r.s, StatusCode::OK);
    assert_eq!(r.header(header::CONTENT_TYPE), "application/pkix-crl");
    let old_crl = crl_info(&r.bytes, &old_ca);
    assert_eq!(old_crl.entries, vec![(old["serial"].as_str().unwrap().to_owned(), Some(1))]);
    assert!(old_crl.number > old_crl_number);
    assert_eq!(old_crl.issuer, subject_name(&old_ca));
    // The active CRL is the new CA's, without it.
    let active = current_crl(&e).await;
    assert_eq!(active.issuer, subject_name(&new_ca));
    assert!(active.entries.is_empty());
    let r = public(&e, &format!("/pki/crl/{}", rotated.id)).await;
    assert_eq!(r.bytes, public(&e, "/pki/crl").await.bytes);
    // Revoke on the new CA: only the new CRL changes.
    assert_eq!(revoke(&e, &f.admin, new["id"].as_str().unwrap(), None).await.s, StatusCode::OK);
    let active = current_crl(&e).await;
    assert_eq!(active.entries, vec![(new["serial"].as_str().unwrap().to_owned(), None)]);
    assert_eq!(crl_info(&public(&e, url.strip_prefix(ISS).unwrap()).await.bytes, &old_ca).number, old_crl.number);
    // crl.pem carries both.
    let pems = pem_blocks(&public(&e, "/pki/crl.pem").await.text(), "X509 CRL");
    assert_eq!(pems.len(), 2);
    assert_eq!(
        BTreeSet::from_iter(pems.iter().map(|d| x509_parser::parse_x509_crl(d).unwrap().1.issuer().to_string())),
        BTreeSet::from([subject_name(&new_ca), subject_name(&old_ca)])
    );
    assert_eq!(public(&e, "/pki/crl/nope").await.s, StatusCode::NOT_FOUND);

    // The old signing certificate, revoked, leaves the JWKS.
    assert_eq!(revoke(&e, &f.admin, old_signing["id"].as_str().unwrap(), None).await.s, StatusCode::OK);
    assert!(jwks(&e, SIGNER).await.is_empty());
}

// =================================================================================================
// CRL upkeep, races, renewal over mTLS, deleted applications, replay-record upkeep
// =================================================================================================

#[tokio::test]
async fn crls_are_re_signed_at_half_their_lifetime_and_keep_their_entries() {
    let e = env().await;
    let f = setup(&e).await;
    let v = issue_ok(&e, &f.admin, "transport", "billing", &csr(&p256(), BILLING, vec![]), None).await;
    assert_eq!(revoke(&e, &f.admin, v["id"].as_str().unwrap(), Some("key_compromise")).await.s, StatusCode::OK);
    let first = current_crl(&e).await;
    let entry = (v["serial"].as_str().unwrap().to_owned(), Some(1));
    assert_eq!(first.entries, vec![entry.clone()]);

    // Before half of its lifetime: the maintenance tick leaves it alone.
    e.clock.advance(11 * 3600);
    e.core.load_ca().await.unwrap();
    assert_eq!(current_crl(&e).await.number, first.number);
    // Past half: re-signed, numbered higher, valid for a full lifetime from now, same entries.
    e.clock.advance(2 * 3600);
    e.core.load_ca().await.unwrap();
    let second = current_crl(&e).await;
    assert!(second.number > first.number, "{} then {}", first.number, second.number);
    assert_eq!(second.this_update, e.clock.now());
    assert_eq!(second.next_update, e.clock.now() + 86_400);
    assert_eq!(second.entries, vec![entry]);
    // Many ticks over a long time: the served CRL never passes its nextUpdate.
    for _ in 0..8 {
        e.clock.advance(6 * 3600);
        e.core.load_ca().await.unwrap();
        let crl = current_crl(&e).await;
        assert!(crl.next_update > e.clock.now() + 43_000, "{crl:?} at {}", e.clock.now());
    }
}

async fn race(e: &Env, reqs: Vec<Request<Body>>) -> Vec<StatusCode> {
    let mut set = tokio::task::JoinSet::new();
    for req in reqs {
        let app = e.app.clone();
        set.spawn(async move { app.oneshot(req).await.unwrap().status() });
    }
    let mut out = Vec::new();
    while let Some(s) = set.join_next().await {
        out.push(s.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_revocations_and_replays_have_exactly_one_winner() {
    let e = env().await;
    let f = setup(&e).await;
    let key = p256();
    let v = issue_ok(&e, &f.admin, "signing", SIGNER, &csr(&key, SIGNER, vec![]), None).await;
    let kid = v["x5t#S256"].as_str().unwrap().to_owned();

    // The same assertion eight times at once: one token.
    let a = assertion(&key, "ES256", &kid, &assertion_claims(&e, SIGNER, ISS));
    let form = format!(
        "grant_type=client_credentials&client_assertion_type={}&client_assertion={a}",
        JWT_BEARER.replace(':', "%3A")
    );
    let reqs = (0..8)
        .map(|_| {
            Request::post("/oauth2/token")
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(Body::from(form.clone()))
                .unwrap()
        })
        .collect();
    let got = race(&e, reqs).await;
    assert_eq!(got.iter().filter(|s| **s == StatusCode::OK).count(), 1, "{got:?}");
    assert_eq!(got.iter().filter(|s| **s == StatusCode::UNAUTHORIZED).count(), 7, "{got:?}");

    // The same certificate revoked eight times at once: one revocation, one mail, one CRL entry.
    let before = current_crl(&e).await.number;
    let path = format!("{}/revoke", cert_path(v["id"].as_str().unwrap()));
    let body = json!({"reason": "key_compromise"});
    let reqs = (0..8).map(|_| request("POST", &path, Some(&f.admin), Some(&body))).collect();
    let got = race(&e, reqs).await;
    assert_eq!(got.iter().filter(|s| **s == StatusCode::OK).count(), 1, "{got:?}");
    assert_eq!(got.iter().filter(|s| **s == StatusCode::CONFLICT).count(), 7, "{got:?}");
    assert_eq!(mails(&e, OLGA, "was revoked").await.len(), 1);
    let crl = current_crl(&e).await;
    assert_eq!(crl.entries.len(), 1);
    assert!(crl.number > before);
}

async fn renew_over_mtls(e: &Env, peer: Option<&[u8]>, body: Option<Value>) -> Resp {
    let mut req = request("POST", "/pki/renew", None, body.as_ref());
    if let Some(der) = peer {
        req.extensions_mut().insert(PeerCertificate(Arc::new(der.to_vec())));
    }
    send(e, req).await
}

#[tokio::test]
async fn a_transport_certificate_renews_itself_over_mtls() {
    let e = env().await;
    let mut f = setup(&e).await;
    let key = p256();
    let t = issue_ok(&e, &f.admin, "transport", MTLS, &csr(&key, MTLS, vec![]), Some(5)).await;
    let t_der = der_of(&t);

    assert_eq!(renew_over_mtls(&e, None, None).await.s, StatusCode::UNAUTHORIZED, "no client certificate");
    // Same key, no body.
    let r = renew_over_mtls(&e, Some(&t_der), None).await;
    assert_eq!(r.s, StatusCode::CREATED, "{} {}", r.err(), r.v);
    assert_eq!(r.v["renewed_from"], t["id"]);
    assert_ne!(r.v["serial"], t["serial"]);
    assert_eq!(r.v["created_by"], format!("certificate:{}", t["serial"].as_str().unwrap()));
    let c = inspect(&der_of(&r.v));
    assert_eq!(c.spki, key.subject_public_key_info(), "the same key");
    assert_eq!(c.subject, vec![("CN".into(), MTLS.into()), ("O".into(), ORG.into())]);
    assert_eq!(c.eku, Some((true, false, false)));
    assert_eq!(c.not_after, e.clock.now() + 90 * DAY, "the type's default validity");
    // A new key with a CSR; the subject must still be the application's.
    let k2 = Kt::Ed25519.key();
    let r = renew_over_mtls(&e, Some(&t_der), Some(json!({"csr": csr(&k2, MTLS, vec![])}))).await;
    assert_eq!(r.s, StatusCode::CREATED, "{} {}", r.err(), r.v);
    assert_eq!(inspect(&der_of(&r.v)).spki, k2.subject_public_key_info());
    let r = renew_over_mtls(&e, Some(&t_der), Some(json!({"csr": csr(&k2, BILLING, vec![])}))).await;
    assert_eq!(r.s, StatusCode::BAD_REQUEST, "another application's subject: {}", r.v);
    let r = renew_over_mtls(&e, Some(&t_der), Some(json!({"csr": csr(&k2, MTLS, vec![]), "validity_days": 1}))).await;
    assert_eq!(r.s, StatusCode::BAD_REQUEST, "unknown field: {}", r.v);

    // Only transport certificates, only ours, only live ones, only of enabled applications.
    let s = issue_ok(&e, &f.admin, "signing", MTLS, &csr(&key, MTLS, vec![]), None).await;
    assert_eq!(renew_over_mtls(&e, Some(&der_of(&s)), None).await.s, StatusCode::FORBIDDEN, "a signing certificate");
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, MTLS);
    p.distinguished_name.push(DnType::OrganizationName, ORG);
    let foreign = p.self_signed(&key).unwrap().der().to_vec();
    assert_eq!(renew_over_mtls(&e, Some(&foreign), None).await.s, StatusCode::UNAUTHORIZED, "not ours");
    let r =
        call(&e, "PATCH", "/api/v1/organisations/acme/applications/mtls", &f.admin, Some(json!({"enabled": false})))
            .await;
    assert_eq!(r.s, StatusCode::OK, "{}", r.v);
    assert_eq!(renew_over_mtls(&e, Some(&t_der), None).await.s, StatusCode::FORBIDDEN, "disabled application");
    let r = call(&e, "PATCH", "/api/v1/organisations/acme/applications/mtls", &f.admin, Some(json!({"enabled": true})))
        .await;
    assert_eq!(r.s, StatusCode::OK);
    let t2 = issue_ok(&e, &f.admin, "transport", MTLS, &csr(&key, MTLS, vec![]), None).await;
    assert_eq!(revoke(&e, &f.admin, t2["id"].as_str().unwrap(), None).await.s, StatusCode::OK);
    assert_eq!(renew_over_mtls(&e, Some(&der_of(&t2)), None).await.s, StatusCode::UNAUTHORIZED, "revoked");
    e.clock.advance(5 * DAY + 1);
    f.refresh(&e).await;
    assert_eq!(renew_over_mtls(&e, Some(&t_der), None).await.s, StatusCode::UNAUTHORIZED, "expired");
}

#[tokio::test]
async fn certificates_of_a_deleted_application_do_not_pass_to_a_new_one_of_the_same_name() {
    let e = env().await;
    let f = setup(&e).await;
    let key = p256();
    let s = issue_ok(&e, &f.admin, "signing", SIGNER, &csr(&key, SIGNER, vec![]), None).await;
    let kid = s["x5t#S256"].as_str().unwrap().to_owned();
    let t = issue_ok(&e, &f.admin, "transport", MTLS, &csr(&key, MTLS, vec![]), None).await;
    for app in ["signer", "mtls"] {
        let r = call(&e, "DELETE", &format!("/api/v1/organisations/{ORG}/applications/{app}"), &f.admin, None).await;
        assert_eq!(r.s, StatusCode::NO_CONTENT, "{}", r.v);
    }
    // Both certificates are on the CRL with reason cessationOfOperation (5).
    let crl = current_crl(&e).await;
    for c in [&s, &t] {
        let serial = c["serial"].as_str().unwrap();
        assert!(crl.entries.contains(&(serial.to_owned(), Some(5))), "{serial} in {:?}", crl.entries);
    }
    assert_eq!(public(&e, "/applications/acme$signer/jwks.json").await.s, StatusCode::NOT_FOUND);
    let a = assertion(&key, "ES256", &kid, &assertion_claims(&e, SIGNER, ISS));
    assert_invalid_client(&assertion_token(&e, &a, "").await, "deleted application");
    let form = "grant_type=client_credentials&client_id=acme%24mtls";
    assert_invalid_client(&token_request(&e, form, None, Some(&der_of(&t))).await, "deleted application");

    // Same names again: the old certificates are not theirs.
    create_app(
        &e,
        &f.admin,
        ORG,
        json!({"slug": "signer", "name": "Signer", "token_endpoint_auth_method": "private_key_jwt"}),
    )
    .await;
    create_app(
        &e,
        &f.admin,
        ORG,
        json!({"slug": "mtls", "name": "Mtls", "token_endpoint_auth_method": "tls_client_auth"}),
    )
    .await;
    assert!(jwks(&e, SIGNER).await.is_empty(), "the new signer has no keys yet");
    let a = assertion(&key, "ES256", &kid, &assertion_claims(&e, SIGNER, ISS));
    assert_invalid_client(&assertion_token(&e, &a, "").await, "the old signer's key");
    assert_invalid_client(&token_request(&e, form, None, Some(&der_of(&t))).await, "the old mtls certificate");
    // Deleting the application revoked its certificates (cessationOfOperation).
    assert_eq!(renew_over_mtls(&e, Some(&der_of(&t)), None).await.s, StatusCode::UNAUTHORIZED, "renewing the old one");
    let r = call(
        &e,
        "POST",
        &format!("{}/renew", cert_path(t["id"].as_str().unwrap())),
        &f.admin,
        Some(json!({"csr": csr(&key, MTLS, vec![])})),
    )
    .await;
    assert_eq!(r.s, StatusCode::CONFLICT, "an admin renewing it for the new application: {}", r.v);
    // The old records stay in the inventory, already revoked.
    let again = revoke(&e, &f.admin, s["id"].as_str().unwrap(), Some("cessation_of_operation")).await;
    assert_eq!(again.s, StatusCode::CONFLICT, "{}", again.v);
}

#[tokio::test]
async fn expired_assertion_ids_are_purged_by_maintenance() {
    let e = env().await;
    let f = setup(&e).await;
    let key = p256();
    let v = issue_ok(&e, &f.admin, "signing", SIGNER, &csr(&key, SIGNER, vec![]), None).await;
    let kid = v["x5t#S256"].as_str().unwrap().to_owned();
    for _ in 0..5 {
        let a = assertion(&key, "ES256", &kid, &assertion_claims(&e, SIGNER, ISS));
        assert_eq!(assertion_token(&e, &a, "").await.s, StatusCode::OK);
    }
    // Long after every assertion expired, the regular maintenance (what `serve` runs on each
    // tick) has run: the replay records are gone, or the table grows with every token request.
    e.clock.advance(3600);
    e.core.purge_expired_revocations().await.unwrap();
    e.core.purge_ended_credentials().await.unwrap();
    e.core.load_ca().await.unwrap();
    e.core.send_expiry_notices().await.unwrap();
    let left = e.core.store().purge_assertion_jtis(e.clock.now()).await.unwrap();
    assert_eq!(left, 0, "{left} expired assertion jtis were still stored after maintenance");
}
