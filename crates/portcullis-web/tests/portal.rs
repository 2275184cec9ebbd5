//! Handler tests of the admin portal (docs/portal.md): the real router over a real SQLite
//! store with a manual clock and an in-memory mailer. People sign in through the core's browser
//! sign-in (password, then the emailed code), and the tests send the SSO and CSRF cookies the
//! browser would. What is checked: who sees what (org admins only their organisation, people
//! without an admin role nothing), CSRF on every form, re-authentication before sensitive
//! actions, errors shown in the page with the id sent as `x-error-id`, the dashboard's counts,
//! and the application and certificate flows end to end through the pages.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode, header};
use portcullis_core::usecases::{
    Credential, NewOrganisation, NewService, NewUser, Principal, ROLE_ORG_ADMIN, ROLE_PLATFORM_ADMIN, RequestContext,
};
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};
use secrecy::{ExposeSecret, SecretString};
use tower::ServiceExt;

#[allow(dead_code)]
mod support;

use support::{Env, ISS, env};

const PW: &str = "correct-horse-battery-staple";
const ROOT: &str = "admin@portcullis.local";
const SSO: &str = "__Host-portcullis_sso";
const CSRF: &str = "__Host-portcullis_csrf";
const BINDING: &str = "csrfbindingcsrfbindingcsrfbindingcsrfbindin";

struct Resp {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

impl Resp {
    fn location(&self) -> &str {
        self.headers.get(header::LOCATION).map(|v| v.to_str().unwrap()).unwrap_or("")
    }
    #[track_caller]
    fn see_other(&self) -> &str {
        assert_eq!(self.status, StatusCode::SEE_OTHER, "{}", self.snippet());
        self.location()
    }
    fn error_id(&self) -> &str {
        self.headers.get("x-error-id").map(|v| v.to_str().unwrap()).unwrap_or("")
    }
    fn snippet(&self) -> String {
        let err = self.headers.get("x-error").map(|v| v.to_str().unwrap()).unwrap_or("");
        format!("{} x-error {err:?}: {}", self.status, self.body.chars().take(600).collect::<String>())
    }
    /// A refusal shown as a page: the status, `x-error`, and the `x-error-id` on the page.
    #[track_caller]
    fn assert_refused(&self, status: StatusCode) {
        assert_eq!(self.status, status, "{}", self.snippet());
        let id = self.error_id();
        assert!(!id.is_empty() && self.headers.contains_key("x-error"), "{}", self.snippet());
        assert!(
            self.body.contains(&format!("<code class=\"error-id\">{id}</code>")),
            "the page shows the error id {id}: {}",
            self.snippet()
        );
        assert!(self.headers.get(header::LOCATION).is_none());
    }
    /// The text of the element with this id (`<x id="…">text</x>`), unescaped.
    fn element(&self, id: &str) -> String {
        let needle = format!("id=\"{id}\"");
        let i = self.body.find(&needle).unwrap_or_else(|| panic!("no #{id}: {}", self.snippet()));
        let after = &self.body[i..];
        let start = after.find('>').unwrap() + 1;
        let end = after[start..].find('<').unwrap();
        html_unescape(&after[start..start + end])
    }
}

fn html_unescape(s: &str) -> String {
    s.replace("&#36;", "$")
        .replace("&quot;", "\"")
        .replace("&#34;", "\"")
        .replace("&#39;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

/// A signed-in browser: its SSO cookie and its CSRF cookie.
#[derive(Clone)]
struct Browser {
    sso: Option<String>,
}

impl Browser {
    fn anonymous() -> Self {
        Self { sso: None }
    }
    fn cookies(&self) -> String {
        let mut c = format!("{CSRF}={BINDING}");
        if let Some(s) = &self.sso {
            c.push_str(&format!("; {SSO}={s}"));
        }
        c
    }
}

fn csrf(e: &Env) -> String {
    e.core.csrf_token(BINDING)
}

async fn send(e: &Env, req: Request<Body>) -> Resp {
    let r = e.app.clone().oneshot(req).await.unwrap();
    let status = r.status();
    let headers = r.headers().clone();
    let bytes = axum::body::to_bytes(r.into_body(), 1 << 22).await.unwrap();
    let resp = Resp { status, headers, body: String::from_utf8_lossy(&bytes).into_owned() };
    if resp.status.is_client_error() || resp.status.is_server_error() {
        assert!(resp.headers.contains_key("x-error") && resp.headers.contains_key("x-error-id"), "{}", resp.snippet());
    }
    let is_html = resp.headers.get(header::CONTENT_TYPE).is_some_and(|v| v.to_str().unwrap().starts_with("text/html"));
    if is_html {
        let csp = resp.headers.get(header::CONTENT_SECURITY_POLICY).unwrap().to_str().unwrap();
        assert!(csp.contains("frame-ancestors 'none'") && csp.contains("script-src 'self'"), "{csp}");
        assert!(!csp.contains("unsafe-inline"));
        assert_eq!(resp.headers.get(header::CACHE_CONTROL).unwrap(), "no-store");
        assert!(!resp.body.contains("<script>") && !resp.body.contains(" style=") && !resp.body.contains(" onclick="));
    }
    resp
}

async fn get(e: &Env, b: &Browser, path: &str) -> Resp {
    let req = Request::get(path).header(header::COOKIE, b.cookies()).body(Body::empty()).unwrap();
    send(e, req).await
}

async fn post(e: &Env, b: &Browser, path: &str, fields: &[(&str, &str)]) -> Resp {
    let body = form_urlencoded::Serializer::new(String::new()).extend_pairs(fields).finish();
    let req = Request::post(path)
        .header(header::COOKIE, b.cookies())
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from(body))
        .unwrap();
    send(e, req).await
}

/// A `multipart/form-data` POST; `files` are `(field, file name, content)`.
async fn post_multipart(
    e: &Env,
    b: &Browser,
    path: &str,
    fields: &[(&str, &str)],
    files: &[(&str, &str, &str)],
) -> Resp {
    let boundary = "----portcullis-test-boundary-7MA4YWxkTrZu0gW";
    let mut body = String::new();
    for (k, v) in fields {
        body.push_str(&format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n"));
    }
    for (k, name, content) in files {
        body.push_str(&format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"; filename=\"{name}\"\r\nContent-Type: application/octet-stream\r\n\r\n{content}\r\n"
        ));
    }
    body.push_str(&format!("--{boundary}--\r\n"));
    let req = Request::post(path)
        .header(header::COOKIE, b.cookies())
        .header(header::CONTENT_TYPE, format!("multipart/form-data; boundary={boundary}"))
        .body(Body::from(body))
        .unwrap();
    send(e, req).await
}

fn platform() -> Principal {
    Principal {
        subject: "test-platform-admin".into(),
        client_id: "test".into(),
        org: "portcullis".into(),
        roles: vec![ROLE_PLATFORM_ADMIN.into()],
        scopes: vec![],
        credential: Credential::AccessToken,
    }
}

/// Organisations `acme` (with service `payments`) and `globex`, an admin of each, and a
/// person of acme without an admin role.
async fn world() -> Env {
    let e = env().await;
    let ctx = RequestContext::default();
    for (slug, name) in [("acme", "Acme"), ("globex", "Globex")] {
        e.core
            .create_organisation(&platform(), &ctx, NewOrganisation { slug: slug.into(), name: name.into() })
            .await
            .unwrap();
        e.core
            .create_user(
                &platform(),
                &ctx,
                slug,
                NewUser {
                    email: format!("admin@{slug}.test"),
                    name: Some(format!("{name} admin")),
                    password: Some(SecretString::from(PW)),
                    roles: vec![ROLE_ORG_ADMIN.into()],
                },
            )
            .await
            .unwrap();
    }
    e.core
        .create_user(
            &platform(),
            &ctx,
            "acme",
            NewUser {
                email: "dev@acme.test".into(),
                name: None,
                password: Some(SecretString::from(PW)),
                roles: vec![],
            },
        )
        .await
        .unwrap();
    e.core
        .create_service(
            &platform(),
            &ctx,
            "acme",
            NewService {
                slug: "payments".into(),
                name: "Payments".into(),
                audience: "https://payments.acme.test".into(),
                scopes: vec!["payments/read".into()],
                roles: vec!["payments:reader".into()],
                permissions: vec![],
                grants: Default::default(),
            },
        )
        .await
        .unwrap();
    e
}

/// Password, then the emailed code: a verified SSO session.
async fn sign_in(e: &Env, email: &str) -> Browser {
    let ctx = RequestContext::default();
    // The bootstrap admin has the support harness's password.
    let pw = if email == ROOT { "bootstrap-password-123" } else { PW };
    let l = e.core.browser_login(&ctx, email, SecretString::from(pw), None, None).await.unwrap();
    e.core.deliver_mail().await.unwrap();
    let mail = e.mailer.sent().into_iter().rfind(|m| m.to == email).unwrap();
    let code = mail.text.split_whitespace().find(|w| w.len() == 6 && w.bytes().all(|b| b.is_ascii_digit())).unwrap();
    e.core.verify_login_code(&ctx, &l.verification_id, code).await.unwrap();
    Browser { sso: Some(l.session_token.expose_secret().to_owned()) }
}

fn csr_for(client_id: &str) -> String {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, client_id);
    dn.push(DnType::OrganizationName, client_id.split('$').next().unwrap());
    p.distinguished_name = dn;
    p.serialize_request(&key).unwrap().pem().unwrap()
}

// ---- who sees what ---------------------------------------------------------------------------

#[tokio::test]
async fn without_a_session_the_portal_sends_the_browser_to_the_login_and_back() {
    let e = world().await;
    let r = get(&e, &Browser::anonymous(), "/portal/orgs/acme/certificates?status=active").await;
    assert_eq!(r.see_other(), "/login?return_to=%2Fportal%2Forgs%2Facme%2Fcertificates%3Fstatus%3Dactive");
    // The login page carries the return_to on to its form.
    let login = get(&e, &Browser::anonymous(), r.location()).await;
    assert!(login.body.contains("name=\"return_to\" value=\"/portal/orgs/acme/certificates?status=active\""));
    // A junk cookie is no session either; a POST goes back to the portal's start.
    let junk = Browser { sso: Some("pcs_junk".into()) };
    assert_eq!(get(&e, &junk, "/portal").await.see_other(), "/login?return_to=%2Fportal");
    let r = post(&e, &junk, "/portal/orgs/acme/applications", &[("csrf_token", &csrf(&e))]).await;
    assert_eq!(r.see_other(), "/login?return_to=%2Fportal");
}

#[tokio::test]
async fn people_without_an_admin_role_are_refused() {
    let e = world().await;
    let dev = sign_in(&e, "dev@acme.test").await;
    get(&e, &dev, "/portal").await.assert_refused(StatusCode::FORBIDDEN);
    get(&e, &dev, "/portal/orgs/acme/applications").await.assert_refused(StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn an_org_admin_sees_and_changes_only_their_organisation() {
    let e = world().await;
    let acme = sign_in(&e, "admin@acme.test").await;
    let dash = get(&e, &acme, "/portal").await;
    assert_eq!(dash.status, StatusCode::OK, "{}", dash.snippet());
    assert_eq!(
        dash.headers.get(header::CONTENT_SECURITY_POLICY).unwrap(),
        portcullis_web::pages::PORTAL_CSP,
        "the sign-in pages' policy plus connect-src 'self' for the live check"
    );
    assert!(dash.body.contains("href=\"/portal/orgs/acme/applications\""));
    assert!(!dash.body.contains("globex") && !dash.body.contains("Globex"), "no trace of another organisation");

    for path in [
        "/portal/orgs/globex",
        "/portal/orgs/globex/applications",
        "/portal/orgs/globex/applications/new",
        "/portal/orgs/globex/certificates",
        "/portal/orgs/globex/certificates/new",
        "/portal/go?org=globex",
    ] {
        let r = get(&e, &acme, path).await;
        r.assert_refused(StatusCode::FORBIDDEN);
        assert!(!r.body.contains("Globex"), "{path}");
    }
    // The live check answers JSON, refused alike.
    let r = get(&e, &acme, "/portal/orgs/globex/applications/check?slug=web").await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    // A form with a valid CSRF token changes nothing elsewhere.
    let r = post(
        &e,
        &acme,
        "/portal/orgs/globex/applications",
        &[
            ("csrf_token", &csrf(&e)),
            ("name", "Sneaky"),
            ("slug", "sneaky"),
            ("kind", "machine"),
            ("token_endpoint_auth_method", ""),
            ("redirect_uris", ""),
        ],
    )
    .await;
    r.assert_refused(StatusCode::FORBIDDEN);
    assert!(e.core.application(&platform(), "globex", "sneaky").await.is_err());

    // A platform admin sees both.
    let root = sign_in(&e, ROOT).await;
    let dash = get(&e, &root, "/portal").await;
    for org in ["acme", "globex", "portcullis"] {
        assert!(dash.body.contains(&format!("href=\"/portal/orgs/{org}/applications\"")), "{org}");
    }
    assert_eq!(get(&e, &root, "/portal/go?org=globex").await.see_other(), "/portal/orgs/globex/applications");
}

#[tokio::test]
async fn forms_without_the_csrf_token_of_the_cookie_are_refused() {
    let e = world().await;
    let acme = sign_in(&e, "admin@acme.test").await;
    let fields = |token: &'static str| {
        vec![
            ("csrf_token", token),
            ("name", "Billing"),
            ("slug", "billing"),
            ("kind", "machine"),
            ("token_endpoint_auth_method", ""),
            ("redirect_uris", ""),
        ]
    };
    let other_binding = e.core.csrf_token("anotherbindinganotherbindinganotherbinding0");
    for token in ["", "not-a-token", Box::leak(other_binding.into_boxed_str())] {
        let r = post(&e, &acme, "/portal/orgs/acme/applications", &fields(token)).await;
        r.assert_refused(StatusCode::FORBIDDEN);
    }
    // No CSRF cookie at all.
    let body = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(fields(Box::leak(csrf(&e).into_boxed_str())))
        .finish();
    let req = Request::post("/portal/orgs/acme/applications")
        .header(header::COOKIE, format!("{SSO}={}", acme.sso.clone().unwrap()))
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from(body))
        .unwrap();
    send(&e, req).await.assert_refused(StatusCode::FORBIDDEN);
    assert!(e.core.application(&platform(), "acme", "billing").await.is_err(), "nothing was created");
    // The same form with the right token works.
    let token = csrf(&e);
    let r = post(&e, &acme, "/portal/orgs/acme/applications", &fields(Box::leak(token.into_boxed_str()))).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.snippet());
}

