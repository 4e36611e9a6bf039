"""Do the bundled models' bioimage.io packages pass bioimageio.core's own test, offline?

``python -m benchmarks.bioimageio_core [--models ...] [--weights onnx torchscript] [--markdown FILE]``

Exports each model with ``r2au export --format bioimageio`` (a real image of what it segments
from ../shared/data as the test image, the plugin's photograph for the fundus models) and
runs ``bioimageio test PACKAGE --weight-format W`` on it: the package is loaded by the
reference implementation, the test input run through the declared preprocessing and the
weights, and compared with the test output.

bioimageio.core cannot live in the project's environment: its newest release (0.11.0) pins
bioimageio.spec 0.5.12, which fails with the pydantic napari's stack installs (2.14). So
it runs in an environment of its own (``--env``, made on first use from the package
registry: bioimageio.core 0.11.0, pydantic below 2.12, onnxruntime, as ``make bioimageio-core``
makes it for the tests, plus the CPU torch for TorchScript weights), as a user of another
tool would run it. Nothing is downloaded at
test time: the packages are local files.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import write_between_markers
from benchmarks.cross_dataset import DATA

#: what the environment is made of (why each pin: the module docstring)
CORE_REQUIREMENTS = ["bioimageio.core==0.11.0", "pydantic<2.12", "onnxruntime"]
TORCH_REQUIREMENT = "torch==2.13.0"  # the CPU build; an unpinned torch pulls the CUDA one
DEFAULT_ENV = (
    Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "napari-r2au" / "bioimageio-core"
)
#: a real image of what each bundled model segments (None: the plugin's fundus photograph)
SAMPLES = {
    "retina-vessels": None,
    "drive-vessels": None,
    "skin-lesions": "PH2/images/IMD002.png",
    "ph2-lesions": "PH2/images/IMD002.png",
    "em-membranes": "ISBI2012_EM/images/0.png",
    "ct-lungs": "LUNG_CT/2d_images",
}


def environment(env: Path, torchscript: bool) -> Path:
    """The bioimageio CLI of ``env``, made (or completed) with the pinned requirements."""
    python = env / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    wanted = CORE_REQUIREMENTS + ([TORCH_REQUIREMENT] if torchscript else [])
    print(f"{env}: {' '.join(wanted)}", file=sys.stderr)  # pip does nothing when they are there
    subprocess.run([str(python), "-m", "pip", "install", "-q", *wanted], check=True)
    return env / "bin" / "bioimageio"


def sample_for(name: str) -> Path | None:
    relative = SAMPLES.get(name)
    if relative is None:
        return None
    path = DATA / relative
    if path.is_dir():
        path = sorted(path.iterdir())[0]
    if not path.exists():
        raise SystemExit(f"{path} is not here (the shared data folder; set R2AU_DATA)")
    return path


def run(models: list[str], weights: list[str], env: Path) -> list[dict[str, str]]:
    from napari_r2au.cli import main as r2au

    cli = environment(env, "torchscript" in weights)
    rows = []
    with tempfile.TemporaryDirectory(prefix="r2au-bioimageio-core-") as tmp:
        for name in models:
            package = Path(tmp) / f"{name}.zip"
            sample = sample_for(name)
            args = ["export", name, "--format", "bioimageio", "-o", str(package)]
            if r2au(args + (["--sample", str(sample)] if sample else [])) != 0:
                rows.append({"model": name, "weights": "-", "result": "export failed", "seconds": "-"})
                continue
            for fmt in weights:
                start = time.perf_counter()
                done = subprocess.run(
                    [str(cli), "test", str(package), "--weight-format", fmt],
                    capture_output=True,
                    text=True,
                    cwd=tmp,
                    env={**os.environ, "BIOIMAGEIO_CACHE_PATH": str(Path(tmp) / "cache")},
                )
                result = "passed" if done.returncode == 0 else "FAILED"
                if done.returncode != 0:
                    print(done.stdout[-3000:], done.stderr[-3000:], sep="\n", file=sys.stderr)
                rows.append(
                    {
                        "model": name,
                        "weights": fmt,
                        "result": result,
                        "seconds": f"{time.perf_counter() - start:.0f}",
                        "sample": sample.name if sample else "the plugin's fundus photograph",
                    }
                )
                print(f"{name} {fmt}: {result}", file=sys.stderr)
    return rows


def table(rows: list[dict[str, str]], command: str) -> str:
    lines = [
        f"Command: `{command}` (bioimageio.core 0.11.0, in its own environment)",
        "",
        "| model | test image | weights | `bioimageio test` | seconds |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        sample = row.get("sample", "-")
        lines.append(f"| {row['model']} | {sample} | {row['weights']} | {row['result']} | {row['seconds']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bioimageio_core", description=__doc__)
    parser.add_argument(
        "--models", nargs="+", default=["retina-vessels", "skin-lesions", "em-membranes", "ct-lungs"]
    )
    parser.add_argument(
        "--weights", nargs="+", default=["onnx", "torchscript"], choices=["onnx", "torchscript"]
    )
    parser.add_argument("--env", type=Path, default=DEFAULT_ENV, help="the bioimageio.core environment")
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args(argv)
    rows = run(args.models, args.weights, args.env)
    command = "python -m benchmarks.bioimageio_core " + " ".join(
        ["--models", *args.models, "--weights", *args.weights]
    )
    text = table(rows, command)
    print(text)
    if args.markdown:
        write_between_markers(args.markdown, text, "<!-- bioimageio-core -->", "<!-- /bioimageio-core -->")
    return 0 if all(row["result"] == "passed" for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
