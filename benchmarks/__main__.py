"""Inference and training benchmarks: ``python -m benchmarks [--quick] [--markdown FILE]``.

Prints one table: each configuration's time, ratio to the eager fp32 baseline, GFLOP/s,
share of the machine's measured peak, peak memory and agreement with fp32 masks. All
figures come from this run on this machine; nothing here is asserted by the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import write_between_markers
from benchmarks.backends import matmul_peak, peak_label
from napari_r2au import create_model, load_model, predict
from napari_r2au.backends import inference_network
from napari_r2au.device import cpu_has_bf16
from napari_r2au.model_files import LoadedModel

ROOT = Path(__file__).resolve().parents[1]
DRIVE = ROOT.parent / "shared" / "data" / "DRIVE" / "training"


def timeit(fn, repeat: int = 3, warmup: int = 1) -> float:
    """Best wall time of ``repeat`` runs after ``warmup`` (seconds)."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def forward_flops(network: torch.nn.Module, shape: tuple[int, ...]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        network(torch.zeros(shape))
    return float(counter.get_total_flops())


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


def engine_rows(width: int, size: int, peak32: float, peak16: float, quick: bool) -> list[dict]:
    """Eager fp32 baseline and the engine's levers on R2AU-Net at ``width``."""
    torch.manual_seed(0)
    net = create_model("r2au_net", base_width=width).eval()
    loaded = LoadedModel(net, {"name": f"r2au_net-w{width}", "in_channels": 3, "out_channels": 1})
    image = np.random.default_rng(0).random((size, size, 3)).astype(np.float32)
    x = torch.from_numpy(image.transpose(2, 0, 1)[None].copy())
    flops = forward_flops(net, tuple(x.shape))

    def eager() -> None:
        with torch.no_grad():
            net(x)

    configs = [("eager fp32 (plain PyTorch forward)", eager, None)]
    for label, fuse, cl, precision in (
        ("engine fp32, BN folded", True, False, "fp32"),
        ("engine fp32, BN folded + channels_last", True, True, "fp32"),
        ("engine bf16 autocast", False, False, "bf16"),
        ("engine bf16, BN folded + channels_last (default where bf16 measures faster)", True, True, "bf16"),
    ):
        if precision == "bf16" and not cpu_has_bf16():
            continue
        kwargs = dict(fuse=fuse, channels_last=cl, precision=precision, device="cpu")
        configs.append((label, lambda kw=kwargs: predict(loaded, image, **kw), precision))
    if not quick:
        compiled = torch.compile(inference_network(loaded, torch.device("cpu"), True, True))

        def run_compiled() -> None:
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                compiled(x.contiguous(memory_format=torch.channels_last))

        configs.append(("torch.compile, BN folded + channels_last, bf16", run_compiled, "bf16"))
    rows, base = [], None
    for label, fn, precision in configs:
        seconds = timeit(fn, repeat=2 if quick else 3)
        base = base or seconds
        peak = peak16 if precision == "bf16" else peak32
        gflops = flops / seconds / 1e9
        rows.append(
            {
                "config": f"{label} [w{width}, {size}x{size}]",
                "seconds": seconds,
                "ratio": base / seconds,
                "gflops": gflops,
                "peak_share": gflops / peak,
            }
        )
    return rows


def agreement_rows() -> list[dict]:
    """Masks of the bundled trained model: each engine setting against exact fp32."""
    model = load_model("drive-vessels")
    images = sorted((DRIVE / "images").glob("*.tif"))[:3] if DRIVE.is_dir() else []
    if not images:
        from skimage import data

        arrays = [data.retina()[200:800, 200:800]]
    else:
        from napari_r2au.io import read_image

        arrays = [read_image(p) for p in images]
    reference = [predict(model, a, precision="fp32", fuse=False, channels_last=False).mask() for a in arrays]
    rows = []
    for label, kw in (
        ("fp32, BN folded + channels_last", dict(precision="fp32", backend="torch")),
        *(
            [("bf16, BN folded + channels_last (torch)", dict(precision="bf16", backend="torch"))]
            if cpu_has_bf16()
            else []
        ),
    ):
        scores = [dice(r, predict(model, a, **kw).mask()) for r, a in zip(reference, arrays)]
        rows.append({"config": f"drive-vessels mask agreement: {label}", "dice_vs_fp32": min(scores)})
    return rows


