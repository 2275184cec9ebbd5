//! Handler tests of OpenID Connect for people (docs/oidc.md) that need a controlled clock or
//! in-process fakes: the real router over a real SQLite store, driven with `oneshot` by a small
//! in-test browser (a cookie jar, 303s followed by hand, hidden form fields read from the HTML),
//! a manual clock, an in-memory mailer the emailed codes and links are read from, and a fake
//! back-channel `LogoutNotifier`.
//!
//! Every HTML page any test sees is checked for the contract's security headers, every refusal
//! for `x-error`/`x-error-id`, and every cookie for `HttpOnly`, `SameSite=Lax`, `Secure` and the
//! `__Host-` prefix (the test issuer is `https://`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode, header};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD as B64};
use portcullis_core::clock::Clock;
use portcullis_core::crypto::signing::Algorithm;
use portcullis_core::crypto::totp;
use portcullis_core::mail::OutgoingMail;
use portcullis_core::usecases::LogoutNotifier;
use serde_json::{Value, json};
use tower::ServiceExt;

#[allow(dead_code)]
mod support;

use support::{ADMIN_SECRET, Env, ISS, env_with};

const PW: &str = "correct-horse-battery";
const ANN: &str = "ann@acme.test";
const ANN_NAME: &str = "Ann Example";
const WEB_CB: &str = "https://app.acme.test/cb";
const WEB_LOGGED_OUT: &str = "https://app.acme.test/logged-out";
const SPA_CB: &str = "https://spa.acme.test/cb";
const PARTNER_CB: &str = "https://partner.test/cb";
const SCOPE: &str = "openid profile email offline_access payments/read";
const PAYMENTS_AUD: &str = "https://payments.test";
const ACR: &str = "urn:portcullis:acr:2fa";
const BACKCHANNEL_EVENT: &str = "http://schemas.openid.net/event/backchannel-logout";
const STATE: &str = "st-Zx81";
const NONCE: &str = "n-0q7Lw";
const SSO: &str = "__Host-portcullis_sso";
const CSRF: &str = "__Host-portcullis_csrf";

// ---- the browser -----------------------------------------------------------------------------

/// One response, body read.
struct Page {
    what: String,
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

impl Page {
    fn location(&self) -> Option<&str> {
        self.headers.get(header::LOCATION).map(|v| v.to_str().unwrap())
    }

    /// The `Location` of a 303.
    #[track_caller]
    fn see_other(&self) -> &str {
        assert_eq!(self.status, StatusCode::SEE_OTHER, "{}: expected a 303: {}", self.what, self.snippet());
        self.location().unwrap_or_else(|| panic!("{}: 303 without Location", self.what))
    }

    fn err(&self) -> String {
        self.headers.get("x-error").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default()
    }

    fn snippet(&self) -> String {
        format!("x-error {:?}; {}", self.err(), self.body.chars().take(400).collect::<String>())
    }

    /// Every `value` of the form fields named `name`, unescaped.
    fn fields(&self, name: &str) -> Vec<String> {
        let needle = format!("name=\"{name}\"");
        let mut out = Vec::new();
        let mut rest = self.body.as_str();
        while let Some(i) = rest.find(&needle) {
            let after = &rest[i + needle.len()..];
            let tag_end = after.find('>').unwrap_or(after.len());
            let tag = &after[..tag_end];
            if let Some(v) = tag.find("value=\"") {
                let v = &tag[v + 7..];
                out.push(unescape(&v[..v.find('"').unwrap()]));
            }
            rest = after;
        }
        out
    }

    /// The one hidden field `name`.
    #[track_caller]
    fn hidden(&self, name: &str) -> String {
        let f = self.fields(name);
        assert!(!f.is_empty(), "{}: no field {name:?} on the page: {}", self.what, self.snippet());
        assert!(f.iter().all(|v| *v == f[0]), "{}: several different {name:?} fields", self.what);
        f[0].clone()
    }

    #[track_caller]
    fn assert_error_page(&self, status: StatusCode) {
        assert_eq!(self.status, status, "{}: {}", self.what, self.snippet());
        assert!(self.location().is_none(), "{}: an error page with a Location", self.what);
        assert!(!self.err().is_empty() && self.headers.contains_key("x-error-id"), "{}", self.what);
        assert!(self.is_html(), "{}: an error page that is not HTML", self.what);
    }

    fn is_html(&self) -> bool {
        self.headers.get(header::CONTENT_TYPE).is_some_and(|v| v.to_str().unwrap().starts_with("text/html"))
    }
}

/// HTML entities as askama writes them (named and numeric).
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        let decoded = rest.find(';').filter(|end| *end <= 10).and_then(|end| {
            let ent = &rest[1..end];
            let c = match ent {
                "amp" => Some('&'),
                "lt" => Some('<'),
                "gt" => Some('>'),
                "quot" => Some('"'),
                "apos" => Some('\''),
                _ if ent.starts_with("#x") || ent.starts_with("#X") => {
                    u32::from_str_radix(&ent[2..], 16).ok().and_then(char::from_u32)
                }
                _ if ent.starts_with('#') => ent[1..].parse().ok().and_then(char::from_u32),
                _ => None,
            };
            c.map(|c| (c, end))
        });
        match decoded {
            Some((c, end)) => {
                out.push(c);
                rest = &rest[end + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// A browser: a cookie jar over the router.
#[derive(Clone)]
struct Browser {
    app: Router,
    jar: BTreeMap<String, String>,
}

impl Browser {
    fn new(e: &Env) -> Self {
        Browser { app: e.app.clone(), jar: BTreeMap::new() }
    }

    fn cookie(&self, name: &str) -> Option<String> {
        self.jar.get(name).cloned()
    }

    async fn send(&mut self, mut req: Request<Body>) -> Page {
        let what = format!("{} {}", req.method(), req.uri());
        if !self.jar.is_empty() {
            let c = self.jar.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("; ");
            req.headers_mut().insert(header::COOKIE, c.parse().unwrap());
        }
        let resp = self.app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        for sc in headers.get_all(header::SET_COOKIE) {
            let sc = sc.to_str().unwrap();
            check_cookie(&what, sc);
            let mut parts = sc.split(';');
            let (name, value) = parts.next().unwrap().trim().split_once('=').unwrap();
            let deleted = parts.any(|a| a.trim().eq_ignore_ascii_case("max-age=0"));
            if deleted {
                self.jar.remove(name);
            } else {
                self.jar.insert(name.to_owned(), value.to_owned());
            }
        }
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX).await.unwrap();
        let page = Page { what, status, headers, body: String::from_utf8_lossy(&bytes).into_owned() };
        assert!(!status.is_server_error(), "{}: {status}: {}", page.what, page.snippet());
        if status.is_client_error() {
            assert!(
                page.headers.contains_key("x-error") && page.headers.contains_key("x-error-id"),
                "{}: {status} without x-error/x-error-id",
                page.what
            );
        }
        if page.is_html() {
            check_page_headers(&page);
        }
        page
    }

    async fn get(&mut self, path: &str) -> Page {
        self.send(Request::get(path).body(Body::empty()).unwrap()).await
    }

    async fn post(&mut self, path: &str, fields: &[(&str, &str)]) -> Page {
        let body = form_urlencoded::Serializer::new(String::new()).extend_pairs(fields).finish();
        let req = Request::post(path)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Body::from(body))
            .unwrap();
        self.send(req).await
    }

    /// Follows 303s while they stay on this server.
    async fn follow(&mut self, mut p: Page) -> Page {
        for _ in 0..10 {
            match p.location() {
                Some(l) if p.status == StatusCode::SEE_OTHER && l.starts_with('/') && !l.starts_with("//") => {
                    let l = l.to_owned();
                    p = self.get(&l).await;
                }
                _ => return p,
            }
        }
        panic!("redirect loop at {}", p.what);
    }
}

/// The headers every page is sent with (docs/oidc.md, "Security").
#[track_caller]
fn check_page_headers(p: &Page) {
    let h = |n: header::HeaderName| p.headers.get(n).map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
    let csp = h(header::CONTENT_SECURITY_POLICY);
    for d in [
        "frame-ancestors 'none'",
        "default-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "script-src 'self'",
        "style-src 'self'",
    ] {
        assert!(csp.contains(d), "{}: CSP {csp:?} lacks {d:?}", p.what);
    }
    assert!(!csp.contains("unsafe-inline"), "{}: {csp}", p.what);
    assert_eq!(h(header::X_FRAME_OPTIONS), "DENY", "{}", p.what);
    assert!(h(header::CACHE_CONTROL).contains("no-store"), "{}", p.what);
    assert_eq!(h(header::REFERRER_POLICY), "no-referrer", "{}", p.what);
    assert!(!p.body.contains("<script>"), "{}: an inline script", p.what);
}

#[track_caller]
fn check_cookie(what: &str, sc: &str) {
    let attrs: Vec<String> = sc.split(';').skip(1).map(|a| a.trim().to_ascii_lowercase()).collect();
    for a in ["httponly", "samesite=lax", "secure", "path=/"] {
        assert!(attrs.iter().any(|x| x == a), "{what}: cookie without {a}: {sc}");
    }
    assert!(sc.starts_with("__Host-"), "{what}: an https issuer's cookie without the __Host- prefix: {sc}");
}

// ---- the API, mail, tokens -------------------------------------------------------------------

async fn raw(e: &Env, req: Request<Body>) -> (StatusCode, HeaderMap, Value) {
    let resp = e.app.clone().oneshot(req).await.unwrap();
    let s = resp.status();
    let h = resp.headers().clone();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX).await.unwrap();
    let v = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    if !s.is_success() {
        assert!(h.contains_key("x-error") && h.contains_key("x-error-id"), "{s} without x-error: {v}");
    }
    (s, h, v)
}

async fn api(e: &Env, method: &str, path: &str, token: &str, body: Option<Value>) -> (StatusCode, Value) {
    let b = Request::builder().method(method).uri(path).header(header::AUTHORIZATION, format!("Bearer {token}"));
    let req = match body {
        Some(v) => b.header(header::CONTENT_TYPE, "application/json").body(Body::from(v.to_string())).unwrap(),
        None => b.body(Body::empty()).unwrap(),
    };
    let (s, _, v) = raw(e, req).await;
    (s, v)
}

fn basic(id: &str, secret: &str) -> String {
    format!("Basic {}", STANDARD.encode(format!("{id}:{secret}")))
}

fn form_req(path: &str, auth: Option<String>, fields: &[(&str, &str)]) -> Request<Body> {
    let body = form_urlencoded::Serializer::new(String::new()).extend_pairs(fields).finish();
    let mut b = Request::post(path).header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
    if let Some(a) = auth {
        b = b.header(header::AUTHORIZATION, a);
    }
    b.body(Body::from(body)).unwrap()
}

async fn admin_token(e: &Env) -> String {
    let req = form_req(
        "/oauth2/token",
        Some(basic("portcullis$admin", ADMIN_SECRET)),
        &[("grant_type", "client_credentials")],
    );
    let (s, _, v) = raw(e, req).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v["access_token"].as_str().unwrap().to_owned()
}

/// A registered application.
#[derive(Clone)]
struct Client {
    id: String,
    secret: Option<String>,
    redirect_uri: &'static str,
}

/// The token endpoint, authenticating as `c` (HTTP Basic, or `client_id` alone when public).
async fn token(e: &Env, c: &Client, fields: &[(&str, &str)]) -> (StatusCode, Value) {
    let mut fields = fields.to_vec();
    let auth = match &c.secret {
        Some(s) => Some(basic(&c.id, s)),
        None => {
            fields.push(("client_id", &c.id));
            None
        }
    };
    let (s, h, v) = raw(e, form_req("/oauth2/token", auth, &fields)).await;
    if s == StatusCode::OK {
        assert_eq!(h.get(header::CACHE_CONTROL).unwrap(), "no-store");
    }
    (s, v)
}

async fn redeem(e: &Env, c: &Client, code: &str, verifier: Option<&str>) -> (StatusCode, Value) {
    let mut f = vec![("grant_type", "authorization_code"), ("code", code), ("redirect_uri", c.redirect_uri)];
    if let Some(v) = verifier {
        f.push(("code_verifier", v));
    }
    token(e, c, &f).await
}

async fn refresh(e: &Env, c: &Client, rt: &str) -> (StatusCode, Value) {
    token(e, c, &[("grant_type", "refresh_token"), ("refresh_token", rt)]).await
}

#[track_caller]
fn assert_oauth_error(r: &(StatusCode, Value), code: &str) {
    assert_eq!(r.0, StatusCode::BAD_REQUEST, "{}", r.1);
    assert_eq!(r.1["error"], code, "{}", r.1);
}

/// RFC 7662 as client `c`: whether the token is active.
async fn active(e: &Env, c: &Client, tok: &str) -> bool {
    let req = form_req("/oauth2/introspect", Some(basic(&c.id, c.secret.as_ref().unwrap())), &[("token", tok)]);
    let (s, _, v) = raw(e, req).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v["active"].as_bool().unwrap()
}

async fn userinfo(e: &Env, at: &str) -> (StatusCode, Value) {
    let req = Request::get("/oauth2/userinfo").header(header::AUTHORIZATION, format!("Bearer {at}"));
    let (s, _, v) = raw(e, req.body(Body::empty()).unwrap()).await;
    (s, v)
}

/// Delivers what is queued and returns every message `to` received, oldest first.
async fn mails_to(e: &Env, to: &str) -> Vec<OutgoingMail> {
    e.core.deliver_mail().await.unwrap();
    e.mailer.sent().into_iter().filter(|m| m.to == to).collect()
}

fn code_in(m: &OutgoingMail) -> Option<String> {
    m.text.split_whitespace().find(|w| w.len() == 6 && w.bytes().all(|b| b.is_ascii_digit())).map(str::to_owned)
}

/// The path (with query) of the invitation link in `m`.
fn invite_path(m: &OutgoingMail) -> String {
    let prefix = format!("{ISS}/invite?token=");
    let i = m.text.find(&prefix).unwrap_or_else(|| panic!("no invitation link in {:?}", m.text));
    let link: String = m.text[i..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || "-_.~%:/?=&".contains(*c))
        .collect::<String>()
        .trim_end_matches('.')
        .to_owned();
    link[ISS.len()..].to_owned()
}

fn sha256(b: &[u8]) -> Vec<u8> {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, b).as_ref().to_vec()
}

