"""Benchmarks (not tests): speed, memory, fine-tuning and training comparisons.

Each benchmark prints its table and, given ``--markdown FILE``, writes it into a doc
between markers with :func:`write_between_markers`, so the prose around it survives a re-run.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TABLE_BEGIN, TABLE_END = "<!-- table -->", "<!-- /table -->"


def write_between_markers(path: Path, block: str, begin: str = TABLE_BEGIN, end: str = TABLE_END) -> None:
    """Put ``block`` between the markers of ``path`` (appending them if absent), atomically."""
    from napari_r2au.io import write_bytes_atomic

    path = Path(path)
    text = path.read_text() if path.exists() else ""
    block = block if block.endswith("\n") else block + "\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = f"{head}{begin}\n{block}{end}{rest.split(end, 1)[1]}"
    else:
        separator = "\n" if text and not text.endswith("\n") else ""
        text = f"{text}{separator}{begin}\n{block}{end}\n"
    write_bytes_atomic(path, text.encode())


def default_finetune(drive: Path, model: str = "drive-vessels") -> tuple[float, object]:
    """The plugin's default fine-tune (FinetuneSettings()) on one corrected 512x512 image:
    a crop of DRIVE's 23_training, whose manual mask stands in for the user's correction
    (the right quarter held out, as the dock does without a validation pair). Returns its
    wall time and FinetuneResult; the new model goes to a temporary models folder."""
    import tempfile
    import time

    from napari_r2au.engine import run
    from napari_r2au.io import read_image
    from napari_r2au.training.finetune import FinetuneSettings, iter_finetune

    image = read_image(drive / "images" / "23_training.tif")[36:548, 26:538]
    mask = read_image(drive / "1st_manual" / "23_manual1.gif")[36:548, 26:538] > 0
    with tempfile.TemporaryDirectory(prefix="r2au-bench-") as home, models_home(home):
        started = time.perf_counter()
        result = run(iter_finetune(model, [(image, mask)], settings=FinetuneSettings()))
        return time.perf_counter() - started, result


@contextmanager
def models_home(home: str | os.PathLike[str]) -> Iterator[None]:
    """Fine-tuned models go to ``home`` (``R2AU_HOME``) in the block, never to the user's
    models folder; the caller's setting comes back after (a benchmark may run in a test)."""
    kept = os.environ.get("R2AU_HOME")
    os.environ["R2AU_HOME"] = str(home)
    try:
        yield
    finally:
        if kept is None:
            os.environ.pop("R2AU_HOME", None)
        else:
            os.environ["R2AU_HOME"] = kept
