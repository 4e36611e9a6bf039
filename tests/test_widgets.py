"""The napari widgets, built through the plugin manifest, on tiny models and small images."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from .conftest import ROOT

pytestmark = pytest.mark.gui

PLUGIN = "napari-r2au"
TIMEOUT = 120_000  # ms; runs take about a second, but a busy machine can be far slower


# -- fixtures and helpers ------------------------------------------------------------------


def _save_tiny(name: str, seed: int = 0) -> str:
    """A tiny R2AU-Net saved as a user model (R2AU_HOME is per test); returns its name."""
    import torch

    from napari_r2au import create_model
    from napari_r2au.model_files import build_metadata, save_model, user_models_dir

    torch.manual_seed(seed)
    net = create_model("r2au_net", base_width=4)
    meta = build_metadata(
        name=name,
        architecture="r2au_net",
        arch_args={"in_channels": 3, "out_channels": 1, "base_width": 4, "t": 2},
        description="a test model",
        provenance={"data": {"kind": "drive"}, "validation_metrics": {"f1": 0.4321}},
    )
    save_model(net, user_models_dir(), meta)
    return name


@pytest.fixture
def tiny_model() -> Path:
    """A tiny R2AU-Net saved as a user model called 'tiny'."""
    from napari_r2au.model_files import user_models_dir

    _save_tiny("tiny")
    return user_models_dir() / "tiny.json"


def bars(size: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An RGB image with a few bright bars, and the bars as a mask."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((size, size), np.uint8)
    mask[:, size // 3 : size // 3 + 6] = 1
    mask[size // 2 : size // 2 + 5, :] = 1
    image = (rng.random((size, size, 3)) * 60 + mask[..., None] * 120).astype(np.uint8)
    return image, mask


def add_image(viewer, size: int = 64, name: str = "img"):
    image, _ = bars(size)
    return viewer.add_image(image, rgb=True, name=name, scale=(0.5, 0.25), translate=(10.0, -4.0))


def dock(viewer, name: str):
    """A widget created the way napari creates it: from the manifest, with the viewer injected.

    Segment and Fine-tune get the tiny test model chosen (a bundled model may come first).
    """
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, name)
    if name in ("Segment", "Fine-tune") and "tiny" in widget._model._choice.choices:
        widget._model._choice.value = "tiny"
    return widget


def wait_idle(qtbot, widget, timeout: int = TIMEOUT) -> None:
    qtbot.waitUntil(lambda: not widget.running, timeout=timeout)


def messages(records) -> str:
    return "\n".join(str(n.message) for n in records)


def run_segment(qtbot, viewer, *, uncertainty: bool = False, tile: int = 0):
    widget = dock(viewer, "Segment")
    widget._uncertainty.value = uncertainty
    widget._tile.value = tile
    widget.run()
    assert widget.running
    wait_idle(qtbot, widget)
    return widget


# -- manifest ------------------------------------------------------------------------------


def test_manifest_validates_and_lists_the_widgets():
    npe2 = Path(sys.executable).with_name("npe2")
    result = subprocess.run([str(npe2), "validate", "--imports", PLUGIN], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr

    from npe2 import PluginManifest

    manifest = PluginManifest.from_file(ROOT / "napari.yaml")
    widgets = {w.display_name: w.command for w in manifest.contributions.widgets}
    assert set(widgets) == {"Segment", "Fine-tune", "Review", "Worklist"}
    menu = [item.command for item in manifest.contributions.menus["napari/layers/segment"]]
    assert sorted(menu) == sorted(widgets.values())
    assert [s.key for s in manifest.contributions.sample_data] == ["retina"]


def test_widget_modules_do_not_import_torch_or_napari():
    code = (
        "import sys, napari_r2au.widgets.segment, napari_r2au.widgets.finetune, "
        "napari_r2au.widgets.review, napari_r2au.widgets.worklist, napari_r2au.worklist, napari_r2au._reader, "
        "napari_r2au._writer\n"
        "print(','.join(m for m in ('torch', 'napari') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ""


# -- Segment -------------------------------------------------------------------------------


def test_segment_outputs_layers_with_the_input_geometry(make_napari_viewer, qtbot, tiny_model):
    from napari_r2au import load_model, predict
    from napari_r2au.engine import run
    from napari_r2au.uncertainty import iter_predict_tta

    viewer = make_napari_viewer()
    layer = add_image(viewer)
    widget = dock(viewer, "Segment")
    assert "tiny" in widget._model._choice.choices and widget._model._choice.value == "tiny"
    card = widget._model._card.value
    assert "r2au_net" in card and "DRIVE" in card and "0.432" in card and "3 in" in card
    widget._uncertainty.value = True
    widget.run()
    wait_idle(qtbot, widget)

    probability = viewer.layers["img probability"]
    mask = viewer.layers["img mask"]
    attention = [viewer.layers[f"img attention {g}"] for g in range(1, 5)]
    uncertainty = viewer.layers["img uncertainty"]
    for out in (probability, mask, uncertainty, *attention):
        assert out.data.shape == (64, 64)
        np.testing.assert_allclose(out.scale, layer.scale)
        np.testing.assert_allclose(out.translate, layer.translate)
    assert type(mask).__name__ == "Labels" and mask.data.dtype == np.uint8
    for gate in attention:
        assert gate.colormap.name == "turbo" and str(gate.blending) == "additive"
    assert uncertainty.data.min() >= 0 and uncertainty.data.max() <= 1

    # with the uncertainty map on, the probability is the mean of the flipped copies
    expected = run(iter_predict_tta(load_model("tiny"), layer.data)).probabilities
    np.testing.assert_allclose(probability.data, expected, atol=1e-4)
    assert np.abs(probability.data - predict(load_model("tiny"), layer.data).probabilities).max() > 1e-4
    np.testing.assert_array_equal(mask.data, (probability.data > 0.5).astype(np.uint8))
    info = mask.metadata["r2au"]
    assert info["model"] == "tiny" and info["model_sha256"] == load_model("tiny").sha256
    assert info["threshold"] == 0.5 and len(info["mask_sha256"]) == 64 and info["flip_averaged"] is True
    assert info["scale"] == 1.0  # the model's input_scale: the Scale field was left at 0
    # the status line says what ran the network, as the record does
    ran = {"openvino": "OpenVINO", "torch": "PyTorch"}[info["backend"]]
    assert "Done" in widget._status.value and f"({ran} {info['precision']})" in widget._status.value

    # a run without those maps removes the earlier run's: they would pass for the new mask's
    viewer.add_image(np.zeros((4, 4)), name="img attention 9")  # the user's own layer stays
    widget._attention.value = widget._uncertainty.value = False
    widget.run()
    wait_idle(qtbot, widget)
    names = [lyr.name for lyr in viewer.layers]
    assert not [n for n in names if n.startswith("img attention ") and n != "img attention 9"]
    assert "img uncertainty" not in names and "img probability" in names and "img attention 9" in names
    assert viewer.layers["img mask"].metadata["r2au"]["attention_layers"] == []


def test_threshold_slider_rethresholds_without_running_the_network(
    make_napari_viewer, qtbot, tiny_model, monkeypatch, notifications
):
    from napari_r2au import engine

    calls = []
    real = engine.iter_predict

    def counting(*args, **kwargs):
        calls.append(1)
        return (yield from real(*args, **kwargs))

    monkeypatch.setattr(engine, "iter_predict", counting)
    viewer = make_napari_viewer()
    add_image(viewer)
    widget = run_segment(qtbot, viewer)
    assert len(calls) == 1
    probability = viewer.layers["img probability"].data
    mask = viewer.layers["img mask"]
    assert widget._threshold.tracking, "a small mask follows the slider while it is dragged"
    monkeypatch.setattr("napari_r2au.widgets.segment.LIVE_THRESHOLD_PIXELS", mask.data.size - 1)
    run_segment(qtbot, viewer)
    assert not widget._threshold.tracking, "a large one when it is released"

    for level in (0.3, 0.7, float(np.median(probability))):
        widget._threshold.value = level
        np.testing.assert_array_equal(mask.data, (probability > widget._threshold.value).astype(np.uint8))
        assert mask.metadata["r2au"]["threshold"] == pytest.approx(widget._threshold.value)
    widget._min_size.value = 10
    widget._remove_small.value = True  # clean-up is applied at once as well
    assert mask.data.sum() <= (probability > widget._threshold.value).sum()
    assert len(calls) == 2, "moving the slider must not run the network"

    # Fine-tune rebuilds this mask exactly from the probabilities and the record (threshold,
    # clean-up), to tell the user's corrections apart from the model's output
    from napari_r2au.postprocess import rebuild_segment_mask
    from napari_r2au.widgets._common import mask_before_corrections

    made = mask.data.copy()
    np.testing.assert_array_equal(mask_before_corrections(viewer, mask)(), made)
    assert made.any()
    record = dict(mask.metadata["r2au"], threshold=0.999)
    assert rebuild_segment_mask(probability, record) is None, "a guess is refused"

    # once the mask is painted on, the slider leaves it alone and says why
    mask.data = np.ones_like(mask.data)
    np.testing.assert_array_equal(mask_before_corrections(viewer, mask)(), made)
    # a new run keeps the edited mask under another name, with the mask it was edited from
    run_segment(qtbot, viewer)
    kept = viewer.layers["img corrected"]
    assert kept.data.all() and viewer.layers["img mask"] is not kept
    np.testing.assert_array_equal(mask_before_corrections(viewer, kept)(), made)
    widget._threshold.value = 0.9
    assert mask.data.all()
    assert "edited by hand" in messages(notifications)


def test_the_first_mask_is_cut_in_the_worker_and_follows_a_slider_moved_during_the_run(
    make_napari_viewer, qtbot, tiny_model, notifications, monkeypatch
):
    """The run's mask and its checksums are made in the worker (hashing a large mask
    stalled the GUI); a threshold changed while the network runs still decides the mask,
    and the notices about the input (a grey image for a colour model) are said by name."""
    import threading

    from napari_r2au import mask_record
    from napari_r2au.mask_record import checksums

    on_gui_thread = []
    real = mask_record.checksums

    def counted(mask):  # the GUI thread's hashing of a new mask (the worker uses its own import)
        on_gui_thread.append(threading.current_thread() is threading.main_thread())
        return real(mask)

    monkeypatch.setattr(mask_record, "checksums", counted)
    viewer = make_napari_viewer()
    grey = bars()[0].mean(-1)
    viewer.add_image(grey.astype(np.float32), name="grey")
    widget = dock(viewer, "Segment")
    widget._threshold.value = 0.5
    widget.run()
    widget._threshold.value = 0.3  # while the network runs
    wait_idle(qtbot, widget)
    probability = viewer.layers["grey probability"].data
    mask = viewer.layers["grey mask"]
    np.testing.assert_array_equal(mask.data, (probability > 0.3).astype(np.uint8))
    record = mask.metadata["r2au"]
    assert record["threshold"] == pytest.approx(0.3)
    assert {k: record[k] for k in ("mask_sha256", "slice_sha256")} == checksums(mask.data)
    assert "Segment on 'grey'" in messages(notifications) and "given to it as RGB" in messages(notifications)
    assert any(on_gui_thread), "the slider moved: the mask was cut again on the GUI thread"

    on_gui_thread.clear()
    widget.run()  # settings unchanged during the run: the worker's mask and checksums are used
    wait_idle(qtbot, widget)
    assert not any(on_gui_thread), "a mask was hashed on the GUI thread"
    record = viewer.layers["grey mask"].metadata["r2au"]
    np.testing.assert_array_equal(
        viewer.layers["grey mask"].data, (viewer.layers["grey probability"].data > 0.3).astype(np.uint8)
    )
    assert {k: record[k] for k in ("mask_sha256", "slice_sha256")} == checksums(
        viewer.layers["grey mask"].data
    )


def test_napari_keeps_processing_events_during_a_run(make_napari_viewer, qtbot, tiny_model):
    from qtpy.QtCore import QTimer

    viewer = make_napari_viewer()
    add_image(viewer, size=160)
    widget = dock(viewer, "Segment")
    widget._tile.value = 32
    widget._uncertainty.value = True
    ticks = []
    timer = QTimer()
    timer.setInterval(5)
    timer.timeout.connect(lambda: ticks.append(widget.running))
    timer.start()
    try:
        widget.run()
        wait_idle(qtbot, widget)
    finally:
        timer.stop()
    assert sum(ticks) >= 3, "the GUI thread must keep running while the worker predicts"
    assert widget._progress.value == widget._progress.max
    assert "img mask" in viewer.layers


def test_cancel_stops_the_run_and_closes_the_generator(make_napari_viewer, qtbot, tiny_model, monkeypatch):
    from napari_r2au import engine

    closed = []
    real = engine.iter_predict

    def spy(*args, **kwargs):
        try:
            return (yield from real(*args, **kwargs))
        finally:
            closed.append(True)

    monkeypatch.setattr(engine, "iter_predict", spy)
    viewer = make_napari_viewer()
    add_image(viewer, size=256)
    widget = dock(viewer, "Segment")
    widget._tile.value = 32
    widget._uncertainty.value = True
    widget.run()
    qtbot.waitUntil(lambda: widget._progress.value >= 1, timeout=TIMEOUT)
    widget._cancel.changed.emit(True)  # the button
    wait_idle(qtbot, widget)
    qtbot.waitUntil(lambda: bool(closed), timeout=5000)
    assert widget._progress.value < widget._progress.max
    assert "Cancelled" in widget._status.value
    assert "img probability" not in viewer.layers and "img mask" not in viewer.layers
    assert widget._run.enabled and not widget._cancel.enabled


def test_errors_become_notifications(
    make_napari_viewer, qtbot, tiny_model, tmp_path, monkeypatch, notifications
):
    from napari_r2au import engine
    from napari_r2au.widgets._common import LOAD_FROM_FILE

    viewer = make_napari_viewer()
    widget = dock(viewer, "Segment")
    widget.run()  # no image layer yet
    assert "choose an image layer" in messages(notifications)
    assert not widget.running

    add_image(viewer)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    widget._model._choice.value = LOAD_FROM_FILE
    widget._model._file.value = broken
    widget.run()
    wait_idle(qtbot, widget)
    assert "Segmentation failed" in messages(notifications)
    assert "not a readable model description" in messages(notifications)

    # torch reports most failures as RuntimeError, which superqt would swallow
    def failing(*args, **kwargs):
        yield engine.Progress(0, 2)
        raise RuntimeError("boom in the network")

    monkeypatch.setattr(engine, "iter_predict", failing)
    widget._model._choice.value = "tiny"
    widget.run()
    wait_idle(qtbot, widget)
    assert "boom in the network" in messages(notifications)
    assert "Failed" in widget._status.value and widget._run.enabled
    assert "img mask" not in viewer.layers


def test_cancel_mid_stack_removes_the_running_layer(make_napari_viewer, qtbot, tiny_model):
    viewer = make_napari_viewer()
    stack = np.stack([bars(128, seed=z)[0].mean(-1) for z in range(6)]).astype(np.float32)
    viewer.add_image(stack, name="stack")
    widget = dock(viewer, "Segment")
    widget._tile.value = 32  # many tiles per slice: time to cancel after the first slice
    widget.run()
    qtbot.waitUntil(lambda: "stack probability (running)" in viewer.layers, timeout=TIMEOUT)
    widget._cancel.changed.emit(True)
    wait_idle(qtbot, widget)
    assert "Cancelled" in widget._status.value
    assert [layer.name for layer in viewer.layers] == ["stack"]  # as before the run


def test_stack_runs_the_current_slice_first(make_napari_viewer, qtbot, tiny_model, monkeypatch):
    from napari_r2au import engine

    seen = []
    real = engine.iter_predict

    def spy(*args, **kwargs):
        seen.append(kwargs.get("slices"))
        return (yield from real(*args, **kwargs))

    monkeypatch.setattr(engine, "iter_predict", spy)
    viewer = make_napari_viewer()
    stack = np.stack([bars(48, seed=z)[0].mean(-1) for z in range(3)]).astype(np.float32)
    viewer.add_image(stack, name="stack", scale=(2.0, 0.5, 0.5))
    viewer.dims.set_point(0, 2.0)  # world z = 2 is slice 1
    widget = dock(viewer, "Segment")
    widget._attention.value = False
    live = []  # what the running layer held each time a slice was shown
    real_show = widget._show_slice

    def show_spy(context, z, probabilities):
        real_show(context, z, probabilities)
        live.append((z, [bool(context.live.data[i].any()) for i in range(3)]))

    widget._show_slice = show_spy  # (monkeypatch cannot undo attributes of a magicgui Container)
    widget.run()
    wait_idle(qtbot, widget)
    assert seen[-1] == [1, 0, 2]
    assert viewer.layers["stack mask"].data.shape == (3, 48, 48)
    # each slice is on screen when it is done, the current one first; the running layer goes away
    assert live == [(1, [False, True, False]), (0, [True, True, False]), (2, [True, True, True])]
    assert "stack probability (running)" not in viewer.layers

    full = viewer.layers["stack probability"].data.copy()
    other = _save_tiny("tiny-b", seed=1)  # e.g. a fine-tuned model, so that slice 1's result differs
    widget.select_model(other)
    widget._scope.value = "Current slice"
    widget.run()
    wait_idle(qtbot, widget)
    assert seen[-1] == [1]
    # the other slices keep their results; the record says which model made which slice
    merged = viewer.layers["stack probability"].data
    np.testing.assert_array_equal(merged[[0, 2]], full[[0, 2]])
    assert not np.array_equal(merged[1], full[1])
    info = viewer.layers["stack mask"].metadata["r2au"]
    assert info["slices"] == [0, 1, 2] and info["scope"] == "Current slice"
    assert [(run["model"], run["slices"]) for run in info["runs"]] == [("tiny", [0, 2]), ("tiny-b", [1])]
    np.testing.assert_array_equal(viewer.layers["stack mask"].data[0], (full[0] > widget._threshold.value))

    # new data in the layer is another image: nothing of the earlier runs is kept
    viewer.layers["stack"].data = stack[:, ::-1].copy()
    widget.run()
    wait_idle(qtbot, widget)
    assert not viewer.layers["stack probability"].data[[0, 2]].any()
    assert [run["slices"] for run in viewer.layers["stack mask"].metadata["r2au"]["runs"]] == [[1]]


def test_a_user_model_can_be_removed_from_the_pickers_after_a_yes(
    make_napari_viewer, tiny_model, monkeypatch, notifications
):
    from napari_r2au.model_files import DEFAULT_MODEL, user_models_dir
    from napari_r2au.widgets import _common

    _save_tiny("tiny-ft1")
    viewer = make_napari_viewer()
    segment, finetune = dock(viewer, "Segment"), dock(viewer, "Fine-tune")
    picker = segment._model
    picker._choice.value = DEFAULT_MODEL
    assert picker._remove.native.isHidden()  # bundled: nothing to remove
    picker._choice.value = "tiny-ft1"
    assert not picker._remove.native.isHidden()
    segment._threshold.value = 0.8  # the mask on screen was made at 0.8: the button must not reset it
    answers = []
    monkeypatch.setattr(_common, "confirm", lambda *args: answers.append(args[2]) or False)
    picker._remove.clicked.emit()
    assert "tiny-ft1" in answers[0] and "tiny-ft1" in picker._choice.choices  # No keeps it
    assert segment._threshold.value == pytest.approx(0.8)
    monkeypatch.setattr(_common, "confirm", lambda *args: True)
    picker._remove.clicked.emit()
    for widget in (segment, finetune):
        assert "tiny-ft1" not in widget._model._choice.choices and "tiny" in widget._model._choice.choices
    assert picker._choice.value != "tiny-ft1" and picker.path is not None
    assert not (user_models_dir() / "tiny-ft1.json").exists()
    assert len(list((user_models_dir() / "removed").glob("tiny-ft1-*/tiny-ft1.json"))) == 1
    assert "Removed tiny-ft1" in messages(notifications)

    # removed meanwhile from the command line: an error, and the lists catch up
    from napari_r2au.model_files import remove_model

    _save_tiny("tiny-ft2")
    picker.refresh(select="tiny-ft2")
    remove_model("tiny-ft2")
    picker._remove.clicked.emit()
    assert "Could not remove tiny-ft2" in messages(notifications)
    assert "tiny-ft2" not in picker._choice.choices and "tiny-ft2" not in finetune._model._choice.choices


# -- Fine-tune -----------------------------------------------------------------------------


def test_finetune_registers_a_new_model_and_resegments(make_napari_viewer, qtbot, tiny_model, notifications):
    viewer = make_napari_viewer()
    image, truth = bars(64)
    viewer.add_image(image, rgb=True, name="img")
    viewer.add_labels(truth, name="corrected")
    segment = dock(viewer, "Segment")
    finetune = dock(viewer, "Fine-tune")
    assert finetune._steps.value == 150 and finetune._lr.value == pytest.approx(5e-4)
    assert finetune._patch.value == 96 and finetune._augment.value and not finetune._freeze.value
    assert finetune._share.value == pytest.approx(0.5)
    assert finetune._model._choice.value == "tiny"
    assert finetune._corrected.value.name == "corrected"

    finetune._steps.value = 3
    finetune._patch.value = 32
    finetune._share.value = 0.75  # passed through, not the default
    finetune.run()
    assert finetune.running
    wait_idle(qtbot, finetune, timeout=300_000)
    result = finetune.last_result
    assert result is not None and result.model is not None, messages(notifications)
    assert result.model.name == "tiny-ft1" and result.steps == 3
    assert result.model.metadata["provenance"]["weight_share"] == pytest.approx(0.75)
    assert finetune._curve.steps == [1, 2, 3]
    assert "tiny-ft1" in finetune._result.value and "before" in finetune._result.value
    # two Dice figures, each labelled with its threshold: the curve's during training, the result's after
    assert "at its own threshold there" in finetune._result.value
    assert finetune._curve._dice_line.get_label() == "held-out Dice at 0.5"
    assert finetune._curve._dice_axes.get_ylabel() == "held-out Dice at 0.5"

    # the new model is offered everywhere and used to re-segment the image
    assert "tiny-ft1" in segment._model._choice.choices
    assert segment._model._choice.value == "tiny-ft1"
    assert "tiny-ft1" in finetune._model._choice.choices
    wait_idle(qtbot, segment)
    assert viewer.layers["img mask"].metadata["r2au"]["model"] == "tiny-ft1"


def test_finetune_says_when_the_new_model_scores_lower_than_its_base(
    make_napari_viewer, tiny_model, notifications, monkeypatch
):
    from napari_r2au.model_files import load_model_file
    from napari_r2au.training.finetune import FinetuneResult

    viewer = make_napari_viewer()
    finetune = dock(viewer, "Fine-tune")
    used = []
    monkeypatch.setattr(type(finetune), "_use_new_model", lambda self, name: used.append(name))
    model = load_model_file(tiny_model, source="user")
    finetune._on_result(
        FinetuneResult(
            model, dice_before=0.85, dice_after=0.84, steps=150, stopped="steps", held_out_corrections=12
        )
    )
    assert "Lower than the base model, so Segment keeps the base model" in finetune._result.value
    assert "scores lower than its base model" in messages(notifications)
    assert "holds 12 corrected pixel(s)" in messages(notifications)
    assert used == [], "a model that scores lower is saved but not put to use"

    notifications.clear()
    finetune._on_result(FinetuneResult(model, dice_before=None, dice_after=None, steps=150, stopped="steps"))
    assert "was not validated" in messages(notifications) and "Not validated" in finetune._result.value
    assert used == ["tiny"], "used, as asked, with a warning"
    used.clear()

    notifications.clear()
    finetune._on_result(FinetuneResult(model, dice_before=0.84, dice_after=0.85, steps=150, stopped="steps"))
    assert "Lower" not in finetune._result.value and "lower" not in messages(notifications)
    assert used == ["tiny"]


def test_finetune_on_a_corrected_segment_mask_keeps_the_edits_and_the_scale(
    make_napari_viewer, qtbot, tiny_model, notifications
):
    """The loop of the user guide: Segment at a Scale, paint on its mask, fine-tune on it.

    The re-segmentation must not overwrite the corrections, and the new model must work
    at the scale the mask was made at.
    """
    viewer = make_napari_viewer()
    add_image(viewer)
    segment = dock(viewer, "Segment")
    segment._scale.value = 0.5
    segment.run()
    wait_idle(qtbot, segment)
    mask = viewer.layers["img mask"]
    assert mask.metadata["r2au"]["scale"] == 0.5
    finetune = dock(viewer, "Fine-tune")
    finetune._corrected.value = mask
    finetune.run()  # nothing corrected yet: the model's own output teaches it nothing
    assert not finetune.running and "Segment's output, unchanged" in messages(notifications)
    edited = mask.data.copy()
    edited[:, 20:26] = 1  # a vessel the model missed
    edited[40:44, 30:60] = 0  # and false positives erased (so that something changed, whatever it found)
    mask.data = edited

    finetune._steps.value = 2
    finetune._patch.value = 32
    finetune.run()
    wait_idle(qtbot, finetune, timeout=300_000)
    wait_idle(qtbot, segment)
    result = finetune.last_result
    assert result is not None and result.model is not None, messages(notifications)
    assert result.model.input_scale == pytest.approx(0.5)

    assert viewer.layers["img corrected"] is mask
    np.testing.assert_array_equal(mask.data, edited)
    fresh = viewer.layers["img mask"]
    assert fresh is not mask and fresh.metadata["r2au"]["model"] == "tiny-ft1"
    assert "edits are kept in 'img corrected'" in messages(notifications)


def test_finetune_refuses_an_empty_mask(make_napari_viewer, tiny_model, notifications):
    viewer = make_napari_viewer()
    viewer.add_image(bars(64)[0], rgb=True, name="img")
    viewer.add_labels(np.zeros((64, 64), np.uint8), name="nothing")
    finetune = dock(viewer, "Fine-tune")
    finetune.run()
    assert not finetune.running
    assert "is empty" in messages(notifications)


def test_finetune_on_a_stack_learns_from_the_corrected_slices_only(
    make_napari_viewer, qtbot, tiny_model, notifications, monkeypatch
):
    viewer = make_napari_viewer()
    stack = np.stack([bars(48, seed=z)[0].mean(-1) for z in range(4)]).astype(np.float32)
    viewer.add_image(stack, name="stack")
    segment = dock(viewer, "Segment")
    segment._attention.value = False
    segment.run()
    wait_idle(qtbot, segment)
    mask = viewer.layers["stack mask"]
    finetune = dock(viewer, "Fine-tune")
    finetune._image.value = viewer.layers["stack"]
    finetune._corrected.value = mask
    finetune.run()  # nothing painted yet: every slice is the model's own output
    assert not finetune.running and "no slice of 'stack mask' was corrected" in messages(notifications)

    seen = []
    original = type(finetune)._job

    def spy(*args, **kwargs):
        seen.append(args[8])  # the corrected slices
        np.testing.assert_array_equal(
            args[9](), made
        )  # and the stack before the corrections, rebuilt exactly
        return original(*args, **kwargs)

    made = mask.data.copy()

    monkeypatch.setattr(type(finetune), "_job", staticmethod(spy))
    edited = mask.data.copy()
    edited[1, :, 10:14] = 1
    edited[3] = 0  # erasing a slice's false positives is a correction too
    mask.data = edited
    finetune._steps.value = 2
    finetune._patch.value = 32
    finetune._resegment.value = False
    finetune.run()
    assert seen == [[1, 3]] and "2 corrected slice(s)" in finetune._result.value
    wait_idle(qtbot, finetune, timeout=300_000)
    assert finetune.last_result is not None and finetune.last_result.model is not None, messages(
        notifications
    )


# -- Review --------------------------------------------------------------------------------


def test_review_metrics_difference_and_uncertain_regions(make_napari_viewer):
    viewer = make_napari_viewer()
    reference = np.zeros((128, 128), np.uint8)
    reference[10:50, 10:50] = 1
    predicted = np.zeros_like(reference)
    predicted[20:60, 10:50] = 1  # 10 rows too low: 400 FP, 400 FN, 1200 TP
    geometry = {"scale": (2.0, 2.0), "translate": (100.0, 50.0)}
    viewer.add_labels(reference, name="reference", **geometry)
    viewer.add_labels(predicted, name="prediction", **geometry)
    heat = np.zeros((128, 128), np.float32)
    heat[64:128, 0:64] = 0.9  # hottest window: rows 64-127, cols 0-63
    heat[0:64, 64:128] = 0.5
    viewer.add_image(heat, name="uncertainty", **geometry)
    review = dock(viewer, "Review")
    review._prediction.value = viewer.layers["prediction"]
    review._reference.value = viewer.layers["reference"]
    review._compare.changed.emit(True)

    assert review.metrics["f1"] == pytest.approx(2 * 1200 / (2 * 1200 + 400 + 400))
    assert review.metrics["iou"] == pytest.approx(1200 / 2000)
    assert review.metrics["sensitivity"] == pytest.approx(0.75)
    assert review.metrics["specificity"] == pytest.approx(1 - 400 / (128 * 128 - 1600))
    assert "Dice (F1) 0.750" in review._metrics.value and "Specificity" in review._metrics.value
    difference = viewer.layers["prediction vs reference"]
    assert int((difference.data == 1).sum()) == 400 and int((difference.data == 2).sum()) == 400
    assert difference.data[55, 20] == 1 and difference.data[15, 20] == 2
    np.testing.assert_allclose(difference.scale, (2.0, 2.0))

    review._uncertainty.value = viewer.layers["uncertainty"]
    review._next.changed.emit(True)
    np.testing.assert_allclose(viewer.camera.center[-2:], (100 + 2 * 95.5, 50 + 2 * 31.5))
    window_world = review._window.value * 2.0  # pixels of the map times its scale
    assert viewer.camera.zoom == pytest.approx(0.5 * min(viewer.canvas.size) / window_world)
    review._next.changed.emit(True)  # the next one, not the same again
    np.testing.assert_allclose(viewer.camera.center[-2:], (100 + 2 * 31.5, 50 + 2 * 95.5))
    assert "Region 2" in review._region.value


def test_export_writes_the_mask_and_a_sidecar(make_napari_viewer, qtbot, tiny_model, tmp_path):
    from napari_r2au import load_model
    from napari_r2au._reader import napari_get_reader

    viewer = make_napari_viewer()
    add_image(viewer)
    run_segment(qtbot, viewer)
    mask = viewer.layers["img mask"]
    review = dock(viewer, "Review")
    review._prediction.value = mask
    review._export_path.value = tmp_path / "out" / "case1.tif"
    review._export_maps.value = True
    review._export.changed.emit(True)

    written = tmp_path / "out" / "case1.tif"
    sidecar = json.loads((tmp_path / "out" / "case1.json").read_text())
    import tifffile

    np.testing.assert_array_equal(tifffile.imread(written), mask.data)
    assert sidecar["model"] == "tiny" and sidecar["model_sha256"] == load_model("tiny").sha256
    assert sidecar["threshold"] == 0.5 and sidecar["corrected_by_hand"] is False
    assert (
        sidecar["working_scale"] == 1.0
        and sidecar["flip_averaged"] is False
        and sidecar["maps_left_out"] == []
    )
    date = dt.datetime.fromisoformat(sidecar["date"])
    assert date.utcoffset() == dt.timedelta(0)
    assert sidecar["probability_file"] == "case1_probability.tif"
    assert sidecar["attention_files"] == [f"case1_attention{g}.tif" for g in range(1, 5)]
    for name in [sidecar["probability_file"], *sidecar["attention_files"]]:
        assert tifffile.imread(tmp_path / "out" / name).shape == (64, 64)
    assert not list((tmp_path / "out").glob(".*.part")), "no temporary files left behind"

    # a hand correction is recorded, and survives a save and a reload
    edited = mask.data.copy()
    edited[:5, :5] = 1 - edited[:5, :5]
    mask.data = edited
    review._export_maps.value = False
    before = (tmp_path / "out" / "case1.json").read_text()
    review._export.changed.emit(True)  # the files exist: refused, nothing changed
    assert (tmp_path / "out" / "case1.json").read_text() == before
    review._overwrite.value = True
    review._export.changed.emit(True)
    assert json.loads((tmp_path / "out" / "case1.json").read_text())["corrected_by_hand"] is True
    ((data, kwargs, kind),) = napari_get_reader(str(written))(str(written))
    assert kind == "labels" and kwargs["metadata"]["r2au"]["model"] == "tiny"
    assert kwargs["metadata"]["r2au"]["scale"] == 1.0, (
        "Fine-tune on the reopened mask trains at the recorded scale"
    )
    np.testing.assert_array_equal(data, edited)
    np.testing.assert_allclose(kwargs["scale"], mask.scale)

    # a folder: the mask goes inside it, named after its layer; a refusal clears the last "Wrote" line
    review._export_path.value = tmp_path / "out"
    review._export.changed.emit(True)
    assert (tmp_path / "out" / "img_mask.tif").is_file() and (tmp_path / "out" / "img_mask.json").is_file()
    assert review._export_status.value.startswith("Wrote img_mask.tif")
    review._export_path.value = tmp_path / "out" / "seg.dcm"  # not an image from DICOM files: refused
    review._export.changed.emit(True)
    assert (
        review._export_status.value.startswith("Not written")
        and "another format" in review._export_status.value
    )
    assert not (tmp_path / "out" / "seg.dcm").exists()


def test_export_leaves_out_maps_that_a_later_run_rewrote(make_napari_viewer, qtbot, tiny_model, tmp_path):
    viewer = make_napari_viewer()
    add_image(viewer)
    run_segment(qtbot, viewer)
    mask = viewer.layers["img mask"]
    edited = mask.data.copy()
    edited[:5, :5] = 1 - edited[:5, :5]
    mask.data = edited
    run_segment(qtbot, viewer)  # e.g. the re-segmentation after fine-tuning: new maps, edits kept aside
    corrected = viewer.layers["img corrected"]
    review = dock(viewer, "Review")
    review._prediction.value = corrected
    review._export_path.value = tmp_path / "case2.tif"
    review._export_maps.value = True
    (tmp_path / "case2_probability.tif").write_bytes(b"an earlier export")
    review._export.changed.emit(True)  # a map file exists: refused, nothing written
    assert not (tmp_path / "case2.tif").exists()
    assert (tmp_path / "case2_probability.tif").read_bytes() == b"an earlier export"

    review._overwrite.value = True
    review._export.changed.emit(True)
    sidecar = json.loads((tmp_path / "case2.json").read_text())
    assert sidecar["probability_file"] is None and sidecar["attention_files"] == []
    assert "img probability" in sidecar["maps_left_out"]
    assert (tmp_path / "case2_probability.tif").read_bytes() == b"an earlier export"

    review._prediction.value = viewer.layers["img mask"]  # the new run's own mask gets its own maps
    review._export_path.value = tmp_path / "case3.tif"
    review._export.changed.emit(True)
    sidecar = json.loads((tmp_path / "case3.json").read_text())
    assert sidecar["probability_file"] == "case3_probability.tif" and sidecar["maps_left_out"] == []


def test_scale_field_resizes_for_the_network_and_restores(make_napari_viewer, qtbot, tiny_model, monkeypatch):
    import napari_r2au.engine as engine

    seen = []
    original = engine.iter_predict

    def spy(*args, **kwargs):
        seen.append(kwargs.get("scale"))
        return original(*args, **kwargs)

    monkeypatch.setattr(engine, "iter_predict", spy)
    viewer = make_napari_viewer()
    add_image(viewer)
    widget = dock(viewer, "Segment")
    widget._scale.value = 0.5
    widget.run()
    wait_idle(qtbot, widget)
    assert 0.5 in seen
    assert widget.prediction.probabilities.shape == (64, 64)


def test_a_second_run_is_refused_not_interleaved(make_napari_viewer, qtbot, tiny_model, notifications):
    viewer = make_napari_viewer()
    add_image(viewer)
    widget = dock(viewer, "Segment")
    widget.run()
    assert widget.running
    worker = widget._worker
    widget.run()  # while the first runs
    assert widget._worker is worker
    assert "a run is in progress" in messages(notifications)
    wait_idle(qtbot, widget)


def test_closing_the_viewer_during_a_fine_tune_stops_the_worker(make_napari_viewer, qtbot, tiny_model):
    from napari_r2au.model_files import user_models_dir

    viewer = make_napari_viewer()
    image, mask = bars(96)
    viewer.add_image(image, rgb=True, name="img")
    viewer.add_labels(mask, name="corrected")
    widget = dock(viewer, "Fine-tune")
    widget._steps.value = 500
    widget._patch.value = 32
    widget.run()
    assert widget.running
    worker = widget._worker
    qtbot.waitUntil(lambda: widget._progress.value >= 2, timeout=TIMEOUT)
    viewer.close()
    qtbot.waitUntil(lambda: not worker.is_running, timeout=30_000)
    assert not (user_models_dir() / "tiny-ft1.json").exists()  # cancelled: nothing registered


def test_layer_pixel_size_reads_scale_and_units(make_napari_viewer):
    from napari_r2au.widgets._common import layer_pixel_size

    viewer = make_napari_viewer()
    image, _ = bars()
    assert layer_pixel_size(viewer.add_image(image, rgb=True)) == (None, None)  # napari's default
    assert layer_pixel_size(viewer.add_image(image, rgb=True, scale=(0.5, 0.5))) == (0.5, None)
    size, unit = layer_pixel_size(viewer.add_image(image[..., 0], scale=(0.2, 0.8), units=("um", "um")))
    assert size == pytest.approx(0.4) and unit == "micrometer"
    stack = viewer.add_image(np.zeros((3, 8, 8)), scale=(5.0, 0.7, 0.7), units="mm")
    assert layer_pixel_size(stack) == (pytest.approx(0.7), "millimeter")


def test_segment_uses_the_layer_pixel_size_for_a_model_that_records_its_own(make_napari_viewer, qtbot):
    import torch

    from napari_r2au import create_model
    from napari_r2au.model_files import build_metadata, save_model, user_models_dir

    torch.manual_seed(0)
    meta = build_metadata(
        name="tiny", architecture="unet", arch_args={"base_width": 4}, pixel_size=0.5, pixel_size_unit="mm"
    )
    save_model(create_model("unet", base_width=4), user_models_dir(), meta)
    viewer = make_napari_viewer()
    image, _ = bars()
    layer = viewer.add_image(image, rgb=True, name="scan", scale=(250.0, 250.0), units=("um", "um"))
    widget = dock(viewer, "Segment")
    widget.run()
    wait_idle(qtbot, widget)
    mask = viewer.layers["scan mask"]
    assert mask.metadata["r2au"]["scale"] == pytest.approx(0.5)  # 250 um pixels into a 0.5 mm model
    assert mask.data.shape == (64, 64) and "at scale 0.5" in widget._status.value
    np.testing.assert_allclose(mask.scale, layer.scale)
    widget._show_advanced.value = True
    widget._scale.value = 0.75  # the user's Scale wins over the pixel size
    widget.run()
    wait_idle(qtbot, widget)
    assert viewer.layers["scan mask"].metadata["r2au"]["scale"] == pytest.approx(0.75)


def test_a_current_slice_run_keeps_the_other_slices_uncertainty(make_napari_viewer, qtbot, tiny_model):
    viewer = make_napari_viewer()
    stack = np.stack([bars(32, seed=z)[0].mean(-1) for z in range(3)]).astype(np.float32)
    viewer.add_image(stack, name="stack")
    viewer.dims.set_point(0, 1.0)
    widget = dock(viewer, "Segment")
    widget._attention.value = False
    widget._uncertainty.value = True
    widget.run()
    wait_idle(qtbot, widget)
    before = viewer.layers["stack uncertainty"].data.copy()
    assert before[[0, 2]].any()
    widget._uncertainty.value = False  # this run makes no uncertainty map: slice 1's old one is stale
    widget._scope.value = "Current slice"
    widget.run()
    wait_idle(qtbot, widget)
    after = viewer.layers["stack uncertainty"].data
    np.testing.assert_array_equal(after[[0, 2]], before[[0, 2]])
    assert not after[1].any()
    runs = viewer.layers["stack mask"].metadata["r2au"]["runs"]
    assert [(r["slices"], r["flip_averaged"]) for r in runs] == [([0, 2], True), ([1], False)]


def test_export_to_dcm_writes_a_dicom_seg_on_the_series_the_image_came_from(
    make_napari_viewer, qtbot, tiny_model, tmp_path
):
    pytest.importorskip("pydicom")
    hd = pytest.importorskip("highdicom")
    from tests.test_dicom_seg import _series

    folder = _series(tmp_path / "series")
    viewer = make_napari_viewer()
    viewer.open(str(folder), plugin="napari-r2au")
    segment = run_segment(qtbot, viewer)
    mask = viewer.layers["series mask"]
    sources = viewer.layers["series"].metadata["dicom"]["sources"]
    assert mask.metadata["r2au"]["dicom"]["sources"] == sources
    review = dock(viewer, "Review")
    review._prediction.value = mask
    review._export_path.value = tmp_path / "out" / "case.dcm"
    review._export.changed.emit(True)
    sidecar = json.loads((tmp_path / "out" / "case.json").read_text())
    assert sidecar["mask_format"] == "DICOM SEG" and sidecar["corrected_by_hand"] is False
    seg = hd.seg.segread(tmp_path / "out" / "case.dcm")
    assert {d.SegmentAlgorithmType for d in seg.SegmentSequence} == {"AUTOMATIC"}
    back = seg.get_pixels_by_source_instance(
        [uid for _, _, uid in sources], combine_segments=True, skip_overlap_checks=True
    )
    np.testing.assert_array_equal(back > 0, mask.data > 0)

    edited = mask.data.copy()
    edited[:, :4, :4] = 1
    mask.data = edited
    review._overwrite.value = True
    review._export.changed.emit(True)
    seg = hd.seg.segread(tmp_path / "out" / "case.dcm")
    assert {d.SegmentAlgorithmType for d in seg.SegmentSequence} == {"SEMIAUTOMATIC"}
    assert segment.prediction is not None
    assert (
        json.loads((tmp_path / "out" / "case.json").read_text())["dicom_seg"]["source_series_instance_uid"]
        == seg.ReferencedSeriesSequence[0].SeriesInstanceUID
    )

    # a mask on an image that did not come from DICOM: refused before anything (maps included) is written
    segment._image.value = add_image(viewer)
    segment.run()
    wait_idle(qtbot, segment)
    review._prediction.value = viewer.layers["img mask"]
    review._export_path.value = tmp_path / "refused" / "img.dcm"
    review._export_maps.value = True
    (tmp_path / "refused").mkdir()
    assert review.export() is None
    assert list((tmp_path / "refused").iterdir()) == []


def _save_fov_tiny(name: str = "tiny-fov") -> str:
    """The tiny model under a model file that derives its scale from the field of view."""
    from napari_r2au.model_files import load_model_file, save_model, user_models_dir

    tiny = load_model_file(user_models_dir() / "tiny.json")
    meta = dict(tiny.metadata, name=name, fov_diameter=40)
    meta.pop("weights_file"), meta.pop("weights_sha256")
    save_model(tiny.network, user_models_dir(), meta)
    return name


def test_first_result_shows_the_image_and_a_readable_mask(make_napari_viewer, qtbot, tiny_model):
    """The maps are added hidden, the mask in a bright colour; a map the user shows again
    stays shown on the next run; the Image picker offers no plugin outputs."""
    viewer = make_napari_viewer()
    add_image(viewer)
    widget = dock(viewer, "Segment")
    widget._uncertainty.value = True
    widget.run()
    wait_idle(qtbot, widget)
    maps = ["img probability", "img uncertainty", *(f"img attention {g}" for g in range(1, 5))]
    assert all(not viewer.layers[name].visible for name in maps)
    mask = viewer.layers["img mask"]
    assert mask.visible and viewer.layers["img"].visible
    np.testing.assert_allclose(mask.colormap.map(np.array([1]))[0], (0.0, 1.0, 1.0, 1.0))
    assert mask.colormap.map(np.array([0]))[0][3] == 0  # background transparent
    assert mask.colormap.map(np.array([2]))[0][3] == 1  # a label painted beyond 1 stays visible
    viewer.layers["img probability"].visible = True
    widget.run()
    wait_idle(qtbot, widget)
    assert viewer.layers["img probability"].visible and not viewer.layers["img attention 1"].visible
    widget.reset_choices()
    assert [layer.name for layer in widget._image.choices] == ["img"]


def test_the_model_cannot_change_under_a_running_segment(make_napari_viewer, qtbot, tiny_model):
    from napari_r2au.model_files import load_model_file, save_model, user_models_dir

    tiny = load_model_file(user_models_dir() / "tiny.json")
    save_model(
        tiny.network,
        user_models_dir(),
        dict(
            {k: v for k, v in tiny.metadata.items() if k not in ("weights_file", "weights_sha256")},
            name="tiny-high",
            threshold=0.8,
        ),
    )
    viewer = make_napari_viewer()
    add_image(viewer, size=160)
    widget = dock(viewer, "Segment")
    widget._tile.value = 32
    widget.run()
    assert widget.running and not widget._model.enabled
    widget._model.reset_choices()  # a picker refresh mid-run (another dock registered a model)
    widget._on_model_changed()
    assert widget._threshold.value == 0.5
    wait_idle(qtbot, widget)
    assert widget._model.enabled
    info = viewer.layers["img mask"].metadata["r2au"]
    assert info["model"] == "tiny" and info["threshold"] == 0.5


def test_segment_derives_and_shows_the_scale_of_a_fundus_model(make_napari_viewer, qtbot, tiny_model):
    from napari_r2au.preprocess import fov_diameter

    name = _save_fov_tiny()
    viewer = make_napari_viewer()
    yy, xx = np.mgrid[:96, :96]
    field = (yy - 48) ** 2 + (xx - 48) ** 2 < 40**2  # an 80 px round field of view on black
    photo = (field[..., None] * np.array([180, 90, 40])).astype(np.uint8)
    viewer.add_image(photo, rgb=True, name="photo")
    widget = dock(viewer, "Segment")
    widget._model._choice.value = name
    assert widget._scale.native.text() == "auto"
    widget.run()
    wait_idle(qtbot, widget)
    derived = 40 / fov_diameter(photo)
    assert viewer.layers["photo mask"].metadata["r2au"]["scale"] == pytest.approx(derived)
    assert widget._scale.value == 0 and widget._scale.native.text() == f"auto ({derived:.3g})"
    assert f"at scale {derived:.3g}" in widget._status.value


def test_review_defaults_follow_segment_and_the_manual_mask(make_napari_viewer, qtbot, tiny_model, tmp_path):
    """The first Compare works without picking: Prediction is the mask Segment just made,
    Reference the manual mask of the same size; metrics go when their layers go; exports
    write the format asked for or say in the dock why not."""
    import imageio.v3 as iio

    viewer = make_napari_viewer()
    add_image(viewer)
    review = dock(viewer, "Review")
    _, truth = bars()
    viewer.add_labels(truth, name="manual")
    viewer.add_labels(np.zeros((8, 8), np.uint8), name="other size")
    run_segment(qtbot, viewer)
    assert review._prediction.value.name == "img mask"
    assert review._reference.value.name == "manual"
    assert review.compare() is not None and "Dice (F1)" in review._metrics.value
    viewer.layers.remove("manual")
    assert review.metrics is None and review._metrics.value == ""

    review._export_path.value = tmp_path / "as.png"
    review._export.changed.emit(True)
    assert (tmp_path / "as.png").is_file() and not (tmp_path / "as.png.tif").exists()
    np.testing.assert_array_equal(iio.imread(tmp_path / "as.png"), viewer.layers["img mask"].data)
    assert review._export_status.value.startswith("Wrote as.png")
    review._export.changed.emit(True)  # exists already: said in the dock, not only in a toast
    assert "exists already" in review._export_status.value
    review._export_path.value = tmp_path / "lossy.jpg"
    review._export.changed.emit(True)
    assert "lossy.jpg" in review._export_status.value and not list(tmp_path.glob("lossy*"))


def test_the_docks_start_with_the_default_model(make_napari_viewer, tiny_model):
    """Not whichever model sorts first (ct-lungs, a user's 'a-model')."""
    from napari_r2au.model_files import DEFAULT_MODEL

    _save_tiny("a-first-by-name")
    viewer = make_napari_viewer()
    for name in ("Segment", "Fine-tune"):
        _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, name)
        assert widget._model._choice.value == DEFAULT_MODEL
        assert widget._model._choice.choices[0] == DEFAULT_MODEL


