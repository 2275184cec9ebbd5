//! Handler tests of the Auth API: login sessions confirmed by an emailed code, API keys, users'
//! addresses and passwords, and the admin endpoints over them. The real router over a real
//! SQLite store, driven with `oneshot`, a manual clock and an in-memory mailer whose messages
//! the tests read the codes from.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::Poll;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode, header};
use axum::response::Response;
use portcullis_core::clock::Clock;
use portcullis_core::mail::{MailError, Mailer, MemoryMailer, OutgoingMail};
use portcullis_core::model::Page;
use portcullis_core::usecases::{CodeSubmission, Credential, LoginRequest, NewApiKey, Principal, RequestContext};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};
use tower::ServiceExt;

#[allow(dead_code)]
mod support;

use support::{ADMIN_SECRET, Env, build, env, env_with};

const PW: &str = "correct-horse-battery";
const NEW_PW: &str = "another-long-passphrase";
/// A plain user: `payments:reader`.
const ANN: &str = "ann@acme.test";
/// An organisation admin of acme: `portcullis:org-admin` and `payments:reader`.
const OLGA: &str = "olga@acme.test";
const LOCKED_SUBJECT: &str = "locked";
const CHANGED_SUBJECT: &str = "password was changed";

// ---- harness ---------------------------------------------------------------------------------

/// A mailer whose first `failures` deliveries fail (temporarily), then delivers to `inner`.
struct FlakyMailer {
    failures: usize,
    calls: AtomicUsize,
    inner: Arc<MemoryMailer>,
}

#[async_trait::async_trait]
impl Mailer for FlakyMailer {
    async fn send(&self, mail: &OutgoingMail) -> Result<(), MailError> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        if n < self.failures {
            return Err(MailError { permanent: false, message: format!("451 try again later ({n})") });
        }
        self.inner.send(mail).await
    }
}

/// How a request authenticates.
#[derive(Clone, Copy)]
enum Auth<'a> {
    Anon,
    Bearer(&'a str),
    Key(&'a str, &'a str),
}

struct Resp {
    s: StatusCode,
    h: HeaderMap,
    v: Value,
}

impl Resp {
    /// The `x-error` header.
    fn err(&self) -> String {
        self.h.get("x-error").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default()
    }
    fn str(&self, k: &str) -> String {
        self.v[k].as_str().unwrap_or_else(|| panic!("no string {k:?} in {}", self.v)).to_owned()
    }
}

fn request(method: &str, path: &str, auth: Auth<'_>, body: Option<&Value>, ip: Option<[u8; 4]>) -> Request<Body> {
    let mut b = Request::builder().method(method).uri(path);
    match auth {
        Auth::Anon => {}
        Auth::Bearer(t) => b = b.header(header::AUTHORIZATION, format!("Bearer {t}")),
        Auth::Key(k, s) => b = b.header("api-key", k).header("api-secret", s),
    }
    let body = match body {
        Some(v) => {
            b = b.header(header::CONTENT_TYPE, "application/json");
            Body::from(v.to_string())
        }
        None => Body::empty(),
    };
    let mut req = b.body(body).unwrap();
    if let Some(ip) = ip {
        req.extensions_mut().insert(axum::extract::ConnectInfo(SocketAddr::from((ip, 4000))));
    }
    req
}

async fn read(resp: Response) -> Resp {
    let s = resp.status();
    let h = resp.headers().clone();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX).await.unwrap();
    let v = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    if !s.is_success() {
        assert!(h.contains_key("x-error") && h.contains_key("x-error-id"), "{s} without x-error: {v}");
    }
    Resp { s, h, v }
}

async fn send(app: &Router, req: Request<Body>) -> Resp {
    read(app.clone().oneshot(req).await.unwrap()).await
}

async fn call(e: &Env, method: &str, path: &str, auth: Auth<'_>, body: Option<Value>) -> Resp {
    send(&e.app, request(method, path, auth, body.as_ref(), None)).await
}

async fn admin_token(e: &Env) -> String {
    let basic = base64_basic("portcullis$admin", ADMIN_SECRET);
    let req = Request::post("/oauth2/token")
        .header(header::AUTHORIZATION, basic)
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from("grant_type=client_credentials"))
        .unwrap();
    let r = send(&e.app, req).await;
    assert_eq!(r.s, StatusCode::OK, "{}", r.v);
    r.str("access_token")
}

fn base64_basic(id: &str, secret: &str) -> String {
    use base64::Engine;
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}")))
}

async fn add_user(e: &Env, admin: &str, org: &str, email: &str, roles: &[&str]) -> String {
    let body = json!({"email": email, "password": PW, "roles": roles});
    let r = call(e, "POST", &format!("/api/v1/organisations/{org}/users"), Auth::Bearer(admin), Some(body)).await;
    assert_eq!(r.s, StatusCode::CREATED, "{}", r.v);
    r.str("id")
}

struct Acme {
    ann: String,
    olga: String,
}

/// Organisations `acme` (service `payments` with roles reader and admin; users ann and olga)
/// and `beta` (empty).
async fn acme(e: &Env) -> Acme {
    let admin = admin_token(e).await;
    for (slug, name) in [("acme", "Acme"), ("beta", "Beta")] {
        let r =
            call(e, "POST", "/api/v1/organisations", Auth::Bearer(&admin), Some(json!({"slug": slug, "name": name})))
                .await;
        assert_eq!(r.s, StatusCode::CREATED, "{}", r.v);
    }
    let svc = json!({
        "slug": "payments", "name": "Payments", "audience": "https://payments.test",
        "scopes": ["payments/read"], "roles": ["payments:reader", "payments:admin"],
        "permissions": ["payments.entry.read"], "grants": {"payments:reader": ["payments.entry.read"]},
    });
    let r = call(e, "POST", "/api/v1/organisations/acme/services", Auth::Bearer(&admin), Some(svc)).await;
    assert_eq!(r.s, StatusCode::CREATED, "{}", r.v);
    let ann = add_user(e, &admin, "acme", ANN, &["payments:reader"]).await;
    let olga = add_user(e, &admin, "acme", OLGA, &["portcullis:org-admin", "payments:reader"]).await;
    assert_eq!(e.core.store().pending_mail_count().await.unwrap(), 0, "creating users sends nothing");
    Acme { ann, olga }
}

fn login_body(email: &str, password: &str, org: Option<&str>) -> Value {
    let mut b = json!({"email": email, "password": password});
    if let Some(o) = org {
        b["organisation"] = json!(o);
    }
    b
}

async fn login_from(e: &Env, email: &str, password: &str, org: Option<&str>, ip: Option<[u8; 4]>) -> Resp {
    send(&e.app, request("POST", "/api/v1/sessions", Auth::Anon, Some(&login_body(email, password, org)), ip)).await
}

async fn login(e: &Env, email: &str, password: &str) -> Resp {
    login_from(e, email, password, None, None).await
}

/// Delivers what is queued and returns every message `to` received, oldest first.
async fn mails_to(e: &Env, to: &str) -> Vec<OutgoingMail> {
    e.core.deliver_mail().await.unwrap();
    e.mailer.sent().into_iter().filter(|m| m.to == to).collect()
}

fn code_in(m: &OutgoingMail) -> Option<String> {
    m.text.split_whitespace().find(|w| w.len() == 6 && w.bytes().all(|b| b.is_ascii_digit())).map(str::to_owned)
}

/// The code in the newest message to `to`.
async fn code_for(e: &Env, to: &str) -> String {
    let mails = mails_to(e, to).await;
    let m = mails.last().unwrap_or_else(|| panic!("no mail to {to}"));
    code_in(m).unwrap_or_else(|| panic!("no code in the mail {:?} to {to}", m.subject))
}

async fn verify_code(e: &Env, path: &str, verification_id: &str, code: &str) -> Resp {
    call(e, "POST", path, Auth::Anon, Some(json!({"verification_id": verification_id, "code": code}))).await
}

async fn sign_in_at(e: &Env, email: &str, password: &str, org: Option<&str>) -> String {
    let r = login_from(e, email, password, org, None).await;
    assert_eq!(r.s, StatusCode::ACCEPTED, "{}", r.v);
    let code = code_for(e, email).await;
    let v = verify_code(e, "/api/v1/sessions/verify", &r.str("verification_id"), &code).await;
    assert_eq!(v.s, StatusCode::OK, "{}", v.v);
    r.str("session_token")
}

/// Logs in and verifies: a working session token.
async fn sign_in(e: &Env, email: &str, password: &str) -> String {
    sign_in_at(e, email, password, None).await
}

async fn current(e: &Env, token: &str) -> Resp {
    call(e, "GET", "/api/v1/sessions/current", Auth::Bearer(token), None).await
}

async fn audit_actions(e: &Env, org: &str) -> Vec<(String, String)> {
    let admin = admin_token(e).await;
    let r = call(e, "GET", &format!("/api/v1/organisations/{org}/audit-events?limit=500"), Auth::Bearer(&admin), None)
        .await;
    assert_eq!(r.s, StatusCode::OK, "{}", r.v);
    r.v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|ev| (ev["action"].as_str().unwrap().to_owned(), ev["outcome"].as_str().unwrap().to_owned()))
        .collect()
}

struct CreatedKey {
    id: String,
    key: String,
    secret: String,
}

/// Creates an API key with `session` and activates it with the emailed code.
async fn api_key(e: &Env, session: &str, owner: &str, body: Value) -> CreatedKey {
    let r = call(e, "POST", "/api/v1/api-keys", Auth::Bearer(session), Some(body)).await;
    assert_eq!(r.s, StatusCode::ACCEPTED, "{}", r.v);
    let code = code_for(e, owner).await;
    let v = verify_code(e, "/api/v1/api-keys/verify", &r.str("verification_id"), &code).await;
    assert_eq!(v.s, StatusCode::OK, "{}", v.v);
    assert_eq!(v.v["state"], "active");
    CreatedKey { id: r.str("id"), key: r.str("api_key"), secret: r.str("api_secret") }
}

