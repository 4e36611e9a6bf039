"""The ``r2au`` command line. Heavy modules are imported inside the commands, so that
``r2au --help`` answers at once without loading torch or Qt."""

from __future__ import annotations

import argparse
import functools
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Any

#: how --help names the default model (napari_r2au.model_files.DEFAULT_MODEL owns it; that
#: module is not imported here, so that ``r2au --help`` answers at once; a test keeps the two equal)
DEFAULT_MODEL_HELP = "retina-vessels, the vessel model for every fundus camera"


def _progress_bar(total: int | None = None, desc: str = "", unit: str = "tile", shown: bool = True):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False, disable=not (shown and sys.stderr.isatty()))


def _predict_with_bar(model, image, desc: str, tta: bool = False, **kwargs):
    """The prediction (with its ``uncertainty`` map when ``tta`` averages flipped copies)."""
    from .engine import iter_predict, run
    from .uncertainty import iter_predict_tta

    bar = _progress_bar(desc=desc)

    def update(event) -> None:
        bar.total = event.total
        bar.n = event.done
        bar.refresh()

    try:
        if tta:
            return run(iter_predict_tta(model, image, **kwargs), update)
        return run(iter_predict(model, image, **kwargs), update)
    finally:
        bar.close()


def cmd_models(args: argparse.Namespace) -> int:
    from .model_files import list_models

    rows = list_models()
    if args.json:
        print(_json_text(rows))
        return 0
    if not rows:
        print("no models found")
        return 0
    for row in rows:
        f1 = row["validation"].get("f1")
        metric = f"  val F1 {f1:.4f}" if f1 is not None else ""
        print(f"{row['name']:<28} {row['source']:<8} {row['architecture']:<18}{metric}")
    return 0


def cmd_add_model(args: argparse.Namespace) -> int:
    from .model_files import add_model

    sidecar = add_model(
        args.source,
        name=args.name,
        directory=args.dest,
        overwrite=args.overwrite,
        description=args.description,
        threshold=args.threshold,
        threshold_from=args.threshold_from,
        fov_diameter=args.fov_diameter,
    )
    print(f"added {sidecar.stem} ({sidecar})")
    return 0


def cmd_remove_model(args: argparse.Namespace) -> int:
    from .model_files import remove_model

    for name in args.names:
        target = remove_model(name, directory=args.dest)
        print(f"removed {name}: its files are in {target} (move them back to restore it)")
    return 0


def output_names(
    stem: str, *, attention: bool = False, uncertainty: bool = False, dicom_seg: bool = False
) -> list[str]:
    """The files one input gives (``<stem>_mask.tif``, ``_prob.tif``, ``_uncertainty.tif``,
    ``_attention.tif``, ``_seg.dcm``): known before the run, so conflicts are found first."""
    names = [f"{stem}_mask.tif", f"{stem}_prob.tif"]
    names += [f"{stem}_uncertainty.tif"] if uncertainty else []
    names += [f"{stem}_attention.tif"] if attention else []
    return names + ([f"{stem}_seg.dcm"] if dicom_seg else [])


def write_outputs(
    outdir: Path,
    stem: str,
    prediction,
    threshold: float | None,
    attention: bool,
    uncertainty=None,
    source: str | Path = "",
    extra: list[tuple[str, Any]] | None = None,
    extra_masks: tuple[str, ...] = (),
    model_path: Path | None = None,
) -> list[Path]:
    """``<stem>_mask.tif`` (uint8), ``<stem>_prob.tif`` (float32), ``<stem>_uncertainty.tif``,
    ``<stem>_attention.tif`` (float32) and ``extra`` (name, writer) files, written together
    through :func:`napari_r2au.outputs.write_group` (callers check the plan first). The
    mask and the ``extra_masks`` (a DICOM SEG, an overlay: the mask in another form) are
    recorded with the mask's record, the maps with the model that made them."""
    import numpy as np

    from .mask_record import segment_record
    from .outputs import tiff_writer, write_group

    gates = attention and bool(prediction.attention)
    names = output_names(stem, attention=gates, uncertainty=uncertainty is not None)
    mask = prediction.mask(threshold)
    arrays = [mask, prediction.probabilities.astype("float32")]
    if uncertainty is not None:
        arrays.append(uncertainty.astype("float32"))
    if gates:
        arrays.append(np.stack(prediction.attention).astype("float32"))
    files = [(name, tiff_writer(array)) for name, array in zip(names, arrays)] + list(extra or [])
    # the mask's audit record (the same fields a mask made in napari carries); the maps name their model
    record = segment_record(
        prediction,
        mask,
        threshold=prediction.threshold if threshold is None else threshold,
        flip_averaged=uncertainty is not None,
        model_path=None if model_path is None else str(model_path),
    )
    maps = ("model", "model_sha256", "model_path", "scale", "backend", "precision", "flip_averaged")
    model = {key: record[key] for key in maps}
    masks = {names[0], *extra_masks}
    made_by = {name: (dict(record) if name in masks else model) for name, _ in files}
    return write_group(outdir, source or stem, files, made_by)


#: names of the files ``r2au segment`` writes (write_outputs, --dicom-seg)
OUTPUT_NAME = re.compile(r"_(mask|prob|attention|uncertainty|seg)$")


