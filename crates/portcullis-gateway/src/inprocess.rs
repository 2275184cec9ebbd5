//! The control plane inside `portcullis serve`: [`ControlPlane`] by direct calls into the core's
//! gateway use cases (`portcullis_core::usecases::gateway`), the same ones the internal HTTP
//! endpoints serve to a standalone gateway (`docs/gateway-control-plane.md`). No HTTP, no
//! token: the data plane runs in the control plane's own process.
//!
//! Every call is bounded: [`CALL_TIMEOUT`] (the feed: its `wait`, at most 30 s, plus
//! [`CALL_TIMEOUT`]); a core error or a timeout is [`Unavailable`] (the data plane answers 503).
//!
//! Every call runs on the runtime that made the `InProcess` (the server's), not on the gateway's
//! listener threads: database connections and the core's background tasks then belong to the
//! runtime that outlives them all.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use portcullis_core::Portcullis;
use portcullis_core::crypto::signing::VerifyingKey;
use portcullis_core::usecases::{
    GatewayCertPurpose, GatewayChanges, GatewayIdentity, GatewayRefusal, GatewayVerdict, MAX_CHANGES_WAIT,
};
use secrecy::ExposeSecret;

use crate::config::AuthMethod;
use crate::control::{
    BrowserSession, BrowserVerdict, CertificatePurpose, Changes, ControlPlane, IssuedKeyPair, Refusal, RevokedToken,
    TrustBundle, Unavailable, Verdict,
};
use crate::policy::{Identity, PermissionGrants};

/// Longest any call but [`ControlPlane::changes`] may take (store calls time out on their own
/// well before; this is the backstop).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(15);

/// [`ControlPlane`] over the core of the running `serve`.
#[derive(Clone)]
pub struct InProcess {
    core: Arc<Portcullis>,
    /// The server's runtime, where calls run (`None` outside a runtime: on the caller's).
    home: Option<tokio::runtime::Handle>,
}

impl std::fmt::Debug for InProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InProcess").field("issuer", &self.core.issuer()).finish()
    }
}

impl InProcess {
    /// Call from within the server's runtime: calls will run there.
    pub fn new(core: Arc<Portcullis>) -> Self {
        Self { core, home: tokio::runtime::Handle::try_current().ok() }
    }

    /// Runs `call(core)` on the home runtime under `limit`; its error, a timeout or a failed
    /// task is [`Unavailable`].
    async fn run<T, F>(
        &self,
        what: &str,
        limit: Duration,
        call: impl FnOnce(Arc<Portcullis>) -> F,
    ) -> Result<T, Unavailable>
    where
        T: Send + 'static,
        F: std::future::Future<Output = portcullis_core::Result<T>> + Send + 'static,
    {
        let fut = call(self.core.clone());
        match &self.home {
            Some(home) => match home.spawn(bounded_owned(limit, fut)).await {
                Ok(r) => r.map_err(|e| Unavailable(format!("{what}: {e}"))),
                Err(e) => Err(Unavailable(format!("{what}: {e}"))),
            },
            None => bounded_owned(limit, fut).await.map_err(|e| Unavailable(format!("{what}: {e}"))),
        }
    }

    /// The core it calls.
    pub fn core(&self) -> &Arc<Portcullis> {
        &self.core
    }
}

/// Runs a core call under `limit`; its error or the timeout becomes the error text.
async fn bounded_owned<T>(
    limit: Duration,
    call: impl std::future::Future<Output = portcullis_core::Result<T>>,
) -> Result<T, String> {
    match tokio::time::timeout(limit, call).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {} s", limit.as_secs())),
    }
}

/// The core's verdict in the data plane's terms (`auth_method` is the check's own; the caller
/// may set it again).
fn verdict(v: GatewayVerdict, auth_method: AuthMethod) -> Verdict {
    match v {
        Ok(GatewayIdentity { subject, client_id, org, roles, scopes }) => {
            Ok(Identity { subject, client_id, org, roles, scopes, audiences: vec![], auth_method })
        }
        Err(r) => Err(refusal(r)),
    }
}

