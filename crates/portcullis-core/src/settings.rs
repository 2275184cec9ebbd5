//! The core's typed settings, built by the binary from its configuration. Values here are
//! already valid: the binary's parser refuses anything else.

use crate::crypto::signing::Algorithm;

/// `Cache-Control: max-age` of the JWKS document, in seconds.
pub const JWKS_MAX_AGE: i64 = 60;

#[derive(Debug, Clone)]
pub struct CoreSettings {
    /// External base URL without a trailing slash; the `iss` of every token.
    pub issuer: String,
    /// Algorithms with a signing key; applications may choose among them.
    pub signing_algorithms: Vec<Algorithm>,
    pub default_access_token_lifetime: i64,
    pub max_access_token_lifetime: i64,
    /// Seconds between automatic signing-key rotations; 0 disables them.
    pub key_rotation_interval: i64,
    /// How often every node re-reads the key table (seconds).
    pub key_check_interval: i64,
    /// Default grace period during which a rotated-out client secret still works.
    pub secret_rotation_grace: i64,
    /// How long a cached client or service list may be served before it is re-read.
    pub cache_ttl: i64,
    pub bootstrap_admin_email: String,
    /// Failed client authentications allowed per client id and per IP address each minute.
    pub auth_failures_per_minute: u32,
    pub auth: AuthSettings,
    pub ca: CaSettings,
}

/// The certificate authority: validity per certificate type, CRL lifetime, expiry notices and
/// client assertions. Also the `[ca]` section of the configuration file (the binary checks
/// the ranges with [`CaSettings::validate`]).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CaSettings {
    /// Default and longest validity of each certificate type, in days.
    pub transport_validity_days: i64,
    pub transport_max_validity_days: i64,
    pub server_transport_validity_days: i64,
    pub server_transport_max_validity_days: i64,
    pub signing_validity_days: i64,
    pub signing_max_validity_days: i64,
    /// Issuing CA lifetime when created or rotated, in days.
    pub issuing_ca_validity_days: i64,
    /// `nextUpdate − thisUpdate` of every CRL (seconds); CRLs are re-signed at half of it.
    pub crl_lifetime: i64,
    /// Organisation admins are emailed this many days before a certificate expires (0: never).
    pub expiry_notice_days: i64,
    /// Longest `exp − now` a `private_key_jwt` client assertion may have (seconds).
    pub assertion_max_lifetime: i64,
}

impl Default for CaSettings {
    fn default() -> Self {
        Self {
            transport_validity_days: 90,
            transport_max_validity_days: 397,
            server_transport_validity_days: 90,
            server_transport_max_validity_days: 397,
            signing_validity_days: 365,
            signing_max_validity_days: 825,
            issuing_ca_validity_days: 5 * 365,
            crl_lifetime: 86_400,
            expiry_notice_days: 14,
            assertion_max_lifetime: 300,
        }
    }
}

impl CaSettings {
    /// Default and maximum validity (days) of a certificate type.
    pub fn validity(&self, t: crate::model::CertificateType) -> (i64, i64) {
        use crate::model::CertificateType as T;
        match t {
            T::Transport => (self.transport_validity_days, self.transport_max_validity_days),
            T::ServerTransport => (self.server_transport_validity_days, self.server_transport_max_validity_days),
            T::Signing => (self.signing_validity_days, self.signing_max_validity_days),
        }
    }

    /// Refuses values that make no sense, naming the key.
    pub fn validate(&self) -> Result<(), String> {
        for t in crate::model::CertificateType::ALL {
            let (d, m) = self.validity(t);
            if !(1..=3650).contains(&m) || !(1..=m).contains(&d) {
                return Err(format!(
                    "ca: {} validity must be 1 to 3650 days and at most its maximum (got {d} of {m})",
                    t.as_str()
                ));
            }
        }
        if !(30..=20 * 365).contains(&self.issuing_ca_validity_days) {
            return Err("ca.issuing_ca_validity_days must be 30 to 7300".into());
        }
        if !(300..=30 * 86_400).contains(&self.crl_lifetime) {
            return Err("ca.crl_lifetime must be 300 to 2592000 seconds".into());
        }
        if !(0..=365).contains(&self.expiry_notice_days) {
            return Err("ca.expiry_notice_days must be 0 to 365".into());
        }
        if !(10..=3600).contains(&self.assertion_max_lifetime) {
            return Err("ca.assertion_max_lifetime must be 10 to 3600 seconds".into());
        }
        Ok(())
    }
}

/// Login sessions, emailed codes, lockout and the password-hashing limit. Also the `[auth]`
/// section of the configuration file, as is (the binary checks the ranges).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSettings {
    /// A session unused this long ends (seconds).
    pub session_idle_timeout: i64,
    /// A session ends this long after it was created, whatever the activity (seconds).
    pub session_lifetime: i64,
    /// How long an emailed code stays valid (seconds).
    pub code_lifetime: i64,
    /// Wrong codes accepted per verification before it is dead.
    pub code_max_attempts: u32,
    /// Login / verification / reset attempts per account (email) and per client IP, per minute.
    pub attempts_per_account_per_minute: u32,
    pub attempts_per_ip_per_minute: u32,
    /// Consecutive failed logins that lock an account, and for how long (seconds).
    pub lockout_threshold: u32,
    pub lockout_duration: i64,
    /// Argon2id hashes computed at once (default: the number of cores) …
    pub password_hash_concurrency: usize,
    /// … and how long a request waits for a turn before 429 (milliseconds).
    pub password_queue_wait_ms: u64,
    /// Longest API-key lifetime a user may ask for (seconds); keys may also never expire.
    pub api_key_max_lifetime: i64,
}

impl Default for AuthSettings {
    fn default() -> Self {
        Self {
            session_idle_timeout: 1800,
            session_lifetime: 12 * 3600,
            code_lifetime: 600,
            code_max_attempts: 5,
            attempts_per_account_per_minute: 10,
            attempts_per_ip_per_minute: 60,
            lockout_threshold: 10,
            lockout_duration: 900,
            password_hash_concurrency: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2),
            password_queue_wait_ms: 2000,
            api_key_max_lifetime: 400 * 86_400,
        }
    }
}

impl CoreSettings {
    pub fn for_issuer(issuer: &str) -> Self {
        Self {
            issuer: issuer.trim_end_matches('/').to_owned(),
            signing_algorithms: Algorithm::ALL.to_vec(),
            default_access_token_lifetime: 900,
            max_access_token_lifetime: 86_400,
            key_rotation_interval: 90 * 86_400,
            key_check_interval: 30,
            secret_rotation_grace: 86_400,
            cache_ttl: 30,
            bootstrap_admin_email: "admin@portcullis.local".into(),
            auth_failures_per_minute: 30,
            auth: AuthSettings::default(),
            ca: CaSettings::default(),
        }
    }
    /// How long a retired key stays published after it stopped signing here: every token it
    /// signed has expired by then, including those signed by nodes that learn of the rotation
    /// only at their next key check.
    pub fn retired_key_publish_secs(&self) -> i64 {
        self.max_access_token_lifetime + self.key_check_interval + JWKS_MAX_AGE + crate::tokens::SKEW_SECS + 300
    }

    /// How long a `next` key must have been published before it may sign: every node has
    /// re-read the key table and every JWKS cache honouring our `max-age` has refreshed.
    pub fn key_publish_delay(&self) -> i64 {
        JWKS_MAX_AGE + self.key_check_interval + 30
    }
}
