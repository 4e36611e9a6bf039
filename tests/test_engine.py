from __future__ import annotations

import numpy as np
import pytest

from napari_r2au import predict
from napari_r2au.engine import Cancelled, Progress, iter_predict, resolve_axes, run


@pytest.mark.parametrize(
    ("shape", "channels", "axes"),
    [
        ((20, 30), 3, "YX"),
        ((20, 30, 3), 3, "YXC"),
        ((3, 20, 30), 3, "CYX"),
        ((5, 20, 30), 3, "ZYX"),
        ((5, 20, 30, 3), 3, "ZYXC"),
        ((20, 30, 1), 1, "YXC"),
        ((20, 30, 4), 3, "YXC"),
    ],
)
def test_axes_are_resolved(shape, channels, axes):
    assert resolve_axes(shape, channels) == axes


def test_explicit_axes_are_checked():
    assert resolve_axes((3, 20, 30), 3, "zyx") == "ZYX"
    with pytest.raises(ValueError, match="do not describe"):
        resolve_axes((20, 30), 3, "ZYX")


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.float32, np.float64])
def test_any_dtype_and_odd_size(tiny_net, rng, dtype):
    image = (rng.random((37, 53, 3)) * 200).astype(dtype)
    result = predict(tiny_net, image, precision="fp32")
    assert result.probabilities.shape == (37, 53) and result.probabilities.dtype == np.float32
    assert result.probabilities.min() >= 0 and result.probabilities.max() <= 1
    assert result.mask().dtype == np.uint8 and set(np.unique(result.mask())) <= {0, 1}


@pytest.mark.parametrize("shape", [(1, 1), (1, 7, 3), (2, 2)])
def test_tiny_images(tiny_net, shape):
    assert predict(tiny_net, np.ones(shape, np.uint8), precision="fp32").probabilities.shape == shape[:2]


def test_grey_cyx_and_stack_inputs(tiny_net, rng):
    grey = rng.random((40, 40)).astype(np.float32)
    assert predict(tiny_net, grey, precision="fp32").probabilities.shape == (40, 40)
    cyx = rng.random((3, 40, 44)).astype(np.float32)
    yxc = np.moveaxis(cyx, 0, -1)
    a = predict(tiny_net, cyx, precision="fp32").probabilities
    b = predict(tiny_net, yxc, precision="fp32").probabilities
    np.testing.assert_allclose(a, b, atol=1e-6)
    stack = rng.random((3, 32, 36)).astype(np.float32)
    result = predict(tiny_net, stack, axes="ZYX", attention=True, precision="fp32")
    assert result.probabilities.shape == (3, 32, 36)
    assert [a.shape for a in result.attention] == [(3, 32, 36)] * 4
    single = predict(tiny_net, stack[1], precision="fp32").probabilities
    # a slice alone is normalised with its own statistics, so compare loosely
    assert np.corrcoef(single.ravel(), result.probabilities[1].ravel())[0, 1] > 0.9


def test_attention_maps_at_full_resolution(tiny_net, rng):
    result = predict(tiny_net, rng.random((50, 70, 3)), attention=True, precision="fp32")
    assert len(result.attention) == 4
    for alpha in result.attention:
        assert alpha.shape == (50, 70) and alpha.dtype == np.float32
        assert alpha.min() >= 0 and alpha.max() <= 1


def test_tiled_equals_whole_image(tiny_net, rng):
    from skimage import data

    image = data.retina()[300:556, 300:620]
    whole = predict(tiny_net, image, precision="fp32")
    tiled = predict(tiny_net, image, tile_size=128, overlap=48, batch_size=3, precision="fp32")
    diff = np.abs(whole.probabilities - tiled.probabilities)
    assert diff.mean() < 0.01, diff.mean()
    agree = (whole.mask() == tiled.mask()).mean()
    assert agree > 0.98


