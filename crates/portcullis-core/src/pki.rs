//! Certificate issuance, pure and synchronous: strict PEM, CSR parsing and checking (the CSR
//! is untrusted input — only its public key, subject and DNS names are read, and only after
//! its self-signature verifies), the three certificate profiles, signing with the issuing CA,
//! CRLs, and the JWK of a signing certificate. The use cases (`usecases::pki`) add the
//! organisation's rules, the inventory and the audit.

use base64::Engine;
use base64::engine::general_purpose::{STANDARD as B64STD, URL_SAFE_NO_PAD as B64URL};
use rcgen::{
    CertificateParams, CertificateRevocationListParams, CrlDistributionPoint, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, RevokedCertParams, SanType, SerialNumber,
};
use time::OffsetDateTime;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer;

use crate::clock::UnixTime;
use crate::crypto::jwk::ClientKeyMaterial;
use crate::error::{Error, Result};
use crate::model::{CertificateType, RevocationReason, RevokedEntry};

/// Every certificate issued to an application carries this URI (plus its client id) as a
/// SAN, so a gateway maps a certificate to its application without parsing the subject.
pub const APP_URI_PREFIX: &str = "urn:portcullis:client:";
/// Largest CSR (PEM text) we look at.
pub const MAX_CSR_LEN: usize = 16 * 1024;
/// RSA keys above this size are refused (they cost too much to verify).
const MAX_RSA_BITS: usize = 8192;

pub fn app_uri(client_id: &str) -> String {
    format!("{APP_URI_PREFIX}{client_id}")
}

// ---- PEM ----------------------------------------------------------------------------------

/// Decodes exactly one PEM block whose label is one of `labels`. Anything but whitespace
/// around it, a second block, a wrong label or bad base64 is refused with a message that
/// says which.
pub fn pem_decode(text: &str, labels: &[&str], what: &str) -> Result<Vec<u8>> {
    let text = text.trim();
    let begin = text
        .strip_prefix("-----BEGIN ")
        .ok_or_else(|| Error::invalid(format!("{what} must be PEM text starting with -----BEGIN")))?;
    let (label, rest) =
        begin.split_once("-----").ok_or_else(|| Error::invalid(format!("{what}: malformed PEM header")))?;
    if !labels.contains(&label) {
        let hint =
            if label == "CERTIFICATE" { " (this is a certificate, not a certificate signing request)" } else { "" };
        let shown: String = label.chars().take(40).filter(|c| c.is_ascii_graphic() || *c == ' ').collect();
        return Err(Error::invalid(format!(
            "{what}: expected a PEM block labelled {}, got {shown:?}{hint}",
            labels.join(" or ")
        )));
    }
    let end_marker = format!("-----END {label}-----");
    let (body, after) = rest
        .split_once(&end_marker)
        .ok_or_else(|| Error::invalid(format!("{what}: PEM block has no {end_marker} line")))?;
    if !after.trim().is_empty() {
        return Err(Error::invalid(format!("{what}: exactly one PEM block is expected")));
    }
    let mut b64 = String::with_capacity(body.len());
    for line in body.lines() {
        let line = line.trim();
        if line.contains(':') {
            return Err(Error::invalid(format!("{what}: PEM headers are not accepted")));
        }
        b64.push_str(line);
    }
    B64STD.decode(b64.as_bytes()).map_err(|_| Error::invalid(format!("{what}: PEM body is not valid base64")))
}

pub fn pem_encode(label: &str, der: &[u8]) -> String {
    let b64 = B64STD.encode(der);
    let mut out = String::with_capacity(b64.len() + b64.len() / 64 + 2 * label.len() + 40);
    out.push_str("-----BEGIN ");
    out.push_str(label);
    out.push_str("-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END ");
    out.push_str(label);
    out.push_str("-----\n");
    out
}

/// Every certificate of a PEM bundle, in order.
pub fn pem_certificates(text: &str) -> Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        let end = rest.find("-----END CERTIFICATE-----").ok_or_else(|| Error::invalid("malformed certificate PEM"))?
            + "-----END CERTIFICATE-----".len();
        let (block, tail) = rest.split_at(end);
        out.push(pem_decode(block, &["CERTIFICATE"], "certificate")?);
        rest = tail.trim();
    }
    Ok(out)
}

