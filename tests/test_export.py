"""Exported networks (ONNX, TorchScript) give the engine's probabilities on real images."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_r2au.cli import main
from napari_r2au.export import export_network, load_torchscript


def engine_input(model, image: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """The normalized, padded (1, C, H, W) tensor the engine hands its network for a whole
    image at scale 1, as the exported card describes it."""
    from napari_r2au.engine import normalization_statistics
    from napari_r2au.preprocess import match_channels, normalize

    mean, std = normalization_statistics(image, model.in_channels)
    plane = match_channels(
        image.astype(np.float32) if image.ndim == 3 else image[..., None].astype(np.float32),
        model.in_channels,
    )
    tile = normalize(plane, model.normalization, mean, std)
    height, width = tile.shape[:2]
    pad_h, pad_w = (-height) % 16, (-width) % 16
    tile = np.pad(tile, ((0, pad_h), (0, pad_w), (0, 0)), mode="reflect")
    return tile.transpose(2, 0, 1)[None].astype(np.float32), (height, width)


@pytest.fixture
def drive_image(drive_root):
    from napari_r2au.io import read_image

    return read_image(sorted((drive_root / "images").iterdir())[0])


def engine_probabilities(model, image):
    from napari_r2au import predict

    return predict(model, image, precision="fp32", scale=1.0).probabilities


def test_torchscript_gives_the_engines_fp32_probabilities_on_a_drive_photograph(tmp_path, drive_image):
    import torch

    from napari_r2au.model_files import load_model

    model = load_model("drive-vessels")
    network, card = export_network(model, tmp_path / "net.pt", "torchscript")
    tensor, (height, width) = engine_input(model, drive_image)
    with torch.inference_mode():
        exported = load_torchscript(network)(torch.from_numpy(tensor)).numpy()[0, 0, :height, :width]
    difference = np.abs(exported - engine_probabilities(model, drive_image)).max()
    assert difference < 1e-4, difference
    info = json.loads(card.read_text())
    assert info["model"] == "drive-vessels" and info["model_sha256"] == model.sha256
    assert info["inputs"]["height_width_multiple_of"] == 16 and info["threshold"] == model.threshold


def test_onnx_gives_the_engines_fp32_probabilities_and_the_gates_maps(tmp_path, drive_image):
    ort = pytest.importorskip("onnxruntime", reason="the export extra (onnxruntime) is not installed")
    from napari_r2au.model_files import load_model

    model = load_model("drive-vessels")
    network, card = export_network(model, tmp_path, "onnx", attention=True)
    assert network.name == "drive-vessels.onnx"
    session = ort.InferenceSession(str(network), providers=["CPUExecutionProvider"])
    tensor, (height, width) = engine_input(model, drive_image)
    outputs = session.run(None, {"image": tensor})
    names = [o.name for o in session.get_outputs()]
    assert (
        names
        == json.loads(card.read_text())["outputs"]["names"]
        == [
            "probabilities",
            "attention1",
            "attention2",
            "attention3",
            "attention4",
        ]
    )
    difference = np.abs(outputs[0][0, 0, :height, :width] - engine_probabilities(model, drive_image)).max()
    assert difference < 1e-4, difference
    assert outputs[1].shape[2:] == tensor.shape[2:] and outputs[2].shape[2] == tensor.shape[2] // 2


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_every_bundled_model_exports_and_runs_on_another_size(tmp_path, fmt):
    import torch

    from napari_r2au.model_files import list_models, load_model

    bundled = [row["name"] for row in list_models() if row["source"] == "bundled"]
    assert {"retina-vessels", "ct-lungs"} <= set(bundled)
    for name in bundled:
        model = load_model(name)
        network, _ = export_network(model, tmp_path / f"{name}.{fmt}", fmt)
        x = np.random.default_rng(0).standard_normal((1, model.in_channels, 48, 80)).astype(np.float32)
        if fmt == "torchscript":
            with torch.inference_mode():
                out = load_torchscript(network)(torch.from_numpy(x)).numpy()
        else:
            ort = pytest.importorskip("onnxruntime", reason="the export extra (onnxruntime) is not installed")
            out = ort.InferenceSession(str(network), providers=["CPUExecutionProvider"]).run(
                None, {"image": x}
            )[0]
        assert out.shape == (1, model.out_channels, 48, 80) and out.min() >= 0 and out.max() <= 1, name


def test_the_command_line_exports_and_never_replaces_a_file_silently(tmp_path, capsys):
    target = tmp_path / "vessels.pt"
    target.write_bytes(b"the user's own file")
    assert main(["export", "retina-vessels", "--format", "torchscript", "-o", str(target)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("r2au: error:") and "exists already" in err and len(err.splitlines()) == 1
    assert target.read_bytes() == b"the user's own file"
    assert (
        main(["export", "retina-vessels", "--format", "torchscript", "-o", str(target), "--overwrite"]) == 0
    )
    assert "exported retina-vessels as torchscript" in capsys.readouterr().out
    assert load_torchscript(target) is not None
    assert json.loads((tmp_path / "vessels.pt.json").read_text())["working_scale"]["fov_diameter"]
