"""The bad-input matrix of the reliability issue, through each face: engine, CLI, trainer, widget.

Each bad case must give an error that names the problem (and write nothing half-done);
each merely unusual case (RGBA, 16-bit, bool, 1x1) must just work.
"""

from __future__ import annotations

import numpy as np
import pytest

from napari_r2au import predict
from napari_r2au.training.data import DataError, make_sample, memory_samples

RNG = np.random.default_rng(0)

BAD_IMAGES = {
    "empty": (np.zeros((0, 10, 3)), "the image has an empty axis"),
    "4D without axes": (RNG.random((2, 3, 20, 20)), "cannot tell the axes"),
    "5D without axes": (RNG.random((2, 2, 3, 20, 20)), "cannot tell the axes"),
    "NaN": (np.full((20, 20, 3), np.nan), "NaN or infinite"),
    "Inf": (np.where(RNG.random((20, 20)) > 0.5, np.inf, 1.0), "NaN or infinite"),
    "2 channels into a 3-channel model": (RNG.random((20, 20, 2)), "2 channels but the model expects 3"),
    "complex": (RNG.random((20, 20)).astype(np.complex64), "unsupported pixel type complex64"),
    "text": (np.full((5, 5), "a"), "unsupported pixel type"),
}

UNUSUAL_IMAGES = {
    "1x1": np.ones((1, 1), np.uint8),
    "RGBA": RNG.integers(0, 255, (24, 20, 4), dtype=np.uint8),
    "16-bit": RNG.integers(0, 65535, (24, 20, 3), dtype=np.uint16),
    "bool": RNG.random((24, 20)) > 0.5,
}


def _flip_averaged(model, image, **kwargs):
    from napari_r2au.engine import run
    from napari_r2au.uncertainty import iter_predict_tta

    return run(iter_predict_tta(model, image, **kwargs))


#: the two ways to predict: one pass, and the mean of flipped copies (segment --tta)
PREDICTORS = {"predict": predict, "flip-averaged": _flip_averaged}


@pytest.mark.parametrize("face", list(PREDICTORS))
@pytest.mark.parametrize("case", list(BAD_IMAGES))
def test_engine_names_the_problem(tiny_net, case, face):
    image, message = BAD_IMAGES[case]
    with pytest.raises(ValueError, match=message):
        PREDICTORS[face](tiny_net, image, precision="fp32")


@pytest.mark.parametrize("face", list(PREDICTORS))
@pytest.mark.parametrize("case", list(UNUSUAL_IMAGES))
def test_engine_handles_unusual_images(tiny_net, case, face):
    image = UNUSUAL_IMAGES[case]
    result = PREDICTORS[face](tiny_net, image, precision="fp32")
    assert result.probabilities.shape == image.shape[:2]
    assert np.isfinite(result.probabilities).all()


def _write_files(folder):
    import tifffile

    folder.mkdir()
    good = RNG.integers(0, 255, (40, 48, 3), dtype=np.uint8)
    tifffile.imwrite(folder / "good16.tif", (good.astype(np.uint16) * 257))
    import imageio.v3 as iio

    iio.imwrite(folder / "rgba.png", np.dstack([good, np.full((40, 48), 255, np.uint8)]))
    tifffile.imwrite(folder / "whole.tif", good)
    (folder / "truncated.tif").write_bytes((folder / "whole.tif").read_bytes()[:300])
    # (not truncated.png: with truncated.tif it would share the outputs truncated_mask.tif, ...)
    (folder / "cut.png").write_bytes((folder / "rgba.png").read_bytes()[:100])
    (folder / "text.png").write_text("this is not an image")
    tifffile.imwrite(folder / "nan.tif", np.full((16, 16), np.nan, np.float32))
    tifffile.imwrite(folder / "fourd.tif", np.zeros((2, 3, 16, 16), np.uint8))


