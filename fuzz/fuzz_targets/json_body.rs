//! JSON bodies (`body.rs`: `json_body`): the content type, the size limit, serde's verdict
//! (unknown fields refused), and a 400 that never quotes a value. See `src/web.rs`.
#![no_main]

use portcullis_fuzz::web::{body_case_from_bytes, check_json_body, json_from_bytes};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let (ct, body) = body_case_from_bytes(data, "application/json");
    check_json_body(ct.as_deref(), &json_from_bytes(body));
});
