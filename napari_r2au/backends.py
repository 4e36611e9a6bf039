"""Which runtime runs the network's forward pass: PyTorch, or OpenVINO on the CPU.

The one place that picks the backend (:func:`resolve_backend`) and prepares it
(:func:`prepare_forward`). The engine keeps everything around the forward pass (reading,
normalization, tiling, blending, scale, progress, cancellation) and only calls the
:class:`Forward` this module hands it, so both backends give the same kind of result.

OpenVINO is an optional extra (``pip install napari-r2au[fast]``), imported only when
asked for. Its network is the ONNX file that ``r2au export`` writes
(:func:`napari_r2au.export.write_onnx`: BatchNorm folded, eval mode), exported once per
model in a child process (the exporter's imports would freeze napari), kept in memory and in
the user cache folder, and compiled once per tile shape
(a static shape runs faster than a dynamic one on this project's CPUs; see
docs/performance.md, "Backends").
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import device as _device
from .device import PRECISIONS, autocast_dtype

if TYPE_CHECKING:
    import torch

    from .model_files import LoadedModel

#: the backend requests; "auto" is resolved by :func:`resolve_backend`
BACKENDS = ("auto", "torch", "openvino", "torch-compile")
#: the ones a dock offers: torch-compile spends about a minute compiling before the first
#: tile, which pays off over a long batch run (r2au segment --compile), not one image
INTERACTIVE_BACKENDS = ("auto", "torch", "openvino")
#: the precisions OpenVINO runs here (its CPU plugin's f16 needs AMX-FP16, which we cannot
#: test); int8 only for a model with an int8 network that passed its accuracy gate
#: (:mod:`napari_r2au.training.quantize`)
OPENVINO_PRECISIONS = ("fp32", "bf16", "int8")
#: the precision requests of inference: the trainer's, and int8
INFERENCE_PRECISIONS = (*PRECISIONS, "int8")
#: OpenVINO's names of our precisions (INFERENCE_PRECISION_HINT)
_OV_PRECISION = {"fp32": "f32", "bf16": "bf16"}
#: compiled tile shapes kept per model and precision (tiling gives two: full and last batch)
MAX_SHAPES = 8
#: converted models kept in memory (each holds its compiled shapes)
MAX_MODELS = 4
#: seconds a child may take to export a network (it takes a few; a hung one is given up)
EXPORT_TIMEOUT = 120


class BackendError(ValueError):
    """A backend that cannot run this request (not installed, wrong device, precision)."""


@dataclass(frozen=True)
class Choice:
    """What runs the network: ``backend`` ("torch" or "openvino") at ``precision``
    ("fp32", "bf16" or "fp16"), and why, for the record and the logs."""

    backend: str
    precision: str
    reason: str = ""


def openvino_available() -> bool:
    """True if the ``openvino`` package imports (the ``fast`` extra)."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def precision_name(amp: Any) -> str:
    """Our name of an autocast dtype (None: exact fp32)."""
    import torch

    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(amp, "fp32")


def _has_file_identity(loaded: LoadedModel) -> bool:
    """True for a model read from its file (whose weights' sha256 load_model checked):
    its conversion may be shared by sha256. A LoadedModel built in memory (a fine-tune's
    blend, a validation during training) may carry a sha256 its weights no longer have."""
    return bool(loaded.sha256) and loaded.path is not None


