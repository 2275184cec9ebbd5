//! CRL rebuild with 100,000 revoked certificates: rows read from SQLite, the CRL signed and
//! stored, end to end through `Portcullis::rebuild_crl`, and the DER checked by parsing it.
//! Run with `cargo run --release -p portcullis-web --example crl_rebuild`; see docs/benchmarks.md.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Instant;

use portcullis_core::Portcullis;
use portcullis_core::clock::SystemClock;
use portcullis_core::crypto::vault::LocalKeyVault;
use portcullis_core::model::{AuditEvent, CertificateType, IssuedCertificate, RevocationReason};
use portcullis_core::settings::CoreSettings;
use portcullis_core::store::Store;
use portcullis_core::usecases::BootstrapSecrets;
use portcullis_store::SqliteStore;

const N: usize = 100_000;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(&dir.path().join("b.db"), 0).await.unwrap());
    let core = Arc::new(Portcullis::new(
        store.clone(),
        Arc::new(SystemClock),
        Arc::new(LocalKeyVault::new(&[7u8; 32]).unwrap()),
        CoreSettings::for_issuer("https://issuer.test"),
    ));
    core.bootstrap(BootstrapSecrets::default()).await.unwrap();
    let set = core.ca_set();
    let issuer = set.active().unwrap().record.id.clone();
    let org = store.organisation("portcullis").await.unwrap().unwrap();
    let app = store.application("portcullis$admin").await.unwrap().unwrap();
    let start = Instant::now();
    let now = org.created_at;
    for i in 0..N {
        let serial = format!("{:032x}", (1u128 << 120) + i as u128);
        let cert = IssuedCertificate {
            id: format!("bench-{i}"),
            org_id: org.id.clone(),
            app_id: app.id.clone(),
            client_id: app.client_id.clone(),
            cert_type: CertificateType::Transport,
            fingerprint: format!("{:064x}", i),
            serial,
            issuer_id: issuer.clone(),
            subject: "CN=bench".into(),
            sans: vec![],
            key_type: "EC P-256".into(),
            spki_sha256: String::new(),
            certificate_pem: String::new(),
            not_before: now,
            not_after: now + 86_400,
            revoked_at: Some(now),
            revocation_reason: Some(RevocationReason::KeyCompromise),
            renewed_from: None,
            expiry_notified_at: None,
            created_by: "bench".into(),
            created_at: now,
        };
        let audit = AuditEvent {
            id: format!("audit-{i}"),
            at: now,
            org_id: Some(org.id.clone()),
            actor: "bench".into(),
            action: "certificate.issue".into(),
            target: cert.id.clone(),
            outcome: "success".into(),
            ip: None,
            details: serde_json::json!({}),
        };
        store.insert_certificate(&cert, &audit).await.unwrap();
    }
    println!("seeded {N} revoked certificates in {:.1} s", start.elapsed().as_secs_f64());
    for round in 1..=3 {
        let start = Instant::now();
        core.rebuild_crl(&issuer).await.unwrap();
        let t = start.elapsed().as_secs_f64();
        let crl = core.crl_of(&issuer).unwrap();
        let (_, parsed) = x509_parser::parse_x509_crl(&crl.der).unwrap();
        assert_eq!(parsed.iter_revoked_certificates().count(), N);
        println!("round {round}: CRL with {N} entries ({} KiB) rebuilt in {:.0} ms", crl.der.len() / 1024, t * 1e3);
    }
}
