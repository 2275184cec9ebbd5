#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
//! Crash safety end to end: the real `portcullis serve` under concurrent load from several
//! tasks, killed with SIGKILL at random points and restarted on the same data directory
//! (SQLite) or database (PostgreSQL), three times per backend. Every request that got a
//! success answer is recorded with what it created; after each restart all of it must still
//! be true: clients authenticate, users exist, sessions validate, API keys work, certificates
//! are in the inventory with their serials and revoked ones in the CRL (read by `openssl crl`),
//! revoked access tokens stay revoked, accepted `private_key_jwt` assertions are refused as
//! replays, an issued refresh token works and a spent one is refused (and revokes its family).
//! No serial appears twice; the signing key (`kid`) and the CA are those of the first start.
//! SQLite passes `PRAGMA integrity_check` after every kill. (A process kill leaves the OS's
//! page cache intact: power loss is what `synchronous = FULL` is for, see docs/operations.md.)
//!
//! A full disk: a SQLite data directory, and a throwaway PostgreSQL's data directory (its WAL
//! on the ordinary disk), on a small tmpfs mounted by the test — which must run as root: it
//! fails, it does not skip, otherwise. Writes answer 507 (503 `temporarily_unavailable` on
//! OAuth endpoints) with `x-error`, `x-error-id` and `Retry-After`, and keep nothing; reads and
//! tokens keep working; `/readyz` reports `"storage": "full"`; once space is freed, writes
//! succeed again without a restart.
//!
//! The random choices come from a seed printed at the start; `CRASH_E2E_SEED=<n>` replays it.

#[allow(dead_code)]
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use serde_json::{Value, json};
use tokio::task::JoinSet;

use support::{
    ADMIN_ID, ADMIN_SECRET, Client, Cred, PgDb, Resp, Server, admin_token, create_acme_payments, http,
    http_no_redirects, random_hex, send, six_digit_numbers, token_request,
};

const DEFAULT_PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// Kills per backend.
const ROUNDS: usize = 3;
/// Tasks sending requests at once.
const WORKERS: usize = 4;
/// Certificate signing requests made up front per round (more than a round can use).
const CSRS_PER_ROUND: usize = 64;
/// The redirect URI of the code-flow application `acme$web`.
const WEB_REDIRECT: &str = "https://web.acme.test/cb";
/// How long an emailed code may take to show up in the log.
const CODE_TIMEOUT: Duration = Duration::from_secs(10);

/// Generous attempt limits: the load comes from one address.
const LIMITS: [(&str, &str); 3] = [
    ("PORTCULLIS_CLIENTS__AUTH_FAILURES_PER_MINUTE", "100000"),
    ("PORTCULLIS_AUTH__ATTEMPTS_PER_IP_PER_MINUTE", "100000"),
    ("PORTCULLIS_AUTH__ATTEMPTS_PER_ACCOUNT_PER_MINUTE", "1000"),
];

/// The wall clock, for assertion times (a test of the real binary has no injected clock).
#[allow(clippy::disallowed_methods)]
fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

// ----------------------------------------------------------------------------- randomness --

/// xorshift64*: reproducible from the printed seed.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn seed() -> u64 {
    let seed = std::env::var("CRASH_E2E_SEED")
        .ok()
        .map(|s| s.parse().expect("CRASH_E2E_SEED is a number"))
        .unwrap_or_else(|| u64::from_str_radix(&random_hex(8), 16).unwrap());
    eprintln!("crash_e2e seed: {seed} (CRASH_E2E_SEED={seed} replays the same choices)");
    seed
}

// ---------------------------------------------------------------------------------- HTTP --

/// Sends a request that may die with the server: `None` when no complete answer came back.
/// An answer that did come is checked like every answer: never a 5xx, every refusal with
/// `x-error` and `x-error-id`.
async fn try_send(rb: reqwest::RequestBuilder) -> Option<Resp> {
    let r = answer(rb).await?;
    assert!(r.status < 500, "server error {} under load: {}", r.status, r.text);
    Some(r)
}

/// Like [`try_send`], but a 5xx is an answer too (the full disk).
async fn answer(rb: reqwest::RequestBuilder) -> Option<Resp> {
    let r = rb.send().await.ok()?;
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let text = r.text().await.ok()?;
    let json = serde_json::from_str(&text).unwrap_or(Value::Null);
    if status >= 400 {
        for h in ["x-error", "x-error-id"] {
            assert!(headers.contains_key(h), "{status} without {h}: {headers:?} {text}");
        }
    }
    Some(Resp { status, headers, text, json })
}

/// The decoded JSON of a compact JWS's header.
fn jws_header(token: &str) -> Value {
    let h = token.split('.').next().unwrap();
    serde_json::from_slice(&B64URL.decode(h).unwrap()).unwrap()
}

/// Runs `f` on every item, at most 16 at a time; a failure anywhere fails the test.
async fn for_all<T, F, Fut>(items: Vec<T>, f: F)
where
    T: Send + 'static,
    F: Fn(T) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let permits = Arc::new(tokio::sync::Semaphore::new(16));
    let mut set = JoinSet::new();
    for item in items {
        let permit = permits.clone().acquire_owned().await.unwrap();
        let fut = f(item);
        set.spawn(async move {
            fut.await;
            drop(permit);
        });
    }
    while let Some(r) = set.join_next().await {
        if let Err(e) = r {
            std::panic::resume_unwind(e.into_panic());
        }
    }
}

// ------------------------------------------------------------------------------ keys, JWT --

/// A new P-256 key and a CSR for `CN=<client id>, O=acme`, made in process (rcgen).
fn csr(client_id: &str) -> (rcgen::KeyPair, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, client_id);
    dn.push(rcgen::DnType::OrganizationName, "acme");
    params.distinguished_name = dn;
    let pem = params.serialize_request(&key).unwrap().pem().unwrap();
    (key, pem)
}

/// The `private_key_jwt` client `acme$signer` and the key of its signing certificate.
struct Signer {
    key: EcdsaKeyPair,
    kid: String,
    client_id: String,
}

impl Signer {
    /// A fresh client assertion (new `jti`, valid four minutes) for the issuer `aud`.
    fn assertion(&self, aud: &str) -> String {
        let header = json!({ "alg": "ES256", "kid": self.kid, "typ": "JWT" });
        let t = now();
        let claims = json!({
            "iss": self.client_id, "sub": self.client_id, "aud": aud,
            "iat": t, "exp": t + 240, "jti": random_hex(16),
        });
        let input = format!(
            "{}.{}",
            B64URL.encode(serde_json::to_vec(&header).unwrap()),
            B64URL.encode(serde_json::to_vec(&claims).unwrap())
        );
        let sig = self.key.sign(&SystemRandom::new(), input.as_bytes()).unwrap();
        format!("{input}.{}", B64URL.encode(sig.as_ref()))
    }
}

