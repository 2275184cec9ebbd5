//! The load suite (docs/benchmarks.md, "Scale-out"): starts `--nodes` `portcullis serve` nodes
//! and one standalone `portcullis gateway` on a fresh PostgreSQL database, then runs a mix of
//! token issuance, introspection on another node, session validation, gateway requests with the
//! tokens, and certificate issuance from CSRs, with `--concurrency` clients for `--duration`
//! seconds. Reports throughput and latency percentiles per operation, every error, and each
//! process's resident memory over time (for the soak: no errors, no growth).
//!
//! ```text
//! cargo build --release -p portcullis --bin portcullis --example load
//! target/release/examples/load --nodes 3 --duration 60 --concurrency 32
//! ```
//! Needs `psql` and a PostgreSQL server at `PORTCULLIS_TEST_PG_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`); the release binary next to the example's
//! directory (or `--bin PATH`). Not a test: it prints figures; it exits non-zero on any error.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{Value, json};

const ADMIN_SECRET: &str = "load-admin-client-secret-0123456789abcdefgh";
const ADMIN_PASSWORD: &str = "load-admin-password-0123456";
const AUDIENCE: &str = "https://api.load.test";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Token,
    Introspect,
    Session,
    Gateway,
    Certificate,
}

const OPS: [Op; 5] = [Op::Token, Op::Introspect, Op::Session, Op::Gateway, Op::Certificate];
/// Out of 20: 8 token, 4 introspection, 4 session, 3 gateway, 1 certificate.
const MIX: [Op; 20] = [
    Op::Token,
    Op::Introspect,
    Op::Session,
    Op::Token,
    Op::Gateway,
    Op::Token,
    Op::Introspect,
    Op::Session,
    Op::Token,
    Op::Gateway,
    Op::Token,
    Op::Introspect,
    Op::Session,
    Op::Token,
    Op::Certificate,
    Op::Token,
    Op::Introspect,
    Op::Session,
    Op::Token,
    Op::Gateway,
];

struct Args {
    nodes: usize,
    duration: u64,
    concurrency: usize,
    bin: PathBuf,
    report_every: u64,
}

fn args() -> Args {
    let exe = std::env::current_exe().unwrap();
    let mut a = Args {
        nodes: 3,
        duration: 60,
        concurrency: 32,
        bin: exe.parent().and_then(Path::parent).unwrap().join("portcullis"),
        report_every: 60,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--nodes" => a.nodes = value().parse().unwrap(),
            "--duration" => a.duration = value().parse().unwrap(),
            "--concurrency" => a.concurrency = value().parse().unwrap(),
            "--bin" => a.bin = value().into(),
            "--report-every" => a.report_every = value().parse().unwrap(),
            other => panic!("unknown flag {other}; see the example's documentation"),
        }
    }
    assert!(a.bin.exists(), "no binary at {} (build it, or pass --bin)", a.bin.display());
    a
}

