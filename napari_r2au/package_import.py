"""Taking back a bioimage.io package that ``r2au export`` wrote: a safe unzip, and the
napari-r2au model file (JSON and safetensors) it carries. Nothing else in a package is
read, so no TorchScript or pickle from it ever runs. Kept apart from the writer
(:mod:`napari_r2au.bioimageio`) so that loading a model needs none of the export code.
"""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path

#: the key of this project's section in the rdf's ``config``
CONFIG_KEY = "napari_r2au"
#: import limits: a package is small (the bundled ones are about 10 MB)
MAX_MEMBERS = 64
MAX_UNPACKED = 512 * 2**20


def _safe_extract(package: Path, into: Path) -> Path:
    """Extract a zip without path traversal, links or a bomb; returns the folder."""
    with zipfile.ZipFile(package) as archive:
        members = archive.infolist()
        if len(members) > MAX_MEMBERS:
            raise ValueError(f"{package}: {len(members)} files, more than a package holds ({MAX_MEMBERS})")
        if sum(m.file_size for m in members) > MAX_UNPACKED:
            raise ValueError(f"{package}: unpacks to more than {MAX_UNPACKED // 2**20} MB")
        for member in members:
            name = member.filename
            if member.is_dir():
                continue
            if "/" in name or "\\" in name or name.startswith(".") or not name:
                raise ValueError(f"{package}: unexpected member {name!r} (a package is flat)")
            with archive.open(member) as source, open(into / name, "wb") as out:
                shutil.copyfileobj(source, out, 1 << 20)
                if out.tell() > member.file_size:
                    raise ValueError(f"{package}: {name} is larger than it says")
    return into


def import_package(package: str | os.PathLike, workdir: Path) -> Path:
    """The napari-r2au model JSON inside a package this project wrote (unpacked into
    ``workdir`` if a zip); refuses any other package with one line that says why."""
    import yaml

    package = Path(package)
    folder = _safe_extract(package, workdir) if package.is_file() else package
    rdf_file = folder / "rdf.yaml"
    if not rdf_file.is_file():
        raise ValueError(f"{package}: not a bioimage.io package (no rdf.yaml)")
    try:
        rdf = yaml.safe_load(rdf_file.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ValueError(f"{package}: rdf.yaml is not readable YAML ({exc})") from exc
    config = (rdf.get("config") or {}).get(CONFIG_KEY) if isinstance(rdf, dict) else None
    if not isinstance(config, dict) or not isinstance(config.get("model_json"), str):
        raise ValueError(
            f"{package}: not a package made by napari-r2au (no config.{CONFIG_KEY} in rdf.yaml); "
            "only such packages carry the model file napari-r2au loads without running code"
        )
    sidecar = folder / Path(config["model_json"]).name
    weights = (config.get("model") or {}).get("weights_file", "")
    if not str(weights).endswith(".safetensors"):
        raise ValueError(
            f"{package}: the carried model's weights are not safetensors; refused (never unpickled)"
        )
    if not sidecar.is_file():
        raise ValueError(f"{package}: the model file {sidecar.name} named in rdf.yaml is missing")
    return sidecar
