//! The observability kit against live processes: `promtool check metrics`
//! on the real `/metrics` of a server (embedded broker, a rollout done,
//! telemetry in) and of an agent serving a model; `promtool check rules`
//! and `promtool test rules` on the alert rules; `promtool check config` on
//! the scrape config; and the Grafana dashboard checked against its
//! schema's required shape, with every metric that a dashboard panel or an
//! alert rule queries present in the live output (Debian has no Grafana
//! package to import it into).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use integ::agent::InProcAgent;
use integ::bundles::{Model, Pack};
use integ::common::{free_port, repo};
use integ::fleet::{OPERATOR, TestFleet, VIEWER, trust_key};
use serde_json::Value;

fn promtool() -> Option<PathBuf> {
    ["/usr/bin/promtool", "/usr/local/bin/promtool"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// Runs promtool with `args`, `stdin` piped in; (success, stdout + stderr).
fn run_promtool(bin: &Path, args: &[&str], stdin: &str) -> (bool, String) {
    let mut child = Command::new(bin)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Metric family names in an exposition (from its TYPE lines), with the
/// series names a query may use (`_bucket`, `_sum`, `_count` of histograms).
fn names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for l in text.lines() {
        if let Some(rest) = l.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            let (name, kind) = (it.next().unwrap(), it.next().unwrap());
            out.insert(name.to_string());
            if kind == "histogram" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    out.insert(format!("{name}{suffix}"));
                }
            }
        }
    }
    out
}

/// Metric names in a PromQL expression (ours all start with `fleet_` or
/// `edge_agent_`).
fn queried(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let b = expr.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let rest = &expr[i..];
        let starts = (rest.starts_with("fleet_") || rest.starts_with("edge_agent_"))
            && (i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_'));
        if starts {
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            out.insert(rest[..end].to_string());
            i += end;
        } else {
            i += 1;
        }
    }
    out
}

