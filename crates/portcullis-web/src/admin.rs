//! The admin API (`/api/v1/…`): bearer-authenticated JSON endpoints over the core's admin use
//! cases. Authorization decisions are the core's; this module only speaks HTTP.

use axum::Json;
use axum::body::Body;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use portcullis_core::Portcullis;
use portcullis_core::model::{Application, AuditFilter, Organisation, Page, Service};
use portcullis_core::usecases::*;
use secrecy::ExposeSecret;
use serde::Deserialize;

use crate::AppState;
use crate::body::{json_body, optional_json_body};
use crate::error::ApiError;

/// The authenticated caller of an admin endpoint.
pub struct Admin(pub Principal, pub RequestContext);

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    /// `api-key` + `api-secret` headers, or `Authorization: Bearer` with a session token
    /// (`pcs_…`) or an access token (JWT).
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let ctx = parts.extensions.get::<RequestContext>().cloned().unwrap_or_default();
        if let Some(key) = parts.headers.get("api-key") {
            let secret = parts.headers.get("api-secret").and_then(|v| v.to_str().ok()).unwrap_or_default();
            let key = key.to_str().unwrap_or_default();
            if secret.is_empty() {
                return Err(ApiError::Unauthenticated {
                    description: "the api-secret header is required with api-key".into(),
                    invalid_token: false,
                });
            }
            let principal = state.core.authenticate_api_key(&ctx, key, secret).await?;
            return Ok(Admin(principal, ctx));
        }
        let token = bearer(parts)?;
        let principal = if token.starts_with(SESSION_TOKEN_PREFIX) {
            Portcullis::session_principal(state.core.validate_session(&ctx, token).await?.as_ref())
        } else {
            state.core.principal_from_bearer(token, &ctx).await?
        };
        Ok(Admin(principal, ctx))
    }
}

