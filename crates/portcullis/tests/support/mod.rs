//! What the end-to-end test binaries (`e2e.rs`, `auth_e2e.rs`, `pki_e2e.rs`, `cert_cli_e2e.rs`,
//! `oidc_e2e.rs`, `crash_e2e.rs`) share: the process harness that runs the real `portcullis` binary (a clean `PORTCULLIS_*`
//! environment with known admin secrets, pipes drained on threads, waiting for a line or an exit
//! with a deadline, a `serve` on a free port that is stopped with SIGTERM or SIGKILL, or killed on drop), the
//! HTTP client side (every response checked: never a 5xx, every refusal with `x-error` and
//! `x-error-id`; credentials; client-credentials tokens), throwaway PostgreSQL databases, the
//! runner of the Python helpers (`tests/e2e/*.py`), the real SMTP server the mail tests read
//! codes and links from (`tests/e2e/smtp_sink.py`: `Sink`, `Mail`), and the organisation `acme`
//! with its service `payments` that the tests start from. What one binary alone needs stays in
//! that file.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use reqwest::Method;
use reqwest::header::HeaderMap;
use serde_json::{Value, json};

pub const BIN: &str = env!("CARGO_BIN_EXE_portcullis");
pub const ADMIN_ID: &str = "portcullis$admin";
/// 43 printable ASCII characters, like a generated secret.
pub const ADMIN_SECRET: &str = "e2e-admin-client-secret-0123456789abcdefghi";
pub const ADMIN_PASSWORD: &str = "e2e-admin-password-0123456";
/// The audience of the service `payments` of `acme`.
pub const PAYMENTS_AUD: &str = "https://payments.acme.test";
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

// ------------------------------------------------------------------------------ processes --

/// A `portcullis` command with a clean `PORTCULLIS_*` environment, and the known admin secrets
/// if `known_secrets` (otherwise the server generates and prints them).
pub fn portcullis_command(envs: &[(&str, &str)], known_secrets: bool) -> Command {
    let mut cmd = Command::new(BIN);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("PORTCULLIS_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("RUST_LOG", "info").env("NO_COLOR", "1");
    if known_secrets {
        cmd.env("PORTCULLIS_ADMIN_CLIENT_SECRET", ADMIN_SECRET).env("PORTCULLIS_ADMIN_PASSWORD", ADMIN_PASSWORD);
    }
    cmd.envs(envs.iter().copied());
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd
}

/// Copies a pipe into `buf` line by line, forwarding each line to `tx` if given.
pub fn drain<R: Read + Send + 'static>(
    pipe: R,
    buf: Arc<Mutex<String>>,
    tx: Option<mpsc::Sender<String>>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut r = BufReader::new(pipe);
        let mut line = Vec::new();
        loop {
            line.clear();
            match r.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let text = String::from_utf8_lossy(&line).into_owned();
                    buf.lock().unwrap().push_str(&text);
                    if let Some(tx) = &tx {
                        let _ = tx.send(text);
                    }
                }
            }
        }
    })
}

/// The child's exit status, or `None` if it is still running after `timeout`.
pub fn wait_deadline(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return Some(st);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits for the first line `pick` accepts (`None` if the pipe closed first), or panics.
pub fn wait_line<T>(
    rx: &mpsc::Receiver<String>,
    child: &mut Child,
    what: &str,
    log: &Mutex<String>,
    pick: impl Fn(&str) -> Option<T>,
) -> T {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => {
                if let Some(v) = pick(&line) {
                    return v;
                }
            }
            Err(RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{what} did not start within {START_TIMEOUT:?}; output:\n{}", log.lock().unwrap());
            }
            Err(RecvTimeoutError::Disconnected) => {
                let st = wait_deadline(child, EXIT_TIMEOUT);
                panic!("{what} exited before it was ready ({st:?}); output:\n{}", log.lock().unwrap());
            }
        }
    }
}

/// `http://ADDR:PORT` from a log line saying `listening on http://ADDR:PORT` (text or JSON).
pub fn parse_listening(line: &str) -> Option<String> {
    let at = line.find("listening on http://")? + "listening on ".len();
    let url: String = line[at..].chars().take_while(|c| c.is_ascii_alphanumeric() || ".:/[]-".contains(*c)).collect();
    Some(url)
}

