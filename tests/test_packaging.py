"""The package installs cleanly: manifest and trainer inside it, light imports."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from .conftest import ROOT


def _python(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout


def test_import_and_cli_help_do_not_load_torch_or_qt():
    out = _python(
        "import sys, napari_r2au, napari_r2au.cli as c\n"
        "try:\n    c.main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('LOADED:' + ','.join(m for m in ('torch', 'PyQt5', 'napari') if m in sys.modules))"
    )
    assert out.strip().splitlines()[-1] == "LOADED:"


def test_console_script_answers():
    exe = Path(sys.executable).with_name("r2au")
    result = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True)
    assert "segment" in result.stdout and "demo" in result.stdout


def test_installed_package_ships_manifest_and_trainer():
    out = _python(
        "import importlib.resources as r, json, napari_r2au.training.trainer as t\n"
        "f = r.files('napari_r2au') / 'napari.yaml'\n"
        "print(json.dumps([f.is_file(), t.__name__]))"
    )
    assert json.loads(out) == [True, "napari_r2au.training.trainer"]


@pytest.mark.slow
def test_wheel_contains_manifest_trainer_and_model(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    (wheel,) = tmp_path.glob("napari_r2au-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "napari_r2au/napari.yaml" in names
    assert "napari_r2au/widgets/segment.py" in names and "napari_r2au/models/unet.py" in names
    assert (
        "napari_r2au/training/trainer.py" in names
        and "napari_r2au/training/configs/drive-vessels.yaml" in names
    )
    assert "napari_r2au/bundled_models/drive-vessels.json" in names
    assert "napari_r2au/bundled_models/drive-vessels.safetensors" in names
    assert not any(n.startswith("training/") for n in names), (
        "a bare top-level 'training' package would collide"
    )
    manifest = zipfile.ZipFile(wheel).read("napari_r2au/napari.yaml").decode()
    assert manifest == (ROOT / "napari.yaml").read_text()
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "napari_r2au:napari.yaml" in text and "r2au = napari_r2au.cli:main" in text
