"""Losses on logits: BCE-with-logits (optionally class-weighted) plus soft Dice."""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("bce_dice", "bce", "dice")


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - Dice of the sigmoid probabilities, pooled over the batch."""
    probs = torch.sigmoid(logits)
    intersection = (probs * target).sum()
    return 1 - (2 * intersection + eps) / (probs.sum() + target.sum() + eps)


def segmentation_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    kind: str = "bce_dice",
    pos_weight: float = 1.0,
    dice_weight: float = 1.0,
) -> torch.Tensor:
    """BCE + Dice by default; ``pos_weight`` > 1 favours thin foreground structures."""
    logits = logits.float()
    if kind not in LOSSES:
        raise ValueError(f"unknown loss {kind!r}; valid: {', '.join(LOSSES)}")
    loss = logits.new_zeros(())
    if kind in ("bce_dice", "bce"):
        weight = torch.tensor(pos_weight, dtype=logits.dtype, device=logits.device)
        loss = loss + F.binary_cross_entropy_with_logits(logits, target, pos_weight=weight)
    if kind in ("bce_dice", "dice"):
        loss = loss + dice_weight * soft_dice_loss(logits, target)
    return loss