/// Which of a server's output `Server::wait_output` watches.
#[derive(Debug, Clone, Copy)]
pub enum Stream {
    Stdout,
    /// Standard output and standard error.
    All,
}

/// A running `portcullis serve`; killed on drop unless stopped.
pub struct Server {
    child: Child,
    /// `http://127.0.0.1:PORT`, also the issuer.
    pub url: String,
    /// `127.0.0.1:PORT`, to restart on the same address (and so keep the issuer).
    pub addr: String,
    pub data_dir: PathBuf,
    stderr: Arc<Mutex<String>>,
    stdout: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
    exited: Option<ExitStatus>,
}

impl Server {
    /// Starts on a free port with the known admin secrets.
    pub fn start(data_dir: &Path, extra_args: &[&str], envs: &[(&str, &str)]) -> Server {
        Server::launch(data_dir, "127.0.0.1:0", extra_args, envs, true)
    }

    pub fn launch(
        data_dir: &Path,
        listen: &str,
        extra_args: &[&str],
        envs: &[(&str, &str)],
        known_secrets: bool,
    ) -> Server {
        let mut child = portcullis_command(envs, known_secrets)
            .arg("serve")
            .arg("--listen")
            .arg(listen)
            .arg("--data-dir")
            .arg(data_dir)
            .args(extra_args)
            .spawn()
            .unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let stdout = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let readers = vec![
            drain(child.stderr.take().unwrap(), stderr.clone(), Some(tx)),
            drain(child.stdout.take().unwrap(), stdout.clone(), None),
        ];
        let url = wait_line(&rx, &mut child, "portcullis serve", &stderr, parse_listening);
        let addr = url.trim_start_matches("http://").to_owned();
        Server { child, url, addr, data_dir: data_dir.to_owned(), stderr, stdout, readers, exited: None }
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    pub fn stdout(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    /// Everything the process wrote: standard output and standard error.
    pub fn output(&self) -> String {
        format!("{}{}", self.stdout(), self.stderr())
    }

    /// Waits up to `timeout` until `stream` contains `needle`; returns all of `stream`.
    pub fn wait_output(&self, stream: Stream, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let out = match stream {
                Stream::Stdout => self.stdout(),
                Stream::All => self.output(),
            };
            if out.contains(needle) {
                return out;
            }
            assert!(Instant::now() < deadline, "{stream:?} never contained {needle:?}:\n{out}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then wait for the exit; the output is complete afterwards.
    pub fn stop_graceful(&mut self) -> ExitStatus {
        let kill = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status().unwrap();
        assert!(kill.success(), "kill -TERM failed");
        let Some(status) = wait_deadline(&mut self.child, EXIT_TIMEOUT) else {
            let _ = self.child.kill();
            let _ = self.child.wait();
            panic!("server did not shut down within {EXIT_TIMEOUT:?} of SIGTERM; stderr:\n{}", self.stderr());
        };
        self.exited = Some(status);
        for h in self.readers.drain(..) {
            h.join().unwrap();
        }
        status
    }

    /// SIGKILL: the process gets no chance to finish anything (a crash, `kill -9`); waits
    /// for the exit, after which the output is complete.
    pub fn kill(&mut self) -> ExitStatus {
        self.child.kill().unwrap();
        let status = self.child.wait().unwrap();
        self.exited = Some(status);
        for h in self.readers.drain(..) {
            h.join().unwrap();
        }
        status
    }

    /// The buffer standard error is copied into, to watch the log from other tasks.
    pub fn stderr_buffer(&self) -> Arc<Mutex<String>> {
        self.stderr.clone()
    }

    /// Stops with SIGTERM and asserts a clean exit (status 0, logged).
    pub fn stop_clean(&mut self) {
        let status = self.stop_graceful();
        assert!(
            status.success(),
            "SIGTERM must shut down gracefully with status 0, got {status:?}; stderr:\n{}",
            self.stderr()
        );
        assert!(self.stderr().contains("shut down cleanly"), "stderr:\n{}", self.stderr());
    }

    /// The server logged no error (a 500, a failed background task, ...).
    pub fn assert_no_logged_errors(&self) {
        let errors: Vec<String> = self
            .stderr()
            .lines()
            .filter(|l| l.contains(" ERROR ") || l.contains("\"level\":\"ERROR\""))
            .map(str::to_owned)
            .collect();
        assert!(errors.is_empty(), "the server logged errors:\n{}", errors.join("\n"));
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- server {} output ----\n{}", self.url, self.output());
        }
    }
}

/// Runs `cmd` (its output piped, as [`portcullis_command`] sets it) to completion; killed and
/// failed after `EXIT_TIMEOUT`. Returns the status, standard output and standard error.
pub fn run_to_end(mut cmd: Command, what: &str) -> (ExitStatus, String, String) {
    let mut child = cmd.spawn().unwrap();
    let (out, err) = (Arc::new(Mutex::new(String::new())), Arc::new(Mutex::new(String::new())));
    let h1 = drain(child.stdout.take().unwrap(), out.clone(), None);
    let h2 = drain(child.stderr.take().unwrap(), err.clone(), None);
    let Some(status) = wait_deadline(&mut child, EXIT_TIMEOUT) else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("{what} did not exit within {EXIT_TIMEOUT:?}; stderr:\n{}", err.lock().unwrap());
    };
    h1.join().unwrap();
    h2.join().unwrap();
    let stdout = out.lock().unwrap().clone();
    let stderr = err.lock().unwrap().clone();
    (status, stdout, stderr)
}

/// Runs `portcullis ARGS` (with the known admin secrets) to completion.
pub fn run_cli(args: &[&str], envs: &[(&str, &str)]) -> (ExitStatus, String, String) {
    let mut cmd = portcullis_command(envs, true);
    cmd.args(args);
    run_to_end(cmd, &format!("portcullis {args:?}"))
}

/// Hex of `bytes` bytes from the OS CSPRNG: unique, unguessable names and test secrets.
pub fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom").unwrap().read_exact(&mut b).unwrap();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

// ----------------------------------------------------------------------------------- HTTP --

pub fn http() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(30)).build().unwrap()
}

