//! The admin portal (`/portal…`, docs/portal.md): server-rendered askama pages
//! (`templates/portal/`) over the same core use cases as the admin API, so the same
//! authorization and the same audit apply. People sign in on Portcullis's own login pages; the
//! portal reads the SSO cookie exactly as `/account` does.
//!
//! What every page shares lives here: [`Visit`] (the signed-in admin, the request's context
//! and its CSRF token), the layout's [`Shell`] (navigation, organisation switcher, the notice
//! and the error with its id), form reading with the CSRF check, re-authentication for
//! sensitive actions, pagination and the assets. Page groups are submodules.
//!
//! Security: every form carries a CSRF token (a keyed hash of a cookie, [`pages::csrf`]); every
//! page is sent with the strict CSP of [`pages::render`] (no inline script or style: the one
//! script is `/assets/portal.js`); a secret rotation, a deletion, a disabling and a revocation
//! need a sign-in within the last 10 minutes, else the browser goes through `/login` again and
//! comes back to the confirmation page.

// A helper's `Err` is the page the handler answers with (at most one per request): boxing it
// would buy nothing.
#![allow(clippy::result_large_err)]

mod api_keys;
mod applications;
mod audit;
mod certificates;
mod dashboard;
mod services;
mod users;

use std::sync::Arc;

