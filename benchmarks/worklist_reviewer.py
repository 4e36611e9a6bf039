"""A simulated reviewer on a worklist: how fast do corrections lift the cases still to review?

``python -m benchmarks.worklist_reviewer [--dataset HRF|STARE|CHASE_DB1] [--model M]
[--every K] [--cases N] [--corrections C] [--order file|uncertain|both] [--steps S]
[--adopt always|if-better] [--out docs/worklist-reviewer.md] [--out results.json]``

Creates a worklist (napari_r2au.worklist, the headless worklist core) in a temporary
folder on the camera's photographs, pre-segments every case,
then plays a reviewer who takes the cases in the worklist's order (file order, or most
uncertain first, which re-orders after every learn because learning re-segments the
untouched cases), "corrects" each by replacing its mask with the manual reference
(``save_mask`` then ``set_status("accepted")``, which makes it "corrected"), and after
every ``K`` corrected cases learns from them (``iter_learn``: a new model version, the
untouched cases re-segmented with it). After the pre-segmentation and after every learn
it reports the F1 (Dice) of the cases not yet reviewed against their references, inside
each photograph's field of view (pixels pooled, and the mean per image), of those among
them that ``retina-vessels`` never trained on, and of the whole series (reviewed cases
count as their reference), with the model version and the wall times.

``--cases N`` keeps the camera's first N photographs (file order) in the worklist; the
reviewer stops after ``--corrections C`` (default 3). ``--adopt`` is ``iter_learn``'s rule:
``if-better`` (the worklist's default since 2026-12-08, and the Fine-tune dock's: a version
whose held-out Dice fell is kept aside) or ``always`` (every new version is used).

The reviewed cases differ between the two orders, so their "remaining" F1s are over
different images; the series F1 compares them on the same images. Fine-tuned models go
to a temporary R2AU_HOME (one per order), never to the user's models folder.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import models_home, write_between_markers
from benchmarks.hrf_finetune import LAYOUTS

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Step:
    """The worklist after a learn (or after the pre-segmentation: step 0)."""

    step: int
    corrected: list[str]  # ids, in the order reviewed
    model: str | None
    remaining: int
    f1_pooled: float
    f1_mean: float
    f1_base: float  # the same remaining cases as the starting model segmented them (pooled)
    unseen: int  # remaining cases the starting model (retina-vessels' split) never trained on
    f1_unseen: float
    f1_series: float  # every case, reviewed ones as their reference
    picked_f1: list[float] = field(default_factory=list)  # each case just corrected, before
    strip_dice: tuple[float | None, float | None] | None = None  # fine-tune's held-out strip
    kept_aside: str | None = None  # a new version not put to use (--adopt if-better)
    learn_seconds: float = 0.0
    segment_seconds: float = 0.0
    segmented: int = 0


def _read_binary(path: Path) -> np.ndarray:
    from napari_r2au.io import read_image

    data = read_image(path)
    if data.ndim == 3 and data.shape[-1] in (3, 4):  # RGB(A) masks count by their first channel
        data = data[..., 0]
    return data > 0


def _fovs(dataset: str, ids: list[str]) -> dict[str, np.ndarray | None]:
    """Each case's field of view from the camera's FOV folder (None: none, whole image)."""
    root, _, _, _, folder, name = LAYOUTS[dataset]
    out: dict[str, np.ndarray | None] = {}
    for case_id in ids:
        path = root / folder / name.format(case_id) if folder else None
        out[case_id] = _read_binary(path) if path is not None and path.is_file() else None
    return out


def _unseen_ids(dataset: str) -> set[str]:
    """The images of ``dataset`` that retina-vessels held out for validation (never trained
    on); every other photograph of HRF, STARE and CHASE_DB1 here was in its training set."""
    from benchmarks.cross_dataset import held_out
    from napari_r2au.io import pairing_id

    try:
        return {pairing_id(triple[0]) for triple in held_out().get(dataset, [])}
    except (OSError, KeyError, ValueError):  # the config's data is not on this machine
        return set()


def _f1(counts: Any) -> float:
    return float(counts.rates()["f1"])


class Scorer:
    """Scores a worklist's current masks against the references inside the fields of view,
    and remembers the pre-segmentation's per case (the starting model on the same cases)."""

    def __init__(self, fovs: dict[str, np.ndarray | None], unseen: set[str]):
        self.fovs, self.unseen = fovs, unseen
        self.base: dict[str, Any] = {}

    def counts(self, worklist: Any, case: Any) -> Any:
        from napari_r2au.training.metrics import confusion

        return confusion(worklist.reference(case), worklist.read_mask(case) > 0, self.fovs[case.id])

    def step(self, number: int, worklist: Any, corrected: list[str], **extra: Any) -> Step:
        """The worklist's state as a table row (printed as it is measured)."""
        from napari_r2au.training.metrics import Counts
        from napari_r2au.worklist import REVIEWED

        pooled, base, unseen, series, per_image, n_unseen = Counts(), Counts(), Counts(), Counts(), [], 0
        for case in worklist.cases:
            counts = self.counts(worklist, case)
            self.base.setdefault(case.id, counts)  # the first call: the pre-segmentation
            series = series + counts
            if case.status in REVIEWED:
                continue
            pooled, base = pooled + counts, base + self.base[case.id]
            per_image.append(_f1(counts))
            if case.id in self.unseen:
                n_unseen, unseen = n_unseen + 1, unseen + counts
        step = Step(
            number,
            list(corrected),
            worklist.model,
            len(per_image),
            _f1(pooled),
            float(np.mean(per_image)) if per_image else float("nan"),
            _f1(base),
            n_unseen,
            _f1(unseen),
            _f1(series),
        )
        for key, value in extra.items():
            setattr(step, key, value)
        print(_row(step), flush=True)
        return step


