//! Cryptography the core owns: the key vault (master key, AEAD at rest, keyed hashes), secret
//! generation, password hashing, JWS signing/verification and the signing key ring.

pub mod jwk;
pub mod jws;
pub mod keyring;
pub mod password;
pub mod secrets;
pub mod signing;
pub mod totp;
pub mod vault;
