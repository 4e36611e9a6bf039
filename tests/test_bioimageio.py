"""bioimage.io packages: valid by the spec's own validator, and taken back exactly."""

from __future__ import annotations

import numpy as np
import pytest

from napari_r2au.cli import main

DATA_SAMPLES = {
    "drive-vessels": "DRIVE/training/images/21_training.tif",
    "skin-lesions": "PH2/images/IMD002.png",
    "em-membranes": "ISBI2012_EM/images/0.png",
    "ct-lungs": "LUNG_CT/2d_images",
}


def _sample_path(shared, name):
    path = shared / DATA_SAMPLES[name]
    if path.is_dir():
        path = sorted(path.iterdir())[0]
    if not path.exists():
        pytest.skip(f"{path} is not here (the shared data folder)")
    return path


@pytest.fixture
def shared():
    """The shared data folder, found as the other tests find it (R2AU_DATA, else ../shared/data)."""
    from .conftest import DATA

    if not DATA.is_dir():
        pytest.skip(f"the shared data folder is not here ({DATA}; set R2AU_DATA)")
    return DATA


@pytest.mark.parametrize("name", ["drive-vessels", "skin-lesions", "em-membranes", "ct-lungs"])
def test_bundled_models_export_as_packages_the_spec_accepts(tmp_path, shared, name):
    pytest.importorskip("bioimageio.spec", reason="the export extra (bioimageio.spec) is not installed")
    from napari_r2au.bioimageio import validate

    package = tmp_path / f"{name}.zip"
    assert (
        main(
            [
                "export",
                name,
                "--format",
                "bioimageio",
                "-o",
                str(package),
                "--sample",
                str(_sample_path(shared, name)),
            ]
        )
        == 0
    )
    assert validate(package) == ""


