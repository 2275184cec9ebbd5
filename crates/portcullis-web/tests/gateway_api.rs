//! Handler tests of the control plane's internal gateway endpoints (`/api/v1/gateway/…`,
//! docs/gateway-control-plane.md): who may call them, the trust and grants snapshots, the three
//! credential checks, the change feed (what raises which flag, revoked tokens, cursors, the
//! long poll) and the gateway's own certificates. The real router over a real SQLite store,
//! driven with `oneshot`, a manual clock and an in-memory mailer.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode, header};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD as B64, URL_SAFE_NO_PAD as B64URL};
use portcullis_core::clock::Clock;
use portcullis_core::model::Page;
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, PublicKeyData};
use serde_json::{Value, json};
use tower::ServiceExt;
use x509_parser::extensions::{GeneralName, ParsedExtension};

#[allow(dead_code)]
mod support;

use support::{ADMIN_SECRET, Env, env};

const PW: &str = "correct-horse-battery";
const ANN: &str = "ann@acme.test";
const DAY: i64 = 86_400;

// ---- HTTP harness --------------------------------------------------------------------------------

struct Resp {
    s: StatusCode,
    h: HeaderMap,
    v: Value,
}

impl Resp {
    fn err(&self) -> String {
        self.h.get("x-error").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default()
    }
    fn str(&self, k: &str) -> String {
        self.v[k].as_str().unwrap_or_else(|| panic!("no string {k:?} in {}", self.v)).to_owned()
    }
}

async fn send(e: &Env, req: Request<Body>) -> Resp {
    let resp = e.app.clone().oneshot(req).await.unwrap();
    let s = resp.status();
    let h = resp.headers().clone();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX).await.unwrap();
    let v = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    if !s.is_success() {
        assert!(h.contains_key("x-error") && h.contains_key("x-error-id"), "{s} without x-error/x-error-id: {v}");
    }
    Resp { s, h, v }
}

fn request(method: &str, path: &str, bearer: Option<&str>, body: Option<&Value>) -> Request<Body> {
    let mut b = Request::builder().method(method).uri(path);
    if let Some(t) = bearer {
        b = b.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let body = match body {
        Some(v) => {
            b = b.header(header::CONTENT_TYPE, "application/json");
            Body::from(v.to_string())
        }
        None => Body::empty(),
    };
    b.body(body).unwrap()
}

async fn call(e: &Env, method: &str, path: &str, bearer: &str, body: Option<Value>) -> Resp {
    send(e, request(method, path, Some(bearer), body.as_ref())).await
}

fn basic(id: &str, secret: &str) -> String {
    format!("Basic {}", B64.encode(format!("{id}:{secret}")))
}

async fn form_post(e: &Env, path: &str, id: &str, secret: &str, form: &str) -> Resp {
    let req = Request::post(path)
        .header(header::AUTHORIZATION, basic(id, secret))
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from(form.to_owned()))
        .unwrap();
    send(e, req).await
}

async fn secret_token(e: &Env, id: &str, secret: &str) -> String {
    let r = form_post(e, "/oauth2/token", id, secret, "grant_type=client_credentials").await;
    assert_eq!(r.s, StatusCode::OK, "{}", r.v);
    r.str("access_token")
}

fn claims_of(jwt: &str) -> Value {
    serde_json::from_slice(&B64URL.decode(jwt.split('.').nth(1).unwrap()).unwrap()).unwrap()
}

fn code_in(text: &str) -> String {
    text.split_whitespace().find(|w| w.len() == 6 && w.bytes().all(|b| b.is_ascii_digit())).unwrap().to_owned()
}

async fn code_for(e: &Env, to: &str) -> String {
    e.core.deliver_mail().await.unwrap();
    let m = e.mailer.sent().into_iter().rfind(|m| m.to == to).unwrap_or_else(|| panic!("no mail to {to}"));
    code_in(&m.text)
}

async fn verify(e: &Env, path: &str, verification_id: &str, code: &str) -> Resp {
    let body = json!({"verification_id": verification_id, "code": code});
    send(e, request("POST", path, None, Some(&body))).await
}

// ---- fixture -------------------------------------------------------------------------------------

struct Fx {
    admin: String,
    /// An application token holding `portcullis:gateway`.
    gw: String,
    /// The gateway application's (client id, secret), for a new token after the clock moved.
    gw_creds: (String, String),
    billing: (String, String),
    ann_id: String,
    /// A verified session of ann.
    session: String,
    /// ann's active API key: (id, key, secret).
    key: (String, String, String),
}

async fn create_app(e: &Env, admin: &str, body: Value) -> Value {
    let r = call(e, "POST", "/api/v1/organisations/acme/applications", admin, Some(body)).await;
    assert_eq!(r.s, StatusCode::CREATED, "{}", r.v);
    r.v
}