/// The claims of a JWT, unverified.
fn claims(jwt: &str) -> Value {
    serde_json::from_slice(&B64.decode(jwt.split('.').nth(1).unwrap()).unwrap()).unwrap()
}

async fn jwks(e: &Env) -> Value {
    let (s, _, v) = raw(e, Request::get("/oauth2/jwks").body(Body::empty()).unwrap()).await;
    assert_eq!(s, StatusCode::OK);
    v
}

/// Verifies `jwt` against the published JWKS with aws-lc-rs; returns (header, claims).
async fn verify_jwt(e: &Env, jwt: &str, typ: &str) -> (Value, Value) {
    let set = jwks(e).await;
    let parts: Vec<&str> = jwt.split('.').collect();
    assert_eq!(parts.len(), 3, "{jwt}");
    let header: Value = serde_json::from_slice(&B64.decode(parts[0]).unwrap()).unwrap();
    let body: Value = serde_json::from_slice(&B64.decode(parts[1]).unwrap()).unwrap();
    let sig = B64.decode(parts[2]).unwrap();
    assert_eq!(header["typ"], typ, "{header}");
    let kid = header["kid"].as_str().unwrap_or_else(|| panic!("no kid: {header}"));
    let key = set["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"] == kid)
        .unwrap_or_else(|| panic!("kid {kid} is not in /oauth2/jwks: {set}"));
    if let Some(a) = key["alg"].as_str() {
        assert_eq!(a, header["alg"].as_str().unwrap(), "the key's alg");
    }
    let msg = format!("{}.{}", parts[0], parts[1]);
    let b = |k: &str| B64.decode(key[k].as_str().unwrap()).unwrap();
    match header["alg"].as_str().unwrap() {
        "ES256" => {
            assert_eq!((key["kty"].as_str(), key["crv"].as_str()), (Some("EC"), Some("P-256")));
            let mut point = vec![4u8];
            point.extend(b("x"));
            point.extend(b("y"));
            aws_lc_rs::signature::UnparsedPublicKey::new(&aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED, &point)
                .verify(msg.as_bytes(), &sig)
                .expect("ES256 signature");
        }
        "RS256" => {
            assert_eq!(key["kty"], "RSA");
            let (n, ex) = (b("n"), b("e"));
            aws_lc_rs::signature::RsaPublicKeyComponents { n: &n, e: &ex }
                .verify(&aws_lc_rs::signature::RSA_PKCS1_2048_8192_SHA256, msg.as_bytes(), &sig)
                .expect("RS256 signature");
        }
        other => panic!("unexpected alg {other}"),
    }
    (header, body)
}

fn b32_decode(s: &str) -> Vec<u8> {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let (mut buf, mut bits, mut out) = (0u32, 0u32, Vec::new());
    for c in s.bytes().filter(|c| !c.is_ascii_whitespace()) {
        let v = A.iter().position(|a| *a == c).unwrap_or_else(|| panic!("not base32: {s}"));
        buf = (buf << 5) | u32::try_from(v).unwrap();
        bits += 5;
        if bits >= 8 {
            bits -= 8;
            out.push(u8::try_from((buf >> bits) & 0xff).unwrap());
            buf &= (1 << bits) - 1;
        }
    }
    out
}

fn totp_code(secret: &[u8], step: i64) -> String {
    format!("{:06}", totp::hotp(secret, u64::try_from(step).unwrap()))
}

// ---- the fixture -----------------------------------------------------------------------------

/// Organisation `acme` with service `payments`; Ann (`payments:reader`); the applications:
/// `web` (confidential, first party, RS256 ID tokens), `spa` (public, first party, ES256),
/// `partner` (confidential, not first party) and `worker` (client_credentials only).
struct Fx {
    e: Env,
    admin: String,
    ann: String,
    web: Client,
    spa: Client,
    partner: Client,
    worker: Client,
}

async fn app(e: &Env, admin: &str, body: Value, redirect_uri: &'static str) -> Client {
    let (s, v) = api(e, "POST", "/api/v1/organisations/acme/applications", admin, Some(body)).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    Client {
        id: v["client_id"].as_str().unwrap().to_owned(),
        secret: v["client_secret"].as_str().map(str::to_owned),
        redirect_uri,
    }
}

async fn fx() -> Fx {
    let e = env_with(|s| s.signing_algorithms = vec![Algorithm::ES256, Algorithm::RS256]).await;
    let admin = admin_token(&e).await;
    let (s, v) = api(&e, "POST", "/api/v1/organisations", &admin, Some(json!({"slug": "acme", "name": "Acme"}))).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let svc = json!({
        "slug": "payments", "name": "Payments", "audience": PAYMENTS_AUD,
        "scopes": ["payments/read"], "roles": ["payments:reader", "payments:admin"],
        "permissions": ["payments.entry.read"], "grants": {"payments:reader": ["payments.entry.read"]},
    });
    let (s, v) = api(&e, "POST", "/api/v1/organisations/acme/services", &admin, Some(svc)).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let user = json!({"email": ANN, "name": ANN_NAME, "password": PW, "roles": ["payments:reader"]});
    let (s, v) = api(&e, "POST", "/api/v1/organisations/acme/users", &admin, Some(user)).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let ann = v["id"].as_str().unwrap().to_owned();
    let web = app(
        &e,
        &admin,
        json!({
            "slug": "web", "name": "Acme Web", "scopes": ["payments/read"],
            "grant_types": ["authorization_code", "refresh_token"],
            "token_endpoint_auth_method": "client_secret_basic",
            "redirect_uris": [WEB_CB], "first_party": true,
            "id_token_signed_response_alg": "RS256",
            "post_logout_redirect_uris": [WEB_LOGGED_OUT],
        }),
        WEB_CB,
    )
    .await;
    assert!(web.secret.is_some());
    let spa = app(
        &e,
        &admin,
        json!({
            "slug": "spa", "name": "Acme SPA", "scopes": ["payments/read"],
            "grant_types": ["authorization_code", "refresh_token"],
            "token_endpoint_auth_method": "none",
            "redirect_uris": [SPA_CB], "first_party": true,
            "id_token_signed_response_alg": "ES256",
        }),
        SPA_CB,
    )
    .await;
    assert!(spa.secret.is_none(), "a public client has no secret");
    let partner = app(
        &e,
        &admin,
        json!({
            "slug": "partner", "name": "Partner Portal", "scopes": ["payments/read"],
            "grant_types": ["authorization_code", "refresh_token"],
            "redirect_uris": [PARTNER_CB], "first_party": false,
            "id_token_signed_response_alg": "ES256",
        }),
        PARTNER_CB,
    )
    .await;
    let worker = app(
        &e,
        &admin,
        json!({"slug": "worker", "name": "Worker", "scopes": ["payments/read"], "roles": ["payments:reader"]}),
        WEB_CB,
    )
    .await;
    Fx { e, admin, ann, web, spa, partner, worker }
}

// ---- the authorization request ---------------------------------------------------------------

struct Pkce {
    verifier: String,
    challenge: String,
}

fn pkce() -> Pkce {
    let mut b = [0u8; 32];
    aws_lc_rs::rand::fill(&mut b).unwrap();
    let verifier = B64.encode(b);
    let challenge = B64.encode(sha256(verifier.as_bytes()));
    Pkce { verifier, challenge }
}

/// The parameters of an authorization request.
#[derive(Clone)]
struct Authz(Vec<(String, String)>);

impl Authz {
    fn new(c: &Client, p: Option<&Pkce>) -> Self {
        let mut v: Vec<(String, String)> = [
            ("response_type", "code"),
            ("client_id", c.id.as_str()),
            ("redirect_uri", c.redirect_uri),
            ("scope", SCOPE),
            ("state", STATE),
            ("nonce", NONCE),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
        if let Some(p) = p {
            v.push(("code_challenge".into(), p.challenge.clone()));
            v.push(("code_challenge_method".into(), "S256".into()));
        }
        Authz(v)
    }

    fn set(mut self, k: &str, v: &str) -> Self {
        self.0.retain(|(n, _)| n != k);
        self.0.push((k.to_owned(), v.to_owned()));
        self
    }

    fn del(mut self, k: &str) -> Self {
        self.0.retain(|(n, _)| n != k);
        self
    }

    fn path(&self) -> String {
        format!("/oauth2/authorize?{}", form_urlencoded::Serializer::new(String::new()).extend_pairs(&self.0).finish())
    }
}

/// The parameters of a 303 to the client's `redirect_uri` (each exactly once).
#[track_caller]
fn client_redirect(p: &Page, redirect_uri: &str) -> BTreeMap<String, String> {
    let loc = p.see_other();
    let q = loc
        .strip_prefix(redirect_uri)
        .and_then(|r| r.strip_prefix('?'))
        .unwrap_or_else(|| panic!("{}: expected a redirect to {redirect_uri}, got {loc}", p.what));
    let mut out = BTreeMap::new();
    for (k, v) in form_urlencoded::parse(q.as_bytes()).into_owned() {
        assert!(out.insert(k.clone(), v).is_none(), "{k} twice in {loc}");
    }
    out
}

/// An error sent to the client: `error`, `error_description`, `state` and `iss`, no `code`.
#[track_caller]
fn assert_client_error(p: &Page, redirect_uri: &str, error: &str) {
    let q = client_redirect(p, redirect_uri);
    assert_eq!(q.get("error").map(String::as_str), Some(error), "{q:?}");
    assert!(q.get("error_description").is_some_and(|d| !d.is_empty()), "{q:?}");
    assert_eq!(q.get("state").map(String::as_str), Some(STATE), "{q:?}");
    assert_eq!(q.get("iss").map(String::as_str), Some(ISS), "{q:?}");
    assert!(!q.contains_key("code"), "{q:?}");
}

/// From a response that sent the browser to `/login`: the sign-in page, the password, the
/// emailed code. Returns the response of the resumed request (`return_to`), not followed.
async fn sign_in(b: &mut Browser, e: &Env, to_login: &Page, email: &str, password: &str) -> Page {
    let loc = to_login.see_other().to_owned();
    assert!(loc.starts_with("/login?"), "{}: expected /login, got {loc}", to_login.what);
    let login = b.get(&loc).await;
    assert_eq!(login.status, StatusCode::OK, "{}", login.snippet());
    let return_to = login.hidden("return_to");
    let before = mails_to(e, email).await.len();
    let r = b
        .post(
            "/login",
            &[
                ("email", email),
                ("password", password),
                ("csrf_token", &login.hidden("csrf_token")),
                ("return_to", &return_to),
            ],
        )
        .await;
    let next = r.see_other().to_owned();
    assert!(next.starts_with("/login/code?"), "{next}");
    assert!(b.cookie(SSO).is_some(), "POST /login sets the SSO cookie");
    let page = b.get(&next).await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.snippet());
    assert_eq!(page.hidden("return_to"), return_to);
    let mails = mails_to(e, email).await;
    assert_eq!(mails.len(), before + 1, "one mail with the code");
    let code = code_in(mails.last().unwrap()).unwrap();
    let r = b
        .post("/login/code", &[("code", &code), ("csrf_token", &page.hidden("csrf_token")), ("return_to", &return_to)])
        .await;
    assert_eq!(r.see_other(), return_to, "back to where the sign-in started");
    b.get(&return_to).await
}

