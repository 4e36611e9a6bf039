"""One training config, varied in one setting, every other setting equal: does it matter?

``python -m benchmarks.variants CONFIG --vary KEY=V1,V2[,...] [--steps N | --minutes M]
[--seeds 0 1] [--parallel P] [--set KEY=VALUE ...] [--reuse] [--markdown FILE --marker NAME]``

Trains ``CONFIG`` (a bundled config name or a YAML path) once per value of ``KEY`` and seed,
one thread per run, ``--parallel`` runs at a time, each in ``--out/<key>-<value>-seed<S>``:
for example the R2U-Net paper's recurrent steps on lungs (``ct-lungs --vary t=2,3 --steps
850``) or the paper's four architectures on ISIC (``skin-lesions --vary
architecture=unet,attention_unet,r2u_net,r2au_net --minutes 20``). ``--steps`` gives every run
the same number of updates; ``--minutes`` the same wall time (a cheaper network then takes more
steps). Every run draws the same validation split (the config's seed is kept; ``--seeds``
vary initialisation and sampling through ``seed`` only when given). The table gives, per value,
the mean over seeds of the best checkpoint's validation F1 at its chosen threshold (and the
worst seed), F1 at 0.5, AUC-ROC and, for configs with several sources, each source's F1.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks import write_between_markers

ROOT = Path(__file__).resolve().parents[1]


def train_command(config: str, overrides: list[str]) -> list[str]:
    """``r2au train CONFIG --overwrite --set ...``: a run not reused is trained again (the
    folder's earlier run, killed or with other settings, is replaced)."""
    command = [sys.executable, "-m", "napari_r2au.cli", "train", config, "--overwrite"]
    for item in overrides:
        command += ["--set", item]
    return command


def finished_run_matches(out: Path, config: str, overrides: list[str]) -> bool:
    """True when ``out`` holds a run that ended normally with the config these overrides give
    (``--reuse`` adds seeds or values without retraining, and never reuses a killed run)."""
    from napari_r2au.training.config import load_config

    log, config_file = out / "train.log", out / "config.json"
    if not (log.is_file() and config_file.is_file() and (out / "best.json").is_file()):
        return False
    lines = log.read_text().strip().splitlines()
    if not lines or not lines[-1].startswith("done after"):
        return False
    wanted = json.loads(json.dumps(load_config(config, overrides).to_dict(), default=str))
    saved = json.loads(config_file.read_text())
    for key in ("package_version", "world_size"):
        saved.pop(key, None)
    return saved == wanted


def run_jobs(jobs: list[tuple[str, list[str], Path]], parallel: int, reuse: bool) -> list[str]:
    """Train each (config, overrides, output folder), ``parallel`` at a time, logging to
    ``train.log`` in its folder; the folders of the runs that failed."""

    def train(job: tuple[str, list[str], Path]) -> int:
        config, overrides, out = job
        if reuse and finished_run_matches(out, config, overrides):
            print(f"reusing {out}")
            return 0
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "train.log", "w") as log:
            return subprocess.run(
                train_command(config, overrides), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
            ).returncode

    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        codes = list(pool.map(train, jobs))
    return [str(out) for (_, _, out), code in zip(jobs, codes) if code != 0]


def run_summary(out: Path) -> dict:
    """Steps done, best step and validation figures of one finished run."""
    from napari_r2au.model_files import load_model_file

    with open(out / "log.csv", newline="") as handle:
        steps = sum(1 for _ in csv.DictReader(handle))
    best = load_model_file(out / "best.json")
    provenance = best.metadata["provenance"]
    chosen = provenance["validation_metrics"]
    at_half = provenance.get("validation_metrics_at_0.5", chosen)
    return {
        "steps": steps,
        "best_step": provenance["steps"],
        "f1": chosen["f1"],
        "threshold": best.threshold,
        "f1_at_0.5": at_half["f1"],
        "auc_roc": chosen["auc_roc"],
        "parameters": sum(p.numel() for p in best.network.parameters()),
        "minutes": float(json.loads((out / "last.json").read_text())["provenance"].get("train_seconds", 0))
        / 60,
        "sources": {k.split("@", 1)[1]: v for k, v in chosen.items() if k.startswith("f1@")},
    }


