//! The `portcullis` binary: command line, configuration, logging, and wiring the adapters
//! (SQLite or PostgreSQL store, local key vault, system clock) into the core and the web
//! router. The only place that reads the environment, the config file or the wall clock
//! through the system adapter.

mod backup_cmd;
mod cert_cli;
mod config;
mod gateway_cmd;
mod mail;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use clap::{Args, Parser, Subcommand};
use portcullis_core::Portcullis;
use portcullis_core::clock::{Clock, SystemClock};
use portcullis_core::crypto::vault::{LocalKeyVault, MASTER_KEY_LEN};
use portcullis_core::model::Page;
use portcullis_core::settings::CoreSettings;
use portcullis_core::store::Store;
use portcullis_core::usecases::*;
use portcullis_store::{PgStore, SqliteStore};
use secrecy::ExposeSecret;
use tracing_subscriber::EnvFilter;
use zeroize::Zeroizing;

use crate::config::{FlagOverrides, Settings, secret_env};

/// mimalloc: the token path makes a few dozen small allocations per request, and glibc's
/// allocator showed up as 8 % of server CPU under load (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(
    name = "portcullis",
    version,
    about = "Identity provider, OAuth 2.0 server, CA and API gateway in one binary"
)]
struct Cli {
    /// TOML configuration file.
    #[arg(long, global = true, env = "PORTCULLIS_CONFIG")]
    config: Option<PathBuf>,
    /// Listen address, ADDR:PORT (port 0 picks a free port).
    #[arg(long, global = true)]
    listen: Option<String>,
    /// External base URL (the token issuer).
    #[arg(long, global = true)]
    issuer: Option<String>,
    /// Data directory (master key, SQLite database, outbox).
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// postgres://… to use PostgreSQL instead of the embedded SQLite.
    #[arg(long, global = true)]
    database_url: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the server.
    Serve,
    /// Apply database migrations and exit.
    Migrate,
    /// Token signing keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// The certificate authority (run directly against the database).
    #[command(subcommand)]
    Ca(CaCommand),
    /// Administrative tasks run directly against the database.
    #[command(subcommand)]
    Admin(Box<AdminCommand>),
    /// Certificates from a running server over HTTP (`--url`, PORTCULLIS_TOKEN or
    /// PORTCULLIS_API_KEY + PORTCULLIS_API_SECRET): request (the key is made here and never
    /// leaves this machine), list, revoke, renew.
    Cert(cert_cli::CertCommand),
    /// Run the API gateway alone (`--config gateway.toml`: `issuer`, `client_id`, a `[gateway]`
    /// table), talking to a control plane over HTTP(S); see docs/gateway.md.
    Gateway,
    /// The audit log's hash chain (run directly against the database, also while servers run).
    #[command(subcommand)]
    Audit(backup_cmd::AuditCommand),
    /// Write a consistent snapshot of the database to a file, also while servers run (the
    /// master key is not in it: keep it separately).
    Backup(backup_cmd::BackupArgs),
    /// Load a backup into an empty database (stop every server using it first).
    Restore(backup_cmd::RestoreArgs),
}

