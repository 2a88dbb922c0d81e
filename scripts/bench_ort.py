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


def op_profile(a, feeds) -> list:
    """Mean time per inference by ONNX op type, from ORT's profiler (a
    separate session, so the timed runs above are not slowed down)."""
    import os
    import tempfile
    from collections import defaultdict

    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    so.inter_op_num_threads = 1
    so.enable_profiling = True
    so.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "ort")
    sess = ort.InferenceSession(a.model, so, providers=["CPUExecutionProvider"])
    for _ in range(a.warmup):
        sess.run(None, feeds)
    n = max(5, a.iterations)
    for _ in range(n):
        sess.run(None, feeds)
    path = sess.end_profiling()
    by_op = defaultdict(float)
    nodes = defaultdict(set)
    for ev in json.load(open(path)):
        if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time"):
            op = ev.get("args", {}).get("op_name", "?")
            by_op[op] += ev["dur"] / 1e3
            nodes[op].add(ev["name"])
    runs = n + a.warmup
    top = sorted(by_op.items(), key=lambda kv: -kv[1])[: a.profile]
    return [{"op": op, "nodes": len(nodes[op]), "ms": ms / runs} for op, ms in top]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--inputs", required=True, help="golden inputs .npz")
    ap.add_argument("--iterations", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="also print the N op types ORT spent most time in (its own profiler)")
    a = ap.parse_args()

    feeds = dict(np.load(a.inputs))
    rss_before = rss_bytes()
    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
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
    profile = op_profile(a, feeds) if a.profile else []
    pct = lambda p: samples[min(len(samples) - 1, round((len(samples) - 1) * p))]  # noqa: E731
    print(json.dumps({
        "mode": "onnxruntime",
        "ort_version": ort.__version__,
        "threads": a.threads,
        "profile": profile,
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
