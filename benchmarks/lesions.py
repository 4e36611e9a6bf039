"""Skin-lesion models on ISIC 2017 and PH2, at default settings (no scale typed).

``python -m benchmarks.lesions [--models skin-lesions ph2-lesions] [--markdown FILE]``

Segments the images that ``training/configs/skin-lesions.yaml`` holds out (ISIC 2017's own
150 validation pairs; the 15 PH2 images that ``ph2-lesions`` also held out, same seed and
draw) with each model as ``r2au segment`` does: the model's own scale rule, threshold and
clean-up (largest component, holes filled). Reports per source the pooled Dice, the
per-image mean Dice and mean Jaccard, and the ISIC challenge's thresholded Jaccard (a
per-image Jaccard below 0.65 counts as 0).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks import write_between_markers
from benchmarks.cross_dataset import ROOT, held_out

CONFIG = ROOT / "training" / "configs" / "skin-lesions.yaml"


def score(model, triples) -> dict[str, float]:
    """Pooled Dice, per-image mean Dice and Jaccard, thresholded Jaccard (ISIC 2017)."""
    from napari_r2au import predict
    from napari_r2au.io import read_image
    from napari_r2au.training.data import binarize_mask
    from napari_r2au.training.metrics import Counts, confusion

    pooled, dice, jaccard = Counts(), [], []
    for image_path, mask_path, _ in triples:
        truth = binarize_mask(read_image(mask_path), mask_path.name) > 0
        found = predict(model, read_image(image_path)).mask() > 0
        counts = confusion(truth, found)
        pooled = pooled + counts
        rates = counts.rates()
        dice.append(rates["f1"] if np.isfinite(rates["f1"]) else 0.0)
        jaccard.append(rates["iou"] if np.isfinite(rates["iou"]) else 0.0)
    jaccard_array = np.asarray(jaccard)
    return {
        "dice_pooled": pooled.rates()["f1"],
        "dice_mean": float(np.mean(dice)),
        "jaccard_mean": float(jaccard_array.mean()),
        "jaccard_thresholded": float(np.where(jaccard_array < 0.65, 0.0, jaccard_array).mean()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.lesions", description=__doc__)
    parser.add_argument("--models", nargs="+", default=["skin-lesions", "ph2-lesions"])
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args(argv)
    from napari_r2au.model_files import load_model

    try:
        split = held_out(CONFIG)
    except Exception as exc:  # the data is not here
        print(f"lesion data not found ({exc}); nothing to measure")
        return 0
    rows = []
    for name in args.models:
        model = load_model(name)
        cells = {}
        for source, triples in split.items():
            started = time.perf_counter()
            cells[source] = score(model, triples)
            print(
                f"{model.name} {source}: {cells[source]} ({time.perf_counter() - started:.0f} s)", flush=True
            )
        rows.append((model, cells))
    text = _table(rows, split)
    print(text)
    if args.markdown:
        write_between_markers(
            args.markdown,
            f"Command: `python -m benchmarks.lesions --models {' '.join(args.models)}`\n\n{text}\n",
            "<!-- lesions -->",
            "<!-- /lesions -->",
        )
    return 0


def _table(rows, split) -> str:
    lines = [
        "| model | images | Dice pooled | Dice per-image mean | Jaccard per-image mean | thresholded Jaccard |",
        "|---|---|---|---|---|---|",
    ]
    for model, cells in rows:
        for source, values in cells.items():
            lines.append(
                f"| {model.name} | {source} ({len(split[source])}) | {values['dice_pooled']:.4f} | "
                f"{values['dice_mean']:.4f} | {values['jaccard_mean']:.4f} | {values['jaccard_thresholded']:.4f} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
