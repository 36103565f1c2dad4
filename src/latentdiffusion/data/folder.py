"""Image folders as data sets, in torchvision's ImageFolder layout.

`train/` and `test/` subfolders, or one pool of which a hash of each file's relative path holds
out 1 in 10 images as the test split; inside a split, one subfolder per class (labelled) or the
images themselves (unlabelled).
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import DataError
from ..schema import IMAGE_SIZES
from .idx import MAX_IDX_ITEMS
from .images import Splits, image_shape_problem
from .prepare import (
    AS_THEY_ARE,
    PrepareConfig,
    check_pixels,
    check_prepared_bytes,
    pixels,
    prepare_image,
)

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
HOLD_OUT = 10  # a pool without train/ and test/ keeps 1 image in HOLD_OUT for testing
# What Pillow raises for a corrupt or hostile image besides OSError (UnidentifiedImageError).
_BAD_IMAGE = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error,
              Image.DecompressionBombError)


def is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES)


def held_out(relative: str) -> bool:
    """Whether the pool's test split holds this file (relative path, '/'-separated). The hash
    is of the name's bytes on disk: a name that is not UTF-8 (`bad\\xff.png`) has them too."""
    digest = hashlib.sha256(os.fsencode(relative)).digest()
    return int.from_bytes(digest[:8], "big") % HOLD_OUT == 0


def read_folder(root: Path, files: Sequence[str], dirs: Sequence[str],
                prepare: PrepareConfig = AS_THEY_ARE) -> Splits:
    """Decode the images of a folder, given its image files and subfolders (relative, sorted),
    as they are or prepared (`prepare.image_size`)."""
    if len(files) > 2 * MAX_IDX_ITEMS:
        raise DataError(f"{root}: {len(files)} images, more than the {2 * MAX_IDX_ITEMS} this "
                        "toolkit reads from one folder")
    top = {d for d in dirs if "/" not in d}
    if len({"train", "test"} & top) == 1:  # not a class called "test": a split half given
        there, missing = ("train", "test") if "train" in top else ("test", "train")
        raise DataError(f"{root} has {there}/ but no {missing}/; give both splits, or put the "
                        "class folders (or images) directly in it for a held-out test split")
    if {"train", "test"} <= top:
        ignored = [f for f in files if not f.startswith(("train/", "test/"))]
        if ignored:
            log.warning("%s: ignoring %d images outside train/ and test/", root, len(ignored))
        train_files, train_labels, train_classes = _split_layout(root, "train", files, dirs)
        test_files, test_labels, test_classes = _split_layout(root, "test", files, dirs)
        if (train_labels is None) != (test_labels is None):
            raise DataError(f"{root}: one of train/ and test/ has class folders and the other "
                            "holds images directly; give both the same layout")
        if train_classes != test_classes:
            only_train = sorted(set(train_classes) - set(test_classes))
            only_test = sorted(set(test_classes) - set(train_classes))
            raise DataError(f"{root}: train/ and test/ must hold the same class folders (only "
                            f"in train/: {', '.join(only_train) or '-'}; only in test/: "
                            f"{', '.join(only_test) or '-'})")
        classes = train_classes
    else:
        pool, labels, classes = _split_layout(root, "", files, dirs)
        if len(pool) < 2:
            raise DataError(f"{root}: one image cannot make both a train and a test split")
        test = [i for i, name in enumerate(pool) if held_out(name)] or [0]  # never empty
        if len(test) == len(pool):
            test = test[1:]  # nor the train split
        is_test = np.zeros(len(pool), dtype=bool)
        is_test[test] = True
        train_files = [name for name, t in zip(pool, is_test, strict=True) if not t]
        test_files = [name for name, t in zip(pool, is_test, strict=True) if t]
        train_labels = None if labels is None else labels[~is_test]
        test_labels = None if labels is None else labels[is_test]
    names = [*train_files, *test_files]
    order = sorted(range(len(names)), key=names.__getitem__)  # the first in sorted order sets
    decode = _decode_prepared if prepare.image_size else _decode
    decoded = decode(root, [names[i] for i in order], prepare)[np.argsort(order)]  # the size
    return Splits(decoded[:len(train_files)], train_labels, decoded[len(train_files):],
                  test_labels, classes)


def _split_layout(root: Path, split: str, files: Sequence[str], dirs: Sequence[str]
                  ) -> tuple[list[str], np.ndarray | None, tuple[str, ...]]:
    """The files of one split folder ('' for the root), their labels and the class names."""
    prefix = f"{split}/" if split else ""
    where = root / split if split else root
    inside = [f for f in files if f.startswith(prefix)]
    direct = [f for f in inside if "/" not in f[len(prefix):]]
    classes = tuple(sorted(d[len(prefix):] for d in dirs
                           if d.startswith(prefix) and "/" not in d[len(prefix):]))
    if direct and classes:
        raise DataError(f"{where} holds both images ({direct[0].rsplit('/', 1)[-1]}) and "
                        f"folders ({classes[0]}); put every image in a class folder, or "
                        "none of them")
    if not inside:
        raise DataError(f"{where} holds no .png or .jpg images")
    if not classes:
        return list(inside), None, ()
    index = {name: k for k, name in enumerate(classes)}
    labels = np.array([index[f[len(prefix):].split("/", 1)[0]] for f in inside], dtype=np.int64)
    counts = np.bincount(labels, minlength=len(classes))
    if not counts.all():
        empty = classes[int(np.argmin(counts))]
        raise DataError(f"{where / empty}: a class folder with no .png or .jpg images")
    return list(inside), labels, tuple(map(shown_name, classes))


