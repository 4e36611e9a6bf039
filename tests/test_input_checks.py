"""The engine's notices before a model runs on an image (shared by the CLI and the docks)."""

from __future__ import annotations

import numpy as np

from napari_r2au.engine import input_notices
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