// ---- CSR ----------------------------------------------------------------------------------

/// What a verified CSR asks for. Nothing here is trusted until the profile checks it.
#[derive(Debug, Clone)]
pub struct Csr {
    pub spki_der: Vec<u8>,
    pub key: ClientKeyMaterial,
    /// Subject attributes in order, as `(short name, value)`; unknown types by dotted OID.
    pub subject: Vec<(String, String)>,
    pub dns_names: Vec<String>,
    /// Requested SANs of other kinds (`IP:…`, `URI:…`, `email:…`).
    pub other_names: Vec<String>,
    /// It asked for CA:TRUE (which is never issued).
    pub asks_ca: bool,
}

/// Decodes, parses and verifies a PEM CSR: allowed signature algorithm (no SHA-1), allowed
/// key (RSA 2048–8192, P-256, P-384, Ed25519), valid self-signature.
pub fn parse_csr(pem: &str) -> Result<Csr> {
    if pem.len() > MAX_CSR_LEN {
        return Err(Error::invalid(format!("csr is larger than {MAX_CSR_LEN} bytes")));
    }
    let der = pem_decode(pem, &["CERTIFICATE REQUEST", "NEW CERTIFICATE REQUEST"], "csr")?;
    parse_csr_der(&der)
}

pub fn parse_csr_der(der: &[u8]) -> Result<Csr> {
    use x509_parser::oid_registry::{
        OID_PKCS1_RSASSAPSS, OID_PKCS1_SHA256WITHRSA, OID_PKCS1_SHA384WITHRSA, OID_PKCS1_SHA512WITHRSA,
        OID_SIG_ECDSA_WITH_SHA256, OID_SIG_ECDSA_WITH_SHA384, OID_SIG_ED25519,
    };
    let (rest, csr) = X509CertificationRequest::from_der(der)
        .map_err(|_| Error::invalid("csr is not a valid PKCS#10 certificate signing request"))?;
    if !rest.is_empty() {
        return Err(Error::invalid("csr has trailing bytes after the request"));
    }
    let sig_alg = &csr.signature_algorithm.algorithm;
    let allowed = [
        OID_PKCS1_SHA256WITHRSA,
        OID_PKCS1_SHA384WITHRSA,
        OID_PKCS1_SHA512WITHRSA,
        OID_PKCS1_RSASSAPSS,
        OID_SIG_ECDSA_WITH_SHA256,
        OID_SIG_ECDSA_WITH_SHA384,
        OID_SIG_ED25519,
    ];
    if !allowed.contains(sig_alg) {
        return Err(Error::invalid(format!(
            "csr is signed with algorithm {sig_alg}, which is not accepted: use SHA-256 or stronger with RSA or ECDSA, or Ed25519"
        )));
    }
    let info = &csr.certification_request_info;
    let key = key_policy(&info.subject_pki)?;
    csr.verify_signature().map_err(|_| {
        Error::invalid("csr signature does not verify (the request was altered or not signed by its key)")
    })?;

    let subject = subject_attributes(&info.subject, "csr")?;
    let (mut dns_names, mut other_names, mut asks_ca) = (Vec::new(), Vec::new(), false);
    if let Some(exts) = csr.requested_extensions() {
        for ext in exts {
            match ext {
                ParsedExtension::SubjectAlternativeName(san) => {
                    split_names(&san.general_names, &mut dns_names, &mut other_names);
                }
                ParsedExtension::BasicConstraints(bc) => asks_ca |= bc.ca,
                // Everything else a CSR may ask for is ignored: extensions come from the profile.
                _ => {}
            }
        }
    }
    Ok(Csr { spki_der: info.subject_pki.raw.to_vec(), key, subject, dns_names, other_names, asks_ca })
}

