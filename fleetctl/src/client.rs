//! The typed blocking client of the operator API: one method per endpoint,
//! request and response bodies from `edgefleet_wire::api::v1`, errors as
//! the server's `{"error": {"code", "message"}}`.

use std::io::Read;

use edgefleet_wire::api::v1::{
    AuditEntry, BundleView, ConcludeExperiment, CreateEnrollmentToken, CreateExperiment,
    CreateRollout, CreatedEnrollmentToken, DeviceView, EnrollmentTokenView, ErrorBody,
    ExperimentView, RolloutAction, RolloutView, TrustView,
};
use edgefleet_wire::trust::SignedTrust;
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};

/// Server URL and operator token (`--server`/`--token` or
/// `FLEETCTL_SERVER`/`FLEETCTL_TOKEN`).
#[derive(Debug)]
pub struct Client {
    base: String,
    token: String,
    http: reqwest::blocking::Client,
}

/// Filters of `GET /api/v1/devices`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceFilter {
    /// `k=v`, all must match.
    pub tags: Vec<String>,
    /// Reported update state (`committed`, `rolled_back`, ...).
    pub state: Option<String>,
    /// Reported active version.
    pub version: Option<String>,
}

/// Wraps a reader to report progress as bytes are sent.
struct Progress<R> {
    inner: R,
    bar: indicatif::ProgressBar,
}

impl<R: Read> Read for Progress<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bar.inc(n as u64);
        Ok(n)
    }
}