@pytest.mark.parametrize("shape", [(256, 320), (200, 517), (130, 129)])
def test_blending_weights_sum_as_the_windows_add_them(shape):
    """The engine divides by the outer product of per-row and per-column sums instead of
    keeping a plane-sized weight array: the same sums, every pixel, ragged edges included."""
    from napari_r2au.engine import _Tiling

    height, width = shape
    tiling = _Tiling.of(height, width, 128, 48, 16)
    summed = np.zeros(shape, np.float64)
    for y, x in tiling.windows:
        h, w = min(tiling.tile_h, height - y), min(tiling.tile_w, width - x)
        summed[y : y + h, x : x + w] += tiling.weight[:h, :w]
    rows, columns = tiling.weight_sums(height, width)
    np.testing.assert_allclose(np.outer(rows, columns), summed, rtol=1e-5)
    assert len(tiling.windows) > 1


def test_a_single_planes_result_is_its_blended_plane(tiny_net, rng):
    """No second plane-sized copy of a large image's probabilities (memory: the 8192x8192 row
    of python -m benchmarks)."""
    result = predict(tiny_net, rng.random((96, 160, 3)), tile_size=64, attention=True, precision="fp32")
    assert result.probabilities.base is not None and result.probabilities.base.shape == (1, 96, 160)
    assert all(alpha.base is not None for alpha in result.attention)


def test_dask_arrays_are_read_tile_by_tile(tiny_net, rng):
    da = pytest.importorskip("dask.array")
    image = rng.random((300, 260, 3)).astype(np.float32)
    lazy = da.from_array(image, chunks=(64, 64, 3))
    reads = []

    class Spy:
        shape, dtype, ndim = lazy.shape, lazy.dtype, lazy.ndim

        def __getitem__(self, index):
            reads.append(index)
            return lazy[index].compute()

    a = predict(tiny_net, Spy(), tile_size=128, precision="fp32").probabilities
    b = predict(tiny_net, image, tile_size=128, precision="fp32").probabilities
    np.testing.assert_allclose(a, b, atol=1e-5)
    # statistics from one strided read, then one read per tile; never the whole image at once
    tile_reads = [i for i in reads if all(s.step is None for s in i if isinstance(s, slice))]
    assert len(tile_reads) >= 4
    assert all((s[0].stop - s[0].start) <= 128 for s in tile_reads)


def test_progress_and_cancel(tiny_net, rng):
    image = rng.random((200, 200, 3)).astype(np.float32)
    events: list[Progress] = []
    predict(tiny_net, image, tile_size=64, batch_size=2, progress=events.append, precision="fp32")
    assert events[0].done == 0 and events[-1].done == events[-1].total > 1
    with pytest.raises(Cancelled):
        run(
            iter_predict(tiny_net, image, tile_size=64, batch_size=1, precision="fp32"),
            lambda event: event.done < 2,
        )


def test_threshold_and_multiclass(rng):
    from napari_r2au import create_model

    net = create_model("unet", out_channels=3, base_width=4).eval()
    result = predict(net, rng.random((32, 32, 3)), precision="fp32")
    assert result.probabilities.shape == (32, 32, 3)
    np.testing.assert_allclose(result.probabilities.sum(-1), 1, atol=1e-5)
    assert result.mask().max() <= 2


def test_scale_resizes_and_restores(tiny_net, rng):
    result = predict(tiny_net, rng.random((80, 100, 3)), scale=0.5, attention=True, precision="fp32")
    assert result.probabilities.shape == (80, 100) and result.attention[0].shape == (80, 100)


def test_bad_inputs_raise_clear_errors(tiny_net):
    with pytest.raises(ValueError, match="cannot tell the axes"):
        predict(tiny_net, np.zeros((2, 3, 4, 5, 6)))
    with pytest.raises(ValueError, match="channels but the model expects"):
        predict(tiny_net, np.zeros((20, 20, 2)), axes="YXC")
    with pytest.raises(TypeError, match="model must be"):
        predict(object(), np.zeros((20, 20)))


def test_multiscale_uses_full_resolution(tiny_net, rng):
    image = rng.random((64, 64, 3)).astype(np.float32)
    pyramid = [image, image[::2, ::2]]
    a = predict(tiny_net, pyramid, precision="fp32").probabilities
    np.testing.assert_allclose(a, predict(tiny_net, image, precision="fp32").probabilities)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_values_are_a_clear_error(tiny_net, bad):
    image = np.ones((32, 32), np.float32)
    image[3, 4] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        predict(tiny_net, image)


