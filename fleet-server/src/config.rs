//! `fleet-server.toml`, with every field defaulted and environment
//! overrides (`FLEET_SERVER_LISTEN`, `FLEET_SERVER_DATA_DIR`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};

/// Token roles. What each may do is `auth::POLICY`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// An external broker asking the server who may log in and what they
    /// may publish or subscribe to (`/api/v1/mqtt/*`), nothing else.
    Broker,
    /// Read everything.
    Viewer,
    /// Bundles and rollouts.
    Operator,
    /// Keys and tokens.
    Admin,
}

/// One operator bearer token. Prefer `token_sha256` in files that others
/// can read; `token` is accepted for development.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    pub name: String,
    pub role: Role,
    pub token: Option<String>,
    pub token_sha256: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Default `127.0.0.1:7070`.
    pub listen: SocketAddr,
    /// Largest accepted bundle upload, streamed to disk. Default 512 MiB.
    pub max_bundle_bytes: u64,
    /// Largest JSON request body. Default 1 MiB.
    pub max_request_bytes: u64,
    /// Bundle downloads served at once; more get 503 with `Retry-After`
    /// (devices retry with backoff). Default 64.
    pub download_concurrency: usize,
    /// Idle HTTP keep-alive connections are closed after this. Default 30 s.
    pub idle_timeout_secs: u64,
    /// PEM certificate chain: with `tls_key`, the API speaks HTTPS only
    /// (rustls on ring, as the devices use).
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// PEM CA(s) that issue device client certificates. With it, a device
    /// may present one (mutual TLS); it must name the device (a
    /// subjectAltName DNS entry equal to the device id).
    pub client_ca: Option<PathBuf>,
    /// `optional` (default): a certificate, when presented, must name the
    /// device; `required`: device requests and enrollments without one are
    /// refused. Operators never need one.
    pub device_certs: DeviceCerts,
    /// Where the other replicas reach this server while it is active (a
    /// standby forwards the requests it receives there). Default
    /// `http(s)://<listen>` when `listen` names an address and a port
    /// (not `0.0.0.0`, not port 0); without one, a standby answers 503.
    pub advertise_url: Option<String>,
    /// PEM CA(s) a standby checks the active server's certificate against
    /// when the advertised URL is https. Default: the system's CAs.
    pub replica_ca: Option<PathBuf>,
    /// What a standby's `GET /readyz` answers: `never` (default, 503
    /// `standby`) or `serving` (200 while its copy of the fleet is current
    /// and it knows the active server). docs/deploy.md, "Load balancer".
    pub standby_ready: StandbyReady,
}

/// `[http] standby_ready`: whether a load balancer that checks `/readyz`
/// sends a standby requests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StandbyReady {
    /// Never: the balancer sends everything to the active server.
    #[default]
    Never,
    /// While it can answer devices itself (their check-ins, reports and
    /// downloads; the rest is forwarded): the balancer spreads the fleet
    /// over every replica.
    Serving,
}

/// Whether devices must present a client certificate (`[http] device_certs`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceCerts {
    #[default]
    Optional,
    Required,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 7070)),
            max_bundle_bytes: 512 * 1024 * 1024,
            max_request_bytes: 1024 * 1024,
            download_concurrency: 64,
            idle_timeout_secs: 30,
            tls_cert: None,
            tls_key: None,
            client_ca: None,
            device_certs: DeviceCerts::Optional,
            advertise_url: None,
            replica_ca: None,
            standby_ready: StandbyReady::Never,
        }
    }
}

/// `[metrics]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Also export one series per device (`fleet_device_*{device}`).
    /// Default false: /metrics aggregates by state, model and board, so
    /// its size does not grow with the fleet. Turn on for small fleets.
    pub per_device: bool,
}

/// `[rollouts]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RolloutsConfig {
    /// A device not heard from for this long counts as offline: stages do
    /// not wait for it (it is counted). Default 300 s.
    pub offline_after_secs: u64,
}