/// Runs the authorization request, signing in with the emailed code if the browser is sent to
/// `/login`; returns the parameters the client receives.
async fn authorize(b: &mut Browser, e: &Env, c: &Client, a: &Authz) -> BTreeMap<String, String> {
    let r = b.get(&a.path()).await;
    let r = if r.location().is_some_and(|l| l.starts_with("/login?")) { sign_in(b, e, &r, ANN, PW).await } else { r };
    client_redirect(&r, c.redirect_uri)
}

/// A code for `a` (state and iss checked).
async fn code_for(b: &mut Browser, e: &Env, c: &Client, a: &Authz) -> String {
    let q = authorize(b, e, c, a).await;
    assert_eq!(q.get("state").map(String::as_str), Some(STATE), "{q:?}");
    assert_eq!(q.get("iss").map(String::as_str), Some(ISS), "{q:?}");
    q.get("code").unwrap_or_else(|| panic!("no code: {q:?}")).clone()
}

/// A signed-in browser and the tokens of a first code flow with `web`.
async fn signed_in_with_tokens(f: &Fx) -> (Browser, Value) {
    let mut b = Browser::new(&f.e);
    let p = pkce();
    let code = code_for(&mut b, &f.e, &f.web, &Authz::new(&f.web, Some(&p))).await;
    let r = redeem(&f.e, &f.web, &code, Some(&p.verifier)).await;
    assert_eq!(r.0, StatusCode::OK, "{}", r.1);
    (b, r.1)
}

fn s(v: &Value, k: &str) -> String {
    v[k].as_str().unwrap_or_else(|| panic!("no string {k:?} in {v}")).to_owned()
}

// ---- 1. the code flow ------------------------------------------------------------------------

#[tokio::test]
async fn the_code_flow_with_pkce_issues_a_verified_id_token_and_an_access_token_with_roles() {
    let f = fx().await;
    let e = &f.e;
    let mut b = Browser::new(e);
    let p = pkce();
    let a = Authz::new(&f.web, Some(&p));

    // No session: to the sign-in page, which comes back to this request.
    let r = b.get(&a.path()).await;
    let loc = r.see_other().to_owned();
    assert!(loc.starts_with("/login?"), "{loc}");
    assert!(r.location().is_some_and(|l| !l.contains("code=")));
    let login = b.get(&loc).await;
    assert_eq!(login.status, StatusCode::OK);
    let return_to = login.hidden("return_to");
    assert!(return_to.starts_with("/oauth2/authorize?"), "{return_to}");
    assert!(return_to.contains(&format!("code_challenge={}", p.challenge)), "{return_to}");
    let csrf = login.hidden("csrf_token");
    assert!(b.cookie(CSRF).is_some(), "the page set the CSRF cookie");

    // The password: on to the emailed code.
    let t0 = e.clock.now();
    let r =
        b.post("/login", &[("email", ANN), ("password", PW), ("csrf_token", &csrf), ("return_to", &return_to)]).await;
    let next = r.see_other().to_owned();
    assert!(next.starts_with("/login/code?return_to="), "{next}");
    assert!(b.cookie(SSO).is_some());
    // A pending session does not sign anyone in yet.
    let mut early = b.clone();
    let pending = early.get(&a.clone().set("prompt", "none").path()).await;
    assert_client_error(&pending, WEB_CB, "login_required");

    let page = b.get(&next).await;
    assert_eq!(page.status, StatusCode::OK);
    let mails = mails_to(e, ANN).await;
    assert_eq!(mails.len(), 1);
    let code = code_in(&mails[0]).unwrap();
    let wrong = if code == "000000" { "111111" } else { "000000" };
    let r = b
        .post("/login/code", &[("code", wrong), ("csrf_token", &page.hidden("csrf_token")), ("return_to", &return_to)])
        .await;
    assert!(r.status.is_client_error() && r.location().is_none(), "a wrong code: {}", r.snippet());
    let r = b
        .post("/login/code", &[("code", &code), ("csrf_token", &page.hidden("csrf_token")), ("return_to", &return_to)])
        .await;
    assert_eq!(r.see_other(), return_to);

    // Back at the authorization endpoint: the code, the state and the issuer.
    let r = b.get(&return_to).await;
    let q = client_redirect(&r, WEB_CB);
    assert_eq!(q.keys().map(String::as_str).collect::<Vec<_>>(), ["code", "iss", "state"], "{q:?}");
    assert_eq!(q["state"], STATE);
    assert_eq!(q["iss"], ISS);
    let code = q["code"].clone();
    assert!(code.len() >= 43, "256-bit codes: {code}");

    // The token exchange.
    let (st, t) = redeem(e, &f.web, &code, Some(&p.verifier)).await;
    assert_eq!(st, StatusCode::OK, "{t}");
    assert_eq!(t["token_type"], "Bearer");
    let at = s(&t, "access_token");
    let id = s(&t, "id_token");
    assert!(t["refresh_token"].is_string(), "offline_access was asked: {t}");
    let now = e.clock.now();

    // The ID token.
    let (h, c) = verify_jwt(e, &id, "JWT").await;
    assert_eq!(h["alg"], "RS256", "the client's id_token_signed_response_alg");
    assert_eq!(c["iss"], ISS);
    assert_eq!(c["sub"], f.ann.as_str());
    assert_eq!(c["aud"], f.web.id.as_str());
    assert_eq!(c["azp"], f.web.id.as_str());
    assert_eq!(c["iat"], now);
    assert_eq!(c["exp"], now + 600);
    assert_eq!(c["auth_time"], t0);
    assert_eq!(c["nonce"], NONCE);
    let expected_at_hash = B64.encode(&sha256(at.as_bytes())[..16]);
    assert_eq!(c["at_hash"], expected_at_hash.as_str());
    assert_eq!(c["amr"], json!(["pwd", "otp", "mfa"]));
    assert_eq!(c["acr"], ACR);
    assert!(c["sid"].as_str().is_some_and(|sid| !sid.is_empty()), "{c}");
    assert_eq!(c["email"], ANN);
    assert!(c["email_verified"].is_boolean(), "{c}");
    assert_eq!(c["name"], ANN_NAME);
    assert_eq!(c["preferred_username"], ANN);

    // The access token.
    let (h, c) = verify_jwt(e, &at, "at+jwt").await;
    assert_eq!(h["alg"], "ES256");
    assert_eq!(c["iss"], ISS);
    assert_eq!(c["sub"], f.ann.as_str());
    assert_eq!(c["client_id"], f.web.id.as_str());
    assert_eq!(c["roles"], json!(["payments:reader"]));
    assert_eq!(c["org"], "acme");
    let scopes: BTreeSet<&str> = c["scope"].as_str().unwrap().split(' ').collect();
    assert_eq!(scopes, SCOPE.split(' ').collect::<BTreeSet<_>>());
    let aud: Vec<Value> = match &c["aud"] {
        Value::Array(a) => a.clone(),
        v => vec![v.clone()],
    };
    assert_eq!(aud, vec![json!(PAYMENTS_AUD)], "the audience of the service the scope and role name");
    assert_eq!(c["iat"], now);
    assert_eq!(t["expires_in"].as_i64().unwrap(), c["exp"].as_i64().unwrap() - now);
    assert!(active(e, &f.web, &at).await);

    // A second application of the organisation: the SSO cookie skips the sign-in.
    let p2 = pkce();
    let r = b.get(&Authz::new(&f.spa, Some(&p2)).path()).await;
    let q = client_redirect(&r, SPA_CB);
    let (st, t2) = redeem(e, &f.spa, &q["code"], Some(&p2.verifier)).await;
    assert_eq!(st, StatusCode::OK, "{t2}");
    let (h2, c2) = verify_jwt(e, t2["id_token"].as_str().unwrap(), "JWT").await;
    assert_eq!(h2["alg"], "ES256");
    assert_eq!(c2["aud"], f.spa.id.as_str());
    assert_eq!(c2["sub"], f.ann.as_str());
    assert_eq!(c2["auth_time"], t0, "the same sign-in");
    let web_sid = claims(&id)["sid"].clone();
    assert_eq!(c2["sid"], web_sid, "the same SSO session");
    assert_eq!(mails_to(e, ANN).await.len(), 1, "no second sign-in");
}

// ---- 2. and 3. codes -------------------------------------------------------------------------

#[tokio::test]
async fn a_code_expires_after_60_seconds() {
    let f = fx().await;
    let mut b = Browser::new(&f.e);
    let p = pkce();
    let code = code_for(&mut b, &f.e, &f.web, &Authz::new(&f.web, Some(&p))).await;
    f.e.clock.advance(61);
    assert_oauth_error(&redeem(&f.e, &f.web, &code, Some(&p.verifier)).await, "invalid_grant");

    // Within 60 s it works (the same browser, a new code).
    let p = pkce();
    let code = code_for(&mut b, &f.e, &f.web, &Authz::new(&f.web, Some(&p))).await;
    f.e.clock.advance(59);
    let r = redeem(&f.e, &f.web, &code, Some(&p.verifier)).await;
    assert_eq!(r.0, StatusCode::OK, "{}", r.1);
}

#[tokio::test]
async fn a_replayed_code_is_refused_and_revokes_what_the_first_redemption_issued() {
    let f = fx().await;
    let e = &f.e;
    let mut b = Browser::new(e);
    let p = pkce();
    let code = code_for(&mut b, e, &f.web, &Authz::new(&f.web, Some(&p))).await;
    let (st, t) = redeem(e, &f.web, &code, Some(&p.verifier)).await;
    assert_eq!(st, StatusCode::OK, "{t}");
    let at = s(&t, "access_token");
    let rt = s(&t, "refresh_token");
    assert!(active(e, &f.web, &at).await);
    assert_eq!(userinfo(e, &at).await.0, StatusCode::OK);

    assert_oauth_error(&redeem(e, &f.web, &code, Some(&p.verifier)).await, "invalid_grant");
    assert!(!active(e, &f.web, &at).await, "the first access token is revoked");
    assert_eq!(userinfo(e, &at).await.0, StatusCode::UNAUTHORIZED);
    assert_oauth_error(&refresh(e, &f.web, &rt).await, "invalid_grant");
}