/// An HTTP client that follows no redirects (and, like every client here, keeps no cookies).
pub fn http_no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: HeaderMap,
    pub text: String,
    pub json: Value,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    pub fn x_error(&self) -> &str {
        self.header("x-error").unwrap_or_default()
    }
    #[track_caller]
    pub fn expect(&self, status: u16) -> &Self {
        assert_eq!(self.status, status, "unexpected status; x-error {:?}; body {}", self.header("x-error"), self.text);
        self
    }
    /// The string field `field` of the JSON body.
    #[track_caller]
    pub fn str(&self, field: &str) -> String {
        self.json[field].as_str().unwrap_or_else(|| panic!("no string {field:?} in {}", self.text)).to_owned()
    }
}

/// Sends a request. Every response: never a 5xx; every non-2xx carries `x-error` and `x-error-id`.
#[track_caller]
pub fn send(rb: reqwest::RequestBuilder) -> impl std::future::Future<Output = Resp> {
    let caller = std::panic::Location::caller();
    async move {
        let r = rb.send().await.unwrap_or_else(|e| panic!("{caller}: request failed: {e}"));
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let text = r.text().await.unwrap();
        let json = serde_json::from_str(&text).unwrap_or(Value::Null);
        assert!(status < 500, "{caller}: server error {status}: {text}");
        if !(200..300).contains(&status) {
            for h in ["x-error", "x-error-id"] {
                assert!(headers.contains_key(h), "{caller}: {status} response without {h}: {headers:?} {text}");
            }
        }
        Resp { status, headers, text, json }
    }
}

/// The credential a request carries.
pub enum Cred<'a> {
    None,
    Bearer(&'a str),
    /// An API key and its secret.
    Key(&'a str, &'a str),
}

/// Talks to one server; each request carries the credential it is given.
pub struct Client {
    http: reqwest::Client,
    base: String,
}

