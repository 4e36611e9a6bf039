"""napari reader: common image files; DICOM and NIfTI with the optional extras.

A mask exported by the Review widget (a TIFF with a ``napari-r2au-mask`` JSON sidecar)
opens as a Labels layer that still knows which model made it, so a corrected mask can
be reviewed or exported again later.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .io import IMAGE_SUFFIXES, read_image

LayerData = tuple[Any, dict[str, Any], str]

DICOM_SUFFIXES = (".dcm",)
NIFTI_SUFFIXES = (".nii", ".nii.gz")
SUFFIXES = IMAGE_SUFFIXES + DICOM_SUFFIXES + NIFTI_SUFFIXES
MASK_FORMAT = "napari-r2au-mask"


class MissingExtraError(ImportError):
    """An optional dependency for a file type is not installed; the message says how to get it."""


def suffix_of(path: str | os.PathLike) -> str:
    """The lower-case extension, with ``.nii.gz`` as one."""
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def stem_of(path: str | os.PathLike) -> str:
    """The name without its extension (``scan.nii.gz`` -> ``scan``)."""
    name, suffix = Path(path).name, suffix_of(path)
    return name[: -len(suffix)] if suffix else name


def napari_get_reader(path: str | Sequence[str]) -> Callable[[Any], list[LayerData]] | None:
    """The reader for ``path`` (a file, a list of files, or a folder of a DICOM series)
    if every file is one we read."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if len(paths) == 1 and Path(paths[0]).is_dir():
        return read_layers if dicom_series_files(paths[0]) else None
    if not paths or any(suffix_of(p) not in SUFFIXES for p in paths):
        return None
    return read_layers


def dicom_series_files(folder: str | os.PathLike) -> list[Path]:
    """The DICOM files of a folder (a CT or MR series is usually one file per slice):
    ``.dcm`` files, and files without an extension that start like DICOM (scanners and
    PACS exports often write names such as ``IM0001``)."""
    return sorted(p for p in Path(folder).iterdir()
                  if p.is_file() and (suffix_of(p) in DICOM_SUFFIXES or (not p.suffix and _has_dicom_preamble(p))))


def _has_dicom_preamble(path: Path) -> bool:
    """DICOM Part 10 files carry "DICM" after a 128-byte preamble."""
    try:
        with open(path, "rb") as handle:
            return handle.read(132)[128:] == b"DICM"
    except OSError:
        return False