/// Organisation acme with service payments (a grant for payments:reader), applications gw
/// (`portcullis:gateway`), billing and mtls (`tls_client_auth`, `payments:reader`), user ann
/// (`payments:reader`) with a session and an API key.
async fn setup(e: &Env) -> Fx {
    let admin = secret_token(e, "portcullis$admin", ADMIN_SECRET).await;
    let r = call(e, "POST", "/api/v1/organisations", &admin, Some(json!({"slug": "acme", "name": "Acme"}))).await;
    assert_eq!(r.s, StatusCode::CREATED, "{}", r.v);
    let svc = json!({
        "slug": "payments", "name": "Payments", "audience": "https://payments.test",
        "scopes": ["payments/read"], "roles": ["payments:reader", "payments:admin"],
        "permissions": ["payments.entry.read", "payments.entry.write"],
        "grants": {"payments:reader": ["payments.entry.read"]},
    });
    let r = call(e, "POST", "/api/v1/organisations/acme/services", &admin, Some(svc)).await;
    assert_eq!(r.s, StatusCode::CREATED, "{}", r.v);
    let gw = create_app(e, &admin, json!({"slug": "gw", "name": "Gateway", "roles": ["portcullis:gateway"]})).await;
    let billing = create_app(e, &admin, json!({"slug": "billing", "name": "Billing"})).await;
    create_app(
        e,
        &admin,
        json!({"slug": "mtls", "name": "Mtls", "token_endpoint_auth_method": "tls_client_auth",
               "roles": ["payments:reader"]}),
    )
    .await;
    let creds =
        |v: &Value| (v["client_id"].as_str().unwrap().to_owned(), v["client_secret"].as_str().unwrap().to_owned());
    let gw_creds = creds(&gw);
    let gw = secret_token(e, &gw_creds.0, &gw_creds.1).await;

    let body = json!({"email": ANN, "password": PW, "roles": ["payments:reader"]});
    let r = call(e, "POST", "/api/v1/organisations/acme/users", &admin, Some(body)).await;
    assert_eq!(r.s, StatusCode::CREATED, "{}", r.v);
    let ann_id = r.str("id");
    let r = send(e, request("POST", "/api/v1/sessions", None, Some(&json!({"email": ANN, "password": PW})))).await;
    assert_eq!(r.s, StatusCode::ACCEPTED, "{}", r.v);
    let code = code_for(e, ANN).await;
    let v = verify(e, "/api/v1/sessions/verify", &r.str("verification_id"), &code).await;
    assert_eq!(v.s, StatusCode::OK, "{}", v.v);
    let session = r.str("session_token");
    let key = new_api_key(e, &session, "k1").await;
    Fx { admin, gw, gw_creds, billing: creds(&billing), ann_id, session, key }
}

async fn new_api_key(e: &Env, session: &str, name: &str) -> (String, String, String) {
    let r =
        call(e, "POST", "/api/v1/api-keys", session, Some(json!({"name": name, "roles": ["payments:reader"]}))).await;
    assert_eq!(r.s, StatusCode::ACCEPTED, "{}", r.v);
    let code = code_for(e, ANN).await;
    let v = verify(e, "/api/v1/api-keys/verify", &r.str("verification_id"), &code).await;
    assert_eq!(v.s, StatusCode::OK, "{}", v.v);
    (r.str("id"), r.str("api_key"), r.str("api_secret"))
}

fn p256() -> KeyPair {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap()
}

fn csr(key: &KeyPair, cn: &str, o: &str) -> String {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn.push(DnType::OrganizationName, o);
    p.distinguished_name = dn;
    p.serialize_request(key).unwrap().pem().unwrap()
}

fn pem_ders(text: &str) -> Vec<Vec<u8>> {
    portcullis_core::pki::pem_certificates(text).unwrap()
}

/// Issues a certificate of `ty` to acme$mtls; returns (inventory id, leaf DER).
async fn mtls_certificate(e: &Env, f: &Fx, ty: &str) -> (String, Vec<u8>) {
    let body = json!({"type": ty, "application": "mtls", "csr": csr(&p256(), "acme$mtls", "acme")});
    let r = call(e, "POST", "/api/v1/organisations/acme/certificates", &f.admin, Some(body)).await;
    assert_eq!(r.s, StatusCode::CREATED, "{}", r.v);
    (r.str("id"), pem_ders(&r.str("certificate_pem")).remove(0))
}

async fn check(e: &Env, f: &Fx, what: &str, body: Value) -> Resp {
    let r = call(e, "POST", &format!("/api/v1/gateway/{what}/check"), &f.gw, Some(body)).await;
    assert_eq!(r.s, StatusCode::OK, "{what}: {} {}", r.err(), r.v);
    assert_eq!(r.h.get(header::CACHE_CONTROL).unwrap(), "no-store");
    r
}

async fn changes(e: &Env, f: &Fx, cursor: Option<&str>, wait: u64) -> Resp {
    let mut path = format!("/api/v1/gateway/changes?wait={wait}");
    if let Some(c) = cursor {
        path.push_str(&format!("&cursor={c}"));
    }
    let r = call(e, "GET", &path, &f.gw, None).await;
    assert_eq!(r.s, StatusCode::OK, "{} {}", r.err(), r.v);
    r
}

/// The flags of a feed page, in order principals, grants, trust, keys, reset.
fn flags(r: &Resp) -> [bool; 5] {
    ["principals", "grants", "trust", "keys", "reset"]
        .map(|k| r.v[k].as_bool().unwrap_or_else(|| panic!("{k}: {}", r.v)))
}

fn jtis(r: &Resp) -> Vec<String> {
    r.v["revoked_tokens"].as_array().unwrap().iter().map(|t| t["jti"].as_str().unwrap().to_owned()).collect()
}

/// A token of billing's, revoked with RFC 7009; returns its claims.
async fn revoked_token(e: &Env, f: &Fx) -> Value {
    let t = secret_token(e, &f.billing.0, &f.billing.1).await;
    let r = form_post(e, "/oauth2/revoke", &f.billing.0, &f.billing.1, &format!("token={t}")).await;
    assert_eq!(r.s, StatusCode::OK, "{}", r.v);
    claims_of(&t)
}

