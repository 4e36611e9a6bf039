from __future__ import annotations

import numpy as np
import pytest

from napari_r2au import create_model, list_models, load_model, predict
from napari_r2au.engine import run
from napari_r2au.model_files import build_metadata, save_model, user_models_dir
from napari_r2au.training.finetune import FinetuneSettings, iter_finetune, next_version_name


@pytest.fixture
def base_model(tmp_path):
    import torch

    torch.manual_seed(0)
    net = create_model("r2au_net", base_width=4)
    meta = build_metadata(
        name="base",
        architecture="r2au_net",
        arch_args={"in_channels": 3, "out_channels": 1, "base_width": 4, "t": 2},
    )
    return load_model(save_model(net, tmp_path / "models", meta))


def _bars(rng, size=96):
    mask = np.zeros((size, size), np.uint8)
    mask[:, 20:28] = 1
    mask[40:46, :] = 1
    image = (rng.random((size, size, 3)) * 60 + mask[..., None] * 120).astype(np.uint8)
    return image, mask


def test_versions_count_up(tmp_path):
    (tmp_path / "base-ft1.json").write_text("{}")
    (tmp_path / "base-ft7.json").write_text("{}")
    assert next_version_name("base", tmp_path) == "base-ft8"
    assert next_version_name("base-ft8", tmp_path) == "base-ft8"  # root name, next free
    (tmp_path / "base-ft7.json").unlink()
    (tmp_path / "removed" / "base-ft9-20261125T000000Z").mkdir(parents=True)
    (tmp_path / "removed" / "base-ft9-20261125T000000Z" / "base-ft9.json").write_text("{}")
    assert next_version_name("base", tmp_path) == "base-ft10"  # a removed version's name is not given again


def test_finetune_registers_new_model_and_improves(base_model, rng):
    image, mask = _bars(rng)
    settings = FinetuneSettings(steps=30, lr=0.02, patch_size=48, batch_size=4, freeze_encoder=False)
    gen = iter_finetune(base_model, [(image, mask)], settings=settings)
    events = []
    while True:
        try:
            events.append(next(gen))
        except StopIteration as stop:
            result = stop.value
            break
    assert len(events) == 30 and result.model is not None
    assert result.model.name == "base-ft1" and result.model.source == "user"
    prov = result.model.metadata["provenance"]
    assert prov["parent"]["sha256"] == base_model.sha256
    assert result.dice_after > result.dice_before
    assert ("base-ft1", "user") in {(r["name"], r["source"]) for r in list_models()}
    assert load_model(base_model.path).sha256 == base_model.sha256  # base untouched
    assert (user_models_dir() / "base-ft1.safetensors").is_file()


def test_finetune_on_stack_uses_annotated_slices(base_model, rng):
    image, mask = _bars(rng, 64)
    stack = np.stack([image.mean(-1)] * 3)
    labels = np.zeros((3, 64, 64), np.uint8)
    labels[1] = mask
    gen = iter_finetune(base_model, [(stack, labels)], settings=FinetuneSettings(steps=2, patch_size=32))
    events = list(gen)
    assert events[-1].step == 2


def test_finetune_derives_the_scale_from_pixel_sizes_and_keeps_the_model_pixel_size(tmp_path, rng):
    from napari_r2au.engine import run

    net = create_model("unet", base_width=4)
    meta = build_metadata(
        name="ct", architecture="unet", arch_args={"base_width": 4}, pixel_size=0.5, pixel_size_unit="mm"
    )
    parent = load_model(save_model(net, tmp_path / "models", meta))
    image, mask = _bars(rng, 128)
    result = run(
        iter_finetune(
            parent,
            [(image, mask)],
            settings=FinetuneSettings(steps=2, patch_size=32),
            pixel_size=250.0,
            pixel_size_unit="um",
        )
    )
    tuned = result.model
    assert tuned.input_scale == pytest.approx(0.5)  # 250 um pixels seen as 0.5 mm ones
    assert tuned.pixel_size == pytest.approx(500.0) and tuned.pixel_size_unit == "um"  # = 0.5 mm
    result = run(iter_finetune(tuned, [(image, mask)], settings=FinetuneSettings(steps=2, patch_size=32)))
    assert result.model.pixel_size == pytest.approx(500.0)  # no pixel size given: the parent's


