//! The certificate authority end to end: the real `portcullis` binary with its `[tls]` listener
//! (port 0), checked with independent tools as the oracles: the `openssl` CLI makes the keys
//! and CSRs (with the very command the CSR template gives), verifies the issued certificates,
//! chains and CRLs; `curl` speaks mTLS to the TLS listener (`tls_client_auth`, `POST
//! /pki/renew`, refused handshakes); Python authlib + pyjwt (`tests/e2e/pkjwt_client.py`) is
//! the `private_key_jwt` client and `tests/e2e/oauth_client.py` verifies the access tokens.
//! Needs `openssl`, `curl`, python3 with authlib, pyjwt[crypto] and requests (scripts/test.sh
//! installs them), and for `postgres_issue_revoke_crl` (two nodes on one database) a PostgreSQL
//! server (`PORTCULLIS_TEST_PG_URL`, default `postgres://postgres@127.0.0.1:5432/test`) and
//! `psql`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

#[allow(dead_code)]
mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD as B64, URL_SAFE_NO_PAD as B64URL};
use reqwest::Method;
use serde_json::{Value, json};

use support::{
    Client, Cred, PAYMENTS_AUD, PgDb, Resp, Server, admin_token, create_acme_payments, http, python, python_ok,
    random_hex, run_cli, send,
};

const PKJWT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/e2e/pkjwt_client.py");
const ORACLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/e2e/oauth_client.py");
const DEFAULT_PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// How long a revocation may take to bite at the TLS listener.
const REVOCATION_DEADLINE: Duration = Duration::from_secs(5);

// ------------------------------------------------------------------------- processes --

struct Run {
    status: ExitStatus,
    stdout: Vec<u8>,
    stderr: String,
}

impl Run {
    fn out(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    #[track_caller]
    fn ok(&self, what: &str) -> &Self {
        assert!(
            self.status.success(),
            "{what} failed ({:?}):\nstdout: {}\nstderr: {}",
            self.status,
            self.out(),
            self.stderr
        );
        self
    }
}

/// Runs `program` in `dir` to completion; the tools here are local and quick.
fn run_in(dir: &Path, program: &str, args: &[&str]) -> Run {
    let out = Command::new(program)
        .current_dir(dir)
        .args(args)
        .env("NO_PROXY", "*")
        .env("no_proxy", "*")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} ({e}); scripts/test.sh installs it"));
    Run { status: out.status, stdout: out.stdout, stderr: String::from_utf8_lossy(&out.stderr).into_owned() }
}

#[track_caller]
fn sh(dir: &Path, script: &str) -> Run {
    let r = run_in(dir, "sh", &["-c", script]);
    r.ok(script);
    r
}

fn openssl(dir: &Path, args: &[&str]) -> Run {
    run_in(dir, "openssl", args)
}

