"""YAML experiment configs with ``--set key=value`` overrides (dotted keys for nesting)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .trainer import TrainConfig

CONFIG_DIR = Path(__file__).parent / "configs"


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ValueError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw)


def load_config(path_or_name: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a YAML config (a path, or the name of a bundled one) and apply overrides."""
    path = Path(path_or_name)
    if not path.is_file():
        bundled = CONFIG_DIR / f"{path_or_name}.yaml"
        if not bundled.is_file():
            names = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
            raise FileNotFoundError(f"no config {str(path_or_name)!r}; bundled: {names}")
        path = bundled
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: a config is a mapping of keys to values")
    for text in overrides:
        keys, value = parse_override(text)
        target = values
        for key in keys[:-1]:
            target = target.setdefault(key, {})
        target[keys[-1]] = value
    return TrainConfig.from_dict(values)
