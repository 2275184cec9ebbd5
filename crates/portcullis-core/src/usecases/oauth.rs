//! OAuth 2.0 use cases for machine clients: client authentication, the `client_credentials`
//! grant (RFC 6749 §4.4) with RFC 8707 resource indicators and RFC 9068 access tokens,
//! introspection (RFC 7662), revocation (RFC 7009), and turning a bearer token into a
//! [`Principal`]. The token path touches no database: clients and services come from caches.

use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;

use super::*;
use crate::crypto::jws;
use crate::crypto::secrets::{SecretHash, plausible_secret};
use crate::error::{OAuthError, OAuthErrorCode};
use crate::ids::ClientId;
use crate::model::{AuthMethod, GrantType, RevokedToken};
use crate::tokens::{
    ACCESS_TOKEN_TYP, AccessClaims, AccessClaimsRef, AudienceRef, TokenError, new_jti, verify_access_token,
};

/// `client_assertion_type` of RFC 7523 client authentication.
pub const JWT_BEARER_ASSERTION: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// How the client authenticated at the endpoint, as parsed by the HTTP layer.
pub enum ClientAuth {
    Basic {
        client_id: String,
        secret: SecretString,
    },
    Post {
        client_id: String,
        secret: SecretString,
    },
    /// `private_key_jwt` (RFC 7523). `client_id` is the form's, or else the assertion's
    /// (unverified) `sub`, used only to find the keys and to count failures.
    Assertion {
        client_id: String,
        assertion: String,
    },
    /// `tls_client_auth` (RFC 8705): the client certificate the TLS layer verified (DER).
    Certificate {
        client_id: String,
        certificate: Vec<u8>,
    },
    /// A public client (`none`): only its `client_id`; only the authorization code grant
    /// (with PKCE) and refresh.
    Public {
        client_id: String,
    },
}

impl std::fmt::Debug for ClientAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Basic { client_id, .. } => write!(f, "Basic({client_id:?}, ..)"),
            Self::Post { client_id, .. } => write!(f, "Post({client_id:?}, ..)"),
            Self::Assertion { client_id, .. } => write!(f, "Assertion({client_id:?}, ..)"),
            Self::Certificate { client_id, .. } => write!(f, "Certificate({client_id:?}, ..)"),
            Self::Public { client_id } => write!(f, "Public({client_id:?})"),
        }
    }
}

impl ClientAuth {
    /// A `private_key_jwt` authentication. The form's `client_id`, when given, must be the
    /// assertion's `sub`.
    pub fn assertion(form_client_id: Option<String>, assertion: String) -> Result<Self, OAuthError> {
        let sub = jws::parse(&assertion)
            .ok()
            .and_then(|p| serde_json::from_slice::<serde_json::Value>(&p.payload).ok())
            .and_then(|v| v.get("sub").and_then(|s| s.as_str()).map(str::to_owned));
        let client_id = match (form_client_id, sub) {
            (Some(f), Some(s)) if f != s => {
                return Err(OAuthError::invalid_client("client_id does not match the assertion's sub"));
            }
            (Some(f), _) => f,
            (None, Some(s)) => s,
            (None, None) => return Err(OAuthError::invalid_client("client_assertion is malformed")),
        };
        Ok(Self::Assertion { client_id, assertion })
    }

    pub fn client_id(&self) -> &str {
        match self {
            Self::Basic { client_id, .. }
            | Self::Post { client_id, .. }
            | Self::Assertion { client_id, .. }
            | Self::Certificate { client_id, .. }
            | Self::Public { client_id } => client_id,
        }
    }
    fn method(&self) -> AuthMethod {
        match self {
            Self::Basic { .. } => AuthMethod::ClientSecretBasic,
            Self::Post { .. } => AuthMethod::ClientSecretPost,
            Self::Assertion { .. } => AuthMethod::PrivateKeyJwt,
            Self::Certificate { .. } => AuthMethod::TlsClientAuth,
            Self::Public { .. } => AuthMethod::None,
        }
    }
    /// The client certificate this authentication presented, if any.
    fn certificate(&self) -> Option<&[u8]> {
        match self {
            Self::Certificate { certificate, .. } => Some(certificate),
            _ => None,
        }
    }
}