def test_finetune_says_when_the_corrected_mask_looks_inverted(
    make_napari_viewer, qtbot, tiny_model, notifications
):
    """ISBI 2012's own label file (255 = interior) as corrections: said before the run."""
    viewer = make_napari_viewer()
    viewer.add_image(bars(64)[0][..., 0], name="grey")  # a grey image for an RGB model: said too
    _, truth = bars(64)
    viewer.add_labels((1 - truth).astype(np.uint8), name="inverted")
    finetune = dock(viewer, "Fine-tune")
    finetune._steps.value = 2
    finetune.run()
    text = messages(notifications)
    assert "inverted" in text and "'inverted'" in text and "grey image" in text
    wait_idle(qtbot, finetune)


def test_three_docks_fit_a_1366x768_window(make_napari_viewer, qtbot, tiny_model):
    """napari docks the scroll area (not the content), so the docks scroll instead of
    holding the window taller than a laptop screen."""
    from qtpy.QtWidgets import QScrollArea

    viewer = make_napari_viewer(show=True)
    widgets = [
        viewer.window.add_plugin_dock_widget(PLUGIN, name)[1] for name in ("Segment", "Fine-tune", "Review")
    ]
    for widget in widgets:
        assert isinstance(widget.native, QScrollArea) and widget.native.widget() is widget.content
    window = viewer.window._qt_window
    window.resize(1366, 768)
    qtbot.wait(300)
    assert window.height() <= 800, f"the docks hold the window {window.height()} px tall"


