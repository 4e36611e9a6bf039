from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch

from napari_r2au import create_model, list_models, load_model
from napari_r2au.model_files import (
    DEFAULT_MODEL,
    ModelFileError,
    build_metadata,
    load_model_file,
    save_model,
    user_models_dir,
)


def _save_tiny(directory, name="tiny"):
    net = create_model("r2au_net", base_width=4)
    args = {"in_channels": 3, "out_channels": 1, "base_width": 4, "t": 2}
    meta = build_metadata(name=name, architecture="r2au_net", arch_args=args, description="test")
    return net, save_model(net, directory, meta)


def test_round_trip_preserves_weights_and_metadata(tmp_path):
    net, sidecar = _save_tiny(tmp_path)
    loaded = load_model(sidecar)
    assert loaded.name == "tiny" and loaded.in_channels == 3 and not loaded.network.training
    for key, value in net.state_dict().items():
        assert torch.equal(value, loaded.network.state_dict()[key]), key
    assert load_model(tmp_path / "tiny.safetensors").sha256 == loaded.sha256  # by weights path too
    assert load_model(tmp_path).name == "tiny"  # by folder


def test_tampered_weights_are_rejected(tmp_path):
    _, sidecar = _save_tiny(tmp_path)
    weights = tmp_path / "tiny.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="sha256 mismatch"):
        load_model(sidecar)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_MODEL_FILE",))


def test_pickle_that_runs_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    weights = tmp_path / "evil.pt"
    weights.write_bytes(pickle.dumps({"conv.weight": _Exploit()}))
    digest = __import__("hashlib").sha256(weights.read_bytes()).hexdigest()
    meta = build_metadata(
        name="evil",
        architecture="r2au_net",
        arch_args={"base_width": 4},
        weights_file="evil.pt",
        weights_sha256=digest,
    )
    (tmp_path / "evil.json").write_text(json.dumps(meta))
    with pytest.raises(ModelFileError, match="refused"):
        load_model(tmp_path / "evil.json")
    assert not (tmp_path / "PWNED_BY_MODEL_FILE").exists()


def test_plain_state_dict_pt_loads(tmp_path):
    net = create_model("unet", base_width=4)
    torch.save(net.state_dict(), tmp_path / "plain.pt")
    digest = __import__("hashlib").sha256((tmp_path / "plain.pt").read_bytes()).hexdigest()
    meta = build_metadata(
        name="plain",
        architecture="unet",
        arch_args={"base_width": 4},
        weights_file="plain.pt",
        weights_sha256=digest,
    )
    (tmp_path / "plain.json").write_text(json.dumps(meta))
    assert load_model(tmp_path / "plain.json").metadata["architecture"] == "unet"


def test_wrong_architecture_and_bad_json_are_clear_errors(tmp_path):
    _, sidecar = _save_tiny(tmp_path)
    meta = json.loads(sidecar.read_text())
    meta["arch_args"]["base_width"] = 8
    sidecar.write_text(json.dumps(meta))
    with pytest.raises(ModelFileError, match="do not fit"):
        load_model(sidecar)
    sidecar.write_text("{not json")
    with pytest.raises(ModelFileError, match="not a readable"):
        load_model_file(sidecar)


def test_user_models_are_listed_and_found_by_name():
    _save_tiny(user_models_dir(), "my-finetune")
    names = {(row["name"], row["source"]) for row in list_models()}
    assert ("my-finetune", "user") in names
    assert (DEFAULT_MODEL, "bundled") in names
    assert load_model("my-finetune").source == "user"
    with pytest.raises(ModelFileError, match="available: .*my-finetune"):
        load_model("no-such-model")