def resolve_backend(
    backend: str,
    loaded: LoadedModel,
    device: torch.device,
    precision: str,
    *,
    fuse: bool = True,
) -> Choice:
    """The one place that picks the backend and the precision it runs at.

    ``auto`` picks OpenVINO only where it is installed, measured faster and safe: on an
    x86-64 CPU (measured on AVX-512 machines; other CPUs keep torch), for a model loaded
    from a file (a bare network may be in training: converting it after every step would
    cost more than it saves), at fp32 or bf16, with BatchNorm folding on (``fuse=False``
    asks for the plain torch path). Everywhere else, CUDA and MPS included, torch.
    An explicit ``openvino`` that cannot run is an error rather than a silent fallback.

    Precision ``auto`` on OpenVINO is int8 for a model whose int8 network passed its
    accuracy gate (:mod:`napari_r2au.int8`, made by ``r2au quantize``), else the device's
    float (bf16 where the CPU has it and it measures faster:
    :func:`napari_r2au.device.cpu_bf16_is_faster`). ``int8`` asked for without such a network is an
    error that says how to make one, or why its gate refused it.
    """

    if backend not in BACKENDS:
        raise BackendError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if precision == "int8":
        problem = _openvino_problem(device) or _int8_problem(loaded)
        if backend not in ("auto", "openvino"):
            problem = f"int8 runs on OpenVINO, not on backend {backend}"
        if problem:
            raise BackendError(f"precision int8: {problem}")
        return Choice("openvino", "int8", "asked for")
    resolved = precision_name(autocast_dtype(device, precision))  # also checks the request
    if backend == "torch":
        return Choice("torch", resolved, "asked for")
    if backend == "torch-compile":  # never picked by auto: its first call costs about a minute
        return Choice("torch-compile", resolved, "asked for")
    problem = _openvino_problem(device)
    if problem is None and resolved not in OPENVINO_PRECISIONS:
        problem = f"OpenVINO runs fp32 or bf16 here, not {resolved}"
    if backend == "openvino":
        if problem:
            raise BackendError(f"backend openvino: {problem}; use --backend torch or auto")
        if precision == "auto" and _int8_problem(loaded) is None:
            return Choice("openvino", "int8", _INT8_REASON)
        return Choice("openvino", resolved, "asked for")
    if problem is None and platform.machine().lower() not in ("x86_64", "amd64"):
        problem = f"not measured faster on {platform.machine()} CPUs"
    if problem is None and not _has_file_identity(loaded):
        problem = "a network object (perhaps in training), not a model file"
    if problem is None and not fuse:
        problem = "fuse=False asks for the plain torch network"
    if problem:
        return Choice("torch", resolved, problem)
    if precision == "auto" and _int8_problem(loaded) is None:  # looked up only where OpenVINO runs
        return Choice("openvino", "int8", _INT8_REASON)
    return Choice("openvino", resolved, "installed, on the CPU, measured faster")


_INT8_REASON = "its int8 network passed the accuracy gate (r2au quantize)"


def _openvino_problem(device: torch.device) -> str | None:
    """Why OpenVINO cannot run here, or None."""
    if device.type != "cpu":
        return f"OpenVINO runs on the CPU here, not on {device.type}"
    if not openvino_available():
        return "OpenVINO is not installed (pip install 'napari-r2au[fast]')"
    return None


def _int8_problem(loaded: LoadedModel) -> str | None:
    """Why this model has no int8 network to run, or None."""
    if not _has_file_identity(loaded):
        return "only a model file has an int8 network (a network object has none)"
    if _held_int8(loaded) is not None:
        return None
    from .int8 import find_int8, made_before_overflow_fix

    found = find_int8(loaded, int8_key(loaded))
    remake = f"`r2au quantize {loaded.name} --images ... --masks ...`"
    if found is None and made_before_overflow_fix(loaded, int8_key(loaded)):
        return (
            f"{loaded.name}'s int8 network was made without the overflow fix, which this CPU (no VNNI) "
            f"needs for exact int8 sums; remake it with {remake}"
        )
    if found is None:
        return f"{loaded.name} has no int8 network; make one with {remake}"
    if not found.record.get("accepted"):
        return f"{loaded.name}'s int8 network failed its accuracy gate ({found.verdict()}); it is not used"
    return None


class Forward:
    """One batch through the network: (N, C, H, W) float32 in, the probabilities
    (N, K, H, W) and each gate's map bilinearly at the input size (N, H, W) out."""

    choice: Choice

    def __call__(self, batch: np.ndarray, attention: bool) -> tuple[np.ndarray, list[np.ndarray]]:
        raise NotImplementedError


def _gates_at(gate_maps: list[Any], height: int, width: int) -> list[np.ndarray]:
    """Gate maps (torch tensors or arrays, (N, 1, h, w)) at (height, width), as the engine
    always resized them (torch's bilinear, half-pixel centres)."""
    import torch
    import torch.nn.functional as F

    out = []
    for gate in gate_maps:
        tensor = torch.as_tensor(gate).float()
        out.append(
            F.interpolate(tensor, size=(height, width), mode="bilinear", align_corners=False)
            .cpu()
            .numpy()[:, 0]
        )
    return out


