"""Model files: safetensors weights plus a JSON sidecar; loading never runs code.

Format (version 1), for a model called NAME::

    NAME.safetensors   tensors only (or NAME.pt, a state dict read with weights_only=True)
    NAME.json          {"format": "napari-r2au-model", "format_version": 1,
                        "name", "architecture", "arch_args", "in_channels",
                        "out_channels", "axes", "normalization", "class_names",
                        "threshold", "input_scale", "pixel_size", "pixel_size_unit",
                        "fov_diameter", "image_width", "postprocess", "segment_property", "weights_file", "weights_sha256",
                        "provenance": {...}, "description"}

The sha256 of the weights file is checked before anything is read from it, and the
metadata is checked field by field against ``METADATA_SCHEMA`` first, so that a
hand-edited or foreign file fails with one message that lists every problem.
"""

from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .io import write_bytes_atomic, write_bytes_new
from .preprocess import KINDS as NORMALIZATION_KINDS
from .preprocess import STANDARDIZE, check_normalization

if TYPE_CHECKING:
    from torch import nn

FORMAT = "napari-r2au-model"
FORMAT_VERSION = 1
DEFAULT_MODEL = "retina-vessels"
REQUIRED_KEYS = ("architecture", "arch_args", "in_channels", "out_channels", "weights_file", "weights_sha256")
#: optional fields added during format version 1, with the value a file without them means
OPTIONAL_DEFAULTS: dict[str, Any] = {
    "axes": "YXC",
    "normalization": dict(STANDARDIZE),
    "class_names": ["background", "foreground"],
    "threshold": 0.5,
    "input_scale": 1.0,
    "pixel_size": None,
    "pixel_size_unit": None,
    #: fundus models: the field-of-view diameter, in pixels, the network was trained at; the
    #: engine resizes each photograph so that its field of view has it (None: input_scale)
    "fov_diameter": None,
    #: photographs framed alike (dermoscopy): the width, in pixels, the engine resizes each
    #: image to (None: no such rule)
    "image_width": None,
    "postprocess": [],
    #: what the foreground is, as DICOM SEG codes (None: generic "Tissue")
    "segment_property": None,
    "description": "",
    "provenance": {},
}


#: bounds on a model file's architecture arguments, checked before the network is built, so
#: that a hand-edited or hostile file cannot ask for hundreds of gigabytes (README, "Limits")
ARCH_LIMITS: dict[str, tuple[int, int]] = {
    "base_width": (1, 256),
    "depth": (1, 6),
    "t": (0, 8),
    "in_channels": (1, 64),
    "out_channels": (1, 64),
    "spatial_dims": (2, 3),
}
#: the widest layer, base_width * 2**depth (64 * 2**4 = 1024 for the bundled models)
MAX_WIDEST = 2048


def check_arch_args(args: dict[str, Any]) -> str | None:
    """Why ``args`` would build an unreasonably large network (None: they are within ARCH_LIMITS)."""
    for key, (low, high) in ARCH_LIMITS.items():
        value = args.get(key)
        if key in args and (not _is_int(value) or not low <= value <= high):
            return f"arch_args.{key} must be a whole number in [{low}, {high}], got {json.dumps(value)[:40]}"
    width, depth = args.get("base_width", 64), args.get("depth", 4)
    if width * 2**depth > MAX_WIDEST:
        return (
            f"arch_args base_width * 2**depth is {width * 2**depth}, above the largest supported {MAX_WIDEST}"
        )
    return None


class ModelFileError(ValueError):
    """A model file is missing, malformed, tampered with or unsafe."""


#: what a new model may be called: it becomes a file name (and a run folder's), so nothing
#: that could be a path (separators, ".", ".."), hidden (a leading dot) or odd on some system
MODEL_NAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9._-]{0,62}[A-Za-z0-9_-])?")
MODEL_NAME_RULE = (
    "1 to 64 letters (a-z, A-Z), digits, '-', '_' and '.', not starting with '.' or '-' "
    "and not ending with '.': a plain name, no folders"
)


