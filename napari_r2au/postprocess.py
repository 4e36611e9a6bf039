"""Small mask operations the widgets apply after a prediction: clean-up, checksums, differences.

NumPy and scikit-image only; kept out of the widgets so they can be tested without Qt.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np


def _without_small(func: Callable, mask: np.ndarray, size: int) -> np.ndarray:
    """Run a scikit-image "remove small ..." function for components below ``size`` pixels."""
    try:  # scikit-image >= 0.26: max_size is inclusive
        return func(mask, max_size=size - 1)
    except TypeError:  # older scikit-image: min_size / area_threshold are exclusive
        return func(mask, size)


def clean_mask(
    mask: np.ndarray, *, min_size: int = 0, fill_holes: bool = False, hole_size: int | None = None
) -> np.ndarray:
    """Remove objects smaller than ``min_size`` pixels and fill holes smaller than ``hole_size``.

    Works plane by plane on the last two axes (stacks are segmented slice by slice, so
    their objects are 2D). Multi-label masks are returned unchanged. Returns uint8.
    """
    from skimage import morphology

    mask = np.asarray(mask)
    if mask.ndim < 2:
        raise ValueError(f"expected a 2D mask or a stack of them, got shape {mask.shape}")
    if (min_size <= 1 and not fill_holes) or mask.max(initial=0) > 1:
        return mask.astype(np.uint8, copy=False)
    hole_size = max(min_size, 1) if hole_size is None else hole_size
    out = mask.astype(bool).copy()
    planes = out.reshape(-1, *out.shape[-2:])
    for i, plane in enumerate(planes):
        if not plane.any():
            continue
        if min_size > 1:
            plane = _without_small(morphology.remove_small_objects, plane, min_size)
        if fill_holes and hole_size > 1:
            plane = _without_small(morphology.remove_small_holes, plane, hole_size)
        planes[i] = plane
    return out.astype(np.uint8)


#: elements converted to uint32 at a time when hashing (a large stack is never copied whole)
_HASH_CHUNK = 1 << 22


def _uint32_blocks(array: np.ndarray):
    """The C-order uint32 values of ``array`` in consecutive blocks along its first axes."""
    if array.ndim == 0 or array.size <= _HASH_CHUNK:
        yield np.ascontiguousarray(array, dtype=np.uint32)
        return
    per_row = max(1, array[0].size)
    if per_row > _HASH_CHUNK and array.ndim > 1:  # a single row is large: split it in turn
        for row in array:
            yield from _uint32_blocks(row)
        return
    rows = max(1, _HASH_CHUNK // per_row)
    for start in range(0, array.shape[0], rows):
        yield np.ascontiguousarray(array[start : start + rows], dtype=np.uint32)


def mask_checksum(mask: np.ndarray) -> str:
    """sha256 of a mask's values (as uint32, C order) and shape: same pixels, same checksum.

    Hashed block by block: a 64-slice 1024x1024 stack takes a third of the time that
    converting it to uint32 whole did, with no 4-bytes-per-voxel copy.
    """
    array = np.asarray(mask)
    digest = hashlib.sha256(repr(array.shape).encode())
    for block in _uint32_blocks(array):
        digest.update(block)
    return digest.hexdigest()


def mask_checksums(mask: np.ndarray) -> tuple[str, list[str] | None]:
    """:func:`mask_checksum` and :func:`slice_checksums` together, each slice converted once."""
    array = np.asarray(mask)
    if array.ndim != 3:
        return mask_checksum(array), None
    whole = hashlib.sha256(repr(array.shape).encode())
    slices = []
    for plane in array:
        digest = hashlib.sha256(repr(plane.shape).encode())
        for block in _uint32_blocks(plane):
            whole.update(block)
            digest.update(block)
        slices.append(digest.hexdigest())
    return whole.hexdigest(), slices


def slice_checksums(mask: np.ndarray) -> list[str] | None:
    """:func:`mask_checksum` of each slice of a stack (None for a 2D mask): which slices a
    person corrected, so that fine-tuning learns from those and not the model's own output."""
    return mask_checksums(mask)[1]


def edited_slices(mask: np.ndarray, recorded: list[str]) -> list[int]:
    """Slices of a stack whose checksum differs from the one recorded when it was made."""
    array = np.asarray(mask)
    if array.ndim != 3 or len(recorded) != array.shape[0]:
        raise ValueError(
            f"{len(recorded)} recorded slice checksums do not describe a mask of shape {array.shape}"
        )
    return [z for z in range(array.shape[0]) if mask_checksum(array[z]) != recorded[z]]


