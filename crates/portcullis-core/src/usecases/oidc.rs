//! OpenID Connect for people (docs/oidc.md): the authorization endpoint's decisions (client and
//! redirect URI checks, PKCE, prompt, max_age, SSO session, consent), authorization codes,
//! the `authorization_code` and `refresh_token` grants with ID tokens, userinfo, browser
//! sign-in with an emailed code or TOTP, RP-initiated and back-channel logout, consents,
//! TOTP enrolment, invitations and self-registration. The HTTP layer only renders pages and
//! maps the outcomes here to redirects.

use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;

use super::*;
use crate::crypto::jws;
use crate::crypto::secrets::{SecretHash, generate_secret};
use crate::crypto::signing::Algorithm;
use crate::crypto::totp;
use crate::error::{OAuthError, OAuthErrorCode};
use crate::mail::Message;
use crate::model::{
    AuthMethod, AuthorizationCode, CodeIssue, Consent, CredentialState, GrantType, LogoutDelivery, RefreshToken, User,
    UserEmail, UserTotp, VerificationEffect, VerificationPurpose,
};
use crate::tokens::new_jti;

/// Authorization codes live this long (RFC 6749 §4.1.2 recommends at most 10 minutes).
pub const CODE_LIFETIME: i64 = 60;
/// Refresh tokens expire this long after they were issued (each rotation starts anew) …
pub const REFRESH_LIFETIME: i64 = 30 * 86_400;
/// ID tokens are short: they prove a sign-in, they are not a session.
pub const ID_TOKEN_LIFETIME: i64 = 600;
/// Invitation links.
pub const INVITATION_LIFETIME: i64 = 7 * 86_400;
/// An authorization request with more parameters than this is refused.
const MAX_PARAMETERS: usize = 64;
/// Seconds after a sign-in during which the second factor may be changed.
const FRESH_SIGN_IN: i64 = 600;
/// The `acr` of every sign-in here: a password and a second factor.
pub const ACR_2FA: &str = "urn:portcullis:acr:2fa";
/// Back-channel logout retries (seconds after the previous attempt); then it is given up.
const LOGOUT_RETRIES: [i64; 6] = [10, 60, 300, 1800, 7200, 43_200];
const LOGOUT_EVENT: &str = "http://schemas.openid.net/event/backchannel-logout";

/// Where the browser goes back to the client: `redirect_uri` with `params`, as a query or as
/// an auto-submitted form (`response_mode=form_post`).
#[derive(Clone, PartialEq, Eq)]
pub struct ClientRedirect {
    pub redirect_uri: String,
    pub params: Vec<(String, String)>,
    pub form_post: bool,
}

/// The parameter names only: a code is a credential.
impl std::fmt::Debug for ClientRedirect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientRedirect")
            .field("redirect_uri", &self.redirect_uri)
            .field("params", &self.params.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>())
            .field("form_post", &self.form_post)
            .finish()
    }
}

impl ClientRedirect {
    /// The URL for a 303 (query mode).
    pub fn url(&self) -> String {
        let q: String = form_urlencoded::Serializer::new(String::new()).extend_pairs(&self.params).finish();
        let sep = if self.redirect_uri.contains('?') { '&' } else { '?' };
        format!("{}{sep}{q}", self.redirect_uri)
    }
}

/// What the authorization endpoint decided.
#[derive(Debug)]
pub enum Authorize {
    /// Back to the client: a code, or an error it may see.
    Redirect(ClientRedirect),
    /// The person must sign in first; then the browser resumes with `resume` (the request's
    /// parameters, without what forced the sign-in).
    Login { login_hint: Option<String>, resume: Vec<(String, String)> },
    /// The person must decide on consent; `request` is what the consent form posts back.
    Consent(ConsentPrompt),
}

#[derive(Debug)]
pub struct ConsentPrompt {
    pub client_id: String,
    pub client_name: String,
    pub org_name: String,
    pub user_email: String,
    pub scopes: Vec<String>,
    pub request: Vec<(String, String)>,
}

/// A validated authorization request (everything after the client and its redirect URI were
/// found trustworthy).
struct AuthzRequest {
    entry: Arc<ClientEntry>,
    redirect_uri: String,
    form_post: bool,
    state: Option<String>,
    nonce: Option<String>,
    scopes: Vec<String>,
    code_challenge: Option<String>,
    prompt: Vec<String>,
    max_age: Option<i64>,
    login_hint: Option<String>,
}

/// An error the client may be told of at its (verified) redirect URI.
fn client_error(
    redirect_uri: &str,
    form_post: bool,
    state: Option<&str>,
    issuer: &str,
    code: &str,
    description: &str,
) -> ClientRedirect {
    let mut params =
        vec![("error".to_owned(), code.to_owned()), ("error_description".to_owned(), description.to_owned())];
    if let Some(s) = state {
        params.push(("state".to_owned(), s.to_owned()));
    }
    params.push(("iss".to_owned(), issuer.to_owned()));
    ClientRedirect { redirect_uri: redirect_uri.to_owned(), params, form_post }
}

/// A PKCE S256 challenge: base64url of a SHA-256, 43 characters.
fn plausible_challenge(c: &str) -> bool {
    c.len() == 43 && c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// RFC 7636 §4.1: 43–128 characters of the unreserved set.
fn plausible_verifier(v: &str) -> bool {
    (43..=128).contains(&v.len())
        && v.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
}

fn b64url(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

fn sha256(b: &[u8]) -> Vec<u8> {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, b).as_ref().to_vec()
}

/// `at_hash` (OIDC Core §3.1.3.6): the left half of the hash the ID token's algorithm uses.
fn at_hash(alg: Algorithm, access_token: &str) -> String {
    let d = match alg {
        Algorithm::EdDSA => aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA512, access_token.as_bytes()),
        _ => aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, access_token.as_bytes()),
    };
    let full = d.as_ref();
    b64url(full.get(..full.len() / 2).unwrap_or(full))
}

/// The single value of `name`; `Err` if it appears more than once (RFC 6749 §3.1).
fn single<'a>(pairs: &'a [(String, String)], name: &str) -> Result<Option<&'a str>, ()> {
    let mut it = pairs.iter().filter(|(k, _)| k == name);
    let first = it.next().map(|(_, v)| v.as_str());
    if it.next().is_some() { Err(()) } else { Ok(first) }
}

/// The request's parameters with `value` taken out of `prompt` (dropped when it is left empty):
/// what the browser resumes with once that prompt was satisfied.
fn without_prompt(pairs: &[(String, String)], value: &str) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| {
            if k == "prompt" {
                (k.clone(), v.split(' ').filter(|p| *p != value).collect::<Vec<_>>().join(" "))
            } else {
                (k.clone(), v.clone())
            }
        })
        .filter(|(k, v)| !(k == "prompt" && v.is_empty()))
        .collect()
}

fn sorted_unique(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v.dedup();
    v
}

/// Claims of an ID token.
#[derive(Serialize)]
struct IdTokenClaims<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'a str,
    exp: i64,
    iat: i64,
    auth_time: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    nonce: Option<&'a str>,
    at_hash: String,
    amr: &'a [String],
    acr: &'static str,
    sid: &'a str,
    azp: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    email: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    email_verified: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    preferred_username: Option<&'a str>,
}

/// The second factor a browser sign-in continues with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecondFactor {
    EmailCode,
    Totp,
}

/// A password accepted on the sign-in page: the pending session's token (the SSO cookie), the
/// verification that will activate it, and which second factor to ask for.
#[derive(Debug)]
pub struct BrowserLogin {
    pub session_token: SecretString,
    pub verification_id: String,
    pub second_factor: SecondFactor,
}

/// A TOTP enrolment in progress. (No `Debug`: it is the secret.)
pub struct TotpEnrolment {
    pub secret_base32: String,
    pub otpauth_uri: String,
}

/// What RP-initiated logout decided.
#[derive(Debug)]
pub enum Logout {
    /// Ended (if there was a session); go to the client's registered URI.
    Redirect(String),
    /// Ended (if there was a session); show the signed-out page.
    SignedOut,
    /// No verified hint: ask the person to confirm (a CSRF-protected form).
    Confirm,
}

/// What `/oauth2/userinfo` returns.
pub type UserInfo = serde_json::Map<String, serde_json::Value>;

