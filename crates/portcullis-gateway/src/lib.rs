//! The Portcullis data plane: TLS/mTLS listeners and the request pipeline
//! `authenticate → authorize → select upstream → forward → record` (DESIGN §5).
//!
//! Nothing is implemented here yet: the gateway has its own issue. The crate exists now so the
//! workspace has the shape of DESIGN §6 and the dependency rule (gateway → core, never web or
//! store) is in place from the start.
