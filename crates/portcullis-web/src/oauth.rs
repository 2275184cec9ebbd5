//! OAuth 2.0 endpoints: discovery (both well-known paths), JWKS, token, introspection and
//! revocation. Client authentication is parsed here (HTTP Basic per RFC 6749 §2.3.1, or the
//! form) and checked by the core.

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use portcullis_core::OAuthError;
use portcullis_core::usecases::{ClientAuth, JWT_BEARER_ASSERTION, RequestContext, TokenParams};

use crate::tls::PeerCertificate;
use secrecy::SecretString;

use crate::AppState;
use crate::body::{Form, oauth_form};
use crate::error::OAuthApiError;

const AUTH_METHODS: [&str; 4] = ["client_secret_basic", "client_secret_post", "private_key_jwt", "tls_client_auth"];
/// The token endpoint also serves public clients (PKCE).
const TOKEN_AUTH_METHODS: [&str; 5] =
    ["client_secret_basic", "client_secret_post", "private_key_jwt", "tls_client_auth", "none"];

pub async fn discovery(State(s): State<AppState>) -> Response {
    let iss = s.core.issuer();
    let algs: Vec<&str> = s.core.settings().signing_algorithms.iter().map(|a| a.as_str()).collect();
    let doc = serde_json::json!({
        "issuer": iss,
        "authorization_endpoint": format!("{iss}/oauth2/authorize"),
        "token_endpoint": format!("{iss}/oauth2/token"),
        "userinfo_endpoint": format!("{iss}/oauth2/userinfo"),
        "end_session_endpoint": format!("{iss}/oauth2/logout"),
        "jwks_uri": format!("{iss}/oauth2/jwks"),
        "introspection_endpoint": format!("{iss}/oauth2/introspect"),
        "revocation_endpoint": format!("{iss}/oauth2/revoke"),
        "grant_types_supported": ["authorization_code", "client_credentials", "refresh_token"],
        "response_types_supported": ["code"],
        "response_modes_supported": ["query", "form_post"],
        "code_challenge_methods_supported": ["S256"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": algs,
        "userinfo_signing_alg_values_supported": [],
        "claims_supported": ["iss", "sub", "aud", "exp", "iat", "auth_time", "nonce", "at_hash", "amr", "acr", "sid", "azp", "email", "email_verified", "name", "preferred_username", "updated_at"],
        "acr_values_supported": [portcullis_core::usecases::ACR_2FA],
        "prompt_values_supported": ["none", "login", "consent", "select_account"],
        "backchannel_logout_supported": true,
        "backchannel_logout_session_supported": true,
        "authorization_response_iss_parameter_supported": true,
        "claims_parameter_supported": false,
        "request_parameter_supported": false,
        "request_uri_parameter_supported": false,
        "token_endpoint_auth_methods_supported": TOKEN_AUTH_METHODS,
        "token_endpoint_auth_signing_alg_values_supported": portcullis_core::crypto::jwk::ASSERTION_ALGORITHMS,
        "introspection_endpoint_auth_methods_supported": AUTH_METHODS,
        "revocation_endpoint_auth_methods_supported": AUTH_METHODS,
        "tls_client_certificate_bound_access_tokens": true,
        "access_token_signing_alg_values_supported": algs,
        "scopes_supported": portcullis_core::ids::STANDARD_SCOPES,
    });
    let mut r = Json(doc).into_response();
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=300"));
    r
}

static JWKS_CACHE_CONTROL: std::sync::LazyLock<HeaderValue> = std::sync::LazyLock::new(|| {
    HeaderValue::from_str(&format!("public, max-age={}", portcullis_core::settings::JWKS_MAX_AGE))
        .unwrap_or(HeaderValue::from_static("no-cache"))
});

pub async fn jwks(State(s): State<AppState>) -> Response {
    let body = s.core.jwks();
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static("application/jwk-set+json")),
            // Short: a rotated-in key must be seen well before it signs (see key_publish_delay).
            (header::CACHE_CONTROL, JWKS_CACHE_CONTROL.clone()),
        ],
        body.to_string(),
    )
        .into_response()
}

