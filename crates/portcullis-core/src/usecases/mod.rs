//! Use cases: [`Portcullis`] holds the ports (store, clock, vault) and the in-memory state
//! (key ring, client and service caches) and exposes one method per use case. Each mutating
//! use case is one store transaction with its audit event.

mod admin;
mod auth;
mod bootstrap;
mod cluster;
mod gateway;
mod keys;
mod oauth;
mod oidc;
mod pki;
mod users;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

pub use admin::*;
pub use auth::*;
pub use bootstrap::*;
pub use cluster::*;
pub use gateway::*;
pub use oauth::*;
pub use oidc::*;
pub use pki::*;
pub use users::*;

use crate::clock::{Clock, UnixTime};
use crate::crypto::keyring::KeyRing;
use crate::crypto::secrets::SecretHash;
use crate::crypto::vault::KeyVault;
use crate::error::{Error, Result};
use crate::ids::Email;
use crate::ids::{RoleName, ScopeName, Slug, new_id};
use crate::model::{Application, AuditEvent, Organisation, Service};
use crate::settings::CoreSettings;
use crate::store::Store;

/// The platform organisation: home of the bootstrap admin and `portcullis$admin`.
pub const PLATFORM_ORG: &str = "portcullis";
/// The platform's own service: its roles guard Portcullis itself; its audience is the issuer.
pub const PLATFORM_SERVICE: &str = "portcullis";
pub const ROLE_PLATFORM_ADMIN: &str = "portcullis:admin";
pub const ROLE_ORG_ADMIN: &str = "portcullis:org-admin";
pub const ROLE_GATEWAY: &str = "portcullis:gateway";
pub const ADMIN_APP: &str = "admin";

/// How the caller proved who it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// An OAuth access token (the subject is a client or, later, a user).
    AccessToken,
    /// A verified login session (the subject is the user).
    Session { id: String },
    /// An activated API key (the subject is the user who created it).
    ApiKey { id: String },
}

/// Who is calling: derived from a verified access token, session or API key.
#[derive(Debug, Clone)]
pub struct Principal {
    pub subject: String,
    /// The OAuth client, or `session` / `api-key` for people and their keys.
    pub client_id: String,
    /// Organisation slug.
    pub org: String,
    pub roles: Vec<String>,
    pub scopes: Vec<String>,
    pub credential: Credential,
}

impl Principal {
    pub fn is_platform_admin(&self) -> bool {
        self.roles.iter().any(|r| r == ROLE_PLATFORM_ADMIN)
    }
    /// Platform admins administer every organisation; `portcullis:org-admin` only its own.
    pub fn can_admin(&self, org_slug: &str) -> bool {
        self.is_platform_admin() || (self.org == org_slug && self.roles.iter().any(|r| r == ROLE_ORG_ADMIN))
    }
    pub fn ensure_admin(&self, org_slug: &str) -> Result<()> {
        if self.can_admin(org_slug) {
            Ok(())
        } else {
            Err(Error::Forbidden(format!(
                "requires role {ROLE_PLATFORM_ADMIN}, or {ROLE_ORG_ADMIN} in organisation {org_slug}"
            )))
        }
    }
    /// The signed-in user, for the self-service endpoints (sessions and API keys).
    pub fn ensure_user(&self) -> Result<&str> {
        match self.credential {
            Credential::Session { .. } => Ok(&self.subject),
            _ => Err(Error::Forbidden("this endpoint needs a signed-in user (a session token)".into())),
        }
    }
    pub fn ensure_platform_admin(&self) -> Result<()> {
        if self.is_platform_admin() {
            Ok(())
        } else {
            Err(Error::Forbidden(format!("requires role {ROLE_PLATFORM_ADMIN}")))
        }
    }
}

/// Where a request came from, for audit records.
#[derive(Debug, Clone, Default)]
pub struct RequestContext {
    pub ip: Option<String>,
    pub request_id: Option<String>,
}

struct Cached<T> {
    value: T,
    until: UnixTime,
}

/// Clients and organisations' services, read through on a miss and dropped on change, so the
/// token endpoint needs no database round trip.
#[derive(Default)]
struct Caches {
    clients: RwLock<HashMap<String, Cached<Arc<ClientEntry>>>>,
    services: RwLock<HashMap<String, Cached<Arc<Vec<Service>>>>>,
    /// Bumped by every invalidation. A read-through that started before an invalidation does
    /// not insert what it read, so a change committed meanwhile is never hidden by a stale entry.
    generation: std::sync::atomic::AtomicU64,
}

/// A cached client with what the token endpoint needs beside it.
#[derive(Debug)]
pub struct ClientEntry {
    pub app: Application,
    pub org: Organisation,
}

