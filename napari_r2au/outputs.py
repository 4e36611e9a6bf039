"""The one place the command line writes its result files (``r2au segment``, ``r2au demo``).

A result never replaces a file the user made. Which files are the command's own is kept
in a record in the output folder, ``.r2au-outputs.json``: for each file written, its
sha256, the input it came from and what made it (a mask: its record, with the model and
its sha256, threshold, scale, backend and precision; :mod:`napari_r2au.mask_record`). A
file counts as an earlier output, and may be replaced, only while the record lists it with
the content it still has; anything else (a manual ``case1_mask.tif``, an output edited
since) is refused unless ``--overwrite``.
The record survives neither a copy of the folder nor a lost record file: then the
outputs count as the user's, the safe side.

All targets of a run are checked before anything is read or written (two inputs that
would give one file name, a file that is not an earlier output), and the files of one
input are written to temporary files first and moved into place together.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from .io import atomic_path, write_bytes_atomic

#: the record of the files the command line wrote into a folder
RECORD = ".r2au-outputs.json"
RECORD_FORMAT = "napari-r2au-outputs"


class OutputConflict(ValueError):
    """Writing would replace a user's file, or two inputs would write one file."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_record(folder: Path) -> dict[str, dict[str, Any]]:
    """File name -> {sha256, input, written[, made_by]} for the outputs recorded in ``folder``
    (empty when there is no readable record: nothing counts as ours then)."""
    path = folder / RECORD
    try:
        record = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError, RecursionError):
        return {}
    files = (
        record.get("files") if isinstance(record, dict) and record.get("format") == RECORD_FORMAT else None
    )
    return {k: v for k, v in files.items() if isinstance(v, dict)} if isinstance(files, dict) else {}


def is_own_output(path: Path, record: Mapping[str, dict[str, Any]] | None = None) -> bool:
    """Whether ``path`` is an earlier output of the command line, unchanged since."""
    path = Path(path)
    entry = (read_record(path.parent) if record is None else record).get(path.name)
    if not entry or not path.is_file() or path.is_symlink():
        return False
    try:
        return _sha256(path) == entry.get("sha256")
    except OSError:
        return False


def check_plan(plan: Mapping[Path, Iterable[Path]], overwrite: bool = False) -> None:
    """Refuse, before anything is written, a run whose inputs would share an output file,
    or whose outputs would replace files that are not earlier outputs (unless ``overwrite``)."""
    owner: dict[Path, Path] = {}
    for source, targets in plan.items():
        for target in targets:
            key = target.parent.resolve() / target.name
            if key in owner and owner[key] != source:
                raise OutputConflict(
                    f"{owner[key]} and {source} would both write {target}: nothing written; "
                    "segment them with different -o folders, or rename one"
                )
            owner[key] = source
    if overwrite:
        return
    records: dict[Path, dict[str, dict[str, Any]]] = {}
    foreign = []
    for target in owner:
        if not (target.exists() or target.is_symlink()):
            continue
        record = records.setdefault(target.parent, read_record(target.parent))
        if not is_own_output(target, record):
            foreign.append(target)
    if foreign:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise OutputConflict(
            f"{foreign[0]}{more} exists and is not an earlier r2au output: nothing written; "
            "give --overwrite to replace it, or -o another folder"
        )


Writer = Callable[[Path], None]


def tiff_writer(array: Any) -> Writer:
    """A writer of ``array`` as a zlib-compressed TIFF (for :func:`write_group`)."""

    def write(path: Path) -> None:
        import tifffile

        tifffile.imwrite(path, array, compression="zlib")

    return write


def text_writer(text: str) -> Writer:
    """A writer of ``text`` as a UTF-8 file (for :func:`write_group`)."""

    def write(path: Path) -> None:
        path.write_text(text, encoding="utf-8")

    return write


def write_group(
    folder: Path,
    source: str | os.PathLike,
    files: list[tuple[str, Writer]],
    made_by: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[Path]:
    """Write the files of one input (``name``, ``write(temporary_path)``) into ``folder``:
    all are written to temporary files first and moved into place only when every one
    succeeded, then recorded as outputs of ``source``, each with ``made_by[name]`` (what
    made it: the mask's record of model, threshold and scale) where given."""
    folder = Path(folder)
    written: list[tuple[Path, str]] = []
    with contextlib.ExitStack() as stack:  # on success the temporary files are moved into place
        for name, write in files:
            target = folder / name
            tmp = stack.enter_context(atomic_path(target))
            write(tmp)
            written.append((target, _sha256(tmp)))
    _record(folder, source, written, made_by or {})
    return [target for target, _ in written]


def _record(
    folder: Path,
    source: str | os.PathLike,
    written: list[tuple[Path, str]],
    made_by: Mapping[str, Mapping[str, Any]],
) -> None:
    """Add ``written`` to the folder's record (re-read first, so that another run's entries stay)."""
    files = read_record(folder)
    stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    for target, digest in written:
        files[target.name] = {"sha256": digest, "input": str(Path(source).resolve()), "written": stamp}
        if target.name in made_by:
            files[target.name]["made_by"] = dict(made_by[target.name])
    blob = json.dumps({"format": RECORD_FORMAT, "version": 1, "files": files}, indent=1, sort_keys=True)
    write_bytes_atomic(folder / RECORD, (blob + "\n").encode())
