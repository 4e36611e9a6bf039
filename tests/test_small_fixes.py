"""The smaller reliability defects: valid JSON, one log row per step, multispectral images,
FIFOs in the models folder, messages that say something, broken links, empty files."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
import tifffile

from napari_r2au.cli import main
from napari_r2au.engine import convert_length, resolve_axes
from napari_r2au.io import ImageReadError, read_image
from napari_r2au.model_files import user_models_dir

from .test_cli import _tiny_user_model, _write_folder


def test_json_output_writes_null_for_nan():
    from napari_r2au.cli import _json_text

    text = _json_text({"auc_roc": float("nan"), "per_image": [{"f1": np.float64("nan"), "n": np.int64(3)}]})
    assert json.loads(text) == {"auc_roc": None, "per_image": [{"f1": None, "n": 3}]}


def test_a_resumed_run_logs_each_step_once(tmp_path):
    _write_folder(tmp_path / "data", n=3)
    sets = [
        "name=mine",
        "base_width=4",
        "patch_size=32",
        "batch_size=2",
        "steps=4",
        "val_every=2",
        "val_images=1",
        "precision=fp32",
        "threads=1",
        "device=cpu",
        f"output_dir={tmp_path}/run",
        f"data={{kind: folders, images: {tmp_path}/data/images, masks: {tmp_path}/data/masks}}",
    ]
    args = ["train", "drive-vessels"] + [a for s in sets for a in ("--set", s)]
    assert main(args) == 0
    log = tmp_path / "run" / "log.csv"
    with log.open("a") as handle:  # killed after logging steps 5 and 6, before their checkpoint
        handle.write("5,0.5,0.001,1.0\n6,0.5,0.001,1.0\n")
    assert main(args + ["--set", "steps=6", "--resume"]) == 0
    steps = [int(row["step"]) for row in csv.DictReader(log.open())]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_five_channels_are_channels_not_a_stack(tiny_net):
    from napari_r2au import predict

    assert resolve_axes((64, 48, 5), 3) == "YXC"
    assert resolve_axes((64, 48, 8), 8) == "YXC"
    assert resolve_axes((5, 64, 48), 3) == "ZYX"
    with pytest.raises(ValueError, match="5 channels but the model expects 3"):
        predict(tiny_net, np.zeros((64, 48, 5), np.float32), precision="fp32")


def test_a_fifo_named_json_in_the_models_folder_is_not_opened(capsys):
    _tiny_user_model()
    os.mkfifo(user_models_dir() / "pipe.json")
    assert main(["models"]) == 0  # would block forever reading the FIFO
    assert "base" in capsys.readouterr().out


@pytest.mark.parametrize("unit", ["1/", "mm**"])
def test_an_odd_pixel_unit_gets_a_message(unit):
    with pytest.raises(ValueError, match="is not a unit of length"):
        convert_length(1.0, unit, "mm")


def test_broken_links_in_an_input_folder_are_reported(tmp_path, capsys):
    _tiny_user_model()
    folder = tmp_path / "in"
    folder.mkdir()
    tifffile.imwrite(folder / "a.tif", np.zeros((32, 32), np.uint8))
    (folder / "b.tif").symlink_to(tmp_path / "gone.tif")
    assert main(["segment", str(folder), "-m", "base", "-o", str(tmp_path / "out")]) == 0
    assert "skipped 1 broken link(s) whose target is gone: b.tif" in capsys.readouterr().err


def test_an_empty_or_corrupt_png_says_so(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageReadError, match="the file is empty") as info:
        read_image(tmp_path / "empty.png")
    assert "pip install" not in str(info.value)
    (tmp_path / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ImageReadError) as info:
        read_image(tmp_path / "junk.png")
    assert "pip install" not in str(info.value)
