//! The strict PEM reader and the certificate-bundle splitter: never a panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = portcullis_core::pki::pem_decode(text, &["CERTIFICATE REQUEST", "CERTIFICATE"], "input");
        let _ = portcullis_core::pki::pem_certificates(text);
    }
});
