"""``r2au segment`` never replaces a user's file and never lets two inputs share an output."""

from __future__ import annotations

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile

from napari_r2au.cli import main
from napari_r2au.outputs import RECORD

from .test_cli import _tiny_user_model

RNG = np.random.default_rng(0)


def _image(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(path, RNG.integers(0, 255, (32, 32, 3), dtype=np.uint8))


def _files(folder):
    return sorted(p.name for p in folder.iterdir())


def test_a_manual_mask_beside_the_image_is_not_replaced(tmp_path, capsys, monkeypatch):
    _tiny_user_model()
    folder = tmp_path / "work"
    _image(folder / "case1.png")
    (folder / "case1_mask.tif").write_bytes(b"my manual mask")
    monkeypatch.chdir(folder)
    assert main(["segment", "case1.png", "-m", "base"]) == 2
    err = capsys.readouterr().err
    assert "case1_mask.tif exists and is not an earlier r2au output" in err and "--overwrite" in err
    assert (folder / "case1_mask.tif").read_bytes() == b"my manual mask"
    assert _files(folder) == ["case1.png", "case1_mask.tif"]  # nothing half-written
    assert main(["segment", "case1.png", "-m", "base", "--overwrite"]) == 0
    assert tifffile.imread(folder / "case1_mask.tif").shape == (32, 32)


def test_a_second_run_replaces_its_own_outputs_but_not_an_edited_one(tmp_path, capsys):
    _tiny_user_model()
    _image(tmp_path / "in" / "a.png")
    out = tmp_path / "out"
    assert main(["segment", str(tmp_path / "in"), "-m", "base", "-o", str(out)]) == 0
    assert _files(out) == [RECORD, "a_mask.tif", "a_prob.tif"]
    assert main(["segment", str(tmp_path / "in"), "-m", "base", "-o", str(out)]) == 0  # its own: replaced
    tifffile.imwrite(out / "a_mask.tif", np.ones((32, 32), np.uint8))  # corrected by hand since
    assert main(["segment", str(tmp_path / "in"), "-m", "base", "-o", str(out)]) == 2
    assert "a_mask.tif exists and is not an earlier r2au output" in capsys.readouterr().err
    assert tifffile.imread(out / "a_mask.tif").sum() == 32 * 32


@pytest.mark.parametrize("layout", ["one folder, two formats", "two folders, one name"])
def test_inputs_that_would_share_an_output_are_refused_before_anything_is_written(tmp_path, capsys, layout):
    _tiny_user_model()
    if layout == "one folder, two formats":
        first, second = tmp_path / "in" / "a.png", tmp_path / "in" / "a.jpg"
        inputs = [str(tmp_path / "in")]
    else:
        first, second = tmp_path / "d1" / "x.png", tmp_path / "d2" / "x.png"
        inputs = [str(first), str(second)]
    _image(first)
    _image(second)
    out = tmp_path / "out"
    assert main(["segment", *inputs, "-m", "base", "-o", str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(first) in err[0] and str(second) in err[0] and "-o" in err[0], err
    assert not out.exists()


def test_the_same_file_given_twice_is_segmented_once(tmp_path, capsys):
    _tiny_user_model()
    _image(tmp_path / "a.png")
    out = tmp_path / "out"
    assert (
        main(["segment", str(tmp_path / "a.png"), str(tmp_path / "a.png"), "-m", "base", "-o", str(out)]) == 0
    )
    assert capsys.readouterr().out.count("a.png:") == 1
