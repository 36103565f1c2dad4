"""Readers of the non-IDX data sources: a folder of images and an .npz of arrays.

A folder follows torchvision's ImageFolder layout: `train/` and `test/` subfolders, or one pool
of which a hash of each file's relative path holds out 1 in 10 images as the test split; inside
a split, one subfolder per class (labelled) or the images themselves (unlabelled).
"""

from __future__ import annotations

import hashlib
import logging
import struct
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from .data import MAX_IDX_ITEMS, image_shape_problem
from .errors import DataError
from .fileio import BAD_NPZ, npz_headers

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
GRAY_MODES = ("1", "L", "LA")  # decoded as "L"; 16-bit gray ("I;16", "I") is scaled to 8 bits
HOLD_OUT = 10  # a pool without train/ and test/ keeps 1 image in HOLD_OUT for testing
MAX_CLASSES = 10_000  # a bound on the class names made up for labels 0..max
NPZ_KEYS = ("train_images", "train_labels", "test_images", "test_labels", "class_names")
NPZ_EXPECTED = ("an .npz holds uint8 train_images and test_images, (N, H, W) or (N, H, W, 3), "
                "and optionally integer train_labels, test_labels (N,) and class_names (str)")
# What Pillow raises for a corrupt or hostile image besides OSError (UnidentifiedImageError).
_BAD_IMAGE = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error,
              Image.DecompressionBombError)


class Splits(NamedTuple):
    """A source's arrays, in the order of `Dataset`'s fields."""

    train_images: np.ndarray
    train_labels: np.ndarray | None
    test_images: np.ndarray
    test_labels: np.ndarray | None
    class_names: tuple[str, ...]


def default_class_names(labels: Sequence[np.ndarray], where: object) -> tuple[str, ...]:
    """str(k) for k in 0..max label, for labels that come without names."""
    top = max((int(split.max()) for split in labels if split.size), default=-1)
    if top >= MAX_CLASSES:
        raise DataError(f"{where}: labels go up to {top}, more than the {MAX_CLASSES} classes "
                        "this toolkit takes")
    return tuple(str(k) for k in range(top + 1))


# ---------------------------------------------------------------- folders of images


def is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES)


def held_out(relative: str) -> bool:
    """Whether the pool's test split holds this file (relative path, '/'-separated)."""
    digest = hashlib.sha256(relative.encode()).digest()
    return int.from_bytes(digest[:8], "big") % HOLD_OUT == 0


def read_folder(root: Path, files: Sequence[str], dirs: Sequence[str]) -> Splits:
    """Decode the images of a folder, given its image files and subfolders (relative, sorted)."""
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
    decoded = _decode(root, [names[i] for i in order])[np.argsort(order)]  # the image size
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
    return list(inside), labels, classes


def _decode(root: Path, files: Sequence[str]) -> np.ndarray:
    """Images uint8 (N, H, W), or (N, H, W, 3) when any of them is in colour."""
    arrays: list[np.ndarray] = []
    first: tuple[str, tuple[int, int]] | None = None
    for relative in files:
        path = root / relative
        try:
            with Image.open(path, formats=("PNG", "JPEG")) as image:
                size = image.size[::-1]  # Pillow's (W, H) -> (H, W)
                if first is None:  # its size, checked before anything is decoded
                    problem = image_shape_problem(size)
                    if problem:
                        raise DataError(f"{path}: {problem}")
                    first = (relative, size)
                elif size != first[1]:
                    raise DataError(f"{path} is {size[0]}x{size[1]} but {root / first[0]} is "
                                    f"{first[1][0]}x{first[1][1]}; every image must have the "
                                    "same size")
                arrays.append(_pixels(image))
        except _BAD_IMAGE as err:
            raise DataError(f"{path}: not a readable PNG or JPEG image ({err})") from None
    if any(a.ndim == 3 for a in arrays):  # gray L -> RGB repeats the value, as Pillow does
        arrays = [a if a.ndim == 3 else np.repeat(a[:, :, None], 3, axis=2) for a in arrays]
    return np.stack(arrays)


