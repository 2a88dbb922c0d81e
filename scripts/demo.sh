#!/usr/bin/env bash
# The edgefleet demo. Today it shows the bundle path an operator drives:
# two signing keys with a threshold of 2, packing the real classifier as
# ONNX (v1) and NNEF (v2) against ONNX Runtime references, verification,
# inspection, and a tampered bundle being refused. The fleet part (server,
# 8 agents, canary rollout, automatic rollback) lands with the demo issue.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

echo "==> building fleetctl (release)"
cargo build --release --locked -p fleet-server --bin fleetctl
target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
fleetctl="$target_dir/release/fleetctl"

work=$(mktemp -d -t edgefleet-demo.XXXXXX)
trap 'rm -rf "$work"' EXIT INT TERM
cd "$work"

step() { printf '\n==> %s\n' "$*"; }

step "two signing keys (production-style trust: both must sign)"
"$fleetctl" keygen --out release-a
"$fleetctl" keygen --out release-b

golden=()
for i in 0 1 2 3; do
  golden+=(--golden-inputs "$root/models/cls/golden/in_$i.npz" --golden-outputs "$root/models/cls/golden/out_$i.npz")
done

step "pack v1: the PP-OCR text-orientation classifier (ONNX), checked against ONNX Runtime"
"$fleetctl" bundle pack --model "$root/models/cls/ch_ppocr_mobile_v2.0_cls_infer.onnx" \
  --name ppocr-cls --version 1.0.0 --sequence 1 "${golden[@]}" \
  --key release-a.key --key release-b.key --expires-in 90d --out cls-v1.bundle

step "pack v2: the same model as tract NNEF (faster device start), re-checked after conversion"
"$fleetctl" bundle pack --model "$root/models/cls/ch_ppocr_mobile_v2.0_cls_infer.onnx" \
  --name ppocr-cls --version 2.0.0 --sequence 2 "${golden[@]}" --nnef \
  --key release-a.key --key release-b.key --expires-in 90d --out cls-v2.bundle

step "verify both with a 2-of-2 trust root"
"$fleetctl" bundle verify cls-v1.bundle --trust release-a.pub --trust release-b.pub --threshold 2
"$fleetctl" bundle verify cls-v2.bundle --trust release-a.pub --trust release-b.pub --threshold 2

step "inspect v2"
"$fleetctl" bundle inspect cls-v2.bundle

step "a bundle with one flipped payload byte is refused"
cp cls-v1.bundle evil.bundle
size=$(stat -c %s evil.bundle)
printf '\xff' | dd of=evil.bundle bs=1 seek=$((size - 100)) conv=notrunc status=none
if "$fleetctl" bundle verify evil.bundle --trust release-a.pub --trust release-b.pub --threshold 2; then
  echo "FAIL: tampered bundle was accepted" >&2
  exit 1
fi

step "done: keys, two signed bundles, verification and a refused tamper in $work"
