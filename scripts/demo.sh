#!/usr/bin/env bash
# The edgefleet demo: a real fleet server (embedded MQTT broker, sled store),
# 8 real agent processes on 4 board types, real models, and three releases:
#
#   v1  the PP-OCR text-orientation classifier (ONNX), rolled out to 100 %;
#   v2  the same model as tract NNEF (faster start), canary 25 → 50 → 100 %;
#   v3  a release that passes its self-test but is slow in production (the
#       agents' test-only latency fault for cls@3.0.0): the canary devices
#       roll back on their own, the rollout auto-pauses with its reason, and
#       the fleet stays on v2.
#
# Exits non-zero if any step does not happen as described. Logs stay in the
# printed work dir. Ctrl-C stops everything.
#
# Environment: DEMO_QUIET=1 prints less (CI); DEMO_TLS=1 runs everything
# over TLS with a demo CA made by openssl: HTTPS API, mqtts broker, and
# device client certificates the server requires (each names its device);
# CARGO_TARGET_DIR is honoured;
# EDGEFLEET_BIN_DIR=DIR uses fleet-server, fleetctl and edge-agent from DIR
# instead of building them (the tests pass their own build).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

quiet="${DEMO_QUIET:-0}"
tls="${DEMO_TLS:-0}"
step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
fail() { printf '\nDEMO FAILED: %s\n(logs: %s)\n' "$*" "${work:-?}" >&2; exit 1; }

step "building fleet-server, fleetctl and edge-agent"
if [ -n "${EDGEFLEET_BIN_DIR:-}" ]; then
  bin=$EDGEFLEET_BIN_DIR   # binaries of the test build (tests/demo.rs, test.sh)
else
  cargo build --locked -q -p fleet-server -p fleetctl -p edge-agent --bins --features edge-agent/testing
  bin="${CARGO_TARGET_DIR:-$root/target}/debug"
fi
fleetctl="$bin/fleetctl"
for b in fleet-server fleetctl edge-agent; do
  [ -x "$bin/$b" ] || fail "missing $bin/$b"
done

