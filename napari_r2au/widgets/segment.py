"""The Segment widget: run a model on an image layer, then tune the mask without re-running.

The network runs in a napari thread worker driven by the engine's progress generator;
the probabilities are kept, so the threshold slider and the clean-up options only
redo cheap NumPy work on the GUI thread.
"""

from __future__ import annotations

import datetime as _dt
import re
import time
import uuid
import weakref
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FloatSlider,
    FloatSpinBox,
    ProgressBar,
    PushButton,
    SpinBox,
)

from napari_r2au.backends import INTERACTIVE_BACKENDS
from napari_r2au.mask_record import checksums, edited, layer_record, segment_record, with_record

from ._common import (
    RUN_KEY,
    ModelPicker,
    ScrollingDock,
    WorkerRunner,
    describe_error,
    follow_layers,
    format_seconds,
    layer_picker,
    layer_pixel_size,
    mask_before_corrections,
    mask_colormap,
    message_label,
    notify_error,
    notify_info,
    notify_warning,
    replace_layer,
)
from .stalls import quiet_loading

if TYPE_CHECKING:
    import napari
    from superqt.utils import GeneratorWorker

    from napari_r2au.engine import Prediction, Progress
    from napari_r2au.model_files import LoadedModel

WHOLE_IMAGE = "Whole image"
CURRENT_SLICE = "Current slice"

_LIVE: weakref.WeakSet[SegmentWidget] = weakref.WeakSet()


def segment_widgets(viewer: napari.viewer.Viewer) -> list[SegmentWidget]:
    """The Segment widgets of one viewer (the Fine-tune widget hands its new model to them)."""
    target = getattr(viewer, "__wrapped__", viewer)  # napari passes widgets a proxy of the viewer
    return [w for w in list(_LIVE) if getattr(w._viewer, "__wrapped__", w._viewer) is target]


@dataclass
class SegmentOutput:
    """What a run returns to the GUI thread."""

    prediction: Prediction
    uncertainty: np.ndarray | None
    model_path: str
    scale: float  # the resize factor the network saw (the Fine-tune widget trains at it)
    #: the model's DICOM SEG codes for what it segments (None: generic)
    segment_property: dict[str, Any] | None = None
    #: the mask at the settings the run started with, and its checksums, made in the worker
    #: (hashing a large mask on the GUI thread stalled it); used while those settings hold
    first_mask: _FirstMask | None = None


@dataclass
class _FirstMask:
    """A run's mask at the threshold and clean-up it started with (cut in the worker)."""

    settings: tuple[float, tuple[tuple[str, Any], ...]]
    mask: np.ndarray
    checksums: dict[str, Any]


@dataclass
class _Notices:
    """What the user should know about this model on this image, found in the worker (the
    field-of-view search takes a tenth of a second on a large photograph) and said by the GUI."""

    lines: list[str]


#: up to this many mask pixels the mask follows the Threshold slider while it is dragged
LIVE_THRESHOLD_PIXELS = 4_000_000


@dataclass
class _RunContext:
    """What the GUI thread needs to place a run's outputs (captured when it starts)."""

    layer: Any
    scope: str
    slices: list[int] | None
    started: float = field(default_factory=time.perf_counter)
    live: Any = None  # a stack's probabilities, slice by slice while the run goes on