def read_layers(path: str | Sequence[str]) -> list[LayerData]:
    """Layer data for each file; a folder of DICOM files, or several DICOM files opened
    together (napari's "Open Files as Stack"), is one series: one 3D layer."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if len(paths) == 1 and Path(paths[0]).is_dir():
        return [_read_dicom_series(dicom_series_files(paths[0]), Path(paths[0]).name)]
    if len(paths) > 1 and all(suffix_of(p) in DICOM_SUFFIXES for p in paths):
        return [_read_dicom_series([Path(p) for p in paths], Path(paths[0]).parent.name or "series")]
    return [read_file(p) for p in paths]


def read_file(path: str | os.PathLike) -> LayerData:
    path = Path(path)
    suffix = suffix_of(path)
    if suffix in DICOM_SUFFIXES:
        return _read_dicom(path)
    if suffix in NIFTI_SUFFIXES:
        return _read_nifti(path)
    data = read_image(path)
    record = _mask_record(path)
    if record is not None:
        return data, _mask_kwargs(path, record), "labels"
    rgb = data.ndim >= 3 and data.shape[-1] in (3, 4)
    return data, {"name": path.stem, "rgb": rgb}, "image"


def missing_extra(what: str, package: str, extra: str) -> MissingExtraError:
    """The error (also shown in napari) for a file type whose extra is not installed."""
    message = f"{what} needs {package}: install napari-r2au[{extra}] (pip install 'napari-r2au[{extra}]')"
    try:
        from napari.utils.notifications import show_error

        show_error(message)
    except ImportError:  # used without napari
        pass
    return MissingExtraError(message)


# -- masks exported by the Review widget ---------------------------------------------------

def _mask_record(path: Path) -> dict[str, Any] | None:
    sidecar = path.with_suffix(".json")
    if not sidecar.is_file():
        return None
    try:
        record = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("format") != MASK_FORMAT or record.get("mask_file") != path.name:
        return None
    return record


def _mask_kwargs(path: Path, record: dict[str, Any]) -> dict[str, Any]:
    info = {key: record.get(key) for key in ("model", "model_sha256", "threshold", "cleanup", "image_layer",
                                             "flip_averaged", "scope")}
    info["scale"] = record.get("working_scale")  # what Fine-tune trains at on this mask
    info["slices"] = record.get("segmented_slices")
    info["runs"] = record.get("runs")
    # the checksum of the model's own mask: edits are still told apart after a reload
    info["mask_sha256"] = record.get("prediction_sha256")
    info["slice_sha256"] = record.get("prediction_slice_sha256")
    info["created"] = record.get("segmented")
    kwargs: dict[str, Any] = {"name": path.stem, "metadata": {"r2au": info, "r2au_export": record}}
    for key in ("scale", "translate"):
        if record.get(key):
            kwargs[key] = tuple(record[key])
    return kwargs


# -- optional formats ----------------------------------------------------------------------

def _pydicom() -> Any:
    try:
        import pydicom
    except ImportError as exc:
        raise missing_extra("Reading DICOM files", "pydicom", "dicom") from exc
    return pydicom


def _dicom_kwargs(dataset: Any, name: str, z_spacing: float | None = None, **extra: Any) -> dict[str, Any]:
    """Layer name, spacing in mm (with ``z_spacing`` for a stack) and what the file says it is."""
    kwargs: dict[str, Any] = {"name": name}
    spacing = getattr(dataset, "PixelSpacing", None)
    if spacing is not None and len(spacing) == 2:
        scale = [float(v) for v in spacing]
        if z_spacing is not None:
            scale = [z_spacing, *scale]
        kwargs["scale"] = tuple(scale)
        kwargs["units"] = ("mm",) * len(scale)  # DICOM spacings are in millimetres
    kwargs["metadata"] = {"dicom": {key: str(getattr(dataset, key)) for key in
                                    ("Modality", "SeriesDescription", "PhotometricInterpretation")
                                    if hasattr(dataset, key)} | extra}
    return kwargs


def _read_dicom(path: Path) -> LayerData:
    dataset = _pydicom().dcmread(path)
    data = _dicom_pixels(dataset)
    rgb = int(getattr(dataset, "SamplesPerPixel", 1)) in (3, 4) and data.shape[-1] in (3, 4)
    multiframe = data.ndim - (1 if rgb else 0) == 3
    z_spacing = float(getattr(dataset, "SliceThickness", None) or 1.0) if multiframe else None
    return data, dict(_dicom_kwargs(dataset, path.stem, z_spacing), rgb=rgb), "image"


def _dicom_pixels(dataset: Any, pixels: np.ndarray | None = None) -> np.ndarray:
    """The stored values in the modality's units (CT: Hounsfield units) when the file
    gives a rescale; the raw values otherwise."""
    data = np.asarray(dataset.pixel_array if pixels is None else pixels)
    slope = float(getattr(dataset, "RescaleSlope", 1) or 1)
    intercept = float(getattr(dataset, "RescaleIntercept", 0) or 0)
    if (slope, intercept) == (1.0, 0.0):
        return data
    return (data * np.float32(slope) + np.float32(intercept)).astype(np.float32)


def _read_dicom_series(paths: Sequence[Path], name: str) -> LayerData:
    """Single-frame DICOM files of one series as a (Z, Y, X) stack, in patient order.

    Slices are ordered along the slice normal (ImagePositionPatient and
    ImageOrientationPatient), else by InstanceNumber; the z spacing is the median
    distance between slice positions, else SpacingBetweenSlices or SliceThickness.
    """
    if not paths:
        raise ValueError("no .dcm files to read")
    pydicom = _pydicom()
    datasets = [pydicom.dcmread(p) for p in paths]
    series = {str(getattr(d, "SeriesInstanceUID", "")) for d in datasets}
    if len(series) > 1:
        raise ValueError(f"{len(paths)} DICOM files from {len(series)} different series: open one series at a time")
    frames = [int(getattr(d, "NumberOfFrames", 1) or 1) for d in datasets]
    if max(frames) > 1:
        raise ValueError("a series of multi-frame DICOM files: open each file on its own")

    def position(dataset: Any) -> float | None:
        ipp, iop = getattr(dataset, "ImagePositionPatient", None), getattr(dataset, "ImageOrientationPatient", None)
        if ipp is None or iop is None or len(ipp) != 3 or len(iop) != 6:
            return None
        normal = np.cross(np.asarray(iop[:3], float), np.asarray(iop[3:], float))
        return float(np.dot(normal, np.asarray(ipp, float)))

    positions = [position(d) for d in datasets]
    if all(p is not None for p in positions):
        order = np.argsort(positions, kind="stable")
    else:
        order = np.argsort([int(getattr(d, "InstanceNumber", i) or i) for i, d in enumerate(datasets)], kind="stable")
    slices = []
    for index in order:
        dataset = datasets[index]
        plane = np.asarray(dataset.pixel_array)
        if plane.shape != np.asarray(datasets[order[0]].pixel_array).shape:
            raise ValueError(f"{paths[index].name}: {plane.shape} differs from the series' first slice "
                             f"{datasets[order[0]].pixel_array.shape}")
        slices.append(_dicom_pixels(dataset, plane))
    data = np.stack(slices)
    first = datasets[order[0]]
    ordered = sorted(p for p in positions if p is not None)
    steps = np.diff(ordered) if len(ordered) == len(datasets) > 1 else np.array([])
    z = float(np.median(steps)) if steps.size and np.median(steps) > 0 else \
        float(getattr(first, "SpacingBetweenSlices", None) or getattr(first, "SliceThickness", None) or 1.0)
    return data, _dicom_kwargs(first, name, z, files=len(paths)), "image"


def _read_nifti(path: Path) -> LayerData:
    try:
        import nibabel
    except ImportError as exc:
        raise missing_extra("Reading NIfTI files", "nibabel", "nifti") from exc
    image = nibabel.load(str(path))
    # NIfTI stores (x, y, z[, t]); napari shows the last axes as (y, x): reverse them
    data = np.asarray(image.dataobj).T
    zooms = [float(z) for z in image.header.get_zooms()[:data.ndim]][::-1]
    metadata = {"nifti": {"affine": np.asarray(image.affine).tolist(), "axes": "reversed"}}
    kwargs: dict[str, Any] = {"name": stem_of(path), "scale": tuple(zooms), "metadata": metadata}
    space_unit = image.header.get_xyzt_units()[0]  # "mm", "micron", "meter" or "unknown"
    unit = {"mm": "mm", "micron": "um", "meter": "m"}.get(space_unit)
    if unit is not None:
        kwargs["units"] = (unit,) * len(zooms)
    return data, kwargs, "image"