/// Posts back-channel logout tokens (the binary's HTTP client; tests use a fake).
#[async_trait::async_trait]
pub trait LogoutNotifier: Send + Sync {
    /// POSTs `logout_token=…` to `uri`; `Err` (a reason for the log) unless it answered 2xx.
    async fn notify(&self, uri: &str, logout_token: &str) -> std::result::Result<(), String>;
}

/// A code that may be redeemed ([`Portcullis::redeemable_code`]), with its keyed hash, user and
/// SSO session.
pub(crate) struct RedeemableCode {
    pub row: AuthorizationCode,
    pub hash: SecretHash,
    pub user: User,
    pub session: crate::model::Session,
}

impl Portcullis {
    // ---- the authorization endpoint --------------------------------------------------------

    /// `GET|POST /oauth2/authorize`. `pairs` are the request's parameters as sent (repeated
    /// ones included); `sso` the SSO cookie; `consent` the person's decision when this is the
    /// consent form posting back. `Err` means the error page: the client or redirect URI
    /// cannot be trusted, so nothing goes to the redirect URI.
    pub async fn authorize(
        &self,
        ctx: &RequestContext,
        pairs: &[(String, String)],
        sso: Option<&str>,
        consent: Option<bool>,
    ) -> Result<Authorize> {
        let req = match self.authorization_request(pairs).await? {
            Ok(r) => r,
            Err(redirect) => return Ok(Authorize::Redirect(redirect)),
        };
        let iss = self.issuer().to_owned();
        let fail = |code: &str, d: &str| {
            Ok(Authorize::Redirect(client_error(&req.redirect_uri, req.form_post, req.state.as_deref(), &iss, code, d)))
        };
        let app = &req.entry.app;
        let prompt_none = req.prompt.iter().any(|p| p == "none");
        let session = match sso {
            Some(t) => self.sso_session(t, &app.org_id).await?,
            None => None,
        };
        let now = self.now();
        let needs_login = match &session {
            None => true,
            Some(e) => {
                let auth_time = e.session.verified_at.unwrap_or(e.session.created_at);
                req.prompt.iter().any(|p| p == "login") || req.max_age.is_some_and(|m| now - auth_time > m)
            }
        };
        if needs_login {
            if prompt_none {
                return fail("login_required", "the user is not signed in");
            }
            let mut resume = without_prompt(pairs, "login");
            resume.retain(|(k, _)| k != "max_age");
            return Ok(Authorize::Login { login_hint: req.login_hint.clone(), resume });
        }
        let Some(entry) = session else { return fail("login_required", "the user is not signed in") };

        // Consent: first-party applications never ask; others ask once per scope set.
        if !app.first_party {
            match consent {
                Some(false) => return fail("access_denied", "the user declined"),
                Some(true) => {
                    let c = Consent {
                        user_id: entry.user.id.clone(),
                        client_id: app.client_id.to_string(),
                        org_id: app.org_id.clone(),
                        scopes: req.scopes.clone(),
                        granted_at: now,
                    };
                    let ev = self.audit(
                        ctx,
                        &entry.user.id,
                        Some(&app.org_id),
                        "consent.grant",
                        app.client_id.as_str(),
                        serde_json::json!({ "scopes": req.scopes }),
                    );
                    self.store.save_consent(&c, &ev).await?;
                }
                None => {
                    let forced = req.prompt.iter().any(|p| p == "consent");
                    let have = self.store.consent(&entry.user.id, app.client_id.as_str()).await?;
                    let covered = have.is_some_and(|c| req.scopes.iter().all(|s| c.scopes.contains(s)));
                    if forced || !covered {
                        if prompt_none {
                            return fail("consent_required", "the user has not consented to this application");
                        }
                        let request = without_prompt(pairs, "consent");
                        return Ok(Authorize::Consent(ConsentPrompt {
                            client_id: app.client_id.to_string(),
                            client_name: app.name.clone(),
                            org_name: req.entry.org.name.clone(),
                            user_email: entry.user.email.to_string(),
                            scopes: req.scopes.clone(),
                            request,
                        }));
                    }
                }
            }
        }

        // Issue the code.
        let code = generate_secret()?;
        let auth_time = entry.session.verified_at.unwrap_or(entry.session.created_at);
        let row = AuthorizationCode {
            code_hash: SecretHash::of(self.vault.as_ref(), &format!("code\0{}", code.expose_secret())),
            client_id: app.client_id.to_string(),
            org_id: app.org_id.clone(),
            user_id: entry.user.id.clone(),
            session_id: entry.session.id.clone(),
            redirect_uri: req.redirect_uri.clone(),
            scope: req.scopes.join(" "),
            nonce: req.nonce.clone(),
            code_challenge: req.code_challenge.clone(),
            auth_time,
            amr: session_amr(),
            created_at: now,
            expires_at: now + CODE_LIFETIME,
            consumed_at: None,
            issued_jti: None,
            issued_jti_expires_at: None,
            issued_family: None,
            issued_session: None,
        };
        let ev = self.audit(
            ctx,
            &entry.user.id,
            Some(&app.org_id),
            "oauth.authorize",
            app.client_id.as_str(),
            serde_json::json!({ "scope": row.scope, "session_id": row.session_id }),
        );
        self.store.insert_authorization_code(&row, &ev).await?;
        let mut params = vec![("code".to_owned(), code.expose_secret().to_owned())];
        if let Some(s) = &req.state {
            params.push(("state".to_owned(), s.clone()));
        }
        params.push(("iss".to_owned(), iss.clone()));
        Ok(Authorize::Redirect(ClientRedirect { redirect_uri: req.redirect_uri, params, form_post: req.form_post }))
    }

