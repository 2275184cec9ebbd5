//! The CA hierarchy created at first start: a root CA (signs issuing CAs and its own CRL) and
//! an issuing CA, both P-256, keys sealed with the master key. Issuance comes with the CA issue.

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

fn params(cn: &str, path_len: u8, now: UnixTime, years: i64) -> Result<CertificateParams> {
    let mut p = CertificateParams::new(Vec::<String>::new()).map_err(Error::internal)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn.push(DnType::OrganizationName, "Portcullis");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    p.use_authority_key_identifier_extension = true;
    p.not_before = OffsetDateTime::from_unix_timestamp(now - 60).map_err(Error::internal)?;
    p.not_after = OffsetDateTime::from_unix_timestamp(now + years * 365 * 86_400).map_err(Error::internal)?;
    let mut serial = [0u8; 16];
    aws_lc_rs::rand::fill(&mut serial).map_err(Error::internal)?;
    serial[0] &= 0x7f;
    p.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
    Ok(p)
}

/// Creates a root and an issuing CA. Returns both records with sealed keys.
pub fn create_hierarchy(vault: &dyn KeyVault, now: UnixTime) -> Result<Vec<CaCertificate>> {
    let root_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(Error::internal)?;
    let root_params = params("Portcullis Root CA", 1, now, ROOT_YEARS)?;
    let root_cert = root_params.self_signed(&root_key).map_err(Error::internal)?;
    let root_pem = root_cert.pem();
    let issuing_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(Error::internal)?;
    let issuing_params = params("Portcullis Issuing CA 1", 0, now, ISSUING_YEARS)?;
    let issuer = Issuer::new(root_params.clone(), &root_key);
    let issuing_cert = issuing_params.signed_by(&issuing_key, &issuer).map_err(Error::internal)?;

    let record = |kind, subject: &str, pem: String, key: &KeyPair, p: &CertificateParams| -> Result<CaCertificate> {
        let id = new_id();
        let der = zeroize::Zeroizing::new(key.serialize_der());
        Ok(CaCertificate {
            sealed_private_key: vault.seal(&seal_purpose(&id), &der)?,
            id,
            kind,
            subject: subject.to_owned(),
            certificate_pem: pem,
            not_before: p.not_before.unix_timestamp(),
            not_after: p.not_after.unix_timestamp(),
            active: true,
            created_at: now,
        })
    };
    Ok(vec![
        record(CaKind::Root, "CN=Portcullis Root CA, O=Portcullis", root_pem, &root_key, &root_params)?,
        record(
            CaKind::Issuing,
            "CN=Portcullis Issuing CA 1, O=Portcullis",
            issuing_cert.pem(),
            &issuing_key,
            &issuing_params,
        )?,
    ])
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
