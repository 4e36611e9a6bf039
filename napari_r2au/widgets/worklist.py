"""The Worklist dock: review a series of cases one after another, with the model learning
from the corrections as the reviewer goes.

The numerics and files are :mod:`napari_r2au.worklist`'s (the same generators drive
``r2au worklist``); this dock shows the table, opens one case at a time, saves the
reviewer's edits in the background and sets the verdicts.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSpinBox,
    LineEdit,
    ProgressBar,
    PushButton,
    SpinBox,
)

from napari_r2au.mask_record import with_record

from ._common import (
    RUN_KEY,
    ModelPicker,
    ScrollingDock,
    WorkerRunner,
    adding_without_selecting,
    describe_error,
    mask_colormap,
    message_label,
    notify_error,
    notify_info,
    notify_warning,
    refresh_model_pickers,
)
from .stalls import quiet_loading, warm_layer_imports

if TYPE_CHECKING:
    import napari

    from napari_r2au.worklist import Case, Worklist, WorklistEvent

#: the table's columns
COLUMNS = ("Case", "Status", "Model", "Uncertainty", "Dice", "Edited", "Comment", "Time")
#: the keys that move through the cases and set verdicts (none of them is napari's own)
SHORTCUTS = {
    "next": "PageDown",
    "previous": "PageUp",
    "accepted": "Ctrl-Shift-A",
    "needs correction": "Ctrl-Shift-N",
    "rejected": "Ctrl-Shift-R",
}
#: an edit is saved this long after the last stroke, and at the latest this long after the first
SAVE_DELAY_MS = 1500
SAVE_AT_LATEST_MS = 5000
#: the metadata key that marks a layer as a worklist case's (its case id)
CASE_KEY = "r2au_worklist_case"
#: and which of the case's layers it is (image, mask, probability, ...): reused for the next case
ROLE_KEY = "r2au_worklist_role"
#: the Scale field's decimals (a worklist made on the command line may hold more)
SCALE_DECIMALS = 4
ORDER_CHOICES = {"File order": "file", "Most uncertain first": "uncertain"}


class WorklistWidget(WorkerRunner, ScrollingDock):
    """Open a worklist folder (or start one from a folder of cases), pre-segment, review."""

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        from qtpy.QtCore import QTimer

        self._viewer = viewer
        self._folder = FileEdit(
            label="Worklist folder",
            mode="d",
            tooltip="Where the worklist keeps its masks, statuses and comments (a new or empty "
            "folder starts a new worklist from the cases below)",
        )
        self._cases = FileEdit(
            label="Cases",
            mode="d",
            tooltip="For a new worklist: a folder of images (reference masks beside them are paired "
            "as 'r2au evaluate' pairs them), a folder of DICOM series, or a CSV file (type its path)",
        )
        self._open = PushButton(text="Open worklist")
        self._model = ModelPicker(label="Model", sample_source=self._case_image_layer)
        from napari_r2au.engine import MAX_SCALE

        self._scale = FloatSpinBox(
            label="Scale (0: auto)",
            min=0.0,
            max=MAX_SCALE,
            step=0.05,
            value=0.0,
            tooltip="Resize factor before the network for every case, kept in the worklist (Learn "
            "trains at it too). 0 (auto): the model's own rule, e.g. a fundus model's field of view; "
            "set one for a model that knows no rule for these images (drive-vessels on HRF: about 0.4)",
        )
        self._scale.native.setDecimals(SCALE_DECIMALS)
        self._scale.native.setSpecialValueText("auto")
        self._order = ComboBox(label="Order", choices=list(ORDER_CHOICES), value="File order")
        self._presegment = PushButton(
            text="Pre-segment",
            enabled=False,
            tooltip="Segment every case nobody has touched yet, the one on screen first",
        )
        self._cancel = PushButton(text="Cancel", enabled=False)
        self._progress = ProgressBar(min=0, max=1, value=0)
        self._status = message_label()
        self._previous = PushButton(
            text="◀ Previous", enabled=False, tooltip=f"Previous case ({SHORTCUTS['previous']})"
        )
        self._next = PushButton(text="Next ▶", enabled=False, tooltip=f"Next case ({SHORTCUTS['next']})")
        self._comment = LineEdit(label="Comment")
        self._accept = PushButton(
            text="Accept",
            enabled=False,
            tooltip=f"The mask is right (an edited mask: corrected) ({SHORTCUTS['accepted']})",
        )
        self._needs = PushButton(
            text="Needs correction",
            enabled=False,
            tooltip=f"Flag for correction later ({SHORTCUTS['needs correction']})",
        )
        self._reject = PushButton(
            text="Reject",
            enabled=False,
            tooltip=f"Unusable case; say why in the comment ({SHORTCUTS['rejected']})",
        )
        self._case_line = message_label()
        self._learn = PushButton(
            text="Learn from reviewed cases",
            enabled=False,
            tooltip="Fine-tune the worklist's model on every accepted and corrected case (a new model "
            "version), then re-segment only the cases nobody has touched yet",
        )
        self._steps = SpinBox(label="Learning steps", min=1, max=100_000, value=_default_steps())
        self._learn_line = message_label()
        self._export_to = FileEdit(label="Export to", mode="d")
        self._overwrite = CheckBox(text="Overwrite earlier exports", value=False)
        self._export = PushButton(text="Export series", enabled=False)
        self._export_line = message_label()
        navigation = Container(widgets=[self._previous, self._next], layout="horizontal", labels=False)
        verdicts = Container(
            widgets=[self._accept, self._needs, self._reject], layout="horizontal", labels=False
        )
        for row in (navigation, verdicts):
            row.margins = (0, 0, 0, 0)
        self._table = _make_table()
        table_box = Container(labels=False)  # the Qt table, in its place among the magicgui widgets
        table_box.margins = (0, 0, 0, 0)
        table_box.native.layout().addWidget(self._table)
        super().__init__(
            widgets=[
                self._folder,
                self._cases,
                self._open,
                self._model,
                self._scale,
                self._order,
                self._presegment,
                self._cancel,
                self._progress,
                self._status,
                table_box,
                navigation,
                self._case_line,
                self._comment,
                verdicts,
                self._steps,
                self._learn,
                self._learn_line,
                self._export_to,
                self._overwrite,
                self._export,
                self._export_line,
            ],
            scrollable=True,  # docks scroll on a 768 px screen
        )
        self._worker = None
        self._cancelled = False
        self.worklist: Worklist | None = None
        self.current: str | None = None  # the id of the case on screen
        self._opened_at = 0.0
        self._job = ""  # "segment", "learn" or "export" while a worker runs
        self._mask_layer: Any = None
        self._roles: dict[str, Any] = {}  # role -> the layer showing it
        self._generation = 0  # counts the cases opened: a staged opening stops when another begins
        self._loading = False
        self._awaiting_mask = False  # the case on screen had no mask when it was opened
        self._opening = 0  # counts the cases asked for: a late read of an earlier one is dropped
        self._reader: Any = None  # the worker reading the case being opened
        self._dirty = False
        self._saving = False
        self._save_error = False  # the last background save failed: the mask on screen is unsaved
        # held by the background save from its start to its end: a save on this thread waits for
        # it, so that an older copy of the mask never lands after a newer one
        self._write_lock = threading.Lock()
        self._save_timer = QTimer()
        self._save_timer.setSingleShot(True)
        self._save_timer.timeout.connect(self._save_now)
        self._latest_timer = QTimer()
        self._latest_timer.setSingleShot(True)
        self._latest_timer.timeout.connect(self._save_now)
        self._stage_timer = QTimer()  # places a staged case's layers one per turn of the event loop
        self._stage_timer.setSingleShot(True)
        self._next_step: Any = None
        self._stage_timer.timeout.connect(lambda: self._next_step() if self._next_step else None)

        self._open.changed.connect(self.open_worklist)
        self._presegment.changed.connect(self.presegment)
        self._cancel.changed.connect(self.cancel)
        self._previous.changed.connect(lambda *_: self.step(-1))
        self._next.changed.connect(lambda *_: self.step(1))
        self._accept.changed.connect(lambda *_: self.set_verdict("accepted"))
        self._needs.changed.connect(lambda *_: self.set_verdict("needs correction"))
        self._reject.changed.connect(lambda *_: self.set_verdict("rejected"))
        self._learn.changed.connect(self.learn)
        self._export.changed.connect(self.export)
        self._order.changed.connect(lambda *_: self._fill_table())
        self._table.cellDoubleClicked.connect(lambda row, _col: self.open_case(self._row_case(row)))
        self._bind_keys()
        self.native.destroyed.connect(self._closing)

    # -- opening ------------------------------------------------------------------------------

    def open_worklist(self, *_: Any) -> Worklist | None:
        """Open the worklist in the chosen folder, or start one there from the chosen cases."""
        from napari_r2au.worklist import WORKLIST_FILE, Worklist, WorklistError

        folder = Path(str(self._folder.value or ""))
        if not str(self._folder.value or "").strip() or str(folder) == ".":
            return self._refuse("choose a worklist folder (a new or empty one starts a worklist).")
        if self.running:
            return self._refuse("wait for the running job to finish (or cancel it) first.")
        if self.worklist is not None and folder.expanduser().resolve() == self.worklist.folder:
            self._close_worklist()  # opened again (a refresh): this dock's own lock is released first
        self._leave_case()
        try:
            if (folder / WORKLIST_FILE).is_file():
                worklist = Worklist.open(folder)
            else:
                cases = str(self._cases.value or "").strip()
                if not cases or cases == ".":
                    return self._refuse(
                        f"{folder} holds no worklist yet: choose the cases to start one with."
                    )
                model = self._model_name()
                worklist = Worklist.create(folder, [cases], model=model, scale=self._scale.value or None)
        except (WorklistError, OSError) as exc:
            return self._refuse(describe_error(exc))
        self._close_worklist()
        self.worklist = worklist
        if worklist.model:
            self._model.refresh(select=worklist.model)
        self._scale.value = round(worklist.scale or 0.0, SCALE_DECIMALS)
        counts = {k: v for k, v in worklist.counts().items() if v}
        self._status.value = f"{len(worklist.cases)} cases: " + ", ".join(
            f"{v} {k}" for k, v in counts.items()
        )
        self._fill_table()
        self._enable()
        first = next(
            (
                c
                for c in worklist.ordered(self._order_key())
                if c.status not in ("accepted", "corrected", "rejected")
            ),
            None,
        )
        self.open_case((first or worklist.cases[0]).id)
        return worklist

    def _case_image_layer(self) -> Any:
        """The image layer of the case on screen (None before one is opened)."""
        return next((lyr for lyr in self._viewer.layers if lyr.metadata.get(ROLE_KEY) == "image"), None)

    def _model_name(self) -> str | None:
        path = self._model.path
        if path is None:
            return None
        meta = self._model.metadata() or {}
        return meta.get("name") or Path(path).stem

    def _refuse(self, message: str) -> None:
        self._status.value = f"Not done: {message}"
        notify_warning(f"Worklist: {message}")
        return None

    def _close_worklist(self) -> None:
        self._leave_case()
        if self.worklist is not None:
            self.worklist.close()
        self.worklist = None

    def _closing(self, *_: Any) -> None:
        """The dock (or napari) closes: the open case's edits are saved and the lock released."""
        self._next_step = None  # no layer is placed in a closing viewer
        with contextlib.suppress(RuntimeError):
            self._stage_timer.stop()
        try:
            self._flush()
        except Exception as exc:  # the layer may be gone already; the last autosave stands
            notify_error(f"Worklist: the last edit could not be saved on closing: {describe_error(exc)}")
        finally:
            if self.worklist is not None:
                self.worklist.close()

    def close_worklist(self) -> None:
        """Save the case on screen, remove its layers and release the worklist."""
        self._close_worklist()
        self._remove_case_layers()
        self.current = None
        self._fill_table()
        self._enable()

    # -- the table ----------------------------------------------------------------------------

    def _order_key(self) -> str:
        return ORDER_CHOICES[str(self._order.value)]

    def _fill_table(self) -> None:
        from qtpy.QtCore import Qt

        table = self._table
        table.setSortingEnabled(False)
        table.setRowCount(0)
        if self.worklist is None:
            return
        cases = self.worklist.ordered(self._order_key())
        table.setRowCount(len(cases))
        for row, case in enumerate(cases):
            self._fill_row(row, case)
        # no sort column: the chosen order stands until a header is clicked
        table.horizontalHeader().setSortIndicator(-1, Qt.SortOrder.AscendingOrder)
        table.setSortingEnabled(True)
        self._mark_current()

    def _fill_row(self, row: int, case: Case) -> None:
        from qtpy.QtCore import Qt
        from qtpy.QtWidgets import QTableWidgetItem

        values = (
            case.id,
            case.status,
            case.model or "",
            case.uncertainty,
            case.dice,
            "yes" if case.edited else "",
            case.comment,
            _minutes(case.seconds),
        )
        for column, value in enumerate(values):
            item = QTableWidgetItem()
            if isinstance(value, float):  # numbers sort as numbers
                item.setData(Qt.ItemDataRole.DisplayRole, round(value, 3))
            else:
                item.setText("" if value is None else str(value))
            item.setData(Qt.ItemDataRole.UserRole, case.id)
            item.setFlags(item.flags() & ~Qt.ItemFlag.ItemIsEditable)
            self._table.setItem(row, column, item)

    def _row_case(self, row: int) -> str | None:
        from qtpy.QtCore import Qt

        item = self._table.item(row, 0)
        return None if item is None else item.data(Qt.ItemDataRole.UserRole)

    def _row_of(self, case_id: str) -> int | None:
        for row in range(self._table.rowCount()):
            if self._row_case(row) == case_id:
                return row
        return None

    def _refresh_case(self, case_id: str) -> None:
        """Show a case's row as the worklist now has it."""
        row = self._row_of(case_id)
        if row is None or self.worklist is None:
            return
        sorting = self._table.isSortingEnabled()
        self._table.setSortingEnabled(False)  # a row re-sorted mid-update would get mixed cells
        self._fill_row(row, self.worklist.case(case_id))
        self._table.setSortingEnabled(sorting)
        if case_id == self.current:
            self._show_case_line()

    def _mark_current(self) -> None:
        row = self._row_of(self.current) if self.current else None
        if row is not None:
            self._table.selectRow(row)

    # -- one case at a time --------------------------------------------------------------

    def step(self, offset: int) -> None:
        """The next (or previous) case in the table's order."""
        if self.worklist is None or not self._table.rowCount():
            return
        row = self._row_of(self.current) if self.current else None
        target = 0 if row is None else row + offset
        if not 0 <= target < self._table.rowCount():
            self._case_line.value = "That was the last case." if offset > 0 else "This is the first case."
            return
        self.open_case(self._row_case(target))

    def open_case(self, case_id: str | None, staged: bool = False) -> None:
        """Show a case: its image, the mask on top (readable at once: the maps are added hidden),
        ready to paint on. Leaving the previous case saves its edits first. The files are read
        in a worker (a 3504x2336 photograph and its maps take a second); the layers are then
        updated on the GUI thread. ``staged``: see :meth:`_show_case_layers`."""
        if self.worklist is None or case_id is None:
            return
        from napari.qt.threading import thread_worker

        worklist = self.worklist
        case = worklist.case(case_id)
        self._leave_case()
        self._generation += 1  # a staged placing of the case before stops now, not when the next is read
        self._next_step = None
        with contextlib.suppress(RuntimeError):
            self._stage_timer.stop()
        if self._mask_layer is not None:  # no stroke lands on the case being left while the next is read
            self._mask_layer.editable = False
        self._mask_layer = None
        self._awaiting_mask = False
        self.current = case.id
        self._opening += 1
        ticket = self._opening
        self._mark_current()
        self._case_line.value = f"Opening case {case.id}…"

        @thread_worker(ignore_errors=True, start_thread=False)  # errors are said by the handler below
        def read() -> tuple[list, Any, dict, Any]:
            warm_layer_imports()  # the case's mask layer would import pandas on the GUI thread
            image_layers = _read_case_layers(worklist, case)
            mask = worklist.read_mask(case)
            maps = worklist.read_maps(case) if mask is not None else {}
            return image_layers, mask, maps, worklist.reference(case)

        worker = read()
        worker.returned.connect(lambda files: self._opened(ticket, case, files, staged))
        worker.errored.connect(lambda exc: self._open_failed(ticket, case, exc))
        self._reader = worker  # kept until it is done
        worker.start()

    @property
    def opening(self) -> bool:
        """A case's files are being read (the case on screen is about to change)."""
        return self._reader is not None

    def _opened(self, ticket: int, case: Case, files: tuple, staged: bool) -> None:
        if ticket != self._opening:  # another case was asked for meanwhile
            return
        self._reader = None
        if self.worklist is None or self.current != case.id:
            return
        image_layers, mask, maps, reference = files
        self._awaiting_mask = mask is None
        self._show_case_layers(case, image_layers, mask, maps, reference, staged=staged)
        if mask is not None and case.status == "segmented":
            self.worklist.set_status(case, "in review")
        self._comment.value = case.comment
        self._opened_at = time.monotonic()
        self._refresh_case(case.id)
        self._mark_current()
        self._show_case_line()

    def _open_failed(self, ticket: int, case: Case, exc: BaseException) -> None:
        if ticket != self._opening:
            return
        self._reader = None
        self._remove_case_layers()  # the case before is no longer on screen as if it were this one
        notify_error(f"Worklist: case {case.id}: {describe_error(exc)}")
        self._case_line.value = f"Case {case.id} cannot be opened: {describe_error(exc)}"

    def _show_case_layers(
        self, case: Case, image_layers: list, mask: Any, maps: dict, reference: Any, staged: bool = False
    ) -> None:
        """The case's image, maps, reference and mask in the viewer, in the layers of the case
        before when there are (new data in place: removing and adding layers costs a
        second or more of the GUI thread, updating them a fraction); maps added hidden.

        ``staged``: one layer per turn of the event loop, the mask last (a case whose mask
        arrives while the reviewer works: adding seven new layers at once would freeze
        napari for over a second).
        """
        tag = {CASE_KEY: case.id}
        data, kwargs, _ = image_layers[0]  # the image (a DICOM series' SEG files are not the worklist's mask)
        place = {k: kwargs[k] for k in ("scale", "translate") if k in kwargs}
        steps: list[tuple[str, str, Any, str, bool, Any, dict[str, Any]]] = []

        def show(
            role: str,
            kind: str,
            array: Any,
            name: str,
            visible: bool = True,
            metadata: Any = None,
            **props: Any,
        ) -> None:
            steps.append(
                (
                    role,
                    kind,
                    array,
                    name,
                    visible,
                    {**(metadata or {}), **tag, ROLE_KEY: role},
                    {**props, **place},
                )
            )

        image_kwargs = {
            k: v for k, v in kwargs.items() if k not in ("name", "metadata", "scale", "translate")
        }
        show("image", "image", data, f"{case.id} image", metadata=kwargs.get("metadata"), **image_kwargs)
        hidden = {RUN_KEY: f"worklist:{case.id}"}
        names: dict[str, Any] = {"attention_layers": []}
        if "probability" in maps:
            names["probability_layer"] = f"{case.id} probability"
            show(
                "probability",
                "image",
                maps["probability"],
                names["probability_layer"],
                False,
                hidden,
                colormap="magma",
                contrast_limits=(0.0, 1.0),
            )
        for index, alpha in enumerate(maps.get("attention", []), start=1):
            names["attention_layers"].append(f"{case.id} attention {index}")
            show(
                f"attention {index}",
                "image",
                alpha,
                names["attention_layers"][-1],
                False,
                hidden,
                colormap="turbo",
                blending="additive",
                opacity=0.5,
                contrast_limits=(0.0, 1.0),
            )
        if "uncertainty" in maps:
            names["uncertainty_layer"] = f"{case.id} uncertainty"
            top = float(np.max(maps["uncertainty"])) or 1.0
            show(
                "uncertainty",
                "image",
                maps["uncertainty"],
                names["uncertainty_layer"],
                False,
                hidden,
                colormap="inferno",
                blending="additive",
                opacity=0.7,
                contrast_limits=(0.0, top),
            )
        if reference is not None:
            show("reference", "labels", reference.astype(np.uint8), f"{case.id} reference", False)
        assert self.worklist is not None
        if mask is None:  # not segmented yet: an empty mask to paint on by hand if need be
            spatial = np.shape(data)[:-1] if kwargs.get("rgb") else np.shape(data)
            mask = np.zeros(spatial, np.uint8)
        record = dict(self.worklist.record(case), image_layer=f"{case.id} image", **names)
        colours = mask_colormap(max(1, int(mask.max(initial=0))))
        show(
            "mask",
            "labels",
            mask,
            f"{case.id} mask",
            metadata=with_record({}, record),
            **({"colormap": colours} if colours is not None else {}),
        )
        wanted = {step[0] for step in steps}
        self._generation += 1
        generation = self._generation
        self._next_step = None  # a staged placing of an earlier case stops here

        def place_next(index: int) -> None:
            if generation != self._generation:  # another case was opened meanwhile: its own placing goes on
                return
            role, kind, array, name, visible, metadata, props = steps[index]
            painted = staged and role == "mask" and self._dirty and role in self._roles
            if painted:  # the reviewer painted while the maps were placed: the painting stays
                layer = self._roles[role]
                layer.metadata = metadata
            else:
                layer = self._place(role, kind, array, name, visible, metadata, **props)
            if role == "mask":
                layer.editable = True
                self._viewer.layers.selection.active = layer
                self._mask_layer = layer
            if index + 1 < len(steps):
                if staged:  # the next layer on the next turn of the event loop (stopped on closing)
                    self._next_step = lambda: place_next(index + 1)
                    self._stage_timer.start(0)
                else:
                    place_next(index + 1)
                return
            for role in [r for r in self._roles if r not in wanted]:  # e.g. a case without a mask yet
                layer = self._roles.pop(role)
                if layer in self._viewer.layers:
                    self._viewer.layers.remove(layer)
            self._next_step = None
            if self._mask_layer is not None:  # on top of the maps added after it
                layers = self._viewer.layers
                layers.move(layers.index(self._mask_layer), len(layers))
                layers.selection.active = self._mask_layer

        place_next(0)

    def _place(
        self, role: str, kind: str, data: Any, name: str, visible: bool, metadata: dict, **props: Any
    ) -> Any:
        """The layer of ``role``, updated in place if there is one of the right kind, else added."""
        import napari.layers

        cls = napari.layers.Image if kind == "image" else napari.layers.Labels
        layer = self._roles.get(role)
        rgb = props.pop("rgb", None)
        reusable = (
            layer is not None
            and layer in self._viewer.layers
            and isinstance(layer, cls)
            and (rgb is None or bool(layer.rgb) == bool(rgb))
            and layer.data.ndim == np.ndim(data)
        )
        if not reusable:
            if layer is not None and layer in self._viewer.layers:
                self._viewer.layers.remove(layer)
            add = self._viewer.add_image if kind == "image" else self._viewer.add_labels
            extra = {} if rgb is None else {"rgb": rgb}
            # the mask is selected once placed; the maps and the image do not take the selection
            with adding_without_selecting(self._viewer):
                layer = add(data, name=name, visible=visible, metadata=metadata, **extra, **props)
            if kind == "labels" and role == "mask":
                layer.events.paint.connect(self._edited)
                layer.events.data.connect(self._edited)
            self._roles[role] = layer
            return layer
        self._loading = True  # new data is no edit
        try:
            layer.data = data
        finally:
            self._loading = False
        layer.name, layer.metadata = name, metadata
        for key, value in props.items():
            setattr(layer, key, value)
        if kind == "image" and "contrast_limits" not in props and not layer.rgb:
            layer.reset_contrast_limits()
        return layer

    def _remove_case_layers(self) -> None:
        for layer in [lyr for lyr in self._viewer.layers if CASE_KEY in (lyr.metadata or {})]:
            self._viewer.layers.remove(layer)
        self._roles.clear()
        self._mask_layer = None

    def _leave_case(self) -> None:
        """Save the case on screen and count the time it was on screen."""
        if self.worklist is None or self.current is None:
            return
        self._flush()
        if self._opened_at:
            seconds = time.monotonic() - self._opened_at
            self._opened_at = 0.0
            self.worklist.add_time(self.worklist.case(self.current), seconds)
            self._refresh_case(self.current)

    def _show_case_line(self) -> None:
        if self.worklist is None or self.current is None:
            return
        case = self.worklist.case(self.current)
        position = self._row_of(case.id)
        where = "" if position is None else f" ({position + 1} of {self._table.rowCount()})"
        dice = "" if case.dice is None else f", Dice {case.dice:.3f} vs reference"
        # the scale the network saw: the worklist's, or the one the model's rule gave this image
        at = "" if case.scale is None or abs(case.scale - 1.0) < 1e-6 else f" at scale {case.scale:.3g}"
        made = f", mask by {case.model}{at}" if case.model else ", not segmented yet"
        self._case_line.value = f"Case {case.id}{where}: {case.status}{made}{dice}"

    # -- saving edits -------------------------------------------------------------------------

    def _edited(self, *_: Any) -> None:
        """A stroke (or a fill) on the mask: save soon, in the background."""
        if self._loading:
            return
        self._dirty = True
        self._save_timer.start(SAVE_DELAY_MS)
        if not self._latest_timer.isActive():
            self._latest_timer.start(SAVE_AT_LATEST_MS)

    def _save_now(self) -> None:
        """Hand a copy of the mask to a background thread (one save at a time)."""
        if not self._dirty or self._mask_layer is None or self.worklist is None or self.current is None:
            return
        if self._saving:  # the running save will start another when it ends
            return
        from napari.qt.threading import thread_worker

        self._save_timer.stop()
        self._latest_timer.stop()
        self._dirty = False
        self._saving = True
        worklist, case = self.worklist, self.worklist.case(self.current)
        mask = np.array(self._mask_layer.data)  # the copy is quick; the TIFF and the record are not
        lock = self._write_lock
        lock.acquire()

        @thread_worker(ignore_errors=True, start_thread=False)  # errors are said by the handler below
        def save() -> str:
            try:
                worklist.save_mask(case, mask)
            except BaseException:
                self._save_error = True  # known before the lock is released: leaving the case retries
                raise
            finally:
                lock.release()
            return case.id

        worker = save()
        worker.returned.connect(self._saved)
        worker.errored.connect(self._save_failed)
        worker.finished.connect(self._save_finished)
        worker.start()

    def _saved(self, case_id: str) -> None:
        self._refresh_case(case_id)

    def _save_failed(self, exc: BaseException) -> None:
        # tried again on the next stroke, or when the case is left (_save_error, set in the worker)
        notify_error(f"Worklist: the mask could not be saved: {describe_error(exc)}")

    def _save_finished(self) -> None:
        self._saving = False
        if self._dirty:  # strokes during the save; a failed save is retried on leaving the case
            self._save_timer.start(SAVE_DELAY_MS)

    def _flush(self) -> None:
        """Save a pending edit now, on this thread (leaving a case, a verdict, closing)."""
        with contextlib.suppress(RuntimeError):  # napari closing: the timers may be deleted already
            self._save_timer.stop()
            self._latest_timer.stop()
        with self._write_lock:  # a background save still running ends first
            pending = self._dirty or self._save_error
            if not (pending and self._mask_layer is not None and self.worklist and self.current):
                return
            self.worklist.save_mask(self.worklist.case(self.current), np.array(self._mask_layer.data))
            self._dirty = self._save_error = False  # only once it is written
        self._refresh_case(self.current)

    # -- verdicts -----------------------------------------------------------------------------

    def set_verdict(self, status: str) -> None:
        """Accept, flag or reject the case on screen (with the comment), then go to the next."""
        from napari_r2au.worklist import WorklistError

        if self.worklist is None or self.current is None:
            return
        case = self.worklist.case(self.current)
        self._flush()
        try:
            self.worklist.set_status(case, status, str(self._comment.value or ""))
        except WorklistError as exc:
            self._case_line.value = f"Not done: {exc}"
            notify_warning(f"Worklist: {exc}")
            return
        self._refresh_case(case.id)
        self.step(1)

    # -- jobs ---------------------------------------------------------------------------------

    def presegment(self, *_: Any) -> None:
        from napari_r2au.worklist import iter_segment

        if self.worklist is None or self.running:
            return
        if self._model.path is None:
            self._refuse("choose a model first.")
            return
        todo = [c for c in self.worklist.cases if c.untouched]
        if not todo:
            self._status.value = "Every case has been segmented or touched; nothing to pre-segment."
            return
        if not self._take_scale():
            return
        path = self._model.path

        worklist, first = self.worklist, self.current

        def job() -> Generator[Any, None, Any]:
            from napari_r2au.model_files import load_model

            with quiet_loading():  # torch and the model, loaded without stalling napari (widgets.stalls)
                model = load_model(path)
            return (yield from iter_segment(worklist, model, todo, first=first))

        self._run_job("segment", job(), f"Pre-segmenting {len(todo)} cases…")

    def _take_scale(self) -> bool:
        """Keep the Scale field in the worklist before a job segments or learns with it."""
        from napari_r2au.worklist import WorklistError

        assert self.worklist is not None
        shown, kept = self._scale.value or None, self.worklist.scale
        if shown == (None if kept is None else round(kept, SCALE_DECIMALS)):
            return True  # not edited: the worklist keeps its own value (0.3333 shows as 0.3333)
        try:
            self.worklist.set_scale(shown)
        except (WorklistError, OSError) as exc:
            self._refuse(describe_error(exc))
            return False
        return True

    def learn(self, *_: Any) -> None:
        from napari_r2au.training.settings import FinetuneSettings
        from napari_r2au.worklist import LEARNABLE, iter_learn

        if self.worklist is None or self.running:
            return
        self._flush()
        chosen = [c for c in self.worklist.cases if c.status in LEARNABLE]
        if not chosen:
            self._refuse("accept or correct some cases first; the model learns from those.")
            return
        if not self._take_scale():
            return
        job = iter_learn(self.worklist, settings=FinetuneSettings(steps=int(self._steps.value)))
        self._run_job("learn", job, f"Learning from {len(chosen)} reviewed cases…")

    def export(self, *_: Any) -> None:
        from napari_r2au.worklist import export_series

        if self.worklist is None or self.running:
            return
        target = str(self._export_to.value or "").strip()
        if not target or target == ".":
            self._export_line.value = "Not done: choose a folder to export to."
            return
        self._flush()
        worklist, overwrite = self.worklist, bool(self._overwrite.value)

        def job() -> Generator[Any, None, Any]:
            from napari_r2au.worklist import WorklistEvent

            yield WorklistEvent("export", 0, 1)
            return export_series(worklist, target, overwrite=overwrite)

        self._run_job("export", job(), "Exporting…")

    def _run_job(self, kind: str, job: Generator[Any, None, Any], message: str) -> None:
        self._job = kind
        self._set_running(True, message)
        self._start(job)

    def _set_running(self, running: bool, message: str | None = None) -> None:
        for button in (self._open, self._presegment, self._learn, self._export):
            button.enabled = not running and (button is self._open or self.worklist is not None)
        self._model.enabled = not running
        self._scale.enabled = not running  # the scale a running job uses stays the one shown
        self._cancel.enabled = running
        if running:
            self._progress.max, self._progress.value = 1000, 0
        if message is not None:
            self._status.value = message

    def _on_progress(self, event: WorklistEvent) -> None:
        detail = event.detail
        if event.stage == "segment" and detail is not None and event.total:
            fraction = (event.done + detail.done / max(1, detail.total)) / event.total
            self._progress.value = int(1000 * fraction)
            self._status.value = f"Segmenting case {event.case} ({event.done + 1} of {event.total})…"
        elif event.stage == "case" and event.case is not None:
            self._progress.value = int(1000 * event.done / max(1, event.total))
            self._refresh_case(event.case)
            case = self.worklist.case(event.case) if self.worklist is not None else None
            # the case on screen, waiting for its mask, unless the reviewer has started painting
            waiting = case is not None and case.id == self.current and self._awaiting_mask
            if waiting and not self._dirty and case.status == "segmented":
                self.open_case(case.id, staged=True)
        elif event.stage == "learn" and event.total:
            self._progress.value = int(1000 * min(1.0, event.done / event.total))
            self._status.value = f"Learning: step {event.done} of {event.total}…"
        elif event.stage == "learned":
            result = detail
            if result.model is None:
                self._learn_line.value = "Training gave no model (stopped before its first checkpoint)."
            elif not result.adopted:
                self._learn_line.value = _kept_aside_line(result)
                refresh_model_pickers()
            else:
                self._learn_line.value = (
                    f"New model {result.model} from {len(result.cases)} cases: held-out Dice "
                    f"{_score(result.dice_before)} → {_score(result.dice_after)}; re-segmenting the untouched cases…"
                )
                refresh_model_pickers()
                self._model.refresh(select=result.model)

    def _on_result(self, result: Any) -> None:
        from napari_r2au.worklist import UNINFORMATIVE_HELD_OUT

        if self._job == "segment":
            self._status.value = f"Pre-segmented {len(result)} cases."
        elif self._job == "learn":
            if result.model is not None and not result.adopted:
                self._learn_line.value = _kept_aside_line(result)
                notify_info(f"Worklist: {self._learn_line.value}")
            elif result.model is not None:
                self._learn_line.value = (
                    f"New model {result.model} from {len(result.cases)} cases: held-out Dice "
                    f"{_score(result.dice_before)} → {_score(result.dice_after)}"
                    + (f" ({UNINFORMATIVE_HELD_OUT})" if result.held_out_uninformative else "")
                    + f"; {len(result.resegmented)} untouched cases re-segmented with it."
                )
                notify_info(f"Worklist: {self._learn_line.value}")
            self._status.value = "Learning done."
        elif self._job == "export":
            self._export_line.value = f"Wrote {len(result)} files to {self._export_to.value}"
            self._status.value = "Exported."
        self._fill_table()

    def _on_error(self, exc: BaseException) -> None:
        notify_error(f"Worklist: {describe_error(exc)}")
        self._status.value = f"Failed: {describe_error(exc)}"
        if self._job == "export":
            self._export_line.value = f"Not written: {describe_error(exc)}"

    def _on_finish(self) -> None:
        self._worker = None
        self._set_running(False)
        if self._cancelled:
            self._status.value = "Cancelled; the finished cases are saved."
            self._fill_table()
        self._job = ""

    def _enable(self) -> None:
        on = self.worklist is not None
        for button in (
            self._presegment,
            self._previous,
            self._next,
            self._accept,
            self._needs,
            self._reject,
            self._learn,
            self._export,
        ):
            button.enabled = on and not self.running

    # -- keys ---------------------------------------------------------------------------------

    def _bind_keys(self) -> None:
        actions = {
            "next": lambda: self.step(1),
            "previous": lambda: self.step(-1),
            "accepted": lambda: self.set_verdict("accepted"),
            "needs correction": lambda: self.set_verdict("needs correction"),
            "rejected": lambda: self.set_verdict("rejected"),
        }
        for name, key in SHORTCUTS.items():
            action = actions[name]
            self._viewer.bind_key(key, lambda _viewer, action=action: action(), overwrite=True)