use askama::Template;
use axum::Router;
use axum::body::Body;
use axum::extract::{FromRequest, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use portcullis_core::Error;
use portcullis_core::model::{Organisation, Page};
use portcullis_core::usecases::{Principal, RequestContext, SessionEntry};

use crate::AppState;
use crate::body::{has_media_type, read_limited};
use crate::error::{X_ERROR, X_ERROR_ID, describe, header_text, new_error_id};
use crate::oidc;
use crate::pages::{self, Csrf};

const PORTAL_CSS: &str = include_str!("../../assets/portal.css");
const PORTAL_JS: &str = include_str!("../../assets/portal.js");

/// Page forms are small; a CSR upload is at most this (a PEM CSR is a few KiB).
const FORM_LIMIT: usize = 64 * 1024;
/// Rows per page of every list.
const PAGE_SIZE: u32 = 25;

pub fn routes() -> Router<AppState> {
    use applications as a;
    use certificates as c;
    use services as sv;
    let org = "/portal/orgs/{org}";
    Router::new()
        .route("/assets/portal.css", get(css))
        .route("/assets/portal.js", get(js))
        .route("/portal", get(dashboard::dashboard))
        .route("/portal/go", get(dashboard::go))
        .route(org, get(dashboard::organisation))
        .route(&format!("{org}/applications"), get(a::list).post(a::create))
        .route(&format!("{org}/applications/new"), get(a::new_form))
        .route(&format!("{org}/applications/check"), get(a::check))
        .route(&format!("{org}/applications/{{app}}"), get(a::detail))
        .route(&format!("{org}/applications/{{app}}/disable"), get(a::disable_confirm).post(a::disable))
        .route(&format!("{org}/applications/{{app}}/enable"), post(a::enable))
        .route(&format!("{org}/applications/{{app}}/rotate-secret"), get(a::rotate_confirm).post(a::rotate))
        .route(&format!("{org}/applications/{{app}}/delete"), get(a::delete_confirm).post(a::delete))
        .route(&format!("{org}/services"), get(sv::list).post(sv::create))
        .route(&format!("{org}/services/new"), get(sv::new_form))
        .route(&format!("{org}/services/{{svc}}"), get(sv::detail))
        .route(&format!("{org}/services/{{svc}}/delete"), get(sv::delete_confirm).post(sv::delete))
        .route(&format!("{org}/services/{{svc}}/roles/{{level}}"), get(sv::role).post(sv::set_grants))
        .route(&format!("{org}/certificates"), get(c::list).post(c::issue))
        .route(&format!("{org}/certificates/new"), get(c::wizard))
        .route(&format!("{org}/certificates/{{id}}"), get(c::detail))
        .route(&format!("{org}/certificates/{{id}}/{{file}}"), get(c::download))
        .route(&format!("{org}/certificates/{{id}}/revoke"), get(c::revoke_confirm).post(c::revoke))
        .route(&format!("{org}/certificates/{{id}}/renew"), get(c::renew_form).post(c::renew))
        .route(&format!("{org}/users"), get(users::list).post(users::invite))
        .route(&format!("{org}/users/invite"), get(users::invite_form))
        .route(&format!("{org}/users/{{id}}"), get(users::detail))
        .route(&format!("{org}/users/{{id}}/roles"), post(users::set_roles))
        .route(&format!("{org}/users/{{id}}/name"), post(users::set_name))
        .route(&format!("{org}/users/{{id}}/delete"), get(users::delete_confirm).post(users::delete))
        .route(&format!("{org}/users/{{id}}/invitation"), post(users::resend))
        .route(&format!("{org}/users/{{id}}/disable"), get(users::disable_confirm).post(users::disable))
        .route(&format!("{org}/users/{{id}}/enable"), post(users::enable))
        .route(&format!("{org}/users/{{id}}/reset-totp"), get(users::reset_totp_confirm).post(users::reset_totp))
        .route(
            &format!("{org}/users/{{id}}/sessions/revoke"),
            get(users::revoke_sessions_confirm).post(users::revoke_sessions),
        )
        .route(
            &format!("{org}/users/{{id}}/sessions/{{session}}/revoke"),
            get(users::revoke_session_confirm).post(users::revoke_session),
        )
        .route(&format!("{org}/audit"), get(audit::list))
        .route("/portal/api-keys", get(api_keys::list).post(api_keys::create))
        .route("/portal/api-keys/verify", post(api_keys::verify))
        .route("/portal/api-keys/{id}/revoke", get(api_keys::revoke_confirm).post(api_keys::revoke))
}

async fn css() -> Response {
    pages::asset("text/css; charset=utf-8", PORTAL_CSS)
}

async fn js() -> Response {
    pages::asset("text/javascript; charset=utf-8", PORTAL_JS)
}

// ---------------------------------------------------------------------------------------------
// The layout
// ---------------------------------------------------------------------------------------------

/// An organisation as the navigation shows it.
#[derive(Debug, Clone)]
pub struct OrgLink {
    pub slug: String,
    pub name: String,
}

impl From<&Organisation> for OrgLink {
    fn from(o: &Organisation) -> Self {
        Self { slug: o.slug.to_string(), name: o.name.clone() }
    }
}

/// Which tab of an organisation's navigation is current.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nav {
    Dashboard,
    Applications,
    Services,
    Certificates,
    Users,
    Audit,
    ApiKeys,
}

/// An error shown in the page, with the id also sent as `x-error-id`.
#[derive(Debug, Clone)]
pub struct PageError {
    pub message: String,
    pub id: String,
}

/// What `templates/portal/layout.html` shows around every page.
#[derive(Debug, Clone)]
pub struct Shell {
    pub csrf_token: String,
    pub user_email: String,
    pub platform_admin: bool,
    /// The organisations the switcher offers (at most 100; the dashboard pages through all).
    pub orgs: Vec<OrgLink>,
    /// The organisation the page is about.
    pub org: Option<OrgLink>,
    pub nav: Nav,
    pub notice: Option<String>,
    pub error: Option<PageError>,
}

impl Shell {
    fn is(&self, nav: Nav) -> bool {
        self.nav == nav
    }
    fn is_current(&self, slug: &str) -> bool {
        self.org.as_ref().is_some_and(|o| o.slug == slug)
    }
}

/// The page shown for an error (a refusal, a missing resource, a failure on our side).
#[derive(Template)]
#[template(path = "portal/error.html")]
struct ErrorPage {
    shell: Shell,
    title: String,
}