/// Decodes one half of HTTP Basic credentials: form-urlencoded per RFC 6749 §2.3.1 (clients
/// that do not encode send `$`, which decodes to itself).
fn basic_part(s: &str) -> String {
    if !s.contains(['%', '+']) {
        return s.to_owned();
    }
    form_urlencoded::parse(format!("x={s}").as_bytes()).next().map(|(_, v)| v.into_owned()).unwrap_or_default()
}

/// Works out how the client authenticated, refusing ambiguity (RFC 6749 §2.3): HTTP Basic,
/// `client_secret` in the form, a `client_assertion` (RFC 7523), or — when none of those is
/// present — the TLS client certificate with the form's `client_id` (RFC 8705).
fn client_auth(
    headers: &HeaderMap,
    form: &mut Form,
    peer: Option<&PeerCertificate>,
) -> Result<ClientAuth, OAuthApiError> {
    let basic = match headers.get(header::AUTHORIZATION) {
        None => None,
        Some(v) => {
            let v = v.to_str().unwrap_or_default();
            let (scheme, rest) = v.split_once(' ').unwrap_or((v, ""));
            if !scheme.eq_ignore_ascii_case("basic") {
                return Err(OAuthApiError::with_basic_challenge(OAuthError::invalid_client(
                    "unsupported authorization scheme: use HTTP Basic or client_secret_post",
                )));
            }
            let decoded = STANDARD.decode(rest.trim()).ok().and_then(|b| String::from_utf8(b).ok());
            let Some((id, secret)) = decoded.as_deref().and_then(|d| d.split_once(':')) else {
                return Err(OAuthApiError::with_basic_challenge(OAuthError::invalid_client(
                    "malformed HTTP Basic credentials",
                )));
            };
            Some((basic_part(id), basic_part(secret)))
        }
    };
    let form_id = form.take("client_id");
    let form_secret = form.take("client_secret");
    let assertion_type = form.take("client_assertion_type");
    let assertion = form.take("client_assertion");
    if assertion.is_some() || assertion_type.is_some() {
        if basic.is_some() || form_secret.is_some() {
            return Err(OAuthError::invalid_request("use exactly one client authentication method").into());
        }
        if assertion_type.as_deref() != Some(JWT_BEARER_ASSERTION) {
            return Err(
                OAuthError::invalid_request(format!("client_assertion_type must be {JWT_BEARER_ASSERTION}")).into()
            );
        }
        let Some(assertion) = assertion else {
            return Err(OAuthError::invalid_request("client_assertion is required with client_assertion_type").into());
        };
        return Ok(ClientAuth::assertion(form_id, assertion)?);
    }
    if basic.is_none()
        && form_secret.is_none()
        && let (Some(id), Some(cert)) = (&form_id, peer)
    {
        return Ok(ClientAuth::Certificate { client_id: id.clone(), certificate: cert.0.to_vec() });
    }
    match (basic, form_secret) {
        (Some(_), Some(_)) => Err(OAuthError::invalid_request("use exactly one client authentication method").into()),
        (Some((id, secret)), None) => {
            if form_id.as_deref().is_some_and(|f| f != id) {
                return Err(OAuthApiError::with_basic_challenge(OAuthError::invalid_client(
                    "client_id does not match the authenticated client",
                )));
            }
            Ok(ClientAuth::Basic { client_id: id, secret: SecretString::from(secret) })
        }
        (None, Some(secret)) => match form_id {
            Some(id) => Ok(ClientAuth::Post { client_id: id, secret: SecretString::from(secret) }),
            None => Err(OAuthError::invalid_request("client_secret without client_id").into()),
        },
        // A public client (token_endpoint_auth_method none): the core accepts it only for a
        // client registered as public.
        (None, None) => match form_id {
            Some(id) => Ok(ClientAuth::Public { client_id: id }),
            None => Err(OAuthApiError::with_basic_challenge(OAuthError::invalid_client(
                "client authentication is required",
            ))),
        },
    }
}