def model_path(directory: str | os.PathLike, name: object, suffix: str = "") -> Path:
    """``directory / (name + suffix)`` for a model name a user (or a file) gave.

    The one place a model name becomes a path: anything but a plain name (a separator,
    ``.``/``..``, empty, a leading dot, odd characters, too long) is refused with one
    message, before any path is built from it, so that no name can point outside
    ``directory``.
    """
    if not isinstance(name, str) or not MODEL_NAME.fullmatch(name):
        raise ModelFileError(f"{name!r} is not a valid model name: use {MODEL_NAME_RULE}")
    return Path(directory) / f"{name}{suffix}"


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
        return dict(self.metadata.get("normalization") or STANDARDIZE)

    @property
    def threshold(self) -> float:
        return float(self.metadata.get("threshold", 0.5))

    @property
    def input_scale(self) -> float:
        """Factor the engine resizes images by before the network (1.0: as is)."""
        return float(self.metadata.get("input_scale", 1.0))

    @property
    def pixel_size(self) -> float | None:
        """Physical size of one pixel as the network sees it (after ``input_scale``), if known."""
        value = self.metadata.get("pixel_size")
        return float(value) if value else None

    @property
    def pixel_size_unit(self) -> str | None:
        return self.metadata.get("pixel_size_unit") or None

    @property
    def fov_diameter(self) -> int | None:
        """The field-of-view diameter (pixels) the engine brings each photograph to, if any."""
        value = self.metadata.get("fov_diameter")
        return int(value) if value else None

    @property
    def image_width(self) -> int | None:
        """The width (pixels) the engine brings each image to, if the model asks for it."""
        value = self.metadata.get("image_width")
        return int(value) if value else None

    @property
    def derives_scale(self) -> bool:
        """Whether the engine derives this model's scale from each image (field of view or width)."""
        return bool(self.fov_diameter or self.image_width)

    @property
    def sha256(self) -> str | None:
        return self.metadata.get("weights_sha256")


def _optional_defaults() -> dict[str, Any]:
    """A fresh copy of OPTIONAL_DEFAULTS (its lists and dicts are not shared)."""
    return copy.deepcopy(OPTIONAL_DEFAULTS)


def build_metadata(
    *, name: str, architecture: str, arch_args: dict[str, Any], **fields: Any
) -> dict[str, Any]:
    """Metadata for a network of the family, with sensible defaults for the optional fields."""
    meta: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": name,
        "architecture": architecture,
        "arch_args": dict(arch_args),
        "in_channels": int(arch_args.get("in_channels", 3)),
        "out_channels": int(arch_args.get("out_channels", 1)),
        **_optional_defaults(),
        "provenance": {"created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")},
    }
    meta.update(fields)
    return meta


