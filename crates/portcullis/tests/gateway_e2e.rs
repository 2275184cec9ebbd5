//! The gateway inside `portcullis serve`, end to end: the real binary with a `[gateway]` table,
//! a real upstream started here (echoing what it received as JSON), tokens, certificates and
//! revocations made through the real control plane, and `curl` as the client (TLS to the
//! gateway with the server certificate our CA issued it, client certificates made with
//! `openssl`). The stub-control-plane suite (`gateway_standalone_e2e.rs`) covers the forged
//! tokens; this one covers what only the real control plane can show: its tokens, its
//! certificates, its revocations reaching the gateway within seconds, its permission grants.
//! Needs `curl` and `openssl`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

#[path = "support/gateway.rs"]
mod gateway;
#[allow(dead_code)]
mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use gateway::{Gw, Standalone, sh, start_echo, write};
use serde_json::{Value, json};
use support::{Client, Cred, PAYMENTS_AUD, Server, Sink, Stream, admin_token, create_acme_payments, http, send};

/// The routes this suite uses, to the upstream `up`.
fn gateway_config(up: &str) -> String {
    format!(
        r#"
[tls]
listen = "127.0.0.1:0"
client_certificates = "optional"
server_names = ["localhost"]

[gateway]
listen = "127.0.0.1:0"
server_names = ["localhost", "127.0.0.1"]
mtls = "optional"

[[gateway.routes]]
path = "/pay/"
upstream = "{up}"
auth = ["bearer", "mtls"]
require_roles = ["payments:reader"]
require_scopes = ["payments/read"]
audience = "{PAYMENTS_AUD}"

[[gateway.routes]]
path = "/invoices/"
upstream = "{up}"
auth = ["bearer", "mtls"]
require_permissions = ["payments.invoice.read"]

[[gateway.routes]]
path = "/admin/"
upstream = "{up}"
auth = ["bearer"]
require_roles = ["payments:admin"]

[gateway.login]
client_id = "acme$gw"

[[gateway.routes]]
path = "/web/"
upstream = "{up}"
auth = ["session"]
require_roles = ["payments:reader"]
"#
    )
}

/// `serve` with the gateway, the organisation `acme` and its service `payments`.
struct Setup {
    _dir: tempfile::TempDir,
    s: Server,
    c: Client,
    admin: String,
    gw: Gw,
    sink: Sink,
    _echo: tokio::task::JoinHandle<()>,
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let (up, echo) = start_echo().await;
    let config = write(&dir.path().join("portcullis.toml"), &gateway_config(&up));
    let data = dir.path().join("data");
    let sink = Sink::start(0);
    let envs = sink.envs();
    let envs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let s = Server::start(&data, &["--config", config.to_str().unwrap()], &envs);
    let out = s.wait_output(Stream::All, "gateway listening on https://", Duration::from_secs(30));
    let addr = out
        .lines()
        .find_map(|l| l.split("gateway listening on https://").nth(1))
        .map(|a| a.chars().take_while(|c| !c.is_whitespace() && *c != '"').collect::<String>())
        .unwrap();
    let port = addr.rsplit(':').next().unwrap();
    let c = Client::new(&s);
    let ca = send(http().get(format!("{}/pki/ca.pem", s.url))).await;
    ca.expect(200);
    let ca = write(&dir.path().join("ca.pem"), &ca.text);
    let admin = admin_token(&s).await;
    create_acme_payments(&c, &admin).await;
    let gw = Gw { url: format!("https://localhost:{port}"), ca, dir: dir.path().to_owned() };
    Setup { _dir: dir, s, c, admin, gw, sink, _echo: echo }
}

