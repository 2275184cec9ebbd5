//! Applications (OAuth clients) of an organisation: the list, the creation form (its client id
//! checked live by `/assets/portal.js` against [`check`]; the server's validation is the real
//! check), the secret shown once with a ready `curl`, secret rotation, disabling, deletion.

use askama::Template;
use axum::Json;
use axum::body::Body;
use axum::extract::Path;
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use portcullis_core::Error;
use portcullis_core::ids::Slug;
use portcullis_core::model::{Application, Organisation};
use portcullis_core::usecases::{ApplicationPatch, ApplicationView, NewApplication, SecretRotation};
use secrecy::ExposeSecret;

use super::{ConfirmPage, Fields, Nav, Pager, Shell, Visit, page_error, short_time};
use crate::oidc;

const GRANTS: [(&str, &str); 3] = [
    ("client_credentials", "Client credentials (machine to machine)"),
    ("authorization_code", "Authorization code with PKCE (people sign in)"),
    ("refresh_token", "Refresh tokens"),
];

const METHODS: [(&str, &str); 5] = [
    ("client_secret_basic", "Client secret, HTTP Basic (client_secret_basic)"),
    ("client_secret_post", "Client secret in the form (client_secret_post)"),
    ("private_key_jwt", "Signed assertion with a signing certificate (private_key_jwt)"),
    ("tls_client_auth", "Client certificate over mTLS (tls_client_auth)"),
    ("none", "None: a public client with PKCE (single-page or mobile app)"),
];

/// The kinds of application the form offers; each presets grants and authentication.
const KINDS: [(&str, &str); 3] = [
    ("machine", "Machine to machine (a backend calling APIs)"),
    ("web", "Web application (people sign in; server-side secret)"),
    ("spa", "Single-page or mobile app (people sign in; public client)"),
];

const STANDARD_SCOPES: [&str; 4] = ["openid", "profile", "email", "offline_access"];

fn kind_defaults(kind: &str) -> (&'static [&'static str], &'static str) {
    match kind {
        "web" => (&["authorization_code", "refresh_token"], "client_secret_basic"),
        "spa" => (&["authorization_code", "refresh_token"], "none"),
        _ => (&["client_credentials"], "client_secret_basic"),
    }
}

fn base(org: &str) -> String {
    format!("/portal/orgs/{org}/applications")
}

// ---- the list ------------------------------------------------------------------------------

pub struct AppRow {
    pub slug: String,
    pub name: String,
    pub client_id: String,
    pub grants: String,
    pub method: String,
    pub enabled: bool,
}

#[derive(Template)]
#[template(path = "portal/applications.html")]
struct ListPage {
    shell: Shell,
    org: String,
    q: String,
    rows: Vec<AppRow>,
    pager: Pager,
}

/// `GET /portal/orgs/{org}/applications?q=&page=`: searched by a part of the slug or name.
pub async fn list(v: Visit, Path(org): Path<String>, uri: Uri) -> Response {
    let o = match v.org(&org).await {
        Ok(o) => o,
        Err(r) => return r,
    };
    let q = oidc::query_param(&uri, "q").trim().to_owned();
    let (n, page) = Pager::request(&uri);
    let (mut apps, failure) = match v.s.core.search_applications(&v.who, &org, Some(&q), page).await {
        Ok(a) => (a, None),
        Err(e @ Error::InvalidInput(_)) => (Vec::new(), Some(page_error(e))),
        Err(e) => return v.fail(Some(&o), e).await,
    };
    let pager = Pager::cut(n, &mut apps, &base(&org), &[("q".into(), q.clone())]);
    let rows = apps
        .iter()
        .map(|a| AppRow {
            slug: a.slug.to_string(),
            name: a.name.clone(),
            client_id: a.client_id.to_string(),
            grants: a.grant_types.iter().map(|g| g.as_str()).collect::<Vec<_>>().join(", "),
            method: a.auth_method.as_str().to_owned(),
            enabled: a.enabled,
        })
        .collect();
    let mut shell = v.shell(Some(&o), Nav::Applications).await;
    shell.error = failure.as_ref().map(|(_, e)| e.clone());
    let page = ListPage { shell, org: o.slug.to_string(), q, rows, pager };
    match failure {
        Some((status, err)) => v.failed(status, &page, &err),
        None => v.page(StatusCode::OK, &page),
    }
}

