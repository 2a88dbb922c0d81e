//! The device side of the fleet server API: enroll, desired state (ETag),
//! reports, and resumable bundle downloads (Range, sha256 while streaming,
//! a size cap).

use std::io::{Read as _, Seek as _, Write as _};
use std::path::Path;
use std::time::{Duration, Instant};

use edgefleet_wire::device::{DesiredState, DeviceReport, EnrollRequest, EnrollResponse};
use reqwest::StatusCode;
use reqwest::header::{self, HeaderValue};
use sha2::{Digest as _, Sha256};

use crate::error::AgentError;

/// Bytes between durable download checkpoints.
pub const CHECKPOINT_BYTES: u64 = 256 * 1024;

/// An HTTP client bound to one fleet server and, after enrollment, one
/// device credential.
#[derive(Clone, Debug)]
pub struct ServerClient {
    base: String,
    http: reqwest::Client,
    credential: Option<String>,
    timeout: Duration,
}

/// The result of a conditional desired-state poll.
#[derive(Debug)]
pub enum Poll {
    NotModified,
    Changed {
        desired: Box<DesiredState>,
        etag: String,
    },
}

/// One resumable download.
#[derive(Debug, Clone, Copy)]
pub struct Download<'a> {
    /// Server-relative path.
    pub path: &'a str,
    /// The partial file.
    pub part: &'a Path,
    /// Bytes already in `part` and checkpointed.
    pub offset: u64,
    /// sha256 of the whole file, hex (the content address).
    pub expected_id: &'a str,
    pub max_bytes: u64,
    /// Throughput cap (tests).
    pub bytes_per_sec: Option<u64>,
}

impl ServerClient {
    /// `tls` applies to `https://` base URLs.
    pub fn new(
        base: &str,
        timeout: Duration,
        tls: &crate::tls::TlsFiles,
    ) -> Result<ServerClient, AgentError> {
        let http = crate::tls::http_client(
            base,
            tls,
            reqwest::Client::builder().connect_timeout(Duration::from_secs(10)),
        )?;
        Ok(ServerClient {
            base: base.trim_end_matches('/').to_string(),
            http,
            credential: None,
            timeout,
        })
    }