def _make_table() -> Any:
    from qtpy.QtWidgets import QAbstractItemView, QHeaderView, QSizePolicy, QTableWidget

    table = QTableWidget(0, len(COLUMNS))
    table.setHorizontalHeaderLabels(list(COLUMNS))
    table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
    table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
    table.verticalHeader().setVisible(False)
    table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Interactive)
    table.horizontalHeader().setStretchLastSection(True)
    # as wide as the dock, not as its widest row: the table scrolls sideways instead
    table.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
    table.setMinimumHeight(180)
    table.setMaximumHeight(260)
    table.setToolTip("Double-click a case to open it; click a header to sort")
    return table


def _read_case_layers(worklist: Worklist, case: Case) -> list:
    """The case's image as the napari reader gives it (a DICOM series is one stack)."""
    from napari_r2au._reader import read_layers

    path = worklist.path_of(case.image)
    if not path.exists():
        from napari_r2au.worklist import WorklistError

        raise WorklistError(f"its image {path} is gone (moved or deleted?)")
    return read_layers(str(path), masks=False)


def _default_steps() -> int:
    from napari_r2au.training.settings import FinetuneSettings  # torch-free

    return FinetuneSettings().steps


def _minutes(seconds: float) -> str:
    if not seconds:
        return ""
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def _score(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _kept_aside_line(result: Any) -> str:
    """What the dock says of a new version that scored lower than its parent (not put to use)."""
    return (
        f"New model {result.model} kept aside: it scores lower than {result.parent} on the held-out "
        f"corrections (Dice {_score(result.dice_before)} → {_score(result.dice_after)}). The worklist "
        f"keeps {result.parent} and no mask changed; to use {result.model} anyway, choose it and Pre-segment."
    )
