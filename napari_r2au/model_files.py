"""Model files: safetensors weights plus a JSON sidecar; loading never runs code.

Format (version 1), for a model called NAME::

    NAME.safetensors   tensors only (or NAME.pt, a state dict read with weights_only=True)
    NAME.json          {"format": "napari-r2au-model", "format_version": 1,
                        "name", "architecture", "arch_args", "in_channels",
                        "out_channels", "axes", "normalization", "class_names",
                        "threshold", "weights_file", "weights_sha256",
                        "provenance": {...}, "description"}

The sha256 of the weights file is checked before anything is read from it.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .io import atomic_path, write_bytes_atomic

if TYPE_CHECKING:
    from torch import nn

FORMAT = "napari-r2au-model"
FORMAT_VERSION = 1
DEFAULT_MODEL = "drive-vessels"
REQUIRED_KEYS = ("architecture", "arch_args", "in_channels", "out_channels", "weights_file", "weights_sha256")


class ModelFileError(ValueError):
    """A model file is missing, malformed, tampered with or unsafe."""


def user_models_dir() -> Path:
    """Where fine-tuned and user-added models live (``R2AU_HOME`` overrides)."""
    home = os.environ.get("R2AU_HOME")
    if home:
        return Path(home) / "models"
    import platformdirs

    return Path(platformdirs.user_data_dir("napari-r2au")) / "models"


def bundled_models_dir() -> Path:
    return Path(str(resources.files("napari_r2au") / "bundled_models"))


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class LoadedModel:
    """A network in eval mode with the metadata that says how to feed it."""

    network: nn.Module
    metadata: dict[str, Any]
    path: Path | None = None
    source: str = "memory"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.metadata.get("name", "unnamed"))

    @property
    def in_channels(self) -> int:
        return int(self.metadata["in_channels"])

    @property
    def out_channels(self) -> int:
        return int(self.metadata["out_channels"])

    @property
    def normalization(self) -> dict[str, Any]:
        return dict(self.metadata.get("normalization") or {"kind": "standardize"})

    @property
    def threshold(self) -> float:
        return float(self.metadata.get("threshold", 0.5))

    @property
    def input_scale(self) -> float:
        """Factor the engine resizes images by before the network (1.0: as is)."""
        return float(self.metadata.get("input_scale", 1.0))

    @property
    def sha256(self) -> str | None:
        return self.metadata.get("weights_sha256")


def build_metadata(*, name: str, architecture: str, arch_args: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """Metadata for a network of the family, with sensible defaults for the optional fields."""
    meta: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": name,
        "architecture": architecture,
        "arch_args": dict(arch_args),
        "in_channels": int(arch_args.get("in_channels", 3)),
        "out_channels": int(arch_args.get("out_channels", 1)),
        "axes": "YXC",
        "normalization": {"kind": "standardize"},
        "class_names": ["background", "foreground"],
        "threshold": 0.5,
        "input_scale": 1.0,
        "description": "",
        "provenance": {"created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")},
    }
    meta.update(fields)
    return meta


def save_model(network: nn.Module, directory: str | os.PathLike, metadata: dict[str, Any]) -> Path:
    """Write NAME.safetensors and NAME.json atomically; return the JSON path."""
    from safetensors.torch import save

    name = metadata["name"]
    directory = Path(directory)
    tensors = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    blob = save(tensors)
    weights = directory / f"{name}.safetensors"
    write_bytes_atomic(weights, blob)
    meta = dict(metadata, weights_file=weights.name, weights_sha256=hashlib.sha256(blob).hexdigest())
    meta.setdefault("format", FORMAT)
    meta.setdefault("format_version", FORMAT_VERSION)
    sidecar = directory / f"{name}.json"
    with atomic_path(sidecar) as tmp:
        tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return sidecar


def _read_metadata(sidecar: Path) -> dict[str, Any]:
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{sidecar}: not a readable model description ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ModelFileError(f"{sidecar}: not a {FORMAT} file")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise ModelFileError(
            f"{sidecar}: format version {meta['format_version']} is newer than this napari-r2au "
            f"understands ({FORMAT_VERSION}); upgrade napari-r2au"
        )
    missing = [key for key in REQUIRED_KEYS if key not in meta]
    if missing:
        raise ModelFileError(f"{sidecar}: missing keys {', '.join(missing)}")
    return meta


def _read_state_dict(weights: Path) -> dict[str, Any]:
    import torch

    if weights.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(weights))
    if weights.suffix in (".pt", ".pth"):
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as exc:  # UnpicklingError and friends: refuse, never execute
            raise ModelFileError(f"{weights}: refused to load (not a plain tensor file: {exc})") from exc
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ModelFileError(f"{weights}: expected a state dict of tensors")
        return state
    raise ModelFileError(f"{weights}: unsupported weights format (use .safetensors or .pt)")


def load_model_file(sidecar: str | os.PathLike, source: str = "path") -> LoadedModel:
    """Load a model from its JSON sidecar, checking the weights' hash first."""
    from .models import create_model

    sidecar = Path(sidecar)
    meta = _read_metadata(sidecar)
    weights = sidecar.parent / meta["weights_file"]
    if weights.parent != sidecar.parent or not weights.is_file():
        raise ModelFileError(f"{sidecar}: weights file {meta['weights_file']!r} not found beside it")
    actual = sha256_file(weights)
    if actual != meta["weights_sha256"]:
        raise ModelFileError(
            f"{weights}: sha256 mismatch (expected {meta['weights_sha256'][:12]}..., got {actual[:12]}...); "
            "the file was changed or corrupted"
        )
    network = create_model(meta["architecture"], **meta["arch_args"])
    try:
        network.load_state_dict(_read_state_dict(weights), strict=True)
    except RuntimeError as exc:
        raise ModelFileError(f"{weights}: weights do not fit {meta['architecture']}: {exc}") from exc
    network.eval()
    return LoadedModel(network=network, metadata=meta, path=sidecar, source=source)


