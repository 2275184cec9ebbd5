//! The HTML building blocks of the OpenID Connect sign-in pages (docs/oidc.md, "Pages"):
//! askama templates (compile-time, auto-escaped; `templates/`), the two static assets, the
//! security headers every page is sent with, cookies, CSRF tokens and `return_to` checking.
//!
//! The pages need no JavaScript, except the `form_post` response, which loads
//! `/assets/form-post.js` (never an inline script: the CSP allows scripts from `'self'` only).

use askama::Template;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use portcullis_core::Portcullis;
use secrecy::ExposeSecret;

use crate::error::{X_ERROR, X_ERROR_ID, header_text, new_error_id};

const CSS: &str = include_str!("../assets/portcullis.css");
const FORM_POST_JS: &str = include_str!("../assets/form-post.js");

/// The base name of the CSRF cookie (see [`cookie_name`] for the `__Host-` prefix).
pub const CSRF_COOKIE: &str = "portcullis_csrf";

// ---------------------------------------------------------------------------------------------
// Pages
// ---------------------------------------------------------------------------------------------

/// `/login`: email and password.
#[derive(Debug, Clone, Template)]
#[template(path = "login.html")]
pub struct LoginPage {
    pub csrf_token: String,
    pub return_to: String,
    /// Prefilled address (e.g. from `login_hint` or the previous attempt).
    pub email: String,
    pub error: Option<String>,
    pub notice: Option<String>,
    pub org_name: Option<String>,
    /// Shown as "Create one" only when it is a same-origin path or an http(s) URL.
    pub register_url: Option<String>,
}

impl LoginPage {
    fn register_link(&self) -> Option<&str> {
        self.register_url.as_deref().filter(|u| safe_href(u))
    }
}

/// `/login/code` (emailed code) or `/login/totp` (authenticator app).
#[derive(Debug, Clone, Template)]
#[template(path = "code.html")]
pub struct CodePage {
    pub csrf_token: String,
    pub return_to: String,
    pub error: Option<String>,
    /// Authenticator app (true) or emailed code (false): only the wording differs.
    pub totp: bool,
    /// Where the form posts: `/login/code` or `/login/totp`.
    pub action: String,
}

/// One requested scope on the consent page.
#[derive(Debug, Clone)]
pub struct ScopeLine {
    pub name: String,
    pub description: String,
}

/// The consent page rendered by `/oauth2/authorize`; posts to `/oauth2/consent`.
#[derive(Debug, Clone, Template)]
#[template(path = "consent.html")]
pub struct ConsentPage {
    pub csrf_token: String,
    /// The authorization request's parameters (form-urlencoded), re-validated when posted back.
    pub request: String,
    pub client_name: String,
    pub client_id: String,
    pub org_name: String,
    pub user_email: String,
    pub scopes: Vec<ScopeLine>,
}

/// An error page; use [`error_page`], which also sets `x-error` and `x-error-id`.
#[derive(Debug, Clone, Template)]
#[template(path = "error.html")]
pub struct ErrorPage {
    pub title: String,
    pub message: String,
    pub error_id: String,
}

/// `response_mode=form_post`: a form to the client's `redirect_uri`, a visible "Continue"
/// button and `/assets/form-post.js`, which submits it. Render it with the redirect URI's
/// origin in `form_actions` (see [`render`]).
#[derive(Clone, Template)]
#[template(path = "form_post.html")]
pub struct FormPostPage {
    pub action: String,
    pub fields: Vec<(String, String)>,
}

/// One remembered consent on `/account`.
#[derive(Debug, Clone)]
pub struct ConsentRow {
    pub client_id: String,
    pub client_name: String,
    /// The granted scopes, ready to show (e.g. space-separated).
    pub scopes: String,
    /// When, ready to show.
    pub granted_at: String,
}

/// `/account`: consents (revoke), the authenticator app, sign out.
#[derive(Debug, Clone, Template)]
#[template(path = "account.html")]
pub struct AccountPage {
    pub csrf_token: String,
    pub user_email: String,
    pub user_name: Option<String>,
    pub totp_enrolled: bool,
    pub consents: Vec<ConsentRow>,
}

/// `/account/totp`: enrolment.
#[derive(Clone, Template)]
#[template(path = "totp_enrol.html")]
pub struct TotpEnrolPage {
    pub csrf_token: String,
    /// The base32 secret; shown grouped in fours.
    pub secret: String,
    /// `otpauth://totp/…`; linked only when it has that scheme.
    pub otpauth_uri: String,
    /// Trusted SVG markup of the QR code, inserted unescaped. It must not use `style`
    /// attributes or elements: the page's CSP (`style-src 'self'`) blocks them. Use
    /// presentation attributes (`fill=…`) instead.
    pub qr_svg: String,
    pub error: Option<String>,
}

