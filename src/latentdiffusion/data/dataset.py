"""The `Dataset` every stage reads, and `load_dataset`, which loads one from any source.

Sources: the four IDX files of an MNIST-format release (`idx.py`, `registry.py`), a folder of
images in torchvision's ImageFolder layout (`folder.py`), or an .npz of arrays (`npz.py`), each
read as it is or prepared to one size (`prepare.py`). A command loads its dataset once per
stage; an in-process cache keyed by the files' stamps decodes it once, and a prepared folder is
also cached on disk (`cache.py`) for the next command.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..errors import DataError, UsageError
from . import cache, folder, idx, npz, registry
from .idx import SPLIT_FILES
from .images import (
    SPLITS,
    Split,
    Splits,
    check_image_item,
    default_class_names,
    image_shape_problem,
)
from .prepare import AS_THEY_ARE, PrepareConfig, check_prepared_bytes, resize_images
from .registry import DATASETS

log = logging.getLogger(__name__)
Source = Literal["idx", "folder", "npz"]
EXPECTED = ("--data-dir takes a directory with the four IDX files (`ldm data download` fetches "
            "them), a folder of .png/.jpg images, or an .npz holding train_images and "
            "test_images")
CACHE_SIZE = 2  # datasets kept decoded: one command's, and one more
# A file changed less than this before it was read may change again within one tick of the
# filesystem clock and keep its stamp (git's "racy clean" problem): such reads are not cached.
SETTLE_NS = 2_000_000_000


@dataclass(frozen=True, eq=False)
class Dataset:
    """Both splits of one image dataset, validated on construction.

    Images are uint8 (N, H, W) grayscale or (N, H, W, 3) RGB with H == W; labels int64 (N,)
    in 0..K-1 with K = len(class_names), or None for unlabelled data. The arrays must not
    change afterwards (`load_dataset` hands out read-only ones): the content hash is cached.
    """

    name: str  # "mnist", "fashion-mnist", a folder's or an .npz's name
    source: str  # "idx", "folder" or "npz"
    train_images: np.ndarray
    train_labels: np.ndarray | None
    test_images: np.ndarray
    test_labels: np.ndarray | None
    class_names: tuple[str, ...]  # K names; () when unlabelled
    origin: str = ""  # the path it was read from, for messages
    # How its pictures were prepared; part of its identity when it changes anything.
    prepared: PrepareConfig = field(default_factory=PrepareConfig)

    def __post_init__(self) -> None:
        where = f"{self.origin or self.name} ({self.source})"
        if (self.train_labels is None) != (self.test_labels is None):
            raise DataError(f"{where}: one split has labels and the other not; label both "
                            "splits or neither")
        if len(set(self.class_names)) != len(self.class_names):
            raise DataError(f"{where}: class names repeat ({', '.join(self.class_names)})")
        if self.labelled != bool(self.class_names):
            raise DataError(f"{where}: {len(self.class_names)} class names for "
                            f"{'labelled' if self.labelled else 'unlabelled'} images")
        for split in SPLITS:
            images, labels = self.split(split)
            if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
                raise DataError(f"{where}: {split} images must be uint8 0..255, got "
                                f"{getattr(images, 'dtype', type(images).__name__)}")
            problem = image_shape_problem(images.shape[1:]) if images.ndim else "scalar"
            if problem:
                raise DataError(f"{where}: {split} {problem}")
            if images.shape[1:] != self.train_images.shape[1:]:
                raise DataError(f"{where}: test images are {images.shape[1:]}, train images "
                                f"{self.train_images.shape[1:]}; both splits must match")
            if len(images) == 0:
                raise DataError(f"{where}: the {split} split has no images")
            if labels is not None:
                if labels.dtype != np.int64 or labels.shape != images.shape[:1]:
                    raise DataError(f"{where}: {split} labels must be int64 ({len(images)},), "
                                    f"got {labels.dtype} {labels.shape}")
                wrong = labels[(labels < 0) | (labels >= self.num_classes)]
                if wrong.size:
                    raise DataError(f"{where}: {split} labels must be in "
                                    f"0..{self.num_classes - 1}, found {wrong[0]}")

    @property
    def labelled(self) -> bool:
        return self.train_labels is not None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_size(self) -> int:
        return int(self.train_images.shape[1])

    @property
    def channels(self) -> int:
        return 3 if self.train_images.ndim == 4 else 1

    def split(self, split: Split) -> tuple[np.ndarray, np.ndarray | None]:
        """Images and labels (None when unlabelled) of "train" or "test"."""
        if split == "train":
            return self.train_images, self.train_labels
        if split == "test":
            return self.test_images, self.test_labels
        raise UsageError(f"unknown split {split!r} (choose from train, test)")

    @cached_property
    def content_hash(self) -> str:
        """sha256 over both splits' shapes, dtypes and bytes, the class names and, when they
        change anything, the preparation settings (a set read as it is keeps its hash)."""
        digest = hashlib.sha256()
        for array in (self.train_images, self.train_labels, self.test_images,
                      self.test_labels):
            if array is None:
                digest.update(b"none;")
            else:  # dtype.str and shape first: the bytes alone do not say how they are laid out
                digest.update(f"{array.dtype.str}{array.shape};".encode())
                digest.update(np.ascontiguousarray(array).data)
        digest.update(json.dumps(self.class_names).encode())
        if self.prepared.is_set:
            digest.update(json.dumps(self.prepared.identity(), sort_keys=True).encode())
        return digest.hexdigest()

    def check_trained_on(self, header: dict[str, Any], path: Path) -> None:
        """UsageError unless the model file at `path` (its header) was trained on this
        content: its stage key holds the data set's content hash."""
        trained_on = (header.get("key_fields") or {}).get("data")
        if trained_on != self.content_hash:
            raise UsageError(f"{path} was trained on another data set than {self.name} "
                             f"(content {str(trained_on)[:12]}, given {self.content_hash[:12]});"
                             " pass the run's --data-dir and --image-size (run.json's data_dir "
                             "and data name them)")

    def describe(self) -> dict[str, Any]:
        """What it is and how big (train, test: image counts), JSON-able; content_sha256
        identifies the content wherever it was read from; `prepared` is there when the
        pictures were prepared."""
        prepared = {"prepared": self.prepared.identity()} if self.prepared.is_set else {}
        return {"name": self.name, "source": self.source, "content_sha256": self.content_hash,
                "image_size": self.image_size, "channels": self.channels,
                "train": len(self.train_images), "test": len(self.test_images),
                "class_names": list(self.class_names), **prepared}


