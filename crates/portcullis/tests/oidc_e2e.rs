#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
//! End-to-end tests of OpenID Connect for people (docs/oidc.md): the real `portcullis serve`
//! binary (started by the harness in `support/`), delivering its mail to a real SMTP server
//! (`tests/e2e/smtp_sink.py`), driven by an independent relying party: npm `openid-client` v6
//! in `tests/e2e/oidc_rp.mjs`, which also plays the browser (a cookie jar kept in a file per
//! person and browser, redirects followed by hand, the HTML forms parsed and posted, the emailed
//! code read from the sink's directory, TOTP codes computed). What needs exact control of the
//! requests (the negative cases, mirroring the OpenID conformance suite) is sent from here with
//! reqwest, without following redirects.
//!
//! Needs Node.js with `openid-client` installed in `tests/e2e/node_modules` (scripts/test.sh
//! runs `npm install` there), Python 3 with aiosmtpd (the sink) and the `openssl` CLI (the
//! signing certificate of the `private_key_jwt` client).
//!
//! Every page any scenario visits is checked for the security headers the contract names
//! (`frame-ancestors 'none'` and the rest of the CSP, `X-Frame-Options`, `Cache-Control`,
//! `Referrer-Policy`), for no inline script, and every cookie it sets for `HttpOnly` and
//! `SameSite=Lax`.

#[allow(dead_code)]
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use reqwest::Method;
use serde_json::{Value, json};

use support::{Client, Cred, PAYMENTS_AUD, Resp, Server, Sink, admin_token, create_acme_payments, random_hex, send};

const RP: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/e2e/oidc_rp.mjs");
/// What most flows ask for.
const SCOPE: &str = "openid profile email offline_access payments/read";
const ACR: &str = "urn:portcullis:acr:2fa";
const BACKCHANNEL_EVENT: &str = "http://schemas.openid.net/event/backchannel-logout";
const MAIL_TIMEOUT: Duration = Duration::from_secs(15);

/// The wall clock, to check token times (a test of the real binary has no injected clock).
#[allow(clippy::disallowed_methods)]
fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

// ------------------------------------------------------------------------------ the RP --

/// Runs `oidc_rp.mjs COMMAND ARG`; checks every page its browser visited.
async fn rp(cmd: &str, arg: &Value) -> Value {
    let out = tokio::process::Command::new("node")
        .arg(RP)
        .arg(cmd)
        .arg(arg.to_string())
        .env("NO_PROXY", "*")
        .env("no_proxy", "*")
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run node ({e}); scripts/test.sh installs Node.js and openid-client"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let v: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "oidc_rp.mjs {cmd} printed no JSON ({e}); is openid-client installed (npm install in tests/e2e)?\nstdout: {stdout}\nstderr: {stderr}"
        )
    });
    assert!(out.status.success(), "oidc_rp.mjs {cmd} crashed: {v:#}\nstderr: {stderr}");
    if let Some(trace) = v["trace"].as_array() {
        for e in trace {
            check_trace_entry(e);
        }
    }
    v
}

/// One request of the RP's browser: never a 5xx; a refusal carries `x-error` and `x-error-id`;
/// a page carries the contract's security headers and no inline script; a cookie is `HttpOnly`
/// and `SameSite=Lax`.
#[track_caller]
fn check_trace_entry(e: &Value) {
    let status = e["status"].as_u64().unwrap();
    let what = format!("{} {} → {status}", e["method"].as_str().unwrap(), e["url"].as_str().unwrap());
    assert!(status < 500, "{what}: server error {e}");
    if status >= 400 {
        assert!(e["x_error"].is_string() && e["x_error_id"].is_string(), "{what}: refusal without x-error/x-error-id");
    }
    if e["html"] == true {
        check_page_headers(
            &what,
            e["csp"].as_str(),
            e["x_frame_options"].as_str(),
            e["cache_control"].as_str(),
            e["referrer_policy"].as_str(),
        );
        assert_eq!(e["inline_script"], false, "{what}: a page with an inline script");
    }
    for c in e["set_cookie"].as_array().unwrap() {
        check_cookie(&what, c.as_str().unwrap());
    }
}

#[track_caller]
fn check_page_headers(
    what: &str,
    csp: Option<&str>,
    xfo: Option<&str>,
    cache_control: Option<&str>,
    referrer: Option<&str>,
) {
    let csp = csp.unwrap_or_else(|| panic!("{what}: a page without Content-Security-Policy"));
    for d in ["frame-ancestors 'none'", "default-src 'none'", "base-uri 'none'", "form-action 'self'"] {
        assert!(csp.contains(d), "{what}: CSP {csp:?} lacks {d:?}");
    }
    assert!(!csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"), "{what}: CSP {csp:?}");
    assert_eq!(xfo.map(str::to_ascii_uppercase).as_deref(), Some("DENY"), "{what}: X-Frame-Options");
    assert!(cache_control.is_some_and(|c| c.contains("no-store")), "{what}: Cache-Control {cache_control:?}");
    assert_eq!(referrer, Some("no-referrer"), "{what}: Referrer-Policy");
}

#[track_caller]
fn check_cookie(what: &str, set_cookie: &str) {
    let attrs: Vec<String> = set_cookie.split(';').skip(1).map(|a| a.trim().to_ascii_lowercase()).collect();
    assert!(attrs.iter().any(|a| a == "httponly"), "{what}: cookie without HttpOnly: {set_cookie}");
    assert!(attrs.iter().any(|a| a == "samesite=lax"), "{what}: cookie without SameSite=Lax: {set_cookie}");
}

/// The pages (`login`, `code`, `totp`, `consent`, …) the browser filled in, in order.
fn pages(v: &Value) -> Vec<String> {
    v["trace"].as_array().unwrap().iter().filter_map(|e| e["page"].as_str().map(str::to_owned)).collect()
}

/// Whether the browser requested any path under `/login`.
fn visited_login(v: &Value) -> bool {
    v["trace"].as_array().unwrap().iter().any(|e| e["path"].as_str().unwrap().starts_with("/login"))
}

// --------------------------------------------------------------------------- the server --

/// A person of `acme`.
#[derive(Debug, Clone)]
struct User {
    id: String,
    email: String,
    name: String,
    password: String,
    roles: Vec<String>,
}

impl User {
    fn json(&self) -> Value {
        json!({ "email": self.email, "password": self.password })
    }
}

/// A registered application of `acme`.
#[derive(Debug, Clone)]
struct App {
    client_id: String,
    secret: Option<String>,
    auth: String,
    redirect_uri: String,
    /// For `private_key_jwt`: the key file, its JWS algorithm and the certificate's kid.
    key: Option<(PathBuf, String, String)>,
    id_token_alg: String,
}

impl App {
    fn client(&self) -> Value {
        let mut c = json!({
            "client_id": self.client_id,
            "auth": self.auth,
            "id_token_signed_response_alg": self.id_token_alg,
        });
        if let Some(s) = &self.secret {
            c["client_secret"] = json!(s);
        }
        if let Some((file, alg, kid)) = &self.key {
            c["key_file"] = json!(file.display().to_string());
            c["key_alg"] = json!(alg);
            c["kid"] = json!(kid);
        }
        c
    }
}

/// The OpenID provider under test: the sink, the server, organisation `acme` with service
/// `payments`, an admin token, and a work directory for cookie jars and keys.
struct Op {
    sink: Sink,
    s: Server,
    c: Client,
    admin: String,
    work: tempfile::TempDir,
    _data: tempfile::TempDir,
}

impl Op {
    async fn start() -> Op {
        Op::start_with(&[]).await
    }

    async fn start_with(extra: &[(&str, &str)]) -> Op {
        let sink = Sink::start(0);
        let data = tempfile::tempdir().unwrap();
        let mut envs: Vec<(String, String)> = sink.envs().into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
        // Many sign-ins and refusals from one address: keep them under the limits.
        for (k, v) in [
            ("PORTCULLIS_CLIENTS__AUTH_FAILURES_PER_MINUTE", "1000"),
            ("PORTCULLIS_AUTH__ATTEMPTS_PER_IP_PER_MINUTE", "1000"),
            ("PORTCULLIS_AUTH__ATTEMPTS_PER_ACCOUNT_PER_MINUTE", "1000"),
        ] {
            envs.push((k.to_owned(), v.to_owned()));
        }
        envs.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
        let envs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let s = Server::start(data.path(), &[], &envs);
        let c = Client::new(&s);
        let admin = admin_token(&s).await;
        create_acme_payments(&c, &admin).await;
        Op { sink, s, c, admin, work: tempfile::tempdir().unwrap(), _data: data }
    }

    fn issuer(&self) -> &str {
        &self.s.url
    }

    fn sink_dir(&self) -> String {
        self.sink.dir.path().display().to_string()
    }

    /// A new, empty cookie jar: a browser of its own.
    fn jar(&self, name: &str) -> String {
        self.work.path().join(format!("jar-{name}-{}.json", random_hex(4))).display().to_string()
    }

    async fn user(&self, name: &str, roles: &[&str]) -> User {
        let email = format!("{name}@acme.test");
        let password = format!("{name}-pw-{}", random_hex(12));
        let r = self
            .c
            .post(
                "/api/v1/organisations/acme/users",
                &Cred::Bearer(&self.admin),
                &json!({ "email": email, "name": name, "password": password, "roles": roles }),
            )
            .await;
        r.expect(201);
        User {
            id: r.str("id"),
            email,
            name: name.to_owned(),
            password,
            roles: roles.iter().map(|r| (*r).to_owned()).collect(),
        }
    }

    /// Registers `acme$SLUG` for the code flow (with refresh), redirect URI
    /// `https://SLUG.acme.test/cb`, first party unless `extra` says otherwise.
    async fn app(&self, slug: &str, auth: &str, extra: Value) -> App {
        let redirect_uri = format!("https://{slug}.acme.test/cb");
        let mut body = json!({
            "slug": slug,
            "name": format!("App {slug}"),
            "grant_types": ["authorization_code", "refresh_token"],
            "redirect_uris": [redirect_uri],
            "token_endpoint_auth_method": auth,
            "scopes": ["payments/read"],
            "first_party": true,
        });
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let r = self.c.post("/api/v1/organisations/acme/applications", &Cred::Bearer(&self.admin), &body).await;
        r.expect(201);
        let client_id = r.str("client_id");
        assert_eq!(client_id, format!("acme${slug}"));
        let secret = r.json["client_secret"].as_str().map(str::to_owned);
        assert_eq!(
            secret.is_some(),
            auth.starts_with("client_secret"),
            "a secret exactly for the client_secret methods: {}",
            r.text
        );
        let redirect_uri = body["redirect_uris"][0].as_str().unwrap().to_owned();
        let id_token_alg = body["id_token_signed_response_alg"].as_str().unwrap_or("RS256").to_owned();
        App { client_id, secret, auth: auth.to_owned(), redirect_uri, key: None, id_token_alg }
    }

    /// The code flow through the RP and its browser; `extra` is merged into the RP's argument
    /// (`params`, `consent`, `redeem`, `pkce`, `scope`…). Does not assert success.
    async fn flow(&self, app: &App, user: Option<&User>, jar: &str, extra: Value) -> Value {
        let mut arg = json!({
            "issuer": self.issuer(),
            "client": app.client(),
            "redirect_uri": app.redirect_uri,
            "scope": SCOPE,
            "jar": jar,
            "sink_dir": self.sink_dir(),
        });
        if let Some(u) = user {
            arg["user"] = u.json();
        }
        for (k, v) in extra.as_object().unwrap() {
            arg[k] = v.clone();
        }
        rp("login", &arg).await
    }

    /// A successful code flow.
    #[track_caller]
    fn login<'a>(
        &'a self,
        app: &'a App,
        user: &'a User,
        jar: &'a str,
        extra: Value,
    ) -> impl Future<Output = Value> + 'a {
        let caller = std::panic::Location::caller();
        async move {
            let v = self.flow(app, Some(user), jar, extra).await;
            assert_eq!(v["ok"], true, "{caller}: the code flow for {} failed: {v:#}", app.client_id);
            v
        }
    }

    /// A code (not redeemed) for `app`, in the session of `jar`.
    async fn code(&self, app: &App, user: &User, jar: &str, extra: Value) -> Value {
        let mut extra = extra;
        extra["redeem"] = json!(false);
        let v = self.flow(app, Some(user), jar, extra).await;
        assert_eq!(v["ok"], true, "no code for {}: {v:#}", app.client_id);
        assert!(v["callback"]["code"].is_string(), "{v:#}");
        v
    }

    async fn jwks(&self) -> Value {
        let r = send(raw().get(format!("{}/oauth2/jwks", self.s.url))).await;
        r.expect(200);
        r.json
    }

    /// A token-endpoint request with the app's credentials (Basic for client_secret_basic,
    /// the form for client_secret_post, `client_id` alone for public clients).
    async fn token(&self, app: &App, form: &[(&str, &str)]) -> Resp {
        let mut form: Vec<(&str, &str)> = form.to_vec();
        let url = format!("{}/oauth2/token", self.s.url);
        let rb = match (app.auth.as_str(), &app.secret) {
            ("client_secret_basic", Some(s)) => raw().post(url).basic_auth(&app.client_id, Some(s)),
            ("client_secret_post", Some(s)) => {
                form.push(("client_id", &app.client_id));
                form.push(("client_secret", s));
                raw().post(url)
            }
            ("none", _) => {
                form.push(("client_id", &app.client_id));
                raw().post(url)
            }
            other => panic!("token(): no raw client authentication for {other:?}"),
        };
        send(rb.form(&form)).await
    }

    /// Redeems the code of a `code()` result as that app.
    async fn redeem(&self, app: &App, got: &Value) -> Resp {
        let code = got["callback"]["code"].as_str().unwrap();
        let mut form = vec![("grant_type", "authorization_code"), ("code", code), ("redirect_uri", &app.redirect_uri)];
        if let Some(v) = got["code_verifier"].as_str() {
            form.push(("code_verifier", v));
        }
        self.token(app, &form).await
    }

    async fn refresh(&self, app: &App, refresh_token: &str) -> Resp {
        self.token(app, &[("grant_type", "refresh_token"), ("refresh_token", refresh_token)]).await
    }

    /// RFC 7662 introspection of `token` by the admin client (which sees every token).
    async fn active(&self, token: &str) -> bool {
        let r = send(
            raw()
                .post(format!("{}/oauth2/introspect", self.s.url))
                .basic_auth(support::ADMIN_ID, Some(support::ADMIN_SECRET))
                .form(&[("token", token)]),
        )
        .await;
        r.expect(200);
        r.json["active"].as_bool().unwrap()
    }

    async fn userinfo_get(&self, token: &str) -> Resp {
        send(raw().get(format!("{}/oauth2/userinfo", self.s.url)).header("authorization", format!("Bearer {token}")))
            .await
    }

    fn authorize_url(&self, params: &[(&str, &str)]) -> String {
        reqwest::Url::parse_with_params(&format!("{}/oauth2/authorize", self.s.url), params).unwrap().to_string()
    }

    /// GET without cookies and without following redirects.
    async fn get(&self, url: &str) -> Resp {
        send_page(raw().get(url)).await
    }
}

