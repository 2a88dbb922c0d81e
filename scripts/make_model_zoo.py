#!/usr/bin/env python3
"""Randomly built ONNX models with ONNX Runtime's outputs, to check that the
runtime computes what ONNX Runtime computes on graphs nobody tuned it for.

Two families, each model drawn from a seed:

    cnn  convolutions of every kind (strided, dilated, grouped, depthwise,
         1x1, SAME_UPPER/SAME_LOWER and asymmetric pads), ConvTranspose,
         Resize (nearest and linear, by scales and by sizes, every
         coordinate mode), pools, batch norm, activations in their op and
         their exported forms (hard-swish, swish, erf GELU), residuals,
         concats, squeeze-excite blocks, and a classifier, feature-map or
         token head
    seq  layer norms (op and expanded), multi-head attention with and
         without a causal mask, MLPs (erf/tanh GELU, SiLU), 1-D convs, pads
         (constant, reflect, edge), slices, splits, gathers, reductions,
         a GRU

Each model goes in its own directory: model.onnx, in.npz (input "x"),
out.npz (ONNX Runtime's output, keyed by the output's name).

    # the fixtures tests/data/zoo/ holds (runtime test
    # model::tests::every_zoo_model_answers_as_onnx_runtime_does)
    python3 scripts/make_model_zoo.py

    # a wider hunt: 300 new models of each family, then scripts/model-zoo.sh
    python3 scripts/make_model_zoo.py --out /tmp/zoo --count 300 --first 1000

Reproducible with the pinned onnx, onnxruntime and numpy
(scripts/requirements.txt).
"""
import argparse
import random
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent

# tests/data/zoo: (name, family, seed). The first three are the smallest
# graphs that showed a bug (runtime/src/tract_fixes.rs, runtime/src/nnef_ops.rs,
# runtime/src/optimizer/change_axes.rs);
# the rest are drawn as in a hunt, kept small.
FIXTURES = [
    ("same_upper_then_strided_1x1", "same_pad", 0),
    ("resize_nearest_by_sizes", "resize_sizes", 0),
    ("conv_bias_axis_change", "bias_axes", 0),
] + [(f"cnn_{s}", "cnn", s) for s in (0, 1, 8, 13, 23, 26, 32, 33, 36, 110, 1211, 3007)] + [
    (f"seq_{s}", "seq", s) for s in (5000, 5002, 5004, 5007, 5010, 5016, 5021, 5030)
]


class Graph:
    def __init__(self, seed: int):
        self.r = random.Random(seed)
        self.rng = np.random.default_rng(seed)
        self.nodes: list = []
        self.inits: list = []
        self.count = 0

    def name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def const(self, values, dtype=np.float32) -> str:
        n = self.name("c")
        self.inits.append(numpy_helper.from_array(np.array(values, dtype=dtype), n))
        return n

    def weight(self, *shape: int, scale: float | None = None) -> str:
        fan = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        s = scale if scale is not None else 1.0 / np.sqrt(max(fan, 1))
        return self.const(self.rng.standard_normal(shape) * s)

    def op(self, kind: str, inputs: list, outputs: int = 1, **attrs):
        outs = [self.name(kind.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(kind, inputs, outs, **attrs))
        return outs[0] if outputs == 1 else outs

    def model(self, name: str, shape: list[int], out: str) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes,
            name,
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
            [helper.make_value_info(out, helper.make_tensor_type_proto(TensorProto.FLOAT, shape=None))],
            self.inits,
        )
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 8
        return m


def conv_len(n: int, k: int, stride: int, dilation: int, before: int, after: int) -> int:
    return (n + before + after - dilation * (k - 1) - 1) // stride + 1


def activation(g: Graph, x: str, channels: int) -> str:
    kind = g.r.choice(["Relu", "Clip", "HardSwish", "hard_swish", "Sigmoid", "swish", "LeakyRelu",
                       "Tanh", "PRelu", "HardSigmoid", "Elu", "gelu"])
    if kind == "Clip":
        return g.op("Clip", [x, g.const(0.0), g.const(6.0)])
    if kind == "hard_swish":
        t = g.op("Clip", [g.op("Add", [x, g.const(3.0)]), g.const(0.0), g.const(6.0)])
        return g.op("Mul", [x, g.op("Div", [t, g.const(6.0)])])
    if kind == "swish":
        return g.op("Mul", [x, g.op("Sigmoid", [x])])
    if kind == "LeakyRelu":
        return g.op("LeakyRelu", [x], alpha=0.1)
    if kind == "PRelu":
        return g.op("PRelu", [x, g.const(g.rng.uniform(0, 0.3, (channels, 1, 1)))])
    if kind == "HardSigmoid":
        return g.op("HardSigmoid", [x], alpha=0.2, beta=0.5)
    if kind == "gelu":
        t = g.op("Add", [g.op("Erf", [g.op("Div", [x, g.const(1.4142135)])]), g.const(1.0)])
        return g.op("Mul", [g.op("Mul", [x, t]), g.const(0.5)])
    return g.op(kind, [x])


