from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_r2au import create_model, load_model
from napari_r2au.training.augment import AugmentConfig, PatchSampler, augment
from napari_r2au.training.config import load_config
from napari_r2au.training.data import DataError, binarize_mask, folder_samples, memory_samples, split
from napari_r2au.training.trainer import THRESHOLDS, TrainConfig, iter_train, train


def _pairs(rng, n=3, size=48):
    pairs = []
    for _ in range(n):
        mask = np.zeros((size, size), np.uint8)
        mask[10:30, 12:20] = 1
        image = (rng.random((size, size, 3)) * 40 + mask[..., None] * 150).astype(np.uint8)
        pairs.append((image, mask))
    return pairs


def _config(tmp_path, **kw) -> TrainConfig:
    values = dict(
        name="t",
        base_width=4,
        patch_size=32,
        batch_size=4,
        steps=6,
        val_every=3,
        lr=0.01,
        warmup_steps=2,
        precision="fp32",
        output_dir=str(tmp_path / "run"),
        threads=1,
    )
    values.update(kw)
    return TrainConfig(**values)


def test_masks_must_be_binary():
    assert binarize_mask(np.array([[0, 255]]), "m").tolist() == [[0, 1]]
    with pytest.raises(DataError, match="expected 0/1 or 0/255"):
        binarize_mask(np.array([[0, 7]]), "m")
    assert binarize_mask(np.array([[0, 7]]), "m", class_map={0: 0, 7: 1}).tolist() == [[0, 1]]


def test_memory_stacks_use_annotated_slices(rng):
    image = rng.random((4, 32, 32)).astype(np.float32)
    labels = np.zeros((4, 32, 32), np.uint8)
    labels[1, 5:9, 5:9] = 1
    labels[3, 1:3, 1:3] = 2
    samples = memory_samples([(image, labels)])
    assert [s.name for s in samples] == ["pair0[z=1]", "pair0[z=3]"]
    with pytest.raises(DataError, match="no annotated slice"):
        memory_samples([(image, np.zeros_like(labels))])