// ---- creation ------------------------------------------------------------------------------

/// What the creation form holds (kept when it is shown again with an error).
#[derive(Debug, Clone, Default)]
pub struct AppForm {
    pub name: String,
    pub slug: String,
    pub kind: String,
    pub grant_types: Vec<String>,
    pub method: String,
    pub redirect_uris: String,
    pub scopes: Vec<String>,
    pub roles: Vec<String>,
}

impl AppForm {
    fn has_grant(&self, g: &str) -> bool {
        self.grant_types.iter().any(|x| x == g)
    }
    fn has_scope(&self, s: &str) -> bool {
        self.scopes.iter().any(|x| x == s)
    }
    fn has_role(&self, r: &str) -> bool {
        self.roles.iter().any(|x| x == r)
    }
    fn is_kind(&self, k: &str) -> bool {
        self.kind == k
    }
    fn is_method(&self, m: &str) -> bool {
        self.method == m
    }
}

#[derive(Template)]
#[template(path = "portal/application_new.html")]
struct NewPage {
    shell: Shell,
    org: String,
    form: AppForm,
    kinds: Vec<(&'static str, &'static str)>,
    grants: Vec<(&'static str, &'static str)>,
    methods: Vec<(&'static str, &'static str)>,
    scopes: Vec<String>,
    roles: Vec<String>,
}

/// The scopes and roles an application of `org` may be given (its services' and the standard
/// OpenID Connect scopes).
async fn grantable(v: &Visit, org: &str) -> Result<(Vec<String>, Vec<String>), Error> {
    let services = v.s.core.services(&v.who, org).await?;
    let mut scopes: Vec<String> = STANDARD_SCOPES.iter().map(|s| (*s).to_owned()).collect();
    let mut roles = Vec::new();
    for svc in &services {
        scopes.extend(svc.scopes.iter().map(ToString::to_string));
        roles.extend(svc.roles.iter().map(ToString::to_string));
    }
    Ok((scopes, roles))
}

async fn new_page(v: &Visit, o: &Organisation, form: AppForm) -> Result<NewPage, Response> {
    let (scopes, roles) = match grantable(v, o.slug.as_str()).await {
        Ok(x) => x,
        Err(e) => return Err(v.fail(Some(o), e).await),
    };
    Ok(NewPage {
        shell: v.shell(Some(o), Nav::Applications).await,
        org: o.slug.to_string(),
        form,
        kinds: KINDS.to_vec(),
        grants: GRANTS.to_vec(),
        methods: METHODS.to_vec(),
        scopes,
        roles,
    })
}

/// `GET /portal/orgs/{org}/applications/new`.
pub async fn new_form(v: Visit, Path(org): Path<String>) -> Response {
    let o = match v.org(&org).await {
        Ok(o) => o,
        Err(r) => return r,
    };
    let (grants, method) = kind_defaults("machine");
    let form = AppForm {
        kind: "machine".into(),
        grant_types: grants.iter().map(|g| (*g).to_owned()).collect(),
        method: method.into(),
        ..AppForm::default()
    };
    match new_page(&v, &o, form).await {
        Ok(p) => v.page(StatusCode::OK, &p),
        Err(r) => r,
    }
}

fn read_form(f: &Fields) -> Result<AppForm, Response> {
    let kind = f.one("kind")?;
    let kind = if KINDS.iter().any(|(k, _)| *k == kind) { kind } else { "machine".to_owned() };
    let (default_grants, default_method) = kind_defaults(&kind);
    let mut grant_types = f.all("grant_types");
    if grant_types.is_empty() {
        grant_types = default_grants.iter().map(|g| (*g).to_owned()).collect();
    }
    let method = Some(f.one("token_endpoint_auth_method")?).filter(|m| !m.is_empty());
    Ok(AppForm {
        name: f.one("name")?.trim().to_owned(),
        slug: f.one("slug")?.trim().to_owned(),
        kind,
        grant_types,
        method: method.unwrap_or_else(|| default_method.to_owned()),
        redirect_uris: f.one("redirect_uris")?,
        scopes: f.all("scopes"),
        roles: f.all("roles"),
    })
}