    /// Validates an authorization request. `Err` → error page; `Ok(Err)` → an error for the
    /// client at its verified redirect URI.
    async fn authorization_request(
        &self,
        pairs: &[(String, String)],
    ) -> Result<std::result::Result<AuthzRequest, ClientRedirect>> {
        let one =
            |name: &str| single(pairs, name).map_err(|()| Error::invalid(format!("{name} is given more than once")));
        let client_id = one("client_id")?.ok_or_else(|| Error::invalid("client_id is required"))?;
        let entry = match crate::ids::ClientId::is_valid(client_id) {
            true => self.client(client_id).await?,
            false => None,
        };
        let Some(entry) = entry.filter(|e| e.app.enabled) else {
            return Err(Error::invalid("unknown or disabled client_id"));
        };
        let app = &entry.app;
        if !app.grant_types.contains(&GrantType::AuthorizationCode) {
            return Err(Error::invalid("this client may not use the authorization code flow"));
        }
        let redirect_uri = match one("redirect_uri")? {
            Some(u) if app.redirect_uris.iter().any(|r| r == u) => u.to_owned(),
            Some(_) => {
                return Err(Error::invalid("redirect_uri is not registered for this client (exact match required)"));
            }
            None => match app.redirect_uris.as_slice() {
                [only] => only.clone(),
                [] => return Err(Error::invalid("this client has no registered redirect_uri")),
                _ => return Err(Error::invalid("redirect_uri is required: this client registered several")),
            },
        };
        // From here on the client and its redirect URI are trusted: errors go there.
        let iss = self.issuer().to_owned();
        let response_mode = single(pairs, "response_mode").ok().flatten();
        let form_post = response_mode == Some("form_post");
        let state = single(pairs, "state").ok().flatten().map(str::to_owned);
        let err =
            |code: &str, d: &str| Ok(Err(client_error(&redirect_uri, form_post, state.as_deref(), &iss, code, d)));
        if pairs.len() > MAX_PARAMETERS {
            return err("invalid_request", "too many parameters");
        }
        let mut seen = std::collections::HashSet::with_capacity(pairs.len());
        if let Some(k) = pairs.iter().map(|(k, _)| k).find(|k| !seen.insert(k.as_str())) {
            return err(
                "invalid_request",
                &format!("parameter {} is given more than once", k.chars().take(40).collect::<String>()),
            );
        }
        if !matches!(response_mode, None | Some("query") | Some("form_post")) {
            return err("invalid_request", "response_mode must be query or form_post");
        }
        match one("response_type")? {
            None => return err("invalid_request", "response_type is required"),
            Some("code") => {}
            Some(_) => return err("unsupported_response_type", "only response_type=code is supported"),
        }
        if state.as_ref().is_some_and(|s| s.len() > 2048) || one("nonce")?.is_some_and(|n| n.len() > 512) {
            return err("invalid_request", "state or nonce is too long");
        }
        if one("request")?.is_some() || one("request_uri")?.is_some() {
            return err("request_not_supported", "request objects are not supported");
        }
        let mut scopes = Vec::new();
        for s in one("scope")?.unwrap_or("").split(' ').filter(|s| !s.is_empty()) {
            let allowed = match s {
                "openid" | "profile" | "email" => true,
                "offline_access" => app.grant_types.contains(&GrantType::RefreshToken),
                _ => app.scopes.iter().any(|a| a.as_str() == s),
            };
            if !allowed {
                return err(
                    "invalid_scope",
                    &format!("scope {:?} is not allowed for this client", s.chars().take(64).collect::<String>()),
                );
            }
            scopes.push(s.to_owned());
        }
        let scopes = sorted_unique(scopes);
        let code_challenge = match (one("code_challenge")?, one("code_challenge_method")?) {
            (None, None) if app.auth_method == AuthMethod::None => {
                return err(
                    "invalid_request",
                    "PKCE is required for public clients: send code_challenge with code_challenge_method=S256",
                );
            }
            (None, None) => None,
            (_, Some(m)) if m != "S256" => {
                return err("invalid_request", "code_challenge_method must be S256 (plain is not accepted)");
            }
            (Some(_), None) => {
                return err("invalid_request", "code_challenge_method=S256 is required with code_challenge");
            }
            (None, Some(_)) => return err("invalid_request", "code_challenge is required with code_challenge_method"),
            (Some(c), Some(_)) if !plausible_challenge(c) => {
                return err(
                    "invalid_request",
                    "code_challenge must be the base64url SHA-256 of the verifier (43 characters)",
                );
            }
            (Some(c), Some(_)) => Some(c.to_owned()),
        };
        let prompt: Vec<String> =
            one("prompt")?.unwrap_or("").split(' ').filter(|p| !p.is_empty()).map(str::to_owned).collect();
        if prompt.iter().any(|p| !matches!(p.as_str(), "none" | "login" | "consent" | "select_account")) {
            return err("invalid_request", "prompt may only hold none, login, consent or select_account");
        }
        if prompt.iter().any(|p| p == "none") && prompt.len() > 1 {
            return err("invalid_request", "prompt=none cannot be combined with other values");
        }
        let max_age = match one("max_age")? {
            None => None,
            Some(m) => match m.parse::<i64>() {
                Ok(v) if v >= 0 => Some(v),
                _ => return err("invalid_request", "max_age must be a non-negative integer"),
            },
        };
        let login_hint = one("login_hint")?.filter(|h| h.len() <= 320).map(str::to_owned);
        let nonce = one("nonce")?.map(str::to_owned);
        Ok(Ok(AuthzRequest {
            entry,
            redirect_uri,
            form_post,
            state,
            nonce,
            scopes,
            code_challenge,
            prompt,
            max_age,
            login_hint,
        }))
    }

    /// The SSO session a cookie names, if it is active, unexpired, its user enabled and in
    /// `org_id`. Quiet: an old cookie is not a failed authentication.
    async fn sso_session(&self, token: &str, org_id: &str) -> Result<Option<Arc<super::auth::SessionEntry>>> {
        let Some(e) = self.session_entry(token).await? else { return Ok(None) };
        let now = self.now();
        let s = &e.session;
        let usable = s.state == CredentialState::Active
            && s.expires_at > now
            && e.last_used() + self.settings.auth.session_idle_timeout > now
            && e.user.enabled
            && e.user.org_id == org_id;
        if usable
            && e.claim_touch(now)
            && let Err(err) = self.store.touch_session(&s.id, now).await
        {
            tracing::warn!(error = %err, "could not record a session's last use");
        }
        Ok(usable.then_some(e))
    }

    // ---- browser sign-in -----------------------------------------------------------------

    /// The sign-in page's password step: a pending SSO session, and its second factor — the
    /// authenticator app when the person enrolled one, else an emailed code.
    pub async fn browser_login(
        &self,
        ctx: &RequestContext,
        email: &str,
        password: SecretString,
        organisation: Option<&str>,
        user_agent: Option<&str>,
    ) -> Result<BrowserLogin> {
        let req = super::auth::LoginRequest {
            email: email.to_owned(),
            password,
            organisation: organisation.map(str::to_owned),
        };
        let (pending, totp) = self.login_with(ctx, req, user_agent, true).await?;
        Ok(BrowserLogin {
            session_token: pending.session_token,
            verification_id: pending.verification_id,
            second_factor: if totp { SecondFactor::Totp } else { SecondFactor::EmailCode },
        })
    }

    /// The second step with an authenticator app: the code of the current (±1) time step,
    /// never one accepted before, counted against the verification's tries.
    pub async fn verify_login_totp(&self, ctx: &RequestContext, verification_id: &str, code: &str) -> Result<()> {
        self.count_attempt(ctx, None).await?;
        if !super::auth::plausible_id(verification_id) {
            return Err(Error::Unauthenticated("sign in again".into()));
        }
        let Some(v) =
            self.store.verification(verification_id).await?.filter(|v| v.purpose == VerificationPurpose::Session)
        else {
            return Err(Error::Unauthenticated("sign in again".into()));
        };
        if v.consumed_at.is_some() || v.expires_at <= self.now() {
            return Err(Error::Unauthenticated("this sign-in has expired; sign in again".into()));
        }
        // The same budgets as an emailed code: per account a minute (across sign-ins and IPs),
        // counted before comparing and given back when right; and per verification.
        let account_key = format!("verify:{}", v.user_id);
        self.auth
            .account_attempts
            .fail(self.store.as_ref(), &[&account_key], self.now())
            .await
            .map_err(|retry_after_secs| Error::RateLimited { retry_after_secs })?;
        let Some(tries) = self.store.count_verification_attempt(&v.id).await? else {
            return Err(Error::Unauthenticated("sign in again".into()));
        };
        if tries > self.settings.auth.code_max_attempts {
            self.audit_code_failure(ctx, &v, "too many wrong codes").await;
            return Err(Error::Unauthenticated("too many wrong codes; sign in again".into()));
        }
        let Some(t) = self.store.user_totp(&v.user_id).await?.filter(|t| t.confirmed_at.is_some()) else {
            return Err(Error::Unauthenticated("no authenticator app is enrolled".into()));
        };
        let secret = self.vault.open(&totp_purpose(&v.user_id), &t.sealed_secret)?;
        let now = self.now();
        let Some(step) = totp::matching_step(&secret, code, now) else {
            self.audit_code_failure(ctx, &v, "wrong authenticator code").await;
            return Err(Error::Unauthenticated("wrong code".into()));
        };
        let ev = self.audit(ctx, &v.user_id, Some(&v.org_id), "totp.use", &v.user_id, serde_json::json!({}));
        if !self.store.use_totp_step(&v.user_id, step, false, now, &ev).await? {
            self.audit_code_failure(ctx, &v, "authenticator code replayed").await;
            return Err(Error::Unauthenticated("this code was already used; wait for the next one".into()));
        }
        self.auth.account_attempts.forgive(self.store.as_ref(), &account_key, self.now()).await;
        self.consume(
            ctx,
            &v,
            VerificationEffect::ActivateSession { session_id: v.subject_id.clone() },
            "session.verify",
        )
        .await?;
        self.forget_session_by_id(&v.subject_id).await;
        Ok(())
    }

    /// The second step with the emailed code.
    pub async fn verify_login_code(&self, ctx: &RequestContext, verification_id: &str, code: &str) -> Result<()> {
        let sub = super::auth::CodeSubmission {
            verification_id: verification_id.to_owned(),
            code: SecretString::from(code.trim().to_owned()),
        };
        self.verify_session(ctx, sub).await.map(|_| ())
    }

    async fn forget_session_by_id(&self, session_id: &str) {
        if let Ok(Some(s)) = self.store.session(session_id).await {
            self.forget_session(&s.token_hash);
        }
    }

