//! The gateway's browser sign-in (`login.rs`): the callback's query decoded strictly, the flow
//! cookie found only by its own state, and the return URL always on the gateway's origin. See
//! `src/login.rs`.
#![no_main]

use portcullis_fuzz::login::{
    check_callback, check_flow_of, check_flow_round_trip, check_safe_return, login_case_from_bytes,
};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let (query, return_to, cookies, state, tweak) = login_case_from_bytes(data);
    check_callback(query.as_deref());
    check_safe_return(&return_to);
    check_flow_of(&cookies, &state);
    let other = cookies.get(http::header::COOKIE).and_then(|v| v.to_str().ok()).unwrap_or("");
    check_flow_round_trip(&return_to, other, tweak);
});
