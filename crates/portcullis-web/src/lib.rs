//! Portcullis's HTTP surface on axum: OAuth 2.0 endpoints, the admin API, health and metrics.
//! The only place that turns core errors into status codes (see [`error`]). One middleware
//! gives every request an id, times it, counts it by route and status, makes sure every
//! error response carries `x-error` and `x-error-id`, and notes writes refused for a full disk
//! for `/readyz` to report.

pub mod admin;
pub mod auth;
pub mod body;
pub mod error;
pub mod gateway_api;
pub mod oauth;
pub mod oidc;
pub mod pages;
pub mod pki;
pub mod portal;
pub mod tls;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Extension, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use portcullis_core::Portcullis;
use portcullis_core::usecases::RequestContext;

#[derive(Clone)]
pub struct AppState {
    pub core: Arc<Portcullis>,
    pub metrics: Option<PrometheusHandle>,
}

pub fn router(state: AppState) -> Router {
    use admin as a;
    use auth as au;
    let org = "/api/v1/organisations/{org}";
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_page))
        .route("/.well-known/openid-configuration", get(oauth::discovery))
        .route("/.well-known/oauth-authorization-server", get(oauth::discovery))
        .route("/oauth2/jwks", get(oauth::jwks))
        .route("/assets/portcullis.css", get(pages::css))
        .route("/assets/form-post.js", get(pages::form_post_js))
        .route("/oauth2/token", post(oauth::token))
        .route("/oauth2/introspect", post(oauth::introspect))
        .route("/oauth2/revoke", post(oauth::revoke))
        .route("/oauth2/authorize", get(oidc::authorize).post(oidc::authorize))
        .route("/oauth2/consent", post(oidc::consent))
        .route("/oauth2/userinfo", get(oidc::userinfo).post(oidc::userinfo))
        .route("/oauth2/logout", get(oidc::logout).post(oidc::logout))
        .route("/login", get(oidc::login_form).post(oidc::login_submit))
        .route("/login/code", get(oidc::code_form).post(oidc::code_submit))
        .route("/login/totp", get(oidc::totp_form).post(oidc::totp_submit))
        .route("/account", get(oidc::account))
        .route("/account/consents/revoke", post(oidc::revoke_consent))
        .route("/account/totp", get(oidc::totp_enrol_form).post(oidc::totp_enrol_submit))
        .route("/invite", get(oidc::invite_form).post(oidc::invite_submit))
        .route("/register", get(oidc::register_form).post(oidc::register_submit))
        .route(&format!("{org}/invitations"), post(oidc::invite_api))
        .route(&format!("{org}/users/{{id}}/invitation"), post(oidc::resend_invitation))
        .route(&format!("{org}/users/{{id}}/totp"), delete(oidc::reset_totp))
        .route("/api/v1/sessions", post(au::login).get(au::my_sessions))
        .route("/api/v1/sessions/verify", post(au::verify_session))
        .route("/api/v1/sessions/refresh", post(au::refresh_session))
        .route("/api/v1/sessions/current", get(au::current_session).delete(au::revoke_current_session))
        .route("/api/v1/sessions/{id}", delete(au::revoke_my_session))
        .route("/api/v1/api-keys", post(au::create_api_key).get(au::my_api_keys))
        .route("/api/v1/api-keys/verify", post(au::verify_api_key))
        .route("/api/v1/api-keys/{id}", delete(au::revoke_my_api_key))
        .route("/api/v1/me", get(au::me))
        .route("/api/v1/me/password", post(au::change_password))
        .route("/api/v1/me/emails", post(au::add_email))
        .route("/api/v1/me/emails/verify", post(au::verify_email))
        .route("/api/v1/me/emails/{id}", delete(au::remove_email))
        .route("/api/v1/me/emails/{id}/primary", post(au::make_primary_email))
        .route("/api/v1/password-reset", post(au::request_password_reset))
        .route("/api/v1/password-reset/confirm", post(au::confirm_password_reset))
        .route("/api/v1/organisations", post(a::create_organisation).get(a::organisations))
        .route(org, get(a::organisation).patch(pki::update_organisation))
        .route("/api/v1/pki/certificate-types", get(pki::certificate_types))
        .route(&format!("{org}/applications/{{app}}/csr-template"), get(pki::csr_template))
        .route(&format!("{org}/certificates"), post(pki::issue).get(pki::list))
        .route(&format!("{org}/certificates/{{id}}"), get(pki::get_one))
        .route(&format!("{org}/certificates/{{id}}/pem"), get(pki::pem))
        .route(&format!("{org}/certificates/{{id}}/chain"), get(pki::chain))
        .route(&format!("{org}/certificates/{{id}}/revoke"), post(pki::revoke))
        .route(&format!("{org}/certificates/{{id}}/renew"), post(pki::renew))
        .route("/pki/ca.pem", get(pki::ca_pem))
        .route("/pki/crl", get(pki::crl))
        .route("/pki/crl.pem", get(pki::crl_pem))
        .route("/pki/crl/{issuer}", get(pki::crl_of))
        .route("/pki/renew", post(pki::renew_over_mtls))
        .route("/applications/{client_id}/jwks.json", get(pki::application_jwks))
        .route(&format!("{org}/services"), post(a::create_service).get(a::services))
        .route(&format!("{org}/services/{{svc}}"), get(a::service).delete(a::delete_service))
        .route(&format!("{org}/roles"), get(a::roles))
        .route(&format!("{org}/roles/{{role}}"), put(a::set_role))
        .route(&format!("{org}/applications"), post(a::create_application).get(a::applications))
        .route(
            &format!("{org}/applications/{{app}}"),
            get(a::application).patch(a::update_application).delete(a::delete_application),
        )
        .route(&format!("{org}/applications/{{app}}/rotate-secret"), post(a::rotate_secret))
        .route(&format!("{org}/users"), post(a::create_user).get(a::users))
        .route(&format!("{org}/users/{{id}}"), get(a::user).patch(a::update_user).delete(a::delete_user))
        .route(&format!("{org}/users/{{id}}/roles/{{role}}"), put(a::grant_user_role).delete(a::revoke_user_role))
        .route(&format!("{org}/users/{{id}}/sessions"), get(a::user_sessions).delete(a::revoke_user_sessions))
        .route(&format!("{org}/sessions/{{id}}"), delete(a::revoke_session))
        .route(&format!("{org}/api-keys"), get(a::org_api_keys))
        .route(&format!("{org}/api-keys/{{id}}"), delete(a::revoke_org_api_key))
        .route(&format!("{org}/audit-events"), get(a::audit_events))
        .route("/api/v1/authz/check", post(a::authz_check))
        .route("/api/v1/keys/rotate", post(a::rotate_keys))
        .route("/api/v1/gateway/trust", get(gateway_api::trust))
        .route("/api/v1/gateway/grants", get(gateway_api::grants))
        .route("/api/v1/gateway/changes", get(gateway_api::changes))
        .route("/api/v1/gateway/api-keys/check", post(gateway_api::check_api_key))
        .route("/api/v1/gateway/sessions/check", post(gateway_api::check_session))
        .route("/api/v1/gateway/browser-sessions", post(gateway_api::browser_session))
        .route("/api/v1/gateway/certificates/check", post(gateway_api::check_certificate))
        .route("/api/v1/gateway/certificates", post(gateway_api::issue_certificate))
        .merge(portal::routes())
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(panicked))
        .layer(middleware::from_fn(observe))
        .layer(Extension(Arc::new(StorageWatch::default())))
        .with_state(state)
}