// ---- dashboard -------------------------------------------------------------------------------

#[tokio::test]
async fn the_dashboard_counts_applications_users_expiring_certificates_and_failed_sign_ins() {
    let e = world().await;
    let acme = sign_in(&e, "admin@acme.test").await;
    let ctx = RequestContext::default();
    // Two failed sign-ins today: a wrong password and a wrong code.
    assert!(
        e.core
            .browser_login(&ctx, "dev@acme.test", SecretString::from("wrong-password-123"), None, None)
            .await
            .is_err()
    );
    let l = e.core.browser_login(&ctx, "dev@acme.test", SecretString::from(PW), None, None).await.unwrap();
    assert!(e.core.verify_login_code(&ctx, &l.verification_id, "000000").await.is_err());

    let r = get(&e, &acme, "/portal").await;
    assert_eq!(r.status, StatusCode::OK);
    let tile = &r.body[r.body.find("<li class=\"tile\">").unwrap()..];
    // Each <dd>'s digits, tags and all: applications, users, expiring certificates, failures.
    let numbers: Vec<String> = tile
        .split("<dd>")
        .skip(1)
        .take(4)
        .map(|d| {
            let d = d.split("</dd>").next().unwrap();
            let text: String = d.split('<').map(|part| part.split_once('>').map_or(part, |(_, t)| t)).collect();
            text.trim().to_owned()
        })
        .collect();
    assert_eq!(numbers, ["0", "2", "0", "2"], "{tile}");
    assert!(tile.contains("count-warn"), "failed sign-ins are highlighted");
}

// ---- applications ----------------------------------------------------------------------------

