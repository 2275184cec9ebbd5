//! The OpenID Connect surface for people (docs/oidc.md): `/oauth2/authorize` and the consent
//! form, the sign-in pages (`/login`, `/login/code`, `/login/totp`), `/account` (consents,
//! authenticator app), invitations and self-registration, `/oauth2/logout` and
//! `/oauth2/userinfo`. Decisions are the core's; this module reads forms and cookies, checks
//! CSRF tokens and turns outcomes into pages and redirects.

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use portcullis_core::Error;
use portcullis_core::clock::rfc3339;
use portcullis_core::usecases::{Authorize, ClientRedirect, Invitation, Logout, RequestContext, SecondFactor};
use secrecy::{ExposeSecret, SecretString};

use crate::AppState;
use crate::admin::Admin;
use crate::auth::Ctx;
use crate::body::{has_media_type, json_body, read_limited};
use crate::error::{ApiError, X_ERROR, X_ERROR_ID, header_text, new_error_id};
use crate::pages::{self, Csrf};

/// The SSO session cookie (the login session's token).
const SSO_COOKIE: &str = "portcullis_sso";
/// The verification a pending sign-in waits on (its second factor).
const PENDING_COOKIE: &str = "portcullis_login";
/// Page forms are small.
const FORM_LIMIT: usize = 16 * 1024;

pub(crate) fn secure(s: &AppState) -> bool {
    pages::secure_issuer(s.core.issuer())
}

/// A form's fields; `Err` is the error page (wrong content type, too big).
pub(crate) async fn form_pairs(headers: &HeaderMap, body: Body) -> Result<Vec<(String, String)>, Response> {
    if !has_media_type(headers, "application/x-www-form-urlencoded") {
        return Err(pages::error_page(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "forms must be application/x-www-form-urlencoded",
        ));
    }
    let bytes = read_limited(body, FORM_LIMIT)
        .await
        .map_err(|_| pages::error_page(StatusCode::PAYLOAD_TOO_LARGE, "the form is too large"))?;
    Ok(form_urlencoded::parse(&bytes).into_owned().collect())
}

/// A page form's fields `names` after its CSRF token was checked; `Err` is the error page
/// (wrong content type, too big, a repeated field, a failed CSRF check).
async fn csrf_form<const N: usize>(
    s: &AppState,
    headers: &HeaderMap,
    body: Body,
    names: [&str; N],
) -> Result<[String; N], Response> {
    let pairs = form_pairs(headers, body).await?;
    let repeated = || pages::error_page(StatusCode::BAD_REQUEST, "a field is given more than once");
    let token = field(&pairs, "csrf_token").ok_or_else(repeated)?;
    if !pages::csrf_ok(&s.core, headers, secure(s), token) {
        return Err(csrf_refused());
    }
    let mut out = names.map(|_| String::new());
    for (slot, name) in out.iter_mut().zip(names) {
        *slot = field(&pairs, name).ok_or_else(repeated)?.to_owned();
    }
    Ok(out)
}

/// The one value of a page form's field (`""` when absent; `None` when it is repeated).
pub(crate) fn field<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    let mut it = pairs.iter().filter(|(k, _)| k == name).map(|(_, v)| v.as_str());
    let first = it.next().unwrap_or("");
    if it.next().is_some() { None } else { Some(first) }
}

fn query_pairs(uri: &Uri) -> Vec<(String, String)> {
    form_urlencoded::parse(uri.query().unwrap_or("").as_bytes()).into_owned().collect()
}

