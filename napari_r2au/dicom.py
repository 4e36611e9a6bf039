"""DICOM files read with pydicom (the ``dicom`` extra): which files of a folder are DICOM,
each file's planes, pixel values and geometry, a series as one stack and the DICOM SEG files
that refer to it, decoded once for the napari reader, the command line, the trainer and DICOM SEG
export alike. Nothing here builds napari layers; warnings are Python warnings (the napari
reader shows them in the viewer too).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .io import missing_extra

DICOM_SUFFIXES = (".dcm",)


def _suffix(path: Path) -> str:
    return path.suffix.lower()


def dicom_series_files(folder: str | os.PathLike) -> list[Path]:
    """The DICOM files of a folder (a CT or MR series is usually one file per slice):
    ``.dcm`` files, and files without an extension that start like DICOM (scanners and
    PACS exports often write names such as ``IM0001``)."""
    return sorted(
        p
        for p in Path(folder).iterdir()
        if p.is_file()
        and p.name.upper() != "DICOMDIR"  # the index of a DICOM medium, not an image
        and (_suffix(p) in DICOM_SUFFIXES or (not p.suffix and has_dicom_preamble(p)))
    )


def has_dicom_preamble(path: Path) -> bool:
    """DICOM Part 10 files carry "DICM" after a 128-byte preamble."""
    try:
        with open(path, "rb") as handle:
            return handle.read(132)[128:] == b"DICM"
    except OSError:
        return False


def pydicom_module() -> Any:
    try:
        import pydicom
    except ImportError as exc:
        raise missing_extra("Reading DICOM files", "pydicom", "dicom") from exc
    return pydicom


# Where enhanced (multi-frame) files keep what classic files hold at the top level: a
# frame's own functional group first, then the group shared by all frames.
FUNCTIONAL_GROUP = {
    "ImagePositionPatient": "PlanePositionSequence",
    "ImageOrientationPatient": "PlaneOrientationSequence",
    "PixelSpacing": "PixelMeasuresSequence",
    "SliceThickness": "PixelMeasuresSequence",
    "SpacingBetweenSlices": "PixelMeasuresSequence",
    "RescaleSlope": "PixelValueTransformationSequence",
    "RescaleIntercept": "PixelValueTransformationSequence",
}


def frame_value(dataset: Any, frame: int, keyword: str) -> Any:
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
        items = group.get(FUNCTIONAL_GROUP[keyword])
        if items and _given(items[0].get(keyword)):
            return items[0].get(keyword)
    value = dataset.get(keyword)
    return value if _given(value) else None


def _given(value: Any) -> bool:
    return value is not None and not (isinstance(value, str) and value == "")


class Frame:
    """One plane of a DICOM file, with where it lies, its pixel spacing and its rescale."""

    def __init__(self, dataset: Any, index: int, pixels: np.ndarray, path: Path, order: tuple[int, int]):
        self.dataset, self.index, self.pixels, self.order = dataset, index, pixels, order
        self.path, self.source = path, path.name
        self.sop_uid = str(dataset.get("SOPInstanceUID", ""))
        self.slope = float(frame_value(dataset, index, "RescaleSlope") or 1)
        self.intercept = float(frame_value(dataset, index, "RescaleIntercept") or 0)
        ipp = frame_value(dataset, index, "ImagePositionPatient")
        iop = frame_value(dataset, index, "ImageOrientationPatient")
        spacing = frame_value(dataset, index, "PixelSpacing")
        self.position = np.asarray(ipp, float) if ipp is not None and len(ipp) == 3 else None
        self.orientation = np.asarray(iop, float) if iop is not None and len(iop) == 6 else None
        self.spacing = tuple(float(v) for v in spacing) if spacing is not None and len(spacing) == 2 else None
        # a plane sent twice has the same instance, frame and place (a broken export may
        # give several slices one SOPInstanceUID: their positions still tell them apart)
        where = None if self.position is None else tuple(np.round(self.position, 3))
        self.uid = (self.sop_uid or f"{path}#{order[0]}", index, where)

    def values(self, as_float: bool) -> np.ndarray:
        """The plane in the modality's units (CT: Hounsfield units) when ``as_float``."""
        return (
            (self.pixels * np.float32(self.slope) + np.float32(self.intercept)) if as_float else self.pixels
        )