def test_export_to_a_folder_of_a_layer_with_a_dot_in_its_name(make_napari_viewer, tmp_path):
    """'scan.nii mask' exported to a folder is scan.nii_mask.tif, not a refused format."""
    viewer = make_napari_viewer()
    viewer.add_labels(np.zeros((8, 8), np.uint8), name="scan.nii mask")
    review = dock(viewer, "Review")
    review._prediction.value = viewer.layers["scan.nii mask"]
    review._export_path.value = tmp_path
    review._export.changed.emit(True)
    assert (tmp_path / "scan.nii_mask.tif").is_file(), review._export_status.value


def test_the_threshold_readout_shows_a_model_threshold_with_three_decimals(make_napari_viewer):
    from qtpy.QtWidgets import QDoubleSpinBox

    widget = dock(make_napari_viewer(), "Segment")
    widget._threshold.value = 0.225  # retina-vessels' threshold
    (readout,) = widget._threshold.native.findChildren(QDoubleSpinBox)
    assert readout.text() == "0.225" and widget._threshold.value == pytest.approx(0.225)


def test_fine_tune_defaults_to_the_mask_just_painted_not_a_mask_file(make_napari_viewer):
    from napari_r2au.mask_record import checksums, with_record

    viewer = make_napari_viewer()
    add_image(viewer)
    _, truth = bars(64)
    viewer.add_labels(truth, name="case_mask")  # a mask file: no model record
    made = viewer.add_labels(
        truth.copy(), name="img mask", metadata=with_record({}, {"model": "tiny", **checksums(truth)})
    )
    other = viewer.add_labels(
        truth.copy(), name="other mask", metadata=with_record({}, {"model": "tiny", **checksums(truth)})
    )
    made.data = np.where(truth > 0, 0, 1).astype(np.uint8)  # painted on
    widget = dock(viewer, "Fine-tune")
    assert widget._corrected.value is made  # edited beats the latest unedited one
    widget._corrected.value = viewer.layers["case_mask"]  # the user's own pick stays
    viewer.add_labels(truth.copy(), name="third", metadata=with_record({}, {"model": "tiny"}))
    assert widget._corrected.value is viewer.layers["case_mask"]
    assert other is not made


