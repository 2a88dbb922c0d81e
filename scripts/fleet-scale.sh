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
#   scripts/fleet-scale.sh                 # 1000 3000 10000
#   SIZES="1000" scripts/fleet-scale.sh    # one size (does not touch docs/)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
sizes=${SIZES:-1000 3000 10000}
target="${CARGO_TARGET_DIR:-$root/target}"
echo "==> release builds of fleet-server and fleet-sim; fleetctl (dev) packs"
cargo build --release --locked -q -p fleet-server -p fleet-sim
cargo build --locked -q -p fleetctl
rel="$target/release"
ulimit -n "$(ulimit -Hn)"
out=$(mktemp -d -t edgefleet-scale.XXXXXX)
pid=""
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null || true; }
trap cleanup EXIT
"$target/debug/fleetctl" keygen --out "$out/release" >/dev/null
"$target/debug/fleetctl" bundle pack --model models/cls/ch_ppocr_mobile_v2.0_cls_infer.onnx \
  --name cls --version 1.0.0 --sequence 1 \
  --golden-inputs models/cls/golden/in_0.npz --golden-outputs models/cls/golden/out_0.npz \
  --key "$out/release.key" --out "$out/cls.bundle" >/dev/null

for n in $sizes; do
  echo "==> $n devices"
  work="$out/n$n"
  mkdir -p "$work"
  token=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
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
[mqtt]
listen = "127.0.0.1:0"
TOML
  FLEET_SERVER_LOG=warn "$rel/fleet-server" --config "$work/fleet-server.toml" > "$work/server.out" 2> "$work/server.log" &
  pid=$!
  for _ in $(seq 100); do grep -q "listening on" "$work/server.out" 2>/dev/null && break; sleep 0.1; done
  http=$(sed -n 's/^fleet-server listening on //p' "$work/server.out")
  mqtt=$(sed -n 's/^mqtt broker at //p' "$work/server.out")
  "$rel/fleet-sim" --server "$http" --mqtt "$mqtt" --token "$token" --enrollment-token "enroll-$token" \
    --devices "$n" --checkin-secs 30 --report-secs 30 --telemetry-secs 10 --steady-secs 60 --telemetry-only-secs 30 \
    --bundle "$out/cls.bundle" --stages 10:0,50:0,100:0 --rollout-timeout-secs 900 \
    --download-sample 50 --burst "${BURST:-5}" --server-pid "$pid" > "$work/result.json" 2> >(tee "$work/sim.log" >&2)
  kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""
  cp "$work/result.json" "$out/result-$n.json"
done
if [ -z "${SIZES:-}" ]; then
  python3 scripts/fleet_scale_report.py "$out" > docs/fleet-scale.md
  echo "==> wrote docs/fleet-scale.md"
else
  python3 scripts/fleet_scale_report.py "$out"
fi
