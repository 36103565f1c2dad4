"""IDX files (LeCun et al.), the format of MNIST's release: read with validation, written.

Layout: big-endian magic (0x0803 images, 0x0801 labels), one uint32 per dimension, then uint8
values. Files may be gzipped (the original release) or raw.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np

from ..errors import DataError, UsageError
from ..files import check_decoded_size
from .images import Split

IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049
# Items one IDX file may declare: 16x MNIST's training set (784 MB of 28x28 images). The limit
# is checked against the header, so a hostile header cannot make the reader allocate more.
MAX_IDX_ITEMS = 1_000_000
SPLIT_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}



def idx_file(data_dir: Path, stem: str) -> Path | None:
    """The file `stem`.gz or `stem` in `data_dir`, else None."""
    for candidate in (data_dir / f"{stem}.gz", data_dir / stem):
        if candidate.is_file():
            return candidate
    return None


def find_idx_file(data_dir: Path, stem: str, dataset: str = "mnist") -> Path:
    """The file `stem`.gz or `stem` in `data_dir`; a DataError saying what to do if missing
    (downloading `dataset`)."""
    found = idx_file(data_dir, stem)
    if found is not None:
        return found
    download = ("ldm data download" + ("" if dataset == "mnist" else f" --dataset {dataset}")
                + f" --data-dir {data_dir}")
    if data_dir.exists() and not data_dir.is_dir():
        raise DataError(f"data directory {data_dir} is not a directory; pass --data-dir DIR")
    if not data_dir.is_dir():
        raise DataError(f"data directory {data_dir} does not exist; pass --data-dir DIR or run "
                        f"`{download}`")
    raise DataError(f"{data_dir / (stem + '.gz')} is missing; run `{download}` or point "
                    "--data-dir elsewhere")


def _size_error(path: Path, size: int, dims: tuple[int, ...], expected: int,
                short: bool) -> DataError:
    why = "the file is truncated" if short else "it holds data past what its header declares"
    return DataError(f"{path}: size {size} bytes does not match its header "
                     f"{'x'.join(map(str, dims))} ({expected} bytes); {why}")


def _read_exactly(stream: io.BufferedIOBase, out: np.ndarray) -> int:
    """Fill `out` (uint8) from `stream` in blocks; the number of bytes it got."""
    view, done = out.data, 0
    while done < len(view):
        got = stream.readinto(view[done:done + (1 << 20)])
        if not got:
            break
        done += got
    return done


class Digest(Protocol):
    """What `read_idx` feeds every byte it reads to (a hashlib object)."""

    def update(self, data: bytes | memoryview, /) -> None: ...


def read_idx(path: Path, magic: int, *,
             check_item: Callable[[Path, tuple[int, ...]], None] | None = None,
             digest: Digest | None = None) -> np.ndarray:
    """Read one IDX file (gzipped or raw), checking magic number, dimensions and size.

    The header is checked before any data is read (`check_item` on the item shape, at most
    MAX_IDX_ITEMS items), and exactly the bytes it declares are read from the stream, so a
    file that is huge, or decompresses to far more than it says, never fills the memory.
    `digest` is updated with every decompressed byte, header included.
    """
    gz = path.suffix == ".gz"
    try:
        with gzip.open(path, "rb") if gz else open(path, "rb") as stream:
            return _read_idx_stream(path, stream, magic, check_item, digest, gz)
    except (OSError, EOFError, zlib.error) as err:  # BadGzipFile is an OSError
        raise DataError(f"{path}: truncated or corrupt gzip ({err}); delete it and run "
                        "`ldm data download`") from None


def _read_idx_stream(path: Path, stream: io.BufferedIOBase, magic: int,
                     check_item: Callable[[Path, tuple[int, ...]], None] | None,
                     digest: Digest | None, gz: bool) -> np.ndarray:
    head = stream.read(4)
    if len(head) < 4:
        raise DataError(f"{path}: too short to be an IDX file ({len(head)} bytes)")
    (found,) = struct.unpack(">I", head)
    if found != magic:
        raise DataError(f"{path}: wrong magic number {found} (expected {magic}); "
                        "not an IDX file of this kind")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    raw_dims = stream.read(4 * ndim)
    if len(raw_dims) < 4 * ndim:
        raise DataError(f"{path}: size {4 + len(raw_dims)} bytes is shorter than its "
                        f"{header}-byte header; the file is truncated")
    dims = struct.unpack(f">{ndim}I", raw_dims)
    if check_item is not None:
        check_item(path, dims[1:])
    if dims[0] > MAX_IDX_ITEMS:
        raise DataError(f"{path}: its header declares {dims[0]} items, more than the "
                        f"{MAX_IDX_ITEMS} this toolkit reads from one file; not a usable IDX "
                        "file")
    count = math.prod(dims)  # exact: numpy's prod would wrap around past 2**63
    check_decoded_size(path, count)
    expected = header + count
    if not gz:  # a raw file's size is known without reading it
        size = os.fstat(stream.fileno()).st_size
        if size != expected:
            raise _size_error(path, size, dims, expected, short=size < expected)
    values = np.empty(count, dtype=np.uint8)
    got = _read_exactly(stream, values)
    if got < count:
        raise _size_error(path, header + got, dims, expected, short=True)
    if stream.read(1):  # for gzip this also reaches the end, where the CRC is checked
        raise DataError(f"{path}: decompresses to more than the {expected} bytes its header "
                        f"{'x'.join(map(str, dims))} declares; the file is corrupt (delete it "
                        "and run `ldm data download`)")
    if digest is not None:  # the whole decompressed file: header, then values
        digest.update(head + raw_dims)
        digest.update(values.data)
    return values.reshape(dims)


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write uint8 images (N, H, W) or labels (N,) as IDX; gzipped when the name ends in .gz."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    magic = IMAGE_MAGIC if array.ndim == 3 else LABEL_MAGIC
    data = struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def read_split(root: Path, split: Split, *,
               check_item: Callable[[Path, tuple[int, ...]], None] | None = None,
               digests: dict[Path, str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels, both uint8 as stored, of one split's IDX files in `root`.

    `digests`, when given, receives each file's path -> MD5 of its decompressed content.
    """
    if split not in SPLIT_FILES:
        raise UsageError(f"unknown split {split!r} (choose from train, test)")
    image_stem, label_stem = SPLIT_FILES[split]
    image_path, label_path = find_idx_file(root, image_stem), find_idx_file(root, label_stem)
    image_md5, label_md5 = hashlib.md5(), hashlib.md5()
    images = read_idx(image_path, IMAGE_MAGIC, check_item=check_item,
                      digest=image_md5 if digests is not None else None)
    labels = read_idx(label_path, LABEL_MAGIC, digest=label_md5 if digests is not None else None)
    if digests is not None:
        digests.update({image_path: image_md5.hexdigest(), label_path: label_md5.hexdigest()})
    if len(images) != len(labels):
        raise DataError(f"{image_path} has {len(images)} images but {label_path} has "
                        f"{len(labels)} labels; one of them is from another release")
    return images, labels