// ---- who may call --------------------------------------------------------------------------------

const ENDPOINTS: [(&str, &str); 8] = [
    ("GET", "/api/v1/gateway/trust"),
    ("GET", "/api/v1/gateway/grants"),
    ("GET", "/api/v1/gateway/changes?wait=0"),
    ("POST", "/api/v1/gateway/api-keys/check"),
    ("POST", "/api/v1/gateway/sessions/check"),
    ("POST", "/api/v1/gateway/browser-sessions"),
    ("POST", "/api/v1/gateway/certificates/check"),
    ("POST", "/api/v1/gateway/certificates"),
];

#[tokio::test]
async fn every_endpoint_needs_an_access_token_with_the_gateway_role() {
    let e = env().await;
    let f = setup(&e).await;
    let body = json!({"api_key": f.key.1, "api_secret": f.key.2});
    let ops = create_app(&e, &f.admin, json!({"slug": "ops", "name": "Ops", "roles": ["portcullis:org-admin"]})).await;
    let ops = secret_token(&e, ops["client_id"].as_str().unwrap(), ops["client_secret"].as_str().unwrap()).await;
    for (method, path) in ENDPOINTS {
        let with = |t: Option<&str>| request(method, path, t, (method == "POST").then_some(&body));
        let r = send(&e, with(None)).await;
        assert_eq!(r.s, StatusCode::UNAUTHORIZED, "{method} {path} without a token");
        assert!(r.h.contains_key(header::WWW_AUTHENTICATE));
        let r = send(&e, with(Some("not-a-token"))).await;
        assert_eq!(r.s, StatusCode::UNAUTHORIZED, "{method} {path} with garbage");
        let r = send(&e, with(Some(&f.session))).await;
        assert_eq!(r.s, StatusCode::UNAUTHORIZED, "{method} {path} with a session token: {}", r.err());
        // The platform admin is not a gateway.
        let r = send(&e, with(Some(&f.admin))).await;
        assert_eq!(r.s, StatusCode::FORBIDDEN, "{method} {path} with the admin's token");
        assert!(r.err().contains("portcullis:gateway"), "{}", r.err());
        // An organisation admin's token is for this server, but not a gateway's.
        let r = send(&e, with(Some(&ops))).await;
        assert_eq!(r.s, StatusCode::FORBIDDEN, "{method} {path} with an org admin's token");
        // A plain application's token is not even for this server (its audience).
        let billing = secret_token(&e, &f.billing.0, &f.billing.1).await;
        let r = send(&e, with(Some(&billing))).await;
        assert_eq!(r.s, StatusCode::UNAUTHORIZED, "{method} {path} with a plain application's token");
    }
    // A gateway whose role was taken away stops at once, whatever its token says.
    let r = call(&e, "PATCH", "/api/v1/organisations/acme/applications/gw", &f.admin, Some(json!({"roles": []}))).await;
    assert_eq!(r.s, StatusCode::OK, "{}", r.v);
    assert_eq!(call(&e, "GET", "/api/v1/gateway/grants", &f.gw, None).await.s, StatusCode::FORBIDDEN);
}

// ---- snapshots -----------------------------------------------------------------------------------

#[tokio::test]
async fn trust_lists_the_ca_certificates_and_current_crls() {
    let e = env().await;
    let f = setup(&e).await;
    let r = call(&e, "GET", "/api/v1/gateway/trust", &f.gw, None).await;
    assert_eq!(r.s, StatusCode::OK, "{}", r.v);
    assert_eq!(r.h.get(header::CACHE_CONTROL).unwrap(), "no-store");
    let anchors: Vec<Vec<u8>> =
        r.v["anchors"].as_array().unwrap().iter().map(|a| B64.decode(a.as_str().unwrap()).unwrap()).collect();
    assert_eq!(anchors.len(), 2, "root and issuing CA");
    for a in &anchors {
        let (_, c) = x509_parser::parse_x509_certificate(a).unwrap();
        assert!(c.is_ca(), "{}", c.subject());
    }
    let crls = r.v["crls"].as_array().unwrap();
    assert_eq!(crls.len(), 1, "one issuing CA, one CRL");

    // A revoked certificate is in the CRL the next snapshot carries.
    let (id, leaf) = mtls_certificate(&e, &f, "transport").await;
    let r = call(
        &e,
        "POST",
        &format!("/api/v1/organisations/acme/certificates/{id}/revoke"),
        &f.admin,
        Some(json!({"reason": "key_compromise"})),
    )
    .await;
    assert_eq!(r.s, StatusCode::OK, "{}", r.v);
    let r = call(&e, "GET", "/api/v1/gateway/trust", &f.gw, None).await;
    let crl = B64.decode(r.v["crls"][0].as_str().unwrap()).unwrap();
    let (_, crl) = x509_parser::parse_x509_crl(&crl).unwrap();
    let (_, leaf) = x509_parser::parse_x509_certificate(&leaf).unwrap();
    assert!(
        crl.iter_revoked_certificates().any(|rc| rc.raw_serial() == leaf.raw_serial()),
        "the revoked serial is listed"
    );
}

