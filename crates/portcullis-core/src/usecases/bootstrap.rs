//! First start (DESIGN §1): check the master key against the database, then make sure every
//! piece exists — signing keys, CA hierarchy, platform organisation, bootstrap admin user and
//! the `portcullis$admin` application. Each step is idempotent, so a restart (or a start that
//! crashed half-way) reuses what exists and creates only what is missing. Nodes starting
//! together on one database take turns (a lease), so the CA hierarchy and the admin are
//! created once.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use secrecy::SecretString;

use super::*;
use crate::ca;
use crate::crypto::password;
use crate::crypto::secrets::{SecretHash, generate_password, generate_secret};
use crate::crypto::signing::Algorithm;
use crate::ids::{ClientId, Email};
use crate::model::{AuthMethod, GrantType, User};

const VAULT_CHECK_KEY: &str = "vault_check";
const VAULT_CHECK_PURPOSE: &str = "vault-check";
const VAULT_CHECK_PLAINTEXT: &[u8] = b"portcullis master key check";

/// What the operator must see once: secrets generated on this start.
#[derive(Debug, Default)]
pub struct BootstrapReport {
    pub admin_email: Option<String>,
    pub generated_admin_password: Option<SecretString>,
    pub generated_admin_client_secret: Option<SecretString>,
    pub created: Vec<&'static str>,
}

/// Secrets an operator may supply instead of having them generated.
#[derive(Debug, Default)]
pub struct BootstrapSecrets {
    pub admin_password: Option<SecretString>,
    pub admin_client_secret: Option<SecretString>,
}

/// Whether `vault` holds this database's master key, for commands that must not write
/// (`audit verify`, `restore`'s check): `None` when the database was never initialised.
pub async fn master_key_matches(store: &dyn Store, vault: &dyn KeyVault) -> Result<Option<bool>> {
    let Some(sealed) = store.setting(VAULT_CHECK_KEY).await? else { return Ok(None) };
    let bytes = B64.decode(sealed).map_err(Error::internal)?;
    Ok(Some(vault.open(VAULT_CHECK_PURPOSE, &bytes).is_ok_and(|p| p.as_slice() == VAULT_CHECK_PLAINTEXT)))
}

/// The lease nodes starting together take in turn: the first creates what is missing, the
/// others find it.
const BOOTSTRAP_LEASE: &str = "bootstrap";
/// Longer than any bootstrap takes; a node that crashed holding the lease delays the others
/// this long at most.
const BOOTSTRAP_LEASE_SECS: i64 = 60;