/// The claims of a client assertion (RFC 7523 §3). Unknown claims are ignored; duplicates
/// and wrong types are refused.
#[derive(Debug, serde::Deserialize)]
struct AssertionClaims {
    iss: String,
    sub: String,
    aud: crate::tokens::Audience,
    exp: i64,
    jti: String,
    iat: Option<i64>,
    nbf: Option<i64>,
}

/// Fetches a registered `jwks_uri` (the binary's HTTP client; tests use a fake).
#[async_trait::async_trait]
pub trait JwksFetcher: Send + Sync {
    async fn fetch(&self, url: &str) -> std::result::Result<serde_json::Value, String>;
}

/// When a JWKS was fetched, and its usable keys.
type FetchedKeys = (UnixTime, Arc<Vec<crate::crypto::jwk::ClientKey>>);

/// Keys fetched from `jwks_uri`s, by URL, with when they were fetched.
#[derive(Default)]
pub(crate) struct RemoteJwks {
    pub(crate) fetcher: Option<Arc<dyn JwksFetcher>>,
    cache: tokio::sync::Mutex<HashMap<String, FetchedKeys>>,
}

/// A fetched JWKS is used this long before it is fetched again …
const REMOTE_JWKS_TTL: i64 = 300;
/// … or, when an assertion names a `kid` it lacks, after this long.
const REMOTE_JWKS_REFETCH: i64 = 10;

#[derive(Default)]
pub struct TokenParams {
    pub grant_type: String,
    pub scope: Option<String>,
    pub resource: Option<String>,
    /// The verified TLS client certificate (DER) of the request, if any: the token is bound
    /// to it (`cnf.x5t#S256`, RFC 8705 §3) whatever the client authentication method.
    pub client_certificate: Option<Vec<u8>>,
    pub code: Option<String>,
    pub redirect_uri: Option<String>,
    pub code_verifier: Option<String>,
    pub refresh_token: Option<String>,
}

/// Names what was sent, never the code, verifier or refresh token.
impl std::fmt::Debug for TokenParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenParams")
            .field("grant_type", &self.grant_type)
            .field("scope", &self.scope)
            .field("resource", &self.resource)
            .field("redirect_uri", &self.redirect_uri)
            .field("code", &self.code.is_some())
            .field("code_verifier", &self.code_verifier.is_some())
            .field("refresh_token", &self.refresh_token.is_some())
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Serialize)]
pub struct TokenResponse {
    pub access_token: String,
    pub token_type: &'static str,
    pub expires_in: i64,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub scope: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id_token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<String>,
}

/// RFC 7662 response. Inactive tokens answer `{"active": false}` and nothing else.
#[derive(Debug, Serialize, Default)]
pub struct Introspection {
    pub active: bool,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub claims: Option<AccessClaims>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_type: Option<&'static str>,
}

impl Portcullis {
    /// Authenticates a confidential client by its secret (keyed hash, compared in constant
    /// time), enforcing its registered method and enabled flag. Failures are audited and, past
    /// the per-minute limit, refused with 429.
    pub async fn authenticate_client(
        &self,
        auth: &ClientAuth,
        ctx: &RequestContext,
    ) -> Result<Arc<ClientEntry>, OAuthError> {
        let now = self.now();
        let checked = match auth {
            ClientAuth::Basic { .. } | ClientAuth::Post { .. } => self.check_client_secret(auth).await?,
            ClientAuth::Assertion { client_id, assertion } => self.check_client_assertion(client_id, assertion).await?,
            ClientAuth::Certificate { client_id, certificate } => {
                self.check_client_certificate(client_id, certificate).await?
            }
            ClientAuth::Public { client_id } => match ClientId::is_valid(client_id) {
                false => Err("malformed client id".to_owned()),
                true => match self.client(client_id).await? {
                    // Only a client registered as public may present no credential.
                    Some(e) if e.app.auth_method == AuthMethod::None => Ok(e),
                    Some(_) => Err("client authentication is required".to_owned()),
                    None => Err("unknown client".to_owned()),
                },
            },
        };
        let entry = match checked {
            Ok(entry) => entry,
            Err(reason) => return Err(self.client_authentication_failed(auth, ctx, now, &reason).await),
        };
        let app = &entry.app;
        if app.auth_method != auth.method() {
            // Enforce the registered method: no downgrade from one method to another.
            self.audit_failed_authentication(
                ctx,
                auth.client_id(),
                "client.authenticate",
                "wrong authentication method",
            )
            .await;
            return Err(OAuthError::invalid_client(format!(
                "this client must authenticate with {}",
                app.auth_method.as_str()
            )));
        }
        if !app.enabled {
            self.audit_failed_authentication(ctx, auth.client_id(), "client.authenticate", "client disabled").await;
            return Err(OAuthError::invalid_client("client is disabled"));
        }
        Ok(entry)
    }