/// A subject's attributes in order, as `(short name, value)`; unknown types by registry name
/// or dotted OID. `what` names the input in errors.
fn subject_attributes(name: &x509_parser::x509::X509Name<'_>, what: &str) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for attr in name.iter_attributes() {
        let oid = attr.attr_type();
        let short = match oid.to_id_string().as_str() {
            "2.5.4.3" => "CN".to_owned(),
            "2.5.4.10" => "O".to_owned(),
            "2.5.4.11" => "OU".to_owned(),
            "2.5.4.6" => "C".to_owned(),
            "2.5.4.8" => "ST".to_owned(),
            "2.5.4.7" => "L".to_owned(),
            other => x509_parser::objects::oid2sn(oid, x509_parser::objects::oid_registry())
                .map_or_else(|_| other.to_owned(), str::to_owned),
        };
        let value =
            attr.as_str().map_err(|_| Error::invalid(format!("{what} subject attribute {short} is not a string")))?;
        out.push((short, value.to_owned()));
    }
    Ok(out)
}

/// Sorts SANs into DNS names and the rest (described for error messages).
fn split_names(names: &[GeneralName<'_>], dns: &mut Vec<String>, other: &mut Vec<String>) {
    for name in names {
        match name {
            GeneralName::DNSName(d) => dns.push((*d).to_owned()),
            GeneralName::URI(u) => other.push(format!("URI:{u}")),
            GeneralName::RFC822Name(e) => other.push(format!("email:{e}")),
            GeneralName::IPAddress(_) => other.push("IP address".into()),
            _ => other.push("another name type".into()),
        }
    }
}

/// What renewing a certificate with its own key asks for: its key, subject and DNS names (its
/// other SANs are ours, and the profile adds them again).
pub fn csr_from_certificate(der: &[u8]) -> Result<Csr> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|_| Error::invalid("the certificate is malformed"))?;
    let key = ClientKeyMaterial::from_parsed(cert.public_key())
        .ok_or_else(|| Error::invalid("the certificate's key type is not accepted"))?;
    let (mut dns_names, mut ours) = (Vec::new(), Vec::new());
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        split_names(&san.value.general_names, &mut dns_names, &mut ours);
    }
    Ok(Csr {
        spki_der: cert.public_key().raw.to_vec(),
        key,
        subject: subject_attributes(cert.subject(), "certificate")?,
        dns_names,
        other_names: vec![],
        asks_ca: false,
    })
}

fn key_policy(spki: &x509_parser::x509::SubjectPublicKeyInfo<'_>) -> Result<ClientKeyMaterial> {
    let unsupported = || {
        Error::invalid(
            "csr key type is not accepted: use EC P-256 (recommended), EC P-384, RSA (2048 to 8192 bits) or Ed25519",
        )
    };
    let key = ClientKeyMaterial::from_parsed(spki).ok_or_else(unsupported)?;
    if let ClientKeyMaterial::Rsa { e, .. } = &key {
        let bits = spki.parsed().map(|k| k.key_size()).unwrap_or(0);
        if bits < 2048 {
            return Err(Error::invalid(format!("csr RSA key has {bits} bits: at least 2048 are required")));
        }
        if bits > MAX_RSA_BITS {
            return Err(Error::invalid(format!("csr RSA key has {bits} bits: at most {MAX_RSA_BITS} are accepted")));
        }
        let odd = e.last().is_some_and(|b| b & 1 == 1);
        let small = e.iter().skip_while(|b| **b == 0).count() <= 1 && e.last().copied().unwrap_or(0) < 3;
        if !odd || small {
            return Err(Error::invalid("csr RSA key has an invalid public exponent"));
        }
    }
    // rcgen must be able to carry the key into the certificate as is.
    rcgen::SubjectPublicKeyInfo::from_der(spki.raw).map_err(|_| unsupported())?;
    Ok(key)
}

// ---- profiles and issuance ----------------------------------------------------------------

/// What the certificate will say, decided by the use case from the profile and the checks.
#[derive(Debug, Clone)]
pub struct IssueSpec {
    pub cert_type: CertificateType,
    pub client_id: String,
    pub org_slug: String,
    /// Only for `server-transport`, already checked against the organisation's domains.
    pub dns_names: Vec<String>,
    pub not_before: UnixTime,
    pub not_after: UnixTime,
    /// Where the issuing CA's CRL is published.
    pub crl_url: String,
}

