"""TEMPORARY STUB (replaced by the datasources branch)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from . import data
from .data import Split


@dataclass(frozen=True, eq=False)
class Dataset:
    name: str
    source: str
    train_images: np.ndarray
    train_labels: np.ndarray | None
    test_images: np.ndarray
    test_labels: np.ndarray | None
    class_names: tuple[str, ...]

    @property
    def labelled(self) -> bool:
        return self.train_labels is not None

    @property
    def num_classes(self) -> int:
        return len(self.class_names) if self.labelled else 0

    @property
    def image_size(self) -> int:
        return int(self.train_images.shape[1])

    @property
    def channels(self) -> int:
        return 1 if self.train_images.ndim == 3 else 3

    def split(self, split: Split) -> tuple[np.ndarray, np.ndarray | None]:
        return ((self.train_images, self.train_labels) if split == "train"
                else (self.test_images, self.test_labels))

    @cached_property
    def content_hash(self) -> str:
        h = hashlib.sha256()
        for a in (self.train_images, self.train_labels, self.test_images, self.test_labels):
            if a is not None:
                h.update(str(a.shape).encode())
                h.update(np.ascontiguousarray(a).tobytes())
        h.update(repr(self.class_names).encode())
        return h.hexdigest()

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "content_sha256": self.content_hash,
                "image_size": self.image_size, "channels": self.channels,
                "train": len(self.train_images), "test": len(self.test_images),
                "class_names": list(self.class_names)}


def load_dataset(data_dir: str | os.PathLike[str] | None, dataset: str | None = None) -> Dataset:
    if data_dir is not None and str(data_dir).endswith(".npz"):
        with np.load(data_dir) as f:
            tl = f["train_labels"] if "train_labels" in f else None
            return Dataset("npz", "npz", f["train_images"], tl, f["test_images"],
                           f["test_labels"] if tl is not None else None,
                           tuple(str(i) for i in range(int(tl.max()) + 1)) if tl is not None
                           else ())
    tr = data.load_split(data_dir, "train")
    te = data.load_split(data_dir, "test")
    return Dataset(dataset or "mnist", "idx", tr[0], tr[1], te[0], te[1],
                   tuple(str(i) for i in range(10)))
