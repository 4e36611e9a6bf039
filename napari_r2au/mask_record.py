"""The record of a mask: what made it, how, and whether a person changed it since.

One owner for the record that follows a mask everywhere: the Segment dock writes it
into the Labels layer's metadata (``metadata["r2au"]``), Review and the worklist write it
next to an exported mask as a JSON sidecar, the reader turns such a sidecar back into
the layer record, and Fine-tune, DICOM SEG export and the trainer read it. The keys are
listed once here (:class:`LayerRecord`, :class:`ExportRecord`) and the conversions
between them are the functions below, so that no caller renames keys by hand.
"""

from __future__ import annotations

import datetime as _dt
import getpass
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypedDict

import numpy as np

#: the format name of a sidecar (the reader checks it before trusting a JSON file)
MASK_FORMAT = "napari-r2au-mask"
MASK_FORMAT_VERSION = 1
#: the key of the record in a napari layer's metadata
LAYER_KEY = "r2au"


class LayerRecord(TypedDict, total=False):
    """The record in a Labels layer's ``metadata["r2au"]``."""

    model: str | None
    model_sha256: str | None
    model_path: str | None
    threshold: float | None  # None for a multi-class model (arg-max)
    cleanup: dict[str, Any] | None
    postprocess: list[str]  # the model's own clean-up steps, before the user's
    scale: float | None  # the working scale the network saw (fine-tuning trains at it)
    backend: str | None  # what ran the network: "torch" or "openvino" (napari_r2au.backends)
    precision: str | None  # at which precision: "fp32", "bf16", "fp16" or "int8"
    mask_sha256: str | None  # the model's mask: a different checksum means hand edits
    slice_sha256: list[str] | None  # per slice of a stack: which slices were edited
    image_layer: str | None
    probability_layer: str | None
    attention_layers: list[str]
    uncertainty_layer: str | None
    flip_averaged: bool | None
    scope: str | None
    slices: list[int] | None  # a stack's slices that hold results
    runs: list[dict[str, Any]] | None  # which model made which slices, at which scale
    created: str | None
    run_id: str | None
    dicom: dict[str, Any]
    segment_property: dict[str, Any] | None


class ExportRecord(TypedDict, total=False):
    """The JSON sidecar written next to an exported mask (see :func:`export_record`)."""

    format: str
    format_version: int
    mask_file: str
    layer: str
    shape: list[int]
    dtype: str
    scale: list[float]
    translate: list[float]
    model: str | None
    model_sha256: str | None
    threshold: float | None
    cleanup: dict[str, Any] | None
    working_scale: float | None
    backend: str | None
    precision: str | None
    flip_averaged: bool | None
    scope: str | None
    segmented_slices: list[int] | None
    runs: list[dict[str, Any]] | None
    image_layer: str | None
    segmented: str | None
    date: str
    corrected_by_hand: bool | None
    prediction_sha256: str | None
    prediction_slice_sha256: list[str] | None
    postprocess: list[str] | None
    model_path: str | None
    reviewer: str | None
    review: dict[str, Any] | None
    metrics: dict[str, Any]
    napari_r2au_version: str


#: layer-record key -> sidecar key, where the two differ; the others share their name
_RENAMED = {
    "scale": "working_scale",
    "slices": "segmented_slices",
    "created": "segmented",
    "mask_sha256": "prediction_sha256",
    "slice_sha256": "prediction_slice_sha256",
}
#: layer-record keys a sidecar keeps (the layer names of maps and run ids are the viewer's own)
_EXPORTED = (
    "model",
    "model_sha256",
    "threshold",
    "cleanup",
    "scale",
    "backend",
    "precision",
    "flip_averaged",
    "scope",
    "slices",
    "runs",
    "image_layer",
    "created",
    "mask_sha256",
    "slice_sha256",
    "postprocess",
    "model_path",
)


def now() -> str:
    """The time stamps of records: UTC, to the second, ISO 8601."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def reviewer_name() -> str | None:
    """Who is reviewing: the R2AU_REVIEWER environment variable, else the login name."""
    import os

    name = os.environ.get("R2AU_REVIEWER", "").strip()
    if name:
        return name
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no login name (some containers)
        return None


def checksums(mask: Any) -> dict[str, Any]:
    """The record's checksums of a mask: whole (was it painted on?) and per slice (which slices?)."""
    from .postprocess import mask_checksums

    whole, slices = mask_checksums(np.asarray(mask))
    return {"mask_sha256": whole, "slice_sha256": slices}


