"""Masks as DICOM Segmentation objects (SEG), which PACS, OHIF and 3D Slicer show on the
series they were made from.

A mask on an image read from DICOM knows where each of its planes came from: the reader
records ``[file, frame, SOPInstanceUID]`` per plane (``metadata["dicom"]["sources"]``).
The SEG refers to those instances, so it is written only while the files are still there
and still hold the same instances. Needs the ``dicom`` extra (pydicom, highdicom).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .io import atomic_path

#: how the mask came about, in the SEG's segment descriptions
AUTOMATIC, SEMIAUTOMATIC = "AUTOMATIC", "SEMIAUTOMATIC"


def _highdicom() -> Any:
    try:
        import highdicom
    except ImportError as exc:
        from ._reader import missing_extra

        raise missing_extra("Writing DICOM SEG files", "highdicom", "dicom") from exc
    return highdicom


def dicom_sources(metadata: dict[str, Any] | None) -> list[list[Any]] | None:
    """The per-plane sources a layer's metadata carries (its own, or those of the image
    a Segment run recorded), or None for an image that did not come from DICOM."""
    metadata = metadata or {}
    for record in (metadata.get("dicom"), (metadata.get("r2au") or {}).get("dicom")):
        if isinstance(record, dict) and record.get("sources"):
            return record["sources"]
    return None


def write_dicom_seg(path: str | os.PathLike, labels: np.ndarray, sources: list[list[Any]], *,
                    model: str | None = None, model_sha256: str | None = None,
                    algorithm_type: str = AUTOMATIC, description: str | None = None) -> Path:
    """Write ``labels`` (a plane, or one plane per source) as a binary DICOM SEG, one segment
    per label value, referring to the source instances; returns the path.

    ``model`` and ``model_sha256`` name the algorithm (its version is the checksum's start);
    ``algorithm_type`` says whether a person corrected the model's mask (SEMIAUTOMATIC).
    Refused with a message, before anything is written, when the sources have moved or
    changed, or when the mask's shape is not theirs.
    """
    hd = _highdicom()
    import pydicom
    from pydicom.sr.codedict import codes

    from . import __version__

    labels = np.asarray(labels)
    planes = labels[None] if labels.ndim == 2 else labels
    if planes.ndim != 3 or len(planes) != len(sources):
        raise ValueError(f"the mask has shape {labels.shape} but its image has {len(sources)} DICOM plane(s): "
                         "a DICOM SEG needs one mask plane per image plane")
    files = list(dict.fromkeys(str(source[0]) for source in sources))
    headers = {}
    for file in files:
        if not Path(file).is_file():
            raise ValueError(f"{file}: the DICOM file this mask's image came from is gone; a DICOM SEG refers to "
                             "it, so open the series again from where it is now")
        headers[file] = pydicom.dcmread(file, stop_before_pixels=True)
    for file, _frame, uid in sources:
        if uid and str(headers[str(file)].get("SOPInstanceUID", "")) != uid:
            raise ValueError(f"{file} no longer holds the instance the image was read from ({uid})")
    first = headers[files[0]]
    if planes.shape[1:] != (int(first.Rows), int(first.Columns)):
        raise ValueError(f"the mask's planes are {planes.shape[1:]} but the DICOM images are "
                         f"{(int(first.Rows), int(first.Columns))}")
    multiframe = [f for f in files if int(headers[f].get("NumberOfFrames", 1) or 1) > 1]
    if multiframe and len(files) > 1:
        raise ValueError("a DICOM SEG refers to one multi-frame file or to single-frame files, not both")
    if multiframe:  # the SEG's frames follow the source's frame order, not the stack's
        source_images = [headers[files[0]]]
        pixel_array = np.zeros((int(first.NumberOfFrames), *planes.shape[1:]), planes.dtype)
        pixel_array[[int(frame) for _, frame, _ in sources]] = planes
    else:
        source_images = [headers[str(file)] for file, _, _ in sources]
        pixel_array = planes
    values = [int(v) for v in np.unique(pixel_array) if v != 0] or [1]
    segments = np.zeros(pixel_array.shape, np.uint16)  # SEG numbers segments 1..N
    for number, value in enumerate(values, start=1):
        segments[pixel_array == value] = number
    algorithm = hd.AlgorithmIdentificationSequence(
        name=model or "napari-r2au", version=(model_sha256 or __version__)[:16],
        family=codes.cid7162.ArtificialIntelligence)
    descriptions = [hd.seg.SegmentDescription(
        segment_number=number, segment_label=f"{model or 'mask'} label {value}"[:64],
        segmented_property_category=codes.SCT.Tissue, segmented_property_type=codes.SCT.Tissue,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues[algorithm_type], algorithm_identification=algorithm)
        for number, value in enumerate(values, start=1)]
    try:
        seg = _segmentation(hd, source_images, segments, descriptions, model, description, bool(pixel_array.any()))
    except (AttributeError, KeyError, TypeError, RuntimeError, ValueError) as exc:
        raise ValueError(f"no DICOM SEG can be made on these images ({type(exc).__name__}: {exc}); "
                         "export the mask as .tif") from exc
    target = Path(path)
    with atomic_path(target) as tmp:
        seg.save_as(tmp)
    return target


def _segmentation(hd: Any, source_images: list[Any], segments: np.ndarray, descriptions: list[Any],
                  model: str | None, description: str | None, any_mask: bool) -> Any:
    from . import __version__

    return hd.seg.Segmentation(
        source_images=source_images, pixel_array=segments if segments.max() > 1 else segments.astype(bool),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=descriptions,
        series_instance_uid=hd.UID(), series_number=900, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="napari-r2au", manufacturer_model_name=(model or "napari-r2au")[:64],
        software_versions=f"napari-r2au {__version__}", device_serial_number="none",
        content_description=(description or "")[:64] or None, omit_empty_frames=any_mask)
