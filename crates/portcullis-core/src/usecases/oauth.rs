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

/// How the client authenticated at the endpoint, as parsed by the HTTP layer.
pub enum ClientAuth {
    Basic { client_id: String, secret: SecretString },
    Post { client_id: String, secret: SecretString },
}

impl std::fmt::Debug for ClientAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Basic { client_id, .. } => write!(f, "Basic({client_id:?}, ..)"),
            Self::Post { client_id, .. } => write!(f, "Post({client_id:?}, ..)"),
        }
    }
}

impl ClientAuth {
    pub fn client_id(&self) -> &str {
        match self {
            Self::Basic { client_id, .. } | Self::Post { client_id, .. } => client_id,
        }
    }
    fn method(&self) -> AuthMethod {
        match self {
            Self::Basic { .. } => AuthMethod::ClientSecretBasic,
            Self::Post { .. } => AuthMethod::ClientSecretPost,
        }
    }
    fn secret(&self) -> &SecretString {
        match self {
            Self::Basic { secret, .. } | Self::Post { secret, .. } => secret,
        }
    }
}

#[derive(Debug, Default)]
pub struct TokenParams {
    pub grant_type: String,
    pub scope: Option<String>,
    pub resource: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct TokenResponse {
    pub access_token: String,
    pub token_type: &'static str,
    pub expires_in: i64,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub scope: String,
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
        let entry = match self.check_client_secret(auth).await? {
            Ok(entry) => entry,
            Err(reason) => return Err(self.client_authentication_failed(auth, ctx, now, reason).await),
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
    async fn check_client_secret(&self, auth: &ClientAuth) -> Result<Result<Arc<ClientEntry>, &'static str>, Error> {
        let presented = SecretHash::of(self.vault.as_ref(), auth.secret().expose_secret());
        if !plausible_secret(auth.secret()) {
            return Ok(Err("malformed secret"));
        }
        if !ClientId::is_valid(auth.client_id()) {
            return Ok(Err("malformed client id"));
        }
        let Some(entry) = self.client(auth.client_id()).await? else {
            return Ok(Err("unknown client"));
        };
        let app = &entry.app;
        let current = app.secret_hash.as_ref().is_some_and(|h| h.matches(&presented));
        let previous = app.previous_secret_hash.as_ref().is_some_and(|h| h.matches(&presented))
            && app.previous_secret_expires_at.is_some_and(|t| t > self.now());
        if current | previous { Ok(Ok(entry)) } else { Ok(Err("wrong secret")) }
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
        if let Err(retry_after_secs) = self.auth_failures.fail(&keys, now) {
            return Error::RateLimited { retry_after_secs }.into();
        }
        self.audit_failed_authentication(ctx, presented, "client.authenticate", reason).await;
        OAuthError::invalid_client("client authentication failed")
    }

    /// The token endpoint. Only `client_credentials` exists so far.
    pub async fn token(
        &self,
        auth: &ClientAuth,
        params: &TokenParams,
        ctx: &RequestContext,
    ) -> Result<TokenResponse, OAuthError> {
        let grant = match params.grant_type.as_str() {
            "client_credentials" => GrantType::ClientCredentials,
            "" => return Err(OAuthError::invalid_request("grant_type is required")),
            "authorization_code" | "refresh_token" => {
                // Known grants this server does not issue yet.
                self.authenticate_client(auth, ctx).await?;
                return Err(OAuthError::new(
                    OAuthErrorCode::UnsupportedGrantType,
                    format!("grant_type {} is not supported", params.grant_type),
                ));
            }
            other => {
                return Err(OAuthError::new(
                    OAuthErrorCode::UnsupportedGrantType,
                    format!("unsupported grant_type {:?}", other.chars().take(64).collect::<String>()),
                ));
            }
        };
        let entry = self.authenticate_client(auth, ctx).await?;
        if !entry.app.grant_types.contains(&grant) {
            return Err(OAuthError::new(
                OAuthErrorCode::UnauthorizedClient,
                "this client may not use grant_type client_credentials",
            ));
        }
        self.issue_client_token(&entry, params).await
    }

    async fn issue_client_token(&self, entry: &ClientEntry, params: &TokenParams) -> Result<TokenResponse, OAuthError> {
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

        let now = self.now();
        // A lowered tokens.max_lifetime applies to applications created before it.
        let lifetime = app.access_token_lifetime.min(self.settings.max_access_token_lifetime);
        let jti = new_jti();
        let scope = scopes.join(" ");
        let claims = AccessClaimsRef {
            iss: &self.settings.issuer,
            sub: app.client_id.as_str(),
            aud: AudienceRef::of(&auds),
            exp: now + lifetime,
            iat: now,
            jti: &jti,
            client_id: app.client_id.as_str(),
            scope: &scope,
            roles: &roles,
            org: entry.org.slug.as_str(),
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
        let access_token = jws::sign(signer, ACCESS_TOKEN_TYP, &body)?;
        Ok(TokenResponse { access_token, token_type: "Bearer", expires_in: lifetime, scope })
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
        // Expired tokens need no revocation; malformed ones are not ours.
        let Ok(claims) = verify_access_token(token, &keys, &self.settings.issuer, self.now()) else {
            return Ok(());
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
            && let Err(retry_after_secs) =
                self.auth_failures.fail(&[&format!("bearer-ip:{}", super::auth::ip_bucket(Some(ip)))], self.now())
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
