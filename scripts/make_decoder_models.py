#!/usr/bin/env python3
"""Three small U-Net-like decoders, for measuring what models/ lacks:
ConvTranspose and Resize, the ops of segmentation and detection heads.

Each is a 3 x 256 x 256 image through three stride-2 3x3 convolutions and
one more at 32 x 32, then:
  deconv: two ConvTranspose (2x2 stride 2; 4x4 stride 2 pad 1) to 128 x 128;
  resize: three Resize 2x (nearest, linear half_pixel, linear align_corners);
  both:   the two ConvTranspose, then one linear Resize 2x;
and a 1x1 convolution to two channels. Weights and input are drawn from a
fixed seed; the output is ONNX Runtime's on one thread. Written to OUT
(default /tmp/decoders) as NAME.onnx, NAME_in.npz and NAME_out.npz.

    python3 scripts/make_decoder_models.py [--out DIR]
    fleetctl bundle pack --model DIR/both.onnx --golden-inputs DIR/both_in.npz \
        --golden-outputs DIR/both_out.npz ...
    edge-agent bench --bundle both.bundle --mode bare --profile 8 ...
    python3 scripts/bench_ort.py --model DIR/both.onnx --inputs DIR/both_in.npz --profile 8
"""
import argparse
import pathlib

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def decoder(kind: str, rng: np.random.Generator) -> onnx.ModelProto:
    nodes, inits = [], []

    def weight(name, *shape):
        inits.append(numpy_helper.from_array((rng.normal(size=shape) * 0.1).astype(np.float32), name))
        return name

    def conv(x, name, cin, cout, stride):
        w, b = weight(f"{name}_w", cout, cin, 3, 3), weight(f"{name}_b", cout)
        nodes.append(helper.make_node("Conv", [x, w, b], [f"{name}_c"], pads=[1] * 4, strides=[stride] * 2))
        nodes.append(helper.make_node("Relu", [f"{name}_c"], [name]))
        return name

    x = conv("x", "e1", 3, 16, 2)
    x = conv(x, "e2", 16, 32, 2)
    x = conv(x, "e3", 32, 64, 2)
    x = conv(x, "m", 64, 64, 1)
    channels = 64
    if kind in ("deconv", "both"):
        w, b = weight("d1_w", 64, 32, 2, 2), weight("d1_b", 32)
        nodes.append(helper.make_node("ConvTranspose", [x, w, b], ["d1"], strides=[2, 2]))
        w, b = weight("d2_w", 32, 16, 4, 4), weight("d2_b", 16)
        nodes.append(helper.make_node("ConvTranspose", ["d1", w, b], ["d2"], strides=[2, 2], pads=[1] * 4))
        x, channels = "d2", 16
    if kind in ("resize", "both"):
        inits.append(numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"))
        modes = [("linear", "half_pixel")] if kind == "both" else [
            ("nearest", "half_pixel"), ("linear", "half_pixel"), ("linear", "align_corners")]
        for i, (mode, transform) in enumerate(modes):
            nodes.append(helper.make_node("Resize", [x, "", "scales"], [f"r{i}"], mode=mode,
                                          coordinate_transformation_mode=transform))
            x = f"r{i}"
    side = {"deconv": 128, "resize": 256, "both": 256}[kind]
    w, b = weight("o_w", 2, channels, 1, 1), weight("o_b", 2)
    nodes.append(helper.make_node("Conv", [x, w, b], ["y"]))
    graph = helper.make_graph(
        nodes, kind, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 256, 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, side, side])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=pathlib.Path, default=pathlib.Path("/tmp/decoders"))
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for kind in ("deconv", "resize", "both"):
        path = a.out / f"{kind}.onnx"
        onnx.save(decoder(kind, rng), str(path))
        x = rng.normal(size=(1, 3, 256, 256)).astype(np.float32)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        y = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        np.savez(a.out / f"{kind}_in.npz", x=x)
        np.savez(a.out / f"{kind}_out.npz", y=y)
        print(f"{path}: output {list(y.shape)}")


if __name__ == "__main__":
    main()