    /// Looks the client up (cache first) and compares the secret's keyed hash in constant
    /// time. `Ok(Err(reason))` is a failed authentication; `Err` a storage failure.
    async fn check_client_secret(&self, auth: &ClientAuth) -> Result<Result<Arc<ClientEntry>, String>, Error> {
        let (ClientAuth::Basic { secret, .. } | ClientAuth::Post { secret, .. }) = auth else {
            return Ok(Err("no secret".into()));
        };
        let presented = SecretHash::of(self.vault.as_ref(), secret.expose_secret());
        if !plausible_secret(secret) {
            return Ok(Err("malformed secret".into()));
        }
        if !ClientId::is_valid(auth.client_id()) {
            return Ok(Err("malformed client id".into()));
        }
        let Some(entry) = self.client(auth.client_id()).await? else {
            return Ok(Err("unknown client".into()));
        };
        let app = &entry.app;
        let current = app.secret_hash.as_ref().is_some_and(|h| h.matches(&presented));
        let previous = app.previous_secret_hash.as_ref().is_some_and(|h| h.matches(&presented))
            && app.previous_secret_expires_at.is_some_and(|t| t > self.now());
        if current | previous { Ok(Ok(entry)) } else { Ok(Err("wrong secret".into())) }
    }

    /// `private_key_jwt` (RFC 7523 §3, RFC 8725): the assertion must be signed with an allowed
    /// asymmetric algorithm by a key of the client — an active signing certificate, or its
    /// registered `jwks_uri` — with `iss` = `sub` = client id, `aud` = issuer or token
    /// endpoint, a short `exp`, and a `jti` never seen before (recorded in the store, so a
    /// replay fails after a restart and on every node).
    async fn check_client_assertion(
        &self,
        client_id: &str,
        assertion: &str,
    ) -> Result<Result<Arc<ClientEntry>, String>, Error> {
        use crate::crypto::jwk::ASSERTION_ALGORITHMS;
        if !ClientId::is_valid(client_id) {
            return Ok(Err("malformed client id".into()));
        }
        let parsed = match jws::parse(assertion) {
            Ok(p) => p,
            Err(e) => return Ok(Err(format!("client assertion refused: {e}"))),
        };
        let alg = parsed.header.alg.as_str();
        if !ASSERTION_ALGORITHMS.contains(&alg) {
            return Ok(Err(format!(
                "client assertion algorithm {:?} is not accepted (allowed: {})",
                alg.chars().take(16).collect::<String>(),
                ASSERTION_ALGORITHMS.join(", ")
            )));
        }
        if let Some(typ) = parsed.header.typ.as_deref()
            && !["JWT", "client-authentication+jwt"].iter().any(|t| t.eq_ignore_ascii_case(typ))
        {
            return Ok(Err("client assertion has an unexpected typ".into()));
        }
        let Ok(claims) = serde_json::from_slice::<AssertionClaims>(&parsed.payload) else {
            return Ok(Err("client assertion claims are malformed (iss, sub, aud, exp and jti are required)".into()));
        };
        if claims.iss != client_id || claims.sub != client_id {
            return Ok(Err("client assertion iss and sub must both be the client id".into()));
        }
        let token_endpoint = format!("{}/oauth2/token", self.settings.issuer);
        if !claims.aud.contains(&self.settings.issuer) && !claims.aud.contains(&token_endpoint) {
            return Ok(Err("client assertion aud must be the issuer or the token endpoint".into()));
        }
        let now = self.now();
        let skew = crate::tokens::SKEW_SECS;
        if claims.exp + skew <= now {
            return Ok(Err("client assertion has expired".into()));
        }
        if claims.exp - now > self.settings.ca.assertion_max_lifetime + skew {
            return Ok(Err(format!(
                "client assertion lives too long: exp may be at most {} seconds ahead",
                self.settings.ca.assertion_max_lifetime
            )));
        }
        if claims.nbf.is_some_and(|t| t > now + skew) || claims.iat.is_some_and(|t| t > now + skew) {
            return Ok(Err("client assertion is not valid yet".into()));
        }
        if claims.jti.is_empty() || claims.jti.len() > 256 {
            return Ok(Err("client assertion jti must be 1 to 256 characters".into()));
        }
        let Some(entry) = self.client(client_id).await? else {
            return Ok(Err("unknown client".into()));
        };
        if entry.app.auth_method != AuthMethod::PrivateKeyJwt {
            // Checked again by the caller; refusing here spares the key lookups.
            return Ok(Ok(entry));
        }
        let kid = parsed.header.kid.as_deref();
        let sig_ok = |keys: &[crate::crypto::jwk::ClientKey]| {
            keys.iter()
                .filter(|k| kid.is_none_or(|want| k.kid.as_deref() == Some(want)))
                .filter(|k| k.material.allows(alg))
                .take(10)
                .any(|k| k.material.verify(alg, parsed.signing_input.as_bytes(), &parsed.signature))
        };
        let cert_keys: Vec<crate::crypto::jwk::ClientKey> = self
            .signing_certificate_jwks(&entry.app.id)
            .await?
            .iter()
            .filter_map(crate::crypto::jwk::ClientKey::from_jwk)
            .collect();
        let mut verified = sig_ok(&cert_keys);
        if !verified && let Some(url) = &entry.app.jwks_uri {
            verified = sig_ok(&self.remote_jwks(url, kid).await);
        }
        if !verified {
            return Ok(Err(
                "client assertion is not signed by a key of the client (unknown kid, wrong key, or a revoked or expired certificate)"
                    .into(),
            ));
        }
        if !self.store.record_assertion_jti(client_id, &claims.jti, claims.exp + skew).await? {
            return Ok(Err("client assertion was already used (jti replay)".into()));
        }
        Ok(Ok(entry))
    }

