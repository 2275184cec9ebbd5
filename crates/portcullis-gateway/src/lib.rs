//! The Portcullis data plane: TLS/mTLS listeners and the request pipeline
//! `authenticate → authorize → select upstream → forward → record` (DESIGN §5).
//!
//! So far the pure parts of that pipeline exist, each tested on its own; the listener, the
//! authenticators and the forwarder that tie them together come next (issue 6):
//! - [`config`]: the `[gateway]` TOML, validated, and route matching on a path that has no
//!   second spelling (`..`, `%2f`, `;` and friends are refused, never normalised);
//! - [`policy`]: a route's roles (any/all), scopes, permissions and audience against an identity;
//! - [`headers`]: identity-header spoofing (any case, `_`/`-`/`.`), hop-by-hop headers,
//!   `x-forwarded-*` from trusted proxies only, XFCC, request-smuggling framing checks;
//! - [`soap`]: SOAP 1.1/1.2 detection and Fault bodies for refusals on `soap` routes.
//!
//! The dependency rule: gateway → core, never web or store.

pub mod config;
pub mod headers;
pub mod policy;
pub mod soap;
