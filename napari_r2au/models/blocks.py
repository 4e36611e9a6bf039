"""Building blocks of the U-Net family, written once for 2D and 3D.

The spatial dimensionality is a constructor argument (``spatial_dims``), so a 3D
network is a parameter, not a copy. Layer choices follow ../shared/PAPER.md and match
the parameter counts of the widely used public implementation.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "AttentionGate",
    "DoubleConv",
    "RecurrentConv",
    "RecurrentUnit",
    "StepwiseBatchNorm",
    "synchronize_batch_norms",
    "UpConv",
    "conv_layer",
    "norm_layer",
]


def conv_layer(spatial_dims: int) -> type[nn.Module]:
    """Conv class for the dimensionality (2 -> Conv2d, 3 -> Conv3d)."""
    return {2: nn.Conv2d, 3: nn.Conv3d}[spatial_dims]


def norm_layer(spatial_dims: int) -> type[nn.Module]:
    """BatchNorm class for the dimensionality."""
    return {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[spatial_dims]


def conv_bn_relu(c_in: int, c_out: int, spatial_dims: int) -> nn.Sequential:
    conv, norm = conv_layer(spatial_dims), norm_layer(spatial_dims)
    return nn.Sequential(
        conv(c_in, c_out, kernel_size=3, padding=1, bias=True),
        norm(c_out),
        nn.ReLU(inplace=True),
    )


class DoubleConv(nn.Module):
    """U-Net's unit: two 3x3 conv + BN + ReLU."""

    def __init__(self, c_in: int, c_out: int, spatial_dims: int = 2) -> None:
        super().__init__()
        self.body = nn.Sequential(
            *conv_bn_relu(c_in, c_out, spatial_dims), *conv_bn_relu(c_out, c_out, spatial_dims)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _AllReduceSum(torch.autograd.Function):
    """The sum over ranks, with gradients: each rank's input contributes to every rank's
    output, so its gradient is the sum over ranks of the output gradients."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        total = grad.contiguous().clone()
        dist.all_reduce(total)
        return total


def sync_batch_norm(
    x: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    momentum: float,
    eps: float,
) -> torch.Tensor:
    """Training-mode batch norm with statistics over the batches of all ranks.

    With DistributedDataParallel each rank sees a slice of the global batch; pooling the
    statistics makes W ranks compute what one process at the global batch computes.
    Works with gloo on CPUs as well as NCCL (autograd-aware all-reduce).
    """
    channels = x.shape[1]
    dims = [0, *range(2, x.dim())]
    xf = x.float()
    local = torch.cat([xf.sum(dims), (xf * xf).sum(dims), xf.new_tensor([x.numel() / channels])])
    total = _AllReduceSum.apply(local)
    count = total[-1]
    mean = total[:channels] / count
    var = total[channels : 2 * channels] / count - mean * mean
    with torch.no_grad():
        running_mean.mul_(1 - momentum).add_(momentum * mean)
        running_var.mul_(1 - momentum).add_(momentum * var * count / (count - 1))
    shape = [1, channels] + [1] * (x.dim() - 2)
    out = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + eps)
    return (out * weight.view(shape) + bias.view(shape)).to(x.dtype)


class _Synced:
    """Mixin: pool batch statistics across ranks while training under DDP."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and _distributed():
            self.num_batches_tracked += 1
            return sync_batch_norm(
                x,
                self.running_mean,
                self.running_var,
                self.weight,
                self.bias,
                self.momentum if self.momentum is not None else 0.1,
                self.eps,
            )
        return super().forward(x)


class SyncedBatchNorm2d(_Synced, nn.BatchNorm2d):
    pass


class SyncedBatchNorm3d(_Synced, nn.BatchNorm3d):
    pass


def synchronize_batch_norms(network: nn.Module) -> nn.Module:
    """Make every batch norm of the network pool statistics across DDP ranks (in place).

    Parameters and buffers stay where they are, so state dicts are unchanged.
    """
    for module in network.modules():
        if type(module) is nn.BatchNorm2d:
            module.__class__ = SyncedBatchNorm2d
        elif type(module) is nn.BatchNorm3d:
            module.__class__ = SyncedBatchNorm3d
        elif isinstance(module, StepwiseBatchNorm):
            module.sync = True
    return network


class StepwiseBatchNorm(nn.Module):
    """Batch norm with shared affine parameters but running statistics per time step.

    A recurrent conv layer normalises inputs whose distribution differs at every step
    (x, then x + x1, ...). One shared set of running statistics blends them and makes
    eval mode collapse (PAPER.md measured DRIVE F1 0.58 instead of 0.82). Keeping
    gamma/beta shared keeps the parameter count of the reference implementation;
    running statistics are buffers, not parameters.
    """

    def __init__(self, num_features: int, steps: int, eps: float = 1e-5, momentum: float | None = 0.1):
        super().__init__()
        self.num_features, self.steps, self.eps, self.momentum = num_features, steps, eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(steps, num_features))
        self.register_buffer("running_var", torch.ones(steps, num_features))
        self.register_buffer("num_batches_tracked", torch.zeros(steps, dtype=torch.long))
        #: pool statistics across DDP ranks (set by synchronize_batch_norms)
        self.sync = False

    def forward(self, x: torch.Tensor, step: int) -> torch.Tensor:
        momentum = self.momentum
        if self.training:
            self.num_batches_tracked[step] += 1
            if momentum is None:  # cumulative moving average, as in nn.BatchNorm
                momentum = 1.0 / float(self.num_batches_tracked[step])
            if self.sync and _distributed():
                return sync_batch_norm(
                    x,
                    self.running_mean[step],
                    self.running_var[step],
                    self.weight,
                    self.bias,
                    momentum,
                    self.eps,
                )
        # Row views share storage with the buffers, so F.batch_norm updates them in place.
        return F.batch_norm(
            x,
            self.running_mean[step],
            self.running_var[step],
            self.weight,
            self.bias,
            self.training,
            momentum if momentum is not None else 0.0,
            self.eps,
        )

    def extra_repr(self) -> str:
        return f"{self.num_features}, steps={self.steps}, eps={self.eps}, momentum={self.momentum}"


