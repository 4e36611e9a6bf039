"""The fine-tune defaults, in one torch-free place: the Fine-tune widget and ``r2au
finetune --help`` show them without importing the trainer."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class FinetuneSettings:
    steps: int = 150
    lr: float = 5e-4
    patch_size: int = 96
    batch_size: int = 8
    augment: bool = True
    freeze_encoder: bool = False
    seed: int = 0
    #: share of the image's width held out for validation when no validation pair is given
    holdout_fraction: float = 0.25
