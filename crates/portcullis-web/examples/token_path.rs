//! In-process cost of one `client_credentials` token, without sockets: the core use case
//! alone, then the whole router through `oneshot`, then `/healthz` through the router. Run
//! with `cargo run --release -p portcullis-web --example token_path`; see docs/benchmarks.md.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::http::Request;
use base64::Engine;
use portcullis_core::Portcullis;
use portcullis_core::clock::SystemClock;
use portcullis_core::crypto::signing::Algorithm;
use portcullis_core::crypto::vault::LocalKeyVault;
use portcullis_core::settings::CoreSettings;
use portcullis_core::usecases::{BootstrapSecrets, ClientAuth, RequestContext, TokenParams};
use portcullis_store::SqliteStore;
use secrecy::SecretString;
use tower::ServiceExt;

/// The same allocator as the binary, so the figures match what it serves.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const SECRET: &str = "admin-secret-0123456789abcdefghijklmnopqrstuv";
const N: u32 = 50_000;

fn report(what: &str, start: Instant) {
    println!("{what:<28} {:>7.2} µs/op", start.elapsed().as_secs_f64() * 1e6 / f64::from(N));
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("b.db"), 0).await.unwrap();
    let mut settings = CoreSettings::for_issuer("https://issuer.test");
    settings.signing_algorithms = vec![Algorithm::ES256];
    settings.cache_ttl = 3600;
    let core = Arc::new(Portcullis::new(
        Arc::new(store),
        Arc::new(SystemClock),
        Arc::new(LocalKeyVault::new(&[7u8; 32]).unwrap()),
        settings,
    ));
    core.bootstrap(BootstrapSecrets { admin_client_secret: Some(SecretString::from(SECRET)), ..Default::default() })
        .await
        .unwrap();
    let (key, _) = portcullis_core::crypto::signing::SigningKey::generate(Algorithm::ES256).unwrap();
    let msg = [b'x'; 300];
    let start = Instant::now();
    for _ in 0..N {
        std::hint::black_box(key.sign(&msg).unwrap());
    }
    report("ES256 signature alone", start);

    let ctx = RequestContext::default();
    let params = TokenParams { grant_type: "client_credentials".into(), ..Default::default() };
    let auth = ClientAuth::Basic { client_id: "portcullis$admin".into(), secret: SecretString::from(SECRET) };
    core.token(&auth, &params, &ctx).await.unwrap();

    let start = Instant::now();
    for _ in 0..N {
        std::hint::black_box(core.token(&auth, &params, &ctx).await.unwrap());
    }
    report("core token use case", start);

    // The recorder the binary installs, so metric recording is counted as in production.
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder().unwrap();
    let app = portcullis_web::router(portcullis_web::AppState { core, metrics: Some(metrics) });
    let basic =
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("portcullis$admin:{SECRET}")));
    let start = Instant::now();
    for _ in 0..N {
        let req = Request::post("/oauth2/token")
            .header("authorization", &basic)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Body::from("grant_type=client_credentials"))
            .unwrap();
        let resp = app.clone().oneshot(req).await.unwrap();
        std::hint::black_box(axum::body::to_bytes(resp.into_body(), usize::MAX).await.unwrap());
    }
    report("router POST /oauth2/token", start);

    let start = Instant::now();
    for _ in 0..N {
        let resp = app.clone().oneshot(Request::get("/healthz").body(Body::empty()).unwrap()).await.unwrap();
        std::hint::black_box(axum::body::to_bytes(resp.into_body(), usize::MAX).await.unwrap());
    }
    report("router GET /healthz", start);
}
