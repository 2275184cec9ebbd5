//! The control plane's internal endpoints for a standalone `portcullis gateway` (DESIGN §5;
//! wire format and rules in `docs/gateway-control-plane.md`). Every endpoint needs
//! `Authorization: Bearer <access token>` of an application holding `portcullis:gateway`
//! (401 without a valid token, 403 without the role). The use cases are the core's
//! (`usecases::gateway`); this module only speaks HTTP. DER values travel as standard base64
//! with padding; every answer is `Cache-Control: no-store`.
//!
//! The three credential checks answer 200 with a verdict (`valid` true or false, the refusal's
//! status and message); only a failure of the control plane itself (storage) is a 503.

use std::net::IpAddr;
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequestParts, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use portcullis_core::usecases::{GatewayCertPurpose, GatewayVerdict, Principal, RequestContext};
use portcullis_core::{Error, StoreError};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::AppState;
use crate::admin::bearer;
use crate::body::json_body;
use crate::error::ApiError;

/// Default and longest `wait` of `GET /api/v1/gateway/changes`, in seconds.
pub const DEFAULT_WAIT_SECS: u64 = 25;
pub const MAX_WAIT_SECS: u64 = 30;

/// The caller of a gateway endpoint: an application access token with `portcullis:gateway`.
pub struct GatewayCaller(pub Principal, pub RequestContext);

impl FromRequestParts<AppState> for GatewayCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let ctx = parts.extensions.get::<RequestContext>().cloned().unwrap_or_default();
        let token = bearer(parts)?;
        let who = state.core.principal_from_bearer(token, &ctx).await?;
        who.ensure_gateway()?;
        Ok(GatewayCaller(who, ctx))
    }
}

fn no_store(status: StatusCode, v: serde_json::Value) -> Response {
    let mut r = (status, Json(v)).into_response();
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn b64_all(ders: &[Vec<u8>]) -> Vec<String> {
    ders.iter().map(|d| B64.encode(d)).collect()
}

/// `GET /api/v1/gateway/trust` → `{"anchors": [...], "crls": [...]}`.
pub async fn trust(State(s): State<AppState>, _: GatewayCaller) -> Result<Response, ApiError> {
    let t = s.core.gateway_trust().await?;
    Ok(no_store(StatusCode::OK, serde_json::json!({ "anchors": b64_all(&t.anchors), "crls": b64_all(&t.crls) })))
}

/// `GET /api/v1/gateway/grants` → `{"grants": [{"org", "role", "permission"}, ...]}`.
pub async fn grants(State(s): State<AppState>, _: GatewayCaller) -> Result<Response, ApiError> {
    let grants: Vec<serde_json::Value> = s
        .core
        .gateway_grants()
        .await?
        .iter()
        .map(|g| serde_json::json!({ "org": g.org, "role": g.role, "permission": g.permission }))
        .collect();
    Ok(no_store(StatusCode::OK, serde_json::json!({ "grants": grants })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChangesQuery {
    pub cursor: Option<String>,
    /// Seconds, 0 to 30.
    pub wait: Option<u64>,
}

/// `GET /api/v1/gateway/changes?cursor=C&wait=S`: the long-polled change feed.
pub async fn changes(
    State(s): State<AppState>,
    _: GatewayCaller,
    q: Result<Query<ChangesQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::BadRequest(format!("invalid query: {}", e.body_text())))?;
    let wait = q.wait.unwrap_or(DEFAULT_WAIT_SECS);
    if wait > MAX_WAIT_SECS {
        return Err(ApiError::BadRequest(format!("wait must be 0 to {MAX_WAIT_SECS} seconds")));
    }
    let c = s.core.gateway_changes(q.cursor.as_deref(), Duration::from_secs(wait)).await?;
    let revoked: Vec<serde_json::Value> =
        c.revoked_tokens.iter().map(|t| serde_json::json!({ "jti": t.jti, "expires_at": t.expires_at })).collect();
    Ok(no_store(
        StatusCode::OK,
        serde_json::json!({
            "cursor": c.cursor, "revoked_tokens": revoked, "principals": c.principals, "grants": c.grants,
            "trust": c.trust, "keys": c.keys, "reset": c.reset,
        }),
    ))
}

/// `POST /api/v1/gateway/api-keys/check`. The secret never reaches a log (redacted `Debug`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyCheck {
    pub api_key: String,
    pub api_secret: SecretString,
    #[serde(default)]
    pub client_ip: Option<String>,
}

/// `POST /api/v1/gateway/sessions/check`. The token never reaches a log (redacted `Debug`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionCheck {
    pub session_token: SecretString,
    #[serde(default)]
    pub client_ip: Option<String>,
}

/// `POST /api/v1/gateway/browser-sessions`. The code and verifier never reach a log.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrowserSessionRequest {
    pub client_id: String,
    pub code: SecretString,
    pub code_verifier: SecretString,
    pub redirect_uri: String,
    #[serde(default)]
    pub client_ip: Option<String>,
}