#[tokio::test]
async fn an_application_is_created_its_secret_shown_once_and_it_gets_a_token() {
    let e = world().await;
    let acme = sign_in(&e, "admin@acme.test").await;
    let form = get(&e, &acme, "/portal/orgs/acme/applications/new").await;
    assert_eq!(form.status, StatusCode::OK);
    assert!(form.body.contains("value=\"payments/read\"") && form.body.contains("value=\"payments:reader\""));
    assert!(form.body.contains("data-check-url=\"/portal/orgs/acme/applications/check\""));

    // The live check.
    let check = |slug: &'static str| {
        let (e, acme) = (&e, &acme);
        async move {
            let r = get(e, acme, &format!("/portal/orgs/acme/applications/check?slug={slug}")).await;
            assert_eq!(r.status, StatusCode::OK);
            serde_json::from_str::<serde_json::Value>(&r.body).unwrap()
        }
    };
    let v = check("billing").await;
    assert_eq!(
        (v["client_id"].as_str(), v["valid"].as_bool(), v["available"].as_bool()),
        (Some("acme$billing"), Some(true), Some(true))
    );
    let v = check("Bad_Slug").await;
    assert_eq!(v["valid"], false);
    assert!(v["message"].as_str().unwrap().contains("a-z, 0-9"));

    let token = csrf(&e);
    let create = |slug: &'static str| {
        vec![
            ("csrf_token", token.clone()),
            ("name", "Billing".to_owned()),
            ("slug", slug.to_owned()),
            ("kind", "machine".to_owned()),
            ("grant_types", "client_credentials".to_owned()),
            ("token_endpoint_auth_method", "client_secret_basic".to_owned()),
            ("redirect_uris", String::new()),
            ("scopes", "payments/read".to_owned()),
            ("roles", "payments:reader".to_owned()),
        ]
    };
    let pairs = |v: &Vec<(&'static str, String)>| v.iter().map(|(k, v)| (*k, v.clone())).collect::<Vec<_>>();
    let f = pairs(&create("billing"));
    let f: Vec<(&str, &str)> = f.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let r = post(&e, &acme, "/portal/orgs/acme/applications", &f).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.snippet());
    let secret = r.element("client-secret");
    assert!(secret.len() >= 43, "{secret}");
    let curl = r.element("curl-command");
    assert_eq!(curl, format!("curl -s -u 'acme$billing:{secret}' -d grant_type=client_credentials {ISS}/oauth2/token"));
    assert!(r.body.contains("data-copy=\"client-secret\""));

    // The secret works at the token endpoint.
    let req = Request::post("/oauth2/token")
        .header(header::AUTHORIZATION, format!("Basic {}", base64_basic("acme$billing", &secret)))
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from("grant_type=client_credentials"))
        .unwrap();
    let t = send(&e, req).await;
    assert_eq!(t.status, StatusCode::OK, "{}", t.snippet());
    assert!(t.body.contains("\"access_token\""));

    // Never shown again: not on its page, which has the JWKS link and a placeholder curl.
    let page = get(&e, &acme, "/portal/orgs/acme/applications/billing").await;
    assert!(!page.body.contains(&secret));
    assert!(
        page.body.contains("href=\"/applications/acme$billing/jwks.json\"")
            || page.body.contains("href=\"/applications/acme&#36;billing/jwks.json\"")
    );
    assert_eq!(
        page.element("curl-command"),
        format!("curl -s -u 'acme$billing':\"$CLIENT_SECRET\" -d grant_type=client_credentials {ISS}/oauth2/token")
    );
    assert!(get(&e, &acme, "/portal/orgs/acme/applications").await.body.contains("acme$billing"));

    // The same id again: the form comes back with the error and its id.
    let r = post(&e, &acme, "/portal/orgs/acme/applications", &f).await;
    r.assert_refused(StatusCode::CONFLICT);
    assert!(r.body.contains("value=\"billing\""), "the form keeps what was typed");
    assert!(check("billing").await["available"] == false);
    // A malformed id: 400, the message names the form.
    let bad = pairs(&create("Bad_Slug"));
    let bad: Vec<(&str, &str)> = bad.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let r = post(&e, &acme, "/portal/orgs/acme/applications", &bad).await;
    r.assert_refused(StatusCode::BAD_REQUEST);
    assert!(r.body.contains("a-z, 0-9"));
}

fn base64_basic(id: &str, secret: &str) -> String {
    use base64::Engine;
    let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", enc(id), enc(secret)))
}