def learn(worklist: Any, settings: Any, adopt: str) -> tuple[Any, str | None, float]:
    """One learn: (LearnResult, the new version if it was kept aside, when training ended).

    ``adopt`` is ``iter_learn``'s rule: "if-better" (the worklist's default, the Fine-tune
    dock's rule: a version whose held-out Dice fell below its parent's is registered but not
    put to use, the masks stay) or "always" (every version re-segments the untouched cases).
    """
    from napari_r2au.worklist import iter_learn, run_events

    marks: dict[str, float] = {}

    def mark(event: Any) -> None:
        if event.stage == "learned":
            marks.setdefault("learned", time.perf_counter())

    result = run_events(iter_learn(worklist, settings=settings, adopt=adopt), mark)
    learned = marks.get("learned", time.perf_counter())
    kept_aside = result.model if result.model is not None and not result.adopted else None
    return result, kept_aside, learned


def review(
    folder: Path,
    order: str,
    corrections: int,
    every: int,
    settings: Any,
    scorer: Scorer,
    start: Step,
    adopt: str = "if-better",
) -> list[Step]:
    """Play the reviewer on the pre-segmented worklist in ``folder``, in ``order``."""
    from napari_r2au.worklist import REVIEWED, Worklist

    steps, corrected, picked = [start], [], []
    with Worklist.open(folder) as worklist:
        while len(corrected) < corrections:
            todo = [c for c in worklist.ordered(order) if c.status not in REVIEWED]
            if not todo:
                break
            case = todo[0]  # the uncertain order is re-read: the last learn re-scored the rest
            picked.append(_f1(scorer.counts(worklist, case)))
            worklist.save_mask(case, worklist.reference(case).astype(np.uint8))
            worklist.set_status(case, "accepted")  # an edited mask: "corrected"
            assert case.status == "corrected", case.status
            corrected.append(case.id)
            if len(corrected) % every and len(corrected) < corrections:
                continue
            learn_seconds, segment_seconds, strip, segmented, aside = 0.0, 0.0, None, 0, None
            if len(corrected) % every == 0:
                began = time.perf_counter()
                result, aside, learned = learn(worklist, settings, adopt)
                ended = time.perf_counter()
                learn_seconds, segment_seconds = learned - began, ended - learned
                strip, segmented = (result.dice_before, result.dice_after), len(result.resegmented)
            steps.append(
                scorer.step(
                    len(steps),
                    worklist,
                    corrected,
                    picked_f1=list(picked),
                    strip_dice=strip,
                    learn_seconds=learn_seconds,
                    segment_seconds=segment_seconds,
                    segmented=segmented,
                    kept_aside=aside,
                )
            )
            picked = []
    return steps