#[tokio::test]
async fn a_code_is_bound_to_its_client_and_redirect_uri() {
    let f = fx().await;
    let e = &f.e;
    let (mut b, _) = signed_in_with_tokens(&f).await;
    let p = pkce();
    let code = code_for(&mut b, e, &f.web, &Authz::new(&f.web, Some(&p))).await;
    let other = Client { redirect_uri: WEB_CB, ..f.partner.clone() };
    assert_oauth_error(&redeem(e, &other, &code, Some(&p.verifier)).await, "invalid_grant");
    let elsewhere = Client { redirect_uri: "https://app.acme.test/cb/", ..f.web.clone() };
    assert_oauth_error(&redeem(e, &elsewhere, &code, Some(&p.verifier)).await, "invalid_grant");
    let r = redeem(e, &f.web, &code, Some(&p.verifier)).await;
    assert_eq!(r.0, StatusCode::OK, "{}", r.1);
}

#[tokio::test]
async fn other_authorization_request_errors_go_to_the_client() {
    let f = fx().await;
    let (mut b, _) = signed_in_with_tokens(&f).await;
    let p = pkce();
    let a = Authz::new(&f.web, Some(&p));
    assert_client_error(
        &b.get(&a.clone().set("response_type", "token").path()).await,
        WEB_CB,
        "unsupported_response_type",
    );
    assert_client_error(&b.get(&a.clone().del("response_type").path()).await, WEB_CB, "invalid_request");
    assert_client_error(&b.get(&a.clone().set("scope", "openid ledger/write").path()).await, WEB_CB, "invalid_scope");
    let mut dup = a.clone();
    dup.0.push(("nonce".into(), "another".into()));
    assert_client_error(&b.get(&dup.path()).await, WEB_CB, "invalid_request");
    assert_client_error(&b.get(&a.clone().set("prompt", "none login").path()).await, WEB_CB, "invalid_request");
    // Ignored parameters are ignored.
    let r = b
        .get(&a.clone().set("ui_locales", "de").set("display", "popup").set("acr_values", "x").set("foo", "bar").path())
        .await;
    assert!(client_redirect(&r, WEB_CB).contains_key("code"), "{}", r.snippet());
}

// ---- 4. refresh tokens -----------------------------------------------------------------------

#[tokio::test]
async fn refresh_tokens_rotate_a_reused_one_revokes_the_family_and_they_are_bound_to_the_client() {
    let f = fx().await;
    let e = &f.e;
    let (mut b, t) = signed_in_with_tokens(&f).await;
    let rt1 = s(&t, "refresh_token");
    let (st, t2) = refresh(e, &f.web, &rt1).await;
    assert_eq!(st, StatusCode::OK, "{t2}");
    let rt2 = s(&t2, "refresh_token");
    assert_ne!(rt2, rt1, "rotated");
    let at2 = s(&t2, "access_token");
    assert_ne!(at2, s(&t, "access_token"));
    assert_eq!(claims(&at2)["roles"], json!(["payments:reader"]));
    assert_eq!(userinfo(e, &at2).await.0, StatusCode::OK);
    if let Some(id) = t2["id_token"].as_str() {
        let (_, c) = verify_jwt(e, id, "JWT").await;
        assert_eq!(c["sub"], f.ann.as_str());
        assert_eq!(c["sid"], claims(&s(&t, "id_token"))["sid"]);
    }

    // Reusing the old one: refused, and the newest one dies with it.
    assert_oauth_error(&refresh(e, &f.web, &rt1).await, "invalid_grant");
    assert_oauth_error(&refresh(e, &f.web, &rt2).await, "invalid_grant");

    // Another client's credentials (confidential, or public) with a live refresh token.
    let p = pkce();
    let code = code_for(&mut b, e, &f.web, &Authz::new(&f.web, Some(&p))).await;
    let (st, t3) = redeem(e, &f.web, &code, Some(&p.verifier)).await;
    assert_eq!(st, StatusCode::OK, "{t3}");
    let rt3 = s(&t3, "refresh_token");
    assert_oauth_error(&refresh(e, &f.partner, &rt3).await, "invalid_grant");
    assert_oauth_error(&refresh(e, &f.spa, &rt3).await, "invalid_grant");
}

/// A refresh token never outlives the SSO session it was issued in: once the session's
/// absolute lifetime is over, refresh fails even though the token's own 30 days are not.
#[tokio::test]
async fn refresh_tokens_end_with_their_session_lifetime() {
    let f = fx().await;
    let e = &f.e;
    let (_, t) = signed_in_with_tokens(&f).await;
    let lifetime = e.core.settings().auth.session_lifetime;
    // Kept alive (no idle timeout) until just before the end: still refreshes.
    let (st, t2) = refresh(e, &f.web, &s(&t, "refresh_token")).await;
    assert_eq!(st, StatusCode::OK, "{t2}");
    e.clock.advance(lifetime + 1);
    assert_oauth_error(&refresh(e, &f.web, &s(&t2, "refresh_token")).await, "invalid_grant");
}

// ---- 5. PKCE ---------------------------------------------------------------------------------

#[tokio::test]
async fn pkce_only_s256_and_the_verifier_is_required_and_checked() {
    let f = fx().await;
    let e = &f.e;
    let (mut b, _) = signed_in_with_tokens(&f).await;
    let p = pkce();

    // plain is never accepted.
    let plain = Authz::new(&f.web, None).set("code_challenge", &p.verifier).set("code_challenge_method", "plain");
    assert_client_error(&b.get(&plain.path()).await, WEB_CB, "invalid_request");
    let plain = Authz::new(&f.spa, None).set("code_challenge", &p.verifier).set("code_challenge_method", "plain");
    assert_client_error(&b.get(&plain.path()).await, SPA_CB, "invalid_request");

    // A public client must send a challenge.
    assert_client_error(&b.get(&Authz::new(&f.spa, None).path()).await, SPA_CB, "invalid_request");

    // A challenge was sent: the verifier is required …
    let code = code_for(&mut b, e, &f.web, &Authz::new(&f.web, Some(&p))).await;
    assert_oauth_error(&redeem(e, &f.web, &code, None).await, "invalid_grant");
    // … and must match.
    let code = code_for(&mut b, e, &f.web, &Authz::new(&f.web, Some(&p))).await;
    assert_oauth_error(&redeem(e, &f.web, &code, Some(&pkce().verifier)).await, "invalid_grant");
    // The public client with the right verifier and only its client_id.
    let code = code_for(&mut b, e, &f.spa, &Authz::new(&f.spa, Some(&p))).await;
    assert_oauth_error(&redeem(e, &f.spa, &code, Some(&pkce().verifier)).await, "invalid_grant");
    let code = code_for(&mut b, e, &f.spa, &Authz::new(&f.spa, Some(&p))).await;
    let r = redeem(e, &f.spa, &code, Some(&p.verifier)).await;
    assert_eq!(r.0, StatusCode::OK, "{}", r.1);
    verify_jwt(e, r.1["id_token"].as_str().unwrap(), "JWT").await;
    // No challenge, but a verifier: refused too (required if and only if a challenge was sent).
    let code = code_for(&mut b, e, &f.web, &Authz::new(&f.web, None)).await;
    assert_oauth_error(&redeem(e, &f.web, &code, Some(&p.verifier)).await, "invalid_grant");
    // A confidential client may go without PKCE.
    let code = code_for(&mut b, e, &f.web, &Authz::new(&f.web, None)).await;
    let r = redeem(e, &f.web, &code, None).await;
    assert_eq!(r.0, StatusCode::OK, "{}", r.1);
}

// ---- 6. redirect URIs ------------------------------------------------------------------------

#[tokio::test]
async fn redirect_uri_near_misses_and_unknown_clients_get_an_error_page_not_a_redirect() {
    let f = fx().await;
    let (mut b, _) = signed_in_with_tokens(&f).await;
    for bad in [
        "https://app.acme.test/cb/",
        "https://APP.acme.test/cb",
        "https://app.acme.test/CB",
        "https://app.acme.test/cb?x=1",
        "https://app.acme.test/cb/..;/cb",
        "https://app.acme.test/x/..;/cb",
        "https://app.acme.test%40evil.test/cb",
        "https://app.acme.test@evil.test/cb",
        "https://app.acme.test/%63b",
        "https://app.acme.test:443/cb",
        "https://app.acme.test/cb#frag",
        "https://evil.test/cb",
        "http://app.acme.test/cb",
        "",
    ] {
        let r = b.get(&Authz::new(&f.web, Some(&pkce())).set("redirect_uri", bad).path()).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad:?}: {}", r.snippet());
        r.assert_error_page(StatusCode::BAD_REQUEST);
        assert!(!r.body.contains("code="), "{bad:?}");
    }
    for client_id in ["acme$nope", "nope", "", "acme$web$x"] {
        let r = b.get(&Authz::new(&f.web, Some(&pkce())).set("client_id", client_id).path()).await;
        r.assert_error_page(StatusCode::BAD_REQUEST);
    }
    let r = b.get(&Authz::new(&f.web, Some(&pkce())).del("client_id").path()).await;
    r.assert_error_page(StatusCode::BAD_REQUEST);
    // A client that may not use the code flow.
    let r = b.get(&Authz::new(&f.worker, Some(&pkce())).path()).await;
    r.assert_error_page(StatusCode::BAD_REQUEST);
    // No redirect_uri: fine with one registered, an error page with several.
    let r = b.get(&Authz::new(&f.web, None).del("redirect_uri").path()).await;
    assert!(client_redirect(&r, WEB_CB).contains_key("code"), "{}", r.snippet());
    let (st, v) = api(
        &f.e,
        "PATCH",
        "/api/v1/organisations/acme/applications/partner",
        &f.admin,
        Some(json!({"redirect_uris": [PARTNER_CB, "https://partner.test/cb2"]})),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let r = b.get(&Authz::new(&f.partner, Some(&pkce())).del("redirect_uri").path()).await;
    r.assert_error_page(StatusCode::BAD_REQUEST);
    // The exact URI works (the same browser, signed in).
    let r = b.get(&Authz::new(&f.web, Some(&pkce())).path()).await;
    assert!(client_redirect(&r, WEB_CB).contains_key("code"));
}

// ---- 7. prompt=none and consent --------------------------------------------------------------

#[tokio::test]
async fn prompt_none_and_the_consent_page() {
    let f = fx().await;
    let e = &f.e;
    let mut b = Browser::new(e);
    let p = pkce();

    // No session.
    let none = Authz::new(&f.partner, Some(&p)).set("prompt", "none");
    assert_client_error(&b.get(&none.path()).await, PARTNER_CB, "login_required");
    let r = b.get(&Authz::new(&f.web, Some(&p)).set("prompt", "none").path()).await;
    assert_client_error(&r, WEB_CB, "login_required");

    // Signed in (through the first-party client: no consent there).
    let code = code_for(&mut b, e, &f.web, &Authz::new(&f.web, Some(&p))).await;
    assert!(!code.is_empty());
    let r = b.get(&Authz::new(&f.web, Some(&p)).set("prompt", "none").path()).await;
    assert!(client_redirect(&r, WEB_CB).contains_key("code"), "first party: no consent");

    // The partner has no consent yet.
    assert_client_error(&b.get(&none.path()).await, PARTNER_CB, "consent_required");
    let narrow = Authz::new(&f.partner, Some(&p)).set("scope", "openid email");
    let consent = b.get(&narrow.path()).await;
    assert_eq!(consent.status, StatusCode::OK, "{}", consent.snippet());
    assert!(consent.body.contains("Partner Portal"), "the application is named");
    assert!(consent.body.contains("action=\"/oauth2/consent\""));
    let request = consent.hidden("request");
    let csrf = consent.hidden("csrf_token");

    // Another browser's CSRF token: refused.
    let mut other = Browser::new(e);
    let other_csrf = other.get("/login").await.hidden("csrf_token");
    assert_ne!(other_csrf, csrf);
    let r =
        b.post("/oauth2/consent", &[("request", &request), ("csrf_token", &other_csrf), ("decision", "allow")]).await;
    r.assert_error_page(StatusCode::FORBIDDEN);

    // Deny.
    let r = b.post("/oauth2/consent", &[("request", &request), ("csrf_token", &csrf), ("decision", "deny")]).await;
    assert_client_error(&r, PARTNER_CB, "access_denied");
    // Not remembered: asked again; allow.
    let consent = b.get(&narrow.path()).await;
    assert_eq!(consent.status, StatusCode::OK, "a denial is not remembered: {}", consent.snippet());
    let r = b
        .post(
            "/oauth2/consent",
            &[
                ("request", &consent.hidden("request")),
                ("csrf_token", &consent.hidden("csrf_token")),
                ("decision", "allow"),
            ],
        )
        .await;
    let q = client_redirect(&r, PARTNER_CB);
    assert_eq!(q.get("state").map(String::as_str), Some(STATE));
    assert_eq!(q.get("iss").map(String::as_str), Some(ISS));
    let (st, t) = redeem(e, &f.partner, &q["code"], Some(&p.verifier)).await;
    assert_eq!(st, StatusCode::OK, "{t}");
    let (_, c) = verify_jwt(e, t["id_token"].as_str().unwrap(), "JWT").await;
    assert_eq!(c["aud"], f.partner.id.as_str());

    // Remembered: no consent page the second time, and prompt=none works.
    let r = b.get(&narrow.path()).await;
    assert!(client_redirect(&r, PARTNER_CB).contains_key("code"), "{}", r.snippet());
    let r = b.get(&narrow.clone().set("prompt", "none").path()).await;
    assert!(client_redirect(&r, PARTNER_CB).contains_key("code"));
    // … for that scope set: more scopes ask again.
    assert_client_error(&b.get(&none.path()).await, PARTNER_CB, "consent_required");
    let r = b.get(&Authz::new(&f.partner, Some(&p)).path()).await;
    assert_eq!(r.status, StatusCode::OK, "wider scopes need a new consent: {}", r.snippet());
    assert!(r.fields("decision").contains(&"allow".to_owned()));
}

