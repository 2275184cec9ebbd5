//! SOAP version detection and faults (`soap.rs`): `detect` follows its documented order and looks
//! at no more than `SNIFF_LEN` bytes; `fault` is well-formed XML carrying the escaped reason and
//! error id, with nothing injected. See `src/invariants.rs`.
#![no_main]

use portcullis_fuzz::invariants::{check_soap_detect, check_soap_fault, soap_case_from_bytes};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let (headers, body, reason, error_id) = soap_case_from_bytes(data);
    check_soap_detect(&headers, &body);
    check_soap_fault(&reason, &error_id);
});
