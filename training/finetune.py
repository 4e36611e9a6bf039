"""Fine-tuning a model on corrected masks: what the napari Fine-tune widget runs.

``iter_finetune`` is a generator of TrainEvent (the widget's curve and progress bar
read them) that returns a :class:`FinetuneResult` with the new, versioned model. The
base model is never overwritten: the new model gets the next free name
``<base>-ft<N>`` in the user models folder, with its parent, the data used, the steps
and the validation Dice before and after in its metadata.
"""

from __future__ import annotations

import copy
import re
import shutil
import tempfile
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_r2au.engine import working_scale
from napari_r2au.model_files import (
    LoadedModel,
    ModelFileError,
    check_new_model_name,
    load_model,
    load_model_file,
    model_path,
    removed_model_names,
    save_model,
    user_models_dir,
)
from napari_r2au.postprocess import segment_mask

from .data import Sample, memory_samples
from .settings import FinetuneSettings
from .trainer import TrainConfig, TrainEvent, best_threshold, iter_train, predict_samples

#: at most this many held-out strips: each validation predicts all of them, and a stack
#: can have a hundred painted slices
MAX_HELD_OUT_STRIPS = 8

if TYPE_CHECKING:
    from torch import nn


@dataclass
class FinetuneResult:
    model: LoadedModel | None
    dice_before: float | None
    dice_after: float | None
    steps: int
    stopped: str
    #: pixels of the held-out part the user had corrected (None: a validation pair, or not
    #: known); few means the part is mostly the model's own output, which favours the base
    held_out_corrections: int | None = None
    #: the working scale each pair was trained at (derived per image for a fundus model)
    scales: list[float] = field(default_factory=list)

    @property
    def weight_share(self) -> float | None:
        """The share of the fine-tuned weights in the new model, when it was blended with its parent."""
        return None if self.model is None else self.model.metadata["provenance"].get("weight_share")

    @property
    def dice_fell(self) -> bool:
        """True when the new model scores lower than its base on the held-out part."""
        return (
            self.dice_before is not None
            and self.dice_after is not None
            and self.dice_after < self.dice_before
        )


def next_version_name(base: str, directory: Path | None = None) -> str:
    """``<base>-ft<N>`` with N one above the highest in the user folder, removed models
    included: a name in an exported mask's audit trail always means one file."""
    directory = directory or user_models_dir()
    root = re.sub(r"-ft\d+$", "", base)
    names = [p.stem for p in directory.glob(f"{root}-ft*.json")] + removed_model_names(directory)
    taken = [int(m.group(1)) for name in names if (m := re.fullmatch(rf"{re.escape(root)}-ft(\d+)", name))]
    return f"{root}-ft{max(taken, default=0) + 1}"


#: how many taken version names registration skips before it gives up
MAX_NAME_TRIES = 1000


def _register(network: nn.Module, meta: dict[str, Any], chosen: bool) -> Path:
    """Save the new model under a name no other model has, exclusively.

    Of two fine-tunes that started with the same next version (``<root>-ft<N>``), the first
    to finish keeps it and the other takes the next free number; a name the user ``chosen``
    is never changed: taken meanwhile, it is refused.
    """
    directory = user_models_dir()
    if chosen:
        try:
            return save_model(network, directory, meta, exclusive=True)
        except FileExistsError:
            raise ModelFileError(
                f"a model called {meta['name']!r} was added while this one trained; "
                "fine-tune again with another name"
            ) from None
    root, first = re.fullmatch(r"(.*)-ft(\d+)", meta["name"]).groups()  # next_version_name's form
    removed = set(removed_model_names(directory))
    for version in range(int(first), int(first) + MAX_NAME_TRIES):
        name = f"{root}-ft{version}"
        if name in removed:  # a removed version's name is not given again
            continue
        try:
            return save_model(network, directory, dict(meta, name=name), exclusive=True)
        except FileExistsError:  # another run registered it first (or a stray file holds it)
            continue
    raise ModelFileError(f"no free version name after {meta['name']!r} in {directory}")