// ---- 1. sessions -----------------------------------------------------------------------------

#[tokio::test]
async fn a_session_is_created_verified_refreshed_and_revoked() {
    let e = env().await;
    let f = acme(&e).await;
    let r = login(&e, ANN, PW).await;
    assert_eq!(r.s, StatusCode::ACCEPTED, "{}", r.v);
    assert_eq!(r.h.get(header::CACHE_CONTROL).unwrap(), "no-store");
    let token = r.str("session_token");
    let vid = r.str("verification_id");
    assert!(token.starts_with("pcs_"), "{token}");
    assert!(r.str("expires_at").ends_with('Z'), "RFC 3339: {}", r.v);
    let mails = mails_to(&e, ANN).await;
    assert_eq!(mails.len(), 1, "one mail with the code");
    let code = code_in(&mails[0]).unwrap();
    assert!(!mails[0].text.contains(&token), "the token never travels by mail");

    let c = current(&e, &token).await;
    assert_eq!(c.s, StatusCode::UNAUTHORIZED, "a pending token is not usable");
    assert!(c.err().contains("not verified"), "{}", c.err());

    let v = verify_code(&e, "/api/v1/sessions/verify", &vid, &code).await;
    assert_eq!(v.s, StatusCode::OK, "{}", v.v);
    assert_eq!(v.str("session_token"), token, "the token the login returned");
    assert_eq!(v.v["user"]["id"], f.ann.as_str());
    assert_eq!(v.v["user"]["email"], ANN);
    assert_eq!(v.v["roles"], json!(["payments:reader"]));
    assert_eq!(v.h.get(header::CACHE_CONTROL).unwrap(), "no-store");

    let c = current(&e, &token).await;
    assert_eq!(c.s, StatusCode::OK, "{}", c.v);
    assert_eq!(c.v["user_id"], f.ann.as_str());
    assert_eq!(c.v["organisation"], "acme");

    let r = call(&e, "POST", "/api/v1/sessions/refresh", Auth::Bearer(&token), None).await;
    assert_eq!(r.s, StatusCode::OK, "{}", r.v);
    let new = r.str("session_token");
    assert_ne!(new, token);
    assert_eq!(current(&e, &token).await.s, StatusCode::UNAUTHORIZED, "the old token died");
    assert_eq!(current(&e, &new).await.s, StatusCode::OK);
    let again = call(&e, "POST", "/api/v1/sessions/refresh", Auth::Bearer(&token), None).await;
    assert_eq!(again.s, StatusCode::UNAUTHORIZED, "a second refresh with the old token fails");
    assert_eq!(current(&e, &new).await.s, StatusCode::OK, "and does not hurt the new one");
    // Two refreshes racing with the same token: one wins, the other is refused.
    let race: Vec<Pending> = (0..2)
        .map(|_| {
            let app = e.app.clone();
            let req = request("POST", "/api/v1/sessions/refresh", Auth::Bearer(&new), None, None);
            Box::pin(async move { app.oneshot(req).await.unwrap() }) as Pending
        })
        .collect();
    let mut won = Vec::new();
    for resp in lockstep(race).await {
        let r = read(resp).await;
        match r.s {
            StatusCode::OK => won.push(r.str("session_token")),
            s => assert_eq!(s, StatusCode::UNAUTHORIZED, "{}", r.v),
        }
    }
    assert_eq!(won.len(), 1, "exactly one refresh wins");
    assert_eq!(current(&e, &new).await.s, StatusCode::UNAUTHORIZED);
    let new = won.pop().unwrap();
    assert_eq!(current(&e, &new).await.s, StatusCode::OK);

    let d = call(&e, "DELETE", "/api/v1/sessions/current", Auth::Bearer(&new), None).await;
    assert_eq!(d.s, StatusCode::NO_CONTENT);
    let c = current(&e, &new).await;
    assert_eq!(c.s, StatusCode::UNAUTHORIZED);
    assert!(c.err().contains("revoked"), "{}", c.err());

    let actions = audit_actions(&e, "acme").await;
    for a in ["session.login", "session.verify", "session.refresh", "session.revoke", "session.use_revoked"] {
        assert!(actions.iter().any(|(x, _)| x == a), "{a} missing from {actions:?}");
    }
    assert!(actions.iter().any(|(x, o)| x == "session.use_revoked" && o == "failure"));

    // Queryable: by action prefix and outcome.
    let admin = admin_token(&e).await;
    let q = "/api/v1/organisations/acme/audit-events?action=session.&outcome=failure";
    let r = call(&e, "GET", q, Auth::Bearer(&admin), None).await;
    assert_eq!(r.s, StatusCode::OK, "{}", r.v);
    let items = r.v["items"].as_array().unwrap();
    assert!(!items.is_empty());
    assert!(
        items.iter().all(|ev| ev["action"].as_str().unwrap().starts_with("session.") && ev["outcome"] == "failure")
    );
    let bad = call(&e, "GET", "/api/v1/organisations/acme/audit-events?colour=red", Auth::Bearer(&admin), None).await;
    assert_eq!(bad.s, StatusCode::BAD_REQUEST, "unknown query parameters are refused");
}

// ---- 2. codes --------------------------------------------------------------------------------

fn other_code(code: &str) -> &'static str {
    if code == "000000" { "000001" } else { "000000" }
}

#[tokio::test]
async fn codes_are_limited_single_use_and_expire() {
    let e = env().await;
    acme(&e).await;
    const VERIFY: &str = "/api/v1/sessions/verify";

    // Five wrong codes use up the verification: the right one is then refused too.
    let r = login(&e, ANN, PW).await;
    let (token, vid) = (r.str("session_token"), r.str("verification_id"));
    let code = code_for(&e, ANN).await;
    for left in (0..5).rev() {
        let v = verify_code(&e, VERIFY, &vid, other_code(&code)).await;
        assert_eq!(v.s, StatusCode::UNAUTHORIZED);
        assert!(v.err().contains(&format!("{left} tries left")), "{}", v.err());
    }
    let v = verify_code(&e, VERIFY, &vid, &code).await;
    assert_eq!(v.s, StatusCode::UNAUTHORIZED, "the 6th try fails even with the right code");
    assert!(v.err().contains("too many"), "{}", v.err());
    assert_eq!(current(&e, &token).await.s, StatusCode::UNAUTHORIZED, "the session stays pending");

    // A code works once.
    let r = login(&e, ANN, PW).await;
    let code = code_for(&e, ANN).await;
    assert_eq!(verify_code(&e, VERIFY, &r.str("verification_id"), &code).await.s, StatusCode::OK);
    let v = verify_code(&e, VERIFY, &r.str("verification_id"), &code).await;
    assert_eq!(v.s, StatusCode::UNAUTHORIZED);
    assert!(v.err().contains("already used"), "{}", v.err());

    // A code expires.
    let r = login(&e, ANN, PW).await;
    let code = code_for(&e, ANN).await;
    e.clock.advance(e.core.settings().auth.code_lifetime + 1);
    let v = verify_code(&e, VERIFY, &r.str("verification_id"), &code).await;
    assert_eq!(v.s, StatusCode::UNAUTHORIZED);
    assert!(v.err().contains("expired"), "{}", v.err());
    assert_eq!(current(&e, &r.str("session_token")).await.s, StatusCode::UNAUTHORIZED);

    // Malformed codes are 400, an unknown verification 401.
    let r = login(&e, ANN, PW).await;
    let vid = r.str("verification_id");
    let code = code_for(&e, ANN).await;
    for bad in ["abcdef", "12345", "12 456", ""] {
        let v = verify_code(&e, VERIFY, &vid, bad).await;
        assert_eq!(v.s, StatusCode::BAD_REQUEST, "{bad:?}: {}", v.v);
    }
    let v = verify_code(&e, VERIFY, "0192f0c0-0000-7000-8000-000000000000", &code).await;
    assert_eq!(v.s, StatusCode::UNAUTHORIZED);
    assert_eq!(verify_code(&e, VERIFY, &vid, &code).await.s, StatusCode::OK, "malformed tries cost no tries");
    // A session code does not verify an API key.
    let r = login(&e, ANN, PW).await;
    let code = code_for(&e, ANN).await;
    let v = verify_code(&e, "/api/v1/api-keys/verify", &r.str("verification_id"), &code).await;
    assert_eq!(v.s, StatusCode::UNAUTHORIZED);
}

// ---- 3. lifetimes ----------------------------------------------------------------------------

#[tokio::test]
async fn sessions_end_when_idle_or_at_their_absolute_lifetime() {
    let e = env_with(|s| {
        s.auth.session_idle_timeout = 300;
        s.auth.session_lifetime = 1000;
    })
    .await;
    acme(&e).await;

    // Used every 70 s: alive beyond the idle timeout; then unused past it: ended.
    let t = sign_in(&e, ANN, PW).await;
    for _ in 0..6 {
        e.clock.advance(70);
        let c = current(&e, &t).await;
        assert_eq!(c.s, StatusCode::OK, "{}", c.err());
    }
    e.clock.advance(301);
    let c = current(&e, &t).await;
    assert_eq!(c.s, StatusCode::UNAUTHORIZED);
    assert!(c.err().contains("idle"), "{}", c.err());

    // Used all the time, the session still ends at its absolute lifetime.
    let t = sign_in(&e, ANN, PW).await;
    let mut elapsed = 0;
    while elapsed + 70 < 1000 {
        e.clock.advance(70);
        elapsed += 70;
        assert_eq!(current(&e, &t).await.s, StatusCode::OK, "after {elapsed} s");
    }
    e.clock.advance(70);
    let c = current(&e, &t).await;
    assert_eq!(c.s, StatusCode::UNAUTHORIZED);
    assert!(c.err().contains("expired") && !c.err().contains("idle"), "{}", c.err());
    let r = call(&e, "POST", "/api/v1/sessions/refresh", Auth::Bearer(&t), None).await;
    assert_eq!(r.s, StatusCode::UNAUTHORIZED, "an ended session cannot be refreshed");
}

