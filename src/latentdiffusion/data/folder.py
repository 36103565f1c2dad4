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
import warnings
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import DataError
from .idx import MAX_IDX_ITEMS
from .images import Splits, image_shape_problem

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
GRAY_MODES = ("1", "L", "LA")  # decoded as "L"; 16-bit gray ("I;16", "I") is scaled to 8 bits
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
    return list(inside), labels, tuple(map(shown_name, classes))


def shown_name(name: str) -> str:
    """A file or folder name as text: bytes that are not UTF-8 (which Python keeps as lone
    surrogates, unprintable and unencodable) become U+FFFD, as a file manager shows them."""
    return os.fsencode(name).decode("utf-8", "replace")


def _decode(root: Path, files: Sequence[str]) -> np.ndarray:
    """Images uint8 (N, H, W), or (N, H, W, 3) when any of them is in colour."""
    arrays: list[np.ndarray] = []
    first: tuple[str, tuple[int, int]] | None = None
    for relative in files:
        path = root / relative
        try:
            with _quiet_open(path) as image:
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


def _quiet_open(path: Path) -> Image.Image:
    """Pillow's open without its DecompressionBombWarning: the size is checked right after
    (16 to 64 pixels a side) before anything is decoded, so the warning could only come before
    that one clear line; past twice its limit Pillow still refuses (DecompressionBombError)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(path, formats=("PNG", "JPEG"))


def _pixels(image: Image.Image) -> np.ndarray:
    """uint8 (H, W) for a grayscale image, (H, W, 3) for any other."""
    image = _on_white(image)
    if image.mode in GRAY_MODES:
        return np.asarray(image if image.mode == "L" else image.convert("L"))
    if image.mode.startswith("I"):  # 16-bit gray: Pillow's convert("L") would clip at 255
        return (np.asarray(image.convert("I")) >> 8).clip(0, 255).astype(np.uint8)
    return np.asarray(image.convert("RGB"))


def _on_white(image: Image.Image) -> Image.Image:
    """An image with transparency (RGBA, LA, a palette or gray with a transparent colour)
    composited onto white, as a viewer shows it: dropping alpha would turn an icon whose shape
    is only in its alpha (RGB = 0) into a black square. Others as they are."""
    keyed = "transparency" in image.info and image.mode in ("1", "L", "P", "RGB")
    if image.mode not in ("RGBA", "LA", "PA", "RGBa", "La") and not keyed:
        return image
    gray = image.mode in ("1", "L", "LA", "La")
    rgba = image.convert("RGBA")
    flat = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return flat.convert("L" if gray else "RGB")
