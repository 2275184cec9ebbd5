//! Client certificates (edited or raw DER): the gateway's `PeerCertificate` and its XFCC, the
//! key a certificate carries, a signing certificate's JWK and renewal's CSR stand-in all agree
//! with an independent parse. See `src/certs.rs`.
#![no_main]

use std::sync::OnceLock;

use portcullis_fuzz::certs::{certificate_fixtures, check_client_certificate, der_from_bytes};

static CERTS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let certs = CERTS.get_or_init(certificate_fixtures);
    check_client_certificate(&der_from_bytes(certs, data));
});