def save_model(
    network: nn.Module, directory: str | os.PathLike, metadata: dict[str, Any], exclusive: bool = False
) -> Path:
    """Write NAME.safetensors and NAME.json atomically; return the JSON path.

    The name and the metadata are checked before anything is written. ``exclusive``: a new
    model, which must not replace one: FileExistsError if either file exists (another run
    took the name first), leaving the existing files as they were.
    """
    from safetensors.torch import save

    name = metadata["name"]
    weights, sidecar = model_path(directory, name, ".safetensors"), model_path(directory, name, ".json")
    tensors = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    blob = save(tensors)
    meta = dict(metadata, weights_file=weights.name, weights_sha256=hashlib.sha256(blob).hexdigest())
    meta.setdefault("format", FORMAT)
    meta.setdefault("format_version", FORMAT_VERSION)
    validate_metadata(meta, f"model {name!r}")
    text = (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode()
    if not exclusive:
        write_bytes_atomic(weights, blob)
        write_bytes_atomic(sidecar, text)
        return sidecar
    write_bytes_new(weights, blob)  # the weights first: the sidecar is what makes the model exist
    try:
        write_bytes_new(sidecar, text)
    except BaseException:
        weights.unlink()  # ours: created just above
        raise
    return sidecar


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_length_unit(value: Any) -> bool:
    """A unit of length pint understands (without pint, any non-empty name)."""
    if not isinstance(value, str) or not value.strip():
        return False
    try:
        import pint
    except ImportError:
        return True
    registry = pint.get_application_registry()
    try:
        return registry(value).dimensionality == registry("m").dimensionality
    except Exception:  # pint raises several types for unknown or malformed units
        return False


def _check_field(key: str, value: Any) -> str | None:
    """Why ``value`` is not acceptable for metadata field ``key`` (None: it is)."""
    from .postprocess import MODEL_STEPS

    checks: dict[str, tuple[Any, str]] = {
        "name": (
            lambda v: isinstance(v, str) and v.strip() != "" and v == Path(v).name and not v.startswith("."),
            "a plain name (no folders, not starting with a dot)",
        ),
        # (the name itself is checked when the network is built: the registry imports torch)
        "architecture": (lambda v: isinstance(v, str) and v.strip() != "", "an architecture name"),
        "arch_args": (
            lambda v: (
                isinstance(v, dict) and all(isinstance(k, str) for k in v) and check_arch_args(v) is None
            ),
            "an object of keyword arguments within the limits",
        ),
        "in_channels": (lambda v: _is_int(v) and v > 0, "a positive integer"),
        "out_channels": (lambda v: _is_int(v) and v > 0, "a positive integer"),
        "axes": (
            lambda v: isinstance(v, str) and set(v) <= set("ZYXC") and "Y" in v and "X" in v,
            "a string of axes from ZYXC with Y and X",
        ),
        "normalization": (
            lambda v: check_normalization(v) is None,
            f'an object with "kind" one of {", ".join(NORMALIZATION_KINDS)} (and valid scale '
            "min, max and clip, clahe kernel_size and clip_limit)",
        ),
        "class_names": (
            lambda v: isinstance(v, list) and all(isinstance(c, str) for c in v),
            "a list of strings",
        ),
        "threshold": (lambda v: _is_number(v) and 0.0 < v < 1.0, "a number between 0 and 1"),
        "input_scale": (lambda v: _is_number(v) and 0.0 < v <= 64.0, "a number in (0, 64]"),
        "pixel_size": (lambda v: v is None or (_is_number(v) and v > 0), "null or a positive number"),
        "pixel_size_unit": (
            lambda v: v is None or _is_length_unit(v),
            "null or a unit of length (e.g. mm, um, nm)",
        ),
        "fov_diameter": (
            lambda v: v is None or (_is_int(v) and 16 <= v <= 16384),
            "null or pixels in [16, 16384]",
        ),
        "image_width": (
            lambda v: v is None or (_is_int(v) and 16 <= v <= 16384),
            "null or pixels in [16, 16384]",
        ),
        "postprocess": (
            lambda v: isinstance(v, list) and all(step in MODEL_STEPS for step in v),
            f"a list of steps from {', '.join(MODEL_STEPS)}",
        ),
        "weights_file": (
            lambda v: isinstance(v, str) and v == Path(v).name and not v.startswith("."),
            "a file name in the same folder (no path)",
        ),
        "weights_sha256": (
            lambda v: isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v),
            "64 lowercase hex digits",
        ),
        "description": (lambda v: isinstance(v, str), "a string"),
        "provenance": (lambda v: isinstance(v, dict), "an object"),
        "segment_property": (
            lambda v: v is None or check_segment_property(v) is None,
            'null or {"category": CODE, "type": CODE}, each CODE {"scheme", "value", "meaning"}',
        ),
    }
    if key not in checks:
        return None  # unknown keys are kept: a newer minor writer may add information
    check, expected = checks[key]
    return None if check(value) else f"{key} must be {expected}, got {json.dumps(value)[:60]}"


