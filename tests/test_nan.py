"""NaN is never reported as success: values that overflow float32, arguments that run no
batch, and broken weights are refused with a message."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import tifffile

from napari_r2au import predict
from napari_r2au.cli import main
from napari_r2au.model_files import ModelFileError, load_model

from .test_cli import _tiny_user_model

HUGE = np.full((24, 24), 1e308)  # finite in float64, infinite in float32
HUGE[::2] = -1e308


@pytest.mark.parametrize("scale", [None, 0.5], ids=["as is", "resized"])
def test_float64_values_beyond_float32_are_refused(tiny_net, scale):
    with pytest.raises(ValueError, match="too large for 32-bit floats"):
        predict(tiny_net, HUGE, precision="fp32", scale=scale)


def test_segment_of_a_huge_float64_image_fails(tmp_path, capsys):
    _tiny_user_model()
    tifffile.imwrite(tmp_path / "huge.tif", HUGE)
    assert main(["segment", str(tmp_path / "huge.tif"), "-m", "base", "-o", str(tmp_path / "out")]) == 1
    assert "too large for 32-bit floats" in capsys.readouterr().err
    assert not (tmp_path / "out" / "huge_mask.tif").exists()


@pytest.mark.parametrize(
    "argument, value",
    [("batch_size", -1), ("batch_size", 0), ("overlap", -8), ("tile_size", 0), ("batch_size", 2.5)],
)
def test_arguments_that_would_give_nan_are_refused(tiny_net, argument, value):
    image = np.random.default_rng(0).random((40, 40, 3))
    with pytest.raises(ValueError, match=argument):
        predict(tiny_net, image, precision="fp32", **{"tile_size": 16, argument: value})


def _rewrite_weights(sidecar, change):
    from safetensors.torch import load_file, save_file

    meta = json.loads(sidecar.read_text())
    weights = sidecar.parent / meta["weights_file"]
    tensors = load_file(str(weights))
    change(tensors)
    save_file(tensors, str(weights))
    meta["weights_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    sidecar.write_text(json.dumps(meta))


def _first_float(tensors):
    return next(k for k, v in tensors.items() if v.is_floating_point())


@pytest.mark.parametrize("case, message", [("NaN", "NaN or infinite"), ("integer", "not floating point")])
def test_broken_weights_are_refused_on_load(case, message):
    import torch

    def nan(tensors):
        tensors[_first_float(tensors)][...] = float("nan")

    def integer(tensors):
        key = _first_float(tensors)
        tensors[key] = tensors[key].round().to(torch.int32)

    _rewrite_weights(_tiny_user_model(), nan if case == "NaN" else integer)
    with pytest.raises(ModelFileError, match=message):
        load_model("base")


def test_a_network_that_gives_nan_is_an_error(tiny_net):
    import torch

    with torch.no_grad():
        next(tiny_net.parameters()).fill_(float("nan"))
    with pytest.raises(ValueError, match="gave NaN probabilities"):
        predict(tiny_net, np.random.default_rng(0).random((24, 24, 3)), precision="fp32")
