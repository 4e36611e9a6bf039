"""napari reader: common image files; DICOM and NIfTI with the optional extras.

A mask exported by the Review widget (a TIFF with a ``napari-r2au-mask`` JSON sidecar)
opens as a Labels layer that still knows which model made it, so a corrected mask can
be reviewed or exported again later.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .dicom import (
    DICOM_SUFFIXES,
    DicomImage,
    dicom_series_files,
    read_dicom_file,
    read_dicom_series,
)
from .io import IMAGE_SUFFIXES, MissingExtraError, looks_like_mask, missing_extra, read_image
from .mask_record import read_sidecar, record_from_export, with_record

if TYPE_CHECKING:
    from .dicom_seg import DicomMask

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
    """read_layers for napari: a missing extra and the readers' warnings (a missing slice, a
    SEG that cannot be placed) are also said in napari's notifications."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            layers = read_layers(path)
        except MissingExtraError as exc:
            notify_missing_extra(exc)
            raise
    if caught:
        from napari.utils.notifications import show_warning

        for warning in caught:  # on the console as before, and in the viewer
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
            show_warning(str(warning.message))
    return layers


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


def _image_layer(image: DicomImage) -> LayerData:
    kwargs: dict[str, Any] = {"name": image.name, "rgb": image.rgb, "metadata": image.metadata}
    if image.spacing is not None:
        kwargs["scale"], kwargs["units"] = image.spacing, image.units
    return image.data, kwargs, "image"


def _mask_layer(mask: DicomMask, image: DicomImage) -> LayerData:
    """A DICOM SEG over its series as a Labels layer, which can be corrected and exported again."""
    layer: dict[str, Any] = {"name": stem_of(mask.path)}
    if image.spacing is not None:
        layer["scale"], layer["units"] = image.spacing, image.units
    layer["metadata"] = with_record({"dicom": {"sources": image.sources}}, mask.record)
    return mask.labels, layer, "labels"


def _read_dicom(path: Path) -> LayerData:
    return _image_layer(read_dicom_file(path))


def _read_dicom_series(paths: Sequence[Path], name: str, masks: bool = True) -> list[LayerData]:
    """A series and, unless ``masks`` is False, the DICOM SEG files on it as Labels layers."""
    from .dicom_seg import place_segs

    image, segs = read_dicom_series(paths, name)
    placed = place_segs(image, segs) if masks else []
    return [_image_layer(image), *(_mask_layer(mask, image) for mask in placed)]


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