def decoded_pixels(dataset: Any, source: str) -> tuple[np.ndarray, dict[str, str]]:
    """A file's pixels as they are meant to be seen: palette colour as RGB, MONOCHROME1
    (where low values are white, as in many X-rays) inverted within its stored range;
    and what was changed, for the layer's metadata."""
    try:
        pixels = np.asarray(dataset.pixel_array)
    except (RuntimeError, NotImplementedError, ValueError) as exc:
        syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
        raise ValueError(
            f"{source}: cannot decode its pixels ({getattr(syntax, 'name', syntax) or 'unknown'} "
            f"transfer syntax): {exc}"
        ) from exc
    photometric = str(dataset.get("PhotometricInterpretation", ""))
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        return np.asarray(apply_color_lut(pixels, dataset)), {"converted": "PALETTE COLOR to RGB"}
    if photometric == "MONOCHROME1":
        bits = int(dataset.get("BitsStored", pixels.dtype.itemsize * 8))
        low, high = (
            (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
            if int(dataset.get("PixelRepresentation", 0))
            else (0, 2**bits - 1)
        )
        inverted = (low + high - pixels.astype(np.int64)).astype(pixels.dtype)
        return inverted, {"converted": "MONOCHROME1 inverted to MONOCHROME2 (high values bright)"}
    return pixels, {}


def frames_of(dataset: Any, path: Path, file_index: int) -> tuple[list[Frame], dict[str, str]]:
    """The planes of one file (one for a classic file, NumberOfFrames for a multi-frame
    one) and the notes of :func:`_decoded_pixels`."""
    source = path.name
    pixels, notes = decoded_pixels(dataset, source)
    count = int(dataset.get("NumberOfFrames", 1) or 1)
    per_frame = dataset.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and len(per_frame) != count:
        raise ValueError(
            f"{source}: {count} frames but {len(per_frame)} per-frame functional groups; "
            "the file is inconsistent"
        )
    planes = pixels if count > 1 else pixels[None]
    instance = dataset.get("InstanceNumber")
    instance = int(instance) if _given(instance) else file_index
    return [Frame(dataset, i, planes[i], path, (instance, i)) for i in range(count)], notes


#: SOP classes of DICOM Segmentation objects (masks that refer to another series): binary or
#: fractional, and label map
SEG_SOP_CLASSES = ("1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7")


def is_seg(dataset: Any) -> bool:
    return str(dataset.get("SOPClassUID", "")) in SEG_SOP_CLASSES


def dcmread(pydicom: Any, path: Path, **kwargs: Any) -> Any:
    try:
        return pydicom.dcmread(path, **kwargs)
    except Exception as exc:  # pydicom raises struct, EOF and its own errors for damaged files
        raise ValueError(f"{path.name}: cannot be read as DICOM ({type(exc).__name__}: {exc})") from exc


def seg_series(dataset: Any) -> set[str]:
    return {str(item.get("SeriesInstanceUID", "")) for item in dataset.get("ReferencedSeriesSequence", [])}


@dataclass
class DicomImage:
    """A DICOM image, a plane or a (Z, Y, X) stack in patient order, and what its files say:
    the pixel spacing per axis (mm; a stack without slice positions has 1 "pixel" along z)
    and ``metadata["dicom"]``, with the file, frame and SOP instance of every plane (what a
    DICOM SEG of a mask on it refers to)."""

    data: np.ndarray
    name: str
    rgb: bool
    spacing: tuple[float, ...] | None
    units: tuple[str, ...] | None
    metadata: dict[str, Any]

    @property
    def sources(self) -> list[list[Any]]:
        return self.metadata["dicom"]["sources"]


def image_from_frames(frames: list[Frame], name: str, files: int, notes: dict[str, str]) -> DicomImage:
    """DICOM planes (of one file or of a series) as one image: a plane, or a (Z, Y, X)
    stack in patient order.

    A plane sent twice (same SOPInstanceUID, frame and position) counts once. When every plane has
    a position and orientation (per frame in enhanced files), planes at distinct
    positions are sorted along the slice normal and the z spacing is the median step;
    planes that all share one position (a time series) keep their InstanceNumber and
    frame order, with no spacing along that axis. Anything else that would stack
    planes that do not form one volume is refused with a message: several positions
    repeated (time points, echoes, stacks), different orientations or pixel spacings,
    several multi-frame files without positions (ultrasound clips). Values are
    rescaled per plane (CT: Hounsfield units) when a plane gives a rescale.
    """
    frames = list({frame.uid: frame for frame in reversed(frames)}.values())[::-1]  # first copy of each
    shape = frames[0].pixels.shape
    for frame in frames:
        if frame.pixels.shape != shape:
            raise ValueError(
                f"{frame.source}: a {frame.pixels.shape} plane differs from the first plane's {shape}"
            )
    oriented = [f for f in frames if f.orientation is not None]
    if any(not np.allclose(f.orientation, oriented[0].orientation, atol=1e-3) for f in oriented):
        raise ValueError(
            f"{name}: its planes lie in different orientations (a localizer among the slices, or "
            "several views in one file); open planes that share one orientation"
        )
    if len({f.spacing for f in frames if f.spacing is not None}) > 1:
        raise ValueError(f"{name}: its planes have different pixel spacings; they do not form one volume")
    positions: list[float] | None = None
    if all(f.position is not None and f.orientation is not None for f in frames):
        normal = np.cross(frames[0].orientation[:3], frames[0].orientation[3:])
        positions = [float(np.dot(normal, f.position)) for f in frames]
    elif files > 1 and any(f.index > 0 for f in frames):
        raise ValueError(
            f"{name}: several multi-frame files without plane positions (e.g. ultrasound clips) "
            "do not form one volume; open each file on its own"
        )
    extra: dict[str, Any] = dict(notes)
    if files > 1:
        extra["files"] = files
    z: float | None = None
    distinct = len(set(np.round(positions, 3))) if positions is not None else 0
    if positions is not None and distinct == len(frames) > 1:
        order = list(np.argsort(positions, kind="stable"))
        steps = np.diff(sorted(positions))
        z = float(np.median(steps))
        if steps.max() - steps.min() > 0.01 * z:
            extra["z_steps_mm"] = [round(float(steps.min()), 4), round(float(steps.max()), 4)]
            warnings.warn(
                f"{name}: the distance between slices varies from {steps.min():.3g} to {steps.max():.3g} mm "
                f"(a missing slice?); the stack is shown at the median, {z:.3g} mm",
                stacklevel=3,
            )
    elif positions is not None and distinct > 1:
        raise ValueError(
            f"{name}: {len(frames)} planes at {distinct} positions (several time points, echoes or "
            "stacks in one series); napari-r2au opens one volume, one plane per position, at a time"
        )
    else:
        order = sorted(range(len(frames)), key=lambda i: frames[i].order)
        if positions is None and len(frames) > 1:  # no positions: what the file says, if anything
            given = frame_value(frames[0].dataset, frames[0].index, "SpacingBetweenSlices") or frame_value(
                frames[0].dataset, frames[0].index, "SliceThickness"
            )
            z = float(given) if given else None
        elif len(frames) > 1:
            extra["series"] = "time series at one position"
    frames = [frames[i] for i in order]
    rescaled = any((f.slope, f.intercept) != (1.0, 0.0) for f in frames)
    planes = [f.values(rescaled) for f in frames]
    first = frames[0]
    rgb = planes[0].shape[-1] in (3, 4) and (
        int(first.dataset.get("SamplesPerPixel", 1) or 1) in (3, 4) or "PALETTE" in notes.get("converted", "")
    )
    spacing: tuple[float, ...] | None = None
    units: tuple[str, ...] | None = None
    if first.spacing is not None:
        spacing, units = first.spacing, ("mm", "mm")  # DICOM spacings are in millimetres
        if len(frames) > 1:
            spacing = (z if z else 1.0, *first.spacing)
            units = ("mm" if z else "pixel", "mm", "mm")
    if len(frames) > 1:
        extra["frames"] = len(frames)
    # where each plane came from: what a DICOM SEG export of a mask on this image refers to
    extra["sources"] = [[str(f.path.resolve()), f.index, f.sop_uid] for f in frames]
    metadata = {
        "dicom": {
            key: str(first.dataset.get(key))
            for key in ("Modality", "SeriesDescription", "PhotometricInterpretation")
            if key in first.dataset
        }
        | extra
    }
    data = planes[0] if len(frames) == 1 else np.stack(planes)
    return DicomImage(data.astype(np.float32) if rescaled else data, name, rgb, spacing, units, metadata)


def read_dicom_file(path: Path) -> DicomImage:
    """One DICOM file: a plane, or a stack when it holds several frames."""
    dataset = dcmread(pydicom_module(), path)
    if is_seg(dataset):
        raise ValueError(
            f"{path.name} is a DICOM SEG, a mask that refers to another series: open that series "
            "here (a Review export's JSON record names it under dicom_seg), or the SEG in a "
            "DICOM viewer such as 3D Slicer or OHIF"
        )
    frames, notes = frames_of(dataset, path, 0)
    return image_from_frames(frames, path.stem, 1, notes)


def read_dicom_series(paths: Sequence[Path], name: str) -> tuple[DicomImage, list[Path]]:
    """The DICOM files of one series (one file per slice, or multi-frame files) as one
    stack, and the DICOM SEG files among them that refer to it (placed on it by
    :func:`napari_r2au.dicom_seg.place_segs`)."""
    if not paths:
        raise ValueError("no .dcm files to read")
    pydicom = pydicom_module()
    read = [(Path(p), dcmread(pydicom, Path(p))) for p in paths]
    kept = [(p, d) for p, d in read if not is_seg(d)]  # a mask saved next to its slices is not a slice
    if not kept:
        raise ValueError("only DICOM SEG files (masks) here: open the series they refer to")
    paths, datasets = [p for p, _ in kept], [d for _, d in kept]
    series = {str(d.get("SeriesInstanceUID", "")) for d in datasets}
    if len(series) > 1:
        raise ValueError(
            f"{len(paths)} DICOM files from {len(series)} different series: open one series at a time"
        )
    frames: list[Frame] = []
    notes: dict[str, str] = {}
    for index, (path, dataset) in enumerate(zip(paths, datasets)):
        file_frames, file_notes = frames_of(dataset, path, index)
        frames += file_frames
        notes |= file_notes
    image = image_from_frames(frames, name, len(paths), notes)
    return image, [path for path, dataset in read if is_seg(dataset) and series & seg_series(dataset)]