def check_segment_property(spec: Any) -> str | None:
    """Why ``spec`` cannot say what a model segments in a DICOM SEG (None: it can): a
    category and a type, each a code with its scheme (e.g. SCT), value and meaning."""
    if not isinstance(spec, dict) or set(spec) != {"category", "type"}:
        return 'expected {"category": CODE, "type": CODE}'
    for role, code in spec.items():
        if (
            not isinstance(code, dict)
            or set(code) != {"scheme", "value", "meaning"}
            or not all(isinstance(v, str) and v.strip() for v in code.values())
        ):
            return f'{role} must be {{"scheme": ..., "value": ..., "meaning": ...}} with non-empty strings'
    return None


def validate_metadata(meta: dict[str, Any], where: str = "model metadata") -> dict[str, Any]:
    """Check every field; raise one ModelFileError naming all problems; return ``meta``."""
    problems = [f"missing {key}" for key in REQUIRED_KEYS if key not in meta]
    problems += [problem for key, value in meta.items() if (problem := _check_field(key, value))]
    args = meta.get("arch_args")
    if isinstance(args, dict) and args.get("in_channels", meta.get("in_channels")) != meta.get("in_channels"):
        problems.append("in_channels disagrees with arch_args.in_channels")
    if (
        isinstance(args, dict)
        and all(isinstance(k, str) for k in args)
        and (problem := check_arch_args(args))
    ):
        problems.append(problem)  # the bound itself, not only "must be within the limits"
    for key in ("in_channels", "out_channels"):
        low, high = ARCH_LIMITS[key]
        if _is_int(meta.get(key)) and not low <= meta[key] <= high:
            problems.append(f"{key} must be at most {high}, got {meta[key]}")
    if problems:
        raise ModelFileError(f"{where}: invalid model metadata: " + "; ".join(problems))
    return meta


def _migrate(meta: dict[str, Any], sidecar: Path) -> dict[str, Any]:
    """Bring a readable older file up to the current format, or refuse it explicitly.

    Version 1 files written before a field existed get the field's default, which is
    what they meant (e.g. no ``postprocess``: none). There was no version before 1.
    """
    version = meta.get("format_version")
    if version is None:
        raise ModelFileError(f"{sidecar}: missing format_version; napari-r2au writes 1 and up")
    if isinstance(version, float) and version.is_integer():
        version = int(version)
    if not _is_int(version) or version < 1:
        raise ModelFileError(
            f"{sidecar}: format version {version!r} is not one napari-r2au ever wrote (the first is 1); "
            "re-export the model with `save_model`"
        )
    if version > FORMAT_VERSION:
        raise ModelFileError(
            f"{sidecar}: format version {version} is newer than this napari-r2au "
            f"understands ({FORMAT_VERSION}); upgrade napari-r2au"
        )
    return {**_optional_defaults(), "name": sidecar.stem, **meta}


def read_model_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """A model's JSON sidecar, validated, without loading weights (or torch): what the docks
    and the checks before a run need (name, channels, normalization, threshold)."""
    path = Path(path)
    return _read_metadata(path if path.suffix == ".json" else path.with_suffix(".json"))


def _read_metadata(sidecar: Path) -> dict[str, Any]:
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise ModelFileError(f"{sidecar}: not a readable model description ({reason})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ModelFileError(f"{sidecar}: not a {FORMAT} file")
    return validate_metadata(_migrate(meta, sidecar), str(sidecar))


def _read_state_dict(weights: Path) -> dict[str, Any]:
    import torch

    if weights.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(weights))
        except Exception as exc:  # SafetensorError (empty, truncated, bad header) is not an OSError
            raise ModelFileError(
                f"{weights}: not a readable safetensors file, empty or truncated "
                f"({type(exc).__name__}: {exc})"
            ) from exc
    if weights.suffix in (".pt", ".pth"):
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as exc:  # UnpicklingError and friends: refuse, never execute
            raise ModelFileError(f"{weights}: refused to load (not a plain tensor file: {exc})") from exc
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ModelFileError(f"{weights}: expected a state dict of tensors")
        return state
    raise ModelFileError(f"{weights}: unsupported weights format (use .safetensors or .pt)")