/// `openssl req` for a new key `NAME.key` and CSR `NAME.csr` in `dir`; `newkey` as in
/// `-newkey ec -pkeyopt ec_paramgen_curve:P-256`, `extra` more options (shell words).
#[track_caller]
fn make_csr(dir: &Path, name: &str, newkey: &str, subject: &str, extra: &str) -> (PathBuf, String) {
    sh(dir, &format!("openssl req -new {newkey} -nodes -keyout {name}.key -subj '{subject}' {extra} -out {name}.csr"));
    (dir.join(format!("{name}.key")), read(&dir.join(format!("{name}.csr"))))
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

fn write(p: &Path, text: &str) -> PathBuf {
    std::fs::write(p, text).unwrap();
    p.to_owned()
}

/// The RFC 8705 thumbprint of a PEM certificate file, computed by openssl.
#[track_caller]
fn x5t_of(dir: &Path, cert: &Path) -> String {
    let r = sh(dir, &format!("openssl x509 -in '{}' -outform DER | openssl dgst -sha256 -binary", cert.display()));
    assert_eq!(r.stdout.len(), 32, "sha256 of the DER: {:?}", r.stdout);
    B64URL.encode(&r.stdout)
}

/// The DER of a PEM certificate file, by openssl.
fn der_of(dir: &Path, cert: &Path) -> Vec<u8> {
    let r = openssl(dir, &["x509", "-in", &cert.display().to_string(), "-outform", "DER"]);
    r.ok("openssl x509 -outform DER");
    r.stdout
}

/// `openssl x509 -noout ARGS` on a certificate file.
#[track_caller]
fn x509_text(dir: &Path, cert: &Path, args: &[&str]) -> String {
    let mut a = vec!["x509", "-in", cert.to_str().unwrap(), "-noout"];
    a.extend_from_slice(args);
    let r = openssl(dir, &a);
    r.ok("openssl x509");
    r.out()
}

/// `openssl verify -CAfile ca.pem EXTRA… cert`: whether it verified, and what it said.
fn verify(dir: &Path, ca: &Path, cert: &Path, extra: &[&str]) -> (bool, String) {
    let mut a = vec!["verify", "-CAfile", ca.to_str().unwrap()];
    a.extend_from_slice(extra);
    a.push(cert.to_str().unwrap());
    let r = openssl(dir, &a);
    (r.status.success(), format!("{}{}", r.out(), r.stderr))
}

/// The certificates of a PEM bundle, one PEM string each.
fn split_pem(bundle: &str) -> Vec<String> {
    const END: &str = "-----END CERTIFICATE-----";
    bundle
        .split_inclusive(END)
        .filter(|p| p.contains("-----BEGIN CERTIFICATE-----"))
        .map(|p| format!("{}\n", p.trim_start()))
        .collect()
}

/// A PEM block with the given label around `der`, 64 columns.
fn pem(label: &str, der: &[u8]) -> String {
    let b = B64.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// The DER inside the first PEM block of `text`.
fn pem_der(text: &str) -> Vec<u8> {
    let body: String = text.lines().filter(|l| !l.starts_with("-----")).collect();
    B64.decode(body.trim()).unwrap()
}

/// The payload of a compact JWS, unverified.
fn jwt_payload(token: &str) -> Value {
    let part = token.split('.').nth(1).unwrap();
    serde_json::from_slice(&B64URL.decode(part).unwrap()).unwrap()
}

/// Polls `f` every 100 ms until it is true or `within` has passed; returns the last answer.
fn eventually(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

// ---------------------------------------------------------------------------- server --

/// A config file with a `[tls]` listener on a free port and the given client-certificate mode.
fn tls_config(dir: &Path, mode: &str) -> PathBuf {
    tls_config_with(dir, mode, "", "")
}

/// `tls_config` with more TOML: `tls_extra` inside `[tls]`, `more` after it (other sections).
fn tls_config_with(dir: &Path, mode: &str, tls_extra: &str, more: &str) -> PathBuf {
    write(
        &dir.join(format!("portcullis-{mode}-{}.toml", random_hex(4))),
        &format!("[tls]\nlisten = \"127.0.0.1:0\"\nclient_certificates = \"{mode}\"\n{tls_extra}\n{more}\n"),
    )
}

/// Logs why TLS handshakes were refused (shown when a test fails).
const TLS_LOG: (&str, &str) = ("RUST_LOG", "info,portcullis_web::tls=debug");

fn start(data: &Path, cfg: &Path, extra: &[&str]) -> Server {
    let mut args = vec!["--config", cfg.to_str().unwrap()];
    args.extend_from_slice(extra);
    Server::start(data, &args, &[TLS_LOG])
}

/// Restarts on the same address (so the same issuer) with the same data directory.
fn restart(old: &Server, cfg: &Path, extra: &[&str]) -> Server {
    let mut args = vec!["--config", cfg.to_str().unwrap()];
    args.extend_from_slice(extra);
    Server::launch(&old.data_dir, &old.addr, &args, &[TLS_LOG], true)
}

/// `https://ADDR:PORT` of the server's TLS listener, from its `listening on https://…` line.
fn https_url(s: &Server) -> String {
    let err = s.stderr();
    let line = err.lines().rfind(|l| l.contains("listening on https://")).unwrap_or_else(|| {
        panic!("the server did not log `listening on https://…`:\n{err}");
    });
    let at = line.find("listening on https://").unwrap() + "listening on ".len();
    line[at..].chars().take_while(|c| c.is_ascii_alphanumeric() || ".:/[]-".contains(*c)).collect()
}

/// The admin API with the bootstrap admin's token.
struct Admin {
    c: Client,
    t: String,
}

impl Admin {
    async fn new(s: &Server) -> Admin {
        Admin { c: Client::new(s), t: admin_token(s).await }
    }
    #[track_caller]
    fn get(&self, path: &str) -> impl Future<Output = Resp> + use<> {
        self.c.call(Method::GET, path, &Cred::Bearer(&self.t), None)
    }
    #[track_caller]
    fn post(&self, path: &str, body: &Value) -> impl Future<Output = Resp> + use<> {
        self.c.call(Method::POST, path, &Cred::Bearer(&self.t), Some(body))
    }
}

/// Application `acme$SLUG` with the given client authentication method, allowed
/// `payments/read` (so its tokens are for `PAYMENTS_AUD`).
async fn create_app(a: &Admin, slug: &str, method: &str) {
    let r = a
        .post(
            "/api/v1/organisations/acme/applications",
            &json!({
                "slug": slug, "name": slug, "scopes": ["payments/read"], "roles": ["payments:reader"],
                "token_endpoint_auth_method": method,
            }),
        )
        .await;
    r.expect(201);
    assert_eq!(r.json["token_endpoint_auth_method"], method, "{}", r.text);
    assert!(r.json.get("client_secret").is_none_or(Value::is_null), "no secret for {method}: {}", r.text);
}

async fn template(a: &Admin, app: &str, ty: &str) -> Value {
    let r = a.get(&format!("/api/v1/organisations/acme/applications/{app}/csr-template?type={ty}")).await;
    r.expect(200);
    r.json
}

#[track_caller]
fn issue(a: &Admin, ty: &str, app: &str, csr: &str) -> impl Future<Output = Resp> + use<> {
    a.post("/api/v1/organisations/acme/certificates", &json!({ "type": ty, "application": app, "csr": csr }))
}

/// A certificate the CA issued, saved as `NAME.crt` next to its key.
#[derive(Debug, Clone)]
struct Issued {
    id: String,
    serial: String,
    x5t: String,
    issuer_id: String,
    cert: PathBuf,
    key: PathBuf,
    json: Value,
}

fn issued_from(r: &Resp, dir: &Path, name: &str, key: &Path) -> Issued {
    r.expect(201);
    let cert = write(&dir.join(format!("{name}.crt")), &r.str("certificate_pem"));
    Issued {
        id: r.str("id"),
        serial: r.str("serial"),
        x5t: r.str("x5t#S256"),
        issuer_id: r.str("issuer_id"),
        cert,
        key: key.to_owned(),
        json: r.json.clone(),
    }
}

/// Makes a P-256 key and CSR with the right subject and has the CA issue it.
async fn new_cert(a: &Admin, dir: &Path, ty: &str, app: &str, name: &str) -> Issued {
    let subject = format!("/CN=acme${app}/O=acme");
    let (key, csr) = make_csr(dir, name, "-newkey ec -pkeyopt ec_paramgen_curve:P-256", &subject, "");
    issued_from(&issue(a, ty, app, &csr).await, dir, name, &key)
}

/// Writes the trust chain `/pki/ca.pem` to `DIR/ca.pem`; returns its path and text.
async fn fetch_ca(s: &Server, dir: &Path) -> (PathBuf, String) {
    let r = send(http().get(format!("{}/pki/ca.pem", s.url))).await;
    r.expect(200);
    assert_eq!(r.header("content-type"), Some("application/x-pem-file"));
    (write(&dir.join("ca.pem"), &r.text), r.text)
}

async fn fetch_bytes(url: &str) -> (u16, Option<String>, Vec<u8>) {
    let r = http().get(url).send().await.unwrap();
    let status = r.status().as_u16();
    let ct = r.headers().get("content-type").and_then(|v| v.to_str().ok()).map(str::to_owned);
    (status, ct, r.bytes().await.unwrap().to_vec())
}

/// `openssl crl -text` of the DER CRL at `url` (written to `DIR/NAME`).
async fn crl_text(dir: &Path, url: &str, name: &str) -> String {
    let (status, ct, der) = fetch_bytes(url).await;
    assert_eq!(status, 200, "{url}");
    assert_eq!(ct.as_deref(), Some("application/pkix-crl"), "{url}");
    let p = dir.join(name);
    std::fs::write(&p, der).unwrap();
    let r = openssl(dir, &["crl", "-inform", "DER", "-in", p.to_str().unwrap(), "-noout", "-text"]);
    r.ok("openssl crl -inform DER");
    r.out()
}

/// The revocation reason openssl prints for `serial` in a CRL's text, if it is listed
/// (`Some("")` when listed without a reason code).
fn crl_entry(text: &str, serial: &str) -> Option<String> {
    let norm = |s: &str| s.trim().trim_start_matches('0').to_ascii_uppercase().replace(':', "");
    let want = norm(serial);
    let mut lines = text.lines().peekable();
    while let Some(l) = lines.next() {
        if let Some(v) = l.trim().strip_prefix("Serial Number:")
            && norm(v) == want
        {
            let mut reason = String::new();
            while let Some(next) = lines.peek() {
                if next.contains("Serial Number:") || next.contains("Signature Algorithm") {
                    break;
                }
                let t = lines.next().unwrap().trim();
                if !t.is_empty() && !t.contains(':') {
                    reason = t.to_owned();
                }
            }
            return Some(reason);
        }
    }
    None
}

// ------------------------------------------------------------------------------ curl --

#[derive(Debug)]
struct Curl {
    /// curl's exit code (0: the exchange completed, whatever the HTTP status).
    code: i32,
    /// The HTTP status, 0 if there was none.
    status: u16,
    body: String,
    stderr: String,
}

impl Curl {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
    /// The TLS handshake (or the exchange right after it) failed.
    fn refused(&self) -> bool {
        self.code != 0 && self.status == 0
    }
}

/// curl against the TLS listener, trusting `DIR/ca.pem`, with an optional client certificate.
fn curl(dir: &Path, client: Option<(&Path, &Path)>, args: &[&str]) -> Curl {
    let mut a: Vec<&str> =
        vec!["-sS", "--noproxy", "*", "--max-time", "15", "--cacert", "ca.pem", "-w", "\n%{http_code}"];
    let (c, k);
    if let Some((cert, key)) = client {
        c = cert.to_str().unwrap().to_owned();
        k = key.to_str().unwrap().to_owned();
        a.extend(["--cert", &c, "--key", &k]);
    }
    a.extend_from_slice(args);
    let r = run_in(dir, "curl", &a);
    let out = r.out();
    let (body, code) = out.rsplit_once('\n').unwrap_or(("", &out));
    Curl {
        code: r.status.code().unwrap_or(-1),
        status: code.trim().parse().unwrap_or(0),
        body: body.to_owned(),
        stderr: r.stderr,
    }
}

/// `tls_client_auth`: client_credentials with only the client id, over mTLS.
fn mtls_token(dir: &Path, https: &str, client: Option<(&Path, &Path)>, client_id: &str) -> Curl {
    curl(
        dir,
        client,
        &["-d", &format!("grant_type=client_credentials&client_id={client_id}"), &format!("{https}/oauth2/token")],
    )
}

/// A reqwest client presenting `c` and trusting `DIR/ca.pem`, keeping its connections alive.
fn mtls_client(dir: &Path, c: &Issued) -> reqwest::Client {
    let ident = format!("{}{}", read(&c.cert), read(&c.key));
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(15))
        .http1_only()
        .tls_certs_only(reqwest::Certificate::from_pem_bundle(read(&dir.join("ca.pem")).as_bytes()).unwrap())
        .identity(reqwest::Identity::from_pem(ident.as_bytes()).unwrap())
        .build()
        .unwrap()
}

/// The `CRL Number` openssl reads in a CRL's text.
fn crl_number(text: &str) -> u64 {
    let mut lines = text.lines();
    while let Some(l) = lines.next() {
        if l.contains("X509v3 CRL Number") {
            return lines.next().unwrap().trim().parse().unwrap_or_else(|e| panic!("CRL number ({e}): {text}"));
        }
    }
    panic!("no CRL Number in:\n{text}")
}

fn pair(c: &Issued) -> Option<(&Path, &Path)> {
    Some((&c.cert, &c.key))
}

/// A token over mTLS for `c`, which must be bound to it (`cnf.x5t#S256`); returns the claims.
#[track_caller]
fn bound_token(dir: &Path, https: &str, c: &Issued, client_id: &str) -> Value {
    let r = mtls_token(dir, https, pair(c), client_id);
    assert_eq!((r.code, r.status), (0, 200), "mTLS token request failed: {r:?}");
    let claims = jwt_payload(r.json()["access_token"].as_str().unwrap());
    assert_eq!(claims["cnf"]["x5t#S256"], c.x5t.as_str(), "{claims}");
    assert_eq!(claims["client_id"], client_id, "{claims}");
    claims
}

/// Waits (up to `REVOCATION_DEADLINE`) until the certificate's handshake is refused, then checks
/// over TLS 1.2 that the alert is `certificate revoked`.
#[track_caller]
fn assert_handshake_revoked(dir: &Path, https: &str, c: &Issued, client_id: &str) {
    let mut last = None;
    let refused = eventually(REVOCATION_DEADLINE, || {
        let r = mtls_token(dir, https, pair(c), client_id);
        let done = r.refused();
        last = Some(r);
        done
    });
    assert!(refused, "the revoked certificate still completes requests after {REVOCATION_DEADLINE:?}: {last:?}");
    // TLS 1.2 carries the alert inside the handshake, so curl reports it reliably.
    let r = curl(dir, pair(c), &["--tls-max", "1.2", &format!("{https}/healthz")]);
    assert!(r.refused(), "{r:?}");
    assert!(r.stderr.contains("certificate revoked"), "expected the alert `certificate revoked`: {r:?}");
}

// ---------------------------------------------------------------------------- python --

/// A client assertion signed (or forged) by pkjwt_client.py `sign`.
#[track_caller]
fn assertion(args: &[&str]) -> String {
    let mut a = vec!["sign"];
    a.extend_from_slice(args);
    python_ok(PKJWT, &a)["assertion"].as_str().unwrap().to_owned()
}

/// Many client assertions from one run of pkjwt_client.py `sign-batch` (each spec: the
/// arguments of `sign`).
fn assertions(specs: &[&[String]]) -> Vec<String> {
    let joined: Vec<Vec<String>> = specs
        .iter()
        .map(|spec| {
            let mut out = Vec::new();
            let mut it = spec.iter();
            while let Some(a) = it.next() {
                out.push(format!("{a}={}", it.next().unwrap()));
            }
            out
        })
        .collect();
    let specs = serde_json::to_string(&joined).unwrap();
    let v = python_ok(PKJWT, &["sign-batch", "--specs", &specs]);
    let out: Vec<String> = v["assertions"].as_array().unwrap().iter().map(|a| a.as_str().unwrap().to_owned()).collect();
    assert_eq!(out.len(), joined.len(), "{v}");
    out
}

/// client_credentials with a client assertion, straight from reqwest.
async fn assertion_token(s: &Server, assertion: &str) -> Resp {
    send(http().post(format!("{}/oauth2/token", s.url)).form(&[
        ("grant_type", "client_credentials"),
        ("client_assertion_type", JWT_BEARER),
        ("client_assertion", assertion),
    ]))
    .await
}

#[track_caller]
fn expect_invalid_client(r: &Resp, what: &str) {
    assert_eq!(r.status, 401, "{what}: expected 401, got {} {}", r.status, r.text);
    assert_eq!(r.json["error"], "invalid_client", "{what}: {}", r.text);
}

// ------------------------------------------------------------------------------ postgres --

// ------------------------------------------------------------------------------- tests --

/// The template's command → CSR → certificate that openssl verifies as a TLS client
/// certificate with the profile's extensions → a certificate-bound token over mTLS (curl) →
/// revocation (keyCompromise) → the handshake fails and the CRL lists it → renewal: refused
/// for the revoked one, over mTLS for a live one → openssl -crl_check agrees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_issue_token_revoke_crl_renew() {
    let (data, work) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let w = work.path();
    let cfg = tls_config(w, "optional");
    let mut s = start(data.path(), &cfg, &[]);
    let https = https_url(&s);
    assert!(https.starts_with("https://127.0.0.1:"), "{https}");
    let a = Admin::new(&s).await;
    create_acme_payments(&a.c, &a.t).await;
    create_app(&a, "billing", "tls_client_auth").await;
    let (ca, ca_text) = fetch_ca(&s, w).await;
    assert_eq!(split_pem(&ca_text).len(), 2, "issuing + root:\n{ca_text}");

    // The template, and its command run as a user would paste it.
    let tpl = template(&a, "billing", "transport").await;
    assert_eq!(tpl["subject"], "CN=acme$billing, O=acme", "{tpl}");
    assert_eq!(tpl["type"], "transport", "{tpl}");
    let cmd = tpl["openssl_command"].as_str().unwrap();
    assert!(cmd.starts_with("openssl req "), "{cmd}");
    sh(w, cmd);
    let key = w.join("acme-billing-transport.key");
    let csr = read(&w.join("acme-billing-transport.csr"));
    let r = issue(&a, "transport", "billing", &csr).await;
    let c1 = issued_from(&r, w, "c1", &key);
    assert_eq!(r.json["type"], "transport");
    assert_eq!(r.json["application"], "acme$billing");
    assert_eq!(r.json["status"], "active");
    assert_eq!(r.json["sans"], json!(["URI:urn:portcullis:client:acme$billing"]), "{}", r.text);
    assert_eq!(r.header("location"), Some(format!("/api/v1/organisations/acme/certificates/{}", c1.id).as_str()));
    assert_eq!(split_pem(&r.str("chain_pem")).len(), 2, "chain = issuing + root: {}", r.text);

    // openssl: a TLS client certificate chaining to /pki/ca.pem, not a server one.
    let (ok, out) = verify(w, &ca, &c1.cert, &["-purpose", "sslclient"]);
    assert!(ok && out.contains(": OK"), "{out}");
    let (ok, out) = verify(w, &ca, &c1.cert, &["-purpose", "sslserver"]);
    assert!(!ok, "a transport certificate must not pass as a TLS server certificate: {out}");
    let ext = x509_text(w, &c1.cert, &["-ext", "keyUsage,extendedKeyUsage,subjectAltName,basicConstraints"]);
    assert!(ext.contains("X509v3 Key Usage: critical"), "{ext}");
    assert!(ext.contains("Digital Signature"), "{ext}");
    assert!(!ext.contains("Key Encipherment") && !ext.contains("Certificate Sign"), "EC transport: {ext}");
    assert!(ext.contains("TLS Web Client Authentication") && !ext.contains("Server Authentication"), "{ext}");
    assert!(ext.contains("URI:urn:portcullis:client:acme$billing"), "{ext}");
    assert!(ext.contains("X509v3 Basic Constraints: critical") && ext.contains("CA:FALSE"), "{ext}");
    let subject = x509_text(w, &c1.cert, &["-subject", "-nameopt", "RFC2253"]);
    assert_eq!(subject.trim(), "subject=O=acme,CN=acme$billing");
    let serial = x509_text(w, &c1.cert, &["-serial"]);
    assert_eq!(serial.trim().trim_start_matches("serial=").to_ascii_lowercase(), c1.serial.to_ascii_lowercase());
    assert_eq!(x5t_of(w, &c1.cert), c1.x5t, "x5t#S256 must be the SHA-256 of the DER");
    let text = x509_text(w, &c1.cert, &["-text"]);
    assert!(text.contains("Subject Key Identifier") && text.contains("Authority Key Identifier"), "{text}");
    assert!(text.contains(&format!("{}/pki/crl/{}", s.url, c1.issuer_id)), "CRL distribution point:\n{text}");

    // tls_client_auth over mTLS: a token bound to the certificate, verified by pyjwt.
    let claims = bound_token(w, &https, &c1, "acme$billing");
    assert_eq!(claims["sub"], "acme$billing");
    let token = mtls_token(w, &https, pair(&c1), "acme$billing").json()["access_token"].as_str().unwrap().to_owned();
    let v = python_ok(ORACLE, &["verify", "--issuer", &s.url, "--token", &token, "--audience", PAYMENTS_AUD]);
    assert_eq!(v["claims"]["cnf"]["x5t#S256"], c1.x5t.as_str(), "{v}");
    // Without the certificate: over TLS without one, and on the plain listener.
    let r = mtls_token(w, &https, None, "acme$billing");
    assert_eq!(r.status, 401, "{r:?}");
    assert_eq!(r.json()["error"], "invalid_client", "{r:?}");
    let r = send(
        http()
            .post(format!("{}/oauth2/token", s.url))
            .form(&[("grant_type", "client_credentials"), ("client_id", "acme$billing")]),
    )
    .await;
    expect_invalid_client(&r, "tls_client_auth over plain HTTP");
    // HTTP/2 on the TLS listener too.
    let r = run_in(
        w,
        "curl",
        &[
            "-sS",
            "--noproxy",
            "*",
            "--http2",
            "--cacert",
            "ca.pem",
            "--cert",
            c1.cert.to_str().unwrap(),
            "--key",
            c1.key.to_str().unwrap(),
            "-o",
            "/dev/null",
            "-w",
            "%{http_version} %{http_code}",
            "-d",
            "grant_type=client_credentials&client_id=acme$billing",
            &format!("{https}/oauth2/token"),
        ],
    );
    assert_eq!(r.ok("curl --http2").out(), "2 200");

    // Our certificates, but not this client's transport certificate: no token, no renewal.
    create_app(&a, "other", "tls_client_auth").await;
    create_app(&a, "signer", "private_key_jwt").await;
    let other = new_cert(&a, w, "transport", "other", "other").await;
    let signing = new_cert(&a, w, "signing", "billing", "billing-signing").await;
    let signer_tls = new_cert(&a, w, "transport", "signer", "signer-transport").await;
    bound_token(w, &https, &other, "acme$other");
    for (what, c, id) in [
        ("another client's transport", &other, "acme$billing"),
        ("the client's signing", &signing, "acme$billing"),
        ("a private_key_jwt client's transport (no downgrade)", &signer_tls, "acme$signer"),
    ] {
        let r = mtls_token(w, &https, pair(c), id);
        assert!(r.refused() || (r.status == 401 && r.json()["error"] == "invalid_client"), "{what} certificate: {r:?}");
    }
    let r = curl(w, pair(&signing), &["-X", "POST", &format!("{https}/pki/renew")]);
    assert!(r.refused() || r.status == 403, "a signing certificate does not renew itself over mTLS: {r:?}");
    // Deleting an application revokes its certificates (cessationOfOperation): they fail the
    // handshake, and a new application of the same name does not inherit them.
    let r = a.c.call(Method::DELETE, "/api/v1/organisations/acme/applications/other", &Cred::Bearer(&a.t), None).await;
    assert!(r.status == 204 || r.status == 200, "{}", r.text);
    create_app(&a, "other", "tls_client_auth").await;
    assert_handshake_revoked(w, &https, &other, "acme$other");
    let r = curl(w, pair(&other), &["-X", "POST", &format!("{https}/pki/renew")]);
    assert!(r.refused(), "the old application's certificate must not renew: {r:?}");
    let r = a.get(&format!("/api/v1/organisations/acme/certificates/{}", other.id)).await;
    r.expect(200);
    assert_eq!(r.json["status"], "revoked", "{}", r.text);
    assert_eq!(r.json["revocation_reason"], "cessation_of_operation", "{}", r.text);
    let r = a
        .post(
            &format!("/api/v1/organisations/acme/certificates/{}/revoke", other.id),
            &json!({ "reason": "superseded" }),
        )
        .await;
    r.expect(409);
    // A disabled application: no token, no renewal; enabled again, both work.
    let path = "/api/v1/organisations/acme/applications/other";
    let fresh = new_cert(&a, w, "transport", "other", "other-fresh").await;
    a.c.call(Method::PATCH, path, &Cred::Bearer(&a.t), Some(&json!({ "enabled": false }))).await.expect(200);
    let r = mtls_token(w, &https, pair(&fresh), "acme$other");
    assert_eq!(r.status, 401, "disabled: {r:?}");
    let r = curl(w, pair(&fresh), &["-X", "POST", &format!("{https}/pki/renew")]);
    assert_eq!(r.status, 403, "disabled: {r:?}");
    a.c.call(Method::PATCH, path, &Cred::Bearer(&a.t), Some(&json!({ "enabled": true }))).await.expect(200);
    bound_token(w, &https, &fresh, "acme$other");

    // Inventory: by fingerprint (x5t#S256), by serial with colons, the PEM with its chain.
    let base = "/api/v1/organisations/acme/certificates";
    let r = a.get(&format!("{base}?fingerprint={}", c1.x5t)).await;
    r.expect(200);
    assert_eq!(r.json["items"].as_array().unwrap().len(), 1, "{}", r.text);
    assert_eq!(r.json["items"][0]["id"], c1.id.as_str());
    let colons: Vec<String> =
        c1.serial.as_bytes().chunks(2).map(|p| String::from_utf8_lossy(p).to_uppercase()).collect();
    let r = a.get(&format!("{base}?serial={}", colons.join(":"))).await;
    r.expect(200);
    assert_eq!(r.json["items"][0]["id"], c1.id.as_str(), "{}", r.text);
    let r = a.get(&format!("{base}/{}/pem?chain=true", c1.id)).await;
    r.expect(200);
    let parts = split_pem(&r.text);
    assert_eq!(parts.len(), 3, "certificate, issuing CA, root: {}", r.text);
    assert_eq!(pem_der(&parts[0]), der_of(w, &c1.cert));

    // A second certificate before the first is revoked.
    let c2 = new_cert(&a, w, "transport", "billing", "c2").await;
    let crl_before = crl_number(&crl_text(w, &format!("{}/pki/crl", s.url), "crl-before.der").await);
    // A connection kept alive from before the revocation.
    let kept = mtls_client(w, &c1);
    let form = [("grant_type", "client_credentials"), ("client_id", "acme$billing")];
    send(kept.post(format!("{https}/oauth2/token")).form(&form)).await.expect(200);

    // Revocation: key compromise.
    let r = a.post(&format!("{base}/{}/revoke", c1.id), &json!({ "reason": "key_compromise" })).await;
    r.expect(200);
    assert_eq!(r.json["status"], "revoked", "{}", r.text);
    assert_eq!(r.json["revocation_reason"], "key_compromise", "{}", r.text);
    let again = a.post(&format!("{base}/{}/revoke", c1.id), &json!({ "reason": "superseded" })).await;
    again.expect(409);
    assert_handshake_revoked(w, &https, &c1, "acme$billing");
    // The kept-alive connection (if the pool reuses it) gets nothing either.
    for _ in 0..2 {
        if let Ok(r) = kept.post(format!("{https}/oauth2/token")).form(&form).send().await {
            assert_eq!(r.status().as_u16(), 401, "a revoked certificate on a live connection: {:?}", r.text().await);
        }
        if let Ok(r) = kept.post(format!("{https}/pki/renew")).send().await {
            assert_eq!(
                r.status().as_u16(),
                401,
                "a revoked certificate renewing on a live connection: {:?}",
                r.text().await
            );
        }
    }
    // The other certificate of the application is unaffected.
    bound_token(w, &https, &c2, "acme$billing");

    // The CRL (DER) lists the serial with its reason, signed by the issuing CA.
    let crl = crl_text(w, &format!("{}/pki/crl", s.url), "crl.der").await;
    assert_eq!(crl_entry(&crl, &c1.serial).as_deref(), Some("Key Compromise"), "{crl}");
    assert_eq!(crl_entry(&crl, &other.serial).as_deref(), Some("Cessation Of Operation"), "{crl}");
    assert_eq!(crl_entry(&crl, &c2.serial), None, "{crl}");
    assert!(crl_number(&crl) > crl_before, "the CRL number must grow: {crl_before} -> {crl}");
    let r = openssl(w, &["crl", "-inform", "DER", "-in", "crl.der", "-CAfile", "ca.pem", "-noout"]);
    r.ok("openssl crl -CAfile");
    assert!(r.stderr.contains("verify OK") || r.out().contains("verify OK"), "{}", r.stderr);
    let crl_dp = crl_text(w, &format!("{}/pki/crl/{}", s.url, c1.issuer_id), "crl-dp.der").await;
    assert_eq!(crl_entry(&crl_dp, &c1.serial).as_deref(), Some("Key Compromise"), "{crl_dp}");
    let listed = a.get(&format!("{base}?status=revoked")).await;
    listed.expect(200);
    let ids: Vec<&str> = listed.json["items"].as_array().unwrap().iter().map(|c| c["id"].as_str().unwrap()).collect();
    assert_eq!(ids, vec![other.id.as_str(), c1.id.as_str()], "newest issued first: {}", listed.text);

    // Renewal: a revoked certificate is not renewed (409)...
    let (_, csr3) = make_csr(w, "c3", "-newkey ec -pkeyopt ec_paramgen_curve:P-256", "/CN=acme$billing/O=acme", "");
    let r = a.post(&format!("{base}/{}/renew", c1.id), &json!({ "csr": csr3 })).await;
    r.expect(409);
    // ... a live one is, by an admin with a new key ...
    let r = a.post(&format!("{base}/{}/renew", c2.id), &json!({ "csr": csr3 })).await;
    let c3 = issued_from(&r, w, "c3", &w.join("c3.key"));
    assert_eq!(c3.json["renewed_from"], c2.id.as_str(), "{}", r.text);
    bound_token(w, &https, &c3, "acme$billing");
    // ... and by itself over mTLS: no body = the same key.
    let r = curl(w, pair(&c2), &["-X", "POST", &format!("{https}/pki/renew")]);
    assert_eq!((r.code, r.status), (0, 201), "{r:?}");
    let renewed = r.json();
    let c4 = Issued {
        id: renewed["id"].as_str().unwrap().to_owned(),
        serial: renewed["serial"].as_str().unwrap().to_owned(),
        x5t: renewed["x5t#S256"].as_str().unwrap().to_owned(),
        issuer_id: renewed["issuer_id"].as_str().unwrap().to_owned(),
        cert: write(&w.join("c4.crt"), renewed["certificate_pem"].as_str().unwrap()),
        key: c2.key.clone(),
        json: renewed.clone(),
    };
    assert_eq!(renewed["renewed_from"], c2.id.as_str(), "{renewed}");
    assert_ne!(c4.serial, c2.serial);
    assert_eq!(x509_text(w, &c4.cert, &["-pubkey"]), x509_text(w, &c2.cert, &["-pubkey"]), "same key");
    assert_eq!(x5t_of(w, &c4.cert), c4.x5t);
    let (ok, out) = verify(w, &ca, &c4.cert, &["-purpose", "sslclient"]);
    assert!(ok, "{out}");
    bound_token(w, &https, &c4, "acme$billing");
    // Over mTLS with a new key: {"csr": …}.
    let (key5, csr5) = make_csr(w, "c5", "-newkey ec -pkeyopt ec_paramgen_curve:P-384", "/CN=acme$billing/O=acme", "");
    let body = json!({ "csr": csr5 }).to_string();
    let r = curl(
        w,
        pair(&c4),
        &["-X", "POST", "-H", "content-type: application/json", "--data-binary", &body, &format!("{https}/pki/renew")],
    );
    assert_eq!((r.code, r.status), (0, 201), "{r:?}");
    let j = r.json();
    let c5 = Issued {
        id: j["id"].as_str().unwrap().to_owned(),
        serial: j["serial"].as_str().unwrap().to_owned(),
        x5t: j["x5t#S256"].as_str().unwrap().to_owned(),
        issuer_id: j["issuer_id"].as_str().unwrap().to_owned(),
        cert: write(&w.join("c5.crt"), j["certificate_pem"].as_str().unwrap()),
        key: key5,
        json: j.clone(),
    };
    assert_eq!(j["renewed_from"], c4.id.as_str(), "{j}");
    assert_eq!(j["key_type"], "EC P-384", "{j}");
    bound_token(w, &https, &c5, "acme$billing");
    // Renewal over mTLS keeps the subject: a CSR for another client is refused.
    let (_, csr_other) = make_csr(w, "c6", "-newkey ec -pkeyopt ec_paramgen_curve:P-256", "/CN=acme$other/O=acme", "");
    let body = json!({ "csr": csr_other }).to_string();
    let r = curl(
        w,
        pair(&c5),
        &["-X", "POST", "-H", "content-type: application/json", "--data-binary", &body, &format!("{https}/pki/renew")],
    );
    assert_eq!(r.status, 400, "{r:?}");
    // The listener's own certificate names localhost too.
    let port = https.rsplit(':').next().unwrap();
    let r = curl(w, None, &[&format!("https://localhost:{port}/healthz")]);
    assert_eq!((r.code, r.status), (0, 200), "{r:?}");
    // Renewal over mTLS needs a certificate: none over TLS, and the plain listener has none.
    let r = curl(w, None, &["-X", "POST", &format!("{https}/pki/renew")]);
    assert_eq!(r.status, 401, "{r:?}");
    let r = send(http().post(format!("{}/pki/renew", s.url))).await;
    r.expect(401);

    // openssl with the CRL: the revoked certificate is revoked, the renewed one is fine.
    let (status, ct, crl_pem) = fetch_bytes(&format!("{}/pki/crl.pem", s.url)).await;
    assert_eq!((status, ct.as_deref()), (200, Some("application/x-pem-file")));
    std::fs::write(w.join("crl.pem"), crl_pem).unwrap();
    let (ok, out) = verify(w, &ca, &c1.cert, &["-crl_check", "-CRLfile", "crl.pem"]);
    assert!(!ok && out.contains("certificate revoked"), "{out}");
    for c in [&c2, &c3, &c4, &c5] {
        let (ok, out) = verify(w, &ca, &c.cert, &["-crl_check", "-CRLfile", "crl.pem", "-purpose", "sslclient"]);
        assert!(ok, "{}: {out}", c.id);
    }
    s.stop_clean();
    s.assert_no_logged_errors();

    // After a restart: still revoked, still listed; the renewed certificate still works.
    let mut s = restart(&s, &cfg, &[]);
    let https = https_url(&s);
    assert_handshake_revoked(w, &https, &c1, "acme$billing");
    bound_token(w, &https, &c5, "acme$billing");
    let crl = crl_text(w, &format!("{}/pki/crl", s.url), "crl-after.der").await;
    assert_eq!(crl_entry(&crl, &c1.serial).as_deref(), Some("Key Compromise"), "{crl}");
    s.stop_clean();
    s.assert_no_logged_errors();
}

/// What the CA refuses (400 with `x-error` and `x-error-id`), what it ignores (CA:TRUE), and
/// the other key types of the template.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csr_refusals_and_key_types() {
    let (data, work) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let w = work.path();
    let cfg = tls_config(w, "required");
    let mut s = start(data.path(), &cfg, &[]);
    let https = https_url(&s);
    let a = Admin::new(&s).await;
    create_acme_payments(&a.c, &a.t).await;
    create_app(&a, "billing", "tls_client_auth").await;
    let (ca, _) = fetch_ca(&s, w).await;
    let subject = "/CN=acme$billing/O=acme";
    let p256 = "-newkey ec -pkeyopt ec_paramgen_curve:P-256";

    #[track_caller]
    fn refused(r: &Resp, what: &str, says: &str) {
        assert_eq!(r.status, 400, "{what}: expected 400, got {} {:?} {}", r.status, r.header("x-error"), r.text);
        assert!(r.header("x-error-id").is_some_and(|v| !v.is_empty()), "{what}: {:?}", r.headers);
        let x = r.x_error().to_ascii_lowercase();
        assert!(x.contains(says), "{what}: x-error {x:?} should mention {says:?}");
    }

    // Tampered: the DER still parses, the self-signature no longer verifies.
    let (_, good) = make_csr(w, "good", p256, subject, "");
    let der = pem_der(&good);
    let mut sig_flipped = der.clone();
    *sig_flipped.last_mut().unwrap() ^= 0x01;
    let mut subj_flipped = der.clone();
    let at = der.windows(7).position(|win| win == b"billing").unwrap();
    subj_flipped[at] = b'c';
    for (what, bad) in [("signature byte", sig_flipped), ("subject byte", subj_flipped)] {
        let tampered = pem("CERTIFICATE REQUEST", &bad);
        // Still a well-formed CSR for openssl, just not a valid one.
        let p = write(&w.join("tampered.csr"), &tampered);
        let parse = openssl(w, &["req", "-in", p.to_str().unwrap(), "-noout", "-subject"]);
        parse.ok("openssl req -subject on the tampered CSR");
        let check = openssl(w, &["req", "-in", p.to_str().unwrap(), "-noout", "-verify"]);
        assert!(!check.status.success() || check.stderr.contains("failure"), "openssl accepts it: {}", check.stderr);
        refused(&issue(&a, "transport", "billing", &tampered).await, &format!("tampered {what}"), "signature");
    }
    // The untampered original is fine.
    issue(&a, "transport", "billing", &good).await.expect(201);

    let (_, rsa1024) = make_csr(w, "rsa1024", "-newkey rsa:1024", subject, "");
    refused(&issue(&a, "transport", "billing", &rsa1024).await, "RSA 1024", "2048");
    let (_, k1) = make_csr(w, "k1", "-newkey ec -pkeyopt ec_paramgen_curve:secp256k1", subject, "");
    refused(&issue(&a, "transport", "billing", &k1).await, "secp256k1", "key type");
    let (_, sha1) = make_csr(w, "sha1", p256, subject, "-sha1");
    refused(&issue(&a, "transport", "billing", &sha1).await, "SHA-1 signed CSR", "not accepted");
    let (_, other) = make_csr(w, "other", p256, "/CN=acme$other/O=acme", "");
    refused(&issue(&a, "transport", "billing", &other).await, "another client's subject", "subject");
    let (_, extra) = make_csr(w, "extra", p256, "/CN=acme$billing/O=acme/OU=ops", "");
    refused(&issue(&a, "transport", "billing", &extra).await, "an extra subject attribute", "subject");
    let (_, wrong_org) = make_csr(w, "wrongorg", p256, "/CN=acme$billing/O=evil", "");
    refused(&issue(&a, "transport", "billing", &wrong_org).await, "another organisation", "subject");

    // A CSR asking for CA:TRUE is issued, without it.
    let (key, catrue) = make_csr(w, "catrue", p256, subject, "-addext basicConstraints=critical,CA:TRUE");
    let asked = openssl(w, &["req", "-in", "catrue.csr", "-noout", "-text"]);
    assert!(asked.out().contains("CA:TRUE"), "the CSR must ask for CA:TRUE: {}", asked.out());
    let r = issue(&a, "transport", "billing", &catrue).await;
    let c = issued_from(&r, w, "catrue", &key);
    let bc = x509_text(w, &c.cert, &["-ext", "basicConstraints"]);
    assert!(bc.contains("CA:FALSE") && !bc.contains("CA:TRUE"), "{bc}");
    let ku = x509_text(w, &c.cert, &["-ext", "keyUsage"]);
    assert!(!ku.contains("Certificate Sign") && !ku.contains("CRL Sign"), "{ku}");
    // It cannot act as a CA: a certificate "issued" with its key does not verify.
    sh(
        w,
        "openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout sub.key -subj '/CN=sub' -out sub.csr \
         && openssl x509 -req -in sub.csr -CA catrue.crt -CAkey catrue.key -set_serial 7 -days 1 -out sub.crt",
    );
    sh(w, "cat catrue.crt ca.pem > untrusted.pem");
    let (ok, out) = verify(w, &ca, &w.join("sub.crt"), &["-untrusted", "untrusted.pem"]);
    assert!(!ok, "a leaf signed by the CA:FALSE certificate must not verify: {out}");
    let ev = a.get("/api/v1/organisations/acme/audit-events?action=certificate.issue&limit=20").await;
    ev.expect(200);
    let mine = ev.json["items"].as_array().unwrap().iter().find(|e| e["target"] == c.id.as_str()).cloned();
    let mine = mine.unwrap_or_else(|| panic!("no certificate.issue event for {}: {}", c.id, ev.text));
    assert_eq!(mine["details"]["csr_asked_for_ca"], true, "{mine}");

    // Not a CSR at all.
    let cert_pem = read(&c.cert);
    refused(&issue(&a, "transport", "billing", &cert_pem).await, "a certificate instead of a CSR", "certificate");
    refused(&issue(&a, "transport", "billing", "hello, I am a CSR").await, "garbage", "pem");
    refused(&issue(&a, "transport", "billing", "").await, "an empty CSR", "csr");
    let junk = pem("CERTIFICATE REQUEST", b"\x30\x03\x02\x01\x00 definitely not PKCS#10");
    refused(&issue(&a, "transport", "billing", &junk).await, "garbage DER", "csr");
    let two = format!("{good}{good}");
    let r = issue(&a, "transport", "billing", &two).await;
    assert_eq!(r.status, 400, "two PEM blocks: {} {:?}", r.status, r.header("x-error"));
    let big_csr =
        format!("-----BEGIN CERTIFICATE REQUEST-----\n{}-----END CERTIFICATE REQUEST-----\n", "QUFB\n".repeat(20_000));
    refused(&issue(&a, "transport", "billing", &big_csr).await, "a 100 KB CSR", "larger");
    // A ~1.1 MB body: refused before it is parsed.
    let huge = "A".repeat(1_100_000);
    let r = issue(&a, "transport", "billing", &huge).await;
    assert!(matches!(r.status, 400 | 413), "1 MB body: {} {:?}", r.status, r.header("x-error"));
    assert!(!r.x_error().is_empty(), "{:?}", r.headers);
    // The request names things that do not exist.
    let r = issue(&a, "nonsense", "billing", &good).await;
    assert_eq!(r.status, 400, "unknown type: {}", r.text);
    let r = issue(&a, "transport", "nobody", &good).await;
    assert_eq!(r.status, 404, "unknown application: {}", r.text);
    let r = a
        .post(
            "/api/v1/organisations/acme/certificates",
            &json!({ "type": "transport", "application": "billing", "csr": good, "is_ca": true }),
        )
        .await;
    assert_eq!(r.status, 400, "unknown field: {}", r.text);

    // validity_days: at most the type's maximum; 1 day is 1 day.
    let r = a
        .post(
            "/api/v1/organisations/acme/certificates",
            &json!({ "type": "transport", "application": "billing", "csr": good, "validity_days": 398 }),
        )
        .await;
    refused(&r, "398 days for a transport certificate", "validity_days");
    let r = a
        .post(
            "/api/v1/organisations/acme/certificates",
            &json!({ "type": "transport", "application": "acme$billing", "csr": good, "validity_days": 1 }),
        )
        .await;
    let short = issued_from(&r, w, "short", &w.join("good.key"));
    let cert = short.cert.to_str().unwrap();
    assert!(openssl(w, &["x509", "-in", cert, "-noout", "-checkend", "82800"]).status.success(), "lives 23 h");
    assert!(!openssl(w, &["x509", "-in", cert, "-noout", "-checkend", "90000"]).status.success(), "not 25 h");
    bound_token(w, &https, &short, "acme$billing");

    // server-transport: DNS names only, within the organisation's allowed domains.
    let st = |dir: &Path, name: &str, san: &str| {
        let extra = if san.is_empty() { String::new() } else { format!("-addext 'subjectAltName={san}'") };
        make_csr(dir, name, "-newkey ec -pkeyopt ec_paramgen_curve:P-256", "/CN=acme$billing/O=acme", &extra).1
    };
    let api = st(w, "st-api", "DNS:api.acme.example");
    refused(&issue(&a, "server-transport", "billing", &api).await, "no allowed domains yet", "allowed domains");
    a.c.call(
        Method::PATCH,
        "/api/v1/organisations/acme",
        &Cred::Bearer(&a.t),
        Some(&json!({ "allowed_domains": ["acme.example"] })),
    )
    .await
    .expect(200);
    for (what, san, says) in [
        ("no DNS name", "", "dns name"),
        ("a wildcard", "DNS:*.acme.example", "wildcard"),
        ("a name outside the allowed domains", "DNS:api.evil.example", "outside"),
        ("a suffix trick", "DNS:evilacme.example", "outside"),
        ("an IP address", "DNS:api.acme.example,IP:127.0.0.1", "ip address"),
        ("an e-mail address", "DNS:api.acme.example,email:a@acme.example", "email"),
    ] {
        let csr = st(w, "st-bad", san);
        refused(&issue(&a, "server-transport", "billing", &csr).await, &format!("server-transport with {what}"), says);
    }
    let r = issue(&a, "server-transport", "billing", &api).await;
    let sc = issued_from(&r, w, "st-api", &w.join("st-api.key"));
    let ext = x509_text(w, &sc.cert, &["-ext", "extendedKeyUsage,subjectAltName"]);
    assert!(ext.contains("TLS Web Server Authentication") && !ext.contains("Client Authentication"), "{ext}");
    assert!(ext.contains("DNS:api.acme.example") && ext.contains("URI:urn:portcullis:client:acme$billing"), "{ext}");
    let (ok, out) = verify(w, &ca, &sc.cert, &["-purpose", "sslserver", "-verify_hostname", "api.acme.example"]);
    assert!(ok, "{out}");
    let (ok, out) = verify(w, &ca, &sc.cert, &["-purpose", "sslclient"]);
    assert!(!ok, "a server-transport certificate is not a client certificate: {out}");
    // A CSR asking for other SANs and usages on a transport certificate: the profile decides.
    let (key, asks) = make_csr(
        w,
        "asks",
        p256,
        subject,
        "-addext 'subjectAltName=DNS:evil.example,URI:urn:portcullis:client:acme\\$other' \
         -addext 'keyUsage=critical,keyCertSign,cRLSign' -addext 'extendedKeyUsage=serverAuth,codeSigning'",
    );
    let c = issued_from(&issue(&a, "transport", "billing", &asks).await, w, "asks", &key);
    let ext = x509_text(w, &c.cert, &["-ext", "keyUsage,extendedKeyUsage,subjectAltName"]);
    assert!(
        !ext.contains("evil")
            && !ext.contains("acme$other")
            && !ext.contains("Certificate Sign")
            && !ext.contains("CRL Sign")
            && !ext.contains("Code"),
        "{ext}"
    );
    assert!(
        ext.contains("URI:urn:portcullis:client:acme$billing") && ext.contains("TLS Web Client Authentication"),
        "{ext}"
    );

    // The template's other key types are issued, verify and authenticate over mTLS.
    let tpl = template(&a, "billing", "transport").await;
    let rsa = a.get("/api/v1/organisations/acme/applications/billing/csr-template?type=transport&key=rsa3072").await;
    rsa.expect(200);
    assert_eq!(rsa.json["openssl_command"], tpl["commands"]["rsa3072"], "{}", rsa.text);
    let r = a.get("/api/v1/organisations/acme/applications/billing/csr-template?type=transport&key=dsa").await;
    assert_eq!(r.status, 400, "{}", r.text);
    let r = a.get("/api/v1/organisations/acme/applications/billing/csr-template?type=nonsense").await;
    assert_eq!(r.status, 400, "{}", r.text);
    let types = a.get("/api/v1/pki/certificate-types").await;
    types.expect(200);
    let names: Vec<&str> =
        types.json["types"].as_array().unwrap().iter().map(|t| t["type"].as_str().unwrap()).collect();
    assert_eq!(names, ["transport", "server-transport", "signing"], "{}", types.text);
    for (k, key_type, ku) in [
        ("p384", "EC P-384", "Digital Signature"),
        ("rsa3072", "RSA 3072", "Key Encipherment"),
        ("ed25519", "Ed25519", "Digital Signature"),
    ] {
        let cmd = tpl["commands"][k].as_str().unwrap_or_else(|| panic!("no {k} command: {tpl}"));
        let sub = w.join(k);
        std::fs::create_dir(&sub).unwrap();
        sh(&sub, cmd);
        let csr = read(&sub.join("acme-billing-transport.csr"));
        let r = issue(&a, "transport", "billing", &csr).await;
        let c = issued_from(&r, &sub, "cert", &sub.join("acme-billing-transport.key"));
        assert!(r.str("key_type").starts_with(key_type), "{k}: key_type {} should be {key_type}", r.str("key_type"));
        let (ok, out) = verify(w, &ca, &c.cert, &["-purpose", "sslclient"]);
        assert!(ok, "{k}: {out}");
        let ext = x509_text(w, &c.cert, &["-ext", "keyUsage,basicConstraints"]);
        assert!(ext.contains(ku) && ext.contains("CA:FALSE"), "{k}: {ext}");
        assert_eq!(
            x509_text(w, &c.cert, &["-pubkey"]),
            openssl(&sub, &["pkey", "-in", "acme-billing-transport.key", "-pubout"]).out(),
            "{k}: the certificate must carry the CSR's key"
        );
        bound_token(w, &https, &c, "acme$billing");
    }
    s.stop_clean();
    s.assert_no_logged_errors();
}

