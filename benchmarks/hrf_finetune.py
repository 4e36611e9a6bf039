"""The fine-tune loop on a real domain shift: a vessel model -> another fundus camera.

``python -m benchmarks.hrf_finetune [--dataset HRF|STARE|CHASE_DB1] [--model M] [--steps N]
[--scale S] [--seeds 0 1 2] [--threshold-only] [--markdown FILE]``

Evaluates the model (default the bundled ``drive-vessels``) on held-out images of the
camera (inside the FOV), fine-tunes it with ``r2au finetune`` (the CLI, the same code path
as the napari widget) on k = 1, 2, 3 other images, once per seed, evaluates each new model
on the same held-out images and prints F1 / AUC against k (each run, then mean, spread and
worst over seeds) with the wall time of each fine-tune.

HRF keeps its historical split (tuned on 01_h, 01_dr, 01_g; docs/hrf-finetune.md) unless
``--heldout`` asks for retina-vessels' validation images (01_h, 02_dr, 04_h). STARE
and CHASE_DB1 have four images each here: the one that ``retina-vessels`` held out for
validation is evaluated (benchmarks.cross_dataset), the other three are corrected. Give
``--scale 0`` to let a fundus model derive each photograph's scale from its field of view.
``--threshold-only`` trains nothing: it re-chooses the model's threshold on the k corrected
photographs (pooled F1 inside their fields of view, the trainer's threshold grid) and scores
the held-out photographs at it, the cheapest adaptation there is, to set beside a fine-tune.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import write_between_markers

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("R2AU_DATA", ROOT.parent / "shared" / "data"))
HRF = DATA / "HRF"
#: HRF images used for fine-tuning (one of each group); all others are evaluated
TUNE_IDS = ["01_h", "01_dr", "01_g"]
#: each camera's folders and how its masks and FOVs are named after an image's id
LAYOUTS = {
    "HRF": (HRF, "images", "manual1", "{}.tif", "mask", "{}_mask.tif"),
    "STARE": (DATA / "STARE", "images", "labels-ah", "{}.ah.ppm", "mask", "{}.png"),
    "CHASE_DB1": (DATA / "CHASEDB1", "images", "1stHO", "{}_1stHO.png", "mask", "{}.png"),
}


def _link_subset(ids: list[str], folder: Path, dataset: str = "HRF") -> tuple[Path, Path, Path]:
    """Folders of symlinks holding the images, masks and FOVs of ``ids``."""
    root, images, masks, mask_name, fovs, fov_name = LAYOUTS[dataset]
    out = [folder / name for name in ("images", "masks", "fov")]
    for path in out:
        path.mkdir(parents=True, exist_ok=True)
    for item in ids:
        image = next(p for p in (root / images).iterdir() if p.name.split(".")[0] == item)
        (out[0] / image.name).symlink_to(image)
        (out[1] / mask_name.format(item)).symlink_to(root / masks / mask_name.format(item))
        (out[2] / fov_name.format(item)).symlink_to(root / fovs / fov_name.format(item))
    return out[0], out[1], out[2]


def _split(dataset: str, heldout: bool = False) -> tuple[list[str], list[str]]:
    """(ids to fine-tune on, in order; ids to evaluate) for a camera."""
    root, images = LAYOUTS[dataset][:2]
    all_ids = sorted(p.name.split(".")[0] for p in (root / images).iterdir())
    if dataset == "HRF" and not heldout:
        return TUNE_IDS, [i for i in all_ids if i not in TUNE_IDS]
    from benchmarks.cross_dataset import held_out

    evaluated = [triple[0].name.split(".")[0] for triple in held_out()[dataset]]
    return [i for i in all_ids if i not in evaluated], evaluated


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hrf_finetune", description=__doc__)
    parser.add_argument("--dataset", choices=list(LAYOUTS), default="HRF", help="the camera to fine-tune on")
    parser.add_argument(
        "--heldout",
        action="store_true",
        help="HRF: evaluate on the images retina-vessels held out (which trained on the others) "
        "instead of the historical split",
    )
    parser.add_argument("--steps", type=int, default=300, help="fine-tune steps per run")
    parser.add_argument(
        "--scale",
        type=float,
        default=0.4,
        help="working scale (HRF: chosen on the fine-tuning images 01_*: F1 0.25<0.33<0.4); "
        "0: the model's own (derived from the field of view for fundus models)",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0],
        help="fine-tune seeds (patch sampling, augmentation) to repeat each k with",
    )
    parser.add_argument("--model", default="drive-vessels", help="the DRIVE model to start from")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 3], help="numbers of corrected images")
    parser.add_argument(
        "--finetune",
        nargs=argparse.REMAINDER,
        default=[],
        help="further r2au finetune options, e.g. --lr 2e-4 --no-freeze-encoder (last)",
    )
    parser.add_argument(
        "--threshold-only",
        action="store_true",
        help="train nothing: re-choose the threshold on the k corrected photographs",
    )
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args(argv)
    root = LAYOUTS[args.dataset][0]
    if not (root / "images").is_dir():
        print(f"{args.dataset} data not found at {root}; nothing to measure")
        return 0
    from napari_r2au.cli import main as r2au
    from napari_r2au.model_files import load_model
    from napari_r2au.training.evaluate import evaluate_folders

    start = load_model(args.model)  # found before R2AU_HOME is redirected (a user model works too)
    work = Path(tempfile.mkdtemp(prefix="r2au-hrf-"))
    os.environ["R2AU_HOME"] = str(work / "home")  # fine-tuned models stay out of the user's folder
    tune_ids, eval_ids = _split(args.dataset, args.heldout)
    eval_dirs = _link_subset(eval_ids, work / "eval", args.dataset)
    scale = args.scale or None
    runs = []  # (k, seed, f1, auc, seconds)
    # the threshold is chosen on float probabilities (the trainer's), so with --threshold-only
    # every score is at the float too, never at a model's int8 network
    precision = "auto"
    if args.threshold_only:
        import torch

        from napari_r2au.device import float_precision

        precision = float_precision(torch.device("cpu"), "auto")
    report = evaluate_folders(start, *eval_dirs, scale=scale, precision=precision)
    runs.append((0, None, report["f1"], report["auc_roc"], 0.0))
    print(runs[-1], flush=True)
    for k in args.ks:
        if args.threshold_only:
            started = time.perf_counter()
            threshold = _threshold_on(start, tune_ids[:k], args.dataset, scale, work / f"tune{k}")
            seconds = time.perf_counter() - started  # choosing it, not scoring the held-out images
            report = evaluate_folders(
                start, *eval_dirs, scale=scale, threshold=threshold, precision=precision
            )
            runs.append((k, None, report["f1"], report["auc_roc"], seconds))
            print(runs[-1], f"threshold {threshold}", flush=True)
            continue
        images, masks, fov = _link_subset(tune_ids[:k], work / f"tune{k}", args.dataset)
        for seed in args.seeds:
            name = f"{start.name}-{args.dataset.lower().replace('_', '')}-k{k}-s{seed}"
            started = time.perf_counter()
            status = r2au(
                [
                    "finetune",
                    "-m",
                    str(start.path),
                    "--images",
                    str(images),
                    "--masks",
                    str(masks),
                    "--fov",
                    str(fov),
                    "--steps",
                    str(args.steps),
                    *(["--scale", str(scale)] if scale else []),
                    "--seed",
                    str(seed),
                    "--name",
                    name,
                    *args.finetune,
                ]
            )
            seconds = time.perf_counter() - started
            if status != 0:
                print(f"fine-tune k={k} seed={seed} failed ({status})", file=sys.stderr)
                return status
            report = evaluate_folders(name, *eval_dirs)  # the new model carries its scale
            runs.append((k, seed, report["f1"], report["auc_roc"], seconds))
            print(runs[-1], flush=True)
    text = _tables(runs, start.name, args.dataset, "threshold choice" if args.threshold_only else "fine-tune")
    print(text)
    if args.markdown:
        seeds = " ".join(str(s) for s in args.seeds)
        write_between_markers(
            args.markdown,
            f"Command: `python -m benchmarks.hrf_finetune --dataset {args.dataset}"
            f"{' --heldout' if args.heldout else ''} --steps {args.steps} "
            f"--scale {args.scale} "
            f"--seeds {seeds} --model {args.model} --ks {' '.join(map(str, args.ks))}"
            f"{' --threshold-only' if args.threshold_only else ''}"
            f"{' --finetune ' + ' '.join(args.finetune) if args.finetune else ''}`\n\n"
            f"{'Threshold chosen' if args.threshold_only else 'Fine-tuned'} on {', '.join(tune_ids)} "
            f"(first k); evaluated on {len(eval_ids)} other {args.dataset} "
            "images "
            f"({', '.join(eval_ids)}), pixels inside the FOV pooled.\n\n{text}\n",
        )
    shutil.rmtree(work, ignore_errors=True)
    return 0


def _threshold_on(model: Any, ids: list[str], dataset: str, scale: float | None, folder: Path) -> float:
    """The model's best threshold on the photographs ``ids`` (pooled F1 inside their FOVs),
    each at the working scale the engine gives it, paired as ``r2au finetune`` pairs them."""
    from napari_r2au.engine import working_scale
    from napari_r2au.training.data import folder_samples, memory_samples
    from napari_r2au.training.trainer import best_threshold

    found = folder_samples(*_link_subset(ids, folder, dataset), model.in_channels)
    samples = memory_samples(
        [(s.raw, s.mask) for s in found],
        model.in_channels,
        model.normalization,
        fovs=[s.fov for s in found],
        scale=[working_scale(model, scale, image=s.raw) for s in found],
    )
    return best_threshold(model, samples)[0]


def _tables(runs: list[tuple], model: str, dataset: str = "HRF", adaptation: str = "fine-tune") -> str:
    """A summary per k (mean, spread, worst over seeds) and every run; ``adaptation`` names
    what the time column timed."""
    summary = [
        f"| corrected {dataset} images | runs | F1 mean | F1 sd | F1 worst | AUC-ROC mean | {adaptation} time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for k in sorted({run[0] for run in runs}):
        chosen = [run for run in runs if run[0] == k]
        f1s = [run[2] for run in chosen]
        spread = statistics.stdev(f1s) if len(f1s) > 1 else 0.0
        summary.append(
            f"| {k}{' (' + model + ' as is)' if k == 0 else ''} | {len(chosen)} | "
            f"{statistics.mean(f1s):.4f} | {spread:.4f} | {min(f1s):.4f} | "
            f"{statistics.mean(run[3] for run in chosen):.4f} | "
            f"{statistics.mean(run[4] for run in chosen):.0f} |"
        )
    each = [f"| k | seed | F1 | AUC-ROC | {adaptation} time (s) |", "|---|---|---|---|---|"]
    each += [
        f"| {k} | {'-' if seed is None else seed} | {f1:.4f} | {auc:.4f} | {s:.0f} |"
        for k, seed, f1, auc, s in runs
    ]
    return "\n".join(summary) + "\n\nEach run:\n\n" + "\n".join(each)


if __name__ == "__main__":
    sys.exit(main())
