"""The Fine-tune widget: teach a model from the masks the user corrected, without freezing napari.

Training is the trainer's own generator (``iter_finetune``) in a napari thread worker;
the dock shows its loss and validation Dice as they come. The new model is saved under
a new name (``<base>-ftN``), offered in every model picker and used to re-segment.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FloatSpinBox,
    ProgressBar,
    PushButton,
    SpinBox,
)

from napari_r2au.mask_record import layer_record
from napari_r2au.training.settings import FinetuneSettings  # torch-free

from ._common import (
    PLUGIN,
    ModelPicker,
    ScrollingDock,
    WorkerRunner,
    describe_error,
    follow_layers,
    format_seconds,
    layer_picker,
    layer_pixel_size,
    layers_of,
    mask_before_corrections,
    message_label,
    notify_error,
    notify_info,
    notify_warning,
    refresh_model_pickers,
)
from .stalls import quiet_loading

if TYPE_CHECKING:
    import napari
    from superqt.utils import GeneratorWorker

    from napari_r2au.training.finetune import FinetuneResult
    from napari_r2au.training.trainer import TrainEvent


class LossCurve:
    """A small matplotlib canvas with the training loss and the validation Dice.

    A full redraw of this figure takes 0.1-0.15 s of napari's GUI thread on this project's
    2-core machine (tick labels and text; ``benchmarks.finetune_stall``), and it came at every
    training step. So the axes stay put while a run goes on: x spans the run's planned steps,
    the loss axis is 0..1 and grows (to a quarter above the loss) only when a loss goes above
    it, and the Dice axis is 0..1. A new point then redraws only the two lines over
    a saved copy of the rest (matplotlib's blitting); a full redraw comes only with a new
    run, a resize or a loss above the axis.
    """

    def __init__(self) -> None:
        # matplotlib's Qt backend loads with the widget, not with the plugin manifest
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        # fixed margins that fit the labels: a "tight" layout measured every text at every redraw
        self.figure = Figure(figsize=(3.6, 2.2), dpi=90)
        self.figure.subplots_adjust(left=0.17, right=0.83, bottom=0.2, top=0.95)
        self.canvas = FigureCanvasQTAgg(self.figure)
        # a fixed height: a status line that wraps would otherwise resize it, and a resize is a
        # full redraw
        self.canvas.setFixedHeight(170)
        self._loss_axes = self.figure.add_subplot()
        self._dice_axes = self._loss_axes.twinx()
        self._background: Any = None  # the figure without its lines, after the last full redraw
        self._background_size: tuple[int, int] | None = None  # the canvas's size then
        self.full_redraws = 0  # counted, for the tests
        self.canvas.mpl_connect("draw_event", self._on_full_redraw)
        self.reset()

    def reset(self, total_steps: int | None = None) -> None:
        """Empty the curve for a run of ``total_steps`` (None: not known, x grows as it goes)."""
        from matplotlib.ticker import MaxNLocator

        self.steps: list[int] = []
        self.losses: list[float] = []
        self.dice_steps: list[int] = []
        self.dice: list[float] = []
        self._total = total_steps
        self._loss_top = 1.0  # as the Dice axis; a fine-tune's loss mostly starts below it
        loss_ax, dice_ax = self._loss_axes, self._dice_axes
        loss_ax.clear()
        dice_ax.clear()
        # animated: left out of full redraws, drawn over the saved background instead
        (self._loss_line,) = loss_ax.plot([], [], color="tab:blue", lw=1, label="loss", animated=True)
        (self._dice_line,) = dice_ax.plot(
            [], [], "o-", color="tab:orange", ms=3, lw=1, label="held-out Dice at 0.5", animated=True
        )
        loss_ax.set_xlabel("step", fontsize=8)
        loss_ax.set_ylabel("loss", color="tab:blue", fontsize=8)
        # during training: the fine-tuned weights at threshold 0.5 (the result line gives the new
        # model's own figures: blended with the base, at the threshold chosen on the held-out part)
        dice_ax.set_ylabel("held-out Dice at 0.5", color="tab:orange", fontsize=8)
        dice_ax.yaxis.set_label_position("right")  # clear() puts a twin's label back on the left
        dice_ax.yaxis.tick_right()
        dice_ax.set_ylim(0, 1)
        loss_ax.set_xlim(0.5, (total_steps or 10) + 0.5)
        loss_ax.set_ylim(0, 1)
        for ax in (loss_ax, dice_ax):
            ax.tick_params(labelsize=7)
            ax.yaxis.set_major_locator(MaxNLocator(4))  # few tick labels: each costs a text layout
        loss_ax.xaxis.set_major_locator(MaxNLocator(5, integer=True))
        self._background = None
        self.canvas.draw_idle()

    def add(self, step: int, loss: float, dice: float | None = None) -> None:
        self.steps.append(step)
        self.losses.append(loss)
        if dice is not None and math.isfinite(dice):
            self.dice_steps.append(step)
            self.dice.append(dice)
        self._loss_line.set_data(self.steps, self.losses)
        self._dice_line.set_data(self.dice_steps, self.dice)
        axes_moved = False
        right = self._loss_axes.get_xlim()[1]
        if step + 0.5 > right:  # past the planned steps (or none were given): twice as far
            self._loss_axes.set_xlim(0.5, max(2 * step, (self._total or 0)) + 0.5)
            axes_moved = True
        if math.isfinite(loss) and loss > self._loss_top:
            self._loss_top = 1.25 * loss
            self._loss_axes.set_ylim(0, self._loss_top)
            axes_moved = True
        resized = self._background_size != self.canvas.get_width_height(physical=True)
        if axes_moved or self._background is None or resized:
            self.canvas.draw_idle()  # the draw event puts the lines on
            return
        self.canvas.restore_region(self._background)
        self._draw_lines()
        self.canvas.blit(self.figure.bbox)

    def _on_full_redraw(self, event: Any) -> None:
        if event.canvas is not self.canvas:  # the figure saved through another backend
            return
        self.full_redraws += 1
        self._background = self.canvas.copy_from_bbox(self.figure.bbox)
        self._background_size = self.canvas.get_width_height(physical=True)
        self._draw_lines()

    def _draw_lines(self) -> None:
        self._loss_axes.draw_artist(self._loss_line)
        self._dice_axes.draw_artist(self._dice_line)


class FinetuneWidget(WorkerRunner, ScrollingDock):
    """Fine-tune a model on an image and its corrected mask; the result is a new model."""

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        self._viewer = viewer
        self._image = layer_picker(viewer, "image", "Image", inputs_only=True)
        self._corrected = layer_picker(viewer, "labels", "Corrected mask")
        self._use_validation = CheckBox(
            text="Separate validation pair",
            value=False,
            tooltip="Otherwise a quarter-width band of the image (of each painted slice) is held out for "
            "validation: the right quarter, or where the corrections are",
        )
        self._val_image = layer_picker(viewer, "image", "Validation image", nullable=True, inputs_only=True)
        self._val_labels = layer_picker(viewer, "labels", "Validation mask", nullable=True)
        self._validation = Container(widgets=[self._val_image, self._val_labels], visible=False)
        self._model = ModelPicker(label="Base model", sample_source=lambda: self._image.value)
        defaults = FinetuneSettings()
        self._steps = SpinBox(label="Steps", min=1, max=100_000, value=defaults.steps)
        self._lr = FloatSpinBox(label="Learning rate", min=1e-5, max=1.0, step=1e-5, value=defaults.lr)
        self._patch = SpinBox(label="Patch size", min=16, max=1024, step=16, value=defaults.patch_size)
        self._augment = CheckBox(text="Augmentation (flips, rotations, intensity)", value=defaults.augment)
        self._freeze = CheckBox(text="Freeze encoder", value=defaults.freeze_encoder)
        self._share = FloatSpinBox(
            label="Weight share",
            min=0.05,
            max=1.0,
            step=0.05,
            value=defaults.weight_share,
            tooltip="New weights = base + share x (fine-tuned - base); 1: as fine-tuned. "
            "0.5 (default) keeps more of what the base model knew and, measured, "
            "adapts at least as well (docs/finetune-defaults.md)",
        )
        self._device = ComboBox(label="Device", choices=["auto", "cpu", "cuda"], value="auto")
        self._scale = FloatSpinBox(
            label="Scale (0: as segmented)",
            min=0.0,
            max=8.0,
            step=0.05,
            value=0.0,
            tooltip="Resize factor for training, recorded in the new model; 0: the "
            "Scale Segment used for the corrected mask, else the base model's",
        )
        self._resegment = CheckBox(text="Re-segment the image with the new model", value=True)
        self._run = PushButton(text="Fine-tune")
        self._cancel = PushButton(text="Cancel", enabled=False)
        self._progress = ProgressBar(min=0, max=1, value=0)
        self._status = message_label()
        self._result = message_label()
        super().__init__(
            widgets=[
                self._image,
                self._corrected,
                self._use_validation,
                self._validation,
                self._model,
                self._steps,
                self._lr,
                self._patch,
                self._augment,
                self._freeze,
                self._share,
                self._device,
                self._scale,
                self._resegment,
                self._run,
                self._cancel,
                self._progress,
                self._status,
                self._result,
            ],
            scrollable=True,
        )  # docks scroll on a 768 px screen
        self._curve = LossCurve()
        self.content.layout().addWidget(self._curve.canvas)
        self._worker: GeneratorWorker | None = None
        self._cancelled = False
        self._source: Any = None  # the image layer being trained on
        self.last_result: FinetuneResult | None = None

        self._use_validation.changed.connect(lambda value: setattr(self._validation, "visible", bool(value)))
        self._run.changed.connect(self.run)
        self._cancel.changed.connect(self.cancel)
        follow_layers(viewer, self)
        self._corrected_chosen = False  # the user picked a mask: the default no longer moves
        self._corrected.changed.connect(self._corrected_picked)
        self._default_corrected()

    def reset_choices(self, *args: Any) -> None:
        self._choosing = True  # a choice that changes because a layer went is not the user's
        try:
            super().reset_choices(*args)
        finally:
            self._choosing = False
        self._default_corrected()

    def _corrected_picked(self, *_: Any) -> None:
        if not self._choosing:
            self._corrected_chosen = True

    _choosing = False
    _corrected_chosen = False

    def _default_corrected(self) -> None:
        """Until the user picks one, the corrected mask is the one just painted: a mask a model
        made that has been edited since, else the latest a model made (not a mask file)."""
        if self._corrected_chosen:
            return
        from napari_r2au.mask_record import edited

        made = [
            layer
            for _, layer in layers_of(self._viewer, "labels")
            if layer_record(layer.metadata).get("model")
        ]
        if not made:
            return
        painted = [layer for layer in made if edited(layer_record(layer.metadata), layer.data)]
        choice = (painted or made)[-1]
        if self._corrected.value is not choice:
            self._choosing = True
            try:
                self._corrected.value = choice
            finally:
                self._choosing = False

    def _warn_about_inputs(self, pairs: list) -> None:
        """The shared checks (napari_r2au.checks): the base model on this image, the mask as
        corrections. Said before the run; the user decides."""
        from napari_r2au.checks import correction_notices

        image, labels = pairs[0]
        for notice in correction_notices(
            self._model.metadata(), image, labels, f"'{self._corrected.value.name}'"
        ):
            notify_warning(f"Fine-tune: {notice}")

    def run(self, *_: Any) -> None:
        """Check the inputs and start fine-tuning in a worker thread."""
        if self.running:  # one run at a time: a second one is refused, never interleaved
            notify_warning("Fine-tune: a run is in progress; wait for it or press Cancel.")
            return
        try:
            pairs, validation, slices = self._pairs()
        except ValueError as exc:
            notify_error(f"Fine-tune: {exc}")
            return
        path = self._model.path
        if path is None:
            notify_error("Fine-tune: choose a base model first.")
            return
        settings = {
            "steps": int(self._steps.value),
            "lr": float(self._lr.value),
            "patch_size": int(self._patch.value),
            "augment": bool(self._augment.value),
            "freeze_encoder": bool(self._freeze.value),
            "weight_share": float(self._share.value),
        }
        device = None if self._device.value == "auto" else str(self._device.value)
        # train at the scale the mask was segmented at (e.g. a fundus photograph resized to DRIVE's size)
        scale = float(self._scale.value) or _recorded_scale(self._corrected.value)
        try:  # checked before the widget turns busy, so a refusal leaves it usable
            pixel = layer_pixel_size(self._image.value)
        except ValueError as exc:
            notify_error(f"Fine-tune: {exc}")
            return
        self._warn_about_inputs(pairs)
        self._source = self._image.value
        self._cancelled = False
        self.last_result = None
        self._curve.reset(settings["steps"])
        self._result.value = ""
        self._set_running(True, "Preparing (measuring the base model on the validation data)…")
        if slices is not None:
            self._result.value = (
                f"Training on the {len(slices)} corrected slice(s) of "
                f"'{self._corrected.value.name}': {_slice_list(slices)}."
            )
        before = mask_before_corrections(self._viewer, self._corrected.value)
        self._start(
            self._job(
                path, pairs, validation, settings, self._source.name, device, scale, pixel, slices, before
            )
        )

    # -- inputs -------------------------------------------------------------------------------

    def _pairs(self) -> tuple[list[tuple[Any, np.ndarray]], tuple[Any, np.ndarray] | None, list[int] | None]:
        """The training pair, the validation pair (or None) and a stack's corrected slices."""
        image, labels = self._image.value, self._corrected.value
        if image is None or labels is None:
            raise ValueError("choose an image layer and the labels layer with the corrected mask")
        pairs = [_pair(image, labels)]
        slices = _corrected_slices(labels, pairs[0][1])
        validation = None
        if self._use_validation.value:
            val_image, val_labels = self._val_image.value, self._val_labels.value
            if val_image is None or val_labels is None:
                raise ValueError("choose both a validation image and its mask, or untick the validation pair")
            validation = _pair(val_image, val_labels)
            if not validation[1].any():
                raise ValueError(
                    f"the validation mask '{val_labels.name}' is empty: Dice cannot be measured on it"
                )
        return pairs, validation, slices

    # -- the work (worker thread) ----------------------------------------------------------

    @staticmethod
    def _job(
        path: str,
        pairs: list,
        validation: Any,
        settings: dict[str, Any],
        name: str,
        device: str | None,
        scale: float | None,
        pixel: tuple[float | None, str | None],
        slices: list[int] | None = None,
        before: Callable[[], Any] | None = None,
    ) -> Generator[TrainEvent, None, FinetuneResult]:
        # the trainer imports torch: load it in the worker, without stalling napari (widgets.stalls)
        with quiet_loading():
            from napari_r2au.training.finetune import iter_finetune

        # the mask as Segment made it tells where the user corrected (None: not known exactly)
        original = before() if before is not None else None
        return (
            yield from iter_finetune(
                path,
                pairs,
                validation,
                FinetuneSettings(**settings),
                names=[name],
                slices=None if slices is None else [slices],
                device=device,
                scale=scale,
                pixel_size=pixel[0],
                pixel_size_unit=pixel[1],
                originals=[original],
            )
        )

    # -- worker callbacks (GUI thread) ----------------------------------------------------

    def _on_progress(self, event: TrainEvent) -> None:
        self._progress.max = max(1, event.total)
        self._progress.value = min(event.step, event.total)
        eta = event.elapsed / max(1, event.step) * (event.total - event.step)
        dice = (event.validation or {}).get("f1")
        text = (
            f"Step {event.step}/{event.total} · loss {event.loss:.4f} · "
            f"{format_seconds(event.elapsed)} elapsed · ETA {format_seconds(eta)}"
        )
        if dice is not None:
            text += f" · held-out Dice at 0.5: {dice:.3f}"
        self._status.value = text
        self._curve.add(event.step, event.loss, dice)

    def _on_result(self, result: FinetuneResult) -> None:
        self.last_result = result
        if result.model is None:
            notify_warning(f"Fine-tuning stopped ({result.stopped}) before a model was saved.")
            return
        name = result.model.name
        share = result.weight_share
        blend = f" (weights {share:g} of the way from the base to the fine-tuned ones)" if share else ""
        self._result.value = (
            f"New model {name} after {result.steps} steps{blend}.\nHeld-out Dice, each model at "
            f"its own threshold there: {_score(result.dice_before)} before → "
            f"{_score(result.dice_after)} after."
        )
        refresh_model_pickers()
        if result.dice_before is None or result.dice_after is None:  # used, as asked, but said plainly
            self._result.value += "\nNot validated: no held-out part of the corrected image has foreground."
            notify_warning(
                f"Fine-tune: {name} is used but was not validated (no part of the corrected image "
                "could be held out with foreground in it); compare its masks with the base model's, "
                "or tick 'Separate validation pair'."
            )
        elif result.dice_fell:  # saved, but not put to use: the user decides
            self._result.value += (
                "\nLower than the base model, so Segment keeps the base model; "
                f"choose {name} there to use it anyway."
            )
            held = result.held_out_corrections
            why = (
                ""
                if held is None
                else (
                    f" The held-out part holds {held} corrected pixel(s); the rest of it is the base model's own "
                    "output, which it matches by definition, so a few local corrections rarely win there."
                )
            )
            notify_warning(
                f"Fine-tune: {name} scores lower than its base model on the held-out part "
                f"({_score(result.dice_after)} vs {_score(result.dice_before)}), so it was saved but "
                f"not selected.{why} Correct more of the image or more images, or tick 'Separate "
                "validation pair' (a fully checked image) for a fair test."
            )
            return
        try:
            self._use_new_model(name)
        except Exception as exc:  # a missing window, a busy Segment widget...
            notify_error(
                f"Fine-tune: {name} was saved but could not be used to re-segment: {describe_error(exc)}"
            )

    def _on_error(self, exc: BaseException) -> None:
        reason = describe_error(exc)
        self._status.value = f"Failed: {reason}"
        notify_error(f"Fine-tuning failed: {reason}")

    def _on_finish(self) -> None:
        self._worker = None
        if self._cancelled:
            self._status.value = "Cancelled; no model was added."
        elif self.last_result is not None and self.last_result.model is not None:
            self._status.value = f"Done: {self.last_result.model.name} is in the model lists."
        self._set_running(False)

    def _use_new_model(self, name: str) -> None:
        """Select the new model in this viewer's Segment widgets and re-segment the image."""
        from .segment import segment_widgets

        widgets = segment_widgets(self._viewer)
        for widget in widgets:
            widget.select_model(name)
        if not self._resegment.value:
            return
        if not widgets:  # dock one through the manifest, like the user would
            _, widget = self._viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")
            widget.select_model(name)
            widgets = [widget]
        segment = widgets[0]
        if segment.segmenting:
            notify_info(f"{name} is selected in Segment; it is busy, so run it again when it is done.")
            return
        if self._source is not None and self._source in self._viewer.layers:
            segment.segment(layer=self._source, model=name)

    def _set_running(self, running: bool, message: str | None = None) -> None:
        self._run.enabled = not running
        self._cancel.enabled = running
        if running:
            self._progress.max, self._progress.value = 1, 0
        if message is not None:
            self._status.value = message


def _pair(image_layer: Any, labels_layer: Any) -> tuple[Any, np.ndarray]:
    """(image, labels) arrays of two layers, checked to cover the same pixels."""
    image = image_layer.data[0] if image_layer.multiscale else image_layer.data
    spatial = tuple(image.shape[:-1] if image_layer.rgb else image.shape)
    labels = np.array(labels_layer.data[0] if labels_layer.multiscale else labels_layer.data)  # a copy:
    # the user may keep painting while the worker trains on it
    if spatial != labels.shape:
        raise ValueError(
            f"'{image_layer.name}' {spatial} and '{labels_layer.name}' {labels.shape} differ in size"
        )
    if len(spatial) not in (2, 3):
        raise ValueError(f"'{image_layer.name}' must be a 2D image or a 3D stack")
    return image, labels


def _corrected_slices(labels_layer: Any, labels: np.ndarray) -> list[int] | None:
    """For a stack Segment made: the slices painted on since (None: use every labelled slice).

    The untouched slices are the model's own output and would teach it nothing; an
    erased slice is a correction ("nothing here"), unlike a layer that was always empty.
    """
    from napari_r2au.postprocess import edited_slices, mask_checksum

    record = layer_record(labels_layer.metadata)
    if labels.ndim == 3 and record.get("slice_sha256"):
        slices = edited_slices(labels, record["slice_sha256"])
        if not slices:
            raise ValueError(
                f"no slice of '{labels_layer.name}' was corrected since Segment made it: correct "
                "the slices the model gets wrong (untouched ones are its own output)"
            )
        return slices
    recorded = record.get("mask_sha256")
    if recorded and mask_checksum(labels) == recorded:
        raise ValueError(
            f"'{labels_layer.name}' is Segment's output, unchanged: correct what the model gets wrong "
            "first (fine-tuning on its own output teaches it nothing)"
        )
    if not labels.any() and not recorded:
        raise ValueError(f"'{labels_layer.name}' is empty: paint or correct a mask first")
    return None


def _recorded_scale(labels_layer: Any) -> float | None:
    """The Scale Segment used for a mask (None: not recorded, use the base model's)."""
    scale = layer_record(labels_layer.metadata).get("scale") if labels_layer is not None else None
    return float(scale) if isinstance(scale, (int, float)) and scale > 0 else None


def _slice_list(slices: list[int], shown: int = 12) -> str:
    text = ", ".join(str(z) for z in slices[:shown])
    return text + (f" … ({len(slices) - shown} more)" if len(slices) > shown else "")


def _score(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.3f}"