def int8_float_hint() -> str:
    """OpenVINO's precision for the layers an int8 network leaves unquantized: the CPU's
    default float (bf16 only where it measures faster, :func:`napari_r2au.device.cpu_bf16_is_faster`)."""
    return "bf16" if _device.cpu_bf16_is_faster() else "f32"


def _compiled(loaded: LoadedModel, runner: Any, key: tuple) -> Any:
    """``runner`` through ``torch.compile`` (inductor, static shapes), kept in the model's
    cache beside the prepared network it wraps, so that the next predict call reuses it and
    it goes when the model goes. Static shapes mean one compile per input shape: each image
    size when planes run whole, the full and the last batch of tiles when tiled."""
    import torch

    cached = loaded.extra.get(key)
    if cached is not None and cached[0] is runner:
        return cached[1]
    compiled = torch.compile(runner, dynamic=False)
    if key[2]:  # fuse: the runner is the cache's private copy, which may be held. Unfused it is
        # the caller's own network, which a network object's cache must not keep alive
        loaded.extra[key] = (runner, compiled)  # a newer prepared network replaces the older one
    return compiled


def inference_network(loaded: LoadedModel, device: torch.device, fuse: bool, channels_last: bool):
    """The network to run: BN-folded and in NHWC layout on request, cached per model."""
    import torch

    from .models.fuse import fuse_for_inference

    key = ("inference_network", str(device), fuse, channels_last)
    cached = loaded.extra.get(key)
    if cached is not None:
        return cached
    network = loaded.network.eval()
    runner = fuse_for_inference(network) if fuse else network
    runner = runner.to(device)
    if channels_last:
        runner = runner.to(memory_format=torch.channels_last)
    if fuse:  # a private copy: safe to keep
        loaded.extra[key] = runner
    return runner


class TorchForward(Forward):
    """The engine's PyTorch path: the prepared network (BN folded, NHWC) under autocast;
    for the ``torch-compile`` backend the same network through ``torch.compile``."""

    def __init__(
        self, loaded: LoadedModel, device: torch.device, choice: Choice, fuse: bool, channels_last: bool
    ):

        self.choice, self.device, self.channels_last = choice, device, channels_last
        self.multiclass = loaded.out_channels > 1
        self.amp = None if choice.precision == "fp32" else autocast_dtype(device, choice.precision)
        self.runner = inference_network(loaded, device, fuse, channels_last)
        if choice.backend == "torch-compile":
            key = ("compiled", str(device), fuse, channels_last)
            self.runner = _compiled(loaded, self.runner, key)

    def __call__(self, batch: np.ndarray, attention: bool) -> tuple[np.ndarray, list[np.ndarray]]:
        import torch

        tensor = torch.from_numpy(batch).to(self.device, non_blocking=True)
        if self.channels_last:
            tensor = tensor.contiguous(memory_format=torch.channels_last)
        with (
            torch.inference_mode(),
            torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None),
        ):
            if attention:
                logits, gate_maps = self.runner(tensor, return_attention=True)
            else:
                logits, gate_maps = self.runner(tensor), []
            probs = torch.softmax(logits.float(), 1) if self.multiclass else torch.sigmoid(logits.float())
            gates = _gates_at(list(gate_maps), batch.shape[2], batch.shape[3])
        return probs.cpu().numpy(), gates


def cache_dir() -> Path:
    """The user cache folder of converted networks (``R2AU_HOME``/cache overrides)."""
    home = os.environ.get("R2AU_HOME")
    if home:
        return Path(home) / "cache"
    import platformdirs

    return Path(platformdirs.user_cache_dir("napari-r2au"))


def network_key(loaded: LoadedModel) -> str:
    """What identifies a converted network: the weights' sha256 and everything that
    builds the network from them (architecture, its arguments, channels)."""
    meta = loaded.metadata
    identity = {
        "weights_sha256": loaded.sha256,
        "architecture": meta.get("architecture"),
        "arch_args": meta.get("arch_args"),
        "in_channels": loaded.in_channels,
        "out_channels": loaded.out_channels,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:32]


