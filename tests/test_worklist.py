"""The worklist (napari_r2au/worklist.py) and ``r2au worklist``: cases found where public
sets and users keep them, one writer at a time, reviewed cases never overwritten, a
reopened worklist as it was left, and an export that never replaces a user's file."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_r2au.cli import main
from napari_r2au.io import pairing_id, write_png
from napari_r2au.mask_record import checksums
from napari_r2au.worklist import (
    LOCK_FILE,
    WORKLIST_FILE,
    Worklist,
    WorklistError,
    WorklistLocked,
    discover_cases,
    export_series,
    iter_learn,
    iter_segment,
    run_events,
)

from .conftest import DATA
from .test_cli import _tiny_user_model

ROOT = Path(__file__).resolve().parents[1]


# -- helpers -------------------------------------------------------------------------------


def _bars(index: int, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """A small RGB image with bright bars and its 0/1 mask (a different bar per index)."""
    rng = np.random.default_rng(index)
    mask = np.zeros((size, size), np.uint8)
    mask[:, 12 + 3 * index : 20 + 3 * index] = 1
    mask[30:36, :] = 1
    image = (rng.random((size, size, 3)) * 60 + mask[..., None] * 120).astype(np.uint8)
    return image, mask


def _study(root: Path, n: int = 3, size: int = 64) -> Path:
    """``root/images/c<i>.png`` with ``root/masks/c<i>.png`` (0/255): the PH2 layout."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        image, mask = _bars(i, size)
        write_png(root / "images" / f"c{i}.png", image)
        write_png(root / "masks" / f"c{i}.png", mask * 255)
    return root / "images"


def _store(worklist: Worklist, case, mask: np.ndarray, model: str = "fake") -> bool:
    """A model's result stored as iter_segment stores it, without running a model."""
    record = {"model": model, "model_sha256": "0" * 64, "scale": 1.0, **checksums(mask)}
    probability = mask.astype(np.float32)
    return worklist.store_segmentation(case, record, mask, probability, probability * 0.1, [], 0.1)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _run(generator):
    return run_events(generator)


def _ct_series(folder: Path, positions=(0.0, 2.5, 5.0), offset: int = 0) -> Path:
    """Single-frame CT slices made from pydicom's CT_small (one series per folder)."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    source = get_testdata_file("CT_small.dcm")
    if source is None:
        pytest.skip("pydicom's test file CT_small.dcm is not installed")
    folder.mkdir(parents=True)
    series = generate_uid()
    for index, z in enumerate(positions):
        dataset = pydicom.dcmread(source)
        dataset.ImageOrientationPatient, dataset.ImagePositionPatient = [1, 0, 0, 0, 1, 0], [0.0, 0.0, z]
        dataset.SeriesInstanceUID = series
        dataset.SOPInstanceUID, dataset.InstanceNumber = generate_uid(), index + 1
        dataset.save_as(folder / f"slice{index + offset}.dcm")
    return folder


# -- finding the cases ---------------------------------------------------------------------

#: (data set, images folder, the folder its references must come from); each has a field
#: of view folder (mask/) beside it, except PH2, whose masks/ holds the references
LAYOUTS = [
    ("DRIVE/training", "images", "1st_manual"),
    ("HRF", "images", "manual1"),
    ("STARE", "images", "labels-ah"),
    ("CHASEDB1", "images", "1stHO"),
    ("PH2", "images", "masks"),
]


@pytest.mark.parametrize("root, images, references", LAYOUTS, ids=[r[0].split("/")[0] for r in LAYOUTS])
def test_discovery_pairs_the_reference_masks_not_the_fields_of_view(root, images, references):
    folder = DATA / root / images
    if not folder.is_dir():
        pytest.skip(f"{folder} not found (set R2AU_DATA; see ../shared/data/README.md)")
    cases = discover_cases([folder])
    assert len(cases) == len([p for p in folder.iterdir() if p.is_file()])
    for case in cases:
        assert case["kind"] == "image" and case["image"].parent == folder
        assert case["reference"] is not None, case
        assert case["reference"].parent.name == references, case  # never mask/ (the field of view)
        assert pairing_id(case["reference"]) == pairing_id(case["image"]) == case["id"]
    assert len({c["id"] for c in cases}) == len(cases)


def test_discovery_pairs_drive_by_number(drive_root):
    cases = {c["id"]: c for c in discover_cases([drive_root / "images"])}
    assert cases["21"]["image"].name == "21_training.tif"
    assert cases["21"]["reference"] == drive_root / "1st_manual" / "21_manual1.gif"


def test_discovery_pairs_a_twin_folder_of_masks(tmp_path):
    """LUNG_CT's layout: 2d_images/ID_0000.tif with 2d_masks/ID_0000.tif."""
    lung = DATA / "LUNG_CT" / "2d_images"
    if lung.is_dir():
        cases = discover_cases([lung])
        assert cases and all(c["reference"] == lung.parent / "2d_masks" / c["image"].name for c in cases)
    (tmp_path / "2d_images").mkdir()
    (tmp_path / "2d_masks").mkdir()
    for name in ("ID_0000.tif", "ID_0001.tif"):
        tifffile.imwrite(tmp_path / "2d_images" / name, np.zeros((8, 8), np.int16))
        tifffile.imwrite(tmp_path / "2d_masks" / name, np.zeros((8, 8), np.uint8))
    cases = discover_cases([tmp_path / "2d_images"])
    assert [c["reference"].parent.name for c in cases] == ["2d_masks", "2d_masks"]


