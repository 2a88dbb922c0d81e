#!/usr/bin/env python3
"""ONNX Runtime reference run for scripts/bench-inference.sh.

Times session creation, the first inference and N more on one CPU thread,
with the same golden input the agent benchmark uses, and prints one JSON
object with the same latency keys as `edge-agent bench --json`.
"""
import argparse
import json
import time

import numpy as np
import onnxruntime as ort


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--inputs", required=True, help="golden inputs .npz")
    ap.add_argument("--iterations", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=5)
    a = ap.parse_args()

    feeds = dict(np.load(a.inputs))
    rss_before = rss_bytes()
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    t = time.perf_counter()
    sess = ort.InferenceSession(a.model, so, providers=["CPUExecutionProvider"])
    session_ms = (time.perf_counter() - t) * 1e3
    t = time.perf_counter()
    sess.run(None, feeds)
    first_ms = (time.perf_counter() - t) * 1e3
    samples = []
    for i in range(a.warmup + a.iterations):
        t = time.perf_counter()
        sess.run(None, feeds)
        if i >= a.warmup:
            samples.append((time.perf_counter() - t) * 1e3)
    samples.sort()
    pct = lambda p: samples[min(len(samples) - 1, round((len(samples) - 1) * p))]  # noqa: E731
    print(json.dumps({
        "mode": "onnxruntime",
        "ort_version": ort.__version__,
        "iterations": len(samples),
        "session_ms": session_ms,
        "first_inference_ms": first_ms,
        "min_ms": samples[0],
        "median_ms": pct(0.5),
        "p90_ms": pct(0.9),
        "p99_ms": pct(0.99),
        "mean_ms": sum(samples) / len(samples),
        "rss_bytes": rss_bytes(),
        "rss_model_bytes": rss_bytes() - rss_before,
    }))


if __name__ == "__main__":
    main()
