//! Invariants of the gateway's untrusted-input parsers, shared by the cargo-fuzz targets
//! (`fuzz/fuzz_targets/`, libFuzzer through scripts/fuzz.sh) and the stable randomized tests
//! (`crates/portcullis-gateway/tests/parsers_fuzz.rs`, which includes this file with `#[path]`,
//! so it is compiled and run by every `cargo test`).
//!
//! Each `check_*` function runs the code under test and panics (an `assert!`) when a documented
//! rule is broken; the `*_from_bytes` functions turn a fuzzer's raw bytes into structured input.
//! The expectations are written from the module docs of `config.rs`, `headers.rs`, `soap.rs`,
//! `jws.rs` and `signing.rs`, not copied from the implementations.

use std::net::IpAddr;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use http::Method;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use portcullis_core::crypto::jws::{self, JwsError, MAX_JWS_LEN};
use portcullis_core::crypto::signing::{Algorithm, SigningKey, VerifyingKey};
use portcullis_core::tokens::ACCESS_TOKEN_TYP;
use portcullis_gateway::config::{
    GatewayConfig, KNOWN_METHODS, MethodSet, MtlsMode, RateLimitConfig, RolesMode, Route, RouteConfig, RouteError,
    RouteKind, ValidatedConfig, normalise_path,
};
use portcullis_gateway::headers::{
    self as gh, Framing, FramingError, IdentityHeaders, IpNet, Proto, X_FORWARDED_CLIENT_CERT, X_FORWARDED_FOR,
    X_FORWARDED_HOST, X_FORWARDED_PROTO, X_PORTCULLIS_AUTH_METHOD, X_PORTCULLIS_CLIENT_ID, X_PORTCULLIS_ORG,
    X_PORTCULLIS_ROLES, X_PORTCULLIS_SCOPES, X_PORTCULLIS_SUBJECT,
};
use portcullis_gateway::soap::{DETAIL_NS, FaultKind, SNIFF_LEN, SOAP11_ENVELOPE_NS, SOAP12_ENVELOPE_NS, SoapVersion};

/// Reads a fuzzer's bytes front to back; zero once they run out.
struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn byte(&mut self) -> u8 {
        let (&b, rest) = self.0.split_first().unwrap_or((&0, &[]));
        self.0 = rest;
        b
    }
}

// =============================================================================================
// Request paths and route matching (config.rs)
// =============================================================================================

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~".contains(&b)
}

fn hex_value(b: u8) -> u8 {
    char::from(b).to_digit(16).and_then(|d| u8::try_from(d).ok()).unwrap_or(0)
}

/// The request-path rules of `normalise_path`'s documentation, written independently: starts
/// with `/`; no `//` and no `.`/`..` segment; raw bytes are RFC 3986 pchar (unreserved,
/// sub-delims but `;`, `:`, `@`) or `/ [ ] | ^`; every `%` is followed by two hex digits whose
/// byte is not `/`, `\`, a control or an unreserved character; the percent-decoded path is UTF-8.
pub fn path_spec_ok(raw: &str) -> bool {
    let b = raw.as_bytes();
    if b.first() != Some(&b'/') || raw.contains("//") || raw.split('/').any(|s| s == "." || s == "..") {
        return false;
    }
    let mut decoded = Vec::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        if c == b'%' {
            let (Some(&h), Some(&l)) = (b.get(i + 1), b.get(i + 2)) else {
                return false;
            };
            if !h.is_ascii_hexdigit() || !l.is_ascii_hexdigit() {
                return false;
            }
            let v = hex_value(h) * 16 + hex_value(l);
            if v == b'/' || v == b'\\' || v.is_ascii_control() || is_unreserved(v) {
                return false;
            }
            decoded.push(v);
            i += 3;
        } else {
            if !(is_unreserved(c) || b"/!$&'()*+,=:@[]|^".contains(&c)) {
                return false;
            }
            decoded.push(c);
            i += 1;
        }
    }
    std::str::from_utf8(&decoded).is_ok()
}

/// `normalise_path` accepts exactly what [`path_spec_ok`] accepts, never panics, and returns an
/// accepted path unchanged (the same slice): it refuses, it never rewrites.
pub fn check_path(raw: &str) {
    let got = normalise_path(raw);
    assert_eq!(got.is_ok(), path_spec_ok(raw), "normalise_path({raw:?}) = {got:?} disagrees with its documented rules");
    if let Ok(p) = got {
        assert!(std::ptr::eq(p, raw), "normalise_path rewrote {raw:?} into {p:?}");
        assert!(p.starts_with('/'), "{p:?}");
        assert!(!p.contains("//"), "{p:?}");
        assert!(!p.split('/').any(|s| s == "." || s == ".."), "{p:?}");
        assert!(
            !p.bytes().any(|c| matches!(c, b';' | b'\\' | b'?' | b'#') || c.is_ascii_control() || !c.is_ascii()),
            "{p:?}"
        );
    }
}

/// A route on `path`; `methods` empty: omitted (every method).
fn route_config(path: &str, methods: &[&str]) -> RouteConfig {
    RouteConfig {
        path: path.into(),
        methods: (!methods.is_empty()).then(|| methods.iter().map(|s| (*s).to_owned()).collect()),
        upstream: "http://upstream.test".into(),
        kind: RouteKind::Rest,
        auth: vec!["bearer".into()],
        require_roles: Vec::new(),
        roles_mode: RolesMode::Any,
        require_scopes: Vec::new(),
        require_permissions: Vec::new(),
        audience: None,
        timeout_ms: 30_000,
        connect_timeout_ms: None,
        max_body_bytes: 0,
        rate_limit: RateLimitConfig::default(),
        upstream_ca_file: None,
        upstream_client_certificate: false,
        preserve_host: false,
    }
}

/// Two fixed route tables: one with a `/` catch-all, one without (so `NotFound` happens). Both
/// have prefixes with and without a trailing `/`, several routes on one prefix split by method,
/// and prefixes that differ only in letter case.
pub fn route_fixtures() -> Vec<ValidatedConfig> {
    let rest = [
        route_config("/payments", &[]),
        route_config("/payments/", &["GET"]),
        route_config("/payments/", &["post", "PUT"]),
        route_config("/payments/admin", &[]),
        route_config("/admin", &["GET"]),
        route_config("/Admin/", &[]),
        route_config("/a.b/c~d/_e-f/", &[]),
        route_config("/.well-known/", &["GET"]),
        route_config("/api/v1/", &["DELETE", "PATCH"]),
        route_config("/api/V1/", &["GET"]),
    ];
    let with_root: Vec<RouteConfig> = std::iter::once(route_config("/", &[])).chain(rest.iter().cloned()).collect();
    [with_root, rest.to_vec()]
        .into_iter()
        .map(|routes| {
            GatewayConfig {
                listen: "127.0.0.1:1".into(),
                server_names: vec!["localhost".into()],
                mtls: MtlsMode::Optional,
                trusted_proxies: Vec::new(),
                login: None,
                routes,
            }
            .validate()
            .expect("the fixed route table validates")
        })
        .collect()
}