/// A confirmation before a destructive action: a form that POSTs to `action`.
#[derive(Template)]
#[template(path = "portal/confirm.html")]
pub struct ConfirmPage {
    pub shell: Shell,
    pub title: String,
    pub message: String,
    pub action: String,
    pub button: String,
    pub cancel: String,
    /// Hidden fields besides the CSRF token.
    pub fields: Vec<(String, String)>,
    /// Revocation reasons to choose from (a certificate's revocation); empty otherwise.
    pub reasons: Vec<(String, String)>,
}

/// The status and what to show of a core error; a 5xx logs its internals under the id and
/// shows none.
fn page_error(e: Error) -> (StatusCode, PageError) {
    let d = describe(e);
    let id = new_error_id();
    let message = if d.status.is_server_error() {
        tracing::error!(error_id = %id, status = d.status.as_u16(), internal = d.internal.as_deref().unwrap_or(""), "portal: server-side failure");
        "Something went wrong on our side. Please try again later.".to_owned()
    } else {
        d.public
    };
    (d.status, PageError { message, id })
}

/// Adds `x-error` and `x-error-id` (the id the page shows).
fn stamp(mut r: Response, err: &PageError) -> Response {
    r.headers_mut().insert(X_ERROR.clone(), header_text(&err.message));
    r.headers_mut().insert(X_ERROR_ID.clone(), header_text(&err.id));
    r
}

/// What a notice key in `?notice=` says (never the query's text itself).
fn notice_text(key: &str) -> Option<&'static str> {
    Some(match key {
        "app-deleted" => "The application was deleted. Its certificates were revoked.",
        "app-disabled" => "The application is disabled: it can no longer get tokens.",
        "app-enabled" => "The application is enabled.",
        "cert-issued" => "The certificate was issued. Download it and its chain below.",
        "cert-revoked" => "The certificate was revoked and the CRL re-signed.",
        "cert-renewed" => "The certificate was renewed. The old one stays valid until it expires or is revoked.",
        "service-created" => "The service is defined. Grant its permissions to its roles below.",
        "service-deleted" => "The service was deleted with its role grants.",
        "role-grants" => "The role's permissions are saved. They count at once in authorization checks.",
        "user-invited" => "The invitation is on its way: the link works once and expires in 7 days.",
        "user-reinvited" => "A new invitation link is on its way; the previous one no longer works.",
        "user-roles" => "The user's roles are saved. Removed roles count at once for their sessions and API keys.",
        "user-disabled" => "The user is disabled and signed out everywhere.",
        "user-renamed" => "The user's name is saved.",
        "user-deleted" => "The user was deleted with their sessions and API keys.",
        "user-enabled" => "The user is enabled.",
        "user-totp-reset" => "The second factor is reset: the next sign-in uses a code sent by email.",
        "sessions-revoked" => "Every session of the user was revoked.",
        "session-revoked" => "The session was revoked.",
        "key-activated" => "The API key is active.",
        "key-revoked" => "The API key was revoked.",
        _ => return None,
    })
}

// ---------------------------------------------------------------------------------------------
// The signed-in admin
// ---------------------------------------------------------------------------------------------

/// One request of a signed-in admin: who, from where, and the page's CSRF token. As an
/// extractor it sends a browser without a usable SSO session to `/login` (coming back to the
/// page it asked for), and refuses people who administer no organisation.
pub struct Visit {
    pub s: AppState,
    pub ctx: RequestContext,
    pub headers: HeaderMap,
    pub entry: Arc<SessionEntry>,
    pub who: Principal,
    pub csrf: Csrf,
    /// The query's notice, as text.
    notice: Option<String>,
}

