#!/usr/bin/env python3
"""Drift-detection data for the classifier (models/cls/drift/).

- calib.npz:    300 rendered text lines (seed 21): the baseline that
                `fleetctl bundle pack --baseline` turns into histograms.
- holdout.npz:  300 other lines from the same generator (seed 22): live
                in-distribution traffic for the no-false-alarm test.
- brightness.npz, contrast.npz, blur.npz: 64 lines each (seed 23) captured
                too bright, with low contrast, or out of focus.

Inputs are preprocessed exactly like the goldens (scripts/make_goldens.py)
and stored as float16 (the test widens them to float32) in compressed npz
to keep the repository small. Deterministic.

    python3 scripts/make_drift_sets.py
"""
import io
import pathlib
import zipfile

import numpy as np
from PIL import Image, ImageFilter

import make_goldens as g

OUT = g.ROOT / "models/cls/drift"


def save(name: str, x: np.ndarray) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        npy = io.BytesIO()
        np.lib.format.write_array(npy, np.ascontiguousarray(x.astype(np.float16)), allow_pickle=False)
        z.writestr(zipfile.ZipInfo("x.npy", date_time=(1980, 1, 1, 0, 0, 0)), npy.getvalue(),
                   compress_type=zipfile.ZIP_DEFLATED)
    (OUT / name).write_bytes(buf.getvalue())
    print(f"{name}: {x.shape} {len(buf.getvalue()) // 1024} KiB")


def lines(seed: int, n: int) -> list:
    return g.varied_lines(np.random.default_rng(seed), n)


def shifted(imgs: list, how: str) -> np.ndarray:
    out = []
    for img in imgs:
        if how == "blur":
            img = img.filter(ImageFilter.GaussianBlur(2.5))
            a = np.asarray(img, dtype=np.float32)
        else:
            a = np.asarray(img, dtype=np.float32)
            if how == "brightness":
                a = a * 0.55          # an underexposed capture
            elif how == "contrast":
                a = 128.0 + (a - 128.0) * 0.35
        out.append(g.preprocess(Image.fromarray(a.clip(0, 255).astype(np.uint8)), 192))
    return np.stack(out)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    save("calib.npz", np.stack([g.preprocess(i, 192) for i in lines(21, 300)]))
    save("holdout.npz", np.stack([g.preprocess(i, 192) for i in lines(22, 300)]))
    base = lines(23, 64)
    for how in ["brightness", "contrast", "blur"]:
        save(f"{how}.npz", shifted(base, how))


if __name__ == "__main__":
    main()