def test_a_first_result_shows_its_mask_at_once_and_adds_the_maps_one_per_turn(
    make_napari_viewer, qtbot, tiny_model
):
    """Creating five map layers at once froze the first result for a second: the mask comes
    first, active and on top in the end; a new run stops the placing of the one before."""
    viewer = make_napari_viewer()
    image, _ = bars()
    viewer.add_image(image, name="img", rgb=True)
    widget = dock(viewer, "Segment")
    shown: list[tuple[bool, list[str]]] = []
    real = widget._on_result

    def on_result(output):
        real(output)
        shown.append((widget.placing_maps, [layer.name for layer in viewer.layers]))

    widget._on_result = on_result
    widget.run()
    qtbot.waitUntil(lambda: bool(shown), timeout=TIMEOUT)
    placing, names = shown[0]
    assert placing and "img mask" in names and "img attention 4" not in names  # the maps follow
    wait_idle(qtbot, widget)  # running covers the placing
    names = [layer.name for layer in viewer.layers]
    assert {"img probability", *(f"img attention {g}" for g in range(1, 5))} <= set(names)
    assert names[-1] == "img mask" and viewer.layers.selection.active.name == "img mask"
    assert not any(viewer.layers[n].visible for n in names if n.startswith("img attention"))
    # a second run finds every map there: updated at once, nothing staged
    shown.clear()
    widget.run()
    qtbot.waitUntil(lambda: bool(shown), timeout=TIMEOUT)
    assert shown[0][0] is False
    wait_idle(qtbot, widget)
    # a placing that a newer result overtook places nothing more
    widget._place_maps("img", [("img another map", np.zeros((64, 64), np.float32), {})], True)
    assert widget.running and not widget.segmenting  # a new run may start while maps are placed
    widget._map_generation += 1  # what a newer result does
    qtbot.waitUntil(lambda: not widget.placing_maps, timeout=TIMEOUT)
    assert "img another map" not in viewer.layers


