//! The gateway's wiring: inside `serve` (the `[gateway]` table of the server's configuration,
//! control plane called in-process) and alone as `portcullis gateway --config gateway.toml`
//! (control plane reached over HTTP(S) as an application holding `portcullis:gateway`). Both
//! reload their routes on SIGHUP and when the configuration file changes, without dropping
//! connections; a configuration that does not validate is logged and the running one kept.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use portcullis_core::Portcullis;
use portcullis_core::clock::SystemClock;
use portcullis_gateway::config::{GatewayConfig, ValidatedConfig};
use portcullis_gateway::control::ControlPlane;
use portcullis_gateway::server::Gateway;
use serde::Deserialize;

/// How often the configuration file's modification time is looked at.
const WATCH_EVERY: Duration = Duration::from_secs(2);

/// `portcullis gateway`'s own configuration file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StandaloneConfig {
    /// The control plane's issuer (external base URL).
    pub issuer: String,
    /// The gateway's application (client_credentials, role `portcullis:gateway`).
    pub client_id: String,
    /// A file holding the client secret (else `PORTCULLIS_GATEWAY_CLIENT_SECRET` or its `_FILE`).
    #[serde(default)]
    pub client_secret_file: Option<PathBuf>,
    /// Extra trust anchor (PEM) for the control plane's HTTPS, e.g. its `/pki/ca.pem`.
    #[serde(default)]
    pub control_plane_ca_file: Option<PathBuf>,
    /// Plain-HTTP address for `/healthz`, `/readyz` and `/metrics` (default `127.0.0.1:9901`).
    #[serde(default)]
    pub ops_listen: Option<String>,
    pub gateway: GatewayConfig,
}

fn validate(raw: &GatewayConfig) -> anyhow::Result<ValidatedConfig> {
    raw.validate().map_err(|e| anyhow::anyhow!("invalid [gateway] configuration: {e}"))
}

fn read_standalone(path: &Path) -> anyhow::Result<(StandaloneConfig, ValidatedConfig)> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let raw: StandaloneConfig =
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("invalid configuration {}: {e}", path.display()))?;
    let validated = validate(&raw.gateway)?;
    Ok((raw, validated))
}