    /// The keys at a registered `jwks_uri`: cached for five minutes, fetched again sooner
    /// (at most every ten seconds) when an assertion names a `kid` they lack. A failed fetch
    /// keeps the last good set.
    async fn remote_jwks(&self, url: &str, kid: Option<&str>) -> Arc<Vec<crate::crypto::jwk::ClientKey>> {
        let Some(fetcher) = self.remote_jwks.fetcher.clone() else {
            return Arc::default();
        };
        let now = self.now();
        let mut cache = self.remote_jwks.cache.lock().await;
        let cached = cache.get(url).cloned();
        let fresh = cached.as_ref().is_some_and(|(at, keys)| {
            let knows_kid = kid.is_none_or(|k| keys.iter().any(|key| key.kid.as_deref() == Some(k)));
            now - at < REMOTE_JWKS_REFETCH || (now - at < REMOTE_JWKS_TTL && knows_kid)
        });
        if fresh && let Some((_, keys)) = cached {
            return keys;
        }
        match fetcher.fetch(url).await {
            Ok(doc) => {
                let keys: Vec<crate::crypto::jwk::ClientKey> = doc
                    .get("keys")
                    .and_then(|k| k.as_array())
                    .map(|a| a.iter().take(100).filter_map(crate::crypto::jwk::ClientKey::from_jwk).collect())
                    .unwrap_or_default();
                let keys = Arc::new(keys);
                if cache.len() > 10_000 {
                    cache.clear();
                }
                cache.insert(url.to_owned(), (now, keys.clone()));
                keys
            }
            Err(e) => {
                tracing::warn!(url, error = %e, "fetching a client's jwks_uri failed; keeping the last good keys");
                // Do not hammer a failing endpoint: the failure counts as a fetch.
                let keys = cached.map(|(_, k)| k).unwrap_or_default();
                cache.insert(url.to_owned(), (now, keys.clone()));
                keys
            }
        }
    }