def shown_name(name: str) -> str:
    """A file or folder name as text: bytes that are not UTF-8 (which Python keeps as lone
    surrogates, unprintable and unencodable) become U+FFFD, as a file manager shows them."""
    return os.fsencode(name).decode("utf-8", "replace")


def _decode(root: Path, files: Sequence[str], prepare: PrepareConfig) -> np.ndarray:
    """Images of one size as they are: uint8 (N, H, W), or (N, H, W, 3) when any of them is
    in colour."""
    arrays: list[np.ndarray] = []
    first: tuple[str, tuple[int, int]] | None = None
    for relative in files:
        path = root / relative
        try:
            with _quiet_open(path) as image:
                size = image.size[::-1]  # Pillow's (W, H) -> (H, W)
                if first is None:  # its size, checked before anything is decoded
                    problem = image_shape_problem(size)
                    other = _other_size(root, files, size) if problem else None
                    if problem and other is not None:  # pictures of many sizes: name two
                        height, width = other[1]
                        problem += f", and {root / other[0]} is {height}x{width}"
                    if problem:
                        pick = _suggested(size, *([other[1]] if other else []))
                        raise DataError(f"{path}: {problem}; pass --image-size {pick} to "
                                        f"resize and centre-crop them all to {pick}x{pick}")
                    first = (relative, size)
                elif size != first[1]:
                    raise _mixed(root, first, (relative, size))
                arrays.append(pixels(image, prepare.rgb))
        except _BAD_IMAGE as err:
            raise DataError(f"{path}: not a readable PNG or JPEG image ({err})") from None
    if any(a.ndim == 3 for a in arrays):  # gray L -> RGB repeats the value, as Pillow does
        arrays = [a if a.ndim == 3 else np.repeat(a[:, :, None], 3, axis=2) for a in arrays]
    return np.stack(arrays)


def _decode_prepared(root: Path, files: Sequence[str], prepare: PrepareConfig) -> np.ndarray:
    """Pictures of any size and mode, each resized and centre-cropped to S x S: uint8
    (N, S, S), or (N, S, S, 3) when any of them is in colour."""
    size = prepare.image_size
    check_prepared_bytes(root, len(files), size)
    out = np.empty((len(files), size, size, 3), np.uint8)  # gray ones repeat their value
    gray = np.zeros(len(files), dtype=bool)
    upscaled = 0
    for i, relative in enumerate(files):
        path = root / relative
        try:
            with _quiet_open(path) as image:
                check_pixels(path, image.size)  # from the header, before decoding
                array, small = prepare_image(image, prepare)
        except _BAD_IMAGE as err:
            raise DataError(f"{path}: not a readable PNG or JPEG image ({err})") from None
        out[i] = array[:, :, None] if array.ndim == 2 else array
        gray[i] = array.ndim == 2
        upscaled += small
    if upscaled:
        log.warning("%s: %d of %d images are smaller than %dx%d; they were upscaled (blurrier "
                    "than the rest)", root, upscaled, len(files), size, size)
    return out[..., 0].copy() if gray.all() else out


def _mixed(root: Path, *found: tuple[str, tuple[int, int]]) -> DataError:
    (a, (a_height, a_width)), (b, (b_height, b_width)) = found
    size = _suggested(found[0][1], found[1][1])
    return DataError(f"{root / b} is {b_height}x{b_width} but {root / a} is {a_height}x"
                     f"{a_width}; every image must have the same size, or pass --image-size "
                     f"{size} to resize and centre-crop them all to {size}x{size}")


def _other_size(root: Path, files: Sequence[str], size: tuple[int, int]
                ) -> tuple[str, tuple[int, int]] | None:
    """The first file whose (H, W) differs from `size`, from the headers alone."""
    for relative in files:
        try:
            with _quiet_open(root / relative) as image:
                if image.size[::-1] != size:
                    return relative, image.size[::-1]
        except _BAD_IMAGE:
            continue  # (said when it is decoded)
    return None


def _suggested(*sizes: tuple[int, int]) -> int:
    """An --image-size for images of these (H, W): the largest that needs no upscaling."""
    side = min(min(size) for size in sizes) // 4 * 4
    return max(IMAGE_SIZES[0], min(IMAGE_SIZES[-1], side))


def _quiet_open(path: Path) -> Image.Image:
    """Pillow's open without its own decompression-bomb check (a warning, or an error past
    twice its limit, neither naming the size): the caller checks the size from the header
    before anything is decoded (16 to 64 pixels a side, or `check_pixels`), in one line."""
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # (data sets are read on one thread)
    try:
        return Image.open(path, formats=("PNG", "JPEG"))
    finally:
        Image.MAX_IMAGE_PIXELS = limit