    pub fn with_credential(mut self, credential: String) -> ServerClient {
        self.credential = Some(credential);
        self
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn authed(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.credential {
            Some(c) => rb.bearer_auth(c),
            None => rb,
        }
    }

    fn http_err(url: &str, e: reqwest::Error) -> AgentError {
        AgentError::Http {
            url: url.to_string(),
            detail: e.to_string(),
        }
    }

    /// Turns a non-success answer into [`AgentError::Server`] with the
    /// server's `{"error": {"code", "message"}}`.
    async fn fail(url: &str, resp: reqwest::Response) -> AgentError {
        let status = resp.status().as_u16();
        let body = resp.bytes().await.unwrap_or_default();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        AgentError::Server {
            url: url.to_string(),
            status,
            code: v["error"]["code"].as_str().unwrap_or("unknown").to_string(),
            message: v["error"]["message"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| String::from_utf8_lossy(&body).chars().take(200).collect()),
        }
    }

    pub async fn enroll(&self, req: &EnrollRequest) -> Result<EnrollResponse, AgentError> {
        let url = self.url("/api/v1/devices/enroll");
        let body = serde_json::to_vec(req).map_err(|e| AgentError::Invariant(e.to_string()))?;
        let resp = self
            .http
            .post(&url)
            .timeout(self.timeout)
            .header(header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| Self::http_err(&url, e))?;
        if !resp.status().is_success() {
            return Err(Self::fail(&url, resp).await);
        }
        let bytes = resp.bytes().await.map_err(|e| Self::http_err(&url, e))?;
        serde_json::from_slice(&bytes).map_err(|e| AgentError::Http {
            url,
            detail: format!("malformed enrollment response: {e}"),
        })
    }

    /// `GET /api/v1/device/desired` with `If-None-Match`.
    pub async fn desired(&self, etag: Option<&str>) -> Result<Poll, AgentError> {
        let url = self.url("/api/v1/device/desired");
        let mut rb = self.authed(self.http.get(&url).timeout(self.timeout));
        if let Some(e) = etag {
            rb = rb.header(header::IF_NONE_MATCH, e);
        }
        let resp = rb.send().await.map_err(|e| Self::http_err(&url, e))?;
        if resp.status() == StatusCode::NOT_MODIFIED {
            return Ok(Poll::NotModified);
        }
        if !resp.status().is_success() {
            return Err(Self::fail(&url, resp).await);
        }
        let etag = resp
            .headers()
            .get(header::ETAG)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let bytes = resp.bytes().await.map_err(|e| Self::http_err(&url, e))?;
        let desired = serde_json::from_slice(&bytes).map_err(|e| AgentError::Http {
            url,
            detail: format!("malformed desired state: {e}"),
        })?;
        Ok(Poll::Changed {
            desired: Box::new(desired),
            etag,
        })
    }

    pub async fn report(&self, report: &DeviceReport) -> Result<(), AgentError> {
        let url = self.url("/api/v1/device/report");
        let body = serde_json::to_vec(report).map_err(|e| AgentError::Invariant(e.to_string()))?;
        let resp = self
            .authed(self.http.post(&url).timeout(self.timeout))
            .header(header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| Self::http_err(&url, e))?;
        if !resp.status().is_success() {
            return Err(Self::fail(&url, resp).await);
        }
        Ok(())
    }

    /// Downloads `job.path` into `job.part`, resuming at `job.offset` (the bytes before
    /// it are already in the file and were checkpointed). The content
    /// address `expected_id` (sha256 of the whole file) is checked while
    /// streaming; nothing beyond `max_bytes` is accepted. `checkpoint` is
    /// called after the file is synced, every [`CHECKPOINT_BYTES`].
    pub async fn download(
        &self,
        job: Download<'_>,
        mut checkpoint: impl FnMut(u64),
    ) -> Result<(), AgentError> {
        let Download {
            path,
            part,
            offset,
            expected_id,
            max_bytes,
            bytes_per_sec,
        } = job;
        let url = self.url(path);
        let io = |e| AgentError::io(part, e);
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(part)
            .map_err(io)?;
        // Never trust bytes past the last checkpoint.
        let have = file.metadata().map_err(io)?.len();
        let mut offset = offset.min(have);
        file.set_len(offset).map_err(io)?;
        // Re-hash the kept prefix (cheaper than persisting hasher state).
        let mut hasher = Sha256::new();
        {
            file.seek(std::io::SeekFrom::Start(0)).map_err(io)?;
            let mut buf = vec![0u8; 64 * 1024];
            let cap = buf.len() as u64;
            let mut left = offset;
            while left > 0 {
                let n = file.read(&mut buf[..left.min(cap) as usize]).map_err(io)?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                left -= n as u64;
            }
        }
        file.seek(std::io::SeekFrom::Start(offset)).map_err(io)?;

        let mut rb = self.authed(self.http.get(&url));
        if offset > 0 {
            rb = rb.header(header::RANGE, format!("bytes={offset}-"));
            if let Ok(v) = HeaderValue::from_str(&format!("\"{expected_id}\"")) {
                rb = rb.header(header::IF_RANGE, v);
            }
        }
        let mut resp = rb.send().await.map_err(|e| Self::http_err(&url, e))?;
        match resp.status() {
            StatusCode::PARTIAL_CONTENT => {}
            StatusCode::OK => {
                // The server sent everything (no range support or changed
                // content): start over.
                if offset > 0 {
                    offset = 0;
                    hasher = Sha256::new();
                    file.set_len(0).map_err(io)?;
                    file.seek(std::io::SeekFrom::Start(0)).map_err(io)?;
                }
            }
            StatusCode::RANGE_NOT_SATISFIABLE if offset > 0 => {
                // We may already have every byte.
                file.set_len(0).map_err(io)?;
                checkpoint(0);
                return Err(AgentError::Http {
                    url,
                    detail: "range not satisfiable; restarting the download".into(),
                });
            }
            _ => return Err(Self::fail(&url, resp).await),
        }
        let total = resp.content_length().map(|n| n + offset);
        if let Some(t) = total
            && t > max_bytes
        {
            return Err(AgentError::Refused(format!(
                "bundle is {t} bytes, over the {max_bytes}-byte download cap"
            )));
        }
        let started = Instant::now();
        let mut received: u64 = 0;
        let mut since_checkpoint: u64 = 0;
        while let Some(chunk) = resp.chunk().await.map_err(|e| Self::http_err(&url, e))? {
            offset += chunk.len() as u64;
            if offset > max_bytes {
                return Err(AgentError::Refused(format!(
                    "bundle exceeds the {max_bytes}-byte download cap"
                )));
            }
            hasher.update(&chunk);
            file.write_all(&chunk).map_err(io)?;
            received += chunk.len() as u64;
            since_checkpoint += chunk.len() as u64;
            if since_checkpoint >= CHECKPOINT_BYTES {
                file.sync_data().map_err(io)?;
                checkpoint(offset);
                since_checkpoint = 0;
            }
            if let Some(rate) = bytes_per_sec.filter(|r| *r > 0) {
                let due = Duration::from_secs_f64(received as f64 / rate as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    tokio::time::sleep(wait).await;
                }
            }
        }
        file.sync_all().map_err(io)?;
        checkpoint(offset);
        let got = hex::encode(hasher.finalize());
        if got != expected_id {
            // Start over next time: these bytes are not the bundle.
            file.set_len(0).map_err(io)?;
            checkpoint(0);
            return Err(AgentError::Refused(format!(
                "downloaded bytes hash to {got}, expected bundle {expected_id}"
            )));
        }
        Ok(())
    }
}
