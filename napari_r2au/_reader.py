"""napari reader: common image files; DICOM and NIfTI with the optional extras.

A mask exported by the Review widget (a TIFF with a ``napari-r2au-mask`` JSON sidecar)
opens as a Labels layer that still knows which model made it, so a corrected mask can
be reviewed or exported again later.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .dicom import (
    DICOM_SUFFIXES,
    Frame,
    dcmread,
    dicom_series_files,
    frame_value,
    frames_of,
    is_seg,
    pydicom_module,
    seg_series,
)
from .io import IMAGE_SUFFIXES, MissingExtraError, looks_like_mask, missing_extra, read_image
from .mask_record import read_sidecar, record_from_export, with_record

LayerData = tuple[Any, dict[str, Any], str]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
SUFFIXES = IMAGE_SUFFIXES + DICOM_SUFFIXES + NIFTI_SUFFIXES


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
        return _napari_read if dicom_series_files(paths[0]) else None
    if not paths or any(suffix_of(p) not in SUFFIXES for p in paths):
        return None
    return _napari_read


def _napari_read(path: str | Sequence[str]) -> list[LayerData]:
    """read_layers for napari: a missing extra is also said in napari's notifications."""
    try:
        return read_layers(path)
    except MissingExtraError as exc:
        notify_missing_extra(exc)
        raise


