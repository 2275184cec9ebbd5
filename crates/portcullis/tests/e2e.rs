//! End-to-end tests: the real `portcullis` binary, started as a child process on a free port
//! with its own data directory, driven over HTTP with reqwest and checked with an independent
//! OAuth client (`tests/e2e/oauth_client.py`: authlib + pyjwt). Python 3 with authlib, pyjwt
//! and requests is required (scripts/test.sh installs them); without it these tests fail.
//! `postgres_backend_end_to_end` needs a PostgreSQL server: `PORTCULLIS_TEST_PG_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`) and the `psql` client.
//! The process harness and the HTTP helpers are in `support/`, shared with `auth_e2e.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

#[allow(dead_code)]
mod support;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};

use support::{
    ADMIN_ID, Client, Cred, EXIT_TIMEOUT, PAYMENTS_AUD, PgDb, Resp, START_TIMEOUT, Server, Stream, access_token,
    admin_token, create_acme_payments, http, portcullis_command, send, token_request, wait_deadline,
};

const ORACLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/e2e/oauth_client.py");
const DEFAULT_PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

// ------------------------------------------------------------------------------ processes --

struct CliRun {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// Runs a `portcullis` command to completion (killed and failed after `EXIT_TIMEOUT`).
fn run_cli(args: &[&str], envs: &[(&str, &str)]) -> CliRun {
    let (status, stdout, stderr) = support::run_cli(args, envs);
    CliRun { status, stdout, stderr }
}

// ----------------------------------------------------------------------------------- HTTP --

impl Resp {
    fn error(&self) -> &str {
        self.json["error"].as_str().unwrap_or_default()
    }
    /// Asserts the status and the RFC 6749 / API `error` code.
    #[track_caller]
    fn expect_error(&self, status: u16, error: &str) -> &Self {
        self.expect(status);
        assert_eq!(self.error(), error, "body {}", self.text);
        self
    }
}

/// RFC 7662 introspection with HTTP Basic, straight from reqwest.
async fn introspect_raw(s: &Server, client_id: &str, secret: &str, token: &str) -> Resp {
    send(
        http()
            .post(format!("{}/oauth2/introspect", s.url))
            .basic_auth(client_id, Some(secret))
            .form(&[("token", token)]),
    )
    .await
}

async fn jwks_kids(s: &Server) -> BTreeSet<String> {
    let r = send(http().get(format!("{}/oauth2/jwks", s.url))).await;
    r.expect(200);
    r.json["keys"].as_array().unwrap().iter().map(|k| k["kid"].as_str().unwrap().to_owned()).collect()
}

/// The admin API with one bearer token.
struct Api {
    client: Client,
    token: String,
}

impl Api {
    async fn admin(s: &Server) -> Api {
        Api::with_token(s, &admin_token(s).await)
    }
    fn with_token(s: &Server, token: &str) -> Api {
        Api { client: Client::new(s), token: token.to_owned() }
    }
    #[track_caller]
    fn call(&self, method: Method, path: &str, body: Option<&Value>) -> impl Future<Output = Resp> + use<> {
        self.client.call(method, path, &Cred::Bearer(&self.token), body)
    }
    #[track_caller]
    fn get(&self, path: &str) -> impl Future<Output = Resp> + use<> {
        self.call(Method::GET, path, None)
    }
    #[track_caller]
    fn post(&self, path: &str, body: &Value) -> impl Future<Output = Resp> + use<> {
        self.call(Method::POST, path, Some(body))
    }
    #[track_caller]
    fn patch(&self, path: &str, body: &Value) -> impl Future<Output = Resp> + use<> {
        self.call(Method::PATCH, path, Some(body))
    }
}

/// Creates an application; checks the secret is shown once and never again. Returns it.
async fn create_app(api: &Api, org: &str, body: Value) -> String {
    let slug = body["slug"].as_str().unwrap().to_owned();
    let r = api.post(&format!("/api/v1/organisations/{org}/applications"), &body).await;
    r.expect(201);
    assert_eq!(r.json["client_id"], format!("{org}${slug}"));
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let secret = r.json["client_secret"].as_str().unwrap().to_owned();
    assert!(secret.len() >= 32, "{secret}");
    let got = api.get(&format!("/api/v1/organisations/{org}/applications/{slug}")).await;
    got.expect(200);
    assert!(got.json.get("client_secret").is_none(), "GET must not show the secret: {}", got.text);
    assert!(!got.text.contains(&secret), "GET must not show the secret: {}", got.text);
    assert!(!got.text.contains("secret_hash"), "{}", got.text);
    secret
}

/// Organisation `acme`, service `payments`, application `acme$billing`; returns billing's secret.
async fn setup_acme(api: &Api) -> String {
    let svc = create_acme_payments(&api.client, &api.token).await;
    assert_eq!(svc.json["audience"], PAYMENTS_AUD);
    create_app(
        api,
        "acme",
        json!({ "slug": "billing", "name": "Billing", "scopes": ["payments/read"], "roles": ["payments:reader"] }),
    )
    .await
}

// --------------------------------------------------------------------------------- python --

/// Runs the independent OAuth client: `py(&["token", "--issuer", url, ...])` (see
/// [`support::python`]).
fn py(args: &[&str]) -> (bool, Value) {
    support::python(ORACLE, args)
}

#[track_caller]
fn py_ok(args: &[&str]) -> Value {
    support::python_ok(ORACLE, args)
}

/// `token` via authlib; returns the access token and the raw token response.
#[track_caller]
fn py_token(s: &Server, id: &str, secret: &str, scope: Option<&str>, auth: &str) -> (String, Value) {
    let mut args = vec!["token", "--issuer", &s.url, "--client-id", id, "--client-secret", secret, "--auth", auth];
    if let Some(sc) = scope {
        args.extend(["--scope", sc]);
    }
    let v = py_ok(&args);
    let resp = v["token_response"].clone();
    (resp["access_token"].as_str().unwrap().to_owned(), resp)
}

/// `verify` via pyjwt against the JWKS; returns {"header", "claims"}.
#[track_caller]
fn py_verify(s: &Server, token: &str, audience: &str) -> Value {
    py_ok(&["verify", "--issuer", &s.url, "--token", token, "--audience", audience, "--alg", "ES256"])
}

#[track_caller]
fn py_introspect(s: &Server, id: &str, secret: &str, token: &str) -> Value {
    py_ok(&["introspect", "--issuer", &s.url, "--client-id", id, "--client-secret", secret, "--token", token])
}

fn kid_of(verified: &Value) -> String {
    verified["header"]["kid"].as_str().unwrap().to_owned()
}

// ------------------------------------------------------------------------------ postgres --

/// The admin URL with its database name replaced.
// ---------------------------------------------------------------------------------- tests --

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_credentials_full_flow_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Server::start(dir.path(), &[], &[]);
    let api = Api::admin(&s).await;
    let billing = setup_acme(&api).await;
    let jwks = jwks_kids(&s).await;

