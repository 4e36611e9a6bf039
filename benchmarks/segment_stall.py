"""Does napari stay responsive while the Segment dock runs? The worklist's heartbeat, on Segment.

``xvfb-run -a python -m benchmarks.segment_stall [--model NAME] [--markdown FILE]`` opens the
Segment dock through the plugin manifest on the plugin's sample photograph and runs the 10 ms
heartbeat of :mod:`benchmarks.worklist_stall` on the GUI thread while Segment runs (with and
without the uncertainty map), and while the threshold slider moves over the kept
probabilities. It reports the longest gap between beats and the 99th percentile per phase.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.worklist_stall import Heartbeat, pump, pump_until, report, summary


def measure(model: str) -> dict[str, dict[str, float]]:
    import napari

    viewer = napari.Viewer()
    viewer.open_sample("napari-r2au", "retina")
    _, widget = viewer.window.add_plugin_dock_widget("napari-r2au", "Segment")
    widget._model.refresh(select=model)
    pump(1.0)
    beat = Heartbeat()
    # the first run includes importing torch and loading the model
    for index, uncertainty in enumerate((False, True, False)):
        widget._uncertainty.value = uncertainty
        flips = "with the uncertainty map (3 passes)" if uncertainty else "one pass"
        beat.enter("Segment, first run" if index == 0 else f"Segment, {flips}")
        widget.run()
        pump_until(lambda: not widget.running)
        beat.enter("idle")
        pump(0.5)
    beat.enter("threshold slider")
    for level in (0.3, 0.4, 0.5, 0.35, 0.25):
        widget._threshold.value = level
        pump(0.1)
    beat.enter("idle")
    beat.stop()
    viewer.close()
    return {phase: summary(gaps) for phase, gaps in beat.gaps.items() if phase != "idle"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.segment_stall", description=__doc__)
    parser.add_argument("--model", default="retina-vessels")
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args(argv)
    results = measure(args.model)
    report(results, f"segment_stall --model {args.model}", args.markdown, "stall-segment")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