def test_model_list_rereads_a_sidecar_only_when_it_changed(monkeypatch):
    """The pickers list models on every layer change: unchanged sidecars are not re-read,
    but an edited, replaced, broken or removed one is seen at once."""
    import napari_r2au.model_files as model_files

    _, sidecar = _save_tiny(user_models_dir(), "listed")
    reads: list[str] = []
    read = model_files._read_metadata
    monkeypatch.setattr(model_files, "_read_metadata", lambda path: reads.append(path.name) or read(path))

    def described() -> dict[str, str]:
        return {row["name"]: row["description"] for row in list_models() if row["source"] == "user"}

    described()
    reads.clear()
    assert "listed" in described()
    assert reads == []  # nothing changed: nothing read
    meta = json.loads(sidecar.read_text())
    meta["description"] = "edited"
    replacement = sidecar.with_suffix(".tmp")
    replacement.write_text(json.dumps(meta))
    os.replace(replacement, sidecar)  # as the project writes: a new file in its place
    assert described()["listed"] == "edited"
    assert reads == ["listed.json"]
    list_models()[0]["validation"]["f1"] = -1.0  # a caller's change stays its own
    assert all(row["validation"].get("f1") != -1.0 for row in list_models())
    sidecar.write_text("{broken")
    assert "listed" not in described()
    sidecar.unlink()
    assert "listed" not in described()


def test_bundled_default_model_is_trained():
    model = load_model(DEFAULT_MODEL)
    prov = model.metadata["provenance"]
    assert model.metadata["architecture"] == "r2au_net"
    assert prov["steps"] > 0 and prov["validation_metrics"]["f1"] > 0.7
    assert (model.path.parent / model.metadata["weights_file"]).stat().st_size <= 20 * 2**20
    x = torch.from_numpy(np.zeros((1, 3, 32, 32), np.float32))
    assert model.network(x).shape == (1, 1, 32, 32)


def test_metadata_problems_are_listed_in_one_message(tmp_path):
    _, sidecar = _save_tiny(tmp_path)
    meta = json.loads(sidecar.read_text())
    meta.update(
        threshold="high", in_channels=-1, postprocess=["dilate"], weights_file="../elsewhere.safetensors"
    )
    del meta["architecture"]
    sidecar.write_text(json.dumps(meta))
    with pytest.raises(ModelFileError) as caught:
        load_model(sidecar)
    message = str(caught.value)
    for expected in (
        "missing architecture",
        "threshold must be a number between 0 and 1",
        "in_channels must be a positive integer",
        "postprocess must be a list of steps",
        "weights_file must be a file name in the same folder",
    ):
        assert expected in message, message


def test_invalid_metadata_is_refused_before_anything_is_written(tmp_path):
    net = create_model("unet", base_width=4)
    meta = build_metadata(name="bad", architecture="unet", arch_args={"base_width": 4}, threshold=1.5)
    with pytest.raises(ModelFileError, match="threshold"):
        save_model(net, tmp_path, meta)
    assert list(tmp_path.iterdir()) == []


def test_older_version_1_file_is_migrated_and_pre_1_is_refused(tmp_path):
    _, sidecar = _save_tiny(tmp_path)
    meta = json.loads(sidecar.read_text())
    for key in ("input_scale", "pixel_size", "pixel_size_unit", "postprocess", "threshold", "axes"):
        meta.pop(key)  # an early version-1 file, written before these fields existed
    sidecar.write_text(json.dumps(meta))
    loaded = load_model(sidecar)
    assert (loaded.input_scale, loaded.pixel_size, loaded.threshold) == (1.0, None, 0.5)
    assert loaded.metadata["postprocess"] == [] and loaded.metadata["axes"] == "YXC"
    for version in (0, "1", 0.5):
        meta["format_version"] = version
        sidecar.write_text(json.dumps(meta))
        with pytest.raises(ModelFileError, match="not one napari-r2au ever wrote"):
            load_model(sidecar)
    meta["format_version"] = None
    sidecar.write_text(json.dumps(meta))
    with pytest.raises(ModelFileError, match="missing format_version"):
        load_model(sidecar)
    meta["format_version"] = 1.0  # what some JSON writers make of 1
    sidecar.write_text(json.dumps(meta))
    assert load_model(sidecar).name == "tiny"
    meta["format_version"] = 99
    sidecar.write_text(json.dumps(meta))
    with pytest.raises(ModelFileError, match="newer than this napari-r2au understands"):
        load_model(sidecar)


