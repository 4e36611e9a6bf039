"""The Review widget: compare a mask with a reference, visit the doubtful places, export.

The numbers come from ``napari_r2au.training.metrics`` (the trainer's own definitions)
and the helpers in ``postprocess`` / ``uncertainty``; the export writes the mask and a
JSON sidecar that records which model made it and whether a person corrected it.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import CheckBox, FileEdit, PushButton, SpinBox

from napari_r2au.mask_record import layer_record

from ._common import (
    ScrollingDock,
    describe_error,
    follow_layers,
    layer_picker,
    message_label,
    notify_error,
    notify_info,
    notify_warning,
    replace_layer,
)

if TYPE_CHECKING:
    import napari

#: colours of the difference layer: false positives orange, false negatives blue (colour-blind safe)
DIFFERENCE_COLORS = {None: "transparent", 0: "transparent", 1: "#ff8c00", 2: "#1e90ff"}


#: share of the canvas the "next most uncertain region" window fills
ZOOM_FILL = 0.5


class ReviewWidget(ScrollingDock):
    """Metrics against a reference, a difference layer, uncertain regions, and export."""

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        self._viewer = viewer
        self._prediction = layer_picker(viewer, "labels", "Prediction")
        self._reference = layer_picker(viewer, "labels", "Reference", nullable=True)
        self._compare = PushButton(text="Compare")
        self._metrics = message_label()
        self._uncertainty = layer_picker(viewer, "image", "Uncertainty map", nullable=True)
        self._uncertainty.tooltip = (
            "Empty: the uncertainty (else probability) map Segment made for the prediction"
        )
        self._window = SpinBox(label="Region size (px)", min=8, max=4096, step=8, value=64)
        self._next = PushButton(text="Next most uncertain region")
        self._region = message_label()
        self._export_path = FileEdit(label="Export to", mode="w", filter="*.tif *.tiff *.png *.dcm")
        self._export_path.tooltip = (
            "A .tif (or .png) mask, or a .dcm DICOM SEG for a mask on an image opened "
            "from DICOM (it refers to that series); a .json record goes next to it"
        )
        self._export_maps = CheckBox(text="Also export the probability and attention maps", value=False)
        self._overwrite = CheckBox(text="Overwrite existing files", value=False)
        self._export = PushButton(text="Export")
        self._export_status = message_label()
        super().__init__(
            widgets=[
                self._prediction,
                self._reference,
                self._compare,
                self._metrics,
                self._uncertainty,
                self._window,
                self._next,
                self._region,
                self._export_path,
                self._export_maps,
                self._overwrite,
                self._export,
                self._export_status,
            ],
            scrollable=True,
        )  # docks scroll on a 768 px screen
        self._visited: set[tuple[int, ...]] = set()
        self._visited_source: tuple[str, int] | None = None  # (layer name, window) the visits are for
        self.metrics: dict[str, float] | None = None

        self._compare.changed.connect(self.compare)
        self._next.changed.connect(self.next_region)
        self._export.changed.connect(self.export)
        follow_layers(viewer, self)
        self._compared: tuple[str, str] | None = None  # the layers the metrics shown are of
        viewer.layers.events.inserted.connect(self._follow_new_layer)
        viewer.layers.events.removed.connect(self._forget_removed)
        self._choose_defaults()

    # -- defaults that follow what the user just did ---------------------------------------------

    def _choose_defaults(self) -> None:
        """Prediction: the newest mask a model made; Reference: a mask of the same size
        that no model made (a manual mask opened from a file), so that the first Compare works."""
        import napari.layers

        labels = [layer for layer in self._viewer.layers if isinstance(layer, napari.layers.Labels)]
        made = [layer for layer in labels if _made_by_model(layer)]
        if made and not _made_by_model(self._prediction.value):
            self._prediction.value = made[-1]
        self._default_reference()

    def _default_reference(self) -> None:
        import napari.layers

        predicted = self._prediction.value
        if predicted is None or self._reference.value is not None:
            return
        manual = [
            layer
            for layer in self._viewer.layers
            if isinstance(layer, napari.layers.Labels)
            and layer is not predicted
            and not _made_by_model(layer)
            and not (layer.metadata or {}).get("r2au_difference")
            and layer.data.shape == predicted.data.shape
        ]
        if manual:
            self._reference.value = manual[-1]

    def _follow_new_layer(self, event: Any) -> None:
        layer = event.value
        self.reset_choices()
        if _made_by_model(layer):  # Segment just made (or remade) a mask: review that one
            self._prediction.value = layer
        self._default_reference()

    def _forget_removed(self, event: Any) -> None:
        """Metrics of a layer that is gone would pass for the current layers'."""
        if self._compared and event.value.name in self._compared:
            self._compared, self.metrics = None, None
            self._metrics.value = ""

    # -- metrics and difference ---------------------------------------------------------------

    def compare(self, *_: Any) -> dict[str, float] | None:
        """Show Dice/F1, sensitivity, specificity, accuracy, IoU and a difference layer."""
        from napari_r2au.postprocess import difference_labels

        predicted, reference = self._prediction.value, self._reference.value
        if predicted is None or reference is None:
            self._refuse(
                self._metrics,
                "choose a prediction and a reference labels layer to compare (open the "
                "reference mask with File > Open; it comes in as a Labels layer).",
            )
            return None
        if predicted.data.shape != reference.data.shape:
            self._refuse(
                self._metrics,
                f"'{predicted.name}' {predicted.data.shape} and '{reference.name}' "
                f"{reference.data.shape} differ in size.",
            )
            return None
        pred, ref = np.asarray(predicted.data), np.asarray(reference.data)
        rates = _rates(pred, ref)
        self.metrics = rates
        self._metrics.value = (
            f"Dice (F1) {_fmt(rates['f1'])} · IoU {_fmt(rates['iou'])}\n"
            f"Sensitivity {_fmt(rates['sensitivity'])} · Specificity {_fmt(rates['specificity'])}\n"
            f"Accuracy {_fmt(rates['accuracy'])} · Precision {_fmt(rates['precision'])}\n"
            "Difference layer: orange = false positive, blue = false negative"
        )
        replace_layer(
            self._viewer,
            "labels",
            f"{predicted.name} vs {reference.name}",
            difference_labels(pred, ref),
            colormap=DIFFERENCE_COLORS,
            opacity=0.8,
            scale=tuple(predicted.scale),
            translate=tuple(predicted.translate),
            metadata={"r2au_difference": True},
        )
        self._compared = (predicted.name, reference.name)
        return rates

    def _refuse(self, line: Any, message: str) -> None:
        """A refusal in the dock, where the user is looking, and as a notification."""
        line.value = message
        notify_error(f"Review: {message}")

    # -- uncertain regions --------------------------------------------------------------------

    def next_region(self, *_: Any) -> None:
        """Centre the view on the not yet visited window with the highest mean uncertainty."""
        from napari_r2au.uncertainty import binary_entropy, most_uncertain_region

        layer = self._uncertainty.value or self._recorded_map()
        if layer is None:
            notify_error(
                "Review: choose an uncertainty (or probability) image layer; Segment makes "
                "one with 'Uncertainty map' ticked."
            )
            return
        if layer.rgb or layer.ndim not in (2, 3):
            notify_error(f"Review: '{layer.name}' must be a single-channel 2D map or a stack of them.")
            return
        values = np.asarray(layer.data[0] if layer.multiscale else layer.data, np.float32)
        if self._is_probability(layer):  # doubtful where p is near 0.5
            values = binary_entropy(values)
        window = int(self._window.value)
        if self._visited_source != (layer.name, window):
            self._visited, self._visited_source = set(), (layer.name, window)
        region = most_uncertain_region(values, window, self._visited)
        if region is None:
            self._visited.clear()
            notify_info("Review: every region was visited; starting again from the most uncertain one.")
            region = most_uncertain_region(values, window)
            if region is None:
                return
        self._visited.add(region.key)
        world = layer.data_to_world(region.center)
        self._viewer.camera.center = tuple(world[-2:])
        canvas = getattr(getattr(self._viewer, "canvas", None), "size", None)
        if canvas and min(canvas) > 0:  # zoom so that the window fills half the canvas, with context around
            extent = window * float(np.max(np.abs(np.asarray(layer.scale[-2:], float))))
            self._viewer.camera.zoom = ZOOM_FILL * min(canvas) / max(extent, 1e-9)
        if len(world) == 3:  # a stack: go to the region's slice
            self._viewer.dims.set_point(self._viewer.dims.ndim - 3, world[0])
        where = ", ".join(
            f"{name} {value:.0f}" for name, value in zip("zyx"[-len(region.center) :], region.center)
        )
        self._region.value = (
            f"Region {len(self._visited)}: mean {region.score:.3f} at ({where}) in {layer.name}"
        )

    def _recorded_map(self) -> Any:
        """The uncertainty (else probability) layer Segment recorded for the chosen prediction."""
        info = self._info()
        for key in ("uncertainty_layer", "probability_layer"):
            name = info.get(key)
            if name and name in self._viewer.layers:
                return self._viewer.layers[name]
        return None

    def _is_probability(self, layer: Any) -> bool:
        return layer.name == self._info().get("probability_layer")

    def _info(self) -> dict[str, Any]:
        predicted = self._prediction.value
        return layer_record(predicted.metadata) if predicted is not None else {}

    # -- export -------------------------------------------------------------------------------

    def export(self, *_: Any) -> Path | None:
        """Write the mask (TIFF, or DICOM SEG for a path ending .dcm) and a JSON sidecar next to it;
        returns the mask's path."""
        predicted, target = self._prediction.value, self._export_path.value
        self._export_status.value = ""  # a line left from an earlier export would claim this one
        if predicted is None:
            self._refuse(self._export_status, "choose the labels layer to export.")
            return None
        if not target or str(target) in ("", "."):
            self._refuse(self._export_status, "choose where to write the mask ('Export to').")
            return None
        path = Path(target)
        if path.is_dir():  # a folder: the mask goes inside it as a TIFF named after its layer
            stem = re.sub(r"[^\w.+-]+", "_", predicted.name).strip("._") or "mask"
            path = path / f"{stem}.tif"  # (a dot in the name, 'scan.nii mask', is no format)
        elif not path.suffix:  # no format asked for: a TIFF
            path = path.with_name(path.name + ".tif")
        if (
            path.suffix.lower() not in EXPORT_SUFFIXES
        ):  # the format asked for, or a refusal: never another one
            self._refuse(
                self._export_status,
                f"{path.name}: masks are exported as {', '.join(EXPORT_SUFFIXES)} "
                "(a lossy format such as JPEG would change the labels).",
            )
            return None
        if path.suffix.lower() == ".png" and int(np.max(predicted.data, initial=0)) > 255:
            self._refuse(
                self._export_status,
                f"{path.name}: a PNG holds labels up to 255; '{predicted.name}' has more: export it as .tif.",
            )
            return None
        targets = [path, path.with_suffix(".json")]
        if self._export_maps.value:
            targets += list(_map_paths(path, self._info()).values())
        existing = [p.name for p in targets if p.exists()]
        if existing and not self._overwrite.value:
            self._refuse(
                self._export_status,
                f"{', '.join(existing)} exists already; choose another name or "
                "tick 'Overwrite existing files'.",
            )
            return None
        try:
            sidecar = self._write(predicted, path)
        except (OSError, ValueError, ImportError) as exc:  # ImportError: the dicom extra for a .dcm export
            notify_error(f"Review: export failed: {describe_error(exc)}")
            self._export_status.value = f"Not written: {describe_error(exc)}"
            return None
        self._export_status.value = f"Wrote {path.name} and {sidecar.name}"
        return path

    def _write(self, predicted: Any, path: Path) -> Path:
        from napari_r2au.io import atomic_path, write_png, write_tiff
        from napari_r2au.mask_record import export_record, sidecar_text, with_metrics
        from napari_r2au.postprocess import compact_labels

        mask = compact_labels(np.asarray(predicted.data))
        info = self._info()
        record = export_record(
            info,
            np.asarray(predicted.data),
            mask_file=path.name,
            layer=predicted.name,
            scale=predicted.scale,
            translate=predicted.translate,
        )
        record["dtype"] = str(mask.dtype)
        reference = self._reference.value
        if reference is not None and reference.data.shape == predicted.data.shape:
            rates = _rates(np.asarray(predicted.data), np.asarray(reference.data))
            record = with_metrics(record, reference.name, rates)
        if (
            path.suffix.lower() == ".dcm"
        ):  # a DICOM SEG on the series the image came from, first: it may be refused
            from napari_r2au.dicom_seg import write_layer_seg

            written = write_layer_seg(path, predicted.data, predicted.metadata)
            record["mask_format"] = "DICOM SEG"
            record["dicom_seg"] = {
                "sop_instance_uid": written.sop_instance_uid,
                "series_instance_uid": written.series_instance_uid,
                "source_series_instance_uid": written.source_series_instance_uid,
            }
        elif path.suffix.lower() == ".png":
            write_png(path, mask.astype(np.uint8))
        else:
            write_tiff(path, mask)
        if self._export_maps.value:
            record.update(self._write_maps(path, info, write_tiff))
        sidecar = path.with_suffix(".json")
        with atomic_path(sidecar) as tmp:  # last: a sidecar means the files next to it are complete
            tmp.write_text(sidecar_text(record))
        return sidecar

    def _write_maps(self, path: Path, info: dict[str, Any], write_tiff: Any) -> dict[str, Any]:
        """The probability and attention layers of the run that made this mask, as float32 TIFFs.

        A map layer that a later run (another model, a fine-tuned one) has rewritten is
        not this mask's map: it is left out, and the record and a warning say so.
        """
        files: dict[str, Any] = {"probability_file": None, "attention_files": [], "maps_left_out": []}
        layers, run_id, targets = self._viewer.layers, info.get("run_id"), _map_paths(path, info)

        def own(name: str | None) -> bool:
            if not name or name not in layers:
                return False
            if run_id is None or layers[name].metadata.get("r2au_run") != run_id:
                files["maps_left_out"].append(name)
                return False
            return True

        name = info.get("probability_layer")
        if own(name):
            write_tiff(targets[name], np.asarray(layers[name].data, np.float32))
            files["probability_file"] = targets[name].name
        for name in info.get("attention_layers") or []:
            if own(name):
                write_tiff(targets[name], np.asarray(layers[name].data, np.float32))
                files["attention_files"].append(targets[name].name)
        if files["maps_left_out"]:
            notify_warning(
                f"Review: {', '.join(files['maps_left_out'])} now hold(s) the maps of a later run, "
                f"not of '{info.get('image_layer')}' as segmented by {info.get('model')}: not exported."
            )
        return files


#: what Export writes; anything else is refused (never silently another format)
EXPORT_SUFFIXES = (".tif", ".tiff", ".png", ".dcm")


def _made_by_model(layer: Any) -> bool:
    """A mask Segment made (or one exported by Review and opened again): it has a model record."""
    return bool(layer is not None and layer_record(getattr(layer, "metadata", None)).get("model"))


def _map_paths(path: Path, info: dict[str, Any]) -> dict[str, Path]:
    """The file each map layer of a run is exported to, by layer name (next to the mask)."""
    paths = {}
    if info.get("probability_layer"):
        paths[info["probability_layer"]] = path.with_name(f"{path.stem}_probability.tif")
    for index, name in enumerate(info.get("attention_layers") or [], start=1):
        paths[name] = path.with_name(f"{path.stem}_attention{index}.tif")
    return paths


def _rates(predicted: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Pixel metrics of a mask against a reference (the trainer's definitions)."""
    from napari_r2au.training.metrics import confusion

    return confusion(reference > 0, predicted > 0).rates()


def _fmt(value: float) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:.3f}"
