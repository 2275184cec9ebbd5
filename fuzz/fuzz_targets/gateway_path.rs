//! Request-path checking and route matching (`config.rs`): `normalise_path` accepts exactly the
//! documented paths and returns them unchanged; `ValidatedConfig::route` picks the longest
//! segment-boundary prefix, case-sensitively, then the method. Also tried in upper, lower and
//! swapped case. See `src/invariants.rs`.
#![no_main]

use std::sync::OnceLock;

use portcullis_fuzz::invariants::{check_path_and_routes, path_case_from_bytes, route_fixtures};

static ROUTES: OnceLock<Vec<portcullis_gateway::config::ValidatedConfig>> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let routes = ROUTES.get_or_init(route_fixtures);
    let (method, path) = path_case_from_bytes(data);
    check_path_and_routes(routes, &method, &path);
});
