"""DICOM files read with pydicom (the ``dicom`` extra): which files of a folder are DICOM,
and each file's planes, pixel values and geometry, decoded once for the napari reader, the
command line, the trainer and DICOM SEG export alike. Nothing here builds napari layers.
"""

from __future__ import annotations

import os
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
