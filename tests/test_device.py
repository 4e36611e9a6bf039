"""The CPU's default float: bf16 only where the CPU has it and it measures faster."""

from __future__ import annotations

import math

import pytest
import torch

from napari_r2au import device

CPU = torch.device("cpu")


@pytest.fixture
def fresh_caches():
    device.cpu_bf16_is_faster.cache_clear()
    yield
    device.cpu_bf16_is_faster.cache_clear()


def _machine(monkeypatch, flags: set[str], speedup: float | None) -> None:
    monkeypatch.setattr(device, "cpu_has_bf16", lambda: bool(flags & {"avx512_bf16", "amx_bf16"}))

    def probe(repeat: int = 5) -> float:
        if speedup is None:
            raise AssertionError("the probe ran on a CPU without bf16")
        return speedup

    monkeypatch.setattr(device, "cpu_bf16_speedup", probe)


def test_bf16_flag_with_slow_bf16_gives_fp32(fresh_caches, monkeypatch):
    """A VM that reports avx512_bf16 but runs bf16 at half fp32's speed (seen) stays fp32."""
    _machine(monkeypatch, {"avx512f", "avx512_bf16"}, 0.5)
    assert device.autocast_dtype(CPU, "auto") is None
    assert device.float_precision(CPU, "auto") == "fp32"
    assert device.autocast_dtype(CPU, "bf16") is torch.bfloat16  # asked for: given


def test_fast_bf16_is_the_default(fresh_caches, monkeypatch):
    _machine(monkeypatch, {"avx512f", "avx512_bf16"}, 2.0)
    assert device.autocast_dtype(CPU, "auto") is torch.bfloat16
    assert device.float_precision(CPU, "auto") == "bf16"


def test_no_probe_without_the_flag(fresh_caches, monkeypatch):
    _machine(monkeypatch, {"avx2"}, None)
    assert device.autocast_dtype(CPU, "auto") is None


def test_a_gain_within_noise_keeps_fp32(fresh_caches, monkeypatch):
    _machine(monkeypatch, {"amx_bf16"}, device.BF16_MIN_SPEEDUP - 0.01)
    assert not device.cpu_bf16_is_faster()


def test_the_probe_measures():
    speedup = device.cpu_bf16_speedup(repeat=2)
    assert math.isfinite(speedup) and speedup > 0
