//! Certificate authority use cases: the loaded CA set (issuing CAs with their keys, the trust
//! chain, the current CRLs), CSR templates, issuance, the inventory, revocation with CRL
//! regeneration, renewal (by an admin, or over mTLS by the certificate itself), per-application
//! JWKS, expiry notices, issuing-CA rotation and import, and organisations' allowed domains.

use std::collections::HashMap;

use rcgen::{Issuer, KeyPair};
use serde::Serialize;

use super::*;
use crate::StoreError;
use crate::ca;
use crate::clock::rfc3339;
use crate::ids::ClientId;
use crate::mail::Message;
use crate::model::{
    CaCertificate, CaKind, CertificateFilter, CertificateStatus, CertificateType, IssuedCertificate, Page, QueuedMail,
    RevocationReason, StoredCrl,
};
use crate::pki::{self, Csr, IssueSpec};

/// An issuing CA this node can sign with.
pub struct IssuingCa {
    pub record: CaCertificate,
    pub der: Vec<u8>,
    pub(crate) issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for IssuingCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuingCa").field("id", &self.record.id).field("active", &self.record.active).finish()
    }
}

/// The CA as this node sees it, swapped atomically on rotation and on every new CRL.
#[derive(Debug, Default)]
pub struct CaSet {
    pub root: Option<(CaCertificate, Vec<u8>)>,
    /// Unexpired issuing CAs: the active one first, then the newest.
    pub issuing: Vec<Arc<IssuingCa>>,
    pub crls: HashMap<String, Arc<StoredCrl>>,
    /// Bumped on every change (listeners rebuild their verifier when it moves).
    pub version: u64,
}

impl CaSet {
    pub fn active(&self) -> Option<&Arc<IssuingCa>> {
        self.issuing.first().filter(|c| c.record.active)
    }
    pub fn issuing_by_id(&self, id: &str) -> Option<&Arc<IssuingCa>> {
        self.issuing.iter().find(|c| c.record.id == id)
    }
    /// DER of the root and every unexpired issuing CA (TLS trust anchors).
    pub fn anchors(&self) -> Vec<Vec<u8>> {
        self.root.iter().map(|(_, d)| d.clone()).chain(self.issuing.iter().map(|c| c.der.clone())).collect()
    }
    /// The CRLs of every unexpired issuing CA.
    pub fn crl_ders(&self) -> Vec<Vec<u8>> {
        self.issuing.iter().filter_map(|c| self.crls.get(&c.record.id).map(|crl| crl.der.clone())).collect()
    }
    /// `/pki/ca.pem`: every unexpired issuing CA, then the root.
    pub fn chain_pem(&self) -> String {
        let mut s: String = self.issuing.iter().map(|c| c.record.certificate_pem.clone()).collect();
        if let Some((root, _)) = &self.root {
            s.push_str(&root.certificate_pem);
        }
        s
    }
    /// The chain of a certificate issued by `issuer_id`: that issuing CA, then the root.
    pub fn chain_for(&self, issuer_id: &str) -> String {
        let mut s = self.issuing_by_id(issuer_id).map(|c| c.record.certificate_pem.clone()).unwrap_or_default();
        if let Some((root, _)) = &self.root {
            s.push_str(&root.certificate_pem);
        }
        s
    }
}

#[derive(Default)]
pub(crate) struct CaState {
    pub(crate) set: arc_swap::ArcSwap<CaSet>,
    /// Serialises CRL signing on this node (the store keeps the highest number across nodes).
    crl_lock: tokio::sync::Mutex<()>,
}

/// `POST …/certificates`.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewCertificate {
    #[serde(rename = "type")]
    pub cert_type: String,
    /// The application's slug or client id.
    pub application: String,
    pub csr: String,
    pub validity_days: Option<i64>,
}

/// A certificate as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct CertificateView {
    pub id: String,
    pub serial: String,
    #[serde(rename = "type")]
    pub cert_type: CertificateType,
    pub application: String,
    pub status: CertificateStatus,
    pub subject: String,
    pub sans: Vec<String>,
    pub key_type: String,
    pub fingerprint_sha256: String,
    #[serde(rename = "x5t#S256")]
    pub x5t_s256: String,
    pub issuer_id: String,
    pub not_before: String,
    pub not_after: String,
    pub revoked_at: Option<String>,
    pub revocation_reason: Option<RevocationReason>,
    pub renewed_from: Option<String>,
    pub created_by: String,
    pub created_at: String,
    pub certificate_pem: String,
}

/// A freshly issued certificate with its chain.
#[derive(Debug, Clone, Serialize)]
pub struct IssuedView {
    #[serde(flatten)]
    pub cert: CertificateView,
    pub chain_pem: String,
}

/// The CSR template of an application and certificate type.
#[derive(Debug, Clone, Serialize)]
pub struct CsrTemplate {
    #[serde(rename = "type")]
    pub cert_type: CertificateType,
    pub application: String,
    pub subject: String,
    pub subject_openssl: String,
    pub san_uri: String,
    pub key_type: &'static str,
    pub openssl_command: String,
    pub commands: serde_json::Value,
    pub dns_names_required: bool,
    pub allowed_domains: Vec<String>,
    pub validity_days: i64,
    pub max_validity_days: i64,
    pub upload: String,
}

