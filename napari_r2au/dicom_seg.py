"""Masks as DICOM Segmentation objects (SEG), which PACS, OHIF and 3D Slicer show on the
series they were made from.

A mask on an image read from DICOM knows where each of its planes came from: the reader
records ``[file, frame, SOPInstanceUID]`` per plane (``metadata["dicom"]["sources"]``).
The SEG refers to those instances, so it is written only while the files are still there
and still hold the same instances. Needs the ``dicom`` extra (pydicom, highdicom).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from .dicom import DicomImage, dcmread, pydicom_module
from .io import atomic_path
from .mask_record import layer_record

#: how the mask came about, in the SEG's segment descriptions
AUTOMATIC, SEMIAUTOMATIC, MANUAL = "AUTOMATIC", "SEMIAUTOMATIC", "MANUAL"
#: a binary SEG numbers its segments with 16 bits
MAX_SEGMENTS = 65535


class WrittenSeg(NamedTuple):
    """Where the SEG went and the identifiers that tie it to its source series."""

    path: Path
    sop_instance_uid: str
    series_instance_uid: str
    source_series_instance_uid: str


def _highdicom() -> Any:
    try:
        import highdicom
    except ImportError as exc:
        from .io import missing_extra

        raise missing_extra("Writing DICOM SEG files", "highdicom", "dicom") from exc
    return highdicom


def dicom_sources(metadata: dict[str, Any] | None) -> list[list[Any]] | None:
    """The per-plane sources a layer's metadata carries (its own, or those of the image
    a Segment run recorded), or None for an image that did not come from DICOM."""
    metadata = metadata or {}
    for record in (metadata.get("dicom"), layer_record(metadata).get("dicom")):
        if isinstance(record, dict) and record.get("sources"):
            return record["sources"]
    return None


def planes_with_results(labels: np.ndarray, info: dict[str, Any]) -> list[int] | None:
    """The planes of a stack that hold a result: the slices a Segment run covered and those
    a person edited since; None for all (a 2D mask, or a run over every slice).

    A SEG cannot say "not segmented", so the other planes are left out of it rather than
    passed off as empty.
    """
    from .postprocess import edited_slices

    if np.ndim(labels) != 3 or info.get("slices") is None:
        return None
    recorded = info.get("slice_sha256") or info.get("seg_slice_sha256")  # a Segment run's, or a SEG's as read
    edited = edited_slices(labels, recorded) if recorded else []
    return sorted({int(z) for z in info["slices"]} | set(edited))


def write_layer_seg(path: str | os.PathLike, data: np.ndarray, metadata: dict[str, Any] | None) -> WrittenSeg:
    """A Labels layer's mask as a DICOM SEG on the DICOM planes its image came from:
    AUTOMATIC while it is the model's own mask (per the recorded checksum), SEMIAUTOMATIC
    once edited, MANUAL without a model; only the planes with results (see
    :func:`planes_with_results`). What Review's export and napari's writer both call."""
    from .postprocess import compact_labels, mask_checksum

    metadata = metadata or {}
    sources = dicom_sources(metadata)
    if sources is None:
        raise ValueError(
            "a DICOM SEG refers to the DICOM images it was drawn on: this mask was not made on an "
            "image opened from DICOM files; save it in another format, a .tif for example"
        )
    data = np.asarray(data)
    info = layer_record(metadata)
    recorded = info.get("mask_sha256")
    edited = recorded is None or mask_checksum(data) != recorded
    return write_dicom_seg(
        path,
        compact_labels(data),
        sources,
        model=info.get("model"),
        model_sha256=info.get("model_sha256"),
        segment_property=info.get("segment_property"),
        algorithm_type=SEMIAUTOMATIC if edited else AUTOMATIC,
        planes=planes_with_results(data, info),
        algorithm_version=info.get("algorithm_version"),
    )


def write_dicom_seg(
    path: str | os.PathLike,
    labels: np.ndarray,
    sources: list[list[Any]],
    *,
    model: str | None = None,
    model_sha256: str | None = None,
    algorithm_type: str = AUTOMATIC,
    planes: list[int] | None = None,
    algorithm_version: str | None = None,
    segment_property: dict[str, Any] | None = None,
) -> WrittenSeg:
    """Write ``labels`` (a plane, or one plane per source) as a binary DICOM SEG, one segment
    per label value, referring to the source instances.

    ``model`` and ``model_sha256`` name the algorithm (its version is the checksum's start,
    else ``algorithm_version``, as read from an earlier SEG);
    without a model the mask counts as drawn by hand (MANUAL). ``algorithm_type`` says
    whether a person corrected the model's mask (SEMIAUTOMATIC). ``planes`` limits the SEG
    to those planes of a stack (see :func:`planes_with_results`). ``segment_property`` (a
    model's, see model_files.check_segment_property) codes what the segments are; without
    it, the generic "Tissue". Refused with a message,
    before anything is written, when the sources have moved or changed, when the mask's
    shape is not theirs, or when highdicom cannot describe these images in a SEG.
    """

    hd = _highdicom()
    pydicom = pydicom_module()

    labels = np.asarray(labels)
    stack = labels[None] if labels.ndim == 2 else labels
    if stack.ndim != 3 or len(stack) != len(sources):
        raise ValueError(
            f"the mask has shape {labels.shape} but its image has {len(sources)} DICOM plane(s): "
            "a DICOM SEG needs one mask plane per image plane"
        )
    if planes is not None:
        if not planes:
            raise ValueError("no slice of this stack holds a result: nothing to write")
        stack, sources = stack[planes], [sources[z] for z in planes]
    keys = [(str(uid), int(frame)) for _, frame, uid in sources]
    if len(set(keys)) < len(keys):
        raise ValueError(
            "several planes of this image share one SOPInstanceUID and frame: a DICOM SEG could not "
            "tell them apart"
        )
    files = list(dict.fromkeys(str(source[0]) for source in sources))
    headers = {}
    for file in files:
        if not Path(file).is_file():
            raise ValueError(
                f"{file}: the DICOM file this mask's image came from is gone; a DICOM SEG refers to "
                "it, so open the series again from where it is now"
            )
        try:
            headers[file] = dcmread(pydicom, Path(file), stop_before_pixels=True)
        except ValueError as exc:
            raise ValueError(f"{file} is no longer the DICOM file the image was read from: {exc}") from exc
    for file, _frame, uid in sources:
        if uid and str(headers[str(file)].get("SOPInstanceUID", "")) != uid:
            raise ValueError(f"{file} no longer holds the instance the image was read from ({uid})")
    first = headers[files[0]]
    if stack.shape[1:] != (int(first.Rows), int(first.Columns)):
        raise ValueError(
            f"the mask's planes are {stack.shape[1:]} but the DICOM images are "
            f"{(int(first.Rows), int(first.Columns))}"
        )
    multiframe = [f for f in files if int(headers[f].get("NumberOfFrames", 1) or 1) > 1]
    if multiframe and len(files) > 1:
        raise ValueError("a DICOM SEG refers to one multi-frame file or to single-frame files, not both")
    values, numbers = np.unique(stack, return_inverse=True)  # label values -> segments 1..N
    foreground = [int(v) for v in values if v != 0]
    if len(foreground) > MAX_SEGMENTS:
        raise ValueError(f"the mask has {len(foreground)} labels; a DICOM SEG holds at most {MAX_SEGMENTS}")
    segments = (numbers.reshape(stack.shape) + (0 if values[0] == 0 else 1)).astype(np.uint16)
    if multiframe:  # the SEG's frames follow the source's frame order, not the stack's
        source_images = [first]
        pixel_array = np.zeros((int(first.NumberOfFrames), *stack.shape[1:]), np.uint16)
        pixel_array[[int(frame) for _, frame, _ in sources]] = segments
    else:
        source_images = [headers[str(file)] for file, _, _ in sources]
        pixel_array = segments
    try:
        seg = _segmentation(
            hd,
            source_images,
            pixel_array,
            foreground or [1],
            model,
            model_sha256 or algorithm_version,
            MANUAL if model is None else algorithm_type,
            segment_property,
        )
        hd.seg.Segmentation.from_dataset(seg, copy=True)  # what a reader will make of it
    except (AttributeError, KeyError, TypeError, RuntimeError, ValueError) as exc:
        raise ValueError(
            f"no DICOM SEG can be made on these images ({type(exc).__name__}: {exc}); export the mask as .tif"
        ) from exc
    target = Path(path)
    with atomic_path(target) as tmp:
        seg.save_as(tmp)
    return WrittenSeg(
        target, str(seg.SOPInstanceUID), str(seg.SeriesInstanceUID), str(first.get("SeriesInstanceUID", ""))
    )


def _segmentation(
    hd: Any,
    source_images: list[Any],
    pixel_array: np.ndarray,
    values: list[int],
    model: str | None,
    version: str | None,
    algorithm_type: str,
    segment_property: dict[str, Any] | None = None,
) -> Any:
    from pydicom.sr.codedict import codes

    category, kind = codes.SCT.Tissue, codes.SCT.Tissue  # what the model does not say
    if segment_property:
        category, kind = (
            hd.sr.CodedConcept(value=code["value"], scheme_designator=code["scheme"], meaning=code["meaning"])
            for code in (segment_property["category"], segment_property["type"])
        )

    from . import __version__

    algorithm = (
        None
        if algorithm_type == MANUAL
        else hd.AlgorithmIdentificationSequence(
            name=model or "napari-r2au",
            version=(version or __version__)[:16],
            family=codes.cid7162.ArtificialIntelligence,
        )
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=f"{model or 'mask'} label {value}"[:64],
            segmented_property_category=category,
            segmented_property_type=kind,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues[algorithm_type],
            algorithm_identification=algorithm,
        )
        for number, value in enumerate(values, start=1)
    ]
    first = source_images[0]
    extra: dict[str, Any] = {}
    spacing = first.get("PixelSpacing")
    if (
        spacing is not None
        and not first.get("SliceThickness")
        and "SharedFunctionalGroupsSequence" not in first
    ):
        # a photograph or screen capture gives a pixel spacing but no slice thickness, which
        # the SEG's pixel measures require: a nominal one, the mean pixel spacing
        spacing = [float(v) for v in spacing]
        extra["pixel_measures"] = hd.PixelMeasuresSequence(
            pixel_spacing=spacing, slice_thickness=float(np.mean(spacing))
        )
    seg = hd.seg.Segmentation(
        source_images=source_images,
        pixel_array=pixel_array if len(values) > 1 else pixel_array.astype(bool),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=900,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="napari-r2au",
        manufacturer_model_name=(model or "napari-r2au")[:64],
        software_versions=f"napari-r2au {__version__}",
        device_serial_number="none",
        omit_empty_frames=bool(pixel_array.any()),
        **extra,
    )
    seg.SeriesDescription = f"napari-r2au mask ({model})"[:64] if model else "napari-r2au mask"
    return seg


class PlacedSeg(NamedTuple):
    """A DICOM SEG placed on an image's planes, with what it says about how it was made."""

    labels: np.ndarray
    planes: list[int]  # the planes the SEG refers to
    algorithm_type: str  # AUTOMATIC, SEMIAUTOMATIC or MANUAL (the first segment's)
    algorithm_name: str | None
    algorithm_version: str | None
    overlaps: bool  # segments overlapped: the highest number was kept where they do


def read_dicom_seg(path: str | os.PathLike, sources: list[list[Any]], shape: tuple[int, ...]) -> PlacedSeg:
    """The segments of a DICOM SEG placed on the planes ``sources`` describes (the image's
    reading order): uint16 labels of ``shape`` (segment numbers; 0 outside every segment,
    and on planes the SEG does not refer to). Frames of multi-frame sources are looked up
    by frame number, single-frame sources by instance."""
    hd = _highdicom()
    try:
        seg = hd.seg.segread(path)
        labels = np.zeros((len(sources), *shape[-2:]), np.uint16)
        referenced = {
            str(item.ReferencedSOPInstanceUID)
            for series in seg.ReferencedSeriesSequence
            for item in series.ReferencedInstanceSequence
        }
        by_uid: dict[str, list[int]] = {}
        for z, (_, _, uid) in enumerate(sources):
            by_uid.setdefault(str(uid), []).append(z)
        multiframe = {uid for uid, zs in by_uid.items() if len(zs) > 1 or any(int(sources[z][1]) for z in zs)}
        overlaps = False

        def combined(get: Any, *args: Any, **kwargs: Any) -> np.ndarray:
            nonlocal overlaps
            try:
                return get(*args, combine_segments=True, **kwargs)
            except RuntimeError as exc:
                if "overlap" not in str(exc).lower():
                    raise
                overlaps = True
                return get(*args, combine_segments=True, skip_overlap_checks=True, **kwargs)

        planes: list[int] = []
        for uid in sorted(multiframe & referenced):
            zs = by_uid[uid]
            labels[zs] = combined(
                seg.get_pixels_by_source_frame,
                uid,
                [int(sources[z][1]) + 1 for z in zs],
                assert_missing_frames_are_empty=True,
            )
            planes += zs
        single = [z for uid in sorted(referenced - multiframe) for z in by_uid.get(uid, [])]
        if single:
            labels[single] = combined(seg.get_pixels_by_source_instance, [str(sources[z][2]) for z in single])
            planes += single
        first = seg.SegmentSequence[0]
        algorithm = (first.get("SegmentationAlgorithmIdentificationSequence") or [None])[0]
    except (AttributeError, KeyError, TypeError, RuntimeError, ValueError, IndexError) as exc:
        raise ValueError(f"{Path(path).name}: cannot place this DICOM SEG on its series ({exc})") from exc
    if not planes:
        raise ValueError(f"{Path(path).name}: it refers to none of the planes opened")
    return PlacedSeg(
        labels if len(shape) == 3 else labels[0],
        sorted(planes),
        str(first.get("SegmentAlgorithmType", MANUAL)),
        None if algorithm is None else str(algorithm.get("AlgorithmName", "")) or None,
        None if algorithm is None else str(algorithm.get("AlgorithmVersion", "")) or None,
        overlaps,
    )


@dataclass
class DicomMask:
    """A DICOM SEG placed on the series it refers to: segment numbers as labels, and what
    the SEG says of itself (``record``: mask-record keys, the planes it covers, the
    algorithm, and for a model's own mask the checksums a correction is told apart by)."""

    labels: np.ndarray
    name: str
    record: dict[str, Any]
    path: Path


def place_segs(image: DicomImage, paths: Sequence[Path]) -> list[DicomMask]:
    """The DICOM SEG files that refer to ``image``'s series, each placed on it. A SEG that
    cannot be placed is skipped with a warning: whatever a SEG from elsewhere holds, the
    image still opens."""
    placed = []
    for path in paths:
        try:
            placed.append(_seg_mask(Path(path), image))
        except Exception as exc:
            warnings.warn(f"{Path(path).name}: a DICOM SEG on this series, not shown: {exc}", stacklevel=2)
    return placed


def _seg_mask(path: Path, image: DicomImage) -> DicomMask:
    """A DICOM SEG on the series ``image`` was read from, placed on it (segment numbers as
    labels), so that it can be corrected and exported as a SEG again.

    The layer keeps what the SEG says: the planes it covers (a re-export covers those,
    plus any edited), the algorithm, and for a model's own (AUTOMATIC) mask the checksums
    that tell a later correction apart, as for a mask Segment made.
    """
    from .postprocess import mask_checksums

    data = image.data
    placed = read_dicom_seg(path, image.sources, data.shape[:-1] if image.rgb else data.shape)
    if placed.overlaps:
        warnings.warn(
            f"{path.name}: its segments overlap; where they do, the highest segment number is shown",
            stacklevel=3,
        )
    info: dict[str, Any] = {
        "model": placed.algorithm_name,
        "algorithm_version": placed.algorithm_version,
        "algorithm_type": placed.algorithm_type,
        "dicom_seg_file": str(path),
    }
    whole, slices = mask_checksums(placed.labels)
    if placed.labels.ndim == 3:
        info["slices"] = placed.planes
        info["seg_slice_sha256"] = slices  # which planes a re-export must add (edited since)
    if placed.algorithm_type == AUTOMATIC:  # the model's own output: what a correction is told apart from
        info["mask_sha256"], info["slice_sha256"] = whole, slices
    return DicomMask(placed.labels, Path(path).stem, info, Path(path))