/// The methods tried against the route tables: the fixed set, two outside it, and extension
/// methods (one spelling `get` in lower case, which is not `GET`).
pub fn methods() -> Vec<Method> {
    let mut m = KNOWN_METHODS.to_vec();
    m.push(Method::TRACE);
    m.push(Method::CONNECT);
    m.extend(["PROPFIND", "get"].iter().filter_map(|s| Method::from_bytes(s.as_bytes()).ok()));
    m
}

/// The documented segment-boundary rule.
fn spec_prefix_matches(prefix: &str, path: &str) -> bool {
    path.starts_with(prefix)
        && (prefix.ends_with('/') || path.len() == prefix.len() || path.as_bytes().get(prefix.len()) == Some(&b'/'))
}

/// `ValidatedConfig::route`: a refused path is `BadPath` with `normalise_path`'s reason; otherwise
/// the longest prefix matching on a segment boundary, case-sensitively (the route's prefix is a
/// byte-exact prefix of the path), then the method, with no fallback to a shorter prefix.
pub fn check_route(cfg: &ValidatedConfig, method: &Method, raw: &str) {
    let got = cfg.route(method, raw);
    let path = match normalise_path(raw) {
        Err(e) => {
            assert_eq!(got, Err(RouteError::BadPath(e)), "route({method}, {raw:?})");
            return;
        }
        Ok(p) => p,
    };
    for r in cfg.routes() {
        assert_eq!(r.matches_path(path), spec_prefix_matches(&r.path, path), "{:?} on {path:?}", r.path);
    }
    let matching: Vec<&Route> = cfg.routes().iter().filter(|r| spec_prefix_matches(&r.path, path)).collect();
    let expected = match matching.iter().map(|r| r.path.len()).max() {
        None => Err(RouteError::NotFound),
        Some(len) => {
            let best: Vec<&Route> = matching.into_iter().filter(|r| r.path.len() == len).collect();
            match best.iter().find(|r| r.methods.contains(method)) {
                Some(r) => Ok(*r),
                None => Err(RouteError::MethodNotAllowed {
                    allow: best.iter().fold(MethodSet::EMPTY, |a, r| a.union(r.methods)),
                }),
            }
        }
    };
    assert_eq!(got, expected, "route({method}, {raw:?})");
    if let Ok(r) = got {
        assert!(path.as_bytes().starts_with(r.path.as_bytes()), "{raw:?} matched {:?} ignoring case", r.path);
        assert!(KNOWN_METHODS.contains(method), "{method} was routed");
    }
}

fn swap_case(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_lowercase() { c.to_ascii_uppercase() } else { c.to_ascii_lowercase() }).collect()
}

/// [`check_path`] and [`check_route`] on `raw` and on its upper-, lower- and swapped-case
/// spellings: a spelling differing only in case must route by its own bytes.
pub fn check_path_and_routes(cfgs: &[ValidatedConfig], method: &Method, raw: &str) {
    let variants = [raw.to_owned(), raw.to_ascii_uppercase(), raw.to_ascii_lowercase(), swap_case(raw)];
    for (i, p) in variants.iter().enumerate() {
        if i > 0 && variants.iter().take(i).any(|q| q == p) {
            continue;
        }
        check_path(p);
        for cfg in cfgs {
            check_route(cfg, method, p);
        }
    }
}

/// Fuzzer bytes: the first picks the method, the rest is the path (invalid UTF-8 replaced).
pub fn path_case_from_bytes(data: &[u8]) -> (Method, String) {
    let mut c = Cursor(data);
    let all = methods();
    let method = all.get(usize::from(c.byte()) % all.len().max(1)).cloned().unwrap_or(Method::GET);
    (method, String::from_utf8_lossy(c.0).into_owned())
}

// =============================================================================================
// Headers (headers.rs)
// =============================================================================================

/// Lower case, `_` and `.` as `-`.
pub fn spec_normalise(name: &str) -> String {
    name.chars()
        .map(|c| match c {
            '_' | '.' => '-',
            c => c.to_ascii_lowercase(),
        })
        .collect()
}

/// The identity namespace: `x-portcullis-*`, bare `x-portcullis`, `x-forwarded-client-cert`,
/// `client-cert`, `client-cert-chain`, after [`spec_normalise`].
pub fn spec_is_identity(name: &str) -> bool {
    let n = spec_normalise(name);
    n.starts_with("x-portcullis-")
        || n == "x-portcullis"
        || n == "x-forwarded-client-cert"
        || n == "client-cert"
        || n == "client-cert-chain"
}

/// The forwarding namespace: `x-forwarded-*` but the client certificate, `forwarded`, `x-real-ip`.
pub fn spec_is_forwarding(name: &str) -> bool {
    let n = spec_normalise(name);
    (n.starts_with("x-forwarded-") && n != "x-forwarded-client-cert") || n == "forwarded" || n == "x-real-ip"
}

/// The hop-by-hop headers `remove_hop_by_hop` always removes (`te` is apart).
pub const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "trailer",
    "proxy-authenticate",
    "proxy-authorization",
];

/// Peers tried: trusted and untrusted, IPv4, IPv6 and IPv4-mapped IPv6.
pub const PEERS: [&str; 12] = [
    "203.0.113.5",
    "10.0.0.2",
    "10.255.255.255",
    "::ffff:10.0.0.2",
    "::ffff:203.0.113.1",
    "2001:db8::2",
    "2001:db9::2",
    "::1",
    "127.0.0.1",
    "127.0.0.2",
    "192.0.2.77",
    "fe80::1",
];

/// The trusted proxies of the `forwarded_for` checks (the last one is IPv4-mapped IPv6).
pub const TRUSTED_PROXIES: [&str; 4] = ["10.0.0.0/8", "2001:db8::/32", "127.0.0.1", "::ffff:192.0.2.0/120"];

pub fn trusted_proxies() -> Vec<IpNet> {
    TRUSTED_PROXIES.iter().filter_map(|s| s.parse().ok()).collect()
}

/// The verified identity handed to `set_identity_headers`, owned.
#[derive(Debug, Clone, Default)]
pub struct Identity {
    pub subject: String,
    pub client_id: Option<String>,
    pub org: Option<String>,
    pub roles: Vec<String>,
    pub scopes: Vec<String>,
    pub auth_method: String,
    /// `(sha256_hex, subject DN, san_uri)`.
    pub cert: Option<(String, String, Option<String>)>,
}

