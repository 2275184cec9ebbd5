//! Randomized tests of the gateway's untrusted-input parsers, on stable Rust and in every
//! `cargo test`: the invariant checks of the cargo-fuzz targets (`fuzz/src/invariants.rs`,
//! `login.rs` and `certs.rs`, included below) driven by a seeded PRNG with structured inputs biased toward the dangerous
//! alphabet (`/ . % 2e 2f 5c ; \` NUL CR LF `_ -`, letter case, non-ASCII, very long strings) and
//! by edits of known-tricky cases.
//!
//! Deterministic by default. `PARSERS_FUZZ_SEED=<u64>` changes the seed and
//! `PARSERS_FUZZ_ITERATIONS=<n>` the number of cases per target, e.g. for a long local run:
//! `PARSERS_FUZZ_SEED=$RANDOM PARSERS_FUZZ_ITERATIONS=1000000 cargo test --release -p
//! portcullis-gateway --test parsers_fuzz`. A failure prints the seed and case number.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

#[path = "../../../fuzz/src/bytes.rs"]
mod bytes;
#[path = "../../../fuzz/src/certs.rs"]
mod certs;
#[path = "../../../fuzz/src/invariants.rs"]
mod invariants;
#[path = "../../../fuzz/src/login.rs"]
mod login;
#[path = "../../../fuzz/src/rng.rs"]
mod rng;
#[path = "../../../fuzz/src/tokens.rs"]
#[allow(dead_code)]
mod tokens;

use std::net::IpAddr;
use std::sync::OnceLock;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use http::Method;
use invariants::*;
use portcullis_core::crypto::jws::MAX_JWS_LEN;
use portcullis_gateway::soap::{FaultKind, SoapVersion};
use rng::*;

// ---- paths ----------------------------------------------------------------------------------

const PATH_PIECES: &[&str] = &[
    "/",
    "/",
    "/",
    "/",
    ".",
    "..",
    "...",
    "%",
    "%2e",
    "%2E",
    "%2f",
    "%2F",
    "%5c",
    "%5C",
    ";",
    "\\",
    "\0",
    "\r",
    "\n",
    "\t",
    " ",
    "_",
    "-",
    "~",
    "a",
    "Z",
    "payments",
    "Payments",
    "PAYMENTS",
    "admin",
    "Admin",
    "ADMIN",
    "api",
    "v1",
    "V1",
    ".well-known",
    "a.b",
    "c~d",
    "_e-f",
    "%C3%A9",
    "%c3%a9",
    "%c0%af",
    "%c0%ae",
    "%e0%80%af",
    "%ed%a0%80",
    "%00",
    "%0a",
    "%0D",
    "%7f",
    "%7F",
    "%80",
    "%ff",
    "%25",
    "%2525",
    "%20",
    "%3B",
    "%3b",
    "%3F",
    "%23",
    "%41",
    "%61",
    "%7e",
    "%5F",
    "%2d",
    "%2",
    "%g0",
    "%+1",
    "% 1",
    "%%",
    "%u002e",
    "?",
    "#",
    "[",
    "]",
    "|",
    "^",
    "{",
    "}",
    "<",
    ">",
    "`",
    "\"",
    "'",
    "@",
    ":",
    "!",
    "$",
    "&",
    "(",
    ")",
    "*",
    "+",
    ",",
    "=",
    ".%2e",
    "%2e.",
    "..;",
    ";x=1",
    "//",
    "/./",
    "/../",
    "%ef%bc%8f",
    "%e2%88%95",
];

const PATH_CORPUS: &[&str] = &[
    "/",
    "/payments",
    "/payments/",
    "/payments/x/y.json",
    "/payments/admin",
    "/payments/admin/",
    "/payments/admin/users",
    "/payments/administrator",
    "/paymentsX",
    "/Payments/admin",
    "/PAYMENTS/",
    "/admin",
    "/Admin",
    "/Admin/",
    "/ADMIN/x",
    "/admin/x",
    "/api/v1/x",
    "/api/V1/x",
    "/API/v1/",
    "/a.b/c~d/_e-f/g",
    "/.well-known/openid-configuration",
    "/payments/../admin",
    "/payments/./../admin",
    "/payments%2f..%2fadmin",
    "/payments%2F..%2Fadmin",
    "/payments%5c..%5cadmin",
    "/payments/%2e%2e/admin",
    "/payments/.%2e/admin",
    "/%61dmin",
    "/adm%69n",
    "//admin",
    "/x//admin",
    "/payments\\..\\admin",
    "/admin;jsessionid=x",
    "/payments;x/..",
    "/..;/admin",
    "/admin%00",
    "/admin\0",
    "/admin\t",
    "/admin%0a",
    "/admin%7F",
    "/x/%c0%af../admin",
    "/x%c0%ae%c0%ae/admin",
    "/admin%",
    "/admin%2",
    "/admin%zz",
    "/admin?x",
    "/admin#x",
    "admin",
    "",
    "*",
    "http://h/admin",
    "/a dmin",
    "/admin{}",
    "/<admin>",
    "/admin\"",
    "/admin`",
    "/admïn",
    "/admin/.",
    "/admin/..",
    "/.",
    "/a/.well-known/x",
    "/a/...",
    "/a/..b/.c",
    "/search/caf%C3%A9",
    "/files/100%25",
    "/a%20b",
    "/a%3Bb",
    "/a%3Fb",
    "/v1/things:batchGet",
    "/u/@me",
    "/x!$&'()*+,=",
    "/a[0]|b^c",
    "/~user/_x-y",
    "/%ef%bc%8fadmin",
    "/\u{212a}",
    "/adm%C4%B1n",
    "/%ed%a0%80",
    "/%f4%90%80%80",
    "/%c3",
    "/%c3%28",
    "/payments/%2e",
    "/payments/..%2f",
    "/admin.",
    "/admin..",
    "/ad%25min",
    "/%25%32%65",
];