    // client_secret_basic through authlib, verified by pyjwt.
    let (token, resp) = py_token(&s, "acme$billing", &billing, Some("payments/read"), "client_secret_basic");
    assert!(resp["token_type"].as_str().unwrap().eq_ignore_ascii_case("bearer"), "{resp}");
    assert_eq!(resp["expires_in"], 900, "{resp}");
    assert_eq!(resp["scope"], "payments/read", "{resp}");
    let v = py_verify(&s, &token, PAYMENTS_AUD);
    let (h, c) = (&v["header"], &v["claims"]);
    assert_eq!(h["typ"], "at+jwt", "{h}");
    assert_eq!(h["alg"], "ES256", "{h}");
    assert!(jwks.contains(h["kid"].as_str().unwrap()), "kid {} not in the JWKS {jwks:?}", h["kid"]);
    assert_eq!(c["iss"], s.url.as_str());
    assert_eq!(c["sub"], "acme$billing");
    assert_eq!(c["client_id"], "acme$billing");
    assert_eq!(c["org"], "acme");
    assert_eq!(c["scope"], "payments/read");
    assert_eq!(c["roles"], json!(["payments:reader"]));
    assert!(c["aud"] == PAYMENTS_AUD || c["aud"] == json!([PAYMENTS_AUD]), "{c}");
    let jti = c["jti"].as_str().unwrap().to_owned();
    assert!(!jti.is_empty());
    assert_eq!(c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap(), 900, "{c}");

    // client_secret_post, for a client registered for it.
    let poster = create_app(
        &api,
        "acme",
        json!({
            "slug": "poster", "name": "Poster", "scopes": ["payments/read"], "roles": ["payments:reader"],
            "token_endpoint_auth_method": "client_secret_post",
        }),
    )
    .await;
    let (ptoken, _) = py_token(&s, "acme$poster", &poster, Some("payments/read"), "client_secret_post");
    let pv = py_verify(&s, &ptoken, PAYMENTS_AUD);
    assert_eq!(pv["claims"]["sub"], "acme$poster");
    assert_eq!(pv["claims"]["client_id"], "acme$poster");

    // Introspection, revocation, introspection again.
    let i = py_introspect(&s, "acme$billing", &billing, &token);
    assert_eq!(i["status"], 200, "{i}");
    assert_eq!(i["active"], true, "{i}");
    assert_eq!(i["jti"], jti.as_str(), "{i}");
    assert_eq!(i["client_id"], "acme$billing", "{i}");
    let r = py_ok(&[
        "revoke",
        "--issuer",
        &s.url,
        "--client-id",
        "acme$billing",
        "--client-secret",
        &billing,
        "--token",
        &token,
    ]);
    assert_eq!(r["status"], 200, "{r}");
    let i = py_introspect(&s, "acme$billing", &billing, &token);
    assert_eq!(i["active"], false, "{i}");
    let keys: BTreeSet<&str> = i.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(keys, BTreeSet::from(["active", "status"]), "an inactive token reveals nothing: {i}");
    // The other token is unaffected.
    let pi = py_ok(&[
        "introspect",
        "--issuer",
        &s.url,
        "--client-id",
        "acme$poster",
        "--client-secret",
        &poster,
        "--auth",
        "client_secret_post",
        "--token",
        &ptoken,
    ]);
    assert_eq!(pi["active"], true, "{pi}");