impl Client {
    pub fn new(s: &Server) -> Client {
        Client { http: http(), base: s.url.clone() }
    }
    pub fn request(&self, method: Method, path: &str, cred: &Cred<'_>) -> reqwest::RequestBuilder {
        let rb = self.http.request(method, format!("{}{path}", self.base));
        match cred {
            Cred::None => rb,
            Cred::Bearer(t) => rb.bearer_auth(t),
            Cred::Key(k, s) => rb.header("api-key", *k).header("api-secret", *s),
        }
    }
    /// Sends the request, with `body` as JSON if given.
    #[track_caller]
    pub fn call(
        &self,
        method: Method,
        path: &str,
        cred: &Cred<'_>,
        body: Option<&Value>,
    ) -> impl Future<Output = Resp> + use<> {
        let mut rb = self.request(method, path, cred);
        if let Some(b) = body {
            rb = rb.json(b);
        }
        send(rb)
    }
    #[track_caller]
    pub fn post(&self, path: &str, cred: &Cred<'_>, body: &Value) -> impl Future<Output = Resp> + use<> {
        self.call(Method::POST, path, cred, Some(body))
    }
    #[track_caller]
    pub fn get(&self, path: &str, cred: &Cred<'_>) -> impl Future<Output = Resp> + use<> {
        self.call(Method::GET, path, cred, None)
    }
    #[track_caller]
    pub fn delete(&self, path: &str, cred: &Cred<'_>) -> impl Future<Output = Resp> + use<> {
        self.call(Method::DELETE, path, cred, None)
    }
}

/// A client_credentials token request with HTTP Basic authentication.
pub async fn token_request(s: &Server, client_id: &str, secret: &str, form: &[(&str, &str)]) -> Resp {
    let mut params = vec![("grant_type", "client_credentials")];
    params.extend_from_slice(form);
    send(http().post(format!("{}/oauth2/token", s.url)).basic_auth(client_id, Some(secret)).form(&params)).await
}

/// An access token for the client, which must get one.
pub async fn access_token(s: &Server, client_id: &str, secret: &str) -> String {
    let r = token_request(s, client_id, secret, &[]).await;
    r.expect(200);
    r.str("access_token")
}

/// An admin access token, for the admin API.
pub async fn admin_token(s: &Server) -> String {
    access_token(s, ADMIN_ID, ADMIN_SECRET).await
}

/// Creates organisation `acme` and its service `payments` (audience `PAYMENTS_AUD`, roles
/// `payments:reader` and `payments:admin`) with the admin access token `admin`; returns the
/// answer to the service's creation.
pub async fn create_acme_payments(c: &Client, admin: &str) -> Resp {
    let admin = Cred::Bearer(admin);
    c.post("/api/v1/organisations", &admin, &json!({ "slug": "acme", "name": "Acme" })).await.expect(201);
    let svc = c
        .post(
            "/api/v1/organisations/acme/services",
            &admin,
            &json!({
                "slug": "payments",
                "name": "Payments",
                "audience": PAYMENTS_AUD,
                "scopes": ["payments/read", "payments/write"],
                "roles": ["payments:reader", "payments:admin"],
                "permissions": ["payments.invoice.read", "payments.invoice.write"],
                "grants": { "payments:reader": ["payments.invoice.read"] },
            }),
        )
        .await;
    svc.expect(201);
    svc
}

// ---- PostgreSQL ------------------------------------------------------------------------

pub fn with_db_name(url: &str, db: &str) -> String {
    let (base, query) = url.split_once('?').map_or((url, None), |(b, q)| (b, Some(q)));
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let host_part = base[scheme_end..].find('/').map_or(base, |i| &base[..scheme_end + i]);
    match query {
        Some(q) => format!("{host_part}/{db}?{q}"),
        None => format!("{host_part}/{db}"),
    }
}

pub fn psql(url: &str, sql: &str) -> Result<(), String> {
    let out = Command::new("psql")
        .arg(url)
        .args(["-w", "-v", "ON_ERROR_STOP=1", "-Atq", "-c", sql])
        .env("PGCONNECT_TIMEOUT", "10")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run psql ({e}): install the PostgreSQL client"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("psql {sql:?} on {url} failed: {}", String::from_utf8_lossy(&out.stderr)))
    }
}

/// A throwaway database, dropped (forcibly) on drop.
pub struct PgDb {
    admin_url: String,
    name: String,
}