impl Default for RolloutsConfig {
    fn default() -> Self {
        RolloutsConfig {
            offline_after_secs: 300,
        }
    }
}

/// `[mqtt]` in fleet-server.toml. Absent: no MQTT.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// Start the embedded broker. Default true.
    pub embedded: bool,
    /// Where the embedded broker listens. Default `127.0.0.1:1883`; port 0
    /// picks a free port (tests).
    pub listen: SocketAddr,
    /// Connections the embedded broker accepts at once. Default 20000.
    pub max_connections: usize,
    /// An external broker (`mqtt://host:port`) when `embedded = false`.
    pub url: Option<String>,
    /// The server's login at an external broker.
    pub username: Option<String>,
    pub password: Option<String>,
    /// With an external broker: subscribe through a shared subscription
    /// (`$share/<group>/...`), to split the device traffic with other
    /// consumers in that group, and with `ingest_slots` between replicas.
    pub share_group: Option<String>,
    /// With `share_group` and a shared store: how many standbys take a
    /// share of the device messages, each through a broker login of its
    /// own (`<username>-1` … `-N`, the server's password; the server
    /// writes them into a mosquitto password file it keeps). Default 0:
    /// only the active server ingests. docs/brokers.md, "Replicas".
    pub ingest_slots: u32,
    /// Messages waiting for the store; beyond it the broker stops reading
    /// from devices (backpressure) instead of dropping. Default 16384.
    pub ingest_queue: usize,
    /// "Update available" notices sent per second at most. Default 1000.
    pub notices_per_sec: u32,
    /// With an external mosquitto: the password file the server keeps.
    pub mosquitto: Option<MosquittoConfig>,
    /// PEM certificate chain: with `tls_key`, the embedded broker speaks
    /// MQTT over TLS only (`mqtts://`, rustls on ring).
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
}

/// `[mqtt] ingest_queue`'s default, also the queue of a shared store's
/// inbox without MQTT.
pub const DEFAULT_INGEST_QUEUE: usize = 16_384;

/// `[mqtt.mosquitto]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MosquittoConfig {
    /// The password file mosquitto reads (`password_file`); the server
    /// rewrites it whole.
    pub password_file: PathBuf,
    /// Lines kept as they are (dashboards' logins), if set.
    pub static_password_file: Option<PathBuf>,
    /// Run after each rewrite to make mosquitto reload it, e.g.
    /// `["systemctl", "reload", "mosquitto"]`.
    pub reload_command: Vec<String>,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            embedded: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 1883)),
            max_connections: 20_000,
            url: None,
            username: None,
            password: None,
            share_group: None,
            ingest_slots: 0,
            ingest_queue: DEFAULT_INGEST_QUEUE,
            notices_per_sec: 1000,
            mosquitto: None,
            tls_cert: None,
            tls_key: None,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrustConfig {
    /// Public key files (`fleetctl keygen` output).
    pub keys: Vec<PathBuf>,
    /// Distinct signatures required. Default 1.
    pub threshold: usize,
}

impl Default for TrustConfig {
    fn default() -> Self {
        TrustConfig {
            keys: Vec::new(),
            threshold: 1,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub tokens: Vec<TokenConfig>,
    /// Fleet-wide tokens devices present once, at enrollment. Prefer
    /// per-batch tokens (`fleetctl token create`): they expire, count their
    /// uses and can be revoked.
    pub enrollment_tokens: Vec<String>,
    /// Tag keys a device enrolling with a fleet-wide token may set itself.
    /// Default `["board"]`; other tags come from operators.
    pub enrollment_tags: Vec<String>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            tokens: Vec::new(),
            enrollment_tokens: Vec::new(),
            enrollment_tags: vec!["board".into()],
        }
    }
}