// ---- 8. prompt=login and max_age -------------------------------------------------------------

#[tokio::test]
async fn prompt_login_and_max_age_force_a_new_sign_in() {
    let f = fx().await;
    let e = &f.e;
    let (mut b, t) = signed_in_with_tokens(&f).await;
    let t0 = claims(&s(&t, "id_token"))["auth_time"].as_i64().unwrap();
    assert_eq!(t0, e.clock.now());
    f.e.clock.advance(120);

    // A max_age the sign-in is within: no new sign-in.
    let p = pkce();
    let a = Authz::new(&f.web, Some(&p)).set("max_age", "600");
    let r = b.get(&a.path()).await;
    let code = client_redirect(&r, WEB_CB)["code"].clone();
    let (_, t) = redeem(e, &f.web, &code, Some(&p.verifier)).await;
    assert_eq!(claims(&s(&t, "id_token"))["auth_time"], t0);

    // Older than max_age: the sign-in page again.
    let a = Authz::new(&f.web, Some(&p)).set("max_age", "60");
    let r = b.get(&a.path()).await;
    assert!(r.see_other().starts_with("/login?"), "{:?}", r.location());
    let r = sign_in(&mut b, e, &r, ANN, PW).await;
    let code = client_redirect(&r, WEB_CB)["code"].clone();
    let (st, t) = redeem(e, &f.web, &code, Some(&p.verifier)).await;
    assert_eq!(st, StatusCode::OK, "{t}");
    let t1 = e.clock.now();
    assert_eq!(claims(&s(&t, "id_token"))["auth_time"], t1, "the new sign-in");

    // prompt=login, with a fresh session: the sign-in page again.
    f.e.clock.advance(5);
    let a = Authz::new(&f.web, Some(&p)).set("prompt", "login");
    let r = b.get(&a.path()).await;
    assert!(r.see_other().starts_with("/login?"), "{:?}", r.location());
    let r = sign_in(&mut b, e, &r, ANN, PW).await;
    let code = client_redirect(&r, WEB_CB)["code"].clone();
    let (st, t) = redeem(e, &f.web, &code, Some(&p.verifier)).await;
    assert_eq!(st, StatusCode::OK, "{t}");
    assert_eq!(claims(&s(&t, "id_token"))["auth_time"], t1 + 5);
    // Without prompt=login the new session is used as is.
    let r = b.get(&Authz::new(&f.web, Some(&p)).path()).await;
    assert!(client_redirect(&r, WEB_CB).contains_key("code"));
}

// ---- 9. TOTP ---------------------------------------------------------------------------------

/// Password step of a sign-in for `web` in a new browser; returns the browser and the
/// second-factor page it was sent to.
async fn password_step(f: &Fx) -> (Browser, String, Page) {
    let mut b = Browser::new(&f.e);
    let r = b.get(&Authz::new(&f.web, None).path()).await;
    let login = b.get(r.see_other()).await;
    let return_to = login.hidden("return_to");
    let r = b
        .post(
            "/login",
            &[("email", ANN), ("password", PW), ("csrf_token", &login.hidden("csrf_token")), ("return_to", &return_to)],
        )
        .await;
    let next = r.see_other().to_owned();
    let page = b.get(&next).await;
    assert_eq!(page.status, StatusCode::OK);
    (b, next, page)
}

#[tokio::test]
async fn an_authenticator_app_is_enrolled_and_replaces_the_emailed_code() {
    let f = fx().await;
    let e = &f.e;
    let (mut b, _) = signed_in_with_tokens(&f).await;

    // Not signed in: to the sign-in page.
    let r = Browser::new(e).get("/account/totp").await;
    assert!(r.see_other().starts_with("/login?"), "{:?}", r.location());

    let page = b.get("/account/totp").await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.snippet());
    let i = page.body.find("aria-label=\"Setup key\">").expect("the secret is shown");
    let rest = &page.body[i + "aria-label=\"Setup key\">".len()..];
    let shown: String = rest[..rest.find("</code>").unwrap()].chars().filter(|c| !c.is_whitespace()).collect();
    let secret = b32_decode(&shown);
    assert_eq!(secret.len(), 20, "{shown}");
    assert_eq!(totp::base32(&secret), shown);
    assert!(unescape(&page.body).contains(&format!("secret={shown}")), "the otpauth URI carries the same secret");
    // Showing it again gives the same secret (the enrolment is pending).
    assert!(b.get("/account/totp").await.body.contains(&rest[..rest.find("</code>").unwrap()]));

    let s0 = totp::step(e.clock.now());
    let csrf = page.hidden("csrf_token");
    let wrong = totp_code(&secret, s0 + 5);
    let r = b.post("/account/totp", &[("code", &wrong), ("csrf_token", &csrf)]).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.snippet());
    let r = b.post("/account/totp", &[("code", &totp_code(&secret, s0)), ("csrf_token", &csrf)]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.snippet());
    assert!(r.body.contains("Authenticator app enrolled"), "{}", r.snippet());
    let account = b.get("/account").await;
    assert!(account.body.contains("An authenticator app is set up"), "{}", account.snippet());

    // The next sign-in asks for the app's code, and sends no mail.
    let mails_before = mails_to(e, ANN).await.len();
    let (mut b2, next, page) = password_step(&f).await;
    assert!(next.starts_with("/login/totp?"), "{next}");
    assert!(page.body.contains("action=\"/login/totp\""));
    let return_to = page.hidden("return_to");
    let csrf2 = page.hidden("csrf_token");
    // The code that confirmed the enrolment cannot be used again (same step).
    let r = b2
        .post("/login/totp", &[("code", &totp_code(&secret, s0)), ("csrf_token", &csrf2), ("return_to", &return_to)])
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "replay: {}", r.snippet());
    assert!(r.location().is_none());
    // The next step's code works.
    e.clock.advance(30);
    let s1 = totp::step(e.clock.now());
    assert_eq!(s1, s0 + 1);
    let r = b2
        .post("/login/totp", &[("code", &totp_code(&secret, s1)), ("csrf_token", &csrf2), ("return_to", &return_to)])
        .await;
    assert_eq!(r.see_other(), return_to, "{}", r.snippet());
    let r = b2.get(&return_to).await;
    let q = client_redirect(&r, WEB_CB);
    let (st, t) = redeem(e, &f.web, &q["code"], None).await;
    assert_eq!(st, StatusCode::OK, "{t}");
    assert_eq!(claims(&s(&t, "id_token"))["amr"], json!(["pwd", "otp", "mfa"]));

    // The same code again, in another sign-in: refused.
    let (mut b3, next, page) = password_step(&f).await;
    assert!(next.starts_with("/login/totp?"));
    let (rt3, c3) = (page.hidden("return_to"), page.hidden("csrf_token"));
    let r =
        b3.post("/login/totp", &[("code", &totp_code(&secret, s1)), ("csrf_token", &c3), ("return_to", &rt3)]).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "replay: {}", r.snippet());

    // Later: a code from 3 steps ago is outside the window (though never used) …
    e.clock.advance(150);
    let s6 = totp::step(e.clock.now());
    assert_eq!(s6, s1 + 5);
    let (mut b4, _, page) = password_step(&f).await;
    let (rt4, c4) = (page.hidden("return_to"), page.hidden("csrf_token"));
    let r = b4
        .post("/login/totp", &[("code", &totp_code(&secret, s6 - 3)), ("csrf_token", &c4), ("return_to", &rt4)])
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "3 steps old: {}", r.snippet());
    // … one step old is within it.
    let r = b4
        .post("/login/totp", &[("code", &totp_code(&secret, s6 - 1)), ("csrf_token", &c4), ("return_to", &rt4)])
        .await;
    assert_eq!(r.see_other(), rt4, "{}", r.snippet());

    assert_eq!(mails_to(e, ANN).await.len(), mails_before, "no mail with an authenticator app");
}

// ---- 10. RP-initiated logout -----------------------------------------------------------------

fn logout_path(pairs: &[(&str, &str)]) -> String {
    format!("/oauth2/logout?{}", form_urlencoded::Serializer::new(String::new()).extend_pairs(pairs).finish())
}

/// Whether the browser's SSO session still signs in (`prompt=none` gives a code).
async fn still_signed_in(b: &mut Browser, f: &Fx) -> bool {
    let r = b.get(&Authz::new(&f.web, None).set("prompt", "none").path()).await;
    let q = client_redirect(&r, WEB_CB);
    match q.get("error").map(String::as_str) {
        None => {
            assert!(q.contains_key("code"));
            true
        }
        Some("login_required") => false,
        Some(other) => panic!("unexpected error {other}"),
    }
}

#[tokio::test]
async fn rp_initiated_logout_with_a_hint_ends_the_session_and_a_bad_hint_never_redirects() {
    let f = fx().await;
    let e = &f.e;
    let (mut b, t) = signed_in_with_tokens(&f).await;
    let id = s(&t, "id_token");
    let rt = s(&t, "refresh_token");

    // A tampered signature, alg none: an error page, no redirect, the session lives on.
    let parts: Vec<&str> = id.split('.').collect();
    let sig = parts[2];
    let flipped = format!("{}{}", if sig.starts_with('A') { 'B' } else { 'A' }, &sig[1..]);
    let tampered = format!("{}.{}.{flipped}", parts[0], parts[1]);
    let header: Value = serde_json::from_slice(&B64.decode(parts[0]).unwrap()).unwrap();
    let none_header = B64.encode(json!({"alg": "none", "typ": "JWT", "kid": header["kid"]}).to_string());
    let mut forged_claims = claims(&id);
    forged_claims["sub"] = json!("someone-else");
    let forged_payload = B64.encode(forged_claims.to_string());
    for hint in [
        tampered,
        format!("{none_header}.{}.", parts[1]),
        format!("{none_header}.{forged_payload}."),
        format!("{none_header}.{}.{sig}", parts[1]),
        format!("{}.{forged_payload}.{sig}", parts[0]),
    ] {
        let r = b
            .get(&logout_path(&[
                ("id_token_hint", &hint),
                ("post_logout_redirect_uri", WEB_LOGGED_OUT),
                ("state", "bye"),
            ]))
            .await;
        r.assert_error_page(StatusCode::BAD_REQUEST);
        assert!(b.cookie(SSO).is_some());
    }
    // A valid hint, but an unregistered URI or one with an added query.
    for uri in [format!("{WEB_LOGGED_OUT}?x=1"), "https://evil.test/".to_owned(), format!("{WEB_LOGGED_OUT}/")] {
        let r = b.get(&logout_path(&[("id_token_hint", &id), ("post_logout_redirect_uri", &uri)])).await;
        r.assert_error_page(StatusCode::BAD_REQUEST);
    }
    assert!(still_signed_in(&mut b, &f).await, "nothing above ended the session");
    let old_sso = b.cookie(SSO).unwrap();

    // The real thing.
    let r = b
        .get(&logout_path(&[("id_token_hint", &id), ("post_logout_redirect_uri", WEB_LOGGED_OUT), ("state", "bye")]))
        .await;
    assert_eq!(r.see_other(), format!("{WEB_LOGGED_OUT}?state=bye"));
    assert!(b.cookie(SSO).is_none(), "the SSO cookie is deleted");

    // The old cookie no longer signs in: the sign-in page.
    let mut replay = Browser::new(e);
    replay.jar.insert(SSO.to_owned(), old_sso);
    let r = replay.get(&Authz::new(&f.web, Some(&pkce())).path()).await;
    assert!(r.see_other().starts_with("/login?"), "{:?}", r.location());
    assert!(!still_signed_in(&mut replay, &f).await);
    // The refresh token ended with the session.
    assert_oauth_error(&refresh(e, &f.web, &rt).await, "invalid_grant");
}

