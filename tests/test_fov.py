"""The working scale of fundus models, derived from each photograph's field of view.

Real photographs of the four fundus sets in ../shared/data: the detector must find the
field's diameter (measured on each set's own FOV masks) on DRIVE, STARE, CHASE_DB1 and HRF,
and keep it when the photograph is darkened, turned grey, JPEG-compressed or cropped.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from napari_r2au.io import read_image
from napari_r2au.preprocess import fov_diameter, fov_working_scale

from .conftest import DATA, ROOT

#: (set, images folder, FOV masks folder, how an image's FOV mask is named)
SETS = {
    "DRIVE": ("DRIVE/training/images", "DRIVE/training/mask", lambda stem: f"{stem}_mask.gif"),
    "STARE": ("STARE/images", "STARE/mask", lambda stem: f"{stem}.png"),
    "CHASE_DB1": ("CHASEDB1/images", "CHASEDB1/mask", lambda stem: f"{stem}.png"),
    "HRF": ("HRF/images", "HRF/mask", lambda stem: f"{stem}_mask.tif"),
}


def _photographs(name: str, count: int = 2) -> list[tuple[np.ndarray, int]]:
    """The first ``count`` photographs of a set, with their field's width from the FOV mask."""
    images, masks, mask_name = SETS[name]
    folder = DATA / images
    if not folder.is_dir():
        pytest.skip(f"{name} not found at {folder} (see ../shared/data/README.md)")
    out = []
    for path in sorted(p for p in folder.iterdir() if p.is_file())[:count]:
        fov = read_image(DATA / masks / mask_name(path.name.split(".")[0]))
        fov = (fov[..., 0] if fov.ndim == 3 else fov) > 0
        columns = np.flatnonzero(fov.any(axis=0))
        out.append((read_image(path), int(columns[-1] - columns[0] + 1)))
    return out


@pytest.mark.parametrize("name", list(SETS))
def test_fov_diameter_on_real_photographs(name):
    """Within 1.5% of the set's own FOV masks (HRF's field is clipped at top and bottom,
    DRIVE and STARE have notches, CHASE_DB1 is dark at the rim)."""
    for image, truth in _photographs(name):
        assert abs(fov_diameter(image) - truth) <= 0.015 * truth, name


@pytest.mark.parametrize("name", list(SETS))
def test_fov_diameter_survives_dark_grey_and_jpeg(name):
    import imageio.v3 as iio

    image, truth = _photographs(name, 1)[0]
    dark = (image * 0.35).astype(np.uint8)
    grey = image[..., 0]  # a red-free camera or a grey copy: one channel
    jpeg = iio.imread(iio.imwrite("<bytes>", image, extension=".jpg", quality=25))
    for variant in (dark, grey, jpeg):
        assert abs(fov_diameter(variant) - truth) <= 0.02 * truth, name


@pytest.mark.parametrize("name", ["DRIVE", "CHASE_DB1"])
def test_fov_diameter_of_a_cropped_photograph(name):
    """A field larger than the frame: the circle is fitted to the corners' arcs."""
    image, truth = _photographs(name, 1)[0]
    height, width = image.shape[:2]
    cropped = image[int(0.15 * height) : int(0.85 * height), int(0.1 * width) : int(0.9 * width)]
    assert abs(fov_diameter(cropped) - truth) <= 0.02 * truth


def test_field_filling_the_frame_falls_back_to_its_width():
    flat = np.full((300, 400, 3), 120, np.uint8)
    assert fov_diameter(flat) == 400
    assert fov_working_scale(flat, 400) == 1.0


def test_scale_near_one_is_one():
    """DRIVE's own photographs (field 536-541 px) run unresized with a 537 px model."""
    image, _ = _photographs("DRIVE", 1)[0]
    assert fov_working_scale(image, 537) == 1.0
    assert fov_working_scale(image, 400) == pytest.approx(400 / fov_diameter(image))


