//! Header hygiene for forwarding a request upstream (DESIGN §5, issue 6 item 5).
//!
//! Pure functions over [`http::HeaderMap`]; the proxy calls them in this order:
//!
//! 1. [`check_framing`] on the request as received: ambiguous message framing (request smuggling
//!    shapes) is refused with 400 before anything else looks at the request.
//! 2. [`strip_identity_headers`] before authentication, so nothing in the gateway, and nothing
//!    upstream, ever sees a client-sent `x-portcullis-*`, `x-forwarded-client-cert` or RFC 9440
//!    `client-cert`/`client-cert-chain` header, whatever its case or `_`/`-`/`.` spelling.
//! 3. authentication and authorization (they read `authorization`, `api-key`, … from the request).
//! 4. [`remove_hop_by_hop`] on the headers to forward.
//! 5. [`forwarded_for`] (computed from the headers as received) and [`apply_forwarded`].
//! 6. [`set_identity_headers`] last, from verified state only.
//!
//! Step 6 replaces the whole identity namespace itself and step 4 never removes a header of the
//! identity or forwarding namespaces because a `Connection` header names it, so a client cannot
//! use `Connection: x-portcullis-subject` to drop what the gateway adds, whatever the order.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use http::StatusCode;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Every header whose normalised name starts with this belongs to the gateway.
pub const IDENTITY_PREFIX: &str = "x-portcullis-";
pub const X_PORTCULLIS_SUBJECT: HeaderName = HeaderName::from_static("x-portcullis-subject");
pub const X_PORTCULLIS_CLIENT_ID: HeaderName = HeaderName::from_static("x-portcullis-client-id");
pub const X_PORTCULLIS_ORG: HeaderName = HeaderName::from_static("x-portcullis-org");
pub const X_PORTCULLIS_ROLES: HeaderName = HeaderName::from_static("x-portcullis-roles");
pub const X_PORTCULLIS_SCOPES: HeaderName = HeaderName::from_static("x-portcullis-scopes");
pub const X_PORTCULLIS_AUTH_METHOD: HeaderName = HeaderName::from_static("x-portcullis-auth-method");
pub const X_FORWARDED_CLIENT_CERT: HeaderName = HeaderName::from_static("x-forwarded-client-cert");
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Certificate headers of other conventions that upstream frameworks trust (RFC 9440): stripped
/// with the identity namespace, never set.
const OTHER_CERT_HEADERS: [&str; 2] = ["client-cert", "client-cert-chain"];

/// Headers that are hop-by-hop by definition (RFC 9110 §7.6.1, RFC 9113 §8.2.2; `proxy-connection`
/// is not standard but some clients send it and HTTP/2 forbids it). `te` is handled apart.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// More `x-forwarded-for` entries than this and the chain is dropped (a trusted proxy never sends
/// that many; it only costs memory).
const MAX_FORWARDED_CHAIN: usize = 64;

// ---------------------------------------------------------------------------------------------
// Name normalisation and the identity namespace
// ---------------------------------------------------------------------------------------------

/// Lower-case, with `_` and `.` read as `-` (what WSGI, PHP, Rack and friends make of them).
fn norm(b: u8) -> u8 {
    match b {
        b'_' | b'.' => b'-',
        other => other.to_ascii_lowercase(),
    }
}

/// `name` normalised equals `target` (`target` must already be normal: lower case, `-` only).
fn normalised_eq(name: &str, target: &str) -> bool {
    name.len() == target.len() && name.bytes().zip(target.bytes()).all(|(a, b)| norm(a) == b)
}

/// `name` normalised starts with `prefix` (already normal).
fn normalised_starts_with(name: &str, prefix: &str) -> bool {
    name.len() >= prefix.len() && name.bytes().zip(prefix.bytes()).all(|(a, b)| norm(a) == b)
}

/// The name, lower-cased and with `_` and `.` mapped to `-`.
pub fn normalise_header_name(name: &str) -> String {
    name.bytes().map(|b| char::from(norm(b))).collect()
}

/// Whether a header of this name is one the gateway owns: the `x-portcullis-*` namespace (and the
/// bare `x-portcullis`), `x-forwarded-client-cert`, and RFC 9440's `client-cert` and
/// `client-cert-chain`, compared after [`normalise_header_name`].
pub fn is_identity_header(name: &str) -> bool {
    normalised_starts_with(name, IDENTITY_PREFIX)
        || normalised_eq(name, "x-portcullis")
        || normalised_eq(name, X_FORWARDED_CLIENT_CERT.as_str())
        || OTHER_CERT_HEADERS.iter().any(|t| normalised_eq(name, t))
}

/// Whether a header of this name is one [`apply_forwarded`] owns: every `x-forwarded-*` other than
/// `x-forwarded-client-cert`, RFC 7239 `forwarded` and `x-real-ip`, in any spelling.
pub fn is_forwarding_header(name: &str) -> bool {
    (normalised_starts_with(name, "x-forwarded-") && !normalised_eq(name, X_FORWARDED_CLIENT_CERT.as_str()))
        || normalised_eq(name, "forwarded")
        || normalised_eq(name, "x-real-ip")
}

/// Remove every header for which `doomed` holds; returns the removed names (each once).
fn remove_where(headers: &mut HeaderMap, doomed: impl Fn(&str) -> bool) -> Vec<HeaderName> {
    let names: Vec<HeaderName> = headers.keys().filter(|n| doomed(n.as_str())).cloned().collect();
    for name in &names {
        headers.remove(name);
    }
    names
}

/// Removes every client-sent header of the identity namespace ([`is_identity_header`]): any case,
/// any `_`/`-`/`.` spelling, every value. Returns the names removed (each once, as received) so
/// the caller can log them; an empty vector means the request carried none.
pub fn strip_identity_headers(headers: &mut HeaderMap) -> Vec<HeaderName> {
    remove_where(headers, is_identity_header)
}

// ---------------------------------------------------------------------------------------------
// Hop-by-hop headers
// ---------------------------------------------------------------------------------------------