    /// The signed-in person of an SSO cookie (any organisation), for the account pages.
    pub async fn account_session(&self, token: &str) -> Result<Arc<super::auth::SessionEntry>> {
        let Some(e) = self.session_entry(token).await? else {
            return Err(Error::Unauthenticated("not signed in".into()));
        };
        let org_id = e.user.org_id.clone();
        self.sso_session(token, &org_id).await?.ok_or_else(|| Error::Unauthenticated("not signed in".into()))
    }

    // ---- TOTP enrolment ------------------------------------------------------------------

    /// Changing the second factor needs a recent sign-in, not just a session cookie.
    fn fresh_sign_in(&self, who: &super::auth::SessionEntry) -> Result<()> {
        if !self.recent_sign_in(who) {
            return Err(Error::Unauthenticated("sign in again to change your second factor".into()));
        }
        Ok(())
    }

    /// Whether the session's sign-in (its second factor) was within the last 10 minutes: what
    /// sensitive changes (a second factor, the portal's secret rotations, deletions and
    /// revocations) ask for beyond a valid session.
    pub fn recent_sign_in(&self, who: &super::auth::SessionEntry) -> bool {
        let at = who.session.verified_at.unwrap_or(who.session.created_at);
        self.now() - at <= FRESH_SIGN_IN
    }

    /// `DELETE /api/v1/organisations/{org}/users/{id}/totp`: an admin resets a user's second
    /// factor (a lost phone); the next sign-in uses an emailed code again.
    pub async fn reset_user_totp(
        &self,
        who: &Principal,
        ctx: &RequestContext,
        org_slug: &str,
        user_id: &str,
    ) -> Result<()> {
        let user = self.user(who, org_slug, user_id).await?;
        super::users::ensure_may_manage_user(who, &user)?;
        let ev = self.audit(ctx, &who.subject, Some(&user.org_id), "totp.reset", &user.id, serde_json::json!({}));
        if !self.store.delete_user_totp(&user.id, &ev).await? {
            return Err(Error::NotFound("an authenticator app of this user".into()));
        }
        Ok(())
    }

    /// Starts (or shows again) the enrolment of an authenticator app.
    pub async fn totp_enrolment(&self, ctx: &RequestContext, who: &super::auth::SessionEntry) -> Result<TotpEnrolment> {
        self.fresh_sign_in(who)?;
        let user = &who.user;
        let secret = match self.store.user_totp(&user.id).await? {
            Some(t) if t.confirmed_at.is_some() => {
                return Err(Error::Conflict("an authenticator app is already enrolled".into()));
            }
            Some(t) => self.vault.open(&totp_purpose(&user.id), &t.sealed_secret)?.to_vec(),
            None => {
                let secret = totp::new_secret()?;
                let row = UserTotp {
                    user_id: user.id.clone(),
                    sealed_secret: self.vault.seal(&totp_purpose(&user.id), &secret)?,
                    confirmed_at: None,
                    last_step: None,
                    created_at: self.now(),
                };
                let ev = self.audit(ctx, &user.id, Some(&user.org_id), "totp.enrol", &user.id, serde_json::json!({}));
                self.store.save_user_totp(&row, &ev).await?;
                secret
            }
        };
        let issuer = format!("Portcullis {}", who.org_slug);
        Ok(TotpEnrolment {
            secret_base32: totp::base32(&secret),
            otpauth_uri: totp::otpauth_uri(&secret, &issuer, user.email.as_str()),
        })
    }

    /// Confirms the enrolment with a first code.
    pub async fn confirm_totp(&self, ctx: &RequestContext, who: &super::auth::SessionEntry, code: &str) -> Result<()> {
        self.count_attempt(ctx, Some(who.user.email.as_str())).await?;
        self.fresh_sign_in(who)?;
        let user = &who.user;
        let Some(t) = self.store.user_totp(&user.id).await? else {
            return Err(Error::invalid("start the enrolment first"));
        };
        if t.confirmed_at.is_some() {
            return Err(Error::Conflict("an authenticator app is already enrolled".into()));
        }
        let secret = self.vault.open(&totp_purpose(&user.id), &t.sealed_secret)?;
        let now = self.now();
        let step = totp::matching_step(&secret, code, now)
            .ok_or_else(|| Error::invalid("wrong code: check the time on your device"))?;
        let ev = self.audit(ctx, &user.id, Some(&user.org_id), "totp.confirm", &user.id, serde_json::json!({}));
        if !self.store.use_totp_step(&user.id, step, true, now, &ev).await? {
            return Err(Error::invalid("this code was already used; wait for the next one"));
        }
        Ok(())
    }

    /// Whether the person has a confirmed authenticator app.
    pub async fn totp_enrolled(&self, user_id: &str) -> Result<bool> {
        Ok(self.store.user_totp(user_id).await?.is_some_and(|t| t.confirmed_at.is_some()))
    }

    // ---- consents ------------------------------------------------------------------------

    pub async fn my_consents(&self, who: &super::auth::SessionEntry) -> Result<Vec<(Consent, String)>> {
        let mut out = Vec::new();
        for c in self.store.user_consents(&who.user.id).await? {
            let name =
                self.client(&c.client_id).await?.map(|e| e.app.name.clone()).unwrap_or_else(|| c.client_id.clone());
            out.push((c, name));
        }
        Ok(out)
    }

    pub async fn revoke_my_consent(
        &self,
        ctx: &RequestContext,
        who: &super::auth::SessionEntry,
        client_id: &str,
    ) -> Result<()> {
        let ev =
            self.audit(ctx, &who.user.id, Some(&who.user.org_id), "consent.revoke", client_id, serde_json::json!({}));
        if !self.store.revoke_consent(&who.user.id, client_id, self.now(), &ev).await? {
            return Err(Error::NotFound("a consent to that application".into()));
        }
        Ok(())
    }

    // ---- the token endpoint: authorization_code and refresh_token ------------------------

    /// `grant_type=authorization_code`.
    pub(crate) async fn redeem_code(
        &self,
        entry: &ClientEntry,
        params: &super::oauth::TokenParams,
        cnf: Option<String>,
        ctx: &RequestContext,
    ) -> Result<super::oauth::TokenResponse, OAuthError> {
        let app = &entry.app;
        let code = params.code.as_deref().ok_or_else(|| OAuthError::invalid_request("code is required"))?;
        let RedeemableCode { row, hash, user, session } = self
            .redeemable_code(app, code, params.redirect_uri.as_deref(), params.code_verifier.as_deref(), ctx)
            .await?;
        let now = self.now();

        let scopes: Vec<&str> = row.scope.split(' ').filter(|s| !s.is_empty()).collect();
        let (access_token, jti, exp, scope) = self.user_access_token(entry, &user, &scopes, cnf).await?;
        let refresh = if app.grant_types.contains(&GrantType::RefreshToken)
            && (scopes.contains(&"offline_access") || app.always_issue_refresh_token)
        {
            let token = generate_secret()?;
            Some((
                token.expose_secret().to_owned(),
                self.refresh_row(
                    &token,
                    &new_id(),
                    app.client_id.as_str(),
                    &user,
                    &session,
                    &row.scope,
                    row.auth_time,
                    &row.amr,
                ),
            ))
        } else {
            None
        };
        let id_token = if scopes.contains(&"openid") {
            Some(
                self.id_token(
                    app,
                    &user,
                    &row.session_id,
                    row.auth_time,
                    &row.amr,
                    row.nonce.as_deref(),
                    &access_token,
                    &scopes,
                )
                .await?,
            )
        } else {
            None
        };
        let issue =
            CodeIssue { jti: jti.clone(), jti_expires_at: exp, refresh: refresh.as_ref().map(|(_, r)| r.clone()) };
        let ev = self.audit(
            ctx,
            user.id.as_str(),
            Some(&app.org_id),
            "oauth.token.authorization_code",
            app.client_id.as_str(),
            serde_json::json!({ "jti": jti, "session_id": row.session_id }),
        );
        if !self.store.redeem_authorization_code(&hash, now, &issue, &ev).await.map_err(Error::from)? {
            return Err(self.code_replayed(ctx, app, &row, &hash, now).await);
        }
        Ok(super::oauth::TokenResponse {
            access_token,
            token_type: "Bearer",
            expires_in: exp - now,
            scope,
            id_token,
            refresh_token: refresh.map(|(t, _)| t),
        })
    }

