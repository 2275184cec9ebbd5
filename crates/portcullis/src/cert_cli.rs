//! `portcullis cert …`: the client side of the certificate authority. It talks HTTP to a
//! running server (DESIGN §4, the certificate endpoints) and never opens a database or reads
//! the server's configuration.
//!
//! `request` and `renew` create the private key here (it never leaves this machine), build the
//! CSR with exactly the subject the server's csr-template names, upload it and write the key
//! (PKCS#8 PEM, mode 0600), the certificate, the chain and optionally a PKCS#12 file
//! (PBES2: PBKDF2-HMAC-SHA256 + AES-256-CBC, MAC HMAC-SHA256, so OpenSSL 3 reads it without
//! `-legacy`). Existing files are never overwritten. `list` and `revoke` drive the inventory.
//!
//! Credentials: `--token` / `PORTCULLIS_TOKEN` / `PORTCULLIS_TOKEN_FILE` (an access token or a
//! session token, sent as a bearer token) or `PORTCULLIS_API_KEY` + `PORTCULLIS_API_SECRET`
//! (or `PORTCULLIS_API_SECRET_FILE`), sent as the `api-key` and `api-secret` headers. Secrets
//! are never printed.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use clap::{Args, Subcommand, ValueEnum};
use reqwest::header::{ACCEPT, HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode, Url};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};
use zeroize::Zeroizing;

use crate::config::secret_env;

/// PBKDF2 iterations of the PKCS#12 encryption and MAC keys (OpenSSL 3 uses 2048).
const PKCS12_ITERATIONS: u32 = 10_000;
const HTTP_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Args, Debug)]
pub struct CertCommand {
    #[command(flatten)]
    server: ServerArgs,
    #[command(subcommand)]
    action: CertAction,
}

#[derive(Args, Debug)]
#[command(next_help_heading = "Server")]
struct ServerArgs {
    /// Base URL of the Portcullis server.
    #[arg(long, global = true, env = "PORTCULLIS_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Bearer token: an access token or a session token. Prefer PORTCULLIS_TOKEN or
    /// PORTCULLIS_TOKEN_FILE (a command line is visible to other users); or set
    /// PORTCULLIS_API_KEY and PORTCULLIS_API_SECRET instead.
    #[arg(long, global = true)]
    token: Option<String>,
    /// PEM CA certificate(s) to trust for an https URL (e.g. the server's /pki/ca.pem);
    /// without it the system's roots are used.
    #[arg(long, global = true, value_name = "FILE")]
    cacert: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum CertAction {
    /// Create a key here, have the CA certify it, and write the key, certificate and chain
    /// (and with --pkcs12 a .p12) into --out; prints a JSON summary.
    Request(RequestArgs),
    /// List an organisation's certificates (JSON, or a table with --table).
    List(ListArgs),
    /// Revoke a certificate (the CRL lists it when this returns).
    Revoke(RevokeArgs),
    /// Renew a certificate: a new key here (by default), a new CSR, a new certificate of the
    /// same type for the same application; written like `request`.
    Renew(RenewArgs),
}

/// The certificate profiles (`GET /api/v1/pki/certificate-types`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum CertType {
    /// mTLS client certificate of an application.
    #[value(name = "transport")]
    Transport,
    /// TLS server certificate of a resource server (needs --dns).
    #[value(name = "server-transport")]
    ServerTransport,
    /// private_key_jwt signing key, published in the application's JWKS.
    #[value(name = "signing")]
    Signing,
}

impl CertType {
    fn as_str(self) -> &'static str {
        match self {
            Self::Transport => "transport",
            Self::ServerTransport => "server-transport",
            Self::Signing => "signing",
        }
    }
    fn parse(s: &str) -> anyhow::Result<Self> {
        <Self as ValueEnum>::from_str(s, false).map_err(|_| anyhow!("unknown certificate type {s:?}"))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum KeyType {
    /// EC P-256 (the default).
    #[value(name = "p256")]
    P256,
    /// EC P-384.
    #[value(name = "p384")]
    P384,
    /// RSA 3072 bits.
    #[value(name = "rsa3072")]
    Rsa3072,
    /// RSA 4096 bits.
    #[value(name = "rsa4096")]
    Rsa4096,
    /// Ed25519.
    #[value(name = "ed25519")]
    Ed25519,
}

impl KeyType {
    fn as_str(self) -> &'static str {
        match self {
            Self::P256 => "p256",
            Self::P384 => "p384",
            Self::Rsa3072 => "rsa3072",
            Self::Rsa4096 => "rsa4096",
            Self::Ed25519 => "ed25519",
        }
    }

    /// The key type of a certificate as the server describes it (`EC P-256`, `RSA 2048`, …):
    /// what a renewal makes by default. RSA keys never get shorter (and 2048 becomes 3072).
    fn from_description(d: &str) -> Option<Self> {
        match d {
            "EC P-256" => Some(Self::P256),
            "EC P-384" => Some(Self::P384),
            "Ed25519" => Some(Self::Ed25519),
            _ => match d.strip_prefix("RSA ")?.parse::<u32>().ok()? {
                ..=3072 => Some(Self::Rsa3072),
                _ => Some(Self::Rsa4096),
            },
        }
    }

    fn generate(self) -> anyhow::Result<rcgen::KeyPair> {
        let kp = match self {
            Self::P256 => rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256),
            Self::P384 => rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384),
            Self::Ed25519 => rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519),
            Self::Rsa3072 => rcgen::KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_3072),
            Self::Rsa4096 => rcgen::KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_4096),
        };
        kp.map_err(|e| anyhow!("generating a {} key: {e}", self.as_str()))
    }
}