def test_bool_and_empty_images(tiny_net):
    assert predict(tiny_net, np.eye(24, dtype=bool), precision="fp32").probabilities.shape == (24, 24)
    with pytest.raises(ValueError):
        predict(tiny_net, np.zeros((0, 10)))


def test_model_postprocess_is_applied_on_request(tiny_net):
    from napari_r2au.engine import Prediction

    prob = np.zeros((20, 20), np.float32)
    prob[2:12, 2:12] = 0.9
    prob[5, 5] = 0.1  # a hole
    prob[16:18, 16:18] = 0.9  # a second, smaller blob
    pred = Prediction(prob, postprocess=["largest_component", "fill_holes"])
    mask = pred.mask()
    assert mask[5, 5] == 1 and mask[16, 16] == 0 and mask.sum() == 100
    assert pred.mask(postprocess=[]).sum() == 100 - 1 + 4


def _model_with_pixel_size(tmp_path, pixel_size, unit):
    import torch

    from napari_r2au import create_model
    from napari_r2au.model_files import build_metadata, load_model, save_model

    torch.manual_seed(0)
    meta = build_metadata(
        name="px",
        architecture="unet",
        arch_args={"base_width": 4},
        pixel_size=pixel_size,
        pixel_size_unit=unit,
        input_scale=0.8,
    )
    return load_model(save_model(create_model("unet", base_width=4), tmp_path, meta))


def test_pixel_size_sets_the_scale_and_an_explicit_scale_wins(tmp_path, rng):
    from napari_r2au.engine import working_scale

    model = _model_with_pixel_size(tmp_path, 0.5, "mm")
    assert working_scale(model) == 0.8  # nothing known about the image: the model's input_scale
    assert working_scale(model, pixel_size=0.25) == pytest.approx(0.5)  # same unit assumed
    assert working_scale(model, pixel_size=250, pixel_size_unit="um") == pytest.approx(0.5)
    assert working_scale(model, pixel_size=1.0, pixel_size_unit="millimeter") == pytest.approx(2.0)
    assert working_scale(model, scale=1.0, pixel_size=0.25) == 1.0
    with pytest.raises(ValueError, match=r"4000 mm against the model's 0.5 mm means resizing by 8000"):
        working_scale(model, pixel_size=4000)  # nm meant, no unit given: refused, not an 8000x resize
    with pytest.raises(ValueError, match="cannot convert"):
        working_scale(model, pixel_size=2.0, pixel_size_unit="second")
    image = rng.random((64, 48, 3)).astype(np.float32)
    by_pixel = predict(model, image, pixel_size=250, pixel_size_unit="um", precision="fp32")
    by_scale = predict(model, image, scale=0.5, precision="fp32")
    assert by_pixel.probabilities.shape == (64, 48)
    np.testing.assert_array_equal(by_pixel.probabilities, by_scale.probabilities)


def test_pixel_size_is_ignored_for_a_model_without_one(tiny_net):
    from napari_r2au.engine import working_scale

    assert working_scale(tiny_net, pixel_size=0.1, pixel_size_unit="mm") == 1.0


def test_stack_slices_are_reported_when_done_at_full_resolution(tiny_net, rng):
    stack = rng.random((3, 40, 36)).astype(np.float32)
    for scale in (1.0, 0.5):
        events = []
        result = run(
            iter_predict(tiny_net, stack, axes="ZYX", slices=[2, 0, 1], scale=scale, precision="fp32"),
            events.append,
        )
        done = [e for e in events if e.slice_index is not None]
        assert [e.slice_index for e in done] == [2, 0, 1]
        for event in done:
            np.testing.assert_allclose(
                event.slice_probabilities, result.probabilities[event.slice_index], atol=1e-6
            )
    assert all(e.slice_index is None for e in run_events(tiny_net, stack[0]))  # 2D: no slice events


def run_events(net, image):
    events = []
    run(iter_predict(net, image, precision="fp32"), events.append)
    return events