// ---- 4. no enumeration -----------------------------------------------------------------------

#[tokio::test]
async fn failed_logins_all_look_the_same() {
    let e = env().await;
    let f = acme(&e).await;
    let admin = admin_token(&e).await;
    let dora = add_user(&e, &admin, "acme", "dora@acme.test", &[]).await;
    let r = call(
        &e,
        "PATCH",
        &format!("/api/v1/organisations/acme/users/{dora}"),
        Auth::Bearer(&admin),
        Some(json!({"enabled": false})),
    )
    .await;
    assert_eq!(r.s, StatusCode::OK, "{}", r.v);

    let unknown = login(&e, "nobody@acme.test", PW).await;
    let wrong = login(&e, ANN, "wrong-password-123").await;
    let disabled = login(&e, "dora@acme.test", PW).await;
    for r in [&unknown, &wrong, &disabled] {
        assert_eq!(r.s, StatusCode::UNAUTHORIZED);
        assert_eq!(r.err(), unknown.err());
        assert_eq!(r.v["error_description"], unknown.v["error_description"]);
        assert_eq!(r.h.get(header::WWW_AUTHENTICATE), unknown.h.get(header::WWW_AUTHENTICATE));
    }
    assert!(mails_to(&e, ANN).await.is_empty() && mails_to(&e, "dora@acme.test").await.is_empty());
    assert_eq!(login(&e, " Ann@ACME.test ", PW).await.s, StatusCode::ACCEPTED, "addresses are case-insensitive");

    // The same address in two organisations: ambiguous without `organisation`.
    add_user(&e, &admin, "beta", ANN, &[]).await;
    let r = login(&e, ANN, PW).await;
    assert_eq!(r.s, StatusCode::UNAUTHORIZED);
    assert_eq!(r.err(), unknown.err(), "the same answer as an unknown address");
    let r = login_from(&e, ANN, PW, Some("nowhere"), None).await;
    assert_eq!((r.s, r.err()), (StatusCode::UNAUTHORIZED, unknown.err()));
    let r = login_from(&e, ANN, PW, Some("acme"), None).await;
    assert_eq!(r.s, StatusCode::ACCEPTED, "{}", r.v);
    let code = code_for(&e, ANN).await;
    let v = verify_code(&e, "/api/v1/sessions/verify", &r.str("verification_id"), &code).await;
    assert_eq!(v.v["user"]["id"], f.ann.as_str(), "the account of the named organisation");
    let t = sign_in_at(&e, ANN, PW, Some("beta")).await;
    assert_eq!(current(&e, &t).await.v["organisation"], "beta");
}

#[tokio::test]
async fn password_resets_do_not_reveal_accounts() {
    let e = env().await;
    acme(&e).await;
    let reset = |email: &str| {
        let (e, body) = (&e, json!({"email": email}));
        async move {
            let r = call(e, "POST", "/api/v1/password-reset", Auth::Anon, Some(body)).await;
            assert_eq!(r.s, StatusCode::ACCEPTED, "{}", r.v);
            r
        }
    };
    let known = reset(ANN).await;
    let unknown = reset("nobody@acme.test").await;
    assert_eq!(
        known.v.as_object().unwrap().keys().collect::<Vec<_>>(),
        unknown.v.as_object().unwrap().keys().collect::<Vec<_>>()
    );
    let code = code_for(&e, ANN).await;
    // Following up with a guessed code must not tell a real verification from a made-up one,
    // however often it is tried.
    for _ in 0..7 {
        let confirm = |r: &Resp| json!({"verification_id": r.str("verification_id"), "code": other_code(&code), "new_password": NEW_PW});
        let a = call(&e, "POST", "/api/v1/password-reset/confirm", Auth::Anon, Some(confirm(&known))).await;
        let b = call(&e, "POST", "/api/v1/password-reset/confirm", Auth::Anon, Some(confirm(&unknown))).await;
        assert_eq!((a.s, a.err()), (b.s, b.err()));
        assert_eq!(a.s, StatusCode::UNAUTHORIZED);
    }
    // The tries are used up: even the right code no longer resets the password.
    let body = json!({"verification_id": known.str("verification_id"), "code": code, "new_password": NEW_PW});
    let r = call(&e, "POST", "/api/v1/password-reset/confirm", Auth::Anon, Some(body)).await;
    assert_eq!(r.s, StatusCode::UNAUTHORIZED);
    assert_eq!(login(&e, ANN, NEW_PW).await.s, StatusCode::UNAUTHORIZED, "the password is unchanged");
}

// ---- 5. lockout and attempt limits -----------------------------------------------------------

#[tokio::test]
async fn repeated_failures_lock_the_account_for_a_while() {
    let e = env_with(|s| {
        s.auth.lockout_threshold = 3;
        s.auth.lockout_duration = 900;
        s.auth.attempts_per_account_per_minute = 100;
    })
    .await;
    let f = acme(&e).await;
    for _ in 0..3 {
        assert_eq!(login(&e, ANN, "wrong-password-123").await.s, StatusCode::UNAUTHORIZED);
    }
    let wrong = login(&e, ANN, "wrong-password-123").await;
    let right = login(&e, ANN, PW).await;
    assert_eq!(right.s, StatusCode::UNAUTHORIZED, "locked: even the right password is refused");
    assert_eq!(right.err(), wrong.err(), "and the answer gives nothing away");
    let mails = mails_to(&e, ANN).await;
    assert_eq!(mails.len(), 1, "{:?}", mails.iter().map(|m| &m.subject).collect::<Vec<_>>());
    assert!(mails[0].subject.contains(LOCKED_SUBJECT), "{}", mails[0].subject);
    let admin = admin_token(&e).await;
    let u = call(&e, "GET", &format!("/api/v1/organisations/acme/users/{}", f.ann), Auth::Bearer(&admin), None).await;
    assert!(u.v["locked_until"].as_i64().unwrap() > e.clock.now(), "{}", u.v);
    assert_eq!(login(&e, OLGA, PW).await.s, StatusCode::ACCEPTED, "other accounts are not affected");

    e.clock.advance(901);
    assert_eq!(login(&e, ANN, "wrong-password-123").await.s, StatusCode::UNAUTHORIZED);
    let r = login(&e, ANN, PW).await;
    assert_eq!(r.s, StatusCode::ACCEPTED, "the lock ended, and one wrong password does not lock again: {}", r.v);
    let code = code_for(&e, ANN).await;
    assert_eq!(verify_code(&e, "/api/v1/sessions/verify", &r.str("verification_id"), &code).await.s, StatusCode::OK);
}

#[tokio::test]
async fn login_attempts_are_limited_per_account() {
    let e = env_with(|s| s.auth.attempts_per_account_per_minute = 3).await;
    acme(&e).await;
    let a = Some([10, 0, 0, 1]);
    for _ in 0..3 {
        assert_eq!(login_from(&e, ANN, "wrong-password-123", None, a).await.s, StatusCode::UNAUTHORIZED);
    }
    let r = login_from(&e, ANN, PW, None, a).await;
    assert_eq!(r.s, StatusCode::TOO_MANY_REQUESTS, "the 4th attempt in a minute, even with the right password");
    let retry: u64 = r.h.get(header::RETRY_AFTER).unwrap().to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    assert_eq!(
        login_from(&e, ANN, PW, None, Some([10, 0, 0, 2])).await.s,
        StatusCode::TOO_MANY_REQUESTS,
        "the account's limit holds from any address"
    );
    assert_eq!(login_from(&e, OLGA, PW, None, Some([10, 0, 0, 2])).await.s, StatusCode::ACCEPTED);
    e.clock.advance(61);
    assert_eq!(login_from(&e, ANN, PW, None, a).await.s, StatusCode::ACCEPTED, "a new minute");
}

#[tokio::test]
async fn code_submissions_are_limited_per_account() {
    let e = env_with(|s| {
        s.auth.attempts_per_account_per_minute = 4;
        s.auth.attempts_per_ip_per_minute = 1000;
    })
    .await;
    acme(&e).await;
    // Two logins (the per-address login budget is 4), each with wrong codes: the account's
    // code budget is shared across its verifications.
    let mut statuses = Vec::new();
    for _ in 0..2 {
        let r = login(&e, ANN, PW).await;
        assert_eq!(r.s, StatusCode::ACCEPTED, "{}", r.v);
        let vid = r.str("verification_id");
        for _ in 0..3 {
            statuses.push(verify_code(&e, "/api/v1/sessions/verify", &vid, "000000").await.s);
        }
    }
    assert_eq!(statuses.iter().filter(|s| **s == StatusCode::UNAUTHORIZED).count(), 4, "{statuses:?}");
    assert_eq!(statuses.last(), Some(&StatusCode::TOO_MANY_REQUESTS), "{statuses:?}");
    e.clock.advance(61);
    let r = login(&e, ANN, PW).await;
    let code = code_for(&e, ANN).await;
    assert_eq!(verify_code(&e, "/api/v1/sessions/verify", &r.str("verification_id"), &code).await.s, StatusCode::OK);
}