/// Where and how `request` and `renew` write what they get.
#[derive(Args, Debug)]
struct KeyOutArgs {
    /// Directory for the files (created, mode 0700, if missing). Existing files are never
    /// overwritten.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Type of the key to generate [default: p256; for renew: the old certificate's].
    #[arg(long, value_enum)]
    key_type: Option<KeyType>,
    /// Use this existing PKCS#8 PEM private key instead of generating one (no .key file is
    /// written).
    #[arg(long, value_name = "FILE", conflicts_with = "key_type")]
    key: Option<PathBuf>,
    /// A DNS name of a server-transport certificate (repeatable) [for renew: the old
    /// certificate's].
    #[arg(long = "dns", value_name = "NAME")]
    dns: Vec<String>,
    /// Validity in days (the server's default for the type when absent).
    #[arg(long)]
    validity_days: Option<i64>,
    /// Base name of the files [default: <org>-<app>-<type>].
    #[arg(long)]
    name: Option<String>,
    /// Also write <name>.p12 (key, certificate and chain) for tools that want PKCS#12.
    #[arg(long)]
    pkcs12: bool,
    /// The PKCS#12 password: the file's first line. Without it the password is asked for on
    /// the terminal.
    #[arg(long, value_name = "FILE", requires = "pkcs12")]
    pkcs12_password_file: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct RequestArgs {
    /// Certificate type.
    #[arg(long = "type", value_enum, value_name = "TYPE")]
    cert_type: CertType,
    /// Organisation slug.
    #[arg(long)]
    org: String,
    /// Application slug (or its client id, org$app).
    #[arg(long)]
    app: String,
    #[command(flatten)]
    out: KeyOutArgs,
}

#[derive(Args, Debug)]
struct ListArgs {
    /// Organisation slug.
    #[arg(long)]
    org: String,
    /// Only this application's (slug or client id).
    #[arg(long)]
    app: Option<String>,
    /// Only this type.
    #[arg(long = "type", value_enum, value_name = "TYPE")]
    cert_type: Option<CertType>,
    /// Only this status.
    #[arg(long, value_parser = ["active", "revoked", "expired"])]
    status: Option<String>,
    /// Only those expiring within this many days.
    #[arg(long)]
    expiring_within_days: Option<i64>,
    /// At most this many (the server's default is 100, its maximum 500).
    #[arg(long)]
    limit: Option<u32>,
    /// Skip this many.
    #[arg(long)]
    offset: Option<u64>,
    /// A compact table instead of JSON.
    #[arg(long)]
    table: bool,
}

#[derive(Args, Debug)]
struct RevokeArgs {
    /// Organisation slug.
    #[arg(long)]
    org: String,
    /// The certificate's id.
    #[arg(long)]
    id: String,
    /// unspecified (default), key_compromise, ca_compromise, affiliation_changed,
    /// superseded, cessation_of_operation, privilege_withdrawn or aa_compromise (or the
    /// RFC 5280 code).
    #[arg(long)]
    reason: Option<String>,
}

#[derive(Args, Debug)]
struct RenewArgs {
    /// Organisation slug.
    #[arg(long)]
    org: String,
    /// The id of the certificate to renew.
    #[arg(long)]
    id: String,
    #[command(flatten)]
    out: KeyOutArgs,
}

/// Runs a `cert` command on its own runtime; errors go to standard error.
pub fn main(cmd: CertCommand) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("portcullis: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cmd)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("portcullis: {e:#}");
            ExitCode::FAILURE
        }
    }
}

