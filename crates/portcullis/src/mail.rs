//! The two [`Mailer`] adapters: [`SmtpMailer`] (lettre over SMTP with STARTTLS, implicit TLS
//! or, for a local relay only, plain text) and [`OutboxMailer`] (one `.eml` file per message
//! in a directory, used when no SMTP server is configured). Both send the same message:
//! multipart/alternative (text + HTML) with `Message-ID: <{mail.id}@{domain of from}>`.
//!
//! The SMTP password is never part of the configuration: the caller reads it from
//! `PORTCULLIS_SMTP_PASSWORD` (or `_FILE`) and hands it to [`build`].

use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use async_trait::async_trait;
use lettre::message::header::{ContentTransferEncoding, ContentType};
use lettre::message::{Body, Mailbox, MultiPart, SinglePart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use portcullis_core::clock::{Clock, SystemClock, UnixTime};
use portcullis_core::mail::{MailError, Mailer, OutgoingMail};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// The sender used by the outbox when no SMTP server (and so no `from`) is configured.
const OUTBOX_FROM: &str = "Portcullis <portcullis@localhost>";
/// Upper bound for `timeout_secs`: a stuck delivery holds the mail loop that long.
const MAX_TIMEOUT_SECS: u64 = 600;

/// `[smtp]` in the configuration file. Without it, mail goes to the local outbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmtpConfig {
    /// Host name or IP address of the SMTP server (IPv6 without brackets).
    pub host: String,
    /// Defaults by `security`: 587 for `starttls`, 465 for `tls`, 25 for `none`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// `starttls` (default; STARTTLS is required, never opportunistic), `tls` (implicit TLS)
    /// or `none` (plain text; only to a loopback host unless `allow_insecure`).
    #[serde(default = "default_security")]
    pub security: String,
    /// Authenticate as this user; the password comes from `PORTCULLIS_SMTP_PASSWORD(_FILE)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// The sender, e.g. `Portcullis <noreply@example.com>`. Its domain names the Message-ID.
    pub from: String,
    /// Connecting, and delivering one message as a whole, each give up after this long.
    #[serde(default = "default_timeout_secs")]
    pub timeout_secs: u64,
    /// Allow `security = "none"` to a host that is not loopback. Has no effect on TLS
    /// (certificates are always verified).
    #[serde(default)]
    pub allow_insecure: bool,
    /// An extra PEM root certificate (for a private SMTP server), trusted in addition to the
    /// built-in web PKI roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

fn default_security() -> String {
    "starttls".to_owned()
}

fn default_timeout_secs() -> u64 {
    10
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Security {
    StartTls,
    Tls,
    None,
}

impl SmtpConfig {
    /// A configuration with every default, for `host` and `from`.
    #[cfg(test)]
    pub fn new(host: impl Into<String>, from: impl Into<String>) -> Self {
        Self {
            host: host.into(),
            port: None,
            security: default_security(),
            username: None,
            from: from.into(),
            timeout_secs: default_timeout_secs(),
            allow_insecure: false,
            ca_file: None,
        }
    }

    fn security_mode(&self) -> anyhow::Result<Security> {
        match self.security.as_str() {
            "starttls" => Ok(Security::StartTls),
            "tls" => Ok(Security::Tls),
            "none" => Ok(Security::None),
            other => bail!(
                "smtp.security = {other:?} is not one of \"starttls\" (STARTTLS, port 587), \"tls\" (implicit TLS, port 465) or \"none\" (plain text, local relays only)"
            ),
        }
    }

    /// The port in use: `port`, or the default for `security`.
    pub fn effective_port(&self) -> u16 {
        match (self.port, self.security_mode()) {
            (Some(p), _) => p,
            (None, Ok(Security::Tls)) => 465,
            (None, Ok(Security::None)) => 25,
            (None, _) => 587,
        }
    }

    /// The parsed `from` mailbox.
    pub fn sender(&self) -> anyhow::Result<Mailbox> {
        self.from.trim().parse::<Mailbox>().map_err(|e| {
            anyhow::anyhow!(
                "smtp.from = {:?} is not a mailbox such as \"Portcullis <noreply@example.com>\": {e}",
                self.from
            )
        })
    }

    fn is_loopback_host(&self) -> bool {
        let h = self.host.trim();
        h.eq_ignore_ascii_case("localhost") || h.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
    }

    /// Checks everything that can be checked without touching the network or the disk.
    pub fn validate(&self) -> anyhow::Result<()> {
        let host = self.host.trim();
        if host.is_empty() {
            bail!("smtp.host is empty: set the SMTP server's host name (or remove [smtp] to use the local outbox)");
        }
        if host.contains("://") || host.contains('/') {
            bail!(
                "smtp.host = {host:?} must be a bare host name, not a URL (set smtp.port and smtp.security separately)"
            );
        }
        if host.starts_with('[') || host.chars().any(|c| c.is_whitespace() || c.is_control()) {
            bail!("smtp.host = {host:?} is not a host name (write IPv6 addresses without brackets)");
        }
        if host.parse::<IpAddr>().is_err() && host.contains(':') {
            bail!("smtp.host = {host:?} must not contain a port: use smtp.port");
        }
        let security = self.security_mode()?;
        if self.port == Some(0) {
            bail!("smtp.port must be between 1 and 65535");
        }
        if self.timeout_secs == 0 || self.timeout_secs > MAX_TIMEOUT_SECS {
            bail!("smtp.timeout_secs = {} must be between 1 and {MAX_TIMEOUT_SECS}", self.timeout_secs);
        }
        if security == Security::None && !self.is_loopback_host() && !self.allow_insecure {
            bail!(
                "smtp.security = \"none\" sends mail (and verification codes) in plain text, so it is only allowed to localhost, 127.0.0.1 or ::1; smtp.host is {host:?}: use \"starttls\" or \"tls\", or set smtp.allow_insecure = true if the network path is trusted"
            );
        }
        if security == Security::None && self.ca_file.is_some() {
            bail!("smtp.ca_file is set but smtp.security = \"none\" uses no TLS: remove one of them");
        }
        if let Some(u) = &self.username
            && (u.is_empty() || u.chars().any(|c| c.is_control()))
        {
            bail!("smtp.username is empty or contains control characters");
        }
        self.sender()?;
        Ok(())
    }
}

/// Builds the mailer: SMTP when configured, else the outbox in `outbox_dir`. Must run inside
/// the Tokio runtime (lettre's connection pool spawns its reaper task when it is built).
/// Dates come from the [`SystemClock`] adapter.
pub fn build(
    cfg: Option<&SmtpConfig>,
    password: Option<SecretString>,
    outbox_dir: &Path,
) -> anyhow::Result<Arc<dyn Mailer>> {
    match cfg {
        Some(cfg) => Ok(Arc::new(SmtpMailer::new(cfg, password, Arc::new(SystemClock))?)),
        None => {
            if password.is_some() {
                bail!("PORTCULLIS_SMTP_PASSWORD is set but there is no [smtp] section in the configuration");
            }
            let from = OUTBOX_FROM.parse::<Mailbox>().context("the outbox sender address")?;
            Ok(Arc::new(OutboxMailer::new(outbox_dir, from, Arc::new(SystemClock))?))
        }
    }
}

fn permanent(message: impl Into<String>) -> MailError {
    MailError { permanent: true, message: message.into() }
}

fn transient(message: impl Into<String>) -> MailError {
    MailError { permanent: false, message: message.into() }
}

/// Mail ids end up in a header and a file name: allow only a conservative alphabet.
fn checked_id(id: &str) -> Result<&str, MailError> {
    let ok = !id.is_empty()
        && id.len() <= 200
        && !id.starts_with('.')
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok { Ok(id) } else { Err(permanent("invalid mail id (allowed: letters, digits, '-', '_', '.')")) }
}

fn system_time(t: UnixTime) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(u64::try_from(t).unwrap_or(0))
}

/// The RFC 5322 message both adapters deliver. Errors here are permanent: retrying the same
/// input cannot fix them. Bodies are quoted-printable, so the message is 7-bit clean (no
/// 8BITMIME needed) and codes stay readable in the outbox files.
fn build_message(from: &Mailbox, mail: &OutgoingMail, date: SystemTime) -> Result<Message, MailError> {
    let id = checked_id(&mail.id)?;
    let to = mail.to.trim().parse::<Mailbox>().map_err(|e| permanent(format!("invalid recipient address: {e}")))?;
    let body = |s: &str| {
        Body::new_with_encoding(s.to_owned(), ContentTransferEncoding::QuotedPrintable)
            .map_err(|_| permanent("the body cannot be encoded"))
    };
    let parts = MultiPart::alternative()
        .singlepart(SinglePart::builder().header(ContentType::TEXT_PLAIN).body(body(&mail.text)?))
        .singlepart(SinglePart::builder().header(ContentType::TEXT_HTML).body(body(&mail.html)?));
    Message::builder()
        .message_id(Some(format!("<{id}@{}>", from.email.domain())))
        .date(date)
        .from(from.clone())
        .to(to)
        .subject(mail.subject.clone())
        .multipart(parts)
        .map_err(|e| permanent(format!("cannot build the message: {e}")))
}

/// Delivers over SMTP through a pool of connections.
pub struct SmtpMailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    clock: Arc<dyn Clock>,
    /// `host:port`, for error messages.
    endpoint: String,
    timeout: Duration,
}

