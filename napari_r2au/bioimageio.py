"""A model as a bioimage.io package (rdf.yaml, TorchScript and ONNX weights, test tensors).

Other tools (bioimage.io, deepImageJ, ilastik, bioimageio.core) read this format. The
networks are written by :func:`napari_r2au.export.export_network` (one owner for the
network export); this module adds the description around them and carries the whole
napari-r2au model file (JSON and safetensors) as attachments, so that ``r2au add-model``
can take the package back exactly, without running any code from it
(:mod:`napari_r2au.package_import` reads it back).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from .io import atomic_path
from .package_import import CONFIG_KEY

FORMAT_VERSION = "0.5.4"
#: the test tensors' largest side: a dermoscopy image at its working width (256 px) whole
SAMPLE_SIZE = 256

CITATIONS = [
    {
        "text": "Zuo Q, Chen S, Wang Z. R2AU-Net: Attention Recurrent Residual Convolutional Neural "
        "Network for Multimodal Medical Image Segmentation. Security and Communication Networks 2021.",
        "doi": "10.1155/2021/6625688",
    },
    {
        "text": "Alom MZ et al. Recurrent Residual Convolutional Neural Network based on U-Net (R2U-Net) "
        "for Medical Image Segmentation. 2018.",
        "url": "https://arxiv.org/abs/1802.06955",
    },
    {
        "text": "Oktay O et al. Attention U-Net: Learning Where to Look for the Pancreas. 2018.",
        "url": "https://arxiv.org/abs/1804.03999",
    },
]


def _preprocessing(normalization: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    """The spec's preprocessing for a model's normalization, and what it cannot say."""
    kind = normalization.get("kind", "standardize")
    if kind == "standardize":
        # the engine: each channel's mean and std over the whole image
        return [{"id": "zero_mean_unit_variance", "kwargs": {"axes": ["y", "x"], "eps": 1e-6}}], ""
    if kind == "scale":
        low, high = float(normalization.get("min", 0.0)), float(normalization.get("max", 255.0))
        gain = 1.0 / max(high - low, 1e-6)
        steps: list[dict[str, Any]] = [
            {"id": "scale_linear", "kwargs": {"gain": gain, "offset": -low * gain}}
        ]
        if normalization.get("clip"):
            steps.append({"id": "clip", "kwargs": {"min": 0.0, "max": 1.0}})
        return steps, ""
    note = (
        f"The model's normalization {json.dumps(normalization)} (contrast-limited adaptive histogram "
        "equalization per channel, then a z-score) cannot be expressed as the spec's preprocessing: "
        "only the z-score is declared; apply the equalization before, as napari-r2au does."
    )
    return [{"id": "zero_mean_unit_variance", "kwargs": {"axes": ["y", "x"], "eps": 1e-6}}], note


#: SNOMED CT "Blood Vessel": a colour model that segments it reads fundus photographs
_VESSELS = "59820001"


def reads_fundus_photographs(model: Any) -> bool:
    """Whether the plugin's own sample (a colour fundus photograph) is an image of the kind
    ``model`` segments: a colour model that finds the scale from a field of view, or one
    that segments blood vessels. For any other model a fundus photograph would make test
    tensors and a cover that say nothing about it."""
    meta = model.metadata
    kind = ((meta.get("segment_property") or {}).get("type") or {}).get("value")
    return model.in_channels == 3 and (bool(meta.get("fov_diameter")) or kind == _VESSELS)


def _sample(
    model: Any,
    sample: str | os.PathLike | np.ndarray | None,
    pixel_size: float | None = None,
    pixel_size_unit: str | None = None,
) -> np.ndarray:
    """A real (H, W, C) image at the model's working scale, cropped to SAMPLE_SIZE: the
    user's (a file or an array; a stack gives its middle slice), else the plugin's sample
    for a fundus model; any other model needs one (a colour photograph of a retina says
    nothing about a CT model). ``pixel_size``: the image's, when known (a layer's), so that
    the scale is the one the engine would take."""
    from .engine import _resize, image_plane, working_scale
    from .io import read_image
    from .preprocess import match_channels

    if isinstance(sample, np.ndarray):
        image = sample
    elif sample is not None:
        image = read_image(sample)
    elif reads_fundus_photographs(model):
        from ._sample_data import retina_sample

        image = retina_sample()[0][0]
    else:
        raise ValueError(
            f"{model.name} does not segment fundus photographs, the plugin's own sample: give a real "
            "image of what it segments for the package's test tensors and cover (r2au export "
            "--sample IMAGE; in napari, the image layer chosen in the dock)"
        )
    if np.asarray(image).ndim not in (2, 3, 4):
        raise ValueError(f"the sample must be an image or a stack of images, got shape {np.shape(image)}")
    plane = np.asarray(image_plane(image, model.in_channels), dtype=np.float32)  # a stack: its middle slice
    if plane.ndim == 2:
        plane = plane[..., None]
    if model.in_channels == 1 and plane.shape[-1] > 1:
        plane = plane[..., :3].mean(-1, keepdims=True)
    plane = match_channels(plane, model.in_channels)
    # what the network sees in napari: the image at the model's working scale (a fundus
    # photograph's field of view, a dermoscopy model's image width, the pixel size)
    scale = working_scale(
        model, pixel_size=pixel_size, pixel_size_unit=pixel_size_unit, image=plane, axes="YXC"
    )
    # the centre, cut before resizing (a large image is never resized whole)
    reach = int(np.ceil(SAMPLE_SIZE / scale))
    height, width = plane.shape[:2]
    top, left = max(0, (height - reach) // 2), max(0, (width - reach) // 2)
    plane = plane[top : top + reach, left : left + reach]
    if abs(scale - 1.0) > 1e-6:
        shape = (
            max(16, round(plane.shape[0] * scale)),
            max(16, round(plane.shape[1] * scale)),
            plane.shape[2],
        )
        plane = _resize(plane, shape, anti_aliasing=scale < 1)
    crop = plane[:SAMPLE_SIZE, :SAMPLE_SIZE]
    pad = ((0, (-crop.shape[0]) % 16), (0, (-crop.shape[1]) % 16), (0, 0))
    return np.pad(crop, pad, mode="reflect").astype(np.float32)


def _cover(image: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """Input and output side by side, 8-bit RGB."""
    rgb = image if image.shape[-1] == 3 else np.repeat(image[..., :1], 3, axis=-1)
    low, high = float(rgb.min()), float(rgb.max())
    left = ((rgb - low) / max(high - low, 1e-6) * 255).astype(np.uint8)
    right = np.repeat((np.clip(probabilities, 0, 1) * 255).astype(np.uint8)[..., None], 3, axis=-1)
    return np.concatenate([left, right], axis=1)


def _rdf(model: Any, note: str, names: dict[str, str]) -> dict[str, Any]:
    import torch

    from . import __version__
    from .export import OPSET

    meta = model.metadata
    preprocessing, _ = _preprocessing(model.normalization)
    channels = (
        ["red", "green", "blue"] if model.in_channels == 3 else [f"c{i}" for i in range(model.in_channels)]
    )
    classes = list(meta.get("class_names") or [])[-model.out_channels :] or ["foreground"]
    space_in = [{"type": "space", "id": a, "size": {"min": 16, "step": 16}} for a in ("y", "x")]
    space_out = [{"type": "space", "id": a, "size": {"tensor_id": "image", "axis_id": a}} for a in ("y", "x")]
    return {
        "type": "model",
        "format_version": FORMAT_VERSION,
        "name": f"napari-r2au {model.name}",
        "description": (meta.get("description") or f"R2AU-Net model {model.name}")[:1000],
        "authors": [{"name": "napari-r2au contributors"}],
        "cite": CITATIONS,
        "license": "BSD-3-Clause",
        "documentation": names["documentation"],
        "covers": [names["cover"]],
        "tags": ["segmentation", "r2au-net", "pytorch", "onnx", "2d", "medical"],
        "inputs": [
            {
                "id": "image",
                "axes": [{"type": "batch"}, {"type": "channel", "channel_names": channels}, *space_in],
                "data": {"type": "float32"},
                "test_tensor": {"source": names["test_input"]},
                "preprocessing": preprocessing,
            }
        ],
        "outputs": [
            {
                "id": "probabilities",
                "axes": [{"type": "batch"}, {"type": "channel", "channel_names": classes}, *space_out],
                "data": {"type": "float32", "range": [0.0, 1.0]},
                "test_tensor": {"source": names["test_output"]},
            }
        ],
        "weights": {
            "torchscript": {
                "source": names["torchscript"],
                "pytorch_version": torch.__version__.split("+")[0],
            },
            "onnx": {"source": names["onnx"], "opset_version": OPSET, "parent": "torchscript"},
        },
        "attachments": [{"source": names["model_json"]}, {"source": names["safetensors"]}],
        "config": {
            CONFIG_KEY: {
                "exported_by": f"napari-r2au {__version__}",
                "model_json": names["model_json"],
                "weights": names["safetensors"],
                "threshold": model.threshold,
                "postprocess": list(meta.get("postprocess") or []),
                "normalization_note": note,
                "model": meta,
            }
        },
    }


def _documentation(model: Any, note: str) -> str:
    meta = model.metadata
    provenance = meta.get("provenance") or {}
    return (
        f"# {model.name} (napari-r2au)\n\n{meta.get('description', '')}\n\n"
        "R2AU-Net: a U-Net with recurrent residual convolutions and attention gates.\n\n"
        "## Input and output\n\n"
        f"Input: (batch, {model.in_channels} channels, y, x) float32, y and x multiples of 16 (pad by "
        "reflection and crop the output back). Normalization as declared in preprocessing: "
        f"`{json.dumps(model.normalization)}`. {note}\n\n"
        f"Output: probabilities in [0, 1]; the model's threshold is {model.threshold}; napari-r2au's "
        f"clean-up steps after it: {meta.get('postprocess') or 'none'}.\n\n"
        "The engine also resizes each image to the working scale the model was trained at: "
        f"input_scale {meta.get('input_scale')}, pixel_size {meta.get('pixel_size')} "
        f"{meta.get('pixel_size_unit') or ''}, fov_diameter {meta.get('fov_diameter')}, image_width "
        f"{meta.get('image_width')}. Other tools must resize the same way; the spec cannot express it.\n\n"
        "## Training and validation\n\n"
        f"```json\n{json.dumps(provenance, indent=2)}\n```\n\n"
        "The test tensors come from a real image at the model's working scale, centre-cropped to at "
        f"most {SAMPLE_SIZE} px. The whole napari-r2au "
        "model file is attached (JSON and safetensors): `r2au add-model PACKAGE.zip` takes it back.\n"
    )


def export_bioimageio(
    model: Any,
    path: str | os.PathLike,
    *,
    sample: str | os.PathLike | np.ndarray | None = None,
    overwrite: bool = False,
    sample_pixel_size: tuple[float | None, str | None] = (None, None),
) -> Path:
    """Write ``model`` as a bioimage.io package: a .zip if ``path`` ends with .zip, else a
    folder. An existing target is refused unless ``overwrite``; the zip is written whole or
    not at all. Returns the package's path."""
    import imageio.v3 as iio
    import torch

    from .export import export_network, load_torchscript
    from .model_files import load_model

    loaded = load_model(model) if not hasattr(model, "network") else model
    target = Path(path).expanduser()
    as_zip = target.suffix.lower() == ".zip"
    if (target.exists() or target.is_symlink()) and not overwrite:
        raise FileExistsError(f"{target} exists already; choose another name or overwrite")
    if not as_zip and target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} is a file, not a package folder")
    if not as_zip and target.is_dir() and any(target.iterdir()) and not (target / "rdf.yaml").is_file():
        # overwrite replaces an earlier package, never a folder of the user's other files
        raise FileExistsError(f"{target} is a folder without rdf.yaml, not a package; choose another name")
    name = loaded.name
    names = {
        "torchscript": f"{name}.pt",
        "onnx": f"{name}.onnx",
        "test_input": "test_input.npy",
        "test_output": "test_output.npy",
        "cover": "cover.png",
        "documentation": "README.md",
        "model_json": f"{name}.json",
        "safetensors": f"{name}.safetensors",
    }
    _, note = _preprocessing(loaded.normalization)
    image = _sample(
        loaded, sample, *sample_pixel_size
    )  # before anything is written: a model without one is refused here
    with tempfile.TemporaryDirectory(prefix=".r2au-bioimageio-", dir=target.parent) as tmp:
        work = Path(tmp) / "package"
        work.mkdir()
        for fmt in ("torchscript", "onnx"):
            network, card = export_network(loaded, work / names[fmt], fmt)
            card.unlink()  # the rdf says it all
        tensor = _normalized(image, loaded.normalization)
        with torch.inference_mode():
            output = load_torchscript(work / names["torchscript"])(torch.from_numpy(tensor)).numpy()
        raw = image.transpose(2, 0, 1)[None].astype(np.float32)
        np.save(work / names["test_input"], raw)
        np.save(work / names["test_output"], output.astype(np.float32))
        iio.imwrite(work / names["cover"], _cover(image, output[0, -1]), extension=".png")
        (work / names["documentation"]).write_text(_documentation(loaded, note))
        if loaded.path is None:
            raise ValueError("the model has no file to carry along; save it first")
        shutil.copyfile(loaded.path, work / names["model_json"])
        shutil.copyfile(loaded.path.parent / loaded.metadata["weights_file"], work / names["safetensors"])
        import yaml

        model_json = dict(
            json.loads((work / names["model_json"]).read_text()), weights_file=names["safetensors"]
        )
        (work / names["model_json"]).write_text(json.dumps(model_json, indent=2, sort_keys=True) + "\n")
        rdf = _rdf(loaded, note, names)
        rdf["config"][CONFIG_KEY]["model"] = model_json
        (work / "rdf.yaml").write_text(yaml.safe_dump(rdf, sort_keys=False, allow_unicode=True))
        if as_zip:
            with atomic_path(target) as part, zipfile.ZipFile(part, "w", zipfile.ZIP_DEFLATED) as archive:
                for file in sorted(work.iterdir()):
                    archive.write(file, file.name)
        elif target.exists():
            _swap_in(work, target)
        else:
            os.replace(work, target)
    return target