    /// An authorization code presented by `app`, checked: known, unused (a replay revokes what
    /// the first redemption issued), unexpired, issued to `app` for `redirect_uri`, its PKCE
    /// verifier matching, its user enabled and its SSO session active. Nothing is written
    /// except on a replay.
    pub(crate) async fn redeemable_code(
        &self,
        app: &crate::model::Application,
        code: &str,
        redirect_uri: Option<&str>,
        code_verifier: Option<&str>,
        ctx: &RequestContext,
    ) -> Result<RedeemableCode, OAuthError> {
        let invalid_grant = |d: &str| OAuthError::new(OAuthErrorCode::InvalidGrant, d);
        if code.len() > 128 {
            return Err(invalid_grant("unknown, expired or used code"));
        }
        let hash = SecretHash::of(self.vault.as_ref(), &format!("code\0{code}"));
        let Some(row) = self.store.authorization_code(&hash).await.map_err(Error::from)? else {
            return Err(invalid_grant("unknown, expired or used code"));
        };
        let now = self.now();
        if row.consumed_at.is_some() {
            // RFC 6749 §4.1.2: a replay revokes what the first redemption issued.
            return Err(self.code_replayed(ctx, app, &row, &hash, now).await);
        }
        if row.expires_at <= now {
            return Err(invalid_grant("the code has expired"));
        }
        if row.client_id != app.client_id.as_str() {
            return Err(invalid_grant("the code was issued to another client"));
        }
        match redirect_uri {
            Some(u) if u == row.redirect_uri => {}
            Some(_) => return Err(invalid_grant("redirect_uri differs from the authorization request's")),
            None => return Err(OAuthError::invalid_request("redirect_uri is required")),
        }
        match (&row.code_challenge, code_verifier) {
            (Some(_), None) => {
                return Err(invalid_grant("code_verifier is required (the request carried a code_challenge)"));
            }
            (None, Some(_)) => {
                return Err(invalid_grant("code_verifier sent, but the request carried no code_challenge"));
            }
            (Some(_), Some(v)) if !plausible_verifier(v) => {
                return Err(OAuthError::invalid_request(
                    "code_verifier must be 43-128 characters of A-Z a-z 0-9 - . _ ~",
                ));
            }
            (Some(c), Some(v)) => {
                let computed = b64url(&sha256(v.as_bytes()));
                if aws_lc_rs::constant_time::verify_slices_are_equal(computed.as_bytes(), c.as_bytes()).is_err() {
                    return Err(invalid_grant("code_verifier does not match the code_challenge"));
                }
            }
            (None, None) => {}
        }
        let user = self.store.user(&row.org_id, &row.user_id).await.map_err(Error::from)?.filter(|u| u.enabled);
        let session = self.store.session(&row.session_id).await.map_err(Error::from)?;
        let (Some(user), Some(session)) = (user, session) else {
            return Err(invalid_grant("the user is gone or disabled"));
        };
        if session.state != CredentialState::Active || session.expires_at <= now {
            return Err(invalid_grant("the sign-in session has ended"));
        }
        Ok(RedeemableCode { row, hash, user, session })
    }

    /// `grant_type=refresh_token`: single use, rotated; a reused token revokes its family.
    pub(crate) async fn refresh(
        &self,
        entry: &ClientEntry,
        params: &super::oauth::TokenParams,
        cnf: Option<String>,
        ctx: &RequestContext,
    ) -> Result<super::oauth::TokenResponse, OAuthError> {
        let app = &entry.app;
        let invalid_grant = |d: &str| OAuthError::new(OAuthErrorCode::InvalidGrant, d);
        let presented =
            params.refresh_token.as_deref().ok_or_else(|| OAuthError::invalid_request("refresh_token is required"))?;
        if presented.len() > 128 {
            return Err(invalid_grant("unknown, expired or revoked refresh token"));
        }
        let hash = SecretHash::of(self.vault.as_ref(), &format!("refresh\0{presented}"));
        let Some(old) = self.store.refresh_token_by_hash(&hash).await.map_err(Error::from)? else {
            return Err(invalid_grant("unknown, expired or revoked refresh token"));
        };
        let now = self.now();
        if old.client_id != app.client_id.as_str() {
            return Err(invalid_grant("the refresh token was issued to another client"));
        }
        if old.revoked_at.is_some() || old.expires_at <= now {
            return Err(invalid_grant("unknown, expired or revoked refresh token"));
        }
        if old.used_at.is_some() {
            return Err(self.refresh_reused(ctx, &old, now).await);
        }
        let Some(user) = self.store.user(&old.org_id, &old.user_id).await.map_err(Error::from)?.filter(|u| u.enabled)
        else {
            return Err(invalid_grant("the user is gone or disabled"));
        };
        // A refresh token ends with the SSO session it was issued in (signed out, revoked or
        // expired).
        let session = self.store.session(&old.session_id).await.map_err(Error::from)?;
        let Some(session) = session.filter(|s| s.state == CredentialState::Active && s.expires_at > now) else {
            return Err(invalid_grant("the sign-in session this refresh token belongs to has ended"));
        };
        let granted: Vec<&str> = old.scope.split(' ').filter(|s| !s.is_empty()).collect();
        let scopes: Vec<&str> = match &params.scope {
            None => granted.clone(),
            Some(s) => {
                let asked: Vec<&str> = s.split(' ').filter(|s| !s.is_empty()).collect();
                if let Some(extra) = asked.iter().find(|s| !granted.contains(s)) {
                    return Err(OAuthError::new(
                        OAuthErrorCode::InvalidScope,
                        format!("scope {:?} was not granted", extra.chars().take(64).collect::<String>()),
                    ));
                }
                asked
            }
        };
        let (access_token, _jti, exp, scope) = self.user_access_token(entry, &user, &scopes, cnf).await?;
        let token = generate_secret()?;
        let new = self.refresh_row(
            &token,
            &old.family_id,
            app.client_id.as_str(),
            &user,
            &session,
            &old.scope,
            old.auth_time,
            &old.amr,
        );
        let ev = self.audit(
            ctx,
            &user.id,
            Some(&old.org_id),
            "oauth.token.refresh_token",
            app.client_id.as_str(),
            serde_json::json!({ "family_id": old.family_id }),
        );
        if !self.store.rotate_refresh_token(&old.id, now, &new, &ev).await.map_err(Error::from)? {
            return Err(self.refresh_reused(ctx, &old, now).await);
        }
        let id_token = if scopes.contains(&"openid") {
            Some(
                self.id_token(app, &user, &old.session_id, old.auth_time, &old.amr, None, &access_token, &scopes)
                    .await?,
            )
        } else {
            None
        };
        Ok(super::oauth::TokenResponse {
            access_token,
            token_type: "Bearer",
            expires_in: exp - now,
            scope,
            id_token,
            refresh_token: Some(token.expose_secret().to_owned()),
        })
    }

    /// A code presented again: what its first redemption issued is revoked (RFC 6749 §4.1.2).
    pub(crate) async fn code_replayed(
        &self,
        ctx: &RequestContext,
        app: &crate::model::Application,
        row: &AuthorizationCode,
        hash: &SecretHash,
        now: UnixTime,
    ) -> OAuthError {
        let ev = self.audit(
            ctx,
            app.client_id.as_str(),
            Some(&app.org_id),
            "oauth.code.replay",
            &row.client_id,
            serde_json::json!({ "session_id": row.session_id }),
        );
        match self.store.revoke_code_grant(hash, now, &ev).await {
            Ok(_) => OAuthError::new(
                OAuthErrorCode::InvalidGrant,
                "this code was already used; the tokens issued with it are revoked",
            ),
            Err(e) => Error::from(e).into(),
        }
    }

    /// A used refresh token presented again: its whole family is revoked.
    async fn refresh_reused(&self, ctx: &RequestContext, old: &RefreshToken, now: UnixTime) -> OAuthError {
        let ev = self.audit(
            ctx,
            &old.user_id,
            Some(&old.org_id),
            "oauth.refresh.reuse",
            &old.family_id,
            serde_json::json!({ "client_id": old.client_id }),
        );
        match self.store.revoke_refresh_family(&old.family_id, now, &ev).await {
            Ok(_) => OAuthError::new(
                OAuthErrorCode::InvalidGrant,
                "this refresh token was already used; its whole family is revoked",
            ),
            Err(e) => Error::from(e).into(),
        }
    }

