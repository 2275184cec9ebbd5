//! Certificate authority endpoints (DESIGN §4): certificate types, CSR templates, issuance,
//! the inventory, revocation and renewal under `/api/v1/organisations/{org}/…`; the public
//! trust chain and CRLs under `/pki/…`; renewal over mTLS (`POST /pki/renew`); and each
//! application's JWKS built from its signing certificates.

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use portcullis_core::model::Page;
use portcullis_core::usecases::{CertificateQuery, NewCertificate, RequestContext};
use serde::Deserialize;

use crate::AppState;
use crate::admin::Admin;
use crate::body::{json_body, optional_json_body};
use crate::error::ApiError;
use crate::tls::PeerCertificate;

fn pem_response(body: String) -> Response {
    ([(header::CONTENT_TYPE, HeaderValue::from_static("application/x-pem-file"))], body).into_response()
}

fn no_store(mut r: Response) -> Response {
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

pub async fn certificate_types(State(s): State<AppState>) -> Json<serde_json::Value> {
    Json(s.core.certificate_types())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateQuery {
    #[serde(rename = "type")]
    cert_type: Option<String>,
    key: Option<String>,
}

pub async fn csr_template(
    State(s): State<AppState>,
    Admin(who, _): Admin,
    Path((org, app)): Path<(String, String)>,
    Query(q): Query<TemplateQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let t = q.cert_type.as_deref().unwrap_or("transport");
    let tpl = s.core.csr_template(&who, &org, &app, t, q.key.as_deref()).await?;
    Ok(Json(serde_json::to_value(tpl).map_err(portcullis_core::Error::internal)?))
}

pub async fn issue(
    State(s): State<AppState>,
    Admin(who, ctx): Admin,
    Path(org): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let req: NewCertificate = json_body(&headers, body).await?;
    let issued = s.core.issue_certificate(&who, &ctx, &org, req).await?;
    let location = format!("/api/v1/organisations/{org}/certificates/{}", issued.cert.id);
    let mut r = (StatusCode::CREATED, Json(issued)).into_response();
    if let Ok(v) = HeaderValue::from_str(&location) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    Ok(r)
}

pub async fn list(
    State(s): State<AppState>,
    Admin(who, _): Admin,
    Path(org): Path<String>,
    Query(q): Query<CertificateQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let page = Page::new(q.limit, q.offset);
    let items = s.core.certificates(&who, &org, q, page).await?;
    Ok(Json(serde_json::json!({ "items": items })))
}

pub async fn get_one(
    State(s): State<AppState>,
    Admin(who, _): Admin,
    Path((org, id)): Path<(String, String)>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let c = s.core.certificate(&who, &org, &id).await?;
    Ok(Json(serde_json::to_value(c).map_err(portcullis_core::Error::internal)?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PemQuery {
    /// Append the chain (issuing CA, root) after the certificate.
    chain: Option<bool>,
}

pub async fn pem(
    State(s): State<AppState>,
    Admin(who, _): Admin,
    Path((org, id)): Path<(String, String)>,
    Query(q): Query<PemQuery>,
) -> Result<Response, ApiError> {
    let c = s.core.certificate(&who, &org, &id).await?;
    let mut body = c.cert.certificate_pem;
    if q.chain.unwrap_or(false) {
        body.push_str(&c.chain_pem);
    }
    Ok(pem_response(body))
}

pub async fn chain(
    State(s): State<AppState>,
    Admin(who, _): Admin,
    Path((org, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    Ok(pem_response(s.core.certificate(&who, &org, &id).await?.chain_pem))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Revoke {
    reason: Option<String>,
}

pub async fn revoke(
    State(s): State<AppState>,
    Admin(who, ctx): Admin,
    Path((org, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<serde_json::Value>, ApiError> {
    let req: Revoke = optional_json_body(&headers, body).await?;
    let v = s.core.revoke_certificate(&who, &ctx, &org, &id, req.reason.as_deref().unwrap_or("unspecified")).await?;
    Ok(Json(serde_json::to_value(v).map_err(portcullis_core::Error::internal)?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Renew {
    csr: String,
    validity_days: Option<i64>,
}

pub async fn renew(
    State(s): State<AppState>,
    Admin(who, ctx): Admin,
    Path((org, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let req: Renew = json_body(&headers, body).await?;
    let issued = s.core.renew_certificate(&who, &ctx, &org, &id, &req.csr, req.validity_days).await?;
    Ok((StatusCode::CREATED, Json(issued)).into_response())
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelfRenew {
    csr: Option<String>,
}

/// `POST /pki/renew` on the TLS listener: the client certificate renews itself (same key
/// without a body, or a new key with `{csr}`).
pub async fn renew_over_mtls(
    State(s): State<AppState>,
    peer: Option<axum::Extension<PeerCertificate>>,
    ctx: Option<axum::Extension<RequestContext>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let Some(axum::Extension(peer)) = peer else {
        return Err(ApiError::Unauthenticated {
            description: "renewal over mTLS needs a client certificate on the TLS listener".into(),
            invalid_token: false,
        });
    };
    let req: SelfRenew = optional_json_body(&headers, body).await?;
    let ctx = ctx.map(|c| c.0).unwrap_or_default();
    let issued = s.core.renew_by_certificate(&ctx, &peer.0, req.csr.as_deref()).await?;
    Ok((StatusCode::CREATED, Json(issued)).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrganisationPatch {
    #[serde(default)]
    allowed_domains: Option<Vec<String>>,
    #[serde(default)]
    self_registration: Option<bool>,
}

/// `PATCH /api/v1/organisations/{org}` — the allowed domains of `server-transport` certificates.
pub async fn update_organisation(
    State(s): State<AppState>,
    Admin(who, ctx): Admin,
    Path(org): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<serde_json::Value>, ApiError> {
    let req: OrganisationPatch = json_body(&headers, body).await?;
    if req.allowed_domains.is_none() && req.self_registration.is_none() {
        return Err(ApiError::BadRequest("nothing to change: give allowed_domains and/or self_registration".into()));
    }
    if let Some(enabled) = req.self_registration {
        s.core.set_self_registration(&who, &ctx, &org, enabled).await?;
    }
    let o = match req.allowed_domains {
        Some(d) => s.core.set_organisation_domains(&who, &ctx, &org, d).await?,
        None => s.core.organisation(&who, &org).await?,
    };
    Ok(Json(crate::admin::org_json(&o)))
}

// ---- public -------------------------------------------------------------------------------

pub async fn ca_pem(State(s): State<AppState>) -> Response {
    let mut r = pem_response(s.core.ca_set().chain_pem());
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=300"));
    r
}

fn crl_response(der: Vec<u8>) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static("application/pkix-crl")),
            // Short: a revocation must reach relying parties within seconds.
            (header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=5")),
        ],
        der,
    )
        .into_response()
}

pub async fn crl(State(s): State<AppState>) -> Result<Response, ApiError> {
    let crl = s
        .core
        .current_crl()
        .ok_or_else(|| portcullis_core::Error::internal("no CRL is loaded for the active issuing CA"))?;
    Ok(crl_response(crl.der.clone()))
}

pub async fn crl_of(State(s): State<AppState>, Path(issuer): Path<String>) -> Result<Response, ApiError> {
    let crl =
        s.core.crl_of(&issuer).ok_or_else(|| portcullis_core::Error::NotFound(format!("CRL of issuer {issuer:?}")))?;
    Ok(crl_response(crl.der.clone()))
}

pub async fn crl_pem(State(s): State<AppState>) -> Response {
    let mut r = pem_response(s.core.crls_pem());
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=5"));
    r
}

pub async fn application_jwks(State(s): State<AppState>, Path(client_id): Path<String>) -> Result<Response, ApiError> {
    let doc = s.core.application_jwks(&client_id).await?;
    Ok(no_store(
        ([(header::CONTENT_TYPE, HeaderValue::from_static("application/jwk-set+json"))], doc.to_string())
            .into_response(),
    ))
}
