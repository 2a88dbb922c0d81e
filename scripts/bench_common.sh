# shellcheck shell=bash
# What the benchmark scripts (bench-inference.sh, bench-archs.sh) share,
# sourced from the repository's root after `set -euo pipefail`:
#   bench_setup NAME   installs scripts/requirements.txt, builds edge-agent
#                      and fleetctl (release), and sets $target_dir, $agent,
#                      $fleetctl, $work (a temporary directory removed on
#                      exit), $results (the JSON lines the report reads) and
#                      $scale (ITER_SCALE, 1 by default)
#   record BENCH LEVER appends the JSON object on stdin to $results,
#                      tagged with the benchmark's name and lever

bench_setup() {
  python3 -m pip install -q -r scripts/requirements.txt

  echo "==> building edge-agent and fleetctl (release)"
  cargo build --release --locked -p edge-agent -p fleetctl --bin edge-agent --bin fleetctl
  target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
  agent="$target_dir/release/edge-agent"
  fleetctl="$target_dir/release/fleetctl"

  work=$(mktemp -d -t "edgefleet-$1.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  results="$work/results.jsonl"
  scale=${ITER_SCALE:-1}
}

record() { # bench lever
  python3 -c "import json,sys; d=json.load(sys.stdin); d['bench']='$1'; d['lever']='$2'; print(json.dumps(d))" >>"$results"
}