def test_stack_fine_tune_at_a_pixel_size_scale(tmp_path, rng):
    from napari_r2au.engine import run

    net = create_model("unet", base_width=4, in_channels=1)
    meta = build_metadata(
        name="ct",
        architecture="unet",
        arch_args={"base_width": 4, "in_channels": 1},
        pixel_size=0.5,
        pixel_size_unit="mm",
    )
    parent = load_model(save_model(net, tmp_path / "models", meta))
    image, mask = _bars(rng, 64)
    stack = np.stack([image.mean(-1)] * 3).astype(np.float32)
    labels = np.zeros((3, 64, 64), np.uint8)
    labels[1] = mask
    result = run(
        iter_finetune(
            parent,
            [(stack, labels)],
            settings=FinetuneSettings(steps=2, patch_size=32),
            pixel_size=0.7,
            pixel_size_unit="mm",
        )
    )  # scale 1.4, slice by slice
    assert result.model.input_scale == pytest.approx(1.4)
    assert result.model.pixel_size == pytest.approx(0.5)


def test_the_base_model_is_scored_at_its_best_threshold_on_the_held_out_part(base_model, rng, tmp_path):
    """The new model's threshold is chosen on the held-out strip; the base gets the same chance."""
    from napari_r2au.training.finetune import prepare_samples
    from napari_r2au.training.trainer import THRESHOLDS, evaluate_samples

    # a base whose own threshold (chosen on other data) is poor here
    base_model = load_model(
        save_model(
            base_model.network, tmp_path / "skewed", dict(base_model.metadata, name="skewed", threshold=0.97)
        )
    )
    image, mask = _bars(rng)
    settings = FinetuneSettings(steps=2, lr=1e-4, patch_size=48, batch_size=2)
    result = run(iter_finetune(base_model, [(image, mask)], settings=settings))
    _, held_out = prepare_samples(base_model, [(image, mask)], None, settings)
    scores = [evaluate_samples(base_model, held_out, t)["f1"] for t in THRESHOLDS]
    assert result.dice_before == pytest.approx(max(scores))
    assert result.dice_before > evaluate_samples(base_model, held_out, base_model.threshold)["f1"]


def test_a_held_out_strip_is_predicted_in_the_context_of_its_image(base_model, rng):
    """Users segment whole images: the strip's probabilities are cut from a whole-image run
    (its neighbours and normalization statistics), not from a run on the strip alone."""
    from napari_r2au.training.finetune import prepare_samples
    from napari_r2au.training.trainer import predict_samples

    image, mask = _bars(rng)
    image = (image * np.linspace(0.4, 1.0, image.shape[1])[None, :, None]).astype(np.float32)
    _, held_out = prepare_samples(base_model, [(image, mask)], None, FinetuneSettings(patch_size=48))
    (strip,) = held_out
    x0, x1 = strip.window
    assert strip.raw.shape == image.shape and strip.mask.shape[1] == x1 - x0 == 24
    (probabilities,) = predict_samples(base_model, [strip], precision="fp32")
    whole = predict(base_model, image, precision="fp32", scale=1.0, backend="torch").probabilities
    np.testing.assert_array_equal(probabilities, whole[:, x0:x1])
    alone = predict(base_model, image[:, x0:x1], precision="fp32", scale=1.0).probabilities
    assert np.abs(alone - probabilities).max() > 1e-3  # what the strip alone would have given


def test_every_slice_with_foreground_gives_a_held_out_strip(base_model, rng):
    """A threshold chosen on one image's strip follows that image: every annotated slice
    (or pair) with foreground in its strip lends it, and an erased slice trains whole."""
    from napari_r2au.training.finetune import prepare_samples

    image, mask = _bars(rng)
    stack = np.stack([image.mean(-1)] * 3).astype(np.float32)
    labels = np.stack([np.zeros_like(mask), mask, mask])  # slice 0: the user erased everything
    grey = load_model(base_model.path)
    settings = FinetuneSettings(patch_size=48)
    train, held_out = prepare_samples(
        grey, [(stack, labels)], None, settings, names=["s"], slices=[[0, 1, 2]]
    )
    assert [s.name for s in held_out] == ["s[z=1][held out]", "s[z=2][held out]"]
    assert all(s.mask.any() for s in held_out)
    assert [s.name for s in train] == ["s[z=0]", "s[z=1][train]", "s[z=2][train]"]
    cut = int(round(mask.shape[1] * 0.75))
    for kept, strip in zip(train[1:], held_out):  # the two parts tile the slice: nothing lost or shared
        assert kept.mask.shape[1] == cut and strip.mask.shape[1] == mask.shape[1] - cut
        assert np.array_equal(np.concatenate([kept.mask, strip.mask], axis=1), mask > 0)
    with pytest.raises(ValueError, match="no foreground at all"):  # it would teach the model to find nothing
        prepare_samples(grey, [(stack, labels)], None, settings, names=["s"], slices=[[0]])
    below = np.zeros_like(mask)
    below[60:, 20:28] = 1  # one bar: the left band cuts it, so foreground lies in the band and beside it
    _, one = prepare_samples(grey, [(stack[:1], below[None])], None, settings, names=["t"], slices=[[0]])
    assert len(one) == 1


