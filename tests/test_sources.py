"""Training on several data sources at once (the four fundus cameras of retina-vessels)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_r2au.training.augment import AugmentConfig, augment
from napari_r2au.training.data import Sample, split_sources
from napari_r2au.training.trainer import TrainConfig, _best_of, selection_score, source_metrics


def _sample(name: str, source: str, rng: np.random.Generator, quality: float) -> Sample:
    """A sample whose 'prediction' agrees with its mask with probability ``quality``."""
    mask = (rng.random((32, 32)) < 0.2).astype(np.uint8)
    image = rng.random((32, 32, 3)).astype(np.float32)
    sample = Sample(image, mask, np.ones((32, 32), bool), name, image, source=source)
    sample.quality = quality  # type: ignore[attr-defined]
    return sample


def test_sources_config_is_checked_before_anything_is_read():
    good = {
        "kind": "sources",
        "sources": [
            {"name": "A", "kind": "drive", "root": "x"},
            {"name": "B", "kind": "folders", "images": "i", "masks": "m"},
        ],
    }
    TrainConfig.from_dict({"data": good})
    bad = [
        ({"kind": "sources", "sources": []}, "non-empty list"),
        ({"kind": "sources", "sources": [{"kind": "dicom", "root": "x"}]}, "must be drive or folders"),
        ({"kind": "sources", "sources": [{"kind": "drive"}]}, "needs root"),
        ({"kind": "sources", "sources": [{"kind": "drive", "root": "x", "weight": 0}]}, "weight"),
        ({"kind": "sources", "sources": [{"kind": "drive", "root": "x", "colour": 1}]}, "not a key"),
        (
            {
                "kind": "sources",
                "sources": [{"kind": "drive", "root": "a/x"}, {"kind": "drive", "root": "b/x"}],
            },
            "same name",
        ),
    ]
    for data, message in bad:
        with pytest.raises(ValueError, match=message):
            TrainConfig.from_dict({"data": data})
    with pytest.raises(ValueError, match="fov_diameter"):
        TrainConfig.from_dict({"fov_diameter": 3})


def test_every_source_is_split_on_its_own(rng):
    samples = [_sample(f"a{i}", "A", rng, 1) for i in range(20)] + [
        _sample(f"b{i}", "B", rng, 1) for i in range(4)
    ]
    sources = [
        {"name": "A", "kind": "drive", "root": "x", "val_images": 4},
        {"name": "B", "kind": "drive", "root": "y", "val_images": 1},
    ]
    train, val = split_sources(samples, sources, seed=0)
    assert sorted(s.source for s in val) == ["A"] * 4 + ["B"]
    assert len(train) == 19 and not {id(s) for s in train} & {id(s) for s in val}
    assert split_sources(samples, sources, seed=0)[1] == val  # fixed by the seed


def test_checkpoints_are_chosen_by_the_sources_mean_f1(rng):
    """A model perfect on the big source and useless on the small one must lose to one
    that is fair on both, although its pooled F1 is higher."""
    big = [_sample(f"a{i}", "A", rng, 1) for i in range(6)]
    small = [_sample("b0", "B", rng, 0)]
    samples = big + small
    lopsided = [s.mask.astype(np.float32) for s in big] + [1 - small[0].mask.astype(np.float32)]
    fair = [np.where(rng.random(s.mask.shape) < 0.8, s.mask, 1 - s.mask).astype(np.float32) for s in samples]
    scores = {}
    for name, probs in (("lopsided", lopsided), ("fair", fair)):
        metrics = source_metrics(samples, probs, 0.5)
        assert set(metrics) == {
            "f1@A",
            "auc_roc@A",
            "f1@B",
            "auc_roc@B",
            "f1_source_mean",
            "jaccard_per_image@A",
            "jaccard_per_image@B",
            "jaccard_source_mean",
        }
        scores[name] = selection_score(dict(metrics, f1=0.0))
    assert scores["fair"] > scores["lopsided"]
    # one source: the score is plain F1, as before
    assert source_metrics(big, lopsided[:6], 0.5) == {}
    assert selection_score({"f1": 0.7}) == 0.7
    threshold, chosen = _best_of(samples, fair, (0.3, 0.5, 0.7))
    assert "f1_source_mean" in chosen and threshold in (0.3, 0.5, 0.7)


def test_camera_augmentations_change_only_what_they_should():
    images = torch.randn(4, 3, 32, 32)
    masks = (torch.rand(4, 1, 32, 32) > 0.8).float()
    fov = torch.ones(4, 1, 32, 32)
    plain = AugmentConfig(flips=False, rot90=False, affine=False, intensity=False)
    same, _, _ = augment(images.clone(), masks, fov, plain, torch.Generator().manual_seed(0))
    assert torch.equal(same, images)  # nothing asked, nothing done
    for key in ("colour", "blur", "noise"):
        config = AugmentConfig(flips=False, rot90=False, affine=False, intensity=False, **{key: 0.5})
        out, out_masks, _ = augment(images.clone(), masks, fov, config, torch.Generator().manual_seed(1))
        assert not torch.allclose(out, images), key
        assert torch.equal(out_masks, masks), key  # intensity only: the labels stay put
        assert torch.isfinite(out).all()


def test_jpeg_augmentation_is_a_codec_round_trip():
    """JPEG artefacts grow as the quality falls, leave the labels alone, and a bad range is refused."""
    from napari_r2au.training.trainer import ConfigError, TrainConfig

    y, x = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    pattern = torch.sin(x / 5) + torch.cos(y / 7) + 0.5 * torch.sin((x + y) / 3)  # smooth, like a photograph
    tints = ((1.0, 0.3), (0.6, -0.2), (0.3, 0.0))  # channels that move together, as in a fundus
    images = torch.stack([pattern * gain + shift for gain, shift in tints])[None].repeat(2, 1, 1, 1)
    masks = (torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(0)) > 0.8).float()
    fov = torch.ones(2, 1, 64, 64)
    base = dict(flips=False, rot90=False, affine=False, intensity=False, jpeg=1.0)
    errors = {}
    for quality in (95, 10):
        config = AugmentConfig(**base, jpeg_quality=(quality, quality))
        out, out_masks, _ = augment(images.clone(), masks, fov, config, torch.Generator().manual_seed(1))
        assert torch.equal(out_masks, masks) and out.shape == images.shape
        errors[quality] = float((out - images).abs().mean() / images.std())
    assert 0 < errors[95] < 0.05 < 0.15 < errors[10], errors
    grey, _, _ = augment(images[:, :1].clone(), masks, fov, AugmentConfig(**base), torch.Generator())
    assert not torch.allclose(grey, images[:, :1])
    for bad in (
        {"jpeg": 1.5},
        {"jpeg": 0.3, "jpeg_quality": [90, 30]},
        {"jpeg": 0.3, "jpeg_quality": [0, 50]},
    ):
        with pytest.raises(ConfigError, match="augment.jpeg"):
            TrainConfig.from_dict({"name": "x", "data": {"kind": "drive", "root": "."}, "augment": bad})


def test_val_names_may_be_patterns(rng):
    from napari_r2au.training.data import DataError, split

    samples = [_sample(f"isic17_train_{i:04d}.jpg", "A", rng, 1) for i in range(6)]
    samples += [_sample(f"isic17_validation_{i:04d}.jpg", "A", rng, 1) for i in range(3)]
    train, val = split(samples, 0, 0, ["isic17_validation_*"])
    assert [s.name for s in val] == [f"isic17_validation_{i:04d}.jpg" for i in range(3)] and len(train) == 6
    with pytest.raises(DataError, match="isic17_test_"):
        split(samples, 0, 0, ["isic17_test_*"])


def test_image_width_rule_resizes_every_image_to_one_width(tmp_path):
    """Photographs framed alike at two resolutions reach the network alike (dermoscopy)."""
    from napari_r2au.engine import working_scale
    from napari_r2au.io import write_png
    from napari_r2au.model_files import load_model_file, resolve_model_path, save_model
    from napari_r2au.training.data import folder_samples

    for folder in ("images", "masks"):
        (tmp_path / folder).mkdir()
    for name, width in (("big", 768), ("small", 256)):
        height = width * 3 // 4
        mask = np.zeros((height, width), np.uint8)
        mask[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = 255
        write_png(tmp_path / "images" / f"{name}.png", np.dstack([mask // 2] * 3))
        write_png(tmp_path / "masks" / f"{name}.png", mask)
    samples = folder_samples(tmp_path / "images", tmp_path / "masks", image_width=256)
    assert [s.image.shape[:2] for s in samples] == [(192, 256), (192, 256)]
    model = load_model_file(resolve_model_path("ph2-lesions")[0])
    meta = {k: v for k, v in model.metadata.items() if k not in ("weights_file", "weights_sha256")}
    saved = load_model_file(save_model(model.network, tmp_path, dict(meta, name="w256", image_width=256)))
    big = np.zeros((576, 768, 3), np.uint8)
    assert working_scale(saved, image=big) == pytest.approx(256 / 768)
    assert working_scale(saved, image=big[:192, :256]) == 1.0
    assert working_scale(saved) == saved.input_scale  # no image: the recorded scale


def test_a_source_without_foreground_does_not_break_the_choice(rng):
    """Its F1 is 0/0: it must neither make every score NaN (no checkpoint ever saved) nor
    let the first threshold win by default."""
    found = [_sample(f"a{i}", "A", rng, 1) for i in range(3)]
    empty = _sample("b0", "B", rng, 1)
    empty.mask[:] = 0
    samples = [*found, empty]
    probs = [s.mask.astype(np.float32) * 0.7 + 0.1 for s in found] + [np.full((32, 32), 0.1, np.float32)]
    metrics = source_metrics(samples, probs, 0.5)
    assert metrics["f1_source_mean"] == pytest.approx(1.0)  # source A alone votes
    threshold, chosen = _best_of(samples, probs, (0.05, 0.5, 0.9))
    assert threshold == 0.5
    assert selection_score({"f1": float("nan")}) == float("-inf")


def test_a_source_keeps_its_share_after_the_split(rng):
    samples = [_sample(f"a{i}", "A", rng, 1) for i in range(20)] + [
        _sample(f"b{i}", "B", rng, 1) for i in range(4)
    ]
    sources = [
        {"name": "A", "kind": "drive", "root": "x", "val_images": 4, "weight": 0.6},
        {"name": "B", "kind": "drive", "root": "y", "val_images": 1, "weight": 0.4},
    ]
    train, _ = split_sources(samples, sources, seed=0)
    shares = {name: sum(s.weight for s in train if s.source == name) for name in "AB"}
    assert shares == {"A": pytest.approx(0.6), "B": pytest.approx(0.4)}


def test_lesion_runs_can_be_chosen_by_the_images_mean_jaccard():
    """One large lesion found with some spill-over and one small, faint lesion: pooled F1
    wants the high threshold (the large lesion's pixels dominate), the mean of the images'
    Jaccard (ISIC's metric) the low one that also finds the small lesion."""
    from napari_r2au.training.trainer import jaccard_per_image

    large_mask = np.zeros((64, 64), np.uint8)
    large_mask[:32, :32] = 1  # 1,024 lesion pixels
    large_prob = large_mask * 0.6 + 0.0
    large_prob[40:50, :20] = 0.32  # 200 pixels of spill-over, above 0.3 only
    small_mask = np.zeros((64, 64), np.uint8)
    small_mask[60:62, 60:65] = 1  # 10 pixels, found only below 0.35
    small_prob = small_mask * 0.35
    fov = np.ones((64, 64), bool)
    samples = [
        Sample(m[..., None].astype(np.float32), m, fov, n, m[..., None])
        for m, n in ((large_mask, "a"), (small_mask, "b"))
    ]
    probs = [large_prob.astype(np.float32), small_prob.astype(np.float32)]
    assert _best_of(samples, probs, (0.3, 0.5))[0] == 0.5
    threshold, chosen = _best_of(samples, probs, (0.3, 0.5), "jaccard_per_image")
    assert threshold == 0.3 and chosen["jaccard_per_image"] == pytest.approx((1024 / 1224 + 1) / 2)
    assert jaccard_per_image(samples, probs, 0.5) == pytest.approx(0.5)
    assert selection_score({"jaccard_per_image": 0.7, "f1": 0.1}, "jaccard_per_image") == 0.7
    assert "select_by must be one of f1, jaccard_per_image" in "; ".join(
        TrainConfig(name="x", select_by="dice").problems()
    )

    # nine such large lesions from one source and the small one from another: by the images'
    # mean the nine outvote it (0.5), by the mean of the sources' means each source counts once
    many = [
        Sample(
            large_mask[..., None].astype(np.float32),
            large_mask,
            fov,
            f"a{i}",
            large_mask[..., None],
            source="A",
        )
        for i in range(9)
    ]
    few = [
        Sample(
            small_mask[..., None].astype(np.float32), small_mask, fov, "b", small_mask[..., None], source="B"
        )
    ]
    probs = [large_prob.astype(np.float32)] * 9 + [small_prob.astype(np.float32)]
    assert jaccard_per_image(many + few, probs, 0.5) > jaccard_per_image(many + few, probs, 0.3)
    threshold, chosen = _best_of(many + few, probs, (0.3, 0.5), "jaccard_per_image")
    assert threshold == 0.3 and chosen["jaccard_source_mean"] == pytest.approx((1024 / 1224 + 1) / 2)
    assert chosen["jaccard_per_image@B"] == 1.0