#: values of :func:`difference_labels`
FALSE_POSITIVE, FALSE_NEGATIVE = 1, 2


def difference_labels(predicted: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """uint8 map: 1 where predicted but not in the reference, 2 where missed, 0 elsewhere."""
    p, r = np.asarray(predicted) > 0, np.asarray(reference) > 0
    if p.shape != r.shape:
        raise ValueError(f"shapes differ: prediction {p.shape}, reference {r.shape}")
    out = np.zeros(p.shape, np.uint8)
    out[p & ~r] = FALSE_POSITIVE
    out[~p & r] = FALSE_NEGATIVE
    return out


def compact_labels(labels: np.ndarray) -> np.ndarray:
    """The smallest unsigned integer type that holds the labels (masks are 0/1: uint8)."""
    labels = np.asarray(labels)
    if labels.dtype.kind not in "biu":
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise ValueError("labels must not be negative")
    top = int(labels.max(initial=0))
    dtype = np.uint8 if top < 2**8 else np.uint16 if top < 2**16 else np.uint32 if top < 2**32 else np.uint64
    return labels.astype(dtype, copy=False)


#: clean-up steps a model file may ask for in its "postprocess" list
MODEL_STEPS = ("largest_component", "fill_holes")


def keep_largest_component(mask: np.ndarray) -> np.ndarray:
    """Only the largest connected object of each plane (lesions are one blob)."""
    from scipy import ndimage

    out = np.asarray(mask).astype(bool).copy()
    planes = out.reshape(-1, *out.shape[-2:])
    for i, plane in enumerate(planes):
        labels, count = ndimage.label(plane)
        if count > 1:
            sizes = ndimage.sum_labels(plane, labels, range(1, count + 1))
            planes[i] = labels == int(np.argmax(sizes)) + 1
    return out.astype(np.uint8)


def apply_model_postprocess(mask: np.ndarray, steps: list[str] | tuple[str, ...]) -> np.ndarray:
    """The clean-up a model file asks for, in order (see MODEL_STEPS)."""
    unknown = [s for s in steps if s not in MODEL_STEPS]
    if unknown:
        raise ValueError(f"unknown post-processing {unknown}; valid: {', '.join(MODEL_STEPS)}")
    for step in steps:
        if step == "largest_component":
            mask = keep_largest_component(mask)
        elif step == "fill_holes":  # every hole, however large (not regions touching the border)
            from scipy import ndimage

            planes = np.asarray(mask).astype(bool).reshape(-1, *mask.shape[-2:])
            mask = (
                np.stack([ndimage.binary_fill_holes(p) for p in planes]).reshape(mask.shape).astype(np.uint8)
            )
    return mask


def apply_cleanup(mask: np.ndarray, cleanup: dict | None) -> np.ndarray:
    """Segment's clean-up settings (``{"remove_small_objects", "fill_holes", "size"}``, as its
    masks record them) applied to a mask: one implementation for the dock and for rebuilding."""
    cleanup = cleanup or {}
    size = int(cleanup.get("size") or 0)
    return clean_mask(
        mask,
        min_size=size if cleanup.get("remove_small_objects") else 0,
        fill_holes=bool(cleanup.get("fill_holes")),
        hole_size=size,
    )


def segment_mask(
    probabilities: np.ndarray,
    threshold: float,
    postprocess: list[str] | None = None,
    cleanup: dict | None = None,
) -> np.ndarray:
    """What Segment makes of binary probabilities: above the threshold, the model's own steps,
    then the dock's clean-up (uint8)."""
    labels = np.greater(np.asarray(probabilities), float(threshold)).view(
        np.uint8
    )  # bool as 0/1 bytes: no copy
    if postprocess:
        labels = apply_model_postprocess(labels, postprocess)
    return apply_cleanup(labels, cleanup)


def rebuild_segment_mask(probabilities: np.ndarray, record: dict) -> np.ndarray | None:
    """The mask Segment made from ``probabilities`` with the settings its record keeps
    (threshold, the model's steps, clean-up), or None when the result does not match the
    recorded checksum: then it is not the mask Segment made, and nothing is guessed."""
    threshold, recorded = record.get("threshold"), record.get("mask_sha256")
    if threshold is None or not recorded:
        return None
    mask = segment_mask(probabilities, threshold, record.get("postprocess"), record.get("cleanup"))
    return mask if mask_checksum(mask) == recorded else None