    // Authorization checks.
    let allowed = api
        .post("/api/v1/authz/check", &json!({ "subject": "acme$billing", "permission": "payments.invoice.read" }))
        .await;
    allowed.expect(200);
    assert_eq!(allowed.json["allowed"], true, "{}", allowed.text);
    let denied = api
        .post("/api/v1/authz/check", &json!({ "subject": "acme$billing", "permission": "payments.invoice.write" }))
        .await;
    denied.expect(200);
    assert_eq!(denied.json["allowed"], false, "{}", denied.text);
    assert!(!denied.json["reason"].as_str().unwrap().is_empty(), "{}", denied.text);

    s.stop_clean();
    s.assert_no_logged_errors();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_get_the_right_errors() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Server::start(dir.path(), &[], &[]);
    let api = Api::admin(&s).await;
    let billing = setup_acme(&api).await;
    let token_url = format!("{}/oauth2/token", s.url);
    let form_ct = "application/x-www-form-urlencoded";

    // ---- the token endpoint
    let ok = token_request(&s, "acme$billing", &billing, &[]).await;
    ok.expect(200);
    assert_eq!(ok.header("cache-control"), Some("no-store"));

    let r = send(
        http()
            .post(&token_url)
            .basic_auth("acme$billing", Some(&billing))
            .header("content-type", form_ct)
            .body("grant_type=client_credentials&grant_type=client_credentials"),
    )
    .await;
    r.expect_error(400, "invalid_request");
    assert!(r.x_error().contains("grant_type"), "{}", r.x_error());

    let r = send(
        http()
            .post(&token_url)
            .basic_auth("acme$billing", Some(&billing))
            .json(&json!({ "grant_type": "client_credentials" })),
    )
    .await;
    r.expect_error(400, "invalid_request");

    let big = format!("grant_type=client_credentials&padding={}", "a".repeat(70 * 1024));
    let r = send(
        http().post(&token_url).basic_auth("acme$billing", Some(&billing)).header("content-type", form_ct).body(big),
    )
    .await;
    r.expect(413);

    let r = send(
        http().post(&token_url).basic_auth("acme$billing", Some(&billing)).form(&[("grant_type", "urn:example:nope")]),
    )
    .await;
    r.expect_error(400, "unsupported_grant_type");

    let r = token_request(&s, "acme$nobody", &billing, &[]).await;
    r.expect_error(401, "invalid_client");
    assert!(r.header("www-authenticate").is_some_and(|h| h.starts_with("Basic")), "{:?}", r.headers);

    let r = token_request(&s, "acme$billing", "wrong-secret-wrong-secret-wrong-secret-wrong", &[]).await;
    r.expect_error(401, "invalid_client");
    assert!(r.header("www-authenticate").is_some_and(|h| h.starts_with("Basic")), "{:?}", r.headers);

    let r = token_request(&s, "acme$billing", &billing, &[("scope", "payments/write")]).await;
    r.expect_error(400, "invalid_scope");

    let r = token_request(&s, "acme$billing", &billing, &[("resource", "https://unknown.acme.test")]).await;
    r.expect_error(400, "invalid_target");

    let r = send(http().post(&token_url).basic_auth("acme$billing", Some(&billing)).form(&[
        ("grant_type", "client_credentials"),
        ("client_id", "acme$billing"),
        ("client_secret", &billing),
    ]))
    .await;
    r.expect_error(400, "invalid_request");

    // Registered for client_secret_basic: client_secret_post is refused even with the right secret.
    let r = send(http().post(&token_url).form(&[
        ("grant_type", "client_credentials"),
        ("client_id", "acme$billing"),
        ("client_secret", &billing),
    ]))
    .await;
    r.expect_error(401, "invalid_client");
    assert!(r.header("www-authenticate").is_some(), "{:?}", r.headers);

    // Disabled client.
    let p = api.patch("/api/v1/organisations/acme/applications/billing", &json!({ "enabled": false })).await;
    p.expect(200);
    assert_eq!(p.json["enabled"], false);
    let r = token_request(&s, "acme$billing", &billing, &[]).await;
    r.expect_error(401, "invalid_client");
    assert!(r.header("www-authenticate").is_some(), "{:?}", r.headers);
    api.patch("/api/v1/organisations/acme/applications/billing", &json!({ "enabled": true })).await.expect(200);
    token_request(&s, "acme$billing", &billing, &[]).await.expect(200);

    // ---- the admin API
    let orgs = format!("{}/api/v1/organisations", s.url);
    let r = send(http().get(&orgs)).await;
    r.expect(401);
    assert!(r.header("www-authenticate").is_some_and(|h| h.starts_with("Bearer")), "{:?}", r.headers);

    let r = send(http().get(&orgs).bearer_auth("garbage.not.a-token")).await;
    r.expect(401);
    assert!(r.header("www-authenticate").is_some_and(|h| h.starts_with("Bearer")), "{:?}", r.headers);

    // A token for another audience (the payments service) is not an admin API token.
    let payments_token = access_token(&s, "acme$billing", &billing).await;
    Api::with_token(&s, &payments_token).get("/api/v1/organisations/acme").await.expect(401);

    // A token for this server without admin roles: 403.
    let r = token_request(&s, "acme$billing", &billing, &[("resource", s.url.as_str())]).await;
    r.expect(200);
    let plain = Api::with_token(&s, r.json["access_token"].as_str().unwrap());
    plain.get("/api/v1/organisations/acme").await.expect(403);
    plain.post("/api/v1/organisations", &json!({ "slug": "evil", "name": "Evil" })).await.expect(403);

