#!/usr/bin/env python3
"""Common architectures that models/ does not hold, built from their
published layer shapes with random weights (fixed seed), for checking that
the runtime's speed is general and not tuned to cls and rec:

  resnet18      ResNet-18 at 224 x 224: 3x3 convolutions with
                BatchNormalization nodes (as exporters leave them), residual
                Adds, a max pool, global average pool and Gemm.
  mobilenetv2   MobileNetV2 (width 1.0) at 224 x 224: inverted residuals,
                depthwise 3x3, Clip(0, 6), no activation after projections.
  shufflenet    ShuffleNet V2 (1.0x) at 224 x 224: channel split (Split),
                channel shuffle (Reshape, Transpose, Reshape), Concat.
  squeezenet    SqueezeNet 1.1 at 224 x 224: fire modules (1x1 squeeze,
                1x1 and 3x3 expand, Concat), max pools with ceil_mode.
  encoder       A 4-layer transformer encoder (BERT-mini sizes: 256 wide,
                4 heads, 1024 feed-forward) over 128 tokens: MatMul,
                Softmax, LayerNormalization, GELU through Erf.
  tcn           A keyword-spotting temporal convolution network over 40 x
                101 features: 1-D dilated convolutions, residual Adds, GRU.

Each is written to OUT (default /tmp/archs) as NAME/model.onnx with
NAME/in.npz and NAME/out.npz (ONNX Runtime's output on one thread).

    python3 scripts/make_arch_models.py [--out DIR] [--only NAME ...]
    scripts/bench-archs.sh DIR
"""
import argparse
import pathlib

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