/// Self-signed and foreign-CA client certificates (even with the right subject, even from a
/// CA named like ours) fail the handshake with `required`, and get no token with `optional`;
/// with `off` no certificate is asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_and_self_signed_certificates_are_refused() {
    let (data, work) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let w = work.path();
    let optional = tls_config(w, "optional");
    let mut s = start(data.path(), &optional, &[]);
    let a = Admin::new(&s).await;
    create_acme_payments(&a.c, &a.t).await;
    create_app(&a, "billing", "tls_client_auth").await;
    fetch_ca(&s, w).await;
    let ours = new_cert(&a, w, "transport", "billing", "ours").await;
    s.stop_clean();

    // The impostors, all made with openssl, all with our application's subject and SAN.
    let subject = "/CN=acme$billing/O=acme";
    write(
        &w.join("client.ext"),
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n\
         subjectAltName=URI:urn:portcullis:client:acme\\$billing\n",
    );
    sh(
        w,
        &format!(
            "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout self.key -subj '{subject}' \
             -addext extendedKeyUsage=clientAuth -days 2 -out self.crt"
        ),
    );
    let mut impostors = vec![("self-signed", w.join("self.crt"), w.join("self.key"))];
    for (name, ca_subject) in
        [("foreign", "/CN=Foreign CA/O=Elsewhere"), ("lookalike", "/CN=Portcullis Issuing CA 1/O=Portcullis")]
    {
        sh(
            w,
            &format!(
                "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout {name}-ca.key \
                 -subj '{ca_subject}' -addext basicConstraints=critical,CA:TRUE \
                 -addext keyUsage=critical,keyCertSign,cRLSign -days 2 -out {name}-ca.crt \
                 && openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout {name}.key \
                 -subj '{subject}' -out {name}.csr \
                 && openssl x509 -req -in {name}.csr -CA {name}-ca.crt -CAkey {name}-ca.key -set_serial 0x{} \
                 -days 1 -extfile client.ext -out {name}.crt \
                 && cat {name}.crt {name}-ca.crt > {name}-chain.crt",
                random_hex(8)
            ),
        );
        let (ok, out) = verify(w, &w.join(format!("{name}-ca.crt")), &w.join(format!("{name}.crt")), &[]);
        assert!(ok, "{name}: openssl must accept it under its own CA: {out}");
        impostors.push((name, w.join(format!("{name}.crt")), w.join(format!("{name}.key"))));
        // With the chain too: still not ours.
        impostors.push((name, w.join(format!("{name}-chain.crt")), w.join(format!("{name}.key"))));
    }

    // optional: no token for any of them (a refused handshake or invalid_client); ours works.
    let mut s = restart(&s, &optional, &[]);
    let https = https_url(&s);
    bound_token(w, &https, &ours, "acme$billing");
    let r = curl(w, None, &[&format!("{https}/healthz")]);
    assert_eq!((r.code, r.status, r.body.as_str()), (0, 200, "ok"), "optional: no certificate is fine: {r:?}");
    for (name, cert, key) in &impostors {
        let r = mtls_token(w, &https, Some((cert, key)), "acme$billing");
        assert!(
            r.refused() || (r.status == 401 && r.json()["error"] == "invalid_client"),
            "optional: the {name} certificate must not get a token: {r:?}"
        );
        let r = curl(w, Some((cert, key)), &["-X", "POST", &format!("{https}/pki/renew")]);
        assert!(r.refused() || r.status == 401, "optional: the {name} certificate must not renew: {r:?}");
    }
    s.stop_clean();

    // required: their handshakes fail; ours works; no certificate fails too.
    let required = tls_config(w, "required");
    let mut s = restart(&s, &required, &[]);
    let https = https_url(&s);
    bound_token(w, &https, &ours, "acme$billing");
    for (name, cert, key) in &impostors {
        let r = curl(w, Some((cert, key)), &[&format!("{https}/healthz")]);
        assert!(r.refused(), "required: the {name} certificate must fail the handshake: {r:?}");
        let r = mtls_token(w, &https, Some((cert, key)), "acme$billing");
        assert!(r.refused(), "required: the {name} certificate must fail the handshake: {r:?}");
    }
    let r = curl(w, None, &[&format!("{https}/healthz")]);
    assert!(r.refused(), "required: no certificate must fail the handshake: {r:?}");
    s.stop_clean();

    // off: no certificate is asked for, so tls_client_auth cannot work; TLS itself does.
    let off = tls_config(w, "off");
    let mut s = restart(&s, &off, &[]);
    let https = https_url(&s);
    let r = mtls_token(w, &https, pair(&ours), "acme$billing");
    assert_eq!(r.status, 401, "off: {r:?}");
    let r = curl(w, None, &[&format!("{https}/healthz")]);
    assert_eq!((r.code, r.status), (0, 200), "off: {r:?}");
    s.stop_clean();
    s.assert_no_logged_errors();
}