/// Where the server keeps its state.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `postgres://user:password@host:port/database` (env
    /// FLEET_SERVER_STORE_URL, which keeps the password out of the file).
    /// Unset: the embedded sled store in `data_dir/store`.
    pub url: Option<String>,
}

/// Where bundle files live (`[bundles]`). The records stay in the store;
/// files are content-addressed (`<prefix>/<sha256>.bundle`), so every
/// replica sharing a bucket sees the same bytes under the same name.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BundlesConfig {
    /// `file:///srv/edgefleet/bundles` or `s3://bucket/prefix` (env
    /// FLEET_SERVER_BUNDLES_URL). Unset: `data_dir/bundles`.
    pub url: Option<String>,
    /// S3: the endpoint of an S3-compatible service (MinIO, Ceph RGW,
    /// Garage, s3s); unset means AWS. Env AWS_ENDPOINT_URL.
    pub endpoint: Option<String>,
    /// S3: the region. Env AWS_REGION or AWS_DEFAULT_REGION; default
    /// `us-east-1`.
    pub region: Option<String>,
    /// S3 credentials. Prefer the environment (AWS_ACCESS_KEY_ID,
    /// AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN) over the file.
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    /// S3: answer device downloads with a redirect to a presigned URL, so
    /// the bytes flow from the bucket and not through the server. The
    /// device's authorization is still checked first. Default false.
    pub presign_downloads: bool,
    /// How long a presigned URL stays valid. Default 900 s.
    pub presign_ttl_secs: u64,
}

impl BundlesConfig {
    /// Whether bundles live in an S3-compatible bucket (`s3://…`), shared
    /// by every replica, rather than in a folder of this server's own.
    pub fn is_bucket(&self) -> bool {
        self.url
            .as_deref()
            .is_some_and(|u| u.starts_with(crate::blobs::S3_SCHEME))
    }
}

impl Default for BundlesConfig {
    fn default() -> Self {
        BundlesConfig {
            url: None,
            endpoint: None,
            region: None,
            access_key_id: None,
            secret_access_key: None,
            presign_downloads: false,
            presign_ttl_secs: 900,
        }
    }
}

/// The whole server configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// sled store and bundle files. Default `./fleet-data`.
    pub data_dir: PathBuf,
    pub http: HttpConfig,
    pub trust: TrustConfig,
    pub auth: AuthConfig,
    /// How often running rollouts are evaluated. Default 5000 ms.
    pub rollout_tick_ms: u64,
    pub rollouts: RolloutsConfig,
    /// MQTT (embedded broker by default when the section is present).
    pub mqtt: Option<MqttConfig>,
    /// Rate limits (failed auth per address, traffic per device/token).
    pub limits: crate::limits::LimitsConfig,
    pub metrics: MetricsConfig,
    pub store: StoreConfig,
    pub bundles: BundlesConfig,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            data_dir: PathBuf::from("fleet-data"),
            http: HttpConfig::default(),
            trust: TrustConfig::default(),
            auth: AuthConfig::default(),
            rollout_tick_ms: 5000,
            rollouts: RolloutsConfig::default(),
            mqtt: None,
            limits: crate::limits::LimitsConfig::default(),
            metrics: MetricsConfig::default(),
            store: StoreConfig::default(),
            bundles: BundlesConfig::default(),
        }
    }
}

impl ServerConfig {
    /// Device messages waiting for the store: `[mqtt] ingest_queue`, also
    /// for a shared store's inbox without MQTT.
    pub fn ingest_queue(&self) -> usize {
        self.mqtt
            .as_ref()
            .map_or(DEFAULT_INGEST_QUEUE, |m| m.ingest_queue)
    }

