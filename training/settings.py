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
    #: the new model's weights are parent + share x (fine-tuned - parent); 1 keeps the
    #: fine-tuned weights. Measured (docs/finetune-defaults.md, docs/hrf-finetune.md): 0.5
    #: costs images like the training set far less, and across a domain shift adapts at
    #: least as much as 1 with one, two or three corrected images once the threshold is
    #: chosen on the held-out strips of all of them
    weight_share: float = 0.5
