"""The mask record's one owner: a record survives export and re-opening key for key."""

from __future__ import annotations

import numpy as np

from napari_r2au.mask_record import (
    LayerRecord,
    checksums,
    edited,
    export_record,
    record_from_export,
)


def _record(mask: np.ndarray) -> LayerRecord:
    return {
        "model": "retina-vessels",
        "model_sha256": "ab" * 32,
        "model_path": "/models/retina-vessels.json",
        "threshold": 0.2,
        "cleanup": {"min_size": 10},
        "postprocess": ["fill_holes"],
        "scale": 0.384,
        "flip_averaged": True,
        "scope": "whole image",
        "created": "2026-12-03T20:00:00+00:00",
        **checksums(mask),
    }


def test_every_kept_key_survives_an_export_and_a_reload():
    """postprocess and model_path included (they were once lost on the way back)."""
    mask = np.zeros((8, 8), np.uint8)
    mask[2:5, 3] = 1
    record = _record(mask)
    sidecar = export_record(record, mask, mask_file="m.tif", layer="m")
    back = record_from_export(sidecar)
    for key, value in record.items():
        assert back.get(key) == value, key
    assert sidecar["corrected_by_hand"] is False and edited(back, mask) is False
    painted = mask.copy()
    painted[0, 0] = 1
    assert export_record(record, painted, mask_file="m.tif", layer="m")["corrected_by_hand"] is True
    assert edited(back, painted) is True
