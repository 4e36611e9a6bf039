"""Vessel models across fundus cameras, at default settings (no scale typed).

``python -m benchmarks.cross_dataset [--models retina-vessels drive-vessels] [--markdown FILE]``

Evaluates each model with ``r2au evaluate``'s code path (``evaluate_folders``, no scale,
no threshold given: what a user gets) on the images that ``retina-vessels`` held out for
validation from each source: DRIVE, STARE, CHASE_DB1 and HRF in ../shared/data. The
split is the one its config draws (``split_sources``, seed and ``val_images`` of each
source), so none of these images was trained on by either model (``drive-vessels``
holds out the same four DRIVE images and never saw the other cameras). Pixels inside
each image's field of view are pooled per source; F1 at the model's own threshold and
AUC-ROC.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import write_between_markers

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("R2AU_DATA", ROOT.parent / "shared" / "data"))
CONFIG = ROOT / "training" / "configs" / "retina-vessels.yaml"


def held_out(config_path: Path = CONFIG) -> dict[str, list[tuple[Path, Path, Path | None]]]:
    """Per source, the (image, mask, FOV) files the config's split holds out."""
    from napari_r2au.training.config import load_config
    from napari_r2au.training.data import Sample, _by_id, source_name, split_sources

    config = load_config(config_path)
    sources = config.data["sources"]
    files: dict[str, tuple[Path, Path, Path | None]] = {}
    stubs = []
    for source in sources:
        root = source.get("root")
        images = Path(root) / "images" if root else Path(source["images"])
        masks = Path(root) / "1st_manual" if root else Path(source["masks"])
        fov = Path(root) / "mask" if root else (Path(source["fov"]) if source.get("fov") else None)
        images, masks, fov = (_absolute(p) for p in (images, masks, fov))
        by_image, by_mask = _by_id(images), _by_id(masks)
        by_fov = _by_id(fov) if fov else {}
        name = source_name(source)
        for key in sorted(by_image):  # the order folder_samples gives, so the seed draws the same
            blank = np.zeros((1, 1, 1), np.float32)
            stub = Sample(
                blank,
                blank[..., 0].astype(np.uint8),
                blank[..., 0] > 0,
                by_image[key].name,
                blank,
                source=name,
            )
            files[f"{name}/{stub.name}"] = (by_image[key], by_mask[key], by_fov.get(key))
            stubs.append(stub)
    _, val = split_sources(stubs, sources, config.seed)
    out: dict[str, list] = {}
    for stub in val:
        out.setdefault(stub.source, []).append(files[f"{stub.source}/{stub.name}"])
    return out


def _absolute(path: Path | None) -> Path | None:
    """Config paths are relative to the project (../shared/data/...), or R2AU_DATA's copy."""
    if path is None:
        return None
    text = str(path)
    marker = "shared/data/"
    if marker in text and "R2AU_DATA" in os.environ:
        return DATA / text.split(marker, 1)[1]
    return path if path.is_absolute() else ROOT / path


def _link(
    triples: list[tuple[Path, Path, Path | None]], folder: Path, jpeg: int | None = None
) -> tuple[Path, Path, Path | None]:
    """Folders of symlinks that ``evaluate_folders`` pairs by name, as ``r2au evaluate`` would;
    with ``jpeg``, each photograph re-saved as a JPEG of that quality instead (what a clinic's
    export or a PACS screenshot gives)."""
    dirs = [folder / name for name in ("images", "masks", "fov")]
    for path in dirs:
        path.mkdir(parents=True)
    for image, mask, fov in triples:
        if jpeg is None:
            (dirs[0] / image.name).symlink_to(image)
        else:
            from PIL import Image

            from napari_r2au.io import read_image

            pixels = np.asarray(read_image(image))[..., :3]
            Image.fromarray(pixels.astype(np.uint8)).save(dirs[0] / f"{image.stem}.jpg", quality=jpeg)
        (dirs[1] / mask.name).symlink_to(mask)
        if fov is not None:
            (dirs[2] / fov.name).symlink_to(fov)
    return dirs[0], dirs[1], dirs[2] if all(t[2] is not None for t in triples) else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cross_dataset", description=__doc__)
    parser.add_argument("--models", nargs="+", default=["retina-vessels", "drive-vessels"])
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument(
        "--jpeg", type=int, default=None, metavar="QUALITY", help="re-save every photograph as a JPEG first"
    )
    args = parser.parse_args(argv)
    if not (DATA / "DRIVE").is_dir():
        print(f"fundus data not found at {DATA}; nothing to measure")
        return 0
    from napari_r2au.model_files import load_model
    from napari_r2au.training.evaluate import evaluate_folders

    split = held_out()
    work = Path(tempfile.mkdtemp(prefix="r2au-cross-"))
    try:
        folders = {name: _link(triples, work / name, args.jpeg) for name, triples in split.items()}
        rows = []
        for model_name in args.models:
            model = load_model(model_name)
            cells = []
            for name, dirs in folders.items():
                started = time.perf_counter()
                report = evaluate_folders(model, *dirs)
                scales = sorted({row["scale"] for row in report["per_image"]})
                cells.append((report["f1"], report["auc_roc"], scales))
                print(
                    f"{model.name} {name}: F1 {report['f1']:.4f} AUC {report['auc_roc']:.4f} "
                    f"scales {scales} ({time.perf_counter() - started:.0f} s)",
                    flush=True,
                )
            rows.append((model_name if Path(model_name).suffix == ".json" else model.name, model, cells))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = _table(rows, split)
    print(text)
    if args.markdown:
        jpeg = f" --jpeg {args.jpeg}" if args.jpeg is not None else ""
        marker = "cross-dataset" + (f"-jpeg{args.jpeg}" if args.jpeg is not None else "")
        write_between_markers(
            args.markdown,
            f"Command: `python -m benchmarks.cross_dataset --models {' '.join(args.models)}{jpeg}`\n\n{text}\n",
            f"<!-- {marker} -->",
            f"<!-- /{marker} -->",
        )
    return 0


def _table(rows, split) -> str:
    names = list(split)
    head = (
        "| model | "
        + " | ".join(f"{name} ({len(split[name])}) F1 / AUC-ROC" for name in names)
        + " | mean F1 |"
    )
    lines = [head, "|---|" + "---|" * (len(names) + 1)]
    for label, model, cells in rows:
        mean = float(np.mean([f1 for f1, _, _ in cells]))
        lines.append(
            f"| {label} (threshold {model.threshold:g}) | "
            + " | ".join(f"{f1:.4f} / {auc:.4f}" for f1, auc, _ in cells)
            + f" | {mean:.4f} |"
        )
    images = "; ".join(f"{name}: {', '.join(t[0].name for t in split[name])}" for name in names)
    return "\n".join(lines) + f"\n\nHeld-out images (never trained on): {images}."


if __name__ == "__main__":
    sys.exit(main())
