//! Property tests of the route policy (`policy::authorize`) against a reference model written
//! from its documentation (docs/gateway.md, the module docs of `policy.rs`): accepted method,
//! then the bearer-only audience, then roles (`any`: one of them, `all`: every one), then every
//! scope, then every permission held through one of the identity's roles in its own
//! organisation; the first failure is the answer and names only what the route requires. And
//! the access token's side: claims signed, verified (`verify_access_token`) and turned into an
//! identity meet a route's audience exactly when the token's `aud` lists it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

#[path = "../../../fuzz/src/bytes.rs"]
mod bytes;
#[path = "../../../fuzz/src/tokens.rs"]
#[allow(dead_code)]
mod tokens;

use std::sync::OnceLock;

use portcullis_core::crypto::jws;
use portcullis_core::ids::{PermissionName, RoleName, ScopeName};
use portcullis_core::tokens::{ACCESS_TOKEN_TYP, AccessClaims, Audience, verify_access_token};
use portcullis_gateway::config::{AuthMethod, GatewayConfig, MtlsMode, RolesMode, Route, RouteConfig, RouteKind};
use portcullis_gateway::policy::{Denied, Identity, PermissionGrants, authorize};
use proptest::prelude::*;
use proptest::sample::subsequence;

const ROLES: [&str; 4] = ["pay:reader", "pay:admin", "ops:oncall", "hr:viewer"];
/// Near misses of the roles above: letter case, whitespace, another separator, a prefix.
const ROLE_LOOKALIKES: [&str; 4] = ["Pay:reader", "pay:reader ", "pay/reader", "pay:read"];
const SCOPES: [&str; 4] = ["pay/read", "pay/write", "openid", "ops/page"];
const PERMISSIONS: [&str; 3] = ["pay.invoice.read", "pay.invoice.write", "ops.pager.ack"];
const AUDIENCES: [&str; 3] = ["https://pay.test", "https://ops.test", "https://pay.test/"];
const ORGS: [&str; 2] = ["acme", "globex"];

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

#[derive(Debug, Clone)]
struct RouteReq {
    auth: Vec<AuthMethod>,
    roles: Vec<&'static str>,
    mode: RolesMode,
    scopes: Vec<&'static str>,
    permissions: Vec<&'static str>,
    audience: Option<&'static str>,
}

fn route_of(r: &RouteReq) -> Route {
    let rc = RouteConfig {
        path: "/p/".into(),
        methods: None,
        upstream: "http://127.0.0.1:9001".into(),
        kind: RouteKind::Rest,
        auth: r.auth.iter().map(|m| m.as_str().to_owned()).collect(),
        require_roles: strings(&r.roles),
        roles_mode: r.mode,
        require_scopes: strings(&r.scopes),
        require_permissions: strings(&r.permissions),
        audience: r.audience.map(str::to_owned),
        timeout_ms: 30_000,
        connect_timeout_ms: None,
        max_body_bytes: 1024,
        rate_limit: Default::default(),
        upstream_ca_file: None,
        upstream_client_certificate: false,
        preserve_host: false,
    };
    let config = GatewayConfig {
        listen: "127.0.0.1:0".into(),
        server_names: vec!["localhost".into()],
        mtls: MtlsMode::Optional,
        trusted_proxies: vec![],
        login: None,
        routes: vec![rc],
    };
    config.validate().expect("a valid route").routes()[0].clone()
}

fn route_req() -> impl Strategy<Value = RouteReq> {
    (
        subsequence(AuthMethod::ALL.to_vec(), 1..=4),
        subsequence(ROLES.to_vec(), 0..=3),
        prop_oneof![Just(RolesMode::Any), Just(RolesMode::All)],
        subsequence(SCOPES.to_vec(), 0..=3),
        subsequence(PERMISSIONS.to_vec(), 0..=2),
        proptest::option::of(proptest::sample::select(AUDIENCES.to_vec())),
    )
        .prop_map(|(auth, roles, mode, scopes, permissions, audience)| RouteReq {
            auth,
            roles,
            mode,
            scopes,
            permissions,
            audience,
        })
}

fn identity() -> impl Strategy<Value = Identity> {
    let all_roles: Vec<&str> = ROLES.iter().chain(&ROLE_LOOKALIKES).copied().collect();
    (
        subsequence(all_roles, 0..=5),
        subsequence(SCOPES.iter().chain(&["Pay/read", "pay/read "]).copied().collect::<Vec<_>>(), 0..=4),
        subsequence(AUDIENCES.to_vec(), 0..=2),
        proptest::sample::select(AuthMethod::ALL.to_vec()),
        proptest::sample::select(ORGS.to_vec()),
    )
        .prop_map(|(roles, scopes, audiences, auth_method, org)| Identity {
            subject: "u-1".into(),
            client_id: format!("{org}$web"),
            org: org.into(),
            roles: strings(&roles),
            scopes: strings(&scopes),
            audiences: strings(&audiences),
            auth_method,
        })
}