pub async fn run(cmd: CertCommand) -> anyhow::Result<()> {
    let api = Api::new(&cmd.server)?;
    let out = match cmd.action {
        CertAction::Request(a) => request(&api, a).await?,
        CertAction::List(a) => return list(&api, a).await,
        CertAction::Revoke(a) => revoke(&api, a).await?,
        CertAction::Renew(a) => renew(&api, a).await?,
    };
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

// ---- HTTP ---------------------------------------------------------------------------------

enum Credential {
    Bearer(SecretString),
    ApiKey(String, SecretString),
}

/// Picks the one credential given: a token, or an API key with its secret.
fn pick_credential(
    token: Option<SecretString>,
    api_key: Option<String>,
    api_secret: Option<SecretString>,
) -> anyhow::Result<Credential> {
    let token = token.filter(|t| !t.expose_secret().is_empty());
    let api_key = api_key.filter(|k| !k.is_empty());
    let api_secret = api_secret.filter(|s| !s.expose_secret().is_empty());
    match (token, api_key, api_secret) {
        (Some(_), Some(_), _) => {
            bail!("both a token and PORTCULLIS_API_KEY are set: give one credential")
        }
        (Some(t), None, _) => Ok(Credential::Bearer(t)),
        (None, Some(k), Some(s)) => Ok(Credential::ApiKey(k, s)),
        (None, Some(_), None) => {
            bail!("PORTCULLIS_API_KEY needs PORTCULLIS_API_SECRET (or PORTCULLIS_API_SECRET_FILE)")
        }
        (None, None, _) => bail!(
            "no credentials: set PORTCULLIS_TOKEN (an access or session token; or --token, \
             PORTCULLIS_TOKEN_FILE) or PORTCULLIS_API_KEY and PORTCULLIS_API_SECRET"
        ),
    }
}

/// The base URL: http(s), no query or fragment.
fn base_url(s: &str) -> anyhow::Result<Url> {
    let url = Url::parse(s.trim()).with_context(|| format!("--url {s:?}: expected http(s)://HOST[:PORT]"))?;
    if !matches!(url.scheme(), "http" | "https") || url.query().is_some() || url.fragment().is_some() {
        bail!("--url {s:?}: expected an http(s) URL without query or fragment");
    }
    if url.cannot_be_a_base() || url.host().is_none() {
        bail!("--url {s:?}: expected http(s)://HOST[:PORT]");
    }
    Ok(url)
}

fn is_loopback(url: &Url) -> bool {
    let host = url.host_str().unwrap_or_default();
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|a| a.is_loopback())
}

/// What a refusal says: the server's `x-error` and `x-error-id`.
fn refusal(status: StatusCode, headers: &HeaderMap, body: &str) -> anyhow::Error {
    let header = |n: &str| headers.get(n).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let message = header("x-error").unwrap_or_else(|| {
        let b: String = body.chars().take(300).filter(|c| !c.is_control()).collect();
        if b.is_empty() { status.canonical_reason().unwrap_or("error").to_owned() } else { b }
    });
    let id = header("x-error-id").map(|i| format!(" (x-error-id {i})")).unwrap_or_default();
    let hint = if status == StatusCode::UNAUTHORIZED {
        "; check the token or API key (PORTCULLIS_TOKEN, PORTCULLIS_API_KEY + PORTCULLIS_API_SECRET)"
    } else {
        ""
    };
    anyhow!("the server refused: {} {message}{id}{hint}", status.as_u16())
}

struct Api {
    http: reqwest::Client,
    base: Url,
    credential: Credential,
}

impl Api {
    fn new(args: &ServerArgs) -> anyhow::Result<Self> {
        let base = base_url(&args.url)?;
        let token = match &args.token {
            Some(t) => Some(SecretString::from(t.clone())),
            None => secret_env("TOKEN")?,
        };
        let api_key = std::env::var("PORTCULLIS_API_KEY").ok();
        let credential = pick_credential(token, api_key, secret_env("API_SECRET")?)?;
        let mut builder = reqwest::Client::builder()
            .timeout(HTTP_TIMEOUT)
            // Credentials go to the given server only.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("portcullis-cli/", env!("CARGO_PKG_VERSION")));
        if let Some(path) = &args.cacert {
            if base.scheme() != "https" {
                bail!("--cacert is for an https --url (got {base})");
            }
            let pem = std::fs::read(path).with_context(|| format!("reading --cacert {}", path.display()))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .with_context(|| format!("--cacert {}: expected PEM certificates", path.display()))?;
            if certs.is_empty() {
                bail!("--cacert {}: no PEM certificate in it", path.display());
            }
            builder = builder.tls_certs_only(certs);
        }
        if base.scheme() == "http" && !is_loopback(&base) {
            eprintln!("portcullis: warning: sending credentials over plain http to {base}");
        }
        Ok(Self { http: builder.build().context("building the HTTP client")?, base, credential })
    }

    /// `base` + the path segments (each percent-encoded) + the query pairs.
    fn url(&self, segments: &[&str], query: &[(&str, String)]) -> anyhow::Result<Url> {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .map_err(|()| anyhow!("--url {} cannot carry a path", self.base))?
            .pop_if_empty()
            .extend(segments);
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query.iter().map(|(k, v)| (*k, v.as_str())));
        }
        Ok(url)
    }

    /// Sends a request and returns its JSON answer; a non-2xx answer becomes an error that
    /// carries the server's `x-error` and `x-error-id`.
    async fn call(&self, method: Method, url: Url, body: Option<&Value>) -> anyhow::Result<Value> {
        let mut rb = self.http.request(method, url.clone()).header(ACCEPT, "application/json");
        rb = match &self.credential {
            Credential::Bearer(t) => rb.bearer_auth(t.expose_secret()),
            Credential::ApiKey(k, s) => {
                let mut secret = HeaderValue::from_str(s.expose_secret())
                    .map_err(|_| anyhow!("PORTCULLIS_API_SECRET is not a valid header value"))?;
                secret.set_sensitive(true);
                rb.header("api-key", k).header("api-secret", secret)
            }
        };
        if let Some(b) = body {
            rb = rb.json(b);
        }
        let what = format!("{} {}", url.origin().ascii_serialization(), url.path());
        let resp = rb.send().await.with_context(|| format!("cannot reach {what}"))?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let text = resp.text().await.with_context(|| format!("reading the answer of {what}"))?;
        if !status.is_success() {
            return Err(refusal(status, &headers, &text));
        }
        serde_json::from_str(&text).with_context(|| format!("{what} answered {status} without JSON"))
    }

    async fn get(&self, segments: &[&str], query: &[(&str, String)]) -> anyhow::Result<Value> {
        self.call(Method::GET, self.url(segments, query)?, None).await
    }

    async fn post(&self, segments: &[&str], body: &Value) -> anyhow::Result<Value> {
        self.call(Method::POST, self.url(segments, &[])?, Some(body)).await
    }
}