@pytest.fixture
def fov_model(tmp_path) -> Path:
    """The bundled vessel weights under a model file that asks for a 537 px field."""
    bundled = ROOT / "napari_r2au" / "bundled_models"
    meta = json.loads((bundled / "drive-vessels.json").read_text())
    meta.update(name="fov-test", weights_file="fov-test.safetensors", fov_diameter=537)
    shutil.copy(bundled / "drive-vessels.safetensors", tmp_path / "fov-test.safetensors")
    (tmp_path / "fov-test.json").write_text(json.dumps(meta))
    return tmp_path / "fov-test.json"


def test_predict_derives_the_scale_from_the_field_of_view(fov_model):
    from napari_r2au import load_model, predict
    from napari_r2au.engine import working_scale

    model = load_model(fov_model)
    image, _ = _photographs("HRF", 1)[0]
    image = image[::2, ::2]  # quicker, and a different size than HRF's own
    derived = 537 / fov_diameter(image)
    assert working_scale(model, image=image) == pytest.approx(derived)
    assert working_scale(model, 0.5, image=image) == 0.5  # the user's override wins
    assert working_scale(model) == model.input_scale  # no image, no derivation
    result = predict(model, image)
    assert result.scale == pytest.approx(derived)
    assert result.probabilities.shape == image.shape[:2]
    # a model without the record behaves as before: its own scale
    assert predict(load_model("drive-vessels"), image[:256, :256]).scale == 1.0


def test_flip_averaging_uses_one_derived_scale(fov_model):
    from napari_r2au import load_model
    from napari_r2au.engine import run
    from napari_r2au.uncertainty import iter_predict_tta

    image, _ = _photographs("STARE", 1)[0]
    prediction = run(iter_predict_tta(load_model(fov_model), image))
    spread = prediction.uncertainty
    assert prediction.scale == pytest.approx(537 / fov_diameter(image))
    assert spread.shape == image.shape[:2]


def test_segment_cli_prints_the_derived_scale(fov_model, tmp_path, capsys):
    from napari_r2au.cli import main

    source = DATA / "STARE" / "images" / "im0001.ppm"
    if not source.is_file():
        pytest.skip(f"STARE not found at {source}")
    code = main(["segment", str(source), "-m", str(fov_model), "-o", str(tmp_path / "out")])
    assert code == 0
    out = capsys.readouterr().out
    scale = 537 / fov_diameter(read_image(source))
    assert f"at scale {scale:.3g}, from the field of view" in out
    assert read_image(tmp_path / "out" / "im0001_mask.tif").shape == (605, 700)


def test_stare_and_chase_pair_with_their_own_mask_names():
    """im0001.ppm with labels-ah/im0001.ah.ppm; Image_01L.jpg with 1stHO/Image_01L_1stHO.png."""
    from napari_r2au.training.data import folder_samples

    for images, masks, fov in (
        ("STARE/images", "STARE/labels-ah", "STARE/mask"),
        ("CHASEDB1/images", "CHASEDB1/1stHO", "CHASEDB1/mask"),
    ):
        if not (DATA / images).is_dir():
            pytest.skip(f"{DATA / images} not found")
        samples = folder_samples(DATA / images, DATA / masks, DATA / fov, fov_diameter=537)
        assert len(samples) == 4
        for sample in samples:
            assert 0.04 < sample.mask[sample.fov].mean() < 0.25  # vessels, inside the field
            # each photograph resized so that its field is about 537 px across
            columns = np.flatnonzero(sample.fov.any(axis=0))
            assert abs(int(columns[-1] - columns[0] + 1) - 537) <= 0.03 * 537


def test_ppm_opens_in_napari_reader_as_an_image_and_its_labels_as_labels():
    from napari_r2au._reader import napari_get_reader

    image_path = DATA / "STARE" / "images" / "im0001.ppm"
    label_path = DATA / "STARE" / "labels-ah" / "im0001.ah.ppm"
    if not image_path.is_file():
        pytest.skip(f"STARE not found at {image_path}")
    reader = napari_get_reader(str(image_path))
    assert reader is not None
    data, _, kind = reader(str(image_path))[0]
    assert kind == "image" and np.shape(data) == (605, 700, 3)
    assert napari_get_reader(str(label_path)) is not None


