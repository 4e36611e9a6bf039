"""Plane-wise normalization (CLAHE): one implementation for training and inference."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_r2au import load_model, predict
from napari_r2au.model_files import LoadedModel, ModelFileError, validate_metadata
from napari_r2au.preprocess import is_planewise, normalize, normalize_plane
from napari_r2au.training.data import memory_samples
from napari_r2au.training.trainer import TrainConfig, iter_train

CLAHE = {"kind": "clahe"}


def _shaded_retina():
    """A fundus crop with a strong left-to-right illumination gradient."""
    from skimage import data

    image = data.retina()[300:428, 300:428].astype(np.float32)
    return image * np.linspace(0.3, 1.0, image.shape[1], dtype=np.float32)[None, :, None]


def test_clahe_evens_out_illumination_and_standardizes_each_channel():
    image = _shaded_retina()
    out = normalize_plane(image, CLAHE)
    assert out.shape == image.shape and out.dtype == np.float32
    np.testing.assert_allclose(out.mean(axis=(0, 1)), 0, atol=1e-4)
    np.testing.assert_allclose(out.std(axis=(0, 1)), 1, atol=1e-3)
    # the gap between the dark left half and the bright right half shrinks well below
    # what a plain z-score leaves (measured: 1.44 standard deviations down to 0.72)
    green = image[..., 1]
    zscored = (green - green.mean()) / green.std()
    gap_before = zscored[:, 64:].mean() - zscored[:, :64].mean()
    gap_after = out[..., 1][:, 64:].mean() - out[..., 1][:, :64].mean()
    assert gap_before > 1.0 and abs(gap_after) < 0.6 * gap_before, (gap_before, gap_after)


def test_clahe_handles_constant_channels_and_tiny_planes():
    flat = np.full((20, 30, 3), 7.0, np.float32)
    assert not normalize_plane(flat, CLAHE).any()
    assert normalize_plane(np.arange(6, dtype=np.uint8).reshape(1, 6, 1), CLAHE).shape == (1, 6, 1)
    assert normalize_plane(np.random.default_rng(0).random((5, 3, 1)), CLAHE).shape == (5, 3, 1)


def test_plane_wise_kinds_are_not_applied_per_tile():
    assert is_planewise(CLAHE) and not is_planewise({"kind": "standardize"})
    with pytest.raises(ValueError, match="normalize_plane"):
        normalize(np.zeros((4, 4, 1)), CLAHE, np.zeros(1), np.ones(1))
    with pytest.raises(ValueError, match="per tile"):
        normalize_plane(np.zeros((4, 4, 1)), {"kind": "standardize"})


def _clahe_model(net) -> LoadedModel:
    return LoadedModel(
        net,
        {"name": "c", "in_channels": 3, "out_channels": 1, "threshold": 0.5, "normalization": CLAHE},
        source="memory",
    )


def test_engine_enhances_whole_planes_as_training_does(tiny_net):
    import torch

    image = _shaded_retina()
    prediction = predict(_clahe_model(tiny_net), image, precision="fp32", fuse=False).probabilities
    # what the trainer feeds the network: the sample's normalized image
    sample = memory_samples([(image, np.zeros(image.shape[:2], np.uint8))], normalization=CLAHE)[0]
    with torch.no_grad():
        expected = torch.sigmoid(tiny_net(torch.from_numpy(sample.image.transpose(2, 0, 1))[None]))[
            0, 0
        ].numpy()
    np.testing.assert_allclose(prediction, expected, atol=1e-5)


def test_tiles_come_from_the_enhanced_plane_and_stacks_work(tiny_net, rng):
    image = _shaded_retina()
    model = _clahe_model(tiny_net)
    whole = predict(model, image, precision="fp32").probabilities
    tiled = predict(model, image, tile_size=64, overlap=24, precision="fp32").probabilities
    assert np.abs(whole - tiled).mean() < 0.01
    stack = np.stack([image, image[:, ::-1]])
    both = predict(model, stack, axes="ZYXC", precision="fp32").probabilities
    np.testing.assert_allclose(both[0], whole, atol=1e-5)


def test_model_files_name_the_valid_kinds(tiny_net, tmp_path):
    from napari_r2au.model_files import build_metadata, save_model

    metadata = build_metadata(
        name="m",
        architecture="r2au_net",
        arch_args={"in_channels": 3, "out_channels": 1, "base_width": 4},
        normalization=CLAHE,
    )
    path = save_model(tiny_net, tmp_path, metadata)
    assert load_model(path).normalization == CLAHE
    stored = json.loads(path.read_text())
    stored["normalization"] = {"kind": "histogram-magic"}
    with pytest.raises(ModelFileError, match="clahe"):
        validate_metadata(stored)


def test_a_new_model_trains_and_records_its_normalization(tmp_path, rng):
    pairs = []
    for _ in range(3):
        mask = np.zeros((48, 48), np.uint8)
        mask[10:30, 12:20] = 1
        pairs.append(((rng.random((48, 48, 3)) * 40 + mask[..., None] * 150).astype(np.uint8), mask))
    samples = memory_samples(pairs, normalization=CLAHE)
    config = TrainConfig(
        name="c",
        base_width=4,
        patch_size=32,
        batch_size=4,
        steps=4,
        val_every=2,
        precision="fp32",
        output_dir=str(tmp_path / "run"),
        threads=1,
        normalization=CLAHE,
    )
    list(iter_train(config, samples=samples[:2], val_samples=samples[2:]))
    model = load_model(tmp_path / "run" / "best.json")
    assert model.normalization == CLAHE
    assert json.loads((tmp_path / "run" / "config.json").read_text())["normalization"] == CLAHE
    with pytest.raises(ValueError, match="kind must be one of"):
        list(
            iter_train(
                TrainConfig(output_dir=str(tmp_path / "bad"), normalization={"kind": "magic"}),
                samples=samples[:2],
            )
        )


def test_a_run_from_a_parent_loads_its_data_with_the_parents_normalization(tmp_path, rng, monkeypatch):
    import tifffile

    from napari_r2au.training import trainer

    for role in ("images", "masks"):
        (tmp_path / role).mkdir()
    for i in range(3):
        mask = np.zeros((48, 48), np.uint8)
        mask[10:30, 12:20] = 1
        image = (rng.random((48, 48, 3)) * 40 + mask[..., None] * 150).astype(np.uint8)
        tifffile.imwrite(tmp_path / "images" / f"case{i}.tif", image)
        tifffile.imwrite(tmp_path / "masks" / f"case{i}.tif", mask * 255)
    data = {"kind": "folders", "images": str(tmp_path / "images"), "masks": str(tmp_path / "masks")}
    common = dict(
        base_width=4,
        patch_size=32,
        batch_size=4,
        steps=2,
        val_every=2,
        val_images=1,
        precision="fp32",
        threads=1,
        data=data,
    )
    list(
        iter_train(TrainConfig(name="p", output_dir=str(tmp_path / "parent"), normalization=CLAHE, **common))
    )
    seen = []
    original = trainer.load_samples
    monkeypatch.setattr(
        trainer, "load_samples", lambda config, norm=None: seen.append(norm) or original(config, norm)
    )
    list(
        iter_train(
            TrainConfig(
                name="child",
                output_dir=str(tmp_path / "child"),
                init_from=str(tmp_path / "parent" / "best.json"),
                **common,
            )
        )
    )
    assert seen == [CLAHE]
    assert load_model(tmp_path / "child" / "best.json").normalization == CLAHE


@pytest.mark.parametrize(
    "spec, problem",
    [
        ({"kind": "clahe", "kernel_size": 1}, "kernel_size"),
        ({"kind": "clahe", "kernel_size": 8.5}, "kernel_size"),
        ({"kind": "clahe", "clip_limit": 0}, "clip_limit"),
        ({"kind": "clahe", "clip_limit": "high"}, "clip_limit"),
        ({"kind": "magic"}, "kind must be one of"),
        ({"kind": "scale", "min": 240, "max": -160}, "max must be above min"),
        ({"kind": "scale", "min": "air"}, "must be numbers"),
        ({"kind": "scale", "min": -160, "max": 240, "clip": "yes"}, "clip must be true or false"),
        ("clahe", "expected an object"),
    ],
)
def test_bad_normalization_specs_are_named(spec, problem):
    from napari_r2au.preprocess import check_normalization

    assert problem in check_normalization(spec)
    assert check_normalization({"kind": "clahe", "kernel_size": 32, "clip_limit": 0.02}) is None


def test_normalization_conflicts_are_refused_before_training(tmp_path, rng, tiny_net):
    from napari_r2au.model_files import build_metadata, save_model

    parent = load_model(
        save_model(
            tiny_net,
            tmp_path,
            build_metadata(
                name="p",
                architecture="r2au_net",
                arch_args={"in_channels": 3, "out_channels": 1, "base_width": 4},
            ),
        )
    )
    pairs = [((rng.random((48, 48, 3)) * 255).astype(np.uint8), np.eye(48, dtype=np.uint8)) for _ in range(2)]
    with pytest.raises(ValueError, match="keeps its parent's normalization"):
        list(
            iter_train(
                TrainConfig(output_dir=str(tmp_path / "a"), normalization=CLAHE),
                samples=memory_samples(pairs),
                parent=parent,
            )
        )
    with pytest.raises(ValueError, match="normalized otherwise"):  # clahe samples, z-scoring model
        list(
            iter_train(
                TrainConfig(output_dir=str(tmp_path / "b"), base_width=4),
                samples=memory_samples(pairs, normalization=CLAHE),
            )
        )
    assert not (tmp_path / "a").exists(), "nothing is written before the settings are checked"


def test_a_fixed_window_maps_hounsfield_units_to_0_1_and_clips_outside_it():
    from napari_r2au.preprocess import check_normalization, normalize

    ct = np.array([[-1000.0, -160.0], [40.0, 3000.0]], np.float32)[..., None]  # air, window edges, bone
    window = {"kind": "scale", "min": -160, "max": 240, "clip": True}
    assert check_normalization(window) is None
    np.testing.assert_allclose(normalize(ct, window, None, None)[..., 0], [[0.0, 0.0], [0.5, 1.0]])
    unclipped = normalize(ct, dict(window, clip=False), None, None)[..., 0]
    assert unclipped[0, 0] < -2 and unclipped[1, 1] > 7  # without clip, air and bone stay far out


def _bright_and_dark_stack(rng):
    """Three slices whose own statistics differ widely from the stack's (air, tissue, bone)."""
    stack = rng.normal(0, 1, (3, 64, 64)).astype(np.float32)
    stack[0] = stack[0] * 5 - 900
    stack[1] = stack[1] * 40 + 40
    stack[2] = stack[2] * 200 + 700
    labels = np.zeros(stack.shape, np.uint8)
    labels[1, 20:40, 10:50] = 1
    return stack, labels


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_a_slice_trains_and_validates_with_its_stacks_statistics(tiny_net, rng, scale):
    """Segment z-scores a stack as a whole; a slice cut out of it for training must not be
    z-scored on its own, or the model learns inputs it never sees (CT slices vary widely)."""
    import torch

    from napari_r2au.engine import normalization_statistics
    from napari_r2au.training.trainer import predict_samples

    stack, labels = _bright_and_dark_stack(rng)
    sample = memory_samples([(stack, labels)], scale=scale)[0]
    mean, std = normalization_statistics(stack, 3, "ZYX", scale)
    own_mean = sample.raw.mean()
    assert abs(own_mean - mean[0]) > 50 and std[0] > 10 * sample.raw.std()  # far from the stack's
    np.testing.assert_allclose(sample.image, (np.repeat(sample.raw, 3, -1) - mean) / std, atol=1e-5)
    # validation predicts the slice as Segment predicts it inside the stack
    segment = predict(tiny_net, stack, axes="ZYX", slices=[1], scale=scale, precision="fp32", fuse=False)
    validation = predict_samples(tiny_net, [sample], precision="fp32")[0]
    if scale == 1.0:
        with torch.no_grad():
            network = torch.sigmoid(tiny_net(torch.from_numpy(sample.image.transpose(2, 0, 1))[None]))[
                0, 0
            ].numpy()
        np.testing.assert_allclose(segment.probabilities[1], network, atol=1e-5)
        np.testing.assert_allclose(validation, network, atol=1e-5)
    else:  # Segment's output is resized back to the stack's size; compare at the working size
        small = predict(
            tiny_net, sample.raw, scale=1.0, statistics=sample.statistics, precision="fp32", fuse=False
        )
        np.testing.assert_allclose(validation, small.probabilities, atol=1e-6)
        own = predict(tiny_net, sample.raw, scale=1.0, precision="fp32", fuse=False).probabilities
        assert np.abs(own - validation).max() > 1e-3  # the statistics made a difference