const ORGS: [&str; 3] = ["api", "v1", "organisations"];

fn org_path<'a>(org: &'a str, rest: &[&'a str]) -> Vec<&'a str> {
    ORGS.iter().copied().chain([org]).chain(rest.iter().copied()).collect()
}

/// A string field of a JSON answer.
fn field<'a>(v: &'a Value, name: &str) -> anyhow::Result<&'a str> {
    v.get(name).and_then(Value::as_str).ok_or_else(|| anyhow!("the server's answer has no {name:?}"))
}

// ---- list and revoke ----------------------------------------------------------------------

async fn list(api: &Api, a: ListArgs) -> anyhow::Result<()> {
    let mut q: Vec<(&str, String)> = Vec::new();
    if let Some(app) = a.app {
        q.push(("application", app));
    }
    if let Some(t) = a.cert_type {
        q.push(("type", t.as_str().to_owned()));
    }
    if let Some(s) = a.status {
        q.push(("status", s));
    }
    if let Some(d) = a.expiring_within_days {
        q.push(("expiring_within_days", d.to_string()));
    }
    if let Some(l) = a.limit {
        q.push(("limit", l.to_string()));
    }
    if let Some(o) = a.offset {
        q.push(("offset", o.to_string()));
    }
    let v = api.get(&org_path(&a.org, &["certificates"]), &q).await?;
    let items = v.get("items").and_then(Value::as_array).ok_or_else(|| anyhow!("the server's answer has no items"))?;
    if a.table {
        print!("{}", table(items));
    } else {
        println!("{}", serde_json::to_string_pretty(items)?);
    }
    Ok(())
}

/// A compact table of certificates, one per line, columns padded.
fn table(items: &[Value]) -> String {
    const COLS: [(&str, &str); 7] = [
        ("ID", "id"),
        ("SERIAL", "serial"),
        ("TYPE", "type"),
        ("APPLICATION", "application"),
        ("STATUS", "status"),
        ("NOT_AFTER", "not_after"),
        ("KEY", "key_type"),
    ];
    let rows: Vec<Vec<String>> =
        std::iter::once(COLS.iter().map(|(h, _)| (*h).to_owned()).collect())
            .chain(items.iter().map(|it| {
                COLS.iter().map(|(_, k)| it.get(*k).and_then(Value::as_str).unwrap_or("-").to_owned()).collect()
            }))
            .collect();
    let mut widths = [0usize; COLS.len()];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row.iter().zip(widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

async fn revoke(api: &Api, a: RevokeArgs) -> anyhow::Result<Value> {
    let body = match a.reason {
        Some(r) => json!({ "reason": r }),
        None => json!({}),
    };
    let mut v = api.post(&org_path(&a.org, &["certificates", &a.id, "revoke"]), &body).await?;
    if let Some(o) = v.as_object_mut() {
        o.remove("certificate_pem");
    }
    Ok(v)
}

// ---- request and renew --------------------------------------------------------------------

/// What a new certificate is uploaded for.
enum Upload<'a> {
    Issue { cert_type: CertType, application: &'a str },
    Renew { id: &'a str },
}

async fn request(api: &Api, a: RequestArgs) -> anyhow::Result<Value> {
    let app = a.app.rsplit_once('$').map_or(a.app.as_str(), |(_, slug)| slug);
    let upload = Upload::Issue { cert_type: a.cert_type, application: &a.app };
    certify(api, &a.org, app, a.cert_type, &a.out, upload, KeyType::P256, Vec::new()).await
}

async fn renew(api: &Api, a: RenewArgs) -> anyhow::Result<Value> {
    let old = api.get(&org_path(&a.org, &["certificates", &a.id]), &[]).await?;
    let cert_type = CertType::parse(field(&old, "type")?)?;
    let client_id = field(&old, "application")?;
    let app = client_id.rsplit_once('$').map_or(client_id, |(_, slug)| slug);
    let key_type = old.get("key_type").and_then(Value::as_str).and_then(KeyType::from_description);
    let dns = old
        .get("sans")
        .and_then(Value::as_array)
        .map(|s| s.iter().filter_map(|n| n.as_str()?.strip_prefix("DNS:").map(str::to_owned)).collect())
        .unwrap_or_default();
    let upload = Upload::Renew { id: &a.id };
    certify(api, &a.org, app, cert_type, &a.out, upload, key_type.unwrap_or(KeyType::P256), dns).await
}

/// The files `request` and `renew` write.
#[derive(Debug)]
struct OutFiles {
    /// `None` when an existing key is used.
    key: Option<PathBuf>,
    certificate: PathBuf,
    chain: PathBuf,
    pkcs12: Option<PathBuf>,
}

impl OutFiles {
    fn new(dir: &Path, base: &str, write_key: bool, pkcs12: bool) -> Self {
        let p = |ext: &str| dir.join(format!("{base}.{ext}"));
        Self {
            key: write_key.then(|| p("key")),
            certificate: p("crt"),
            chain: p("chain.pem"),
            pkcs12: pkcs12.then(|| p("p12")),
        }
    }

    fn all(&self) -> impl Iterator<Item = &PathBuf> {
        self.key.iter().chain([&self.certificate, &self.chain]).chain(self.pkcs12.iter())
    }

    fn refuse_existing(&self) -> anyhow::Result<()> {
        for p in self.all() {
            if p.symlink_metadata().is_ok() {
                bail!("{} exists: refusing to overwrite it (choose another --out or --name)", p.display());
            }
        }
        Ok(())
    }
}

/// A file base name: letters, digits, `.`, `_`, `-`, not starting with `.`.
fn check_base_name(name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && !name.starts_with('.')
        && name.len() <= 200
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        bail!("--name {name:?}: expected letters, digits, '.', '_' and '-', not starting with '.'")
    }
}

/// Creates `path` (it must not exist) with `mode` on Unix and writes `data` to it.
fn create_new(path: &Path, mode: u32, data: &[u8]) -> anyhow::Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut f = opts.open(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(data).and_then(|()| f.sync_all()).with_context(|| format!("writing {}", path.display()))
}

fn ensure_dir(dir: &Path) -> anyhow::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(0o700);
    }
    b.create(dir).with_context(|| format!("creating directory {}", dir.display()))
}

