"""Sample data shipped with the plugin: only what may be shipped legally."""

from __future__ import annotations


def retina_sample():
    """The fundus photograph that scikit-image ships (public domain)."""
    from skimage import data

    return [(data.retina(), {"name": "retina (fundus)", "rgb": True})]
