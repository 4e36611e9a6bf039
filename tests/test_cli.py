from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

from napari_r2au.cli import main
from napari_r2au.io import read_image
from napari_r2au.model_files import DEFAULT_MODEL, load_model
from napari_r2au.outputs import read_record
from napari_r2au.training.metrics import segmentation_metrics

from .conftest import DATA as ROOT_DATA


def test_models_json(capsys):
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert any(r["name"] == "drive-vessels" and r["source"] == "bundled" for r in rows)


def test_segment_drive_image_gives_a_plausible_vessel_mask(tmp_path, drive_root, capsys):
    image = drive_root / "images" / "21_training.tif"
    assert main(["segment", str(image), "-o", str(tmp_path), "--attention"]) == 0
    mask = tifffile.imread(tmp_path / "21_training_mask.tif")
    prob = tifffile.imread(tmp_path / "21_training_prob.tif")
    attention = tifffile.imread(tmp_path / "21_training_attention.tif")
    assert mask.dtype == np.uint8 and mask.shape == (584, 565)
    assert prob.dtype == np.float32 and attention.shape == (4, 584, 565)
    truth = read_image(drive_root / "1st_manual" / "21_manual1.gif") > 0
    fov = read_image(drive_root / "mask" / "21_training_mask.gif") > 0
    metrics = segmentation_metrics(truth, prob, 0.5, fov)
    # image 21 may be in the bundled model's training split: this checks plausibility, not accuracy
    assert metrics["f1"] > 0.7 and metrics["auc_roc"] > 0.95, metrics
    # no -m: the default model, at the scale its field-of-view rule derives, and the record says so
    record = read_record(tmp_path)
    made = record["21_training_mask.tif"]["made_by"]
    default = load_model(DEFAULT_MODEL)
    assert made["model"] == DEFAULT_MODEL and made["model_sha256"] == default.sha256
    assert made["threshold"] == default.threshold and made["scale"] > 1.1
    assert made["mask_sha256"] and not made["flip_averaged"]
    assert record["21_training_prob.tif"]["made_by"]["model"] == DEFAULT_MODEL
    assert "threshold" not in record["21_training_prob.tif"]["made_by"]
    assert made["model_path"] == str(default.path)
    # a threshold given on the command line is the one recorded, and the mask is cut at it
    assert main(["segment", str(image), "-o", str(tmp_path / "at"), "--threshold", "0.6"]) == 0
    made = read_record(tmp_path / "at")["21_training_mask.tif"]["made_by"]
    assert made["threshold"] == 0.6
    assert (tifffile.imread(tmp_path / "at" / "21_training_mask.tif") > 0).sum() < (mask > 0).sum()


@pytest.mark.parametrize(
    "command",
    [
        ["segment", "photo.png"],
        ["evaluate", "--images", "imgs", "--masks", "masks"],
        ["finetune", "--images", "imgs", "--masks", "masks"],
        ["demo"],
    ],
)
def test_commands_without_a_model_use_the_default_one(command, monkeypatch, tmp_path):
    """Every command that runs a model takes the default (four-camera) model when none is given."""
    import napari_r2au.model_files as model_files
    import napari_r2au.training.evaluate
    import napari_r2au.training.finetune  # noqa: F401 (imported before the patch: they bind load_model)

    asked = []

    def load(name):
        asked.append(name)
        raise RuntimeError("stop here")

    monkeypatch.setattr(model_files, "load_model", load)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RuntimeError, match="stop here"):
        main(command)
    assert asked == [DEFAULT_MODEL]


@pytest.mark.parametrize("command", ["segment", "evaluate", "finetune", "demo"])
def test_the_help_names_the_default_model(command, capsys):
    """cli.py words the default without importing model_files (``r2au --help`` stays fast):
    the wording must still name the model that model_files makes the default."""
    from napari_r2au.cli import DEFAULT_MODEL_HELP

    assert DEFAULT_MODEL_HELP.split(",")[0] == DEFAULT_MODEL
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert f"(default:{DEFAULT_MODEL}," in "".join(capsys.readouterr().out.split())  # wrapped at any hyphen