impl std::fmt::Debug for SmtpMailer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpMailer")
            .field("endpoint", &self.endpoint)
            .field("from", &self.from.to_string())
            .finish_non_exhaustive()
    }
}

impl SmtpMailer {
    /// Validates `cfg`, reads `ca_file`, and builds the pooled transport (no connection is
    /// made yet). Must run inside the Tokio runtime.
    pub fn new(cfg: &SmtpConfig, password: Option<SecretString>, clock: Arc<dyn Clock>) -> anyhow::Result<Self> {
        cfg.validate()?;
        tokio::runtime::Handle::try_current().context("the SMTP mailer must be built inside the Tokio runtime")?;
        let security = cfg.security_mode()?;
        let from = cfg.sender()?;
        let host = cfg.host.trim().to_owned();
        let port = cfg.effective_port();
        let timeout = Duration::from_secs(cfg.timeout_secs);

        let tls = match security {
            Security::None => Tls::None,
            Security::StartTls | Security::Tls => {
                let mut params = TlsParameters::builder(host.clone());
                if let Some(path) = &cfg.ca_file {
                    let pem =
                        std::fs::read(path).with_context(|| format!("reading smtp.ca_file {}", path.display()))?;
                    if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
                        bail!("smtp.ca_file {} holds no PEM certificate", path.display());
                    }
                    let cert = Certificate::from_pem(&pem)
                        .with_context(|| format!("parsing smtp.ca_file {}", path.display()))?;
                    params = params.add_root_certificate(cert);
                }
                let params = params.build_rustls().context("building the SMTP TLS configuration")?;
                if security == Security::Tls { Tls::Wrapper(params) } else { Tls::Required(params) }
            }
        };

        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host.clone())
            .port(port)
            .tls(tls)
            .timeout(Some(timeout));
        match (&cfg.username, password) {
            (Some(user), Some(pw)) => {
                builder = builder.credentials(Credentials::new(user.clone(), pw.expose_secret().to_owned()));
            }
            (Some(_), None) => bail!(
                "smtp.username is set but no password was given (PORTCULLIS_SMTP_PASSWORD or PORTCULLIS_SMTP_PASSWORD_FILE)"
            ),
            (None, Some(_)) => {
                bail!("PORTCULLIS_SMTP_PASSWORD is set but smtp.username is not: set both or neither")
            }
            (None, None) => {}
        }
        let endpoint = if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
        Ok(Self { transport: builder.build(), from, clock, endpoint, timeout })
    }
}