#[tokio::test]
async fn login_attempts_are_limited_per_address() {
    let e = env_with(|s| s.auth.attempts_per_ip_per_minute = 3).await;
    acme(&e).await;
    let a = Some([10, 0, 0, 1]);
    for who in ["x@acme.test", "y@acme.test", "z@acme.test"] {
        assert_eq!(login_from(&e, who, PW, None, a).await.s, StatusCode::UNAUTHORIZED);
    }
    let r = login_from(&e, ANN, PW, None, a).await;
    assert_eq!(r.s, StatusCode::TOO_MANY_REQUESTS);
    assert!(r.h.contains_key(header::RETRY_AFTER));
    // Code guessing counts against the address too.
    let v = send(
        &e.app,
        request(
            "POST",
            "/api/v1/sessions/verify",
            Auth::Anon,
            Some(&json!({"verification_id": "x", "code": "123456"})),
            a,
        ),
    )
    .await;
    assert_eq!(v.s, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(login_from(&e, ANN, PW, None, Some([10, 0, 0, 2])).await.s, StatusCode::ACCEPTED);
}

// ---- 6. password hashing limit ---------------------------------------------------------------

type Pending = Pin<Box<dyn Future<Output = Response> + Send>>;

/// Drives `futs` in lockstep, without relying on timing: each round polls every unfinished one
/// (ascending, then descending in the next round) and then blocks the runtime thread long enough
/// for the I/O they started to finish, so every request advances one I/O step per round and
/// requests taking the same steps reach the same point in the same round. For the password
/// slot: the first to arrive takes it and hashes on a blocking thread, but gives it back only
/// when polled again, in the next round, where the others that arrived with it are polled
/// first, find it still taken and their zero-length wait elapsed: 429. (Eight logins over the
/// store's four connections guarantee that several arrive together.)
async fn lockstep(mut futs: Vec<Pending>) -> Vec<Response> {
    let mut out: Vec<Option<Response>> = futs.iter().map(|_| None).collect();
    let mut round = 0usize;
    std::future::poll_fn(|cx| {
        let mut order: Vec<usize> = (0..futs.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        round += 1;
        for i in order {
            if out[i].is_none()
                && let Poll::Ready(r) = futs[i].as_mut().poll(cx)
            {
                out[i] = Some(r);
            }
        }
        if out.iter().all(Option::is_some) {
            return Poll::Ready(());
        }
        assert!(round < 1000, "requests did not finish");
        std::thread::sleep(Duration::from_millis(100));
        cx.waker().wake_by_ref();
        Poll::Pending
    })
    .await;
    out.into_iter().map(Option::unwrap).collect()
}

#[tokio::test]
async fn password_hashing_beyond_the_limit_is_refused_with_429() {
    let e = env_with(|s| {
        s.auth.password_hash_concurrency = 1;
        s.auth.password_queue_wait_ms = 0;
    })
    .await;
    acme(&e).await;
    let admin = admin_token(&e).await;
    // Open the store's connections beforehand, so that every login takes the same steps.
    let warm: Vec<Pending> = (0..4)
        .map(|_| {
            let app = e.app.clone();
            let req = request("GET", "/api/v1/organisations/acme/users", Auth::Bearer(&admin), None, None);
            Box::pin(async move { app.oneshot(req).await.unwrap() }) as Pending
        })
        .collect();
    for r in lockstep(warm).await {
        assert_eq!(r.status(), StatusCode::OK);
    }
    tokio::time::sleep(Duration::from_millis(50)).await;

    let logins: Vec<Pending> = (0..8)
        .map(|_| {
            let app = e.app.clone();
            let req = request("POST", "/api/v1/sessions", Auth::Anon, Some(&login_body(ANN, PW, None)), None);
            Box::pin(async move { app.oneshot(req).await.unwrap() }) as Pending
        })
        .collect();
    let mut statuses = Vec::new();
    for resp in lockstep(logins).await {
        let r = read(resp).await;
        if r.s == StatusCode::TOO_MANY_REQUESTS {
            assert!(r.h.contains_key(header::RETRY_AFTER), "429 without Retry-After");
        }
        statuses.push(r.s);
    }
    assert!(statuses.iter().all(|s| [StatusCode::ACCEPTED, StatusCode::TOO_MANY_REQUESTS].contains(s)), "{statuses:?}");
    assert!(statuses.contains(&StatusCode::TOO_MANY_REQUESTS), "{statuses:?}");
    assert!(statuses.contains(&StatusCode::ACCEPTED), "{statuses:?}");
    // Once the slot is free again, logins work.
    assert_eq!(login(&e, ANN, PW).await.s, StatusCode::ACCEPTED);
}

// ---- 7. API keys -----------------------------------------------------------------------------

#[tokio::test]
async fn api_keys_are_activated_by_code_limited_to_their_owner_and_revocable() {
    let e = env().await;
    let f = acme(&e).await;
    let s = sign_in(&e, OLGA, PW).await;

    let r = call(&e, "POST", "/api/v1/api-keys", Auth::Bearer(&s), Some(json!({"name": "ci"}))).await;
    assert_eq!(r.s, StatusCode::ACCEPTED, "{}", r.v);
    assert_eq!(r.h.get(header::CACHE_CONTROL).unwrap(), "no-store");
    let (id, key, secret, vid) = (r.str("id"), r.str("api_key"), r.str("api_secret"), r.str("verification_id"));
    assert!(key.starts_with("pck_"), "{key}");
    assert_eq!(r.v["roles"], json!(["payments:reader", "portcullis:org-admin"]), "default: all the creator's roles");
    let mails = mails_to(&e, OLGA).await;
    let m = mails.last().unwrap();
    assert!(m.subject.contains("API key"), "{}", m.subject);
    assert!(!m.text.contains(&secret), "the secret never travels by mail");
    let code = code_in(m).unwrap();

    let pending = call(&e, "GET", "/api/v1/api-keys", Auth::Key(&key, &secret), None).await;
    assert_eq!(pending.s, StatusCode::UNAUTHORIZED);
    assert!(pending.err().contains("not activated"), "{}", pending.err());
    let v = verify_code(&e, "/api/v1/api-keys/verify", &vid, &code).await;
    assert_eq!(v.s, StatusCode::OK, "{}", v.v);
    let list = call(&e, "GET", "/api/v1/api-keys", Auth::Key(&key, &secret), None).await;
    assert_eq!(list.s, StatusCode::OK, "{}", list.v);
    let items = list.v["items"].as_array().unwrap();
    assert!(items.iter().any(|k| k["id"] == id.as_str() && k["state"] == "active"), "{}", list.v);
    assert!(!list.v.to_string().contains(&secret), "listing never shows the secret");
    let users = "/api/v1/organisations/acme/users";
    assert_eq!(call(&e, "GET", users, Auth::Key(&key, &secret), None).await.s, StatusCode::OK);
    let wrong =
        call(&e, "GET", users, Auth::Key(&key, "wrong-secret-0123456789abcdefghijklmnopqrstuvwxyz"), None).await;
    assert_eq!(wrong.s, StatusCode::UNAUTHORIZED);
    let no_secret = send(&e.app, Request::get(users).header("api-key", &key).body(Body::empty()).unwrap()).await;
    assert_eq!(no_secret.s, StatusCode::UNAUTHORIZED);
    let r = call(&e, "POST", "/api/v1/api-keys", Auth::Key(&key, &secret), Some(json!({"name": "k2"}))).await;
    assert_eq!(r.s, StatusCode::FORBIDDEN, "a key cannot mint keys: {}", r.v);

    // Roles beyond the creator's; an expiry in the past.
    let r =
        call(&e, "POST", "/api/v1/api-keys", Auth::Bearer(&s), Some(json!({"name": "x", "roles": ["payments:admin"]})))
            .await;
    assert_eq!(r.s, StatusCode::FORBIDDEN, "{}", r.v);
    let now = e.clock.now();
    let too_far = now + e.core.settings().auth.api_key_max_lifetime + 1;
    for past in [json!(now - 10), json!(now), json!("2020-01-01T00:00:00Z"), json!(too_far)] {
        let r = call(&e, "POST", "/api/v1/api-keys", Auth::Bearer(&s), Some(json!({"name": "x", "expires_at": past})))
            .await;
        assert_eq!(r.s, StatusCode::BAD_REQUEST, "{}", r.v);
    }

    // A key expires by the clock.
    let short =
        api_key(&e, &s, OLGA, json!({"name": "short", "roles": ["payments:reader"], "expires_at": now + 100})).await;
    assert_eq!(call(&e, "GET", "/api/v1/api-keys", Auth::Key(&short.key, &short.secret), None).await.s, StatusCode::OK);
    e.clock.advance(101);
    let r = call(&e, "GET", "/api/v1/api-keys", Auth::Key(&short.key, &short.secret), None).await;
    assert_eq!(r.s, StatusCode::UNAUTHORIZED);
    assert!(r.err().contains("expired"), "{}", r.err());

    // Revocation.
    let d = call(&e, "DELETE", &format!("/api/v1/api-keys/{id}"), Auth::Bearer(&s), None).await;
    assert_eq!(d.s, StatusCode::NO_CONTENT);
    let r = call(&e, "GET", "/api/v1/api-keys", Auth::Key(&key, &secret), None).await;
    assert_eq!(r.s, StatusCode::UNAUTHORIZED);
    assert!(r.err().contains("revoked"), "{}", r.err());
    let actions = audit_actions(&e, "acme").await;
    assert!(actions.iter().any(|(a, o)| a == "api_key.use_revoked" && o == "failure"), "{actions:?}");
    assert!(actions.iter().any(|(a, _)| a == "api_key.revoke"), "{actions:?}");

    // A key's roles are what it was given that its user still holds.
    let k = api_key(&e, &s, OLGA, json!({"name": "admin-key"})).await;
    assert_eq!(call(&e, "GET", users, Auth::Key(&k.key, &k.secret), None).await.s, StatusCode::OK);
    let admin = admin_token(&e).await;
    let path = format!("/api/v1/organisations/acme/users/{}/roles/portcullis:org-admin", f.olga);
    let r = call(&e, "DELETE", &path, Auth::Bearer(&admin), None).await;
    assert_eq!(r.s, StatusCode::OK, "{}", r.v);
    assert_eq!(call(&e, "GET", users, Auth::Key(&k.key, &k.secret), None).await.s, StatusCode::FORBIDDEN);
    assert_eq!(call(&e, "GET", users, Auth::Bearer(&s), None).await.s, StatusCode::FORBIDDEN, "the session too");
    assert_eq!(
        call(&e, "GET", "/api/v1/api-keys", Auth::Key(&k.key, &k.secret), None).await.s,
        StatusCode::OK,
        "the key itself still works"
    );
    let r = call(&e, "PUT", &path, Auth::Bearer(&admin), None).await;
    assert_eq!(r.s, StatusCode::OK, "{}", r.v);
    assert_eq!(call(&e, "GET", users, Auth::Key(&k.key, &k.secret), None).await.s, StatusCode::OK, "granted back");
    // Someone else's key cannot be revoked through /api/v1/api-keys.
    let ann = sign_in(&e, ANN, PW).await;
    let r = call(&e, "DELETE", &format!("/api/v1/api-keys/{}", k.id), Auth::Bearer(&ann), None).await;
    assert_eq!(r.s, StatusCode::NOT_FOUND);
    assert_eq!(call(&e, "GET", users, Auth::Key(&k.key, &k.secret), None).await.s, StatusCode::OK);
}

// ---- 8. admin API authentication -------------------------------------------------------------

#[tokio::test]
async fn sessions_and_api_keys_authenticate_the_admin_api_within_their_roles() {
    let e = env().await;
    let f = acme(&e).await;
    let olga = sign_in(&e, OLGA, PW).await;
    let acme_users = "/api/v1/organisations/acme/users";
    let beta_users = "/api/v1/organisations/beta/users";
    let r = call(&e, "GET", acme_users, Auth::Bearer(&olga), None).await;
    assert_eq!(r.s, StatusCode::OK, "{}", r.v);
    assert_eq!(r.v["items"].as_array().unwrap().len(), 2);
    assert_eq!(call(&e, "GET", beta_users, Auth::Bearer(&olga), None).await.s, StatusCode::FORBIDDEN);
    let k = api_key(&e, &olga, OLGA, json!({"name": "ops"})).await;
    assert_eq!(call(&e, "GET", acme_users, Auth::Key(&k.key, &k.secret), None).await.s, StatusCode::OK);
    assert_eq!(call(&e, "GET", beta_users, Auth::Key(&k.key, &k.secret), None).await.s, StatusCode::FORBIDDEN);
    let ann = sign_in(&e, ANN, PW).await;
    assert_eq!(call(&e, "GET", acme_users, Auth::Bearer(&ann), None).await.s, StatusCode::FORBIDDEN);
    let r =
        call(&e, "POST", "/api/v1/organisations", Auth::Bearer(&olga), Some(json!({"slug": "x", "name": "X"}))).await;
    assert_eq!(r.s, StatusCode::FORBIDDEN, "an organisation admin is no platform admin");

    // A session token is no client credential.
    for auth in [format!("Bearer {olga}"), base64_basic("session", &olga), base64_basic(&k.key, &k.secret)] {
        let req = Request::post("/oauth2/introspect")
            .header(header::AUTHORIZATION, auth)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Body::from(format!("token={olga}")))
            .unwrap();
        let r = send(&e.app, req).await;
        assert_eq!((r.s, r.v["error"].as_str()), (StatusCode::UNAUTHORIZED, Some("invalid_client")), "{}", r.v);
    }

    // Admins see and end a user's sessions.
    let ann2 = sign_in(&e, ANN, PW).await;
    let sessions = format!("/api/v1/organisations/acme/users/{}/sessions", f.ann);
    let r = call(&e, "GET", &sessions, Auth::Bearer(&olga), None).await;
    assert_eq!(r.s, StatusCode::OK, "{}", r.v);
    let items = r.v["items"].as_array().unwrap();
    assert_eq!(items.len(), 2, "{}", r.v);
    assert!(items.iter().all(|s| s["state"] == "active" && s["user_id"] == f.ann.as_str()));
    assert!(!r.v.to_string().contains(&ann) && !r.v.to_string().contains("token"), "no tokens listed");
    let id = current(&e, &ann).await.str("id");
    let r = call(&e, "DELETE", &format!("/api/v1/organisations/acme/sessions/{id}"), Auth::Bearer(&olga), None).await;
    assert_eq!(r.s, StatusCode::NO_CONTENT);
    assert_eq!(current(&e, &ann).await.s, StatusCode::UNAUTHORIZED);
    assert_eq!(current(&e, &ann2).await.s, StatusCode::OK, "the other session lives");
    let r = call(&e, "DELETE", &format!("/api/v1/organisations/beta/sessions/{id}"), Auth::Bearer(&olga), None).await;
    assert_eq!(r.s, StatusCode::FORBIDDEN);
    let admin = admin_token(&e).await;
    let r = call(&e, "DELETE", &format!("/api/v1/organisations/beta/sessions/{id}"), Auth::Bearer(&admin), None).await;
    assert_eq!(r.s, StatusCode::NOT_FOUND, "a session is ended through its own organisation only");
    let ann3 = sign_in(&e, ANN, PW).await;
    let r = call(&e, "DELETE", &sessions, Auth::Bearer(&admin), None).await;
    assert_eq!(r.s, StatusCode::OK, "{}", r.v);
    assert_eq!(r.v["revoked"], 2);
    assert_eq!(current(&e, &ann2).await.s, StatusCode::UNAUTHORIZED);
    assert_eq!(current(&e, &ann3).await.s, StatusCode::UNAUTHORIZED);
    assert_eq!(current(&e, &olga).await.s, StatusCode::OK, "other users keep theirs");
    let r = call(&e, "GET", &sessions, Auth::Bearer(&admin), None).await;
    assert!(r.v["items"].as_array().unwrap().iter().all(|s| s["state"] == "revoked"), "{}", r.v);

    // Users see and end their own sessions, and only theirs.
    let (a, b) = (sign_in(&e, ANN, PW).await, sign_in(&e, ANN, PW).await);
    let (a_id, b_id) = (current(&e, &a).await.str("id"), current(&e, &b).await.str("id"));
    let r = call(&e, "GET", "/api/v1/sessions", Auth::Bearer(&b), None).await;
    assert_eq!(r.s, StatusCode::OK, "{}", r.v);
    let items = r.v["items"].as_array().unwrap();
    assert!(items.iter().any(|s| s["id"] == b_id.as_str() && s["current"] == true), "{}", r.v);
    assert!(items.iter().any(|s| s["id"] == a_id.as_str() && s["current"] == false), "{}", r.v);
    assert!(items.iter().all(|s| s["user_id"] == f.ann.as_str()));
    let olga_id = current(&e, &olga).await.str("id");
    let r = call(&e, "DELETE", &format!("/api/v1/sessions/{olga_id}"), Auth::Bearer(&b), None).await;
    assert_eq!(r.s, StatusCode::NOT_FOUND);
    assert_eq!(current(&e, &olga).await.s, StatusCode::OK);
    let r = call(&e, "DELETE", &format!("/api/v1/sessions/{a_id}"), Auth::Bearer(&b), None).await;
    assert_eq!(r.s, StatusCode::NO_CONTENT);
    assert_eq!(current(&e, &a).await.s, StatusCode::UNAUTHORIZED);
    assert_eq!(current(&e, &b).await.s, StatusCode::OK);
    let r = call(&e, "GET", "/api/v1/sessions", Auth::Key(&k.key, &k.secret), None).await;
    assert_eq!(r.s, StatusCode::FORBIDDEN, "sessions are listed by a signed-in user");
}

#[tokio::test]
async fn an_admin_of_the_platform_organisation_cannot_take_over_a_platform_admin() {
    let e = env().await;
    const ROOT: &str = "admin@portcullis.local";
    const ROOT_PW: &str = "bootstrap-password-123";
    let admin = admin_token(&e).await;
    add_user(&e, &admin, "portcullis", "pat@portcullis.local", &["portcullis:org-admin"]).await;
    let pat = sign_in(&e, "pat@portcullis.local", PW).await;
    let r = call(&e, "GET", "/api/v1/organisations/portcullis/users?q=admin@", Auth::Bearer(&pat), None).await;
    assert_eq!(r.s, StatusCode::OK, "{}", r.v);
    let root = r.v["items"][0]["id"].as_str().unwrap().to_owned();
    assert_eq!(r.v["items"][0]["roles"], json!(["portcullis:admin"]));
    let user = format!("/api/v1/organisations/portcullis/users/{root}");

    let r = call(&e, "PATCH", &user, Auth::Bearer(&pat), Some(json!({"password": "taken-over-password"}))).await;
    assert_eq!(r.s, StatusCode::FORBIDDEN, "an organisation admin set a platform admin's password: {}", r.v);
    assert_eq!(login(&e, ROOT, "taken-over-password").await.s, StatusCode::UNAUTHORIZED);
    for (method, path, body) in [
        ("PATCH", user.clone(), Some(json!({"enabled": false}))),
        ("PATCH", user.clone(), Some(json!({"name": "mine"}))),
        ("DELETE", format!("{user}/roles/portcullis:admin"), None),
        ("PUT", format!("{user}/roles/portcullis:org-admin"), None),
        ("DELETE", user.clone(), None),
    ] {
        let r = call(&e, method, &path, Auth::Bearer(&pat), body).await;
        assert_eq!(r.s, StatusCode::FORBIDDEN, "{method} {path}: {}", r.v);
    }
    // The platform admin signs in as before and may manage the account.
    let t = sign_in(&e, ROOT, ROOT_PW).await;
    let r = call(&e, "GET", "/api/v1/organisations", Auth::Bearer(&t), None).await;
    assert_eq!(r.s, StatusCode::OK, "a platform admin's session works on the whole admin API");
    // Nor may the organisation admin look at or end the platform admin's sessions and keys.
    let key = api_key(&e, &t, ROOT, json!({"name": "root key"})).await;
    let sid = call(&e, "GET", "/api/v1/sessions/current", Auth::Bearer(&t), None).await.str("id");
    let org = "/api/v1/organisations/portcullis";
    for (method, path) in [
        ("GET", format!("{user}/sessions")),
        ("DELETE", format!("{user}/sessions")),
        ("DELETE", format!("{org}/sessions/{sid}")),
        ("DELETE", format!("{org}/api-keys/{}", key.id)),
    ] {
        let r = call(&e, method, &path, Auth::Bearer(&pat), None).await;
        assert_eq!(r.s, StatusCode::FORBIDDEN, "{method} {path}: {}", r.v);
    }
    assert_eq!(current(&e, &t).await.s, StatusCode::OK, "the platform admin's session lives on");
    let r = call(&e, "PATCH", &user, Auth::Bearer(&admin), Some(json!({"name": "Root"}))).await;
    assert_eq!(r.s, StatusCode::OK, "{}", r.v);
}

// ---- 9. users --------------------------------------------------------------------------------

#[tokio::test]
async fn admins_search_disable_and_delete_users() {
    let e = env().await;
    let f = acme(&e).await;
    let admin = admin_token(&e).await;
    let body = json!({"email": "Bob.Builder@Acme.test", "name": "Robert Builder", "password": PW});
    let r = call(&e, "POST", "/api/v1/organisations/acme/users", Auth::Bearer(&admin), Some(body)).await;
    assert_eq!(r.s, StatusCode::CREATED, "{}", r.v);
    let bob = r.str("id");
    const BOB: &str = "bob.builder@acme.test";
    let search = |q: &str| {
        let (e, admin) = (&e, admin.clone());
        let path = format!("/api/v1/organisations/acme/users?q={q}");
        async move {
            let r = call(e, "GET", &path, Auth::Bearer(&admin), None).await;
            assert_eq!(r.s, StatusCode::OK, "{}", r.v);
            let mut ids: Vec<String> =
                r.v["items"].as_array().unwrap().iter().map(|u| u["email"].as_str().unwrap().to_owned()).collect();
            ids.sort();
            ids
        }
    };
    assert_eq!(search("BUILDER").await, [BOB]);
    assert_eq!(search("robert").await, [BOB], "names are searched too");
    assert_eq!(search("acme.TEST").await, [ANN, BOB, OLGA]);
    assert_eq!(search("%25").await, Vec::<String>::new(), "wildcards are literal");
    assert!(search("zzz").await.is_empty());

    // Disabling ends every session at once and stops logins; enabling lets them in again.
    let t = sign_in(&e, BOB, PW).await;
    let k = api_key(&e, &t, BOB, json!({"name": "bob's"})).await;
    let user = format!("/api/v1/organisations/acme/users/{bob}");
    let r = call(&e, "PATCH", &user, Auth::Bearer(&admin), Some(json!({"enabled": false}))).await;
    assert_eq!((r.s, &r.v["enabled"]), (StatusCode::OK, &json!(false)), "{}", r.v);
    assert_eq!(current(&e, &t).await.s, StatusCode::UNAUTHORIZED);
    let r = call(&e, "GET", "/api/v1/api-keys", Auth::Key(&k.key, &k.secret), None).await;
    assert_eq!(r.s, StatusCode::UNAUTHORIZED, "a disabled user's keys do not work");
    assert!(r.err().contains("disabled"), "{}", r.err());
    assert_eq!(login(&e, BOB, PW).await.s, StatusCode::UNAUTHORIZED);
    let r = call(&e, "PATCH", &user, Auth::Bearer(&admin), Some(json!({"enabled": true}))).await;
    assert_eq!(r.s, StatusCode::OK);
    assert_eq!(current(&e, &t).await.s, StatusCode::UNAUTHORIZED, "ended sessions stay ended");
    let t = sign_in(&e, BOB, PW).await;

    // An admin setting a password ends the sessions too.
    let r = call(&e, "PATCH", &user, Auth::Bearer(&admin), Some(json!({"password": NEW_PW}))).await;
    assert_eq!(r.s, StatusCode::OK, "{}", r.v);
    assert!(r.v.get("password_hash").is_none() && !r.v.to_string().contains("argon2"), "{}", r.v);
    assert_eq!(current(&e, &t).await.s, StatusCode::UNAUTHORIZED);
    assert!(
        mails_to(&e, &BOB.to_lowercase()).await.iter().any(|m| m.subject.contains("password was changed")),
        "the owner is told that someone set their password"
    );
    assert_eq!(login(&e, BOB, PW).await.s, StatusCode::UNAUTHORIZED);
    let t = sign_in(&e, BOB, NEW_PW).await;
    let r = call(&e, "PATCH", &user, Auth::Bearer(&admin), Some(json!({"name": "Bob"}))).await;
    assert_eq!((r.s, &r.v["name"]), (StatusCode::OK, &json!("Bob")));
    assert_eq!(current(&e, &t).await.s, StatusCode::OK, "a name change ends nothing");

    // Roles.
    let role = format!("{user}/roles/payments:admin");
    let r = call(&e, "PUT", &role, Auth::Bearer(&admin), None).await;
    assert_eq!((r.s, &r.v["roles"]), (StatusCode::OK, &json!(["payments:admin"])), "{}", r.v);
    assert_eq!(current(&e, &t).await.v["roles"], json!(["payments:admin"]), "the session sees it at once");
    let r = call(&e, "PUT", &format!("{user}/roles/payments:nope"), Auth::Bearer(&admin), None).await;
    assert_eq!(r.s, StatusCode::BAD_REQUEST, "{}", r.v);
    let r = call(&e, "DELETE", &role, Auth::Bearer(&admin), None).await;
    assert_eq!((r.s, &r.v["roles"]), (StatusCode::OK, &json!([])));
    assert_eq!(call(&e, "DELETE", &role, Auth::Bearer(&admin), None).await.s, StatusCode::NOT_FOUND);
    // An organisation admin cannot make someone a platform admin.
    let olga = sign_in(&e, OLGA, PW).await;
    let r = call(&e, "PUT", &format!("{user}/roles/portcullis:admin"), Auth::Bearer(&olga), None).await;
    assert_eq!(r.s, StatusCode::FORBIDDEN, "{}", r.v);
    let r = call(
        &e,
        "PATCH",
        &format!("/api/v1/organisations/acme/users/{}", f.olga),
        Auth::Bearer(&olga),
        Some(json!({"enabled": false})),
    )
    .await;
    assert_eq!(r.s, StatusCode::CONFLICT, "nobody disables themselves");

    // Deleting.
    assert_eq!(call(&e, "DELETE", &user, Auth::Bearer(&olga), None).await.s, StatusCode::NO_CONTENT);
    assert_eq!(call(&e, "GET", &user, Auth::Bearer(&admin), None).await.s, StatusCode::NOT_FOUND);
    assert_eq!(call(&e, "DELETE", &user, Auth::Bearer(&admin), None).await.s, StatusCode::NOT_FOUND);
    assert_eq!(current(&e, &t).await.s, StatusCode::UNAUTHORIZED);
    assert_eq!(
        call(&e, "GET", "/api/v1/api-keys", Auth::Key(&k.key, &k.secret), None).await.s,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(login(&e, BOB, NEW_PW).await.s, StatusCode::UNAUTHORIZED);
    assert_eq!(search("builder").await, Vec::<String>::new());
}

// ---- 10. self-service ------------------------------------------------------------------------

#[tokio::test]
async fn users_manage_their_addresses_and_password() {
    // Many password checks for one account in one (manual-clock) minute: not what this tests.
    let e = env_with(|s| s.auth.attempts_per_account_per_minute = 100).await;
    let f = acme(&e).await;
    let t = sign_in(&e, ANN, PW).await;
    let me = call(&e, "GET", "/api/v1/me", Auth::Bearer(&t), None).await;
    assert_eq!(me.s, StatusCode::OK, "{}", me.v);
    assert_eq!(
        (me.str("id"), me.str("email"), me.str("organisation")),
        (f.ann.clone(), ANN.to_owned(), "acme".to_owned())
    );
    let emails = me.v["emails"].as_array().unwrap();
    assert_eq!(emails.len(), 1);
    assert_eq!(
        (&emails[0]["verified"], &emails[0]["primary"]),
        (&json!(true), &json!(true)),
        "verified by the login code"
    );
    let old_id = emails[0]["id"].as_str().unwrap().to_owned();

    // Add, verify, make primary.
    const NEW: &str = "ann.new@acme.test";
    let r = call(&e, "POST", "/api/v1/me/emails", Auth::Bearer(&t), Some(json!({"email": NEW}))).await;
    assert_eq!(r.s, StatusCode::ACCEPTED, "{}", r.v);
    let (new_id, vid) = (r.str("id"), r.str("verification_id"));
    let code = code_for(&e, NEW).await;
    let primary = |p: &str| Some(json!({"current_password": p}));
    let r = call(&e, "POST", &format!("/api/v1/me/emails/{new_id}/primary"), Auth::Bearer(&t), primary(PW)).await;
    assert_eq!(r.s, StatusCode::CONFLICT, "an unverified address cannot become primary");
    let r = verify_code(&e, "/api/v1/me/emails/verify", &vid, other_code(&code)).await;
    assert_eq!(r.s, StatusCode::UNAUTHORIZED);
    let r = verify_code(&e, "/api/v1/me/emails/verify", &vid, &code).await;
    assert_eq!((r.s, &r.v["verified"]), (StatusCode::OK, &json!(true)), "{}", r.v);
    let r = call(&e, "POST", "/api/v1/me/emails", Auth::Bearer(&t), Some(json!({"email": OLGA}))).await;
    assert_eq!(r.s, StatusCode::CONFLICT, "another user's address: {}", r.v);
    let path = format!("/api/v1/me/emails/{new_id}/primary");
    let r = call(&e, "POST", &path, Auth::Bearer(&t), None).await;
    assert_eq!(r.s, StatusCode::BAD_REQUEST, "the current password is required");
    let r = call(&e, "POST", &path, Auth::Bearer(&t), primary("wrong-password-123")).await;
    assert_eq!(r.s, StatusCode::FORBIDDEN, "a session alone cannot move the account to another mailbox");
    let r = call(&e, "POST", &path, Auth::Bearer(&t), primary(PW)).await;
    assert_eq!(r.s, StatusCode::NO_CONTENT);
    assert_eq!(call(&e, "GET", "/api/v1/me", Auth::Bearer(&t), None).await.str("email"), NEW);
    let notices = mails_to(&e, ANN).await;
    assert!(
        notices.iter().any(|m| m.subject.contains("sign-in address was changed") && m.text.contains(NEW)),
        "the previous address is told"
    );
    let t = sign_in(&e, NEW, PW).await;
    let r = call(&e, "DELETE", &format!("/api/v1/me/emails/{old_id}"), Auth::Bearer(&t), None).await;
    assert_eq!(r.s, StatusCode::NO_CONTENT);
    let r = call(&e, "DELETE", &format!("/api/v1/me/emails/{new_id}"), Auth::Bearer(&t), None).await;
    assert_eq!(r.s, StatusCode::CONFLICT, "the primary address stays");
    assert_eq!(login(&e, ANN, PW).await.s, StatusCode::UNAUTHORIZED, "the removed address no longer signs in");
    let emails = call(&e, "GET", "/api/v1/me", Auth::Bearer(&t), None).await.v["emails"].clone();
    assert_eq!(emails.as_array().unwrap().len(), 1, "{emails}");

    // Change the password.
    let body = |cur: &str| json!({"current_password": cur, "new_password": NEW_PW});
    let r = call(&e, "POST", "/api/v1/me/password", Auth::Bearer(&t), Some(body("wrong-password-123"))).await;
    assert_eq!(r.s, StatusCode::FORBIDDEN, "{}", r.v);
    assert_eq!(current(&e, &t).await.s, StatusCode::OK);
    let other = sign_in(&e, NEW, PW).await;
    let r = call(&e, "POST", "/api/v1/me/password", Auth::Bearer(&t), Some(body(PW))).await;
    assert_eq!(r.s, StatusCode::NO_CONTENT, "{}", r.v);
    assert_eq!(current(&e, &t).await.s, StatusCode::UNAUTHORIZED, "every session ends");
    assert_eq!(current(&e, &other).await.s, StatusCode::UNAUTHORIZED);
    assert_eq!(login(&e, NEW, PW).await.s, StatusCode::UNAUTHORIZED);
    let mails = mails_to(&e, NEW).await;
    assert!(
        mails.iter().any(|m| m.subject.contains(CHANGED_SUBJECT)),
        "{:?}",
        mails.iter().map(|m| &m.subject).collect::<Vec<_>>()
    );
    sign_in(&e, NEW, NEW_PW).await;

    // Reset by emailed code: an unknown address gets the same answer and no mail.
    let before = e.mailer.sent().len();
    let r = call(&e, "POST", "/api/v1/password-reset", Auth::Anon, Some(json!({"email": "nobody@acme.test"}))).await;
    assert_eq!(r.s, StatusCode::ACCEPTED, "{}", r.v);
    assert!(!r.str("verification_id").is_empty());
    assert_eq!(e.core.deliver_mail().await.unwrap(), 0);
    assert_eq!(e.mailer.sent().len(), before, "no mail for an unknown address");
    let v = call(
        &e,
        "POST",
        "/api/v1/password-reset/confirm",
        Auth::Anon,
        Some(json!({"verification_id": r.str("verification_id"), "code": "123456", "new_password": PW})),
    )
    .await;
    assert_eq!(v.s, StatusCode::UNAUTHORIZED);

    let live = sign_in(&e, NEW, NEW_PW).await;
    let r = call(&e, "POST", "/api/v1/password-reset", Auth::Anon, Some(json!({"email": NEW}))).await;
    assert_eq!(r.s, StatusCode::ACCEPTED, "{}", r.v);
    let vid = r.str("verification_id");
    let code = code_for(&e, NEW).await;
    let confirm = |code: String, pw: &str| json!({"verification_id": vid, "code": code, "new_password": pw});
    let v = call(&e, "POST", "/api/v1/password-reset/confirm", Auth::Anon, Some(confirm(code.clone(), "short"))).await;
    assert_eq!(v.s, StatusCode::BAD_REQUEST, "the policy applies");
    let v = call(
        &e,
        "POST",
        "/api/v1/password-reset/confirm",
        Auth::Anon,
        Some(confirm(code.clone(), "reset-passphrase-42")),
    )
    .await;
    assert_eq!(v.s, StatusCode::NO_CONTENT, "{}", v.v);
    assert_eq!(current(&e, &live).await.s, StatusCode::UNAUTHORIZED, "a reset ends the sessions");
    assert_eq!(login(&e, NEW, NEW_PW).await.s, StatusCode::UNAUTHORIZED, "the old password is refused");
    sign_in(&e, NEW, "reset-passphrase-42").await;
    let v =
        call(&e, "POST", "/api/v1/password-reset/confirm", Auth::Anon, Some(confirm(code, "yet-another-passphrase")))
            .await;
    assert_eq!(v.s, StatusCode::UNAUTHORIZED, "a reset code works once");
    let changed = mails_to(&e, NEW).await.iter().filter(|m| m.subject.contains(CHANGED_SUBJECT)).count();
    assert_eq!(changed, 2, "the change and the reset were both announced");

    // An API key is no signed-in user for the self-service endpoints.
    let t = sign_in(&e, NEW, "reset-passphrase-42").await;
    let k = api_key(&e, &t, NEW, json!({"name": "k"})).await;
    let r = call(
        &e,
        "POST",
        "/api/v1/me/password",
        Auth::Key(&k.key, &k.secret),
        Some(json!({"current_password": "reset-passphrase-42", "new_password": PW})),
    )
    .await;
    assert_eq!(r.s, StatusCode::FORBIDDEN, "{}", r.v);
}

// ---- 11. malformed input ---------------------------------------------------------------------

#[tokio::test]
async fn malformed_requests_are_refused_with_400_or_413() {
    let e = env().await;
    acme(&e).await;
    let t = sign_in(&e, ANN, PW).await;
    let raw = |method: &str, path: &str, ctype: Option<&str>, body: Vec<u8>, token: Option<&str>| {
        let mut b = Request::builder().method(method).uri(path);
        if let Some(c) = ctype {
            b = b.header(header::CONTENT_TYPE, c);
        }
        if let Some(t) = token {
            b = b.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        b.body(Body::from(body)).unwrap()
    };
    let json_ct = Some("application/json");
    for (path, token) in [
        ("/api/v1/sessions", None),
        ("/api/v1/sessions/verify", None),
        ("/api/v1/api-keys", Some(t.as_str())),
        ("/api/v1/me/password", Some(t.as_str())),
        ("/api/v1/password-reset", None),
    ] {
        let cases: [(Option<&str>, &[u8]); 5] = [
            (json_ct, b"{\"email\": "),
            (json_ct, b"{}"),
            (json_ct, b"[1, 2]"),
            (Some("text/plain"), b"{\"email\": \"ann@acme.test\", \"password\": \"x\"}"),
            (None, b"{\"email\": \"ann@acme.test\", \"password\": \"x\"}"),
        ];
        for (ctype, body) in cases {
            let r = send(&e.app, raw("POST", path, ctype, body.to_vec(), token)).await;
            assert_eq!(r.s, StatusCode::BAD_REQUEST, "{path} {ctype:?} {}: {}", String::from_utf8_lossy(body), r.v);
        }
    }
    let unknown = json!({"email": ANN, "password": PW, "remember_me": true});
    assert_eq!(call(&e, "POST", "/api/v1/sessions", Auth::Anon, Some(unknown)).await.s, StatusCode::BAD_REQUEST);
    let missing = json!({"email": ANN});
    let r = call(&e, "POST", "/api/v1/sessions", Auth::Anon, Some(missing)).await;
    assert_eq!(r.s, StatusCode::BAD_REQUEST);
    assert!(r.err().contains("password"), "names the missing field: {}", r.err());
    let r = call(&e, "POST", "/api/v1/sessions", Auth::Anon, Some(json!({"email": "not-an-address", "password": PW})))
        .await;
    assert_eq!(r.s, StatusCode::BAD_REQUEST);
    let r =
        call(&e, "POST", "/api/v1/api-keys", Auth::Bearer(&t), Some(json!({"name": "k", "expires_at": "soon"}))).await;
    assert_eq!(r.s, StatusCode::BAD_REQUEST);
    let r = call(&e, "POST", "/api/v1/api-keys", Auth::Bearer(&t), Some(json!({"name": ""}))).await;
    assert_eq!(r.s, StatusCode::BAD_REQUEST);
    let r = call(&e, "POST", "/api/v1/api-keys", Auth::Bearer(&t), Some(json!({"name": "k", "roles": ["nope"]}))).await;
    assert_eq!(r.s, StatusCode::BAD_REQUEST, "{}", r.v);

    let big = json!({"email": ANN, "password": "x".repeat(1024 * 1024 + 1)}).to_string().into_bytes();
    for (path, token) in [("/api/v1/sessions", None), ("/api/v1/me/emails", Some(t.as_str()))] {
        let r = send(&e.app, raw("POST", path, json_ct, big.clone(), token)).await;
        assert_eq!(r.s, StatusCode::PAYLOAD_TOO_LARGE, "{path}");
    }
    // No body was worth a login attempt: the account is not rate limited by any of this.
    assert_eq!(login(&e, ANN, PW).await.s, StatusCode::ACCEPTED);
    let r = call(&e, "GET", "/api/v1/sessions/current", Auth::Bearer("not-a-session-token"), None).await;
    assert_eq!(r.s, StatusCode::UNAUTHORIZED);
    assert_eq!(call(&e, "GET", "/api/v1/sessions/current", Auth::Anon, None).await.s, StatusCode::UNAUTHORIZED);
}

// ---- 12. mail queue --------------------------------------------------------------------------

#[tokio::test]
async fn undeliverable_mail_stays_queued_and_is_retried_after_its_backoff() {
    let flaky = Arc::new(std::sync::Mutex::new(None::<Arc<FlakyMailer>>));
    let keep = flaky.clone();
    let e = build(
        |_| {},
        move |inner| {
            let m = Arc::new(FlakyMailer { failures: 2, calls: AtomicUsize::new(0), inner });
            *keep.lock().unwrap() = Some(m.clone());
            m
        },
    )
    .await;
    let flaky = flaky.lock().unwrap().clone().unwrap();
    acme(&e).await;
    let store = e.core.store().clone();
    let r = login(&e, ANN, PW).await;
    assert_eq!(r.s, StatusCode::ACCEPTED);
    assert_eq!(store.pending_mail_count().await.unwrap(), 1);

    assert_eq!(e.core.deliver_mail().await.unwrap(), 0, "the first attempt fails");
    assert_eq!(flaky.calls.load(Ordering::SeqCst), 1);
    assert_eq!(store.pending_mail_count().await.unwrap(), 1, "still queued");
    e.clock.advance(9);
    assert_eq!(e.core.deliver_mail().await.unwrap(), 0);
    assert_eq!(flaky.calls.load(Ordering::SeqCst), 1, "not retried before its backoff");
    e.clock.advance(1);
    assert_eq!(e.core.deliver_mail().await.unwrap(), 0, "the second attempt fails too");
    assert_eq!(flaky.calls.load(Ordering::SeqCst), 2);
    e.clock.advance(29);
    assert_eq!(e.core.deliver_mail().await.unwrap(), 0);
    assert_eq!(flaky.calls.load(Ordering::SeqCst), 2, "the backoff grows");
    e.clock.advance(1);
    assert_eq!(e.core.deliver_mail().await.unwrap(), 1);
    assert_eq!(store.pending_mail_count().await.unwrap(), 0);
    assert_eq!(e.core.deliver_mail().await.unwrap(), 0, "sent once");
    let sent = e.mailer.sent();
    assert_eq!(sent.len(), 1);
    let code = code_in(&sent[0]).unwrap();
    let v = verify_code(&e, "/api/v1/sessions/verify", &r.str("verification_id"), &code).await;
    assert_eq!(v.s, StatusCode::OK, "the late code still works within its lifetime: {}", v.v);
}

// ---- 13. nothing secret in Debug -------------------------------------------------------------

#[tokio::test]
async fn debug_output_shows_no_secrets() {
    let e = env().await;
    let f = acme(&e).await;
    let req: LoginRequest = serde_json::from_value(json!({"email": ANN, "password": PW})).unwrap();
    let d = format!("{req:?}");
    assert!(d.contains(ANN) && !d.contains(PW), "{d}");
    let sub: CodeSubmission = serde_json::from_value(json!({"verification_id": "v1", "code": "918273"})).unwrap();
    let d = format!("{sub:?}");
    assert!(d.contains("v1") && !d.contains("918273"), "{d}");

    let ctx = RequestContext::default();
    let pending = e.core.login(&ctx, req, None).await.unwrap();
    let d = format!("{pending:?}");
    assert!(!d.contains(pending.session_token.expose_secret()), "{d}");
    assert!(!d.contains(&pending.session_token.expose_secret()[4..20]), "{d}");
    let code = code_for(&e, ANN).await;
    assert!(!d.contains(&code), "{d}");
    let sub = CodeSubmission { verification_id: pending.verification_id.clone(), code: SecretString::from(code) };
    let verified = e.core.verify_session(&ctx, sub).await.unwrap();
    let d = format!("{verified:?}");
    assert!(!d.contains(&verified.session_token.expose_secret()[4..20]), "{d}");

    let who = Principal {
        subject: f.ann.clone(),
        client_id: "session".into(),
        org: "acme".into(),
        roles: vec!["payments:reader".into()],
        scopes: vec![],
        credential: Credential::Session { id: "s".into() },
    };
    let req: NewApiKey = serde_json::from_value(json!({"name": "debug"})).unwrap();
    let created = e.core.create_api_key(&ctx, &who, req).await.unwrap();
    let d = format!("{created:?}");
    let secret = created.api_secret.expose_secret();
    assert!(!d.contains(secret) && !d.contains(&secret[..16]), "{d}");
    let code = code_for(&e, ANN).await;
    assert!(!d.contains(&code), "{d}");
    for m in e.mailer.sent() {
        let c = code_in(&m).unwrap();
        assert!(!m.subject.contains(&c), "subjects are stored in clear in the queue: {}", m.subject);
        assert!(!format!("{m:?}").contains(&c));
    }
    let events = e.core.store().audit_events(None, Page::new(Some(500), None)).await.unwrap();
    let all = serde_json::to_string(&events).unwrap();
    assert!(!all.contains(secret) && !all.contains(PW) && !all.contains(&code), "audit events hold no secrets");
}

// ---- limits on self-service and odd input ----------------------------------------------------

#[tokio::test]
async fn self_service_is_limited() {
    let e = env_with(|s| s.auth.attempts_per_account_per_minute = 3).await;
    acme(&e).await;
    let t = sign_in(&e, ANN, PW).await;
    // Guessing the current password counts like a login (the sign-in used one of three).
    let body = json!({"current_password": "wrong-password-123", "new_password": "another-password-456"});
    for _ in 0..2 {
        let r = call(&e, "POST", "/api/v1/me/password", Auth::Bearer(&t), Some(body.clone())).await;
        assert_eq!(r.s, StatusCode::FORBIDDEN, "{}", r.v);
    }
    let r = call(&e, "POST", "/api/v1/me/password", Auth::Bearer(&t), Some(body)).await;
    assert_eq!(r.s, StatusCode::TOO_MANY_REQUESTS, "{}", r.v);

    // Mail-sending self-service: ten an hour per user.
    for i in 0..5 {
        let r = call(&e, "POST", "/api/v1/me/emails", Auth::Bearer(&t), Some(json!({"email": format!("a{i}@x.test")})))
            .await;
        assert_eq!(r.s, StatusCode::ACCEPTED, "{}", r.v);
        let r = call(&e, "POST", "/api/v1/api-keys", Auth::Bearer(&t), Some(json!({"name": format!("k{i}")}))).await;
        assert_eq!(r.s, StatusCode::ACCEPTED, "{}", r.v);
    }
    let r = call(&e, "POST", "/api/v1/me/emails", Auth::Bearer(&t), Some(json!({"email": "one.more@x.test"}))).await;
    assert_eq!(r.s, StatusCode::TOO_MANY_REQUESTS, "{}", r.v);
    let r = call(&e, "POST", "/api/v1/api-keys", Auth::Bearer(&t), Some(json!({"name": "one more"}))).await;
    assert_eq!(r.s, StatusCode::TOO_MANY_REQUESTS, "{}", r.v);
    e.clock.advance(3601);
    let t = sign_in(&e, ANN, PW).await;
    let r = call(&e, "POST", "/api/v1/api-keys", Auth::Bearer(&t), Some(json!({"name": "next hour"}))).await;
    assert_eq!(r.s, StatusCode::ACCEPTED, "{}", r.v);
}

#[tokio::test]
async fn password_resets_are_limited_per_address_alike_for_unknown_ones() {
    let e = env_with(|s| s.auth.attempts_per_account_per_minute = 100).await;
    acme(&e).await;
    for who in [ANN, "nobody@acme.test"] {
        for _ in 0..3 {
            let r = call(&e, "POST", "/api/v1/password-reset", Auth::Anon, Some(json!({"email": who}))).await;
            assert_eq!(r.s, StatusCode::ACCEPTED, "{who}: {}", r.v);
        }
        let r = call(&e, "POST", "/api/v1/password-reset", Auth::Anon, Some(json!({"email": who}))).await;
        assert_eq!(r.s, StatusCode::TOO_MANY_REQUESTS, "{who}: the fourth in 15 minutes");
    }
}

#[tokio::test]
async fn nul_bytes_are_refused_with_400_not_500() {
    let e = env().await;
    acme(&e).await;
    let admin = admin_token(&e).await;
    for path in ["/api/v1/organisations/acme/users?q=%00", "/api/v1/organisations/acme/users/a%00b"] {
        let r = call(&e, "GET", path, Auth::Bearer(&admin), None).await;
        assert_eq!(r.s, StatusCode::BAD_REQUEST, "{path}: {}", r.v);
    }
    let r = verify_code(&e, "/api/v1/sessions/verify", "abc\u{0}def", "123456").await;
    assert_eq!(r.s, StatusCode::BAD_REQUEST, "{}", r.v);
    let r = call(
        &e,
        "POST",
        "/api/v1/sessions",
        Auth::Anon,
        Some(json!({"email": ANN, "password": PW, "organisation": "ac\u{0}me"})),
    )
    .await;
    assert_eq!(r.s, StatusCode::BAD_REQUEST, "{}", r.v);
}

#[tokio::test]
async fn only_the_newest_reset_code_works() {
    let e = env().await;
    acme(&e).await;
    let ask = || call(&e, "POST", "/api/v1/password-reset", Auth::Anon, Some(json!({"email": ANN})));
    let first = ask().await;
    assert_eq!(first.s, StatusCode::ACCEPTED);
    let first_code = code_for(&e, ANN).await;
    let second = ask().await;
    let second_code = code_for(&e, ANN).await;
    let confirm = |vid: String, code: String| {
        call(
            &e,
            "POST",
            "/api/v1/password-reset/confirm",
            Auth::Anon,
            Some(json!({"verification_id": vid, "code": code, "new_password": "a-brand-new-password"})),
        )
    };
    let r = confirm(first.str("verification_id"), first_code).await;
    assert_eq!(r.s, StatusCode::UNAUTHORIZED, "the older code was replaced: {}", r.v);
    let r = confirm(second.str("verification_id"), second_code).await;
    assert_eq!(r.s, StatusCode::NO_CONTENT, "{}", r.v);
}
