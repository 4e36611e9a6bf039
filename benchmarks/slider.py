"""The Segment dock's threshold slider on a large stack: seconds per update.

``xvfb-run -a python -m benchmarks.slider [--slices 64] [--size 1024] [--moves 5] [--markdown FILE]``
(napari needs a display).

A grey ``slices`` x ``size`` x ``size`` stack is segmented once in napari with ``drive-vessels``
(scope "Current slice", so the network runs on one slice; the kept probabilities cover the
whole stack). The slider is then moved ``moves`` times; each move is timed from the value
being set to the mask layer holding the new mask, which is what a user waits for after
releasing the slider: the check that the mask was not painted on, the threshold, the
clean-up, the checksums of the record and napari's refresh of the Labels layer. The same
numeric steps are also timed on their own.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from benchmarks import write_between_markers


def _wait(widget, timeout: float = 600.0) -> None:
    from qtpy.QtWidgets import QApplication

    end = time.monotonic() + timeout
    while widget.running:
        if time.monotonic() > end:
            raise TimeoutError("the Segment run did not finish")
        QApplication.processEvents()
        time.sleep(0.01)


def measure(slices: int, size: int, moves: int) -> list[dict]:
    import napari

    from napari_r2au.postprocess import clean_mask, mask_checksum, mask_checksums
    from napari_r2au.widgets.segment import CURRENT_SLICE

    rng = np.random.default_rng(0)
    stack = rng.integers(0, 255, (slices, size, size), dtype=np.uint8)
    viewer = napari.Viewer(show=False)
    try:
        viewer.add_image(stack, name="stack")
        _, widget = viewer.window.add_plugin_dock_widget("napari-r2au", "Segment")
        widget._model._choice.value = "drive-vessels"
        widget._scope.value = CURRENT_SLICE
        widget._attention.value = False
        widget.run()
        _wait(widget)
        mask_layer = viewer.layers["stack mask"]
        probabilities = widget.prediction.probabilities
        # give every slice a realistic probability map, so each threshold changes the mask
        probabilities[:] = rng.random(probabilities.shape, dtype=np.float32)
        seconds = []
        for level in np.round(np.linspace(0.3, 0.7, moves), 2):
            start = time.perf_counter()
            widget._threshold.value = float(level)
            seconds.append(time.perf_counter() - start)
            assert mask_layer.metadata["r2au"]["threshold"] == widget._threshold.value
        mask = mask_layer.data
        parts = {
            "painted-on check (checksum of the layer's mask)": lambda: mask_checksum(mask),
            "threshold": lambda: widget.prediction.mask(0.5),
            "clean-up (off, as by default)": lambda: clean_mask(mask),
            "checksums of the new mask (whole and per slice)": lambda: mask_checksums(mask),
        }
        rows = [
            {
                "step": f"slider update in napari ({slices}x{size}x{size} stack), median of {moves}",
                "seconds": statistics.median(seconds),
            }
        ]
        for name, func in parts.items():
            func()
            start = time.perf_counter()
            func()
            rows.append({"step": f"of which: {name}", "seconds": time.perf_counter() - start})
        return rows
    finally:
        viewer.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.slider", description=__doc__)
    parser.add_argument("--slices", type=int, default=64)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--moves", type=int, default=5)
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args(argv)
    rows = measure(args.slices, args.size, args.moves)
    lines = ["| step | seconds |", "|---|---|"] + [f"| {r['step']} | {r['seconds']:.3f} |" for r in rows]
    command = f"`xvfb-run -a python -m benchmarks.slider --slices {args.slices} --size {args.size} --moves {args.moves}`"
    text = "\n".join([f"Command: {command}", "", *lines])
    print(text)
    if args.markdown:
        write_between_markers(args.markdown, text, "<!-- slider -->", "<!-- /slider -->")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
