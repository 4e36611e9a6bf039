"""Soak: many consecutive segmentations in one process must not leak memory.

``python -m benchmarks.soak [--runs 200] [--markdown FILE]`` segments a 565x584 fundus-sized
image with the bundled model ``--runs`` times and reports resident memory (RSS) after each
run; the growth after warm-up (the first 10 runs) is the figure to watch (target < 5%).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from benchmarks import write_between_markers


def rss_mib() -> float:
    """Current resident set size (Linux /proc), MiB."""
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    import os

    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args(argv)
    from napari_r2au import load_model, predict

    model = load_model("drive-vessels")
    rng = np.random.default_rng(0)
    curve = []
    for run in range(args.runs):
        image = rng.integers(0, 255, (584, 565, 3), dtype=np.uint8)
        result = predict(model, image, attention=run % 2 == 0)
        result.mask()
        curve.append(rss_mib())
    warm = curve[min(9, len(curve) - 1)]
    growth = (curve[-1] - warm) / warm
    points = ", ".join(
        f"{i + 1}: {curve[i]:.0f}" for i in sorted({0, 9, 49, 99, 149, len(curve) - 1}) if i < len(curve)
    )
    text = (
        f"{args.runs} segmentations (565x584 RGB, drive-vessels, attention every 2nd run): RSS MiB after run "
        f"{points}; growth after warm-up (run 10 -> {args.runs}): {growth:+.2%}"
    )
    print(text)
    if args.markdown:
        write_between_markers(
            args.markdown, f"Command: `python -m benchmarks.soak --runs {args.runs}`\n\n{text}\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