/// An HTTP client that follows no redirects and keeps no cookies.
fn raw() -> reqwest::Client {
    support::http_no_redirects()
}

/// Sends a request that may answer with a redirect or a page: never a 5xx; a refusal (4xx)
/// carries `x-error` and `x-error-id`; an HTML answer carries the page security headers.
#[track_caller]
fn send_page(rb: reqwest::RequestBuilder) -> impl Future<Output = Resp> {
    let caller = std::panic::Location::caller();
    async move {
        let r = rb.send().await.unwrap_or_else(|e| panic!("{caller}: request failed: {e}"));
        let url = r.url().to_string();
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let text = r.text().await.unwrap();
        let json = serde_json::from_str(&text).unwrap_or(Value::Null);
        let resp = Resp { status, headers, text, json };
        let what = format!("{caller}: {url} → {status}");
        assert!(status < 500, "{what}: {}", resp.text);
        if status >= 400 {
            for h in ["x-error", "x-error-id"] {
                assert!(resp.header(h).is_some(), "{what}: refusal without {h}: {:?}", resp.headers);
            }
        }
        if resp.header("content-type").is_some_and(|c| c.starts_with("text/html")) {
            check_page_headers(
                &what,
                resp.header("content-security-policy"),
                resp.header("x-frame-options"),
                resp.header("cache-control"),
                resp.header("referrer-policy"),
            );
        }
        resp
    }
}

/// The redirect's target without its query, and its query parameters.
#[track_caller]
fn redirect_of(r: &Resp) -> (String, BTreeMap<String, String>) {
    assert!(matches!(r.status, 302 | 303), "want a redirect, got {} {:?}: {}", r.status, r.header("x-error"), r.text);
    let loc = r.header("location").unwrap_or_else(|| panic!("a redirect without Location"));
    let url = reqwest::Url::parse(loc).unwrap_or_else(|e| panic!("Location {loc:?} is not absolute: {e}"));
    let params = url.query_pairs().map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
    let mut base = url.clone();
    base.set_query(None);
    (base.to_string(), params)
}

/// An error sent back to the application: to its redirect URI, with `error`, `state` and `iss`.
#[track_caller]
fn assert_error_redirect(r: &Resp, op: &Op, app: &App, error: &str, state: &str) {
    let (base, p) = redirect_of(r);
    assert_eq!(base, app.redirect_uri, "the error goes to the registered redirect URI");
    assert_eq!(p.get("error").map(String::as_str), Some(error), "{p:?}");
    assert_eq!(p.get("state").map(String::as_str), Some(state), "{p:?}");
    assert_eq!(p.get("iss").map(String::as_str), Some(op.issuer()), "RFC 9207 iss: {p:?}");
    assert!(!p.contains_key("code"), "{p:?}");
}

/// The HTML error page for a bad `client_id` or `redirect_uri`: 400, `x-error`, `x-error-id`,
/// and no `Location`.
#[track_caller]
fn assert_error_page(r: &Resp, what: &str) {
    assert_eq!(r.status, 400, "{what}: want the 400 error page; Location {:?}; body {}", r.header("location"), r.text);
    assert!(r.header("location").is_none(), "{what}: an error page must not redirect: {:?}", r.header("location"));
    assert!(r.header("x-error").is_some() && r.header("x-error-id").is_some(), "{what}");
    assert!(r.header("content-type").is_some_and(|c| c.starts_with("text/html")), "{what}: an HTML page");
}

/// A refusal by the token endpoint: 400 (or 401) with this OAuth error.
#[track_caller]
fn assert_oauth_error(r: &Resp, error: &str, what: &str) {
    assert!(matches!(r.status, 400 | 401), "{what}: status {} body {}", r.status, r.text);
    assert_eq!(r.json["error"], error, "{what}: {}", r.text);
}

/// A PKCE verifier the RP did not make.
fn other_verifier() -> String {
    format!("{}{}", random_hex(32), "abcdefghijk")
}

// ------------------------------------------------------------------------- claim checks --