def load_dataset(data_dir: str | os.PathLike[str] | None, dataset: str | None = None,
                 prepare: PrepareConfig = AS_THEY_ARE) -> Dataset:
    """Load a registered IDX dataset, an IDX directory, a folder of images or an .npz,
    prepared as `prepare` says (by default: as they are).

    `data_dir` defaults as in `registry.resolve_data_dir`. Without `dataset`, an IDX directory is
    named by its content: a registered name when its MD5s match, else the directory's name.
    """
    if dataset is not None:
        registry.dataset_info(dataset)  # a UsageError for an unknown name
    path = registry.resolve_data_dir(data_dir, dataset or "mnist")
    source, stamp = _locate(path, dataset)
    key = (str(path.resolve()), dataset, prepare)
    cached = _CACHE.pop(key, None)
    if cached is not None and cached[0] == stamp:
        _CACHE[key] = cached  # most recently used last
        return cached[1]
    started = time.time_ns()
    settled = all(max(s[2], s[3]) < started - SETTLE_NS for s in stamp[0])
    loaded = _read(path, source, stamp, dataset, prepare, settled)
    for array in (loaded.train_images, loaded.train_labels, loaded.test_images,
                  loaded.test_labels):
        if array is not None:
            array.setflags(write=False)  # shared by every caller in this process
    if settled:
        _CACHE[key] = (stamp, loaded)
        while len(_CACHE) > CACHE_SIZE:
            del _CACHE[next(iter(_CACHE))]
    return loaded


# A file's stamp: (path relative to the data dir, size, mtime_ns, ctime_ns, inode); a dataset's
# stamp: its files' stamps and, for a folder, its subfolders (relative, sorted).
FileStamp = tuple[str, int, int, int, int]
Stamp = tuple[tuple[FileStamp, ...], tuple[str, ...]]
_CACHE: dict[tuple[str, str | None, PrepareConfig], tuple[Stamp, Dataset]] = {}


