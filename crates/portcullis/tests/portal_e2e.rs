#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
//! The admin portal end to end in a real browser (docs/portal.md): the real `portcullis serve`
//! binary, its mail delivered to a real SMTP server (`tests/e2e/smtp_sink.py`), and Debian's
//! headless Chromium driven by npm `playwright-core` from `tests/portal/portal.mjs`. The browser
//! signs in with the mailed code, creates an application, runs the New Certificate wizard with a
//! CSR made by `openssl` from the command the page shows, downloads the certificate and its chain
//! and revokes it; it invites a user, defines a service, grants its permission to its role,
//! gives the user the role and sees them among its holders; it creates, activates (with the
//! mailed code) and revokes an API key. Then, outside the browser: `curl` gets a token with the secret the page
//! showed, and `openssl verify` checks the downloaded certificate against the downloaded chain,
//! and against the CRL once revoked.
//!
//! Needs Node.js with `playwright-core` in `tests/portal/node_modules` and `/usr/bin/chromium`
//! (scripts/test.sh installs both), Python 3 with aiosmtpd, curl and openssl.
//!
//! Screenshots of the main pages go to a temporary directory, or to
//! `$PORTCULLIS_SCREENSHOTS_DIR` when set (the README's come from
//! `PORTCULLIS_SCREENSHOTS_DIR=$PWD/docs/screenshots`).

#[allow(dead_code)]
mod support;

use std::process::{Command, Stdio};

use base64::Engine;
use serde_json::{Value, json};

use support::{Client, Cred, Server, Sink, admin_token, create_acme_payments};

const DRIVER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/portal/portal.mjs");
const ADMIN_EMAIL: &str = "admin@acme.test";
const ADMIN_PW: &str = "portal-admin-password-0123";