impl std::fmt::Debug for BrowserSessionRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrowserSessionRequest")
            .field("client_id", &self.client_id)
            .field("redirect_uri", &self.redirect_uri)
            .finish_non_exhaustive()
    }
}

/// `POST /api/v1/gateway/certificates/check`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateCheck {
    /// The leaf, DER, standard base64.
    pub certificate: String,
}

/// `POST /api/v1/gateway/certificates`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateRequest {
    pub purpose: String,
    #[serde(default)]
    pub names: Vec<String>,
    /// PEM.
    pub csr: String,
}

fn client_ip(ip: Option<&str>) -> Result<Option<IpAddr>, ApiError> {
    ip.map(|s| {
        s.parse::<IpAddr>().map_err(|_| ApiError::BadRequest("client_ip must be an IPv4 or IPv6 address".into()))
    })
    .transpose()
}

/// A verdict as the wire has it; a failure of the control plane itself is a 503 (the data
/// plane must not cache it, nor mistake it for a refusal).
fn verdict_response(v: Result<GatewayVerdict, Error>) -> Result<Response, ApiError> {
    let body = match v {
        Ok(Ok(id)) => serde_json::json!({
            "valid": true,
            "identity": {
                "subject": id.subject, "client_id": id.client_id, "org": id.org,
                "roles": id.roles, "scopes": id.scopes,
            },
        }),
        Ok(Err(r)) => {
            let retry_after = (r.status == 429).then(|| r.retry_after_secs.unwrap_or(1));
            let mut body = serde_json::Map::new();
            body.insert("valid".into(), false.into());
            body.insert("status".into(), r.status.into());
            body.insert("message".into(), r.message.into());
            if let Some(secs) = retry_after {
                body.insert("retry_after".into(), secs.into());
            }
            serde_json::Value::Object(body)
        }
        Err(e) => return Err(ApiError::Core(Error::Store(StoreError::Unavailable(e.to_string())))),
    };
    Ok(no_store(StatusCode::OK, body))
}

pub async fn check_api_key(
    State(s): State<AppState>,
    _: GatewayCaller,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let req: ApiKeyCheck = json_body(&headers, body).await?;
    let ip = client_ip(req.client_ip.as_deref())?;
    verdict_response(s.core.gateway_api_key(&req.api_key, req.api_secret.expose_secret(), ip).await)
}

pub async fn check_session(
    State(s): State<AppState>,
    _: GatewayCaller,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let req: SessionCheck = json_body(&headers, body).await?;
    let ip = client_ip(req.client_ip.as_deref())?;
    verdict_response(s.core.gateway_session(req.session_token.expose_secret(), ip).await)
}

pub async fn check_certificate(
    State(s): State<AppState>,
    _: GatewayCaller,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let req: CertificateCheck = json_body(&headers, body).await?;
    let der = B64
        .decode(req.certificate.as_bytes())
        .ok()
        .filter(|d| !d.is_empty())
        .ok_or_else(|| ApiError::BadRequest("certificate must be the DER of the leaf, standard base64".into()))?;
    verdict_response(s.core.gateway_certificate(&der).await)
}

