//! A fault-injecting HTTP/1.1 proxy between an agent and its fleet server.
//!
//! Every request is passed on to the server (with `Connection: close`);
//! bundle downloads (`GET …/download`) are tampered with according to the
//! current [`Fault`], everything else passes untouched. The proxy counts
//! the download body bytes it hands to the agent, so a test can bound what
//! crosses a flaky link.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What happens to a bundle download.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Passed on as is.
    Honest,
    /// One byte in the middle of the body flipped.
    Flip,
    /// Half the body, with a `Content-Length` that says so: a complete,
    /// well-framed, short response.
    Truncate,
    /// The connection closes at a random point of the body (the declared
    /// length is not reached).
    Cut,
    /// The bytes of another bundle (set with [`FaultProxy::set_replay`]).
    Replay,
    /// Headers and part of the body, then silence until the fault changes.
    Stall,
    /// `500 Internal Server Error`.
    Error500,
}

struct State {
    upstream: SocketAddr,
    fault: watch::Sender<Fault>,
    replay: Mutex<Vec<u8>>,
    rng: AtomicU64,
    /// Download responses tampered with.
    tampered: AtomicU64,
    /// Download body bytes written to the agent.
    download_bytes: AtomicU64,
}

/// The running proxy; stops when dropped.
pub struct FaultProxy {
    pub addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultProxy")
            .field("addr", &self.addr)
            .field("fault", &*self.state.fault.borrow())
            .finish_non_exhaustive()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FaultProxy {
    /// Listens on 127.0.0.1:0 in front of `upstream`.
    pub async fn start(upstream: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (fault, _) = watch::channel(Fault::Honest);
        let state = Arc::new(State {
            upstream,
            fault,
            replay: Mutex::new(Vec::new()),
            rng: AtomicU64::new(0x9e37_79b9_7f4a_7c15),
            tampered: AtomicU64::new(0),
            download_bytes: AtomicU64::new(0),
        });
        let s = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let s = s.clone();
                tokio::spawn(async move {
                    let _ = serve(s, conn).await;
                });
            }
        });
        FaultProxy { addr, state, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set(&self, f: Fault) {
        self.state.fault.send_replace(f);
    }

    pub fn set_replay(&self, bytes: Vec<u8>) {
        *self.state.replay.lock().expect("lock") = bytes;
    }

    /// Download responses tampered with so far.
    pub fn tampered(&self) -> u64 {
        self.state.tampered.load(Relaxed)
    }

    /// Download body bytes handed to clients so far.
    pub fn download_bytes(&self) -> u64 {
        self.state.download_bytes.load(Relaxed)
    }
}

impl State {
    fn random(&self) -> u64 {
        // xorshift; races only make it more random.
        let mut x = self.rng.load(Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng.store(x, Relaxed);
        x
    }
}

const MAX_HEAD: usize = 64 * 1024;

/// Reads up to the end of an HTTP head; returns (head, bytes after it).
async fn read_head(r: &mut (impl AsyncRead + Unpin)) -> std::io::Result<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(i + 4);
            return Ok((String::from_utf8_lossy(&buf).into_owned(), rest));
        }
        if buf.len() > MAX_HEAD {
            return Err(std::io::Error::other("head too large"));
        }
        let n = r.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.split("\r\n").skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// The head without `drop` headers, with `extra` lines added.
fn rewrite(head: &str, drop: &[&str], extra: &[String]) -> String {
    let mut out = String::new();
    for (i, l) in head.trim_end_matches("\r\n").split("\r\n").enumerate() {
        let name = l.split_once(':').map(|(k, _)| k.trim()).unwrap_or("");
        if i > 0 && drop.iter().any(|d| d.eq_ignore_ascii_case(name)) {
            continue;
        }
        out.push_str(l);
        out.push_str("\r\n");
    }
    for e in extra {
        out.push_str(e);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    out
}

/// Decodes a chunked body (complete).
fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(i) = b.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size = std::str::from_utf8(&b[..i])
            .ok()
            .and_then(|s| usize::from_str_radix(s.split(';').next().unwrap_or("").trim(), 16).ok())
            .unwrap_or(0);
        b = &b[i + 2..];
        if size == 0 || b.len() < size {
            return out;
        }
        out.extend_from_slice(&b[..size]);
        b = b.get(size + 2..).unwrap_or(&[]);
    }
}