class Graph:
    def __init__(self, rng: np.random.Generator):
        self.rng, self.nodes, self.inits, self.n = rng, [], [], 0

    def name(self, what: str) -> str:
        self.n += 1
        return f"{what}{self.n}"

    def const(self, value: np.ndarray, what: str = "c") -> str:
        name = self.name(what)
        self.inits.append(numpy_helper.from_array(value, name))
        return name

    def weight(self, *shape, fan_in: int) -> str:
        w = self.rng.normal(size=shape) * np.sqrt(2.0 / fan_in)
        return self.const(w.astype(np.float32), "w")

    def op(self, op_type: str, inputs, **attrs) -> str:
        out = self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def ops(self, op_type: str, inputs, outputs: int, **attrs) -> list:
        outs = [self.name(op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, **attrs))
        return outs

    def conv(self, x, cin, cout, k, stride=1, group=1, pad=None, dilation=1, bias=True, dims=2):
        pad = (k // 2) * dilation if pad is None else pad
        w = self.weight(cout, cin // group, *([k] * dims), fan_in=cin // group * k**dims)
        inputs = [x, w]
        if bias:
            inputs.append(self.const((self.rng.normal(size=cout) * 0.01).astype(np.float32), "b"))
        return self.op("Conv", inputs, kernel_shape=[k] * dims, strides=[stride] * dims,
                       pads=[pad] * (2 * dims), group=group, dilations=[dilation] * dims)

    def bn(self, x, c):
        r = self.rng
        scale = self.const((1 + 0.1 * r.normal(size=c)).astype(np.float32), "g")
        shift = self.const((0.1 * r.normal(size=c)).astype(np.float32), "be")
        mean = self.const((0.1 * r.normal(size=c)).astype(np.float32), "mu")
        var = self.const((1 + 0.1 * r.random(size=c)).astype(np.float32), "var")
        return self.op("BatchNormalization", [x, scale, shift, mean, var], epsilon=1e-5)

    def relu6(self, x):
        return self.op("Clip", [x, self.const(np.float32(0)), self.const(np.float32(6))])

    def gemm(self, x, cin, cout):
        w = self.weight(cout, cin, fan_in=cin)
        b = self.const(np.zeros(cout, np.float32), "b")
        return self.op("Gemm", [x, w, b], transB=1)

    def head(self, x, c, classes=1000):
        x = self.op("GlobalAveragePool", [x])
        x = self.op("Flatten", [x], axis=1)
        return self.gemm(x, c, classes)


def resnet18(g: Graph, x: str) -> str:
    x = g.op("Relu", [g.bn(g.conv(x, 3, 64, 7, 2, bias=False), 64)])
    x = g.op("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4)
    cin = 64
    for cout, stride in [(64, 1), (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1)]:
        y = g.op("Relu", [g.bn(g.conv(x, cin, cout, 3, stride, bias=False), cout)])
        y = g.bn(g.conv(y, cout, cout, 3, bias=False), cout)
        short = x if stride == 1 and cin == cout else g.bn(g.conv(x, cin, cout, 1, stride, bias=False), cout)
        x, cin = g.op("Relu", [g.op("Add", [y, short])]), cout
    return g.head(x, 512)


def mobilenetv2(g: Graph, x: str) -> str:
    x = g.relu6(g.conv(x, 3, 32, 3, 2))
    cin = 32
    for t, c, n, s in [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                       (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]:
        for i in range(n):
            stride, hidden = s if i == 0 else 1, cin * t
            y = x if t == 1 else g.relu6(g.conv(x, cin, hidden, 1))
            y = g.relu6(g.conv(y, hidden, hidden, 3, stride, group=hidden))
            y = g.conv(y, hidden, c, 1)
            x = g.op("Add", [x, y]) if stride == 1 and cin == c else y
            cin = c
    x = g.relu6(g.conv(x, 320, 1280, 1))
    return g.head(x, 1280)


def shufflenet(g: Graph, x: str) -> str:
    def shuffle(x, c, side):
        x = g.op("Reshape", [x, g.const(np.array([1, 2, c // 2, side, side], np.int64))])
        x = g.op("Transpose", [x], perm=[0, 2, 1, 3, 4])
        return g.op("Reshape", [x, g.const(np.array([1, c, side, side], np.int64))])

    def branch(x, cin, c, stride):
        y = g.op("Relu", [g.conv(x, cin, c, 1)])
        y = g.conv(y, c, c, 3, stride, group=c)
        return g.op("Relu", [g.conv(y, c, c, 1)])

    x = g.op("Relu", [g.conv(x, 3, 24, 3, 2)])
    x = g.op("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4)
    cin, side = 24, 56
    for c, repeats in [(116, 4), (232, 8), (464, 4)]:
        side //= 2
        half = c // 2
        left = g.op("Relu", [g.conv(g.conv(x, cin, cin, 3, 2, group=cin), cin, half, 1)])
        x = shuffle(g.op("Concat", [left, branch(x, cin, half, 2)], axis=1), c, side)
        for _ in range(repeats - 1):
            a, b = g.ops("Split", [x, g.const(np.array([half, half], np.int64))], 2, axis=1)
            x = shuffle(g.op("Concat", [a, branch(b, half, half, 1)], axis=1), c, side)
        cin = c
    x = g.op("Relu", [g.conv(x, 464, 1024, 1)])
    return g.head(x, 1024)


def squeezenet(g: Graph, x: str) -> str:
    def fire(x, cin, squeeze, expand):
        s = g.op("Relu", [g.conv(x, cin, squeeze, 1)])
        e1 = g.op("Relu", [g.conv(s, squeeze, expand, 1)])
        e3 = g.op("Relu", [g.conv(s, squeeze, expand, 3)])
        return g.op("Concat", [e1, e3], axis=1)

    def pool(x):
        return g.op("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)

    x = pool(g.op("Relu", [g.conv(x, 3, 64, 3, 2, pad=0)]))
    x = pool(fire(fire(x, 64, 16, 64), 128, 16, 64))
    x = pool(fire(fire(x, 128, 32, 128), 256, 32, 128))
    for cin, s, e in [(256, 48, 192), (384, 48, 192), (384, 64, 256), (512, 64, 256)]:
        x = fire(x, cin, s, e)
    x = g.op("Relu", [g.conv(x, 512, 1000, 1)])
    x = g.op("GlobalAveragePool", [x])
    return g.op("Flatten", [x], axis=1)


def encoder(g: Graph, x: str) -> str:
    tokens, width, heads, ff = 128, 256, 4, 1024
    dh = width // heads

    def linear(x, cin, cout):
        y = g.op("MatMul", [x, g.weight(cin, cout, fan_in=cin)])
        return g.op("Add", [y, g.const(np.zeros(cout, np.float32), "b")])

    def norm(x):
        return g.op("LayerNormalization", [x, g.const(np.ones(width, np.float32)),
                                           g.const(np.zeros(width, np.float32))], axis=-1, epsilon=1e-12)

    def split_heads(x):
        x = g.op("Reshape", [x, g.const(np.array([1, tokens, heads, dh], np.int64))])
        return g.op("Transpose", [x], perm=[0, 2, 1, 3])

    for _ in range(4):
        q, k, v = (split_heads(linear(x, width, width)) for _ in range(3))
        kt = g.op("Transpose", [k], perm=[0, 1, 3, 2])
        att = g.op("Div", [g.op("MatMul", [q, kt]), g.const(np.float32(np.sqrt(dh)))])
        ctx = g.op("MatMul", [g.op("Softmax", [att], axis=-1), v])
        ctx = g.op("Transpose", [ctx], perm=[0, 2, 1, 3])
        ctx = g.op("Reshape", [ctx, g.const(np.array([1, tokens, width], np.int64))])
        x = norm(g.op("Add", [x, linear(ctx, width, width)]))
        h = linear(x, width, ff)
        gelu = g.op("Erf", [g.op("Div", [h, g.const(np.float32(np.sqrt(2)))])])
        gelu = g.op("Mul", [g.op("Mul", [h, g.op("Add", [gelu, g.const(np.float32(1))])]),
                            g.const(np.float32(0.5))])
        x = norm(g.op("Add", [x, linear(gelu, ff, width)]))
    return x


def tcn(g: Graph, x: str) -> str:
    c = 64
    x = g.op("Relu", [g.conv(x, 40, c, 3, dims=1)])
    for dilation in [1, 2, 4, 8, 1, 2, 4, 8]:
        y = g.op("Relu", [g.conv(x, c, c, 3, dilation=dilation, dims=1)])
        y = g.conv(y, c, c, 1, dims=1)
        x = g.op("Relu", [g.op("Add", [x, y])])
    x = g.op("Transpose", [x], perm=[2, 0, 1])  # time, batch, features
    hidden = 64
    w = g.weight(1, 3 * hidden, c, fan_in=c)
    r = g.weight(1, 3 * hidden, hidden, fan_in=hidden)
    b = g.const(np.zeros((1, 6 * hidden), np.float32), "b")
    _, last = g.ops("GRU", [x, w, r, b], 2, hidden_size=hidden, linear_before_reset=1)
    x = g.op("Reshape", [last, g.const(np.array([1, hidden], np.int64))])
    return g.op("Softmax", [g.gemm(x, hidden, 12)], axis=-1)


ARCHS = {
    "resnet18": (resnet18, [1, 3, 224, 224]),
    "mobilenetv2": (mobilenetv2, [1, 3, 224, 224]),
    "shufflenet": (shufflenet, [1, 3, 224, 224]),
    "squeezenet": (squeezenet, [1, 3, 224, 224]),
    "encoder": (encoder, [1, 128, 256]),
    "tcn": (tcn, [1, 40, 101]),
}


def build(name: str, seed: int) -> onnx.ModelProto:
    fn, shape = ARCHS[name]
    g = Graph(np.random.default_rng(seed))
    y = fn(g, "x")
    graph = helper.make_graph(
        g.nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, None)], g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    model = onnx.shape_inference.infer_shapes(model)
    onnx.checker.check_model(model, full_check=True)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=pathlib.Path, default=pathlib.Path("/tmp/archs"))
    ap.add_argument("--only", nargs="*", choices=sorted(ARCHS), default=None)
    ap.add_argument("--seed", type=int, default=7)
    a = ap.parse_args()
    for i, name in enumerate(a.only or ARCHS):
        d = a.out / name
        d.mkdir(parents=True, exist_ok=True)
        model = build(name, a.seed + i)
        onnx.save(model, str(d / "model.onnx"))
        shape = ARCHS[name][1]
        x = np.random.default_rng(a.seed + 100 + i).normal(size=shape).astype(np.float32)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        sess = ort.InferenceSession(str(d / "model.onnx"), options, providers=["CPUExecutionProvider"])
        out = sess.run(None, {"x": x})
        np.savez(d / "in.npz", x=x)
        np.savez(d / "out.npz", **{o.name: v for o, v in zip(sess.get_outputs(), out)})
        print(f"{d}: {len(model.graph.node)} nodes, output {list(out[0].shape)}")


if __name__ == "__main__":
    main()
