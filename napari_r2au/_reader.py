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


# Where enhanced (multi-frame) files keep what classic files hold at the top level: a
# frame's own functional group first, then the group shared by all frames.
_FUNCTIONAL_GROUP = {
    "ImagePositionPatient": "PlanePositionSequence",
    "ImageOrientationPatient": "PlaneOrientationSequence",
    "PixelSpacing": "PixelMeasuresSequence",
    "SliceThickness": "PixelMeasuresSequence",
    "SpacingBetweenSlices": "PixelMeasuresSequence",
    "RescaleSlope": "PixelValueTransformationSequence",
    "RescaleIntercept": "PixelValueTransformationSequence",
}


def _frame_value(dataset: Any, frame: int, keyword: str) -> Any:
    """``keyword`` for one frame of ``dataset``: from the frame's functional group, the
    shared group, or the top level; None when none of them gives it."""
    groups = []
    per_frame = dataset.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and frame < len(per_frame):
        groups.append(per_frame[frame])
    shared = dataset.get("SharedFunctionalGroupsSequence")
    if shared:
        groups.append(shared[0])
    for group in groups:
        items = group.get(_FUNCTIONAL_GROUP[keyword])
        if items and _given(items[0].get(keyword)):
            return items[0].get(keyword)
    value = dataset.get(keyword)
    return value if _given(value) else None


def _given(value: Any) -> bool:
    return value is not None and not (isinstance(value, str) and value == "")


class _Frame:
    """One plane of a DICOM file, with where it lies and how its values rescale."""

    def __init__(self, dataset: Any, index: int, pixels: np.ndarray, source: str, order: tuple[int, int]):
        self.dataset, self.index, self.pixels, self.source, self.order = dataset, index, pixels, source, order
        self.slope = float(_frame_value(dataset, index, "RescaleSlope") or 1)
        self.intercept = float(_frame_value(dataset, index, "RescaleIntercept") or 0)
        ipp = _frame_value(dataset, index, "ImagePositionPatient")
        iop = _frame_value(dataset, index, "ImageOrientationPatient")
        self.position = np.asarray(ipp, float) if ipp is not None and len(ipp) == 3 else None
        self.orientation = np.asarray(iop, float) if iop is not None and len(iop) == 6 else None


def _frames_of(dataset: Any, source: str, file_index: int) -> list[_Frame]:
    """The planes of one file: one for a classic file, NumberOfFrames for a multi-frame one."""
    pixels = np.asarray(dataset.pixel_array)
    count = int(dataset.get("NumberOfFrames", 1) or 1)
    planes = pixels if count > 1 else pixels[None]
    instance = dataset.get("InstanceNumber")
    instance = int(instance) if _given(instance) else file_index
    return [_Frame(dataset, i, planes[i], source, (instance, i)) for i in range(count)]


def _read_dicom_frames(frames: list[_Frame], name: str, files: int) -> LayerData:
    """DICOM planes (of one file or of a series) as one image: a plane, or a (Z, Y, X)
    stack in patient order.

    Planes are ordered along the slice normal (ImagePositionPatient and
    ImageOrientationPatient, per frame in enhanced files) when every plane has a
    distinct position, else by InstanceNumber and frame number (a time series at one
    position keeps its order). The z spacing is the median distance between positions,
    else SpacingBetweenSlices or SliceThickness, else 1. Values are rescaled per plane
    (CT: Hounsfield units) when a plane gives a rescale.
    """
    first = frames[0]
    shape = first.pixels.shape
    for frame in frames:
        if frame.pixels.shape != shape:
            raise ValueError(f"{frame.source}: a {frame.pixels.shape} plane differs from the first plane's {shape}")
    positions: list[float] = []
    if all(f.position is not None and f.orientation is not None for f in frames):
        if any(not np.allclose(f.orientation, first.orientation, atol=1e-3) for f in frames):
            raise ValueError(f"{name}: planes in different orientations (a localizer among the slices?): "
                             "open the planes of one orientation together")
        normal = np.cross(first.orientation[:3], first.orientation[3:])
        positions = [float(np.dot(normal, f.position)) for f in frames]
    if positions and len(set(np.round(positions, 4))) == len(frames):
        order = np.argsort(positions, kind="stable")
    else:
        order = sorted(range(len(frames)), key=lambda i: frames[i].order)
        positions = []
    frames = [frames[i] for i in order]
    if all((f.slope, f.intercept) == (1.0, 0.0) for f in frames):
        planes = [f.pixels for f in frames]
    else:
        planes = [(f.pixels * np.float32(f.slope) + np.float32(f.intercept)).astype(np.float32) for f in frames]
    rgb = int(first.dataset.get("SamplesPerPixel", 1) or 1) in (3, 4) and shape[-1] in (3, 4)
    extra: dict[str, Any] = {"files": files} if files > 1 else {}
    if len(frames) == 1:
        return planes[0], dict(_dicom_kwargs(first, name, None, **extra), rgb=rgb), "image"
    steps = np.diff(sorted(positions)) if positions else np.array([])
    if steps.size and np.median(steps) > 0:
        z = float(np.median(steps))
    else:
        z = float(_frame_value(first.dataset, first.index, "SpacingBetweenSlices")
                  or _frame_value(first.dataset, first.index, "SliceThickness") or 1.0)
    kwargs = _dicom_kwargs(first, name, z, frames=len(frames), **extra)
    return np.stack(planes), dict(kwargs, rgb=rgb), "image"


def _dicom_kwargs(frame: _Frame, name: str, z_spacing: float | None = None, **extra: Any) -> dict[str, Any]:
    """Layer name, spacing in mm (with ``z_spacing`` for a stack) and what the file says it is."""
    kwargs: dict[str, Any] = {"name": name}
    spacing = _frame_value(frame.dataset, frame.index, "PixelSpacing")
    if spacing is not None and len(spacing) == 2:
        scale = [float(v) for v in spacing]
        if z_spacing is not None:
            scale = [z_spacing, *scale]
        kwargs["scale"] = tuple(scale)
        kwargs["units"] = ("mm",) * len(scale)  # DICOM spacings are in millimetres
    kwargs["metadata"] = {"dicom": {key: str(frame.dataset.get(key)) for key in
                                    ("Modality", "SeriesDescription", "PhotometricInterpretation")
                                    if key in frame.dataset} | extra}
    return kwargs


def _read_dicom(path: Path) -> LayerData:
    """One DICOM file: a plane, or a stack when it holds several frames."""
    return _read_dicom_frames(_frames_of(_pydicom().dcmread(path), path.name, 0), path.stem, 1)


def _read_dicom_series(paths: Sequence[Path], name: str) -> LayerData:
    """The DICOM files of one series (one file per slice, or multi-frame files) as one stack."""
    if not paths:
        raise ValueError("no .dcm files to read")
    pydicom = _pydicom()
    datasets = [pydicom.dcmread(p) for p in paths]
    series = {str(d.get("SeriesInstanceUID", "")) for d in datasets}
    if len(series) > 1:
        raise ValueError(f"{len(paths)} DICOM files from {len(series)} different series: open one series at a time")
    frames = [frame for i, (path, dataset) in enumerate(zip(paths, datasets))
              for frame in _frames_of(dataset, path.name, i)]
    return _read_dicom_frames(frames, name, len(paths))


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
