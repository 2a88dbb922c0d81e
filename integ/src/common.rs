//! Small helpers every end-to-end test file needs: repository paths, free
//! ports, the test signing key, and Debian's mosquitto when installed.
//! Each test binary includes this file; not every one uses every helper.

use std::path::{Path, PathBuf};

/// A path relative to the repository root.
pub fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("crate inside the workspace")
        .join(rel)
}

/// A TCP port free on 127.0.0.1 at the time of the call.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// Writes the public half of the tests' release key (seed `[1; 32]`) into
/// `dir` and returns its path, for a server's or agent's trust root.
pub fn write_key(dir: &Path) -> PathBuf {
    let key = dir.join("release.pub");
    std::fs::write(
        &key,
        edgefleet_wire::keys::encode_public_key(
            &edgefleet_wire::keys::signing_key_from_seed([1; 32]).verifying_key(),
        ),
    )
    .expect("write the release key");
    key
}

/// Debian's mosquitto broker, when installed.
pub fn mosquitto_bin() -> Option<PathBuf> {
    ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// [`mosquitto_bin`], or `None` after saying that `test` is skipped
/// (a failure instead with `EDGEFLEET_REQUIRE_MOSQUITTO`, as in CI).
pub fn mosquitto_or_skip(test: &str) -> Option<PathBuf> {
    let bin = mosquitto_bin();
    if bin.is_none() {
        assert!(
            std::env::var_os("EDGEFLEET_REQUIRE_MOSQUITTO").is_none(),
            "mosquitto is required here but not installed"
        );
        eprintln!("SKIPPED {test}: mosquitto is not installed");
    }
    bin
}

/// VmHWM (peak resident memory) of process `pid`, in bytes.
pub fn peak_rss(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmHWM in /proc/PID/status")
        * 1024
}

/// The Prometheus exposition text at `base`/metrics (with a bearer
/// `token` when given); panics on a failed request.
pub async fn metrics_text(http: &reqwest::Client, base: &str, token: Option<&str>) -> String {
    let mut r = http.get(format!("{base}/metrics"));
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    let r = r.send().await.expect("GET /metrics");
    assert!(
        r.status().is_success(),
        "GET {base}/metrics: {}",
        r.status()
    );
    r.text().await.expect("the /metrics body")
}

/// The value of sample `series` (a name with its labels, exactly as
/// exposed) in exposition `text`, or `None` when it is not there.
pub fn sample(text: &str, series: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// A counter's value: absent counts as 0 (a counter appears once it moves).
pub fn counter(text: &str, series: &str) -> u64 {
    sample(text, series).unwrap_or(0)
}

/// Polls `ready` every 50 ms until it holds. Panics after `secs`, or as
/// soon as `child` exits, naming `what` with `log()` (the process's log
/// so far): a fixture that did not start says why.
pub fn wait_started(
    child: &mut std::process::Child,
    what: &str,
    secs: u64,
    log: impl Fn() -> String,
    mut ready: impl FnMut() -> bool,
) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while !ready() {
        if let Ok(Some(st)) = child.try_wait() {
            panic!("{what}: exited ({st}): {}", log());
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not after {secs} s: {}",
            log()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Whether something listens on loopback `port`.
pub fn listening(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}