def blend_with_parent(parent: nn.Module, tuned: nn.Module, share: float) -> nn.Module:
    """A copy of ``tuned`` with weights parent + share x (tuned - parent), buffers included
    (BatchNorm statistics); integer buffers (step counters) are the tuned ones.

    Fine-tuning on a few corrected images overshoots: halfway between parent and fine-tuned
    weights scored better on other images in domain, and at least as well across a domain
    shift with one, two or three corrected images (weight-space ensembling, as in WiSE-FT;
    docs/finetune-defaults.md, docs/hrf-finetune.md).
    """
    import torch

    if not 0.0 <= share <= 1.0:
        raise ValueError(f"the weight share must be between 0 and 1, not {share}")
    before, after = parent.state_dict(), tuned.state_dict()
    if before.keys() != after.keys() or any(before[k].shape != after[k].shape for k in after):
        raise ValueError("the fine-tuned network does not have its parent's layers")
    blended = copy.deepcopy(tuned)
    with torch.no_grad():
        blended.load_state_dict(
            {
                key: torch.lerp(before[key].to(value.device).float(), value.float(), share).to(value.dtype)
                if value.is_floating_point()
                else value
                for key, value in after.items()
            }
        )
    return blended.eval()


def _crop(sample: Sample, x0: int, x1: int, suffix: str) -> Sample:
    """Columns x0:x1 of a sample; its raw image stays whole, so that validation predicts
    a strip in the context of its image, as a user's run does (see :class:`Sample`). The
    piece draws patches by its share of the image's field of view."""
    fov = sample.fov[:, x0:x1]
    return Sample(
        sample.image[:, x0:x1],
        sample.mask[:, x0:x1],
        fov,
        f"{sample.name}{suffix}",
        sample.raw,
        window=(x0, x1),
        normalization=sample.normalization,
        statistics=sample.statistics,
        original=None if sample.original is None else sample.original[:, x0:x1],
        weight=sample.weight * float(fov.sum()) / max(1.0, float(sample.fov.sum())),
    )


def _pair_scales(
    parent: LoadedModel,
    pairs: Sequence[tuple[np.ndarray, np.ndarray]],
    validation: tuple[np.ndarray, np.ndarray] | None,
    scale: float | None,
    pixel_size: float | None,
    pixel_size_unit: str | None,
) -> tuple[list[float], float | None, dict[str, int | None]]:
    """The working scale of each pair and of the validation pair, and the new model's
    derived-scale rule (``fov_diameter``, ``image_width``).

    A parent that derives its scale from each image (a fundus model's field of view, a
    dermoscopy model's width) has each pair trained at its own scale, as the engine will
    predict it. A scale given by hand for such a parent sets the new model's rule instead:
    the first image measured at that scale, so that Segment sees it, and every other
    image, as it was trained."""
    from napari_r2au.engine import derived_scale, image_plane
    from napari_r2au.preprocess import size_measure

    rule = {"fov_diameter": parent.fov_diameter, "image_width": parent.image_width}
    if not parent.derives_scale or (scale is None and pixel_size is not None and parent.pixel_size):
        fixed = working_scale(parent, scale, pixel_size, pixel_size_unit)
        return [fixed] * len(pairs), None, {"fov_diameter": None, "image_width": None}
    if scale is None:
        scales = [derived_scale(parent, image) for image, _ in pairs]
        held = derived_scale(parent, validation[0]) if validation is not None else None
        return scales, held, rule
    fixed = working_scale(parent, scale)
    measured = size_measure(
        image_plane(pairs[0][0], parent.in_channels), by_diameter=bool(parent.fov_diameter)
    )
    value = int(min(max(round(fixed * measured), 16), 16384))
    key = "fov_diameter" if parent.fov_diameter else "image_width"
    return [fixed] * len(pairs), None, dict(rule, **{key: value})


