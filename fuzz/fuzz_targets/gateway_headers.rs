//! The header pipeline (`headers.rs`) on arbitrary header lines: `check_framing`,
//! `is_websocket_upgrade`, `forwarded_for` (no trusted proxies, then a fixed list),
//! `strip_identity_headers`, `remove_hop_by_hop`, `apply_forwarded`, `set_identity_headers` and
//! `xfcc_value`, each against its documented rules. See `src/invariants.rs`.
#![no_main]

use portcullis_fuzz::invariants::{HeaderCase, check_headers};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    check_headers(&HeaderCase::from_bytes(data));
});