def _stamp_of(relative: str, st: os.stat_result) -> FileStamp:
    return (relative, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def _locate(path: Path, dataset: str | None) -> tuple[Source, Stamp]:
    """Which source `path` is, and the stamp of every file and folder it would read."""
    if path.is_dir():
        stems = [stem for pair in SPLIT_FILES.values() for stem in pair]
        if any(idx.idx_file(path, stem) for stem in stems) or (
                dataset is not None and not _walk(path)[0]):  # (no images either: download)
            files = [idx.find_idx_file(path, stem, dataset or "mnist") for stem in stems]
            return "idx", (tuple(_stamp_of(f.name, f.stat()) for f in files), ())
        if dataset is not None:
            raise DataError(f"{path} holds images, not the IDX files of {dataset}; leave out "
                            "--dataset to read it as a folder of images")
        stamps, dirs = _walk(path)
        if not stamps:
            raise DataError(f"{path} holds neither the four IDX files nor any .png or .jpg "
                            f"image; {EXPECTED}")
        return "folder", (stamps, dirs)
    if dataset is not None:
        idx.find_idx_file(path, SPLIT_FILES["train"][0], dataset)  # says what is wrong
    if path.is_file() and path.suffix.lower() == ".npz":
        return "npz", ((_stamp_of(path.name, path.stat()),), ())
    if path.exists():
        raise DataError(f"{path} is not a directory, nor a regular file ending in .npz; "
                        f"{EXPECTED}")
    raise DataError(f"data directory {path} does not exist; {EXPECTED}")


def _walk(root: Path) -> tuple[tuple[FileStamp, ...], tuple[str, ...]]:
    """Stamps of the image files under `root` and its subfolders, relative and sorted.

    Hidden files and folders are skipped; links to folders are followed, as ImageFolder does,
    but a folder reached twice (a link loop) is an error.
    """
    files: list[FileStamp] = []
    dirs: list[str] = []
    top = root.stat()
    seen = {(top.st_dev, top.st_ino)}
    pending = [""]
    while pending:
        relative = pending.pop()
        try:
            entries = list(os.scandir(root / relative))
        except OSError as err:
            raise DataError(f"cannot list {root / relative}: {err.strerror}") from None
        for entry in entries:
            if entry.name.startswith("."):
                continue
            name = f"{relative}/{entry.name}" if relative else entry.name
            if entry.is_dir():
                st = entry.stat()
                if (st.st_dev, st.st_ino) in seen:
                    raise DataError(f"{root / name} leads back to a folder already read "
                                    "(a link loop); remove the link")
                seen.add((st.st_dev, st.st_ino))
                dirs.append(name)
                pending.append(name)
            elif folder.is_image_name(entry.name):
                if not entry.is_file():  # never skipped silently: the user counts on it
                    raise DataError(f"{root / name} is not a regular file (a dangling link, a "
                                    "device or a pipe); remove it or put the image there")
                files.append(_stamp_of(name, entry.stat()))
    return tuple(sorted(files)), tuple(sorted(dirs))


def _read(path: Path, source: Source, stamp: Stamp, dataset: str | None,
          prepare: PrepareConfig, settled: bool) -> Dataset:
    """The data set at `path`; a prepared folder from the disk cache when its files' stamps
    and the settings match (written there when the files have `settled`)."""
    if source == "npz":
        splits = _resized(path, npz.read_npz(path), prepare.image_size)
        return Dataset(path.stem, "npz", *splits, origin=str(path), prepared=prepare)
    if source == "folder":
        return Dataset(path.resolve().name, "folder", *_folder(path, stamp, prepare, settled),
                       origin=str(path), prepared=prepare)
    digests: dict[Path, str] = {}  # MD5s of the decompressed files: they name it by content
    arrays = [idx.read_split(path, split, check_item=check_image_item, digests=digests)
              for split in SPLITS]
    name = _name_by_content(digests) or path.resolve().name
    if dataset is not None and name != dataset:  # a registered name is its release's content
        raise DataError(f"{path} does not hold the {dataset} release (its content differs; "
                        f"`ldm data verify --dataset {dataset} --data-dir {path}` says where); "
                        "leave out --dataset to use it as a data set of its own")
    labels = [split_labels.astype(np.int64) for _, split_labels in arrays]
    class_names = (DATASETS[name].class_names if name in DATASETS
                   else default_class_names(labels, path))
    splits = _resized(path, Splits(arrays[0][0], labels[0], arrays[1][0], labels[1],
                                   class_names), prepare.image_size)
    return Dataset(name, "idx", *splits, origin=str(path), prepared=prepare)


def _folder(path: Path, stamp: Stamp, prepare: PrepareConfig, settled: bool) -> Splits:
    files = [file_stamp[0] for file_stamp in stamp[0]]
    if not prepare.image_size:  # images of one size as they are: quick to decode
        return folder.read_folder(path, files, stamp[1], prepare)
    key = cache.cache_key(path, stamp, prepare.identity())
    cached = cache.load(key, len(files), prepare.image_size)
    if cached is not None:
        return cached
    started = time.perf_counter()
    splits = folder.read_folder(path, files, stamp[1], prepare)
    log.debug("prepared %d pictures of %s at %dx%d in %.1f s", len(files), path,
             prepare.image_size, prepare.image_size, time.perf_counter() - started)
    if settled:
        cache.store(key, splits)
    return splits


def _resized(path: Path, splits: Splits, size: int) -> Splits:
    """The splits of an .npz or IDX data set at `size` (0: as they are); smaller images are
    upscaled with a warning, as a folder's are."""
    side = splits.train_images.shape[1] if splits.train_images.ndim >= 3 else 0
    if (not size or side == size or image_shape_problem(splits.train_images.shape[1:])
            or splits.test_images.shape[1:] != splits.train_images.shape[1:]):
        return splits  # (`Dataset` refuses unusable shapes with its own message)
    check_prepared_bytes(path, len(splits.train_images) + len(splits.test_images), size)
    if side < size:
        log.warning("%s: its %dx%d images were upscaled to %dx%d (--image-size)", path, side,
                    side, size, size)
    return splits._replace(train_images=resize_images(splits.train_images, size),
                           test_images=resize_images(splits.test_images, size))


def _name_by_content(digests: dict[Path, str]) -> str | None:
    """The registered dataset whose decompressed files these are (path -> MD5), if any."""
    found = {path.name.removesuffix(".gz"): md5 for path, md5 in digests.items()}
    for info in DATASETS.values():
        if info.content_md5 == found:
            return info.name
    return None