/// The comma-separated tokens of every `Connection` header, trimmed and lower-cased. Values that
/// are not visible ASCII are skipped.
fn connection_tokens(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

/// Whether the request asks for a WebSocket upgrade: a `Connection` token `upgrade` and a single
/// `Upgrade` value whose protocol is `websocket` (case-insensitive). The method (`GET`) and
/// HTTP version are the caller's to check.
pub fn is_websocket_upgrade(headers: &HeaderMap) -> bool {
    let mut upgrades = headers.get_all(header::UPGRADE).iter();
    let (Some(upgrade), None) = (upgrades.next(), upgrades.next()) else {
        return false;
    };
    // One protocol (no list), named `websocket`, optionally with a `/version`.
    let is_websocket = upgrade.to_str().is_ok_and(|v| {
        !v.contains(',') && v.split('/').next().is_some_and(|p| p.trim().eq_ignore_ascii_case("websocket"))
    });
    is_websocket && connection_tokens(headers).iter().any(|t| t == "upgrade")
}

/// Whether every `te` value is exactly `trailers` (the only TE value HTTP/2 allows, which gRPC
/// needs end to end).
fn te_is_trailers_only(headers: &HeaderMap) -> bool {
    let mut values = headers.get_all(header::TE).iter().peekable();
    values.peek().is_some() && values.all(|v| v.to_str().is_ok_and(|s| s.trim().eq_ignore_ascii_case("trailers")))
}

/// Removes the hop-by-hop headers from headers about to be forwarded:
///
/// * `Connection`, `Keep-Alive`, `Proxy-Connection`, `Proxy-Authenticate`, `Proxy-Authorization`,
///   `Trailer`, `Transfer-Encoding` and `Upgrade`;
/// * `TE`, except `te: trailers`, which is kept (it is the one TE value HTTP/2 allows and gRPC
///   upstreams require it; it is harmless over HTTP/1.1);
/// * every header named by a token of any `Connection` header, except `content-length` and
///   `host` (framing and routing are the proxy's) and the identity and forwarding namespaces
///   ([`is_identity_header`], [`is_forwarding_header`]): those are the gateway's, set by
///   [`set_identity_headers`] and [`apply_forwarded`], and a client must not be able to remove
///   them (or a trusted proxy's `x-forwarded-for`) by listing them.
///
/// With `pass_upgrade` (the caller decided this is a WebSocket upgrade to pass through, see
/// [`is_websocket_upgrade`]), the `Upgrade` header is kept and `Connection: upgrade` is set again,
/// so the upstream sees the upgrade request; everything else is removed as usual.
pub fn remove_hop_by_hop(headers: &mut HeaderMap, pass_upgrade: bool) {
    let keep_te = te_is_trailers_only(headers);
    for token in connection_tokens(headers) {
        let Ok(name) = HeaderName::from_bytes(token.as_bytes()) else {
            continue;
        };
        let protected = name == header::CONTENT_LENGTH
            || name == header::HOST
            || (name == header::TE && keep_te)
            || (name == header::UPGRADE && pass_upgrade)
            || is_identity_header(name.as_str())
            || is_forwarding_header(name.as_str());
        if !protected {
            headers.remove(&name);
        }
    }
    let upgrade = if pass_upgrade { headers.remove(header::UPGRADE) } else { None };
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    if !keep_te {
        headers.remove(header::TE);
    }
    if let Some(upgrade) = upgrade {
        headers.insert(header::UPGRADE, upgrade);
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

// ---------------------------------------------------------------------------------------------
// Trusted proxies and x-forwarded-*
// ---------------------------------------------------------------------------------------------

/// An IPv4 or IPv6 network (`10.0.0.0/8`, `2001:db8::/32`; a bare address is a single host).
///
/// An IPv4 address given as IPv4-mapped IPv6 (`::ffff:10.1.2.3`, as a dual-stack socket reports
/// it) is matched as the IPv4 address, against IPv4 networks and against `::ffff:0:0/96`-style
/// IPv6 networks alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

/// Why a network does not parse; the messages are meant for configuration errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpNetError {
    #[error("not an IP address or network (expected e.g. 10.0.0.0/8 or 2001:db8::/32)")]
    Syntax,
    #[error("prefix length {prefix} is longer than the address ({max} bits)")]
    PrefixTooLong { prefix: u8, max: u8 },
    #[error("{0} has bits set after the prefix length; write the network address")]
    HostBitsSet(String),
    #[error("a /0 network trusts every address: list the proxies instead")]
    MatchesEverything,
}

fn mask32(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix.min(32))).unwrap_or(0)
}

fn mask128(prefix: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(prefix.min(128))).unwrap_or(0)
}

impl IpNet {
    /// A network; refuses a prefix longer than the address, bits set after the prefix (a typo
    /// such as `10.0.0.1/8` is more likely than intent) and `/0`.
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Self, IpNetError> {
        let (max, host_bits_set) = match addr {
            IpAddr::V4(a) => (32, u32::from(a) & !mask32(prefix) != 0),
            IpAddr::V6(a) => (128, u128::from(a) & !mask128(prefix) != 0),
        };
        if prefix > max {
            return Err(IpNetError::PrefixTooLong { prefix, max });
        }
        if prefix == 0 {
            return Err(IpNetError::MatchesEverything);
        }
        if host_bits_set {
            return Err(IpNetError::HostBitsSet(format!("{addr}/{prefix}")));
        }
        Ok(Self { addr, prefix })
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether `ip` is in this network (IPv4-mapped IPv6 addresses are read as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(a)) => (u32::from(net) ^ u32::from(a)) & mask32(self.prefix) == 0,
            (IpAddr::V6(net), IpAddr::V6(a)) => (u128::from(net) ^ u128::from(a)) & mask128(self.prefix) == 0,
            (IpAddr::V6(net), IpAddr::V4(a)) => {
                (u128::from(net) ^ u128::from(a.to_ipv6_mapped())) & mask128(self.prefix) == 0
            }
            (IpAddr::V4(_), IpAddr::V6(_)) => false,
        }
    }
}

impl FromStr for IpNet {
    type Err = IpNetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        match s.split_once('/') {
            None => {
                let addr: IpAddr = s.parse().map_err(|_| IpNetError::Syntax)?;
                let prefix = if addr.is_ipv4() { 32 } else { 128 };
                Self::new(addr, prefix)
            }
            Some((addr, prefix)) => {
                let addr: IpAddr = addr.parse().map_err(|_| IpNetError::Syntax)?;
                if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(IpNetError::Syntax);
                }
                let prefix: u8 = prefix.parse().map_err(|_| IpNetError::Syntax)?;
                Self::new(addr, prefix)
            }
        }
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Whether `ip` is one of the trusted proxies.
pub fn is_trusted_proxy(ip: IpAddr, trusted_proxies: &[IpNet]) -> bool {
    trusted_proxies.iter().any(|n| n.contains(ip))
}

/// The scheme of the gateway's own listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Http,
    Https,
}

impl Proto {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Https => "https",
        }
    }
}

/// What [`forwarded_for`] decided; [`apply_forwarded`] writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardedInfo {
    /// The address the gateway takes for the client's (rate limits, logs): the direct peer, or,
    /// behind trusted proxies, the right-most `x-forwarded-for` entry that is not a trusted proxy.
    pub client_ip: IpAddr,
    /// Whether the direct peer is a trusted proxy (so its `x-forwarded-*` were used).
    pub trusted_peer: bool,
    /// `x-forwarded-for` to send: the trusted chain (re-serialised, bare addresses) with the peer
    /// appended, or just the peer.
    pub x_forwarded_for: HeaderValue,
    /// `x-forwarded-proto` to send: `http` or `https`.
    pub x_forwarded_proto: HeaderValue,
    /// `x-forwarded-host` to send, when there is a valid one.
    pub x_forwarded_host: Option<HeaderValue>,
}

/// One `x-forwarded-for` element: an address, optionally bracketed (IPv6) and/or with a port, as
/// some proxies write them. Anything else (`unknown`, obfuscated identifiers, junk) is `None`.
fn parse_forwarded_element(s: &str) -> Option<IpAddr> {
    let s = s.trim();
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Some(rest) = s.strip_prefix('[') {
        let (addr, after) = rest.split_once(']')?;
        let port_ok = after.is_empty()
            || after
                .strip_prefix(':')
                .is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && p.parse::<u16>().is_ok());
        if !port_ok {
            return None;
        }
        return addr.parse::<std::net::Ipv6Addr>().ok().map(IpAddr::V6);
    }
    s.parse::<std::net::SocketAddrV4>().ok().map(|sa| IpAddr::V4(*sa.ip()))
}

/// Every `x-forwarded-for` element of every such header, in order; `None` when any is unparsable
/// or the chain is absurdly long (the whole chain is then ignored, never partly used).
fn forwarded_chain(headers: &HeaderMap) -> Option<Vec<IpAddr>> {
    let mut chain = Vec::new();
    for value in headers.get_all(&X_FORWARDED_FOR) {
        for element in value.to_str().ok()?.split(',') {
            chain.push(parse_forwarded_element(element)?);
            if chain.len() > MAX_FORWARDED_CHAIN {
                return None;
            }
        }
    }
    Some(chain)
}

/// The single value of a header, if there is exactly one.
fn single_value<'h>(headers: &'h HeaderMap, name: &HeaderName) -> Option<&'h HeaderValue> {
    let mut values = headers.get_all(name).iter();
    match (values.next(), values.next()) {
        (Some(v), None) => Some(v),
        _ => None,
    }
}

