"""Benchmarks (not tests): speed, memory, fine-tuning and training comparisons.

Each benchmark prints its table and, given ``--markdown FILE``, writes it into a doc
between markers with :func:`write_between_markers`, so the prose around it survives a re-run.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

TABLE_BEGIN, TABLE_END = "<!-- table -->", "<!-- /table -->"


def write_between_markers(path: Path, block: str, begin: str = TABLE_BEGIN, end: str = TABLE_END) -> None:
    """Put ``block`` between the markers of ``path`` (appending them if absent), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = path.read_text() if path.exists() else ""
    block = block if block.endswith("\n") else block + "\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = f"{head}{begin}\n{block}{end}{rest.split(end, 1)[1]}"
    else:
        text = f"{text}{'' if not text or text.endswith(chr(10)) else chr(10)}{begin}\n{block}{end}\n"
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(text)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
