"""Inference engine: tiled, blended, batched prediction with progress and cancellation.

The work is a generator (:func:`iter_predict`) that yields :class:`Progress` events and
returns a :class:`Prediction`; :func:`predict` drives it. The napari widgets, the CLI
and the tests use the same generator: closing it (or stopping iteration) cancels the
run at the next batch.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from .device import select_device
from .preprocess import image_statistics, is_planewise, match_channels, normalize, normalize_plane

if TYPE_CHECKING:
    from .model_files import LoadedModel

#: images up to this many pixels per plane run as one tile (padded to the divisor)
WHOLE_IMAGE_PIXELS = 1024 * 1024
DEFAULT_TILE = 512
DEFAULT_OVERLAP = 64
#: a last axis this short (and a quarter of Y and X or less) holds channels, not X
MAX_CHANNELS = 16


@dataclass
class Progress:
    """One step of a long run: ``done`` of ``total`` units (tiles, slices, steps).

    When a slice of a stack is finished, the event also carries its index and its
    probabilities (``slice_index``, ``slice_probabilities``, full resolution), so that a
    viewer can show the slice at once instead of after the whole stack.
    """

    done: int
    total: int
    stage: str = "predict"
    slice_index: int | None = None
    slice_probabilities: np.ndarray | None = field(default=None, repr=False)


@dataclass
class Prediction:
    """Result of :func:`predict`, in the input's spatial shape.

    ``probabilities``: float32 in [0, 1]; binary models give the foreground probability
    with the image's spatial shape, multi-class models add a trailing class axis.
    ``attention``: one float32 map per attention gate (finest first), at full resolution.
    """

    probabilities: np.ndarray
    attention: list[np.ndarray] = field(default_factory=list)
    threshold: float = 0.5
    model_name: str = ""
    model_sha256: str | None = None
    multiclass: bool = False
    #: clean-up steps the model file asks for (napari_r2au.postprocess)
    postprocess: list[str] = field(default_factory=list)
    #: the resize factor the network saw the image at (:func:`working_scale`)
    scale: float = 1.0
    #: with flip averaging (:func:`napari_r2au.uncertainty.iter_predict_tta`): the per-pixel
    #: uncertainty of the copies (entropy of their mean, or their spread), in the spatial shape
    uncertainty: np.ndarray | None = field(default=None, repr=False)
    #: what ran the network ("torch" or "openvino") and at which precision ("fp32", "bf16", "fp16", "int8")
    backend: str = "torch"
    precision: str = "fp32"

    def mask(self, threshold: float | None = None, postprocess: Sequence[str] | None = None) -> np.ndarray:
        """uint8 labels: probability > threshold (binary) or the arg-max class, then the
        model's clean-up steps (``postprocess=[]`` skips them)."""
        if self.multiclass:
            return np.argmax(self.probabilities, axis=-1).astype(np.uint8)
        from .postprocess import segment_mask

        level = self.threshold if threshold is None else threshold
        return segment_mask(
            self.probabilities, level, self.postprocess if postprocess is None else postprocess
        )


def overlay_slices(
    earlier: np.ndarray | None, later: np.ndarray | None, slices: Sequence[int], shape: Sequence[int]
) -> np.ndarray:
    """``earlier`` (zeros if None) with ``slices`` taken from ``later`` (zeros if None)."""
    merged = np.zeros(shape, np.float32) if earlier is None else np.array(earlier, np.float32)
    index = list(slices)
    merged[index] = 0.0 if later is None else later[index]
    return merged


def merge_slices(earlier: Prediction, later: Prediction, slices: Sequence[int]) -> Prediction:
    """A stack's prediction after a run on some of its slices: ``later`` on ``slices``,
    ``earlier`` everywhere else (a "current slice" run must not blank the others)."""
    if earlier.probabilities.shape != later.probabilities.shape:
        raise ValueError(
            f"cannot merge predictions of shapes {earlier.probabilities.shape} and "
            f"{later.probabilities.shape}"
        )
    probabilities = overlay_slices(
        earlier.probabilities, later.probabilities, slices, earlier.probabilities.shape
    )
    plane_shape = earlier.probabilities.shape[:3]
    gates = max(len(earlier.attention), len(later.attention))
    attention = [
        overlay_slices(
            earlier.attention[g] if g < len(earlier.attention) else None,
            later.attention[g] if g < len(later.attention) else None,
            slices,
            plane_shape,
        )
        for g in range(gates)
    ]
    return replace(later, probabilities=probabilities, attention=attention)