#[derive(Subcommand, Debug)]
enum CaCommand {
    /// Print the CA hierarchy (JSON): root, issuing CAs, which one issues, CRL numbers.
    Show,
    /// Create a new issuing CA under the root; the old one stops issuing, and what it issued
    /// stays valid until it expires (running servers pick it up at their next CA reload, or
    /// restart them).
    Rotate,
    /// Import an existing CA: a self-signed root (a new issuing CA is created under it) or an
    /// issuing CA with `--chain` naming its issuer's certificate.
    Import {
        /// PEM certificate of the CA.
        #[arg(long)]
        cert: PathBuf,
        /// PEM PKCS#8 private key of the CA (`openssl pkcs8 -topk8 -nocrypt`).
        #[arg(long)]
        key: PathBuf,
        /// PEM certificate of the CA's issuer (for an issuing CA).
        #[arg(long)]
        chain: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
enum KeysCommand {
    /// Promote every algorithm's next key to current now (running servers pick it up
    /// within tokens.key_check_interval).
    Rotate {
        /// Rotate even if the next keys were published too recently for every cache to have
        /// them (use when a key is compromised).
        #[arg(long)]
        force: bool,
    },
    /// Print the published JWKS.
    List,
}

#[derive(Subcommand, Debug)]
enum AdminCommand {
    #[command(subcommand)]
    Org(OrgCommand),
    #[command(subcommand)]
    Service(ServiceCommand),
    #[command(subcommand)]
    App(AppCommand),
}

#[derive(Subcommand, Debug)]
enum OrgCommand {
    Create {
        #[arg(long)]
        slug: String,
        #[arg(long)]
        name: String,
    },
    List,
}

#[derive(Subcommand, Debug)]
enum ServiceCommand {
    Create(ServiceArgs),
}

#[derive(Args, Debug)]
struct ServiceArgs {
    #[arg(long)]
    org: String,
    #[arg(long)]
    slug: String,
    #[arg(long)]
    name: String,
    #[arg(long)]
    audience: String,
    /// Repeatable: payments/read
    #[arg(long = "scope")]
    scopes: Vec<String>,
    /// Repeatable: payments:admin
    #[arg(long = "role")]
    roles: Vec<String>,
    /// Repeatable: payments.invoice.read
    #[arg(long = "permission")]
    permissions: Vec<String>,
    /// Repeatable: ROLE=PERMISSION
    #[arg(long = "grant")]
    grants: Vec<String>,
}

#[derive(Subcommand, Debug)]
enum AppCommand {
    /// Create an application; prints its client secret once.
    Create(AppArgs),
    /// Show an application by client id (org$app).
    Show {
        #[arg(long)]
        client_id: String,
    },
}

#[derive(Args, Debug)]
struct AppArgs {
    #[arg(long)]
    org: String,
    #[arg(long)]
    slug: String,
    #[arg(long)]
    name: String,
    #[arg(long = "grant-type")]
    grant_types: Vec<String>,
    #[arg(long = "scope")]
    scopes: Vec<String>,
    #[arg(long = "role")]
    roles: Vec<String>,
    #[arg(long)]
    auth_method: Option<String>,
    #[arg(long)]
    lifetime: Option<i64>,
    #[arg(long)]
    alg: Option<String>,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // `cert` is an HTTP client of a running server: no server configuration, no database.
    if let Command::Cert(c) = cli.command {
        return cert_cli::main(c);
    }
    // The standalone gateway has its own configuration file and no database.
    if let Command::Gateway = cli.command {
        return gateway_main(cli.config);
    }
    let flags = FlagOverrides {
        listen: cli.listen.clone(),
        issuer: cli.issuer.clone(),
        data_dir: cli.data_dir.clone(),
        database_url: cli.database_url.clone(),
    };
    let settings = match config::load(cli.config.as_ref(), flags) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("portcullis: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    init_logging(&settings);
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("portcullis: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli.command, settings)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("portcullis: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn gateway_main(config: Option<PathBuf>) -> std::process::ExitCode {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let Some(path) = config else {
        eprintln!("portcullis gateway: --config FILE is required (see docs/gateway.md)");
        return std::process::ExitCode::from(2);
    };
    let result =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(anyhow::Error::from).and_then(|rt| {
            rt.block_on(async {
                let shutdown = shutdown_signal().context("installing signal handlers")?;
                gateway_cmd::run_standalone(path, shutdown).await
            })
        });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("portcullis gateway: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn init_logging(s: &Settings) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&s.log.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if s.log.format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// The adapters, opened once.
struct Wired {
    core: Arc<Portcullis>,
    _lock: Option<std::fs::File>,
}

async fn open_store(s: &Settings, clock: &dyn Clock) -> anyhow::Result<Arc<dyn Store>> {
    Ok(match &s.database_url {
        Some(url) if url.starts_with("postgres") => {
            Arc::new(PgStore::connect(url, clock.now()).await.context("connecting to PostgreSQL")?)
        }
        Some(url) => Arc::new(SqliteStore::open_url(url, clock.now()).await.context("opening SQLite")?),
        None => {
            let path = s.data_dir.join("portcullis.db");
            let store =
                SqliteStore::open(&path, clock.now()).await.with_context(|| format!("opening {}", path.display()))?;
            restrict_db_files(&path);
            Arc::new(store)
        }
    })
}

fn ensure_data_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating data directory {}", dir.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Err(e) = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)) {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot make the data directory private (0700)");
        }
    }
    Ok(())
}

/// The database holds sealed keys, keyed hashes and the audit trail: owner-only, whatever the umask.
fn restrict_db_files(db: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for suffix in ["", "-wal", "-shm"] {
            let mut p = db.as_os_str().to_owned();
            p.push(suffix);
            let p = PathBuf::from(p);
            if p.exists()
                && let Err(e) = std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))
            {
                tracing::warn!(file = %p.display(), error = %e, "cannot make a database file private (0600)");
            }
        }
    }
}

