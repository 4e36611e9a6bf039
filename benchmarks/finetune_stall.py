"""Does napari stay responsive while the Fine-tune dock trains? The worklist's heartbeat, on Fine-tune.

``xvfb-run -a python -m benchmarks.finetune_stall [--model NAME] [--steps N] [--markdown FILE]``
opens a DRIVE photograph of ../shared/data, segments it with the Segment dock (opened through
the plugin manifest), replaces the mask with the photograph's manual one as a reviewer's
correction would, and fine-tunes on it with the Fine-tune dock at its default settings (the
steps can be lowered for a quick look). A 10 ms Qt timer runs on the GUI thread the whole
time: each gap between two beats is time napari could not answer a click or repaint. It
reports the longest gap, the 99th percentile and the gaps over 100 ms while the model is
prepared and trained (the loss curve redrawn at every step) and while the new model is put
to use (registered, chosen in Segment, the photograph segmented again).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from benchmarks import models_home
from benchmarks.worklist_stall import DATA, Heartbeat, pump, pump_until, report, summary

PHOTOGRAPH = DATA / "DRIVE" / "training" / "images" / "21_training.tif"
MANUAL = DATA / "DRIVE" / "training" / "1st_manual" / "21_manual1.gif"


def measure(model: str, steps: int | None) -> dict[str, dict[str, float]]:
    """The heartbeat's gaps by phase; the fine-tuned model goes to a temporary models folder."""
    if not PHOTOGRAPH.is_file() or not MANUAL.is_file():
        raise SystemExit(f"{PHOTOGRAPH.parent.parent}: DRIVE not found (see ../shared/data/README.md)")
    with tempfile.TemporaryDirectory(prefix="r2au-finetune-stall-") as home, models_home(home):
        return _measure(model, steps)


def _measure(model: str, steps: int | None) -> dict[str, dict[str, float]]:
    import napari
    from PIL import Image

    viewer = napari.Viewer()
    viewer.open(str(PHOTOGRAPH), plugin="napari-r2au")
    base = viewer.layers[-1].name
    _, segment = viewer.window.add_plugin_dock_widget("napari-r2au", "Segment")
    _, finetune = viewer.window.add_plugin_dock_widget("napari-r2au", "Fine-tune")
    segment._model.refresh(select=model)
    finetune._model.refresh(select=model)
    if steps is not None:
        finetune._steps.value = steps
    pump(1.0)
    segment.run()
    pump_until(lambda: not segment.running)
    mask = viewer.layers[f"{base} mask"]
    mask.data = (np.asarray(Image.open(MANUAL)) > 127).astype(mask.data.dtype)  # the correction
    finetune._image.value = viewer.layers[base]
    finetune._corrected.value = mask
    pump(0.5)
    beat = Heartbeat()
    beat.enter("fine-tune (prepare and train)")
    finetune.run()
    pump_until(lambda: not finetune.running)
    beat.enter("new model put to use")
    pump(0.2)
    pump_until(lambda: not segment.running)
    pump(0.5)
    beat.enter("idle")
    beat.stop()
    result = finetune.last_result
    viewer.close()
    if result is None or result.model is None:
        raise SystemExit("the fine-tune did not produce a model; see napari's notifications")
    return {phase: summary(gaps) for phase, gaps in beat.gaps.items() if phase != "idle"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.finetune_stall", description=__doc__)
    parser.add_argument("--model", default="retina-vessels")
    parser.add_argument("--steps", type=int, default=None, help="default: the dock's own")
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args(argv)
    results = measure(args.model, args.steps)
    steps = "" if args.steps is None else f" --steps {args.steps}"
    report(results, f"finetune_stall --model {args.model}{steps}", args.markdown, "stall-finetune")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