fn run(cmd: &str, args: &[&str]) -> (bool, String) {
    let out =
        Command::new(cmd).args(args).stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// Every document the browser loaded: never a 5xx; a refusal carries `x-error` and
/// `x-error-id`; an HTML page carries the strict CSP with `frame-ancestors 'none'`.
fn check_documents(v: &Value) {
    let docs = v["documents"].as_array().unwrap();
    assert!(docs.len() > 10, "the browser loaded pages: {docs:?}");
    for d in docs {
        let what = format!("{} {} → {}", d["method"], d["url"], d["status"]);
        let status = d["status"].as_u64().unwrap();
        assert!(status < 500, "{what}");
        if status >= 400 {
            assert!(d["x_error"].is_string() && d["x_error_id"].is_string(), "{what}: no x-error/x-error-id");
        }
        if d["content_type"].as_str().is_some_and(|c| c.starts_with("text/html")) {
            let csp = d["csp"].as_str().unwrap_or_else(|| panic!("{what}: no CSP"));
            for must in ["default-src 'none'", "script-src 'self'", "style-src 'self'", "frame-ancestors 'none'"] {
                assert!(csp.contains(must), "{what}: CSP {csp:?} lacks {must:?}");
            }
            assert!(!csp.contains("unsafe-inline"), "{what}");
            assert_eq!(d["x_frame_options"], "DENY", "{what}");
            assert!(d["cache_control"].as_str().is_some_and(|c| c.contains("no-store")), "{what}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_portal_in_a_real_browser() {
    let sink = Sink::start(0);
    let data = tempfile::tempdir().unwrap();
    let envs: Vec<(&str, String)> = sink.envs();
    let envs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let s = Server::start(data.path(), &[], &envs);
    let c = Client::new(&s);
    let admin = admin_token(&s).await;
    create_acme_payments(&c, &admin).await;
    c.post(
        "/api/v1/organisations/acme/users",
        &Cred::Bearer(&admin),
        &json!({ "email": ADMIN_EMAIL, "name": "Acme Admin", "password": ADMIN_PW, "roles": ["portcullis:org-admin"] }),
    )
    .await
    .expect(201);

    let work = tempfile::tempdir().unwrap();
    let shots_tmp = tempfile::tempdir().unwrap();
    let shots = std::env::var("PORTCULLIS_SCREENSHOTS_DIR").unwrap_or_else(|_| shots_tmp.path().display().to_string());
    let arg = json!({
        "base": s.url,
        "org": "acme",
        "email": ADMIN_EMAIL,
        "password": ADMIN_PW,
        "invitee": "invited@acme.test",
        "sink_dir": sink.dir.path().display().to_string(),
        "work": work.path().display().to_string(),
        "shots": shots,
    });
    let out = tokio::process::Command::new("node")
        .arg(DRIVER)
        .arg(arg.to_string())
        .env("NO_PROXY", "*")
        .env("no_proxy", "*")
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run node ({e}); scripts/test.sh installs Node.js and playwright-core"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let v: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!("portal.mjs printed no JSON ({e}); is playwright-core installed (npm ci in tests/portal)?\nstdout: {stdout}\nstderr: {stderr}")
    });
    assert_eq!(v["ok"], true, "the browser run failed: {}\nsteps: {}\nserver: {}", v["error"], v["steps"], s.stderr());
    assert_eq!(v["problems"], json!([]), "console errors, page errors or CSP violations");
    check_documents(&v);

    // The live client-id check and the type presets ran in the page.
    assert!(v["invalid_slug_message"].as_str().unwrap().contains("invalid slug"), "{}", v["invalid_slug_message"]);
    assert_eq!(v["valid_slug_message"], "acme$billing is available");
    assert_eq!(v["client_id_preview"], "acme$billing");
    assert_eq!((v["spa_method"].as_str(), v["machine_method"].as_str()), (Some("none"), Some("client_secret_basic")));

    // The secret the page showed once gets a token, with the command the page showed.
    let (client_id, secret) = (v["client_id"].as_str().unwrap(), v["client_secret"].as_str().unwrap());
    assert_eq!(client_id, "acme$billing");
    assert_eq!(v["clipboard"], secret, "the copy button copies the secret");
    assert_eq!(v["detail_has_secret"], false, "the secret is never shown again");
    assert_eq!(v["jwks_link"], "/applications/acme$billing/jwks.json");
    let curl = v["curl"].as_str().unwrap();
    assert_eq!(
        curl,
        format!("curl -s -u 'acme$billing:{secret}' -d grant_type=client_credentials {}/oauth2/token", s.url)
    );
    let (ok, body) = run("bash", &["-c", curl]);
    assert!(ok, "{body}");
    let token: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    // The application page's command, with the secret in $CLIENT_SECRET, works as well.
    let out = Command::new("bash")
        .args(["-c", v["detail_curl"].as_str().unwrap()])
        .env("CLIENT_SECRET", secret)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let again: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {:?}", out));
    assert!(again["access_token"].is_string(), "{again}");
    let jwt = token["access_token"].as_str().unwrap();
    let claims: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(jwt.split('.').nth(1).unwrap()).unwrap(),
    )
    .unwrap();
    assert_eq!(claims["client_id"], "acme$billing");
    assert_eq!(claims["roles"], json!(["payments:reader"]));
    assert_eq!(claims["scope"], "payments/read");

    // The wizard's command made the CSR; the downloads verify against the chain.
    let command = v["openssl_command"].as_str().unwrap();
    assert!(command.contains("-subj '/CN=acme$billing/O=acme'"), "{command}");
    assert!(
        v["certificate_name"].as_str().unwrap().starts_with("acme-billing-transport-"),
        "{}",
        v["certificate_name"]
    );
    let (cert, chain) = (v["certificate_file"].as_str().unwrap(), v["chain_file"].as_str().unwrap());
    let (ok, text) = run("openssl", &["verify", "-CAfile", chain, cert]);
    assert!(ok, "openssl verify: {text}");
    let (ok, text) = run("openssl", &["x509", "-in", cert, "-noout", "-serial", "-subject"]);
    assert!(ok, "{text}");
    let serial = v["serial"].as_str().unwrap().replace(':', "").to_ascii_uppercase();
    assert!(text.to_ascii_uppercase().contains(&serial.trim_start_matches('0').to_owned()), "{text} vs {serial}");
    // The key stayed in the work directory, never uploaded: the certificate holds its public key.
    let key = std::fs::read_dir(work.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "key"))
        .expect("openssl wrote a key");
    let (_, cert_pub) = run("openssl", &["x509", "-in", cert, "-noout", "-pubkey"]);
    let (_, key_pub) = run("openssl", &["pkey", "-in", key.to_str().unwrap(), "-pubout"]);
    assert_eq!(cert_pub, key_pub, "the certificate is for the key openssl made");

    // Revoked in the browser: in the CRL, so verification with the CRL fails.
    assert_eq!(v["revoked_badge"], "revoked");
    assert_eq!(v["revoked_listed"], true);
    let crl = reqwest::get(format!("{}/pki/crl.pem", s.url)).await.unwrap().text().await.unwrap();
    let crl_file = work.path().join("crl.pem");
    std::fs::write(&crl_file, crl).unwrap();
    let (ok, text) =
        run("openssl", &["verify", "-crl_check", "-CRLfile", crl_file.to_str().unwrap(), "-CAfile", chain, cert]);
    assert!(!ok && text.contains("certificate revoked"), "{text}");

    // Everything the browser did is in the audit log under the admin's name.
    let me = c.get("/api/v1/organisations/acme/users?q=admin%40acme.test", &Cred::Bearer(&admin)).await;
    let admin_id = me.json["items"][0]["id"].as_str().unwrap().to_owned();
    let audit =
        c.get(&format!("/api/v1/organisations/acme/audit-events?actor={admin_id}"), &Cred::Bearer(&admin)).await;
    let actions: Vec<&str> =
        audit.json["items"].as_array().unwrap().iter().map(|e| e["action"].as_str().unwrap()).collect();
    for a in ["application.create", "certificate.issue", "certificate.revoke"] {
        assert!(actions.contains(&a), "{a} in {actions:?}");
    }

    // The invited person got a link; the API key worked only between activation and revocation.
    assert_eq!(v["invited_badge"], "invited");
    let invitation = sink.next_mail("invited@acme.test", "", std::time::Duration::from_secs(15)).await;
    assert!(invitation.part("text/plain").contains("/invite?token="), "{}", invitation.part("text/plain"));
    assert_eq!(
        (v["key_state_after_activation"].as_str(), v["key_state_after_revocation"].as_str()),
        (Some("active"), Some("revoked"))
    );
    let r = reqwest::Client::new()
        .get(format!("{}/api/v1/organisations/acme", s.url))
        .header("api-key", v["api_key"].as_str().unwrap())
        .header("api-secret", v["api_secret"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "a revoked key is refused");
    assert!(v["audit_rows"].as_u64().unwrap() >= 2, "the issue and the revocation: {}", v["audit_rows"]);

    // The service defined in the browser: the permission granted to its role reaches the
    // invited person who holds it, as the authorization API answers.
    assert!(v["role_users"].as_str().unwrap().contains("invited@acme.test"), "{}", v["role_users"]);
    assert_eq!(v["role_granted"], true);
    assert!(v["permission_roles"].as_str().unwrap().contains("ledger:clerk"), "{}", v["permission_roles"]);
    let invitee = c.get("/api/v1/organisations/acme/users?q=invited%40acme.test", &Cred::Bearer(&admin)).await;
    let invitee_id = invitee.json["items"][0]["id"].as_str().unwrap().to_owned();
    let check =
        |permission: &'static str| json!({ "subject": invitee_id, "permission": permission, "organisation": "acme" });
    let r = c.post("/api/v1/authz/check", &Cred::Bearer(&admin), &check("ledger.entry.read")).await;
    assert_eq!(r.expect(200).json["allowed"], true, "{}", r.json);
    let r = c.post("/api/v1/authz/check", &Cred::Bearer(&admin), &check("ledger.entry.write")).await;
    assert_eq!(r.expect(200).json["allowed"], false, "only the granted permission: {}", r.json);
    for a in ["service.create", "role.set_permissions", "user.role.grant"] {
        assert!(actions.contains(&a), "{a} in {actions:?}");
    }
    // The audit log names the admin by email.
    assert!(
        v["audit_actor_emails"].as_array().unwrap().iter().any(|e| e == ADMIN_EMAIL),
        "{}",
        v["audit_actor_emails"]
    );

    assert!(v["screenshots"].as_array().unwrap().len() >= 10, "{}", v["screenshots"]);
    s.assert_no_logged_errors();
}
