//! Redirect URIs: registration (`check_redirect_uri`, `check_jwks_uri`) accepts exactly the
//! documented URIs, unchanged, and a browser reads an accepted one as https (or http to a
//! loopback host) without credentials or fragment; `ClientRedirect::url` keeps the registered
//! URI and its query and appends exactly our parameters. Authorization-time matching needs a
//! store and runs in `crates/portcullis-web/tests/parsers_fuzz.rs`. See `src/redirects.rs`.
#![no_main]

use portcullis_fuzz::bytes::{Bytes, from_pieces};
use portcullis_fuzz::redirects::{
    URI_PIECES, check_client_redirect, check_registered_jwks_uri, check_registered_redirect_uri, params_from_bytes,
};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut b = Bytes(data);
    let uri = from_pieces(&URI_PIECES, b.field(b'\n'));
    check_registered_redirect_uri(&uri);
    check_registered_jwks_uri(&uri);
    check_client_redirect(&uri, &params_from_bytes(b.rest()));
});