fn gen_path(rng: &mut Rng) -> String {
    match rng.below(20) {
        0..=7 => {
            let mut s = if rng.percent(90) { String::from("/") } else { String::new() };
            s.push_str(&concat(rng, PATH_PIECES, 16));
            if rng.percent(10) {
                let u = *rng.pick(UNICODE);
                s.push_str(u);
            }
            s
        }
        8..=13 => {
            let base = *rng.pick(PATH_CORPUS);
            mutate(rng, base, PATH_PIECES, PATH_CORPUS)
        }
        14..=16 => {
            // A route prefix, an ordinary tail, and letter case changed somewhere.
            let prefix = *rng.pick(&["/payments", "/payments/", "/payments/admin", "/admin", "/Admin/", "/api/v1/"]);
            let tail = concat(rng, &["x", "/", "y.json", "admin", "Admin", "-", "_", "~", "%20", "."], 4);
            let s = format!("{prefix}{tail}");
            if rng.percent(50) { mutate(rng, &s, &["A", "a", "P", "V"], &[]) } else { s }
        }
        17 => long(rng, PATH_PIECES),
        _ => {
            let n = rng.below(40);
            let b: Vec<u8> = (0..n).map(|_| if rng.percent(90) { rng.byte() & 0x7f } else { rng.byte() }).collect();
            String::from_utf8_lossy(&b).into_owned()
        }
    }
}

fn routes() -> &'static [portcullis_gateway::config::ValidatedConfig] {
    static ROUTES: OnceLock<Vec<portcullis_gateway::config::ValidatedConfig>> = OnceLock::new();
    ROUTES.get_or_init(route_fixtures)
}

#[test]
fn paths_and_routes_randomized() {
    let methods = methods();
    run("gateway_path", 40_000, |rng| {
        let path = gen_path(rng);
        check_path_and_routes(routes(), rng.pick(&methods), &path);
    });
}

#[test]
fn path_corpus_under_every_method() {
    for p in PATH_CORPUS {
        for m in methods() {
            check_path_and_routes(routes(), &m, p);
        }
    }
}

#[test]
fn case_variants_of_route_prefixes_never_match_the_other_case() {
    // Spelled-out instances of the case rule checked on every random path.
    let cfg = &routes()[1]; // no `/` catch-all
    for (path, want) in [("/ADMIN", None), ("/admin/", Some("/admin")), ("/admin/x", Some("/admin"))] {
        let got = cfg.route(&Method::GET, path).ok().map(|r| r.path.as_str());
        assert_eq!(got, want, "{path}");
    }
    for path in ["/admin/", "/ADMIN/", "/aDmIn/x", "/Api/v1/x", "/API/V1/x", "/PAYMENTS", "/Payments/"] {
        check_path_and_routes(routes(), &Method::GET, path);
        if let Ok(r) = cfg.route(&Method::GET, path) {
            assert!(path.starts_with(&r.path), "{path} routed to {}", r.path);
        }
    }
}

// ---- headers --------------------------------------------------------------------------------

const HEADER_NAMES: &[&str] = &[
    "x-portcullis-subject",
    "X-Portcullis-Subject",
    "X_Portcullis_Subject",
    "x.portcullis.roles",
    "X-PORTCULLIS-ORG",
    "x_portcullis.client_id",
    "x-portcullis-anything-new",
    "x-portcullis",
    "X_PORTCULLIS",
    "x-portcullis-",
    "x-portcullisx",
    "xportcullis-subject",
    "x--portcullis-subject",
    "x-forwarded-client-cert",
    "X_Forwarded_Client_Cert",
    "x.forwarded.client.cert",
    "client-cert",
    "Client_Cert",
    "client-cert-chain",
    "client.cert.chain",
    "client-certs",
    "x-forwarded-for",
    "X_Forwarded_For",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x.forwarded.host",
    "x-forwarded-uri",
    "x-forwarded-",
    "forwarded",
    "Forwarded",
    "x-real-ip",
    "x_real_ip",
    "content-length",
    "Content-Length",
    "content_length",
    "transfer-encoding",
    "Transfer-Encoding",
    "transfer_encoding",
    "te",
    "TE",
    "connection",
    "Connection",
    "keep-alive",
    "proxy-connection",
    "upgrade",
    "Upgrade",
    "trailer",
    "proxy-authenticate",
    "proxy-authorization",
    "host",
    "authorization",
    "api-key",
    "cookie",
    "accept",
    "content-type",
    "soapaction",
    "x-custom",
    "x_custom",
    "-",
    "_",
    ".",
    "x-portcullis-subject\0",
    "bad name",
    "x-portcullis-é",
    "",
];

