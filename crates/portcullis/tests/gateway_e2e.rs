//! The gateway inside `portcullis serve`, end to end: the real binary with a `[gateway]` table,
//! a real upstream started here (echoing what it received as JSON), tokens, certificates and
//! revocations made through the real control plane, and `curl` as the client (TLS to the
//! gateway with the server certificate our CA issued it, client certificates made with
//! `openssl`). The stub-control-plane suite (`gateway_standalone_e2e.rs`) covers the forged
//! tokens; this one covers what only the real control plane can show: its tokens, its
//! certificates, its revocations reaching the gateway within seconds, its permission grants.
//! Needs `curl` and `openssl`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

#[allow(dead_code)]
mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{Client, Cred, PAYMENTS_AUD, Server, Stream, admin_token, create_acme_payments, http, send};

/// How long a revocation may take to reach the gateway.
const PROPAGATION: Duration = Duration::from_secs(5);

/// The upstream: answers every request with a JSON echo of its method, path and headers.
async fn start_echo() -> (String, tokio::task::JoinHandle<()>) {
    let app = axum::Router::new().fallback(|req: axum::extract::Request| async move {
        let headers: serde_json::Map<String, Value> = req
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), Value::from(v.to_str().unwrap_or("<binary>"))))
            .collect();
        axum::Json(json!({
            "method": req.method().as_str(),
            "path": req.uri().path(),
            "query": req.uri().query(),
            "headers": headers,
        }))
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (format!("http://{addr}"), task)
}

fn write(path: &Path, text: &str) -> PathBuf {
    std::fs::write(path, text).unwrap();
    path.to_owned()
}

fn sh(dir: &Path, script: &str) {
    let out = Command::new("sh").arg("-c").arg(script).current_dir(dir).output().unwrap();
    assert!(out.status.success(), "{script}: {}", String::from_utf8_lossy(&out.stderr));
}

/// One `curl` exchange with the gateway.
#[derive(Debug)]
struct Reply {
    /// 0 when the TLS handshake or connection failed.
    status: u16,
    headers: String,
    body: String,
    /// curl's exit code.
    exit: i32,
}

impl Reply {
    fn header(&self, name: &str) -> Option<String> {
        self.headers.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
        })
    }
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }
    /// The upstream saw this request header (the echo's view).
    fn upstream_header(&self, name: &str) -> Option<String> {
        self.json()["headers"][name].as_str().map(str::to_owned)
    }
    #[track_caller]
    fn refused(&self, status: u16, needle: &str) -> &Self {
        assert_eq!(self.status, status, "{self:?}");
        let err = self.header("x-error").unwrap_or_else(|| panic!("no x-error: {self:?}"));
        assert!(err.contains(needle), "x-error {err:?} lacks {needle:?}");
        assert!(self.header("x-error-id").is_some_and(|id| !id.is_empty()), "no x-error-id: {self:?}");
        self
    }
}

/// The gateway as `curl` sees it.
struct Gw {
    url: String,
    ca: PathBuf,
    dir: PathBuf,
}

impl Gw {
    /// `curl` with `args` (headers, client certificate…) to `path`.
    fn curl(&self, path: &str, args: &[&str]) -> Reply {
        let headers = self.dir.join(format!("h-{}", support::random_hex(6)));
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "10", "--cacert"])
            .arg(&self.ca)
            .arg("-D")
            .arg(&headers)
            .args(["-w", "\n%{http_code}"])
            .args(args)
            .arg(format!("{}{path}", self.url))
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
        let headers_text = std::fs::read_to_string(&headers).unwrap_or_default();
        let _ = std::fs::remove_file(&headers);
        Reply {
            status: code.trim().parse().unwrap_or(0),
            headers: headers_text,
            body: body.to_owned(),
            exit: out.status.code().unwrap_or(-1),
        }
    }
    fn bearer(&self, path: &str, token: &str) -> Reply {
        self.curl(path, &["-H", &format!("Authorization: Bearer {token}")])
    }
    fn with_cert(&self, path: &str, cert: &Path, key: &Path, extra: &[&str]) -> Reply {
        let (c, k) = (cert.to_str().unwrap().to_owned(), key.to_str().unwrap().to_owned());
        let mut args = vec!["--cert", &c, "--key", &k];
        args.extend_from_slice(extra);
        self.curl(path, &args)
    }
    /// Repeats `check` until it holds or `PROPAGATION` passes; returns how long it took.
    fn eventually(&self, what: &str, mut check: impl FnMut() -> bool) -> Duration {
        let start = Instant::now();
        loop {
            if check() {
                return start.elapsed();
            }
            assert!(start.elapsed() < PROPAGATION, "{what} did not happen within {PROPAGATION:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

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
    _echo: tokio::task::JoinHandle<()>,
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let (up, echo) = start_echo().await;
    let config = write(&dir.path().join("portcullis.toml"), &gateway_config(&up));
    let data = dir.path().join("data");
    let s = Server::start(&data, &["--config", config.to_str().unwrap()], &[]);
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
    Setup { _dir: dir, s, c, admin, gw, _echo: echo }
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
    let dir = &st.gw.dir;
    sh(
        dir,
        &format!(
            "openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout {name}.key \
             -subj '/CN=acme${app}/O=acme' -out {name}.csr"
        ),
    );
    let csr = std::fs::read_to_string(dir.join(format!("{name}.csr"))).unwrap();
    let r =
        st.c.post(
            "/api/v1/organisations/acme/certificates",
            &Cred::Bearer(&st.admin),
            &json!({ "type": "transport", "application": app, "csr": csr }),
        )
        .await;
    r.expect(201);
    let cert = write(&dir.join(format!("{name}.crt")), &format!("{}{}", r.str("certificate_pem"), r.str("chain_pem")));
    (cert, dir.join(format!("{name}.key")), r.str("id"))
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
