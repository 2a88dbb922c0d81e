#!/usr/bin/env bash
# The ARM agent, end to end, under user-mode QEMU:
#
#   scripts/qemu-test.sh TARGET [--nnef-only]
#       TARGET: aarch64-unknown-linux-gnu, armv7-unknown-linux-gnueabihf,
#               aarch64-unknown-linux-musl
#
# --nnef-only tests the agent built without the ONNX front end: the rollout
# carries the NNEF form of the model, and the agent must refuse the ONNX
# bundle with a clear error.
#
# 1. cross-builds the agent (the size-optimized `dist` profile that ships);
# 2. starts a real fleet server with its embedded MQTT broker on the host;
# 3. runs the ARM agent under qemu-user: it enrolls, receives a rollout,
#    downloads, verifies, self-tests, swaps, serves /v1/infer and reports
#    over MQTT;
# 4. checks the ARM outputs against the x86 agent's and the ONNX Runtime
#    references, within the bundle's tolerance.
#
# Exits non-zero on any failure; logs stay in the printed work dir.
# EDGEFLEET_BIN_DIR=DIR takes the host fleet-server/fleetctl/edge-agent from
# DIR instead of building them (scripts/test.sh passes its test build).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
target=${1:?usage: scripts/qemu-test.sh TARGET [--nnef-only]}
variant=${2:-}
case $variant in
  "") build_args=() ; pack_args=() ;;
  --nnef-only) build_args=(--nnef-only) ; pack_args=(--nnef) ;;
  *) echo "unknown option $variant" >&2; exit 2 ;;
esac
tolerance=1e-4

case $target in
  aarch64-unknown-linux-gnu) qemu=(qemu-aarch64-static -L /usr/aarch64-linux-gnu) ;;
  armv7-unknown-linux-gnueabihf) qemu=(qemu-arm-static -L /usr/arm-linux-gnueabihf) ;;
  aarch64-unknown-linux-musl) qemu=(qemu-aarch64-static) ;;
  *) echo "unknown target $target" >&2; exit 2 ;;
esac

label="$target${variant:+ $variant}"
step() { printf '\n==> [%s] %s\n' "$label" "$*"; }
fail() { printf '\nQEMU TEST FAILED (%s): %s\nlogs: %s\n' "$label" "$*" "${work:-?}" >&2; exit 1; }

step "cross-building the agent"
scripts/cross-build.sh "$target" --release "${build_args[@]}"
arm_agent="${CARGO_TARGET_DIR:-$root/target}/$target/dist/edge-agent"
step "host tools"
if [ -n "${EDGEFLEET_BIN_DIR:-}" ]; then
  bin=$EDGEFLEET_BIN_DIR   # binaries of the test build (tests/demo.rs, test.sh)
else
  cargo build --locked -q -p fleet-server -p fleetctl -p edge-agent --bins
  bin="${CARGO_TARGET_DIR:-$root/target}/debug"
fi
fleetctl="$bin/fleetctl"