/// The first value of query parameter `name` (`""` when absent).
pub(crate) fn query_param(uri: &Uri, name: &str) -> String {
    form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

pub(crate) fn encode(pairs: &[(String, String)]) -> String {
    form_urlencoded::Serializer::new(String::new()).extend_pairs(pairs).finish()
}

/// 303 See Other (RFC 9700 §4.12: never 307 after a credential POST).
pub(crate) fn see_other(to: &str) -> Response {
    let mut r = StatusCode::SEE_OTHER.into_response();
    if let Ok(v) = HeaderValue::from_str(to) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// To the sign-in page, coming back to `return_to` afterwards.
pub(crate) fn to_login(return_to: &str) -> Response {
    see_other(&format!("/login?{}", encode(&[("return_to".to_owned(), return_to.to_owned())])))
}

pub(crate) fn with_cookies(mut r: Response, cookies: impl IntoIterator<Item = Option<HeaderValue>>) -> Response {
    for c in cookies.into_iter().flatten() {
        r.headers_mut().append(header::SET_COOKIE, c);
    }
    r
}

/// A page re-shown with an error (a failed sign-in, a wrong code): the status and the
/// `x-error`/`x-error-id` headers of the contract.
fn failed<T: askama::Template>(status: StatusCode, page: &T, message: &str, csrf: &Csrf) -> Response {
    failed_with(status, page, message, csrf, &[])
}

/// [`failed`] for a page whose form may lead to `form_actions` (see [`redirect_target`]).
fn failed_with<T: askama::Template>(
    status: StatusCode,
    page: &T,
    message: &str,
    csrf: &Csrf,
    form_actions: &[String],
) -> Response {
    let mut r = pages::render(status, page, form_actions);
    r.headers_mut().insert(X_ERROR.clone(), header_text(message));
    r.headers_mut().insert(X_ERROR_ID.clone(), header_text(&new_error_id()));
    with_cookies(r, [csrf.set_cookie.clone()])
}

/// A core error as an error page (the one mapping of [`crate::error::describe`]; a 5xx logs its
/// internals and shows none).
fn error_page(e: Error) -> Response {
    let (status, msg) = status_of(e);
    pages::error_page(status, &msg)
}

/// The status and the message of a core error: public text, or for a 5xx the internals for
/// [`pages::error_page`] to log.
pub(crate) fn status_of(e: Error) -> (StatusCode, String) {
    let d = crate::error::describe(e);
    let msg = if d.status.is_server_error() { d.internal.unwrap_or(d.public) } else { d.public };
    (d.status, msg)
}

pub(crate) fn csrf_refused() -> Response {
    pages::error_page(
        StatusCode::FORBIDDEN,
        "the form expired or came from another site (CSRF check failed): reload the page and try again",
    )
}

pub(crate) fn sso<'a>(s: &AppState, headers: &'a HeaderMap) -> Option<&'a str> {
    pages::cookie(headers, &pages::cookie_name(SSO_COOKIE, secure(s)))
}

/// Where a form's submission may end up after redirects: the `redirect_uri` of the
/// authorization request in `return_to`. Browsers (Chrome, Safari) check a page's CSP
/// `form-action` against every redirect after a form POST, so the page that finishes a
/// sign-in must allow the application it returns to. (Only the form's destination is widened;
/// the request is validated again when it gets there.)
fn redirect_target(return_to: &str) -> Vec<String> {
    let Some(q) = return_to.strip_prefix("/oauth2/authorize?") else { return Vec::new() };
    form_urlencoded::parse(q.as_bytes())
        .filter(|(k, _)| k == "redirect_uri")
        .map(|(_, v)| v.into_owned())
        .take(1)
        .collect()
}

/// The organisation a sign-in is for: the one of the client in `return_to`, if any.
fn org_of(return_to: &str) -> Option<String> {
    let q = return_to.strip_prefix("/oauth2/authorize?")?;
    let client = form_urlencoded::parse(q.as_bytes()).find(|(k, _)| k == "client_id")?.1;
    client.split_once('$').map(|(org, _)| org.to_owned())
}

// ---- the authorization endpoint ------------------------------------------------------------

