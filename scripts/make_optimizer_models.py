#!/usr/bin/env python3
"""Small ONNX graphs for the runtime's optimizer tests (tests/data/optimizer/).

The runtime drives tract's graph passes itself and builds some of their
patches its own way (runtime/src/optimizer.rs). Its tests compare the graph
that comes out with tract's own, node for node, on every model in models/
and on these: shapes of graph the repository's models do not have, chosen
for the axis changes they make tract try (unit axes, transposes, reshapes
into heads, scalars broadcast into changed wires, a recurrent layer).

    attention  layer norm, Q/K/V projections split into heads, softmax, residual
    conv1d     1-D convolutions, unsqueeze to 2-D and back, mean, Gemm
    unit_axes  squeeze, matmul, unsqueeze, transposes, scalar and bias broadcasts
    cnn        batch norm, hard-swish, depthwise conv, split, pools, concat,
               resize, slice, residual, global pool
    lstm       an LSTM layer (tract runs it as a Scan), squeeze, matmul
    residual   a ResNet block: batch norms after bias-free convolutions whose
               kernels (9216 values) the optimizer folds them into, a
               per-channel Div and Sub, a projected shortcut, residual add

Inputs have fixed shapes; weights are seeded, so the files are reproducible
with the pinned onnx and protobuf (scripts/requirements.txt). Each model is
run once with ONNX Runtime to check that it is valid.

    python3 scripts/make_optimizer_models.py
"""
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests/data/optimizer"
RNG = np.random.default_rng(20261205)


def weight(name: str, *shape: int) -> onnx.TensorProto:
    return numpy_helper.from_array((RNG.standard_normal(shape) * 0.1).astype(np.float32), name)


def ints(name: str, *values: int) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(values, dtype=np.int64), name)


def scalar(name: str, value: float) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(value, dtype=np.float32), name)


def floats(name: str, *values: float) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(values, dtype=np.float32), name)


