"""The CPU's default float, measured: ``python -m benchmarks.precision [--finetune]``.

The engine and the trainer run bf16 by default only where the CPU has native bf16 (its
flags) *and* a short probe convolution measures bf16 faster than fp32
(``napari_r2au.device.cpu_bf16_is_faster``). This prints, in one run on this machine: the
matmul peaks, the probe's ratio and verdict, ``predict`` with the default model's float
network on a DRIVE photograph at fp32 and bf16 (torch, best of ``--repeat``), one training
step at the Fine-tune dock's defaults (batch 8 of 96x96 patches, channels-last) at fp32
and bf16, and with ``--finetune`` the whole default fine-tune of ``benchmarks``' table (150
steps on one 512x512 DRIVE image) under the flags-only rule and under the measured rule.
Only ratios within one run are meant to be compared; run it single-threaded
(``OMP_NUM_THREADS=1``) for figures a busy second core does not disturb.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks import write_between_markers

if TYPE_CHECKING:
    import torch

ROOT = Path(__file__).resolve().parents[1]
DRIVE = Path(os.environ.get("R2AU_DATA", ROOT.parent / "shared" / "data")) / "DRIVE" / "training"
BEGIN, END = "<!-- precision -->", "<!-- /precision -->"


def _train_step_seconds(model_name: str, dtype: torch.dtype | None, repeat: int) -> float:
    """Best time of one optimizer step of the model's network at the Fine-tune dock's shape."""
    import torch

    from benchmarks.backends import best_of
    from napari_r2au.model_files import load_model
    from napari_r2au.training.losses import segmentation_loss

    network = load_model(model_name).network.train().to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-5)
    generator = torch.Generator().manual_seed(0)
    channels = next(network.parameters()).shape[1]
    x = torch.randn(8, channels, 96, 96, generator=generator).to(memory_format=torch.channels_last)
    y = (torch.rand(8, 1, 96, 96, generator=generator) > 0.85).float()

    def step() -> None:
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = segmentation_loss(network(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return best_of(step, repeat, warmup=2)


def _finetune_seconds(bf16_rule: Callable[[], bool]) -> tuple[float, str, float, float]:
    """:func:`benchmarks.default_finetune` with ``bf16_rule`` deciding bf16 on the CPU."""
    import torch

    from benchmarks import default_finetune
    from napari_r2au import device

    saved_rule = device.cpu_bf16_is_faster
    try:
        device.cpu_bf16_is_faster = bf16_rule
        precision = device.float_precision(torch.device("cpu"), "auto")
        seconds, result = default_finetune(DRIVE)
    finally:
        device.cpu_bf16_is_faster = saved_rule
    return seconds, precision, result.dice_before, result.dice_after


def _row(what: str, fp32: float | None, bf16: float | None, digits: int = 3) -> tuple[str, str, str, str]:
    """A table row: the times (seconds) and bf16's speed over fp32's where both were timed."""
    cells = ["" if t is None else f"{t:.{digits}f}" for t in (fp32, bf16)]
    ratio = f"{fp32 / bf16:.2f}x" if fp32 and bf16 else ""
    return (what, *cells, ratio)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.precision", description=__doc__)
    parser.add_argument("--model", default="retina-vessels")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--finetune", action="store_true", help="also time the default fine-tune both ways")
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args(argv)
    if not (DRIVE / "images").is_dir():
        print(f"DRIVE not found under {DRIVE}; nothing to measure")
        return 0
    import torch

    from benchmarks.backends import best_of, peaks_text
    from napari_r2au import device, load_model, predict
    from napari_r2au.io import read_image

    if not device.cpu_has_bf16():
        print(
            "this CPU has no native bf16 (no avx512_bf16 or amx_bf16 flag): the default is fp32, nothing to decide"
        )
        return 0
    verdict = device.cpu_bf16_is_faster()  # the engine's own verdict, measured once
    probes = [device.cpu_bf16_speedup() for _ in range(3)]
    rows = [
        (
            f"probe: 3x3 convolution, 32 channels, 4x64x64, bf16 over fp32 speed (3 more probes "
            f"after the engine's own, median; bf16 if >= {device.BF16_MIN_SPEEDUP})",
            "",
            "",
            f"{statistics.median(probes):.2f}x",
        )
    ]
    model = load_model(args.model)
    image = read_image(DRIVE / "images" / "21_training.tif")
    timed = {}
    for precision in ("fp32", "bf16"):
        timed[precision] = best_of(
            lambda p=precision: predict(model, image, backend="torch", precision=p), args.repeat
        )
    rows.append(
        _row(f"`predict`, {args.model} on 21_training.tif (565x584), torch", timed["fp32"], timed["bf16"])
    )
    steps = {
        p: _train_step_seconds(args.model, d, args.repeat)
        for p, d in (("fp32", None), ("bf16", torch.bfloat16))
    }
    rows.append(
        _row(f"training step, {args.model}, batch 8 x 96x96, channels-last", steps["fp32"], steps["bf16"])
    )
    if args.finetune:
        flags_only = _finetune_seconds(device.cpu_has_bf16)
        measured = _finetune_seconds(device.cpu_bf16_is_faster)
        for label, (seconds, precision, before, after) in (
            ("the flags' rule (before 2026-12-07)", flags_only),
            ("the measured rule", measured),
        ):
            what = (
                f"default fine-tune, drive-vessels, 150 steps on a 512x512 DRIVE crop, {label}: "
                f"{precision}, held-out Dice {before:.4f} -> {after:.4f}"
            )
            rows.append(_row(what, *((seconds, None) if precision == "fp32" else (None, seconds)), digits=1))
        if flags_only[1] != measured[1]:
            rows.append(
                (
                    "default fine-tune: the flags' rule's time over the measured rule's",
                    "",
                    "",
                    f"{flags_only[0] / measured[0]:.2f}x",
                )
            )
    lines = [
        f"Machine: {peaks_text()}; {torch.get_num_threads()} thread(s); default float here: "
        f"**{'bf16' if verdict else 'fp32'}**.",
        "",
        f"Command: `python -m benchmarks.precision{' --finetune' if args.finetune else ''}`",
        "",
        "| what | fp32 (s) | bf16 (s) | bf16's speed over fp32's |",
        "|---|---|---|---|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        write_between_markers(args.markdown, text + "\n", BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