const CONTENT_LENGTHS: &[&str] = &[
    "0",
    "5",
    "42",
    " 42\t",
    "007",
    "+5",
    "-1",
    "0x10",
    "1 0",
    "",
    " ",
    "5.0",
    "18446744073709551615",
    "18446744073709551616",
    "99999999999999999999999",
    "5, 5",
    "5,6",
    ",5",
    "5,",
    "\u{663}",
    "\t\t7 ",
    "5\r\n",
    "1e3",
];

const TRANSFER_ENCODINGS: &[&str] = &[
    "chunked",
    "Chunked",
    "CHUNKED",
    " chunked ",
    "chunked\t",
    "chunked, identity",
    "identity",
    "gzip, chunked",
    "chunked, chunked",
    "chunked;q=1",
    "xchunked",
    "chunked_",
    "",
    "chunk\u{435}d",
    "\u{b}chunked",
    "chunked\0",
];

const CONNECTION_TOKENS: &[&str] = &[
    "close",
    "keep-alive",
    "upgrade",
    "Upgrade",
    "te",
    "TE",
    "x-custom",
    "X_Custom",
    "x-portcullis-subject",
    "X_Portcullis_Subject",
    "x-forwarded-for",
    "X.Forwarded.For",
    "x-forwarded-client-cert",
    "forwarded",
    "x-real-ip",
    "content-length",
    "Content-Length",
    "host",
    "authorization",
    "cookie",
    "accept",
    "transfer-encoding",
    "two words",
    "é",
    "",
    " ",
];

const UPGRADES: &[&str] = &[
    "websocket",
    "WebSocket",
    "websocket/13",
    " websocket ",
    "h2c",
    "websocket, h2c",
    "websocketx",
    "web socket",
    "é",
];

const XFF_ELEMENTS: &[&str] = &[
    "1.2.3.4",
    "10.0.0.5",
    "10.1.1.1",
    "192.0.2.9",
    "203.0.113.9",
    "[2001:db8::1]:443",
    "[2001:db8::1]",
    "[2001:db8::1]:99999",
    "198.51.100.7:5000",
    "::ffff:10.1.1.1",
    "::ffff:8.8.8.8",
    "2001:db8::ffff",
    "2001:db9::1",
    "unknown",
    "_hidden",
    "",
    "not-an-ip",
    "1.2.3.4 5.6.7.8",
    "fe80::1%eth0",
    "01.2.3.4",
    " 10.9.9.9 ",
    "127.0.0.1",
    "abc",
    "1.2.3.4:",
];

const HOSTS: &[&str] = &[
    "api.example",
    "own.example:8443",
    "a b",
    "evil/..",
    "[::1]:443",
    "",
    " own.example ",
    "EXAMPLE.com",
    "x_y.example",
    "é.example",
    "host\r\nx-portcullis-subject: admin",
];

const IDENTITY_TEXTS: &[&str] = &[
    "user-123",
    "acme$shop",
    "acme",
    "bearer",
    "api_key",
    "mtls",
    "session",
    "payments:reader",
    "payments/read",
    "openid",
    "",
    " padded",
    "padded ",
    "\tpadded",
    "a\tb",
    "x\r\nx-portcullis-roles: admin",
    "ümlaut",
    "élan",
    "a,b",
    "a,admin:all",
    "sp ace",
    "\0",
    "\u{85}",
    "\u{7f}",
    "a b",
    "CN=shop,O=acme",
    "CN=Evil\",URI=spiffe://admin;O=x\\",
    "spiffe://acme/a;b=c,d",
    "urn:\u{7f}é",
    "u\\",
    "a\"b",
    "ab\r\n",
    "468ed33be74e",
    "=",
    ";",
    "\"\"",
];

const VALUE_PIECES: &[&str] = &[
    "a",
    "Z",
    "0",
    " ",
    "\t",
    ",",
    ";",
    "=",
    "\"",
    "\\",
    "/",
    ".",
    "%",
    "%2e",
    "_",
    "-",
    ":",
    "\r",
    "\n",
    "\0",
    "\u{7f}",
    "é",
    "\u{80}",
    "x-portcullis-subject",
    "chunked",
    "upgrade",
    "websocket",
    "trailers",
    "1.2.3.4",
];

