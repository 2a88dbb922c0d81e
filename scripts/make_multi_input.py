#!/usr/bin/env python3
"""A small multi-input, multi-output model for the serving tests.

Built with the onnx helper, deterministic weights. It models a recurrent
step whose state the client carries explicitly (the agent keeps no hidden
per-client state):

    inputs:  x         float32 [1, 8]  (features; the previous state is
                                        passed back in by the client)
             step/ids  int64   [1, 4]  (token ids, note the '/' in the name)
    outputs: y         float32 [1, 4]  = tanh(x @ W1 + sum(E[ids]) @ W2 + b)
             state     float32 [1, 8]  = tanh(x @ W3 + y @ W4)

    python3 scripts/make_multi_input.py
"""
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from make_goldens import ROOT, run, save_npz, session

OUT = ROOT / "models/multi/multi_io.onnx"


def build() -> onnx.ModelProto:
    rng = np.random.default_rng(1234)
    w = lambda *shape: (rng.standard_normal(shape) * 0.5).astype(np.float32)  # noqa: E731
    inits = [
        numpy_helper.from_array(w(16, 6), "E"),
        numpy_helper.from_array(w(8, 4), "W1"),
        numpy_helper.from_array(w(6, 4), "W2"),
        numpy_helper.from_array(w(4), "b"),
        numpy_helper.from_array(w(8, 8), "W3"),
        numpy_helper.from_array(w(4, 8), "W4"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
    ]
    nodes = [
        helper.make_node("Gather", ["E", "step/ids"], ["emb"], axis=0),  # [1,4,6]
        helper.make_node("ReduceSum", ["emb", "axis1"], ["pooled"], keepdims=0),  # [1,6]
        helper.make_node("MatMul", ["x", "W1"], ["a"]),
        helper.make_node("MatMul", ["pooled", "W2"], ["c"]),
        helper.make_node("Add", ["a", "c"], ["ac"]),
        helper.make_node("Add", ["ac", "b"], ["pre_y"]),
        helper.make_node("Tanh", ["pre_y"], ["y"]),
        helper.make_node("MatMul", ["x", "W3"], ["s1"]),
        helper.make_node("MatMul", ["y", "W4"], ["s2"]),
        helper.make_node("Add", ["s1", "s2"], ["pre_state"]),
        helper.make_node("Tanh", ["pre_state"], ["state"]),
    ]
    graph = helper.make_graph(
        nodes,
        "multi_io",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8]),
            helper.make_tensor_value_info("step/ids", TensorProto.INT64, [1, 4]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4]),
            helper.make_tensor_value_info("state", TensorProto.FLOAT, [1, 8]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="edgefleet")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


if __name__ == "__main__":
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_bytes(build().SerializeToString())
    sess = session(OUT)
    rng = np.random.default_rng(99)
    state = np.zeros((1, 8), dtype=np.float32)
    for i in range(2):
        x = (rng.standard_normal((1, 8)).astype(np.float32) * 0.5 + state).astype(np.float32)
        ids = rng.integers(0, 16, size=(1, 4)).astype(np.int64)
        feeds = {"x": x, "step/ids": ids}
        out = run(sess, feeds)
        print(f"case {i}: ids {ids[0]} -> y {out['y'][0]}, state[:3] {out['state'][0][:3]}")
        save_npz(ROOT / f"models/multi/golden/in_{i}.npz", feeds)
        save_npz(ROOT / f"models/multi/golden/out_{i}.npz", out)
        state = out["state"]  # the client carries the state into the next call
