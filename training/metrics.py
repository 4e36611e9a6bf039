"""Segmentation metrics counted over pixels, the standard way.

Counts (TP, FP, TN, FN) are summed over all pixels of a set (inside the field of view
when one is given) before any ratio is taken, so set-level F1 is a real F1, not an
average of per-batch values. SE = TP/(TP+FN), SP = TN/(TN+FP): the paper's printed
formulas are typos (../shared/PAPER.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

METRIC_KEYS = ("accuracy", "sensitivity", "specificity", "precision", "f1", "iou", "auc_roc", "auc_pr")


@dataclass
class Counts:
    tp: int = 0
    fp: int = 0
    tn: int = 0
    fn: int = 0

    def __add__(self, other: Counts) -> Counts:
        return Counts(self.tp + other.tp, self.fp + other.fp, self.tn + other.tn, self.fn + other.fn)

    def as_array(self) -> np.ndarray:
        return np.array([self.tp, self.fp, self.tn, self.fn], dtype=np.int64)

    def rates(self) -> dict[str, float]:
        tp, fp, tn, fn = (float(v) for v in (self.tp, self.fp, self.tn, self.fn))
        total = tp + fp + tn + fn

        def ratio(num: float, den: float) -> float:
            return num / den if den > 0 else float("nan")

        return {
            "accuracy": ratio(tp + tn, total),
            "sensitivity": ratio(tp, tp + fn),
            "specificity": ratio(tn, tn + fp),
            "precision": ratio(tp, tp + fp),
            "f1": ratio(2 * tp, 2 * tp + fp + fn),
            "iou": ratio(tp, tp + fp + fn),
        }


def _select(truth: np.ndarray, values: np.ndarray, fov: np.ndarray | None):
    truth = np.asarray(truth).astype(bool)
    values = np.asarray(values)
    if truth.shape != values.shape:
        raise ValueError(f"shapes differ: truth {truth.shape}, prediction {values.shape}")
    if fov is None:
        return truth.ravel(), values.ravel()
    fov = np.asarray(fov).astype(bool)
    if fov.shape != truth.shape:
        raise ValueError(f"field-of-view mask shape {fov.shape} differs from {truth.shape}")
    return truth[fov], values[fov]


def confusion(truth: np.ndarray, predicted: np.ndarray, fov: np.ndarray | None = None) -> Counts:
    """Pixel counts of a binary prediction against the truth."""
    t, p = _select(truth, predicted, fov)
    p = p.astype(bool)
    tp = int(np.count_nonzero(t & p))
    fp = int(np.count_nonzero(~t & p))
    fn = int(np.count_nonzero(t & ~p))
    return Counts(tp, fp, int(t.size - tp - fp - fn), fn)


def roc_auc(truth: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with ties averaged)."""
    truth = np.asarray(truth).astype(bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    n_pos = int(truth.sum())
    n_neg = truth.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(scores.size, np.float64)
    # average ranks over runs of equal scores
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate(([0], boundaries))
    ends = np.concatenate((boundaries, [scores.size]))
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[truth].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def curves(truth: np.ndarray, scores: np.ndarray):
    """ROC (fpr, tpr) and PR (recall, precision) at every distinct score threshold."""
    truth = np.asarray(truth).astype(bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    order = np.argsort(-scores, kind="mergesort")
    s, t = scores[order], truth[order]
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    tps = np.cumsum(t)[last].astype(np.float64)
    fps = (last + 1 - tps).astype(np.float64)
    n_pos, n_neg = tps[-1] if tps.size else 0.0, fps[-1] if fps.size else 0.0
    tpr = np.r_[0.0, tps / max(n_pos, 1)]
    fpr = np.r_[0.0, fps / max(n_neg, 1)]
    precision = tps / np.maximum(tps + fps, 1)
    recall = tps / max(n_pos, 1)
    return (fpr, tpr), (recall, precision)


def average_precision(truth: np.ndarray, scores: np.ndarray) -> float:
    """Area under the PR curve as average precision (step-wise, no interpolation)."""
    truth = np.asarray(truth).astype(bool).ravel()
    if not truth.any():
        return float("nan")
    _, (recall, precision) = curves(truth, scores)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def segmentation_metrics(
    truth: np.ndarray, scores: np.ndarray, threshold: float = 0.5, fov: np.ndarray | None = None
) -> dict[str, float]:
    """All metrics of METRIC_KEYS for one image or a concatenated set."""
    t, s = _select(truth, scores, fov)
    result = confusion(t, s > threshold).rates()
    result["auc_roc"] = roc_auc(t, s)
    result["auc_pr"] = average_precision(t, s)
    return result