    /// `tls_client_auth` (RFC 8705 §2.1): the certificate (verified by the TLS layer against
    /// our CA and CRL) must be an active `transport` certificate of this very application.
    async fn check_client_certificate(
        &self,
        client_id: &str,
        certificate: &[u8],
    ) -> Result<Result<Arc<ClientEntry>, String>, Error> {
        if !ClientId::is_valid(client_id) {
            return Ok(Err("malformed client id".into()));
        }
        let cert = match self.presented_certificate(certificate).await {
            Ok(c) => c,
            Err(Error::Unauthenticated(reason)) => return Ok(Err(reason)),
            Err(e) => return Err(e),
        };
        if cert.cert_type != crate::model::CertificateType::Transport || cert.client_id.as_str() != client_id {
            return Ok(Err("the client certificate is not a transport certificate of this client".into()));
        }
        let Some(entry) = self.client(client_id).await? else {
            return Ok(Err("unknown client".into()));
        };
        if entry.app.id != cert.app_id {
            return Ok(Err("the client certificate was issued to an earlier application of that name".into()));
        }
        Ok(Ok(entry))
    }

    /// A failed client authentication: counted per client id and per IP. Within the limit it
    /// is audited and answered `invalid_client`; beyond it, 429 without further work. The
    /// counters are consulted only on failure, so spraying wrong secrets at a client id never
    /// locks out the holder of the right one.
    async fn client_authentication_failed(
        &self,
        auth: &ClientAuth,
        ctx: &RequestContext,
        now: UnixTime,
        reason: &str,
    ) -> OAuthError {
        // A malformed id may be a secret sent in the wrong field: never record it.
        let presented = if ClientId::is_valid(auth.client_id()) { auth.client_id() } else { "(malformed client id)" };
        let client_key = format!("client:{presented}");
        let ip_key = ctx.ip.as_deref().map(|ip| format!("ip:{}", super::auth::ip_bucket(Some(ip))));
        let keys: Vec<&str> = std::iter::once(client_key.as_str()).chain(ip_key.as_deref()).collect();
        if let Err(retry_after_secs) = self.auth_failures.fail(self.store.as_ref(), &keys, now).await {
            return Error::RateLimited { retry_after_secs }.into();
        }
        self.audit_failed_authentication(ctx, presented, "client.authenticate", reason).await;
        OAuthError::invalid_client("client authentication failed")
    }

    /// The token endpoint: `client_credentials`, `authorization_code`, `refresh_token`.
    pub async fn token(
        &self,
        auth: &ClientAuth,
        params: &TokenParams,
        ctx: &RequestContext,
    ) -> Result<TokenResponse, OAuthError> {
        let grant = match params.grant_type.as_str() {
            "client_credentials" => GrantType::ClientCredentials,
            "authorization_code" => GrantType::AuthorizationCode,
            "refresh_token" => GrantType::RefreshToken,
            "" => return Err(OAuthError::invalid_request("grant_type is required")),
            other => {
                return Err(OAuthError::new(
                    OAuthErrorCode::UnsupportedGrantType,
                    format!("unsupported grant_type {:?}", other.chars().take(64).collect::<String>()),
                ));
            }
        };
        let entry = self.authenticate_client(auth, ctx).await?;
        if !entry.app.grant_types.contains(&grant)
            || (grant == GrantType::ClientCredentials && entry.app.auth_method == AuthMethod::None)
        {
            return Err(OAuthError::new(
                OAuthErrorCode::UnauthorizedClient,
                format!("this client may not use grant_type {}", grant.as_str()),
            ));
        }
        // RFC 8705 §3: bound to the request's TLS client certificate, whatever the method.
        let bound = params.client_certificate.as_deref().or_else(|| auth.certificate());
        let cnf = bound.map(|der| crate::pki::x5t_s256(&crate::pki::fingerprint(der)));
        match grant {
            GrantType::ClientCredentials => self.issue_client_token(&entry, params, cnf).await,
            GrantType::AuthorizationCode => self.redeem_code(&entry, params, cnf, ctx).await,
            GrantType::RefreshToken => self.refresh(&entry, params, cnf, ctx).await,
        }
    }