fn with_challenge(auth: &ClientAuth, e: OAuthError) -> OAuthApiError {
    match auth {
        ClientAuth::Basic { .. } => OAuthApiError::with_basic_challenge(e),
        ClientAuth::Post { .. }
        | ClientAuth::Assertion { .. }
        | ClientAuth::Certificate { .. }
        | ClientAuth::Public { .. } => e.into(),
    }
}

fn no_store(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    r
}

pub async fn token(
    State(s): State<AppState>,
    ctx: axum::Extension<RequestContext>,
    peer: Option<axum::Extension<PeerCertificate>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, OAuthApiError> {
    let mut form = oauth_form(&headers, body).await?;
    let auth = client_auth(&headers, &mut form, peer.as_ref().map(|p| &p.0))?;
    let params = TokenParams {
        grant_type: form.take("grant_type").unwrap_or_default(),
        scope: form.take("scope"),
        resource: form.take("resource"),
        client_certificate: peer.as_ref().map(|p| p.0.0.to_vec()),
        code: form.take("code"),
        redirect_uri: form.take("redirect_uri"),
        code_verifier: form.take("code_verifier"),
        refresh_token: form.take("refresh_token"),
    };
    let resp = s.core.token(&auth, &params, &ctx).await.map_err(|e| with_challenge(&auth, e))?;
    let grant = match params.grant_type.as_str() {
        "authorization_code" => "authorization_code",
        "refresh_token" => "refresh_token",
        _ => "client_credentials",
    };
    metrics::counter!("portcullis_tokens_issued_total", "grant" => grant).increment(1);
    Ok(no_store(Json(resp).into_response()))
}

/// The common start of introspection and revocation (RFC 7662 §2.1, RFC 7009 §2.1): an
/// authenticated client and a `token` parameter.
async fn authenticated_token_request(
    s: &AppState,
    ctx: &RequestContext,
    peer: Option<&PeerCertificate>,
    headers: &HeaderMap,
    body: Body,
    public_allowed: bool,
) -> Result<(std::sync::Arc<portcullis_core::usecases::ClientEntry>, String), OAuthApiError> {
    let mut form = oauth_form(headers, body).await?;
    let auth = client_auth(headers, &mut form, peer)?;
    if let ClientAuth::Public { .. } = auth
        && !public_allowed
    {
        // A public client proves nothing: it must not read other tokens' contents.
        return Err(OAuthApiError::with_basic_challenge(OAuthError::invalid_client(
            "introspection requires client authentication",
        )));
    }
    let caller = s.core.authenticate_client(&auth, ctx).await.map_err(|e| with_challenge(&auth, e))?;
    // `token_type_hint` is only a hint (RFC 7009 §2.1): every token type is searched anyway.
    let token = form.take("token").ok_or_else(|| OAuthError::invalid_request("token is required"))?;
    Ok((caller, token))
}

pub async fn introspect(
    State(s): State<AppState>,
    ctx: axum::Extension<RequestContext>,
    peer: Option<axum::Extension<PeerCertificate>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, OAuthApiError> {
    let (caller, token) =
        authenticated_token_request(&s, &ctx, peer.as_ref().map(|p| &p.0), &headers, body, false).await?;
    let result = s.core.introspect(&caller, &token).await?;
    Ok(no_store(Json(result).into_response()))
}

pub async fn revoke(
    State(s): State<AppState>,
    ctx: axum::Extension<RequestContext>,
    peer: Option<axum::Extension<PeerCertificate>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, OAuthApiError> {
    let (caller, token) =
        authenticated_token_request(&s, &ctx, peer.as_ref().map(|p| &p.0), &headers, body, true).await?;
    s.core.revoke(&caller, &token, &ctx).await?;
    Ok(no_store(StatusCode::OK.into_response()))
}
