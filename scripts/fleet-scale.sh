#!/usr/bin/env bash
# Regenerates docs/fleet-scale.md: release builds of fleet-server and
# fleet-sim, then for each fleet size a fresh server (embedded broker,
# sled) and the simulator: enrollment, MQTT connections, a steady minute of
# check-ins (30 s, ETag), reports (30 s) and telemetry (10 s), a rollout of
# the real cls bundle in three stages (50 devices download it for real), a
# telemetry burst, operator reads. Prints and writes the table with the
# machine it ran on. Takes 15-25 minutes on 2 cores. Not part of the test
# suite (that runs scripts/fleet-sim-check.sh, a small correctness run).
#
# Then the same run at PG_SIZES devices (default 10000) in the scale-out
# layout (docs/deploy.md): the store in PostgreSQL (Debian's, a throwaway
# cluster on a loopback port, as nobody under root, fsync on), bundle bytes
# in an S3 bucket (s3s-fs, `cargo install s3s-fs --features binary`),
# Debian's mosquitto with the published config and per-device logins kept
# by the server, and two fleet-server processes: the active one and a
# standby waiting for its lease, which takes its share of the device
# messages from the shared subscription into the inbox (ingest_slots = 1). Then the
# same layout at STANDBY_SIZES devices (default 10000) with every device
# and operator call sent to the standby (a DNS name or a balancer that
# does not check /readyz), which answers the check-ins from its copy of
# the fleet, stores the reports in the inbox, sends the bundles from the
# bucket and forwards the rest to the active server.
#
#   scripts/fleet-scale.sh                 # 1000 3000 10000, then PostgreSQL at 10000 (twice)
#   SIZES="1000" PG_SIZES="" STANDBY_SIZES="" scripts/fleet-scale.sh    # one size (does not touch docs/)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
sizes=${SIZES:-1000 3000 10000}
pg_sizes=${PG_SIZES-10000}
standby_sizes=${STANDBY_SIZES-10000}
target="${CARGO_TARGET_DIR:-$root/target}"
echo "==> release builds of fleet-server and fleet-sim; fleetctl (dev) packs"
cargo build --release --locked -q -p fleet-server -p fleet-sim
cargo build --locked -q -p fleetctl
rel="$target/release"
ulimit -n "$(ulimit -Hn)"
out=$(mktemp -d -t edgefleet-scale.XXXXXX)
pid="" standby="" pg_pid="" pg_dir="" s3_pid="" mosq_pid=""
cleanup() {
  for p in $pid $standby $pg_pid $s3_pid $mosq_pid; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ -n "$pg_dir" ]; then rm -rf "$pg_dir"; fi
}
trap cleanup EXIT

