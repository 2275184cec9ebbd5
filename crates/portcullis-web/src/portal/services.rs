//! Services (resource servers) of an organisation with their scopes, roles and permissions:
//! the searchable list, the definition form, a service's page (which role is granted which
//! permission, and which roles grant each permission), a role's page (its grants, set by
//! checkboxes, and who holds it: users and applications), and deletion. Everything goes
//! through the admin API's use cases (`create_service`, `set_role_permissions`,
//! `delete_service`, `role_users`, `role_applications`), so the same validation messages,
//! authorization and audit apply.

use askama::Template;
use axum::body::Body;
use axum::extract::Path;
use axum::http::{StatusCode, Uri};
use axum::response::Response;
use portcullis_core::Error;
use portcullis_core::clock::rfc3339;
use portcullis_core::model::{Organisation, Service};
use portcullis_core::usecases::NewService;

use super::users::UserRow;
use super::{ConfirmPage, Nav, PAGE_SIZE, Pager, Shell, Visit, page_error, short_time};
use crate::oidc;

fn base(org: &str) -> String {
    format!("/portal/orgs/{org}/services")
}

/// Splits a text area of names (one per line, or separated by spaces or commas).
fn names(text: &str) -> Vec<String> {
    text.split(|c: char| c.is_whitespace() || c == ',').filter(|s| !s.is_empty()).map(str::to_owned).collect()
}

// ---- the list ------------------------------------------------------------------------------

pub struct ServiceRow {
    pub slug: String,
    pub name: String,
    pub audience: String,
    pub scopes: usize,
    pub roles: usize,
    pub permissions: usize,
}

#[derive(Template)]
#[template(path = "portal/services.html")]
struct ListPage {
    shell: Shell,
    org: String,
    q: String,
    rows: Vec<ServiceRow>,
    pager: Pager,
}

fn matches(s: &Service, q: &str) -> bool {
    let q = q.to_lowercase();
    [s.slug.as_str(), s.name.as_str(), s.audience.as_str()].iter().any(|t| t.to_lowercase().contains(&q))
        || s.roles.iter().any(|r| r.as_str().contains(&q))
        || s.scopes.iter().any(|x| x.as_str().contains(&q))
        || s.permissions.iter().any(|p| p.as_str().contains(&q))
}

/// `GET /portal/orgs/{org}/services?q=&page=`: searched by a part of the slug, name, audience,
/// or of a scope, role or permission.
pub async fn list(v: Visit, Path(org): Path<String>, uri: Uri) -> Response {
    let o = match v.org(&org).await {
        Ok(o) => o,
        Err(r) => return r,
    };
    let q = oidc::query_param(&uri, "q").trim().to_owned();
    let (n, page) = Pager::request(&uri);
    let mut shell = v.shell(Some(&o), Nav::Services).await;
    // An organisation has few services: the use case returns them all, searched and paged here.
    let (services, failure) = if q.chars().count() > 100 {
        (Vec::new(), Some(page_error(Error::invalid("q must be at most 100 characters"))))
    } else {
        match v.s.core.services(&v.who, &org).await {
            Ok(list) => (list, None),
            Err(e) => return v.fail(Some(&o), e).await,
        }
    };
    let offset = usize::try_from(page.offset).unwrap_or(usize::MAX);
    let mut rows: Vec<ServiceRow> = services
        .iter()
        .filter(|s| q.is_empty() || matches(s, &q))
        .skip(offset)
        .take(PAGE_SIZE as usize + 1)
        .map(|s| ServiceRow {
            slug: s.slug.to_string(),
            name: s.name.clone(),
            audience: s.audience.clone(),
            scopes: s.scopes.len(),
            roles: s.roles.len(),
            permissions: s.permissions.len(),
        })
        .collect();
    let pager = Pager::cut(n, &mut rows, &base(&org), &[("q".into(), q.clone())]);
    shell.error = failure.as_ref().map(|(_, e)| e.clone());
    let page = ListPage { shell, org: o.slug.to_string(), q, rows, pager };
    match failure {
        Some((status, err)) => v.failed(status, &page, &err),
        None => v.page(StatusCode::OK, &page),
    }
}

