"""napari writer for masks (Labels layers): TIFF, PNG, NIfTI with the ``nifti`` extra, and
DICOM SEG (on a DICOM image) with the ``dicom`` extra.

Files are written atomically: a failed save leaves the previous file intact.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import numpy as np

from ._reader import missing_extra, suffix_of
from .io import write_bytes_atomic, write_png, write_tiff
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
    elif suffix in (".nii", ".nii.gz"):
        _write_nifti(target, labels, meta)
    elif suffix == ".dcm":
        _write_seg(target, np.asarray(data), meta)
    else:
        raise ValueError(f"{target.name}: masks are saved as .tif, .tiff, .png, .nii, .nii.gz or .dcm (DICOM SEG)")
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
    """A DICOM SEG of the mask on the DICOM planes its image came from; AUTOMATIC while the
    mask is the model's own, SEMIAUTOMATIC once edited, MANUAL without a model."""
    from .dicom_seg import AUTOMATIC, SEMIAUTOMATIC, dicom_sources, planes_with_results, write_dicom_seg
    from .postprocess import mask_checksum

    metadata = meta.get("metadata") or {}
    sources = dicom_sources(metadata)
    if sources is None:
        raise ValueError("a DICOM SEG refers to the DICOM images it was drawn on: this mask was not made on an "
                         "image opened from DICOM files; save it as .tif, .png or .nii.gz")
    info = metadata.get("r2au") or {}
    recorded = info.get("mask_sha256")
    edited = recorded is None or mask_checksum(data) != recorded
    write_dicom_seg(path, compact_labels(data), sources, model=info.get("model"), model_sha256=info.get("model_sha256"),
                    algorithm_type=SEMIAUTOMATIC if edited else AUTOMATIC, planes=planes_with_results(data, info),
                    algorithm_version=info.get("algorithm_version"))
