//! Users of an organisation: the searchable list, invitations (and sending a new link), a
//! user's name and roles, disabling, deleting, resetting the second factor, and their sessions
//! (revoke one or all).

use askama::Template;
use axum::body::Body;
use axum::extract::Path;
use axum::http::{StatusCode, Uri};
use axum::response::Response;
use portcullis_core::Error;
use portcullis_core::clock::rfc3339;
use portcullis_core::model::{CredentialState, Organisation, Page, Session, User};
use portcullis_core::usecases::{Invitation, ROLE_ORG_ADMIN, UserPatch};

use super::{ConfirmPage, Fields, Nav, Pager, Shell, Visit, page_error, short_time};
use crate::oidc;

fn base(org: &str) -> String {
    format!("/portal/orgs/{org}/users")
}

/// A user as the list shows them.
pub struct UserRow {
    pub id: String,
    pub email: String,
    pub name: String,
    pub roles: String,
    pub enabled: bool,
    /// Invited, no password set yet.
    pub invited: bool,
    pub locked: bool,
}

impl UserRow {
    pub(super) fn of(u: &User, now: i64) -> Self {
        Self {
            id: u.id.clone(),
            email: u.email.to_string(),
            name: u.name.clone().unwrap_or_default(),
            roles: u.roles.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
            enabled: u.enabled,
            invited: u.password_hash.is_none(),
            locked: u.locked_until.is_some_and(|t| t > now),
        }
    }
}

/// The roles an admin may hand out in `org`: its services' roles and the org-admin role.
async fn grantable_roles(v: &Visit, org: &str) -> Result<Vec<String>, Error> {
    let mut roles: Vec<String> =
        v.s.core.services(&v.who, org).await?.iter().flat_map(|s| s.roles.iter().map(ToString::to_string)).collect();
    roles.push(ROLE_ORG_ADMIN.to_owned());
    roles.sort();
    roles.dedup();
    Ok(roles)
}

// ---- the list ------------------------------------------------------------------------------

#[derive(Template)]
#[template(path = "portal/users.html")]
struct ListPage {
    shell: Shell,
    org: String,
    q: String,
    rows: Vec<UserRow>,
    pager: Pager,
}

/// `GET /portal/orgs/{org}/users?q=&page=`.
pub async fn list(v: Visit, Path(org): Path<String>, uri: Uri) -> Response {
    let o = match v.org(&org).await {
        Ok(o) => o,
        Err(r) => return r,
    };
    let q = oidc::query_param(&uri, "q").trim().to_owned();
    let (n, page) = Pager::request(&uri);
    let mut shell = v.shell(Some(&o), Nav::Users).await;
    let (mut users, failure) = match v.s.core.search_users(&v.who, &org, Some(&q), page).await {
        Ok(u) => (u, None),
        Err(e @ Error::InvalidInput(_)) => (Vec::new(), Some(page_error(e))),
        Err(e) => return v.fail(Some(&o), e).await,
    };
    let pager = Pager::cut(n, &mut users, &base(&org), &[("q".into(), q.clone())]);
    shell.error = failure.as_ref().map(|(_, e)| e.clone());
    let now = v.s.core.now();
    let page = ListPage {
        shell,
        org: o.slug.to_string(),
        q,
        rows: users.iter().map(|u| UserRow::of(u, now)).collect(),
        pager,
    };
    match failure {
        Some((status, err)) => v.failed(status, &page, &err),
        None => v.page(StatusCode::OK, &page),
    }
}

// ---- invitations ---------------------------------------------------------------------------

#[derive(Template)]
#[template(path = "portal/user_invite.html")]
struct InvitePage {
    shell: Shell,
    org: String,
    email: String,
    name: String,
    chosen: Vec<String>,
    roles: Vec<String>,
}

impl InvitePage {
    fn has(&self, r: &str) -> bool {
        self.chosen.iter().any(|c| c == r)
    }
}