#[tokio::test]
async fn logout_without_a_hint_asks_for_a_csrf_protected_confirmation() {
    let f = fx().await;
    let e = &f.e;
    let (mut b, t) = signed_in_with_tokens(&f).await;
    let rt = s(&t, "refresh_token");
    let path = logout_path(&[("client_id", &f.web.id), ("post_logout_redirect_uri", WEB_LOGGED_OUT), ("state", "s2")]);
    let page = b.get(&path).await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.snippet());
    assert!(page.location().is_none());
    assert!(page.body.contains("action=\"/oauth2/logout\""));
    let csrf = page.hidden("csrf_token");
    assert_eq!(page.hidden("post_logout_redirect_uri"), WEB_LOGGED_OUT);
    assert!(still_signed_in(&mut b, &f).await, "asking ends nothing");

    let carried = [("client_id", f.web.id.as_str()), ("post_logout_redirect_uri", WEB_LOGGED_OUT), ("state", "s2")];
    // Without the CSRF token, or with another browser's: 403, still signed in.
    let r = b.post("/oauth2/logout", &carried).await;
    r.assert_error_page(StatusCode::FORBIDDEN);
    let other_csrf = Browser::new(e).get("/login").await.hidden("csrf_token");
    let mut with_other = carried.to_vec();
    with_other.push(("csrf_token", &other_csrf));
    let r = b.post("/oauth2/logout", &with_other).await;
    r.assert_error_page(StatusCode::FORBIDDEN);
    assert!(still_signed_in(&mut b, &f).await);
    assert_eq!(refresh(e, &f.web, &rt).await.0, StatusCode::OK);

    // Confirmed.
    let mut confirmed = carried.to_vec();
    confirmed.push(("csrf_token", &csrf));
    let old_sso = b.cookie(SSO).unwrap();
    let r = b.post("/oauth2/logout", &confirmed).await;
    assert_eq!(r.see_other(), format!("{WEB_LOGGED_OUT}?state=s2"));
    let mut replay = Browser::new(e);
    replay.jar.insert(SSO.to_owned(), old_sso);
    assert!(!still_signed_in(&mut replay, &f).await);
}

// ---- 11. back-channel logout -----------------------------------------------------------------

/// Records every call; the first `failures` fail.
struct FakeNotifier {
    failures: usize,
    calls: Mutex<Vec<(String, String)>>,
}

#[async_trait::async_trait]
impl LogoutNotifier for FakeNotifier {
    async fn notify(&self, uri: &str, logout_token: &str) -> Result<(), String> {
        let mut calls = self.calls.lock().unwrap();
        calls.push((uri.to_owned(), logout_token.to_owned()));
        if calls.len() <= self.failures { Err("503 Service Unavailable".into()) } else { Ok(()) }
    }
}

#[tokio::test]
async fn a_back_channel_logout_token_is_delivered_and_retried() {
    let f = fx().await;
    let e = &f.e;
    let bcl = "https://app.acme.test/backchannel";
    let (st, v) = api(
        e,
        "PATCH",
        "/api/v1/organisations/acme/applications/web",
        &f.admin,
        Some(json!({"backchannel_logout_uri": bcl})),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{v}");

    let (mut b, t) = signed_in_with_tokens(&f).await;
    let id = claims(&s(&t, "id_token"));
    // The session also signs in to the SPA, which registered no back-channel URI.
    let p = pkce();
    let code = code_for(&mut b, e, &f.spa, &Authz::new(&f.spa, Some(&p))).await;
    assert_eq!(redeem(e, &f.spa, &code, Some(&p.verifier)).await.0, StatusCode::OK);

    let fake = FakeNotifier { failures: 1, calls: Mutex::new(Vec::new()) };
    assert_eq!(e.core.deliver_logouts(&fake).await.unwrap(), 0);
    assert!(fake.calls.lock().unwrap().is_empty(), "nothing before the logout");

    let r = b
        .get(&logout_path(&[("id_token_hint", &s(&t, "id_token")), ("post_logout_redirect_uri", WEB_LOGGED_OUT)]))
        .await;
    assert_eq!(r.see_other(), WEB_LOGGED_OUT);

    // Round 1 fails; it is not retried before 10 s.
    assert_eq!(e.core.deliver_logouts(&fake).await.unwrap(), 0);
    assert_eq!(fake.calls.lock().unwrap().len(), 1);
    e.clock.advance(5);
    assert_eq!(e.core.deliver_logouts(&fake).await.unwrap(), 0);
    assert_eq!(fake.calls.lock().unwrap().len(), 1, "too early for the retry");
    // Round 2 delivers; then nothing more.
    e.clock.advance(6);
    assert_eq!(e.core.deliver_logouts(&fake).await.unwrap(), 1);
    assert_eq!(e.core.deliver_logouts(&fake).await.unwrap(), 0);
    e.clock.advance(3600);
    assert_eq!(e.core.deliver_logouts(&fake).await.unwrap(), 0);
    let calls = fake.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 2, "one failure, one delivery, only for the client with a back-channel URI");
    assert!(calls.iter().all(|(uri, _)| uri == bcl), "{calls:?}");

    let (h, c) = verify_jwt(e, &calls[1].1, "logout+jwt").await;
    assert_eq!(h["alg"], "RS256", "signed like the client's ID tokens");
    assert_eq!(c["iss"], ISS);
    assert_eq!(c["aud"], f.web.id.as_str());
    assert_eq!(c["sub"], f.ann.as_str());
    assert_eq!(c["sid"], id["sid"], "the ID token's session");
    assert!(c["events"][BACKCHANNEL_EVENT].is_object(), "{c}");
    assert!(c["jti"].as_str().is_some_and(|j| !j.is_empty()));
    assert!(c["iat"].is_i64() && c["exp"].as_i64() > c["iat"].as_i64(), "{c}");
    assert!(c.get("nonce").is_none(), "a logout token carries no nonce");
}

// ---- 12. invitations -------------------------------------------------------------------------

#[tokio::test]
async fn an_invitation_link_sets_the_password_once_and_the_person_can_sign_in() {
    let f = fx().await;
    let e = &f.e;
    let ivy = "ivy@acme.test";
    let ivy_pw = "ivy-long-passphrase-42";
    let (st, v) = api(
        e,
        "POST",
        "/api/v1/organisations/acme/invitations",
        &f.admin,
        Some(json!({"email": ivy, "name": "Ivy", "roles": ["payments:reader"]})),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let ivy_id = s(&v, "id");
    let mails = mails_to(e, ivy).await;
    assert_eq!(mails.len(), 1);
    let link = invite_path(&mails[0]);
    assert!(link.starts_with("/invite?token="), "{link}");

    let mut b = Browser::new(e);
    let page = b.get(&link).await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.snippet());
    assert!(page.body.contains(ivy));
    let token = page.hidden("token");
    let csrf = page.hidden("csrf_token");
    let r = b
        .post(
            "/invite",
            &[
                ("token", &token),
                ("password", ivy_pw),
                ("password_confirm", "something-else-42"),
                ("csrf_token", &csrf),
            ],
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.snippet());
    assert!(r.location().is_none());
    // Without the CSRF token: 403.
    let r = b.post("/invite", &[("token", &token), ("password", ivy_pw), ("password_confirm", ivy_pw)]).await;
    r.assert_error_page(StatusCode::FORBIDDEN);
    let r = b
        .post(
            "/invite",
            &[("token", &token), ("password", ivy_pw), ("password_confirm", ivy_pw), ("csrf_token", &csrf)],
        )
        .await;
    assert!(r.see_other().starts_with("/login?"), "{:?}", r.location());
    let signin = b.follow(r).await;
    assert_eq!(signin.status, StatusCode::OK);
    assert!(
        signin.body.contains("action=\"/login\"") && signin.body.contains("Your password is set"),
        "{}",
        signin.snippet()
    );

    // The link works once.
    let again = b.get(&link).await;
    assert!(again.status.is_client_error(), "{}", again.snippet());
    assert!(!again.body.contains("name=\"password\""), "no form on a used link");
    let r = b
        .post(
            "/invite",
            &[
                ("token", &token),
                ("password", "yet-another-pass-99"),
                ("password_confirm", "yet-another-pass-99"),
                ("csrf_token", &csrf),
            ],
        )
        .await;
    assert!(r.status.is_client_error() && r.location().is_none(), "{}", r.snippet());

    // Ivy signs in with the password she chose (not the one of the second attempt).
    let mut b = Browser::new(e);
    let p = pkce();
    let a = Authz::new(&f.web, Some(&p));
    let r = b.get(&a.path()).await;
    let login = b.get(r.see_other()).await;
    let rt = login.hidden("return_to");
    let csrf = login.hidden("csrf_token");
    let r = b
        .post(
            "/login",
            &[("email", ivy), ("password", "yet-another-pass-99"), ("csrf_token", &csrf), ("return_to", &rt)],
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.snippet());
    let r = b.get(&a.path()).await;
    let r = sign_in(&mut b, e, &r, ivy, ivy_pw).await;
    let q = client_redirect(&r, WEB_CB);
    let (st, t) = redeem(e, &f.web, &q["code"], Some(&p.verifier)).await;
    assert_eq!(st, StatusCode::OK, "{t}");
    let c = claims(&s(&t, "id_token"));
    assert_eq!(c["sub"], ivy_id.as_str());
    assert_eq!(c["email"], ivy);
    assert_eq!(c["email_verified"], true, "the invitation verified the address");
    assert_eq!(claims(&s(&t, "access_token"))["roles"], json!(["payments:reader"]));
}

#[tokio::test]
async fn an_invitation_expires_after_7_days() {
    let f = fx().await;
    let e = &f.e;
    let (st, v) =
        api(e, "POST", "/api/v1/organisations/acme/invitations", &f.admin, Some(json!({"email": "late@acme.test"})))
            .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let link = invite_path(&mails_to(e, "late@acme.test").await[0]);
    let mut b = Browser::new(e);
    let page = b.get(&link).await;
    assert_eq!(page.status, StatusCode::OK, "valid at first");
    let (token, csrf) = (page.hidden("token"), page.hidden("csrf_token"));
    e.clock.advance(8 * 86_400);
    let r = b.get(&link).await;
    assert!(r.status.is_client_error(), "{}", r.snippet());
    assert!(!r.body.contains("name=\"password\""));
    let pw = "late-long-passphrase-1";
    let r = b
        .post("/invite", &[("token", &token), ("password", pw), ("password_confirm", pw), ("csrf_token", &csrf)])
        .await;
    assert!(r.status.is_client_error() && r.location().is_none(), "{}", r.snippet());
}