impl FromRequestParts<AppState> for Visit {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, s: &AppState) -> Result<Self, Response> {
        let ctx = parts.extensions.get::<RequestContext>().cloned().unwrap_or_default();
        // Back to the page asked for after signing in; a form's POST goes back to the portal.
        let here = if parts.method == Method::GET {
            parts.uri.path_and_query().map(|p| p.as_str().to_owned()).unwrap_or_else(|| "/portal".into())
        } else {
            "/portal".to_owned()
        };
        let here = pages::safe_return_to(&here);
        let Some(token) = oidc::sso(s, &parts.headers) else {
            return Err(oidc::to_login(&here));
        };
        let entry = match s.core.account_session(token).await {
            Ok(e) => e,
            Err(Error::Unauthenticated(_)) => return Err(oidc::to_login(&here)),
            Err(e) => {
                let (status, err) = page_error(e);
                return Err(stamp(pages::error_page(status, &err.message), &err));
            }
        };
        let who = portcullis_core::Portcullis::session_principal(&entry);
        if !who.can_admin(&who.org) {
            return Err(pages::error_page(
                StatusCode::FORBIDDEN,
                "the portal is for administrators (role portcullis:admin, or portcullis:org-admin of an organisation); your own account is at /account",
            ));
        }
        let csrf = pages::csrf(&s.core, &parts.headers, oidc::secure(s));
        let notice = oidc::query_param(&parts.uri, "notice");
        Ok(Visit {
            s: s.clone(),
            ctx,
            headers: parts.headers.clone(),
            entry,
            who,
            csrf,
            notice: notice_text(&notice).map(str::to_owned),
        })
    }
}

impl Visit {
    /// The layout's data for a page about `org` (or about every organisation).
    pub async fn shell(&self, org: Option<&Organisation>, nav: Nav) -> Shell {
        let orgs = match self.s.core.organisations(&self.who, Page::new(Some(100), None)).await {
            Ok(list) => list.iter().map(OrgLink::from).collect(),
            Err(e) => {
                tracing::warn!(error = %e, "portal: could not list organisations for the switcher");
                Vec::new()
            }
        };
        Shell {
            csrf_token: self.csrf.token.clone(),
            user_email: self.entry.user.email.to_string(),
            platform_admin: self.who.is_platform_admin(),
            orgs,
            org: org.map(OrgLink::from),
            nav,
            notice: self.notice.clone(),
            error: None,
        }
    }

    /// An HTML page with the CSRF cookie when the browser had none.
    pub fn page<T: Template>(&self, status: StatusCode, page: &T) -> Response {
        oidc::with_cookies(pages::render_portal(status, page), [self.csrf.set_cookie.clone()])
    }

    /// A page that shows `err` (already in its shell): `status`, `x-error` and `x-error-id`.
    pub fn failed<T: Template>(&self, status: StatusCode, page: &T, err: &PageError) -> Response {
        stamp(self.page(status, page), err)
    }

    /// A core error as a page in the portal's layout (or the way to sign in again).
    pub async fn fail(&self, org: Option<&Organisation>, e: Error) -> Response {
        if matches!(e, Error::Unauthenticated(_)) {
            return oidc::to_login("/portal");
        }
        let (status, err) = page_error(e);
        let title = match status {
            s if s.is_server_error() => "Something went wrong",
            StatusCode::NOT_FOUND => "Not found",
            StatusCode::FORBIDDEN => "Not allowed",
            StatusCode::CONFLICT => "This cannot be done now",
            _ => "This request cannot be completed",
        };
        let mut shell = self.shell(org, Nav::Dashboard).await;
        shell.error = Some(err.clone());
        self.failed(status, &ErrorPage { shell, title: title.to_owned() }, &err)
    }

    /// The organisation `slug`, if this admin administers it (else the error page).
    pub async fn org(&self, slug: &str) -> Result<Organisation, Response> {
        match self.s.core.organisation(&self.who, slug).await {
            Ok(o) => Ok(o),
            Err(e) => Err(self.fail(None, e).await),
        }
    }

    /// Whether the sign-in is recent enough for a sensitive action.
    pub fn fresh(&self) -> bool {
        self.s.core.recent_sign_in(&self.entry)
    }