# A throwaway PostgreSQL on 127.0.0.1:$1; sets pg_pid, pg_dir, pg_url.
start_postgres() {
  local port=$1 bin run=()
  bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
  pg_dir=$(mktemp -d -t edgefleet-scale-pg.XXXXXX)
  if [ "$(id -u)" -eq 0 ]; then
    chown 65534:65534 "$pg_dir"
    run=(setpriv --reuid=65534 --regid=65534 --clear-groups --)
  fi
  (cd "$pg_dir" && "${run[@]}" "$bin/initdb" --auth=trust --username=edgefleet --encoding=UTF8 \
    --locale=C -D "$pg_dir/data" >/dev/null)
  (cd "$pg_dir" && exec "${run[@]}" "$bin/postgres" -D "$pg_dir/data" -h 127.0.0.1 -p "$port" \
    -k "$pg_dir" -c max_connections=50 > "$pg_dir/postgres.log" 2>&1) &
  pg_pid=$!
  for _ in $(seq 300); do "$bin/pg_isready" -q -h 127.0.0.1 -p "$port" && break; sleep 0.1; done
  pg_url="postgres://edgefleet@127.0.0.1:$port/postgres"
}
"$target/debug/fleetctl" keygen --out "$out/release" >/dev/null
"$target/debug/fleetctl" bundle pack --model models/cls/ch_ppocr_mobile_v2.0_cls_infer.onnx \
  --name cls --version 1.0.0 --sequence 1 \
  --golden-inputs models/cls/golden/in_0.npz --golden-outputs models/cls/golden/out_0.npz \
  --key "$out/release.key" --out "$out/cls.bundle" >/dev/null

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# s3s-fs on 127.0.0.1:$2 keeping bucket "fleet" under $1; sets s3_pid.
start_s3() {
  local dir=$1 port=$2
  command -v s3s-fs >/dev/null || { echo "s3s-fs is not installed (cargo install s3s-fs --version 0.14.1 --features binary --locked)" >&2; exit 1; }
  mkdir -p "$dir/root/fleet"
  s3s-fs --host 127.0.0.1 --port "$port" --access-key scale-access --secret-key scale-secret-0123456789 \
    "$dir/root" > "$dir/s3s-fs.log" 2>&1 &
  s3_pid=$!
  for _ in $(seq 300); do (echo > "/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
}

# mosquitto with docs/brokers/mosquitto.conf on 127.0.0.1:$2, files in $1; sets mosq_pid.
start_mosquitto() {
  local dir=$1 port=$2
  mkdir -p "$dir/data"
  : > "$dir/passwd"
  sed -e "s|@PORT@|$port|" -e "s|@BIND@|127.0.0.1|" -e "s|@PASSWORD_FILE@|$dir/passwd|" \
    -e "s|@ACL_FILE@|$root/docs/brokers/mosquitto.acl|" -e "s|@DATA_DIR@|$dir/data|" \
    docs/brokers/mosquitto.conf > "$dir/mosquitto.conf"
  echo "user $(id -un)" >> "$dir/mosquitto.conf"
  /usr/sbin/mosquitto -c "$dir/mosquitto.conf" > "$dir/mosquitto.log" 2>&1 &
  mosq_pid=$!
  for _ in $(seq 300); do (echo > "/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
}

# One run at $1 devices; $2 = "sled", "ha", or "ha-standby" (ha, the
# simulator talking to the standby); results in result-$3.json.
run_size() {
  local n=$1 store=$2 name=$3 via=""
  if [ "$store" = ha-standby ]; then store=ha via=standby; fi
  echo "==> $n devices ($store)"
  work="$out/$name"
  mkdir -p "$work"
  token=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
  ha_toml="" broker_toml="[mqtt]
listen = \"127.0.0.1:0\""
  if [ "$store" = ha ]; then
    start_postgres "$(free_port)"
    local s3_port mqtt_port
    s3_port=$(free_port)
    mqtt_port=$(free_port)
    start_s3 "$work/s3" "$s3_port"
    start_mosquitto "$work/mosquitto" "$mqtt_port"
    ha_toml="[store]
url = \"$pg_url\"
[bundles]
url = \"s3://fleet/bundles\"
endpoint = \"http://127.0.0.1:$s3_port\"
access_key_id = \"scale-access\"
secret_access_key = \"scale-secret-0123456789\""
    broker_toml="[mqtt]
embedded = false
url = \"mqtt://127.0.0.1:$mqtt_port\"
username = \"fleet-server\"
password = \"server-$token\"
share_group = \"fleet\"
ingest_slots = 1
[mqtt.mosquitto]
password_file = \"$work/mosquitto/passwd\"
reload_command = [\"kill\", \"-HUP\", \"$mosq_pid\"]"
  fi
  cat > "$work/fleet-server.toml" <<TOML
data_dir = "$work/server"
rollout_tick_ms = 2000
[http]
listen = "127.0.0.1:0"
[trust]
keys = ["$out/release.pub"]
[auth]
enrollment_tokens = ["enroll-$token"]
[[auth.tokens]]
name = "scale-operator"
role = "operator"
token = "$token"
$broker_toml
$ha_toml
TOML
  local standby_port=0
  if [ "$store" = ha ]; then standby_port=$(free_port); fi
  if [ -n "$via" ]; then
    # A fixed port: the active server advertises its address to the standby.
    sed -i "s|^listen = \"127.0.0.1:0\"|listen = \"127.0.0.1:$(free_port)\"|" "$work/fleet-server.toml"
  fi
  FLEET_SERVER_LOG=warn "$rel/fleet-server" --config "$work/fleet-server.toml" > "$work/server.out" 2> "$work/server.log" &
  pid=$!
  for _ in $(seq 300); do grep -q "listening on" "$work/server.out" 2>/dev/null && break; sleep 0.1; done
  if [ "$store" = ha ]; then
    # The second replica (its own data_dir and port): waits for the lease the whole run.
    sed -e "s|^data_dir = .*|data_dir = \"$work/standby\"|" \
      -e "s|^listen = .*|listen = \"127.0.0.1:$standby_port\"|" "$work/fleet-server.toml" > "$work/standby.toml"
    FLEET_SERVER_LOG=info "$rel/fleet-server" --config "$work/standby.toml" > "$work/standby.out" 2> "$work/standby.log" &
    standby=$!
    for _ in $(seq 100); do grep -q "standby:" "$work/standby.log" 2>/dev/null && break; sleep 0.1; done
    grep -q "standby:" "$work/standby.log" || { echo "the second replica is not a standby" >&2; cat "$work/standby.log" >&2; exit 1; }
  fi
  http=$(sed -n 's/^fleet-server listening on //p' "$work/server.out")
  mqtt=$(sed -n 's/^mqtt broker at //p' "$work/server.out")
  if [ "$store" = ha ]; then mqtt="mqtt://127.0.0.1:$mqtt_port"; fi
  local metrics_server=$http
  if [ -n "$via" ]; then http="http://127.0.0.1:$standby_port"; fi
  "$rel/fleet-sim" --server "$http" --metrics-server "$metrics_server" --mqtt "$mqtt" --token "$token" --enrollment-token "enroll-$token" \
    --devices "$n" --checkin-secs 30 --report-secs 30 --telemetry-secs 10 --steady-secs 60 --telemetry-only-secs 30 \
    --bundle "$out/cls.bundle" --stages 10:0,50:0,100:0 --rollout-timeout-secs 900 \
    --download-sample 50 --burst "${BURST:-5}" --server-pid "$pid" > "$work/result.json" 2> >(tee "$work/sim.log" >&2)
  if [ "$store" = ha ]; then
    # The standby's share of the device messages, and what the active
    # server applied from the inbox.
    curl -sf -H "Authorization: Bearer $token" "http://127.0.0.1:$standby_port/metrics" > "$work/standby-metrics.txt" || true
    curl -sf -H "Authorization: Bearer $token" "$metrics_server/metrics" > "$work/active-metrics.txt" || true
    python3 - "$work/result.json" "$work/standby-metrics.txt" "$work/active-metrics.txt" <<'PY'
import json, sys
def value(path, name):
    for line in open(path):
        if line.startswith(name + " "):
            return int(float(line.split()[1]))
    return None
r = json.load(open(sys.argv[1]))
r["standby_stored"] = value(sys.argv[2], "fleet_standby_mqtt_messages_stored_total")
r["inbox_applied"] = value(sys.argv[3], "fleet_mqtt_inbox_applied_total")
r["standby_checkins"] = value(sys.argv[2], "fleet_standby_checkins_served_total")
r["standby_reports"] = value(sys.argv[2], "fleet_standby_reports_stored_total")
r["standby_downloads"] = value(sys.argv[2], "fleet_standby_downloads_total")
r["standby_forwarded"] = value(sys.argv[2], "fleet_standby_forwarded_total")
json.dump(r, open(sys.argv[1], "w"), indent=1)
PY
  fi
  for p in $pid $standby; do kill "$p"; wait "$p" 2>/dev/null || true; done
  pid="" standby=""
  if [ -n "$pg_pid" ]; then
    kill -INT "$pg_pid"; wait "$pg_pid" 2>/dev/null || true
    rm -rf "$pg_dir"; pg_pid="" pg_dir=""
  fi
  for p in $s3_pid $mosq_pid; do kill "$p"; wait "$p" 2>/dev/null || true; done
  s3_pid="" mosq_pid=""
  cp "$work/result.json" "$out/result-$name.json"
}

for n in $sizes; do run_size "$n" sled "$n"; done
for n in $pg_sizes; do run_size "$n" ha "pg-$n"; done
for n in $standby_sizes; do run_size "$n" ha-standby "sb-$n"; done
if [ -z "${SIZES:-}" ] && [ -z "${PG_SIZES+set}" ] && [ -z "${STANDBY_SIZES+set}" ]; then
  python3 scripts/fleet_scale_report.py "$out" > docs/fleet-scale.md
  echo "==> wrote docs/fleet-scale.md"
else
  python3 scripts/fleet_scale_report.py "$out"
fi
