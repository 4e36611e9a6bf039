"""A worklist: a series of cases reviewed one after another, kept in a folder of its own.

The folder holds ``worklist.json`` (the cases, their status, who reviewed them, the model
versions learned) and one folder per case under ``cases/`` with the current mask and its
record (``mask.tif`` + ``mask.json``, the same record Review exports), the model's own
mask (``model_mask.tif``, which tells the corrections apart) and the maps the reviewer
looks at (probability, uncertainty, attention). Every write is atomic, so a crash or
``kill -9`` leaves each file either as it was or as it became. While a worklist is open
for writing, a lock on ``worklist.lock`` keeps a second window or command off it; the
operating system releases the lock when the process ends, however it ends.

The long jobs (pre-segmenting the cases, learning from the corrected ones) are
generators of :class:`WorklistEvent`, driven by the napari dock's worker and by
``r2au worklist`` alike. Nothing here imports napari or Qt.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import socket
import threading
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .io import (
    find_images,
    mask_folder_name,
    named_like_mask,
    pairing_id,
    read_image,
    write_bytes_atomic,
    write_tiff,
)
from .mask_record import (
    edited,
    export_record,
    now,
    read_sidecar,
    record_from_export,
    reviewer_name,
    segment_record,
    sidecar_text,
    with_metrics,
)

WORKLIST_FORMAT = "napari-r2au-worklist"
WORKLIST_FILE = "worklist.json"
LOCK_FILE = "worklist.lock"

#: a case's life: made, segmented, opened, then a verdict
STATUSES = ("new", "segmented", "in review", "needs correction", "accepted", "corrected", "rejected")
#: verdicts: a case with one is never re-segmented
REVIEWED = frozenset({"accepted", "corrected", "rejected"})
#: the cases whose masks a model may learn from (a person has vouched for them)
LEARNABLE = frozenset({"accepted", "corrected"})
#: the orders the table and ``r2au worklist status`` offer
ORDERS = ("file", "uncertain")


class WorklistError(ValueError):
    """A worklist cannot be made, opened or changed as asked; the message says why."""


class WorklistLocked(WorklistError):
    """Another window or command has the worklist open for writing."""


@dataclass
class Case:
    """One case of a worklist: where its image is, what was done to it, by whom."""

    id: str
    image: str  # relative to the worklist folder when it can be, else absolute
    reference: str | None = None
    kind: str = "image"  # "image" (a file) or "dicom" (a folder holding one series)
    status: str = "new"
    model: str | None = None  # the model version that made the current mask
    model_sha256: str | None = None
    scale: float | None = None  # the scale the network saw (the mask record's)
    #: the worklist's scale when the model's mask was made (None: the model's own rule); a
    #: segment run re-does an untouched case whose mask was made at another worklist scale
    scale_asked: float | None = None
    uncertainty: float | None = None
    dice: float | None = None
    edited: bool = False  # the mask differs from the model's
    comment: str = ""
    reviewer: str | None = None
    seconds: float = 0.0  # time the case was on screen in review
    segmented: str | None = None
    reviewed: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def untouched(self) -> bool:
        """Nobody has opened, edited or judged it: a new model may re-segment it."""
        return self.status in ("new", "segmented") and not self.edited


@dataclass
class WorklistEvent:
    """One step of a worklist job: ``done`` of ``total`` cases (or training steps).

    ``stage``: "segment" (a case in progress, ``detail`` the engine's Progress),
    "case" (a case finished: the table row changes), "learn" (``detail`` the trainer's
    TrainEvent), "learned" (``detail`` the fine-tune result).
    """

    stage: str
    done: int
    total: int
    case: str | None = None
    detail: Any = None
    message: str = ""


# -- finding the cases ---------------------------------------------------------------------

_REFERENCE_ROLE = re.compile(r"manual|ho$|label|gt|seg", re.IGNORECASE)


def _reference_folders(folder: Path) -> list[Path]:
    """Folders that may hold the reference masks of the images in ``folder``: subfolders
    and siblings named like masks. When both a field-of-view folder (DRIVE's, HRF's,
    STARE's ``mask/``) and a manual one exist, the manual one: a ``mask`` folder beside
    ``1st_manual`` holds fields of view, not references."""
    candidates = []
    for parent in (folder, folder.parent):
        with contextlib.suppress(OSError):
            candidates += [
                p for p in sorted(parent.iterdir()) if p.is_dir() and p != folder and mask_folder_name(p.name)
            ]
    manual = [p for p in candidates if _REFERENCE_ROLE.search(p.name)]
    return manual or candidates or _twin_folders(folder)


def _twin_folders(folder: Path) -> list[Path]:
    """Siblings named like ``folder`` with masks for images: LUNG_CT's ``2d_images`` and
    ``2d_masks``, ``train_images`` and ``train_labels`` (asked only when no folder is
    named like masks on its own)."""
    stem = re.sub(r"images?|imgs?", "", folder.name, flags=re.IGNORECASE)
    if stem == folder.name:
        return []
    with contextlib.suppress(OSError):
        return [
            p
            for p in sorted(folder.parent.iterdir())
            if p.is_dir()
            and p != folder
            and re.search(r"masks?|labels?", p.name, re.IGNORECASE)
            and re.sub(r"masks?|labels?", "", p.name, flags=re.IGNORECASE) == stem
        ]
    return []


def _safe_id(text: str, taken: set[str]) -> str:
    """A case id that is a plain folder name (a file name never becomes a path unchecked)."""
    base = re.sub(r"[^\w.+-]+", "_", text).strip("._")[:80] or "case"
    unique, n = base, 2
    while unique.lower() in taken:
        unique, n = f"{base}-{n}", n + 1
    taken.add(unique.lower())
    return unique


def discover_cases(sources: Sequence[str | os.PathLike]) -> list[dict[str, Any]]:
    """The cases in folders of images (reference masks paired by id as ``r2au evaluate``
    pairs them: beside the images, or in a mask folder next to them), folders of DICOM
    series (one case per series), or CSV files (columns ``image`` and optionally
    ``reference`` and ``id``; paths relative to the CSV). Returns dicts with id, image,
    reference, kind, in the order given (files sorted by name)."""
    from .dicom import dicom_series_files

    found: list[dict[str, Any]] = []
    for source in sources:
        path = Path(source).expanduser()
        if not path.exists():
            raise WorklistError(f"{path}: no such file or folder")
        if path.is_file() and path.suffix.lower() == ".csv":
            found += _csv_cases(path)
        elif path.is_file():
            found.append({"id": pairing_id(path), "image": path, "reference": None, "kind": "image"})
        elif dicom_series_files(path):
            found.append({"id": path.name, "image": path, "reference": None, "kind": "dicom"})
        else:
            series = [p for p in sorted(path.iterdir()) if p.is_dir() and dicom_series_files(p)]
            images = [p for p in find_images(path) if not named_like_mask(p)]
            if not series and not images:
                raise WorklistError(f"{path}: no images or DICOM series in it")
            references: dict[str, Path] = {}
            for folder in _reference_folders(path)[:1]:
                for p in find_images(folder):
                    references.setdefault(pairing_id(p), p)
            for p in find_images(path):  # masks beside the images: case1.png with case1_seg.png
                if named_like_mask(p):
                    references.setdefault(pairing_id(p), p)
            for p in images:
                key = pairing_id(p)
                found.append({"id": key, "image": p, "reference": references.get(key), "kind": "image"})
            found += [{"id": p.name, "image": p, "reference": None, "kind": "dicom"} for p in series]
    if not found:
        raise WorklistError("no cases found")
    taken: set[str] = set()
    for case in found:
        case["id"] = _safe_id(case["id"], taken)
    return found


def _csv_cases(path: Path) -> list[dict[str, Any]]:
    from .dicom import dicom_series_files

    with open(path, newline="", encoding="utf-8-sig") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or "image" not in rows[0]:
        raise WorklistError(
            f"{path}: a case list needs a header row with an 'image' column (and optionally 'reference', 'id')"
        )
    cases = []
    for number, row in enumerate(rows, start=2):
        if not (row.get("image") or "").strip():
            raise WorklistError(f"{path}, line {number}: no image path")
        image = (path.parent / row["image"].strip()).resolve()
        reference = (row.get("reference") or "").strip()
        if not image.exists():
            raise WorklistError(f"{path}, line {number}: {image}: no such file or folder")
        if reference and not (path.parent / reference).is_file():
            raise WorklistError(f"{path}, line {number}: {(path.parent / reference).resolve()}: no such file")
        kind = "dicom" if image.is_dir() and dicom_series_files(image) else "image"
        cases.append(
            {
                "id": (row.get("id") or "").strip() or (image.name if kind == "dicom" else pairing_id(image)),
                "image": image,
                "reference": (path.parent / reference).resolve() if reference else None,
                "kind": kind,
            }
        )
    return cases


# -- the lock ------------------------------------------------------------------------------


class _Lock:
    """An exclusive lock on the worklist's lock file, held while the worklist is open.

    An advisory lock of the operating system (flock; msvcrt on Windows), so a crashed or
    killed holder never leaves a stale lock behind; the file names the holder for the message.
    """

    def __init__(self, path: Path):
        self.path = path
        self._handle: Any = None

    def acquire(self) -> None:
        handle = open(self.path, "a+")  # noqa: SIM115 - held open while locked
        try:
            if os.name == "nt":
                import msvcrt

                handle.seek(0)
                msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
            else:
                import fcntl

                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise WorklistLocked(
                f"{self.path.parent}: the worklist is open elsewhere ({holder}); close it there first"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since {now()}\n")
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        if self._handle is not None:
            with contextlib.suppress(OSError):
                self._handle.seek(0)
                self._handle.truncate()
            self._handle.close()  # closing the file releases the lock
            self._handle = None


# -- the worklist --------------------------------------------------------------------------


def _read_cases(folder: Path, items: Any) -> list[Case]:
    """The cases of a worklist.json, checked: a worklist may come from another machine, and
    an id is a folder name under cases/ (one like ``../x`` would write outside)."""
    if not isinstance(items, list):
        raise WorklistError(f"{folder / WORKLIST_FILE}: 'cases' is not a list")
    cases, taken = [], set()
    for item in items:
        try:
            case = Case(**item)
        except TypeError as exc:  # not a dict, a key missing, a key this version does not know
            raise WorklistError(f"{folder / WORKLIST_FILE}: a case it lists cannot be read ({exc})") from None
        if not isinstance(case.id, str) or _safe_id(case.id, set()) != case.id or case.id.lower() in taken:
            raise WorklistError(
                f"{folder / WORKLIST_FILE}: the case id {case.id!r} is not a plain, unique folder name"
            )
        taken.add(case.id.lower())
        cases.append(case)
    return cases


def _checked_scale(scale: Any, folder: Path) -> float | None:
    """A worklist's scale: None (each model's own rule) or a positive number up to the
    engine's largest."""
    from .engine import MAX_SCALE

    if scale is None or scale == 0:
        return None
    try:
        value = float(scale)
    except (TypeError, ValueError):
        raise WorklistError(f"{folder}: the scale must be a number, not {scale!r}") from None
    if not 0 < value <= MAX_SCALE:
        raise WorklistError(f"{folder}: the scale must be above 0 and at most {MAX_SCALE:g}, not {value:g}")
    return value


class Worklist:
    """A worklist folder, open for writing (locked) or for reading only.

    Methods may be called from a worker thread and the GUI thread at once: changes to
    the cases and the writes of ``worklist.json`` hold one lock.
    """

    def __init__(self, folder: Path, data: dict[str, Any], *, read_only: bool = False):
        self.folder = folder
        self.read_only = read_only
        self.cases: list[Case] = _read_cases(folder, data.get("cases", []))
        self.model: str | None = data.get("model")
        #: the working scale every case is segmented and learned at (None: each model's own rule,
        #: as Segment's Scale field at 0); a model that knows no rule for these images needs one
        self.scale: float | None = _checked_scale(data.get("scale"), folder)
        self.models: list[dict[str, Any]] = list(data.get("models", []))
        self.created: str = data.get("created") or now()
        self._by_id = {case.id: case for case in self.cases}
        self._mutex = threading.RLock()
        self._lock: _Lock | None = None
        self._references: dict[str, np.ndarray | None] = {}

    # opening and closing

    @classmethod
    def create(
        cls,
        folder: str | os.PathLike,
        sources: Sequence[str | os.PathLike],
        model: str | None = None,
        scale: float | None = None,
    ) -> Worklist:
        """A new worklist in ``folder`` (new or empty) with the cases found in ``sources``."""
        folder = Path(folder).expanduser()
        scale = _checked_scale(scale, folder)
        if (folder / WORKLIST_FILE).exists():
            raise WorklistError(f"{folder}: holds a worklist already; open it instead")
        if folder.is_dir() and any(p.name != LOCK_FILE for p in folder.iterdir()):
            raise WorklistError(f"{folder}: the folder is not empty; a worklist needs a new or empty folder")
        found = discover_cases(sources)
        folder.mkdir(parents=True, exist_ok=True)
        worklist = cls(folder.resolve(), {"model": model, "scale": scale})
        worklist._take_lock()
        for item in found:
            case = Case(
                id=item["id"],
                image=worklist._stored_path(item["image"]),
                reference=None if item["reference"] is None else worklist._stored_path(item["reference"]),
                kind=item["kind"],
            )
            worklist.cases.append(case)
            worklist._by_id[case.id] = case
        worklist.save()
        return worklist

    @classmethod
    def open(cls, folder: str | os.PathLike, read_only: bool = False) -> Worklist:
        folder = Path(folder).expanduser().resolve()
        path = folder / WORKLIST_FILE
        if not path.is_file():
            raise WorklistError(f"{folder}: no worklist here (no {WORKLIST_FILE})")
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise WorklistError(f"{path}: cannot be read ({exc})") from None
        if not isinstance(data, dict) or data.get("format") != WORKLIST_FORMAT:
            raise WorklistError(f"{path}: not a napari-r2au worklist")
        worklist = cls(folder, data, read_only=read_only)
        if not read_only:
            worklist._take_lock()
        return worklist

    def _take_lock(self) -> None:
        lock = _Lock(self.folder / LOCK_FILE)
        lock.acquire()
        self._lock = lock

    def close(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> Worklist:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    # the record

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": WORKLIST_FORMAT,
            "format_version": 1,
            "created": self.created,
            "model": self.model,
            "scale": self.scale,
            "models": self.models,
            "cases": [asdict(case) for case in self.cases],
        }

    def _writable(self) -> None:
        """Refuse a change to a worklist opened read-only before any file of it is written."""
        if self.read_only:
            raise WorklistError(f"{self.folder}: opened read-only")

    def set_scale(self, scale: float | None) -> None:
        """The working scale of the cases segmented or learned from now on (None: the model's
        own rule); the cases segmented already keep the scale their record names."""
        scale = _checked_scale(scale, self.folder)
        if scale != self.scale:
            self._writable()
            with self._mutex:
                self.scale = scale
                self.save()

    def save(self) -> None:
        """Write worklist.json atomically (a reader never sees half a file)."""
        self._writable()
        with self._mutex:
            text = json.dumps(self.to_dict(), indent=1) + "\n"
            write_bytes_atomic(self.folder / WORKLIST_FILE, text.encode())

    def case(self, case_id: str) -> Case:
        try:
            return self._by_id[case_id]
        except KeyError:
            raise WorklistError(f"no case {case_id!r} in {self.folder}") from None

    def ordered(self, order: str = "file") -> list[Case]:
        """The cases in file order, or the most uncertain first (unscored cases last)."""
        if order not in ORDERS:
            raise WorklistError(f"order must be one of {', '.join(ORDERS)}, not {order!r}")
        if order == "file":
            return list(self.cases)
        return sorted(self.cases, key=lambda c: (c.uncertainty is None, -(c.uncertainty or 0.0)))

    def counts(self) -> dict[str, int]:
        return {status: sum(c.status == status for c in self.cases) for status in STATUSES}

    # paths

    def _stored_path(self, path: str | os.PathLike) -> str:
        """Relative to the worklist folder where it can be (a worklist copied together with
        its images keeps working), else absolute."""
        path = Path(path).resolve()
        try:
            return os.path.relpath(path, self.folder)
        except ValueError:  # another drive (Windows)
            return str(path)

    def path_of(self, stored: str) -> Path:
        path = Path(stored)
        return path if path.is_absolute() else (self.folder / path).resolve()

    def case_folder(self, case: Case | str) -> Path:
        case_id = case.id if isinstance(case, Case) else case
        return self.folder / "cases" / self.case(case_id).id

    def mask_path(self, case: Case | str) -> Path:
        return self.case_folder(case) / "mask.tif"

    # reading a case

    def read_image(self, case: Case) -> tuple[Any, float | None, str | None, str | None, dict[str, Any]]:
        """(image, pixel size, unit, axes, reader metadata) as ``r2au segment`` reads it."""
        from ._reader import read_input

        path = self.path_of(case.image)
        if not path.exists():
            raise WorklistError(f"case {case.id}: its image {path} is gone (moved or deleted?)")
        return read_input(path)

    def read_mask(self, case: Case) -> np.ndarray | None:
        path = self.mask_path(case)
        return read_image(path) if path.is_file() else None

    def read_model_mask(self, case: Case) -> np.ndarray | None:
        path = self.case_folder(case) / "model_mask.tif"
        return read_image(path) if path.is_file() else None

    def read_maps(self, case: Case) -> dict[str, Any]:
        """The maps saved with the case's segmentation: probability, uncertainty (float32),
        attention (a list of float32 maps, finest first); absent ones are left out."""
        folder, maps = self.case_folder(case), {}
        for name in ("probability", "uncertainty"):
            if (folder / f"{name}.tif").is_file():
                maps[name] = read_image(folder / f"{name}.tif").astype(np.float32)
        if (folder / "attention.tif").is_file():
            stack = read_image(folder / "attention.tif").astype(np.float32)
            maps["attention"] = list(stack)
        return maps

    def record(self, case: Case) -> dict[str, Any]:
        """The layer record of the case's mask (:mod:`napari_r2au.mask_record`)."""
        sidecar = read_sidecar(self.mask_path(case))
        return dict(record_from_export(sidecar)) if sidecar is not None else {}

    def reference(self, case: Case) -> np.ndarray | None:
        """The case's reference mask (> 0 = foreground), read once; None without one."""
        if case.reference is None:
            return None
        if case.id not in self._references:
            try:
                data = read_image(self.path_of(case.reference))
            except OSError:  # not copied along (reviewed on another machine), or gone: Dice unknown
                self._references[case.id] = None
                return None
            if data.ndim == 3 and data.shape[-1] in (3, 4):  # an RGB(A) mask counts by its first channel
                data = data[..., 0]
            self._references[case.id] = data > 0
        return self._references[case.id]

    # changing a case

    def _review(self, case: Case) -> dict[str, Any]:
        return {
            "status": case.status,
            "comment": case.comment,
            "reviewer": case.reviewer,
            "reviewed": case.reviewed,
        }

    def _write_sidecar(self, case: Case, record: dict[str, Any], mask: np.ndarray) -> None:
        sidecar = export_record(
            record, mask, mask_file="mask.tif", layer=f"{case.id} mask", review=self._review(case)
        )
        write_bytes_atomic(self.mask_path(case).with_suffix(".json"), sidecar_text(sidecar).encode())

    def _dice(self, case: Case, mask: np.ndarray) -> float | None:
        truth = self.reference(case)
        if truth is None or truth.shape != mask.shape:
            return None
        predicted = mask > 0
        total = int(truth.sum()) + int(predicted.sum())
        return 1.0 if total == 0 else 2.0 * int(np.logical_and(truth, predicted).sum()) / total

    def store_segmentation(
        self,
        case: Case,
        record: dict[str, Any],
        mask: np.ndarray,
        probability: np.ndarray,
        uncertainty: np.ndarray | None,
        attention: Sequence[np.ndarray],
        score: float | None,
    ) -> bool:
        """Keep a model's result as the case's mask, unless the case was opened, edited or
        judged meanwhile (then nothing is written and False is returned)."""
        self._writable()
        if not case.untouched:  # opened since the job began: its maps stay those of its mask
            return False
        folder = self.case_folder(case)
        # the maps first, into place one by one: the mask and its record come last, and only
        # a case whose record names this run shows these maps as its own
        write_tiff(folder / "probability.tif", probability.astype(np.float16))
        if uncertainty is not None:
            write_tiff(folder / "uncertainty.tif", uncertainty.astype(np.float16))
        if attention:
            write_tiff(folder / "attention.tif", np.stack(attention).astype(np.float16))
        elif (folder / "attention.tif").exists():
            (folder / "attention.tif").unlink()
        with self._mutex:
            if not case.untouched:
                return False
            write_tiff(folder / "model_mask.tif", mask)
            write_tiff(self.mask_path(case), mask)
            case.status, case.edited = "segmented", False
            case.model, case.model_sha256 = record.get("model"), record.get("model_sha256")
            case.scale, case.uncertainty, case.segmented = record.get("scale"), score, now()
            case.scale_asked = self.scale
            case.dice = self._dice(case, mask)
            case.history.append({"date": case.segmented, "status": "segmented", "model": case.model})
            self._write_sidecar(case, record, mask)
            self.save()
        return True

    def save_mask(self, case: Case, mask: np.ndarray) -> bool:
        """Keep the reviewer's mask of ``case`` (a copy taken on the GUI thread); returns
        whether it differs from the model's. A case that was only segmented is now in review."""
        self._writable()
        mask = np.asarray(mask)
        with self._mutex:
            record = self.record(case)
            # no model's mask to compare with (a case drawn before any run): all the reviewer's
            changed = edited(record, mask) is not False
            write_tiff(self.mask_path(case), mask)
            case.edited = changed
            if changed and case.status in ("new", "segmented"):
                self._set(case, "in review")
            case.dice = self._dice(case, mask)
            self._write_sidecar(case, record, mask)
            self.save()
        return changed

    def _set(self, case: Case, status: str, comment: str | None = None) -> None:
        case.status = status
        if comment is not None:
            case.comment = comment
        entry = {"date": now(), "status": status, "reviewer": reviewer_name()}
        if comment:
            entry["comment"] = comment
        case.history.append(entry)

    def set_status(self, case: Case, status: str, comment: str | None = None) -> None:
        """A reviewer's verdict (or "in review", "needs correction"). Accepting a mask that
        was edited makes the case "corrected". Rejecting asks for a comment (why)."""
        if status not in STATUSES[2:]:
            raise WorklistError(f"a reviewer sets one of {', '.join(STATUSES[2:])}, not {status!r}")
        self._writable()
        with self._mutex:
            mask = self.read_mask(case)
            if status in LEARNABLE and mask is None:
                raise WorklistError(f"case {case.id} has no mask yet: segment it first")
            if status == "rejected" and not (comment or case.comment).strip():
                raise WorklistError(f"case {case.id}: say why it is rejected (a comment)")
            if status == "accepted" and case.edited:
                status = "corrected"
            self._set(case, status, comment)
            if status in REVIEWED or status == "needs correction":
                case.reviewer, case.reviewed = reviewer_name(), now()
            if mask is not None:
                self._write_sidecar(case, self.record(case), mask)
            self.save()

    def add_time(self, case: Case, seconds: float) -> None:
        self._writable()
        with self._mutex:
            case.seconds = round(case.seconds + max(0.0, seconds), 1)
            self.save()


# -- segmenting ----------------------------------------------------------------------------


def case_uncertainty(probability: np.ndarray, uncertainty: np.ndarray, threshold: float) -> float:
    """How unsure the model is about a case: the mean uncertainty over the pixels it might
    call foreground (probability above half the threshold), where its mistakes are. The
    background far from any structure, certain in every image, would dilute it."""
    region = probability > threshold / 2
    if not region.any():
        return 0.0
    return float(np.mean(uncertainty[region]))


def iter_segment(
    worklist: Worklist,
    model: Any,
    cases: Iterable[Case] | None = None,
    *,
    first: str | None = None,
    tile_size: int | None = None,
    device: str | None = None,
    attention: bool = True,
) -> Generator[WorklistEvent, None, list[str]]:
    """Segment the cases nobody has touched yet (by default all such cases), the case
    ``first`` before the others; returns the ids segmented. Each case is predicted with
    flip averaging (which gives its uncertainty map and score) at the model's threshold
    and clean-up, and written as it finishes; closing the generator (Cancel) stops after
    the current tile and writes nothing of the unfinished case."""
    from .engine import Progress
    from .model_files import load_model
    from .uncertainty import iter_predict_tta

    loaded = load_model(model) if not hasattr(model, "network") else model
    todo = [c for c in (worklist.cases if cases is None else cases) if c.untouched]
    todo.sort(key=lambda c: c.id != first)  # stable: the rest keep their order
    done: list[str] = []
    for index, case in enumerate(todo):
        image, size, unit, axes, _ = worklist.read_image(case)
        inner = iter_predict_tta(
            loaded,
            image,
            axes=axes,
            attention=attention,
            tile_size=tile_size,
            device=device,
            scale=worklist.scale,
            pixel_size=size,
            pixel_size_unit=unit,
        )
        try:
            while True:
                event: Progress = next(inner)
                yield WorklistEvent("segment", index, len(todo), case.id, event)
        except StopIteration as stop:
            prediction = stop.value
        uncertainty = prediction.uncertainty
        mask = prediction.mask()
        probability = prediction.probabilities
        if prediction.multiclass:
            probability = probability[..., 1:].sum(-1)  # any foreground class
        threshold = 0.5 if prediction.multiclass else prediction.threshold
        record = segment_record(
            prediction,
            mask,
            threshold=threshold,
            model_path=None if loaded.path is None else str(loaded.path),
            flip_averaged=True,
            image_layer=f"{case.id} image",
        )
        score = case_uncertainty(probability, uncertainty, threshold)
        if worklist.store_segmentation(
            case, record, mask, probability, uncertainty, prediction.attention, score
        ):
            done.append(case.id)
            if loaded.path is not None and worklist.model != loaded.name:
                # the model that made the latest masks is the one learning starts from next
                worklist.model = loaded.name
                worklist.save()
        yield WorklistEvent("case", index + 1, len(todo), case.id, message=f"{case.id}: {case.status}")
    return done


# -- learning from the corrections ---------------------------------------------------------


#: when a new version is put to use: "if-better" (its held-out Dice did not fall) or "always"
ADOPT_RULES = ("if-better", "always")

#: said beside the held-out Dice when it cannot tell anything (LearnResult.held_out_uninformative)
UNINFORMATIVE_HELD_OUT = (
    "not a test of the new version: the held-out part holds no correction, only the old "
    "model's own masks of cases accepted as segmented; correct some cases to measure it"
)


@dataclass
class LearnResult:
    model: str | None  # the new version (None: training gave no model)
    parent: str
    cases: list[str]
    dice_before: float | None
    dice_after: float | None
    resegmented: list[str] = field(default_factory=list)
    #: the new version became the worklist's model (False: none, or kept aside: its held-out Dice fell)
    adopted: bool = False
    #: the fine-tune's own result (its rules, such as dice_fell, hold for the new version)
    finetune: Any = field(default=None, repr=False)

    @property
    def dice_fell(self) -> bool:
        """The new version scores lower than its parent on the held-out part."""
        return bool(self.finetune is not None and self.finetune.dice_fell)

    @property
    def held_out_uninformative(self) -> bool:
        """The held-out part holds no corrected pixel (the cases were accepted as segmented):
        it is the parent's own mask, which the parent matches by definition, so the Dice
        figures there say nothing about the new version."""
        return getattr(self.finetune, "held_out_corrections", None) == 0


def iter_learn(
    worklist: Worklist,
    model: str | None = None,
    *,
    settings: Any = None,
    device: str | None = None,
    resegment: bool = True,
    name: str | None = None,
    adopt: str = "if-better",
) -> Generator[WorklistEvent, None, LearnResult]:
    """Fine-tune the worklist's current model (or ``model``) on every accepted and
    corrected case, through the same fine-tune code as the Fine-tune dock (a new model
    version; its held-out part is drawn from those cases), then re-segment with it the
    cases nobody has touched yet; the worklist then names the new version as its model, unless
    it is kept aside.

    ``adopt="if-better"`` (the Fine-tune dock's rule): a version that scores lower than its
    parent on the held-out corrections is registered but kept aside: the worklist keeps its
    model and no mask changes (measured on HRF: one such version took the untouched cases
    from F1 0.794 to 0.743; docs/worklist-reviewer.md). ``"always"`` puts every version to use."""
    from .model_files import load_model
    from .training.finetune import iter_finetune

    if adopt not in ADOPT_RULES:
        raise WorklistError(f"adopt must be one of {', '.join(ADOPT_RULES)}, not {adopt!r}")

    base = model or worklist.model
    if base is None:
        raise WorklistError("no model to learn from: segment the cases first (or name a model)")
    parent = load_model(base)
    chosen = [c for c in worklist.cases if c.status in LEARNABLE and worklist.mask_path(c).is_file()]
    if not chosen:
        raise WorklistError("no accepted or corrected cases to learn from yet")
    pairs, originals, names, sizes = [], [], [], []
    for case in chosen:
        image, size, unit, _, _ = worklist.read_image(case)
        mask = worklist.read_mask(case)
        pairs.append((image, mask))
        originals.append(worklist.read_model_mask(case))
        names.append(case.id)
        sizes.append((size, unit))
    if len(set(sizes)) > 1:
        raise WorklistError(
            "the cases to learn from have different pixel sizes; learn from one kind at a time"
        )
    size, unit = sizes[0]
    total = None
    inner = iter_finetune(
        parent,
        pairs,
        settings=settings,
        names=names,
        device=device,
        originals=originals,
        scale=worklist.scale,
        pixel_size=size,
        pixel_size_unit=unit,
        name=name,
    )
    try:
        while True:
            event = next(inner)
            total = getattr(event, "total", None) or total
            yield WorklistEvent("learn", getattr(event, "step", 0), total or 0, detail=event)
    except StopIteration as stop:
        tuned = stop.value
    result = LearnResult(
        tuned.model.name if tuned.model is not None else None,
        parent.name,
        names,
        tuned.dice_before,
        tuned.dice_after,
        finetune=tuned,
    )
    if tuned.model is None:
        yield WorklistEvent("learned", 1, 1, detail=result)
        return result
    result.adopted = adopt == "always" or not result.dice_fell or result.held_out_uninformative
    # recorded before "learned" is yielded: a job cancelled there still names the model it made
    with worklist._mutex:
        if result.adopted:
            worklist.model = tuned.model.name
        worklist.models.append(
            {
                "name": tuned.model.name,
                "parent": parent.name,
                "date": now(),
                "cases": names,
                "dice_before": tuned.dice_before,
                "dice_after": tuned.dice_after,
                **({} if result.adopted else {"kept_aside": True}),
            }
        )
        worklist.save()
    yield WorklistEvent("learned", 1, 1, detail=result)
    if resegment and result.adopted:
        stale = [c for c in worklist.cases if c.untouched and c.model != tuned.model.name]
        result.resegmented = yield from iter_segment(worklist, tuned.model, stale, device=device)
    return result


def run_events(
    generator: Generator[WorklistEvent, None, Any], callback: Callable[[WorklistEvent], Any] | None = None
) -> Any:
    """Drive a worklist job to its end (the command line's loop); returns its result."""
    while True:
        try:
            event = next(generator)
        except StopIteration as stop:
            return stop.value
        if callback is not None:
            callback(event)


# -- exporting the series ------------------------------------------------------------------

SUMMARY_COLUMNS = (
    "case",
    "status",
    "model",
    "dice",
    "uncertainty",
    "edited",
    "reviewer",
    "reviewed",
    "seconds",
    "comment",
    "image",
    "mask",
)


def export_plan(worklist: Worklist, out: Path) -> dict[Path, list[Path]]:
    """The files an export writes, by case (checked before anything is written)."""
    plan: dict[Path, list[Path]] = {}
    for case in worklist.cases:
        if worklist.mask_path(case).is_file():
            names = [f"{case.id}_mask.tif", f"{case.id}_mask.json"]
            names += [f"{case.id}_seg.dcm"] if case.kind == "dicom" else []
            plan[worklist.path_of(case.image)] = [out / n for n in names]
    plan[worklist.folder / WORKLIST_FILE] = [out / "summary.csv", out / "summary.json", out / "summary.png"]
    return plan


def export_series(worklist: Worklist, out: str | os.PathLike, overwrite: bool = False) -> list[Path]:
    """Every case's mask with its record (and a DICOM SEG for a DICOM case), a summary as
    CSV and JSON (per case: status, model, metrics, reviewer, times) and a plot of the
    per-case Dice (or uncertainty, where no case has a reference). Never replaces a file
    that is not an earlier export of this kind, unless ``overwrite``."""
    from .outputs import check_plan, text_writer, tiff_writer, write_group
    from .postprocess import compact_labels

    out = Path(out).expanduser()
    check_plan(export_plan(worklist, out), overwrite=overwrite)
    written: list[Path] = []
    rows = []
    for case in worklist.cases:
        mask = worklist.read_mask(case)
        row = {
            "case": case.id,
            "status": case.status,
            "model": case.model,
            "dice": None if case.dice is None else round(case.dice, 4),
            "uncertainty": None if case.uncertainty is None else round(case.uncertainty, 5),
            "edited": case.edited,
            "reviewer": case.reviewer,
            "reviewed": case.reviewed,
            "seconds": case.seconds,
            "comment": case.comment,
            "image": str(worklist.path_of(case.image)),
            "mask": None,
        }
        if mask is not None:
            record = worklist.record(case)
            stored = compact_labels(mask)
            sidecar = export_record(
                record,
                mask,
                mask_file=f"{case.id}_mask.tif",
                layer=f"{case.id} mask",
                review=worklist._review(case),
            )
            sidecar["dtype"] = str(stored.dtype)
            truth = worklist.reference(case)
            if truth is not None and truth.shape == mask.shape:
                from .training.metrics import confusion

                sidecar = with_metrics(
                    sidecar, str(worklist.path_of(case.reference)), confusion(truth, mask > 0).rates()
                )
            files: list[tuple[str, Callable[[Path], None]]] = [
                (f"{case.id}_mask.tif", tiff_writer(stored)),
                (f"{case.id}_mask.json", text_writer(sidecar_text(sidecar))),
            ]
            if case.kind == "dicom":
                files.append((f"{case.id}_seg.dcm", _seg_writer(worklist, case, mask, record)))
            written += write_group(out, worklist.path_of(case.image), files)
            row["mask"] = f"{case.id}_mask.tif"
        rows.append(row)
    summary = {
        "worklist": str(worklist.folder),
        "exported": now(),
        "model": worklist.model,
        "models": worklist.models,
        "counts": worklist.counts(),
        "cases": rows,
    }
    files = [
        ("summary.csv", text_writer(_csv_text(rows))),
        ("summary.json", text_writer(json.dumps(summary, indent=1) + "\n")),
        ("summary.png", _plot_writer(rows)),
    ]
    written += write_group(out, worklist.folder / WORKLIST_FILE, files)
    return written


def _seg_writer(
    worklist: Worklist, case: Case, mask: np.ndarray, record: dict[str, Any]
) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        from .dicom_seg import dicom_sources, write_dicom_seg
        from .model_files import load_model

        _, _, _, _, metadata = worklist.read_image(case)
        segment_property = None
        with contextlib.suppress(Exception):  # a model removed since: the SEG's default property
            segment_property = load_model(record.get("model")).metadata.get("segment_property")
        write_dicom_seg(
            path,
            mask,
            dicom_sources(metadata),
            model=record.get("model"),
            model_sha256=record.get("model_sha256"),
            segment_property=segment_property,
        )

    return write


def _csv_text(rows: list[dict[str, Any]]) -> str:
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SUMMARY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row[k] is None else row[k] for k in SUMMARY_COLUMNS})
    return buffer.getvalue()


