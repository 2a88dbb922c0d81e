//! A small blocking client for the operator API, used by `fleetctl`.

use std::io::Read;

use serde_json::Value;

use crate::error::{Error, Result};

/// Server URL and operator token (`--server`/`--token` or
/// `FLEETCTL_SERVER`/`FLEETCTL_TOKEN`).
#[derive(Debug)]
pub struct Client {
    base: String,
    token: String,
    http: reqwest::blocking::Client,
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

impl Client {
    pub fn new(server: Option<String>, token: Option<String>) -> Result<Client> {
        let base = server
            .ok_or_else(|| {
                Error::Usage("no server: pass --server URL or set FLEETCTL_SERVER".into())
            })?
            .trim_end_matches('/')
            .to_string();
        let token = token
            .ok_or_else(|| Error::Usage("no token: pass --token T or set FLEETCTL_TOKEN".into()))?;
        // rustls on ring for https:// servers (system roots).
        edge_agent::tls::install_provider();
        let http = reqwest::blocking::Client::builder()
            .timeout(None)
            .build()
            .map_err(|e| Error::Usage(format!("http client: {e}")))?;
        Ok(Client { base, token, http })
    }

    fn send(&self, req: reqwest::blocking::RequestBuilder) -> Result<Value> {
        let resp = req
            .bearer_auth(&self.token)
            .send()
            .map_err(|e| Error::Remote(format!("{}: {e}", self.base)))?;
        let status = resp.status();
        let body: Value = resp.json().unwrap_or(Value::Null);
        if status.is_success() {
            Ok(body)
        } else {
            let code = body["error"]["code"].as_str().unwrap_or("http_error");
            let msg = body["error"]["message"].as_str().unwrap_or("");
            Err(Error::Remote(format!("{status} {code}: {msg}")))
        }
    }

    pub fn get(&self, path: &str) -> Result<Value> {
        self.send(self.http.get(format!("{}{path}", self.base)))
    }

    pub fn post_json(&self, path: &str, body: &Value) -> Result<Value> {
        self.send(self.http.post(format!("{}{path}", self.base)).json(body))
    }

    /// Uploads a file with a progress bar on stderr.
    pub fn post_file(&self, path: &str, file: &std::path::Path) -> Result<Value> {
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
        let r = self.send(self.http.post(format!("{}{path}", self.base)).body(body));
        bar.finish_and_clear();
        r
    }
}
