"""Uncertainty from test-time augmentation, and where to look first when reviewing.

The network is run on flipped copies of the image (flips do not change what a vessel
is, so a confident model agrees with itself); the maps are flipped back and compared
pixel by pixel. NumPy only at import time: the engine (and torch) load on first use.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Generator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .engine import Prediction, Progress

#: the augmentations, each a set of image axes to flip (identity first: its attention maps are kept)
TTA_FLIPS: dict[str, tuple[str, ...]] = {"identity": (), "flip_x": ("X",), "flip_y": ("Y",)}


def binary_entropy(probability: np.ndarray) -> np.ndarray:
    """Entropy in bits of a Bernoulli probability: 0 when sure, 1 at p = 0.5."""
    p = np.clip(np.asarray(probability, np.float64), 1e-7, 1 - 1e-7)
    return (-(p * np.log2(p) + (1 - p) * np.log2(1 - p))).astype(np.float32)


def tta_uncertainty(
    maps: Sequence[np.ndarray], kind: str = "entropy", multiclass: bool = False
) -> np.ndarray:
    """Per-pixel uncertainty of several probability maps of the same image.

    ``entropy``: entropy of the mean probability (in [0, 1]; counts both disagreement
    between the copies and pixels the model finds borderline). ``std``: standard
    deviation across the copies (disagreement only). Multi-class maps carry a trailing
    class axis; their entropy is normalized by log(classes) and their std averaged.
    """
    _check_kind(kind)
    stack = np.stack([np.asarray(m, np.float32) for m in maps])
    if kind == "std":
        spread = stack.std(axis=0)
        return (spread.mean(axis=-1) if multiclass else spread).astype(np.float32)
    return mean_entropy(stack.mean(axis=0), multiclass)


def mean_entropy(mean: np.ndarray, multiclass: bool = False) -> np.ndarray:
    """Entropy of a mean probability map, in [0, 1] (normalized by log(classes))."""
    if not multiclass:
        return binary_entropy(mean)
    p = np.clip(mean, 1e-7, 1.0)
    return (-(p * np.log(p)).sum(axis=-1) / np.log(mean.shape[-1])).astype(np.float32)


def _check_kind(kind: str) -> None:
    if kind not in ("entropy", "std"):
        raise ValueError(f"kind must be 'entropy' or 'std', got {kind!r}")


def _flip(array: Any, axes: Sequence[int]) -> Any:
    return np.flip(array, axis=tuple(axes)) if axes else array


def iter_predict_tta(
    model: Any,
    image: Any,
    *,
    axes: str | None = None,
    flips: Sequence[str] = tuple(TTA_FLIPS),
    kind: str = "entropy",
    attention: bool = False,
    **kwargs: Any,
) -> Generator[Progress, None, Prediction]:
    """Predict each flipped copy; returns the prediction, its ``uncertainty`` map set.

    The prediction's probabilities are the mean of the copies (flipped back), which
    scores a little higher than one pass (docs/performance.md, "Flip averaging").
    ``axes`` (e.g. ``"YXC"``, ``"ZYX"``) say which axes are Y and X; guessed from the
    shape as in ``iter_predict`` when not given. Pass a LoadedModel to load it once;
    other keyword arguments go to ``iter_predict``. Attention maps are computed on the
    identity copy only. Progress counts the units of all passes, with
    ``stage="uncertainty"`` after the first.
    """
    from . import engine

    unknown = [name for name in flips if name not in TTA_FLIPS]
    if unknown or not flips or flips[0] != "identity":
        raise ValueError(
            f"flips must start with 'identity' and use {', '.join(TTA_FLIPS)}; got {list(flips)}"
        )
    _check_kind(kind)
    loaded = engine._as_loaded(model)
    # one scale for every copy (a field of view measured on each flipped copy could differ)
    kwargs["scale"] = engine.working_scale(
        loaded,
        kwargs.get("scale"),
        kwargs.pop("pixel_size", None),
        kwargs.pop("pixel_size_unit", None),
        image=image,
        axes=axes,
    )
    first: Prediction | None = None
    total: np.ndarray | None = None  # running sum of the copies: no stack of them all for big volumes
    maps: list[np.ndarray] = []  # kept only for the std, which needs every copy
    for index, name in enumerate(flips):
        if index == 1:  # the identity pass has checked the image; its axes are now safe to resolve
            axes = engine.resolve_axes(image.shape, loaded.in_channels, axes)
        image_axes = [axes.index(ax) for ax in TTA_FLIPS[name]] if index else []
        generator = engine.iter_predict(
            loaded, _flip(image, image_axes), axes=axes, attention=attention and index == 0, **kwargs
        )
        stage = "predict" if index == 0 else "uncertainty"

        def overall(event: engine.Progress, index: int = index, stage: str = stage) -> engine.Progress:
            # progress over all passes; finished slices are shown from the identity pass only
            keep = index == 0 and event.slice_probabilities is not None
            return engine.Progress(
                index * event.total + event.done,
                len(flips) * event.total,
                stage,
                slice_index=event.slice_index if keep else None,
                slice_probabilities=event.slice_probabilities if keep else None,
            )

        prediction = yield from engine.map_progress(generator, overall)
        # outputs are (Z?, Y, X) plus a class axis for multi-class models
        last = -2 if prediction.multiclass else -1
        out_axes = [last if ax == "X" else last - 1 for ax in TTA_FLIPS[name]]
        copy = np.asarray(_flip(prediction.probabilities, out_axes), np.float32)
        total = copy.copy() if total is None else np.add(total, copy, out=total)
        if kind == "std":
            maps.append(np.ascontiguousarray(copy))
        if first is None:
            first = prediction
    assert first is not None and total is not None
    mean = total / np.float32(len(flips))
    spread = (
        tta_uncertainty(maps, "std", first.multiclass)
        if kind == "std"
        else mean_entropy(mean, first.multiclass)
    )
    return dataclasses.replace(first, probabilities=mean, uncertainty=spread)


@dataclass(frozen=True)
class Region:
    """A square window of a map: its grid key, centre (data coordinates) and mean value."""

    key: tuple[int, ...]
    center: tuple[float, ...]
    score: float


def most_uncertain_region(
    values: np.ndarray, window: int = 64, visited: Collection[tuple[int, ...]] = ()
) -> Region | None:
    """The window (on a grid of ``window`` pixels over the last two axes) with the
    highest mean value whose key is not in ``visited``; None when all were visited.

    Leading axes (slices of a stack) are searched too; the key is (index..., row, col).
    """
    values = np.asarray(values, np.float32)
    if values.ndim < 2:
        raise ValueError(f"expected a 2D map or a stack of them, got shape {values.shape}")
    window = max(1, int(window))
    *lead, height, width = values.shape
    rows, cols = -(-height // window), -(-width // window)
    padded = np.full((*lead, rows * window, cols * window), np.nan, np.float32)
    padded[..., :height, :width] = values
    blocks = padded.reshape(*lead, rows, window, cols, window)
    with np.errstate(invalid="ignore"):
        scores = np.nanmean(blocks, axis=(-3, -1))
    scores = np.nan_to_num(scores, nan=-np.inf)
    for key in visited:
        if len(key) == scores.ndim and all(0 <= k < n for k, n in zip(key, scores.shape)):
            scores[tuple(key)] = -np.inf
    flat = int(np.argmax(scores))
    if not np.isfinite(scores.flat[flat]):
        return None
    key = tuple(int(k) for k in np.unravel_index(flat, scores.shape))
    *index, row, col = key
    # pixel i is centred on coordinate i, so a window [a, b) is centred on (a + b - 1) / 2
    y = (row * window + min((row + 1) * window, height) - 1) / 2
    x = (col * window + min((col + 1) * window, width) - 1) / 2
    return Region(key, (*(float(i) for i in index), y, x), float(scores[key]))