class SegmentWidget(WorkerRunner, ScrollingDock):
    """Segment an Image layer with an R2AU-Net model (probability, mask, attention, uncertainty)."""

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        self._viewer = viewer
        self._model = ModelPicker(sample_source=lambda: self._image.value)
        self._image = layer_picker(viewer, "image", "Image", inputs_only=True)
        self._scope = ComboBox(
            label="Scope",
            choices=[WHOLE_IMAGE, CURRENT_SLICE],
            value=WHOLE_IMAGE,
            tooltip="For stacks: every slice (the current one first) or only the current one",
        )
        self._attention = CheckBox(text="Attention maps", value=True)
        self._uncertainty = CheckBox(
            text="Uncertainty map (runs 3× on flipped copies)",
            value=False,
            tooltip="Also averages the three copies into the probability and mask, which is a little more accurate",
        )
        self._threshold = FloatSlider(
            label="Threshold",
            min=0.0,
            max=1.0,
            step=0.01,
            value=0.5,
            tooltip="Re-thresholds the kept probabilities at once; no new run",
        )
        _three_decimals(self._threshold)  # a model's 0.225 reads 0.225, not 0.23
        self._remove_small = CheckBox(text="Remove small objects", value=False)
        self._fill_holes = CheckBox(text="Fill small holes", value=False)
        self._min_size = SpinBox(label="Smaller than (px)", min=2, max=1_000_000, value=30)
        self._show_advanced = CheckBox(text="Advanced settings", value=False)
        self._tile = SpinBox(label="Tile size (0: auto)", min=0, max=8192, step=16, value=0)
        self._device = ComboBox(label="Device", choices=["auto", "cpu", "cuda"], value="auto")
        self._backend = ComboBox(
            label="Backend",
            choices=list(INTERACTIVE_BACKENDS),
            value="auto",
            tooltip="What runs the network: auto picks OpenVINO on the CPU where it is installed "
            "(the fast extra), else PyTorch; the mask's record names the one that ran",
        )
        self._scale = FloatSpinBox(
            label="Scale (0: auto)",
            min=0.0,
            max=8.0,
            step=0.05,
            value=0.0,
            tooltip="Resize factor before the network, so that structures have the size "
            "the model was trained at; outputs come back at full resolution. "
            "0 (auto): from the image's pixel size, or for fundus models from "
            "its field of view (shown here after a run), else the model's own",
        )
        self._scale.native.setSpecialValueText("auto")  # the value 0 shows as "auto", or the scale it gave
        self._advanced = Container(
            widgets=[self._tile, self._device, self._backend, self._scale], visible=False
        )
        self._run = PushButton(text="Segment")
        self._cancel = PushButton(text="Cancel", enabled=False)
        self._progress = ProgressBar(min=0, max=1, value=0)
        self._status = message_label()
        super().__init__(
            widgets=[
                self._model,
                self._image,
                self._scope,
                self._attention,
                self._uncertainty,
                self._threshold,
                self._remove_small,
                self._fill_holes,
                self._min_size,
                self._show_advanced,
                self._advanced,
                self._run,
                self._cancel,
                self._progress,
                self._status,
            ],
            scrollable=True,
        )  # docks scroll on a 768 px screen
        self._worker: GeneratorWorker | None = None
        self._context: _RunContext | None = None
        self._cancelled = False
        self._loaded: tuple[str, float, LoadedModel] | None = None  # (path, mtime, model)
        self._prediction: Prediction | None = None
        self._last_info: dict[str, Any] | None = None  # the record of the run self._prediction is from
        self._last_source: tuple[weakref.ref, int] | None = None  # (its image layer, id of the layer's data)
        self._mask_layer: Any = None
        self._warned_edited = False
        from qtpy.QtCore import QTimer

        self._map_generation = 0  # counts the results shown: a placing of maps stops when another begins
        self._next_map: Any = None
        self._map_timer = QTimer()  # places a first result's maps one per turn of the event loop
        self._map_timer.setSingleShot(True)
        self._map_timer.timeout.connect(lambda: self._next_map() if self._next_map else None)
        self.native.destroyed.connect(self._closing)

        self._model.on_model_changed(self._on_model_changed)
        self._show_advanced.changed.connect(lambda value: setattr(self._advanced, "visible", bool(value)))
        for widget in (self._threshold, self._remove_small, self._fill_holes, self._min_size):
            widget.changed.connect(self._apply_threshold)
        self._image.changed.connect(lambda _layer: self._scale.native.setSpecialValueText("auto"))
        self._run.changed.connect(self.run)
        self._cancel.changed.connect(self.cancel)
        follow_layers(viewer, self)
        self._on_model_changed()
        _LIVE.add(self)

    def _closing(self, *_: Any) -> None:
        """No map is placed in a closing viewer."""
        self._next_map = None
        self._map_generation += 1

    # -- public API (buttons, the Fine-tune widget, tests) ------------------------------------

    @property
    def prediction(self) -> Prediction | None:
        """The last run's prediction (its probabilities are what the threshold applies to)."""
        return self._prediction

    def select_model(self, name: str) -> None:
        """Refresh the model list and choose ``name`` in it."""
        self._model.refresh(select=name)

    def segment(self, layer: Any = None, model: str | None = None) -> None:
        """Run on ``layer`` (default: the chosen one) with ``model`` (default: the chosen one)."""
        if model is not None:
            self.select_model(model)
        if layer is not None:
            self._image.reset_choices()
            self._image.value = layer
        self.run()

    def run(self, *_: Any) -> None:
        """Start a run in a worker thread; problems with the inputs become notifications."""
        if self.segmenting:  # one run at a time: a second one is refused, never interleaved
            notify_warning("Segment: a run is in progress; wait for it or press Cancel.")
            return
        layer, path = self._image.value, self._model.path
        if layer is None:
            notify_error("Segment: add or choose an image layer first.")
            return
        if path is None:
            notify_error("Segment: choose a model (or a model file) first.")
            return
        try:
            axes, image = _network_input(layer)
        except ValueError as exc:
            notify_error(f"Segment: {exc}")
            return
        slices = None
        if "Z" in axes:
            n_z = image.shape[0]
            current = self._current_slice(layer, n_z)
            slices = (
                [current]
                if self._scope.value == CURRENT_SLICE
                else [current, *(z for z in range(n_z) if z != current)]
            )
        options = {
            "axes": axes,
            "slices": slices,
            "tile_size": self._tile.value or None,
            "device": None if self._device.value == "auto" else self._device.value,
            "backend": str(self._backend.value),
            "attention": bool(self._attention.value),
            "scale": self._scale.value or None,
        }
        try:
            options["pixel_size"], options["pixel_size_unit"] = layer_pixel_size(layer)
        except ValueError as exc:
            notify_error(f"Segment: {exc}")
            return
        self._context = _RunContext(layer, str(self._scope.value), slices)
        self._cancelled = False
        self._set_running(True, "Loading the model…")
        self._start(
            self._job(path, image, options, bool(self._uncertainty.value), self._mask_settings(), layer.name)
        )

    # -- the work (runs in the worker thread: no Qt here) -------------------------------------

    def _job(
        self,
        path: str,
        image: Any,
        options: dict[str, Any],
        uncertainty: bool,
        settings: tuple[float, tuple[tuple[str, Any], ...]],
        layer_name: str,
    ) -> Generator[Progress | _Notices, None, SegmentOutput]:
        from napari_r2au.checks import input_notices
        from napari_r2au.engine import iter_predict
        from napari_r2au.uncertainty import iter_predict_tta

        with quiet_loading():  # torch and the model, loaded without stalling napari (widgets.stalls)
            model = self._load(path)
        try:  # said before the run; nothing is refused here (the engine says what is wrong)
            notices = input_notices(model, image, options["axes"])
        except ValueError:
            notices = []
        if notices:
            yield _Notices([f"Segment on '{layer_name}': {notice}" for notice in notices])
        # the engine resolves the scale (the Scale field wins; then the layer's pixel size against
        # the model's; then the image's field of view, for fundus models; then the model's own)
        # and the prediction says which it used
        if uncertainty:
            prediction = yield from iter_predict_tta(model, image, **options)
        else:
            prediction = yield from iter_predict(model, image, **options)
        mask = _cut_mask(prediction, *settings)
        return SegmentOutput(
            prediction,
            prediction.uncertainty,
            path,
            prediction.scale,
            model.metadata.get("segment_property"),
            first_mask=_FirstMask(settings, mask, checksums(mask)),
        )

    def _load(self, path: str) -> LoadedModel:
        """Load a model once per file version (the picker only has paths)."""
        import os

        from napari_r2au.model_files import load_model

        mtime = os.stat(path).st_mtime
        if self._loaded is None or self._loaded[:2] != (path, mtime):
            self._loaded = (path, mtime, load_model(path))
        return self._loaded[2]

    # -- worker callbacks (GUI thread) --------------------------------------------------------

    def _on_progress(self, event: Progress | _Notices) -> None:
        if isinstance(event, _Notices):
            for line in event.lines:
                notify_warning(line)
            return
        self._progress.max = max(1, event.total)
        self._progress.value = min(event.done, event.total)
        what = "Uncertainty" if event.stage == "uncertainty" else "Predicting"
        text = f"{what}: {event.done}/{event.total}"
        if self._context is not None and event.done:
            elapsed = time.perf_counter() - self._context.started
            text += f" · ETA {format_seconds(elapsed / event.done * (event.total - event.done))}"
        self._status.value = text
        context = self._context
        if event.slice_probabilities is not None and context is not None and len(context.slices or ()) > 1:
            self._show_slice(context, int(event.slice_index), event.slice_probabilities)

    def _show_slice(self, context: _RunContext, z: int, probabilities: np.ndarray) -> None:
        """Show a finished slice of a stack at once, in a temporary layer the run's end removes."""
        if probabilities.ndim == 3:  # multi-class: "any foreground class", as the final layer shows
            probabilities = probabilities[..., 1:].sum(-1)
        if context.live is None or context.live not in self._viewer.layers:
            data = context.layer.data[0] if context.layer.multiscale else context.layer.data
            context.live = self._viewer.add_image(
                np.zeros((data.shape[0], *probabilities.shape), np.float32),
                name=f"{context.layer.name} probability (running)",
                colormap="magma",
                contrast_limits=(0.0, 1.0),
                scale=tuple(context.layer.scale),
                translate=tuple(context.layer.translate),
                metadata={RUN_KEY: "running"},
            )
        context.live.data[z] = probabilities
        context.live.refresh()

    def _remove_live_layer(self) -> None:
        context = self._context
        if context is not None and context.live is not None and context.live in self._viewer.layers:
            self._viewer.layers.remove(context.live)

    def _on_result(self, output: SegmentOutput) -> None:
        context = self._context
        if context is None:
            return
        try:
            self._show(output, context)
        except Exception as exc:  # a layer was removed meanwhile, shapes changed...
            notify_error(f"Segment: could not show the result: {describe_error(exc)}")

    def _on_error(self, exc: BaseException) -> None:
        reason = describe_error(exc)
        self._status.value = f"Failed: {reason}"
        notify_error(f"Segmentation failed: {reason}")

    def _on_finish(self) -> None:
        self._worker = None
        self._remove_live_layer()
        if self._cancelled:
            self._status.value = "Cancelled; the layers were not changed."
        self._set_running(False)

    # -- outputs ------------------------------------------------------------------------------

    def _earlier_run(self, context: _RunContext, prediction: Prediction) -> dict[str, Any] | None:
        """The record of the last run on the same stack when this run covered only some of
        its slices (its results on the other slices are kept), else None.

        "The same stack": the same layer object holding the same array, with that run's
        probability layer still shown (deleting it starts afresh).
        """
        earlier, info, source = self._prediction, self._last_info, self._last_source
        if context.slices is None or earlier is None or info is None or source is None:
            return None
        if source[0]() is not context.layer or source[1] != id(context.layer.data):
            return None
        shown = info.get("probability_layer")
        if shown not in self._viewer.layers or self._viewer.layers[shown].metadata.get(
            "r2au_run"
        ) != info.get("run_id"):
            return None
        if len(context.slices) >= prediction.probabilities.shape[0]:
            return None
        return info if earlier.probabilities.shape == prediction.probabilities.shape else None

    def _with_earlier_slices(
        self,
        context: _RunContext,
        prediction: Prediction,
        run: dict[str, Any],
        uncertainty: np.ndarray | None,
    ) -> tuple[Prediction, list[dict[str, Any]], np.ndarray | None]:
        """This run's prediction, run records and uncertainty map, with the earlier run's
        results on the slices this run did not cover (see _earlier_run)."""
        from napari_r2au.engine import merge_slices, overlay_slices

        earlier = self._earlier_run(context, prediction)
        if earlier is None:
            return prediction, [run], uncertainty
        assert self._prediction is not None and context.slices is not None
        redone = set(context.slices)
        runs = []
        for old in earlier.get("runs") or []:  # what each earlier run still accounts for
            kept = [z for z in old.get("slices") or [] if z not in redone]
            if kept:
                runs.append(dict(old, slices=kept))
        name = earlier.get("uncertainty_layer")
        if name in self._viewer.layers:  # (napari's LayerList has no .get)
            shown = self._viewer.layers[name]
            if (
                shown.metadata.get("r2au_run") == earlier.get("run_id")
                and shown.data.shape == prediction.probabilities.shape[:3]
            ):
                uncertainty = overlay_slices(shown.data, uncertainty, context.slices, shown.data.shape)
        return merge_slices(self._prediction, prediction, context.slices), [*runs, run], uncertainty

    def _show(self, output: SegmentOutput, context: _RunContext) -> None:
        prediction, layer = output.prediction, context.layer
        run = {
            "model": prediction.model_name,
            "model_sha256": prediction.model_sha256,
            "scale": output.scale,
            "flip_averaged": output.uncertainty is not None,
            "threshold": None if prediction.multiclass else float(self._threshold.value),
            "slices": None if context.slices is None else sorted(context.slices),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        prediction, runs, uncertainty = self._with_earlier_slices(
            context, prediction, run, output.uncertainty
        )
        self._warned_edited = False
        place = {"scale": tuple(layer.scale), "translate": tuple(layer.translate)}
        # the maps carry the id of the run that made them, so that Review exports a mask's own maps
        run_id = uuid.uuid4().hex
        maps = dict(place, metadata={RUN_KEY: run_id})
        base = layer.name
        probability = prediction.probabilities
        if (
            prediction.multiclass
        ):  # show "any foreground class" (0 where not segmented); the mask is the arg-max
            probability = probability[..., 1:].sum(-1)
        # an edited mask is kept under another name (with the mask it was edited from, while
        # the probabilities it was made from are still there), before this run's layers replace them
        kept = _keep_edited_mask(self._viewer, f"{base} mask", f"{base} corrected")
        steps = self._map_steps(base, probability, prediction, uncertainty, maps)
        prob_name = steps[0][0]
        attention_names = [name for name, _, _ in steps if " attention " in name[len(base) :]]
        uncertainty_name = f"{base} uncertainty" if uncertainty is not None else None
        self._map_generation += 1  # a placing of an earlier run's maps stops here
        first = output.first_mask
        if first is not None and prediction is output.prediction and first.settings == self._mask_settings():
            mask, sums = first.mask, first.checksums  # cut and hashed in the worker
        else:  # merged with earlier slices, or the slider moved during the run
            mask, sums = self._mask(prediction), None
        info = segment_record(
            prediction,
            mask,
            threshold=float(self._threshold.value),
            cleanup=self._cleanup_settings(),
            model_path=output.model_path,
            # with the uncertainty map the probabilities are the mean of 3 flipped copies
            flip_averaged=output.uncertainty is not None,
            scale=output.scale,
            image_layer=base,
            probability_layer=prob_name,
            attention_layers=attention_names,
            uncertainty_layer=uncertainty_name,
            scope=context.scope,
            # a stack's slices that hold results (by this run or, for the others, earlier runs)
            slices=None if context.slices is None else sorted({z for r in runs for z in r["slices"]}),
            runs=runs,
            created=run["created"],
            run_id=run_id,
            mask_checksums=sums,
        )
        sources = (layer.metadata.get("dicom") or {}).get("sources")
        if sources:  # what a DICOM SEG export of this mask refers to, and what it shows
            info["dicom"] = {"sources": sources}
            info["segment_property"] = output.segment_property
        new_mask = f"{base} mask" not in self._viewer.layers
        # napari's first label colour is a dark red, unreadable on a fundus; given to the new
        # layer as it is made (set afterwards, napari would colour the layer twice)
        colours = mask_colormap(int(mask.max())) if new_mask else None
        self._mask_layer = replace_layer(
            self._viewer,
            "labels",
            f"{base} mask",
            mask,
            metadata=with_record({}, info),
            **place,
            **({} if colours is None else {"colormap": colours}),
        )
        self._place_maps(base, steps, new_mask)
        # the kept prediction, its record and its source change together, once every layer is placed
        self._prediction, self._last_info = prediction, info
        self._last_source = (weakref.ref(layer), id(layer.data))
        # re-thresholding a large stack takes about half a second (checksums, clean-up): follow the
        # slider only when it is released, so that dragging does not queue up dozens of updates
        self._threshold.tracking = mask.size <= LIVE_THRESHOLD_PIXELS
        seconds = time.perf_counter() - context.started
        share = 100.0 * float(np.count_nonzero(mask)) / max(1, mask.size)
        at_scale = "" if abs(output.scale - 1.0) < 1e-6 else f" at scale {output.scale:.3g}"
        if not self._scale.value:  # auto: the field shows the scale it came to for this image
            self._scale.native.setSpecialValueText(f"auto ({output.scale:.3g})")
        ran = {"openvino": "OpenVINO", "torch": "PyTorch", "torch-compile": "torch.compile"}.get(
            prediction.backend, prediction.backend
        )
        self._status.value = (
            f"Done in {format_seconds(seconds)} with {prediction.model_name}{at_scale} "
            f"({ran} {prediction.precision}): {share:.1f}% foreground."
        )
        if kept is not None:
            notify_info(
                f"'{base} mask' had been edited by hand: the edits are kept in '{kept}', "
                f"the new mask is '{base} mask'."
            )

    def _map_steps(
        self,
        base: str,
        probability: np.ndarray,
        prediction: Prediction,
        uncertainty: Any,
        maps: dict[str, Any],
    ) -> list[tuple[str, Any, dict[str, Any]]]:
        """The run's probability, attention and uncertainty layers to place: (name, data,
        properties). New ones are added hidden, a click away (a layer the user has shown
        again keeps its visibility on the next run)."""
        steps = [
            (
                f"{base} probability",
                probability,
                dict(colormap="magma", contrast_limits=(0.0, 1.0), **maps),
            )
        ]
        for index, alpha in enumerate(prediction.attention):
            steps.append(
                (
                    f"{base} attention {index + 1}",
                    alpha,
                    dict(
                        colormap="turbo", blending="additive", opacity=0.5, contrast_limits=(0.0, 1.0), **maps
                    ),
                )
            )
        if uncertainty is not None:
            top = float(uncertainty.max()) or 1.0
            steps.append(
                (
                    f"{base} uncertainty",
                    uncertainty,
                    dict(
                        colormap="inferno",
                        blending="additive",
                        opacity=0.7,
                        contrast_limits=(0.0, top),
                        **maps,
                    ),
                )
            )
        return steps

    def _place_map(self, name: str, data: Any, props: dict[str, Any]) -> None:
        """One map layer, updated in place or added hidden; the layer the user works on stays active."""
        replace_layer(self._viewer, "image", name, data, shown_if_new=False, selected_if_new=False, **props)

    def _place_maps(self, base: str, steps: list[tuple[str, Any, dict[str, Any]]], mask_is_new: bool) -> None:
        """Place the maps: at once when they all exist (an update in place takes milliseconds),
        else one per turn of the event loop, after the mask (creating a layer costs napari
        a fifth of a second or more: five at once froze the first result for a second).
        A new run stops the placing of the one before."""
        self._map_generation += 1
        generation = self._map_generation
        pending = list(steps)

        def place_next() -> None:
            self._next_map = None
            if generation != self._map_generation:
                return
            if pending:
                self._place_map(*pending.pop(0))
                self._next_map = place_next
                self._map_timer.start(0)
                return
            self._drop_stale_maps(base, {name for name, _, _ in steps})
            if mask_is_new and self._mask_layer is not None and self._mask_layer in self._viewer.layers:
                layers = self._viewer.layers  # maps added after the new mask: the mask on top again
                layers.move(layers.index(self._mask_layer), len(layers))

        if all(name in self._viewer.layers for name, _, _ in steps):
            for step in steps:
                self._place_map(*step)
            pending.clear()
            place_next()
        else:
            self._next_map = place_next
            self._map_timer.start(0)

    @property
    def placing_maps(self) -> bool:
        """The maps of the last result are still being placed."""
        return self._next_map is not None

    @property
    def segmenting(self) -> bool:
        """A run is in its worker (a new run would be refused; placing maps is not one)."""
        return self._worker is not None

    @property
    def running(self) -> bool:
        """A run is in its worker or its result is still being placed."""
        return self._worker is not None or self.placing_maps

    def _drop_stale_maps(self, base: str, current: set[str]) -> None:
        """Remove an earlier run's maps that this one did not make (attention off, a model
        without gates, no uncertainty map): they would pass for the new mask's."""
        stale = re.compile(rf"{re.escape(base)} (attention \d+|uncertainty)")
        for old in [
            lyr for lyr in self._viewer.layers if stale.fullmatch(lyr.name) and lyr.name not in current
        ]:
            if old.metadata.get("r2au_run"):
                self._viewer.layers.remove(old)

    def _cleanup_settings(self) -> dict[str, Any]:
        return {
            "remove_small_objects": bool(self._remove_small.value),
            "fill_holes": bool(self._fill_holes.value),
            "size": int(self._min_size.value),
        }

    def _mask_settings(self) -> tuple[float, tuple[tuple[str, Any], ...]]:
        """The slider's threshold and the clean-up, as a value a run's first mask is cut at."""
        return float(self._threshold.value), tuple(sorted(self._cleanup_settings().items()))

    def _mask(self, prediction: Prediction | None = None) -> np.ndarray:
        """The mask at the slider's threshold and clean-up (of the kept prediction by default)."""
        prediction = prediction or self._prediction
        assert prediction is not None
        return _cut_mask(prediction, *self._mask_settings())

    def _apply_threshold(self, *_: Any) -> None:
        """Re-threshold the kept probabilities (no network run) unless the mask was painted on."""
        layer = self._mask_layer
        if self._prediction is None or layer is None or layer not in self._viewer.layers:
            return
        info = layer_record(layer.metadata)
        if edited(info, layer.data):
            if not self._warned_edited:
                self._warned_edited = True
                notify_warning(
                    f"'{layer.name}' was edited by hand, so it was not re-thresholded "
                    "(that would undo the edits). Run Segment again to start over; "
                    "the edited mask is then kept under another name."
                )
            return
        mask = self._mask()
        info.update(
            threshold=None if self._prediction.multiclass else float(self._threshold.value),
            cleanup=self._cleanup_settings(),
            **checksums(mask),
        )
        layer.data = mask
        layer.metadata = with_record(layer.metadata, info)

    # -- helpers ------------------------------------------------------------------------------

    def _on_model_changed(self, *_: Any) -> None:
        if self._worker is not None:  # the picker is locked during a run; a refresh must not move the slider
            return
        meta = self._model.metadata()
        if meta is not None and int(meta.get("out_channels", 1)) == 1:
            with self._threshold.changed.blocked():
                self._threshold.value = float(meta.get("threshold", 0.5))

    def _current_slice(self, layer: Any, n_z: int) -> int:
        point = tuple(self._viewer.dims.point)[-layer.ndim :]
        z = layer.world_to_data(point)[0]
        return int(np.clip(round(float(z)), 0, n_z - 1))

    def _set_running(self, running: bool, message: str | None = None) -> None:
        self._run.enabled = not running
        self._model.enabled = not running  # a run's record names the model and threshold that made it
        self._cancel.enabled = running
        if running:
            self._progress.max, self._progress.value = 1, 0
        if message is not None:
            self._status.value = message


def _cut_mask(prediction: Prediction, threshold: float, cleanup: tuple[tuple[str, Any], ...]) -> np.ndarray:
    """A prediction's mask at a threshold and clean-up (the engine's rule, called from the
    worker for a run's first mask and from the GUI thread when the slider moves)."""
    from napari_r2au.postprocess import apply_cleanup, segment_mask

    if prediction.multiclass:
        return apply_cleanup(prediction.mask(), dict(cleanup))
    return segment_mask(prediction.probabilities, threshold, prediction.postprocess, dict(cleanup))


def _three_decimals(slider: FloatSlider) -> None:
    """Show a slider's value with three decimals (its readout box rounds to two)."""
    from qtpy.QtWidgets import QDoubleSpinBox

    for box in slider.native.findChildren(QDoubleSpinBox):
        box.setDecimals(3)


def _network_input(layer: Any) -> tuple[str, Any]:
    """(axes, array) for an Image layer: 2D or a stack, grey or RGB(A)."""
    data = layer.data[0] if layer.multiscale else layer.data
    spatial = data.ndim - (1 if layer.rgb else 0)
    if spatial not in (2, 3):
        raise ValueError(
            f"'{layer.name}' has {spatial} spatial dimensions; Segment works on 2D images and 3D stacks "
            "(split channels or time points into separate layers first)"
        )
    axes = ("YX" if spatial == 2 else "ZYX") + ("C" if layer.rgb else "")
    return axes, data


def _keep_edited_mask(viewer: napari.viewer.Viewer, name: str, new_name: str) -> str | None:
    """Rename the Labels layer ``name`` if it was painted on since Segment made it.

    A new run would otherwise overwrite the corrections in place (the Fine-tune widget
    re-segments right after training on them). Returns the layer's new name, or None.
    """
    import napari.layers

    if name not in viewer.layers or not isinstance(viewer.layers[name], napari.layers.Labels):
        return None
    layer = viewer.layers[name]
    if edited(layer_record(layer.metadata), layer.data) is False:
        return None
    before = mask_before_corrections(viewer, layer)
    original = before() if before is not None else None
    if original is not None:  # Fine-tune on this layer can still tell the corrections apart
        layer.metadata = {**layer.metadata, "r2au_before": original}
    unique, n = new_name, 1
    while unique in viewer.layers:  # napari does not make a renamed layer's name unique
        unique, n = f"{new_name} [{n}]", n + 1
    layer.name = unique
    return unique