/// A signed certificate and the identifiers the inventory keeps.
#[derive(Debug, Clone)]
pub struct Signed {
    pub der: Vec<u8>,
    pub pem: String,
    pub serial: String,
    pub fingerprint: String,
    pub spki_sha256: String,
    pub subject: String,
    pub sans: Vec<String>,
}

/// The subject the CA requires, in `openssl -subj` form.
pub fn required_subject(client_id: &str, org_slug: &str) -> String {
    format!("/CN={client_id}/O={org_slug}")
}

/// Checks the CSR's subject is exactly `CN=<client id>, O=<organisation>` (in either order).
pub fn check_subject(csr: &Csr, client_id: &str, org_slug: &str) -> Result<()> {
    let mut want = vec![("CN", client_id), ("O", org_slug)];
    let ok = csr.subject.len() == 2
        && csr.subject.iter().all(|(k, v)| {
            let pos = want.iter().position(|(wk, wv)| wk == k && wv == v);
            pos.map(|i| want.remove(i)).is_some()
        });
    if ok {
        Ok(())
    } else {
        let got: Vec<String> = csr.subject.iter().map(|(k, v)| format!("{k}={v}")).collect();
        Err(Error::invalid(format!(
            "csr subject must be exactly {} (got {:?}); the csr-template endpoint gives the command",
            required_subject(client_id, org_slug),
            got.join(", ")
        )))
    }
}

pub fn random_serial() -> Result<[u8; 16]> {
    let mut serial = [0u8; 16];
    aws_lc_rs::rand::fill(&mut serial).map_err(Error::internal)?;
    // Positive and of fixed length: 126+ random bits.
    serial[0] = (serial[0] & 0x7f).max(1);
    Ok(serial)
}

pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| s.get(i..i + 2).and_then(|b| u8::from_str_radix(b, 16).ok())).collect()
}

pub fn sha256(data: &[u8]) -> Vec<u8> {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data).as_ref().to_vec()
}

/// A certificate's fingerprint as the inventory keys it: lowercase hex SHA-256 of the DER.
pub fn fingerprint(der: &[u8]) -> String {
    hex(&sha256(der))
}

/// `x5t#S256` from a lowercase hex fingerprint.
pub fn x5t_s256(fingerprint_hex: &str) -> String {
    B64URL.encode(unhex(fingerprint_hex).unwrap_or_default())
}

/// Normalises a user-given serial or fingerprint (`AB:CD…`, `abcd…`, `x5t#S256` base64url)
/// to the stored lowercase hex.
pub fn normalise_hex(s: &str) -> Option<String> {
    let cleaned: String = s.chars().filter(|c| *c != ':').collect::<String>().to_ascii_lowercase();
    if !cleaned.is_empty() && cleaned.len() <= 128 && cleaned.chars().all(|c| c.is_ascii_hexdigit()) {
        return Some(cleaned);
    }
    // A 43-character base64url string is a SHA-256 x5t.
    (s.len() == 43).then(|| B64URL.decode(s).ok()).flatten().filter(|b| b.len() == 32).map(|b| hex(&b))
}

fn time(t: UnixTime) -> Result<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp(t).map_err(Error::internal)
}

fn ia5(s: &str) -> Result<rcgen::string::Ia5String> {
    rcgen::string::Ia5String::try_from(s.to_owned()).map_err(|_| Error::invalid(format!("{s:?} is not ASCII")))
}

