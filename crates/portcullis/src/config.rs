//! Configuration: defaults → TOML file (`--config`) → `PORTCULLIS_*` environment (`__` for
//! nesting) → flags. Unknown keys are errors. Secrets never live in the config file: they
//! come from `PORTCULLIS_MASTER_KEY`, `PORTCULLIS_ADMIN_PASSWORD`,
//! `PORTCULLIS_ADMIN_CLIENT_SECRET`, `PORTCULLIS_SMTP_PASSWORD` and `PORTCULLIS_DATABASE_URL`,
//! or the same names with `_FILE` to read them from a file.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, bail};
use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use portcullis_core::crypto::signing::Algorithm;
use portcullis_core::settings::{AuthSettings, CaSettings};
use secrecy::SecretString;
use serde::{Deserialize, Serialize};

/// Environment variables read directly (not config keys); the last four are `portcullis cert`'s.
const DIRECT_ENV: [&str; 10] = [
    "gateway_client_secret",
    "master_key",
    "admin_password",
    "admin_client_secret",
    "smtp_password",
    "config",
    "url",
    "token",
    "api_key",
    "api_secret",
];

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Config format version; only 1 exists.
    pub version: u32,
    pub listen: String,
    /// External base URL; default `http://` + the bound listen address.
    pub issuer: Option<String>,
    pub data_dir: PathBuf,
    /// `postgres://…` for PostgreSQL; default the embedded SQLite under `data_dir`.
    pub database_url: Option<String>,
    pub log: LogConfig,
    pub tokens: TokenConfig,
    pub clients: ClientConfig,
    pub auth: AuthSettings,
    pub ca: CaSettings,
    /// The optional TLS listener (mTLS, `tls_client_auth`, renewal over mTLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
    /// Real mail delivery; without it mail goes to `data_dir/outbox/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smtp: Option<crate::mail::SmtpConfig>,
    pub bootstrap: BootstrapConfig,
    /// The gateway inside `serve` (DESIGN §5); validated when it starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<portcullis_gateway::config::GatewayConfig>,
}

/// `[auth]` is the core's [`AuthSettings`], checked here.
fn validate_auth(a: &AuthSettings) -> anyhow::Result<()> {
    let within = |name: &str, v: i64, lo: i64, hi: i64| {
        if (lo..=hi).contains(&v) { Ok(()) } else { Err(anyhow::anyhow!("auth.{name} must be {lo} to {hi}")) }
    };
    within("session_idle_timeout", a.session_idle_timeout, 60, 30 * 86_400)?;
    within("session_lifetime", a.session_lifetime, a.session_idle_timeout.max(60), 365 * 86_400)?;
    within("code_lifetime", a.code_lifetime, 60, 86_400)?;
    within("code_max_attempts", i64::from(a.code_max_attempts), 1, 10)?;
    within("attempts_per_account_per_minute", i64::from(a.attempts_per_account_per_minute), 1, 10_000)?;
    within("attempts_per_ip_per_minute", i64::from(a.attempts_per_ip_per_minute), 1, 1_000_000)?;
    within("lockout_threshold", i64::from(a.lockout_threshold), 1, 1000)?;
    within("lockout_duration", a.lockout_duration, 1, 30 * 86_400)?;
    within("password_hash_concurrency", i64::try_from(a.password_hash_concurrency).unwrap_or(i64::MAX), 1, 256)?;
    within("password_queue_wait_ms", i64::try_from(a.password_queue_wait_ms).unwrap_or(i64::MAX), 0, 60_000)?;
    within("api_key_max_lifetime", a.api_key_max_lifetime, 3600, 10 * 365 * 86_400)?;
    Ok(())
}

/// `[tls]`: a second listener speaking HTTPS with optional client certificates.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// `ADDR:PORT`; port 0 picks a free one (logged as `listening on https://…`).
    pub listen: String,
    /// `off`, `optional` (default) or `required`.
    #[serde(default = "default_client_certificates")]
    pub client_certificates: String,
    /// PEM server certificate chain and PKCS#8 key; without them a server certificate is
    /// issued by our own CA at start for `server_names`.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    #[serde(default = "default_server_names")]
    pub server_names: Vec<String>,
}

