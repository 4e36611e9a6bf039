"""The docks' garbage-collector policy (napari_r2au.widgets.stalls): the heap is frozen after a
dock's first run, and a layer that was alive then is still freed when it is removed."""

from __future__ import annotations

import gc
import subprocess
import sys
import weakref

import numpy as np
import pytest

from napari_r2au.widgets import stalls as heap


@pytest.fixture(autouse=True)
def _thawed():
    heap.thaw()
    yield
    heap.thaw()


def test_settling_pauses_the_collector_then_freezes_once(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((8, 8)), name="photo")
    assert gc.isenabled() and not heap.is_frozen()
    with heap.quiet_loading():
        assert not gc.isenabled()  # the burst of torch's import is not scanned again and again
    assert gc.isenabled() and heap.is_frozen() and gc.get_freeze_count() > 0
    with heap.quiet_loading():  # later runs: nothing paused, nothing frozen again
        assert gc.isenabled()
    with pytest.raises(RuntimeError), heap.quiet_loading():  # a failed load still restores it
        raise RuntimeError("model file broken")
    assert gc.isenabled()


def test_a_failed_first_run_still_restores_the_collector(make_napari_viewer):
    make_napari_viewer().add_image(np.zeros((8, 8)))
    with pytest.raises(RuntimeError), heap.quiet_loading():
        raise RuntimeError("model file broken")
    assert gc.isenabled() and heap.is_frozen()


def test_a_layer_alive_at_the_freeze_is_freed_when_removed(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((8, 8)), name="kept")
    viewer.add_image(np.ones((512, 512)), name="photo")
    later_free = weakref.ref(viewer.layers["photo"])
    heap.freeze()
    assert heap.is_frozen()
    young = viewer.add_labels(np.zeros((8, 8), np.uint8), name="mask")
    viewer.layers.remove(young)  # made after the freeze: the heap stays frozen
    del young
    assert heap.is_frozen()
    viewer.layers.remove("photo")  # alive at the freeze: thawed first, so napari's collection frees it
    assert not heap.is_frozen() and gc.get_freeze_count() == 0
    gc.collect()
    assert later_free() is None


def test_a_viewer_without_layers_is_not_frozen(make_napari_viewer):
    """Closing a viewer thaws the heap by removing its layers: one without any would keep
    its window frozen after it closed, so nothing is frozen then."""
    make_napari_viewer().add_image(np.zeros((8, 8)))
    make_napari_viewer()  # empty
    heap.freeze()
    assert not heap.is_frozen() and gc.get_freeze_count() == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the preload is for Linux's dlopen")
def test_torchs_library_is_opened_before_its_import_and_torch_still_works():
    """In a fresh interpreter (torch not imported yet): the library is mapped after the
    preload, and torch imported after it computes as usual."""
    code = (
        "import sys\n"
        "from napari_r2au.widgets.stalls import preload_torch_library\n"
        "preload_torch_library()\n"
        "assert 'torch' not in sys.modules\n"
        "maps = open('/proc/self/maps').read()\n"
        "assert 'libtorch_cpu.so' in maps, 'not opened'\n"
        "import torch\n"
        "print(float(torch.ones(3, 3).matmul(torch.ones(3, 1)).sum()))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "9.0"


def test_layers_added_without_selecting_leave_the_selection_and_its_events_alone(make_napari_viewer):
    from napari_r2au.widgets._common import adding_without_selecting, replace_layer

    viewer = make_napari_viewer()
    mask = viewer.add_labels(np.zeros((8, 8), np.uint8), name="mask")
    assert viewer.layers.selection.active is mask
    seen: list = []
    viewer.layers.selection.events.changed.connect(seen.append)
    viewer.layers.selection.events.active.connect(seen.append)
    with adding_without_selecting(viewer):
        viewer.add_image(np.zeros((8, 8)), name="map 1", visible=False)
    replace_layer(viewer, "image", "map 2", np.zeros((8, 8)), shown_if_new=False, selected_if_new=False)
    assert [layer.name for layer in viewer.layers] == ["mask", "map 1", "map 2"]
    assert viewer.layers.selection.active is mask and set(viewer.layers.selection) == {mask}
    assert seen == []  # the layer controls and buttons were never moved to the maps
    replace_layer(viewer, "image", "map 3", np.zeros((8, 8)))  # the default: napari's own
    assert viewer.layers.selection.active is viewer.layers["map 3"]


def test_two_docks_loading_at_once_keep_the_collector_paused_until_both_are_done(make_napari_viewer):
    make_napari_viewer().add_image(np.zeros((8, 8)))
    first, second = heap.quiet_loading(), heap.quiet_loading()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert not gc.isenabled() and not heap.is_frozen()  # the other dock is still loading
    second.__exit__(None, None, None)
    assert gc.isenabled() and heap.is_frozen()


def test_nothing_is_frozen_without_an_open_viewer():
    """A viewer closed while a dock's first load ran: no viewer is watched, so nothing
    could ever thaw what was frozen."""
    heap.freeze()
    assert not heap.is_frozen() and gc.get_freeze_count() == 0