#[tokio::test]
async fn grants_list_every_organisations_role_permissions() {
    let e = env().await;
    let f = setup(&e).await;
    let r = call(&e, "GET", "/api/v1/gateway/grants", &f.gw, None).await;
    assert_eq!(r.s, StatusCode::OK, "{}", r.v);
    assert_eq!(
        r.v,
        json!({"grants": [{"org": "acme", "role": "payments:reader", "permission": "payments.entry.read"}]})
    );
    let r = call(&e, "POST", "/api/v1/organisations", &f.admin, Some(json!({"slug": "beta", "name": "Beta"}))).await;
    assert_eq!(r.s, StatusCode::CREATED);
    let svc = json!({"slug": "ledger", "name": "Ledger", "audience": "https://ledger.test", "roles": ["ledger:admin"],
                     "permissions": ["ledger.book.write"], "grants": {"ledger:admin": ["ledger.book.write"]}});
    assert_eq!(
        call(&e, "POST", "/api/v1/organisations/beta/services", &f.admin, Some(svc)).await.s,
        StatusCode::CREATED
    );
    let body = json!({"permissions": ["payments.entry.read", "payments.entry.write"]});
    let r = call(&e, "PUT", "/api/v1/organisations/acme/roles/payments:admin", &f.admin, Some(body)).await;
    assert_eq!(r.s, StatusCode::OK, "{}", r.v);
    let r = call(&e, "GET", "/api/v1/gateway/grants", &f.gw, None).await;
    let mut got: Vec<(String, String, String)> = r.v["grants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            (
                g["org"].as_str().unwrap().into(),
                g["role"].as_str().unwrap().into(),
                g["permission"].as_str().unwrap().into(),
            )
        })
        .collect();
    got.sort();
    let want = [
        ("acme", "payments:admin", "payments.entry.read"),
        ("acme", "payments:admin", "payments.entry.write"),
        ("acme", "payments:reader", "payments.entry.read"),
        ("beta", "ledger:admin", "ledger.book.write"),
    ]
    .map(|(a, b, c)| (a.to_owned(), b.to_owned(), c.to_owned()));
    assert_eq!(got, want);
}

// ---- credential checks ---------------------------------------------------------------------------

#[tokio::test]
async fn api_keys_are_checked_like_the_auth_api_checks_them() {
    let e = env().await;
    let f = setup(&e).await;
    let (id, key, secret) = f.key.clone();
    let r = check(&e, &f, "api-keys", json!({"api_key": key, "api_secret": secret, "client_ip": "203.0.113.9"})).await;
    assert_eq!(
        r.v,
        json!({"valid": true, "identity": {"subject": f.ann_id, "client_id": "api-key", "org": "acme",
               "roles": ["payments:reader"], "scopes": []}})
    );
    let r =
        check(&e, &f, "api-keys", json!({"api_key": key, "api_secret": "pks_wrong-secret-0123456789abcdefghijklmnop"}))
            .await;
    assert_eq!(r.v["valid"], false);
    assert_eq!(r.v["status"], 401);
    assert!(r.v.get("retry_after").is_none());
    let r = check(&e, &f, "api-keys", json!({"api_key": "pk_unknown", "api_secret": secret})).await;
    assert_eq!((r.v["valid"].clone(), r.v["status"].clone()), (json!(false), json!(401)));

    // Revoked: refused at once (the check reads past the cache).
    assert_eq!(call(&e, "DELETE", &format!("/api/v1/api-keys/{id}"), &f.session, None).await.s, StatusCode::NO_CONTENT);
    let r = check(&e, &f, "api-keys", json!({"api_key": key, "api_secret": secret})).await;
    assert_eq!(r.v, json!({"valid": false, "status": 401, "message": "API key was revoked"}));

    // Failures count against the client's IP like anywhere else: then 429 with retry_after.
    let mut limited = None;
    for _ in 0..100 {
        let r = check(&e, &f, "api-keys", json!({"api_key": key, "api_secret": "pks_x", "client_ip": "198.51.100.7"}))
            .await;
        if r.v["status"] == 429 {
            limited = Some(r);
            break;
        }
    }
    let r = limited.expect("the failure limit applies");
    assert_eq!(r.v["valid"], false);
    assert!(r.v["retry_after"].as_u64().unwrap() >= 1, "{}", r.v);
    // Another client IP is not limited.
    let other = new_api_key(&e, &f.session, "k2").await;
    let r =
        check(&e, &f, "api-keys", json!({"api_key": other.1, "api_secret": other.2, "client_ip": "192.0.2.1"})).await;
    assert_eq!(r.v["valid"], true, "{}", r.v);

    // Malformed requests are 400s, not verdicts.
    for bad in [
        json!({"api_key": key}),
        json!({"api_key": key, "api_secret": "x", "extra": 1}),
        json!({"api_key": key, "api_secret": "x", "client_ip": "nope"}),
    ] {
        let r = call(&e, "POST", "/api/v1/gateway/api-keys/check", &f.gw, Some(bad.clone())).await;
        assert_eq!(r.s, StatusCode::BAD_REQUEST, "{bad}");
        assert!(!r.err().contains(&secret));
    }
}

#[tokio::test]
async fn sessions_are_checked_and_revocation_counts_at_once() {
    let e = env().await;
    let f = setup(&e).await;
    let r = check(&e, &f, "sessions", json!({"session_token": f.session, "client_ip": "2001:db8::5"})).await;
    assert_eq!(
        r.v,
        json!({"valid": true, "identity": {"subject": f.ann_id, "client_id": "session", "org": "acme",
               "roles": ["payments:reader"], "scopes": []}})
    );
    let r =
        check(&e, &f, "sessions", json!({"session_token": "pcs_unknown-token-0123456789abcdefghijklmnopqrstuv"})).await;
    assert_eq!((r.v["valid"].clone(), r.v["status"].clone()), (json!(false), json!(401)));
    let d = call(&e, "DELETE", "/api/v1/sessions/current", &f.session, None).await;
    assert_eq!(d.s, StatusCode::NO_CONTENT);
    let r = check(&e, &f, "sessions", json!({"session_token": f.session})).await;
    assert_eq!(r.v, json!({"valid": false, "status": 401, "message": "session was revoked"}));
}