fn str_set(v: &Value) -> BTreeSet<String> {
    match v {
        Value::Array(a) => a.iter().map(|x| x.as_str().unwrap().to_owned()).collect(),
        Value::String(s) => s.split(' ').filter(|x| !x.is_empty()).map(str::to_owned).collect(),
        Value::Null => BTreeSet::new(),
        other => panic!("not a string list: {other}"),
    }
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

/// The ID token, access token and userinfo of a successful flow, per the contract.
/// docs/oidc.md: a password and a one-time code (emailed or from an authenticator app).
const AMR: &[&str] = &["pwd", "otp", "mfa"];

#[track_caller]
fn check_tokens(op: &Op, jwks: &Value, app: &App, user: &User, v: &Value, amr: &[&str]) {
    let t = now();
    let idt = &v["id_token_claims"];
    let h = &v["id_token_header"];
    assert_eq!(h["alg"], app.id_token_alg.as_str(), "the client's id_token_signed_response_alg: {h}");
    let kids: Vec<&Value> = jwks["keys"].as_array().unwrap().iter().map(|k| &k["kid"]).collect();
    assert!(kids.contains(&&h["kid"]), "the ID token's kid {} is in /oauth2/jwks", h["kid"]);
    assert_eq!(idt["iss"], op.issuer(), "{idt}");
    assert_eq!(idt["sub"], user.id.as_str(), "sub is the user id: {idt}");
    assert!(str_set(&idt["aud"]).contains(&app.client_id), "aud holds the client id: {idt}");
    let (iat, exp) = (idt["iat"].as_i64().unwrap(), idt["exp"].as_i64().unwrap());
    assert!((iat - t).abs() <= 60 && exp > t && exp > iat, "iat {iat} exp {exp} now {t}");
    let auth_time = idt["auth_time"].as_i64().unwrap_or_else(|| panic!("no auth_time: {idt}"));
    assert!(auth_time <= iat + 1 && auth_time > t - 600, "auth_time {auth_time} iat {iat}");
    assert_eq!(idt["nonce"], v["nonce"], "the nonce round-trips: {idt}");
    assert_eq!(idt["at_hash"], v["at_hash_expected"], "at_hash of the access token: {idt}");
    assert_eq!(str_set(&idt["amr"]), set(amr), "amr: {idt}");
    assert_eq!(idt["acr"], ACR, "{idt}");
    assert!(idt["sid"].as_str().is_some_and(|s| !s.is_empty()), "sid: {idt}");
    let scope = str_set(&json!(v["authorization_url"].as_str().map(|u| {
        reqwest::Url::parse(u).unwrap().query_pairs().find(|(k, _)| k == "scope").unwrap().1.into_owned()
    })));
    if scope.contains("email") {
        assert_eq!(idt["email"], user.email.as_str(), "email scope: {idt}");
        assert!(idt["email_verified"].is_boolean(), "email_verified: {idt}");
    }
    if scope.contains("profile") {
        assert_eq!(idt["name"], user.name.as_str(), "profile scope: {idt}");
        assert!(idt["preferred_username"].is_string(), "preferred_username: {idt}");
    }
    // The access token (verified against the JWKS by the RP).
    let at = &v["access_token_claims"];
    assert_eq!(at["iss"], op.issuer(), "{at}");
    assert_eq!(at["sub"], user.id.as_str(), "the access token's sub is the user: {at}");
    assert_eq!(at["client_id"], app.client_id.as_str(), "{at}");
    assert_eq!(at["org"], "acme", "{at}");
    assert_eq!(str_set(&at["roles"]), user.roles.iter().cloned().collect(), "the person's roles: {at}");
    let granted = str_set(&at["scope"]);
    for s in &scope {
        assert!(granted.contains(s), "scope {s} granted: {at}");
    }
    if scope.contains("payments/read") || !user.roles.is_empty() {
        assert!(str_set(&at["aud"]).contains(PAYMENTS_AUD), "aud holds the payments audience: {at}");
    }
    assert!(!str_set(&at["aud"]).contains(op.issuer()), "never the issuer audience for a person: {at}");
    // Userinfo, fetched by openid-client.
    let ui = &v["userinfo"];
    assert_eq!(ui["sub"], user.id.as_str(), "{ui}");
    if scope.contains("email") {
        assert_eq!(ui["email"], user.email.as_str(), "{ui}");
    }
    if scope.contains("profile") {
        assert_eq!(ui["name"], user.name.as_str(), "{ui}");
    }
    // Refresh token only with offline_access (or always_issue_refresh_token).
    if scope.contains("offline_access") {
        assert!(v["tokens"]["refresh_token"].is_string(), "offline_access gives a refresh token: {}", v["tokens"]);
    }
}

// -------------------------------------------------------------------------- back-channel --

/// A small HTTP server recording the logout tokens POSTed to it.
struct Backchannel {
    url: String,
    got: Arc<Mutex<Vec<(String, String, String)>>>,
}

impl Backchannel {
    async fn start() -> Backchannel {
        use axum::extract::{Path as AxPath, State};
        use axum::http::HeaderMap;
        type Got = Arc<Mutex<Vec<(String, String, String)>>>;
        async fn record(
            State(got): State<Got>,
            AxPath(who): AxPath<String>,
            h: HeaderMap,
            body: String,
        ) -> &'static str {
            let ct = h.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
            got.lock().unwrap().push((who, ct, body));
            "ok"
        }
        let got: Got = Arc::default();
        let app = axum::Router::new().route("/bc/{who}", axum::routing::post(record)).with_state(got.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Backchannel { url, got }
    }

    fn uri(&self, who: &str) -> String {
        format!("{}/bc/{who}", self.url)
    }

    /// The `logout_token` POSTed for `who`, waiting up to `timeout`.
    async fn token_for(&self, who: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let found = self.got.lock().unwrap().iter().find(|(w, _, _)| w == who).cloned();
            if let Some((_, ct, body)) = found {
                assert!(ct.starts_with("application/x-www-form-urlencoded"), "logout token content type {ct:?}");
                let form: BTreeMap<String, String> = reqwest::Url::parse(&format!("http://x/?{body}"))
                    .unwrap()
                    .query_pairs()
                    .map(|(k, v)| (k.into_owned(), v.into_owned()))
                    .collect();
                return form.get("logout_token").unwrap_or_else(|| panic!("no logout_token in {body:?}")).clone();
            }
            assert!(Instant::now() < deadline, "no logout token for {who} within {timeout:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

// ---------------------------------------------------------------------------- scenarios --

/// Discovery lists exactly the documented values, and openid-client accepts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_lists_exactly_what_is_implemented() {
    let op = Op::start().await;
    let i = op.issuer();
    let r = send(raw().get(format!("{i}/.well-known/openid-configuration"))).await;
    r.expect(200);
    let d = &r.json;
    assert_eq!(d["issuer"], i);
    for (k, path) in [
        ("authorization_endpoint", "/oauth2/authorize"),
        ("token_endpoint", "/oauth2/token"),
        ("userinfo_endpoint", "/oauth2/userinfo"),
        ("end_session_endpoint", "/oauth2/logout"),
        ("jwks_uri", "/oauth2/jwks"),
    ] {
        assert_eq!(d[k], format!("{i}{path}"), "{k}: {d:#}");
    }
    assert_eq!(d["response_types_supported"], json!(["code"]), "{d:#}");
    assert_eq!(d["response_modes_supported"], json!(["query", "form_post"]), "{d:#}");
    assert_eq!(
        str_set(&d["grant_types_supported"]),
        set(&["authorization_code", "refresh_token", "client_credentials"])
    );
    assert_eq!(d["code_challenge_methods_supported"], json!(["S256"]), "{d:#}");
    assert_eq!(
        str_set(&d["token_endpoint_auth_methods_supported"]),
        set(&["client_secret_basic", "client_secret_post", "private_key_jwt", "tls_client_auth", "none"])
    );
    let algs = str_set(&d["id_token_signing_alg_values_supported"]);
    assert!(algs.contains("RS256") && algs.contains("ES256"), "{algs:?}");
    assert!(algs.iter().all(|a| a != "none" && !a.starts_with("HS")), "{algs:?}");
    assert_eq!(d["subject_types_supported"], json!(["public"]), "{d:#}");
    assert_eq!(str_set(&d["scopes_supported"]), set(&["openid", "profile", "email", "offline_access"]), "{d:#}");
    let claims = str_set(&d["claims_supported"]);
    for c in [
        "iss",
        "sub",
        "aud",
        "exp",
        "iat",
        "auth_time",
        "nonce",
        "at_hash",
        "amr",
        "acr",
        "sid",
        "email",
        "email_verified",
        "name",
        "preferred_username",
    ] {
        assert!(claims.contains(c), "claims_supported lacks {c}: {claims:?}");
    }
    for (k, want) in [
        ("backchannel_logout_supported", true),
        ("backchannel_logout_session_supported", true),
        ("authorization_response_iss_parameter_supported", true),
        ("claims_parameter_supported", false),
        ("request_parameter_supported", false),
    ] {
        assert_eq!(d[k], want, "{k}: {d:#}");
    }
    // The same document for RFC 8414, and openid-client takes it.
    let r2 = send(raw().get(format!("{i}/.well-known/oauth-authorization-server"))).await;
    r2.expect(200);
    assert_eq!(r2.json, r.json);
    let v = rp("discover", &json!({ "issuer": i })).await;
    assert_eq!(v["ok"], true, "{v:#}");
    assert_eq!(v["metadata"]["authorization_endpoint"], d["authorization_endpoint"]);
}

/// Registration: redirect URIs must be exact https (or loopback http), no fragment, no wildcard,
/// no userinfo; a public client gets only the code and refresh grants.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_validates_redirect_uris_and_public_clients() {
    let op = Op::start().await;
    let admin = Cred::Bearer(&op.admin);
    let base = |slug: &str, extra: Value| {
        let mut b = json!({
            "slug": slug, "name": slug, "grant_types": ["authorization_code"],
            "token_endpoint_auth_method": "client_secret_basic",
        });
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    for (i, bad) in [
        "http://app.acme.test/cb",
        "https://app.acme.test/cb#frag",
        "https://*.acme.test/cb",
        "https://user:pw@app.acme.test/cb",
        "app.acme.test/cb",
        "javascript:alert(1)",
    ]
    .iter()
    .enumerate()
    {
        let r =
            op.c.post(
                "/api/v1/organisations/acme/applications",
                &admin,
                &base(&format!("bad{i}"), json!({ "redirect_uris": [bad] })),
            )
            .await;
        assert_eq!(r.status, 400, "redirect URI {bad:?} must be refused: {}", r.text);
    }
    for (i, good) in
        ["http://127.0.0.1:8080/cb", "http://localhost/cb", "http://[::1]:9/cb", "https://app.acme.test/cb?x=1"]
            .iter()
            .enumerate()
    {
        let r =
            op.c.post(
                "/api/v1/organisations/acme/applications",
                &admin,
                &base(&format!("good{i}"), json!({ "redirect_uris": [good] })),
            )
            .await;
        assert_eq!(r.status, 201, "redirect URI {good:?} is allowed: {}", r.text);
    }
    let r = op
        .c
        .post(
            "/api/v1/organisations/acme/applications",
            &admin,
            &json!({
                "slug": "spa", "name": "spa", "token_endpoint_auth_method": "none",
                "grant_types": ["authorization_code", "client_credentials"], "redirect_uris": ["https://spa.acme.test/cb"],
            }),
        )
        .await;
    assert_eq!(r.status, 400, "a public client cannot use client_credentials: {}", r.text);
    let r =
        op.c.post(
            "/api/v1/organisations/acme/applications",
            &admin,
            &json!({
                "slug": "spa", "name": "spa", "token_endpoint_auth_method": "none",
                "grant_types": ["authorization_code", "refresh_token"], "redirect_uris": ["https://spa.acme.test/cb"],
            }),
        )
        .await;
    r.expect(201);
    assert!(r.json.get("client_secret").is_none_or(Value::is_null), "a public client has no secret: {}", r.text);
}

/// A public client (PKCE, `client_id` only): the full flow with login and emailed code, every
/// claim checked; the code flow's refresh token works for it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_client_code_flow_with_pkce() {
    let op = Op::start().await;
    let alice = op.user("alice", &["payments:reader"]).await;
    let app = op.app("spa", "none", json!({})).await;
    let jar = op.jar("alice");
    let v = op.login(&app, &alice, &jar, json!({})).await;
    assert_eq!(pages(&v), ["login", "code"], "password, then the emailed code: {:#}", v["trace"]);
    let cb = &v["callback"];
    assert_eq!(cb["state"], v["state"]);
    assert_eq!(cb["iss"], op.issuer(), "RFC 9207 iss in the authorization response");
    let jwks = op.jwks().await;
    check_tokens(&op, &jwks, &app, &alice, &v, AMR);
    assert!(op.active(v["tokens"]["access_token"].as_str().unwrap()).await);
    // A refresh by the public client (client_id only), through openid-client.
    let r = rp(
        "refresh",
        &json!({ "issuer": op.issuer(), "client": app.client(), "refresh_token": v["tokens"]["refresh_token"] }),
    )
    .await;
    assert_eq!(r["ok"], true, "{r:#}");
    assert_ne!(r["tokens"]["refresh_token"], v["tokens"]["refresh_token"], "rotated");
}

/// Confidential clients: `client_secret_basic` with `response_mode=form_post` and ES256 ID
/// tokens, `client_secret_post` with the default RS256 and a code flow without PKCE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confidential_clients_code_flow() {
    let op = Op::start().await;
    let alice = op.user("alice", &["payments:reader", "payments:admin"]).await;
    let basic = op.app("web", "client_secret_basic", json!({ "id_token_signed_response_alg": "ES256" })).await;
    let post = op.app("portal", "client_secret_post", json!({})).await;
    let jwks = op.jwks().await;
    let jar = op.jar("alice");
    let v = op.login(&basic, &alice, &jar, json!({ "params": { "response_mode": "form_post" } })).await;
    // The form_post answer: a page whose form goes to the redirect URI, no inline script.
    let last = v["trace"].as_array().unwrap().last().unwrap();
    assert_eq!(last["status"], 200, "form_post is a page: {last}");
    assert!(last["csp"].as_str().unwrap().contains(&basic.redirect_uri), "form-action allows the redirect URI: {last}");
    assert_eq!(v["callback"]["iss"], op.issuer());
    check_tokens(&op, &jwks, &basic, &alice, &v, AMR);
    let v = op.login(&post, &alice, &jar, json!({ "pkce": false, "scope": "openid email payments/read" })).await;
    check_tokens(&op, &jwks, &post, &alice, &v, AMR);
    assert!(v["tokens"]["refresh_token"].is_null(), "no offline_access, no refresh token: {}", v["tokens"]);
    assert!(v["id_token_claims"]["name"].is_null(), "no profile scope, no name: {}", v["id_token_claims"]);
}

/// `private_key_jwt`: the application's signing certificate, issued by the CA for an openssl
/// key, authenticates the code redemption and the refresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_key_jwt_client_code_flow() {
    let op = Op::start().await;
    let alice = op.user("alice", &["payments:reader"]).await;
    let mut app = op.app("signer", "private_key_jwt", json!({})).await;
    let admin = Cred::Bearer(&op.admin);
    let tpl = op.c.get("/api/v1/organisations/acme/applications/signer/csr-template?type=signing", &admin).await;
    tpl.expect(200);
    let w = op.work.path();
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(tpl.str("openssl_command"))
        .current_dir(w)
        .output()
        .unwrap_or_else(|e| panic!("cannot run sh/openssl: {e}"));
    assert!(out.status.success(), "openssl: {}", String::from_utf8_lossy(&out.stderr));
    let csr = std::fs::read_to_string(w.join("acme-signer-signing.csr")).unwrap();
    let r =
        op.c.post(
            "/api/v1/organisations/acme/certificates",
            &admin,
            &json!({ "type": "signing", "application": "signer", "csr": csr }),
        )
        .await;
    r.expect(201);
    let kid = r.str("x5t#S256");
    let jwks = send(raw().get(format!("{}/applications/acme$signer/jwks.json", op.s.url))).await;
    jwks.expect(200);
    let alg = jwks.json["keys"][0]["alg"].as_str().unwrap_or("ES256").to_owned();
    app.key = Some((w.join("acme-signer-signing.key"), alg, kid));
    let jar = op.jar("alice");
    let v = op.login(&app, &alice, &jar, json!({})).await;
    check_tokens(&op, &op.jwks().await, &app, &alice, &v, AMR);
    let r = rp(
        "refresh",
        &json!({ "issuer": op.issuer(), "client": app.client(), "refresh_token": v["tokens"]["refresh_token"] }),
    )
    .await;
    assert_eq!(r["ok"], true, "{r:#}");
    // Without the assertion, the client cannot redeem.
    let got = op.code(&app, &alice, &jar, json!({})).await;
    let code = got["callback"]["code"].as_str().unwrap();
    let r = send(raw().post(format!("{}/oauth2/token", op.s.url)).form(&[
        ("grant_type", "authorization_code"),
        ("code", code),
        ("redirect_uri", &app.redirect_uri),
        ("code_verifier", got["code_verifier"].as_str().unwrap()),
        ("client_id", &app.client_id),
    ]))
    .await;
    assert_oauth_error(&r, "invalid_client", "private_key_jwt client with client_id alone");
}