/// Sends the browser back to the client: 303 with the query, or the auto-submitted form.
fn to_client(r: ClientRedirect) -> Response {
    if r.form_post {
        let page = pages::FormPostPage { action: r.redirect_uri.clone(), fields: r.params };
        pages::render(StatusCode::OK, &page, std::slice::from_ref(&r.redirect_uri))
    } else {
        see_other(&r.url())
    }
}

async fn authorization_outcome(s: &AppState, headers: &HeaderMap, outcome: Result<Authorize, Error>) -> Response {
    match outcome {
        Ok(Authorize::Redirect(r)) => to_client(r),
        Ok(Authorize::Login { login_hint, resume }) => {
            let return_to = format!("/oauth2/authorize?{}", encode(&resume));
            let mut q = vec![("return_to".to_owned(), return_to)];
            if let Some(h) = login_hint {
                q.push(("login_hint".to_owned(), h));
            }
            see_other(&format!("/login?{}", encode(&q)))
        }
        Ok(Authorize::Consent(p)) => {
            let csrf = pages::csrf(&s.core, headers, secure(s));
            let page = pages::ConsentPage {
                csrf_token: csrf.token.clone(),
                request: encode(&p.request),
                client_name: p.client_name,
                client_id: p.client_id,
                org_name: p.org_name,
                user_email: p.user_email,
                scopes: p
                    .scopes
                    .iter()
                    .map(|sc| pages::ScopeLine { name: sc.clone(), description: scope_description(sc) })
                    .collect(),
            };
            let targets: Vec<String> =
                p.request.iter().filter(|(k, _)| k == "redirect_uri").map(|(_, v)| v.clone()).take(1).collect();
            with_cookies(pages::render(StatusCode::OK, &page, &targets), [csrf.set_cookie])
        }
        Err(e) => error_page(e),
    }
}

fn scope_description(scope: &str) -> String {
    match scope {
        "openid" => "Sign you in with your Portcullis account".to_owned(),
        "profile" => "Your name".to_owned(),
        "email" => "Your email address".to_owned(),
        "offline_access" => "Stay signed in when you are not using it".to_owned(),
        other => format!("Access {other} on your behalf"),
    }
}

/// `GET|POST /oauth2/authorize`.
pub async fn authorize(
    State(s): State<AppState>,
    Ctx(ctx): Ctx,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let pairs = if method == Method::POST {
        match form_pairs(&headers, body).await {
            Ok(p) => p,
            Err(r) => return r,
        }
    } else {
        query_pairs(&uri)
    };
    let outcome = s.core.authorize(&ctx, &pairs, sso(&s, &headers), None).await;
    authorization_outcome(&s, &headers, outcome).await
}

/// `POST /oauth2/consent`: the consent form (CSRF-checked, bound to the SSO session).
pub async fn consent(State(s): State<AppState>, Ctx(ctx): Ctx, headers: HeaderMap, body: Body) -> Response {
    let [request, decision] = match csrf_form(&s, &headers, body, ["request", "decision"]).await {
        Ok(f) => f,
        Err(r) => return r,
    };
    let allow = match decision.as_str() {
        "allow" => true,
        "deny" => false,
        _ => return pages::error_page(StatusCode::BAD_REQUEST, "decision must be allow or deny"),
    };
    let request: Vec<(String, String)> = form_urlencoded::parse(request.as_bytes()).into_owned().collect();
    let outcome = s.core.authorize(&ctx, &request, sso(&s, &headers), Some(allow)).await;
    authorization_outcome(&s, &headers, outcome).await
}

// ---- sign-in -------------------------------------------------------------------------------

fn login_page(
    csrf: &Csrf,
    return_to: &str,
    email: &str,
    error: Option<String>,
    notice: Option<String>,
) -> pages::LoginPage {
    pages::LoginPage {
        csrf_token: csrf.token.clone(),
        return_to: return_to.to_owned(),
        email: email.to_owned(),
        error,
        notice,
        org_name: None,
        register_url: org_of(return_to).map(|o| format!("/register?org={o}")),
    }
}

