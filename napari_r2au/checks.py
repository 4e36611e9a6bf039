"""Checks before work starts, in one place for the CLI and the docks: what the user should
know about this model on this image, or this mask as a correction. Notices, not refusals:
what cannot work at all is refused where it fails (the engine, the trainer)."""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np

#: a fixed input window reaching this low is a window in Hounsfield units (air is -1000 HU)
HU_WINDOW_BELOW = -100.0


def input_notices(model: Any, image: Any, axes: str | None = None) -> list[str]:
    """What the user should know before a model runs on an image, cheaply told: channels
    the engine converts (grey to RGB, RGB to grey) and pixels that cannot be what the
    model expects (an 8-bit screenshot for a CT model that reads Hounsfield units).

    One place for the CLI and the docks. Nothing here refuses: a mismatch that cannot
    be converted is refused by the engine itself (:func:`napari_r2au.preprocess.match_channels`).
    """
    # a model file's metadata is enough (the docks have it before the model is loaded)
    from .engine import _as_loaded, resolve_axes

    meta = model if isinstance(model, dict) else _as_loaded(model).metadata
    name, want = meta.get("name", "the model"), int(meta.get("in_channels", 3))
    notices: list[str] = []
    axes = resolve_axes(image.shape, want, axes)
    have = image.shape[axes.index("C")] if "C" in axes else 1
    if have == 1 and want == 3:
        notices.append(
            f"{name} was trained on colour images; this grey image is given to it as RGB "
            "(three equal channels), which it may not have seen"
        )
    elif have in (3, 4) and want == 1:
        notices.append(f"{name} was trained on single-channel images; this colour image is averaged to grey")
    if meta.get("fov_diameter"):
        from .engine import image_plane
        from .preprocess import derived_working_scale

        if derived_working_scale(image_plane(image, want, axes), meta["fov_diameter"]) is None:
            notices.append(
                f"{name} finds the scale of fundus photographs from their round field of view, and "
                "this image shows none: it runs at the model's own scale (type a Scale to override)"
            )
    spec = meta.get("normalization") or {}
    if spec.get("kind") == "scale" and float(spec.get("min", 0.0)) <= HU_WINDOW_BELOW:
        kind = np.dtype(image.dtype)
        sample = np.asarray(image[tuple(slice(None, None, max(1, n // 64)) for n in image.shape)])
        low = float(sample.min()) if sample.size else 0.0
        if (kind.kind == "u" and kind.itemsize == 1) or low >= 0:
            notices.append(
                f"{name} reads CT values in Hounsfield units (window {spec.get('min'):g} to "
                f"{spec.get('max'):g}), but this image has no negative values ({image.dtype}): an "
                "8-bit screenshot or an image without its rescale; open the DICOM series instead"
            )
    return notices


#: a corrected mask whose foreground covers more than this share of the image looks inverted
INVERTED_SHARE = 0.5


def mask_notices(labels: Any, name: str = "the mask") -> list[str]:
    """What looks wrong in a mask given as corrections: foreground over most of the image
    (inverted: a label file that marks the background, such as ISBI 2012's 255 = cell
    interior), or values that are no labels (a picture, a probability map)."""
    mask = np.asarray(labels)
    sample = mask[tuple(slice(None, None, max(1, n // 512)) for n in mask.shape)]
    notices = []
    if mask.dtype.kind == "f" and not np.all(np.mod(sample, 1) == 0):
        return [f"{name} holds fractional values: a probability map or a picture, not a mask of labels"]
    values = np.unique(sample)
    if values.size > 16:
        notices.append(f"{name} has {values.size} different values: a picture rather than a mask of labels?")
    share = float(np.count_nonzero(sample)) / max(1, sample.size)
    if share > INVERTED_SHARE:
        notices.append(
            f"{share:.0%} of {name} is foreground: is it inverted (marking the background)? "
            "Fine-tuning would teach the model the opposite"
        )
    return notices


def correction_notices(meta: dict[str, Any] | None, image: Any, labels: Any, name: str) -> list[str]:
    """Everything worth saying before a fine-tune on one (image, corrected mask) pair:
    the base model on this image (``meta``: its model file's metadata, or None), then the
    mask. An image the engine cannot read at all is left to the fine-tune to refuse."""
    notices = []
    if meta is not None:
        with contextlib.suppress(ValueError):
            notices += input_notices(meta, image)
    return notices + mask_notices(labels, name)
