//! Support for the fuzz targets: the invariant checks and the decoders from raw fuzzer bytes.
//! `crates/portcullis-gateway/tests/parsers_fuzz.rs` compiles the same `invariants.rs` (with
//! `#[path]`) and drives it with a seeded PRNG on stable, so these checks run in every
//! `cargo test` even where `cargo fuzz` cannot.

pub mod invariants;