/// Refresh tokens rotate; the old one is refused after use, and reusing it revokes the family
/// (the newest one is refused too); another client's credentials get invalid_grant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_rotation_and_reuse_detection() {
    let op = Op::start().await;
    let alice = op.user("alice", &["payments:reader"]).await;
    let app = op.app("web", "client_secret_basic", json!({})).await;
    let other = op.app("other", "client_secret_basic", json!({})).await;
    let jar = op.jar("alice");
    let v = op.login(&app, &alice, &jar, json!({})).await;
    let rt0 = v["tokens"]["refresh_token"].as_str().unwrap().to_owned();

    let r1 = op.refresh(&app, &rt0).await;
    r1.expect(200);
    let rt1 = r1.str("refresh_token");
    assert_ne!(rt1, rt0, "rotated on use");
    assert_eq!(r1.json["token_type"].as_str().map(str::to_ascii_lowercase).as_deref(), Some("bearer"));
    let at1 = r1.str("access_token");
    assert!(op.active(&at1).await);
    let r2 = op.refresh(&app, &rt1).await;
    r2.expect(200);
    let rt2 = r2.str("refresh_token");

    // Reuse of rt0: refused, and the whole family goes (rt2, the newest, too).
    let r = op.refresh(&app, &rt0).await;
    assert_oauth_error(&r, "invalid_grant", "a used refresh token");
    let r = op.refresh(&app, &rt2).await;
    assert_oauth_error(&r, "invalid_grant", "the newest refresh token after reuse was detected");
    let r = op.refresh(&app, &rt1).await;
    assert_oauth_error(&r, "invalid_grant", "a used refresh token of the revoked family");

    // Another family: another client's credentials get invalid_grant.
    let v = op.login(&app, &alice, &jar, json!({})).await;
    let rt = v["tokens"]["refresh_token"].as_str().unwrap().to_owned();
    let r = op.refresh(&other, &rt).await;
    assert_oauth_error(&r, "invalid_grant", "another client's refresh token");

    // always_issue_refresh_token: a refresh token without offline_access.
    let always = op.app("always", "client_secret_basic", json!({ "always_issue_refresh_token": true })).await;
    let v = op.login(&always, &alice, &jar, json!({ "scope": "openid payments/read" })).await;
    assert!(v["tokens"]["refresh_token"].is_string(), "{}", v["tokens"]);
    // A client without the refresh_token grant gets none: offline_access is refused
    // (invalid_scope) or granted without a refresh token.
    let no_rt = op.app("nort", "client_secret_basic", json!({ "grant_types": ["authorization_code"] })).await;
    let v = op.flow(&no_rt, Some(&alice), &jar, json!({})).await;
    if v["ok"] == true {
        assert!(v["tokens"]["refresh_token"].is_null(), "{}", v["tokens"]);
    } else {
        assert_eq!(v["callback"]["error"], "invalid_scope", "{v:#}");
    }
    let v = op.login(&no_rt, &alice, &jar, json!({ "scope": "openid payments/read" })).await;
    assert!(v["tokens"]["refresh_token"].is_null(), "{}", v["tokens"]);
}

/// Userinfo: GET with `Bearer`, GET with lowercase `bearer`, POST with the token in the form
/// body; the claims follow the token's scopes; no or a bad token is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn userinfo_forms() {
    let op = Op::start().await;
    let alice = op.user("alice", &["payments:reader"]).await;
    let app = op.app("web", "client_secret_basic", json!({})).await;
    let jar = op.jar("alice");
    let v = op.login(&app, &alice, &jar, json!({})).await;
    let at = v["tokens"]["access_token"].as_str().unwrap().to_owned();
    let url = format!("{}/oauth2/userinfo", op.s.url);

    let a = op.userinfo_get(&at).await;
    a.expect(200);
    let b = send(raw().get(&url).header("authorization", format!("bearer {at}"))).await;
    b.expect(200);
    let c = send(raw().post(&url).form(&[("access_token", at.as_str())])).await;
    c.expect(200);
    let d = send(raw().post(&url).header("authorization", format!("BEARER {at}"))).await;
    d.expect(200);
    for r in [&a, &b, &c, &d] {
        assert_eq!(r.json["sub"], alice.id.as_str(), "{}", r.text);
        assert_eq!(r.json["email"], alice.email.as_str(), "{}", r.text);
        assert_eq!(r.json["name"], alice.name.as_str(), "{}", r.text);
        assert!(r.json["preferred_username"].is_string(), "{}", r.text);
    }
    // Only the claims the scopes allow.
    let v = op.login(&app, &alice, &jar, json!({ "scope": "openid" })).await;
    let r = op.userinfo_get(v["tokens"]["access_token"].as_str().unwrap()).await;
    r.expect(200);
    assert_eq!(r.json["sub"], alice.id.as_str());
    assert!(r.json.get("email").is_none() && r.json.get("name").is_none(), "openid alone: {}", r.text);
    // Refusals.
    let r = send(raw().get(&url)).await;
    assert_eq!(r.status, 401, "{}", r.text);
    assert!(r.header("www-authenticate").is_some_and(|h| h.to_ascii_lowercase().starts_with("bearer")));
    let mut forged = at.clone();
    forged.pop();
    forged.push(if at.ends_with('A') { 'B' } else { 'A' });
    let r = op.userinfo_get(&forged).await;
    assert_eq!(r.status, 401, "a forged token: {}", r.text);
    // A client-credentials token (no person) is no userinfo token.
    let cc = support::access_token(&op.s, support::ADMIN_ID, support::ADMIN_SECRET).await;
    let r = op.userinfo_get(&cc).await;
    assert!(matches!(r.status, 401 | 403), "a client's own token: {} {}", r.status, r.text);
}

