//! End to end: `portcullis cert request|list|revoke|renew` against a real `portcullis serve`
//! on a free port, checked with the `openssl` command line (OpenSSL 3: the PKCS#12 file must
//! read without `-legacy`). The process harness is in `support/`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

#[allow(dead_code)]
mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::{Value, json};

use support::{Client, Cred, Server, admin_token, create_acme_payments, portcullis_command, run_to_end};

// ------------------------------------------------------------------------------ helpers --

struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl Run {
    #[track_caller]
    fn json(&self) -> Value {
        assert!(self.ok, "the command failed; stderr:\n{}", self.stderr);
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{}", self.stdout))
    }
    #[track_caller]
    fn refused(&self, needle: &str) {
        assert!(!self.ok, "expected a failure; stdout:\n{}", self.stdout);
        assert!(self.stderr.contains(needle), "stderr does not say {needle:?}:\n{}", self.stderr);
    }
}

/// Runs `portcullis cert ARGS` with the server URL and token in the environment (as a user
/// would), no proxy, no terminal.
fn cert(url: &str, token: &str, args: &[&str]) -> Run {
    cert_env(&[("PORTCULLIS_URL", url), ("PORTCULLIS_TOKEN", token)], args)
}

fn cert_env(envs: &[(&str, &str)], args: &[&str]) -> Run {
    let mut env: Vec<(&str, &str)> = vec![("NO_PROXY", "*"), ("no_proxy", "*")];
    env.extend_from_slice(envs);
    let mut cmd = portcullis_command(&env, false);
    cmd.arg("cert").args(args);
    let (status, stdout, stderr) = run_to_end(cmd, &format!("portcullis cert {args:?}"));
    for (k, v) in envs {
        if k.contains("TOKEN") || k.contains("SECRET") {
            assert!(!stdout.contains(v) && !stderr.contains(v), "{k} was printed");
        }
    }
    Run { ok: status.success(), stdout, stderr }
}

