"""Samples as image files: a folder of one PNG per sample (`000000.png`, ...) with a
`samples.json` that holds what a samples .npz holds besides the images (the labels, the sampler,
its NFE, the guidance scales), and the reading of such a folder, or of a .zip of images.

PNG is lossless, so a folder scores exactly as the .npz of the same images. Nothing is resized:
every image must have the size and mode of the first. Sizes, modes and counts are read from the
image headers, and a zip's entries from its directory, and bounded before any pixel is decoded.
"""

from __future__ import annotations

import io
import json
import os
import re
import stat
import zipfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import DataError
from ..files import MAX_DECODED_BYTES, MAX_JSON_BYTES, atomic_write, load_small_json, strict_json
from ..schema import MAX_SAMPLES

METADATA = "samples.json"
FORMAT = "latentdiffusion-samples"
_INDEXED = re.compile(r"\d{6,}\.png")  # what `save_png_folder` names its images
_TEMP = re.compile(r"\.(\d{6,}\.png|samples\.json)\.tmp-\d+")  # files.atomic_write's
_MODES = {"L": 1, "RGB": 3}  # the images a samples set holds: grayscale or RGB, 8 bits


def image_name(index: int) -> str:
    return f"{index:06d}.png"


def save_png_folder(folder: Path, images: np.ndarray, labels: np.ndarray | None = None,
                    **made: str | int | float) -> None:
    """One PNG per image (`000000.png`, ...) and samples.json; each file written atomically,
    and the images of an earlier, larger set in the folder removed."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="png")
        atomic_write(folder / image_name(i), buffer.getvalue())
    meta = {"format": FORMAT, "n": len(images), **made,
            "labels": None if labels is None else [int(y) for y in labels]}
    atomic_write(folder / METADATA, (strict_json(meta, indent=1) + "\n").encode())
    for stale in folder.iterdir():
        if _INDEXED.fullmatch(stale.name) and int(stale.stem) >= len(images):
            stale.unlink()


def is_png_folder(folder: Path) -> bool:
    """Whether `folder` is empty or holds only what `save_png_folder` writes (and the temp
    files of its atomic writes), so that a new set may replace it."""
    if not folder.is_dir() or folder.is_symlink():
        return False
    names = os.listdir(folder)
    ours = [n for n in names if _INDEXED.fullmatch(n) or n == METADATA or _TEMP.fullmatch(n)]
    if len(ours) != len(names):
        return False
    if METADATA not in names:
        return True
    try:
        meta = load_small_json(folder / METADATA)
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT


# ---------------------------------------------------------------- reading


def _metadata(where: str, data: bytes, n: int) -> np.ndarray | None:
    """The labels of samples.json (`data`), checked against the `n` images."""
    try:
        meta = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise DataError(f"{where} is not valid JSON") from None
    labels = meta.get("labels") if isinstance(meta, dict) else None
    if labels is None:
        return None
    if not (isinstance(labels, list) and len(labels) == n
            and all(type(y) is int and y >= 0 for y in labels)):
        raise DataError(f"{where}: labels must be a list of {n} integers >= 0, one per image")
    return np.asarray(labels, dtype=np.int64)


def _decode(name: str, opened: Image.Image, first: tuple[tuple[int, int], str] | None,
            where: str) -> tuple[tuple[int, int], str]:
    """The size and mode of an opened image, checked against the first's (DataError)."""
    size, mode = opened.size, opened.mode
    if mode not in _MODES:
        raise DataError(f"{where}: {name} is a {mode} image; samples are 8-bit grayscale (L) "
                        "or RGB images (nothing is converted)")
    if size[0] != size[1]:
        raise DataError(f"{where}: {name} is {size[0]}x{size[1]}; samples are square")
    if first is not None and (size, mode) != first:
        raise DataError(f"{where}: mixed images: {name} is {size[0]}x{size[1]} {mode}, the "
                        f"first is {first[0][0]}x{first[0][1]} {first[1]} (nothing is resized)")
    return size, mode