def test_export_model_writes_the_chosen_format_and_never_replaces_a_file(
    make_napari_viewer, qtbot, tiny_model, notifications, tmp_path
):
    from napari_r2au.export import load_torchscript

    viewer = make_napari_viewer()
    picker = dock(viewer, "Segment")._model
    assert not picker._export.native.isHidden() and picker._choice.value == "tiny"
    target = tmp_path / "tiny.pt"
    picker.export_chosen(str(target))
    qtbot.waitUntil(lambda: not picker.exporting, timeout=TIMEOUT)
    assert target.is_file() and (tmp_path / "tiny.pt.json").is_file(), messages(notifications)
    assert "Exported tiny as torchscript" in messages(notifications)
    scripted = load_torchscript(target)
    assert scripted is not None
    before = target.read_bytes()
    picker.export_chosen(str(target))  # exists: refused in a message, the file left as it was
    qtbot.waitUntil(lambda: not picker.exporting, timeout=TIMEOUT)
    assert target.read_bytes() == before and "exist" in messages(notifications).lower()
    picker.export_chosen(str(tmp_path / "tiny.h5"))  # a format we do not write: said, nothing written
    assert "name the file .onnx" in messages(notifications) and not (tmp_path / "tiny.h5").exists()


def test_export_model_writes_a_bioimageio_package_from_the_dock(
    make_napari_viewer, qtbot, tiny_model, notifications, tmp_path
):
    """A .zip name in Export model… gives a bioimage.io package that add-model takes back."""
    import zipfile

    pytest.importorskip("onnx", reason="the bioimage.io package carries an ONNX copy (export extra)")
    viewer = make_napari_viewer()
    picker = dock(viewer, "Segment")._model
    target = tmp_path / "tiny.zip"
    # the tiny model does not read fundus photographs: without an image in the dock it is said why
    picker.export_chosen(str(target))
    qtbot.waitUntil(lambda: not picker.exporting, timeout=TIMEOUT)
    assert "image layer chosen in the dock" in messages(notifications) and not target.exists()
    add_image(viewer, size=80)  # the Segment dock's image: the package's test image is cut from it
    picker.export_chosen(str(target))
    qtbot.waitUntil(lambda: not picker.exporting, timeout=TIMEOUT)
    assert "Exported tiny as a bioimage.io package" in messages(notifications), messages(notifications)
    with zipfile.ZipFile(target) as archive:
        names = set(archive.namelist())
        archive.extract("test_input.npy", tmp_path)
    assert {"rdf.yaml", "tiny.pt", "tiny.onnx", "tiny.safetensors", "test_input.npy"} <= names
    np.testing.assert_allclose(np.load(tmp_path / "test_input.npy")[0].transpose(1, 2, 0), bars(80)[0])


