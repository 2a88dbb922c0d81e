#!/usr/bin/env python3
"""Golden inputs and ONNX Runtime reference outputs for the shipped models.

Inputs are realistic: text lines rendered with Pillow, preprocessed exactly
as PaddleOCR does (resize to height 48 keeping the aspect ratio, normalize
(px/255 - 0.5) / 0.5, pad right with zeros, CHW float32). References come
from onnxruntime on one CPU thread, never from tract.

Deterministic: fixed texts and seeds; re-running produces identical files.

    pip install -r scripts/requirements.txt
    python3 scripts/make_goldens.py
"""
import io
import pathlib
import sys
import zipfile

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageDraw, ImageFilter, ImageFont

ROOT = pathlib.Path(__file__).resolve().parent.parent
CLS = ROOT / "models/cls/ch_ppocr_mobile_v2.0_cls_infer.onnx"
REC = ROOT / "models/rec/ch_PP-OCRv4_rec_infer.onnx"


def font(size: int):
    for p in ["/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"]:
        if pathlib.Path(p).exists():
            return ImageFont.truetype(p, size)
    return ImageFont.load_default(size=size)


def render_line(text: str, size: int = 32, pad: int = 6) -> Image.Image:
    """Black text on white, cropped to the text with a small margin."""
    f = font(size)
    left, top, right, bottom = f.getbbox(text)
    img = Image.new("RGB", (right - left + 2 * pad, bottom - top + 2 * pad), "white")
    ImageDraw.Draw(img).text((pad - left, pad - top), text, fill="black", font=f)
    return img


def preprocess(img: Image.Image, width: int) -> np.ndarray:
    """PaddleOCR's resize_norm_img for cls/rec: [3, 48, width] float32."""
    h = 48
    w = min(width, int(np.ceil(h * img.width / img.height)))
    img = img.convert("RGB").resize((w, h), Image.BILINEAR)
    a = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0
    a = (a - 0.5) / 0.5
    out = np.zeros((3, h, width), dtype=np.float32)
    out[:, :, :w] = a
    return out


def session(path: pathlib.Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def save_npz(path: pathlib.Path, arrays: dict) -> None:
    """numpy.savez with a fixed zip timestamp, so files are byte-identical."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for name, arr in arrays.items():
            npy = io.BytesIO()
            np.lib.format.write_array(npy, np.ascontiguousarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            z.writestr(info, npy.getvalue())
    path.write_bytes(buf.getvalue())


def run(sess: ort.InferenceSession, feeds: dict) -> dict:
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


CLS_TEXTS = [
    ("Invoice 2024-11 total 128.50", False),
    ("Shipping label: FRAGILE", False),
    ("Meeting room 4B at 10:30", True),
    ("Serial No. 00X-7781-QZ", True),
]

REC_TEXTS = ["HELLO WORLD 2024", "edge fleet 42"]


def cls_goldens() -> None:
    sess = session(CLS)
    for i, (text, rotated) in enumerate(CLS_TEXTS):
        img = render_line(text)
        if rotated:
            img = img.rotate(180)
        x = preprocess(img, 192)[None]
        out = run(sess, {"x": x})
        probs = next(iter(out.values()))[0]
        label = int(np.argmax(probs))
        print(f"cls case {i}: {text!r} rotated={rotated} probs={probs} -> {'180' if label else '0'}")
        if label != int(rotated):
            sys.exit(f"cls case {i} misclassified by ORT; pick another text")
        save_npz(ROOT / f"models/cls/golden/in_{i}.npz", {"x": x})
        save_npz(ROOT / f"models/cls/golden/out_{i}.npz", out)


def varied_lines(rng: np.random.Generator, n: int, rotate: bool = True) -> list:
    words = ["total", "PAID", "2024", "route", "Batch", "No.", "A-17", "kg", "exit", "Model",
             "check", "value", "3.14", "Lot", "east", "QTY", "order", "#88", "cold", "Zone"]
    lines = []
    for _ in range(n):
        text = " ".join(rng.choice(words, size=rng.integers(2, 5)))
        img = render_line(text, size=int(rng.integers(24, 40)))
        if rng.random() < 0.5 and rotate:
            img = img.rotate(180)
        lines.append(img)
    return lines


def calibration_sets() -> None:
    rng = np.random.default_rng(7)
    calib = np.stack([preprocess(img, 192) for img in varied_lines(rng, 64)])
    save_npz(ROOT / "models/cls/calib.npz", {"x": calib})
    rng = np.random.default_rng(11)
    shifted = []
    for img in varied_lines(rng, 64):
        # Out of distribution: dim, low-contrast, blurred captures.
        a = np.asarray(img.filter(ImageFilter.GaussianBlur(2.0)), dtype=np.float32)
        a = 40.0 + a * 0.35
        shifted.append(preprocess(Image.fromarray(a.clip(0, 255).astype(np.uint8)), 192))
    save_npz(ROOT / "models/cls/shifted.npz", {"x": np.stack(shifted)})
    print("calibration: models/cls/calib.npz, models/cls/shifted.npz (64 lines each)")


def ctc_decode(probs: np.ndarray, chars: list) -> str:
    idx = probs.argmax(axis=-1)
    out, prev = [], 0
    for k in idx:
        if k != prev and k != 0:
            out.append(chars[k - 1] if k - 1 < len(chars) else "?")
        prev = k
    return "".join(out)


def rec_goldens() -> None:
    sess = session(REC)
    meta = sess.get_modelmeta().custom_metadata_map
    chars = meta["character"].splitlines() + [" "]
    for i, text in enumerate(REC_TEXTS):
        x = preprocess(render_line(text), 320)[None]
        out = run(sess, {"x": x})
        probs = next(iter(out.values()))[0]
        print(f"rec case {i}: rendered {text!r} -> decoded {ctc_decode(probs, chars)!r}, output {probs.shape}")
        save_npz(ROOT / f"models/rec/golden/in_{i}.npz", {"x": x})
        save_npz(ROOT / f"models/rec/golden/out_{i}.npz", out)


if __name__ == "__main__":
    cls_goldens()
    rec_goldens()
    calibration_sets()