#[tokio::test]
async fn only_active_transport_certificates_of_enabled_applications_authenticate() {
    let e = env().await;
    let f = setup(&e).await;
    let (id, leaf) = mtls_certificate(&e, &f, "transport").await;
    let r = check(&e, &f, "certificates", json!({"certificate": B64.encode(&leaf)})).await;
    assert_eq!(
        r.v,
        json!({"valid": true, "identity": {"subject": "acme$mtls", "client_id": "acme$mtls", "org": "acme",
               "roles": ["payments:reader"], "scopes": []}})
    );
    // A signing certificate of the same application is not a client certificate.
    let (_, signing) = mtls_certificate(&e, &f, "signing").await;
    let r = check(&e, &f, "certificates", json!({"certificate": B64.encode(&signing)})).await;
    assert_eq!((r.v["valid"].clone(), r.v["status"].clone()), (json!(false), json!(401)), "{}", r.v);
    assert!(r.v["message"].as_str().unwrap().contains("transport"), "{}", r.v);
    // Not ours.
    let foreign = rcgen::CertificateParams::new(vec!["x.test".into()]).unwrap().self_signed(&p256()).unwrap();
    let r = check(&e, &f, "certificates", json!({"certificate": B64.encode(foreign.der())})).await;
    assert_eq!((r.v["valid"].clone(), r.v["status"].clone()), (json!(false), json!(401)));
    // Disabled application: 403; enabled again: fine.
    let path = "/api/v1/organisations/acme/applications/mtls";
    assert_eq!(call(&e, "PATCH", path, &f.admin, Some(json!({"enabled": false}))).await.s, StatusCode::OK);
    let r = check(&e, &f, "certificates", json!({"certificate": B64.encode(&leaf)})).await;
    assert_eq!(r.v, json!({"valid": false, "status": 403, "message": "application acme$mtls is disabled"}));
    assert_eq!(call(&e, "PATCH", path, &f.admin, Some(json!({"enabled": true}))).await.s, StatusCode::OK);
    assert_eq!(check(&e, &f, "certificates", json!({"certificate": B64.encode(&leaf)})).await.v["valid"], true);
    // Revoked.
    let r = call(
        &e,
        "POST",
        &format!("/api/v1/organisations/acme/certificates/{id}/revoke"),
        &f.admin,
        Some(json!({"reason": "key_compromise"})),
    )
    .await;
    assert_eq!(r.s, StatusCode::OK, "{}", r.v);
    let r = check(&e, &f, "certificates", json!({"certificate": B64.encode(&leaf)})).await;
    assert_eq!(r.v, json!({"valid": false, "status": 401, "message": "the client certificate is revoked"}));
    // Not standard base64 of anything.
    for bad in ["", "%%%", "QUJD"[..3].to_owned().as_str()] {
        let r = call(&e, "POST", "/api/v1/gateway/certificates/check", &f.gw, Some(json!({"certificate": bad}))).await;
        assert_eq!(r.s, StatusCode::BAD_REQUEST, "{bad:?}");
    }
}

// ---- the change feed -----------------------------------------------------------------------------

