//! Certificates of an organisation: the New Certificate wizard (choose the application and
//! type → the `openssl` command to copy → upload the CSR file → download the certificate and
//! its chain), the filtered list, a certificate's page with its downloads, revocation with a
//! reason, and renewal with a new CSR.

use askama::Template;
use axum::body::Body;
use axum::extract::Path;
use axum::http::{StatusCode, Uri};
use axum::response::Response;
use portcullis_core::Error;
use portcullis_core::model::{Organisation, Page, RevocationReason};
use portcullis_core::usecases::{
    CertificateQuery, CertificateView, CsrTemplate, IssuedView, KEY_TYPES, NewCertificate,
};

use super::{ConfirmPage, Fields, Nav, Pager, Shell, Visit, attachment, page_error, short_time};
use crate::oidc;

const TYPES: [(&str, &str, &str); 3] = [
    (
        "transport",
        "Transport",
        "mTLS client certificate: the application authenticates to the gateway or the token endpoint (tls_client_auth).",
    ),
    (
        "server-transport",
        "Server transport",
        "TLS server certificate of a resource server, for DNS names within the organisation's allowed domains.",
    ),
    ("signing", "Signing", "Signing key for private_key_jwt client assertions, published in the application's JWKS."),
];

const KEY_NAMES: [(&str, &str); 4] =
    [("p256", "EC P-256"), ("p384", "EC P-384"), ("rsa3072", "RSA 3072"), ("ed25519", "Ed25519")];

fn base(org: &str) -> String {
    format!("/portal/orgs/{org}/certificates")
}

/// A certificate as the pages show it.
pub struct CertRow {
    pub id: String,
    pub serial: String,
    pub application: String,
    pub cert_type: String,
    pub status: String,
    pub not_before: String,
    pub not_after: String,
}

impl From<&CertificateView> for CertRow {
    fn from(c: &CertificateView) -> Self {
        Self {
            id: c.id.clone(),
            serial: c.serial.clone(),
            application: c.application.clone(),
            cert_type: c.cert_type.as_str().to_owned(),
            status: c.status.as_str().to_owned(),
            not_before: short_time(&c.not_before),
            not_after: short_time(&c.not_after),
        }
    }
}

// ---- the list ------------------------------------------------------------------------------

/// The list's filters, as given in the query.
#[derive(Debug, Clone, Default)]
pub struct Filters {
    pub cert_type: String,
    pub status: String,
    pub expiring: String,
    pub application: String,
    pub serial: String,
}

impl Filters {
    fn from_uri(uri: &Uri) -> Self {
        let q = |k: &str| oidc::query_param(uri, k).trim().to_owned();
        Self {
            cert_type: q("type"),
            status: q("status"),
            expiring: q("expiring"),
            application: q("application"),
            serial: q("serial"),
        }
    }
    fn pairs(&self) -> Vec<(String, String)> {
        [
            ("type", &self.cert_type),
            ("status", &self.status),
            ("expiring", &self.expiring),
            ("application", &self.application),
            ("serial", &self.serial),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.clone()))
        .collect()
    }
    fn query(&self, page: Page) -> Result<CertificateQuery, Error> {
        let some = |s: &str| Some(s.to_owned()).filter(|s| !s.is_empty());
        let expiring = match some(&self.expiring) {
            None => None,
            Some(d) => Some(
                d.parse::<i64>().map_err(|_| Error::invalid("expiring within must be a number of days (0 to 3650)"))?,
            ),
        };
        Ok(CertificateQuery {
            application: some(&self.application),
            cert_type: some(&self.cert_type),
            status: some(&self.status),
            serial: some(&self.serial),
            fingerprint: None,
            expiring_within_days: expiring,
            limit: Some(page.limit),
            offset: Some(page.offset),
        })
    }
    fn is_type(&self, t: &str) -> bool {
        self.cert_type == t
    }
    fn is_status(&self, s: &str) -> bool {
        self.status == s
    }
    fn any(&self) -> bool {
        self.pairs().iter().any(|(_, v)| !v.is_empty())
    }
}