def default_model_rows() -> list[dict]:
    """What a user's click costs: the default model at default settings (its working scale,
    the backend and precision ``auto`` picks here), and drive-vessels for the earlier rows."""
    from napari_r2au.engine import run
    from napari_r2au.io import read_image
    from napari_r2au.model_files import DEFAULT_MODEL
    from napari_r2au.uncertainty import iter_predict_tta

    image = (
        read_image(sorted((DRIVE / "images").glob("*.tif"))[0])
        if DRIVE.is_dir()
        else np.random.default_rng(0).integers(0, 255, (584, 565, 3), dtype=np.uint8)
    )
    rows = []
    for name in dict.fromkeys((DEFAULT_MODEL, "drive-vessels")):
        model = load_model(name)
        result = predict(model, image)  # the first call converts and compiles: not timed
        seconds = timeit(lambda model=model: predict(model, image), repeat=5)
        averaged = timeit(lambda model=model: run(iter_predict_tta(model, image)), repeat=3)
        ran = f"{result.backend} {result.precision}, scale {result.scale:.2f}"
        rows += [
            {
                "config": f"{name} on a 565x584 fundus image, defaults ({ran}; {torch.get_num_threads()} threads)",
                "seconds": seconds,
            },
            {
                "config": f"same, {name}, mean of 3 flipped copies + uncertainty (segment --tta)",
                "seconds": averaged,
            },
        ]
    rethreshold = timeit(lambda: result.mask(0.37), repeat=20)
    rows.append({"config": "threshold slider: re-threshold cached probabilities", "seconds": rethreshold})
    return rows


def peak_rss_gib() -> float:
    """This process's peak resident memory. On Linux from /proc (VmHWM): getrusage's
    ru_maxrss survives fork and exec, so a child started by a large parent reports at least
    the parent's size (the rows before 2026-12-07 showed 2.2-2.3 GiB at every image size)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024**2  # kB -> GiB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB -> GiB


def large_image_child(size: int) -> None:
    """Child process: predict one size x size RGB image; print seconds and peak RSS."""
    model = load_model("drive-vessels")
    image = np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)
    # converts the network and compiles both tile shapes: a full batch of 2, and a last batch
    # of 1 (three tiles across; every size timed here has an odd number of tiles)
    predict(model, image[:512, :1400], tile_size=512, batch_size=2)
    start = time.perf_counter()
    result = predict(model, image, tile_size=512, batch_size=2)
    seconds = time.perf_counter() - start
    peak = peak_rss_gib()
    print(json.dumps({"seconds": seconds, "peak_gib": peak, "ran": f"{result.backend} {result.precision}"}))


def large_image_rows(sizes: list[int]) -> list[dict]:
    rows = []
    for size in sizes:
        out = subprocess.run(
            [sys.executable, "-m", "benchmarks", "--large-child", str(size)],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
        )
        result = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(
            {
                "config": f"drive-vessels, {size}x{size} RGB, tiles 512 ({result['ran']})",
                "seconds": result["seconds"],
                "us_per_pixel": result["seconds"] / size**2 * 1e6,
                "peak_gib": result["peak_gib"],
            }
        )
    return rows


def training_rows(quick: bool) -> list[dict]:
    from napari_r2au.training.losses import segmentation_loss

    rows, base = [], None
    for label, dtype in (("fp32", None), ("bf16 autocast", torch.bfloat16)):
        if dtype is not None and not cpu_has_bf16():
            continue
        torch.manual_seed(0)
        net = create_model("r2au_net", base_width=16).train()
        opt = torch.optim.AdamW(net.parameters())
        x, y = torch.randn(32, 3, 64, 64), (torch.rand(32, 1, 64, 64) > 0.9).float()

        def step(net=net, opt=opt, x=x, y=y, dtype=dtype) -> None:
            with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = segmentation_loss(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

        seconds = timeit(step, repeat=3 if quick else 5, warmup=2)
        base = base or seconds
        rows.append(
            {
                "config": f"training step, DRIVE config (w16, 32x64x64), {label}",
                "seconds": seconds,
                "ratio": base / seconds,
            }
        )
    return rows


def finetune_rows() -> list[dict]:
    """The plugin's default fine-tune on one corrected 512x512 image (:func:`benchmarks.default_finetune`)."""
    if not DRIVE.is_dir():
        return [{"config": "fine-tune: DRIVE data not found, skipped"}]
    from benchmarks import default_finetune

    seconds, result = default_finetune(DRIVE)
    return [
        {
            "config": f"default fine-tune (150 steps, patch 96) on one 512x512 image: held-out Dice "
            f"{result.dice_before:.4f} -> {result.dice_after:.4f}",
            "seconds": seconds,
        }
    ]