def _cases_csv(dataset: str, count: int, path: Path) -> Path:
    """A case list of the camera's first ``count`` photographs with their references."""
    from napari_r2au.worklist import discover_cases

    root, images = LAYOUTS[dataset][:2]
    found = discover_cases([root / images])[:count]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "reference", "id"])
        for case in found:
            writer.writerow([Path(case["image"]).resolve(), Path(case["reference"]).resolve(), case["id"]])
    return path


def _fmt(value: float | None) -> str:
    return "-" if value is None or value != value else f"{value:.4f}"


HEADER = (
    "| step | corrected (F1 of its mask before) | model | remaining | F1 remaining, pooled | "
    "F1 remaining, mean per image | same cases, starting model | F1 remaining unseen (n) | F1 series | "
    "fine-tune strip Dice before -> after | learn (s) | re-segment (s, cases) |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def _row(step: Step) -> str:
    new = step.corrected[len(step.corrected) - len(step.picked_f1) :] if step.picked_f1 else []
    picked = ", ".join(f"{i} ({f:.3f})" for i, f in zip(new, step.picked_f1)) or "-"
    aside = f" ({step.kept_aside} kept aside)" if step.kept_aside else ""
    strip = "-" if step.strip_dice is None else f"{_fmt(step.strip_dice[0])} -> {_fmt(step.strip_dice[1])}"
    return (
        f"| {step.step} | {len(step.corrected)}: {picked} | {step.model}{aside} | {step.remaining} | "
        f"{_fmt(step.f1_pooled)} | {_fmt(step.f1_mean)} | {_fmt(step.f1_base)} | {_fmt(step.f1_unseen)} ({step.unseen}) | "
        f"{_fmt(step.f1_series)} | {strip} | "
        f"{step.learn_seconds:.0f} | {step.segment_seconds:.0f} ({step.segmented}) |"
    )


def table(steps: list[Step]) -> str:
    return HEADER + "\n" + "\n".join(_row(s) for s in steps)


def main(argv: list[str] | None = None) -> int:
    from napari_r2au.training.settings import FinetuneSettings

    parser = argparse.ArgumentParser(prog="python -m benchmarks.worklist_reviewer", description=__doc__)
    parser.add_argument("--dataset", choices=list(LAYOUTS), default="HRF")
    parser.add_argument("--model", default="retina-vessels", help="the model that pre-segments")
    parser.add_argument(
        "--scale",
        type=float,
        default=None,
        help="the worklist's scale (default: the model's own rule); drive-vessels on HRF needs one",
    )
    parser.add_argument("--every", type=int, default=1, help="learn after every K corrected cases")
    parser.add_argument("--cases", type=int, default=None, help="only the first N photographs (file order)")
    parser.add_argument("--corrections", type=int, default=3, help="stop after this many corrected cases")
    parser.add_argument("--order", choices=["file", "uncertain", "both"], default="both")
    parser.add_argument(
        "--steps", type=int, default=FinetuneSettings.steps, help="fine-tune steps of each learn"
    )
    parser.add_argument(
        "--adopt",
        choices=["always", "if-better"],
        default="if-better",
        help="if-better: the worklist's default (a version whose held-out Dice fell is kept "
        "aside); always: every new version is used",
    )
    parser.add_argument(
        "--out",
        type=Path,
        action="append",
        default=[],
        help="a markdown file (the tables between markers) or a .json path; may be repeated",
    )
    parser.add_argument(
        "--marker", default=None, help="the markdown markers' name (default worklist-<dataset>-<model>)"
    )
    args = parser.parse_args(argv)
    if args.every < 1 or args.corrections < 1:
        parser.error("--every and --corrections must be at least 1")
    root, images = LAYOUTS[args.dataset][:2]
    if not (root / images).is_dir():
        print(f"{args.dataset} data not found at {root}; nothing to measure")
        return 0
    from napari_r2au.model_files import load_model
    from napari_r2au.worklist import Worklist, iter_segment, run_events

    command = "python -m benchmarks.worklist_reviewer " + " ".join(sys.argv[1:] if argv is None else argv)
    settings = FinetuneSettings(steps=args.steps)
    model = load_model(args.model)  # found before R2AU_HOME is redirected (a user model works too)
    work = Path(tempfile.mkdtemp(prefix="r2au-worklist-"))
    machine = (
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at the start, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
    )
    try:
        with models_home(work / "home-first"):  # the caller's models folder comes back after
            sources = (
                [_cases_csv(args.dataset, args.cases, work / "cases.csv")] if args.cases else [root / images]
            )
            first = work / "first"
            began = time.perf_counter()
            with Worklist.create(first, sources, model=model.name, scale=args.scale) as worklist:
                missing = [c.id for c in worklist.cases if c.reference is None]
                if missing:
                    print(f"no reference for {', '.join(missing)}: cannot simulate their correction")
                    return 1
                run_events(iter_segment(worklist, model))
                seconds = time.perf_counter() - began
                ids = [c.id for c in worklist.cases]
                fovs, unseen = _fovs(args.dataset, ids), _unseen_ids(args.dataset) & set(ids)
                print(HEADER, flush=True)
                scorer = Scorer(fovs, unseen)
                start = scorer.step(0, worklist, [], segment_seconds=seconds, segmented=len(ids))
            orders = ["file", "uncertain"] if args.order == "both" else [args.order]
            results: dict[str, list[Step]] = {}
            totals: dict[str, float] = {}
            for order in orders:
                folder = work / order  # a sibling of "first": the cases' relative paths still hold
                shutil.copytree(first, folder, ignore=shutil.ignore_patterns("worklist.lock"))
                os.environ["R2AU_HOME"] = str(work / f"home-{order}")
                print(f"order: {order}", flush=True)
                began = time.perf_counter()
                results[order] = review(
                    folder, order, args.corrections, args.every, settings, scorer, start, args.adopt
                )
                totals[order] = time.perf_counter() - began
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = _report(args, command, machine, model.name, ids, unseen, fovs, results, totals)
    print(text)
    payload = {
        "command": command,
        "machine": machine,
        "dataset": args.dataset,
        "model": model.name,
        "scale": args.scale,
        "cases": ids,
        "unseen": sorted(unseen),
        "every": args.every,
        "steps": args.steps,
        "adopt": args.adopt,
        "orders": {order: [asdict(s) for s in steps] for order, steps in results.items()},
        "seconds": totals,
    }
    marker = args.marker or (
        f"worklist-{args.dataset.lower().replace('_', '')}-{model.name}"
        + ("" if args.adopt == "if-better" else f"-{args.adopt}")
    )
    for out in args.out:
        if out.suffix.lower() == ".json":
            out.write_text(json.dumps(payload, indent=1) + "\n")
        else:
            write_between_markers(out, text, f"<!-- {marker} -->", f"<!-- /{marker} -->")
    return 0


def _report(
    args: argparse.Namespace,
    command: str,
    machine: str,
    model: str,
    ids: list[str],
    unseen: set[str],
    fovs: dict[str, np.ndarray | None],
    results: dict[str, list[Step]],
    totals: dict[str, float],
) -> str:
    """The markdown block: the command, the setting, and one table per order."""
    fov = (
        "inside each photograph's field of view"
        if all(f is not None for f in fovs.values())
        else "whole images"
    )
    lines = [
        f"Command: `{command}`",
        "",
        f"{args.dataset}, {len(ids)} cases, pre-segmented with {model}"
        + (f" at scale {args.scale:g}" if args.scale else "")
        + f"; learn after every {args.every} "
        f"corrected case(s), {args.steps} fine-tune steps, new versions adopted {args.adopt}; F1 {fov}. Unseen: "
        f"{', '.join(sorted(unseen)) or 'none'} (retina-vessels' held-out images). Machine: {machine}.",
    ]
    for order, steps in results.items():
        lines += [
            "",
            f"Order **{order}** (reviewing and learning: {totals[order]:.0f} s wall):",
            "",
            table(steps),
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