def test_the_held_out_band_follows_the_users_corrections():
    """A band the user never touched is the model's own output: the base model matches it
    exactly, so no fine-tune can score better there. The right strip is held out while it
    holds a fair part of the corrections; otherwise the band with the most of them."""
    from napari_r2au.training.data import make_sample
    from napari_r2au.training.finetune import held_out_band

    mask = np.zeros((64, 200), np.uint8)
    mask[10:50, ::10] = 1  # foreground in every column band
    sample = make_sample(np.zeros((64, 200, 3), np.float32), mask, "m", 3)
    settings = FinetuneSettings(patch_size=48)
    spread = np.full(200, 3)
    assert held_out_band(sample, settings, spread) == (150, 200)  # the right strip, as before
    nothing = np.zeros(200, int)
    assert held_out_band(sample, settings, nothing) == (150, 200)
    left = np.zeros(200, int)
    left[:40] = 5  # corrected on the left only
    assert held_out_band(sample, settings, left) == (0, 50)
    middle = np.zeros(200, int)
    middle[90:120] = 5
    x0, x1 = held_out_band(sample, settings, middle)
    assert x1 - x0 == 50 and x0 <= 90 and x1 >= 120 and x0 >= 48 and 200 - x1 >= 48  # a patch fits each side
    mostly_left = left.copy()
    mostly_left[190] = 2  # a couple of pixels on the right: not a fair part of 202
    assert held_out_band(sample, settings, mostly_left) == (0, 50)
    # a small image (PH2 at 1/3 scale is 255 wide): corrections in the middle are still found,
    # the patch shrinking to the pieces beside the band rather than holding out untouched output
    small = np.zeros((191, 255), np.uint8)
    small[40:150, 70:210] = 1
    lesion = make_sample(np.zeros((191, 255, 3), np.float32), small, "l", 3)
    border = np.zeros(255, int)
    border[72:126] = 20
    x0, x1 = held_out_band(lesion, FinetuneSettings(), border)
    assert border[x0:x1].sum() == border.sum() and min(x0, 255 - x1) >= 32
    # but a narrow piece (a smaller patch for every image) only when no band that keeps whole
    # patches holds any correction: here the left band holds half of them
    wide = make_sample(np.zeros((64, 200, 3), np.float32), mask, "w", 3)
    near_edge = np.zeros(200, int)
    near_edge[40:80] = 5
    assert held_out_band(wide, FinetuneSettings(), near_edge) == (0, 50)


def test_the_mask_before_corrections_says_where_they_are(base_model, rng):
    """Segment's own mask (flip-averaged, cleaned up, at the slider's threshold) differs from
    a bare prediction everywhere; the user corrected only the left: the band goes there."""
    from napari_r2au.training.finetune import prepare_samples

    image = (rng.random((64, 200, 3)) * 60).astype(np.uint8)
    before = np.zeros((64, 200), np.uint8)
    before[10:50, ::10] = 1
    corrected = before.copy()
    corrected[:, 5:45] = 0
    corrected[20:30, 5:45] = 1  # the user's strokes, on the left only
    train, held_out = prepare_samples(
        base_model,
        [(image, corrected)],
        None,
        FinetuneSettings(patch_size=48),
        names=["p"],
        originals=[before],
    )
    (band,) = held_out
    assert band.window == (0, 50) and [s.window for s in train] == [(50, 200)]
    assert band.corrections == int((before[:, :50] != corrected[:, :50]).sum())
    assert train[0].weight == pytest.approx(0.75)  # a piece draws by its share of the image