/// Signs a certificate for `csr`'s key with the profile of `spec.cert_type`. Nothing else of
/// the CSR is used: never CA:TRUE, key usages and EKUs from the profile only.
pub fn issue(csr: &Csr, spec: &IssueSpec, serial: &[u8], issuer: &Issuer<'_, KeyPair>) -> Result<Signed> {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, spec.client_id.as_str());
    dn.push(DnType::OrganizationName, spec.org_slug.as_str());
    p.distinguished_name = dn;
    p.not_before = time(spec.not_before)?;
    p.not_after = time(spec.not_after)?;
    p.serial_number = Some(SerialNumber::from_slice(serial));
    p.is_ca = IsCa::ExplicitNoCa;
    p.use_authority_key_identifier_extension = true;
    let rsa = matches!(csr.key, ClientKeyMaterial::Rsa { .. });
    p.key_usages = match spec.cert_type {
        CertificateType::Signing => vec![KeyUsagePurpose::DigitalSignature],
        CertificateType::Transport | CertificateType::ServerTransport if rsa => {
            vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment]
        }
        CertificateType::Transport | CertificateType::ServerTransport => vec![KeyUsagePurpose::DigitalSignature],
    };
    p.extended_key_usages = match spec.cert_type {
        CertificateType::Transport => vec![ExtendedKeyUsagePurpose::ClientAuth],
        CertificateType::ServerTransport => vec![ExtendedKeyUsagePurpose::ServerAuth],
        CertificateType::Signing => vec![],
    };
    let uri = app_uri(&spec.client_id);
    let mut sans = vec![format!("URI:{uri}")];
    p.subject_alt_names.push(SanType::URI(ia5(&uri)?));
    if spec.cert_type == CertificateType::ServerTransport {
        for d in &spec.dns_names {
            p.subject_alt_names.push(SanType::DnsName(ia5(d)?));
            sans.push(format!("DNS:{d}"));
        }
    }
    p.crl_distribution_points = vec![CrlDistributionPoint { uris: vec![spec.crl_url.clone()] }];
    let public = rcgen::SubjectPublicKeyInfo::from_der(&csr.spki_der).map_err(Error::internal)?;
    let cert = p.signed_by(&public, issuer).map_err(Error::internal)?;
    let der = cert.der().to_vec();
    Ok(Signed {
        pem: pem_encode("CERTIFICATE", &der),
        serial: hex(serial),
        fingerprint: fingerprint(&der),
        spki_sha256: hex(&sha256(&csr.spki_der)),
        subject: format!("CN={}, O={}", spec.client_id, spec.org_slug),
        sans,
        der,
    })
}

/// A TLS server certificate for Portcullis's own listener: a fresh P-256 key, `names` as DNS
/// or IP SANs, EKU serverAuth. Returns the certificate DER and the PKCS#8 key.
pub fn issue_server_certificate(
    names: &[String],
    not_before: UnixTime,
    not_after: UnixTime,
    issuer: &Issuer<'_, KeyPair>,
) -> Result<(Vec<u8>, Vec<u8>)> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(Error::internal)?;
    let cn = names.first().map_or("portcullis", String::as_str);
    let (der, _) =
        issue_platform_certificate(PlatformUse::Server, cn, names, &key, false, not_before, not_after, issuer)?;
    Ok((der, key.serialize_der()))
}

/// What a certificate of the platform itself (never in the inventory) is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlatformUse {
    /// A TLS server (EKU serverAuth): Portcullis's listener, the gateway's listeners.
    Server,
    /// A TLS client (EKU clientAuth): the gateway towards upstreams that require mTLS.
    Client,
}

/// Signs a certificate of the platform itself for the key `public`: subject
/// `CN=<common_name>, O=Portcullis`, `names` (already checked) as DNS or IP SANs, key usage
/// digitalSignature (plus keyEncipherment for an RSA key), the EKU of `use_`, never CA:TRUE.
/// Returns the DER and the serial (lowercase hex).
#[allow(clippy::too_many_arguments)]
pub fn issue_platform_certificate(
    use_: PlatformUse,
    common_name: &str,
    names: &[String],
    public: &impl rcgen::PublicKeyData,
    rsa: bool,
    not_before: UnixTime,
    not_after: UnixTime,
    issuer: &Issuer<'_, KeyPair>,
) -> Result<(Vec<u8>, String)> {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, "Portcullis");
    p.distinguished_name = dn;
    p.not_before = time(not_before)?;
    p.not_after = time(not_after)?;
    let serial = random_serial()?;
    p.serial_number = Some(SerialNumber::from_slice(&serial));
    p.is_ca = IsCa::ExplicitNoCa;
    p.use_authority_key_identifier_extension = true;
    p.key_usages = if rsa {
        vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment]
    } else {
        vec![KeyUsagePurpose::DigitalSignature]
    };
    p.extended_key_usages = vec![match use_ {
        PlatformUse::Server => ExtendedKeyUsagePurpose::ServerAuth,
        PlatformUse::Client => ExtendedKeyUsagePurpose::ClientAuth,
    }];
    for n in names {
        p.subject_alt_names.push(match n.parse::<std::net::IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(ia5(n)?),
        });
    }
    let cert = p.signed_by(public, issuer).map_err(Error::internal)?;
    Ok((cert.der().to_vec(), hex(&serial)))
}