def resolve_axes(shape: Sequence[int], in_channels: int, axes: str | None = None) -> str:
    """Axes string (letters Z, Y, X, C) for an array shape; ``axes`` wins if given."""
    if axes is not None:
        axes = axes.upper()
        if len(axes) != len(shape) or set(axes) - set("ZYXC") or "Y" not in axes or "X" not in axes:
            raise ValueError(f"axes {axes!r} do not describe an array of shape {tuple(shape)}")
        return axes
    ndim = len(shape)
    if ndim == 2:
        return "YX"
    small = (1, 3, 4, in_channels)
    if ndim == 3:
        if shape[-1] <= 4 and shape[0] > 4 and shape[1] > 4:
            return "YXC"  # a short last axis is colour (even 2 channels: a clear mismatch error follows)
        if shape[-1] <= MAX_CHANNELS and shape[-1] * 4 <= min(shape[0], shape[1]):
            return (
                "YXC"  # 5+ channels (multispectral): not a stack of Y x C planes; the count is checked next
            )
        if shape[0] == in_channels and in_channels > 1 and shape[-1] > 4:
            return "CYX"
        if shape[-1] in small and shape[-1] <= 4:
            return "YXC"
        return "ZYX"
    if ndim == 4:
        if shape[-1] in small and shape[-1] <= 4:
            return "ZYXC"
        if shape[0] in small and shape[0] <= 4:
            return "CZYX"
    raise ValueError(
        f"cannot tell the axes of an array of shape {tuple(shape)}; pass axes= (e.g. 'YXC', 'ZYX')"
    )


def derived_scale(model: Any, image: Any, axes: str | None = None) -> float:
    """The scale a model that derives it from each image asks for (its field of view, or
    its width: :func:`napari_r2au.preprocess.derived_working_scale`), else its ``input_scale``.

    The trainer resized each training image by the same rule, so every camera reaches the
    network alike. A stack is measured on its middle plane (a series from one camera).
    """
    from .preprocess import derived_working_scale

    loaded = _as_loaded(model)
    if not loaded.derives_scale:
        return loaded.input_scale
    scale = derived_working_scale(
        image_plane(image, loaded.in_channels, axes), loaded.fov_diameter, loaded.image_width
    )
    if scale is None:  # no field of view to go by: the model's own scale
        return loaded.input_scale
    return float(min(max(scale, 1 / MAX_SCALE), MAX_SCALE))


def image_plane(image: Any, in_channels: int, axes: str | None = None) -> np.ndarray:
    """One 2D plane (Y, X[, C]) of an image: a stack's middle slice, channels last."""
    axes = resolve_axes(image.shape, in_channels, axes)
    index = tuple(image.shape[axes.index("Z")] // 2 if ax == "Z" else slice(None) for ax in axes)
    plane = np.asarray(image[index])
    rest = "".join(ax for ax in axes if ax != "Z")
    return np.moveaxis(plane, 0, -1) if "C" in rest and rest.index("C") == 0 else plane


def _as_loaded(model: Any) -> LoadedModel:
    from .model_files import LoadedModel, load_model

    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, str) or hasattr(model, "__fspath__"):
        return load_model(model)
    if hasattr(model, "in_channels") and hasattr(model, "forward"):
        return _network_as_loaded(model)
    raise TypeError(f"model must be a LoadedModel, a model name or path, or a network; got {type(model)!r}")


#: network object -> (its weights' version stamp, the prepared networks cached for it);
#: the values hold no reference to the network, so a network that is dropped is freed
_NETWORKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _version_stamp(network: Any) -> tuple:
    """Changes whenever a parameter or buffer is changed in place (an optimizer step,
    load_state_dict, BN statistics in training) or replaced: torch counts in-place
    writes in each tensor's ``_version``."""
    tensors = list(network.parameters()) + list(network.buffers())
    return tuple((id(t), t._version, t.device.type) for t in tensors)


def _network_as_loaded(model: Any) -> LoadedModel:
    """A bare network as a LoadedModel whose ``extra`` (the prepared, BN-folded network)
    is kept while the weights are unchanged, as a loaded model's is; training in place
    changes the stamp, and the network is prepared again."""
    from .model_files import LoadedModel

    stamp = _version_stamp(model)
    cached = _NETWORKS.get(model)
    if cached is None or cached[0] != stamp:
        cached = (stamp, {})
        _NETWORKS[model] = cached
    meta = {
        "name": type(model).__name__,
        "in_channels": model.in_channels,
        "out_channels": model.out_channels,
        "normalization": {"kind": "standardize"},
        "threshold": 0.5,
    }
    return LoadedModel(network=model, metadata=meta, source="memory", extra=cached[1])