/// How long `/readyz` keeps reporting a full disk after the last write it refused, unless a
/// write succeeds before.
const STORAGE_FULL_REPORTED: Duration = Duration::from_secs(60);

/// Whether writes were recently refused for a full disk: set by every such refusal (507, or an
/// OAuth endpoint's 503 saying so), cleared by a 201 (something was written since) or once
/// [`STORAGE_FULL_REPORTED`] has passed without another refusal. What `/readyz` reports.
#[derive(Debug, Default)]
struct StorageWatch {
    last_refusal: Mutex<Option<Instant>>,
}

impl StorageWatch {
    fn observe(&self, resp: &Response) {
        let full = resp.status() == StatusCode::INSUFFICIENT_STORAGE
            || resp
                .headers()
                .get(&error::X_ERROR)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.contains(portcullis_core::error::STORAGE_FULL));
        if full {
            *self.last_refusal.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        } else if resp.status() == StatusCode::CREATED {
            *self.last_refusal.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
    }

    fn full(&self) -> bool {
        self.last_refusal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|at| at.elapsed() < STORAGE_FULL_REPORTED)
    }
}

/// A client-supplied request id is kept only if it is short and plain (no log injection).
fn request_id(req: &Request) -> String {
    req.headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| (1..=64).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)))
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::now_v7().simple().to_string())
}