def _check_weights(state: dict[str, Any], expected: dict[str, Any], weights: Path) -> None:
    """Refuse weights that would load and then predict NaN or nonsense: a floating tensor
    stored as integers (load_state_dict would cast it silently), or NaN/infinite values."""
    import torch

    for key, tensor in state.items():
        want = expected.get(key)
        if want is None or not isinstance(tensor, torch.Tensor):
            continue  # unknown keys: load_state_dict(strict=True) names them
        if want.is_floating_point() and not tensor.is_floating_point():
            raise ModelFileError(
                f"{weights}: {key} is stored as {tensor.dtype}, not floating point; "
                "the file is not a trained model's weights"
            )
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ModelFileError(
                f"{weights}: {key} holds NaN or infinite values (a diverged training run?); "
                "use an earlier checkpoint"
            )


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
    try:
        network = create_model(meta["architecture"], **meta["arch_args"])
    except (ValueError, TypeError) as exc:  # unknown architecture or arguments
        raise ModelFileError(
            f"{sidecar}: cannot build {meta['architecture']!r} with {meta['arch_args']}: {exc}"
        ) from exc
    state = _read_state_dict(weights)
    _check_weights(state, network.state_dict(), weights)
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelFileError(f"{weights}: weights do not fit {meta['architecture']}: {exc}") from exc
    network.eval()
    return LoadedModel(network=network, metadata=meta, path=sidecar, source=source)


def _sidecars(directory: Path) -> list[Path]:
    # regular files only: a FIFO or device named *.json would block the read forever
    return sorted(p for p in directory.glob("*.json") if p.is_file()) if directory.is_dir() else []


#: list_models' rows by sidecar, with the file's identity they were read from: the docks'
#: model pickers list the models again whenever a layer is added or removed, on napari's GUI
#: thread, and reading and validating every sidecar each time showed up in its stalls
_LISTED: dict[str, tuple[tuple[int, int, int], dict[str, Any] | None]] = {}


def list_models() -> list[dict[str, Any]]:
    """Bundled and user models: name, source, path, architecture, description, metrics.

    A sidecar is read again only when its size, modification time or inode changed.
    """
    rows = []
    for source, directory in (("bundled", bundled_models_dir()), ("user", user_models_dir())):
        for sidecar in _sidecars(directory):
            row = _listed_row(sidecar)
            if row is not None:
                rows.append({"name": row["name"], "source": source, **copy.deepcopy(row)})
    return rows


def _listed_row(sidecar: Path) -> dict[str, Any] | None:
    """list_models' row for one sidecar (None: not a readable model file), cached by stat."""
    try:
        stat = sidecar.stat()
    except OSError:
        return None
    identity = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
    cached = _LISTED.get(str(sidecar))
    if cached is not None and cached[0] == identity:
        return cached[1]
    try:
        meta = _read_metadata(sidecar)
    except ModelFileError:
        row = None
    else:
        row = {
            "name": meta.get("name", sidecar.stem),
            "path": str(sidecar),
            "architecture": meta["architecture"],
            "description": meta.get("description", ""),
            "validation": (meta.get("provenance") or {}).get("validation_metrics", {}),
        }
    _LISTED[str(sidecar)] = (identity, row)
    return row


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