def _pixels(image: Image.Image) -> np.ndarray:
    """uint8 (H, W) for a grayscale image, (H, W, 3) for any other."""
    if image.mode in GRAY_MODES:
        return np.asarray(image if image.mode == "L" else image.convert("L"))
    if image.mode.startswith("I"):  # 16-bit gray: Pillow's convert("L") would clip at 255
        return (np.asarray(image.convert("I")) >> 8).clip(0, 255).astype(np.uint8)
    return np.asarray(image.convert("RGB"))


# ---------------------------------------------------------------- .npz files


def read_npz(path: Path) -> Splits:
    """The arrays of an .npz dataset, their dtypes and shapes checked before they are loaded."""
    try:
        if not zipfile.is_zipfile(path):
            raise DataError(f"{path} is not a zip archive; {NPZ_EXPECTED} (np.savez)")
        headers = npz_headers(path)
    except (OSError, ValueError, *BAD_NPZ) as err:
        raise DataError(f"{path} is not a readable .npz ({err})") from None
    unknown = sorted(set(headers) - set(NPZ_KEYS))
    missing = [key for key in ("train_images", "test_images") if key not in headers]
    if unknown or missing:
        found = ", ".join(sorted(headers)) or "nothing"
        raise DataError(f"{path}: holds {found}; {NPZ_EXPECTED}")
    for split in ("train", "test"):
        shape, dtype = headers[f"{split}_images"]
        if dtype != np.uint8:
            raise DataError(f"{path}: {split}_images must be uint8 0..255, got {dtype} (convert "
                            "with (x * 255).round().clip(0, 255).astype(np.uint8))")
        problem = image_shape_problem(shape[1:]) if shape else "a scalar is not images"
        if problem:
            raise DataError(f"{path}: {split}_images: {problem}")
        if not 0 < shape[0] <= MAX_IDX_ITEMS:
            raise DataError(f"{path}: {split}_images holds {shape[0]} images; it must hold "
                            f"1 to {MAX_IDX_ITEMS}")
        if f"{split}_labels" in headers:
            labels_shape, labels_dtype = headers[f"{split}_labels"]
            if labels_shape != shape[:1] or labels_dtype.kind not in "iu":
                raise DataError(f"{path}: {split}_labels must be integers of shape "
                                f"({shape[0]},), got {labels_dtype} {labels_shape}")
    if "class_names" in headers:
        names_shape, names_dtype = headers["class_names"]
        if len(names_shape) != 1 or names_dtype.kind != "U" or names_shape[0] > MAX_CLASSES:
            raise DataError(f"{path}: class_names must be a 1-D array of at most {MAX_CLASSES} "
                            f"str, got {names_dtype} {names_shape}")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {key: f[key] for key in headers}
    except (OSError, ValueError, *BAD_NPZ) as err:
        raise DataError(f"{path} is not a readable .npz ({err})") from None
    train_labels, test_labels = arrays.get("train_labels"), arrays.get("test_labels")
    class_names: tuple[str, ...] = ()
    if "class_names" in arrays:
        class_names = tuple(str(name) for name in arrays["class_names"])
    if train_labels is None or test_labels is None:  # `Dataset` refuses labels on one split
        return Splits(arrays["train_images"], _int64(train_labels), arrays["test_images"],
                      _int64(test_labels), class_names)
    if "class_names" not in arrays:
        class_names = default_class_names((train_labels, test_labels), path)
    for split, labels in (("train", train_labels), ("test", test_labels)):
        wrong = labels[(labels < 0) | (labels >= len(class_names))]
        if wrong.size:
            raise DataError(f"{path}: {split}_labels must be in 0..{len(class_names) - 1} "
                            f"(one per class name), found {wrong[0]}")
    return Splits(arrays["train_images"], train_labels.astype(np.int64), arrays["test_images"],
                  test_labels.astype(np.int64), class_names)


def _int64(labels: np.ndarray | None) -> np.ndarray | None:
    """Labels of an unusable dataset, int64 for `Dataset` to refuse with its own message."""
    return None if labels is None else labels.astype(np.int64)
