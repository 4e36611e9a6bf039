"""Reading and writing images and small files, atomically and with clear errors."""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import numpy as np

#: what fundus cameras and the public sets write: STARE is PPM, CHASE_DB1 and HRF JPEG
IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".gif", ".bmp", ".ppm", ".pgm", ".pnm")
#: file-name endings that mark a mask: DRIVE's 21_manual1.gif, 21_training_mask.gif, case_seg.png,
#: CHASE_DB1's Image_01L_1stHO.png (first human observer); STARE's im0001.ah.ppm pairs by its stem
MASK_ROLES = r"mask|manual\d*|seg|segmentation|label|labels|gt|\d(st|nd|rd|th)ho"
_MASK_NAME = re.compile(rf"_({MASK_ROLES})$", re.IGNORECASE)
#: folders of masks: masks/, labels/, DRIVE's 1st_manual/ and mask/, HRF's manual1/, STARE's
#: labels-ah/ (one folder per observer), CHASE_DB1's 1stHO/
_MASK_FOLDER = re.compile(rf"(\d+(st|nd|rd|th)_)?({MASK_ROLES})s?(-\w+)?", re.IGNORECASE)
#: role suffixes a file name may carry on top of the id it pairs by (DRIVE's 21_training)
_ROLE_SUFFIX = re.compile(rf"(_({MASK_ROLES}|training|test))$", re.IGNORECASE)
#: a mask has a few values (0/255, or some classes); more means a picture
MAX_MASK_VALUES = 16


def looks_like_mask(path: str | os.PathLike, data: np.ndarray) -> bool:
    """A file named like a mask (or in a folder named so) whose pixels are a few integer
    values on one channel, so that it opens as a Labels layer (a reference to compare with,
    a mask to correct)."""
    path = Path(path)
    named = _MASK_NAME.search(path.name.split(".")[0]) or _MASK_FOLDER.fullmatch(path.parent.name)
    if not named or data.dtype.kind not in "biu" or data.ndim not in (2, 3):
        return False
    if data.ndim == 3 and data.shape[-1] in (3, 4):  # colour: not a label image
        return False
    if data.dtype.itemsize == 1:  # counting 256 bins is far quicker than sorting a stack
        return (
            int(np.count_nonzero(np.bincount(data.reshape(-1).view(np.uint8), minlength=256)))
            <= MAX_MASK_VALUES
        )
    sample = data.reshape(-1)[:: max(1, data.size // 1_000_000)]  # a picture shows itself in a sample
    return len(np.unique(sample)) <= MAX_MASK_VALUES and len(np.unique(data)) <= MAX_MASK_VALUES


def pixel_size_of(
    scale: tuple | list | None,
    units: tuple | list | None,
    what: str = "the image",
) -> tuple[float | None, str | None]:
    """In-plane pixel size and unit from per-axis scale and units (a napari layer's, or
    what the reader found in a DICOM/NIfTI file).

    A physical unit, or a scale other than 1 in Y/X, gives a pixel size; the default
    (scale 1, unit "pixel" or none) gives none. A scale without a unit is taken in the
    model's unit. Anisotropic Y/X pixels give their geometric mean (the engine resizes
    both axes by one factor).
    """
    if not scale:
        return None, None
    y_size, x_size = (abs(float(v)) for v in tuple(scale)[-2:])  # a flipped axis has a negative scale
    names = [str(u) for u in tuple(units or ())[-2:]]
    if len(set(names)) > 1:
        raise ValueError(
            f"{what} has different units for Y and X ({names[0]}, {names[1]}); give both axes the same unit"
        )
    unit = names[-1] if names else None
    if unit in ("pixel", "px", "dimensionless", ""):
        unit = None
    if unit is None and abs(y_size - 1.0) < 1e-9 and abs(x_size - 1.0) < 1e-9:
        return None, None
    return (y_size * x_size) ** 0.5, unit


class MissingExtraError(ImportError):
    """An optional dependency for a file type is not installed; the message says how to get it."""


def missing_extra(what: str, package: str, extra: str) -> MissingExtraError:
    """The error for a file type whose extra is not installed (what to install, in one line)."""
    message = f"{what} needs {package}: install napari-r2au[{extra}] (pip install 'napari-r2au[{extra}]')"
    return MissingExtraError(message)


class ImageReadError(OSError):
    """A file could not be read as an image; the message says which and why."""


#: the most values (pixels x channels x slices) a file may declare before it is decoded;
#: R2AU_MAX_PIXELS overrides it (README, "Limits")
DEFAULT_MAX_PIXELS = 2**30


def max_pixels() -> int:
    """The limit on the values one image file may hold (read at each call: env-overridable)."""
    text = os.environ.get("R2AU_MAX_PIXELS", "")
    try:
        return int(float(text)) if text.strip() else DEFAULT_MAX_PIXELS
    except ValueError:
        raise ValueError(f"R2AU_MAX_PIXELS must be a number of pixels, got {text!r}") from None


def check_size(path: str | os.PathLike, shape: tuple[int, ...]) -> None:
    """Refuse a file whose header declares more values than :func:`max_pixels`, before
    anything is allocated (a 2.6 MB TIFF can declare 50000 x 50000 pixels)."""
    count = int(np.prod([int(n) for n in shape], dtype=object)) if shape else 0
    limit = max_pixels()
    if count > limit:
        raise ImageReadError(
            f"{path}: declares {' x '.join(str(int(n)) for n in shape)} = {count:,} values, more "
            f"than the limit of {limit:,}; set R2AU_MAX_PIXELS to read it anyway"
        )


def _normal_permissions(path: Path) -> None:
    """mkstemp creates 0600; give the file the permissions a plain open() would."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it into place only on success.

    A crash or an error mid-write leaves the previous file intact.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        _normal_permissions(Path(tmp))
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_bytes_new(path: str | os.PathLike, data: bytes) -> None:
    """Create ``path`` with ``data``, whole or not at all, only if nothing is there yet
    (not even a symlink): FileExistsError otherwise. Two writers racing for one name
    cannot both win, and the loser changes nothing.

    The complete file is hard-linked into place (atomic and exclusive); where the file
    system has no hard links, the name is claimed with O_EXCL and then replaced.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        _normal_permissions(tmp)
        try:
            os.link(tmp, target)
        except FileExistsError:
            raise
        except OSError:  # no hard links on this file system (FAT, some network shares)
            os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def open_for_append(path: str | os.PathLike) -> IO[str]:
    """Open an existing text file to add lines to (a run's log.csv), refusing a symbolic
    link there: a link planted at the path would send the writes to another file."""
    path = Path(path)
    if path.is_symlink():
        raise OSError(f"{path} is a symbolic link; refusing to write through it (remove the link)")
    # O_NOFOLLOW: a link planted since the check fails with ELOOP instead of being followed
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0))
    return os.fdopen(fd, "a", newline="")


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read a TIFF/PNG/JPEG/GIF/BMP image as a NumPy array (GIF: first frame)."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise ImageReadError(f"{path}: the file is empty (0 bytes): an interrupted copy or download?")
    suffix = path.suffix.lower()
    try:
        if suffix in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tiff:
                if not tiff.series:
                    raise ValueError("no image in the file")
                check_size(path, tiff.series[0].shape)  # from the page headers: nothing decoded yet
                return np.asarray(tiff.series[0].asarray())
        import imageio.v3 as iio

        image = np.asarray(iio.imread(path, index=0) if suffix == ".gif" else iio.imread(path))
    except ImageReadError:
        raise
    except Exception as exc:  # every reader raises its own types
        if "Could not find a backend" in str(exc):  # imageio's advice to install plugins misleads here
            raise ImageReadError(
                f"{path}: cannot read as an image (corrupt, truncated, or not really {suffix or 'an image'})"
            ) from exc
        raise ImageReadError(f"{path}: cannot read as an image ({type(exc).__name__}: {exc})") from exc
    if image.size == 0:
        raise ImageReadError(f"{path}: the image is empty")
    return image