/// `private_key_jwt` with Python authlib: a signing certificate for an openssl key, the
/// application's JWKS, a token; every forged or reused assertion refused, the `jti` replay
/// cache kept across a restart; revoking the certificate removes the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_key_jwt_with_an_independent_client() {
    let (data, work) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let w = work.path();
    // Many refusals in a row from one IP: keep them under the failure limit (then 429).
    let envs = [("PORTCULLIS_CLIENTS__AUTH_FAILURES_PER_MINUTE", "1000")];
    let mut s = Server::start(data.path(), &[], &envs);
    let a = Admin::new(&s).await;
    create_acme_payments(&a.c, &a.t).await;
    create_app(&a, "signer", "private_key_jwt").await;
    let (_, ca_text) = fetch_ca(&s, w).await;
    let issuing_der = pem_der(&split_pem(&ca_text)[0]);
    let id = "acme$signer";
    let token_endpoint = format!("{}/oauth2/token", s.url);

    // A signing certificate for the key the template's command makes.
    let tpl = template(&a, "signer", "signing").await;
    sh(w, tpl["openssl_command"].as_str().unwrap());
    let key = w.join("acme-signer-signing.key");
    let key_s = key.to_str().unwrap().to_owned();
    let csr = read(&w.join("acme-signer-signing.csr"));
    let c = issued_from(&issue(&a, "signing", "signer", &csr).await, w, "signing", &key);
    let ext = x509_text(w, &c.cert, &["-ext", "keyUsage,extendedKeyUsage,subjectAltName,basicConstraints"]);
    assert!(ext.contains("Digital Signature") && ext.contains("CA:FALSE"), "{ext}");
    assert!(!ext.contains("Extended Key Usage"), "a signing certificate has no EKU: {ext}");
    assert!(ext.contains("URI:urn:portcullis:client:acme$signer"), "{ext}");
    let kid = x5t_of(w, &c.cert);
    assert_eq!(kid, c.x5t);

    // The application's JWKS: kid = x5t#S256, x5c = [certificate, issuing CA].
    let jwks_url = format!("{}/applications/{id}/jwks.json", s.url);
    let r = send(http().get(&jwks_url)).await;
    r.expect(200);
    assert_eq!(r.header("content-type"), Some("application/jwk-set+json"));
    let keys = r.json["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1, "{}", r.text);
    let k = &keys[0];
    assert_eq!(k["kid"], kid.as_str(), "{k}");
    assert_eq!(k["x5t#S256"], kid.as_str(), "{k}");
    assert_eq!(
        (&k["kty"], &k["crv"], &k["alg"], &k["use"]),
        (&json!("EC"), &json!("P-256"), &json!("ES256"), &json!("sig"))
    );
    assert!(k.get("d").is_none(), "private part in the JWKS: {k}");
    let x5c = k["x5c"].as_array().unwrap();
    assert_eq!(x5c.len(), 2, "{k}");
    assert_eq!(B64.decode(x5c[0].as_str().unwrap()).unwrap(), der_of(w, &c.cert), "x5c[0] is the certificate");
    assert_eq!(B64.decode(x5c[1].as_str().unwrap()).unwrap(), issuing_der, "x5c[1] is the issuing CA");
    let r = send(http().get(format!("{}/applications/acme$nobody/jwks.json", s.url))).await;
    r.expect(404);

    // authlib's PrivateKeyJWT gets a token; pyjwt verifies it.
    let got = python_ok(PKJWT, &["token", "--issuer", &s.url, "--client-id", id, "--key", &key_s, "--kid", &kid]);
    assert_eq!(got["status"], 200, "{got}");
    assert_eq!(got["header"]["kid"], kid.as_str(), "{got}");
    let token = got["token_response"]["access_token"].as_str().unwrap();
    let v = python_ok(ORACLE, &["verify", "--issuer", &s.url, "--token", token, "--audience", PAYMENTS_AUD]);
    assert_eq!(v["claims"]["client_id"], id, "{v}");
    assert_eq!(v["claims"]["scope"], "payments/read", "{v}");
    assert!(v["claims"].get("cnf").is_none(), "not certificate-bound: {v}");
    // The very assertion authlib sent, again.
    let used = got["assertion"].as_str().unwrap().to_owned();
    expect_invalid_client(&assertion_token(&s, &used).await, "replayed assertion");

    // Assertions signed by hand (one Python run for all of them): which must pass, which not.
    openssl(w, &["pkey", "-in", &key_s, "-pubout", "-out", "public.pem"]).ok("openssl pkey -pubout");
    sh(w, "openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out other.key");
    // The helper runs elsewhere: absolute paths.
    let (public, other) = (w.join("public.pem").display().to_string(), w.join("other.key").display().to_string());
    let cert = c.cert.display().to_string();
    // Another private_key_jwt client, and clients registered for other methods that have
    // signing certificates of their own.
    create_app(&a, "signer2", "private_key_jwt").await;
    let c2 = new_cert(&a, w, "signing", "signer2", "signer2").await;
    let mut foreign_method = Vec::new();
    for method in ["tls_client_auth", "client_secret_basic"] {
        let slug = method.replace('_', "-");
        let r = a
            .post(
                "/api/v1/organisations/acme/applications",
                &json!({ "slug": slug, "name": slug, "scopes": ["payments/read"], "token_endpoint_auth_method": method }),
            )
            .await;
        r.expect(201);
        foreign_method.push((method, format!("acme${slug}"), new_cert(&a, w, "signing", &slug, &slug).await));
    }
    let x5c = json!({ "x5c": [B64.encode(der_of(w, &c.cert))] }).to_string();
    let jwk = json!({ "jwk": { "kty": k["kty"], "crv": k["crv"], "x": k["x"], "y": k["y"] } }).to_string();
    let jku = json!({ "jku": jwks_url }).to_string();
    let long_jti = "j".repeat(300);
    let te = token_endpoint.as_str();
    // (what, arguments of `sign`, accepted?)
    let mine = |extra: &[&str]| -> Vec<String> {
        ["--client-id", id, "--key", &key_s].iter().chain(extra).map(|s| (*s).to_owned()).collect()
    };
    let mut cases: Vec<(String, Vec<String>, bool)> = vec![
        ("aud = token endpoint, with kid".into(), mine(&["--aud", te, "--kid", &kid]), true),
        ("aud = issuer, without kid".into(), mine(&["--aud", &s.url]), true),
        ("aud = [issuer, elsewhere]".into(), mine(&["--aud", &s.url, "--kid", &kid]), true),
        (
            "pyjwt with typ client-authentication+jwt and a past nbf".into(),
            mine(&[
                "--aud",
                te,
                "--kid",
                &kid,
                "--nbf-offset",
                "-5",
                "--extra-header",
                r#"{"typ":"client-authentication+jwt"}"#,
            ]),
            true,
        ),
        ("expired".into(), mine(&["--aud", te, "--kid", &kid, "--exp-in", "-30"]), false),
        ("living too long".into(), mine(&["--aud", te, "--kid", &kid, "--exp-in", "3600"]), false),
        ("wrong aud".into(), mine(&["--aud", "https://elsewhere.example/oauth2/token", "--kid", &kid]), false),
        ("unknown kid".into(), mine(&["--aud", te, "--kid", "no-such-key"]), false),
        ("iss and sub differ".into(), mine(&["--aud", te, "--kid", &kid, "--sub", "acme$other"]), false),
        ("iat in the future".into(), mine(&["--aud", te, "--kid", &kid, "--iat-offset", "120"]), false),
        ("nbf in the future".into(), mine(&["--aud", te, "--kid", &kid, "--nbf-offset", "120"]), false),
        ("a 300-character jti".into(), mine(&["--aud", te, "--kid", &kid, "--jti", &long_jti]), false),
        ("an x5c header (our own certificate)".into(), mine(&["--aud", te, "--extra-header", &x5c]), false),
        ("a jwk header (the right key)".into(), mine(&["--aud", te, "--extra-header", &jwk]), false),
        ("a jku header".into(), mine(&["--aud", te, "--kid", &kid, "--extra-header", &jku]), false),
        (
            "a crit header".into(),
            mine(&["--aud", te, "--kid", &kid, "--extra-header", r#"{"crit":["exp"],"exp":1}"#]),
            false,
        ),
        ("typ at+jwt".into(), mine(&["--aud", te, "--kid", &kid, "--extra-header", r#"{"typ":"at+jwt"}"#]), false),
        (
            "another key under the right kid".into(),
            ["--client-id", id, "--key", &other, "--aud", te, "--kid", &kid].map(str::to_owned).to_vec(),
            false,
        ),
        (
            "alg none".into(),
            ["--client-id", id, "--aud", te, "--kid", &kid, "--alg", "none"].map(str::to_owned).to_vec(),
            false,
        ),
        (
            "HS256 keyed with the public key".into(),
            ["--client-id", id, "--aud", te, "--kid", &kid, "--alg", "HS256", "--hmac-secret-file", &public]
                .map(str::to_owned)
                .to_vec(),
            false,
        ),
        (
            "HS256 keyed with the certificate".into(),
            ["--client-id", id, "--aud", te, "--alg", "HS256", "--hmac-secret-file", &cert].map(str::to_owned).to_vec(),
            false,
        ),
        (
            "acme$signer2 with signer's key and kid".into(),
            ["--client-id", "acme$signer2", "--key", &key_s, "--aud", te, "--kid", &kid].map(str::to_owned).to_vec(),
            false,
        ),
        (
            "acme$signer2 with signer's key under signer2's kid".into(),
            ["--client-id", "acme$signer2", "--key", &key_s, "--aud", te, "--kid", &c2.x5t].map(str::to_owned).to_vec(),
            false,
        ),
        (
            "acme$signer2 with its own key".into(),
            ["--client-id", "acme$signer2", "--key", c2.key.to_str().unwrap(), "--aud", te, "--kid", &c2.x5t]
                .map(str::to_owned)
                .to_vec(),
            true,
        ),
    ];
    for (method, client, own) in &foreign_method {
        cases.push((
            format!("private_key_jwt for a {method} client (no switching methods)"),
            ["--client-id", client, "--key", own.key.to_str().unwrap(), "--aud", te, "--kid", &own.x5t]
                .map(str::to_owned)
                .to_vec(),
            false,
        ));
    }
    // For the replay after the restart.
    cases.push(("used before the restart".into(), mine(&["--aud", te, "--kid", &kid, "--exp-in", "240"]), true));
    // "aud = [issuer, elsewhere]": make aud an array.
    cases[2].1.extend(["--aud-extra".to_owned(), "https://elsewhere.example".to_owned()]);
    let specs: Vec<&[String]> = cases.iter().map(|(_, a, _)| a.as_slice()).collect();
    let jwts = assertions(&specs);
    for ((what, _, accepted), jwt) in cases.iter().zip(&jwts) {
        let r = assertion_token(&s, jwt).await;
        if *accepted {
            assert_eq!(r.status, 200, "{what}: should be accepted: {}", r.text);
        } else {
            expect_invalid_client(&r, what);
        }
    }
    let pre_restart = jwts.last().unwrap().clone();
    let sign = |extra: &[&str]| {
        let args = mine(extra);
        assertion(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };

    // private_key_jwt at the introspection endpoint too.
    let jwt = sign(&["--aud", &token_endpoint, "--kid", &kid]);
    let r = send(http().post(format!("{}/oauth2/introspect", s.url)).form(&[
        ("token", token),
        ("client_assertion_type", JWT_BEARER),
        ("client_assertion", &jwt),
    ]))
    .await;
    r.expect(200);
    assert_eq!(r.json["active"], true, "{}", r.text);
    // Another client's id in the form does not help.
    let r = send(http().post(&token_endpoint).form(&[
        ("grant_type", "client_credentials"),
        ("client_id", "acme$other"),
        ("client_assertion_type", JWT_BEARER),
        ("client_assertion", &sign(&["--aud", &token_endpoint])),
    ]))
    .await;
    assert!(matches!(r.status, 400 | 401), "client_id differing from the assertion: {}", r.text);

    // The jti cache is in the database: a replay after a restart is still refused.
    s.stop_clean();
    let mut s = Server::launch(data.path(), &s.addr, &[], &envs, true);
    expect_invalid_client(&assertion_token(&s, &pre_restart).await, "replay after a restart");
    assertion_token(&s, &sign(&["--aud", &token_endpoint, "--kid", &kid])).await.expect(200);

    // Revoked: gone from the JWKS, and a fresh assertion is refused.
    let a = Admin::new(&s).await;
    let r = a
        .post(&format!("/api/v1/organisations/acme/certificates/{}/revoke", c.id), &json!({ "reason": "superseded" }))
        .await;
    r.expect(200);
    let r = send(http().get(&jwks_url)).await;
    r.expect(200);
    assert_eq!(r.json["keys"], json!([]), "{}", r.text);
    expect_invalid_client(&assertion_token(&s, &sign(&["--aud", &token_endpoint, "--kid", &kid])).await, "revoked key");
    let (ok, v) = python(PKJWT, &["token", "--issuer", &s.url, "--client-id", id, "--key", &key_s, "--kid", &kid]);
    assert!(!ok && v["status"] == 401 && v["error"] == "invalid_client", "authlib after revocation: {v}");

    // A deleted application's signing keys go with it; a new one of that name starts empty.
    let r =
        a.c.call(Method::DELETE, "/api/v1/organisations/acme/applications/signer2", &Cred::Bearer(&a.t), None).await;
    assert!(r.status == 204 || r.status == 200, "{}", r.text);
    send(http().get(format!("{}/applications/acme$signer2/jwks.json", s.url))).await.expect(404);
    create_app(&a, "signer2", "private_key_jwt").await;
    let r = send(http().get(format!("{}/applications/acme$signer2/jwks.json", s.url))).await;
    r.expect(200);
    assert_eq!(r.json["keys"], json!([]), "{}", r.text);
    let jwt = assertion(&[
        "--client-id",
        "acme$signer2",
        "--key",
        c2.key.to_str().unwrap(),
        "--aud",
        &token_endpoint,
        "--kid",
        &c2.x5t,
    ]);
    expect_invalid_client(&assertion_token(&s, &jwt).await, "the deleted application's key");
    s.stop_clean();
    s.assert_no_logged_errors();
}

/// More key types for `private_key_jwt`: Ed25519 (EdDSA) and RSA (PS256) signing certificates,
/// side by side in the JWKS; an algorithm that does not fit the key is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_key_jwt_ed25519_and_rsa() {
    let (data, work) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let w = work.path();
    let mut s = Server::start(data.path(), &[], &[]);
    let a = Admin::new(&s).await;
    create_acme_payments(&a.c, &a.t).await;
    create_app(&a, "signer", "private_key_jwt").await;
    let id = "acme$signer";
    let tpl = template(&a, "signer", "signing").await;
    let mut kids = Vec::new();
    for (k, alg) in [("ed25519", "EdDSA"), ("rsa3072", "PS256")] {
        let sub = w.join(k);
        std::fs::create_dir(&sub).unwrap();
        sh(&sub, tpl["commands"][k].as_str().unwrap());
        let key = sub.join("acme-signer-signing.key");
        let csr = read(&sub.join("acme-signer-signing.csr"));
        let c = issued_from(&issue(&a, "signing", "signer", &csr).await, &sub, "signing", &key);
        let key_s = key.to_str().unwrap();
        let got = python_ok(
            PKJWT,
            &["token", "--issuer", &s.url, "--client-id", id, "--key", key_s, "--kid", &c.x5t, "--alg", alg],
        );
        assert_eq!(got["status"], 200, "{k}: {got}");
        kids.push((k, c.x5t.clone(), key_s.to_owned()));
    }
    let r = send(http().get(format!("{}/applications/{id}/jwks.json", s.url))).await;
    r.expect(200);
    let listed: Vec<&str> = r.json["keys"].as_array().unwrap().iter().map(|k| k["kid"].as_str().unwrap()).collect();
    for (k, kid, _) in &kids {
        assert!(listed.contains(&kid.as_str()), "{k}: {kid} not in {}", r.text);
    }
    // The RSA key with RS256 is fine (an RSA algorithm); under the Ed25519 kid it is not.
    let token_endpoint = format!("{}/oauth2/token", s.url);
    let (rsa_kid, rsa_key) = (&kids[1].1, &kids[1].2);
    let ok =
        assertion(&["--client-id", id, "--key", rsa_key, "--aud", &token_endpoint, "--kid", rsa_kid, "--alg", "RS256"]);
    assertion_token(&s, &ok).await.expect(200);
    let ed_kid = &kids[0].1;
    let bad =
        assertion(&["--client-id", id, "--key", rsa_key, "--aud", &token_endpoint, "--kid", ed_kid, "--alg", "RS256"]);
    expect_invalid_client(&assertion_token(&s, &bad).await, "an RSA signature under the Ed25519 kid");
    s.stop_clean();
    s.assert_no_logged_errors();
}

/// The public CA documents, `portcullis ca show`, and `portcullis ca rotate` with the server
/// stopped: afterwards new certificates come from the new issuing CA, the old ones still
/// verify and authenticate, and can still be revoked on the old CA's CRL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_documents_show_and_rotate() {
    let (data, work) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let w = work.path();
    let cfg = tls_config(w, "optional");
    let mut s = start(data.path(), &cfg, &[]);
    let https = https_url(&s);
    let a = Admin::new(&s).await;
    create_acme_payments(&a.c, &a.t).await;
    create_app(&a, "billing", "tls_client_auth").await;

    // /pki/ca.pem: the issuing CA, then the self-signed root that signed it.
    let (_, ca_text) = fetch_ca(&s, w).await;
    let certs = split_pem(&ca_text);
    assert_eq!(certs.len(), 2, "{ca_text}");
    let issuing = write(&w.join("issuing.pem"), &certs[0]);
    let root = write(&w.join("root.pem"), &certs[1]);
    let names = |p: &Path| x509_text(w, p, &["-subject", "-issuer", "-nameopt", "RFC2253"]);
    let (root_names, issuing_names) = (names(&root), names(&issuing));
    let root_subject = root_names.lines().next().unwrap().trim_start_matches("subject=").to_owned();
    assert!(root_names.contains(&format!("issuer={root_subject}")), "the root is self-signed: {root_names}");
    assert!(issuing_names.contains(&format!("issuer={root_subject}")), "{issuing_names}");
    assert!(issuing_names.contains("Portcullis Issuing CA 1"), "{issuing_names}");
    let (ok, out) = verify(w, &root, &issuing, &[]);
    assert!(ok, "the issuing CA verifies against the root alone: {out}");
    for p in [&root, &issuing] {
        let bc = x509_text(w, p, &["-ext", "basicConstraints,keyUsage"]);
        assert!(bc.contains("CA:TRUE") && bc.contains("Certificate Sign") && bc.contains("CRL Sign"), "{bc}");
    }

    // /pki/crl.pem parses, is signed by the issuing CA and lists nothing yet.
    let (status, ct, crl) = fetch_bytes(&format!("{}/pki/crl.pem", s.url)).await;
    assert_eq!((status, ct.as_deref()), (200, Some("application/x-pem-file")));
    let crl = String::from_utf8(crl).unwrap();
    assert!(crl.starts_with("-----BEGIN X509 CRL-----"), "{crl}");
    write(&w.join("crl.pem"), &crl);
    let r = openssl(w, &["crl", "-in", "crl.pem", "-noout", "-text", "-CAfile", "ca.pem"]);
    r.ok("openssl crl -in crl.pem");
    assert!(r.stderr.contains("verify OK"), "{}", r.stderr);
    assert!(r.out().contains("No Revoked Certificates") && r.out().contains("CRL Number"), "{}", r.out());
    let r = send(http().get(format!("{}/pki/crl/no-such-ca", s.url))).await;
    r.expect(404);

    let old = new_cert(&a, w, "transport", "billing", "old").await;
    bound_token(w, &https, &old, "acme$billing");
    s.stop_clean();

    // ca show / ca rotate against the stopped server's data directory.
    let dd = data.path().to_str().unwrap();
    let (st, out, err) = run_cli(&["ca", "show", "--data-dir", dd], &[]);
    assert!(st.success(), "ca show: {err}");
    let shown: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("ca show printed no JSON ({e}): {out}"));
    let issuing_list = shown["issuing"].as_array().unwrap();
    assert_eq!(issuing_list.len(), 1, "{shown}");
    assert_eq!(issuing_list[0]["id"], old.issuer_id.as_str(), "{shown}");
    assert_eq!(issuing_list[0]["issues"], true, "{shown}");
    assert!(issuing_list[0]["subject"].as_str().unwrap().contains("Portcullis Issuing CA 1"), "{shown}");
    assert!(issuing_list[0]["crl_number"].as_i64().is_some(), "{shown}");
    assert_eq!(shown["root"]["has_key"], true, "{shown}");
    let (st, out, err) = run_cli(&["ca", "rotate", "--data-dir", dd], &[]);
    assert!(st.success(), "ca rotate: {err}");
    let rotated: Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("ca rotate printed no JSON ({e}): {out}"));
    let list = rotated["issuing"].as_array().unwrap();
    assert_eq!(list.len(), 2, "{rotated}");
    let active: Vec<&Value> = list.iter().filter(|c| c["issues"] == true).collect();
    assert_eq!(active.len(), 1, "exactly one issuing CA issues: {rotated}");
    let new_id = active[0]["id"].as_str().unwrap().to_owned();
    assert_ne!(new_id, old.issuer_id);
    assert_eq!(rotated["root"]["id"], shown["root"]["id"], "same root: {rotated}");
    let (st, out, _) = run_cli(&["ca", "show", "--data-dir", dd], &[]);
    assert!(st.success());
    let again: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(again["issuing"], rotated["issuing"], "ca show after rotate");

    // Restarted: new certificates from the new CA; the old one still verifies and works.
    let mut s = restart(&s, &cfg, &[]);
    let https = https_url(&s);
    let a = Admin::new(&s).await;
    let (ca, ca_text) = fetch_ca(&s, w).await;
    assert_eq!(split_pem(&ca_text).len(), 3, "both issuing CAs and the root:\n{ca_text}");
    let new = new_cert(&a, w, "transport", "billing", "new").await;
    assert_eq!(new.issuer_id, new_id);
    let (old_issuer, new_issuer) = (x509_text(w, &old.cert, &["-issuer"]), x509_text(w, &new.cert, &["-issuer"]));
    assert_ne!(old_issuer, new_issuer);
    assert!(new_issuer.contains("Portcullis Issuing CA 2"), "{new_issuer}");
    for c in [&old, &new] {
        let (ok, out) = verify(w, &ca, &c.cert, &["-purpose", "sslclient"]);
        assert!(ok, "{}: {out}", c.id);
        bound_token(w, &https, c, "acme$billing");
    }
    // The old CA still signs its CRL: revoking the old certificate lands there.
    let r = a
        .post(&format!("/api/v1/organisations/acme/certificates/{}/revoke", old.id), &json!({ "reason": "superseded" }))
        .await;
    r.expect(200);
    assert_handshake_revoked(w, &https, &old, "acme$billing");
    bound_token(w, &https, &new, "acme$billing");
    let old_crl = crl_text(w, &format!("{}/pki/crl/{}", s.url, old.issuer_id), "old.crl").await;
    assert_eq!(crl_entry(&old_crl, &old.serial).as_deref(), Some("Superseded"), "{old_crl}");
    let active_crl = crl_text(w, &format!("{}/pki/crl", s.url), "active.crl").await;
    assert!(active_crl.contains("Portcullis Issuing CA 2"), "{active_crl}");
    assert_eq!(crl_entry(&active_crl, &old.serial), None, "{active_crl}");
    let (_, _, all) = fetch_bytes(&format!("{}/pki/crl.pem", s.url)).await;
    let all = String::from_utf8(all).unwrap();
    assert_eq!(all.matches("-----BEGIN X509 CRL-----").count(), 2, "{all}");
    let old_crl_pem = pem("X509 CRL", &std::fs::read(w.join("old.crl")).unwrap());
    write(&w.join("old-crl.pem"), &old_crl_pem);
    let (ok, out) = verify(w, &ca, &old.cert, &["-crl_check", "-CRLfile", "old-crl.pem"]);
    assert!(!ok && out.contains("certificate revoked"), "{out}");
    s.stop_clean();
    s.assert_no_logged_errors();
}

/// A `server-transport` certificate made from the template is a working TLS server
/// certificate: given to the listener as `cert_file`/`key_file`, curl and openssl accept it for
/// its DNS name (and only for it); client certificates still work on that listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_transport_certificate_serves_tls() {
    let (data, work) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let w = work.path();
    let cfg = tls_config(w, "optional");
    let mut s = start(data.path(), &cfg, &[]);
    let a = Admin::new(&s).await;
    create_acme_payments(&a.c, &a.t).await;
    create_app(&a, "gateway", "tls_client_auth").await;
    a.c.call(
        Method::PATCH,
        "/api/v1/organisations/acme",
        &Cred::Bearer(&a.t),
        Some(&json!({ "allowed_domains": ["acme.example"] })),
    )
    .await
    .expect(200);
    fetch_ca(&s, w).await;
    let tpl = template(&a, "gateway", "server-transport").await;
    assert_eq!(tpl["dns_names_required"], true, "{tpl}");
    let cmd = tpl["openssl_command"].as_str().unwrap();
    assert!(cmd.contains("DNS:api.acme.example"), "the template proposes a name in the allowed domains: {cmd}");
    sh(w, cmd);
    let csr = read(&w.join("acme-gateway-server-transport.csr"));
    let r = issue(&a, "server-transport", "gateway", &csr).await;
    let sc = issued_from(&r, w, "server", &w.join("acme-gateway-server-transport.key"));
    let client = new_cert(&a, w, "transport", "gateway", "client").await;
    write(&w.join("server-chain.pem"), &format!("{}{}", read(&sc.cert), r.str("chain_pem")));
    s.stop_clean();

    let served = tls_config_with(
        w,
        "optional",
        &format!("cert_file = \"{}\"\nkey_file = \"{}\"\n", w.join("server-chain.pem").display(), sc.key.display()),
        "",
    );
    let mut s = restart(&s, &served, &[]);
    let https = https_url(&s);
    let port = https.rsplit(':').next().unwrap().to_owned();
    let by_name = format!("https://api.acme.example:{port}");
    let resolve = format!("api.acme.example:{port}:127.0.0.1");
    let r = curl(w, None, &["--resolve", &resolve, &format!("{by_name}/healthz")]);
    assert_eq!((r.code, r.status, r.body.as_str()), (0, 200, "ok"), "{r:?}");
    let r = curl(w, None, &[&format!("{https}/healthz")]);
    assert!(r.refused(), "the certificate names api.acme.example only, not 127.0.0.1: {r:?}");
    let r = openssl(
        w,
        &[
            "s_client",
            "-connect",
            &format!("127.0.0.1:{port}"),
            "-servername",
            "api.acme.example",
            "-verify_hostname",
            "api.acme.example",
            "-CAfile",
            "ca.pem",
            "-verify_return_error",
            "-brief",
        ],
    );
    let said = format!("{}{}", r.out(), r.stderr);
    assert!(said.contains("Verification: OK"), "openssl s_client: {said}");
    let r = run_in(
        w,
        "curl",
        &[
            "-sS",
            "--noproxy",
            "*",
            "--resolve",
            &resolve,
            "--cacert",
            "ca.pem",
            "--cert",
            client.cert.to_str().unwrap(),
            "--key",
            client.key.to_str().unwrap(),
            "-d",
            "grant_type=client_credentials&client_id=acme$gateway",
            &format!("{by_name}/oauth2/token"),
        ],
    );
    let body: Value = serde_json::from_slice(&r.ok("curl --resolve").stdout).unwrap();
    assert_eq!(jwt_payload(body["access_token"].as_str().unwrap())["cnf"]["x5t#S256"], client.x5t.as_str());
    s.stop_clean();
    s.assert_no_logged_errors();
}

/// In `optional` mode a client may send no certificate, but one it does send must verify:
/// a self-signed certificate fails the handshake (fail closed, as docs/pki.md says), while the
/// same client without a certificate gets through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn optional_mode_refuses_unverifiable_client_certificates() {
    let (data, work) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let w = work.path();
    let cfg = tls_config(w, "optional");
    let mut s = start(data.path(), &cfg, &[]);
    let https = https_url(&s);
    let a = Admin::new(&s).await;
    create_acme_payments(&a.c, &a.t).await;
    create_app(&a, "billing", "tls_client_auth").await;
    fetch_ca(&s, w).await;
    sh(
        w,
        "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout self.key \
         -subj '/CN=acme$billing/O=acme' -addext extendedKeyUsage=clientAuth -days 2 -out self.crt",
    );
    let me = Some((w.join("self.crt"), w.join("self.key")));
    let me = me.as_ref().map(|(c, k)| (c.as_path(), k.as_path()));
    let r = curl(w, me, &[&format!("{https}/healthz")]);
    assert_ne!(r.code, 0, "optional mode: a self-signed client certificate must fail the handshake: {r:?}");
    let r = curl(w, None, &[&format!("{https}/healthz")]);
    assert_eq!((r.code, r.status), (0, 200), "optional mode: no certificate is fine: {r:?}");
    let r = mtls_token(w, &https, None, "acme$billing");
    assert_eq!(r.status, 401, "no certificate, no tls_client_auth: {r:?}");
    s.stop_clean();
}

