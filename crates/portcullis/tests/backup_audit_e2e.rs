//! Backup, restore and the audit chain end to end, on SQLite and on PostgreSQL: the real
//! `portcullis` binary serves, takes writes, issues tokens and certificates (keys and CSRs by
//! the `openssl` CLI) and revokes some; `portcullis backup` runs while it serves under write
//! load; the backup is restored into a fresh database and served again with the same master
//! key. The old tokens and certificates must still validate (`openssl verify` against the
//! restored `/pki/ca.pem`), revocations must hold, and every write acknowledged before the
//! backup started must be there. `portcullis audit verify` passes on both, and names the row
//! once one is edited over SQL (after dropping the append-only trigger, as an attacker with
//! database rights could). Needs `openssl`, and for PostgreSQL a server
//! (`PORTCULLIS_TEST_PG_URL`, default `postgres://postgres@127.0.0.1:5432/test`) and `psql`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

#[allow(dead_code)]
mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use sqlx::Connection;
use support::{
    ADMIN_ID, ADMIN_SECRET, Client, Cred, PgDb, Server, access_token, admin_token, create_acme_payments, http, psql,
    random_hex, run_cli, send,
};

const DEFAULT_PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// Where the data lives: a data directory's SQLite file, or a PostgreSQL database.
struct Site {
    data: tempfile::TempDir,
    pg: Option<PgDb>,
}

impl Site {
    fn new(pg: bool) -> Site {
        let admin = std::env::var("PORTCULLIS_TEST_PG_URL").unwrap_or_else(|_| DEFAULT_PG_URL.to_owned());
        Site { data: tempfile::tempdir().unwrap(), pg: pg.then(|| PgDb::create(&admin, "portcullis_backup_e2e")) }
    }
    fn dir(&self) -> &Path {
        self.data.path()
    }
    /// The flags naming this site's storage.
    fn args(&self) -> Vec<String> {
        let mut a = vec!["--data-dir".to_owned(), self.dir().display().to_string()];
        if let Some(db) = &self.pg {
            a.extend(["--database-url".to_owned(), db.url()]);
        }
        a
    }
    /// Runs `portcullis ARGS` against this site; (success, stdout, stderr).
    fn cli(&self, args: &[&str], envs: &[(&str, &str)]) -> (bool, String, String) {
        let own = self.args();
        let mut all: Vec<&str> = args.to_vec();
        all.extend(own.iter().map(String::as_str));
        let (status, out, err) = run_cli(&all, envs);
        (status.success(), out, err)
    }
    /// Runs SQL as someone with write access to the database.
    async fn sql(&self, sql: &str) {
        match &self.pg {
            Some(db) => psql(&db.url(), sql).unwrap(),
            None => {
                let url = format!("sqlite://{}", self.dir().join("portcullis.db").display());
                let mut c = sqlx::SqliteConnection::connect(&url).await.unwrap();
                sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned())).execute(&mut c).await.unwrap();
                c.close().await.unwrap();
            }
        }
    }
}

/// `openssl` in `dir`; (success, stdout + stderr).
fn openssl(dir: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run openssl ({e}); scripts/test.sh installs it"));
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// A P-256 key and CSR made by openssl, issued as a `transport` certificate of `acme$app`;
/// returns the certificate's id and writes it to `DIR/NAME.crt`.
async fn issue_cert(c: &Client, admin: &str, dir: &Path, app: &str, name: &str) -> String {
    let subj = format!("/CN=acme${app}/O=acme");
    let (ok, out) = openssl(
        dir,
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-subj",
            &subj,
            "-out",
            &format!("{name}.csr"),
        ],
    );
    assert!(ok, "{out}");
    let csr = std::fs::read_to_string(dir.join(format!("{name}.csr"))).unwrap();
    let r = c
        .post(
            "/api/v1/organisations/acme/certificates",
            &Cred::Bearer(admin),
            &json!({ "type": "transport", "application": app, "csr": csr }),
        )
        .await;
    r.expect(201);
    std::fs::write(dir.join(format!("{name}.crt")), r.str("certificate_pem")).unwrap();
    r.str("id")
}

async fn introspect(s: &Server, id: &str, secret: &str, token: &str) -> Value {
    let r = send(
        http().post(format!("{}/oauth2/introspect", s.url)).basic_auth(id, Some(secret)).form(&[("token", token)]),
    )
    .await;
    r.expect(200);
    r.json
}

async fn get_bytes(url: &str) -> Vec<u8> {
    let r = http().get(url).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200, "{url}");
    r.bytes().await.unwrap().to_vec()
}

