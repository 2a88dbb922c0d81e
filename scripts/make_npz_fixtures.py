#!/usr/bin/env python3
"""npz files written by numpy itself, for the Rust npz reader's tests.

The goldens under models/ are written by a small deterministic writer
(make_goldens.save_npz: plain stored zip entries, fixed timestamps), because
numpy.savez stamps every entry with the current time. Real users' files come
from numpy.savez / numpy.savez_compressed, which differ from ours: numpy
forces zip64 extra fields on every entry (numpy gh-10776), and
savez_compressed uses deflate. These fixtures make sure the reader accepts
exactly what numpy writes.

Content: the inputs of models/multi/golden/in_0.npz (`x` float32 [1,8] and
`step/ids` int64 [1,4]; the '/' in the key is kept verbatim by numpy).

The zip timestamp is pinned while numpy writes, so re-running reproduces
byte-identical files.

    python3 scripts/make_npz_fixtures.py
"""
import contextlib
import time
import types
import zipfile

import numpy as np

from make_goldens import ROOT

OUT = ROOT / "tests/data/npz"
EPOCH_1980 = time.struct_time((1980, 1, 1, 0, 0, 0, 1, 1, 0))


@contextlib.contextmanager
def pinned_zip_clock():
    """Make zipfile see 1980-01-01 00:00:00 as 'now'."""
    real = zipfile.time
    zipfile.time = types.SimpleNamespace(
        time=lambda: 315532800.0,
        localtime=lambda *_: EPOCH_1980,
        gmtime=lambda *_: EPOCH_1980,
    )
    try:
        yield
    finally:
        zipfile.time = real


def main() -> None:
    src = np.load(ROOT / "models/multi/golden/in_0.npz")
    arrays = {k: src[k] for k in src.files}
    assert arrays["x"].dtype == np.float32 and arrays["step/ids"].dtype == np.int64
    OUT.mkdir(parents=True, exist_ok=True)
    with pinned_zip_clock():
        np.savez(OUT / "savez_multi_in_0.npz", **arrays)
        np.savez_compressed(OUT / "savez_compressed_multi_in_0.npz", **arrays)
    for name in ["savez_multi_in_0.npz", "savez_compressed_multi_in_0.npz"]:
        path = OUT / name
        back = np.load(path)
        assert sorted(back.files) == sorted(arrays), back.files
        for k, v in arrays.items():
            assert back[k].dtype == v.dtype and np.array_equal(back[k], v), k
        with zipfile.ZipFile(path) as z:
            info = [(i.filename, i.compress_type, len(i.extra)) for i in z.infolist()]
        print(f"{path.relative_to(ROOT)}: {path.stat().st_size} bytes, entries (name, method, extra len) {info}")


if __name__ == "__main__":
    main()
