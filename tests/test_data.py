"""IDX reading and validation, data-dir resolution, verify and download (local file:// only).

An IDX directory is read as every stage reads it, through `load_dataset`; the tests of one
split's files use `read_split`, the IDX reader itself."""

from __future__ import annotations

import gzip
import hashlib
import struct
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import register, synthetic_digits, write_dataset
from latentdiffusion import data
from latentdiffusion.data import load_dataset
from latentdiffusion.data.idx import (
    IMAGE_MAGIC,
    LABEL_MAGIC,
    SPLIT_FILES,
    read_idx,
    read_split,
    write_idx,
)
from latentdiffusion.data.registry import DATASETS, resolve_data_dir
from latentdiffusion.errors import DataError, UsageError

TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- IDX format


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path: Path, gz: bool) -> None:
    images, labels = synthetic_digits(13, seed=3)
    suffix = ".gz" if gz else ""
    image_path, label_path = tmp_path / f"i{suffix}", tmp_path / f"l{suffix}"
    write_idx(image_path, images)
    write_idx(label_path, labels)
    raw = image_path.read_bytes()
    assert (raw[:2] == b"\x1f\x8b") is gz  # gzip magic only when the name ends in .gz
    header = gzip.decompress(raw)[:16] if gz else raw[:16]
    assert struct.unpack(">4I", header) == (IMAGE_MAGIC, 13, 28, 28)
    np.testing.assert_array_equal(read_idx(image_path, IMAGE_MAGIC), images)
    back = read_idx(label_path, LABEL_MAGIC)
    assert back.shape == (13,) and back.dtype == np.uint8
    np.testing.assert_array_equal(back, labels)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_dataset_shapes_and_dtypes(tmp_path: Path, gz: bool) -> None:
    root = write_dataset(tmp_path / "d", n_train=30, n_test=20, gz=gz)
    dataset = load_dataset(root)
    images, labels = dataset.split("train")
    expected_images, expected_labels = synthetic_digits(30, seed=0)
    assert images.shape == (30, 28, 28) and images.dtype == np.uint8
    assert labels is not None and labels.dtype == np.int64
    np.testing.assert_array_equal(images, expected_images)
    np.testing.assert_array_equal(labels, expected_labels)
    assert dataset.split("test")[0].shape == (20, 28, 28)
    assert (dataset.source, dataset.class_names) == ("idx", tuple("0123456789"))


@pytest.mark.parametrize("read", [lambda root: load_dataset(root).split("valid"),
                                  lambda root: read_split(root, "valid")])
def test_unknown_split_is_a_usage_error(data_dir: Path, read) -> None:
    with pytest.raises(UsageError, match="unknown split 'valid'"):
        read(data_dir)


def test_unit_tensor_and_uint8_are_inverse() -> None:
    images, _ = synthetic_digits(4, seed=5)
    unit = data.to_unit_tensor(images)
    assert unit.shape == (4, 1, 28, 28) and unit.dtype == torch.float32
    assert float(unit.min()) >= 0 and float(unit.max()) == 1.0
    np.testing.assert_array_equal(data.to_uint8(unit), images)
    assert data.to_uint8(torch.full((1, 1, 28, 28), 2.0)).max() == 255  # clipped


# ---------------------------------------------------------------- corrupt files


def test_missing_data_dir_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="does not exist") as err:
        load_dataset(missing)
    assert str(missing) in str(err.value) and "--data-dir" in str(err.value)


def test_missing_one_file_names_it(data_dir: Path) -> None:
    (data_dir / f"{TRAIN_LABELS}.gz").unlink()
    with pytest.raises(DataError, match="is missing") as err:
        load_dataset(data_dir)
    assert str(data_dir / f"{TRAIN_LABELS}.gz") in str(err.value)
    assert read_split(data_dir, "test")[0].shape == (40, 28, 28)  # the other split's files read


def test_truncated_gzip(data_dir: Path) -> None:
    path = data_dir / f"{TRAIN_IMAGES}.gz"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="truncated or corrupt gzip") as err:
        load_dataset(data_dir)
    assert str(path) in str(err.value)


def test_garbled_gzip(data_dir: Path) -> None:
    path = data_dir / f"{TRAIN_IMAGES}.gz"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # corrupt deflate data or its CRC
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError) as err:
        load_dataset(data_dir)
    assert str(path) in str(err.value)


