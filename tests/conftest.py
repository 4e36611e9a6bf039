from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("R2AU_DATA", ROOT.parent / "shared" / "data"))
DRIVE = DATA / "DRIVE" / "training"


@pytest.fixture(autouse=True)
def _user_home(tmp_path, monkeypatch):
    """Keep user models of every test in a temporary folder."""
    monkeypatch.setenv("R2AU_HOME", str(tmp_path / "r2au_home"))


@pytest.fixture
def drive_root() -> Path:
    if not (DRIVE / "images").is_dir():
        pytest.skip(f"DRIVE training data not found at {DRIVE} (see ../shared/data/README.md)")
    return DRIVE


@pytest.fixture
def tiny_net():
    import torch

    from napari_r2au import create_model

    torch.manual_seed(0)
    return create_model("r2au_net", base_width=4).eval()


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def notifications():
    """The napari notifications raised during the test."""
    from napari.utils.notifications import notification_manager

    notification_manager.records.clear()
    yield notification_manager.records
    notification_manager.records.clear()


@pytest.fixture
def held_out_dice(monkeypatch):
    """``held_out_dice(fell=True)``: every fine-tune from here on reports its held-out Dice as
    fallen (or risen) against its parent's, so that what the worklist does with such a version
    is tested without depending on what a few steps of training happen to do."""
    from napari_r2au.training import finetune

    real = finetune.iter_finetune

    def choose(fell: bool) -> None:
        def scored(*args, **kwargs):
            result = yield from real(*args, **kwargs)
            result.dice_before, result.dice_after = (0.8, 0.7) if fell else (0.7, 0.8)
            return result

        monkeypatch.setattr(finetune, "iter_finetune", scored)

    return choose
