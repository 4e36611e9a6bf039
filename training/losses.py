"""Losses on logits: BCE-with-logits (optionally class-weighted) plus soft Dice or Lovász.

The Lovász hinge (Berman, Rannen Triki and Blaschko, CVPR 2018) is a convex surrogate of
one image's Jaccard index. The ISIC challenge scores each image's Jaccard and averages them,
so a loss on each image's Jaccard aims at the metric itself, where a Dice pooled over the
batch lets large lesions outweigh small ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("bce_dice", "bce", "dice", "bce_lovasz")


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - Dice of the sigmoid probabilities, pooled over the batch."""
    probs = torch.sigmoid(logits)
    intersection = (probs * target).sum()
    return 1 - (2 * intersection + eps) / (probs.sum() + target.sum() + eps)


def _jaccard_steps(truth_sorted: torch.Tensor) -> torch.Tensor:
    """How much the Jaccard loss grows as each pixel, in order of its error, turns wrong."""
    foreground = truth_sorted.sum()
    intersection = foreground - truth_sorted.cumsum(0)
    union = foreground + (1 - truth_sorted).cumsum(0)
    loss = 1 - intersection / union
    return torch.cat([loss[:1], loss[1:] - loss[:-1]])


def lovasz_hinge_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of each image's Lovász hinge: each image's Jaccard counts alike."""
    losses = []
    target = target.to(logits.dtype)  # 2 * t - 1 on an integer mask would wrap
    for image_logits, image_target in zip(logits.flatten(1), target.flatten(1)):
        signs = 2 * image_target - 1
        errors = 1 - image_logits * signs
        errors_sorted, order = torch.sort(errors, descending=True)
        losses.append(torch.dot(F.relu(errors_sorted), _jaccard_steps(image_target[order])))
    return torch.stack(losses).mean()


def segmentation_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    kind: str = "bce_dice",
    pos_weight: float = 1.0,
    dice_weight: float = 1.0,
) -> torch.Tensor:
    """BCE + Dice by default; ``pos_weight`` > 1 favours thin foreground structures.

    ``bce_lovasz`` is BCE plus ``dice_weight`` times the per-image Lovász hinge.
    """
    logits = logits.float()
    if kind not in LOSSES:
        raise ValueError(f"unknown loss {kind!r}; valid: {', '.join(LOSSES)}")
    loss = logits.new_zeros(())
    if kind in ("bce_dice", "bce", "bce_lovasz"):
        weight = torch.tensor(pos_weight, dtype=logits.dtype, device=logits.device)
        loss = loss + F.binary_cross_entropy_with_logits(logits, target, pos_weight=weight)
    if kind in ("bce_dice", "dice"):
        loss = loss + dice_weight * soft_dice_loss(logits, target)
    if kind == "bce_lovasz":
        loss = loss + dice_weight * lovasz_hinge_loss(logits, target.float())
    return loss