/// One run of the header pipeline: raw header lines (invalid names or values are skipped, as a
/// parser would refuse them), the connection's facts and the identity to set.
#[derive(Debug, Clone)]
pub struct HeaderCase {
    pub headers: Vec<(Vec<u8>, Vec<u8>)>,
    pub peer: IpAddr,
    pub https: bool,
    pub own_host: Option<String>,
    pub identity: Identity,
}

impl HeaderCase {
    /// Fuzzer bytes: the first byte picks the peer and the scheme; then `\n`-separated lines,
    /// `name:value` a header, `=text` the next identity field (subject, client id, org, auth
    /// method, own host, certificate hash, subject, URI, then roles and scopes alternately).
    pub fn from_bytes(data: &[u8]) -> Self {
        let mut c = Cursor(data);
        let flags = c.byte();
        let peer = PEERS.get(usize::from(flags & 0x0f) % PEERS.len()).and_then(|s| s.parse().ok());
        let mut headers = Vec::new();
        let mut texts: Vec<String> = Vec::new();
        for line in c.0.split(|b| *b == b'\n') {
            if let Some(text) = line.strip_prefix(b"=") {
                texts.push(String::from_utf8_lossy(text).into_owned());
            } else if let Some(i) = line.iter().position(|b| *b == b':') {
                let (name, value) = line.split_at(i);
                headers.push((name.to_vec(), value.get(1..).unwrap_or_default().to_vec()));
            }
        }
        let text = |i: usize| texts.get(i).cloned();
        let identity = Identity {
            subject: text(0).unwrap_or_default(),
            client_id: text(1),
            org: text(2),
            auth_method: text(3).unwrap_or_default(),
            cert: text(5).map(|h| (h, text(6).unwrap_or_default(), text(7))),
            roles: texts.iter().skip(8).step_by(2).cloned().collect(),
            scopes: texts.iter().skip(9).step_by(2).cloned().collect(),
        };
        HeaderCase {
            headers,
            peer: peer.unwrap_or(IpAddr::from([203, 0, 113, 5])),
            https: flags & 0x10 != 0,
            own_host: text(4),
            identity,
        }
    }

    /// The header map a parser would build: names and values that are not valid are left out.
    pub fn header_map(&self) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (n, v) in &self.headers {
            if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(n), HeaderValue::from_bytes(v)) {
                map.append(n, v);
            }
        }
        map
    }
}

fn values<'m>(map: &'m HeaderMap, name: &str) -> Vec<&'m [u8]> {
    map.get_all(name).iter().map(HeaderValue::as_bytes).collect()
}

fn trim_ows(s: &[u8]) -> &[u8] {
    let start = s.iter().position(|b| *b != b' ' && *b != b'\t').unwrap_or(s.len());
    let end = s.iter().rposition(|b| *b != b' ' && *b != b'\t').map_or(start, |e| e + 1);
    s.get(start..end).unwrap_or_default()
}

/// Every header of `before` for which `keep` holds has the same values, in the same order, in
/// `after`.
fn unchanged_where(before: &HeaderMap, after: &HeaderMap, keep: impl Fn(&HeaderName) -> bool, what: &str) {
    for name in before.keys().filter(|n| keep(n)) {
        assert_eq!(values(before, name.as_str()), values(after, name.as_str()), "{what} changed {name}");
    }
}

/// RFC 9112 §6 as `check_framing` documents it: CL with TE, several CLs (also `5, 5`), a CL that
/// is not 1*DIGIT within optional whitespace or overflows u64, and any TE but one `chunked`.
fn spec_framing(map: &HeaderMap) -> Result<Framing, FramingError> {
    let cl = values(map, "content-length");
    let te = values(map, "transfer-encoding");
    if !cl.is_empty() && !te.is_empty() {
        return Err(FramingError::ContentLengthAndTransferEncoding);
    }
    match cl.as_slice() {
        [] => {}
        [v] => {
            let digits = trim_ows(v);
            if digits.contains(&b',') {
                return Err(FramingError::DuplicateContentLength);
            }
            if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
                return Err(FramingError::InvalidContentLength);
            }
            return std::str::from_utf8(digits)
                .ok()
                .and_then(|d| d.parse::<u64>().ok())
                .map(Framing::ContentLength)
                .ok_or(FramingError::InvalidContentLength);
        }
        _ => return Err(FramingError::DuplicateContentLength),
    }
    match te.as_slice() {
        [] => Ok(Framing::Absent),
        [v] if trim_ows(v).eq_ignore_ascii_case(b"chunked") => Ok(Framing::Chunked),
        _ => Err(FramingError::UnsupportedTransferEncoding),
    }
}

/// The tokens of every visible-ASCII `Connection` value, trimmed and lower-cased.
fn spec_connection_tokens(map: &HeaderMap) -> Vec<String> {
    map.get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

fn spec_websocket(map: &HeaderMap) -> bool {
    let upgrades: Vec<&HeaderValue> = map.get_all(header::UPGRADE).iter().collect();
    let [one] = upgrades.as_slice() else {
        return false;
    };
    let protocol_ok = one.to_str().is_ok_and(|v| {
        !v.contains(',') && v.split('/').next().is_some_and(|p| p.trim().eq_ignore_ascii_case("websocket"))
    });
    protocol_ok && spec_connection_tokens(map).iter().any(|t| t == "upgrade")
}

/// A plausible host: reg-name, IPv4 or bracketed-IPv6 characters, with an optional port.
fn spec_valid_host(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 255
        && h.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b':' | b'[' | b']'))
}

