//! `fleet-sim`: simulated devices against a running fleet server; see
//! the `fleet_sim` library. Prints the results as JSON on stdout, progress on stderr.

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "fleet-sim",
    about = "Simulate a fleet of edgefleet devices against a fleet server"
)]
struct Args {
    /// Fleet server URL.
    #[arg(long, default_value = "http://127.0.0.1:7070")]
    server: String,
    /// Where to read the server's /metrics (default: --server). Give the
    /// active server's URL when --server is a standby.
    #[arg(long)]
    metrics_server: Option<String>,
    /// MQTT broker URL devices connect to.
    #[arg(long, default_value = "mqtt://127.0.0.1:1883")]
    mqtt: String,
    /// Operator token (pushes the bundle, creates the rollout, reads).
    #[arg(long, env = "FLEETCTL_TOKEN", hide_env_values = true)]
    token: String,
    #[arg(long)]
    enrollment_token: String,
    #[arg(long, default_value_t = 1000)]
    devices: usize,
    #[arg(long, default_value = "sim")]
    prefix: String,
    #[arg(long, default_value_t = 30.0)]
    checkin_secs: f64,
    #[arg(long, default_value_t = 30.0)]
    report_secs: f64,
    #[arg(long, default_value_t = 10.0)]
    telemetry_secs: f64,
    #[arg(long, default_value_t = 60)]
    steady_secs: u64,
    /// Then this long with telemetry only (the server CPU it costs alone).
    #[arg(long, default_value_t = 0)]
    telemetry_only_secs: u64,
    /// A bundle file to push and roll out to every device.
    #[arg(long)]
    bundle: Option<std::path::PathBuf>,
    /// Stages as PERCENT:BAKE_SECONDS, comma-separated.
    #[arg(long, default_value = "10:0,100:0")]
    stages: String,
    #[arg(long, default_value_t = 600)]
    rollout_timeout_secs: u64,
    /// Devices that download the bundle for real.
    #[arg(long, default_value_t = 50)]
    download_sample: usize,
    /// Telemetry messages per device, back to back, after the rollout.
    #[arg(long, default_value_t = 0)]
    burst: usize,
    /// The server's pid, for its CPU and RSS.
    #[arg(long)]
    server_pid: Option<u32>,
    #[arg(long, default_value_t = 256)]
    connect_concurrency: usize,
}

#[tokio::main]
async fn main() {
    let a = Args::parse();
    let stages = a
        .stages
        .split(',')
        .map(|s| {
            let (p, b) = s.split_once(':').unwrap_or((s, "0"));
            (
                p.trim().parse().unwrap_or(100),
                b.trim().parse().unwrap_or(0),
            )
        })
        .collect();
    let bundle = match &a.bundle {
        Some(p) => match std::fs::read(p) {
            Ok(b) => Some(b),
            Err(e) => {
                eprintln!("error: {}: {e}", p.display());
                std::process::exit(2);
            }
        },
        None => None,
    };
    let server = a.server.trim_end_matches('/').to_string();
    let plan = fleet_sim::Plan {
        metrics_server: a
            .metrics_server
            .map_or_else(|| server.clone(), |m| m.trim_end_matches('/').to_string()),
        server,
        mqtt: a.mqtt,
        operator_token: a.token,
        enrollment_token: a.enrollment_token,
        devices: a.devices,
        prefix: a.prefix,
        checkin_secs: a.checkin_secs,
        report_secs: a.report_secs,
        telemetry_secs: a.telemetry_secs,
        steady_secs: a.steady_secs,
        telemetry_only_secs: a.telemetry_only_secs,
        bundle,
        stages,
        rollout_timeout_secs: a.rollout_timeout_secs,
        download_sample: a.download_sample,
        burst: a.burst,
        server_pid: a.server_pid,
        connect_concurrency: a.connect_concurrency,
    };
    match fleet_sim::run(plan).await {
        Ok(r) => println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default()),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}