def test_segment_reports_bad_files_and_writes_the_others(tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(0)
    tifffile.imwrite(folder / "good.tif", (rng.random((64, 64, 3)) * 255).astype(np.uint8))
    (folder / "broken.png").write_bytes(b"not a png at all")
    out = tmp_path / "out"
    assert main(["segment", str(folder), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "broken.png" in err and "1 of 2 files failed" in err
    assert (out / "good_mask.tif").is_file() and not (out / "broken_mask.tif").exists()


def test_segment_unknown_model_is_a_clear_error(tmp_path, capsys):
    assert main(["segment", str(tmp_path), "-m", "nope"]) == 2
    assert "no model called" in capsys.readouterr().err


def test_demo_writes_all_outputs(tmp_path, capsys):
    assert main(["demo", "-o", str(tmp_path)]) == 0
    for name in (
        "retina_mask.tif",
        "retina_prob.tif",
        "retina_attention.tif",
        "retina_overlay.png",
        "retina_attention_1.png",
    ):
        assert (tmp_path / name).is_file(), name
    mask = tifffile.imread(tmp_path / "retina_mask.tif")
    assert mask.shape == (1411, 1411)
    assert 0.03 < mask.mean() < 0.25  # vessels, not nothing and not everything


@pytest.mark.parametrize(
    "command",
    [
        ["--help"],
        ["segment", "--help"],
        ["demo", "--help"],
        ["add-model", "--help"],
        ["remove-model", "--help"],
    ],
)
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(command)
    assert exit_info.value.code == 0


def _tiny_user_model(name="base"):
    """A small untrained model, the same weights every time: an unseeded one thresholded the
    worklist tests' bright bars exactly about once in thirty draws, so that a mask painted as
    the bars counted as the model's own (accepted, not corrected)."""
    import torch

    from napari_r2au import create_model
    from napari_r2au.model_files import build_metadata, save_model, user_models_dir

    torch.manual_seed(0)
    net = create_model("r2au_net", base_width=4)
    meta = build_metadata(
        name=name,
        architecture="r2au_net",
        arch_args={"in_channels": 3, "out_channels": 1, "base_width": 4, "t": 2},
    )
    return save_model(net, user_models_dir(), meta)


def _write_folder(root, n=2, size=64):
    rng = np.random.default_rng(1)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        mask = np.zeros((size, size), np.uint8)
        mask[:, 20 + i : 28 + i] = 255
        image = (rng.random((size, size, 3)) * 60 + (mask[..., None] > 0) * 120).astype(np.uint8)
        tifffile.imwrite(root / "images" / f"img{i}.tif", image)
        tifffile.imwrite(root / "masks" / f"img{i}.tif", mask)


def test_finetune_then_evaluate_the_new_model(tmp_path, capsys):
    _tiny_user_model()
    _write_folder(tmp_path / "data")
    args = [
        "finetune",
        "-m",
        "base",
        "--images",
        str(tmp_path / "data/images"),
        "--masks",
        str(tmp_path / "data/masks"),
        "--steps",
        "3",
        "--patch",
        "32",
        "--batch",
        "2",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "new model  base-ft1" in out and "dice       before" in out
    report = tmp_path / "report.json"
    assert (
        main(
            [
                "evaluate",
                "-m",
                "base-ft1",
                "--images",
                str(tmp_path / "data/images"),
                "--masks",
                str(tmp_path / "data/masks"),
                "--json",
                str(report),
                "--plots",
                str(tmp_path / "plots"),
            ]
        )
        == 0
    )
    data = json.loads(report.read_text())
    assert data["n_images"] == 2 and set(data) >= {
        "accuracy",
        "sensitivity",
        "specificity",
        "precision",
        "f1",
        "iou",
        "auc_roc",
        "auc_pr",
        "per_image",
    }
    assert (tmp_path / "plots" / "roc.png").is_file() and (tmp_path / "plots" / "pr.png").is_file()
    assert main(args + ["--name", "base-ft1"]) == 2  # never overwrite an existing model
    assert load_model("base-ft1").metadata["provenance"]["weight_share"] == 0.5  # the default
    assert main(args + ["--weight-share", "1", "--name", "whole"]) == 0
    assert (
        "weight_share" not in load_model("whole").metadata["provenance"]
    )  # the fine-tuned weights as they are
    assert main(args + ["--weight-share", "0", "--name", "none"]) == 2
    assert "weight share" in capsys.readouterr().err


def test_segment_and_evaluate_with_flip_averaging(tmp_path, capsys):
    """--tta writes the mean of the flipped copies and their disagreement; evaluate scores the same."""
    from napari_r2au.engine import predict

    _tiny_user_model()
    _write_folder(tmp_path / "data", n=1)
    image_path = tmp_path / "data" / "images" / "img0.tif"
    assert main(["segment", str(image_path), "-m", "base", "-o", str(tmp_path / "out"), "--tta"]) == 0
    prob = tifffile.imread(tmp_path / "out" / "img0_prob.tif")
    uncertainty = tifffile.imread(tmp_path / "out" / "img0_uncertainty.tif")
    image = read_image(image_path)
    copies = [
        predict("base", image).probabilities,
        predict("base", image[:, ::-1].copy()).probabilities[:, ::-1],
        predict("base", image[::-1].copy()).probabilities[::-1],
    ]
    assert prob == pytest.approx(np.mean(copies, axis=0), abs=1e-5)
    assert uncertainty.shape == prob.shape and uncertainty.min() >= 0 and uncertainty.max() <= 1
    report = tmp_path / "report.json"
    assert (
        main(
            [
                "evaluate",
                "-m",
                "base",
                "--images",
                str(tmp_path / "data/images"),
                "--masks",
                str(tmp_path / "data/masks"),
                "--tta",
                "--json",
                str(report),
            ]
        )
        == 0
    )
    data = json.loads(report.read_text())
    truth = read_image(tmp_path / "data" / "masks" / "img0.tif") > 0
    assert data["tta"] is True
    assert data["auc_roc"] == pytest.approx(segmentation_metrics(truth, prob, 0.5)["auc_roc"], abs=1e-4)


def test_bundled_ph2_model_segments_a_lesion(tmp_path):
    from napari_r2au import load_model, predict

    image_path = ROOT_DATA / "PH2" / "images" / "IMD015.png"  # one of its validation images
    if not image_path.is_file():
        pytest.skip(f"PH2 data not found at {image_path.parent} (see ../shared/data/README.md)")
    model = load_model("ph2-lesions")
    assert model.input_scale == pytest.approx(1 / 3, abs=1e-3) and model.metadata["postprocess"]
    result = predict(model, read_image(image_path))
    truth = read_image(ROOT_DATA / "PH2" / "masks" / "IMD015.png") > 0
    mask = result.mask() > 0
    assert mask.shape == truth.shape
    dice = 2 * (mask & truth).sum() / (mask.sum() + truth.sum())
    assert dice > 0.85, dice


def test_add_model_installs_a_checked_copy(tmp_path, capsys):
    from napari_r2au import create_model
    from napari_r2au.model_files import build_metadata, save_model, user_models_dir

    source = save_model(
        create_model("unet", base_width=4),
        tmp_path / "run",
        build_metadata(name="best", architecture="unet", arch_args={"base_width": 4}),
    )
    assert main(["add-model", str(source), "--name", "my-unet"]) == 0
    assert main(["models"]) == 0
    assert "my-unet" in capsys.readouterr().out
    assert main(["add-model", str(source), "--name", "my-unet"]) == 2  # never replaced silently
    assert "exists" in capsys.readouterr().err
    assert main(["add-model", str(source), "--name", "hand", "--threshold", "0.3"]) == 0
    from napari_r2au.model_files import load_model

    assert load_model("hand").threshold == 0.3
    assert main(["add-model", str(source), "--name", "all-data", "--threshold-from", "my-unet"]) == 2
    assert "not chosen on a validation split" in capsys.readouterr().err
    weights = tmp_path / "run" / "best.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"x")
    assert main(["add-model", str(source), "--name", "tampered"]) == 2
    assert "sha256 mismatch" in capsys.readouterr().err
    assert not (user_models_dir() / "tampered.json").exists()

    assert main(["remove-model", "hand", "my-unet"]) == 0
    out = capsys.readouterr().out
    assert "removed hand" in out and "removed my-unet" in out and "move them back" in out
    assert not (user_models_dir() / "hand.json").exists() and (user_models_dir() / "removed").is_dir()
    assert main(["remove-model", "drive-vessels"]) == 2
    assert "cannot be removed" in capsys.readouterr().err


def test_bundled_em_model_finds_membranes_at_its_pixel_size(tmp_path, capsys):
    em = ROOT_DATA / "ISBI2012_EM"
    if not (em / "images" / "29.png").is_file():
        pytest.skip(f"ISBI 2012 EM data not found at {em} (see ../shared/data/README.md)")
    for folder, source in (("images", em / "images" / "29.png"), ("labels", em / "labels" / "29.png")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "29.png").symlink_to(source)  # a held-out (validation) section
    report = tmp_path / "report.json"
    assert (
        main(
            [
                "evaluate",
                "-m",
                "em-membranes",
                "--images",
                str(tmp_path / "images"),
                "--masks",
                str(tmp_path / "labels"),
                "--class-map",
                "0:1,255:0",
                "--json",
                str(report),
            ]
        )
        == 0
    )
    f1 = json.loads(report.read_text())["f1"]
    assert f1 > 0.75, f1
    # the same section given at 8 nm pixels (downsampled 2x) goes through at scale 2
    from skimage.transform import rescale

    from napari_r2au import load_model, predict

    model = load_model("em-membranes")
    assert (model.pixel_size, model.pixel_size_unit) == (4.0, "nm")
    half = rescale(read_image(em / "images" / "29.png").astype(np.float32), 0.5, anti_aliasing=True)
    result = predict(model, half, pixel_size=0.008, pixel_size_unit="um")
    truth = read_image(em / "labels" / "29.png")[::2, ::2] == 0
    assert result.probabilities.shape == half.shape
    assert segmentation_metrics(truth, result.probabilities, model.threshold)["f1"] > 0.6


def test_train_names_the_config_key_of_a_missing_data_folder(tmp_path, capsys):
    assert (
        main(
            [
                "train",
                "drive-vessels",
                "--set",
                f"data.root={tmp_path / 'nowhere'}",
                "--set",
                f"output_dir={tmp_path / 'run'}",
            ]
        )
        != 0
    )
    assert "data.root" in capsys.readouterr().err
    assert (
        main(
            [
                "train",
                "ph2-lesions",
                "--set",
                f"data.images={tmp_path}",
                "--set",
                f"data.masks={tmp_path / 'x'}",
                "--set",
                f"output_dir={tmp_path / 'run2'}",
            ]
        )
        != 0
    )
    assert "--set data.masks=PATH" in capsys.readouterr().err


def test_segment_reads_nifti_volumes_with_their_pixel_size(tmp_path, capsys):
    nibabel = pytest.importorskip("nibabel")
    import torch

    from napari_r2au import create_model
    from napari_r2au._reader import read_input
    from napari_r2au.model_files import build_metadata, save_model, user_models_dir

    torch.manual_seed(0)
    meta = build_metadata(
        name="grey",
        architecture="r2au_net",
        arch_args={"in_channels": 1, "out_channels": 1, "base_width": 4, "t": 2},
        pixel_size=1.0,
        pixel_size_unit="mm",
    )
    save_model(create_model("r2au_net", in_channels=1, base_width=4), user_models_dir(), meta)
    volume = np.random.default_rng(0).random((40, 36, 3)).astype(np.float32)  # NIfTI order: x, y, z
    image = nibabel.Nifti1Image(volume, np.diag([0.5, 0.5, 2.0, 1.0]))
    image.header.set_xyzt_units("mm")
    path = tmp_path / "scan.nii.gz"
    nibabel.save(image, str(path))

    data, size, unit, axes, _ = read_input(path)
    assert data.shape == (3, 36, 40) and size == pytest.approx(0.5) and unit == "mm" and axes == "ZYX"
    assert main(["segment", str(path), "-m", "grey", "-o", str(tmp_path / "out")]) == 0
    assert tifffile.imread(tmp_path / "out" / "scan_mask.tif").shape == (3, 36, 40)


def test_segment_takes_a_folder_of_dicom_slices_as_one_stack(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    source = get_testdata_file("CT_small.dcm")
    if source is None:
        pytest.skip("pydicom's test file is not installed")
    folder = tmp_path / "ct_series"
    folder.mkdir()
    for z in range(3):
        dataset = pydicom.dcmread(source)
        dataset.ImagePositionPatient = [0.0, 0.0, 5.0 * z]
        dataset.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        dataset.save_as(folder / f"{z}.dcm")
    assert main(["segment", str(folder), "-o", str(tmp_path / "out"), "--scale", "1"]) == 0
    rows, cols = int(dataset.Rows), int(dataset.Columns)
    assert tifffile.imread(tmp_path / "out" / "ct_series_mask.tif").shape == (3, rows, cols)


def test_resume_continues_the_run_it_finds_with_its_own_settings(tmp_path, capsys):
    """`r2au train CONFIG --resume` reads the run's config.json: settings given with --set
    at the start need not be repeated, and a changed one is said, not silently used."""
    import csv

    _write_folder(tmp_path / "data", n=3)
    config = tmp_path / "mine.yaml"
    config.write_text(
        f"name: mine\nbase_width: 4\npatch_size: 32\nbatch_size: 8\nsteps: 4\nval_every: 2\n"
        f"val_images: 1\nprecision: fp32\nthreads: 1\ndevice: cpu\noutput_dir: {tmp_path}/run\n"
        "data: {kind: drive, root: /nowhere}\n"
    )
    data = [f"data={{kind: folders, images: {tmp_path}/data/images, masks: {tmp_path}/data/masks}}"]
    assert main(["train", str(config), "--set", data[0], "--set", "batch_size=2"]) == 0
    saved = (tmp_path / "run" / "config.json").read_text()
    assert main(["train", str(config), "--set", "steps=6", "--resume"]) == 0  # data and batch from the run
    assert "done after 6 steps" in capsys.readouterr().out
    assert json.loads(saved)["batch_size"] == 2 and (tmp_path / "run" / "config.json").read_text() == saved
    with pytest.warns(UserWarning, match="batch_size 2 -> 4"):
        assert main(["train", str(config), "--set", "steps=8", "--set", "batch_size=4", "--resume"]) == 0

    # the best model's figures at 0.5 are measured, not the already calibrated ones moved over
    best = load_model(tmp_path / "run" / "best.json").metadata["provenance"]
    rows = {int(r["step"]): r for r in csv.DictReader((tmp_path / "run" / "log.csv").open()) if r["val_f1"]}
    assert best["validation_metrics_at_0.5"]["f1"] == pytest.approx(
        float(rows[best["steps"]]["val_f1"]), abs=1e-4
    )


def test_a_run_with_a_class_map_resumes_and_another_data_kind_starts_afresh(tmp_path):
    from napari_r2au.training.config import load_config, load_run_config

    config = load_config("em-membranes", [f"output_dir={tmp_path}"])
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))  # as a run writes it
    assert load_run_config(tmp_path).data["class_map"] == {0: 1, 255: 0}  # integers again, not "0", "255"
    dicom = load_config("em-membranes", ["data.kind=dicom", "data.root=/series"])
    assert dicom.data == {"kind": "dicom", "root": "/series"}  # the folders' keys and mask values dropped


@pytest.mark.parametrize(
    "setting, message",
    [
        ("steps=abc", "steps must be a whole number"),
        ("lr=fast", "lr must be a number"),
        ("val_every=0", "val_every must be at least 1"),
        ("batch_size=0", "batch_size must be at least 1"),
        ("patch_size=0", "patch_size must be at least 16"),
        ("steps=-5", "steps must be at least 1"),
        ("ema_decay=1", "ema_decay must be above 0 and below 1"),
        ("loss=focal", "loss must be one of"),
        ("data.image=x", "data.image is not a key of data.kind folders"),
        ("data.kind=zip", "data.kind must be one of"),
        ("augment.flip=false", "unknown augment keys: flip"),
        ("segment_property={type: liver}", "segment_property: expected"),
    ],
)
def test_bad_settings_are_named_before_anything_is_read_or_written(tmp_path, capsys, setting, message):
    config = tmp_path / "mine.yaml"
    config.write_text(f"output_dir: {tmp_path}/run\ndata: {{kind: folders, images: a, masks: b}}\n")
    assert main(["train", str(config), "--set", setting]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_segment_does_not_take_its_own_outputs_for_inputs(tmp_path, capsys, monkeypatch):
    _tiny_user_model()
    _write_folder(tmp_path / "data", n=1)
    folder = tmp_path / "data" / "images"
    monkeypatch.chdir(folder)
    assert main(["segment", ".", "-m", "base"]) == 0  # outputs land beside the input (-o defaults to .)
    assert main(["segment", ".", "-m", "base"]) == 0  # a second run: the same one input
    assert sorted(p.name for p in folder.iterdir()) == [
        ".r2au-outputs.json",
        "img0.tif",
        "img0_mask.tif",
        "img0_prob.tif",
    ]  # and the record of its outputs
    assert "skipped 2 file(s)" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["segment", str(tmp_path / "empty"), "-m", "base"]) == 2
    assert "empty: no images to segment (.tif" in capsys.readouterr().err
    assert main(["segment", "img0.tif", "-m", "base", "--threshold", "1.5"]) == 2
    assert "between 0 and 1" in capsys.readouterr().err


def test_evaluate_says_when_masks_seem_to_mark_the_other_class(tmp_path, capsys, monkeypatch):
    from napari_r2au import create_model
    from napari_r2au.model_files import build_metadata, save_model, user_models_dir
    from napari_r2au.training import evaluate

    meta = build_metadata(
        name="em",
        architecture="unet",
        arch_args={"in_channels": 1, "base_width": 4},
        provenance={"data": {"class_map": {"0": 1, "255": 0}}},
    )
    save_model(create_model("unet", in_channels=1, base_width=4), user_models_dir(), meta)
    scores = {
        "accuracy": 0.1,
        "sensitivity": 0.1,
        "specificity": 0.1,
        "precision": 0.1,
        "f1": 0.1,
        "iou": 0.05,
        "auc_pr": 0.2,
        "n_images": 1,
        "per_image": [],
    }
    for auc, warned in ((0.03, True), (0.9, False)):
        monkeypatch.setattr(evaluate, "evaluate_folders", lambda *a, auc=auc, **k: dict(scores, auc_roc=auc))
        assert main(["evaluate", "-m", "em", "--images", str(tmp_path), "--masks", str(tmp_path)]) == 0
        err = capsys.readouterr().err
        assert ("below chance" in err and "try --class-map 0:1,255:0" in err) == warned, err


def test_finetune_on_a_tiff_stack_keeps_it_one_stack(tmp_path, capsys, monkeypatch):
    """Its slices are normalized together, as Segment normalizes the stack, and all of them
    train (an empty one says "nothing here")."""
    from napari_r2au.training import finetune

    _tiny_user_model()
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    (tmp_path / "msk").mkdir()
    stack = (rng.random((3, 64, 64)) * 50).astype(np.float32) + np.array([0, 500, 1000], np.float32)[
        :, None, None
    ]
    masks = np.zeros((3, 64, 64), np.uint8)
    masks[:2, :, 20:28] = 255
    tifffile.imwrite(tmp_path / "img" / "ct.tif", stack)
    tifffile.imwrite(tmp_path / "msk" / "ct.tif", masks)
    seen = {}
    real = finetune.iter_finetune

    def spy(parent, pairs, *args, **kwargs):
        seen.update(pairs=pairs, slices=kwargs["slices"], names=kwargs["names"])
        return real(parent, pairs, *args, **kwargs)

    monkeypatch.setattr(finetune, "iter_finetune", spy)
    assert (
        main(
            [
                "finetune",
                "-m",
                "base",
                "--images",
                str(tmp_path / "img"),
                "--masks",
                str(tmp_path / "msk"),
                "--steps",
                "2",
                "--patch",
                "32",
                "--batch",
                "2",
            ]
        )
        == 0
    )
    ((image, labels),) = seen["pairs"]
    assert image.shape[:3] == labels.shape == (3, 64, 64) and seen["slices"] == [[0, 1, 2]]
    assert seen["names"] == ["ct.tif"]


def test_bundled_skin_lesion_model_segments_isic_and_ph2_with_no_setting_typed(tmp_path):
    """r2au segment with skin-lesions on 20 held-out ISIC 2017 validation photographs
    (256x192) and a held-out PH2 one (767x576): the model's width rule brings both to 128 px.
    On the ISIC ones it must beat ph2-lesions (about 0.38 mean Dice there) by far."""
    from napari_r2au import predict
    from napari_r2au.model_files import load_model

    isic = ROOT_DATA / "ISIC2017_256"
    cases = [isic / "images" / f"isic17_validation_{i:04d}.jpg" for i in range(1, 21)]
    cases.append(ROOT_DATA / "PH2" / "images" / "IMD015.png")
    missing = [p for p in cases if not p.is_file()]
    if missing:
        pytest.skip(f"{missing[0]} not found (see ../shared/data/README.md)")
    assert load_model("skin-lesions").metadata["image_width"] == 128
    assert main(["segment", *map(str, cases), "-m", "skin-lesions", "-o", str(tmp_path / "out")]) == 0

    def dice(mask, truth):
        return 2 * (mask & truth).sum() / max(1, mask.sum() + truth.sum())

    ours, theirs = [], []
    ph2_model = load_model("ph2-lesions")
    for path in cases:
        mask = read_image(tmp_path / "out" / f"{path.stem}_mask.tif") > 0
        truth = read_image(path.parent.parent / "masks" / f"{path.stem}.png") > 0
        assert mask.shape == truth.shape
        ours.append(dice(mask, truth))
        theirs.append(dice(predict(ph2_model, read_image(path)).mask() > 0, truth))
    assert ours[-1] > 0.85, ours  # PH2
    assert np.mean(ours[:-1]) > 0.65 and np.mean(ours[:-1]) > np.mean(theirs[:-1]) + 0.2, (ours, theirs)
