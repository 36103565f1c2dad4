"""The on-disk cache of prepared image folders (`--image-size`), so that a second command does
not decode thousands of pictures again.

One checked .npz per (folder, its files' stamps, the preparation settings) under
`$LDM_PREPARED_CACHE`, else `$XDG_CACHE_HOME/latentdiffusion/prepared`, else
`~/.cache/latentdiffusion/prepared`: never in the data folder, which may be read-only or
shared. A damaged or edited file is recomputed (files.read_checked_npz); the least recently
used files beyond MAX_ENTRIES are removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LdmError
from ..files import read_checked_npz, write_checked_npz
from .images import Splits

log = logging.getLogger(__name__)
CACHE_ENV = "LDM_PREPARED_CACHE"
MAX_ENTRIES = 8  # prepared sets kept (a 2,000-picture folder at 32x32 takes about 4 MB)
_LAYOUT = 1  # the cache file's layout; a new one makes new keys


def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "latentdiffusion" / "prepared"


def cache_key(root: Path, stamp: Any, settings: dict[str, Any]) -> str:
    """sha256 of the folder's resolved path, its files' stamps and the settings."""
    text = json.dumps([_LAYOUT, str(root.resolve()), stamp, settings], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def load(key: str, count: int, size: int) -> Splits | None:
    """The prepared splits cached under `key` (of `count` images of side `size`), or None
    when missing, damaged or not of that layout (then recomputed)."""
    path = cache_dir() / f"{key}.npz"
    arrays = read_checked_npz(path)
    if arrays is None:
        return None
    train, test = arrays.get("train_images"), arrays.get("test_images")
    labelled = "train_labels" in arrays and "test_labels" in arrays
    if (train is None or test is None or train.dtype != np.uint8 or test.dtype != np.uint8
            or train.shape[1:3] != (size, size) or test.shape[1:] != train.shape[1:]
            or len(train) + len(test) != count or "class_names" not in arrays):
        log.warning("%s is not a prepared set of this folder; recomputing it", path)
        return None
    with contextlib.suppress(OSError):
        os.utime(path)  # most recently used
    names = tuple(str(name) for name in arrays["class_names"])
    return Splits(train, arrays["train_labels"] if labelled else None, test,
                  arrays["test_labels"] if labelled else None, names)


def store(key: str, splits: Splits) -> None:
    """Cache `splits` under `key`; a cache that cannot be written is skipped with an info line
    (the next command prepares the pictures again)."""
    folder = cache_dir()
    arrays = {"train_images": splits.train_images, "test_images": splits.test_images,
              "class_names": np.array(splits.class_names, dtype=str)}
    if splits.train_labels is not None and splits.test_labels is not None:
        arrays.update(train_labels=splits.train_labels, test_labels=splits.test_labels)
    try:
        write_checked_npz(folder / f"{key}.npz", **arrays)
    except LdmError as err:
        log.info("not caching the prepared images: %s", err)
        return
    entries = sorted(folder.glob("*.npz"), key=_last_used, reverse=True)
    for stale in entries[MAX_ENTRIES:]:
        with contextlib.suppress(OSError):
            stale.unlink()


def _last_used(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0