def test_discovery_pairs_masks_beside_the_images_and_does_not_take_them_for_cases(tmp_path):
    image, mask = _bars(0, 16)
    for name in ("a.png", "b.png", "c.png"):
        write_png(tmp_path / name, image)
    write_png(tmp_path / "a_seg.png", mask * 255)
    write_png(tmp_path / "b_mask.png", mask * 255)
    cases = discover_cases([tmp_path])
    assert [(c["id"], c["reference"] and c["reference"].name) for c in cases] == [
        ("a", "a_seg.png"),
        ("b", "b_mask.png"),
        ("c", None),
    ]


def test_a_csv_case_list_takes_paths_relative_to_itself_and_names_a_bad_line(tmp_path):
    image, mask = _bars(0, 16)
    (tmp_path / "data").mkdir()
    write_png(tmp_path / "data" / "one.png", image)
    write_png(tmp_path / "data" / "two.png", image)
    write_png(tmp_path / "data" / "one_ref.png", mask * 255)
    (tmp_path / "lists").mkdir()
    good = tmp_path / "lists" / "cases.csv"
    good.write_text("image,reference,id\n../data/one.png,../data/one_ref.png,patient 1\n../data/two.png,,\n")
    cases = discover_cases([good])
    assert [c["id"] for c in cases] == ["patient_1", "two"]
    assert cases[0]["image"] == (tmp_path / "data" / "one.png").resolve()
    assert cases[0]["reference"] == (tmp_path / "data" / "one_ref.png").resolve()
    assert cases[1]["reference"] is None

    for body, message in [
        ("image\n../data/one.png\n../data/gone.png\n", "line 3: .*gone.png: no such file"),
        ("image\n../data/one.png\n,\n", "line 3: no image path"),
        ("image,reference\n../data/one.png,../data/missing.png\n", "line 2: .*missing.png: no such file"),
        ("picture\n../data/one.png\n", "needs a header row with an 'image' column"),
    ]:
        bad = tmp_path / "lists" / "bad.csv"
        bad.write_text(body)
        with pytest.raises(WorklistError, match=message):
            discover_cases([bad])
    with pytest.raises(WorklistError, match="no such file or folder"):
        discover_cases([tmp_path / "nowhere"])


def test_each_dicom_series_folder_is_one_case(tmp_path):
    study = tmp_path / "study"
    _ct_series(study / "series_a")
    _ct_series(study / "series_b", positions=(0.0, 2.5))
    cases = discover_cases([study])
    assert [(c["id"], c["kind"]) for c in cases] == [("series_a", "dicom"), ("series_b", "dicom")]
    assert all(c["image"].is_dir() and c["reference"] is None for c in cases)
    (case,) = discover_cases([study / "series_b"])  # a series folder given itself
    assert case["id"] == "series_b" and case["kind"] == "dicom"
    listing = tmp_path / "list.csv"
    listing.write_text("image\nstudy/series_a\n")
    assert [c["kind"] for c in discover_cases([listing])] == ["dicom"]


def test_a_hostile_case_name_never_leaves_the_cases_folder(tmp_path):
    image, mask = _bars(0, 16)
    (tmp_path / "in").mkdir()
    names = ["..png", "...png", "..  ..png", "$(rm -rf ~).png", "a b;c|d.png", "ümlaut.png", "-x.png"]
    for name in names:
        write_png(tmp_path / "in" / name, image)
    listing = tmp_path / "in" / "list.csv"
    hostile_ids = ["../../escape", "/etc/passwd", "..", "a/../../b", "C:\\x", "~root", ".", "", "A", "a"]
    with open(listing, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "id"])
        for case_id in hostile_ids:
            writer.writerow([names[0], case_id])
    worklist = Worklist.create(tmp_path / "wl", [tmp_path / "in" / n for n in names] + [listing])
    try:
        cases_dir = (tmp_path / "wl" / "cases").resolve()
        ids = [c.id for c in worklist.cases]
        assert len(ids) == len(names) + len(hostile_ids)
        assert len({i.lower() for i in ids}) == len(ids)  # distinct even on a case-blind file system
        for case in worklist.cases:
            assert worklist.case_folder(case).resolve().parent == cases_dir, case.id
            _store(worklist, case, mask)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "wl"]  # nothing written beside
        assert len(list(cases_dir.iterdir())) == len(ids)
    finally:
        worklist.close()


def test_a_worklist_file_naming_a_case_outside_its_folder_is_refused(tmp_path):
    """A worklist comes from another machine: its ids are checked, not trusted."""
    Worklist.create(tmp_path / "wl", [_study(tmp_path / "data", n=1)]).close()
    path = tmp_path / "wl" / WORKLIST_FILE
    data = json.loads(path.read_text())
    data["cases"][0]["id"] = "../../outside"
    path.write_text(json.dumps(data))
    with pytest.raises(WorklistError, match="outside"):
        Worklist.open(tmp_path / "wl")
    data["cases"][0]["id"] = "c0"
    data["cases"][0]["unknown_key"] = 1
    path.write_text(json.dumps(data))
    with pytest.raises(WorklistError, match="unknown_key"):
        Worklist.open(tmp_path / "wl", read_only=True)