fn default_client_certificates() -> String {
    "optional".into()
}
fn default_server_names() -> Vec<String> {
    vec!["localhost".into(), "127.0.0.1".into(), "::1".into()]
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// A tracing filter, e.g. `info` or `portcullis=debug,info`. `RUST_LOG` overrides it.
    pub level: String,
    /// `text` or `json`.
    pub format: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    pub algorithms: Vec<String>,
    pub default_lifetime: i64,
    pub max_lifetime: i64,
    /// Seconds between automatic signing-key rotations; 0 turns them off.
    pub key_rotation_interval: i64,
    /// How often the key ring is re-read and the rotation schedule checked, in seconds.
    pub key_check_interval: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    pub secret_rotation_grace: i64,
    pub cache_ttl: i64,
    /// Failed client authentications allowed per client id and per IP each minute (then 429).
    pub auth_failures_per_minute: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootstrapConfig {
    pub admin_email: String,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            version: 1,
            listen: "127.0.0.1:8080".into(),
            issuer: None,
            data_dir: PathBuf::from("portcullis-data"),
            database_url: None,
            log: LogConfig { level: "info".into(), format: "text".into() },
            tokens: TokenConfig {
                algorithms: Algorithm::ALL.iter().map(|a| a.as_str().to_owned()).collect(),
                default_lifetime: 900,
                max_lifetime: 86_400,
                key_rotation_interval: 90 * 86_400,
                key_check_interval: 30,
            },
            clients: ClientConfig { secret_rotation_grace: 86_400, cache_ttl: 30, auth_failures_per_minute: 30 },
            auth: AuthSettings::default(),
            ca: CaSettings::default(),
            tls: None,
            smtp: None,
            bootstrap: BootstrapConfig { admin_email: "admin@portcullis.local".into() },
            gateway: None,
        }
    }
}

/// Values given as flags, applied last.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FlagOverrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database_url: Option<String>,
}

/// The validated configuration: what `Config` says, checked and typed.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    pub issuer: Option<String>,
    pub data_dir: PathBuf,
    pub database_url: Option<String>,
    pub log: LogConfig,
    pub algorithms: Vec<Algorithm>,
    pub raw: Config,
    /// What it was loaded from, so the gateway's routes can be read again on reload.
    pub config_file: Option<PathBuf>,
    pub flags: FlagOverrides,
}

pub fn load(config_file: Option<&PathBuf>, flags: FlagOverrides) -> anyhow::Result<Settings> {
    let mut fig = Figment::from(Serialized::defaults(Config::default()));
    if let Some(path) = config_file {
        if !path.exists() {
            bail!("config file {} does not exist", path.display());
        }
        fig = fig.merge(Toml::file_exact(path));
    }
    fig = fig.merge(Env::prefixed("PORTCULLIS_").split("__").filter(|k| {
        let k = k.as_str().to_ascii_lowercase();
        !DIRECT_ENV.iter().any(|d| k == *d || k == format!("{d}_file"))
            && !k.starts_with("test_")
            && k != "database_url_file"
    }));
    fig = fig.merge(Serialized::defaults(flags.clone()));
    let raw: Config = fig.extract().map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
    let mut settings = validate(raw)?;
    settings.config_file = config_file.cloned();
    settings.flags = flags;
    Ok(settings)
}