impl Portcullis {
    /// Makes sure every piece exists (see the module documentation), one node at a time.
    pub async fn bootstrap(&self, secrets: BootstrapSecrets) -> Result<BootstrapReport> {
        let holder = new_id();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(120);
        while !self.store.take_lease(BOOTSTRAP_LEASE, &holder, self.now(), BOOTSTRAP_LEASE_SECS).await? {
            if tokio::time::Instant::now() > deadline {
                return Err(Error::internal("another node has been initialising the database for two minutes"));
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        let report = self.bootstrap_alone(secrets).await;
        if let Err(e) = self.store.release_lease(BOOTSTRAP_LEASE, &holder).await {
            tracing::warn!(error = %e, "could not give up the bootstrap lease; it runs out by itself");
        }
        report
    }

    async fn bootstrap_alone(&self, secrets: BootstrapSecrets) -> Result<BootstrapReport> {
        let mut report = BootstrapReport::default();
        self.check_vault().await?;
        // Only once the master key is known to be this database's: it seals the chain head.
        self.store.start_audit_chain(self.vault.audit_chain_key()).await?;
        if self.ensure_signing_keys().await? {
            report.created.push("token signing keys");
        }
        if self.store.ca_certificates().await?.is_empty() {
            let certs = ca::create_hierarchy(self.vault.as_ref(), self.now())?;
            let ev = self.audit(
                &RequestContext::default(),
                "system",
                None,
                "ca.create",
                "root+issuing",
                serde_json::json!({}),
            );
            self.store.insert_ca_certificates(&certs, &ev).await?;
            report.created.push("root and issuing CA");
        }
        let org = match self.store.organisation(PLATFORM_ORG).await? {
            Some(o) => o,
            None => {
                let now = self.now();
                let org = Organisation {
                    id: new_id(),
                    slug: Slug::parse(PLATFORM_ORG)?,
                    name: "Portcullis".into(),
                    allowed_domains: Vec::new(),
                    self_registration: false,
                    created_at: now,
                    updated_at: now,
                };
                let ev = self.audit(
                    &RequestContext::default(),
                    "system",
                    Some(&org.id),
                    "organisation.create",
                    PLATFORM_ORG,
                    serde_json::json!({}),
                );
                self.store.create_organisation(&org, &ev).await?;
                report.created.push("platform organisation");
                org
            }
        };
        self.bootstrap_admin_user(&org, secrets.admin_password, &mut report).await?;
        self.bootstrap_admin_app(&org, secrets.admin_client_secret, &mut report).await?;
        self.reload_keys().await?;
        self.load_ca().await?;
        Ok(report)
    }

    /// Refuses to run with a master key other than the one this database was created with.
    async fn check_vault(&self) -> Result<()> {
        match self.store.setting(VAULT_CHECK_KEY).await? {
            Some(sealed) => {
                let bytes = B64.decode(sealed).map_err(Error::internal)?;
                let ok = self
                    .vault
                    .open(VAULT_CHECK_PURPOSE, &bytes)
                    .map(|p| p.as_slice() == VAULT_CHECK_PLAINTEXT)
                    .unwrap_or(false);
                if !ok {
                    return Err(Error::internal(
                        "the master key does not match this database (was master.key replaced or PORTCULLIS_MASTER_KEY changed?)",
                    ));
                }
                Ok(())
            }
            None => {
                let sealed = self.vault.seal(VAULT_CHECK_PURPOSE, VAULT_CHECK_PLAINTEXT)?;
                self.store.insert_setting(VAULT_CHECK_KEY, &B64.encode(sealed)).await?;
                // Another node may have won the race: check against what is stored now.
                Box::pin(self.check_vault()).await
            }
        }
    }

    async fn bootstrap_admin_user(
        &self,
        org: &Organisation,
        password: Option<SecretString>,
        report: &mut BootstrapReport,
    ) -> Result<()> {
        let email = Email::parse(&self.settings.bootstrap_admin_email)?;
        report.admin_email = Some(email.to_string());
        if self.store.user_by_email(&org.id, email.as_str()).await?.is_some() {
            return Ok(());
        }
        let (password, generated) = match password {
            Some(p) => {
                password::check_password_policy(&p)?;
                (p, false)
            }
            None => (generate_password()?, true),
        };
        let hash = {
            let p = password.clone();
            tokio::task::spawn_blocking(move || password::hash_password(&p)).await.map_err(Error::internal)??
        };
        let now = self.now();
        let user = User {
            id: new_id(),
            org_id: org.id.clone(),
            email,
            name: Some("Bootstrap admin".into()),
            password_hash: Some(hash),
            roles: vec![RoleName::parse(ROLE_PLATFORM_ADMIN)?],
            enabled: true,
            failed_logins: 0,
            locked_until: None,
            created_at: now,
            updated_at: now,
        };
        let ev = self.audit(
            &RequestContext::default(),
            "system",
            Some(&org.id),
            "user.create",
            &user.id,
            serde_json::json!({ "bootstrap": true }),
        );
        self.store.create_user(&user, &ev).await?;
        report.created.push("bootstrap admin user");
        if generated {
            report.generated_admin_password = Some(password);
        }
        Ok(())
    }

    async fn bootstrap_admin_app(
        &self,
        org: &Organisation,
        secret: Option<SecretString>,
        report: &mut BootstrapReport,
    ) -> Result<()> {
        let client_id = ClientId::new(&org.slug, &Slug::parse(ADMIN_APP)?);
        if self.store.application(client_id.as_str()).await?.is_some() {
            return Ok(());
        }
        let (secret, generated) = match secret {
            Some(s) => {
                if !crate::crypto::secrets::plausible_secret(&s) || secrecy::ExposeSecret::expose_secret(&s).len() < 32
                {
                    return Err(Error::invalid(
                        "PORTCULLIS_ADMIN_CLIENT_SECRET must be 32 to 512 printable ASCII characters",
                    ));
                }
                (s, false)
            }
            None => (generate_secret()?, true),
        };
        let now = self.now();
        let app = Application {
            id: new_id(),
            org_id: org.id.clone(),
            slug: Slug::parse(ADMIN_APP)?,
            client_id: client_id.clone(),
            name: "Portcullis admin".into(),
            grant_types: vec![GrantType::ClientCredentials],
            scopes: vec![],
            roles: vec![RoleName::parse(ROLE_PLATFORM_ADMIN)?],
            auth_method: AuthMethod::ClientSecretBasic,
            redirect_uris: vec![],
            jwks_uri: None,
            access_token_lifetime: self.settings.default_access_token_lifetime,
            signing_alg: Algorithm::ES256,
            id_token_signing_alg: Algorithm::RS256,
            first_party: true,
            post_logout_redirect_uris: vec![],
            backchannel_logout_uri: None,
            always_issue_refresh_token: false,
            enabled: true,
            secret_hash: Some(SecretHash::of(self.vault.as_ref(), secrecy::ExposeSecret::expose_secret(&secret))),
            previous_secret_hash: None,
            previous_secret_expires_at: None,
            created_at: now,
            updated_at: now,
        };
        let ev = self.audit(
            &RequestContext::default(),
            "system",
            Some(&org.id),
            "application.create",
            client_id.as_str(),
            serde_json::json!({ "bootstrap": true }),
        );
        self.store.create_application(&app, &ev).await?;
        report.created.push("portcullis$admin application");
        if generated {
            report.generated_admin_client_secret = Some(secret);
        }
        Ok(())
    }
}