fn gen_text(rng: &mut Rng) -> String {
    if rng.percent(1) {
        return long(rng, VALUE_PIECES);
    }
    match rng.below(10) {
        0..=5 => rng.pick(IDENTITY_TEXTS).to_string(),
        6 | 7 => concat(rng, VALUE_PIECES, 8),
        8 => {
            let base = *rng.pick(IDENTITY_TEXTS);
            mutate(rng, base, VALUE_PIECES, IDENTITY_TEXTS)
        }
        _ => rng.pick(UNICODE).to_string(),
    }
}

fn gen_name(rng: &mut Rng) -> Vec<u8> {
    match rng.below(10) {
        0..=6 => rng.pick(HEADER_NAMES).as_bytes().to_vec(),
        7 | 8 => {
            let base = *rng.pick(HEADER_NAMES);
            mutate(rng, base, &["_", ".", "-", "X", "x", "portcullis", "cert", "\0"], HEADER_NAMES).into_bytes()
        }
        _ => (0..1 + rng.below(12)).map(|_| *rng.pick(b"xX-_.pPcC!#$%&'*+^`|~0a\0 :")).collect(),
    }
}

fn gen_value(rng: &mut Rng, name: &[u8]) -> Vec<u8> {
    let lower = String::from_utf8_lossy(name).to_ascii_lowercase().replace(['_', '.'], "-");
    let pool: Option<&[&str]> = match lower.as_str() {
        "content-length" => Some(CONTENT_LENGTHS),
        "transfer-encoding" => Some(TRANSFER_ENCODINGS),
        "upgrade" => Some(UPGRADES),
        "te" => Some(&["trailers", "Trailers", " trailers ", "trailers, deflate", "gzip", "", "trailers\u{80}"]),
        "x-forwarded-proto" => Some(&["http", "https", "HTTPS", " https ", "javascript", "https, http", ""]),
        "x-forwarded-host" | "host" => Some(HOSTS),
        _ => None,
    };
    if let Some(pool) = pool.filter(|_| rng.percent(85)) {
        return rng.pick(pool).as_bytes().to_vec();
    }
    if lower == "connection" && rng.percent(85) {
        let n = 1 + rng.below(4);
        let sep = *rng.pick(&[",", ", ", " ,", "\t,", ",,"]);
        return (0..n).map(|_| *rng.pick(CONNECTION_TOKENS)).collect::<Vec<_>>().join(sep).into_bytes();
    }
    if lower == "x-forwarded-for" && rng.percent(85) {
        let n = if rng.percent(5) { 60 + rng.below(10) } else { 1 + rng.below(5) };
        let sep = *rng.pick(&[",", ", "]);
        return (0..n).map(|_| *rng.pick(XFF_ELEMENTS)).collect::<Vec<_>>().join(sep).into_bytes();
    }
    match rng.below(100) {
        0..=59 => gen_text(rng).into_bytes(),
        60..=88 => concat(rng, VALUE_PIECES, 10).into_bytes(),
        89 => long(rng, VALUE_PIECES).into_bytes(),
        // obs-text and raw bytes: not UTF-8, not `to_str`-able.
        _ => rng.some_bytes(12),
    }
}

fn gen_peer(rng: &mut Rng) -> IpAddr {
    match rng.below(4) {
        0 => IpAddr::from([10, rng.byte(), rng.byte(), rng.byte()]),
        1 => IpAddr::from([rng.byte(), rng.byte(), rng.byte(), rng.byte()]),
        _ => rng.pick(&PEERS).parse().unwrap(),
    }
}

fn gen_header_case(rng: &mut Rng) -> HeaderCase {
    let n = rng.below(10);
    let headers = (0..n)
        .map(|_| {
            let name = gen_name(rng);
            let value = gen_value(rng, &name);
            (name, value)
        })
        .collect();
    let list = |rng: &mut Rng| (0..rng.below(5)).map(|_| gen_text(rng)).collect::<Vec<_>>();
    let identity = Identity {
        subject: gen_text(rng),
        client_id: rng.percent(70).then(|| gen_text(rng)),
        org: rng.percent(70).then(|| gen_text(rng)),
        roles: list(rng),
        scopes: list(rng),
        auth_method: gen_text(rng),
        cert: rng.percent(50).then(|| (gen_text(rng), gen_text(rng), rng.percent(60).then(|| gen_text(rng)))),
    };
    HeaderCase {
        headers,
        peer: gen_peer(rng),
        https: rng.percent(50),
        own_host: rng.percent(80).then(|| rng.pick(HOSTS).to_string()),
        identity,
    }
}

#[test]
fn header_pipeline_randomized() {
    run("gateway_headers", 20_000, |rng| check_headers(&gen_header_case(rng)));
}