def test_names_and_units_are_checked(tmp_path):
    net = create_model("unet", base_width=4)
    for name in ("../escape", "sub/dir", ".hidden"):
        with pytest.raises(ModelFileError, match="is not a valid model name"):
            save_model(
                net, tmp_path, build_metadata(name=name, architecture="unet", arch_args={"base_width": 4})
            )
    with pytest.raises(ModelFileError, match="pixel_size_unit must be null or a unit of length"):
        save_model(
            net,
            tmp_path,
            build_metadata(
                name="x",
                architecture="unet",
                arch_args={"base_width": 4},
                pixel_size=4.0,
                pixel_size_unit="seconds",
            ),
        )
    assert list(tmp_path.iterdir()) == []


def test_add_model_refuses_bundled_names_and_existing_ones(tmp_path):
    from napari_r2au.model_files import add_model

    _, sidecar = _save_tiny(tmp_path)
    with pytest.raises(ModelFileError, match="bundled model's name"):
        add_model(sidecar, name=DEFAULT_MODEL)
    added = add_model(sidecar, name="mine", description="copied")
    assert load_model("mine").metadata["description"] == "copied" and added.parent == user_models_dir()
    with pytest.raises(ModelFileError, match="exists"):
        add_model(sidecar, name="mine")
    assert add_model(sidecar, name="mine", overwrite=True) == added


def test_removing_a_user_model_takes_it_out_of_the_lists_and_keeps_its_files(tmp_path):
    from napari_r2au.model_files import add_model, bundled_models_dir, list_models, remove_model

    _, sidecar = _save_tiny(tmp_path)
    added = add_model(sidecar, name="mine")
    weights = added.with_suffix(".safetensors")
    digest = json.loads(added.read_text())["weights_sha256"]
    target = remove_model("mine")
    assert target.parent == user_models_dir() / "removed" and target.name.startswith("mine-")
    assert not added.exists() and not weights.exists()
    assert sorted(p.name for p in target.iterdir()) == ["mine.json", "mine.safetensors"]
    assert "mine" not in [row["name"] for row in list_models()]
    with pytest.raises(ModelFileError, match="no model called"):
        load_model("mine")
    for path in target.iterdir():  # moving the files back restores the very same model
        path.rename(user_models_dir() / path.name)
    assert load_model("mine").sha256 == digest

    with pytest.raises(ModelFileError, match="bundled model"):
        remove_model(DEFAULT_MODEL)
    assert (bundled_models_dir() / f"{DEFAULT_MODEL}.json").is_file()
    with pytest.raises(ModelFileError, match="user models: mine"):
        remove_model("absent")
    (user_models_dir() / "mine.json").write_text("{not json")  # a broken model can still be removed
    assert sorted(p.name for p in remove_model("mine").iterdir()) == ["mine.json", "mine.safetensors"]
    assert list(user_models_dir().glob("mine.*")) == []
    with pytest.raises(ModelFileError, match="a removed model was called 'mine'"):
        add_model(sidecar, name="mine")  # a name in an audit trail keeps meaning one model
    with pytest.raises(ModelFileError, match="is not a valid model name"):
        remove_model("../models/x")

    # weights that another (hand-made) sidecar also names stay where that model needs them
    twin = add_model(sidecar, name="twin")
    other = json.loads(twin.read_text())
    (user_models_dir() / "alias.json").write_text(json.dumps(dict(other, name="alias")))
    kept = remove_model("twin")
    assert (kept / "twin.safetensors").is_file() and (user_models_dir() / "twin.safetensors").is_file()
    assert load_model("alias").sha256 == other["weights_sha256"]