pub struct Portcullis {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) vault: Arc<dyn KeyVault>,
    pub(crate) keys: KeyRing,
    pub(crate) settings: CoreSettings,
    caches: Caches,
    /// Failed client authentications per client id and per IP.
    auth_failures: crate::ratelimit::SharedLimiter,
    /// The platform's own service, built once (its audience is the issuer).
    pub(crate) platform: Service,
    pub(crate) auth: auth::AuthState,
    pub(crate) ca: pki::CaState,
    pub(crate) remote_jwks: oauth::RemoteJwks,
    /// Wakes the back-channel logout delivery loop.
    pub(crate) logout_wake: tokio::sync::Notify,
}

impl std::fmt::Debug for Portcullis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Portcullis").field("issuer", &self.settings.issuer).finish_non_exhaustive()
    }
}

impl Portcullis {
    pub fn new(store: Arc<dyn Store>, clock: Arc<dyn Clock>, vault: Arc<dyn KeyVault>, settings: CoreSettings) -> Self {
        let auth_failures = crate::ratelimit::SharedLimiter::new("auth", settings.auth_failures_per_minute, 60);
        let platform = platform_service(&settings.issuer);
        let settings_auth = settings.auth.clone();
        Self {
            store,
            clock,
            vault,
            keys: KeyRing::default(),
            settings,
            caches: Caches::default(),
            auth_failures,
            platform,
            auth: auth::AuthState::new(&settings_auth),
            ca: pki::CaState::default(),
            remote_jwks: oauth::RemoteJwks::default(),
            logout_wake: tokio::sync::Notify::new(),
        }
    }

    /// Where mail goes (default: kept in memory, for tests).
    pub fn with_mailer(mut self, mailer: Arc<dyn crate::mail::Mailer>) -> Self {
        self.auth.mailer = mailer;
        self
    }

    /// How registered `jwks_uri`s are fetched (without one, only signing certificates count).
    pub fn with_jwks_fetcher(mut self, fetcher: Arc<dyn JwksFetcher>) -> Self {
        self.remote_jwks.fetcher = Some(fetcher);
        self
    }

