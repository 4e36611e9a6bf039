"""Pieces the three widgets share: the model picker, layer pickers and the worker plumbing.

napari and torch are imported inside functions: napari imports this module when it
builds a widget, and nothing here should load torch before a run starts.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import ComboBox, Container, FileEdit, Label, PushButton

from napari_r2au.mask_record import layer_record

if TYPE_CHECKING:
    import napari
    from superqt.utils import GeneratorWorker

LOAD_FROM_FILE = "Load from file…"
PLUGIN = "napari-r2au"


# -- notifications -------------------------------------------------------------------------


def notify_error(message: str) -> None:
    """An error notification in napari (and the log): the widget never raises into Qt."""
    from napari.utils.notifications import show_error

    show_error(message)


def notify_warning(message: str) -> None:
    from napari.utils.notifications import show_warning

    show_warning(message)


def notify_info(message: str) -> None:
    from napari.utils.notifications import show_info

    show_info(message)


def message_label() -> Label:
    """A Label for messages that wraps: a long path or description must not widen the dock."""
    label = Label(value="")
    label.native.setWordWrap(True)
    return label


# -- layers --------------------------------------------------------------------------------

#: the metadata key of the maps Segment makes (probability, attention, uncertainty)
RUN_KEY = "r2au_run"


def is_plugin_map(layer: Any) -> bool:
    """A map this plugin made from an image (a probability, attention or uncertainty
    layer), which is no image to segment or fine-tune on."""
    return bool(getattr(layer, "metadata", {}).get(RUN_KEY))


def layers_of(viewer: napari.viewer.Viewer, kind: str, inputs_only: bool = False) -> list[tuple[str, Any]]:
    """(name, layer) choices for a ComboBox: the viewer's layers of one type ("image",
    "labels"); ``inputs_only`` leaves out the maps Segment made."""
    import napari.layers

    cls = {"image": napari.layers.Image, "labels": napari.layers.Labels}[kind]
    return [
        (layer.name, layer)
        for layer in viewer.layers
        if isinstance(layer, cls) and not (inputs_only and is_plugin_map(layer))
    ]


#: the mask's colour: bright cyan stands out on red fundus photographs, brown skin and grey scans
MASK_COLOUR = (0.0, 1.0, 1.0, 1.0)


def mask_colormap(top_label: int) -> Any:
    """A colour map that shows a binary mask in :data:`MASK_COLOUR` (0 transparent); None
    for several classes, whose napari colour cycle tells them apart."""
    from napari.utils.colormaps import DirectLabelColormap

    if top_label > 1:
        return None
    # a label the user paints beyond 1 shows in magenta, not invisibly
    return DirectLabelColormap(
        color_dict={None: (1.0, 0.0, 1.0, 1.0), 0: (0.0, 0.0, 0.0, 0.0), 1: MASK_COLOUR}
    )


def layer_picker(
    viewer: napari.viewer.Viewer, kind: str, label: str, nullable: bool = False, inputs_only: bool = False
) -> ComboBox:
    """A ComboBox of the viewer's layers of one type (``inputs_only``: images to run a
    model on, not the maps a run made).

    Its choices are refreshed by the owning widget's ``reset_choices`` (napari calls it
    when layers are added, removed, renamed or moved; see :func:`follow_layers`).
    """
    return ComboBox(
        label=label, choices=lambda _widget: layers_of(viewer, kind, inputs_only), nullable=nullable
    )


def follow_layers(viewer: napari.viewer.Viewer, widget: Container) -> None:
    """Refresh ``widget``'s layer pickers when the layer list changes, docked or not.

    napari does this for docked widgets; connecting the bound method again is harmless
    (napari's events hold it weakly, so a closed widget is not kept alive).
    """
    events = viewer.layers.events
    for event in (events.inserted, events.removed, events.reordered):
        event.connect(widget.reset_choices)


@contextmanager
def adding_without_selecting(viewer: napari.viewer.Viewer) -> Iterator[None]:
    """Layers added in the block do not become the selected layer.

    napari selects every layer it adds, which moves the layer controls, restyles the layer
    buttons and redraws (a third or more of each hidden map layer's 0.1-0.3 s on the GUI
    thread, sampled during ``benchmarks.worklist_stall``), and leaves the user on a hidden map
    instead of the mask they paint on. The selection's events are held during the block and
    the selection is put back as it was before they are let go, so nothing that follows the
    selection sees a change.
    """
    selection = viewer.layers.selection
    selected, active = set(selection), selection.active
    with selection.events.blocker_all():
        try:
            yield
        finally:
            selection.clear(keep_current=True)  # the current layer (keyboard navigation) stays
            selection.update(layer for layer in selected if layer in viewer.layers)
            if active is not None and active in viewer.layers:
                selection.active = active


def replace_layer(
    viewer: napari.viewer.Viewer,
    kind: str,
    name: str,
    data: Any,
    *,
    shown_if_new: bool = True,
    selected_if_new: bool = True,
    **kwargs: Any,
) -> Any:
    """Update the layer called ``name`` in place if it has the right type, else add it
    (hidden unless ``shown_if_new``; not selected unless ``selected_if_new``: an updated
    layer keeps the visibility the user gave it).

    Re-running a widget refreshes its outputs instead of piling up copies.
    """
    import napari.layers

    cls = {"image": napari.layers.Image, "labels": napari.layers.Labels}[kind]
    if name in viewer.layers and isinstance(viewer.layers[name], cls):
        layer = viewer.layers[name]
        layer.data = data
        for key in ("scale", "translate", "metadata", "colormap", "opacity", "blending", "contrast_limits"):
            if key in kwargs and not _same(getattr(layer, key, None), kwargs[key]):
                setattr(layer, key, kwargs[key])  # each change re-checks the viewer's dims: only real ones
        return layer
    add = viewer.add_image if kind == "image" else viewer.add_labels
    if selected_if_new:
        return add(data, name=name, visible=shown_if_new, **kwargs)
    with adding_without_selecting(viewer):
        return add(data, name=name, visible=shown_if_new, **kwargs)


def _same(current: Any, wanted: Any) -> bool:
    """A layer property already at the wanted value (scale, translate, opacity, ...)."""
    if isinstance(wanted, (tuple, list)) and current is not None and not isinstance(current, str):
        try:
            return len(current) == len(wanted) and all(float(a) == float(b) for a, b in zip(current, wanted))
        except (TypeError, ValueError):
            return False
    if isinstance(wanted, (int, float, str)) and not isinstance(wanted, bool):
        try:
            return current == wanted
        except Exception:  # an array-valued property
            return False
    return False


# -- models --------------------------------------------------------------------------------


def confirm(parent: Any, title: str, question: str) -> bool:
    """A Yes/No question in a dialog (No is the default)."""
    from qtpy.QtWidgets import QMessageBox

    buttons = QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No
    answer = QMessageBox.question(parent, title, question, buttons, QMessageBox.StandardButton.No)
    return answer == QMessageBox.StandardButton.Yes


_PICKERS: weakref.WeakSet[ModelPicker] = weakref.WeakSet()


def refresh_model_pickers() -> None:
    """Re-read the model list in every live picker (after fine-tuning adds a model)."""
    for picker in list(_PICKERS):
        try:
            picker.refresh()
        except RuntimeError:  # its Qt widget is gone
            _PICKERS.discard(picker)


def read_model_metadata(path: str | Path) -> dict[str, Any]:
    """A model's JSON sidecar, validated, without loading weights (or torch)."""
    from napari_r2au.model_files import read_model_metadata as read

    return read(path)


def model_card(meta: dict[str, Any]) -> str:
    """A few lines that say what a model is for and how good it was on validation data."""
    prov = meta.get("provenance") or {}
    args = meta.get("arch_args") or {}
    width = f", width {args['base_width']}" if "base_width" in args else ""
    lines = [f"{meta.get('name', '?')}: {meta.get('architecture', '?')}{width}"]
    data = prov.get("data") or {}
    if data.get("kind") == "drive":
        trained = "DRIVE retinal vessels"
    elif data.get("kind") == "memory":
        trained = f"corrected masks ({', '.join(map(str, data.get('pairs', []))) or 'in memory'})"
    elif data.get("kind") == "sources" and isinstance(data.get("sources"), list):
        trained = ", ".join(str(src.get("name", "?")) for src in data["sources"] if isinstance(src, dict))
    elif data.get("kind"):
        trained = str(data.get("kind"))
    else:
        trained = "unknown"
    lines.append(f"Trained on: {trained}")
    parent = prov.get("parent") if isinstance(prov.get("parent"), dict) else None
    if parent and parent.get("name") == meta.get("name"):  # a bundled model trained on from its own weights
        lines.append(
            f"Training went on from an earlier {parent['name']} ({str(parent.get('sha256', ''))[:8]})"
        )
    elif parent:
        lines.append(f"Fine-tuned from: {parent.get('name', '?')}")
    if meta.get("description"):
        text = " ".join(str(meta["description"]).split())
        lines.append(text if len(text) <= 160 else text[:157].rstrip() + "…")
    f1 = (prov.get("validation_metrics") or {}).get("f1")
    after = prov.get("dice_after")
    score = after if after is not None else f1
    where = prov.get("validation_metrics_measured_at") if after is None else None
    lines.append(
        (f"Validation F1: {score:.3f}" + (f" (at {where})" if where else ""))
        if isinstance(score, (int, float))
        else "Validation F1: not recorded"
    )
    if meta.get("fov_diameter"):
        lines.append(f"Runs each photograph at a {meta['fov_diameter']} px field of view")
    scale = float(meta.get("input_scale", 1.0))
    # a fundus model's own scale is only its fall-back, for images without a field of view
    fallback = " where no field of view is found" if meta.get("fov_diameter") else ""
    lines.append(
        f"Channels: {meta.get('in_channels', '?')} in, {meta.get('out_channels', '?')} out"
        + (f"; images resized ×{scale:.3g}{fallback}" if abs(scale - 1) > 1e-6 else "")
    )
    return "\n".join(lines)


class ScrollingDock(Container):
    """A dock that scrolls instead of growing past a small screen (1366x768 with all three
    docks open). napari docks a magicgui widget's ``native``, which for a scrollable
    container is the inner widget, not its scroll area: here ``native`` is the scroll area,
    and ``content`` the widget that holds the layout. Subclasses pass ``scrollable=True``."""

    @property
    def native(self) -> Any:
        return self.root_native_widget

    @property
    def content(self) -> Any:
        """The widget with the dock's layout (inside the scroll area)."""
        return self._widget._mgui_get_native_widget()


class ModelPicker(Container):
    """Installed models (bundled and user) plus "Load from file…", with a short model card.

    Segment and Fine-tune use the same picker so that a fine-tuned model shows up in both.
    """

    def __init__(self, label: str = "Model", sample_source: Callable[[], Any] | None = None) -> None:
        """``sample_source``: the dock's image layer now, whose image a bioimage.io package's
        test tensors and cover are made from (a model that does not read fundus
        photographs has no other real image to take)."""
        self._sample_source = sample_source
        self._paths: dict[str, str] = {}  # name -> sidecar, filled by _names()
        self._user: set[str] = set()  # the names that are user models (removable)
        self._choice = ComboBox(label=label, choices=lambda _widget: self._names())
        self._file = FileEdit(label="Model file", mode="r", filter="*.json *.safetensors *.pt")
        self._card = message_label()
        self._remove = PushButton(
            text="Remove this model…",
            tooltip="Take this user model (e.g. a fine-tune you do not want) out of the "
            "lists; its files are kept in the models folder's removed/ folder",
        )
        self._export = PushButton(
            text="Export model…",
            tooltip="Save this model for other tools: ONNX (.onnx) or TorchScript (.pt), "
            "with a card (.json) saying how to feed it, or a bioimage.io package (.zip)",
        )
        self._exporter: Any = None  # the running export's worker
        super().__init__(
            widgets=[self._choice, self._file, self._card, self._remove, self._export], labels=True
        )
        self.margins = (0, 0, 0, 0)
        self._choice.changed.connect(self._update)
        self._file.changed.connect(self._update)
        self._remove.changed.connect(self.remove_chosen)
        self._export.changed.connect(lambda *_: self.export_chosen())
        _PICKERS.add(self)
        self._update()

    def _names(self) -> list[str]:
        from napari_r2au.model_files import DEFAULT_MODEL, list_models

        rows = list_models()
        self._paths = {row["name"]: row["path"] for row in reversed(rows)}  # bundled wins, like load_model
        bundled = {row["name"] for row in rows if row["source"] == "bundled"}
        self._user = {row["name"] for row in rows if row["source"] == "user"} - bundled
        names = list(dict.fromkeys(row["name"] for row in rows))
        # the default model first: it is what a dock starts with (not whichever sorts first)
        names.sort(key=lambda name: name != DEFAULT_MODEL)
        return [*names, LOAD_FROM_FILE]

    def remove_chosen(self, *_: Any) -> None:
        """Ask, then take the chosen user model out of every picker (its files are kept)."""
        from napari_r2au.model_files import ModelFileError, remove_model

        name = str(self._choice.value)
        if name not in self._user:
            return
        if not confirm(
            self.native,
            "Remove model",
            f"Remove {name} from the model lists?\n\nIts files move to the removed/ folder next to "
            "your models (move them back to restore it). Masks already exported keep its checksum.",
        ):
            return
        sidecar = Path(self._paths[name])
        try:
            target = remove_model(sidecar.stem, directory=sidecar.parent)
        except (ModelFileError, OSError) as exc:
            refresh_model_pickers()  # e.g. removed meanwhile from the command line
            notify_error(f"Could not remove {name}: {exc}")
            return
        refresh_model_pickers()
        notify_info(f"Removed {name}; its files are in {target}")

    def export_chosen(self, target: str | None = None) -> None:
        """Export the chosen model to ``target`` (asked for with a file dialog when None), in
        the format its extension names, in a worker; an existing file is refused, not replaced."""
        from napari_r2au.export import EXPORT_FORMATS as _EXPORT_FORMATS

        path = self.path
        if path is None or self._exporter is not None:
            return
        name = str(self._choice.value) if self._choice.value != LOAD_FROM_FILE else Path(path).stem
        if target is None:
            from qtpy.QtWidgets import QFileDialog

            filters = ";;".join(f"{fmt} (*{suffix})" for fmt, suffix in _EXPORT_FORMATS.items())
            target, _ = QFileDialog.getSaveFileName(
                self.native,
                f"Export {name}",
                str(Path.home() / f"{name}.onnx"),
                filters,
                options=QFileDialog.Option.DontConfirmOverwrite,  # refused below, never replaced
            )
            if not target:
                return
        by_suffix = {suffix: fmt for fmt, suffix in _EXPORT_FORMATS.items()}
        fmt = by_suffix.get(Path(target).suffix.lower())
        if fmt is None:
            notify_error(
                f"Export model: {Path(target).name}: name the file .onnx (ONNX), .pt (TorchScript) "
                "or .zip (a bioimage.io package)."
            )
            return
        if Path(target).exists() or Path(target).is_symlink():
            notify_error(f"Export model: {Path(target).name} exists already; choose another name.")
            return
        sample_layer = self._sample_source() if self._sample_source is not None else None
        try:  # read on the GUI thread: the layer's pixel size decides the scale the engine takes
            sample_pixel = layer_pixel_size(sample_layer)
        except ValueError:
            sample_pixel = (None, None)
        from napari.qt.threading import thread_worker

        @thread_worker(ignore_errors=True, start_thread=False)  # errors are said by the handler below
        def export() -> list[Path]:
            if fmt == "bioimageio":
                from napari_r2au.bioimageio import export_bioimageio

                sample = None if sample_layer is None else layer_plane(sample_layer)
                return [export_bioimageio(path, target, sample=sample, sample_pixel_size=sample_pixel)]
            from napari_r2au.export import export_network

            return export_network(path, target, fmt)

        def done(paths: list[Path]) -> None:
            if fmt == "bioimageio":
                notify_info(f"Exported {name} as a bioimage.io package: {paths[0]}")
                return
            notify_info(f"Exported {name} as {fmt}: {paths[0]} (how to use it: {paths[1].name})")

        def failed(exc: BaseException) -> None:
            notify_error(f"Export model: {describe_error(exc)}")

        def finished() -> None:
            self._exporter = None
            self._export.enabled = True

        worker = export()
        worker.returned.connect(done)
        worker.errored.connect(failed)
        worker.finished.connect(finished)
        self._exporter = worker
        self._export.enabled = False
        worker.start()

    @property
    def exporting(self) -> bool:
        return self._exporter is not None

    def refresh(self, select: str | None = None) -> None:
        """Re-read the installed models; keep the selection unless ``select`` names another."""
        current = self._choice.value
        self._choice.reset_choices()
        wanted = select if select is not None else current
        if wanted in self._choice.choices:
            self._choice.value = wanted
        self._update()

    def on_model_changed(self, callback: Callable[..., Any]) -> None:
        """Call ``callback`` when another model is chosen (not on the picker's other clicks)."""
        self._choice.changed.connect(callback)
        self._file.changed.connect(callback)

    @property
    def path(self) -> str | None:
        """The chosen model's JSON sidecar (or weights file), or None."""
        if self._choice.value == LOAD_FROM_FILE:
            value = self._file.value
            return str(value) if value and Path(value).is_file() else None
        return self._paths.get(str(self._choice.value))

    def metadata(self) -> dict[str, Any] | None:
        """The chosen model's metadata, or None if there is none or it is unreadable."""
        path = self.path
        if path is None:
            return None
        try:
            return read_model_metadata(path)
        except (ValueError, OSError, json.JSONDecodeError):
            return None

    def _update(self, *_: Any) -> None:
        self._file.visible = self._choice.value == LOAD_FROM_FILE
        self._remove.visible = self._choice.value in self._user
        self._export.visible = self.path is not None
        if self._choice.value == LOAD_FROM_FILE and self.path is None:
            self._card.value = "Choose a model file (.json next to its weights)."
            return
        path = self.path
        if path is None:
            self._card.value = "No model installed: load one from a file or train one (r2au train)."
            return
        try:
            self._card.value = model_card(read_model_metadata(path))
        except (ValueError, OSError) as exc:
            self._card.value = f"Cannot read this model: {exc}"


# -- workers -------------------------------------------------------------------------------


class JobError(Exception):
    """A failure inside a worker, re-raised as a type superqt reports through ``errored``.

    superqt takes a RuntimeError from a generator for a deleted worker and then emits
    neither ``errored`` nor ``finished``; torch raises RuntimeError for most failures.
    """


def start_worker(
    job: Generator[Any, None, Any],
    *,
    on_yield: Callable[[Any], Any],
    on_return: Callable[[Any], Any],
    on_error: Callable[[BaseException], Any],
    on_finish: Callable[[], Any],
    owner: Container | None = None,
) -> GeneratorWorker:
    """Run a progress generator in a napari thread worker; cancel with ``worker.quit()``.

    ``quit`` stops at the next yield, and the generator is then closed (its ``finally``
    blocks run), so a cancelled run leaves nothing half-written. When ``owner``'s Qt
    widget is destroyed (the viewer closes mid-run), the run is cancelled and no callback
    touches the deleted widgets.
    """
    from napari.qt.threading import thread_worker

    @thread_worker(ignore_errors=True, start_thread=False)
    def work() -> Generator[Any, None, Any]:
        try:
            return (yield from job)
        except RuntimeError as exc:
            raise JobError(str(exc) or type(exc).__name__) from exc

    worker = work()
    alive = [True]

    def guarded(callback: Callable[..., Any]) -> Callable[..., Any]:
        return lambda *args: callback(*args) if alive[0] else None

    if owner is not None:

        def owner_gone(*_: Any) -> None:
            alive[0] = False
            worker.quit()

        owner.native.destroyed.connect(owner_gone)
    worker.yielded.connect(guarded(on_yield))
    worker.returned.connect(guarded(on_return))
    worker.errored.connect(guarded(on_error))
    worker.aborted.connect(job.close)
    worker.finished.connect(guarded(on_finish))
    worker.start()
    return worker


class WorkerRunner:
    """One run at a time in a thread worker, with Cancel: shared by Segment and Fine-tune.

    The widget provides ``_on_progress``, ``_on_result``, ``_on_error``, ``_on_finish``
    (which sets ``_worker`` back to None) and a ``_status`` label.
    """

    _worker: GeneratorWorker | None = None
    _cancelled: bool = False

    @property
    def running(self) -> bool:
        return self._worker is not None

    def _start(self, job: Generator[Any, None, Any]) -> None:
        self._cancelled = False
        self._worker = start_worker(
            job,
            on_yield=self._on_progress,
            on_return=self._on_result,
            on_error=self._on_error,
            on_finish=self._on_finish,
            owner=self,
        )

    def cancel(self, *_: Any) -> None:
        """Ask the worker to stop at its next progress step (nothing half-written)."""
        if self._worker is not None:
            self._cancelled = True
            self._status.value = "Cancelling…"
            self._worker.quit()


def layer_plane(layer: Any) -> np.ndarray:
    """One 2D plane of an image layer (a stack's middle slice; colour kept), read in full
    resolution: what a bioimage.io package's test image is cut from."""
    data = layer.data[0] if layer.multiscale else layer.data
    leading = data.shape[: data.ndim - (3 if layer.rgb else 2)]
    return np.asarray(data[tuple(n // 2 for n in leading)])


def layer_pixel_size(layer: Any) -> tuple[float | None, str | None]:
    """A layer's in-plane pixel size and unit, if it has one set (see io.pixel_size_of)."""
    from napari_r2au.io import pixel_size_of

    if layer is None:
        return None, None
    return pixel_size_of(tuple(layer.scale), tuple(getattr(layer, "units", None) or ()), f"'{layer.name}'")


def describe_error(exc: BaseException) -> str:
    """The reason of a failure in one line, without a traceback."""
    cause = exc.__cause__ if isinstance(exc, JobError) and exc.__cause__ is not None else exc
    text = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
    return f"{type(cause).__name__}: {text}" if text else type(cause).__name__


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def mask_before_corrections(viewer: Any, labels_layer: Any) -> Callable[[], Any] | None:
    """How to get the mask Segment made, before the user's corrections: kept with the layer
    when a new Segment run renamed it, or rebuilt from the probability layer of the run
    that made it (call it in a worker: it thresholds and cleans a whole stack; it returns
    None when the rebuild does not match the recorded checksum). None: nothing to go on."""
    import functools

    if labels_layer is None:
        return None
    kept = labels_layer.metadata.get("r2au_before")
    if kept is not None and kept.shape == labels_layer.data.shape:
        return lambda: kept
    record = layer_record(labels_layer.metadata)
    name = record.get("probability_layer")
    if not name or name not in viewer.layers:
        return None
    layer = viewer.layers[name]
    if layer.metadata.get("r2au_run") != record.get("run_id") or layer.data.shape != labels_layer.data.shape:
        return None
    from napari_r2au.postprocess import rebuild_segment_mask

    return functools.partial(rebuild_segment_mask, layer.data, record)
