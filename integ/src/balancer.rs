//! A TCP load balancer in front of fleet-server replicas, configured as
//! docs/deploy.md tells HAProxy to be: an HTTP health check (`GET
//! /readyz`) on every backend every 100 ms, new connections spread round
//! robin over the backends whose last check answered 200, the next one
//! tried when a connect fails, and `503` when none is ready. Bytes pass
//! untouched both ways.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt as _;
use tokio::net::{TcpListener, TcpStream};

/// How often each backend's `/readyz` is asked.
const CHECK_EVERY: Duration = Duration::from_millis(100);

struct State {
    backends: Vec<u16>,
    /// The backends whose last check answered 200.
    ready: Mutex<Vec<u16>>,
    next: AtomicUsize,
}

/// The running balancer; stops when dropped.
pub struct Balancer {
    pub port: u16,
    state: Arc<State>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for Balancer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balancer")
            .field("port", &self.port)
            .field("backends", &self.state.backends)
            .finish_non_exhaustive()
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Balancer {
    /// Listens on a free loopback port in front of the servers on
    /// `backends` (loopback ports).
    pub async fn start(backends: &[u16]) -> Balancer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("address").port();
        let state = Arc::new(State {
            backends: backends.to_vec(),
            ready: Mutex::default(),
            next: AtomicUsize::new(0),
        });
        let checks = tokio::spawn(check(state.clone()));
        let s = state.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(forward(s.clone(), client));
            }
        });
        Balancer {
            port,
            state,
            tasks: vec![checks, accept],
        }
    }

    /// The backends passing their health check now.
    pub fn ready(&self) -> Vec<u16> {
        self.state.ready.lock().unwrap().clone()
    }

    /// Waits until exactly `backends` pass their health check (panics
    /// after `secs`); how long that took.
    pub async fn wait_ready(&self, backends: &[u16], secs: u64) -> Duration {
        let start = Instant::now();
        loop {
            let ready = self.ready();
            if ready == backends {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < Duration::from_secs(secs),
                "ready backends {ready:?}, expected {backends:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Asks every backend's `/readyz` every [`CHECK_EVERY`].
async fn check(state: Arc<State>) {
    let http = edge_agent::tls::default_client();
    loop {
        let mut ready = Vec::new();
        for &p in &state.backends {
            let ok = http
                .get(format!("http://127.0.0.1:{p}/readyz"))
                .timeout(Duration::from_secs(1))
                .send()
                .await
                .is_ok_and(|r| r.status() == reqwest::StatusCode::OK);
            if ok {
                ready.push(p);
            }
        }
        *state.ready.lock().unwrap() = ready;
        tokio::time::sleep(CHECK_EVERY).await;
    }
}

/// Connects `client` to a ready backend, round robin, and copies bytes
/// both ways until either side closes.
async fn forward(state: Arc<State>, mut client: TcpStream) {
    let ready = state.ready.lock().unwrap().clone();
    let first = state.next.fetch_add(1, Relaxed);
    for i in 0..ready.len() {
        let p = ready[(first + i) % ready.len()];
        if let Ok(mut backend) = TcpStream::connect(("127.0.0.1", p)).await {
            let _ = tokio::io::copy_bidirectional(&mut client, &mut backend).await;
            return;
        }
    }
    let _ = client
        .write_all(
            b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
        )
        .await;
    let _ = client.shutdown().await;
}
