"""Does napari stay responsive while the Worklist dock works? A heartbeat measures it.

``python -m benchmarks.worklist_stall [--dataset DRIVE|HRF] [--cases N] [--markdown FILE]``
(under Xvfb: ``xvfb-run -a python -m benchmarks.worklist_stall``) opens the Worklist dock
through the plugin manifest on N photographs of ../shared/data, and runs a 10 ms Qt timer
on the GUI thread the whole time. Each gap between two beats beyond 10 ms is time the event
loop could not answer (a click, a repaint). It reports the longest gap and the 99th
percentile during pre-segmentation (the network runs in a worker), while opening each
case (read on the GUI thread), and around the background save of an edit. The issue's
target: no stall over 100 ms during pre-segmentation.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import write_between_markers

DATA = Path(os.environ.get("R2AU_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
FOLDERS = {"DRIVE": DATA / "DRIVE" / "training" / "images", "HRF": DATA / "HRF" / "images"}
BEAT_MS = 10


class Heartbeat:
    """A 10 ms timer on the GUI thread that keeps the gaps between its beats, by phase."""

    def __init__(self) -> None:
        from qtpy.QtCore import QTimer

        self.phase = "idle"
        self.gaps: dict[str, list[float]] = {}
        self._last = time.perf_counter()
        self._timer = QTimer()
        self._timer.setInterval(BEAT_MS)
        self._timer.timeout.connect(self._beat)
        self._timer.start()

    def _beat(self) -> None:
        now = time.perf_counter()
        self.gaps.setdefault(self.phase, []).append(1000 * (now - self._last))
        self._last = now

    def enter(self, phase: str) -> None:
        self._beat()  # the gap so far belongs to the phase before
        self.phase = phase

    def stop(self) -> None:
        self._timer.stop()


def pump(seconds: float) -> None:
    from qtpy.QtWidgets import QApplication

    app, end = QApplication.instance(), time.perf_counter() + seconds
    while time.perf_counter() < end:
        app.processEvents()
        time.sleep(0.002)


def pump_until(done, timeout: float = 1800.0) -> None:
    from qtpy.QtWidgets import QApplication

    app, end = QApplication.instance(), time.perf_counter() + timeout
    while not done():
        if time.perf_counter() > end:
            raise TimeoutError(f"not done after {timeout:.0f} s")
        app.processEvents()
        time.sleep(0.002)


def settled(widget) -> bool:
    """The case asked for is on screen: read, and its layers placed."""
    return not widget.opening and widget._next_step is None


def summary(gaps: list[float]) -> dict[str, float]:
    values = np.asarray(gaps or [0.0])
    return {
        "beats": int(values.size),
        "max_ms": round(float(values.max()), 1),
        "p99_ms": round(float(np.percentile(values, 99)), 1),
        "over_100ms": int(np.count_nonzero(values > 100)),
    }


def measure(dataset: str, n_cases: int, model: str) -> dict[str, dict[str, float]]:
    import napari

    folder = FOLDERS[dataset]
    if not folder.is_dir():
        raise SystemExit(f"{folder}: not found (see ../shared/data/README.md)")
    work = Path(tempfile.mkdtemp(prefix="r2au-stall-"))
    try:
        cases = work / "images"
        cases.mkdir()
        for path in sorted(folder.iterdir())[:n_cases]:
            (cases / path.name).symlink_to(path)
        viewer = napari.Viewer()
        _, widget = viewer.window.add_plugin_dock_widget("napari-r2au", "Worklist")
        widget._model.refresh(select=model)
        widget._folder.value = str(work / "worklist")
        widget._cases.value = str(cases)
        pump(1.0)
        beat = Heartbeat()
        beat.enter("open worklist")
        widget.open_worklist()
        pump_until(lambda: settled(widget))  # the first case's files are read in a worker
        beat.enter("pre-segment")
        widget.presegment()
        pump_until(lambda: not widget.running and settled(widget))
        beat.enter("open a case")
        for _ in range(len(widget.worklist.cases) - 1):
            widget.step(1)
            pump_until(lambda: settled(widget))
            beat.enter("idle")
            pump(0.3)
            beat.enter("open a case")
        beat.enter("edit and save")
        layer = widget._mask_layer
        for index in range(5):  # five strokes, saved in the background after the pause
            layer.paint((50 + 10 * index, 50), 1)
            pump(0.05)
        pump(3.0)
        beat.enter("idle")
        beat.stop()
        widget.close_worklist()
        viewer.close()
        return {phase: summary(gaps) for phase, gaps in beat.gaps.items() if phase != "idle"}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.worklist_stall", description=__doc__)
    parser.add_argument("--dataset", choices=sorted(FOLDERS), default="DRIVE")
    parser.add_argument("--cases", type=int, default=5)
    parser.add_argument("--model", default="retina-vessels")
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args(argv)
    results = measure(args.dataset, args.cases, args.model)
    command = f"worklist_stall --dataset {args.dataset} --cases {args.cases} --model {args.model}"
    report(results, command, args.markdown, f"stall-{args.dataset.lower()}")
    return 0


def report(results: dict[str, dict[str, float]], command: str, markdown: Path | None, marker: str) -> str:
    """The heartbeat table of a run, printed and (with ``markdown``) put between the file's
    ``<!-- marker -->`` lines; shared by the GUI stall benchmarks."""
    lines = [
        f"Command: `xvfb-run -a python -m benchmarks.{command}` "
        f"(threads: {os.environ.get('OMP_NUM_THREADS', 'default')})",
        "",
        "| phase | heartbeats | longest gap (ms) | 99th percentile (ms) | gaps over 100 ms |",
        "|---|---|---|---|---|",
    ]
    for phase, row in results.items():
        lines.append(
            f"| {phase} | {row['beats']} | {row['max_ms']} | {row['p99_ms']} | {row['over_100ms']} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if markdown:
        write_between_markers(markdown, text, f"<!-- {marker} -->", f"<!-- /{marker} -->")
    return text


if __name__ == "__main__":
    raise SystemExit(main())
