//! CSR parsing from DER and from PEM text: never a panic, and nothing is accepted unless its
//! self-signature verified (`parse_csr_der` checks it before returning `Ok`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = portcullis_core::pki::parse_csr_der(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = portcullis_core::pki::parse_csr(text);
    }
});