#[async_trait]
impl Mailer for SmtpMailer {
    async fn send(&self, mail: &OutgoingMail) -> Result<(), MailError> {
        let message = build_message(&self.from, mail, system_time(self.clock.now()))?;
        // lettre bounds only the TCP connect by its timeout; a server that accepts and then
        // stalls would hold the delivery forever, so the whole exchange is bounded too.
        match tokio::time::timeout(self.timeout, self.transport.send(message)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(MailError {
                permanent: e.is_permanent(),
                // lettre's text: kind, SMTP code and the server's reply or the I/O error.
                message: format!("SMTP {}: {e}", self.endpoint),
            }),
            Err(_) => Err(transient(format!("SMTP {}: no answer within {} s", self.endpoint, self.timeout.as_secs()))),
        }
    }
}

/// Writes each message as an `.eml` file into a directory, for a first run without a mail
/// server (codes are also logged, see [`Mailer::is_local`]).
pub struct OutboxMailer {
    dir: PathBuf,
    from: Mailbox,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for OutboxMailer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboxMailer")
            .field("dir", &self.dir)
            .field("from", &self.from.to_string())
            .finish_non_exhaustive()
    }
}

/// Distinguishes temp files of concurrent writes.
static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl OutboxMailer {
    /// Creates `dir` (mode 0700) if it is missing.
    pub fn new(dir: &Path, from: Mailbox, clock: Arc<dyn Clock>) -> anyhow::Result<Self> {
        create_dir(dir).with_context(|| format!("creating the mail outbox {}", dir.display()))?;
        Ok(Self { dir: dir.to_owned(), from, clock })
    }
}