#[test]
fn header_known_cases() {
    let case = |pairs: &[(&str, &str)]| HeaderCase {
        headers: pairs.iter().map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec())).collect(),
        peer: "10.0.0.2".parse().unwrap(),
        https: true,
        own_host: Some("api.example".into()),
        identity: Identity {
            subject: "user-123".into(),
            auth_method: "bearer".into(),
            roles: vec!["payments:reader".into(), "a,admin:all".into()],
            cert: Some(("ab01".into(), "CN=Evil\",URI=spiffe://admin;O=x\\".into(), Some("urn:a;b".into()))),
            ..Identity::default()
        },
    };
    for pairs in [
        &[("Connection", "x-portcullis-subject, X_Forwarded_For, content-length, host, x-custom"), ("x-custom", "1")][..],
        &[("connection", "upgrade"), ("upgrade", "websocket"), ("upgrade", "h2c")],
        &[("connection", "te, upgrade"), ("te", "trailers"), ("upgrade", "WebSocket/13")],
        &[("content-length", "5"), ("transfer-encoding", "chunked")],
        &[("content-length", "5"), ("content-length", "5")],
        &[("transfer-encoding", "chunked"), ("transfer-encoding", "chunked")],
        &[("x-forwarded-for", "1.2.3.4, 10.0.0.9"), ("x_forwarded_for", "6.6.6.6"), ("x-real-ip", "6.6.6.6")],
        &[("x-forwarded-for", "1.2.3.4, unknown"), ("X-Forwarded-Proto", "http"), ("x-forwarded-host", "evil/..")],
        &[("X_Portcullis_Subject", "admin"), ("x.portcullis.roles", "admin:all"), ("client_cert", ":x:")],
    ] {
        check_headers(&case(pairs));
    }
}

// ---- SOAP -----------------------------------------------------------------------------------

const CONTENT_TYPES: &[&str] = &[
    "text/xml",
    "TEXT/XML; charset=utf-8",
    "application/soap+xml",
    "application/soap+xml;action=\"urn:x\"",
    " Application/SOAP+XML ",
    "application/xml",
    "text/xml2",
    "application/soap+xml2",
    "text/xmlx; a",
    "text/ xml",
    "text/xml\t; q=1",
    "",
    ";text/xml",
    "multipart/related; type=\"application/xop+xml\"",
];

const XML_PIECES: &[&str] = &[
    "<",
    ">",
    "&",
    "\"",
    "'",
    "]]>",
    "<!--",
    "-->",
    "<![CDATA[",
    "&amp;",
    "&#0;",
    "&#x1;",
    "\0",
    "\u{7}",
    "\r\n",
    "\t",
    "\u{85}",
    "\u{9f}",
    "\u{fffe}",
    "\u{ffff}",
    "\u{fdd0}",
    "\u{d7ff}",
    "\u{e000}",
    "\u{10ffff}",
    "é",
    "✓",
    "😀",
    "</faultstring>",
    "</pc:errorId>",
    "<soap:Body>",
    "soap:",
    "xmlns:soap=\"x\"",
    "<?xml version=\"1.0\"?>",
    "a",
    " ",
    "text",
];

fn gen_soap_body(rng: &mut Rng) -> Vec<u8> {
    let ns = [
        portcullis_gateway::soap::SOAP11_ENVELOPE_NS,
        portcullis_gateway::soap::SOAP12_ENVELOPE_NS,
        "http://schemas.xmlsoap.org/soap/envelope",
        "http://www.w3.org/2003/05/soap-envelop",
    ];
    let mut body = Vec::new();
    for _ in 0..rng.below(4) {
        match rng.below(4) {
            // Namespaces placed around the sniffing limit.
            0 => {
                let n = rng.pick(&ns);
                let start = (portcullis_gateway::soap::SNIFF_LEN + rng.below(6)).saturating_sub(n.len() + rng.below(3));
                body.resize(body.len().max(start), b' ');
                body.extend_from_slice(n.as_bytes());
            }
            1 => body.extend_from_slice(format!("<e:Envelope xmlns:e=\"{}\">", rng.pick(&ns)).as_bytes()),
            2 => body.extend(rng.some_bytes(64)),
            _ => body.extend_from_slice(concat(rng, XML_PIECES, 6).as_bytes()),
        }
    }
    body
}

fn gen_xml_text(rng: &mut Rng) -> String {
    match rng.below(50) {
        0..=34 => concat(rng, XML_PIECES, 10),
        35 => long(rng, XML_PIECES),
        36..=44 => gen_text(rng),
        _ => String::from_utf8_lossy(&rng.some_bytes(40)).into_owned(),
    }
}

