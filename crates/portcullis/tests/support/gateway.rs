//! The gateway seen from outside, shared by `gateway_e2e.rs` and `cluster_e2e.rs` (each
//! includes this file with `#[path]`): an upstream that echoes what it received, `curl` against
//! the gateway (`Gw`, `Reply`), and a standalone `portcullis gateway` process (`Standalone`).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::support;

/// How long a revocation may take to reach the gateway.
pub const PROPAGATION: Duration = Duration::from_secs(5);

/// The upstream: answers every request with a JSON echo of its method, path and headers.
pub async fn start_echo() -> (String, tokio::task::JoinHandle<()>) {
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

pub fn write(path: &Path, text: &str) -> PathBuf {
    std::fs::write(path, text).unwrap();
    path.to_owned()
}

pub fn sh(dir: &Path, script: &str) {
    let out = Command::new("sh").arg("-c").arg(script).current_dir(dir).output().unwrap();
    assert!(out.status.success(), "{script}: {}", String::from_utf8_lossy(&out.stderr));
}

/// One `curl` exchange with the gateway.
#[derive(Debug)]
pub struct Reply {
    /// 0 when the TLS handshake or connection failed.
    pub status: u16,
    pub headers: String,
    pub body: String,
    /// curl's exit code.
    pub exit: i32,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
        })
    }
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }
    /// The upstream saw this request header (the echo's view).
    pub fn upstream_header(&self, name: &str) -> Option<String> {
        self.json()["headers"][name].as_str().map(str::to_owned)
    }
    #[track_caller]
    pub fn refused(&self, status: u16, needle: &str) -> &Self {
        assert_eq!(self.status, status, "{self:?}");
        let err = self.header("x-error").unwrap_or_else(|| panic!("no x-error: {self:?}"));
        assert!(err.contains(needle), "x-error {err:?} lacks {needle:?}");
        assert!(self.header("x-error-id").is_some_and(|id| !id.is_empty()), "no x-error-id: {self:?}");
        self
    }
}

/// The gateway as `curl` sees it.
pub struct Gw {
    pub url: String,
    pub ca: PathBuf,
    pub dir: PathBuf,
}

impl Gw {
    /// `curl` with `args` (headers, client certificate…) to `path`.
    pub fn curl(&self, path: &str, args: &[&str]) -> Reply {
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
    pub fn bearer(&self, path: &str, token: &str) -> Reply {
        self.curl(path, &["-H", &format!("Authorization: Bearer {token}")])
    }
    pub fn with_cert(&self, path: &str, cert: &Path, key: &Path, extra: &[&str]) -> Reply {
        let (c, k) = (cert.to_str().unwrap().to_owned(), key.to_str().unwrap().to_owned());
        let mut args = vec!["--cert", &c, "--key", &k];
        args.extend_from_slice(extra);
        self.curl(path, &args)
    }
    /// Repeats `check` until it holds or `PROPAGATION` passes; returns how long it took.
    pub fn eventually(&self, what: &str, mut check: impl FnMut() -> bool) -> Duration {
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

/// `portcullis gateway`, killed when dropped.
pub struct Standalone {
    child: std::process::Child,
    pub output: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Standalone {
    pub fn start(config: &Path, secret: &str) -> (Standalone, u16) {
        let mut child = support::portcullis_command(&[("PORTCULLIS_GATEWAY_CLIENT_SECRET", secret)], false)
            .arg("gateway")
            .arg("--config")
            .arg(config)
            .spawn()
            .unwrap();
        let output = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        for stream in [
            Box::new(child.stderr.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stdout.take().unwrap()),
        ] {
            let output = output.clone();
            std::thread::spawn(move || {
                use std::io::BufRead;
                for line in std::io::BufReader::new(stream).lines().map_while(Result::ok) {
                    let mut o = output.lock().unwrap();
                    o.push_str(&line);
                    o.push('\n');
                }
            });
        }
        let me = Standalone { child, output };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = me.output.lock().unwrap().clone();
            if let Some(port) = out
                .lines()
                .find_map(|l| l.split("gateway listening on https://").nth(1))
                .and_then(|a| a.split(|c: char| c.is_whitespace() || c == '"').next())
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| p.parse().ok())
            {
                return (me, port);
            }
            assert!(Instant::now() < deadline, "the standalone gateway did not start:\n{out}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Standalone {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A transport certificate for application `app` of `acme`, issued through `c` from a CSR made
/// with `openssl` in `dir`: (certificate + chain path, key path, certificate id).
pub async fn transport_certificate(
    c: &support::Client,
    admin: &str,
    dir: &Path,
    app: &str,
    name: &str,
) -> (PathBuf, PathBuf, String) {
    sh(
        dir,
        &format!(
            "openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout {name}.key \
             -subj '/CN=acme${app}/O=acme' -out {name}.csr"
        ),
    );
    let csr = std::fs::read_to_string(dir.join(format!("{name}.csr"))).unwrap();
    let r = c
        .post(
            "/api/v1/organisations/acme/certificates",
            &support::Cred::Bearer(admin),
            &json!({ "type": "transport", "application": app, "csr": csr }),
        )
        .await;
    r.expect(201);
    let cert = write(&dir.join(format!("{name}.crt")), &format!("{}{}", r.str("certificate_pem"), r.str("chain_pem")));
    (cert, dir.join(format!("{name}.key")), r.str("id"))
}

/// The configuration of a standalone gateway signing in as application `client_id` at
/// `issuer`, listening on a free port for `localhost` with `mtls`, and then `routes` (TOML).
pub fn standalone_config(issuer: &str, client_id: &str, mtls: &str, routes: &str) -> String {
    format!(
        "issuer = \"{issuer}\"\nclient_id = \"{client_id}\"\nops_listen = \"127.0.0.1:0\"\n\n\
         [gateway]\nlisten = \"127.0.0.1:0\"\nserver_names = [\"localhost\"]\nmtls = \"{mtls}\"\n{routes}"
    )
}
