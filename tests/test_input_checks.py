"""The engine's notices before a model runs on an image (shared by the CLI and the docks)."""

from __future__ import annotations

import numpy as np

from napari_r2au.checks import input_notices
from napari_r2au.io import write_tiff

CT = {
    "name": "ct-test",
    "in_channels": 1,
    "normalization": {"kind": "scale", "min": -1000, "max": 400, "clip": True},
}


def test_channel_conversions_are_said():
    from napari_r2au import load_model

    grey = np.zeros((64, 64), np.uint8)
    colour = np.zeros((64, 64, 3), np.uint8)
    assert "grey image is given to it as RGB" in " ".join(input_notices(load_model("drive-vessels"), grey))
    assert input_notices(load_model("drive-vessels"), colour) == []
    assert "averaged to grey" in " ".join(input_notices(load_model("em-membranes"), colour))
    assert input_notices(load_model("em-membranes"), grey) == []


def test_a_ct_model_on_a_screenshot_is_told_apart_from_hounsfield_units():
    hounsfield = np.full((64, 64), -1000, np.int16)
    hounsfield[16:48, 16:48] = 40
    assert input_notices(CT, hounsfield) == []
    screenshot = np.clip(hounsfield + 1000, 0, 255).astype(np.uint8)
    assert any("Hounsfield" in notice for notice in input_notices(CT, screenshot))
    assert any("Hounsfield" in notice for notice in input_notices(CT, screenshot.astype(np.float32)))
    # a window that is not in HU (0-255 scaled images) expects no negative values
    assert input_notices(dict(CT, normalization={"kind": "scale", "min": 0, "max": 255}), screenshot) == []


def test_segment_cli_warns_before_running(tmp_path, capsys):
    from napari_r2au.cli import main

    write_tiff(tmp_path / "grey.tif", (np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8))
    assert (
        main(["segment", str(tmp_path / "grey.tif"), "-m", "drive-vessels", "-o", str(tmp_path / "out")]) == 0
    )
    assert "warning:" in capsys.readouterr().err


def test_a_mask_that_looks_inverted_or_is_no_mask_is_said():
    from napari_r2au.checks import mask_notices

    vessels = np.zeros((64, 64), np.uint8)
    vessels[:, 30:34] = 1
    assert mask_notices(vessels) == []
    interior = 1 - vessels  # ISBI 2012's labels mark the cell interior: mostly foreground
    assert "inverted" in " ".join(mask_notices(interior))
    picture = np.random.default_rng(0).integers(0, 255, (64, 64)).astype(np.uint8)
    assert "picture" in " ".join(mask_notices(picture))
    assert "fractional" in " ".join(mask_notices(np.random.default_rng(0).random((64, 64))))


def test_finetune_cli_warns_about_an_inverted_mask_and_a_grey_image(tmp_path, capsys):
    from napari_r2au.cli import main

    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    image = (np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8)
    inverted = np.full((64, 64), 255, np.uint8)
    inverted[:, 30:34] = 0
    write_tiff(tmp_path / "images" / "a.tif", image)
    write_tiff(tmp_path / "masks" / "a.tif", inverted)
    args = [
        "finetune",
        "-m",
        "drive-vessels",
        "--images",
        str(tmp_path / "images"),
        "--masks",
        str(tmp_path / "masks"),
        "--steps",
        "1",
        "--patch",
        "32",
        "--batch",
        "2",
    ]
    main(args)
    err = capsys.readouterr().err
    assert "inverted" in err and "grey image" in err
