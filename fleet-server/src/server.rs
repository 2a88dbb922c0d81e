//! Starting the fleet server: open the store and registry, build the trust
//! root and the router, serve until cancelled.

use std::net::SocketAddr;
use std::sync::Arc;

use edgefleet_wire::keys::decode_public_key;
use edgefleet_wire::verify::TrustRoot;
use tokio_util::sync::CancellationToken;

use crate::api::{AppState, router};
use crate::auth::Tokens;
use crate::config::ServerConfig;
use crate::controller::{Controller, run_ticker};
use crate::error::{Error, Result};
use crate::registry::Registry;
use crate::store::SledStore;

/// Builds the shared state from a configuration.
pub fn state(config: &ServerConfig) -> Result<AppState> {
    Ok(state_with_notices(config)?.0)
}

/// The shared state, plus the feed of devices whose desired state changed
/// (when MQTT is configured).
fn state_with_notices(
    config: &ServerConfig,
) -> Result<(
    AppState,
    Option<tokio::sync::mpsc::UnboundedReceiver<String>>,
)> {
    std::fs::create_dir_all(&config.data_dir).map_err(|e| Error::io(&config.data_dir, e))?;
    let mut keys = Vec::new();
    for p in &config.trust.keys {
        let text = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
        keys.push(decode_public_key(&text).map_err(|source| Error::File {
            path: p.clone(),
            source,
        })?);
    }
    let trust = TrustRoot::new(keys, config.trust.threshold).map_err(|e| {
        Error::Usage(format!(
            "[trust]: {e} (list the release public keys in trust.keys)"
        ))
    })?;
    let store: Arc<dyn crate::store::Store> =
        Arc::new(SledStore::open(&config.data_dir.join("store"))?);
    let mut controller = Controller::new(store.clone());
    let mut notices = None;
    if config.mqtt.is_some() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        controller = controller.with_notifier(tx);
        notices = Some(rx);
    }
    let state = AppState {
        controller: Arc::new(controller),
        metrics: Arc::new(crate::metrics::ServerMetrics::default()),
        store,
        registry: Registry::open(&config.data_dir)?,
        trust,
        tokens: Tokens::from_config(&config.auth.tokens)
            .map_err(|e| Error::Usage(format!("[auth]: {e}")))?,
        enrollment_tokens: config.auth.enrollment_tokens.clone(),
        max_bundle_bytes: config.http.max_bundle_bytes,
        mqtt: None,
    };
    Ok((state, notices))
}

/// Binds the configured address; returns the bound address (useful with
/// port 0) and a future that serves until `shutdown` is cancelled.
pub async fn bind(
    config: &ServerConfig,
    shutdown: CancellationToken,
) -> Result<(SocketAddr, impl Future<Output = Result<()>> + use<>)> {
    let (mut state, notices) = state_with_notices(config)?;
    if let (Some(mqtt), Some(notices)) = (&config.mqtt, notices) {
        let m = crate::mqtt::start(
            mqtt,
            state.store.clone(),
            state.tokens.clone(),
            notices,
            shutdown.clone(),
        )?;
        // Scripts and tests read this line to find the broker.
        println!("mqtt broker at {}", m.url);
        state.mqtt = Some(m);
    }
    let listener = tokio::net::TcpListener::bind(config.http.listen)
        .await
        .map_err(|e| Error::io(config.http.listen.to_string(), e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::io("listener", e))?;
    let ticker = tokio::spawn(run_ticker(
        state.controller.clone(),
        std::time::Duration::from_millis(config.rollout_tick_ms),
        shutdown.clone(),
    ));
    let app = router(state);
    let serve = async move {
        let _ticker = ticker;
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
            .map_err(|e| Error::io("http server", e))
    };
    Ok((addr, serve))
}

/// Runs the server until `shutdown` is cancelled.
pub async fn run(config: ServerConfig, shutdown: CancellationToken) -> Result<()> {
    let (addr, serve) = bind(&config, shutdown).await?;
    println!("fleet-server listening on http://{addr}");
    tracing::info!(%addr, data_dir = %config.data_dir.display(), "fleet server started");
    serve.await
}