    /// `/oauth2/revoke` with a refresh token (RFC 7009 §2.1): its whole family ends.
    pub(crate) async fn revoke_refresh_token(
        &self,
        caller: &ClientEntry,
        token: &str,
        ctx: &RequestContext,
    ) -> Result<(), OAuthError> {
        if token.len() > 128 {
            return Ok(());
        }
        let hash = SecretHash::of(self.vault.as_ref(), &format!("refresh\0{token}"));
        let Some(rt) = self.store.refresh_token_by_hash(&hash).await.map_err(Error::from)? else { return Ok(()) };
        if rt.client_id != caller.app.client_id.as_str() {
            return Err(OAuthError::new(OAuthErrorCode::UnauthorizedClient, "the token was not issued to this client"));
        }
        let ev = self.audit(
            ctx,
            caller.app.client_id.as_str(),
            Some(&caller.app.org_id),
            "token.revoke",
            &rt.family_id,
            serde_json::json!({ "refresh_token": true }),
        );
        self.store.revoke_refresh_family(&rt.family_id, self.now(), &ev).await.map_err(Error::from)?;
        Ok(())
    }

    /// Signs the user out of every SSO session (back-channel logout included) before a change
    /// that ends them all (an admin's revocation, a password reset, disabling the user).
    /// Returns how many sessions it ended.
    pub(crate) async fn sign_out_everywhere(&self, ctx: &RequestContext, actor: &str, user: &User) -> Result<u64> {
        let sessions = self.store.user_sessions(&user.id, crate::model::Page { limit: 1000, offset: 0 }).await?;
        let mut ended = 0;
        for s in sessions.iter().filter(|s| s.state == CredentialState::Active) {
            self.sign_out(ctx, actor, "session.revoke", &s.id, user).await?;
            ended += 1;
        }
        Ok(ended)
    }

    #[allow(clippy::too_many_arguments)]
    fn refresh_row(
        &self,
        token: &SecretString,
        family: &str,
        client_id: &str,
        user: &User,
        session: &crate::model::Session,
        scope: &str,
        auth_time: UnixTime,
        amr: &[String],
    ) -> RefreshToken {
        let now = self.now();
        RefreshToken {
            id: new_id(),
            token_hash: SecretHash::of(self.vault.as_ref(), &format!("refresh\0{}", token.expose_secret())),
            family_id: family.to_owned(),
            client_id: client_id.to_owned(),
            org_id: user.org_id.clone(),
            user_id: user.id.clone(),
            session_id: session.id.clone(),
            scope: scope.to_owned(),
            auth_time,
            amr: amr.to_vec(),
            created_at: now,
            expires_at: (now + REFRESH_LIFETIME).min(session.expires_at),
            used_at: None,
            revoked_at: None,
        }
    }

    /// An RFC 9068 access token for a person: `sub` is the user, `roles` theirs (Portcullis's
    /// own platform roles are never put in an application's token), `aud` the services the
    /// scopes and roles name, or the client when none. Returns (token, jti, exp, scope).
    async fn user_access_token(
        &self,
        entry: &ClientEntry,
        user: &User,
        scopes: &[&str],
        cnf: Option<String>,
    ) -> Result<(String, String, i64, String), OAuthError> {
        let app = &entry.app;
        let services = self.org_services(&app.org_id).await?;
        let roles: Vec<&str> =
            user.roles.iter().map(|r| r.as_str()).filter(|r| !r.starts_with("portcullis:")).collect();
        let mut auds: Vec<&str> = Vec::new();
        let owners = scopes
            .iter()
            .filter_map(|s| s.split_once('/').map(|(svc, _)| svc))
            .chain(roles.iter().filter_map(|r| r.split_once(':').map(|(s, _)| s)));
        for slug in owners {
            if let Some(svc) = services.iter().find(|s| s.slug.as_str() == slug)
                && !auds.contains(&svc.audience.as_str())
            {
                auds.push(&svc.audience);
            }
        }
        if auds.is_empty() {
            auds.push(app.client_id.as_str());
        }
        let (token, jti, lifetime, scope) =
            self.sign_access_token(entry, &user.id, &auds, scopes, &roles, cnf.as_deref())?;
        Ok((token, jti, self.now() + lifetime, scope))
    }

    #[allow(clippy::too_many_arguments)]
    async fn id_token(
        &self,
        app: &crate::model::Application,
        user: &User,
        sid: &str,
        auth_time: UnixTime,
        amr: &[String],
        nonce: Option<&str>,
        access_token: &str,
        scopes: &[&str],
    ) -> Result<String, OAuthError> {
        let alg = app.id_token_signing_alg;
        let keys = self.keys.current();
        let signer = keys.signer(alg).ok_or_else(|| {
            OAuthError::new(
                OAuthErrorCode::UnauthorizedClient,
                format!("this client's id_token_signed_response_alg {alg} is not enabled on this server"),
            )
        })?;
        let email_verified = if scopes.contains(&"email") {
            Some(
                self.store
                    .user_emails(&user.id)
                    .await
                    .map_err(Error::from)?
                    .iter()
                    .any(|e| e.email == user.email && e.verified_at.is_some()),
            )
        } else {
            None
        };
        let now = self.now();
        let profile = scopes.contains(&"profile");
        let claims = IdTokenClaims {
            iss: &self.settings.issuer,
            sub: &user.id,
            aud: app.client_id.as_str(),
            exp: now + ID_TOKEN_LIFETIME,
            iat: now,
            auth_time,
            nonce,
            at_hash: at_hash(alg, access_token),
            amr,
            acr: ACR_2FA,
            sid,
            azp: app.client_id.as_str(),
            email: scopes.contains(&"email").then_some(user.email.as_str()),
            email_verified,
            name: if profile { user.name.as_deref() } else { None },
            preferred_username: profile.then_some(user.email.as_str()),
        };
        let body = serde_json::to_vec(&claims).map_err(Error::internal)?;
        Ok(jws::sign(signer, "JWT", &body)?)
    }

    // ---- userinfo ------------------------------------------------------------------------

    /// `/oauth2/userinfo`: the person an access token (with `openid`) was issued for.
    pub async fn userinfo(&self, access_token: &str) -> Result<UserInfo> {
        let (claims, entry) =
            self.validate_access_token(access_token).await.map_err(|e| Error::Unauthenticated(e.to_string()))?;
        let scopes: Vec<&str> = claims.scopes().collect();
        if claims.sub == claims.client_id || !scopes.contains(&"openid") {
            return Err(Error::Forbidden("this token was not issued for a person with the openid scope".into()));
        }
        let Some(user) = self.store.user(&entry.app.org_id, &claims.sub).await?.filter(|u| u.enabled) else {
            return Err(Error::Unauthenticated("the user is gone or disabled".into()));
        };
        let mut out = UserInfo::new();
        out.insert("sub".into(), user.id.clone().into());
        if scopes.contains(&"email") {
            let verified = self
                .store
                .user_emails(&user.id)
                .await?
                .iter()
                .any(|e| e.email == user.email && e.verified_at.is_some());
            out.insert("email".into(), user.email.to_string().into());
            out.insert("email_verified".into(), verified.into());
        }
        if scopes.contains(&"profile") {
            if let Some(n) = &user.name {
                out.insert("name".into(), n.clone().into());
            }
            out.insert("preferred_username".into(), user.email.to_string().into());
            out.insert("updated_at".into(), user.updated_at.into());
        }
        Ok(out)
    }

    // ---- logout --------------------------------------------------------------------------