/// `GET /login`.
pub async fn login_form(State(s): State<AppState>, uri: Uri, headers: HeaderMap) -> Response {
    let get = |k: &str| query_param(&uri, k);
    let return_to = pages::safe_return_to(&get("return_to"));
    let notice = if get("invited") == "1" {
        Some("Your password is set. Sign in to continue.".to_owned())
    } else if get("reauth") == "1" {
        Some("This change needs a recent sign-in. Sign in again to continue.".to_owned())
    } else {
        None
    };
    let csrf = pages::csrf(&s.core, &headers, secure(&s));
    let page = login_page(&csrf, &return_to, &get("login_hint"), None, notice);
    with_cookies(pages::render(StatusCode::OK, &page, &[]), [csrf.set_cookie])
}

/// `POST /login`: email and password; on to the second factor.
pub async fn login_submit(State(s): State<AppState>, Ctx(ctx): Ctx, headers: HeaderMap, body: Body) -> Response {
    let [email, password, return_to] = match csrf_form(&s, &headers, body, ["email", "password", "return_to"]).await {
        Ok(f) => f,
        Err(r) => return r,
    };
    let sec = secure(&s);
    let return_to = pages::safe_return_to(&return_to);
    let ua = headers.get(header::USER_AGENT).and_then(|v| v.to_str().ok());
    let org = org_of(&return_to);
    match s.core.browser_login(&ctx, &email, SecretString::from(password), org.as_deref(), ua).await {
        Ok(l) => {
            let next = match l.second_factor {
                SecondFactor::EmailCode => "/login/code",
                SecondFactor::Totp => "/login/totp",
            };
            let to = format!("{next}?{}", encode(&[("return_to".to_owned(), return_to)]));
            with_cookies(
                see_other(&to),
                [
                    Some(pages::set_cookie(
                        &pages::cookie_name(SSO_COOKIE, sec),
                        l.session_token.expose_secret(),
                        None,
                        sec,
                    )),
                    Some(pages::set_cookie(&pages::cookie_name(PENDING_COOKIE, sec), &l.verification_id, None, sec)),
                ],
            )
        }
        Err(e) => {
            let (status, msg) = status_of(e);
            if status.is_server_error() {
                return pages::error_page(status, &msg);
            }
            let csrf = pages::csrf(&s.core, &headers, sec);
            let page = login_page(&csrf, &return_to, &email, Some(msg.clone()), None);
            failed(status, &page, &msg, &csrf)
        }
    }
}

fn code_page(csrf: &Csrf, return_to: &str, totp: bool, error: Option<String>) -> pages::CodePage {
    pages::CodePage {
        csrf_token: csrf.token.clone(),
        return_to: return_to.to_owned(),
        error,
        totp,
        action: if totp { "/login/totp" } else { "/login/code" }.to_owned(),
    }
}

async fn second_factor_form(s: &AppState, uri: &Uri, headers: &HeaderMap, totp: bool) -> Response {
    let return_to = pages::safe_return_to(&query_param(uri, "return_to"));
    let csrf = pages::csrf(&s.core, headers, secure(s));
    let page = code_page(&csrf, &return_to, totp, None);
    with_cookies(pages::render(StatusCode::OK, &page, &redirect_target(&return_to)), [csrf.set_cookie])
}

/// `GET /login/code`.
pub async fn code_form(State(s): State<AppState>, uri: Uri, headers: HeaderMap) -> Response {
    second_factor_form(&s, &uri, &headers, false).await
}

/// `GET /login/totp`.
pub async fn totp_form(State(s): State<AppState>, uri: Uri, headers: HeaderMap) -> Response {
    second_factor_form(&s, &uri, &headers, true).await
}

