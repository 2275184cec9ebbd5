//! The browser sign-in of `session` routes (DESIGN §5: no session cookie → the login page →
//! back to the original URL with a session cookie). The gateway is an OAuth client of the
//! control plane using the authorization code flow with PKCE (S256) and `state`:
//!
//! 1. A browser navigation ([`is_navigation`]) to a `session` route without a credential is
//!    sent (302) to the control plane's `/oauth2/authorize` ([`start`]). The `state`, the PKCE
//!    verifier and the URL to come back to ride in a short-lived flow cookie named after the
//!    state (`__Host-portcullis_login_<first 16 characters of state>`: HttpOnly, Secure,
//!    SameSite=Lax, 10 minutes), so several tabs can sign in at once and any gateway instance
//!    behind a load balancer can finish the flow.
//! 2. The person signs in at the control plane (password, then an emailed code or TOTP; the SSO
//!    cookie spares them that next time).
//! 3. The control plane redirects to `<public origin>/.portcullis/callback?code&state&iss`.
//!    The callback ([`callback_params`], [`flow_of`]) checks that `state` matches a flow cookie
//!    of this browser — CSRF protection: a code injected by another site finds no cookie, and
//!    even with one its PKCE challenge would not match the verifier — and that `iss` is the
//!    control plane (RFC 9207). The control plane redeems the code for a session
//!    (`ControlPlane::browser_session`), whose token becomes the session cookie
//!    ([`session_set_cookie`], `__Host-portcullis_session`), and the browser goes back (303) to
//!    the URL it first asked for, which is always a path on this gateway ([`safe_return`]).
//!
//! Requests that are not navigations (API calls, `fetch`, images) keep getting a 401: a
//! redirect to an HTML login page is no answer for them.
//!
//! Everything here is pure (randomness aside): no I/O, no clock, no control-plane calls.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use http::Method;
use http::header::{self, HeaderMap, HeaderValue};
use zeroize::Zeroizing;

/// The gateway's callback path (under its own prefix, never routed).
pub const CALLBACK_PATH: &str = "/.portcullis/callback";
/// The session cookie the sign-in sets. `portcullis_session` (without the prefix) is also
/// accepted, for clients that hold an Auth API session token.
pub const HOST_SESSION_COOKIE: &str = "__Host-portcullis_session";
/// Flow cookies are this prefix plus the first [`FLOW_ID_LEN`] characters of the state.
pub const FLOW_COOKIE_PREFIX: &str = "__Host-portcullis_login_";
const FLOW_ID_LEN: usize = 16;
/// How long a sign-in may take, start to callback (seconds).
pub const FLOW_MAX_AGE: i64 = 600;
/// Longest URL (path and query) the browser is sent back to.
const MAX_RETURN_LEN: usize = 2048;
/// Longest query string the callback reads.
const MAX_CALLBACK_QUERY: usize = 4096;

/// Whether a request that carries no credential is a browser navigation that should go to the
/// sign-in page: a `GET` or `HEAD` with `Sec-Fetch-Mode: navigate`, or one that accepts
/// `text/html` and is not marked by fetch metadata as a subresource or script request
/// (`Sec-Fetch-Dest` other than `document`, `iframe` or `frame`). Scripts' `fetch` calls carry
/// `Sec-Fetch-Dest: empty` and keep getting 401s.
pub fn is_navigation(method: &Method, headers: &HeaderMap) -> bool {
    if method != Method::GET && method != Method::HEAD {
        return false;
    }
    let meta = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_ascii_lowercase);
    if meta("sec-fetch-mode").as_deref() == Some("navigate") {
        return true;
    }
    let page = meta("sec-fetch-dest").is_none_or(|d| matches!(d.as_str(), "document" | "iframe" | "frame"));
    page && headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|t| t.trim().to_ascii_lowercase().starts_with("text/html")))
}

/// Where a sign-in goes and the flow cookie that comes back with it.
#[derive(Debug)]
pub struct Started {
    /// The control plane's authorization URL.
    pub location: String,
    pub set_cookie: HeaderValue,
}

/// Starts a sign-in for a browser that asked for `return_to` (the request's path and query):
/// fresh `state` and PKCE verifier, the authorization URL of `issuer` for `client_id` with the
/// callback under `origin`, and the flow cookie.
pub fn start(issuer: &str, client_id: &str, origin: &str, return_to: &str) -> Result<Started, String> {
    let state = random_token()?;
    let verifier = random_token()?;
    let challenge = B64URL.encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, verifier.as_bytes()));
    let redirect_uri = format!("{origin}{CALLBACK_PATH}");
    let query = form_urlencoded::Serializer::new(String::new())
        .extend_pairs([
            ("response_type", "code"),
            ("client_id", client_id),
            ("redirect_uri", &redirect_uri),
            ("scope", "openid"),
            ("state", &state),
            ("code_challenge", &challenge),
            ("code_challenge_method", "S256"),
        ])
        .finish();
    let location = format!("{}/oauth2/authorize?{query}", issuer.trim_end_matches('/'));
    let value = format!("{}.{}.{}", verifier.as_str(), state, B64URL.encode(safe_return(return_to)));
    let set_cookie = cookie(&flow_cookie_name(&state), &value, FLOW_MAX_AGE)?;
    Ok(Started { location, set_cookie })
}