def test_a_model_trained_on_from_its_own_weights_is_not_called_a_fine_tune_of_itself():
    """The bundled retina-vessels and skin-lesions were trained on from an earlier version
    of themselves: the card says so, and a real fine-tune still names its parent."""
    from napari_r2au.model_files import list_models
    from napari_r2au.widgets._common import model_card, read_model_metadata

    paths = {row["name"]: row["path"] for row in list_models() if row["source"] == "bundled"}
    card = model_card(read_model_metadata(paths["retina-vessels"]))
    assert "Fine-tuned from" not in card and "Training went on from an earlier retina-vessels (" in card
    # its validation figures were measured at the field it was trained at, not the one it runs at
    assert "Validation F1: 0.798 (at a 537 px field of view, the training size)" in card
    assert "Runs each photograph at a 671 px field of view" in card
    fine_tune = {"name": "retina-vessels-ft1", "provenance": {"parent": {"name": "retina-vessels"}}}
    assert "Fine-tuned from: retina-vessels" in model_card(fine_tune)
    # a fundus model's own scale (a fine-tune records the one it learned at) is its fall-back
    fine_tune.update(fov_diameter=671, input_scale=1.2449)
    assert "images resized ×1.24 where no field of view is found" in model_card(fine_tune)


def test_the_loss_curve_redraws_only_its_lines_while_a_run_goes_on(qtbot):
    """A full redraw of the curve took 0.1-0.15 s of napari's GUI thread at every step: the
    axes stay put during a run and only the lines are drawn again, unless a loss goes above
    the axis."""
    from qtpy.QtWidgets import QApplication

    from napari_r2au.widgets.finetune import LossCurve

    curve = LossCurve()
    qtbot.addWidget(curve.canvas)
    curve.canvas.show()
    curve.reset(total_steps=60)
    QApplication.processEvents()  # the new run's full redraw
    before = curve.full_redraws
    assert before >= 1
    for step in range(1, 61):
        curve.add(step, 0.9 / step, 0.5 + step / 200 if step % 10 == 0 else None)
        QApplication.processEvents()  # a pending full redraw would happen here
    assert curve.full_redraws == before  # the axes stayed as they were: only the lines were drawn
    assert curve.steps == list(range(1, 61)) and curve.dice_steps == [10, 20, 30, 40, 50, 60]
    assert curve._loss_axes.get_xlim() == (0.5, 60.5) and curve._loss_axes.get_ylim() == (0, 1)
    assert list(curve._dice_line.get_xdata()) == [10, 20, 30, 40, 50, 60]
    curve.add(61, 3.0)  # above the axis, and past the planned steps
    QApplication.processEvents()
    assert curve.full_redraws - before == 1
    assert curve._loss_axes.get_ylim() == (0, 3.75) and curve._loss_axes.get_xlim()[1] >= 61.5