    // An organisation admin administers its organisation only.
    let ops =
        create_app(&api, "acme", json!({ "slug": "ops", "name": "Ops", "roles": ["portcullis:org-admin"] })).await;
    let org_admin = Api::with_token(&s, &access_token(&s, "acme$ops", &ops).await);
    org_admin.get("/api/v1/organisations/acme").await.expect(200);
    org_admin.get("/api/v1/organisations/portcullis").await.expect(403);
    org_admin.post("/api/v1/organisations", &json!({ "slug": "other", "name": "Other" })).await.expect(403);
    org_admin.post("/api/v1/keys/rotate", &json!({})).await.expect(403);

    let r = api.post("/api/v1/organisations", &json!({ "slug": "Bad Slug", "name": "x" })).await;
    r.expect(400);
    assert!(r.x_error().contains("expected"), "{}", r.x_error());

    let r = api
        .post(
            "/api/v1/organisations/acme/applications",
            &json!({ "slug": "badrole", "name": "Bad role", "roles": ["payments-reader"] }),
        )
        .await;
    r.expect(400);
    assert!(r.x_error().contains("service:level"), "{}", r.x_error());

    api.post("/api/v1/organisations", &json!({ "slug": "acme", "name": "Acme again" })).await.expect(409);

    let r = api.post("/api/v1/organisations", &json!({ "slug": "newco", "name": "New", "colour": "red" })).await;
    r.expect(400);
    assert!(r.x_error().contains("colour"), "{}", r.x_error());

    let r = api.get("/api/v1/no-such-thing").await;
    r.expect(404);
    assert!(!r.x_error().is_empty());
    let r = send(http().get(format!("{}/nowhere", s.url))).await;
    r.expect(404);

    let huge = json!({ "slug": "huge", "name": "a".repeat(1024 * 1024 + 1024) });
    api.post("/api/v1/organisations", &huge).await.expect(413);

    // Nothing above was created by mistake.
    let list = api.get("/api/v1/organisations").await;
    list.expect(200);
    let slugs: BTreeSet<&str> =
        list.json["items"].as_array().unwrap().iter().map(|o| o["slug"].as_str().unwrap()).collect();
    assert_eq!(slugs, BTreeSet::from(["acme", "portcullis"]));

