"""Issue 19: a user-given model name never becomes a path unchecked, every fine-tune trains
in a folder of its own (and deletes no other), two fine-tunes at once give two models, a
training run never takes over another run's folder or writes through a planted symlink,
and a fine-tune is one process whatever torchrun variables the shell left behind."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from napari_r2au import create_model, list_models, load_model
from napari_r2au.cli import main
from napari_r2au.model_files import ModelFileError, build_metadata, save_model, user_models_dir

from .test_cli import _tiny_user_model, _write_folder

CONFIG = Path(__file__).resolve().parents[1] / "training" / "configs" / "drive-r2au_net.yaml"
BAD_NAMES = [
    "",
    ".",
    "..",
    "../x",
    "../../victim",
    "a/b",
    "a\\b",
    ".hidden",
    "-x",
    "x.",
    "a b",
    "naïve",
    "x" * 65,
]
GOOD_NAMES = ["my-vessels", "drive-vessels-ft1", "v1.2_x", "_scratch", "x" * 64]


def _tiny_model(directory: Path, name: str, seed: int = 0, **fields) -> Path:
    import torch

    torch.manual_seed(seed)
    net = create_model("r2au_net", base_width=4)
    meta = build_metadata(
        name=name,
        architecture="r2au_net",
        arch_args={"in_channels": 3, "out_channels": 1, "base_width": 4, "t": 2},
        **fields,
    )
    return save_model(net, directory, meta)


def _bars(rng, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    mask = np.zeros((size, size), np.uint8)
    mask[:, 20:28] = 1
    mask[30:36, :] = 1
    image = (rng.random((size, size, 3)) * 60 + mask[..., None] * 120).astype(np.uint8)
    return image, mask


def _finish(generator):
    """Run a generator to its end; its return value."""
    while True:
        try:
            next(generator)
        except StopIteration as stop:
            return stop.value


def _finetune_args(tmp_path: Path, *extra: str) -> list[str]:
    data = tmp_path / "data"
    if not data.exists():
        _write_folder(data)
    return ["finetune", "-m", "base", "--images", str(data / "images"), "--masks", str(data / "masks"),
            "--steps", "2", "--patch", "32", "--batch", "2", "--device", "cpu", *extra]  # fmt: skip


def _train_args(tmp_path: Path, out: Path, *extra: str) -> list[str]:
    data = tmp_path / "data"
    if not data.exists():
        _write_folder(data, n=3)
    sets = ["base_width=4", "patch_size=32", "batch_size=2", "steps=2", "val_every=2", "val_images=1",
            "precision=fp32", "threads=1", "device=cpu", "max_minutes=null", f"output_dir={out}",
            f"data={{kind: folders, images: {data}/images, masks: {data}/masks}}"]  # fmt: skip
    return ["train", str(CONFIG), *[a for s in sets for a in ("--set", s)], *extra]


# -- 1. one function turns a model name into a path ---------------------------------------


@pytest.mark.parametrize("name", BAD_NAMES)
def test_a_model_name_that_is_not_a_plain_name_is_refused(name, tmp_path):
    from napari_r2au.model_files import model_path

    with pytest.raises(ModelFileError, match="is not a valid model name"):
        model_path(tmp_path, name, ".json")


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_a_plain_model_name_gives_a_file_in_the_folder(name, tmp_path):
    from napari_r2au.model_files import model_path

    assert model_path(tmp_path, name, ".json") == tmp_path / f"{name}.json"


@pytest.mark.parametrize("name", ["../evil", "a\\b", "x" * 65, "a b"])
def test_add_model_save_model_and_remove_model_refuse_the_same_names(name, tmp_path):
    from napari_r2au.model_files import add_model, remove_model

    source = _tiny_model(tmp_path / "src", "good")
    models = tmp_path / "models"
    with pytest.raises(ModelFileError, match="is not a valid model name"):
        add_model(source, name=name, directory=models)
    with pytest.raises(ModelFileError, match="is not a valid model name"):
        save_model(load_model(source).network, models, dict(load_model(source).metadata, name=name))
    with pytest.raises(ModelFileError, match="is not a valid model name"):
        remove_model(name, directory=models)
    assert not models.exists() and not list(tmp_path.glob("*evil*"))


@pytest.mark.parametrize("name", ["..", "../../victim", ""])
def test_finetune_refuses_a_name_that_is_a_path_and_deletes_nothing(name, tmp_path, capsys, monkeypatch):
    """``--name ..`` then Ctrl-C deleted the user models folder, ``../../victim`` an unrelated
    folder, ``""`` trained in runs/ itself: refused before anything is read or written."""
    import napari_r2au.engine
    import napari_r2au.training.finetune  # noqa: F401  (imported first: it binds the real run)

    def ctrl_c_after_a_step(generator, callback=None):
        next(generator)
        raise KeyboardInterrupt

    monkeypatch.setattr(napari_r2au.engine, "run", ctrl_c_after_a_step)
    _tiny_user_model()
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("not the run's")
    code = main(_finetune_args(tmp_path, "--name", name))
    assert (user_models_dir() / "base.json").is_file()
    assert (victim / "keep.txt").read_text() == "not the run's"
    assert code == 2
    err = capsys.readouterr().err
    assert "is not a valid model name" in err and len(err.strip().splitlines()) == 1
    assert not (user_models_dir().parent / "runs").exists()  # nothing was started


def test_cancel_deletes_the_runs_own_folder_and_no_other(tmp_path, rng):
    from napari_r2au.training.finetune import FinetuneSettings, iter_finetune

    parent = load_model(_tiny_user_model())
    runs = user_models_dir().parent / "runs"
    (runs / "base-ft1").mkdir(parents=True)  # a folder of the same name, not this run's
    (runs / "base-ft1" / "keep.txt").write_text("someone else's")
    generator = iter_finetune(
        parent, [_bars(rng)], settings=FinetuneSettings(steps=50, patch_size=32, batch_size=2)
    )
    next(generator)  # training
    own = [p for p in runs.iterdir() if p.name != "base-ft1"]
    assert len(own) == 1 and own[0].is_dir()
    generator.close()  # Cancel / Ctrl-C
    assert sorted(p.name for p in runs.iterdir()) == ["base-ft1"]
    assert (runs / "base-ft1" / "keep.txt").read_text() == "someone else's"
    assert [row["name"] for row in list_models() if row["source"] == "user"] == ["base"]


# -- 3. two fine-tunes at once ------------------------------------------------------------


def test_two_fine_tunes_at_once_give_two_models(rng):
    """Both start as base-ft1; the one that finishes second takes base-ft2, in its own run folder."""
    from napari_r2au.training.finetune import FinetuneSettings, iter_finetune

    parent = load_model(_tiny_user_model())
    both_training = threading.Barrier(2, timeout=300)
    results, errors = {}, []

    def finetune(key: int, seed: int) -> None:
        try:
            settings = FinetuneSettings(steps=4, patch_size=32, batch_size=2, seed=seed)
            generator = iter_finetune(
                parent, [_bars(np.random.default_rng(seed))], settings=settings, device="cpu"
            )
            next(generator)  # the name is chosen and training has begun
            both_training.wait()
            results[key] = _finish(generator)
        except BaseException as exc:  # reported by the test, not lost in the thread
            both_training.abort()
            errors.append(exc)

    threads = [threading.Thread(target=finetune, args=(key, key)) for key in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert not errors, errors
    names = sorted(result.model.name for result in results.values())
    assert names == ["base-ft1", "base-ft2"]
    for result in results.values():  # each registered model is the one its run made
        assert load_model(result.model.name).sha256 == result.model.sha256
    assert results[1].model.sha256 != results[2].model.sha256
    assert not list((user_models_dir().parent / "runs").iterdir())


# -- 4. no run takes over another's folder -------------------------------------------------


def test_a_leftover_run_folder_never_supplies_the_new_model(rng):
    """After a kill -9 the next fine-tune reused runs/<name>/ and, never validating,
    registered the old run's best.json."""
    from napari_r2au.training.finetune import FinetuneSettings, iter_finetune

    parent = load_model(_tiny_user_model())
    leftover = user_models_dir().parent / "runs" / "base-ft1"
    stale = _tiny_model(leftover, "best", seed=1, description="the killed run's")
    image, mask = _bars(rng, 40)  # too narrow to hold out a band: no validation
    settings = FinetuneSettings(steps=2, patch_size=32, batch_size=2, weight_share=1.0)
    result = _finish(iter_finetune(parent, [(image, mask)], settings=settings, device="cpu"))
    assert result.dice_after is None and result.model.name == "base-ft1"
    assert result.model.metadata["description"] != "the killed run's"
    assert result.model.sha256 != load_model(stale).sha256
    assert stale.is_file()  # not this run's: left alone


