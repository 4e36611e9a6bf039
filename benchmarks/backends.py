"""Backends side by side: ``python -m benchmarks.backends [--markdown docs/performance.md]``.

Times, in one run, the bundled ``retina-vessels`` model on a real DRIVE photograph at full
resolution through ``predict`` with each backend and precision (napari_r2au.backends), the
network alone at the engine's padded input shape (and ONNX Runtime's fp32 beside it, the
other runtime considered), and the first call of a fresh process (conversion and
compilation). The matmul peaks of this run are printed beside. Accuracy: F1 of each
configuration on the 20 DRIVE training images inside their fields of view, through
``r2au evaluate``'s code, against torch fp32. Run it single-threaded for figures that a
busy second core does not disturb (``OMP_NUM_THREADS=1``; OpenVINO takes torch's thread
count). Only ratios within one run are meant to be compared.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import write_between_markers

ROOT = Path(__file__).resolve().parents[1]
DRIVE = ROOT.parent / "shared" / "data" / "DRIVE" / "training"
BEGIN, END = "<!-- backends -->", "<!-- /backends -->"
CONFIGS = [
    ("torch", "fp32"),
    ("torch", "bf16"),
    ("openvino", "fp32"),
    ("openvino", "bf16"),
    ("torch-compile", "bf16"),
]
#: a CPU without native bf16 (most laptops): bf16 would be emulated, far slower than fp32, so
#: the float rows are fp32 only, written between markers of their own
BEGIN_NO_BF16, END_NO_BF16 = "<!-- backends-no-bf16 -->", "<!-- /backends-no-bf16 -->"
CONFIGS_NO_BF16 = [("torch", "fp32"), ("openvino", "fp32"), ("torch-compile", "fp32")]


def configs() -> list[tuple[str, str]]:
    """The rows this machine can run at their own speed."""
    from napari_r2au.device import cpu_has_bf16

    return CONFIGS if cpu_has_bf16() else CONFIGS_NO_BF16


def best_of(fn, repeat: int, warmup: int = 1) -> float:
    """Best wall time of ``repeat`` calls after ``warmup`` (seconds)."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _emulated(dtype: torch.dtype) -> bool:
    """bf16 on a CPU without native bf16 dot products (no AVX512_BF16 or AMX): torch then
    emulates it, about a hundred times slower than fp32 (seen on an AVX2-only EPYC)."""
    from napari_r2au.device import cpu_has_bf16

    return dtype == torch.bfloat16 and not cpu_has_bf16()


def matmul_peak(dtype: torch.dtype, n: int = 2048) -> float:
    """GFLOP/s of an n^3 matmul, best of 5; emulated bf16 at 512^3, best of 2 (2048^3 would
    take minutes and says nothing more)."""
    n, repeat = (512, 2) if _emulated(dtype) else (n, 5)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / best_of(lambda: a @ b, repeat=repeat) / 1e9


def peaks_text() -> str:
    """The machine's matmul peaks, measured now, as a sentence's words."""
    peak32, peak16 = matmul_peak(torch.float32), matmul_peak(torch.bfloat16)
    bf16 = f"{peak16:.1f}" if _emulated(torch.bfloat16) else f"{peak16:.0f}"
    return (
        f"matmul peaks {peak32:.0f} GFLOP/s ({peak_label(torch.float32)}) "
        f"and {bf16} ({peak_label(torch.bfloat16)})"
    )


def peak_label(dtype: torch.dtype) -> str:
    """How a table names :func:`matmul_peak`'s figure."""
    name = "bf16" if dtype == torch.bfloat16 else "fp32"
    return f"512^3 matmul {name}, emulated (no native bf16)" if _emulated(dtype) else f"2048^3 matmul {name}"


