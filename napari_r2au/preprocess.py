"""Input normalization and channel handling shared by the trainer and the engine.

The normalization a model was trained with is recorded in its model file, and the
engine applies exactly that: one implementation, used on both sides.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: default spec: per-image, per-channel z-score
STANDARDIZE: dict[str, Any] = {"kind": "standardize"}

#: every normalization kind a model file may name
KINDS = ("standardize", "scale", "clahe")

#: CLAHE defaults: the contrast clip limit and the context window in pixels as the network
#: sees them (a fixed size, so that a large image is not equalized over a huge window)
CLAHE_CLIP_LIMIT = 0.01
CLAHE_KERNEL_SIZE = 64


def check_normalization(spec: Any) -> str | None:
    """What is wrong with a normalization spec, or None: the kind, and CLAHE's parameters."""
    if not isinstance(spec, dict):
        return 'expected an object such as {"kind": "standardize"}'
    kind = spec.get("kind", "standardize")
    if kind not in KINDS:
        return f"kind must be one of {', '.join(KINDS)}, got {kind!r}"
    if kind == "scale":
        low, high, clip = spec.get("min", 0.0), spec.get("max", 255.0), spec.get("clip", False)
        if any(
            isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) for v in (low, high)
        ):
            return f"scale min and max must be numbers, got {low!r} and {high!r}"
        if not high > low:
            return f"scale max must be above min, got min {low!r} and max {high!r}"
        if not isinstance(clip, bool):
            return f"scale clip must be true or false, got {clip!r}"
    if kind == "clahe":
        kernel, clip = spec.get("kernel_size", CLAHE_KERNEL_SIZE), spec.get("clip_limit", CLAHE_CLIP_LIMIT)
        if isinstance(kernel, bool) or not isinstance(kernel, int) or kernel < 2:
            return f"clahe kernel_size must be an integer of at least 2 pixels, got {kernel!r}"
        if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not 0 < clip <= 1:
            return f"clahe clip_limit must be a number in (0, 1], got {clip!r}"
    return None


def is_planewise(spec: dict[str, Any]) -> bool:
    """Whether a normalization needs a whole 2D plane (CLAHE) rather than one tile at a time.

    Local contrast equalization looks at a window around each pixel, so applying it tile
    by tile would give seams and differ from training; the engine enhances whole planes.
    """
    return spec.get("kind", "standardize") == "clahe"


