//! The device side of the fleet server API: enroll, desired state (ETag)
//! and reports. Bundle downloads are the updater's (`updater::download`).

use std::time::Duration;

use edgefleet_wire::device::{DesiredState, DeviceReport, EnrollRequest, EnrollResponse};
use reqwest::StatusCode;
use reqwest::header;

use crate::error::AgentError;

/// An HTTP client bound to one fleet server and, after enrollment, one
/// device credential.
#[derive(Clone, Debug)]
pub struct ServerClient {
    base: String,
    /// The fleet server: its CA and client certificate, no redirects (a
    /// credential must never follow one).
    http: reqwest::Client,
    /// Where a bundle download may redirect (a presigned bucket URL): no
    /// credential, the system's roots.
    bucket: reqwest::Client,
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
            reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(10))
                .redirect(reqwest::redirect::Policy::none()),
        )?;
        let bucket = crate::tls::http_client(
            "",
            &crate::tls::TlsFiles::default(),
            reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(10))
                .redirect(reqwest::redirect::Policy::none()),
        )?;
        Ok(ServerClient {
            base: base.trim_end_matches('/').to_string(),
            http,
            bucket,
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
        let parsed = serde_json::from_slice::<edgefleet_wire::api::v1::ErrorBody>(&body).ok();
        AgentError::Server {
            url: url.to_string(),
            status,
            code: parsed
                .as_ref()
                .map_or_else(|| "unknown".to_string(), |b| b.error.code.clone()),
            message: parsed.map_or_else(
                || String::from_utf8_lossy(&body).chars().take(200).collect(),
                |b| b.error.message,
            ),
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

    /// `GET /api/v1/trust`: the fleet's chain of trust documents.
    pub async fn trust(&self) -> Result<edgefleet_wire::api::v1::TrustView, AgentError> {
        let url = self.url("/api/v1/trust");
        let resp = self
            .authed(self.http.get(&url).timeout(self.timeout))
            .send()
            .await
            .map_err(|e| Self::http_err(&url, e))?;
        if !resp.status().is_success() {
            return Err(Self::fail(&url, resp).await);
        }
        let bytes = resp.bytes().await.map_err(|e| Self::http_err(&url, e))?;
        serde_json::from_slice(&bytes).map_err(|e| AgentError::Http {
            url,
            detail: format!("malformed trust chain: {e}"),
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

    /// An authenticated GET of a server-relative path, without the request
    /// timeout (downloads bound themselves: idle timeout and deadline).
    pub(crate) fn get_stream(&self, path: &str) -> (String, reqwest::RequestBuilder) {
        let url = self.url(path);
        let rb = self.authed(self.http.get(&url));
        (url, rb)
    }

    /// A GET of the URL a bundle download redirected to (`location`,
    /// resolved against `from`): without the device credential, since a
    /// presigned URL carries its own signature.
    pub(crate) fn get_redirected(
        &self,
        from: &str,
        location: &str,
    ) -> Option<(String, reqwest::RequestBuilder)> {
        let url = reqwest::Url::parse(from).ok()?.join(location).ok()?;
        if !matches!(url.scheme(), "http" | "https") {
            return None;
        }
        let rb = self.bucket.get(url.clone());
        Some((url.to_string(), rb))
    }

    /// The error of a non-success answer (`{"error": {"code", "message"}}`).
    pub(crate) async fn error_of(url: &str, resp: reqwest::Response) -> AgentError {
        Self::fail(url, resp).await
    }
}
