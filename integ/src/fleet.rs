//! [`TestFleet`]: a real fleet server in the test process, on
//! `127.0.0.1:0` with a real sled store in a temporary folder, and the
//! operator calls the tests make against it.
//!
//! The defaults: trusts the release key of seed 1; tokens `root` (admin,
//! [`ADMIN`]), `ops` (operator, [`OPERATOR`]) and `dash` (viewer,
//! [`VIEWER`]); enrollment token [`ENROLL`]; a rollout tick of 100 ms.
//! [`TestFleet::start_with`] changes any of it before the server starts.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use fleet_server::config::{Role, ServerConfig, TokenConfig};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

pub const ADMIN: &str = "admin-token";
pub const OPERATOR: &str = "operator-token";
pub const VIEWER: &str = "viewer-token";
pub const ENROLL: &str = "enroll-me";

/// A running fleet server; stops when dropped.
#[derive(Debug)]
pub struct TestFleet {
    pub addr: SocketAddr,
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    /// Where devices connect for MQTT, when configured.
    pub mqtt_url: Option<String>,
    /// The server's folder (its data dir is `data/` inside).
    pub dir: tempfile::TempDir,
    pub http: reqwest::Client,
    pub stop: CancellationToken,
}

impl Drop for TestFleet {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Writes the public key of seed `seed` into `dir` (`k<seed>.pub`).
pub fn trust_key(dir: &Path, seed: u8) -> PathBuf {
    let p = dir.join(format!("k{seed}.pub"));
    std::fs::write(
        &p,
        edgefleet_wire::keys::encode_public_key(
            &edgefleet_wire::keys::signing_key_from_seed([seed; 32]).verifying_key(),
        ),
    )
    .expect("write a trust key");
    p
}

impl TestFleet {
    /// The tests' server configuration, with its files in `dir`.
    pub fn config(dir: &Path) -> ServerConfig {
        let mut cfg = ServerConfig {
            data_dir: dir.join("data"),
            ..ServerConfig::default()
        };
        cfg.http.listen = "127.0.0.1:0".parse().expect("address");
        cfg.trust.keys = vec![trust_key(dir, 1)];
        let token = |name: &str, role, t: &str| TokenConfig {
            name: name.into(),
            role,
            token: Some(t.into()),
            token_sha256: None,
        };
        cfg.auth.tokens = vec![
            token("root", Role::Admin, ADMIN),
            token("ops", Role::Operator, OPERATOR),
            token("dash", Role::Viewer, VIEWER),
        ];
        cfg.auth.enrollment_tokens = vec![ENROLL.into()];
        cfg.rollout_tick_ms = 100;
        cfg
    }

    /// A server with the defaults.
    pub async fn start() -> TestFleet {
        Self::start_with(|_, _| {}).await
    }

    /// A server whose configuration `tune` changes first (it gets the
    /// server's folder for any files it writes).
    pub async fn start_with(tune: impl FnOnce(&mut ServerConfig, &Path)) -> TestFleet {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = Self::config(dir.path());
        tune(&mut cfg, dir.path());
        let stop = CancellationToken::new();
        let (running, serve) = fleet_server::server::start(cfg, stop.clone())
            .await
            .expect("the fleet server starts");
        tokio::spawn(serve);
        TestFleet {
            addr: running.addr,
            url: format!("http://{}", running.addr),
            mqtt_url: running.mqtt_url,
            dir,
            http: edge_agent::tls::default_client(),
            stop,
        }
    }

    /// A server with the embedded MQTT broker on `127.0.0.1:mqtt_port`
    /// and a rollout tick of `tick_ms`.
    pub async fn start_with_broker(mqtt_port: u16, tick_ms: u64) -> TestFleet {
        Self::start_with(|cfg, _| {
            cfg.rollout_tick_ms = tick_ms;
            cfg.mqtt = Some(fleet_server::mqtt::MqttConfig {
                listen: format!("127.0.0.1:{mqtt_port}").parse().expect("address"),
                ..Default::default()
            });
        })
        .await
    }