// ---- definition ----------------------------------------------------------------------------

/// What the definition form holds (kept when it comes back with an error).
#[derive(Debug, Clone, Default)]
pub struct ServiceForm {
    pub slug: String,
    pub name: String,
    pub audience: String,
    pub scopes: String,
    pub roles: String,
    pub permissions: String,
}

#[derive(Template)]
#[template(path = "portal/service_new.html")]
struct NewPage {
    shell: Shell,
    org: String,
    form: ServiceForm,
}

/// `GET /portal/orgs/{org}/services/new`.
pub async fn new_form(v: Visit, Path(org): Path<String>) -> Response {
    let o = match v.org(&org).await {
        Ok(o) => o,
        Err(r) => return r,
    };
    let page = NewPage {
        shell: v.shell(Some(&o), Nav::Services).await,
        org: o.slug.to_string(),
        form: ServiceForm::default(),
    };
    v.page(StatusCode::OK, &page)
}

/// `POST /portal/orgs/{org}/services`: defines a service (`create_service`, validated as in
/// the API: full forms, each starting with the service's slug).
pub async fn create(v: Visit, Path(org): Path<String>, body: Body) -> Response {
    let f = match v.form(body).await {
        Ok(f) => f,
        Err(r) => return r,
    };
    let o = match v.org(&org).await {
        Ok(o) => o,
        Err(r) => return r,
    };
    let read = || -> Result<ServiceForm, Response> {
        Ok(ServiceForm {
            slug: f.one("slug")?.trim().to_owned(),
            name: f.one("name")?.trim().to_owned(),
            audience: f.one("audience")?.trim().to_owned(),
            scopes: f.one("scopes")?,
            roles: f.one("roles")?,
            permissions: f.one("permissions")?,
        })
    };
    let form = match read() {
        Ok(x) => x,
        Err(r) => return r,
    };
    let req = NewService {
        slug: form.slug.clone(),
        name: form.name.clone(),
        audience: form.audience.clone(),
        scopes: names(&form.scopes),
        roles: names(&form.roles),
        permissions: names(&form.permissions),
        grants: Default::default(),
    };
    match v.s.core.create_service(&v.who, &v.ctx, &org, req).await {
        Ok(svc) => oidc::see_other(&format!("{}/{}?notice=service-created", base(&org), svc.slug)),
        Err(
            e @ (Error::InvalidInput(_) | Error::Conflict(_) | Error::Store(portcullis_core::StoreError::Conflict(_))),
        ) => {
            let (status, err) = page_error(e);
            let mut shell = v.shell(Some(&o), Nav::Services).await;
            shell.error = Some(err.clone());
            v.failed(status, &NewPage { shell, org: o.slug.to_string(), form }, &err)
        }
        Err(e) => v.fail(Some(&o), e).await,
    }
}

// ---- one service ---------------------------------------------------------------------------

/// A role with the permissions granted to it.
pub struct RoleRow {
    pub name: String,
    /// The part after `service:`, the role page's path segment.
    pub level: String,
    pub permissions: Vec<String>,
}

/// A permission with the roles granting it.
pub struct PermissionRow {
    pub name: String,
    pub roles: Vec<String>,
}

#[derive(Template)]
#[template(path = "portal/service.html")]
struct DetailPage {
    shell: Shell,
    org: String,
    slug: String,
    name: String,
    audience: String,
    created: String,
    scopes: Vec<String>,
    roles: Vec<RoleRow>,
    permissions: Vec<PermissionRow>,
}

async fn org_and_service(v: &Visit, org: &str, svc: &str) -> Result<(Organisation, Service), Response> {
    let o = v.org(org).await?;
    match v.s.core.service(&v.who, org, svc).await {
        Ok(s) => Ok((o, s)),
        Err(e) => Err(v.fail(Some(&o), e).await),
    }
}

