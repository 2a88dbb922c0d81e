#!/usr/bin/env python3
"""int8 variants of the PP-OCR classifier, with ONNX Runtime references.

1. models/cls-int8/cls_int8.onnx: static QOperator quantization restricted
   to Conv and MatMul, which yields only standard ONNX ops (53 QLinearConv
   plus QuantizeLinear/DequantizeLinear). The classifier's one MatMul is
   fused with its bias Add into a Gemm by quant_pre_process, so it stays
   fp32. tract runs this correctly (checked by `fleetctl bundle pack`
   against the references written here).
2. tests/data/cls_qdq_softmax.onnx: QDQ quantization of every supported op,
   Softmax included. tract 0.23.9 alone computes wrong outputs for it; the
   runtime answers within one output step of ONNX Runtime, which the
   packer's default tolerance still refuses (its refusal test).

3. With --pointwise, models/cls-int8-pw/cls_int8_pw.onnx: only the 1×1
   convolutions quantized; depthwise, k×k, Gemm and Softmax stay fp32. The
   recipe tract runs fastest (docs/benchmarks.md); prints its accuracy
   against fp32 on the calibration lines.

Calibration uses models/cls/calib.npz (rendered text lines).

    python3 scripts/quantize.py [--pointwise]
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


def pointwise_convs(model: pathlib.Path) -> list:
    """Names of the 1×1, ungrouped Conv nodes: the pointwise convolutions
    that tract runs as one int8 matrix product each. Depthwise and k×k
    convolutions stay fp32 (tract's int8 path takes im2col for every
    quantized conv, which makes a depthwise conv C tiny products)."""
    names = []
    for n in onnx.load(str(model)).graph.node:
        if n.op_type != "Conv":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        if list(attrs.get("kernel_shape", [])) == [1, 1] and attrs.get("group", 1) == 1:
            names.append(n.name)
    return names


def quantize(out: pathlib.Path, fmt: QuantFormat, op_types, pick_nodes=None) -> None:
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
            nodes_to_quantize=pick_nodes(pre) if pick_nodes else None,
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


def accuracy(model: pathlib.Path) -> dict:
    """Against the fp32 classifier on the 64 calibration lines: how often
    the predicted class agrees, and the largest probability difference."""
    x = np.load(ROOT / "models/cls/calib.npz")["x"]
    q, fp32 = session(model), session(CLS)
    agree, worst = 0, 0.0
    for i in range(len(x)):
        a = next(iter(run(q, {"x": x[i : i + 1]}).values()))
        b = next(iter(run(fp32, {"x": x[i : i + 1]}).values()))
        agree += int(a.argmax() == b.argmax())
        worst = max(worst, float(np.abs(a - b).max()))
    return {"samples": len(x), "argmax_agreement": agree / len(x), "max_abs_prob_diff": worst}


if __name__ == "__main__":
    import sys

    if "--pointwise" in sys.argv:
        # The recipe tract runs fast: int8 only where it is one product.
        pw = ROOT / "models/cls-int8-pw/cls_int8_pw.onnx"
        quantize(pw, QuantFormat.QOperator, ["Conv"], pointwise_convs)
        print(f"{pw.relative_to(ROOT)}: ops {op_counts(pw)}")
        goldens(pw, ROOT / "models/cls-int8-pw/golden", range(4))
        print(f"accuracy vs fp32: {accuracy(pw)}")
        print(f"accuracy of models/cls-int8 vs fp32: {accuracy(ROOT / 'models/cls-int8/cls_int8.onnx')}")
        sys.exit(0)

    good = ROOT / "models/cls-int8/cls_int8.onnx"
    quantize(good, QuantFormat.QOperator, ["Conv", "MatMul"])
    print(f"{good.relative_to(ROOT)}: ops {op_counts(good)}")
    goldens(good, ROOT / "models/cls-int8/golden", range(4))

    bad = ROOT / "tests/data/cls_qdq_softmax.onnx"
    quantize(bad, QuantFormat.QDQ, None)
    print(f"{bad.relative_to(ROOT)}: ops {op_counts(bad)}")
    goldens(bad, ROOT / "tests/data/cls_qdq_softmax_golden", range(1))