#[tokio::test]
async fn the_feed_reports_each_kind_of_change_once() {
    let e = env().await;
    let f = setup(&e).await;
    let start = changes(&e, &f, None, 0).await;
    assert_eq!(flags(&start), [false; 5], "no cursor: start from now");
    let cursor = start.str("cursor");
    assert!(cursor.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'), "{cursor}");
    let quiet = changes(&e, &f, Some(&cursor), 0).await;
    assert_eq!(flags(&quiet), [false; 5], "nothing happened: {}", quiet.v);
    assert!(jtis(&quiet).is_empty());
    let cursor = quiet.str("cursor");

    // A revoked access token.
    let claims = revoked_token(&e, &f).await;
    let r = changes(&e, &f, Some(&cursor), 0).await;
    assert_eq!(r.v["revoked_tokens"], json!([{"jti": claims["jti"], "expires_at": claims["exp"]}]));
    assert_eq!(flags(&r), [false; 5], "{}", r.v);
    let again = changes(&e, &f, Some(&r.str("cursor")), 0).await;
    assert!(jtis(&again).is_empty() && flags(&again) == [false; 5], "reported once: {}", again.v);
    let cursor = again.str("cursor");

    // A revoked API key: principals.
    let r = call(&e, "DELETE", &format!("/api/v1/api-keys/{}", f.key.0), &f.session, None).await;
    assert_eq!(r.s, StatusCode::NO_CONTENT);
    let r = changes(&e, &f, Some(&cursor), 0).await;
    assert_eq!(flags(&r), [true, false, false, false, false], "{}", r.v);
    let cursor = r.str("cursor");
    let r = changes(&e, &f, Some(&cursor), 0).await;
    assert_eq!(flags(&r), [false; 5], "reported once: {}", r.v);
    let cursor = r.str("cursor");

    // A role's permissions: grants.
    let body = json!({"permissions": ["payments.entry.write"]});
    assert_eq!(
        call(&e, "PUT", "/api/v1/organisations/acme/roles/payments:admin", &f.admin, Some(body)).await.s,
        StatusCode::OK
    );
    let r = changes(&e, &f, Some(&cursor), 0).await;
    assert_eq!(flags(&r), [false, true, false, false, false], "{}", r.v);
    let cursor = r.str("cursor");

    // A revoked certificate: trust (and cached certificate answers).
    let (id, _) = mtls_certificate(&e, &f, "transport").await;
    let r = changes(&e, &f, Some(&cursor), 0).await;
    assert_eq!(flags(&r), [false; 5], "issuing a certificate changes nothing cached: {}", r.v);
    let cursor = r.str("cursor");
    let r = call(
        &e,
        "POST",
        &format!("/api/v1/organisations/acme/certificates/{id}/revoke"),
        &f.admin,
        Some(json!({"reason": "superseded"})),
    )
    .await;
    assert_eq!(r.s, StatusCode::OK);
    let r = changes(&e, &f, Some(&cursor), 0).await;
    assert_eq!(flags(&r), [true, false, true, false, false], "{}", r.v);
    let cursor = r.str("cursor");

    // A signing-key rotation: keys.
    let r = call(&e, "POST", "/api/v1/keys/rotate?force=true", &f.admin, None).await;
    assert_eq!(r.s, StatusCode::OK, "{}", r.v);
    let r = changes(&e, &f, Some(&cursor), 0).await;
    assert_eq!(flags(&r), [false, false, false, true, false], "{}", r.v);
    let cursor = r.str("cursor");

    // Disabling a user: principals (its sessions end too).
    let path = format!("/api/v1/organisations/acme/users/{}", f.ann_id);
    assert_eq!(call(&e, "PATCH", &path, &f.admin, Some(json!({"enabled": false}))).await.s, StatusCode::OK);
    let r = changes(&e, &f, Some(&cursor), 0).await;
    assert_eq!(flags(&r), [true, false, false, false, false], "{}", r.v);

    // Failed attempts and reads change nothing.
    let cursor = r.str("cursor");
    let _ = check(&e, &f, "api-keys", json!({"api_key": "pk_nope", "api_secret": "pks_nope"})).await;
    let _ = call(&e, "GET", "/api/v1/gateway/trust", &f.gw, None).await;
    let r = changes(&e, &f, Some(&cursor), 0).await;
    assert_eq!(flags(&r), [false; 5], "{}", r.v);
}

#[tokio::test]
async fn bad_or_stale_cursors_start_over_with_every_revoked_token() {
    let e = env().await;
    let f = setup(&e).await;
    let claims = revoked_token(&e, &f).await;
    let start = changes(&e, &f, None, 0).await;
    assert_eq!(jtis(&start), [claims["jti"].as_str().unwrap()], "no cursor: every unexpired revoked token");
    assert_eq!(flags(&start), [false; 5]);
    for bad in ["garbage", "", "AAAAAAAA", &"x".repeat(5000)] {
        let r = changes(&e, &f, Some(bad), 25).await;
        assert_eq!(flags(&r), [true; 5], "{bad:?}: {}", r.v);
        assert_eq!(jtis(&r), jtis(&start));
        assert_ne!(r.str("cursor"), bad);
        // The new cursor works.
        assert_eq!(flags(&changes(&e, &f, Some(&r.str("cursor")), 0).await), [false; 5]);
    }
    // Older than ten minutes: reset; a revoked token that expired meanwhile is not listed.
    let cursor = start.str("cursor");
    e.clock.advance(601);
    let r = changes(&e, &f, Some(&cursor), 0).await;
    assert_eq!(flags(&r), [true; 5], "{}", r.v);
    let exp = claims["exp"].as_i64().unwrap();
    assert_eq!(jtis(&r).is_empty(), exp < e.clock.now() - 5, "listed while it may still be accepted");
    e.clock.advance(3 * 3600);
    let mut f = f;
    f.gw = secret_token(&e, &f.gw_creds.0, &f.gw_creds.1).await;
    let r = changes(&e, &f, None, 0).await;
    assert!(jtis(&r).is_empty(), "expired revocations are not listed: {}", r.v);
    // A cursor from another database (positions it never reached): reset too.
    let other = support::env().await;
    other.clock.set(e.clock.now());
    let fo = setup(&other).await;
    let mut far = changes(&other, &fo, None, 0).await.str("cursor");
    for _ in 0..50 {
        let _ = revoked_token(&other, &fo).await;
    }
    far = changes(&other, &fo, Some(&far), 0).await.str("cursor");
    let r = changes(&e, &f, Some(&far), 0).await;
    assert!(r.v["reset"].as_bool().unwrap(), "{}", r.v);
    // wait is bounded.
    let r = call(&e, "GET", "/api/v1/gateway/changes?wait=31", &f.gw, None).await;
    assert_eq!(r.s, StatusCode::BAD_REQUEST);
    let r = call(&e, "GET", "/api/v1/gateway/changes?wait=soon", &f.gw, None).await;
    assert_eq!(r.s, StatusCode::BAD_REQUEST);
    let r = call(&e, "GET", "/api/v1/gateway/changes?wait=0&since=1", &f.gw, None).await;
    assert_eq!(r.s, StatusCode::BAD_REQUEST, "unknown parameters are refused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_long_poll_waits_and_returns_early_on_news() {
    let e = env().await;
    let f = setup(&e).await;
    let cursor = changes(&e, &f, None, 0).await.str("cursor");

    // Nothing happens: the call waits about `wait`.
    let t = Instant::now();
    let r = changes(&e, &f, Some(&cursor), 1).await;
    let waited = t.elapsed();
    assert!(waited >= Duration::from_millis(900) && waited < Duration::from_secs(5), "{waited:?}");
    assert_eq!(flags(&r), [false; 5]);
    let cursor = r.str("cursor");

    // A revocation during the wait ends it well before `wait`.
    let app = e.app.clone();
    let req = request("GET", &format!("/api/v1/gateway/changes?wait=20&cursor={cursor}"), Some(&f.gw), None);
    let t = Instant::now();
    let poll = tokio::spawn(async move { app.oneshot(req).await.unwrap() });
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(!poll.is_finished(), "the poll waits while nothing happens");
    let claims = revoked_token(&e, &f).await;
    let resp = poll.await.unwrap();
    let took = t.elapsed();
    assert_eq!(resp.status(), StatusCode::OK);
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX).await.unwrap();
    let v: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(v["revoked_tokens"][0]["jti"], claims["jti"], "{v}");
    assert!(took < Duration::from_secs(5), "returned {took:?} after the start of a 20 s wait");
}

// ---- the gateway's own certificates --------------------------------------------------------------

fn eku(der: &[u8]) -> (bool, bool) {
    let (_, c) = x509_parser::parse_x509_certificate(der).unwrap();
    let e = c.extended_key_usage().unwrap().unwrap().value;
    (e.client_auth, e.server_auth)
}

fn sans(der: &[u8]) -> Vec<String> {
    let (_, c) = x509_parser::parse_x509_certificate(der).unwrap();
    let mut out = Vec::new();
    for ext in c.extensions() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
            for n in &san.general_names {
                out.push(match n {
                    GeneralName::DNSName(d) => format!("DNS:{d}"),
                    GeneralName::IPAddress(b) => format!("IP:{b:?}"),
                    other => format!("{other:?}"),
                });
            }
        }
    }
    out
}