async fn second_factor_submit(
    s: &AppState,
    ctx: &RequestContext,
    headers: &HeaderMap,
    body: Body,
    totp: bool,
) -> Response {
    let [code, return_to] = match csrf_form(s, headers, body, ["code", "return_to"]).await {
        Ok(f) => f,
        Err(r) => return r,
    };
    let sec = secure(s);
    let return_to = pages::safe_return_to(&return_to);
    let pending_name = pages::cookie_name(PENDING_COOKIE, sec);
    let Some(verification_id) = pages::cookie(headers, &pending_name) else {
        return to_login(&return_to);
    };
    let outcome = if totp {
        s.core.verify_login_totp(ctx, verification_id, &code).await
    } else {
        s.core.verify_login_code(ctx, verification_id, &code).await
    };
    match outcome {
        Ok(()) => with_cookies(see_other(&return_to), [Some(pages::set_cookie(&pending_name, "", Some(0), sec))]),
        Err(e) => {
            let (status, msg) = status_of(e);
            if status.is_server_error() {
                return pages::error_page(status, &msg);
            }
            let csrf = pages::csrf(&s.core, headers, sec);
            let page = code_page(&csrf, &return_to, totp, Some(msg.clone()));
            failed_with(status, &page, &msg, &csrf, &redirect_target(&return_to))
        }
    }
}

/// `POST /login/code`.
pub async fn code_submit(State(s): State<AppState>, Ctx(ctx): Ctx, headers: HeaderMap, body: Body) -> Response {
    second_factor_submit(&s, &ctx, &headers, body, false).await
}

/// `POST /login/totp`.
pub async fn totp_submit(State(s): State<AppState>, Ctx(ctx): Ctx, headers: HeaderMap, body: Body) -> Response {
    second_factor_submit(&s, &ctx, &headers, body, true).await
}

// ---- account -------------------------------------------------------------------------------

type SessionEntry = std::sync::Arc<portcullis_core::usecases::SessionEntry>;

/// The signed-in person, or the redirect to sign in (and come back to `here`).
async fn signed_in(s: &AppState, headers: &HeaderMap, here: &str) -> Result<SessionEntry, Response> {
    let Some(token) = sso(s, headers) else {
        return Err(to_login(here));
    };
    match s.core.account_session(token).await {
        Ok(e) => Ok(e),
        Err(Error::Unauthenticated(_)) => Err(to_login(here)),
        Err(e) => Err(error_page(e)),
    }
}

/// `GET /account`.
pub async fn account(State(s): State<AppState>, headers: HeaderMap) -> Response {
    let who = match signed_in(&s, &headers, "/account").await {
        Ok(w) => w,
        Err(r) => return r,
    };
    let consents = match s.core.my_consents(&who).await {
        Ok(c) => c,
        Err(e) => return error_page(e),
    };
    let totp_enrolled = match s.core.totp_enrolled(&who.user.id).await {
        Ok(t) => t,
        Err(e) => return error_page(e),
    };
    let csrf = pages::csrf(&s.core, &headers, secure(&s));
    let page = pages::AccountPage {
        csrf_token: csrf.token.clone(),
        user_email: who.user.email.to_string(),
        user_name: who.user.name.clone(),
        totp_enrolled,
        consents: consents
            .into_iter()
            .map(|(c, name)| pages::ConsentRow {
                client_id: c.client_id,
                client_name: name,
                scopes: c.scopes.join(" "),
                granted_at: rfc3339(c.granted_at),
            })
            .collect(),
    };
    with_cookies(pages::render(StatusCode::OK, &page, &[]), [csrf.set_cookie])
}

/// `POST /account/consents/revoke`.
pub async fn revoke_consent(State(s): State<AppState>, Ctx(ctx): Ctx, headers: HeaderMap, body: Body) -> Response {
    let who = match signed_in(&s, &headers, "/account").await {
        Ok(w) => w,
        Err(r) => return r,
    };
    let [client_id] = match csrf_form(&s, &headers, body, ["client_id"]).await {
        Ok(f) => f,
        Err(r) => return r,
    };
    match s.core.revoke_my_consent(&ctx, &who, &client_id).await {
        Ok(()) => see_other("/account"),
        Err(e) => error_page(e),
    }
}