fn validate(mut raw: Config) -> anyhow::Result<Settings> {
    if raw.version != 1 {
        bail!("config version {} is not supported (expected 1)", raw.version);
    }
    let listen: SocketAddr = raw
        .listen
        .parse()
        .with_context(|| format!("listen {:?}: expected ADDR:PORT, e.g. 127.0.0.1:8080", raw.listen))?;
    if let Some(iss) = &raw.issuer {
        let ok =
            (iss.starts_with("https://") || iss.starts_with("http://")) && !iss.contains('?') && !iss.contains('#');
        if !ok {
            bail!("issuer {iss:?}: expected an http(s) URL without query or fragment");
        }
    }
    if raw.database_url.is_none() {
        raw.database_url = secret_env("DATABASE_URL")?.map(|s| secrecy::ExposeSecret::expose_secret(&s).to_owned());
    }
    if let Some(url) = &raw.database_url
        && !(url.starts_with("postgres://") || url.starts_with("postgresql://") || url.starts_with("sqlite:"))
    {
        bail!("database_url: expected postgres://… (or sqlite:…)");
    }
    if !["text", "json"].contains(&raw.log.format.as_str()) {
        bail!("log.format {:?}: expected text or json", raw.log.format);
    }
    let algorithms = raw
        .tokens
        .algorithms
        .iter()
        .map(|a| Algorithm::parse(a).map_err(|e| anyhow::anyhow!("tokens.algorithms: {e}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if !algorithms.contains(&Algorithm::ES256) {
        bail!("tokens.algorithms must include ES256 (the default for applications)");
    }
    let t = &raw.tokens;
    if !(60..=30 * 86_400).contains(&t.max_lifetime) || !(30..=t.max_lifetime).contains(&t.default_lifetime) {
        bail!("tokens: need 60 <= max_lifetime <= 2592000 and 30 <= default_lifetime <= max_lifetime");
    }
    if t.key_rotation_interval != 0 && t.key_rotation_interval < 3600 {
        bail!("tokens.key_rotation_interval must be 0 (off) or at least 3600 seconds");
    }
    if !(1..=3600).contains(&t.key_check_interval) {
        bail!("tokens.key_check_interval must be 1 to 3600 seconds");
    }
    if !(0..=30 * 86_400).contains(&raw.clients.secret_rotation_grace) || !(0..=3600).contains(&raw.clients.cache_ttl) {
        bail!("clients: secret_rotation_grace must be 0 to 2592000 and cache_ttl 0 to 3600 seconds");
    }
    validate_auth(&raw.auth)?;
    raw.ca.validate().map_err(|e| anyhow::anyhow!(e))?;
    if let Some(tls) = &raw.tls {
        tls.listen.parse::<SocketAddr>().with_context(|| format!("tls.listen {:?}: expected ADDR:PORT", tls.listen))?;
        if !["off", "optional", "required"].contains(&tls.client_certificates.as_str()) {
            bail!("tls.client_certificates {:?}: expected off, optional or required", tls.client_certificates);
        }
        if tls.cert_file.is_some() != tls.key_file.is_some() {
            bail!("tls: cert_file and key_file go together");
        }
        if tls.cert_file.is_none() && tls.server_names.is_empty() {
            bail!("tls.server_names must name at least one host when no cert_file is given");
        }
    }
    if let Some(smtp) = &raw.smtp {
        smtp.validate().context("smtp")?;
    }
    if let Some(gw) = &raw.gateway {
        gw.validate().map_err(|e| anyhow::anyhow!("invalid [gateway] configuration: {e}"))?;
    }
    Ok(Settings {
        listen,
        issuer: raw.issuer.clone().map(|i| i.trim_end_matches('/').to_owned()),
        data_dir: raw.data_dir.clone(),
        database_url: raw.database_url.clone(),
        log: raw.log.clone(),
        algorithms,
        raw,
        config_file: None,
        flags: FlagOverrides::default(),
    })
}

/// `PORTCULLIS_<NAME>`, or the contents of the file named by `PORTCULLIS_<NAME>_FILE`.
pub fn secret_env(name: &str) -> anyhow::Result<Option<SecretString>> {
    if let Ok(v) = std::env::var(format!("PORTCULLIS_{name}")) {
        return Ok(Some(SecretString::from(v)));
    }
    if let Ok(path) = std::env::var(format!("PORTCULLIS_{name}_FILE")) {
        let v = std::fs::read_to_string(&path).with_context(|| format!("reading PORTCULLIS_{name}_FILE {path}"))?;
        return Ok(Some(SecretString::from(v.trim_end_matches(['\n', '\r']).to_owned())));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "version = 1\nlisten = \"127.0.0.1:0\"\n[tokens]\ndefault_lifetime = 600\n").unwrap();
        let s = load(Some(&p), FlagOverrides::default()).unwrap();
        assert_eq!(s.raw.tokens.default_lifetime, 600);
        assert_eq!(s.raw.tokens.max_lifetime, 86_400, "defaults fill the rest");
        std::fs::write(&p, "lisen = \"127.0.0.1:0\"\n").unwrap();
        let e = load(Some(&p), FlagOverrides::default()).unwrap_err().to_string();
        assert!(e.contains("lisen"), "{e}");
        std::fs::write(&p, "listen = \"nope\"\n").unwrap();
        assert!(load(Some(&p), FlagOverrides::default()).unwrap_err().to_string().contains("ADDR:PORT"));
        std::fs::write(&p, "[tokens]\nalgorithms = [\"HS256\"]\n").unwrap();
        assert!(load(Some(&p), FlagOverrides::default()).is_err());
        std::fs::write(&p, "[auth]\nlockout_threshold = 0\n").unwrap();
        assert!(load(Some(&p), FlagOverrides::default()).unwrap_err().to_string().contains("lockout_threshold"));
        std::fs::write(&p, "[auth]\nsession_idle_timeout = 600\nsesion_lifetime = 1\n").unwrap();
        assert!(load(Some(&p), FlagOverrides::default()).unwrap_err().to_string().contains("sesion_lifetime"));
        std::fs::write(&p, "[smtp]\nhost = \"mail.example.com\"\nfrom = \"a@b.test\"\nsecurity = \"none\"\n").unwrap();
        assert!(load(Some(&p), FlagOverrides::default()).is_err(), "plain SMTP to a remote host");
        // Flags win over the file.
        std::fs::write(&p, "listen = \"127.0.0.1:1\"\n").unwrap();
        let s = load(Some(&p), FlagOverrides { listen: Some("127.0.0.1:2".into()), ..Default::default() }).unwrap();
        assert_eq!(s.listen.port(), 2);
    }
}
