"""Take the screenshots of the README's napari user guide from a real session of the plugin.

The script drives napari the way a user would (sample data from the plugin's manifest,
the docks from the Plugins menu's commands, the widgets' own buttons, brush strokes
on the Labels layer) and saves the whole window, docks included, after each step to
``docs/images/``. Run it from the repository root under Xvfb:

    OMP_NUM_THREADS=1 xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python docs/make_screenshots.py

It takes about a minute on one CPU thread, the default 150 fine-tuning steps included.
Segment runs first with its defaults (the default model, Scale left at auto): the first
shots are what a new user sees. The correction loop (shots 4-7) then uses ``drive-vessels``,
trained on DRIVE only, whose mask of this photograph has breaks worth correcting. User models go to a scratch folder (``R2AU_HOME=/tmp/r2au-shots-home``,
emptied first), so the fine-tuned model is always ``drive-vessels-ft1`` and never lands
in your own models folder; the exported mask and its JSON sidecar are written to
``/tmp/r2au-shots-home/export/``. Shot 8 is the window at 1366x768 with the three
docks open (they scroll). Shot 9 is the Worklist dock at 1366x768 on five DRIVE photographs
from ../shared/data (skipped when absent), pre-segmented and sorted most uncertain first;
``--worklist-only`` takes only that one.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

HOME = Path("/tmp/r2au-shots-home")
os.environ["R2AU_HOME"] = str(HOME)  # before napari_r2au looks for user models
os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "images"
EXPORT = HOME / "export" / "retina_corrected.tif"
PLUGIN = "napari-r2au"
WINDOW = (1600, 1000)  # width, height of the napari window: the whole Xvfb screen
WIDTH = 1280  # width of the saved PNGs
MAX_BYTES = 400_000

#: brush strokes of the "correction" step, (row, col) in image pixels: two short strokes along
#: thin vessels below and right of the fovea (where an earlier checkpoint left breaks), three
#: spots near them erased
BRIDGES = [((866, 895), (816, 897)), ((870, 1017), (912, 1026))]
ERASE = [(742, 914), (761, 794), (839, 975)]
ZOOM_CENTER, ZOOM = (860, 930), 3.0
REVIEW_ZOOM = 2.0
LAPTOP = (1366, 768)
#: the Scale typed for drive-vessels on this photograph (537 px, DRIVE's field of view, over
#: the 1391 px field the earlier detector found): the strokes below are placed on its mask
DRIVE_SCALE = 0.386  # a small laptop screen: the three docks must still be usable


def pump(seconds: float = 0.3) -> None:
    """Let Qt and the canvas process events (layer changes, redraws) for a moment."""
    from qtpy.QtWidgets import QApplication

    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        QApplication.processEvents()
        time.sleep(0.02)


def wait_idle(*widgets, timeout: float = 900.0) -> None:
    """Process events until the widgets' workers are done (what qtbot.waitUntil does in the tests)."""
    from qtpy.QtWidgets import QApplication

    end = time.perf_counter() + timeout
    while any(w.running for w in widgets):
        if time.perf_counter() > end:
            raise TimeoutError(f"still running after {timeout:.0f} s")
        QApplication.processEvents()
        time.sleep(0.05)
    pump(0.5)


def shot(viewer, name: str) -> Path:
    """The whole window (canvas and docks), downscaled to WIDTH, as a PNG under MAX_BYTES."""
    from PIL import Image

    pump(0.5)
    rgba = viewer.screenshot(canvas_only=False, flash=False)
    image = Image.fromarray(np.asarray(rgba)[..., :3])
    if image.width > WIDTH:
        image = image.resize((WIDTH, round(image.height * WIDTH / image.width)), Image.LANCZOS)
    path = OUT / name
    image.save(path, optimize=True)
    if path.stat().st_size > MAX_BYTES:  # a palette keeps text sharp and the photo recognisable
        image.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
            path, optimize=True
        )
    print(
        f"{path.relative_to(ROOT)}: {image.width}x{image.height}, {path.stat().st_size // 1000} kB",
        flush=True,
    )
    return path


def show_only(viewer, *visible) -> None:
    """Show these layers and hide the others (the eye icons in the layer list)."""
    for layer in viewer.layers:
        layer.visible = layer in visible