/// `POST /api/v1/gateway/browser-sessions`: a gateway finishing a browser sign-in redeems the
/// authorization code its own application was given. 200 `{"valid": true, "session_token",
/// "expires_at"}`, or a refusal as the checks give it.
pub async fn browser_session(
    State(s): State<AppState>,
    GatewayCaller(who, _): GatewayCaller,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let req: BrowserSessionRequest = json_body(&headers, body).await?;
    let ip = client_ip(req.client_ip.as_deref())?;
    // A gateway redeems only its own application's codes.
    if req.client_id != who.client_id {
        return Err(ApiError::Core(Error::Forbidden(format!(
            "a gateway redeems only codes of its own application ({}); sign-in application {:?} refused",
            who.client_id,
            req.client_id.chars().take(64).collect::<String>()
        ))));
    }
    let v = s
        .core
        .gateway_browser_session(
            &req.client_id,
            req.code.expose_secret(),
            req.code_verifier.expose_secret(),
            &req.redirect_uri,
            ip,
        )
        .await;
    let body = match v {
        Ok(Ok(session)) => serde_json::json!({
            "valid": true,
            "session_token": session.token.expose_secret(),
            "expires_at": session.expires_at,
        }),
        Ok(Err(r)) => return verdict_response(Ok(Err(r))),
        Err(e) => return verdict_response(Err(e)),
    };
    Ok(no_store(StatusCode::OK, body))
}

/// `POST /api/v1/gateway/certificates` → 201 `{"chain_pem", "not_after"}`.
pub async fn issue_certificate(
    State(s): State<AppState>,
    GatewayCaller(who, ctx): GatewayCaller,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let req: CertificateRequest = json_body(&headers, body).await?;
    let purpose = GatewayCertPurpose::parse(&req.purpose)?;
    let c = s.core.gateway_issue(&who, &ctx, purpose, &req.names, &req.csr).await?;
    Ok(no_store(StatusCode::CREATED, serde_json::json!({ "chain_pem": c.chain_pem, "not_after": c.not_after })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use portcullis_core::usecases::{GatewayIdentity, GatewayRefusal};

    #[test]
    fn secrets_in_request_bodies_never_show_in_debug() {
        let secret = "pks_the-secret-that-must-not-leak-0123456789";
        let k: ApiKeyCheck =
            serde_json::from_value(serde_json::json!({"api_key": "pk_abc", "api_secret": secret})).unwrap();
        let s: SessionCheck = serde_json::from_value(serde_json::json!({"session_token": secret})).unwrap();
        for d in [format!("{k:?}"), format!("{s:?}")] {
            assert!(!d.contains(secret) && !d.contains("the-secret"), "{d}");
        }
        assert!(format!("{k:?}").contains("pk_abc"), "the key id itself is not a secret");
        let unknown = serde_json::from_value::<SessionCheck>(serde_json::json!({"session_token": "x", "extra": 1}));
        assert!(unknown.is_err(), "unknown fields are refused");
    }

    async fn read(r: Response) -> (StatusCode, HeaderMap, serde_json::Value) {
        let status = r.status();
        let headers = r.headers().clone();
        let bytes = axum::body::to_bytes(r.into_body(), usize::MAX).await.unwrap();
        (status, headers, serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null))
    }

    #[tokio::test]
    async fn verdicts_are_200s_and_failures_503s() {
        let id = GatewayIdentity {
            subject: "u1".into(),
            client_id: "api-key".into(),
            org: "acme".into(),
            roles: vec!["payments:reader".into()],
            scopes: vec![],
        };
        let (s, h, v) = read(verdict_response(Ok(Ok(id))).unwrap()).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(h.get(header::CACHE_CONTROL).unwrap(), "no-store");
        assert_eq!(
            v,
            serde_json::json!({"valid": true, "identity": {"subject": "u1", "client_id": "api-key", "org": "acme",
                "roles": ["payments:reader"], "scopes": []}})
        );
        let refused = GatewayRefusal { status: 401, message: "API key was revoked".into(), retry_after_secs: None };
        let (s, _, v) = read(verdict_response(Ok(Err(refused))).unwrap()).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(v, serde_json::json!({"valid": false, "status": 401, "message": "API key was revoked"}));
        let limited = GatewayRefusal { status: 429, message: "slow down".into(), retry_after_secs: Some(30) };
        let (_, _, v) = read(verdict_response(Ok(Err(limited))).unwrap()).await;
        assert_eq!(v, serde_json::json!({"valid": false, "status": 429, "message": "slow down", "retry_after": 30}));
        for e in [Error::Store(StoreError::Internal("disk on fire".into())), Error::Internal("boom".into())] {
            let (s, h, _) = read(verdict_response(Err(e)).unwrap_err().into_response()).await;
            assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
            let x = h.get("x-error").unwrap().to_str().unwrap();
            assert!(!x.contains("fire") && !x.contains("boom"), "{x}");
            assert!(h.contains_key("x-error-id"));
        }
    }
}
