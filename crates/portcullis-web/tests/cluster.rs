//! Handler tests of several nodes on one database (two cores with their own caches and
//! connections over one SQLite file, one manual clock): another node's changes reach this
//! node's caches through the change feed, one node at a time runs the scheduled jobs, the
//! issuing CA's successor is trusted everywhere before it issues, and failure limits are
//! shared. The same with real processes on PostgreSQL is `crates/portcullis/tests/cluster_e2e.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use base64::Engine;
use portcullis_core::clock::Clock;
use serde_json::{Value, json};
use tower::ServiceExt;

mod support;

use support::{ADMIN_SECRET, Env, env, env_with};

async fn send(app: &Router, req: Request<Body>) -> (StatusCode, Value) {
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    if !status.is_success() {
        assert!(resp.headers().contains_key("x-error") && resp.headers().contains_key("x-error-id"), "{status}");
    }
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

fn basic(id: &str, secret: &str) -> String {
    let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", enc(id), enc(secret))))
}

async fn token(app: &Router, id: &str, secret: &str) -> (StatusCode, Value) {
    let req = Request::post("/oauth2/token")
        .header(header::AUTHORIZATION, basic(id, secret))
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from("grant_type=client_credentials"))
        .unwrap();
    send(app, req).await
}

async fn api(app: &Router, method: &str, path: &str, bearer: &str, body: Option<Value>) -> (StatusCode, Value) {
    let b = Request::builder().method(method).uri(path).header(header::AUTHORIZATION, format!("Bearer {bearer}"));
    let req = match body {
        Some(v) => b.header(header::CONTENT_TYPE, "application/json").body(Body::from(v.to_string())).unwrap(),
        None => b.body(Body::empty()).unwrap(),
    };
    send(app, req).await
}

async fn admin_token(app: &Router) -> String {
    let (s, v) = token(app, "portcullis$admin", ADMIN_SECRET).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v["access_token"].as_str().unwrap().to_owned()
}

/// Organisation `acme` with application `billing`: its client id and secret.
async fn acme(app: &Router) -> (String, String) {
    let t = admin_token(app).await;
    let (s, v) = api(app, "POST", "/api/v1/organisations", &t, Some(json!({"slug": "acme", "name": "Acme"}))).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let body = json!({
        "slug": "payments", "name": "Payments", "audience": "https://payments.test",
        "scopes": ["payments/read"], "roles": ["payments:reader", "payments:admin"],
        "permissions": ["payments.entry.read", "payments.entry.write"],
        "grants": { "payments:reader": ["payments.entry.read"] },
    });
    let (s, v) = api(app, "POST", "/api/v1/organisations/acme/services", &t, Some(body)).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let body = json!({"slug": "billing", "name": "Billing", "scopes": ["payments/read"], "roles": ["payments:reader"]});
    let (s, v) = api(app, "POST", "/api/v1/organisations/acme/applications", &t, Some(body)).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    (v["client_id"].as_str().unwrap().to_owned(), v["client_secret"].as_str().unwrap().to_owned())
}

async fn jwks_kids(app: &Router) -> Vec<String> {
    let (s, v) = send(app, Request::get("/oauth2/jwks").body(Body::empty()).unwrap()).await;
    assert_eq!(s, StatusCode::OK);
    let mut kids: Vec<String> =
        v["keys"].as_array().unwrap().iter().map(|k| k["kid"].as_str().unwrap().into()).collect();
    kids.sort();
    kids
}

/// A verified Auth API session of the bootstrap admin, signed in on `app`.
async fn session(e: &Env, app: &Router) -> String {
    let body = json!({"email": "admin@portcullis.local", "password": "bootstrap-password-123"});
    let req = Request::post("/api/v1/sessions")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    let (s, v) = send(app, req).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    e.core.deliver_mail().await.unwrap();
    let mail = e.mailer.sent().into_iter().last().unwrap();
    let code = mail.text.split_whitespace().find(|w| w.len() == 6 && w.bytes().all(|b| b.is_ascii_digit())).unwrap();
    let body = json!({"verification_id": v["verification_id"], "code": code});
    let req = Request::post("/api/v1/sessions/verify")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    let (s, v) = send(app, req).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v["session_token"].as_str().unwrap().to_owned()
}