/// One `serve` per data directory: an exclusive lock held for the process's life.
fn lock_data_dir(dir: &Path) -> anyhow::Result<std::fs::File> {
    let path = dir.join("portcullis.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => {
            bail!("another portcullis process is already using data directory {}", dir.display())
        }
        Err(std::fs::TryLockError::Error(e)) => Err(e).with_context(|| format!("locking {}", path.display())),
    }
}

/// The master key: `PORTCULLIS_MASTER_KEY` (base64), else `data_dir/master.key` (mode 0600),
/// created only when the database has never been initialised.
fn master_key(dir: &Path, db_initialised: bool) -> anyhow::Result<Zeroizing<Vec<u8>>> {
    let decode = |s: &str, from: &str| -> anyhow::Result<Zeroizing<Vec<u8>>> {
        let k = Zeroizing::new(
            B64.decode(s.trim())
                .map_err(|_| anyhow::anyhow!("{from}: expected base64 of {MASTER_KEY_LEN} random bytes"))?,
        );
        if k.len() != MASTER_KEY_LEN {
            bail!("{from}: expected base64 of {MASTER_KEY_LEN} random bytes, got {} bytes", k.len());
        }
        Ok(k)
    };
    if let Some(k) = secret_env("MASTER_KEY")? {
        return decode(k.expose_secret(), "PORTCULLIS_MASTER_KEY");
    }
    let path = dir.join("master.key");
    if path.exists() {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path)?.permissions().mode();
            if mode & 0o077 != 0 {
                bail!(
                    "{} is readable by other users (mode {:o}); run: chmod 600 {}",
                    path.display(),
                    mode & 0o777,
                    path.display()
                );
            }
        }
        let text =
            Zeroizing::new(std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?);
        return decode(&text, &path.display().to_string());
    }
    if db_initialised {
        bail!(
            "the database is initialised but {} is missing and PORTCULLIS_MASTER_KEY is not set: restore the master key",
            path.display()
        );
    }
    let key = LocalKeyVault::generate_master_key()?;
    let text = Zeroizing::new(B64.encode(key.as_ref()));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    use std::io::Write;
    let mut f = opts.open(&path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    tracing::info!(path = %path.display(), "created a new master key");
    Ok(Zeroizing::new(key.to_vec()))
}

async fn wire(s: &Settings, issuer: String, lock: bool) -> anyhow::Result<Wired> {
    ensure_data_dir(&s.data_dir)?;
    let lock = if lock { Some(lock_data_dir(&s.data_dir)?) } else { None };
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let store = open_store(s, clock.as_ref()).await?;
    let initialised = store.setting("vault_check").await?.is_some();
    let key = master_key(&s.data_dir, initialised)?;
    let vault = Arc::new(LocalKeyVault::new(&key)?);
    drop(key);
    let mut core = CoreSettings::for_issuer(&issuer);
    core.signing_algorithms = s.algorithms.clone();
    core.default_access_token_lifetime = s.raw.tokens.default_lifetime;
    core.max_access_token_lifetime = s.raw.tokens.max_lifetime;
    core.key_rotation_interval = s.raw.tokens.key_rotation_interval;
    core.key_check_interval = i64::try_from(s.raw.tokens.key_check_interval).unwrap_or(3600);
    core.secret_rotation_grace = s.raw.clients.secret_rotation_grace;
    core.cache_ttl = s.raw.clients.cache_ttl;
    core.auth_failures_per_minute = s.raw.clients.auth_failures_per_minute.max(1);
    core.bootstrap_admin_email = s.raw.bootstrap.admin_email.clone();
    core.auth = s.raw.auth.clone();
    core.ca = s.raw.ca.clone();
    let mailer = mail::build(s.raw.smtp.as_ref(), secret_env("SMTP_PASSWORD")?, &s.data_dir.join("outbox"))?;
    let core = Arc::new(
        Portcullis::new(store, clock, vault, core)
            .with_mailer(mailer)
            .with_jwks_fetcher(Arc::new(HttpJwksFetcher::new()?)),
    );
    let report = core
        .bootstrap(BootstrapSecrets {
            admin_password: secret_env("ADMIN_PASSWORD")?,
            admin_client_secret: secret_env("ADMIN_CLIENT_SECRET")?,
        })
        .await
        .context("initialising")?;
    for what in &report.created {
        tracing::info!("created {what}");
    }
    print_generated(&report);
    Ok(Wired { core, _lock: lock })
}