    /// Reads a TOML file (relative key paths resolve against its folder),
    /// then applies environment overrides.
    pub fn load(path: &Path) -> Result<ServerConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let mut cfg: ServerConfig =
            toml::from_str(&text).map_err(|e| Error::Usage(format!("{}: {e}", path.display())))?;
        let base = path.parent().unwrap_or(Path::new("."));
        for k in &mut cfg.trust.keys {
            if k.is_relative() {
                *k = base.join(&*k);
            }
        }
        if cfg.data_dir.is_relative() {
            cfg.data_dir = base.join(&cfg.data_dir);
        }
        let mqtt_tls = cfg
            .mqtt
            .as_mut()
            .map(|m| [&mut m.tls_cert, &mut m.tls_key])
            .into_iter()
            .flatten();
        for p in [&mut cfg.http.tls_cert, &mut cfg.http.tls_key]
            .into_iter()
            .chain(mqtt_tls)
            .flatten()
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        cfg.apply_env()?;
        Ok(cfg)
    }

    pub fn apply_env(&mut self) -> Result<()> {
        if let Ok(v) = std::env::var("FLEET_SERVER_LISTEN") {
            self.http.listen = v
                .parse()
                .map_err(|e| Error::Usage(format!("FLEET_SERVER_LISTEN={v:?}: {e}")))?;
        }
        if let Ok(v) = std::env::var("FLEET_SERVER_DATA_DIR") {
            self.data_dir = PathBuf::from(v);
        }
        if let Ok(v) = std::env::var("FLEET_SERVER_STORE_URL") {
            self.store.url = Some(v).filter(|v| !v.is_empty());
        }
        if let Some(url) = &self.store.url
            && !(url.starts_with("postgres://") || url.starts_with("postgresql://"))
        {
            return Err(Error::Usage(format!(
                "[store] url must be postgres://… or postgresql://… (unset for the embedded store), not {}",
                crate::store::postgres::redact(url)
            )));
        }
        if let Ok(v) = std::env::var("FLEET_SERVER_BUNDLES_URL") {
            self.bundles.url = Some(v).filter(|v| !v.is_empty());
        }
        if let Some(url) = &self.bundles.url
            && !(url.starts_with("file:///") || url.starts_with("s3://"))
        {
            return Err(Error::Usage(format!(
                "[bundles] url must be file:///absolute/path or s3://bucket[/prefix] (unset for data_dir/bundles), not {url}"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_toml_resolves_relative_paths_and_rejects_unknown_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fleet-server.toml");
        std::fs::write(
            &path,
            r#"
data_dir = "state"
rollout_tick_ms = 250
[http]
listen = "127.0.0.1:7171"
[trust]
keys = ["a.pub", "/etc/edgefleet/b.pub"]
threshold = 2
[auth]
enrollment_tokens = ["e"]
[[auth.tokens]]
name = "ops"
role = "operator"
token = "t"
"#,
        )
        .unwrap();
        let cfg = ServerConfig::load(&path).unwrap();
        assert_eq!(cfg.data_dir, dir.path().join("state"));
        assert_eq!(cfg.http.listen.port(), 7171);
        assert_eq!(
            cfg.http.max_bundle_bytes,
            HttpConfig::default().max_bundle_bytes
        );
        assert_eq!(
            cfg.trust.keys,
            vec![
                dir.path().join("a.pub"),
                PathBuf::from("/etc/edgefleet/b.pub")
            ]
        );
        assert_eq!(cfg.trust.threshold, 2);
        assert_eq!(cfg.auth.tokens[0].role, Role::Operator);
        assert_eq!(cfg.rollout_tick_ms, 250);

        std::fs::write(&path, "[http]\nlisten = \"127.0.0.1:1\"\nport = 3\n").unwrap();
        let err = ServerConfig::load(&path).unwrap_err().to_string();
        assert!(err.contains("unknown field"), "{err}");
    }

    #[test]
    fn defaults_are_loopback_and_documented_values() {
        let cfg = ServerConfig::default();
        assert!(cfg.http.listen.ip().is_loopback());
        assert_eq!(cfg.http.listen.port(), 7070);
        assert_eq!(cfg.trust.threshold, 1);
        assert_eq!(cfg.rollout_tick_ms, 5000);
    }
}
