//! The signed-in admin's own API keys: create (the secret shown once, activated with the code
//! mailed to them), list, revoke.

use askama::Template;
use axum::body::Body;
use axum::extract::Path;
use axum::http::{StatusCode, Uri};
use axum::response::Response;
use portcullis_core::Error;
use portcullis_core::clock::rfc3339;
use portcullis_core::model::{ApiKey, CredentialState};
use portcullis_core::usecases::{CodeSubmission, NewApiKey, TimeInput};
use secrecy::{ExposeSecret, SecretString};

use super::{ConfirmPage, Nav, Pager, Shell, Visit, page_error, short_time};
use crate::oidc;

const BASE: &str = "/portal/api-keys";

pub struct KeyRow {
    pub id: String,
    pub name: String,
    pub key: String,
    pub roles: String,
    pub state: String,
    pub expires: String,
    pub last_used: String,
    pub created: String,
}

fn state(k: &ApiKey, now: i64) -> &'static str {
    match k.state {
        CredentialState::Pending => "pending",
        CredentialState::Revoked => "revoked",
        CredentialState::Active if k.expires_at.is_some_and(|t| t <= now) => "expired",
        CredentialState::Active => "active",
    }
}

impl KeyRow {
    fn of(k: &ApiKey, now: i64) -> Self {
        Self {
            id: k.id.clone(),
            name: k.name.clone(),
            key: k.key.clone(),
            roles: k.roles.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
            state: state(k, now).to_owned(),
            expires: k.expires_at.map(|t| short_time(&rfc3339(t))).unwrap_or_else(|| "never".into()),
            last_used: k.last_used_at.map(|t| short_time(&rfc3339(t))).unwrap_or_else(|| "never".into()),
            created: short_time(&rfc3339(k.created_at)),
        }
    }
}

#[derive(Template)]
#[template(path = "portal/api_keys.html")]
struct ListPage {
    shell: Shell,
    /// The search (name or key), kept in the pager's links.
    q: String,
    rows: Vec<KeyRow>,
    pager: Pager,
    /// The creation form: name, expiry date, the roles to choose from (the admin's own).
    name: String,
    expires: String,
    roles: Vec<String>,
    chosen: Vec<String>,
}

impl ListPage {
    fn has(&self, r: &str) -> bool {
        self.chosen.iter().any(|c| c == r)
    }
}

async fn list_page(
    v: &Visit,
    uri: &Uri,
    name: String,
    expires: String,
    chosen: Vec<String>,
) -> Result<ListPage, Response> {
    let q = oidc::query_param(uri, "q").trim().to_owned();
    let (n, page) = Pager::request(uri);
    let mut shell = v.shell(None, Nav::ApiKeys).await;
    let mut keys = match v.s.core.my_api_keys(&v.who, Some(&q), page).await {
        Ok(k) => k,
        Err(e @ Error::InvalidInput(_)) => {
            let (status, err) = page_error(e);
            shell.error = Some(err.clone());
            let page = ListPage {
                shell,
                q,
                rows: Vec::new(),
                pager: Pager::cut(n, &mut Vec::<ApiKey>::new(), BASE, &[]),
                name,
                expires,
                roles: v.who.roles.clone(),
                chosen,
            };
            return Err(v.failed(status, &page, &err));
        }
        Err(e) => return Err(v.fail(None, e).await),
    };
    let pager = Pager::cut(n, &mut keys, BASE, &[("q".into(), q.clone())]);
    let now = v.s.core.now();
    Ok(ListPage {
        shell,
        q,
        rows: keys.iter().map(|k| KeyRow::of(k, now)).collect(),
        pager,
        name,
        expires,
        roles: v.who.roles.clone(),
        chosen,
    })
}

/// `GET /portal/api-keys`.
pub async fn list(v: Visit, uri: Uri) -> Response {
    match list_page(&v, &uri, String::new(), String::new(), v.who.roles.clone()).await {
        Ok(p) => v.page(StatusCode::OK, &p),
        Err(r) => r,
    }
}

#[derive(Template)]
#[template(path = "portal/api_key_created.html")]
struct CreatedPage {
    shell: Shell,
    /// The new key's name, `api-key` and `api-secret` (shown once); `None` when the page is
    /// shown again after a wrong code.
    created: Option<(String, String, String)>,
    verification_id: String,
    email: String,
}