def test_a_band_in_the_middle_leaves_two_training_pieces(base_model, rng, monkeypatch):
    from napari_r2au.training import finetune

    image = (rng.random((64, 200, 3)) * 60).astype(np.uint8)
    mask = np.zeros((64, 200), np.uint8)
    mask[10:50, ::10] = 1
    corrected = mask.astype(float)
    corrected[:, 100:140] = 1 - corrected[:, 100:140]  # the model is wrong there only (what the user fixed)
    monkeypatch.setattr(finetune, "predict_samples", lambda model, samples, **_: [corrected for _ in samples])
    train, held_out = finetune.prepare_samples(
        base_model, [(image, mask)], None, FinetuneSettings(patch_size=48), names=["p"]
    )
    (band,) = held_out
    x0, x1 = band.window
    assert x0 <= 100 and x1 >= 140
    assert [s.name for s in train] == ["p[train 1]", "p[train 2]"]
    assert [s.window for s in train] == [(0, x0), (x1, 200)]
    assert [s.weight for s in train] == pytest.approx([x0 / 200, (200 - x1) / 200])
    np.testing.assert_array_equal(np.concatenate([train[0].mask, band.mask, train[1].mask], axis=1), mask)


def test_two_pairs_pool_their_strips_and_a_narrow_pair_trains_whole(base_model, rng):
    from napari_r2au.training.finetune import prepare_samples

    image, mask = _bars(rng)
    small_image, small_mask = image[:40, :40], mask[:40, :40]  # too narrow to lose a strip at patch 48
    train, held_out = prepare_samples(
        base_model,
        [(image, mask), (image[:, ::-1], mask[:, ::-1]), (small_image, small_mask)],
        None,
        FinetuneSettings(patch_size=48),
        names=["a", "b", "c"],
    )
    assert [s.name for s in held_out] == ["a[held out]", "b[held out]"]
    assert [s.name for s in train] == ["a[train]", "b[train]", "c"]
    assert train[2].mask.shape == small_mask.shape


def test_a_pair_whose_foreground_is_all_in_its_strip_trains_whole(base_model, rng):
    """Holding out its strip would leave it teaching only background."""
    from napari_r2au.training.finetune import prepare_samples

    image, mask = _bars(rng)
    right_only = np.zeros_like(mask)
    right_only[:, 80:88] = 1  # inside the right quarter (columns 72-95) only
    train, held_out = prepare_samples(
        base_model,
        [(image, mask), (image, right_only)],
        None,
        FinetuneSettings(patch_size=48),
        names=["a", "b"],
    )
    assert [s.name for s in held_out] == ["a[held out]"]
    assert [s.name for s in train] == ["a[train]", "b"] and train[1].mask.sum() == right_only.sum()


def test_a_long_stack_lends_at_most_a_few_evenly_spaced_strips(base_model, rng):
    """Every validation predicts every strip: a hundred painted slices would make it slow."""
    from napari_r2au.training.finetune import MAX_HELD_OUT_STRIPS, prepare_samples

    image, mask = _bars(rng)
    n = 3 * MAX_HELD_OUT_STRIPS
    stack = np.stack([image.mean(-1)] * n).astype(np.float32)
    labels = np.stack([mask] * n)
    grey = load_model(base_model.path)
    train, held_out = prepare_samples(
        grey, [(stack, labels)], None, FinetuneSettings(patch_size=48), names=["s"], slices=[list(range(n))]
    )
    assert len(held_out) == MAX_HELD_OUT_STRIPS and len(train) == n
    chosen = [int(s.name.split("=")[1].split("]")[0]) for s in held_out]
    assert chosen[0] == 0 and chosen[-1] == n - 1 and chosen == sorted(set(chosen))
    assert {s.name for s in train if s.name.endswith("[train]")} == {f"s[z={z}][train]" for z in chosen}


def test_blending_with_the_parent_mixes_weights_and_statistics(base_model):
    import torch

    from napari_r2au.training.finetune import blend_with_parent

    parent = base_model.network
    tuned = create_model("r2au_net", base_width=4)  # other random weights, same layers
    with torch.no_grad():
        for buffer in tuned.buffers():
            buffer.add_(3 if buffer.is_floating_point() else 5)
    before, after = parent.state_dict(), tuned.state_dict()
    for share in (0.0, 0.5, 1.0):
        mixed = blend_with_parent(parent, tuned, share).state_dict()
        for key, value in after.items():
            if value.is_floating_point():
                assert torch.allclose(mixed[key], before[key] + share * (value - before[key]), atol=1e-6), key
            else:
                assert torch.equal(mixed[key], value), key  # step counters are the tuned ones
    assert not torch.equal(
        parent.state_dict()[next(iter(before))], after[next(iter(after))]
    )  # inputs untouched
    with pytest.raises(ValueError, match="layers"):
        blend_with_parent(parent, create_model("r2au_net", base_width=8), 0.5)


