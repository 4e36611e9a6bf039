"""napari writer for masks (Labels layers): TIFF, PNG, NIfTI with the ``nifti`` extra, and
DICOM SEG (on a DICOM image) with the ``dicom`` extra.

Files are written atomically: a failed save leaves the previous file intact.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import numpy as np

from ._reader import notify_missing_extra, suffix_of
from .io import MissingExtraError, missing_extra, write_bytes_atomic, write_png, write_tiff
from .postprocess import compact_labels


def write_labels(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """Write one Labels layer; returns the paths written (napari's single-layer writer)."""
    target = Path(path)
    suffix = suffix_of(target)
    labels = compact_labels(np.asarray(data))
    if suffix in (".tif", ".tiff"):
        write_tiff(target, labels)
    elif suffix == ".png":
        if labels.ndim != 2:
            raise ValueError(f"PNG holds one 2D mask, this one has shape {labels.shape}: save stacks as TIFF")
        if labels.dtype.itemsize > 2:
            raise ValueError("PNG holds labels up to 65535: save this mask as TIFF")
        write_png(target, labels)
    elif suffix in (".nii", ".nii.gz") or suffix == ".dcm":
        try:
            if suffix == ".dcm":
                _write_seg(target, np.asarray(data), meta)
            else:
                _write_nifti(target, labels, meta)
        except MissingExtraError as exc:  # napari's writer: said in its notifications too
            notify_missing_extra(exc)
            raise
    else:
        raise ValueError(
            f"{target.name}: masks are saved as .tif, .tiff, .png, .nii, .nii.gz or .dcm (DICOM SEG)"
        )
    return [str(target)]


def _write_nifti(path: Path, labels: np.ndarray, meta: dict[str, Any]) -> None:
    try:
        import nibabel
    except ImportError as exc:
        raise missing_extra("Writing NIfTI files", "nibabel", "nifti") from exc
    nifti = (meta.get("metadata") or {}).get("nifti") or {}
    if "affine" in nifti:  # the affine of the file the image came from
        affine = np.asarray(nifti["affine"], np.float64)
    else:  # from the layer's scale and translate, in NIfTI's reversed axis order
        affine = np.eye(4)
        n = min(3, labels.ndim)
        scale = list(meta.get("scale") or [1.0] * labels.ndim)[::-1][:n]
        translate = list(meta.get("translate") or [0.0] * labels.ndim)[::-1][:n]
        affine[range(n), range(n)] = scale
        affine[:n, 3] = translate
    image = nibabel.Nifti1Image(np.ascontiguousarray(labels.T), affine)
    image.set_data_dtype(labels.dtype)
    blob = image.to_bytes()
    write_bytes_atomic(path, gzip.compress(blob) if suffix_of(path) == ".nii.gz" else blob)


def _write_seg(path: Path, data: np.ndarray, meta: dict[str, Any]) -> None:
    from .dicom_seg import write_layer_seg

    write_layer_seg(path, data, meta.get("metadata"))
