"""Where a model's int8 network lives, and when it may be trusted.

An int8 network (OpenVINO IR: ``.xml`` and ``.bin``, data only, no code) is made by
``r2au quantize`` (:mod:`napari_r2au.training.quantize`) for one model's weights and kept
beside a record (``.json``): the network it was made for (:func:`backends.int8_key`), the
F1 of the int8 network and of exact fp32 on the images it was gated on, the verdict, and
the sha256 of both files. The OpenVINO backend runs it only when the record says it passed
its gate, names this model's network and the files are the ones recorded; anything else is
as if there were no int8 network.

Two places are looked in: the user data folder (``int8/``, what ``r2au quantize`` writes)
and the bundled models' ``int8/`` folder (``NAME.*``, shipped with a bundled model; in a
folder of its own, so that no record is ever taken for a model file).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .io import write_bytes_atomic

if TYPE_CHECKING:
    from .model_files import LoadedModel

FORMAT = "napari-r2au-int8"
VERSION = 1
#: the largest F1 an int8 network may give up against exact fp32 (issue: within 0.003)
GATE = 0.003
#: the largest F1 it may give up on any one gate image: a pooled F1 can hide images that
#: lose 0.03 behind others that gain as much (seen on a CPU without VNNI, see OVERFLOW_FIX)
GATE_PER_IMAGE = 0.01
#: how NNCF keeps int8 sums from saturating: "enable" quantizes every layer's weights to 7
#: bits, so the network computes the same on CPUs with and without VNNI; a network made
#: otherwise (NNCF's default fixes the first layer only) ran on an AVX2-only CPU with masks
#: 5-9% off its fp32 ones, so it is run by default only where the CPU has VNNI
OVERFLOW_FIX = "enable"
#: a record is a few hundred bytes; anything much larger is not one
MAX_RECORD_BYTES = 64 * 1024


@dataclass(frozen=True)
class Int8Network:
    """One int8 network on disk and its record."""

    xml: Path
    bin: Path
    record: dict[str, Any]

    def verdict(self) -> str:
        r = self.record
        worst = r.get("worst_image_f1_loss")
        per_image = (
            f"; worst image {-worst:+.4f}, gate {r.get('gate_per_image', GATE_PER_IMAGE):g}" if worst else ""
        )
        return (
            f"F1 {r['f1_int8']:.4f} against {r['f1_fp32']:.4f} at fp32 on {r['images']} image(s), "
            f"gate {r['gate']:g}{per_image}"
        )


def with_suffix(stem: Path, suffix: str) -> Path:
    """``STEM.xml`` and so on; a stem may hold dots (a model named ``v1.2``)."""
    return stem.parent / f"{stem.name}{suffix}"


def int8_dir() -> Path:
    """The user's int8 networks (``R2AU_HOME``/int8 overrides the user data folder)."""
    home = os.environ.get("R2AU_HOME")
    if home:
        return Path(home) / "int8"
    import platformdirs

    return Path(platformdirs.user_data_dir("napari-r2au")) / "int8"


def stems(loaded: LoadedModel, key: str) -> list[Path]:
    """Where this model's int8 network may be, the user's own first (a user who gated the
    model on their images wants that verdict): ``STEM.xml``, ``STEM.bin``, ``STEM.json``.
    ``key`` names the network (:func:`napari_r2au.backends.int8_key`)."""
    from .model_files import bundled_models_dir

    return [int8_dir() / key, bundled_models_dir() / "int8" / loaded.name]


def _records_for(loaded: LoadedModel, key: str) -> Iterator[tuple[Path, dict[str, Any]]]:
    """(stem, record) of each int8 network made for the network ``key`` names at this model's
    gated settings, in :func:`stems`' order (another threshold or working scale: its verdict
    says nothing here)."""
    settings = gated_settings(loaded)
    for stem in stems(loaded, key):
        record = _read_record(with_suffix(stem, ".json"))
        if record is None or record.get("network_key") != key:
            continue
        if all(record.get(name) == value for name, value in settings.items()):
            yield stem, record


def find_int8(loaded: LoadedModel, key: str) -> Int8Network | None:
    """The model's int8 network and record (passed or failed), or None if there is none
    made for the network ``key`` names with intact files."""
    for stem, record in _records_for(loaded, key):
        if record.get("accepted") and not runs_as_gated(record):
            continue  # its verdict was reached on other arithmetic than this CPU's
        found = Int8Network(with_suffix(stem, ".xml"), with_suffix(stem, ".bin"), record)
        if not record.get("accepted"):
            return found
        files = record.get("files") or {}
        if all(_sha256(path) == files.get(kind) for kind, path in (("xml", found.xml), ("bin", found.bin))):
            return found
    return None


def made_before_overflow_fix(loaded: LoadedModel, key: str) -> bool:
    """Whether the model has an accepted int8 network that :func:`find_int8` passes over on
    this CPU (made without :data:`OVERFLOW_FIX`, no VNNI here): said, not taken for none."""
    return any(
        record.get("accepted") and not runs_as_gated(record) for _, record in _records_for(loaded, key)
    )


