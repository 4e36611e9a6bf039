"""``r2au evaluate``: the paper's metrics for a model on a folder of images and masks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from napari_r2au.engine import predict, run, working_scale
from napari_r2au.model_files import load_model
from napari_r2au.uncertainty import iter_predict_tta

from .data import folder_samples
from .metrics import METRIC_KEYS, curves, segmentation_metrics


def evaluate_folders(
    model: Any,
    images: str | Path,
    masks: str | Path,
    fov: str | Path | None = None,
    threshold: float | None = None,
    scale: float | None = None,
    plots: str | Path | None = None,
    pixel_size: float | None = None,
    pixel_size_unit: str | None = None,
    class_map: dict[int, int] | None = None,
    tta: bool = False,
    device: str | None = None,
    backend: str = "auto",
    precision: str = "auto",
) -> dict[str, Any]:
    """Per-image rows and set-level metrics (pixels pooled over all images, inside the FOV).

    ``tta``: score the mean of flipped copies, as ``r2au segment --tta`` predicts.
    ``backend``, ``precision``: what runs the network (napari_r2au.backends); the report
    names the ones that ran, since the figures may differ slightly between them.
    """
    loaded = load_model(model) if not hasattr(model, "network") else model
    level = loaded.threshold if threshold is None else threshold
    given = scale
    scale = working_scale(loaded, scale, pixel_size, pixel_size_unit)
    # a slice of a stack is predicted with the stack's statistics, as `r2au segment` on the stack
    samples = folder_samples(
        images, masks, fov, loaded.in_channels, class_map=class_map, statistics_scale=scale
    )
    rows, truths, scores = [], [], []
    ran = (None, None)
    for sample in samples:
        # each photograph at its own scale when the model derives it from the field of view
        own = (
            scale
            if sample.statistics is not None
            else working_scale(loaded, given, pixel_size, pixel_size_unit, image=sample.raw)
        )
        options = dict(
            scale=own, statistics=sample.statistics, device=device, backend=backend, precision=precision
        )
        if tta:
            prediction = run(iter_predict_tta(loaded, sample.raw, **options))
        else:
            prediction = predict(loaded, sample.raw, **options)
        prob, ran = prediction.probabilities, (prediction.backend, prediction.precision)
        row = segmentation_metrics(sample.mask, prob, level, sample.fov)
        rows.append({"image": sample.name, "scale": round(own, 4), **row})
        truths.append(sample.mask[sample.fov])
        scores.append(prob[sample.fov])
    truth, score = np.concatenate(truths), np.concatenate(scores)
    report: dict[str, Any] = segmentation_metrics(truth, score, level)
    report = {key: float(report[key]) for key in METRIC_KEYS}
    report.update(
        n_images=len(samples),
        threshold=level,
        model=loaded.name,
        model_sha256=loaded.sha256,
        tta=tta,
        inference={"backend": ran[0], "precision": ran[1]},  # not "precision": that is a metric here
        per_image=rows,
    )
    if plots is not None:
        write_curve_plots(truth, score, Path(plots), report)
    return report


def write_curve_plots(
    truth: np.ndarray, score: np.ndarray, folder: Path, report: dict[str, Any]
) -> list[Path]:
    """ROC and PR curves as PNG files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    (fpr, tpr), (recall, precision) = curves(truth, score)
    paths = []
    for name, x, y, xlabel, ylabel, key in (
        ("roc.png", fpr, tpr, "false positive rate", "true positive rate", "auc_roc"),
        ("pr.png", recall, precision, "recall", "precision", "auc_pr"),
    ):
        fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
        ax.plot(x, y, lw=1.5)
        ax.set(
            xlabel=xlabel,
            ylabel=ylabel,
            xlim=(0, 1),
            ylim=(0, 1.01),
            title=f"{report['model']}: {key} {report[key]:.4f}",
        )
        fig.tight_layout()
        fig.savefig(folder / name)
        plt.close(fig)
        paths.append(folder / name)
    return paths