def test_unknown_architecture_or_arguments_are_model_file_errors(tmp_path):
    _, sidecar = _save_tiny(tmp_path)
    meta = json.loads(sidecar.read_text())
    for architecture, args in (("vnet", meta["arch_args"]), ("r2au_net", {**meta["arch_args"], "heads": 3})):
        sidecar.write_text(json.dumps(dict(meta, architecture=architecture, arch_args=args)))
        with pytest.raises(ModelFileError, match="cannot build"):
            load_model(sidecar)


def test_listing_models_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys; from napari_r2au.model_files import list_models; list_models(); print('torch' in sys.modules)"
    assert (
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout.strip()
        == "False"
    )


def test_add_model_takes_the_threshold_from_a_held_out_run(tmp_path):
    """A model trained on all the data gets the threshold its held-out twin chose, with the figures."""
    from napari_r2au.model_files import add_model

    args = {"in_channels": 3, "out_channels": 1, "base_width": 4, "t": 2}

    def held_out_run(folder, chosen_on="validation split, F1", architecture="r2au_net"):
        provenance = {
            "validation_images": 4,
            "validation_metrics": {"f1": 0.81},
            "threshold_chosen_on": chosen_on,
        }
        net = create_model(architecture, base_width=4)
        return save_model(
            net,
            tmp_path / folder,
            build_metadata(
                name="best", architecture=architecture, arch_args=args, threshold=0.3, provenance=provenance
            ),
        )

    donor = held_out_run("held-out")
    _, all_data = _save_tiny(tmp_path / "all")
    added = load_model(add_model(all_data, name="all-data", threshold_from=donor))
    assert added.threshold == 0.3
    source = added.metadata["provenance"]["threshold_source"]
    assert source["validation_metrics"] == {"f1": 0.81} and source["sha256"] == load_model(donor).sha256
    assert str(donor) in added.metadata["provenance"]["threshold_chosen_on"]

    by_hand = load_model(
        add_model(user_models_dir() / "all-data.json", name="by-hand", threshold=np.float32(0.4))
    )
    assert by_hand.threshold == pytest.approx(0.4)
    provenance = by_hand.metadata["provenance"]
    assert (
        provenance["threshold_chosen_on"] == "set by hand (r2au add-model)"
        and "threshold_source" not in provenance
    )
    assert provenance["before_threshold_change"]["threshold"] == 0.3

    for bad, message in (
        (dict(threshold=1.5), "threshold must be"),
        (dict(threshold=0.4, threshold_from=donor), "not both"),
        (dict(threshold_from=held_out_run("uncalibrated", chosen_on="")), "not chosen on a validation"),
        (dict(threshold_from=held_out_run("other", architecture="unet")), "differs from the model in"),
    ):
        with pytest.raises(ModelFileError, match=message):
            add_model(all_data, name="bad", **bad)
    assert not (user_models_dir() / "bad.json").exists()


def test_add_model_sets_the_field_of_view_a_fundus_model_runs_at(tmp_path):
    """The bundled retina-vessels runs at 671 px, trained at 537: a copy run at another
    field keeps the training size, and a model that derives no scale from a field is refused."""
    from napari_r2au.engine import working_scale
    from napari_r2au.model_files import ModelFileError, add_model

    bundled = load_model("retina-vessels")
    assert bundled.fov_diameter == 671 and bundled.metadata["provenance"]["trained_at_fov_diameter"] == 537
    copy = load_model(add_model("retina-vessels", name="my-retina", directory=tmp_path, fov_diameter=600))
    assert copy.fov_diameter == 600 and copy.sha256 == bundled.sha256
    provenance = copy.metadata["provenance"]
    assert provenance["trained_at_fov_diameter"] == 537
    assert "537 px" in provenance["validation_metrics_measured_at"]
    from skimage import data

    photo = data.retina()
    assert working_scale(copy, image=photo) == pytest.approx(
        working_scale(bundled, image=photo) * 600 / 671, rel=0.01
    )
    with pytest.raises(ModelFileError, match="does not derive its scale from a field of view"):
        add_model("drive-vessels", name="my-drive", directory=tmp_path, fov_diameter=600)