#[derive(Template)]
#[template(path = "portal/certificates.html")]
struct ListPage {
    shell: Shell,
    org: String,
    filters: Filters,
    types: Vec<(&'static str, &'static str, &'static str)>,
    rows: Vec<CertRow>,
    pager: Pager,
}

/// `GET /portal/orgs/{org}/certificates?type=&status=&expiring=&application=&serial=&page=`.
pub async fn list(v: Visit, Path(org): Path<String>, uri: Uri) -> Response {
    let o = match v.org(&org).await {
        Ok(o) => o,
        Err(r) => return r,
    };
    let filters = Filters::from_uri(&uri);
    let (n, page) = Pager::request(&uri);
    let outcome = match filters.query(page) {
        Ok(q) => v.s.core.certificates(&v.who, &org, q, page).await,
        Err(e) => Err(e),
    };
    let mut shell = v.shell(Some(&o), Nav::Certificates).await;
    let (mut list, failure) = match outcome {
        Ok(l) => (l, None),
        Err(e @ (Error::InvalidInput(_) | Error::NotFound(_))) => (Vec::new(), Some(page_error(e))),
        Err(e) => return v.fail(Some(&o), e).await,
    };
    let pager = Pager::cut(n, &mut list, &base(&org), &filters.pairs());
    shell.error = failure.as_ref().map(|(_, e)| e.clone());
    let page = ListPage {
        shell,
        org: o.slug.to_string(),
        filters,
        types: TYPES.to_vec(),
        rows: list.iter().map(CertRow::from).collect(),
        pager,
    };
    match failure {
        Some((status, err)) => v.failed(status, &page, &err),
        None => v.page(StatusCode::OK, &page),
    }
}

// ---- the wizard ----------------------------------------------------------------------------

#[derive(Template)]
#[template(path = "portal/certificate_choose.html")]
struct ChoosePage {
    shell: Shell,
    org: String,
    /// `(slug, name, client id)`.
    apps: Vec<(String, String, String)>,
    application: String,
    cert_type: String,
    types: Vec<(&'static str, &'static str, &'static str)>,
}

/// Step 2: the command and the upload (also the renewal form).
#[derive(Template)]
#[template(path = "portal/certificate_upload.html")]
struct UploadPage {
    shell: Shell,
    org: String,
    template: CsrTemplate,
    /// The application's slug.
    application: String,
    type_label: String,
    key: String,
    keys: Vec<(&'static str, &'static str)>,
    /// Where the form posts; a renewal names the certificate it renews.
    action: String,
    renewing: Option<String>,
    /// A pasted CSR to show again after an error.
    csr: String,
}

impl UploadPage {
    fn key_href(&self, key: &str) -> String {
        match &self.renewing {
            Some(id) => format!("{}/{id}/renew?key={key}", base(&self.org)),
            None => format!(
                "{}/new?{}",
                base(&self.org),
                oidc::encode(&[
                    ("application".into(), self.application.clone()),
                    ("type".into(), self.template.cert_type.as_str().to_owned()),
                    ("key".into(), key.to_owned()),
                ])
            ),
        }
    }
}

fn type_label(t: &str) -> String {
    TYPES.iter().find(|(k, _, _)| *k == t).map(|(_, l, _)| (*l).to_owned()).unwrap_or_else(|| t.to_owned())
}

fn key_of(uri: &Uri) -> String {
    let k = oidc::query_param(uri, "key");
    if KEY_TYPES.contains(&k.as_str()) { k } else { "p256".to_owned() }
}

async fn choose_page(
    v: &Visit,
    o: &Organisation,
    application: String,
    cert_type: String,
) -> Result<ChoosePage, Response> {
    let apps = match v.s.core.applications(&v.who, o.slug.as_str(), Page::new(Some(Page::MAX_LIMIT), None)).await {
        Ok(a) => a,
        Err(e) => return Err(v.fail(Some(o), e).await),
    };
    Ok(ChoosePage {
        shell: v.shell(Some(o), Nav::Certificates).await,
        org: o.slug.to_string(),
        apps: apps.iter().map(|a| (a.slug.to_string(), a.name.clone(), a.client_id.to_string())).collect(),
        application,
        cert_type,
        types: TYPES.to_vec(),
    })
}

#[allow(clippy::too_many_arguments)]
async fn upload_page(
    v: &Visit,
    o: &Organisation,
    template: CsrTemplate,
    application: String,
    key: String,
    renewing: Option<String>,
    csr: String,
) -> UploadPage {
    let org = o.slug.to_string();
    let action = match &renewing {
        Some(id) => format!("{}/{id}/renew", base(&org)),
        None => base(&org),
    };
    UploadPage {
        shell: v.shell(Some(o), Nav::Certificates).await,
        type_label: type_label(template.cert_type.as_str()),
        org,
        template,
        application,
        key,
        keys: KEY_NAMES.to_vec(),
        action,
        renewing,
        csr,
    }
}

/// `GET /portal/orgs/{org}/certificates/new[?application=&type=&key=]`: step 1 without an
/// application and type, step 2 with them.
pub async fn wizard(v: Visit, Path(org): Path<String>, uri: Uri) -> Response {
    let o = match v.org(&org).await {
        Ok(o) => o,
        Err(r) => return r,
    };
    let application = oidc::query_param(&uri, "application");
    let cert_type = oidc::query_param(&uri, "type");
    if application.is_empty() || cert_type.is_empty() {
        return match choose_page(&v, &o, application, cert_type).await {
            Ok(p) => v.page(StatusCode::OK, &p),
            Err(r) => r,
        };
    }
    let key = key_of(&uri);
    match v.s.core.csr_template(&v.who, &org, &application, &cert_type, Some(&key)).await {
        Ok(t) => {
            let page = upload_page(&v, &o, t, application, key, None, String::new()).await;
            v.page(StatusCode::OK, &page)
        }
        Err(e @ (Error::InvalidInput(_) | Error::NotFound(_))) => {
            let (status, err) = page_error(e);
            match choose_page(&v, &o, application, cert_type).await {
                Ok(mut p) => {
                    p.shell.error = Some(err.clone());
                    v.failed(status, &p, &err)
                }
                Err(r) => r,
            }
        }
        Err(e) => v.fail(Some(&o), e).await,
    }
}

/// The uploaded CSR file, or else the pasted one.
fn csr_of(f: &Fields) -> Result<String, Response> {
    let file = f.one("csr_file")?;
    Ok(if file.trim().is_empty() { f.one("csr")? } else { file })
}

/// Step 2 again, with the error of an upload.
#[allow(clippy::too_many_arguments)]
async fn upload_failed(
    v: &Visit,
    o: &Organisation,
    application: &str,
    cert_type: &str,
    key: String,
    renewing: Option<String>,
    csr: String,
    e: Error,
) -> Response {
    let (status, err) = page_error(e);
    match v.s.core.csr_template(&v.who, o.slug.as_str(), application, cert_type, Some(&key)).await {
        Ok(t) => {
            let pasted = if csr.len() <= 16 * 1024 { csr } else { String::new() };
            let mut page = upload_page(v, o, t, application.to_owned(), key, renewing, pasted).await;
            page.shell.error = Some(err.clone());
            v.failed(status, &page, &err)
        }
        Err(e) => v.fail(Some(o), e).await,
    }
}

/// `POST /portal/orgs/{org}/certificates` (multipart: `application`, `type`, `csr_file` or
/// `csr`): issues, then shows the certificate with its downloads.
pub async fn issue(v: Visit, Path(org): Path<String>, body: Body) -> Response {
    let f = match v.upload_form(body).await {
        Ok(f) => f,
        Err(r) => return r,
    };
    let o = match v.org(&org).await {
        Ok(o) => o,
        Err(r) => return r,
    };
    let (application, cert_type, key, csr) = match (f.one("application"), f.one("type"), f.one("key"), csr_of(&f)) {
        (Ok(a), Ok(t), Ok(k), Ok(c)) => (a, t, k, c),
        (Err(r), ..) | (_, Err(r), ..) | (_, _, Err(r), _) | (.., Err(r)) => return r,
    };
    let key = if KEY_TYPES.contains(&key.as_str()) { key } else { "p256".to_owned() };
    if csr.trim().is_empty() {
        let e = Error::invalid("choose the CSR file (or paste the CSR) to upload");
        return upload_failed(&v, &o, &application, &cert_type, key, None, csr, e).await;
    }
    let req = NewCertificate {
        cert_type: cert_type.clone(),
        application: application.clone(),
        csr: csr.clone(),
        validity_days: None,
    };
    match v.s.core.issue_certificate(&v.who, &v.ctx, &org, req).await {
        Ok(issued) => oidc::see_other(&format!("{}/{}?notice=cert-issued", base(&org), issued.cert.id)),
        Err(e @ (Error::InvalidInput(_) | Error::Conflict(_) | Error::Forbidden(_))) => {
            upload_failed(&v, &o, &application, &cert_type, key, None, csr, e).await
        }
        Err(e) => v.fail(Some(&o), e).await,
    }
}

// ---- one certificate -----------------------------------------------------------------------

#[derive(Template)]
#[template(path = "portal/certificate.html")]
struct DetailPage {
    shell: Shell,
    org: String,
    cert: CertRow,
    view: CertificateView,
    /// The application's slug (for renewal and its page).
    app_slug: String,
    revoked_at: Option<String>,
}

async fn org_and_cert(v: &Visit, org: &str, id: &str) -> Result<(Organisation, IssuedView), Response> {
    let o = v.org(org).await?;
    match v.s.core.certificate(&v.who, org, id).await {
        Ok(c) => Ok((o, c)),
        Err(e) => Err(v.fail(Some(&o), e).await),
    }
}

/// `GET /portal/orgs/{org}/certificates/{id}`.
pub async fn detail(v: Visit, Path((org, id)): Path<(String, String)>) -> Response {
    let (o, c) = match org_and_cert(&v, &org, &id).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let page = DetailPage {
        shell: v.shell(Some(&o), Nav::Certificates).await,
        org: o.slug.to_string(),
        cert: CertRow::from(&c.cert),
        app_slug: c.cert.application.split_once('$').map(|(_, a)| a.to_owned()).unwrap_or_default(),
        revoked_at: c.cert.revoked_at.as_deref().map(short_time),
        view: c.cert,
    };
    v.page(StatusCode::OK, &page)
}

/// `GET …/certificates/{id}/certificate.pem|chain.pem|fullchain.pem`.
pub async fn download(v: Visit, Path((org, id, file)): Path<(String, String, String)>) -> Response {
    let (o, c) = match org_and_cert(&v, &org, &id).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let stem = format!(
        "{}-{}-{}",
        c.cert.application.replace('$', "-"),
        c.cert.cert_type.as_str(),
        c.cert.serial.get(..8).unwrap_or(&c.cert.serial)
    );
    let body = match file.as_str() {
        "certificate.pem" => c.cert.certificate_pem.clone(),
        "chain.pem" => c.chain_pem.clone(),
        "fullchain.pem" => format!("{}{}", c.cert.certificate_pem, c.chain_pem),
        _ => return v.fail(Some(&o), Error::NotFound(format!("file {file:?} of certificate {id}"))).await,
    };
    let name = format!("{stem}-{file}");
    attachment("application/x-pem-file", &name, body)
}

/// `GET …/certificates/{id}/revoke`: the reason, then the POST (after a recent sign-in).
pub async fn revoke_confirm(v: Visit, Path((org, id)): Path<(String, String)>) -> Response {
    let here = format!("{}/{id}/revoke", base(&org));
    if !v.fresh() {
        return v.reauthenticate(&here);
    }
    let (o, c) = match org_and_cert(&v, &org, &id).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let page = ConfirmPage {
        shell: v.shell(Some(&o), Nav::Certificates).await,
        title: "Revoke the certificate?".into(),
        message: format!(
            "Certificate {} ({} of {}) stops being accepted at once: the CRL is re-signed before this page answers, and gateways learn of it within seconds. This cannot be undone.",
            c.cert.serial,
            c.cert.cert_type.as_str(),
            c.cert.application
        ),
        action: here,
        button: "Revoke certificate".into(),
        cancel: format!("{}/{id}", base(&org)),
        fields: Vec::new(),
        reasons: RevocationReason::ALL
            .iter()
            .filter(|r| !matches!(r, RevocationReason::CaCompromise | RevocationReason::AaCompromise))
            .map(|r| (r.as_str().to_owned(), r.as_str().replace('_', " ")))
            .collect(),
    };
    v.page(StatusCode::OK, &page)
}

/// `POST …/certificates/{id}/revoke` `reason`.
pub async fn revoke(v: Visit, Path((org, id)): Path<(String, String)>, body: Body) -> Response {
    let f = match v.form(body).await {
        Ok(f) => f,
        Err(r) => return r,
    };
    if !v.fresh() {
        return v.reauthenticate(&format!("{}/{id}/revoke", base(&org)));
    }
    let reason = match f.one("reason") {
        Ok(r) => r,
        Err(r) => return r,
    };
    match v.s.core.revoke_certificate(&v.who, &v.ctx, &org, &id, &reason).await {
        Ok(_) => oidc::see_other(&format!("{}/{id}?notice=cert-revoked", base(&org))),
        Err(e) => v.fail(None, e).await,
    }
}

/// `GET …/certificates/{id}/renew`: the command for a new CSR and its upload.
pub async fn renew_form(v: Visit, Path((org, id)): Path<(String, String)>, uri: Uri) -> Response {
    let (o, c) = match org_and_cert(&v, &org, &id).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let key = key_of(&uri);
    let app = c.cert.application.clone();
    match v.s.core.csr_template(&v.who, &org, &app, c.cert.cert_type.as_str(), Some(&key)).await {
        Ok(t) => {
            let page = upload_page(&v, &o, t, app, key, Some(id), String::new()).await;
            v.page(StatusCode::OK, &page)
        }
        Err(e) => v.fail(Some(&o), e).await,
    }
}

/// `POST …/certificates/{id}/renew` (multipart: `csr_file` or `csr`).
pub async fn renew(v: Visit, Path((org, id)): Path<(String, String)>, body: Body) -> Response {
    let f = match v.upload_form(body).await {
        Ok(f) => f,
        Err(r) => return r,
    };
    let (o, c) = match org_and_cert(&v, &org, &id).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let csr = match csr_of(&f) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let key = f.one("key").ok().filter(|k| KEY_TYPES.contains(&k.as_str())).unwrap_or_else(|| "p256".to_owned());
    let (app, t) = (c.cert.application.clone(), c.cert.cert_type.as_str());
    let outcome = if csr.trim().is_empty() {
        Err(Error::invalid("choose the CSR file (or paste the CSR) to upload"))
    } else {
        v.s.core.renew_certificate(&v.who, &v.ctx, &org, &id, &csr, None).await
    };
    match outcome {
        Ok(issued) => oidc::see_other(&format!("{}/{}?notice=cert-renewed", base(&org), issued.cert.id)),
        Err(e @ (Error::InvalidInput(_) | Error::Conflict(_) | Error::Forbidden(_))) => {
            upload_failed(&v, &o, &app, t, key, Some(id), csr, e).await
        }
        Err(e) => v.fail(Some(&o), e).await,
    }
}