def cnn(seed: int):
    g = Graph(seed)
    r = g.r
    c, h, w = r.choice([1, 3, 4, 8]), r.randint(12, 48), r.randint(12, 48)
    shape0 = [1, c, h, w]
    cur, seen = "x", []
    for _ in range(r.randint(3, 12)):
        kind = r.choices(
            ["conv", "dw", "pw", "group", "bn", "act", "res", "convT", "resize", "pool", "se", "concat", "affine"],
            [4, 3, 3, 1, 2, 3, 2, 2, 2, 2, 1, 1, 1],
        )[0]
        if kind in ("conv", "dw", "pw", "group"):
            if kind == "pw":
                k, st, d = 1, 1, 1
            else:
                k, st = r.choice([1, 3, 3, 5, 7]), r.choice([1, 1, 2])
                d = r.choice([1, 1, 2]) if st == 1 else 1
            if kind == "dw":
                groups, oc = c, c * r.choice([1, 1, 2])
            elif kind == "group" and c % 2 == 0:
                groups, oc = 2, r.choice([2, 4, 8, 12])
            else:
                groups, oc = 1, r.choice([4, 8, 16, 24])
            attrs = dict(kernel_shape=[k, k], strides=[st, st], dilations=[d, d], group=groups)
            if r.random() < 0.25 and d == 1:
                attrs["auto_pad"] = r.choice(["SAME_UPPER", "SAME_LOWER"])
                nh, nw = -(-h // st), -(-w // st)
            else:
                pads = [r.randint(0, k // 2 * d) for _ in range(4)] if r.random() < 0.3 else [k // 2 * d] * 4
                attrs["pads"] = pads
                nh, nw = conv_len(h, k, st, d, pads[0], pads[2]), conv_len(w, k, st, d, pads[1], pads[3])
            if nh < 1 or nw < 1:
                continue
            inputs = [cur, g.weight(oc, c // groups, k, k)]
            if r.random() < 0.7:
                inputs.append(g.weight(oc, scale=0.1))
            cur, (c, h, w) = g.op("Conv", inputs, **attrs), (oc, nh, nw)
        elif kind == "bn":
            stats = [g.rng.uniform(0.5, 1.5, c), g.rng.normal(0, 0.1, c), g.rng.normal(0, 0.1, c), g.rng.uniform(0.5, 1.5, c)]
            cur = g.op("BatchNormalization", [cur] + [g.const(s) for s in stats], epsilon=1e-5)
        elif kind == "act":
            cur = activation(g, cur, c)
        elif kind == "res":
            same = [t for t, s in seen if s == (c, h, w)]
            if same:
                cur = g.op("Add", [cur, r.choice(same)])
        elif kind == "concat":
            same = [(t, s) for t, s in seen if s[1:] == (h, w)]
            if same:
                other, s = r.choice(same)
                cur, c = g.op("Concat", [cur, other], axis=1), c + s[0]
        elif kind == "convT":
            k, st, oc = r.choice([2, 3, 4]), r.choice([1, 2]), r.choice([4, 8])
            p, extra = r.randint(0, k // 2), 0
            if st > 1:
                extra = r.randint(0, st - 1)
            groups = c if r.random() < 0.2 else 1
            if groups == c:
                oc = c
            nh, nw = (h - 1) * st - 2 * p + k + extra, (w - 1) * st - 2 * p + k + extra
            if not (1 <= nh <= 128 and 1 <= nw <= 128):
                continue
            inputs = [cur, g.weight(c, oc // groups, k, k)]
            if r.random() < 0.5:
                inputs.append(g.weight(oc, scale=0.1))
            cur = g.op("ConvTranspose", inputs, kernel_shape=[k, k], strides=[st, st], pads=[p] * 4,
                       output_padding=[extra, extra], group=groups)
            c, h, w = oc, nh, nw
        elif kind == "resize":
            if h * 2 > 96:
                continue
            mode = r.choice(["nearest", "linear"])
            modes = ["half_pixel", "asymmetric", "align_corners", "pytorch_half_pixel"]
            attrs = dict(mode=mode, coordinate_transformation_mode=r.choice(modes if mode == "linear" else modes[:2]))
            if mode == "nearest":
                attrs["nearest_mode"] = r.choice(["floor", "round_prefer_floor"])
            if r.random() < 0.6:
                cur, h, w = g.op("Resize", [cur, "", g.const([1, 1, 2, 2])], **attrs), h * 2, w * 2
            else:
                nh, nw = h + r.randint(1, 9), w + r.randint(-3, 9)
                if nw < 1:
                    continue
                cur = g.op("Resize", [cur, "", "", g.const([1, c, nh, nw], np.int64)], **attrs)
                h, w = nh, nw
        elif kind == "pool":
            op, k, st = r.choice(["MaxPool", "AveragePool"]), r.choice([2, 3]), r.choice([1, 2])
            p = r.randint(0, k // 2)
            attrs = dict(kernel_shape=[k, k], strides=[st, st], pads=[p] * 4)
            if op == "AveragePool":
                attrs["count_include_pad"] = r.choice([0, 1])
            nh, nw = conv_len(h, k, st, 1, p, p), conv_len(w, k, st, 1, p, p)
            if nh < 1 or nw < 1:
                continue
            cur, h, w = g.op(op, [cur], **attrs), nh, nw
        elif kind == "se":
            m = max(2, c // 2)
            s = g.op("GlobalAveragePool", [cur])
            s = g.op("Relu", [g.op("Conv", [s, g.weight(m, c, 1, 1), g.weight(m, scale=0.1)], kernel_shape=[1, 1])])
            s = g.op("Conv", [s, g.weight(c, m, 1, 1), g.weight(c, scale=0.1)], kernel_shape=[1, 1])
            cur = g.op("Mul", [cur, g.op("HardSigmoid", [s], alpha=1 / 6, beta=0.5)])
        elif kind == "affine":
            cur = g.op("Mul", [cur, g.const(g.rng.uniform(0.5, 1.5, (c, 1, 1)))])
            cur = g.op("Add", [cur, g.const(g.rng.normal(0, 0.1, (c, 1, 1)))])
        seen.append((cur, (c, h, w)))
    head = r.choice(["classes", "map", "tokens"])
    if head == "classes":
        t = g.op("Flatten", [g.op("GlobalAveragePool", [cur])], axis=1)
        n = r.choice([2, 5, 10])
        cur = g.op("Softmax", [g.op("Gemm", [t, g.weight(n, c), g.weight(n, scale=0.1)], transB=1)], axis=1)
    elif head == "tokens":
        t = g.op("Transpose", [g.op("Reshape", [cur, g.const([1, c, -1], np.int64)])], perm=[0, 2, 1])
        cur = g.op("MatMul", [t, g.weight(c, 6)])
    return g, shape0, cur


def seq(seed: int):
    g = Graph(seed)
    r = g.r
    t_len, dim = r.choice([4, 7, 16, 25, 32]), r.choice([8, 12, 16, 32])
    heads = r.choice([h for h in (1, 2, 4) if dim % h == 0])
    shape0 = [1, t_len, dim]
    cur = "x"
    for _ in range(r.randint(2, 7)):
        kind = r.choice(["ln", "ln_op", "attn", "mlp", "conv1d", "pad_slice", "split", "reduce", "gather", "act", "gru"])
        if kind == "ln":
            mean = g.op("ReduceMean", [cur], axes=[-1], keepdims=1)
            d = g.op("Sub", [cur, mean])
            var = g.op("ReduceMean", [g.op("Pow", [d, g.const(2.0)])], axes=[-1], keepdims=1)
            n = g.op("Div", [d, g.op("Sqrt", [g.op("Add", [var, g.const(1e-5)])])])
            n = g.op("Mul", [n, g.const(g.rng.uniform(0.5, 1.5, dim))])
            cur = g.op("Add", [n, g.const(g.rng.normal(0, 0.1, dim))])
        elif kind == "ln_op":
            cur = g.op("LayerNormalization", [cur, g.const(g.rng.uniform(0.5, 1.5, dim)), g.const(g.rng.normal(0, 0.1, dim))],
                       axis=-1, epsilon=1e-5)
        elif kind == "attn":
            hd = dim // heads

            def split_heads(x):
                x = g.op("Reshape", [x, g.const([1, t_len, heads, hd], np.int64)])
                return g.op("Transpose", [x], perm=[0, 2, 1, 3])

            q, k, v = (split_heads(g.op("Add", [g.op("MatMul", [cur, g.weight(dim, dim)]), g.const(g.rng.normal(0, 0.1, dim))]))
                       for _ in range(3))
            s = g.op("Div", [g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 1, 3, 2])]), g.const(np.sqrt(hd))])
            if r.random() < 0.5:
                s = g.op("Add", [s, g.const(np.triu(np.full((t_len, t_len), -1e9), 1))])
            o = g.op("MatMul", [g.op("Softmax", [s], axis=-1), v])
            o = g.op("Reshape", [g.op("Transpose", [o], perm=[0, 2, 1, 3]), g.const([1, t_len, dim], np.int64)])
            cur = g.op("Add", [cur, g.op("MatMul", [o, g.weight(dim, dim)])])
        elif kind == "mlp":
            hidden = dim * r.choice([2, 4])
            t = g.op("Add", [g.op("MatMul", [cur, g.weight(dim, hidden)]), g.const(g.rng.normal(0, 0.1, hidden))])
            act = r.choice(["gelu", "relu", "silu", "tanh_gelu"])
            if act == "gelu":
                e = g.op("Add", [g.op("Erf", [g.op("Div", [t, g.const(1.4142135)])]), g.const(1.0)])
                t = g.op("Mul", [g.op("Mul", [t, e]), g.const(0.5)])
            elif act == "relu":
                t = g.op("Relu", [t])
            elif act == "silu":
                t = g.op("Mul", [t, g.op("Sigmoid", [t])])
            else:
                cube = g.op("Mul", [g.op("Pow", [t, g.const(3.0)]), g.const(0.044715)])
                inner = g.op("Mul", [g.op("Add", [t, cube]), g.const(0.7978845608)])
                t = g.op("Mul", [g.op("Mul", [t, g.const(0.5)]), g.op("Add", [g.op("Tanh", [inner]), g.const(1.0)])])
            cur = g.op("Add", [cur, g.op("MatMul", [t, g.weight(hidden, dim)])])
        elif kind == "conv1d":
            k, st, groups = r.choice([1, 3, 5]), r.choice([1, 1, 2]), r.choice([1, dim])
            p = k // 2
            t = g.op("Transpose", [cur], perm=[0, 2, 1])
            t = g.op("Conv", [t, g.weight(dim, dim // groups, k), g.const(g.rng.normal(0, 0.1, dim))],
                     kernel_shape=[k], strides=[st], pads=[p, p], group=groups)
            cur, t_len = g.op("Transpose", [t], perm=[0, 2, 1]), conv_len(t_len, k, st, 1, p, p)
        elif kind == "pad_slice":
            if t_len > 3:
                before, after = r.randint(0, 3), r.randint(0, 3)
                cur = g.op("Pad", [cur, g.const([0, before, 0, 0, after, 0], np.int64)],
                           mode=r.choice(["constant", "reflect", "edge"]))
                t_len += before + after
            start, end = r.randint(0, 2), t_len - r.randint(0, 2)
            if end - start >= 2:
                cur = g.op("Slice", [cur, g.const([start], np.int64), g.const([end], np.int64), g.const([1], np.int64)])
                t_len = end - start
        elif kind == "split" and dim % 2 == 0:
            a, b = g.op("Split", [cur, g.const([dim // 2, dim // 2], np.int64)], outputs=2, axis=-1)
            cur = g.op("Concat", [g.op("Mul", [a, g.op("Sigmoid", [b])]), g.op("Sub", [b, a])], axis=-1)
        elif kind == "reduce":
            op = r.choice(["ReduceMax", "ReduceMean"])
            cur = g.op("Add", [cur, g.op(op, [cur], axes=[1], keepdims=1)])
        elif kind == "gather" and t_len > 2:
            picked = sorted(r.sample(range(t_len), r.randint(2, t_len)))
            cur, t_len = g.op("Gather", [cur, g.const(picked, np.int64)], axis=1), len(picked)
        elif kind == "act":
            cur = g.op(r.choice(["Tanh", "Relu", "Softplus", "Abs", "Neg", "Sigmoid"]), [cur])
        elif kind == "gru":
            hs = r.choice([4, 8])
            x = g.op("Transpose", [cur], perm=[1, 0, 2])
            y, _ = g.op("GRU", [x, g.weight(1, 3 * hs, dim), g.weight(1, 3 * hs, hs), g.const(g.rng.normal(0, 0.1, (1, 6 * hs)))],
                        outputs=2, hidden_size=hs, linear_before_reset=r.choice([0, 1]))
            y = g.op("Transpose", [g.op("Squeeze", [y, g.const([1], np.int64)])], perm=[1, 0, 2])
            cur = g.op("MatMul", [y, g.weight(hs, dim)])
    if r.random() < 0.4:
        pooled = g.op("ReduceMean", [cur], axes=[1], keepdims=0)
        cur = g.op("Softmax", [g.op("MatMul", [pooled, g.weight(dim, 5)])], axis=-1)
    return g, shape0, cur


def same_pad(_seed: int):
    """A 3x3 SAME_UPPER convolution (grouped) and a stride-2 1x1 one, on an
    even number of rows: tract folded the stride into the first and kept
    its SAME padding (tract_fixes::explicit_same_padding)."""
    g = Graph(1)
    t = g.op("Conv", ["x", g.weight(8, 2, 3, 3)], kernel_shape=[3, 3], group=4, auto_pad="SAME_UPPER")
    return g, [1, 8, 48, 49], g.op("Conv", [t, g.weight(4, 8, 1, 1)], kernel_shape=[1, 1], strides=[2, 2], pads=[0] * 4)


def resize_sizes(_seed: int):
    """Resize by sizes 27x38 -> 29x43 in a mode tract keeps as its ONNX op
    (nearest, round_prefer_floor): its NNEF form came back 28 rows high
    (nnef_ops: edgefleet_onnx_resize)."""
    g = Graph(2)
    t = g.op("Resize", ["x", "", "", g.const([1, 8, 29, 43], np.int64)], mode="nearest",
             coordinate_transformation_mode="half_pixel", nearest_mode="round_prefer_floor")
    return g, [1, 8, 27, 38], g.op("Conv", [t, g.weight(4, 8, 3, 3)], kernel_shape=[3, 3], pads=[1] * 4)


def bias_axes(_seed: int):
    """A 1x1 convolution, a strided 3x3 one whose output is multiplied and
    shifted per channel (declutter folds both into its bias), then a
    global pool and a Gemm: tract's ChangeAxes failed the load, adding an
    axis to that bias (optimizer/change_axes.rs skips such a change)."""
    g = Graph(3)
    t = g.op("Conv", ["x", g.weight(4, 4, 1, 1), g.weight(4, scale=0.1)], kernel_shape=[1, 1])
    t = g.op("Conv", [t, g.weight(16, 4, 3, 3), g.weight(16, scale=0.1)], kernel_shape=[3, 3], pads=[1] * 4,
             strides=[2, 2])
    t = g.op("Add", [g.op("Mul", [t, g.const(g.rng.uniform(0.5, 1.5, (16, 1, 1)))]), g.const(g.rng.normal(0, 0.1, (16, 1, 1)))])
    t = g.op("Flatten", [g.op("GlobalAveragePool", [t])], axis=1)
    return g, [1, 4, 3, 10], g.op("Gemm", [t, g.weight(10, 16), g.weight(10, scale=0.1)], transB=1)


FAMILIES = {"cnn": cnn, "seq": seq, "same_pad": same_pad, "resize_sizes": resize_sizes, "bias_axes": bias_axes}


def write(out: Path, name: str, family: str, seed: int) -> bool:
    g, shape, y_name = FAMILIES[family](seed)
    model = g.model(name, shape, y_name)
    d = out / name
    d.mkdir(parents=True, exist_ok=True)
    onnx.save(model, d / "model.onnx")
    x = np.random.default_rng(1000 + seed).standard_normal(shape).astype(np.float32)
    try:
        session = ort.InferenceSession(str(d / "model.onnx"), providers=["CPUExecutionProvider"])
        (y,) = session.run(None, {"x": x})
    except Exception as e:  # a draw ONNX Runtime refuses is no test of ours
        print(f"{name}: skipped, ONNX Runtime refuses it: {str(e)[:160]}")
        shutil.rmtree(d)
        return False
    np.savez(d / "in.npz", x=x)
    np.savez(d / "out.npz", **{y_name: y})
    print(f"{name}: input {shape}, output {list(y.shape)}, {len(model.graph.node)} nodes")
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="write here (default: tests/data/zoo, the fixtures)")
    ap.add_argument("--count", type=int, help="models of each family, seeds from --first")
    ap.add_argument("--first", type=int, default=0)
    a = ap.parse_args()
    if a.count is None:
        out = a.out or ROOT / "tests/data/zoo"
        for name, family, seed in FIXTURES:
            write(out, name, family, seed)
        return
    out = a.out or Path("/tmp/zoo")
    for seed in range(a.first, a.first + a.count):
        for family in ("cnn", "seq"):
            write(out, f"{family}_{seed}", family, seed)


if __name__ == "__main__":
    main()
