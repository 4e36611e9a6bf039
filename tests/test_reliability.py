"""Failures lose nothing: killed training resumes, batch runs report and go on, writes are atomic."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_r2au import load_model
from napari_r2au.cli import main
from napari_r2au.io import atomic_path, write_tiff

from .test_cli import _tiny_user_model, _write_folder


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "mask.tif"
    write_tiff(target, np.ones((4, 4), np.uint8))
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("disk full")
    assert tifffile.imread(target).sum() == 16
    assert [p.name for p in tmp_path.iterdir()] == ["mask.tif"]  # no temporary left behind


def test_full_disk_is_reported_and_loses_nothing(tmp_path, monkeypatch, capsys):
    _tiny_user_model()
    image = tmp_path / "a.tif"
    tifffile.imwrite(image, np.zeros((32, 32), np.uint8))
    out = tmp_path / "out"
    out.mkdir()
    (out / "a_mask.tif").write_bytes(b"previous result")

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tifffile, "imwrite", no_space)
    # (--overwrite: the previous file is not one r2au wrote, so it is refused without it)
    assert main(["segment", str(image), "-m", "base", "-o", str(out), "--overwrite"]) == 1
    assert "No space left" in capsys.readouterr().err
    assert (out / "a_mask.tif").read_bytes() == b"previous result"
    assert sorted(p.name for p in out.iterdir()) == ["a_mask.tif"]


def test_read_only_output_folder_is_a_clear_error(tmp_path, monkeypatch, capsys):
    _tiny_user_model()
    image = tmp_path / "a.tif"
    tifffile.imwrite(image, np.zeros((32, 32), np.uint8))
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    if os.geteuid() == 0:  # root ignores permissions: refuse file creation the way the kernel would
        import tempfile

        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied", str(out))

        monkeypatch.setattr(tempfile, "mkstemp", refuse)
    assert main(["segment", str(image), "-m", "base", "-o", str(out)]) == 1
    assert "Permission denied" in capsys.readouterr().err
    assert list(out.iterdir()) == []


@pytest.mark.slow
def test_thousand_small_images_with_failures(tmp_path, capsys):
    _tiny_user_model()
    folder = tmp_path / "many"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(1000):
        if i % 250 == 7:
            (folder / f"img{i:04d}.png").write_bytes(b"\x89PNG truncated")
        else:
            tifffile.imwrite(folder / f"img{i:04d}.tif", (rng.random((8, 8)) * 255).astype(np.uint8))
    out = tmp_path / "out"
    assert main(["segment", str(folder), "-m", "base", "-o", str(out)]) == 1
    assert "4 of 1000 files failed" in capsys.readouterr().err
    assert len(list(out.glob("*_mask.tif"))) == 996


@pytest.mark.slow
def test_training_killed_with_sigkill_resumes(tmp_path):
    _write_folder(tmp_path / "data", n=3)
    config = Path(__file__).resolve().parents[1] / "training" / "configs" / "drive-r2au_net.yaml"
    sets = [
        "base_width=4",
        "patch_size=32",
        "batch_size=2",
        "steps=400",
        "val_every=5",
        "val_images=1",
        "precision=fp32",
        "threads=1",
        "device=cpu",
        "max_minutes=null",
        f"output_dir={tmp_path}/run",
        f"data={{kind: folders, images: {tmp_path}/data/images, masks: {tmp_path}/data/masks}}",
    ]
    args = [sys.executable, "-m", "napari_r2au.cli", "train", str(config)] + [
        a for s in sets for a in ("--set", s)
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / "run" / "last_state.pt"
    deadline = time.time() + 120
    while time.time() < deadline and not (state.exists() and load_step(tmp_path) >= 10):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = load_step(tmp_path)
    assert 10 <= killed_at < 400
    resume = subprocess.run(
        args + ["--set", "steps=" + str(killed_at + 10), "--resume"], env=env, capture_output=True, text=True
    )
    assert resume.returncode == 0, resume.stderr
    assert load_model(tmp_path / "run" / "last.json").metadata["provenance"]["steps"] == killed_at + 10


def load_step(tmp_path) -> int:
    try:
        return int(load_model(tmp_path / "run" / "last.json").metadata["provenance"]["steps"])
    except Exception:  # mid-write or not there yet: atomic writes mean it is the old one or none
        return 0
