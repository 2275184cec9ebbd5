//! The audit log of an organisation, filtered by actor, action (prefix), outcome and time.
//! Actors that are users of the organisation are shown by email (looked up for the page's
//! rows only); the actor filter also takes a user's email.

use std::collections::HashMap;

use askama::Template;
use axum::extract::Path;
use axum::http::{StatusCode, Uri};
use axum::response::Response;
use portcullis_core::Error;
use portcullis_core::clock::rfc3339;
use portcullis_core::model::{AuditEvent, AuditFilter, Page};

use super::{Nav, Pager, Shell, Visit, page_error, short_time};
use crate::oidc;

/// The filters as given in the query (`from`/`to` are `YYYY-MM-DD`, UTC, `to` inclusive).
#[derive(Debug, Clone, Default)]
pub struct Filters {
    pub actor: String,
    pub action: String,
    pub outcome: String,
    pub from: String,
    pub to: String,
}

impl Filters {
    fn pairs(&self) -> Vec<(String, String)> {
        [
            ("actor", &self.actor),
            ("action", &self.action),
            ("outcome", &self.outcome),
            ("from", &self.from),
            ("to", &self.to),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.clone()))
        .collect()
    }
    fn any(&self) -> bool {
        self.pairs().iter().any(|(_, v)| !v.is_empty())
    }
    fn is_outcome(&self, o: &str) -> bool {
        self.outcome == o
    }
    fn filter(&self) -> Result<AuditFilter, Error> {
        let some = |s: &str| Some(s.to_owned()).filter(|s| !s.is_empty());
        let day = |s: &str, what: &str| -> Result<Option<i64>, Error> {
            if s.is_empty() {
                return Ok(None);
            }
            day_start(s).map(Some).ok_or_else(|| Error::invalid(format!("{what} must be a date (YYYY-MM-DD)")))
        };
        let outcome = some(&self.outcome);
        if outcome.as_deref().is_some_and(|o| o != "success" && o != "failure") {
            return Err(Error::invalid("outcome must be success or failure"));
        }
        Ok(AuditFilter {
            action_prefix: some(&self.action),
            actor: some(&self.actor),
            target: None,
            outcome,
            since: day(&self.from, "from")?,
            until: day(&self.to, "to")?.map(|t| t + 86_400),
        })
    }
}

/// Unix seconds at 00:00 UTC of `YYYY-MM-DD` (years 1970 to 9999).
fn day_start(s: &str) -> Option<i64> {
    let mut parts = s.split('-');
    let (y, m, d) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || y.len() != 4 || m.len() != 2 || d.len() != 2 {
        return None;
    }
    let (y, m, d): (i64, i64, i64) = (y.parse().ok()?, m.parse().ok()?, d.parse().ok()?);
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let days_in_month = [31, if leap { 29 } else { 28 }, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
    if y < 1970 || !(1..=12).contains(&m) || d < 1 || d > *days_in_month.get(usize::try_from(m - 1).ok()?)? {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Some((era * 146_097 + doe - 719_468) * 86_400)
}

pub struct EventRow {
    pub at: String,
    pub actor: String,
    /// The actor's email when the actor is a user of the organisation.
    pub actor_email: Option<String>,
    pub action: String,
    pub target: String,
    pub outcome: String,
    pub ip: String,
}

#[derive(Template)]
#[template(path = "portal/audit.html")]
struct AuditPage {
    shell: Shell,
    org: String,
    filters: Filters,
    rows: Vec<EventRow>,
    pager: Pager,
}

/// `GET /portal/orgs/{org}/audit?actor=&action=&outcome=&from=&to=&page=`.
pub async fn list(v: Visit, Path(org): Path<String>, uri: Uri) -> Response {
    let o = match v.org(&org).await {
        Ok(o) => o,
        Err(r) => return r,
    };
    let q = |k: &str| oidc::query_param(&uri, k).trim().to_owned();
    let filters =
        Filters { actor: q("actor"), action: q("action"), outcome: q("outcome"), from: q("from"), to: q("to") };
    let (n, page) = Pager::request(&uri);
    let outcome = match filters.filter() {
        Ok(mut f) => {
            // An email names the user with that address (the log records ids).
            if let Some(email) = f.actor.clone().filter(|a| a.contains('@')) {
                f.actor = Some(user_with_email(&v, &org, &email).await.unwrap_or(email));
            }
            v.s.core.audit_events(&v.who, &org, &f, page).await
        }
        Err(e) => Err(e),
    };
    let mut shell = v.shell(Some(&o), Nav::Audit).await;
    let (mut events, failure) = match outcome {
        Ok(e) => (e, None),
        Err(e @ Error::InvalidInput(_)) => (Vec::new(), Some(page_error(e))),
        Err(e) => return v.fail(Some(&o), e).await,
    };
    let pager = Pager::cut(n, &mut events, &format!("/portal/orgs/{org}/audit"), &filters.pairs());
    shell.error = failure.as_ref().map(|(_, e)| e.clone());
    let emails = actor_emails(&v, &org, &events).await;
    let rows = events
        .iter()
        .map(|e| EventRow {
            at: short_time(&rfc3339(e.at)),
            actor: e.actor.clone(),
            actor_email: emails.get(&e.actor).cloned(),
            action: e.action.clone(),
            target: e.target.clone(),
            outcome: e.outcome.clone(),
            ip: e.ip.clone().unwrap_or_default(),
        })
        .collect();
    let page = AuditPage { shell, org: o.slug.to_string(), filters, rows, pager };
    match failure {
        Some((status, err)) => v.failed(status, &page, &err),
        None => v.page(StatusCode::OK, &page),
    }
}

/// The emails of the actors of `events` that are users of the organisation: one lookup per
/// distinct actor of the page (client ids and `system` are not users).
async fn actor_emails(v: &Visit, org: &str, events: &[AuditEvent]) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for e in events {
        let a = &e.actor;
        if out.contains_key(a) || a.contains('$') || a.is_empty() || a.len() > 64 {
            continue;
        }
        if let Ok(u) = v.s.core.user(&v.who, org, a).await {
            out.insert(a.clone(), u.email.to_string());
        }
    }
    out
}

/// The id of the organisation's user with this email, if any.
async fn user_with_email(v: &Visit, org: &str, email: &str) -> Option<String> {
    let found = v.s.core.search_users(&v.who, org, Some(email), Page::new(Some(10), None)).await.ok()?;
    found.into_iter().find(|u| u.email.as_str().eq_ignore_ascii_case(email.trim())).map(|u| u.id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_read_as_utc_day_starts() {
        assert_eq!(day_start("1970-01-01"), Some(0));
        assert_eq!(day_start("2000-03-01"), Some(951_868_800));
        assert_eq!(day_start("2024-02-29"), Some(1_709_164_800));
        assert_eq!(day_start("2030-01-01"), Some(1_893_456_000));
        for bad in ["2023-02-29", "2024-13-01", "2024-00-10", "2024-1-1", "1969-12-31", "x", "2024-01-01-01", ""] {
            assert_eq!(day_start(bad), None, "{bad}");
        }
    }
}