def cmd_segment(args: argparse.Namespace) -> int:
    from ._reader import SUFFIXES, dicom_series_files, read_input, stem_of, suffix_of
    from .checks import input_notices
    from .dicom_seg import dicom_sources
    from .model_files import DEFAULT_MODEL, load_model
    from .outputs import check_plan

    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        _error(f"--threshold is a probability between 0 and 1, not {args.threshold:g}")
        return 2
    model = load_model(args.model or DEFAULT_MODEL)
    _check_pixel_arguments(args, model)
    _check_backend(args, model)  # a device or backend this machine lacks: said before any image is read
    files: list[Path] = []
    skipped = 0
    for item in args.inputs:
        path = Path(item)
        if path.is_dir() and dicom_series_files(path):
            files.append(path)  # a DICOM series: one stack, named after its folder
        elif path.is_dir():
            dangling = sorted(p.name for p in path.iterdir() if p.is_symlink() and not p.exists())
            if dangling:
                print(
                    f"warning: {path}: skipped {len(dangling)} broken link(s) whose target is gone: "
                    f"{', '.join(dangling[:5])}{', ...' if len(dangling) > 5 else ''}",
                    file=sys.stderr,
                )
            found = sorted(p for p in path.iterdir() if p.is_file() and suffix_of(p) in SUFFIXES)
            # this command's own outputs (a second run into the same folder) are not inputs
            kept = [p for p in found if not OUTPUT_NAME.search(stem_of(p))]
            skipped += len(found) - len(kept)
            if not kept:
                _error(
                    f"{path}: no images to segment ({', '.join(SUFFIXES)}"
                    f"{'; only earlier outputs (*_mask, *_prob, ...)' if found else ''})"
                )
                return 2
            files.extend(kept)
        else:
            files.append(path)
    if skipped:
        print(
            f"skipped {skipped} file(s) named like this command's outputs (*_mask, *_prob, *_attention, "
            "*_uncertainty, *_seg); give them by name to segment them",
            file=sys.stderr,
        )
    files = list({p.resolve(): p for p in reversed(files)}.values())[::-1]  # a file given twice runs once
    outdir = Path(args.output)
    gates = args.attention and bool(getattr(model.network, "attention", False))
    plan = {
        path: [
            outdir / name
            for name in output_names(
                stem_of(path), attention=gates, uncertainty=args.tta, dicom_seg=args.dicom_seg
            )
        ]
        for path in files
    }
    check_plan(plan, overwrite=args.overwrite)  # before anything is read or written
    level = model.threshold if args.threshold is None else args.threshold
    how = f"{model.out_channels} classes" if model.out_channels > 1 else f"threshold {level:g}"
    print(f"{model.name} ({how}): {len(files)} input(s)", file=sys.stderr)
    failed = 0
    for path in _progress_bar_iter(files):
        try:
            image, size, unit, axes, metadata = read_input(path)
            if args.dicom_seg and dicom_sources(metadata) is None:  # before any work is done
                raise ValueError("--dicom-seg needs DICOM input (a .dcm file or a folder of a series)")
            if args.pixel_size is not None:  # the command line wins over the file
                size, unit = args.pixel_size, args.pixel_unit
            for notice in input_notices(model, image, axes):
                print(f"warning: {path}: {notice}", file=sys.stderr)
            prediction = _predict_with_bar(
                model,
                image,
                path.name,
                tta=args.tta,
                tile_size=args.tile,
                device=args.device,
                backend=args.backend,
                precision=args.precision,
                attention=args.attention,
                scale=args.scale,
                pixel_size=size,
                pixel_size_unit=unit,
                axes=axes,
            )
            extra = (
                [
                    (
                        f"{stem_of(path)}_seg.dcm",
                        functools.partial(
                            _write_seg_output,
                            metadata=metadata,
                            prediction=prediction,
                            model=model,
                            threshold=args.threshold,
                        ),
                    )
                ]
                if args.dicom_seg
                else []
            )
            written = write_outputs(
                outdir,
                stem_of(path),
                prediction,
                args.threshold,
                args.attention,
                prediction.uncertainty,
                source=path,
                extra=extra,
                extra_masks=tuple(name for name, _ in extra),
                model_path=model.path,
            )
            at = (
                ""
                if abs(prediction.scale - 1.0) < 1e-6
                else f" (at scale {prediction.scale:.3g}"
                + (f", from the {_rule_name(model)})" if args.scale is None and model.derives_scale else ")")
            )
            print(f"{path}{at}: " + ", ".join(str(p) for p in written))
        except Exception as exc:  # report, skip, go on with the others
            failed += 1
            said = str(exc)  # errors from the readers name the file already
            _error(said if said.startswith((f"{path}:", f"{Path(path).name}:")) else f"{path}: {said}")
    if failed:
        print(f"{failed} of {len(files)} files failed", file=sys.stderr)
    return 1 if failed else 0


def _check_backend(args: argparse.Namespace, model) -> None:
    """``--device`` and ``--backend`` checked before the run: a CUDA device this machine
    lacks, or ``--backend openvino`` without OpenVINO or on a GPU, is one error line now."""
    from .backends import BackendError, resolve_backend

    if getattr(args, "compile", False):
        if args.backend not in ("auto", "torch", "torch-compile"):
            raise BackendError(
                f"--compile compiles the torch network; it does not go with --backend {args.backend}"
            )
        args.backend = "torch-compile"
    from .device import select_device

    device = select_device(args.device)
    if args.backend != "auto" or args.precision != "auto":
        resolve_backend(args.backend, model, device, args.precision)


def _rule_name(model) -> str:
    """What a model derives its scale from, for the line that reports it."""
    return "field of view" if model.fov_diameter else "image width"


def _write_seg_output(
    target: Path, metadata: dict[str, Any], prediction, model, threshold: float | None
) -> None:
    """The mask as a DICOM SEG on the DICOM planes the image was read from (``--dicom-seg``)."""
    from .dicom_seg import dicom_sources, write_dicom_seg

    write_dicom_seg(
        target,
        prediction.mask(threshold),
        dicom_sources(metadata),
        model=model.name,
        model_sha256=model.sha256,
        segment_property=model.metadata.get("segment_property"),
    )


def _progress_bar_iter(items):
    bar = _progress_bar(len(items), "images", "image")
    for item in items:
        yield item
        bar.update()
    bar.close()


def cmd_demo(args: argparse.Namespace) -> int:
    import numpy as np
    from skimage import data

    from .model_files import DEFAULT_MODEL, load_model
    from .outputs import check_plan
    from .preprocess import fundus_scale

    model = load_model(args.model or DEFAULT_MODEL)
    image = data.retina()
    # a fundus model derives the scale from the field of view itself; an older one is told DRIVE's
    scale = None if model.derives_scale else fundus_scale(image)
    started = time.perf_counter()
    prediction = _predict_with_bar(model, image, "retina", attention=True, scale=scale)
    scale = prediction.scale
    seconds = time.perf_counter() - started
    outdir = Path(args.output)
    mask = prediction.mask()
    overlay = image.copy()
    overlay[mask > 0] = (0.4 * overlay[mask > 0] + 0.6 * np.array([255, 255, 0])).astype(np.uint8)
    pngs = [("retina_overlay.png", overlay)] + [
        (f"retina_attention_{index}.png", (np.clip(alpha, 0, 1) * 255).astype(np.uint8))
        for index, alpha in enumerate(prediction.attention, start=1)
    ]
    names = output_names("retina", attention=bool(prediction.attention)) + [name for name, _ in pngs]
    check_plan({Path("skimage.data.retina()"): [outdir / name for name in names]}, overwrite=args.overwrite)
    written = write_outputs(
        outdir,
        "retina",
        prediction,
        None,
        True,
        source="skimage.data.retina()",
        extra=[(name, functools.partial(_png, array=array)) for name, array in pngs],
        extra_masks=("retina_overlay.png",),
        model_path=model.path,
    )
    provenance = model.metadata.get("provenance", {})
    print(f"model      {model.name} ({model.metadata['architecture']}, sha256 {model.sha256[:12]})")
    where = provenance.get("validation_metrics_measured_at")
    print(
        f"validation {json.dumps(provenance.get('validation_metrics', {}))}"
        + (f" (at {where})" if where else "")
    )
    field = f"a {model.fov_diameter} px field of view" if model.fov_diameter else "DRIVE's field of view"
    print(f"image      skimage.data.retina() {image.shape}, resized x{scale:.3f} to {field}")
    print(
        f"result     foreground (vessel) pixels {mask.mean():.1%}, {len(prediction.attention)} attention maps, "
        f"{seconds:.2f} s"
    )
    for path in written:
        print(f"wrote      {path}")
    if args.gui:
        return _open_gui(image, prediction)
    return 0