fn grants() -> impl Strategy<Value = Vec<(&'static str, &'static str, &'static str)>> {
    let all: Vec<(&str, &str, &str)> = ORGS
        .iter()
        .flat_map(|o| ROLES.iter().flat_map(move |r| PERMISSIONS.iter().map(move |p| (*o, *r, *p))))
        .collect();
    subsequence(all, 0..=8)
}

/// The documented policy, step by step.
fn reference(r: &RouteReq, id: &Identity, g: &[(&str, &str, &str)]) -> Result<(), Denied> {
    let has = |list: &[String], x: &str| list.iter().any(|h| h == x);
    if !r.auth.contains(&id.auth_method) {
        return Err(Denied::AuthMethod { method: id.auth_method });
    }
    if let Some(aud) = r.audience
        && id.auth_method == AuthMethod::Bearer
        && !has(&id.audiences, aud)
    {
        return Err(Denied::Audience { required: aud.to_owned() });
    }
    let role = |s: &&str| RoleName::parse(s).unwrap();
    if !r.roles.is_empty() {
        let missing: Vec<RoleName> = r.roles.iter().filter(|x| !has(&id.roles, x)).map(role).collect();
        match r.mode {
            RolesMode::Any if missing.len() == r.roles.len() => {
                return Err(Denied::Roles { mode: RolesMode::Any, missing });
            }
            RolesMode::All if !missing.is_empty() => return Err(Denied::Roles { mode: RolesMode::All, missing }),
            _ => {}
        }
    }
    let missing: Vec<ScopeName> =
        r.scopes.iter().filter(|s| !has(&id.scopes, s)).map(|s| ScopeName::parse(s).unwrap()).collect();
    if !missing.is_empty() {
        return Err(Denied::Scopes { missing });
    }
    let held = |p: &str| g.iter().any(|(o, r, gp)| *o == id.org && *gp == p && has(&id.roles, r));
    let missing: Vec<PermissionName> =
        r.permissions.iter().filter(|p| !held(p)).map(|p| PermissionName::parse(p).unwrap()).collect();
    if !missing.is_empty() {
        return Err(Denied::Permissions { missing });
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    #[test]
    fn policy_matches_the_documented_model(r in route_req(), id in identity(), g in grants()) {
        let route = route_of(&r);
        let snapshot: PermissionGrants = g
            .iter()
            .map(|(o, r, p)| ((*o).to_owned(), RoleName::parse(r).unwrap(), PermissionName::parse(p).unwrap()))
            .collect();
        let got = authorize(&route, &id, &snapshot);
        prop_assert_eq!(&got, &reference(&r, &id, &g));
        if let Err(denied) = got {
            // The refusal names only what the route requires, never the identity's other roles.
            let text = denied.to_string();
            let words: Vec<&str> = text.split([' ', ',']).filter(|w| !w.is_empty()).collect();
            for held in &id.roles {
                if !r.roles.contains(&held.as_str()) {
                    prop_assert!(!words.contains(&held.as_str()), "{} names {}", text, held);
                }
            }
            if matches!(denied, Denied::Permissions { .. }) {
                prop_assert!(!ROLES.iter().any(|role| words.contains(role)), "{}", text);
            }
        }
    }
}

// ---- from a verified token to the audience decision ---------------------------------------

fn fx() -> &'static tokens::TokenFixture {
    static FX: OnceLock<tokens::TokenFixture> = OnceLock::new();
    FX.get_or_init(tokens::TokenFixture::new)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn a_token_meets_a_route_audience_exactly_when_its_aud_lists_it(
        key in 0usize..4,
        aud in subsequence(AUDIENCES.to_vec(), 1..=3),
        required in proptest::sample::select(AUDIENCES.to_vec()),
    ) {
        let fx = fx();
        let claims = AccessClaims {
            aud: Audience::from_vec(strings(&aud)),
            ..fx.claims.clone()
        };
        let token = jws::sign(&fx.keys[key], ACCESS_TOKEN_TYP, &serde_json::to_vec(&claims).unwrap()).unwrap();
        let verified = verify_access_token(&token, &fx.set, tokens::ISSUER, tokens::NOW).unwrap();
        prop_assert_eq!(&verified, &claims);
        let audiences = match &verified.aud {
            Audience::One(a) => vec![a.clone()],
            Audience::Many(v) => v.clone(),
        };
        let id = Identity {
            subject: verified.sub.clone(),
            client_id: verified.client_id.clone(),
            org: verified.org.clone(),
            roles: verified.roles.clone(),
            scopes: verified.scopes().map(str::to_owned).collect(),
            audiences,
            auth_method: AuthMethod::Bearer,
        };
        let route = route_of(&RouteReq {
            auth: vec![AuthMethod::Bearer],
            roles: vec![],
            mode: RolesMode::Any,
            scopes: vec![],
            permissions: vec![],
            audience: Some(required),
        });
        let got = authorize(&route, &id, &PermissionGrants::new());
        prop_assert_eq!(got.is_ok(), aud.contains(&required), "aud {:?}, route {}", aud, required);
    }
}