def stroke(layer, start, end, label: int) -> None:
    """A brush stroke from start to end, as napari paints a mouse drag (one undo step)."""
    (r0, c0), (r1, c1) = start, end
    n = max(2, int(np.hypot(r1 - r0, c1 - c0)) + 1)
    with layer.block_history():
        for r, c in zip(np.linspace(r0, r1, n), np.linspace(c0, c1, n)):
            layer.paint((r, c), label, refresh=False)
    layer.refresh()


def camera(viewer):
    return viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera  # napari >= 0.9


def main() -> int:
    import napari

    try:  # napari's notice that PyQt5 is deprecated is not the plugin's; its toast would be on every shot
        import napari._qt.qt_main_window as qt_main_window

        qt_main_window.SHOW_QT_WARNING = False
    except (ImportError, AttributeError):
        pass
    import torch

    from napari_r2au.model_files import DEFAULT_MODEL

    torch.set_num_threads(1)
    shutil.rmtree(HOME, ignore_errors=True)
    OUT.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    viewer = napari.Viewer(title="napari-r2au user guide")
    viewer.window._qt_window.resize(*WINDOW)
    pump()

    # 1. File > Open Sample > Fundus photograph, then Plugins > R2AU-Net segmentation > Segment
    (image,) = viewer.open_sample(PLUGIN, "retina")
    base = image.name
    seg_dock, segment = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")
    segment._model._choice.value = DEFAULT_MODEL  # what the dock starts with
    segment._show_advanced.value = True  # to show the Scale field: auto, and after the run its value
    clock = time.perf_counter()
    segment._run.native.click()
    wait_idle(segment)
    print(f"Segment: {time.perf_counter() - clock:.1f} s; {segment._status.value}", flush=True)
    print(f"the Scale field shows {segment._scale.native.text()!r}", flush=True)
    mask = viewer.layers[f"{base} mask"]
    visible = [layer.name for layer in viewer.layers if layer.visible]
    print(f"visible after Segment: {visible}", flush=True)
    viewer.layers.selection.active = mask
    viewer.reset_view()
    shot(viewer, "01-segment.png")

    # 2. the finest attention gate on its own (the photograph hidden)
    gate = viewer.layers[f"{base} attention 1"]
    show_only(viewer, gate)
    viewer.layers.selection.active = gate
    shot(viewer, "02-attention.png")

    # 3. tick "Uncertainty map" and segment again (three passes on flipped copies)
    segment._uncertainty.value = True
    clock = time.perf_counter()
    segment._run.native.click()
    wait_idle(segment)
    print(f"Segment with uncertainty: {time.perf_counter() - clock:.1f} s", flush=True)
    uncertainty = viewer.layers[f"{base} uncertainty"]
    show_only(viewer, image, uncertainty)
    viewer.layers.selection.active = uncertainty
    shot(viewer, "03-uncertainty.png")

    # 4. the correction loop on a model with something to correct: drive-vessels (DRIVE only) at
    #    the scale that gives this photograph DRIVE's field of view, typed in the Scale field, then
    #    two brush strokes along thin vessels where its mask breaks, three spots erased
    segment._model._choice.value = "drive-vessels"
    segment._scale.value = DRIVE_SCALE
    segment._run.native.click()
    wait_idle(segment)
    print(f"Segment with drive-vessels: {segment._status.value}", flush=True)
    mask = viewer.layers[f"{base} mask"]
    show_only(viewer, image, mask)
    viewer.layers.selection.active = mask
    mask.mode = "paint"
    mask.brush_size = 5
    mask.selected_label = 1
    for start, end in BRIDGES:
        stroke(mask, start, end, 1)
    mask.brush_size = 9
    for point in ERASE:
        stroke(mask, point, point, 0)
    mask.brush_size = 5
    camera(viewer).center = ZOOM_CENTER
    camera(viewer).zoom = ZOOM
    shot(viewer, "04-correct.png")
    corrected = mask

    # 5. Plugins > R2AU-Net segmentation > Fine-tune: the default 150 steps on the corrected mask
    seg_dock.hide()
    ft_dock, finetune = viewer.window.add_plugin_dock_widget(PLUGIN, "Fine-tune")
    finetune._image.value = image
    finetune._corrected.value = corrected
    finetune._model._choice.value = "drive-vessels"
    finetune._steps.value = 150  # the default
    finetune._patch.value = 96
    clock = time.perf_counter()
    finetune._run.native.click()
    wait_idle(finetune)
    print(f"Fine-tune: {time.perf_counter() - clock:.1f} s", flush=True)
    wait_idle(segment)  # the re-segmentation with the new model
    new_mask = viewer.layers[f"{base} mask"]
    print(finetune._result.value.replace("\n", " "), flush=True)
    print(
        f"re-segmented with {new_mask.metadata['r2au']['model']}; corrected layer: {corrected.name}",
        flush=True,
    )
    show_only(viewer, image, new_mask)
    viewer.layers.selection.active = new_mask
    viewer.reset_view()
    shot(viewer, "05-finetune.png")

    # 6. Plugins > R2AU-Net segmentation > Review: the new mask against the corrected one
    ft_dock.hide()
    _, review = viewer.window.add_plugin_dock_widget(PLUGIN, "Review")
    review._prediction.value = new_mask
    review._reference.value = corrected
    review._compare.native.click()
    pump()
    difference = viewer.layers[f"{new_mask.name} vs {corrected.name}"]
    show_only(viewer, image, difference)
    viewer.layers.selection.active = difference
    print(review._metrics.value.replace("\n", " · "), flush=True)
    review._next.native.click()  # centres the view on the most uncertain 64 px window
    camera(viewer).zoom = REVIEW_ZOOM
    print(review._region.value, flush=True)
    shot(viewer, "06-review.png")

    # 7. export the corrected mask with its sidecar
    review._prediction.value = corrected
    review._reference.value = None
    review._export_path.value = EXPORT
    review._export.native.click()
    pump()
    show_only(viewer, image, corrected)
    viewer.layers.selection.active = corrected
    viewer.reset_view()
    corrected.mode = "pan_zoom"
    shot(viewer, "07-export.png")
    sidecar = json.loads(EXPORT.with_suffix(".json").read_text())
    print(
        json.dumps(
            {k: sidecar[k] for k in ("mask_file", "model", "model_sha256", "threshold", "corrected_by_hand")}
        ),
        flush=True,
    )

    # 8. a 1366x768 laptop screen with the three docks open: they scroll instead of pushing the window
    for widget_dock in (seg_dock, ft_dock):
        widget_dock.show()
    viewer.window._qt_window.resize(*LAPTOP)
    pump(1.0)
    size = viewer.window._qt_window.size()
    print(f"window at {size.width()}x{size.height()} with three docks", flush=True)
    shot(viewer, "08-laptop-1366x768.png")

    print(f"done in {time.perf_counter() - started:.0f} s", flush=True)
    viewer.close()
    return 0