/// Races, spread over `nodes` (one database): `N` certificates issued at once get distinct
/// serials; revoked at once (one of them twice) exactly one revocation each wins, and every
/// node's CRL ends up listing all of them; one client assertion sent many times at once is
/// accepted exactly once. Uses organisation `acme` (which must exist) and application `racer`.
async fn races(nodes: &[&Server], w: &Path) {
    const N: usize = 12;
    let admins = {
        let mut v = Vec::new();
        for n in nodes {
            v.push(Admin::new(n).await);
        }
        v
    };
    create_app(&admins[0], "racer", "private_key_jwt").await;
    let dir = w.join(format!("races-{}", random_hex(4)));
    std::fs::create_dir(&dir).unwrap();
    sh(
        &dir,
        &format!(
            "for i in $(seq 1 {N}); do openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
             -keyout k$i.key -subj '/CN=acme$racer/O=acme' -out c$i.csr 2>/dev/null || exit 1; done"
        ),
    );
    let signing = new_cert(&admins[0], &dir, "signing", "racer", "signing").await;

    let mut tasks = Vec::new();
    for i in 1..=N {
        let csr = read(&dir.join(format!("c{i}.csr")));
        tasks.push(tokio::spawn(issue(&admins[i % nodes.len()], "transport", "racer", &csr)));
    }
    let mut issued = Vec::new();
    for t in tasks {
        let r = t.await.unwrap();
        r.expect(201);
        issued.push((r.str("id"), r.str("serial")));
    }
    let serials: std::collections::BTreeSet<&str> = issued.iter().map(|(_, s)| s.as_str()).collect();
    assert_eq!(serials.len(), N, "serials must be distinct: {issued:?}");

    let mut tasks = Vec::new();
    for (i, (id, _)) in issued.iter().chain(std::iter::once(&issued[0])).enumerate() {
        let path = format!("/api/v1/organisations/acme/certificates/{id}/revoke");
        tasks.push(tokio::spawn(admins[i % nodes.len()].post(&path, &json!({ "reason": "superseded" }))));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap().status);
    }
    statuses.sort_unstable();
    let mut want = vec![200; N];
    want.push(409);
    assert_eq!(statuses, want, "each certificate is revoked exactly once");
    for n in nodes {
        let url = format!("{}/pki/crl", n.url);
        let mut last = String::new();
        let all_listed = eventually(Duration::from_secs(5), || {
            let r = run_in(
                &dir,
                "sh",
                &["-c", &format!("curl -sS --noproxy '*' '{url}' | openssl crl -inform DER -noout -text")],
            );
            last = r.out();
            issued.iter().all(|(_, serial)| crl_entry(&last, serial).as_deref() == Some("Superseded"))
        });
        assert!(all_listed, "{url} does not list all {N} revocations:\n{last}");
    }

    // One assertion, sent to every node many times at once: accepted once.
    let mut aud: Vec<String> = vec!["--aud".into(), format!("{}/oauth2/token", nodes[0].url)];
    if let Some(n) = nodes.get(1) {
        aud.extend(["--aud-extra".into(), format!("{}/oauth2/token", n.url)]);
    }
    let mut args = vec!["--client-id", "acme$racer", "--key", signing.key.to_str().unwrap(), "--kid", &signing.x5t];
    args.extend(aud.iter().map(String::as_str));
    let jwt = assertion(&args);
    let mut tasks = Vec::new();
    for i in 0..8 {
        let req = http().post(format!("{}/oauth2/token", nodes[i % nodes.len()].url)).form(&[
            ("grant_type", "client_credentials"),
            ("client_assertion_type", JWT_BEARER),
            ("client_assertion", jwt.as_str()),
        ]);
        tasks.push(tokio::spawn(send(req)));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap().status);
    }
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 401, 401, 401, 401, 401, 401, 401], "one assertion, one token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_issue_revoke_and_replay() {
    let (data, work) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut s = Server::start(data.path(), &[], &[]);
    let a = Admin::new(&s).await;
    create_acme_payments(&a.c, &a.t).await;
    races(&[&s], work.path()).await;
    s.stop_clean();
    s.assert_no_logged_errors();
}

