"""The backend choice (napari_r2au.backends): OpenVINO gives torch's probabilities on a real
DRIVE photograph, ``auto`` falls back to torch wherever OpenVINO is absent or unsafe, and
the record of a mask names what ran."""

from __future__ import annotations

import builtins
import json

import numpy as np
import pytest

from napari_r2au import predict
from napari_r2au.backends import BackendError, resolve_backend

NO_OPENVINO = "the fast extra (openvino) is not installed: pip install -e '.[fast]'"


@pytest.fixture
def drive_crop(drive_root):
    """A 300x300 crop of a real DRIVE photograph (vessels, the FOV's edge, background)."""
    from napari_r2au.io import read_image

    return read_image(sorted((drive_root / "images").iterdir())[0])[120:420, 80:380]


@pytest.fixture(scope="module")
def vessels():
    from napari_r2au.model_files import load_model

    return load_model("drive-vessels")


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum())


def test_openvino_fp32_gives_torchs_exact_probabilities_and_gates_on_a_drive_crop(vessels, drive_crop):
    pytest.importorskip("openvino", reason=NO_OPENVINO)
    exact = predict(vessels, drive_crop, precision="fp32", backend="torch", attention=True)
    fast = predict(vessels, drive_crop, precision="fp32", backend="openvino", attention=True)
    assert (fast.backend, fast.precision) == ("openvino", "fp32")
    assert (exact.backend, exact.precision) == ("torch", "fp32")
    difference = np.abs(fast.probabilities - exact.probabilities).max()
    assert difference < 1e-4, difference
    assert len(fast.attention) == len(exact.attention) == 4
    assert max(np.abs(a - b).max() for a, b in zip(fast.attention, exact.attention)) < 1e-4


def test_openvino_in_tiles_blends_as_torch_does(vessels, drive_crop):
    """Tiles of 128 with overlap, batches of 4 and a smaller last batch: two compiled shapes."""
    pytest.importorskip("openvino", reason=NO_OPENVINO)
    options = dict(precision="fp32", tile_size=128, overlap=32, batch_size=4)
    exact = predict(vessels, drive_crop, backend="torch", **options).probabilities
    fast = predict(vessels, drive_crop, backend="openvino", **options).probabilities
    assert np.abs(fast - exact).max() < 1e-4


def test_openvino_bf16_masks_agree_with_exact_fp32(vessels, drive_crop):
    pytest.importorskip("openvino", reason=NO_OPENVINO)
    exact = predict(vessels, drive_crop, precision="fp32", backend="torch")
    fast = predict(vessels, drive_crop, precision="bf16", backend="openvino")
    assert fast.precision == "bf16"
    assert _dice(fast.mask() > 0, exact.mask() > 0) > 0.99


def test_the_converted_network_is_kept_in_memory_and_in_the_user_cache(vessels, drive_crop, tmp_path):
    pytest.importorskip("openvino", reason=NO_OPENVINO)
    from napari_r2au import backends

    backends.clear_cache()
    predict(vessels, drive_crop[:64, :64], precision="fp32", backend="openvino")
    cached = list((backends.cache_dir() / "openvino").glob("*.onnx"))
    assert len(cached) == 1 and str(cached[0]).startswith(str(tmp_path))  # R2AU_HOME of the test
    assert not list(cached[0].parent.glob("*.part"))  # written whole (atomically)
    converted = backends._read_converted(vessels)
    assert backends._read_converted(vessels) is converted  # memory
    backends.clear_cache()
    assert backends._read_converted(vessels) is not converted  # read again from the disk cache
    cached[0].write_bytes(b"not an onnx file")  # a damaged cache file is exported again
    backends.clear_cache()
    again = predict(vessels, drive_crop[:64, :64], precision="fp32", backend="openvino")
    assert again.backend == "openvino"