def test_labels_where_images_are_expected(data_dir: Path) -> None:
    path = data_dir / f"{TRAIN_IMAGES}.gz"
    write_idx(path, np.zeros(96, dtype=np.uint8))  # a label file under the image name
    with pytest.raises(DataError, match=f"wrong magic number {LABEL_MAGIC}") as err:
        load_dataset(data_dir)
    assert str(path) in str(err.value)


def test_patched_magic_byte(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "d", n_train=10, n_test=10, gz=False)
    path = root / TRAIN_LABELS
    raw = bytearray(path.read_bytes())
    raw[2] = 0x0D  # data type byte: 0x08 (uint8) -> 0x0d (float32)
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="wrong magic number") as err:
        load_dataset(root)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("change", [-1, +1])
def test_size_not_matching_header(tmp_path: Path, change: int) -> None:
    root = write_dataset(tmp_path / "d", n_train=10, n_test=10, gz=False)
    path = root / TRAIN_IMAGES
    raw = path.read_bytes()
    path.write_bytes(raw[:change] if change < 0 else raw + b"\0")
    with pytest.raises(DataError, match="does not match its header") as err:
        load_dataset(root)
    message = str(err.value)
    assert str(path) in message and "10x28x28" in message and str(len(raw) + change) in message


@pytest.mark.parametrize("size", [0, 5, 12])
def test_file_cut_inside_the_header(tmp_path: Path, size: int) -> None:
    root = write_dataset(tmp_path / "d", n_train=10, n_test=10, gz=False)
    path = root / TRAIN_IMAGES
    path.write_bytes(path.read_bytes()[:size])  # 12 bytes: magic and 2 of the 3 dimensions
    with pytest.raises(DataError) as err:
        load_dataset(root)
    assert str(path) in str(err.value)


def test_image_label_count_mismatch(data_dir: Path) -> None:
    write_idx(data_dir / f"{TRAIN_LABELS}.gz", np.zeros(95, dtype=np.uint8))
    with pytest.raises(DataError, match="96 images but .* 95 labels") as err:
        load_dataset(data_dir)
    assert str(data_dir / f"{TRAIN_IMAGES}.gz") in str(err.value)
    assert str(data_dir / f"{TRAIN_LABELS}.gz") in str(err.value)


def test_idx_image_sizes(data_dir: Path) -> None:
    # Any square side the models take (a multiple of 4 in 16..64), the same in both splits.
    for split, n in (("train", 96), ("t10k", 40)):
        write_idx(data_dir / f"{split}-images-idx3-ubyte.gz", np.zeros((n, 32, 32), np.uint8))
    assert load_dataset(data_dir).image_size == 32
    path = data_dir / f"{TRAIN_IMAGES}.gz"
    write_idx(path, np.zeros((96, 30, 30), dtype=np.uint8))
    with pytest.raises(DataError) as err:  # refused from the header, before the pixels
        load_dataset(data_dir)
    assert str(err.value) == (f"{path}: images are 30x30; they must be square, with a side "
                              "that is a multiple of 4 from 16 to 64")
    write_idx(path, np.zeros((96, 28, 28), dtype=np.uint8))
    with pytest.raises(DataError, match=r"test images are \(32, 32\), train images \(28, 28\); "
                                        "both splits must match"):
        load_dataset(data_dir)


def test_idx_labels_beyond_the_class_list(data_dir: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    labels = np.arange(40, dtype=np.uint8) % 11
    write_idx(data_dir / "t10k-labels-idx1-ubyte.gz", labels)
    # An unregistered directory takes its classes from its labels: 0..10 are 11 classes.
    assert load_dataset(data_dir).class_names == tuple(str(k) for k in range(11))
    # Registered as MNIST, whose registry lists 10 classes, label 10 has no class.
    register(monkeypatch, data_dir, "mnist")
    with pytest.raises(DataError) as err:
        load_dataset(data_dir, "mnist")
    assert str(err.value) == f"{data_dir} (idx): test labels must be in 0..9, found 10"


# ---------------------------------------------------------------- data dir


def test_resolve_data_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    assert resolve_data_dir(None) == tmp_path / "xdg" / "latentdiffusion" / "mnist"
    assert resolve_data_dir(None, "fashion-mnist") == (tmp_path / "xdg" / "latentdiffusion"
                                                       / "fashion-mnist")
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "env"))
    assert resolve_data_dir(None) == tmp_path / "env"
    assert resolve_data_dir("") == tmp_path / "env"  # an empty --data-dir means unset
    assert resolve_data_dir(tmp_path / "flag") == tmp_path / "flag"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_data_dir("~/m") == tmp_path / "home" / "m"
    monkeypatch.delenv(data.DATA_DIR_ENV)
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert resolve_data_dir(None) == tmp_path / "home" / ".cache" / "latentdiffusion" / "mnist"