async fn authz(app: &Router, bearer: &str, subject: &str, permission: &str) -> bool {
    let body = json!({"subject": subject, "permission": permission, "organisation": "acme"});
    let (s, v) = api(app, "POST", "/api/v1/authz/check", bearer, Some(body)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v["allowed"].as_bool().unwrap()
}

#[tokio::test]
async fn another_nodes_changes_reach_this_nodes_caches_through_the_feed() {
    let e = env().await;
    let (b_app, b) = e.another_node().await;
    let (cursor, _) = b.follow_changes(None).await.unwrap();

    // Created on A, used on B at once (a cache miss reads the database).
    let (id, secret) = acme(&e.app).await;
    assert_eq!(token(&b_app, &id, &secret).await.0, StatusCode::OK, "B now caches the client");
    let admin = admin_token(&e.app).await;
    let user = {
        let body = json!({"email": "ann@acme.test", "roles": ["payments:reader"]});
        let (s, v) = api(&e.app, "POST", "/api/v1/organisations/acme/users", &admin, Some(body)).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        v["id"].as_str().unwrap().to_owned()
    };
    assert!(authz(&b_app, &admin, &user, "payments.entry.read").await, "B now caches the services");
    assert!(!authz(&b_app, &admin, &user, "payments.entry.write").await);
    let sess = session(&e, &b_app).await;
    let current =
        |app: Router, t: String| async move { api(&app, "GET", "/api/v1/sessions/current", &t, None).await.0 };
    assert_eq!(current(b_app.clone(), sess.clone()).await, StatusCode::OK, "B now caches the session");
    let kids_before = jwks_kids(&b_app).await;

    // On A: the client is deleted, the role gets a permission, the session is revoked, and the
    // keys are rotated (forced: a compromised key).
    let (s, _) = api(&e.app, "DELETE", "/api/v1/organisations/acme/applications/billing", &admin, None).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let grant = json!({"permissions": ["payments.entry.read", "payments.entry.write"]});
    let (s, v) = api(&e.app, "PUT", "/api/v1/organisations/acme/roles/payments:reader", &admin, Some(grant)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, _) = api(&e.app, "DELETE", "/api/v1/sessions/current", &sess, None).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, v) = api(&e.app, "POST", "/api/v1/keys/rotate?force=true", &admin, None).await;
    assert_eq!(s, StatusCode::OK, "{v}");

    // One round of the feed on B, and B agrees with A.
    let (_, refreshed) = b.follow_changes(Some(&cursor)).await.unwrap();
    assert!(refreshed.principals && refreshed.services && refreshed.keys, "{refreshed:?}");
    assert_eq!(token(&b_app, &id, &secret).await.0, StatusCode::UNAUTHORIZED, "the deleted client");
    assert!(authz(&b_app, &admin, &user, "payments.entry.write").await, "the new grant");
    assert_eq!(current(b_app.clone(), sess).await, StatusCode::UNAUTHORIZED, "the revoked session");
    let kids_after = jwks_kids(&b_app).await;
    assert_ne!(kids_after, kids_before);
    assert_eq!(kids_after, jwks_kids(&e.app).await, "B publishes what A does");
}

#[tokio::test]
async fn one_node_at_a_time_runs_the_schedule_and_every_node_picks_it_up() {
    let e = env().await;
    let (b_app, b) = e.another_node().await;
    // Longer than the rotation interval, so A still holds it when rotation is due.
    let lease = 2 * e.core.settings().key_rotation_interval;
    assert!(e.core.maintain("node-a", lease).await.unwrap().leader);
    let m = b.maintain("node-b", lease).await.unwrap();
    assert!(!m.leader, "A holds the lease");

    // Rotation is due: only the holder rotates; B's next round loads what A did.
    e.clock.advance(e.core.settings().key_rotation_interval + 1);
    let m = b.maintain("node-b", lease).await.unwrap();
    assert!(!m.leader && !m.keys_rotated, "B waits for A's lease to run out");
    let m = e.core.maintain("node-a", lease).await.unwrap();
    assert!(m.leader && m.keys_rotated);
    assert!(!e.core.maintain("node-a", lease).await.unwrap().keys_rotated, "once");
    b.maintain("node-b", lease).await.unwrap();
    assert_eq!(jwks_kids(&b_app).await, jwks_kids(&e.app).await);
    let rotations =
        e.core.store().audit_events(None, portcullis_core::model::Page::new(Some(200), None)).await.unwrap();
    assert_eq!(rotations.iter().filter(|ev| ev.action == "signing_key.rotate").count(), 1);

    // A stops (no renewal): once its lease ran out, B takes over; a clean stop frees it at once.
    e.clock.advance(lease + 1);
    assert!(b.maintain("node-b", lease).await.unwrap().leader);
    b.release_maintenance("node-b").await.unwrap();
    assert!(e.core.maintain("node-a", lease).await.unwrap().leader);
}

