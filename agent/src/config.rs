//! `agent.toml`: the configuration of `edge-agent run`. Every field has a
//! default; relative paths resolve against the file's folder; environment
//! variables override a few fields (`EDGE_AGENT_SERVER_URL`,
//! `EDGE_AGENT_DATA_DIR`, `EDGE_AGENT_LISTEN`, `EDGE_AGENT_DEVICE_ID`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::AgentError;

/// The whole agent configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Default: the host name.
    pub device_id: Option<String>,
    /// Store, slots, floor and credential. Default `/var/lib/edge-agent`.
    pub data_dir: PathBuf,
    /// Reported at enrollment, e.g. `board = "rpi4"`.
    pub tags: BTreeMap<String, String>,
    pub server: ServerSection,
    pub trust: TrustSection,
    pub http: HttpSection,
    pub engine: EngineSection,
    pub mqtt: MqttSection,
    pub update: UpdateSection,
    /// Fault injection for tests and the demo. Only builds with the
    /// `testing` cargo feature (test builds, the demo) have it; a device
    /// build refuses a config that sets it.
    #[cfg(feature = "testing")]
    pub testing: TestingSection,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            device_id: None,
            data_dir: PathBuf::from("/var/lib/edge-agent"),
            tags: BTreeMap::new(),
            server: ServerSection::default(),
            trust: TrustSection::default(),
            http: HttpSection::default(),
            engine: EngineSection::default(),
            mqtt: MqttSection::default(),
            update: UpdateSection::default(),
            #[cfg(feature = "testing")]
            testing: TestingSection::default(),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSection {
    /// Fleet server base URL. Unset: no server (sideload only).
    pub url: Option<String>,
    /// Presented once, at first start.
    pub enrollment_token: Option<String>,
    /// Desired-state poll interval. Default 60 s.
    pub poll_interval_secs: u64,
    /// Random extra delay per poll, as a fraction of the interval. Default 0.2.
    pub poll_jitter: f64,
    /// After an "update available" notice, poll within this many seconds
    /// (uniformly at random), not all at once. Default 2.
    pub notice_spread_secs: f64,
    /// Periodic report (health) interval. Default 30 s.
    pub report_interval_secs: u64,
    /// HTTP timeout for API calls (not downloads). Default 15 s.
    pub timeout_secs: u64,
    /// PEM roots trusted for an `https://` server URL. Default: the
    /// system store.
    pub ca_file: Option<PathBuf>,
    /// The device's client certificate (PEM) and key for an `https://`
    /// server that checks them (`[http] client_ca` on the server). The
    /// certificate names the device id (subjectAltName DNS).
    pub client_cert_file: Option<PathBuf>,
    pub client_key_file: Option<PathBuf>,
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            url: None,
            enrollment_token: None,
            poll_interval_secs: 60,
            poll_jitter: 0.2,
            notice_spread_secs: 2.0,
            report_interval_secs: 30,
            timeout_secs: 15,
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrustSection {
    /// Release public key files.
    pub keys: Vec<PathBuf>,
    /// Distinct trusted signatures required. Default 1.
    pub threshold: usize,
    /// A signed trust document to start from instead of `keys`: boards
    /// provisioned after a key rotation (`fleetctl trust show --out`).
    /// Rotations the device accepts later are kept in `data_dir`.
    pub document: Option<PathBuf>,
}

impl Default for TrustSection {
    fn default() -> Self {
        TrustSection {
            keys: Vec::new(),
            threshold: 1,
            document: None,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSection {
    /// Local inference API. Default `127.0.0.1:8080`.
    pub listen: SocketAddr,
    /// Bearer token for the local API (required off loopback).
    pub token: Option<String>,
    /// Default 64 MiB.
    pub max_body_bytes: usize,
}

impl Default for HttpSection {
    fn default() -> Self {
        HttpSection {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            token: None,
            max_body_bytes: 64 * 1024 * 1024,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineSection {
    /// Default 1.
    pub workers: usize,
    /// Default 16.
    pub queue: usize,
    /// Compute threads one inference may use (intra-op parallelism); each
    /// worker gets a pool of this many. Default 1. `workers` buys
    /// throughput for concurrent requests; `threads` buys latency for one
    /// request. Up to `workers × threads` cores are busy at once.
    pub threads: usize,
    /// Keep each installed ONNX model's decluttered graph next to its
    /// bundle, so that the next load of it (a restart, a rollback) skips
    /// the ONNX front end and decluttering (`crate::compiled`). Default true.
    pub keep_compiled: bool,
}

impl Default for EngineSection {
    fn default() -> Self {
        EngineSection {
            workers: 1,
            queue: 16,
            threads: 1,
            keep_compiled: true,
        }
    }
}

/// Telemetry encoding on the wire.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    /// Dashboards read it as is.
    #[default]
    Json,
    /// Compact, for metered links.
    Postcard,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttSection {
    /// `mqtt://host:port`, or `mqtts://host:port` for TLS (port 8883 by
    /// default). Unset: no MQTT.
    pub url: Option<String>,
    /// PEM roots trusted for `mqtts://`. Default: the system store.
    pub ca_file: Option<PathBuf>,
    /// Device certificate chain and key (PEM) for mutual TLS.
    pub client_cert_file: Option<PathBuf>,
    pub client_key_file: Option<PathBuf>,
    /// Default: the device id (the broker checks it with the credential).
    pub username: Option<String>,
    /// Default: the device credential.
    pub password: Option<String>,
    /// Default 10 s.
    pub telemetry_interval_secs: u64,
    /// Telemetry payload encoding (events and state are always JSON).
    pub encoding: Encoding,
    /// Outbox cap in bytes. Default 8 MiB.
    pub outbox_max_bytes: u64,
    /// Default 30 s.
    pub keep_alive_secs: u64,
    /// Reconnect backoff bounds. Defaults 1 s and 60 s.
    pub reconnect_min_ms: u64,
    pub reconnect_max_ms: u64,
}

impl Default for MqttSection {
    fn default() -> Self {
        MqttSection {
            url: None,
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
            username: None,
            password: None,
            telemetry_interval_secs: 10,
            encoding: Encoding::Json,
            outbox_max_bytes: 8 * 1024 * 1024,
            keep_alive_secs: 30,
            reconnect_min_ms: 1000,
            reconnect_max_ms: 60_000,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpdateSection {
    /// Largest bundle the agent downloads. Default 256 MiB.
    pub max_bundle_bytes: u64,
    /// Download retry backoff bounds. Defaults 1 s and 300 s.
    pub retry_min_ms: u64,
    pub retry_max_ms: u64,
    /// The watch window after a swap ends after this time... Default 300 s.
    pub watch_secs: u64,
    /// ... or after this many inferences, whichever comes first. Default 1000.
    pub watch_inferences: u64,
    /// Inferences needed before error rate and latency are judged. Default 20.
    pub watch_min_inferences: u64,
    /// Default error-rate limit when the rollout gives none. Default 0.05.
    pub max_error_rate: f64,
    /// p95 latency limit relative to the previous model's p95. Default 2.0.
    pub max_p95_ratio: f64,
    /// Latency below this never counts as a regression (jitter). Default 5 ms.
    pub p95_slack_ms: f64,
    /// A restart during the watch counts against the new model; after this
    /// many the agent rolls back. Default 3.
    pub max_watch_restarts: u32,
    /// Bundles kept on disk besides active and last known good. Default 0.
    pub keep_extra_bundles: usize,
    /// Corrupted transfers in a row (bytes that do not hash to the bundle
    /// id) before the device reports `failed` (`transfer_corrupted`); it
    /// keeps retrying at `retry_max_ms` after that. Default 5.
    pub max_corrupt_transfers: u32,
    /// A download whose body sends nothing for this long is cut and
    /// resumed. Default 60 s.
    pub download_idle_timeout_secs: u64,
    /// The slowest transfer tolerated: a download gets 120 s plus its size
    /// at this rate before it is cut and resumed. Default 8192 B/s.
    pub download_min_bytes_per_sec: u64,
    /// Free space kept beyond a download's size; with less the update
    /// waits as `blocked` (`insufficient_space`). Default 8 MiB.
    pub free_space_margin_bytes: u64,
    /// A file of this size beside the store, given up when the disk fills
    /// so the agent can still open its store, start and write its update
    /// record; taken back once space returns. 0: none. Default 2 MiB.
    pub store_reserve_bytes: u64,
    /// The device's time zone (IANA name, e.g. `Europe/Berlin`) for
    /// maintenance windows that name none. Default: the system's (`TZ`,
    /// `/etc/localtime`), UTC without either.
    pub time_zone: Option<String>,
    /// Hold every ready update until the local app allows it
    /// (`DELETE /v1/defer`) or `max_defer_secs` pass. Default false.
    pub defer_activation: bool,
    /// The longest the local app may hold an activation (`POST /v1/defer`,
    /// `defer_activation`), counted from when the update was ready.
    /// Maintenance windows still apply after it. Default 4 h.
    pub max_defer_secs: u64,
}

impl Default for UpdateSection {
    fn default() -> Self {
        UpdateSection {
            max_bundle_bytes: 256 * 1024 * 1024,
            retry_min_ms: 1000,
            retry_max_ms: 300_000,
            watch_secs: 300,
            watch_inferences: 1000,
            watch_min_inferences: 20,
            max_error_rate: 0.05,
            max_p95_ratio: 2.0,
            p95_slack_ms: 5.0,
            max_watch_restarts: 3,
            keep_extra_bundles: 0,
            max_corrupt_transfers: 5,
            download_idle_timeout_secs: 60,
            download_min_bytes_per_sec: 8192,
            free_space_margin_bytes: 8 * 1024 * 1024,
            store_reserve_bytes: 2 * 1024 * 1024,
            time_zone: None,
            defer_activation: false,
            max_defer_secs: 4 * 3600,
        }
    }
}

/// Faults for tests and the demo, keyed by `name@version` of a bundle.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TestingSection {
    /// Extra latency added to every live inference of that bundle (not to
    /// its self-test): a model that passes its self-test but is slow.
    pub inject_latency_ms: BTreeMap<String, u64>,
    /// Live inferences of that bundle fail: a model that errors in production.
    pub inject_errors: Vec<String>,
    /// Download throughput cap in bytes/s (makes downloads observable).
    pub download_bytes_per_sec: Option<u64>,
}

impl AgentConfig {
    /// Reads a TOML file, resolves relative paths, applies env overrides.
    pub fn load(path: &Path) -> Result<AgentConfig, AgentError> {
        let text = std::fs::read_to_string(path).map_err(|e| AgentError::io(path, e))?;
        let mut cfg = Self::parse(&text)
            .map_err(|e| AgentError::Config(format!("{}: {e}", path.display())))?;
        let base = path.parent().unwrap_or(Path::new("."));
        for k in cfg.trust.keys.iter_mut().chain(cfg.trust.document.as_mut()) {
            if k.is_relative() {
                *k = base.join(&*k);
            }
        }
        if cfg.data_dir.is_relative() {
            cfg.data_dir = base.join(&cfg.data_dir);
        }
        for p in [
            &mut cfg.server.ca_file,
            &mut cfg.server.client_cert_file,
            &mut cfg.server.client_key_file,
            &mut cfg.mqtt.ca_file,
            &mut cfg.mqtt.client_cert_file,
            &mut cfg.mqtt.client_key_file,
        ]
        .into_iter()
        .flatten()
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        cfg.apply_env(|k| std::env::var(k).ok())?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parses an agent config, or a board profile (`targets/*.toml`: a
    /// `[board]` table plus the agent config under `[agent]`).
    pub fn parse(text: &str) -> Result<AgentConfig, String> {
        let table: toml::Table = toml::from_str(text).map_err(|e| e.to_string())?;
        if table.contains_key("board") {
            let agent = table
                .get("agent")
                .cloned()
                .unwrap_or(toml::Value::Table(toml::Table::new()));
            return agent
                .try_into()
                .map_err(|e: toml::de::Error| format!("[agent]: {e}"));
        }
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// TLS trust for the fleet server link.
    pub fn server_tls(&self) -> crate::tls::TlsFiles {
        crate::tls::TlsFiles {
            ca_file: self.server.ca_file.clone(),
            client_cert_file: self.server.client_cert_file.clone(),
            client_key_file: self.server.client_key_file.clone(),
        }
    }

    /// TLS trust and identity for the broker link.
    pub fn mqtt_tls(&self) -> crate::tls::TlsFiles {
        crate::tls::TlsFiles {
            ca_file: self.mqtt.ca_file.clone(),
            client_cert_file: self.mqtt.client_cert_file.clone(),
            client_key_file: self.mqtt.client_key_file.clone(),
        }
    }

    /// Environment overrides; `get` is `std::env::var` outside tests.
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<(), AgentError> {
        if let Some(v) = get("EDGE_AGENT_SERVER_URL") {
            self.server.url = Some(v);
        }
        if let Some(v) = get("EDGE_AGENT_DATA_DIR") {
            self.data_dir = PathBuf::from(v);
        }
        if let Some(v) = get("EDGE_AGENT_DEVICE_ID") {
            self.device_id = Some(v);
        }
        if let Some(v) = get("EDGE_AGENT_LISTEN") {
            self.http.listen = v
                .parse()
                .map_err(|e| AgentError::Config(format!("EDGE_AGENT_LISTEN {v:?}: {e}")))?;
        }
        Ok(())
    }

    pub fn validate(&self) -> Result<(), AgentError> {
        let bad = |m: String| Err(AgentError::Config(m));
        if self.trust.keys.is_empty() && self.trust.document.is_none() {
            return bad(
                "[trust] keys: list at least one release public key (or set [trust] document)"
                    .into(),
            );
        }
        if self.engine.workers == 0 || self.engine.queue == 0 {
            return bad("[engine] workers and queue must be at least 1".into());
        }
        if !(1..=edgefleet_runtime::threads::MAX_THREADS).contains(&self.engine.threads) {
            return bad(format!(
                "[engine] threads must be between 1 and {} (got {})",
                edgefleet_runtime::threads::MAX_THREADS,
                self.engine.threads
            ));
        }
        if !(0.0..=60.0).contains(&self.server.notice_spread_secs) {
            return bad("[server] notice_spread_secs must be within 0..=60".into());
        }
        if !(0.0..=1.0).contains(&self.server.poll_jitter) {
            return bad("[server] poll_jitter must be within 0..=1".into());
        }
        if self.server.poll_interval_secs == 0 {
            return bad("[server] poll_interval_secs must be at least 1".into());
        }
        if let Some(tz) = &self.update.time_zone
            && jiff::tz::TimeZone::get(tz).is_err()
        {
            return bad(format!(
                "[update] time_zone {tz:?} is not a time zone of this system's tz database (/usr/share/zoneinfo)"
            ));
        }
        if self.update.retry_min_ms == 0 || self.update.retry_max_ms < self.update.retry_min_ms {
            return bad("[update] need 0 < retry_min_ms <= retry_max_ms".into());
        }
        if self.update.download_idle_timeout_secs == 0
            || self.update.download_min_bytes_per_sec == 0
        {
            return bad(
                "[update] download_idle_timeout_secs and download_min_bytes_per_sec must be > 0"
                    .into(),
            );
        }
        if self.mqtt.reconnect_min_ms == 0
            || self.mqtt.reconnect_max_ms < self.mqtt.reconnect_min_ms
        {
            return bad("[mqtt] need 0 < reconnect_min_ms <= reconnect_max_ms".into());
        }
        if let Some(u) = &self.server.url
            && !(u.starts_with("http://") || u.starts_with("https://"))
        {
            return bad(format!("[server] url {u:?}: use http:// or https://"));
        }
        Ok(())
    }

    /// The configured device id, or the host name.
    pub fn device_id(&self) -> String {
        if let Some(id) = &self.device_id {
            return id.clone();
        }
        std::fs::read_to_string("/etc/hostname")
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "edge-device".to_string())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_the_documented_example_and_resolves_paths() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("agent.toml");
        std::fs::write(
            &p,
            r#"
device_id = "pi-01"
data_dir = "state"
[tags]
board = "rpi4"
[server]
url = "http://fleet.example:7070"
enrollment_token = "t"
poll_interval_secs = 5
[trust]
keys = ["release.pub"]
[mqtt]
url = "mqtt://fleet.example:1883"
encoding = "postcard"
[update]
watch_secs = 30
"#,
        )
        .unwrap();
        let c = AgentConfig::load(&p).unwrap();
        assert_eq!(c.device_id(), "pi-01");
        assert_eq!(c.data_dir, dir.path().join("state"));
        assert_eq!(c.trust.keys, vec![dir.path().join("release.pub")]);
        assert_eq!(c.mqtt.encoding, Encoding::Postcard);
        assert_eq!(c.update.watch_secs, 30);
        assert_eq!(c.update.watch_inferences, 1000);
        assert_eq!(c.tags.get("board").map(String::as_str), Some("rpi4"));
    }

    #[test]
    fn rejects_unknown_fields_and_missing_keys() {
        let e = toml::from_str::<AgentConfig>("[server]\nurll = 1\n").unwrap_err();
        assert!(e.to_string().contains("urll"), "{e}");
        let e = AgentConfig::default().validate().unwrap_err();
        assert!(e.to_string().contains("[trust] keys"), "{e}");
    }

    #[test]
    fn engine_threads_default_to_one_and_are_bounded() {
        let base = "[trust]\nkeys = [\"k.pub\"]\n";
        let c = AgentConfig::parse(base).unwrap();
        assert_eq!(c.engine.threads, 1);
        c.validate().unwrap();
        let c = AgentConfig::parse(&format!("{base}[engine]\nworkers = 2\nthreads = 2\n")).unwrap();
        c.validate().unwrap();
        assert_eq!((c.engine.workers, c.engine.threads), (2, 2));
        for bad in [0, 65] {
            let c = AgentConfig::parse(&format!("{base}[engine]\nthreads = {bad}\n")).unwrap();
            let e = c.validate().unwrap_err();
            assert!(e.to_string().contains("[engine] threads"), "{e}");
        }
    }

    #[test]
    fn every_board_profile_is_a_valid_agent_config() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../targets");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "toml") {
                let text = std::fs::read_to_string(&p).unwrap();
                let c =
                    AgentConfig::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                let board: toml::Table = toml::from_str(&text).unwrap();
                let name = board["board"]["name"].as_str().unwrap();
                assert_eq!(
                    c.tags.get("board").map(String::as_str),
                    Some(name),
                    "{}",
                    p.display()
                );
                assert!(!c.trust.keys.is_empty(), "{}", p.display());
                // What scripts/build-deb.sh needs to build a package that
                // installs on the board's OS.
                let b = &board["board"];
                let triple = b["triple"].as_str().unwrap();
                let glibc = b["glibc"].as_str().unwrap();
                assert!(b["os"].as_str().is_some_and(|s| !s.is_empty()));
                if triple.ends_with("-musl") {
                    assert_eq!(glibc, "static", "{}: a musl build", p.display());
                } else {
                    let v: Vec<u32> = glibc.split('.').map(|x| x.parse().unwrap()).collect();
                    assert!(
                        v.len() == 2 && v[0] == 2,
                        "{}: glibc {glibc:?}",
                        p.display()
                    );
                }
                assert!(
                    b.get("nnef_only").is_none_or(|v| v.as_bool().is_some()),
                    "{}: nnef_only must be true or false",
                    p.display()
                );
                n += 1;
            }
        }
        assert!(n >= 5, "expected the board profiles in targets/");
    }

    #[test]
    fn env_overrides_win() {
        let mut c = AgentConfig::default();
        c.apply_env(|k| (k == "EDGE_AGENT_LISTEN").then(|| "127.0.0.1:0".to_string()))
            .unwrap();
        assert_eq!(c.http.listen.port(), 0);
        let e = c
            .apply_env(|k| (k == "EDGE_AGENT_LISTEN").then(|| "nope".to_string()))
            .unwrap_err();
        assert!(e.to_string().contains("EDGE_AGENT_LISTEN"));
    }
}
