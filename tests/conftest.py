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