    async fn issue_client_token(
        &self,
        entry: &ClientEntry,
        params: &TokenParams,
        cnf_x5t: Option<String>,
    ) -> Result<TokenResponse, OAuthError> {
        let app = &entry.app;
        let services = self.org_services(&app.org_id).await?;
        let platform = &self.platform;
        let find_by_slug = |slug: &str| -> Option<&Service> {
            if slug == PLATFORM_SERVICE { Some(platform) } else { services.iter().find(|s| s.slug.as_str() == slug) }
        };

        // RFC 8707: a resource narrows the token to one service.
        let target = match &params.resource {
            None => None,
            Some(r) => {
                let svc =
                    if *r == platform.audience { Some(platform) } else { services.iter().find(|s| s.audience == *r) };
                match svc {
                    Some(s) => Some(s),
                    None => {
                        return Err(OAuthError::new(
                            OAuthErrorCode::InvalidTarget,
                            "resource is not a known audience of this client's organisation",
                        ));
                    }
                }
            }
        };
        let in_target = |svc: Option<&str>| target.is_none_or(|t| svc == Some(t.slug.as_str()));

        let scopes: Vec<&str> = match &params.scope {
            Some(requested) => {
                let mut out = Vec::new();
                for s in requested.split(' ').filter(|s| !s.is_empty()) {
                    let allowed = app.scopes.iter().any(|a| a.as_str() == s);
                    if !allowed || !in_target(s.split_once('/').map(|(svc, _)| svc)) {
                        return Err(OAuthError::new(
                            OAuthErrorCode::InvalidScope,
                            format!(
                                "scope {:?} is not allowed for this client{}",
                                s.chars().take(64).collect::<String>(),
                                if target.is_some() { " and resource" } else { "" }
                            ),
                        ));
                    }
                    if !out.contains(&s) {
                        out.push(s);
                    }
                }
                out
            }
            None => app
                .scopes
                .iter()
                .map(|s| s.as_str())
                .filter(|s| in_target(s.split_once('/').map(|(svc, _)| svc)))
                .collect(),
        };
        let mut roles: Vec<&str> =
            app.roles.iter().filter(|r| in_target(Some(r.service()))).map(|r| r.as_str()).collect();

        // The issuer (the admin API) is never one audience among others: a token a resource
        // server receives must not be replayable against the admin API.
        let mut auds: Vec<&str> = Vec::with_capacity(2);
        match target {
            Some(t) => auds.push(&t.audience),
            None => {
                let is_platform = |svc: &str| svc == PLATFORM_SERVICE;
                let owners = scopes
                    .iter()
                    .filter_map(|s| s.split_once('/').map(|(svc, _)| svc))
                    .chain(roles.iter().map(|r| r.split_once(':').map(|(s, _)| s).unwrap_or_default()))
                    .filter(|svc| !is_platform(svc));
                for slug in owners {
                    if let Some(svc) = find_by_slug(slug)
                        && !auds.contains(&svc.audience.as_str())
                    {
                        auds.push(&svc.audience);
                    }
                }
                let platform_roles = roles.iter().any(|r| r.starts_with("portcullis:"));
                if !auds.is_empty() {
                    roles.retain(|r| !r.starts_with("portcullis:"));
                } else if platform_roles {
                    auds.push(&platform.audience);
                } else {
                    auds.push(app.client_id.as_str());
                }
            }
        }

        let (access_token, _, lifetime, scope) =
            self.sign_access_token(entry, app.client_id.as_str(), &auds, &scopes, &roles, cnf_x5t.as_deref())?;
        Ok(TokenResponse {
            access_token,
            token_type: "Bearer",
            expires_in: lifetime,
            scope,
            id_token: None,
            refresh_token: None,
        })
    }