async fn observe(mut req: Request, next: Next) -> Response {
    let start = Instant::now();
    let id = request_id(&req);
    let ip = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip().to_string());
    let route =
        req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned()).unwrap_or_else(|| "unmatched".into());
    let method = req.method().clone();
    let storage = req.extensions().get::<Arc<StorageWatch>>().cloned();
    req.extensions_mut().insert(RequestContext { ip, request_id: Some(id.clone()) });
    // A NUL byte has no use in a path or query and PostgreSQL refuses it in text: stop it here
    // rather than let it become a 500 deep inside.
    if req.uri().path_and_query().is_some_and(|pq| pq.as_str().contains("%00")) {
        let mut resp = error::ApiError::BadRequest("the URL must not contain NUL bytes (%00)".into()).into_response();
        if let Ok(v) = HeaderValue::from_str(&id) {
            resp.headers_mut().insert("x-request-id", v);
        }
        return resp;
    }
    let span = tracing::debug_span!("request", request_id = %id, %method, route = %route);
    let mut resp = tracing::Instrument::instrument(next.run(req), span).await;
    error::ensure_error_headers(&mut resp);
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    if let Some(w) = storage {
        w.observe(&resp);
    }
    let status = resp.status().as_u16();
    let elapsed = start.elapsed().as_secs_f64();
    metrics::counter!("portcullis_http_requests_total", "route" => route.clone(), "status" => status.to_string())
        .increment(1);
    metrics::histogram!("portcullis_http_request_duration_seconds", "route" => route.clone()).record(elapsed);
    if status >= 400 {
        let text =
            |h: &axum::http::HeaderName| resp.headers().get(h).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        tracing::info!(
            request_id = %id,
            %method,
            route = %route,
            status,
            error_id = %text(&error::X_ERROR_ID),
            error = %text(&error::X_ERROR),
            "request refused"
        );
    } else {
        tracing::debug!(request_id = %id, %method, route = %route, status, elapsed_ms = elapsed * 1e3, "request");
    }
    resp
}

/// A panic anywhere below (ours are linted away; a dependency's are not) becomes a plain 500
/// with the error headers, never a dropped connection or a leaked message.
fn panicked(err: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let what = err
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| err.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_owned());
    error::ApiError::Core(portcullis_core::Error::Internal(format!("handler panicked: {what}"))).into_response()
}

async fn healthz() -> &'static str {
    "ok"
}

/// Ready when the database answers and signing keys are loaded. `storage` says `full` while
/// writes are being refused for a full disk ([`StorageWatch`]); that alone does not make the
/// node unready: it still serves everything that writes nothing (client-credentials tokens,
/// validation, JWKS), and every node on the same database would drop out at once.
async fn readyz(State(s): State<AppState>, Extension(storage): Extension<Arc<StorageWatch>>) -> Response {
    let db = s.core.store().ping().await;
    if let Err(e) = &db {
        tracing::warn!(error = %e, "readiness: database unreachable");
    }
    let keys = s.core.keys_loaded();
    let storage = if storage.full() { "full" } else { "ok" };
    let body = serde_json::json!({ "database": db.is_ok(), "keys": keys, "storage": storage });
    if db.is_ok() && keys {
        axum::Json(body).into_response()
    } else {
        let mut r = (StatusCode::SERVICE_UNAVAILABLE, axum::Json(body)).into_response();
        let id = error::new_error_id();
        r.headers_mut().insert(
            error::X_ERROR.clone(),
            HeaderValue::from_static("not ready: database unreachable or keys not loaded"),
        );
        r.headers_mut().insert(error::X_ERROR_ID.clone(), error::header_text(&id));
        r
    }
}

async fn metrics_page(State(s): State<AppState>) -> Response {
    match &s.metrics {
        Some(h) => ([(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4"))], h.render())
            .into_response(),
        None => (StatusCode::NOT_FOUND, "metrics are not enabled").into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_watch_reports_a_full_disk_until_something_is_created() {
        let w = StorageWatch::default();
        let full = error::ApiError::Core(portcullis_core::Error::Store(portcullis_core::StoreError::Full("x".into())))
            .into_response();
        let oauth_full = error::OAuthApiError::from(portcullis_core::OAuthError::from(
            portcullis_core::StoreError::Full("x".into()),
        ))
        .into_response();
        assert!(!w.full());
        w.observe(&StatusCode::OK.into_response());
        assert!(!w.full());
        w.observe(&full);
        assert!(w.full());
        w.observe(&StatusCode::OK.into_response());
        assert!(w.full(), "a read says nothing about writes");
        w.observe(&StatusCode::CREATED.into_response());
        assert!(!w.full(), "a write went through");
        w.observe(&oauth_full);
        assert!(w.full(), "the OAuth endpoints' 503 for a full disk counts too");
        *w.last_refusal.lock().unwrap() = Instant::now().checked_sub(STORAGE_FULL_REPORTED);
        assert!(!w.full(), "reported for a while only");
    }

    #[test]
    fn a_panic_becomes_an_opaque_500_with_error_headers() {
        let r = panicked(Box::new("secret internal detail"));
        assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let x = r.headers().get(&error::X_ERROR).unwrap().to_str().unwrap();
        assert!(x.starts_with("internal error") && !x.contains("secret"), "{x}");
        assert!(r.headers().contains_key(&error::X_ERROR_ID));
    }
}