/// `POST /portal/api-keys`: `name`, `expires` (a date, optional), `roles`.
pub async fn create(v: Visit, uri: Uri, body: Body) -> Response {
    let f = match v.form(body).await {
        Ok(f) => f,
        Err(r) => return r,
    };
    let (name, expires) = match (f.one("name"), f.one("expires")) {
        (Ok(n), Ok(e)) => (n.trim().to_owned(), e.trim().to_owned()),
        (Err(r), _) | (_, Err(r)) => return r,
    };
    let chosen = f.all("roles");
    let req = NewApiKey {
        name: name.clone(),
        roles: Some(chosen.clone()),
        expires_at: Some(expires.clone()).filter(|e| !e.is_empty()).map(|d| TimeInput::Text(format!("{d}T23:59:59Z"))),
    };
    match v.s.core.create_api_key(&v.ctx, &v.who, req).await {
        Ok(c) => {
            let page = CreatedPage {
                shell: v.shell(None, Nav::ApiKeys).await,
                created: Some((c.key.name.clone(), c.key.key.clone(), c.api_secret.expose_secret().to_owned())),
                verification_id: c.verification_id,
                email: v.entry.user.email.to_string(),
            };
            v.page(StatusCode::CREATED, &page)
        }
        Err(e @ (Error::InvalidInput(_) | Error::Forbidden(_) | Error::Conflict(_) | Error::RateLimited { .. })) => {
            let (status, err) = page_error(e);
            match list_page(&v, &uri, name, expires, chosen).await {
                Ok(mut p) => {
                    p.shell.error = Some(err.clone());
                    v.failed(status, &p, &err)
                }
                Err(r) => r,
            }
        }
        Err(e) => v.fail(None, e).await,
    }
}

/// `POST /portal/api-keys/verify`: `verification_id`, `code` (from the mail).
pub async fn verify(v: Visit, body: Body) -> Response {
    let f = match v.form(body).await {
        Ok(f) => f,
        Err(r) => return r,
    };
    let (verification_id, code) = match (f.one("verification_id"), f.one("code")) {
        (Ok(i), Ok(c)) => (i, c),
        (Err(r), _) | (_, Err(r)) => return r,
    };
    let sub =
        CodeSubmission { verification_id: verification_id.clone(), code: SecretString::from(code.trim().to_owned()) };
    match v.s.core.verify_api_key(&v.ctx, sub).await {
        Ok(_) => oidc::see_other(&format!("{BASE}?notice=key-activated")),
        // A wrong or expired code (the session is fine): the form again, with the error.
        Err(
            e @ (Error::Unauthenticated(_) | Error::InvalidInput(_) | Error::NotFound(_) | Error::RateLimited { .. }),
        ) => {
            let (status, err) = page_error(e);
            let mut shell = v.shell(None, Nav::ApiKeys).await;
            shell.error = Some(err.clone());
            let page = CreatedPage { shell, created: None, verification_id, email: v.entry.user.email.to_string() };
            v.failed(status, &page, &err)
        }
        Err(e) => v.fail(None, e).await,
    }
}

/// `GET /portal/api-keys/{id}/revoke`.
pub async fn revoke_confirm(v: Visit, Path(id): Path<String>) -> Response {
    let here = format!("{BASE}/{id}/revoke");
    if !v.fresh() {
        return v.reauthenticate(&here);
    }
    let page = ConfirmPage {
        shell: v.shell(None, Nav::ApiKeys).await,
        title: "Revoke the API key?".into(),
        message: "Requests with this key fail from now on, here and at the gateways. This cannot be undone.".into(),
        action: here,
        button: "Revoke API key".into(),
        cancel: BASE.into(),
        fields: Vec::new(),
        reasons: Vec::new(),
    };
    v.page(StatusCode::OK, &page)
}

/// `POST /portal/api-keys/{id}/revoke`.
pub async fn revoke(v: Visit, Path(id): Path<String>, body: Body) -> Response {
    if let Err(r) = v.form(body).await {
        return r;
    }
    if !v.fresh() {
        return v.reauthenticate(&format!("{BASE}/{id}/revoke"));
    }
    match v.s.core.revoke_api_key(&v.ctx, &v.who, None, &id).await {
        Ok(()) => oidc::see_other(&format!("{BASE}?notice=key-revoked")),
        Err(e) => v.fail(None, e).await,
    }
}