def test_evaluate_scores_a_stack_as_segment_predicts_it(tiny_net, rng, tmp_path):
    import tifffile

    from napari_r2au.model_files import build_metadata, save_model
    from napari_r2au.training.evaluate import evaluate_folders
    from napari_r2au.training.metrics import segmentation_metrics

    stack, labels = _bright_and_dark_stack(rng)
    labels[0, 5:9, 5:60] = labels[2, 30:34, 5:60] = 1
    for role, array in (("images", stack), ("masks", labels * 255)):
        (tmp_path / role).mkdir()
        tifffile.imwrite(tmp_path / role / "ct.tif", array)
    model = load_model(
        save_model(
            tiny_net,
            tmp_path / "m",
            build_metadata(
                name="t",
                architecture="r2au_net",
                arch_args={"in_channels": 3, "out_channels": 1, "base_width": 4},
            ),
        )
    )
    for scale in (None, 0.5):
        report = evaluate_folders(model, tmp_path / "images", tmp_path / "masks", scale=scale)
        segment = predict(model, stack, axes="ZYX", scale=scale).probabilities
        for z, row in enumerate(report["per_image"]):
            assert row["image"] == f"ct.tif[{z}]"
            expected = segmentation_metrics(labels[z], segment[z], model.threshold)
            assert row["auc_roc"] == pytest.approx(expected["auc_roc"], abs=1e-4)
