#!/usr/bin/env python3
"""int8 variants of the PP-OCR classifier, with ONNX Runtime references.

1. models/cls-int8/cls_int8.onnx: static QOperator quantization restricted
   to Conv and MatMul, which yields only standard ONNX ops (53 QLinearConv
   plus QuantizeLinear/DequantizeLinear). The classifier's one MatMul is
   fused with its bias Add into a Gemm by quant_pre_process, so it stays
   fp32. tract runs this correctly (checked by `fleetctl bundle pack`
   against the references written here).
2. tests/data/cls_qdq_softmax.onnx: QDQ quantization of every supported op,
   Softmax included. tract 0.23.9 computes wrong outputs for it; it is the
   negative fixture proving the packer refuses such a model.

Calibration uses models/cls/calib.npz (rendered text lines).

    python3 scripts/quantize.py
"""
import pathlib
import tempfile

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from make_goldens import ROOT, run, save_npz, session

CLS = ROOT / "models/cls/ch_ppocr_mobile_v2.0_cls_infer.onnx"


class Calib(CalibrationDataReader):
    def __init__(self):
        x = np.load(ROOT / "models/cls/calib.npz")["x"]
        self.batches = iter([{"x": x[i : i + 1]} for i in range(len(x))])

    def get_next(self):
        return next(self.batches, None)


def quantize(out: pathlib.Path, fmt: QuantFormat, op_types) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        pre = pathlib.Path(tmp) / "pre.onnx"
        quant_pre_process(str(CLS), str(pre), skip_symbolic_shape=True)
        quantize_static(
            str(pre),
            str(out),
            Calib(),
            quant_format=fmt,
            op_types_to_quantize=op_types,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8 if fmt == QuantFormat.QDQ else QuantType.QUInt8,
            per_channel=False,
        )


def op_counts(model: pathlib.Path) -> dict:
    """Node counts by op type, with the domain for non-standard ops."""
    counts = {}
    for n in onnx.load(str(model)).graph.node:
        key = f"{n.domain}.{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def goldens(model: pathlib.Path, dest: pathlib.Path, cases: range) -> None:
    sess = session(model)
    fp32 = session(CLS)
    for i in cases:
        x = np.load(ROOT / f"models/cls/golden/in_{i}.npz")["x"]
        out = run(sess, {"x": x})
        ref = next(iter(run(fp32, {"x": x}).values()))
        got = next(iter(out.values()))
        print(f"  case {i}: int8 {got[0]} vs fp32 {ref[0]} (max abs diff {np.abs(got - ref).max():.3g})")
        save_npz(dest / f"in_{i}.npz", {"x": x})
        save_npz(dest / f"out_{i}.npz", out)


if __name__ == "__main__":
    good = ROOT / "models/cls-int8/cls_int8.onnx"
    quantize(good, QuantFormat.QOperator, ["Conv", "MatMul"])
    print(f"{good.relative_to(ROOT)}: ops {op_counts(good)}")
    goldens(good, ROOT / "models/cls-int8/golden", range(4))

    bad = ROOT / "tests/data/cls_qdq_softmax.onnx"
    quantize(bad, QuantFormat.QDQ, None)
    print(f"{bad.relative_to(ROOT)}: ops {op_counts(bad)}")
    goldens(bad, ROOT / "tests/data/cls_qdq_softmax_golden", range(1))