def table(key: str, results: dict[str, list[dict]], budget: str, seeds: str, config: str) -> str:
    sources = sorted({name for runs in results.values() for run in runs for name in run["sources"]})
    lines = [
        f"`{config}` with `{key}` varied; budget: {budget} per run, one thread each; seeds: {seeds}; "
        "validation: the config's own split.",
        "",
        f"| {key} | parameters | steps done | best step | val F1, chosen threshold (worst seed) "
        "| F1 at 0.5 | AUC-ROC | training minutes |" + "".join(f" F1 {name} |" for name in sources),
        "|---|---|---|---|---|---|---|---|" + "---|" * len(sources),
    ]
    for value, runs in results.items():

        def mean(get, runs: list[dict] = runs) -> float:
            return sum(get(r) for r in runs) / len(runs)

        worst = min(r["f1"] for r in runs)
        per_source = "".join(
            f" {mean(lambda r, n=name: r['sources'].get(n, float('nan'))):.4f} |" for name in sources
        )
        lines.append(
            f"| {value} | {runs[0]['parameters']:,} | {mean(lambda r: r['steps']):.0f} "
            f"| {mean(lambda r: r['best_step']):.0f} | {mean(lambda r: r['f1']):.4f} ({worst:.4f}) "
            f"| {mean(lambda r: r['f1_at_0.5']):.4f} | {mean(lambda r: r['auc_roc']):.4f} "
            f"| {mean(lambda r: r['minutes']):.1f} |{per_source}"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.variants",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", help="a bundled training config name (training/configs) or a YAML path")
    parser.add_argument("--vary", required=True, metavar="KEY=V1,V2", help="the setting and its values")
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--steps", type=int, help="the same number of updates for every run")
    budget.add_argument("--minutes", type=float, help="the same wall time for every run")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: the config's own seed")
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time (one thread each)")
    parser.add_argument("--out", type=Path, default=None, help="default: runs/variants-<config>-<key>")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="for every run")
    parser.add_argument("--reuse", action="store_true", help="keep runs that finished with the same settings")
    parser.add_argument("--markdown", type=Path, help="write the table between markers here")
    parser.add_argument("--marker", default=None, help="the markers' name (default: variants-<config>-<key>)")
    args = parser.parse_args(argv)
    key, _, values = args.vary.partition("=")
    choices = [v.strip() for v in values.split(",") if v.strip()]
    if not key or len(choices) < 2:
        parser.error("--vary needs a key and at least two values, e.g. --vary t=2,3")
    name = Path(args.config).stem
    out = args.out or ROOT / "runs" / f"variants-{name}-{key}"
    if args.steps is not None:
        limit, budget_text = (
            [f"steps={args.steps}", "max_minutes=null", "patience=null"],
            f"{args.steps} steps",
        )
    else:
        limit, budget_text = [f"max_minutes={args.minutes}"], f"{args.minutes:g} minutes of wall time"
    seeds = args.seeds
    jobs = []
    for value in choices:
        for seed in seeds or [None]:
            folder = out / (f"{key}-{value}" + (f"-seed{seed}" if seed is not None else ""))
            overrides = ["threads=1", *limit, f"{key}={value}", f"output_dir={folder}", *args.set]
            if seed is not None:
                overrides.append(f"seed={seed}")
            jobs.append((args.config, overrides, folder))
    failed = run_jobs(jobs, args.parallel, args.reuse)
    if failed:
        print("failed runs (see train.log in each): " + ", ".join(failed), file=sys.stderr)
        return 1
    results: dict[str, list[dict]] = {}
    for (_, _, folder), value in zip(jobs, [v for v in choices for _ in (seeds or [None])]):
        results.setdefault(value, []).append(run_summary(folder))
    seeds_text = ", ".join(map(str, seeds)) if seeds else "the config's own"
    block = table(key, results, budget_text, seeds_text, args.config)
    print(block)
    if args.markdown:
        marker = args.marker or f"variants-{name}-{key}"
        write_between_markers(args.markdown, block, f"<!-- {marker} -->", f"<!-- /{marker} -->")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