    /// `GET path` as the viewer, as JSON.
    pub async fn get_json(&self, path: &str) -> Value {
        self.req(reqwest::Method::GET, path, Some(VIEWER))
            .send()
            .await
            .expect("GET")
            .json()
            .await
            .expect("a JSON body")
    }

    /// Waits until rollout `id` is in `phase`; returns it (panics after
    /// `secs` with the last view).
    pub async fn wait_rollout(&self, id: &str, phase: &str, secs: u64) -> Value {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        loop {
            let r = self.get_json(&format!("/api/v1/rollouts/{id}")).await;
            if r["phase"]["state"] == phase {
                return r;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "rollout {id} not {phase}: {r:#}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }

    /// Runs the real `fleetctl` against this server with `token`.
    pub fn fleetctl(&self, token: &str, args: &[&str]) -> std::process::Output {
        std::process::Command::new(crate::bins::bin("fleetctl"))
            .args(args)
            .env("FLEETCTL_SERVER", &self.url)
            .env("FLEETCTL_TOKEN", token)
            .output()
            .expect("run fleetctl")
    }

    /// The server's `/metrics` text, read with `token`.
    pub async fn metrics(&self, token: &str) -> String {
        crate::common::metrics_text(&self.http, &self.url, Some(token)).await
    }

    /// A request to `path` with `token`, if any.
    pub fn req(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
    ) -> reqwest::RequestBuilder {
        let r = self.http.request(method, format!("{}{path}", self.url));
        match token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    /// `POST /api/v1/bundles` with `token`: the status and the JSON body.
    pub async fn push_as(&self, token: Option<&str>, bytes: Vec<u8>) -> (StatusCode, Value) {
        let r = self
            .req(reqwest::Method::POST, "/api/v1/bundles", token)
            .body(bytes)
            .send()
            .await
            .expect("push");
        let s = r.status();
        (s, r.json().await.unwrap_or(Value::Null))
    }

    /// Pushes a bundle as the operator; its id (the push must succeed).
    pub async fn push(&self, bytes: Vec<u8>) -> String {
        let (status, v) = self.push_as(Some(OPERATOR), bytes).await;
        assert!(status.is_success(), "push: {status} {v}");
        v["id"].as_str().expect("an id").to_string()
    }

    /// Creates a rollout from a raw JSON body; its id.
    pub async fn create_rollout(&self, body: Value) -> String {
        let r = self
            .req(reqwest::Method::POST, "/api/v1/rollouts", Some(OPERATOR))
            .json(&body)
            .send()
            .await
            .expect("create a rollout");
        let status = r.status();
        let v: Value = r.json().await.unwrap_or(Value::Null);
        assert!(status.is_success(), "rollout: {status} {v}");
        v["id"].as_str().expect("an id").to_string()
    }

    /// Rolls `bundle` out to every device tagged `board`, in one stage.
    pub async fn roll_out(&self, bundle: &str, board: &str) -> String {
        self.rollout_gated(bundle, board, json!({})).await
    }

    /// [`TestFleet::roll_out`] with health `gates`.
    pub async fn rollout_gated(&self, bundle: &str, board: &str, gates: Value) -> String {
        self.create_rollout(json!({
            "bundle": bundle,
            "selector": {"board": board},
            "stages": [{"percent": 100, "bake_minutes": 0}],
            "gates": gates,
        }))
        .await
    }

    pub async fn abort(&self, rollout: &str) {
        let r = self
            .req(
                reqwest::Method::POST,
                &format!("/api/v1/rollouts/{rollout}/abort"),
                Some(OPERATOR),
            )
            .send()
            .await
            .expect("abort");
        assert!(r.status().is_success(), "abort: {}", r.status());
    }

    /// `PUT /api/v1/windows/{scope}` with `body` as the operator.
    pub async fn put_window(&self, scope: &str, body: Value) -> reqwest::Response {
        self.req(
            reqwest::Method::PUT,
            &format!("/api/v1/windows/{scope}"),
            Some(OPERATOR),
        )
        .json(&body)
        .send()
        .await
        .expect("put a window")
    }

    /// `GET /api/v1/devices/{id}` as the operator.
    pub async fn device(&self, id: &str) -> Value {
        self.req(
            reqwest::Method::GET,
            &format!("/api/v1/devices/{id}"),
            Some(OPERATOR),
        )
        .send()
        .await
        .expect("get a device")
        .json()
        .await
        .expect("a device as JSON")
    }

    /// The registry file of a pushed bundle.
    pub fn stored_file(&self, id: &str) -> PathBuf {
        fn walk(d: &Path, id: &str) -> Option<PathBuf> {
            for e in std::fs::read_dir(d).ok()?.flatten() {
                let p = e.path();
                if p.is_dir() {
                    if let Some(f) = walk(&p, id) {
                        return Some(f);
                    }
                } else if p.file_name()?.to_string_lossy().contains(id) {
                    return Some(p);
                }
            }
            None
        }
        walk(self.dir.path(), id).expect("bundle file in the registry")
    }
}

impl TestFleet {
    /// Operator calls against a server this process did not start (a
    /// [`ServerProc`]) at `127.0.0.1:port`. Its `dir` is an empty folder
    /// and dropping it stops nothing.
    pub fn attach(port: u16) -> TestFleet {
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("address");
        TestFleet {
            addr,
            url: format!("http://{addr}"),
            mqtt_url: None,
            dir: tempfile::tempdir().expect("tempdir"),
            http: edge_agent::tls::default_client(),
            stop: CancellationToken::new(),
        }
    }
}

/// The `fleet-server` binary as a child process, with the tests'
/// configuration ([`TestFleet::config`]'s keys, tokens and tick) written
/// as TOML; killed when dropped.
#[derive(Debug)]
pub struct ServerProc {
    pub child: std::process::Child,
    pub port: u16,
    /// The TOML file it runs with.
    pub config: PathBuf,
    log: PathBuf,
}

/// A log file so far ("" when there is none yet).
fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// The tests' server configuration as a TOML file `name` in `dir`, with
/// its data in `data_dir`, listening on `port`, plus `extra` TOML (e.g. a
/// `[store]` section).
pub fn config_file(dir: &Path, name: &str, data_dir: &Path, port: u16, extra: &str) -> PathBuf {
    config_file_http(dir, name, data_dir, port, "", extra)
}

/// [`config_file`], with `http` lines added to its `[http]` section.
pub fn config_file_http(
    dir: &Path,
    name: &str,
    data_dir: &Path,
    port: u16,
    http: &str,
    extra: &str,
) -> PathBuf {
    let key = trust_key(dir, 1);
    let path = dir.join(name);
    let text = format!(
        r#"data_dir = "{data}"
rollout_tick_ms = 100
[http]
listen = "127.0.0.1:{port}"
{http}
[trust]
keys = ["{key}"]
[auth]
enrollment_tokens = ["{ENROLL}"]
[[auth.tokens]]
name = "root"
role = "admin"
token = "{ADMIN}"
[[auth.tokens]]
name = "ops"
role = "operator"
token = "{OPERATOR}"
[[auth.tokens]]
name = "dash"
role = "viewer"
token = "{VIEWER}"
{extra}
"#,
        data = data_dir.display(),
        key = key.display(),
    );
    std::fs::write(&path, text).expect("write the server config");
    path
}

impl ServerProc {
    /// Starts `fleet-server --config <config>` (logging into `<config>.log`)
    /// and waits until `port` takes connections.
    pub fn start(config: &Path, port: u16) -> ServerProc {
        let mut p = Self::spawn(config, port);
        let what = format!("fleet-server listening on {port}");
        let log = p.log.clone();
        crate::common::wait_started(
            &mut p.child,
            &what,
            60,
            || read_log(&log),
            || crate::common::listening(port),
        );
        p
    }

    /// Waits until the log holds `text` (panics after `secs`, or if the
    /// process exits first).
    pub fn wait_log(&mut self, text: &str, secs: u64) {
        let what = format!("fleet-server logging {text:?}");
        let log = self.log.clone();
        crate::common::wait_started(
            &mut self.child,
            &what,
            secs,
            || read_log(&log),
            || read_log(&log).contains(text),
        );
    }

    /// Starts the process without waiting for anything (a standby does
    /// not listen until it is active).
    pub fn spawn(config: &Path, port: u16) -> ServerProc {
        let log = config.with_extension("log");
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("open the server log");
        let child = std::process::Command::new(crate::bins::bin("fleet-server"))
            .arg("--config")
            .arg(config)
            .stdout(out.try_clone().expect("log handle"))
            .stderr(out)
            .spawn()
            .expect("start fleet-server");
        ServerProc {
            child,
            port,
            config: config.to_path_buf(),
            log,
        }
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        read_log(&self.log)
    }

    /// SIGTERM and wait: a clean stop (pending writes committed), which
    /// must exit 0.
    pub fn stop(mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let st = self.wait_exit(30);
        assert!(
            st.success(),
            "fleet-server stopped with {st}: {}",
            self.log()
        );
    }

    /// Waits for the process to exit on its own (panics with the log
    /// after `secs`); its status.
    pub fn wait_exit(&mut self, secs: u64) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "fleet-server still running after {secs} s: {}",
                self.log()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// The process id (to send it signals).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// kill -9.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Runs `fleet-server --config <config> <args…>` to completion.
    pub fn run(config: &Path, args: &[&str]) -> std::process::Output {
        std::process::Command::new(crate::bins::bin("fleet-server"))
            .arg("--config")
            .arg(config)
            .args(args)
            .output()
            .expect("run fleet-server")
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// fleetctl's stdout, asserting it succeeded (stderr in the message).
#[track_caller]
pub fn ok(o: std::process::Output) -> String {
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "fleetctl failed: {}\n{out}",
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

/// A device call's answer: status and JSON body (`Null` without one).
pub type Answer = (u16, Value);

async fn answer(r: reqwest::RequestBuilder) -> Answer {
    let r = r.send().await.expect("the request reaches the server");
    let status = r.status().as_u16();
    (status, r.json::<Value>().await.unwrap_or(Value::Null))
}

/// `POST /api/v1/devices/enroll` of `id` with the test enrollment token,
/// through `client` (its TLS identity, if any, is the device's).
pub async fn enroll_through(client: &reqwest::Client, base: &str, id: &str) -> Answer {
    answer(client.post(format!("{base}/api/v1/devices/enroll")).json(
        &json!({"enrollment_token": ENROLL, "device_id": id, "tags": {},
                          "arch": "x86_64", "agent_version": "0.1.0"}),
    ))
    .await
}

/// `GET /api/v1/device/desired` with a device credential, through `client`.
pub async fn desired_through(client: &reqwest::Client, base: &str, credential: &str) -> Answer {
    answer(
        client
            .get(format!("{base}/api/v1/device/desired"))
            .bearer_auth(credential.trim()),
    )
    .await
}

/// `a` is a 403 with error code `code`.
pub fn assert_forbidden(a: &Answer, code: &str) {
    assert_eq!(
        (a.0, a.1["error"]["code"].as_str()),
        (403, Some(code)),
        "{}",
        a.1
    );
}

/// A device credential gets its desired state at `base` with the
/// device's own client certificate (`own`) only: 403
/// `client_certificate_required` without one (`none`),
/// `client_certificate_mismatch` with another device's (`other`).
pub async fn assert_credential_needs_its_certificate(
    base: &str,
    credential: &str,
    [own, none, other]: [&reqwest::Client; 3],
) {
    let (s, v) = desired_through(own, base, credential).await;
    assert_eq!(s, 200, "{v}");
    let r = desired_through(none, base, credential).await;
    assert_forbidden(&r, "client_certificate_required");
    let r = desired_through(other, base, credential).await;
    assert_forbidden(&r, "client_certificate_mismatch");
}