def _png(path: Path, array) -> None:
    import imageio.v3 as iio

    iio.imwrite(path, array, extension=".png")


def _open_gui(image, prediction) -> int:
    import os

    if not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
        _error("--gui needs a display (set DISPLAY, or run under xvfb-run)")
        return 2
    import napari

    viewer = napari.Viewer()
    viewer.add_image(image, name="retina", rgb=True)
    viewer.add_image(
        prediction.probabilities, name="probability", colormap="magma", blending="additive", visible=False
    )
    for index, alpha in enumerate(prediction.attention, start=1):
        viewer.add_image(alpha, name=f"attention {index}", colormap="turbo", opacity=0.5, visible=index == 1)
    viewer.add_labels(prediction.mask(), name="mask")
    napari.run()
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .engine import run
    from .training.config import load_config, load_run_config
    from .training.trainer import distributed_context, iter_train

    if args.resume and args.overwrite:
        print(
            "error: --resume continues the run in output_dir, --overwrite replaces it: give one",
            file=sys.stderr,
        )
        return 2
    config = load_config(args.config, args.set or [])
    if args.resume:  # the run's own settings, not today's config file; --set changes them on purpose
        config = load_run_config(config.output_dir, args.set or [])
    speaks = distributed_context()[0] == 0  # under torchrun, one report (rank 0's), as only rank 0 writes
    bar = _progress_bar(config.steps, config.name, "step", shown=speaks)
    generator = iter_train(config, resume=bool(args.resume), overwrite=bool(args.overwrite))

    def show(event) -> None:
        bar.update(event.step - bar.n)
        postfix = {"loss": f"{event.loss:.4f}"}
        if event.best_f1 is not None:
            postfix["val_f1"] = f"{event.best_f1:.4f}"
        bar.set_postfix(postfix)
        if event.validation and speaks:
            v = event.validation
            print(
                f"step {event.step}: val F1 {v['f1']:.4f} AUC {v['auc_roc']:.4f} ({event.elapsed:.0f} s)",
                flush=True,
            )

    try:
        result = run(generator, show)
    except KeyboardInterrupt:
        generator.close()
        print("\ninterrupted; the last checkpoint is intact", file=sys.stderr)
        return 130
    finally:
        bar.close()
    if speaks:
        print(f"done after {result.steps} steps ({result.stopped}); best {result.best}, last {result.last}")
    return 0


def _class_map(text: str) -> dict[int, int]:
    """``"0:1,255:0"`` -> {0: 1, 255: 0}: mask value to class (here: 0 is the foreground)."""
    try:
        pairs = [item.split(":") for item in text.split(",") if item.strip()]
        mapping = {int(value): int(label) for value, label in pairs}
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected VALUE:CLASS pairs like 0:1,255:0, got {text!r}") from exc
    if not mapping:
        raise argparse.ArgumentTypeError("the class map is empty")
    return mapping


def _folder_pairs(images: str, masks: str, fov: str | None, class_map: dict[int, int] | None = None):
    """(image, mask) pairs, FOVs, names and slices from folders, paired by id like the trainer
    does. A TIFF stack stays one 3D pair with all its slices, so that they are normalized
    together, as Segment normalizes the stack."""
    import numpy as np

    from .training.data import folder_samples, series_of

    groups: dict[str, list] = {}
    for sample in folder_samples(images, masks, fov, class_map=class_map):
        groups.setdefault(series_of(sample), []).append(sample)
    pairs, fovs, names, slices = [], [], [], []
    for name, group in groups.items():
        if len(group) == 1 and group[0].name == name:  # a 2D image
            pairs.append((group[0].raw, group[0].mask))
            fovs.append(group[0].fov)
            slices.append(None)
        else:
            pairs.append((np.stack([s.raw for s in group]), np.stack([s.mask for s in group])))
            fovs.append(np.stack([s.fov for s in group]))
            slices.append(list(range(len(group))))
        names.append(name)
    return pairs, fovs, names, slices


def _warn_about_pairs(model: str, pairs: list, names: list[str]) -> None:
    """The shared checks before a fine-tune (napari_r2au.checks), one line each on stderr."""
    from .checks import correction_notices
    from .model_files import read_model_metadata, resolve_model_path

    try:
        meta = read_model_metadata(resolve_model_path(model)[0])
    except (ValueError, OSError):  # the fine-tune itself will say what is wrong with the model
        meta = None
    for (image, labels), name in zip(pairs, names):
        for notice in correction_notices(meta, image, labels, f"the mask of {name}"):
            print(f"warning: {name}: {notice}", file=sys.stderr)