def test_cli_reports_each_bad_file_and_writes_the_good_ones(tmp_path, capsys):
    from napari_r2au.cli import main
    from napari_r2au.model_files import build_metadata, save_model, user_models_dir
    from napari_r2au.models import create_model

    save_model(
        create_model("r2au_net", base_width=4),
        user_models_dir(),
        build_metadata(name="tiny", architecture="r2au_net", arch_args={"base_width": 4}),
    )
    _write_files(tmp_path / "in")
    out = tmp_path / "not" / "yet" / "there"  # a missing output folder is created
    assert main(["segment", str(tmp_path / "in"), "-m", "tiny", "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "5 of 8 files failed" in err
    for name, reason in (
        ("truncated.tif", "cannot read"),
        ("cut.png", "cannot read"),
        ("text.png", "cannot read"),
        ("nan.tif", "NaN or infinite"),
        ("fourd.tif", "cannot tell the axes"),
    ):
        assert any(name in line and reason in line for line in err.splitlines()), (name, err)
    written = sorted(p.name for p in out.iterdir())
    assert written == [
        ".r2au-outputs.json",
        "good16_mask.tif",
        "good16_prob.tif",
        "rgba_mask.tif",
        "rgba_prob.tif",
        "whole_mask.tif",
        "whole_prob.tif",
    ]  # nothing for the failures, no temporary files


def test_trainer_names_bad_pairs():
    image = RNG.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    with pytest.raises(DataError, match="differ in size"):
        make_sample(image, np.zeros((30, 32)), "a", 3)
    with pytest.raises(DataError, match=r"mask has values \[0, 1, 2\]"):
        make_sample(image, RNG.integers(0, 3, (32, 32)), "b", 3)
    with pytest.raises(DataError, match="NaN or infinite"):
        make_sample(np.full((32, 32, 3), np.nan), np.zeros((32, 32)), "c", 3)
    with pytest.raises(DataError, match="no annotated slice"):
        memory_samples([(np.zeros((3, 32, 32)), np.zeros((3, 32, 32), np.uint8))], 1)


def test_trainer_refuses_all_background_masks_from_files(tmp_path):
    import imageio.v3 as iio

    from napari_r2au.training.trainer import TrainConfig, iter_train

    for folder in ("images", "masks"):
        (tmp_path / folder).mkdir()
    for i in range(3):
        iio.imwrite(tmp_path / "images" / f"{i}.png", RNG.integers(0, 255, (64, 64, 3), dtype=np.uint8))
        iio.imwrite(tmp_path / "masks" / f"{i}.png", np.zeros((64, 64), np.uint8))
    config = TrainConfig(
        base_width=4,
        steps=2,
        patch_size=32,
        batch_size=2,
        val_images=1,
        output_dir=str(tmp_path / "run"),
        data={"kind": "folders", "images": str(tmp_path / "images"), "masks": str(tmp_path / "masks")},
    )
    with pytest.raises(DataError, match="every training mask is empty"):
        next(iter_train(config))
    assert not (tmp_path / "run" / "best.json").exists()
    # in memory (a fine-tune correction), all background is a valid answer: "nothing here"
    samples = memory_samples([(np.zeros((64, 64, 3), np.uint8), np.zeros((64, 64), np.uint8))], 3)
    config.output_dir = str(tmp_path / "run2")
    events = list(iter_train(config, samples=samples, val_samples=[]))
    assert events[-1].step == 2


def test_cli_says_when_pixel_size_cannot_apply(tmp_path, capsys):
    import tifffile

    from napari_r2au.cli import main
    from napari_r2au.model_files import build_metadata, save_model, user_models_dir
    from napari_r2au.models import create_model

    save_model(
        create_model("unet", base_width=4),
        user_models_dir(),
        build_metadata(name="plain", architecture="unet", arch_args={"base_width": 4}),
    )
    tifffile.imwrite(tmp_path / "a.tif", RNG.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    assert (
        main(
            [
                "segment",
                str(tmp_path / "a.tif"),
                "-m",
                "plain",
                "-o",
                str(tmp_path / "out"),
                "--pixel-size",
                "0.5",
            ]
        )
        == 0
    )
    assert "records no pixel size, so --pixel-size is ignored" in capsys.readouterr().err
    assert (
        main(
            [
                "segment",
                str(tmp_path / "a.tif"),
                "-m",
                "plain",
                "-o",
                str(tmp_path / "out"),
                "--pixel-unit",
                "mm",
            ]
        )
        == 0
    )
    assert "--pixel-unit without --pixel-size" in capsys.readouterr().err


@pytest.mark.gui
def test_widgets_turn_bad_layers_into_notifications(make_napari_viewer, qtbot, notifications):
    from napari_r2au.model_files import build_metadata, save_model, user_models_dir
    from napari_r2au.models import create_model

    from .test_widgets import dock, messages, wait_idle

    save_model(
        create_model("r2au_net", base_width=4),
        user_models_dir(),
        build_metadata(name="tiny", architecture="r2au_net", arch_args={"base_width": 4}),
    )
    viewer = make_napari_viewer()
    segment = dock(viewer, "Segment")
    before = len(viewer.layers)
    viewer.add_image(np.zeros((2, 3, 16, 16), np.float32), name="4d")
    segment.segment(layer=viewer.layers["4d"])
    assert "has 4 spatial dimensions" in messages(notifications)
    viewer.add_image(np.full((16, 16), np.nan, np.float32), name="nan")
    segment.segment(layer=viewer.layers["nan"])
    wait_idle(qtbot, segment)
    assert "Segmentation failed: ValueError: the image contains NaN or infinite values" in messages(
        notifications
    )
    assert len(viewer.layers) == before + 2  # no output layers from either failure

    finetune = dock(viewer, "Fine-tune")
    viewer.add_image(np.zeros((32, 32), np.uint8), name="small")
    labels = viewer.add_labels(np.ones((30, 32), np.uint8), name="other size")
    finetune._image.value, finetune._corrected.value = viewer.layers["small"], labels
    finetune.run()
    assert "differ in size" in messages(notifications) and not finetune.running


@pytest.mark.gui
def test_finetune_refusing_mixed_units_stays_usable(make_napari_viewer, notifications):
    from napari_r2au.model_files import build_metadata, save_model, user_models_dir
    from napari_r2au.models import create_model

    from .test_widgets import bars, dock, messages

    save_model(
        create_model("r2au_net", base_width=4),
        user_models_dir(),
        build_metadata(name="tiny", architecture="r2au_net", arch_args={"base_width": 4}),
    )
    viewer = make_napari_viewer()
    image, mask = bars()
    layer = viewer.add_image(image[..., 0], name="scan", scale=(0.5, 0.5), units=("mm", "um"))
    labels = viewer.add_labels(mask, name="fixed")
    finetune = dock(viewer, "Fine-tune")
    finetune._image.value, finetune._corrected.value = layer, labels
    finetune.run()
    assert "different units for Y and X" in messages(notifications)
    assert not finetune.running and finetune._run.enabled