async fn get_text(url: &str, token: Option<&str>) -> String {
    let http = edge_agent::tls::default_client();
    let mut r = http.get(url);
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    let r = r.send().await.unwrap();
    assert!(r.status().is_success(), "{url}: {}", r.status());
    r.text().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn live_metrics_rules_scrape_config_and_dashboard_pass_promtool_and_match() {
    let Some(promtool) = promtool() else {
        assert!(
            std::env::var("EDGEFLEET_REQUIRE_PROMTOOL").is_err(),
            "promtool is required here: apt-get install prometheus"
        );
        eprintln!("SKIPPED: no promtool");
        return;
    };
    let kit = repo("docs/observability");

    // The rules and the scrape config, offline.
    let (ok, out) = run_promtool(
        &promtool,
        &["check", "rules", kit.join("alerts.yml").to_str().unwrap()],
        "",
    );
    assert!(ok, "promtool check rules:\n{out}");
    let (ok, out) = run_promtool(
        &promtool,
        &[
            "test",
            "rules",
            kit.join("alerts.test.yml").to_str().unwrap(),
        ],
        "",
    );
    assert!(ok, "promtool test rules:\n{out}");
    // The scrape config names token files under /etc/prometheus: check a
    // copy whose files exist.
    let dir = tempfile::tempdir().unwrap();
    let scrape = std::fs::read_to_string(kit.join("prometheus.yml"))
        .unwrap()
        .replace("/etc/prometheus/", &format!("{}/", dir.path().display()));
    for f in ["edgefleet-viewer.token", "alerts.yml"] {
        std::fs::write(dir.path().join(f), "x").unwrap();
    }
    std::fs::copy(kit.join("alerts.yml"), dir.path().join("alerts.yml")).unwrap();
    let cfg = dir.path().join("prometheus.yml");
    std::fs::write(&cfg, scrape).unwrap();
    let (ok, out) = run_promtool(&promtool, &["check", "config", cfg.to_str().unwrap()], "");
    assert!(ok, "promtool check config:\n{out}");

    // A live fleet: embedded broker, one agent serving, a rollout done,
    // telemetry in.
    let mqtt_port = free_port();
    let server = TestFleet::start_with_broker(mqtt_port, 200).await;
    let c = InProcAgent::config(
        &server.url,
        &dir.path().join("dev-1"),
        "dev-1",
        "rpi4",
        vec![trust_key(dir.path(), 1)],
    );
    let agent = InProcAgent::start(InProcAgent::over_mqtt(c, mqtt_port)).await;
    let v1 = server.push(Pack::new(Model::MultiIo, 1).bytes()).await;
    server.roll_out(&v1, "rpi4").await;
    agent
        .wait_for("v1 committed", 60, |s| s["state"] == "committed")
        .await;
    let input = std::fs::read(repo("models/multi/golden/in_0.npz")).unwrap();
    let http = edge_agent::tls::default_client();
    for _ in 0..20 {
        let r = http
            .post(format!("{}/v1/infer", agent.url))
            .header("content-type", "application/x-npz")
            .body(input.clone())
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let d = server.device("dev-1").await;
        if d["telemetry"]["latency_ms"].is_object() {
            break;
        }
        assert!(Instant::now() < deadline, "no telemetry: {d:#}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // An API error and an unknown route, so those labels exist too.
    let _ = get_text(&format!("{}/api/v1/devices", server.url), Some(VIEWER)).await;
    let r = server
        .req(reqwest::Method::GET, "/api/v1/devices/nope", Some(OPERATOR))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    let fleet = get_text(&format!("{}/metrics", server.url), Some(VIEWER)).await;
    let device = get_text(&format!("{}/metrics", agent.url), None).await;
    for (who, text) in [("fleet-server", &fleet), ("edge-agent", &device)] {
        let (ok, out) = run_promtool(&promtool, &["check", "metrics"], text);
        assert!(
            ok && out.trim().is_empty(),
            "promtool check metrics on the {who}'s /metrics:\n{out}\n--- exposition ---\n{text}"
        );
    }
    // The conventions the issue names, in the live output.
    let commit = |text: &str, family: &str| {
        text.lines()
            .find(|l| l.starts_with(family) && !l.starts_with('#'))
            .unwrap_or_else(|| panic!("no {family} in:\n{text}"))
            .to_string()
    };
    let info = commit(&fleet, "fleet_build_info{");
    assert!(
        info.contains("version=\"")
            && info.contains("commit=\"")
            && info.contains("target=\"x86_64"),
        "{info}"
    );
    let info = commit(&device, "edge_agent_build_info{");
    assert!(
        info.contains("commit=\"") && info.contains("tract=\"0.23.9\""),
        "{info}"
    );
    let active = commit(&device, "edge_agent_active_model_info{");
    assert!(
        active.contains("name=\"multi-io\"") && active.contains("version=\"1.1.0\""),
        "{active}"
    );
    assert!(
        device.contains("edge_agent_update_state{state=\"committed\"} 1")
            && device.contains("edge_agent_update_state{state=\"idle\"} 0"),
        "{device}"
    );
    assert!(device.contains("edge_agent_disk_free_bytes "), "{device}");
    assert!(
        fleet.contains(
            "fleet_api_request_seconds_count{route=\"/api/v1/devices/{id}\",method=\"GET\",status=\"404\"} 1"
        ),
        "{fleet}"
    );
    assert!(
        fleet.contains("fleet_model_latency_p95_seconds{model=\"multi-io\",version=\"1.1.0\"}"),
        "{fleet}"
    );
    assert!(
        !fleet.contains("device=\""),
        "no per-device series by default:\n{fleet}"
    );
    assert!(
        !fleet.contains("_ms{") && !fleet.contains("_ms "),
        "base units only:\n{fleet}"
    );

    // Every metric the rules and the dashboard query exists.
    let live: BTreeSet<String> = names(&fleet).union(&names(&device)).cloned().collect();
    let rules = std::fs::read_to_string(kit.join("alerts.yml")).unwrap();
    let exprs: Vec<String> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("expr:"))
        .map(|e| e.trim().to_string())
        .collect();
    assert!(exprs.len() >= 8, "alert rules: {exprs:?}");
    let dash: Value =
        serde_json::from_str(&std::fs::read_to_string(kit.join("grafana-dashboard.json")).unwrap())
            .expect("the dashboard is JSON");
    let panel_exprs = check_dashboard(&dash);
    let mut missing = BTreeSet::new();
    for e in exprs.iter().chain(panel_exprs.iter()) {
        for m in queried(e) {
            if !live.contains(&m) {
                missing.insert(m);
            }
        }
    }
    assert!(
        missing.is_empty(),
        "queried but not exported: {missing:?}\nlive: {live:?}"
    );

    // Per-device series when asked for: still valid for promtool.
    let small = TestFleet::start_with(|cfg, _| cfg.metrics.per_device = true).await;
    let text = get_text(&format!("{}/metrics", small.url), Some(VIEWER)).await;
    let (ok, out) = run_promtool(&promtool, &["check", "metrics"], &text);
    assert!(ok && out.trim().is_empty(), "{out}\n{text}");
    agent.stop().await;
}

/// Checks the dashboard's required shape (Grafana's dashboard JSON
/// schema, v39: the fields an import needs); returns every panel query.
fn check_dashboard(d: &Value) -> Vec<String> {
    for key in [
        "title",
        "uid",
        "panels",
        "schemaVersion",
        "time",
        "templating",
    ] {
        assert!(!d[key].is_null(), "the dashboard has no {key}");
    }
    assert!(d["id"].is_null(), "an importable dashboard has id null");
    assert!(d["schemaVersion"].as_u64().unwrap() >= 36);
    let uid = d["uid"].as_str().unwrap();
    assert!(uid.len() <= 40 && !uid.is_empty());
    // The datasource is a variable, so the import asks for it.
    let vars = d["templating"]["list"].as_array().unwrap();
    assert!(
        vars.iter()
            .any(|v| v["type"] == "datasource" && v["query"] == "prometheus"),
        "a datasource variable"
    );
    let mut ids = BTreeSet::new();
    let mut exprs = Vec::new();
    let mut titles = BTreeSet::new();
    let mut walk = vec![d["panels"].as_array().unwrap().clone()];
    while let Some(panels) = walk.pop() {
        for p in panels {
            let id = p["id"].as_u64().expect("every panel has a numeric id");
            assert!(ids.insert(id), "panel id {id} twice");
            let kind = p["type"].as_str().unwrap();
            assert!(
                [
                    "row",
                    "timeseries",
                    "stat",
                    "table",
                    "bargauge",
                    "gauge",
                    "piechart"
                ]
                .contains(&kind),
                "panel type {kind}"
            );
            let g = &p["gridPos"];
            for k in ["h", "w", "x", "y"] {
                assert!(g[k].is_u64(), "panel {id} gridPos.{k}");
            }
            assert!(g["x"].as_u64().unwrap() + g["w"].as_u64().unwrap() <= 24);
            titles.insert(p["title"].as_str().unwrap().to_string());
            if kind == "row" {
                if let Some(inner) = p["panels"].as_array() {
                    walk.push(inner.clone());
                }
                continue;
            }
            assert_eq!(p["datasource"]["uid"], "${datasource}", "panel {id}");
            let targets = p["targets"].as_array().unwrap();
            assert!(!targets.is_empty(), "panel {id} has no query");
            for t in targets {
                exprs.push(t["expr"].as_str().unwrap().to_string());
            }
        }
    }
    // The sections the issue names.
    for row in ["Fleet", "Rollouts", "Devices", "Broker", "API"] {
        assert!(titles.contains(row), "no {row} row: {titles:?}");
    }
    exprs
}
