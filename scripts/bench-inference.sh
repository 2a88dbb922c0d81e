#!/usr/bin/env bash
# Inference benchmarks, one invocation, every model in models/:
#   the agent in-process path, its HTTP path (JSON and npz), bare tract,
#   and ONNX Runtime (1 thread) as the reference.
# Prints ratios and regenerates docs/benchmarks.md with the machine info.
#
#   scripts/bench-inference.sh            # full run
#   ITER_SCALE=0.2 scripts/bench-inference.sh   # quicker, fewer iterations
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

python3 -m pip install -q -r scripts/requirements.txt

echo "==> building edge-agent and fleetctl (release)"
cargo build --release --locked -p edge-agent -p fleetctl --bin edge-agent --bin fleetctl
target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
agent="$target_dir/release/edge-agent"
fleetctl="$target_dir/release/fleetctl"

work=$(mktemp -d -t edgefleet-bench.XXXXXX)
trap 'rm -rf "$work"' EXIT
"$fleetctl" keygen --out "$work/bench" >/dev/null
results="$work/results.jsonl"
scale=${ITER_SCALE:-1}

# name | model | golden dir | cases | iterations | extra pack flags
models=(
  "cls|models/cls/ch_ppocr_mobile_v2.0_cls_infer.onnx|models/cls|4|300|"
  "cls-nnef|models/cls/ch_ppocr_mobile_v2.0_cls_infer.onnx|models/cls|4|300|--nnef"
  "rec|models/rec/ch_PP-OCRv4_rec_infer.onnx|models/rec|2|40|"
  "rec-nnef|models/rec/ch_PP-OCRv4_rec_infer.onnx|models/rec|2|40|--nnef"
  "cls-int8|models/cls-int8/cls_int8.onnx|models/cls-int8|4|40|"
  "multi|models/multi/multi_io.onnx|models/multi|2|2000|"
)

for spec in "${models[@]}"; do
  IFS='|' read -r name model dir cases iters flags <<<"$spec"
  iters=$(python3 -c "print(max(5, int($iters * $scale)))")
  golden=()
  for ((i = 0; i < cases; i++)); do
    golden+=(--golden-inputs "$dir/golden/in_$i.npz" --golden-outputs "$dir/golden/out_$i.npz")
  done
  bundle="$work/$name.bundle"
  # shellcheck disable=SC2086
  "$fleetctl" bundle pack --model "$model" --name "${name%-nnef}" --version 1.0.0 --sequence 1 \
    "${golden[@]}" --key "$work/bench.key" $flags --out "$bundle" >/dev/null
  echo "==> $name ($iters iterations)"
  for mode in in-process http-json http-npz bare; do
    "$agent" bench --bundle "$bundle" --trust "$work/bench.pub" --iterations "$iters" --mode "$mode" --json \
      | python3 -c "import json,sys; d=json.load(sys.stdin); d['bench']='$name'; print(json.dumps(d))" >>"$results"
  done
  if [[ "$name" != *-nnef ]]; then
    python3 scripts/bench_ort.py --model "$model" --inputs "$dir/golden/in_0.npz" --iterations "$iters" \
      | python3 -c "import json,sys; d=json.load(sys.stdin); d['bench']='$name'; print(json.dumps(d))" >>"$results"
  fi
done

python3 scripts/bench_report.py "$results" docs/benchmarks.md