def runs_as_gated(record: dict[str, Any]) -> bool:
    """Whether this CPU computes the network as the CPU of its gate did: always for one
    made with :data:`OVERFLOW_FIX`, else only on a CPU with VNNI (no 16-bit saturation)."""
    from .device import cpu_has_int8_dot

    return record.get("overflow_fix") == OVERFLOW_FIX or cpu_has_int8_dot()


def gated_settings(loaded: LoadedModel) -> dict[str, Any]:
    """What the gate's verdict depends on besides the weights: the threshold it scored at and
    the working scale its calibration images ran at. A copy of the weights with another
    threshold or field of view (``r2au add-model --threshold/--fov-diameter``) needs its own gate."""
    return {
        "threshold": loaded.threshold,
        "fov_diameter": loaded.fov_diameter,
        "image_width": loaded.image_width,
        "input_scale": loaded.input_scale,
    }


def read_verified(found: Int8Network) -> tuple[bytes, bytes] | None:
    """The .xml and .bin as bytes, if they are the ones the record names (read once, checked
    on what was read): what the backend builds the network from."""
    files = found.record.get("files") or {}
    try:
        xml, weights = found.xml.read_bytes(), found.bin.read_bytes()
    except OSError:
        return None
    if hashlib.sha256(xml).hexdigest() != files.get("xml") or hashlib.sha256(
        weights
    ).hexdigest() != files.get("bin"):
        return None
    return xml, weights


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        if path.stat().st_size > MAX_RECORD_BYTES:
            return None
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("format") != FORMAT or record.get("version") != VERSION:
        return None
    figures = ("f1_fp32", "f1_int8", "gate", "images")
    if not all(
        isinstance(record.get(k), (int, float)) and not isinstance(record.get(k), bool) for k in figures
    ):
        return None  # not a record this project wrote: as if there were none
    return record


_HASHES: dict[tuple[str, int, int], str] = {}


def _sha256(path: Path) -> str | None:
    """The file's sha256, remembered while its size and time are unchanged."""
    try:
        stat = path.stat()
    except OSError:
        return None
    key = (str(path), stat.st_mtime_ns, stat.st_size)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


def new_record(
    loaded: LoadedModel,
    key: str,
    f1_fp32: float,
    f1_int8: float,
    images: int,
    tiles: int,
    *,
    worst_image_loss: float,
    overflow_fix: str | None,
    class_map: dict[int, int] | None = None,
) -> dict[str, Any]:
    """The record of one gate for the network ``key`` names: accepted when int8 gives up
    at most :data:`GATE` of pooled F1 and at most :data:`GATE_PER_IMAGE` on any one image
    (``worst_image_loss``). ``overflow_fix``: the one NNCF was given (the maker knows).
    ``class_map``: how the gate's masks were read, so that the gate can be repeated."""
    from importlib.metadata import PackageNotFoundError, version

    def _version(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {
        "format": FORMAT,
        "version": VERSION,
        "network_key": key,
        "model": loaded.name,
        "model_sha256": loaded.sha256,
        **gated_settings(loaded),
        "f1_fp32": round(float(f1_fp32), 6),
        "f1_int8": round(float(f1_int8), 6),
        "gate": GATE,
        "worst_image_f1_loss": round(float(worst_image_loss), 6),
        "gate_per_image": GATE_PER_IMAGE,
        "overflow_fix": overflow_fix,
        "accepted": bool(f1_fp32 - f1_int8 <= GATE and worst_image_loss <= GATE_PER_IMAGE),
        "images": images,
        "calibration_tiles": tiles,
        **({"class_map": {str(k): v for k, v in class_map.items()}} if class_map else {}),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "openvino": _version("openvino"),
        "nncf": _version("nncf"),
    }


def save_int8(stem: Path, record: dict[str, Any], xml: Path | None = None, bin_: Path | None = None) -> Path:
    """Put an int8 network (files written elsewhere on the same disk) and its record at
    ``stem``. The record goes last: until it is written, the old record (or none) still
    governs, and its sha256 no longer matches half-replaced files, so they are not run.
    A failed gate keeps only its record (the verdict, so the backend can say why)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    record = dict(record)
    if record.get("accepted"):
        if xml is None or bin_ is None:
            raise ValueError("an accepted int8 network needs its .xml and .bin")
        record["files"] = {"xml": _sha256(xml), "bin": _sha256(bin_)}
        os.replace(bin_, with_suffix(stem, ".bin"))
        os.replace(xml, with_suffix(stem, ".xml"))
    else:
        for suffix in (".xml", ".bin"):
            with_suffix(stem, suffix).unlink(missing_ok=True)
    target = with_suffix(stem, ".json")
    write_bytes_atomic(target, (json.dumps(record, indent=2) + "\n").encode())
    return target
