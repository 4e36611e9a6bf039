"""Test-time-augmentation uncertainty and the search for the most uncertain region."""

from __future__ import annotations

import numpy as np
import pytest

from napari_r2au import engine
from napari_r2au.uncertainty import binary_entropy, iter_predict_tta, most_uncertain_region, tta_uncertainty


def test_entropy_and_std():
    assert binary_entropy(np.array([0.0, 0.5, 1.0])) == pytest.approx([0.0, 1.0, 0.0], abs=1e-5)
    maps = [np.full((2, 2), 0.2), np.full((2, 2), 0.8)]
    assert tta_uncertainty(maps, "std") == pytest.approx(np.full((2, 2), 0.3))
    assert tta_uncertainty(maps, "entropy") == pytest.approx(np.ones((2, 2)), abs=1e-5)
    three = [np.eye(3)[None].repeat(2, 0)] * 2  # sure of one class of three
    assert tta_uncertainty(three, "entropy", multiclass=True) == pytest.approx(np.zeros((2, 3)), abs=1e-5)
    with pytest.raises(ValueError, match="entropy"):
        tta_uncertainty(maps, "variance")


@pytest.mark.parametrize(("axes", "shape"), [("YXC", (12, 17, 3)), ("ZYX", (2, 12, 17)), ("YX", (12, 17))])
def test_flips_are_undone(monkeypatch, tiny_net, axes, shape):
    """A 'network' that returns its input: every un-flipped copy equals the first."""

    def echo(model, image, *, axes, attention=False, **kwargs):
        yield engine.Progress(0, 1)
        grey = np.asarray(image, np.float32)
        if "C" in axes:
            grey = grey.mean(axis=axes.index("C"))
        yield engine.Progress(1, 1)
        return engine.Prediction(probabilities=grey / grey.max(), attention=[grey] if attention else [])

    monkeypatch.setattr(engine, "iter_predict", echo)
    image = np.random.default_rng(0).random(shape).astype(np.float32)
    gen = iter_predict_tta(tiny_net, image, axes=axes, kind="std", attention=True)
    events = []
    while True:
        try:
            events.append(next(gen))
        except StopIteration as stop:
            prediction = stop.value
            spread = prediction.uncertainty
            break
    assert [(e.done, e.total) for e in events] == [(0, 3), (1, 3), (1, 3), (2, 3), (2, 3), (3, 3)]
    assert [e.stage for e in events][-1] == "uncertainty"
    assert np.abs(spread).max() < 1e-6
    assert len(prediction.attention) == 1


def test_the_prediction_is_the_mean_of_the_copies(monkeypatch, tiny_net):
    """A 'network' blind to its input (a left-to-right ramp): the x-flipped copy, flipped
    back, is the reversed ramp, so the mean is (2 ramp + (1 - ramp)) / 3."""
    ramp = np.linspace(0, 1, 9, dtype=np.float32)[None].repeat(5, 0)

    def blind(model, image, *, axes, attention=False, **kwargs):
        yield engine.Progress(1, 1)
        return engine.Prediction(probabilities=ramp.copy(), threshold=0.5)

    monkeypatch.setattr(engine, "iter_predict", blind)
    prediction = engine.run(iter_predict_tta(tiny_net, np.zeros((5, 9)), axes="YX", kind="std"))
    spread = prediction.uncertainty
    assert prediction.probabilities == pytest.approx((ramp + 1) / 3)
    assert prediction.threshold == 0.5 and spread.max() > 0.3


def test_tta_on_a_real_network_has_the_image_shape(tiny_net, rng):
    gen = iter_predict_tta(tiny_net, rng.random((40, 44, 3)), axes="YXC", precision="fp32")
    prediction = engine.run(gen)
    uncertainty = prediction.uncertainty
    assert prediction.probabilities.shape == uncertainty.shape == (40, 44)
    assert uncertainty.min() >= 0 and uncertainty.max() <= 1


def test_regions_are_visited_from_the_most_uncertain():
    values = np.zeros((100, 130), np.float32)
    values[70:100, 128:130] = 1.0  # the partial corner window (36 x 2 pixels) wins on its mean
    values[0:10, 0:64] = 0.5
    first = most_uncertain_region(values, 64)
    assert first.key == (1, 2) and first.score == pytest.approx(30 * 2 / (36 * 2))
    assert first.center == (pytest.approx((64 + 99) / 2), pytest.approx((128 + 129) / 2))
    second = most_uncertain_region(values, 64, {first.key})
    assert second.key == (0, 0) and second.center == (31.5, 31.5)
    keys = {first.key, second.key}
    while (region := most_uncertain_region(values, 64, keys)) is not None:
        keys.add(region.key)
    assert len(keys) == 6  # 2 x 3 windows, each once


def test_regions_in_a_stack_name_the_slice():
    values = np.zeros((3, 32, 32), np.float32)
    values[2, 16:, :16] = 1
    region = most_uncertain_region(values, 16)
    assert region.key == (2, 1, 0) and region.center == (2.0, 23.5, 7.5)
    with pytest.raises(ValueError):
        most_uncertain_region(np.zeros(5), 4)