def _read_images(where: str, names: list[str], read: Callable[[str], bytes]
                 ) -> np.ndarray:
    """uint8 (N, H, H) or (N, H, H, 3) of the images `names` (in that order), each read
    as bytes by `read`; headers first, pixels once every header fits."""
    if not names:
        raise DataError(f"{where} holds no images")
    if len(names) > MAX_SAMPLES:
        raise DataError(f"{where}: {len(names)} images, more than the {MAX_SAMPLES} one "
                        "evaluation holds in memory; score a subset")
    opened: list[Image.Image] = []
    first = None
    for name in names:
        try:
            image = Image.open(io.BytesIO(read(name)))
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
            raise DataError(f"{where}: {name} is not an image PIL can read") from None
        first = _decode(name, image, first, where)
        opened.append(image)
        (size, _), mode = first
        if len(opened) * size * size * _MODES[mode] > MAX_DECODED_BYTES:
            raise DataError(f"{where}: its images take more than the {MAX_DECODED_BYTES:,} "
                            "bytes one set may hold here once decoded; use a subset")
    try:
        return np.stack([np.asarray(image, dtype=np.uint8) for image in opened])
    except (OSError, ValueError, SyntaxError) as err:
        raise DataError(f"{where}: an image is truncated or corrupt ({err})") from None


def load_png_folder(folder: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """The images of a folder (every file but samples.json and hidden ones, in name order)
    and the labels of its samples.json, if any."""
    where = str(folder)
    names = sorted(n for n in os.listdir(folder) if not n.startswith(".") and n != METADATA)
    for name in names:
        info = os.lstat(folder / name)
        if not stat.S_ISREG(info.st_mode):
            raise DataError(f"{where}: {name} is not a regular file (a folder, link, device or "
                            "pipe); a samples folder holds only images and samples.json")
    if len(names) <= MAX_SAMPLES:
        declared = sum(os.lstat(folder / name).st_size for name in names)
        if declared > MAX_DECODED_BYTES:
            raise DataError(f"{where}: its files take {declared:,} bytes, more than the "
                            f"{MAX_DECODED_BYTES:,} one set may hold here; use a subset")
    images = _read_images(where, names, lambda name: (folder / name).read_bytes())
    meta = folder / METADATA
    if not meta.exists():
        return images, None
    try:
        with open(meta, "rb") as f:
            data = f.read(MAX_JSON_BYTES + 1)
    except OSError as err:
        raise DataError(f"cannot read {meta}: {err.strerror}") from None
    return images, _metadata(str(meta), data, len(images))


def _safe_member(where: str, name: str) -> bool:
    """Whether a zip entry is a file inside the archive's folder (DataError for a path that
    leaves it); False for folders and hidden files."""
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or re.match(r"[A-Za-z]:", name):
        raise DataError(f"{where}: entry {name!r} points outside the archive; refused")
    return not name.endswith("/") and not any(p.startswith(".") or p == "__MACOSX"
                                              for p in path.parts)


def load_image_zip(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """The images of a .zip (every file but samples.json, in name order, any folder inside)
    and the labels of its samples.json, bounded by the sizes its directory declares."""
    where = str(path)
    try:
        with zipfile.ZipFile(path) as archive:
            members = [m for m in archive.infolist() if _safe_member(where, m.filename)]
            if len(members) > MAX_SAMPLES + 1:
                raise DataError(f"{where}: {len(members)} entries, more than the {MAX_SAMPLES} "
                                "images one evaluation holds in memory; score a subset")
            declared = sum(m.file_size for m in members)
            if declared > MAX_DECODED_BYTES:
                raise DataError(f"{where}: its entries take {declared:,} bytes once "
                                f"decompressed, more than the {MAX_DECODED_BYTES:,} one set "
                                "may hold here; use a subset")
            by_name = {m.filename: m for m in members}
            meta = [n for n in by_name if PurePosixPath(n).name == METADATA]
            names = sorted(n for n in by_name if n not in meta)
            images = _read_images(where, names, lambda n: archive.read(by_name[n]))
            if len(meta) > 1:
                raise DataError(f"{where}: more than one {METADATA}")
            labels = (_metadata(f"{where}:{meta[0]}", archive.read(by_name[meta[0]]),
                                len(images)) if meta else None)
    except FileNotFoundError:
        raise DataError(f"samples file {path} does not exist") from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, RuntimeError,
            NotImplementedError) as err:
        raise DataError(f"{where} is not a readable .zip of images ({err})") from None
    return images, labels