pub const KEY_TYPES: [&str; 4] = ["p256", "p384", "rsa3072", "ed25519"];

impl Portcullis {
    pub(crate) fn view(&self, c: &IssuedCertificate) -> CertificateView {
        CertificateView {
            id: c.id.clone(),
            serial: c.serial.clone(),
            cert_type: c.cert_type,
            application: c.client_id.to_string(),
            status: c.status(self.now()),
            subject: c.subject.clone(),
            sans: c.sans.clone(),
            key_type: c.key_type.clone(),
            fingerprint_sha256: c.fingerprint.clone(),
            x5t_s256: pki::x5t_s256(&c.fingerprint),
            issuer_id: c.issuer_id.clone(),
            not_before: rfc3339(c.not_before),
            not_after: rfc3339(c.not_after),
            revoked_at: c.revoked_at.map(rfc3339),
            revocation_reason: c.revocation_reason,
            renewed_from: c.renewed_from.clone(),
            created_by: c.created_by.clone(),
            created_at: rfc3339(c.created_at),
            certificate_pem: c.certificate_pem.clone(),
        }
    }

    pub fn ca_set(&self) -> Arc<CaSet> {
        self.ca.set.load_full()
    }

    // ---- loading ------------------------------------------------------------------------

    /// Reads the CA certificates and CRLs from the store, opens the keys of unexpired issuing
    /// CAs, and signs a CRL for any that has none or whose CRL is due. Cheap when nothing was
    /// rotated or imported (the maintenance loop calls it to pick up other nodes' changes).
    pub async fn load_ca(&self) -> Result<()> {
        let now = self.now();
        let records = self.store.ca_certificates().await?;
        // (id, active) of what should be loaded, against what is: equal means nothing was
        // rotated, imported or expired since the last load.
        let current = self.ca_set();
        let mut wanted: Vec<(&str, bool)> = records
            .iter()
            .filter(|r| match r.kind {
                CaKind::Root => r.active,
                CaKind::Issuing => r.not_after > now,
            })
            .map(|r| (r.id.as_str(), r.active))
            .collect();
        let mut loaded: Vec<(&str, bool)> = current
            .root
            .iter()
            .map(|(r, _)| (r.id.as_str(), true))
            .chain(current.issuing.iter().map(|c| (c.record.id.as_str(), c.record.active)))
            .collect();
        wanted.sort_unstable();
        loaded.sort_unstable();
        if current.version > 0 && wanted == loaded {
            return self.refresh_crls().await;
        }
        let mut root = None;
        let mut issuing = Vec::new();
        for r in records {
            match r.kind {
                CaKind::Root if r.active => {
                    let der = pki::pem_decode(&r.certificate_pem, &["CERTIFICATE"], "root CA")?;
                    root = Some((r, der));
                }
                CaKind::Issuing if r.not_after > now => {
                    let key_der = self.vault.open(&ca::seal_purpose(&r.id), &r.sealed_private_key)?;
                    let key = KeyPair::try_from(key_der.as_slice()).map_err(Error::internal)?;
                    let der = pki::pem_decode(&r.certificate_pem, &["CERTIFICATE"], "issuing CA")?;
                    let issuer = Issuer::from_ca_cert_der(&der.clone().into(), key).map_err(Error::internal)?;
                    issuing.push(Arc::new(IssuingCa { record: r, der, issuer }));
                }
                _ => {}
            }
        }
        issuing.sort_by_key(|c| (!c.record.active, -c.record.created_at));
        let crls = self.store.crls().await?.into_iter().map(|c| (c.issuer_id.clone(), Arc::new(c))).collect();
        let version = self.ca.set.load().version + 1;
        self.ca.set.store(Arc::new(CaSet { root, issuing, crls, version }));
        self.refresh_crls().await
    }

    /// Picks up CRLs other nodes signed, and re-signs any CRL that is missing or past half of
    /// its lifetime (so `nextUpdate` never passes). Run by the maintenance loop.
    pub async fn refresh_crls(&self) -> Result<()> {
        // Numbers first: the DER (megabytes for a large CRL) is read only when another node
        // signed a newer one.
        let set = self.ca_set();
        let newer = |issuer: &str, number: u64| set.crls.get(issuer).is_none_or(|mine| mine.number < number);
        if self.store.crl_numbers().await?.iter().any(|(issuer, n)| newer(issuer, *n)) {
            for crl in self.store.crls().await? {
                if newer(&crl.issuer_id, crl.number) {
                    self.install_crl(crl);
                }
            }
        }
        let set = self.ca_set();
        let now = self.now();
        let due: Vec<String> = set
            .issuing
            .iter()
            .filter(|c| {
                set.crls.get(&c.record.id).is_none_or(|crl| crl.next_update - now < self.settings.ca.crl_lifetime / 2)
            })
            .map(|c| c.record.id.clone())
            .collect();
        for id in due {
            self.rebuild_crl(&id).await?;
        }
        Ok(())
    }