def _threshold_source(
    model: LoadedModel, donor_source: str | os.PathLike
) -> tuple[float, str, dict[str, Any]]:
    """The threshold a held-out run chose for the same recipe, and where it came from.

    Refused unless the donor's threshold was chosen on a validation split and the donor
    sees images as ``model`` does (same network and input handling), since otherwise the
    number means something else.
    """
    path = resolve_model_path(donor_source)[0]
    donor = load_model_file(path)
    provenance = donor.metadata.get("provenance", {})
    if not str(provenance.get("threshold_chosen_on", "")).startswith("validation split"):
        raise ModelFileError(
            f"{path}: its threshold was not chosen on a validation split "
            "(use the held-out run's best.json once its run has ended)"
        )
    differs = [
        key
        for key in (
            "architecture",
            "arch_args",
            "input_scale",
            "pixel_size",
            "pixel_size_unit",
            "fov_diameter",
            "image_width",
            "normalization",
            "postprocess",
        )
        if donor.metadata.get(key) != model.metadata.get(key)
    ]
    if differs:
        raise ModelFileError(
            f"{path} differs from the model in {', '.join(differs)}: its threshold belongs to another recipe"
        )
    record = {
        "name": donor.name,
        "file": str(path),
        "sha256": donor.sha256,
        "validation_images": provenance.get("validation_images"),
        "validation_metrics": provenance.get("validation_metrics", {}),
    }
    return donor.threshold, f"validation split of {path} (sha256 {(donor.sha256 or '')[:12]})", record


def check_new_model_name(
    name: str, directory: str | os.PathLike | None = None, overwrite: bool = False
) -> None:
    """Refuse a name a new user model cannot take: a bundled model's (it would be hidden),
    an existing model's (unless ``overwrite``), or a removed model's (a name in an audit
    trail keeps meaning one model)."""
    directory = Path(directory) if directory is not None else user_models_dir()
    sidecar = model_path(directory, name, ".json")
    if (
        directory.resolve() != bundled_models_dir().resolve()
        and (bundled_models_dir() / sidecar.name).exists()
    ):
        raise ModelFileError(
            f"{name!r} is a bundled model's name (a user model of that name would be hidden); "
            "choose another name"
        )
    if sidecar.exists() and not overwrite:
        raise ModelFileError(f"a model called {name!r} exists in {directory}; choose another name")
    if name in removed_model_names(directory):
        raise ModelFileError(
            f"a removed model was called {name!r} (its files are in {directory / REMOVED_DIR}); "
            "choose another name, so that the name keeps meaning one model"
        )


def add_model(
    source: str | os.PathLike,
    name: str | None = None,
    directory: str | os.PathLike | None = None,
    overwrite: bool = False,
    description: str | None = None,
    threshold: float | None = None,
    threshold_from: str | os.PathLike | None = None,
    fov_diameter: int | None = None,
) -> Path:
    """Copy a model file (e.g. a training run's ``best.json``) into the user models folder.

    The source is loaded first, so a tampered or invalid file is refused before anything
    is written; the copy gets ``name`` (default: the source's) and fresh safetensors
    weights. An existing model of that name is kept unless ``overwrite``.

    ``threshold`` sets the decision threshold; ``threshold_from`` takes it from another
    model file and records that model's validation figures. That is how a model trained
    on all the data (nothing held out) gets the threshold a run of the same recipe chose
    on its validation split.

    ``fov_diameter`` sets the field of view (px) a fundus model resizes each photograph to
    before the network, for a model that runs better at another size than it was trained
    at (``python -m benchmarks.working_scale`` measures it); the training size and the
    validation figures measured there are kept in the provenance, saying so.
    """
    if threshold is not None and threshold_from is not None:
        raise ModelFileError("give a threshold or a model to take it from, not both")
    package = Path(str(source)).expanduser()
    if package.suffix.lower() == ".zip" or (package / "rdf.yaml").is_file():
        import tempfile

        from .package_import import import_package

        with tempfile.TemporaryDirectory(prefix="r2au-package-") as tmp:
            try:
                sidecar = import_package(package, Path(tmp))
            except ValueError as exc:
                raise ModelFileError(str(exc)) from exc
            loaded = load_model_file(sidecar)
    else:
        loaded = load_model_file(resolve_model_path(source)[0])
    name = name or loaded.name
    directory = Path(directory) if directory is not None else user_models_dir()
    check_new_model_name(name, directory, overwrite=overwrite)
    meta = {k: v for k, v in loaded.metadata.items() if k not in ("weights_file", "weights_sha256")}
    meta["name"] = name
    if description is not None:
        meta["description"] = description
    if threshold is not None or threshold_from is not None:
        provenance = dict(meta.get("provenance", {}))
        # figures measured at the old threshold no longer describe the model: kept aside
        before = {
            key: provenance.pop(key)
            for key in (
                "validation_metrics",
                "validation_metrics_at_0.5",
                "threshold_chosen_on",
                "threshold_source",
            )
            if key in provenance
        }
        if before:
            provenance["before_threshold_change"] = dict(before, threshold=loaded.threshold)
        if threshold_from is not None:
            threshold, provenance["threshold_chosen_on"], provenance["threshold_source"] = _threshold_source(
                loaded, threshold_from
            )
        else:
            provenance["threshold_chosen_on"] = "set by hand (r2au add-model)"
        meta["threshold"] = float(threshold)
        meta["provenance"] = provenance
    if fov_diameter is not None:
        if not loaded.fov_diameter:
            raise ModelFileError(f"{loaded.name} does not derive its scale from a field of view")
        provenance = dict(meta.get("provenance", {}))
        provenance.setdefault("trained_at_fov_diameter", loaded.fov_diameter)
        provenance["validation_metrics_measured_at"] = (
            f"a {provenance['trained_at_fov_diameter']} px field of view, the training size"
        )
        meta["fov_diameter"] = int(fov_diameter)
        meta["provenance"] = provenance
    return save_model(loaded.network, directory, meta)