/// A host with an optional port: reg-name, IPv4 or bracketed IPv6 characters only.
fn valid_host(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 255
        && host.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b':' | b'[' | b']'))
}

/// Computes the `x-forwarded-*` values to send upstream.
///
/// * `headers`: the request's headers as received (before [`apply_forwarded`]).
/// * `peer_ip`: the direct peer of the connection.
/// * `own_proto`: the scheme of the gateway's listener.
/// * `own_host`: the request's own host (`Host` header, or the URI authority over HTTP/2).
/// * `trusted_proxies`: the configured proxies; empty (trust nobody) is the safe default.
///
/// Client-sent `x-forwarded-for/-proto/-host` are used only when the peer is a trusted proxy, and
/// then only if well formed: an `x-forwarded-for` chain with any unparsable element is dropped as
/// a whole; `x-forwarded-proto` must be a single `http` or `https`; `x-forwarded-host` a single
/// plausible host. Otherwise the gateway's own view replaces them.
pub fn forwarded_for(
    headers: &HeaderMap,
    peer_ip: IpAddr,
    own_proto: Proto,
    own_host: Option<&str>,
    trusted_proxies: &[IpNet],
) -> ForwardedInfo {
    let peer = peer_ip.to_canonical();
    let trusted_peer = is_trusted_proxy(peer, trusted_proxies);
    let mut chain = if trusted_peer { forwarded_chain(headers).unwrap_or_default() } else { Vec::new() };
    chain.push(peer);
    // Right to left: the first address that is not a trusted proxy is the client; when all are
    // trusted, the left-most one.
    let client_ip = chain
        .iter()
        .rev()
        .map(|ip| ip.to_canonical())
        .find(|ip| !is_trusted_proxy(*ip, trusted_proxies))
        .or_else(|| chain.first().map(|ip| ip.to_canonical()))
        .unwrap_or(peer);
    let xff = chain.iter().map(|ip| ip.to_canonical().to_string()).collect::<Vec<_>>().join(", ");
    let x_forwarded_for = HeaderValue::from_str(&xff).unwrap_or_else(|_| HeaderValue::from_static("unknown"));

    let client_proto = trusted_peer
        .then(|| single_value(headers, &X_FORWARDED_PROTO))
        .flatten()
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .and_then(|p| {
            if p.eq_ignore_ascii_case("https") {
                Some(Proto::Https)
            } else if p.eq_ignore_ascii_case("http") {
                Some(Proto::Http)
            } else {
                None
            }
        });
    let proto = client_proto.unwrap_or(own_proto);

    let client_host = trusted_peer
        .then(|| single_value(headers, &X_FORWARDED_HOST))
        .flatten()
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|h| valid_host(h));
    let x_forwarded_host =
        client_host.or(own_host.map(str::trim).filter(|h| valid_host(h))).and_then(|h| HeaderValue::from_str(h).ok());

    ForwardedInfo {
        client_ip,
        trusted_peer,
        x_forwarded_for,
        x_forwarded_proto: HeaderValue::from_static(proto.as_str()),
        x_forwarded_host,
    }
}

/// Replaces the forwarding namespace ([`is_forwarding_header`]: every `x-forwarded-*` but the
/// client certificate, `forwarded`, `x-real-ip`, in any spelling) with the values of `info`.
/// Returns the names removed (each once, as received).
pub fn apply_forwarded(headers: &mut HeaderMap, info: &ForwardedInfo) -> Vec<HeaderName> {
    let removed = remove_where(headers, is_forwarding_header);
    headers.insert(X_FORWARDED_FOR, info.x_forwarded_for.clone());
    headers.insert(X_FORWARDED_PROTO, info.x_forwarded_proto.clone());
    if let Some(host) = &info.x_forwarded_host {
        headers.insert(X_FORWARDED_HOST, host.clone());
    }
    removed
}

// ---------------------------------------------------------------------------------------------
// Identity headers
// ---------------------------------------------------------------------------------------------

/// The verified identity to send upstream (DESIGN §5).
#[derive(Debug, Clone, Copy, Default)]
pub struct IdentityHeaders<'a> {
    /// `x-portcullis-subject`.
    pub subject: &'a str,
    /// `x-portcullis-client-id` (absent when `None`).
    pub client_id: Option<&'a str>,
    /// `x-portcullis-org`, the organisation's slug (absent when `None`).
    pub org: Option<&'a str>,
    /// `x-portcullis-roles`, comma-separated (absent when empty).
    pub roles: &'a [String],
    /// `x-portcullis-scopes`, space-separated (absent when empty).
    pub scopes: &'a [String],
    /// `x-portcullis-auth-method`: `bearer`, `api_key`, `mtls`, `session`.
    pub auth_method: &'a str,
    /// The verified client certificate, written as `x-forwarded-client-cert` ([`xfcc_value`]).
    pub client_cert: Option<ClientCert<'a>>,
}

/// A verified client certificate's facts for `x-forwarded-client-cert`.
#[derive(Debug, Clone, Copy)]
pub struct ClientCert<'a> {
    /// SHA-256 of the leaf's DER, lower-case hex.
    pub sha256_hex: &'a str,
    /// The subject DN as a string (RFC 4514).
    pub subject: &'a str,
    /// The first URI subject alternative name, if any.
    pub san_uri: Option<&'a str>,
}

/// Why a value was not sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueProblem {
    /// Empty (a required value, or a list item).
    Empty,
    /// Contains a control character (CR, LF, NUL, DEL, …).
    ControlCharacter,
    /// Contains a character outside ASCII, which a header cannot carry unambiguously.
    NonAscii,
    /// Starts or ends with whitespace, which header parsers trim.
    SurroundingWhitespace,
    /// A list item containing the list's separator (`,` or whitespace for roles, whitespace for
    /// scopes): sending it would make the upstream read several items.
    ContainsSeparator,
}

/// One value [`set_identity_headers`] left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Omission {
    /// The header concerned.
    pub header: HeaderName,
    /// For `roles`/`scopes`, the index of the item left out; `None` when the whole header was.
    pub item: Option<usize>,
    pub problem: ValueProblem,
}

/// What [`set_identity_headers`] could not send. Values are never altered (a "cleaned" subject
/// could name somebody else): a bad value is left out and listed here.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdentityReport {
    pub omitted: Vec<Omission>,
}

impl IdentityReport {
    /// Everything was sent.
    pub fn is_complete(&self) -> bool {
        self.omitted.is_empty()
    }

    /// The subject was left out: the caller should not forward the request (answer 500).
    pub fn subject_missing(&self) -> bool {
        self.omitted.iter().any(|o| o.header == X_PORTCULLIS_SUBJECT)
    }
}

fn check_value(value: &str) -> Result<(), ValueProblem> {
    if value.is_empty() {
        Err(ValueProblem::Empty)
    } else if value.chars().any(char::is_control) {
        Err(ValueProblem::ControlCharacter)
    } else if !value.is_ascii() {
        Err(ValueProblem::NonAscii)
    } else if value.starts_with([' ', '\t']) || value.ends_with([' ', '\t']) {
        Err(ValueProblem::SurroundingWhitespace)
    } else {
        Ok(())
    }
}

fn set_single(headers: &mut HeaderMap, report: &mut IdentityReport, name: HeaderName, value: &str) {
    match check_value(value).and_then(|()| HeaderValue::from_str(value).map_err(|_| ValueProblem::ControlCharacter)) {
        Ok(v) => {
            headers.insert(name, v);
        }
        Err(problem) => report.omitted.push(Omission { header: name, item: None, problem }),
    }
}