#[tokio::test]
async fn a_resent_invitation_cancels_the_old_link() {
    let f = fx().await;
    let e = &f.e;
    let rae = "rae@acme.test";
    let (st, v) = api(e, "POST", "/api/v1/organisations/acme/invitations", &f.admin, Some(json!({"email": rae}))).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let old = invite_path(&mails_to(e, rae).await[0]);
    let (st, v) =
        api(e, "POST", &format!("/api/v1/organisations/acme/users/{}/invitation", s(&v, "id")), &f.admin, None).await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    let mails = mails_to(e, rae).await;
    assert_eq!(mails.len(), 2);
    let new = invite_path(&mails[1]);
    assert_ne!(new, old);
    let mut b = Browser::new(e);
    let r = b.get(&old).await;
    assert!(r.status.is_client_error() && !r.body.contains("name=\"password\""), "{}", r.snippet());
    assert_eq!(b.get(&new).await.status, StatusCode::OK);
}

// ---- 13. self-registration -------------------------------------------------------------------

#[tokio::test]
async fn self_registration_is_off_by_default_and_does_not_reveal_accounts() {
    let f = fx().await;
    let e = &f.e;
    let mut b = Browser::new(e);
    b.get("/register?org=acme").await.assert_error_page(StatusCode::NOT_FOUND);
    let csrf = b.get("/login").await.hidden("csrf_token");
    let r =
        b.post("/register", &[("org", "acme"), ("email", "x@acme.test"), ("name", "X"), ("csrf_token", &csrf)]).await;
    r.assert_error_page(StatusCode::NOT_FOUND);
    assert!(mails_to(e, "x@acme.test").await.is_empty());

    let (st, v) =
        api(e, "PATCH", "/api/v1/organisations/acme", &f.admin, Some(json!({"self_registration": true}))).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    b.get("/register?org=nope").await.assert_error_page(StatusCode::NOT_FOUND);
    let page = b.get("/register?org=acme").await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.snippet());
    assert_eq!(page.hidden("org"), "acme");
    let csrf = page.hidden("csrf_token");

    let new = "newbie@acme.test";
    let fresh =
        b.post("/register", &[("org", "acme"), ("email", new), ("name", "Newbie"), ("csrf_token", &csrf)]).await;
    assert_eq!(fresh.status, StatusCode::OK, "{}", fresh.snippet());
    assert!(fresh.body.contains("Check your mail"));
    let mails = mails_to(e, new).await;
    assert_eq!(mails.len(), 1);
    assert!(invite_path(&mails[0]).starts_with("/invite?token="));

    // An existing account: the same page, no mail.
    let existing =
        b.post("/register", &[("org", "acme"), ("email", ANN), ("name", "Ann"), ("csrf_token", &csrf)]).await;
    assert_eq!(existing.status, fresh.status);
    assert_eq!(existing.body, fresh.body);
    assert!(existing.headers.get("x-error").is_none());
    let before = mails_to(e, ANN).await.len();
    assert_eq!(before, 0, "no mail to an existing account");
    // Registering the same new address again: the same page, no second link.
    let again =
        b.post("/register", &[("org", "acme"), ("email", new), ("name", "Newbie"), ("csrf_token", &csrf)]).await;
    assert_eq!(again.body, fresh.body);
    assert_eq!(mails_to(e, new).await.len(), 1);
    // Without the CSRF token: 403, no mail.
    let r = b.post("/register", &[("org", "acme"), ("email", "y@acme.test"), ("name", "Y")]).await;
    r.assert_error_page(StatusCode::FORBIDDEN);
    assert!(mails_to(e, "y@acme.test").await.is_empty());
}

// ---- 14. CSRF and framing --------------------------------------------------------------------

async fn sessions_of(f: &Fx, user: &str) -> usize {
    let (st, v) = api(&f.e, "GET", &format!("/api/v1/organisations/acme/users/{user}/sessions"), &f.admin, None).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    v["items"].as_array().unwrap().len()
}

#[tokio::test]
async fn forms_need_their_csrf_token_and_pages_cannot_be_framed() {
    let f = fx().await;
    let e = &f.e;
    let mut b = Browser::new(e);
    let r = b.get(&Authz::new(&f.web, None).path()).await;
    let login = b.get(r.see_other()).await;
    let rt = login.hidden("return_to");
    let mine = login.hidden("csrf_token");
    let other = Browser::new(e).get("/login").await.hidden("csrf_token");
    assert_ne!(mine, other);

    for token in [None, Some(other.as_str()), Some("")] {
        let mut fields = vec![("email", ANN), ("password", PW), ("return_to", rt.as_str())];
        if let Some(t) = token {
            fields.push(("csrf_token", t));
        }
        let r = b.post("/login", &fields).await;
        r.assert_error_page(StatusCode::FORBIDDEN);
        assert!(b.cookie(SSO).is_none(), "no SSO cookie");
    }
    // The right token without the cookie it belongs to.
    let mut cookieless = Browser::new(e);
    let r =
        cookieless.post("/login", &[("email", ANN), ("password", PW), ("return_to", &rt), ("csrf_token", &mine)]).await;
    r.assert_error_page(StatusCode::FORBIDDEN);
    assert_eq!(sessions_of(&f, &f.ann).await, 0, "no session was created");
    assert!(mails_to(e, ANN).await.is_empty(), "no code was sent");

    // The second-factor form too.
    let r = b.post("/login", &[("email", ANN), ("password", PW), ("return_to", &rt), ("csrf_token", &mine)]).await;
    assert!(r.see_other().starts_with("/login/code?"));
    assert_eq!(sessions_of(&f, &f.ann).await, 1);
    let code = code_in(&mails_to(e, ANN).await[0]).unwrap();
    let r = b.post("/login/code", &[("code", &code), ("return_to", &rt)]).await;
    r.assert_error_page(StatusCode::FORBIDDEN);
    let r = b.post("/login/code", &[("code", &code), ("return_to", &rt), ("csrf_token", &other)]).await;
    r.assert_error_page(StatusCode::FORBIDDEN);
    let r = b.post("/login/code", &[("code", &code), ("return_to", &rt), ("csrf_token", &mine)]).await;
    assert_eq!(r.see_other(), rt);

    // Every page: frame-ancestors 'none' (checked by the browser on every HTML response; here
    // each kind of page once, explicitly).
    let consent = b.get(&Authz::new(&f.partner, Some(&pkce())).path()).await;
    assert_eq!(consent.status, StatusCode::OK);
    let mut pages = vec![consent];
    for path in [
        "/login",
        "/login?return_to=%2Faccount",
        "/login/code",
        "/login/totp",
        "/account",
        "/account/totp",
        "/register?org=acme",
        "/invite?token=nope.nope",
        "/oauth2/logout",
        "/oauth2/authorize?client_id=acme%24nope",
    ] {
        pages.push(b.get(path).await);
    }
    for p in &pages {
        assert!(p.is_html(), "{}: {}", p.what, p.snippet());
        let csp = p.headers.get(header::CONTENT_SECURITY_POLICY).unwrap().to_str().unwrap();
        assert!(csp.contains("frame-ancestors 'none'"), "{}: {csp}", p.what);
        assert_eq!(p.headers.get(header::X_FRAME_OPTIONS).unwrap(), "DENY", "{}", p.what);
    }
}

// ---- 15. userinfo ----------------------------------------------------------------------------

#[tokio::test]
async fn userinfo_takes_the_token_in_the_header_any_case_or_the_form_body() {
    let f = fx().await;
    let e = &f.e;
    let (_, t) = signed_in_with_tokens(&f).await;
    let at = s(&t, "access_token");
    let expect = |v: &Value| {
        assert_eq!(v["sub"], f.ann.as_str(), "{v}");
        assert_eq!(v["email"], ANN, "{v}");
        assert!(v["email_verified"].is_boolean(), "{v}");
        assert_eq!(v["name"], ANN_NAME, "{v}");
        assert_eq!(v["preferred_username"], ANN, "{v}");
    };
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let req = Request::get("/oauth2/userinfo").header(header::AUTHORIZATION, format!("{scheme} {at}"));
        let (st, h, v) = raw(e, req.body(Body::empty()).unwrap()).await;
        assert_eq!(st, StatusCode::OK, "{scheme}: {v}");
        assert_eq!(h.get(header::CACHE_CONTROL).unwrap(), "no-store");
        expect(&v);
    }
    let req = Request::post("/oauth2/userinfo").header(header::AUTHORIZATION, format!("Bearer {at}"));
    let (st, _, v) = raw(e, req.body(Body::empty()).unwrap()).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    expect(&v);
    let (st, _, v) = raw(e, form_req("/oauth2/userinfo", None, &[("access_token", &at)])).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    expect(&v);

    // Only what the scopes allow.
    let mut b = Browser::new(e);
    let p = pkce();
    let code = code_for(&mut b, e, &f.web, &Authz::new(&f.web, Some(&p)).set("scope", "openid")).await;
    let (_, t) = redeem(e, &f.web, &code, Some(&p.verifier)).await;
    let (st, v) = userinfo(e, &s(&t, "access_token")).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v, json!({"sub": f.ann}));

    // No token, a bad one: 401. A client_credentials token: 403.
    let (st, _, _) = raw(e, Request::get("/oauth2/userinfo").body(Body::empty()).unwrap()).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    assert_eq!(userinfo(e, "not-a-token").await.0, StatusCode::UNAUTHORIZED);
    let (st, v) = token(e, &f.worker, &[("grant_type", "client_credentials")]).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(userinfo(e, &s(&v, "access_token")).await.0, StatusCode::FORBIDDEN);
}

// ---- beyond the list: form_post and return_to ----------------------------------------------

#[tokio::test]
async fn response_mode_form_post_is_a_form_to_the_redirect_uri_without_inline_script() {
    let f = fx().await;
    let e = &f.e;
    let (mut b, _) = signed_in_with_tokens(&f).await;
    let p = pkce();
    let r = b.get(&Authz::new(&f.web, Some(&p)).set("response_mode", "form_post").path()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.snippet());
    assert!(r.location().is_none());
    let i = r.body.find("<form method=\"post\" action=\"").expect("a POST form");
    let rest = &r.body[i + "<form method=\"post\" action=\"".len()..];
    assert_eq!(unescape(&rest[..rest.find('"').unwrap()]), WEB_CB);
    assert_eq!(r.hidden("state"), STATE);
    assert_eq!(r.hidden("iss"), ISS);
    let code = r.hidden("code");
    assert!(r.body.contains("<button"), "a button for browsers without script");
    assert!(r.body.contains("<script src=\"/assets/form-post.js\"></script>"));
    let csp = r.headers.get(header::CONTENT_SECURITY_POLICY).unwrap().to_str().unwrap();
    assert!(csp.contains(&format!("form-action 'self' {WEB_CB}")), "{csp}");
    let (st, t) = redeem(e, &f.web, &code, Some(&p.verifier)).await;
    assert_eq!(st, StatusCode::OK, "{t}");
    // Errors go the same way.
    let r = b
        .get(&Authz::new(&f.web, None).set("response_mode", "form_post").set("code_challenge_method", "plain").path())
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.hidden("error"), "invalid_request");
    assert_eq!(r.hidden("state"), STATE);
}

#[tokio::test]
async fn return_to_is_only_ever_a_local_authorize_or_account_path() {
    let f = fx().await;
    let e = &f.e;
    let mut b = Browser::new(e);
    for bad in ["//evil.test/x", "https://evil.test/", "/\\evil.test", "/oauth2/authorizeX?a=1", "/accounts"] {
        let q = form_urlencoded::Serializer::new(String::new()).append_pair("return_to", bad).finish();
        let page = b.get(&format!("/login?{q}")).await;
        assert_eq!(page.status, StatusCode::OK);
        assert_eq!(page.hidden("return_to"), "/account", "{bad:?}");
    }
    let csrf = b.get("/login").await.hidden("csrf_token");
    let r = b
        .post("/login", &[("email", ANN), ("password", PW), ("csrf_token", &csrf), ("return_to", "https://evil.test/")])
        .await;
    assert_eq!(r.see_other(), "/login/code?return_to=%2Faccount");
    let page = b.get(r.see_other()).await;
    let code = code_in(&mails_to(e, ANN).await[0]).unwrap();
    let r = b
        .post(
            "/login/code",
            &[("code", &code), ("csrf_token", &page.hidden("csrf_token")), ("return_to", "//evil.test/")],
        )
        .await;
    assert_eq!(r.see_other(), "/account");
    let account = b.get("/account").await;
    assert_eq!(account.status, StatusCode::OK, "{}", account.snippet());
    assert!(account.body.contains(ANN));
}