def test_folder_errors(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    with pytest.raises(DataError, match="no images"):
        folder_samples(tmp_path / "images", tmp_path / "masks")


def test_split_is_fixed_by_seed(rng):
    samples = memory_samples(_pairs(rng, 6))
    a = [s.name for s in split(samples, 2, 0)[1]]
    assert a == [s.name for s in split(samples, 2, 0)[1]]


def test_augmentation_is_seeded_and_keeps_masks_binary(rng):
    samples = memory_samples(_pairs(rng))
    out = []
    for _ in range(2):
        g = torch.Generator().manual_seed(3)
        x, y, f = PatchSampler(samples, 32, g).sample(4)
        out.append(augment(x, y, f, AugmentConfig(), g))
    assert all(torch.equal(a, b) for a, b in zip(*out))
    assert set(torch.unique(out[0][1]).tolist()) <= {0.0, 1.0}


def test_training_writes_checkpoints_and_learns(tmp_path, rng):
    samples = memory_samples(_pairs(rng, 4))
    config = _config(tmp_path, steps=40, val_every=20, lr=0.02)
    events = list_events(iter_train(config, samples=samples[:3], val_samples=samples[3:]))
    assert events[-1].step == 40 and events[19].validation is not None
    assert np.mean([e.loss for e in events[-5:]]) < np.mean([e.loss for e in events[:5]])
    best = load_model(tmp_path / "run" / "best.json")
    assert best.metadata["provenance"]["validation_metrics"]["f1"] > 0
    # the threshold is chosen on the validation split and is at least as good as 0.5 there
    prov = best.metadata["provenance"]
    assert best.metadata["threshold"] in THRESHOLDS
    assert prov["validation_metrics"]["f1"] >= prov["validation_metrics_at_0.5"]["f1"]
    assert prov["training_float"] == "fp32"  # what precision became is recorded
    assert (tmp_path / "run" / "log.csv").read_text().count("\n") == 41


def list_events(gen):
    return list(gen)


def test_channels_last_trains_the_same_network_and_saves_plain_weights(tmp_path, rng, monkeypatch):
    """The trainer keeps the network and its batches channels-last (oneDNN's fast layout,
    benchmarks.train_step): the same losses as the plain layout to float precision, and the
    convolutions really in that layout while training."""
    import torch

    samples = memory_samples(_pairs(rng, 3))
    seen = []
    real = torch.nn.Conv2d.forward

    def watching(self, x):
        if self.training:  # the steps (validation runs through the engine, channels-last itself)
            seen.append(x.is_contiguous(memory_format=torch.channels_last) and x.shape[1] > 1)
        return real(self, x)

    monkeypatch.setattr(torch.nn.Conv2d, "forward", watching)
    losses = {}
    for layout in (True, False):
        # a small learning rate: Adam's first steps move every weight by about lr whatever the
        # size of its gradient, so rounding differences would otherwise grow step by step
        config = _config(tmp_path / str(layout), steps=4, val_every=4, lr=1e-5, channels_last=layout)
        losses[layout] = [e.loss for e in iter_train(config, samples=samples[:2], val_samples=samples[2:])]
        if layout:
            assert any(seen), "no convolution saw a channels-last batch"
            seen.clear()
    assert not any(seen)
    # the first step's forward pass is the same to float rounding; batch-norm on 4 patches and
    # Adam then let rounding differences grow a little from step to step
    np.testing.assert_allclose(losses[True][0], losses[False][0], rtol=1e-5)
    np.testing.assert_allclose(losses[True], losses[False], rtol=2e-3)
    # safetensors refuses tensors that are not contiguous: both runs wrote loadable model files
    for layout in (True, False):
        assert load_model(tmp_path / str(layout) / "run" / "last.json").network is not None


def test_cancel_keeps_last_checkpoint(tmp_path, rng):
    samples = memory_samples(_pairs(rng, 3))
    gen = iter_train(_config(tmp_path, steps=50), samples=samples[:2], val_samples=samples[2:])
    for event in gen:
        if event.step == 4:
            gen.close()
    last = load_model(tmp_path / "run" / "last.json")
    assert last.metadata["provenance"]["steps"] == 3


@pytest.mark.parametrize("ema_decay", [None, 0.9])
def test_resume_is_bit_identical(tmp_path, rng, ema_decay):
    samples = memory_samples(_pairs(rng, 3))
    kw = dict(samples=samples[:2], val_samples=samples[2:])
    full = train(_config(tmp_path / "a", steps=6, ema_decay=ema_decay), **kw)
    gen = iter_train(_config(tmp_path / "b", steps=6, ema_decay=ema_decay), **kw)
    for event in gen:
        if event.step == 3:
            gen.close()  # "interrupted" right after the checkpoint at step 3
    resumed = train(_config(tmp_path / "b", steps=6, ema_decay=ema_decay), resume=True, **kw)
    assert resumed.steps == full.steps == 6
    a = load_model(full.last).network.state_dict()
    b = load_model(resumed.last).network.state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_weight_average_is_what_gets_saved(tmp_path, rng):
    """With ema_decay the checkpoints hold the running average, not the last step's weights."""
    from training.trainer import WeightAverage

    samples = memory_samples(_pairs(rng, 3))
    kw = dict(samples=samples[:2], val_samples=samples[2:])
    raw = train(_config(tmp_path / "raw", steps=6), **kw)
    averaged = train(_config(tmp_path / "ema", steps=6, ema_decay=0.5), **kw)
    raw_state = load_model(raw.last).network.state_dict()
    ema_model = load_model(averaged.last)
    assert ema_model.metadata["provenance"]["ema_decay"] == 0.5
    differs = [
        key
        for key, value in ema_model.network.state_dict().items()
        if value.is_floating_point() and not torch.equal(value, raw_state[key])
    ]
    assert differs, "the averaged checkpoint equals the raw weights"
    # resuming with another ema_decay (or none) than the run had is refused, not mixed up
    with pytest.raises(ValueError, match="trained with ema_decay=None, not 0.5"):
        train(_config(tmp_path / "raw", steps=8, ema_decay=0.5), resume=True, **kw)
    with pytest.raises(ValueError, match="trained with ema_decay=0.5, not None"):
        train(_config(tmp_path / "ema", steps=8), resume=True, **kw)

    # the average itself: decay d moves each weight (1 - d) of the way to the live one
    live = torch.nn.Linear(2, 1)
    average = WeightAverage(live, 0.5)
    with torch.no_grad():
        start = live.weight.clone()
        live.weight.add_(1.0)
    average.update(live, step=1000)
    assert torch.allclose(average.network.weight, start + 0.5)
    frozen = live.bias.clone()
    for step in range(200):  # a weight that does not move stays bit-identical in the average
        average.update(live, step)
    assert torch.equal(average.network.bias, frozen)
    for bad in (0.0, 1.0):
        with pytest.raises(ValueError, match="between 0 and 1"):
            WeightAverage(live, bad)


def test_bundled_configs_load():
    config = load_config("drive-vessels", ["steps=10", "augment.flips=false"])
    assert config.architecture == "r2au_net" and config.steps == 10 and config.augment.flips is False
    for name in ("drive-unet", "drive-attention_unet", "drive-r2u_net", "drive-r2au_net"):
        assert load_config(name).data["kind"] == "drive"
    with pytest.raises(ValueError, match="unknown config keys"):
        load_config("drive-vessels", ["stepz=1"])


def test_drive_training_runs_on_real_data(tmp_path, drive_root):
    config = _config(
        tmp_path, steps=2, val_every=2, val_images=1, data={"kind": "drive", "root": str(drive_root)}
    )
    result = train(config)
    assert result.best is not None and result.best_metrics["f1"] >= 0


def _write_pairs(folder, rng, n=3, size=48):
    import tifffile

    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    for i, (image, mask) in enumerate(_pairs(rng, n, size)):
        tifffile.imwrite(folder / "images" / f"case{i}.tif", image)
        tifffile.imwrite(folder / "masks" / f"case{i}.tif", mask * 255)


STEPS = int(__import__("os").environ.get("DDP_STEPS", 4))


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(tmp_path, rng):
    """2 gloo processes at global batch 8 train like 1 process at batch 8."""
    import subprocess
    import sys
    from pathlib import Path

    _write_pairs(tmp_path / "data", rng)
    common = [
        "--set",
        "base_width=4",
        "--set",
        "patch_size=32",
        "--set",
        "batch_size=8",
        "--set",
        f"steps={STEPS}",
        "--set",
        "val_every=2",
        "--set",
        "val_images=1",
        "--set",
        "precision=fp32",
        "--set",
        "lr=0.01",
        "--set",
        "loss=bce",
        "--set",
        "threads=1",
        "--set",
        "device=cpu",
        "--set",
        f"data={{kind: folders, images: {tmp_path}/data/images, masks: {tmp_path}/data/masks}}",
    ]
    config = Path(__file__).resolve().parents[1] / "training" / "configs" / "drive-r2au_net.yaml"
    bin_dir = Path(sys.executable).parent
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "napari_r2au.cli",
            "train",
            str(config),
            *common,
            "--set",
            f"output_dir={tmp_path}/one",
        ],
        check=True,
        env=env,
        capture_output=True,
    )
    subprocess.run(
        [
            str(bin_dir / "torchrun"),
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "napari_r2au.cli",
            "train",
            str(config),
            *common,
            "--set",
            f"output_dir={tmp_path}/two",
        ],
        check=True,
        env=env,
        capture_output=True,
    )
    one = load_model(tmp_path / "one" / "last.json").network.state_dict()
    two = load_model(tmp_path / "two" / "last.json").network.state_dict()
    losses = []
    for run in ("one", "two"):
        rows = (tmp_path / run / "log.csv").read_text().splitlines()[1:]
        losses.append([float(r.split(",")[1]) for r in rows])
    # same samples, gradients averaged across ranks: the same update, up to per-rank
    # BatchNorm statistics; without the all-reduce rank 0 would follow its half alone.
    assert len(losses[0]) == len(losses[1]) == STEPS
    np.testing.assert_allclose(losses[0][0], losses[1][0], rtol=0.1)
    torch.manual_seed(0)
    init = create_model("r2au_net", base_width=4).state_dict()
    # conv kernels: biases before a BatchNorm have zero true gradient, and Adam turns their
    # rounding noise into full-size steps of random sign
    keys = [k for k, v in init.items() if v.is_floating_point() and v.dim() > 1]

    def flat(state):
        return torch.cat([state[k].ravel() - init[k].ravel() for k in keys])

    update_one, update_two = flat(one), flat(two)
    cosine = torch.nn.functional.cosine_similarity(update_one, update_two, dim=0).item()
    ratio = (update_one - update_two).norm().item() / update_one.norm().item()
    assert cosine > 0.99 and ratio < 0.1, (cosine, ratio)


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("21_training.tif", "21"),
        ("21_manual1.gif", "21"),
        ("21_training_mask.gif", "21"),
        ("01_dr.JPG", "01_dr"),
        ("01_dr_mask.tif", "01_dr"),
        ("IMD002.png", "IMD002"),
        ("0.png", "0"),
    ],
)
def test_files_pair_by_id(name, key):
    from pathlib import Path

    from napari_r2au.io import pairing_id

    assert pairing_id(Path(name)) == key