work=$(mktemp -d -t edgefleet-demo.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'echo; echo "interrupted; logs in $work"; exit 130' INT TERM
started=$(date +%s)
cd "$work"
mkdir -p logs agents

step "two release keys; devices and server require both signatures (threshold 2)"
"$fleetctl" keygen --out release-a >/dev/null
"$fleetctl" keygen --out release-b >/dev/null
echo "release-a.pub, release-b.pub in $work"

http_tls="" mqtt_tls="" agent_server_tls="" agent_mqtt_tls="" sub_tls=""
if [ "$tls" = 1 ]; then
  step "TLS: a demo CA, the server's certificate and one client certificate per device"
  command -v openssl >/dev/null || fail "DEMO_TLS=1 needs openssl"
  newkey=(-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes)
  openssl req -x509 "${newkey[@]}" -keyout ca.key -out ca.pem -days 30 -subj "/CN=edgefleet demo CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
  issue() { # name subjectAltName extendedKeyUsage
    openssl req "${newkey[@]}" -keyout "$1.key" -out "$1.csr" -subj "/CN=$1" 2>/dev/null
    printf 'subjectAltName=%s\nextendedKeyUsage=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n' "$2" "$3" > "$1.ext"
    openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days 30 \
      -extfile "$1.ext" -out "$1.pem" 2>/dev/null
  }
  issue server "IP:127.0.0.1,DNS:localhost" serverAuth
  for i in $(seq 1 8); do issue "dev-$i" "DNS:dev-$i" clientAuth; done
  http_tls="tls_cert = \"$work/server.pem\"
tls_key = \"$work/server.key\"
client_ca = \"$work/ca.pem\"
device_certs = \"required\""
  mqtt_tls="tls_cert = \"$work/server.pem\"
tls_key = \"$work/server.key\""
  agent_mqtt_tls="ca_file = \"$work/ca.pem\""
  sub_tls="--cafile $work/ca.pem "
  export FLEETCTL_CA_FILE="$work/ca.pem"
  echo "ca.pem, server.pem, dev-1.pem … dev-8.pem in $work"
fi

token=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
enroll=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
cat > fleet-server.toml <<EOF
data_dir = "$work/server"
rollout_tick_ms = 1000
[http]
listen = "127.0.0.1:0"
$http_tls
[trust]
keys = ["$work/release-a.pub", "$work/release-b.pub"]
threshold = 2
[auth]
enrollment_tokens = ["$enroll"]
[[auth.tokens]]
name = "demo-operator"
role = "admin"
token = "$token"
[mqtt]
listen = "127.0.0.1:0"
$mqtt_tls
EOF

step "fleet server with its embedded MQTT broker"
"$bin/fleet-server" --config fleet-server.toml > logs/server.out 2> logs/server.log &
pids+=($!)
for _ in $(seq 100); do
  grep -q "listening on" logs/server.out 2>/dev/null && break
  sleep 0.1
done
server=$(grep -o 'https\?://[0-9.:]*' logs/server.out | head -1)
mqtt=$(grep -o 'mqtts\?://[0-9.:]*' logs/server.out | head -1)
[ -n "$server" ] && [ -n "$mqtt" ] || fail "the server did not start (logs/server.log)"
export FLEETCTL_SERVER="$server" FLEETCTL_TOKEN="$token"
hp=${mqtt#*://}
mqtt_host=${hp%:*}
mqtt_port=${hp##*:}
echo "API $server, broker $mqtt"
echo "console $server/ui/ (log in with the operator token: $token)"

# Stages take their share of every board type: 3 rpi4 + 3 rpi5 + 2 orin
# gives 3 devices at 25 %, 5 at 50 %, 8 at 100 %.
boards=(rpi4 rpi4 rpi4 rpi5 rpi5 rpi5 jetson-orin jetson-orin)
step "8 agents (each its own data dir, port and board tag), enrolling"
for i in $(seq 1 8); do
  id="dev-$i"
  mkdir -p "agents/$id"
  if [ "$tls" = 1 ]; then
    agent_server_tls="ca_file = \"$work/ca.pem\"
client_cert_file = \"$work/$id.pem\"
client_key_file = \"$work/$id.key\""
  fi
  cat > "agents/$id/agent.toml" <<EOF
device_id = "$id"
data_dir = "$work/agents/$id/state"
[tags]
board = "${boards[$((i - 1))]}"
[server]
url = "$server"
enrollment_token = "$enroll"
poll_interval_secs = 2
report_interval_secs = 1
$agent_server_tls
[trust]
keys = ["$work/release-a.pub", "$work/release-b.pub"]
threshold = 2
[http]
listen = "127.0.0.1:0"
[mqtt]
url = "$mqtt"
telemetry_interval_secs = 2
$agent_mqtt_tls
[update]
watch_secs = 6
watch_inferences = 1000000
watch_min_inferences = 15
# 8 agents and their load share 2 cores here: be tolerant of scheduling noise.
max_p95_ratio = 3.0
p95_slack_ms = 20.0
[testing]
# Test-only fault: every live inference of cls 3.0.0 takes 150 ms longer.
inject_latency_ms = { "cls@3.0.0" = 150 }
EOF
  EDGE_AGENT_LOG=edge_agent=info "$bin/edge-agent" run --config "agents/$id/agent.toml" \
    > "logs/$id.out" 2> "logs/$id.log" &
  pids+=($!)
done
urls=()
for i in $(seq 1 8); do
  for _ in $(seq 100); do
    grep -q "listening on" "logs/dev-$i.out" 2>/dev/null && break
    sleep 0.1
  done
  u=$(grep -o 'http://[0-9.:]*' "logs/dev-$i.out" | head -1)
  [ -n "$u" ] || fail "agent dev-$i did not start (logs/dev-$i.log)"
  urls+=("$u")
done
for _ in $(seq 100); do
  [ "$("$fleetctl" devices list | tail -n +2 | grep -c dev-)" -eq 8 ] && break
  sleep 0.2
done
"$fleetctl" devices list

# Local apps: each agent gets a steady 10 inferences per second.
for u in "${urls[@]}"; do
  "$bin/edge-agent" load --url "$u" --input "$root/models/cls/golden/in_0.npz" --rps 10 \
    >> logs/load.out 2>&1 &
  pids+=($!)
done

golden=()
for i in 0 1 2 3; do
  golden+=(--golden-inputs "$root/models/cls/golden/in_$i.npz" --golden-outputs "$root/models/cls/golden/out_$i.npz")
done
pack() { # version sequence extra-args...
  local v=$1 seq=$2
  shift 2
  "$fleetctl" bundle pack --model "$root/models/cls/ch_ppocr_mobile_v2.0_cls_infer.onnx" \
    --name cls --version "$v" --sequence "$seq" "${golden[@]}" \
    --key release-a.key --key release-b.key --expires-in 30d "$@" --out "cls-$v.bundle" >/dev/null
  "$fleetctl" bundle push "cls-$v.bundle" --json | grep -o '"id": *"[0-9a-f]*"' | head -1 | grep -o '[0-9a-f]\{64\}'
}
count() { # devices matching fleetctl devices list filters
  "$fleetctl" devices list "$@" | tail -n +2 | grep -c dev- || true
}
phase() { # (awk reads everything: no broken pipe for fleetctl)
  "$fleetctl" rollout status "$1" | awk 'NR == 1 {print $NF}'
}
show() { # rollout id
  if [ "$quiet" = 1 ]; then
    printf '  %s  rollout %s  devices on v1/v2/v3: %s/%s/%s\n' "$(date +%T)" "$(phase "$1")" \
      "$(count --version 1.0.0)" "$(count --version 2.0.0)" "$(count --version 3.0.0)"
  else
    printf '\n--- %s ---\n' "$(date +%T)"
    "$fleetctl" rollout status "$1"
    "$fleetctl" devices list
  fi
}
wait_rollout() { # id wanted-phase timeout-seconds
  local id=$1 want=$2 deadline=$(($(date +%s) + $3))
  while :; do
    show "$id"
    [ "$(phase "$id")" = "$want" ] && return 0
    [ "$(date +%s)" -ge "$deadline" ] && return 1
    sleep 3
  done
}

step "v1: pack (ONNX, checked against ONNX Runtime references), push, roll out to 100 %"
v1=$(pack 1.0.0 1)
r1=$("$fleetctl" rollout create --bundle "$v1" --stages 100:0 --json | grep -o '"id": *"[0-9a-f]\{16\}"' | head -1 | grep -o '[0-9a-f]\{16\}')
[ -n "$r1" ] || fail "rollout create failed"
wait_rollout "$r1" COMPLETED 120 || fail "v1 rollout did not complete"
for _ in $(seq 60); do
  [ "$(count --version 1.0.0 --state committed)" -eq 8 ] && break
  sleep 1
done
[ "$(count --version 1.0.0 --state committed)" -eq 8 ] || fail "not every device committed v1"
echo "all 8 devices run and committed cls 1.0.0"

step "v2: the NNEF form of the same model; canary 25 % → 50 % → 100 % (15 s bakes)"
v2=$(pack 2.0.0 2 --nnef)
r2=$("$fleetctl" rollout create --bundle "$v2" --stages 25:15s,50:15s,100:0 \
  --max-rollback-pct 20 --max-error-rate 0.05 --json | grep -o '"id": *"[0-9a-f]\{16\}"' | head -1 | grep -o '[0-9a-f]\{16\}')
wait_rollout "$r2" COMPLETED 180 || fail "v2 rollout did not complete"
for _ in $(seq 60); do
  [ "$(count --version 2.0.0 --state committed)" -eq 8 ] && break
  sleep 1
done
[ "$(count --version 2.0.0 --state committed)" -eq 8 ] || fail "not every device committed v2"
echo "all 8 devices run and committed cls 2.0.0"

step "v3: passes its self-test, slow in production; canary 25 % → 50 % → 100 %"
v3=$(pack 3.0.0 3)
r3=$("$fleetctl" rollout create --bundle "$v3" --stages 25:30s,50:30s,100:0 \
  --max-rollback-pct 20 --json | grep -o '"id": *"[0-9a-f]\{16\}"' | head -1 | grep -o '[0-9a-f]\{16\}')
wait_rollout "$r3" PAUSED 120 || fail "the v3 rollout did not auto-pause"
step "the rollout paused itself; its recorded reason:"
"$fleetctl" rollout status "$r3" | tee logs/v3-rollout.txt
grep -q "max_rollback_pct" logs/v3-rollout.txt || fail "the pause does not name the gate"
for _ in $(seq 30); do
  [ "$(count --state rolled_back --version 2.0.0)" -ge 1 ] && [ "$(count --version 2.0.0)" -eq 8 ] && break
  sleep 1
done
rolled=$(count --state rolled_back --version 2.0.0)
[ "$rolled" -ge 1 ] || fail "no canary device rolled back on its own"
[ "$(count --version 2.0.0)" -eq 8 ] || fail "the fleet is not back on v2"
[ "$(count --version 3.0.0)" -eq 0 ] || fail "a device still serves v3"
"$fleetctl" devices list --state rolled_back
grep -h "rolled_back\|RolledBack" logs/dev-*.log | grep -o 'reason=.*' | head -3 || true

elapsed=$(( $(date +%s) - started ))
step "summary"
cat <<EOF
- 8 agents enrolled with one enrollment token and got their own credentials.
- v1 (ONNX) rolled out to all 8 and was committed after each device's health watch.
- v2 (NNEF) went 25 % → 50 % → 100 %, each stage gated on the devices' health.
- v3 passed its self-test everywhere it was tried, then ran 150 ms slower in
  production: $rolled canary device(s) rolled back on their own, the rollout paused
  itself on max_rollback_pct, and all 8 devices serve cls 2.0.0.
- Took ${elapsed} s after the build.$( [ "$tls" = 1 ] && printf '\n- Over TLS: HTTPS API and mqtts broker (demo CA), each device with its own\n  client certificate, which the server required.' )

Logs: $work/logs (server.log, dev-N.log, load.out)
Watch it in the web console while it runs: $server/ui/ (token $token).
Watch the topics while it runs (any user name, the operator token as password):
  mosquitto_sub ${sub_tls}-h $mqtt_host -p $mqtt_port -u demo -P $token -v -t 'edgefleet/v1/#'
DEMO OK
EOF