def cmd_finetune(args: argparse.Namespace) -> int:
    """Headless face of the Fine-tune widget: the same iter_finetune generator."""
    from .engine import run
    from .model_files import DEFAULT_MODEL, load_model, model_path, user_models_dir
    from .training.finetune import FinetuneSettings, iter_finetune

    if args.name is not None:  # a plain name, or refused before anything is read
        model_path(user_models_dir(), args.name)
    args.model = args.model or DEFAULT_MODEL  # read again below (the warnings name the parent)
    parent = load_model(args.model)
    _check_pixel_arguments(args, parent)
    if args.device:  # a device this machine lacks: said before the folders are read
        from .device import select_device

        select_device(args.device)
    pairs, fovs, names, slices = _folder_pairs(args.images, args.masks, args.fov, args.class_map)
    _warn_about_pairs(args.model, pairs, names)
    validation = validation_fov = None
    if args.val_images:
        if not args.val_masks:
            _error("--val-images needs --val-masks")
            return 2
        val_pairs, val_fovs, _, _ = _folder_pairs(
            args.val_images, args.val_masks, args.val_fov, args.class_map
        )
        if len(val_pairs) != 1:
            _error("give one validation image (a folder with one image and its mask)")
            return 2
        validation, validation_fov = val_pairs[0], val_fovs[0]
    settings = FinetuneSettings(
        steps=args.steps,
        lr=args.lr,
        patch_size=args.patch,
        batch_size=args.batch,
        freeze_encoder=args.freeze_encoder,
        seed=args.seed,
        weight_share=args.weight_share,
    )
    generator = iter_finetune(
        parent,
        pairs,
        validation,
        settings,
        names=names,
        fovs=fovs,
        slices=slices,
        validation_fov=validation_fov,
        scale=args.scale,
        name=args.name,
        device=args.device,
        pixel_size=args.pixel_size,
        pixel_size_unit=args.pixel_unit,
    )
    bar = _progress_bar(args.steps, "fine-tune", "step")
    started = time.perf_counter()

    def show(event) -> None:
        bar.update(event.step - bar.n)
        bar.set_postfix(loss=f"{event.loss:.4f}")

    try:
        result = run(generator, show)
    except KeyboardInterrupt:
        generator.close()
        print("\ninterrupted; no model registered, the parent is unchanged", file=sys.stderr)
        return 130
    finally:
        bar.close()
    if result.model is None:
        _error("fine-tuning produced no model")
        return 1
    before = "n/a" if result.dice_before is None else f"{result.dice_before:.4f}"
    after = "n/a" if result.dice_after is None else f"{result.dice_after:.4f}"
    print(f"new model  {result.model.name} ({result.model.path})")
    if validation is not None:
        held_out = "the given pair"
    elif result.dice_before is None:
        held_out = "none: no image had foreground both in and beside a quarter-width band"
    else:
        held_out = "a quarter-width band of each image (where the corrections are), pooled"
        if result.held_out_corrections is not None:
            held_out += (
                f"; {result.held_out_corrections} of its pixels differ from the base model's prediction"
            )
    print(f"dice       before {before}  after {after}  (validation: {held_out})")
    print(f"steps      {result.steps} in {time.perf_counter() - started:.0f} s")
    if result.scales:
        scales = ", ".join(f"{value:.3g}" for value in result.scales)
        derived = (
            f", from each image's {_rule_name(result.model)}"
            if args.scale is None and result.model.derives_scale
            else ""
        )
        print(f"scale      {scales}{derived}")
    if share := result.weight_share:
        print(f"weights    parent + {share:g} x (fine-tuned - parent)")
    if result.dice_fell:
        print(
            f"warning: {result.model.name} scores lower than its base model on the validation part; "
            "compare before you use it",
            file=sys.stderr,
        )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_network
    from .model_files import load_model

    model = load_model(args.model)
    if args.format == "bioimageio":
        from .bioimageio import export_bioimageio

        package = export_bioimageio(model, args.output, sample=args.sample, overwrite=args.overwrite)
        print(f"exported {model.name} as a bioimage.io package: {package}")
        return 0
    network, card = export_network(
        model, args.output, args.format, attention=args.attention, overwrite=args.overwrite
    )
    print(f"exported {model.name} as {args.format}: {network} (how to use it: {card})")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from .engine import run
    from .model_files import load_model
    from .training.quantize import iter_quantize

    stages = iter_quantize(
        load_model(args.model), args.images, args.masks, args.fov, dest=args.dest, class_map=args.class_map
    )
    record = run(stages, lambda line: print(line, flush=True))
    return 0 if record["accepted"] else 1


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .model_files import DEFAULT_MODEL, load_model
    from .training.evaluate import evaluate_folders

    model = load_model(args.model or DEFAULT_MODEL)
    _check_pixel_arguments(args, model)
    _check_backend(args, model)
    report = evaluate_folders(
        model,
        args.images,
        args.masks,
        args.fov,
        args.threshold,
        scale=args.scale,
        plots=args.plots,
        pixel_size=args.pixel_size,
        pixel_size_unit=args.pixel_unit,
        class_map=args.class_map,
        tta=args.tta,
        device=args.device,
        backend=args.backend,
        precision=args.precision,
    )
    keys = ("accuracy", "sensitivity", "specificity", "precision", "f1", "iou", "auc_roc", "auc_pr")
    print(f"{'image':<24}{'scale':>8}" + "".join(f"{k:>12}" for k in keys))
    for row in report[
        "per_image"
    ]:  # the scale each image was predicted at (derived per image for fundus models)
        print(f"{row['image']:<24}{row['scale']:>8.3g}" + "".join(f"{row[k]:>12.4f}" for k in keys))
    print(
        f"{'ALL (' + str(report['n_images']) + ')':<24}{'':>8}" + "".join(f"{report[k]:>12.4f}" for k in keys)
    )
    if report["auc_roc"] < 0.5:  # worse than chance: the masks most likely mark the other class
        data = (model.metadata.get("provenance") or {}).get("data")
        recorded = data.get("class_map") if isinstance(data, dict) else None
        recorded = recorded if isinstance(recorded, dict) else None
        hint = (
            f" {model.name} was trained with the class map {recorded}: try --class-map "
            + ",".join(f"{k}:{v}" for k, v in recorded.items())
            if recorded and not args.class_map
            else ""
        )
        print(
            f"warning: AUC-ROC {report['auc_roc']:.3f} is below chance: do the masks mark the background "
            f"as foreground?{hint}",
            file=sys.stderr,
        )
    if args.json:
        from .io import write_bytes_atomic

        write_bytes_atomic(args.json, (_json_text(report) + "\n").encode())
    return 0


# -- r2au worklist: the Worklist dock without a window -------------------------------------

#: the verdicts ``r2au worklist set`` gives (accepting an edited mask records "corrected")
VERDICTS = ("accepted", "needs correction", "rejected", "in review")


def _verdict(text: str) -> str:
    """``needs-correction`` and ``needs_correction`` for "needs correction": no quotes needed."""
    return " ".join(text.replace("-", " ").replace("_", " ").split()).lower()


def _cases(n: int) -> str:
    return f"{n} case" if n == 1 else f"{n} cases"


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _case_line(case) -> str:
    """One case as ``r2au worklist segment`` reports it: status, Dice where a reference
    exists, the uncertainty score the review order follows."""
    dice = "" if case.dice is None else f"  dice {case.dice:.4f}"
    return f"{case.id}: {case.status}{dice}  uncertainty {_number(case.uncertainty, 4)}"


def _count_line(counts: dict[str, int]) -> str:
    parts = [f"{n} {status}" for status, n in counts.items() if n]
    return f"{_cases(sum(counts.values()))}: " + ", ".join(parts)


def cmd_worklist_create(args: argparse.Namespace) -> int:
    from .worklist import Worklist

    if args.model is not None:  # a misspelt model is said now, not at the first segment
        from .model_files import resolve_model_path

        resolve_model_path(args.model)
    with Worklist.create(args.folder, args.cases, model=args.model, scale=args.scale) as worklist:
        cases = worklist.cases
        references = sum(c.reference is not None for c in cases)
        series = sum(c.kind == "dicom" for c in cases)
        print(
            f"worklist   {worklist.folder}: {_cases(len(cases))}, {references} with a reference"
            + (f", {series} DICOM series" if series else "")
            + (f", scale {worklist.scale:g}" if worklist.scale else "")
        )
        for case in cases:
            reference = f"  (reference {worklist.path_of(case.reference)})" if case.reference else ""
            print(f"{case.id}: {worklist.path_of(case.image)}{reference}")
    return 0


