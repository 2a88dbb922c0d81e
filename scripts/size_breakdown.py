#!/usr/bin/env python3
"""Where the bytes of an unstripped binary go, by crate.

usage: scripts/size_breakdown.py BINARY [--nm NM] [--top N]

Build with symbols first, e.g.
  CARGO_PROFILE_DIST_STRIP=false cargo build --profile dist -p edge-agent
Attribution is a heuristic, as in cargo-bloat: `<T as Trait>::f` and
`drop_in_place<T>` count for T's crate, anything else for the first path
segment. Generic code instantiated from std for a crate's types therefore
mostly counts for that crate. Sizes are symbol sizes (.text and data);
they add up to less than the file size (unwind tables, relocations).
"""

import argparse
import collections
import re
import subprocess
import sys

LEAD = re.compile(r"^(?:<+|&|\*const |\*mut |dyn |\[)*")


def crate_of(name: str) -> str:
    s = name
    for wrap in ("core::ptr::drop_in_place<", "core::ptr::drop_glue<"):
        if s.startswith(wrap):
            s = s[len(wrap):]
    s = LEAD.sub("", s)
    m = re.match(r"([A-Za-z_][A-Za-z0-9_]*)::", s)
    if m:
        return m.group(1)
    return "[C/asm or unknown]"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("binary")
    ap.add_argument("--nm", default="nm")
    ap.add_argument("--top", type=int, default=30)
    a = ap.parse_args()
    out = subprocess.run(
        [a.nm, "-S", "--size-sort", "-C", "--defined-only", a.binary],
        check=True, capture_output=True, text=True,
    ).stdout
    by = collections.Counter()
    total = 0
    for line in out.splitlines():
        parts = line.split(" ", 3)
        if len(parts) < 4:
            continue
        size = int(parts[1], 16)
        total += size
        by[crate_of(parts[3])] += size
    print(f"{'crate':<32} {'KiB':>8} {'share':>6}")
    for crate, size in by.most_common(a.top):
        print(f"{crate:<32} {size / 1024:>8.0f} {100 * size / total:>5.1f}%")
    print(f"{'total (symbols)':<32} {total / 1024:>8.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