    /// Signs an RFC 9068 access token of `entry`'s client for `sub`. Returns the token, its
    /// `jti`, its lifetime and the `scope` string.
    pub(crate) fn sign_access_token(
        &self,
        entry: &ClientEntry,
        sub: &str,
        auds: &[&str],
        scopes: &[&str],
        roles: &[&str],
        cnf_x5t: Option<&str>,
    ) -> Result<(String, String, i64, String), OAuthError> {
        let app = &entry.app;
        let now = self.now();
        // A lowered tokens.max_lifetime applies to applications created before it.
        let lifetime = app.access_token_lifetime.min(self.settings.max_access_token_lifetime);
        let jti = new_jti();
        let scope = scopes.join(" ");
        let claims = AccessClaimsRef {
            iss: &self.settings.issuer,
            sub,
            aud: AudienceRef::of(auds),
            exp: now + lifetime,
            iat: now,
            jti: &jti,
            client_id: app.client_id.as_str(),
            scope: &scope,
            roles,
            org: entry.org.slug.as_str(),
            cnf: cnf_x5t.map(|x5t| crate::tokens::CnfRef { x5t_s256: x5t }),
        };
        let keys = self.keys.current();
        let Some(signer) = keys.signer(app.signing_alg) else {
            // Its algorithm was removed from tokens.algorithms: say so rather than keep signing
            // with a key that is no longer rotated.
            return Err(OAuthError::new(
                OAuthErrorCode::UnauthorizedClient,
                format!(
                    "this client's access_token_signing_alg {} is not enabled on this server; an admin must choose another",
                    app.signing_alg
                ),
            ));
        };
        let body = serde_json::to_vec(&claims).map_err(Error::internal)?;
        let token = jws::sign(signer, ACCESS_TOKEN_TYP, &body)?;
        Ok((token, jti, lifetime, scope))
    }

    /// Verifies one of our access tokens and that it is still good: not revoked, and its
    /// client still exists and is enabled. Returns the client beside the claims.
    pub async fn validate_access_token(&self, token: &str) -> Result<(AccessClaims, Arc<ClientEntry>), TokenError> {
        let keys = self.keys.current();
        let claims = verify_access_token(token, &keys, &self.settings.issuer, self.now())?;
        match self.store.is_token_revoked(&claims.jti).await {
            Ok(false) => {}
            Ok(true) => return Err(TokenError::Revoked),
            Err(e) => {
                tracing::error!(error = %e, "revocation check failed");
                return Err(TokenError::Unavailable);
            }
        }
        match self.client(&claims.client_id).await {
            // Issued before the client (re)appeared: a deleted client's tokens stay dead.
            Ok(Some(c)) if c.app.enabled && claims.iat >= c.app.created_at => Ok((claims, c)),
            Ok(_) => Err(TokenError::ClientGone),
            Err(e) => {
                tracing::error!(error = %e, "client lookup failed");
                Err(TokenError::Unavailable)
            }
        }
    }

    /// RFC 7662. A caller sees tokens of its own organisation; platform admins and gateways see all.
    pub async fn introspect(&self, caller: &ClientEntry, token: &str) -> Result<Introspection, OAuthError> {
        let claims = match self.validate_access_token(token).await {
            Ok((c, _)) => c,
            Err(TokenError::Unavailable) => {
                return Err(Error::Store(crate::error::StoreError::Unavailable("introspection".into())).into());
            }
            Err(_) => return Ok(Introspection::default()),
        };
        let privileged =
            caller.app.roles.iter().any(|r| r.as_str() == ROLE_PLATFORM_ADMIN || r.as_str() == ROLE_GATEWAY);
        if !privileged && claims.org != caller.org.slug.as_str() {
            return Ok(Introspection::default());
        }
        Ok(Introspection { active: true, claims: Some(claims), token_type: Some("Bearer") })
    }