def test_the_new_model_is_the_chosen_share_of_the_way_from_its_parent(base_model, rng):
    """Same seed, shares 1 and 0.5: the second model lies halfway between the parent and the first,
    with its own threshold chosen on the held-out strip and its Dice measured there."""
    import torch

    from napari_r2au.training.finetune import prepare_samples
    from napari_r2au.training.trainer import THRESHOLDS, evaluate_samples

    image, mask = _bars(rng)
    full = FinetuneSettings(steps=6, lr=0.01, patch_size=48, batch_size=2, weight_share=1.0)
    half = FinetuneSettings(steps=6, lr=0.01, patch_size=48, batch_size=2, weight_share=0.5)
    whole = run(iter_finetune(base_model, [(image, mask)], settings=full, name="whole")).model
    result = run(iter_finetune(base_model, [(image, mask)], settings=half, name="half"))
    blended = result.model
    parent, ends = base_model.network.state_dict(), whole.network.state_dict()
    for key, value in blended.network.state_dict().items():
        if value.is_floating_point():
            assert torch.allclose(value, (parent[key] + ends[key]) / 2, atol=1e-5), key
    assert blended.metadata["provenance"]["weight_share"] == 0.5
    assert "weight_share" not in whole.metadata["provenance"]
    _, held_out = prepare_samples(base_model, [(image, mask)], None, half)
    scores = {t: evaluate_samples(blended, held_out, t)["f1"] for t in THRESHOLDS}
    assert blended.threshold in scores and scores[blended.threshold] == pytest.approx(max(scores.values()))
    assert result.dice_after == pytest.approx(max(scores.values()))
    assert blended.metadata["provenance"]["validation_metrics"]["f1"] == pytest.approx(
        result.dice_after, abs=1e-4
    )
    assert blended.metadata["provenance"]["validation_images"] == ["pair0[held out]"]  # what was held out


def test_a_weight_share_out_of_range_is_refused_before_training(base_model, rng):
    image, mask = _bars(rng)
    for share in (0.0, 1.5):
        with pytest.raises(ValueError, match="weight share"):
            run(
                iter_finetune(
                    base_model, [(image, mask)], settings=FinetuneSettings(steps=2, weight_share=share)
                )
            )
    assert not list(user_models_dir().glob("base-ft*.json"))


def test_without_a_held_out_part_the_new_model_keeps_its_parents_threshold(base_model, rng, tmp_path):
    """Too narrow for a strip: no threshold can be chosen, so the parent's is kept (not 0.5)."""
    parent = load_model(
        save_model(base_model.network, tmp_path / "p", dict(base_model.metadata, name="p", threshold=0.3))
    )
    image, mask = _bars(rng, 40)
    result = run(iter_finetune(parent, [(image, mask)], settings=FinetuneSettings(steps=2, patch_size=32)))
    assert result.dice_before is None and result.dice_after is None
    assert result.model.threshold == pytest.approx(0.3)
    assert result.model.metadata["provenance"]["threshold_from"] == "parent"


def test_a_multiclass_model_is_refused_before_training(tmp_path, rng):
    net = create_model("unet", base_width=4, out_channels=3)
    meta = build_metadata(name="three", architecture="unet", arch_args={"base_width": 4, "out_channels": 3})
    parent = load_model(save_model(net, tmp_path / "models", meta))
    image, mask = _bars(rng)
    with pytest.raises(ValueError, match="3 classes"):
        run(iter_finetune(parent, [(image, mask)], settings=FinetuneSettings(steps=2)))


