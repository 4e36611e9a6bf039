"""What the Fine-tune widget's default learning rate does, in domain and across a domain shift.

``python -m benchmarks.finetune_lr --task drive|hrf [--lrs 1e-4 2e-4 5e-4] [--shares 1 0.5]
[--seeds 0 1 2] [--steps 150] [--threads 1] [--markdown FILE]``

Each run is the widget's default fine-tune (``FinetuneSettings`` with only the learning
rate, the weight share and the seed changed) of the bundled ``drive-vessels`` on ONE corrected image, the right
quarter held out as the widget does; the new model is then scored on OTHER images, which
the held-out strip cannot show:

- ``drive``: DRIVE image 23 (a validation image of drive-vessels, 512x512 crop), scored on
  DRIVE images 25, 27 and 40 (its other validation images): no domain shift.
- ``hrf``: HRF 01_h at scale 0.4, scored on the 12 HRF images not used by
  ``benchmarks.hrf_finetune`` for fine-tuning: the domain shift fine-tuning is for.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import write_between_markers

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("R2AU_DATA", ROOT.parent / "shared" / "data"))
DRIVE, HRF = DATA / "DRIVE" / "training", DATA / "HRF"
DRIVE_EVAL = ["25", "27", "40"]
HRF_TUNE, HRF_SCALE = "01_h", 0.4
HRF_NOT_EVALUATED = {"01_h", "01_dr", "01_g"}


def _links(folder: Path, items: list[tuple[Path, Path, Path]]) -> tuple[Path, Path, Path]:
    """Folders of symlinks (images, masks, fov) for evaluate_folders."""
    out = [folder / name for name in ("images", "masks", "fov")]
    for path in out:
        path.mkdir(parents=True, exist_ok=True)
    for image, mask, fov in items:
        stem = image.name.split(".")[0]
        (out[0] / image.name).symlink_to(image)
        (out[1] / f"{stem}{mask.suffix}").symlink_to(mask)
        (out[2] / f"{stem}{fov.suffix}").symlink_to(fov)
    return out[0], out[1], out[2]


def _task(name: str, work: Path):
    """(training image, mask, fov or None, scale or None, evaluation folders) of a task."""
    from napari_r2au.io import read_image

    if name == "drive":
        image = read_image(DRIVE / "images" / "23_training.tif")[36:548, 26:538]
        mask = read_image(DRIVE / "1st_manual" / "23_manual1.gif")[36:548, 26:538] > 0
        items = [
            (
                DRIVE / "images" / f"{i}_training.tif",
                DRIVE / "1st_manual" / f"{i}_manual1.gif",
                DRIVE / "mask" / f"{i}_training_mask.gif",
            )
            for i in DRIVE_EVAL
        ]
        return image, mask, None, None, _links(work / "eval", items)
    image = read_image(next((HRF / "images").glob(f"{HRF_TUNE}.*")))
    mask = read_image(HRF / "manual1" / f"{HRF_TUNE}.tif") > 0
    fov = read_image(HRF / "mask" / f"{HRF_TUNE}_mask.tif")
    fov = (fov[..., 0] if fov.ndim == 3 else fov) > 0
    items = [
        (p, HRF / "manual1" / f"{p.stem}.tif", HRF / "mask" / f"{p.stem}_mask.tif")
        for p in sorted((HRF / "images").iterdir())
        if p.stem not in HRF_NOT_EVALUATED
    ]
    return image, mask, fov, HRF_SCALE, _links(work / "eval", items)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.finetune_lr",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--task", choices=["drive", "hrf"], required=True)
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 2e-4, 5e-4])
    parser.add_argument(
        "--shares",
        type=float,
        nargs="+",
        default=None,
        help="weight shares of the fine-tuned model (default: the widget's)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=None, help="default: the widget's")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (1: run two tasks side by side)"
    )
    parser.add_argument("--freeze-encoder", action="store_true", help="train the decoder and gates only")
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args(argv)
    if not (DRIVE if args.task == "drive" else HRF).is_dir():
        print(f"{args.task.upper()} data not found under {DATA}; nothing to measure")
        return 0
    import torch

    from napari_r2au.engine import run
    from napari_r2au.model_files import load_model
    from napari_r2au.training.evaluate import evaluate_folders
    from napari_r2au.training.finetune import iter_finetune
    from napari_r2au.training.settings import FinetuneSettings

    if args.threads:
        torch.set_num_threads(args.threads)
    base = load_model("drive-vessels")  # found before R2AU_HOME is redirected
    work = Path(tempfile.mkdtemp(prefix=f"r2au-lr-{args.task}-"))
    os.environ["R2AU_HOME"] = str(work / "home")  # the new models stay out of the user's folder
    image, mask, fov, scale, folders = _task(args.task, work)
    steps = args.steps or FinetuneSettings().steps
    shares = args.shares or [FinetuneSettings().weight_share]
    before = evaluate_folders(base, *folders, scale=scale)
    print(f"base: F1 {before['f1']:.4f} AUC {before['auc_roc']:.4f}", flush=True)
    runs = []  # ((lr, share), seed, held-out before, after, F1, AUC, seconds)
    for lr in args.lrs:
        for share in shares:
            for seed in args.seeds:
                settings = FinetuneSettings(
                    lr=lr, steps=steps, seed=seed, freeze_encoder=args.freeze_encoder, weight_share=share
                )
                started = time.perf_counter()
                result = run(
                    iter_finetune(
                        base,
                        [(image, mask)],
                        settings=settings,
                        fovs=None if fov is None else [fov],
                        scale=scale,
                        name=f"lr{lr:g}-w{share:g}-s{seed}",
                    )
                )
                seconds = time.perf_counter() - started
                report = evaluate_folders(result.model, *folders)  # the new model carries its scale
                runs.append(
                    (
                        (lr, share),
                        seed,
                        result.dice_before,
                        result.dice_after,
                        report["f1"],
                        report["auc_roc"],
                        seconds,
                    )
                )
                print(runs[-1], flush=True)
    text = _tables(args.task, before, runs, len(list(folders[0].iterdir())))
    print(text)
    if args.markdown:
        frozen = " --freeze-encoder" if args.freeze_encoder else ""
        key = f"{args.task}{'-frozen' if args.freeze_encoder else ''}"
        if args.shares:  # a table says which weight shares it was run with
            key += "-shares-" + "-".join(f"{v:g}" for v in args.shares)
        write_between_markers(
            args.markdown,
            f"Command: `python -m benchmarks.finetune_lr --task {args.task} --lrs {' '.join(f'{v:g}' for v in args.lrs)} "
            f"--shares {' '.join(f'{v:g}' for v in shares)} --seeds {' '.join(map(str, args.seeds))} --steps {steps}{frozen}`\n\n{text}\n",
            begin=f"<!-- table {key} -->",
            end=f"<!-- /table {key} -->",
        )
    return 0


def _tables(task: str, before: dict, runs: list[tuple], n_eval: int) -> str:
    what = {"drive": "DRIVE 25, 27, 40", "hrf": f"{n_eval} other HRF images"}[task]
    summary = [
        f"| learning rate | weight share | runs | held-out strip Dice, before -> after (mean) | F1 on {what}: mean | sd | "
        "worst | AUC-ROC mean | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    summary.append(
        f"| drive-vessels as is | - | - | - | {before['f1']:.4f} | - | - | {before['auc_roc']:.4f} | 0 |"
    )
    for lr, share in sorted({r[0] for r in runs}, key=lambda key: (key[0], -key[1])):
        chosen = [r for r in runs if r[0] == (lr, share)]
        f1s = [r[4] for r in chosen]
        summary.append(
            f"| {lr:g} | {share:g} | {len(chosen)} | {statistics.mean(r[2] for r in chosen):.4f} -> "
            f"{statistics.mean(r[3] for r in chosen):.4f} | {statistics.mean(f1s):.4f} | "
            f"{statistics.stdev(f1s) if len(f1s) > 1 else 0.0:.4f} | {min(f1s):.4f} | "
            f"{statistics.mean(r[5] for r in chosen):.4f} | {statistics.mean(r[6] for r in chosen):.0f} |"
        )
    each = [
        "| learning rate | weight share | seed | held-out before | held-out after | F1 | AUC-ROC | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    each += [
        f"| {lr:g} | {share:g} | {seed} | {b:.4f} | {a:.4f} | {f1:.4f} | {auc:.4f} | {s:.0f} |"
        for (lr, share), seed, b, a, f1, auc, s in runs
    ]
    return "\n".join(summary) + "\n\nEach run:\n\n" + "\n".join(each)


if __name__ == "__main__":
    sys.exit(main())
