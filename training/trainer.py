"""The training loop: a generator of progress events, used by the CLI and the GUI alike.

``iter_train(config)`` yields :class:`TrainEvent` after every step (and with validation
metrics after each validation) and returns a :class:`TrainResult`. Closing the
generator cancels: checkpoints already written stay intact because every write is
atomic. No Qt and no napari here.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import math
import os
import time
import warnings
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from napari_r2au.device import PRECISIONS, autocast_dtype, float_name, float_precision, select_device
from napari_r2au.engine import predict, run
from napari_r2au.io import atomic_path, open_for_append, write_bytes_atomic
from napari_r2au.model_files import (
    LoadedModel,
    ModelFileError,
    build_metadata,
    check_segment_property,
    load_model,
    save_model,
)
from napari_r2au.models import ARCHITECTURES, create_model

from .augment import AugmentConfig, PatchSampler, augment
from .data import DataError, Sample, dicom_samples, drive_samples, folder_samples, split, split_sources
from .losses import LOSSES, segmentation_loss
from .metrics import Counts, confusion, roc_auc


def _as_int(value: Any) -> Any:
    """``"255"`` -> 255 (what JSON makes of integer keys); anything else as it is."""
    digits = value.strip().lstrip("-") if isinstance(value, str) else ""
    if digits.isascii() and digits.isdigit():  # "¹" and "٣" are digits to str.isdigit, not to int()
        return int(value)
    return value


#: the keys of each kind of training data (``class_map`` is allowed for all)
DATA_KEYS: dict[str, tuple[str, ...]] = {
    "drive": ("root",),
    "folders": ("images", "masks", "fov"),
    "dicom": ("root",),
    "memory": ("pairs",),
    "sources": ("sources",),
}
REQUIRED_DATA_KEYS: dict[str, tuple[str, ...]] = {
    "drive": ("root",),
    "folders": ("images", "masks"),
    "dicom": ("root",),
    "memory": (),
    "sources": ("sources",),
}
#: what each entry of data.sources may hold besides its own kind's keys
SOURCE_KEYS = ("name", "val_images", "val_names", "weight")


def max_threads() -> int:
    """The most threads a run may ask for: 4 per CPU core (far more crashes PyTorch's pool)."""
    return 4 * (os.cpu_count() or 1)


class ConfigError(ValueError):
    """A training config (YAML, ``--set``, a run's config.json) cannot be used; the message says why."""


#: data keys that name folders: they must be text (``data.root: 5`` is a mistake, not a path)
PATH_KEYS = ("root", "images", "masks", "fov")


def _jpeg_problems(augment: AugmentConfig) -> list[str]:
    """The JPEG augmentation's share and quality range, checked before any data is read."""
    found = []
    share = augment.jpeg
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share <= 1:
        found.append(f"augment.jpeg is the share of patches (0 to 1), got {share!r}")
    quality = augment.jpeg_quality
    if (
        not isinstance(quality, (list, tuple))
        or len(quality) != 2
        or not all(isinstance(q, int) and not isinstance(q, bool) and 1 <= q <= 95 for q in quality)
        or quality[0] > quality[1]
    ):
        found.append(f"augment.jpeg_quality is [lowest, highest] between 1 and 95, got {quality!r}")
    return found


def _path_problems(data: dict[Any, Any], where: str) -> list[str]:
    return [
        f"{where}.{key} must be a folder path, got {data[key]!r}"
        for key in PATH_KEYS
        if data.get(key) is not None and not isinstance(data[key], (str, os.PathLike))
    ]


@dataclass
class TrainConfig:
    """Everything a run depends on; saved resolved next to its outputs."""

    name: str = "model"
    architecture: str = "r2au_net"
    base_width: int = 16
    t: int = 2
    in_channels: int = 3
    data: dict[str, Any] = field(
        default_factory=lambda: {"kind": "drive", "root": "../shared/data/DRIVE/training"}
    )
    val_images: int = 4
    #: hold out these images (names or stems) instead of ``val_images`` chosen by the seed
    val_names: list[str] | None = None
    patch_size: int | None = 64
    batch_size: int = 32
    steps: int = 4000
    max_minutes: float | None = None
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    grad_clip: float | None = 1.0
    loss: str = "bce_dice"
    pos_weight: float = 1.0
    dice_weight: float = 1.0
    precision: str = "auto"
    #: keep the network and its batches in channels-last order on the CPU and CUDA, the layout
    #: oneDNN's and cuDNN's fast convolutions use (python -m benchmarks.train_step measures it)
    channels_last: bool = True
    val_every: int = 250
    patience: int | None = None
    seed: int = 0
    threads: int | None = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    output_dir: str = "runs/model"
    init_from: str | None = None
    #: start from ``init_from``'s network widened to this base width, computing what it
    #: computed (napari_r2au.models.widen): more capacity without training from scratch
    widen_to: int | None = None
    freeze_encoder: bool = False
    description: str = ""
    input_scale: float = 1.0
    #: the training images' pixel size (before input_scale), if known; models record the
    #: pixel size the network sees, and the engine resizes images of other pixel sizes to it
    pixel_size: float | None = None
    pixel_size_unit: str | None = None
    #: fundus photographs: resize each image so that its field of view is this many pixels
    #: across (instead of input_scale); the model records it and the engine does the same
    fov_diameter: int | None = None
    #: photographs framed alike (dermoscopy): resize each image to this width instead
    image_width: int | None = None
    device: str = "auto"
    #: clean-up steps recorded in the model file and applied by the engine
    postprocess: list[str] = field(default_factory=list)
    #: pick the decision threshold that maximises validation F1 and store it in the model
    calibrate_threshold: bool = True
    #: a threshold to stay near (a fine-tune's parent's): calibration then takes, among the
    #: thresholds whose score is within the score's noise of the best, the one nearest this
    threshold_prior: float | None = None
    #: also log to TensorBoard (needs the tensorboard package) in output_dir/tensorboard
    tensorboard: bool = False
    #: keep an exponential moving average of the weights (e.g. 0.999) and validate and save
    #: it instead of the raw weights, which swing from step to step on small data
    ema_decay: float | None = None
    #: what checkpoints and the threshold are chosen by: "f1" (pixels pooled; with several
    #: sources, the mean of the sources' F1) or "jaccard_per_image" (the mean of each image's
    #: Jaccard, ISIC's lesion metric, where one large lesion must not outweigh many small ones;
    #: with several sources, the mean of the sources' means, as for F1)
    select_by: str = "f1"
    #: input normalization of a new model, e.g. {kind: clahe} (napari_r2au.preprocess);
    #: a fine-tuned model keeps its parent's
    normalization: dict[str, Any] | None = None
    #: what the foreground is, for DICOM SEG exports: {category: CODE, type: CODE}, each
    #: CODE {scheme: SCT, value: ..., meaning: ...}; a fine-tuned model keeps its parent's
    segment_property: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """A checked config from plain values (YAML, JSON); raises ConfigError naming every problem."""
        if not isinstance(values, dict):
            raise ConfigError(f"a config is a mapping of keys to values, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(sorted(map(str, unknown)))}")
        values = dict(values)
        data = values.get("data")
        if isinstance(data, dict) and isinstance(data.get("class_map"), dict):
            # JSON (a run's config.json) and quoted YAML keys give strings: mask values are integers
            values["data"] = dict(
                data, class_map={_as_int(k): _as_int(v) for k, v in data["class_map"].items()}
            )
        if isinstance(values.get("augment"), dict):
            augment_keys = {f.name for f in dataclasses.fields(AugmentConfig)}
            if set(values["augment"]) - augment_keys:
                unknown_augment = ", ".join(sorted(map(str, set(values["augment"]) - augment_keys)))
                raise ConfigError(
                    f"unknown augment keys: {unknown_augment}; valid: {', '.join(sorted(augment_keys))}"
                )
            values["augment"] = AugmentConfig(**values["augment"])
        config = cls(**values)
        try:
            problems = config.problems()
        except (
            TypeError,
            AttributeError,
        ) as exc:  # a value of a type no check expects (a list for a name...)
            raise ConfigError(f"config: a value has the wrong type ({exc})") from exc
        if problems:
            raise ConfigError("config: " + "; ".join(problems))
        return config

    def problems(self) -> list[str]:
        """What is wrong with the values (types, ranges, data keys), found before any data
        is read or file written; empty when all is well."""
        found: list[str] = []

        def number(
            name: str,
            low: float,
            *,
            integer: bool = False,
            optional: bool = False,
            strict: bool = False,
            high: float | None = None,
        ) -> None:
            value = getattr(self, name)
            if value is None and optional:
                return
            kind = "a whole number" if integer else "a number"
            ok = isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)
            if not ok or not math.isfinite(value):
                found.append(f"{name} must be {kind}, got {value!r}")
            elif value < low or (strict and value == low) or (high is not None and value >= high):
                bound = f"above {low:g}" if strict else f"at least {low:g}"
                found.append(
                    f"{name} must be {bound}{'' if high is None else f' and below {high:g}'}, got {value!r}"
                )

        for name in ("base_width", "in_channels", "batch_size", "steps", "val_every"):
            number(name, 1, integer=True)
        for name in ("t", "val_images", "warmup_steps", "seed"):
            number(name, 0, integer=True)
        number("patch_size", 16, integer=True, optional=True)
        number("widen_to", 1, integer=True, optional=True, high=65)
        if self.widen_to is not None and self.init_from is None:
            found.append("widen_to widens the network of init_from: give init_from too")
        if self.widen_to is not None and self.freeze_encoder:
            found.append("widen_to with freeze_encoder would leave the new encoder channels random: give one")
        number("fov_diameter", 16, integer=True, optional=True, high=16385)
        number("image_width", 16, integer=True, optional=True, high=16385)
        if self.fov_diameter and self.image_width:
            found.append("fov_diameter and image_width are two rules for one scale: give one")
        number("patience", 1, integer=True, optional=True)
        number(
            "threads", 0, integer=True, optional=True, high=max_threads() + 1
        )  # 0 (like null): PyTorch's default
        for name in ("lr", "pos_weight", "input_scale"):
            number(name, 0, strict=True)
        for name in ("weight_decay", "dice_weight"):
            number(name, 0)
        for name in ("max_minutes", "pixel_size"):
            number(name, 0, strict=True, optional=True)
        number("grad_clip", 0, optional=True)  # 0 (like null): no clipping
        number("ema_decay", 0, strict=True, optional=True, high=1)
        if self.segment_property is not None and (problem := check_segment_property(self.segment_property)):
            found.append(f"segment_property: {problem}")
        found += _jpeg_problems(self.augment)
        if self.loss not in LOSSES:
            found.append(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.select_by not in SELECT_BY:
            found.append(f"select_by must be one of {', '.join(SELECT_BY)}, got {self.select_by!r}")
        if self.precision not in PRECISIONS:
            found.append(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.init_from is None and self.architecture not in ARCHITECTURES:
            found.append(f"architecture must be one of {', '.join(ARCHITECTURES)}, got {self.architecture!r}")
        if not isinstance(self.data, dict):
            found.append(f"data must be a mapping (kind, root or images/masks, ...), got {self.data!r}")
        else:
            found += _path_problems(self.data, "data")
            kind = self.data.get("kind")
            allowed = DATA_KEYS.get(kind)
            if allowed is None:
                found.append(f"data.kind must be one of {', '.join(DATA_KEYS)}, got {kind!r}")
            else:
                unknown = sorted(set(self.data) - set(allowed) - {"kind", "class_map"})
                if unknown:
                    found.append(
                        f"data.{unknown[0]} is not a key of data.kind {kind}; "
                        f"valid: {', '.join(['kind', *allowed, 'class_map'])}"
                    )
                missing = [key for key in REQUIRED_DATA_KEYS[kind] if self.data.get(key) in (None, "")]
                if missing:
                    found.append(f"data.kind {kind} needs data.{missing[0]}")
                elif kind == "sources":
                    found += _source_problems(self.data["sources"])
        return found

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TrainEvent:
    step: int
    total: int
    loss: float
    lr: float
    elapsed: float
    validation: dict[str, float] | None = None
    best_f1: float | None = None
    stage: str = "train"


@dataclass
class TrainResult:
    output_dir: Path
    best: Path | None
    last: Path
    steps: int
    best_metrics: dict[str, float]
    stopped: str


def _size_rule(config: TrainConfig, parent: LoadedModel | None) -> dict[str, int | None]:
    """The derived-scale rule the new model records: the config's, else its parent's."""
    if config.fov_diameter or config.image_width:
        return {"fov_diameter": config.fov_diameter, "image_width": config.image_width}
    if parent is not None:
        return {"fov_diameter": parent.fov_diameter, "image_width": parent.image_width}
    return {"fov_diameter": None, "image_width": None}


def _source_problems(sources: Any) -> list[str]:
    """What is wrong with data.sources: a list of drive/folders entries with unique names."""
    from .data import source_name

    if not isinstance(sources, list) or not sources:
        return ["data.sources must be a non-empty list of {kind: drive|folders, ...} entries"]
    found, names = [], []
    for index, source in enumerate(sources):
        where = f"data.sources[{index}]"
        kind = source.get("kind") if isinstance(source, dict) else None
        if kind not in ("drive", "folders"):
            found.append(f"{where}.kind must be drive or folders, got {kind!r}")
            continue
        unknown = sorted(set(source) - set(DATA_KEYS[kind]) - set(SOURCE_KEYS) - {"kind"})
        if unknown:
            found.append(
                f"{where}.{unknown[0]} is not a key of a {kind} source; valid: "
                f"{', '.join(['kind', *DATA_KEYS[kind], *SOURCE_KEYS])}"
            )
        missing = [key for key in REQUIRED_DATA_KEYS[kind] if source.get(key) in (None, "")]
        if missing:
            found.append(f"{where} needs {missing[0]}")
        found += _path_problems(source, where)
        for key in ("val_images",):
            value = source.get(key, 1)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                found.append(f"{where}.{key} must be a whole number, got {value!r}")
        weight = source.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < math.inf:
            found.append(f"{where}.weight must be a positive number, got {weight!r}")
        names.append(source_name(source))
    if len(set(names)) < len(names):
        found.append(f"data.sources: two sources have the same name ({', '.join(names)}); give each a name")
    return found


def resolve_normalization(config: TrainConfig, parent: LoadedModel | None = None) -> dict[str, Any]:
    """The normalization the run trains with: the parent model's, else the config's."""
    from napari_r2au.preprocess import STANDARDIZE, check_normalization

    if parent is not None:
        if config.normalization and dict(config.normalization) != parent.normalization:
            raise ValueError(
                f"normalization {config.normalization} differs from the one {parent.name} was "
                f"trained with ({parent.normalization}); a model keeps its parent's normalization"
            )
        return parent.normalization
    spec = dict(config.normalization or STANDARDIZE)
    problem = check_normalization(spec)
    if problem:
        raise ValueError(f"normalization: {problem}")
    return spec


def load_samples(
    config: TrainConfig, normalization: dict[str, Any] | None = None, data: dict[str, Any] | None = None
) -> list[Sample]:
    """The config's training data (or ``data``, one of its sources); a missing folder
    names the key that points to it. Samples of several sources carry their source's name
    and draw patches by its ``weight``: a source's share, whatever its number of images."""
    normalization = normalization or resolve_normalization(config)
    data = config.data if data is None else data
    kind = data.get("kind")
    if kind == "sources":
        from .data import source_name

        samples = []
        for source in data["sources"]:
            own = load_samples(config, normalization, source)
            for sample in own:  # (split_sources gives the training images their source's weight)
                sample.source = source_name(source)
            samples += own
        return samples
    keys = REQUIRED_DATA_KEYS.get(kind) if kind != "memory" else None
    if keys is None:
        raise ValueError(f"data.kind must be 'drive', 'folders' or 'dicom' (or pass samples), got {kind!r}")
    for key in keys:
        if not Path(data[key]).is_dir():
            raise DataError(
                f"{data[key]}: no such folder (data.{key} of the config; point it at your copy "
                f"with --set data.{key}=PATH)"
            )
    if kind == "drive":
        return drive_samples(
            data["root"],
            config.in_channels,
            normalization,
            scale=config.input_scale,
            fov_diameter=config.fov_diameter,
            image_width=config.image_width,
        )
    if kind == "dicom":
        return dicom_samples(
            data["root"],
            config.in_channels,
            normalization,
            scale=config.input_scale,
            class_map=data.get("class_map"),
            pixel_size=config.pixel_size,
            pixel_size_unit=config.pixel_size_unit,
        )
    return folder_samples(
        data["images"],
        data["masks"],
        data.get("fov"),
        config.in_channels,
        normalization,
        scale=config.input_scale,
        class_map=data.get("class_map"),
        fov_diameter=config.fov_diameter,
        image_width=config.image_width,
    )


def lr_at(step: int, config: TrainConfig, elapsed: float = 0.0) -> float:
    """Linear warm-up, then cosine decay to 1% of the peak.

    With a time budget (``max_minutes``) the decay follows whichever runs out first,
    steps or time, so a run cut short by its budget still ends with a small rate.
    """
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    if config.max_minutes:
        progress = max(progress, elapsed / (60 * config.max_minutes))
    return config.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def predict_samples(
    model: LoadedModel, samples: list[Sample], precision: str = "auto", device: str | None = None
) -> list[np.ndarray]:
    """Probabilities for each sample through the engine, on torch at a float.

    Samples are already at the model's working scale (they are resized once, when
    loaded), so the engine must not resize them again: scale 1. A sample cut from a
    wider image is predicted whole and cut out after (its ``window``). Like against like:
    a network being trained runs on torch, so its parent does too (never int8, never
    OpenVINO), which also spares a fine-tune converting the parent: that conversion
    imports ONNX, whose first import holds the interpreter lock for about a second and
    froze napari during the Fine-tune dock's first run.
    """
    out = []
    precision = float_precision(select_device(device), precision)
    for s in samples:
        probabilities = predict(
            model,
            s.raw,
            precision=precision,
            device=device,
            scale=1.0,
            statistics=s.statistics,
            backend="torch",
        ).probabilities
        out.append(probabilities if s.window is None else probabilities[:, s.window[0] : s.window[1]])
    return out


def pooled_metrics(samples: list[Sample], probs: list[np.ndarray], threshold: float) -> dict[str, float]:
    """Set-level metrics: pixel counts inside the fields of view pooled over all samples."""
    counts = Counts()
    for s, p in zip(samples, probs):
        counts = counts + confusion(s.mask, p > threshold, s.fov)
    return counts.rates()


def pooled_auc(samples: list[Sample], probs: list[np.ndarray]) -> float:
    return roc_auc(
        np.concatenate([s.mask[s.fov] for s in samples]),
        np.concatenate([p[s.fov] for s, p in zip(samples, probs)]),
    )


def evaluate_samples(
    model: LoadedModel,
    samples: list[Sample],
    threshold: float = 0.5,
    precision: str = "auto",
    device: str | None = None,
) -> dict[str, float]:
    """Set-level metrics (with AUC-ROC) over the samples' fields of view; with several
    sources also each source's F1 and AUC-ROC and their mean F1 (:func:`source_metrics`)."""
    probs = predict_samples(model, samples, precision, device)
    return _metrics_at(samples, probs, threshold)


def _metrics_at(samples: list[Sample], probs: list[np.ndarray], threshold: float) -> dict[str, float]:
    return dict(
        pooled_metrics(samples, probs, threshold),
        auc_roc=pooled_auc(samples, probs),
        jaccard_per_image=jaccard_per_image(samples, probs, threshold),
        **source_metrics(samples, probs, threshold),
    )


def jaccard_per_image(samples: list[Sample], probs: list[np.ndarray], threshold: float) -> float:
    """The mean over images of each image's Jaccard inside its field of view (an image with
    nothing to find and nothing found counts 1)."""
    scores = []
    for s, p in zip(samples, probs):
        c = confusion(s.mask, p > threshold, s.fov)
        union = c.tp + c.fp + c.fn
        scores.append(c.tp / union if union else 1.0)
    return float(np.mean(scores)) if scores else float("nan")


def _by_source(samples: list[Sample], probs: list[np.ndarray]) -> dict[str, tuple[list, list]]:
    groups: dict[str, tuple[list, list]] = {}
    for s, p in zip(samples, probs):
        group = groups.setdefault(s.source or "", ([], []))
        group[0].append(s)
        group[1].append(p)
    return groups


def source_metrics(samples: list[Sample], probs: list[np.ndarray], threshold: float) -> dict[str, float]:
    """Per source ``f1@NAME`` and ``auc_roc@NAME``, and ``f1_source_mean``, their mean F1:
    the score a multi-source run is chosen by, so that the largest source cannot hide
    a camera the model fails on. Empty for a single source."""
    groups = _by_source(samples, probs)
    if len(groups) < 2:
        return {}
    out: dict[str, float] = {}
    for name, (own, own_probs) in groups.items():
        out[f"f1@{name}"] = pooled_metrics(own, own_probs, threshold)["f1"]
        out[f"auc_roc@{name}"] = pooled_auc(own, own_probs)
    scores = [out[f"f1@{name}"] for name in groups if math.isfinite(out[f"f1@{name}"])]
    # a source without foreground in its validation images has no F1 (0/0): it does not vote
    out["f1_source_mean"] = float(np.mean(scores)) if scores else float("nan")
    out.update(source_jaccards(samples, probs, threshold))
    return out


def source_jaccards(samples: list[Sample], probs: list[np.ndarray], threshold: float) -> dict[str, float]:
    """Per source the mean of its images' Jaccard (``jaccard_per_image@NAME``) and
    ``jaccard_source_mean``, their mean: 15 PH2 images beside 150 ISIC ones weigh as much
    as ISIC when a run is chosen by Jaccard. Empty for a single source."""
    groups = _by_source(samples, probs)
    if len(groups) < 2:
        return {}
    out = {
        f"jaccard_per_image@{name}": jaccard_per_image(*group, threshold) for name, group in groups.items()
    }
    out["jaccard_source_mean"] = float(np.mean(list(out.values())))
    return out


#: the scores a run may be chosen by (TrainConfig.select_by)
SELECT_BY = ("f1", "jaccard_per_image")


def selection_score(metrics: dict[str, float], select_by: str = "f1") -> float:
    """What checkpoints and thresholds are chosen by: with ``select_by="f1"`` the sources'
    mean F1, else F1; with ``"jaccard_per_image"`` the mean of the images' Jaccard (with
    several sources, the mean of the sources' means). A score
    that is not a number (nothing found, nothing to find) ranks last, never first."""
    if select_by == "jaccard_per_image":
        score = metrics.get("jaccard_source_mean", metrics.get("jaccard_per_image", float("nan")))
        return score if math.isfinite(score) else float("-inf")
    score = metrics.get("f1_source_mean", metrics["f1"])
    if not math.isfinite(score):
        score = metrics["f1"]
    return score if math.isfinite(score) else float("-inf")


def _metadata(
    config: TrainConfig,
    arch_args: dict[str, Any],
    step: int,
    elapsed: float,
    metrics: dict[str, float],
    parent: LoadedModel | None,
    n_train: int,
    training_float: str | None = None,
) -> dict[str, Any]:
    from napari_r2au import __version__

    provenance = {
        "trainer": f"napari-r2au {__version__}",
        "data": config.data,
        "train_images": n_train,
        "validation_images": list(config.val_names) if config.val_names else config.val_images,
        "steps": step,
        "patch_size": config.patch_size,
        "batch_size": config.batch_size,
        "seed": config.seed,
        "train_seconds": round(elapsed, 1),
        "threads": torch.get_num_threads(),
        # what precision "auto" became on this machine (a measured choice on the CPU)
        **({"training_float": training_float} if training_float else {}),
        "validation_metrics": {k: round(float(v), 5) for k, v in metrics.items()},
    }
    if config.ema_decay:
        provenance["ema_decay"] = config.ema_decay
    if config.select_by != "f1":
        provenance["select_by"] = config.select_by
    if parent is not None:
        provenance["parent"] = {"name": parent.name, "sha256": parent.sha256}
        widened = parent.metadata.get("arch_args", {}).get("base_width")
        if config.widen_to is not None and widened != config.widen_to:
            provenance["parent"]["widened_from_base_width"] = widened
    if config.pixel_size:
        # DICOM spacings are in mm: a DICOM run's pixel size is in mm unless the config says otherwise
        unit = config.pixel_size_unit or ("mm" if config.data.get("kind") == "dicom" else None)
        pixel_size = config.pixel_size / config.input_scale
    elif parent is not None:
        pixel_size, unit = parent.pixel_size, parent.pixel_size_unit
    else:
        pixel_size, unit = None, None
    return build_metadata(
        name=config.name,
        architecture=config.architecture,
        arch_args=arch_args,
        description=config.description,
        provenance=provenance,
        input_scale=config.input_scale,
        pixel_size=pixel_size,
        pixel_size_unit=unit,
        **_size_rule(config, parent),
        normalization=resolve_normalization(config, parent),
        postprocess=list(config.postprocess or (parent.metadata.get("postprocess", []) if parent else [])),
        segment_property=config.segment_property
        or (parent.metadata.get("segment_property") if parent else None),
    )


class WeightAverage:
    """Exponential moving average of a network's parameters and buffers.

    The decay at a step is min(decay, (1 + step) / (10 + step)), so that early averages
    are not dominated by the random initial weights: until the decay is reached (0.999
    at step ~9,000) the average spans roughly the last step / 9 steps. Integer buffers
    (batch counters) are copied.
    """

    def __init__(self, network: torch.nn.Module, decay: float):
        import copy

        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay must be between 0 and 1 (exclusive), got {decay}")
        self.decay = decay
        self.network = copy.deepcopy(network).eval()
        for parameter in self.network.parameters():
            parameter.requires_grad_(False)

    @torch.no_grad()
    def update(self, network: torch.nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        live = network.state_dict()
        for key, value in self.network.state_dict().items():
            if value.is_floating_point():  # lerp: exact where the weight did not move (frozen layers)
                value.lerp_(live[key].detach(), 1 - decay)
            else:
                value.copy_(live[key])


def _save_state(
    path: Path,
    step: int,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    best_f1: float,
    bad_validations: int,
    elapsed: float,
    network: torch.nn.Module,
    average: WeightAverage | None,
) -> None:
    """Everything a resume needs, weights included, so that it never pairs files of two steps."""
    state = {
        "network": network.state_dict(),
        "ema_decay": average.decay if average is not None else None,
        "step": step,
        "optimizer": optimizer.state_dict(),
        "generator": generator.get_state(),
        "best_f1": best_f1,
        "bad_validations": bad_validations,
        "elapsed": elapsed,
    }
    if average is not None:
        state["average"] = average.network.state_dict()
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


#: what torchrun sets in every process it starts; distributed training only with all of them
TORCHRUN_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def distributed_context() -> tuple[int, int, int]:
    """(rank, world size, local rank) under torchrun; (0, 1, 0) otherwise.

    Joins the process group on first use: NCCL on GPUs, gloo on CPUs. Only a process that
    torchrun started (all of TORCHRUN_VARIABLES set) joins one: a WORLD_SIZE left over in a
    shell would otherwise wait forever for processes that never come, so a partial set is
    refused with the names of the missing variables.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    missing = [name for name in TORCHRUN_VARIABLES if not os.environ.get(name)]
    if missing:
        raise ValueError(
            f"WORLD_SIZE={world} is set but {', '.join(missing)} not: this process was not started "
            "by torchrun (a variable left over in the shell?); unset WORLD_SIZE, or launch with torchrun"
        )
    import torch.distributed as dist

    local = int(os.environ["LOCAL_RANK"])
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size(), local


#: the files a run writes in its output_dir: one of them there means a run is there
RUN_FILES = (
    "config.json",
    "log.csv",
    "last_state.pt",
    "last.json",
    "last.safetensors",
    "best.json",
    "best.safetensors",
)


def run_files(out: Path) -> list[Path]:
    """The files of a run in ``out`` (symlinks included, dangling or not)."""
    return [out / name for name in RUN_FILES if os.path.lexists(out / name)]


def _run_samples(
    config: TrainConfig,
    normalization: dict[str, Any],
    samples: list[Sample] | None,
    val_samples: list[Sample] | None,
) -> tuple[list[Sample], list[Sample]]:
    """The run's training and validation samples: the caller's (checked against the
    model's normalization), or read from config.data and split by the seed."""
    if samples is None:
        if config.data.get("kind") == "sources":  # every source split on its own
            samples, val_samples = split_sources(
                load_samples(config, normalization), config.data["sources"], config.seed
            )
        else:
            samples, val_samples = split(
                load_samples(config, normalization),
                config.val_images,
                config.seed,
                config.val_names,
                by_series=config.data.get("kind") == "dicom",
            )
        # (in-memory corrections may be all background: "nothing here" is a valid correction)
        if not any(sample.mask[sample.fov].any() for sample in samples):
            raise DataError(
                "every training mask is empty (all background): nothing to learn; "
                "check that masks are 0/1 or 0/255 (or set data.class_map) and match their images"
            )
    elif any(s.normalization not in (None, normalization) for s in [*samples, *(val_samples or [])]):
        raise DataError(
            f"the samples were normalized otherwise than the model will be ({normalization}): "
            "make them with that normalization"
        )
    return samples, val_samples or []


def _check_widening(width: int, parent: LoadedModel) -> None:
    """Refuse a widening the parent's network cannot take, before the run costs anything."""
    from napari_r2au.model_files import check_arch_args

    args = dict(parent.metadata["arch_args"])
    if not hasattr(parent.network, "encoder"):
        raise ValueError(
            f"widen_to: {parent.name}'s network ({type(parent.network).__name__}) cannot be widened"
        )
    if width < args.get("base_width", 64):
        raise ValueError(
            f"widen_to {width} is narrower than {parent.name}'s base width {args.get('base_width')}"
        )
    if problem := check_arch_args(dict(args, base_width=width)):
        raise ValueError(f"widen_to {width}: {problem}")


def _starting_network(
    config: TrainConfig, parent: LoadedModel | None
) -> tuple[Any, dict[str, Any], TrainConfig]:
    """A new network per the config, or a copy of the parent's (the caller's model and
    config stay as they were; the config returned names the parent's architecture)."""
    if parent is not None:
        network = copy.deepcopy(parent.network)
        arch_args = dict(parent.metadata["arch_args"])
        config = dataclasses.replace(config, architecture=parent.metadata["architecture"])
        if config.widen_to is not None and config.widen_to != arch_args.get("base_width"):
            from napari_r2au.models.widen import widen_network

            network = widen_network(network, config.widen_to, seed=config.seed)
            arch_args["base_width"] = config.widen_to
            config = dataclasses.replace(config, base_width=config.widen_to)
    else:
        arch_args = {
            "in_channels": config.in_channels,
            "out_channels": 1,
            "base_width": config.base_width,
            "t": config.t,
        }
        network = create_model(config.architecture, **arch_args)
    return network, arch_args, config


def _restore_run(
    out: Path,
    config: TrainConfig,
    writer: bool,
    network: Any,
    average: WeightAverage | None,
    optimizer: Any,
    generator: torch.Generator,
) -> tuple[int, float, int, float]:
    """Load a run's last state into the network, average, optimizer and generator; its
    step, best score, bad validations and elapsed seconds."""
    last_state, last_model = out / "last_state.pt", out / "last.json"
    if not last_state.is_file():
        raise FileNotFoundError(f"{out}: nothing to resume (no last_state.pt)")
    if writer:
        _warn_changed_settings(config, out / "config.json")
    state = torch.load(last_state, map_location="cpu", weights_only=True)
    trained_with = state.get("ema_decay")
    if trained_with != config.ema_decay:
        raise ValueError(
            f"{out}: this run was trained with ema_decay={trained_with}, not {config.ema_decay}; "
            f"resume it with --set ema_decay={trained_with}"
        )
    # the state file holds the weights of its own step; older runs kept them in last.json only
    network.load_state_dict(
        state["network"] if "network" in state else load_model(last_model).network.state_dict()
    )
    if average is not None:
        average.network.load_state_dict(state["average"])
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    return state["step"], state["best_f1"], state["bad_validations"], state["elapsed"]


def _open_log(log_path: Path, writer: bool, resume: bool, step: int) -> Any:
    """The run's log.csv opened for appending (a new one gets its header; a resumed one
    loses the rows after its checkpoint); other ranks write to nowhere."""
    if writer and (not resume or not os.path.lexists(log_path)):  # a new log: its header, atomically
        write_bytes_atomic(
            log_path, b"step,loss,lr,seconds,val_f1,val_auc_roc,val_sensitivity,val_specificity\r\n"
        )
    elif writer:  # a resumed log loses the rows after the checkpoint (they would appear twice)
        open_for_append(log_path).close()  # a symlink at the path is refused before it is read
        _truncate_log(log_path, step)
    # appended to step by step; a symlink at the path is refused, not followed
    return open_for_append(log_path) if writer else open(os.devnull, "w", newline="")


def _validate(
    kept: Any, config: TrainConfig, normalization: dict[str, Any], val_samples: list[Sample], dev: Any
) -> dict[str, float]:
    """The kept weights measured on the validation samples at threshold 0.5."""
    kept.eval()
    loaded = LoadedModel(
        kept,
        {
            "name": config.name,
            "in_channels": config.in_channels,
            "out_channels": 1,
            "threshold": 0.5,
            "normalization": normalization,
        },
        source="memory",
    )
    return evaluate_samples(loaded, val_samples, precision=config.precision, device=str(dev))


def _refuse_taken_folder(out: Path, previous: list[Path], taken: bool, world: int) -> None:
    """Refuse an output folder that holds another run (its best.json would pass for this
    run's), before anything is read or written; every rank agrees with rank 0."""
    if world > 1:  # rank 0's view: the others may already see the files rank 0 goes on to write
        taken = _agree(taken)
    if taken:
        found = f" ({', '.join(p.name for p in previous)})" if previous else ""
        raise FileExistsError(
            f"{out} holds a run already{found}; continue it with --resume, replace it with "
            "--overwrite, or set another output_dir"
        )


def _open_board(out: Path) -> Any:
    """A TensorBoard writer in the run folder (the package is optional)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ValueError("tensorboard: true needs the tensorboard package (pip install tensorboard)") from exc
    return SummaryWriter(str(out / "tensorboard"))


def iter_train(
    config: TrainConfig,
    samples: list[Sample] | None = None,
    val_samples: list[Sample] | None = None,
    resume: bool = False,
    device: str | None = None,
    parent: LoadedModel | None = None,
    overwrite: bool = False,
    distributed: bool = True,
) -> Generator[TrainEvent, None, TrainResult]:
    """Train per ``config``; yields events, returns where the checkpoints are.

    ``samples``: in-memory training samples (fine-tuning); otherwise read from config.data
    and split into train/validation by the seed. ``resume`` continues from output_dir; an
    output_dir that holds another run is refused (its best.json would pass for this run's)
    unless ``overwrite``, which deletes that run's files first. ``parent``: the loaded
    model to start from (else ``config.init_from`` is loaded). ``distributed=False``: one
    process whatever the environment says (fine-tuning), never a torchrun process group.

    Under ``torchrun`` every rank draws the same global batch (same seed) and trains on
    its own slice of it inside DistributedDataParallel, so W processes at a global batch
    B see the samples one process at batch B sees; only rank 0 validates and writes.
    """
    problems = config.problems()
    if problems:  # before anything is read or written
        raise ValueError("config: " + "; ".join(problems))
    out = Path(config.output_dir)
    previous = run_files(out)  # before this run writes any
    rank, world, local_rank = distributed_context() if distributed else (0, 1, 0)
    _refuse_taken_folder(out, previous, bool(previous) and not resume and not overwrite, world)
    if config.batch_size % world:
        raise ValueError(f"batch_size {config.batch_size} is not divisible by the {world} processes")
    dev = select_device(device or config.device)  # a device this machine lacks: said before any data is read
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    if parent is None and config.init_from:
        parent = load_model(config.init_from)
    if parent is not None and config.widen_to is not None:  # said before any data is read
        _check_widening(config.widen_to, parent)
    normalization = resolve_normalization(config, parent)
    out.mkdir(parents=True, exist_ok=True)
    samples, val_samples = _run_samples(config, normalization, samples, val_samples)

    network, arch_args, config = _starting_network(config, parent)
    if world > 1 and dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    network.to(dev)
    layout = torch.channels_last if config.channels_last and dev.type in ("cpu", "cuda") else None
    if layout is not None:
        network.to(memory_format=layout)  # saved contiguous (save_model), so model files do not change
    if config.freeze_encoder:
        for p in network.encoder.parameters():
            p.requires_grad_(False)
    params = [p for p in network.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    sampler = PatchSampler(samples, config.patch_size, generator)
    if world > 1 and dev.type == "cpu" and config.precision == "auto":
        # the CPU's bf16 is measured by rank 0 alone (the ranks' probes would compete for
        # the cores) and every rank trains at its verdict
        amp = torch.bfloat16 if _agree(rank == 0 and autocast_dtype(dev, "auto") is not None) else None
    else:
        amp = autocast_dtype(dev, config.precision)
    model = network
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        from napari_r2au.models.blocks import synchronize_batch_norms

        synchronize_batch_norms(network)
        model = DistributedDataParallel(network, device_ids=[dev.index] if dev.type == "cuda" else None)
    writer = rank == 0
    average = WeightAverage(network, config.ema_decay) if config.ema_decay is not None else None
    #: the weights that are validated and saved
    kept = average.network if average else network

    if overwrite and not resume and writer:  # the data and the network are ready: now the old run goes
        for path in previous:  # only a run's own files; whatever else is in the folder stays
            path.unlink()
    step, best_f1, bad, elapsed_before = 0, -1.0, 0, 0.0
    last_state, last_model, best_model = out / "last_state.pt", out / "last.json", out / "best.json"
    if resume:
        step, best_f1, bad, elapsed_before = _restore_run(
            out, config, writer, network, average, optimizer, generator
        )
    elif writer:
        from napari_r2au import __version__

        resolved = dict(config.to_dict(), package_version=__version__, world_size=world)
        # atomic: a file or a symlink planted at the path is replaced, never written through
        write_bytes_atomic(out / "config.json", (json.dumps(resolved, indent=2, default=str) + "\n").encode())

    log_file = _open_log(out / "log.csv", writer, resume, step)
    log = csv.writer(log_file)

    board = _open_board(out) if config.tensorboard and writer else None

    best_metrics: dict[str, float] = {}
    if best_model.is_file():
        try:
            best_metrics = load_model(best_model).metadata["provenance"].get("validation_metrics", {})
        except ModelFileError as exc:
            if not resume:
                raise
            # a run killed between writing best.safetensors and best.json leaves a pair that
            # does not match: the best so far is lost, not the run; the next validation writes one
            best_f1 = -1.0  # so that the next validation's model is saved as the best
            if writer:
                best_model.unlink(missing_ok=True)
                warnings.warn(f"{exc}; the next validation writes a new best model", stacklevel=1)
    started = time.perf_counter()
    stopped = "steps"

    def save(kind: str, metrics: dict[str, float]) -> Path:
        meta = _metadata(
            config,
            arch_args,
            step,
            elapsed_before + time.perf_counter() - started,
            metrics,
            parent,
            len(samples),
            float_name(amp),
        )
        meta["name"] = kind
        return save_model(kept, out, meta)

    try:
        while step < config.steps:
            network.train()
            lr = lr_at(step, config, elapsed_before + time.perf_counter() - started)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y, fov = sampler.sample(config.batch_size)
            x, y, fov = augment(x, y, fov, config.augment, generator)
            share = config.batch_size // world
            x, y = x[rank * share : (rank + 1) * share].to(dev), y[rank * share : (rank + 1) * share].to(dev)
            if layout is not None:
                x = x.contiguous(memory_format=layout)
            with torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None):
                logits = model(x)
            loss = segmentation_loss(logits, y, config.loss, config.pos_weight, config.dice_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            if average is not None:
                average.update(network, step)
            step += 1
            elapsed = elapsed_before + time.perf_counter() - started
            validation = None
            out_of_time = config.max_minutes is not None and elapsed > 60 * config.max_minutes
            if world > 1:  # every rank stops at the same step
                out_of_time = _agree(out_of_time)
            if (step % config.val_every == 0 or step == config.steps or out_of_time) and writer:
                if val_samples:
                    validation = _validate(kept, config, normalization, val_samples, dev)
                    if selection_score(validation, config.select_by) > best_f1:
                        best_f1, bad, best_metrics = (
                            selection_score(validation, config.select_by),
                            0,
                            validation,
                        )
                        save("best", validation)
                    else:
                        bad += 1
                save("last", validation or {})
                _save_state(last_state, step, optimizer, generator, best_f1, bad, elapsed, network, average)
            row = [step, f"{loss.item():.5f}", f"{lr:.6g}", f"{elapsed:.1f}"]
            if validation:
                row += [f"{validation[k]:.5f}" for k in ("f1", "auc_roc", "sensitivity", "specificity")]
            log.writerow(row)
            log_file.flush()
            if board is not None:
                board.add_scalar("train/loss", float(loss.item()), step)
                board.add_scalar("train/lr", lr, step)
                for key, value in (validation or {}).items():
                    board.add_scalar(f"validation/{key}", value, step)
            yield TrainEvent(
                step,
                config.steps,
                float(loss.item()),
                lr,
                elapsed,
                validation,
                best_f1 if best_f1 >= 0 else None,
            )
            if out_of_time:
                stopped = "time"
                break
            patience_over = config.patience is not None and bad >= config.patience
            if world > 1:
                patience_over = _agree(patience_over)
            if patience_over:
                stopped = "early_stopping"
                break
    finally:
        log_file.close()
        if board is not None:
            board.close()
        network.to("cpu").eval()
        kept.to("cpu").eval()
    if writer and val_samples and best_model.is_file() and config.calibrate_threshold:
        best_metrics = calibrate_threshold(
            best_model,
            val_samples,
            config.precision,
            device=str(dev),
            select_by=config.select_by,
            prior=config.threshold_prior,
        )
    return TrainResult(
        out, best_model if best_model.is_file() else None, last_model, step, best_metrics, stopped
    )


def _truncate_log(path: Path, step: int) -> None:
    """Drop the log rows after ``step``, the step a resume starts from: a run killed after
    its last checkpoint logged steps it will now train again (they would appear twice)."""
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    kept = rows[:1] + [
        row for row in rows[1:] if row and row[0].isascii() and row[0].isdigit() and int(row[0]) <= step
    ]
    if len(kept) < len(rows):
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
            csv.writer(handle).writerows(kept)


#: settings a resumed run may change without becoming another run
RESUMABLE_CHANGES = {
    "steps",
    "max_minutes",
    "patience",
    "threads",
    "device",
    "tensorboard",
    "output_dir",
    "channels_last",
}


def _warn_changed_settings(config: TrainConfig, saved: Path) -> None:
    """Say which settings differ from those the run was started with (its config.json)."""
    if not saved.is_file():
        return
    before = json.loads(saved.read_text())
    now = json.loads(json.dumps(config.to_dict(), default=str))
    changed = [
        f"{key} {before[key]!r} -> {value!r}"
        for key, value in now.items()
        if key in before and before[key] != value and key not in RESUMABLE_CHANGES
    ]
    if changed:
        warnings.warn(
            f"resuming {saved.parent} with other settings than it was started with: {'; '.join(changed)}",
            stacklevel=3,
        )


#: the decision thresholds calibration chooses from (thin structures and fine-tuned
#: models often want less than 0.2; the grid's ends should not be what decides)
THRESHOLDS = tuple(float(t) for t in np.round(np.arange(0.05, 0.951, 0.025), 3))


def best_threshold(
    model: LoadedModel,
    samples: list[Sample],
    precision: str = "auto",
    candidates: tuple[float, ...] = THRESHOLDS,
    device: str | None = None,
    prior: float | None = None,
) -> tuple[float, dict[str, float]]:
    """The candidate threshold with the highest pooled F1 on ``samples`` (with ``prior``: the
    one nearest ``prior`` among those within the F1's noise of the highest), and the metrics there."""
    probs = predict_samples(model, samples, precision, device)
    return _best_of(samples, probs, candidates, prior=prior)


#: row blocks the validation pixels are cut into to estimate a score's noise (jackknife)
NOISE_BLOCKS = 10


def _blocks(samples: list[Sample]) -> list[tuple[int, slice]]:
    """(sample index, rows) blocks: every sample cut across its rows, about NOISE_BLOCKS in all."""
    per_sample = max(2, math.ceil(NOISE_BLOCKS / max(1, len(samples))))
    out = []
    for index, sample in enumerate(samples):
        edges = np.linspace(0, sample.mask.shape[0], min(per_sample, sample.mask.shape[0]) + 1).astype(int)
        out += [(index, slice(a, b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]
    return out


@dataclass
class _BlockCounts:
    """Pixel counts of every row block (rows) at every candidate threshold (columns), and the
    sample each block belongs to: any subset of blocks is scored from sums, without predicting
    or thresholding again."""

    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray
    owner: np.ndarray

    @classmethod
    def of(
        cls, samples: list[Sample], probs: list[np.ndarray], candidates: tuple[float, ...]
    ) -> _BlockCounts:
        levels = np.asarray(candidates, dtype=np.float64)
        order = np.argsort(levels)
        ascending = levels[order]
        tp, fp, fn, owner = [], [], [], []
        for index, rows in _blocks(samples):
            sample = samples[index]
            fov = np.ones(sample.mask.shape, bool) if sample.fov is None else np.asarray(sample.fov, bool)
            inside = fov[rows]
            if not inside.any():  # no pixel to score: the block would only inflate the block count
                continue
            truth = np.asarray(sample.mask[rows]).astype(bool)[inside]
            values = np.asarray(probs[index][rows], dtype=np.float64)[inside]
            counts = []
            for part in (values[truth], values[~truth]):
                # a pixel is foreground at level c when it is above c: above c_j where more than
                # j levels lie below it
                below = np.searchsorted(ascending, part, side="left")
                histogram = np.bincount(below, minlength=len(levels) + 1)
                above = histogram[::-1].cumsum()[::-1][1:]
                found = np.empty(len(levels), np.int64)
                found[order] = above
                counts.append(found)
            tp.append(counts[0])
            fp.append(counts[1])
            fn.append(int(truth.sum()) - counts[0])
            owner.append(index)
        return cls(
            np.array(tp).reshape(-1, len(levels)),
            np.array(fp).reshape(-1, len(levels)),
            np.array(fn).reshape(-1, len(levels)),
            np.array(owner, dtype=int),
        )

    def scores(self, samples: list[Sample], select_by: str, keep: np.ndarray) -> np.ndarray:
        """The selection score at every candidate, of the blocks in ``keep`` (a boolean mask),
        as :func:`selection_score` scores the metrics of those pixels (-inf: no number)."""
        sources = np.array([samples[i].source or "" for i in self.owner])
        groups = sorted(set(samples[i].source or "" for i in range(len(samples))))

        def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
            with np.errstate(invalid="ignore", divide="ignore"):
                return np.where(den > 0, num / np.maximum(den, 1), np.nan)

        if select_by == "jaccard_per_image":
            means = []
            for group in groups:
                images = []
                for index in sorted(set(self.owner[keep & (sources == group)])):
                    rows = keep & (self.owner == index)
                    tp, fp, fn = (a[rows].sum(0) for a in (self.tp, self.fp, self.fn))
                    union = tp + fp + fn
                    images.append(np.where(union > 0, tp / np.maximum(union, 1), 1.0))
                means.append(np.mean(images, axis=0) if images else np.full(self.tp.shape[1], np.nan))
            score = np.mean(means, axis=0) if len(groups) > 1 else means[0]
        else:

            def f1(rows: np.ndarray) -> np.ndarray:
                tp, fp, fn = (a[rows].sum(0) for a in (self.tp, self.fp, self.fn))
                return ratio(2.0 * tp, 2.0 * tp + fp + fn)

            score = f1(keep)
            if len(groups) > 1:
                per_source = np.array([f1(keep & (sources == group)) for group in groups])
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)  # a source with no number at all
                    mean = np.nanmean(per_source, axis=0)
                score = np.where(np.isfinite(mean), mean, score)
        return np.where(np.isfinite(score), score, -np.inf)


def thresholds_within_noise(
    samples: list[Sample],
    probs: list[np.ndarray],
    candidates: tuple[float, ...],
    best: float,
    select_by: str = "f1",
) -> list[float]:
    """The candidates whose score the validation pixels cannot tell from ``best``'s: the gap
    is at most its own jackknife standard error over row blocks of the samples (each block
    left out in turn, the gap measured on the rest: paired, so that what every threshold finds
    alike does not count as noise). A fine-tune's held-out strips are small and the score is
    flat near its peak, so the top of a sweep is often noise: on one HRF strip the highest F1
    picked 0.725 where the other photographs wanted 0.35, and cost them 0.08 F1
    (docs/worklist-reviewer.md)."""
    counts = _BlockCounts.of(samples, probs, candidates)
    n = len(counts.owner)
    if n < 2:
        return [best]
    everything = np.ones(n, bool)
    full = counts.scores(samples, select_by, everything)
    left_out = np.array(
        [counts.scores(samples, select_by, everything & (np.arange(n) != b)) for b in range(n)]
    )
    at_best = list(candidates).index(best)
    near = []
    for j, level in enumerate(candidates):
        # a left-out set that scores no number at some level makes the gap NaN there: no noise
        # estimate, so that level counts only if it scores as high as the best
        with np.errstate(invalid="ignore"):
            gaps = left_out[:, at_best] - left_out[:, j]
            noise = math.sqrt((n - 1) / n * float(np.sum((gaps - gaps.mean()) ** 2)))
        gap = full[at_best] - full[j]
        if j == at_best or gap <= 0 or (math.isfinite(noise) and gap <= noise):
            near.append(level)
    return near


def _score_at(samples: list[Sample], probs: list[np.ndarray], level: float, select_by: str) -> float:
    if select_by == "jaccard_per_image":
        scores = dict(
            jaccard_per_image=jaccard_per_image(samples, probs, level),
            **source_jaccards(samples, probs, level),
        )
    else:
        scores = dict(pooled_metrics(samples, probs, level), **source_metrics(samples, probs, level))
    return selection_score(scores, select_by)


def _best_of(
    samples: list[Sample],
    probs: list[np.ndarray],
    candidates: tuple[float, ...],
    select_by: str = "f1",
    prior: float | None = None,
) -> tuple[float, dict[str, float]]:
    scores = {level: _score_at(samples, probs, level, select_by) for level in candidates}
    best = max(candidates, key=scores.__getitem__)
    if prior is not None and math.isfinite(scores[best]):
        # the one-standard-error rule: what the data cannot tell from the best, the prior decides
        near = thresholds_within_noise(samples, probs, candidates, best, select_by)
        best = min(near, key=lambda level: (round(abs(level - prior), 9), -scores[level]))
    return best, _metrics_at(samples, probs, best)


def calibrate_threshold(
    sidecar: Path,
    val_samples: list[Sample],
    precision: str = "auto",
    candidates: tuple[float, ...] = THRESHOLDS,
    device: str | None = None,
    select_by: str = "f1",
    prior: float | None = None,
) -> dict[str, float]:
    """Store in the model file the threshold that maximises validation F1 (or, with
    ``select_by="jaccard_per_image"``, the images' mean Jaccard); with ``prior``, the one
    nearest it among those within the score's noise of the best (:func:`_best_of`).

    Chosen on the validation split only; the metrics at 0.5 are kept beside it.
    """
    from napari_r2au.model_files import load_model_file

    model = load_model_file(sidecar)
    probs = predict_samples(model, val_samples, precision, device)
    best, chosen = _best_of(val_samples, probs, candidates, select_by, prior=prior)
    at_half = _metrics_at(val_samples, probs, 0.5)
    meta = dict(model.metadata, threshold=float(best))
    provenance = dict(meta["provenance"])
    # measured here, not carried over: a resumed run's best.json may have been calibrated already
    provenance["validation_metrics_at_0.5"] = {k: round(float(v), 5) for k, v in at_half.items()}
    provenance["validation_metrics"] = {k: round(float(v), 5) for k, v in chosen.items()}
    provenance["threshold_chosen_on"] = (
        "validation split, mean of the images' Jaccard"
        + (" (mean of its sources)" if "jaccard_source_mean" in chosen else "")
        if select_by == "jaccard_per_image"
        else "validation split, F1" + (" (mean of its sources)" if "f1_source_mean" in chosen else "")
    ) + (f", the nearest to {prior:g} within the score's noise of the best" if prior is not None else "")
    meta["provenance"] = provenance
    meta.pop("weights_file")
    meta.pop("weights_sha256")
    save_model(model.network, sidecar.parent, meta)
    return chosen


def _agree(flag: bool) -> bool:
    """Rank 0's decision, broadcast to all ranks."""
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    value = torch.tensor([int(flag)], device=device)
    dist.broadcast(value, src=0)
    return bool(value.item())


def train(config: TrainConfig, **kwargs) -> TrainResult:
    """Run :func:`iter_train` to the end (no progress output)."""
    return run(iter_train(config, **kwargs))