#[derive(Template)]
#[template(path = "portal/application_secret.html")]
struct SecretPage {
    shell: Shell,
    org: String,
    app: ApplicationView,
    /// Shown once.
    secret: Option<String>,
    curl: Option<String>,
    rotated: bool,
    previous_until: Option<String>,
}

/// The ready `curl` for a token with the client credentials grant, when the application has
/// that grant and a secret-based or certificate method. With `secret` it is pasted in (single
/// quotes); without, the command reads the shell variable `$CLIENT_SECRET` (double quotes, so
/// the shell expands it; the client id's `$` stays in single quotes).
fn curl_command(issuer: &str, app: &Application, secret: Option<&str>) -> Option<String> {
    use portcullis_core::model::{AuthMethod, GrantType};
    if !app.grant_types.contains(&GrantType::ClientCredentials) {
        return None;
    }
    let token = format!("{}/oauth2/token", issuer.trim_end_matches('/'));
    let id = app.client_id.as_str();
    match (app.auth_method, secret) {
        (AuthMethod::ClientSecretBasic, Some(s)) => {
            Some(format!("curl -s -u '{id}:{s}' -d grant_type=client_credentials {token}"))
        }
        (AuthMethod::ClientSecretBasic, None) => {
            Some(format!("curl -s -u '{id}':\"$CLIENT_SECRET\" -d grant_type=client_credentials {token}"))
        }
        (AuthMethod::ClientSecretPost, Some(s)) => {
            Some(format!("curl -s -d grant_type=client_credentials -d 'client_id={id}' -d 'client_secret={s}' {token}"))
        }
        (AuthMethod::ClientSecretPost, None) => Some(format!(
            "curl -s -d grant_type=client_credentials -d 'client_id={id}' -d \"client_secret=$CLIENT_SECRET\" {token}"
        )),
        (AuthMethod::TlsClientAuth, _) => Some(format!(
            "curl -s --cert {slug}.pem --key {slug}.key -d grant_type=client_credentials -d 'client_id={id}' {token}",
            slug = app.slug
        )),
        (AuthMethod::PrivateKeyJwt | AuthMethod::None, _) => None,
    }
}

