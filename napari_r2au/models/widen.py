"""Widen a trained network without changing what it computes (Net2Net-style, zero-out).

A wider network trained from scratch must first relearn what the narrow one already knows,
which costs more training than one session has. Widening instead keeps every old channel
with its trained weights and adds new channels that start inert: their incoming weights are
fresh random ones (so they carry signal and receive gradients), and the old channels' weights
*from* them start at zero. The wide network's output is then the narrow one's, exactly, in
training and in eval mode, and training can only use the new capacity from there on.

Every feature map of the family is "old channels first, then new ones", except the decoder's
concatenation ``(skip, up)``, whose second half starts after the skip's full new width.
"""

from __future__ import annotations

import torch

from .unet import UNetFamily

__all__ = ["widen_network"]


def _old_positions(key: str, dim: int, old_size: int, new_size: int, old_width: int) -> torch.Tensor:
    """Where the narrow tensor's indices along ``dim`` sit in the wide one."""
    if old_size == new_size:
        return torch.arange(old_size)
    level = int(key.split(".")[1]) if key.startswith("decoder.") else -1
    if dim == 1 and level >= 0 and old_size == 2 * old_width * 2**level:
        # the decoder's input is cat(skip, up): each half is old-then-new on its own
        half_old, half_new = old_size // 2, new_size // 2
        return torch.cat([torch.arange(half_old), half_new + torch.arange(half_old)])
    return torch.arange(old_size)


def widen_network(narrow: UNetFamily, base_width: int, *, seed: int = 0) -> UNetFamily:
    """A copy of ``narrow`` at ``base_width`` that computes the same logits.

    Raises:
        ValueError: for a narrower target or a network outside the family.
    """
    if not isinstance(narrow, UNetFamily):
        raise ValueError(f"only networks of the U-Net family can be widened, not {type(narrow).__name__}")
    old_width = narrow.head.in_channels  # the finest level's width is the base width
    if base_width < old_width:
        raise ValueError(f"base_width {base_width} is narrower than the network's {old_width}")
    spatial_dims = narrow.config["spatial_dims"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        wide = UNetFamily(**dict(narrow.config, base_width=base_width))
    old_state = narrow.state_dict()
    new_state = wide.state_dict()
    for key, old in old_state.items():
        new = new_state[key].clone()
        if old.shape == new.shape:
            new_state[key] = old.clone()
            continue
        positions = [
            _old_positions(key, dim, old.shape[dim], new.shape[dim], old_width) for dim in range(old.dim())
        ]
        is_conv_weight = key.endswith(".weight") and old.dim() == spatial_dims + 2
        if is_conv_weight and old.shape[1] != new.shape[1]:
            # the old output channels must not read the new input channels
            new_inputs = torch.ones(new.shape[1], dtype=torch.bool)
            new_inputs[positions[1]] = False
            rows = positions[0]
            new[rows[:, None], new_inputs.nonzero().flatten()[None, :]] = 0
        new[torch.meshgrid(*positions, indexing="ij")] = old
        new_state[key] = new
    wide.load_state_dict(new_state)
    wide.train(narrow.training)
    return wide