class RecurrentConv(nn.Module):
    """Recurrent convolutional layer (RCL): one 3x3 conv + BN + ReLU applied t + 1 times.

    ``x1 = f(x); repeat t times: x1 = f(x + x1)`` with the same conv and affine BN at
    every step and per-step running statistics (see StepwiseBatchNorm).
    """

    def __init__(self, channels: int, t: int = 2, spatial_dims: int = 2) -> None:
        super().__init__()
        self.t = t
        self.conv = conv_layer(spatial_dims)(channels, channels, kernel_size=3, padding=1, bias=True)
        self.norm = StepwiseBatchNorm(channels, steps=t + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm(self.conv(x), 0))
        for step in range(1, self.t + 1):
            out = F.relu(self.norm(self.conv(x + out), step))
        return out


class RecurrentUnit(nn.Module):
    """1x1 conv to the block width, two RCLs, and (R2CL) a residual add.

    ``residual=False`` gives RU-Net's recurrent unit; ``t=0`` gives a plain residual
    unit (two conv + BN + ReLU and the add), used by the recurrence-free variant.
    """

    def __init__(
        self, c_in: int, c_out: int, t: int = 2, residual: bool = True, spatial_dims: int = 2
    ) -> None:
        super().__init__()
        self.residual = residual
        self.project = conv_layer(spatial_dims)(c_in, c_out, kernel_size=1, bias=True)
        self.body = nn.Sequential(
            RecurrentConv(c_out, t, spatial_dims), RecurrentConv(c_out, t, spatial_dims)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.project(x)
        out = self.body(x)
        return x + out if self.residual else out


class UpConv(nn.Module):
    """Nearest x2 upsampling, then 3x3 conv + BN + ReLU."""

    def __init__(self, c_in: int, c_out: int, spatial_dims: int = 2) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="nearest"), *conv_bn_relu(c_in, c_out, spatial_dims)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class AttentionGate(nn.Module):
    """Additive attention gate (Oktay et al. 2018) on a skip connection.

    Returns the gated skip ``x * alpha`` and ``alpha`` itself (one channel in [0, 1]),
    so that attention maps come from the same forward pass without hooks.
    """

    def __init__(self, gate_channels: int, skip_channels: int, inter_channels: int, spatial_dims: int = 2):
        super().__init__()
        conv, norm = conv_layer(spatial_dims), norm_layer(spatial_dims)
        self.w_g = nn.Sequential(conv(gate_channels, inter_channels, 1, bias=True), norm(inter_channels))
        self.w_x = nn.Sequential(conv(skip_channels, inter_channels, 1, bias=True), norm(inter_channels))
        self.psi = nn.Sequential(conv(inter_channels, 1, 1, bias=True), norm(1), nn.Sigmoid())

    def forward(self, gate: torch.Tensor, skip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha = self.psi(F.relu(self.w_g(gate) + self.w_x(skip)))
        return skip * alpha, alpha