fn qr_svg(data: &str) -> String {
    match qrcode::QrCode::new(data.as_bytes()) {
        Ok(code) => code.render::<qrcode::render::svg::Color<'_>>().min_dimensions(200, 200).quiet_zone(true).build(),
        Err(_) => String::new(),
    }
}

async fn totp_page(
    s: &AppState,
    ctx: &RequestContext,
    headers: &HeaderMap,
    who: &SessionEntry,
    error: Option<String>,
) -> Response {
    match s.core.totp_enrolment(ctx, who).await {
        Ok(t) => {
            let csrf = pages::csrf(&s.core, headers, secure(s));
            let page = pages::TotpEnrolPage {
                csrf_token: csrf.token.clone(),
                secret: t.secret_base32,
                qr_svg: qr_svg(&t.otpauth_uri),
                otpauth_uri: t.otpauth_uri,
                error: error.clone(),
            };
            match error {
                Some(msg) => failed(StatusCode::BAD_REQUEST, &page, &msg, &csrf),
                None => with_cookies(pages::render(StatusCode::OK, &page, &[]), [csrf.set_cookie]),
            }
        }
        Err(Error::Unauthenticated(_)) => to_login("/account/totp"),
        Err(Error::Conflict(_)) => {
            let page = pages::MessagePage {
                title: "Authenticator app enrolled".into(),
                message: "Your account already uses an authenticator app for its second factor.".into(),
                link: Some(("/account".into(), "Back to your account".into())),
            };
            pages::render(StatusCode::OK, &page, &[])
        }
        Err(e) => error_page(e),
    }
}

/// `GET /account/totp`: enrolment (QR code and secret).
pub async fn totp_enrol_form(State(s): State<AppState>, Ctx(ctx): Ctx, headers: HeaderMap) -> Response {
    match signed_in(&s, &headers, "/account/totp").await {
        Ok(who) => totp_page(&s, &ctx, &headers, &who, None).await,
        Err(r) => r,
    }
}

/// `POST /account/totp`: the first code confirms the enrolment.
pub async fn totp_enrol_submit(State(s): State<AppState>, Ctx(ctx): Ctx, headers: HeaderMap, body: Body) -> Response {
    let who = match signed_in(&s, &headers, "/account/totp").await {
        Ok(w) => w,
        Err(r) => return r,
    };
    let [code] = match csrf_form(&s, &headers, body, ["code"]).await {
        Ok(f) => f,
        Err(r) => return r,
    };
    match s.core.confirm_totp(&ctx, &who, &code).await {
        Ok(()) => {
            let page = pages::MessagePage {
                title: "Authenticator app enrolled".into(),
                message: "From now on, signing in asks for a code from your authenticator app.".into(),
                link: Some(("/account".into(), "Back to your account".into())),
            };
            pages::render(StatusCode::OK, &page, &[])
        }
        Err(Error::InvalidInput(m)) => totp_page(&s, &ctx, &headers, &who, Some(m)).await,
        Err(Error::Unauthenticated(_)) => to_login("/account/totp"),
        Err(e) => error_page(e),
    }
}

// ---- onboarding ----------------------------------------------------------------------------

/// `GET /invite?token=…`.
pub async fn invite_form(State(s): State<AppState>, uri: Uri, headers: HeaderMap) -> Response {
    let token = query_param(&uri, "token");
    match s.core.invitation(&token).await {
        Ok((_, user)) => {
            let csrf = pages::csrf(&s.core, &headers, secure(&s));
            let page = pages::InvitePage {
                csrf_token: csrf.token.clone(),
                token: token.to_owned(),
                email: user.email.to_string(),
                error: None,
            };
            with_cookies(pages::render(StatusCode::OK, &page, &[]), [csrf.set_cookie])
        }
        Err(e) => error_page(e),
    }
}

