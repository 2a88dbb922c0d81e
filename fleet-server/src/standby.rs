//! A standby replica's HTTP face.
//!
//! While another fleet-server holds a shared store's lease, a standby
//! listens on its own `[http] listen` address and answers:
//! - `GET /healthz` 200: the process is alive (a liveness probe must not
//!   restart a healthy standby);
//! - `GET /readyz` 503 `standby`: a load balancer sends it no traffic;
//! - `GET /metrics` (operator tokens, as on the active server): the build
//!   and `fleet_server_active 0`;
//! - anything else 503 `standby` with `Retry-After`, never a half answer
//!   from a server that holds no fleet.
//!
//! Once it takes the lease it answers 503 `starting` while it loads the
//! store, then [`Standby::hand_over`] gives the same socket to the whole
//! server: no moment where the port refuses connections.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::auth::{Action, Caller, Tokens};
use crate::http_error::ApiError;

#[derive(Clone)]
struct Face {
    tokens: Tokens,
    /// Set once this server holds the lease and is loading the store.
    starting: Arc<AtomicBool>,
}

/// The standby's listener and its serving task (stopped on drop).
#[derive(Debug)]
pub struct Standby {
    listener: Arc<TcpListener>,
    starting: Arc<AtomicBool>,
    stop: CancellationToken,
}

impl Standby {
    /// Serves the standby's answers on `listener` until handed over.
    pub fn start(
        listener: TcpListener,
        tls: Option<tokio_rustls::TlsAcceptor>,
        idle: Duration,
        tokens: Tokens,
    ) -> Standby {
        let listener = Arc::new(listener);
        let starting = Arc::new(AtomicBool::new(false));
        let stop = CancellationToken::new();
        let app = Router::new()
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/metrics", get(metrics))
            .fallback(not_serving)
            .with_state(Face {
                tokens,
                starting: starting.clone(),
            });
        let serve = crate::http::serve(listener.clone(), app, idle, tls, stop.clone());
        tokio::spawn(async move {
            if let Err(e) = serve.await {
                tracing::warn!(error = %e, "standby listener ended");
            }
        });
        Standby {
            listener,
            starting,
            stop,
        }
    }

    /// This server took the lease: answer `starting` until handed over.
    pub fn taking_over(&self) {
        self.starting.store(true, Relaxed);
    }

    /// Stops accepting (the connections open now finish their request and
    /// close) and returns the socket for the whole server.
    pub fn hand_over(self) -> Arc<TcpListener> {
        self.listener.clone()
    }
}

impl Drop for Standby {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn not_serving(State(f): State<Face>) -> Response {
    if f.starting.load(Relaxed) {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "starting",
            "this fleet-server took over the store's lease and is loading the fleet; retry shortly",
        )
        .into_response();
    }
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "standby",
        "this fleet-server is a standby: another one holds the store's lease and serves \
         (a load balancer checking /readyz sends requests there)",
    )
    .retry_after(2)
    .into_response()
}

async fn metrics(State(f): State<Face>, headers: HeaderMap) -> Response {
    let caller = crate::auth::bearer(&headers)
        .and_then(|t| f.tokens.find(t))
        .map(|(name, role)| Caller::Operator { name, role });
    let Some(caller) = caller else {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid bearer token is required",
        )
        .into_response();
    };
    if let Err(e) = crate::auth::require(&caller, Action::ReadFleet) {
        return e.into_response();
    }
    let mut out = String::new();
    crate::metrics::identity(&mut out, false);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}
