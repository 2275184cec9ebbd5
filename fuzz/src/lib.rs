//! Support for the fuzz targets: the invariant checks and the decoders from raw fuzzer bytes.
//! Each module is also compiled (with `#[path]`) by the stable randomized runner of the crate
//! that owns the parsers, which drives it with a seeded PRNG in every `cargo test`:
//!
//! | module | parsers | stable runner |
//! |---|---|---|
//! | `invariants` | gateway paths, headers, SOAP, bearer JWS, our JWKs | `crates/portcullis-gateway/tests/parsers_fuzz.rs` |
//! | `login`, `certs` | gateway sign-in callback, client certificates | the same |
//! | `tokens` | access-token claims, client assertions, clients' JWKS | `crates/portcullis-core/tests/parsers_fuzz.rs` |
//! | `redirects` | redirect URI registration, client redirects, authorization-time matching | core's and `crates/portcullis-web/tests/parsers_fuzz.rs` |
//! | `web` | form and JSON bodies, `return_to` | portcullis-web's |
//!
//! See docs/fuzzing.md.

pub mod bytes;
pub mod certs;
pub mod invariants;
pub mod login;
pub mod redirects;
pub mod tokens;
pub mod web;
