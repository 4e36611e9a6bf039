"""How long one fine-tune step takes, and what in it: the Fine-tune dock's own run.

``python -m benchmarks.train_step [--model retina-vessels] [--steps 40] [--rounds 2]
[--threads 1] [--markdown FILE]``

Runs ``iter_finetune`` as the Fine-tune dock does (its default settings: patch 96, batch 8)
on a 512x512 crop of DRIVE image 21 and its manual mask, once per variant: the CPU's float
precisions (bf16 autocast where the CPU has it, fp32) with the network and its batches in
channels-last order (the trainer's default, ``channels_last``) and without. Variants
alternate over ``--rounds`` so that a change in the machine's load falls on all of them.
Reported per variant: the median wall time of a training step (validation steps left out),
the part of it spent cutting and augmenting the batch (the trainer does that between
steps, in the same thread), and the ratio to fp32 without channels-last, beside the
machine's 2048^3 matmul peaks measured in the same run.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from pathlib import Path

from benchmarks import write_between_markers
from benchmarks.cross_dataset import DATA


def _pair():
    from napari_r2au.io import read_image

    drive = DATA / "DRIVE" / "training"
    image = read_image(drive / "images" / "21_training.tif")[36:548, 26:538]
    mask = (read_image(drive / "1st_manual" / "21_manual1.gif")[36:548, 26:538] > 0).astype("uint8")
    return image, mask


def _run(model: str, pair, steps: int, precision: str, channels_last: bool) -> tuple[list[float], float]:
    """(seconds of each training step, seconds spent making batches) of one fine-tune."""
    from napari_r2au.training import finetune, trainer
    from napari_r2au.training.settings import FinetuneSettings

    data = [0.0]
    real_sample, real_augment = trainer.PatchSampler.sample, trainer.augment

    def timed(function):
        @functools.wraps(function)
        def inner(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                data[0] += time.perf_counter() - start

        return inner

    config = functools.partial(trainer.TrainConfig, precision=precision, channels_last=channels_last)
    saved = (finetune.TrainConfig, trainer.PatchSampler.sample, trainer.augment)
    finetune.TrainConfig, trainer.PatchSampler.sample, trainer.augment = (
        config,
        timed(real_sample),
        timed(real_augment),
    )
    stamps: list[tuple[int, float, bool]] = []
    try:
        generator = finetune.iter_finetune(model, [pair], settings=FinetuneSettings(steps=steps))
        try:
            while True:
                event = next(generator)
                if getattr(event, "stage", "") == "train":
                    stamps.append((event.step, time.perf_counter(), event.validation is not None))
        except StopIteration:
            pass
    finally:
        finetune.TrainConfig, trainer.PatchSampler.sample, trainer.augment = saved
    durations = [
        later - earlier
        for (_, earlier, _), (_, later, validated) in zip(stamps, stamps[1:])
        if not validated  # a step that validated also ran the held-out part
    ]
    return durations[2:], data[0] / max(1, len(stamps))  # the first steps warm up oneDNN


def main(argv: list[str] | None = None) -> int:
    import torch

    from benchmarks.backends import peaks_text
    from napari_r2au.device import cpu_has_bf16

    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_step", description=__doc__)
    parser.add_argument("--model", default="retina-vessels")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args(argv)
    if not (DATA / "DRIVE" / "training" / "images").is_dir():
        print(f"DRIVE not found under {DATA}; nothing to measure")
        return 0
    torch.set_num_threads(args.threads)
    home = os.environ.get("R2AU_HOME")
    import tempfile

    pair = _pair()
    precisions = (["bf16"] if cpu_has_bf16() else []) + ["fp32"]
    variants = [(p, cl) for p in precisions for cl in (False, True)]
    steps: dict[tuple[str, bool], list[float]] = {v: [] for v in variants}
    data: dict[tuple[str, bool], list[float]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="r2au-train-step-") as tmp:
        os.environ["R2AU_HOME"] = tmp  # the fine-tuned models go here, never to the user's folder
        try:
            peaks = peaks_text()
            for round_ in range(args.rounds):
                for variant in variants:
                    durations, batch = _run(args.model, pair, args.steps, *variant)
                    steps[variant] += durations
                    data[variant].append(batch)
                    print(
                        f"round {round_ + 1} {variant[0]} channels_last={variant[1]}: "
                        f"{1000 * statistics.median(durations):.0f} ms/step",
                        file=sys.stderr,
                    )
        finally:
            if home is None:
                os.environ.pop("R2AU_HOME", None)
            else:
                os.environ["R2AU_HOME"] = home
    baseline = statistics.median(steps[("fp32", False)])
    lines = [
        f"Command: `python -m benchmarks.train_step --model {args.model} --steps {args.steps} "
        f"--rounds {args.rounds} --threads {args.threads}`",
        "",
        f"The Fine-tune dock's defaults (patch 96, batch 8) on {args.model}, {args.threads} thread(s); "
        f"machine: {os.cpu_count()} cores, {peaks}, "
        f"load average {os.getloadavg()[0]:.2f} at the end.",
        "",
        "| precision | channels-last | ms per step (median) | of which making the batch (ms) | × fp32 without channels-last |",
        "|---|---|---|---|---|",
    ]
    for variant in variants:
        median = statistics.median(steps[variant])
        lines.append(
            f"| {variant[0]} | {'yes' if variant[1] else 'no'} | {1000 * median:.0f} | "
            f"{1000 * statistics.median(data[variant]):.0f} | {baseline / median:.2f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        write_between_markers(args.markdown, text, "<!-- train-step -->", "<!-- /train-step -->")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