#[test]
fn soap_detection_and_faults_randomized() {
    run("soap_detect", 20_000, |rng| {
        let mut headers = http::HeaderMap::new();
        for _ in 0..rng.below(3) {
            let v = if rng.percent(90) { rng.pick(CONTENT_TYPES).as_bytes().to_vec() } else { rng.bytes(6) };
            if let Ok(v) = http::HeaderValue::from_bytes(&v) {
                headers.append(http::header::CONTENT_TYPE, v);
            }
        }
        if rng.percent(40) {
            headers.insert(http::HeaderName::from_static("soapaction"), http::HeaderValue::from_static("\"urn:x\""));
        }
        check_soap_detect(&headers, &gen_soap_body(rng));
        // One version and kind per case (all four in `fuzz_decoders_on_random_bytes`): parsing
        // the fault with an unoptimised quick-xml is what costs here.
        let version = *rng.pick(&[SoapVersion::V11, SoapVersion::V12]);
        let kind = *rng.pick(&[FaultKind::Client, FaultKind::Server]);
        check_soap_fault_of(version, kind, &gen_xml_text(rng), &gen_xml_text(rng));
    });
}

// ---- bearer tokens --------------------------------------------------------------------------

const B64_ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

fn bearer() -> &'static BearerFixture {
    static FX: OnceLock<BearerFixture> = OnceLock::new();
    FX.get_or_init(BearerFixture::new)
}

