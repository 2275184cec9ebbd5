//! User passwords: Argon2id (m=19456 KiB, t=2, p=1, the OWASP minimum). Verification is
//! expensive by design; callers run it on a blocking thread behind a concurrency limit.

use argon2::Argon2;
use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use secrecy::{ExposeSecret, SecretString};

use crate::error::{Error, Result};

pub const MIN_PASSWORD_LEN: usize = 12;
pub const MAX_PASSWORD_LEN: usize = 1024;

pub fn check_password_policy(p: &SecretString) -> Result<()> {
    let n = p.expose_secret().chars().count();
    if n < MIN_PASSWORD_LEN || p.expose_secret().len() > MAX_PASSWORD_LEN {
        return Err(Error::invalid(format!("password must be {MIN_PASSWORD_LEN} to {MAX_PASSWORD_LEN} characters")));
    }
    Ok(())
}

/// PHC string `$argon2id$v=19$m=19456,t=2,p=1$…`.
pub fn hash_password(p: &SecretString) -> Result<String> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default().hash_password(p.expose_secret().as_bytes(), &salt).map(|h| h.to_string()).map_err(Error::internal)
}

pub fn verify_password(p: &SecretString, phc: &str) -> bool {
    match PasswordHash::new(phc) {
        Ok(h) => Argon2::default().verify_password(p.expose_secret().as_bytes(), &h).is_ok(),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argon2id_round_trip() {
        let p = SecretString::from("correct horse battery");
        let h = hash_password(&p).unwrap();
        assert!(h.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"));
        assert!(verify_password(&p, &h));
        assert!(!verify_password(&SecretString::from("wrong horse battery"), &h));
        assert!(!verify_password(&p, "garbage"));
        assert!(check_password_policy(&SecretString::from("short")).is_err());
    }
}