def test_load_dataset_uses_env_data_dir(data_dir: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(data.DATA_DIR_ENV, str(data_dir))
    assert load_dataset(None).test_images.shape == (40, 28, 28)


# ---------------------------------------------------------------- verify


def _content_md5(path: Path) -> str:
    raw = path.read_bytes()
    return hashlib.md5(gzip.decompress(raw) if path.suffix == ".gz" else raw).hexdigest()


def _register_content(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    """Make the synthetic files in `root` the registered mnist release (by content)."""
    content = {path.name.removesuffix(".gz"): _content_md5(path) for path in root.iterdir()}
    monkeypatch.setitem(DATASETS, "mnist", replace(DATASETS["mnist"], content_md5=content))


def test_registry_content_md5s_name_the_same_files_as_the_archives() -> None:
    for info in DATASETS.values():
        assert sorted(info.content_md5) == sorted(n.removesuffix(".gz") for n in info.md5)
        assert sorted(info.content_md5) == sorted(s for pair in SPLIT_FILES.values()
                                                  for s in pair)
        assert len(info.class_names) == 10 and len(set(info.class_names)) == 10
    assert DATASETS["fashion-mnist"].class_names[0] == "T-shirt/top"


def test_verify_rejects_content_that_parses_but_is_not_the_original(data_dir: Path) -> None:
    with pytest.raises(DataError, match="content differs") as err:
        data.verify(data_dir)
    message = str(err.value)
    assert "\n" not in message
    for stem, expected in DATASETS["mnist"].content_md5.items():
        path = data_dir / f"{stem}.gz"  # all four synthetic files are named, with both MD5s
        assert (f"{path}: content differs from the original mnist release (decompressed MD5 "
                f"{_content_md5(path)}, expected {expected})") in message


@pytest.mark.parametrize("recompress", ["gzip-1-no-name", "gzip-9", "raw"])
def test_verify_accepts_the_same_content_however_compressed(
        data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, recompress: str) -> None:
    _register_content(monkeypatch, data_dir)
    assert data.verify(data_dir) == {"train": {"images": [96, 28, 28], "labels": 96},
                                     "test": {"images": [40, 28, 28], "labels": 40}}
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in data_dir.iterdir():
        content = gzip.decompress(path.read_bytes())
        if recompress == "raw":
            (copy / path.stem).write_bytes(content)
        else:  # mtime=0 and no file name, as Debian's packages are built
            level = 1 if recompress == "gzip-1-no-name" else 9
            (copy / path.name).write_bytes(gzip.compress(content, compresslevel=level, mtime=0))
            assert (copy / path.name).read_bytes() != path.read_bytes()  # other bytes
    assert data.verify(copy)["test"] == {"images": [40, 28, 28], "labels": 40}

    # One changed byte (a pixel: the file still parses) fails, and only its file is named.
    name = "t10k-images-idx3-ubyte" + ("" if recompress == "raw" else ".gz")
    content = bytearray(gzip.decompress((data_dir / "t10k-images-idx3-ubyte.gz").read_bytes()))
    content[-1] ^= 1
    (copy / name).write_bytes(bytes(content) if recompress == "raw"
                              else gzip.compress(bytes(content)))
    with pytest.raises(DataError) as err:
        data.verify(copy)
    message = str(err.value)
    assert message.startswith(f"{copy / name}: content differs from the original mnist release "
                              f"(decompressed MD5 {hashlib.md5(content).hexdigest()}, expected "
                              f"{DATASETS['mnist'].content_md5['t10k-images-idx3-ubyte']})")
    assert message.count("content differs") == 1


def _real_mnist() -> Path | None:
    for parent in Path(__file__).resolve().parents:
        candidate = parent / "shared" / "data" / "mnist"
        if (candidate / "train-images-idx3-ubyte.gz").is_file():
            return candidate
    return None


def test_verify_real_mnist_recompressed(tmp_path: Path) -> None:
    source = _real_mnist()
    if source is None:
        pytest.skip("real MNIST not found in shared/data/mnist above the tests")
    copy = tmp_path / "mnist"
    copy.mkdir()
    for stem in DATASETS["mnist"].content_md5:
        content = gzip.decompress((source / f"{stem}.gz").read_bytes())
        if stem.startswith("t10k"):  # the test split raw, the training split at level 1
            (copy / stem).write_bytes(content)
        else:
            (copy / f"{stem}.gz").write_bytes(gzip.compress(content, compresslevel=1, mtime=0))
    assert (copy / "train-images-idx3-ubyte.gz").read_bytes() \
        != (source / "train-images-idx3-ubyte.gz").read_bytes()
    assert data.verify(copy) == {"train": {"images": [60000, 28, 28], "labels": 60000},
                                 "test": {"images": [10000, 28, 28], "labels": 10000}}
    with pytest.raises(DataError, match="original fashion-mnist release"):
        data.verify(copy, "fashion-mnist")


def test_verify_refuses_unusable_image_shapes_from_the_header(data_dir: Path) -> None:
    path = data_dir / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(struct.pack(">4I", IMAGE_MAGIC, 1, 2**32 - 1, 2**32 - 1)))
    with pytest.raises(DataError, match=f"{path}: images are 4294967295x4294967295; they must "
                                        "be square, with a side that is a multiple of 4"):
        data.verify(data_dir)


def test_verify_unknown_dataset(data_dir: Path) -> None:
    with pytest.raises(UsageError, match="unknown dataset 'cifar'"):
        data.verify(data_dir, "cifar")


# ---------------------------------------------------------------- download


@pytest.fixture
def mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A local file:// mirror holding synthetic .gz files, registered as the only mirror."""
    source = write_dataset(tmp_path / "mirror", n_train=20, n_test=10)
    md5 = {name: _md5(source / name) for name in DATASETS["mnist"].md5}
    content = {name.removesuffix(".gz"): _content_md5(source / name) for name in md5}
    info = replace(DATASETS["mnist"], mirrors=(source.as_uri() + "/",), md5=md5,
                   content_md5=content)
    monkeypatch.setitem(DATASETS, "mnist", info)
    return source


def test_download_from_local_mirror(mirror: Path, tmp_path: Path) -> None:
    target = tmp_path / "downloaded"
    calls: list[tuple[int, int]] = []
    assert data.download(target, progress=lambda done, total: calls.append((done, total))) \
        == target
    names = sorted(DATASETS["mnist"].md5)
    assert sorted(p.name for p in target.iterdir()) == names  # no .part files left
    for name in names:
        assert (target / name).read_bytes() == (mirror / name).read_bytes()
    sizes = {(mirror / name).stat().st_size for name in names}
    assert {total for _, total in calls} == sizes and {done for done, _ in calls} >= sizes
    assert data.verify(target)["train"]["labels"] == 20

    # Files already present with the right MD5 are not fetched again.
    calls.clear()
    data.download(target, progress=lambda done, total: calls.append((done, total)))
    assert calls == []


def test_download_falls_back_to_the_next_mirror(mirror: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    info = DATASETS["mnist"]
    dead = (tmp_path / "dead").as_uri() + "/"
    monkeypatch.setitem(DATASETS, "mnist", replace(info, mirrors=(dead, *info.mirrors)))
    target = data.download(tmp_path / "out")
    assert all((target / name).read_bytes() == (mirror / name).read_bytes()
               for name in info.md5)


def test_download_replaces_a_corrupt_file(mirror: Path, tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    name = f"{TRAIN_IMAGES}.gz"
    (target / name).write_bytes(b"garbage")
    data.download(target)
    assert (target / name).read_bytes() == (mirror / name).read_bytes()


def test_download_rejects_wrong_md5_leaving_no_partial_file(
        mirror: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    info = DATASETS["mnist"]
    bad = f"{TRAIN_IMAGES}.gz"
    monkeypatch.setitem(DATASETS, "mnist", replace(info, md5={**info.md5, bad: "0" * 32}))
    target = tmp_path / "out"
    with pytest.raises(DataError, match="MD5 mismatch") as err:
        data.download(target)
    assert bad in str(err.value) and "--data-dir" in str(err.value)
    assert not (target / bad).exists()
    assert not list(target.glob("*.part"))
    # An existing file is left alone when the replacement fails its MD5.
    (target / bad).write_bytes(b"old")
    with pytest.raises(DataError):
        data.download(target)
    assert (target / bad).read_bytes() == b"old" and not list(target.glob("*.part"))


def test_download_with_no_reachable_mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                           ) -> None:
    info = DATASETS["mnist"]
    monkeypatch.setitem(DATASETS, "mnist",
                        replace(info, mirrors=((tmp_path / "none").as_uri() + "/",)))
    target = tmp_path / "out"
    with pytest.raises(DataError, match="could not download") as err:
        data.download(target)
    assert "none" in str(err.value)
    assert list(target.iterdir()) == []