class _Converted:
    """One model's network read into OpenVINO, and its compiled shapes (LRU)."""

    def __init__(self, model: Any, outputs: list[str]):
        self.model, self.outputs = model, outputs
        self.compiled: OrderedDict[tuple, Any] = OrderedDict()
        self.lock = threading.Lock()

    def compiled_for(self, shape: tuple[int, ...], precision: str, threads: int) -> Any:
        """The network compiled for one input shape, precision and thread count (cached)."""
        import openvino as ov

        key = (shape, precision, threads)
        with self.lock:
            if key in self.compiled:
                self.compiled.move_to_end(key)
                return self.compiled[key]
            model = self.model.clone()
            model.reshape({"image": ov.PartialShape(list(shape))})
            hint = int8_float_hint() if precision == "int8" else _OV_PRECISION[precision]
            config = {
                "INFERENCE_PRECISION_HINT": hint,
                "INFERENCE_NUM_THREADS": threads,
                "PERFORMANCE_HINT": "LATENCY",
            }
            compiled = ov.Core().compile_model(model, "CPU", config)
            self.compiled[key] = compiled
            while len(self.compiled) > MAX_SHAPES:
                self.compiled.popitem(last=False)
            return compiled


_CONVERTED: OrderedDict[str, _Converted] = OrderedDict()
_LOCK = threading.Lock()


def _read_converted(loaded: LoadedModel) -> _Converted:
    """The model's network in OpenVINO: from memory, else from the disk cache, else
    exported now (and written to the cache atomically, so a crash leaves no half file)."""
    import openvino as ov

    from .export import output_names, write_onnx

    has_gates = _has_gates(loaded)
    outputs = output_names(loaded, has_gates)
    key = int8_key(loaded) if _has_file_identity(loaded) else None
    if key is None:  # a network in memory: kept with it (for a bare network, per weights version)
        cached = loaded.extra.get("openvino")
        if cached is None:
            import tempfile

            with tempfile.TemporaryDirectory() as folder:
                path = write_onnx(loaded, Path(folder) / "network.onnx", attention=has_gates)
                cached = _Converted(ov.Core().read_model(str(path)), outputs)
            loaded.extra["openvino"] = cached
        return cached
    with _LOCK:
        if key in _CONVERTED:
            _CONVERTED.move_to_end(key)
            return _CONVERTED[key]
    # exported outside the lock (seconds, once per model and machine): other models stay
    # usable meanwhile, and two threads exporting one model write the same file atomically
    path = cache_dir() / "openvino" / f"{key}.onnx"
    if not path.is_file():
        _export(loaded, path, has_gates)
    try:
        model = ov.Core().read_model(str(path))
    except RuntimeError:  # a damaged cache file: export it again
        _export(loaded, path, has_gates)
        model = ov.Core().read_model(str(path))
    with _LOCK:
        if key in _CONVERTED:  # another thread was quicker
            return _CONVERTED[key]
        converted = _Converted(model, outputs)
        _CONVERTED[key] = converted
        while len(_CONVERTED) > MAX_MODELS:
            _CONVERTED.popitem(last=False)
        return converted


def _export(loaded: LoadedModel, path: Path, attention: bool) -> None:
    """A model file's network written to ``path``: in a child process, else here."""
    if not _write_onnx_apart(loaded, path, attention):
        from .export import write_onnx

        write_onnx(loaded, path, attention=attention)