impl PgDb {
    /// A fresh database `<prefix>_<random>` on the server of `admin_url`.
    pub fn create(admin_url: &str, prefix: &str) -> PgDb {
        let name = format!("{prefix}_{}", random_hex(12));
        psql(admin_url, &format!("CREATE DATABASE {name}"))
            .unwrap_or_else(|e| panic!("PostgreSQL at {admin_url} (PORTCULLIS_TEST_PG_URL) is required: {e}"));
        PgDb { admin_url: admin_url.to_owned(), name }
    }
    pub fn url(&self) -> String {
        with_db_name(&self.admin_url, &self.name)
    }
}

impl Drop for PgDb {
    fn drop(&mut self) {
        if let Err(e) = psql(&self.admin_url, &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)) {
            eprintln!("could not drop test database {}: {e}", self.name);
        }
    }
}

// ---- Python helpers ----------------------------------------------------------------------

/// Runs a Python helper; every option is passed as `--name=value` (values may start with `-`).
pub fn python(script: &str, args: &[&str]) -> (bool, Value) {
    let mut argv: Vec<String> = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a.starts_with("--") && !a.contains('=') {
            argv.push(format!("{a}={}", it.next().unwrap()));
        } else {
            argv.push((*a).to_owned());
        }
    }
    let out = Command::new("python3")
        .arg(script)
        .args(&argv)
        .env("NO_PROXY", "*")
        .env("no_proxy", "*")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run python3 ({e}); scripts/test.sh installs python3, authlib, pyjwt"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "{script} {args:?} printed no JSON object ({e}); are authlib, pyjwt[crypto] and requests installed?\nstdout: {stdout}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.success(), v)
}

#[track_caller]
pub fn python_ok(script: &str, args: &[&str]) -> Value {
    let (ok, v) = python(script, args);
    assert!(ok, "{script} {args:?} failed: {v}");
    v
}

/// The SMTP server of the mail tests (`smtp_sink.py`, aiosmtpd).
pub const SINK: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/e2e/smtp_sink.py");
/// The sender the servers of the mail tests are configured with.
pub const FROM: &str = "Portcullis <noreply@example.test>";

// ---- the SMTP sink ---------------------------------------------------------------------

/// The real SMTP server (`smtp_sink.py serve`), with the messages it received.
pub struct Sink {
    pub child: Child,
    /// Closing it also ends the sink (should the test process die without killing it).
    pub _stdin: ChildStdin,
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub output: Arc<Mutex<String>>,
    /// Messages `next_mail` already handed out.
    pub taken: Mutex<BTreeSet<u64>>,
}

/// One delivered message as the sink recorded and Python's `email` module parsed it.
#[derive(Debug, Clone)]
pub struct Mail {
    pub n: u64,
    pub meta: Value,
    pub raw: String,
}

impl Mail {
    pub fn msg(&self) -> &Value {
        assert!(self.meta.get("message").is_some(), "the sink could not parse message {}: {}", self.n, self.meta);
        &self.meta["message"]
    }
    pub fn subject(&self) -> &str {
        self.msg()["subject"].as_str().unwrap()
    }
    pub fn rcpt_tos(&self) -> Vec<String> {
        self.meta["rcpt_tos"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_lowercase()).collect()
    }
    pub fn to_addresses(&self) -> Vec<String> {
        self.msg()["to_addresses"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_lowercase()).collect()
    }
    /// The decoded body of the (only) part of this content type.
    pub fn part(&self, content_type: &str) -> String {
        let parts: Vec<&Value> =
            self.msg()["parts"].as_array().unwrap().iter().filter(|p| p["content_type"] == content_type).collect();
        assert_eq!(parts.len(), 1, "want one {content_type} part: {}", self.meta);
        parts[0]["body"].as_str().unwrap().to_owned()
    }
    /// The code: the one 6-digit number of the text part, also the one of the HTML part.
    pub fn code(&self) -> String {
        let text = six_digit_numbers(&self.part("text/plain"));
        let html = six_digit_numbers(&self.part("text/html"));
        assert_eq!(text.len(), 1, "want one 6-digit code in the text part: {}", self.meta);
        assert_eq!(text, html, "the HTML part must hold the same code: {}", self.meta);
        text.into_iter().next().unwrap()
    }
}