def prepare_samples(
    model: LoadedModel,
    pairs: Sequence[tuple[np.ndarray, np.ndarray]],
    validation: tuple[np.ndarray, np.ndarray] | None,
    settings: FinetuneSettings,
    names: Sequence[str] | None = None,
    slices: Sequence[Sequence[int]] | None = None,
    fovs: Sequence[np.ndarray | None] | None = None,
    validation_fov: np.ndarray | None = None,
    scale: float | Sequence[float] = 1.0,
    device: str | None = None,
    validation_scale: float | None = None,
    originals: Sequence[np.ndarray | None] | None = None,
):
    """Training and validation samples at the model's scale; without a validation pair,
    hold out a band of columns of every image (or slice; at most MAX_HELD_OUT_STRIPS)
    with foreground both in the band and beside it: the right strip, unless the user's
    corrections lie elsewhere (:func:`held_out_band`). ``originals``: per pair, the mask
    before the corrections (what Segment made), which tells where they are; without it,
    the base model's prediction stands in."""
    train = memory_samples(
        pairs,
        model.in_channels,
        model.normalization,
        slices=slices,
        names=names,
        fovs=fovs,
        scale=scale,
        originals=originals,
    )
    if not any((sample.mask.astype(bool) & sample.fov).any() for sample in train):
        raise ValueError(
            "the corrected masks hold no foreground at all: fine-tuning on them would teach the model "
            "to find nothing. Include an image or slice where the structure is present"
        )
    if validation is not None:
        return train, memory_samples(
            [tuple(validation)],
            model.in_channels,
            model.normalization,
            names=["validation"],
            fovs=[validation_fov],
            scale=validation_scale or (scale if np.isscalar(scale) else scale[0]),
        )
    # every pair (or slice) gives a band, pooled: a threshold chosen on one image's band
    # follows that image (a hard one pulled it far off with two or three images). A pair
    # trains whole when no band has foreground (a slice the user erased: Dice on an empty
    # band says nothing), when the rest would have none (it would teach only background),
    # or when it is too narrow to lose a band.
    candidates = [i for i, sample in enumerate(train) if _band_starts(sample, settings)]
    # where the user corrected: the mask differs from the one before the corrections, or,
    # not knowing that one, from what the model predicts there now
    before = {i: train[i].original for i in candidates if train[i].original is not None}
    if len(before) == len(candidates):
        # a pair (a worklist case accepted as the model made it) whose mask is the model's own
        # would score the parent on agreeing with itself: bands come from corrected pairs, if any
        corrected_pairs = [i for i in candidates if _corrected_columns(train[i], before[i]).any()]
        candidates = corrected_pairs or candidates
    if len(candidates) > MAX_HELD_OUT_STRIPS:  # a long stack: bands from evenly spaced slices
        candidates = [
            candidates[int(j)] for j in np.linspace(0, len(candidates) - 1, MAX_HELD_OUT_STRIPS).round()
        ]
    if not candidates:
        return train, []
    unknown = [i for i in candidates if i not in before]
    if unknown:  # the stand-in: what Segment makes of the model's prediction (its own steps included)
        predicted = predict_samples(model, [train[i] for i in unknown], device=device)
        steps = model.metadata.get("postprocess")
        before |= {i: segment_mask(p, model.threshold, steps) > 0 for i, p in zip(unknown, predicted)}
    kept: list[Sample | list[Sample]] = list(train)
    held_out = []
    for i in candidates:
        sample = train[i]
        corrected = _corrected_columns(sample, before[i])
        x0, x1 = held_out_band(sample, settings, corrected)
        pieces = [(a, b) for a, b in ((0, x0), (x1, sample.mask.shape[1])) if b > a]
        kept[i] = [
            _crop(sample, a, b, "[train]" if len(pieces) == 1 else f"[train {n + 1}]")
            for n, (a, b) in enumerate(pieces)
        ]
        held_out.append(_crop(sample, x0, x1, "[held out]"))
        held_out[-1].corrections = int(corrected[x0:x1].sum())
    return [s for item in kept for s in (item if isinstance(item, list) else [item])], held_out


def _corrected_columns(sample: Sample, before: np.ndarray) -> np.ndarray:
    """Per column, the pixels inside the field of view where the mask differs from ``before``."""
    return ((before != sample.mask.astype(bool)) & sample.fov).sum(axis=0)


#: the narrowest piece a band in the middle may leave on either side (the patch size
#: shrinks to fit it: a small image's corrections may lie anywhere)
MIN_PIECE = 32


def _band_starts(sample: Sample, settings: FinetuneSettings) -> list[int]:
    """Where a held-out band of columns may start: the right strip first, then the left, then
    any start that leaves at least MIN_PIECE columns on both sides; only bands with
    foreground inside them and beside them."""
    width = sample.mask.shape[1]
    band = int(round(width * settings.holdout_fraction))
    right = width - band
    if right < settings.patch_size or band < 16:
        return []
    columns = (sample.mask.astype(bool) & sample.fov).sum(axis=0)
    piece = min(settings.patch_size, MIN_PIECE)
    starts = dict.fromkeys([right, 0, *range(piece, right - piece + 1, 8)])
    return [
        x for x in starts if columns[x : x + band].any() and (columns[:x].any() or columns[x + band :].any())
    ]


