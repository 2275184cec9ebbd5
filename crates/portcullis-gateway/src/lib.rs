//! The Portcullis data plane: the TLS/mTLS listener and the request pipeline
//! `route → authenticate → authorize → forward → record` (DESIGN §5, docs/gateway.md).
//!
//! - [`server`]: the listener, the pipeline, the change feed, resync, certificate renewal and
//!   hot reload — what ties the rest together;
//! - [`control`]: the `ControlPlane` trait, the data plane's only way to the control plane, with
//!   [`inprocess`] (inside `serve`) and [`remote`] (HTTPS, for `portcullis gateway`);
//! - [`bearer`]: local access-token validation with the key, token and revocation caches;
//! - [`config`]: the `[gateway]` TOML, validated, and route matching on a path that has no
//!   second spelling (`..`, `%2f`, `;` and friends are refused, never normalised);
//! - [`login`]: the browser sign-in of `session` routes (authorization code + PKCE, the
//!   callback, the session and flow cookies);
//! - [`policy`]: a route's roles (any/all), scopes, permissions and audience against an identity;
//! - [`headers`]: identity-header spoofing (any case, `_`/`-`/`.`), hop-by-hop headers,
//!   `x-forwarded-*` from trusted proxies only, XFCC, request-smuggling framing checks;
//! - [`tls`], [`forward`], [`respond`]: listener TLS and client trust, upstream clients,
//!   refusals; [`soap`]: SOAP 1.1/1.2 detection and Fault bodies for refusals on `soap` routes.
//!
//! The dependency rule: gateway → core, never web or store.

pub mod bearer;
pub mod config;
pub mod control;
pub mod forward;
pub mod headers;
pub mod inprocess;
pub mod login;
pub mod policy;
pub mod remote;
pub mod respond;
pub mod server;
pub mod soap;
pub mod tls;
