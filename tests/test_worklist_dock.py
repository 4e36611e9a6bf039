"""The Worklist dock, built through the plugin manifest, on a tiny model and small images:
open a folder of cases, pre-segment, go through them, correct, judge, close and resume,
learn from the reviewed cases, export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from .test_widgets import PLUGIN, TIMEOUT, _save_tiny, bars

pytestmark = pytest.mark.gui


@pytest.fixture
def cases(tmp_path) -> Path:
    """Three small RGB photographs with their reference masks beside them (case_seg.png)."""
    import imageio.v3 as iio

    folder = tmp_path / "cases"
    folder.mkdir()
    for index in range(3):
        image, mask = bars(64, seed=index)
        iio.imwrite(folder / f"case{index}.png", image)
        iio.imwrite(folder / f"case{index}_seg.png", mask * 255)
    return folder


@pytest.fixture
def tiny() -> str:
    return _save_tiny("tiny")


def settle(qtbot, widget) -> None:
    """Wait until the case asked for is on screen (its files are read in a worker, and a case
    whose mask arrives in the background gets its layers one per turn of the event loop)."""
    qtbot.waitUntil(lambda: not widget.opening and widget._next_step is None, timeout=10_000)


def open_dock(viewer, folder: Path, cases: Path | None = None, qtbot=None):
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Worklist")
    widget._model.refresh(select="tiny")
    widget._folder.value = str(folder)
    if cases is not None:
        widget._cases.value = str(cases)
    widget.open_worklist()
    if qtbot is not None and widget.worklist is not None:
        settle(qtbot, widget)
    return widget


def wait_idle(qtbot, widget) -> None:
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT)


def presegmented(qtbot, viewer, tmp_path, cases):
    widget = open_dock(viewer, tmp_path / "wl", cases, qtbot)
    assert widget.worklist is not None and len(widget.worklist.cases) == 3
    widget.presegment()
    assert widget.running
    wait_idle(qtbot, widget)
    settle(qtbot, widget)
    return widget


def test_a_folder_of_cases_opens_as_a_table_and_is_pre_segmented_case_on_screen_first(
    make_napari_viewer, qtbot, tmp_path, cases, tiny
):
    viewer = make_napari_viewer()
    widget = open_dock(viewer, tmp_path / "wl", cases, qtbot)
    table = widget._table
    assert table.rowCount() == 3
    assert [widget._row_case(r) for r in range(3)] == ["case0", "case1", "case2"]
    assert widget.current == "case0" and "case0 image" in viewer.layers
    assert not viewer.layers["case0 mask"].data.any()  # nothing segmented yet: an empty mask to paint on
    widget.step(1)  # the reviewer moves on before pre-segmenting: that case is done first
    settle(qtbot, widget)
    assert widget.current == "case1"
    widget.presegment()
    wait_idle(qtbot, widget)
    worklist = widget.worklist
    order = [case["model"] for case in worklist.case("case1").history[:1]]
    assert order == ["tiny"]
    first = min(worklist.cases, key=lambda c: c.segmented or "")
    assert first.segmented == worklist.case("case1").segmented  # the case on screen came first
    assert all(c.model == "tiny" and c.dice is not None and c.uncertainty is not None for c in worklist.cases)
    # the case on screen got its mask as soon as it was done, readable at once
    assert "case1 mask" in viewer.layers
    mask = viewer.layers["case1 mask"]
    # its layers are placed one per turn of the event loop, the mask on top at the end
    qtbot.waitUntil(
        lambda: "case1 uncertainty" in viewer.layers and viewer.layers[-1] is mask, timeout=10_000
    )
    assert mask.visible and viewer.layers.selection.active is mask and mask.data.any()
    for name in ("case1 probability", "case1 uncertainty"):
        assert not viewer.layers[name].visible  # maps added hidden
    assert worklist.case("case1").status == "in review"
    assert {widget._table.item(r, 1).text() for r in range(3)} >= {"segmented", "in review"}


def test_edits_are_saved_in_the_background_and_survive_a_restart(
    make_napari_viewer, qtbot, tmp_path, cases, tiny
):
    from napari_r2au.worklist import Worklist

    viewer = make_napari_viewer()
    widget = presegmented(qtbot, viewer, tmp_path, cases)
    case = widget.worklist.case(widget.current)
    on_disk = widget.worklist.mask_path(case)
    before = on_disk.read_bytes()
    layer = widget._mask_layer
    layer.paint((5, 5), 1)  # a stroke, as the brush makes it
    # saved without any other action, within the debounce delay (a crash now loses nothing)
    qtbot.waitUntil(lambda: on_disk.read_bytes() != before, timeout=10_000)
    qtbot.waitUntil(lambda: not widget._saving, timeout=10_000)
    stored = Worklist.open(tmp_path / "wl", read_only=True)
    assert stored.case(case.id).edited and stored.case(case.id).status == "in review"
    assert np.array_equal(stored.read_mask(stored.case(case.id)), layer.data)
    edited = np.array(layer.data)
    widget._comment.value = "bar ends redrawn"
    widget.set_verdict("accepted")
    settle(qtbot, widget)
    assert widget.worklist.case(case.id).status == "corrected"  # accepted with edits
    assert widget.current != case.id  # the next case opens
    # napari closes: a new window on the same folder restores every case as it was
    widget.close_worklist()
    again = open_dock(make_napari_viewer(), tmp_path / "wl", qtbot=qtbot)
    restored = again.worklist.case(case.id)
    assert restored.status == "corrected" and restored.comment == "bar ends redrawn" and restored.edited
    assert np.array_equal(again.worklist.read_mask(restored), edited)
    again.open_case(case.id)
    settle(qtbot, again)
    assert np.array_equal(again._viewer.layers[f"{case.id} mask"].data, edited)
    record = json.loads(again.worklist.mask_path(restored).with_suffix(".json").read_text())
    assert record["corrected_by_hand"] is True and record["review"]["status"] == "corrected"
    assert record["model"] == "tiny" and record["reviewer"]


def test_a_second_window_is_refused_and_a_rejection_needs_a_comment(
    make_napari_viewer, qtbot, tmp_path, cases, tiny
):
    viewer = make_napari_viewer()
    widget = presegmented(qtbot, viewer, tmp_path, cases)
    other = open_dock(make_napari_viewer(), tmp_path / "wl", qtbot=qtbot)
    assert other.worklist is None and "open elsewhere" in other._status.value
    current = widget.current
    widget._comment.value = ""
    widget.set_verdict("rejected")
    settle(qtbot, widget)
    assert widget.worklist.case(current).status == "in review" and "why" in widget._case_line.value
    widget._comment.value = "out of focus"
    widget.set_verdict("rejected")
    settle(qtbot, widget)
    assert widget.worklist.case(current).status == "rejected"


def test_keys_move_through_the_cases_and_set_verdicts(make_napari_viewer, qtbot, tmp_path, cases, tiny):
    from napari_r2au.widgets.worklist import SHORTCUTS

    viewer = make_napari_viewer()
    widget = presegmented(qtbot, viewer, tmp_path, cases)
    bound = {str(key): action for key, action in viewer.keymap.items()}
    assert {"PageDown", "PageUp", "Ctrl+Shift+A"} <= set(bound), bound
    start = widget.current
    bound[str(SHORTCUTS["next"]).replace("-", "+")](viewer)
    settle(qtbot, widget)
    assert widget.current != start
    bound["PageUp"](viewer)
    settle(qtbot, widget)
    assert widget.current == start
    bound["Ctrl+Shift+A"](viewer)
    settle(qtbot, widget)
    assert widget.worklist.case(start).status == "accepted"


def test_learning_makes_a_new_version_and_re_segments_only_untouched_cases(
    make_napari_viewer, qtbot, tmp_path, cases, tiny, held_out_dice
):
    held_out_dice(fell=False)
    viewer = make_napari_viewer()
    widget = presegmented(qtbot, viewer, tmp_path, cases)
    worklist = widget.worklist
    first = widget.current
    _, truth = bars(64, seed=int(first[-1]))
    widget._mask_layer.data = truth  # the reviewer's correction
    widget.set_verdict("accepted")
    settle(qtbot, widget)
    opened = widget.current  # the next case, on screen: in review, so never re-segmented
    untouched = [c.id for c in worklist.cases if c.untouched]
    assert len(untouched) == 1 and opened not in untouched
    widget._steps.value = 4
    widget.learn()
    wait_idle(qtbot, widget)
    new = worklist.model
    assert new and new != "tiny" and worklist.models[-1]["cases"] == [first]
    assert "New model" in widget._learn_line.value
    assert worklist.case(untouched[0]).model == new  # re-segmented with the new version
    assert worklist.case(first).model == "tiny" and worklist.case(opened).model == "tiny"
    assert worklist.case(first).status == "corrected"


def test_the_scale_field_is_the_worklists_and_segments_every_case_at_it(
    make_napari_viewer, qtbot, tmp_path, cases, tiny
):
    """A model with no rule for these images needs a scale: the dock's Scale field starts the
    worklist with it, pre-segments at it, and shows it again when the worklist is reopened."""
    from napari_r2au.worklist import Worklist

    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Worklist")
    widget._model.refresh(select="tiny")
    widget._scale.value = 0.5
    widget._folder.value = str(tmp_path / "wl")
    widget._cases.value = str(cases)
    widget.open_worklist()
    settle(qtbot, widget)
    assert widget.worklist.scale == 0.5
    widget.presegment()
    wait_idle(qtbot, widget)
    settle(qtbot, widget)
    assert {c.scale for c in widget.worklist.cases} == {0.5}
    assert "mask by tiny at scale 0.5" in widget._case_line.value
    on_screen = widget.current  # opened by the reviewer: never re-segmented
    widget._scale.value = 0.25  # the untouched cases again, at the new scale
    widget.presegment()
    wait_idle(qtbot, widget)
    scales = {c.id: c.scale for c in widget.worklist.cases}
    assert scales.pop(on_screen) == 0.5 and set(scales.values()) == {0.25}
    widget.close_worklist()
    with Worklist.open(tmp_path / "wl", read_only=True) as worklist:
        assert worklist.scale == 0.25
    again = open_dock(viewer, tmp_path / "wl", qtbot=qtbot)
    assert again._scale.value == 0.25
    again.close_worklist()

    # a worklist made on the command line keeps its own scale: more decimals than the field
    # shows, or above the field's old maximum, is neither rounded nor refused
    for scale in (1 / 3, 10.0):
        folder = tmp_path / f"wl-{scale:.2f}"
        Worklist.create(folder, [cases], model="tiny", scale=scale).close()
        other = open_dock(viewer, folder, qtbot=qtbot)
        assert other.worklist is not None and other._scale.value == round(scale, 4)
        other.presegment()
        assert not other._scale.enabled  # the scale a running job uses stays the one shown
        wait_idle(qtbot, other)
        assert other.worklist.scale == scale and {c.scale_asked for c in other.worklist.cases} == {scale}
        other.close_worklist()


def test_a_new_version_that_scores_lower_is_kept_aside_and_said(
    make_napari_viewer, qtbot, tmp_path, cases, tiny, notifications, held_out_dice
):
    """Learn keeps a version whose held-out Dice fell aside (the worklist's rule, the Fine-tune
    dock's too): the worklist keeps its model, no mask changes, the model picker stays, and the
    dock says why and how to use the version anyway."""
    viewer = make_napari_viewer()
    widget = presegmented(qtbot, viewer, tmp_path, cases)
    worklist = widget.worklist
    first = widget.current
    widget._mask_layer.data = bars(64, seed=int(first[-1]))[1]  # the reviewer's correction
    widget.set_verdict("accepted")
    settle(qtbot, widget)
    untouched = [c.id for c in worklist.cases if c.untouched]
    held_out_dice(fell=True)
    notifications.clear()
    widget._steps.value = 2
    widget.learn()
    wait_idle(qtbot, widget)
    assert worklist.model == "tiny" and worklist.models[-1]["kept_aside"] is True
    assert all(worklist.case(case).model == "tiny" for case in untouched)
    assert widget._model.metadata()["name"] == "tiny"
    line = widget._learn_line.value
    assert "tiny-ft1 kept aside: it scores lower than tiny" in line and "to use tiny-ft1 anyway" in line
    assert any("kept aside" in str(n.message) for n in notifications)


def test_learning_from_cases_accepted_as_segmented_is_used_and_says_its_dice_tests_nothing(
    make_napari_viewer, qtbot, tmp_path, cases, tiny
):
    """No corrected pixel in the held-out part: its Dice says nothing, so a fall there does not
    keep the version aside, and the line says why the figures mean nothing."""
    from types import SimpleNamespace

    from napari_r2au.worklist import LearnResult

    viewer = make_napari_viewer()
    widget = open_dock(viewer, tmp_path / "wl", cases, qtbot)
    widget._job = "learn"
    fell = SimpleNamespace(dice_fell=True, held_out_corrections=0)
    result = LearnResult("tiny-ft1", "tiny", ["case0"], 0.83, 0.81, ["case2"], adopted=True, finetune=fell)
    widget._on_result(result)
    assert "not a test of the new version" in widget._learn_line.value
    assert "kept aside" not in widget._learn_line.value
    widget._job = ""


def test_the_series_exports_with_a_summary_and_never_replaces_files_silently(
    make_napari_viewer, qtbot, tmp_path, cases, tiny
):
    viewer = make_napari_viewer()
    widget = presegmented(qtbot, viewer, tmp_path, cases)
    widget.set_verdict("accepted")
    settle(qtbot, widget)
    out = tmp_path / "out"
    widget._export_to.value = str(out)
    widget.export()
    wait_idle(qtbot, widget)
    assert {"summary.csv", "summary.json", "summary.png", "case0_mask.tif", "case0_mask.json"} <= {
        p.name for p in out.iterdir()
    }
    summary = json.loads((out / "summary.json").read_text())
    assert [row["case"] for row in summary["cases"]] == ["case0", "case1", "case2"]
    assert summary["cases"][0]["status"] == "accepted" and summary["cases"][0]["dice"] is not None
    (out / "case1_mask.tif").write_bytes(b"a file the user made")
    widget.export()
    wait_idle(qtbot, widget)
    assert "Not written" in widget._export_line.value
    assert (out / "case1_mask.tif").read_bytes() == b"a file the user made"


def test_a_failed_background_save_is_retried_when_the_case_is_left(
    make_napari_viewer, qtbot, tmp_path, cases, tiny, monkeypatch
):
    viewer = make_napari_viewer()
    widget = presegmented(qtbot, viewer, tmp_path, cases)
    worklist = widget.worklist
    case = worklist.case(widget.current)
    real_save, failures = worklist.save_mask, []

    def full_disk_once(*args, **kwargs):
        if not failures:
            failures.append(1)
            raise OSError(28, "No space left on device")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(worklist, "save_mask", full_disk_once)
    widget._mask_layer.paint((5, 5), 1)
    painted = np.array(widget._mask_layer.data)
    qtbot.waitUntil(lambda: bool(failures) and not widget._saving, timeout=10_000)
    assert widget._save_error  # the edit is known to be unsaved
    assert not np.array_equal(worklist.read_mask(case), painted)
    widget.step(1)  # leaving the case saves it again
    settle(qtbot, widget)
    assert np.array_equal(worklist.read_mask(worklist.case(case.id)), painted)
    assert not widget._save_error and worklist.case(case.id).edited


def test_opening_the_open_worklist_again_releases_the_docks_own_lock(
    make_napari_viewer, qtbot, tmp_path, cases, tiny
):
    viewer = make_napari_viewer()
    widget = presegmented(qtbot, viewer, tmp_path, cases)
    widget.open_worklist()  # a refresh of the same folder
    settle(qtbot, widget)
    assert widget.worklist is not None and "open elsewhere" not in widget._status.value
    assert len(widget.worklist.cases) == 3


def test_a_case_that_fails_to_open_leaves_no_other_cases_layers(
    make_napari_viewer, qtbot, tmp_path, cases, tiny, monkeypatch
):
    from napari_r2au.widgets import worklist as dock

    viewer = make_napari_viewer()
    widget = presegmented(qtbot, viewer, tmp_path, cases)
    before = widget.current
    real = dock._read_case_layers

    def unreadable(worklist, case):
        if case.id != before:
            raise OSError(5, "Input/output error")
        return real(worklist, case)

    monkeypatch.setattr(dock, "_read_case_layers", unreadable)
    widget.step(1)
    settle(qtbot, widget)
    assert widget.current != before and "cannot be opened" in widget._case_line.value
    assert not [layer.name for layer in viewer.layers if layer.name.startswith(before)]
    assert widget._mask_layer is None  # no stroke can land in the case before


def test_opening_a_case_stops_the_staged_placing_of_the_one_before(
    make_napari_viewer, qtbot, tmp_path, cases, tiny, monkeypatch
):
    viewer = make_napari_viewer()
    widget = presegmented(qtbot, viewer, tmp_path, cases)
    first, second = [c.id for c in widget.worklist.cases if c.id != widget.current][:2]
    monkeypatch.setattr(widget._stage_timer, "start", lambda *_: None)  # hold the staging after one layer
    widget.open_case(first, staged=True)
    qtbot.waitUntil(lambda: widget._next_step is not None, timeout=10_000)
    stale = widget._next_step
    monkeypatch.undo()
    widget.open_case(second)
    assert widget._next_step is None and widget._mask_layer is None  # at once, before the next is read
    shown = [(layer.name, id(layer.data)) for layer in viewer.layers]
    stale()  # a turn of the event loop already due while the next case is read: it places nothing
    assert [(layer.name, id(layer.data)) for layer in viewer.layers] == shown and widget._mask_layer is None
    settle(qtbot, widget)
    names = [layer.name for layer in viewer.layers]
    assert f"{second} mask" in names and not [n for n in names if n.startswith(first)]
    assert widget._mask_layer.name == f"{second} mask"
