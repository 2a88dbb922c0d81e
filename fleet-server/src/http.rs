//! The HTTP listener: hyper HTTP/1.1 connections serving the router, with
//! idle keep-alive connections closed after a timeout (10,000 devices
//! polling must not pin 10,000 idle sockets), tracked tasks and a
//! graceful shutdown.

use std::pin::Pin;
use std::task::{Context, Poll};
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
                let req = req.map(|b| axum::body::Body::new(Lingering::new(b)));
                tower::ServiceExt::oneshot(app.clone(), req)
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

/// How much of a refused upload is read and dropped, at most.
const LINGER_BYTES: u64 = 64 << 20;
/// For how long, at most.
const LINGER_TIME: Duration = Duration::from_secs(10);

/// A request body that, dropped before its end (a request refused before
/// its upload was read: a viewer's bundle push, a declared size over the
/// limit, a rate limit), is read and dropped in the background for a
/// while. Closing a connection with unread bytes in it makes the kernel
/// reset it, and a client still sending loses the refusal it was sent
/// (fleetctl said "request or response body error" instead of
/// "forbidden"). Bounded: [`LINGER_BYTES`] and [`LINGER_TIME`].
struct Lingering {
    inner: Option<hyper::body::Incoming>,
    ended: bool,
}

impl Lingering {
    fn new(inner: hyper::body::Incoming) -> Lingering {
        Lingering {
            inner: Some(inner),
            ended: false,
        }
    }
}

impl hyper::body::Body for Lingering {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<std::result::Result<hyper::body::Frame<bytes::Bytes>, hyper::Error>>> {
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let r = Pin::new(inner).poll_frame(cx);
        if matches!(r, Poll::Ready(None | Some(Err(_)))) {
            self.ended = true;
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner
            .as_ref()
            .is_none_or(hyper::body::Body::is_end_stream)
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.as_ref().map_or_else(
            || hyper::body::SizeHint::with_exact(0),
            hyper::body::Body::size_hint,
        )
    }
}

impl Drop for Lingering {
    fn drop(&mut self) {
        let Some(mut body) = self.inner.take() else {
            return;
        };
        if self.ended || hyper::body::Body::is_end_stream(&body) {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        rt.spawn(async move {
            use http_body_util::BodyExt as _;
            let mut left = LINGER_BYTES;
            let _ = tokio::time::timeout(LINGER_TIME, async {
                while let Some(Ok(frame)) = body.frame().await {
                    let n = frame.data_ref().map_or(0, |d| d.len() as u64);
                    left = left.saturating_sub(n);
                    if left == 0 {
                        break;
                    }
                }
            })
            .await;
        });
    }
}