work=$(mktemp -d -t edgefleet-qemu.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT
cd "$work"
mkdir -p logs

"${qemu[@]}" "$arm_agent" --version | tee logs/version.txt | grep -q edge-agent \
  || fail "the ARM binary does not run under qemu"
if [ -n "$variant" ]; then
  grep -q "an NNEF-only build" logs/version.txt || fail "not an NNEF-only build: $(cat logs/version.txt)"
fi

"$fleetctl" keygen --out release >/dev/null
token=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
cat > fleet-server.toml <<EOF
data_dir = "$work/server"
rollout_tick_ms = 500
[http]
listen = "127.0.0.1:0"
[trust]
keys = ["$work/release.pub"]
[auth]
enrollment_tokens = ["enroll-$token"]
[[auth.tokens]]
name = "ci"
role = "admin"
token = "$token"
[mqtt]
listen = "127.0.0.1:0"
EOF
step "fleet server (x86) with its embedded broker"
"$bin/fleet-server" --config fleet-server.toml > logs/server.out 2> logs/server.log &
pids+=($!)
for _ in $(seq 100); do grep -q "listening on" logs/server.out 2>/dev/null && break; sleep 0.1; done
server=$(grep -o 'http://[0-9.:]*' logs/server.out | head -1)
mqtt=$(grep -o 'mqtt://[0-9.:]*' logs/server.out | head -1)
[ -n "$server" ] && [ -n "$mqtt" ] || fail "server did not start"
export FLEETCTL_SERVER="$server" FLEETCTL_TOKEN="$token"

step "packing the classifier for x86_64, aarch64 and armv7"
golden=()
for i in 0 1 2 3; do
  golden+=(--golden-inputs "$root/models/cls/golden/in_$i.npz" --golden-outputs "$root/models/cls/golden/out_$i.npz")
done
"$fleetctl" bundle pack --model "$root/models/cls/ch_ppocr_mobile_v2.0_cls_infer.onnx" \
  --name cls --version 1.0.0 --sequence 1 "${golden[@]}" --tolerance "$tolerance" \
  --key release.key "${pack_args[@]}" --out cls.bundle >/dev/null
id=$("$fleetctl" bundle push cls.bundle --json | grep -o '"id": *"[0-9a-f]\{64\}"' | grep -o '[0-9a-f]\{64\}')

cat > agent.toml <<EOF
device_id = "qemu-1"
data_dir = "$work/agent"
[tags]
board = "qemu-virt"
[server]
url = "$server"
enrollment_token = "enroll-$token"
poll_interval_secs = 2
report_interval_secs = 2
timeout_secs = 60
[trust]
keys = ["$work/release.pub"]
[http]
listen = "127.0.0.1:0"
[mqtt]
url = "$mqtt"
telemetry_interval_secs = 2
[update]
watch_secs = 5
EOF
step "the ARM agent under ${qemu[0]}"
EDGE_AGENT_LOG=edge_agent=info "${qemu[@]}" "$arm_agent" run --config agent.toml \
  > logs/agent.out 2> logs/agent.log &
pids+=($!)
for _ in $(seq 600); do grep -q "listening on" logs/agent.out 2>/dev/null && break; sleep 0.1; done
agent=$(grep -o 'http://[0-9.:]*' logs/agent.out | head -1)
[ -n "$agent" ] || fail "the ARM agent did not start (logs/agent.log)"

step "rollout: enroll, download, verify, self-test, swap, watch, commit"
"$fleetctl" rollout create --bundle "$id" --stages 100:0 >/dev/null
deadline=$(($(date +%s) + 600))
until [ "$("$fleetctl" devices list --state committed --version 1.0.0 | tail -n +2 | grep -c qemu-1 || true)" -eq 1 ]; do
  [ "$(date +%s)" -lt "$deadline" ] || { "$fleetctl" devices list; fail "the ARM agent did not commit the bundle"; }
  sleep 2
done
"$fleetctl" devices list

step "inference on the ARM agent vs. x86 and ONNX Runtime"
"$bin/edge-agent" load --url "$agent" --input "$root/models/cls/golden/in_0.npz" --rps 2 --seconds 3 \
  | tee logs/load.txt
grep -q "200: " logs/load.txt || fail "/v1/infer did not answer 200"
for i in 0 1 2 3; do
  "$bin/edge-agent" infer --bundle cls.bundle --trust release.pub \
    --inputs "$root/models/cls/golden/in_$i.npz" --outputs "x86_$i.npz" >/dev/null
  "${qemu[@]}" "$arm_agent" infer --bundle cls.bundle --trust release.pub \
    --inputs "$root/models/cls/golden/in_$i.npz" --outputs "arm_$i.npz" >/dev/null
done
# The served path too: each golden input over the ARM agent's HTTP API.
for i in 0 1 2 3; do
  "$bin/edge-agent" load --url "$agent" --input "$root/models/cls/golden/in_$i.npz" \
    --rps 1 --seconds 2 --output "served_$i.npz" >/dev/null
  [ -s "served_$i.npz" ] || fail "case $i: no answer from the ARM agent's /v1/infer"
  "$bin/edge-agent" compare "served_$i.npz" "$root/models/cls/golden/out_$i.npz" --tolerance "$tolerance" \
    || fail "case $i: served ARM output differs from the ONNX Runtime reference"
done
for i in 0 1 2 3; do
  "$bin/edge-agent" compare "arm_$i.npz" "x86_$i.npz" --tolerance "$tolerance" \
    || fail "case $i: ARM and x86 outputs differ"
  "$bin/edge-agent" compare "arm_$i.npz" "$root/models/cls/golden/out_$i.npz" --tolerance "$tolerance" \
    || fail "case $i: ARM output differs from the ONNX Runtime reference"
done

if [ -n "$variant" ]; then
  step "the NNEF-only agent refuses an ONNX bundle"
  "$fleetctl" bundle pack --model "$root/models/cls/ch_ppocr_mobile_v2.0_cls_infer.onnx" \
    --name cls --version 1.0.1 --sequence 2 "${golden[@]}" --tolerance "$tolerance" \
    --key release.key --out cls-onnx.bundle >/dev/null
  if "${qemu[@]}" "$arm_agent" infer --bundle cls-onnx.bundle --trust release.pub \
    --inputs "$root/models/cls/golden/in_0.npz" --outputs onnx_0.npz > logs/onnx.out 2> logs/onnx.err; then
    fail "the NNEF-only agent ran an ONNX bundle"
  fi
  cat logs/onnx.err
  grep -q "built without ONNX support" logs/onnx.err || fail "no clear error for the ONNX bundle"
fi

step "MQTT: the server saw the ARM device online with telemetry"
deadline=$(($(date +%s) + 60))
until "$fleetctl" devices list --json | tr -d ' \n' | grep -q '"online":true'; do
  [ "$(date +%s)" -lt "$deadline" ] || fail "no MQTT state from the ARM agent"
  sleep 1
done
until "$fleetctl" devices list --json | tr -d ' \n' | grep -q '"telemetry":{'; do
  [ "$(date +%s)" -lt "$deadline" ] || fail "no MQTT telemetry from the ARM agent"
  sleep 1
done
grep -q "committed" <("$fleetctl" devices list --json) || fail "no committed state reported"

if [ -n "$variant" ]; then
  step "an ONNX rollout to the NNEF-only agent: refused, reported, v1 keeps serving"
  onnx_id=$("$fleetctl" bundle push cls-onnx.bundle --json | grep -o '"id": *"[0-9a-f]\{64\}"' | grep -o '[0-9a-f]\{64\}')
  "$fleetctl" rollout create --bundle "$onnx_id" --stages 100:0 >/dev/null
  deadline=$(($(date +%s) + 300))
  until "$fleetctl" devices list --json | grep -q "built without ONNX support"; do
    [ "$(date +%s)" -lt "$deadline" ] || { "$fleetctl" devices list --json; fail "no report of the refused ONNX bundle"; }
    sleep 2
  done
  "$fleetctl" devices list
  "$fleetctl" devices list --json | tr -d ' \n' | grep -q '"state":"failed"' \
    || fail "the refused ONNX bundle did not leave the device in state failed"
  "$bin/edge-agent" load --url "$agent" --input "$root/models/cls/golden/in_0.npz" \
    --rps 1 --seconds 2 --output served_after.npz >/dev/null
  "$bin/edge-agent" compare served_after.npz "$root/models/cls/golden/out_0.npz" --tolerance "$tolerance" \
    || fail "the active NNEF model stopped serving after the refused ONNX rollout"
fi

size=$(stat -c %s "$arm_agent")
step "ok: $(cat logs/version.txt) on $target, $((size / 1024)) KiB stripped, outputs match x86 and ORT within $tolerance"
echo "QEMU TEST OK ($label)"