// ---- CRL ----------------------------------------------------------------------------------

fn rcgen_reason(r: RevocationReason) -> rcgen::RevocationReason {
    use rcgen::RevocationReason as R;
    match r {
        RevocationReason::Unspecified => R::Unspecified,
        RevocationReason::KeyCompromise => R::KeyCompromise,
        RevocationReason::CaCompromise => R::CaCompromise,
        RevocationReason::AffiliationChanged => R::AffiliationChanged,
        RevocationReason::Superseded => R::Superseded,
        RevocationReason::CessationOfOperation => R::CessationOfOperation,
        RevocationReason::PrivilegeWithdrawn => R::PrivilegeWithdrawn,
        RevocationReason::AaCompromise => R::AaCompromise,
    }
}

/// Signs a full CRL (RFC 5280 v2, CRL number, reason codes) for `entries`.
pub fn build_crl(
    issuer: &Issuer<'_, KeyPair>,
    number: u64,
    this_update: UnixTime,
    next_update: UnixTime,
    entries: &[RevokedEntry],
) -> Result<Vec<u8>> {
    let mut revoked_certs = Vec::with_capacity(entries.len());
    for e in entries {
        let serial = unhex(&e.serial).ok_or_else(|| Error::internal("stored serial is not hex"))?;
        revoked_certs.push(RevokedCertParams {
            serial_number: SerialNumber::from_slice(&serial),
            revocation_time: time(e.revoked_at)?,
            // RFC 5280 §5.3.1: the reason code should be absent rather than `unspecified`.
            reason_code: (e.reason != RevocationReason::Unspecified).then(|| rcgen_reason(e.reason)),
            invalidity_date: None,
        });
    }
    let params = CertificateRevocationListParams {
        this_update: time(this_update)?,
        next_update: time(next_update)?,
        crl_number: SerialNumber::from_slice(&number.to_be_bytes()),
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    };
    let crl = params.signed_by(issuer).map_err(Error::internal)?;
    Ok(crl.der().to_vec())
}

// ---- JWKS ---------------------------------------------------------------------------------