    fn install_crl(&self, crl: StoredCrl) {
        let _ = self.ca.set.rcu(|cur| {
            if cur.crls.get(&crl.issuer_id).is_some_and(|c| c.number >= crl.number) {
                return cur.clone();
            }
            let mut crls = cur.crls.clone();
            crls.insert(crl.issuer_id.clone(), Arc::new(crl.clone()));
            Arc::new(CaSet { root: cur.root.clone(), issuing: cur.issuing.clone(), crls, version: cur.version + 1 })
        });
    }

    /// Signs a new CRL for `issuer_id` from the store's revocations, saves it, and serves it.
    pub async fn rebuild_crl(&self, issuer_id: &str) -> Result<()> {
        let _guard = self.ca.crl_lock.lock().await;
        let Some(ca) = self.ca_set().issuing_by_id(issuer_id).cloned() else {
            return Ok(()); // expired: no one can rely on its certificates any more
        };
        let number = self.store.next_crl_number(issuer_id).await?;
        let entries = self.store.revoked_certificates(issuer_id).await?;
        let now = self.now();
        let next = now + self.settings.ca.crl_lifetime;
        let der = if entries.len() > 1000 {
            tokio::task::spawn_blocking(move || pki::build_crl(&ca.issuer, number, now, next, &entries))
                .await
                .map_err(Error::internal)??
        } else {
            pki::build_crl(&ca.issuer, number, now, next, &entries)?
        };
        let crl = StoredCrl { issuer_id: issuer_id.to_owned(), number, this_update: now, next_update: next, der };
        self.store.save_crl(&crl).await?;
        self.install_crl(crl);
        Ok(())
    }

    /// The active issuing CA's CRL (DER), as served at `/pki/crl`.
    pub fn current_crl(&self) -> Option<Arc<StoredCrl>> {
        let set = self.ca_set();
        let id = &set.active()?.record.id;
        set.crls.get(id).cloned()
    }

    pub fn crl_of(&self, issuer_id: &str) -> Option<Arc<StoredCrl>> {
        self.ca_set().crls.get(issuer_id).cloned()
    }

    /// Every unexpired issuing CA's CRL as PEM, active first (`/pki/crl.pem`).
    pub fn crls_pem(&self) -> String {
        self.ca_set().crl_ders().iter().map(|d| pki::pem_encode("X509 CRL", d)).collect()
    }

    fn crl_url(&self, issuer_id: &str) -> String {
        format!("{}/pki/crl/{issuer_id}", self.settings.issuer)
    }

    // ---- profiles and templates ---------------------------------------------------------

    /// `GET /api/v1/pki/certificate-types`.
    pub fn certificate_types(&self) -> serde_json::Value {
        let ty = |t: CertificateType, purpose: &str, ku: &str, eku: Option<&str>, sans: &str| {
            let (d, m) = self.settings.ca.validity(t);
            serde_json::json!({
                "type": t.as_str(), "purpose": purpose, "key_usage": ku, "extended_key_usage": eku,
                "subject_alt_names": sans, "validity_days": d, "max_validity_days": m,
            })
        };
        serde_json::json!({
            "types": [
                ty(CertificateType::Transport, "mTLS client certificate of an application (tls_client_auth, the gateway)",
                   "digitalSignature (+keyEncipherment for RSA)", Some("clientAuth"), "URI urn:portcullis:client:<client id>"),
                ty(CertificateType::ServerTransport, "TLS server certificate of a resource server",
                   "digitalSignature (+keyEncipherment for RSA)", Some("serverAuth"),
                   "URI urn:portcullis:client:<client id> and the CSR's DNS names, within the organisation's allowed domains"),
                ty(CertificateType::Signing, "private_key_jwt signing key, published in the application's JWKS",
                   "digitalSignature", None, "URI urn:portcullis:client:<client id>"),
            ],
            "key_types": ["EC P-256 (default)", "EC P-384", "RSA 2048 to 8192 bits", "Ed25519"],
            "subject": "CN=<client id>, O=<organisation slug>",
        })
    }

    async fn org_app(&self, who: &Principal, org_slug: &str, application: &str) -> Result<(Organisation, Application)> {
        let org = self.administered_org(who, org_slug).await?;
        let client_id = if application.contains('$') {
            let c = ClientId::parse(application)?;
            if !c.as_str().starts_with(&format!("{}$", org.slug)) {
                return Err(Error::NotFound(format!("application {application:?} in organisation {}", org.slug)));
            }
            c
        } else {
            ClientId::new(&org.slug, &Slug::parse(application)?)
        };
        let app = self
            .store
            .application(client_id.as_str())
            .await?
            .filter(|a| a.org_id == org.id)
            .ok_or_else(|| Error::NotFound(format!("application {client_id}")))?;
        Ok((org, app))
    }