def held_out_band(sample: Sample, settings: FinetuneSettings, corrected: np.ndarray) -> tuple[int, int]:
    """The columns to hold out for validation. ``corrected`` counts, per column, the pixels
    where the mask differs from the one before the corrections (or, not knowing that one,
    from the base model's prediction): what the user corrected.

    The right strip, as long as it holds a fair part of the corrections (a quarter of its
    share by width); otherwise, the band with the most corrections among those that leave
    pieces at least a patch wide, and only when none of these holds any, among the bands
    that leave narrower pieces (the patch then shrinks, for every image, to fit them). A band
    the user never touched holds the model's own output, which the base model matches
    exactly, so no fine-tune could score better there.
    """
    starts = _band_starts(sample, settings)
    width = sample.mask.shape[1]
    band = int(round(width * settings.holdout_fraction))
    right, total = width - band, float(corrected.sum())
    if right in starts and corrected[right:].sum() >= 0.25 * total * band / width:
        return right, width

    def fits(x: int) -> bool:  # the pieces left and right of the band take whole patches
        return all(n == 0 or n >= settings.patch_size for n in (x, width - x - band))

    def count(x: int) -> float:
        return float(corrected[x : x + band].sum())

    fitting = [x for x in starts if fits(x)]
    pool = fitting if fitting and max(map(count, fitting)) > 0 else starts
    best = max(pool, key=lambda x: (count(x), x))
    return best, best + band