def _plot_writer(rows: list[dict[str, Any]]) -> Callable[[Path], None]:
    """A bar chart of the per-case Dice (or uncertainty, where no case has a reference)."""

    def write(path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        key = "dice" if any(r["dice"] is not None for r in rows) else "uncertainty"
        values = [r[key] if r[key] is not None else float("nan") for r in rows]  # no bar: not measured
        colours = {"accepted": "tab:green", "corrected": "tab:blue", "rejected": "tab:red"}
        fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * len(rows) + 1.5), 3.2), dpi=120)
        ax.bar(range(len(rows)), values, color=[colours.get(r["status"], "tab:gray") for r in rows])
        ax.set_xticks(range(len(rows)), [r["case"] for r in rows], rotation=90, fontsize=7)
        ax.set_ylabel("Dice vs reference" if key == "dice" else "uncertainty score")
        ax.set_title("per case (green accepted, blue corrected, red rejected, grey not reviewed)", fontsize=8)
        if key == "dice":
            ax.set_ylim(0, 1)
        fig.tight_layout()
        fig.savefig(path, format="png")
        plt.close(fig)

    return write


__all__ = [
    "Case",
    "LearnResult",
    "Worklist",
    "WorklistError",
    "WorklistEvent",
    "WorklistLocked",
    "discover_cases",
    "export_series",
    "iter_learn",
    "iter_segment",
]
