//! The dashboard (`/portal`): the organisations the admin administers as tiles with their
//! counts, and the way into one organisation.

use askama::Template;
use axum::extract::Path;
use axum::http::{StatusCode, Uri};
use axum::response::Response;
use portcullis_core::model::OrganisationCounts;
use portcullis_core::usecases::EXPIRING_SOON_DAYS;

use super::{Nav, OrgLink, Pager, Shell, Visit, page_error};
use crate::oidc;

/// One organisation's tile.
pub struct Tile {
    pub org: OrgLink,
    pub counts: OrganisationCounts,
}

#[derive(Template)]
#[template(path = "portal/dashboard.html")]
struct DashboardPage {
    shell: Shell,
    q: String,
    tiles: Vec<Tile>,
    pager: Pager,
    expiring_days: i64,
}

/// `GET /portal?q=&page=`: the tiles, searched by a part of the organisation's slug or name.
pub async fn dashboard(v: Visit, uri: Uri) -> Response {
    let q = oidc::query_param(&uri, "q").trim().to_owned();
    let (n, page) = Pager::request(&uri);
    let (mut list, failure) = match v.s.core.organisation_overview(&v.who, Some(&q), page).await {
        Ok(l) => (l, None),
        Err(e @ portcullis_core::Error::InvalidInput(_)) => (Vec::new(), Some(page_error(e))),
        Err(e) => return v.fail(None, e).await,
    };
    let pager = Pager::cut(n, &mut list, "/portal", &[("q".into(), q.clone())]);
    let tiles = list.iter().map(|(o, counts)| Tile { org: OrgLink::from(o), counts: *counts }).collect();
    let mut shell = v.shell(None, Nav::Dashboard).await;
    shell.error = failure.as_ref().map(|(_, e)| e.clone());
    let page = DashboardPage { shell, q, tiles, pager, expiring_days: EXPIRING_SOON_DAYS };
    match failure {
        Some((status, err)) => v.failed(status, &page, &err),
        None => v.page(StatusCode::OK, &page),
    }
}

/// `GET /portal/go?org=SLUG`: the "go to organisation" search of the dashboard.
pub async fn go(v: Visit, uri: Uri) -> Response {
    let slug = oidc::query_param(&uri, "org").trim().to_ascii_lowercase();
    match v.org(&slug).await {
        Ok(o) => oidc::see_other(&format!("/portal/orgs/{}/applications", o.slug)),
        Err(r) => r,
    }
}

/// `GET /portal/orgs/{org}`: its applications.
pub async fn organisation(v: Visit, Path(org): Path<String>) -> Response {
    match v.org(&org).await {
        Ok(o) => oidc::see_other(&format!("/portal/orgs/{}/applications", o.slug)),
        Err(r) => r,
    }
}