#: the largest resize factor accepted (and 1/MAX_SCALE the smallest from pixel sizes)
MAX_SCALE = 64.0


def convert_length(value: float, unit: str, to_unit: str) -> float:
    """``value`` in ``unit`` expressed in ``to_unit`` (e.g. 250 um -> 0.25 mm), via pint."""
    if unit == to_unit:
        return float(value)
    try:
        import pint
    except ImportError as exc:  # pint comes with napari; a bare engine install may lack it
        raise ValueError(f"converting {unit} to {to_unit} needs the pint package") from exc
    registry = pint.get_application_registry()
    try:
        return float((value * registry(unit)).to(to_unit).magnitude)
    except Exception as exc:  # pint raises PintError, AssertionError (no message), TypeError...
        reason = str(exc) or f"{unit!r} is not a unit of length pint understands (e.g. mm, um, nm)"
        raise ValueError(f"cannot convert a pixel size in {unit!r} to {to_unit!r}: {reason}") from exc


def working_scale(
    model: Any,
    scale: float | None = None,
    pixel_size: float | None = None,
    pixel_size_unit: str | None = None,
    image: Any = None,
    axes: str | None = None,
) -> float:
    """The resize factor before the network, from the most specific information given.

    An explicit ``scale`` wins. Otherwise, if both the image's pixel size and the
    model's are known, the image is resized so that its pixels have the model's size
    (0.25 mm pixels into a 0.5 mm model: scale 0.5). Otherwise, for a model that derives
    its scale from the image (a fundus model's field of view, a dermoscopy model's image
    width) and given the ``image``, the scale that rule gives (:func:`derived_scale`).
    Otherwise the model's ``input_scale``. A pixel size without a unit is taken in the
    model's unit.
    """
    loaded = _as_loaded(model)
    if scale is None and pixel_size is not None and loaded.pixel_size:
        if not pixel_size > 0:
            raise ValueError(f"pixel size must be positive, got {pixel_size}")
        given = f"{pixel_size:g} {pixel_size_unit or loaded.pixel_size_unit or '(no unit)'}"
        if pixel_size_unit and loaded.pixel_size_unit:
            pixel_size = convert_length(pixel_size, pixel_size_unit, loaded.pixel_size_unit)
        scale = pixel_size / loaded.pixel_size
        if not 1 / MAX_SCALE <= scale <= MAX_SCALE:
            raise ValueError(
                f"the image's pixel size {given} against the model's {loaded.pixel_size:g} "
                f"{loaded.pixel_size_unit or '(no unit)'} means resizing by {scale:g}; check the units "
                "(a layer scale without units is read in the model's unit) or set the scale yourself"
            )
    if scale is None and image is not None and loaded.derives_scale:
        scale = derived_scale(loaded, image, axes)
    scale = loaded.input_scale if scale is None else float(scale)
    if not scale > 0 or not np.isfinite(scale):
        raise ValueError(f"scale must be positive, got {scale}")
    if scale > MAX_SCALE:
        raise ValueError(f"scale {scale:g} is above the largest supported ({MAX_SCALE:g})")
    return scale


