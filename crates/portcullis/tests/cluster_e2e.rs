//! Scale-out end to end: three `portcullis serve` nodes and one standalone `portcullis gateway`
//! on loopback, sharing one fresh PostgreSQL database (same master key, same issuer, separate
//! data directories), mail to a real SMTP server, `curl` and `openssl` at the gateway.
//!
//! It checks what docs/scale-out.md promises: the nodes start together and migrate and
//! bootstrap once; a change made on one node is seen on the others at once or within seconds
//! (clients, tokens and their revocation, sessions, roles and permissions, certificate
//! revocation at the gateway's handshake); failure limits and lockouts count across nodes; the
//! scheduled signing-key and issuing-CA rotations are done by one node, and the new key or CA
//! is known everywhere before anything it signed is presented (no 401, no failed handshake).
//! Rotation is made due by aging the rows' timestamps in the database (as time passing would).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

#[path = "support/gateway.rs"]
mod gateway;
#[allow(dead_code)]
mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use gateway::{Gw, Standalone, standalone_config, start_echo, write};
use serde_json::{Value, json};
use support::{ADMIN_PASSWORD, Client, Cred, PAYMENTS_AUD, PgDb, Server, Sink, admin_token, create_acme_payments};

const DEFAULT_PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
/// Failed client authentications allowed per client and minute, across the cluster.
const CLIENT_FAILURES: usize = 6;
/// Failed logins that lock an account.
const LOCKOUT: usize = 4;