fn set_list(
    headers: &mut HeaderMap,
    report: &mut IdentityReport,
    name: HeaderName,
    items: &[String],
    separator: &str,
    is_separator: fn(char) -> bool,
) {
    let mut good: Vec<&str> = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let checked = check_value(item)
            .and_then(|()| if item.contains(is_separator) { Err(ValueProblem::ContainsSeparator) } else { Ok(()) });
        match checked {
            Ok(()) => good.push(item),
            Err(problem) => report.omitted.push(Omission { header: name.clone(), item: Some(i), problem }),
        }
    }
    if good.is_empty() {
        return;
    }
    match HeaderValue::from_str(&good.join(separator)) {
        Ok(v) => {
            headers.insert(name, v);
        }
        Err(_) => report.omitted.push(Omission { header: name, item: None, problem: ValueProblem::ControlCharacter }),
    }
}

/// Writes the identity headers of DESIGN §5 from verified state, after removing the whole
/// identity namespace ([`strip_identity_headers`]) so no stale or client-sent value survives:
/// `x-portcullis-subject`, `-client-id`, `-org`, `-roles` (comma-separated), `-scopes`
/// (space-separated), `-auth-method`, and `x-forwarded-client-cert` when there is a verified
/// client certificate.
///
/// A value that cannot be sent as is (control characters, non-ASCII, surrounding whitespace,
/// empty, a list item containing the separator) is left out, never altered, and listed in the
/// returned report; a bad role or scope drops only that item. Never panics.
pub fn set_identity_headers(headers: &mut HeaderMap, id: &IdentityHeaders<'_>) -> IdentityReport {
    strip_identity_headers(headers);
    let mut report = IdentityReport::default();
    set_single(headers, &mut report, X_PORTCULLIS_SUBJECT, id.subject);
    if let Some(client_id) = id.client_id {
        set_single(headers, &mut report, X_PORTCULLIS_CLIENT_ID, client_id);
    }
    if let Some(org) = id.org {
        set_single(headers, &mut report, X_PORTCULLIS_ORG, org);
    }
    set_list(headers, &mut report, X_PORTCULLIS_ROLES, id.roles, ",", |c| c == ',' || c.is_whitespace());
    set_list(headers, &mut report, X_PORTCULLIS_SCOPES, id.scopes, " ", char::is_whitespace);
    set_single(headers, &mut report, X_PORTCULLIS_AUTH_METHOD, id.auth_method);
    if let Some(cert) = id.client_cert {
        let xfcc = xfcc_value(cert.sha256_hex, cert.subject, cert.san_uri);
        match HeaderValue::from_str(&xfcc) {
            Ok(v) => {
                headers.insert(X_FORWARDED_CLIENT_CERT, v);
            }
            Err(_) => report.omitted.push(Omission {
                header: X_FORWARDED_CLIENT_CERT,
                item: None,
                problem: ValueProblem::ControlCharacter,
            }),
        }
    }
    report
}

// ---------------------------------------------------------------------------------------------
// x-forwarded-client-cert
// ---------------------------------------------------------------------------------------------

/// Characters that force an XFCC value into double quotes (Envoy: `,`, `;`, `=`; also `"`, `\` and
/// space so the quoting is never ambiguous).
fn needs_quotes(s: &str) -> bool {
    s.is_empty() || s.bytes().any(|b| matches!(b, b',' | b';' | b'=' | b'"' | b'\\' | b' '))
}

/// Appends `s` as an XFCC value: quoted when [`needs_quotes`] (or `always_quote`), with `"` and
/// `\` backslash-escaped inside the quotes. Bytes that cannot appear in a header (controls,
/// non-ASCII) are first written with `escape_byte`.
fn push_xfcc_value(out: &mut String, s: &str, always_quote: bool, escape_byte: fn(&mut String, u8)) {
    let mut clean = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_graphic() || b == b' ' {
            clean.push(char::from(b));
        } else {
            escape_byte(&mut clean, b);
        }
    }
    if always_quote || needs_quotes(&clean) {
        out.push('"');
        for c in clean.chars() {
            if c == '"' || c == '\\' {
                out.push('\\');
            }
            out.push(c);
        }
        out.push('"');
    } else {
        out.push_str(&clean);
    }
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

fn hex_pair(out: &mut String, b: u8) {
    for nibble in [b >> 4, b & 0x0f] {
        if let Some(h) = HEX.get(usize::from(nibble)) {
            out.push(char::from(*h));
        }
    }
}

/// RFC 4514 escape of one byte: `\XX`.
fn dn_escape(out: &mut String, b: u8) {
    out.push('\\');
    hex_pair(out, b);
}

/// RFC 3986 percent-encoding of one byte.
fn percent_escape(out: &mut String, b: u8) {
    out.push('%');
    hex_pair(out, b);
}

