"""Which device and numeric precision a network runs on: shared by the engine, its
backends and the trainer, so that all three read a device or precision request the same way."""

from __future__ import annotations

import functools
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


def cpu_bf16_speedup(repeat: int = 5) -> float:
    """How much faster a convolution like the networks' runs in bf16 than in fp32 here.

    Best of ``repeat`` timings each, in this process's thread count: a 3x3 convolution of
    32 channels over a batch of 64x64 tiles in channels-last order (the engine's and the
    trainer's layout), about 0.3 GFLOP.
    """
    import time

    import torch

    with torch.no_grad():
        conv = torch.nn.Conv2d(32, 32, 3, padding=1).to(memory_format=torch.channels_last)
        tiles = torch.randn(4, 32, 64, 64).to(memory_format=torch.channels_last)

        def best(dtype: torch.dtype | None) -> float:
            with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                conv(tiles)  # the first call builds oneDNN's kernel for the shape
                times = []
                for _ in range(repeat):
                    started = time.perf_counter()
                    conv(tiles)
                    times.append(time.perf_counter() - started)
            return min(times)

        return best(None) / best(torch.bfloat16)


@functools.cache
def cpu_bf16_is_faster() -> bool:
    """True where the CPU has native bf16 (its flags) and bf16 convolutions measure faster.

    The flags alone are not enough: a virtual machine seen here reported avx512_bf16 and
    ran bf16 convolutions at 0.7 of fp32's speed, and a training step at 0.76. Measured once
    per process (tens of milliseconds) and only where the flags say bf16 exists.
    """
    return cpu_has_bf16() and cpu_bf16_speedup() >= BF16_MIN_SPEEDUP


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
    import torch

    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(autocast_dtype(device, precision), "fp32")
