//! Portcullis core: the domain model, the use cases (tokens, RBAC, keys, bootstrap), the port
//! traits (`Store`, `Clock`, `KeyVault`) and the cryptography. It names no HTTP framework and
//! no database driver; adapters live in `portcullis-store` and `portcullis-web`.

pub mod audit_chain;
pub mod ca;
pub mod clock;
pub mod crypto;
pub mod error;
pub mod ids;
pub mod mail;
pub mod model;
pub mod pki;
pub mod ratelimit;
pub mod settings;
pub mod store;
pub mod tokens;
pub mod usecases;

pub use error::{Error, OAuthError, OAuthErrorCode, Result, StoreError};
pub use usecases::Portcullis;