fn assertion_form(assertion: &str) -> [(&'static str, &str); 3] {
    [("grant_type", "client_credentials"), ("client_assertion_type", JWT_BEARER), ("client_assertion", assertion)]
}

// --------------------------------------------------------------------------- what was acked --

#[derive(Debug, Clone)]
struct User {
    id: String,
    email: String,
    password: String,
}

#[derive(Debug, Clone)]
struct Session {
    token: String,
    email: String,
}

#[derive(Debug, Clone)]
struct Cert {
    id: String,
    serial: String,
}

/// A refresh-token family of `acme$web`.
#[derive(Debug, Clone)]
struct Family {
    /// The newest refresh token an answer handed out.
    current: String,
    /// Tokens whose rotation was answered: each is spent.
    used: Vec<String>,
    /// A rotation got no answer: whether `current` was spent is unknown.
    in_doubt: bool,
}

/// Everything a success answer said was created, over all rounds (families: this round's).
#[derive(Debug, Default)]
struct Acked {
    clients: Vec<(String, String)>,
    users: Vec<User>,
    /// Acknowledged users nobody signed in as yet (each signs in once: its code is then the
    /// only one of its kind in the log).
    fresh_users: Vec<User>,
    sessions: Vec<Session>,
    /// Sessions whose user has not made an API key yet.
    keyless_sessions: Vec<Session>,
    api_keys: Vec<(String, String)>,
    certs: Vec<Cert>,
    /// Acknowledged certificates no revocation was tried on.
    revocable: Vec<Cert>,
    revoked: Vec<Cert>,
    revoked_tokens: Vec<String>,
    assertions: Vec<String>,
    families: Vec<Family>,
    /// What the load tried and got, by operation and outcome, for the report.
    tally: BTreeMap<String, u64>,
}

impl Acked {
    fn count(&mut self, op: &str, outcome: &str) {
        *self.tally.entry(format!("{op}: {outcome}")).or_default() += 1;
    }
}

// ---------------------------------------------------------------------------------- load --

/// What the load tasks share.
struct Load {
    http: reqwest::Client,
    base: String,
    admin: String,
    acked: Arc<Mutex<Acked>>,
    csrs: Mutex<Vec<String>>,
    signer: Arc<Signer>,
    web_secret: String,
    log: Arc<Mutex<String>>,
    stop: AtomicBool,
    seq: AtomicU64,
    tag: String,
}

#[derive(Debug, Clone, Copy)]
enum Op {
    CreateApp,
    CreateUser,
    Login,
    ApiKey,
    Issue,
    Revoke,
    RevokeToken,
    Assertion,
    Refresh,
}

const OPS: [(Op, u64); 9] = [
    (Op::CreateApp, 3),
    (Op::CreateUser, 3),
    (Op::Login, 2),
    (Op::ApiKey, 2),
    (Op::Issue, 4),
    (Op::Revoke, 2),
    (Op::RevokeToken, 2),
    (Op::Assertion, 3),
    (Op::Refresh, 3),
];

impl Load {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
    fn unique(&self, what: &str) -> String {
        format!("{what}-{}-{}", self.tag, self.seq.fetch_add(1, Ordering::Relaxed))
    }
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
    fn count(&self, op: Op, outcome: &str) {
        self.acked.lock().unwrap().count(&format!("{op:?}"), outcome);
    }
    fn admin_post(&self, path: &str, body: &Value) -> reqwest::RequestBuilder {
        self.http.post(self.url(path)).bearer_auth(&self.admin).json(body)
    }

    /// The code the server logged for `email` (no SMTP is configured), waiting for it.
    async fn code(&self, email: &str, kind: &str) -> Option<String> {
        let deadline = Instant::now() + CODE_TIMEOUT;
        let to = format!("to={email} ");
        let kind = format!("kind=\"{kind}\"");
        loop {
            let found = {
                let log = self.log.lock().unwrap();
                log.lines()
                    .filter(|l| l.contains("no SMTP configured") && l.contains(&to) && l.contains(&kind))
                    .filter_map(|l| l.split("code=").nth(1).map(six_digit_numbers))
                    .filter_map(|codes| codes.into_iter().next())
                    .next_back()
            };
            if found.is_some() {
                return found;
            }
            if self.stopped() {
                return None;
            }
            assert!(Instant::now() < deadline, "no code for {email} ({kind}) in the log within {CODE_TIMEOUT:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Runs one operation; records what a success answer acknowledged.
    async fn run(&self, op: Op) {
        match op {
            Op::CreateApp => self.create_app().await,
            Op::CreateUser => self.create_user().await,
            Op::Login => self.login().await,
            Op::ApiKey => self.api_key().await,
            Op::Issue => self.issue().await,
            Op::Revoke => self.revoke().await,
            Op::RevokeToken => self.revoke_token().await,
            Op::Assertion => self.assertion().await,
            Op::Refresh => self.refresh().await,
        }
    }

    /// Counts an answer that is neither the success nor a connection cut by the kill.
    fn unexpected(&self, op: Op, r: &Resp) {
        self.count(op, &format!("{} {}", r.status, r.x_error()));
        // 429 (the password-hashing queue is full) is the one refusal load may cause.
        assert_eq!(r.status, 429, "{op:?} refused unexpectedly: {} {:?} {}", r.status, r.x_error(), r.text);
    }

    async fn create_app(&self) {
        let slug = self.unique("app");
        let body = json!({ "slug": slug, "name": slug, "scopes": ["payments/read"] });
        let Some(r) = try_send(self.admin_post("/api/v1/organisations/acme/applications", &body)).await else {
            return self.count(Op::CreateApp, "no answer");
        };
        if r.status != 201 {
            return self.unexpected(Op::CreateApp, &r);
        }
        let mut a = self.acked.lock().unwrap();
        a.clients.push((r.str("client_id"), r.str("client_secret")));
        a.count("CreateApp", "201");
    }

    async fn create_user(&self) {
        let name = self.unique("user");
        let email = format!("{name}@acme.test");
        let password = format!("{name}-pw-{}", random_hex(8));
        let body = json!({ "email": email, "name": name, "password": password, "roles": ["payments:reader"] });
        let Some(r) = try_send(self.admin_post("/api/v1/organisations/acme/users", &body)).await else {
            return self.count(Op::CreateUser, "no answer");
        };
        if r.status != 201 {
            return self.unexpected(Op::CreateUser, &r);
        }
        let u = User { id: r.str("id"), email, password };
        let mut a = self.acked.lock().unwrap();
        a.users.push(u.clone());
        a.fresh_users.push(u);
        a.count("CreateUser", "201");
    }

    /// Login (202 and a code) then verification (200): a session.
    async fn login(&self) {
        let Some(u) = self.acked.lock().unwrap().fresh_users.pop() else { return self.create_user().await };
        let body = json!({ "email": u.email, "password": u.password });
        let Some(r) = try_send(self.http.post(self.url("/api/v1/sessions")).json(&body)).await else {
            return self.count(Op::Login, "no answer");
        };
        if r.status != 202 {
            return self.unexpected(Op::Login, &r);
        }
        let Some(code) = self.code(&u.email, "login_code").await else {
            return self.count(Op::Login, "killed before the code");
        };
        let body = json!({ "verification_id": r.str("verification_id"), "code": code });
        let Some(v) = try_send(self.http.post(self.url("/api/v1/sessions/verify")).json(&body)).await else {
            return self.count(Op::Login, "no answer to verify");
        };
        if v.status != 200 {
            return self.unexpected(Op::Login, &v);
        }
        let s = Session { token: v.str("session_token"), email: u.email };
        let mut a = self.acked.lock().unwrap();
        a.sessions.push(s.clone());
        a.keyless_sessions.push(s);
        a.count("Login", "200");
    }

    /// An API key made with a session (202 and a code), activated (200).
    async fn api_key(&self) {
        let Some(s) = self.acked.lock().unwrap().keyless_sessions.pop() else { return self.login().await };
        let body = json!({ "name": self.unique("key") });
        let rb = self.http.post(self.url("/api/v1/api-keys")).bearer_auth(&s.token).json(&body);
        let Some(r) = try_send(rb).await else { return self.count(Op::ApiKey, "no answer") };
        if r.status != 202 {
            return self.unexpected(Op::ApiKey, &r);
        }
        let Some(code) = self.code(&s.email, "api_key_code").await else {
            return self.count(Op::ApiKey, "killed before the code");
        };
        let body = json!({ "verification_id": r.str("verification_id"), "code": code });
        let Some(v) = try_send(self.http.post(self.url("/api/v1/api-keys/verify")).json(&body)).await else {
            return self.count(Op::ApiKey, "no answer to verify");
        };
        if v.status != 200 {
            return self.unexpected(Op::ApiKey, &v);
        }
        assert_eq!(v.json["state"], "active", "{}", v.text);
        let mut a = self.acked.lock().unwrap();
        a.api_keys.push((r.str("api_key"), r.str("api_secret")));
        a.count("ApiKey", "200");
    }

    async fn issue(&self) {
        let Some(csr) = self.csrs.lock().unwrap().pop() else { return self.assertion().await };
        let body = json!({ "type": "transport", "application": "certs", "csr": csr });
        let Some(r) = try_send(self.admin_post("/api/v1/organisations/acme/certificates", &body)).await else {
            return self.count(Op::Issue, "no answer");
        };
        if r.status != 201 {
            return self.unexpected(Op::Issue, &r);
        }
        let c = Cert { id: r.str("id"), serial: r.str("serial") };
        let mut a = self.acked.lock().unwrap();
        a.certs.push(c.clone());
        a.revocable.push(c);
        a.count("Issue", "201");
    }

    async fn revoke(&self) {
        let Some(c) = self.acked.lock().unwrap().revocable.pop() else { return self.issue().await };
        let path = format!("/api/v1/organisations/acme/certificates/{}/revoke", c.id);
        let Some(r) = try_send(self.admin_post(&path, &json!({ "reason": "key_compromise" }))).await else {
            // Revoked or not: either is right after the restart.
            return self.count(Op::Revoke, "no answer");
        };
        if r.status != 200 {
            return self.unexpected(Op::Revoke, &r);
        }
        let mut a = self.acked.lock().unwrap();
        a.revoked.push(c);
        a.count("Revoke", "200");
    }

    /// An access token of an acknowledged client, revoked (RFC 7009).
    async fn revoke_token(&self) {
        let client = {
            let a = self.acked.lock().unwrap();
            a.clients.get(self.seq.fetch_add(1, Ordering::Relaxed) as usize % a.clients.len().max(1)).cloned()
        };
        let Some((id, secret)) = client else { return self.create_app().await };
        let rb = self.http.post(self.url("/oauth2/token")).basic_auth(&id, Some(&secret));
        let Some(t) = try_send(rb.form(&[("grant_type", "client_credentials")])).await else {
            return self.count(Op::RevokeToken, "no answer to the token request");
        };
        if t.status != 200 {
            return self.unexpected(Op::RevokeToken, &t);
        }
        let token = t.str("access_token");
        let rb = self.http.post(self.url("/oauth2/revoke")).basic_auth(&id, Some(&secret));
        let Some(r) = try_send(rb.form(&[("token", token.as_str())])).await else {
            return self.count(Op::RevokeToken, "no answer");
        };
        if r.status != 200 {
            return self.unexpected(Op::RevokeToken, &r);
        }
        let mut a = self.acked.lock().unwrap();
        a.revoked_tokens.push(token);
        a.count("RevokeToken", "200");
    }

    async fn assertion(&self) {
        let jwt = self.signer.assertion(&self.base);
        let Some(r) = try_send(self.http.post(self.url("/oauth2/token")).form(&assertion_form(&jwt))).await else {
            return self.count(Op::Assertion, "no answer");
        };
        if r.status != 200 {
            return self.unexpected(Op::Assertion, &r);
        }
        let mut a = self.acked.lock().unwrap();
        a.assertions.push(jwt);
        a.count("Assertion", "200");
    }

    /// Rotates the refresh token of a family that is not in doubt, or starts a family.
    async fn refresh(&self) {
        let family = {
            let mut a = self.acked.lock().unwrap();
            let at = a.families.iter().position(|f| !f.in_doubt);
            at.map(|i| a.families.swap_remove(i))
        };
        let Some(mut f) = family else { return self.new_family().await };
        let rb = self.http.post(self.url("/oauth2/token")).basic_auth("acme$web", Some(&self.web_secret));
        let answer = try_send(rb.form(&[("grant_type", "refresh_token"), ("refresh_token", f.current.as_str())])).await;
        let outcome = match answer {
            None => {
                f.in_doubt = true;
                "no answer".to_owned()
            }
            Some(r) if r.status == 200 => {
                let next = r.str("refresh_token");
                f.used.push(std::mem::replace(&mut f.current, next));
                "200".to_owned()
            }
            Some(r) => {
                self.acked.lock().unwrap().families.push(f);
                return self.unexpected(Op::Refresh, &r);
            }
        };
        let mut a = self.acked.lock().unwrap();
        a.families.push(f);
        a.count("Refresh", &outcome);
    }

    /// The authorization code flow for `acme$web`, signed in through an acknowledged session
    /// (the SSO cookie is the session token), with `offline_access`: a new family.
    async fn new_family(&self) {
        let session = {
            let a = self.acked.lock().unwrap();
            a.sessions.get(self.seq.fetch_add(1, Ordering::Relaxed) as usize % a.sessions.len().max(1)).cloned()
        };
        let Some(s) = session else { return self.login().await };
        let state = random_hex(8);
        let url = reqwest::Url::parse_with_params(
            &self.url("/oauth2/authorize"),
            &[
                ("response_type", "code"),
                ("client_id", "acme$web"),
                ("redirect_uri", WEB_REDIRECT),
                ("scope", "openid offline_access"),
                ("state", state.as_str()),
            ],
        )
        .unwrap();
        let rb = http_no_redirects().get(url).header("cookie", format!("portcullis_sso={}", s.token));
        let Some(r) = try_send(rb).await else { return self.count(Op::Refresh, "no answer to authorize") };
        let Some(code) = code_of(&r, &state) else {
            return self.unexpected(Op::Refresh, &r);
        };
        let rb = self.http.post(self.url("/oauth2/token")).basic_auth("acme$web", Some(&self.web_secret));
        let form = [("grant_type", "authorization_code"), ("code", code.as_str()), ("redirect_uri", WEB_REDIRECT)];
        let Some(t) = try_send(rb.form(&form)).await else { return self.count(Op::Refresh, "no answer to redeem") };
        if t.status != 200 {
            return self.unexpected(Op::Refresh, &t);
        }
        let f = Family { current: t.str("refresh_token"), used: Vec::new(), in_doubt: false };
        let mut a = self.acked.lock().unwrap();
        a.families.push(f);
        a.count("Refresh", "new family");
    }
}

/// The `code` of the redirect back to `acme$web`, if `r` is that redirect with `state`.
fn code_of(r: &Resp, state: &str) -> Option<String> {
    if !matches!(r.status, 302 | 303) {
        return None;
    }
    let loc = reqwest::Url::parse(r.header("location")?).ok()?;
    assert!(loc.as_str().starts_with(WEB_REDIRECT), "redirected elsewhere: {loc}");
    let q: BTreeMap<String, String> = loc.query_pairs().map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
    assert_eq!(q.get("state").map(String::as_str), Some(state), "{loc}");
    q.get("code").cloned()
}

/// One load task: random operations until told to stop.
async fn worker(load: Arc<Load>, mut rng: Rng) {
    let total: u64 = OPS.iter().map(|(_, w)| w).sum();
    while !load.stopped() {
        let mut pick = rng.below(total);
        let op = OPS
            .iter()
            .find(|(_, w)| {
                if pick < *w {
                    true
                } else {
                    pick -= w;
                    false
                }
            })
            .unwrap()
            .0;
        load.run(op).await;
    }
}

// ------------------------------------------------------------------------------ the nodes --

/// Where the server keeps its state, and how it is started on it.
struct Node {
    data: tempfile::TempDir,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    /// Dropped after the server (fields drop in order).
    _db: Option<PgDb>,
}

impl Node {
    fn sqlite() -> Node {
        Node::new(Vec::new(), None)
    }

    fn postgres() -> Node {
        let admin_url = std::env::var("PORTCULLIS_TEST_PG_URL").unwrap_or_else(|_| DEFAULT_PG_URL.to_owned());
        let db = PgDb::create(&admin_url, "portcullis_crash_e2e");
        Node::new(vec!["--database-url".to_owned(), db.url()], Some(db))
    }

    fn new(args: Vec<String>, db: Option<PgDb>) -> Node {
        let envs = LIMITS.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        Node { data: tempfile::tempdir().unwrap(), args, envs, _db: db }
    }

    /// Starts on `addr` (`127.0.0.1:0` the first time; then the same address, so the issuer
    /// stays the same).
    fn start(&self, addr: &str) -> Server {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let envs: Vec<(&str, &str)> = self.envs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        Server::launch(self.data.path(), addr, &args, &envs, true)
    }
}

/// What the first start fixed and must never change.
struct Identity {
    /// The `kid` of the key that signs the admin's (ES256) access tokens.
    kid: String,
    /// `/pki/ca.pem`.
    ca_pem: String,
}

/// The organisation `acme` and what the load needs: `acme$certs` (certificates are issued for
/// it), `acme$signer` (`private_key_jwt`, with a signing certificate) and `acme$web` (the code
/// flow with refresh tokens, first party).
async fn set_up(s: &Server) -> (Arc<Signer>, String) {
    let c = Client::new(s);
    let admin = admin_token(s).await;
    create_acme_payments(&c, &admin).await;
    let a = Cred::Bearer(&admin);
    let app = |slug: &str, extra: Value| {
        let mut body = json!({ "slug": slug, "name": slug, "scopes": ["payments/read"] });
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        c.post("/api/v1/organisations/acme/applications", &a, &body)
    };
    app("certs", json!({})).await.expect(201);
    app("signer", json!({ "token_endpoint_auth_method": "private_key_jwt" })).await.expect(201);
    let web = app(
        "web",
        json!({
            "grant_types": ["authorization_code", "refresh_token"],
            "redirect_uris": [WEB_REDIRECT],
            "first_party": true,
        }),
    )
    .await;
    web.expect(201);
    let (key, pem) = csr("acme$signer");
    let r = c
        .post(
            "/api/v1/organisations/acme/certificates",
            &a,
            &json!({ "type": "signing", "application": "signer", "csr": pem }),
        )
        .await;
    r.expect(201);
    let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &key.serialize_der()).unwrap();
    let signer = Signer { key, kid: r.str("x5t#S256"), client_id: "acme$signer".to_owned() };
    (Arc::new(signer), web.str("client_secret"))
}

async fn identity(s: &Server) -> Identity {
    let kid = jws_header(&admin_token(s).await)["kid"].as_str().unwrap().to_owned();
    let ca = send(http().get(format!("{}/pki/ca.pem", s.url))).await;
    ca.expect(200);
    Identity { kid, ca_pem: ca.text }
}

/// One round: load from `WORKERS` tasks, SIGKILL after a random 0.5–3 s.
async fn load_and_kill(
    s: &mut Server,
    signer: &Arc<Signer>,
    web_secret: &str,
    acked: &Arc<Mutex<Acked>>,
    rng: &mut Rng,
    round: usize,
) {
    let csrs = (0..CSRS_PER_ROUND).map(|_| csr("acme$certs").1).collect();
    let load = Arc::new(Load {
        http: http(),
        base: s.url.clone(),
        admin: admin_token(s).await,
        acked: acked.clone(),
        csrs: Mutex::new(csrs),
        signer: signer.clone(),
        web_secret: web_secret.to_owned(),
        log: s.stderr_buffer(),
        stop: AtomicBool::new(false),
        seq: AtomicU64::new(0),
        tag: format!("r{round}-{}", random_hex(3)),
    });
    let mut tasks = JoinSet::new();
    for _ in 0..WORKERS {
        tasks.spawn(worker(load.clone(), Rng::new(rng.next())));
    }
    let run_for = Duration::from_millis(500 + rng.below(2500));
    tokio::time::sleep(run_for).await;
    let status = s.kill();
    load.stop.store(true, Ordering::Relaxed);
    while let Some(r) = tasks.join_next().await {
        if let Err(e) = r {
            std::panic::resume_unwind(e.into_panic());
        }
    }
    eprintln!("round {round}: killed after {run_for:?} ({status:?})");
}

// ---------------------------------------------------------------------------- the checks --

/// The serials a DER CRL lists, as `openssl crl` prints them (upper-case hex, no leading zeros).
fn crl_serials(der: &[u8]) -> BTreeSet<String> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("crl.der");
    std::fs::write(&p, der).unwrap();
    let out = Command::new("openssl")
        .args(["crl", "-inform", "DER", "-noout", "-text", "-in"])
        .arg(&p)
        .output()
        .unwrap_or_else(|e| panic!("cannot run openssl ({e})"));
    assert!(out.status.success(), "openssl crl: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Serial Number:"))
        .map(norm_serial)
        .collect()
}

fn norm_serial(s: &str) -> String {
    s.trim().replace(':', "").to_ascii_uppercase().trim_start_matches('0').to_owned()
}

/// Every certificate of `acme` in the inventory: id → serial.
async fn inventory(c: &Client, admin: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut serials = BTreeSet::new();
    for page in 0.. {
        let r = c
            .get(
                &format!("/api/v1/organisations/acme/certificates?limit=500&offset={}", page * 500),
                &Cred::Bearer(admin),
            )
            .await;
        r.expect(200);
        let items = r.json["items"].as_array().unwrap().clone();
        for i in &items {
            let serial = norm_serial(i["serial"].as_str().unwrap());
            assert!(serials.insert(serial.clone()), "serial {serial} appears twice in the inventory");
            out.insert(i["id"].as_str().unwrap().to_owned(), serial);
        }
        if items.len() < 500 {
            break;
        }
    }
    out
}

/// After a restart: everything acknowledged so far still holds.
async fn check_everything(s: &Server, id: &Identity, acked: &Arc<Mutex<Acked>>, web_secret: &str, round: usize) {
    let c = Arc::new(Client::new(s));
    let admin = admin_token(s).await;
    let started = Instant::now();

    // The signing key and the CA are the ones of the first start.
    assert_eq!(jws_header(&admin)["kid"], id.kid.as_str(), "round {round}: the signing key changed");
    let jwks = send(http().get(format!("{}/oauth2/jwks", s.url))).await;
    jwks.expect(200);
    assert!(jwks.text.contains(&id.kid), "round {round}: the JWKS lost the signing key: {}", jwks.text);
    let ca = send(http().get(format!("{}/pki/ca.pem", s.url))).await;
    assert_eq!(ca.text, id.ca_pem, "round {round}: the CA changed");

    let (clients, users, sessions, keys, certs, revoked, tokens, assertions, families) = {
        let mut a = acked.lock().unwrap();
        (
            a.clients.clone(),
            a.users.clone(),
            a.sessions.clone(),
            a.api_keys.clone(),
            a.certs.clone(),
            a.revoked.clone(),
            a.revoked_tokens.clone(),
            a.assertions.clone(),
            std::mem::take(&mut a.families),
        )
    };
    let url = s.url.clone();

    for_all(clients, |(id, secret)| {
        let url = url.clone();
        async move {
            let r = send(
                http()
                    .post(format!("{url}/oauth2/token"))
                    .basic_auth(&id, Some(&secret))
                    .form(&[("grant_type", "client_credentials")]),
            )
            .await;
            assert_eq!(r.status, 200, "round {round}: acknowledged client {id} cannot authenticate: {}", r.text);
        }
    })
    .await;
    let admin2 = admin.clone();
    for_all(users, |u| {
        let (c, admin) = (c.clone(), admin2.clone());
        async move {
            let r = c.get(&format!("/api/v1/organisations/acme/users/{}", u.id), &Cred::Bearer(&admin)).await;
            assert_eq!(r.status, 200, "round {round}: acknowledged user {} is gone: {}", u.email, r.text);
            assert_eq!(r.json["email"], u.email.as_str());
        }
    })
    .await;
    for_all(sessions, |sess| {
        let c = c.clone();
        async move {
            let r = c.get("/api/v1/sessions/current", &Cred::Bearer(&sess.token)).await;
            assert_eq!(
                r.status, 200,
                "round {round}: acknowledged session of {} does not validate: {}",
                sess.email, r.text
            );
        }
    })
    .await;
    for_all(keys, |(key, secret)| {
        let c = c.clone();
        async move {
            let r = c.get("/api/v1/api-keys", &Cred::Key(&key, &secret)).await;
            assert_eq!(r.status, 200, "round {round}: acknowledged API key {key} does not work: {}", r.text);
            let me = r.json["items"].as_array().unwrap().iter().find(|k| k["api_key"] == key.as_str()).cloned();
            assert_eq!(me.map(|k| k["state"].clone()), Some(json!("active")), "round {round}: {}", r.text);
        }
    })
    .await;

    // Certificates: in the inventory with their serials, no serial twice; revocations in the CRL.
    let inv = inventory(&c, &admin).await;
    for cert in &certs {
        assert_eq!(
            inv.get(&cert.id),
            Some(&norm_serial(&cert.serial)),
            "round {round}: acknowledged certificate {} ({}) is not in the inventory",
            cert.id,
            cert.serial
        );
    }
    let crl = reqwest::get(format!("{}/pki/crl", s.url)).await.unwrap().bytes().await.unwrap();
    let listed = crl_serials(&crl);
    for cert in &revoked {
        assert!(
            listed.contains(&norm_serial(&cert.serial)),
            "round {round}: acknowledged revocation of {} is not in the CRL",
            cert.serial
        );
    }

    for_all(tokens, |t| {
        let url = url.clone();
        async move {
            let r = send(
                http()
                    .post(format!("{url}/oauth2/introspect"))
                    .basic_auth(ADMIN_ID, Some(ADMIN_SECRET))
                    .form(&[("token", t.as_str())]),
            )
            .await;
            r.expect(200);
            assert_eq!(r.json["active"], false, "round {round}: a revoked access token is active again");
        }
    })
    .await;
    for_all(assertions, |jwt| {
        let url = url.clone();
        async move {
            let r = send(http().post(format!("{url}/oauth2/token")).form(&assertion_form(&jwt))).await;
            assert_eq!(r.status, 401, "round {round}: an accepted client assertion was taken again: {}", r.text);
            assert_eq!(r.json["error"], "invalid_client", "{}", r.text);
        }
    })
    .await;

    // Refresh families of the round: an answered rotation is durable both ways — the new token
    // works (unless a later rotation got no answer), the spent one is refused and revokes the family.
    let secret = web_secret.to_owned();
    let nfam = families.len();
    for_all(families, |f| {
        let (url, secret) = (url.clone(), secret.clone());
        async move {
            let refresh = |t: String| {
                let (url, secret) = (url.clone(), secret.clone());
                async move {
                    send(
                        http()
                            .post(format!("{url}/oauth2/token"))
                            .basic_auth("acme$web", Some(&secret))
                            .form(&[("grant_type", "refresh_token"), ("refresh_token", t.as_str())]),
                    )
                    .await
                }
            };
            let mut newest = None;
            if !f.in_doubt {
                let r = refresh(f.current.clone()).await;
                assert_eq!(
                    r.status, 200,
                    "round {round}: an issued refresh token does not work after the restart: {}",
                    r.text
                );
                newest = Some(r.str("refresh_token"));
            }
            if let Some(spent) = f.used.last() {
                let r = refresh(spent.clone()).await;
                assert_eq!(r.status, 400, "round {round}: a spent refresh token works again: {}", r.text);
                assert_eq!(r.json["error"], "invalid_grant", "{}", r.text);
                if let Some(t) = newest {
                    let r = refresh(t).await;
                    assert_eq!(
                        r.json["error"], "invalid_grant",
                        "round {round}: the family was not revoked: {}",
                        r.text
                    );
                }
            }
        }
    })
    .await;
    let a = acked.lock().unwrap();
    eprintln!(
        "round {round}: checked {} clients, {} users, {} sessions, {} API keys, {} certificates ({} revoked), {} revoked tokens, {} assertions, {nfam} refresh families in {:?}",
        a.clients.len(),
        a.users.len(),
        a.sessions.len(),
        a.api_keys.len(),
        a.certs.len(),
        a.revoked.len(),
        a.revoked_tokens.len(),
        a.assertions.len(),
        started.elapsed()
    );
}

/// `PRAGMA integrity_check` of the SQLite database in `data_dir`, opened by the store.
async fn integrity(data_dir: &Path) -> String {
    let store = portcullis_store::SqliteStore::open(&data_dir.join("portcullis.db"), now()).await.unwrap();
    let r = store.integrity_check().await.unwrap();
    store.close().await;
    r
}

/// `ROUNDS` times: load, SIGKILL at a random point, restart on the same state, check.
async fn kill_rounds(node: Node, sqlite: bool) {
    let started = Instant::now();
    let mut rng = Rng::new(seed());
    let mut s = node.start("127.0.0.1:0");
    let (signer, web_secret) = set_up(&s).await;
    let id = identity(&s).await;
    let acked = Arc::new(Mutex::new(Acked::default()));
    let addr = s.addr.clone();
    for round in 1..=ROUNDS {
        load_and_kill(&mut s, &signer, &web_secret, &acked, &mut rng, round).await;
        if sqlite {
            assert_eq!(integrity(node.data.path()).await, "ok", "round {round}: PRAGMA integrity_check after the kill");
        }
        s = node.start(&addr);
        check_everything(&s, &id, &acked, &web_secret, round).await;
    }
    s.stop_clean();
    s.assert_no_logged_errors();
    let a = acked.lock().unwrap();
    eprintln!("what the load got:\n{:#?}", a.tally);
    // The load must have exercised every kind of write for the checks to mean anything.
    for (what, n) in [
        ("clients", a.clients.len()),
        ("users", a.users.len()),
        ("sessions", a.sessions.len()),
        ("API keys", a.api_keys.len()),
        ("certificates", a.certs.len()),
        ("certificate revocations", a.revoked.len()),
        ("token revocations", a.revoked_tokens.len()),
        ("client assertions", a.assertions.len()),
    ] {
        assert!(n > 0, "no {what} were acknowledged in {ROUNDS} rounds: {:#?}", a.tally);
    }
    let rotations = a.tally.get("Refresh: 200").copied().unwrap_or_default();
    assert!(rotations > 0, "no refresh token was rotated in {ROUNDS} rounds: {:#?}", a.tally);
    eprintln!("{ROUNDS} kills in {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_survives_kill_9_under_load() {
    kill_rounds(Node::sqlite(), true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_survives_kill_9_under_load() {
    kill_rounds(Node::postgres(), false).await;
}

// ----------------------------------------------------------------------------- full disk --

/// A tmpfs of `size` mounted on a fresh directory; unmounted on drop. Needs root (or
/// CAP_SYS_ADMIN): without it the test fails with a message saying so.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs"])
            .arg(dir.path())
            .output();
        match out {
            Ok(o) if o.status.success() => Tmpfs { dir },
            Ok(o) => panic!(
                "the full-disk test mounts a {size} tmpfs and must run as root (or with CAP_SYS_ADMIN): `mount -t tmpfs` failed: {}",
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => panic!("the full-disk test needs the `mount` command, run as root: {e}"),
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Fills the file system with `filler`, then frees `leave` bytes of it.
    fn fill(&self, leave: u64) -> PathBuf {
        let path = self.path().join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        for chunk in [1 << 20, 4096, 512] {
            let buf = vec![0x5a_u8; chunk];
            loop {
                match f.write_all(&buf) {
                    Ok(()) => {}
                    Err(e) if e.raw_os_error() == Some(28) => break,
                    Err(e) => panic!("filling the tmpfs: {e}"),
                }
            }
        }
        let len = f.metadata().unwrap().len();
        f.set_len(len.saturating_sub(leave)).unwrap();
        f.sync_all().unwrap();
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let plain = Command::new("umount").arg(self.dir.path()).status();
        if !plain.is_ok_and(|s| s.success()) {
            // Still busy (a process that has not exited yet): detach it now, freed when idle.
            let _ = Command::new("umount").arg("-l").arg(self.dir.path()).status();
        }
    }
}

/// A refusal for a full disk: 507 (503 `temporarily_unavailable` on OAuth endpoints) with
/// `x-error`, `x-error-id` and `Retry-After`, and nothing of the driver's text.
#[track_caller]
fn assert_storage_full(r: &Resp, status: u16, what: &str) {
    assert_eq!(r.status, status, "{what}: {} {:?} {}", r.status, r.header("x-error"), r.text);
    let says = if status == 507 { "storage full: " } else { "temporarily_unavailable: storage full: " };
    assert!(r.x_error().starts_with(says), "{what}: x-error {:?}", r.x_error());
    assert!(r.header("x-error-id").is_some_and(|id| id.len() >= 16), "{what}: {:?}", r.headers);
    assert!(r.header("retry-after").is_some_and(|s| s.parse::<u64>().is_ok()), "{what}: {:?}", r.headers);
    for leak in ["disk is full", "sqlite", "SQLITE", "database", "53100", "(13)"] {
        assert!(
            !r.text.contains(leak) && !r.x_error().contains(leak),
            "{what}: {leak:?} leaked: {} {:?}",
            r.text,
            r.x_error()
        );
    }
}

/// The application-creation events of the audit log whose target starts with `prefix`.
async fn audited_creations(c: &Client, admin: &str, prefix: &str) -> BTreeSet<String> {
    let r = c
        .get("/api/v1/organisations/acme/audit-events?action=application.create&limit=500", &Cred::Bearer(admin))
        .await;
    r.expect(200);
    r.json["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["outcome"] == "success")
        .filter_map(|e| e["target"].as_str())
        .filter(|t| t.contains(prefix))
        .map(str::to_owned)
        .collect()
}

/// Application creations against a disk that fills up, and what became of each.
struct Writes<'a> {
    s: &'a Server,
    c: Client,
    admin: String,
    /// Every slug of this run starts with it.
    prefix: String,
    /// Slug, client id and secret of each creation answered 201.
    created: Vec<(String, String, String)>,
    /// Slugs of the creations refused for a full disk.
    refused: Vec<String>,
}

impl<'a> Writes<'a> {
    async fn new(s: &'a Server) -> Writes<'a> {
        let c = Client::new(s);
        let admin = admin_token(s).await;
        create_acme_payments(&c, &admin).await;
        let prefix = format!("full-{}", random_hex(3));
        Writes { s, c, admin, prefix, created: Vec::new(), refused: Vec::new() }
    }

    fn admin(&self) -> Cred<'_> {
        Cred::Bearer(&self.admin)
    }

    /// `POST` to the admin API; a 5xx is an answer too.
    async fn post(&self, path: &str, body: &Value) -> Resp {
        let rb = self.c.request(reqwest::Method::POST, path, &self.admin()).json(body);
        answer(rb).await.expect("the server answers")
    }

    async fn create(&self, slug: &str) -> Resp {
        let body = json!({ "slug": slug, "name": slug, "scopes": ["payments/read"] });
        self.post("/api/v1/organisations/acme/applications", &body).await
    }

    /// A transport certificate for `acme$<app>` (through the group commit on SQLite).
    async fn issue(&self, app: &str) -> Resp {
        let csr = csr(&format!("acme${app}")).1;
        let body = json!({ "type": "transport", "application": app, "csr": csr });
        self.post("/api/v1/organisations/acme/certificates", &body).await
    }

    /// Creates applications until three were refused for a full disk (within 60 s). A small
    /// write may still fit after a bigger one was refused: it is kept, and checked.
    async fn until_refused(&mut self, backend: &str) {
        let started = Instant::now();
        while self.refused.len() < 3 {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "{backend}: no write was refused within 60 s on a full disk ({} created)",
                self.created.len()
            );
            let slug = format!("{}-{}", self.prefix, self.created.len() + self.refused.len());
            let r = self.create(&slug).await;
            if r.status == 201 {
                self.created.push((slug, r.str("client_id"), r.str("client_secret")));
            } else {
                assert_storage_full(&r, 507, &format!("{backend}: creating an application on a full disk"));
                self.refused.push(slug);
            }
        }
        eprintln!("{backend}: {} applications created, then refused after {:?}", self.created.len(), started.elapsed());
    }

    /// Reads and tokens still work; what was refused is not there; the audit log agrees.
    async fn check(&self) {
        for (slug, id, secret) in &self.created {
            self.c.get(&format!("/api/v1/organisations/acme/applications/{slug}"), &self.admin()).await.expect(200);
            token_request(self.s, id, secret, &[]).await.expect(200);
        }
        for slug in &self.refused {
            let r = self.c.get(&format!("/api/v1/organisations/acme/applications/{slug}"), &self.admin()).await;
            assert_eq!(r.status, 404, "a refused creation left {slug} behind: {}", r.text);
        }
        let audited = audited_creations(&self.c, &self.admin, &self.prefix).await;
        assert_eq!(audited.len(), self.created.len(), "audit events of the creations: {audited:?}");
    }

    /// What `/readyz` says of the storage; the node stays ready.
    async fn storage(&self) -> String {
        let r = send(http().get(format!("{}/readyz", self.s.url))).await;
        r.expect(200);
        r.json["storage"].as_str().unwrap_or_else(|| panic!("{}", r.text)).to_owned()
    }

    /// Revokes `token` as the admin client (RFC 7009).
    async fn revoke(&self, token: &str) -> Resp {
        let rb = http().post(format!("{}/oauth2/revoke", self.s.url)).basic_auth(ADMIN_ID, Some(ADMIN_SECRET));
        answer(rb.form(&[("token", token)])).await.expect("the server answers")
    }
}

/// SQLite on a 16 MiB tmpfs, filled up while the server runs: writes are refused with 507
/// (and 503 on OAuth endpoints) and leave nothing behind, the certificate group commit too;
/// reads and tokens keep working; `/readyz` reports the full disk; once the filler is deleted,
/// writes succeed again at once on every pooled connection; the database passes
/// `PRAGMA integrity_check` and the server restarts on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_full_disk_gives_clear_errors_and_recovers() {
    let fs = Tmpfs::mount("16m");
    let data = fs.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let mut s = Server::start(&data, &[], &[]);
    let mut w = Writes::new(&s).await;
    w.create("before").await.expect(201);
    w.issue("before").await.expect(201);
    let victim = token_request(&s, ADMIN_ID, ADMIN_SECRET, &[]).await.str("access_token");
    assert_eq!(w.storage().await, "ok");

    let filler = fs.fill(1 << 20);
    w.until_refused("SQLite").await;
    w.check().await;
    // The certificate group commit refuses the same way.
    for issued in 0.. {
        let r = w.issue("before").await;
        if r.status != 201 {
            assert_storage_full(&r, 507, "issuing a certificate on a full disk");
            break;
        }
        assert!(issued < 200, "certificates are still issued on a full disk");
    }
    // The OAuth shape: a revocation cannot be saved.
    let r = w.revoke(&victim).await;
    assert_storage_full(&r, 503, "revoking a token on a full disk");
    assert_eq!(r.json["error"], "temporarily_unavailable", "{}", r.text);
    assert_eq!(w.storage().await, "full", "/readyz on a full disk");

    // Space again: the very next writes succeed, without a restart, on every pooled
    // connection (more writes than the pool has connections).
    std::fs::remove_file(&filler).unwrap();
    w.create(&format!("{}-after", w.prefix)).await.expect(201);
    for _ in 0..6 {
        w.issue("before").await.expect(201);
        let email = format!("{}@acme.test", random_hex(6));
        w.post("/api/v1/organisations/acme/users", &json!({ "email": email })).await.expect(201);
    }
    w.revoke(&victim).await.expect(200);
    assert_eq!(w.storage().await, "ok", "/readyz once writes succeed again");
    let (created, prefix) = (w.created.clone(), w.prefix.clone());
    drop(w);
    s.stop_clean();
    assert_eq!(integrity(&data).await, "ok", "PRAGMA integrity_check after the full disk");

    let s = Server::launch(&data, &s.addr, &[], &[], true);
    for (_, id, secret) in &created {
        token_request(&s, id, secret, &[]).await.expect(200);
    }
    let admin = admin_token(&s).await;
    assert_eq!(audited_creations(&Client::new(&s), &admin, &prefix).await.len(), created.len() + 1);
    drop(s);
    drop(fs);
}

/// A throwaway PostgreSQL whose data directory is on a tmpfs of `size` and whose WAL is on
/// the ordinary disk (PostgreSQL stops with a PANIC when it cannot write its WAL; a full data
/// disk is the failure it answers with an error). Stopped, then unmounted, on drop.
struct TinyPg {
    bin: PathBuf,
    run_as: String,
    data: PathBuf,
    port: u16,
    /// WAL, log and socket.
    work: tempfile::TempDir,
    fs: Tmpfs,
}

impl TinyPg {
    fn start(size: &str) -> TinyPg {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path().join("bin"))
            .filter(|b| b.join("initdb").is_file())
            .max()
            .unwrap_or_else(|| panic!("no PostgreSQL server binaries in /usr/lib/postgresql (apt install postgresql)"));
        // root may not run PostgreSQL: the cluster belongs to `postgres` (or `nobody`).
        let run_as = if Command::new("id").arg("postgres").output().is_ok_and(|o| o.status.success()) {
            "postgres"
        } else {
            "nobody"
        };
        let fs = Tmpfs::mount(size);
        let work = tempfile::tempdir().unwrap();
        for dir in [fs.path(), work.path()] {
            let st = Command::new("chown").arg(run_as).arg(dir).status().unwrap();
            assert!(st.success(), "chown {run_as} {}", dir.display());
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let pg = TinyPg { bin, run_as: run_as.to_owned(), data: fs.path().join("data"), port, work, fs };
        let wal = pg.work.path().join("wal");
        let data = pg.data.to_str().unwrap().to_owned();
        pg.run(
            "initdb",
            &[
                "-D",
                &data,
                "--waldir",
                wal.to_str().unwrap(),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
        );
        let conf = format!(
            "\nlisten_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{}'\nmax_connections = 50\nfsync = off\n",
            pg.work.path().display()
        );
        std::fs::OpenOptions::new()
            .append(true)
            .open(pg.data.join("postgresql.conf"))
            .unwrap()
            .write_all(conf.as_bytes())
            .unwrap();
        let log = pg.work.path().join("server.log");
        pg.run("pg_ctl", &["-D", &data, "-l", log.to_str().unwrap(), "-w", "-t", "60", "start"]);
        pg
    }

    /// Runs a PostgreSQL program as the cluster's owner; it must succeed.
    fn run(&self, program: &str, args: &[&str]) {
        let out = Command::new("runuser")
            .arg("-u")
            .arg(&self.run_as)
            .arg("--")
            .arg(self.bin.join(program))
            .args(args)
            .current_dir("/")
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run runuser ({e})"));
        assert!(
            out.status.success(),
            "{program} {args:?} failed: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.work.path().join("server.log")).unwrap_or_default()
        );
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for TinyPg {
    fn drop(&mut self) {
        let data = self.data.to_str().unwrap().to_owned();
        let _ = Command::new("runuser")
            .args(["-u", &self.run_as, "--"])
            .arg(self.bin.join("pg_ctl"))
            .args(["-D", &data, "-m", "immediate", "-w", "-t", "30", "stop"])
            .current_dir("/")
            .output();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.work.path().join("server.log")).unwrap_or_default();
            eprintln!("---- PostgreSQL log ----\n{log}");
        }
    }
}

/// PostgreSQL with its data directory on a full disk: writes that need a new page answer 507
/// (`53100 disk_full`) and leave nothing behind, reads and tokens keep working; once space is
/// freed, writes succeed again without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_full_disk_gives_clear_errors_and_recovers() {
    let pg = TinyPg::start("40m");
    let data = tempfile::tempdir().unwrap();
    let s = Server::start(data.path(), &["--database-url", &pg.url()], &[]);
    let mut w = Writes::new(&s).await;
    let filler = pg.fs.fill(256 * 1024);
    w.until_refused("PostgreSQL").await;
    w.check().await;
    assert_eq!(w.storage().await, "full", "/readyz on a full disk");

    std::fs::remove_file(&filler).unwrap();
    for i in 0..6 {
        w.create(&format!("{}-after-{i}", w.prefix)).await.expect(201);
    }
    assert_eq!(w.storage().await, "ok", "/readyz once writes succeed again");
    drop(w);
    drop(s);
    drop(pg);
}
