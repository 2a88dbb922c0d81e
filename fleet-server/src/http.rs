//! The HTTP listener: hyper HTTP/1.1 connections serving the router, with
//! idle keep-alive connections closed after a timeout (10,000 devices
//! polling must not pin 10,000 idle sockets), tracked tasks and a
//! graceful shutdown.

use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::Result;

/// Serves `app` on `listener` until `shutdown`; waits for the connections
/// in flight to finish their current request.
pub async fn serve(
    listener: std::sync::Arc<tokio::net::TcpListener>,
    app: Router,
    idle: Duration,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: CancellationToken,
) -> Result<()> {
    let conns = TaskTracker::new();
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let accepted = tokio::select! {
            // Once stopped, nothing more is accepted here (a standby hands
            // its socket over to the whole server).
            biased;
            () = shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "http accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        // Every request carries its peer address (rate limits by source).
        let app = app.clone();
        let svc = move |cert: Option<crate::api::ClientCert>| {
            hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(crate::api::Peer(peer));
                if let Some(c) = &cert {
                    req.extensions_mut().insert(c.clone());
                }
                tower::ServiceExt::oneshot(app.clone(), req.map(axum::body::Body::new))
            })
        };
        let mut builder = Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            // Also the idle time allowed between requests on a kept-alive
            // connection.
            .header_read_timeout(idle)
            .keep_alive(true);
        let watcher = graceful.watcher();
        let tls = tls.clone();
        conns.spawn(async move {
            let r = match tls {
                None => {
                    let conn = builder
                        .serve_connection_with_upgrades(TokioIo::new(stream), svc(None))
                        .into_owned();
                    watcher.watch(conn).await
                }
                Some(acceptor) => {
                    // A handshake that does not finish in time is dropped.
                    let tls = match tokio::time::timeout(idle, acceptor.accept(stream)).await {
                        Ok(Ok(t)) => t,
                        Ok(Err(e)) => {
                            tracing::debug!(error = %e, %peer, "tls handshake failed");
                            return;
                        }
                        Err(_) => return,
                    };
                    // The client certificate (already verified against
                    // `[http] client_ca` by the handshake), if one was sent.
                    let cert = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .map(|c| {
                            crate::api::ClientCert(std::sync::Arc::new(c.clone().into_owned()))
                        });
                    let conn = builder
                        .serve_connection_with_upgrades(TokioIo::new(tls), svc(cert))
                        .into_owned();
                    watcher.watch(conn).await
                }
            };
            if let Err(e) = r {
                tracing::trace!(error = %e, "http connection ended");
            }
        });
    }
    conns.close();
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(Duration::from_secs(10)) => {
            tracing::warn!("http connections still open after 10 s; closing");
        }
    }
    Ok(())
}