def monai_rows(size: int, widths: list[int], reference: dict[int, float]) -> list[dict]:
    try:
        from monai.networks.nets import AttentionUnet
    except ImportError:
        return [{"config": "MONAI AttentionUnet: not installed (pip install monai)", "seconds": float("nan")}]
    rows = []
    x = torch.randn(1, 3, size, size)
    for width in widths:
        net = AttentionUnet(
            spatial_dims=2,
            in_channels=3,
            out_channels=1,
            channels=[width * 2**i for i in range(5)],
            strides=[2, 2, 2, 2],
        ).eval()

        def run(net=net) -> None:
            with torch.no_grad():
                net(x)

        seconds = timeit(run)
        rows.append(
            {
                "config": f"MONAI AttentionUnet eager fp32 [w{width}, {size}x{size}]",
                "seconds": seconds,
                "ratio": reference[width] / seconds,
            }
        )
    return rows


def format_table(rows: list[dict]) -> str:
    columns = [
        ("seconds", "time (s)", "{:.4f}"),
        ("ratio", "x eager fp32", "{:.2f}"),
        ("gflops", "GFLOP/s", "{:.1f}"),
        ("peak_share", "share of peak", "{:.0%}"),
        ("peak_gib", "peak RSS (GiB)", "{:.2f}"),
        ("us_per_pixel", "us/pixel", "{:.3f}"),
        ("dice_vs_fp32", "Dice vs fp32", "{:.4f}"),
    ]
    lines = [
        "| configuration | " + " | ".join(h for _, h, _ in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for row in rows:
        cells = [fmt.format(row[key]) if key in row else "" for key, _, fmt in columns]
        lines.append(f"| {row['config']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="fewer repeats, no torch.compile, sizes up to 2k"
    )
    parser.add_argument("--markdown", type=Path, help="also write the table and the machine to this file")
    parser.add_argument("--large-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.large_child:
        large_image_child(args.large_child)
        return 0
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, avx512_bf16: {cpu_has_bf16()}, "
        f"CUDA: {torch.cuda.is_available()}"
    )
    print(machine, flush=True)
    peak32, peak16 = matmul_peak(torch.float32), matmul_peak(torch.bfloat16)
    rows = [
        {"config": f"machine peak: {peak_label(torch.float32)}", "gflops": peak32},
        {"config": f"machine peak: {peak_label(torch.bfloat16)}", "gflops": peak16},
    ]
    widths = [16] if args.quick else [16, 64]
    eager_seconds = {}
    for width in widths:
        new = engine_rows(width, 512, peak32, peak16, args.quick)
        eager_seconds[width] = new[0]["seconds"]
        rows += new
        print(format_table(new), flush=True)
    rows += monai_rows(512, widths, eager_seconds)
    rows += agreement_rows()
    rows += default_model_rows()
    rows += large_image_rows([1024, 2048] if args.quick else [1024, 2048, 4096, 8192])
    rows += training_rows(args.quick)
    rows += finetune_rows()
    if torch.cuda.is_available():
        rows.append(
            {"config": "CUDA: run `python -m benchmarks` on the GPU machine (autocast, cudnn.benchmark)"}
        )
    else:
        rows.append({"config": "CUDA: no GPU on this machine, GPU configurations skipped"})
    table = format_table(rows)
    print(table)
    if args.markdown:
        write_between_markers(
            args.markdown,
            f"Machine: {machine}\n\nCommand: `python -m benchmarks"
            f"{' --quick' if args.quick else ''}`\n\n{table}\n",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
