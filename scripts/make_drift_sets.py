#!/usr/bin/env python3
"""Drift-detection data for the classifier (models/cls/drift/) and the
recognizer (models/rec/drift/).

- calib.npz:    300 rendered text lines (seed 21): the baseline that
                `fleetctl bundle pack --baseline` turns into histograms.
- holdout.npz:  300 other lines from the same generator (seed 22): live
                in-distribution traffic for the no-false-alarm test.
- brightness.npz, contrast.npz, blur.npz: 64 lines each (seed 23) captured
                too bright, with low contrast, or out of focus.

The recognizer's sets are upright lines (no 180° turns), 320 wide, 400
lines in calib/holdout. Inputs are preprocessed exactly like the goldens (scripts/make_goldens.py)
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

CLS = g.ROOT / "models/cls/drift"
REC = g.ROOT / "models/rec/drift"


def save(out: pathlib.Path, name: str, x: np.ndarray) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        npy = io.BytesIO()
        np.lib.format.write_array(npy, np.ascontiguousarray(x.astype(np.float16)), allow_pickle=False)
        z.writestr(zipfile.ZipInfo("x.npy", date_time=(1980, 1, 1, 0, 0, 0)), npy.getvalue(),
                   compress_type=zipfile.ZIP_DEFLATED)
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_bytes(buf.getvalue())
    print(f"{out.relative_to(g.ROOT)}/{name}: {x.shape} {len(buf.getvalue()) // 1024} KiB")


def lines(seed: int, n: int, rotate: bool = True) -> list:
    return g.varied_lines(np.random.default_rng(seed), n, rotate)


def shifted(imgs: list, how: str, width: int = 192) -> np.ndarray:
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
        out.append(g.preprocess(Image.fromarray(a.clip(0, 255).astype(np.uint8)), width))
    return np.stack(out)


def main() -> None:
    save(CLS, "calib.npz", np.stack([g.preprocess(i, 192) for i in lines(21, 300)]))
    save(CLS, "holdout.npz", np.stack([g.preprocess(i, 192) for i in lines(22, 300)]))
    base = lines(23, 64)
    for how in ["brightness", "contrast", "blur"]:
        save(CLS, f"{how}.npz", shifted(base, how))

    save(REC, "calib.npz", np.stack([g.preprocess(i, 320) for i in lines(31, 400, False)]))
    save(REC, "holdout.npz", np.stack([g.preprocess(i, 320) for i in lines(32, 400, False)]))
    base = lines(33, 64, False)
    for how in ["brightness", "contrast", "blur"]:
        save(REC, f"{how}.npz", shifted(base, how, 320))


if __name__ == "__main__":
    main()
