"""The comparison benchmark end to end, on real DRIVE data at a toy size."""

from __future__ import annotations

import json

import numpy as np

from benchmarks import TABLE_BEGIN, TABLE_END, drive_comparison, variants, write_between_markers


def test_drive_comparison_trains_each_architecture_and_writes_its_table(tmp_path, drive_root, monkeypatch):
    monkeypatch.setattr(drive_comparison, "DRIVE", drive_root)
    doc = tmp_path / "doc.md"
    doc.write_text(
        "intro\n<!-- comparison -->\nold table\n<!-- /comparison -->\noutro\n"
        "<!-- comparison-60 -->\nlonger budget\n<!-- /comparison-60 -->\n"
    )
    tiny = ["steps=2", "base_width=4", "patch_size=32", "batch_size=2", "val_every=2"]
    args = [
        "--minutes",
        "1",
        "--architectures",
        "unet",
        "attention_unet",
        "--out",
        str(tmp_path / "runs"),
        "--markdown",
        str(doc),
    ] + [item for override in tiny for item in ("--set", override)]
    assert drive_comparison.main(args) == 0
    text = doc.read_text()
    assert text.startswith("intro\n") and "outro\n<!-- comparison-60 -->\nlonger budget\n" in text
    assert "old table" not in text  # the default markers' table was replaced, the other left alone
    rows = [
        line for line in text.splitlines() if line.startswith("| unet") or line.startswith("| attention_unet")
    ]
    assert len(rows) == 2
    assert drive_comparison.main(args + ["--reuse", "--marker", "comparison-60"]) == 0  # a table per budget
    text = doc.read_text()
    assert "longer budget" not in text and text.count("| unet |") == 2
    config = json.loads((tmp_path / "runs" / "unet-seed0" / "config.json").read_text())
    assert config["architecture"] == "unet" and config["threads"] == 1
    assert config["val_names"] == drive_comparison.VALIDATION


def test_reuse_keeps_finished_runs_and_retrains_changed_or_killed_ones(tmp_path, drive_root, monkeypatch):
    monkeypatch.setattr(drive_comparison, "DRIVE", drive_root)
    tiny = ["steps=2", "base_width=4", "patch_size=32", "batch_size=2", "val_every=2"]
    sets = [item for override in tiny for item in ("--set", override)]
    runs = tmp_path / "runs"
    base = ["--minutes", "1", "--architectures", "unet", "--out", str(runs), "--reuse"]
    assert drive_comparison.main(base + sets) == 0
    log = runs / "unet-seed0" / "train.log"
    first = log.stat().st_mtime_ns

    trained: list[list[str]] = []
    real_run = variants.subprocess.run

    def spy(command, **kwargs):
        trained.append(command)
        return real_run(command, **kwargs)

    monkeypatch.setattr(variants.subprocess, "run", spy)
    assert drive_comparison.main(base + sets + ["--seeds", "0", "1"]) == 0
    assert [next(i for i in c if i.startswith("seed=")) for c in trained] == [
        "seed=1"
    ]  # seed 0 reused, seed 1 trained
    assert log.stat().st_mtime_ns == first

    trained.clear()
    assert drive_comparison.main(base + sets + ["--set", "lr=0.001"]) == 0  # other settings: retrained
    assert len(trained) == 1
    trained.clear()
    log.write_text(log.read_text() + "Traceback: killed\n")  # did not end normally: retrained
    assert drive_comparison.main(base + sets + ["--set", "lr=0.001"]) == 0
    assert len(trained) == 1


def test_a_config_varied_in_one_setting_trains_each_value_for_equal_steps(tmp_path, drive_root):
    """The recurrent steps t of R2U-Net (as for lungs), at a toy size on real DRIVE images."""
    doc = tmp_path / "doc.md"
    tiny = ["base_width=4", "patch_size=32", "batch_size=2", "val_every=2", f"data.root={drive_root}"]
    args = ["drive-r2u_net", "--vary", "t=1,2", "--steps", "2", "--out", str(tmp_path / "runs")]
    args += ["--markdown", str(doc)] + [item for override in tiny for item in ("--set", override)]
    assert variants.main(args) == 0
    rows = [
        line for line in doc.read_text().splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")
    ]
    assert len(rows) == 2 and "<!-- variants-drive-r2u_net-t -->" in doc.read_text()
    for t in (1, 2):
        config = json.loads((tmp_path / "runs" / f"t-{t}" / "config.json").read_text())
        assert config["t"] == t and config["steps"] == 2 and config["max_minutes"] is None
        assert all(row.split("|")[3].strip() == "2" for row in rows)  # steps done, equal