def _write_onnx_apart(loaded: LoadedModel, path: Path, attention: bool) -> bool:
    """Export the model file's network to ``path`` in a child process; False if that failed.

    The ONNX exporter imports the ``onnx`` package, whose ml_dtypes extension holds the GIL
    for most of a second while it loads: in napari's process that froze the canvas at a
    model's first conversion (``python -m benchmarks.segment_stall`` with a new R2AU_HOME).
    A child process shares no GIL; it happens once per model and machine (the disk cache),
    and the caller exports in-process when no child can run (a frozen app, no interpreter).
    """
    import logging
    import subprocess
    import sys

    if getattr(sys, "frozen", False) or not sys.executable or loaded.path is None:
        return False  # a frozen app's executable is the app itself, not an interpreter
    # -P: nothing in napari's working folder is imported in place of a module (without it
    # the child would put that folder first on sys.path); the package's own folder comes last
    package_root = Path(__file__).resolve().parents[1]
    command = [
        sys.executable,
        *(["-P"] if sys.version_info >= (3, 11) else []),
        "-c",
        _CHILD,
        str(package_root),
        str(Path(loaded.path).resolve()),
        str(Path(path).resolve()),
        network_key(loaded),
        "gates" if attention else "plain",
    ]
    extra = {"creationflags": subprocess.CREATE_NO_WINDOW} if sys.platform == "win32" else {}
    try:
        done = subprocess.run(
            command,
            cwd=package_root,  # for Python 3.10, which has no -P
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=EXPORT_TIMEOUT,
            check=False,
            **extra,
        )
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        logging.getLogger(__name__).info(
            "exporting %s in a child failed (%s); exporting here", loaded.name, exc
        )
        return False
    if done.returncode != 0 or not path.is_file():
        last = (done.stderr or "").strip().splitlines()[-1:] or ["no message"]
        logging.getLogger(__name__).info("exporting %s in a child failed: %s", loaded.name, last[0])
        return False
    return True


#: the child's program: its arguments are the package's folder, then _export_for_parent's
_CHILD = (
    "import sys; sys.path.append(sys.argv[1]); "
    "from napari_r2au.backends import _export_for_parent; sys.exit(_export_for_parent(sys.argv[2:]))"
)


def _export_for_parent(arguments: list[str]) -> int:
    """The child of :func:`_write_onnx_apart`: export a model file's network, if it is the
    network the parent asked for (same key), whole or not at all."""
    from .export import write_onnx
    from .model_files import load_model_file

    model_path, target, key, gates = arguments
    loaded = load_model_file(model_path)
    if network_key(loaded) != key:  # the file changed since the parent read it
        return 3
    write_onnx(loaded, target, attention=gates == "gates")
    return 0


def clear_cache() -> None:
    """Forget the converted and compiled networks held in memory (not the disk cache)."""
    with _LOCK:
        _CONVERTED.clear()
        _INT8.clear()


#: accepted int8 networks in memory, by network key, as read from their files
_INT8: dict[str, _Converted] = {}


def _has_gates(loaded: LoadedModel) -> bool:
    """Whether the model's network has attention gates (exported as extra outputs)."""
    return bool(getattr(loaded.network, "attention", False))


def int8_key(loaded: LoadedModel) -> str:
    """What identifies a model's network, gates or not: its int8 network is made for it alone."""
    return f"{network_key(loaded)}-{'gates' if _has_gates(loaded) else 'plain'}"


def openvino_model(loaded: LoadedModel) -> Any:
    """The model's network in OpenVINO at full precision: what int8 calibration starts from."""
    return _read_converted(loaded).model


def forget_int8(loaded: LoadedModel) -> None:
    """Drop the model's int8 network held in memory: the next run reads its files again."""
    with _LOCK:
        _INT8.pop(int8_key(loaded), None)


#: per thread, an int8 network under its accuracy gate (:func:`trying_int8`): seen by that
#: thread's runs only, never by another thread's, and never kept
_CANDIDATE = threading.local()


def _held_int8(loaded: LoadedModel) -> _Converted | None:
    key = int8_key(loaded)
    candidate = getattr(_CANDIDATE, "networks", {}).get(key)
    if candidate is not None:
        return candidate
    with _LOCK:
        return _INT8.get(key)


def _read_int8(loaded: LoadedModel) -> _Converted:
    """The model's accepted int8 network (resolve_backend checked that there is one), built
    from the very bytes whose sha256 matched its record (a file replaced in between is
    refused, not half-read)."""
    held = _held_int8(loaded)
    if held is not None:
        return held
    import openvino as ov

    from .export import output_names
    from .int8 import find_int8, read_verified

    found = find_int8(loaded, int8_key(loaded))
    files = read_verified(found) if found is not None and found.record.get("accepted") else None
    if files is None:
        raise BackendError(f"{loaded.name} has no accepted int8 network (its files changed or are gone)")
    xml, weights = files
    model = ov.Core().read_model(xml.decode(), ov.Tensor(np.frombuffer(weights, np.uint8).copy()))
    converted = _Converted(model, output_names(loaded, _has_gates(loaded)))
    with _LOCK:
        _INT8[int8_key(loaded)] = converted
    return converted