/// Fetches clients' registered `jwks_uri`s: 5 s timeout, 64 KiB at most, no redirects.
struct HttpJwksFetcher(reqwest::Client);

impl HttpJwksFetcher {
    fn new() -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .context("building the JWKS HTTP client")?;
        Ok(Self(client))
    }
}

#[async_trait::async_trait]
impl portcullis_core::usecases::JwksFetcher for HttpJwksFetcher {
    async fn fetch(&self, url: &str) -> Result<serde_json::Value, String> {
        const MAX: usize = 64 * 1024;
        let mut resp = self.0.get(url).send().await.map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("HTTP {}", resp.status()));
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
            body.extend_from_slice(&chunk);
            if body.len() > MAX {
                return Err("JWKS larger than 64 KiB".into());
            }
        }
        serde_json::from_slice(&body).map_err(|e| format!("not JSON: {e}"))
    }
}

/// POSTs back-channel logout tokens (OIDC Back-Channel Logout 1.0 §2.5): 5 s timeout, no
/// redirects; any 2xx is a delivery.
struct HttpLogoutNotifier(reqwest::Client);

impl HttpLogoutNotifier {
    fn new() -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .context("building the back-channel logout HTTP client")?;
        Ok(Self(client))
    }
}

#[async_trait::async_trait]
impl portcullis_core::usecases::LogoutNotifier for HttpLogoutNotifier {
    async fn notify(&self, uri: &str, logout_token: &str) -> Result<(), String> {
        let resp = self.0.post(uri).form(&[("logout_token", logout_token)]).send().await.map_err(|e| e.to_string())?;
        if resp.status().is_success() { Ok(()) } else { Err(format!("HTTP {}", resp.status())) }
    }
}

/// The one place generated bootstrap secrets are shown: standard output, once, never the log.
fn print_generated(r: &BootstrapReport) {
    if r.generated_admin_password.is_none() && r.generated_admin_client_secret.is_none() {
        return;
    }
    println!("Portcullis initialised. Save these now; they are not shown again:");
    if let Some(p) = &r.generated_admin_password {
        println!("  admin user:          {}", r.admin_email.as_deref().unwrap_or(""));
        println!("  admin password:      {}", p.expose_secret());
    }
    if let Some(s) = &r.generated_admin_client_secret {
        println!("  admin client id:     {PLATFORM_ORG}${ADMIN_APP}");
        println!("  admin client secret: {}", s.expose_secret());
    }
}

fn cli_principal() -> Principal {
    Principal {
        subject: "cli".into(),
        client_id: "cli".into(),
        org: PLATFORM_ORG.into(),
        roles: vec![ROLE_PLATFORM_ADMIN.into()],
        scopes: vec![],
        credential: Credential::AccessToken,
    }
}

fn default_issuer(s: &Settings, bound: SocketAddr) -> String {
    s.issuer.clone().unwrap_or_else(|| format!("http://{bound}"))
}