def test_train_refuses_an_output_folder_that_holds_a_run(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    before = {name: f"previous {name}".encode() for name in ("config.json", "log.csv", "last_state.pt")}
    for name, data in before.items():
        (out / name).write_bytes(data)
    assert main(_train_args(tmp_path, out)) == 2
    err = capsys.readouterr().err.strip()
    assert (
        len(err.splitlines()) == 1
        and "holds a run already" in err
        and "--resume" in err
        and "--overwrite" in err
    )
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing written


def test_train_overwrite_replaces_the_previous_run(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--overwrite" in capsys.readouterr().out
    out = tmp_path / "run"
    _tiny_model(out, "best", seed=1, description="the previous run's")
    (out / "log.csv").write_text("previous log\n")
    (out / "notes.txt").write_text("mine")
    assert main(_train_args(tmp_path, out, "--overwrite")) == 0
    assert load_model(out / "best.json").metadata["description"] != "the previous run's"
    assert (out / "log.csv").read_text().startswith("step,loss")
    assert (out / "notes.txt").read_text() == "mine"  # only the run's own files are replaced
    assert main(_train_args(tmp_path, out, "--overwrite", "--resume")) == 2


# -- 8. no write through a planted symlink; torchrun variables ---------------------------


def test_config_and_log_are_never_written_through_a_symlink(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    victims = {}
    for name in ("config.json", "log.csv"):
        victims[name] = tmp_path / f"victim-{name}"
        victims[name].write_text("precious")
        (out / name).symlink_to(victims[name])
    assert main(_train_args(tmp_path, out)) == 2  # a folder with a run's file names: refused
    assert main(_train_args(tmp_path, out, "--overwrite")) == 0  # the links are replaced, not followed
    for name, victim in victims.items():
        assert victim.read_text() == "precious"
        assert not (out / name).is_symlink() and (out / name).stat().st_size > 0


def test_resume_refuses_to_append_to_a_symlinked_log(tmp_path):
    from napari_r2au.training.data import memory_samples
    from napari_r2au.training.trainer import TrainConfig, train

    rng = np.random.default_rng(0)
    samples = memory_samples([_bars(rng, 48), _bars(rng, 48)])
    values = dict(name="t", base_width=4, patch_size=32, batch_size=2, steps=2, val_every=2, precision="fp32",
                  output_dir=str(tmp_path / "run"), threads=1, device="cpu")  # fmt: skip
    train(TrainConfig(**values), samples=samples[:1], val_samples=samples[1:])
    victim = tmp_path / "victim.csv"
    victim.write_text("precious")
    log = tmp_path / "run" / "log.csv"
    log.unlink()
    log.symlink_to(victim)
    with pytest.raises(OSError, match="symbolic link"):
        train(TrainConfig(**dict(values, steps=3)), samples=samples[:1], val_samples=samples[1:], resume=True)
    assert victim.read_text() == "precious"


TORCHRUN = {
    "WORLD_SIZE": "2",
    "RANK": "0",
    "LOCAL_RANK": "0",
    "MASTER_ADDR": "127.0.0.1",
    "MASTER_PORT": "29531",
}


@pytest.fixture
def leftover_torchrun(monkeypatch):
    """A shell with torchrun's variables left over; joining a process group would wait forever
    for a rank 1 that never comes, so here it fails at once instead."""
    import torch.distributed as dist

    for key, value in TORCHRUN.items():
        monkeypatch.setenv(key, value)

    def never(*args, **kwargs):
        raise AssertionError("a fine-tune joined a process group (it would wait forever for the other ranks)")

    monkeypatch.setattr(dist, "init_process_group", never)


def test_finetune_ignores_leftover_torchrun_variables(leftover_torchrun, tmp_path, capsys):
    _tiny_user_model()
    assert main(_finetune_args(tmp_path)) == 0
    assert "new model  base-ft1" in capsys.readouterr().out


def test_the_fine_tune_docks_job_ignores_leftover_torchrun_variables(leftover_torchrun, rng):
    from napari_r2au.widgets.finetune import FinetuneWidget

    sidecar = _tiny_user_model()
    settings = {"steps": 2, "patch_size": 32, "batch_size": 2}
    job = FinetuneWidget._job(str(sidecar), [_bars(rng)], None, settings, "image", "cpu", None, (None, None))
    assert _finish(job).model.name == "base-ft1"


def test_a_partial_torchrun_environment_is_refused_not_waited_on(monkeypatch, tmp_path, capsys):
    """Only a process torchrun started (all its variables) joins a process group."""
    import torch.distributed as dist

    from napari_r2au.training.trainer import distributed_context

    for key in TORCHRUN:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: pytest.fail("joined a process group"))
    with pytest.raises(ValueError, match="not started by torchrun"):
        distributed_context()
    assert main(_train_args(tmp_path, tmp_path / "run")) == 2
    assert "not started by torchrun" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