def test_empty_image_is_named_on_the_rescaling_path_too(tiny_net):
    with pytest.raises(ValueError, match="empty"):
        predict(tiny_net, np.zeros((0, 12, 3)), scale=0.5)


def test_merge_slices_keeps_the_other_slices(tiny_net, rng):
    from napari_r2au.engine import merge_slices

    stack = rng.random((3, 32, 32)).astype(np.float32)
    earlier = predict(tiny_net, stack, axes="ZYX", attention=True)
    later = predict(tiny_net, stack[:, ::-1].copy(), axes="ZYX", slices=[1], attention=False)
    merged = merge_slices(earlier, later, [1])
    np.testing.assert_array_equal(merged.probabilities[[0, 2]], earlier.probabilities[[0, 2]])
    np.testing.assert_array_equal(merged.probabilities[1], later.probabilities[1])
    # the later run made no attention maps: slice 1's earlier maps are stale, so they are cleared
    assert len(merged.attention) == len(earlier.attention) > 0
    for before, after in zip(earlier.attention, merged.attention):
        np.testing.assert_array_equal(after[[0, 2]], before[[0, 2]])
        assert not after[1].any()
    with pytest.raises(ValueError, match="shapes"):
        merge_slices(earlier, predict(tiny_net, stack[:2], axes="ZYX"), [1])


class _PlanesOnly:
    """An array-like stack that records the Z planes read and refuses to be loaded whole."""

    def __init__(self, array: np.ndarray):
        self.array, self.shape, self.dtype, self.ndim = array, array.shape, array.dtype, array.ndim
        self.planes_read: set[int] = set()

    def __getitem__(self, index):
        z = index[0] if isinstance(index, tuple) else index
        self.planes_read.update([z] if isinstance(z, (int, np.integer)) else range(*z.indices(self.shape[0])))
        return self.array[index]

    def __array__(self, *args, **kwargs):
        raise AssertionError("the whole stack was loaded")


@pytest.mark.parametrize(
    "axes, shape", [("ZYX", (3, 40, 36)), ("ZYXC", (3, 40, 36, 3)), ("CZYX", (3, 3, 40, 36))]
)
@pytest.mark.parametrize("scale", [0.5, 1.5])
def test_a_rescaled_stack_is_resized_plane_by_plane_as_a_whole_volume_would_be(
    tiny_net, rng, axes, shape, scale
):
    """As skimage resizes a whole volume (anti-aliased when shrinking), there and back."""
    from skimage.transform import resize

    stack = rng.random(shape).astype(np.float32)
    small_shape = tuple(round(n * scale) if ax in "YX" else n for ax, n in zip(axes, shape))
    small = resize(stack, small_shape, order=1, preserve_range=True).astype(np.float32)
    expected = predict(tiny_net, small, axes=axes, precision="fp32", attention=True)
    result = predict(tiny_net, stack, axes=axes, scale=scale, precision="fp32", attention=True)
    plane = tuple(n for ax, n in zip(axes, shape) if ax in "YX")
    for z in range(3):
        back = resize(expected.probabilities[z], plane, order=1, preserve_range=True)
        np.testing.assert_allclose(result.probabilities[z], np.clip(back, 0, 1), atol=1e-5)
        for ours, theirs in zip(result.attention, expected.attention):
            np.testing.assert_allclose(
                ours[z], np.clip(resize(theirs[z], plane, order=1, preserve_range=True), 0, 1), atol=1e-5
            )


def test_a_rescaled_run_of_one_slice_reads_that_slice_and_the_statistics_sample_only(tiny_net, rng):
    # 5.2 M voxels at the working scale: the normalization statistics sample every 2nd plane
    stack = _PlanesOnly((rng.random((20, 1024, 1024)) * 255).astype(np.uint8))
    result = predict(tiny_net, stack, axes="ZYX", scale=0.5, slices=[5], precision="fp32")
    assert stack.planes_read == set(range(0, 20, 2)) | {5}
    assert result.probabilities.shape == (20, 1024, 1024)
    assert result.probabilities[5].any() and not np.delete(result.probabilities, 5, axis=0).any()
