"""YAML experiment configs with ``--set key=value`` overrides (dotted keys for nesting)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from .trainer import ConfigError, TrainConfig

__all__ = ["ConfigError", "load_config", "load_run_config", "parse_override"]

CONFIG_DIR = Path(__file__).parent / "configs"


def _yaml(text: str, where: str) -> Any:
    """YAML values, or ConfigError with the parser's one-line reason (not its traceback)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        reason = " ".join(str(getattr(exc, "problem", None) or exc).split())
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ConfigError(f"{where}: not valid YAML: {reason}{at}") from exc


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    keys = key.strip().split(".")
    if not all(keys):
        raise ConfigError(f"--set {text}: {key.strip()!r} is not a config key")
    return keys, _yaml(raw, f"--set {text}")


def load_config(path_or_name: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a YAML config (a path, or the name of a bundled one) and apply overrides."""
    path = Path(path_or_name)
    if not path.is_file():
        bundled = CONFIG_DIR / f"{path_or_name}.yaml"
        if not bundled.is_file():
            names = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
            raise FileNotFoundError(f"no config {str(path_or_name)!r}; bundled: {names}")
        path = bundled
    values = _yaml(path.read_text(), str(path)) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: a config is a mapping of keys to values")
    return TrainConfig.from_dict(_overridden(values, overrides))


def load_run_config(output_dir: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """The settings a run was started with (its saved config.json), with ``overrides`` on
    top: what ``--resume`` continues, whatever the bundled config says today."""
    saved = Path(output_dir) / "config.json"
    if not saved.is_file():
        raise FileNotFoundError(f"{output_dir}: no config.json, so no run to resume there (check output_dir)")
    try:
        values = json.loads(saved.read_text())
    except (ValueError, RecursionError) as exc:
        raise ConfigError(f"{saved}: not a readable run config ({type(exc).__name__}: {exc})") from exc
    if not isinstance(values, dict):
        raise ConfigError(f"{saved}: not a run config (expected an object)")
    for key in RUN_RECORD_KEYS:
        values.pop(key, None)
    values["output_dir"] = str(output_dir)  # where it was found, even if it was given relative to elsewhere
    return TrainConfig.from_dict(_overridden(values, overrides))


#: what config.json records beside the settings
RUN_RECORD_KEYS = ("package_version", "world_size")


def _overridden(values: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    for text in overrides:
        keys, value = parse_override(text)
        if (
            keys == ["data", "kind"]
            and isinstance(values.get("data"), dict)
            and values["data"].get("kind") != value
        ):
            # another kind of data: the old kind's folders and mask values mean nothing to it
            values["data"] = {}
        target = values
        for key in keys[:-1]:
            target = target.setdefault(key, {})
            if not isinstance(target, dict):
                raise ConfigError(f"--set {text}: {'.'.join(keys[:-1])} is not a mapping")
        target[keys[-1]] = value
    return values