// ---- beyond the list: ending sessions by other means, public clients --------------------------

/// Ann signed in through `web` (which registered a back-channel URI): the browser, the token
/// response, the SSO cookie.
async fn signed_in_with_backchannel(f: &Fx) -> (Browser, Value, String) {
    let (st, v) = api(
        &f.e,
        "PATCH",
        "/api/v1/organisations/acme/applications/web",
        &f.admin,
        Some(json!({"backchannel_logout_uri": "https://app.acme.test/backchannel"})),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let (b, t) = signed_in_with_tokens(f).await;
    let sso = b.cookie(SSO).unwrap();
    (b, t, sso)
}

/// After a session was ended some way: the old SSO cookie no longer signs in, the refresh
/// token is refused, and a logout token goes to the back-channel URI.
async fn assert_session_ended(f: &Fx, t: &Value, sso: &str) {
    let mut replay = Browser::new(&f.e);
    replay.jar.insert(SSO.to_owned(), sso.to_owned());
    assert!(!still_signed_in(&mut replay, f).await, "the SSO cookie still signs in");
    let r = refresh(&f.e, &f.web, &s(t, "refresh_token")).await;
    let fake = FakeNotifier { failures: 0, calls: Mutex::new(Vec::new()) };
    f.e.core.deliver_logouts(&fake).await.unwrap();
    let calls = fake.calls.lock().unwrap().len();
    assert!(
        r.0 == StatusCode::BAD_REQUEST && r.1["error"] == "invalid_grant" && calls == 1,
        "after the session ended: refresh gives {} {}; back-channel logout tokens sent: {calls}",
        r.0,
        r.1.get("error").map_or_else(|| "(new tokens issued)".to_owned(), Value::to_string)
    );
}

#[tokio::test]
async fn an_admin_revoking_an_sso_session_ends_its_refresh_tokens() {
    let f = fx().await;
    let (_, t, sso) = signed_in_with_backchannel(&f).await;
    let sid = s(&claims(&s(&t, "id_token")), "sid");
    let (st, v) = api(&f.e, "DELETE", &format!("/api/v1/organisations/acme/sessions/{sid}"), &f.admin, None).await;
    assert!(st.is_success(), "{st} {v}");
    assert_session_ended(&f, &t, &sso).await;
}

#[tokio::test]
async fn an_admin_revoking_all_sessions_of_a_user_ends_their_refresh_tokens() {
    let f = fx().await;
    let (_, t, sso) = signed_in_with_backchannel(&f).await;
    let (st, v) =
        api(&f.e, "DELETE", &format!("/api/v1/organisations/acme/users/{}/sessions", f.ann), &f.admin, None).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["revoked"], 1, "{v}");
    assert_session_ended(&f, &t, &sso).await;
}

#[tokio::test]
async fn a_password_reset_ends_the_refresh_tokens_of_the_sessions_it_ends() {
    let f = fx().await;
    let e = &f.e;
    let (_, t, sso) = signed_in_with_backchannel(&f).await;
    let req = Request::post("/api/v1/password-reset")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(json!({"email": ANN}).to_string()))
        .unwrap();
    let (st, _, v) = raw(e, req).await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    let code = code_in(mails_to(e, ANN).await.last().unwrap()).unwrap();
    let body =
        json!({"verification_id": s(&v, "verification_id"), "code": code, "new_password": "a-new-long-passphrase"});
    let req = Request::post("/api/v1/password-reset/confirm")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    let (st, _, v) = raw(e, req).await;
    assert_eq!(st, StatusCode::NO_CONTENT, "{v}");
    assert_session_ended(&f, &t, &sso).await;
}

#[tokio::test]
async fn a_public_client_may_revoke_its_tokens_but_not_introspect() {
    let f = fx().await;
    let e = &f.e;
    let (mut b, _) = signed_in_with_tokens(&f).await;
    let p = pkce();
    let code = code_for(&mut b, e, &f.spa, &Authz::new(&f.spa, Some(&p))).await;
    let (st, t) = redeem(e, &f.spa, &code, Some(&p.verifier)).await;
    assert_eq!(st, StatusCode::OK, "{t}");
    let at = s(&t, "access_token");
    let (st, _, v) = raw(e, form_req("/oauth2/introspect", None, &[("token", &at), ("client_id", &f.spa.id)])).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED, "{v}");
    assert_eq!(v["error"], "invalid_client", "{v}");
    assert!(v.get("active").is_none(), "{v}");
    assert_eq!(userinfo(e, &at).await.0, StatusCode::OK);
    let (st, _, v) = raw(e, form_req("/oauth2/revoke", None, &[("token", &at), ("client_id", &f.spa.id)])).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(userinfo(e, &at).await.0, StatusCode::UNAUTHORIZED);
}

/// RFC 7009 §2: "Implementations MUST support the revocation of refresh tokens".
#[tokio::test]
async fn a_refresh_token_revoked_at_the_revocation_endpoint_no_longer_works() {
    let f = fx().await;
    let e = &f.e;
    let (mut b, t) = signed_in_with_tokens(&f).await;
    let rt = s(&t, "refresh_token");
    let req = form_req(
        "/oauth2/revoke",
        Some(basic(&f.web.id, f.web.secret.as_ref().unwrap())),
        &[("token", &rt), ("token_type_hint", "refresh_token")],
    );
    let (st, _, v) = raw(e, req).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let r = refresh(e, &f.web, &rt).await;
    assert_eq!(
        (r.0, r.1.get("error")),
        (StatusCode::BAD_REQUEST, Some(&json!("invalid_grant"))),
        "confidential client"
    );

    // A public client, with just its client_id (and without the hint).
    let p = pkce();
    let code = code_for(&mut b, e, &f.spa, &Authz::new(&f.spa, Some(&p))).await;
    let (st, t) = redeem(e, &f.spa, &code, Some(&p.verifier)).await;
    assert_eq!(st, StatusCode::OK, "{t}");
    let rt = s(&t, "refresh_token");
    let (st, _, v) = raw(e, form_req("/oauth2/revoke", None, &[("token", &rt), ("client_id", &f.spa.id)])).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let r = refresh(e, &f.spa, &rt).await;
    assert_eq!((r.0, r.1.get("error")), (StatusCode::BAD_REQUEST, Some(&json!("invalid_grant"))), "public client");
}

// ---- gateway browser sessions ------------------------------------------------------------------

/// `POST /api/v1/gateway/browser-sessions`: a gateway (an application with
/// `portcullis:gateway`) finishing a browser sign-in redeems its own code, with PKCE, once, for
/// a session that lives only as long as the SSO session it was signed in with.
#[tokio::test]
async fn a_gateway_redeems_its_own_codes_once_for_sessions_that_end_with_the_sign_in() {
    const GW_CB: &str = "https://gw.acme.test/.portcullis/callback";
    let f = fx().await;
    let e = &f.e;
    let gw = app(
        e,
        &f.admin,
        json!({
            "slug": "gw", "name": "Gateway", "grant_types": ["authorization_code", "client_credentials"],
            "roles": ["portcullis:gateway"], "redirect_uris": [GW_CB], "first_party": true,
            "token_endpoint_auth_method": "client_secret_basic",
        }),
        GW_CB,
    )
    .await;
    let (s, t) = token(e, &gw, &[("grant_type", "client_credentials")]).await;
    assert_eq!(s, StatusCode::OK, "{t}");
    let gw_token = t["access_token"].as_str().unwrap().to_owned();
    let (s, t) = token(e, &f.worker, &[("grant_type", "client_credentials")]).await;
    assert_eq!(s, StatusCode::OK, "{t}");
    let not_a_gateway = t["access_token"].as_str().unwrap().to_owned();

    let mut b = Browser::new(e);
    let p = pkce();
    let authz = Authz::new(&gw, Some(&p)).set("scope", "openid");
    let code = code_for(&mut b, e, &gw, &authz).await;
    let redeem_as = |bearer: String, client_id: String, code: String, verifier: String| async move {
        let body = json!({
            "client_id": client_id, "code": code, "code_verifier": verifier, "redirect_uri": GW_CB,
            "client_ip": "203.0.113.9",
        });
        api(e, "POST", "/api/v1/gateway/browser-sessions", &bearer, Some(body)).await
    };
    let check = |session: String| {
        let gw_token = gw_token.clone();
        async move {
            api(e, "POST", "/api/v1/gateway/sessions/check", &gw_token, Some(json!({ "session_token": session }))).await
        }
    };

    // Only gateways, and only for their own application; nothing is consumed by a refusal.
    let (s, _) =
        redeem_as(not_a_gateway.to_string(), f.worker.id.to_string(), code.to_string(), p.verifier.to_string()).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "a plain application's token is not for this server");
    let (s, v) = redeem_as(gw_token.to_string(), f.web.id.to_string(), code.to_string(), p.verifier.to_string()).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    let (s, v) =
        redeem_as(gw_token.to_string(), gw.id.to_string(), code.to_string(), pkce().verifier.to_string()).await;
    assert_eq!((s, &v["valid"], &v["status"]), (StatusCode::OK, &json!(false), &json!(401)), "{v}");
    assert!(v["message"].as_str().unwrap().contains("code_verifier"), "{v}");

    // Redeemed: a session of ann, valid at once.
    let (s, v) = redeem_as(gw_token.to_string(), gw.id.to_string(), code.to_string(), p.verifier.to_string()).await;
    assert_eq!((s, &v["valid"]), (StatusCode::OK, &json!(true)), "{v}");
    let session = v["session_token"].as_str().unwrap().to_owned();
    assert!(v["expires_at"].as_i64().unwrap() > e.clock.now());
    let (s, v) = check(session.clone()).await;
    assert_eq!((s, &v["valid"], &v["identity"]["subject"]), (StatusCode::OK, &json!(true), &json!(f.ann)), "{v}");

    // The code again: refused, and the session it gave is revoked.
    let (_, v) = redeem_as(gw_token.to_string(), gw.id.to_string(), code.to_string(), p.verifier.to_string()).await;
    assert_eq!((&v["valid"], &v["status"]), (&json!(false), &json!(401)), "{v}");
    assert!(v["message"].as_str().unwrap().contains("already used"), "{v}");
    let (_, v) = check(session.clone()).await;
    assert_eq!(v["valid"], false, "{v}");

    // A code requested without PKCE is not redeemed for a session.
    let bare = code_for(&mut b, e, &gw, &Authz::new(&gw, None).set("scope", "openid")).await;
    let (_, v) = redeem_as(gw_token.to_string(), gw.id.to_string(), bare.to_string(), p.verifier.to_string()).await;
    assert_eq!(v["valid"], false, "{v}");

    // A second sign-in (SSO: no password); then the SSO session ends, and so does this one.
    let p2 = pkce();
    let code2 = code_for(&mut b, e, &gw, &Authz::new(&gw, Some(&p2)).set("scope", "openid")).await;
    let (_, v) = redeem_as(gw_token.to_string(), gw.id.to_string(), code2.to_string(), p2.verifier.to_string()).await;
    let session2 = v["session_token"].as_str().unwrap().to_owned();
    assert_eq!(check(session2.clone()).await.1["valid"], true);
    let sso = b.cookie(SSO).unwrap();
    let (s, v) = api(e, "DELETE", "/api/v1/sessions/current", &sso, None).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
    let (_, v) = check(session2.clone()).await;
    assert_eq!(v["valid"], false, "{v}");
    assert!(v["message"].as_str().unwrap().contains("sign-in this session belongs to has ended"), "{v}");
}
