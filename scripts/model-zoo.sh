#!/usr/bin/env bash
# Packs every model scripts/make_model_zoo.py wrote, as ONNX and as NNEF,
# against its ONNX Runtime outputs: `fleetctl bundle pack` loads each form
# as a device would and refuses one whose outputs differ from ONNX
# Runtime's by more than the tolerance. Prints one line per model and form,
# and exits non-zero if any failed.
#
#   python3 scripts/make_model_zoo.py --out /tmp/zoo --count 300 --first 1000
#   scripts/model-zoo.sh /tmp/zoo
#
# FLEETCTL: the binary (default: the release build under CARGO_TARGET_DIR or
# target/). A model that fails is worth a fixture in tests/data/zoo/ once its
# cause is fixed (scripts/make_model_zoo.py FIXTURES).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:?usage: scripts/model-zoo.sh DIR [extra fleetctl bundle pack args]}
shift
fleetctl=${FLEETCTL:-${CARGO_TARGET_DIR:-$PWD/target}/release/fleetctl}
[ -x "$fleetctl" ] || cargo build --release --locked -q -p fleetctl
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$fleetctl" keygen --out "$work/k" > /dev/null

ok=0
failed=0
for m in "$dir"/*/; do
  name=$(basename "$m")
  for form in onnx nnef; do
    extra=()
    [ "$form" = nnef ] && extra=(--nnef)
    if out=$("$fleetctl" bundle pack --model "$m/model.onnx" --name "zoo-${name//_/-}" --version 1.0.0 --sequence 1 \
      --golden-inputs "$m/in.npz" --golden-outputs "$m/out.npz" --key "$work/k.key" \
      --out "$work/b.bundle" "${extra[@]}" "$@" 2>&1); then
      echo "ok     $name $form: $(grep -o 'max abs diff [^ ]*' <<< "$out")"
      ok=$((ok + 1))
    else
      echo "FAILED $name $form: $(tail -n 2 <<< "$out" | tr '\n' ' ')"
      failed=$((failed + 1))
    fi
    rm -f "$work/b.bundle"
  done
done
echo "model zoo: $ok packed, $failed failed"
[ "$failed" = 0 ]