def test_create_refuses_a_folder_in_use(tmp_path):
    images = _study(tmp_path / "data", n=1)
    Worklist.create(tmp_path / "wl", [images]).close()
    with pytest.raises(WorklistError, match="holds a worklist already"):
        Worklist.create(tmp_path / "wl", [images])
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(WorklistError, match="not empty"):
        Worklist.create(tmp_path / "busy", [images])
    with pytest.raises(WorklistError, match="no worklist here"):
        Worklist.open(tmp_path / "busy")


# -- the lock ------------------------------------------------------------------------------


def test_the_lock_refuses_a_second_writer_in_the_same_process(tmp_path):
    worklist = Worklist.create(tmp_path / "wl", [_study(tmp_path / "data", n=1)])
    with pytest.raises(WorklistLocked, match=rf"open elsewhere \(pid {os.getpid()} on"):
        Worklist.open(tmp_path / "wl")
    reader = Worklist.open(tmp_path / "wl", read_only=True)  # reading goes on
    assert [c.id for c in reader.cases] == ["c0"]
    with pytest.raises(WorklistError, match="read-only"):
        reader.save()
    with pytest.raises(WorklistError, match="read-only"):  # refused before any file is written
        reader.save_mask(reader.cases[0], _bars(0)[1])
    assert not (tmp_path / "wl" / "cases").exists()
    worklist.close()
    with Worklist.open(tmp_path / "wl") as again:
        assert again.cases[0].id == "c0"
    Worklist.open(tmp_path / "wl").close()  # released on leaving the with block