DRIVE_IMAGES = ROOT.parent / "shared" / "data" / "DRIVE" / "training"


def worklist_shot() -> int:
    """9. The Worklist dock at 1366x768: five photographs, pre-segmented, most uncertain first."""
    import napari

    if not (DRIVE_IMAGES / "images").is_dir():
        print(f"{DRIVE_IMAGES}: not found; no worklist shot", flush=True)
        return 0
    cases = HOME / "worklist-cases"
    shutil.rmtree(cases, ignore_errors=True)
    for sub in ("images", "1st_manual"):
        (cases / sub).mkdir(parents=True)
        for path in sorted((DRIVE_IMAGES / sub).iterdir())[:5]:
            (cases / sub / path.name).symlink_to(path)
    shutil.rmtree(HOME / "worklist", ignore_errors=True)
    viewer = napari.Viewer()
    viewer.window._qt_window.resize(*LAPTOP)
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Worklist")
    widget._folder.value = str(HOME / "worklist")
    widget._cases.value = str(cases / "images")
    widget.open_worklist()
    widget.presegment()
    wait_idle(widget)
    pump(2.0)  # the case on screen gets its layers one per turn of the event loop
    widget._order.value = "Most uncertain first"
    widget.step(1)
    viewer.reset_view()  # the window was resized after the first case was shown
    viewer.layers.selection.active = widget._mask_layer
    pump(1.0)
    print(f"worklist: {widget._case_line.value}; layers {[lyr.name for lyr in viewer.layers]}", flush=True)
    shot(viewer, "09-worklist.png")
    widget.close_worklist()
    viewer.close()
    return 0


if __name__ == "__main__":
    if "--worklist-only" in sys.argv:
        sys.exit(worklist_shot())
    sys.exit(main() or worklist_shot())
