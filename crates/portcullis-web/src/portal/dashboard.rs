//! The dashboard (`/portal`): the organisations the admin administers as tiles with their
//! counts, and the way into one organisation.

use askama::Template;
use axum::extract::Path;
use axum::http::{StatusCode, Uri};
use axum::response::Response;
use portcullis_core::model::OrganisationCounts;
use portcullis_core::usecases::EXPIRING_SOON_DAYS;

use super::{Nav, OrgLink, Pager, Shell, Visit};
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
    tiles: Vec<Tile>,
    pager: Pager,
    expiring_days: i64,
}

/// `GET /portal`.
pub async fn dashboard(v: Visit, uri: Uri) -> Response {
    let (n, page) = Pager::request(&uri);
    let mut list = match v.s.core.organisation_overview(&v.who, None, page).await {
        Ok(l) => l,
        Err(e) => return v.fail(None, e).await,
    };
    let pager = Pager::cut(n, &mut list, "/portal", &[]);
    let tiles = list.iter().map(|(o, counts)| Tile { org: OrgLink::from(o), counts: *counts }).collect();
    let page =
        DashboardPage { shell: v.shell(None, Nav::Dashboard).await, tiles, pager, expiring_days: EXPIRING_SOON_DAYS };
    v.page(StatusCode::OK, &page)
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
