#!/usr/bin/env bash
# Inference benchmarks, one invocation, every model in models/:
#   the agent in-process path, its HTTP path (JSON and npz), bare tract,
#   and ONNX Runtime as the reference, one thread each; then two threads
#   against ORT's two; per-op profiles of tract and ORT; and tract's
#   tuning levers, each measured against the default in the same run.
# Prints ratios and regenerates docs/benchmarks.md with the machine info.
#
#   scripts/bench-inference.sh                  # full run
#   ITER_SCALE=0.2 scripts/bench-inference.sh   # quicker, fewer iterations
#   COLD_RUNS=15 scripts/bench-inference.sh     # fresh processes per cold-start median (9)
#   LEVER_BUILDS="native dist pgo" scripts/bench-inference.sh   # also rebuild
#       the agent per compiler lever: -C target-cpu=native, the fat-LTO
#       dist profile, PGO trained on cls (any of them; each is a full build,
#       PGO two)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

# shellcheck source=scripts/bench_common.sh
. scripts/bench_common.sh
bench_setup bench
"$fleetctl" keygen --out "$work/bench" >/dev/null

# name | model | golden dir | cases | iterations | extra pack flags
models=(
  "cls|models/cls/ch_ppocr_mobile_v2.0_cls_infer.onnx|models/cls|4|300|"
  "cls-nnef|models/cls/ch_ppocr_mobile_v2.0_cls_infer.onnx|models/cls|4|300|--nnef"
  "rec|models/rec/ch_PP-OCRv4_rec_infer.onnx|models/rec|2|40|"
  "rec-nnef|models/rec/ch_PP-OCRv4_rec_infer.onnx|models/rec|2|40|--nnef"
  "cls-int8|models/cls-int8/cls_int8.onnx|models/cls-int8|4|40|"
  "cls-int8-pw|models/cls-int8-pw/cls_int8_pw.onnx|models/cls-int8-pw|4|100|"
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
  bench() { "$agent" bench --bundle "$bundle" --trust "$work/bench.pub" --iterations "$iters" --json "$@"; }
  for mode in in-process http-json http-npz bare; do
    bench --mode "$mode" | record "$name" ""
  done
  if [[ "$name" != *-nnef ]]; then
    python3 scripts/bench_ort.py --model "$model" --inputs "$dir/golden/in_0.npz" --iterations "$iters" \
      | record "$name" ""
  fi
  # Cold start is one sample per process, and a start takes tens of
  # milliseconds: a scheduler hiccup moves it by half. So it is measured
  # in COLD_RUNS more fresh processes, the agent's and ORT's alternating so
  # both see the same machine, and the report takes medians.
  # An ONNX model is also started as a restarted device starts it: from
  # the decluttered graph it kept when it first loaded the bundle (the
  # first, untimed run here writes it).
  if [[ "$name" != *-nnef ]]; then
    "$agent" bench --bundle "$bundle" --trust "$work/bench.pub" --iterations 1 --json --mode in-process \
      --compiled "$work/compiled" >/dev/null
  fi
  for ((run = 0; run < ${COLD_RUNS:-9}; run++)); do
    "$agent" bench --bundle "$bundle" --trust "$work/bench.pub" --iterations 5 --json --mode in-process \
      | record "$name" "cold"
    if [[ "$name" != *-nnef ]]; then
      "$agent" bench --bundle "$bundle" --trust "$work/bench.pub" --iterations 5 --json --mode in-process \
        --compiled "$work/compiled" | record "$name" "restart"
    fi
    if [[ "$name" != *-nnef ]]; then
      python3 scripts/bench_ort.py --model "$model" --inputs "$dir/golden/in_0.npz" --iterations 5 \
        | record "$name" "cold"
    fi
  done
  case $name in
    cls | rec)
      # Two compute threads against ORT's two; per-op profiles of both.
      bench --mode in-process --threads 2 | record "$name" "threads=2"
      python3 scripts/bench_ort.py --model "$model" --inputs "$dir/golden/in_0.npz" --iterations "$iters" \
        --threads 2 | record "$name" "threads=2"
      bench --mode bare --profile 8 | record "$name" "profile"
      python3 scripts/bench_ort.py --model "$model" --inputs "$dir/golden/in_0.npz" --iterations "$iters" \
        --profile 8 | record "$name" "profile"
      # tract's run-time knobs (read when the plan is optimized), one at a time.
      for knob in TRACT_DISABLE_DIRECT_SPATIAL=1 TRACT_ENABLE_BLOCKED_CONV=1 \
        TRACT_LAZY_IM2COL_MIN_KERNEL=1 TRACT_LAZY_IM2COL_MIN_KERNEL=100 TRACT_AVGPOOL_SEPARABLE=1 \
        EDGEFLEET_DEPTHWISE=tract EDGEFLEET_POINTWISE=tract EDGEFLEET_CONV1X1=tract \
        EDGEFLEET_CONV=tract EDGEFLEET_MAXPOOL=tract; do
        env "$knob" "$agent" bench --bundle "$bundle" --trust "$work/bench.pub" --iterations "$iters" \
          --json --mode bare | record "$name" "$knob"
      done
      ;;
  esac
