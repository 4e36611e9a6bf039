"""The fine-tune loop on a real domain shift: DRIVE model -> HRF fundus photographs.

``python -m benchmarks.hrf_finetune [--steps N] [--scale S] [--markdown FILE]``

Evaluates the bundled ``drive-vessels`` model on held-out HRF images (inside the FOV),
fine-tunes it with ``r2au finetune`` (the CLI, the same code path as the napari widget) on
k = 1, 2, 3 other HRF images, evaluates each new model on the same held-out images and
prints F1 / AUC against k with the wall time of each fine-tune.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HRF = ROOT.parent / "shared" / "data" / "HRF"
#: images used for fine-tuning (one of each group); all others are evaluated
TUNE_IDS = ["01_h", "01_dr", "01_g"]


def _link_subset(ids: list[str], folder: Path) -> tuple[Path, Path, Path]:
    """Folders of symlinks holding the images, masks and FOVs of ``ids``."""
    out = [folder / name for name in ("images", "masks", "fov")]
    for path in out:
        path.mkdir(parents=True, exist_ok=True)
    for item in ids:
        image = next(p for p in (HRF / "images").iterdir() if p.stem == item)
        (out[0] / image.name).symlink_to(image)
        (out[1] / f"{item}.tif").symlink_to(HRF / "manual1" / f"{item}.tif")
        (out[2] / f"{item}.tif").symlink_to(HRF / "mask" / f"{item}_mask.tif")
    return out[0], out[1], out[2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hrf_finetune", description=__doc__)
    parser.add_argument("--steps", type=int, default=300, help="fine-tune steps per run")
    parser.add_argument("--scale", type=float, default=0.4,
                        help="working scale for HRF (chosen on the fine-tuning images 01_*: F1 0.25<0.33<0.4)")
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args(argv)
    if not (HRF / "images").is_dir():
        print(f"HRF data not found at {HRF}; nothing to measure")
        return 0
    from napari_r2au.cli import main as r2au
    from napari_r2au.training.evaluate import evaluate_folders

    work = Path(tempfile.mkdtemp(prefix="r2au-hrf-"))
    os.environ["R2AU_HOME"] = str(work / "home")  # fine-tuned models stay out of the user's folder
    all_ids = sorted(p.stem for p in (HRF / "images").iterdir())
    eval_ids = [i for i in all_ids if i not in TUNE_IDS]
    eval_dirs = _link_subset(eval_ids, work / "eval")
    rows = []
    report = evaluate_folders("drive-vessels", *eval_dirs, scale=args.scale)
    rows.append(("drive-vessels (no fine-tuning)", 0, report["f1"], report["auc_roc"], 0.0))
    print(rows[-1], flush=True)
    for k in (1, 2, 3):
        images, masks, fov = _link_subset(TUNE_IDS[:k], work / f"tune{k}")
        name = f"drive-vessels-hrf-k{k}"
        started = time.perf_counter()
        status = r2au(["finetune", "-m", "drive-vessels", "--images", str(images), "--masks", str(masks),
                       "--fov", str(fov), "--steps", str(args.steps), "--scale", str(args.scale),
                       "--name", name])
        seconds = time.perf_counter() - started
        if status != 0:
            print(f"fine-tune k={k} failed ({status})", file=sys.stderr)
            return status
        report = evaluate_folders(name, *eval_dirs)  # the new model carries its scale
        rows.append((name, k, report["f1"], report["auc_roc"], seconds))
        print(rows[-1], flush=True)
    table = ["| model | corrected HRF images | F1 (held-out HRF, FOV) | AUC-ROC | fine-tune time (s) |",
             "|---|---|---|---|---|"]
    table += [f"| {n} | {k} | {f1:.4f} | {auc:.4f} | {s:.0f} |" for n, k, f1, auc, s in rows]
    text = "\n".join(table)
    print(text)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(
            f"Command: `python -m benchmarks.hrf_finetune --steps {args.steps} --scale {args.scale}`\n\n"
            f"Fine-tuned on {', '.join(TUNE_IDS)} (first k); evaluated on {len(eval_ids)} other HRF images "
            f"({', '.join(eval_ids)}), pixels inside the FOV pooled.\n\n{text}\n")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
