"""The CPU's default float: bf16 only where the CPU has it and it measures faster."""

from __future__ import annotations

import math

import pytest
import torch

from napari_r2au import device

CPU = torch.device("cpu")


@pytest.fixture
def fresh_verdict(monkeypatch):
    monkeypatch.delenv(device.BF16_ENV, raising=False)
    device.forget_bf16_verdict()
    yield
    device.forget_bf16_verdict()


def _machine(monkeypatch, flags: set[str], speedup: float | None) -> list[int]:
    """This CPU's flags and probe replaced; returns a list that counts the probe's runs."""
    monkeypatch.setattr(device, "cpu_has_bf16", lambda: bool(flags & {"avx512_bf16", "amx_bf16"}))
    runs: list[int] = []

    def probe(repeat: int = 5) -> float:
        if speedup is None:
            raise AssertionError("the probe ran on a CPU without bf16")
        runs.append(1)
        return speedup

    monkeypatch.setattr(device, "cpu_bf16_speedup", probe)
    return runs


def test_bf16_flag_with_slow_bf16_gives_fp32(fresh_verdict, monkeypatch):
    """A VM that reports avx512_bf16 but runs bf16 at half fp32's speed (seen) stays fp32."""
    runs = _machine(monkeypatch, {"avx512f", "avx512_bf16"}, 0.5)
    assert device.autocast_dtype(CPU, "auto") is None
    assert device.float_precision(CPU, "auto") == "fp32"
    assert device.autocast_dtype(CPU, "bf16") is torch.bfloat16  # asked for: given
    assert len(runs) == 1  # measured once per process


def test_fast_bf16_is_the_default(fresh_verdict, monkeypatch):
    _machine(monkeypatch, {"avx512f", "avx512_bf16"}, 2.0)
    assert device.autocast_dtype(CPU, "auto") is torch.bfloat16
    assert device.float_precision(CPU, "auto") == "bf16"


def test_no_probe_without_the_flag(fresh_verdict, monkeypatch):
    _machine(monkeypatch, {"avx2"}, None)
    assert device.autocast_dtype(CPU, "auto") is None


def test_a_gain_within_noise_keeps_fp32(fresh_verdict, monkeypatch):
    _machine(monkeypatch, {"amx_bf16"}, device.BF16_MIN_SPEEDUP - 0.01)
    assert not device.cpu_bf16_is_faster()


@pytest.mark.parametrize(("value", "expected"), [("0", None), ("1", torch.bfloat16)])
def test_the_environment_decides_without_the_probe(fresh_verdict, monkeypatch, value, expected):
    _machine(monkeypatch, {"avx512_bf16"}, None)  # the probe would fail the test
    monkeypatch.setenv(device.BF16_ENV, value)
    assert device.autocast_dtype(CPU, "auto") is expected


def test_int8_networks_float_layers_follow_the_measured_rule(fresh_verdict, monkeypatch):
    """OpenVINO's int8 networks run their unquantized layers at the CPU's default float."""
    from napari_r2au import backends

    for speedup, hint in ((0.5, "f32"), (2.0, "bf16")):
        device.forget_bf16_verdict()
        _machine(monkeypatch, {"avx512_bf16"}, speedup)
        assert backends.int8_float_hint() == hint


def test_the_probe_times_both_floats_and_leaves_the_random_state():
    state = torch.random.get_rng_state()
    assert device._conv_seconds(None, 1)[1] == torch.float32
    assert device._conv_seconds(torch.bfloat16, 1)[1] == torch.bfloat16
    speedup = device.cpu_bf16_speedup(repeat=2)
    assert math.isfinite(speedup) and speedup > 0
    assert torch.equal(torch.random.get_rng_state(), state)