async fn run(cmd: Command, s: Settings) -> anyhow::Result<()> {
    match cmd {
        Command::Serve => serve(s).await,
        Command::Migrate => {
            ensure_data_dir(&s.data_dir)?;
            open_store(&s, &SystemClock).await?;
            println!("migrations applied");
            Ok(())
        }
        Command::Keys(k) => {
            let w = wire(&s, default_issuer(&s, s.listen), false).await?;
            match k {
                KeysCommand::Rotate { force } => {
                    let kids = w.core.rotate_signing_keys("cli", force).await?;
                    println!("rotated; now signing with: {}", kids.join(", "));
                }
                KeysCommand::List => println!("{}", w.core.jwks()),
            }
            Ok(())
        }
        Command::Ca(c) => {
            let w = wire(&s, default_issuer(&s, s.listen), false).await?;
            match c {
                CaCommand::Show => {}
                CaCommand::Rotate => {
                    let new = w.core.rotate_issuing_ca("cli").await?;
                    eprintln!("new issuing CA {} ({})", new.id, new.subject);
                }
                CaCommand::Import { cert, key, chain } => {
                    let read =
                        |p: &PathBuf| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()));
                    let key_pem = zeroize::Zeroizing::new(read(&key)?);
                    let chain = chain.as_ref().map(read).transpose()?;
                    let imported = w.core.import_ca("cli", &read(&cert)?, &key_pem, chain.as_deref()).await?;
                    for c in imported {
                        eprintln!("imported {} CA {} ({})", c.kind.as_str(), c.id, c.subject);
                    }
                }
            }
            println!("{}", serde_json::to_string_pretty(&w.core.ca_summary())?);
            Ok(())
        }
        Command::Admin(a) => {
            let w = wire(&s, default_issuer(&s, s.listen), false).await?;
            admin(&w.core, *a).await
        }
        Command::Audit(a) => backup_cmd::audit(a, &s).await,
        Command::Backup(b) => backup_cmd::backup(b, &s).await,
        Command::Restore(r) => backup_cmd::restore(r, &s).await,
        Command::Cert(c) => cert_cli::run(c).await,
        Command::Gateway => bail!("`portcullis gateway` is started before the server configuration is read"),
    }
}

async fn admin(core: &Portcullis, cmd: AdminCommand) -> anyhow::Result<()> {
    let who = cli_principal();
    let ctx = RequestContext { ip: None, request_id: Some("cli".into()) };
    match cmd {
        AdminCommand::Org(OrgCommand::Create { slug, name }) => {
            let o = core.create_organisation(&who, &ctx, NewOrganisation { slug, name }).await?;
            println!("{}", serde_json::json!({ "id": o.id, "slug": o.slug, "name": o.name }));
        }
        AdminCommand::Org(OrgCommand::List) => {
            for o in core.organisations(&who, Page::default()).await? {
                println!("{}\t{}", o.slug, o.name);
            }
        }
        AdminCommand::Service(ServiceCommand::Create(a)) => {
            let mut grants = std::collections::BTreeMap::<String, Vec<String>>::new();
            for g in a.grants {
                let (r, p) =
                    g.split_once('=').ok_or_else(|| anyhow::anyhow!("--grant {g:?}: expected ROLE=PERMISSION"))?;
                grants.entry(r.into()).or_default().push(p.into());
            }
            let req = NewService {
                slug: a.slug,
                name: a.name,
                audience: a.audience,
                scopes: a.scopes,
                roles: a.roles,
                permissions: a.permissions,
                grants,
            };
            let svc = core.create_service(&who, &ctx, &a.org, req).await?;
            println!("{}", serde_json::json!({ "id": svc.id, "slug": svc.slug, "audience": svc.audience }));
        }
        AdminCommand::App(AppCommand::Create(a)) => {
            let req = NewApplication {
                slug: a.slug,
                name: a.name,
                grant_types: (!a.grant_types.is_empty()).then_some(a.grant_types),
                scopes: a.scopes,
                roles: a.roles,
                token_endpoint_auth_method: a.auth_method,
                redirect_uris: vec![],
                access_token_lifetime: a.lifetime,
                access_token_signing_alg: a.alg,
                ..NewApplication::default()
            };
            let c = core.create_application(&who, &ctx, &a.org, req).await?;
            let mut v = serde_json::to_value(ApplicationView::new(&c.app, &a.org))?;
            if let (Some(secret), Some(obj)) = (&c.client_secret, v.as_object_mut()) {
                obj.insert("client_secret".into(), secret.expose_secret().into());
            }
            println!("{v}");
        }
        AdminCommand::App(AppCommand::Show { client_id }) => {
            let id = portcullis_core::ids::ClientId::parse(&client_id)?;
            let (org, app) = client_id.split_once('$').unwrap_or_default();
            let a = core.application(&who, org, app).await?;
            println!("{}", serde_json::to_string_pretty(&ApplicationView::new(&a, id.org()))?);
        }
    }
    Ok(())
}