@contextmanager
def trying_int8(loaded: LoadedModel, model: Any) -> Iterator[None]:
    """Run ``model`` (an OpenVINO int8 network not yet accepted) as the model's int8 network
    inside the block, in this thread only: how its accuracy gate measures it through the
    engine itself."""
    from .export import output_names

    key = int8_key(loaded)
    networks = getattr(_CANDIDATE, "networks", None)
    if networks is None:
        networks = _CANDIDATE.networks = {}
    networks[key] = _Converted(model, output_names(loaded, _has_gates(loaded)))
    try:
        yield
    finally:
        networks.pop(key, None)


#: per thread, the batches the network is given while :func:`recording_inputs` is open
_RECORDING = threading.local()


@contextmanager
def recording_inputs(limit: int) -> Iterator[list[np.ndarray]]:
    """Every tile the network is given in this thread inside the block, as (1, C, H, W) arrays
    (at most ``limit``): the engine's own inputs (normalized, at the working scale, padded),
    which is what int8 calibration must see."""
    tiles: list[np.ndarray] = []
    _RECORDING.tiles, _RECORDING.limit = tiles, limit
    try:
        yield tiles
    finally:
        _RECORDING.tiles = None


class _Recording(Forward):
    def __init__(self, inner: Forward, tiles: list[np.ndarray], limit: int):
        self.inner, self.tiles, self.limit, self.choice = inner, tiles, limit, inner.choice

    def __call__(self, batch: np.ndarray, attention: bool) -> tuple[np.ndarray, list[np.ndarray]]:
        for tile in batch:
            if len(self.tiles) < self.limit:
                self.tiles.append(np.array(tile[None], np.float32))
        return self.inner(batch, attention)


def threads() -> int:
    """OpenVINO's thread count: torch's (so OMP_NUM_THREADS and torch.set_num_threads
    govern both backends alike)."""
    import torch

    return max(1, int(torch.get_num_threads()))


class OpenVINOForward(Forward):
    """The network converted to OpenVINO, compiled per tile shape."""

    def __init__(self, loaded: LoadedModel, choice: Choice):
        self.choice = choice
        self.converted = _read_int8(loaded) if choice.precision == "int8" else _read_converted(loaded)
        self.threads = threads()
        self.requests: dict[tuple[int, ...], Any] = {}  # one infer request per shape for this run

    def __call__(self, batch: np.ndarray, attention: bool) -> tuple[np.ndarray, list[np.ndarray]]:
        shape = tuple(int(n) for n in batch.shape)
        request = self.requests.get(shape)
        if request is None:
            compiled = self.converted.compiled_for(shape, self.choice.precision, self.threads)
            request = self.requests[shape] = compiled.create_infer_request()
        request.infer({"image": np.ascontiguousarray(batch, np.float32)})
        results = [request.get_output_tensor(i).data for i in range(len(self.converted.outputs))]
        probs = np.array(results[0], np.float32)  # a copy: the request's buffer is reused
        gates = _gates_at([np.asarray(g) for g in results[1:]], shape[2], shape[3]) if attention else []
        return probs, gates


def prepare_forward(
    loaded: LoadedModel,
    device: torch.device,
    precision: str = "auto",
    backend: str = "auto",
    *,
    fuse: bool = True,
    channels_last: bool = True,
) -> Forward:
    """The forward pass the engine runs, on the backend :func:`resolve_backend` picks."""
    choice = resolve_backend(backend, loaded, device, precision, fuse=fuse)
    if choice.backend == "openvino":
        forward: Forward = OpenVINOForward(loaded, choice)
    else:
        forward = TorchForward(loaded, device, choice, fuse, channels_last)
    tiles = getattr(_RECORDING, "tiles", None)
    return forward if tiles is None else _Recording(forward, tiles, _RECORDING.limit)
