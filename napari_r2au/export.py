"""A model's network for other tools: TorchScript or ONNX, with a JSON card of how to use it.

The exported network is the one the engine runs on the fp32 path: BatchNorm folded into
the convolutions, in eval mode, on any height and width that are multiples of the
network's ``divisor`` (16: pad by reflection and crop after, as the engine does). It takes
the normalized image, (N, C, H, W) float32, and returns the probabilities (sigmoid, or
softmax over the classes) and, on request, one map per attention gate (finest first, each
at its own resolution). The card next to it (``<file>.json``) says what the engine does
around the network: the normalization and its statistics, the working scale rule, the
threshold, the clean-up steps, and the model's provenance.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .io import atomic_path, write_bytes_atomic

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
#: every format a model can leave in, by file extension: the networks above, and a
#: bioimage.io package (napari_r2au.bioimageio) as one .zip
EXPORT_FORMATS = {**FORMATS, "bioimageio": ".zip"}
CARD_FORMAT = "napari-r2au-exported-network"
#: ONNX operator set: supported by onnxruntime 1.17 and later, and by the other runtimes
OPSET = 17


def _wrapper(network: Any, multiclass: bool, attention: bool) -> Any:
    import torch

    class Exported(torch.nn.Module):
        """The network with its output activation, and the gates' maps when asked for."""

        def __init__(self) -> None:
            super().__init__()
            self.network = network

        def forward(self, image: torch.Tensor) -> Any:
            if attention:
                logits, gates = self.network(image, return_attention=True)
            else:
                logits, gates = self.network(image), []
            probabilities = torch.softmax(logits, 1) if multiclass else torch.sigmoid(logits)
            return (probabilities, *gates) if attention else probabilities

    return Exported().eval()


def output_names(model: Any, attention: bool) -> list[str]:
    gates = int(getattr(model.network, "n_gates", 0) or 0) if attention else 0
    if attention and not gates:
        gates = len(_gate_maps(model))
    return ["probabilities"] + [f"attention{i}" for i in range(1, gates + 1)]


def _gate_maps(model: Any) -> list[Any]:
    import torch

    divisor = int(getattr(model.network, "divisor", 16))
    with torch.inference_mode():
        _, gates = model.network.eval()(
            torch.zeros(1, model.in_channels, divisor * 2, divisor * 2), return_attention=True
        )
    return list(gates)


def card(model: Any, fmt: str, file_name: str, attention: bool) -> dict[str, Any]:
    """What a user of the exported network needs to reproduce the engine's results."""
    from . import __version__

    meta = model.metadata
    return {
        "format": CARD_FORMAT,
        "format_version": 1,
        "file": file_name,
        "network_format": fmt,
        "model": model.name,
        "model_sha256": model.sha256,
        "architecture": meta.get("architecture"),
        "inputs": {
            "name": "image",
            "axes": "NCHW",
            "dtype": "float32",
            "channels": model.in_channels,
            "height_width_multiple_of": int(getattr(model.network, "divisor", 16)),
            "padding": "reflect to the next multiple, crop the outputs back",
        },
        "outputs": {
            "names": output_names(model, attention),
            "probabilities": "sigmoid"
            if model.out_channels == 1
            else f"softmax over {model.out_channels} classes",
            "attention": "one map per gate, finest first, at the gate's own resolution (bilinear to the input size)",
        },
        "normalization": {
            **dict(model.normalization or {}),
            "statistics": "standardize: subtract each channel's mean over the whole image and divide by its std "
            "(the engine's normalization_statistics); scale: (value - min) / (max - min), clipped if 'clip'",
        },
        "working_scale": {
            "input_scale": meta.get("input_scale", 1.0),
            "pixel_size": meta.get("pixel_size"),
            "pixel_size_unit": meta.get("pixel_size_unit"),
            "fov_diameter": meta.get("fov_diameter"),
            "image_width": meta.get("image_width"),
        },
        "threshold": model.threshold,
        "postprocess": list(meta.get("postprocess") or []),
        "description": meta.get("description"),
        "provenance": meta.get("provenance"),
        "exported_by": f"napari-r2au {__version__}",
    }


def export_network(
    model: Any,
    path: str | os.PathLike,
    fmt: str,
    *,
    attention: bool = False,
    overwrite: bool = False,
) -> list[Path]:
    """Write ``model``'s network as ``fmt`` ("onnx" or "torchscript") to ``path`` and its
    card to ``<path>.json``; returns both paths. Existing files are refused unless
    ``overwrite``; each file is written whole or not at all."""
    import torch

    from .model_files import load_model

    if fmt not in FORMATS:
        raise ValueError(f"the export formats are {', '.join(FORMATS)}, not {fmt!r}")
    loaded = load_model(model) if not hasattr(model, "network") else model
    target = Path(path).expanduser()
    if target.is_dir():
        target = target / f"{loaded.name}{FORMATS[fmt]}"
    sidecar = target.with_name(target.name + ".json")
    existing = [p.name for p in (target, sidecar) if p.exists() or p.is_symlink()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{', '.join(existing)} exists already in {target.parent}; choose another name or overwrite"
        )
    if fmt == "onnx":
        write_onnx(loaded, target, attention=attention)
    else:
        with torch.inference_mode(False), torch.no_grad(), atomic_path(target) as tmp:
            traced = torch.jit.trace(_exported(loaded, attention), _example(loaded), check_trace=False)
            traced.save(str(tmp))
    write_bytes_atomic(
        sidecar, (json.dumps(card(loaded, fmt, target.name, attention), indent=2) + "\n").encode()
    )
    return [target, sidecar]


def _exported(loaded: Any, attention: bool) -> Any:
    """The engine's fp32 network (BN folded, eval, CPU) with its output activation."""
    from .models.fuse import fuse_for_inference

    network = fuse_for_inference(loaded.network.eval()).float().cpu().eval()
    return _wrapper(network, loaded.out_channels > 1, attention)


def _example(loaded: Any) -> Any:
    import torch

    divisor = int(getattr(loaded.network, "divisor", 16))
    return torch.zeros(1, loaded.in_channels, divisor * 6, divisor * 8)


def write_onnx(loaded: Any, path: str | os.PathLike, *, attention: bool = False) -> Path:
    """Write ``loaded``'s network as ONNX to ``path``, whole or not at all: the one ONNX
    exporter, for ``r2au export`` and for the OpenVINO backend (napari_r2au.backends)."""
    import torch

    names = output_names(loaded, attention)
    dynamic = {"image": {0: "batch", 2: "height", 3: "width"}}
    dynamic.update({name: {0: "batch", 2: f"{name}_height", 3: f"{name}_width"} for name in names})
    target = Path(path)
    with torch.inference_mode(False), torch.no_grad(), atomic_path(target) as tmp:
        torch.onnx.export(
            _exported(loaded, attention),
            (_example(loaded),),
            str(tmp),
            input_names=["image"],
            output_names=names,
            dynamic_axes=dynamic,
            opset_version=OPSET,
            dynamo=False,
        )
    return target


def load_torchscript(path: str | os.PathLike) -> Any:
    """An exported TorchScript network (for tests and Python users)."""
    import torch

    return torch.jit.load(str(path), map_location="cpu").eval()
