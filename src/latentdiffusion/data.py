"""MNIST-format data: IDX reading with validation, a dataset registry, download and verify.

IDX layout (LeCun et al.): big-endian magic (0x0803 images, 0x0801 labels), one uint32 per
dimension, then uint8 values. Files may be gzipped (the original release) or raw. Other
sources (image folders, .npz) and the `Dataset` they all load into are in `datasets.py`.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import math
import os
import struct
import urllib.request
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch

from .config import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE
from .errors import DataError, UsageError

log = logging.getLogger(__name__)

Split = Literal["train", "test"]
SPLITS: tuple[Split, ...] = ("train", "test")
DATA_DIR_ENV = "LDM_DATA_DIR"
IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049
# Items one IDX file may declare: 16x MNIST's training set (784 MB of 28x28 images). The limit
# is checked against the header, so a hostile header cannot make the reader allocate more.
MAX_IDX_ITEMS = 1_000_000
# Square image sides a dataset may have (28 for MNIST): multiples of 4, which the VAE's padding
# and two stride-2 stages turn into an even latent grid.
IMAGE_SIZES = range(MIN_IMAGE_SIZE, MAX_IMAGE_SIZE + 1, 4)  # the models' rule (config.py)


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    mirrors: tuple[str, ...]
    md5: dict[str, str]  # file name (.gz) -> MD5 of the original archive, for `download`
    # file name (no .gz) -> MD5 of the decompressed file: what `verify` checks, so that a
    # recompressed copy of the same content (e.g. Debian's dataset-fashion-mnist) passes
    content_md5: dict[str, str]
    class_names: tuple[str, ...]


DATASETS = {
    "mnist": DatasetInfo(
        name="mnist",
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
            "http://yann.lecun.com/exdb/mnist/",
        ),
        md5={
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
        content_md5={
            "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
            "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
            "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
            "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
        },
        class_names=tuple(str(digit) for digit in range(10)),
    ),
    "fashion-mnist": DatasetInfo(
        name="fashion-mnist",
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        md5={
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
        # The git-annex MD5E keys of github.com/datasets-mila/datasets--fashionmnist, whose
        # .gz keys equal the MD5s above (sizes 47040016, 60008, 7840016 and 10008 bytes).
        content_md5={
            "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
            "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
            "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
            "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
        },
        class_names=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                     "Sneaker", "Bag", "Ankle boot"),
    ),
}
SPLIT_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def dataset_info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise UsageError(f"unknown dataset {name!r} (choose from {', '.join(DATASETS)})")
    return DATASETS[name]


def resolve_data_dir(data_dir: str | os.PathLike[str] | None, dataset: str = "mnist") -> Path:
    """--data-dir, else $LDM_DATA_DIR, else the user cache directory."""
    if data_dir:
        return Path(data_dir).expanduser()
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "latentdiffusion" / dataset


def image_shape_problem(shape: tuple[int, ...]) -> str | None:
    """Why images of shape (H, W) or (H, W, C) cannot be used, or None when they can."""
    if len(shape) not in (2, 3) or shape[2:] not in ((), (3,)):
        hint = " (drop the last axis: images[..., 0])" if shape[2:] == (1,) else ""
        return (f"images of shape (N, {', '.join(map(str, shape))}) are neither (N, H, W) "
                f"grayscale nor (N, H, W, 3) RGB{hint}")
    height, width = shape[:2]
    if height != width or height not in IMAGE_SIZES:
        return (f"images are {height}x{width}; they must be square, with a side that is a "
                f"multiple of 4 from {IMAGE_SIZES[0]} to {IMAGE_SIZES[-1]}")
    return None


def check_image_item(path: Path, item_shape: tuple[int, ...]) -> None:
    """`read_idx`'s check_item for images of any usable size: a DataError naming `path`."""
    problem = image_shape_problem(item_shape)
    if problem:
        raise DataError(f"{path}: {problem}")


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


def to_unit_tensor(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W) or (N, H, W, 3) in 0..255 -> float32 (N, C, H, W) in [0, 1]."""
    pixels = torch.as_tensor(np.array(images, copy=True))  # uint8: lay it out before widening
    pixels = pixels.unsqueeze(1) if pixels.ndim == 3 else pixels.permute(0, 3, 1, 2).contiguous()
    return pixels.to(torch.float32).div_(255.0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float (N, C, H, W) in [0, 1] -> uint8 (N, H, W) for C = 1, else (N, H, W, C); rounded
    and clipped."""
    pixels = images.detach().clamp(0, 1).mul(255).round().to(torch.uint8).cpu()
    return (pixels.squeeze(1) if pixels.shape[1] == 1 else pixels.permute(0, 2, 3, 1)).numpy()


def md5sum(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(data_dir: str | os.PathLike[str] | None, dataset: str = "mnist") -> dict[str, dict]:
    """Parse every file and check the MD5 of its decompressed content against the registry.

    Gzipped or raw, at any compression level: only the content counts. Raises DataError.
    """
    info = dataset_info(dataset)
    root = resolve_data_dir(data_dir, dataset)
    report: dict[str, dict] = {}
    digests: dict[Path, str] = {}
    for stem in (stem for pair in SPLIT_FILES.values() for stem in pair):
        find_idx_file(root, stem, dataset)  # a missing file: how to download this dataset
    for split in SPLITS:
        images, labels = read_split(root, split, check_item=check_image_item, digests=digests)
        report[split] = {"images": list(images.shape), "labels": len(labels)}
    differs = []
    for path, md5 in digests.items():
        expected = info.content_md5[path.name.removesuffix(".gz")]
        if md5 != expected:
            differs.append(f"{path}: content differs from the original {dataset} release "
                           f"(decompressed MD5 {md5}, expected {expected})")
    if differs:
        raise DataError("; ".join(differs))
    return report


def download(data_dir: str | os.PathLike[str] | None, dataset: str = "mnist",
             progress: Callable[[int, int], None] | None = None) -> Path:
    """Fetch missing files from the registry's mirrors, verify MD5, write atomically."""
    info = dataset_info(dataset)
    root = resolve_data_dir(data_dir, dataset)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # a regular file (or one on the way) where the directory goes
        raise DataError(f"cannot download into {root}: it exists and is not a directory; pass "
                        "another --data-dir") from None
    except OSError as err:
        raise DataError(f"cannot create data directory {root}: {err.strerror}") from None
    for name, md5 in info.md5.items():
        target = root / name
        if target.is_file() and md5sum(target) == md5:
            continue
        errors = []
        for mirror in info.mirrors:
            tmp = target.with_suffix(".part")
            try:
                log.info("downloading %s%s", mirror, name)
                with urllib.request.urlopen(mirror + name, timeout=60) as response, \
                        open(tmp, "wb") as out:
                    total = int(response.headers.get("Content-Length") or 0)
                    done = 0
                    for block in iter(partial(response.read, 1 << 16), b""):
                        out.write(block)
                        done += len(block)
                        if progress:
                            progress(done, total)
                    out.flush()
                    os.fsync(out.fileno())
                if md5sum(tmp) != md5:
                    raise OSError("MD5 mismatch")
                os.replace(tmp, target)
                break
            except OSError as err:
                errors.append(f"{mirror}: {err}")
                tmp.unlink(missing_ok=True)
            except BaseException:  # Ctrl-C: leave no partial file behind
                tmp.unlink(missing_ok=True)
                raise
        else:
            raise DataError(f"could not download {name} ({'; '.join(errors)}); without network, "
                            "copy the four files into a directory and pass --data-dir")
    return root
