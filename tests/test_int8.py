"""int8 on the OpenVINO backend: made by `r2au quantize`, run by default only after its gate.

One real quantization (drive-vessels on two crops of DRIVE photographs) is shared by the
tests; each test gets it copied into its own user folder.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from .conftest import DRIVE

NEEDS = "the fast extra (openvino, nncf) is not installed"


def _crops(folder: Path) -> tuple[Path, Path]:
    """Two 288x288 crops from inside the field of view of DRIVE images 21 and 22."""
    from PIL import Image

    from napari_r2au.io import read_image

    images, masks = folder / "images", folder / "masks"
    images.mkdir(parents=True)
    masks.mkdir()
    for n in (21, 22):
        photo = np.asarray(read_image(DRIVE / "images" / f"{n}_training.tif"))[150:438, 140:428]
        manual = np.asarray(read_image(DRIVE / "1st_manual" / f"{n}_manual1.gif"))[150:438, 140:428]
        Image.fromarray(photo).save(images / f"{n}.png")
        Image.fromarray(((manual > 0) * 255).astype(np.uint8)).save(masks / f"{n}.png")
    return images, masks


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """(images, masks, folder holding the int8 files, record) of one accepted quantization."""
    pytest.importorskip("openvino", reason=NEEDS)
    pytest.importorskip("nncf", reason=NEEDS)
    if not (DRIVE / "images").is_dir():
        pytest.skip(f"DRIVE training data not found at {DRIVE}")
    from napari_r2au.engine import run
    from napari_r2au.training.quantize import iter_quantize

    work = tmp_path_factory.mktemp("int8")
    images, masks = _crops(work / "data")
    record = run(iter_quantize("drive-vessels", images, masks, dest=work / "made"))
    return images, masks, work / "made", record


def _install(quantized, home: Path) -> Path:
    """The quantization's files put where `r2au quantize` writes them for this test's user."""
    from napari_r2au.backends import int8_key
    from napari_r2au.int8 import with_suffix
    from napari_r2au.model_files import load_model

    stem = home / "int8" / int8_key(load_model("drive-vessels"))
    stem.parent.mkdir(parents=True, exist_ok=True)
    for suffix in (".xml", ".bin", ".json"):
        shutil.copy(quantized[2] / f"drive-vessels{suffix}", with_suffix(stem, suffix))
    return stem


@pytest.fixture
def home(monkeypatch):
    import os

    from napari_r2au import backends

    backends.clear_cache()
    yield Path(os.environ["R2AU_HOME"])
    backends.clear_cache()


def test_an_accepted_int8_network_runs_by_default_and_agrees_with_fp32(quantized, home):
    from napari_r2au import load_model, predict
    from napari_r2au.io import read_image

    images, _, _, record = quantized
    assert record["accepted"] and record["f1_fp32"] - record["f1_int8"] <= record["gate"] == 0.003
    model = load_model("drive-vessels")
    image = np.asarray(read_image(images / "21.png"))
    assert predict(model, image).precision != "int8"  # not yet in this user's folder
    _install(quantized, home)
    fast, exact = predict(model, image), predict(model, image, precision="fp32")
    assert (fast.backend, fast.precision) == ("openvino", "int8")
    a, b = fast.mask(model.threshold) > 0, exact.mask(model.threshold) > 0
    assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.95
    assert predict(model, image, precision="bf16").precision == "bf16"  # asking for a float still gets it


def test_int8_files_that_are_not_the_recorded_ones_are_never_run(quantized, home):
    from napari_r2au import load_model
    from napari_r2au.backends import BackendError, resolve_backend
    from napari_r2au.device import select_device
    from napari_r2au.int8 import with_suffix

    stem = _install(quantized, home)
    with open(with_suffix(stem, ".bin"), "r+b") as handle:  # one byte of the weights changed
        handle.seek(4096)
        byte = handle.read(1)
        handle.seek(4096)
        handle.write(bytes([byte[0] ^ 0xFF]))
    model, cpu = load_model("drive-vessels"), select_device("cpu")
    assert resolve_backend("auto", model, cpu, "auto").precision != "int8"
    with pytest.raises(BackendError, match="no int8 network; make one with `r2au quantize"):
        resolve_backend("auto", model, cpu, "int8")


def test_a_refused_gate_is_recorded_and_explained_and_its_network_is_not_kept(quantized, home):
    from napari_r2au import load_model
    from napari_r2au.backends import BackendError, int8_key, resolve_backend
    from napari_r2au.device import select_device
    from napari_r2au.int8 import int8_dir, new_record, save_int8, with_suffix

    model = load_model("drive-vessels")
    record = new_record(
        model,
        int8_key(model),
        f1_fp32=0.80,
        f1_int8=0.79,
        images=2,
        tiles=2,
        worst_image_loss=0.0,
        overflow_fix="enable",
    )  # 0.01 lost: over the gate
    assert not record["accepted"]
    stem = _install(quantized, home)  # an earlier accepted network is replaced by the verdict
    save_int8(int8_dir() / int8_key(model), record)
    assert not with_suffix(stem, ".bin").exists() and not with_suffix(stem, ".xml").exists()
    cpu = select_device("cpu")
    assert resolve_backend("auto", model, cpu, "auto").precision != "int8"
    with pytest.raises(BackendError, match=r"failed its accuracy gate \(F1 0.7900 against 0.8000"):
        resolve_backend("openvino", model, cpu, "int8")
    with pytest.raises(BackendError, match="int8 runs on OpenVINO"):
        resolve_backend("torch", model, cpu, "int8")


def test_a_record_for_another_network_is_not_taken(quantized, home):
    from napari_r2au import load_model
    from napari_r2au.backends import int8_key
    from napari_r2au.int8 import find_int8, with_suffix

    stem = _install(quantized, home)
    model = load_model("drive-vessels")
    assert find_int8(model, int8_key(model)) is not None
    for other in ("skin-lesions", "ph2-lesions"):  # same architecture, other weights
        target = home / "int8" / int8_key(load_model(other))
        for suffix in (".xml", ".bin", ".json"):
            shutil.copy(with_suffix(stem, suffix), with_suffix(target, suffix))
        assert find_int8(load_model(other), int8_key(load_model(other))) is None
    record = json.loads(with_suffix(stem, ".json").read_text())
    assert record["model"] == "drive-vessels" and record["network_key"] == stem.name


def test_a_network_made_without_the_overflow_fix_runs_by_default_only_on_a_cpu_with_vnni(
    quantized, home, monkeypatch
):
    """Without VNNI, int8 sums saturate in 16 bits unless every layer was quantized to 7 bits:
    an older network (NNCF's first-layer-only fix) gave masks 5-9% off fp32 on an AVX2 CPU
    while its pooled gate passed, so its verdict is trusted only where the CPU has VNNI."""
    from napari_r2au import device, load_model
    from napari_r2au.backends import BackendError, int8_key, resolve_backend
    from napari_r2au.device import select_device
    from napari_r2au.int8 import find_int8, with_suffix

    stem = _install(quantized, home)
    model = load_model("drive-vessels")
    record = json.loads(with_suffix(stem, ".json").read_text())
    assert record["overflow_fix"] == "enable" and record["worst_image_f1_loss"] <= record["gate_per_image"]
    for vnni in (False, True):  # made with the fix: trusted on either CPU
        monkeypatch.setattr(device, "cpu_has_int8_dot", lambda vnni=vnni: vnni)
        assert find_int8(model, int8_key(model)) is not None
    del record["overflow_fix"]  # as the records written before the fix
    with_suffix(stem, ".json").write_text(json.dumps(record))
    monkeypatch.setattr(device, "cpu_has_int8_dot", lambda: False)
    assert find_int8(model, int8_key(model)) is None
    cpu = select_device("cpu")
    assert resolve_backend("auto", model, cpu, "auto").precision != "int8"  # the float path instead
    with pytest.raises(BackendError, match="made without the overflow fix, which this CPU .no VNNI. needs"):
        resolve_backend("auto", model, cpu, "int8")  # asked for by name: said why, not "none"
    monkeypatch.setattr(device, "cpu_has_int8_dot", lambda: True)
    assert find_int8(model, int8_key(model)) is not None
    assert resolve_backend("auto", model, cpu, "auto").precision == "int8"


def test_the_gate_refuses_a_network_that_loses_on_one_image_what_it_gains_on_another():
    from napari_r2au import load_model
    from napari_r2au.backends import int8_key
    from napari_r2au.int8 import Int8Network, new_record

    model = load_model("drive-vessels")
    fixed = dict(images=9, tiles=9, overflow_fix="enable")
    record = new_record(model, int8_key(model), 0.80, 0.80, worst_image_loss=0.032, **fixed)
    assert not record["accepted"]
    assert "worst image -0.0320, gate 0.01" in Int8Network(Path("x"), Path("y"), record).verdict()
    assert new_record(model, int8_key(model), 0.80, 0.799, worst_image_loss=0.009, **fixed)["accepted"]


def test_the_worst_image_loss_leaves_out_images_whose_f1_is_undefined():
    """An image with no vessel in the reference or the mask has no F1 (NaN): counted, it
    would make the verdict hang on the images' order (max keeps a NaN only when first)."""
    from napari_r2au.training.quantize import worst_image_loss

    exact = [{"image": "a", "f1": float("nan")}, {"image": "b", "f1": 0.80}, {"image": "c", "f1": 0.70}]
    int8 = [{"image": "a", "f1": 0.5}, {"image": "b", "f1": 0.78}, {"image": "c", "f1": float("nan")}]
    assert worst_image_loss(exact, int8) == pytest.approx(0.02)
    assert worst_image_loss(exact[::-1], int8[::-1]) == pytest.approx(0.02)
    assert worst_image_loss(exact[1:2], [{"image": "b", "f1": 0.85}]) == 0.0  # a gain is no loss


def test_cli_quantize_and_precision(quantized, tmp_path):
    images, masks, _, _ = quantized
    exe = Path(sys.executable).with_name("r2au")
    env = {"R2AU_HOME": str(tmp_path / "home"), "PATH": str(exe.parent), "OMP_NUM_THREADS": "1"}
    asked = subprocess.run(
        [
            *(str(exe), "segment", str(images / "21.png"), "-m", "drive-vessels"),
            *("-o", str(tmp_path / "out"), "--precision", "int8"),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert asked.returncode == 2 and asked.stderr.count("\n") == 1
    assert "drive-vessels has no int8 network; make one with `r2au quantize drive-vessels" in asked.stderr
    made = subprocess.run(
        [str(exe), "quantize", "drive-vessels", "--images", str(images), "--masks", str(masks)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert made.returncode == 0, made.stderr
    assert "int8 accepted: F1" in made.stdout
    assert list((tmp_path / "home" / "int8").glob("*.json"))
    ran = subprocess.run(
        [
            *(str(exe), "segment", str(images / "21.png"), "-m", "drive-vessels"),
            *("-o", str(tmp_path / "out"), "--precision", "int8"),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert ran.returncode == 0, ran.stderr
    assert (tmp_path / "out" / "21_mask.tif").is_file()


@pytest.mark.parametrize("name", ["retina-vessels", "ct-lungs", "em-membranes"])
def test_bundled_models_ship_an_int8_network_that_passed_its_gate(home, name):
    """bundled_models/int8/NAME.*: made for these very weights (a retrained model without a
    new one fails here), accepted, and run by default."""
    pytest.importorskip("openvino", reason=NEEDS)
    from napari_r2au import load_model, predict
    from napari_r2au.backends import int8_key
    from napari_r2au.int8 import find_int8
    from napari_r2au.model_files import list_models

    model = load_model(name)
    found = find_int8(model, int8_key(model))
    assert found is not None and found.record["accepted"], (
        f"remake {name}'s int8 network for its weights: the commands are in docs/performance.md, int8"
    )
    assert found.record["overflow_fix"] == "enable"  # computes the same with and without VNNI
    assert found.xml.parent.name == "int8"  # not beside the model files, where a record would be listed
    names = [row["name"] for row in list_models()]
    assert name in names and len(names) == len(set(names))  # the record is no model
    from skimage import data

    images = {
        "retina-vessels": data.retina()[::4, ::4],
        "ct-lungs": data.camera()[::2, ::2] * 5.0 - 1000,  # in HU, as the model checks
        "em-membranes": data.camera()[::2, ::2],
    }
    image = images[name]
    assert predict(model, image).precision == "int8"


def test_every_bundled_int8_network_is_tested():
    from pathlib import Path

    import napari_r2au

    folder = Path(napari_r2au.__file__).parent / "bundled_models" / "int8"
    assert sorted(p.stem for p in folder.glob("*.json")) == ["ct-lungs", "em-membranes", "retina-vessels"]


def test_a_malformed_record_is_as_if_there_were_none(home):
    """A record with this project's format and the right network key but no figures (a hand
    edit, another tool) must not crash every run at precision auto."""
    from napari_r2au import load_model
    from napari_r2au.backends import BackendError, int8_key, resolve_backend
    from napari_r2au.device import select_device

    model = load_model("drive-vessels")
    target = home / "int8" / f"{int8_key(model)}.json"
    target.parent.mkdir(parents=True)
    target.write_text(json.dumps({"format": "napari-r2au-int8", "version": 1, "network_key": target.stem}))
    cpu = select_device("cpu")
    assert resolve_backend("auto", model, cpu, "auto").precision != "int8"
    with pytest.raises(BackendError, match="no int8 network"):
        resolve_backend("auto", model, cpu, "int8")


def test_a_network_under_its_gate_is_seen_by_its_own_thread_only(quantized, home):
    import threading

    import openvino as ov

    from napari_r2au import load_model
    from napari_r2au.backends import resolve_backend, trying_int8
    from napari_r2au.device import select_device

    model, cpu, seen = load_model("drive-vessels"), select_device("cpu"), {}
    candidate = ov.Core().read_model(str(quantized[2] / "drive-vessels.xml"))
    with trying_int8(model, candidate):
        seen["gate"] = resolve_backend("auto", model, cpu, "auto").precision
        other = threading.Thread(
            target=lambda: seen.update(other=resolve_backend("auto", model, cpu, "auto").precision)
        )
        other.start()
        other.join()
    assert seen["gate"] == "int8" and seen["other"] != "int8"
    assert resolve_backend("auto", model, cpu, "auto").precision != "int8"  # nothing kept


def test_a_copy_at_another_field_of_view_or_threshold_needs_its_own_gate(quantized, home):
    """The same weights with another threshold: the verdict was measured at the old one."""
    from napari_r2au import load_model
    from napari_r2au.backends import int8_key
    from napari_r2au.int8 import find_int8
    from napari_r2au.model_files import add_model

    _install(quantized, home)
    copy = load_model(add_model("drive-vessels", name="my-drive", threshold=0.4))
    assert int8_key(copy) == int8_key(load_model("drive-vessels"))  # the same network
    assert find_int8(copy, int8_key(copy)) is None
    retina = load_model("retina-vessels")
    wider = load_model(add_model("retina-vessels", name="my-retina", fov_diameter=600))
    assert find_int8(retina, int8_key(retina)) is not None and find_int8(wider, int8_key(wider)) is None


def test_comparisons_of_two_networks_never_measure_one_at_int8(home, monkeypatch):
    """A fine-tune's parent (a model file with an int8 network) and child (a network object)
    are scored at the same float precision."""
    pytest.importorskip("openvino", reason=NEEDS)
    import napari_r2au.training.trainer as trainer
    from napari_r2au import load_model
    from napari_r2au.training.data import Sample

    seen, real = [], trainer.predict

    def spy(*args, **kwargs):
        result = real(*args, **kwargs)
        seen.append(result.precision)
        return result

    monkeypatch.setattr(trainer, "predict", spy)
    image = np.zeros((64, 64, 3), np.float32)
    sample = Sample(image, np.zeros((64, 64), np.uint8), np.ones((64, 64), bool), "blank", image)
    trainer.predict_samples(load_model("retina-vessels"), [sample])
    assert seen and seen[0] != "int8"


def test_quantize_reads_masks_through_a_class_map(quantized, tmp_path, monkeypatch, capsys):
    """ISBI 2012's labels mark the foreground 0: `--class-map 0:1,255:0` gives the same gate
    figures as masks that mark it 255."""
    from PIL import Image

    from napari_r2au.cli import main

    images, masks, _, record = quantized
    inverted = tmp_path / "inverted"
    inverted.mkdir()
    for mask in masks.iterdir():
        Image.fromarray(255 - np.asarray(Image.open(mask))).save(inverted / mask.name)
    monkeypatch.setenv("R2AU_HOME", str(tmp_path / "home"))
    args = ["quantize", "drive-vessels", "--images", str(images), "--masks", str(inverted)]
    assert main([*args, "--class-map", "0:1,255:0", "--dest", str(tmp_path / "made")]) == 0
    made = json.loads((tmp_path / "made" / "drive-vessels.json").read_text())
    assert made["f1_fp32"] == pytest.approx(record["f1_fp32"], abs=1e-6)
    assert made["class_map"] == {"0": 1, "255": 0} and "class_map" not in record  # the gate can be repeated
    assert "int8 accepted" in capsys.readouterr().out
