"""The fine-tune defaults, in one torch-free place: the Fine-tune widget and ``r2au
finetune --help`` show them without importing the trainer."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class FinetuneSettings:
    """Defaults for adapting a model to the user's images (another camera, population or
    scale), measured with ``benchmarks.finetune_lr`` and ``benchmarks.hrf_finetune``
    (docs/finetune-defaults.md) by what the new model does to the user's *other* images."""

    steps: int = 150
    lr: float = 5e-4
    patch_size: int = 96
    batch_size: int = 8
    augment: bool = True
    freeze_encoder: bool = False
    seed: int = 0
    #: share of the image's width held out for validation when no validation pair is given
    holdout_fraction: float = 0.25
    #: the new model's weights are parent + share x (fine-tuned - parent): halfway keeps
    #: more of what the parent knew about other images and, measured, still adapts
    #: (docs/finetune-defaults.md); 1 keeps the fine-tuned weights as they are
    weight_share: float = 0.5
