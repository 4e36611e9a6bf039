"""Does a threshold chosen per photograph beat the model's one threshold across cameras?

``python -m benchmarks.threshold_rules [--model retina-vessels]`` segments the photographs
``retina-vessels`` held out from each source (``benchmarks.cross_dataset.held_out``) at the
model's defaults and scores, inside each field of view, the model's stored threshold against
two rules that need no fitting (the threshold whose mask holds as many pixels as the
probabilities sum to; Otsu's threshold of the probabilities) and the per-photograph best of a
sweep (an upper bound no rule can pass, since it looks at the reference). F1 per photograph
and pooled per source.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

RULES = ("stored", "mass", "otsu", "best of sweep")


def thresholds(probabilities: np.ndarray, truth: np.ndarray, stored: float) -> dict[str, float]:
    """Each rule's threshold for one photograph's probabilities (inside its field of view)."""
    from skimage.filters import threshold_otsu

    ranked = np.sort(probabilities)[::-1]
    count = min(int(round(float(probabilities.sum()))), ranked.size - 1)

    def f1(level: float) -> float:
        mask = probabilities > level
        return 2 * float((mask & truth).sum()) / max(1, int(mask.sum() + truth.sum()))

    return {
        "stored": stored,
        "mass": float(ranked[count]),
        "otsu": float(threshold_otsu(probabilities)),
        "best of sweep": float(max(np.arange(0.1, 0.7, 0.025), key=f1)),
    }


def main(argv: list[str] | None = None) -> int:
    from benchmarks.cross_dataset import held_out
    from napari_r2au import predict
    from napari_r2au.io import read_image
    from napari_r2au.model_files import load_model

    parser = argparse.ArgumentParser(prog="python -m benchmarks.threshold_rules", description=__doc__)
    parser.add_argument("--model", default="retina-vessels")
    args = parser.parse_args(argv)
    model = load_model(args.model)

    def plane(path) -> np.ndarray:
        array = read_image(path) > 0
        return array if array.ndim == 2 else array[..., 0]

    print(f"| source | photograph | {' | '.join(RULES)} |\n|---|---|{'---|' * len(RULES)}")
    for source, files in held_out().items():
        counts = {rule: np.zeros(3) for rule in RULES}
        for image_path, mask_path, fov_path in files:
            truth = plane(mask_path)
            fov = plane(fov_path) if fov_path else np.ones_like(truth)
            probabilities = predict(model, read_image(image_path)).probabilities[fov]
            inside = truth[fov]
            cells = []
            for rule, level in thresholds(probabilities, inside, model.threshold).items():
                mask = probabilities > level
                tp, fp, fn = (mask & inside).sum(), (mask & ~inside).sum(), (~mask & inside).sum()
                counts[rule] += (tp, fp, fn)
                cells.append(f"{2 * tp / (2 * tp + fp + fn):.4f} at {level:.3f}")
            print(f"| {source} | {image_path.name} | {' | '.join(cells)} |", flush=True)
        pooled = [f"**{2 * c[0] / (2 * c[0] + c[1] + c[2]):.4f}**" for c in counts.values()]
        print(f"| {source} | pooled | {' | '.join(pooled)} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