def test_evaluate_predicts_each_photograph_at_its_own_derived_scale(fov_model, tmp_path, capsys):
    """r2au evaluate on STARE and CHASE_DB1 together: each at its field of view's scale."""
    from napari_r2au.cli import main

    pairs = (
        ("STARE/images/im0001.ppm", "STARE/labels-ah/im0001.ah.ppm", "STARE/mask/im0001.png"),
        (
            "CHASEDB1/images/Image_01L.jpg",
            "CHASEDB1/1stHO/Image_01L_1stHO.png",
            "CHASEDB1/mask/Image_01L.png",
        ),
    )
    for folder in ("images", "masks", "fov"):
        (tmp_path / folder).mkdir()
    for image, mask, fov in pairs:
        if not (DATA / image).is_file():
            pytest.skip(f"{DATA / image} not found")
        for folder, path in zip(("images", "masks", "fov"), (image, mask, fov)):
            (tmp_path / folder / Path(path).name).symlink_to(DATA / path)
    report = tmp_path / "report.json"
    args = [
        "evaluate",
        "-m",
        str(fov_model),
        "--images",
        str(tmp_path / "images"),
        "--masks",
        str(tmp_path / "masks"),
        "--fov",
        str(tmp_path / "fov"),
        "--json",
        str(report),
    ]
    assert main(args) == 0
    rows = {row["image"]: row for row in json.loads(report.read_text())["per_image"]}
    for image, _, _ in pairs:
        expected = 537 / fov_diameter(read_image(DATA / image))
        assert rows[Path(image).name]["scale"] == pytest.approx(expected, abs=1e-4)
    out = capsys.readouterr().out
    assert out.split()[:2] == ["image", "scale"]  # the table says which scale each image ran at
    for image, _, _ in pairs:
        assert f"{537 / fov_diameter(read_image(DATA / image)):.3g}" in out


def test_a_fundus_model_on_an_image_without_a_field_of_view_keeps_its_own_scale(fov_model):
    """A dark-background picture that is no fundus photograph (a star field) would otherwise
    be blown up eightfold: no plausible field, no derived scale, and the user is told."""
    from skimage import data

    from napari_r2au import load_model
    from napari_r2au.checks import input_notices
    from napari_r2au.engine import working_scale

    model = load_model(fov_model)
    stars = data.hubble_deep_field()
    assert working_scale(model, image=stars) == model.input_scale
    assert any("shows none" in notice for notice in input_notices(model, stars))
    assert input_notices(model, data.retina()) == []


def test_fine_tuning_a_fundus_model_with_a_validation_pair_and_the_mask_before(fov_model):
    """Each pair at its own field's scale, the validation pair at its own, and the mask
    Segment made kept with its pair (the arguments reach prepare_samples by name)."""
    from napari_r2au import load_model
    from napari_r2au.engine import run
    from napari_r2au.training.data import binarize_mask
    from napari_r2au.training.finetune import iter_finetune
    from napari_r2au.training.settings import FinetuneSettings

    images = [DATA / "STARE" / "images" / f"{n}.ppm" for n in ("im0001", "im0002")]
    if not images[0].is_file():
        pytest.skip("STARE not found")
    masks = [
        binarize_mask(read_image(DATA / "STARE" / "labels-ah" / f"{p.stem}.ah.ppm"), p.name) for p in images
    ]
    train, held = (read_image(images[0]), masks[0]), (read_image(images[1]), masks[1])
    before = masks[0].copy()
    before[:100] = 0  # what Segment made before the user's corrections
    settings = FinetuneSettings(steps=2, patch_size=64, batch_size=2)
    result = run(
        iter_finetune(
            load_model(fov_model),
            [train],
            validation=held,
            settings=settings,
            originals=[before],
            name="fov-test-ft",
        )
    )
    assert result.model is not None and result.model.fov_diameter == 537
    assert result.scales == [pytest.approx(537 / fov_diameter(train[0]))]