def cmd_worklist_segment(args: argparse.Namespace) -> int:
    """Each untouched case in turn, saved as it finishes: a failed case is said and
    skipped (as ``r2au segment`` does), Ctrl-C keeps the finished ones."""
    from .model_files import DEFAULT_MODEL, load_model
    from .worklist import Worklist, iter_segment, run_events

    if args.device:  # a device this machine lacks: said before anything is read
        from .device import select_device

        select_device(args.device)
    with Worklist.open(args.folder) as worklist:
        model = load_model(args.model or worklist.model or DEFAULT_MODEL)
        if args.scale is not None:  # 0: back to the model's own rule
            worklist.set_scale(args.scale)
        untouched = [c for c in worklist.cases if c.untouched]
        # a case this very model has segmented already (at the worklist's scale, if it sets one)
        # is kept: a second run goes on where an interrupted one stopped
        todo = [
            c
            for c in untouched
            if not (
                c.status == "segmented"
                and c.model == model.name
                and c.model_sha256 == model.sha256
                and c.scale_asked == worklist.scale  # None included: back to the model's own rule
            )
        ]
        kept = len(worklist.cases) - len(untouched)
        print(
            f"model      {model.name}"
            + (f" at scale {worklist.scale:g}" if worklist.scale else "")
            + f": {len(todo)} of {_cases(len(worklist.cases))} to segment"
            + (f"; {len(untouched) - len(todo)} done already" if len(untouched) > len(todo) else "")
            + (f"; {kept} opened or reviewed, kept as they are" if kept else "")
        )
        bar = _progress_bar(len(todo), "cases", "case")
        done: list[str] = []
        failed = 0

        def show(event) -> None:
            if event.stage == "segment":
                bar.set_postfix_str(f"{event.case} {event.detail.done}/{event.detail.total}")
            elif event.stage == "case":
                bar.update()
                print(_case_line(worklist.case(event.case)), flush=True)

        try:
            for case in todo:
                generator = iter_segment(
                    worklist, model, [case], tile_size=args.tile, device=args.device, attention=args.attention
                )
                try:
                    done += run_events(generator, show)
                except KeyboardInterrupt:
                    generator.close()
                    raise
                except Exception as exc:
                    if not _expected(exc):
                        raise
                    failed += 1
                    bar.update()
                    _error(f"case {case.id}: {exc}")
        except KeyboardInterrupt:
            print(
                f"\ninterrupted; {len(done)} of {_cases(len(todo))} segmented and saved, the others as they were",
                file=sys.stderr,
            )
            return 130
        finally:
            bar.close()
        if worklist.model is None:  # the model the next segment and learn start from
            worklist.model = model.name
            worklist.save()
        print(_count_line(worklist.counts()))
    if failed:
        print(f"{failed} of {_cases(len(todo))} failed", file=sys.stderr)
    return 1 if failed else 0


def _status_row(case) -> dict[str, Any]:
    return {
        "case": case.id,
        "status": case.status,
        "model": case.model,
        "dice": case.dice,
        "uncertainty": case.uncertainty,
        "edited": case.edited,
        "reviewer": case.reviewer,
        "comment": case.comment,
    }


def cmd_worklist_status(args: argparse.Namespace) -> int:
    """Read-only: it answers while the dock (or a segment run) has the worklist open."""
    from .worklist import Worklist

    with Worklist.open(args.folder, read_only=True) as worklist:
        rows = [_status_row(case) for case in worklist.ordered(args.order)]
        if args.json:
            summary = {
                "worklist": str(worklist.folder),
                "model": worklist.model,
                "scale": worklist.scale,
                "models": worklist.models,
                "counts": worklist.counts(),
                "cases": rows,
            }
            print(_json_text(summary))
            return 0
        table = [
            [
                row["case"],
                row["status"],
                row["model"] or "-",
                _number(row["dice"], 4),
                _number(row["uncertainty"], 4),
                "yes" if row["edited"] else "no",
                row["reviewer"] or "-",
                " ".join(row["comment"].split()),
            ]
            for row in rows
        ]
        header = ["case", "status", "model", "dice", "uncertainty", "edited", "reviewer", "comment"]
        widths = [max(len(str(line[i])) for line in [header, *table]) for i in range(len(header) - 1)]
        for line in [header, *table]:
            cells = "  ".join(f"{cell:<{width}}" for cell, width in zip(line, widths))
            print(f"{cells}  {line[-1]}".rstrip())
        print(_count_line(worklist.counts()))
        print(
            f"model      {worklist.model or 'none yet'}"
            + (f" at scale {worklist.scale:g}" if worklist.scale else " (scale: the model's own rule)")
        )
    return 0


def cmd_worklist_set(args: argparse.Namespace) -> int:
    from .worklist import Worklist

    with Worklist.open(args.folder) as worklist:
        case = worklist.case(args.case)
        worklist.set_status(case, args.status, args.comment)
        why = " (its mask was edited)" if case.status == "corrected" and args.status == "accepted" else ""
        comment = f"  comment: {case.comment}" if case.comment else ""
        print(f"{case.id}: {case.status}{why}{comment}")
    return 0