def iter_finetune(
    base: str | Path | LoadedModel,
    pairs: Sequence[tuple[np.ndarray, np.ndarray]],
    validation: tuple[np.ndarray, np.ndarray] | None = None,
    settings: FinetuneSettings | None = None,
    names: Sequence[str] | None = None,
    slices: Sequence[Sequence[int]] | None = None,
    device: str | None = None,
    fovs: Sequence[np.ndarray | None] | None = None,
    validation_fov: np.ndarray | None = None,
    scale: float | None = None,
    name: str | None = None,
    pixel_size: float | None = None,
    pixel_size_unit: str | None = None,
    originals: Sequence[np.ndarray | None] | None = None,
) -> Generator[TrainEvent, None, FinetuneResult]:
    """Fine-tune ``base`` on (image, corrected labels) pairs; returns the new model.

    ``scale``: the working scale of the new model (default: the parent's), applied to
    the pairs before training and recorded in the new model. ``pixel_size``: the pairs'
    pixel size, if known, so that the new model records the pixel size it sees (default:
    the parent's). ``name``: the new model's name (default: the next ``<parent>-ft<N>``);
    an existing name is refused. ``device``: None picks the best available, as training does.
    ``originals``: per pair, the mask before the user's corrections (Segment's), if known:
    the held-out band is then chosen where the corrections are (see :func:`prepare_samples`).
    """
    settings = settings or FinetuneSettings()
    if not 0.0 < settings.weight_share <= 1.0:  # refused before training, not after
        raise ValueError(f"the weight share must be above 0 and at most 1, not {settings.weight_share}")
    parent = base if isinstance(base, LoadedModel) else load_model(base)
    if parent.path is None:
        raise ValueError(
            "fine-tuning needs a model loaded from a file (its name and hash go into the new model)"
        )
    if parent.out_channels > 1:
        raise ValueError(
            f"{parent.name} has {parent.out_channels} classes; fine-tuning trains one foreground "
            "class and cannot start from a multiclass model"
        )
    scales, validation_scale, size_rule = _pair_scales(
        parent, pairs, validation, scale, pixel_size, pixel_size_unit
    )
    scale = scales[0]
    train_samples, val_samples = prepare_samples(
        parent,
        pairs,
        validation,
        settings,
        names,
        slices,
        fovs,
        validation_fov,
        scales,
        device=device,
        originals=originals,
        validation_scale=validation_scale,
    )
    patch = min(settings.patch_size, *(min(s.mask.shape) for s in train_samples))
    patch -= patch % 16
    if patch < 16:
        raise ValueError("the training images are too small to fine-tune on (need at least 16x16 pixels)")
    # validation samples are already at the working scale. The new model's threshold is
    # chosen on them, so the base model gets the same chance: a threshold chosen there by the
    # same rule
    chosen_name = name is not None
    if name is None:  # provisional: the final one is taken when the model is saved (_register)
        name = next_version_name(parent.name)
    model_path(user_models_dir(), name)  # a plain name, or refused before any work
    if chosen_name and name == parent.name:
        raise ValueError(f"a model called {name!r} exists already; choose another name")
    elif chosen_name:
        check_new_model_name(name)
    # both chosen by the same rule: the best within the held-out score's noise, nearest the
    # parent's threshold (the top of a sweep over a few strips is mostly noise)
    prior = parent.threshold
    dice_before = (
        best_threshold(parent, val_samples, device=device, prior=prior)[1]["f1"] if val_samples else None
    )
    counts = [sample.corrections for sample in val_samples]
    corrections = sum(counts) if counts and None not in counts else None
    # this run's own folder, new and unique (mkdtemp creates it exclusively): the only folder
    # the clean-up below may delete, and one no other run, earlier or concurrent, has written in
    runs = user_models_dir().parent / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=runs))
    config = TrainConfig(
        name=name,
        init_from=str(parent.path),
        patch_size=patch,
        batch_size=settings.batch_size,
        steps=settings.steps,
        lr=settings.lr,
        warmup_steps=max(1, settings.steps // 10),
        val_every=max(1, settings.steps // 5),
        seed=settings.seed,
        output_dir=str(run_dir),
        val_images=len(val_samples),
        val_names=[sample.name for sample in val_samples] or None,
        freeze_encoder=settings.freeze_encoder,
        in_channels=parent.in_channels,
        input_scale=scale,
        **size_rule,
        description=f"{parent.name} fine-tuned on corrected masks",
        pixel_size=pixel_size,
        pixel_size_unit=pixel_size_unit or (parent.pixel_size_unit if pixel_size else None),
        data={"kind": "memory", "pairs": list(names or [f"pair{i}" for i in range(len(pairs))])},
        # the threshold is chosen once, for the weights that are saved: by the trainer when
        # they are its own, here after blending when they are not
        calibrate_threshold=settings.weight_share >= 1.0,
        threshold_prior=prior,
    )
    if not settings.augment:
        config.augment.flips = config.augment.rot90 = config.augment.affine = config.augment.intensity = False
    # The trainer trains a copy of the parent's network, never the caller's.
    # A fine-tune is one process: torchrun's variables (left over in a shell) are ignored.
    try:
        result = yield from iter_train(
            config,
            samples=train_samples,
            val_samples=val_samples,
            device=device,
            parent=parent,
            distributed=False,
        )
    except BaseException:  # Cancel (the generator closed), an error: no half-run left in the user's folder
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    chosen = result.best if result.best is not None else result.last
    if not chosen.is_file():
        shutil.rmtree(run_dir, ignore_errors=True)
        return FinetuneResult(None, dice_before, None, result.steps, result.stopped, corrections, scales)
    tuned = load_model_file(chosen)
    meta: dict[str, Any] = dict(tuned.metadata, name=name)
    provenance = dict(meta["provenance"], finetune_settings=settings.__dict__)
    network, dice_after = tuned.network, None
    if not val_samples:  # nothing to choose a threshold on: the parent's, not the file format's 0.5
        meta["threshold"] = parent.threshold
        provenance["threshold_from"] = "parent"
    if settings.weight_share < 1.0:
        network = blend_with_parent(parent.network, tuned.network, settings.weight_share)
        provenance["weight_share"] = settings.weight_share
        tuned = LoadedModel(network, meta)
        if val_samples:  # the saved weights are these: their threshold, measured on them
            meta["threshold"], metrics = best_threshold(tuned, val_samples, device=device, prior=prior)
            provenance["validation_metrics"] = {k: round(float(v), 5) for k, v in metrics.items()}
            provenance["threshold_chosen_on"] = (
                "held-out part of the corrections, F1 (blended weights), the nearest to the "
                f"parent's {prior:g} within the F1's noise of the best"
            )
            dice_after = metrics["f1"]
        else:  # the trainer's figures are of the unblended weights
            provenance.pop("validation_metrics", None)
    elif val_samples:  # the trainer chose the threshold on the held-out part and measured there
        dice_after = result.best_metrics["f1"]
    meta["provenance"] = dict(
        provenance, dice_before=dice_before, dice_after=dice_after, held_out_corrections=corrections
    )
    meta.pop("weights_file", None)
    meta.pop("weights_sha256", None)
    try:
        sidecar = _register(network, meta, chosen_name)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    return FinetuneResult(
        load_model_file(sidecar, source="user"),
        dice_before,
        dice_after,
        result.steps,
        result.stopped,
        corrections,
        scales,
    )
