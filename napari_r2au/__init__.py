"""napari-r2au: R2AU-Net segmentation for napari, the CLI and Python.

The public names are imported lazily, so that ``import napari_r2au`` (and napari's
plugin discovery, and ``r2au --help``) does not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "create_model": "napari_r2au.models",
    "available_architectures": "napari_r2au.models",
    "predict": "napari_r2au.engine",
    "iter_predict": "napari_r2au.engine",
    "Prediction": "napari_r2au.engine",
    "load_model": "napari_r2au.model_files",
    "list_models": "napari_r2au.model_files",
    "save_model": "napari_r2au.model_files",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'napari_r2au' has no attribute {name!r}")