def test_the_threshold_is_chosen_once_for_the_weights_that_are_saved(base_model, rng, monkeypatch):
    """Share 1: the trainer's calibration stands and gives Dice after; share 0.5: the trainer
    does not calibrate weights that are never saved, the blended ones are calibrated once."""
    from napari_r2au.training import finetune, trainer
    from napari_r2au.training.finetune import prepare_samples

    calls: list[str] = []
    real_calibrate, real_best = trainer.calibrate_threshold, finetune.best_threshold
    monkeypatch.setattr(
        trainer, "calibrate_threshold", lambda *a, **k: calls.append("trainer") or real_calibrate(*a, **k)
    )
    monkeypatch.setattr(
        finetune, "best_threshold", lambda m, *a, **k: calls.append(m.name) or real_best(m, *a, **k)
    )
    image, mask = _bars(rng)
    for share, expected in ((1.0, ["base", "trainer"]), (0.5, ["base", "shared"])):
        calls.clear()
        settings = FinetuneSettings(steps=4, lr=0.01, patch_size=48, batch_size=2, weight_share=share)
        result = run(
            iter_finetune(
                base_model, [(image, mask)], settings=settings, name="shared" if share < 1 else "own"
            )
        )
        assert calls == expected, share
        _, held_out = prepare_samples(base_model, [(image, mask)], None, settings)
        measured = trainer.evaluate_samples(result.model, held_out, result.model.threshold)["f1"]
        assert result.dice_after == pytest.approx(measured, abs=1e-4), share
        assert result.model.metadata["provenance"]["validation_metrics"]["f1"] == pytest.approx(
            measured, abs=1e-4
        )
        # both paths choose it by the parent-anchored rule (the trainer's through threshold_prior)
        chosen_on = result.model.metadata["provenance"]["threshold_chosen_on"]
        assert f"nearest to {base_model.threshold:g}" in chosen_on or "the parent's" in chosen_on, chosen_on


def test_training_from_a_parent_leaves_the_callers_model_and_config_alone(base_model, rng, tmp_path):
    import torch

    from napari_r2au.training.data import make_sample
    from napari_r2au.training.trainer import TrainConfig, iter_train

    before = {k: v.clone() for k, v in base_model.network.state_dict().items()}
    samples = [make_sample(*_bars(rng, 64), f"s{i}", 3, None, base_model.normalization) for i in range(2)]
    config = TrainConfig(
        name="child",
        architecture="unet",
        steps=3,
        patch_size=32,
        batch_size=2,
        lr=0.05,
        output_dir=str(tmp_path / "run"),
        val_every=3,
    )
    run(iter_train(config, samples=samples[:1], val_samples=samples[1:], parent=base_model))
    assert config.architecture == "unet"  # not rewritten to the parent's
    after = base_model.network.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert load_model(tmp_path / "run" / "best.json").metadata["architecture"] == "r2au_net"


def test_a_pair_accepted_as_the_model_made_it_lends_no_held_out_band(base_model, rng):
    """A worklist case accepted unchanged would score the parent on agreeing with itself:
    when another pair holds corrections, only that one is held out from; with none, all are."""
    from napari_r2au.training.finetune import prepare_samples

    image, mask = _bars(rng)
    corrected = mask.copy()
    corrected[60:70, 10:90] = 1  # the reviewer's stroke on the second case
    settings = FinetuneSettings(patch_size=48)
    pairs = [(image, mask), (image, corrected)]
    train, held_out = prepare_samples(
        base_model, pairs, None, settings, names=["as made", "corrected"], originals=[mask, mask]
    )
    assert [s.name for s in held_out] == ["corrected[held out]"]
    assert held_out[0].corrections > 0
    assert "as made" in [s.name for s in train]  # it still trains, whole
    _, both = prepare_samples(
        base_model, pairs[:1] * 2, None, settings, names=["a", "b"], originals=[mask, mask]
    )
    assert len(both) == 2 and all(s.corrections == 0 for s in both)


def test_a_fine_tune_runs_parent_and_child_on_torch(base_model, rng, monkeypatch):
    """Like against like, and no conversion of the parent for OpenVINO inside a fine-tune:
    that conversion imports ONNX, which holds the interpreter lock for about a second and
    froze napari's GUI during the Fine-tune dock's first run."""
    from napari_r2au import engine

    backends: list[str] = []
    real = engine.predict

    def recording(*args, **kwargs):
        backends.append(kwargs.get("backend", "auto"))
        return real(*args, **kwargs)

    monkeypatch.setattr("napari_r2au.training.trainer.predict", recording)
    image, mask = _bars(rng)
    settings = FinetuneSettings(steps=4, lr=0.02, patch_size=48, batch_size=4)
    result = run(iter_finetune(base_model, [(image, mask)], settings=settings))
    assert result.model is not None and backends and set(backends) == {"torch"}