/// The bearer token of a request (401 with a challenge when there is none).
pub fn bearer(parts: &Parts) -> Result<&str, ApiError> {
    let Some(value) = parts.headers.get(header::AUTHORIZATION) else {
        return Err(ApiError::Unauthenticated {
            description: "a bearer token (session or access token) or api-key and api-secret headers are required"
                .into(),
            invalid_token: false,
        });
    };
    let value = value.to_str().unwrap_or_default();
    match value.split_once(' ') {
        Some((scheme, t)) if scheme.eq_ignore_ascii_case("bearer") && !t.trim().is_empty() => Ok(t.trim()),
        _ => Err(ApiError::Unauthenticated {
            description: "the Authorization header must be 'Bearer <token>'".into(),
            invalid_token: true,
        }),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    limit: Option<u32>,
    offset: Option<u64>,
}

impl PageQuery {
    pub fn page(&self) -> Page {
        Page::new(self.limit, self.offset)
    }
}

pub(crate) fn org_json(o: &Organisation) -> serde_json::Value {
    serde_json::json!({
        "id": o.id, "slug": o.slug, "name": o.name, "allowed_domains": o.allowed_domains,
        "self_registration": o.self_registration, "created_at": o.created_at,
    })
}

fn service_json(s: &Service) -> serde_json::Value {
    serde_json::json!({
        "id": s.id, "slug": s.slug, "name": s.name, "audience": s.audience,
        "scopes": s.scopes, "roles": s.roles, "permissions": s.permissions, "created_at": s.created_at,
    })
}

fn app_json(a: &Application, org: &str) -> serde_json::Value {
    serde_json::to_value(ApplicationView::new(a, org)).unwrap_or_default()
}

fn created(v: serde_json::Value) -> Response {
    (StatusCode::CREATED, Json(v)).into_response()
}

pub async fn create_organisation(
    State(s): State<AppState>,
    Admin(who, ctx): Admin,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let req: NewOrganisation = json_body(&headers, body).await?;
    let org = s.core.create_organisation(&who, &ctx, req).await?;
    Ok(created(org_json(&org)))
}

pub async fn organisations(
    State(s): State<AppState>,
    Admin(who, _): Admin,
    Query(q): Query<PageQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let list = s.core.organisations(&who, q.page()).await?;
    Ok(Json(serde_json::json!({ "items": list.iter().map(org_json).collect::<Vec<_>>() })))
}

pub async fn organisation(
    State(s): State<AppState>,
    Admin(who, _): Admin,
    Path(org): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    Ok(Json(org_json(&s.core.organisation(&who, &org).await?)))
}

pub async fn create_service(
    State(s): State<AppState>,
    Admin(who, ctx): Admin,
    Path(org): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let req: NewService = json_body(&headers, body).await?;
    let svc = s.core.create_service(&who, &ctx, &org, req).await?;
    Ok(created(service_json(&svc)))
}

pub async fn services(
    State(s): State<AppState>,
    Admin(who, _): Admin,
    Path(org): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let list = s.core.services(&who, &org).await?;
    Ok(Json(serde_json::json!({ "items": list.iter().map(service_json).collect::<Vec<_>>() })))
}

pub async fn service(
    State(s): State<AppState>,
    Admin(who, _): Admin,
    Path((org, svc)): Path<(String, String)>,
) -> Result<Json<serde_json::Value>, ApiError> {
    Ok(Json(service_json(&s.core.service(&who, &org, &svc).await?)))
}

pub async fn delete_service(
    State(s): State<AppState>,
    Admin(who, ctx): Admin,
    Path((org, svc)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    s.core.delete_service(&who, &ctx, &org, &svc).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn roles(
    State(s): State<AppState>,
    Admin(who, _): Admin,
    Path(org): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let list = s.core.roles(&who, &org).await?;
    let items: Vec<_> = list.iter().map(|(r, p)| serde_json::json!({ "role": r, "permissions": p })).collect();
    Ok(Json(serde_json::json!({ "items": items })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolePermissions {
    permissions: Vec<String>,
}

pub async fn set_role(
    State(s): State<AppState>,
    Admin(who, ctx): Admin,
    Path((org, role)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<serde_json::Value>, ApiError> {
    let req: RolePermissions = json_body(&headers, body).await?;
    s.core.set_role_permissions(&who, &ctx, &org, &role, req.permissions.clone()).await?;
    Ok(Json(serde_json::json!({ "role": role, "permissions": req.permissions })))
}

pub async fn create_application(
    State(s): State<AppState>,
    Admin(who, ctx): Admin,
    Path(org): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let req: NewApplication = json_body(&headers, body).await?;
    let created_app = s.core.create_application(&who, &ctx, &org, req).await?;
    let mut v = app_json(&created_app.app, &org);
    if let (Some(secret), Some(obj)) = (&created_app.client_secret, v.as_object_mut()) {
        obj.insert("client_secret".into(), secret.expose_secret().into());
    }
    let mut r = created(v);
    r.headers_mut().insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-store"));
    Ok(r)
}

pub async fn applications(
    State(s): State<AppState>,
    Admin(who, _): Admin,
    Path(org): Path<String>,
    Query(q): Query<PageQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let list = s.core.applications(&who, &org, q.page()).await?;
    Ok(Json(serde_json::json!({ "items": list.iter().map(|a| app_json(a, &org)).collect::<Vec<_>>() })))
}

pub async fn application(
    State(s): State<AppState>,
    Admin(who, _): Admin,
    Path((org, app)): Path<(String, String)>,
) -> Result<Json<serde_json::Value>, ApiError> {
    Ok(Json(app_json(&s.core.application(&who, &org, &app).await?, &org)))
}

pub async fn update_application(
    State(s): State<AppState>,
    Admin(who, ctx): Admin,
    Path((org, app)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<serde_json::Value>, ApiError> {
    let patch: ApplicationPatch = json_body(&headers, body).await?;
    Ok(Json(app_json(&s.core.update_application(&who, &ctx, &org, &app, patch).await?, &org)))
}

pub async fn delete_application(
    State(s): State<AppState>,
    Admin(who, ctx): Admin,
    Path((org, app)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    s.core.delete_application(&who, &ctx, &org, &app).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn rotate_secret(
    State(s): State<AppState>,
    Admin(who, ctx): Admin,
    Path((org, app)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    // An empty body means "default grace period".
    let req: SecretRotation = optional_json_body(&headers, body).await?;
    let (a, secret) = s.core.rotate_client_secret(&who, &ctx, &org, &app, req).await?;
    let mut v = app_json(&a, &org);
    if let Some(obj) = v.as_object_mut() {
        obj.insert("client_secret".into(), secret.expose_secret().into());
    }
    let mut r = Json(v).into_response();
    r.headers_mut().insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-store"));
    Ok(r)
}

pub async fn create_user(
    State(s): State<AppState>,
    Admin(who, ctx): Admin,
    Path(org): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let req: NewUser = json_body(&headers, body).await?;
    let u = s.core.create_user(&who, &ctx, &org, req).await?;
    Ok(created(serde_json::to_value(UserView::from(&u)).unwrap_or_default()))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserQuery {
    q: Option<String>,
    limit: Option<u32>,
    offset: Option<u64>,
}

pub async fn users(
    State(s): State<AppState>,
    Admin(who, _): Admin,
    Path(org): Path<String>,
    Query(q): Query<UserQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let page = Page::new(q.limit, q.offset);
    let list = s.core.search_users(&who, &org, q.q.as_deref(), page).await?;
    Ok(Json(serde_json::json!({ "items": list.iter().map(UserView::from).collect::<Vec<_>>() })))
}

pub fn user_json(u: &portcullis_core::model::User, emails: &[portcullis_core::model::UserEmail]) -> serde_json::Value {
    let mut v = serde_json::to_value(UserView::from(u)).unwrap_or_default();
    if let Some(obj) = v.as_object_mut() {
        obj.insert("emails".into(), serde_json::to_value(email_views(u, emails)).unwrap_or_default());
    }
    v
}

pub async fn user(
    State(s): State<AppState>,
    Admin(who, _): Admin,
    Path((org, id)): Path<(String, String)>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let (u, emails) = s.core.user_with_emails(&who, &org, &id).await?;
    Ok(Json(user_json(&u, &emails)))
}

pub async fn update_user(
    State(s): State<AppState>,
    Admin(who, ctx): Admin,
    Path((org, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<serde_json::Value>, ApiError> {
    let patch: UserPatch = json_body(&headers, body).await?;
    let u = s.core.update_user(&who, &ctx, &org, &id, patch).await?;
    Ok(Json(serde_json::to_value(UserView::from(&u)).unwrap_or_default()))
}

pub async fn delete_user(
    State(s): State<AppState>,
    Admin(who, ctx): Admin,
    Path((org, id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    s.core.delete_user(&who, &ctx, &org, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn grant_user_role(
    State(s): State<AppState>,
    Admin(who, ctx): Admin,
    Path((org, id, role)): Path<(String, String, String)>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let u = s.core.set_user_role(&who, &ctx, &org, &id, &role, true).await?;
    Ok(Json(serde_json::to_value(UserView::from(&u)).unwrap_or_default()))
}

pub async fn revoke_user_role(
    State(s): State<AppState>,
    Admin(who, ctx): Admin,
    Path((org, id, role)): Path<(String, String, String)>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let u = s.core.set_user_role(&who, &ctx, &org, &id, &role, false).await?;
    Ok(Json(serde_json::to_value(UserView::from(&u)).unwrap_or_default()))
}

pub async fn user_sessions(
    State(s): State<AppState>,
    Admin(who, _): Admin,
    Path((org, id)): Path<(String, String)>,
    Query(q): Query<PageQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let list = s.core.user_sessions(&who, &org, &id, q.page()).await?;
    Ok(Json(serde_json::json!({ "items": list.iter().map(SessionView::from).collect::<Vec<_>>() })))
}

pub async fn revoke_user_sessions(
    State(s): State<AppState>,
    Admin(who, ctx): Admin,
    Path((org, id)): Path<(String, String)>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let n = s.core.admin_revoke_user_sessions(&who, &ctx, &org, &id).await?;
    Ok(Json(serde_json::json!({ "revoked": n })))
}

pub async fn revoke_session(
    State(s): State<AppState>,
    Admin(who, ctx): Admin,
    Path((org, id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    s.core.admin_revoke_session(&who, &ctx, &org, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyQuery {
    user_id: Option<String>,
    limit: Option<u32>,
    offset: Option<u64>,
}

pub async fn org_api_keys(
    State(s): State<AppState>,
    Admin(who, _): Admin,
    Path(org): Path<String>,
    Query(q): Query<KeyQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let list = s.core.org_api_keys(&who, &org, q.user_id.as_deref(), Page::new(q.limit, q.offset)).await?;
    Ok(Json(serde_json::json!({ "items": list.iter().map(ApiKeyView::from).collect::<Vec<_>>() })))
}

pub async fn revoke_org_api_key(
    State(s): State<AppState>,
    Admin(who, ctx): Admin,
    Path((org, id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    s.core.revoke_api_key(&ctx, &who, Some(&org), &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    action: Option<String>,
    actor: Option<String>,
    target: Option<String>,
    outcome: Option<String>,
    since: Option<i64>,
    until: Option<i64>,
    limit: Option<u32>,
    offset: Option<u64>,
}

pub async fn audit_events(
    State(s): State<AppState>,
    Admin(who, _): Admin,
    Path(org): Path<String>,
    Query(q): Query<AuditQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let filter = AuditFilter {
        action_prefix: q.action,
        actor: q.actor,
        target: q.target,
        outcome: q.outcome,
        since: q.since,
        until: q.until,
    };
    let list = s.core.audit_events(&who, &org, &filter, Page::new(q.limit, q.offset)).await?;
    Ok(Json(serde_json::json!({ "items": list })))
}

pub async fn authz_check(
    State(s): State<AppState>,
    Admin(who, _): Admin,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<AuthzDecision>, ApiError> {
    let req: AuthzCheck = json_body(&headers, body).await?;
    Ok(Json(s.core.authz_check(&who, req).await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotateQuery {
    #[serde(default)]
    force: bool,
}

pub async fn rotate_keys(
    State(s): State<AppState>,
    Admin(who, _): Admin,
    Query(q): Query<RotateQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    who.ensure_platform_admin()?;
    let kids = s.core.rotate_signing_keys(&who.subject, q.force).await?;
    Ok(Json(serde_json::json!({ "current": kids })))
}