/// Percent-encodes a query value.
pub fn urlencode(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl Client {
    pub fn new(server: Option<String>, token: Option<String>) -> Result<Client> {
        Self::with_ca(server, token, None)
    }

    /// [`Client::new`] trusting only the PEM CA certificates in `ca_file`
    /// for an `https://` server (default: the system's roots).
    pub fn with_ca(
        server: Option<String>,
        token: Option<String>,
        ca_file: Option<&std::path::Path>,
    ) -> Result<Client> {
        let base = server
            .ok_or_else(|| {
                Error::Usage("no server: pass --server URL or set FLEETCTL_SERVER".into())
            })?
            .trim_end_matches('/')
            .to_string();
        let token = token
            .ok_or_else(|| Error::Usage("no token: pass --token T or set FLEETCTL_TOKEN".into()))?;
        // rustls on ring for https:// servers (system roots). Err means a
        // provider is already installed.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = reqwest::blocking::Client::builder().timeout(None);
        if let Some(ca) = ca_file {
            let pem = std::fs::read(ca).map_err(|e| Error::io(ca, e))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| Error::Usage(format!("--ca-file {}: {e}", ca.display())))?;
            if certs.is_empty() {
                return Err(Error::Usage(format!(
                    "--ca-file {}: no certificate in it",
                    ca.display()
                )));
            }
            builder = builder.tls_certs_only(certs);
        }
        let http = builder
            .build()
            .map_err(|e| Error::Usage(format!("http client: {e}")))?;
        Ok(Client { base, token, http })
    }

    fn send<T: DeserializeOwned>(&self, req: reqwest::blocking::RequestBuilder) -> Result<T> {
        self.send_paged(req).map(|(v, _)| v)
    }

    /// [`Client::send`], with the path of the next page when the response
    /// has a `Link: <…>; rel="next"` header.
    fn send_paged<T: DeserializeOwned>(
        &self,
        req: reqwest::blocking::RequestBuilder,
    ) -> Result<(T, Option<String>)> {
        let (v, headers) = self.send_with_headers(req)?;
        let next = headers
            .get(reqwest::header::LINK)
            .and_then(|v| v.to_str().ok())
            .and_then(next_link);
        Ok((v, next))
    }

    /// [`Client::send`], with the response's headers.
    fn send_with_headers<T: DeserializeOwned>(
        &self,
        req: reqwest::blocking::RequestBuilder,
    ) -> Result<(T, reqwest::header::HeaderMap)> {
        let resp = req
            .bearer_auth(&self.token)
            .send()
            .map_err(|e| Error::Remote(format!("{}: {e}", self.base)))?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp
            .bytes()
            .map_err(|e| Error::Remote(format!("{}: {e}", self.base)))?;
        if status.is_success() {
            return serde_json::from_slice(&bytes)
                .map(|v| (v, headers))
                .map_err(|e| {
                    Error::Remote(format!("{}: unexpected response body: {e}", self.base))
                });
        }
        let (code, message) = match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(b) => (b.error.code, b.error.message),
            Err(_) => (
                "http_error".to_string(),
                String::from_utf8_lossy(&bytes).chars().take(200).collect(),
            ),
        };
        Err(Error::Api {
            status: status.as_u16(),
            status_line: status.to_string(),
            code,
            message,
        })
    }

    fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.send(self.http.get(format!("{}{path}", self.base)))
    }

    /// Uploads a bundle file with a progress bar on stderr.
    pub fn push_bundle(&self, file: &std::path::Path) -> Result<BundleView> {
        let f = std::fs::File::open(file).map_err(|e| Error::io(file, e))?;
        let len = f.metadata().map_err(|e| Error::io(file, e))?.len();
        let bar = indicatif::ProgressBar::new(len);
        let body = reqwest::blocking::Body::sized(
            Progress {
                inner: f,
                bar: bar.clone(),
            },
            len,
        );
        let r = self.send(
            self.http
                .post(format!("{}/api/v1/bundles", self.base))
                .header("content-type", "application/octet-stream")
                .body(body),
        );
        bar.finish_and_clear();
        r
    }

    pub fn list_bundles(&self) -> Result<Vec<BundleView>> {
        self.get("/api/v1/bundles")
    }

    pub fn list_devices(&self, f: &DeviceFilter) -> Result<Vec<DeviceView>> {
        let mut query: Vec<String> = f
            .tags
            .iter()
            .map(|t| format!("tag={}", urlencode(t)))
            .collect();
        if let Some(st) = &f.state {
            query.push(format!("status={}", urlencode(st)));
        }
        if let Some(v) = &f.version {
            query.push(format!("version={}", urlencode(v)));
        }
        // Every page, following the server's `Link: rel="next"`.
        let mut path = format!("/api/v1/devices?{}", query.join("&"));
        let mut all = Vec::new();
        loop {
            let (page, next): (Vec<DeviceView>, _) =
                self.send_paged(self.http.get(format!("{}{path}", self.base)))?;
            all.extend(page);
            match next {
                Some(n) => path = n,
                None => return Ok(all),
            }
        }
    }

    pub fn get_device(&self, id: &str) -> Result<DeviceView> {
        self.get(&format!("/api/v1/devices/{}", urlencode(id)))
    }

    /// The whole audit log, oldest first (pages of 10,000).
    pub fn audit(&self) -> Result<Vec<AuditEntry>> {
        const PAGE: usize = 10_000;
        let mut all = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let mut url = format!("{}/api/v1/audit?limit={PAGE}", self.base);
            if let Some(a) = &after {
                url.push_str(&format!("&after={}", urlencode(a)));
            }
            let (page, headers): (Vec<AuditEntry>, _) =
                self.send_with_headers(self.http.get(url))?;
            let n = page.len();
            all.extend(page);
            after = headers
                .get("x-next-position")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            if n < PAGE || after.is_none() {
                return Ok(all);
            }
        }
    }

    /// `PATCH /api/v1/devices/{id}`: replaces the device's tags.
    pub fn patch_device(
        &self,
        id: &str,
        tags: std::collections::BTreeMap<String, String>,
    ) -> Result<DeviceView> {
        self.send(
            self.http
                .patch(format!("{}/api/v1/devices/{}", self.base, urlencode(id)))
                .json(&edgefleet_wire::api::v1::PatchDevice { tags }),
        )
    }

    pub fn create_rollout(&self, req: &CreateRollout) -> Result<RolloutView> {
        self.send(
            self.http
                .post(format!("{}/api/v1/rollouts", self.base))
                .json(req),
        )
    }

    pub fn list_rollouts(&self) -> Result<Vec<RolloutView>> {
        self.get("/api/v1/rollouts")
    }

    pub fn get_rollout(&self, id: &str) -> Result<RolloutView> {
        self.get(&format!("/api/v1/rollouts/{}", urlencode(id)))
    }

    pub fn create_enrollment_token(
        &self,
        req: &CreateEnrollmentToken,
    ) -> Result<CreatedEnrollmentToken> {
        self.send(
            self.http
                .post(format!("{}/api/v1/enrollment-tokens", self.base))
                .json(req),
        )
    }

    pub fn list_enrollment_tokens(&self) -> Result<Vec<EnrollmentTokenView>> {
        self.get("/api/v1/enrollment-tokens")
    }

    pub fn revoke_enrollment_token(&self, name: &str) -> Result<EnrollmentTokenView> {
        self.send(self.http.delete(format!(
            "{}/api/v1/enrollment-tokens/{}",
            self.base,
            urlencode(name)
        )))
    }

    pub fn get_trust(&self) -> Result<TrustView> {
        self.get("/api/v1/trust")
    }

    pub fn push_trust(&self, doc: &SignedTrust) -> Result<TrustView> {
        self.send(
            self.http
                .post(format!("{}/api/v1/trust", self.base))
                .json(doc),
        )
    }

    pub fn create_experiment(&self, req: &CreateExperiment) -> Result<ExperimentView> {
        self.send(
            self.http
                .post(format!("{}/api/v1/experiments", self.base))
                .json(req),
        )
    }

    pub fn list_experiments(&self) -> Result<Vec<ExperimentView>> {
        self.get("/api/v1/experiments")
    }

    /// An experiment by id, unique id prefix or name.
    pub fn get_experiment(&self, id: &str) -> Result<ExperimentView> {
        self.get(&format!("/api/v1/experiments/{}", urlencode(id)))
    }

    pub fn stop_experiment(&self, id: &str) -> Result<ExperimentView> {
        self.send(self.http.post(format!(
            "{}/api/v1/experiments/{}/stop",
            self.base,
            urlencode(id)
        )))
    }

    pub fn conclude_experiment(
        &self,
        id: &str,
        req: &ConcludeExperiment,
    ) -> Result<ExperimentView> {
        self.send(
            self.http
                .post(format!(
                    "{}/api/v1/experiments/{}/conclude",
                    self.base,
                    urlencode(id)
                ))
                .json(req),
        )
    }

    pub fn list_windows(&self) -> Result<Vec<edgefleet_wire::api::v1::WindowEntry>> {
        self.get("/api/v1/windows")
    }

    pub fn set_window(
        &self,
        scope: &str,
        schedule: &edgefleet_wire::window::Schedule,
    ) -> Result<edgefleet_wire::api::v1::WindowEntry> {
        self.send(
            self.http
                .put(format!("{}/api/v1/windows/{}", self.base, urlencode(scope)))
                .json(schedule),
        )
    }

    pub fn clear_window(&self, scope: &str) -> Result<edgefleet_wire::api::v1::WindowEntry> {
        self.send(
            self.http
                .delete(format!("{}/api/v1/windows/{}", self.base, urlencode(scope))),
        )
    }

    pub fn rollout_action(&self, id: &str, action: RolloutAction) -> Result<RolloutView> {
        self.send(self.http.post(format!(
            "{}/api/v1/rollouts/{}/{}",
            self.base,
            urlencode(id),
            action.as_str()
        )))
    }
}

/// The target of `rel="next"` in a `Link` header, when it is a path on
/// the same server.
fn next_link(header: &str) -> Option<String> {
    header.split(',').find_map(|part| {
        let (target, params) = part.split_once(';')?;
        let target = target.trim().strip_prefix('<')?.strip_suffix('>')?;
        params
            .split(';')
            .any(|p| p.trim() == "rel=\"next\"" || p.trim() == "rel=next")
            .then(|| target.to_string())
            .filter(|t| t.starts_with('/'))
    })
}

#[cfg(test)]
mod link_tests {
    use super::next_link;

    #[test]
    fn finds_the_next_page_and_nothing_else() {
        assert_eq!(
            next_link("</api/v1/devices?tag=a%3Db&cursor=d-9>; rel=\"next\"").as_deref(),
            Some("/api/v1/devices?tag=a%3Db&cursor=d-9")
        );
        assert_eq!(
            next_link("</x?p=1>; rel=\"prev\", </x?p=3>; rel=\"next\"").as_deref(),
            Some("/x?p=3")
        );
        assert_eq!(next_link("</x>; rel=\"prev\""), None);
        // Another host is not followed with our token.
        assert_eq!(next_link("<https://evil.example/x>; rel=\"next\""), None);
    }
}