/// Organisation admins manage their own organisation's certificates only; they cannot set
/// the allowed domains. Revocations are mailed to the organisation's admins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn org_admins_manage_only_their_own_certificates() {
    let (data, work) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let w = work.path();
    let mut s = Server::start(data.path(), &[], &[]);
    let a = Admin::new(&s).await;
    create_acme_payments(&a.c, &a.t).await;
    create_app(&a, "billing", "tls_client_auth").await;
    a.post("/api/v1/organisations", &json!({ "slug": "evil", "name": "Evil" })).await.expect(201);
    let mut tokens = Vec::new();
    for org in ["acme", "evil"] {
        let r = a
            .post(
                &format!("/api/v1/organisations/{org}/applications"),
                &json!({ "slug": "ops", "name": "Ops", "roles": ["portcullis:org-admin"] }),
            )
            .await;
        r.expect(201);
        tokens.push(support::access_token(&s, &format!("{org}$ops"), &r.str("client_secret")).await);
    }
    let acme = Admin { c: Client::new(&s), t: tokens[0].clone() };
    let evil = Admin { c: Client::new(&s), t: tokens[1].clone() };
    let r = a
        .post(
            "/api/v1/organisations/acme/users",
            &json!({ "email": "ops@acme.test", "name": "Ops", "password": "correct horse battery staple 42", "roles": ["portcullis:org-admin"] }),
        )
        .await;
    r.expect(201);

    // acme's admin: issue, list, revoke in acme.
    let c = new_cert(&acme, w, "transport", "billing", "c").await;
    acme.get("/api/v1/organisations/acme/certificates").await.expect(200);
    template(&acme, "billing", "transport").await;
    let r = acme.c.call(
        Method::PATCH,
        "/api/v1/organisations/acme",
        &Cred::Bearer(&acme.t),
        Some(&json!({ "allowed_domains": ["acme.example"] })),
    );
    assert_eq!(r.await.status, 403, "only platform admins set allowed domains");

    // evil's admin: nothing of acme's.
    let (_, csr) = make_csr(w, "evil", "-newkey ec -pkeyopt ec_paramgen_curve:P-256", "/CN=acme$billing/O=acme", "");
    let base = "/api/v1/organisations/acme/certificates";
    for (what, r) in [
        ("issue", issue(&evil, "transport", "billing", &csr).await),
        ("list", evil.get(base).await),
        ("get", evil.get(&format!("{base}/{}", c.id)).await),
        ("pem", evil.get(&format!("{base}/{}/pem", c.id)).await),
        ("revoke", evil.post(&format!("{base}/{}/revoke", c.id), &json!({ "reason": "key_compromise" })).await),
        ("renew", evil.post(&format!("{base}/{}/renew", c.id), &json!({ "csr": csr })).await),
        ("template", evil.get("/api/v1/organisations/acme/applications/billing/csr-template?type=transport").await),
    ] {
        assert_eq!(r.status, 403, "evil's admin must not {what} acme's certificates: {}", r.text);
    }
    // Nor through its own organisation's paths.
    let r = evil.get(&format!("/api/v1/organisations/evil/certificates/{}", c.id)).await;
    assert_eq!(r.status, 404, "{}", r.text);
    let r = evil.post(&format!("/api/v1/organisations/evil/certificates/{}/revoke", c.id), &json!({})).await;
    assert_eq!(r.status, 404, "{}", r.text);
    let r = issue(&evil, "transport", "acme$billing", &csr).await;
    assert!(matches!(r.status, 403 | 404), "evil naming acme's client id: {}", r.text);
    let r = evil
        .post(
            "/api/v1/organisations/evil/certificates",
            &json!({ "type": "transport", "application": "acme$billing", "csr": csr }),
        )
        .await;
    assert!(matches!(r.status, 400 | 404), "evil issuing for acme$billing under evil: {}", r.text);
    let got = acme.get(&format!("{base}/{}", c.id)).await;
    got.expect(200);
    assert_eq!(got.json["status"], "active", "{}", got.text);

    // acme's admin revokes; the organisation's admins are mailed (the outbox, no SMTP here).
    let r = acme.post(&format!("{base}/{}/revoke", c.id), &json!({ "reason": "privilege_withdrawn" })).await;
    r.expect(200);
    let outbox = data.path().join("outbox");
    let mut found = String::new();
    let mailed = eventually(Duration::from_secs(10), || {
        let Ok(dir) = std::fs::read_dir(&outbox) else { return false };
        for e in dir.flatten() {
            // Quoted-printable: undo the soft line breaks.
            let text = std::fs::read_to_string(e.path()).unwrap_or_default().replace("=\r\n", "").replace("=\n", "");
            if text.contains("ops@acme.test") && text.contains(&c.serial) {
                found = text;
                return true;
            }
        }
        false
    });
    if !mailed {
        let mut seen = String::new();
        for e in std::fs::read_dir(&outbox).into_iter().flatten().flatten() {
            seen.push_str(&format!(
                "--- {}\n{}\n",
                e.path().display(),
                std::fs::read_to_string(e.path()).unwrap_or_default()
            ));
        }
        panic!("no revocation mail to ops@acme.test naming serial {} in {}:\n{seen}", c.serial, outbox.display());
    }
    assert!(found.to_ascii_lowercase().contains("revoked"), "{found}");
    s.stop_clean();
    s.assert_no_logged_errors();
}