def test_the_lock_holds_across_processes_and_dies_with_a_killed_holder(tmp_path):
    Worklist.create(tmp_path / "wl", [_study(tmp_path / "data", n=1)]).close()
    holder = textwrap.dedent(
        """
        import sys, time
        from napari_r2au.worklist import Worklist
        worklist = Worklist.open(sys.argv[1])
        print("locked", flush=True)
        time.sleep(120)
        """
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    process = subprocess.Popen(
        [sys.executable, "-c", holder, str(tmp_path / "wl")], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert process.stdout.readline().strip() == "locked"
        with pytest.raises(WorklistLocked, match=f"pid {process.pid} on"):
            Worklist.open(tmp_path / "wl")
        assert main(["worklist", "status", str(tmp_path / "wl")]) == 0  # read-only: not refused
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        process.stdout.close()
    assert process.returncode == -signal.SIGKILL
    with Worklist.open(tmp_path / "wl") as worklist:  # no stale lock after kill -9
        assert worklist.cases[0].id == "c0"
    assert (tmp_path / "wl" / LOCK_FILE).exists()


# -- reviewing -----------------------------------------------------------------------------


@pytest.fixture
def worklist(tmp_path):
    """Three cases (c0, c1, c2) with references, none segmented yet."""
    worklist = Worklist.create(tmp_path / "wl", [_study(tmp_path / "data")])
    yield worklist
    worklist.close()


def test_edits_and_verdicts_set_the_status(worklist):
    c0, c1, c2 = worklist.cases
    masks = [_bars(i)[1] for i in range(3)]
    for case, mask in zip(worklist.cases, masks):
        assert _store(worklist, case, mask)
        assert case.status == "segmented" and not case.edited and case.dice == pytest.approx(1.0)
    edit = masks[0].copy()
    edit[:4, :4] = 1
    assert worklist.save_mask(c0, edit) is True
    assert c0.status == "in review" and c0.edited and c0.dice < 1.0
    assert worklist.save_mask(c1, masks[1]) is False  # saved unchanged: not an edit
    assert c1.status == "segmented" and not c1.edited

    worklist.set_status(c0, "accepted")
    assert c0.status == "corrected" and c0.reviewer and c0.reviewed  # accepting an edit
    worklist.set_status(c1, "accepted")
    assert c1.status == "accepted"
    with pytest.raises(WorklistError, match="say why it is rejected"):
        worklist.set_status(c2, "rejected")
    assert c2.status == "segmented"
    worklist.set_status(c2, "rejected", "motion blur")
    assert c2.status == "rejected" and c2.comment == "motion blur"
    with pytest.raises(WorklistError, match="a reviewer sets one of"):
        worklist.set_status(c2, "segmented")
    sidecar = json.loads((worklist.case_folder(c0) / "mask.json").read_text())
    assert sidecar["review"]["status"] == "corrected" and sidecar["corrected_by_hand"] is True
    assert [h["status"] for h in c0.history] == ["segmented", "in review", "corrected"]


def test_a_verdict_needs_a_mask_and_a_hand_drawn_mask_counts_as_edited(worklist):
    c0, c1, _ = worklist.cases
    with pytest.raises(WorklistError, match="no mask yet"):
        worklist.set_status(c0, "accepted")
    # a mask drawn on a case no model has segmented is the reviewer's own: a later run
    # must not replace it
    assert worklist.save_mask(c1, _bars(1)[1]) is True
    assert c1.edited and c1.status == "in review" and not c1.untouched


def test_segmenting_skips_every_case_a_person_has_touched(worklist):
    _tiny_user_model()
    c0, c1, c2 = worklist.cases
    for case in (c0, c1):
        _store(worklist, case, _bars(0)[1])
    edit = _bars(0)[1]
    edit[0, 0] = 1
    assert worklist.save_mask(c0, edit)  # edited: in review
    worklist.set_status(c1, "needs correction", "the bar at the top")
    before = {case.id: _files(worklist.case_folder(case)) for case in (c0, c1)}
    done = _run(iter_segment(worklist, "base"))
    assert done == ["c2"] and c2.status == "segmented" and c2.model == "base"
    assert c2.uncertainty is not None and c2.dice is not None
    assert {case.id: _files(worklist.case_folder(case)) for case in (c0, c1)} == before
    assert (c0.status, c1.status) == ("in review", "needs correction")
    assert worklist.model == "base"  # named by the first run
    worklist.set_status(c2, "accepted")
    before = _files(worklist.case_folder(c2))
    assert _run(iter_segment(worklist, "base", [c2])) == []  # judged: never re-segmented
    assert _files(worklist.case_folder(c2)) == before


def test_the_model_of_the_latest_masks_is_the_one_learning_starts_from(worklist):
    _tiny_user_model("base")
    _tiny_user_model("other")
    c0, c1, c2 = worklist.cases
    assert _run(iter_segment(worklist, "base", [c0])) == ["c0"] and worklist.model == "base"
    assert _run(iter_segment(worklist, "other", [c1])) == ["c1"] and worklist.model == "other"
    assert _run(iter_segment(worklist, "base", [])) == [] and worklist.model == "other"  # nothing made
    assert Worklist.open(worklist.folder, read_only=True).model == "other"  # saved as it changed


def test_a_case_opened_while_it_is_being_segmented_keeps_the_reviewers_mask(worklist):
    _tiny_user_model()
    c0 = worklist.cases[0]
    generator = iter_segment(worklist, "base", [c0])
    event = next(generator)
    assert event.stage == "segment" and event.case == "c0"
    worklist.save_mask(c0, _bars(0)[1])  # the reviewer draws meanwhile
    mine = _files(worklist.case_folder(c0))
    assert run_events(generator) == []
    assert _files(worklist.case_folder(c0)) == mine  # neither the mask nor the maps replaced
    assert c0.status == "in review" and c0.model is None


def test_closing_the_segment_job_mid_case_writes_nothing_of_that_case(worklist):
    _tiny_user_model()
    c0, c1, c2 = worklist.cases
    generator = iter_segment(worklist, "base")
    for event in generator:
        if event.stage == "segment" and event.case == "c1":
            break
    generator.close()  # Cancel
    assert c0.status == "segmented" and worklist.mask_path(c0).is_file()
    for case in (c1, c2):
        assert case.status == "new" and case.model is None
        assert not worklist.case_folder(case).exists() or not any(worklist.case_folder(case).iterdir())
    with Worklist.open(worklist.folder, read_only=True) as reader:  # and so it is on disk
        assert [c.status for c in reader.cases] == ["segmented", "new", "new"]


def test_a_reopened_worklist_is_as_it_was_left(worklist):
    c0, c1, c2 = worklist.cases
    for case in worklist.cases:
        _store(worklist, case, _bars(int(case.id[1]))[1])
    edit = _bars(0)[1]
    edit[10:20, 40:50] = 1
    worklist.save_mask(c0, edit)
    worklist.set_status(c0, "accepted", "fixed the gap")
    worklist.set_status(c1, "rejected", "out of focus")
    worklist.add_time(c1, 12.34)
    worklist.model = "fake"
    worklist.save()
    state = worklist.to_dict()
    masks = {case.id: worklist.mask_path(case).read_bytes() for case in worklist.cases}
    worklist.close()
    with Worklist.open(worklist.folder) as again:
        assert again.to_dict() == state
        assert {case.id: again.mask_path(case).read_bytes() for case in again.cases} == masks
        r0, r1, r2 = again.cases
        assert (r0.status, r0.comment, r0.edited) == ("corrected", "fixed the gap", True)
        assert (r1.status, r1.comment, r1.seconds) == ("rejected", "out of focus", 12.3)
        assert (r2.status, r2.edited) == ("segmented", False)
        np.testing.assert_array_equal(again.read_mask(r0), edit)
        assert again.read_model_mask(r0).sum() == _bars(0)[1].sum()
        assert again.record(r0)["mask_sha256"] == checksums(_bars(0)[1])["mask_sha256"]
        assert again.save_mask(r0, edit) is True  # still told apart from the model's after a reload


def test_a_missing_reference_leaves_the_dice_unknown_and_the_case_usable(worklist, tmp_path):
    """Reviewed on a laptop the references were not copied to."""
    c0 = worklist.cases[0]
    (tmp_path / "data" / "masks" / "c0.png").unlink()
    assert _store(worklist, c0, _bars(0)[1])
    assert c0.dice is None and c0.status == "segmented"
    assert worklist.save_mask(c0, np.zeros((64, 64), np.uint8)) is True


# -- exporting -----------------------------------------------------------------------------


def test_export_writes_masks_records_and_a_summary_and_never_replaces_a_users_file(worklist, tmp_path):
    c0, c1, c2 = worklist.cases
    _store(worklist, c0, _bars(0)[1])
    _store(worklist, c1, _bars(0)[1])  # the wrong bar: Dice below 1
    worklist.set_status(c0, "accepted")
    out = tmp_path / "out"
    written = export_series(worklist, out)
    assert sorted(p.name for p in written) == [
        "c0_mask.json",
        "c0_mask.tif",
        "c1_mask.json",
        "c1_mask.tif",
        "summary.csv",
        "summary.json",
        "summary.png",
    ]  # c2 has no mask yet: a row in the summary, no file
    np.testing.assert_array_equal(tifffile.imread(out / "c0_mask.tif"), _bars(0)[1])
    sidecar = json.loads((out / "c0_mask.json").read_text())
    assert sidecar["mask_file"] == "c0_mask.tif" and sidecar["review"]["status"] == "accepted"
    assert sidecar["metrics"]["f1"] == pytest.approx(1.0)
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [(r["case"], r["status"], r["mask"]) for r in rows] == [
        ("c0", "accepted", "c0_mask.tif"),
        ("c1", "segmented", "c1_mask.tif"),
        ("c2", "new", ""),
    ]
    assert float(rows[0]["dice"]) == pytest.approx(1.0) and float(rows[1]["dice"]) < 0.9
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["accepted"] == 1 and summary["counts"]["new"] == 1
    assert (out / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    export_series(worklist, out)  # its own earlier export is replaced without asking
    (out / "c1_mask.tif").write_bytes(b"the user's own file")
    other = tmp_path / "other"
    other.mkdir()
    (other / "summary.csv").write_text("mine\n")
    for target in (out, other):
        before = _files(target)
        with pytest.raises(ValueError, match="not an earlier r2au output"):
            export_series(worklist, target)
        assert _files(target) == before  # nothing written at all
    export_series(worklist, other, overwrite=True)
    assert (other / "summary.csv").read_text().startswith("case,status")


def test_a_dicom_case_exports_a_seg_on_its_series(tmp_path):
    pytest.importorskip("highdicom")
    series = _ct_series(tmp_path / "study" / "ct1")
    with Worklist.create(tmp_path / "wl", [tmp_path / "study"]) as worklist:
        (case,) = worklist.cases
        assert case.kind == "dicom"
        image, *_ = worklist.read_image(case)
        mask = np.zeros(image.shape, np.uint8)
        mask[1, 20:40, 30:60] = 1
        _store(worklist, case, mask)
        written = export_series(worklist, tmp_path / "out")
    assert tmp_path / "out" / "ct1_seg.dcm" in written
    import highdicom as hd
    import pydicom

    seg = hd.seg.segread(tmp_path / "out" / "ct1_seg.dcm")
    referenced = seg.ReferencedSeriesSequence[0].SeriesInstanceUID
    assert referenced == pydicom.dcmread(next(series.iterdir())).SeriesInstanceUID
    assert tifffile.imread(tmp_path / "out" / "ct1_mask.tif").shape == mask.shape


# -- learning ------------------------------------------------------------------------------


def test_learning_makes_a_new_version_and_resegments_only_untouched_cases(tmp_path, held_out_dice):
    from napari_r2au.model_files import load_model
    from napari_r2au.training.finetune import FinetuneSettings

    _tiny_user_model()
    held_out_dice(fell=False)
    worklist = Worklist.create(tmp_path / "wl", [_study(tmp_path / "data", n=4)], model="base")
    try:
        c0, c1, c2, c3 = worklist.cases
        with pytest.raises(WorklistError, match="no accepted or corrected cases"):
            _run(iter_learn(worklist))
        assert _run(iter_segment(worklist, "base")) == ["c0", "c1", "c2", "c3"]
        for case in (c0, c1):  # the reviewer paints the true bars and accepts
            worklist.save_mask(case, _bars(int(case.id[1]))[1])
            worklist.set_status(case, "accepted")
        assert (c0.status, c1.status) == ("corrected", "corrected")
        worklist.set_status(c3, "in review")
        kept = {case.id: _files(worklist.case_folder(case)) for case in (c0, c1, c3)}
        settings = FinetuneSettings(steps=2, patch_size=32, batch_size=2)
        events = []
        result = run_events(iter_learn(worklist, settings=settings), events.append)
        assert result.model == "base-ft1" and result.parent == "base" and result.cases == ["c0", "c1"]
        assert [e.stage for e in events].count("learn") == 2
        assert result.resegmented == ["c2"]
        assert worklist.model == "base-ft1"
        (entry,) = worklist.models
        assert entry["name"] == "base-ft1" and entry["parent"] == "base" and entry["cases"] == ["c0", "c1"]
        assert c2.model == "base-ft1" and c2.status == "segmented"
        assert {case.id: _files(worklist.case_folder(case)) for case in (c0, c1, c3)} == kept
        assert load_model("base-ft1").metadata["provenance"]["parent"]["name"] == "base"
    finally:
        worklist.close()
    with Worklist.open(tmp_path / "wl", read_only=True) as again:  # and so it was saved
        assert again.model == "base-ft1" and [m["name"] for m in again.models] == ["base-ft1"]


def test_learning_records_the_new_model_even_when_cancelled_right_after_training(tmp_path, held_out_dice):
    from napari_r2au.training.finetune import FinetuneSettings

    held_out_dice(fell=False)
    _tiny_user_model()
    with Worklist.create(tmp_path / "wl", [_study(tmp_path / "data", n=3)], model="base") as worklist:
        _run(iter_segment(worklist, "base"))
        worklist.set_status(worklist.cases[0], "accepted")
        generator = iter_learn(worklist, settings=FinetuneSettings(steps=1, patch_size=32, batch_size=2))
        for event in generator:
            if event.stage == "learned":
                break
        generator.close()  # Cancel during the re-segmentation: the new model exists, so say so
        assert worklist.model == event.detail.model == "base-ft1"
        assert [m["name"] for m in worklist.models] == ["base-ft1"]


# -- the command line ----------------------------------------------------------------------


def _one_error_line(capsys, *fragments: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("r2au: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.mark.parametrize("action", ["create", "segment", "status", "set", "learn", "export"])
def test_worklist_help(action, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["worklist", action, "--help"])
    assert exit_info.value.code == 0


def test_the_command_line_runs_a_worklist_from_creation_to_export(tmp_path, capsys):
    _tiny_user_model()
    images = _study(tmp_path / "data")
    wl = str(tmp_path / "wl")
    assert main(["worklist", "create", wl, str(images), "-m", "base"]) == 0
    out = capsys.readouterr().out
    assert "3 cases, 3 with a reference" in out and "c0: " in out

    assert main(["worklist", "segment", wl, "--no-attention"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("model      base: 3 of 3 cases to segment")
    for i in range(3):
        assert any(line.startswith(f"c{i}: segmented  dice ") and "  uncertainty " in line for line in lines)
    assert lines[-1] == "3 cases: 3 segmented"
    assert not (tmp_path / "wl" / "cases" / "c0" / "attention.tif").exists()
    assert main(["worklist", "segment", wl]) == 0  # the finished cases are not done again
    assert "0 of 3 cases to segment; 3 done already" in capsys.readouterr().out

    assert main(["worklist", "set", wl, "c0", "accepted"]) == 0
    assert capsys.readouterr().out.strip() == "c0: accepted"
    assert main(["worklist", "set", wl, "c1", "needs-correction", "--comment", "gap at the top"]) == 0
    assert capsys.readouterr().out.strip() == "c1: needs correction  comment: gap at the top"
    assert main(["worklist", "set", wl, "c2", "rejected"]) == 2
    _one_error_line(capsys, "say why it is rejected")
    assert main(["worklist", "set", wl, "c9", "accepted"]) == 2
    _one_error_line(capsys, "no case 'c9'")

    assert main(["worklist", "status", wl, "--order", "uncertain"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == [
        "case",
        "status",
        "model",
        "dice",
        "uncertainty",
        "edited",
        "reviewer",
        "comment",
    ]
    assert len(out) == 6 and out[-2] == "3 cases: 1 segmented, 1 needs correction, 1 accepted"
    assert any(line.split()[0] == "c1" and line.endswith("gap at the top") for line in out)
    assert main(["worklist", "status", wl, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert [c["case"] for c in status["cases"]] == ["c0", "c1", "c2"]
    assert status["cases"][0]["status"] == "accepted" and status["counts"]["accepted"] == 1
    assert status["cases"][0]["reviewer"] and status["cases"][0]["dice"] is not None

    assert main(["worklist", "export", wl, str(tmp_path / "out")]) == 0
    assert "exported   the masks of 3 of 3 cases" in capsys.readouterr().out
    assert (tmp_path / "out" / "summary.csv").is_file()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "c0_mask.tif").write_bytes(b"mine")
    assert main(["worklist", "export", wl, str(tmp_path / "mine")]) == 2
    _one_error_line(capsys, "not an earlier r2au output", "--overwrite")
    assert (tmp_path / "mine" / "c0_mask.tif").read_bytes() == b"mine"
    assert main(["worklist", "export", wl, str(tmp_path / "mine"), "--overwrite"]) == 0


def test_the_command_line_learns_from_the_reviewed_cases(tmp_path, capsys, held_out_dice):
    _tiny_user_model()
    held_out_dice(fell=False)
    wl = str(tmp_path / "wl")
    assert main(["worklist", "create", wl, str(_study(tmp_path / "data")), "-m", "base"]) == 0
    assert main(["worklist", "segment", wl]) == 0
    assert main(["worklist", "learn", wl, "--steps", "1"]) == 2
    _one_error_line(capsys, "no accepted or corrected cases")
    with Worklist.open(wl) as worklist:
        worklist.save_mask(worklist.cases[0], _bars(0)[1])
    assert main(["worklist", "set", wl, "c0", "accepted"]) == 0
    assert main(["worklist", "set", wl, "c1", "accepted"]) == 0
    capsys.readouterr()
    assert main(["worklist", "learn", wl, "--steps", "2", "--name", "study-v2"]) == 0
    out = capsys.readouterr().out
    assert "new model  study-v2 (from base; the worklist's model now)" in out
    assert "learned    from 2 cases: c0, c1" in out and "dice       before " in out
    assert "re-segmented 1 case nobody had touched: c2" in out
    assert main(["worklist", "learn", wl, "--steps", "1", "--name", "study-v2"]) == 2  # never replaced
    _one_error_line(capsys, "study-v2")
    assert main(["worklist", "learn", wl, "--steps", "1", "--no-resegment"]) == 0
    out = capsys.readouterr().out
    assert "new model  study-v2-ft1 (from study-v2" in out and "re-segmented none" in out
    with Worklist.open(wl, read_only=True) as worklist:
        assert worklist.model == "study-v2-ft1"
        assert [m["name"] for m in worklist.models] == ["study-v2", "study-v2-ft1"]
        assert worklist.case("c2").model == "study-v2"


def test_a_version_that_scores_lower_is_kept_aside_unless_asked_to_use_it(tmp_path, capsys, held_out_dice):
    """The Fine-tune dock's rule: a new version whose held-out Dice fell below its parent's
    is registered but neither becomes the worklist's model nor re-segments a case; with
    ``adopt="always"`` (``--adopt always``) it does both."""
    from napari_r2au.model_files import list_models
    from napari_r2au.training.finetune import FinetuneSettings

    _tiny_user_model()
    held_out_dice(fell=True)
    settings = FinetuneSettings(steps=1, patch_size=32, batch_size=2)
    with Worklist.create(tmp_path / "wl", [_study(tmp_path / "data")], model="base") as worklist:
        _run(iter_segment(worklist, "base"))
        c0, _, c2 = worklist.cases
        worklist.save_mask(c0, _bars(0)[1])
        worklist.set_status(c0, "accepted")
        masks = {c.id: worklist.read_mask(c).copy() for c in worklist.cases}
        with pytest.raises(WorklistError, match="adopt must be one of"):
            _run(iter_learn(worklist, settings=settings, adopt="sometimes"))
        result = _run(iter_learn(worklist, settings=settings))
        assert result.model == "base-ft1" and not result.adopted and result.resegmented == []
        assert worklist.model == "base" and c2.model == "base"
        assert worklist.models[-1]["name"] == "base-ft1" and worklist.models[-1]["kept_aside"] is True
        assert all(np.array_equal(worklist.read_mask(c), masks[c.id]) for c in worklist.cases)
        assert "base-ft1" in {m["name"] for m in list_models()}  # registered: the user can still choose it
        result = _run(iter_learn(worklist, settings=settings, adopt="always"))
        assert result.adopted and result.resegmented == ["c1", "c2"] and worklist.model == "base-ft2"
    capsys.readouterr()
    wl = str(tmp_path / "wl")
    assert main(["worklist", "learn", wl, "-m", "base", "--steps", "1"]) == 0
    out = capsys.readouterr().out
    assert "new model  base-ft3 (from base), kept aside: it scores lower than base" in out
    assert "so the worklist keeps base-ft2" in out
    assert "re-segmented none (the new version was kept aside" in out
    with Worklist.open(wl, read_only=True) as again:
        assert again.model == "base-ft2" and again.models[-1]["kept_aside"] is True


def test_a_worklist_scale_is_kept_and_used_to_segment_and_to_learn(tmp_path, capsys):
    """A model with no rule for a camera's photographs (drive-vessels on HRF) needs a
    scale: the worklist keeps one, segments every case at it, re-segments the untouched
    cases when it changes, and learns at it; a bad one is one error line."""
    from napari_r2au.model_files import load_model

    _tiny_user_model()
    wl = str(tmp_path / "wl")
    data = _study(tmp_path / "data", size=64)
    assert main(["worklist", "create", wl, str(data), "-m", "base", "--scale", "0"]) == 0
    assert capsys.readouterr().out.splitlines()[0].endswith("3 with a reference")  # 0: the model's own rule
    assert main(["worklist", "create", str(tmp_path / "bad"), str(data), "--scale", "-1"]) == 2
    _one_error_line(capsys, "scale must be above 0")
    assert not (tmp_path / "bad" / "worklist.json").exists()

    assert main(["worklist", "segment", wl, "--scale", "0.5"]) == 0
    assert capsys.readouterr().out.startswith("model      base at scale 0.5: 3 of 3 cases to segment")
    with Worklist.open(wl, read_only=True) as worklist:
        assert worklist.scale == 0.5 and {c.scale for c in worklist.cases} == {0.5}
        assert worklist.read_mask(worklist.cases[0]).shape == (64, 64)  # back at full size
    assert main(["worklist", "segment", wl]) == 0  # kept: nothing to do again
    assert "base at scale 0.5: 0 of 3 cases to segment; 3 done already" in capsys.readouterr().out
    assert main(["worklist", "set", wl, "c0", "accepted"]) == 0
    assert main(["worklist", "segment", wl, "--scale", "0.25"]) == 0  # the untouched cases again
    out = capsys.readouterr().out
    assert "base at scale 0.25: 2 of 3 cases to segment; 1 opened or reviewed" in out
    assert main(["worklist", "segment", wl, "--scale", "0"]) == 0  # back to the model's own rule
    assert "model      base: 2 of 3 cases to segment" in capsys.readouterr().out
    with Worklist.open(wl, read_only=True) as worklist:
        assert worklist.scale is None and worklist.case("c1").scale == 1.0
    assert main(["worklist", "segment", wl, "--scale", "0.25"]) == 0
    assert main(["worklist", "learn", wl, "--steps", "1", "--no-resegment"]) == 0
    capsys.readouterr()
    with Worklist.open(wl, read_only=True) as worklist:
        assert [worklist.case(c).scale for c in ("c0", "c1", "c2")] == [0.5, 0.25, 0.25]
        assert load_model(worklist.model).input_scale == 0.25  # learned at the worklist's scale
    assert main(["worklist", "status", wl, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["scale"] == 0.25


def test_learning_from_cases_accepted_as_segmented_says_its_dice_tests_nothing(
    tmp_path, capsys, held_out_dice
):
    """Cases accepted without an edit hold the old model's own masks: the held-out Dice
    there is the parent's by definition, and the command line says so; a fall there keeps
    nothing aside (it tests nothing), once a case is corrected it does."""
    _tiny_user_model()
    held_out_dice(fell=True)
    wl = str(tmp_path / "wl")
    # wide enough for a held-out band beside the training part
    assert main(["worklist", "create", wl, str(_study(tmp_path / "data", size=160)), "-m", "base"]) == 0
    with Worklist.open(wl) as worklist:  # a model's masks with foreground, accepted as they are
        for index in (0, 1, 2):
            _store(worklist, worklist.case(f"c{index}"), _bars(index, 160)[1], model="base")
    assert main(["worklist", "set", wl, "c0", "accepted"]) == 0
    capsys.readouterr()
    assert main(["worklist", "learn", wl, "--steps", "1", "--no-resegment"]) == 0
    out = capsys.readouterr().out
    assert "note       not a test of the new version" in out
    assert "new model  base-ft1 (from base; the worklist's model now)" in out
    with Worklist.open(wl) as worklist:  # once a case is corrected, the held-out part is a test
        worklist.save_mask(worklist.case("c1"), 1 - _bars(1, 160)[1])
        worklist.set_status(worklist.case("c1"), "accepted")
    assert main(["worklist", "learn", wl, "--steps", "1", "--no-resegment"]) == 0
    out = capsys.readouterr().out
    assert "not a test" not in out
    assert "base-ft2 (from base-ft1), kept aside" in out and "the worklist keeps base-ft1" in out


def test_a_locked_worklist_is_one_error_line(tmp_path, capsys):
    _tiny_user_model()
    wl = tmp_path / "wl"
    with Worklist.create(wl, [_study(tmp_path / "data", n=1)]):
        for argv in (
            ["worklist", "segment", str(wl), "-m", "base"],
            ["worklist", "set", str(wl), "c0", "in review"],
            ["worklist", "learn", str(wl), "-m", "base", "--steps", "1"],
        ):
            assert main(argv) == 2
            _one_error_line(capsys, str(wl), "is open elsewhere", f"pid {os.getpid()}")
        assert main(["worklist", "status", str(wl)]) == 0  # read-only
        assert main(["worklist", "export", str(wl), str(tmp_path / "out")]) == 0
    assert main(["worklist", "create", str(tmp_path / "wl2"), str(tmp_path / "nowhere")]) == 2
    _one_error_line(capsys, "nowhere: no such file or folder")
    assert main(["worklist", "status", str(tmp_path / "data")]) == 2
    _one_error_line(capsys, "no worklist here")


def test_ctrl_c_keeps_the_finished_cases(tmp_path, capsys, monkeypatch):
    import napari_r2au.uncertainty as uncertainty

    _tiny_user_model()
    wl = str(tmp_path / "wl")
    assert main(["worklist", "create", wl, str(_study(tmp_path / "data")), "-m", "base"]) == 0
    real, calls = uncertainty.iter_predict_tta, []

    def interrupted_on_the_second_case(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return (yield from real(*args, **kwargs))

    monkeypatch.setattr(uncertainty, "iter_predict_tta", interrupted_on_the_second_case)
    assert main(["worklist", "segment", wl]) == 130
    assert "interrupted; 1 of 3 cases segmented and saved, the others as they were" in capsys.readouterr().err
    monkeypatch.setattr(uncertainty, "iter_predict_tta", real)
    with Worklist.open(wl) as worklist:  # the lock was released, c0 kept
        assert [c.status for c in worklist.cases] == ["segmented", "new", "new"]
    assert main(["worklist", "segment", wl]) == 0
    assert "2 of 3 cases to segment; 1 done already" in capsys.readouterr().out


def test_a_case_that_fails_is_said_and_the_others_are_segmented(tmp_path, capsys):
    _tiny_user_model()
    images = _study(tmp_path / "data")
    wl = str(tmp_path / "wl")
    assert main(["worklist", "create", wl, str(images), "-m", "base"]) == 0
    (images / "c1.png").write_bytes(b"")  # truncated since
    capsys.readouterr()
    assert main(["worklist", "segment", wl]) == 1
    captured = capsys.readouterr()
    assert "c0: segmented" in captured.out and "c2: segmented" in captured.out
    assert "r2au: error: case c1:" in captured.err and "empty" in captured.err
    assert "1 of 3 cases failed" in captured.err
