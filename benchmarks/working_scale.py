"""Which field-of-view diameter should a fundus model run at?
``python -m benchmarks.working_scale [--model retina-vessels] [--factors 1,1.25] [--markdown FILE]``

A model that derives its scale from each photograph's field of view (``fov_diameter``)
was trained with every photograph resized to that diameter; it need not run best there.
This runs the model on its validation split (the images its config holds out of each
fundus set, as :mod:`benchmarks.cross_dataset` draws them) with each photograph's derived
scale multiplied by each factor, and reports F1 per source inside the field of view at the
model's threshold, and the network's pixels relative to factor 1 (its time grows about as
much). The outputs are compared at each photograph's full resolution, as a user gets them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from benchmarks import write_between_markers

BEGIN, END = "<!-- working-scale -->", "<!-- /working-scale -->"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.working_scale", description=__doc__)
    parser.add_argument("--model", default="retina-vessels")
    parser.add_argument("--factors", default="1,1.15,1.2,1.25,1.3,1.4,1.6")
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args(argv)

    from benchmarks.cross_dataset import DATA, held_out

    if not (DATA / "DRIVE").is_dir():
        print(f"fundus data not found at {DATA}; nothing to measure")
        return 0
    from napari_r2au import load_model, predict
    from napari_r2au.engine import working_scale
    from napari_r2au.io import read_image
    from napari_r2au.training.data import binarize_mask

    model = load_model(args.model)  # a model with a fixed scale is run at that scale times the factor
    factors = [float(f) for f in args.factors.split(",")]
    split = held_out()
    photographs = []
    for source, triples in split.items():
        for image_path, mask_path, fov_path in triples:
            image = np.asarray(read_image(image_path))
            fov = binarize_mask(read_image(fov_path), fov_path.name) > 0
            truth = binarize_mask(read_image(mask_path), mask_path.name)[fov] > 0
            photographs.append((source, image, fov, truth, working_scale(model, image=image)))
    rows = []
    for factor in factors:
        counts: dict[str, np.ndarray] = {}
        for source, image, fov, truth, scale in photographs:
            found = predict(model, image, scale=scale * factor).probabilities[fov] > model.threshold
            tp, fp, fn = (found & truth).sum(), (found & ~truth).sum(), (~found & truth).sum()
            counts[source] = counts.get(source, np.zeros(3)) + (tp, fp, fn)
        f1 = {source: 2 * c[0] / (2 * c[0] + c[1] + c[2]) for source, c in counts.items()}
        rows.append((factor, f1))
        print(factor, {k: round(float(v), 4) for k, v in f1.items()}, flush=True)
    names = list(split)
    lines = [
        f"| {'field of view (px)' if model.fov_diameter else 'scale'} | factor | network pixels | "
        + " | ".join(f"F1 {n} ({len(split[n])})" for n in names)
        + " | mean F1 |",
        "|---|---|---|" + "---|" * (len(names) + 1),
    ]
    for factor, f1 in rows:
        size = (
            f"{model.fov_diameter * factor:.0f}" if model.fov_diameter else f"{model.input_scale * factor:g}"
        )
        lines.append(
            f"| {size} | {factor:g} | {factor**2:.2f}x | "
            + " | ".join(f"{f1[n]:.4f}" for n in names)
            + f" | {np.mean(list(f1.values())):.4f} |"
        )
    own = f"its file says {model.fov_diameter} px" if model.fov_diameter else f"scale {model.input_scale:g}"
    text = (
        f"Command: `python -m benchmarks.working_scale --model {args.model} --factors {args.factors}`\n\n"
        f"`{model.name}` ({own}, threshold {model.threshold:g}) "
        "on its validation photographs, each at its derived scale times the factor.\n\n"
        + "\n".join(lines)
        + "\n"
    )
    print(text)
    if args.markdown:
        write_between_markers(args.markdown, text, BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