/// `POST /portal/orgs/{org}/applications`.
pub async fn create(v: Visit, Path(org): Path<String>, body: Body) -> Response {
    let fields = match v.form(body).await {
        Ok(f) => f,
        Err(r) => return r,
    };
    let o = match v.org(&org).await {
        Ok(o) => o,
        Err(r) => return r,
    };
    let form = match read_form(&fields) {
        Ok(f) => f,
        Err(r) => return r,
    };
    let req = NewApplication {
        slug: form.slug.clone(),
        name: form.name.clone(),
        grant_types: Some(form.grant_types.clone()),
        scopes: form.scopes.clone(),
        roles: form.roles.clone(),
        token_endpoint_auth_method: Some(form.method.clone()),
        redirect_uris: form.redirect_uris.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_owned).collect(),
        first_party: Some(form.kind != "machine"),
        ..NewApplication::default()
    };
    match v.s.core.create_application(&v.who, &v.ctx, &org, req).await {
        Ok(created) => {
            let secret = created.client_secret.as_ref().map(|s| s.expose_secret().to_owned());
            let page = SecretPage {
                shell: v.shell(Some(&o), Nav::Applications).await,
                org: o.slug.to_string(),
                curl: secret.as_deref().and_then(|s| curl_command(v.s.core.issuer(), &created.app, Some(s))),
                app: ApplicationView::new(&created.app, o.slug.as_str()),
                secret,
                rotated: false,
                previous_until: None,
            };
            v.page(StatusCode::CREATED, &page)
        }
        Err(
            e @ (Error::InvalidInput(_) | Error::Conflict(_) | Error::Store(portcullis_core::StoreError::Conflict(_))),
        ) => {
            let (status, err) = page_error(e);
            match new_page(&v, &o, form).await {
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

/// `GET /portal/orgs/{org}/applications/check?slug=…`: the live check of the creation form.
/// JSON `{client_id, valid, available, message}`; the form's POST checks again.
pub async fn check(v: Visit, Path(org): Path<String>, uri: Uri) -> Response {
    let slug = oidc::query_param(&uri, "slug");
    let client_id = format!("{org}${slug}");
    let answer = |valid: bool, available: bool, message: String| {
        Json(serde_json::json!({ "client_id": client_id, "valid": valid, "available": available, "message": message }))
            .into_response()
    };
    if let Err(Error::InvalidInput(m)) = Slug::parse(&slug) {
        return answer(false, false, m);
    }
    match v.s.core.application(&v.who, &org, &slug).await {
        Ok(_) => answer(true, false, format!("{client_id} is already taken")),
        Err(Error::NotFound(_)) => answer(true, true, format!("{client_id} is available")),
        Err(e) => crate::error::ApiError::from(e).into_response(),
    }
}

// ---- one application -----------------------------------------------------------------------

#[derive(Template)]
#[template(path = "portal/application.html")]
struct DetailPage {
    shell: Shell,
    org: String,
    app: ApplicationView,
    curl: Option<String>,
    created: String,
    jwks_url: String,
}

async fn org_and_app(v: &Visit, org: &str, app: &str) -> Result<(Organisation, Application), Response> {
    let o = v.org(org).await?;
    match v.s.core.application(&v.who, org, app).await {
        Ok(a) => Ok((o, a)),
        Err(e) => Err(v.fail(Some(&o), e).await),
    }
}

/// `GET /portal/orgs/{org}/applications/{app}`.
pub async fn detail(v: Visit, Path((org, app)): Path<(String, String)>) -> Response {
    let (o, a) = match org_and_app(&v, &org, &app).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let issuer = v.s.core.issuer().trim_end_matches('/').to_owned();
    let view = ApplicationView::new(&a, o.slug.as_str());
    let page = DetailPage {
        shell: v.shell(Some(&o), Nav::Applications).await,
        org: o.slug.to_string(),
        curl: curl_command(&issuer, &a, None),
        created: short_time(&portcullis_core::clock::rfc3339(a.created_at)),
        jwks_url: format!("{issuer}{}", view.certificate_jwks_uri),
        app: view,
    };
    v.page(StatusCode::OK, &page)
}

fn confirm(shell: Shell, title: &str, message: String, action: String, button: &str, cancel: String) -> ConfirmPage {
    ConfirmPage {
        shell,
        title: title.to_owned(),
        message,
        action,
        button: button.to_owned(),
        cancel,
        fields: Vec::new(),
        reasons: Vec::new(),
    }
}

/// A confirmation page for a sensitive action on an application (after a recent sign-in).
async fn confirm_page(
    v: Visit,
    org: &str,
    app: &str,
    what: &str,
    title: &str,
    button: &str,
    message: impl FnOnce(&Application) -> String,
) -> Response {
    let here = format!("{}/{app}/{what}", base(org));
    if !v.fresh() {
        return v.reauthenticate(&here);
    }
    let (o, a) = match org_and_app(&v, org, app).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let cancel = format!("{}/{}", base(org), a.slug);
    let page = confirm(v.shell(Some(&o), Nav::Applications).await, title, message(&a), here, button, cancel);
    v.page(StatusCode::OK, &page)
}

/// `GET …/applications/{app}/rotate-secret`.
pub async fn rotate_confirm(v: Visit, Path((org, app)): Path<(String, String)>) -> Response {
    confirm_page(v, &org, &app, "rotate-secret", "Rotate the client secret?", "Rotate secret", |a| {
        format!(
            "A new secret is generated for {} and shown once. The current secret keeps working for the grace period, then stops: update every deployment of the application before then.",
            a.client_id
        )
    })
    .await
}

/// `GET …/applications/{app}/delete`.
pub async fn delete_confirm(v: Visit, Path((org, app)): Path<(String, String)>) -> Response {
    confirm_page(v, &org, &app, "delete", "Delete the application?", "Delete application", |a| {
        format!(
            "{} ({}) is deleted for good: it can no longer get tokens, its certificates are revoked and its role grants removed. This cannot be undone.",
            a.name, a.client_id
        )
    })
    .await
}

/// `GET …/applications/{app}/disable`.
pub async fn disable_confirm(v: Visit, Path((org, app)): Path<(String, String)>) -> Response {
    confirm_page(v, &org, &app, "disable", "Disable the application?", "Disable application", |a| {
        format!(
            "{} can no longer get tokens until it is enabled again. Tokens it already holds stay valid until they expire.",
            a.client_id
        )
    })
    .await
}

/// Checks a sensitive action's form: CSRF, then a recent sign-in (else back through the
/// login to the confirmation page).
async fn sensitive(v: &Visit, body: Body, confirm_page: &str) -> Result<Fields, Response> {
    let f = v.form(body).await?;
    if !v.fresh() {
        return Err(v.reauthenticate(confirm_page));
    }
    Ok(f)
}

/// `POST …/applications/{app}/rotate-secret`.
pub async fn rotate(v: Visit, Path((org, app)): Path<(String, String)>, body: Body) -> Response {
    if let Err(r) = sensitive(&v, body, &format!("{}/{app}/rotate-secret", base(&org))).await {
        return r;
    }
    let o = match v.org(&org).await {
        Ok(o) => o,
        Err(r) => return r,
    };
    match v.s.core.rotate_client_secret(&v.who, &v.ctx, &org, &app, SecretRotation::default()).await {
        Ok((a, secret)) => {
            let secret = secret.expose_secret().to_owned();
            let page = SecretPage {
                shell: v.shell(Some(&o), Nav::Applications).await,
                org: o.slug.to_string(),
                curl: curl_command(v.s.core.issuer(), &a, Some(&secret)),
                previous_until: a.previous_secret_expires_at.map(|t| short_time(&portcullis_core::clock::rfc3339(t))),
                app: ApplicationView::new(&a, o.slug.as_str()),
                secret: Some(secret),
                rotated: true,
            };
            v.page(StatusCode::OK, &page)
        }
        Err(e) => v.fail(Some(&o), e).await,
    }
}

/// `POST …/applications/{app}/delete`.
pub async fn delete(v: Visit, Path((org, app)): Path<(String, String)>, body: Body) -> Response {
    if let Err(r) = sensitive(&v, body, &format!("{}/{app}/delete", base(&org))).await {
        return r;
    }
    match v.s.core.delete_application(&v.who, &v.ctx, &org, &app).await {
        Ok(()) => oidc::see_other(&format!("{}?notice=app-deleted", base(&org))),
        Err(e) => v.fail(None, e).await,
    }
}

async fn set_enabled(v: Visit, org: &str, app: &str, enabled: bool) -> Response {
    let patch = ApplicationPatch { enabled: Some(enabled), ..ApplicationPatch::default() };
    match v.s.core.update_application(&v.who, &v.ctx, org, app, patch).await {
        Ok(a) => {
            let notice = if enabled { "app-enabled" } else { "app-disabled" };
            oidc::see_other(&format!("{}/{}?notice={notice}", base(org), a.slug))
        }
        Err(e) => v.fail(None, e).await,
    }
}

/// `POST …/applications/{app}/disable`.
pub async fn disable(v: Visit, Path((org, app)): Path<(String, String)>, body: Body) -> Response {
    if let Err(r) = sensitive(&v, body, &format!("{}/{app}/disable", base(&org))).await {
        return r;
    }
    set_enabled(v, &org, &app, false).await
}

/// `POST …/applications/{app}/enable`.
pub async fn enable(v: Visit, Path((org, app)): Path<(String, String)>, body: Body) -> Response {
    if let Err(r) = v.form(body).await {
        return r;
    }
    set_enabled(v, &org, &app, true).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_preset_grants_and_methods_the_core_accepts() {
        assert_eq!(kind_defaults("spa"), (&["authorization_code", "refresh_token"][..], "none"));
        assert_eq!(kind_defaults("web").1, "client_secret_basic");
        assert_eq!(kind_defaults("anything"), (&["client_credentials"][..], "client_secret_basic"));
        for (k, _) in KINDS {
            let (grants, method) = kind_defaults(k);
            assert!(grants.iter().all(|g| GRANTS.iter().any(|(x, _)| x == g)));
            assert!(METHODS.iter().any(|(m, _)| *m == method));
        }
    }
}