    s.stop_clean();
    s.assert_no_logged_errors();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_keys_and_clients() {
    let dir = tempfile::tempdir().unwrap();
    let mut s1 = Server::start(dir.path(), &[], &[]);
    let api = Api::admin(&s1).await;
    let billing = setup_acme(&api).await;
    let (token, _) = py_token(&s1, "acme$billing", &billing, None, "client_secret_basic");
    let kids = jwks_kids(&s1).await;
    assert!(s1.stderr().contains("created token signing keys"), "{}", s1.stderr());
    s1.stop_clean();

    // Same address, so the same issuer.
    let mut s2 = Server::launch(dir.path(), &s1.addr, &[], &[], true);
    assert_eq!(s2.url, s1.url);
    assert_eq!(jwks_kids(&s2).await, kids, "the signing keys must survive a restart");
    let i = py_introspect(&s2, "acme$billing", &billing, &token);
    assert_eq!(i["active"], true, "a token issued before the restart is still good: {i}");
    let (t2, _) = py_token(&s2, "acme$billing", &billing, Some("payments/read"), "client_secret_basic");
    assert!(kids.contains(&kid_of(&py_verify(&s2, &t2, PAYMENTS_AUD))));
    let api2 = Api::admin(&s2).await;

    // The bootstrap reused everything.
    let log2 = s2.stderr();
    assert!(!log2.lines().any(|l| l.contains("created ")), "nothing may be created on restart:\n{log2}");
    let orgs = api2.get("/api/v1/organisations").await;
    orgs.expect(200);
    let slugs: Vec<&str> = orgs.json["items"].as_array().unwrap().iter().map(|o| o["slug"].as_str().unwrap()).collect();
    assert_eq!(slugs.iter().copied().collect::<BTreeSet<_>>(), BTreeSet::from(["acme", "portcullis"]));
    assert_eq!(slugs.len(), 2, "{slugs:?}");
    let audit = api2.get("/api/v1/organisations/portcullis/audit-events?limit=500").await;
    audit.expect(200);
    let count = |action: &str| {
        audit.json["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["action"] == action && e["outcome"] == "success")
            .count()
    };
    assert_eq!(count("application.create"), 1, "{}", audit.text);
    assert_eq!(count("user.create"), 1, "{}", audit.text);
    assert_eq!(count("organisation.create"), 1, "{}", audit.text);
    let apps = api2.get("/api/v1/organisations/portcullis/applications").await;
    apps.expect(200);
    assert_eq!(apps.json["items"].as_array().unwrap().len(), 1, "{}", apps.text);

    s2.stop_clean();
    assert!(s2.stdout().trim().is_empty(), "a restart prints no secrets: {}", s2.stdout());
    s1.assert_no_logged_errors();
    s2.assert_no_logged_errors();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_bootstrap_secrets_are_printed_once() {
    let dir = tempfile::tempdir().unwrap();
    let value_of = |out: &str, label: &str| -> String {
        let line = out.lines().find(|l| l.contains(label)).unwrap();
        line.split_once(label).unwrap().1.trim().to_owned()
    };
    let mut s1 = Server::launch(dir.path(), "127.0.0.1:0", &[], &[], false);
    // The secret lines are printed before the server listens; the password comes first.
    let printed = s1.wait_output(Stream::Stdout, "admin client secret:", START_TIMEOUT);
    let secret = value_of(&printed, "admin client secret:");
    let password = value_of(&printed, "admin password:");
    assert!(secret.len() >= 32, "{secret}");
    assert!(password.len() >= 12, "{password}");
    // The printed secret is the admin client's.
    let t = access_token(&s1, ADMIN_ID, &secret).await;
    Api::with_token(&s1, &t).get("/api/v1/organisations").await.expect(200);
    s1.stop_clean();
    let out = s1.stdout();
    assert_eq!(out.matches("admin client secret:").count(), 1, "stdout:\n{out}");
    assert_eq!(out.matches("admin password:").count(), 1, "stdout:\n{out}");
    let log = s1.stderr();
    assert!(!log.contains(&secret) && !log.contains(&password), "generated secrets must never be logged:\n{log}");

    let mut s2 = Server::launch(dir.path(), &s1.addr, &[], &[], false);
    let t = access_token(&s2, ADMIN_ID, &secret).await;
    Api::with_token(&s2, &t).get("/api/v1/organisations").await.expect(200);
    s2.stop_clean();
    assert_eq!(s2.stdout(), "", "a restart prints nothing");
}

/// `listening on` means ready, and a ready server shuts down gracefully on SIGTERM. The signal
/// is sent the moment that line appears, by a shell already blocked on a pipe (its builtin
/// `kill`: no fork/exec delay), over several starts.
#[test]
fn sigterm_right_after_listening_is_graceful() {
    let dir = tempfile::tempdir().unwrap();
    for round in 1..=8 {
        let mut child = portcullis_command(&[], true)
            .stdout(Stdio::null())
            .arg("serve")
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path())
            .spawn()
            .unwrap();
        let mut killer = Command::new("sh")
            .args(["-c", "read _ && kill -TERM \"$1\"", "sh"])
            .arg(child.id().to_string())
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut log = String::new();
        loop {
            let mut line = String::new();
            if stderr.read_line(&mut line).unwrap() == 0 {
                let _ = killer.kill();
                panic!("round {round}: the server exited before listening:\n{log}");
            }
            log.push_str(&line);
            if line.contains("listening on http://") {
                killer.stdin.take().unwrap().write_all(b"go\n").unwrap();
                break;
            }
        }
        assert!(killer.wait().unwrap().success(), "kill -TERM failed");
        let Some(status) = wait_deadline(&mut child, EXIT_TIMEOUT) else {
            let _ = child.kill();
            panic!("round {round}: no exit within {EXIT_TIMEOUT:?} of SIGTERM:\n{log}");
        };
        stderr.read_to_string(&mut log).unwrap();
        assert!(
            status.success(),
            "round {round}: SIGTERM right after `listening on` must shut down gracefully (status 0), got {status:?}:\n{log}"
        );
        assert!(log.contains("shut down cleanly"), "round {round}:\n{log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_process_on_same_data_dir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Server::start(dir.path(), &[], &[]);
    let data_dir = dir.path().to_str().unwrap();
    let second = run_cli(&["serve", "--listen", "127.0.0.1:0", "--data-dir", data_dir], &[]);
    assert!(!second.status.success(), "a second serve must be refused; stderr:\n{}", second.stderr);
    assert!(second.stderr.contains("already using data directory"), "stderr:\n{}", second.stderr);
    assert!(second.stdout.trim().is_empty(), "{}", second.stdout);
    // The first one is unaffected.
    let r = send(http().get(format!("{}/healthz", s.url))).await;
    r.expect(200);
    admin_token(&s).await;
    s.stop_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_rotation_keeps_old_tokens_valid() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Server::start(dir.path(), &[], &[]);
    let api = Api::admin(&s).await;
    let billing = setup_acme(&api).await;
    let before = jwks_kids(&s).await;

    let (t1, _) = py_token(&s, "acme$billing", &billing, None, "client_secret_basic");
    let k1 = kid_of(&py_verify(&s, &t1, PAYMENTS_AUD));
    assert!(before.contains(&k1));

    let r = api.post("/api/v1/keys/rotate?force=true", &json!({})).await;
    r.expect(200);
    let current: BTreeSet<String> =
        r.json["current"].as_array().unwrap().iter().map(|k| k.as_str().unwrap().to_owned()).collect();
    assert!(!current.contains(&k1), "{}", r.text);
    let after = jwks_kids(&s).await;
    assert!(after.contains(&k1), "the retired key stays published: {after:?}");
    assert!(current.is_subset(&after), "{current:?} {after:?}");

    let (t2, _) = py_token(&s, "acme$billing", &billing, None, "client_secret_basic");
    let k2 = kid_of(&py_verify(&s, &t2, PAYMENTS_AUD));
    assert_ne!(k1, k2);
    assert!(before.contains(&k2), "the new signing key {k2} was published before it signed: {before:?}");
    assert!(current.contains(&k2), "{current:?}");
    // Both verify against the published JWKS; the old one is still active.
    py_verify(&s, &t1, PAYMENTS_AUD);
    assert_eq!(py_introspect(&s, "acme$billing", &billing, &t1)["active"], true);
    // The admin token predates the rotation too.
    api.get("/api/v1/organisations/acme").await.expect(200);
    s.stop_clean();
    s.assert_no_logged_errors();

    // The CLI rotates a stopped server's keys; the restarted server signs with them.
    let data_dir = dir.path().to_str().unwrap();
    let cli = run_cli(&["keys", "rotate", "--force", "--data-dir", data_dir], &[]);
    assert!(cli.status.success(), "keys rotate failed:\n{}", cli.stderr);
    assert!(cli.stdout.contains("rotated"), "{}", cli.stdout);
    let cli_kids: BTreeSet<String> = cli
        .stdout
        .split_once("now signing with:")
        .unwrap()
        .1
        .split(',')
        .map(|k| k.trim().to_owned())
        .filter(|k| !k.is_empty())
        .collect();
    assert!(!cli_kids.contains(&k2), "{cli_kids:?}");

    let mut s2 = Server::launch(dir.path(), &s.addr, &[], &[], true);
    let (t3, _) = py_token(&s2, "acme$billing", &billing, None, "client_secret_basic");
    let k3 = kid_of(&py_verify(&s2, &t3, PAYMENTS_AUD));
    assert!(cli_kids.contains(&k3), "{k3} not in {cli_kids:?}");
    let published = jwks_kids(&s2).await;
    assert!(published.contains(&k1) && published.contains(&k2), "{published:?}");
    py_verify(&s2, &t1, PAYMENTS_AUD);
    let i = introspect_raw(&s2, "acme$billing", &billing, &t1).await;
    i.expect(200);
    assert_eq!(i.json["active"], true, "{}", i.text);
    s2.stop_clean();
    s2.assert_no_logged_errors();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_backend_end_to_end() {
    let admin_url = std::env::var("PORTCULLIS_TEST_PG_URL").unwrap_or_else(|_| DEFAULT_PG_URL.to_owned());
    // Declared before the servers: dropped (forcibly) after they are gone.
    let db = PgDb::create(&admin_url, "portcullis_e2e");
    let db_url = db.url();
    let dir = tempfile::tempdir().unwrap();

    let mut s1 = Server::start(dir.path(), &["--database-url", &db_url], &[]);
    assert!(!dir.path().join("portcullis.db").exists(), "PostgreSQL mode must not create a SQLite database");
    let api = Api::admin(&s1).await;
    let billing = setup_acme(&api).await;
    let (token, _) = py_token(&s1, "acme$billing", &billing, Some("payments/read"), "client_secret_basic");
    let v = py_verify(&s1, &token, PAYMENTS_AUD);
    assert_eq!(v["claims"]["sub"], "acme$billing");
    assert_eq!(v["claims"]["org"], "acme");
    assert_eq!(v["claims"]["roles"], json!(["payments:reader"]));
    let kids = jwks_kids(&s1).await;
    s1.stop_clean();

    let mut s2 = Server::launch(dir.path(), &s1.addr, &["--database-url", &db_url], &[], true);
    assert_eq!(jwks_kids(&s2).await, kids);
    assert!(!s2.stderr().lines().any(|l| l.contains("created ")), "{}", s2.stderr());
    assert_eq!(py_introspect(&s2, "acme$billing", &billing, &token)["active"], true);
    token_request(&s2, "acme$billing", &billing, &[]).await.expect(200);
    Api::admin(&s2).await.get("/api/v1/organisations/acme/applications/billing").await.expect(200);
    s2.stop_clean();
    s1.assert_no_logged_errors();
    s2.assert_no_logged_errors();
    drop(db);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_ready_metrics() {
    let dir = tempfile::tempdir().unwrap();
    // JSON logs here (text everywhere else): the start-up line is found in either.
    let mut s = Server::start(dir.path(), &[], &[("PORTCULLIS_LOG__FORMAT", "json")]);
    let r = send(http().get(format!("{}/healthz", s.url))).await;
    r.expect(200);
    assert_eq!(r.text, "ok");
    let r = send(http().get(format!("{}/readyz", s.url))).await;
    r.expect(200);
    assert_eq!(r.json, json!({ "database": true, "keys": true, "storage": "ok" }));

    for _ in 0..3 {
        admin_token(&s).await;
    }
    token_request(&s, ADMIN_ID, "wrong-secret-wrong-secret-wrong-secret-xxxx", &[]).await.expect(401);

    let r = send(http().get(format!("{}/metrics", s.url))).await;
    r.expect(200);
    let m = &r.text;
    let metric = |name: &str| m.lines().filter(move |l| l.starts_with(name)).collect::<Vec<_>>();
    let issued = metric("portcullis_tokens_issued_total");
    assert!(!issued.is_empty(), "{m}");
    let total: f64 = issued.iter().filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum();
    assert!(total >= 3.0, "{issued:?}");
    let requests = metric("portcullis_http_requests_total");
    assert!(requests.iter().any(|l| l.contains("route=\"/oauth2/token\"") && l.contains("status=\"200\"")), "{m}");
    assert!(requests.iter().any(|l| l.contains("route=\"/oauth2/token\"") && l.contains("status=\"401\"")), "{m}");
    let buckets = metric("portcullis_http_request_duration_seconds_bucket");
    assert!(buckets.iter().any(|l| l.contains("route=\"/oauth2/token\"") && l.contains("le=\"0.005\"")), "{m}");
    assert!(buckets.iter().any(|l| l.contains("le=\"+Inf\"")), "{m}");
    assert!(m.contains("# TYPE portcullis_http_request_duration_seconds histogram"), "{m}");
    s.stop_clean();
    s.assert_no_logged_errors();
    for line in s.stderr().lines() {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        assert!(v["level"].is_string(), "{line}");
    }
}

#[test]
fn config_unknown_key_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let data_dir = data_dir.to_str().unwrap();
    let file = dir.path().join("portcullis.toml");
    std::fs::write(&file, "lisen = \"127.0.0.1:0\"\n").unwrap();
    let r = run_cli(&["serve", "--config", file.to_str().unwrap(), "--data-dir", data_dir], &[]);
    assert!(!r.status.success(), "an unknown config key must be refused");
    assert!(r.stderr.contains("lisen"), "stderr must name the key:\n{}", r.stderr);

    let r = run_cli(&["serve", "--listen", "127.0.0.1:0", "--data-dir", data_dir], &[("PORTCULLIS_LISEN", "1")]);
    assert!(!r.status.success(), "an unknown PORTCULLIS_ variable must be refused");
    assert!(r.stderr.to_ascii_lowercase().contains("lisen"), "stderr must name the key:\n{}", r.stderr);
    assert!(!Path::new(data_dir).join("portcullis.db").exists(), "nothing may start on a bad configuration");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_rotation_grace() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Server::start(dir.path(), &[], &[]);
    let api = Api::admin(&s).await;
    let first = setup_acme(&api).await;
    let rotate = "/api/v1/organisations/acme/applications/billing/rotate-secret";

    let r = api.post(rotate, &json!({ "grace_period": 3600 })).await;
    r.expect(200);
    assert_eq!(r.header("cache-control"), Some("no-store"));
    assert!(r.json["previous_secret_expires_at"].is_i64(), "{}", r.text);
    let second = r.json["client_secret"].as_str().unwrap().to_owned();
    assert_ne!(second, first);
    let (t, _) = py_token(&s, "acme$billing", &second, None, "client_secret_basic");
    py_verify(&s, &t, PAYMENTS_AUD);
    token_request(&s, "acme$billing", &first, &[]).await.expect(200);
    token_request(&s, "acme$billing", &second, &[]).await.expect(200);

    let r = api.post(rotate, &json!({ "grace_period": 0 })).await;
    r.expect(200);
    assert!(r.json["previous_secret_expires_at"].is_null(), "{}", r.text);
    let third = r.json["client_secret"].as_str().unwrap().to_owned();
    token_request(&s, "acme$billing", &second, &[]).await.expect_error(401, "invalid_client");
    token_request(&s, "acme$billing", &first, &[]).await.expect_error(401, "invalid_client");
    token_request(&s, "acme$billing", &third, &[]).await.expect(200);
    let (ok, v) = py(&["token", "--issuer", &s.url, "--client-id", "acme$billing", "--client-secret", &second]);
    assert!(!ok, "{v}");
    assert_eq!(v["error"], "invalid_client", "{v}");
    s.stop_clean();
    s.assert_no_logged_errors();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_admin_commands_create_what_the_server_serves() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap().to_owned();
    let cli = |args: &[&str]| {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--data-dir", &data]);
        run_cli(&all, &[])
    };
    let r = cli(&["admin", "org", "create", "--slug", "cli-org", "--name", "CLI Org"]);
    assert!(r.status.success(), "{}", r.stderr);
    let org: Value = serde_json::from_str(r.stdout.lines().last().unwrap()).unwrap();
    assert_eq!(org["slug"], "cli-org");

    let r = cli(&["admin", "org", "create", "--slug", "Bad Slug", "--name", "x"]);
    assert!(!r.status.success(), "an ill-formed slug must be refused");
    assert!(r.stderr.contains("expected"), "the error names the expected form:\n{}", r.stderr);

    let r = cli(&[
        "admin",
        "service",
        "create",
        "--org",
        "cli-org",
        "--slug",
        "pay",
        "--name",
        "Pay",
        "--audience",
        "https://pay.cli.test",
        "--scope",
        "pay/read",
        "--role",
        "pay:reader",
        "--permission",
        "pay.invoice.read",
        "--grant",
        "pay:reader=pay.invoice.read",
    ]);
    assert!(r.status.success(), "{}", r.stderr);

    let r = cli(&[
        "admin",
        "app",
        "create",
        "--org",
        "cli-org",
        "--slug",
        "app",
        "--name",
        "App",
        "--scope",
        "pay/read",
        "--role",
        "pay:reader",
        "--lifetime",
        "600",
    ]);
    assert!(r.status.success(), "{}", r.stderr);
    let created: Value = serde_json::from_str(r.stdout.lines().last().unwrap()).unwrap();
    assert_eq!(created["client_id"], "cli-org$app");
    let secret = created["client_secret"].as_str().unwrap().to_owned();

    let r = cli(&["admin", "app", "show", "--client-id", "cli-org$app"]);
    assert!(r.status.success(), "{}", r.stderr);
    let shown: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(shown["access_token_lifetime"], 600);
    assert_eq!(shown["roles"], json!(["pay:reader"]));
    assert!(shown.get("client_secret").is_none() && !r.stdout.contains(&secret), "show never reveals the secret");

    // The server serves what the CLI created, and the CLI's changes are audited.
    let mut s = Server::start(dir.path(), &[], &[]);
    let t = token_request(&s, "cli-org$app", &secret, &[]).await;
    t.expect(200);
    assert_eq!(t.json["expires_in"], 600, "{}", t.text);
    let v = py_verify(&s, t.json["access_token"].as_str().unwrap(), "https://pay.cli.test");
    assert_eq!(v["claims"]["roles"], json!(["pay:reader"]));
    let api = Api::admin(&s).await;
    let events = api.get("/api/v1/organisations/cli-org/audit-events").await;
    events.expect(200);
    let actions: Vec<(&str, &str)> = events.json["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["actor"].as_str().unwrap(), e["action"].as_str().unwrap()))
        .collect();
    for action in ["organisation.create", "service.create", "application.create"] {
        assert!(actions.contains(&("cli", action)), "{action} by cli not audited: {actions:?}");
    }
    s.stop_clean();
    s.assert_no_logged_errors();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_rotation_reaches_a_running_server() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Server::start(dir.path(), &[], &[("PORTCULLIS_TOKENS__KEY_CHECK_INTERVAL", "1")]);
    let api = Api::admin(&s).await;
    let billing = setup_acme(&api).await;
    let t1 = access_token(&s, "acme$billing", &billing).await;
    let k1 = kid_of(&py_verify(&s, &t1, PAYMENTS_AUD));

    // Right after first start the next keys are too fresh to promote without --force.
    let early = run_cli(&["keys", "rotate", "--data-dir", dir.path().to_str().unwrap()], &[]);
    assert!(!early.status.success(), "an unforced rotation of fresh keys must be refused");
    assert!(early.stderr.contains("force"), "{}", early.stderr);

    // The CLI works on the live database beside the server (SQLite WAL; the lock is per serve).
    let cli = run_cli(&["keys", "rotate", "--force", "--data-dir", dir.path().to_str().unwrap()], &[]);
    assert!(cli.status.success(), "keys rotate beside a running server failed:\n{}", cli.stderr);
    let now_signing = cli.stdout.split_once("now signing with:").unwrap().1.to_owned();

    // Within tokens.key_check_interval the server re-reads the key table and signs with the new key.
    let deadline = Instant::now() + Duration::from_secs(15);
    let k2 = loop {
        let t = access_token(&s, "acme$billing", &billing).await;
        let k = kid_of(&py_verify(&s, &t, PAYMENTS_AUD));
        if k != k1 {
            break k;
        }
        assert!(Instant::now() < deadline, "the running server never picked up the CLI's rotation");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert!(now_signing.contains(&k2), "{k2} is not what the CLI promoted: {now_signing}");
    assert!(jwks_kids(&s).await.contains(&k1), "the retired key stays published");
    assert_eq!(py_introspect(&s, "acme$billing", &billing, &t1)["active"], true);
    s.stop_clean();
    s.assert_no_logged_errors();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_signing_algorithm_verifies_with_an_independent_library() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Server::start(dir.path(), &[], &[]);
    let api = Api::admin(&s).await;
    setup_acme(&api).await;
    for alg in ["ES256", "RS256", "PS256", "EdDSA"] {
        let slug = format!("signer-{}", alg.to_ascii_lowercase());
        let secret = create_app(
            &api,
            "acme",
            json!({ "slug": slug, "name": alg, "scopes": ["payments/read"], "access_token_signing_alg": alg }),
        )
        .await;
        let client_id = format!("acme${slug}");
        let token = access_token(&s, &client_id, &secret).await;
        let v = py_ok(&["verify", "--issuer", &s.url, "--token", &token, "--audience", PAYMENTS_AUD, "--alg", alg]);
        assert_eq!(v["header"]["alg"], alg, "{v}");
        assert_eq!(v["claims"]["client_id"], client_id.as_str(), "{v}");
        // The key is bound to its algorithm: the same token does not verify as another one.
        let other = if alg == "RS256" { "PS256" } else { "RS256" };
        let (ok, _) =
            py(&["verify", "--issuer", &s.url, "--token", &token, "--audience", PAYMENTS_AUD, "--alg", other]);
        assert!(!ok, "{alg} token accepted as {other}");
    }
    let bad = api
        .post(
            "/api/v1/organisations/acme/applications",
            &json!({"slug": "hs", "name": "HS", "access_token_signing_alg": "HS256"}),
        )
        .await;
    bad.expect_error(400, "bad_request");
    assert!(bad.header("x-error").unwrap().contains("ES256"), "the error lists the algorithms: {}", bad.text);
    s.stop_clean();
    s.assert_no_logged_errors();
}
