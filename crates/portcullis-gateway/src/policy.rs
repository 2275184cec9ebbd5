//! Route policy: may an authenticated [`Identity`] use a [`Route`]?
//!
//! [`authorize`] checks, in this order, and stops at the first failure:
//!
//! 1. the identity's authentication method is one the route accepts (the authenticator only tries
//!    accepted methods, so this is a second line of defence);
//! 2. `audience`: for **bearer** identities, the token's `aud` contains the route's audience
//!    (exact string). Other methods (API key, client certificate, session) are not
//!    audience-restricted credentials and are not checked against it;
//! 3. `require_roles`: any one of them (`roles_mode = "any"`) or every one (`"all"`);
//! 4. `require_scopes`: every one, from the identity's scopes (tokens carry scopes; other methods
//!    carry what the control plane reports for them, often none);
//! 5. `require_permissions`: every one, each held when any of the identity's roles is granted it
//!    in the identity's **own** organisation's snapshot ([`PermissionGrants`]).
//!
//! Empty requirements allow everyone who authenticated with an accepted method. No role is
//! special: a platform administrator passes a route only by its requirements.
//!
//! A refusal ([`Denied`], a 403) names only what the route requires and the identity lacks: the
//! required roles (all of them for `any`, the missing ones for `all`), the missing scopes or
//! permissions, the required audience. It never lists the identity's other roles, nor roles that
//! would grant a missing permission, so its `x-error` text reveals nothing beyond the route's own
//! policy.

use std::collections::{HashMap, HashSet};
use std::fmt;

use portcullis_core::ids::{PermissionName, RoleName, ScopeName};

use crate::config::{AuthMethod, RolesMode, Route};

/// Who is calling, as established by authentication. Roles, scopes and audiences are compared
/// as exact strings; entries that are not well-formed simply never match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The token's `sub`, the user behind a session or API key, or the certificate's application.
    pub subject: String,
    /// The OAuth client (`org$app`); for sessions and API keys what the control plane reports.
    pub client_id: String,
    /// The organisation slug: whose permission grants apply.
    pub org: String,
    pub roles: Vec<String>,
    pub scopes: Vec<String>,
    /// A bearer token's `aud` (empty for other methods).
    pub audiences: Vec<String>,
    pub auth_method: AuthMethod,
}

/// A snapshot of the control plane's role → permission grants, per organisation slug. Roles are
/// the same names in every organisation, but a grant counts only in the organisation that made
/// it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PermissionGrants {
    /// org → role → permissions.
    by_org: HashMap<String, HashMap<String, HashSet<String>>>,
}

impl PermissionGrants {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `role` holds `permission` in organisation `org`.
    pub fn grant(&mut self, org: &str, role: &RoleName, permission: &PermissionName) {
        self.by_org
            .entry(org.to_owned())
            .or_default()
            .entry(role.as_str().to_owned())
            .or_default()
            .insert(permission.as_str().to_owned());
    }

    /// Whether any of `roles` holds `permission` in `org`.
    pub fn holds(&self, org: &str, roles: &[String], permission: &PermissionName) -> bool {
        self.by_org.get(org).is_some_and(|by_role| {
            roles.iter().any(|r| by_role.get(r.as_str()).is_some_and(|p| p.contains(permission.as_str())))
        })
    }

    /// Number of (organisation, role, permission) grants.
    pub fn len(&self) -> usize {
        self.by_org.values().flat_map(HashMap::values).map(HashSet::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl FromIterator<(String, RoleName, PermissionName)> for PermissionGrants {
    fn from_iter<I: IntoIterator<Item = (String, RoleName, PermissionName)>>(iter: I) -> Self {
        let mut g = Self::new();
        for (org, role, permission) in iter {
            g.grant(&org, &role, &permission);
        }
        g
    }
}

/// Why [`authorize`] refused; `Display` is the `x-error` text of the 403.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// The route does not accept this way of authenticating.
    AuthMethod { method: AuthMethod },
    /// The bearer token is not meant for this route's audience.
    Audience { required: String },
    /// `any`: every required role (none is held); `all`: the required roles not held.
    Roles { mode: RolesMode, missing: Vec<RoleName> },
    /// The required scopes not held.
    Scopes { missing: Vec<ScopeName> },
    /// The required permissions not held.
    Permissions { missing: Vec<PermissionName> },
}

fn join<T: fmt::Display>(items: &[T]) -> String {
    items.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
}

impl fmt::Display for Denied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Denied::AuthMethod { method } => write!(f, "authentication method {method} is not accepted on this route"),
            Denied::Audience { required } => write!(f, "the access token's audience does not include {required}"),
            Denied::Roles { mode: RolesMode::Any, missing } => write!(f, "requires one of the roles {}", join(missing)),
            Denied::Roles { mode: RolesMode::All, missing } => write!(f, "missing required roles: {}", join(missing)),
            Denied::Scopes { missing } => write!(f, "missing required scopes: {}", join(missing)),
            Denied::Permissions { missing } => write!(f, "missing required permissions: {}", join(missing)),
        }
    }
}