def test_tensorboard_logging_or_a_clear_error(tmp_path, rng):
    samples = memory_samples(_pairs(rng, 2))
    config = _config(tmp_path, steps=2, val_every=2, tensorboard=True)
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="pip install tensorboard"):
            train(config, samples=samples[:1], val_samples=samples[1:])
        return
    train(config, samples=samples[:1], val_samples=samples[1:])
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


def test_calibration_uses_samples_at_the_working_scale(tmp_path, rng, monkeypatch):
    """Samples are resized once, when loaded: calibration must not resize them again."""
    import napari_r2au.training.trainer as trainer

    samples = memory_samples(_pairs(rng, 3, size=64))
    scales = []
    original = trainer.predict

    def spy(model, image, **kwargs):
        scales.append((getattr(model, "input_scale", None), kwargs.get("scale")))
        return original(model, image, **kwargs)

    monkeypatch.setattr(trainer, "predict", spy)
    result = train(
        _config(tmp_path, steps=4, val_every=2, input_scale=0.5), samples=samples[:2], val_samples=samples[2:]
    )
    assert load_model(result.best).input_scale == 0.5
    # every validation prediction of a model file that carries a scale runs at scale 1
    assert scales and all(scale == 1.0 for model_scale, scale in scales if model_scale == 0.5)
    assert any(model_scale == 0.5 for model_scale, _ in scales)