def read_layers(path: str | Sequence[str], masks: bool = True) -> list[LayerData]:
    """Layer data for each file; a folder of DICOM files, or several DICOM files opened
    together (napari's "Open Files as Stack"), is one series: one 3D layer, plus a Labels
    layer for each DICOM SEG among them that refers to that series (``masks=False``: the
    series only, without decoding the SEGs)."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if len(paths) == 1 and Path(paths[0]).is_dir():
        return _read_dicom_series(dicom_series_files(paths[0]), Path(paths[0]).name, masks)
    if len(paths) > 1 and all(suffix_of(p) in DICOM_SUFFIXES for p in paths):
        return _read_dicom_series([Path(p) for p in paths], Path(paths[0]).parent.name or "series", masks)
    return [read_file(p) for p in paths]


def read_file(path: str | os.PathLike) -> LayerData:
    path = Path(path)
    suffix = suffix_of(path)
    if suffix in DICOM_SUFFIXES:
        return _read_dicom(path)
    if suffix in NIFTI_SUFFIXES:
        return _read_nifti(path)
    data = read_image(path)
    record = read_sidecar(path)
    if record is not None:
        return data, _mask_kwargs(path, record), "labels"
    if looks_like_mask(path, data):  # a manual mask (DRIVE's 21_manual1.gif): a reference for Review
        return data, {"name": path.stem}, "labels"
    rgb = data.ndim >= 3 and data.shape[-1] in (3, 4)
    return data, {"name": path.stem, "rgb": rgb}, "image"


def read_input(path: str | os.PathLike) -> tuple[Any, float | None, str | None, str | None, dict[str, Any]]:
    """An input image, its pixel size (DICOM and NIfTI files carry one), its axes when
    the file says (a volume: "ZYX") and the reader's metadata (a DICOM image's sources),
    read the way the napari reader reads it: a folder of DICOM slices is one stack."""
    from .io import pixel_size_of

    path = Path(path)
    data, kwargs, _ = read_layers(str(path), masks=False)[0] if path.is_dir() else read_file(path)
    size, unit = pixel_size_of(kwargs.get("scale"), kwargs.get("units"), path.name)
    medical = path.is_dir() or suffix_of(path) in DICOM_SUFFIXES + NIFTI_SUFFIXES
    # a 3-slice volume would otherwise pass for a 3-channel image
    axes = "ZYX" if medical and data.ndim == 3 and not kwargs.get("rgb") else None
    return data, size, unit, axes, kwargs.get("metadata") or {}


def notify_missing_extra(exc: MissingExtraError) -> None:
    """Show a missing extra in napari (the reader's and writer's entry points call this; the
    command line and the trainer only raise)."""
    from napari.utils.notifications import show_error

    show_error(str(exc))


# -- masks exported by the Review widget ---------------------------------------------------


def _mask_kwargs(path: Path, record: dict[str, Any]) -> dict[str, Any]:
    info = record_from_export(record)
    kwargs: dict[str, Any] = {"name": path.stem, "metadata": {**with_record({}, info), "r2au_export": record}}
    for key in ("scale", "translate"):
        if record.get(key):
            kwargs[key] = tuple(record[key])
    return kwargs


# -- optional formats ----------------------------------------------------------------------


def _read_dicom_frames(frames: list[Frame], name: str, files: int, notes: dict[str, str]) -> LayerData:
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
            _warn(
                f"{name}: the distance between slices varies from {steps.min():.3g} to {steps.max():.3g} mm "
                f"(a missing slice?); the stack is shown at the median, {z:.3g} mm"
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
    kwargs: dict[str, Any] = {"name": name, "rgb": rgb}
    if first.spacing is not None:
        kwargs["scale"], kwargs["units"] = first.spacing, ("mm", "mm")  # DICOM spacings are in millimetres
        if len(frames) > 1:
            kwargs["scale"] = (z if z else 1.0, *first.spacing)
            kwargs["units"] = ("mm" if z else "pixel", "mm", "mm")
    if len(frames) > 1:
        extra["frames"] = len(frames)
    # where each plane came from: what a DICOM SEG export of a mask on this image refers to
    extra["sources"] = [[str(f.path.resolve()), f.index, f.sop_uid] for f in frames]
    kwargs["metadata"] = {
        "dicom": {
            key: str(first.dataset.get(key))
            for key in ("Modality", "SeriesDescription", "PhotometricInterpretation")
            if key in first.dataset
        }
        | extra
    }
    data = planes[0] if len(frames) == 1 else np.stack(planes)
    return data.astype(np.float32) if rescaled else data, kwargs, "image"


def _warn(message: str) -> None:
    """A Python warning (seen on the command line and in training logs) and, when a napari
    viewer is open, a notification there."""
    import sys
    import warnings

    warnings.warn(message, stacklevel=3)
    napari = sys.modules.get("napari")  # never imported just to warn: the CLI and trainer stay light
    if napari is not None and napari.current_viewer() is not None:
        from napari.utils.notifications import show_warning

        show_warning(message)


def _read_dicom(path: Path) -> LayerData:
    """One DICOM file: a plane, or a stack when it holds several frames."""
    dataset = dcmread(pydicom_module(), path)
    if is_seg(dataset):
        raise ValueError(
            f"{path.name} is a DICOM SEG, a mask that refers to another series: open that series "
            "here (a Review export's JSON record names it under dicom_seg), or the SEG in a "
            "DICOM viewer such as 3D Slicer or OHIF"
        )
    frames, notes = frames_of(dataset, path, 0)
    return _read_dicom_frames(frames, path.stem, 1, notes)


def _read_dicom_series(paths: Sequence[Path], name: str, masks: bool = True) -> list[LayerData]:
    """The DICOM files of one series (one file per slice, or multi-frame files) as one
    stack, and the DICOM SEG files among them that refer to it as Labels layers."""
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
    image = _read_dicom_frames(frames, name, len(paths), notes)
    layers = [image]
    for path, dataset in read if masks else ():
        if is_seg(dataset) and series & seg_series(dataset):
            try:
                layers.append(_seg_layer(path, image))
            except Exception as exc:  # whatever a SEG from elsewhere holds, the image still opens
                _warn(f"{path.name}: a DICOM SEG on this series, not shown: {exc}")
    return layers


def _seg_layer(path: Path, image: LayerData) -> LayerData:
    """A DICOM SEG on the series ``image`` was read from, as a Labels layer over it (segment
    numbers as labels), which can be corrected and exported as a SEG again.

    The layer keeps what the SEG says: the planes it covers (a re-export covers those,
    plus any edited), the algorithm, and for a model's own (AUTOMATIC) mask the checksums
    that tell a later correction apart, as for a mask Segment made.
    """
    from .dicom_seg import AUTOMATIC, read_dicom_seg
    from .postprocess import mask_checksums

    data, kwargs, _ = image
    sources = kwargs["metadata"]["dicom"]["sources"]
    placed = read_dicom_seg(path, sources, data.shape[:-1] if kwargs.get("rgb") else data.shape)
    if placed.overlaps:
        _warn(f"{path.name}: its segments overlap; where they do, the highest segment number is shown")
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
    layer = {key: kwargs[key] for key in ("scale", "units") if key in kwargs}
    layer["name"] = stem_of(path)
    layer["metadata"] = with_record({"dicom": {"sources": sources}}, info)
    return placed.labels, layer, "labels"


def _read_nifti(path: Path) -> LayerData:
    try:
        import nibabel
    except ImportError as exc:
        raise missing_extra("Reading NIfTI files", "nibabel", "nifti") from exc
    from .io import ImageReadError, check_size

    try:
        image = nibabel.load(str(path))
        check_size(path, image.header.get_data_shape())  # the header's shape, before the voxels are read
        # NIfTI stores (x, y, z[, t]); napari shows the last axes as (y, x): reverse them
        data = np.asarray(image.dataobj).T
    except ImageReadError:
        raise
    except Exception as exc:  # nibabel raises several types; some (MemoryError, EOFError) say nothing
        raise ImageReadError(
            f"{path}: cannot be read as NIfTI ({type(exc).__name__}: "
            f"{exc or 'the file is damaged or truncated'})"
        ) from exc
    zooms = [float(z) for z in image.header.get_zooms()[: data.ndim]][::-1]
    metadata = {"nifti": {"affine": np.asarray(image.affine).tolist(), "axes": "reversed"}}
    kwargs: dict[str, Any] = {"name": stem_of(path), "scale": tuple(zooms), "metadata": metadata}
    space_unit = image.header.get_xyzt_units()[0]  # "mm", "micron", "meter" or "unknown"
    unit = {"mm": "mm", "micron": "um", "meter": "m"}.get(space_unit)
    if unit is not None:
        kwargs["units"] = (unit,) * len(zooms)
    return data, kwargs, "image"