impl TotpEnrolPage {
    /// The secret in groups of four characters, for reading and typing.
    pub fn secret_grouped(&self) -> String {
        group4(&self.secret)
    }
    fn otpauth_link(&self) -> Option<&str> {
        let u = self.otpauth_uri.as_str();
        (u.get(..10).is_some_and(|p| p.eq_ignore_ascii_case("otpauth://")) && u.bytes().all(|b| b.is_ascii_graphic()))
            .then_some(u)
    }
}

/// `/invite?token=…`: choose a password.
#[derive(Clone, Template)]
#[template(path = "invite.html")]
pub struct InvitePage {
    pub csrf_token: String,
    pub token: String,
    /// Shown read-only (and offered to password managers as the user name; not submitted).
    pub email: String,
    pub error: Option<String>,
}

/// `/register?org=…`: self-registration.
#[derive(Debug, Clone, Template)]
#[template(path = "register.html")]
pub struct RegisterPage {
    pub csrf_token: String,
    /// The organisation's slug (hidden field).
    pub org: String,
    /// Its display name.
    pub org_name: String,
    pub error: Option<String>,
}

/// A plain message: "check your mail", "signed out", "password set".
#[derive(Debug, Clone, Template)]
#[template(path = "message.html")]
pub struct MessagePage {
    pub title: String,
    pub message: String,
    /// `(href, text)`; shown only when `href` is a same-origin path or an http(s) URL.
    pub link: Option<(String, String)>,
}

impl MessagePage {
    fn safe_link(&self) -> Option<(&str, &str)> {
        self.link.as_ref().filter(|(h, _)| safe_href(h)).map(|(h, t)| (h.as_str(), t.as_str()))
    }
}

/// RP-initiated logout without an `id_token_hint`: ask first.
#[derive(Debug, Clone, Template)]
#[template(path = "logout_confirm.html")]
pub struct LogoutConfirmPage {
    pub csrf_token: String,
    /// The logout parameters to carry over (`post_logout_redirect_uri`, `state`, `client_id`…).
    pub fields: Vec<(String, String)>,
}

/// These pages carry secrets (a TOTP secret, an invitation token, an authorization code):
/// their `Debug` shows none.
macro_rules! redacted_debug {
    ($($page:ident),+) => {$(
        impl std::fmt::Debug for $page {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct(stringify!($page)).finish_non_exhaustive()
            }
        }
    )+};
}
redacted_debug!(TotpEnrolPage, InvitePage, FormPostPage);

fn group4(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + s.len() / 4);
    for (i, c) in s.chars().filter(|c| !c.is_whitespace()).enumerate() {
        if i > 0 && i % 4 == 0 {
            out.push(' ');
        }
        out.push(c);
    }
    out
}

/// A link target a page may show: a same-origin path (not `//…` or `/\…`) or an http(s) URL.
fn safe_href(h: &str) -> bool {
    let lower = h.get(..8).unwrap_or(h).to_ascii_lowercase();
    let ok_start = (h.starts_with('/') && !h.starts_with("//") && !h.starts_with("/\\"))
        || lower.starts_with("https://")
        || lower.starts_with("http://");
    ok_start && !h.chars().any(char::is_control)
}

// ---------------------------------------------------------------------------------------------
// Responses
// ---------------------------------------------------------------------------------------------

const CSP_BASE: &str =
    "default-src 'none'; style-src 'self'; img-src 'self' data:; script-src 'self'; form-action 'self'";
const CSP_TAIL: &str = "; frame-ancestors 'none'; base-uri 'none'";

/// A `form-action` source for a form_post target: the URI without query or fragment (CSP
/// source expressions have neither, and matching ignores the query), or `None` when it could
/// break out of the directive (whitespace, `;`, `,`, non-ASCII) or is empty.
fn form_action_source(uri: &str) -> Option<&str> {
    if uri.is_empty() || !uri.bytes().all(|b| b.is_ascii_graphic() && b != b';' && b != b',' && b != b'\'') {
        return None;
    }
    let end = uri.find(['?', '#']).unwrap_or(uri.len());
    uri.get(..end).filter(|s| !s.is_empty())
}

/// The Content-Security-Policy of every page; `form_actions` are the extra targets of a
/// form_post response (anything unsafe in a CSP directive is skipped).
pub fn content_security_policy(form_actions: &[String]) -> String {
    let mut csp = String::from(CSP_BASE);
    for a in form_actions.iter().filter_map(|a| form_action_source(a)) {
        csp.push(' ');
        csp.push_str(a);
    }
    csp.push_str(CSP_TAIL);
    csp
}

