"""Property-based tests: the engine's shape/dtype handling and the metrics' invariants."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from napari_r2au import predict
from napari_r2au.training.metrics import confusion, segmentation_metrics

DTYPES = st.sampled_from([np.uint8, np.uint16, np.int16, np.int32, np.float32, np.float64, np.bool_])


@pytest.fixture(scope="module")
def net():
    import torch

    from napari_r2au import create_model

    torch.manual_seed(0)
    return create_model("unet", base_width=2, depth=2).eval()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    height=st.integers(1, 40),
    width=st.integers(1, 40),
    channels=st.sampled_from([None, 1, 3, 4]),
    dtype=DTYPES,
    seed=st.integers(0, 2**16),
)
def test_engine_output_matches_input_shape(net, height, width, channels, dtype, seed):
    rng = np.random.default_rng(seed)
    shape = (height, width) if channels is None else (height, width, channels)
    image = (rng.random(shape) * 100).astype(dtype)
    axes = "YX" if channels is None else "YXC"
    result = predict(net, image, axes=axes, precision="fp32")
    assert result.probabilities.shape == (height, width)
    assert result.probabilities.dtype == np.float32
    assert np.isfinite(result.probabilities).all()
    assert ((result.probabilities >= 0) & (result.probabilities <= 1)).all()
    assert result.mask().shape == (height, width)


@settings(max_examples=50, deadline=None)
@given(truth=hnp.arrays(np.bool_, st.tuples(st.integers(1, 20), st.integers(1, 20))), data=st.data())
def test_metric_invariants(truth, data):
    scores = data.draw(hnp.arrays(np.float64, truth.shape, elements=st.floats(0, 1)))
    m = segmentation_metrics(truth, scores, 0.5)
    counts = confusion(truth, scores > 0.5)
    assert counts.tp + counts.fp + counts.tn + counts.fn == truth.size
    for key in ("accuracy", "sensitivity", "specificity", "precision", "f1", "iou", "auc_roc", "auc_pr"):
        assert np.isnan(m[key]) or 0 <= m[key] <= 1 + 1e-12, key
    if not np.isnan(m["f1"]):
        assert m["iou"] <= m["f1"] + 1e-12  # IoU = F1 / (2 - F1)
        assert m["iou"] == pytest.approx(m["f1"] / (2 - m["f1"]))
    perfect = segmentation_metrics(truth, truth.astype(float), 0.5)
    assert perfect["accuracy"] == 1.0