    pub fn settings(&self) -> &CoreSettings {
        &self.settings
    }
    pub fn issuer(&self) -> &str {
        &self.settings.issuer
    }
    pub fn now(&self) -> UnixTime {
        self.clock.now()
    }
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }
    /// The JWKS document as served at `/oauth2/jwks`.
    pub fn jwks(&self) -> Arc<str> {
        self.keys.current().jwks()
    }
    pub fn keys_loaded(&self) -> bool {
        self.keys.current().published_kids().next().is_some()
    }

    /// The anti-CSRF token for a form shown to the browser holding `binding` (its CSRF
    /// cookie): a keyed hash, so the server keeps no state and no one without the server's
    /// key can compute it.
    pub fn csrf_token(&self, binding: &str) -> String {
        use base64::Engine;
        let h = SecretHash::of(self.vault.as_ref(), &format!("csrf\0{binding}"));
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(h.0)
    }

    /// Whether `token` is [`Self::csrf_token`] of `binding` (constant time).
    pub fn check_csrf_token(&self, binding: &str, token: &str) -> bool {
        use base64::Engine;
        let Ok(raw) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(token) else { return false };
        let Some(given) = SecretHash::from_slice(&raw) else { return false };
        !binding.is_empty() && SecretHash::of(self.vault.as_ref(), &format!("csrf\0{binding}")).matches(&given)
    }

    pub(crate) fn audit(
        &self,
        ctx: &RequestContext,
        actor: &str,
        org_id: Option<&str>,
        action: &str,
        target: &str,
        details: serde_json::Value,
    ) -> AuditEvent {
        let mut details = details;
        if let (Some(id), Some(obj)) = (&ctx.request_id, details.as_object_mut()) {
            obj.insert("request_id".into(), id.clone().into());
        }
        AuditEvent {
            id: new_id(),
            at: self.now(),
            org_id: org_id.map(str::to_owned),
            actor: actor.to_owned(),
            action: action.to_owned(),
            target: target.to_owned(),
            outcome: "success".to_owned(),
            ip: ctx.ip.clone(),
            details,
        }
    }

    /// Records a failed authentication. Failures to record are logged, never shown.
    pub async fn audit_failed_authentication(&self, ctx: &RequestContext, presented: &str, what: &str, reason: &str) {
        let presented: String = presented.chars().take(128).collect();
        let mut ev = self.audit(ctx, &presented, None, what, &presented, serde_json::json!({ "reason": reason }));
        ev.outcome = "failure".to_owned();
        if let Err(e) = self.store.append_audit(&ev).await {
            tracing::error!(error = %e, "could not record a failed authentication");
        }
    }

    // ---- caches -------------------------------------------------------------------------

    pub(crate) async fn client(&self, client_id: &str) -> Result<Option<Arc<ClientEntry>>> {
        let now = self.now();
        if let Ok(map) = self.caches.clients.read()
            && let Some(c) = map.get(client_id).filter(|c| c.until > now)
        {
            return Ok(Some(c.value.clone()));
        }
        let generation = self.caches.generation.load(std::sync::atomic::Ordering::Acquire);
        let Some(app) = self.store.application(client_id).await? else {
            return Ok(None);
        };
        let Some(org) = self.store.organisation_by_id(&app.org_id).await? else {
            return Ok(None);
        };
        let entry = Arc::new(ClientEntry { app, org });
        if let Ok(mut map) = self.caches.clients.write()
            && self.caches.generation.load(std::sync::atomic::Ordering::Acquire) == generation
        {
            if map.len() > 100_000 {
                map.retain(|_, c| c.until > now);
            }
            map.insert(client_id.to_owned(), Cached { value: entry.clone(), until: now + self.settings.cache_ttl });
        }
        Ok(Some(entry))
    }

    pub(crate) fn forget_client(&self, client_id: &str) {
        if let Ok(mut map) = self.caches.clients.write() {
            self.caches.generation.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
            map.remove(client_id);
        }
    }

    pub(crate) async fn org_services(&self, org_id: &str) -> Result<Arc<Vec<Service>>> {
        let now = self.now();
        if let Ok(map) = self.caches.services.read()
            && let Some(c) = map.get(org_id).filter(|c| c.until > now)
        {
            return Ok(c.value.clone());
        }
        let generation = self.caches.generation.load(std::sync::atomic::Ordering::Acquire);
        let list = Arc::new(self.store.services(org_id).await?);
        if let Ok(mut map) = self.caches.services.write()
            && self.caches.generation.load(std::sync::atomic::Ordering::Acquire) == generation
        {
            map.insert(org_id.to_owned(), Cached { value: list.clone(), until: now + self.settings.cache_ttl });
        }
        Ok(list)
    }

    pub(crate) fn forget_services(&self, org_id: &str) {
        if let Ok(mut map) = self.caches.services.write() {
            self.caches.generation.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
            map.remove(org_id);
        }
    }

    /// Drops revocations of tokens that can no longer be accepted (past `exp` plus skew), and
    /// the `jti`s of client assertions past theirs (a replay of one would fail on `exp`).
    pub async fn purge_expired_revocations(&self) -> Result<u64> {
        let now = self.now();
        let tokens = self.store.purge_expired_revocations(now - crate::tokens::SKEW_SECS - 60).await?;
        let assertions = self.store.purge_assertion_jtis(now).await?;
        Ok(tokens + assertions)
    }

    pub(crate) async fn organisation_or_404(&self, slug: &str) -> Result<Organisation> {
        self.store.organisation(slug).await?.ok_or_else(|| Error::NotFound(format!("organisation {slug:?}")))
    }

    /// The organisation `slug`, if `who` may administer it (403 first, so a caller learns
    /// nothing about organisations it cannot administer).
    pub(crate) async fn administered_org(&self, who: &Principal, slug: &str) -> Result<Organisation> {
        who.ensure_admin(slug)?;
        self.organisation_or_404(slug).await
    }
}

fn platform_service(issuer: &str) -> Service {
    let parse_role = |r: &str| RoleName::parse(r).ok();
    Service {
        id: "platform".into(),
        org_id: String::new(),
        slug: Slug::from_static(PLATFORM_SERVICE),
        name: "Portcullis".into(),
        audience: issuer.to_owned(),
        scopes: Vec::<ScopeName>::new(),
        roles: [ROLE_PLATFORM_ADMIN, ROLE_ORG_ADMIN, ROLE_GATEWAY].into_iter().filter_map(parse_role).collect(),
        permissions: Vec::new(),
        created_at: 0,
        updated_at: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_names_the_code_uses_have_their_forms() {
        for slug in [PLATFORM_ORG, PLATFORM_SERVICE, ADMIN_APP] {
            assert!(Slug::parse(slug).is_ok(), "{slug}");
        }
        for role in [ROLE_PLATFORM_ADMIN, ROLE_ORG_ADMIN, ROLE_GATEWAY] {
            assert_eq!(RoleName::parse(role).unwrap().service(), PLATFORM_SERVICE);
        }
        assert_eq!(platform_service("https://i").roles.len(), 3);
    }
}
