//! Form bodies (`body.rs`: `oauth_form`, `Form::parse`, `has_media_type`): the content type,
//! then the size limit, then UTF-8, then WHATWG form decoding with repeated parameters refused
//! and empty values absent. See `src/web.rs`.
#![no_main]

use portcullis_fuzz::web::{body_case_from_bytes, check_form_parse, check_oauth_form};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let (ct, body) = body_case_from_bytes(data, "application/x-www-form-urlencoded");
    check_oauth_form(ct.as_deref(), body);
    check_form_parse(body);
});
