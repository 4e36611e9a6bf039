"""Training data behind one interface: a list of :class:`Sample`.

Three sources: the DRIVE layout, generic folders of image/mask pairs matched by file
stem, and in-memory (image, mask) pairs as the napari fine-tune widget hands them over
(3D stacks contribute only their annotated slices). Images are normalized here exactly
as the engine will normalize them at inference (napari_r2au.preprocess): a slice of a
stack with the statistics of its whole stack, as Segment normalizes a stack.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from napari_r2au.io import IMAGE_SUFFIXES, find_images, pairing_id, read_image
from napari_r2au.preprocess import (
    STANDARDIZE,
    derived_working_scale,
    is_planewise,
    match_channels,
    normalize,
    normalize_plane,
)

#: per-channel (mean, std) of the image a sample was normalized with
Statistics = tuple[np.ndarray, np.ndarray]


class DataError(ValueError):
    """Training data is missing or malformed; the message names the file and the fix."""


@dataclass
class Sample:
    """One training image: normalized float32 (H, W, C), mask uint8 {0,1}, FOV bool.

    ``raw`` keeps the image as read, so validation runs the engine exactly as users do.
    A sample cut from a wider image (a fine-tune's held-out strip) keeps the whole image
    in ``raw`` and its columns in ``window``: the engine then predicts the whole image, with
    the context and normalization statistics a user's run has, and the strip is cut out.
    """

    image: np.ndarray
    mask: np.ndarray
    fov: np.ndarray
    name: str
    raw: np.ndarray
    window: tuple[int, int] | None = None
    #: the normalization ``image`` was made with
    normalization: dict | None = None
    #: the normalization statistics of the stack a slice comes from (None: the sample's own);
    #: validation hands them to the engine, so that ``raw`` is predicted as inside its stack
    statistics: Statistics | None = None
    #: the mask before the user's corrections (bool, like ``mask``), when known: fine-tuning
    #: holds out the part that was corrected
    original: np.ndarray | None = None
    #: the share of patches drawn from this sample, relative to a whole image (1): a piece of
    #: an image split around a held-out band draws by its share of the image
    weight: float = 1.0
    #: for a held-out band: how many of its pixels the user corrected (None: not counted)
    corrections: int | None = None
    #: the data source (camera, data set) of a multi-source run: validation reports each
    #: source on its own and chooses checkpoints and threshold across them
    source: str | None = None


def binarize_mask(mask: np.ndarray, name: str, class_map: dict[int, int] | None = None) -> np.ndarray:
    """Masks are 0/1 or 0/255 (any channel count: the first is used); else an error."""
    mask = np.asarray(mask)
    if mask.ndim == 3:
        mask = mask[..., 0]
    if class_map is not None:
        out = np.zeros(mask.shape, np.uint8)
        unknown = set(np.unique(mask).tolist()) - set(class_map)
        if unknown:
            raise DataError(f"{name}: mask values {sorted(unknown)} are not in the class map")
        for value, label in class_map.items():
            out[mask == value] = label
        return out
    values = set(np.unique(mask).tolist())
    if values <= {0, 1}:
        return mask.astype(np.uint8)
    if values <= {0, 255}:
        return (mask == 255).astype(np.uint8)
    shown = sorted(values)[:8]
    raise DataError(
        f"{name}: mask has values {shown}{'...' if len(values) > 8 else ''}; expected 0/1 or 0/255 "
        "(configure a class map for multi-class masks)"
    )


def make_sample(
    image: np.ndarray,
    mask: np.ndarray,
    name: str,
    in_channels: int = 3,
    fov: np.ndarray | None = None,
    normalization: dict | None = None,
    class_map: dict[int, int] | None = None,
    statistics: Statistics | None = None,
) -> Sample:
    """Validate and normalize one (image, mask[, fov]) pair; ``statistics`` are those of
    the stack the image is a slice of (:func:`stack_statistics`), else its own are used."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3:
        raise DataError(f"{name}: expected a 2D image (YX or YXC), got shape {image.shape}")
    if image.dtype.kind not in "biuf":
        raise DataError(f"{name}: unsupported pixel type {image.dtype}")
    if image.dtype.kind == "f" and not np.isfinite(image).all():
        raise DataError(f"{name}: the image contains NaN or infinite values")
    if min(image.shape[:2]) < 1:
        raise DataError(f"{name}: the image is empty (shape {image.shape})")
    mask = binarize_mask(mask, name, class_map)
    if mask.shape != image.shape[:2]:
        raise DataError(f"{name}: image {image.shape[:2]} and mask {mask.shape} differ in size")
    if fov is None:
        fov = np.ones(mask.shape, bool)
    else:
        fov = np.asarray(fov)
        fov = (fov[..., 0] if fov.ndim == 3 else fov) > 0
        if fov.shape != mask.shape:
            raise DataError(f"{name}: field-of-view mask {fov.shape} differs from the mask {mask.shape}")
    from napari_r2au.engine import normalization_statistics

    raw = image
    image = match_channels(image, in_channels)
    normalization = normalization or dict(STANDARDIZE)
    if is_planewise(normalization):
        image = normalize_plane(image, normalization)
    else:  # the engine's statistics: of the image as read, one value per model channel
        mean, std = statistics or normalization_statistics(raw, in_channels, "YXC")
        image = normalize(image, normalization, mean, std)
    return Sample(
        np.ascontiguousarray(image),
        mask,
        fov,
        name,
        raw,
        normalization=dict(normalization),
        statistics=statistics,
    )


def stack_statistics(
    stack: np.ndarray, in_channels: int, normalization: dict | None, scale: float = 1.0
) -> Statistics | None:
    """The statistics Segment normalizes a whole (Z, Y, X[, C]) stack with at ``scale``,
    which each of its training slices must share; None when the normalization uses none."""
    from napari_r2au.engine import normalization_statistics

    if (normalization or STANDARDIZE).get("kind", "standardize") != "standardize":
        return None
    return normalization_statistics(stack, in_channels, "ZYXC" if np.ndim(stack) == 4 else "ZYX", scale)


def rescale_pair(image: np.ndarray, mask: np.ndarray, scale: float, fov: np.ndarray | None = None):
    """Resize a 2D (image, mask[, fov]) to the model's working scale (masks by nearest)."""
    if abs(scale - 1.0) < 1e-6:
        return image, mask, fov
    from skimage.transform import resize

    shape = tuple(max(1, round(n * scale)) for n in mask.shape[-2:])
    image = resize(
        np.asarray(image, np.float32),
        shape + image.shape[2:],
        order=1,
        anti_aliasing=scale < 1,
        preserve_range=True,
    ).astype(np.float32)
    mask = resize_mask(mask, scale).astype(np.uint8)
    if fov is not None:
        fov = resize_mask(fov, scale)
    return image, mask, fov


def resize_mask(mask: np.ndarray, scale: float) -> np.ndarray:
    """A 2D mask (anything > 0) resized by ``scale`` as rescale_pair resizes masks (nearest), bool.
    An RGB(A) mask (HRF's field-of-view TIFFs) counts by its first channel."""
    mask = np.asarray(mask)
    mask = (mask[..., 0] if mask.ndim == 3 and mask.shape[-1] in (3, 4) else mask) > 0
    if abs(scale - 1.0) < 1e-6:
        return mask
    from skimage.transform import resize

    shape = tuple(max(1, round(n * scale)) for n in mask.shape[-2:])
    return resize(mask, shape, order=0, anti_aliasing=False)


def _by_id(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder")
    files = find_images(folder)
    if not files:
        raise DataError(f"{folder}: no images ({'/'.join(s[1:].upper() for s in IMAGE_SUFFIXES)}) in it")
    by_id: dict[str, Path] = {}
    for path in files:
        key = pairing_id(path)
        if key in by_id:
            raise DataError(f"{folder}: {by_id[key].name} and {path.name} have the same id {key!r}")
        by_id[key] = path
    return by_id


def folder_samples(
    images: str | Path,
    masks: str | Path,
    fov: str | Path | None = None,
    in_channels: int = 3,
    normalization: dict | None = None,
    class_map: dict[int, int] | None = None,
    scale: float = 1.0,
    statistics_scale: float | None = None,
    fov_diameter: int | None = None,
    image_width: int | None = None,
) -> list[Sample]:
    """Pairs from folders, matched by id (DRIVE's leading number, else the file stem),
    resized by ``scale`` (the model's working scale). A stack's slices share the stack's
    statistics, taken at ``statistics_scale`` (default ``scale``; evaluation leaves the
    resizing to the engine, which takes them at the working scale). ``fov_diameter`` or
    ``image_width``: each 2D photograph is resized instead so that its field of view, or its
    width, is that many pixels (preprocess.derived_working_scale, as the engine does).
    """
    image_files, mask_files = _by_id(Path(images)), _by_id(Path(masks))
    fov_files = _by_id(Path(fov)) if fov is not None else {}
    missing = sorted(set(image_files) - set(mask_files))
    if missing:
        raise DataError(f"{masks}: no mask for images {', '.join(missing[:5])}")
    samples = []
    for key in sorted(image_files):
        fov_array = read_image(fov_files[key]) if key in fov_files else None
        image, mask = read_image(image_files[key]), read_image(mask_files[key])
        statistics = (
            stack_statistics(image, in_channels, normalization, statistics_scale or scale)
            if _is_stack(image, mask)
            else None
        )
        for plane, plane_mask, plane_fov, name in _planes(image, mask, fov_array, image_files[key].name):
            if plane.shape[:2] != plane_mask.shape[:2]:
                raise DataError(
                    f"{name}: image {plane.shape[:2]} and mask {plane_mask.shape[:2]} differ in size"
                )
            mask_map = class_map
            plane_scale = (
                (derived_working_scale(plane, fov_diameter, image_width) or scale)
                if (fov_diameter or image_width) and statistics is None
                else scale
            )
            if plane_scale != 1.0:
                plane_mask, mask_map = binarize_mask(plane_mask, name, class_map), None  # now 0/1
                plane, plane_mask, plane_fov = rescale_pair(plane, plane_mask, plane_scale, plane_fov)
            samples.append(
                make_sample(
                    plane, plane_mask, name, in_channels, plane_fov, normalization, mask_map, statistics
                )
            )
    return samples


def _is_stack(image: np.ndarray, mask: np.ndarray) -> bool:
    """A (Z, Y, X) or (Z, Y, X, C) image with a (Z, Y, X) mask (not an RGB(A) mask)."""
    return mask.ndim == 3 and mask.shape[-1] > 4 and image.shape[:3] == mask.shape and image.ndim in (3, 4)


def _planes(image: np.ndarray, mask: np.ndarray, fov: np.ndarray | None, name: str):
    """A file pair as 2D pairs: a stack (a (Z, Y, X) or (Z, Y, X, C) image with a
    (Z, Y, X) mask) gives one pair per slice, named ``file[z]``; anything else is one pair."""
    if not _is_stack(image, mask):
        return [(image, mask, fov, name)]
    if fov is not None and fov.shape[:3] != mask.shape and fov.shape[:2] != mask.shape[1:]:
        raise DataError(
            f"{name}: field of view {fov.shape} fits neither the stack {mask.shape} nor one slice"
        )
    planes = []
    for z in range(mask.shape[0]):
        plane_fov = None if fov is None else (fov[z] if fov.shape[:3] == mask.shape else fov)
        planes.append((image[z], mask[z], plane_fov, f"{name}[{z}]"))
    return planes


def drive_samples(
    root: str | Path,
    in_channels: int = 3,
    normalization: dict | None = None,
    scale: float = 1.0,
    fov_diameter: int | None = None,
    image_width: int | None = None,
) -> list[Sample]:
    """The DRIVE layout: images/, 1st_manual/, mask/ (field of view)."""
    root = Path(root)
    return folder_samples(
        root / "images",
        root / "1st_manual",
        root / "mask",
        in_channels,
        normalization,
        scale=scale,
        fov_diameter=fov_diameter,
        image_width=image_width,
    )


def dicom_samples(
    root: str | Path,
    in_channels: int = 1,
    normalization: dict | None = None,
    scale: float = 1.0,
    class_map: dict[int, int] | None = None,
    pixel_size: float | None = None,
    pixel_size_unit: str | None = None,
) -> list[Sample]:
    """DICOM series with their masks as DICOM SEG (what 3D Slicer or OHIF export, or this
    plugin's Review): each folder under ``root`` (or ``root`` itself) holds one series and
    one SEG that refers to it. The slices the SEG refers to are the training slices (an
    empty one is a valid "nothing here"); segment numbers map through ``class_map``, any
    segment being foreground by default. Each series is resized by ``scale`` and, when
    ``pixel_size`` is given, also to that pixel size from its own spacing (in mm).
    """
    from napari_r2au.dicom import dicom_series_files, read_dicom_series
    from napari_r2au.dicom_seg import place_segs
    from napari_r2au.engine import MAX_SCALE, convert_length

    if pixel_size is not None and not pixel_size > 0:
        raise DataError(f"pixel_size must be positive, got {pixel_size}")
    root = Path(root)
    folders = (
        [root]
        if dicom_series_files(root)
        else sorted(p for p in root.iterdir() if p.is_dir() and dicom_series_files(p))
    )
    if not folders:
        raise DataError(f"{root}: no DICOM series in it or in its subfolders")
    samples = []
    for folder in folders:
        try:
            series, seg_files = read_dicom_series(dicom_series_files(folder), folder.name)
            segs = place_segs(series, seg_files)
        except (ValueError, OSError) as exc:
            raise DataError(f"{folder}: {exc}") from exc
        image = series.data
        if len(segs) != 1:
            raise DataError(
                f"{folder}: {len(segs)} DICOM SEG files here refer to its series (a SEG that cannot "
                "be placed is skipped, with a warning); training needs exactly one (the mask)"
            )
        labels = segs[0].labels
        factor = scale
        if pixel_size:
            spacing = series.spacing
            if not spacing:
                raise DataError(
                    f"{folder}: the series gives no pixel spacing, so it cannot be resized to "
                    f"{pixel_size:g} {pixel_size_unit or 'mm'} pixels"
                )
            size = float(np.sqrt(abs(float(spacing[-1]) * float(spacing[-2]))))
            factor *= convert_length(size, "mm", pixel_size_unit or "mm") / pixel_size
            if not 1 / MAX_SCALE <= factor <= MAX_SCALE:
                raise DataError(
                    f"{folder}: {size:g} mm pixels to {pixel_size:g} {pixel_size_unit or 'mm'} means "
                    f"resizing by {factor:g}; check pixel_size and pixel_size_unit"
                )
        rgb = series.rgb
        stack = labels.ndim == 3
        planes = segs[0].record.get("slices") or list(range(labels.shape[0])) if stack else [None]
        statistics = stack_statistics(image, in_channels, normalization, factor) if stack else None
        for z in planes:
            # a copy: a view would keep the whole series alive in every sample
            plane, mask = (image, labels) if z is None else (np.array(image[z]), labels[z])
            name = folder.name if z is None else f"{folder.name}[{z}]"
            if rgb is False and plane.ndim != 2:
                raise DataError(f"{name}: a {plane.shape} plane; expected a 2D slice")
            # segment numbers: 0 is outside every segment, whatever the class map says about segments
            mask = (
                binarize_mask(mask, name, {0: 0, **class_map}) if class_map else (mask > 0).astype(np.uint8)
            )
            if factor != 1.0:
                plane, mask, _ = rescale_pair(plane, mask, factor)
            samples.append(
                make_sample(plane, mask, name, in_channels, None, normalization, statistics=statistics)
            )
    return samples


def annotated_slices(
    pairs: Sequence[tuple[np.ndarray, np.ndarray]],
    names: Sequence[str] | None = None,
    slices: Sequence[Sequence[int]] | None = None,
    fovs: Sequence[np.ndarray | None] | None = None,
):
    """2D (image, labels) pairs, names, FOVs and origins: a 3D pair gives one pair per
    annotated slice, and ``origins`` says where each came from, (pair index, slice index;
    None for a 2D pair).

    For stacks, ``slices[i]`` lists the slices to use for pair i; by default the slices
    whose labels are not all zero (what the user painted).
    """
    out_pairs, out_names, out_fovs, origins = [], [], [], []
    for index, (image, labels) in enumerate(pairs):
        name = names[index] if names else f"pair{index}"
        labels = np.asarray(labels)
        if labels.ndim != 3:
            out_pairs.append((np.asarray(image), labels))
            out_names.append(name)
            out_fovs.append(fovs[index] if fovs else None)
            origins.append((index, None))
            continue
        chosen = list(slices[index]) if slices else [z for z in range(labels.shape[0]) if labels[z].any()]
        if not chosen:
            raise DataError(f"{name}: no annotated slice in the stack")
        fov = np.asarray(fovs[index]) if fovs and fovs[index] is not None else None
        for z in chosen:
            out_pairs.append((np.asarray(image[z]), labels[z]))
            out_names.append(f"{name}[z={z}]")
            out_fovs.append(
                None if fov is None else fov[z] if fov.ndim == 3 else fov
            )  # per slice, or one for all
            origins.append((index, z))
    return out_pairs, out_names, out_fovs, origins


def memory_samples(
    pairs: Sequence[tuple[np.ndarray, np.ndarray]],
    in_channels: int = 3,
    normalization: dict | None = None,
    slices: Sequence[Sequence[int]] | None = None,
    names: Sequence[str] | None = None,
    fovs: Sequence[np.ndarray | None] | None = None,
    scale: float | Sequence[float] = 1.0,
    originals: Sequence[np.ndarray | None] | None = None,
) -> list[Sample]:
    """In-memory (image, labels) pairs resized by ``scale`` (one for all, or one per pair:
    photographs from several cameras, each at its field of view's scale); a 3D pair gives
    one sample per annotated slice (see :func:`annotated_slices`), normalized with its
    stack's statistics.
    ``originals``: per pair, the mask before the user's corrections (or None), kept on the
    samples (``Sample.original``) so that fine-tuning can tell what was corrected."""
    flat, names, fovs, origins = annotated_slices(pairs, names, slices, fovs)
    if not flat:
        raise DataError("no training pairs given")
    scales = [float(scale)] * len(pairs) if np.isscalar(scale) else [float(v) for v in scale]
    if len(scales) != len(pairs):
        raise DataError(f"{len(scales)} scales for {len(pairs)} pairs")
    stacks = sorted({index for index, z in origins if z is not None})
    statistics = {
        index: stack_statistics(pairs[index][0], in_channels, normalization, scales[index])  # lazy stays
        for index in stacks
    }
    samples = []
    for (image, labels), name, fov, (index, z) in zip(flat, names, fovs, origins):
        original = originals[index] if originals else None
        if original is not None:
            original = np.asarray(original if z is None else original[z]) > 0
            if original.shape != np.shape(labels):
                raise DataError(
                    f"{name}: the mask before correction {original.shape} differs from the "
                    f"corrected one {np.shape(labels)}"
                )
            original = resize_mask(original, scales[index])
        image, labels, fov = rescale_pair(image, np.asarray(labels) > 0, scales[index], fov)
        sample = make_sample(
            image,
            labels > 0,
            name,
            in_channels,
            fov,
            normalization,
            statistics=None if z is None else statistics[index],
        )
        sample.original = original
        samples.append(sample)
    return samples


def split_sources(
    samples: list[Sample],
    sources: Sequence[dict],
    seed: int,
) -> tuple[list[Sample], list[Sample]]:
    """Each source split on its own (its ``val_images`` or ``val_names``), so that the
    validation part holds images of every source, not just of the largest. A source's
    training images share its ``weight`` (its share of the patches, whatever its number
    of images), set here, after the split, so that holding images out costs no share."""
    train, val = [], []
    for source in sources:
        name = source_name(source)
        own = [s for s in samples if s.source == name]
        part_train, part_val = split(own, int(source.get("val_images", 1)), seed, source.get("val_names"))
        for sample in part_train:
            sample.weight = float(source.get("weight", 1.0)) / len(part_train)
        train += part_train
        val += part_val
    return train, val


def source_name(source: dict) -> str:
    """A source's name in reports: its ``name``, else its folder's."""
    if source.get("name"):
        return str(source["name"])
    folder = Path(str(source.get("root") or source.get("images") or "source"))
    return folder.parent.name if folder.name in ("images", "training") else folder.name


def series_of(sample: Sample) -> str:
    """The image or series a sample comes from: ``case1`` for the slice ``case1[3]``."""
    return re.sub(r"\[\d+\]$", "", sample.name)


def split(
    samples: list[Sample], n_val: int, seed: int, val_names: list[str] | None = None, by_series: bool = False
) -> tuple[list[Sample], list[Sample]]:
    """A validation split fixed by the seed (same seed, same split), or named.

    ``val_names`` (file names or stems) hold out exactly those images, e.g. a contiguous
    block of a stack, whose neighbouring sections would otherwise leak into validation. A
    name with ``*`` or ``?`` is a pattern (``isic17_validation_*``: a set's own validation
    part) and must match at least one image.
    """
    if isinstance(val_names, (str, int)):
        val_names = [val_names]  # one name, not a sequence of characters
    if val_names:
        wanted = {str(name) for name in val_names}

        def names(sample: Sample) -> set[str]:  # a slice answers to its own name and its series'
            return {
                sample.name,
                sample.name.split(".")[0],
                series_of(sample),
                series_of(sample).split(".")[0],
            }

        from fnmatch import fnmatchcase

        patterns = {name for name in wanted if "*" in name or "?" in name}

        def matches(sample: Sample) -> set[str]:  # the wanted names and patterns a sample answers to
            own = names(sample)
            return (own & wanted) | {p for p in patterns if any(fnmatchcase(n, p) for n in own)}

        chosen = [s for s in samples if matches(s)]
        found = set().union(*(matches(s) for s in chosen)) if chosen else set()
        missing = sorted(wanted - found)
        if missing:
            raise DataError(f"validation images not found: {', '.join(missing)}")
        if len(chosen) == len(samples):
            raise DataError("every image is a validation image: nothing left to train on")
        held = {id(s) for s in chosen}
        return [s for s in samples if id(s) not in held], chosen
    if n_val <= 0:
        return samples, []
    if by_series:  # whole series held out: neighbouring slices would leak into validation
        groups = list(dict.fromkeys(series_of(s) for s in samples))
        if n_val >= len(groups):
            raise DataError(f"cannot hold out {n_val} of {len(groups)} series for validation")
        order = np.random.default_rng(seed).permutation(len(groups))
        held = {groups[i] for i in order[:n_val]}
        return [s for s in samples if series_of(s) not in held], [s for s in samples if series_of(s) in held]
    if n_val >= len(samples):
        raise DataError(f"cannot hold out {n_val} of {len(samples)} images for validation")
    order = np.random.default_rng(seed).permutation(len(samples))
    val = sorted(order[:n_val].tolist())
    return [s for i, s in enumerate(samples) if i not in val], [samples[i] for i in val]