#[tokio::test]
async fn the_gateway_gets_its_server_and_upstream_client_certificates() {
    let e = env().await;
    let f = setup(&e).await;
    let key = p256();
    let body =
        json!({"purpose": "server", "names": ["GW.example", "127.0.0.1"], "csr": csr(&key, "whatever", "ignored")});
    let r = call(&e, "POST", "/api/v1/gateway/certificates", &f.gw, Some(body)).await;
    assert_eq!(r.s, StatusCode::CREATED, "{} {}", r.err(), r.v);
    let chain = pem_ders(&r.str("chain_pem"));
    assert_eq!(chain.len(), 3, "leaf, issuing CA, root");
    let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
    let (_, issuing) = x509_parser::parse_x509_certificate(&chain[1]).unwrap();
    leaf.verify_signature(Some(issuing.public_key())).unwrap();
    assert_eq!(leaf.public_key().raw, key.subject_public_key_info().as_slice(), "the CSR's key");
    assert!(!leaf.is_ca());
    assert_eq!(eku(&chain[0]), (false, true), "serverAuth only");
    assert_eq!(sans(&chain[0]), ["DNS:gw.example", "IP:[127, 0, 0, 1]"]);
    let now = e.clock.now();
    assert_eq!(r.v["not_after"].as_i64().unwrap(), now + 30 * DAY);
    assert_eq!(leaf.validity().not_after.timestamp(), now + 30 * DAY);
    assert!(leaf.subject().to_string().contains("gw.example"), "{}", leaf.subject());
    // Not in the inventory, so it authenticates nothing, but audited.
    let r = check(&e, &f, "certificates", json!({"certificate": B64.encode(&chain[0])})).await;
    assert_eq!(r.v["valid"], false);
    let events = e.core.store().audit_events(None, Page::new(Some(50), None)).await.unwrap();
    let ev = events.iter().find(|ev| ev.action == "gateway.certificate.issue").expect("audited");
    assert_eq!(ev.actor, claims_of(&f.gw)["sub"].as_str().unwrap());
    assert_eq!(ev.details["purpose"], "server");

    let body = json!({"purpose": "upstream_client", "csr": csr(&p256(), "x", "y")});
    let r = call(&e, "POST", "/api/v1/gateway/certificates", &f.gw, Some(body)).await;
    assert_eq!(r.s, StatusCode::CREATED, "{} {}", r.err(), r.v);
    let chain = pem_ders(&r.str("chain_pem"));
    let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
    assert_eq!(leaf.subject().iter_common_name().next().unwrap().as_str().unwrap(), "portcullis-gateway");
    assert_eq!(eku(&chain[0]), (true, false), "clientAuth only");
    assert!(sans(&chain[0]).is_empty());

    // Refused: names that are not host names or addresses, too many, no names for a server,
    // an unknown purpose, a CSR that does not verify.
    let many: Vec<String> = (0..17).map(|i| format!("gw{i}.example")).collect();
    let good_csr = csr(&p256(), "a", "b");
    // One base64 character of the signature changed: the self-signature no longer verifies.
    let mut lines: Vec<String> = good_csr.lines().map(str::to_owned).collect();
    let sig_line = lines.len() - 2;
    let flipped = if lines[sig_line].starts_with('A') { "B" } else { "A" };
    lines[sig_line].replace_range(0..1, flipped);
    let tampered = lines.join("\n");
    for (body, why) in [
        (json!({"purpose": "server", "names": ["*.example"], "csr": good_csr}), "wildcard"),
        (json!({"purpose": "server", "names": ["gw.example:443"], "csr": good_csr}), "port"),
        (json!({"purpose": "server", "names": ["0.0.0.0"], "csr": good_csr}), "unspecified address"),
        (json!({"purpose": "server", "names": many, "csr": good_csr}), "17 names"),
        (json!({"purpose": "server", "names": [], "csr": good_csr}), "no names"),
        (json!({"purpose": "client", "names": [], "csr": good_csr}), "purpose"),
        (json!({"purpose": "server", "names": ["gw.example"], "csr": tampered}), "bad csr"),
        (json!({"purpose": "server", "names": ["gw.example"], "csr": good_csr, "days": 3}), "unknown field"),
    ] {
        let r = call(&e, "POST", "/api/v1/gateway/certificates", &f.gw, Some(body)).await;
        assert_eq!(r.s, StatusCode::BAD_REQUEST, "{why}: {}", r.v);
    }
}

