"""Model family: one registry from architecture name to network configuration."""

from __future__ import annotations

from typing import Any

from .unet import UNetFamily

__all__ = ["ARCHITECTURES", "UNetFamily", "available_architectures", "create_model"]

#: name -> (unit kind, attention gates on the skips)
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "unet": {"block": "double_conv", "attention": False},
    "attention_unet": {"block": "double_conv", "attention": True},
    "ru_net": {"block": "recurrent", "attention": False},
    "r2u_net": {"block": "recurrent_residual", "attention": False},
    "attention_res_unet": {"block": "residual", "attention": True},
    "r2au_net": {"block": "recurrent_residual", "attention": True},
}


def available_architectures() -> list[str]:
    """Names accepted by :func:`create_model`."""
    return list(ARCHITECTURES)


def create_model(
    arch: str,
    in_channels: int = 3,
    out_channels: int = 1,
    base_width: int = 64,
    t: int = 2,
    depth: int = 4,
    spatial_dims: int = 2,
) -> UNetFamily:
    """Build a network of the family by name.

    Example:
        >>> net = create_model("r2au_net", base_width=16)

    Raises:
        ValueError: for an unknown name, listing the valid ones.
    """
    key = arch.lower().replace("-", "_")
    if key not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; valid: {', '.join(available_architectures())}")
    for name, value in (
        ("in_channels", in_channels),
        ("out_channels", out_channels),
        ("base_width", base_width),
        ("depth", depth),
    ):
        if int(value) < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if t < 0:
        raise ValueError(f"t must be >= 0, got {t}")
    return UNetFamily(
        in_channels=in_channels,
        out_channels=out_channels,
        base_width=base_width,
        t=t,
        depth=depth,
        spatial_dims=spatial_dims,
        **ARCHITECTURES[key],
    )
