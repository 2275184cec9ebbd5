//! Handler tests: the real router over a real SQLite store, driven with `oneshot` and a
//! manual clock, so expiry, rotation, grace periods and rate limits are tested without sleeping.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use base64::Engine;
use portcullis_core::Portcullis;
use portcullis_core::crypto::signing::Algorithm;
use portcullis_core::crypto::vault::LocalKeyVault;
use portcullis_core::model::Page;
use portcullis_core::settings::CoreSettings;
use portcullis_core::usecases::BootstrapSecrets;
use portcullis_web::{AppState, router};
use serde_json::{Value, json};
use tower::ServiceExt;

#[allow(dead_code)]
mod support;

use support::{ADMIN_SECRET, Env, ISS, env, env_with};

fn basic(id: &str, secret: &str) -> String {
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}")))
}

async fn send(app: &Router, req: Request<Body>) -> (StatusCode, axum::http::HeaderMap, Value) {
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX).await.unwrap();
    let v = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    if !status.is_success() {
        assert!(headers.contains_key("x-error") && headers.contains_key("x-error-id"), "{status} without x-error");
    }
    (status, headers, v)
}

async fn token(app: &Router, id: &str, secret: &str, extra: &str) -> (StatusCode, axum::http::HeaderMap, Value) {
    let req = Request::post("/oauth2/token")
        .header(header::AUTHORIZATION, basic(id, secret))
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from(format!("grant_type=client_credentials{extra}")))
        .unwrap();
    send(app, req).await
}

async fn admin_token(app: &Router) -> String {
    let (s, _, v) = token(app, "portcullis$admin", ADMIN_SECRET, "").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v["access_token"].as_str().unwrap().to_owned()
}

async fn api(app: &Router, method: &str, path: &str, bearer: &str, body: Option<Value>) -> (StatusCode, Value) {
    let mut b = Request::builder().method(method).uri(path).header(header::AUTHORIZATION, format!("Bearer {bearer}"));
    let body = match body {
        Some(v) => {
            b = b.header(header::CONTENT_TYPE, "application/json");
            Body::from(v.to_string())
        }
        None => Body::empty(),
    };
    let (s, _, v) = send(app, b.body(body).unwrap()).await;
    (s, v)
}

async fn introspect(app: &Router, id: &str, secret: &str, tok: &str) -> Value {
    let req = Request::post("/oauth2/introspect")
        .header(header::AUTHORIZATION, basic(id, secret))
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from(format!("token={tok}")))
        .unwrap();
    let (s, _, v) = send(app, req).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v
}

async fn jwks_kids(app: &Router) -> Vec<String> {
    let (s, _, v) = send(app, Request::get("/oauth2/jwks").body(Body::empty()).unwrap()).await;
    assert_eq!(s, StatusCode::OK);
    v["keys"].as_array().unwrap().iter().map(|k| k["kid"].as_str().unwrap().to_owned()).collect()
}

fn kid_of(jwt: &str) -> String {
    let h = jwt.split('.').next().unwrap();
    let v: Value =
        serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(h).unwrap()).unwrap();
    v["kid"].as_str().unwrap().to_owned()
}

fn claims_of(jwt: &str) -> Value {
    let p = jwt.split('.').nth(1).unwrap();
    serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(p).unwrap()).unwrap()
}

/// org `acme`, services `payments` and `ledger`, app `billing` with scopes in both.
async fn acme(e: &Env) -> (String, String) {
    let t = admin_token(&e.app).await;
    let (s, v) = api(&e.app, "POST", "/api/v1/organisations", &t, Some(json!({"slug": "acme", "name": "Acme"}))).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    for (svc, aud) in [("payments", "https://payments.test"), ("ledger", "https://ledger.test")] {
        let body = json!({
            "slug": svc, "name": svc, "audience": aud,
            "scopes": [format!("{svc}/read")], "roles": [format!("{svc}:reader")],
            "permissions": [format!("{svc}.entry.read")],
            "grants": { format!("{svc}:reader"): [format!("{svc}.entry.read")] },
        });
        let (s, v) = api(&e.app, "POST", "/api/v1/organisations/acme/services", &t, Some(body)).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
    }
    let body = json!({"slug": "billing", "name": "Billing", "scopes": ["payments/read", "ledger/read"], "roles": ["payments:reader", "ledger:reader"]});
    let (s, v) = api(&e.app, "POST", "/api/v1/organisations/acme/applications", &t, Some(body)).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    (v["client_id"].as_str().unwrap().to_owned(), v["client_secret"].as_str().unwrap().to_owned())
}

