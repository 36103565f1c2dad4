"""The samples file: what `ldm sample` and `ldm run` write and `ldm evaluate` reads.

An .npz holding `images` uint8 (N, H, H) or (N, H, H, 3), optional `labels` (N,) int, and, for
diffusion sets, how they were made as 0-d arrays: `sampler`, `nfe`, `guidance` (labelled sets)
and `autoguidance`; beside it a .png grid of the first 72 images. Its dtypes and shapes are
checked from the .npy headers before anything is loaded. `load_samples` also reads a folder of
images or a .zip of them (image_files.py).
"""

from __future__ import annotations

import stat
import zipfile
from pathlib import Path

import numpy as np

from ..data.images import DROP_CHANNEL, TO_UINT8
from ..errors import DataError, LdmError
from ..files import BAD_NPZ, npz_headers, write_npz
from ..schema import MAX_SAMPLES
from .image_files import load_image_zip, load_png_folder
from .plots import save_grid

KEYS = frozenset({"images", "labels", "sampler", "nfe", "guidance", "autoguidance"})


def save_samples(path: Path, images: np.ndarray, labels: np.ndarray | None = None,
                 **made: str | int | float) -> None:
    """The samples file (`made`: how, e.g. the `sampler` and its `nfe`) and its .png grid;
    LdmError saying which of the two was not written."""
    arrays = {"images": images} if labels is None else {"images": images, "labels": labels}
    write_npz(path, **arrays, **{k: np.asarray(v) for k, v in made.items()})
    try:
        save_grid(images, path.with_suffix(".png"))
    except LdmError as err:  # its "nothing was replaced" is about the grid alone
        raise LdmError(f"{path} was written, but its grid was not ({err})") from None


def is_samples_file(path: Path) -> bool:
    """Whether `path` is a regular file that reads as a samples file (no array beyond KEYS)."""
    try:
        return path.is_file() and set(npz_headers(path)) <= KEYS
    except (OSError, ValueError, DataError, *BAD_NPZ):
        return False


def _not_npz(path: Path) -> DataError:
    """Why a file that is not a zip archive is no samples file."""
    with open(path, "rb") as f:  # FileNotFoundError: load_samples says so in its own line
        magic = f.read(6)
    if magic == b"\x93NUMPY":
        return DataError(f"{path} is a single .npy array; save samples with "
                         "np.savez(path, images=...)")
    return DataError(f"{path} is not a readable .npz samples file (not a zip archive)")


def _check_samples(path: Path, arrays: dict[str, tuple[tuple[int, ...], np.dtype]]) -> None:
    """The declared dtypes and shapes of a samples file, before anything is loaded."""
    if "images" not in arrays:
        raise DataError(f"{path}: no 'images' array (found: {', '.join(arrays)})")
    shape, dtype = arrays["images"]
    if dtype != np.uint8:
        raise DataError(f"{path}: images must be uint8 in 0..255, got {dtype} ({TO_UINT8})")
    square = len(shape) in (3, 4) and shape[1] == shape[2] and shape[3:] in ((), (3,))
    if not square or shape[0] == 0:
        hint = f" ({DROP_CHANNEL})" if shape[3:] == (1,) else ""
        raise DataError(f"{path}: images must have shape (N, H, H) or (N, H, H, 3) with N > 0, "
                        f"got {shape}{hint}")
    if shape[0] > MAX_SAMPLES:
        raise DataError(f"{path}: {shape[0]} images, more than the {MAX_SAMPLES} one "
                        "evaluation holds in memory; score a subset")
    if "labels" in arrays:
        labels_shape, labels_dtype = arrays["labels"]
        if labels_shape != shape[:1] or labels_dtype.kind not in "iu":
            raise DataError(f"{path}: labels must be integers of shape ({shape[0]},), got "
                            f"{labels_dtype} {labels_shape}")


def load_samples(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Read a samples .npz, a folder of images or a .zip of images: `images` uint8 (N, H, H)
    or (N, H, H, 3), optional `labels` (N,) (checked against the classes when scored)."""
    path = Path(path)
    if path.is_dir():
        return load_png_folder(path)
    if path.suffix.lower() == ".zip":
        return load_image_zip(path)
    if path.exists() and not stat.S_ISREG(path.stat().st_mode):  # /dev/zero, a pipe: never read
        raise DataError(f"{path} is not a regular file (a device or pipe); pass a .npz "
                        "samples file, a folder of images or a .zip of them")
    try:
        if not zipfile.is_zipfile(path):
            raise _not_npz(path)
        arrays = npz_headers(path)
        _check_samples(path, arrays)
        with np.load(path, allow_pickle=False) as f:
            images = f["images"]
            labels = f["labels"] if "labels" in arrays else None
    except FileNotFoundError:
        raise DataError(f"samples file {path} does not exist") from None
    except (OSError, ValueError, *BAD_NPZ) as err:
        raise DataError(f"{path} is not a readable .npz samples file ({err})") from None
    if labels is not None:
        if labels.min() < 0:
            raise DataError(f"{path}: labels must be >= 0, found {labels.min()}")
        labels = labels.astype(np.int64)
    return images, labels