    /// `/oauth2/logout` (OIDC RP-Initiated Logout 1.0). `confirmed` is the CSRF-checked
    /// confirmation form. `Err` → error page (a bad hint or URI never redirects).
    pub async fn logout(
        &self,
        ctx: &RequestContext,
        pairs: &[(String, String)],
        sso: Option<&str>,
        confirmed: bool,
    ) -> Result<Logout> {
        let one =
            |name: &str| single(pairs, name).map_err(|()| Error::invalid(format!("{name} is given more than once")));
        let hint = one("id_token_hint")?;
        let client_id = one("client_id")?;
        let target = one("post_logout_redirect_uri")?;
        let state = one("state")?;
        let hinted = match hint {
            Some(h) => Some(self.verify_id_token_hint(h)?),
            None => None,
        };
        let client = match (hinted.as_ref().map(|c| c.aud.as_str()), client_id) {
            (Some(a), Some(c)) if a != c => {
                return Err(Error::invalid("client_id does not match the id_token_hint's audience"));
            }
            (Some(a), _) | (None, Some(a)) => {
                Some(self.client(a).await?.ok_or_else(|| Error::invalid("unknown client_id"))?)
            }
            (None, None) => None,
        };
        let redirect = match target {
            None => None,
            Some(u) => {
                let Some(c) = &client else {
                    return Err(Error::invalid("post_logout_redirect_uri needs id_token_hint or client_id"));
                };
                if !c.app.post_logout_redirect_uris.iter().any(|r| r == u) {
                    return Err(Error::invalid(
                        "post_logout_redirect_uri is not registered for this client (exact match required)",
                    ));
                }
                let mut url = u.to_owned();
                if let Some(s) = state {
                    let sep = if url.contains('?') { '&' } else { '?' };
                    url = format!(
                        "{url}{sep}{}",
                        form_urlencoded::Serializer::new(String::new()).append_pair("state", s).finish()
                    );
                }
                Some(url)
            }
        };
        let current = match sso {
            Some(token) => self.session_entry(token).await?,
            None => None,
        };
        // Signed out without asking only when the hint names this very session (RP-Initiated
        // Logout §2: otherwise the OP asks the person).
        let hint_is_current = match (&hinted, &current) {
            (Some(h), Some(e)) => h.sid.as_deref() == Some(e.session.id.as_str()) && h.sub == e.user.id,
            (Some(_), None) => true,
            (None, _) => false,
        };
        if !hint_is_current && !confirmed {
            return Ok(Logout::Confirm);
        }
        if let Some(e) = current {
            self.sign_out(ctx, &e.user.id, "session.logout", &e.session.id, &e.user).await?;
        }
        Ok(match redirect {
            Some(u) => Logout::Redirect(u),
            None => Logout::SignedOut,
        })
    }

    /// An `id_token_hint` we issued: our signature (any published key, any ID-token
    /// algorithm — never `none`), our issuer. Expired hints are fine (OIDC allows them).
    fn verify_id_token_hint(&self, token: &str) -> Result<HintClaims> {
        let keys = self.keys.current();
        let (_, payload) = jws::verify(token, "JWT", |kid| keys.verifier(kid))
            .map_err(|_| Error::invalid("id_token_hint is not an ID token issued here"))?;
        let c: HintClaims =
            serde_json::from_slice(&payload).map_err(|_| Error::invalid("id_token_hint is malformed"))?;
        if c.iss != self.settings.issuer {
            return Err(Error::invalid("id_token_hint was issued by another issuer"));
        }
        Ok(c)
    }

    /// Ends an SSO session everywhere: the session, its refresh tokens, and a logout token for
    /// every application it signed in to that registered a back-channel URI. `action` names
    /// the audit event (a sign-out, or a revocation by `actor`).
    pub async fn sign_out(
        &self,
        ctx: &RequestContext,
        actor: &str,
        action: &str,
        session_id: &str,
        user: &User,
    ) -> Result<()> {
        let now = self.now();
        let mut deliveries = Vec::new();
        for client_id in self.store.session_clients(session_id).await? {
            let Some(c) = self.client(&client_id).await? else { continue };
            let Some(uri) = &c.app.backchannel_logout_uri else { continue };
            let token = self.logout_token(&c.app, &user.id, session_id)?;
            deliveries.push(LogoutDelivery {
                id: new_id(),
                client_id,
                uri: uri.clone(),
                logout_token: token,
                attempts: 0,
                next_attempt_at: now,
                created_at: now,
                delivered_at: None,
                failed_at: None,
            });
        }
        let ev = self.audit(
            ctx,
            actor,
            Some(&user.org_id),
            action,
            session_id,
            serde_json::json!({ "user_id": user.id, "backchannel": deliveries.len() }),
        );
        self.store.end_sso_session(session_id, now, &deliveries, &ev).await?;
        self.forget_session_by_id(session_id).await;
        if !deliveries.is_empty() {
            self.logout_wake.notify_one();
        }
        Ok(())
    }

    fn logout_token(&self, app: &crate::model::Application, sub: &str, sid: &str) -> Result<String> {
        let keys = self.keys.current();
        let signer = keys
            .signer(app.id_token_signing_alg)
            .ok_or_else(|| Error::internal("no key for the client's ID token algorithm"))?;
        let now = self.now();
        let claims = serde_json::json!({
            "iss": self.settings.issuer, "aud": app.client_id.as_str(), "iat": now, "exp": now + 120,
            "jti": new_jti(), "sub": sub, "sid": sid, "events": { LOGOUT_EVENT: {} },
        });
        let body = serde_json::to_vec(&claims).map_err(Error::internal)?;
        jws::sign(signer, "logout+jwt", &body)
    }

    /// Waits until a logout was queued or `timeout` passed (the delivery loop's sleep).
    pub async fn wait_for_logouts(&self, timeout: std::time::Duration) {
        let _ = tokio::time::timeout(timeout, self.logout_wake.notified()).await;
    }

    /// Posts due back-channel logout tokens; failures are retried with backoff, then given up.
    pub async fn deliver_logouts(&self, notifier: &dyn LogoutNotifier) -> Result<usize> {
        let now = self.now();
        let due = self.store.due_logout_deliveries(now, 50).await?;
        let mut delivered = 0;
        for d in due {
            match notifier.notify(&d.uri, &d.logout_token).await {
                Ok(()) => {
                    self.store.logout_delivered(&d.id, self.now()).await?;
                    delivered += 1;
                }
                Err(reason) => {
                    let attempts = d.attempts + 1;
                    let next =
                        LOGOUT_RETRIES.get(usize::try_from(d.attempts).unwrap_or(usize::MAX)).map(|s| self.now() + s);
                    tracing::warn!(client_id = %d.client_id, attempts, reason = %reason, given_up = next.is_none(), "back-channel logout delivery failed");
                    self.store.logout_delivery_failed(&d.id, attempts, next, self.now()).await?;
                }
            }
        }
        Ok(delivered)
    }

    // ---- onboarding ----------------------------------------------------------------------

    /// `POST /api/v1/organisations/{org}/invitations`: a user without a password and an
    /// emailed single-use link to set one (which also verifies the address).
    pub async fn invite_user(
        &self,
        who: &Principal,
        ctx: &RequestContext,
        org_slug: &str,
        req: Invitation,
    ) -> Result<User> {
        let org = self.administered_org(who, org_slug).await?;
        let roles = req.roles.iter().map(|r| crate::ids::RoleName::parse(r)).collect::<Result<Vec<_>>>()?;
        self.check_grantable(who, &org, &roles, &[]).await?;
        self.create_invitation(ctx, &org, &req.email, req.name.as_deref(), roles, &who.subject).await
    }

    async fn create_invitation(
        &self,
        ctx: &RequestContext,
        org: &crate::model::Organisation,
        email: &str,
        name: Option<&str>,
        roles: Vec<crate::ids::RoleName>,
        actor: &str,
    ) -> Result<User> {
        let email = crate::ids::Email::parse(email)?;
        let now = self.now();
        let user = User {
            id: new_id(),
            org_id: org.id.clone(),
            email: email.clone(),
            name: name.map(|n| n.trim().chars().take(200).collect()).filter(|n: &String| !n.is_empty()),
            password_hash: None,
            roles,
            enabled: true,
            failed_logins: 0,
            locked_until: None,
            created_at: now,
            updated_at: now,
        };
        let address = UserEmail::primary_of(&user);
        let (v, link) = self.invitation_link(&user, &address.id)?;
        let msg = invitation_message(&link, org);
        let mail = self.queued_mail(&email, &msg)?;
        let ev = self.audit(
            ctx,
            actor,
            Some(&org.id),
            "user.invite",
            &user.id,
            serde_json::json!({ "email": email.as_str() }),
        );
        self.store.create_invited_user(&user, &address, &v, &mail, &ev).await.map_err(|e| match e {
            crate::StoreError::Conflict(_) => {
                Error::Conflict("this organisation already has a user with that email address".into())
            }
            e => e.into(),
        })?;
        self.mail_queued(&email, &msg);
        Ok(user)
    }