async fn serve(s: Arc<State>, mut client: TcpStream) -> std::io::Result<()> {
    let (head, mut body) = read_head(&mut client).await?;
    let len: usize = header(&head, "content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    while body.len() < len {
        let mut chunk = vec![0u8; (len - body.len()).min(64 * 1024)];
        let n = client.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        body.extend_from_slice(&chunk[..n]);
    }
    let request_line = head.lines().next().unwrap_or("").to_string();
    let is_download = request_line.starts_with("GET ") && request_line.contains("/download");

    let mut up = TcpStream::connect(s.upstream).await?;
    let fwd = rewrite(
        &head,
        &["connection", "keep-alive"],
        &["Connection: close".into()],
    );
    up.write_all(fwd.as_bytes()).await?;
    up.write_all(&body).await?;
    let (rhead, mut rbody) = read_head(&mut up).await?;
    up.read_to_end(&mut rbody).await?;
    if header(&rhead, "transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        rbody = dechunk(&rbody);
    }
    let status_ok = rhead
        .split_whitespace()
        .nth(1)
        .is_some_and(|c| c == "200" || c == "206");
    let fault = *s.fault.borrow();
    let framing = ["connection", "content-length", "transfer-encoding"];
    let respond = |head: &str, n: usize| {
        rewrite(
            head,
            &framing,
            &[format!("Content-Length: {n}"), "Connection: close".into()],
        )
    };
    if !is_download || !status_ok || fault == Fault::Honest {
        client
            .write_all(respond(&rhead, rbody.len()).as_bytes())
            .await?;
        client.write_all(&rbody).await?;
        if is_download {
            s.download_bytes.fetch_add(rbody.len() as u64, Relaxed);
        }
        client.shutdown().await?;
        return Ok(());
    }
    s.tampered.fetch_add(1, Relaxed);
    match fault {
        Fault::Honest => {}
        Fault::Flip => {
            let mid = rbody.len() / 2;
            if let Some(b) = rbody.get_mut(mid) {
                *b ^= 0xff;
            }
            client
                .write_all(respond(&rhead, rbody.len()).as_bytes())
                .await?;
            client.write_all(&rbody).await?;
            s.download_bytes.fetch_add(rbody.len() as u64, Relaxed);
        }
        Fault::Truncate => {
            rbody.truncate(rbody.len() / 2);
            client
                .write_all(respond(&rhead, rbody.len()).as_bytes())
                .await?;
            client.write_all(&rbody).await?;
            s.download_bytes.fetch_add(rbody.len() as u64, Relaxed);
        }
        Fault::Replay => {
            let other = s.replay.lock().expect("lock").clone();
            // A whole other bundle, whatever range was asked for.
            let head = rewrite(&rhead, &["content-range"], &[]).replacen(
                "206 Partial Content",
                "200 OK",
                1,
            );
            client
                .write_all(respond(&head, other.len()).as_bytes())
                .await?;
            client.write_all(&other).await?;
            s.download_bytes.fetch_add(other.len() as u64, Relaxed);
        }
        Fault::Cut | Fault::Stall => {
            let n = rbody.len();
            let keep = if fault == Fault::Cut && n > 1 {
                1 + (s.random() as usize) % (n - 1)
            } else {
                n / 2
            };
            // The declared length is the real one; the body stops short.
            client.write_all(respond(&rhead, n).as_bytes()).await?;
            client.write_all(&rbody[..keep]).await?;
            client.flush().await?;
            s.download_bytes.fetch_add(keep as u64, Relaxed);
            if fault == Fault::Stall {
                let mut rx = s.fault.subscribe();
                let _ = tokio::time::timeout(
                    Duration::from_secs(300),
                    rx.wait_for(|f| *f != Fault::Stall),
                )
                .await;
            }
        }
        Fault::Error500 => {
            let b = b"{\"code\":\"internal\",\"message\":\"injected\"}";
            let head = format!(
                "HTTP/1.1 500 Internal Server Error\r\ncontent-type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                b.len()
            );
            client.write_all(head.as_bytes()).await?;
            client.write_all(b).await?;
        }
    }
    client.shutdown().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_bodies_decode() {
        assert_eq!(dechunk(b"3\r\nabc\r\n2;x=1\r\nde\r\n0\r\n\r\n"), b"abcde");
    }

    #[test]
    fn rewrite_drops_and_adds_headers() {
        let h = "GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive\r\n\r\n";
        let r = rewrite(h, &["connection"], &["Connection: close".into()]);
        assert_eq!(r, "GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
        assert_eq!(header(h, "host"), Some("a"));
    }
}