/// Consent for an application that is not first party: asked once, remembered per scope set,
/// asked again for a new scope set or with prompt=consent; `deny` gives access_denied; prompt=none
/// without consent gives consent_required; the consent form is CSRF-protected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consent_page_remembered_and_denied() {
    let op = Op::start().await;
    let alice = op.user("alice", &["payments:reader"]).await;
    let third = op.app("partner", "client_secret_basic", json!({ "first_party": false })).await;
    let other = op.app("other", "client_secret_basic", json!({ "first_party": false })).await;
    let jar = op.jar("alice");
    let scope = "openid profile payments/read";

    // No decision given: the browser stops at the consent page.
    let v = op.flow(&third, Some(&alice), &jar, json!({ "scope": scope })).await;
    assert_eq!(v["ok"], false, "{v:#}");
    assert_eq!(pages(&v), ["login", "code", "consent"], "{:#}", v["trace"]);
    let page = &v["stop"];
    assert!(page["text"].as_str().unwrap().contains("payments/read"), "the consent page lists the scopes: {page}");
    // The consent form with a wrong or missing CSRF token is refused.
    let auth_url = v["authorization_url"].as_str().unwrap();
    for (set, remove) in [(json!({ "csrf_token": "wrong" }), json!([])), (json!({}), json!(["csrf_token"]))] {
        let r = rp(
            "submit",
            &json!({
                "issuer": op.issuer(), "url": auth_url, "jar": jar, "pick": { "action": "/oauth2/consent" },
                "set": set, "remove": remove, "button": ["decision", "allow"],
            }),
        )
        .await;
        assert_eq!(r["ok"], true, "{r:#}");
        let st = r["response"]["status"].as_u64().unwrap();
        assert!((400..500).contains(&st), "consent without a valid CSRF token: {:#}", r["response"]);
        assert!(r["response"]["location"].is_null(), "{:#}", r["response"]);
    }
    let v = op.login(&third, &alice, &jar, json!({ "scope": scope, "consent": "allow" })).await;
    assert_eq!(pages(&v), ["consent"], "signed in already, consent asked: {:#}", v["trace"]);
    check_tokens(&op, &op.jwks().await, &third, &alice, &v, AMR);
    // Remembered: no consent page the second time (the browser would stop there).
    let v = op.login(&third, &alice, &jar, json!({ "scope": scope })).await;
    assert!(pages(&v).is_empty(), "no page the second time: {:#}", v["trace"]);
    // A new scope set asks again.
    let v = op.flow(&third, Some(&alice), &jar, json!({ "scope": "openid profile email payments/read" })).await;
    assert_eq!(pages(&v), ["consent"], "a new scope set needs consent: {:#}", v["trace"]);
    // prompt=consent asks even when remembered.
    let v = op.flow(&third, Some(&alice), &jar, json!({ "scope": scope, "params": { "prompt": "consent" } })).await;
    assert_eq!(pages(&v), ["consent"], "prompt=consent: {:#}", v["trace"]);

    // prompt=none without consent: consent_required.
    let v = op.flow(&other, Some(&alice), &jar, json!({ "scope": scope, "params": { "prompt": "none" } })).await;
    assert_eq!(v["callback"]["error"], "consent_required", "{v:#}");
    assert_eq!(v["callback"]["state"], v["state"]);
    assert_eq!(v["callback"]["iss"], op.issuer());
    // Deny: access_denied back to the application.
    let v = op.flow(&other, Some(&alice), &jar, json!({ "scope": scope, "consent": "deny" })).await;
    assert_eq!(pages(&v), ["consent"], "{:#}", v["trace"]);
    assert_eq!(v["callback"]["error"], "access_denied", "{v:#}");
    assert_eq!(v["callback"]["state"], v["state"]);
    assert_eq!(v["callback"]["iss"], op.issuer());
    // A denial is not remembered as consent.
    let v = op.flow(&other, Some(&alice), &jar, json!({ "scope": scope })).await;
    assert_eq!(pages(&v), ["consent"], "{:#}", v["trace"]);

    // /account lists the consent and revokes it; then the consent page comes back.
    let account = rp("browse", &json!({ "issuer": op.issuer(), "url": "/account", "jar": jar })).await;
    assert!(account["stop"]["text"].as_str().unwrap().contains(&third.client_id), "{:#}", account["stop"]);
    let r = rp(
        "submit",
        &json!({ "issuer": op.issuer(), "url": "/account", "jar": jar, "pick": { "action": "/account/consents/revoke" } }),
    )
    .await;
    assert_eq!(r["ok"], true, "{r:#}");
    assert_eq!(
        r["form"]["fields"].as_array().unwrap().iter().find(|f| f[0] == "client_id").unwrap()[1],
        third.client_id.as_str()
    );
    assert!(r["response"]["status"].as_u64().unwrap() < 400, "{:#}", r["response"]);
    let v = op.flow(&third, Some(&alice), &jar, json!({ "scope": scope })).await;
    assert_eq!(pages(&v), ["consent"], "a revoked consent is asked again: {:#}", v["trace"]);
}

/// Single sign-on: a second application of the organisation asks no password (no /login page at
/// all), with the same session id and auth_time; another browser is another session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sso_across_two_applications() {
    let op = Op::start().await;
    let alice = op.user("alice", &["payments:reader"]).await;
    let one = op.app("one", "client_secret_basic", json!({})).await;
    let two = op.app("two", "none", json!({})).await;
    let jar = op.jar("alice");
    let a = op.login(&one, &alice, &jar, json!({})).await;
    assert!(visited_login(&a));
    let b = op.login(&two, &alice, &jar, json!({})).await;
    assert!(!visited_login(&b), "no /login page for the second application: {:#}", b["trace"]);
    assert!(pages(&b).is_empty(), "{:#}", b["trace"]);
    let jwks = op.jwks().await;
    check_tokens(&op, &jwks, &two, &alice, &b, AMR);
    let (ia, ib) = (&a["id_token_claims"], &b["id_token_claims"]);
    assert_eq!(ia["sid"], ib["sid"], "one SSO session");
    assert_eq!(ia["auth_time"], ib["auth_time"], "one sign-in");
    assert_eq!(ia["sub"], ib["sub"]);
    // prompt=none with the session: a code without any page.
    let c = op.login(&two, &alice, &jar, json!({ "params": { "prompt": "none" } })).await;
    assert!(c["trace"].as_array().unwrap().iter().all(|e| e["html"] == false), "{:#}", c["trace"]);
    // Another browser signs in again and gets another session.
    let jar2 = op.jar("alice-2");
    let d = op.login(&two, &alice, &jar2, json!({})).await;
    assert!(visited_login(&d));
    assert_ne!(d["id_token_claims"]["sid"], ia["sid"], "another browser, another session");
}

/// prompt=login forces the sign-in again; max_age older than the sign-in forces it, a younger one
/// does not; auth_time follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompt_login_and_max_age() {
    let op = Op::start().await;
    let alice = op.user("alice", &["payments:reader"]).await;
    let app = op.app("web", "client_secret_basic", json!({})).await;
    let jar = op.jar("alice");
    let v1 = op.login(&app, &alice, &jar, json!({})).await;
    let t1 = v1["id_token_claims"]["auth_time"].as_i64().unwrap();
    tokio::time::sleep(Duration::from_millis(2100)).await;

    let v2 = op.login(&app, &alice, &jar, json!({ "params": { "prompt": "login" } })).await;
    assert_eq!(pages(&v2), ["login", "code"], "prompt=login signs in again: {:#}", v2["trace"]);
    let t2 = v2["id_token_claims"]["auth_time"].as_i64().unwrap();
    assert!(t2 > t1, "a new auth_time: {t1} → {t2}");

    let v3 = op.login(&app, &alice, &jar, json!({ "params": { "max_age": "3600" } })).await;
    assert!(!visited_login(&v3), "max_age=3600: no sign-in: {:#}", v3["trace"]);
    assert_eq!(v3["id_token_claims"]["auth_time"], t2, "auth_time with max_age");
    tokio::time::sleep(Duration::from_millis(2100)).await;

    let v4 = op.login(&app, &alice, &jar, json!({ "params": { "max_age": "1" } })).await;
    assert_eq!(pages(&v4), ["login", "code"], "max_age older than the sign-in: {:#}", v4["trace"]);
    let t4 = v4["id_token_claims"]["auth_time"].as_i64().unwrap();
    assert!(t4 > t2 && t4 >= now() - 30, "auth_time {t4} is the new sign-in");
    check_tokens(&op, &op.jwks().await, &app, &alice, &v4, AMR);
}

/// An authenticator app: enrolled on /account/totp (the code computed from the secret shown),
/// then the second factor is /login/totp (no mail).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn totp_enrolment_then_login() {
    let op = Op::start().await;
    let bob = op.user("bob", &["payments:reader"]).await;
    let app = op.app("web", "client_secret_basic", json!({})).await;
    let jar = op.jar("bob");
    op.login(&app, &bob, &jar, json!({})).await;
    let e =
        rp("totp-enrol", &json!({ "issuer": op.issuer(), "jar": jar, "user": bob.json(), "sink_dir": op.sink_dir() }))
            .await;
    assert_eq!(e["ok"], true, "{e:#}");
    let secret = e["secret"].as_str().unwrap().to_owned();
    let step = e["step"].as_i64().unwrap();
    let st = e["stop"]["status"].as_u64().unwrap_or(0);
    assert!(st < 400, "enrolment accepted the code: {:#}", e["stop"]);
    let mails_before = op.sink.mails_to(&bob.email).len();

    // A new browser: password, then the authenticator code.
    let jar2 = op.jar("bob-2");
    let user = json!({ "email": bob.email, "password": bob.password, "totp_secret": secret, "totp_after_step": step });
    let v = op.flow(&app, None, &jar2, json!({ "user": user })).await;
    assert_eq!(v["ok"], true, "{v:#}");
    assert_eq!(pages(&v), ["login", "totp"], "the authenticator app instead of the emailed code: {:#}", v["trace"]);
    check_tokens(&op, &op.jwks().await, &app, &bob, &v, AMR);
    assert_eq!(op.sink.mails_to(&bob.email).len(), mails_before, "no code mailed");

    // A wrong TOTP code is refused (and no session).
    let jar3 = op.jar("bob-3");
    let r = rp(
        "submit",
        &json!({
            "issuer": op.issuer(), "url": "/login?return_to=/account", "jar": jar3, "pick": { "field": "password" },
            "set": { "email": bob.email, "password": bob.password },
        }),
    )
    .await;
    let loc = r["response"]["location"].as_str().unwrap_or_default().to_owned();
    assert!(loc.contains("/login/totp"), "after the password, the TOTP page: {:#}", r["response"]);
    let wrong = rp(
        "submit",
        &json!({
            "issuer": op.issuer(), "url": loc, "jar": jar3, "pick": { "field": "code" },
            "set": { "code": "000000" },
        }),
    )
    .await;
    assert!(
        wrong["response"]["set_cookie"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| !c.as_str().unwrap().starts_with("portcullis_sso=")),
        "no SSO session after a wrong code: {:#}",
        wrong["response"]
    );
    let back = wrong["response"]["location"].as_str().unwrap_or_default();
    assert!(!back.contains("/account"), "a wrong code does not sign in: {:#}", wrong["response"]);
}

