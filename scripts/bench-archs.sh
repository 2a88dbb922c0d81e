#!/usr/bin/env bash
# Common architectures models/ does not hold (scripts/make_arch_models.py:
# ResNet-18, MobileNetV2, ShuffleNet V2, SqueezeNet, a transformer encoder,
# a temporal convolution network with a GRU), each packed as a device gets
# it (the packer checks its outputs against ONNX Runtime's), then timed in
# one invocation: the agent in-process and bare tract against ONNX Runtime,
# one thread, the same input; and the cold start (verify + load + optimize
# + first inference) against ORT's session creation + first inference,
# medians of fresh processes, alternating. Prints the table and rewrites
# docs/architectures.md with the machine it ran on.
#
#   scripts/bench-archs.sh                    # every architecture
#   ONLY="resnet18 encoder" scripts/bench-archs.sh
#   ITER_SCALE=0.3 COLD_RUNS=3 scripts/bench-archs.sh   # quicker
#   PROFILE=1 scripts/bench-archs.sh          # also per-op profiles of both
#
# These models use random weights with the published layer shapes: the
# time of an inference does not depend on the weights' values.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/bench_common.sh
. scripts/bench_common.sh
bench_setup archs
# shellcheck disable=SC2086
python3 scripts/make_arch_models.py --out "$work/models" ${ONLY:+--only $ONLY}
"$fleetctl" keygen --out "$work/k" >/dev/null

for dir in "$work"/models/*/; do
  name=$(basename "$dir")
  bundle="$work/$name.bundle"
  # The packer's tolerance is absolute; logits of random-weight backbones
  # reach the hundreds, where summing in another order moves the last
  # bits: 1e-5 of the largest output (at least the default, 1e-4).
  tolerance=$(python3 -c "import numpy as np; d=np.load('$dir/out.npz'); print(max(1e-4, 1e-5 * max(float(np.abs(v).max()) for v in d.values())))")
  "$fleetctl" bundle pack --model "$dir/model.onnx" --name "$name" --version 1.0.0 --sequence 1 \
    --golden-inputs "$dir/in.npz" --golden-outputs "$dir/out.npz" --key "$work/k.key" \
    --tolerance "$tolerance" --out "$bundle" >"$work/$name.pack" 2>&1 || {
    cat "$work/$name.pack" >&2
    echo "$name: the packer refused it (above)" >&2
    exit 1
  }
  # About two seconds of inference per mode.
  probe=$("$agent" bench --bundle "$bundle" --trust "$work/k.pub" --iterations 3 --json --mode bare |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["median_ms"])')
  iters=$(python3 -c "print(max(5, min(2000, int(2000 / max($probe, 0.01) * $scale))))")
  echo "==> $name ($iters iterations)"
  for mode in in-process bare; do
    "$agent" bench --bundle "$bundle" --trust "$work/k.pub" --iterations "$iters" --json --mode "$mode" |
      record "$name" ""
  done
  python3 scripts/bench_ort.py --model "$dir/model.onnx" --inputs "$dir/in.npz" --iterations "$iters" |
    record "$name" ""
  for ((run = 0; run < ${COLD_RUNS:-5}; run++)); do
    "$agent" bench --bundle "$bundle" --trust "$work/k.pub" --iterations 1 --json --mode in-process |
      record "$name" cold
    python3 scripts/bench_ort.py --model "$dir/model.onnx" --inputs "$dir/in.npz" --iterations 1 --warmup 0 |
      record "$name" cold
  done
  if [ -n "${PROFILE:-}" ]; then
    "$agent" bench --bundle "$bundle" --trust "$work/k.pub" --iterations "$iters" --json --mode bare --profile 8 |
      record "$name" profile
    python3 scripts/bench_ort.py --model "$dir/model.onnx" --inputs "$dir/in.npz" --iterations "$iters" --profile 8 |
      record "$name" profile
  fi
done

python3 scripts/bench_archs_report.py "$results" docs/architectures.md