def _swap_in(new: Path, target: Path) -> None:
    """Put the package folder ``new`` at ``target`` in place of an older package there. The
    old one moves to a hidden sibling first and is deleted only once the new one is in
    place; if that fails it is put back, and if even that fails the error names its folder."""
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent)) / "package"
    os.replace(target, aside)
    try:
        os.replace(new, target)
    except BaseException as exc:  # Ctrl-C included: the old package must not be lost
        try:
            os.replace(aside, target)
        except OSError:
            raise OSError(f"{target} could not be replaced; the earlier package is in {aside}") from exc
        shutil.rmtree(aside.parent, ignore_errors=True)
        raise
    shutil.rmtree(aside.parent, ignore_errors=True)


def _normalized(image: np.ndarray, normalization: dict[str, Any]) -> np.ndarray:
    """(1, C, H, W) as the declared preprocessing gives it (the engine's own normalization)."""
    from .preprocess import normalize

    mean = image.reshape(-1, image.shape[-1]).mean(0)
    std = image.reshape(-1, image.shape[-1]).std(0)
    return normalize(image, normalization, mean, std).transpose(2, 0, 1)[None].astype(np.float32)


def validate(path: str | os.PathLike) -> str:
    """The bioimage.io spec's verdict on a package: '' if valid, else its summary."""
    try:
        from bioimageio.spec import load_description
    except ImportError:
        from .io import missing_extra

        raise missing_extra("validating a bioimage.io package", "bioimageio.spec", "export") from None
    description = load_description(str(path), perform_io_checks=True)
    summary = description.validation_summary
    return "" if summary.status in ("passed", "valid-format") else summary.format()
