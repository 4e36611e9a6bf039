"""The command line's error boundary: bad input is one ``r2au: error:`` line and exit 2,
Ctrl-C one line and exit 130; never a traceback."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import tifffile

from napari_r2au.cli import main
from napari_r2au.model_files import ModelFileError, load_model, user_models_dir

from .test_cli import _tiny_user_model


def _one_error_line(capsys, *fragments: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("r2au: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.mark.parametrize(
    "blob", [b"", b'\x10\x00\x00\x00\x00\x00\x00\x00{"a": 1'], ids=["empty", "truncated"]
)
def test_an_empty_or_truncated_safetensors_file_is_a_model_file_error(tmp_path, capsys, blob):
    sidecar = _tiny_user_model()
    meta = json.loads(sidecar.read_text())
    weights = sidecar.parent / meta["weights_file"]
    weights.write_bytes(blob)
    meta["weights_sha256"] = hashlib.sha256(blob).hexdigest()  # the hash fits: the file itself is broken
    sidecar.write_text(json.dumps(meta))
    with pytest.raises(ModelFileError, match="empty or truncated"):
        load_model("base")
    assert main(["segment", str(tmp_path), "-m", "base"]) == 2
    _one_error_line(capsys, "safetensors")


def test_a_deeply_nested_json_in_the_models_folder_is_skipped(capsys):
    _tiny_user_model()
    (user_models_dir() / "deep.json").write_text("[" * 200_000 + "]" * 200_000)
    assert main(["models"]) == 0
    captured = capsys.readouterr()
    assert "base" in captured.out and "Traceback" not in captured.err
    with pytest.raises(ModelFileError, match="nested too deeply"):
        load_model(user_models_dir() / "deep.json")


@pytest.mark.parametrize(
    "setting, message",
    [
        ("steps=[1", "not valid YAML"),
        ("data.root=5", "data.root must be a folder path"),
        ("device=bogus", "unknown device 'bogus'"),
    ],
)
def test_train_settings_are_one_line(tmp_path, capsys, setting, message):
    args = ["train", "drive-vessels", "--set", f"output_dir={tmp_path}/run", "--set", setting]
    assert main(args) == 2
    _one_error_line(capsys, message)
    assert not (tmp_path / "run").exists()


def test_a_malformed_yaml_config_is_one_line(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("steps: [1, 2\nname: x\n")
    assert main(["train", str(config)]) == 2
    _one_error_line(capsys, "bad.yaml: not valid YAML")


def test_cuda_without_cuda_is_one_line(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    _tiny_user_model()
    assert (
        main(["train", "drive-vessels", "--set", f"output_dir={tmp_path}/run", "--set", "device=cuda"]) == 2
    )
    _one_error_line(capsys, "CUDA is not available")
    assert (
        main(
            [
                "finetune",
                "-m",
                "base",
                "--images",
                str(tmp_path),
                "--masks",
                str(tmp_path),
                "--device",
                "cuda",
            ]
        )
        == 2
    )
    _one_error_line(capsys, "CUDA is not available")


def test_ctrl_c_in_segment_is_one_line_and_130(tmp_path, capsys, monkeypatch):
    import napari_r2au.cli as cli

    _tiny_user_model()
    tifffile.imwrite(tmp_path / "a.tif", np.zeros((32, 32, 3), np.uint8))  # colour: no notice before the run

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_predict_with_bar", interrupted)
    assert main(["segment", str(tmp_path / "a.tif"), "-m", "base", "-o", str(tmp_path / "out")]) == 130
    err = [line for line in capsys.readouterr().err.splitlines() if line]
    assert err == ["base (threshold 0.5): 1 input(s)", "r2au: interrupted"]  # the model, then one line
    assert not (tmp_path / "out").exists()


def test_a_tiff_with_a_broken_first_page_pointer_is_named_once(tmp_path, capsys):
    """A TIFF whose first-page offset points past its end: one error line that names the file
    (once, not "path: path: ..."), the count line, exit 1, nothing written for it."""
    import struct

    _tiny_user_model()
    good = tmp_path / "good.tif"
    tifffile.imwrite(good, np.zeros((32, 32), np.uint8))
    data = bytearray(good.read_bytes())
    data[4:8] = struct.pack("<I", 10**8)
    broken = tmp_path / "broken.tif"
    broken.write_bytes(bytes(data))
    assert main(["segment", str(broken), "-m", "base", "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("r2au: error: ")]
    assert len(errors) == 1 and errors[0].count("broken.tif") == 1, err
    assert "cannot read as an image" in errors[0] and err[-1] == "1 of 1 files failed"
    assert not list((tmp_path / "out").glob("broken*"))