/// The role → permissions grants of `svc`'s roles.
async fn grants(v: &Visit, o: &Organisation, svc: &Service) -> Result<Vec<(String, Vec<String>)>, Response> {
    match v.s.core.roles(&v.who, o.slug.as_str()).await {
        Ok(all) => Ok(all
            .into_iter()
            .filter(|(r, _)| svc.roles.contains(r))
            .map(|(r, p)| (r.to_string(), p.iter().map(ToString::to_string).collect()))
            .collect()),
        Err(e) => Err(v.fail(Some(o), e).await),
    }
}

/// `GET /portal/orgs/{org}/services/{svc}`.
pub async fn detail(v: Visit, Path((org, svc)): Path<(String, String)>) -> Response {
    let (o, s) = match org_and_service(&v, &org, &svc).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let granted = match grants(&v, &o, &s).await {
        Ok(g) => g,
        Err(r) => return r,
    };
    let roles = s
        .roles
        .iter()
        .map(|r| RoleRow {
            name: r.to_string(),
            level: r.as_str().split_once(':').map(|(_, l)| l.to_owned()).unwrap_or_default(),
            permissions: granted.iter().find(|(g, _)| g == r.as_str()).map(|(_, p)| p.clone()).unwrap_or_default(),
        })
        .collect();
    let permissions = s
        .permissions
        .iter()
        .map(|p| PermissionRow {
            name: p.to_string(),
            roles: granted
                .iter()
                .filter(|(_, ps)| ps.iter().any(|x| x == p.as_str()))
                .map(|(r, _)| r.clone())
                .collect(),
        })
        .collect();
    let page = DetailPage {
        shell: v.shell(Some(&o), Nav::Services).await,
        org: o.slug.to_string(),
        slug: s.slug.to_string(),
        name: s.name.clone(),
        audience: s.audience.clone(),
        created: short_time(&rfc3339(s.created_at)),
        scopes: s.scopes.iter().map(ToString::to_string).collect(),
        roles,
        permissions,
    };
    v.page(StatusCode::OK, &page)
}

// ---- one role ------------------------------------------------------------------------------

pub struct AppHolder {
    pub slug: String,
    pub name: String,
    pub client_id: String,
    pub enabled: bool,
}

#[derive(Template)]
#[template(path = "portal/role.html")]
struct RolePage {
    shell: Shell,
    org: String,
    service: String,
    service_name: String,
    role: String,
    level: String,
    /// The service's permissions, and whether the role is granted each.
    permissions: Vec<(String, bool)>,
    users: Vec<UserRow>,
    users_pager: Pager,
    apps: Vec<AppHolder>,
    apps_pager: Pager,
}

/// `GET /portal/orgs/{org}/services/{svc}/roles/{level}?page=&apps=`: the role's grants and
/// who holds it (users paged by `page`, applications by `apps`).
pub async fn role(v: Visit, Path((org, svc, level)): Path<(String, String, String)>, uri: Uri) -> Response {
    let (o, s) = match org_and_service(&v, &org, &svc).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let role = format!("{svc}:{level}");
    if !s.roles.iter().any(|r| r.as_str() == role) {
        return v.fail(Some(&o), Error::NotFound(format!("role {role:?} of service {svc:?}"))).await;
    }
    let granted = match grants(&v, &o, &s).await {
        Ok(g) => g.into_iter().find(|(r, _)| *r == role).map(|(_, p)| p).unwrap_or_default(),
        Err(r) => return r,
    };
    let (un, upage) = Pager::request_named(&uri, "page");
    let (an, apage) = Pager::request_named(&uri, "apps");
    let (users, apps) = match (
        v.s.core.role_users(&v.who, &org, &role, upage).await,
        v.s.core.role_applications(&v.who, &org, &role, apage).await,
    ) {
        (Ok(u), Ok(a)) => (u, a),
        (Err(e), _) | (_, Err(e)) => return v.fail(Some(&o), e).await,
    };
    let here = format!("{}/{svc}/roles/{level}", base(&org));
    let now = v.s.core.now();
    let mut users: Vec<UserRow> = users.iter().map(|u| UserRow::of(u, now)).collect();
    let mut apps: Vec<AppHolder> = apps
        .iter()
        .map(|a| AppHolder {
            slug: a.slug.to_string(),
            name: a.name.clone(),
            client_id: a.client_id.to_string(),
            enabled: a.enabled,
        })
        .collect();
    let other = |n: u64| if n > 1 { n.to_string() } else { String::new() };
    let users_pager = Pager::cut_named(un, &mut users, &here, &[("apps".into(), other(an))], "page");
    let apps_pager = Pager::cut_named(an, &mut apps, &here, &[("page".into(), other(un))], "apps");
    let page = RolePage {
        shell: v.shell(Some(&o), Nav::Services).await,
        org: o.slug.to_string(),
        service: s.slug.to_string(),
        service_name: s.name.clone(),
        permissions: s.permissions.iter().map(|p| (p.to_string(), granted.iter().any(|g| g == p.as_str()))).collect(),
        role,
        level,
        users,
        users_pager,
        apps,
        apps_pager,
    };
    v.page(StatusCode::OK, &page)
}