/// RP-initiated logout: bad hints and unregistered URIs get an error page; a valid one ends the
/// session (SSO gone, refresh tokens refused), redirects with state, and back-channel logout
/// tokens reach both applications, signed, with the session id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rp_initiated_logout_with_backchannel() {
    let op = Op::start().await;
    let bc = Backchannel::start().await;
    let alice = op.user("alice", &["payments:reader"]).await;
    let bye = "https://l.acme.test/bye";
    let l = op
        .app(
            "l",
            "client_secret_basic",
            json!({ "post_logout_redirect_uris": [bye], "backchannel_logout_uri": bc.uri("l") }),
        )
        .await;
    let m = op.app("m", "none", json!({ "backchannel_logout_uri": bc.uri("m") })).await;
    let jar = op.jar("alice");
    let vl = op.login(&l, &alice, &jar, json!({})).await;
    let vm = op.login(&m, &alice, &jar, json!({})).await;
    let sid = vl["id_token_claims"]["sid"].as_str().unwrap().to_owned();
    assert_eq!(vm["id_token_claims"]["sid"], sid.as_str());
    let hint = vl["tokens"]["id_token"].as_str().unwrap().to_owned();

    let logout = |extra: Value| {
        let mut a = json!({ "issuer": op.issuer(), "client": l.client(), "jar": jar });
        for (k, v) in extra.as_object().unwrap() {
            a[k] = v.clone();
        }
        async move { rp("logout", &a).await }
    };
    // A tampered hint, an alg=none hint, an unregistered URI, the registered one with a query.
    let mut tampered = hint.clone();
    let last = tampered.pop().unwrap();
    tampered.push(if last == 'A' { 'B' } else { 'A' });
    let parts: Vec<&str> = hint.split('.').collect();
    let none_header = base64_url(br#"{"alg":"none","typ":"JWT"}"#);
    let alg_none = format!("{none_header}.{}.", parts[1]);
    for (what, h, uri) in [
        ("a tampered hint", tampered.as_str(), bye.to_owned()),
        ("an alg=none hint", alg_none.as_str(), bye.to_owned()),
        ("an unregistered URI", hint.as_str(), "https://evil.test/bye".to_owned()),
        ("added query parameters", hint.as_str(), format!("{bye}?x=1")),
    ] {
        let r = logout(json!({ "id_token_hint": h, "post_logout_redirect_uri": uri, "state": "s1" })).await;
        assert_eq!(r["ok"], true, "{r:#}");
        let stop = &r["stop"];
        assert_eq!(stop["kind"], "error", "{what}: an error page, no redirect: {stop:#}");
        assert_eq!(stop["status"], 400, "{what}: {stop:#}");
        assert!(stop["location"].is_null(), "{what}: {stop:#}");
    }
    // The session survived those.
    let still = op.login(&m, &alice, &jar, json!({ "params": { "prompt": "none" } })).await;
    assert!(!visited_login(&still));
    assert!(bc.got.lock().unwrap().is_empty(), "no logout yet");

    let rt = vl["tokens"]["refresh_token"].as_str().unwrap().to_owned();
    let r = logout(json!({ "id_token_hint": hint, "post_logout_redirect_uri": bye, "state": "bye-state" })).await;
    assert_eq!(r["ok"], true, "{r:#}");
    let stop = &r["stop"];
    assert_eq!(stop["kind"], "external", "redirected to the application: {stop:#}");
    assert!(stop["url"].as_str().unwrap().starts_with(bye), "{stop:#}");
    assert_eq!(stop["params"]["state"], "bye-state", "{stop:#}");

    // The SSO cookie no longer works; the refresh token is refused.
    let v = op.flow(&m, Some(&alice), &jar, json!({ "params": { "prompt": "none" } })).await;
    assert_eq!(v["callback"]["error"], "login_required", "the session ended: {v:#}");
    let r = op.refresh(&l, &rt).await;
    assert_oauth_error(&r, "invalid_grant", "a refresh token of the ended session");

    // Back-channel logout tokens for both applications.
    for (who, app) in [("l", &l), ("m", &m)] {
        let token = bc.token_for(who, Duration::from_secs(15)).await;
        let v = rp(
            "verify-jwt",
            &json!({ "issuer": op.issuer(), "token": token, "typ": "logout+jwt", "audience": app.client_id }),
        )
        .await;
        assert_eq!(v["ok"], true, "the logout token for {who} verifies against /oauth2/jwks: {v:#}");
        let c = &v["claims"];
        assert_eq!(c["iss"], op.issuer());
        assert_eq!(c["sub"], alice.id.as_str(), "{c}");
        assert_eq!(c["sid"], sid.as_str(), "the ID token's sid: {c}");
        assert!(c["jti"].is_string() && c["iat"].is_i64() && c["exp"].is_i64(), "{c}");
        assert_eq!(c["events"][BACKCHANNEL_EVENT], json!({}), "the events claim: {c}");
        assert!(c.get("nonce").is_none(), "a logout token has no nonce: {c}");
    }

    // Without a hint: a confirmation page with a CSRF-protected form; then the session ends.
    let jar2 = op.jar("alice-2");
    op.login(&m, &alice, &jar2, json!({})).await;
    let r = logout(json!({ "jar": jar2 })).await;
    assert_eq!(r["stop"]["kind"], "page", "a confirmation page: {r:#}");
    let fields: Vec<&str> = r["stop"]["forms"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|f| f["fields"].as_array().unwrap().iter().map(|x| x[0].as_str().unwrap()))
        .collect();
    assert!(fields.contains(&"csrf_token"), "{r:#}");
    let still = op.login(&m, &alice, &jar2, json!({ "params": { "prompt": "none" } })).await;
    assert!(!visited_login(&still), "not logged out before confirming");
    let url = r["url"].as_str().unwrap();
    let bad =
        rp("submit", &json!({ "issuer": op.issuer(), "url": url, "jar": jar2, "pick": { "field": "csrf_token" }, "set": { "csrf_token": "x" } }))
            .await;
    let st = bad["response"]["status"].as_u64().unwrap();
    assert!((400..500).contains(&st), "logout confirmation with a wrong CSRF token: {bad:#}");
    let r = logout(json!({ "jar": jar2, "confirm_logout": true })).await;
    assert_eq!(r["ok"], true, "{r:#}");
    let v = op.flow(&m, Some(&alice), &jar2, json!({ "params": { "prompt": "none" } })).await;
    assert_eq!(v["callback"]["error"], "login_required", "confirmed logout ended the session: {v:#}");
}

fn base64_url(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// The first link to `{issuer}/PATH?…` in the text part of `mail`.
fn link_in(mail: &support::Mail, issuer: &str, path: &str) -> String {
    let text = mail.part("text/plain");
    let prefix = format!("{issuer}{path}");
    let at = text.find(&prefix).unwrap_or_else(|| panic!("no {prefix} link in {text}"));
    text[at..].chars().take_while(|c| !c.is_whitespace() && !"<>\"')".contains(*c)).collect()
}

/// Invitation: the admin invites, the mail carries a single-use link, the page sets the password,
/// and the person signs in with it (address verified).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invitation_then_sign_in() {
    let op = Op::start().await;
    let app = op.app("web", "client_secret_basic", json!({})).await;
    let email = "carol@acme.test";
    let r =
        op.c.post(
            "/api/v1/organisations/acme/invitations",
            &Cred::Bearer(&op.admin),
            &json!({ "email": email, "name": "carol", "roles": ["payments:reader"] }),
        )
        .await;
    assert!((200..=202).contains(&r.status), "invitation: {} {}", r.status, r.text);
    let id = r.json["id"].as_str().or(r.json["user_id"].as_str()).or(r.json["user"]["id"].as_str()).map(str::to_owned);
    let mail = op.sink.next_mail(email, "", MAIL_TIMEOUT).await;
    let link = link_in(&mail, op.issuer(), "/invite?token=");
    let carol = User {
        id: id.unwrap_or_default(),
        email: email.to_owned(),
        name: "carol".to_owned(),
        password: format!("carol-pw-{}", random_hex(12)),
        roles: vec!["payments:reader".to_owned()],
    };
    // No password yet: nobody signs in as carol.
    let jar = op.jar("carol");
    let v = rp(
        "browse",
        &json!({ "issuer": op.issuer(), "url": link, "jar": jar, "user": carol.json(), "sink_dir": op.sink_dir() }),
    )
    .await;
    assert_eq!(v["ok"], true, "{v:#}");
    assert!(pages(&v).first().is_some_and(|p| p == "invite"), "the invitation page: {:#}", v["trace"]);
    assert!(v["stop"]["status"].as_u64().unwrap() < 400, "the password was set: {:#}", v["stop"]);
    // The link is single use.
    let again = rp("browse", &json!({ "issuer": op.issuer(), "url": link, "jar": op.jar("x") })).await;
    let form_again = again["stop"]["forms"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["fields"].as_array().unwrap().iter().any(|x| x[0] == "password_confirm"));
    assert!(!form_again, "a used invitation link sets no password again: {:#}", again["stop"]);
    // Signs in with the password; the address is verified.
    let v = op.login(&app, &carol, &op.jar("carol-2"), json!({})).await;
    let sub = v["id_token_claims"]["sub"].as_str().unwrap().to_owned();
    if !carol.id.is_empty() {
        assert_eq!(sub, carol.id, "the invited user");
    }
    let carol = User { id: sub, ..carol };
    check_tokens(&op, &op.jwks().await, &app, &carol, &v, AMR);
    assert_eq!(v["id_token_claims"]["email_verified"], true, "the invitation verified the address");
}

/// Self-registration: off by default (no form); on after PATCH; the answer does not tell whether
/// the address has an account; the link sets a password and the person signs in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_registration_off_by_default_then_on() {
    let op = Op::start().await;
    let alice = op.user("alice", &["payments:reader"]).await;
    let app = op.app("web", "client_secret_basic", json!({})).await;
    let r = op.get(&format!("{}/register?org=acme", op.s.url)).await;
    assert!(matches!(r.status, 403 | 404), "self-registration is off by default: {} {}", r.status, r.text);
    assert!(!r.text.contains("name=\"email\""), "no registration form: {}", r.text);

    let r =
        op.c.call(
            Method::PATCH,
            "/api/v1/organisations/acme",
            &Cred::Bearer(&op.admin),
            Some(&json!({ "self_registration": true })),
        )
        .await;
    r.expect(200);
    let r = op.get(&format!("{}/register?org=acme", op.s.url)).await;
    r.expect(200);

    // The registration form is CSRF-protected too.
    let r = rp(
        "submit",
        &json!({
            "issuer": op.issuer(), "url": "/register?org=acme", "jar": op.jar("reg"), "pick": { "field": "email" },
            "set": { "email": "eve@acme.test", "name": "eve" }, "remove": ["csrf_token"],
        }),
    )
    .await;
    let st = r["response"]["status"].as_u64().unwrap();
    assert!((400..500).contains(&st), "registration without a CSRF token: {:#}", r["response"]);
    let register = |email: &str| {
        let a = json!({
            "issuer": op.issuer(), "url": "/register?org=acme", "jar": op.jar("reg"),
            "register": { "email": email, "name": "dave" },
        });
        async move { rp("browse", &a).await }
    };
    let new = register("dave@acme.test").await;
    let existing = register(&alice.email).await;
    for v in [&new, &existing] {
        assert_eq!(v["ok"], true, "{v:#}");
        assert_eq!(pages(v), ["register"], "{:#}", v["trace"]);
    }
    assert_eq!(
        new["stop"]["status"], existing["stop"]["status"],
        "same answer: {:#} / {:#}",
        new["stop"], existing["stop"]
    );
    assert_eq!(new["stop"]["path"], existing["stop"]["path"]);
    assert_eq!(new["stop"]["title"], existing["stop"]["title"]);

    let mail = op.sink.next_mail("dave@acme.test", "", MAIL_TIMEOUT).await;
    assert!(op.sink.mails_to("eve@acme.test").is_empty(), "the refused form sent nothing");
    let link = link_in(&mail, op.issuer(), "/invite?token=");
    let dave = User {
        id: String::new(),
        email: "dave@acme.test".to_owned(),
        name: "dave".to_owned(),
        password: format!("dave-pw-{}", random_hex(12)),
        roles: vec![],
    };
    let v = rp(
        "browse",
        &json!({ "issuer": op.issuer(), "url": link, "jar": op.jar("dave"), "user": dave.json(), "sink_dir": op.sink_dir() }),
    )
    .await;
    assert_eq!(v["ok"], true, "{v:#}");
    assert!(pages(&v).first().is_some_and(|p| p == "invite"), "{:#}", v["trace"]);
    let v = op.login(&app, &dave, &op.jar("dave-2"), json!({ "scope": "openid email profile" })).await;
    assert_eq!(v["id_token_claims"]["email"], "dave@acme.test");
    assert_eq!(v["id_token_claims"]["email_verified"], true);
    assert_eq!(v["access_token_claims"]["org"], "acme");
}