fn security_headers(h: &mut HeaderMap, form_actions: &[String]) {
    let csp = HeaderValue::from_str(&content_security_policy(form_actions)).unwrap_or_else(|_| {
        HeaderValue::from_static(
            "default-src 'none'; style-src 'self'; img-src 'self' data:; script-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        )
    });
    h.insert(header::CONTENT_SECURITY_POLICY, csp);
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
}

/// An HTML page with `status` and the security headers of docs/oidc.md. `form_actions` are
/// extra `form-action` targets (the `redirect_uri` of a form_post response); entries with
/// whitespace, `;` or `,` are skipped, and a query or fragment is dropped. Never panics: a
/// template failure is logged and becomes a plain 500 with `x-error` and `x-error-id`.
/// It adds no `x-error` itself; use [`error_page`] for errors.
pub fn render<T: Template>(status: StatusCode, page: &T, form_actions: &[String]) -> Response {
    match page.render() {
        Ok(html) => {
            let mut resp = (status, html).into_response();
            let h = resp.headers_mut();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
            security_headers(h, form_actions);
            resp
        }
        Err(e) => {
            let id = new_error_id();
            tracing::error!(error_id = %id, error = %e, "page rendering failed");
            let msg = format!("internal error (error id {id})");
            let mut resp = (StatusCode::INTERNAL_SERVER_ERROR, msg.clone()).into_response();
            let h = resp.headers_mut();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
            security_headers(h, &[]);
            h.insert(X_ERROR.clone(), header_text(&msg));
            h.insert(X_ERROR_ID.clone(), header_text(&id));
            resp
        }
    }
}

/// The admin portal's Content-Security-Policy: the pages' one, plus `connect-src 'self'` for
/// the live checks of `/assets/portal.js` (same-origin `fetch` only).
pub const PORTAL_CSP: &str = "default-src 'none'; style-src 'self'; img-src 'self' data:; script-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// [`render`] for the admin portal's pages: the same headers with [`PORTAL_CSP`].
pub fn render_portal<T: Template>(status: StatusCode, page: &T) -> Response {
    let mut r = render(status, page, &[]);
    r.headers_mut().insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(PORTAL_CSP));
    r
}

/// An HTML error page with a new error id, shown on the page and sent as `x-error-id`;
/// `x-error` carries the message. A 5xx logs `message` under the id and shows (and sends)
/// only a generic text.
pub fn error_page(status: StatusCode, message: &str) -> Response {
    let id = new_error_id();
    let public = if status.is_server_error() {
        tracing::error!(error_id = %id, status = status.as_u16(), internal = message, "server-side failure");
        "Something went wrong on our side. Please try again later.".to_owned()
    } else {
        message.to_owned()
    };
    let title = match status {
        s if s.is_server_error() => "Something went wrong",
        StatusCode::NOT_FOUND => "Not found",
        StatusCode::FORBIDDEN => "Not allowed",
        StatusCode::TOO_MANY_REQUESTS => "Too many attempts",
        _ => "This request cannot be completed",
    };
    let page = ErrorPage { title: title.to_owned(), message: public.clone(), error_id: id.clone() };
    let mut resp = render(status, &page, &[]);
    if resp.status() == status {
        let h = resp.headers_mut();
        h.insert(X_ERROR.clone(), header_text(&public));
        h.insert(X_ERROR_ID.clone(), header_text(&id));
    }
    resp
}

pub(crate) fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut resp = body.into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=3600"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    resp
}

/// `GET /assets/portcullis.css`
pub async fn css() -> Response {
    asset("text/css; charset=utf-8", CSS)
}

/// `GET /assets/form-post.js`
pub async fn form_post_js() -> Response {
    asset("text/javascript; charset=utf-8", FORM_POST_JS)
}

// ---------------------------------------------------------------------------------------------
// Cookies
// ---------------------------------------------------------------------------------------------

/// The value of cookie `name`: every `Cookie` header, `;`-separated pairs, exact name match,
/// first match wins.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v)
}

fn cookie_octets(s: &str) -> String {
    s.chars().filter(|c| c.is_ascii_graphic() && !matches!(c, '"' | ',' | ';' | '\\' | '=')).collect()
}

/// A `Set-Cookie` value: `Path=/; HttpOnly; SameSite=Lax`, plus `Secure` when `secure` and
/// `Max-Age` when given (`Some(0)` deletes the cookie). Characters not allowed in a cookie
/// are dropped from `name` and `value`.
pub fn set_cookie(name: &str, value: &str, max_age: Option<i64>, secure: bool) -> HeaderValue {
    let name = cookie_octets(name);
    let value: String =
        value.chars().filter(|c| c.is_ascii_graphic() && !matches!(c, '"' | ',' | ';' | '\\')).collect();
    let mut s = format!("{name}={value}; Path=/; HttpOnly; SameSite=Lax");
    if secure {
        s.push_str("; Secure");
    }
    if let Some(age) = max_age {
        s.push_str(&format!("; Max-Age={}", age.max(0)));
    }
    HeaderValue::from_str(&s).unwrap_or_else(|_| HeaderValue::from_static("portcullis_invalid=; Path=/; Max-Age=0"))
}

/// `__Host-{base}` when `secure` (the issuer is https), else `base`.
pub fn cookie_name(base: &str, secure: bool) -> String {
    if secure { format!("__Host-{base}") } else { base.to_owned() }
}

/// Whether the issuer is `https://` (cookies are then `Secure` and `__Host-` prefixed).
pub fn secure_issuer(issuer: &str) -> bool {
    issuer.get(..8).is_some_and(|p| p.eq_ignore_ascii_case("https://"))
}