/// Targeted changes of a valid token: re-encoded or edited headers (typ case, alg none/HS256,
/// another key's kid, embedded keys, duplicate members, whitespace), another token's signature
/// or payload, padding, non-canonical trailing bits, extra or missing segments, sizes around
/// `MAX_JWS_LEN`.
fn targeted_token(rng: &mut Rng, fx: &BearerFixture, i: usize) -> String {
    let t = &fx.tokens[i];
    let parts: Vec<&str> = t.split('.').collect();
    let other = &fx.tokens[rng.below(fx.tokens.len())];
    let oparts: Vec<&str> = other.split('.').collect();
    let header: serde_json::Value = serde_json::from_slice(&B64.decode(parts[0]).unwrap()).unwrap();
    let kid = header["kid"].as_str().unwrap().to_owned();
    let other_kid = fx.keys[rng.below(fx.keys.len())].kid().to_owned();
    let alg = header["alg"].as_str().unwrap().to_owned();
    let h = |json: String| B64.encode(json);
    let with_header = |hdr: String| format!("{hdr}.{}.{}", parts[1], parts[2]);
    match rng.below(16) {
        0 => with_header(h(format!(
            r#"{{"alg":"{alg}","kid":"{kid}","typ":"{}"}}"#,
            rng.pick(&["AT+JWT", "application/at+jwt", "jwt", "at+jwt "])
        ))),
        1 => with_header(h(format!(
            r#"{{"alg":"{}","kid":"{kid}","typ":"at+jwt"}}"#,
            rng.pick(&["none", "HS256", "ES256", "RS256", "PS256", "EdDSA", "es256"])
        ))),
        2 => with_header(h(format!(r#"{{"alg":"{alg}","kid":"{other_kid}","typ":"at+jwt"}}"#))),
        3 => with_header(h(format!(
            r#"{{"alg":"{alg}","kid":"{kid}","typ":"at+jwt",{}}}"#,
            rng.pick(&[
                r#""jku":"http://x""#,
                r#""jwk":{}"#,
                r#""x5c":[]"#,
                r#""crit":["b64"]"#,
                r#""b64":false"#,
                r#""x5u":"x""#,
                r#""zip":"DEF""#
            ])
        ))),
        4 => with_header(h(format!(r#"{{"alg":"{alg}","alg":"{alg}","kid":"{kid}","typ":"at+jwt"}}"#))),
        5 => with_header(h(format!(r#"{{ "alg": "{alg}", "kid": "{kid}", "typ": "at+jwt" }}"#))),
        6 => with_header(h(format!(r#"{{"typ":"at+jwt","kid":"{kid}","alg":"{alg}"}}"#))),
        7 => format!("{}.{}.{}", parts[0], parts[1], oparts[2]),
        8 => format!("{}.{}.{}", parts[0], oparts[1], parts[2]),
        9 => {
            let payload: serde_json::Value = serde_json::from_slice(&B64.decode(parts[1]).unwrap()).unwrap();
            let pretty = serde_json::to_string_pretty(&payload).unwrap();
            format!("{}.{}.{}", parts[0], B64.encode(pretty), parts[2])
        }
        10 => {
            let seg = rng.below(3);
            let mut p: Vec<String> = parts.iter().map(|s| (*s).to_owned()).collect();
            let extra = *rng.pick(&["=", "==", " ", "\n", "%3D"]);
            p[seg].push_str(extra);
            p.join(".")
        }
        11 => {
            // Change the last character of a segment so only its unused low bits differ.
            let seg = rng.below(3);
            let mut p: Vec<Vec<u8>> = parts.iter().map(|s| s.as_bytes().to_vec()).collect();
            let last = p[seg].last_mut().unwrap();
            let idx = B64_ALPHABET.iter().position(|c| c == last).unwrap();
            *last = B64_ALPHABET[(idx ^ (1 + rng.below(3))) % 64];
            p.iter().map(|s| String::from_utf8(s.clone()).unwrap()).collect::<Vec<_>>().join(".")
        }
        12 => rng
            .pick(&[
                format!("{t}."),
                format!(".{t}"),
                format!("{t}.{}", parts[2]),
                format!("{}.{}", parts[0], parts[1]),
                format!("{}..{}", parts[0], parts[2]),
            ])
            .clone(),
        13 => {
            let mut s = t.clone();
            s.push_str(&"A".repeat((MAX_JWS_LEN - t.len()) + rng.below(3)));
            s
        }
        14 => rng
            .pick(&[
                t.to_ascii_uppercase(),
                t.to_ascii_lowercase(),
                format!(" {t}"),
                format!("Bearer {t}"),
                t.replace('-', "+").replace('_', "/"),
            ])
            .clone(),
        _ => mutate(
            rng,
            t,
            &[".", "=", "A", "-", "_", "+", "/", "é", "\0"],
            &fx.tokens.iter().map(String::as_str).collect::<Vec<_>>(),
        ),
    }
}

#[test]
fn bearer_tokens_randomized() {
    let fx = bearer();
    for t in &fx.tokens {
        check_bearer(fx, t);
    }
    run("bearer_parse", 20_000, |rng| {
        let i = rng.below(fx.tokens.len());
        let token = match rng.below(10) {
            0..=4 => {
                let n = 4 * (1 + rng.below(4));
                mutate_token(&fx.tokens[i], &rng.bytes(n))
            }
            5..=8 => targeted_token(rng, fx, i),
            _ => concat(rng, &["eyJ", ".", "A", "_", "-", "=", "e30", "eyJhbGciOiJub25lIn0", "é", "\0"], 30),
        };
        check_bearer(fx, &token);
    });
}

// ---- JWKs -----------------------------------------------------------------------------------

const JSON_KEYS: &[&str] =
    &["kty", "crv", "x", "y", "n", "e", "kid", "alg", "use", "d", "p", "q", "dp", "dq", "qi", "k", "oth", "key_ops"];

fn gen_json(rng: &mut Rng, depth: usize) -> serde_json::Value {
    use serde_json::Value;
    match rng.below(if depth == 0 { 4 } else { 7 }) {
        0 => Value::Null,
        1 => Value::from(rng.next() as i64),
        2 => Value::Bool(rng.percent(50)),
        3 => Value::String(if rng.percent(50) { gen_text(rng) } else { B64.encode(rng.some_bytes(70)) }),
        4 => Value::Array((0..rng.below(3)).map(|_| gen_json(rng, depth - 1)).collect()),
        _ => Value::Object(
            (0..rng.below(8)).map(|_| (rng.pick(JSON_KEYS).to_string(), gen_json(rng, depth - 1))).collect(),
        ),
    }
}

#[test]
fn jwks_randomized() {
    let jwks = bearer().jwks();
    for j in &jwks {
        check_jwk(j);
    }
    run("jwk", 20_000, |rng| {
        let v = match rng.below(10) {
            0..=5 => {
                let n = 3 * (1 + rng.below(4));
                jwk_mutate(rng.pick(&jwks), &rng.bytes(n))
            }
            6 => {
                // A valid JWK with a private member whose value is anything at all.
                let mut v = rng.pick(&jwks).clone();
                v[*rng.pick(&PRIVATE_MEMBERS)] = gen_json(rng, 1);
                v
            }
            7 => {
                // Text-level edits of a JWK's JSON, then parsed (duplicate members included).
                let text = rng.pick(&jwks).to_string();
                let edited = mutate(
                    rng,
                    &text,
                    &[r#","d":"AQAB""#, r#","kid":"""#, r#","use":"enc""#, "\"", ",", "{", "}"],
                    &[],
                );
                match serde_json::from_str(&edited) {
                    Ok(v) => v,
                    Err(_) => return,
                }
            }
            _ => gen_json(rng, 3),
        };
        check_jwk(&v);
    });
}

// ---- the fuzz targets' own decoders on random bytes -----------------------------------------

#[test]
fn fuzz_decoders_on_random_bytes() {
    let fx = bearer();
    let jwks = fx.jwks();
    let methods = methods();
    run("raw_bytes", 3_000, |rng| {
        let n = rng.below(200);
        let mut data = rng.bytes(n);
        // Make lines and `name:value` shapes likely.
        for b in &mut data {
            if rng.percent(8) {
                *b = *rng.pick(b"\n:=/.%");
            }
        }
        let (method, path) = path_case_from_bytes(&data);
        assert!(methods.contains(&method));
        check_path_and_routes(routes(), &method, &path);
        check_headers(&HeaderCase::from_bytes(&data));
        let (headers, body, reason, error_id) = soap_case_from_bytes(&data);
        check_soap_detect(&headers, &body);
        check_soap_fault(&reason, &error_id);
        check_bearer(fx, &bearer_token_from_bytes(fx, &data));
        if let Some(v) = jwk_from_bytes(&jwks, &data) {
            check_jwk(&v);
        }
        let (query, return_to, cookies, state, _) = login::login_case_from_bytes(&data);
        login::check_callback(query.as_deref());
        login::check_safe_return(&return_to);
        login::check_flow_of(&cookies, &state);
        certs::check_client_certificate(&certs::der_from_bytes(certificates(), &data));
    });
}

// ---- ECDSA malleability ----------------------------------------------------------------------

// An ES256 token whose signature's `s` is replaced by `n - s` (n: the P-256 group order) is a
// different token, byte for byte, that still verifies under the original key: ECDSA signatures
// are malleable, and JOSE (RFC 7518 §3.4) does not ask verifiers to refuse the high-S form —
// refusing it would also refuse every third-party `private_key_jwt` assertion that happens to be
// high-S (about half of them). No random edit can find this twin, so it is spelled out here, and
// what the test pins down is why it is harmless: the twin carries the very same claims, so
// everything keyed on them (revocation and replay by `jti`, the policy, identity headers) treats
// both spellings alike; only caches keyed on the token's bytes hold two entries.
#[test]
fn an_es256_high_s_twin_verifies_with_the_same_claims() {
    use portcullis_core::crypto::jws;
    use portcullis_core::crypto::signing::Algorithm;

    const P256_ORDER: [u8; 32] = [
        0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xbc, 0xe6,
        0xfa, 0xad, 0xa7, 0x17, 0x9e, 0x84, 0xf3, 0xb9, 0xca, 0xc2, 0xfc, 0x63, 0x25, 0x51,
    ];
    let fx = bearer();
    let i = fx.keys.iter().position(|k| k.alg() == Algorithm::ES256).unwrap();
    let (token, vk) = (&fx.tokens[i], fx.keys[i].verifying_key());
    let (signing_input, sig) = token.rsplit_once('.').unwrap();
    let sig = B64.decode(sig).unwrap();
    // n - s, big-endian.
    let mut negated = [0u8; 32];
    let mut borrow = 0;
    for j in (0..32).rev() {
        let d = i16::from(P256_ORDER[j]) - i16::from(sig[32 + j]) - borrow;
        borrow = i16::from(d < 0);
        negated[j] = (d + 256 * borrow) as u8;
    }
    let forged = format!("{signing_input}.{}", B64.encode([&sig[..32], &negated[..]].concat()));
    assert_ne!(&forged, token);
    let (_, original) = jws::verify(token, "at+jwt", |_| Some(vk)).unwrap();
    let (_, twin) = jws::verify(&forged, "at+jwt", |_| Some(vk)).expect("ECDSA's high-S twin verifies");
    assert_eq!(original, twin, "the twin must carry exactly the original claims (same jti)");
    // Any other change to the signature is refused.
    let mut other = sig.clone();
    other[40] ^= 1;
    let broken = format!("{signing_input}.{}", B64.encode(&other));
    assert!(jws::verify(&broken, "at+jwt", |_| Some(vk)).is_err());
}

// ---- the browser sign-in (login.rs) ---------------------------------------------------------

#[test]
fn sign_in_callback_and_flow_cookies_randomized() {
    use login::*;
    for q in ["code=a&state=b", "code=a&state=b&iss=https%3A%2F%2Fidp.test", "error=access_denied&state=s", "%+1=x"] {
        check_callback(Some(q));
    }
    check_callback(None);
    run("gateway_login", 6_000, |rng| {
        let query = concat(rng, &QUERY_PIECES, 10);
        check_callback(Some(&query));
        let return_to = match rng.below(3) {
            0 => concat(rng, &RETURN_PIECES, 6),
            1 => mutate(rng, "/app/page?x=1", &RETURN_PIECES, &[]),
            _ => format!("/{}", long(rng, &RETURN_PIECES)),
        };
        check_safe_return(&return_to);
        let cookies =
            concat(rng, &["a=b", "; ", ";", "=", "__Host-portcullis_login_", "AAAAAAAAAAAAAAAA", ".", "\"\""], 6);
        if rng.percent(20) {
            check_flow_round_trip(&return_to, &cookies, rng.byte());
        }
        let mut h = http::HeaderMap::new();
        if let Ok(v) = http::HeaderValue::from_str(&cookies) {
            h.append(http::header::COOKIE, v);
        }
        let state = concat(rng, &["A", "AAAAAAAAAAAAAAAA", "b", ".", "é"], 4);
        check_flow_of(&h, &state);
    });
}

// ---- client certificates (certs.rs) ---------------------------------------------------------

fn certificates() -> &'static [Vec<u8>] {
    static CERTS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    CERTS.get_or_init(certs::certificate_fixtures)
}

#[test]
fn client_certificates_randomized() {
    let fixtures = certificates();
    for der in fixtures {
        certs::check_client_certificate(der);
    }
    run("client_cert", 3_000, |rng| {
        let base = rng.pick(fixtures);
        let n = 4 * (1 + rng.below(4));
        let edits = rng.bytes(n);
        certs::check_client_certificate(&certs::mutate_der(base, &edits));
    });
}