def write_tiff(path: str | os.PathLike, array: np.ndarray, **kwargs) -> None:
    """Write a TIFF atomically (zlib-compressed)."""
    import tifffile

    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, array, compression="zlib", **kwargs)


def write_png(path: str | os.PathLike, array: np.ndarray) -> None:
    import imageio.v3 as iio

    with atomic_path(path) as tmp:
        iio.imwrite(tmp, array, extension=".png")


def find_images(folder: str | os.PathLike) -> list[Path]:
    """Image files in a folder (not recursive), sorted by name."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def pairing_id(path: str | os.PathLike) -> str:
    """The id that pairs an image with its masks (``r2au evaluate``, training folders, the
    worklist): the file stem without role suffixes. DRIVE: 21_training / 21_manual1 /
    21_training_mask -> 21; HRF: 01_dr / 01_dr_mask -> 01_dr; STARE: im0001.ah -> im0001."""
    stem = Path(path).name.split(".")[0]
    while (stripped := _ROLE_SUFFIX.sub("", stem)) != stem and stripped:
        stem = stripped
    return stem


def named_like_mask(path: str | os.PathLike) -> bool:
    """A file whose name marks it as a mask (``_manual1``, ``_mask``, ``_seg``...), by name alone."""
    return bool(_MASK_NAME.search(Path(path).name.split(".")[0]))


def mask_folder_name(name: str) -> bool:
    """A folder name that marks masks: masks/, labels/, 1st_manual/, manual1/, labels-ah/, 1stHO/."""
    return bool(_MASK_FOLDER.fullmatch(name))