/// `POST /portal/orgs/{org}/services/{svc}/roles/{level}` (`permissions`, every checked one):
/// the role is granted exactly those (`set_role_permissions`, audited as `role.set_permissions`).
pub async fn set_grants(v: Visit, Path((org, svc, level)): Path<(String, String, String)>, body: Body) -> Response {
    let f = match v.form(body).await {
        Ok(f) => f,
        Err(r) => return r,
    };
    let (o, s) = match org_and_service(&v, &org, &svc).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let role = format!("{svc}:{level}");
    if !s.roles.iter().any(|r| r.as_str() == role) {
        return v.fail(Some(&o), Error::NotFound(format!("role {role:?} of service {svc:?}"))).await;
    }
    match v.s.core.set_role_permissions(&v.who, &v.ctx, &org, &role, f.all("permissions")).await {
        Ok(()) => oidc::see_other(&format!("{}/{svc}/roles/{level}?notice=role-grants", base(&org))),
        Err(e) => v.fail(Some(&o), e).await,
    }
}

// ---- deletion ------------------------------------------------------------------------------

/// `GET /portal/orgs/{org}/services/{svc}/delete` (after a recent sign-in).
pub async fn delete_confirm(v: Visit, Path((org, svc)): Path<(String, String)>) -> Response {
    let here = format!("{}/{svc}/delete", base(&org));
    if !v.fresh() {
        return v.reauthenticate(&here);
    }
    let (o, s) = match org_and_service(&v, &org, &svc).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let page = ConfirmPage {
        shell: v.shell(Some(&o), Nav::Services).await,
        title: "Delete the service?".into(),
        message: format!(
            "{} ({}) is deleted with its scopes, roles, permissions and role grants; tokens can no longer be issued for {}. A service whose roles or scopes are still held by users or applications cannot be deleted. This cannot be undone.",
            s.name, s.slug, s.audience
        ),
        action: here,
        button: "Delete service".into(),
        cancel: format!("{}/{svc}", base(&org)),
        fields: Vec::new(),
        reasons: Vec::new(),
    };
    v.page(StatusCode::OK, &page)
}

/// `POST /portal/orgs/{org}/services/{svc}/delete`.
pub async fn delete(v: Visit, Path((org, svc)): Path<(String, String)>, body: Body) -> Response {
    if let Err(r) = v.form(body).await {
        return r;
    }
    if !v.fresh() {
        return v.reauthenticate(&format!("{}/{svc}/delete", base(&org)));
    }
    match v.s.core.delete_service(&v.who, &v.ctx, &org, &svc).await {
        Ok(()) => oidc::see_other(&format!("{}?notice=service-deleted", base(&org))),
        Err(e) => {
            let o = v.org(&org).await.ok();
            v.fail(o.as_ref(), e).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_split_on_lines_spaces_and_commas() {
        assert_eq!(names("a:b\r\n c:d, e:f,,\n"), ["a:b", "c:d", "e:f"]);
        assert!(names("  \n").is_empty());
    }
}