def test_the_first_conversion_exports_in_a_child_process_and_falls_back_to_this_one(
    vessels, monkeypatch, tmp_path
):
    """The ONNX exporter's imports hold the GIL for most of a second: a first conversion in
    napari's process froze the canvas. It runs in a child; without one, here."""
    pytest.importorskip("openvino", reason=NO_OPENVINO)
    import subprocess
    import sys

    import openvino as ov

    from napari_r2au import backends
    from napari_r2au.export import output_names

    target = tmp_path / "apart.onnx"
    assert backends._write_onnx_apart(vessels, target, attention=True)
    outputs = [port.get_any_name() for port in ov.Core().read_model(str(target)).outputs]
    assert outputs == output_names(vessels, True) and len(outputs) == 5  # the gates asked for
    plain = tmp_path / "plain.onnx"
    assert backends._write_onnx_apart(vessels, plain, attention=False)
    assert [port.get_any_name() for port in ov.Core().read_model(str(plain)).outputs] == ["probabilities"]
    # a file that is not the network the parent asked for is not exported
    wrong = [str(vessels.path), str(tmp_path / "wrong.onnx"), "0" * 32, "gates"]
    assert backends._export_for_parent(wrong) == 3 and not (tmp_path / "wrong.onnx").exists()
    # the parent exports nothing: it never imports the onnx package (checked in a fresh process)
    script = (
        "import sys; from napari_r2au import backends; from napari_r2au.model_files import load_model; "
        "backends._read_converted(load_model('drive-vessels')); print('onnx' in sys.modules)"
    )
    fresh = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert fresh.stdout.strip() == "False", fresh.stderr[-500:]
    assert list((tmp_path / "r2au_home" / "cache" / "openvino").glob("*-gates.onnx"))
    # no child (a frozen app): the export runs here, and the network is the same
    monkeypatch.setattr(sys, "frozen", True, raising=False)  # a frozen app's executable is the app
    assert not backends._write_onnx_apart(vessels, tmp_path / "frozen.onnx", attention=True)
    monkeypatch.delattr(sys, "frozen")
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-such-python"))
    backends.clear_cache()
    for cached in (backends.cache_dir() / "openvino").glob("*.onnx"):
        cached.unlink()
    assert not backends._write_onnx_apart(vessels, tmp_path / "none.onnx", attention=True)
    assert backends._read_converted(vessels).outputs[0] == "probabilities"
    assert list((backends.cache_dir() / "openvino").glob("*-gates.onnx"))


def _without_openvino(monkeypatch):
    real_import = builtins.__import__

    def refuse(name, *args, **kwargs):
        if name == "openvino" or name.startswith("openvino."):
            raise ImportError("no openvino in this test")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", refuse)


def test_auto_is_torch_without_openvino_and_an_explicit_openvino_says_how_to_get_it(monkeypatch, vessels):
    import torch

    _without_openvino(monkeypatch)
    cpu = torch.device("cpu")
    assert resolve_backend("auto", vessels, cpu, "fp32").backend == "torch"
    with pytest.raises(BackendError, match=r"not installed.*fast"):
        resolve_backend("openvino", vessels, cpu, "fp32")
    result = predict(vessels, np.zeros((32, 32, 3), np.uint8), backend="auto", precision="fp32")
    assert result.backend == "torch"


def test_auto_keeps_torch_on_cuda_for_fp16_and_for_networks_in_memory(vessels, tiny_net):
    import torch

    from napari_r2au.engine import _as_loaded

    cuda = torch.device("cuda")
    choice = resolve_backend("auto", vessels, cuda, "fp16")
    assert (choice.backend, choice.precision) == ("torch", "fp16")
    with pytest.raises(BackendError, match="CPU"):
        resolve_backend("openvino", vessels, cuda, "fp32")
    cpu = torch.device("cpu")
    assert resolve_backend("auto", vessels, cpu, "fp16").backend == "torch"
    assert resolve_backend("auto", _as_loaded(tiny_net), cpu, "fp32").backend == "torch"
    assert resolve_backend("auto", vessels, cpu, "fp32", fuse=False).backend == "torch"
    with pytest.raises(BackendError, match="backend must be"):
        resolve_backend("onnx", vessels, cpu, "fp32")


def test_auto_picks_openvino_for_a_model_file_on_this_cpu(vessels):
    pytest.importorskip("openvino", reason=NO_OPENVINO)
    import platform

    import torch

    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("auto keeps torch on CPUs other than x86-64")
    assert resolve_backend("auto", vessels, torch.device("cpu"), "auto").backend == "openvino"


