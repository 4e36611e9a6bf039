"""The fine-tune defaults, in one torch-free place: the Fine-tune widget and ``r2au
finetune --help`` show them without importing the trainer."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class FinetuneSettings:
    """Defaults for adapting a model to the user's images (another camera, population or
    scale). Measured with ``benchmarks.finetune_lr`` and ``benchmarks.hrf_finetune``
    (docs/finetune-defaults.md): across a domain shift these beat a frozen encoder at
    lr 1e-4 by 0.03 F1 with two corrected images; on images like the model's training
    set the frozen encoder at lr 1e-4 costs the other images less."""

    steps: int = 150
    lr: float = 5e-4
    patch_size: int = 96
    batch_size: int = 8
    augment: bool = True
    freeze_encoder: bool = False
    seed: int = 0
    #: share of the image's width held out for validation when no validation pair is given
    holdout_fraction: float = 0.25