    /// A single-use invitation link for `user` (verifying `address_id`), valid
    /// [`INVITATION_LIFETIME`], and its verification row.
    fn invitation_link(&self, user: &User, address_id: &str) -> Result<(crate::model::Verification, String)> {
        let token = generate_secret()?;
        let mut v = self.new_verification(VerificationPurpose::Invite, user, address_id, &token);
        v.expires_at = self.now() + INVITATION_LIFETIME;
        let link = format!("{}/invite?token={}.{}", self.issuer(), v.id, token.expose_secret());
        Ok((v, link))
    }

    /// `POST …/users/{id}/invitation`: a new link; earlier ones stop working.
    pub async fn resend_invitation(
        &self,
        who: &Principal,
        ctx: &RequestContext,
        org_slug: &str,
        user_id: &str,
    ) -> Result<()> {
        let org = self.administered_org(who, org_slug).await?;
        let Some(user) = self.store.user(&org.id, user_id).await? else {
            return Err(Error::NotFound(format!("user {user_id:?}")));
        };
        if user.password_hash.is_some() {
            return Err(Error::Conflict("this user has already set a password".into()));
        }
        let address = self
            .store
            .user_emails(&user.id)
            .await?
            .into_iter()
            .find(|e| e.email == user.email)
            .ok_or_else(|| Error::internal("user without its primary address"))?;
        self.store.cancel_verifications(&user.id, VerificationPurpose::Invite, self.now()).await?;
        let (v, link) = self.invitation_link(&user, &address.id)?;
        let msg = invitation_message(&link, &org);
        let mail = self.queued_mail(&user.email, &msg)?;
        let ev = self.audit(
            ctx,
            &who.subject,
            Some(&org.id),
            "user.invite",
            &user.id,
            serde_json::json!({ "resent": true }),
        );
        self.store.create_verification(&v, &mail, &ev).await?;
        self.mail_queued(&user.email, &msg);
        Ok(())
    }

    /// The invitation a link names, if it can still be used: (verification, the user).
    pub async fn invitation(&self, link_token: &str) -> Result<(crate::model::Verification, User)> {
        let gone =
            || Error::Unauthenticated("this invitation link is invalid, used or expired; ask for a new one".into());
        let (id, secret) = link_token.split_once('.').ok_or_else(gone)?;
        if !super::auth::plausible_id(id) || secret.len() > 64 {
            return Err(gone());
        }
        let Some(v) = self.store.verification(id).await?.filter(|v| v.purpose == VerificationPurpose::Invite) else {
            return Err(gone());
        };
        if v.consumed_at.is_some() || v.expires_at <= self.now() {
            return Err(gone());
        }
        let expected = v.code_hash.clone();
        if !self.invite_hash(&v.id, secret).matches(&expected) {
            return Err(gone());
        }
        let user = self.store.user(&v.org_id, &v.user_id).await?.ok_or_else(gone)?;
        Ok((v, user))
    }

    fn invite_hash(&self, verification_id: &str, secret: &str) -> SecretHash {
        super::auth::code_hash(self, verification_id, secret)
    }

    /// Sets the password of an invited user from the link; the address counts as verified.
    pub async fn accept_invitation(
        &self,
        ctx: &RequestContext,
        link_token: &str,
        password: SecretString,
    ) -> Result<User> {
        self.count_attempt(ctx, None).await?;
        let (v, user) = self.invitation(link_token).await?;
        crate::crypto::password::check_password_policy(&password)?;
        let hash = self.hash_password_limited(password).await?;
        self.consume(
            ctx,
            &v,
            VerificationEffect::AcceptInvite {
                user_id: user.id.clone(),
                email_id: v.subject_id.clone(),
                password_hash: hash,
            },
            "user.invite.accept",
        )
        .await?;
        self.forget_user_credentials(&user.id);
        Ok(user)
    }

    /// `/register`: self-registration where the organisation allows it. The answer is the
    /// same whether or not the address has an account (an existing one gets nothing).
    pub async fn register(&self, ctx: &RequestContext, org_slug: &str, email: &str, name: Option<&str>) -> Result<()> {
        self.count_attempt(ctx, Some(email)).await?;
        let org = self.registration_org(org_slug).await?;
        let address = crate::ids::Email::parse(email)?;
        if self.store.user_by_email(&org.id, address.as_str()).await?.is_some() {
            return Ok(());
        }
        match self.create_invitation(ctx, &org, email, name, Vec::new(), "self-registration").await {
            Ok(_) | Err(Error::Conflict(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// `PATCH /api/v1/organisations/{org}` `{self_registration}`: an admin of the organisation.
    pub async fn set_self_registration(
        &self,
        who: &Principal,
        ctx: &RequestContext,
        org_slug: &str,
        enabled: bool,
    ) -> Result<()> {
        let org = self.administered_org(who, org_slug).await?;
        let ev = self.audit(
            ctx,
            &who.subject,
            Some(&org.id),
            "organisation.update",
            org.slug.as_str(),
            serde_json::json!({ "self_registration": enabled }),
        );
        if !self.store.set_organisation_self_registration(&org.id, enabled, self.now(), &ev).await? {
            return Err(Error::NotFound(format!("organisation {org_slug:?}")));
        }
        Ok(())
    }

    /// The organisation a registration page is for, when it is open.
    pub async fn registration_org(&self, org_slug: &str) -> Result<crate::model::Organisation> {
        let org = match crate::ids::Slug::parse(org_slug) {
            Ok(s) => self.store.organisation(s.as_str()).await?,
            Err(_) => None,
        };
        org.filter(|o| o.self_registration)
            .ok_or_else(|| Error::NotFound("an organisation open to self-registration by that name".into()))
    }
}

/// What an `id_token_hint` must tell us.
#[derive(serde::Deserialize)]
struct HintClaims {
    iss: String,
    sub: String,
    aud: String,
    #[serde(default)]
    sid: Option<String>,
}

/// `amr` of a sign-in here: a password and a one-time code (emailed or from an app).
fn session_amr() -> Vec<String> {
    vec!["pwd".into(), "otp".into(), "mfa".into()]
}

fn invitation_message<'a>(link: &'a str, org: &'a crate::model::Organisation) -> Message<'a> {
    Message::Invitation { link, org_name: &org.name, days: INVITATION_LIFETIME / 86_400 }
}

fn totp_purpose(user_id: &str) -> String {
    format!("totp-secret:{user_id}")
}

/// `POST /api/v1/organisations/{org}/invitations`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Invitation {
    pub email: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub roles: Vec<String>,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    #[test]
    fn debug_output_never_shows_codes_or_tokens() {
        let r = ClientRedirect {
            redirect_uri: "https://app.test/cb".into(),
            params: vec![("code".into(), "SECRET-CODE".into()), ("state".into(), "s".into())],
            form_post: false,
        };
        let d = format!("{r:?}");
        assert!(!d.contains("SECRET-CODE") && d.contains("code"), "{d}");
        let p = super::super::oauth::TokenParams {
            grant_type: "authorization_code".into(),
            code: Some("SECRET-CODE".into()),
            code_verifier: Some("SECRET-VERIFIER".into()),
            refresh_token: Some("SECRET-REFRESH".into()),
            ..Default::default()
        };
        let d = format!("{p:?}");
        assert!(!d.contains("SECRET"), "{d}");
    }

    #[test]
    fn prompt_values_are_taken_out_one_at_a_time() {
        let pairs = |v: &[(&str, &str)]| v.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<Vec<_>>();
        assert_eq!(
            without_prompt(&pairs(&[("prompt", "login consent"), ("a", "b")]), "login"),
            pairs(&[("prompt", "consent"), ("a", "b")])
        );
        assert_eq!(without_prompt(&pairs(&[("prompt", "login"), ("a", "b")]), "login"), pairs(&[("a", "b")]));
    }

    #[test]
    fn pkce_shapes() {
        assert!(plausible_verifier(&"a".repeat(43)) && plausible_verifier(&"~._-".repeat(32)));
        assert!(!plausible_verifier(&"a".repeat(42)) && !plausible_verifier(&"a".repeat(129)));
        assert!(!plausible_verifier(&format!("{}+", "a".repeat(43))));
        assert!(plausible_challenge(&b64url(&sha256(b"x"))));
        assert!(!plausible_challenge("too-short"));
    }
}