fn check_forwarded(
    map: &HeaderMap,
    peer: IpAddr,
    proto: Proto,
    own_host: Option<&str>,
    trusted: &[IpNet],
    info: &gh::ForwardedInfo,
) {
    let peer = peer.to_canonical();
    let is_trusted = |ip: IpAddr| trusted.iter().any(|n| n.contains(ip));
    let own = own_host.map(str::trim).filter(|h| spec_valid_host(h));
    assert_eq!(info.trusted_peer, is_trusted(peer), "{peer}");
    let xff = info.x_forwarded_for.to_str().expect("x-forwarded-for is ASCII");
    let list: Vec<IpAddr> =
        xff.split(", ").map(|s| s.parse().unwrap_or_else(|_| panic!("x-forwarded-for {xff:?}"))).collect();
    assert_eq!(list.last(), Some(&peer), "x-forwarded-for {xff:?} must end with the peer {peer}");
    assert!(list.iter().all(|ip| *ip == ip.to_canonical()), "{xff:?} is not canonical");
    assert!(list.len() <= 65, "a chain of {} addresses was kept", list.len());
    let client = list.iter().rev().find(|ip| !is_trusted(**ip)).or(list.first());
    assert_eq!(Some(&info.client_ip), client, "client ip for x-forwarded-for {xff:?}");
    assert!(info.x_forwarded_proto == "http" || info.x_forwarded_proto == "https");
    if let Some(h) = &info.x_forwarded_host {
        assert!(h.to_str().is_ok_and(spec_valid_host), "x-forwarded-host {h:?}");
    }
    if !info.trusted_peer {
        // Nothing the client sent is believed.
        assert_eq!(list, vec![peer], "untrusted peer's x-forwarded-for");
        assert_eq!(info.client_ip, peer);
        assert_eq!(info.x_forwarded_proto, proto.as_str());
        assert_eq!(info.x_forwarded_host.as_ref().map(HeaderValue::as_bytes), own.map(str::as_bytes));
        return;
    }
    // A trusted peer's chain is used whole or not at all.
    let raw: Option<Vec<&str>> = map
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .map(|v| v.to_str().ok())
        .collect::<Option<Vec<&str>>>()
        .map(|vs| vs.iter().flat_map(|v| v.split(',')).map(str::trim).collect());
    let received = list.get(..list.len() - 1).unwrap_or_default();
    match raw {
        None => assert!(received.is_empty(), "unreadable chain used: {xff:?}"),
        Some(elements) => {
            let bare: Option<Vec<IpAddr>> = elements.iter().map(|e| e.parse::<IpAddr>().ok()).collect();
            let junk = elements
                .iter()
                .any(|e| e.is_empty() || !e.bytes().all(|b| b.is_ascii_hexdigit() || b".:[]".contains(&b)));
            if let Some(bare) = bare.filter(|b| b.len() <= 64) {
                let canonical: Vec<IpAddr> = bare.iter().map(|ip| ip.to_canonical()).collect();
                assert_eq!(received, canonical.as_slice(), "trusted chain {elements:?}");
            } else if junk || elements.len() > 64 {
                assert!(received.is_empty(), "chain {elements:?} partly used: {xff:?}");
            }
        }
    }
}

fn spec_value_ok(v: &str) -> bool {
    !v.is_empty() && v.bytes().all(|b| (0x20..0x7f).contains(&b)) && !v.starts_with(' ') && !v.ends_with(' ')
}

/// `set_identity_headers` on `before`: the identity namespace holds exactly the gateway's headers
/// for the valid inputs, with the inputs as values, one value each; the rest is untouched; the
/// report names exactly what was left out.
fn check_identity(before: &HeaderMap, id: &Identity) {
    let mut after = before.clone();
    let ids = IdentityHeaders {
        subject: &id.subject,
        client_id: id.client_id.as_deref(),
        org: id.org.as_deref(),
        roles: &id.roles,
        scopes: &id.scopes,
        auth_method: &id.auth_method,
        client_cert: id.cert.as_ref().map(|(h, s, u)| gh::ClientCert {
            sha256_hex: h,
            subject: s,
            san_uri: u.as_deref(),
        }),
    };
    let report = gh::set_identity_headers(&mut after, &ids);

    let role_ok = |r: &String| spec_value_ok(r) && !r.contains([',', ' ']);
    let scope_ok = |s: &String| spec_value_ok(s) && !s.contains(' ');
    let good_roles: Vec<&str> = id.roles.iter().filter(|r| role_ok(r)).map(String::as_str).collect();
    let good_scopes: Vec<&str> = id.scopes.iter().filter(|s| scope_ok(s)).map(String::as_str).collect();
    let mut expected: Vec<(HeaderName, String)> = Vec::new();
    let mut single = |name: HeaderName, v: Option<&str>| {
        if let Some(v) = v.filter(|v| spec_value_ok(v)) {
            expected.push((name, v.to_owned()));
        }
    };
    single(X_PORTCULLIS_SUBJECT, Some(&id.subject));
    single(X_PORTCULLIS_CLIENT_ID, id.client_id.as_deref());
    single(X_PORTCULLIS_ORG, id.org.as_deref());
    single(X_PORTCULLIS_AUTH_METHOD, Some(&id.auth_method));
    if !good_roles.is_empty() {
        expected.push((X_PORTCULLIS_ROLES, good_roles.join(",")));
    }
    if !good_scopes.is_empty() {
        expected.push((X_PORTCULLIS_SCOPES, good_scopes.join(" ")));
    }
    if let Some((h, s, u)) = &id.cert {
        expected.push((X_FORWARDED_CLIENT_CERT, gh::xfcc_value(h, s, u.as_deref())));
    }
    for name in after.keys().filter(|n| spec_is_identity(n.as_str())) {
        assert!(expected.iter().any(|(n, _)| n == name), "{name} is left in the identity namespace: {id:?}");
    }
    for (name, value) in &expected {
        assert_eq!(values(&after, name.as_str()), vec![value.as_bytes()], "{name} for {id:?}");
    }
    unchanged_where(before, &after, |n| !spec_is_identity(n.as_str()), "set_identity_headers");
    assert!(after.keys().all(|n| before.contains_key(n) || spec_is_identity(n.as_str())));

    let singles_ok = spec_value_ok(&id.subject)
        && spec_value_ok(&id.auth_method)
        && id.client_id.as_deref().is_none_or(spec_value_ok)
        && id.org.as_deref().is_none_or(spec_value_ok);
    let all_ok = singles_ok && id.roles.iter().all(role_ok) && id.scopes.iter().all(scope_ok);
    assert_eq!(report.subject_missing(), !spec_value_ok(&id.subject), "{report:?} for {id:?}");
    assert_eq!(report.is_complete(), all_ok, "{report:?} for {id:?}");
    for (name, items, ok) in [
        (X_PORTCULLIS_ROLES, &id.roles, &role_ok as &dyn Fn(&String) -> bool),
        (X_PORTCULLIS_SCOPES, &id.scopes, &scope_ok),
    ] {
        let bad: Vec<usize> = items.iter().enumerate().filter(|(_, v)| !ok(v)).map(|(i, _)| i).collect();
        let reported: Vec<usize> = report.omitted.iter().filter(|o| o.header == name).filter_map(|o| o.item).collect();
        assert_eq!(reported, bad, "{name} omissions for {items:?}");
    }
}

/// Clean form of an XFCC value: printable ASCII and space kept, every other byte escaped.
fn spec_xfcc_clean(s: &str, escape: &str) -> String {
    s.bytes()
        .map(|b| if b.is_ascii_graphic() || b == b' ' { char::from(b).to_string() } else { format!("{escape}{b:02X}") })
        .collect()
}