/// One value from PostgreSQL (`psql -At`).
fn sql(url: &str, query: &str) -> String {
    let out = Command::new("psql")
        .arg(url)
        .args(["-w", "-v", "ON_ERROR_STOP=1", "-Atq", "-c", query])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{query}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn count(url: &str, query: &str) -> usize {
    sql(url, query).parse().unwrap()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Waits until `check` holds, up to `within`; returns how long it took.
async fn eventually<F, Fut>(what: &str, within: Duration, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if check().await {
            return start.elapsed();
        }
        assert!(start.elapsed() < within, "{what} did not happen within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn jwks_kids(base: &str) -> BTreeSet<String> {
    let r = support::send(support::http().get(format!("{base}/oauth2/jwks"))).await;
    r.expect(200);
    r.json["keys"].as_array().unwrap().iter().map(|k| k["kid"].as_str().unwrap().to_owned()).collect()
}

fn kid_of(token: &str) -> String {
    let header = token.split('.').next().unwrap();
    let v: Value =
        serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(header).unwrap()).unwrap();
    v["kid"].as_str().unwrap().to_owned()
}

async fn introspect(node: &Server, client: (&str, &str), token: &str) -> Value {
    let r = support::send(
        support::http()
            .post(format!("{}/oauth2/introspect", node.url))
            .basic_auth(client.0, Some(client.1))
            .form(&[("token", token)]),
    )
    .await;
    r.expect(200);
    r.json
}

async fn payments_token(node: &Server, id: &str, secret: &str) -> String {
    let r = support::token_request(node, id, secret, &[("resource", PAYMENTS_AUD)]).await;
    r.expect(200);
    r.str("access_token")
}

async fn pem_certificates(node: &Server) -> usize {
    let r = support::send(support::http().get(format!("{}/pki/ca.pem", node.url))).await;
    r.expect(200);
    r.text.matches("BEGIN CERTIFICATE").count()
}

struct Cluster {
    db: String,
    nodes: Vec<Server>,
    admin: String,
    sink: Sink,
    dir: tempfile::TempDir,
    _db: PgDb,
}

impl Cluster {
    fn c(&self, i: usize) -> Client {
        Client::new(&self.nodes[i % 3])
    }
}

/// Three nodes started at the same moment on a fresh database.
fn start_cluster(sink: Sink) -> Cluster {
    let admin_url = std::env::var("PORTCULLIS_TEST_PG_URL").unwrap_or_else(|_| DEFAULT_PG_URL.to_owned());
    let db = PgDb::create(&admin_url, "portcullis_cluster");
    let url = db.url();
    let dir = tempfile::tempdir().unwrap();
    let mut key = [0u8; 32];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom").unwrap(), &mut key).unwrap();
    let master = base64::engine::general_purpose::STANDARD.encode(key);
    let ports = [free_port(), free_port(), free_port()];
    let issuer = format!("http://127.0.0.1:{}", ports[0]);
    let mut envs: Vec<(String, String)> = sink.envs().into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
    envs.extend(
        [
            ("PORTCULLIS_MASTER_KEY", master.as_str()),
            ("PORTCULLIS_TOKENS__KEY_CHECK_INTERVAL", "1"),
            ("PORTCULLIS_TOKENS__KEY_ROTATION_INTERVAL", "3600"),
            ("PORTCULLIS_CLIENTS__AUTH_FAILURES_PER_MINUTE", &CLIENT_FAILURES.to_string()),
            ("PORTCULLIS_AUTH__LOCKOUT_THRESHOLD", &LOCKOUT.to_string()),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned())),
    );
    let starts: Vec<_> = ports
        .iter()
        .enumerate()
        .map(|(i, port)| {
            let (data, url, issuer, envs) =
                (dir.path().join(format!("node-{i}")), url.clone(), issuer.clone(), envs.clone());
            let listen = format!("127.0.0.1:{port}");
            std::thread::spawn(move || {
                let envs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                Server::launch(&data, &listen, &["--database-url", &url, "--issuer", &issuer], &envs, true)
            })
        })
        .collect();
    let nodes: Vec<Server> = starts.into_iter().map(|t| t.join().unwrap()).collect();
    Cluster { db: url, nodes, admin: String::new(), sink, dir, _db: db }
}

/// A transport certificate for `app` of `acme` issued through `c`: (certificate + chain path,
/// key path, certificate id, the issuer's subject as openssl prints it).
async fn transport_certificate(
    c: &Client,
    admin: &str,
    dir: &Path,
    app: &str,
    name: &str,
) -> (PathBuf, PathBuf, String, String) {
    let (cert, key, id) = gateway::transport_certificate(c, admin, dir, app, name).await;
    let out = Command::new("openssl").args(["x509", "-noout", "-issuer", "-in"]).arg(&cert).output().unwrap();
    (cert, key, id, String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_and_a_gateway_on_one_postgresql_database() {
    let mut cl = start_cluster(Sink::start(0));
    let db = cl.db.clone();

    // ---- started together: migrated and bootstrapped once ----------------------------------
    let migrations = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../portcullis-store/migrations/postgres"))
        .unwrap()
        .count();
    assert_eq!(count(&db, "SELECT count(*) FROM portcullis_migrations"), migrations);
    assert_eq!(count(&db, "SELECT count(*) FROM ca_certificates"), 2, "one root and one issuing CA");
    assert_eq!(count(&db, "SELECT count(*) FROM audit_events WHERE action = 'ca.create'"), 1);
    assert_eq!(count(&db, "SELECT count(*) FROM users"), 1, "one bootstrap admin");
    let kids = jwks_kids(&cl.nodes[0].url).await;
    for n in &cl.nodes[1..] {
        assert_eq!(jwks_kids(&n.url).await, kids, "every node publishes the same keys");
    }

    // ---- a client created on A authenticates on B at once -----------------------------------
    cl.admin = admin_token(&cl.nodes[0]).await;
    let admin = cl.admin.clone();
    create_acme_payments(&cl.c(0), &admin).await;
    let r = cl
        .c(0)
        .post(
            "/api/v1/organisations/acme/applications",
            &Cred::Bearer(&admin),
            &json!({"slug": "billing", "name": "Billing", "roles": ["payments:reader"], "scopes": ["payments/read"]}),
        )
        .await;
    r.expect(201);
    let (billing, billing_secret) = (r.str("client_id"), r.str("client_secret"));
    let tok = payments_token(&cl.nodes[1], &billing, &billing_secret).await;

    // ---- the gateway, pointed at the issuer (node A) ----------------------------------------
    let (up, _echo) = start_echo().await;
    let r = cl
        .c(0)
        .post(
            "/api/v1/organisations/acme/applications",
            &Cred::Bearer(&admin),
            &json!({"slug": "edge", "name": "Edge", "roles": ["portcullis:gateway"], "token_endpoint_auth_method": "client_secret_basic"}),
        )
        .await;
    r.expect(201);
    let edge_secret = r.str("client_secret");
    let gdir = cl.dir.path().join("gateway");
    std::fs::create_dir_all(&gdir).unwrap();
    let routes = format!(
        r#"
[[gateway.routes]]
path = "/pay/"
upstream = "{up}"
auth = ["bearer", "mtls"]
require_roles = ["payments:reader"]
audience = "{PAYMENTS_AUD}"
"#
    );
    let config = write(&gdir.join("edge.toml"), &standalone_config(&cl.nodes[0].url, "acme$edge", "optional", &routes));
    let ca = support::send(support::http().get(format!("{}/pki/ca.pem", cl.nodes[2].url))).await;
    let ca = write(&gdir.join("ca.pem"), &ca.text);
    let (_edge, port) = Standalone::start(&config, &edge_secret);
    let gw = Gw { url: format!("https://localhost:{port}"), ca, dir: gdir.clone() };
    assert_eq!(gw.bearer("/pay/x", &tok).status, 200, "a token from node B at the gateway");

    // ---- a token from A: introspected and revoked on B, dead everywhere ---------------------
    let t = payments_token(&cl.nodes[0], &billing, &billing_secret).await;
    assert_eq!(introspect(&cl.nodes[1], (&billing, &billing_secret), &t).await["active"], true);
    assert_eq!(gw.bearer("/pay/x", &t).status, 200);
    let r = support::send(
        support::http()
            .post(format!("{}/oauth2/revoke", cl.nodes[1].url))
            .basic_auth(&billing, Some(&billing_secret))
            .form(&[("token", t.as_str())]),
    )
    .await;
    r.expect(200);
    assert_eq!(introspect(&cl.nodes[2], (&billing, &billing_secret), &t).await, json!({"active": false}));
    assert_eq!(introspect(&cl.nodes[0], (&billing, &billing_secret), &t).await, json!({"active": false}));
    let took =
        gw.eventually("the revoked token to be refused at the gateway", || gw.bearer("/pay/x", &t).status == 401);
    eprintln!("token revocation on B reached the gateway in {took:?}");
    gw.bearer("/pay/x", &t).refused(401, "revoked");

    // ---- a session signed in on A, revoked on C, dead everywhere ----------------------------
    let login = cl
        .c(0)
        .post("/api/v1/sessions", &Cred::None, &json!({"email": "admin@portcullis.local", "password": ADMIN_PASSWORD}))
        .await;
    login.expect(202);
    let code = cl.sink.next_mail("admin@portcullis.local", "", Duration::from_secs(10)).await.code();
    let session = cl
        .c(1)
        .post(
            "/api/v1/sessions/verify",
            &Cred::None,
            &json!({"verification_id": login.str("verification_id"), "code": code}),
        )
        .await;
    session.expect(200);
    let sess = session.str("session_token");
    for i in 0..3 {
        cl.c(i).get("/api/v1/sessions/current", &Cred::Bearer(&sess)).await.expect(200);
    }
    cl.c(2).delete("/api/v1/sessions/current", &Cred::Bearer(&sess)).await.expect(204);
    for i in [0, 1] {
        let c = cl.c(i);
        let took = eventually("the revoked session to be refused", Duration::from_secs(5), || async {
            c.get("/api/v1/sessions/current", &Cred::Bearer(&sess)).await.status == 401
        })
        .await;
        eprintln!("session revocation on C reached node {i} in {took:?}");
    }

    // ---- a permission granted on C is seen by A and B ----------------------------------------
    let r = cl
        .c(0)
        .post(
            "/api/v1/organisations/acme/users",
            &Cred::Bearer(&admin),
            &json!({"email": "ann@acme.test", "roles": ["payments:reader"]}),
        )
        .await;
    r.expect(201);
    let ann = r.str("id");
    let check = json!({"subject": ann, "permission": "payments.invoice.write", "organisation": "acme"});
    for i in 0..3 {
        let r = cl.c(i).post("/api/v1/authz/check", &Cred::Bearer(&admin), &check).await;
        r.expect(200);
        assert_eq!(r.json["allowed"], false, "node {i}: {}", r.json);
    }
    cl.c(2)
        .call(
            reqwest::Method::PUT,
            "/api/v1/organisations/acme/roles/payments:reader",
            &Cred::Bearer(&admin),
            Some(&json!({"permissions": ["payments.invoice.read", "payments.invoice.write"]})),
        )
        .await
        .expect(200);
    for i in [0, 1] {
        let c = cl.c(i);
        let took = eventually("the new grant on every node", Duration::from_secs(5), || async {
            c.post("/api/v1/authz/check", &Cred::Bearer(&admin), &check).await.json["allowed"] == true
        })
        .await;
        eprintln!("a permission grant on C reached node {i} in {took:?}");
    }

    // ---- a certificate issued on B, revoked on A: refused at the gateway's handshake --------
    let (cert, key, cert_id, first_issuer) = transport_certificate(&cl.c(1), &admin, &gdir, "billing", "billing").await;
    let (cert_path, key_path) = (cert, key);
    gw.eventually("the certificate accepted at the gateway", || {
        gw.with_cert("/pay/x", &cert_path, &key_path, &[]).status == 200
    });
    cl.c(0)
        .post(
            &format!("/api/v1/organisations/acme/certificates/{cert_id}/revoke"),
            &Cred::Bearer(&admin),
            &json!({"reason": "keyCompromise"}),
        )
        .await
        .expect(200);
    let took = gw.eventually("the revoked certificate refused at the gateway", || {
        gw.with_cert("/pay/x", &cert_path, &key_path, &[]).status != 200
    });
    assert_eq!(gw.with_cert("/pay/x", &cert_path, &key_path, &[]).status, 0, "refused at the handshake");
    eprintln!("certificate revocation on A reached the gateway's handshake in {took:?}");

    // ---- failure limits and lockouts count across nodes --------------------------------------
    for i in 0..CLIENT_FAILURES {
        support::token_request(&cl.nodes[i % 3], &billing, "wrong-secret-0123456789", &[]).await.expect(401);
    }
    for i in 0..3 {
        support::token_request(&cl.nodes[i], &billing, "wrong-secret-0123456789", &[]).await.expect(429);
    }
    let r = cl
        .c(0)
        .post(
            "/api/v1/organisations/acme/users",
            &Cred::Bearer(&admin),
            &json!({"email": "lock@acme.test", "password": "lock-me-password-123456"}),
        )
        .await;
    r.expect(201);
    let locked_id = r.str("id");
    for i in 0..LOCKOUT {
        cl.c(i)
            .post(
                "/api/v1/sessions",
                &Cred::None,
                &json!({"email": "lock@acme.test", "password": "not-the-password-000"}),
            )
            .await
            .expect(401);
    }
    cl.c(1)
        .post(
            "/api/v1/sessions",
            &Cred::None,
            &json!({"email": "lock@acme.test", "password": "lock-me-password-123456"}),
        )
        .await
        .expect(401);
    let u = cl.c(2).get(&format!("/api/v1/organisations/acme/users/{locked_id}"), &Cred::Bearer(&admin)).await;
    u.expect(200);
    assert!(u.json["locked_until"].is_number(), "locked after {LOCKOUT} failures on three nodes: {}", u.json);

    // ---- scheduled signing-key rotation under load: one node rotates, nobody sees a 401 ------
    let first_kid = kid_of(&payments_token(&cl.nodes[0], &billing, &billing_secret).await);
    let load = {
        let nodes: Vec<String> = cl.nodes.iter().map(|n| n.url.clone()).collect();
        let (billing, secret) = (billing.clone(), billing_secret.clone());
        let gw = Gw { url: gw.url.clone(), ca: gw.ca.clone(), dir: gw.dir.clone() };
        tokio::spawn(async move {
            let mut kids = BTreeSet::new();
            let (mut failures, mut n, mut i) = (Vec::new(), 0, 0usize);
            let stop = Instant::now() + Duration::from_secs(30);
            let mut rotated_at: Option<Instant> = None;
            while Instant::now() < stop && rotated_at.is_none_or(|t| t.elapsed() < Duration::from_secs(3)) {
                let issue = &nodes[i % 3];
                let check = &nodes[(i + 1) % 3];
                i += 1;
                let r = support::send(
                    support::http()
                        .post(format!("{issue}/oauth2/token"))
                        .basic_auth(&billing, Some(&secret))
                        .form(&[("grant_type", "client_credentials"), ("resource", PAYMENTS_AUD)]),
                )
                .await;
                if r.status != 200 {
                    failures.push(format!("token at {issue}: {}", r.status));
                    continue;
                }
                let t = r.str("access_token");
                let kid = kid_of(&t);
                if kid != first_kid && rotated_at.is_none() {
                    rotated_at = Some(Instant::now());
                }
                kids.insert(kid);
                let v = support::send(
                    support::http()
                        .post(format!("{check}/oauth2/introspect"))
                        .basic_auth(&billing, Some(&secret))
                        .form(&[("token", t.as_str())]),
                )
                .await;
                if v.json["active"] != true {
                    failures.push(format!("introspection at {check}: {}", v.json));
                }
                let gwr = tokio::task::block_in_place(|| gw.bearer("/pay/x", &t));
                if gwr.status != 200 {
                    failures.push(format!("gateway: {gwr:?}"));
                }
                n += 1;
            }
            (n, kids, failures, rotated_at.is_some())
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    sql(&db, "UPDATE signing_keys SET created_at = created_at - 7200, activated_at = activated_at - 7200");
    let (n, kids_seen, failures, rotated) = load.await.unwrap();
    assert!(rotated, "the keys were not rotated within 30 s");
    assert!(failures.is_empty(), "{} of {n} rounds failed during the rotation: {failures:#?}", failures.len());
    assert!(kids_seen.len() >= 2, "tokens before and after the rotation: {kids_seen:?}");
    eprintln!("{n} token → introspection → gateway rounds across the key rotation, none refused");
    let rotations = sql(&db, "SELECT target FROM audit_events WHERE action = 'signing_key.rotate' ORDER BY seq");
    let promoted: Vec<&str> = rotations.lines().collect();
    let distinct: BTreeSet<&str> = promoted.iter().copied().collect();
    assert_eq!(promoted.len(), distinct.len(), "each key promoted once: {promoted:?}");
    assert_eq!(
        count(&db, "SELECT count(*) FROM signing_keys WHERE state = 'current'"),
        promoted.len(),
        "one rotation per algorithm, by one node"
    );
    let kids = jwks_kids(&cl.nodes[0].url).await;
    for n in &cl.nodes[1..] {
        eventually("every node to publish the same keys", Duration::from_secs(5), || async {
            jwks_kids(&n.url).await == kids
        })
        .await;
    }

    // ---- scheduled issuing-CA rotation: staged, published everywhere, then promoted ---------
    sql(&db, "UPDATE ca_certificates SET created_at = created_at - 4 * 365 * 86400 WHERE kind = 'issuing' AND active");
    for i in 0..3 {
        let node = &cl.nodes[i];
        let took = eventually("the successor CA published on every node", Duration::from_secs(10), || async {
            pem_certificates(node).await == 3
        })
        .await;
        eprintln!("the staged issuing CA was published on node {i} after {took:?}");
    }
    assert_eq!(count(&db, "SELECT count(*) FROM audit_events WHERE action = 'ca.stage'"), 1, "staged by one node");
    let (c2, k2, _, issuer2) = transport_certificate(&cl.c(2), &admin, &gdir, "billing", "billing2").await;
    assert_eq!(issuer2, first_issuer, "the old CA issues until the successor is promoted");
    sql(
        &db,
        "UPDATE ca_certificates SET created_at = created_at - 3600 WHERE kind = 'issuing' AND NOT active AND created_at = (SELECT max(created_at) FROM ca_certificates WHERE kind = 'issuing')",
    );
    eventually("the successor CA promoted", Duration::from_secs(10), || async {
        count(&db, "SELECT count(*) FROM audit_events WHERE action = 'ca.promote'") == 1
    })
    .await;
    // Every node issues from the successor once it has re-read the CAs; the gateway trusted it
    // since it was staged, so the first request with a new certificate passes.
    for i in 0..3 {
        let c = cl.c(i);
        let start = Instant::now();
        let mut attempt = 0;
        let (c3, k3) = loop {
            attempt += 1;
            let name = format!("billing3-{i}-{attempt}");
            let (c3, k3, _, issuer3) = transport_certificate(&c, &admin, &gdir, "billing", &name).await;
            if issuer3 != first_issuer {
                break (c3, k3);
            }
            assert!(start.elapsed() < Duration::from_secs(5), "node {i} still issues from the old CA");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        eprintln!("node {i} issues from the successor after {:?}", start.elapsed());
        let r = gw.with_cert("/pay/x", &c3, &k3, &[]);
        assert_eq!(r.status, 200, "a certificate of the new CA, at once: {r:?}");
    }
    let r = gw.with_cert("/pay/x", &c2, &k2, &[]);
    assert_eq!(r.status, 200, "certificates of the old CA stay valid: {r:?}");
    assert_eq!(count(&db, "SELECT count(*) FROM audit_events WHERE action = 'ca.promote'"), 1, "promoted by one node");

    for n in &mut cl.nodes {
        n.stop_clean();
        n.assert_no_logged_errors();
    }
}
