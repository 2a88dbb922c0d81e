#!/usr/bin/env bash
# Inference latency of two edge-agent builds of the same tree (e.g. the
# `dist` profile against a size-optimized one), side by side with ONNX
# Runtime in the same invocation. Used for the size decisions in
# docs/binary-size.md.
#
#   scripts/bench-profiles.sh AGENT_A AGENT_B [FLEETCTL]
#
# Prints, per model, the median latency of each build (bare tract and the
# agent's in-process path), ORT's, and B/A.
set -euo pipefail
cd "$(dirname "$0")/.."
a=${1:?usage: AGENT_A AGENT_B [FLEETCTL]}
b=${2:?usage: AGENT_A AGENT_B [FLEETCTL]}
fleetctl=${3:-}
if [[ -z "$fleetctl" ]]; then
  cargo build --locked -q -p fleetctl --bin fleetctl
  fleetctl="$(cargo metadata --format-version 1 --no-deps \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/debug/fleetctl"
fi
scale=${ITER_SCALE:-1}
work=$(mktemp -d -t edgefleet-profiles.XXXXXX)
trap 'rm -rf "$work"' EXIT
"$fleetctl" keygen --out "$work/k" >/dev/null

models=(
  "cls|models/cls/ch_ppocr_mobile_v2.0_cls_infer.onnx|models/cls|300"
  "rec|models/rec/ch_PP-OCRv4_rec_infer.onnx|models/rec|40"
  "cls-int8|models/cls-int8/cls_int8.onnx|models/cls-int8|40"
)
median() { python3 -c 'import json,sys; print("%.3f" % json.load(sys.stdin)["median_ms"])'; }
printf '%-9s %-11s %9s %9s %9s %7s %7s\n' model mode "A ms" "B ms" "ORT ms" "B/A" "B/ORT"
for spec in "${models[@]}"; do
  IFS='|' read -r name model dir iters <<<"$spec"
  iters=$(python3 -c "print(max(5, int($iters * $scale)))")
  "$fleetctl" bundle pack --model "$model" --name "$name" --version 1.0.0 --sequence 1 \
    --golden-inputs "$dir/golden/in_0.npz" --golden-outputs "$dir/golden/out_0.npz" \
    --key "$work/k.key" --out "$work/$name.bundle" >/dev/null
  ort=$(python3 scripts/bench_ort.py --model "$model" --inputs "$dir/golden/in_0.npz" --iterations "$iters" | median)
  for mode in bare in-process; do
    # Interleaved A, B, A, B: drift in machine load hits both alike.
    ta=() tb=()
    for _ in 1 2; do
      ta+=("$("$a" bench --bundle "$work/$name.bundle" --trust "$work/k.pub" --iterations "$iters" --mode "$mode" --json | median)")
      tb+=("$("$b" bench --bundle "$work/$name.bundle" --trust "$work/k.pub" --iterations "$iters" --mode "$mode" --json | median)")
    done
    python3 - "$name" "$mode" "$ort" "${ta[@]}" "${tb[@]}" <<'PY'
import sys
name, mode, ort = sys.argv[1], sys.argv[2], float(sys.argv[3])
ta, tb = map(float, sys.argv[4:6]), map(float, sys.argv[6:8])
a, b = min(ta), min(tb)
print(f"{name:<9} {mode:<11} {a:9.3f} {b:9.3f} {ort:9.3f} {b / a:6.2f}x {b / ort:6.2f}x")
PY
  done
done