def normalize_plane(plane: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    """Normalize a whole channels-last plane (H, W, C) by a plane-wise kind.

    ``clahe``: each channel is stretched to [0, 1] by its own range, equalized by
    contrast-limited adaptive histograms (``clip_limit``, ``kernel_size`` in pixels),
    then z-scored over the plane. Local equalization evens out the uneven illumination
    of fundus photographs and dermoscopy, which otherwise shifts a model's threshold.
    """
    from skimage.exposure import equalize_adapthist

    if not is_planewise(spec):
        raise ValueError(f"normalization {spec.get('kind')!r} is applied per tile, not per plane")
    plane = np.asarray(plane)
    height, width = plane.shape[:2]
    kernel = max(2, min(int(spec.get("kernel_size", CLAHE_KERNEL_SIZE)), height, width))
    clip = float(spec.get("clip_limit", CLAHE_CLIP_LIMIT))
    out = np.empty(plane.shape, np.float32)
    # float32 holds 8- and 16-bit values exactly; wider integers and float64 keep their precision
    exact = np.float32 if plane.dtype.itemsize <= 2 or plane.dtype == np.float32 else np.float64
    for c in range(plane.shape[-1]):  # one channel at a time: a large plane is not copied whole
        channel = plane[..., c].astype(exact)
        low, high = float(channel.min()), float(channel.max())
        if not high > low or min(height, width) < 2:
            out[..., c] = 0.0
            continue
        stretched = ((channel - low) / (high - low)).astype(np.float32)
        equalized = equalize_adapthist(stretched, kernel_size=kernel, clip_limit=clip)
        mean, std = float(equalized.mean()), float(equalized.std())
        out[..., c] = (equalized - mean) / max(std, 1e-6)
    return out


def image_statistics(image: Any, channel_axis: int | None, max_samples: int = 4_000_000):
    """Per-channel mean and std of an array-like, from a strided subsample if large.

    Works on NumPy, dask and zarr arrays without loading a large image whole.
    """
    shape = image.shape
    n_pixels = int(np.prod(shape))
    stride = max(
        1, int(np.ceil((n_pixels / max_samples) ** (1 / max(1, len(shape) - (channel_axis is not None)))))
    )
    index = tuple(
        slice(None) if ax == channel_axis else slice(None, None, stride) for ax in range(len(shape))
    )
    sample = np.asarray(image[index], dtype=np.float64)
    if channel_axis is None:
        return np.array([sample.mean()]), np.array([sample.std()])
    sample = np.moveaxis(sample, channel_axis, -1).reshape(-1, shape[channel_axis])
    return sample.mean(axis=0), sample.std(axis=0)


def normalize(tile: np.ndarray, spec: dict[str, Any], mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Normalize a channels-last tile (..., C) with statistics of the whole image."""
    kind = spec.get("kind", "standardize")
    tile = tile.astype(np.float32, copy=False)
    if kind == "standardize":
        return ((tile - mean.astype(np.float32)) / np.maximum(std.astype(np.float32), 1e-6)).astype(
            np.float32
        )
    if kind == "scale":  # a fixed window, e.g. CT in Hounsfield units: {min: -160, max: 240, clip: true}
        low, high = float(spec.get("min", 0.0)), float(spec.get("max", 255.0))
        scaled = ((tile - low) / max(high - low, 1e-6)).astype(np.float32)
        return np.clip(scaled, 0.0, 1.0) if spec.get("clip", False) else scaled
    if kind == "clahe":
        raise ValueError("clahe normalizes whole planes: use normalize_plane")
    raise ValueError(f"unknown normalization {kind!r}; valid: {', '.join(KINDS)}")


def match_channels(tile: np.ndarray, n_channels: int) -> np.ndarray:
    """Adapt a channels-last array to the model's channel count.

    Grey to RGB replicates; RGBA drops alpha; RGB to grey averages. Anything else is an
    error with the two counts, since guessing could silently give wrong results.
    """
    have = tile.shape[-1]
    if have == n_channels:
        return tile
    if have == 1:
        return np.repeat(tile, n_channels, axis=-1)
    if have == 4 and n_channels == 3:
        return tile[..., :3]
    if have in (3, 4) and n_channels == 1:
        return tile[..., :3].mean(axis=-1, keepdims=True)
    raise ValueError(f"the image has {have} channels but the model expects {n_channels}")


#: horizontal field-of-view diameter of DRIVE photographs, in pixels (measured on its FOV masks)
DRIVE_FOV_DIAMETER = 537

#: the field of view is found on a copy at most this many pixels on its longer side
_FOV_WORKING_SIZE = 1024


def fov_mask(image: np.ndarray) -> np.ndarray:
    """The bright, round field of view of a fundus photograph, as a bool (H, W) mask.

    Fundus cameras put the retina on a dark background that is rarely black: JPEG noise,
    STARE's scanned-slide rim, CHASE_DB1's dim edge. The threshold therefore sits a fraction of
    the way from the frame's border level to the retina's bright level, and only the
    largest bright region counts (text printed in a corner is not the field).
    """
    from scipy import ndimage

    grey = np.asarray(image)
    if grey.ndim == 3:  # the red channel: the retina is brightest there, a scanned slide's rim is not
        grey = grey[..., 0]
    grey = grey.astype(np.float32, copy=False)
    if grey.ndim != 2 or min(grey.shape) < 8:
        return np.ones(grey.shape[:2], bool)
    ring = max(1, min(grey.shape) // 50)
    border = np.concatenate(
        [grey[:ring].ravel(), grey[-ring:].ravel(), grey[:, :ring].ravel(), grey[:, -ring:].ravel()]
    )
    # the border is background unless the photograph was cropped into the field: then the
    # darkest pixels (the corners left outside the circle) are
    background = min(float(np.median(border)), float(np.percentile(grey, 2)))
    bright = float(np.percentile(grey, 99))
    if not bright > background:
        return np.ones(grey.shape, bool)
    smooth = ndimage.uniform_filter(grey, size=5)
    field = smooth > background + 0.12 * (bright - background)
    labels, count = ndimage.label(field)
    if count == 0:
        return np.ones(grey.shape, bool)
    largest = 1 + int(np.argmax(ndimage.sum_labels(field, labels, range(1, count + 1))))
    return ndimage.binary_fill_holes(labels == largest)


def fov_diameter(image: np.ndarray) -> int:
    """Diameter in pixels of a fundus photograph's circular field of view.

    A circle is fitted to the field's edge where it lies inside the frame, so a field
    clipped at the top and bottom (HRF), notched (DRIVE, STARE) or larger than the frame
    (a cropped photograph) still gives the circle's diameter, not the visible width.
    Without such an edge (the field fills the frame) the frame's width stands in.
    """
    from scipy import ndimage

    image = np.asarray(image)
    height, width = image.shape[:2]
    step = max(1, int(np.ceil(max(height, width) / _FOV_WORKING_SIZE)))
    field = fov_mask(image[::step, ::step])
    edge = field & ~ndimage.binary_erosion(field)
    edge[:2], edge[-2:], edge[:, :2], edge[:, -2:] = False, False, False, False  # the frame is no edge
    ys, xs = np.nonzero(edge)
    if ys.size < 20:
        return width
    ys, xs = ys.astype(np.float64) * step, xs.astype(np.float64) * step
    keep = np.ones(ys.size, bool)
    for _ in range(3):  # refit without the points far from the circle (a notch, a flash)
        cy, cx, radius = _fit_circle(ys[keep], xs[keep])
        residual = np.abs(np.hypot(ys - cy, xs - cx) - radius)
        spread = 1.4826 * float(np.median(residual[keep])) + step
        keep = residual <= 3 * spread
        if keep.sum() < 20:
            break
    if not np.isfinite(radius) or radius <= 0:
        return width
    # never smaller than what is visible, nor absurdly larger than the frame
    visible = int(np.ptp(np.nonzero(field.any(axis=0))[0]) + 1) * step
    return int(round(min(max(2 * radius, visible), 4 * max(height, width))))


def _fit_circle(ys: np.ndarray, xs: np.ndarray) -> tuple[float, float, float]:
    """Least-squares circle through points (Kasa's algebraic fit): centre y, x and radius."""
    design = np.column_stack([xs, ys, np.ones_like(xs)])
    target = xs**2 + ys**2
    (a, b, c), *_ = np.linalg.lstsq(design, target, rcond=None)
    cx, cy = a / 2, b / 2
    return float(cy), float(cx), float(np.sqrt(max(c + cx**2 + cy**2, 0.0)))


def fundus_scale(image: np.ndarray, reference_diameter: int = DRIVE_FOV_DIAMETER) -> float:
    """Resize factor that gives a fundus photograph's field of view ``reference_diameter`` pixels."""
    return reference_diameter / max(1, fov_diameter(image))


#: a derived scale this close to 1 is taken as 1: resampling by 1% changes nothing a
#: network sees but blurs the image and costs a resize
FOV_SCALE_SNAP = 0.02


#: a fundus photograph's field of view spans at least this share of the frame's shorter side
#: (DRIVE 0.92, STARE 1.07, CHASE_DB1 0.96, HRF 1.4); a smaller bright region is no field
#: of view (a fluorescence image, a photograph of something else), so no scale is derived
PLAUSIBLE_FIELD = 0.5


def fov_working_scale(image: np.ndarray, reference_diameter: int) -> float | None:
    """The working scale of a model that records its field-of-view diameter: the factor
    that brings this photograph's field to ``reference_diameter`` pixels (None: no
    plausible field of view, so nothing to go by). The trainer resizes every training
    image by it and the engine every image it predicts, so both sides see fields of one
    size, whatever the camera."""
    field = fov_diameter(image)
    if field < PLAUSIBLE_FIELD * min(np.shape(image)[:2]):
        return None
    return _snapped(reference_diameter / max(1, field))


def derived_working_scale(
    image: np.ndarray, diameter: int | None = None, width: int | None = None
) -> float | None:
    """The one rule for a scale derived from the image itself (None: the model has none, or
    the image shows no field of view to go by).

    ``diameter`` (a model's ``fov_diameter``): fundus photographs, by their round field of
    view, from any camera. ``width`` (a model's ``image_width``): photographs framed alike
    at any resolution (dermoscopy: PH2's 767 px and ISIC's 256 px copies show a lesion
    alike), brought to that width.
    """
    if diameter:
        return fov_working_scale(image, diameter)
    if width:
        return _snapped(width / max(1, int(np.shape(image)[1])))
    return None


def size_measure(image: np.ndarray, by_diameter: bool) -> int:
    """What a derived-scale rule measures on ``image`` (its field's diameter, else its
    width), so that a scale chosen by hand can be turned back into the rule's value."""
    return fov_diameter(image) if by_diameter else int(np.shape(image)[1])


def _snapped(scale: float) -> float:
    return 1.0 if abs(scale - 1.0) < FOV_SCALE_SNAP else float(scale)