/// The `x-forwarded-client-cert` value for a verified client certificate, in Envoy's format:
/// `Hash=<hex>;Subject="<dn>"[;URI=<uri>]`.
///
/// Per Envoy, a value containing `,`, `;` or `=` is double-quoted and a `"` inside is written
/// `\"`; here `\` is written `\\` too, and a value containing a space or nothing is quoted as
/// well. `Subject` is always quoted. The result is always a valid header value: in the subject,
/// control and non-ASCII bytes become RFC 4514 `\XX` escapes (so a DN reader decodes them
/// back); in the hash and URI they are percent-encoded.
pub fn xfcc_value(cert_sha256_hex: &str, subject: &str, san_uri: Option<&str>) -> String {
    let mut out = String::with_capacity(cert_sha256_hex.len() + subject.len() + 32);
    out.push_str("Hash=");
    push_xfcc_value(&mut out, cert_sha256_hex, false, percent_escape);
    out.push_str(";Subject=");
    push_xfcc_value(&mut out, subject, true, dn_escape);
    if let Some(uri) = san_uri {
        out.push_str(";URI=");
        push_xfcc_value(&mut out, uri, false, percent_escape);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Message framing (request smuggling)
// ---------------------------------------------------------------------------------------------

/// How the request's body is delimited, once [`check_framing`] accepted it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// Neither `Content-Length` nor `Transfer-Encoding`: over HTTP/1.1 no body; over HTTP/2 the
    /// stream delimits it.
    Absent,
    /// One `Content-Length` of this many bytes.
    ContentLength(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// A request whose framing another HTTP implementation could read differently. All are answered
/// with 400 (and the connection closed); the messages are fit for `x-error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    #[error("both Content-Length and Transfer-Encoding are present")]
    ContentLengthAndTransferEncoding,
    #[error("more than one Content-Length")]
    DuplicateContentLength,
    #[error("Content-Length is not a decimal number")]
    InvalidContentLength,
    #[error("Transfer-Encoding other than a single chunked coding")]
    UnsupportedTransferEncoding,
}

impl FramingError {
    pub fn status(&self) -> StatusCode {
        StatusCode::BAD_REQUEST
    }
}

fn trim_ows(s: &[u8]) -> &[u8] {
    let start = s.iter().position(|b| !matches!(b, b' ' | b'\t')).unwrap_or(s.len());
    let end = s.iter().rposition(|b| !matches!(b, b' ' | b'\t')).map_or(start, |e| e + 1);
    s.get(start..end).unwrap_or_default()
}

fn parse_content_length(value: &HeaderValue) -> Result<u64, FramingError> {
    let digits = trim_ows(value.as_bytes());
    if digits.contains(&b',') {
        // `Content-Length: 5, 5` is a list: two values.
        return Err(FramingError::DuplicateContentLength);
    }
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return Err(FramingError::InvalidContentLength);
    }
    digits.iter().try_fold(0u64, |n, d| {
        n.checked_mul(10).and_then(|n| n.checked_add(u64::from(d - b'0'))).ok_or(FramingError::InvalidContentLength)
    })
}

/// Refuses the request-smuggling shapes of RFC 9112 §6 (security-testing G3):
///
/// * `Content-Length` together with `Transfer-Encoding`;
/// * more than one `Content-Length`, **even with equal values** (RFC 9112 §6.3 lets a recipient
///   either reject or collapse identical ones; rejecting leaves no room for two readers to
///   disagree), including a comma list in one header (`5, 5`);
/// * a `Content-Length` that is not 1*DIGIT (signs, spaces inside, hex, empty) or overflows u64;
/// * a `Transfer-Encoding` that is not exactly one `chunked` coding (case-insensitive, optional
///   whitespace around it): `chunked, identity`, `gzip, chunked`, `chunked, chunked`, `identity`,
///   parameters, empty values or several headers are all refused. The gateway decodes no other
///   transfer coding, so refusing the rest costs nothing.
///
/// Obsolete line folding, bare CR/LF and NUL cannot be represented in a `HeaderMap` (the parser
/// has already refused them).
pub fn check_framing(headers: &HeaderMap) -> Result<Framing, FramingError> {
    let has_te = headers.contains_key(header::TRANSFER_ENCODING);
    let mut lengths = headers.get_all(header::CONTENT_LENGTH).iter();
    let first_length = lengths.next();
    if has_te && first_length.is_some() {
        return Err(FramingError::ContentLengthAndTransferEncoding);
    }
    if let Some(value) = first_length {
        if lengths.next().is_some() {
            return Err(FramingError::DuplicateContentLength);
        }
        return parse_content_length(value).map(Framing::ContentLength);
    }
    if has_te {
        let mut values = headers.get_all(header::TRANSFER_ENCODING).iter();
        return match (values.next(), values.next()) {
            (Some(v), None) if trim_ows(v.as_bytes()).eq_ignore_ascii_case(b"chunked") => Ok(Framing::Chunked),
            _ => Err(FramingError::UnsupportedTransferEncoding),
        };
    }
    Ok(Framing::Absent)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(HeaderName::from_bytes(n.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    // --- identity stripping ---------------------------------------------------------------

    #[test]
    fn strips_every_spelling_of_the_identity_namespace() {
        let spoofed = [
            "x-portcullis-subject",
            "X-Portcullis-Subject",
            "X_Portcullis_Subject",
            "x.portcullis.roles",
            "X-PORTCULLIS-ORG",
            "x_portcullis.client_id",
            "x-portcullis-anything-new",
            "x-portcullis",
            "X_PORTCULLIS",
            "x-forwarded-client-cert",
            "X-Forwarded_Client-Cert",
            "x.forwarded.client.cert",
            "X_FORWARDED_CLIENT_CERT",
            "Client-Cert",
            "client_cert_chain",
        ];
        let mut pairs: Vec<(&str, &str)> = spoofed.iter().map(|n| (*n, "evil")).collect();
        pairs.push(("x-portcullis-subject", "second value"));
        pairs.push(("authorization", "Bearer abc"));
        pairs.push(("x-portcullisfoo", "kept: not the namespace"));
        pairs.push(("x-forwarded-client", "kept"));
        pairs.push(("content-type", "text/plain"));
        let mut h = map(&pairs);
        let removed = strip_identity_headers(&mut h);
        for n in spoofed {
            assert!(!h.contains_key(n), "{n} survived");
        }
        assert!(h.keys().all(|k| !is_identity_header(k.as_str())));
        assert_eq!(h.len(), 4, "{h:?}");
        assert!(h.contains_key("authorization"));
        assert!(h.contains_key("x-portcullisfoo"));
        assert!(h.contains_key("x-forwarded-client"));
        // Each distinct name reported once (http lower-cases names, so case variants collapse).
        assert!(removed.iter().any(|n| n.as_str() == "x_portcullis_subject"));
        assert!(removed.iter().any(|n| n.as_str() == "x.portcullis.roles"));
        let mut sorted: Vec<_> = removed.iter().map(HeaderName::as_str).collect();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), removed.len());
    }

    #[test]
    fn strip_on_clean_request_changes_nothing() {
        let mut h = map(&[("accept", "*/*"), ("x-request-id", "1")]);
        assert!(strip_identity_headers(&mut h).is_empty());
        assert_eq!(h.len(), 2);
    }

    #[test]
    fn normalisation() {
        assert_eq!(normalise_header_name("X_Portcullis.Subject"), "x-portcullis-subject");
        assert!(is_identity_header("X_FORWARDED.CLIENT-CERT"));
        assert!(!is_identity_header("x-portcullisx"));
        assert!(is_forwarding_header("X_Forwarded_For"));
        assert!(is_forwarding_header("x.forwarded.host"));
        assert!(is_forwarding_header("Forwarded"));
        assert!(is_forwarding_header("x_real_ip"));
        assert!(!is_forwarding_header("x-forwarded-client-cert"));
        assert!(!is_forwarding_header("forwarded-x"));
    }

    // --- hop-by-hop -----------------------------------------------------------------------

    #[test]
    fn removes_hop_by_hop_and_connection_tokens() {
        let mut h = map(&[
            ("connection", "keep-alive, X-Custom-Hop , x-other"),
            ("connection", "close,,X-Third"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("proxy-authenticate", "Basic"),
            ("proxy-authorization", "Basic abc"),
            ("te", "gzip"),
            ("trailer", "x-checksum"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("x-custom-hop", "1"),
            ("x-other", "2"),
            ("x-third", "3"),
            ("x-end-to-end", "kept"),
            ("accept", "*/*"),
        ]);
        remove_hop_by_hop(&mut h, false);
        let left: Vec<_> = h.keys().map(HeaderName::as_str).collect();
        assert_eq!(left.len(), 2, "{left:?}");
        assert!(h.contains_key("x-end-to-end"));
        assert!(h.contains_key("accept"));
    }

    #[test]
    fn connection_tokens_cannot_remove_framing_routing_identity_or_forwarding() {
        let mut h = map(&[
            (
                "connection",
                "content-length, host, x-portcullis-subject, x_portcullis_roles, \
                 x-forwarded-for, x-forwarded-client-cert, forwarded, authorization",
            ),
            ("content-length", "3"),
            ("host", "api.example"),
            ("x-forwarded-for", "203.0.113.9"),
            ("authorization", "Bearer abc"),
        ]);
        remove_hop_by_hop(&mut h, false);
        assert_eq!(h["content-length"], "3");
        assert_eq!(h["host"], "api.example");
        assert_eq!(h["x-forwarded-for"], "203.0.113.9");
        // Authorization is the client's own end-to-end header: listing it removes it (it was
        // read by authentication before forwarding).
        assert!(!h.contains_key("authorization"));
        // Identity headers added afterwards are untouched, and so are ones added before.
        let report = set_identity_headers(
            &mut h,
            &IdentityHeaders { subject: "alice", auth_method: "bearer", ..Default::default() },
        );
        assert!(report.is_complete());
        let mut h2 = h.clone();
        h2.insert(header::CONNECTION, HeaderValue::from_static("x-portcullis-subject"));
        remove_hop_by_hop(&mut h2, false);
        assert_eq!(h2["x-portcullis-subject"], "alice");
    }

    #[test]
    fn te_trailers_is_kept_other_te_removed() {
        let mut h = map(&[("te", "trailers"), ("connection", "TE")]);
        remove_hop_by_hop(&mut h, false);
        assert_eq!(h["te"], "trailers");
        assert!(!h.contains_key("connection"));

        let mut h = map(&[("te", "trailers, deflate")]);
        remove_hop_by_hop(&mut h, false);
        assert!(!h.contains_key("te"));

        let mut h = map(&[("te", "trailers"), ("te", "gzip")]);
        remove_hop_by_hop(&mut h, false);
        assert!(!h.contains_key("te"));
    }

    #[test]
    fn websocket_upgrade_passes_when_asked() {
        let ws = [
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("sec-websocket-version", "13"),
            ("keep-alive", "timeout=5"),
        ];
        let h = map(&ws);
        assert!(is_websocket_upgrade(&h));

        let mut passed = h.clone();
        remove_hop_by_hop(&mut passed, true);
        assert_eq!(passed["upgrade"], "websocket");
        assert_eq!(passed["connection"], "upgrade");
        assert_eq!(passed.get_all("connection").iter().count(), 1);
        assert!(passed.contains_key("sec-websocket-key"));
        assert!(!passed.contains_key("keep-alive"));

        let mut blocked = h.clone();
        remove_hop_by_hop(&mut blocked, false);
        assert!(!blocked.contains_key("upgrade"));
        assert!(!blocked.contains_key("connection"));

        assert!(!is_websocket_upgrade(&map(&[("upgrade", "websocket")])));
        assert!(!is_websocket_upgrade(&map(&[("connection", "upgrade"), ("upgrade", "h2c")])));
        assert!(!is_websocket_upgrade(&map(&[
            ("connection", "upgrade"),
            ("upgrade", "websocket"),
            ("upgrade", "h2c"),
        ])));
        assert!(is_websocket_upgrade(&map(&[("connection", "Upgrade"), ("upgrade", "WebSocket")])));
    }

    // --- trusted proxies --------------------------------------------------------------------

    #[test]
    fn ipnet_parsing() {
        assert_eq!("10.0.0.0/8".parse::<IpNet>().unwrap().to_string(), "10.0.0.0/8");
        assert_eq!("192.0.2.7".parse::<IpNet>().unwrap().prefix(), 32);
        assert_eq!("2001:db8::1".parse::<IpNet>().unwrap().prefix(), 128);
        assert_eq!("2001:db8::/32".parse::<IpNet>().unwrap().to_string(), "2001:db8::/32");
        assert!(matches!("10.0.0.1/8".parse::<IpNet>(), Err(IpNetError::HostBitsSet(_))));
        assert!(matches!("10.0.0.0/33".parse::<IpNet>(), Err(IpNetError::PrefixTooLong { .. })));
        assert!(matches!("::/129".parse::<IpNet>(), Err(IpNetError::PrefixTooLong { .. })));
        assert_eq!("0.0.0.0/0".parse::<IpNet>(), Err(IpNetError::MatchesEverything));
        assert_eq!("::/0".parse::<IpNet>(), Err(IpNetError::MatchesEverything));
        for bad in ["", "10.0.0.0/", "10.0.0.0/+8", "10.0.0.0/-1", "example.com", "10.0.0/8"] {
            assert_eq!(bad.parse::<IpNet>(), Err(IpNetError::Syntax), "{bad}");
        }
    }

    #[test]
    fn ipnet_contains_v4_v6_and_mapped() {
        let v4: IpNet = "10.1.0.0/16".parse().unwrap();
        assert!(v4.contains(IpAddr::V4(Ipv4Addr::new(10, 1, 255, 3))));
        assert!(!v4.contains(IpAddr::V4(Ipv4Addr::new(10, 2, 0, 1))));
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert!(v4.contains(mapped));
        assert!(!v4.contains("2001:db8::1".parse().unwrap()));

        let v6: IpNet = "2001:db8:abcd::/48".parse().unwrap();
        assert!(v6.contains("2001:db8:abcd:12::1".parse().unwrap()));
        assert!(!v6.contains("2001:db8:abce::1".parse().unwrap()));
        assert!(!v6.contains(IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3))));

        let mapped_net: IpNet = "::ffff:192.0.2.0/120".parse().unwrap();
        assert!(mapped_net.contains(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 77))));
        assert!(mapped_net.contains("::ffff:192.0.2.1".parse().unwrap()));
        assert!(!mapped_net.contains(IpAddr::V4(Ipv4Addr::new(192, 0, 3, 1))));

        let host: IpNet = "::1".parse().unwrap();
        assert!(host.contains(IpAddr::V6(Ipv6Addr::LOCALHOST)));
        assert!(!host.contains(IpAddr::V4(Ipv4Addr::LOCALHOST)));

        let odd: IpNet = "172.16.0.0/12".parse().unwrap();
        assert!(odd.contains(IpAddr::V4(Ipv4Addr::new(172, 31, 255, 255))));
        assert!(!odd.contains(IpAddr::V4(Ipv4Addr::new(172, 32, 0, 0))));
    }

    fn spoofing_request() -> HeaderMap {
        map(&[
            ("x-forwarded-for", "1.2.3.4, 10.9.9.9"),
            ("x-forwarded-proto", "http"),
            ("x-forwarded-host", "evil.example"),
        ])
    }

    #[test]
    fn untrusted_peer_headers_are_replaced() {
        let peer: IpAddr = "203.0.113.5".parse().unwrap();
        for trusted in [nets(&[]), nets(&["10.0.0.0/8", "2001:db8::/32"])] {
            let info = forwarded_for(&spoofing_request(), peer, Proto::Https, Some("api.example:8443"), &trusted);
            assert!(!info.trusted_peer);
            assert_eq!(info.client_ip, peer);
            assert_eq!(info.x_forwarded_for, "203.0.113.5");
            assert_eq!(info.x_forwarded_proto, "https");
            assert_eq!(info.x_forwarded_host.as_ref().unwrap(), "api.example:8443");
        }
    }

    #[test]
    fn trusted_peer_chain_is_kept_and_appended() {
        let trusted = nets(&["10.0.0.0/8"]);
        let info = forwarded_for(
            &spoofing_request(),
            "10.0.0.2".parse().unwrap(),
            Proto::Https,
            Some("internal:8443"),
            &trusted,
        );
        assert!(info.trusted_peer);
        assert_eq!(info.x_forwarded_for, "1.2.3.4, 10.9.9.9, 10.0.0.2");
        // 10.9.9.9 is another trusted hop; the client is the first untrusted from the right.
        assert_eq!(info.client_ip, "1.2.3.4".parse::<IpAddr>().unwrap());
        assert_eq!(info.x_forwarded_proto, "http");
        assert_eq!(info.x_forwarded_host.as_ref().unwrap(), "evil.example");
    }

    #[test]
    fn client_ip_is_rightmost_untrusted_not_leftmost() {
        // The client prepended a fake address; the trusted proxy appended the real one.
        let h = map(&[("x-forwarded-for", "127.0.0.1, 198.51.100.7")]);
        let info = forwarded_for(&h, "10.0.0.2".parse().unwrap(), Proto::Https, None, &nets(&["10.0.0.0/8"]));
        assert_eq!(info.client_ip, "198.51.100.7".parse::<IpAddr>().unwrap());
        assert_eq!(info.x_forwarded_for, "127.0.0.1, 198.51.100.7, 10.0.0.2");
        assert!(info.x_forwarded_host.is_none());
    }

    #[test]
    fn trusted_ipv6_and_mapped_ipv4_peers() {
        let trusted = nets(&["10.0.0.0/8", "2001:db8::/32"]);
        let h = map(&[("x-forwarded-for", "[2001:db8:ffff::1]:443, 198.51.100.7:5000")]);
        let info = forwarded_for(&h, "2001:db8::2".parse().unwrap(), Proto::Https, None, &trusted);
        assert!(info.trusted_peer);
        assert_eq!(info.x_forwarded_for, "2001:db8:ffff::1, 198.51.100.7, 2001:db8::2");
        assert_eq!(info.client_ip, "198.51.100.7".parse::<IpAddr>().unwrap());

        // A dual-stack socket reports an IPv4 peer as ::ffff:a.b.c.d.
        let info = forwarded_for(&h, "::ffff:10.0.0.2".parse().unwrap(), Proto::Https, None, &trusted);
        assert!(info.trusted_peer);
        assert!(info.x_forwarded_for.to_str().unwrap().ends_with(", 10.0.0.2"));

        let info = forwarded_for(&h, "::ffff:203.0.113.1".parse().unwrap(), Proto::Https, None, &trusted);
        assert!(!info.trusted_peer);
        assert_eq!(info.x_forwarded_for, "203.0.113.1");
    }

    #[test]
    fn malformed_forwarded_values_from_trusted_peer_are_not_used() {
        let trusted = nets(&["10.0.0.0/8"]);
        let peer: IpAddr = "10.0.0.2".parse().unwrap();
        for xff in ["1.2.3.4, unknown", "1.2.3.4, , 5.6.7.8", "not-an-ip", "1.2.3.4 5.6.7.8", "_hidden"] {
            let h = map(&[("x-forwarded-for", xff)]);
            let info = forwarded_for(&h, peer, Proto::Https, None, &trusted);
            assert_eq!(info.x_forwarded_for, "10.0.0.2", "{xff}");
            assert_eq!(info.client_ip, peer, "{xff}");
        }
        let long = vec!["1.1.1.1"; MAX_FORWARDED_CHAIN + 1].join(",");
        let info = forwarded_for(&map(&[("x-forwarded-for", &long)]), peer, Proto::Https, None, &trusted);
        assert_eq!(info.x_forwarded_for, "10.0.0.2");

        // Several XFF headers are one list.
        let h = map(&[("x-forwarded-for", "1.1.1.1"), ("x-forwarded-for", "2.2.2.2")]);
        let info = forwarded_for(&h, peer, Proto::Https, None, &trusted);
        assert_eq!(info.x_forwarded_for, "1.1.1.1, 2.2.2.2, 10.0.0.2");

        for (proto, host) in [("javascript", "a b"), ("https, http", "evil/..")] {
            let h = map(&[("x-forwarded-proto", proto), ("x-forwarded-host", host)]);
            let info = forwarded_for(&h, peer, Proto::Https, Some("own.example"), &trusted);
            assert_eq!(info.x_forwarded_proto, "https");
            assert_eq!(info.x_forwarded_host.as_ref().unwrap(), "own.example");
        }
        let h = map(&[("x-forwarded-proto", "http"), ("x-forwarded-proto", "https")]);
        let info = forwarded_for(&h, peer, Proto::Https, None, &trusted);
        assert_eq!(info.x_forwarded_proto, "https");
    }

    #[test]
    fn all_trusted_chain_takes_leftmost() {
        let trusted = nets(&["10.0.0.0/8"]);
        let h = map(&[("x-forwarded-for", "10.1.1.1, 10.2.2.2")]);
        let info = forwarded_for(&h, "10.0.0.2".parse().unwrap(), Proto::Http, None, &trusted);
        assert_eq!(info.client_ip, "10.1.1.1".parse::<IpAddr>().unwrap());
        assert_eq!(info.x_forwarded_proto, "http");
    }

    #[test]
    fn apply_forwarded_replaces_every_spelling() {
        let mut h = map(&[
            ("x-forwarded-for", "1.2.3.4"),
            ("x_forwarded_for", "6.6.6.6"),
            ("X.Forwarded.Proto", "http"),
            ("x-forwarded-host", "evil"),
            ("x-forwarded-uri", "/admin"),
            ("x-forwarded-prefix", "/x"),
            ("forwarded", "for=6.6.6.6;proto=http"),
            ("x-real-ip", "6.6.6.6"),
            ("x-forwarded-client-cert", "left to strip_identity_headers"),
            ("accept", "*/*"),
        ]);
        let info = forwarded_for(&h, "203.0.113.5".parse().unwrap(), Proto::Https, Some("api.example"), &[]);
        let removed = apply_forwarded(&mut h, &info);
        assert_eq!(removed.len(), 8);
        assert_eq!(h["x-forwarded-for"], "203.0.113.5");
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "api.example");
        for gone in ["x_forwarded_for", "x.forwarded.proto", "x-forwarded-uri", "forwarded", "x-real-ip"] {
            assert!(!h.contains_key(gone), "{gone}");
        }
        assert!(h.contains_key("x-forwarded-client-cert"));
        assert!(h.contains_key("accept"));
    }

    // --- identity headers -----------------------------------------------------------------

    #[test]
    fn sets_identity_headers_exactly() {
        let roles = vec!["payments:reader".to_owned(), "payments:writer".to_owned()];
        let scopes = vec!["payments/read".to_owned(), "openid".to_owned()];
        let mut h = map(&[("X_Portcullis_Subject", "mallory"), ("x-portcullis-subject", "mallory")]);
        let report = set_identity_headers(
            &mut h,
            &IdentityHeaders {
                subject: "user-123",
                client_id: Some("acme$shop"),
                org: Some("acme"),
                roles: &roles,
                scopes: &scopes,
                auth_method: "bearer",
                client_cert: Some(ClientCert {
                    sha256_hex: "ab01",
                    subject: "CN=shop,O=acme",
                    san_uri: Some("spiffe://acme/shop"),
                }),
            },
        );
        assert!(report.is_complete(), "{report:?}");
        assert_eq!(h["x-portcullis-subject"], "user-123");
        assert_eq!(h.get_all("x-portcullis-subject").iter().count(), 1);
        assert!(!h.contains_key("x_portcullis_subject"));
        assert_eq!(h["x-portcullis-client-id"], "acme$shop");
        assert_eq!(h["x-portcullis-org"], "acme");
        assert_eq!(h["x-portcullis-roles"], "payments:reader,payments:writer");
        assert_eq!(h["x-portcullis-scopes"], "payments/read openid");
        assert_eq!(h["x-portcullis-auth-method"], "bearer");
        assert_eq!(h["x-forwarded-client-cert"], "Hash=ab01;Subject=\"CN=shop,O=acme\";URI=spiffe://acme/shop");
        assert_eq!(h.len(), 7);
    }

    #[test]
    fn bad_identity_values_are_omitted_and_reported() {
        let roles = vec![
            "ok:reader".to_owned(),
            "a,admin:all".to_owned(),
            "sp ace".to_owned(),
            String::new(),
            "x\r\nx-portcullis-roles: admin".to_owned(),
        ];
        let scopes = vec!["read".to_owned(), "two words".to_owned(), "élan".to_owned()];
        let mut h = HeaderMap::new();
        let report = set_identity_headers(
            &mut h,
            &IdentityHeaders {
                subject: "alice\nx-portcullis-roles: admin",
                client_id: Some(" padded"),
                org: Some("ümlaut"),
                roles: &roles,
                scopes: &scopes,
                auth_method: "bearer\0",
                client_cert: None,
            },
        );
        assert!(report.subject_missing());
        assert!(!h.contains_key("x-portcullis-subject"));
        assert!(!h.contains_key("x-portcullis-client-id"));
        assert!(!h.contains_key("x-portcullis-org"));
        assert!(!h.contains_key("x-portcullis-auth-method"));
        assert!(!h.contains_key("x-forwarded-client-cert"));
        assert_eq!(h["x-portcullis-roles"], "ok:reader");
        assert_eq!(h["x-portcullis-scopes"], "read");
        let find = |name: &HeaderName, item| {
            report.omitted.iter().find(|o| o.header == *name && o.item == item).unwrap().problem
        };
        assert_eq!(find(&X_PORTCULLIS_SUBJECT, None), ValueProblem::ControlCharacter);
        assert_eq!(find(&X_PORTCULLIS_CLIENT_ID, None), ValueProblem::SurroundingWhitespace);
        assert_eq!(find(&X_PORTCULLIS_ORG, None), ValueProblem::NonAscii);
        assert_eq!(find(&X_PORTCULLIS_AUTH_METHOD, None), ValueProblem::ControlCharacter);
        assert_eq!(find(&X_PORTCULLIS_ROLES, Some(1)), ValueProblem::ContainsSeparator);
        assert_eq!(find(&X_PORTCULLIS_ROLES, Some(2)), ValueProblem::ContainsSeparator);
        assert_eq!(find(&X_PORTCULLIS_ROLES, Some(3)), ValueProblem::Empty);
        assert_eq!(find(&X_PORTCULLIS_ROLES, Some(4)), ValueProblem::ControlCharacter);
        assert_eq!(find(&X_PORTCULLIS_SCOPES, Some(1)), ValueProblem::ContainsSeparator);
        assert_eq!(find(&X_PORTCULLIS_SCOPES, Some(2)), ValueProblem::NonAscii);
        assert_eq!(report.omitted.len(), 10);
    }

    #[test]
    fn empty_lists_and_absent_options_send_nothing_and_clear_stale_values() {
        let mut h = map(&[("x-portcullis-roles", "admin"), ("x-forwarded-client-cert", "Hash=1")]);
        let report = set_identity_headers(
            &mut h,
            &IdentityHeaders { subject: "svc", auth_method: "mtls", ..Default::default() },
        );
        assert!(report.is_complete());
        assert_eq!(h.len(), 2);
        assert!(!h.contains_key("x-portcullis-roles"));
        assert!(!h.contains_key("x-forwarded-client-cert"));
        let report = set_identity_headers(&mut HeaderMap::new(), &IdentityHeaders::default());
        assert!(report.subject_missing());
    }

    // --- XFCC -------------------------------------------------------------------------------

    #[test]
    fn xfcc_plain() {
        assert_eq!(
            xfcc_value("468ed33be74e", "CN=Test Client", Some("http://testclient.lyft.com")),
            "Hash=468ed33be74e;Subject=\"CN=Test Client\";URI=http://testclient.lyft.com"
        );
        assert_eq!(xfcc_value("ab", "CN=a", None), "Hash=ab;Subject=\"CN=a\"");
    }

    #[test]
    fn xfcc_escapes_quotes_backslashes_and_separators() {
        let v = xfcc_value("ab", r#"CN=Evil",URI=spiffe://admin;O=x\"#, Some("spiffe://acme/a;b=c,d"));
        assert_eq!(v, r#"Hash=ab;Subject="CN=Evil\",URI=spiffe://admin;O=x\\";URI="spiffe://acme/a;b=c,d""#);
        // A reader honouring the quoting sees exactly three keys.
        assert_eq!(
            split_xfcc(&v),
            vec![
                ("Hash".to_owned(), "ab".to_owned()),
                ("Subject".to_owned(), r#"CN=Evil",URI=spiffe://admin;O=x\"#.to_owned()),
                ("URI".to_owned(), "spiffe://acme/a;b=c,d".to_owned()),
            ]
        );
        // Quotes in URI or hash are quoted and escaped too.
        assert_eq!(xfcc_value("a\"b", "", Some("u\\")), r#"Hash="a\"b";Subject="";URI="u\\""#);
    }

    #[test]
    fn xfcc_is_always_a_header_value() {
        let v = xfcc_value("ab\r\n", "CN=caf\u{e9}\nx-portcullis-subject: admin\0", Some("urn:\u{7f}é"));
        assert!(HeaderValue::from_str(&v).is_ok(), "{v}");
        assert_eq!(v, r#"Hash=ab%0D%0A;Subject="CN=caf\\C3\\A9\\0Ax-portcullis-subject: admin\\00";URI=urn:%7F%C3%A9"#);
    }

    /// A minimal XFCC element reader (Envoy's rules) for the tests.
    fn split_xfcc(v: &str) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut chars = v.chars().peekable();
        loop {
            let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
            if key.is_empty() {
                break;
            }
            let mut value = String::new();
            if chars.peek() == Some(&'"') {
                chars.next();
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => value.push(chars.next().unwrap()),
                        '"' => break,
                        c => value.push(c),
                    }
                }
                assert!(matches!(chars.next(), None | Some(';')));
            } else {
                value = chars.by_ref().take_while(|c| *c != ';').collect();
            }
            out.push((key, value));
        }
        out
    }

    // --- framing ----------------------------------------------------------------------------

    #[test]
    fn accepted_framings() {
        assert_eq!(check_framing(&HeaderMap::new()), Ok(Framing::Absent));
        assert_eq!(check_framing(&map(&[("content-length", "0")])), Ok(Framing::ContentLength(0)));
        assert_eq!(
            check_framing(&map(&[("content-length", "18446744073709551615")])),
            Ok(Framing::ContentLength(u64::MAX))
        );
        assert_eq!(check_framing(&map(&[("content-length", " 42\t")])), Ok(Framing::ContentLength(42)));
        for te in ["chunked", "Chunked", "CHUNKED", " chunked "] {
            assert_eq!(check_framing(&map(&[("transfer-encoding", te)])), Ok(Framing::Chunked), "{te}");
        }
    }

    #[test]
    fn smuggling_shapes_are_refused() {
        use FramingError::*;
        let cases: &[(&[(&str, &str)], FramingError)] = &[
            (&[("content-length", "5"), ("transfer-encoding", "chunked")], ContentLengthAndTransferEncoding),
            (&[("transfer-encoding", "chunked"), ("content-length", "0")], ContentLengthAndTransferEncoding),
            (&[("content-length", "abc"), ("transfer-encoding", "identity")], ContentLengthAndTransferEncoding),
            (&[("content-length", "5"), ("content-length", "6")], DuplicateContentLength),
            (&[("content-length", "5"), ("content-length", "5")], DuplicateContentLength),
            (&[("content-length", "5, 5")], DuplicateContentLength),
            (&[("content-length", "5,6")], DuplicateContentLength),
            (&[("content-length", "+5")], InvalidContentLength),
            (&[("content-length", "-1")], InvalidContentLength),
            (&[("content-length", "0x10")], InvalidContentLength),
            (&[("content-length", "1 0")], InvalidContentLength),
            (&[("content-length", "")], InvalidContentLength),
            (&[("content-length", "5.0")], InvalidContentLength),
            (&[("content-length", "18446744073709551616")], InvalidContentLength),
            (&[("content-length", "99999999999999999999999")], InvalidContentLength),
            (&[("transfer-encoding", "chunked, identity")], UnsupportedTransferEncoding),
            (&[("transfer-encoding", "identity")], UnsupportedTransferEncoding),
            (&[("transfer-encoding", "gzip, chunked")], UnsupportedTransferEncoding),
            (&[("transfer-encoding", "chunked, chunked")], UnsupportedTransferEncoding),
            (&[("transfer-encoding", "chunked"), ("transfer-encoding", "chunked")], UnsupportedTransferEncoding),
            (&[("transfer-encoding", "gzip"), ("transfer-encoding", "chunked")], UnsupportedTransferEncoding),
            (&[("transfer-encoding", "chunked;q=1")], UnsupportedTransferEncoding),
            (&[("transfer-encoding", "xchunked")], UnsupportedTransferEncoding),
            (&[("transfer-encoding", "chunked_")], UnsupportedTransferEncoding),
            (&[("transfer-encoding", "")], UnsupportedTransferEncoding),
        ];
        for (pairs, want) in cases {
            let got = check_framing(&map(pairs));
            assert_eq!(got, Err(*want), "{pairs:?}");
            assert_eq!(want.status(), StatusCode::BAD_REQUEST);
        }
    }
}
