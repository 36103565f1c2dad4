""".npz files of arrays as data sets: train_images, test_images and optional labels and
class names, their dtypes and shapes checked before anything is loaded."""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..files import BAD_NPZ, npz_headers
from .idx import MAX_IDX_ITEMS
from .images import MAX_CLASSES, TO_UINT8, Splits, default_class_names, image_shape_problem

NPZ_KEYS = ("train_images", "train_labels", "test_images", "test_labels", "class_names")
NPZ_EXPECTED = ("an .npz holds uint8 train_images and test_images, (N, H, W) or (N, H, W, 3), "
                "and optionally integer train_labels, test_labels (N,) and class_names (str)")


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
    converted: dict[str, np.ndarray] = {}
    for split in ("train", "test"):
        shape, dtype = headers[f"{split}_images"]
        if dtype.kind not in "iuf":
            raise DataError(f"{path}: {split}_images must be uint8 0..255, got {dtype}")
        if dtype != np.uint8:  # other numbers are judged by their values, before the rest
            converted[f"{split}_images"] = _as_uint8(path, f"{split}_images",
                                                     _load(path, (f"{split}_images",))[0])
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
    rest = [key for key in headers if key not in converted]
    arrays = {**dict(zip(rest, _load(path, rest), strict=True)), **converted}
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


def _load(path: Path, keys: Sequence[str]) -> list[np.ndarray]:
    """The arrays `keys` of an .npz whose headers were checked (never a pickle)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            return [f[key] for key in keys]
    except (OSError, ValueError, *BAD_NPZ) as err:
        raise DataError(f"{path} is not a readable .npz ({err})") from None


def _as_uint8(path: Path, key: str, images: np.ndarray) -> np.ndarray:
    """uint8 images: integers that are all in 0..255 are pixels already and converted; other
    arrays are refused with the advice their values call for (x * 255 only for 0..1)."""
    if images.dtype == np.uint8:
        return images
    low, high = (images.min(), images.max()) if images.size else (0, 0)
    in_bytes = bool(0 <= low and high <= 255)
    if images.dtype.kind in "iu" and in_bytes:
        return images.astype(np.uint8)
    if images.dtype.kind == "f" and 0 <= low and high <= 1:
        advice = TO_UINT8
    elif in_bytes:
        advice = "convert with x.round().astype(np.uint8)"
    else:
        advice = "rescale them to 0..255 first"
    raise DataError(f"{path}: {key} must be uint8 0..255, got {images.dtype} holding "
                    f"{low:g}..{high:g} ({advice})")