    /// `GET …/applications/{app}/csr-template?type=T&key=K`.
    pub async fn csr_template(
        &self,
        who: &Principal,
        org_slug: &str,
        app_slug: &str,
        cert_type: &str,
        key: Option<&str>,
    ) -> Result<CsrTemplate> {
        let t = CertificateType::parse(cert_type)?;
        let key = key.unwrap_or("p256");
        if !KEY_TYPES.contains(&key) {
            return Err(Error::invalid(format!("unknown key type {key:?}: expected one of {}", KEY_TYPES.join(", "))));
        }
        let (org, app) = self.org_app(who, org_slug, app_slug).await?;
        let client_id = app.client_id.to_string();
        let subject_openssl = pki::required_subject(&client_id, org.slug.as_str());
        let file = format!("{}-{}-{}", org.slug, app.slug, t.as_str());
        let san = (t == CertificateType::ServerTransport).then(|| {
            let host = org.allowed_domains.first().map_or_else(|| "api.example.com".to_owned(), |d| format!("api.{d}"));
            format!(" -addext 'subjectAltName=DNS:{host}'")
        });
        let command = |k: &str| {
            let newkey = match k {
                "p384" => "-newkey ec -pkeyopt ec_paramgen_curve:P-384",
                "rsa3072" => "-newkey rsa:3072",
                "ed25519" => "-newkey ed25519",
                _ => "-newkey ec -pkeyopt ec_paramgen_curve:P-256",
            };
            format!(
                "openssl req -new {newkey} -nodes -keyout {file}.key -subj '{subject_openssl}'{} -out {file}.csr",
                san.clone().unwrap_or_default()
            )
        };
        let commands: serde_json::Map<String, serde_json::Value> =
            KEY_TYPES.iter().map(|k| ((*k).to_owned(), command(k).into())).collect();
        let (d, m) = self.settings.ca.validity(t);
        let openssl_command = command(key);
        Ok(CsrTemplate {
            cert_type: t,
            application: client_id.clone(),
            subject: format!("CN={client_id}, O={}", org.slug),
            subject_openssl: subject_openssl.clone(),
            san_uri: pki::app_uri(&client_id),
            key_type: KEY_TYPES.iter().find(|k| **k == key).copied().unwrap_or("p256"),
            openssl_command,
            commands: commands.into(),
            dns_names_required: t == CertificateType::ServerTransport,
            allowed_domains: org.allowed_domains.clone(),
            validity_days: d,
            max_validity_days: m,
            upload: format!("POST /api/v1/organisations/{}/certificates", org.slug),
        })
    }

    // ---- issuance -----------------------------------------------------------------------

    /// The DNS names a `server-transport` certificate may carry: lowercase host names inside
    /// the organisation's allowed domains, no wildcards, at least one.
    fn check_dns_names(org: &Organisation, csr: &Csr) -> Result<Vec<String>> {
        if !csr.other_names.is_empty() {
            return Err(Error::invalid(format!(
                "a server-transport csr may ask only for DNS names, not {}",
                csr.other_names.join(", ")
            )));
        }
        if csr.dns_names.is_empty() {
            return Err(Error::invalid(
                "a server-transport csr must ask for at least one DNS name (-addext 'subjectAltName=DNS:host')",
            ));
        }
        if org.allowed_domains.is_empty() {
            return Err(Error::invalid(format!(
                "organisation {} has no allowed domains; a platform admin sets them with PATCH /api/v1/organisations/{}",
                org.slug, org.slug
            )));
        }
        let mut out = Vec::new();
        for name in &csr.dns_names {
            let d = name.to_ascii_lowercase();
            let d = d.trim_end_matches('.').to_owned();
            if !valid_hostname(&d) {
                return Err(Error::invalid(format!("DNS name {name:?} is not a host name (wildcards are not issued)")));
            }
            if !org.allowed_domains.iter().any(|a| d == *a || d.ends_with(&format!(".{a}"))) {
                return Err(Error::invalid(format!(
                    "DNS name {d:?} is outside the organisation's allowed domains ({})",
                    org.allowed_domains.join(", ")
                )));
            }
            if !out.contains(&d) {
                out.push(d);
            }
        }
        if out.len() > 100 {
            return Err(Error::invalid("a certificate may carry at most 100 DNS names"));
        }
        Ok(out)
    }