/// An application of `acme` with `roles` and `scopes`; returns (client_id, secret).
async fn application(st: &Setup, slug: &str, roles: &[&str], scopes: &[&str]) -> (String, String) {
    let r =
        st.c.post(
            "/api/v1/organisations/acme/applications",
            &Cred::Bearer(&st.admin),
            &json!({
                "slug": slug, "name": slug, "grant_types": ["client_credentials"],
                "roles": roles, "scopes": scopes, "token_endpoint_auth_method": "client_secret_basic",
            }),
        )
        .await;
    r.expect(201);
    (r.str("client_id"), r.str("client_secret"))
}

/// A token for `resource` (the payments audience unless `None`).
async fn token(st: &Setup, id: &str, secret: &str, resource: Option<&str>) -> String {
    let form: Vec<(&str, &str)> = resource.map(|r| vec![("resource", r)]).unwrap_or_default();
    let r = support::token_request(&st.s, id, secret, &form).await;
    r.expect(200);
    r.str("access_token")
}

/// A transport certificate for application `app` of `acme`, made with `openssl`; returns
/// (certificate path, key path, certificate id).
async fn transport_certificate(st: &Setup, app: &str, name: &str) -> (PathBuf, PathBuf, String) {
    gateway::transport_certificate(&st.c, &st.admin, &st.gw.dir, app, name).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_from_the_control_plane_pass_and_revocation_reaches_the_gateway() {
    let st = setup().await;
    let gw = &st.gw;
    let (id, secret) = application(&st, "reader", &["payments:reader"], &["payments/read"]).await;
    let tok = token(&st, &id, &secret, Some(PAYMENTS_AUD)).await;

    // Accepted, with the identity headers set from the token, and client-sent ones gone.
    let r = gw.curl(
        "/pay/invoices?page=2",
        &[
            "-H",
            &format!("Authorization: Bearer {tok}"),
            "-H",
            "X-Portcullis-Subject: mallory",
            "-H",
            "x_portcullis_roles: payments:admin",
            "-H",
            "X-Forwarded-Client-Cert: Hash=00;Subject=\"CN=mallory\"",
        ],
    );
    assert_eq!(r.status, 200, "{r:?}");
    let echo = r.json();
    assert_eq!(echo["path"], "/pay/invoices");
    assert_eq!(echo["query"], "page=2");
    assert_eq!(r.upstream_header("x-portcullis-subject").as_deref(), Some(id.as_str()));
    assert_eq!(r.upstream_header("x-portcullis-client-id").as_deref(), Some(id.as_str()));
    assert_eq!(r.upstream_header("x-portcullis-org").as_deref(), Some("acme"));
    assert_eq!(r.upstream_header("x-portcullis-roles").as_deref(), Some("payments:reader"));
    assert_eq!(r.upstream_header("x-portcullis-scopes").as_deref(), Some("payments/read"));
    assert_eq!(r.upstream_header("x-portcullis-auth-method").as_deref(), Some("bearer"));
    assert!(r.upstream_header("x_portcullis_roles").is_none(), "{}", r.body);
    assert!(r.upstream_header("x-forwarded-client-cert").is_none(), "{}", r.body);
    assert_eq!(r.upstream_header("x-forwarded-proto").as_deref(), Some("https"));

    // Permissions come from the control plane's grants: payments:reader holds invoice.read
    // since the service was created (news the gateway has within about a second).
    gw.eventually("the service's grants at the gateway", || gw.bearer("/invoices/1", &tok).status == 200);
    // Missing role.
    gw.bearer("/admin/x", &tok).refused(403, "payments:admin");
    // A token for another audience is not a credential for /pay/.
    let r =
        st.c.post(
            "/api/v1/organisations/acme/services",
            &Cred::Bearer(&st.admin),
            &json!({
                "slug": "ledger", "name": "Ledger", "audience": "https://ledger.acme.test",
                "scopes": ["ledger/read"], "roles": ["ledger:reader"], "permissions": [],
            }),
        )
        .await;
    r.expect(201);
    let ledger = token(&st, &id, &secret, Some("https://ledger.acme.test")).await;
    let r = gw.bearer("/pay/x", &ledger);
    r.refused(401, "audience");
    assert!(r.header("www-authenticate").unwrap().contains("invalid_token"), "{r:?}");
    // No credential, a garbage one.
    let r = gw.curl("/pay/x", &[]);
    r.refused(401, "authentication required");
    assert!(r.header("www-authenticate").unwrap().starts_with("Bearer realm=\"portcullis\""), "{r:?}");
    gw.bearer("/pay/x", "not.a.token").refused(401, "malformed");
    // Unknown route, bad path.
    gw.bearer("/nowhere", &tok).refused(404, "no route");
    gw.bearer("/pay/%2e%2e/admin/x", &tok).refused(400, "path");

    // RFC 7009 revocation at the control plane: the gateway refuses the token within seconds.
    let r = send(
        http()
            .post(format!("{}/oauth2/revoke", st.s.url))
            .basic_auth(&id, Some(&secret))
            .form(&[("token", tok.as_str())]),
    )
    .await;
    r.expect(200);
    let took = gw.eventually("token revocation at the gateway", || gw.bearer("/pay/x", &tok).status == 401);
    gw.bearer("/pay/x", &tok).refused(401, "revoked");
    eprintln!("token revocation reached the gateway in {took:?}");

    // Permission grants follow the control plane: take invoice.read from payments:reader.
    let fresh = token(&st, &id, &secret, Some(PAYMENTS_AUD)).await;
    assert_eq!(gw.bearer("/invoices/1", &fresh).status, 200);
    let r =
        st.c.call(
            reqwest::Method::PUT,
            "/api/v1/organisations/acme/roles/payments:reader",
            &Cred::Bearer(&st.admin),
            Some(&json!({ "permissions": [] })),
        )
        .await;
    assert!(r.status == 200 || r.status == 204, "{}: {}", r.status, r.text);
    gw.eventually("a permission change at the gateway", || gw.bearer("/invoices/1", &fresh).status == 403);
    gw.bearer("/invoices/1", &fresh).refused(403, "payments.invoice.read");

    // The access log names the route and error id, never the token.
    let log = st.s.wait_output(Stream::All, "gateway request", Duration::from_secs(5));
    assert!(!log.contains(&tok) && !log.contains(&fresh), "a token reached the log");
    assert!(!log.contains(&secret), "a client secret reached the log");
    let metrics = send(http().get(format!("{}/metrics", st.s.url))).await;
    assert!(metrics.text.contains("portcullis_gateway_requests_total"), "{}", metrics.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_from_our_ca_authenticate_and_revocation_closes_the_door() {
    let st = setup().await;
    let gw = &st.gw;
    application(&st, "billing", &["payments:reader"], &["payments/read"]).await;
    let (cert, key, cert_id) = transport_certificate(&st, "billing", "billing").await;

    // mTLS alone: the certificate's application and its roles; XFCC with the certificate's hash.
    gw.eventually("the service's grants at the gateway", || {
        gw.with_cert("/invoices/7", &cert, &key, &[]).status == 200
    });
    let r = gw.with_cert("/invoices/7", &cert, &key, &[]);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.upstream_header("x-portcullis-subject").as_deref(), Some("acme$billing"));
    assert_eq!(r.upstream_header("x-portcullis-auth-method").as_deref(), Some("mtls"));
    assert_eq!(r.upstream_header("x-portcullis-roles").as_deref(), Some("payments:reader"));
    let xfcc = r.upstream_header("x-forwarded-client-cert").unwrap();
    let der = Command::new("openssl").args(["x509", "-outform", "DER", "-in"]).arg(&cert).output().unwrap().stdout;
    let hash: String = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert!(xfcc.starts_with(&format!("Hash={hash};Subject=")), "{xfcc}");
    assert!(xfcc.contains("acme$billing"), "{xfcc}");

    // A self-signed certificate with the same subject fails the handshake.
    sh(
        &gw.dir,
        "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
         -subj '/CN=acme$billing/O=acme' -keyout self.key -out self.crt",
    );
    let r = gw.with_cert("/invoices/7", &gw.dir.join("self.crt"), &gw.dir.join("self.key"), &[]);
    assert_eq!(r.status, 0, "a self-signed certificate must fail the handshake: {r:?}");
    assert_ne!(r.exit, 0);

    // Revoked at the control plane: refused at the handshake within seconds.
    let r =
        st.c.post(
            &format!("/api/v1/organisations/acme/certificates/{cert_id}/revoke"),
            &Cred::Bearer(&st.admin),
            &json!({ "reason": "keyCompromise" }),
        )
        .await;
    r.expect(200);
    let took = gw.eventually("certificate revocation at the gateway", || {
        gw.with_cert("/invoices/7", &cert, &key, &[]).status != 200
    });
    let r = gw.with_cert("/invoices/7", &cert, &key, &[]);
    assert_eq!(r.status, 0, "a revoked certificate must fail the handshake: {r:?}");
    eprintln!("certificate revocation reached the gateway in {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_bound_tokens_need_their_certificate() {
    let st = setup().await;
    let gw = &st.gw;
    let (id, secret) = application(&st, "bound", &["payments:reader"], &["payments/read"]).await;
    let (cert, key, _) = transport_certificate(&st, "bound", "bound").await;
    application(&st, "other", &["payments:reader"], &["payments/read"]).await;
    let (other_cert, other_key, _) = transport_certificate(&st, "other", "other").await;

    // A token obtained over mTLS at the control plane's TLS listener is bound to the
    // certificate (cnf.x5t#S256, RFC 8705).
    let out = st.s.wait_output(Stream::All, "listening on https://", Duration::from_secs(5));
    let tls = out
        .lines()
        .filter(|l| !l.contains("gateway listening"))
        .find_map(|l| l.split("listening on https://").nth(1))
        .map(|a| a.chars().take_while(|c| !c.is_whitespace() && *c != '"').collect::<String>())
        .unwrap();
    let port = tls.rsplit(':').next().unwrap();
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "--cacert"])
        .arg(&gw.ca)
        .arg("--cert")
        .arg(&cert)
        .arg("--key")
        .arg(&key)
        .args(["-u", &format!("{id}:{secret}"), "-d", "grant_type=client_credentials"])
        .args(["--data-urlencode", &format!("resource={PAYMENTS_AUD}")])
        .arg(format!("https://localhost:{port}/oauth2/token"))
        .output()
        .unwrap();
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"));
    let bound = answer["access_token"].as_str().unwrap_or_else(|| panic!("{answer}")).to_owned();
    let auth = format!("Authorization: Bearer {bound}");

    gw.bearer("/pay/x", &bound).refused(401, "certificate");
    gw.with_cert("/pay/x", &other_cert, &other_key, &["-H", &auth]).refused(401, "certificate");
    let r = gw.with_cert("/pay/x", &cert, &key, &["-H", &auth]);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.upstream_header("x-portcullis-auth-method").as_deref(), Some("bearer"));
    assert!(r.upstream_header("x-forwarded-client-cert").unwrap().contains("acme$bound"));

    // An unbound token works with or without a certificate; the bearer token decides the
    // identity, and XFCC still describes the certificate the connection proved.
    let plain = token(&st, &id, &secret, Some(PAYMENTS_AUD)).await;
    assert_eq!(gw.bearer("/pay/x", &plain).status, 200);
    let auth = format!("Authorization: Bearer {plain}");
    let r = gw.with_cert("/pay/x", &other_cert, &other_key, &["-H", &auth]);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.upstream_header("x-portcullis-subject").as_deref(), Some(id.as_str()));
    assert!(r.upstream_header("x-forwarded-client-cert").unwrap().contains("acme$other"));
}

