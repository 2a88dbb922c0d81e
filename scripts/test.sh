#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit, property and end-to-end tests.
# README's second command; .ci/run calls exactly this after installing deps.
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s)
stage() { echo "==> $* (at $(( $(date +%s) - t0 )) s)"; }

stage "cargo fmt --check"
cargo fmt --all -- --check

stage "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

stage "cargo deny (advisories, bans, licenses, sources)"
scripts/deny.sh

stage "fleet-server links no tract (cargo tree)"
if cargo tree --locked -p fleet-server -e normal,build --prefix none | grep -q '^tract'; then
  echo "fleet-server depends on tract:" >&2
  cargo tree --locked -p fleet-server -e normal,build -i tract-core >&2 || true
  exit 1
fi

stage "cargo test"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# Every test binary runs even after a failure; the exit code reports it.
test_failed=0
cargo test --workspace --locked --no-fail-fast 2>&1 | tee "$log" || test_failed=1

# The fleet simulator's small run: 500 devices on the real protocol, a
# rollout to all of them, a telemetry burst; zero loss (scripts/fleet-scale.sh
# is the full-size run, by hand).
sim_failed=0
stage "scripts/fleet-sim-check.sh (500 simulated devices)"
if EDGEFLEET_BIN_DIR="${CARGO_TARGET_DIR:-$PWD/target}/debug" scripts/fleet-sim-check.sh 2>&1 | tee -a "$log"; then
  echo "test result: ok. 1 passed; 0 failed; (fleet-sim 500 devices)" >> "$log"
else
  echo "test result: FAILED. 0 passed; 1 failed; (fleet-sim 500 devices)" >> "$log"
  sim_failed=1
fi

# The ARM agent under QEMU, end to end (one size-optimized release build per
# target; EDGEFLEET_SKIP_QEMU=1 skips it on machines without the cross tools).
qemu_failed=0
if [ "${EDGEFLEET_SKIP_QEMU:-0}" != 1 ]; then
  # The host side (fleet-server) from the test build above: a separate
  # `cargo build` would resolve other features and rebuild every dependency.
  export EDGEFLEET_BIN_DIR="${CARGO_TARGET_DIR:-$PWD/target}/debug"
  # aarch64: the full agent (rpi4, rpi5, Jetson Orin, qemu-virt ship it);
  # armv7: the NNEF-only agent that targets/rpi3.toml ships.
  for run in "aarch64-unknown-linux-gnu" "armv7-unknown-linux-gnueabihf --nnef-only"; do
    stage "scripts/qemu-test.sh $run"
    # shellcheck disable=SC2086 # $run is a target and its options
    if scripts/qemu-test.sh $run 2>&1 | tee -a "$log"; then
      echo "test result: ok. 1 passed; 0 failed; (qemu $run)" >> "$log"
    else
      echo "test result: FAILED. 0 passed; 1 failed; (qemu $run)" >> "$log"
      qemu_failed=1
    fi
  done
else
  echo "==> QEMU runs SKIPPED (EDGEFLEET_SKIP_QEMU=1)"
fi

stage "done"
# One closing line over every test binary (cargo prints one per binary).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed;?$/) p += $(i-1); if ($i ~ /^failed;?$/) f += $(i-1) } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
[ "$test_failed" = 0 ] && [ "$qemu_failed" = 0 ] && [ "$sim_failed" = 0 ]
