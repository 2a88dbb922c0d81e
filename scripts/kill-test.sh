#!/usr/bin/env bash
# Crash-safety harness: SIGKILL a real `edge-agent run` N times at points
# of an update (download, verify, self-test, swap, watch, commit), restart
# it, and check the invariants (tests/kill.rs). Usage: scripts/kill-test.sh [N]
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-50}"
KILL_ITERATIONS="$n" cargo test -p edgefleet-integ --test kill -- --nocapture
