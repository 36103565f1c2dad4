"""Registered IDX data sets (MNIST, Fashion-MNIST): where they live, download and verify.

`download` fetches the original `.gz` files from the registry's mirrors and checks their MD5s;
`verify` checks the MD5 of each file's decompressed content, so a recompressed copy of the same
release passes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from ..errors import DataError, UsageError
from .idx import SPLIT_FILES, find_idx_file, read_split
from .images import SPLITS, check_image_item

log = logging.getLogger(__name__)
DATA_DIR_ENV = "LDM_DATA_DIR"


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
