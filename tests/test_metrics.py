from __future__ import annotations

import numpy as np
import pytest

from napari_r2au.training.metrics import average_precision, confusion, roc_auc, segmentation_metrics

sklearn_metrics = pytest.importorskip("sklearn.metrics")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_agree_with_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    truth = rng.random((64, 80)) < 0.15
    scores = np.clip(truth * 0.3 + rng.random(truth.shape) * 0.8, 0, 1).round(2)  # ties on purpose
    fov = rng.random(truth.shape) < 0.8
    m = segmentation_metrics(truth, scores, 0.5, fov)
    t, s = truth[fov], scores[fov]
    p = s > 0.5
    assert m["accuracy"] == pytest.approx(sklearn_metrics.accuracy_score(t, p))
    assert m["sensitivity"] == pytest.approx(sklearn_metrics.recall_score(t, p))
    assert m["specificity"] == pytest.approx(sklearn_metrics.recall_score(~t, ~p))
    assert m["precision"] == pytest.approx(sklearn_metrics.precision_score(t, p))
    assert m["f1"] == pytest.approx(sklearn_metrics.f1_score(t, p))
    assert m["iou"] == pytest.approx(sklearn_metrics.jaccard_score(t, p))
    assert m["auc_roc"] == pytest.approx(sklearn_metrics.roc_auc_score(t, s))
    assert m["auc_pr"] == pytest.approx(sklearn_metrics.average_precision_score(t, s))


def test_counts_pool_over_images_not_average():
    a = confusion(np.array([1, 1, 0, 0]), np.array([1, 0, 0, 0]))
    b = confusion(np.array([1, 0, 0, 0]), np.array([1, 1, 1, 0]))
    pooled = (a + b).rates()["f1"]
    assert pooled == pytest.approx(2 * 2 / (2 * 2 + 2 + 1))
    assert pooled != pytest.approx((a.rates()["f1"] + b.rates()["f1"]) / 2)


def test_degenerate_cases_are_nan_not_wrong():
    empty = np.zeros(10, bool)
    m = segmentation_metrics(empty, np.zeros(10), 0.5)
    assert m["accuracy"] == 1.0 and np.isnan(m["sensitivity"]) and np.isnan(m["auc_roc"])
    assert np.isnan(average_precision(empty, np.zeros(10))) and np.isnan(roc_auc(empty, np.zeros(10)))