#[tokio::test]
async fn tokens_expire_by_the_injected_clock() {
    let e = env().await;
    let (id, secret) = acme(&e).await;
    let (s, h, v) = token(&e.app, &id, &secret, "").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(h.get(header::CACHE_CONTROL).unwrap(), "no-store");
    let tok = v["access_token"].as_str().unwrap();
    assert_eq!(v["expires_in"], 900);
    assert_eq!(introspect(&e.app, &id, &secret, tok).await["active"], true);
    e.clock.advance(899);
    assert_eq!(introspect(&e.app, &id, &secret, tok).await["active"], true);
    e.clock.advance(10);
    assert_eq!(introspect(&e.app, &id, &secret, tok).await, json!({"active": false}));

    let admin = admin_token(&e.app).await;
    e.clock.advance(1000);
    let (s, _) = api(&e.app, "GET", "/api/v1/organisations", &admin, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "an expired admin token is refused");
}

#[tokio::test]
async fn resource_indicator_narrows_audience_scopes_and_roles() {
    let e = env().await;
    let (id, secret) = acme(&e).await;
    let (_, _, v) = token(&e.app, &id, &secret, "").await;
    let c = claims_of(v["access_token"].as_str().unwrap());
    let mut aud: Vec<String> = serde_json::from_value(c["aud"].clone()).unwrap();
    aud.sort();
    assert_eq!(aud, ["https://ledger.test", "https://payments.test"]);
    assert_eq!(c["org"], "acme");
    assert_eq!(c["sub"], id);

    let (s, _, v) = token(&e.app, &id, &secret, "&resource=https%3A%2F%2Fpayments.test").await;
    assert_eq!(s, StatusCode::OK);
    let c = claims_of(v["access_token"].as_str().unwrap());
    assert_eq!(c["aud"], "https://payments.test");
    assert_eq!(c["scope"], "payments/read");
    assert_eq!(c["roles"], json!(["payments:reader"]));

    let (s, _, v) = token(&e.app, &id, &secret, "&resource=https%3A%2F%2Fpayments.test&scope=ledger%2Fread").await;
    assert_eq!((s, v["error"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_scope")));
    let (s, _, v) = token(&e.app, &id, &secret, "&scope=payments%2Fwrite").await;
    assert_eq!((s, v["error"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_scope")));
    let (s, _, v) = token(&e.app, &id, &secret, "&resource=https%3A%2F%2Felsewhere.test").await;
    assert_eq!((s, v["error"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_target")));
}

#[tokio::test]
async fn rotation_publishes_next_before_use_and_drops_retired_after_expiry() {
    let e = env_with(|s| s.key_rotation_interval = 7 * 86_400).await;
    let (id, secret) = acme(&e).await;
    let before = jwks_kids(&e.app).await;
    assert_eq!(before.len(), 2, "current and next");
    let (_, _, v) = token(&e.app, &id, &secret, "").await;
    let t1 = v["access_token"].as_str().unwrap().to_owned();
    let k1 = kid_of(&t1);

    let admin = admin_token(&e.app).await;
    // The next keys were published at bootstrap, a moment ago: too fresh to sign yet.
    let (s, v) = api(&e.app, "POST", "/api/v1/keys/rotate", &admin, None).await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert_eq!(jwks_kids(&e.app).await, before, "a refused rotation changes nothing");
    let (_, _, v) = token(&e.app, &id, &secret, "").await;
    assert_eq!(kid_of(v["access_token"].as_str().unwrap()), k1);
    e.clock.advance(e.core.settings().key_publish_delay());
    let (s, v) = api(&e.app, "POST", "/api/v1/keys/rotate", &admin, None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (_, _, v) = token(&e.app, &id, &secret, "").await;
    let k2 = kid_of(v["access_token"].as_str().unwrap());
    assert_ne!(k1, k2);
    assert!(before.contains(&k2), "the new signing key was published before it signed");
    let after = jwks_kids(&e.app).await;
    assert_eq!(after.len(), 3, "retired, current, next");
    assert!(after.contains(&k1));
    assert_eq!(introspect(&e.app, &id, &secret, &t1).await["active"], true, "old tokens stay valid");

    // Not due yet: nothing rotates. Past max lifetime + margin the retired key leaves the JWKS.
    e.clock.advance(e.core.settings().retired_key_publish_secs() + 1);
    assert!(!e.core.maintain_keys().await.unwrap());
    let later = jwks_kids(&e.app).await;
    assert!(!later.contains(&k1), "retired key dropped once every token it signed has expired");
    assert_eq!(later.len(), 2);

    // The schedule rotates by itself once the interval has passed.
    e.clock.advance(7 * 86_400);
    assert!(e.core.maintain_keys().await.unwrap());
    let (_, _, v) = token(&e.app, &id, &secret, "").await;
    let k3 = kid_of(v["access_token"].as_str().unwrap());
    assert_ne!(k3, k2);

    // Rotating again at once would promote a key published a moment ago: refused unless forced
    // (a compromised key).
    let admin = admin_token(&e.app).await;
    let (s, v) = api(&e.app, "POST", "/api/v1/keys/rotate", &admin, None).await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert!(v["error_description"].as_str().unwrap().contains("force"), "{v}");
    let (s, v) = api(&e.app, "POST", "/api/v1/keys/rotate?force=true", &admin, None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (_, _, v) = token(&e.app, &id, &secret, "").await;
    assert_ne!(kid_of(v["access_token"].as_str().unwrap()), k3);
}

#[tokio::test]
async fn rotated_secret_grace_period_ends_by_the_clock() {
    let e = env().await;
    let (id, old) = acme(&e).await;
    let admin = admin_token(&e.app).await;
    let (s, v) = api(
        &e.app,
        "POST",
        "/api/v1/organisations/acme/applications/billing/rotate-secret",
        &admin,
        Some(json!({"grace_period": 100})),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let new = v["client_secret"].as_str().unwrap().to_owned();
    assert_ne!(new, old);
    assert_eq!(token(&e.app, &id, &new, "").await.0, StatusCode::OK);
    assert_eq!(token(&e.app, &id, &old, "").await.0, StatusCode::OK, "old secret works during the grace period");
    e.clock.advance(101);
    let (s, h, v) = token(&e.app, &id, &old, "").await;
    assert_eq!((s, v["error"].as_str()), (StatusCode::UNAUTHORIZED, Some("invalid_client")));
    assert!(h.get(header::WWW_AUTHENTICATE).unwrap().to_str().unwrap().starts_with("Basic"));
    assert_eq!(token(&e.app, &id, &new, "").await.0, StatusCode::OK);
}

#[tokio::test]
async fn failed_client_authentication_is_rate_limited_and_audited() {
    let e = env_with(|s| s.auth_failures_per_minute = 5).await;
    let (id, secret) = acme(&e).await;
    for _ in 0..5 {
        assert_eq!(token(&e.app, &id, "wrong-secret", "").await.0, StatusCode::UNAUTHORIZED);
    }
    let (s, h, v) = token(&e.app, &id, "wrong-secret", "").await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{v}");
    assert_eq!(v["error"], "slow_down");
    assert!(h.contains_key(header::RETRY_AFTER));
    // The holder of the right secret is never locked out by someone else's failures.
    assert_eq!(token(&e.app, &id, &secret, "").await.0, StatusCode::OK);
    e.clock.advance(61);
    assert_eq!(token(&e.app, &id, "wrong-secret", "").await.0, StatusCode::UNAUTHORIZED, "a new window");

    let events = e.core.store().audit_events(None, Page::default()).await.unwrap();
    let failures = events.iter().filter(|ev| ev.action == "client.authenticate" && ev.outcome == "failure").count();
    assert_eq!(failures, 6, "failures within the limit are audited; refused ones are not");
    let creates = events.iter().filter(|ev| ev.action == "application.create" && ev.target == "acme$billing").count();
    assert_eq!(creates, 1, "admin changes are audited");
}

#[tokio::test]
async fn org_admins_are_confined_to_their_organisation() {
    let e = env().await;
    acme(&e).await;
    let admin = admin_token(&e.app).await;
    let (s, _) =
        api(&e.app, "POST", "/api/v1/organisations", &admin, Some(json!({"slug": "beta", "name": "Beta"}))).await;
    assert_eq!(s, StatusCode::CREATED);
    let body = json!({"slug": "ops", "name": "Ops", "roles": ["portcullis:org-admin"]});
    let (s, v) = api(&e.app, "POST", "/api/v1/organisations/acme/applications", &admin, Some(body)).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (id, secret) = (v["client_id"].as_str().unwrap().to_owned(), v["client_secret"].as_str().unwrap().to_owned());
    let (_, _, v) = token(&e.app, &id, &secret, "").await;
    let t = v["access_token"].as_str().unwrap().to_owned();
    assert_eq!(claims_of(&t)["aud"], ISS);

    let svc = json!({"slug": "crm", "name": "CRM", "audience": "https://crm.test", "roles": ["crm:user"]});
    assert_eq!(
        api(&e.app, "POST", "/api/v1/organisations/acme/services", &t, Some(svc.clone())).await.0,
        StatusCode::CREATED
    );
    assert_eq!(
        api(&e.app, "POST", "/api/v1/organisations/beta/services", &t, Some(svc)).await.0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(api(&e.app, "GET", "/api/v1/organisations/beta", &t, None).await.0, StatusCode::FORBIDDEN);
    let org = json!({"slug": "gamma", "name": "G"});
    assert_eq!(api(&e.app, "POST", "/api/v1/organisations", &t, Some(org)).await.0, StatusCode::FORBIDDEN);
    let esc = json!({"slug": "esc", "name": "Escalate", "roles": ["portcullis:admin"]});
    assert_eq!(
        api(&e.app, "POST", "/api/v1/organisations/acme/applications", &t, Some(esc)).await.0,
        StatusCode::FORBIDDEN
    );
    let (s, v) = api(&e.app, "GET", "/api/v1/organisations", &t, None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["items"].as_array().unwrap().len(), 1, "sees only its own organisation");
}

#[tokio::test]
async fn authz_check_follows_role_grants() {
    let e = env().await;
    let (id, _) = acme(&e).await;
    let admin = admin_token(&e.app).await;
    let check = |perm: &str| json!({"subject": id, "permission": perm});
    let (s, v) = api(&e.app, "POST", "/api/v1/authz/check", &admin, Some(check("payments.entry.read"))).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["allowed"], true, "{v}");
    let (_, v) = api(
        &e.app,
        "PUT",
        "/api/v1/organisations/acme/roles/payments:reader",
        &admin,
        Some(json!({"permissions": []})),
    )
    .await;
    assert_eq!(v["permissions"], json!([]));
    let (_, v) = api(&e.app, "POST", "/api/v1/authz/check", &admin, Some(check("payments.entry.read"))).await;
    assert_eq!(v["allowed"], false);
    assert!(v["reason"].as_str().unwrap().contains("payments.entry.read"));
    let (s, _) = api(&e.app, "POST", "/api/v1/authz/check", &admin, Some(check("payments-entry-read"))).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn disabled_clients_lose_their_tokens() {
    let e = env().await;
    let (id, secret) = acme(&e).await;
    let (_, _, v) = token(&e.app, &id, &secret, "").await;
    let t = v["access_token"].as_str().unwrap().to_owned();
    let admin = admin_token(&e.app).await;
    let (s, _) = api(
        &e.app,
        "PATCH",
        "/api/v1/organisations/acme/applications/billing",
        &admin,
        Some(json!({"enabled": false})),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _, v) = token(&e.app, &id, &secret, "").await;
    assert_eq!((s, v["error"].as_str()), (StatusCode::UNAUTHORIZED, Some("invalid_client")));
    let active = introspect(&e.app, "portcullis$admin", ADMIN_SECRET, &t).await;
    assert_eq!(active, json!({"active": false}), "tokens of a disabled client introspect inactive");
}

#[tokio::test]
async fn failed_bearer_authentication_is_audited_then_rate_limited_per_ip() {
    let e = env_with(|s| s.auth_failures_per_minute = 3).await;
    let from = |ip: [u8; 4]| {
        let mut req = Request::get("/api/v1/organisations")
            .header(header::AUTHORIZATION, "Bearer not-a-token")
            .body(Body::empty())
            .unwrap();
        req.extensions_mut().insert(axum::extract::ConnectInfo(std::net::SocketAddr::from((ip, 4000))));
        req
    };
    for _ in 0..3 {
        let (s, h, _) = send(&e.app, from([10, 0, 0, 1])).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        assert!(h.get(header::WWW_AUTHENTICATE).unwrap().to_str().unwrap().starts_with("Bearer"));
    }
    let (s, h, _) = send(&e.app, from([10, 0, 0, 1])).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
    assert!(h.contains_key(header::RETRY_AFTER));
    assert_eq!(send(&e.app, from([10, 0, 0, 2])).await.0, StatusCode::UNAUTHORIZED, "other addresses are unaffected");
    let audited = e.core.store().audit_events(None, Page::default()).await.unwrap();
    let n = audited.iter().filter(|ev| ev.action == "api.authenticate" && ev.ip.as_deref() == Some("10.0.0.1")).count();
    assert_eq!(n, 3, "refusals beyond the limit write nothing");
    // A valid admin token from the limited address still works.
    let admin = admin_token(&e.app).await;
    let mut req = Request::get("/api/v1/organisations")
        .header(header::AUTHORIZATION, format!("Bearer {admin}"))
        .body(Body::empty())
        .unwrap();
    req.extensions_mut().insert(axum::extract::ConnectInfo(std::net::SocketAddr::from(([10, 0, 0, 1], 4000))));
    assert_eq!(send(&e.app, req).await.0, StatusCode::OK);
}

#[tokio::test]
async fn a_service_in_use_cannot_be_deleted() {
    let e = env().await;
    acme(&e).await;
    let admin = admin_token(&e.app).await;
    let (s, v) = api(&e.app, "DELETE", "/api/v1/organisations/acme/services/ledger", &admin, None).await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert!(v["error_description"].as_str().unwrap().contains("acme$billing"), "{v}");
    let patch = json!({"scopes": ["payments/read"], "roles": ["payments:reader"]});
    let (s, _) = api(&e.app, "PATCH", "/api/v1/organisations/acme/applications/billing", &admin, Some(patch)).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = api(&e.app, "DELETE", "/api/v1/organisations/acme/services/ledger", &admin, None).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = api(&e.app, "GET", "/api/v1/organisations/acme/services/ledger", &admin, None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn org_admins_cannot_take_over_applications_holding_platform_roles() {
    let e = env().await;
    acme(&e).await;
    let admin = admin_token(&e.app).await;
    let org_admin = |org: &'static str, slug: &'static str| {
        let app = e.app.clone();
        let admin = admin.clone();
        async move {
            let body = json!({"slug": slug, "name": slug, "roles": ["portcullis:org-admin"]});
            let (s, v) =
                api(&app, "POST", &format!("/api/v1/organisations/{org}/applications"), &admin, Some(body)).await;
            assert_eq!(s, StatusCode::CREATED, "{v}");
            let (_, _, t) =
                token(&app, v["client_id"].as_str().unwrap(), v["client_secret"].as_str().unwrap(), "").await;
            t["access_token"].as_str().unwrap().to_owned()
        }
    };
    // An admin of the platform organisation is not a platform admin.
    let p = org_admin("portcullis", "ops").await;
    let base = "/api/v1/organisations/portcullis/applications/admin";
    let (s, v) = api(&e.app, "POST", &format!("{base}/rotate-secret"), &p, Some(json!({}))).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    assert_eq!(api(&e.app, "PATCH", base, &p, Some(json!({"enabled": false}))).await.0, StatusCode::FORBIDDEN);
    assert_eq!(api(&e.app, "DELETE", base, &p, None).await.0, StatusCode::FORBIDDEN);
    assert_eq!(
        token(&e.app, "portcullis$admin", ADMIN_SECRET, "").await.0,
        StatusCode::OK,
        "the admin secret still works"
    );

    // Nor may an organisation admin take an application a platform admin granted portcullis:gateway.
    let body = json!({"slug": "gw", "name": "Gateway", "roles": ["portcullis:gateway"]});
    let (s, _) = api(&e.app, "POST", "/api/v1/organisations/acme/applications", &admin, Some(body)).await;
    assert_eq!(s, StatusCode::CREATED);
    let a = org_admin("acme", "ops").await;
    let gw = "/api/v1/organisations/acme/applications/gw";
    assert_eq!(api(&e.app, "POST", &format!("{gw}/rotate-secret"), &a, Some(json!({}))).await.0, StatusCode::FORBIDDEN);
    assert_eq!(api(&e.app, "PATCH", gw, &a, Some(json!({"name": "mine"}))).await.0, StatusCode::FORBIDDEN);
    // Its own organisation's ordinary applications it manages as before.
    let (s, v) =
        api(&e.app, "POST", "/api/v1/organisations/acme/applications/billing/rotate-secret", &a, Some(json!({}))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // And the platform admin may still rotate the gateway's secret.
    let (s, _) = api(&e.app, "POST", &format!("{gw}/rotate-secret"), &admin, Some(json!({}))).await;
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test]
async fn a_role_taken_away_stops_counting_before_the_token_expires() {
    let e = env().await;
    acme(&e).await;
    let admin = admin_token(&e.app).await;
    let body = json!({"slug": "ops", "name": "Ops", "roles": ["portcullis:org-admin"]});
    let (_, v) = api(&e.app, "POST", "/api/v1/organisations/acme/applications", &admin, Some(body)).await;
    let (_, _, t) = token(&e.app, v["client_id"].as_str().unwrap(), v["client_secret"].as_str().unwrap(), "").await;
    let ops = t["access_token"].as_str().unwrap().to_owned();
    assert_eq!(api(&e.app, "GET", "/api/v1/organisations/acme/applications", &ops, None).await.0, StatusCode::OK);
    let (s, _) =
        api(&e.app, "PATCH", "/api/v1/organisations/acme/applications/ops", &admin, Some(json!({"roles": []}))).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        api(&e.app, "GET", "/api/v1/organisations/acme/applications", &ops, None).await.0,
        StatusCode::FORBIDDEN
    );
}

#[tokio::test]
async fn the_admin_audience_is_never_mixed_with_others() {
    let e = env().await;
    acme(&e).await;
    let admin = admin_token(&e.app).await;
    let body =
        json!({"slug": "mixed", "name": "Mixed", "scopes": ["payments/read"], "roles": ["portcullis:org-admin"]});
    let (_, v) = api(&e.app, "POST", "/api/v1/organisations/acme/applications", &admin, Some(body)).await;
    let (id, secret) = (v["client_id"].as_str().unwrap().to_owned(), v["client_secret"].as_str().unwrap().to_owned());
    // Without a resource: the service's audience only, and no platform role in the token.
    let (_, _, v) = token(&e.app, &id, &secret, "").await;
    let t = v["access_token"].as_str().unwrap().to_owned();
    let c = claims_of(&t);
    assert_eq!(c["aud"], "https://payments.test");
    assert_eq!(c["roles"], json!([]));
    assert_eq!(api(&e.app, "GET", "/api/v1/organisations/acme", &t, None).await.0, StatusCode::UNAUTHORIZED);
    // Asking for the platform explicitly gives an admin-API token and nothing else.
    let (_, _, v) =
        token(&e.app, &id, &secret, &format!("&resource={}", ISS.replace(':', "%3A").replace('/', "%2F"))).await;
    let t = v["access_token"].as_str().unwrap().to_owned();
    let c = claims_of(&t);
    assert_eq!(c["aud"], ISS);
    assert_eq!(c["roles"], json!(["portcullis:org-admin"]));
    assert_eq!(c.get("scope"), None);
    assert_eq!(api(&e.app, "GET", "/api/v1/organisations/acme", &t, None).await.0, StatusCode::OK);
}

#[tokio::test]
async fn a_malformed_client_id_is_never_written_to_the_audit_log() {
    let e = env().await;
    // A client that swapped its credentials: the secret lands in the client id position.
    let swapped = "Zm9vYmFyc2VjcmV0dmFsdWUtdGhhdC1tdXN0LW5vdC1sZWFr";
    let (s, _, _) = token(&e.app, swapped, "acme$billing", "").await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let events = e.core.store().audit_events(None, Page::default()).await.unwrap();
    let failure = events.iter().find(|ev| ev.action == "client.authenticate").unwrap();
    assert_eq!(failure.actor, "(malformed client id)");
    assert!(!serde_json::to_string(&events).unwrap().contains(swapped));
}

#[tokio::test]
async fn tokens_of_a_deleted_client_stay_dead_when_it_is_recreated() {
    let e = env().await;
    let (id, secret) = acme(&e).await;
    let (_, _, v) = token(&e.app, &id, &secret, "").await;
    let old = v["access_token"].as_str().unwrap().to_owned();
    let admin = admin_token(&e.app).await;
    let (s, _) = api(&e.app, "DELETE", "/api/v1/organisations/acme/applications/billing", &admin, None).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    e.clock.advance(1);
    let body =
        json!({"slug": "billing", "name": "Billing again", "scopes": ["payments/read"], "roles": ["payments:reader"]});
    let (s, _) = api(&e.app, "POST", "/api/v1/organisations/acme/applications", &admin, Some(body)).await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(introspect(&e.app, "portcullis$admin", ADMIN_SECRET, &old).await, json!({"active": false}));
}

#[tokio::test]
async fn authz_check_for_users_across_organisations() {
    let e = env().await;
    acme(&e).await;
    let admin = admin_token(&e.app).await;
    let body = json!({"email": "ann@acme.test", "roles": ["payments:reader"]});
    let (s, v) = api(&e.app, "POST", "/api/v1/organisations/acme/users", &admin, Some(body)).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let ann = v["id"].as_str().unwrap().to_owned();
    let check = |org: Option<&str>| {
        let mut b = json!({"subject": ann, "permission": "payments.entry.read"});
        if let Some(o) = org {
            b["organisation"] = json!(o);
        }
        b
    };
    // A platform admin names the user's organisation.
    let (_, v) = api(&e.app, "POST", "/api/v1/authz/check", &admin, Some(check(Some("acme")))).await;
    assert_eq!(v["allowed"], true, "{v}");
    let (_, v) = api(&e.app, "POST", "/api/v1/authz/check", &admin, Some(check(None))).await;
    assert_eq!(v, json!({"allowed": false, "reason": "unknown subject"}), "default: the caller's organisation");
    // A caller of another organisation learns nothing about acme's users.
    let body = json!({"slug": "beta", "name": "Beta"});
    assert_eq!(api(&e.app, "POST", "/api/v1/organisations", &admin, Some(body)).await.0, StatusCode::CREATED);
    let body = json!({"slug": "rs", "name": "RS"});
    let (_, v) = api(&e.app, "POST", "/api/v1/organisations/beta/applications", &admin, Some(body)).await;
    let resource = format!("&resource={}", ISS.replace(':', "%3A").replace('/', "%2F"));
    let (_, _, t) =
        token(&e.app, v["client_id"].as_str().unwrap(), v["client_secret"].as_str().unwrap(), &resource).await;
    let beta = t["access_token"].as_str().unwrap().to_owned();
    let (s, v) = api(&e.app, "POST", "/api/v1/authz/check", &beta, Some(check(Some("acme")))).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v, json!({"allowed": false, "reason": "unknown subject"}));
    let (_, v) = api(
        &e.app,
        "POST",
        "/api/v1/authz/check",
        &beta,
        Some(json!({"subject": "acme$billing", "permission": "payments.entry.read"})),
    )
    .await;
    assert_eq!(
        v,
        json!({"allowed": false, "reason": "unknown subject"}),
        "the same answer as for a client that does not exist"
    );
}

#[tokio::test]
async fn settings_changes_apply_to_existing_applications() {
    let e = env_with(|s| s.signing_algorithms = vec![Algorithm::ES256, Algorithm::EdDSA]).await;
    let (id, secret) = acme(&e).await;
    let admin = admin_token(&e.app).await;
    let patch = json!({"access_token_signing_alg": "EdDSA", "access_token_lifetime": 3600});
    let (s, _) = api(&e.app, "PATCH", "/api/v1/organisations/acme/applications/billing", &admin, Some(patch)).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _, v) = token(&e.app, &id, &secret, "").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["expires_in"], 3600);

    // The same database under new settings: EdDSA disabled, a lower maximum lifetime.
    let mut settings = CoreSettings::for_issuer(ISS);
    settings.signing_algorithms = vec![Algorithm::ES256];
    settings.max_access_token_lifetime = 600;
    let core = Arc::new(Portcullis::new(
        e.core.store().clone(),
        e.clock.clone(),
        Arc::new(LocalKeyVault::new(&[42u8; 32]).unwrap()),
        settings,
    ));
    core.bootstrap(BootstrapSecrets::default()).await.unwrap();
    let app = router(AppState { core, metrics: None });
    let (s, _, v) = token(&app, &id, &secret, "").await;
    assert_eq!((s, v["error"].as_str()), (StatusCode::BAD_REQUEST, Some("unauthorized_client")), "{v}");
    assert!(v["error_description"].as_str().unwrap().contains("EdDSA"), "{v}");
    let (s, _) = api(
        &app,
        "PATCH",
        "/api/v1/organisations/acme/applications/billing",
        &admin_token(&app).await,
        Some(json!({"access_token_signing_alg": "ES256"})),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _, v) = token(&app, &id, &secret, "").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["expires_in"], 600, "clamped to the current maximum");
    let c = claims_of(v["access_token"].as_str().unwrap());
    assert_eq!(c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap(), 600);
}