async fn serve(s: Settings) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(s.listen).await.with_context(|| format!("binding {}", s.listen))?;
    let bound = listener.local_addr()?;
    let shutdown = shutdown_signal().context("installing signal handlers")?;
    let w = wire(&s, default_issuer(&s, bound), true).await?;
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(&[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5])
        .and_then(|b| b.install_recorder())
        .map_err(|e| anyhow::anyhow!("metrics: {e}"))?;
    // Names this process in the maintenance lease (several nodes may share the database).
    let node = portcullis_core::ids::new_id();
    spawn_maintenance(
        w.core.clone(),
        metrics.clone(),
        Duration::from_secs(s.raw.tokens.key_check_interval),
        node.clone(),
    );
    spawn_change_follower(w.core.clone());
    spawn_mail_delivery(w.core.clone());
    spawn_logout_delivery(w.core.clone(), HttpLogoutNotifier::new()?);
    let app = portcullis_web::router(portcullis_web::AppState { core: w.core.clone(), metrics: Some(metrics) });
    // One shutdown signal for both listeners.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let tls_task = match &s.raw.tls {
        Some(tls) => Some(start_tls_listener(tls, w.core.clone(), app.clone(), stopped(stop_rx.clone())).await?),
        None => None,
    };
    let gateway_task = match &s.raw.gateway {
        Some(raw) => {
            let (path, flags) = (s.config_file.clone(), s.flags.clone());
            let reload = move || Ok(config::load(path.as_ref(), flags.clone())?.raw.gateway);
            Some(
                gateway_cmd::start_in_serve(raw, w.core.clone(), s.config_file.clone(), reload, stop_rx.clone())
                    .await?,
            )
        }
        None => None,
    };
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let shutdown = stopped(stop_rx);
    tracing::info!(issuer = %w.core.issuer(), "listening on http://{bound}");
    // Responses are written whole; never hold them back for Nagle.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp: &mut tokio::net::TcpStream| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(shutdown)
        .await
        .context("serving")?;
    if let Some(t) = tls_task {
        let _ = t.await;
    }
    if let Some(t) = gateway_task {
        let _ = t.await;
    }
    if let Err(e) = w.core.release_maintenance(&node).await {
        tracing::warn!(error = %e, "could not give up the maintenance lease; it runs out by itself");
    }
    tracing::info!("shut down cleanly");
    Ok(())
}

/// Binds the `[tls]` listener and serves `app` on it until `stop`.
async fn start_tls_listener(
    tls: &config::TlsConfig,
    core: Arc<Portcullis>,
    app: axum::Router,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    use portcullis_web::tls::ClientCertMode;
    let mode = match tls.client_certificates.as_str() {
        "off" => ClientCertMode::Off,
        "required" => ClientCertMode::Required,
        _ => ClientCertMode::Optional,
    };
    let (chain, key) = match (&tls.cert_file, &tls.key_file) {
        (Some(c), Some(k)) => {
            let chain = portcullis_core::pki::pem_certificates(
                &std::fs::read_to_string(c).with_context(|| format!("reading tls.cert_file {}", c.display()))?,
            )?;
            let key = portcullis_core::pki::pem_decode(
                &std::fs::read_to_string(k).with_context(|| format!("reading tls.key_file {}", k.display()))?,
                &["PRIVATE KEY"],
                "tls.key_file (PKCS#8)",
            )?;
            (chain, key)
        }
        _ => core.issue_listener_certificate(&tls.server_names, 90)?,
    };
    let config = portcullis_web::tls::server_config(core, chain, key, mode).context("TLS configuration")?;
    let addr: SocketAddr = tls.listen.parse()?;
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding tls.listen {addr}"))?;
    let bound = listener.local_addr()?;
    tracing::info!(client_certificates = %tls.client_certificates, "listening on https://{bound}");
    Ok(tokio::spawn(portcullis_web::tls::serve(listener, config, app, stop)))
}