def save(name: str, nodes: list, inits: list, shape: list[int]) -> None:
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_value_info("y", helper.make_tensor_type_proto(TensorProto.FLOAT, shape=None))],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    path = OUT / f"{name}.onnx"
    onnx.save(model, path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": np.zeros(shape, dtype=np.float32)})
    print(f"{path.relative_to(ROOT)}: input {shape}, output {list(y.shape)}")


def attention() -> None:
    dim, heads = 32, 4
    nodes = [
        helper.make_node("ReduceMean", ["x", "last"], ["mean"], keepdims=1),
        helper.make_node("Sub", ["x", "mean"], ["centered"]),
        helper.make_node("Mul", ["centered", "centered"], ["squares"]),
        helper.make_node("ReduceMean", ["squares", "last"], ["var"], keepdims=1),
        helper.make_node("Add", ["var", "eps"], ["var_eps"]),
        helper.make_node("Sqrt", ["var_eps"], ["std"]),
        helper.make_node("Div", ["centered", "std"], ["normed"]),
        helper.make_node("Mul", ["normed", "gamma"], ["scaled"]),
        helper.make_node("Add", ["scaled", "beta"], ["ln"]),
    ]
    inits = [
        ints("last", -1),
        scalar("eps", 1e-5),
        weight("gamma", dim),
        weight("beta", dim),
        ints("split_heads", 1, 16, heads, dim // heads),
        scalar("scale", (dim // heads) ** -0.5),
        ints("merge_heads", 1, 16, dim),
        weight("w_out", dim, dim),
    ]
    for p, perm in [("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])]:
        nodes += [
            helper.make_node("MatMul", ["ln", f"w_{p}"], [f"{p}_proj"]),
            helper.make_node("Add", [f"{p}_proj", f"b_{p}"], [f"{p}_bias"]),
            helper.make_node("Reshape", [f"{p}_bias", "split_heads"], [f"{p}_split"]),
            helper.make_node("Transpose", [f"{p}_split"], [f"{p}_heads"], perm=perm),
        ]
        inits += [weight(f"w_{p}", dim, dim), weight(f"b_{p}", dim)]
    nodes += [
        helper.make_node("MatMul", ["q_heads", "k_heads"], ["scores"]),
        helper.make_node("Mul", ["scores", "scale"], ["scores_scaled"]),
        helper.make_node("Softmax", ["scores_scaled"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "v_heads"], ["context"]),
        helper.make_node("Transpose", ["context"], ["context_t"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["context_t", "merge_heads"], ["merged"]),
        helper.make_node("MatMul", ["merged", "w_out"], ["out"]),
        helper.make_node("Add", ["out", "x"], ["y"]),
    ]
    save("attention", nodes, inits, [1, 16, dim])


def conv1d() -> None:
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], kernel_shape=[3], pads=[1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Unsqueeze", ["r1", "axis2"], ["as_2d"]),
        helper.make_node("Conv", ["as_2d", "w2"], ["c2"], kernel_shape=[1, 3], pads=[0, 1, 0, 1]),
        helper.make_node("Squeeze", ["c2", "axis2"], ["as_1d"]),
        helper.make_node("Mul", ["as_1d", "half"], ["halved"]),
        helper.make_node("ReduceMean", ["halved", "axis2"], ["mean"], keepdims=1),
        helper.make_node("Flatten", ["mean"], ["flat"]),
        helper.make_node("Gemm", ["flat", "wg", "bg"], ["logits"], transB=1),
        helper.make_node("Sigmoid", ["logits"], ["y"]),
    ]
    inits = [
        weight("w1", 16, 8, 3),
        weight("b1", 16),
        ints("axis2", 2),
        weight("w2", 16, 16, 1, 3),
        scalar("half", 0.5),
        weight("wg", 10, 16),
        weight("bg", 10),
    ]
    save("conv1d", nodes, inits, [1, 8, 100])


def unit_axes() -> None:
    nodes = [
        helper.make_node("Squeeze", ["x", "axes13"], ["squeezed"]),
        helper.make_node("MatMul", ["squeezed", "w"], ["m"]),
        helper.make_node("Unsqueeze", ["m", "axis0"], ["unsqueezed"]),
        helper.make_node("Transpose", ["unsqueezed"], ["t1"], perm=[1, 0, 2]),
        helper.make_node("Add", ["t1", "bias"], ["biased"]),
        helper.make_node("Mul", ["biased", "two"], ["doubled"]),
        helper.make_node("Transpose", ["doubled"], ["t2"], perm=[2, 1, 0]),
        helper.make_node("Relu", ["t2"], ["r"]),
        helper.make_node("Reshape", ["r", "flat"], ["y"]),
    ]
    inits = [
        ints("axes13", 1, 3),
        weight("w", 32, 16),
        ints("axis0", 0),
        weight("bias", 16),
        scalar("two", 2.0),
        ints("flat", -1),
    ]
    save("unit_axes", nodes, inits, [1, 1, 32, 1])


def cnn() -> None:
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("BatchNormalization", ["c1", "bn_s", "bn_b", "bn_m", "bn_v"], ["bn"]),
        helper.make_node("HardSigmoid", ["bn"], ["gate"]),
        helper.make_node("Mul", ["bn", "gate"], ["hswish"]),
        helper.make_node("Conv", ["hswish", "dw"], ["d"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=16),
        helper.make_node("Split", ["d", "halves"], ["d1", "d2"], axis=1),
        helper.make_node("MaxPool", ["d1"], ["max"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("AveragePool", ["d2"], ["avg"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Concat", ["max", "avg"], ["pooled"], axis=1),
        helper.make_node("Resize", ["pooled", "", "scales"], ["up"], mode="nearest"),
        helper.make_node("Slice", ["up", "starts", "ends", "hw"], ["cropped"]),
        helper.make_node("Add", ["cropped", "hswish"], ["residual"]),
        helper.make_node("GlobalAveragePool", ["residual"], ["global"]),
        helper.make_node("Reshape", ["global", "rows"], ["y"]),
    ]
    inits = [
        weight("w1", 16, 3, 3, 3),
        weight("bn_s", 16),
        weight("bn_b", 16),
        weight("bn_m", 16),
        numpy_helper.from_array((np.abs(RNG.standard_normal(16)) + 0.5).astype(np.float32), "bn_v"),
        weight("dw", 16, 1, 3, 3),
        ints("halves", 8, 8),
        floats("scales", 1, 1, 2, 2),
        ints("starts", 0, 0),
        ints("ends", 16, 16),
        ints("hw", 2, 3),
        ints("rows", 1, -1),
    ]
    save("cnn", nodes, inits, [1, 3, 32, 32])


def lstm() -> None:
    nodes = [
        helper.make_node("LSTM", ["x", "w", "r", "b"], ["seq", "h", "c"], hidden_size=16),
        helper.make_node("Squeeze", ["seq", "axis1"], ["steps"]),
        helper.make_node("MatMul", ["steps", "w_out"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["y"], axis=-1),
    ]
    inits = [
        weight("w", 1, 64, 8),
        weight("r", 1, 64, 16),
        weight("b", 1, 128),
        ints("axis1", 1),
        weight("w_out", 16, 4),
    ]
    save("lstm", nodes, inits, [5, 1, 8])


def residual() -> None:
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "s1", "b1", "m1", "v1"], ["n1"]),
        helper.make_node("Relu", ["n1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Div", ["c2", "per_channel"], ["q2"]),
        helper.make_node("Sub", ["q2", "per_channel"], ["n2"]),
        helper.make_node("Conv", ["x", "w3", "b3"], ["short"], kernel_shape=[1, 1]),
        helper.make_node("Add", ["n2", "short"], ["sum"]),
        helper.make_node("Relu", ["sum"], ["y"]),
    ]
    inits = [
        weight("w1", 32, 32, 3, 3),
        weight("s1", 32),
        weight("b1", 32),
        weight("m1", 32),
        numpy_helper.from_array((np.abs(RNG.standard_normal(32)) + 0.5).astype(np.float32), "v1"),
        weight("w2", 32, 32, 3, 3),
        numpy_helper.from_array((np.abs(RNG.standard_normal((1, 32, 1, 1))) + 0.5).astype(np.float32), "per_channel"),
        weight("w3", 32, 32, 1, 1),
        weight("b3", 32),
    ]
    save("residual", nodes, inits, [1, 32, 16, 16])


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    attention()
    conv1d()
    unit_axes()
    cnn()
    lstm()
    residual()