impl std::error::Error for Denied {}

/// The route policy (see the module documentation for the order and the rules).
pub fn authorize(route: &Route, id: &Identity, grants: &PermissionGrants) -> Result<(), Denied> {
    if !route.accepts(id.auth_method) {
        return Err(Denied::AuthMethod { method: id.auth_method });
    }
    if let Some(aud) = &route.audience
        && id.auth_method == AuthMethod::Bearer
        && !id.audiences.iter().any(|a| a == aud)
    {
        return Err(Denied::Audience { required: aud.clone() });
    }

    let has_role = |r: &RoleName| id.roles.iter().any(|h| h == r.as_str());
    if !route.require_roles.is_empty() {
        match route.roles_mode {
            RolesMode::Any if !route.require_roles.iter().any(has_role) => {
                return Err(Denied::Roles { mode: RolesMode::Any, missing: route.require_roles.clone() });
            }
            RolesMode::All => {
                let missing: Vec<RoleName> = route.require_roles.iter().filter(|r| !has_role(r)).cloned().collect();
                if !missing.is_empty() {
                    return Err(Denied::Roles { mode: RolesMode::All, missing });
                }
            }
            RolesMode::Any => {}
        }
    }

    let missing: Vec<ScopeName> =
        route.require_scopes.iter().filter(|s| !id.scopes.iter().any(|h| h == s.as_str())).cloned().collect();
    if !missing.is_empty() {
        return Err(Denied::Scopes { missing });
    }

    let missing: Vec<PermissionName> =
        route.require_permissions.iter().filter(|p| !grants.holds(&id.org, &id.roles, p)).cloned().collect();
    if !missing.is_empty() {
        return Err(Denied::Permissions { missing });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

    use super::*;
    use crate::config::{GatewayConfig, MtlsMode, RouteConfig, RouteKind};

    /// A validated route from `edit` applied to a bare one (bearer, api_key, mtls, session; no
    /// requirements).
    fn route(edit: impl FnOnce(&mut RouteConfig)) -> Route {
        let mut rc = RouteConfig {
            path: "/p/".into(),
            methods: None,
            upstream: "http://127.0.0.1:9001".into(),
            kind: RouteKind::Rest,
            auth: vec!["bearer".into(), "api_key".into(), "mtls".into(), "session".into()],
            require_roles: vec![],
            roles_mode: RolesMode::Any,
            require_scopes: vec![],
            require_permissions: vec![],
            audience: None,
            timeout_ms: 30_000,
            connect_timeout_ms: None,
            max_body_bytes: 1024,
            rate_limit: Default::default(),
            upstream_ca_file: None,
            upstream_client_certificate: false,
            preserve_host: false,
        };
        edit(&mut rc);
        let config = GatewayConfig {
            listen: "127.0.0.1:0".into(),
            server_names: vec!["localhost".into()],
            mtls: MtlsMode::Optional,
            trusted_proxies: vec![],
            login: None,
            routes: vec![rc],
        };
        config.validate().unwrap().routes()[0].clone()
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    fn who(roles: &[&str], scopes: &[&str]) -> Identity {
        Identity {
            subject: "u-1".into(),
            client_id: "acme$web".into(),
            org: "acme".into(),
            roles: strings(roles),
            scopes: strings(scopes),
            audiences: strings(&["https://payments.acme.test"]),
            auth_method: AuthMethod::Bearer,
        }
    }

    fn role(s: &str) -> RoleName {
        RoleName::parse(s).unwrap()
    }
    fn perm(s: &str) -> PermissionName {
        PermissionName::parse(s).unwrap()
    }

    #[test]
    fn empty_requirements_allow_any_accepted_identity() {
        let r = route(|_| {});
        let none = PermissionGrants::new();
        assert_eq!(authorize(&r, &who(&[], &[]), &none), Ok(()));
        for m in AuthMethod::ALL {
            let id = Identity { auth_method: m, audiences: vec![], ..who(&[], &[]) };
            assert_eq!(authorize(&r, &id, &none), Ok(()), "{m}");
        }
    }

    #[test]
    fn auth_method_must_be_accepted() {
        let r = route(|c| c.auth = strings(&["bearer"]));
        let id = Identity { auth_method: AuthMethod::ApiKey, ..who(&[], &[]) };
        let e = authorize(&r, &id, &PermissionGrants::new()).unwrap_err();
        assert_eq!(e, Denied::AuthMethod { method: AuthMethod::ApiKey });
        assert_eq!(e.to_string(), "authentication method api_key is not accepted on this route");
    }

    #[test]
    fn roles_any_needs_one() {
        let r = route(|c| c.require_roles = strings(&["payments:reader", "payments:admin"]));
        let g = PermissionGrants::new();
        assert_eq!(authorize(&r, &who(&["payments:admin"], &[]), &g), Ok(()));
        assert_eq!(authorize(&r, &who(&["other:x", "payments:reader"], &[]), &g), Ok(()));
        let e = authorize(&r, &who(&["other:x", "secret:role"], &[]), &g).unwrap_err();
        assert_eq!(
            e,
            Denied::Roles { mode: RolesMode::Any, missing: vec![role("payments:reader"), role("payments:admin")] }
        );
        let text = e.to_string();
        assert_eq!(text, "requires one of the roles payments:reader, payments:admin");
        assert!(!text.contains("secret:role") && !text.contains("other:x"), "never the identity's roles");
        // Near misses do not count.
        assert!(authorize(&r, &who(&["Payments:reader", "payments:reader ", "payments"], &[]), &g).is_err());
    }

    #[test]
    fn roles_all_needs_every_one_and_names_the_missing() {
        let r = route(|c| {
            c.require_roles = strings(&["a:x", "b:y", "c:z"]);
            c.roles_mode = RolesMode::All;
        });
        let g = PermissionGrants::new();
        assert_eq!(authorize(&r, &who(&["c:z", "b:y", "a:x", "d:w"], &[]), &g), Ok(()));
        let e = authorize(&r, &who(&["b:y", "d:w"], &[]), &g).unwrap_err();
        assert_eq!(e, Denied::Roles { mode: RolesMode::All, missing: vec![role("a:x"), role("c:z")] });
        assert_eq!(e.to_string(), "missing required roles: a:x, c:z");
        // One role is not enough for `all`, though it would be for `any`.
        assert!(authorize(&r, &who(&["a:x"], &[]), &g).is_err());
    }

    #[test]
    fn scopes_are_all_required() {
        let r = route(|c| c.require_scopes = strings(&["payments/read", "payments/write", "openid"]));
        let g = PermissionGrants::new();
        assert_eq!(authorize(&r, &who(&[], &["openid", "payments/write", "payments/read"]), &g), Ok(()));
        let e = authorize(&r, &who(&[], &["payments/read", "other/x"]), &g).unwrap_err();
        assert_eq!(
            e,
            Denied::Scopes {
                missing: vec![ScopeName::parse("payments/write").unwrap(), ScopeName::parse("openid").unwrap()]
            }
        );
        assert_eq!(e.to_string(), "missing required scopes: payments/write, openid");
        // A credential without scopes (e.g. an API key) fails a scope requirement.
        let key = Identity { auth_method: AuthMethod::ApiKey, scopes: vec![], ..who(&[], &[]) };
        assert!(matches!(authorize(&r, &key, &g), Err(Denied::Scopes { .. })));
    }

    #[test]
    fn audience_applies_to_bearer_tokens_only() {
        let r = route(|c| c.audience = Some("https://payments.acme.test".into()));
        let g = PermissionGrants::new();
        assert_eq!(authorize(&r, &who(&[], &[]), &g), Ok(()));
        let multi =
            Identity { audiences: strings(&["https://other.test", "https://payments.acme.test"]), ..who(&[], &[]) };
        assert_eq!(authorize(&r, &multi, &g), Ok(()));
        for aud in [
            vec![],
            strings(&["https://other.test"]),
            strings(&["https://payments.acme.test/"]),
            strings(&["HTTPS://payments.acme.test"]),
        ] {
            let id = Identity { audiences: aud.clone(), ..who(&[], &[]) };
            let e = authorize(&r, &id, &g).unwrap_err();
            assert_eq!(e, Denied::Audience { required: "https://payments.acme.test".into() }, "{aud:?}");
            assert_eq!(e.to_string(), "the access token's audience does not include https://payments.acme.test");
        }
        for m in [AuthMethod::ApiKey, AuthMethod::Mtls, AuthMethod::Session] {
            let id = Identity { auth_method: m, audiences: vec![], ..who(&[], &[]) };
            assert_eq!(authorize(&r, &id, &g), Ok(()), "{m}");
        }
    }

    #[test]
    fn permissions_come_from_roles_in_the_identitys_own_org() {
        let r = route(|c| c.require_permissions = strings(&["payments.invoice.read", "payments.invoice.write"]));
        let grants: PermissionGrants = [
            ("acme".to_owned(), role("payments:reader"), perm("payments.invoice.read")),
            ("acme".to_owned(), role("payments:writer"), perm("payments.invoice.write")),
            // The same role name in another organisation grants more; it must not count for acme.
            ("globex".to_owned(), role("payments:reader"), perm("payments.invoice.write")),
        ]
        .into_iter()
        .collect();
        assert_eq!(grants.len(), 3);
        assert_eq!(authorize(&r, &who(&["payments:reader", "payments:writer"], &[]), &grants), Ok(()));
        let e = authorize(&r, &who(&["payments:reader", "hidden:role"], &[]), &grants).unwrap_err();
        assert_eq!(e, Denied::Permissions { missing: vec![perm("payments.invoice.write")] });
        assert_eq!(e.to_string(), "missing required permissions: payments.invoice.write");
        assert!(!e.to_string().contains("payments:writer"), "never which role would grant it");
        // globex's identity with the same role holds write there, but not read.
        let globex = Identity { org: "globex".into(), ..who(&["payments:reader"], &[]) };
        assert_eq!(
            authorize(&r, &globex, &grants),
            Err(Denied::Permissions { missing: vec![perm("payments.invoice.read")] })
        );
        // An organisation without any snapshot holds nothing.
        let unknown = Identity { org: "initech".into(), ..who(&["payments:reader", "payments:writer"], &[]) };
        assert!(matches!(authorize(&r, &unknown, &grants), Err(Denied::Permissions { missing }) if missing.len() == 2));
        // No roles, no permissions.
        assert!(authorize(&r, &who(&[], &[]), &grants).is_err());
    }

    #[test]
    fn checks_run_in_a_fixed_order() {
        let r = route(|c| {
            c.auth = strings(&["bearer", "session"]);
            c.audience = Some("https://a.test".into());
            c.require_roles = strings(&["a:b"]);
            c.require_scopes = strings(&["a/b"]);
            c.require_permissions = strings(&["a.b.c"]);
        });
        let g: PermissionGrants = [("acme".to_owned(), role("a:b"), perm("a.b.c"))].into_iter().collect();
        let base = Identity { audiences: strings(&["https://a.test"]), ..who(&["a:b"], &["a/b"]) };
        assert_eq!(authorize(&r, &base, &g), Ok(()));
        let nothing = Identity { audiences: vec![], ..who(&[], &[]) };
        assert!(matches!(authorize(&r, &nothing, &g), Err(Denied::Audience { .. })));
        let aud_only = Identity { roles: vec![], scopes: vec![], ..base.clone() };
        assert!(matches!(authorize(&r, &aud_only, &g), Err(Denied::Roles { .. })));
        let no_scope = Identity { scopes: vec![], ..base.clone() };
        assert!(matches!(authorize(&r, &no_scope, &g), Err(Denied::Scopes { .. })));
        assert!(matches!(authorize(&r, &base, &PermissionGrants::new()), Err(Denied::Permissions { .. })));
        let mtls = Identity { auth_method: AuthMethod::Mtls, ..base };
        assert!(matches!(authorize(&r, &mtls, &g), Err(Denied::AuthMethod { .. })));
    }

    #[test]
    fn grants_snapshot_basics() {
        let mut g = PermissionGrants::new();
        assert!(g.is_empty());
        g.grant("acme", &role("a:b"), &perm("a.b.c"));
        g.grant("acme", &role("a:b"), &perm("a.b.c"));
        assert_eq!(g.len(), 1);
        assert!(g.holds("acme", &strings(&["x:y", "a:b"]), &perm("a.b.c")));
        assert!(!g.holds("acme", &strings(&["x:y"]), &perm("a.b.c")));
        assert!(!g.holds("acme", &strings(&["a:b"]), &perm("a.b.d")));
        assert!(!g.holds("other", &strings(&["a:b"]), &perm("a.b.c")));
    }
}
