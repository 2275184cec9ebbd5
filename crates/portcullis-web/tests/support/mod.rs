//! What the handler test files share: a core over a real SQLite store in a temp dir, a manual
//! clock, an in-memory mailer, the bootstrap admin with a known secret, and the router over it.

use std::sync::Arc;

use axum::Router;
use portcullis_core::Portcullis;
use portcullis_core::clock::{Clock, ManualClock};
use portcullis_core::crypto::signing::Algorithm;
use portcullis_core::crypto::vault::LocalKeyVault;
use portcullis_core::mail::{Mailer, MemoryMailer};
use portcullis_core::settings::CoreSettings;
use portcullis_core::usecases::BootstrapSecrets;
use portcullis_store::SqliteStore;
use portcullis_web::{AppState, router};
use secrecy::SecretString;

pub const ISS: &str = "https://issuer.test";
pub const ADMIN_SECRET: &str = "admin-secret-0123456789abcdefghijklmnopqrstuv";

pub struct Env {
    pub app: Router,
    pub clock: Arc<ManualClock>,
    pub core: Arc<Portcullis>,
    /// Every message delivered (through a wrapping mailer too, once it delivers).
    pub mailer: Arc<MemoryMailer>,
    _dir: tempfile::TempDir,
}

impl Env {
    /// A second node: its own core and caches over its own connections to the same database,
    /// with the same master key, settings and clock, started as `serve` starts one.
    pub async fn another_node(&self) -> (Router, Arc<Portcullis>) {
        let store = SqliteStore::open(&self._dir.path().join("t.db"), self.clock.now()).await.unwrap();
        let core = Arc::new(Portcullis::new(
            Arc::new(store),
            self.clock.clone(),
            Arc::new(LocalKeyVault::new(&[42u8; 32]).unwrap()),
            self.core.settings().clone(),
        ));
        core.bootstrap(BootstrapSecrets { admin_password: None, admin_client_secret: None }).await.unwrap();
        (router(AppState { core: core.clone(), metrics: None }), core)
    }
}

/// `tweak` adjusts the settings; `wrap` may put a mailer of the test's in front of the memory one.
pub async fn build(
    tweak: impl FnOnce(&mut CoreSettings),
    wrap: impl FnOnce(Arc<MemoryMailer>) -> Arc<dyn Mailer>,
) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(1_900_000_000));
    let store = SqliteStore::open(&dir.path().join("t.db"), clock.now()).await.unwrap();
    let mut settings = CoreSettings::for_issuer(ISS);
    settings.signing_algorithms = vec![Algorithm::ES256];
    tweak(&mut settings);
    let mailer = Arc::new(MemoryMailer::default());
    let core = Arc::new(
        Portcullis::new(Arc::new(store), clock.clone(), Arc::new(LocalKeyVault::new(&[42u8; 32]).unwrap()), settings)
            .with_mailer(wrap(mailer.clone())),
    );
    core.bootstrap(BootstrapSecrets {
        admin_password: Some(SecretString::from("bootstrap-password-123")),
        admin_client_secret: Some(SecretString::from(ADMIN_SECRET)),
    })
    .await
    .unwrap();
    let app = router(AppState { core: core.clone(), metrics: None });
    Env { app, clock, core, mailer, _dir: dir }
}

pub async fn env_with(tweak: impl FnOnce(&mut CoreSettings)) -> Env {
    build(tweak, |m| m).await
}

pub async fn env() -> Env {
    env_with(|_| {}).await
}