// ------------------------------------------------------------------------ browser sign-in --

const RP: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/e2e/oidc_rp.mjs");

/// The e2e suite's fetch-based browser (`oidc_rp.mjs browse`) from `url` on the gateway, with
/// the cookie jar `jar`, signing in as `user` at the control plane when asked; it trusts the
/// gateway's certificate through our CA.
async fn browse(st: &Setup, url: &str, jar: &Path, user: Option<&Value>, extra: Value) -> Value {
    browse_via(st, &st.gw, url, jar, user, extra).await
}

/// [`browse`] through the gateway `gw`.
async fn browse_via(st: &Setup, gw: &Gw, url: &str, jar: &Path, user: Option<&Value>, extra: Value) -> Value {
    let mut arg = json!({
        "issuer": st.s.url,
        "url": format!("{}{url}", gw.url),
        "jar": jar,
        "sink_dir": st.sink.dir.path(),
        "also_origins": [gw.url],
    });
    if let Some(u) = user {
        arg["user"] = u.clone();
    }
    for (k, v) in extra.as_object().unwrap() {
        arg[k] = v.clone();
    }
    let out = tokio::process::Command::new("node")
        .arg(RP)
        .arg("browse")
        .arg(arg.to_string())
        .env("NODE_EXTRA_CA_CERTS", &gw.ca)
        .env("NO_PROXY", "*")
        .env("no_proxy", "*")
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run node ({e}); scripts/test.sh installs Node.js"));
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("oidc_rp.mjs printed no JSON ({e}): {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(v["ok"], true, "the browser failed: {v:#}");
    v
}

/// A person of `acme` with `roles`, as the browser script wants it.
async fn person(st: &Setup, name: &str, roles: &[&str]) -> (String, Value) {
    let email = format!("{name}@acme.test");
    let password = format!("{name}-pw-{}", support::random_hex(12));
    let r =
        st.c.post(
            "/api/v1/organisations/acme/users",
            &Cred::Bearer(&st.admin),
            &json!({ "email": email, "name": name, "password": password, "roles": roles }),
        )
        .await;
    r.expect(201);
    (r.str("id"), json!({ "email": email, "password": password }))
}

/// The trace entries of requests to the gateway.
fn at_gateway<'a>(st: &Setup, v: &'a Value) -> Vec<&'a Value> {
    at(&st.gw, v)
}