async fn invite_page(
    v: &Visit,
    o: &Organisation,
    email: String,
    name: String,
    chosen: Vec<String>,
) -> Result<InvitePage, Response> {
    let roles = match grantable_roles(v, o.slug.as_str()).await {
        Ok(r) => r,
        Err(e) => return Err(v.fail(Some(o), e).await),
    };
    Ok(InvitePage { shell: v.shell(Some(o), Nav::Users).await, org: o.slug.to_string(), email, name, chosen, roles })
}

/// `GET /portal/orgs/{org}/users/invite`.
pub async fn invite_form(v: Visit, Path(org): Path<String>) -> Response {
    let o = match v.org(&org).await {
        Ok(o) => o,
        Err(r) => return r,
    };
    match invite_page(&v, &o, String::new(), String::new(), Vec::new()).await {
        Ok(p) => v.page(StatusCode::OK, &p),
        Err(r) => r,
    }
}

/// `POST /portal/orgs/{org}/users`: invites by email (a link to set the password).
pub async fn invite(v: Visit, Path(org): Path<String>, body: Body) -> Response {
    let f = match v.form(body).await {
        Ok(f) => f,
        Err(r) => return r,
    };
    let o = match v.org(&org).await {
        Ok(o) => o,
        Err(r) => return r,
    };
    let (email, name) = match (f.one("email"), f.one("name")) {
        (Ok(e), Ok(n)) => (e.trim().to_owned(), n.trim().to_owned()),
        (Err(r), _) | (_, Err(r)) => return r,
    };
    let roles = f.all("roles");
    let req =
        Invitation { email: email.clone(), name: Some(name.clone()).filter(|n| !n.is_empty()), roles: roles.clone() };
    match v.s.core.invite_user(&v.who, &v.ctx, &org, req).await {
        Ok(u) => oidc::see_other(&format!("{}/{}?notice=user-invited", base(&org), u.id)),
        Err(
            e @ (Error::InvalidInput(_)
            | Error::Conflict(_)
            | Error::Forbidden(_)
            | Error::Store(portcullis_core::StoreError::Conflict(_))),
        ) => {
            let (status, err) = page_error(e);
            match invite_page(&v, &o, email, name, roles).await {
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

// ---- one user ------------------------------------------------------------------------------

pub struct SessionRow {
    pub id: String,
    pub state: String,
    pub created: String,
    pub last_used: String,
    pub ip: String,
    pub user_agent: String,
    pub current: bool,
}

#[derive(Template)]
#[template(path = "portal/user.html")]
struct DetailPage {
    shell: Shell,
    org: String,
    user: UserRow,
    created: String,
    roles: Vec<String>,
    held: Vec<String>,
    totp: bool,
    sessions: Vec<SessionRow>,
    myself: bool,
    /// The name field's value (what was typed, after a refusal).
    name: String,
}

impl DetailPage {
    fn holds(&self, r: &str) -> bool {
        self.held.iter().any(|h| h == r)
    }
}

fn session_row(s: &Session, current: &str) -> SessionRow {
    SessionRow {
        id: s.id.clone(),
        state: match s.state {
            CredentialState::Pending => "pending",
            CredentialState::Active => "active",
            CredentialState::Revoked => "revoked",
        }
        .to_owned(),
        created: short_time(&rfc3339(s.created_at)),
        last_used: short_time(&rfc3339(s.last_used_at)),
        ip: s.ip.clone().unwrap_or_default(),
        user_agent: s.user_agent.clone().unwrap_or_default().chars().take(80).collect(),
        current: s.id == current,
    }
}

async fn org_and_user(v: &Visit, org: &str, id: &str) -> Result<(Organisation, User), Response> {
    let o = v.org(org).await?;
    match v.s.core.user(&v.who, org, id).await {
        Ok(u) => Ok((o, u)),
        Err(e) => Err(v.fail(Some(&o), e).await),
    }
}

/// `GET /portal/orgs/{org}/users/{id}`.
pub async fn detail(v: Visit, Path((org, id)): Path<(String, String)>) -> Response {
    match detail_page(&v, &org, &id).await {
        Ok(page) => v.page(StatusCode::OK, &page),
        Err(r) => r,
    }
}

async fn detail_page(v: &Visit, org: &str, id: &str) -> Result<DetailPage, Response> {
    let (o, u) = org_and_user(v, org, id).await?;
    let sessions = v.s.core.user_sessions(&v.who, org, id, Page::new(Some(50), None)).await;
    let roles = grantable_roles(v, org).await;
    let totp = v.s.core.totp_enrolled(&u.id).await;
    let (sessions, roles, totp) = match (sessions, roles, totp) {
        (Ok(s), Ok(r), Ok(t)) => (s, r, t),
        (Err(e), ..) | (_, Err(e), _) | (.., Err(e)) => return Err(v.fail(Some(&o), e).await),
    };
    let now = v.s.core.now();
    let current = v.entry.session.id.clone();
    let page = DetailPage {
        shell: v.shell(Some(&o), Nav::Users).await,
        org: o.slug.to_string(),
        user: UserRow::of(&u, now),
        created: short_time(&rfc3339(u.created_at)),
        held: u.roles.iter().map(ToString::to_string).collect(),
        roles,
        totp,
        sessions: sessions
            .iter()
            .filter(|s| s.state != CredentialState::Revoked && s.expires_at > now)
            .map(|s| session_row(s, &current))
            .collect(),
        myself: u.id == v.who.subject,
        name: u.name.clone().unwrap_or_default(),
    };
    Ok(page)
}

/// `POST /portal/orgs/{org}/users/{id}/name` (`name`): `update_user` with the new name; a
/// refused name comes back on the user's page with its error id.
pub async fn set_name(v: Visit, Path((org, id)): Path<(String, String)>, body: Body) -> Response {
    let f = match v.form(body).await {
        Ok(f) => f,
        Err(r) => return r,
    };
    let name = match f.one("name") {
        Ok(n) => n,
        Err(r) => return r,
    };
    let patch = UserPatch { name: Some(name.clone()), enabled: None, password: None };
    match v.s.core.update_user(&v.who, &v.ctx, &org, &id, patch).await {
        Ok(_) => oidc::see_other(&format!("{}/{id}?notice=user-renamed", base(&org))),
        Err(e @ Error::InvalidInput(_)) => {
            let (status, err) = page_error(e);
            match detail_page(&v, &org, &id).await {
                Ok(mut p) => {
                    p.shell.error = Some(err.clone());
                    p.name = name;
                    v.failed(status, &p, &err)
                }
                Err(r) => r,
            }
        }
        Err(e) => v.fail(None, e).await,
    }
}

/// `GET …/users/{id}/delete`.
pub async fn delete_confirm(v: Visit, Path((org, id)): Path<(String, String)>) -> Response {
    confirm(v, &org, &id, "delete", "Delete the user?", "Delete user", |u| {
        format!(
            "{} is deleted for good with their addresses, sessions, API keys, consents and second factor. This cannot be undone.",
            u.email
        )
    })
    .await
}

/// `POST …/users/{id}/delete`.
pub async fn delete(v: Visit, Path((org, id)): Path<(String, String)>, body: Body) -> Response {
    if let Err(r) = sensitive(&v, body, &format!("{}/{id}/delete", base(&org))).await {
        return r;
    }
    match v.s.core.delete_user(&v.who, &v.ctx, &org, &id).await {
        Ok(()) => oidc::see_other(&format!("{}?notice=user-deleted", base(&org))),
        Err(e) => v.fail(None, e).await,
    }
}

/// `POST /portal/orgs/{org}/users/{id}/roles` (`roles`, every checked one): grants and takes
/// away until the user holds exactly those (of the roles the form offered).
pub async fn set_roles(v: Visit, Path((org, id)): Path<(String, String)>, body: Body) -> Response {
    let f = match v.form(body).await {
        Ok(f) => f,
        Err(r) => return r,
    };
    let (o, u) = match org_and_user(&v, &org, &id).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let offered = match grantable_roles(&v, &org).await {
        Ok(r) => r,
        Err(e) => return v.fail(Some(&o), e).await,
    };
    let wanted = f.all("roles");
    let held: Vec<String> = u.roles.iter().map(ToString::to_string).collect();
    for role in &offered {
        let (has, want) = (held.contains(role), wanted.contains(role));
        if has != want
            && let Err(e) = v.s.core.set_user_role(&v.who, &v.ctx, &org, &id, role, want).await
        {
            return v.fail(Some(&o), e).await;
        }
    }
    if let Some(unknown) = wanted.iter().find(|r| !offered.contains(r)) {
        return v.fail(Some(&o), Error::invalid(format!("role {unknown:?} is not defined in this organisation"))).await;
    }
    oidc::see_other(&format!("{}/{id}?notice=user-roles", base(&org)))
}

/// `POST …/users/{id}/invitation`: a new link (the old one stops working).
pub async fn resend(v: Visit, Path((org, id)): Path<(String, String)>, body: Body) -> Response {
    if let Err(r) = v.form(body).await {
        return r;
    }
    match v.s.core.resend_invitation(&v.who, &v.ctx, &org, &id).await {
        Ok(()) => oidc::see_other(&format!("{}/{id}?notice=user-reinvited", base(&org))),
        Err(e) => v.fail(None, e).await,
    }
}

/// A confirmation for a sensitive action on a user (after a recent sign-in).
async fn confirm(
    v: Visit,
    org: &str,
    id: &str,
    what: &str,
    title: &str,
    button: &str,
    message: impl FnOnce(&User) -> String,
) -> Response {
    let here = format!("{}/{id}/{what}", base(org));
    if !v.fresh() {
        return v.reauthenticate(&here);
    }
    let (o, u) = match org_and_user(&v, org, id).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let page = ConfirmPage {
        shell: v.shell(Some(&o), Nav::Users).await,
        title: title.to_owned(),
        message: message(&u),
        action: here,
        button: button.to_owned(),
        cancel: format!("{}/{id}", base(org)),
        fields: Vec::new(),
        reasons: Vec::new(),
    };
    v.page(StatusCode::OK, &page)
}

/// CSRF, then a recent sign-in (else back through the login to `confirm_page`).
async fn sensitive(v: &Visit, body: Body, confirm_page: &str) -> Result<Fields, Response> {
    let f = v.form(body).await?;
    if !v.fresh() {
        return Err(v.reauthenticate(confirm_page));
    }
    Ok(f)
}

/// `GET …/users/{id}/disable`.
pub async fn disable_confirm(v: Visit, Path((org, id)): Path<(String, String)>) -> Response {
    confirm(v, &org, &id, "disable", "Disable the user?", "Disable user", |u| {
        format!("{} can no longer sign in, and every session and API key of theirs stops working now.", u.email)
    })
    .await
}

async fn set_enabled(v: Visit, org: &str, id: &str, enabled: bool) -> Response {
    let patch = UserPatch { name: None, enabled: Some(enabled), password: None };
    match v.s.core.update_user(&v.who, &v.ctx, org, id, patch).await {
        Ok(_) => {
            let notice = if enabled { "user-enabled" } else { "user-disabled" };
            oidc::see_other(&format!("{}/{id}?notice={notice}", base(org)))
        }
        Err(e) => v.fail(None, e).await,
    }
}

/// `POST …/users/{id}/disable`.
pub async fn disable(v: Visit, Path((org, id)): Path<(String, String)>, body: Body) -> Response {
    if let Err(r) = sensitive(&v, body, &format!("{}/{id}/disable", base(&org))).await {
        return r;
    }
    set_enabled(v, &org, &id, false).await
}

/// `POST …/users/{id}/enable`.
pub async fn enable(v: Visit, Path((org, id)): Path<(String, String)>, body: Body) -> Response {
    if let Err(r) = v.form(body).await {
        return r;
    }
    set_enabled(v, &org, &id, true).await
}

/// `GET …/users/{id}/reset-totp`.
pub async fn reset_totp_confirm(v: Visit, Path((org, id)): Path<(String, String)>) -> Response {
    confirm(v, &org, &id, "reset-totp", "Reset the second factor?", "Reset second factor", |u| {
        format!(
            "{}'s authenticator app is removed: their next sign-in uses a code sent by email, and they can enrol a new app.",
            u.email
        )
    })
    .await
}

/// `POST …/users/{id}/reset-totp`.
pub async fn reset_totp(v: Visit, Path((org, id)): Path<(String, String)>, body: Body) -> Response {
    if let Err(r) = sensitive(&v, body, &format!("{}/{id}/reset-totp", base(&org))).await {
        return r;
    }
    match v.s.core.reset_user_totp(&v.who, &v.ctx, &org, &id).await {
        Ok(()) => oidc::see_other(&format!("{}/{id}?notice=user-totp-reset", base(&org))),
        Err(e) => v.fail(None, e).await,
    }
}

/// `GET …/users/{id}/sessions/revoke`: every session.
pub async fn revoke_sessions_confirm(v: Visit, Path((org, id)): Path<(String, String)>) -> Response {
    confirm(v, &org, &id, "sessions/revoke", "Sign the user out everywhere?", "Revoke every session", |u| {
        format!("Every session of {} ends now, in every browser and every application they signed in to.", u.email)
    })
    .await
}

/// `POST …/users/{id}/sessions/revoke`.
pub async fn revoke_sessions(v: Visit, Path((org, id)): Path<(String, String)>, body: Body) -> Response {
    if let Err(r) = sensitive(&v, body, &format!("{}/{id}/sessions/revoke", base(&org))).await {
        return r;
    }
    match v.s.core.admin_revoke_user_sessions(&v.who, &v.ctx, &org, &id).await {
        Ok(_) => oidc::see_other(&format!("{}/{id}?notice=sessions-revoked", base(&org))),
        Err(e) => v.fail(None, e).await,
    }
}

/// `POST …/users/{id}/sessions/{session}/revoke`: one session (its own confirmation is the
/// form's button; a recent sign-in is required).
pub async fn revoke_session(
    v: Visit,
    Path((org, id, session)): Path<(String, String, String)>,
    body: Body,
) -> Response {
    if let Err(r) = sensitive(&v, body, &format!("{}/{id}/sessions/{session}/revoke", base(&org))).await {
        return r;
    }
    match v.s.core.admin_revoke_session(&v.who, &v.ctx, &org, &session).await {
        Ok(()) => oidc::see_other(&format!("{}/{id}?notice=session-revoked", base(&org))),
        Err(e) => v.fail(None, e).await,
    }
}

/// `GET …/users/{id}/sessions/{session}/revoke`.
pub async fn revoke_session_confirm(v: Visit, Path((org, id, session)): Path<(String, String, String)>) -> Response {
    let here = format!("{}/{id}/sessions/{session}/revoke", base(&org));
    if !v.fresh() {
        return v.reauthenticate(&here);
    }
    let (o, u) = match org_and_user(&v, &org, &id).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let page = ConfirmPage {
        shell: v.shell(Some(&o), Nav::Users).await,
        title: "Revoke the session?".into(),
        message: format!(
            "This session of {} ends now, with the refresh tokens issued in it; the browser that held it has to sign in again.",
            u.email
        ),
        action: here,
        button: "Revoke session".into(),
        cancel: format!("{}/{id}", base(&org)),
        fields: Vec::new(),
        reasons: Vec::new(),
    };
    v.page(StatusCode::OK, &page)
}