fn psql(url: &str, sql: &str) {
    let ok = Command::new("psql").arg(url).args(["-qAt", "-c", sql]).stdin(Stdio::null()).status().unwrap();
    assert!(ok.success(), "psql {sql}");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A child process whose standard error is kept in a file; killed on drop.
struct Proc {
    child: Child,
    err: PathBuf,
}

impl Proc {
    fn start(mut cmd: Command, err: PathBuf) -> Proc {
        let file = std::fs::File::create(&err).unwrap();
        let child = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(file).spawn().unwrap();
        Proc { child, err }
    }
    fn log(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }
    fn wait_for(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let log = self.log();
            if let Some(line) = log.lines().find(|l| l.contains(needle)) {
                return line.to_owned();
            }
            assert!(Instant::now() < deadline, "never logged {needle:?}:\n{log}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    /// Resident memory in KiB.
    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Latencies (µs) and errors per operation.
#[derive(Default)]
struct Stats {
    latencies: [Vec<u32>; 5],
    errors: [u64; 5],
    first_errors: Vec<String>,
}

fn op_index(op: Op) -> usize {
    OPS.iter().position(|o| *o == op).unwrap()
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[i]) / 1000.0
}

struct World {
    nodes: Vec<String>,
    gateway: String,
    client: (String, String),
    session: String,
    /// The admin's access token, replaced before it expires (a soak outlives it).
    admin: tokio::sync::RwLock<String>,
    csrs: Vec<String>,
    http: reqwest::Client,
    gw_http: reqwest::Client,
}

impl World {
    async fn token(&self, node: usize) -> Result<String, String> {
        let r = self
            .http
            .post(format!("{}/oauth2/token", self.nodes[node % self.nodes.len()]))
            .basic_auth(&self.client.0, Some(&self.client.1))
            .form(&[("grant_type", "client_credentials"), ("resource", AUDIENCE)])
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = r.status();
        let v: Value = r.json().await.map_err(|e| e.to_string())?;
        if status != 200 {
            return Err(format!("token {status}: {v}"));
        }
        Ok(v["access_token"].as_str().unwrap_or_default().to_owned())
    }

    async fn run(&self, op: Op, node: usize, token: &mut String) -> Result<(), String> {
        let at = &self.nodes[node % self.nodes.len()];
        let expect = |what: &str, status: reqwest::StatusCode| -> Result<(), String> {
            if status.is_success() { Ok(()) } else { Err(format!("{what} at {at}: {status}")) }
        };
        match op {
            Op::Token => {
                *token = self.token(node).await?;
                Ok(())
            }
            Op::Introspect => {
                let r = self
                    .http
                    .post(format!("{at}/oauth2/introspect"))
                    .basic_auth(&self.client.0, Some(&self.client.1))
                    .form(&[("token", token.as_str())])
                    .send()
                    .await
                    .map_err(|e| e.to_string())?;
                expect("introspection", r.status())?;
                let v: Value = r.json().await.map_err(|e| e.to_string())?;
                if v["active"] != true { Err(format!("introspection at {at}: {v}")) } else { Ok(()) }
            }
            Op::Session => {
                let r = self
                    .http
                    .get(format!("{at}/api/v1/sessions/current"))
                    .bearer_auth(&self.session)
                    .send()
                    .await
                    .map_err(|e| e.to_string())?;
                expect("session validation", r.status())
            }
            Op::Gateway => {
                let r = self
                    .gw_http
                    .get(format!("{}/api/x", self.gateway))
                    .bearer_auth(token.as_str())
                    .send()
                    .await
                    .map_err(|e| e.to_string())?;
                expect("gateway", r.status())
            }
            Op::Certificate => {
                let csr = &self.csrs[node % self.csrs.len()];
                let admin = self.admin.read().await.clone();
                let r = self
                    .http
                    .post(format!("{at}/api/v1/organisations/load/certificates"))
                    .bearer_auth(admin)
                    .json(&json!({"type": "transport", "application": "client", "csr": csr}))
                    .send()
                    .await
                    .map_err(|e| e.to_string())?;
                expect("certificate issuance", r.status())
            }
        }
    }
}

async fn api(http: &reqwest::Client, url: &str, token: Option<&str>, body: Value) -> Value {
    let mut rb = http.post(url).json(&body);
    if let Some(t) = token {
        rb = rb.bearer_auth(t);
    }
    let r = rb.send().await.unwrap();
    let status = r.status();
    let v: Value = r.json().await.unwrap_or(Value::Null);
    assert!(status.is_success(), "{url}: {status} {v}");
    v
}

#[tokio::main]
async fn main() {
    let a = args();
    let admin_url =
        std::env::var("PORTCULLIS_TEST_PG_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let work = std::env::temp_dir().join(format!("portcullis-load-{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();
    let dbname = format!("portcullis_load_{}", std::process::id());
    psql(&admin_url, &format!("CREATE DATABASE {dbname}"));
    let db_url = format!("{}/{dbname}", admin_url.rsplit_once('/').unwrap().0);
    let outcome = guarded(run(a, work.clone(), db_url)).await;
    psql(&admin_url, &format!("DROP DATABASE IF EXISTS {dbname} WITH (FORCE)"));
    let _ = std::fs::remove_dir_all(&work);
    if let Err(code) = outcome {
        std::process::exit(code);
    }
}

/// Runs the future on its own task, a panic becoming exit code 2 (so the database is dropped
/// either way).
async fn guarded(f: impl std::future::Future<Output = bool> + Send + 'static) -> Result<(), i32> {
    match tokio::spawn(f).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(1),
        Err(_) => Err(2),
    }
}

async fn run(a: Args, work: PathBuf, db_url: String) -> bool {
    let (work, db_url) = (work.as_path(), db_url.as_str());
    // ---- the cluster ---------------------------------------------------------------------------
    let mut key = [0u8; 32];
    std::fs::File::open("/dev/urandom").unwrap().read_exact(&mut key).unwrap();
    let master = base64::engine::general_purpose::STANDARD.encode(key);
    let ports: Vec<u16> = (0..a.nodes).map(|_| free_port()).collect();
    let issuer = format!("http://127.0.0.1:{}", ports[0]);
    let nodes: Vec<Proc> = ports
        .iter()
        .enumerate()
        .map(|(i, port)| {
            let mut cmd = Command::new(&a.bin);
            cmd.args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--issuer",
                &issuer,
                "--database-url",
                db_url,
            ])
            .arg("--data-dir")
            .arg(work.join(format!("node-{i}")))
            .env("PORTCULLIS_MASTER_KEY", &master)
            .env("PORTCULLIS_ADMIN_CLIENT_SECRET", ADMIN_SECRET)
            .env("PORTCULLIS_ADMIN_PASSWORD", ADMIN_PASSWORD)
            .env("PORTCULLIS_CLIENTS__AUTH_FAILURES_PER_MINUTE", "1000")
            .env("RUST_LOG", "warn,portcullis_core=info,portcullis=info");
            Proc::start(cmd, work.join(format!("node-{i}.log")))
        })
        .collect();
    for n in &nodes {
        n.wait_for("listening on http://");
    }
    let urls: Vec<String> = ports.iter().map(|p| format!("http://127.0.0.1:{p}")).collect();
    let http = reqwest::Client::builder().pool_max_idle_per_host(256).build().unwrap();

    // ---- what the mix uses ---------------------------------------------------------------------
    let r: Value = http
        .post(format!("{}/oauth2/token", urls[0]))
        .basic_auth("portcullis$admin", Some(ADMIN_SECRET))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let admin = r["access_token"].as_str().unwrap().to_owned();
    let base = &urls[0];
    api(&http, &format!("{base}/api/v1/organisations"), Some(&admin), json!({"slug": "load", "name": "Load"})).await;
    api(
        &http,
        &format!("{base}/api/v1/organisations/load/services"),
        Some(&admin),
        json!({"slug": "api", "name": "API", "audience": AUDIENCE, "scopes": ["api/read"], "roles": ["api:user"]}),
    )
    .await;
    let c = api(
        &http,
        &format!("{base}/api/v1/organisations/load/applications"),
        Some(&admin),
        json!({"slug": "client", "name": "Client", "scopes": ["api/read"], "roles": ["api:user"]}),
    )
    .await;
    let client = (c["client_id"].as_str().unwrap().to_owned(), c["client_secret"].as_str().unwrap().to_owned());
    let edge = api(
        &http,
        &format!("{base}/api/v1/organisations/load/applications"),
        Some(&admin),
        json!({"slug": "edge", "name": "Edge", "roles": ["portcullis:gateway"]}),
    )
    .await;
    // A session of the bootstrap admin (the code is logged: no SMTP here).
    let login = http
        .post(format!("{base}/api/v1/sessions"))
        .json(&json!({"email": "admin@portcullis.local", "password": ADMIN_PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), 202);
    let login: Value = login.json().await.unwrap();
    let code = {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let found = nodes.iter().find_map(|n| {
                n.log().lines().rev().filter(|l| l.contains("the code is in the outbox")).find_map(|l| {
                    let digits: String =
                        l.split("code=").nth(1)?.chars().skip_while(|c| !c.is_ascii_digit()).take(6).collect();
                    (digits.len() == 6).then_some(digits)
                })
            });
            if let Some(c) = found {
                break c;
            }
            assert!(Instant::now() < deadline, "no code logged");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let v = api(
        &http,
        &format!("{base}/api/v1/sessions/verify"),
        None,
        json!({"verification_id": login["verification_id"], "code": code}),
    )
    .await;
    let session = v["session_token"].as_str().unwrap().to_owned();
    // CSRs for certificate issuance.
    let csrs: Vec<String> = (0..16)
        .map(|_| {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            p.distinguished_name.push(rcgen::DnType::CommonName, "load$client");
            p.distinguished_name.push(rcgen::DnType::OrganizationName, "load");
            p.serialize_request(&key).unwrap().pem().unwrap()
        })
        .collect();

    // ---- the upstream and the gateway -----------------------------------------------------------
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = format!("http://{}", upstream.local_addr().unwrap());
    tokio::spawn(async move {
        axum::serve(upstream, axum::Router::new().fallback(|| async { "ok" })).await.unwrap();
    });
    let config = work.join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "issuer = \"{issuer}\"\nclient_id = \"load$edge\"\nops_listen = \"127.0.0.1:0\"\n\n[gateway]\nlisten = \"127.0.0.1:0\"\nserver_names = [\"localhost\"]\nmtls = \"off\"\n\n[[gateway.routes]]\npath = \"/api/\"\nupstream = \"{up}\"\nauth = [\"bearer\"]\nrequire_roles = [\"api:user\"]\naudience = \"{AUDIENCE}\"\n"
        ),
    )
    .unwrap();
    let mut cmd = Command::new(&a.bin);
    cmd.arg("gateway")
        .arg("--config")
        .arg(&config)
        .env("PORTCULLIS_GATEWAY_CLIENT_SECRET", edge["client_secret"].as_str().unwrap())
        .env("RUST_LOG", "warn,portcullis=info");
    let gw = Proc::start(cmd, work.join("gateway.log"));
    let line = gw.wait_for("gateway listening on https://");
    let port: String = line
        .split("gateway listening on https://")
        .nth(1)
        .unwrap()
        .chars()
        .take_while(|c| !c.is_whitespace() && *c != '"')
        .collect::<String>()
        .rsplit(':')
        .next()
        .unwrap()
        .to_owned();
    let ca_pem = http.get(format!("{base}/pki/ca.pem")).send().await.unwrap().text().await.unwrap();
    let mut gw_http = reqwest::Client::builder().pool_max_idle_per_host(256);
    for c in reqwest::Certificate::from_pem_bundle(ca_pem.as_bytes()).unwrap() {
        gw_http = gw_http.add_root_certificate(c);
    }
    let world = Arc::new(World {
        nodes: urls.clone(),
        gateway: format!("https://localhost:{port}"),
        client,
        session,
        admin: tokio::sync::RwLock::new(admin),
        csrs,
        http,
        gw_http: gw_http.build().unwrap(),
    });

    // An admin token lives 15 minutes: a new one every 5 (until the run ends).
    let renewal = {
        let (world, base) = (world.clone(), base.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(300)).await;
                let r = world
                    .http
                    .post(format!("{base}/oauth2/token"))
                    .basic_auth("portcullis$admin", Some(ADMIN_SECRET))
                    .form(&[("grant_type", "client_credentials")])
                    .send()
                    .await;
                let token = match r {
                    Ok(r) => r.json::<Value>().await.ok().and_then(|v| v["access_token"].as_str().map(str::to_owned)),
                    Err(_) => None,
                };
                match token {
                    Some(t) => *world.admin.write().await = t,
                    None => eprintln!("could not renew the admin token; retrying in 5 minutes"),
                }
            }
        })
    };

    // ---- the run --------------------------------------------------------------------------------
    let stats = Arc::new(Mutex::new(Stats::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..a.concurrency)
        .map(|w| {
            let (world, stats, stop, done) = (world.clone(), stats.clone(), stop.clone(), done.clone());
            tokio::spawn(async move {
                let mut token = world.token(w).await.unwrap();
                let mut i = w;
                while !stop.load(Ordering::Relaxed) {
                    let op = MIX[i % MIX.len()];
                    // Work on one node; introspection on the next one (another node's token).
                    let node = i + w / MIX.len() + usize::from(op == Op::Introspect);
                    let start = Instant::now();
                    let outcome = world.run(op, node, &mut token).await;
                    let us = u32::try_from(start.elapsed().as_micros()).unwrap_or(u32::MAX);
                    let mut s = stats.lock().unwrap();
                    let k = op_index(op);
                    s.latencies[k].push(us);
                    if let Err(e) = outcome {
                        s.errors[k] += 1;
                        if s.first_errors.len() < 20 {
                            s.first_errors.push(e);
                        }
                    }
                    drop(s);
                    done.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                }
            })
        })
        .collect();
    println!(
        "load: {} node(s) on PostgreSQL + 1 gateway, {} clients, {} s; mix per 20: 8 token, 4 introspection (other node), 4 session validation, 3 gateway, 1 certificate",
        a.nodes, a.concurrency, a.duration
    );
    let started = Instant::now();
    let mut procs: Vec<(&str, &Proc)> = nodes.iter().map(|n| ("node", n)).collect();
    procs.push(("gateway", &gw));
    let mut memory: Vec<Vec<u64>> = vec![procs.iter().map(|(_, p)| p.rss_kib()).collect()];
    let mut last = 0;
    while started.elapsed() < Duration::from_secs(a.duration) {
        tokio::time::sleep(
            Duration::from_secs(a.report_every.min(a.duration))
                .min(Duration::from_secs(a.duration).saturating_sub(started.elapsed())),
        )
        .await;
        let n = done.load(Ordering::Relaxed);
        let rss: Vec<u64> = procs.iter().map(|(_, p)| p.rss_kib()).collect();
        let errors: u64 = stats.lock().unwrap().errors.iter().sum();
        println!(
            "  t={:>5}s  {:>8.0} ops/s  errors {errors}  rss MiB {:?}",
            started.elapsed().as_secs(),
            (n - last) as f64 / a.report_every.min(a.duration) as f64,
            rss.iter().map(|k| k / 1024).collect::<Vec<_>>()
        );
        last = n;
        memory.push(rss);
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.await;
    }
    renewal.abort();
    let elapsed = started.elapsed().as_secs_f64();

    // ---- the report -----------------------------------------------------------------------------
    let mut s = stats.lock().unwrap();
    let total: usize = s.latencies.iter().map(Vec::len).sum();
    let errors: u64 = s.errors.iter().sum();
    println!(
        "\n{:<14} {:>9} {:>10} {:>8} {:>8} {:>8} {:>8} {:>7}",
        "operation", "count", "per s", "p50 ms", "p90 ms", "p99 ms", "max ms", "errors"
    );
    for (k, op) in OPS.iter().enumerate() {
        let v = &mut s.latencies[k];
        v.sort_unstable();
        println!(
            "{:<14} {:>9} {:>10.1} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>7}",
            format!("{op:?}").to_lowercase(),
            v.len(),
            v.len() as f64 / elapsed,
            percentile(v, 0.50),
            percentile(v, 0.90),
            percentile(v, 0.99),
            percentile(v, 1.0),
            s.errors[k]
        );
    }
    println!("{:<14} {:>9} {:>10.1}", "all", total, total as f64 / elapsed);
    for e in &s.first_errors {
        println!("error: {e}");
    }
    let first = memory.get(1).unwrap_or(&memory[0]);
    let end = memory.last().unwrap();
    for (i, (kind, _)) in procs.iter().enumerate() {
        println!(
            "memory {kind} {i}: start {} MiB, after the first interval {} MiB, end {} MiB",
            memory[0][i] / 1024,
            first[i] / 1024,
            end[i] / 1024
        );
    }
    for n in &nodes {
        let log = n.log();
        let logged: Vec<&str> = log.lines().filter(|l| l.contains(" ERROR ")).take(5).collect();
        if !logged.is_empty() {
            println!("node logged errors:\n{}", logged.join("\n"));
        }
    }
    errors == 0
}