/// What came back to the callback.
#[derive(Debug, PartialEq, Eq)]
pub enum CallbackParams {
    /// The sign-in finished: redeem `code`.
    Code { code: String, state: String, iss: Option<String> },
    /// The control plane said no (`error`, e.g. `access_denied`), with its description.
    Refused { error: String, description: Option<String>, state: Option<String> },
}

/// Reads the callback's query: `code` and `state` (or `error`), each at most once.
pub fn callback_params(query: Option<&str>) -> Result<CallbackParams, String> {
    let query = query.unwrap_or("");
    if query.len() > MAX_CALLBACK_QUERY {
        return Err("the sign-in answer is too long".into());
    }
    let mut seen: Vec<(String, String)> = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let (k, v) = (percent_decode(k)?, percent_decode(v)?);
        if seen.iter().any(|(s, _)| *s == k) {
            return Err(format!("the sign-in answer repeats {:?}", k.chars().take(32).collect::<String>()));
        }
        seen.push((k, v));
    }
    let take = |name: &str| seen.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    if let Some(error) = take("error") {
        return Ok(CallbackParams::Refused { error, description: take("error_description"), state: take("state") });
    }
    match (take("code"), take("state")) {
        (Some(code), Some(state)) if !code.is_empty() && !state.is_empty() => {
            Ok(CallbackParams::Code { code, state, iss: take("iss") })
        }
        _ => Err("the sign-in answer lacks code or state".into()),
    }
}

/// A sign-in in progress, read back from its flow cookie.
pub struct Flow {
    pub verifier: Zeroizing<String>,
    /// Where the browser goes once signed in (a path on this gateway).
    pub return_to: String,
}

impl std::fmt::Debug for Flow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flow").field("return_to", &self.return_to).finish_non_exhaustive()
    }
}

/// The flow cookie of `state` among the request's cookies, if its recorded state is `state`
/// (compared in constant time).
pub fn flow_of(headers: &HeaderMap, state: &str) -> Option<Flow> {
    if state.len() < FLOW_ID_LEN || state.len() > 128 {
        return None;
    }
    let name = flow_cookie_name(state);
    let value = cookies(headers).find(|(n, _)| *n == name).map(|(_, v)| v)?;
    let mut parts = value.splitn(3, '.');
    let (verifier, recorded, back) = (parts.next()?, parts.next()?, parts.next()?);
    if aws_lc_rs::constant_time::verify_slices_are_equal(recorded.as_bytes(), state.as_bytes()).is_err() {
        return None;
    }
    let back = String::from_utf8(B64URL.decode(back).ok()?).ok()?;
    Some(Flow { verifier: Zeroizing::new(verifier.to_owned()), return_to: safe_return(&back) })
}

/// The `Set-Cookie` that ends the flow cookie of `state`.
pub fn clear_flow_cookie(state: &str) -> Result<HeaderValue, String> {
    cookie(&flow_cookie_name(state), "", 0)
}

/// The session cookie for `token`, living `max_age` seconds.
pub fn session_set_cookie(token: &str, max_age: i64) -> Result<HeaderValue, String> {
    cookie(HOST_SESSION_COOKIE, token, max_age.max(0))
}

/// The `Set-Cookie` that ends the session cookie.
pub fn clear_session_cookie() -> Result<HeaderValue, String> {
    cookie(HOST_SESSION_COOKIE, "", 0)
}

/// Whether a cookie belongs to Portcullis (never forwarded upstream): the gateway's session and
/// flow cookies, and the control plane's own (`portcullis_sso`, CSRF…), which a browser also
/// sends here when the control plane runs on the same host name (cookies ignore the port).
pub fn is_gateway_cookie(name: &str) -> bool {
    ["portcullis_", "__Host-portcullis_", "__Secure-portcullis_"].iter().any(|p| name.starts_with(p))
}

/// `return_to` if it is a path on this gateway (`/` then not `/` or `\`, visible ASCII, at most
/// [`MAX_RETURN_LEN`], not the gateway's own endpoints); `/` otherwise. Never another origin.
pub fn safe_return(return_to: &str) -> String {
    let ok = return_to.starts_with('/')
        && !return_to.starts_with("//")
        && !return_to.starts_with("/\\")
        && !return_to.starts_with(crate::server::OWN_PREFIX)
        && return_to.len() <= MAX_RETURN_LEN
        && return_to.bytes().all(|b| b.is_ascii_graphic());
    if ok { return_to.to_owned() } else { "/".to_owned() }
}

