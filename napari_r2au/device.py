"""Which device and numeric precision a network runs on: shared by the engine, its
backends and the trainer, so that all three read a device or precision request the same way."""

from __future__ import annotations

import functools
import os
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def select_device(device: str | None = None) -> torch.device:
    """cuda, then mps, then cpu, unless ``device`` says otherwise; a device this machine
    does not have is a ValueError now, not a RuntimeError deep inside the first batch."""
    import torch

    if device not in (None, "", "auto"):
        try:
            chosen = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"unknown device {device!r}: use cpu, cuda, cuda:N or mps") from exc
        if chosen.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(
                f"device {device!r}: CUDA is not available here (no GPU, or a CPU-only torch); "
                "use --device cpu"
            )
        if chosen.type == "cuda" and chosen.index is not None and chosen.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
        if chosen.type == "mps" and not (
            getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
        ):
            raise ValueError(f"device {device!r}: MPS is not available here; use --device cpu")
        if chosen.type not in ("cpu", "cuda", "mps"):
            raise ValueError(f"device {device!r}: napari-r2au runs on cpu, cuda or mps")
        return chosen
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux's /proc/cpuinfo); empty where there is none to read,
    so that every feature below counts as absent: the safe side."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_bf16() -> bool:
    """True on CPUs with native bf16 dot products (AVX512_BF16 or AMX)."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


#: bf16 is the CPU's default float where the probe's convolutions run at least this much
#: faster in bf16 than in fp32 (a margin over timing noise; a gain smaller than it is not
#: worth bf16's rounding)
BF16_MIN_SPEEDUP = 1.15
#: each timing of the probe lasts at least this long (seconds), so that on many cores,
#: where one convolution takes microseconds, fixed overheads do not decide
PROBE_MIN_SECONDS = 0.004
#: "1" or "0" decides bf16 on the CPU without the probe (for a CPU the probe misjudges)
BF16_ENV = "R2AU_CPU_BF16"


def _conv_seconds(dtype: torch.dtype | None, calls: int) -> tuple[float, torch.dtype]:
    """Time of ``calls`` probe convolutions at ``dtype`` (None: fp32), and the dtype they ran at.

    A 3x3 convolution of 32 channels over four 64x64 tiles in channels-last order (the
    engine's and the trainer's layout), about 0.3 GFLOP, with its own random generator: the
    probe leaves torch's global random state as it was.
    """
    import time

    import torch
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(32, 32, 3, 3, generator=generator).to(memory_format=torch.channels_last)
    tiles = torch.randn(4, 32, 64, 64, generator=generator).to(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        out = F.conv2d(tiles, weight, padding=1)  # the first call builds oneDNN's kernel for the shape
        started = time.perf_counter()
        for _ in range(calls):
            out = F.conv2d(tiles, weight, padding=1)
        return time.perf_counter() - started, out.dtype


def cpu_bf16_speedup(repeat: int = 5) -> float:
    """How much faster a convolution like the networks' runs in bf16 than in fp32 here, in
    this process's thread count: best of ``repeat`` timings each, fp32 and bf16 alternating
    so that a change in the machine's load falls on both, each timing at least
    :data:`PROBE_MIN_SECONDS` long."""
    import torch

    single, _ = _conv_seconds(None, 1)
    calls = max(1, int(PROBE_MIN_SECONDS / max(single, 1e-6)) + 1)
    fp32 = bf16 = float("inf")
    for _ in range(repeat):
        fp32 = min(fp32, _conv_seconds(None, calls)[0])
        bf16 = min(bf16, _conv_seconds(torch.bfloat16, calls)[0])
    return fp32 / bf16


_bf16_verdict: bool | None = None
_bf16_lock = threading.Lock()


def cpu_bf16_is_faster() -> bool:
    """True where the CPU has native bf16 (its flags) and bf16 convolutions measure faster.

    The flags alone are not enough: a virtual machine seen here reported avx512_bf16 and
    ran the probe's bf16 convolutions at 0.5-0.6 of fp32's speed, and a training step at 0.74.
    Measured once per process (a fraction of a second, in the first run's worker), at the
    first caller's thread count, only where the flags say bf16 exists; two docks' first runs
    at once measure once.
    :data:`BF16_ENV` set to 1 or 0 decides instead.
    """
    global _bf16_verdict
    with _bf16_lock:
        if _bf16_verdict is None:
            forced = os.environ.get(BF16_ENV, "").strip()
            if forced in ("0", "1"):
                _bf16_verdict = forced == "1"
            else:
                _bf16_verdict = cpu_has_bf16() and cpu_bf16_speedup() >= BF16_MIN_SPEEDUP
        return _bf16_verdict


def forget_bf16_verdict() -> None:
    """Measure again at the next call (tests; a process whose thread count changed a lot)."""
    global _bf16_verdict
    with _bf16_lock:
        _bf16_verdict = None


def cpu_has_int8_dot() -> bool:
    """True on CPUs with int8 dot-product instructions (VNNI: AVX512_VNNI, AVX_VNNI or AMX).
    Without them, int8 convolutions sum pairs of u8 x s8 products in 16 bits, which
    saturates unless the network's weights were quantized to 7 bits (NNCF's overflow fix)."""
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


#: the precision requests autocast_dtype understands
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for a device and precision request; None means exact fp32."""
    import torch

    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if precision != "auto":
        raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_bf16_is_faster():
        return torch.bfloat16
    return None


def float_precision(device: torch.device, precision: str = "auto") -> str:
    """A precision request as the float the device runs it at ("bf16", "fp16" or "fp32"):
    ``auto`` never becomes int8 here. Comparisons of two networks (a fine-tune's parent
    and child, validation during training) ask for this, so that a model file with an int8
    network is not measured at int8 against a network object at a float."""
    return float_name(autocast_dtype(device, precision))


def float_name(dtype: torch.dtype | None) -> str:
    """An autocast dtype as a precision's name; None (no autocast) is "fp32"."""
    import torch

    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
