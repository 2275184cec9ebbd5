//! The CA hierarchy created at first start: a root CA (signs issuing CAs and its own CRL) and
//! an issuing CA, both P-256, keys sealed with the master key; issuing-CA rotation and the import
//! of an existing CA. Leaf issuance is in `pki`.

use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use time::OffsetDateTime;

use crate::clock::UnixTime;
use crate::crypto::vault::KeyVault;
use crate::error::{Error, Result};
use crate::ids::new_id;
use crate::model::{CaCertificate, CaKind};

const ROOT_YEARS: i64 = 20;
const ISSUING_YEARS: i64 = 5;

pub fn seal_purpose(id: &str) -> String {
    format!("ca-key:{id}")
}

fn params(cn: &str, path_len: u8, now: UnixTime, days: i64) -> Result<CertificateParams> {
    let mut p = CertificateParams::new(Vec::<String>::new()).map_err(Error::internal)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn.push(DnType::OrganizationName, "Portcullis");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    p.use_authority_key_identifier_extension = true;
    p.not_before = OffsetDateTime::from_unix_timestamp(now - 60).map_err(Error::internal)?;
    p.not_after = OffsetDateTime::from_unix_timestamp(now + days * 86_400).map_err(Error::internal)?;
    let mut serial = [0u8; 16];
    aws_lc_rs::rand::fill(&mut serial).map_err(Error::internal)?;
    serial[0] &= 0x7f;
    p.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
    Ok(p)
}

fn record(
    vault: &dyn KeyVault,
    kind: CaKind,
    subject: String,
    pem: String,
    key_der: Option<&[u8]>,
    (not_before, not_after): (UnixTime, UnixTime),
    now: UnixTime,
) -> Result<CaCertificate> {
    let id = new_id();
    let sealed_private_key = match key_der {
        Some(der) => vault.seal(&seal_purpose(&id), der)?,
        // A root imported without its key: trusted, never used to sign.
        None => Vec::new(),
    };
    Ok(CaCertificate {
        sealed_private_key,
        id,
        kind,
        subject,
        certificate_pem: pem,
        not_before,
        not_after,
        active: true,
        created_at: now,
    })
}

/// Creates a root and an issuing CA. Returns both records with sealed keys.
pub fn create_hierarchy(vault: &dyn KeyVault, now: UnixTime) -> Result<Vec<CaCertificate>> {
    let root_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(Error::internal)?;
    let root_params = params("Portcullis Root CA", 1, now, ROOT_YEARS * 365)?;
    let root_cert = root_params.self_signed(&root_key).map_err(Error::internal)?;
    let root_der = zeroize::Zeroizing::new(root_key.serialize_der());
    let root = record(
        vault,
        CaKind::Root,
        "CN=Portcullis Root CA, O=Portcullis".into(),
        root_cert.pem(),
        Some(&root_der),
        (root_params.not_before.unix_timestamp(), root_params.not_after.unix_timestamp()),
        now,
    )?;
    let issuing = issue_issuing_ca(vault, &root, &root_der, "Portcullis Issuing CA 1", now, ISSUING_YEARS * 365)?;
    Ok(vec![root, issuing])
}

/// A new issuing CA (P-256, path length 0) signed by `root`, whose PKCS#8 key is `root_key`.
/// Its validity ends no later than the root's.
pub fn issue_issuing_ca(
    vault: &dyn KeyVault,
    root: &CaCertificate,
    root_key: &[u8],
    cn: &str,
    now: UnixTime,
    days: i64,
) -> Result<CaCertificate> {
    if root_key.is_empty() {
        return Err(Error::Conflict(
            "the root CA was imported without its key: import a new issuing CA instead".into(),
        ));
    }
    let root_key = KeyPair::try_from(root_key).map_err(Error::internal)?;
    let issuer = Issuer::from_ca_cert_pem(&root.certificate_pem, root_key).map_err(Error::internal)?;
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(Error::internal)?;
    let mut p = params(cn, 0, now, days)?;
    p.not_after = p.not_after.min(OffsetDateTime::from_unix_timestamp(root.not_after).map_err(Error::internal)?);
    let cert = p.signed_by(&key, &issuer).map_err(Error::internal)?;
    let der = zeroize::Zeroizing::new(key.serialize_der());
    record(
        vault,
        CaKind::Issuing,
        format!("CN={cn}, O=Portcullis"),
        cert.pem(),
        Some(&der),
        (p.not_before.unix_timestamp(), p.not_after.unix_timestamp()),
        now,
    )
}