/// `CN` and `O` from the template's `subject_openssl` (`/CN=org$app/O=org`).
fn template_subject(template: &Value) -> anyhow::Result<(String, String)> {
    let s = field(template, "subject_openssl")?;
    let mut cn = None;
    let mut o = None;
    for part in s.strip_prefix('/').unwrap_or(s).split('/') {
        match part.split_once('=') {
            Some(("CN", v)) if cn.is_none() => cn = Some(v.to_owned()),
            Some(("O", v)) if o.is_none() => o = Some(v.to_owned()),
            _ => bail!("the csr-template's subject {s:?} is not CN=…/O=…"),
        }
    }
    match (cn, o) {
        (Some(cn), Some(o)) if !cn.is_empty() && !o.is_empty() => Ok((cn, o)),
        _ => bail!("the csr-template's subject {s:?} is not CN=…/O=…"),
    }
}

/// A PKCS#10 request for `key` with the subject `CN=cn, O=org` and the DNS names as SANs.
fn build_csr(key: &rcgen::KeyPair, cn: &str, org: &str, dns: &[String]) -> anyhow::Result<String> {
    let mut params = rcgen::CertificateParams::new(dns.to_vec()).map_err(|e| anyhow!("--dns: {e}"))?;
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, cn);
    dn.push(rcgen::DnType::OrganizationName, org);
    params.distinguished_name = dn;
    let csr = params.serialize_request(key).map_err(|e| anyhow!("building the CSR: {e}"))?;
    csr.pem().map_err(|e| anyhow!("encoding the CSR: {e}"))
}

/// An existing PKCS#8 PEM key (`-----BEGIN PRIVATE KEY-----`).
fn load_key(path: &Path) -> anyhow::Result<rcgen::KeyPair> {
    let text = Zeroizing::new(std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?);
    let der = Zeroizing::new(
        portcullis_core::pki::pem_decode(&text, &["PRIVATE KEY"], "--key (PKCS#8 PEM)")
            .with_context(|| format!("{} (convert with: openssl pkcs8 -topk8 -nocrypt)", path.display()))?,
    );
    rcgen::KeyPair::try_from(der.as_slice()).map_err(|e| anyhow!("{}: not a usable private key: {e}", path.display()))
}

/// The PKCS#12 password: the file's first line (without its line ending), or asked twice on
/// the terminal without echo.
fn pkcs12_password(file: Option<&Path>) -> anyhow::Result<Zeroizing<String>> {
    let password = match file {
        Some(f) => {
            let text = Zeroizing::new(
                std::fs::read_to_string(f)
                    .with_context(|| format!("reading --pkcs12-password-file {}", f.display()))?,
            );
            first_line(&text)
        }
        None => {
            if !std::io::stdin().is_terminal() {
                bail!(
                    "--pkcs12 needs a password and there is no terminal to ask it on: use --pkcs12-password-file FILE"
                );
            }
            let a = Zeroizing::new(rpassword::prompt_password("PKCS#12 password: ").context("reading the password")?);
            let b = Zeroizing::new(
                rpassword::prompt_password("PKCS#12 password (again): ").context("reading the password")?,
            );
            if a != b {
                bail!("the two passwords differ");
            }
            a
        }
    };
    if password.is_empty() {
        bail!("the PKCS#12 password is empty");
    }
    Ok(password)
}

fn first_line(text: &str) -> Zeroizing<String> {
    Zeroizing::new(text.lines().next().unwrap_or_default().to_owned())
}