/// Loads everything the gateway needs from the control plane (retrying while it is not reachable
/// yet), binds the listener and starts the background work. Returns the task serving TLS.
async fn start(
    config: ValidatedConfig,
    control: Arc<dyn ControlPlane>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<(Arc<Gateway>, tokio::task::JoinHandle<()>)> {
    let listen = config.listen();
    let gateway = Gateway::new(config, control, Arc::new(SystemClock)).map_err(|e| anyhow::anyhow!("gateway: {e}"))?;
    let mut delay = Duration::from_millis(250);
    let mut attempts = 0u32;
    loop {
        match gateway.prepare().await {
            Ok(()) => break,
            Err(e) if attempts < 40 => {
                attempts += 1;
                tracing::warn!(error = %e, "gateway: control plane not ready; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(e) => bail!("gateway: cannot load its state from the control plane: {e}"),
        }
    }
    gateway.spawn_background(stop.clone());
    let listener =
        tokio::net::TcpListener::bind(listen).await.with_context(|| format!("binding gateway.listen {listen}"))?;
    let bound = listener.local_addr()?;
    tracing::info!("gateway listening on https://{bound}");
    let mut stop_rx = stop;
    let serving = tokio::spawn(gateway.clone().serve(listener, async move {
        let _ = stop_rx.wait_for(|s| *s).await;
    }));
    Ok((gateway, serving))
}

/// Reloads the routes on SIGHUP and when `path` changes, with `load` reading and validating it.
fn spawn_reload<F>(gateway: Arc<Gateway>, path: Option<PathBuf>, load: F, mut stop: tokio::sync::watch::Receiver<bool>)
where
    F: Fn() -> anyhow::Result<ValidatedConfig> + Send + Sync + 'static,
{
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    tokio::spawn(async move {
        #[cfg(unix)]
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; reload on file change only");
                None
            }
        };
        let mut seen: Option<SystemTime> = path.as_deref().and_then(modified);
        let mut tick = tokio::time::interval(WATCH_EVERY);
        loop {
            #[cfg(unix)]
            let hangup = async {
                match hup.as_mut() {
                    Some(s) => s.recv().await,
                    None => std::future::pending().await,
                }
            };
            #[cfg(not(unix))]
            let hangup = std::future::pending::<Option<()>>();
            let reason = tokio::select! {
                _ = stop.changed() => return,
                _ = hangup => "SIGHUP",
                _ = tick.tick() => {
                    let now = path.as_deref().and_then(modified);
                    if now == seen { continue; }
                    seen = now;
                    "file change"
                }
            };
            match load() {
                Ok(config) => match gateway.reload(config).await {
                    Ok(()) => tracing::info!(reason, "gateway configuration reloaded"),
                    Err(e) => tracing::error!(reason, error = %e, "gateway reload refused; keeping the running routes"),
                },
                Err(e) => {
                    tracing::error!(reason, error = %format!("{e:#}"), "gateway reload refused; keeping the running routes")
                }
            }
        }
    });
}

/// The gateway inside `serve`, when the configuration has a `[gateway]` table.
pub async fn start_in_serve(
    raw: &GatewayConfig,
    core: Arc<Portcullis>,
    config_path: Option<PathBuf>,
    reload: impl Fn() -> anyhow::Result<Option<GatewayConfig>> + Send + Sync + 'static,
    stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let config = validate(raw)?;
    let control: Arc<dyn ControlPlane> = Arc::new(portcullis_gateway::inprocess::InProcess::new(core));
    let (gateway, serving) = start(config, control, stop.clone()).await?;
    spawn_reload(
        gateway,
        config_path,
        move || match reload()? {
            Some(raw) => validate(&raw),
            None => bail!("the [gateway] table was removed; stopping the gateway needs a restart"),
        },
        stop,
    );
    Ok(serving)
}

/// `portcullis gateway --config FILE`.
pub async fn run_standalone(
    path: PathBuf,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (raw, config) = read_standalone(&path)?;
    let secret = match &raw.client_secret_file {
        Some(f) => zeroize::Zeroizing::new(
            std::fs::read_to_string(f)
                .with_context(|| format!("reading client_secret_file {}", f.display()))?
                .trim()
                .to_owned(),
        ),
        None => match crate::config::secret_env("GATEWAY_CLIENT_SECRET")? {
            Some(s) => zeroize::Zeroizing::new(secrecy::ExposeSecret::expose_secret(&s).trim().to_owned()),
            None => bail!(
                "the gateway's client secret: set client_secret_file, PORTCULLIS_GATEWAY_CLIENT_SECRET or \
                 PORTCULLIS_GATEWAY_CLIENT_SECRET_FILE"
            ),
        },
    };
    let ca_pem = match &raw.control_plane_ca_file {
        Some(f) => {
            Some(std::fs::read_to_string(f).with_context(|| format!("reading control_plane_ca_file {}", f.display()))?)
        }
        None => None,
    };
    let remote = portcullis_gateway::remote::Remote::new(portcullis_gateway::remote::RemoteConfig {
        issuer: raw.issuer.trim_end_matches('/').to_owned(),
        client_id: raw.client_id.clone(),
        client_secret: secret,
        ca_pem,
        request_timeout: Duration::from_secs(5),
    })
    .map_err(|e| anyhow::anyhow!("control plane client: {e}"))?;
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(&[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5])
        .and_then(|b| b.install_recorder())
        .map_err(|e| anyhow::anyhow!("metrics: {e}"))?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let (gateway, serving) = start(config, Arc::new(remote), stop_rx.clone()).await?;
    let reload_path = path.clone();
    spawn_reload(gateway.clone(), Some(path), move || read_standalone(&reload_path).map(|(_, v)| v), stop_rx.clone());

    let ops: SocketAddr =
        raw.ops_listen.as_deref().unwrap_or("127.0.0.1:9901").parse().context("ops_listen: expected ADDR:PORT")?;
    let ops_listener = tokio::net::TcpListener::bind(ops).await.with_context(|| format!("binding ops_listen {ops}"))?;
    tracing::info!("gateway ops endpoints on http://{}", ops_listener.local_addr()?);
    let ready = gateway.clone();
    let app = axum::Router::new()
        .route("/healthz", axum::routing::get(|| async { "ok\n" }))
        .route(
            "/readyz",
            axum::routing::get(move || {
                let ready = ready.clone();
                async move {
                    if ready.is_ready() {
                        (axum::http::StatusCode::OK, "ready\n")
                    } else {
                        (axum::http::StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                    }
                }
            }),
        )
        .route("/metrics", axum::routing::get(move || std::future::ready(metrics.render())));
    let mut ops_stop = stop_rx.clone();
    axum::serve(ops_listener, app)
        .with_graceful_shutdown(async move {
            let _ = ops_stop.wait_for(|s| *s).await;
        })
        .await
        .context("serving the ops endpoints")?;
    let _ = serving.await;
    tracing::info!("gateway shut down cleanly");
    Ok(())
}