#: where removed user models are kept (inside the user models folder), one folder per removal
REMOVED_DIR = "removed"


def remove_model(name: str, directory: str | os.PathLike | None = None) -> Path:
    """Take a user model out of the model lists; return the folder its files went to.

    Nothing is deleted: the sidecar ``<name>.json`` and its weights move into
    ``removed/<name>-<UTC time>/`` in the same folder (moving them back restores the
    model), so a mask's audit trail can still be traced to the exact file. The sidecar
    moves first, so the model leaves the lists at once even if the weights' move fails;
    weights another model's sidecar also names are copied, not moved. Bundled models
    cannot be removed. A broken sidecar is removed all the same.
    """
    directory = Path(directory) if directory is not None else user_models_dir()
    sidecar = model_path(directory, name, ".json")
    if not sidecar.is_file():
        if (bundled_models_dir() / f"{name}.json").is_file():
            raise ModelFileError(
                f"{name!r} is a bundled model: it comes with the plugin and cannot be removed"
            )
        names = ", ".join(p.stem for p in _sidecars(directory)) or "none"
        raise ModelFileError(f"no user model called {name!r} in {directory}; user models: {names}")

    def weights_named_in(path: Path) -> str | None:
        try:
            value = json.loads(path.read_text()).get("weights_file")
        except (OSError, ValueError, AttributeError, RecursionError):
            return None
        return value if isinstance(value, str) and value == Path(value).name else None

    named = weights_named_in(sidecar)
    weights = (
        [directory / named] if named else [directory / f"{name}{s}" for s in (".safetensors", ".pt", ".pth")]
    )
    shared = {weights_named_in(other) for other in _sidecars(directory) if other != sidecar}
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    target = directory / REMOVED_DIR / f"{name}-{stamp}"
    target.mkdir(parents=True)
    os.replace(sidecar, target / sidecar.name)
    for path in weights:
        if path.is_file():
            if path.name in shared:  # another model needs them where they are
                shutil.copy2(path, target / path.name)
            else:
                os.replace(path, target / path.name)
    return target


def removed_model_names(directory: str | os.PathLike | None = None) -> list[str]:
    """Names of the models in the removed folder (a version number is never given twice)."""
    directory = Path(directory) if directory is not None else user_models_dir()
    return sorted(p.stem for p in (directory / REMOVED_DIR).glob("*/*.json"))