/// Writes organisations `load-N` until stopped; the slugs whose creation was acknowledged.
fn write_load(
    s: &Server,
    admin: String,
    stop: Arc<AtomicBool>,
) -> (tokio::task::JoinHandle<()>, Arc<Mutex<Vec<String>>>) {
    let acked = Arc::new(Mutex::new(Vec::new()));
    let (c, done) = (Client::new(s), acked.clone());
    let task = tokio::spawn(async move {
        // Bounded whatever happens: at most 2000 writes.
        for i in 0..2000 {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            let slug = format!("load-{i}");
            let r =
                c.post("/api/v1/organisations", &Cred::Bearer(&admin), &json!({ "slug": slug, "name": slug })).await;
            r.expect(201);
            done.lock().unwrap().push(slug);
        }
    });
    (task, acked)
}

/// The first audit row a test may edit: one written at bootstrap, far from both ends.
const TAMPERED_SEQ: i64 = 3;

async fn backup_restore_and_audit(pg: bool) {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let key = base64_key();
    let key_env = [("PORTCULLIS_MASTER_KEY", key.as_str())];
    // SQLite keeps its generated master.key file (copied by hand below, as an operator would);
    // the PostgreSQL nodes get theirs from the environment.
    let envs: &[(&str, &str)] = if pg { &key_env } else { &[] };

    let old = Site::new(pg);
    let old_args = old.args();
    let old_args: Vec<&str> = old_args.iter().map(String::as_str).collect();
    let mut s = Server::start(old.dir(), &old_args[2..], envs);
    let c = Client::new(&s);
    let admin = admin_token(&s).await;
    create_acme_payments(&c, &admin).await;
    let r = c
        .post(
            "/api/v1/organisations/acme/applications",
            &Cred::Bearer(&admin),
            &json!({ "slug": "billing", "name": "Billing", "scopes": ["payments/read"], "roles": ["payments:reader"],
                     "token_endpoint_auth_method": "client_secret_basic" }),
        )
        .await;
    r.expect(201);
    let billing_secret = r.str("client_secret");
    let token = access_token(&s, "acme$billing", &billing_secret).await;
    let revoked_token = access_token(&s, "acme$billing", &billing_secret).await;
    send(
        http()
            .post(format!("{}/oauth2/revoke", s.url))
            .basic_auth("acme$billing", Some(&billing_secret))
            .form(&[("token", revoked_token.as_str())]),
    )
    .await
    .expect(200);
    let r = c
        .post(
            "/api/v1/organisations/acme/applications",
            &Cred::Bearer(&admin),
            &json!({ "slug": "device", "name": "Device", "scopes": ["payments/read"], "token_endpoint_auth_method": "tls_client_auth" }),
        )
        .await;
    r.expect(201);
    issue_cert(&c, &admin, w, "device", "kept").await;
    let gone = issue_cert(&c, &admin, w, "device", "gone").await;
    c.post(
        &format!("/api/v1/organisations/acme/certificates/{gone}/revoke"),
        &Cred::Bearer(&admin),
        &json!({ "reason": "key_compromise" }),
    )
    .await
    .expect(200);

    // The chain is intact while the server runs.
    let (ok, out, err) = old.cli(&["audit", "verify"], envs);
    assert!(ok && out.starts_with("audit chain intact: "), "{out}{err}");
    let recorded = out.split("head ").nth(1).unwrap().split_whitespace().next().unwrap().to_owned();

    // A backup under write load.
    let stop = Arc::new(AtomicBool::new(false));
    let (load, acked) = write_load(&s, admin.clone(), stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let acked_before: Vec<String> = acked.lock().unwrap().clone();
    assert!(!acked_before.is_empty(), "the load is writing before the backup starts");
    let file = w.join("portcullis.backup");
    let file_arg = file.display().to_string();
    let (ok, out, err) = {
        let (old_args, envs) =
            (old.args(), envs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect::<Vec<_>>());
        let file_arg = file_arg.clone();
        tokio::task::spawn_blocking(move || {
            let mut args = vec!["backup", file_arg.as_str()];
            args.extend(old_args.iter().map(String::as_str));
            let envs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let (status, out, err) = run_cli(&args, &envs);
            (status.success(), out, err)
        })
        .await
        .unwrap()
    };
    assert!(ok, "backup failed:\n{out}{err}");
    assert!(err.contains("backup written to") && err.contains("master key is not in the backup"), "{err}");
    stop.store(true, Ordering::SeqCst);
    load.await.unwrap();
    let acked_total = acked.lock().unwrap().len();
    assert!(acked_total > acked_before.len(), "writes went on while the backup ran");
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(!w.join("portcullis.backup.partial").exists());
    assert!(!text.contains(&key), "the master key is not in the backup");
    for secret in [ADMIN_SECRET, billing_secret.as_str()] {
        assert!(!text.contains(secret), "client secrets are only hashed in the backup");
    }
    assert!(!text.contains("PRIVATE KEY"), "no plaintext private key in the backup");
    s.stop_clean();
    s.assert_no_logged_errors();

    // Restore into a fresh site with the same master key.
    let new = Site::new(pg);
    if !pg {
        let master = old.dir().join("master.key");
        std::fs::copy(&master, new.dir().join("master.key")).unwrap();
    }
    let (ok, out, err) = new.cli(&["restore", &file_arg], envs);
    assert!(ok, "restore failed:\n{out}{err}");
    assert!(err.contains("master key matches; audit chain intact"), "{err}");
    let (ok, _, err) = new.cli(&["restore", &file_arg], envs);
    assert!(!ok && err.contains("not empty"), "a second restore is refused: {err}");
    let new_args = new.args();
    let new_args: Vec<&str> = new_args.iter().map(String::as_str).collect();
    // Same address, so the same issuer as the tokens'.
    let mut s2 = Server::launch(new.dir(), &s.addr, &new_args[2..], envs, true);
    let c2 = Client::new(&s2);

    // Tokens issued before the backup: the admin's still works, the revoked one stays revoked.
    c2.get("/api/v1/organisations/acme", &Cred::Bearer(&admin)).await.expect(200);
    let live = introspect(&s2, "acme$billing", &billing_secret, &token).await;
    assert_eq!(live["active"], true, "{live}");
    let dead = introspect(&s2, "acme$billing", &billing_secret, &revoked_token).await;
    assert_eq!(dead["active"], false, "{dead}");
    access_token(&s2, ADMIN_ID, ADMIN_SECRET).await;

    // Certificates: the kept one verifies against the restored CA; the revoked one is on its CRL.
    std::fs::write(w.join("ca.pem"), get_bytes(&format!("{}/pki/ca.pem", s2.url)).await).unwrap();
    std::fs::write(w.join("crl.pem"), get_bytes(&format!("{}/pki/crl.pem", s2.url)).await).unwrap();
    let (ok, out) = openssl(w, &["verify", "-CAfile", "ca.pem", "-crl_check", "-CRLfile", "crl.pem", "kept.crt"]);
    assert!(ok, "{out}");
    let (ok, out) = openssl(w, &["verify", "-CAfile", "ca.pem", "-crl_check", "-CRLfile", "crl.pem", "gone.crt"]);
    assert!(!ok && out.contains("certificate revoked"), "{out}");

    // Every write acknowledged before the backup started is there.
    for slug in &acked_before {
        c2.get(&format!("/api/v1/organisations/{slug}"), &Cred::Bearer(&admin)).await.expect(200);
    }

    // The restored chain verifies, passes through the head recorded before the backup, and
    // goes on growing.
    c2.post("/api/v1/organisations", &Cred::Bearer(&admin), &json!({ "slug": "after", "name": "After" }))
        .await
        .expect(201);
    let (ok, out, err) = new.cli(&["audit", "verify", "--expect-head", &recorded], envs);
    assert!(ok && out.starts_with("audit chain intact: "), "{out}{err}");

    // One row edited over SQL (the trigger dropped first): named by its seq.
    let drop_trigger = if pg {
        "DROP TRIGGER audit_events_append_only ON audit_events"
    } else {
        "DROP TRIGGER audit_events_no_update"
    };
    new.sql(drop_trigger).await;
    new.sql(&format!("UPDATE audit_events SET actor = 'someone else' WHERE seq = {TAMPERED_SEQ}")).await;
    let (ok, out, err) = new.cli(&["audit", "verify"], envs);
    assert!(!ok, "verify must fail: {out}");
    assert!(err.contains(&format!("audit row seq {TAMPERED_SEQ} does not match its MAC")), "{err}");
    s2.stop_clean();
    s2.assert_no_logged_errors();
}

/// A random master key, base64 as PORTCULLIS_MASTER_KEY takes it.
fn base64_key() -> String {
    use base64::Engine;
    let hex = random_hex(32);
    let bytes: Vec<u8> = (0..32).map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_backup_restore_and_audit_chain() {
    backup_restore_and_audit(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_backup_restore_and_audit_chain() {
    backup_restore_and_audit(true).await;
}
