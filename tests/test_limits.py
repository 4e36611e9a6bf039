"""Resource limits: threads, pixels declared by a file's header, architecture arguments."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

from napari_r2au.cli import main
from napari_r2au.io import ImageReadError, read_image
from napari_r2au.model_files import ModelFileError, load_model

from .test_cli import _tiny_user_model


def test_threads_are_bounded(tmp_path, capsys):
    assert (
        main(["train", "drive-vessels", "--set", f"output_dir={tmp_path}/run", "--set", "threads=100000"])
        == 2
    )
    assert "threads must be" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_tiff_declaring_too_many_pixels_is_refused_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "big.tif"
    tifffile.imwrite(path, np.zeros((64, 64), np.uint8))
    assert read_image(path).shape == (64, 64)
    monkeypatch.setenv("R2AU_MAX_PIXELS", "1000")
    decoded = []
    monkeypatch.setattr(tifffile.TiffPageSeries, "asarray", lambda *a, **k: decoded.append(1))
    with pytest.raises(
        ImageReadError, match=r"declares 64 x 64 = 4,096 values, more than the limit of 1,000"
    ):
        read_image(path)
    assert not decoded


def test_a_nifti_header_declaring_billions_of_voxels_is_refused(tmp_path, capsys):
    nibabel = pytest.importorskip("nibabel")
    from napari_r2au._reader import read_file

    header = nibabel.Nifti1Header()
    header.set_data_shape((30000, 30000, 5))  # 4.5 GB of uint8 declared by a 352-byte file
    header.set_data_dtype(np.uint8)
    path = tmp_path / "big.nii"
    path.write_bytes(header.binaryblock + b"\0" * 4)
    with pytest.raises(ImageReadError, match="declares 30000 x 30000 x 5"):
        read_file(path)
    path.write_bytes(header.binaryblock[:200])  # a damaged header: still a message, not an empty one
    with pytest.raises(ImageReadError, match=r"big.nii: cannot be read as NIfTI \(\w+: .+\)"):
        read_file(path)


@pytest.mark.parametrize(
    "key, value",
    [("base_width", 100000), ("t", 1000), ("depth", 40), ("in_channels", 10**6), ("base_width", 256)],
)
def test_architecture_arguments_in_a_model_file_are_bounded(key, value):
    sidecar = _tiny_user_model()
    meta = json.loads(sidecar.read_text())
    meta["arch_args"][key] = value
    if key == "in_channels":
        meta["in_channels"] = value
    sidecar.write_text(json.dumps(meta))
    with pytest.raises(ModelFileError, match=f"arch_args.{key} must be|above the largest supported"):
        load_model("base")