/// The distinct runs of exactly six ASCII digits in `s`.
pub fn six_digit_numbers(s: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut run = String::new();
    for c in s.chars().chain(std::iter::once(' ')) {
        if c.is_ascii_digit() {
            run.push(c);
        } else {
            if run.len() == 6 {
                out.insert(run.clone());
            }
            run.clear();
        }
    }
    out
}

impl Sink {
    /// Starts the sink on a free port; it answers the first `fail_first` deliveries with 451.
    pub fn start(fail_first: u32) -> Sink {
        Sink::launch(&[format!("--fail-first={fail_first}")])
    }

    pub fn launch(args: &[String]) -> Sink {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new("python3")
            .arg(SINK)
            .arg("serve")
            .arg(format!("--dir={}", dir.path().display()))
            .arg("--port=0")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run python3 ({e}); scripts/test.sh installs python3 and aiosmtpd"));
        let output = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        drain(child.stdout.take().unwrap(), output.clone(), Some(tx));
        drain(child.stderr.take().unwrap(), output.clone(), None);
        let stdin = child.stdin.take().unwrap();
        let port = wait_line(&rx, &mut child, "smtp_sink.py (needs: pip install aiosmtpd)", &output, |l| {
            l.trim().strip_prefix("ready ").map(|p| p.parse::<u16>().unwrap())
        });
        Sink { child, _stdin: stdin, dir, port, output, taken: Mutex::new(BTreeSet::new()) }
    }

    /// `PORTCULLIS_SMTP__*`: plain SMTP to this sink.
    pub fn envs(&self) -> Vec<(&'static str, String)> {
        vec![
            ("PORTCULLIS_SMTP__HOST", "127.0.0.1".to_owned()),
            ("PORTCULLIS_SMTP__PORT", self.port.to_string()),
            ("PORTCULLIS_SMTP__SECURITY", "none".to_owned()),
            ("PORTCULLIS_SMTP__FROM", FROM.to_owned()),
        ]
    }

    /// The AUTH attempts the sink refused so far (`auth-failed-NNNN.json`: user, TLS).
    pub fn auth_failures(&self) -> Vec<Value> {
        let mut out: Vec<(String, Value)> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("auth-failed-") && n.ends_with(".json"))
            .map(|n| {
                let v = serde_json::from_slice(&std::fs::read(self.dir.path().join(&n)).unwrap()).unwrap();
                (n, v)
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out.into_iter().map(|(_, v)| v).collect()
    }

    /// Every message received so far, in order.
    pub fn mails(&self) -> Vec<Mail> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(self.dir.path()).unwrap() {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            let Some(stem) = name.strip_suffix(".json") else { continue };
            let Ok(n) = stem.parse::<u64>() else { continue };
            let meta: Value = serde_json::from_slice(&std::fs::read(self.dir.path().join(&name)).unwrap()).unwrap();
            let raw = String::from_utf8_lossy(&std::fs::read(self.dir.path().join(format!("{stem}.eml"))).unwrap())
                .into_owned();
            out.push(Mail { n, meta, raw });
        }
        out.sort_by_key(|m| m.n);
        out
    }

    /// Deliveries answered with 451 so far.
    pub fn rejected(&self) -> usize {
        std::fs::read_dir(self.dir.path())
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("rejected-"))
            .count()
    }

    pub fn mails_to(&self, to: &str) -> Vec<Mail> {
        self.mails().into_iter().filter(|m| m.rcpt_tos() == [to.to_lowercase()]).collect()
    }

    /// The first message to `to` whose subject starts with `subject` and that no earlier call
    /// returned; waits up to `timeout` for it.
    pub async fn next_mail(&self, to: &str, subject: &str, timeout: Duration) -> Mail {
        let deadline = Instant::now() + timeout;
        loop {
            let found = self.mails_to(to).into_iter().find(|m| {
                !self.taken.lock().unwrap().contains(&m.n) && m.msg()["subject"].as_str().unwrap().starts_with(subject)
            });
            if let Some(m) = found {
                self.taken.lock().unwrap().insert(m.n);
                return m;
            }
            assert!(
                Instant::now() < deadline,
                "no mail to {to} with subject {subject:?} within {timeout:?}; the sink has {:?}; its output:\n{}",
                self.mails().iter().map(|m| (m.rcpt_tos(), m.subject().to_owned())).collect::<Vec<_>>(),
                self.output.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