/// Runs `openssl ARGS` with `stdin`.
fn openssl(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new("openssl")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run openssl ({e}); the end-to-end tests need the openssl command"));
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

#[track_caller]
fn openssl_ok(args: &[&str], stdin: &[u8]) -> Vec<u8> {
    let out = openssl(args, stdin);
    assert!(
        out.status.success(),
        "openssl {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// DER of the first certificate in PEM `pem`.
fn cert_der(pem: &[u8]) -> Vec<u8> {
    openssl_ok(&["x509", "-outform", "DER"], pem)
}

fn public_key(private_pem: &[u8]) -> Vec<u8> {
    openssl_ok(&["pkey", "-pubout"], private_pem)
}

#[cfg(unix)]
fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The server, an admin token, organisation `acme` with application `billing`, and the
/// server's trust chain saved as `ca.pem` in `dir`.
async fn setup(dir: &Path, extra_args: &[&str]) -> (Server, String, PathBuf) {
    let server = Server::start(&dir.join("data"), extra_args, &[]);
    let token = admin_token(&server).await;
    let c = Client::new(&server);
    create_acme_payments(&c, &token).await;
    c.post(
        "/api/v1/organisations/acme/applications",
        &Cred::Bearer(&token),
        &json!({ "slug": "billing", "name": "Billing", "scopes": ["payments/read"], "roles": ["payments:reader"] }),
    )
    .await
    .expect(201);
    let ca = c.get("/pki/ca.pem", &Cred::None).await;
    ca.expect(200);
    let ca_path = dir.join("ca.pem");
    std::fs::write(&ca_path, &ca.text).unwrap();
    (server, token, ca_path)
}

// -------------------------------------------------------------------------------- tests --

#[tokio::test(flavor = "multi_thread")]
async fn request_list_revoke_renew() {
    let tmp = tempfile::tempdir().unwrap();
    let (server, token, ca) = setup(tmp.path(), &[]).await;
    let url = server.url.as_str();
    let pw = tmp.path().join("pw.txt");
    std::fs::write(&pw, "correct horse battery staple\nnot the password\n").unwrap();
    let out = tmp.path().join("out");

    // request: a transport certificate with a PKCS#12 file.
    let r = cert(
        url,
        &token,
        &[
            "request",
            "--type",
            "transport",
            "--org",
            "acme",
            "--app",
            "billing",
            "--out",
            s(&out),
            "--pkcs12",
            "--pkcs12-password-file",
            s(&pw),
        ],
    );
    let v = r.json();
    let id = v["id"].as_str().unwrap().to_owned();
    let serial = v["serial"].as_str().unwrap().to_owned();
    assert_eq!(v["type"], "transport");
    assert_eq!(v["application"], "acme$billing");
    assert!(v["not_after"].as_str().is_some(), "{v}");
    let key = out.join("acme-billing-transport.key");
    let crt = out.join("acme-billing-transport.crt");
    let chain = out.join("acme-billing-transport.chain.pem");
    let p12 = out.join("acme-billing-transport.p12");
    assert_eq!(v["files"], json!({ "key": s(&key), "certificate": s(&crt), "chain": s(&chain), "pkcs12": s(&p12) }));
    #[cfg(unix)]
    {
        assert_eq!(mode(&key), 0o600, "the private key must be owner-only");
        assert_eq!(mode(&p12), 0o600, "the PKCS#12 file must be owner-only");
    }
    let key_pem = std::fs::read(&key).unwrap();
    assert!(key_pem.starts_with(b"-----BEGIN PRIVATE KEY-----\n"), "PKCS#8 PEM expected");
    let crt_pem = std::fs::read(&crt).unwrap();
    // The certificate chains to the CA, is a client certificate, has the template's subject
    // and certifies the key made here.
    let verified = openssl_ok(&["verify", "-CAfile", s(&ca), "-purpose", "sslclient", s(&crt)], b"");
    assert!(String::from_utf8_lossy(&verified).contains(": OK"), "{}", String::from_utf8_lossy(&verified));
    openssl_ok(&["verify", "-CAfile", s(&chain), s(&crt)], b"");
    let subject =
        String::from_utf8(openssl_ok(&["x509", "-noout", "-subject", "-nameopt", "RFC2253"], &crt_pem)).unwrap();
    let mut rdns: Vec<&str> = subject.trim().trim_start_matches("subject=").split(',').collect();
    rdns.sort_unstable();
    assert_eq!(rdns, ["CN=acme$billing", "O=acme"], "{subject}");
    assert_eq!(openssl_ok(&["x509", "-noout", "-pubkey"], &crt_pem), public_key(&key_pem));

    // The PKCS#12 file: OpenSSL 3 reads it without -legacy; PBES2/AES-256-CBC, MAC SHA-256;
    // it holds the same certificate and key, and the chain.
    let passin = format!("file:{}", s(&pw));
    let info = openssl(&["pkcs12", "-info", "-in", s(&p12), "-passin", &passin, "-noout"], b"");
    let info_text = String::from_utf8_lossy(&info.stderr);
    assert!(info.status.success(), "openssl pkcs12 -info failed:\n{info_text}");
    assert!(info_text.contains("MAC: sha256"), "{info_text}");
    assert!(info_text.contains("AES-256-CBC"), "{info_text}");
    assert!(
        !info_text.contains("RC2") && !info_text.contains("3DES") && !info_text.contains("TripleDES"),
        "{info_text}"
    );
    let p12_cert = openssl_ok(&["pkcs12", "-in", s(&p12), "-passin", &passin, "-clcerts", "-nokeys"], b"");
    assert_eq!(cert_der(&p12_cert), cert_der(&crt_pem), "the PKCS#12 certificate is the .crt");
    let p12_key = openssl_ok(&["pkcs12", "-in", s(&p12), "-passin", &passin, "-nocerts", "-nodes"], b"");
    assert_eq!(public_key(&p12_key), public_key(&key_pem), "the PKCS#12 key is the .key");
    let p12_cas = openssl_ok(&["pkcs12", "-in", s(&p12), "-passin", &passin, "-cacerts", "-nokeys"], b"");
    assert_eq!(String::from_utf8_lossy(&p12_cas).matches("BEGIN CERTIFICATE").count(), 2, "issuing CA and root");
    let wrong = openssl(&["pkcs12", "-info", "-in", s(&p12), "-passin", "pass:wrong", "-noout"], b"");
    assert!(!wrong.status.success(), "a wrong password must not open the PKCS#12 file");

    // Existing files are never overwritten, and nothing is uploaded then.
    let again =
        cert(url, &token, &["request", "--type", "transport", "--org", "acme", "--app", "billing", "--out", s(&out)]);
    again.refused("exists: refusing to overwrite");
    assert_eq!(std::fs::read(&key).unwrap(), key_pem);
    assert_eq!(std::fs::read(&crt).unwrap(), crt_pem);

    // list: JSON and table, with filters.
    let list = cert(url, &token, &["list", "--org", "acme", "--app", "billing"]).json();
    let items = list.as_array().unwrap();
    assert_eq!(items.len(), 1, "the refused request uploaded nothing: {list}");
    assert_eq!(items[0]["id"], id.as_str());
    assert_eq!(items[0]["status"], "active");
    let t = cert(url, &token, &["list", "--org", "acme", "--type", "transport", "--table"]);
    assert!(t.ok, "{}", t.stderr);
    assert!(t.stdout.starts_with("ID "), "{}", t.stdout);
    assert!(t.stdout.lines().any(|l| l.contains(&id) && l.contains("active") && l.contains(&serial)), "{}", t.stdout);
    let none = cert(url, &token, &["list", "--org", "acme", "--status", "revoked"]).json();
    assert_eq!(none, json!([]));
    let soon = cert(url, &token, &["list", "--org", "acme", "--expiring-within-days", "3650"]).json();
    assert_eq!(soon.as_array().unwrap().len(), 1);

    // revoke
    let rv = cert(url, &token, &["revoke", "--org", "acme", "--id", &id, "--reason", "key_compromise"]).json();
    assert_eq!(rv["status"], "revoked");
    assert_eq!(rv["revocation_reason"], "key_compromise");
    let revoked = cert(url, &token, &["list", "--org", "acme", "--status", "revoked"]).json();
    assert_eq!(revoked.as_array().unwrap().len(), 1);
    assert_eq!(revoked[0]["id"], id.as_str());
    cert(url, &token, &["revoke", "--org", "acme", "--id", &id]).refused("409 certificate");
    cert(url, &token, &["renew", "--org", "acme", "--id", &id, "--out", s(&tmp.path().join("r0"))])
        .refused("is revoked");

    // A signing certificate with an Ed25519 key, renewed with a new RSA 3072 key.
    let out2 = tmp.path().join("out2");
    let sg = cert(
        url,
        &token,
        &[
            "request",
            "--type",
            "signing",
            "--org",
            "acme",
            "--app",
            "acme$billing",
            "--out",
            s(&out2),
            "--key-type",
            "ed25519",
        ],
    )
    .json();
    assert_eq!(sg["key_type"], "Ed25519");
    assert!(sg["files"].get("pkcs12").is_none());
    let sg_id = sg["id"].as_str().unwrap();
    let out3 = tmp.path().join("out3");
    let rn = cert(url, &token, &["renew", "--org", "acme", "--id", sg_id, "--out", s(&out3), "--key-type", "rsa3072"])
        .json();
    assert_ne!(rn["serial"], sg["serial"], "a renewal is a new certificate");
    assert_ne!(rn["id"], sg["id"]);
    assert_eq!(rn["renewed_from"], sg_id);
    assert_eq!(rn["type"], "signing");
    assert_eq!(rn["key_type"], "RSA 3072");
    let rn_key = std::fs::read(out3.join("acme-billing-signing.key")).unwrap();
    let rn_crt = std::fs::read(out3.join("acme-billing-signing.crt")).unwrap();
    assert_ne!(rn_key, std::fs::read(out2.join("acme-billing-signing.key")).unwrap(), "a new key by default");
    assert_eq!(openssl_ok(&["x509", "-noout", "-pubkey"], &rn_crt), public_key(&rn_key));
    openssl_ok(&["verify", "-CAfile", s(&ca), s(&out3.join("acme-billing-signing.crt"))], b"");
    // Renewing with the existing key (--key) writes no key file.
    let out4 = tmp.path().join("out4");
    let k = out3.join("acme-billing-signing.key");
    let rk = cert(
        url,
        &token,
        &["renew", "--org", "acme", "--id", rn["id"].as_str().unwrap(), "--out", s(&out4), "--key", s(&k)],
    )
    .json();
    assert_eq!(rk["files"]["key"], s(&k));
    assert!(!out4.join("acme-billing-signing.key").exists());
    assert_eq!(
        openssl_ok(&["x509", "-noout", "-pubkey"], &std::fs::read(out4.join("acme-billing-signing.crt")).unwrap()),
        public_key(&rn_key)
    );

    // Refusals: the server's x-error (and its id) on stderr, a non-zero exit, nothing left.
    let c = Client::new(&server);
    let expected = c
        .get("/api/v1/organisations/acme/applications/nope/csr-template?type=transport&key=p256", &Cred::Bearer(&token))
        .await;
    expected.expect(404);
    let out5 = tmp.path().join("out5");
    let nope =
        cert(url, &token, &["request", "--type", "transport", "--org", "acme", "--app", "nope", "--out", s(&out5)]);
    nope.refused(expected.x_error());
    nope.refused("x-error-id ");
    assert!(!out5.join("acme-nope-transport.key").exists());
    cert(url, "not-a-token", &["list", "--org", "acme"]).refused("401");
    cert_env(&[("PORTCULLIS_URL", url)], &["list", "--org", "acme"]).refused("no credentials");
    // A server-transport certificate needs DNS names; --dns is only for it.
    cert(
        url,
        &token,
        &["request", "--type", "server-transport", "--org", "acme", "--app", "billing", "--out", s(&out5)],
    )
    .refused("needs --dns");
    cert(
        url,
        &token,
        &[
            "request",
            "--type",
            "transport",
            "--org",
            "acme",
            "--app",
            "billing",
            "--out",
            s(&out5),
            "--dns",
            "a.acme.test",
        ],
    )
    .refused("only for server-transport");
    // No terminal to ask the PKCS#12 password on.
    cert(
        url,
        &token,
        &["request", "--type", "transport", "--org", "acme", "--app", "billing", "--out", s(&out5), "--pkcs12"],
    )
    .refused("--pkcs12-password-file");
    assert!(!out5.exists() || std::fs::read_dir(&out5).unwrap().next().is_none(), "refusals leave no files");
    // The server refused the upload: the key made for it is removed.
    let bad_days = cert(
        url,
        &token,
        &[
            "request",
            "--type",
            "transport",
            "--org",
            "acme",
            "--app",
            "billing",
            "--out",
            s(&out5),
            "--validity-days",
            "100000",
        ],
    );
    bad_days.refused("validity_days");
    assert!(!out5.join("acme-billing-transport.key").exists(), "a key nothing certifies is removed");
    server.assert_no_logged_errors();
}

/// Over the TLS listener with `--cacert`; a server-transport certificate with DNS names.
#[tokio::test(flavor = "multi_thread")]
async fn https_with_cacert_and_server_transport() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("portcullis.toml");
    std::fs::write(&config, "[tls]\nlisten = \"127.0.0.1:0\"\nclient_certificates = \"off\"\n").unwrap();
    let (server, token, ca) = setup(tmp.path(), &["--config", s(&config)]).await;
    let log = server.stderr();
    let at = log.find("listening on https://").expect("the TLS listener's address is logged") + "listening on ".len();
    let https: String = log[at..].chars().take_while(|c| c.is_ascii_alphanumeric() || ".:/".contains(*c)).collect();
    let c = Client::new(&server);
    c.call(
        reqwest::Method::PATCH,
        "/api/v1/organisations/acme",
        &Cred::Bearer(&token),
        Some(&json!({ "allowed_domains": ["acme.test"] })),
    )
    .await
    .expect(200);

    let out = tmp.path().join("tls");
    let args = [
        "request",
        "--type",
        "server-transport",
        "--org",
        "acme",
        "--app",
        "billing",
        "--out",
        s(&out),
        "--dns",
        "api.acme.test",
        "--dns",
        "www.acme.test",
        "--key-type",
        "p384",
    ];
    // Our CA is no system root: without --cacert the TLS handshake fails.
    let untrusted = cert(&https, &token, &args);
    untrusted.refused("cannot reach");
    let mut with_ca: Vec<&str> = args.to_vec();
    with_ca.extend(["--cacert", s(&ca)]);
    let v = cert(&https, &token, &with_ca).json();
    assert_eq!(v["key_type"], "EC P-384");
    let crt = out.join("acme-billing-server-transport.crt");
    openssl_ok(
        &["verify", "-CAfile", s(&ca), "-purpose", "sslserver", "-verify_hostname", "www.acme.test", s(&crt)],
        b"",
    );
    let list =
        cert(&https, &token, &["list", "--org", "acme", "--cacert", s(&ca), "--type", "server-transport"]).json();
    assert_eq!(list.as_array().unwrap().len(), 1);
    // --cacert belongs to https.
    cert(&server.url, &token, &["list", "--org", "acme", "--cacert", s(&ca)]).refused("--cacert is for an https");
    server.assert_no_logged_errors();
}

/// The `n`th (from 1) verification code the server logged for `email` (no SMTP configured:
/// codes are logged).
fn logged_code(server: &Server, email: &str, n: usize) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let log = server.stderr();
        let codes: Vec<String> = log
            .lines()
            .filter(|l| l.contains("no SMTP configured") && l.contains(email))
            .filter_map(|l| {
                let at = l.find("code=")? + "code=".len();
                Some(l[at..].trim_start_matches('"').chars().take_while(char::is_ascii_digit).collect())
            })
            .collect();
        if let Some(c) = codes.get(n - 1) {
            return c.clone();
        }
        assert!(std::time::Instant::now() < deadline, "no code #{n} for {email} logged:\n{log}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// An organisation admin's session token (bearer `pcs_…`) and API key + secret (headers
/// `api-key`, `api-secret`) work like an access token.
#[tokio::test(flavor = "multi_thread")]
async fn session_token_and_api_key() {
    let tmp = tempfile::tempdir().unwrap();
    let (server, admin, _) = setup(tmp.path(), &[]).await;
    let c = Client::new(&server);
    let email = "ops@acme.test";
    let password = format!("ops-pw-{}", support::random_hex(12));
    c.post(
        "/api/v1/organisations/acme/users",
        &Cred::Bearer(&admin),
        &json!({ "email": email, "name": "ops", "password": password, "roles": ["portcullis:org-admin"] }),
    )
    .await
    .expect(201);
    let login = c.post("/api/v1/sessions", &Cred::None, &json!({ "email": email, "password": password })).await;
    login.expect(202);
    let code = logged_code(&server, email, 1);
    let verify = json!({ "verification_id": login.str("verification_id"), "code": code });
    c.post("/api/v1/sessions/verify", &Cred::None, &verify).await.expect(200);
    let session = login.str("session_token");

    let url = server.url.as_str();
    let out = tmp.path().join("s");
    let args = ["request", "--type", "transport", "--org", "acme", "--app", "billing", "--out", s(&out)];
    let v = cert(url, &session, &args).json();
    let id = v["id"].as_str().unwrap().to_owned();

    let key = c.post("/api/v1/api-keys", &Cred::Bearer(&session), &json!({ "name": "certs" })).await;
    key.expect(202);
    let (api_key, api_secret) = (key.str("api_key"), key.str("api_secret"));
    let code = logged_code(&server, email, 2);
    let verify = json!({ "verification_id": key.str("verification_id"), "code": code });
    c.post("/api/v1/api-keys/verify", &Cred::None, &verify).await.expect(200);
    let secret_file = tmp.path().join("api-secret");
    std::fs::write(&secret_file, format!("{api_secret}\n")).unwrap();
    let with_key = |args: &[&str]| {
        cert_env(
            &[("PORTCULLIS_URL", url), ("PORTCULLIS_API_KEY", &api_key), ("PORTCULLIS_API_SECRET", &api_secret)],
            args,
        )
    };
    let list = with_key(&["list", "--org", "acme"]).json();
    assert_eq!(list[0]["id"], id.as_str());
    let rv = with_key(&["revoke", "--org", "acme", "--id", &id]).json();
    assert_eq!(rv["status"], "revoked");
    assert_eq!(rv["revocation_reason"], "unspecified");
    // The secret from a file; a wrong secret is refused by the server.
    let from_file = cert_env(
        &[("PORTCULLIS_URL", url), ("PORTCULLIS_API_KEY", &api_key), ("PORTCULLIS_API_SECRET_FILE", s(&secret_file))],
        &["list", "--org", "acme", "--status", "revoked"],
    )
    .json();
    assert_eq!(from_file.as_array().unwrap().len(), 1);
    let wrong = format!("{api_secret}x");
    cert_env(
        &[("PORTCULLIS_URL", url), ("PORTCULLIS_API_KEY", &api_key), ("PORTCULLIS_API_SECRET", &wrong)],
        &["list", "--org", "acme"],
    )
    .refused("401");
    // One credential at a time.
    cert_env(
        &[("PORTCULLIS_URL", url), ("PORTCULLIS_TOKEN", &session), ("PORTCULLIS_API_KEY", &api_key)],
        &["list", "--org", "acme"],
    )
    .refused("one credential");
    server.assert_no_logged_errors();
}
