"""Mask clean-up, checksums, differences and label types."""

from __future__ import annotations

import numpy as np
import pytest

from napari_r2au.postprocess import clean_mask, compact_labels, difference_labels, mask_checksum


def test_clean_mask_removes_specks_and_fills_holes():
    mask = np.zeros((40, 40), np.uint8)
    mask[5:25, 5:25] = 1
    mask[10:12, 10:12] = 0  # a 4-pixel hole
    mask[35, 35] = 1  # a speck
    cleaned = clean_mask(mask, min_size=10, fill_holes=True)
    assert cleaned.dtype == np.uint8
    assert cleaned[35, 35] == 0 and cleaned[10:12, 10:12].all() and cleaned[5:25, 5:25].all()
    assert clean_mask(mask, min_size=10)[10, 10] == 0  # holes stay unless asked
    np.testing.assert_array_equal(clean_mask(mask), mask)
    stack = clean_mask(np.stack([mask, mask]), min_size=10)
    assert stack.shape == (2, 40, 40) and not stack[:, 35, 35].any()
    labels = mask * 2  # multi-label masks are left alone
    np.testing.assert_array_equal(clean_mask(labels, min_size=10), labels)


def test_checksum_depends_on_values_and_shape_only():
    mask = np.zeros((4, 6), np.uint8)
    assert mask_checksum(mask) == mask_checksum(mask.astype(np.int64))
    assert mask_checksum(mask) != mask_checksum(mask.reshape(6, 4))
    edited = mask.copy()
    edited[0, 0] = 1
    assert mask_checksum(mask) != mask_checksum(edited)


@pytest.mark.parametrize("shape", [(3, 5, 7), (50, 3), (2, 9, 4), (40,), ()])
def test_checksums_hashed_in_blocks_match_the_whole_array_definition(monkeypatch, shape):
    import hashlib

    from napari_r2au import postprocess

    monkeypatch.setattr(postprocess, "_HASH_CHUNK", 8)  # blocks of rows, and rows split in turn
    mask = np.random.default_rng(0).integers(0, 3, shape).astype(np.uint8)
    definition = hashlib.sha256(repr(mask.shape).encode())
    definition.update(np.ascontiguousarray(mask, dtype=np.uint32).tobytes())
    assert mask_checksum(mask) == definition.hexdigest()
    whole, slices = postprocess.mask_checksums(mask)
    assert whole == definition.hexdigest()
    assert (slices is None) == (mask.ndim != 3)
    if mask.ndim == 3:  # each slice's checksum is that slice's own
        assert slices == [mask_checksum(plane) for plane in mask] == postprocess.slice_checksums(mask)


def test_difference_and_compact_labels():
    predicted = np.array([[1, 1, 0, 0]])
    reference = np.array([[1, 0, 1, 0]])
    np.testing.assert_array_equal(difference_labels(predicted, reference), [[0, 1, 2, 0]])
    with pytest.raises(ValueError, match="shapes differ"):
        difference_labels(predicted, reference.T)
    assert compact_labels(np.array([0, 255])).dtype == np.uint8
    assert compact_labels(np.array([0, 256])).dtype == np.uint16
    assert compact_labels(np.array([0, 70_000])).dtype == np.uint32
    with pytest.raises(ValueError, match="negative"):
        compact_labels(np.array([-1, 0]))
    with pytest.raises(ValueError, match="integers"):
        compact_labels(np.array([0.5]))


def test_edited_slices_are_told_apart_by_their_checksums():
    from napari_r2au.postprocess import edited_slices, slice_checksums

    stack = np.zeros((4, 8, 8), np.uint8)
    stack[:, 2:4] = 1
    recorded = slice_checksums(stack)
    assert slice_checksums(stack[0]) is None  # a 2D mask has no slices
    painted = stack.astype(np.int32)  # napari may hand the data back in another dtype
    painted[2, 0, 0] = 1
    painted[3] = 0
    assert edited_slices(painted, recorded) == [2, 3]
    with pytest.raises(ValueError, match="do not describe"):
        edited_slices(stack[:3], recorded)