def test_benchmark_tables_replace_only_the_text_between_their_markers(tmp_path):
    doc = tmp_path / "doc.md"
    write_between_markers(doc, "first table")
    assert doc.read_text() == f"{TABLE_BEGIN}\nfirst table\n{TABLE_END}\n"
    doc.write_text("# Title\n\nintro\n" + doc.read_text() + "\nprose written by hand\n")
    write_between_markers(doc, "second table\n")
    assert (
        doc.read_text()
        == f"# Title\n\nintro\n{TABLE_BEGIN}\nsecond table\n{TABLE_END}\n\nprose written by hand\n"
    )
    assert [p.name for p in tmp_path.iterdir()] == ["doc.md"]  # written through a temporary file, none left


def test_stack_scale_benchmark_times_both_runs_and_writes_its_table(tmp_path):
    from benchmarks import stack_scale

    doc = tmp_path / "performance.md"
    doc.write_text("intro\n<!-- stack-scale -->\nold\n<!-- /stack-scale -->\noutro\n")
    assert stack_scale.main(["--slices", "3", "--size", "64", "--markdown", str(doc)]) == 0
    text = doc.read_text()
    assert "old" not in text and text.startswith("intro\n") and text.endswith("outro\n")
    assert "| Current slice (1 slice) |" in text and "| All slices (3) |" in text


def test_slider_benchmark_moves_the_slider_in_napari_and_writes_its_table(tmp_path):
    from benchmarks import slider

    doc = tmp_path / "performance.md"
    doc.write_text("intro\n<!-- slider -->\nPLACEHOLDER\n<!-- /slider -->\noutro\n")
    assert slider.main(["--slices", "3", "--size", "64", "--moves", "2", "--markdown", str(doc)]) == 0
    text = doc.read_text()
    assert "PLACEHOLDER" not in text and text.startswith("intro\n") and text.endswith("outro\n")
    assert "| slider update in napari (3x64x64 stack), median of 2 |" in text
    assert text.count("of which") == 4


def test_cross_dataset_evaluates_the_images_the_retina_config_holds_out(drive_root):
    """The benchmark's held-out images are exactly the validation part the trainer draws
    from training/configs/retina-vessels.yaml: one split, so no image is both."""
    from benchmarks.cross_dataset import CONFIG, held_out
    from napari_r2au.training.config import load_config

    split = held_out()
    config = load_config(CONFIG)
    assert list(split) == [source["name"] for source in config.data["sources"]]
    for source in config.data["sources"]:
        assert len(split[source["name"]]) == source["val_images"]
        for image, mask, fov in split[source["name"]]:
            assert image.is_file() and mask.is_file() and fov is not None and fov.is_file()
            assert image.name.split(".")[0].split("_training")[0] in mask.name