// ------------------------------------------------------------------ negative scenarios --

/// Code reuse: the second redemption fails with invalid_grant and revokes what the first one
/// issued (access token and refresh token).
async fn code_reuse(wait: Duration) {
    let op = Op::start().await;
    let alice = op.user("alice", &["payments:reader"]).await;
    let app = op.app("web", "client_secret_basic", json!({})).await;
    let jar = op.jar("alice");
    let got = op.code(&app, &alice, &jar, json!({})).await;
    let first = op.redeem(&app, &got).await;
    first.expect(200);
    let at = first.str("access_token");
    let rt = first.str("refresh_token");
    assert!(op.active(&at).await);
    op.userinfo_get(&at).await.expect(200);
    tokio::time::sleep(wait).await;
    let second = op.redeem(&app, &got).await;
    assert_oauth_error(&second, "invalid_grant", "a code redeemed twice");
    assert!(!op.active(&at).await, "the first redemption's access token is revoked");
    let r = op.userinfo_get(&at).await;
    assert_eq!(r.status, 401, "userinfo with the revoked access token: {}", r.text);
    let r = op.refresh(&app, &rt).await;
    assert_oauth_error(&r, "invalid_grant", "the first redemption's refresh token");
    // A third time, still invalid_grant.
    assert_oauth_error(&op.redeem(&app, &got).await, "invalid_grant", "a third redemption");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn code_reuse_immediately_revokes_tokens() {
    code_reuse(Duration::ZERO).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn code_reuse_after_30_seconds_revokes_tokens() {
    code_reuse(Duration::from_secs(30)).await;
}

/// An unknown client, an unregistered redirect URI (every near miss of the conformance suite),
/// or no redirect URI with two registered: an error page, never a redirect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_uri_errors_show_a_page_and_never_redirect() {
    let op = Op::start().await;
    let r1 = "https://app.acme.test/cb";
    let r2 = "https://app.acme.test/other";
    let mut app = op.app("app", "client_secret_basic", json!({ "redirect_uris": [r1, r2] })).await;
    app.redirect_uri = r1.to_owned();
    let disabled = op.app("off", "client_secret_basic", json!({})).await;
    op.c.call(
        Method::PATCH,
        "/api/v1/organisations/acme/applications/off",
        &Cred::Bearer(&op.admin),
        Some(&json!({ "enabled": false })),
    )
    .await
    .expect(200);
    let params = |client_id: &str, redirect: Option<&str>| {
        let mut p = vec![
            ("response_type", "code".to_owned()),
            ("client_id", client_id.to_owned()),
            ("scope", "openid".to_owned()),
            ("state", "st".to_owned()),
            ("nonce", "nn".to_owned()),
        ];
        if let Some(r) = redirect {
            p.push(("redirect_uri", r.to_owned()));
        }
        p
    };
    let url = |p: &[(&str, String)]| {
        let p: Vec<(&str, &str)> = p.iter().map(|(k, v)| (*k, v.as_str())).collect();
        op.authorize_url(&p)
    };
    // The registered URI works (to the login page): the refusals below are about the URI.
    let ok = op.get(&url(&params(&app.client_id, Some(r1)))).await;
    assert!(matches!(ok.status, 302 | 303), "{} {}", ok.status, ok.text);
    assert!(ok.header("location").unwrap().contains("/login"), "{:?}", ok.header("location"));

    let near_misses = [
        "https://app.acme.test/cb/",
        "https://app.acme.test/CB",
        "https://APP.acme.test/cb",
        "HTTPS://app.acme.test/cb",
        "https://app.acme.test:443/cb",
        "https://app.acme.test/cb?x=1",
        "https://app.acme.test/cb#frag",
        "https://app.acme.test/cb/..;/other",
        "https://app.acme.test/cb/../other",
        "https://app.acme.test/%63b",
        "https://app.acme.test%40evil.test/cb",
        "https://app.acme.test@evil.test/cb",
        "https://evil.test/cb?https://app.acme.test/cb",
        "https://evil.test/https://app.acme.test/cb",
        "http://app.acme.test/cb",
        "https://app.acme.test.evil.test/cb",
        "https://app.acme.test/cb%00",
        "",
    ];
    for bad in near_misses {
        let r = op.get(&url(&params(&app.client_id, Some(bad)))).await;
        assert_error_page(&r, &format!("redirect_uri {bad:?}"));
    }
    // The registered URI percent-encoded in the query differently is still the same string: fine.
    let r = op.get(&url(&params(&app.client_id, None))).await;
    assert_error_page(&r, "no redirect_uri with two registered");
    let r = op.get(&url(&params("acme$nobody", Some(r1)))).await;
    assert_error_page(&r, "an unknown client");
    let r = op.get(&url(&params("", Some(r1)))).await;
    assert_error_page(&r, "an empty client_id");
    let r = op.get(&format!("{}/oauth2/authorize?response_type=code&redirect_uri={r1}", op.s.url)).await;
    assert_error_page(&r, "no client_id");
    let r = op.get(&url(&params(&disabled.client_id, Some(&disabled.redirect_uri)))).await;
    assert_error_page(&r, "a disabled client");
    // Another application's registered URI.
    let r = op.get(&url(&params(&app.client_id, Some(&disabled.redirect_uri)))).await;
    assert_error_page(&r, "another application's redirect URI");
    // Duplicate client_id: never a redirect to somewhere unchecked.
    let mut dup = params(&app.client_id, Some(r1));
    dup.push(("client_id", disabled.client_id.clone()));
    let r = op.get(&url(&dup)).await;
    if r.status == 400 {
        assert_error_page(&r, "client_id twice");
    } else {
        assert_error_redirect(&r, &op, &app, "invalid_request", "st");
    }
    // The POST form of the authorization request refuses the same.
    let r = send_page(raw().post(format!("{}/oauth2/authorize", op.s.url)).form(&[
        ("response_type", "code"),
        ("client_id", app.client_id.as_str()),
        ("redirect_uri", "https://evil.test/cb"),
        ("scope", "openid"),
    ]))
    .await;
    assert_error_page(&r, "POST with an unregistered redirect_uri");
}

/// Errors about anything but the client and redirect URI go back to the application with
/// `error`, `state` and `iss`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_errors_go_back_to_the_application() {
    let op = Op::start().await;
    let alice = op.user("alice", &["payments:reader"]).await;
    let public = op.app("spa", "none", json!({})).await;
    let web = op.app("web", "client_secret_basic", json!({})).await;
    let challenge = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM";
    let base = |app: &App| -> Vec<(&'static str, String)> {
        vec![
            ("response_type", "code".to_owned()),
            ("client_id", app.client_id.clone()),
            ("redirect_uri", app.redirect_uri.clone()),
            ("scope", "openid".to_owned()),
            ("state", "st-1".to_owned()),
            ("nonce", "n-1".to_owned()),
            ("code_challenge", challenge.to_owned()),
            ("code_challenge_method", "S256".to_owned()),
        ]
    };
    let with = |app: &App, change: &[(&'static str, Option<&str>)]| {
        let mut p = base(app);
        for (k, v) in change {
            p.retain(|(pk, _)| pk != k);
            if let Some(v) = v {
                p.push((k, (*v).to_owned()));
            }
        }
        let p: Vec<(&str, &str)> = p.iter().map(|(k, v)| (*k, v.as_str())).collect();
        op.authorize_url(&p)
    };
    // Sanity: the base request leads to the login page.
    let r = op.get(&with(&public, &[])).await;
    assert!(r.header("location").is_some_and(|l| l.contains("/login")), "{} {:?}", r.status, r.header("location"));

    type Change<'a> = Vec<(&'static str, Option<&'a str>)>;
    let cases: Vec<(&str, &App, Change<'_>, &str)> = vec![
        ("plain PKCE", &public, vec![("code_challenge_method", Some("plain"))], "invalid_request"),
        (
            "public client without PKCE",
            &public,
            vec![("code_challenge", None), ("code_challenge_method", None)],
            "invalid_request",
        ),
        ("response_type=token", &web, vec![("response_type", Some("token"))], "unsupported_response_type"),
        ("response_type=id_token", &web, vec![("response_type", Some("id_token"))], "unsupported_response_type"),
        (
            "response_type=code id_token",
            &web,
            vec![("response_type", Some("code id_token"))],
            "unsupported_response_type",
        ),
        ("no response_type", &web, vec![("response_type", None)], "invalid_request"),
        ("a scope the client is not allowed", &web, vec![("scope", Some("openid payments/write"))], "invalid_scope"),
        ("a challenge of the wrong form", &public, vec![("code_challenge", Some("short"))], "invalid_request"),
        ("an unknown challenge method", &public, vec![("code_challenge_method", Some("S512"))], "invalid_request"),
        ("prompt=none without a session", &web, vec![("prompt", Some("none"))], "login_required"),
    ];
    for (what, app, change, error) in cases {
        let r = op.get(&with(app, &change)).await;
        assert!(
            matches!(r.status, 302 | 303),
            "{what}: want a redirect: {} {:?} {}",
            r.status,
            r.header("x-error"),
            r.text
        );
        let (_, p) = redirect_of(&r);
        assert_eq!(p.get("error").map(String::as_str), Some(error), "{what}: {p:?}");
        assert_error_redirect(&r, &op, app, error, "st-1");
    }
    // Duplicated parameters.
    for dup in ["scope", "state", "redirect_uri", "response_type", "code_challenge", "nonce"] {
        let mut p = base(&web);
        let v = p.iter().find(|(k, _)| *k == dup).unwrap().1.clone();
        p.push((dup, v));
        let p: Vec<(&str, &str)> = p.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let r = op.get(&op.authorize_url(&p)).await;
        if dup == "redirect_uri" && r.status == 400 {
            assert_error_page(&r, "redirect_uri twice");
            continue;
        }
        assert!(matches!(r.status, 302 | 303), "{dup} twice: {} {:?}", r.status, r.header("x-error"));
        let (base_uri, q) = redirect_of(&r);
        assert_eq!(base_uri, web.redirect_uri, "{dup} twice");
        assert_eq!(q.get("error").map(String::as_str), Some("invalid_request"), "{dup} twice: {q:?}");
    }
    // The nonce round-trips, and unknown parameters are ignored.
    let jar = op.jar("alice");
    let v = op
        .login(&web, &alice, &jar, json!({ "params": { "ui_locales": "de", "foo": "bar", "display": "page" } }))
        .await;
    assert_eq!(v["id_token_claims"]["nonce"], v["nonce"]);
}

/// Redeems `got`'s code as `app`, with this verifier and redirect URI (default: the app's).
async fn redeem_with(op: &Op, app: &App, got: &Value, verifier: Option<String>, redirect: Option<String>) -> Resp {
    let code = got["callback"]["code"].as_str().unwrap();
    let redirect = redirect.unwrap_or_else(|| app.redirect_uri.clone());
    let mut form = vec![("grant_type", "authorization_code"), ("code", code), ("redirect_uri", &redirect)];
    if let Some(v) = &verifier {
        form.push(("code_verifier", v));
    }
    op.token(app, &form).await
}

/// The token endpoint: PKCE (missing, wrong, malformed, or a verifier without a challenge), the
/// redirect URI, the client the code was issued to, the refresh token's client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_refusals() {
    let op = Op::start().await;
    let alice = op.user("alice", &["payments:reader"]).await;
    let public = op.app("spa", "none", json!({})).await;
    let web = op.app("web", "client_secret_basic", json!({})).await;
    let other = op.app("other", "client_secret_post", json!({})).await;
    let jar = op.jar("alice");
    op.login(&public, &alice, &jar, json!({})).await;

    let cases: Vec<(&str, Option<String>, Option<String>, &App)> = vec![
        ("no code_verifier", None, None, &public),
        ("a wrong code_verifier", Some(other_verifier()), None, &public),
        ("a code_verifier too short", Some("a".repeat(42)), None, &public),
        ("a code_verifier with a bad character", Some(format!("{}+", "a".repeat(50))), None, &public),
        ("another redirect_uri", Some(String::new()), Some("https://spa.acme.test/cb2".to_owned()), &public),
        ("another client", Some(String::new()), None, &web),
    ];
    for (what, verifier, redirect, client) in cases {
        let got = op.code(&public, &alice, &jar, json!({})).await;
        let verifier = match verifier {
            Some(v) if v.is_empty() => Some(got["code_verifier"].as_str().unwrap().to_owned()),
            other => other,
        };
        let r = redeem_with(&op, client, &got, verifier, redirect).await;
        assert!(matches!(r.status, 400 | 401), "{what}: {} {}", r.status, r.text);
        let e = r.json["error"].as_str().unwrap_or_default();
        assert!(
            e == "invalid_grant"
                || (what.contains("too short") || what.contains("bad character")) && e == "invalid_request",
            "{what}: {}",
            r.text
        );
        if !what.contains("too short") && !what.contains("bad character") {
            assert_eq!(e, "invalid_grant", "{what}");
        }
    }
    // The redirect_uri of the authorization request is required at the token endpoint.
    let got = op.code(&public, &alice, &jar, json!({})).await;
    let r = op
        .token(
            &public,
            &[
                ("grant_type", "authorization_code"),
                ("code", got["callback"]["code"].as_str().unwrap()),
                ("code_verifier", got["code_verifier"].as_str().unwrap()),
            ],
        )
        .await;
    assert!(
        matches!(r.json["error"].as_str(), Some("invalid_grant" | "invalid_request")),
        "no redirect_uri: {}",
        r.text
    );
    // A confidential client without PKCE is fine; a verifier without a challenge is not.
    let got = op.code(&web, &alice, &jar, json!({ "pkce": false })).await;
    let r = redeem_with(&op, &web, &got, Some(other_verifier()), None).await;
    assert_oauth_error(&r, "invalid_grant", "a code_verifier without a challenge");
    let got = op.code(&web, &alice, &jar, json!({ "pkce": false })).await;
    let r = redeem_with(&op, &web, &got, None, None).await;
    r.expect(200);
    let rt = r.str("refresh_token");
    // The refresh token is the client's own.
    assert_oauth_error(&op.refresh(&other, &rt).await, "invalid_grant", "another confidential client");
    assert_oauth_error(&op.refresh(&public, &rt).await, "invalid_grant", "a public client");
    let r = op.refresh(&web, &rt).await;
    r.expect(200);
    // Garbage and wrong grants.
    let r = op
        .token(&web, &[("grant_type", "authorization_code"), ("code", "nonsense"), ("redirect_uri", &web.redirect_uri)])
        .await;
    assert_oauth_error(&r, "invalid_grant", "an unknown code");
    let r = op.token(&web, &[("grant_type", "refresh_token"), ("refresh_token", "nonsense")]).await;
    assert_oauth_error(&r, "invalid_grant", "an unknown refresh token");
    let r = op.token(&public, &[("grant_type", "client_credentials")]).await;
    assert!(matches!(r.status, 400 | 401), "a public client has no client_credentials: {}", r.text);
}

