"""The napari widgets (Segment, Fine-tune, Review, Worklist), listed in the plugin manifest.

Each widget module imports napari and torch only inside functions, so napari can read
the manifest and build a dock quickly; the work runs in thread workers.
"""

from __future__ import annotations

__all__ = ["FinetuneWidget", "ReviewWidget", "SegmentWidget", "WorklistWidget"]


def __getattr__(name: str):
    # lazy, like the package: importing napari_r2au.widgets does not build Qt objects
    if name == "SegmentWidget":
        from .segment import SegmentWidget

        return SegmentWidget
    if name == "FinetuneWidget":
        from .finetune import FinetuneWidget

        return FinetuneWidget
    if name == "ReviewWidget":
        from .review import ReviewWidget

        return ReviewWidget
    if name == "WorklistWidget":
        from .worklist import WorklistWidget

        return WorklistWidget
    raise AttributeError(f"module 'napari_r2au.widgets' has no attribute {name!r}")