/// An XFCC element reader (Envoy's rules): `key=value` pairs separated by `;`, a value either
/// bare (up to `;`) or double-quoted with `\` escaping the next character.
fn split_xfcc(v: &str) -> Option<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut chars = v.chars().peekable();
    while chars.peek().is_some() {
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next()? {
                    '\\' => value.push(chars.next()?),
                    '"' => break,
                    c => value.push(c),
                }
            }
            if !matches!(chars.next(), None | Some(';')) {
                return None;
            }
        } else {
            value = chars.by_ref().take_while(|c| *c != ';').collect();
        }
        out.push((key, value));
    }
    Some(out)
}

/// `xfcc_value` is always a valid header value, and a reader honouring the quoting sees exactly
/// `Hash`, `Subject` and (when given) `URI`, each the input with bytes a header cannot carry
/// escaped (`%XX` in the hash and URI, RFC 4514 `\XX` in the subject).
pub fn check_xfcc(hash: &str, subject: &str, uri: Option<&str>) {
    let v = gh::xfcc_value(hash, subject, uri);
    assert!(HeaderValue::from_str(&v).is_ok(), "xfcc_value is not a header value: {v:?}");
    let mut expected =
        vec![("Hash".to_owned(), spec_xfcc_clean(hash, "%")), ("Subject".to_owned(), spec_xfcc_clean(subject, "\\"))];
    if let Some(uri) = uri {
        expected.push(("URI".to_owned(), spec_xfcc_clean(uri, "%")));
    }
    assert_eq!(split_xfcc(&v), Some(expected), "xfcc_value({hash:?}, {subject:?}, {uri:?}) = {v:?}");
}

/// The whole header pipeline on one case, each step against its documented rules.
pub fn check_headers(case: &HeaderCase) {
    for (n, _) in &case.headers {
        if let Ok(s) = std::str::from_utf8(n) {
            assert_eq!(gh::is_identity_header(s), spec_is_identity(s), "is_identity_header({s:?})");
            assert_eq!(gh::is_forwarding_header(s), spec_is_forwarding(s), "is_forwarding_header({s:?})");
        }
    }
    let map = case.header_map();

    assert_eq!(gh::check_framing(&map), spec_framing(&map), "check_framing on {map:?}");
    assert_eq!(gh::is_websocket_upgrade(&map), spec_websocket(&map), "is_websocket_upgrade on {map:?}");

    let proto = if case.https { Proto::Https } else { Proto::Http };
    let own_host = case.own_host.as_deref();
    let untrusted = gh::forwarded_for(&map, case.peer, proto, own_host, &[]);
    assert_eq!(untrusted.client_ip, case.peer.to_canonical(), "no trusted proxies: the peer is the client");
    assert_eq!(untrusted.x_forwarded_for, case.peer.to_canonical().to_string().as_str());
    check_forwarded(&map, case.peer, proto, own_host, &[], &untrusted);
    let trusted = trusted_proxies();
    let info = gh::forwarded_for(&map, case.peer, proto, own_host, &trusted);
    check_forwarded(&map, case.peer, proto, own_host, &trusted, &info);

    // strip_identity_headers: the namespace is gone, every other header is untouched.
    let mut stripped = map.clone();
    let removed = gh::strip_identity_headers(&mut stripped);
    assert!(stripped.keys().all(|n| !spec_is_identity(n.as_str())), "identity header left in {stripped:?}");
    unchanged_where(&map, &stripped, |n| !spec_is_identity(n.as_str()), "strip_identity_headers");
    let mut identity_names: Vec<&HeaderName> = map.keys().filter(|n| spec_is_identity(n.as_str())).collect();
    let mut removed_names: Vec<&HeaderName> = removed.iter().collect();
    identity_names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    removed_names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    assert_eq!(removed_names, identity_names, "strip_identity_headers' report");

    // remove_hop_by_hop(_, false).
    let mut hop = stripped.clone();
    gh::remove_hop_by_hop(&mut hop, false);
    for name in HOP_BY_HOP {
        assert!(!hop.contains_key(name), "{name} survived remove_hop_by_hop: {hop:?}");
    }
    let te = stripped.get_all(header::TE).iter().collect::<Vec<_>>();
    let keep_te =
        !te.is_empty() && te.iter().all(|v| v.to_str().is_ok_and(|s| s.trim().eq_ignore_ascii_case("trailers")));
    assert_eq!(hop.contains_key(header::TE), keep_te, "te handling: {te:?}");
    let tokens = spec_connection_tokens(&stripped);
    let mut named: Vec<HeaderName> = Vec::new();
    for t in &tokens {
        let Ok(name) = HeaderName::from_bytes(t.as_bytes()) else {
            continue;
        };
        let protected = name == header::CONTENT_LENGTH
            || name == header::HOST
            || (name == header::TE && keep_te)
            || spec_is_identity(t)
            || spec_is_forwarding(t);
        if protected {
            assert_eq!(values(&hop, t), values(&stripped, t), "protected {t} changed by Connection: {t}");
        } else {
            assert!(!hop.contains_key(&name), "{name} is named by Connection but survived: {hop:?}");
            named.push(name);
        }
    }
    unchanged_where(
        &stripped,
        &hop,
        |n| !HOP_BY_HOP.contains(&n.as_str()) && *n != header::TE && !named.contains(n),
        "remove_hop_by_hop",
    );
    assert!(hop.keys().all(|n| stripped.contains_key(n)), "remove_hop_by_hop added a header");

    // remove_hop_by_hop(_, true): the same, but the first Upgrade value and `Connection: upgrade`.
    let mut up = stripped.clone();
    gh::remove_hop_by_hop(&mut up, true);
    match stripped.get(header::UPGRADE) {
        Some(u) => {
            assert_eq!(values(&up, "upgrade"), vec![u.as_bytes()]);
            assert_eq!(values(&up, "connection"), vec![b"upgrade".as_slice()]);
        }
        None => assert!(!up.contains_key(header::UPGRADE) && !up.contains_key(header::CONNECTION)),
    }
    let rest = |n: &HeaderName| *n != header::UPGRADE && *n != header::CONNECTION;
    unchanged_where(&hop, &up, rest, "remove_hop_by_hop(pass_upgrade)");
    unchanged_where(&up, &hop, rest, "remove_hop_by_hop(pass_upgrade)");

    // apply_forwarded: the forwarding namespace is exactly the three values of `info`.
    let mut fwd = hop.clone();
    let removed = gh::apply_forwarded(&mut fwd, &info);
    for name in fwd.keys().filter(|n| spec_is_forwarding(n.as_str())) {
        assert!(
            *name == X_FORWARDED_FOR || *name == X_FORWARDED_PROTO || *name == X_FORWARDED_HOST,
            "{name} left by apply_forwarded"
        );
    }
    assert_eq!(values(&fwd, "x-forwarded-for"), vec![info.x_forwarded_for.as_bytes()]);
    assert_eq!(values(&fwd, "x-forwarded-proto"), vec![info.x_forwarded_proto.as_bytes()]);
    assert_eq!(
        values(&fwd, "x-forwarded-host"),
        info.x_forwarded_host.iter().map(|v| v.as_bytes()).collect::<Vec<_>>()
    );
    unchanged_where(&hop, &fwd, |n| !spec_is_forwarding(n.as_str()), "apply_forwarded");
    assert!(removed.iter().all(|n| spec_is_forwarding(n.as_str()) && hop.contains_key(n)));
    assert_eq!(removed.len(), hop.keys().filter(|n| spec_is_forwarding(n.as_str())).count());

    // set_identity_headers, on the forwarded map and on the unstripped one (it clears the
    // namespace itself).
    check_identity(&fwd, &case.identity);
    check_identity(&map, &case.identity);
    if let Some((h, s, u)) = &case.identity.cert {
        check_xfcc(h, s, u.as_deref());
    }
    check_xfcc(&case.identity.subject, &case.identity.auth_method, case.identity.org.as_deref());
}