#[tokio::test]
async fn sensitive_actions_need_a_sign_in_within_ten_minutes() {
    let e = world().await;
    let acme = sign_in(&e, "admin@acme.test").await;
    let token = csrf(&e);
    let r = post(
        &e,
        &acme,
        "/portal/orgs/acme/applications",
        &[
            ("csrf_token", &token),
            ("name", "Web"),
            ("slug", "web"),
            ("kind", "machine"),
            ("token_endpoint_auth_method", ""),
            ("redirect_uris", ""),
        ],
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.snippet());

    e.clock.advance(11 * 60);
    for what in ["delete", "rotate-secret", "disable"] {
        let path = format!("/portal/orgs/acme/applications/web/{what}");
        let expected = format!("/login?reauth=1&return_to=%2Fportal%2Forgs%2Facme%2Fapplications%2Fweb%2F{what}");
        assert_eq!(get(&e, &acme, &path).await.see_other(), expected, "the confirmation page");
        assert_eq!(post(&e, &acme, &path, &[("csrf_token", &token)]).await.see_other(), expected, "the action");
    }
    assert!(e.core.application(&platform(), "acme", "web").await.unwrap().enabled, "nothing happened");
    let login = get(
        &e,
        &Browser::anonymous(),
        "/login?reauth=1&return_to=%2Fportal%2Forgs%2Facme%2Fapplications%2Fweb%2Fdelete",
    )
    .await;
    assert!(login.body.contains("needs a recent sign-in"));

    // Signed in again: the confirmation, then the deletion.
    let acme = sign_in(&e, "admin@acme.test").await;
    let confirm = get(&e, &acme, "/portal/orgs/acme/applications/web/delete").await;
    assert_eq!(confirm.status, StatusCode::OK, "{}", confirm.snippet());
    assert!(
        confirm.body.contains("action=\"/portal/orgs/acme/applications/web/delete\"")
            && confirm.body.contains("cannot be undone")
    );
    let r = post(&e, &acme, "/portal/orgs/acme/applications/web/delete", &[("csrf_token", &token)]).await;
    assert_eq!(r.see_other(), "/portal/orgs/acme/applications?notice=app-deleted");
    assert!(get(&e, &acme, r.location()).await.body.contains("The application was deleted."));
    assert!(e.core.application(&platform(), "acme", "web").await.is_err());
    // Gone: its page says so, with an error id.
    get(&e, &acme, "/portal/orgs/acme/applications/web").await.assert_refused(StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn rotating_a_secret_shows_the_new_one_once_and_disabling_stops_tokens_until_enabled() {
    let e = world().await;
    let acme = sign_in(&e, "admin@acme.test").await;
    let token = csrf(&e);
    let r = post(
        &e,
        &acme,
        "/portal/orgs/acme/applications",
        &[
            ("csrf_token", &token),
            ("name", "Batch"),
            ("slug", "batch"),
            ("kind", "machine"),
            ("token_endpoint_auth_method", "client_secret_post"),
            ("redirect_uris", ""),
        ],
    )
    .await;
    let first = r.element("client-secret");
    assert!(r.element("curl-command").contains(&format!("-d 'client_secret={first}'")));
    assert!(get(&e, &acme, "/portal/orgs/acme/applications/batch/rotate-secret").await.body.contains("Rotate secret"));
    let r = post(&e, &acme, "/portal/orgs/acme/applications/batch/rotate-secret", &[("csrf_token", &token)]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.snippet());
    let second = r.element("client-secret");
    assert_ne!(first, second);
    assert!(r.body.contains("The previous secret keeps working until"));

    let r = post(&e, &acme, "/portal/orgs/acme/applications/batch/disable", &[("csrf_token", &token)]).await;
    assert_eq!(r.see_other(), "/portal/orgs/acme/applications/batch?notice=app-disabled");
    assert!(!e.core.application(&platform(), "acme", "batch").await.unwrap().enabled);
    let token_with = |secret: String| {
        let e = &e;
        async move {
            let body = form_urlencoded::Serializer::new(String::new())
                .extend_pairs([
                    ("grant_type", "client_credentials"),
                    ("client_id", "acme$batch"),
                    ("client_secret", &secret),
                ])
                .finish();
            let req = Request::post("/oauth2/token")
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(Body::from(body))
                .unwrap();
            send(e, req).await.status
        }
    };
    assert_eq!(token_with(second.clone()).await, StatusCode::UNAUTHORIZED, "a disabled application gets no token");
    let page = get(&e, &acme, r.location()).await;
    assert!(page.body.contains("badge-off") && page.body.contains("/batch/enable"));
    let r = post(&e, &acme, "/portal/orgs/acme/applications/batch/enable", &[("csrf_token", &token)]).await;
    assert_eq!(r.see_other(), "/portal/orgs/acme/applications/batch?notice=app-enabled");
    assert!(e.core.application(&platform(), "acme", "batch").await.unwrap().enabled);
    assert_eq!(token_with(second).await, StatusCode::OK);
    assert_eq!(token_with(first).await, StatusCode::OK, "the previous secret works during the grace period");
}

// ---- certificates ----------------------------------------------------------------------------

#[tokio::test]
async fn the_certificate_wizard_issues_from_an_uploaded_csr_and_revocation_needs_a_reason() {
    let e = world().await;
    let acme = sign_in(&e, "admin@acme.test").await;
    let token = csrf(&e);
    post(
        &e,
        &acme,
        "/portal/orgs/acme/applications",
        &[
            ("csrf_token", &token),
            ("name", "Web"),
            ("slug", "web"),
            ("kind", "machine"),
            ("token_endpoint_auth_method", "tls_client_auth"),
            ("redirect_uris", ""),
        ],
    )
    .await;
    let empty = get(&e, &acme, "/portal/orgs/acme/certificates").await;
    assert!(empty.body.contains("No certificate yet"));

    // Step 1: the application and the type.
    let step1 = get(&e, &acme, "/portal/orgs/acme/certificates/new").await;
    assert!(step1.body.contains("<option value=\"web\"") && step1.body.contains("value=\"transport\""));
    // Step 2: the command and the upload form.
    let step2 = get(&e, &acme, "/portal/orgs/acme/certificates/new?application=web&type=transport&key=p384").await;
    assert_eq!(step2.status, StatusCode::OK, "{}", step2.snippet());
    let cmd = step2.element("openssl-command");
    assert!(
        cmd.starts_with("openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-384")
            && cmd.contains("/CN=acme$web/O=acme"),
        "{cmd}"
    );
    assert!(step2.body.contains("enctype=\"multipart/form-data\"") && step2.body.contains("name=\"csr_file\""));
    // An unknown application goes back to step 1 with the error.
    get(&e, &acme, "/portal/orgs/acme/certificates/new?application=nope&type=transport")
        .await
        .assert_refused(StatusCode::NOT_FOUND);

    // Step 3: the upload. Without a CSRF token: refused.
    let csr = csr_for("acme$web");
    post_multipart(
        &e,
        &acme,
        "/portal/orgs/acme/certificates",
        &[("application", "web"), ("type", "transport")],
        &[("csr_file", "web.csr", &csr)],
    )
    .await
    .assert_refused(StatusCode::FORBIDDEN);
    // A CSR for another subject: step 2 again with the CA's reason.
    let wrong = csr_for("acme$other");
    let r = post_multipart(
        &e,
        &acme,
        "/portal/orgs/acme/certificates",
        &[("csrf_token", &token), ("application", "web"), ("type", "transport"), ("key", "p256"), ("csr", "")],
        &[("csr_file", "web.csr", &wrong)],
    )
    .await;
    r.assert_refused(StatusCode::BAD_REQUEST);
    assert!(r.body.contains("id=\"openssl-command\""), "step 2 again");
    let r = post_multipart(
        &e,
        &acme,
        "/portal/orgs/acme/certificates",
        &[("csrf_token", &token), ("application", "web"), ("type", "transport"), ("key", "p256"), ("csr", "")],
        &[("csr_file", "web.csr", &csr)],
    )
    .await;
    let detail = r.see_other().to_owned();
    assert!(
        detail.starts_with("/portal/orgs/acme/certificates/") && detail.ends_with("?notice=cert-issued"),
        "{detail}"
    );
    // Step 4: the downloads.
    let page = get(&e, &acme, &detail).await;
    assert!(page.body.contains("badge-active") && page.body.contains("id=\"download-certificate\""));
    let id = detail.trim_start_matches("/portal/orgs/acme/certificates/").split('?').next().unwrap().to_owned();
    let cert = get(&e, &acme, &format!("/portal/orgs/acme/certificates/{id}/certificate.pem")).await;
    assert_eq!(cert.status, StatusCode::OK);
    assert!(cert.body.starts_with("-----BEGIN CERTIFICATE-----"));
    let disposition = cert.headers.get(header::CONTENT_DISPOSITION).unwrap().to_str().unwrap().to_owned();
    assert!(
        disposition.starts_with("attachment; filename=\"acme-web-transport-")
            && disposition.ends_with("-certificate.pem\""),
        "{disposition}"
    );
    let chain = get(&e, &acme, &format!("/portal/orgs/acme/certificates/{id}/chain.pem")).await;
    assert_eq!(chain.body.matches("-----BEGIN CERTIFICATE-----").count(), 2, "issuing and root CA");
    let full = get(&e, &acme, &format!("/portal/orgs/acme/certificates/{id}/fullchain.pem")).await;
    assert_eq!(full.body, format!("{}{}", cert.body, chain.body));
    get(&e, &acme, &format!("/portal/orgs/acme/certificates/{id}/key.pem")).await.assert_refused(StatusCode::NOT_FOUND);
    // Another organisation's admin cannot download it.
    let globex = sign_in(&e, "admin@globex.test").await;
    get(&e, &globex, &format!("/portal/orgs/acme/certificates/{id}/certificate.pem"))
        .await
        .assert_refused(StatusCode::FORBIDDEN);

    // The list and its filters.
    let list = get(&e, &acme, "/portal/orgs/acme/certificates?status=active&type=transport&expiring=400").await;
    assert!(list.body.contains(&format!("/portal/orgs/acme/certificates/{id}\"")));
    let none = get(&e, &acme, "/portal/orgs/acme/certificates?status=revoked").await;
    assert!(none.body.contains("No certificate matches"));
    get(&e, &acme, "/portal/orgs/acme/certificates?expiring=soon").await.assert_refused(StatusCode::BAD_REQUEST);

    // Revocation: the reason, then the CRL.
    let confirm = get(&e, &acme, &format!("/portal/orgs/acme/certificates/{id}/revoke")).await;
    assert!(confirm.body.contains("<option value=\"key_compromise\">"));
    let r = post(
        &e,
        &acme,
        &format!("/portal/orgs/acme/certificates/{id}/revoke"),
        &[("csrf_token", &token), ("reason", "bogus")],
    )
    .await;
    r.assert_refused(StatusCode::BAD_REQUEST);
    let r = post(
        &e,
        &acme,
        &format!("/portal/orgs/acme/certificates/{id}/revoke"),
        &[("csrf_token", &token), ("reason", "key_compromise")],
    )
    .await;
    assert_eq!(r.see_other(), format!("/portal/orgs/acme/certificates/{id}?notice=cert-revoked"));
    let page = get(&e, &acme, r.location()).await;
    assert!(
        page.body.contains("badge-revoked")
            && page.body.contains("(key_compromise)")
            && !page.body.contains("id=\"revoke\"")
    );
    assert!(get(&e, &acme, "/portal/orgs/acme/certificates?status=revoked").await.body.contains(&id));
}

#[tokio::test]
async fn renewal_uploads_a_new_csr_for_the_same_application() {
    let e = world().await;
    let acme = sign_in(&e, "admin@acme.test").await;
    let token = csrf(&e);
    post(
        &e,
        &acme,
        "/portal/orgs/acme/applications",
        &[
            ("csrf_token", &token),
            ("name", "Signer"),
            ("slug", "signer"),
            ("kind", "machine"),
            ("token_endpoint_auth_method", "private_key_jwt"),
            ("redirect_uris", ""),
        ],
    )
    .await;
    let csr = csr_for("acme$signer");
    let r = post_multipart(
        &e,
        &acme,
        "/portal/orgs/acme/certificates",
        &[("csrf_token", &token), ("application", "signer"), ("type", "signing"), ("key", "p256"), ("csr", &csr)],
        &[],
    )
    .await;
    let first =
        r.see_other().trim_start_matches("/portal/orgs/acme/certificates/").split('?').next().unwrap().to_owned();
    let form = get(&e, &acme, &format!("/portal/orgs/acme/certificates/{first}/renew")).await;
    assert!(form.body.contains(&format!("action=\"/portal/orgs/acme/certificates/{first}/renew\"")));
    let r = post_multipart(
        &e,
        &acme,
        &format!("/portal/orgs/acme/certificates/{first}/renew"),
        &[("csrf_token", &token), ("csr", "")],
        &[("csr_file", "s.csr", &csr_for("acme$signer"))],
    )
    .await;
    let second = r.see_other().to_owned();
    assert!(second.ends_with("?notice=cert-renewed"));
    let page = get(&e, &acme, &second).await;
    assert!(page.body.contains(&format!("href=\"/portal/orgs/acme/certificates/{first}\"")), "links the renewed one");
}

#[tokio::test]
async fn the_portal_assets_are_served() {
    let e = world().await;
    let css = get(&e, &Browser::anonymous(), "/assets/portal.css").await;
    assert_eq!(css.headers.get(header::CONTENT_TYPE).unwrap(), "text/css; charset=utf-8");
    let js = get(&e, &Browser::anonymous(), "/assets/portal.js").await;
    assert_eq!(js.headers.get(header::CONTENT_TYPE).unwrap(), "text/javascript; charset=utf-8");
    assert!(js.body.contains("data-copy"));
}

// ---- users -----------------------------------------------------------------------------------

/// The id of the acme user with this address.
async fn user_id(e: &Env, email: &str) -> String {
    e.core
        .search_users(&platform(), "acme", Some(email), portcullis_core::model::Page::default())
        .await
        .unwrap()
        .into_iter()
        .find(|u| u.email.as_str() == email)
        .unwrap()
        .id
}

#[tokio::test]
async fn users_are_invited_searched_given_roles_disabled_and_signed_out() {
    let e = world().await;
    let acme = sign_in(&e, "admin@acme.test").await;
    let token = csrf(&e);

    // The list, searchable.
    let list = get(&e, &acme, "/portal/orgs/acme/users").await;
    assert!(list.body.contains("dev@acme.test") && list.body.contains("admin@acme.test"));
    let found = get(&e, &acme, "/portal/orgs/acme/users?q=dev").await;
    assert!(found.body.contains(">dev@acme.test</a>") && !found.body.contains(">admin@acme.test</a>"));
    assert!(get(&e, &acme, "/portal/orgs/acme/users?q=nobody").await.body.contains("No user matches"));

    // An invitation: a user without a password and a mail with the link.
    let invite = get(&e, &acme, "/portal/orgs/acme/users/invite").await;
    assert!(
        invite.body.contains("value=\"payments:reader\"") && invite.body.contains("value=\"portcullis:org-admin\"")
    );
    let r = post(
        &e,
        &acme,
        "/portal/orgs/acme/users",
        &[("csrf_token", &token), ("email", "new@acme.test"), ("name", "New Person"), ("roles", "payments:reader")],
    )
    .await;
    let page = r.see_other().to_owned();
    assert!(page.ends_with("?notice=user-invited"), "{page}");
    e.core.deliver_mail().await.unwrap();
    let links = |e: &Env| {
        e.mailer.sent().into_iter().filter(|m| m.to == "new@acme.test" && m.text.contains("/invite?token=")).count()
    };
    assert_eq!(links(&e), 1);
    let user = get(&e, &acme, &page).await;
    assert!(user.body.contains("badge-expired\">invited") && user.body.contains("id=\"resend\""));
    let id = user_id(&e, "new@acme.test").await;
    // The same address again: the form comes back with the error.
    let r =
        post(&e, &acme, "/portal/orgs/acme/users", &[("csrf_token", &token), ("email", "new@acme.test"), ("name", "")])
            .await;
    r.assert_refused(StatusCode::CONFLICT);
    assert!(r.body.contains("value=\"new@acme.test\""));
    // Another link.
    let r = post(&e, &acme, &format!("/portal/orgs/acme/users/{id}/invitation"), &[("csrf_token", &token)]).await;
    assert!(r.see_other().ends_with("?notice=user-reinvited"));
    e.core.deliver_mail().await.unwrap();
    assert_eq!(links(&e), 2);

    // Roles: the form sets exactly the checked ones.
    let dev = user_id(&e, "dev@acme.test").await;
    let r = post(
        &e,
        &acme,
        &format!("/portal/orgs/acme/users/{dev}/roles"),
        &[("csrf_token", &token), ("roles", "payments:reader")],
    )
    .await;
    assert!(r.see_other().ends_with("?notice=user-roles"));
    let roles = |id: String| {
        let e = &e;
        async move {
            e.core
                .user(&platform(), "acme", &id)
                .await
                .unwrap()
                .roles
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(roles(dev.clone()).await, ["payments:reader"]);
    post(&e, &acme, &format!("/portal/orgs/acme/users/{dev}/roles"), &[("csrf_token", &token)]).await;
    assert!(roles(dev.clone()).await.is_empty());
    // A role no service defines is refused, with nothing else changed.
    let r = post(
        &e,
        &acme,
        &format!("/portal/orgs/acme/users/{dev}/roles"),
        &[("csrf_token", &token), ("roles", "made:up")],
    )
    .await;
    r.assert_refused(StatusCode::BAD_REQUEST);
    // The platform admin role is not offered to an org admin, and not taken when sent.
    let r = post(
        &e,
        &acme,
        &format!("/portal/orgs/acme/users/{dev}/roles"),
        &[("csrf_token", &token), ("roles", "portcullis:admin")],
    )
    .await;
    r.assert_refused(StatusCode::BAD_REQUEST);
    assert!(roles(dev.clone()).await.is_empty());

    // Sessions: the dev signs in; the admin sees it and ends it.
    let dev_browser = sign_in(&e, "dev@acme.test").await;
    let page = get(&e, &acme, &format!("/portal/orgs/acme/users/{dev}")).await;
    let revoke_link = format!("/portal/orgs/acme/users/{dev}/sessions/");
    assert!(page.body.contains(&revoke_link) && page.body.contains("Sign out everywhere"));
    let r = post(&e, &acme, &format!("/portal/orgs/acme/users/{dev}/sessions/revoke"), &[("csrf_token", &token)]).await;
    assert!(r.see_other().ends_with("?notice=sessions-revoked"));
    assert!(e.core.account_session(dev_browser.sso.as_deref().unwrap()).await.is_err(), "the dev's session ended");

    // Disable (after a confirmation) and enable.
    assert!(get(&e, &acme, &format!("/portal/orgs/acme/users/{dev}/disable")).await.body.contains("Disable user"));
    let r = post(&e, &acme, &format!("/portal/orgs/acme/users/{dev}/disable"), &[("csrf_token", &token)]).await;
    assert!(r.see_other().ends_with("?notice=user-disabled"));
    assert!(!e.core.user(&platform(), "acme", &dev).await.unwrap().enabled);
    post(&e, &acme, &format!("/portal/orgs/acme/users/{dev}/enable"), &[("csrf_token", &token)]).await;
    assert!(e.core.user(&platform(), "acme", &dev).await.unwrap().enabled);
    // No second factor to reset: the page says so with an id.
    post(&e, &acme, &format!("/portal/orgs/acme/users/{dev}/reset-totp"), &[("csrf_token", &token)])
        .await
        .assert_refused(StatusCode::NOT_FOUND);

    // Another organisation's users are out of reach.
    let globex_admin = user_id_in(&e, "globex", "admin@globex.test").await;
    get(&e, &acme, &format!("/portal/orgs/globex/users/{globex_admin}")).await.assert_refused(StatusCode::FORBIDDEN);
    get(&e, &acme, &format!("/portal/orgs/acme/users/{globex_admin}")).await.assert_refused(StatusCode::NOT_FOUND);
    post(&e, &acme, &format!("/portal/orgs/acme/users/{globex_admin}/disable"), &[("csrf_token", &token)])
        .await
        .assert_refused(StatusCode::NOT_FOUND);
}

async fn user_id_in(e: &Env, org: &str, email: &str) -> String {
    e.core
        .search_users(&platform(), org, Some(email), portcullis_core::model::Page::default())
        .await
        .unwrap()
        .into_iter()
        .next()
        .unwrap()
        .id
}

#[tokio::test]
async fn user_actions_need_a_recent_sign_in() {
    let e = world().await;
    let acme = sign_in(&e, "admin@acme.test").await;
    let dev = user_id(&e, "dev@acme.test").await;
    e.clock.advance(11 * 60);
    for what in ["disable", "reset-totp", "sessions/revoke"] {
        let path = format!("/portal/orgs/acme/users/{dev}/{what}");
        let r = post(&e, &acme, &path, &[("csrf_token", &csrf(&e))]).await;
        assert!(r.see_other().starts_with("/login?reauth=1&return_to=%2Fportal%2Forgs%2Facme%2Fusers%2F"), "{what}");
    }
    assert!(e.core.user(&platform(), "acme", &dev).await.unwrap().enabled);
}

// ---- audit -----------------------------------------------------------------------------------

#[tokio::test]
async fn the_audit_log_filters_by_actor_action_outcome_and_day() {
    let e = world().await;
    let acme = sign_in(&e, "admin@acme.test").await;
    let ctx = RequestContext::default();
    assert!(
        e.core
            .browser_login(&ctx, "dev@acme.test", SecretString::from("wrong-password-123"), None, None)
            .await
            .is_err()
    );
    let admin = user_id(&e, "admin@acme.test").await;

    let all = get(&e, &acme, "/portal/orgs/acme/audit").await;
    assert_eq!(all.status, StatusCode::OK);
    assert!(all.body.contains("<code>user.create</code>") && all.body.contains("<code>session.login</code>"));
    let failures = get(&e, &acme, "/portal/orgs/acme/audit?outcome=failure").await;
    assert!(failures.body.contains("session.login") && !failures.body.contains("<code>user.create</code>"));
    let mine = get(&e, &acme, &format!("/portal/orgs/acme/audit?actor={admin}&action=session.")).await;
    assert!(mine.body.contains("session.verify") && !mine.body.contains("user.create"));
    // The clock of the tests is 2030-03-17: that day has events, the day before none.
    let day = |d: &str| format!("/portal/orgs/acme/audit?from={d}&to={d}");
    assert!(get(&e, &acme, &day("2030-03-17")).await.body.contains("<code>user.create</code>"));
    assert!(get(&e, &acme, &day("2030-03-16")).await.body.contains("No event matches"));
    get(&e, &acme, "/portal/orgs/acme/audit?from=yesterday").await.assert_refused(StatusCode::BAD_REQUEST);
    get(&e, &acme, "/portal/orgs/acme/audit?outcome=maybe").await.assert_refused(StatusCode::BAD_REQUEST);
    get(&e, &acme, "/portal/orgs/globex/audit").await.assert_refused(StatusCode::FORBIDDEN);
}

// ---- API keys --------------------------------------------------------------------------------

#[tokio::test]
async fn api_keys_are_created_activated_with_the_mailed_code_and_revoked() {
    let e = world().await;
    let acme = sign_in(&e, "admin@acme.test").await;
    let token = csrf(&e);
    let list = get(&e, &acme, "/portal/api-keys").await;
    assert!(list.body.contains("You have no API key yet") && list.body.contains("value=\"portcullis:org-admin\""));

    let r = post(
        &e,
        &acme,
        "/portal/api-keys",
        &[("csrf_token", &token), ("name", "ci"), ("expires", ""), ("roles", "portcullis:org-admin")],
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.snippet());
    let (key, secret) = (r.element("api-key"), r.element("api-secret"));
    let verification =
        r.body.split("name=\"verification_id\" value=\"").nth(1).unwrap().split('"').next().unwrap().to_owned();
    // Pending until the code is entered.
    let call = |key: String, secret: String| {
        let e = &e;
        async move {
            let req = Request::get("/api/v1/organisations/acme")
                .header("api-key", key)
                .header("api-secret", secret)
                .body(Body::empty())
                .unwrap();
            send(e, req).await.status
        }
    };
    assert_eq!(call(key.clone(), secret.clone()).await, StatusCode::UNAUTHORIZED);
    e.core.deliver_mail().await.unwrap();
    let mail = e.mailer.sent().into_iter().rfind(|m| m.to == "admin@acme.test").unwrap();
    let code = mail
        .text
        .split_whitespace()
        .find(|w| w.len() == 6 && w.bytes().all(|b| b.is_ascii_digit()))
        .unwrap()
        .to_owned();
    let wrong = post(
        &e,
        &acme,
        "/portal/api-keys/verify",
        &[("csrf_token", &token), ("verification_id", &verification), ("code", "000000")],
    )
    .await;
    wrong.assert_refused(StatusCode::UNAUTHORIZED);
    assert!(wrong.body.contains(&format!("name=\"verification_id\" value=\"{verification}\"")), "the form again");
    assert!(!wrong.body.contains(&secret));
    let r = post(
        &e,
        &acme,
        "/portal/api-keys/verify",
        &[("csrf_token", &token), ("verification_id", &verification), ("code", &code)],
    )
    .await;
    assert_eq!(r.see_other(), "/portal/api-keys?notice=key-activated");
    assert_eq!(call(key.clone(), secret.clone()).await, StatusCode::OK);
    let list = get(&e, &acme, "/portal/api-keys").await;
    assert!(list.body.contains(&key) && list.body.contains("badge-ok\">active") && !list.body.contains(&secret));

    // Searched by a part of the name or the start of the key, the query kept in the page.
    let found = get(&e, &acme, "/portal/api-keys?q=C").await;
    assert!(found.body.contains(&key) && found.body.contains("value=\"C\""), "{}", found.snippet());
    let prefix = &key[..key.len().min(6)];
    assert!(get(&e, &acme, &format!("/portal/api-keys?q={prefix}")).await.body.contains(&key));
    let none = get(&e, &acme, "/portal/api-keys?q=nothing-like-it").await;
    assert!(!none.body.contains(&key) && none.body.contains("No API key matches"), "{}", none.snippet());
    get(&e, &acme, &format!("/portal/api-keys?q={}", "x".repeat(101))).await.assert_refused(StatusCode::BAD_REQUEST);

    // A role the admin does not hold: refused in the page.
    let r = post(
        &e,
        &acme,
        "/portal/api-keys",
        &[("csrf_token", &token), ("name", "x"), ("expires", ""), ("roles", "portcullis:admin")],
    )
    .await;
    r.assert_refused(StatusCode::FORBIDDEN);
    assert!(r.body.contains("not one of yours") && r.body.contains("id=\"new-key\""), "the form again");

    // Revocation.
    let id = list.body.split("/portal/api-keys/").nth(1).unwrap().split('/').next().unwrap().to_owned();
    assert!(get(&e, &acme, &format!("/portal/api-keys/{id}/revoke")).await.body.contains("Revoke API key"));
    let r = post(&e, &acme, &format!("/portal/api-keys/{id}/revoke"), &[("csrf_token", &token)]).await;
    assert_eq!(r.see_other(), "/portal/api-keys?notice=key-revoked");
    assert_eq!(call(key, secret).await, StatusCode::UNAUTHORIZED);
    // Someone else's key is not found.
    let globex = sign_in(&e, "admin@globex.test").await;
    post(&e, &globex, &format!("/portal/api-keys/{id}/revoke"), &[("csrf_token", &token)])
        .await
        .assert_refused(StatusCode::NOT_FOUND);
}

// ---- services, roles, permissions --------------------------------------------------------------

fn service_form(token: &str, slug: &str, roles: &str) -> Vec<(&'static str, String)> {
    vec![
        ("csrf_token", token.to_owned()),
        ("name", "Billing".to_owned()),
        ("slug", slug.to_owned()),
        ("audience", format!("https://{slug}.acme.test")),
        ("scopes", format!("{slug}/read")),
        ("roles", roles.to_owned()),
        ("permissions", format!("{slug}.invoice.read\n{slug}.invoice.write")),
    ]
}

async fn post_owned(e: &Env, b: &Browser, path: &str, fields: &[(&'static str, String)]) -> Resp {
    let f: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
    post(e, b, path, &f).await
}

#[tokio::test]
async fn services_are_defined_their_permissions_granted_and_who_holds_a_role_shown() {
    let e = world().await;
    let acme = sign_in(&e, "admin@acme.test").await;
    let token = csrf(&e);
    let list = get(&e, &acme, "/portal/orgs/acme/services").await;
    assert_eq!(list.status, StatusCode::OK, "{}", list.snippet());
    assert!(list.body.contains("href=\"/portal/orgs/acme/services/payments\"") && list.body.contains("aria-current"));
    assert!(get(&e, &acme, "/portal/orgs/acme/services?q=nothing-like-it").await.body.contains("No service matches"));
    assert!(get(&e, &acme, "/portal/orgs/acme/services?q=READER").await.body.contains("/services/payments\""));
    get(&e, &acme, &format!("/portal/orgs/acme/services?q={}", "x".repeat(101)))
        .await
        .assert_refused(StatusCode::BAD_REQUEST);

    // Validation as in the API, shown with its id; the form keeps what was typed.
    let r =
        post_owned(&e, &acme, "/portal/orgs/acme/services", &service_form(&token, "billing", "billing-admin")).await;
    r.assert_refused(StatusCode::BAD_REQUEST);
    assert!(r.body.contains("expected service:level") && r.body.contains("billing-admin"), "{}", r.snippet());
    let r =
        post_owned(&e, &acme, "/portal/orgs/acme/services", &service_form(&token, "billing", "payments:admin")).await;
    r.assert_refused(StatusCode::BAD_REQUEST);
    assert!(r.body.contains("must start with this service"));

    let r = post_owned(
        &e,
        &acme,
        "/portal/orgs/acme/services",
        &service_form(&token, "billing", "billing:admin\r\nbilling:viewer"),
    )
    .await;
    assert_eq!(r.see_other(), "/portal/orgs/acme/services/billing?notice=service-created");
    let page = get(&e, &acme, r.location()).await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.snippet());
    assert!(page.body.contains("The service is defined."));
    assert!(page.body.contains("href=\"/portal/orgs/acme/services/billing/roles/admin\""));
    assert!(page.body.contains("<code>billing.invoice.write</code>") && page.body.contains("no role"));
    let again = post_owned(&e, &acme, "/portal/orgs/acme/services", &service_form(&token, "billing", "")).await;
    again.assert_refused(StatusCode::CONFLICT);

    // Grants: exactly the checked permissions; another service's permission is refused.
    let role_path = "/portal/orgs/acme/services/billing/roles/admin";
    let r = post(&e, &acme, role_path, &[("csrf_token", &token), ("permissions", "billing.invoice.read")]).await;
    assert_eq!(r.see_other(), format!("{role_path}?notice=role-grants"));
    let roles = e.core.roles(&platform(), "acme").await.unwrap();
    let granted = |role: &str| {
        roles.iter().find(|(r, _)| r.as_str() == role).unwrap().1.iter().map(ToString::to_string).collect::<Vec<_>>()
    };
    assert_eq!(granted("billing:admin"), ["billing.invoice.read"]);
    let page = get(&e, &acme, "/portal/orgs/acme/services/billing").await;
    let perms = &page.body[page.body.find("id=\"permissions\"").unwrap()..];
    assert!(perms.contains("<code>billing.invoice.read</code></th>\n<td><code>billing:admin</code>"), "{perms}");
    let r = post(&e, &acme, role_path, &[("csrf_token", &token), ("permissions", "payments.invoice.read")]).await;
    r.assert_refused(StatusCode::BAD_REQUEST);
    assert_eq!(
        get(&e, &acme, "/portal/orgs/acme/audit?action=role.")
            .await
            .body
            .matches("<code>role.set_permissions</code>")
            .count(),
        1,
        "the grant is audited as in the API"
    );

    // Who holds it: a user and an application.
    let dev = user_id(&e, "dev@acme.test").await;
    let r = post(
        &e,
        &acme,
        &format!("/portal/orgs/acme/users/{dev}/roles"),
        &[("csrf_token", &token), ("roles", "billing:admin")],
    )
    .await;
    assert!(r.see_other().contains("notice=user-roles"));
    let app = post(
        &e,
        &acme,
        "/portal/orgs/acme/applications",
        &[
            ("csrf_token", &token),
            ("name", "Ledger"),
            ("slug", "ledger"),
            ("kind", "machine"),
            ("token_endpoint_auth_method", ""),
            ("redirect_uris", ""),
            ("roles", "billing:admin"),
        ],
    )
    .await;
    assert_eq!(app.status, StatusCode::CREATED, "{}", app.snippet());
    let role = get(&e, &acme, role_path).await;
    assert_eq!(role.status, StatusCode::OK, "{}", role.snippet());
    let users = &role.body[role.body.find("id=\"role-users\"").unwrap()..];
    assert!(users.contains("dev@acme.test") && !users.contains("admin@acme.test"), "{users}");
    assert!(role.body.contains("<code>acme$ledger</code>") || role.body.contains("<code>acme&#36;ledger</code>"));
    assert!(role.body.contains("value=\"billing.invoice.read\" checked"));
    let viewer = get(&e, &acme, "/portal/orgs/acme/services/billing/roles/viewer").await;
    assert!(viewer.body.contains("No user holds this role") && viewer.body.contains("No application holds this role"));
    get(&e, &acme, "/portal/orgs/acme/services/billing/roles/nobody").await.assert_refused(StatusCode::NOT_FOUND);
    get(&e, &acme, "/portal/orgs/acme/services/nothing").await.assert_refused(StatusCode::NOT_FOUND);
    // The permission now reaches the user through the role.
    let d = e
        .core
        .authz_check(
            &platform(),
            portcullis_core::usecases::AuthzCheck {
                subject: dev.clone(),
                permission: "billing.invoice.read".into(),
                resource: None,
                organisation: Some("acme".into()),
            },
        )
        .await
        .unwrap();
    assert!(d.allowed, "{d:?}");
}

#[tokio::test]
async fn an_org_admin_cannot_see_or_change_another_organisations_services() {
    let e = world().await;
    let globex = sign_in(&e, "admin@globex.test").await;
    let token = csrf(&e);
    for path in [
        "/portal/orgs/acme/services",
        "/portal/orgs/acme/services/new",
        "/portal/orgs/acme/services/payments",
        "/portal/orgs/acme/services/payments/roles/reader",
        "/portal/orgs/acme/services/payments/delete",
    ] {
        let r = get(&e, &globex, path).await;
        r.assert_refused(StatusCode::FORBIDDEN);
        assert!(!r.body.contains("payments:reader"), "{path}");
    }
    let r =
        post_owned(&e, &globex, "/portal/orgs/acme/services", &service_form(&token, "sneaky", "sneaky:admin")).await;
    r.assert_refused(StatusCode::FORBIDDEN);
    assert!(e.core.service(&platform(), "acme", "sneaky").await.is_err());
    post(&e, &globex, "/portal/orgs/acme/services/payments/roles/reader", &[("csrf_token", &token)])
        .await
        .assert_refused(StatusCode::FORBIDDEN);
    post(&e, &globex, "/portal/orgs/acme/services/payments/delete", &[("csrf_token", &token)])
        .await
        .assert_refused(StatusCode::FORBIDDEN);
    assert!(e.core.service(&platform(), "acme", "payments").await.is_ok());
    // Its own list is empty, with the way to define one.
    let own = get(&e, &globex, "/portal/orgs/globex/services").await;
    assert!(own.body.contains("Define the first service") && !own.body.contains("payments"));

    // Without the CSRF token nothing is defined, even in one's own organisation.
    let acme = sign_in(&e, "admin@acme.test").await;
    let mut f = service_form("", "billing", "billing:admin");
    f.retain(|(k, _)| *k != "csrf_token");
    post_owned(&e, &acme, "/portal/orgs/acme/services", &f).await.assert_refused(StatusCode::FORBIDDEN);
    post(&e, &acme, "/portal/orgs/acme/services/payments/roles/reader", &[("permissions", "x")])
        .await
        .assert_refused(StatusCode::FORBIDDEN);
    assert!(e.core.service(&platform(), "acme", "billing").await.is_err());
}

#[tokio::test]
async fn deleting_a_service_needs_a_recent_sign_in_and_no_holder_of_its_roles() {
    let e = world().await;
    let acme = sign_in(&e, "admin@acme.test").await;
    let token = csrf(&e);
    let path = "/portal/orgs/acme/services/payments/delete";
    e.clock.advance(11 * 60);
    let expected = "/login?reauth=1&return_to=%2Fportal%2Forgs%2Facme%2Fservices%2Fpayments%2Fdelete";
    assert_eq!(get(&e, &acme, path).await.see_other(), expected);
    assert_eq!(post(&e, &acme, path, &[("csrf_token", &token)]).await.see_other(), expected);
    assert!(e.core.service(&platform(), "acme", "payments").await.is_ok());

    let acme = sign_in(&e, "admin@acme.test").await;
    let confirm = get(&e, &acme, path).await;
    assert_eq!(confirm.status, StatusCode::OK, "{}", confirm.snippet());
    assert!(confirm.body.contains(&format!("action=\"{path}\"")) && confirm.body.contains("cannot be undone"));
    // Still held by a user: refused, naming them, with an error id.
    let ctx = RequestContext::default();
    let dev = user_id(&e, "dev@acme.test").await;
    e.core.set_user_role(&platform(), &ctx, "acme", &dev, "payments:reader", true).await.unwrap();
    let r = post(&e, &acme, path, &[("csrf_token", &token)]).await;
    r.assert_refused(StatusCode::CONFLICT);
    assert!(r.body.contains("dev@acme.test"));
    e.core.set_user_role(&platform(), &ctx, "acme", &dev, "payments:reader", false).await.unwrap();
    let r = post(&e, &acme, path, &[("csrf_token", &token)]).await;
    assert_eq!(r.see_other(), "/portal/orgs/acme/services?notice=service-deleted");
    assert!(get(&e, &acme, r.location()).await.body.contains("Define the first service"));
    assert!(e.core.service(&platform(), "acme", "payments").await.is_err());
}

// ---- search ----------------------------------------------------------------------------------

#[tokio::test]
async fn application_and_organisation_lists_are_searched_with_the_query_kept_in_page_links() {
    let e = world().await;
    let ctx = RequestContext::default();
    for i in 0..26 {
        e.core
            .create_application(
                &platform(),
                &ctx,
                "acme",
                portcullis_core::usecases::NewApplication {
                    slug: format!("batch-{i:02}"),
                    name: format!("Nightly batch {i}"),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
    }
    e.core
        .create_application(
            &platform(),
            &ctx,
            "acme",
            portcullis_core::usecases::NewApplication { slug: "web".into(), name: "Shop".into(), ..Default::default() },
        )
        .await
        .unwrap();
    let acme = sign_in(&e, "admin@acme.test").await;
    let first = get(&e, &acme, "/portal/orgs/acme/applications?q=BATCH").await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.snippet());
    assert!(first.body.contains("value=\"BATCH\""), "the query stays in the box");
    assert!(!first.body.contains("Shop") && first.body.contains("Nightly batch 0"));
    let pager = &first.body[first.body.find("class=\"pager\"").unwrap()..];
    assert!(pager.contains("href=\"/portal/orgs/acme/applications?q=BATCH&#38;page=2\""), "{pager}");
    let second = get(&e, &acme, "/portal/orgs/acme/applications?q=BATCH&page=2").await;
    assert!(second.body.contains("Nightly batch 25") && !second.body.contains("Nightly batch 24<"));
    assert!(second.body.contains("href=\"/portal/orgs/acme/applications?q=BATCH\""), "back to page 1 keeps the query");
    let shop = get(&e, &acme, "/portal/orgs/acme/applications?q=sho").await;
    assert!(shop.body.contains("Shop") && !shop.body.contains("Nightly"));
    assert!(get(&e, &acme, "/portal/orgs/acme/applications?q=zzz").await.body.contains("No application matches"));
    get(&e, &acme, &format!("/portal/orgs/acme/applications?q={}", "a".repeat(101)))
        .await
        .assert_refused(StatusCode::BAD_REQUEST);
    get(&e, &acme, "/portal/orgs/globex/applications?q=batch").await.assert_refused(StatusCode::FORBIDDEN);

    // The dashboard: platform admins search every organisation; an org admin only finds theirs.
    let root = sign_in(&e, ROOT).await;
    let r = get(&e, &root, "/portal?q=GLOB").await;
    assert!(
        r.body.contains("href=\"/portal/orgs/globex/applications\"")
            && !r.body.contains("<h2><a href=\"/portal/orgs/acme/")
    );
    assert!(get(&e, &root, "/portal?q=nothing").await.body.contains("No organisation matches"));
    let r = get(&e, &acme, "/portal?q=glob").await;
    assert!(!r.body.contains("globex") && r.body.contains("No organisation matches"));
    assert!(get(&e, &acme, "/portal?q=acm").await.body.contains("<h2><a href=\"/portal/orgs/acme/applications\">"));
    get(&e, &root, &format!("/portal?q={}", "a".repeat(101))).await.assert_refused(StatusCode::BAD_REQUEST);
}

// ---- users: name, deletion; audit actors ------------------------------------------------------

#[tokio::test]
async fn users_are_renamed_and_deleted_after_a_confirmation_and_a_recent_sign_in() {
    let e = world().await;
    let acme = sign_in(&e, "admin@acme.test").await;
    let token = csrf(&e);
    let dev = user_id(&e, "dev@acme.test").await;
    let page = format!("/portal/orgs/acme/users/{dev}");

    let r = post(&e, &acme, &format!("{page}/name"), &[("csrf_token", &token), ("name", "Dev Eloper")]).await;
    assert_eq!(r.see_other(), format!("{page}?notice=user-renamed"));
    assert_eq!(e.core.user(&platform(), "acme", &dev).await.unwrap().name.as_deref(), Some("Dev Eloper"));
    assert!(get(&e, &acme, &page).await.body.contains("value=\"Dev Eloper\""));
    // A refused name: the user's page again, the message and its id, what was typed kept.
    let r = post(&e, &acme, &format!("{page}/name"), &[("csrf_token", &token), ("name", "   ")]).await;
    r.assert_refused(StatusCode::BAD_REQUEST);
    assert!(r.body.contains("name must be 1 to 200 characters") && r.body.contains("id=\"name-form\""));
    post(&e, &acme, &format!("{page}/name"), &[("name", "No Token")]).await.assert_refused(StatusCode::FORBIDDEN);
    assert_eq!(e.core.user(&platform(), "acme", &dev).await.unwrap().name.as_deref(), Some("Dev Eloper"));
    // Another organisation's admin changes nothing.
    let globex = sign_in(&e, "admin@globex.test").await;
    post(&e, &globex, &format!("{page}/name"), &[("csrf_token", &token), ("name", "Pwned")])
        .await
        .assert_refused(StatusCode::FORBIDDEN);
    post(&e, &globex, &format!("{page}/delete"), &[("csrf_token", &token)]).await.assert_refused(StatusCode::FORBIDDEN);

    // Deletion: confirmed, and only after a recent sign-in.
    e.clock.advance(11 * 60);
    let expected = format!("/login?reauth=1&return_to=%2Fportal%2Forgs%2Facme%2Fusers%2F{dev}%2Fdelete");
    assert_eq!(get(&e, &acme, &format!("{page}/delete")).await.see_other(), expected);
    assert_eq!(post(&e, &acme, &format!("{page}/delete"), &[("csrf_token", &token)]).await.see_other(), expected);
    assert!(e.core.user(&platform(), "acme", &dev).await.is_ok());
    let acme = sign_in(&e, "admin@acme.test").await;
    let confirm = get(&e, &acme, &format!("{page}/delete")).await;
    assert_eq!(confirm.status, StatusCode::OK, "{}", confirm.snippet());
    assert!(confirm.body.contains("dev@acme.test") && confirm.body.contains("cannot be undone"));
    let r = post(&e, &acme, &format!("{page}/delete"), &[("csrf_token", &token)]).await;
    assert_eq!(r.see_other(), "/portal/orgs/acme/users?notice=user-deleted");
    assert!(e.core.user(&platform(), "acme", &dev).await.is_err());
    get(&e, &acme, &page).await.assert_refused(StatusCode::NOT_FOUND);
    // Oneself: refused by the use case, shown with an id.
    let me = user_id(&e, "admin@acme.test").await;
    post(&e, &acme, &format!("/portal/orgs/acme/users/{me}/delete"), &[("csrf_token", &token)])
        .await
        .assert_refused(StatusCode::CONFLICT);
}

#[tokio::test]
async fn the_audit_log_shows_user_actors_by_email_and_filters_by_email() {
    let e = world().await;
    let acme = sign_in(&e, "admin@acme.test").await;
    let admin = user_id(&e, "admin@acme.test").await;
    let dev = user_id(&e, "dev@acme.test").await;
    let r =
        post(&e, &acme, &format!("/portal/orgs/acme/users/{dev}/name"), &[("csrf_token", &csrf(&e)), ("name", "D")])
            .await;
    r.see_other();
    let log = get(&e, &acme, "/portal/orgs/acme/audit?action=user.update").await;
    assert_eq!(log.status, StatusCode::OK);
    assert!(
        log.body.contains(&format!("<a href=\"/portal/orgs/acme/users/{admin}\" class=\"actor\">admin@acme.test</a>")),
        "{}",
        log.snippet()
    );
    // Actors that are not users of the organisation stay ids.
    let created = get(&e, &acme, "/portal/orgs/acme/audit?action=user.create").await;
    assert!(created.body.contains("<code class=\"wrap\">test-platform-admin</code>"));
    // The actor filter takes an email too.
    let mine = get(&e, &acme, "/portal/orgs/acme/audit?actor=ADMIN%40acme.test&action=user.").await;
    assert!(mine.body.contains("<code>user.update</code>") && !mine.body.contains("<code>user.create</code>"));
    assert!(get(&e, &acme, "/portal/orgs/acme/audit?actor=nobody%40acme.test").await.body.contains("No event matches"));
}
