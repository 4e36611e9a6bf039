"""The paper's architecture comparison on DRIVE, from the bundled configs.

``python -m benchmarks.drive_comparison [--minutes M] [--seeds 0 1 2] [--parallel P] [--reuse] [--markdown FILE]``

Trains U-Net, Attention U-Net, R2U-Net and R2AU-Net (``training/configs/drive-<arch>.yaml``:
same width, data, augmentation and loss) for the same wall-time budget each, on one
thread per run, ``--parallel`` runs at a time. Every run holds out the same 4 DRIVE
training images (23, 25, 27, 40), so seeds vary initialisation and sampling only. The
table gives, per architecture, the mean over seeds (and the worst seed) of the best
checkpoint's validation F1 at the threshold chosen on the split, F1 at 0.5 and AUC-ROC.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks import write_between_markers
from benchmarks.variants import run_jobs, run_summary

ROOT = Path(__file__).resolve().parents[1]
DRIVE = ROOT.parent / "shared" / "data" / "DRIVE" / "training"
ARCHITECTURES = ("unet", "attention_unet", "r2u_net", "r2au_net")
VALIDATION = ["23_training", "25_training", "27_training", "40_training"]


def run_overrides(seed: int, minutes: float, out: Path, extra: list[str]) -> list[str]:
    """The ``--set`` overrides of one run: what its config differs in from the bundled one."""
    return [
        "threads=1",
        f"max_minutes={minutes}",
        f"seed={seed}",
        f"output_dir={out}",
        f"val_names={json.dumps(VALIDATION)}",
        f"data.root={DRIVE}",
        *extra,
    ]


def table(results: dict[str, list[dict]], minutes: float, seeds: list[int]) -> str:
    lines = [
        f"Budget: {minutes:g} minutes of wall time per run, one thread each; seeds {seeds}; "
        "validation: DRIVE training images 23, 25, 27, 40 (FOV, pooled).",
        "",
        "| architecture | parameters | steps done | best step | val F1, chosen threshold (worst seed) "
        "| F1 at 0.5 | AUC-ROC |",
        "|---|---|---|---|---|---|---|",
    ]
    for arch, runs in results.items():

        def mean(key: str, runs: list[dict] = runs) -> float:
            return sum(r[key] for r in runs) / len(runs)

        worst = min(r["f1"] for r in runs)
        lines.append(
            f"| {arch} | {runs[0]['parameters']:,} | {mean('steps'):.0f} | {mean('best_step'):.0f} "
            f"| {mean('f1'):.4f} ({worst:.4f}) | {mean('f1_at_0.5'):.4f} | {mean('auc_roc'):.4f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.drive_comparison",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--minutes", type=float, default=22.0, help="wall-time budget of each run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time (one thread each)")
    parser.add_argument("--architectures", nargs="+", default=list(ARCHITECTURES), choices=ARCHITECTURES)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "comparison")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra config override for every run (e.g. steps=20 for a dry run)",
    )
    parser.add_argument("--markdown", type=Path, help="write the table between the comparison markers here")
    parser.add_argument(
        "--marker",
        default="comparison",
        help="the markers' name: <!-- NAME --> ... <!-- /NAME --> (one table per budget)",
    )
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="keep runs in --out that finished with the same settings (add seeds without retraining)",
    )
    args = parser.parse_args(argv)
    if not (DRIVE / "images").is_dir():
        print(f"DRIVE data not found at {DRIVE}; nothing to compare")
        return 0
    jobs = [
        (arch, seed, args.out / f"{arch}-seed{seed}") for arch in args.architectures for seed in args.seeds
    ]

    failed = run_jobs(
        [
            (f"drive-{arch}", run_overrides(seed, args.minutes, out, args.set), out)
            for arch, seed, out in jobs
        ],
        args.parallel,
        args.reuse,
    )
    if failed:
        print("failed runs (see train.log in each): " + ", ".join(failed), file=sys.stderr)
        return 1
    results: dict[str, list[dict]] = {}
    for arch, _seed, out in jobs:
        results.setdefault(arch, []).append(run_summary(out))
    block = table(results, args.minutes, args.seeds)
    print(block)
    if args.markdown:
        write_between_markers(args.markdown, block, f"<!-- {args.marker} -->", f"<!-- /{args.marker} -->")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
