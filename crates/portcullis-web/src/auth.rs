//! The Auth API (`/api/v1/sessions…`, `/api/v1/api-keys…`, `/api/v1/me…`,
//! `/api/v1/password-reset…`): login sessions confirmed by an emailed code, API keys, and a
//! signed-in user's own addresses and password. Answers that carry a secret are `no-store`.

use axum::Json;
use axum::body::Body;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use portcullis_core::Portcullis;
use portcullis_core::clock::rfc3339;
use portcullis_core::usecases::*;
use secrecy::ExposeSecret;

use crate::AppState;
use crate::admin::{Admin, PageQuery, bearer, user_json};
use crate::body::json_body;
use crate::error::ApiError;

/// The raw session token of a request (`Authorization: Bearer pcs_…`) and its context.
pub struct SessionToken(pub String, pub RequestContext);

impl FromRequestParts<AppState> for SessionToken {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &AppState) -> Result<Self, ApiError> {
        let ctx = parts.extensions.get::<RequestContext>().cloned().unwrap_or_default();
        let t = bearer(parts)?;
        if !t.starts_with(SESSION_TOKEN_PREFIX) {
            return Err(ApiError::Unauthenticated {
                description: format!("a session token ({SESSION_TOKEN_PREFIX}…) is required here"),
                invalid_token: true,
            });
        }
        Ok(SessionToken(t.to_owned(), ctx))
    }
}

/// The request's context (client IP, request id) for use cases that need no credential.
pub struct Ctx(pub RequestContext);

impl FromRequestParts<AppState> for Ctx {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &AppState) -> Result<Self, ApiError> {
        Ok(Ctx(parts.extensions.get::<RequestContext>().cloned().unwrap_or_default()))
    }
}

fn no_store(status: StatusCode, v: serde_json::Value) -> Response {
    let mut r = (status, Json(v)).into_response();
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r.headers_mut().insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    r
}

// ---- sessions ------------------------------------------------------------------------------

pub async fn login(
    State(s): State<AppState>,
    Ctx(ctx): Ctx,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let req: LoginRequest = json_body(&headers, body).await?;
    let ua = headers.get(header::USER_AGENT).and_then(|v| v.to_str().ok());
    let p = s.core.login(&ctx, req, ua).await?;
    Ok(no_store(
        StatusCode::ACCEPTED,
        serde_json::json!({
            "session_token": p.session_token.expose_secret(),
            "verification_id": p.verification_id,
            "expires_at": rfc3339(p.expires_at),
        }),
    ))
}

pub async fn verify_session(
    State(s): State<AppState>,
    Ctx(ctx): Ctx,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let sub: CodeSubmission = json_body(&headers, body).await?;
    let v = s.core.verify_session(&ctx, sub).await?;
    Ok(no_store(
        StatusCode::OK,
        serde_json::json!({
            "session_token": v.session_token.expose_secret(),
            "expires_at": rfc3339(v.expires_at),
            "user": UserView::from(&v.user),
            "organisation": v.org_slug,
            "roles": v.user.roles,
        }),
    ))
}

pub async fn refresh_session(
    State(s): State<AppState>,
    SessionToken(token, ctx): SessionToken,
) -> Result<Response, ApiError> {
    let (new, expires_at) = s.core.refresh_session(&ctx, &token).await?;
    Ok(no_store(
        StatusCode::OK,
        serde_json::json!({ "session_token": new.expose_secret(), "expires_at": rfc3339(expires_at) }),
    ))
}

/// Validation: cheap (cache, keyed hash), read-only.
pub async fn current_session(
    State(s): State<AppState>,
    SessionToken(token, ctx): SessionToken,
) -> Result<Response, ApiError> {
    let e = s.core.validate_session(&ctx, &token).await?;
    Ok(no_store(
        StatusCode::OK,
        serde_json::json!({
            "id": e.session.id,
            "user_id": e.user.id,
            "email": e.user.email,
            "organisation": e.org_slug,
            "roles": e.user.roles,
            "expires_at": rfc3339(e.session.expires_at),
        }),
    ))
}