def cmd_worklist_learn(args: argparse.Namespace) -> int:
    """Headless face of the dock's Learn: iter_learn, then the re-segmentation it does."""
    from .training.finetune import FinetuneSettings
    from .worklist import Worklist, iter_learn, run_events

    if args.name is not None:  # a plain name, or refused before anything is read
        from .model_files import model_path, user_models_dir

        model_path(user_models_dir(), args.name)
    if args.device:
        from .device import select_device

        select_device(args.device)
    with Worklist.open(args.folder) as worklist:
        generator = iter_learn(
            worklist,
            args.model,
            settings=FinetuneSettings(steps=args.steps),
            device=args.device,
            resegment=args.resegment,
            name=args.name,
            adopt=args.adopt,
        )
        bar = _progress_bar(args.steps, "learn", "step")
        learned = None

        def show(event) -> None:
            nonlocal bar, learned
            if event.stage == "learn":
                bar.update(event.done - bar.n)
                bar.set_postfix(loss=f"{event.detail.loss:.4f}")
            elif event.stage == "learned":
                learned = event.detail
                bar.close()
                if learned.adopted and args.resegment:
                    bar = _progress_bar(None, "re-segment", "case")
            elif event.stage == "case":
                bar.total = event.total
                bar.update(event.done - bar.n)

        try:
            result = run_events(generator, show)
        except KeyboardInterrupt:
            generator.close()
            if learned is None:
                print("\ninterrupted; no model registered, the worklist is unchanged", file=sys.stderr)
            elif not learned.adopted:
                print(f"\ninterrupted; {learned.model} is registered and kept aside", file=sys.stderr)
            else:
                print(
                    f"\ninterrupted; {learned.model} is the worklist's model, the cases re-segmented "
                    "so far are saved",
                    file=sys.stderr,
                )
            return 130
        finally:
            bar.close()
        kept = worklist.model
    if result.model is None:
        _error("fine-tuning produced no model; the worklist is unchanged")
        return 1
    before, after = _number(result.dice_before, 4), _number(result.dice_after, 4)
    if result.adopted:
        print(f"new model  {result.model} (from {result.parent}; the worklist's model now)")
    else:
        print(
            f"new model  {result.model} (from {result.parent}), kept aside: it scores lower than "
            f"{result.parent} on the held-out corrections, so the worklist keeps {kept} "
            f"(use it with: r2au worklist segment --model {result.model})"
        )
    print(f"learned    from {_cases(len(result.cases))}: {', '.join(result.cases)}")
    print(f"dice       before {before}  after {after}  (on the held-out part of those cases)")
    if result.held_out_uninformative:
        from .worklist import UNINFORMATIVE_HELD_OUT

        print(f"note       {UNINFORMATIVE_HELD_OUT}")
    if not result.adopted:
        print("re-segmented none (the new version was kept aside; --adopt always puts it to use)")
    elif not args.resegment:
        print("re-segmented none (--no-resegment)")
    else:
        print(
            f"re-segmented {_cases(len(result.resegmented))} nobody had touched"
            + (f": {', '.join(result.resegmented)}" if result.resegmented else "")
        )
    if result.adopted and result.dice_fell and not result.held_out_uninformative:
        print(
            f"warning: {result.model} scores lower than {result.parent} on the held-out part; "
            "compare before you rely on it",
            file=sys.stderr,
        )
    return 0


def cmd_worklist_export(args: argparse.Namespace) -> int:
    """Read-only on the worklist: it may be exported while the dock has it open."""
    from .worklist import Worklist, export_series

    with Worklist.open(args.folder, read_only=True) as worklist:
        written = export_series(worklist, args.out, overwrite=args.overwrite)
        masks = sum(1 for path in written if path.name.endswith("_mask.tif"))
        print(f"exported   the masks of {masks} of {_cases(len(worklist.cases))} to {Path(args.out)}")
        for path in written:
            print(f"wrote      {path}")
    return 0


def _json_text(value: Any) -> str:
    """Valid JSON: a metric that is undefined (NaN, e.g. AUC on an image without foreground) is null."""

    def clean(item: Any) -> Any:
        if isinstance(item, float) and not math.isfinite(item):
            return None
        if isinstance(item, dict):
            return {key: clean(v) for key, v in item.items()}
        if isinstance(item, (list, tuple)):
            return [clean(v) for v in item]
        return item.item() if hasattr(item, "item") and hasattr(item, "dtype") else item

    return json.dumps(clean(value), indent=2, allow_nan=False, default=str)


def _check_pixel_arguments(args: argparse.Namespace, model) -> None:
    """Say so when --pixel-size/--pixel-unit cannot take effect, rather than ignore them."""
    if args.pixel_unit and args.pixel_size is None:
        print("warning: --pixel-unit without --pixel-size has no effect", file=sys.stderr)
    if args.pixel_size is not None and not model.pixel_size:
        print(
            f"warning: model {model.name!r} records no pixel size, so --pixel-size is ignored; use --scale",
            file=sys.stderr,
        )
    elif args.pixel_size is not None and args.scale is not None:
        print("warning: --scale is given, so --pixel-size is ignored", file=sys.stderr)


def _add_class_map_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--class-map",
        type=_class_map,
        default=None,
        metavar="VALUE:CLASS,...",
        help="mask values to classes when masks are not 0/1 or 0/255 foreground, "
        "e.g. 0:1,255:0 for labels that mark the foreground with 0",
    )