    /// Through the sign-in page again, then back to `back` (a confirmation page).
    pub fn reauthenticate(&self, back: &str) -> Response {
        let back = pages::safe_return_to(back);
        oidc::see_other(&format!("/login?reauth=1&{}", oidc::encode(&[("return_to".to_owned(), back)])))
    }

    /// A urlencoded form's fields, after its CSRF token was checked.
    pub async fn form(&self, body: Body) -> Result<Fields, Response> {
        let pairs = oidc::form_pairs(&self.headers, body).await?;
        self.checked(pairs)
    }

    /// A form that may be `multipart/form-data` (a CSR upload) or urlencoded; a file field's
    /// content becomes the field's value (UTF-8 text; a CSR is PEM).
    pub async fn upload_form(&self, body: Body) -> Result<Fields, Response> {
        if !has_media_type(&self.headers, "multipart/form-data") {
            return self.form(body).await;
        }
        let too_large = || pages::error_page(StatusCode::PAYLOAD_TOO_LARGE, "the form is too large (64 KiB at most)");
        let bytes = read_limited(body, FORM_LIMIT).await.map_err(|_| too_large())?;
        let mut req = axum::http::Request::new(Body::from(bytes));
        if let Some(ct) = self.headers.get(header::CONTENT_TYPE) {
            req.headers_mut().insert(header::CONTENT_TYPE, ct.clone());
        }
        let bad = |m: &str| pages::error_page(StatusCode::BAD_REQUEST, m);
        let mut mp = axum::extract::Multipart::from_request(req, &())
            .await
            .map_err(|_| bad("the upload is not a well-formed multipart/form-data body"))?;
        let mut pairs = Vec::new();
        loop {
            match mp.next_field().await {
                Ok(Some(f)) => {
                    let name = f.name().unwrap_or_default().to_owned();
                    let data = f.bytes().await.map_err(|_| bad("the upload is not well formed"))?;
                    let text = String::from_utf8(data.to_vec()).map_err(|_| {
                        bad("an uploaded file must be text: a PEM CSR (-----BEGIN CERTIFICATE REQUEST-----)")
                    })?;
                    pairs.push((name, text));
                }
                Ok(None) => break,
                Err(_) => return Err(bad("the upload is not well formed")),
            }
        }
        self.checked(pairs)
    }

    fn checked(&self, pairs: Vec<(String, String)>) -> Result<Fields, Response> {
        let fields = Fields(pairs);
        let token = fields.one("csrf_token")?;
        if !pages::csrf_ok(&self.s.core, &self.headers, oidc::secure(&self.s), &token) {
            return Err(oidc::csrf_refused());
        }
        Ok(fields)
    }
}

/// A submitted form's fields.
pub struct Fields(Vec<(String, String)>);

