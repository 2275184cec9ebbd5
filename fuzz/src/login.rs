//! Invariants of the gateway's browser sign-in parsers (`login.rs`): the callback's query
//! (`callback_params`), the flow cookie (`start` then `flow_of`), the return URL
//! (`safe_return`) and the `Cookie` header reader (`cookies`). Shared by the cargo-fuzz target
//! `gateway_login` and `crates/portcullis-gateway/tests/parsers_fuzz.rs`.

use http::header::{self, HeaderMap, HeaderValue};
use portcullis_gateway::login::{
    CallbackParams, FLOW_COOKIE_PREFIX, callback_params, cookies, flow_of, safe_return, start,
};
use portcullis_gateway::server::OWN_PREFIX;

use crate::bytes::Bytes;

/// A query component decoded strictly: `+` is a space, `%` must be followed by two hex digits,
/// and the result must be UTF-8.
fn spec_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        match c {
            b'%' => {
                let (h, l) = (*b.get(i + 1)?, *b.get(i + 2)?);
                let v = char::from(h).to_digit(16)? * 16 + char::from(l).to_digit(16)?;
                out.push(u8::try_from(v).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// `callback_params` against the documented rules: at most 4096 bytes; `&`-separated pairs
/// (empty ones skipped), each name at most once, strictly decoded; `error` wins (with its
/// description and state); otherwise a non-empty `code` and `state` (and `iss` if given).
pub fn check_callback(query: Option<&str>) {
    let got = callback_params(query);
    let q = query.unwrap_or("");
    let expected = (|| {
        if q.len() > 4096 {
            return None;
        }
        let mut seen: Vec<(String, String)> = Vec::new();
        for pair in q.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let (k, v) = (spec_decode(k)?, spec_decode(v)?);
            if seen.iter().any(|(s, _)| *s == k) {
                return None;
            }
            seen.push((k, v));
        }
        let take = |name: &str| seen.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        if let Some(error) = take("error") {
            return Some(CallbackParams::Refused {
                error,
                description: take("error_description"),
                state: take("state"),
            });
        }
        match (take("code"), take("state")) {
            (Some(code), Some(state)) if !code.is_empty() && !state.is_empty() => {
                Some(CallbackParams::Code { code, state, iss: take("iss") })
            }
            _ => None,
        }
    })();
    assert_eq!(got.as_ref().ok(), expected.as_ref(), "callback_params({query:?}) = {got:?}");
}

/// `safe_return`: the input unchanged or `/`; an accepted one starts with one `/` (not `//` or
/// `/\`), is visible ASCII, at most 2048 bytes, not under the gateway's own prefix, and a
/// browser resolves it on the same origin.
pub fn check_safe_return(s: &str) {
    let out = safe_return(s);
    assert!(out == s || out == "/", "safe_return({s:?}) = {out:?}");
    if out != s || s == "/" {
        return;
    }
    assert!(s.starts_with('/') && !s.starts_with("//") && !s.starts_with("/\\"), "{s:?}");
    assert!(!s.starts_with(OWN_PREFIX) && s.len() <= 2048 && s.bytes().all(|b| b.is_ascii_graphic()), "{s:?}");
    let base = url::Url::parse("https://gw.test/app/page?x=1").expect("base");
    let resolved = base.join(s).unwrap_or_else(|e| panic!("{s:?} does not resolve: {e}"));
    assert_eq!(resolved.origin(), base.origin(), "{s:?} leaves the origin: {resolved}");
}

/// A sign-in started for `return_to` comes back: the flow cookie it sets, sent with any other
/// cookies, gives the verifier and `safe_return(return_to)` for its own state, and nothing for
/// a state that differs anywhere (even one sharing the cookie name's first 16 characters).
pub fn check_flow_round_trip(return_to: &str, other_cookies: &str, tweak: u8) {
    let started = start("https://idp.test", "acme$gateway", "https://gw.test", return_to).expect("start");
    let location = url::Url::parse(&started.location).expect("location");
    let state = location.query_pairs().find(|(k, _)| k == "state").map(|(_, v)| v.into_owned()).expect("state");
    let set_cookie = started.set_cookie.to_str().expect("ASCII cookie");
    let pair = set_cookie.split(';').next().expect("name=value");
    assert!(pair.starts_with(FLOW_COOKIE_PREFIX), "{set_cookie}");
    let mut h = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(other_cookies) {
        h.append(header::COOKIE, v);
    }
    h.append(header::COOKIE, HeaderValue::from_str(pair).expect("cookie"));
    // Another browser cookie of the same name sent first would win (first match); skip those.
    if cookies(&h).find(|(n, _)| pair.starts_with(&format!("{n}="))).map(|(_, v)| v)
        != pair.split_once('=').map(|p| p.1)
    {
        return;
    }
    let flow = flow_of(&h, &state).expect("the flow cookie of this state");
    assert_eq!(flow.return_to, safe_return(return_to));
    let mut other: Vec<u8> = state.clone().into_bytes();
    let i = usize::from(tweak) % other.len();
    if let Some(c) = other.get_mut(i) {
        *c = if *c == b'A' { b'B' } else { b'A' };
    }
    let other = String::from_utf8(other).expect("ASCII state");
    assert!(flow_of(&h, &other).is_none(), "state {other:?} accepted the flow cookie of {state:?}");
}

/// `flow_of` on any cookies and state: a flow comes back only from the cookie named after the
/// state whose recorded state is exactly it, and its return URL is a safe one.
pub fn check_flow_of(h: &HeaderMap, state: &str) {
    let Some(flow) = flow_of(h, state) else {
        return;
    };
    assert!((16..=128).contains(&state.len()), "{state:?}");
    let name = format!("{FLOW_COOKIE_PREFIX}{}", state.get(..16).unwrap_or(state));
    let value = cookies(h).find(|(n, _)| *n == name).map(|(_, v)| v).expect("the cookie exists");
    assert_eq!(value.split('.').nth(1), Some(state), "{value:?}");
    assert_eq!(safe_return(&flow.return_to), flow.return_to);
    check_safe_return(&flow.return_to);
}

/// Pieces of callback queries.
pub const QUERY_PIECES: [&str; 30] = [
    "code=",
    "state=",
    "iss=",
    "error=",
    "error_description=",
    "&",
    "=",
    "abc",
    "AAAAAAAAAAAAAAAAAAAA",
    "%",
    "%2",
    "%41",
    "%+1",
    "%-1",
    "% 1",
    "%zz",
    "%C3%A9",
    "%C3",
    "%FF",
    "+",
    "%26",
    "%3D",
    "code",
    "state",
    "é",
    "\0",
    "https%3A%2F%2Fidp.test",
    "access_denied",
    "&&",
    "%00",
];

/// Pieces of return URLs and cookies.
pub const RETURN_PIECES: [&str; 24] = [
    "/",
    "//",
    "\\",
    "/\\",
    "/app",
    "/.portcullis/",
    "/.portcullis",
    ".",
    "..",
    "%2e",
    "?",
    "#",
    "x=1",
    "https:",
    "evil.test",
    "@",
    " ",
    "\t",
    "é",
    "%0d%0a",
    "/..//evil",
    ";",
    "=",
    "\"",
];

/// A callback case from fuzzer bytes: the query (pieces), then cookies and a state to try.
pub fn login_case_from_bytes(data: &[u8]) -> (Option<String>, String, HeaderMap, String, u8) {
    let mut b = Bytes(data);
    let sel = b.byte();
    let query = crate::bytes::from_pieces(&QUERY_PIECES, b.field(b'\n'));
    let return_to = crate::bytes::from_pieces(&RETURN_PIECES, b.field(b'\n'));
    let state = b.text(b'\n');
    let mut h = HeaderMap::new();
    while !b.0.is_empty() {
        if let Ok(v) = HeaderValue::from_bytes(b.field(b'\n')) {
            h.append(header::COOKIE, v);
        }
    }
    ((sel & 1 == 1).then_some(query), return_to, h, state, sel)
}
