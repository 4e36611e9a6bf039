"""Property-based: arbitrary JSON-ish model sidecars and training configs either load or
raise the project's own error with a message, never another exception type."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from napari_r2au.model_files import OPTIONAL_DEFAULTS, REQUIRED_KEYS, ModelFileError, _read_metadata
from napari_r2au.training.config import ConfigError
from napari_r2au.training.trainer import TrainConfig

JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)

VALID = {
    "format": "napari-r2au-model",
    "format_version": 1,
    "name": "m",
    "architecture": "r2au_net",
    "arch_args": {"in_channels": 3, "out_channels": 1, "base_width": 4, "t": 2},
    "in_channels": 3,
    "out_channels": 1,
    "weights_file": "m.safetensors",
    "weights_sha256": "0" * 64,
}
SIDECAR_KEYS = st.sampled_from(sorted({*VALID, *REQUIRED_KEYS, *OPTIONAL_DEFAULTS, "depth", "unknown"}))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    changes=st.dictionaries(SIDECAR_KEYS, JSONISH, max_size=4),
    dropped=st.lists(SIDECAR_KEYS, max_size=2),
    arch=st.dictionaries(
        st.sampled_from(["base_width", "t", "depth", "in_channels", "x"]), JSONISH, max_size=3
    ),
)
def test_model_sidecars_load_or_raise_model_file_error(tmp_path, changes, dropped, arch):
    meta = {**VALID, "arch_args": {**VALID["arch_args"], **arch}, **changes}
    for key in dropped:
        meta.pop(key, None)
    sidecar = tmp_path / "m.json"
    sidecar.write_text(json.dumps(meta))
    try:
        _read_metadata(sidecar)
    except ModelFileError as exc:
        assert str(exc).strip()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=JSONISH)
def test_any_json_document_as_a_sidecar_raises_model_file_error(tmp_path, document):
    sidecar = tmp_path / "m.json"
    sidecar.write_text(json.dumps(document))
    try:
        _read_metadata(sidecar)
    except ModelFileError as exc:
        assert str(exc).strip()


CONFIG_KEYS = st.sampled_from(
    [
        "name",
        "architecture",
        "base_width",
        "t",
        "in_channels",
        "data",
        "val_images",
        "val_names",
        "patch_size",
        "batch_size",
        "steps",
        "lr",
        "threads",
        "augment",
        "device",
        "loss",
        "precision",
        "postprocess",
        "normalization",
        "segment_property",
        "pixel_size",
        "fov_diameter",
        "ema_decay",
        "bogus",
    ]
)
DATA = st.fixed_dictionaries(
    {"kind": st.sampled_from(["drive", "folders", "sources", "dicom", "x"])},
    optional={"root": JSONISH, "images": JSONISH, "masks": JSONISH, "class_map": JSONISH, "sources": JSONISH},
)


@settings(max_examples=300, deadline=None)
@given(values=st.dictionaries(CONFIG_KEYS, JSONISH, max_size=5), data=DATA | JSONISH)
def test_training_configs_load_or_raise_config_error(values, data):
    try:
        TrainConfig.from_dict({**values, "data": data})
    except ConfigError as exc:
        assert str(exc).strip()