/// CSRF: the login form without or with a wrong (or another browser's) token is refused and
/// starts no sign-in; `return_to` is only ever a same-origin path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_form_csrf_and_return_to() {
    let op = Op::start().await;
    let alice = op.user("alice", &["payments:reader"]).await;
    let app = op.app("web", "client_secret_basic", json!({})).await;
    let login_url = "/login?return_to=/account";
    let submit = |jar: &str, set: Value, remove: Value| {
        let a = json!({
            "issuer": op.issuer(), "url": login_url, "jar": jar, "pick": { "field": "password" },
            "set": set, "remove": remove,
        });
        async move { rp("submit", &a).await }
    };
    let creds = json!({ "email": alice.email, "password": alice.password });
    let jar_a = op.jar("a");
    let a = submit(&jar_a, json!({ "email": "x@acme.test", "password": "y" }), json!([])).await;
    let token_a = a["form"]["fields"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f[0] == "csrf_token")
        .unwrap_or_else(|| panic!("the login form has a csrf_token: {a:#}"))[1]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(token_a.len() >= 16, "a CSRF token: {token_a:?}");
    let mut with_token = creds.clone();
    with_token["csrf_token"] = json!(token_a);
    for (what, jar, set, remove) in [
        ("no csrf_token", op.jar("b"), creds.clone(), json!(["csrf_token"])),
        (
            "a wrong csrf_token",
            op.jar("c"),
            {
                let mut c = creds.clone();
                c["csrf_token"] = json!("wrong-token");
                c
            },
            json!([]),
        ),
        ("another browser's csrf_token", op.jar("d"), with_token, json!([])),
    ] {
        let r = submit(&jar, set, remove).await;
        assert_eq!(r["ok"], true, "{r:#}");
        let resp = &r["response"];
        let st = resp["status"].as_u64().unwrap();
        assert!((400..500).contains(&st), "{what}: want a 4xx: {resp:#}");
        assert!(
            resp["set_cookie"].as_array().unwrap().iter().all(|c| !c.as_str().unwrap().contains("portcullis_sso")),
            "{what}: no SSO cookie: {resp:#}"
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(op.sink.mails_to(&alice.email).is_empty(), "no sign-in code was mailed for a refused form");
    // With the right token the same form goes on to the code page (and mails a code).
    let jar = op.jar("ok");
    let r = submit(&jar, creds.clone(), json!([])).await;
    let loc = r["response"]["location"].as_str().unwrap_or_default();
    assert!(matches!(r["response"]["status"].as_u64(), Some(302 | 303)), "{:#}", r["response"]);
    assert!(loc.contains("/login/code"), "{loc}");
    op.sink.next_mail(&alice.email, "", MAIL_TIMEOUT).await;
    // The password alone is no session: prompt=none says login_required, and without it the
    // browser is sent to sign in (it has no user to do so here).
    let v = op.flow(&app, None, &jar, json!({ "params": { "prompt": "none" } })).await;
    assert_eq!(v["callback"]["error"], "login_required", "no second factor, no session: {v:#}");
    let v = op.flow(&app, None, &jar, json!({})).await;
    assert_ne!(v["ok"], true, "no code without the second factor: {v:#}");
    assert!(v["callback"].is_null(), "{v:#}");
    assert!(v["stop"]["path"].as_str().unwrap().starts_with("/login"), "{v:#}");

    // return_to: only same-origin /oauth2/authorize? or /account paths.
    for (given, want) in [
        ("//evil.test/x", "/account"),
        ("/\\evil.test", "/account"),
        ("https://evil.test/", "/account"),
        ("http://127.0.0.1:1/oauth2/authorize?x=1", "/account"),
        ("/api/v1/me", "/account"),
        ("/oauth2/authorize?client_id=x", "/oauth2/authorize?client_id=x"),
        ("/account", "/account"),
    ] {
        let url = reqwest::Url::parse_with_params(&format!("{}/login", op.s.url), &[("return_to", given)]).unwrap();
        let v = rp("browse", &json!({ "issuer": op.issuer(), "url": url.as_str(), "jar": op.jar("rt") })).await;
        let forms = v["stop"]["forms"].as_array().unwrap();
        let rt = forms
            .iter()
            .flat_map(|f| f["fields"].as_array().unwrap())
            .find(|x| x[0] == "return_to")
            .unwrap_or_else(|| panic!("the login form carries return_to: {v:#}"));
        assert_eq!(rt[1], want, "return_to {given:?}");
    }
}

/// Every Portcullis page a person sees carries the security headers (the pages of the flows are
/// checked in every scenario; these are the rest).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_page_has_the_security_headers() {
    let op = Op::start().await;
    let alice = op.user("alice", &["payments:reader"]).await;
    let app = op.app("web", "client_secret_basic", json!({})).await;
    for path in
        ["/login", "/login?return_to=/account", "/oauth2/logout", "/invite?token=nonsense", "/register?org=acme"]
    {
        let r = op.get(&format!("{}{path}", op.s.url)).await;
        assert!(
            r.header("content-type").is_some_and(|c| c.starts_with("text/html")),
            "{path}: a page ({}): {:?}",
            r.status,
            r.header("content-type")
        );
    }
    let r = op.get(&format!("{}/account", op.s.url)).await;
    assert!(matches!(r.status, 302 | 303), "/account without a session goes to /login: {}", r.status);
    assert!(r.header("location").is_some_and(|l| l.contains("/login")), "{:?}", r.header("location"));
    let jar = op.jar("alice");
    op.login(&app, &alice, &jar, json!({})).await;
    for path in ["/account", "/account/totp"] {
        let v = rp("browse", &json!({ "issuer": op.issuer(), "url": path, "jar": jar })).await;
        assert_eq!(v["stop"]["kind"], "page", "{path}: {v:#}");
        assert_eq!(v["stop"]["path"], path, "{path}: {v:#}");
    }
}