def _sidecars(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.json")) if directory.is_dir() else []


def list_models() -> list[dict[str, Any]]:
    """Bundled and user models: name, source, path, architecture, description, metrics."""
    rows = []
    for source, directory in (("bundled", bundled_models_dir()), ("user", user_models_dir())):
        for sidecar in _sidecars(directory):
            try:
                meta = _read_metadata(sidecar)
            except ModelFileError:
                continue
            rows.append({
                "name": meta.get("name", sidecar.stem),
                "source": source,
                "path": str(sidecar),
                "architecture": meta["architecture"],
                "description": meta.get("description", ""),
                "validation": (meta.get("provenance") or {}).get("validation_metrics", {}),
            })
    return rows


def resolve_model_path(name_or_path: str | os.PathLike) -> tuple[Path, str]:
    """Find a model's sidecar from a bundled name, a user model name, or a path."""
    text = str(name_or_path)
    for source, directory in (("bundled", bundled_models_dir()), ("user", user_models_dir())):
        candidate = directory / f"{text}.json"
        if candidate.is_file():
            return candidate, source
    path = Path(text).expanduser()
    if path.is_dir():
        found = _sidecars(path)
        if len(found) != 1:
            raise ModelFileError(f"{path}: expected one model .json in the folder, found {len(found)}")
        return found[0], "path"
    if path.suffix in (".safetensors", ".pt", ".pth"):
        path = path.with_suffix(".json")
    if path.suffix == ".json" and path.is_file():
        return path, "path"
    names = ", ".join(row["name"] for row in list_models()) or "none"
    raise ModelFileError(f"no model called or at {text!r}; available: {names}")


def load_model(name_or_path: str | os.PathLike = DEFAULT_MODEL) -> LoadedModel:
    """Load a bundled model by name, a user model by name, or a model file by path."""
    sidecar, source = resolve_model_path(name_or_path)
    return load_model_file(sidecar, source=source)