fn refusal(r: GatewayRefusal) -> Refusal {
    Refusal { status: r.status, message: r.message, retry_after_secs: r.retry_after_secs }
}

fn changes(c: GatewayChanges) -> Changes {
    Changes {
        cursor: c.cursor,
        revoked_tokens: c
            .revoked_tokens
            .into_iter()
            .map(|t| RevokedToken { jti: t.jti, expires_at: t.expires_at })
            .collect(),
        principals: c.principals,
        grants: c.grants,
        trust: c.trust,
        keys: c.keys,
        reset: c.reset,
    }
}

fn purpose(p: CertificatePurpose) -> GatewayCertPurpose {
    match p {
        CertificatePurpose::Server => GatewayCertPurpose::Server,
        CertificatePurpose::UpstreamClient => GatewayCertPurpose::UpstreamClient,
    }
}

#[async_trait]
impl ControlPlane for InProcess {
    fn issuer(&self) -> &str {
        self.core.issuer()
    }

    async fn signing_keys(&self) -> Result<Vec<VerifyingKey>, Unavailable> {
        let keys = self.core.verifying_keys();
        if keys.is_empty() {
            return Err(Unavailable("signing keys: none are loaded yet".into()));
        }
        Ok(keys)
    }

    async fn trust(&self) -> Result<TrustBundle, Unavailable> {
        let t = self.run("trust", CALL_TIMEOUT, |core| async move { core.gateway_trust().await }).await?;
        Ok(TrustBundle { anchors: t.anchors, crls: t.crls })
    }

    async fn grants(&self) -> Result<PermissionGrants, Unavailable> {
        let grants = self.run("grants", CALL_TIMEOUT, |core| async move { core.gateway_grants().await }).await?;
        Ok(grants.into_iter().map(|g| (g.org.to_string(), g.role, g.permission)).collect())
    }

    async fn changes(&self, cursor: Option<&str>, wait: Duration) -> Result<Changes, Unavailable> {
        let limit = wait.min(MAX_CHANGES_WAIT) + CALL_TIMEOUT;
        let cursor = cursor.map(str::to_owned);
        let c = self
            .run("changes", limit, move |core| async move { core.gateway_changes(cursor.as_deref(), wait).await })
            .await?;
        Ok(changes(c))
    }

    async fn api_key(&self, key: &str, secret: &str, client_ip: Option<IpAddr>) -> Result<Verdict, Unavailable> {
        let (key, secret) = (key.to_owned(), zeroize::Zeroizing::new(secret.to_owned()));
        let v = self
            .run("api key check", CALL_TIMEOUT, move |core| async move {
                core.gateway_api_key(&key, &secret, client_ip).await
            })
            .await?;
        Ok(verdict(v, AuthMethod::ApiKey))
    }

    async fn session(&self, token: &str, client_ip: Option<IpAddr>) -> Result<Verdict, Unavailable> {
        let token = zeroize::Zeroizing::new(token.to_owned());
        let v =
            self.run("session check", CALL_TIMEOUT, move |core| async move {
                core.gateway_session(&token, client_ip).await
            })
            .await?;
        Ok(verdict(v, AuthMethod::Session))
    }

    async fn browser_session(
        &self,
        client_id: &str,
        code: &str,
        code_verifier: &str,
        redirect_uri: &str,
        client_ip: Option<IpAddr>,
    ) -> Result<BrowserVerdict, Unavailable> {
        let (client_id, redirect_uri) = (client_id.to_owned(), redirect_uri.to_owned());
        let (code, code_verifier) =
            (zeroize::Zeroizing::new(code.to_owned()), zeroize::Zeroizing::new(code_verifier.to_owned()));
        let v = self
            .run("browser sign-in", CALL_TIMEOUT, move |core| async move {
                core.gateway_browser_session(&client_id, &code, &code_verifier, &redirect_uri, client_ip).await
            })
            .await?;
        Ok(v.map(|s| BrowserSession {
            token: zeroize::Zeroizing::new(s.token.expose_secret().to_owned()),
            expires_at: s.expires_at,
        })
        .map_err(refusal))
    }