def test_the_test_image_is_one_of_what_the_model_segments_at_its_working_scale(tmp_path, shared, capsys):
    """Without --sample only a fundus model takes the plugin's fundus photograph; a lesion
    model is refused in one line, before anything is written. The test tensors are what
    the network sees in napari: the image at the model's working scale."""
    pytest.importorskip("onnx", reason="the bioimage.io package carries an ONNX copy (export extra)")
    import zipfile

    lesions = tmp_path / "lesions.zip"
    assert main(["export", "skin-lesions", "--format", "bioimageio", "-o", str(lesions)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--sample" in err and "fundus" in err
    assert list(tmp_path.iterdir()) == []

    # a PH2 photograph (767x576) at skin-lesions' working width of 128 px: 128x96, whole
    sample = _sample_path(shared, "skin-lesions")
    assert (
        main(
            ["export", "skin-lesions", "--format", "bioimageio", "-o", str(lesions), "--sample", str(sample)]
        )
        == 0
    )
    with zipfile.ZipFile(lesions) as archive:
        archive.extract("test_input.npy", tmp_path / "lesions")
    assert np.load(tmp_path / "lesions" / "test_input.npy").shape == (1, 3, 96, 128)

    # the plugin's 1411 px sample at retina-vessels' 671 px field of view, centre-cropped
    retina = tmp_path / "retina.zip"
    assert main(["export", "retina-vessels", "--format", "bioimageio", "-o", str(retina)]) == 0
    with zipfile.ZipFile(retina) as archive:
        archive.extract("test_input.npy", tmp_path / "retina")
    from napari_r2au._sample_data import retina_sample

    photo = retina_sample()[0][0]
    tensor = np.load(tmp_path / "retina" / "test_input.npy")
    assert tensor.shape == (1, 3, 256, 256)
    # resized, not the full-size photograph's own centre
    top, left = ((n - 256) // 2 for n in photo.shape[:2])
    raw = photo[top : top + 256, left : left + 256].astype(np.float32).transpose(2, 0, 1)[None]
    assert np.abs(tensor - raw).mean() > 5


def test_the_test_image_of_a_stack_is_its_middle_slice_and_its_pixel_size_counts(shared):
    """A CT volume given as the sample gives its middle slice (not a slice across it), and an
    image whose pixels are twice the model's size is resized as the engine would resize it."""
    from napari_r2au.bioimageio import SAMPLE_SIZE, _sample
    from napari_r2au.io import read_image
    from napari_r2au.model_files import load_model

    ct = load_model("ct-lungs")
    slices = sorted((shared / "LUNG_CT" / "2d_images").iterdir())[:3]
    volume = np.stack([read_image(path) for path in slices])  # (3, 512, 512) in HU
    plane = _sample(ct, volume)
    assert plane.shape == (SAMPLE_SIZE, SAMPLE_SIZE, 1)
    np.testing.assert_array_equal(plane, _sample(ct, volume[1]))

    em = load_model("em-membranes")  # 4 nm pixels
    section = read_image(_sample_path(shared, "em-membranes"))
    same, coarse = _sample(em, section, 4.0, "nm"), _sample(em, section, 8.0, "nm")
    assert same.shape == coarse.shape == (SAMPLE_SIZE, SAMPLE_SIZE, 1)
    centre = (section.shape[0] - SAMPLE_SIZE) // 2
    np.testing.assert_allclose(
        same[..., 0], section[centre : centre + SAMPLE_SIZE, centre : centre + SAMPLE_SIZE]
    )
    assert np.abs(coarse - same).mean() > 1  # 8 nm pixels: a 128 px centre enlarged twofold


def test_round_trip_gives_the_same_masks_and_foreign_packages_are_refused(
    tmp_path, shared, monkeypatch, capsys
):
    import zipfile

    from napari_r2au import predict
    from napari_r2au.io import read_image
    from napari_r2au.model_files import load_model

    monkeypatch.setenv("R2AU_HOME", str(tmp_path / "home"))
    sample = _sample_path(shared, "em-membranes")
    package = tmp_path / "em.zip"
    assert (
        main(
            ["export", "em-membranes", "--format", "bioimageio", "-o", str(package), "--sample", str(sample)]
        )
        == 0
    )
    assert main(["export", "em-membranes", "--format", "bioimageio", "-o", str(package)]) == 2
    assert "exists already" in capsys.readouterr().err
    assert main(["add-model", str(package), "--name", "em-back"]) == 0
    image = read_image(sample)[:256, :256]
    original = predict(load_model("em-membranes"), image, precision="fp32").mask(0.525)
    back = predict(load_model("em-back"), image, precision="fp32").mask(0.525)
    assert np.array_equal(original, back)
    capsys.readouterr()

    foreign = tmp_path / "foreign.zip"
    with zipfile.ZipFile(package) as src, zipfile.ZipFile(foreign, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == "rdf.yaml":
                data = data.replace(b"napari_r2au:", b"someone_else:")
            dst.writestr(item, data)
    assert main(["add-model", str(foreign), "--name", "foreign"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a package made by napari-r2au" in err

    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as dst:
        dst.writestr("../escape.txt", b"x")
    assert main(["add-model", str(evil), "--name", "evil"]) == 2
    assert "a package is flat" in capsys.readouterr().err
    assert not (tmp_path / "escape.txt").exists()


def test_a_package_folder_is_replaced_whole_and_a_user_folder_never(tmp_path, shared, capsys):
    """--overwrite on a folder package swaps in the new package; a folder that is not a
    package (no rdf.yaml) is refused even with --overwrite and keeps its files."""
    sample = str(_sample_path(shared, "em-membranes"))
    folder = tmp_path / "em-package"
    export = ["export", "em-membranes", "--format", "bioimageio", "--sample", sample]
    assert main([*export, "-o", str(folder)]) == 0
    (folder / "stale.txt").write_text("from before")
    assert main([*export, "-o", str(folder), "--overwrite"]) == 0
    assert (folder / "rdf.yaml").is_file() and not (folder / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["em-package"]  # nothing left aside

    mine = tmp_path / "my-results"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert main([*export, "-o", str(mine), "--overwrite"]) == 2
    assert "not a package" in capsys.readouterr().err
    assert (mine / "notes.txt").read_text() == "keep me"


def test_an_interrupted_package_swap_puts_the_old_package_back(tmp_path, monkeypatch):
    """Ctrl-C between moving the old package aside and moving the new one in: the old
    package is back at its place, and nothing is left beside it."""
    import os

    from napari_r2au import bioimageio

    old, new = tmp_path / "pkg", tmp_path / "new"
    for folder, text in ((old, "old"), (new, "new")):
        folder.mkdir()
        (folder / "rdf.yaml").write_text(text)
    real, calls = os.replace, []

    def interrupted(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the new package moving in
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(bioimageio.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        bioimageio._swap_in(new, old)
    assert (old / "rdf.yaml").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "pkg"]


@pytest.mark.parametrize("name", ["retina-vessels", "em-membranes"])
def test_packages_pass_bioimageio_cores_own_test(tmp_path, shared, name):
    """The reference implementation loads the package, runs its test input through the
    declared preprocessing and the ONNX weights, and gets the test output back. It lives in
    an environment of its own (`make bioimageio-core`; `make test` points here at it)."""
    import os
    import subprocess

    cli = os.environ.get("R2AU_BIOIMAGEIO_CORE")
    cli = os.path.abspath(cli) if cli else ""
    if not cli or not os.path.exists(cli):
        pytest.skip(
            "bioimageio.core's environment is not set up (make bioimageio-core; R2AU_BIOIMAGEIO_CORE)"
        )
    pytest.importorskip("onnx", reason="the bioimage.io package carries an ONNX copy (export extra)")
    package = tmp_path / f"{name}.zip"
    sample = [] if name == "retina-vessels" else ["--sample", str(_sample_path(shared, name))]
    assert main(["export", name, "--format", "bioimageio", "-o", str(package), *sample]) == 0
    done = subprocess.run(
        [cli, "test", str(package), "--weight-format", "onnx"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "BIOIMAGEIO_CACHE_PATH": str(tmp_path / "cache")},
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "Reproduce test outputs from test inputs (onnx)" in done.stdout