fn create_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// Writes `bytes` to `dir/name` atomically: a hidden temp file (0600, fsynced), then a rename.
fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    create_dir(dir)?;
    let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp = dir.join(format!(".{name}.{}.{n}.tmp", std::process::id()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, dir.join(name))?;
        // Make the rename durable; failure here loses nothing that was not already written.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[async_trait]
impl Mailer for OutboxMailer {
    async fn send(&self, mail: &OutgoingMail) -> Result<(), MailError> {
        let now = self.clock.now();
        let message = build_message(&self.from, mail, system_time(now))?;
        // The clock has whole seconds: names sort by second, then by id (time-ordered v7 UUIDs).
        let millis = now.max(0).saturating_mul(1000);
        let name = format!("{millis}-{}.eml", checked_id(&mail.id)?);
        let bytes = Zeroizing::new(message.formatted());
        let dir = self.dir.clone();
        let written = name.clone();
        tokio::task::spawn_blocking(move || write_atomic(&dir, &name, &bytes))
            .await
            .map_err(|e| transient(format!("outbox writer task failed: {e}")))?
            .map_err(|e| transient(format!("writing {} to the outbox {}: {e}", written, self.dir.display())))
    }

    fn is_local(&self) -> bool {
        true
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
mod tests {
    use std::collections::HashMap;
    use std::os::unix::fs::PermissionsExt;
    use std::time::Instant;

    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    use tokio::net::TcpListener;
    use tokio::sync::mpsc;

    use portcullis_core::clock::ManualClock;

    use super::*;

    fn sample() -> OutgoingMail {
        OutgoingMail {
            id: "0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b".into(),
            to: "Alice Example <alice@example.org>".into(),
            subject: "Your Portcullis sign-in code: 482913".into(),
            text: "Enter this code to finish signing in:\n\n    482913\n\nIt expires in 10 minutes \u{2014} once.\n".into(),
            html: "<!DOCTYPE html>\n<html><body><p style=\"font-size:28px\">482913</p><p>Expires in 10 minutes \u{2014} once.</p></body></html>\n".into(),
        }
    }

    /// A parsed message: unfolded top-level headers (lowercase names) and each MIME part's
    /// headers with its quoted-printable-decoded body.
    struct Parsed {
        headers: HashMap<String, String>,
        parts: Vec<(HashMap<String, String>, String)>,
    }

    fn parse_headers(block: &str) -> HashMap<String, String> {
        let mut out: HashMap<String, String> = HashMap::new();
        let mut last: Option<String> = None;
        for line in block.split("\r\n") {
            if line.starts_with([' ', '\t']) {
                let k = last.clone().expect("continuation without a header");
                out.get_mut(&k).unwrap().push_str(line);
            } else {
                let (k, v) = line.split_once(':').unwrap_or_else(|| panic!("bad header line {line:?}"));
                let k = k.to_ascii_lowercase();
                out.insert(k.clone(), v.trim().to_owned());
                last = Some(k);
            }
        }
        out
    }

    fn decode_qp(s: &str) -> String {
        let s = s.replace("=\r\n", "");
        let b = s.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'=' {
                out.push(u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap(), 16).unwrap());
                i += 3;
            } else {
                out.push(b[i]);
                i += 1;
            }
        }
        String::from_utf8(out).unwrap()
    }

    fn parse(raw: &[u8]) -> Parsed {
        let raw = std::str::from_utf8(raw).expect("the message is not UTF-8");
        assert!(raw.is_ascii(), "the message is 7-bit clean");
        let (head, body) = raw.split_once("\r\n\r\n").expect("no header/body separator");
        let headers = parse_headers(head);
        let ct = &headers["content-type"];
        assert!(ct.starts_with("multipart/alternative"), "{ct}");
        let boundary = ct.split("boundary=").nth(1).unwrap().trim_matches('"').to_owned();
        let delim = format!("--{boundary}");
        let mut parts = Vec::new();
        let sections: Vec<&str> = body.split(&delim).collect();
        assert!(sections.last().unwrap().starts_with("--"), "closing delimiter");
        for section in &sections[1..sections.len() - 1] {
            let section = section.strip_prefix("\r\n").unwrap();
            let (ph, pb) = section.split_once("\r\n\r\n").unwrap();
            let ph = parse_headers(ph);
            assert_eq!(ph["content-transfer-encoding"], "quoted-printable");
            parts.push((ph, decode_qp(pb.strip_suffix("\r\n").unwrap_or(pb))));
        }
        Parsed { headers, parts }
    }

    fn check_message(p: &Parsed, mail: &OutgoingMail) {
        assert_eq!(p.headers["message-id"], format!("<{}@example.com>", mail.id));
        assert_eq!(p.headers["subject"], mail.subject);
        assert!(p.headers["to"].contains("alice@example.org"), "{}", p.headers["to"]);
        assert!(p.headers["from"].contains("noreply@example.com"));
        assert!(p.headers.contains_key("date"));
        assert_eq!(p.parts.len(), 2);
        assert!(p.parts[0].0["content-type"].starts_with("text/plain"));
        assert!(p.parts[1].0["content-type"].starts_with("text/html"));
        assert_eq!(p.parts[0].1.replace("\r\n", "\n"), mail.text);
        assert_eq!(p.parts[1].1.replace("\r\n", "\n"), mail.html);
        assert!(p.parts[0].1.contains("482913") && p.parts[1].1.contains("482913"));
    }

    fn from() -> Mailbox {
        "Portcullis <noreply@example.com>".parse().unwrap()
    }

    #[tokio::test]
    async fn outbox_writes_one_private_parseable_eml() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("outbox");
        let m = OutboxMailer::new(&dir, from(), Arc::new(ManualClock::new(1_800_000_000))).unwrap();
        assert!(m.is_local());
        assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
        let mail = sample();
        m.send(&mail).await.unwrap();

        let files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
        assert_eq!(files.len(), 1, "no temp file left behind: {files:?}");
        assert_eq!(files[0], dir.join(format!("1800000000000-{}.eml", mail.id)));
        assert_eq!(std::fs::metadata(&files[0]).unwrap().permissions().mode() & 0o777, 0o600);
        let parsed = parse(&std::fs::read(&files[0]).unwrap());
        check_message(&parsed, &mail);
        assert_eq!(parsed.headers["date"], "Fri, 15 Jan 2027 08:00:00 +0000");

        // Through `build` with no SMTP configured.
        let dir2 = tmp.path().join("a/b");
        let m = build(None, None, &dir2).unwrap();
        assert!(m.is_local());
        m.send(&mail).await.unwrap();
        assert_eq!(std::fs::read_dir(&dir2).unwrap().count(), 1);
    }

    #[tokio::test]
    async fn bad_recipient_or_id_is_permanent_and_never_echoes_the_body() {
        let tmp = tempfile::tempdir().unwrap();
        let m = OutboxMailer::new(tmp.path(), from(), Arc::new(SystemClock)).unwrap();
        for mail in [
            OutgoingMail { to: "not an address".into(), ..sample() },
            OutgoingMail { to: "a@b.c\r\nBcc: evil@example.net".into(), ..sample() },
            OutgoingMail { id: "../../etc/passwd".into(), ..sample() },
        ] {
            let e = m.send(&mail).await.unwrap_err();
            assert!(e.permanent, "{e}");
            assert!(!e.message.contains("482913"), "{e}");
        }
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
    }

    fn parse_cfg(toml_text: &str) -> Result<SmtpConfig, String> {
        use figment::Figment;
        use figment::providers::{Format, Toml};
        Figment::from(Toml::string(toml_text)).extract::<SmtpConfig>().map_err(|e| e.to_string())
    }

    #[test]
    fn config_defaults_and_validation() {
        let c = parse_cfg("host = \"smtp.example.com\"\nfrom = \"Portcullis <noreply@example.com>\"").unwrap();
        assert_eq!(c, SmtpConfig::new("smtp.example.com", "Portcullis <noreply@example.com>"));
        assert_eq!((c.security.as_str(), c.effective_port(), c.timeout_secs), ("starttls", 587, 10));
        c.validate().unwrap();
        let port = |s: &str| SmtpConfig { security: s.into(), ..c.clone() }.effective_port();
        assert_eq!((port("tls"), port("none")), (465, 25));

        // Plain text only to loopback, unless explicitly allowed.
        let none = |host: &str| SmtpConfig { security: "none".into(), ..SmtpConfig::new(host, c.from.clone()) };
        let err = none("smtp.example.com").validate().unwrap_err().to_string();
        assert!(err.contains("plain text") && err.contains("allow_insecure"), "{err}");
        assert!(none("10.0.0.5").validate().is_err());
        for local in ["localhost", "127.0.0.1", "::1"] {
            none(local).validate().unwrap();
        }
        SmtpConfig { allow_insecure: true, ..none("smtp.example.com") }.validate().unwrap();

        // A bad from, security, timeout or host.
        for bad_from in ["", "Portcullis", "noreply@", "<noreply@example.com"] {
            let err = SmtpConfig { from: bad_from.into(), ..c.clone() }.validate().unwrap_err().to_string();
            assert!(err.contains("smtp.from"), "{bad_from:?}: {err}");
        }
        let err = SmtpConfig { security: "ssl".into(), ..c.clone() }.validate().unwrap_err().to_string();
        assert!(err.contains("smtp.security"), "{err}");
        assert!(SmtpConfig { timeout_secs: 0, ..c.clone() }.validate().is_err());
        assert!(SmtpConfig { port: Some(0), ..c.clone() }.validate().is_err());
        for bad_host in ["", "smtp://smtp.example.com", "smtp.example.com:587", "[::1]", "a b"] {
            assert!(SmtpConfig { host: bad_host.into(), ..c.clone() }.validate().is_err(), "{bad_host:?}");
        }

        // Unknown keys are refused, including a password in the file.
        let err = parse_cfg("host = \"h\"\nfrom = \"a@b.c\"\npassword = \"x\"").unwrap_err();
        assert!(err.contains("password"), "{err}");
        assert!(parse_cfg("host = \"h\"").unwrap_err().contains("from"));
    }

    #[tokio::test]
    async fn build_checks_credentials_and_ca_file() {
        let tmp = tempfile::tempdir().unwrap();
        let c = SmtpConfig::new("smtp.example.com", "noreply@example.com");
        let pw = || Some(SecretString::from("pw"));
        let build_err =
            |c: &SmtpConfig, pw: Option<SecretString>| build(Some(c), pw, tmp.path()).err().unwrap().to_string();
        assert!(build_err(&c, pw()).contains("username"));
        let with_user = SmtpConfig { username: Some("u".into()), ..c.clone() };
        assert!(build_err(&with_user, None).contains("password"));
        let m = build(Some(&with_user), pw(), tmp.path()).unwrap();
        assert!(!m.is_local());
        assert!(build(None, pw(), tmp.path()).is_err());
        let missing = SmtpConfig { ca_file: Some(tmp.path().join("nope.pem")), ..c.clone() };
        assert!(build_err(&missing, None).contains("ca_file"));
        let junk = tmp.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        let junk = SmtpConfig { ca_file: Some(junk), ..c.clone() };
        assert!(build_err(&junk, None).contains("ca_file"));
    }

    /// How the fake server answers RCPT TO.
    #[derive(Clone, Copy)]
    enum Rcpt {
        Accept,
        Reject,
    }

    /// A minimal SMTP server on 127.0.0.1: the dialogue lettre needs, one message's DATA
    /// (dot-unstuffed) sent on the channel per accepted message.
    async fn fake_smtp(rcpt: Rcpt) -> (u16, mpsc::UnboundedReceiver<Vec<u8>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let (r, mut w) = sock.into_split();
                    let mut lines = BufReader::new(r);
                    w.write_all(b"220 fake.test ESMTP\r\n").await.unwrap();
                    let mut line = String::new();
                    loop {
                        line.clear();
                        if lines.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        let verb = line.get(..4).unwrap_or("").to_ascii_uppercase();
                        let reply: &[u8] = match verb.as_str() {
                            "EHLO" => b"250 fake.test\r\n",
                            "MAIL" | "RSET" | "NOOP" => b"250 OK\r\n",
                            "RCPT" => match rcpt {
                                Rcpt::Accept => b"250 OK\r\n",
                                Rcpt::Reject => b"550 5.1.1 No such user\r\n",
                            },
                            "DATA" => {
                                w.write_all(b"354 go ahead\r\n").await.unwrap();
                                let mut data = Vec::new();
                                loop {
                                    line.clear();
                                    if lines.read_line(&mut line).await.unwrap_or(0) == 0 {
                                        return;
                                    }
                                    if line == ".\r\n" {
                                        break;
                                    }
                                    let l = line.strip_prefix('.').unwrap_or(&line);
                                    data.extend_from_slice(l.as_bytes());
                                }
                                let _ = tx.send(data);
                                b"250 queued\r\n"
                            }
                            "QUIT" => {
                                let _ = w.write_all(b"221 bye\r\n").await;
                                return;
                            }
                            _ => b"502 not implemented\r\n",
                        };
                        w.write_all(reply).await.unwrap();
                    }
                });
            }
        });
        (port, rx)
    }

    fn local_cfg(port: u16, timeout_secs: u64) -> SmtpConfig {
        SmtpConfig {
            port: Some(port),
            security: "none".into(),
            timeout_secs,
            ..SmtpConfig::new("127.0.0.1", "Portcullis <noreply@example.com>")
        }
    }

    #[tokio::test]
    async fn smtp_round_trip() {
        let (port, mut rx) = fake_smtp(Rcpt::Accept).await;
        let tmp = tempfile::tempdir().unwrap();
        let m = build(Some(&local_cfg(port, 5)), None, tmp.path()).unwrap();
        assert!(!m.is_local());
        let mail = sample();
        m.send(&mail).await.unwrap();
        let data = rx.recv().await.unwrap();
        check_message(&parse(&data), &mail);
        // A second message reuses the pooled connection.
        m.send(&OutgoingMail { id: "second".into(), ..mail }).await.unwrap();
        assert!(String::from_utf8(rx.recv().await.unwrap()).unwrap().contains("<second@example.com>"));
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0, "nothing in the outbox");
    }

    #[tokio::test]
    async fn smtp_5xx_is_permanent() {
        let (port, _rx) = fake_smtp(Rcpt::Reject).await;
        let tmp = tempfile::tempdir().unwrap();
        let m = build(Some(&local_cfg(port, 5)), None, tmp.path()).unwrap();
        let e = m.send(&sample()).await.unwrap_err();
        assert!(e.permanent, "{e}");
        assert!(e.message.contains("550"), "{e}");
        assert!(!e.message.contains("482913"), "{e}");
    }

    #[tokio::test]
    async fn smtp_unreachable_or_silent_is_transient_within_the_timeout() {
        let tmp = tempfile::tempdir().unwrap();
        // Nothing listens: take a free port and close it again.
        let port = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap().port();
        let m = build(Some(&local_cfg(port, 2)), None, tmp.path()).unwrap();
        let started = Instant::now();
        let e = m.send(&sample()).await.unwrap_err();
        assert!(!e.permanent, "{e}");
        assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());

        // A server that accepts but never greets: bounded by the timeout, not only the connect.
        let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = silent.local_addr().unwrap().port();
        let m = build(Some(&local_cfg(port, 1)), None, tmp.path()).unwrap();
        let started = Instant::now();
        let e = m.send(&sample()).await.unwrap_err();
        assert!(!e.permanent, "{e}");
        assert!(e.message.contains("no answer"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
        drop(silent);
    }
}