/// `POST /invite`: set the password.
pub async fn invite_submit(State(s): State<AppState>, Ctx(ctx): Ctx, headers: HeaderMap, body: Body) -> Response {
    let [token, password, confirm] =
        match csrf_form(&s, &headers, body, ["token", "password", "password_confirm"]).await {
            Ok(f) => f,
            Err(r) => return r,
        };
    let sec = secure(&s);
    let again = |msg: String, email: String| {
        let csrf = pages::csrf(&s.core, &headers, sec);
        let page = pages::InvitePage {
            csrf_token: csrf.token.clone(),
            token: token.to_owned(),
            email,
            error: Some(msg.clone()),
        };
        failed(StatusCode::BAD_REQUEST, &page, &msg, &csrf)
    };
    if password != confirm {
        let email = s.core.invitation(&token).await.map(|(_, u)| u.email.to_string()).unwrap_or_default();
        return again("the two passwords differ".into(), email);
    }
    match s.core.accept_invitation(&ctx, &token, SecretString::from(password)).await {
        Ok(_) => see_other("/login?invited=1&return_to=%2Faccount"),
        Err(Error::InvalidInput(m)) => {
            let email = s.core.invitation(&token).await.map(|(_, u)| u.email.to_string()).unwrap_or_default();
            again(m, email)
        }
        Err(e) => error_page(e),
    }
}

/// `GET /register?org=…`.
pub async fn register_form(State(s): State<AppState>, uri: Uri, headers: HeaderMap) -> Response {
    let org = query_param(&uri, "org");
    match s.core.registration_org(&org).await {
        Ok(o) => {
            let csrf = pages::csrf(&s.core, &headers, secure(&s));
            let page = pages::RegisterPage {
                csrf_token: csrf.token.clone(),
                org: o.slug.to_string(),
                org_name: o.name,
                error: None,
            };
            with_cookies(pages::render(StatusCode::OK, &page, &[]), [csrf.set_cookie])
        }
        Err(e) => error_page(e),
    }
}

/// `POST /register`: the same answer whether or not the address has an account.
pub async fn register_submit(State(s): State<AppState>, Ctx(ctx): Ctx, headers: HeaderMap, body: Body) -> Response {
    let [org, email, name] = match csrf_form(&s, &headers, body, ["org", "email", "name"]).await {
        Ok(f) => f,
        Err(r) => return r,
    };
    match s.core.register(&ctx, &org, &email, Some(name.as_str()).filter(|n| !n.is_empty())).await {
        Ok(()) => pages::render(
            StatusCode::OK,
            &pages::MessagePage {
                title: "Check your mail".into(),
                message: "If the address can be registered, a link to set your password is on its way. It works once and expires in 7 days.".into(),
                link: None,
            },
            &[],
        ),
        Err(e) => error_page(e),
    }
}

/// `POST /api/v1/organisations/{org}/invitations`.
pub async fn invite_api(
    State(s): State<AppState>,
    Admin(who, ctx): Admin,
    Path(org): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let req: Invitation = json_body(&headers, body).await?;
    let u = s.core.invite_user(&who, &ctx, &org, req).await?;
    let v = serde_json::to_value(portcullis_core::usecases::UserView::from(&u)).unwrap_or_default();
    Ok((StatusCode::CREATED, Json(v)).into_response())
}