def _add_scale_arguments(p: argparse.ArgumentParser, scale_help: str) -> None:
    p.add_argument("--scale", type=float, default=None, help=scale_help)
    p.add_argument(
        "--pixel-size",
        type=float,
        default=None,
        help="the images' pixel size; with a model that records its own, it sets the scale",
    )
    p.add_argument(
        "--pixel-unit", default=None, help="unit of --pixel-size, e.g. mm or um (default: the model's)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="r2au",
        description="R2AU-Net segmentation: segment, evaluate, train and fine-tune models, "
        "manage your models (models, add-model, remove-model), and review a series of cases "
        "(worklist); demo runs the default model.",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list bundled and user models")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("add-model", help="add a model file (e.g. a training run's best.json) to your models")
    p.add_argument(
        "source",
        help="model .json (e.g. runs/NAME/best.json), its weights file, or a bioimage.io package "
        "(.zip or folder) made by r2au export --format bioimageio",
    )
    p.add_argument("--name", default=None, help="name in the model list (default: the file's)")
    p.add_argument("--description", default=None, help="replace the description")
    p.add_argument("--threshold", type=float, default=None, help="set the decision threshold")
    p.add_argument(
        "--threshold-from",
        default=None,
        metavar="MODEL",
        help="take the threshold from this model (e.g. a run of the same recipe that held out "
        "a validation split) and record its validation figures",
    )
    p.add_argument(
        "--fov-diameter",
        type=int,
        default=None,
        help="a fundus model: the field of view (px) each photograph is resized to before the network "
        "(python -m benchmarks.working_scale measures which runs best)",
    )
    p.add_argument("--dest", default=None, help="folder to add it to (default: your user models folder)")
    p.add_argument("--overwrite", action="store_true", help="replace a model of the same name")
    p.set_defaults(func=cmd_add_model)

    p = sub.add_parser(
        "remove-model", help="take user models (e.g. a fine-tune you do not want) out of the lists"
    )
    p.add_argument("names", nargs="+", help="user model names (bundled models cannot be removed)")
    p.add_argument("--dest", default=None, help="the models folder (default: your user models folder)")
    p.set_defaults(func=cmd_remove_model)

    p = sub.add_parser("segment", help="segment images or folders of images")
    p.add_argument("inputs", nargs="+", help="image files or folders")
    p.add_argument("-m", "--model", default=None, help=f"model name or path (default: {DEFAULT_MODEL_HELP})")
    p.add_argument("-o", "--output", default=".", help="output folder (default: current)")
    p.add_argument(
        "--threshold", type=float, default=None, help="probability threshold (default: the model's)"
    )
    p.add_argument("--attention", action="store_true", help="also write the attention maps")
    p.add_argument(
        "--tta",
        action="store_true",
        help="average the prediction over flipped copies (3x the time; a little more accurate) "
        "and write their disagreement as <name>_uncertainty.tif",
    )
    p.add_argument("--tile", type=int, default=None, help="tile size in pixels (default: automatic)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: best available)")
    _add_backend_argument(p)
    p.add_argument(
        "--dicom-seg",
        action="store_true",
        help="for DICOM input, also write <name>_seg.dcm: a DICOM SEG that PACS, OHIF and 3D Slicer "
        "show on the source series (needs the dicom extra)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace existing files of the output names even when they are not earlier r2au outputs",
    )
    _add_scale_arguments(p, "resize factor before the network (default: from --pixel-size, else the model's)")
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("demo", help="segment the bundled fundus photograph with the default model")
    p.add_argument("-o", "--output", default="r2au-demo", help="output folder (default: r2au-demo)")
    p.add_argument(
        "-m",
        "--model",
        default=None,
        help=f"a model for colour fundus photographs, e.g. your fine-tune of the default (default: {DEFAULT_MODEL_HELP})",
    )
    p.add_argument("--gui", action="store_true", help="open the results in napari")
    p.add_argument(
        "--overwrite", action="store_true", help="replace files there that are not earlier r2au outputs"
    )
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="train a model from a YAML config")
    p.add_argument("config", help="config file, or the name of a bundled config (e.g. drive-vessels)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the run in the config's output_dir")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run already in output_dir (its config.json, log.csv, checkpoints); "
        "without it or --resume such a folder is refused",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("finetune", help="fine-tune a model on corrected masks (a new versioned model)")
    p.add_argument(
        "-m",
        "--model",
        default=None,
        help=f"the parent model, never overwritten (default: {DEFAULT_MODEL_HELP})",
    )
    p.add_argument("--images", required=True, help="folder of images")
    p.add_argument("--masks", required=True, help="folder of corrected masks (0/1 or 0/255), matched by name")
    p.add_argument("--fov", default=None, help="folder of field-of-view masks")
    p.add_argument(
        "--val-images",
        default=None,
        help="folder with one validation image (default: hold out a quarter-width band of each image)",
    )
    p.add_argument("--val-masks", default=None, help="folder with its mask")
    p.add_argument("--val-fov", default=None, help="folder with its field-of-view mask")
    from .training.settings import FinetuneSettings  # torch-free: --help stays fast

    defaults = FinetuneSettings()
    p.add_argument("--steps", type=int, default=defaults.steps, help="training steps (default: %(default)s)")
    p.add_argument("--lr", type=float, default=defaults.lr, help="learning rate (default: %(default)s)")
    p.add_argument(
        "--patch",
        type=int,
        default=defaults.patch_size,
        help="patch size in pixels, at the model's scale (default: %(default)s)",
    )
    p.add_argument(
        "--batch", type=int, default=defaults.batch_size, help="patches per step (default: %(default)s)"
    )
    p.add_argument(
        "--weight-share",
        type=float,
        default=defaults.weight_share,
        metavar="S",
        help="the new weights are parent + S x (fine-tuned - parent); 1 keeps the fine-tuned ones "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--freeze-encoder",
        action=argparse.BooleanOptionalAction,
        default=defaults.freeze_encoder,
        help="train the decoder and attention gates only (default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of patch sampling and augmentation")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: best available)")
    _add_scale_arguments(p, "working scale (default: from --pixel-size, else the parent's)")
    _add_class_map_argument(p)
    p.add_argument(
        "--name",
        default=None,
        help="name of the new model: letters, digits, '-', '_', '.' (default: <parent>-ft<N>)",
    )
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser(
        "export", help="export a model's network as ONNX or TorchScript, with a JSON card of how to use it"
    )
    p.add_argument("model", help="a model name (r2au models) or a model file")
    p.add_argument("--format", choices=["onnx", "torchscript", "bioimageio"], required=True)
    p.add_argument(
        "--sample",
        default=None,
        help="bioimageio: a real image of what the model segments, for the test tensors and cover "
        "(default: the plugin's fundus photograph, for fundus models only; others need one)",
    )
    p.add_argument(
        "-o", "--output", required=True, help="the file to write (or a folder: <model>.onnx / .pt)"
    )
    p.add_argument("--attention", action="store_true", help="the attention gates' maps as extra outputs")
    p.add_argument("--overwrite", action="store_true", help="replace the file and its card if they exist")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "quantize",
        help="an int8 network for the CPU (OpenVINO), used by default only if it is as accurate on your images",
        description="Calibrates an int8 network on the images (the engine's own inputs), scores it and exact fp32 "
        "on the same images and masks, and keeps it only if its pooled F1 is within 0.003 of fp32 and no "
        "image's within 0.01; the verdict is "
        "recorded either way. Exit code 1 when refused. Needs the fast extra (openvino, nncf).",
    )
    p.add_argument("model", help="model name or path")
    p.add_argument("--images", required=True, help="folder of images (some of the model's validation images)")
    p.add_argument("--masks", required=True, help="folder of reference masks (0/1 or 0/255), matched by name")
    p.add_argument(
        "--fov", default=None, help="folder of field-of-view masks (pixels outside are not counted)"
    )
    p.add_argument(
        "--dest",
        default=None,
        help="write NAME.xml/.bin/.json into this folder (napari_r2au/bundled_models/int8 for a bundled model) "
        "instead of your int8 folder",
    )
    _add_class_map_argument(p)
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("evaluate", help="evaluate a model on a folder of images and reference masks")
    p.add_argument("-m", "--model", default=None, help=f"model name or path (default: {DEFAULT_MODEL_HELP})")
    p.add_argument("--images", required=True, help="folder of images")
    p.add_argument("--masks", required=True, help="folder of reference masks (0/1 or 0/255), matched by name")
    p.add_argument(
        "--fov", default=None, help="folder of field-of-view masks (pixels outside are not counted)"
    )
    p.add_argument(
        "--threshold", type=float, default=None, help="probability threshold (default: the model's)"
    )
    _add_scale_arguments(p, "resize factor before the network (default: from --pixel-size, else the model's)")
    _add_class_map_argument(p)
    p.add_argument("--tta", action="store_true", help="score the mean of flipped copies (as segment --tta)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: best available)")
    _add_backend_argument(p)
    p.add_argument("--json", default=None, help="write the metrics as JSON here")
    p.add_argument("--plots", default=None, help="write ROC and PR curves as PNG into this folder")
    p.set_defaults(func=cmd_evaluate)
    _add_worklist_parser(sub)
    return parser


