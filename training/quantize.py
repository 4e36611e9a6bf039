"""``r2au quantize``: an int8 network for the OpenVINO backend, kept only if it is as accurate.

Post-training quantization (NNCF) of the network the OpenVINO backend already runs,
calibrated on the engine's own inputs for the given images (normalized, at each image's
working scale, tiled and padded exactly as a run does), with every layer's weights kept to
7 bits (:data:`napari_r2au.int8.OVERFLOW_FIX`: the same results on CPUs with and without
VNNI), then gated: the int8 network, read back from the files it will be run from, is
scored through ``r2au evaluate``'s path on the same images and masks, and accepted only if
its pooled F1 is within :data:`napari_r2au.int8.GATE` of exact fp32 and no image's F1
within :data:`napari_r2au.int8.GATE_PER_IMAGE`. The verdict is recorded either way
(:mod:`napari_r2au.int8`); ``backend="auto"`` runs an accepted int8 network from then on.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Generator
from pathlib import Path
from typing import Any

from napari_r2au.int8 import OVERFLOW_FIX, int8_dir, new_record, save_int8, with_suffix
from napari_r2au.model_files import load_model

from .evaluate import evaluate_folders


def worst_image_loss(exact: list[dict[str, Any]], candidate: list[dict[str, Any]]) -> float:
    """The most F1 the candidate gives up on any one image (0 if it loses none). An image
    whose F1 is undefined on either side (no vessel in the reference or the mask) is left
    out: NaN would make the verdict depend on the images' order."""
    before = {row["image"]: row["f1"] for row in exact}
    losses = [
        before[row["image"]] - row["f1"]
        for row in candidate
        if math.isfinite(before.get(row["image"], math.nan)) and math.isfinite(row["f1"])
    ]
    return max([0.0, *losses])


#: calibration tiles at most (NNCF's statistics settle long before; each whole photograph is one)
MAX_TILES = 300


def iter_quantize(
    model: Any,
    images: str | Path,
    masks: str | Path,
    fov: str | Path | None = None,
    *,
    dest: str | Path | None = None,
    max_tiles: int = MAX_TILES,
    class_map: dict[int, int] | None = None,
) -> Generator[str, None, dict[str, Any]]:
    """Yields a line per stage; returns the record written (``accepted`` says the verdict).

    ``dest``: a folder to write ``NAME.{xml,bin,json}`` into (``bundled_models/int8`` is how
    a bundled model's int8 network is made); by default the user's int8 folder, where the
    backend finds it. ``class_map``: mask values to classes, for masks that are not 0/1 or
    0/255 foreground (ISBI 2012's labels mark membrane 0), as ``r2au evaluate`` takes it.
    """
    from napari_r2au.backends import (
        BackendError,
        forget_int8,
        int8_key,
        openvino_available,
        openvino_model,
        recording_inputs,
        trying_int8,
    )

    loaded = load_model(model) if not hasattr(model, "network") else model
    if not openvino_available():
        raise BackendError("quantize: OpenVINO is not installed (pip install 'napari-r2au[fast]')")
    try:
        import nncf
        import openvino as ov
    except ImportError:
        from napari_r2au.io import missing_extra

        raise missing_extra("quantizing a model to int8", "nncf", "fast") from None

    def score(precision: str) -> dict[str, Any]:
        """F1 on the images and masks (per image too) at ``precision`` on OpenVINO."""
        return evaluate_folders(
            loaded,
            images,
            masks,
            fov,
            device="cpu",
            backend="openvino",
            precision=precision,
            class_map=class_map,
        )

    yield f"{loaded.name}: exact fp32 on the images, recording the network's inputs"
    with recording_inputs(max_tiles) as tiles:
        reference = score("fp32")
    if not tiles:
        raise ValueError(f"{images}: no image paired with a mask, nothing to calibrate on")
    yield f"quantizing on {len(tiles)} tile(s) from {reference['n_images']} image(s) (NNCF)"
    try:
        quantized = nncf.quantize(
            openvino_model(loaded),
            nncf.Dataset(tiles),
            subset_size=len(tiles),
            preset=nncf.QuantizationPreset.PERFORMANCE,
            advanced_parameters=nncf.AdvancedQuantizationParameters(
                overflow_fix=nncf.OverflowFix(OVERFLOW_FIX)
            ),
        )
    except Exception as exc:  # NNCF's and OpenVINO's own errors: one line, nothing written
        raise BackendError(
            f"quantize: NNCF could not quantize {loaded.name} ({type(exc).__name__}: {exc})"
        ) from exc
    stem = (Path(dest) / loaded.name) if dest is not None else int8_dir() / int8_key(loaded)
    stem.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".r2au-int8-", dir=stem.parent) as work:
        xml = Path(work) / "network.xml"
        try:
            ov.save_model(quantized, str(xml), compress_to_fp16=False)
        except RuntimeError as exc:
            raise BackendError(f"quantize: the int8 network could not be written ({exc})") from exc
        bin_ = xml.with_suffix(".bin")
        yield "int8 on the same images (the accuracy gate)"
        with trying_int8(loaded, ov.Core().read_model(str(xml), str(bin_))):  # the files it will run from
            candidate = score("int8")
        record = new_record(
            loaded,
            int8_key(loaded),
            reference["f1"],
            candidate["f1"],
            reference["n_images"],
            len(tiles),
            worst_image_loss=worst_image_loss(reference["per_image"], candidate["per_image"]),
            overflow_fix=OVERFLOW_FIX,
            class_map=class_map,
        )
        save_int8(stem, record, xml, bin_)
    forget_int8(loaded)
    verdict = "accepted" if record["accepted"] else "refused (auto keeps fp32/bf16)"
    yield (
        f"int8 {verdict}: F1 {record['f1_int8']:.4f} against {record['f1_fp32']:.4f} at fp32 "
        f"(gate {record['gate']:g}), worst image {-record['worst_image_f1_loss']:+.4f} "
        f"(gate {record['gate_per_image']:g}); {with_suffix(stem, '.json')}"
    )
    return record