def _taper(length: int, overlap: int) -> np.ndarray:
    """1D blending weights: 1 inside, a raised-cosine ramp over ``overlap`` at each end."""
    weights = np.ones(length, np.float32)
    ramp = min(overlap, length // 2)
    if ramp > 0:
        edge = 0.5 - 0.5 * np.cos(np.pi * (np.arange(ramp) + 0.5) / ramp)
        weights[:ramp] = edge
        weights[length - ramp :] = edge[::-1]
    return np.maximum(weights, 1e-3)


def _starts(size: int, tile: int, overlap: int) -> list[int]:
    if size <= tile:
        return [0]
    stride = tile - overlap
    count = math.ceil((size - tile) / stride) + 1
    return sorted({min(i * stride, size - tile) for i in range(count)})


def _round_up(value: int, divisor: int) -> int:
    return int(math.ceil(value / divisor) * divisor)


def _finite(pixels: np.ndarray) -> np.ndarray:
    if pixels.dtype.kind == "f" and not np.isfinite(pixels).all():
        raise ValueError(
            "the image contains NaN or infinite values; replace them first (e.g. numpy.nan_to_num)"
        )
    return pixels


#: why a finite image can still give NaN: its values overflow the network's 32-bit floats
_OVERFLOW = (
    "the image's values are too large for 32-bit floats (beyond about 3e38, or so large that their "
    "mean or spread overflows); rescale the image first (e.g. divide it by its maximum)"
)


def _float32(array: Any) -> np.ndarray:
    """``array`` as float32, refusing values the cast (or, for float64, the statistics)
    would turn into infinities: checked after the cast, so a finite float64 near 1e308
    cannot pass the finite check and become NaN later."""
    source = np.asarray(array)
    _finite(source)
    cast = source.astype(np.float32)
    if not np.isfinite(cast).all():
        raise ValueError(_OVERFLOW)
    return cast


def _normalized(tile: np.ndarray) -> np.ndarray:
    """A normalized network input, checked: NaN here would give an all-NaN probability map."""
    if not np.isfinite(tile).all():
        raise ValueError(_OVERFLOW)
    return tile


def _check_run_arguments(tile_size: Any, overlap: Any, batch_size: Any) -> None:
    """Refuse arguments that would silently give NaN (no batch ever runs: 0 / 0)."""

    def whole(value: Any) -> bool:
        return isinstance(value, (int, np.integer)) and not isinstance(value, bool)

    if not whole(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be a whole number of at least 1, got {batch_size!r}")
    if not whole(overlap) or overlap < 0:
        raise ValueError(f"overlap must be a whole number of pixels, 0 or more, got {overlap!r}")
    if tile_size is not None and (not whole(tile_size) or tile_size < 1):
        raise ValueError(
            f"tile_size must be a whole number of pixels (or None for automatic), got {tile_size!r}"
        )


class _Plane:
    """One 2D plane of an array-like, read lazily tile by tile as channels-last float."""

    def __init__(self, image: Any, axes: str, z: int | None, in_channels: int):
        self.image, self.axes, self.z, self.in_channels = image, axes, z, in_channels
        self.height = image.shape[axes.index("Y")]
        self.width = image.shape[axes.index("X")]

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        index = []
        for ax in self.axes:
            index.append({"Y": slice(y0, y1), "X": slice(x0, x1), "Z": self.z, "C": slice(None)}[ax])
        tile = np.asarray(self.image[tuple(index)])
        kept = [ax for ax in self.axes if ax in "YXC"]
        if "C" in kept:
            tile = np.moveaxis(tile, kept.index("C"), -1)
        else:
            tile = tile[..., None]
        return match_channels(tile, self.in_channels)


def normalization_statistics(
    image: Any, in_channels: int, axes: str | None = None, scale: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """The per-channel mean and std the engine normalizes ``image`` with at ``scale``.

    A stack's statistics are those of the whole stack (a strided sample of it, resized as
    the network sees it), one value per model channel. Training calls this on the stack a
    slice comes from, so that the slice is normalized as Segment will normalize it.
    """
    axes = resolve_axes(image.shape, in_channels, axes)
    if abs(scale - 1.0) > 1e-6:
        image = (
            _ResizedPlanes(image, axes, scale)
            if "Z" in axes
            else _resize(_float32(image), _resized_shape(image.shape, axes, scale), anti_aliasing=scale < 1)
        )
    channel_axis = axes.index("C") if "C" in axes else None
    mean, std = image_statistics(image, channel_axis)
    if channel_axis is None:
        return np.repeat(mean, in_channels), np.repeat(std, in_channels)
    return match_channels(mean[None], in_channels)[0], match_channels(std[None], in_channels)[0]


def iter_predict(
    model: Any,
    image: Any,
    *,
    axes: str | None = None,
    tile_size: int | None = None,
    overlap: int = DEFAULT_OVERLAP,
    batch_size: int = 4,
    device: str | None = None,
    precision: str = "auto",
    attention: bool = False,
    slices: Sequence[int] | None = None,
    scale: float | None = None,
    pixel_size: float | None = None,
    pixel_size_unit: str | None = None,
    fuse: bool = True,
    channels_last: bool = True,
    statistics: tuple[np.ndarray, np.ndarray] | None = None,
    backend: str = "auto",
) -> Generator[Progress, None, Prediction]:
    """Predict tile by tile, yielding progress; returns the :class:`Prediction`.

    Planes are read tile by tile, except for models with a plane-wise normalization
    (CLAHE), which need each whole 2D plane in memory to enhance it as in training.

    Args:
        model: a LoadedModel, a model name or path, or a bare network from create_model.
        image: NumPy, dask or zarr array; YX, YXC, CYX, ZYX, ZYXC or CZYX.
        tile_size: tile edge in pixels; None runs planes up to 1024x1024 whole.
        slices: for stacks, the Z indices to run and their order (default: all).
        scale: resize Y and X by this factor before the network and back after it, so
            that structures have the size the model was trained on (default: the
            model's ``input_scale``, usually 1).
        pixel_size: the image's physical pixel size (in ``pixel_size_unit``, default
            the model's unit); with a model that records its own pixel size, this sets
            the scale (see :func:`working_scale`). An explicit ``scale`` wins.
        fuse: fold BatchNorm into the convolutions (same result, less memory traffic).
        channels_last: NHWC memory layout, which oneDNN and cuDNN convolutions prefer.
        statistics: the per-channel (mean, std) to normalize with instead of the image's
            own (:func:`normalization_statistics`), so that one slice cut from a stack is
            normalized as it is inside the stack (training validates slices this way).
        backend: what runs the network: "torch", "openvino" (the ``fast`` extra, CPU only),
            "torch-compile" (torch.compile: slow first call, for long batch runs)
            or "auto", which picks OpenVINO where it is installed and safe
            (:func:`napari_r2au.backends.resolve_backend`). Tiling, blending and scale are
            the engine's either way; the prediction records the backend and precision.
        precision: "auto" (an accepted int8 network on OpenVINO where the model has one,
            ``r2au quantize``; else bf16 where the device has it and, on a CPU, it
            measures faster; else fp32), "fp32" (the
            exact path), "bf16", "fp16" or "int8".
    """
    from .backends import prepare_forward

    _check_run_arguments(tile_size, overlap, batch_size)
    loaded = _as_loaded(model)
    image = _checked_image(image)
    scale = working_scale(loaded, scale, pixel_size, pixel_size_unit, image=image, axes=axes)
    if abs(scale - 1.0) > 1e-6:
        result = yield from _iter_predict_rescaled(
            loaded,
            image,
            scale,
            axes=axes,
            tile_size=tile_size,
            overlap=overlap,
            batch_size=batch_size,
            device=device,
            precision=precision,
            attention=attention,
            slices=slices,
            fuse=fuse,
            channels_last=channels_last,
            statistics=statistics,
            backend=backend,
        )
        result.scale = scale
        return result
    network = loaded.network
    network.eval()
    multiclass = loaded.out_channels > 1
    want_attention = attention and bool(getattr(network, "attention", False))
    axes = resolve_axes(image.shape, loaded.in_channels, axes)
    forward = prepare_forward(
        loaded, select_device(device), precision, backend, fuse=fuse, channels_last=channels_last
    )
    mean_std = (
        None if is_planewise(loaded.normalization) else _channel_statistics(loaded, image, axes, statistics)
    )

    n_z = image.shape[axes.index("Z")] if "Z" in axes else 1
    z_order = list(range(n_z)) if slices is None else [int(z) for z in slices]
    if any(not 0 <= z < n_z for z in z_order):
        raise ValueError(f"slices {z_order} out of range for {n_z} slices")
    height, width = image.shape[axes.index("Y")], image.shape[axes.index("X")]
    tiling = _Tiling.of(height, width, tile_size, overlap, int(getattr(network, "divisor", 16)))

    out_shape = (n_z, height, width)
    n_gates = len(getattr(network, "gates", None) or []) if want_attention else 0
    stacked = "Z" in axes
    # a single plane's result is the blended plane itself (no second copy of a large image)
    probabilities = (
        np.zeros((*out_shape, loaded.out_channels) if multiclass else out_shape, np.float32)
        if stacked
        else None
    )
    alphas = [np.zeros(out_shape, np.float32) for _ in range(n_gates)] if stacked else []
    total = len(tiling.windows) * len(z_order)
    yield Progress(0, total)

    for index, z in enumerate(z_order):
        plane = _Plane(image, axes, z if "Z" in axes else None, loaded.in_channels)
        blended, gates = yield from _predict_plane(
            loaded,
            plane,
            tiling,
            forward,
            mean_std,
            want_attention,
            n_gates,
            batch_size,
            done=index * len(tiling.windows),
            total=total,
        )
        if not stacked:
            probabilities = np.ascontiguousarray(np.moveaxis(blended, 0, -1)) if multiclass else blended[0]
            alphas = list(gates)
            break
        probabilities[z] = np.moveaxis(blended, 0, -1) if multiclass else blended[0]
        for g in range(n_gates):
            alphas[g][z] = gates[g]
        yield Progress(
            (index + 1) * len(tiling.windows),
            total,
            slice_index=z,
            slice_probabilities=np.clip(probabilities[z], 0.0, 1.0),
        )
    if probabilities is None:  # a single plane, and no slice of it asked for
        probabilities = np.zeros(
            (height, width, loaded.out_channels) if multiclass else (height, width), np.float32
        )
    if not np.isfinite(probabilities).all():  # finite inputs, so the network itself (e.g. NaN weights)
        raise ValueError(
            f"the network of {loaded.name!r} gave NaN probabilities from a finite image; "
            "its weights are probably broken (retrain or reload the model)"
        )
    np.clip(probabilities, 0.0, 1.0, out=probabilities)
    return Prediction(
        probabilities=probabilities,
        attention=alphas,
        threshold=loaded.threshold,
        model_name=loaded.name,
        model_sha256=loaded.sha256,
        multiclass=multiclass,
        postprocess=list(loaded.metadata.get("postprocess") or []),
        backend=forward.choice.backend,
        precision=forward.choice.precision,
    )


def _checked_image(image: Any) -> Any:
    """The array to run: a pyramid's full-resolution level; a pixel type or an empty axis
    the network cannot take is refused here, before any work."""
    if isinstance(image, (list, tuple)) or (not hasattr(image, "shape") and hasattr(image, "__getitem__")):
        image = image[0]  # a multiscale pyramid: its full-resolution level
    if np.dtype(image.dtype).kind not in "biuf":
        raise ValueError(
            f"unsupported pixel type {image.dtype}: give a boolean, integer or real-valued image"
        )
    if 0 in tuple(image.shape):
        raise ValueError(f"the image has an empty axis: shape {tuple(image.shape)}")
    return image


def _channel_statistics(
    loaded: LoadedModel, image: Any, axes: str, statistics: tuple[np.ndarray, np.ndarray] | None
) -> tuple[np.ndarray, np.ndarray]:
    """The per-channel (mean, std) every tile is normalized with: the whole image's, or the
    ones given (a slice normalized as inside its stack), checked against the model."""
    mean, std = (
        normalization_statistics(image, loaded.in_channels, axes)
        if statistics is None
        else (np.asarray(statistics[0], np.float64), np.asarray(statistics[1], np.float64))
    )
    if mean.shape != (loaded.in_channels,) or std.shape != (loaded.in_channels,):
        raise ValueError(
            f"statistics: expected a mean and a std for each of the model's "
            f"{loaded.in_channels} channels, got shapes {mean.shape} and {std.shape}"
        )
    return mean, std


@dataclass(frozen=True)
class _Tiling:
    """How a plane is cut: tile size (a multiple of the network's divisor), the windows'
    top-left corners and the raised-cosine weight each tile is blended with."""

    tile_h: int
    tile_w: int
    windows: list[tuple[int, int]]
    #: the tile's weight, ``outer(taper_y, taper_x)``
    weight: np.ndarray
    taper_y: np.ndarray
    taper_x: np.ndarray

    def weight_sums(self, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """Per row and per column, the summed tapers of the windows covering it: their
        outer product is every pixel's summed blending weight."""
        rows, columns = np.zeros(height, np.float64), np.zeros(width, np.float64)
        for y in sorted({y for y, _ in self.windows}):
            h = min(self.tile_h, height - y)
            rows[y : y + h] += self.taper_y[:h]
        for x in sorted({x for _, x in self.windows}):
            w = min(self.tile_w, width - x)
            columns[x : x + w] += self.taper_x[:w]
        return rows.astype(np.float32), columns.astype(np.float32)

    @classmethod
    def of(cls, height: int, width: int, tile_size: int | None, overlap: int, divisor: int) -> _Tiling:
        """Planes up to WHOLE_IMAGE_PIXELS run whole unless a tile size is given."""
        if tile_size is None:
            tile_h = tile_w = None if height * width <= WHOLE_IMAGE_PIXELS else DEFAULT_TILE
        else:
            tile_h = tile_w = _round_up(max(int(tile_size), divisor), divisor)
        tile_h = _round_up(height, divisor) if tile_h is None else tile_h
        tile_w = _round_up(width, divisor) if tile_w is None else tile_w
        overlap = min(overlap, tile_h // 2, tile_w // 2)
        ys, xs = _starts(height, tile_h, overlap), _starts(width, tile_w, overlap)
        taper_y = _taper(tile_h, overlap if len(ys) > 1 else 0)
        taper_x = _taper(tile_w, overlap if len(xs) > 1 else 0)
        return cls(
            tile_h, tile_w, [(y, x) for y in ys for x in xs], np.outer(taper_y, taper_x), taper_y, taper_x
        )


def _predict_plane(
    loaded: LoadedModel,
    plane: _Plane,
    tiling: _Tiling,
    forward: Any,
    mean_std: tuple[np.ndarray, np.ndarray] | None,
    want_attention: bool,
    n_gates: int,
    batch_size: int,
    *,
    done: int,
    total: int,
) -> Generator[Progress, None, tuple[np.ndarray, np.ndarray]]:
    """One plane through the network in batches of tiles, yielding progress; returns the
    blended probabilities (K, H, W) and gate maps (G, H, W). ``mean_std`` None means a
    plane-wise normalization (CLAHE), which sees the whole plane exactly as in training."""
    height, width = plane.height, plane.width
    tile_h, tile_w = tiling.tile_h, tiling.tile_w
    enhanced = None
    if mean_std is None:
        enhanced = _normalized(
            normalize_plane(_finite(plane.read(0, height, 0, width)), loaded.normalization)
        )
    acc = np.zeros((loaded.out_channels, height, width), np.float32)
    acc_alpha = np.zeros((n_gates, height, width), np.float32)
    for first in range(0, len(tiling.windows), batch_size):
        batch_windows = tiling.windows[first : first + batch_size]
        tiles = []
        for y, x in batch_windows:
            if enhanced is not None:
                tile = enhanced[y : y + tile_h, x : x + tile_w]
            else:
                tile = _finite(plane.read(y, min(y + tile_h, height), x, min(x + tile_w, width)))
                tile = _normalized(normalize(tile, loaded.normalization, *mean_std))
            pad = ((0, tile_h - tile.shape[0]), (0, tile_w - tile.shape[1]), (0, 0))
            if any(p[1] for p in pad):
                mode = "reflect" if tile.shape[0] > 1 and tile.shape[1] > 1 else "edge"
                tile = _pad(tile, pad, mode)
            tiles.append(tile.transpose(2, 0, 1))
        probs_np, gates_np = forward(np.stack(tiles), want_attention)
        for i, (y, x) in enumerate(batch_windows):
            h, w = min(tile_h, height - y), min(tile_w, width - x)
            wt = tiling.weight[:h, :w]
            acc[:, y : y + h, x : x + w] += probs_np[i, :, :h, :w] * wt
            for g, gate in enumerate(gates_np):
                acc_alpha[g, y : y + h, x : x + w] += gate[i, :h, :w] * wt
        done += len(batch_windows)
        yield Progress(done, total)
    # the windows form a grid and their weights are outer products, so the summed weight is
    # the outer product of two sums: divided by in bands of rows, no plane-sized array made
    rows, columns = tiling.weight_sums(height, width)
    for top in range(0, height, 256):
        band = rows[top : top + 256, None] * columns[None, :]
        acc[:, top : top + 256] /= band
        acc_alpha[:, top : top + 256] /= band
    return acc, acc_alpha


def _resized_shape(shape: Sequence[int], axes: str, scale: float) -> tuple[int, ...]:
    return tuple(max(1, round(n * scale)) if ax in "YX" else n for ax, n in zip(axes, shape))


def _resize(array: np.ndarray, shape: tuple[int, ...], anti_aliasing: bool = False) -> np.ndarray:
    from skimage.transform import resize

    return resize(array, shape, order=1, anti_aliasing=anti_aliasing, preserve_range=True).astype(np.float32)


class _ResizedPlanes:
    """A stack seen with Y and X resized by ``scale``, one Z plane at a time when read.

    The network reads a stack plane by plane, so a lazy (dask, zarr) stack is never
    loaded or resized whole, and a run of some slices resizes only those (plus the
    strided sample the normalization statistics come from). A plane is resized with the
    same filter as a whole volume would be (nothing mixes along Z).
    """

    dtype = np.dtype(np.float32)

    def __init__(self, image: Any, axes: str, scale: float):
        self.image, self.axes, self.scale = image, axes, scale
        self.z_axis = axes.index("Z")
        self.shape = _resized_shape(image.shape, axes, scale)
        self._plane_shape = tuple(n for i, n in enumerate(self.shape) if i != self.z_axis)
        self._cached: tuple[int, np.ndarray] | None = None

    def plane(self, z: int) -> np.ndarray:
        """Plane ``z`` resized, its axes those of the stack without Z (kept for the next read)."""
        if self._cached is None or self._cached[0] != z:
            index = tuple(z if i == self.z_axis else slice(None) for i in range(len(self.axes)))
            raw = _float32(self.image[index])
            self._cached = (z, _resize(raw, self._plane_shape, anti_aliasing=self.scale < 1))
        return self._cached[1]

    def __getitem__(self, index: Any) -> np.ndarray:
        index = tuple(index) if isinstance(index, tuple) else (index,)
        index += (slice(None),) * (len(self.axes) - len(index))
        zs, rest = index[self.z_axis], index[: self.z_axis] + index[self.z_axis + 1 :]
        if isinstance(zs, (int, np.integer)):
            return self.plane(int(zs))[rest]
        planes = [self.plane(z)[rest] for z in range(*zs.indices(self.shape[self.z_axis]))]
        return np.stack(planes, axis=self.z_axis)


def _iter_predict_rescaled(
    loaded: LoadedModel,
    image: Any,
    scale: float,
    *,
    axes: str | None,
    slices: Sequence[int] | None = None,
    **kwargs: Any,
) -> Generator[Progress, None, Prediction]:
    """Resize Y/X by ``scale``, predict, and resize the outputs back (linear).

    Stacks are resized plane by plane as the network reaches them (:class:`_ResizedPlanes`),
    and only the slices that were run are resized back.
    """
    axes = resolve_axes(image.shape, loaded.in_channels, axes)
    spatial = tuple(n for ax, n in zip(axes, image.shape) if ax != "C")
    plane = tuple(n for ax, n in zip(axes, image.shape) if ax in "YX")
    if "Z" in axes:
        small: Any = _ResizedPlanes(image, axes, scale)
    else:
        small = _resize(_float32(image), _resized_shape(image.shape, axes, scale), anti_aliasing=scale < 1)

    def back(values: np.ndarray, shape: tuple[int, ...] = spatial) -> np.ndarray:
        shape = shape + values.shape[len(shape) :]  # keeps a trailing class axis
        return np.clip(_resize(values, shape, anti_aliasing=scale > 1), 0, 1)

    shown: dict[int, np.ndarray] = {}  # slices already resized back for the progress events

    def at_input_size(event: Progress) -> Progress:  # a finished slice, shown at the input's size
        if event.slice_probabilities is None:
            return event
        shown[event.slice_index] = back(event.slice_probabilities, plane)
        return replace(event, slice_probabilities=shown[event.slice_index])

    result = yield from map_progress(
        iter_predict(loaded, small, axes=axes, scale=1.0, slices=slices, **kwargs), at_input_size
    )
    if "Z" not in axes:
        result.probabilities = back(result.probabilities)
        result.attention = [back(a) for a in result.attention]
        return result
    n_z = spatial[0]
    probabilities = np.zeros(spatial + result.probabilities.shape[3:], np.float32)
    attention = [np.zeros(spatial, np.float32) for _ in result.attention]
    for z in range(n_z) if slices is None else sorted(set(slices)):
        probabilities[z] = shown.pop(z) if z in shown else back(result.probabilities[z], plane)
        for full, small_map in zip(attention, result.attention):
            full[z] = back(small_map[z], plane)
    result.probabilities, result.attention = probabilities, attention
    return result


def _pad(tile: np.ndarray, pad, mode: str) -> np.ndarray:
    # reflect needs the pad to be smaller than the axis; fall back to symmetric/edge.
    if mode == "reflect" and (pad[0][1] >= tile.shape[0] or pad[1][1] >= tile.shape[1]):
        mode = "symmetric"
    return np.pad(tile, pad, mode=mode)


def map_progress(
    generator: Generator[Progress, None, Any], transform: Callable[[Progress], Progress]
) -> Generator[Progress, None, Any]:
    """Yield ``transform(event)`` for each event of ``generator``; return its return value.

    Closing the outer generator (Cancel) closes the inner one too.
    """
    try:
        while True:
            try:
                event = next(generator)
            except StopIteration as stop:
                return stop.value
            yield transform(event)
    finally:
        generator.close()


def run(generator: Generator[Progress, None, Any], progress: Callable[[Progress], Any] | None = None) -> Any:
    """Drive a progress generator to its return value, calling ``progress`` on each event.

    ``progress`` returning False cancels (the generator is closed and Cancelled raised).
    """
    while True:
        try:
            event = next(generator)
        except StopIteration as stop:
            return stop.value
        if progress is not None and progress(event) is False:
            generator.close()
            raise Cancelled("cancelled by the caller")


class Cancelled(RuntimeError):
    """A run was cancelled cooperatively; nothing partial was written."""


def predict(
    model: Any, image: Any, *, progress: Callable[[Progress], Any] | None = None, **kwargs
) -> Prediction:
    """Segment ``image``; see :func:`iter_predict` for the arguments.

    Example:
        >>> from napari_r2au import predict
        >>> result = predict("drive-vessels", image)          # doctest: +SKIP
        >>> labels = result.mask(0.5)                          # doctest: +SKIP
    """
    return run(iter_predict(model, image, **kwargs), progress)
