"""int8 for the default model: ``python -m benchmarks.int8 [--dest DIR] [--markdown FILE]``.

Quantizes ``retina-vessels`` with ``r2au quantize``'s code (``iter_quantize``) on its own
validation split (the images its config holds out of each of the four fundus sets, as
:mod:`benchmarks.cross_dataset` draws them), which is also the accuracy gate's set. Then,
in the same process: F1 per source inside the field of view at OpenVINO fp32, bf16 and
int8 (and torch bf16, the path without OpenVINO; on a CPU without native bf16, torch and
OpenVINO fp32 and int8, in a table of its own), and the time of ``predict`` on a DRIVE
photograph (best of ``--repeat``), with the machine's matmul peaks. ``--dest
napari_r2au/bundled_models/int8`` writes the int8 network that ships with the model. Run it
single-threaded (``OMP_NUM_THREADS=1``); only ratios within one run are meant to be compared.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks import write_between_markers

BEGIN, END = "<!-- int8 -->", "<!-- /int8 -->"
CONFIGS = [("torch", "bf16"), ("openvino", "fp32"), ("openvino", "bf16"), ("openvino", "int8")]
#: a CPU without native bf16 (most laptops): the float path there is fp32, and bf16 would be
#: emulated (far slower than fp32), so its rows are left out; its table has markers of its own
BEGIN_NO_BF16, END_NO_BF16 = "<!-- int8-no-bf16 -->", "<!-- /int8-no-bf16 -->"
CONFIGS_NO_BF16 = [("torch", "fp32"), ("openvino", "fp32"), ("openvino", "int8")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.int8", description=__doc__)
    parser.add_argument("--model", default="retina-vessels")
    parser.add_argument(
        "--dest", type=Path, default=None, help="keep NAME.xml/.bin/.json here (else a temporary folder)"
    )
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args(argv)

    from benchmarks.cross_dataset import DATA, _link, held_out

    if not (DATA / "DRIVE").is_dir():
        print(f"fundus data not found at {DATA}; nothing to measure")
        return 0
    import openvino
    import torch

    from benchmarks.backends import best_of, peaks_text
    from napari_r2au import backends, load_model, predict
    from napari_r2au.device import cpu_has_bf16
    from napari_r2au.engine import run
    from napari_r2au.int8 import with_suffix
    from napari_r2au.io import read_image
    from napari_r2au.training.evaluate import evaluate_folders
    from napari_r2au.training.quantize import iter_quantize

    split = held_out()
    work = Path(tempfile.mkdtemp(prefix="r2au-int8-"))
    try:
        every = _link([t for triples in split.values() for t in triples], work / "all")
        sources = {name: _link(triples, work / name) for name, triples in split.items()}
        model = load_model(args.model)
        made = args.dest or work / "made"
        record = run(iter_quantize(model, *every, dest=made))
        for line in (f"gate: {record}",):
            print(line, flush=True)
        home = work / "home"  # the int8 network where the backend looks for it, for this process
        os.environ["R2AU_HOME"] = str(home)
        if record["accepted"] and args.dest is None:
            stem = home / "int8" / backends.int8_key(model)
            stem.parent.mkdir(parents=True)
            for suffix in (".xml", ".bin", ".json"):
                shutil.copy(with_suffix(made / model.name, suffix), with_suffix(stem, suffix))
        backends.clear_cache()
        image = np.asarray(read_image(split["DRIVE"][0][0]))
        machine = (
            f"{os.cpu_count()} cores, torch {torch.__version__}, openvino {openvino.__version__}, "
            f"{torch.get_num_threads()} thread(s); {peaks_text()}"
        )
        print(machine, flush=True)
        rows = []
        configs = CONFIGS if cpu_has_bf16() else CONFIGS_NO_BF16
        configs = configs if record["accepted"] else configs[:-1]
        for backend, precision in configs:
            seconds = best_of(
                lambda b=backend, p=precision: predict(model, image, device="cpu", backend=b, precision=p),
                args.repeat,
            )
            f1 = {
                name: evaluate_folders(model, *dirs, device="cpu", backend=backend, precision=precision)["f1"]
                for name, dirs in sources.items()
            }
            rows.append((f"{backend} {precision}", seconds, f1))
            print(rows[-1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    names = list(split)
    base = rows[0][1]
    lines = [
        f"| configuration | time (s) | x {rows[0][0]} | "
        + " | ".join(f"F1 {n} ({len(split[n])})" for n in names)
        + " | mean F1 |",
        "|---|---|---|" + "---|" * (len(names) + 1),
    ]
    for label, seconds, f1 in rows:
        lines.append(
            f"| {label} | {seconds:.3f} | {base / seconds:.2f} | "
            + " | ".join(f"{f1[n]:.4f}" for n in names)
            + f" | {np.mean(list(f1.values())):.4f} |"
        )
    verdict = "accepted" if record["accepted"] else "refused"
    text = (
        f"Machine: {machine}\n\nCommand: `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} "
        f"python -m benchmarks.int8`\n\n`{model.name}`'s int8 network, calibrated and gated on its "
        f"{record['images']} validation images ({record['calibration_tiles']} tiles): pooled F1 "
        f"{record['f1_int8']:.4f} against {record['f1_fp32']:.4f} at fp32, gate {record['gate']:g}; worst image "
        f"{-record['worst_image_f1_loss']:+.4f}, gate {record['gate_per_image']:g}: **{verdict}**. "
        f"Time: `predict` on `{split['DRIVE'][0][0].name}` ({image.shape[1]}x{image.shape[0]}), best of "
        f"{args.repeat}.\n\n" + "\n".join(lines) + "\n"
    )
    print(text)
    if args.markdown:
        markers = (BEGIN, END) if cpu_has_bf16() else (BEGIN_NO_BF16, END_NO_BF16)
        write_between_markers(args.markdown, text, *markers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