/// Background upkeep every `every`: with the maintenance lease (one node at a time), the key
/// and issuing-CA schedules, purges and expiry notices; on every node, re-reading the keys and
/// CAs (another node's rotation is picked up here at the latest); the metrics recorder's
/// housekeeping.
fn spawn_maintenance(
    core: Arc<Portcullis>,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
    every: Duration,
    node: String,
) {
    // Three missed rounds and another node takes over.
    let lease = i64::try_from(every.as_secs().saturating_mul(3)).unwrap_or(i64::MAX).max(10);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match core.maintain(&node, lease).await {
                Ok(m) => {
                    if m.keys_rotated {
                        tracing::info!("signing keys rotated on schedule");
                    }
                    if let Some(id) = &m.ca_staged {
                        tracing::info!(ca = %id, "successor issuing CA created and published; it issues once every node has it");
                    }
                    if let Some(id) = &m.ca_promoted {
                        tracing::info!(ca = %id, "successor issuing CA now issues");
                    }
                }
                Err(e) => tracing::error!(error = %e, "maintenance failed"),
            }
            metrics.run_upkeep();
        }
    });
}

/// How often a node re-reads the change feed even without a notification.
const CHANGE_RESYNC: Duration = Duration::from_secs(2);

/// Follows the changes every node commits (see `portcullis_core::usecases::cluster`): at once
/// when the store signals one (PostgreSQL `LISTEN/NOTIFY`), at most ten rounds a second, and
/// every [`CHANGE_RESYNC`] regardless, so a lost notification is made up for.
fn spawn_change_follower(core: Arc<Portcullis>) {
    tokio::spawn(async move {
        let signal = match core.change_signal().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "no change notifications; polling for other nodes' changes");
                None
            }
        };
        let mut cursor: Option<String> = None;
        loop {
            match core.follow_changes(cursor.as_deref()).await {
                Ok((next, refreshed)) => {
                    if refreshed != portcullis_core::usecases::Refreshed::default() {
                        tracing::debug!(?refreshed, "refreshed after changes");
                    }
                    cursor = Some(next);
                }
                Err(e) => tracing::warn!(error = %e, "following changes failed; retrying"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            match &signal {
                Some(n) => {
                    let _ = tokio::time::timeout(CHANGE_RESYNC, n.notified()).await;
                }
                None => tokio::time::sleep(CHANGE_RESYNC).await,
            }
        }
    });
}

/// Delivers queued mail as soon as it is queued, and retries failures on their schedule.
fn spawn_mail_delivery(core: Arc<Portcullis>) {
    tokio::spawn(async move {
        loop {
            if let Err(e) = core.deliver_mail().await {
                tracing::warn!(error = %e, "mail delivery round failed; retrying");
            }
            core.wait_for_mail(Duration::from_secs(5)).await;
        }
    });
}

/// Posts back-channel logout tokens as soon as a session ends, and retries failures.
fn spawn_logout_delivery(core: Arc<Portcullis>, notifier: HttpLogoutNotifier) {
    tokio::spawn(async move {
        loop {
            if let Err(e) = core.deliver_logouts(&notifier).await {
                tracing::warn!(error = %e, "back-channel logout round failed; retrying");
            }
            core.wait_for_logouts(Duration::from_secs(5)).await;
        }
    });
}

/// Installs the SIGTERM / Ctrl-C handlers now (before the server says it is listening, so a
/// signal can never hit the default action) and returns the future that resolves on either.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    let (mut term, mut int) = {
        use tokio::signal::unix::{SignalKind, signal};
        (signal(SignalKind::terminate())?, signal(SignalKind::interrupt())?)
    };
    Ok(async move {
        #[cfg(unix)]
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutting down: finishing in-flight requests");
    })
}
