"""A stack segmented by a model that works at another scale: time and peak memory.

``python -m benchmarks.stack_scale [--slices 100] [--size 1024] [--scale 0.5] [--markdown FILE]``

A lazy (dask) grey stack of ``slices`` x ``size`` x ``size`` uint8 planes is segmented
with ``drive-vessels`` at ``--scale``, as the Segment widget's "Current slice" (one
slice) and "All slices" do. Each run is a child process, so its peak RSS is its own.
The engine resizes a stack one plane at a time as the network reads it; before that it
loaded and resized the whole stack for any run, one slice included.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import write_between_markers

ROOT = Path(__file__).resolve().parents[1]


def child(slices: int, size: int, scale: float, which: str) -> None:
    """Predict one slice or all of a lazy stack; print seconds and peak RSS."""
    import dask.array as da
    import numpy as np

    from napari_r2au.engine import predict
    from napari_r2au.model_files import load_model

    model = load_model("drive-vessels")
    rng = np.random.default_rng(0)
    plane = rng.integers(0, 255, (size, size), dtype=np.uint8)
    # planes made on demand, so the stack costs nothing until read
    stack = da.stack(
        [da.from_delayed(_delayed_plane(plane, z), (size, size), np.uint8) for z in range(slices)]
    )
    chosen = [slices // 2] if which == "one" else None
    start = time.perf_counter()
    predict(model, stack, axes="ZYX", scale=scale, slices=chosen, batch_size=2)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB -> GiB
    print(json.dumps({"seconds": seconds, "peak_gib": peak}))


def _delayed_plane(plane, z: int):
    import dask

    return dask.delayed(lambda: (plane + z).astype(plane.dtype))()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.stack_scale",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--scale", type=float, default=0.5)
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--child", choices=["one", "all"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.slices, args.size, args.scale, args.child)
        return 0
    gib = args.slices * args.size**2 / 1024**3
    rows = ["| run | seconds | peak RSS (GiB) |", "|---|---|---|"]
    for which, label in (("one", "Current slice (1 slice)"), ("all", f"All slices ({args.slices})")):
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "benchmarks.stack_scale",
                "--child",
                which,
                "--slices",
                str(args.slices),
                "--size",
                str(args.size),
                "--scale",
                str(args.scale),
            ],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
        )
        result = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(f"| {label} | {result['seconds']:.1f} | {result['peak_gib']:.2f} |")
        print(rows[-1], flush=True)
    text = (
        f"Command: `python -m benchmarks.stack_scale --slices {args.slices} --size {args.size} "
        f"--scale {args.scale:g}`\n\n`drive-vessels` at scale {args.scale:g} on a lazy (dask) uint8 stack of "
        f"{args.slices} x {args.size} x {args.size} ({gib:.2f} GiB as uint8, {4 * gib:.2f} GiB as float32):\n\n"
        + "\n".join(rows)
        + "\n"
    )
    print(text)
    if args.markdown:
        write_between_markers(args.markdown, text, begin="<!-- stack-scale -->", end="<!-- /stack-scale -->")
    return 0


if __name__ == "__main__":
    sys.exit(main())
