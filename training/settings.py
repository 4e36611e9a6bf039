"""The fine-tune defaults, in one torch-free place: the Fine-tune widget and ``r2au
finetune --help`` show them without importing the trainer."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class FinetuneSettings:
    """Defaults chosen with ``benchmarks.finetune_lr`` (docs/finetune-defaults.md): with the
    encoder frozen and lr 1e-4, one corrected image helps across a domain shift at least as
    much as the earlier lr 5e-4 with everything trained, harms other images of the model's
    own domain least, and trains in two thirds of the time."""

    steps: int = 150
    lr: float = 1e-4
    patch_size: int = 96
    batch_size: int = 8
    augment: bool = True
    freeze_encoder: bool = True
    seed: int = 0
    #: share of the image's width held out for validation when no validation pair is given
    holdout_fraction: float = 0.25