#[tokio::test]
async fn the_issuing_cas_successor_is_trusted_everywhere_before_it_issues() {
    let e = env().await;
    let (b_app, b) = e.another_node().await;
    let ca_pem = |app: Router| async move {
        let resp = app.oneshot(Request::get("/pki/ca.pem").body(Body::empty()).unwrap()).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
        String::from_utf8(bytes.to_vec()).unwrap().matches("BEGIN CERTIFICATE").count()
    };
    let first = e.core.ca_set().active().unwrap().record.id.clone();
    assert_eq!(ca_pem(b_app.clone()).await, 2, "issuing CA and root");
    let set = e.core.ca_set();
    let lifetime = set.active().map(|c| c.record.not_after - c.record.not_before).unwrap();
    let made = set.active().map(|c| c.record.created_at).unwrap();

    // Rotation age: the longest certificate a profile allows, plus 30 days, must still fit in
    // what is left of the CA's life (docs/pki.md).
    let c = &e.core.settings().ca;
    let longest =
        c.signing_max_validity_days.max(c.transport_max_validity_days).max(c.server_transport_max_validity_days);
    let age = (lifetime - (longest + 30) * 86_400).max(lifetime / 2);
    e.clock.set(made + age - 60);
    let m = e.core.maintain("node-a", 90).await.unwrap();
    assert_eq!((m.ca_staged, m.ca_promoted), (None, None), "not due yet");

    // Past it: a successor is created and published on every node, but the old CA still issues.
    e.clock.advance(60);
    let m = e.core.maintain("node-a", 90).await.unwrap();
    let staged = m.ca_staged.expect("a successor is staged");
    b.maintain("node-b", 90).await.unwrap();
    for node in [&e.core, &b] {
        let set = node.ca_set();
        assert_eq!(set.active().unwrap().record.id, first, "the old CA still issues");
        assert!(set.issuing_by_id(&staged).is_some(), "the successor is loaded and trusted");
        assert_eq!(set.anchors().len(), 3);
    }
    assert_eq!(ca_pem(b_app.clone()).await, 3, "B publishes the successor in /pki/ca.pem");
    let m = e.core.maintain("node-a", 90).await.unwrap();
    assert_eq!(m.ca_promoted, None, "not before it has been published long enough");

    // Published long enough: the successor issues, on both nodes; the old CA stays trusted.
    e.clock.advance(e.core.settings().key_publish_delay());
    let m = e.core.maintain("node-a", 90).await.unwrap();
    assert_eq!(m.ca_promoted.as_deref(), Some(staged.as_str()));
    assert_eq!(e.core.maintain("node-a", 90).await.unwrap().ca_promoted, None, "once");
    b.maintain("node-b", 90).await.unwrap();
    for node in [&e.core, &b] {
        let set = node.ca_set();
        assert_eq!(set.active().unwrap().record.id, staged);
        assert!(set.issuing_by_id(&first).is_some(), "certificates of the old CA stay valid");
    }
    let actions: Vec<String> = e
        .core
        .store()
        .audit_events(None, portcullis_core::model::Page::new(Some(200), None))
        .await
        .unwrap()
        .into_iter()
        .map(|ev| ev.action)
        .filter(|a| a.starts_with("ca."))
        .collect();
    assert_eq!(actions.iter().filter(|a| *a == "ca.stage").count(), 1);
    assert_eq!(actions.iter().filter(|a| *a == "ca.promote").count(), 1);
}

#[tokio::test]
async fn failure_limits_count_across_nodes() {
    let e = env_with(|s| s.auth_failures_per_minute = 4).await;
    let (b_app, _b) = e.another_node().await;
    let (id, _) = acme(&e.app).await;
    for app in [&e.app, &b_app, &e.app, &b_app] {
        assert_eq!(token(app, &id, "wrong-secret").await.0, StatusCode::UNAUTHORIZED);
    }
    for app in [&e.app, &b_app] {
        assert_eq!(token(app, &id, "wrong-secret").await.0, StatusCode::TOO_MANY_REQUESTS, "four failures in all");
    }
    e.clock.advance(61);
    assert_eq!(token(&b_app, &id, "wrong-secret").await.0, StatusCode::UNAUTHORIZED, "a new minute");
    let now = e.clock.now();
    assert!(e.core.store().purge_attempt_counters(now).await.unwrap() <= 1, "ended windows are purged");
}