/// Checks and seals an existing CA (`portcullis ca import`). A self-signed certificate becomes
/// the root and gets a new issuing CA; any other becomes the issuing CA, and `chain_pem` must
/// hold the certificate that signed it (kept as the root, without a key).
pub fn import(
    vault: &dyn KeyVault,
    cert_pem: &str,
    key_pem: &str,
    chain_pem: Option<&str>,
    now: UnixTime,
    issuing_days: i64,
) -> Result<Vec<CaCertificate>> {
    let cert_der = crate::pki::pem_decode(cert_pem, &["CERTIFICATE"], "CA certificate")?;
    let key_der = zeroize::Zeroizing::new(crate::pki::pem_decode(
        key_pem,
        &["PRIVATE KEY"],
        "CA key (PKCS#8, as `openssl pkcs8 -topk8 -nocrypt` writes it)",
    )?);
    let key = KeyPair::try_from(key_der.as_slice())
        .map_err(|_| Error::invalid("the CA key is not a supported PKCS#8 key (EC P-256/P-384, Ed25519 or RSA)"))?;
    let (_, cert) = x509_parser::parse_x509_certificate(&cert_der)
        .map_err(|_| Error::invalid("the CA certificate is malformed"))?;
    if !cert.basic_constraints().ok().flatten().is_some_and(|b| b.value.ca) {
        return Err(Error::invalid("the certificate is not a CA (basicConstraints CA:TRUE is missing)"));
    }
    if cert.key_usage().ok().flatten().is_some_and(|k| !k.value.key_cert_sign() || !k.value.crl_sign()) {
        return Err(Error::invalid("the CA certificate's key usage must allow keyCertSign and cRLSign"));
    }
    if rcgen::PublicKeyData::subject_public_key_info(&key) != cert.public_key().raw {
        return Err(Error::invalid("the key does not belong to the certificate"));
    }
    let (nb, na) = (cert.validity().not_before.timestamp(), cert.validity().not_after.timestamp());
    if na <= now + 86_400 {
        return Err(Error::invalid("the CA certificate expires within a day"));
    }
    let subject = cert.subject().to_string();
    let self_signed = cert.subject() == cert.issuer() && cert.verify_signature(None).is_ok();
    if self_signed {
        let root = record(
            vault,
            CaKind::Root,
            subject,
            crate::pki::pem_encode("CERTIFICATE", &cert_der),
            Some(&key_der),
            (nb, na),
            now,
        )?;
        let issuing = issue_issuing_ca(vault, &root, &key_der, "Portcullis Issuing CA", now, issuing_days)?;
        return Ok(vec![root, issuing]);
    }
    let chain = chain_pem
        .ok_or_else(|| Error::invalid("the CA is not self-signed: give the certificate of its issuer (--chain)"))?;
    let parent_der = crate::pki::pem_certificates(chain)?
        .into_iter()
        .next()
        .ok_or_else(|| Error::invalid("--chain holds no certificate"))?;
    let (_, parent) = x509_parser::parse_x509_certificate(&parent_der)
        .map_err(|_| Error::invalid("the chain certificate is malformed"))?;
    if cert.verify_signature(Some(parent.public_key())).is_err() {
        return Err(Error::invalid("the CA certificate is not signed by the chain certificate"));
    }
    let root = record(
        vault,
        CaKind::Root,
        parent.subject().to_string(),
        crate::pki::pem_encode("CERTIFICATE", &parent_der),
        None,
        (parent.validity().not_before.timestamp(), parent.validity().not_after.timestamp()),
        now,
    )?;
    let issuing = record(
        vault,
        CaKind::Issuing,
        subject,
        crate::pki::pem_encode("CERTIFICATE", &cert_der),
        Some(&key_der),
        (nb, na),
        now,
    )?;
    Ok(vec![root, issuing])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::vault::LocalKeyVault;

    #[test]
    fn hierarchy_keys_are_sealed_and_openable() {
        let v = LocalKeyVault::new(&[9u8; 32]).unwrap();
        let certs = create_hierarchy(&v, 1_800_000_000).unwrap();
        assert_eq!(certs.len(), 2);
        for c in &certs {
            assert!(c.certificate_pem.starts_with("-----BEGIN CERTIFICATE-----"));
            let der = v.open(&seal_purpose(&c.id), &c.sealed_private_key).unwrap();
            assert!(KeyPair::try_from(der.as_slice()).is_ok());
            assert!(c.not_after > c.not_before);
        }
    }
}