/// Key, certificate and chain as PKCS#12: PBES2 (PBKDF2-HMAC-SHA256, AES-256-CBC) for the key
/// and the certificates, HMAC-SHA256 integrity.
fn pkcs12(alias: &str, key_pkcs8: &[u8], certs_der: &[Vec<u8>], password: &str) -> anyhow::Result<Vec<u8>> {
    use p12_keystore::{
        Certificate, EncryptionAlgorithm, KeyStore, KeyStoreEntry, MacAlgorithm, PrivateKey, PrivateKeyChain,
    };
    let leaf = certs_der.first().ok_or_else(|| anyhow!("no certificate for the PKCS#12 file"))?;
    let local_key_id = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, leaf);
    let certs = certs_der
        .iter()
        .map(|d| Certificate::from_der(d))
        .collect::<Result<Vec<_>, _>>()
        .context("PKCS#12: reading the certificates")?;
    let key = PrivateKey::from_der(key_pkcs8).context("PKCS#12: reading the key")?;
    let mut store = KeyStore::new();
    store.add_entry(alias, KeyStoreEntry::PrivateKeyChain(PrivateKeyChain::new(local_key_id.as_ref(), key, certs)));
    store
        .writer(password)
        .encryption_algorithm(EncryptionAlgorithm::PbeWithHmacSha256AndAes256)
        .encryption_iterations(PKCS12_ITERATIONS)
        .mac_algorithm(MacAlgorithm::HmacSha256)
        .mac_iterations(PKCS12_ITERATIONS)
        .write()
        .context("writing the PKCS#12 file")
}

/// The certificate must certify our key: its SubjectPublicKeyInfo is the key's.
fn check_certifies(cert_der: &[u8], key: &rcgen::KeyPair) -> anyhow::Result<()> {
    use rcgen::PublicKeyData;
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| anyhow!("the server's certificate does not parse: {e}"))?;
    if cert.public_key().raw != key.subject_public_key_info().as_slice() {
        bail!("the server's certificate is not for the key generated here");
    }
    Ok(())
}

