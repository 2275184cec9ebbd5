//! A small embedded migration runner (sqlx's `migrate!` would build sqlx's macro crate and a
//! second copy of the drivers). Migrations live in `migrations/{sqlite,postgres}` with the
//! same numbers; each runs once in its own transaction and is recorded with a checksum, and a
//! recorded migration whose file changed is refused.

pub struct Migration {
    pub version: i64,
    pub name: &'static str,
    pub sql: &'static str,
}

macro_rules! migrations {
    ($dir:literal: $($version:literal => $name:literal),* $(,)?) => {
        &[$(Migration { version: $version, name: $name, sql: include_str!(concat!("../migrations/", $dir, "/", $name, ".sql")) }),*]
    };
}

pub const SQLITE: &[Migration] = migrations!("sqlite": 1 => "0001_initial", 2 => "0002_auth_api", 3 => "0003_pki",
    4 => "0004_oidc", 5 => "0005_gateway_browser_sessions", 6 => "0006_audit_chain",
    7 => "0007_scale_out");
pub const POSTGRES: &[Migration] = migrations!("postgres": 1 => "0001_initial", 2 => "0002_auth_api", 3 => "0003_pki",
    4 => "0004_oidc", 5 => "0005_gateway_browser_sessions", 6 => "0006_audit_chain",
    7 => "0007_scale_out");

/// FNV-1a 64 of the file: detects edited migrations; not a security boundary.
pub fn checksum(sql: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in sql.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

pub const CREATE_TABLE: &str = "CREATE TABLE IF NOT EXISTS portcullis_migrations (
    version BIGINT PRIMARY KEY, name TEXT NOT NULL, checksum TEXT NOT NULL, applied_at BIGINT NOT NULL)";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_backends_have_the_same_migration_numbers_and_names() {
        let a: Vec<_> = SQLITE.iter().map(|m| (m.version, m.name)).collect();
        let b: Vec<_> = POSTGRES.iter().map(|m| (m.version, m.name)).collect();
        assert_eq!(a, b);
        for (i, m) in SQLITE.iter().enumerate() {
            assert_eq!(m.version, i as i64 + 1, "versions are consecutive from 1");
            assert!(m.name.starts_with(&format!("{:04}_", m.version)));
        }
        // Every migration directory file is listed.
        for dir in ["sqlite", "postgres"] {
            let n = std::fs::read_dir(format!("{}/migrations/{dir}", env!("CARGO_MANIFEST_DIR"))).unwrap().count();
            assert_eq!(n, SQLITE.len(), "{dir} has unlisted migration files");
        }
    }
}