done

# Compiler levers need their own build (the native one its own target dir,
# so the default build above stays cached). Bare tract on the fp32 models.
for build in ${LEVER_BUILDS:-}; do
  case $build in
    native)
      lever="-C target-cpu=native"
      RUSTFLAGS="$lever" CARGO_TARGET_DIR="$target_dir/lever-native" \
        cargo build --release --locked -p edge-agent --bin edge-agent
      bin="$target_dir/lever-native/release/edge-agent" ;;
    dist)
      lever="dist profile (fat LTO, 1 codegen unit, deps at opt-level s)"
      cargo build --profile dist --locked -p edge-agent --bin edge-agent
      bin="$target_dir/dist/edge-agent" ;;
    pgo)
      # Profile-guided optimization, trained on cls only (ONNX and NNEF
      # bundles, in-process): rec is held out, so its row says whether the
      # gain carries to a model the profile never saw. --target keeps the
      # flags off build scripts (they would write profiles while building).
      lever="PGO (profile from cls only)"
      host=$(rustc -vV | sed -n 's/^host: //p')
      profdata="$(rustc --print sysroot)/lib/rustlib/$host/bin/llvm-profdata"
      [[ -x "$profdata" ]] || rustup component add llvm-tools-preview >&2
      # Stable paths: the flags, hence both builds, stay cached across runs.
      prof="$target_dir/lever-pgo-gen/profiles"
      rm -rf "$prof" && mkdir -p "$prof"
      RUSTFLAGS="-C profile-generate=$prof" CARGO_TARGET_DIR="$target_dir/lever-pgo-gen" \
        cargo build --release --locked -p edge-agent --bin edge-agent --target "$host"
      for name in cls cls-nnef; do
        "$target_dir/lever-pgo-gen/$host/release/edge-agent" bench --bundle "$work/$name.bundle" \
          --trust "$work/bench.pub" --iterations 200 --mode in-process >/dev/null
      done
      "$profdata" merge -o "$prof/merged.profdata" "$prof"
      RUSTFLAGS="-C profile-use=$prof/merged.profdata" CARGO_TARGET_DIR="$target_dir/lever-pgo" \
        cargo build --release --locked -p edge-agent --bin edge-agent --target "$host"
      bin="$target_dir/lever-pgo/$host/release/edge-agent" ;;
    *) echo "unknown LEVER_BUILDS entry $build (native, dist, pgo)" >&2; exit 2 ;;
  esac
  for name in cls cls-nnef rec rec-nnef; do
    iters=$(python3 -c "print(max(5, int({'cls': 300, 'rec': 40}['${name%-nnef}'] * $scale)))")
    for mode in bare in-process; do
      "$bin" bench --bundle "$work/$name.bundle" --trust "$work/bench.pub" --iterations "$iters" \
        --json --mode "$mode" | record "$name" "$lever"
    done
  done
done

python3 scripts/bench_report.py "$results" docs/benchmarks.md
