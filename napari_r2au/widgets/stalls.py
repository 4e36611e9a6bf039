"""What docks do so that their workers do not stall napari's GUI thread: the one place
that touches the process's garbage collector and warms what napari and torch load lazily.

Measured with a 10 ms heartbeat and ``gc.callbacks`` on the GUI thread during
``benchmarks.segment_stall`` on this project's 2-core machine, three things in a dock's
first run held the interpreter lock long enough to freeze napari (no repaint, no click):

- Loading torch's C++ library (``libtorch_cpu.so``): 0.16 s, because Python holds the lock
  while it opens an extension module and its libraries. Opened first through ``dlopen``
  called as a foreign function (ctypes lets the lock go during such calls), the library's
  own start-up runs without the lock, and torch's import finds it loaded.
- Full garbage collections. Each scans every object the collector tracks: with napari, Qt,
  vispy and torch loaded that is about 400,000 objects and 0.12-0.2 s. One was triggered by
  the burst of objects torch's import makes, and napari runs one whenever a layer is
  removed. So the first run's loading runs with automatic collection paused, and then
  everything alive moves into the collector's permanent generation (``gc.freeze``), once
  per process: later collections scan only what was made after. Frozen objects are still
  freed when nothing refers to them; only reference cycles among them wait. The cycles that
  hold memory are napari layers and their data, so before a layer that was alive at the
  freeze is removed from any viewer, everything is thawed (``gc.unfreeze``) and napari's
  collection that follows the removal reclaims it; the next dock run freezes again. A
  viewer closed with ``Viewer.close()`` removes its layers; the heap is not frozen while no
  viewer, or some viewer without layers, is open. A window closed by its close button keeps
  its layers in napari 0.9: what was frozen with them stays until another frozen layer is
  removed (a known gap).
- napari's lazy imports when it makes the first Labels layer (:func:`warm_layer_imports`).
"""

from __future__ import annotations

import gc
import os
import sys
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

# reentrant: a removal's handler takes it and thaws; it also waits while a worker freezes, so
# that a layer removed during the freeze is seen as frozen and thawed
_lock = threading.RLock()
#: dock workers inside their first loading now; the collector is paused while any is
_loading = 0
_was_enabled = True
#: layers that were alive (in some viewer) when the heap was frozen; empty when nothing is
_frozen_layers: weakref.WeakSet[Any] = weakref.WeakSet()
_frozen = False
#: viewers whose layer removals are watched (a removal of a frozen layer thaws the heap)
_watched: weakref.WeakSet[Any] = weakref.WeakSet()


def is_frozen() -> bool:
    """Whether the objects alive at a dock's first run are in the permanent generation."""
    return _frozen


@contextmanager
def quiet_loading() -> Iterator[None]:
    """Run a dock worker's loading (torch's import, a model) so that it does not stall the GUI
    thread: the first time, with torch's library opened without the interpreter lock,
    napari's lazy imports done and the collector paused, and the heap frozen after (when the
    last of the docks loading at once is done). Later runs pass straight through."""
    global _loading, _was_enabled
    with _lock:
        first = not _frozen
        if first:
            if _loading == 0:
                _was_enabled = gc.isenabled()
                gc.disable()
            _loading += 1
    if first:
        preload_torch_library()
        warm_layer_imports()
    try:
        yield
    finally:
        if first:
            with _lock:
                _loading -= 1
                last = _loading == 0
                try:
                    if last:
                        # not collected first: with the collector paused, the whole load is in its
                        # youngest generation and scanning it would stall the GUI as before; what
                        # garbage the load left is frozen with it, once per process
                        freeze()
                finally:  # whatever happened, the collector runs again as it did before
                    if last and _was_enabled:
                        gc.enable()


def preload_torch_library() -> None:
    """Open torch's C++ library through ``dlopen`` called as a foreign function, which runs
    without the interpreter lock (Linux; elsewhere, or if anything is missing, nothing)."""
    if not sys.platform.startswith("linux") or "torch" in sys.modules:
        return
    import ctypes
    import importlib.util

    try:
        spec = importlib.util.find_spec("torch")
        folders = list(spec.submodule_search_locations or []) if spec is not None else []
        library = os.path.join(folders[0], "lib", "libtorch_cpu.so") if folders else ""
        if not os.path.isfile(library):
            return
        dlopen = ctypes.CDLL(None).dlopen
        dlopen.restype, dlopen.argtypes = ctypes.c_void_p, [ctypes.c_char_p, ctypes.c_int]
        # RTLD_NOW without RTLD_GLOBAL: as torch's own import opens it (a dependency of torch._C)
        dlopen(os.fsencode(library), os.RTLD_NOW)
    except (OSError, AttributeError, ValueError, ImportError):
        return  # only a warm-up: torch's import opens the library itself


def warm_layer_imports() -> None:
    """Do in a worker thread, once, what napari does lazily when it makes the first Labels
    layer, which would otherwise stall the GUI thread as the mask appears (cProfile of
    Segment's first result): import pandas, for the layer's features (half a second), and
    scikit-image's colour conversions, for its colours (70-80 ms, with scipy.linalg); and
    fill vispy's cache of dash patterns, which the layer's polygon tool draws with (about
    70 ms). Later calls cost nothing: imports and the cache are done."""
    import pandas  # noqa: F401
    import skimage.color.colorconv  # noqa: F401  (skimage.color alone is a lazy module)

    try:  # a vispy internal: without it the first mask is only slower to appear
        from vispy.visuals.line.dash_atlas import DashAtlas
    except ImportError:
        return
    DashAtlas()  # its patterns are cached per process (functools.lru_cache)


def freeze() -> None:
    """Move every tracked object into the permanent generation, and remember the layers
    alive now, in every viewer, so that removing one of them thaws the heap first."""
    import napari

    global _frozen
    with _lock:
        instances = getattr(napari.Viewer, "_instances", None)  # napari's record of open viewers
        if instances is None:  # another napari: without every viewer's layers, nothing is frozen
            return
        viewers = list(instances)
        if not viewers or not all(len(viewer.layers) for viewer in viewers):
            # a viewer is closed by removing its layers, which thaws the heap: one without
            # layers would stay frozen, with its window, after it closed
            return
        layers = [layer for viewer in viewers for layer in list(viewer.layers)]
        for viewer in viewers:
            _watch(viewer)
        gc.freeze()
        _frozen_layers.clear()
        _frozen_layers.update(layers)
        _frozen = True


def thaw() -> None:
    """Give the frozen objects back to the collector (its next full collection sees them)."""
    global _frozen
    with _lock:
        gc.unfreeze()
        _frozen_layers.clear()
        _frozen = False


def _watch(viewer: Any) -> None:
    if viewer in _watched:
        return
    _watched.add(viewer)
    layers = viewer.layers

    def removing(event: Any) -> None:
        try:
            layer = layers[event.index]
        except (IndexError, TypeError):  # an index napari did not give: thaw to be safe
            layer = None
        with _lock:  # a freeze under way in a worker ends first, so this layer counts as frozen
            if _frozen and (layer is None or layer in _frozen_layers):
                thaw()

    layers.events.removing.connect(removing)