def test_worklist_reviewer_corrects_learns_and_scores_the_rest_in_both_orders(
    tmp_path, drive_root, monkeypatch
):
    """The simulated reviewer end to end at a toy size: three DRIVE crops laid out like HRF
    (images/, manual1/, mask/), two fine-tune steps, two corrected cases per order."""
    from benchmarks import worklist_reviewer
    from napari_r2au.io import read_image, write_tiff

    root = tmp_path / "camera"
    for name in ("images", "manual1", "mask"):
        (root / name).mkdir(parents=True)
    for number in (21, 22, 23):
        crop = np.s_[200:328, 200:328]
        image = read_image(drive_root / "images" / f"{number}_training.tif")[crop]
        write_tiff(root / "images" / f"c{number}.tif", image)
        write_tiff(
            root / "manual1" / f"c{number}.tif",
            (read_image(drive_root / "1st_manual" / f"{number}_manual1.gif")[crop] > 0).astype(np.uint8),
        )
        write_tiff(
            root / "mask" / f"c{number}_mask.tif",
            (read_image(drive_root / "mask" / f"{number}_training_mask.gif")[crop] > 0).astype(np.uint8),
        )
    monkeypatch.setattr(
        worklist_reviewer, "LAYOUTS", {"HRF": (root, "images", "manual1", "{}.tif", "mask", "{}_mask.tif")}
    )
    doc, data = tmp_path / "doc.md", tmp_path / "out.json"
    doc.write_text(
        "intro\n<!-- worklist-hrf-drive-vessels -->\nold\n<!-- /worklist-hrf-drive-vessels -->\noutro\n"
    )
    args = [
        "--model",
        "drive-vessels",
        "--steps",
        "2",
        "--corrections",
        "2",
        "--out",
        str(doc),
        "--out",
        str(data),
    ]
    assert worklist_reviewer.main(args) == 0
    result = json.loads(data.read_text())
    assert result["cases"] == ["c21", "c22", "c23"] and set(result["orders"]) == {"file", "uncertain"}
    for steps in result["orders"].values():
        assert [len(s["corrected"]) for s in steps] == [0, 1, 2]
        assert [s["remaining"] for s in steps] == [3, 2, 1]
        assert steps[-1]["model"] == "drive-vessels-ft2" and steps[-1]["segmented"] == 1
        assert 0.0 < steps[0]["f1_pooled"] < 1.0 and steps[-1]["f1_series"] > steps[0]["f1_series"]
    assert result["orders"]["file"][2]["corrected"] == ["c21", "c22"]
    text = doc.read_text()
    assert "old" not in text and text.startswith("intro\n") and text.endswith("outro\n")
    assert text.count("| 2 | 2: ") == 2  # a row after the second learn, per order
    # the Fine-tune dock's rule: a version that scores lower on its held-out strip is not used
    args = ["--model", "drive-vessels", "--steps", "2", "--corrections", "1", "--order", "file"]
    assert worklist_reviewer.main(args + ["--adopt", "if-better", "--out", str(data)]) == 0
    step = json.loads(data.read_text())["orders"]["file"][1]
    before, after = step["strip_dice"]
    if step["kept_aside"]:
        assert after < before and step["model"] == "drive-vessels" and step["segmented"] == 0
    else:
        assert step["model"] == "drive-vessels-ft1" and step["segmented"] == 2


def test_the_cross_dataset_benchmark_can_re_save_photographs_as_jpeg(tmp_path, drive_root):
    """--jpeg: each photograph is written as a JPEG of that quality, paired as before."""
    import imageio.v3 as iio

    from benchmarks import cross_dataset

    image = next((drive_root / "images").glob("*.tif"))
    mask = next((drive_root / "1st_manual").glob(f"{image.name.split('_')[0]}_*"))
    images, masks, _ = cross_dataset._link([(image, mask, None)], tmp_path / "q30", jpeg=30)
    (saved,) = images.iterdir()
    assert saved.suffix == ".jpg" and saved.read_bytes()[:2] == b"\xff\xd8"
    original, compressed = iio.imread(image)[..., :3].astype(float), iio.imread(saved).astype(float)
    assert compressed.shape == original.shape and 0 < np.abs(compressed - original).mean() < 10
    assert (masks / mask.name).is_symlink()


def test_precision_benchmark_times_both_floats_and_names_the_default(tmp_path, drive_root):
    from benchmarks import precision
    from napari_r2au import device

    out = tmp_path / "perf.md"
    assert precision.main(["--repeat", "1", "--markdown", str(out)]) == 0
    if not device.cpu_has_bf16():
        assert not out.exists()  # nothing to decide on a CPU without bf16
        return
    text = out.read_text()
    assert f"default float here: **{'bf16' if device.cpu_bf16_is_faster() else 'fp32'}**" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "x |" in line]
    assert len(rows) == 3  # the probe, predict, a training step


def test_threshold_rules_mass_keeps_the_expected_pixel_count_and_the_sweep_bounds_the_rest():
    from benchmarks.threshold_rules import thresholds

    rng = np.random.default_rng(0)
    truth = rng.random(5000) < 0.2
    probabilities = np.clip(truth * 0.6 + rng.random(5000) * 0.5, 0, 1).astype(np.float32)
    levels = thresholds(probabilities, truth, stored=0.5)
    assert abs(int((probabilities > levels["mass"]).sum()) - probabilities.sum()) <= 2
    assert 0 < levels["otsu"] < 1 and levels["stored"] == 0.5

    def f1(level):
        mask = probabilities > level
        return 2 * (mask & truth).sum() / (mask.sum() + truth.sum())

    assert f1(levels["best of sweep"]) >= max(f1(levels[r]) for r in ("stored", "mass", "otsu")) - 0.02
