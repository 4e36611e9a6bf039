"""One configurable U-Net that covers every network of the paper's comparison tables.

The encoder has ``depth`` downsampling steps (4 in the paper) with widths doubling from
``base_width``; the decoder mirrors it with nearest x2 upsampling + conv, an optional
attention gate on every skip (gated by the upsampled decoder feature), concatenation and
a unit of the same kind as the encoder's; a 1x1 conv head produces logits.
"""

from __future__ import annotations

import torch
from torch import nn

from .blocks import AttentionGate, DoubleConv, RecurrentUnit, UpConv, conv_layer

BLOCK_KINDS = ("double_conv", "recurrent", "recurrent_residual", "residual")


def make_unit(kind: str, c_in: int, c_out: int, t: int, spatial_dims: int) -> nn.Module:
    """The encoder/decoder unit for ``kind`` (see BLOCK_KINDS)."""
    if kind == "double_conv":
        return DoubleConv(c_in, c_out, spatial_dims)
    if kind == "recurrent":
        return RecurrentUnit(c_in, c_out, t, residual=False, spatial_dims=spatial_dims)
    if kind == "recurrent_residual":
        return RecurrentUnit(c_in, c_out, t, residual=True, spatial_dims=spatial_dims)
    if kind == "residual":
        return RecurrentUnit(c_in, c_out, 0, residual=True, spatial_dims=spatial_dims)
    raise ValueError(f"unknown block kind {kind!r}; valid: {', '.join(BLOCK_KINDS)}")


class UNetFamily(nn.Module):
    """U-Net, Attention U-Net, RU-Net, R2U-Net, attention residual U-Net and R2AU-Net.

    Example:
        >>> net = UNetFamily(3, 1, base_width=8, block="recurrent_residual", attention=True)
        >>> logits, alphas = net(torch.zeros(1, 3, 32, 32), return_attention=True)
    """

    #: spatial size must be divisible by this (2 ** depth)
    divisor: int

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 1,
        base_width: int = 64,
        block: str = "recurrent_residual",
        attention: bool = True,
        t: int = 2,
        depth: int = 4,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        #: what built this network: another of its kind (e.g. wider, models/widen.py) starts here
        self.config = dict(
            in_channels=in_channels,
            out_channels=out_channels,
            base_width=base_width,
            block=block,
            attention=attention,
            t=t,
            depth=depth,
            spatial_dims=spatial_dims,
        )
        self.in_channels, self.out_channels = in_channels, out_channels
        self.attention = attention
        self.divisor = 2**depth
        widths = [base_width * 2**level for level in range(depth + 1)]
        pool = {2: nn.MaxPool2d, 3: nn.MaxPool3d}[spatial_dims]
        self.pool = pool(kernel_size=2, stride=2)
        self.encoder = nn.ModuleList(
            make_unit(block, c_in, c_out, t, spatial_dims)
            for c_in, c_out in zip([in_channels, *widths[:-1]], widths)
        )
        # Decoder stages run from the deepest level up; index i joins widths[i+1] -> widths[i].
        self.up = nn.ModuleList(UpConv(widths[i + 1], widths[i], spatial_dims) for i in range(depth))
        self.gates = (
            nn.ModuleList(
                AttentionGate(widths[i], widths[i], widths[i] // 2, spatial_dims) for i in range(depth)
            )
            if attention
            else None
        )
        self.decoder = nn.ModuleList(
            make_unit(block, 2 * widths[i], widths[i], t, spatial_dims) for i in range(depth)
        )
        self.head = conv_layer(spatial_dims)(widths[0], out_channels, kernel_size=1)

    def forward(
        self, x: torch.Tensor, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits; with ``return_attention`` also the gates' alpha maps, finest first."""
        skips = []
        for level, unit in enumerate(self.encoder):
            x = unit(x if level == 0 else self.pool(x))
            skips.append(x)
        alphas: list[torch.Tensor] = []
        for i in reversed(range(len(self.decoder))):
            up = self.up[i](x)
            skip = skips[i]
            if self.gates is not None:
                skip, alpha = self.gates[i](up, skip)
                alphas.append(alpha)
            x = self.decoder[i](torch.cat((skip, up), dim=1))
        logits = self.head(x)
        if return_attention:
            return logits, alphas[::-1]
        return logits