/// The core of the CA once on PostgreSQL: issue, token over mTLS, revoke, CRL, refused handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_issue_revoke_crl() {
    let admin_url = std::env::var("PORTCULLIS_TEST_PG_URL").unwrap_or_else(|_| DEFAULT_PG_URL.to_owned());
    let db = PgDb::create(&admin_url, "portcullis_pki_e2e");
    let db_url = db.url();
    let (data, data2, work) =
        (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let w = work.path();
    // Two nodes on one database share the master key; they look for other nodes' CRLs and CA
    // changes every second.
    let hex = random_hex(32);
    let key: Vec<u8> = (0..32).map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap()).collect();
    let master = B64.encode(key);
    let envs = [("PORTCULLIS_MASTER_KEY", master.as_str())];
    let cfg = tls_config_with(w, "optional", "", "[tokens]\nkey_check_interval = 1\n");
    let args = ["--config", cfg.to_str().unwrap(), "--database-url", &db_url];
    let mut s = Server::start(data.path(), &args, &envs);
    assert!(!data.path().join("portcullis.db").exists(), "PostgreSQL mode must not create a SQLite database");
    let mut s2 = Server::start(data2.path(), &args, &envs);
    let (https, https2) = (https_url(&s), https_url(&s2));
    let a = Admin::new(&s).await;
    create_acme_payments(&a.c, &a.t).await;
    create_app(&a, "billing", "tls_client_auth").await;
    let (ca, _) = fetch_ca(&s, w).await;
    let c = new_cert(&a, w, "transport", "billing", "pg").await;
    let keep = new_cert(&a, w, "transport", "billing", "keep").await;
    let (ok, out) = verify(w, &ca, &c.cert, &["-purpose", "sslclient"]);
    assert!(ok, "{out}");
    bound_token(w, &https, &c, "acme$billing");
    bound_token(w, &https2, &c, "acme$billing");

    // Revoked on node 1 (numeric reason code 1 = keyCompromise): refused there at once, on
    // node 2 after its next tick; both CRLs list it.
    let r =
        a.post(&format!("/api/v1/organisations/acme/certificates/{}/revoke", c.id), &json!({ "reason": "1" })).await;
    r.expect(200);
    assert_eq!(r.json["revocation_reason"], "key_compromise", "{}", r.text);
    assert_handshake_revoked(w, &https, &c, "acme$billing");
    assert_handshake_revoked(w, &https2, &c, "acme$billing");
    for node in [&s, &s2] {
        let crl = crl_text(w, &format!("{}/pki/crl", node.url), "crl.der").await;
        assert_eq!(crl_entry(&crl, &c.serial).as_deref(), Some("Key Compromise"), "{}: {crl}", node.url);
    }
    bound_token(w, &https2, &keep, "acme$billing");

    // `ca rotate` while both nodes run: both pick the new issuing CA up.
    let (st, out, err) =
        run_cli(&["ca", "rotate", "--data-dir", data.path().to_str().unwrap(), "--database-url", &db_url], &envs);
    assert!(st.success(), "ca rotate: {out}{err}");
    for node in [&s, &s2] {
        let picked = eventually(Duration::from_secs(5), || {
            let out = run_in(w, "curl", &["-sS", "--noproxy", "*", &format!("{}/pki/ca.pem", node.url)]).out();
            split_pem(&out).len() == 3
        });
        assert!(picked, "{} did not pick up the rotated CA", node.url);
    }
    let a2 = Admin::new(&s2).await;
    let fresh = new_cert(&a2, w, "transport", "billing", "fresh").await;
    assert_ne!(fresh.issuer_id, keep.issuer_id, "node 2 issues from the new CA");
    let (ca, _) = fetch_ca(&s2, w).await;
    for cert in [&keep, &fresh] {
        let (ok, out) = verify(w, &ca, &cert.cert, &["-purpose", "sslclient"]);
        assert!(ok, "{out}");
        for h in [&https, &https2] {
            bound_token(w, h, cert, "acme$billing");
        }
    }
    races(&[&s, &s2], w).await;
    s2.stop_clean();
    s.stop_clean();
    s.assert_no_logged_errors();
    s2.assert_no_logged_errors();
    drop((s, s2));
    drop(db);
}