// =============================================================================================
// SOAP (soap.rs)
// =============================================================================================

/// Fuzzer bytes: the first byte says whether there is a `Content-Type` (bit 0) and a
/// `SOAPAction` (bit 1); then `\n`-separated content type, reason, error id, and the body (rest).
pub fn soap_case_from_bytes(data: &[u8]) -> (HeaderMap, Vec<u8>, String, String) {
    let mut c = Cursor(data);
    let flags = c.byte();
    let mut parts = c.0.splitn(4, |b| *b == b'\n');
    let (ct, reason, error_id, body) = (parts.next(), parts.next(), parts.next(), parts.next());
    let mut headers = HeaderMap::new();
    if flags & 1 != 0
        && let Some(v) = ct.and_then(|ct| HeaderValue::from_bytes(ct).ok())
    {
        headers.insert(header::CONTENT_TYPE, v);
    }
    if flags & 2 != 0 {
        headers.insert(HeaderName::from_static("soapaction"), HeaderValue::from_static("\"\""));
    }
    let text = |b: Option<&[u8]>| String::from_utf8_lossy(b.unwrap_or_default()).into_owned();
    (headers, body.unwrap_or_default().to_vec(), text(reason), text(error_id))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// `SoapVersion::detect`'s documented order: the media type, then the first envelope namespace
/// in the first `SNIFF_LEN` bytes, then `SOAPAction`; nothing after `SNIFF_LEN` matters.
pub fn check_soap_detect(headers: &HeaderMap, body: &[u8]) {
    let got = SoapVersion::detect(headers, body);
    let media = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or_default().trim().to_ascii_lowercase());
    let sniffed = body.get(..SNIFF_LEN).unwrap_or(body);
    let by_body = match (find(sniffed, SOAP11_ENVELOPE_NS.as_bytes()), find(sniffed, SOAP12_ENVELOPE_NS.as_bytes())) {
        (Some(a), Some(b)) => Some(if a < b { SoapVersion::V11 } else { SoapVersion::V12 }),
        (Some(_), None) => Some(SoapVersion::V11),
        (None, Some(_)) => Some(SoapVersion::V12),
        (None, None) => None,
    };
    let expected = match media.as_deref() {
        Some("application/soap+xml") => Some(SoapVersion::V12),
        Some("text/xml") => Some(SoapVersion::V11),
        _ => by_body.or(headers.contains_key("soapaction").then_some(SoapVersion::V11)),
    };
    assert_eq!(got, expected, "detect({headers:?}, {:?})", String::from_utf8_lossy(sniffed));
    assert_eq!(got, SoapVersion::detect(headers, sniffed), "bytes after SNIFF_LEN changed the answer");
}

/// Text as the fault carries it: control characters and U+FFFE/U+FFFF removed.
fn spec_fault_text(s: &str) -> String {
    s.chars().filter(|c| !c.is_control() && *c != '\u{fffe}' && *c != '\u{ffff}').collect()
}

fn spec_xml_escape(s: &str) -> String {
    spec_fault_text(s)
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&apos;")
}

fn is_xml_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{d7ff}' | '\u{e000}'..='\u{fffd}' | '\u{10000}'..)
}

/// Parses a whole document with namespace resolution (every prefix bound, end tags matching, one
/// root) and returns `(namespace, local name, text)` per element, entity references resolved.
fn parse_xml(xml: &str) -> Vec<(String, String, String)> {
    use quick_xml::events::Event;
    use quick_xml::name::ResolveResult;
    use quick_xml::reader::NsReader;

    let mut reader = NsReader::from_str(xml);
    let mut stack: Vec<(String, String, String)> = Vec::new();
    let mut done = Vec::new();
    let mut roots = 0;
    loop {
        let (ns, event) = reader.read_resolved_event().unwrap_or_else(|e| panic!("not well-formed ({e}): {xml}"));
        let ns = match ns {
            ResolveResult::Bound(n) => String::from_utf8_lossy(n.as_ref()).into_owned(),
            ResolveResult::Unbound => String::new(),
            ResolveResult::Unknown(p) => panic!("unbound prefix {p:?}: {xml}"),
        };
        match event {
            Event::Start(e) => {
                if stack.is_empty() {
                    roots += 1;
                }
                for attr in e.attributes() {
                    assert!(attr.is_ok(), "bad attribute {attr:?}: {xml}");
                }
                stack.push((ns, String::from_utf8_lossy(e.local_name().as_ref()).into_owned(), String::new()));
            }
            Event::End(_) => done.push(stack.pop().unwrap_or_else(|| panic!("unbalanced: {xml}"))),
            Event::Text(t) => {
                let text = t.decode().unwrap_or_else(|e| panic!("text ({e}): {xml}"));
                match stack.last_mut() {
                    Some(top) => top.2.push_str(&text),
                    None => assert!(text.trim().is_empty(), "text outside the root: {xml}"),
                }
            }
            Event::GeneralRef(r) => {
                let name = r.decode().unwrap_or_else(|e| panic!("reference ({e}): {xml}"));
                let c = match name.as_ref() {
                    "amp" => '&',
                    "lt" => '<',
                    "gt" => '>',
                    "quot" => '"',
                    "apos" => '\'',
                    other => panic!("unexpected entity {other}: {xml}"),
                };
                stack.last_mut().unwrap_or_else(|| panic!("reference outside the root: {xml}")).2.push(c);
            }
            Event::Decl(_) => {}
            Event::Eof => break,
            other => panic!("unexpected event {other:?}: {xml}"),
        }
    }
    assert!(stack.is_empty() && roots == 1, "not one closed root element: {xml}");
    done
}