def _add_backend_argument(parser: argparse.ArgumentParser) -> None:
    from .backends import BACKENDS, INFERENCE_PRECISIONS  # torch-free: --help stays fast

    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="what runs the network: auto (default) picks OpenVINO on the CPU where it is installed "
        "(pip install 'napari-r2au[fast]'), else torch; torch-compile is torch through torch.compile "
        "(tens of seconds to compile for each input shape, then faster: for long runs over images of one size; "
        "give --tile for images of mixed sizes)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="the same as --backend torch-compile",
    )
    parser.add_argument(
        "--precision",
        choices=INFERENCE_PRECISIONS,
        default="auto",
        help="auto (default): an int8 network that passed its accuracy gate (r2au quantize) where there is one, "
        "else bf16 where the GPU has it or the CPU has it and measures it faster, else fp32; "
        "fp32 is the exact path",
    )


def _add_worklist_parser(sub) -> None:
    """``r2au worklist ACTION``: the Worklist dock's jobs without a window, so that a study
    can be pre-segmented on one machine and reviewed on another."""
    from .training.settings import FinetuneSettings  # torch-free: --help stays fast

    p = sub.add_parser(
        "worklist",
        help="a series of cases to pre-segment, review and learn from (the Worklist dock, headless)",
        description="A worklist is a folder that holds a series of cases, their masks and their "
        "review status; the napari Worklist dock opens the same folder.",
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    q = actions.add_parser("create", help="make a worklist of the cases found in folders, CSV files or files")
    q.add_argument("folder", help="the worklist's folder (new or empty)")
    q.add_argument(
        "cases",
        nargs="+",
        help="folders of images (reference masks are paired by name, beside them or in a mask "
        "folder next to them), folders of DICOM series, CSV files (columns image, reference, id), "
        "or single image files",
    )
    q.add_argument(
        "-m", "--model", default=None, help=f"the model to segment with (default: {DEFAULT_MODEL_HELP})"
    )
    q.add_argument(
        "--scale",
        type=float,
        default=None,
        help="resize factor before the network for every case (default: the model's own rule, e.g. "
        "a fundus model's field of view); learning trains at it too",
    )
    q.set_defaults(func=cmd_worklist_create)

    q = actions.add_parser("segment", help="segment the cases nobody has opened or reviewed yet")
    q.add_argument("folder", help="the worklist's folder")
    q.add_argument("-m", "--model", default=None, help="model name or path (default: the worklist's model)")
    q.add_argument("--tile", type=int, default=None, help="tile size in pixels (default: automatic)")
    q.add_argument(
        "--scale",
        type=float,
        default=None,
        help="set the worklist's resize factor before the network (0: the model's own rule); "
        "kept for later runs and learning",
    )
    q.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: best available)")
    q.add_argument(
        "--no-attention",
        dest="attention",
        action="store_false",
        help="do not keep the attention maps with the cases (smaller, a little faster)",
    )
    q.set_defaults(func=cmd_worklist_segment)

    q = actions.add_parser("status", help="the cases, their status and scores (read-only)")
    q.add_argument("folder", help="the worklist's folder")
    q.add_argument(
        "--order",
        choices=("file", "uncertain"),
        default="file",
        help="file order, or the most uncertain cases first (default: file)",
    )
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(func=cmd_worklist_status)

    q = actions.add_parser("set", help="give a case a verdict")
    q.add_argument("folder", help="the worklist's folder")
    q.add_argument("case", help="the case id (as r2au worklist status lists it)")
    q.add_argument(
        "status",
        type=_verdict,
        choices=VERDICTS,
        metavar="STATUS",
        help=f"{', '.join(VERDICTS)} (or needs-correction, in-review); accepting a mask that was "
        "edited records 'corrected'; rejecting needs --comment",
    )
    q.add_argument("--comment", default=None, help="a note kept with the verdict (why, what to fix)")
    q.set_defaults(func=cmd_worklist_set)

    q = actions.add_parser(
        "learn", help="fine-tune the model on the accepted and corrected cases, then re-segment the rest"
    )
    q.add_argument("folder", help="the worklist's folder")
    q.add_argument(
        "-m",
        "--model",
        default=None,
        help="the parent model (default: the worklist's model; never overwritten)",
    )
    q.add_argument(
        "--name",
        default=None,
        help="name of the new model: letters, digits, '-', '_', '.' (default: <parent>-ft<N>)",
    )
    q.add_argument(
        "--steps", type=int, default=FinetuneSettings().steps, help="training steps (default: %(default)s)"
    )
    q.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: best available)")
    q.add_argument(
        "--no-resegment",
        dest="resegment",
        action="store_false",
        help="keep the untouched cases' masks (default: re-segment them with the new model)",
    )
    q.add_argument(
        "--adopt",
        choices=("if-better", "always"),
        default="if-better",
        help="put the new version to use only if its held-out Dice is not lower than its parent's "
        "(if-better, the default, as the Fine-tune dock does), or always",
    )
    q.set_defaults(func=cmd_worklist_learn)

    q = actions.add_parser(
        "export", help="write every mask with its record, and a summary (CSV, JSON, a plot)"
    )
    q.add_argument("folder", help="the worklist's folder")
    q.add_argument("out", help="the folder to write to")
    q.add_argument(
        "--overwrite",
        action="store_true",
        help="replace files there that are not earlier r2au outputs",
    )
    q.set_defaults(func=cmd_worklist_export)


def _version() -> str:
    from . import __version__

    return f"napari-r2au {__version__}"


def _error(message: str) -> None:
    """One line on stderr, ``r2au: error: ...``: what the user has to fix, no traceback."""
    print(f"r2au: error: {' '.join(message.split())}", file=sys.stderr)


def _expected(exc: BaseException) -> bool:
    """Failures that mean bad input or a missing extra, not a bug: ValueError (ModelFileError,
    DataError, ConfigError, WorklistError and WorklistLocked, ...), OSError (ImageReadError,
    a full disk) and MissingExtraError."""
    if isinstance(exc, (ValueError, OSError)):
        return True
    if isinstance(exc, ImportError):
        from .io import MissingExtraError

        return isinstance(exc, MissingExtraError)
    return False


def main(argv: list[str] | None = None) -> int:
    """The command line's one error boundary: an expected failure is one line and exit
    code 2, Ctrl-C one line and 130 (atomic writes leave no partial file); only a bug
    shows a traceback."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("\nr2au: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if not _expected(exc):
            raise
        _error(str(exc) or type(exc).__name__)
        return 2


if __name__ == "__main__":
    sys.exit(main())