// ---------------------------------------------------------------------------------------------
// CSRF
// ---------------------------------------------------------------------------------------------

/// The CSRF token for a form, and the cookie to set when the browser had none.
#[derive(Debug, Clone)]
pub struct Csrf {
    pub token: String,
    pub set_cookie: Option<HeaderValue>,
}

/// 256 bits, base64url without padding: 43 characters.
fn well_formed_binding(v: &str) -> bool {
    v.len() == 43 && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn new_binding() -> String {
    match portcullis_core::crypto::secrets::generate_secret() {
        Ok(s) => s.expose_secret().to_owned(),
        Err(e) => {
            // Should not happen; two v4 UUIDs still give 244 random bits.
            tracing::warn!(error = %e, "CSRF cookie: OS random failed, using UUIDs");
            let mut b = [0u8; 32];
            for (dst, src) in
                b.iter_mut().zip(uuid::Uuid::new_v4().as_bytes().iter().chain(uuid::Uuid::new_v4().as_bytes().iter()))
            {
                *dst = *src;
            }
            URL_SAFE_NO_PAD.encode(b)
        }
    }
}

/// The CSRF token for a form on this response. Reuses the browser's `portcullis_csrf` cookie
/// (named with [`cookie_name`]) when it is well formed; otherwise makes a new random one and
/// returns its `Set-Cookie` (a session cookie), which the handler must send.
pub fn csrf(core: &Portcullis, headers: &HeaderMap, secure: bool) -> Csrf {
    let name = cookie_name(CSRF_COOKIE, secure);
    match cookie(headers, &name).filter(|v| well_formed_binding(v)) {
        Some(binding) => Csrf { token: core.csrf_token(binding), set_cookie: None },
        None => {
            let binding = new_binding();
            Csrf { token: core.csrf_token(&binding), set_cookie: Some(set_cookie(&name, &binding, None, secure)) }
        }
    }
}

/// Whether `form_token` is the CSRF token of the browser's cookie (constant time).
pub fn csrf_ok(core: &Portcullis, headers: &HeaderMap, secure: bool, form_token: &str) -> bool {
    let name = cookie_name(CSRF_COOKIE, secure);
    match cookie(headers, &name).filter(|v| well_formed_binding(v)) {
        Some(binding) => core.check_csrf_token(binding, form_token),
        None => false,
    }
}

// ---------------------------------------------------------------------------------------------
// return_to
// ---------------------------------------------------------------------------------------------

const MAX_RETURN_TO: usize = 4096;

/// `s` when it is a same-origin path starting `/oauth2/authorize?`, or `/account` or `/portal`
/// (alone, or followed by `/…` or `?…`), at most 4096 bytes of printable ASCII (no `\`, no
/// control characters, no whitespace), with no `.`/`..` path segment (in any spelling a browser
/// resolves as one: `%2e`, `.%2e`, `%2e.`, `%2e%2e`, any case); otherwise `/account`.
pub fn safe_return_to(s: &str) -> String {
    const FALLBACK: &str = "/account";
    let under = |root: &str| {
        s.strip_prefix(root).is_some_and(|rest| rest.is_empty() || rest.starts_with('/') || rest.starts_with('?'))
    };
    let prefix_ok = s.starts_with("/oauth2/authorize?") || under("/account") || under("/portal");
    let chars_ok =
        s.len() <= MAX_RETURN_TO && !s.starts_with("//") && s.bytes().all(|b| b.is_ascii_graphic() && b != b'\\');
    let path = s.split(['?', '#']).next().unwrap_or("");
    let no_dots = !path.split('/').any(|seg| {
        let seg = seg.to_ascii_lowercase().replace("%2e", ".");
        seg == "." || seg == ".."
    });
    if prefix_ok && chars_ok && no_dots { s.to_owned() } else { FALLBACK.to_owned() }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use axum::body::to_bytes;
    use portcullis_core::clock::{Clock, ManualClock};
    use portcullis_core::crypto::vault::LocalKeyVault;
    use portcullis_core::settings::CoreSettings;
    use portcullis_store::SqliteStore;

    use super::*;

    const EVIL: &str = "<script>alert(1)</script>";

    async fn body(r: Response) -> String {
        String::from_utf8(to_bytes(r.into_body(), 1 << 20).await.unwrap().to_vec()).unwrap()
    }

    async fn core() -> (Portcullis, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::new(1_900_000_000));
        let store = SqliteStore::open(&dir.path().join("t.db"), clock.now()).await.unwrap();
        let core = Portcullis::new(
            Arc::new(store),
            clock,
            Arc::new(LocalKeyVault::new(&[7u8; 32]).unwrap()),
            CoreSettings::for_issuer("https://issuer.test"),
        );
        (core, dir)
    }

    fn login() -> LoginPage {
        LoginPage {
            csrf_token: "tok".into(),
            return_to: "/account".into(),
            email: EVIL.into(),
            error: Some(EVIL.into()),
            notice: Some("hello".into()),
            org_name: Some("Acme".into()),
            register_url: Some("/register?org=acme".into()),
        }
    }

    fn all_pages() -> Vec<Response> {
        let ok = StatusCode::OK;
        vec![
            render(ok, &login(), &[]),
            render(
                ok,
                &CodePage {
                    csrf_token: "t".into(),
                    return_to: "/account".into(),
                    error: None,
                    totp: true,
                    action: "/login/totp".into(),
                },
                &[],
            ),
            render(
                ok,
                &ConsentPage {
                    csrf_token: "t".into(),
                    request: "r".into(),
                    client_name: EVIL.into(),
                    client_id: "acme$app".into(),
                    org_name: "Acme".into(),
                    user_email: "a@b.c".into(),
                    scopes: vec![ScopeLine { name: "openid".into(), description: "Know who you are".into() }],
                },
                &[],
            ),
            render(
                StatusCode::BAD_REQUEST,
                &ErrorPage { title: "x".into(), message: "y".into(), error_id: "z".into() },
                &[],
            ),
            render(
                ok,
                &FormPostPage {
                    action: "https://app.test/cb".into(),
                    fields: vec![("code".into(), "c".into()), ("state".into(), EVIL.into())],
                },
                &["https://app.test/cb".into()],
            ),
            render(
                ok,
                &AccountPage {
                    csrf_token: "t".into(),
                    user_email: "a@b.c".into(),
                    user_name: None,
                    totp_enrolled: false,
                    consents: vec![],
                },
                &[],
            ),
            render(
                ok,
                &TotpEnrolPage {
                    csrf_token: "t".into(),
                    secret: "JBSWY3DPEHPK3PXP".into(),
                    otpauth_uri: "otpauth://totp/x?secret=JBSWY3DPEHPK3PXP".into(),
                    qr_svg: "<svg></svg>".into(),
                    error: None,
                },
                &[],
            ),
            render(
                ok,
                &InvitePage { csrf_token: "t".into(), token: "k".into(), email: "a@b.c".into(), error: None },
                &[],
            ),
            render(
                ok,
                &RegisterPage { csrf_token: "t".into(), org: "acme".into(), org_name: "Acme".into(), error: None },
                &[],
            ),
            render(
                ok,
                &MessagePage {
                    title: "Signed out".into(),
                    message: "Bye".into(),
                    link: Some(("/login".into(), "Sign in".into())),
                },
                &[],
            ),
            render(ok, &LogoutConfirmPage { csrf_token: "t".into(), fields: vec![("state".into(), "s".into())] }, &[]),
            error_page(StatusCode::BAD_REQUEST, "bad"),
            error_page(StatusCode::INTERNAL_SERVER_ERROR, "secret internals"),
        ]
    }

    #[tokio::test]
    async fn every_page_has_the_security_headers_and_renders() {
        for r in all_pages() {
            let h = r.headers();
            let csp = h.get(header::CONTENT_SECURITY_POLICY).unwrap().to_str().unwrap().to_owned();
            assert!(
                csp.starts_with(
                    "default-src 'none'; style-src 'self'; img-src 'self' data:; script-src 'self'; form-action 'self'"
                ),
                "{csp}"
            );
            assert!(csp.ends_with("; frame-ancestors 'none'; base-uri 'none'"), "{csp}");
            assert_eq!(h.get(header::X_FRAME_OPTIONS).unwrap(), "DENY");
            assert_eq!(h.get(header::CACHE_CONTROL).unwrap(), "no-store");
            assert_eq!(h.get(header::REFERRER_POLICY).unwrap(), "no-referrer");
            assert_eq!(h.get(header::X_CONTENT_TYPE_OPTIONS).unwrap(), "nosniff");
            assert_eq!(h.get(header::CONTENT_TYPE).unwrap(), "text/html; charset=utf-8");
            let status = r.status();
            let html = body(r).await;
            assert!(html.starts_with("<!doctype html>"), "{html}");
            assert!(html.contains("<link rel=\"stylesheet\" href=\"/assets/portcullis.css\">"));
            assert!(html.contains("Portcullis"));
            assert!(!html.contains("style="), "no inline styles (CSP)");
            assert!(!html.contains("<script>"), "no inline script");
            assert!(status.is_success() || html.contains("quote this id"));
        }
    }

    #[tokio::test]
    async fn user_text_is_escaped() {
        let html = body(render(StatusCode::OK, &login(), &[])).await;
        assert!(!html.contains(EVIL));
        assert!(html.contains("&#60;script&#62;") || html.contains("&lt;script&gt;"), "{html}");
        assert!(html.contains("name=\"email\" type=\"email\""));
        assert!(html.contains("autocomplete=\"username\""));
        assert!(html.contains("autocomplete=\"current-password\""));
        assert!(html.contains("name=\"csrf_token\" value=\"tok\""));
        assert!(html.contains("name=\"return_to\" value=\"/account\""));
        assert!(html.contains("href=\"/register?org=acme\""));

        for r in all_pages() {
            let html = body(r).await;
            assert!(!html.contains(EVIL), "{html}");
        }

        // An attribute cannot be broken out of.
        let page =
            FormPostPage { action: "https://app.test/cb\"><x".into(), fields: vec![("a\"b".into(), "c'd".into())] };
        let html = body(render(StatusCode::OK, &page, &[])).await;
        assert!(!html.contains("cb\"><x") && !html.contains("a\"b") && !html.contains("c'd"), "{html}");

        // Only a safe link is shown.
        let page = MessagePage {
            title: "t".into(),
            message: "m".into(),
            link: Some(("javascript:alert(1)".into(), "x".into())),
        };
        assert!(!body(render(StatusCode::OK, &page, &[])).await.contains("javascript:"));
    }

    #[tokio::test]
    async fn pages_carry_the_documented_form_fields() {
        let consent = ConsentPage {
            csrf_token: "t".into(),
            request: "req".into(),
            client_name: "App".into(),
            client_id: "acme$app".into(),
            org_name: "Acme".into(),
            user_email: "a@b.c".into(),
            scopes: vec![],
        };
        let html = body(render(StatusCode::OK, &consent, &[])).await;
        assert!(html.contains("action=\"/oauth2/consent\""));
        assert!(html.contains("name=\"request\" value=\"req\""));
        assert!(html.contains("name=\"decision\" value=\"allow\""));
        assert!(html.contains("name=\"decision\" value=\"deny\""));

        let code = |totp: bool| CodePage {
            csrf_token: "t".into(),
            return_to: "/oauth2/authorize?a=1&b=2".into(),
            error: Some("wrong code".into()),
            totp,
            action: if totp { "/login/totp" } else { "/login/code" }.into(),
        };
        let html = body(render(StatusCode::OK, &code(true), &[])).await;
        assert!(html.contains("action=\"/login/totp\"") && html.contains("authenticator app"));
        assert!(html.contains("name=\"code\"") && html.contains("autocomplete=\"one-time-code\""));
        assert!(html.contains("inputmode=\"numeric\"") && html.contains("pattern=\"[0-9]{6}\""));
        assert!(html.contains("wrong code"));
        let html = body(render(StatusCode::OK, &code(false), &[])).await;
        assert!(html.contains("action=\"/login/code\"") && html.contains("emailed you a 6-digit code"));

        let account = AccountPage {
            csrf_token: "t".into(),
            user_email: "a@b.c".into(),
            user_name: Some("Ann".into()),
            totp_enrolled: true,
            consents: vec![ConsentRow {
                client_id: "acme$app".into(),
                client_name: "App".into(),
                scopes: "openid email".into(),
                granted_at: "2030-01-01".into(),
            }],
        };
        let html = body(render(StatusCode::OK, &account, &[])).await;
        assert!(html.contains("action=\"/account/consents/revoke\""));
        assert!(html.contains("name=\"client_id\" value=\"acme$app\""));
        assert!(!html.contains("href=\"/account/totp\""), "an enrolled app is replaced only after an admin reset");
        assert!(html.contains("action=\"/oauth2/logout\""));
        let not_enrolled = AccountPage { totp_enrolled: false, ..account.clone() };
        assert!(body(render(StatusCode::OK, &not_enrolled, &[])).await.contains("href=\"/account/totp\""));
        let empty = AccountPage { consents: vec![], ..account };
        let html = body(render(StatusCode::OK, &empty, &[])).await;
        assert!(html.contains("not allowed any applications") && !html.contains("consents/revoke"));

        let totp = TotpEnrolPage {
            csrf_token: "t".into(),
            secret: "JBSWY3DPEHPK3PXP".into(),
            otpauth_uri: "otpauth://totp/x".into(),
            qr_svg: "<svg viewBox=\"0 0 1 1\"><rect width=\"1\" height=\"1\"/></svg>".into(),
            error: None,
        };
        let html = body(render(StatusCode::OK, &totp, &[])).await;
        assert!(html.contains("<svg viewBox=\"0 0 1 1\"><rect"), "the QR code is trusted markup");
        assert!(html.contains("JBSW Y3DP EHPK 3PXP"));
        assert!(html.contains("action=\"/account/totp\"") && html.contains("href=\"otpauth://totp/x\""));

        let invite = InvitePage { csrf_token: "t".into(), token: "k".into(), email: "a@b.c".into(), error: None };
        let html = body(render(StatusCode::OK, &invite, &[])).await;
        for f in ["name=\"token\" value=\"k\"", "name=\"password\"", "name=\"password_confirm\"", "minlength=\"12\""] {
            assert!(html.contains(f), "{f}");
        }
        let register =
            RegisterPage { csrf_token: "t".into(), org: "acme".into(), org_name: "Acme".into(), error: None };
        let html = body(render(StatusCode::OK, &register, &[])).await;
        for f in ["action=\"/register\"", "name=\"org\" value=\"acme\"", "name=\"email\"", "name=\"name\""] {
            assert!(html.contains(f), "{f}");
        }
        let logout =
            LogoutConfirmPage { csrf_token: "t".into(), fields: vec![("post_logout_redirect_uri".into(), "u".into())] };
        let html = body(render(StatusCode::OK, &logout, &[])).await;
        assert!(
            html.contains("Sign out of Portcullis?") && html.contains("name=\"post_logout_redirect_uri\" value=\"u\"")
        );
    }

    #[tokio::test]
    async fn form_post_has_a_button_a_script_file_and_no_inline_script() {
        let page = FormPostPage {
            action: "https://app.test/cb".into(),
            fields: vec![("code".into(), "abc".into()), ("state".into(), "s".into())],
        };
        let r = render(StatusCode::OK, &page, &["https://app.test/cb?x=1".into(), "https://a b".into(), "x;y".into()]);
        let csp = r.headers().get(header::CONTENT_SECURITY_POLICY).unwrap().to_str().unwrap().to_owned();
        assert!(csp.contains("form-action 'self' https://app.test/cb; frame-ancestors"), "{csp}");
        let html = body(r).await;
        assert!(html.contains("<form method=\"post\" action=\"https://app.test/cb\""));
        assert!(html.contains("name=\"code\" value=\"abc\""));
        assert!(html.contains("<button type=\"submit\""));
        assert!(html.contains("<script src=\"/assets/form-post.js\"></script>"));
        // Every script element has a src and no body.
        assert_eq!(html.matches("<script").count(), 1);
        assert_eq!(html.matches("<script src=\"/assets/form-post.js\"></script>").count(), 1);
        assert!(!html.contains("onload") && !html.contains("onclick"));
    }

    #[test]
    fn csp_skips_unsafe_form_actions() {
        let csp = content_security_policy(&[
            "https://ok.test/cb".into(),
            "https://a.test/cb; script-src *".into(),
            "https://b.test,x".into(),
            "https://c.test/\tx".into(),
            "'unsafe-inline'".into(),
            "https://ü.test".into(),
            String::new(),
        ]);
        assert_eq!(
            csp,
            "default-src 'none'; style-src 'self'; img-src 'self' data:; script-src 'self'; form-action 'self' https://ok.test/cb; frame-ancestors 'none'; base-uri 'none'"
        );
    }

    #[tokio::test]
    async fn assets_are_served_with_types_and_caching() {
        let r = css().await;
        assert_eq!(r.headers().get(header::CONTENT_TYPE).unwrap(), "text/css; charset=utf-8");
        assert_eq!(r.headers().get(header::CACHE_CONTROL).unwrap(), "public, max-age=3600");
        assert!(body(r).await.contains(":focus-visible"));
        let r = form_post_js().await;
        assert_eq!(r.headers().get(header::CONTENT_TYPE).unwrap(), "text/javascript; charset=utf-8");
        assert_eq!(r.headers().get(header::CACHE_CONTROL).unwrap(), "public, max-age=3600");
        assert!(body(r).await.contains("DOMContentLoaded"));
    }

    #[tokio::test]
    async fn error_page_sets_error_headers_to_the_id_in_the_body() {
        let r = error_page(StatusCode::BAD_REQUEST, "unknown client <b>");
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        let id = r.headers().get(&X_ERROR_ID).unwrap().to_str().unwrap().to_owned();
        assert_eq!(r.headers().get(&X_ERROR).unwrap(), "unknown client <b>");
        assert!(r.headers().get(header::LOCATION).is_none());
        let html = body(r).await;
        assert!(html.contains(&format!("<code class=\"error-id\">{id}</code>")), "{html}");
        assert!(html.contains("unknown client &#60;b&#62;") || html.contains("unknown client &lt;b&gt;"));

        let r = error_page(StatusCode::INTERNAL_SERVER_ERROR, "db password is hunter2");
        let id = r.headers().get(&X_ERROR_ID).unwrap().to_str().unwrap().to_owned();
        assert!(!r.headers().get(&X_ERROR).unwrap().to_str().unwrap().contains("hunter2"));
        let html = body(r).await;
        assert!(html.contains(&id) && !html.contains("hunter2"));
    }

    #[test]
    fn render_adds_no_error_headers() {
        let r = render(
            StatusCode::BAD_REQUEST,
            &ErrorPage { title: "t".into(), message: "m".into(), error_id: "i".into() },
            &[],
        );
        assert!(r.headers().get(&X_ERROR).is_none());
    }

    #[test]
    fn return_to_is_only_ever_a_local_authorize_or_account_path() {
        for good in [
            "/oauth2/authorize?client_id=acme%24app&scope=openid&state=x",
            "/account",
            "/account/totp",
            "/account?tab=1",
            "/portal",
            "/portal/orgs/acme/applications/web/delete",
            "/portal/orgs/acme/certificates?status=active&page=2",
        ] {
            assert_eq!(safe_return_to(good), good);
        }
        for bad in [
            "//evil",
            "//evil/account",
            "/\\evil",
            "/account\\..\\evil",
            "https://evil",
            "https://evil/oauth2/authorize?",
            "/oauth2/authorizeX",
            "/oauth2/authorize",
            "/oauth2/authorizeX?a=1",
            "/accounts",
            "/portals",
            "/portal/../account",
            "//portal",
            "/portal\\evil",
            "/account/\r\nLocation: x",
            "/account\t",
            "/account/\u{0}",
            "/account/\u{85}",
            "/account/../..//evil",
            "/account/%2e%2e/x",
            // Found by the return_to fuzz target: a browser resolves these as dot segments too.
            "/account/.%2e/admin",
            "/account/%2E./admin",
            "/portal/%2e/../x",
            "/account/%2e",
            "",
            "account",
            "javascript:alert(1)",
        ] {
            assert_eq!(safe_return_to(bad), "/account", "{bad:?}");
        }
        let long = format!("/oauth2/authorize?{}", "a".repeat(4096));
        assert_eq!(safe_return_to(&long), "/account");
        let max = format!("/oauth2/authorize?{}", "a".repeat(4096 - 18));
        assert_eq!(safe_return_to(&max), max);
    }

    #[test]
    fn cookies_are_parsed_by_exact_name() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("portcullis_csrf_x=1; xportcullis_csrf=2"));
        h.append(header::COOKIE, HeaderValue::from_static("a=b;portcullis_csrf=three; portcullis_csrf=four"));
        h.append(header::COOKIE, HeaderValue::from_static("__Host-portcullis_csrf=five"));
        assert_eq!(cookie(&h, "portcullis_csrf"), Some("three"));
        assert_eq!(cookie(&h, "__Host-portcullis_csrf"), Some("five"));
        assert_eq!(cookie(&h, "portcullis_csrf_x"), Some("1"));
        assert_eq!(cookie(&h, "a"), Some("b"));
        assert_eq!(cookie(&h, "portcullis"), None);
        assert_eq!(cookie(&HeaderMap::new(), "a"), None);
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, HeaderValue::from_static("empty=; x=a=b"));
        assert_eq!(cookie(&h, "empty"), Some(""));
        assert_eq!(cookie(&h, "x"), Some("a=b"));
    }

    #[test]
    fn set_cookie_attributes() {
        assert_eq!(set_cookie("n", "v", None, false), "n=v; Path=/; HttpOnly; SameSite=Lax");
        assert_eq!(
            set_cookie("__Host-n", "v", Some(3600), true),
            "__Host-n=v; Path=/; HttpOnly; SameSite=Lax; Secure; Max-Age=3600"
        );
        assert_eq!(set_cookie("n", "", Some(0), false), "n=; Path=/; HttpOnly; SameSite=Lax; Max-Age=0");
        assert_eq!(set_cookie("n", "a;b\r\nc", None, false), "n=abc; Path=/; HttpOnly; SameSite=Lax");
        assert_eq!(cookie_name("portcullis_sso", true), "__Host-portcullis_sso");
        assert_eq!(cookie_name("portcullis_sso", false), "portcullis_sso");
        assert!(secure_issuer("https://id.example"));
        assert!(!secure_issuer("http://localhost:8080"));
        assert!(!secure_issuer("https:/x"));
    }

    #[tokio::test]
    async fn csrf_tokens_are_bound_to_the_cookie() {
        let (core, _dir) = core().await;
        // No cookie: a new one, and its token checks out once the browser sends it back.
        let c = csrf(&core, &HeaderMap::new(), true);
        let set = c.set_cookie.clone().unwrap();
        let set = set.to_str().unwrap();
        assert!(set.starts_with("__Host-portcullis_csrf=") && set.contains("; Secure"), "{set}");
        let value = set.trim_start_matches("__Host-portcullis_csrf=").split(';').next().unwrap();
        assert_eq!(value.len(), 43);
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, HeaderValue::from_str(&format!("__Host-portcullis_csrf={value}")).unwrap());
        assert!(csrf_ok(&core, &h, true, &c.token));
        // Same cookie: same token, no new cookie.
        let again = csrf(&core, &h, true);
        assert!(again.set_cookie.is_none());
        assert_eq!(again.token, c.token);
        // The insecure name is another cookie.
        assert!(!csrf_ok(&core, &h, false, &c.token));
        // Another binding's token fails; so do a missing cookie and junk.
        let other = csrf(&core, &HeaderMap::new(), true);
        assert_ne!(other.token, c.token);
        assert!(!csrf_ok(&core, &h, true, &other.token));
        assert!(!csrf_ok(&core, &HeaderMap::new(), true, &c.token));
        assert!(!csrf_ok(&core, &h, true, ""));
        assert!(!csrf_ok(&core, &h, true, "not base64!"));
        // A malformed cookie is replaced.
        let mut bad = HeaderMap::new();
        bad.insert(header::COOKIE, HeaderValue::from_static("portcullis_csrf=short"));
        let c = csrf(&core, &bad, false);
        assert!(c.set_cookie.unwrap().to_str().unwrap().starts_with("portcullis_csrf="));
        assert!(!csrf_ok(&core, &bad, false, &core.csrf_token("short")));
    }
}
