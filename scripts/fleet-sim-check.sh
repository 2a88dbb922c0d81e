#!/usr/bin/env bash
# The fleet simulator's small run (CI): a real fleet-server with its
# embedded broker, 500 simulated devices speaking the agent's protocol,
# a rollout of the real cls bundle to all of them (a sample downloads it
# for real), and a telemetry burst. Asserts correctness, not speed: every
# device connected, the rollout completed with every device on the bundle,
# every sampled download verified, and zero messages lost (everything the
# broker acknowledged is in the server's store).
#
# Environment: EDGEFLEET_BIN_DIR=DIR takes fleet-server, fleetctl and
# fleet-sim from DIR (the test build); SIM_DEVICES (default 500).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
if [ -n "${EDGEFLEET_BIN_DIR:-}" ]; then
  bin=$EDGEFLEET_BIN_DIR
else
  cargo build --locked -q -p fleet-server -p fleetctl -p fleet-sim --bins
  bin="${CARGO_TARGET_DIR:-$root/target}/debug"
fi
for b in fleet-server fleetctl fleet-sim; do
  [ -x "$bin/$b" ] || { echo "missing $bin/$b" >&2; exit 1; }
done
devices=${SIM_DEVICES:-500}
work=$(mktemp -d -t edgefleet-sim.XXXXXX)
pid=""
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null || true; }
trap cleanup EXIT
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

"$bin/fleetctl" keygen --out "$work/release" >/dev/null
"$bin/fleetctl" bundle pack --model models/cls/ch_ppocr_mobile_v2.0_cls_infer.onnx \
  --name cls --version 1.0.0 --sequence 1 \
  --golden-inputs models/cls/golden/in_0.npz --golden-outputs models/cls/golden/out_0.npz \
  --key "$work/release.key" --out "$work/cls.bundle" >/dev/null
token=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
cat > "$work/fleet-server.toml" <<TOML
data_dir = "$work/server"
rollout_tick_ms = 500
[http]
listen = "127.0.0.1:0"
[trust]
keys = ["$work/release.pub"]
[auth]
enrollment_tokens = ["enroll-$token"]
[[auth.tokens]]
name = "sim-operator"
role = "operator"
token = "$token"
[rollouts]
offline_after_secs = 120
[mqtt]
listen = "127.0.0.1:0"
TOML
"$bin/fleet-server" --config "$work/fleet-server.toml" > "$work/server.out" 2> "$work/server.log" &
pid=$!
for _ in $(seq 100); do
  grep -q "listening on" "$work/server.out" 2>/dev/null && break
  sleep 0.1
done
http=$(sed -n 's/^fleet-server listening on //p' "$work/server.out")
mqtt=$(sed -n 's/^mqtt broker at //p' "$work/server.out")
[ -n "$http" ] && [ -n "$mqtt" ] || { echo "fleet-server did not start:"; cat "$work/server.log"; exit 1; }

"$bin/fleet-sim" --server "$http" --mqtt "$mqtt" --token "$token" --enrollment-token "enroll-$token" \
  --devices "$devices" --checkin-secs 5 --report-secs 5 --telemetry-secs 2 --steady-secs 10 \
  --bundle "$work/cls.bundle" --stages 10:0,50:0,100:0 --rollout-timeout-secs 180 \
  --download-sample 25 --burst 10 --server-pid "$pid" > "$work/result.json" 2> "$work/sim.log" || {
  echo "fleet-sim failed:"; tail -20 "$work/sim.log"; exit 1; }
cat "$work/sim.log"
python3 - "$work/result.json" "$devices" <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); n = int(sys.argv[2])
checks = [
    ("every device enrolled", r["enrolled"] == n),
    ("every device connected to the broker", r["mqtt_connected"] == n),
    ("the rollout completed", r["rollout_completed"]),
    ("every device runs the bundle", r["rollout_running"] == n == r["rollout_targets"]),
    ("every sampled download verified", r["downloads_ok"] == r["downloads_attempted"] > 0),
    ("the burst was acknowledged", r["burst_acked"] == 10 * n),
    ("zero messages lost", r["lost"] == 0 and r["ingested_total"] >= r["acked_total"] > 0),
    ("no HTTP errors", r["http_errors"] == 0),
]
bad = [name for name, ok in checks if not ok]
for name, ok in checks:
    print(("ok   " if ok else "FAIL ") + name)
if bad:
    print(json.dumps(r, indent=2))
    sys.exit(1)
PY
