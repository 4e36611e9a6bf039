"""Inference-time folding of BatchNorm into the preceding convolution.

In eval mode a BatchNorm is an affine map per channel, so conv + BN is one conv with
rescaled weights and a new bias: the same result with one pass over memory less. The
recurrent layers' BN has running statistics per time step, so their shared conv becomes
one folded (weight, bias) pair per step.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import RecurrentConv

_CONVS = (nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm2d, nn.BatchNorm3d)


def _fold(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    var: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    scale = gamma / torch.sqrt(var + eps)
    shape = (-1,) + (1,) * (weight.dim() - 1)
    bias = torch.zeros_like(mean) if bias is None else bias
    return weight * scale.view(shape), (bias - mean) * scale + beta


class FusedRecurrentConv(nn.Module):
    """RecurrentConv with its per-step BatchNorm folded into per-step conv weights."""

    def __init__(self, layer: RecurrentConv) -> None:
        super().__init__()
        self.t = layer.t
        conv, norm = layer.conv, layer.norm
        self.conv_fn = F.conv2d if isinstance(conv, nn.Conv2d) else F.conv3d
        pairs = [
            _fold(
                conv.weight,
                conv.bias,
                norm.running_mean[k],
                norm.running_var[k],
                norm.weight,
                norm.bias,
                norm.eps,
            )
            for k in range(layer.t + 1)
        ]
        self.weights = nn.ParameterList(nn.Parameter(w.detach(), requires_grad=False) for w, _ in pairs)
        self.biases = nn.ParameterList(nn.Parameter(b.detach(), requires_grad=False) for _, b in pairs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.conv_fn(x, self.weights[0], self.biases[0], padding=1))
        for step in range(1, self.t + 1):
            out = F.relu(self.conv_fn(x + out, self.weights[step], self.biases[step], padding=1))
        return out


@torch.no_grad()
def fuse_for_inference(network: nn.Module) -> nn.Module:
    """An eval-only copy of ``network`` with every BatchNorm folded away."""
    fused = copy.deepcopy(network).eval()
    for module in list(fused.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, RecurrentConv):
                setattr(module, name, FusedRecurrentConv(child))
        if isinstance(module, nn.Sequential):
            children = list(module)
            for i in range(len(children) - 1):
                conv, norm = children[i], children[i + 1]
                if isinstance(conv, _CONVS) and isinstance(norm, _NORMS):
                    weight, bias = _fold(
                        conv.weight,
                        conv.bias,
                        norm.running_mean,
                        norm.running_var,
                        norm.weight,
                        norm.bias,
                        norm.eps,
                    )
                    conv.weight.copy_(weight)
                    if conv.bias is None:
                        conv.bias = nn.Parameter(bias)
                    else:
                        conv.bias.copy_(bias)
                    module[i + 1] = nn.Identity()
    for p in fused.parameters():
        p.requires_grad_(False)
    return fused