def _scored(rng, size: int, spread: float) -> tuple[list, list]:
    """One validation sample with 'probabilities' around 0.75 on its foreground and 0.25 off it."""
    from napari_r2au.training.data import Sample

    mask = (rng.random((size, size)) < 0.2).astype(np.uint8)
    probs = np.clip(np.where(mask > 0, 0.75, 0.25) + rng.normal(0.0, spread, mask.shape), 0, 1)
    image = np.zeros((size, size, 1), np.float32)
    return [Sample(image, mask, np.ones(mask.shape, bool), "v", image)], [probs.astype(np.float32)]


def test_a_new_versions_threshold_stays_near_its_parents_where_the_held_out_part_cannot_tell():
    """A flat top (every threshold from about 0.3 to 0.7 scores the same): without a prior the
    sweep's first maximum wins; with the parent's threshold as prior, the one nearest it."""
    from napari_r2au.training.trainer import THRESHOLDS, _best_of

    samples, probs = _scored(np.random.default_rng(0), 64, 0.01)
    plain, _ = _best_of(samples, probs, THRESHOLDS)
    assert plain <= 0.3
    near, metrics = _best_of(samples, probs, THRESHOLDS, prior=0.625)
    assert near == 0.625
    assert metrics["f1"] == 1.0


def test_the_held_out_part_decides_where_it_can_tell():
    """Many pixels and a clear peak: a far-away prior does not pull the threshold off the peak,
    and the threshold chosen scores within the score's noise of the best."""
    from napari_r2au.training.trainer import THRESHOLDS, _best_of, pooled_metrics, thresholds_within_noise

    samples, probs = _scored(np.random.default_rng(1), 384, 0.15)
    best, best_metrics = _best_of(samples, probs, THRESHOLDS)
    near = thresholds_within_noise(samples, probs, THRESHOLDS, best)
    assert best in near and max(near) - min(near) <= 0.1
    chosen, metrics = _best_of(samples, probs, THRESHOLDS, prior=0.1)
    assert chosen == min(near)  # the nearest the prior that the data cannot tell from the best
    assert metrics["f1"] > best_metrics["f1"] - 0.01
    assert pooled_metrics(samples, probs, 0.1)["f1"] < best_metrics["f1"] - 0.1


@pytest.mark.parametrize("select_by", ["f1", "jaccard_per_image"])
@pytest.mark.parametrize("sources", [("",), ("A", "B")])
def test_the_noise_estimate_scores_a_set_of_blocks_as_the_selection_does(select_by, sources):
    """The block counts behind the threshold rule give the selection score itself (pooled F1,
    the sources' mean F1, the images' mean Jaccard), at every threshold, for all the blocks
    and for all but one, also with a field of view and a block that has no foreground."""
    import dataclasses

    from napari_r2au.training.trainer import THRESHOLDS, _BlockCounts, _score_at

    rng = np.random.default_rng(2)
    samples, probs = [], []
    for index in range(4):
        (sample,), (prob,) = _scored(rng, 24 + 8 * index, 0.3)
        sample = dataclasses.replace(sample, source=sources[index % len(sources)], name=f"s{index}")
        if index == 1:  # a field of view that leaves out a corner
            fov = np.ones(sample.mask.shape, bool)
            fov[:10, :10] = False
            sample = dataclasses.replace(sample, fov=fov)
        if index == 2:
            sample.mask[:12] = 0  # the first blocks have nothing to find
        samples.append(sample)
        probs.append(prob)
    counts = _BlockCounts.of(samples, probs, THRESHOLDS)
    everything = np.ones(len(counts.owner), bool)
    expected = [_score_at(samples, probs, level, select_by) for level in THRESHOLDS]
    assert np.allclose(counts.scores(samples, select_by, everything), expected)
    # leaving out the first block of the third sample: its rows out of the field of view
    first = int(np.flatnonzero(counts.owner == 2)[0])
    fov = np.ones(samples[2].mask.shape, bool)
    rows = samples[2].mask.shape[0] // (np.sum(counts.owner == 2))
    fov[:rows] = False
    less = [dataclasses.replace(s, fov=fov) if i == 2 else s for i, s in enumerate(samples)]
    expected = [_score_at(less, probs, level, select_by) for level in THRESHOLDS]
    assert np.allclose(
        counts.scores(samples, select_by, everything & (np.arange(len(everything)) != first)), expected
    )