/// Every `name=value` pair of the request's `Cookie` headers.
pub fn cookies(headers: &HeaderMap) -> impl Iterator<Item = (&str, &str)> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .map(|(n, v)| (n.trim(), v.trim().trim_matches('"')))
}

fn flow_cookie_name(state: &str) -> String {
    format!("{FLOW_COOKIE_PREFIX}{}", state.get(..FLOW_ID_LEN).unwrap_or(state))
}

fn cookie(name: &str, value: &str, max_age: i64) -> Result<HeaderValue, String> {
    HeaderValue::from_str(&format!("{name}={value}; Path=/; Max-Age={max_age}; HttpOnly; Secure; SameSite=Lax"))
        .map_err(|_| "a cookie value is not a valid header".to_owned())
}

/// 256 random bits, base64url (43 characters).
fn random_token() -> Result<String, String> {
    let mut bytes = Zeroizing::new([0u8; 32]);
    aws_lc_rs::rand::fill(bytes.as_mut()).map_err(|_| "the OS random generator failed".to_owned())?;
    Ok(B64URL.encode(bytes.as_ref()))
}

/// Form decoding of one query component (`+` is a space); malformed escapes (a `%` not followed
/// by two hex digits) and non-UTF-8 are refused.
fn percent_decode(s: &str) -> Result<String, String> {
    let bad = || "the sign-in answer is not a valid query string".to_owned();
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'%' => {
                let hex = [bytes.next().ok_or_else(bad)?, bytes.next().ok_or_else(bad)?];
                // Not `from_str_radix` alone: it also takes a sign (`%+1`).
                if !hex.iter().all(u8::is_ascii_hexdigit) {
                    return Err(bad());
                }
                let hex = std::str::from_utf8(&hex).map_err(|_| bad())?;
                out.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
    }
    String::from_utf8(out).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(http::header::HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn query_of(url: &str) -> Vec<(String, String)> {
        let q = url.split_once('?').unwrap().1;
        q.split('&')
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap();
                (k.to_owned(), percent_decode(v).unwrap())
            })
            .collect()
    }

    #[test]
    fn only_browser_navigations_are_redirected() {
        let nav = headers(&[("sec-fetch-mode", "navigate"), ("accept", "application/json")]);
        assert!(is_navigation(&Method::GET, &nav));
        assert!(is_navigation(&Method::HEAD, &nav));
        assert!(!is_navigation(&Method::POST, &nav), "a form post is not resumed after sign-in");
        let script = headers(&[("sec-fetch-mode", "cors"), ("sec-fetch-dest", "empty"), ("accept", "text/html")]);
        assert!(!is_navigation(&Method::GET, &script), "a script's fetch");
        assert!(!is_navigation(&Method::GET, &headers(&[("sec-fetch-dest", "image"), ("accept", "text/html")])));
        assert!(is_navigation(&Method::GET, &headers(&[("sec-fetch-dest", "Document"), ("accept", "text/html")])));
        assert!(is_navigation(&Method::GET, &headers(&[("accept", "application/xhtml+xml, TEXT/HTML;q=0.9")])));
        assert!(!is_navigation(&Method::GET, &headers(&[("accept", "application/json")])));
        assert!(!is_navigation(&Method::GET, &headers(&[("accept", "*/*")])), "curl's default is an API call");
        assert!(!is_navigation(&Method::GET, &HeaderMap::new()));
    }

    #[test]
    fn a_started_sign_in_carries_pkce_state_and_a_flow_cookie_that_reads_back() {
        let s =
            start("https://id.acme.test/", "acme$gateway", "https://gw.acme.test:8443", "/app/x?y=1&z=%20").unwrap();
        assert!(s.location.starts_with("https://id.acme.test/oauth2/authorize?"), "{}", s.location);
        let q = query_of(&s.location);
        let get = |k: &str| q.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str()).unwrap();
        assert_eq!(get("response_type"), "code");
        assert_eq!(get("client_id"), "acme$gateway");
        assert_eq!(get("redirect_uri"), "https://gw.acme.test:8443/.portcullis/callback");
        assert_eq!(get("code_challenge_method"), "S256");
        let state = get("state");
        assert_eq!(state.len(), 43);

        let cookie = s.set_cookie.to_str().unwrap();
        for attr in ["Path=/", "Max-Age=600", "HttpOnly", "Secure", "SameSite=Lax"] {
            assert!(cookie.contains(attr), "{cookie} lacks {attr}");
        }
        assert!(cookie.starts_with(&format!("{FLOW_COOKIE_PREFIX}{}=", &state[..16])));
        let pair = cookie.split(';').next().unwrap();
        let flow = flow_of(&headers(&[("cookie", &format!("other=1; {pair}"))]), state).unwrap();
        assert_eq!(flow.return_to, "/app/x?y=1&z=%20");
        // The challenge is S256 of the verifier in the cookie.
        let want = B64URL.encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, flow.verifier.as_bytes()));
        assert_eq!(get("code_challenge"), want);
        assert!(!format!("{flow:?}").contains(flow.verifier.as_str()), "Debug hides the verifier");

        // Another state (even one sharing the cookie's name prefix) finds nothing.
        let forged = format!("{}{}", &state[..16], "A".repeat(27));
        assert!(flow_of(&headers(&[("cookie", pair)]), &forged).is_none());
        assert!(flow_of(&headers(&[("cookie", pair)]), "short").is_none());
        assert!(flow_of(&HeaderMap::new(), state).is_none());

        // Two sign-ins: two states, two cookies.
        let t = start("https://id.acme.test", "acme$gateway", "https://gw", "/").unwrap();
        assert_ne!(t.set_cookie.to_str().unwrap().split('=').next(), cookie.split('=').next());
    }

    #[test]
    fn the_browser_only_ever_goes_back_to_a_path_here() {
        for good in ["/", "/a/b?c=d", "/x%2Fy"] {
            assert_eq!(safe_return(good), good);
        }
        for bad in [
            "//evil.example/x",
            "/\\evil.example",
            "https://evil.example/",
            "evil",
            "",
            "/a b",
            "/.portcullis/callback?code=x",
            "/\u{e9}",
        ] {
            assert_eq!(safe_return(bad), "/", "{bad:?}");
        }
        assert_eq!(safe_return(&format!("/{}", "a".repeat(MAX_RETURN_LEN))), "/");
        // A tampered cookie cannot point elsewhere either.
        let h = headers(&[(
            "cookie",
            &format!("{FLOW_COOKIE_PREFIX}{}=v.{}.{}", "s".repeat(16), "s".repeat(43), B64URL.encode("//evil.example")),
        )]);
        assert_eq!(flow_of(&h, &"s".repeat(43)).unwrap().return_to, "/");
    }

    #[test]
    fn callback_queries_are_read_strictly() {
        assert_eq!(
            callback_params(Some("code=abc%2Bd&state=st&iss=https%3A%2F%2Fid.acme.test")).unwrap(),
            CallbackParams::Code { code: "abc+d".into(), state: "st".into(), iss: Some("https://id.acme.test".into()) }
        );
        assert_eq!(
            callback_params(Some("error=access_denied&error_description=no+thanks&state=st")).unwrap(),
            CallbackParams::Refused {
                error: "access_denied".into(),
                description: Some("no thanks".into()),
                state: Some("st".into())
            }
        );
        for bad in
            [None, Some(""), Some("code=a"), Some("state=s"), Some("code=&state=s"), Some("code=a&code=b&state=s")]
        {
            assert!(callback_params(bad).is_err(), "{bad:?}");
        }
        assert!(callback_params(Some("code=%zz&state=s")).is_err());
        assert!(callback_params(Some("code=%ff&state=s")).is_err(), "not UTF-8");
        // Found by the gateway_login fuzz target: a sign is not a hex digit (`%+1` was U+0001).
        for bad in ["code=%+1&state=s", "error=x%+a", "code=a&state=%+0A"] {
            assert!(callback_params(Some(bad)).is_err(), "{bad}");
        }
        assert!(callback_params(Some(&format!("code={}&state=s", "a".repeat(5000)))).is_err());
    }

    #[test]
    fn cookies_are_host_prefixed_and_gateway_cookies_are_recognised() {
        let c = session_set_cookie("pcs_tok", 3600).unwrap();
        assert_eq!(c, "__Host-portcullis_session=pcs_tok; Path=/; Max-Age=3600; HttpOnly; Secure; SameSite=Lax");
        assert!(clear_session_cookie().unwrap().to_str().unwrap().contains("Max-Age=0"));
        assert!(session_set_cookie("bad;value\n", 1).is_err());
        for name in [
            "__Host-portcullis_session",
            "portcullis_session",
            "__Host-portcullis_login_abcdefabcdefabcd",
            "portcullis_sso",
            "__Host-portcullis_sso",
            "__Secure-portcullis_csrf",
        ] {
            assert!(is_gateway_cookie(name), "{name}");
        }
        for name in ["app_session", "xportcullis_session", "__Host-app"] {
            assert!(!is_gateway_cookie(name), "{name}");
        }
    }
}