def test_named_validation_split_and_class_map(tmp_path, rng):
    import imageio.v3 as iio

    from napari_r2au.training.data import DataError, split
    from napari_r2au.training.trainer import TrainConfig, load_samples

    for folder in ("images", "labels"):
        (tmp_path / folder).mkdir()
    for i in range(5):
        iio.imwrite(tmp_path / "images" / f"{i}.png", rng.integers(0, 255, (32, 32), dtype=np.uint8))
        labels = np.full((32, 32), 255, np.uint8)
        labels[:, 10 + i] = 0  # a membrane line: 0 in these labels
        iio.imwrite(tmp_path / "labels" / f"{i}.png", labels)
    config = TrainConfig(
        in_channels=1,
        data={
            "kind": "folders",
            "images": str(tmp_path / "images"),
            "masks": str(tmp_path / "labels"),
            "class_map": {0: 1, 255: 0},
        },
    )
    samples = load_samples(config)
    assert all(int(s.mask.sum()) == 32 for s in samples)  # membrane is the foreground
    config.input_scale = 2.0  # the class map is applied once, before resizing
    assert all(s.mask.shape == (64, 64) and int(s.mask.sum()) == 128 for s in load_samples(config))
    train, val = split(samples, 1, 0, ["3", "4.png"])
    assert [s.name for s in val] == ["3.png", "4.png"] and len(train) == 3
    with pytest.raises(DataError, match="not found: 9"):
        split(samples, 1, 0, ["9"])
    with pytest.raises(DataError, match="nothing left to train on"):
        split(samples, 1, 0, [str(i) for i in range(5)])
    assert [s.name for s in split(samples, 1, 0, "2")[1]] == ["2.png"]  # one name, not its characters


def test_tiff_stacks_in_folders_are_read_slice_by_slice(tmp_path, rng):
    import tifffile

    (tmp_path / "img").mkdir()
    (tmp_path / "msk").mkdir()
    stack = (rng.random((5, 32, 40)) * 1000).astype(np.uint16)  # a CT-like stack, 5 slices
    labels = np.zeros((5, 32, 40), np.uint8)
    labels[:, 10:20, 5:15] = 1
    labels[4] = 0  # a slice with nothing in it is a valid negative
    tifffile.imwrite(tmp_path / "img" / "ct.tif", stack)
    tifffile.imwrite(tmp_path / "msk" / "ct.tif", labels)
    samples = folder_samples(tmp_path / "img", tmp_path / "msk", in_channels=1)
    assert [s.name for s in samples] == [f"ct.tif[{z}]" for z in range(5)]
    assert all(s.image.shape[:2] == (32, 40) for s in samples)
    np.testing.assert_array_equal(samples[2].mask, labels[2])
    np.testing.assert_array_equal(samples[3].raw[..., 0], stack[3])

    tifffile.imwrite(tmp_path / "msk" / "ct.tif", labels[:4])  # a mask stack that does not fit
    with pytest.raises(DataError, match="differ in size"):
        folder_samples(tmp_path / "img", tmp_path / "msk", in_channels=1)