/// [`check_soap_fault_of`] for both versions and both kinds.
pub fn check_soap_fault(reason: &str, error_id: &str) {
    for version in [SoapVersion::V11, SoapVersion::V12] {
        for kind in [FaultKind::Client, FaultKind::Server] {
            check_soap_fault_of(version, kind, reason, error_id);
        }
    }
}

/// `fault` for any reason and error id: only XML characters, a well-formed document with every
/// prefix bound, exactly the documented elements (nothing injected), the reason and error id as
/// their text, and the escaped reason in the body.
pub fn check_soap_fault_of(version: SoapVersion, kind: FaultKind, reason: &str, error_id: &str) {
    let (ct, body) = portcullis_gateway::soap::fault(version, kind, reason, error_id);
    assert_eq!(ct, version.content_type());
    assert!(body.chars().all(is_xml_char), "a character XML 1.0 does not allow: {body:?}");
    assert!(body.contains(&spec_xml_escape(reason)), "escaped reason missing: {body}");
    let doc = parse_xml(&body);
    let (ns, elements, code, reason_element) = match version {
        SoapVersion::V11 => (
            SOAP11_ENVELOPE_NS,
            &["Envelope", "Body", "Fault", "faultcode", "faultstring", "detail", "errorId"][..],
            ("faultcode", if kind == FaultKind::Client { "soap:Client" } else { "soap:Server" }),
            "faultstring",
        ),
        SoapVersion::V12 => (
            SOAP12_ENVELOPE_NS,
            &["Envelope", "Body", "Fault", "Code", "Value", "Reason", "Text", "Detail", "errorId"][..],
            ("Value", if kind == FaultKind::Client { "soap:Sender" } else { "soap:Receiver" }),
            "Text",
        ),
    };
    let mut locals: Vec<&str> = doc.iter().map(|(_, l, _)| l.as_str()).collect();
    let mut want = elements.to_vec();
    locals.sort_unstable();
    want.sort_unstable();
    assert_eq!(locals, want, "elements of {body}");
    let text = |local: &str| doc.iter().find(|(_, l, _)| l == local).map(|(n, _, t)| (n.as_str(), t.as_str()));
    assert_eq!(doc.last().map(|(n, l, _)| (n.as_str(), l.as_str())), Some((ns, "Envelope")));
    assert_eq!(text(code.0).map(|(_, t)| t), Some(code.1));
    assert_eq!(text(reason_element).map(|(_, t)| t), Some(spec_fault_text(reason).as_str()), "{body}");
    assert_eq!(text("errorId"), Some((DETAIL_NS, spec_fault_text(error_id).as_str())), "{body}");
}

// =============================================================================================
// Bearer tokens (jws.rs) and JWKs (signing.rs)
// =============================================================================================

/// One key per algorithm and an access token signed by each.
pub struct BearerFixture {
    pub keys: Vec<SigningKey>,
    pub tokens: Vec<String>,
}

impl BearerFixture {
    pub fn new() -> Self {
        let claims =
            br#"{"iss":"https://idp.test","sub":"user-1","aud":"https://api.test","exp":4102444800,"jti":"j1"}"#;
        let keys: Vec<SigningKey> =
            Algorithm::ALL.iter().map(|a| SigningKey::generate(*a).expect("key generation").0).collect();
        let tokens: Vec<String> = keys.iter().map(|k| jws::sign(k, ACCESS_TOKEN_TYP, claims).expect("sign")).collect();
        for (k, t) in keys.iter().zip(&tokens) {
            let vk = k.verifying_key();
            assert!(jws::verify(t, ACCESS_TOKEN_TYP, |kid| (kid == vk.kid()).then_some(vk)).is_ok());
        }
        BearerFixture { keys, tokens }
    }

    /// The public JWKs of the keys.
    pub fn jwks(&self) -> Vec<serde_json::Value> {
        self.keys.iter().map(|k| k.verifying_key().jwk()).collect()
    }
}

impl Default for BearerFixture {
    fn default() -> Self {
        Self::new()
    }
}

const B64_ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// Applies the edits spelled by `data` (4 bytes each: operation, position high and low, byte) to
/// `token`: replace with a base64url or any ASCII character, insert, delete, truncate, insert
/// `.`, flip a bit, insert a non-ASCII character, swap two characters. Invalid UTF-8 is replaced.
pub fn mutate_token(token: &str, data: &[u8]) -> String {
    let mut t = token.as_bytes().to_vec();
    for op in data.chunks(4) {
        let mut c = Cursor(op);
        let (kind, hi, lo, x) = (c.byte(), c.byte(), c.byte(), c.byte());
        let pos = usize::from(u16::from_be_bytes([hi, lo])) % (t.len() + 1);
        let b64 = B64_ALPHABET.get(usize::from(x) % 64).copied().unwrap_or(b'A');
        match kind % 8 {
            0 => {
                if let Some(b) = t.get_mut(pos) {
                    *b = b64;
                }
            }
            1 => {
                if let Some(b) = t.get_mut(pos) {
                    *b = x & 0x7f;
                }
            }
            2 => t.insert(pos, b64),
            3 => {
                if pos < t.len() {
                    t.remove(pos);
                }
            }
            4 => t.truncate(pos),
            5 => t.insert(pos, b'.'),
            6 => {
                if let Some(b) = t.get_mut(pos) {
                    *b ^= 1 << (x % 7);
                }
            }
            _ => {
                if x & 1 == 0 {
                    t.splice(pos..pos, "é".bytes());
                } else if !t.is_empty() {
                    let len = t.len();
                    t.swap(pos % len, usize::from(x) % len);
                }
            }
        }
    }
    String::from_utf8_lossy(&t).into_owned()
}

/// Fuzzer bytes: the first byte picks a mode and a key: a raw token (the rest as text), an
/// edited valid token ([`mutate_token`]), or an edited token padded to over `MAX_JWS_LEN`.
pub fn bearer_token_from_bytes(fx: &BearerFixture, data: &[u8]) -> String {
    let mut c = Cursor(data);
    let sel = c.byte();
    let original = fx.tokens.get(usize::from(sel >> 2) % fx.tokens.len().max(1)).cloned().unwrap_or_default();
    match sel % 4 {
        0 => String::from_utf8_lossy(c.0).into_owned(),
        3 => {
            let mut t = mutate_token(&original, c.0);
            let pad = (MAX_JWS_LEN + 1).saturating_sub(t.len()) + c.0.len() % 3;
            t.push_str(&"A".repeat(pad));
            t
        }
        _ => mutate_token(&original, c.0),
    }
}