def segment_record(
    prediction: Any,
    mask: Any,
    *,
    threshold: float | None,
    cleanup: Mapping[str, Any] | None = None,
    model_path: str | None = None,
    flip_averaged: bool = False,
    mask_checksums: Mapping[str, Any] | None = None,
    **fields: Any,
) -> LayerRecord:
    """The record of a mask a model has just made (an engine ``Prediction`` and the mask
    cut from it). ``mask_checksums``: :func:`checksums` of ``mask`` when already made (in a
    worker thread); ``fields``: further :class:`LayerRecord` keys (layer names, scope, runs)."""
    unknown = set(fields) - set(LayerRecord.__annotations__)
    if unknown:
        raise TypeError(f"not mask-record keys: {', '.join(sorted(unknown))}")
    record: LayerRecord = {
        "model": prediction.model_name,
        "model_sha256": prediction.model_sha256,
        "model_path": model_path,
        "threshold": None if prediction.multiclass else threshold,
        "cleanup": dict(cleanup) if cleanup is not None else None,
        "postprocess": list(prediction.postprocess or []),
        "scale": float(prediction.scale),
        "backend": getattr(prediction, "backend", None),
        "precision": getattr(prediction, "precision", None),
        "flip_averaged": flip_averaged,
        "created": now(),
        **(dict(mask_checksums) if mask_checksums is not None else checksums(mask)),  # type: ignore[typeddict-item]
    }
    record.update(fields)  # type: ignore[typeddict-item]
    return record


def layer_record(metadata: Mapping[str, Any] | None) -> LayerRecord:
    """The record in a layer's metadata (a copy; empty when the layer has none)."""
    return dict((metadata or {}).get(LAYER_KEY) or {})  # type: ignore[return-value]


def with_record(metadata: Mapping[str, Any] | None, record: Mapping[str, Any]) -> dict[str, Any]:
    """A layer's metadata with ``record`` in place of its mask record (the rest kept)."""
    return {**(metadata or {}), LAYER_KEY: dict(record)}


def edited(record: Mapping[str, Any], mask: Any) -> bool | None:
    """Whether ``mask`` differs from the model's mask the record describes (None: unknown)."""
    from .postprocess import mask_checksum

    recorded = record.get("mask_sha256")
    return None if recorded is None else mask_checksum(np.asarray(mask)) != recorded


def export_record(
    record: Mapping[str, Any],
    mask: np.ndarray,
    *,
    mask_file: str,
    layer: str,
    scale: Sequence[float] | None = None,
    translate: Sequence[float] | None = None,
    review: Mapping[str, Any] | None = None,
) -> ExportRecord:
    """The sidecar of ``mask`` (as written, after compact_labels) exported as ``mask_file``.

    ``record``: the layer record of the mask (:class:`LayerRecord`); ``review``: a
    reviewer's verdict to keep with it (the worklist's status and comment).
    """
    from . import __version__

    mask = np.asarray(mask)
    ndim = mask.ndim
    sidecar: dict[str, Any] = {
        "format": MASK_FORMAT,
        "format_version": MASK_FORMAT_VERSION,
        "mask_file": mask_file,
        "layer": layer,
        "shape": list(mask.shape),
        "dtype": str(mask.dtype),
        "scale": [float(v) for v in (scale if scale is not None else [1.0] * ndim)],
        "translate": [float(v) for v in (translate if translate is not None else [0.0] * ndim)],
    }
    for key in _EXPORTED:
        sidecar[_RENAMED.get(key, key)] = record.get(key)
    sidecar["date"] = now()
    sidecar["corrected_by_hand"] = edited(record, mask)
    sidecar["reviewer"] = reviewer_name()
    if review is not None:
        sidecar["review"] = dict(review)
    sidecar["napari_r2au_version"] = __version__
    return sidecar  # type: ignore[return-value]


def with_metrics(sidecar: Mapping[str, Any], reference_name: str, rates: Mapping[str, float]) -> ExportRecord:
    """The sidecar with a mask's metrics against a reference (non-finite values as null)."""
    metrics = {k: (float(v) if math.isfinite(float(v)) else None) for k, v in rates.items()}
    return {**sidecar, "metrics": {"reference_layer": reference_name, **metrics}}  # type: ignore[typeddict-item]


def record_from_export(sidecar: Mapping[str, Any]) -> LayerRecord:
    """The layer record of a mask opened again from its sidecar (the inverse of
    :func:`export_record` for the keys a sidecar keeps): Fine-tune trains at the same
    working scale, and the edits are still told apart after a reload."""
    return {key: sidecar.get(_RENAMED.get(key, key)) for key in _EXPORTED}  # type: ignore[return-value]


def read_sidecar(mask_path: str | Path) -> ExportRecord | None:
    """The sidecar of an exported mask (``<mask>.json``), if there is one that names this
    file and has this format; None otherwise (a JSON file of anything else is ignored)."""
    path = Path(mask_path)
    sidecar = path.with_suffix(".json")
    if not sidecar.is_file():
        return None
    try:
        record = json.loads(sidecar.read_text())
    except (OSError, ValueError, RecursionError):
        return None
    if (
        not isinstance(record, dict)
        or record.get("format") != MASK_FORMAT
        or record.get("mask_file") != path.name
    ):
        return None
    return record  # type: ignore[return-value]


def sidecar_text(sidecar: Mapping[str, Any]) -> str:
    return json.dumps(sidecar, indent=2) + "\n"