def test_lovasz_hinge_is_each_images_jaccard_loss_at_the_corners():
    """At errors of exactly 0 (right) or 1 (wrong), the Lovász hinge is the Jaccard loss of the
    wrong pixels, and a batch's loss is the mean over images, not pooled over pixels."""
    from napari_r2au.training.losses import lovasz_hinge_loss, segmentation_loss

    target = torch.zeros(2, 1, 10, 10)
    target[:, 0, :1, :] = 1  # 10 foreground pixels in each image
    signs = 2 * target - 1
    logits = signs.clone()  # margin 1 everywhere: error 0
    logits[0, 0, 0, :3] = 0  # 3 missed foreground pixels: error 1
    logits[0, 0, 5, :2] = 0  # 2 false positives: error 1
    # Jaccard loss of image 0: 5 wrong over the union of 10 foreground and 2 false positives
    assert lovasz_hinge_loss(logits, target).item() == pytest.approx((5 / 12 + 0) / 2)
    assert lovasz_hinge_loss(logits[:1], target[:1]).item() == pytest.approx(5 / 12)
    # every pixel wrong, each with an error of 4: four times the full Jaccard loss
    assert lovasz_hinge_loss(-3 * signs[:1], target[:1]).item() == pytest.approx(4.0)
    # on an empty image only the worst false positive counts
    empty = torch.zeros(1, 1, 4, 4)
    wrong = torch.full((1, 1, 4, 4), -1.0)
    wrong[0, 0, 0, 0] = 2.0  # error 3 on one pixel, 0 elsewhere
    assert lovasz_hinge_loss(wrong, empty).item() == pytest.approx(3.0)
    # the trainer's loss adds BCE, and the gradient reaches the logits
    logits.requires_grad_(True)
    loss = segmentation_loss(logits, target, "bce_lovasz")
    loss.backward()
    assert loss.item() > lovasz_hinge_loss(logits, target).item() and logits.grad.abs().sum() > 0


def test_training_with_the_lovasz_loss_learns(tmp_path, rng):
    samples = memory_samples(_pairs(rng, 4))
    config = _config(tmp_path, steps=40, val_every=20, lr=0.02, loss="bce_lovasz")
    events = list_events(iter_train(config, samples=samples[:3], val_samples=samples[3:]))
    assert np.mean([e.loss for e in events[-5:]]) < np.mean([e.loss for e in events[:5]])
    assert any("bce_lovasz" in problem for problem in _config(tmp_path, loss="lovasz").problems())


def test_a_resume_survives_a_best_model_whose_weights_were_replaced_before_its_sidecar(tmp_path, rng):
    """A run killed between writing best.safetensors and best.json (seen under load in CI's
    SIGKILL test) leaves a pair that does not match: the resume goes on, and the next
    validation writes a best model that loads."""
    samples = memory_samples(_pairs(rng, 4))
    list_events(iter_train(_config(tmp_path, steps=6), samples=samples[:3], val_samples=samples[3:]))
    weights = tmp_path / "run" / "best.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0xFF  # other weights than best.json's sha256 names
    weights.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="sha256 mismatch"):
        load_model(tmp_path / "run" / "best.json")
    with pytest.warns(UserWarning, match="the next validation writes a new best model"):
        events = list_events(
            iter_train(_config(tmp_path, steps=9), samples=samples[:3], val_samples=samples[3:], resume=True)
        )
    assert events[-1].step == 9
    assert load_model(tmp_path / "run" / "best.json").metadata["provenance"]["steps"] == 9


def test_a_run_can_start_from_a_widened_parent(tmp_path, rng):
    from napari_r2au.training.trainer import _starting_network

    samples = memory_samples(_pairs(rng, 4))
    first = _config(tmp_path, output_dir=str(tmp_path / "narrow"))
    list_events(iter_train(first, samples=samples[:3], val_samples=samples[3:]))
    parent = load_model(tmp_path / "narrow" / "best.json")
    config = _config(tmp_path, init_from=str(tmp_path / "narrow" / "best.json"), widen_to=6)
    # the run starts from the parent's function, not from a fresh network of that width
    network, arch_args, _ = _starting_network(config, parent)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(network.eval()(x), parent.network(x), atol=1e-5, rtol=1e-5)
    assert arch_args["base_width"] == 6 and network.head.in_channels == 6
    events = list_events(iter_train(config, samples=samples[:3], val_samples=samples[3:], parent=parent))
    assert events[-1].step == 6
    wide = load_model(tmp_path / "run" / "best.json")
    assert wide.metadata["arch_args"]["base_width"] == 6 and wide.network.head.in_channels == 6
    assert wide.metadata["provenance"]["parent"]["widened_from_base_width"] == 4
    assert parent.network.head.in_channels == 4  # the caller's model is left as it was
    assert any("init_from" in problem for problem in _config(tmp_path, widen_to=6).problems())
    # refused before any data is read or any folder made
    narrower = _config(tmp_path, init_from="x", widen_to=3, output_dir=str(tmp_path / "never"))
    with pytest.raises(ValueError, match="narrower"):
        list_events(iter_train(narrower, samples=samples[:3], val_samples=samples[3:], parent=parent))
    assert not (tmp_path / "never").exists()