def network_flops(loaded, shape: tuple[int, ...]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        loaded.network.eval()(torch.zeros(shape), return_attention=True)
    return float(counter.get_total_flops())


def first_call(backend: str, precision: str, image: np.ndarray, fresh: bool) -> float:
    """The first predict of a process: the model loaded, prepared (BN folding; for
    OpenVINO the ONNX export, or with ``fresh`` False the file in the user cache, read and
    compiled) and run once."""
    from napari_r2au import backends, load_model, predict

    if fresh:  # an empty user cache
        os.environ["R2AU_HOME"] = tempfile.mkdtemp(prefix="r2au-bench-")
    backends.clear_cache()
    model = load_model("retina-vessels")
    start = time.perf_counter()
    predict(model, image, backend=backend, precision=precision)
    return time.perf_counter() - start


def network_rows(loaded, image: np.ndarray, repeat: int) -> tuple[list[dict], tuple[int, ...]]:
    """The network alone, at the input shape the engine gives it for ``image``."""
    from napari_r2au import backends
    from napari_r2au.engine import _round_up, working_scale

    scale = working_scale(loaded, image=image)
    height, width = (round(n * scale) for n in image.shape[:2])
    shape = (1, loaded.in_channels, _round_up(height, 16), _round_up(width, 16))
    batch = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    rows = []
    for backend, precision in configs():
        forward = backends.prepare_forward(loaded, torch.device("cpu"), precision, backend)
        seconds = best_of(lambda f=forward: f(batch, True), repeat)
        rows.append({"config": f"network only, {backend} {precision}", "seconds": seconds})
    try:
        import onnxruntime as ort

        from napari_r2au.export import write_onnx

        with tempfile.TemporaryDirectory() as folder:
            path = write_onnx(loaded, Path(folder) / "net.onnx", attention=True)
            options = ort.SessionOptions()
            options.intra_op_num_threads = options.inter_op_num_threads = torch.get_num_threads()
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            seconds = best_of(lambda: session.run(None, {"image": batch}), repeat)
        rows.append({"config": "network only, onnxruntime fp32", "seconds": seconds})
    except ImportError:
        rows.append({"config": "network only, onnxruntime fp32: not installed (the export extra)"})
    return rows, shape


def f1_on_drive(loaded, backend: str, precision: str) -> float | None:
    from napari_r2au.training.evaluate import evaluate_folders

    if not (DRIVE / "images").is_dir():
        return None
    report = evaluate_folders(
        loaded, DRIVE / "images", DRIVE / "1st_manual", DRIVE / "mask", backend=backend, precision=precision
    )
    return float(report["f1"])


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


def format_table(rows: list[dict]) -> str:
    columns = [
        ("seconds", "time (s)", "{:.4f}"),
        ("x_torch32", "x torch fp32", "{:.2f}"),
        ("x_torch16", "x torch bf16", "{:.2f}"),
        ("gflops", "GFLOP/s", "{:.1f}"),
        ("peak_share", "share of peak", "{:.0%}"),
        ("first", "first call (s)", "{:.2f}"),
        ("first_cached", "first call, disk cache (s)", "{:.2f}"),
        ("f1", "F1, DRIVE 20 (FOV)", "{:.4f}"),
        ("dice", "mask Dice vs torch fp32", "{:.4f}"),
    ]
    columns = [c for c in columns if any(row.get(c[0]) is not None for row in rows)]  # none empty
    lines = [
        "| configuration | " + " | ".join(h for _, h, _ in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for row in rows:
        cells = [fmt.format(row[key]) if row.get(key) is not None else "" for key, _, fmt in columns]
        lines.append(f"| {row['config']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.backends", description=__doc__)
    parser.add_argument("--markdown", type=Path, help="also write the table into this file")
    parser.add_argument("--repeat", type=int, default=5, help="timed calls per row (best kept)")
    parser.add_argument("--no-f1", action="store_true", help="skip the F1 over the 20 DRIVE images")
    args = parser.parse_args(argv)

    from napari_r2au import backends, load_model, predict
    from napari_r2au.device import cpu_has_bf16
    from napari_r2au.io import read_image

    if not backends.openvino_available():
        print("openvino is not installed: pip install -e '.[fast]'", file=sys.stderr)
        return 2
    import openvino

    photograph = sorted((DRIVE / "images").glob("*.tif"))[0] if DRIVE.is_dir() else None
    if photograph is None:
        print(f"DRIVE not found at {DRIVE}", file=sys.stderr)
        return 2
    image = read_image(photograph)
    machine = (
        f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"openvino {openvino.__version__}, {torch.get_num_threads()} thread(s), "
        f"avx512_bf16: {cpu_has_bf16()}"
    )
    print(machine, flush=True)
    peak32, peak16 = matmul_peak(torch.float32), matmul_peak(torch.bfloat16)
    peaks = {"fp32": peak32, "bf16": peak16}
    rows: list[dict] = [
        {"config": f"machine peak: {peak_label(torch.float32)}", "gflops": peak32},
        {"config": f"machine peak: {peak_label(torch.bfloat16)}", "gflops": peak16},
    ]
    model = load_model("retina-vessels")
    # torch's and oneDNN's own start-up (paid once by any process) is not a backend's cost
    predict(load_model("retina-vessels"), image[:64, :64], backend="torch", precision="fp32")
    firsts = {}
    for backend, precision in configs():  # before anything is cached in this process
        cold = first_call(backend, precision, image, fresh=True)
        cached = first_call(backend, precision, image, fresh=False) if backend == "openvino" else None
        firsts[(backend, precision)] = (cold, cached)

    net_rows, shape = network_rows(model, image, args.repeat)
    flops = network_flops(model, shape)
    reference = predict(model, image, backend="torch", precision="fp32")
    whole = []
    for backend, precision in configs():
        seconds = best_of(
            lambda b=backend, p=precision: predict(model, image, backend=b, precision=p), args.repeat
        )
        result = predict(model, image, backend=backend, precision=precision)
        assert (result.backend, result.precision) == (backend, precision)
        cold, cached = firsts[(backend, precision)]
        whole.append(
            {
                "config": f"predict, {backend} {precision}",
                "seconds": seconds,
                "first": cold,
                "first_cached": cached,
                "dice": dice(result.mask(), reference.mask()),
                "f1": None if args.no_f1 else f1_on_drive(model, backend, precision),
                "precision": precision,
            }
        )
        print(format_table(whole[-1:]), flush=True)
    for group in (net_rows, whole):
        base32 = group[0]["seconds"]
        base16 = group[1]["seconds"] if configs()[1] == ("torch", "bf16") else None
        for row in group:
            if row.get("seconds") is None:
                continue
            row["x_torch32"] = base32 / row["seconds"]
            row["x_torch16"] = base16 / row["seconds"] if base16 else None
            row["gflops"] = flops / row["seconds"] / 1e9
            precision = row.get("precision") or row["config"].rsplit(" ", 1)[-1]
            row["peak_share"] = row["gflops"] / peaks[precision]
    rows += net_rows + whole
    table = format_table(rows)
    print(table)
    if args.markdown:
        size = f"{image.shape[1]}x{image.shape[0]}"
        block = (
            f"Machine: {machine}\n\n"
            f"Command: `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} python -m benchmarks.backends`"
            f"\n\n`retina-vessels` on `{photograph.name}` ({size}, scale {reference.scale:.3g}, network input "
            f"{shape[3]}x{shape[2]}; {flops / 1e9:.1f} GFLOP per forward pass, attention gates included)."
            f"\n\n{table}\n"
        )
        markers = (BEGIN, END) if configs() is CONFIGS else (BEGIN_NO_BF16, END_NO_BF16)
        write_between_markers(args.markdown, block, *markers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