/// The public JWK of a signing certificate: key members, `kid` = `x5t#S256`, `use: sig`,
/// `x5c` (the certificate then the issuing CA) and `x5t#S256`.
pub fn certificate_jwk(cert_der: &[u8], chain_der: &[Vec<u8>]) -> Option<serde_json::Value> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    let key = ClientKeyMaterial::from_parsed(cert.public_key())?;
    let mut m = key.jwk_members();
    let x5t = B64URL.encode(sha256(cert_der));
    m.insert("kid".into(), x5t.clone().into());
    m.insert("use".into(), "sig".into());
    let mut x5c = vec![serde_json::Value::from(B64STD.encode(cert_der))];
    x5c.extend(chain_der.iter().map(|c| serde_json::Value::from(B64STD.encode(c))));
    m.insert("x5c".into(), x5c.into());
    m.insert("x5t#S256".into(), x5t.into());
    Some(serde_json::Value::Object(m))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
    use super::*;

    fn csr_for(
        alg: &'static rcgen::SignatureAlgorithm,
        cn: &str,
        o: &str,
        sans: &[&str],
        ca: bool,
    ) -> (String, KeyPair) {
        let key = KeyPair::generate_for(alg).unwrap();
        let mut p = CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        dn.push(DnType::OrganizationName, o);
        p.distinguished_name = dn;
        if ca {
            p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        }
        (p.serialize_request(&key).unwrap().pem().unwrap(), key)
    }

    fn ca() -> (Issuer<'static, KeyPair>, Vec<u8>) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let der = p.self_signed(&key).unwrap().der().to_vec();
        (Issuer::new(p, key), der)
    }

    fn spec(t: CertificateType) -> IssueSpec {
        IssueSpec {
            cert_type: t,
            client_id: "acme$billing".into(),
            org_slug: "acme".into(),
            dns_names: vec!["api.acme.example".into()],
            not_before: 1_800_000_000,
            not_after: 1_800_086_400,
            crl_url: "http://ca.example/pki/crl".into(),
        }
    }

    #[test]
    fn csr_is_verified_and_the_profile_decides_the_extensions() {
        let (pem, _) = csr_for(&rcgen::PKCS_ECDSA_P256_SHA256, "acme$billing", "acme", &["evil.example"], true);
        let csr = parse_csr(&pem).unwrap();
        assert!(csr.asks_ca);
        assert_eq!(csr.dns_names, vec!["evil.example".to_string()]);
        check_subject(&csr, "acme$billing", "acme").unwrap();
        assert!(check_subject(&csr, "acme$other", "acme").is_err());
        let (issuer, _) = ca();
        for t in CertificateType::ALL {
            let signed = issue(&csr, &spec(t), &random_serial().unwrap(), &issuer).unwrap();
            let (_, cert) = x509_parser::parse_x509_certificate(&signed.der).unwrap();
            let bc = cert.basic_constraints().unwrap().map(|b| b.value.ca);
            assert_ne!(bc, Some(true), "never CA:TRUE");
            let eku = cert.extended_key_usage().unwrap().map(|e| (e.value.client_auth, e.value.server_auth));
            let sans: Vec<String> = cert
                .subject_alternative_name()
                .unwrap()
                .unwrap()
                .value
                .general_names
                .iter()
                .map(|g| g.to_string())
                .collect();
            assert!(sans.iter().any(|s| s.contains("urn:portcullis:client:acme$billing")), "{sans:?}");
            assert!(!sans.iter().any(|s| s.contains("evil")), "CSR SANs are never copied: {sans:?}");
            match t {
                CertificateType::Transport => assert_eq!(eku, Some((true, false))),
                CertificateType::ServerTransport => {
                    assert_eq!(eku, Some((false, true)));
                    assert!(sans.iter().any(|s| s.contains("api.acme.example")));
                }
                CertificateType::Signing => assert_eq!(eku, None),
            }
            assert_eq!(signed.serial.len(), 32);
            assert_eq!(hex(cert.raw_serial()), signed.serial);
        }
    }

    #[test]
    fn tampered_and_foreign_inputs_are_refused() {
        let (pem, _) = csr_for(&rcgen::PKCS_ECDSA_P256_SHA256, "a$b", "a", &[], false);
        let mut der = pem_decode(&pem, &["CERTIFICATE REQUEST"], "csr").unwrap();
        // Flip a bit inside the subject: the self-signature no longer verifies.
        let at = der.windows(3).position(|w| w == b"a$b").unwrap();
        der[at] = b'x';
        let err = parse_csr(&pem_encode("CERTIFICATE REQUEST", &der)).unwrap_err().to_string();
        assert!(err.contains("signature"), "{err}");
        let (_, ca_der) = ca();
        let err = parse_csr(&pem_encode("CERTIFICATE", &ca_der)).unwrap_err().to_string();
        assert!(err.contains("not a certificate signing request"), "{err}");
        assert!(parse_csr("garbage").is_err());
        assert!(parse_csr(&format!("{pem}{pem}")).is_err());
        assert!(parse_csr(&"A".repeat(MAX_CSR_LEN + 1)).is_err());
        let (ed, _) = csr_for(&rcgen::PKCS_ED25519, "a$b", "a", &[], false);
        assert_eq!(parse_csr(&ed).unwrap().key.describe(), "Ed25519");
        let (p384, _) = csr_for(&rcgen::PKCS_ECDSA_P384_SHA384, "a$b", "a", &[], false);
        assert_eq!(parse_csr(&p384).unwrap().key.describe(), "EC P-384");
    }

    /// A deterministic stand-in for the fuzz targets in CI: every single-bit flip and every
    /// truncation of a valid CSR parses without panicking, and none is accepted with another
    /// key or subject than the signed one.
    #[test]
    fn mutated_csrs_never_panic_and_never_change_what_was_signed() {
        let (pem, _) = csr_for(&rcgen::PKCS_ECDSA_P256_SHA256, "a$b", "a", &["x.example"], false);
        let der = pem_decode(&pem, &["CERTIFICATE REQUEST"], "csr").unwrap();
        let good = parse_csr_der(&der).unwrap();
        for i in 0..der.len() * 8 {
            let mut m = der.clone();
            m[i / 8] ^= 1 << (i % 8);
            // A flip outside the signed request info (in encodings x509-parser tolerates) may
            // parse; nothing it yields may differ from what the key signed.
            if let Ok(c) = parse_csr_der(&m) {
                assert_eq!(
                    (&c.spki_der, &c.subject, &c.dns_names, c.asks_ca),
                    (&good.spki_der, &good.subject, &good.dns_names, good.asks_ca),
                    "bit {i}"
                );
            }
        }
        for n in 0..der.len() {
            assert!(parse_csr_der(&der[..n]).is_err());
            let _ = parse_csr(&pem_encode("CERTIFICATE REQUEST", &der[..n]));
        }
        for junk in ["", "-----BEGIN ", "-----BEGIN CERTIFICATE REQUEST-----", "-----BEGIN X-----\n-----END X-----"] {
            assert!(parse_csr(junk).is_err());
        }
    }

    #[test]
    fn crl_lists_serials_with_reasons_and_jwk_carries_the_chain() {
        let (issuer, ca_der) = ca();
        let entries = vec![
            RevokedEntry { serial: "0a0b".into(), revoked_at: 1_800_000_000, reason: RevocationReason::KeyCompromise },
            RevokedEntry { serial: "7f01".into(), revoked_at: 1_800_000_001, reason: RevocationReason::Unspecified },
        ];
        let der = build_crl(&issuer, 7, 1_800_000_000, 1_800_086_400, &entries).unwrap();
        let (_, crl) = x509_parser::parse_x509_crl(&der).unwrap();
        assert_eq!(crl.crl_number().map(|n| n.to_string()), Some("7".into()));
        let listed: Vec<String> = crl.iter_revoked_certificates().map(|r| hex(r.raw_serial())).collect();
        assert_eq!(listed, vec!["0a0b", "7f01"]);
        let reasons: Vec<Option<u8>> =
            crl.iter_revoked_certificates().map(|r| r.reason_code().map(|(_, c)| c.0)).collect();
        assert_eq!(reasons, vec![Some(1), None]);

        let (pem, _) = csr_for(&rcgen::PKCS_ECDSA_P256_SHA256, "acme$billing", "acme", &[], false);
        let signed = issue(&parse_csr(&pem).unwrap(), &spec(CertificateType::Signing), &[1, 2, 3], &issuer).unwrap();
        let jwk = certificate_jwk(&signed.der, std::slice::from_ref(&ca_der)).unwrap();
        assert_eq!(jwk["kid"], jwk["x5t#S256"]);
        assert_eq!(jwk["x5t#S256"], x5t_s256(&signed.fingerprint));
        assert_eq!(jwk["x5c"].as_array().unwrap().len(), 2);
        assert_eq!(jwk["alg"], "ES256");
        assert_eq!(normalise_hex(jwk["x5t#S256"].as_str().unwrap()), Some(signed.fingerprint.clone()));
        assert_eq!(normalise_hex("0A:0B"), Some("0a0b".into()));
        assert_eq!(normalise_hex("zz"), None);
    }
}