/// `DELETE /api/v1/organisations/{org}/users/{id}/totp`: reset the user's second factor.
pub async fn reset_totp(
    State(s): State<AppState>,
    Admin(who, ctx): Admin,
    Path((org, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    s.core.reset_user_totp(&who, &ctx, &org, &id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `POST /api/v1/organisations/{org}/users/{id}/invitation`: a new link.
pub async fn resend_invitation(
    State(s): State<AppState>,
    Admin(who, ctx): Admin,
    Path((org, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    s.core.resend_invitation(&who, &ctx, &org, &id).await?;
    Ok(StatusCode::ACCEPTED.into_response())
}

// ---- logout and userinfo -------------------------------------------------------------------

/// `GET|POST /oauth2/logout`. A POST is the confirmation form (CSRF-checked).
pub async fn logout(
    State(s): State<AppState>,
    Ctx(ctx): Ctx,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let sec = secure(&s);
    let (mut pairs, confirmed) = if method == Method::POST {
        let pairs = match form_pairs(&headers, body).await {
            Ok(p) => p,
            Err(r) => return r,
        };
        let Some(token) = field(&pairs, "csrf_token") else {
            return pages::error_page(StatusCode::BAD_REQUEST, "a field is given more than once");
        };
        if !pages::csrf_ok(&s.core, &headers, sec, token) {
            return csrf_refused();
        }
        (pairs, true)
    } else {
        (query_pairs(&uri), false)
    };
    pairs.retain(|(k, _)| k != "csrf_token");
    let clear = Some(pages::set_cookie(&pages::cookie_name(SSO_COOKIE, sec), "", Some(0), sec));
    match s.core.logout(&ctx, &pairs, sso(&s, &headers), confirmed).await {
        Ok(Logout::Redirect(to)) => with_cookies(see_other(&to), [clear]),
        Ok(Logout::SignedOut) => with_cookies(
            pages::render(
                StatusCode::OK,
                &pages::MessagePage {
                    title: "Signed out".into(),
                    message: "You are signed out of Portcullis.".into(),
                    link: None,
                },
                &[],
            ),
            [clear],
        ),
        Ok(Logout::Confirm) => {
            let csrf = pages::csrf(&s.core, &headers, sec);
            let targets: Vec<String> =
                pairs.iter().filter(|(k, _)| k == "post_logout_redirect_uri").map(|(_, v)| v.clone()).take(1).collect();
            let page = pages::LogoutConfirmPage { csrf_token: csrf.token.clone(), fields: pairs };
            with_cookies(pages::render(StatusCode::OK, &page, &targets), [csrf.set_cookie])
        }
        Err(e) => error_page(e),
    }
}

/// `GET|POST /oauth2/userinfo`: the bearer token in the header (any case of the scheme) or,
/// on POST, as `access_token` in the form body (RFC 6750 §2.2).
pub async fn userinfo(
    State(s): State<AppState>,
    method: Method,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let unauthenticated =
        |d: &str, invalid: bool| ApiError::Unauthenticated { description: d.to_owned(), invalid_token: invalid };
    let header_token = match headers.get(header::AUTHORIZATION) {
        None => None,
        Some(v) => {
            let v = v.to_str().unwrap_or_default();
            match v.split_once(' ') {
                Some((scheme, t)) if scheme.eq_ignore_ascii_case("bearer") && !t.trim().is_empty() => {
                    Some(t.trim().to_owned())
                }
                _ => return Err(unauthenticated("use the Bearer scheme", true)),
            }
        }
    };
    let token = match header_token {
        Some(t) => t,
        None if method == Method::POST && has_media_type(&headers, "application/x-www-form-urlencoded") => {
            let bytes = read_limited(body, FORM_LIMIT).await.map_err(|_| ApiError::PayloadTooLarge(FORM_LIMIT))?;
            let mut it =
                form_urlencoded::parse(&bytes).filter(|(k, _)| k == "access_token").map(|(_, v)| v.into_owned());
            match (it.next(), it.next()) {
                (Some(t), None) => t,
                (Some(_), Some(_)) => return Err(ApiError::BadRequest("access_token is given more than once".into())),
                (None, _) => return Err(unauthenticated("an access token is required", false)),
            }
        }
        None => return Err(unauthenticated("an access token is required", false)),
    };
    let info = s.core.userinfo(&token).await?;
    let mut r = Json(serde_json::Value::Object(info)).into_response();
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(r)
}