impl Fields {
    /// The one value of `name` (`""` when absent); a repeated field is refused.
    pub fn one(&self, name: &str) -> Result<String, Response> {
        oidc::field(&self.0, name).map(str::to_owned).ok_or_else(|| {
            pages::error_page(StatusCode::BAD_REQUEST, &format!("the field {name} is given more than once"))
        })
    }
    /// Every non-empty value of `name` (checkboxes).
    pub fn all(&self, name: &str) -> Vec<String> {
        self.0.iter().filter(|(k, v)| k == name && !v.is_empty()).map(|(_, v)| v.clone()).collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Lists
// ---------------------------------------------------------------------------------------------

/// Offset pagination of a list page: `?page=N` (from 1), [`PAGE_SIZE`] rows, one more fetched
/// to know whether a next page exists.
#[derive(Debug, Clone)]
pub struct Pager {
    pub number: u64,
    pub prev: Option<String>,
    pub next: Option<String>,
}

impl Pager {
    /// The store page for `?page=` (one extra row).
    pub fn request(uri: &axum::http::Uri) -> (u64, Page) {
        Self::request_named(uri, "page")
    }

    /// The same for a page number in `?{param}=` (a page with two lists).
    pub fn request_named(uri: &axum::http::Uri, param: &str) -> (u64, Page) {
        let n = oidc::query_param(uri, param).parse::<u64>().ok().filter(|n| (1..=100_000).contains(n)).unwrap_or(1);
        (n, Page::new(Some(PAGE_SIZE + 1), Some((n - 1) * u64::from(PAGE_SIZE))))
    }

    /// Trims `rows` to the page and links the neighbours (`base` is the path with the list's
    /// other query parameters, `keep`).
    pub fn cut<T>(n: u64, rows: &mut Vec<T>, base: &str, keep: &[(String, String)]) -> Pager {
        Self::cut_named(n, rows, base, keep, "page")
    }

    /// [`Self::cut`] for a page number in `?{param}=`.
    pub fn cut_named<T>(n: u64, rows: &mut Vec<T>, base: &str, keep: &[(String, String)], param: &str) -> Pager {
        let more = rows.len() > PAGE_SIZE as usize;
        rows.truncate(PAGE_SIZE as usize);
        let link = |p: u64| {
            let mut q: Vec<(String, String)> =
                keep.iter().filter(|(k, v)| !v.is_empty() && k != param).cloned().collect();
            if p > 1 {
                q.push((param.into(), p.to_string()));
            }
            if q.is_empty() { base.to_owned() } else { format!("{base}?{}", oidc::encode(&q)) }
        };
        Pager { number: n, prev: (n > 1).then(|| link(n - 1)), next: more.then(|| link(n + 1)) }
    }
}

/// A download: `Content-Disposition: attachment` with a plain file name.
pub fn attachment(content_type: &'static str, file_name: &str, body: String) -> Response {
    let mut r = body.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    let clean: String =
        file_name.chars().filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')).take(100).collect();
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{clean}\"")) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    r
}

/// A date and time for people (UTC, to the minute) from an RFC 3339 string.
pub fn short_time(rfc3339: &str) -> String {
    let t = rfc3339.replacen('T', " ", 1);
    let t = t.trim_end_matches('Z');
    t.get(..16).unwrap_or(t).to_owned() + " UTC"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pager_pages_and_keeps_the_filters() {
        let uri: axum::http::Uri = "/x?page=3".parse().unwrap();
        let (n, page) = Pager::request(&uri);
        assert_eq!((n, page.limit, page.offset), (3, PAGE_SIZE + 1, 50));
        let mut rows: Vec<u32> = (0..PAGE_SIZE + 1).collect();
        let p = Pager::cut(n, &mut rows, "/l", &[("status".into(), "active".into()), ("type".into(), String::new())]);
        assert_eq!(rows.len(), PAGE_SIZE as usize);
        assert_eq!(p.prev.as_deref(), Some("/l?status=active&page=2"));
        assert_eq!(p.next.as_deref(), Some("/l?status=active&page=4"));
        let mut few = vec![1];
        let p = Pager::cut(1, &mut few, "/l", &[]);
        assert!(p.prev.is_none() && p.next.is_none());
        for bad in ["/x?page=0", "/x?page=-1", "/x?page=abc", "/x?page=999999999999"] {
            assert_eq!(Pager::request(&bad.parse().unwrap()).0, 1, "{bad}");
        }
    }

    #[test]
    fn notices_are_fixed_texts() {
        assert!(notice_text("app-deleted").is_some());
        assert!(notice_text("<script>").is_none());
    }

    #[test]
    fn attachment_names_are_plain() {
        let r = attachment("application/x-pem-file", "acme$web\"\r\n.pem", "x".into());
        assert_eq!(r.headers().get(header::CONTENT_DISPOSITION).unwrap(), "attachment; filename=\"acmeweb.pem\"");
    }

    #[test]
    fn times_are_short() {
        assert_eq!(short_time("2030-01-02T03:04:05Z"), "2030-01-02 03:04 UTC");
    }
}