    /// RFC 7009. Unknown or invalid tokens succeed silently; a token issued to another client
    /// is refused. The revocation is durable before this returns.
    pub async fn revoke(&self, caller: &ClientEntry, token: &str, ctx: &RequestContext) -> Result<(), OAuthError> {
        let keys = self.keys.current();
        // Expired tokens need no revocation; malformed ones are not ours. A refresh token
        // (opaque) revokes its whole family.
        let Ok(claims) = verify_access_token(token, &keys, &self.settings.issuer, self.now()) else {
            return self.revoke_refresh_token(caller, token, ctx).await;
        };
        if claims.client_id != caller.app.client_id.as_str() {
            return Err(OAuthError::new(OAuthErrorCode::UnauthorizedClient, "the token was not issued to this client"));
        }
        let rec = RevokedToken {
            jti: claims.jti.clone(),
            client_id: claims.client_id.clone(),
            expires_at: claims.exp,
            revoked_at: self.now(),
        };
        let ev = self.audit(
            ctx,
            caller.app.client_id.as_str(),
            Some(&caller.app.org_id),
            "token.revoke",
            &claims.jti,
            serde_json::json!({}),
        );
        self.store.revoke_token(&rec, &ev).await?;
        Ok(())
    }

    /// A refused bearer token: audited, and counted per IP so a flood of bad tokens cannot turn
    /// into a flood of audit writes (beyond the limit: 429, nothing written).
    pub(crate) async fn bearer_authentication_failed(
        &self,
        ctx: &RequestContext,
        presented: &str,
        reason: &str,
    ) -> Error {
        if let Some(ip) = &ctx.ip
            && let Err(retry_after_secs) = self
                .auth_failures
                .fail(self.store.as_ref(), &[&format!("bearer-ip:{}", super::auth::ip_bucket(Some(ip)))], self.now())
                .await
        {
            return Error::RateLimited { retry_after_secs };
        }
        self.audit_failed_authentication(ctx, presented, "api.authenticate", reason).await;
        Error::Unauthenticated(reason.to_owned())
    }

    /// The admin API's bearer authentication: a valid access token for this platform
    /// (audience = issuer).
    pub async fn principal_from_bearer(&self, token: &str, ctx: &RequestContext) -> Result<Principal, Error> {
        let (claims, client) = match self.validate_access_token(token).await {
            Ok(valid) => valid,
            Err(TokenError::Unavailable) => {
                return Err(Error::Store(crate::error::StoreError::Unavailable("token validation".into())));
            }
            Err(e) => return Err(self.bearer_authentication_failed(ctx, "bearer", &e.to_string()).await),
        };
        if !claims.aud.contains(&self.settings.issuer) {
            return Err(self
                .bearer_authentication_failed(ctx, &claims.client_id, "token audience is not this server")
                .await);
        }
        // A role taken away from the client stops counting at once (within the client cache's
        // lifetime), not when its tokens expire.
        let roles = claims
            .roles
            .iter()
            .filter(|r| client.app.roles.iter().any(|h| h.as_str() == r.as_str()))
            .cloned()
            .collect();
        Ok(Principal {
            subject: claims.sub.clone(),
            client_id: claims.client_id.clone(),
            org: claims.org.clone(),
            scopes: claims.scopes().map(str::to_owned).collect(),
            roles,
            credential: Credential::AccessToken,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::signing::{Algorithm, SigningKey};

    #[test]
    fn debug_output_never_contains_secrets() {
        let secret = "s3cr3t-value-that-must-not-leak-0123456789";
        let auth = ClientAuth::Basic { client_id: "a$b".into(), secret: SecretString::from(secret) };
        assert!(!format!("{auth:?}").contains(secret));
        let user: NewUser =
            serde_json::from_value(serde_json::json!({"email": "a@b.test", "password": secret})).unwrap();
        assert!(!format!("{user:?}").contains(secret));
        let report = BootstrapReport {
            generated_admin_password: Some(SecretString::from(secret)),
            generated_admin_client_secret: Some(SecretString::from(secret)),
            ..Default::default()
        };
        assert!(!format!("{report:?}").contains(secret));
        let (key, pkcs8) = SigningKey::generate(Algorithm::EdDSA).unwrap();
        let dbg = format!("{key:?}");
        assert!(dbg.contains(key.kid()));
        let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, pkcs8.as_slice());
        assert!(!dbg.contains(&b64[..16]));
    }
}