pub async fn revoke_current_session(
    State(s): State<AppState>,
    SessionToken(token, ctx): SessionToken,
) -> Result<StatusCode, ApiError> {
    let e = s.core.validate_session(&ctx, &token).await?;
    let who = Portcullis::session_principal(&e);
    s.core.revoke_session(&ctx, &who, &e.session.id).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn my_sessions(
    State(s): State<AppState>,
    Admin(who, _): Admin,
    Query(q): Query<PageQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let list = s.core.my_sessions(&who, q.page()).await?;
    let current = match &who.credential {
        Credential::Session { id } => Some(id.clone()),
        _ => None,
    };
    let items: Vec<_> = list
        .iter()
        .map(|x| {
            let mut v = serde_json::to_value(SessionView::from(x)).unwrap_or_default();
            if let Some(o) = v.as_object_mut() {
                o.insert("current".into(), (Some(&x.id) == current.as_ref()).into());
            }
            v
        })
        .collect();
    Ok(Json(serde_json::json!({ "items": items })))
}

pub async fn revoke_my_session(
    State(s): State<AppState>,
    Admin(who, ctx): Admin,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    s.core.revoke_session(&ctx, &who, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---- API keys ------------------------------------------------------------------------------

pub async fn create_api_key(
    State(s): State<AppState>,
    Admin(who, ctx): Admin,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let req: NewApiKey = json_body(&headers, body).await?;
    let c = s.core.create_api_key(&ctx, &who, req).await?;
    Ok(no_store(
        StatusCode::ACCEPTED,
        serde_json::json!({
            "id": c.key.id,
            "name": c.key.name,
            "api_key": c.key.key,
            "api_secret": c.api_secret.expose_secret(),
            "verification_id": c.verification_id,
            "roles": c.key.roles,
            "expires_at": c.key.expires_at.map(rfc3339),
            "state": c.key.state,
        }),
    ))
}

pub async fn verify_api_key(
    State(s): State<AppState>,
    Ctx(ctx): Ctx,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<ApiKeyView>, ApiError> {
    let sub: CodeSubmission = json_body(&headers, body).await?;
    let k = s.core.verify_api_key(&ctx, sub).await?;
    Ok(Json(ApiKeyView::from(&k)))
}

pub async fn my_api_keys(
    State(s): State<AppState>,
    Admin(who, _): Admin,
    Query(q): Query<PageQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let list = s.core.my_api_keys(&who, None, q.page()).await?;
    Ok(Json(serde_json::json!({ "items": list.iter().map(ApiKeyView::from).collect::<Vec<_>>() })))
}

pub async fn revoke_my_api_key(
    State(s): State<AppState>,
    Admin(who, ctx): Admin,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    s.core.revoke_api_key(&ctx, &who, None, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---- me ------------------------------------------------------------------------------------

pub async fn me(State(s): State<AppState>, Admin(who, _): Admin) -> Result<Json<serde_json::Value>, ApiError> {
    let (u, emails) = s.core.me(&who).await?;
    let mut v = user_json(&u, &emails);
    if let Some(o) = v.as_object_mut() {
        o.insert("organisation".into(), who.org.clone().into());
    }
    Ok(Json(v))
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewEmail {
    email: String,
}

pub async fn add_email(
    State(s): State<AppState>,
    Admin(who, ctx): Admin,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let req: NewEmail = json_body(&headers, body).await?;
    let (row, verification_id) = s.core.add_email(&ctx, &who, &req.email).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::json!({ "id": row.id, "email": row.email, "verification_id": verification_id })),
    )
        .into_response())
}

pub async fn verify_email(
    State(s): State<AppState>,
    Ctx(ctx): Ctx,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<serde_json::Value>, ApiError> {
    let sub: CodeSubmission = json_body(&headers, body).await?;
    let e = s.core.verify_email(&ctx, sub).await?;
    Ok(Json(serde_json::json!({ "id": e.id, "email": e.email, "verified": true })))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CurrentPassword {
    current_password: secrecy::SecretString,
}

pub async fn make_primary_email(
    State(s): State<AppState>,
    Admin(who, ctx): Admin,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<StatusCode, ApiError> {
    let req: CurrentPassword = json_body(&headers, body).await?;
    s.core.make_primary_email(&ctx, &who, &id, req.current_password).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn remove_email(
    State(s): State<AppState>,
    Admin(who, ctx): Admin,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    s.core.remove_email(&ctx, &who, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn change_password(
    State(s): State<AppState>,
    Admin(who, ctx): Admin,
    headers: HeaderMap,
    body: Body,
) -> Result<StatusCode, ApiError> {
    let req: PasswordChange = json_body(&headers, body).await?;
    s.core.change_password(&ctx, &who, req).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn request_password_reset(
    State(s): State<AppState>,
    Ctx(ctx): Ctx,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let req: ResetRequest = json_body(&headers, body).await?;
    let verification_id = s.core.request_password_reset(&ctx, req).await?;
    Ok((StatusCode::ACCEPTED, Json(serde_json::json!({ "verification_id": verification_id }))).into_response())
}

pub async fn confirm_password_reset(
    State(s): State<AppState>,
    Ctx(ctx): Ctx,
    headers: HeaderMap,
    body: Body,
) -> Result<StatusCode, ApiError> {
    let req: ResetConfirmation = json_body(&headers, body).await?;
    s.core.confirm_password_reset(&ctx, req).await?;
    Ok(StatusCode::NO_CONTENT)
}