/// The shared path of `request` and `renew`.
#[allow(clippy::too_many_arguments)]
async fn certify(
    api: &Api,
    org: &str,
    app: &str,
    cert_type: CertType,
    out: &KeyOutArgs,
    upload: Upload<'_>,
    default_key: KeyType,
    default_dns: Vec<String>,
) -> anyhow::Result<Value> {
    let key_type = out.key_type.unwrap_or(default_key);
    let dns = if out.dns.is_empty() { default_dns } else { out.dns.clone() };
    // The subject the CA wants, from the server (this also checks org, app and credentials).
    let template = api
        .get(&org_path(org, &["applications", app, "csr-template"]), &[("type", cert_type.as_str().to_owned())])
        .await?;
    let (cn, subject_org) = template_subject(&template)?;
    match (cert_type, dns.is_empty()) {
        (CertType::ServerTransport, true) => {
            let domains: Vec<&str> = template
                .get("allowed_domains")
                .and_then(Value::as_array)
                .map(|d| d.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            bail!(
                "a server-transport certificate needs --dns NAME (the organisation's allowed domains: {})",
                if domains.is_empty() { "none yet".to_owned() } else { domains.join(", ") }
            );
        }
        (CertType::Transport | CertType::Signing, false) => {
            bail!("--dns is only for server-transport certificates")
        }
        _ => {}
    }
    let base = match &out.name {
        Some(n) => n.clone(),
        None => format!("{subject_org}-{app}-{}", cert_type.as_str()),
    };
    check_base_name(&base)?;
    let files = OutFiles::new(&out.out, &base, out.key.is_none(), out.pkcs12);
    files.refuse_existing()?;
    let password = if out.pkcs12 { Some(pkcs12_password(out.pkcs12_password_file.as_deref())?) } else { None };
    ensure_dir(&out.out)?;

    // The key: generated here and saved (0600) before anything is uploaded.
    let key = match &out.key {
        Some(path) => load_key(path)?,
        None => key_type.generate()?,
    };
    let key_der = Zeroizing::new(key.serialize_der());
    let csr = build_csr(&key, &cn, &subject_org, &dns)?;
    if let Some(path) = &files.key {
        let pem = Zeroizing::new(key.serialize_pem());
        create_new(path, 0o600, pem.as_bytes())?;
    }
    let mut body = match upload {
        Upload::Issue { cert_type, application } => {
            json!({ "type": cert_type.as_str(), "application": application, "csr": csr })
        }
        Upload::Renew { .. } => json!({ "csr": csr }),
    };
    if let (Some(days), Some(o)) = (out.validity_days, body.as_object_mut()) {
        o.insert("validity_days".into(), days.into());
    }
    let path = match upload {
        Upload::Issue { .. } => org_path(org, &["certificates"]),
        Upload::Renew { id } => org_path(org, &["certificates", id, "renew"]),
    };
    let issued = match api.post(&path, &body).await {
        Ok(v) => v,
        Err(e) => {
            // Nothing was certified: the new key is of no use.
            if let Some(p) = &files.key {
                let _ = std::fs::remove_file(p);
            }
            return Err(e);
        }
    };
    let id = field(&issued, "id")?;
    let saved = save_issued(&issued, &key, &key_der, &files, &base, password.as_ref().map(|p| p.as_str()));
    saved.with_context(|| {
        format!(
            "certificate {id} was issued, but saving it failed; fetch it with GET /api/v1/organisations/{org}/certificates/{id}/pem?chain=true"
        )
    })?;
    let mut files_json = serde_json::Map::new();
    let key_path = files.key.as_ref().or(out.key.as_ref());
    for (k, p) in [
        ("key", key_path),
        ("certificate", Some(&files.certificate)),
        ("chain", Some(&files.chain)),
        ("pkcs12", files.pkcs12.as_ref()),
    ] {
        if let Some(p) = p {
            files_json.insert(k.into(), p.display().to_string().into());
        }
    }
    let mut summary = serde_json::Map::new();
    for k in ["id", "serial", "type", "application", "subject", "key_type", "not_before", "not_after", "x5t#S256"] {
        if let Some(v) = issued.get(k) {
            summary.insert(k.into(), v.clone());
        }
    }
    if let Some(from) = issued.get("renewed_from").filter(|v| !v.is_null()) {
        summary.insert("renewed_from".into(), from.clone());
    }
    summary.insert("files".into(), files_json.into());
    Ok(summary.into())
}

fn save_issued(
    issued: &Value,
    key: &rcgen::KeyPair,
    key_der: &[u8],
    files: &OutFiles,
    alias: &str,
    password: Option<&str>,
) -> anyhow::Result<()> {
    let cert_pem = field(issued, "certificate_pem")?;
    let chain_pem = field(issued, "chain_pem")?;
    let mut ders = portcullis_core::pki::pem_certificates(cert_pem).context("the issued certificate")?;
    if ders.len() != 1 {
        bail!("the server sent {} certificates where one was expected", ders.len());
    }
    if let Some(leaf) = ders.first() {
        check_certifies(leaf, key)?;
    }
    ders.extend(portcullis_core::pki::pem_certificates(chain_pem).context("the chain")?);
    create_new(&files.certificate, 0o644, cert_pem.as_bytes())?;
    create_new(&files.chain, 0o644, chain_pem.as_bytes())?;
    if let (Some(path), Some(password)) = (&files.pkcs12, password) {
        let p12 = pkcs12(alias, key_der, &ders, password)?;
        create_new(path, 0o600, &p12)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

    use super::*;

    fn secret(s: &str) -> Option<SecretString> {
        Some(SecretString::from(s.to_owned()))
    }

    #[test]
    fn one_credential_is_picked() {
        assert!(matches!(pick_credential(secret("t"), None, None).unwrap(), Credential::Bearer(_)));
        assert!(matches!(
            pick_credential(None, Some("k".into()), secret("s")).unwrap(),
            Credential::ApiKey(k, _) if k == "k"
        ));
        // Empty values count as absent.
        assert!(matches!(pick_credential(secret(""), Some("k".into()), secret("s")).unwrap(), Credential::ApiKey(..)));
        let both = pick_credential(secret("t"), Some("k".into()), secret("s")).err().unwrap().to_string();
        assert!(both.contains("one credential"), "{both}");
        let no_secret = pick_credential(None, Some("k".into()), None).err().unwrap().to_string();
        assert!(no_secret.contains("PORTCULLIS_API_SECRET"), "{no_secret}");
        let none = pick_credential(None, None, None).err().unwrap().to_string();
        assert!(none.contains("PORTCULLIS_TOKEN") && none.contains("PORTCULLIS_API_KEY"), "{none}");
    }

    #[test]
    fn base_urls() {
        assert!(base_url("http://127.0.0.1:8080").is_ok());
        assert!(base_url("https://ca.example.com/portcullis/").is_ok());
        for bad in ["ftp://x", "http://x/?a=b", "http://x/#f", "127.0.0.1:8080", "mailto:a@b"] {
            assert!(base_url(bad).is_err(), "{bad}");
        }
        assert!(is_loopback(&base_url("http://localhost:1").unwrap()));
        assert!(is_loopback(&base_url("http://[::1]:1").unwrap()));
        assert!(!is_loopback(&base_url("http://10.0.0.1").unwrap()));
    }

    #[test]
    fn urls_keep_a_prefix_and_encode_segments() {
        let api = Api {
            http: reqwest::Client::new(),
            base: base_url("https://h.example/pc/").unwrap(),
            credential: Credential::Bearer(SecretString::from("t".to_owned())),
        };
        let u =
            api.url(&org_path("acme", &["applications", "a/b", "csr-template"]), &[("type", "x y".into())]).unwrap();
        assert_eq!(
            u.as_str(),
            "https://h.example/pc/api/v1/organisations/acme/applications/a%2Fb/csr-template?type=x+y"
        );
    }

    #[test]
    fn refusals_carry_the_servers_words() {
        let mut h = HeaderMap::new();
        h.insert("x-error", HeaderValue::from_static("application acme$nope not found"));
        h.insert("x-error-id", HeaderValue::from_static("0190abc"));
        let e = refusal(StatusCode::NOT_FOUND, &h, "").to_string();
        assert_eq!(e, "the server refused: 404 application acme$nope not found (x-error-id 0190abc)");
        let e = refusal(StatusCode::UNAUTHORIZED, &HeaderMap::new(), "").to_string();
        assert!(e.contains("401 Unauthorized") && e.contains("PORTCULLIS_TOKEN"), "{e}");
    }

    #[test]
    fn template_subjects() {
        let t = json!({ "subject_openssl": "/CN=acme$billing/O=acme" });
        assert_eq!(template_subject(&t).unwrap(), ("acme$billing".into(), "acme".into()));
        for bad in ["/CN=a", "/CN=a/O=b/OU=c", "/CN=a/CN=b", "", "/CN=/O=x"] {
            assert!(template_subject(&json!({ "subject_openssl": bad })).is_err(), "{bad}");
        }
        assert!(template_subject(&json!({})).is_err());
    }

    #[test]
    fn names_and_files() {
        for ok in ["acme-billing-transport", "a.b_c-1"] {
            check_base_name(ok).unwrap();
        }
        for bad in ["", ".hidden", "a/b", "..", "a b", "a\\b"] {
            assert!(check_base_name(bad).is_err(), "{bad:?}");
        }
        let f = OutFiles::new(Path::new("/o"), "x", true, true);
        let all: Vec<String> = f.all().map(|p| p.display().to_string()).collect();
        assert_eq!(all, ["/o/x.key", "/o/x.crt", "/o/x.chain.pem", "/o/x.p12"]);
        assert_eq!(OutFiles::new(Path::new("/o"), "x", false, false).all().count(), 2);
    }

    #[test]
    fn password_is_the_first_line() {
        assert_eq!(first_line("pw\n").as_str(), "pw");
        assert_eq!(first_line("pw\r\nsecond\n").as_str(), "pw");
        assert_eq!(first_line(" spaced pw ").as_str(), " spaced pw ");
        assert_eq!(first_line("").as_str(), "");
    }

    #[test]
    fn key_types_from_the_servers_description() {
        assert_eq!(KeyType::from_description("EC P-256"), Some(KeyType::P256));
        assert_eq!(KeyType::from_description("EC P-384"), Some(KeyType::P384));
        assert_eq!(KeyType::from_description("RSA 2048"), Some(KeyType::Rsa3072));
        assert_eq!(KeyType::from_description("RSA 3072"), Some(KeyType::Rsa3072));
        assert_eq!(KeyType::from_description("RSA 4096"), Some(KeyType::Rsa4096));
        assert_eq!(KeyType::from_description("RSA 8192"), Some(KeyType::Rsa4096));
        assert_eq!(KeyType::from_description("RSA"), None);
        assert_eq!(KeyType::from_description("Ed25519"), Some(KeyType::Ed25519));
        assert_eq!(KeyType::from_description("DSA"), None);
    }

    #[test]
    fn table_is_aligned() {
        let t = table(&[json!({ "id": "1", "serial": "ab", "type": "transport", "application": "a$b",
            "status": "active", "not_after": "2030-01-01T00:00:00Z", "key_type": "EC P-256" })]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("ID  SERIAL  TYPE       APPLICATION  STATUS"), "{t}");
        assert_eq!(lines[0].find("STATUS"), lines[1].find("active"), "{t}");
    }

    /// Every key type makes a CSR with exactly CN and O that our CA's parser accepts.
    #[test]
    fn csrs_have_exactly_the_template_subject() {
        for kt in [KeyType::P256, KeyType::P384, KeyType::Ed25519, KeyType::Rsa3072] {
            let key = kt.generate().unwrap();
            let dns = if kt == KeyType::P256 { vec!["api.acme.test".to_owned()] } else { vec![] };
            let pem = build_csr(&key, "acme$billing", "acme", &dns).unwrap();
            let csr = portcullis_core::pki::parse_csr(&pem).unwrap();
            portcullis_core::pki::check_subject(&csr, "acme$billing", "acme").unwrap();
            assert_eq!(csr.dns_names, dns);
            assert!(key.serialize_pem().starts_with("-----BEGIN PRIVATE KEY-----\n"), "{kt:?}: PKCS#8");
        }
    }

    /// The PKCS#12 file reads back with its password (and not without it).
    #[test]
    fn pkcs12_round_trip() {
        let key = KeyType::P256.generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["x.test".to_owned()]).unwrap().self_signed(&key).unwrap();
        let ders = vec![cert.der().to_vec()];
        let p12 = pkcs12("alias", &key.serialize_der(), &ders, "pw").unwrap();
        let store =
            p12_keystore::KeyStore::from_pkcs12(&p12, "pw", p12_keystore::Pkcs12ImportPolicy::default()).unwrap();
        let (_, chain) = store.private_key_chain().unwrap();
        assert_eq!(chain.key().as_der(), key.serialize_der().as_slice());
        assert_eq!(chain.certs()[0].as_der(), ders[0].as_slice());
        assert!(
            p12_keystore::KeyStore::from_pkcs12(&p12, "wrong", p12_keystore::Pkcs12ImportPolicy::default()).is_err()
        );
        check_certifies(&ders[0], &key).unwrap();
        assert!(check_certifies(&ders[0], &KeyType::P256.generate().unwrap()).is_err());
    }
}
