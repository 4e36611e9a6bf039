"""The whole CT path with the bundled ct-lungs model, on real slices of ../shared/data/LUNG_CT:
slices written as a DICOM series in stored values with a rescale, opened by the reader in
Hounsfield units, segmented as a stack, exported as a DICOM SEG and read back."""

from __future__ import annotations

import numpy as np
import pytest

from napari_r2au.io import read_image

from .conftest import DATA

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("highdicom")

LUNG = DATA / "LUNG_CT"
UID = "1.2.826.0.1.3680043.8.498.77"
#: the slices ct-lungs held out for validation (training/configs/ct-lungs.yaml, seed 0)
HELD_OUT = ["ID_0002_Z_0162", "ID_0003_Z_0132", "ID_0011_Z_0156"]


def _held_out_names() -> list[str]:
    from napari_r2au.training.config import load_config
    from napari_r2au.training.data import Sample, split

    from .conftest import ROOT

    config = load_config(ROOT / "training" / "configs" / "ct-lungs.yaml")
    names = sorted(p.name for p in (LUNG / "2d_images").iterdir())
    blank = np.zeros((1, 1, 1), np.float32)
    stubs = [Sample(blank, blank[..., 0].astype(np.uint8), blank[..., 0] > 0, name, blank) for name in names]
    return [s.name.split(".")[0] for s in split(stubs, config.val_images, config.seed)[1]]


def _write_series(folder, names: list[str]) -> np.ndarray:
    """The slices as one CT series (stored value = HU + 1024, rescale intercept -1024)."""
    from pydicom.data import get_testdata_file

    template = get_testdata_file("CT_small.dcm")
    if template is None:
        pytest.skip("pydicom's test file is not installed")
    folder.mkdir()
    volume = []
    for index, name in enumerate(names):
        # below -1024 HU (outside the scanner's field) is what an unsigned stored value cannot hold
        hounsfield = np.maximum(read_image(LUNG / "2d_images" / f"{name}.tif").astype(np.int32), -1024)
        volume.append(hounsfield)
        dataset = pydicom.dcmread(template)
        dataset.Rows, dataset.Columns = hounsfield.shape
        dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = (
            16,
            16,
            15,
            0,
        )
        dataset.RescaleIntercept, dataset.RescaleSlope = -1024, 1
        dataset.PixelSpacing = [0.7, 0.7]
        dataset.ImageOrientationPatient, dataset.ImagePositionPatient = (
            [1, 0, 0, 0, 1, 0],
            [0.0, 0.0, 5.0 * index],
        )
        dataset.SOPInstanceUID, dataset.InstanceNumber = f"{UID}.{index}", index + 1
        dataset.PixelData = np.clip(hounsfield + 1024, 0, 65535).astype(np.uint16).tobytes()
        dataset.save_as(folder / f"slice{index}.dcm")
    return np.stack(volume)


@pytest.fixture
def lungs():
    if not (LUNG / "2d_images").is_dir():
        pytest.skip(f"LUNG_CT not found at {LUNG} (see ../shared/data/README.md)")
    from napari_r2au.model_files import list_models

    if "ct-lungs" not in {row["name"] for row in list_models()}:
        pytest.fail("the bundled ct-lungs model is missing")
    return LUNG


def test_the_held_out_slices_are_the_configs_validation_split(lungs):
    assert _held_out_names() == HELD_OUT


def test_ct_series_to_dicom_seg_and_back(lungs, tmp_path, capsys):
    from napari_r2au._reader import read_layers
    from napari_r2au.cli import main
    from napari_r2au.training.metrics import confusion

    series = tmp_path / "series"
    hounsfield = _write_series(series, HELD_OUT)
    ((image, kwargs, kind),) = read_layers(str(series))
    assert kind == "image" and image.shape == hounsfield.shape
    np.testing.assert_array_equal(np.asarray(image), hounsfield)  # in HU: the rescale was applied

    out = tmp_path / "out"
    assert main(["segment", str(series), "-m", "ct-lungs", "--dicom-seg", "-o", str(out)]) == 0
    assert "Hounsfield" not in capsys.readouterr().err  # real HU: no screenshot warning
    mask = read_image(out / "series_mask.tif")
    truth = np.stack([read_image(LUNG / "2d_masks" / f"{name}.tif") > 0 for name in HELD_OUT])
    dice = confusion(truth, mask > 0).rates()["f1"]
    assert dice > 0.9, f"ct-lungs Dice {dice:.3f} on its held-out slices"

    # the SEG refers to the series: put beside it, it opens over the stack as the same mask
    (series / "lungs_seg.dcm").write_bytes((out / "series_seg.dcm").read_bytes())
    layers = read_layers(str(series))
    labels = [layer for layer in layers if layer[2] == "labels"]
    assert len(labels) == 1
    np.testing.assert_array_equal(np.asarray(labels[0][0]) > 0, mask > 0)


def test_a_screenshot_of_a_ct_slice_is_warned_about(lungs, tmp_path, capsys):
    from napari_r2au.cli import main
    from napari_r2au.io import write_png

    hounsfield = read_image(LUNG / "2d_images" / f"{HELD_OUT[0]}.tif").astype(np.float32)
    screenshot = (np.clip((hounsfield + 1000) / 1400, 0, 1) * 255).astype(np.uint8)
    write_png(tmp_path / "shot.png", screenshot)
    assert main(["segment", str(tmp_path / "shot.png"), "-m", "ct-lungs", "-o", str(tmp_path / "out")]) == 0
    assert "Hounsfield" in capsys.readouterr().err