/// The trace entries of requests to `gw`.
fn at<'a>(gw: &Gw, v: &'a Value) -> Vec<&'a Value> {
    v["trace"].as_array().unwrap().iter().filter(|e| e["url"].as_str().unwrap().starts_with(&gw.url)).collect()
}

/// The value of cookie `name` in the browser's jar file.
fn jar_cookie(jar: &Path, name: &str) -> Option<String> {
    let v: Value = serde_json::from_str(&std::fs::read_to_string(jar).ok()?).ok()?;
    v["cookies"][name]["value"].as_str().map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_routes_sign_in_at_the_control_plane_and_come_back_with_a_session_cookie() {
    let st = setup().await;
    let gw = &st.gw;
    // The gateway's sign-in application: the code flow, its callback registered exactly.
    let callback = format!("{}/.portcullis/callback", gw.url);
    let r =
        st.c.post(
            "/api/v1/organisations/acme/applications",
            &Cred::Bearer(&st.admin),
            &json!({
                "slug": "gw", "name": "Gateway", "grant_types": ["authorization_code"],
                "redirect_uris": [callback], "token_endpoint_auth_method": "client_secret_basic",
                "first_party": true,
            }),
        )
        .await;
    r.expect(201);
    let (ann_id, ann) = person(&st, "ann", &["payments:reader"]).await;
    let (_, bob) = person(&st, "bob", &[]).await;

    // An API call without a credential is told so (401), not sent to an HTML page.
    gw.curl("/web/report", &["-H", "Accept: application/json"]).refused(401, "accepts session");
    let r = gw
        .curl("/web/report", &["-H", "Accept: text/html", "-H", "Sec-Fetch-Mode: cors", "-H", "Sec-Fetch-Dest: empty"]);
    assert_eq!(r.status, 401, "{r:?}");

    // A browser: to the sign-in page, password and emailed code, back with a cookie.
    let jar = gw.dir.join("jar-ann.json");
    let v = browse(&st, "/web/report?month=2026-11&q=a%20b", &jar, Some(&ann), json!({})).await;
    let steps = at_gateway(&st, &v);
    let first = steps[0];
    assert_eq!(first["status"], 302, "{first:#}");
    assert!(first["x_error"].as_str().unwrap().contains("sign-in required"), "{first:#}");
    assert!(first["x_error_id"].is_string());
    let to = first["location"].as_str().unwrap();
    assert!(to.starts_with(&format!("{}/oauth2/authorize?", st.s.url)), "{to}");
    for p in ["client_id=acme%24gw", "code_challenge_method=S256", "response_type=code", "state="] {
        assert!(to.contains(p), "{to} lacks {p}");
    }
    let flow_cookie = first["set_cookie"][0].as_str().unwrap().to_owned();
    assert!(flow_cookie.starts_with("__Host-portcullis_login_"), "{flow_cookie}");
    let cb = steps.iter().find(|e| e["path"] == "/.portcullis/callback").expect("the callback was reached");
    assert_eq!(cb["status"], 303, "{cb:#}");
    assert_eq!(cb["location"], "/web/report?month=2026-11&q=a%20b", "back to the URL first asked for");
    let set: Vec<&str> = cb["set_cookie"].as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
    let session_cookie = set.iter().find(|c| c.starts_with("__Host-portcullis_session=")).expect("a session cookie");
    for attr in ["HttpOnly", "Secure", "SameSite=Lax", "Path=/"] {
        assert!(session_cookie.contains(attr), "{session_cookie} lacks {attr}");
    }
    assert!(set.iter().any(|c| c.starts_with("__Host-portcullis_login_") && c.contains("Max-Age=0")), "{set:?}");
    // The page itself, as the upstream saw it: ann, by session; none of the gateway's cookies.
    let last = steps.last().unwrap();
    assert_eq!(last["status"], 200, "{last:#}");
    let echo: Value = serde_json::from_str(v["stop"]["text"].as_str().unwrap()).unwrap();
    assert_eq!(echo["path"], "/web/report");
    assert_eq!(echo["headers"]["x-portcullis-subject"], ann_id.as_str());
    assert_eq!(echo["headers"]["x-portcullis-auth-method"], "session");
    assert_eq!(echo["headers"]["x-portcullis-roles"], "payments:reader");
    assert!(!echo["headers"]["cookie"].as_str().unwrap_or("").contains("portcullis"), "{echo:#}");
    let token = jar_cookie(&jar, "__Host-portcullis_session").unwrap();

    // Next time the cookie is enough: no redirect.
    let v = browse(&st, "/web/again", &jar, None, json!({})).await;
    let steps = at_gateway(&st, &v);
    assert_eq!((steps.len(), steps[0]["status"].as_u64()), (1, Some(200)), "{v:#}");
    // And for curl with the cookie.
    let with_cookie = format!("Cookie: __Host-portcullis_session={token}");
    assert_eq!(gw.curl("/web/x", &["-H", &with_cookie]).status, 200);

    // The callback refuses what this browser did not start (CSRF), naming the problem.
    let replay = cb["url"].as_str().unwrap().trim_start_matches(gw.url.as_str()).to_owned();
    gw.curl(&replay, &[]).refused(400, "not started in this browser");
    gw.curl("/.portcullis/callback?error=access_denied&state=x", &[]).refused(403, "access_denied");
    gw.curl("/.portcullis/callback?code=a&code=b&state=s", &[]).refused(400, "repeats");
    // The same code again, even with the flow cookie: the control plane refuses the replay and
    // revokes the session it gave, so the cookie stops working within seconds.
    let flow_pair = flow_cookie.split(';').next().unwrap();
    gw.curl(&replay, &["-H", &format!("Cookie: {flow_pair}")]).refused(401, "already used");
    gw.eventually("the replayed code's session to be refused", || {
        gw.curl("/web/x", &["-H", &with_cookie, "-H", "Accept: application/json"]).status == 401
    });

    // Signed in again; bob (no role) is signed in but refused the route.
    let jar2 = gw.dir.join("jar-ann-2.json");
    browse(&st, "/web/report", &jar2, Some(&ann), json!({})).await;
    let token2 = jar_cookie(&jar2, "__Host-portcullis_session").unwrap();
    assert_ne!(token, token2);
    let jar_bob = gw.dir.join("jar-bob.json");
    let v = browse(&st, "/web/report", &jar_bob, Some(&bob), json!({})).await;
    let last = *at_gateway(&st, &v).last().unwrap();
    assert_eq!(last["status"], 403, "{last:#}");
    assert!(last["x_error"].as_str().unwrap().contains("payments:reader"), "{last:#}");

    // Signing out at the control plane ends the gateway's session too (it belongs to the SSO
    // session), and /.portcullis/logout clears the cookie and goes to that sign-out.
    let with_cookie2 = format!("Cookie: __Host-portcullis_session={token2}");
    assert_eq!(gw.curl("/web/x", &["-H", &with_cookie2]).status, 200);
    let r = gw.curl("/.portcullis/logout", &["-H", &with_cookie2]);
    assert_eq!(r.status, 303, "{r:?}");
    assert_eq!(r.header("location").unwrap(), format!("{}/oauth2/logout", st.s.url));
    assert!(r.header("set-cookie").unwrap().starts_with("__Host-portcullis_session=; "), "{r:?}");
    let v = browse(&st, "/.portcullis/logout", &jar2, None, json!({ "confirm_logout": true })).await;
    assert!(v["trace"].as_array().unwrap().iter().any(|e| e["page"] == "logout-confirmation"), "{v:#}");
    gw.eventually("the session of a signed-out SSO session to be refused", || {
        gw.curl("/web/x", &["-H", &with_cookie2, "-H", "Accept: application/json"]).status == 401
    });
    let r = gw.curl("/web/x", &["-H", &with_cookie2, "-H", "Accept: text/html"]);
    assert_eq!(r.status, 302, "a dead session in a browser goes back to the sign-in page: {r:?}");
}

/// A standalone `portcullis gateway` against the real control plane over HTTP: its own
/// application (client_credentials, role `portcullis:gateway`) fetches keys, trust, grants and
/// the feed, checks a bearer token locally, and signs a browser in through the control plane
/// (`/api/v1/gateway/browser-sessions`), whose sign-out then reaches it through the feed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standalone_gateway_serves_tokens_and_browser_sign_in_from_the_real_control_plane() {
    let st = setup().await;
    let (up, _echo) = start_echo().await;
    let r =
        st.c.post(
            "/api/v1/organisations/acme/applications",
            &Cred::Bearer(&st.admin),
            &json!({
                "slug": "edge", "name": "Edge gateway", "grant_types": ["client_credentials", "authorization_code"],
                "roles": ["portcullis:gateway"], "redirect_uris": ["https://localhost/.portcullis/callback"],
                "token_endpoint_auth_method": "client_secret_basic", "first_party": true,
            }),
        )
        .await;
    r.expect(201);
    let secret = r.str("client_secret");
    let routes = format!(
        r#"
[[gateway.routes]]
path = "/pay/"
upstream = "{up}"
auth = ["bearer"]
require_roles = ["payments:reader"]
audience = "{PAYMENTS_AUD}"

[[gateway.routes]]
path = "/web/"
upstream = "{up}"
auth = ["session"]
require_roles = ["payments:reader"]
"#
    );
    let config =
        write(&st.gw.dir.join("edge.toml"), &gateway::standalone_config(&st.s.url, "acme$edge", "off", &routes));
    let (edge, port) = Standalone::start(&config, &secret);
    let gw = Gw { url: format!("https://localhost:{port}"), ca: st.gw.ca.clone(), dir: st.gw.dir.clone() };
    // Its callback, registered exactly now that the port is known.
    let callback = format!("{}/.portcullis/callback", gw.url);
    let r =
        st.c.call(
            reqwest::Method::PATCH,
            "/api/v1/organisations/acme/applications/edge",
            &Cred::Bearer(&st.admin),
            Some(&json!({ "redirect_uris": [callback] })),
        )
        .await;
    r.expect(200);

    // A bearer token, checked locally with the keys fetched over HTTP.
    let (id, app_secret) = application(&st, "edge-reader", &["payments:reader"], &["payments/read"]).await;
    let tok = token(&st, &id, &app_secret, Some(PAYMENTS_AUD)).await;
    let r = gw.bearer("/pay/x", &tok);
    assert_eq!(r.status, 200, "{r:?}\n{}", edge.output.lock().unwrap());
    assert_eq!(r.upstream_header("x-portcullis-subject").as_deref(), Some(id.as_str()));

    // A browser signs in through the control plane and comes back with a session.
    let (ann_id, ann) = person(&st, "ann", &["payments:reader"]).await;
    let jar = gw.dir.join("jar-edge.json");
    let v = browse_via(&st, &gw, "/web/home?x=1", &jar, Some(&ann), json!({})).await;
    let steps = at(&gw, &v);
    assert_eq!(steps[0]["status"], 302, "{v:#}");
    assert!(steps[0]["location"].as_str().unwrap().contains("client_id=acme%24edge"), "{v:#}");
    assert_eq!(steps.last().unwrap()["status"], 200, "{v:#}\n{}", edge.output.lock().unwrap());
    let echo: Value = serde_json::from_str(v["stop"]["text"].as_str().unwrap()).unwrap();
    assert_eq!((echo["path"].as_str(), echo["query"].as_str()), (Some("/web/home"), Some("x=1")));
    assert_eq!(echo["headers"]["x-portcullis-subject"], ann_id.as_str());
    let cookie =
        format!("Cookie: __Host-portcullis_session={}", jar_cookie(&jar, "__Host-portcullis_session").unwrap());
    assert_eq!(gw.curl("/web/y", &["-H", &cookie]).status, 200);

    // Signing out at the control plane reaches the standalone gateway through the feed.
    let v = browse_via(&st, &gw, "/.portcullis/logout", &jar, None, json!({ "confirm_logout": true })).await;
    assert!(v["trace"].as_array().unwrap().iter().any(|e| e["page"] == "logout-confirmation"), "{v:#}");
    let took = gw.eventually("the signed-out session to be refused by the standalone gateway", || {
        gw.curl("/web/y", &["-H", &cookie, "-H", "Accept: application/json"]).status == 401
    });
    eprintln!("sign-out reached the standalone gateway in {took:?}");
}

/// `session` routes without a sign-in application are a configuration error: `serve` does not
/// start (inside serve the gateway has no application of its own to default to).
#[test]
fn session_routes_without_a_sign_in_application_stop_serve_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        &dir.path().join("portcullis.toml"),
        r#"
[gateway]
listen = "127.0.0.1:0"

[[gateway.routes]]
path = "/web/"
upstream = "http://127.0.0.1:9"
auth = ["session"]
"#,
    );
    let mut child = support::portcullis_command(&[], true)
        .arg("serve")
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .arg("--config")
        .arg(&config)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("serve kept running with session routes and no sign-in application");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "{err}");
    assert!(err.contains("no sign-in application") && err.contains("[gateway.login] client_id"), "{err}");
}
