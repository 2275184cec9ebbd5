//! The sign-in pages' `return_to` (`pages.rs`: `safe_return_to`): unchanged or `/account`, and
//! an accepted one resolves, by a browser's rules, to the same origin under `/account`,
//! `/portal` or `/oauth2/authorize`. See `src/web.rs`.
#![no_main]

use portcullis_fuzz::bytes::from_pieces;
use portcullis_fuzz::web::{RETURN_PIECES, check_return_to};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    check_return_to(&from_pieces(&RETURN_PIECES, data));
});