/// `jws::parse` never panics, refuses anything over `MAX_JWS_LEN` as `TooLarge`, and accepts only
/// canonical base64url (re-encoding what it decoded gives the token back); `jws::verify` accepts
/// a token under one of the fixture's keys only if it is, byte for byte, the token that key
/// signed — whether the key is found by `kid` or handed over whatever the `kid`.
pub fn check_bearer(fx: &BearerFixture, token: &str) {
    let parsed = jws::parse(token);
    if token.len() > MAX_JWS_LEN {
        assert!(matches!(parsed, Err(JwsError::TooLarge)), "{} bytes not refused as too large", token.len());
    }
    if let Ok(p) = &parsed {
        let mut again = p.signing_input.to_owned();
        again.push('.');
        B64.encode_string(&p.signature, &mut again);
        assert_eq!(again, token, "parse accepted a non-canonical signature");
        let (h, payload) = p.signing_input.split_once('.').expect("signing input has a dot");
        assert_eq!(B64.encode(&p.payload), payload, "parse accepted a non-canonical payload");
        let header = B64.decode(h).expect("header decodes");
        assert_eq!(B64.encode(header), h, "parse accepted a non-canonical header");
    }
    for (key, original) in fx.keys.iter().zip(&fx.tokens) {
        let vk: &VerifyingKey = key.verifying_key();
        let by_kid = jws::verify(token, ACCESS_TOKEN_TYP, |kid| (kid == vk.kid()).then_some(vk));
        let any_kid = jws::verify(token, ACCESS_TOKEN_TYP, |_| Some(vk));
        if token.len() > MAX_JWS_LEN {
            assert!(matches!(by_kid, Err(JwsError::TooLarge)) && matches!(any_kid, Err(JwsError::TooLarge)));
        }
        if by_kid.is_ok() || any_kid.is_ok() {
            assert_eq!(token, original.as_str(), "a changed token verified under the {} key", vk.alg());
        }
    }
}

/// The members that only a private key has (RFC 7518 §6.2.2, §6.3.2, §6.4).
pub const PRIVATE_MEMBERS: [&str; 8] = ["d", "p", "q", "dp", "dq", "qi", "k", "oth"];

/// `VerifyingKey::from_jwk` never panics; never accepts a non-object or an object with a private
/// member; what it accepts has a non-empty `kid` of at most 256 bytes, the JWK's `alg`, `use`
/// absent or `sig`, a key type matching the algorithm, reads back from its own `jwk()`, and is
/// refused again once any private member is added.
pub fn check_jwk(v: &serde_json::Value) {
    let got = VerifyingKey::from_jwk(v);
    let Some(o) = v.as_object() else {
        assert!(got.is_none(), "a non-object JWK was accepted: {v}");
        return;
    };
    if PRIVATE_MEMBERS.iter().any(|m| o.contains_key(*m)) {
        assert!(got.is_none(), "a JWK with a private member was accepted: {v}");
    }
    let Some(k) = got else {
        return;
    };
    let s = |name: &str| o.get(name).and_then(serde_json::Value::as_str);
    assert_eq!(s("kid"), Some(k.kid()), "{v}");
    assert!(!k.kid().is_empty() && k.kid().len() <= 256, "{v}");
    assert_eq!(s("alg"), Some(k.alg().as_str()), "{v}");
    assert!(o.get("use").is_none_or(|u| u == "sig"), "{v}");
    let (kty, crv) = match k.alg() {
        Algorithm::ES256 => ("EC", Some("P-256")),
        Algorithm::RS256 | Algorithm::PS256 => ("RSA", None),
        Algorithm::EdDSA => ("OKP", Some("Ed25519")),
    };
    assert_eq!(s("kty"), Some(kty), "{v}");
    if crv.is_some() {
        assert_eq!(s("crv"), crv, "{v}");
    }
    assert_eq!(VerifyingKey::from_jwk(&k.jwk()).as_ref(), Some(&k), "jwk() does not read back: {v}");
    for m in PRIVATE_MEMBERS {
        let mut with_private = v.clone();
        with_private[m] = serde_json::Value::String("AQAB".into());
        assert!(VerifyingKey::from_jwk(&with_private).is_none(), "accepted with private member {m}: {with_private}");
    }
}

const JWK_MEMBERS: [&str; 22] = [
    "kty", "crv", "x", "y", "n", "e", "kid", "alg", "use", "key_ops", "x5c", "ext", "d", "p", "q", "dp", "dq", "qi",
    "k", "oth", "D", "Kid",
];

const JWK_STRINGS: [&str; 22] = [
    "EC", "RSA", "OKP", "oct", "P-256", "P-384", "Ed25519", "X25519", "ES256", "RS256", "PS256", "EdDSA", "none",
    "HS256", "sig", "enc", "", "AQAB", "AA", "es256", "ec", "Sig",
];

/// Edits a JWK object as `data` spells (3 bytes each: operation, member, value): set a member to
/// a string, to base64url of some length, to another JSON type, or remove it.
pub fn jwk_mutate(base: &serde_json::Value, data: &[u8]) -> serde_json::Value {
    use serde_json::Value;
    let mut v = base.clone();
    for op in data.chunks(3) {
        let mut c = Cursor(op);
        let (kind, member, x) = (c.byte(), c.byte(), c.byte());
        let name = JWK_MEMBERS.get(usize::from(member) % JWK_MEMBERS.len()).copied().unwrap_or("kid");
        let value = match kind % 6 {
            0 => Value::String(JWK_STRINGS.get(usize::from(x) % JWK_STRINGS.len()).copied().unwrap_or("").into()),
            1 => {
                let len = [0, 1, 31, 32, 33, 64, 255, 256, 257, 1024, 1025][usize::from(x) % 11];
                Value::String(B64.encode(vec![x | 1; len]))
            }
            2 => Value::String("k".repeat(usize::from(x) + 200)),
            3 => [
                Value::Null,
                Value::Bool(true),
                Value::from(i64::from(x)),
                Value::Array(Vec::new()),
                serde_json::json!({}),
            ][usize::from(x) % 5]
                .clone(),
            4 => {
                if let Some(o) = v.as_object_mut() {
                    o.remove(name);
                }
                continue;
            }
            _ => Value::String(String::from_utf8_lossy(&[x, x ^ 0x80, b'=']).into_owned()),
        };
        if let Some(o) = v.as_object_mut() {
            o.insert(name.to_owned(), value);
        }
    }
    v
}

/// Fuzzer bytes: an odd first byte edits one of the fixture's JWKs ([`jwk_mutate`]); an even one
/// parses the rest as JSON (`None` when it is not JSON).
pub fn jwk_from_bytes(jwks: &[serde_json::Value], data: &[u8]) -> Option<serde_json::Value> {
    let mut c = Cursor(data);
    let sel = c.byte();
    if sel & 1 == 1 {
        let base = jwks.get(usize::from(sel >> 1) % jwks.len().max(1))?;
        Some(jwk_mutate(base, c.0))
    } else {
        serde_json::from_slice(c.0).ok()
    }
}