    /// Signs and records a certificate for `csr`. The subject must be the template's; the
    /// profile decides everything else.
    #[allow(clippy::too_many_arguments)]
    async fn sign_and_record(
        &self,
        actor: &str,
        ctx: &RequestContext,
        org: &Organisation,
        app: &Application,
        t: CertificateType,
        csr: &Csr,
        validity_days: Option<i64>,
        renewed_from: Option<&str>,
    ) -> Result<IssuedCertificate> {
        pki::check_subject(csr, app.client_id.as_str(), org.slug.as_str())?;
        let dns_names = if t == CertificateType::ServerTransport { Self::check_dns_names(org, csr)? } else { vec![] };
        let (default_days, max_days) = self.settings.ca.validity(t);
        let days = validity_days.unwrap_or(default_days);
        if !(1..=max_days).contains(&days) {
            return Err(Error::invalid(format!(
                "validity_days must be 1 to {max_days} for {} certificates",
                t.as_str()
            )));
        }
        let set = self.ca_set();
        let ca = set.active().ok_or_else(|| Error::internal("no active issuing CA is loaded"))?;
        let now = self.now();
        let not_after = (now + days * 86_400).min(ca.record.not_after);
        let spec = IssueSpec {
            cert_type: t,
            client_id: app.client_id.to_string(),
            org_slug: org.slug.to_string(),
            dns_names,
            not_before: now - 60,
            not_after,
            crl_url: self.crl_url(&ca.record.id),
        };
        // A serial collision (2^-126) is caught by the unique constraint; one retry.
        for attempt in 0..2 {
            let serial = pki::random_serial()?;
            let signed = pki::issue(csr, &spec, &serial, &ca.issuer)?;
            let cert = IssuedCertificate {
                id: new_id(),
                org_id: org.id.clone(),
                app_id: app.id.clone(),
                client_id: app.client_id.clone(),
                cert_type: t,
                serial: signed.serial,
                issuer_id: ca.record.id.clone(),
                subject: signed.subject,
                sans: signed.sans,
                key_type: csr.key.describe(),
                spki_sha256: signed.spki_sha256,
                fingerprint: signed.fingerprint,
                certificate_pem: signed.pem,
                not_before: spec.not_before,
                not_after,
                revoked_at: None,
                revocation_reason: None,
                renewed_from: renewed_from.map(str::to_owned),
                expiry_notified_at: None,
                created_by: actor.to_owned(),
                created_at: now,
            };
            let ev = self.audit(
                ctx,
                actor,
                Some(&org.id),
                if renewed_from.is_some() { "certificate.renew" } else { "certificate.issue" },
                &cert.id,
                serde_json::json!({
                    "application": cert.client_id, "type": t.as_str(), "serial": cert.serial,
                    "not_after": cert.not_after, "renewed_from": renewed_from,
                    "csr_asked_for_ca": csr.asks_ca,
                }),
            );
            match self.store.insert_certificate(&cert, &ev).await {
                Ok(()) => return Ok(cert),
                Err(StoreError::Conflict(_)) if attempt == 0 => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(Error::internal("serial collision twice in a row"))
    }

    /// `POST /api/v1/organisations/{org}/certificates`.
    pub async fn issue_certificate(
        &self,
        who: &Principal,
        ctx: &RequestContext,
        org_slug: &str,
        req: NewCertificate,
    ) -> Result<IssuedView> {
        let t = CertificateType::parse(&req.cert_type)?;
        let (org, app) = self.org_app(who, org_slug, &req.application).await?;
        let csr = pki::parse_csr(&req.csr)?;
        let cert = self.sign_and_record(&who.subject, ctx, &org, &app, t, &csr, req.validity_days, None).await?;
        Ok(self.issued_view(&cert))
    }

    fn issued_view(&self, cert: &IssuedCertificate) -> IssuedView {
        IssuedView { cert: self.view(cert), chain_pem: self.ca_set().chain_for(&cert.issuer_id) }
    }

    pub async fn certificates(
        &self,
        who: &Principal,
        org_slug: &str,
        filter: CertificateQuery,
        page: Page,
    ) -> Result<Vec<CertificateView>> {
        let org = self.administered_org(who, org_slug).await?;
        let mut f = CertificateFilter { now: self.now(), ..CertificateFilter::default() };
        if let Some(a) = &filter.application {
            f.app_id = Some(self.org_app(who, org_slug, a).await?.1.id);
        }
        f.cert_type = filter.cert_type.as_deref().map(CertificateType::parse).transpose()?;
        f.status = filter.status.as_deref().map(CertificateStatus::parse).transpose()?;
        let hex = |what: &str, v: &Option<String>| -> Result<Option<String>> {
            v.as_deref()
                .map(|s| {
                    pki::normalise_hex(s).ok_or_else(|| Error::invalid(format!("{what} must be hex (colons allowed)")))
                })
                .transpose()
        };
        f.serial = hex("serial", &filter.serial)?;
        f.fingerprint = hex("fingerprint", &filter.fingerprint)?;
        if let Some(days) = filter.expiring_within_days {
            if !(0..=3650).contains(&days) {
                return Err(Error::invalid("expiring_within_days must be 0 to 3650"));
            }
            f.expires_before = Some(f.now + days * 86_400);
        }
        let list = self.store.certificates(&org.id, &f, page).await?;
        Ok(list.iter().map(|c| self.view(c)).collect())
    }

    async fn org_certificate(
        &self,
        who: &Principal,
        org_slug: &str,
        id: &str,
    ) -> Result<(Organisation, IssuedCertificate)> {
        let org = self.administered_org(who, org_slug).await?;
        let cert =
            self.store.certificate(&org.id, id).await?.ok_or_else(|| Error::NotFound(format!("certificate {id:?}")))?;
        Ok((org, cert))
    }

    pub async fn certificate(&self, who: &Principal, org_slug: &str, id: &str) -> Result<IssuedView> {
        let (_, cert) = self.org_certificate(who, org_slug, id).await?;
        Ok(self.issued_view(&cert))
    }

    /// Revokes a certificate (expired ones too), regenerates its issuer's CRL and emails the
    /// organisation's admins. The revocation is committed before this returns, and so is the
    /// new CRL.
    pub async fn revoke_certificate(
        &self,
        who: &Principal,
        ctx: &RequestContext,
        org_slug: &str,
        id: &str,
        reason: &str,
    ) -> Result<CertificateView> {
        let reason = RevocationReason::parse(reason)?;
        let (org, cert) = self.org_certificate(who, org_slug, id).await?;
        if cert.revoked_at.is_some() {
            return Err(Error::Conflict(format!("certificate {id} is already revoked")));
        }
        let now = self.now();
        let msg = Message::CertificateRevoked {
            client_id: cert.client_id.as_str(),
            cert_type: cert.cert_type.as_str(),
            serial: &cert.serial,
            reason: reason.as_str(),
            by: &who.subject,
        };
        let (mails, recipients) = self.admin_mails(&org, &msg).await?;
        let ev = self.audit(
            ctx,
            &who.subject,
            Some(&org.id),
            "certificate.revoke",
            &cert.id,
            serde_json::json!({ "serial": cert.serial, "reason": reason.as_str(), "application": cert.client_id }),
        );
        if !self.store.revoke_certificate(&cert.id, reason, now, &mails, &ev).await? {
            return Err(Error::Conflict(format!("certificate {id} is already revoked")));
        }
        for to in &recipients {
            self.mail_queued(to, &msg);
        }
        self.rebuild_crl(&cert.issuer_id).await?;
        let revoked = IssuedCertificate { revoked_at: Some(now), revocation_reason: Some(reason), ..cert };
        Ok(self.view(&revoked))
    }

    /// Revokes every active certificate of `app` (reason `cessation_of_operation`) and re-signs
    /// the CRLs concerned: the application is being deleted.
    pub(crate) async fn revoke_application_certificates(
        &self,
        actor: &str,
        ctx: &RequestContext,
        org: &Organisation,
        app: &Application,
    ) -> Result<usize> {
        let filter = CertificateFilter {
            app_id: Some(app.id.clone()),
            status: Some(CertificateStatus::Active),
            now: self.now(),
            ..CertificateFilter::default()
        };
        let mut issuers = Vec::new();
        let mut n = 0;
        loop {
            let batch = self.store.certificates(&org.id, &filter, Page::new(Some(Page::MAX_LIMIT), None)).await?;
            if batch.is_empty() {
                break;
            }
            for cert in batch {
                let reason = RevocationReason::CessationOfOperation;
                let ev = self.audit(
                    ctx,
                    actor,
                    Some(&org.id),
                    "certificate.revoke",
                    &cert.id,
                    serde_json::json!({ "serial": cert.serial, "reason": reason.as_str(), "application": cert.client_id, "cause": "application deleted" }),
                );
                if self.store.revoke_certificate(&cert.id, reason, self.now(), &[], &ev).await? {
                    n += 1;
                }
                if !issuers.contains(&cert.issuer_id) {
                    issuers.push(cert.issuer_id);
                }
            }
        }
        for issuer in issuers {
            self.rebuild_crl(&issuer).await?;
        }
        Ok(n)
    }

    /// Mail for every enabled admin of the organisation.
    async fn admin_mails(&self, org: &Organisation, msg: &Message<'_>) -> Result<(Vec<QueuedMail>, Vec<Email>)> {
        let admins = self.store.users_with_role(&org.id, ROLE_ORG_ADMIN, 50).await?;
        let mut mails = Vec::with_capacity(admins.len());
        let mut to = Vec::with_capacity(admins.len());
        for u in admins {
            mails.push(self.queued_mail(&u.email, msg)?);
            to.push(u.email);
        }
        Ok((mails, to))
    }

    /// `POST …/certificates/{id}/renew {csr}`: a new certificate of the same type for the same
    /// application, linked to the old one (which stays valid until it expires or is revoked).
    pub async fn renew_certificate(
        &self,
        who: &Principal,
        ctx: &RequestContext,
        org_slug: &str,
        id: &str,
        csr: &str,
        validity_days: Option<i64>,
    ) -> Result<IssuedView> {
        let (org, old) = self.org_certificate(who, org_slug, id).await?;
        if old.revoked_at.is_some() {
            return Err(Error::Conflict(format!(
                "certificate {id} is revoked: issue a new one instead of renewing it"
            )));
        }
        let app = self
            .store
            .application(old.client_id.as_str())
            .await?
            .filter(|a| a.id == old.app_id)
            .ok_or_else(|| Error::Conflict(format!("the application {} no longer exists", old.client_id)))?;
        let csr = pki::parse_csr(csr)?;
        let cert = self
            .sign_and_record(&who.subject, ctx, &org, &app, old.cert_type, &csr, validity_days, Some(&old.id))
            .await?;
        Ok(self.issued_view(&cert))
    }

    /// Renewal over mTLS: the presented certificate (already verified by the TLS layer against
    /// our CA and CRL) renews itself — with the same key, or with a new CSR for the same
    /// subject. Only active `transport` certificates of enabled applications may.
    pub async fn renew_by_certificate(
        &self,
        ctx: &RequestContext,
        presented_der: &[u8],
        csr: Option<&str>,
    ) -> Result<IssuedView> {
        let old = self.presented_certificate(presented_der).await?;
        if old.cert_type != CertificateType::Transport {
            return Err(Error::Forbidden("only transport certificates renew themselves over mTLS".into()));
        }
        let app = self
            .store
            .application(old.client_id.as_str())
            .await?
            .filter(|a| a.id == old.app_id && a.enabled)
            .ok_or_else(|| Error::Forbidden(format!("application {} is disabled or gone", old.client_id)))?;
        let org = self
            .store
            .organisation_by_id(&old.org_id)
            .await?
            .ok_or_else(|| Error::Forbidden("the certificate's organisation is gone".into()))?;
        let csr = match csr {
            Some(pem) => pki::parse_csr(pem)?,
            None => pki::csr_from_certificate(presented_der)?,
        };
        let actor = format!("certificate:{}", old.serial);
        let cert = self.sign_and_record(&actor, ctx, &org, &app, old.cert_type, &csr, None, Some(&old.id)).await?;
        Ok(self.issued_view(&cert))
    }

    /// The inventory record of a certificate presented over TLS: it must be ours, neither
    /// revoked nor expired.
    pub async fn presented_certificate(&self, der: &[u8]) -> Result<IssuedCertificate> {
        let fp = pki::fingerprint(der);
        let cert = self
            .store
            .certificate_by_fingerprint(&fp)
            .await?
            .ok_or_else(|| Error::Unauthenticated("the client certificate is not in this CA's inventory".into()))?;
        match cert.status(self.now()) {
            CertificateStatus::Active => Ok(cert),
            CertificateStatus::Revoked => Err(Error::Unauthenticated("the client certificate is revoked".into())),
            CertificateStatus::Expired => Err(Error::Unauthenticated("the client certificate has expired".into())),
        }
    }

    // ---- JWKS ---------------------------------------------------------------------------

    /// `GET /applications/{client_id}/jwks.json`: the application's active signing
    /// certificates. Read from the store on every call, so a revocation shows at once.
    pub async fn application_jwks(&self, client_id: &str) -> Result<serde_json::Value> {
        let app = match ClientId::parse(client_id) {
            Ok(c) => self.store.application(c.as_str()).await?,
            Err(_) => None,
        }
        .ok_or_else(|| Error::NotFound(format!("application {client_id:?}")))?;
        let keys = self.signing_certificate_jwks(&app.id).await?;
        Ok(serde_json::json!({ "keys": keys }))
    }

    pub(crate) async fn signing_certificate_jwks(&self, app_id: &str) -> Result<Vec<serde_json::Value>> {
        let certs = self.store.active_signing_certificates(app_id, self.now()).await?;
        let set = self.ca_set();
        let mut keys = Vec::with_capacity(certs.len());
        for c in certs {
            let der = pki::pem_decode(&c.certificate_pem, &["CERTIFICATE"], "certificate")?;
            let chain: Vec<Vec<u8>> = set.issuing_by_id(&c.issuer_id).map(|i| vec![i.der.clone()]).unwrap_or_default();
            if let Some(jwk) = pki::certificate_jwk(&der, &chain) {
                keys.push(jwk);
            }
        }
        Ok(keys)
    }

    // ---- lifecycle mail -----------------------------------------------------------------

    /// Emails the organisation's admins about certificates expiring within
    /// `expiry_notice_days` (once per certificate). Returns how many were handled.
    pub async fn send_expiry_notices(&self) -> Result<usize> {
        let days = self.settings.ca.expiry_notice_days;
        if days == 0 {
            return Ok(0);
        }
        let now = self.now();
        let due = self.store.certificates_expiring(now, now + days * 86_400, 100).await?;
        let n = due.len();
        for c in due {
            let Some(org) = self.store.organisation_by_id(&c.org_id).await? else { continue };
            let msg = Message::CertificateExpiring {
                client_id: c.client_id.as_str(),
                cert_type: c.cert_type.as_str(),
                serial: &c.serial,
                not_after: c.not_after,
            };
            let (mails, to) = self.admin_mails(&org, &msg).await?;
            self.store.mark_expiry_notified(&c.id, now, &mails).await?;
            for t in &to {
                self.mail_queued(t, &msg);
            }
        }
        Ok(n)
    }

    /// A server certificate for Portcullis's own TLS listener, from the active issuing CA
    /// (not in the inventory). Returns the chain (leaf, issuing CA, root) and the PKCS#8 key.
    pub fn issue_listener_certificate(&self, names: &[String], days: i64) -> Result<(Vec<Vec<u8>>, Vec<u8>)> {
        let set = self.ca_set();
        let ca = set.active().ok_or_else(|| Error::internal("no active issuing CA is loaded"))?;
        let now = self.now();
        let (leaf, key) =
            pki::issue_server_certificate(names, now - 60, (now + days * 86_400).min(ca.record.not_after), &ca.issuer)?;
        let mut chain = vec![leaf, ca.der.clone()];
        if let Some((_, root)) = &set.root {
            chain.push(root.clone());
        }
        Ok((chain, key))
    }

    /// `portcullis ca show`: the hierarchy as this node has it loaded.
    pub fn ca_summary(&self) -> serde_json::Value {
        let set = self.ca_set();
        let root = set.root.as_ref().map(|(r, _)| {
            serde_json::json!({
                "id": r.id, "subject": r.subject, "not_before": rfc3339(r.not_before), "not_after": rfc3339(r.not_after),
                "has_key": !r.sealed_private_key.is_empty(),
            })
        });
        let issuing: Vec<serde_json::Value> = set
            .issuing
            .iter()
            .map(|c| {
                serde_json::json!({
                    "id": c.record.id, "subject": c.record.subject, "issues": c.record.active,
                    "not_before": rfc3339(c.record.not_before), "not_after": rfc3339(c.record.not_after),
                    "crl_number": set.crls.get(&c.record.id).map(|crl| crl.number),
                    "crl_next_update": set.crls.get(&c.record.id).map(|crl| rfc3339(crl.next_update)),
                })
            })
            .collect();
        serde_json::json!({ "root": root, "issuing": issuing })
    }

    // ---- CA administration --------------------------------------------------------------

    /// A new issuing CA signed by the root; the old one stops issuing but stays loaded (its
    /// certificates remain valid until they expire, and its CRL is still signed).
    pub async fn rotate_issuing_ca(&self, actor: &str) -> Result<CaCertificate> {
        let records = self.store.ca_certificates().await?;
        let root = records
            .iter()
            .find(|r| r.kind == CaKind::Root && r.active)
            .ok_or_else(|| Error::Conflict("there is no active root CA".into()))?;
        let new = self.new_issuing_ca(root, &records)?;
        let ev = self.audit(
            &RequestContext::default(),
            actor,
            None,
            "ca.rotate",
            &new.id,
            serde_json::json!({ "subject": new.subject, "not_after": new.not_after }),
        );
        self.store.activate_ca_certificates(std::slice::from_ref(&new), &ev).await?;
        self.load_ca().await?;
        Ok(new)
    }

    /// A new issuing CA signed by `root` (active), numbered after the issuing CAs in `records`.
    pub(crate) fn new_issuing_ca(&self, root: &CaCertificate, records: &[CaCertificate]) -> Result<CaCertificate> {
        let root_key = self.vault.open(&ca::seal_purpose(&root.id), &root.sealed_private_key)?;
        let n = records.iter().filter(|r| r.kind == CaKind::Issuing).count() + 1;
        ca::issue_issuing_ca(
            self.vault.as_ref(),
            root,
            &root_key,
            &format!("Portcullis Issuing CA {n}"),
            self.now(),
            self.settings.ca.issuing_ca_validity_days,
        )
    }

    /// Imports an existing CA (PEM certificate + PEM PKCS#8 key). A self-signed CA becomes the
    /// root and gets a fresh issuing CA; any other becomes the issuing CA, with `chain_pem`
    /// giving its issuer (the root, trusted without its key).
    pub async fn import_ca(
        &self,
        actor: &str,
        cert_pem: &str,
        key_pem: &str,
        chain_pem: Option<&str>,
    ) -> Result<Vec<CaCertificate>> {
        let now = self.now();
        let imported = ca::import(
            self.vault.as_ref(),
            cert_pem,
            key_pem,
            chain_pem,
            now,
            self.settings.ca.issuing_ca_validity_days,
        )?;
        let ev = self.audit(
            &RequestContext::default(),
            actor,
            None,
            "ca.import",
            &imported.iter().map(|c| c.subject.clone()).collect::<Vec<_>>().join(" / "),
            serde_json::json!({ "certificates": imported.len() }),
        );
        self.store.activate_ca_certificates(&imported, &ev).await?;
        self.load_ca().await?;
        Ok(imported)
    }

    /// `PATCH /api/v1/organisations/{org}` `{allowed_domains}` (platform admins only: the
    /// domains bound what `server-transport` certificates may name).
    pub async fn set_organisation_domains(
        &self,
        who: &Principal,
        ctx: &RequestContext,
        org_slug: &str,
        domains: Vec<String>,
    ) -> Result<Organisation> {
        who.ensure_platform_admin()?;
        let org = self.organisation_or_404(org_slug).await?;
        let mut clean = Vec::new();
        for d in domains {
            let d = d.trim().trim_end_matches('.').to_ascii_lowercase();
            if !valid_hostname(&d) || !d.contains('.') {
                return Err(Error::invalid(format!(
                    "allowed domain {d:?} must be a DNS domain like example.com (no wildcards, no scheme)"
                )));
            }
            if !clean.contains(&d) {
                clean.push(d);
            }
        }
        if clean.len() > 100 {
            return Err(Error::invalid("at most 100 allowed domains"));
        }
        let now = self.now();
        let ev = self.audit(
            ctx,
            &who.subject,
            Some(&org.id),
            "organisation.update",
            org.slug.as_str(),
            serde_json::json!({ "allowed_domains": clean }),
        );
        if !self.store.set_organisation_domains(&org.id, &clean, now, &ev).await? {
            return Err(Error::NotFound(format!("organisation {org_slug:?}")));
        }
        Ok(Organisation { allowed_domains: clean, updated_at: now, ..org })
    }
}

/// Query of `GET …/certificates`.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateQuery {
    pub application: Option<String>,
    #[serde(rename = "type")]
    pub cert_type: Option<String>,
    pub status: Option<String>,
    pub serial: Option<String>,
    pub fingerprint: Option<String>,
    pub expiring_within_days: Option<i64>,
    pub limit: Option<u32>,
    pub offset: Option<u64>,
}

pub(super) fn valid_hostname(d: &str) -> bool {
    !d.is_empty()
        && d.len() <= 253
        && d.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}