// ---- several control-plane nodes -----------------------------------------------------------------

/// Another node over the same database: its own caches, key ring and CA set.
async fn second_node(e: &Env) -> (std::sync::Arc<portcullis_core::Portcullis>, axum::Router) {
    use portcullis_core::crypto::signing::Algorithm;
    use portcullis_core::crypto::vault::LocalKeyVault;
    use portcullis_core::settings::CoreSettings;
    let mut settings = CoreSettings::for_issuer(support::ISS);
    settings.signing_algorithms = vec![Algorithm::ES256];
    let node = std::sync::Arc::new(portcullis_core::Portcullis::new(
        e.core.store().clone(),
        e.clock.clone(),
        std::sync::Arc::new(LocalKeyVault::new(&[42u8; 32]).unwrap()),
        settings,
    ));
    node.bootstrap(Default::default()).await.unwrap();
    let app = portcullis_web::router(portcullis_web::AppState { core: node.clone(), metrics: None });
    (node, app)
}

async fn on(app: &axum::Router, req: Request<Body>) -> Value {
    let resp = app.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    serde_json::from_slice(&axum::body::to_bytes(resp.into_body(), usize::MAX).await.unwrap()).unwrap()
}

#[tokio::test]
async fn another_nodes_changes_count_at_once_on_this_one() {
    let e = env().await;
    let f = setup(&e).await;
    let (node_b, app_b) = second_node(&e).await;
    let ctx = portcullis_core::usecases::RequestContext::default();
    let (id, key, secret) = f.key.clone();
    let check_b = |body: Value| request("POST", "/api/v1/gateway/api-keys/check", Some(&f.gw), Some(&body));
    assert_eq!(on(&app_b, check_b(json!({"api_key": key, "api_secret": secret}))).await["valid"], true);
    node_b.authenticate_api_key(&ctx, &key, &secret).await.expect("node B caches the key as valid");
    node_b.validate_session(&ctx, &f.session).await.expect("and the session");
    let (cert_id, leaf) = mtls_certificate(&e, &f, "transport").await;
    let serial = x509_parser::parse_x509_certificate(&leaf).unwrap().1.raw_serial().to_vec();
    let cursor = on(&app_b, request("GET", "/api/v1/gateway/changes?wait=0", Some(&f.gw), None)).await["cursor"]
        .as_str()
        .unwrap()
        .to_owned();

    // Node A revokes the key, ends the session and revokes the certificate.
    assert_eq!(call(&e, "DELETE", &format!("/api/v1/api-keys/{id}"), &f.session, None).await.s, StatusCode::NO_CONTENT);
    let r = call(
        &e,
        "POST",
        &format!("/api/v1/organisations/acme/certificates/{cert_id}/revoke"),
        &f.admin,
        Some(json!({"reason": "key_compromise"})),
    )
    .await;
    assert_eq!(r.s, StatusCode::OK);
    let session = f.session.clone();
    assert_eq!(call(&e, "DELETE", "/api/v1/sessions/current", &session, None).await.s, StatusCode::NO_CONTENT);

    // Node B's own cache still says yes (the Auth API tolerates that for its cache lifetime) …
    assert!(node_b.authenticate_api_key(&ctx, &key, &secret).await.is_ok(), "B's cache is stale, as designed");
    // … but the gateway's checks on B read past it.
    let v = on(&app_b, check_b(json!({"api_key": key, "api_secret": secret}))).await;
    assert_eq!(v, json!({"valid": false, "status": 401, "message": "API key was revoked"}));
    let body = json!({"session_token": session});
    let v = on(&app_b, request("POST", "/api/v1/gateway/sessions/check", Some(&f.gw), Some(&body))).await;
    assert_eq!(v["valid"], false, "{v}");
    // B's feed reports A's changes, and B's trust snapshot has A's new CRL.
    let v =
        on(&app_b, request("GET", &format!("/api/v1/gateway/changes?wait=0&cursor={cursor}"), Some(&f.gw), None)).await;
    assert_eq!((v["principals"].clone(), v["trust"].clone()), (json!(true), json!(true)), "{v}");
    let v = on(&app_b, request("GET", "/api/v1/gateway/trust", Some(&f.gw), None)).await;
    let crl = B64.decode(v["crls"][0].as_str().unwrap()).unwrap();
    let (_, crl) = x509_parser::parse_x509_crl(&crl).unwrap();
    assert!(crl.iter_revoked_certificates().any(|rc| rc.raw_serial() == serial.as_slice()), "A's CRL, on B");
}