    async fn certificate(&self, leaf_der: &[u8]) -> Result<Verdict, Unavailable> {
        let der = leaf_der.to_vec();
        let v = self
            .run("certificate check", CALL_TIMEOUT, move |core| async move { core.gateway_certificate(&der).await })
            .await?;
        Ok(verdict(v, AuthMethod::Mtls))
    }

    async fn issue(&self, p: CertificatePurpose, names: &[String]) -> Result<IssuedKeyPair, Unavailable> {
        let names = names.to_vec();
        let k = self
            .run("certificate issuance", CALL_TIMEOUT, move |core| async move {
                core.gateway_issue_local(purpose(p), &names).await
            })
            .await?;
        Ok(IssuedKeyPair { chain: k.chain, key_pkcs8: k.key_pkcs8, not_after: k.not_after })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use portcullis_core::ids::{PermissionName, RoleName};
    use portcullis_core::usecases::{GatewayRefusal, RevokedJti};

    #[test]
    fn verdicts_keep_every_field_and_take_the_checks_method() {
        let id = GatewayIdentity {
            subject: "u1".into(),
            client_id: "api-key".into(),
            org: "acme".into(),
            roles: vec!["payments:reader".into()],
            scopes: vec!["payments/read".into()],
        };
        assert_eq!(
            verdict(Ok(id), AuthMethod::ApiKey),
            Ok(Identity {
                subject: "u1".into(),
                client_id: "api-key".into(),
                org: "acme".into(),
                roles: vec!["payments:reader".into()],
                scopes: vec!["payments/read".into()],
                audiences: vec![],
                auth_method: AuthMethod::ApiKey,
            })
        );
        let r = GatewayRefusal { status: 429, message: "slow down".into(), retry_after_secs: Some(7) };
        assert_eq!(
            verdict(Err(r), AuthMethod::Session),
            Err(Refusal { status: 429, message: "slow down".into(), retry_after_secs: Some(7) })
        );
    }

    #[test]
    fn feed_pages_and_purposes_map_one_to_one() {
        let c = GatewayChanges {
            cursor: "c1".into(),
            revoked_tokens: vec![RevokedJti { jti: "j".into(), expires_at: 9 }],
            principals: true,
            grants: false,
            trust: true,
            keys: false,
            reset: true,
        };
        assert_eq!(
            changes(c),
            Changes {
                cursor: "c1".into(),
                revoked_tokens: vec![RevokedToken { jti: "j".into(), expires_at: 9 }],
                principals: true,
                grants: false,
                trust: true,
                keys: false,
                reset: true,
            }
        );
        assert_eq!(purpose(CertificatePurpose::Server), GatewayCertPurpose::Server);
        assert_eq!(purpose(CertificatePurpose::UpstreamClient), GatewayCertPurpose::UpstreamClient);
        let g: PermissionGrants =
            [("acme".to_owned(), RoleName::parse("a:b").unwrap(), PermissionName::parse("a.b.c").unwrap())]
                .into_iter()
                .collect();
        assert_eq!(g.len(), 1);
    }

    #[tokio::test]
    async fn a_call_that_hangs_becomes_unavailable() {
        let slow = async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok::<(), portcullis_core::Error>(())
        };
        let e = bounded_owned(Duration::from_millis(20), slow).await.unwrap_err();
        assert!(e.contains("no answer"), "{e}");
        let failed = async { Err::<(), _>(portcullis_core::Error::Internal("db gone".into())) };
        assert!(bounded_owned(CALL_TIMEOUT, failed).await.unwrap_err().contains("db gone"));
    }
}
