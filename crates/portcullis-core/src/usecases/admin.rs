//! Admin use cases: organisations, services (scopes, roles, permissions), role grants,
//! applications (with secret rotation), users, audit events, and the authorization check.

use std::collections::BTreeSet;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use super::*;
use crate::crypto::secrets::{SecretHash, generate_secret};
use crate::crypto::signing::Algorithm;
use crate::ids::{ClientId, Email, PermissionName};
use crate::model::{AuditEvent, AuditFilter, AuthMethod, GrantType, OrganisationCounts, Page, RoleGrant, User};

/// "Expiring soon" on the portal's dashboard: within this many days.
pub const EXPIRING_SOON_DAYS: i64 = 30;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewOrganisation {
    pub slug: String,
    pub name: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewService {
    pub slug: String,
    pub name: String,
    pub audience: String,
    #[serde(default)]
    pub scopes: Vec<String>,
    #[serde(default)]
    pub roles: Vec<String>,
    #[serde(default)]
    pub permissions: Vec<String>,
    /// role → permissions granted to it.
    #[serde(default)]
    pub grants: std::collections::BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewApplication {
    pub slug: String,
    pub name: String,
    #[serde(default)]
    pub grant_types: Option<Vec<String>>,
    #[serde(default)]
    pub scopes: Vec<String>,
    #[serde(default)]
    pub roles: Vec<String>,
    #[serde(default)]
    pub token_endpoint_auth_method: Option<String>,
    #[serde(default)]
    pub redirect_uris: Vec<String>,
    #[serde(default)]
    pub access_token_lifetime: Option<i64>,
    #[serde(default)]
    pub access_token_signing_alg: Option<String>,
    #[serde(default)]
    pub enabled: Option<bool>,
    /// For `private_key_jwt`: a JWKS URL used besides the application's signing certificates.
    #[serde(default)]
    pub jwks_uri: Option<String>,
    #[serde(default)]
    pub id_token_signed_response_alg: Option<String>,
    #[serde(default)]
    pub first_party: Option<bool>,
    #[serde(default)]
    pub post_logout_redirect_uris: Vec<String>,
    #[serde(default)]
    pub backchannel_logout_uri: Option<String>,
    #[serde(default)]
    pub always_issue_refresh_token: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplicationPatch {
    pub name: Option<String>,
    pub grant_types: Option<Vec<String>>,
    pub scopes: Option<Vec<String>>,
    pub roles: Option<Vec<String>>,
    pub redirect_uris: Option<Vec<String>>,
    pub access_token_lifetime: Option<i64>,
    pub access_token_signing_alg: Option<String>,
    pub enabled: Option<bool>,
    pub id_token_signed_response_alg: Option<String>,
    pub first_party: Option<bool>,
    pub post_logout_redirect_uris: Option<Vec<String>>,
    /// `""` removes it.
    pub backchannel_logout_uri: Option<String>,
    pub always_issue_refresh_token: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretRotation {
    /// Seconds the previous secret keeps working; default from settings, 0 ends it at once.
    pub grace_period: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewUser {
    pub email: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub password: Option<SecretString>,
    #[serde(default)]
    pub roles: Vec<String>,
}

impl std::fmt::Debug for NewUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewUser").field("email", &self.email).field("roles", &self.roles).finish_non_exhaustive()
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthzCheck {
    pub subject: String,
    pub permission: String,
    #[serde(default)]
    pub resource: Option<String>,
    /// The organisation (slug) of a user subject; default the caller's. Only platform admins
    /// may name another one.
    #[serde(default)]
    pub organisation: Option<String>,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct AuthzDecision {
    pub allowed: bool,
    pub reason: String,
}

/// The public view of an application: never a secret or a hash.
#[derive(Debug, Serialize)]
pub struct ApplicationView {
    pub client_id: String,
    pub organisation: String,
    pub slug: String,
    pub name: String,
    pub grant_types: Vec<&'static str>,
    pub scopes: Vec<String>,
    pub roles: Vec<String>,
    pub token_endpoint_auth_method: &'static str,
    pub redirect_uris: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwks_uri: Option<String>,
    /// The application's JWKS built from its signing certificates (`private_key_jwt`).
    pub certificate_jwks_uri: String,
    pub access_token_lifetime: i64,
    pub access_token_signing_alg: &'static str,
    pub id_token_signed_response_alg: &'static str,
    pub first_party: bool,
    pub post_logout_redirect_uris: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backchannel_logout_uri: Option<String>,
    pub always_issue_refresh_token: bool,
    pub enabled: bool,
    pub previous_secret_expires_at: Option<UnixTime>,
    pub created_at: UnixTime,
    pub updated_at: UnixTime,
}

impl ApplicationView {
    pub fn new(app: &Application, org_slug: &str) -> Self {
        Self {
            client_id: app.client_id.to_string(),
            organisation: org_slug.to_owned(),
            slug: app.slug.to_string(),
            name: app.name.clone(),
            grant_types: app.grant_types.iter().map(|g| g.as_str()).collect(),
            scopes: app.scopes.iter().map(ToString::to_string).collect(),
            roles: app.roles.iter().map(ToString::to_string).collect(),
            token_endpoint_auth_method: app.auth_method.as_str(),
            redirect_uris: app.redirect_uris.clone(),
            jwks_uri: app.jwks_uri.clone(),
            certificate_jwks_uri: format!("/applications/{}/jwks.json", app.client_id),
            access_token_lifetime: app.access_token_lifetime,
            access_token_signing_alg: app.signing_alg.as_str(),
            id_token_signed_response_alg: app.id_token_signing_alg.as_str(),
            first_party: app.first_party,
            post_logout_redirect_uris: app.post_logout_redirect_uris.clone(),
            backchannel_logout_uri: app.backchannel_logout_uri.clone(),
            always_issue_refresh_token: app.always_issue_refresh_token,
            enabled: app.enabled,
            previous_secret_expires_at: app.previous_secret_expires_at,
            created_at: app.created_at,
            updated_at: app.updated_at,
        }
    }
}

/// Created application: the secret is shown here and never again.
#[derive(Debug)]
pub struct CreatedApplication {
    pub app: Application,
    pub client_secret: Option<SecretString>,
}

#[derive(Debug, Serialize)]
pub struct UserView {
    pub id: String,
    pub email: String,
    pub name: Option<String>,
    pub roles: Vec<String>,
    pub enabled: bool,
    /// Set while the account is locked after repeated failed logins.
    pub locked_until: Option<UnixTime>,
    pub created_at: UnixTime,
    pub updated_at: UnixTime,
}

impl From<&User> for UserView {
    fn from(u: &User) -> Self {
        Self {
            id: u.id.clone(),
            email: u.email.to_string(),
            name: u.name.clone(),
            roles: u.roles.iter().map(ToString::to_string).collect(),
            enabled: u.enabled,
            locked_until: u.locked_until,
            created_at: u.created_at,
            updated_at: u.updated_at,
        }
    }
}

fn parse_all<T>(items: &[String], f: impl Fn(&str) -> Result<T>) -> Result<Vec<T>> {
    items.iter().map(|s| f(s)).collect()
}

fn dedup<T: Ord + Clone>(v: Vec<T>) -> Vec<T> {
    v.into_iter().collect::<BTreeSet<_>>().into_iter().collect()
}

pub(crate) fn check_name(name: &str) -> Result<String> {
    let n = name.trim();
    if n.is_empty() || n.chars().count() > 200 || n.chars().any(char::is_control) {
        return Err(Error::invalid("name must be 1 to 200 characters without control characters"));
    }
    Ok(n.to_owned())
}

/// Audiences are absolute URIs (RFC 8707 §2): a scheme, no fragment, ≤ 512 bytes.
fn check_audience(a: &str) -> Result<()> {
    let scheme_ok = a.split_once(':').is_some_and(|(s, rest)| {
        !s.is_empty()
            && s.chars().all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
            && s.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
            && !rest.is_empty()
    });
    if !scheme_ok || a.len() > 512 || a.contains('#') || a.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(Error::invalid(format!(
            "invalid audience {:?}: expected an absolute URI without fragment, e.g. https://payments.example.com",
            a.chars().take(64).collect::<String>()
        )));
    }
    Ok(())
}

/// A redirect URI (also a post-logout or back-channel URI): `https://`, or `http://` only to
/// a loopback host; no fragment, no userinfo, no wildcard, nothing a browser would rewrite.
/// Public for the fuzz targets (`fuzz/src/redirects.rs`).
pub fn check_redirect_uri(u: &str) -> Result<String> {
    let loopback = ["http://127.0.0.1", "http://[::1]", "http://localhost"]
        .iter()
        .any(|p| u.strip_prefix(p).is_some_and(|rest| rest.is_empty() || rest.starts_with([':', '/', '?'])));
    let authority = u.split_once("://").map(|(_, rest)| rest.split(['/', '?']).next().unwrap_or("")).unwrap_or("");
    let ok = (u.starts_with("https://") || loopback)
        && !authority.is_empty()
        && u.len() <= 2048
        && !u.contains(['#', '*', '\\'])
        && !authority.contains('@')
        && u.bytes().all(|b| b.is_ascii_graphic());
    if !ok {
        return Err(Error::invalid(format!(
            "invalid redirect URI {:?}: expected an absolute https URL (http only for localhost, 127.0.0.1 or [::1]) without fragment, userinfo or wildcard",
            u.chars().take(64).collect::<String>()
        )));
    }
    Ok(u.to_owned())
}

/// A registered JWKS URL: https, or http only to a loopback host (development).
/// Public for the fuzz targets (`fuzz/src/redirects.rs`).
pub fn check_jwks_uri(u: &str) -> Result<String> {
    let loopback = ["http://127.0.0.1", "http://[::1]", "http://localhost"]
        .iter()
        .any(|p| u.strip_prefix(p).is_some_and(|rest| rest.starts_with([':', '/'])));
    let ok = (u.starts_with("https://") || loopback)
        && u.len() <= 2048
        && !u.contains(['#', '@'])
        && !u.chars().any(|c| c.is_whitespace() || c.is_control());
    if !ok {
        return Err(Error::invalid(
            "jwks_uri must be an https URL without fragment or credentials (http only to 127.0.0.1, [::1] or localhost)",
        ));
    }
    Ok(u.to_owned())
}

impl Portcullis {
    // ---- organisations ------------------------------------------------------------------

    pub async fn create_organisation(
        &self,
        who: &Principal,
        ctx: &RequestContext,
        req: NewOrganisation,
    ) -> Result<Organisation> {
        who.ensure_platform_admin()?;
        let slug = Slug::parse(&req.slug)?;
        let now = self.now();
        let org = Organisation {
            id: new_id(),
            slug,
            name: check_name(&req.name)?,
            allowed_domains: Vec::new(),
            self_registration: false,
            created_at: now,
            updated_at: now,
        };
        let ev = self.audit(
            ctx,
            &who.subject,
            Some(&org.id),
            "organisation.create",
            org.slug.as_str(),
            serde_json::json!({}),
        );
        self.store.create_organisation(&org, &ev).await.map_err(|e| conflict(e, "organisation", org.slug.as_str()))?;
        Ok(org)
    }

    pub async fn organisation(&self, who: &Principal, slug: &str) -> Result<Organisation> {
        self.administered_org(who, slug).await
    }

    pub async fn organisations(&self, who: &Principal, page: Page) -> Result<Vec<Organisation>> {
        if who.is_platform_admin() {
            return Ok(self.store.organisations(page).await?);
        }
        who.ensure_admin(&who.org)?;
        Ok(vec![self.organisation_or_404(&who.org).await?])
    }

    /// The portal's dashboard: the organisations `who` administers (every one for a platform
    /// admin, else their own), each with its counts: certificates expiring within
    /// [`EXPIRING_SOON_DAYS`] and failed sign-ins since the start of the current UTC day.
    /// With `q`, only the organisations whose slug or name contains it (case-insensitive).
    pub async fn organisation_overview(
        &self,
        who: &Principal,
        q: Option<&str>,
        page: Page,
    ) -> Result<Vec<(Organisation, OrganisationCounts)>> {
        let orgs = match search_text(q)? {
            Some(q) if who.is_platform_admin() => self.store.search_organisations(q, page).await?,
            Some(q) => {
                let q = q.to_lowercase();
                let mut own = self.organisations(who, page).await?;
                own.retain(|o| o.slug.as_str().contains(&q) || o.name.to_lowercase().contains(&q));
                own
            }
            None => self.organisations(who, page).await?,
        };
        let now = self.now();
        let day_start = now - now.rem_euclid(86_400);
        let mut out = Vec::with_capacity(orgs.len());
        for org in orgs {
            let counts =
                self.store.organisation_counts(&org.id, now, now + EXPIRING_SOON_DAYS * 86_400, day_start).await?;
            out.push((org, counts));
        }
        Ok(out)
    }

    // ---- services and roles ---------------------------------------------------------------

    pub async fn create_service(
        &self,
        who: &Principal,
        ctx: &RequestContext,
        org_slug: &str,
        req: NewService,
    ) -> Result<Service> {
        let org = self.administered_org(who, org_slug).await?;
        let slug = Slug::parse(&req.slug)?;
        if slug.as_str() == PLATFORM_SERVICE {
            return Err(Error::invalid(format!("service slug {PLATFORM_SERVICE:?} is reserved")));
        }
        check_audience(&req.audience)?;
        if req.audience == self.settings.issuer {
            return Err(Error::invalid("a service audience cannot be the issuer"));
        }
        let owned = |svc: &str, what: &str, item: &str| -> Result<()> {
            if svc == slug.as_str() {
                Ok(())
            } else {
                Err(Error::invalid(format!("{what} {item:?} must start with this service's slug {:?}", slug.as_str())))
            }
        };
        let scopes = dedup(parse_all(&req.scopes, crate::ids::ScopeName::parse)?);
        for s in &scopes {
            owned(s.service().unwrap_or_default(), "scope", s.as_str())?;
        }
        let roles = dedup(parse_all(&req.roles, RoleName::parse)?);
        for r in &roles {
            owned(r.service(), "role", r.as_str())?;
        }
        let permissions = dedup(parse_all(&req.permissions, PermissionName::parse)?);
        for p in &permissions {
            owned(p.service(), "permission", p.as_str())?;
        }
        let mut grants = Vec::new();
        for (role, perms) in &req.grants {
            let role = RoleName::parse(role)?;
            if !roles.contains(&role) {
                return Err(Error::invalid(format!("grants name role {role:?}, which is not in this service's roles")));
            }
            for p in perms {
                let p = PermissionName::parse(p)?;
                if !permissions.contains(&p) {
                    return Err(Error::invalid(format!(
                        "grants name permission {p:?}, which is not in this service's permissions"
                    )));
                }
                grants.push(RoleGrant { role: role.clone(), permission: p });
            }
        }
        let now = self.now();
        let svc = Service {
            id: new_id(),
            org_id: org.id.clone(),
            slug,
            name: check_name(&req.name)?,
            audience: req.audience,
            scopes,
            roles,
            permissions,
            created_at: now,
            updated_at: now,
        };
        let ev = self.audit(
            ctx,
            &who.subject,
            Some(&org.id),
            "service.create",
            svc.slug.as_str(),
            serde_json::json!({ "audience": svc.audience }),
        );
        self.store
            .create_service(&svc, &dedup(grants), &ev)
            .await
            .map_err(|e| conflict(e, "service (or audience)", svc.slug.as_str()))?;
        self.forget_services(&org.id);
        Ok(svc)
    }

    pub async fn services(&self, who: &Principal, org_slug: &str) -> Result<Vec<Service>> {
        let org = self.administered_org(who, org_slug).await?;
        Ok(self.store.services(&org.id).await?)
    }

    pub async fn service(&self, who: &Principal, org_slug: &str, slug: &str) -> Result<Service> {
        let org = self.administered_org(who, org_slug).await?;
        self.store.service(&org.id, slug).await?.ok_or_else(|| Error::NotFound(format!("service {slug:?}")))
    }

    pub async fn delete_service(
        &self,
        who: &Principal,
        ctx: &RequestContext,
        org_slug: &str,
        slug: &str,
    ) -> Result<()> {
        let org = self.administered_org(who, org_slug).await?;
        let users = self.service_users(&org.id, slug).await?;
        if !users.is_empty() {
            return Err(Error::Conflict(format!(
                "service {slug:?} is still used by {}: remove its roles and scopes from them first",
                users.join(", ")
            )));
        }
        let ev = self.audit(ctx, &who.subject, Some(&org.id), "service.delete", slug, serde_json::json!({}));
        if !self.store.delete_service(&org.id, slug, &ev).await? {
            return Err(Error::NotFound(format!("service {slug:?}")));
        }
        self.forget_services(&org.id);
        Ok(())
    }

    /// Applications and users that hold a role or scope of service `slug` (at most 10 named),
    /// so a service is never deleted from under them.
    async fn service_users(&self, org_id: &str, slug: &str) -> Result<Vec<String>> {
        const SHOWN: usize = 10;
        let mut found = Vec::new();
        let uses = |roles: &[RoleName]| roles.iter().any(|r| r.service() == slug);
        collect_paged(
            &mut found,
            SHOWN,
            |page| self.store.applications(org_id, page),
            |a| {
                (uses(&a.roles) || a.scopes.iter().any(|s| s.service() == Some(slug)))
                    .then(|| format!("application {}", a.client_id))
            },
        )
        .await?;
        collect_paged(
            &mut found,
            SHOWN,
            |page| self.store.users(org_id, page),
            |u| uses(&u.roles).then(|| format!("user {}", u.email)),
        )
        .await?;
        Ok(found)
    }

    /// Every role defined in the organisation with the permissions granted to it.
    pub async fn roles(&self, who: &Principal, org_slug: &str) -> Result<Vec<(RoleName, Vec<PermissionName>)>> {
        let org = self.administered_org(who, org_slug).await?;
        let grants = self.store.role_grants(&org.id).await?;
        let mut out = Vec::new();
        for svc in self.store.services(&org.id).await? {
            for role in svc.roles {
                let perms = grants.iter().filter(|g| g.role == role).map(|g| g.permission.clone()).collect();
                out.push((role, perms));
            }
        }
        Ok(out)
    }

    /// The role `role` as one of the organisation's services defines it (404 otherwise).
    async fn defined_role(&self, org: &Organisation, role: &str) -> Result<RoleName> {
        let role = RoleName::parse(role)?;
        let services = self.store.services(&org.id).await?;
        if !services.iter().any(|s| s.roles.contains(&role)) {
            return Err(Error::NotFound(format!("role {role:?}")));
        }
        Ok(role)
    }

    /// Who holds a role of the organisation's services: its users (enabled or not), by email.
    pub async fn role_users(&self, who: &Principal, org_slug: &str, role: &str, page: Page) -> Result<Vec<User>> {
        let org = self.administered_org(who, org_slug).await?;
        let role = self.defined_role(&org, role).await?;
        Ok(self.store.role_users(&org.id, role.as_str(), page).await?)
    }

    /// Who holds a role of the organisation's services: its applications, by slug.
    pub async fn role_applications(
        &self,
        who: &Principal,
        org_slug: &str,
        role: &str,
        page: Page,
    ) -> Result<Vec<Application>> {
        let org = self.administered_org(who, org_slug).await?;
        let role = self.defined_role(&org, role).await?;
        Ok(self.store.role_applications(&org.id, role.as_str(), page).await?)
    }

    pub async fn set_role_permissions(
        &self,
        who: &Principal,
        ctx: &RequestContext,
        org_slug: &str,
        role: &str,
        permissions: Vec<String>,
    ) -> Result<()> {
        let org = self.administered_org(who, org_slug).await?;
        let role = RoleName::parse(role)?;
        let services = self.store.services(&org.id).await?;
        let Some(svc) = services.iter().find(|s| s.roles.contains(&role)) else {
            return Err(Error::NotFound(format!("role {role:?}")));
        };
        let perms = dedup(parse_all(&permissions, PermissionName::parse)?);
        for p in &perms {
            if !svc.permissions.contains(p) {
                return Err(Error::invalid(format!(
                    "permission {p:?} is not defined by service {:?}",
                    svc.slug.as_str()
                )));
            }
        }
        let ev = self.audit(
            ctx,
            &who.subject,
            Some(&org.id),
            "role.set_permissions",
            role.as_str(),
            serde_json::json!({ "permissions": perms }),
        );
        self.store.set_role_permissions(&org.id, &role, &perms, &ev).await?;
        Ok(())
    }

    // ---- applications -------------------------------------------------------------------

    /// Checks that roles and scopes exist in the organisation and that the caller may grant them.
    /// Changing an application (its settings, its secret, its existence) is granting what it
    /// holds: the caller must be allowed to grant every platform role the application has, or
    /// an organisation admin could rotate the secret of an application holding
    /// `portcullis:admin` (such as `portcullis$admin`) and take its role.
    fn ensure_may_manage(&self, who: &Principal, app: &Application) -> Result<()> {
        for r in &app.roles {
            let allowed = match r.as_str() {
                ROLE_PLATFORM_ADMIN | ROLE_GATEWAY => who.is_platform_admin(),
                _ => true,
            };
            if !allowed {
                return Err(Error::Forbidden(format!(
                    "application {} holds {r}: only a platform admin may change it",
                    app.client_id
                )));
            }
        }
        Ok(())
    }

    pub(crate) async fn check_grantable(
        &self,
        who: &Principal,
        org: &Organisation,
        roles: &[RoleName],
        scopes: &[crate::ids::ScopeName],
    ) -> Result<()> {
        let services = self.store.services(&org.id).await?;
        for r in roles {
            if r.service() == PLATFORM_SERVICE {
                let allowed = match r.as_str() {
                    ROLE_ORG_ADMIN => who.can_admin(org.slug.as_str()),
                    ROLE_PLATFORM_ADMIN | ROLE_GATEWAY => who.is_platform_admin(),
                    _ => return Err(Error::invalid(format!("role {r:?} does not exist"))),
                };
                if !allowed {
                    return Err(Error::Forbidden(format!("granting {r} requires a platform admin")));
                }
            } else if !services.iter().any(|s| s.roles.contains(r)) {
                return Err(Error::invalid(format!(
                    "role {r:?} is not defined by any service of organisation {}",
                    org.slug
                )));
            }
        }
        for s in scopes {
            if s.service().is_some() && !services.iter().any(|svc| svc.scopes.contains(s)) {
                return Err(Error::invalid(format!(
                    "scope {s:?} is not defined by any service of organisation {}",
                    org.slug
                )));
            }
        }
        Ok(())
    }

    fn check_lifetime(&self, l: i64) -> Result<i64> {
        if !(30..=self.settings.max_access_token_lifetime).contains(&l) {
            return Err(Error::invalid(format!(
                "access_token_lifetime must be 30 to {} seconds",
                self.settings.max_access_token_lifetime
            )));
        }
        Ok(l)
    }

    fn check_alg(&self, a: &str) -> Result<Algorithm> {
        let alg = Algorithm::parse(a)?;
        if !self.settings.signing_algorithms.contains(&alg) {
            return Err(Error::invalid(format!("signing algorithm {alg} is not enabled on this server")));
        }
        Ok(alg)
    }

    pub async fn create_application(
        &self,
        who: &Principal,
        ctx: &RequestContext,
        org_slug: &str,
        req: NewApplication,
    ) -> Result<CreatedApplication> {
        let org = self.administered_org(who, org_slug).await?;
        let slug = Slug::parse(&req.slug)?;
        let grant_types = dedup_grants(parse_all(
            req.grant_types.as_deref().unwrap_or(&["client_credentials".into()]),
            GrantType::parse,
        )?);
        if grant_types.is_empty() {
            return Err(Error::invalid("grant_types must name at least one grant"));
        }
        let auth_method =
            AuthMethod::parse(req.token_endpoint_auth_method.as_deref().unwrap_or("client_secret_basic"))?;
        if auth_method == AuthMethod::None
            && grant_types.iter().any(|g| !matches!(g, GrantType::AuthorizationCode | GrantType::RefreshToken))
        {
            return Err(Error::invalid(
                "a public client (token_endpoint_auth_method none) may only use authorization_code (with PKCE) and refresh_token",
            ));
        }
        let jwks_uri = match req.jwks_uri.as_deref() {
            None => None,
            Some(_) if auth_method != AuthMethod::PrivateKeyJwt => {
                return Err(Error::invalid("jwks_uri is only for token_endpoint_auth_method private_key_jwt"));
            }
            Some(u) => Some(check_jwks_uri(u)?),
        };
        let scopes = dedup(parse_all(&req.scopes, crate::ids::ScopeName::parse)?);
        let roles = dedup(parse_all(&req.roles, RoleName::parse)?);
        self.check_grantable(who, &org, &roles, &scopes).await?;
        let redirect_uris = parse_all(&req.redirect_uris, check_redirect_uri)?;
        let lifetime =
            self.check_lifetime(req.access_token_lifetime.unwrap_or(self.settings.default_access_token_lifetime))?;
        let signing_alg = self.check_alg(req.access_token_signing_alg.as_deref().unwrap_or("ES256"))?;
        let secret = if auth_method.uses_secret() { Some(generate_secret()?) } else { None };
        let now = self.now();
        let app = Application {
            id: new_id(),
            org_id: org.id.clone(),
            client_id: ClientId::new(&org.slug, &slug),
            slug,
            name: check_name(&req.name)?,
            grant_types,
            scopes,
            roles,
            auth_method,
            redirect_uris,
            jwks_uri,
            access_token_lifetime: lifetime,
            signing_alg,
            // RS256 is what OIDC clients assume when they registered nothing; a server without
            // it signs ID tokens like access tokens.
            id_token_signing_alg: match req.id_token_signed_response_alg.as_deref() {
                Some(a) => self.check_alg(a)?,
                None if self.settings.signing_algorithms.contains(&Algorithm::RS256) => Algorithm::RS256,
                None => signing_alg,
            },
            first_party: req.first_party.unwrap_or(false),
            post_logout_redirect_uris: parse_all(&req.post_logout_redirect_uris, check_redirect_uri)?,
            backchannel_logout_uri: req.backchannel_logout_uri.as_deref().map(check_redirect_uri).transpose()?,
            always_issue_refresh_token: req.always_issue_refresh_token.unwrap_or(false),
            enabled: req.enabled.unwrap_or(true),
            secret_hash: secret.as_ref().map(|s| SecretHash::of(self.vault.as_ref(), s.expose_secret())),
            previous_secret_hash: None,
            previous_secret_expires_at: None,
            created_at: now,
            updated_at: now,
        };
        let ev = self.audit(
            ctx,
            &who.subject,
            Some(&org.id),
            "application.create",
            app.client_id.as_str(),
            serde_json::json!({ "roles": app.roles, "scopes": app.scopes }),
        );
        self.store
            .create_application(&app, &ev)
            .await
            .map_err(|e| conflict(e, "application", app.client_id.as_str()))?;
        self.forget_client(app.client_id.as_str());
        Ok(CreatedApplication { app, client_secret: secret })
    }

    async fn app_in_org(&self, org: &Organisation, app_slug: &str) -> Result<Application> {
        let client_id = format!("{}${}", org.slug, app_slug);
        self.store
            .application(&client_id)
            .await?
            .filter(|a| a.org_id == org.id)
            .ok_or_else(|| Error::NotFound(format!("application {client_id:?}")))
    }

    pub async fn application(&self, who: &Principal, org_slug: &str, app_slug: &str) -> Result<Application> {
        let org = self.administered_org(who, org_slug).await?;
        self.app_in_org(&org, app_slug).await
    }

    pub async fn applications(&self, who: &Principal, org_slug: &str, page: Page) -> Result<Vec<Application>> {
        let org = self.administered_org(who, org_slug).await?;
        Ok(self.store.applications(&org.id, page).await?)
    }

    /// Applications of an organisation, optionally those whose slug or name contains `q`.
    pub async fn search_applications(
        &self,
        who: &Principal,
        org_slug: &str,
        q: Option<&str>,
        page: Page,
    ) -> Result<Vec<Application>> {
        let org = self.administered_org(who, org_slug).await?;
        match search_text(q)? {
            Some(q) => Ok(self.store.search_applications(&org.id, q, page).await?),
            None => Ok(self.store.applications(&org.id, page).await?),
        }
    }

    pub async fn update_application(
        &self,
        who: &Principal,
        ctx: &RequestContext,
        org_slug: &str,
        app_slug: &str,
        patch: ApplicationPatch,
    ) -> Result<Application> {
        let org = self.administered_org(who, org_slug).await?;
        let old = self.app_in_org(&org, app_slug).await?;
        self.ensure_may_manage(who, &old)?;
        let mut app = old.clone();
        if let Some(n) = &patch.name {
            app.name = check_name(n)?;
        }
        if let Some(g) = &patch.grant_types {
            app.grant_types = dedup_grants(parse_all(g, GrantType::parse)?);
            if app.grant_types.is_empty() {
                return Err(Error::invalid("grant_types must name at least one grant"));
            }
        }
        if let Some(s) = &patch.scopes {
            app.scopes = dedup(parse_all(s, crate::ids::ScopeName::parse)?);
        }
        if let Some(r) = &patch.roles {
            app.roles = dedup(parse_all(r, RoleName::parse)?);
        }
        let added_roles: Vec<_> = app.roles.iter().filter(|r| !old.roles.contains(r)).cloned().collect();
        let added_scopes: Vec<_> = app.scopes.iter().filter(|s| !old.scopes.contains(s)).cloned().collect();
        self.check_grantable(who, &org, &added_roles, &added_scopes).await?;
        if let Some(u) = &patch.redirect_uris {
            app.redirect_uris = parse_all(u, check_redirect_uri)?;
        }
        if let Some(l) = patch.access_token_lifetime {
            app.access_token_lifetime = self.check_lifetime(l)?;
        }
        if let Some(a) = &patch.access_token_signing_alg {
            app.signing_alg = self.check_alg(a)?;
        }
        if let Some(e) = patch.enabled {
            app.enabled = e;
        }
        if let Some(a) = &patch.id_token_signed_response_alg {
            app.id_token_signing_alg = self.check_alg(a)?;
        }
        if let Some(f) = patch.first_party {
            app.first_party = f;
        }
        if let Some(u) = &patch.post_logout_redirect_uris {
            app.post_logout_redirect_uris = parse_all(u, check_redirect_uri)?;
        }
        if let Some(u) = &patch.backchannel_logout_uri {
            app.backchannel_logout_uri = if u.is_empty() { None } else { Some(check_redirect_uri(u)?) };
        }
        if let Some(r) = patch.always_issue_refresh_token {
            app.always_issue_refresh_token = r;
        }
        if app.auth_method == AuthMethod::None
            && app.grant_types.iter().any(|g| !matches!(g, GrantType::AuthorizationCode | GrantType::RefreshToken))
        {
            return Err(Error::invalid(
                "a public client (token_endpoint_auth_method none) may only use authorization_code (with PKCE) and refresh_token",
            ));
        }
        app.updated_at = self.now().max(old.updated_at + 1);
        let ev = self.audit(
            ctx,
            &who.subject,
            Some(&org.id),
            "application.update",
            app.client_id.as_str(),
            serde_json::json!({ "enabled": app.enabled, "roles": app.roles, "scopes": app.scopes }),
        );
        self.store
            .update_application(&app, old.updated_at, &ev)
            .await
            .map_err(|e| conflict(e, "application", app.client_id.as_str()))?;
        self.forget_client(app.client_id.as_str());
        Ok(app)
    }

    /// New secret now; the old one keeps working for the grace period.
    pub async fn rotate_client_secret(
        &self,
        who: &Principal,
        ctx: &RequestContext,
        org_slug: &str,
        app_slug: &str,
        req: SecretRotation,
    ) -> Result<(Application, SecretString)> {
        let org = self.administered_org(who, org_slug).await?;
        let old = self.app_in_org(&org, app_slug).await?;
        self.ensure_may_manage(who, &old)?;
        if !old.auth_method.uses_secret() {
            return Err(Error::invalid("this application does not authenticate with a secret"));
        }
        let grace = req.grace_period.unwrap_or(self.settings.secret_rotation_grace);
        if !(0..=30 * 86_400).contains(&grace) {
            return Err(Error::invalid("grace_period must be 0 to 2592000 seconds"));
        }
        let secret = generate_secret()?;
        let now = self.now();
        let mut app = old.clone();
        app.previous_secret_hash = if grace > 0 { old.secret_hash.clone() } else { None };
        app.previous_secret_expires_at = (grace > 0).then_some(now + grace);
        app.secret_hash = Some(SecretHash::of(self.vault.as_ref(), secret.expose_secret()));
        app.updated_at = now.max(old.updated_at + 1);
        let ev = self.audit(
            ctx,
            &who.subject,
            Some(&org.id),
            "application.rotate_secret",
            app.client_id.as_str(),
            serde_json::json!({ "grace_period": grace }),
        );
        self.store
            .update_application(&app, old.updated_at, &ev)
            .await
            .map_err(|e| conflict(e, "application", app.client_id.as_str()))?;
        self.forget_client(app.client_id.as_str());
        Ok((app, secret))
    }

    pub async fn delete_application(
        &self,
        who: &Principal,
        ctx: &RequestContext,
        org_slug: &str,
        app_slug: &str,
    ) -> Result<()> {
        let org = self.administered_org(who, org_slug).await?;
        let app = self.app_in_org(&org, app_slug).await?;
        self.ensure_may_manage(who, &app)?;
        if org.slug.as_str() == PLATFORM_ORG && app.slug.as_str() == ADMIN_APP {
            return Err(Error::Conflict(
                "the bootstrap admin application cannot be deleted; disable it instead".into(),
            ));
        }
        let ev = self.audit(
            ctx,
            &who.subject,
            Some(&org.id),
            "application.delete",
            app.client_id.as_str(),
            serde_json::json!({}),
        );
        // Its certificates go on the CRL first (reason cessationOfOperation): anything that
        // trusts our chain must stop accepting them, not only Portcullis.
        self.revoke_application_certificates(&who.subject, ctx, &org, &app).await?;
        self.store.delete_application(app.client_id.as_str(), &ev).await?;
        self.forget_client(app.client_id.as_str());
        Ok(())
    }

    // ---- users ----------------------------------------------------------------------------

    pub async fn create_user(
        &self,
        who: &Principal,
        ctx: &RequestContext,
        org_slug: &str,
        req: NewUser,
    ) -> Result<User> {
        let org = self.administered_org(who, org_slug).await?;
        let email = Email::parse(&req.email)?;
        let roles = dedup(parse_all(&req.roles, RoleName::parse)?);
        self.check_grantable(who, &org, &roles, &[]).await?;
        let name = req.name.as_deref().map(check_name).transpose()?;
        let password_hash = match req.password {
            Some(p) => Some(self.hash_password_limited(p).await?),
            None => None,
        };
        let now = self.now();
        let user = User {
            id: new_id(),
            org_id: org.id.clone(),
            email,
            name,
            password_hash,
            roles,
            enabled: true,
            failed_logins: 0,
            locked_until: None,
            created_at: now,
            updated_at: now,
        };
        let ev = self.audit(
            ctx,
            &who.subject,
            Some(&org.id),
            "user.create",
            &user.id,
            serde_json::json!({ "email": user.email, "roles": user.roles }),
        );
        self.store.create_user(&user, &ev).await.map_err(|e| conflict(e, "user with email", user.email.as_str()))?;
        Ok(user)
    }

    pub async fn users(&self, who: &Principal, org_slug: &str, page: Page) -> Result<Vec<User>> {
        let org = self.administered_org(who, org_slug).await?;
        Ok(self.store.users(&org.id, page).await?)
    }

    pub async fn user(&self, who: &Principal, org_slug: &str, id: &str) -> Result<User> {
        let org = self.administered_org(who, org_slug).await?;
        self.store.user(&org.id, id).await?.ok_or_else(|| Error::NotFound(format!("user {id:?}")))
    }

    // ---- audit ------------------------------------------------------------------------------

    pub async fn audit_events(
        &self,
        who: &Principal,
        org_slug: &str,
        filter: &AuditFilter,
        page: Page,
    ) -> Result<Vec<AuditEvent>> {
        let org = self.administered_org(who, org_slug).await?;
        let long = [&filter.action_prefix, &filter.actor, &filter.target, &filter.outcome]
            .into_iter()
            .any(|v| v.as_ref().is_some_and(|v| v.len() > 256));
        if long {
            return Err(Error::invalid("audit filters must be at most 256 bytes"));
        }
        Ok(self.store.search_audit_events(&org.id, filter, page).await?)
    }

    // ---- authorization ----------------------------------------------------------------------

    /// Does `subject` (a client id, or a user id of the caller's organisation) hold `permission`
    /// through any of its roles? Callers see subjects of their own organisation only, unless
    /// they are platform admins.
    pub async fn authz_check(&self, who: &Principal, req: AuthzCheck) -> Result<AuthzDecision> {
        let permission = PermissionName::parse(&req.permission)?;
        if req.resource.as_ref().is_some_and(|r| r.len() > 1024) {
            return Err(Error::invalid("resource must be at most 1024 bytes"));
        }
        let deny = |reason: String| Ok(AuthzDecision { allowed: false, reason });
        let (org, roles, enabled) = if req.subject.contains('$') {
            let client_id = ClientId::parse(&req.subject)?;
            let Some(c) = self.client(client_id.as_str()).await? else {
                return deny("unknown subject".into());
            };
            (c.org.clone(), c.app.roles.clone(), c.app.enabled)
        } else {
            let slug = req.organisation.as_deref().unwrap_or(&who.org);
            if !who.is_platform_admin() && slug != who.org {
                return deny("unknown subject".into());
            }
            let Some(org) = self.store.organisation(slug).await? else {
                return deny("unknown subject".into());
            };
            let user = self.store.user(&org.id, &req.subject).await?;
            match user {
                Some(u) => (org, u.roles, u.enabled),
                None => return deny("unknown subject".into()),
            }
        };
        if !who.is_platform_admin() && org.slug.as_str() != who.org {
            // The same answer as for a subject that does not exist: no probing other orgs.
            return deny("unknown subject".into());
        }
        if !enabled {
            return deny("subject is disabled".into());
        }
        let grants = self.store.role_grants(&org.id).await?;
        match grants.iter().find(|g| g.permission == permission && roles.contains(&g.role)) {
            Some(g) => Ok(AuthzDecision { allowed: true, reason: format!("granted to role {}", g.role) }),
            None => deny(format!("no role of the subject grants {permission}")),
        }
    }
}

/// Pages through `fetch` adding what `describe` names to `found`, until it holds `max` or the
/// pages run out.
async fn collect_paged<T, F: std::future::Future<Output = crate::store::StoreResult<Vec<T>>>>(
    found: &mut Vec<String>,
    max: usize,
    fetch: impl Fn(Page) -> F,
    describe: impl Fn(&T) -> Option<String>,
) -> Result<()> {
    let mut page = Page::new(Some(Page::MAX_LIMIT), None);
    while found.len() < max {
        let items = fetch(page).await?;
        found.extend(items.iter().filter_map(&describe).take(max - found.len()));
        if items.len() < Page::MAX_LIMIT as usize {
            break;
        }
        page.offset += u64::from(Page::MAX_LIMIT);
    }
    Ok(())
}

/// A list's search text: trimmed, `None` when empty, at most 100 characters.
pub(crate) fn search_text(q: Option<&str>) -> Result<Option<&str>> {
    match q.map(str::trim).filter(|q| !q.is_empty()) {
        Some(q) if q.chars().count() > 100 => Err(Error::invalid("q must be at most 100 characters")),
        other => Ok(other),
    }
}

fn dedup_grants(v: Vec<GrantType>) -> Vec<GrantType> {
    let mut out: Vec<GrantType> = Vec::new();
    for g in v {
        if !out.contains(&g) {
            out.push(g);
        }
    }
    out
}

fn conflict(e: crate::error::StoreError, what: &str, name: &str) -> Error {
    match e {
        crate::error::StoreError::Conflict(_) => Error::Conflict(format!("{what} {name:?} already exists")),
        other => other.into(),
    }
}

impl std::fmt::Display for Organisation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.slug.as_str())
    }
}