def test_a_network_objects_prepared_network_is_cached_until_its_weights_change(tiny_net, monkeypatch):
    import torch

    from napari_r2au.models import fuse

    calls = []
    original = fuse.fuse_for_inference
    monkeypatch.setattr(fuse, "fuse_for_inference", lambda net: calls.append(1) or original(net))
    image = np.random.default_rng(0).random((32, 32, tiny_net.in_channels)).astype(np.float32)
    first = predict(tiny_net, image, precision="fp32").probabilities
    again = predict(tiny_net, image, precision="fp32").probabilities
    assert len(calls) == 1 and np.array_equal(first, again)
    optimizer = torch.optim.SGD(tiny_net.parameters(), lr=0.01)  # training in place
    tiny_net.train()
    loss = tiny_net(torch.from_numpy(image.transpose(2, 0, 1).copy())[None].repeat(2, 1, 1, 1)).mean()
    loss.backward()
    optimizer.step()
    after = predict(tiny_net, image, precision="fp32").probabilities
    assert len(calls) == 2 and not np.array_equal(first, after)
    with torch.no_grad():
        tiny_net.load_state_dict({k: v.clone() for k, v in tiny_net.state_dict().items()})
    predict(tiny_net, image, precision="fp32")
    assert len(calls) == 3


def test_the_mask_record_names_the_backend_and_precision(vessels):
    from napari_r2au.mask_record import export_record, segment_record

    prediction = predict(vessels, np.zeros((32, 32, 3), np.uint8), precision="fp32", backend="torch")
    record = segment_record(prediction, prediction.mask(), threshold=0.5)
    assert (record["backend"], record["precision"]) == ("torch", "fp32")
    sidecar = export_record(record, prediction.mask(), mask_file="m.tif", layer="m")
    assert (sidecar["backend"], sidecar["precision"]) == ("torch", "fp32")


def test_cli_backend_on_segment_and_evaluate(tmp_path, drive_root, monkeypatch, capsys):
    from PIL import Image

    from napari_r2au.cli import main

    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    photograph = sorted((drive_root / "images").iterdir())[0]
    manual = sorted((drive_root / "1st_manual").iterdir())[0]
    Image.open(photograph).crop((80, 120, 240, 280)).save(images / "a.png")
    Image.open(manual).crop((80, 120, 240, 280)).save(masks / "a.png")
    assert main(["segment", str(images / "a.png"), "-o", str(tmp_path / "out"), "--backend", "torch"]) == 0
    assert (tmp_path / "out" / "a_mask.tif").is_file()
    report = tmp_path / "report.json"
    argv = ["evaluate", "--images", str(images), "--masks", str(masks), "--json", str(report)]
    assert main([*argv, "--backend", "torch"]) == 0
    assert json.loads(report.read_text())["inference"]["backend"] == "torch"
    _without_openvino(monkeypatch)
    capsys.readouterr()
    assert main(["segment", str(images / "a.png"), "-o", str(tmp_path / "o2"), "--backend", "openvino"]) == 2
    assert "not installed" in capsys.readouterr().err and not (tmp_path / "o2").exists()


def test_torch_compile_gives_torchs_probabilities_and_is_compiled_once(tiny_net):
    """--backend torch-compile (r2au segment --compile): the same probabilities as the eager
    network, the record names it, and a second image reuses the compiled network."""
    import shutil

    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("torch.compile's inductor needs a C++ compiler on the CPU")
    image = np.random.default_rng(0).random((64, 64, 3)).astype(np.float32)
    eager = predict(tiny_net, image, backend="torch", precision="fp32")
    compiled = predict(tiny_net, image, backend="torch-compile", precision="fp32")
    assert (compiled.backend, compiled.precision) == ("torch-compile", "fp32")
    np.testing.assert_allclose(compiled.probabilities, eager.probabilities, atol=1e-4)
    from napari_r2au.engine import _as_loaded

    def compiled() -> list:
        extra = _as_loaded(tiny_net).extra
        return [value[1] for key, value in extra.items() if key[0] == "compiled"]

    first = compiled()
    assert len(first) == 1 and first[0] is not None
    again = predict(tiny_net, image[::-1].copy(), backend="torch-compile", precision="fp32")
    assert compiled() == first and again.probabilities.shape == (64, 64)  # reused, not compiled again


def test_cli_compile_is_torch_compile_and_refuses_another_backend(tmp_path, capsys):
    from PIL import Image

    from napari_r2au.cli import main

    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    code = main(["segment", str(image), "-o", str(tmp_path / "out"), "--compile", "--backend", "openvino"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--compile" in err[0], err
    assert not (tmp_path / "out").exists()
