"""`Dataset` and `load_dataset`: IDX directories named by content, folders of images, .npz
files, the content hash and the in-process cache, on tiny data the tests write themselves."""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import register, synthetic_digits, write_dataset
from latentdiffusion.data import Dataset, load_dataset
from latentdiffusion.data import dataset as datasets
from latentdiffusion.data.folder import held_out
from latentdiffusion.data.idx import write_idx
from latentdiffusion.errors import DataError, UsageError

FASHION = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
           "Bag", "Ankle boot")


def _pixels(index: int, size: int = 32, rgb: bool = True) -> np.ndarray:
    """A distinct image per index (its first pixel holds the index), uint8."""
    shape = (size, size, 3) if rgb else (size, size)
    image = np.random.default_rng(index).integers(0, 256, shape, dtype=np.uint8)
    image[0, 0] = index
    return image


def _write(root: Path, names: list[str], size: int = 32, rgb: bool = True) -> dict[str, int]:
    """PNG files (relative names) with distinct pixels; name -> index in `names`."""
    for index, name in enumerate(names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_pixels(index, size, rgb)).save(root / name, format="PNG")
    return {name: index for index, name in enumerate(names)}


def _index(images: np.ndarray) -> list[int]:
    """Which `_pixels` index each loaded image is."""
    return [int(image[0, 0, 0] if image.ndim == 3 else image[0, 0]) for image in images]


def _one_line_error(call: Callable[[], object], match: str) -> str:
    with pytest.raises(DataError, match=match) as err:
        call()
    message = str(err.value)
    assert "\n" not in message and message
    return message


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets, "_CACHE", {})


# ---------------------------------------------------------------- folders of images


def test_labelled_rgb_folder_with_train_and_test(tmp_path: Path) -> None:
    root = tmp_path / "pets"
    train = [f"train/{c}/{i}.png" for c in ("dog", "cat") for i in range(5)]
    test = [f"test/{c}/{i}.png" for c in ("dog", "cat") for i in range(2)]
    index = _write(root, train + test)
    jpeg = np.broadcast_to(np.array([200, 100, 50], np.uint8), (32, 32, 3))  # smooth: JPEG
    Image.fromarray(jpeg).save(root / "train" / "cat" / "9.JPG", format="JPEG", quality=95)
    (root / "train" / "cat" / "notes.txt").write_text("ignored")
    Image.fromarray(_pixels(51)).save(root / "train" / "dog" / ".hidden.png")
    ds = load_dataset(root)
    assert (ds.name, ds.source, ds.origin) == ("pets", "folder", str(root))
    assert ds.class_names == ("cat", "dog") and ds.labelled and ds.num_classes == 2
    assert (ds.image_size, ds.channels) == (32, 3)
    assert ds.train_images.shape == (11, 32, 32, 3) and ds.train_images.dtype == np.uint8
    assert ds.test_images.shape == (4, 32, 32, 3)
    assert ds.train_labels is not None and ds.train_labels.dtype == np.int64
    # Sorted relative paths: train/cat/0..4.png, then 9.JPG, then train/dog/0..4.png.
    expected = sorted(train + ["train/cat/9.JPG"])
    assert ds.train_labels.tolist() == [0 if "/cat/" in f else 1 for f in expected]
    for image, name in zip(ds.train_images, expected, strict=True):
        if name.endswith(".png"):  # lossless: the very pixels
            np.testing.assert_array_equal(image, _pixels(index[name]))
        else:
            assert np.abs(image.astype(int) - jpeg).max() <= 3
    assert ds.test_labels is not None
    assert ds.test_labels.tolist() == [0, 0, 1, 1]
    assert _index(ds.test_images) == [index[f] for f in sorted(test)]


def test_pool_holds_out_one_in_ten_by_path_hash(tmp_path: Path) -> None:
    root = tmp_path / "pool"
    names = [f"{c}/{i:03d}.png" for c in ("a", "b", "c") for i in range(40)]
    index = _write(root, names, size=16)
    ds = load_dataset(root)
    expected_test = sorted(n for n in names if held_out(n))
    assert 4 <= len(expected_test) <= 24  # about 1 in 10 of 120
    assert _index(ds.test_images) == [index[n] for n in expected_test]
    train_names = [n for n in names if not held_out(n)]
    assert _index(ds.train_images) == [index[n] for n in train_names]
    assert ds.train_labels is not None and ds.test_labels is not None
    assert ds.train_labels.tolist() == ["abc".index(n[0]) for n in train_names]
    assert ds.test_labels.tolist() == ["abc".index(n[0]) for n in expected_test]
    assert load_dataset(root).content_hash == ds.content_hash  # deterministic

    # A file added elsewhere moves no other file between the splits.
    Image.fromarray(_pixels(200, 16)).save(root / "b" / "zzz.png")
    grown = load_dataset(root)
    assert len(grown.train_images) + len(grown.test_images) == len(names) + 1
    assert set(_index(ds.test_images)) <= set(_index(grown.test_images))
    assert set(_index(ds.train_images)) <= set(_index(grown.train_images))


def test_pool_that_the_hash_holds_nothing_out_of(tmp_path: Path) -> None:
    names = [n for n in (f"{i}.png" for i in range(40)) if not held_out(n)][:3]
    index = _write(tmp_path / "few", names, size=16, rgb=False)
    ds = load_dataset(tmp_path / "few")
    first = sorted(names)[0]  # the fallback: the first image in sorted order
    assert _index(ds.test_images) == [index[first]]
    assert sorted(_index(ds.train_images)) == sorted(index[n] for n in names if n != first)


def test_flat_unlabelled_folder(tmp_path: Path) -> None:
    _write(tmp_path / "flat", [f"{i}.png" for i in range(30)], size=16)
    ds = load_dataset(tmp_path / "flat")
    assert ds.train_labels is None and ds.test_labels is None
    assert (ds.labelled, ds.num_classes, ds.class_names) == (False, 0, ())
    assert len(ds.train_images) + len(ds.test_images) == 30 and len(ds.test_images) >= 1
    assert ds.describe()["class_names"] == []


def test_grayscale_folder_and_one_colour_image(tmp_path: Path) -> None:
    root = tmp_path / "gray"
    index = _write(root, [f"train/{i}.png" for i in range(3)] + ["test/0.png"], rgb=False)
    Image.fromarray(_pixels(9, rgb=False)).convert("1").save(root / "train" / "bw.png")
    sixteen = (_pixels(8, rgb=False).astype(np.uint16) << 8) | 0xFF  # 16-bit gray
    Image.fromarray(sixteen).save(root / "train" / "deep.png")
    ds = load_dataset(root)
    assert ds.channels == 1 and ds.train_images.shape == (5, 32, 32)
    np.testing.assert_array_equal(ds.train_images[0], _pixels(index["train/0.png"], rgb=False))
    assert set(np.unique(ds.train_images[3])) <= {0, 255}  # bw.png
    np.testing.assert_array_equal(ds.train_images[4], _pixels(8, rgb=False))  # scaled, not clipped

    Image.fromarray(_pixels(7)).save(root / "test" / "colour.png")
    ds = load_dataset(root)
    assert ds.channels == 3 and ds.train_images.shape == (5, 32, 32, 3)
    gray = _pixels(index["train/0.png"], rgb=False)
    np.testing.assert_array_equal(ds.train_images[0], np.stack([gray] * 3, axis=-1))
    np.testing.assert_array_equal(ds.test_images[1], _pixels(7))


def test_links_to_folders_are_followed_and_hidden_folders_skipped(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    _write(elsewhere, [f"{i}.png" for i in range(4)], size=16)
    root = tmp_path / "linked"
    _write(root, [f"real/{i}.png" for i in range(4)] + [".cache/0.png"], size=16)
    (root / "via-link").symlink_to(elsewhere, target_is_directory=True)
    ds = load_dataset(root)
    assert ds.class_names == ("real", "via-link")  # not .cache
    assert len(ds.train_images) + len(ds.test_images) == 8
    (elsewhere / "loop").symlink_to(root, target_is_directory=True)
    _one_line_error(lambda: load_dataset(root), "leads back to a folder already read")


@pytest.mark.parametrize(("setup", "match"), [
    ("corrupt", r"bad\.png: not a readable PNG or JPEG image"),
    ("sizes", r"b\.png is 16x16 but .*a\.png is 32x32; every image must have the same size"),
    ("mixed", r"holds both images \(a\.png\) and folders \(cls\)"),
    ("size30", "a.png: images are 30x30; they must be square, with a side that is a multiple"),
    ("size100", "a.png: images are 100x100; they must be square"),
    ("oblong", "a.png: images are 32x16; they must be square"),
    ("empty", "holds neither the four IDX files nor any .png or .jpg image; --data-dir takes"),
    ("classes", r"same class folders \(only in train/: dog; only in test/: -\)"),
    ("layouts", "one of train/ and test/ has class folders and the other holds images"),
    ("single", "one image cannot make both a train and a test split"),
    ("test-only", "has test/ but no train/; give both splits, or put the class folders"),
])
def test_folder_errors(tmp_path: Path, setup: str, match: str) -> None:
    root = tmp_path / "bad"
    root.mkdir()
    (root / "readme.txt").write_text("not an image")
    if setup in ("corrupt", "sizes", "mixed"):
        _write(root, ["a.png", "c.png"])
        if setup == "corrupt":
            (root / "bad.png").write_bytes((root / "a.png").read_bytes()[:60])
        elif setup == "sizes":
            _write(root, ["b.png"], size=16)
        else:
            _write(root, ["x.png", "cls/y.png"])
    elif setup in ("size30", "size100", "oblong"):
        side = {"size30": 30, "size100": 100, "oblong": 32}[setup]
        Image.fromarray(np.zeros((side, side * 16 // 32 if setup == "oblong" else side),
                                 np.uint8)).save(root / "a.png")
        _write(root, ["b.png"])
    elif setup == "classes":
        _write(root, ["train/cat/0.png", "train/dog/0.png", "test/cat/0.png"])
    elif setup == "layouts":
        _write(root, ["train/cat/0.png", "test/0.png"])
    elif setup == "test-only":  # not one class called "test"
        _write(root, ["test/cat/0.png", "test/cat/1.png", "test/dog/0.png"])
    elif setup == "single":
        _write(root, ["only.png"])
    message = _one_line_error(lambda: load_dataset(root), match)
    if setup == "sizes":
        assert str(root / "b.png") in message


def test_missing_path_and_other_files(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    message = _one_line_error(lambda: load_dataset(missing),
                              f"data directory {missing} does not exist")
    assert "four IDX files" in message and "folder of" in message and ".npz" in message
    text = tmp_path / "data.csv"
    text.write_text("1,2,3")
    _one_line_error(lambda: load_dataset(text), "is not a directory, nor a regular file ending "
                                                "in .npz")
    _one_line_error(lambda: load_dataset(text, "mnist"), "is not a directory")
    with pytest.raises(UsageError, match="unknown dataset 'cifar'"):
        load_dataset(tmp_path, "cifar")


# ---------------------------------------------------------------- .npz files


def _arrays(n_train: int = 12, n_test: int = 5, size: int = 16) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"train_images": rng.integers(0, 256, (n_train, size, size, 3), dtype=np.uint8),
            "test_images": rng.integers(0, 256, (n_test, size, size, 3), dtype=np.uint8),
            "train_labels": np.arange(n_train, dtype=np.uint8) % 3,
            "test_labels": np.arange(n_test, dtype=np.int32) % 3}


def test_npz_labelled_and_unlabelled(tmp_path: Path) -> None:
    arrays = _arrays()
    np.savez(tmp_path / "toys.npz", **arrays, class_names=np.array(["ball", "car", "doll"]))
    ds = load_dataset(tmp_path / "toys.npz")
    assert (ds.name, ds.source, ds.class_names) == ("toys", "npz", ("ball", "car", "doll"))
    assert (ds.image_size, ds.channels) == (16, 3)
    np.testing.assert_array_equal(ds.train_images, arrays["train_images"])
    assert ds.train_labels is not None and ds.train_labels.dtype == np.int64
    assert ds.train_labels.tolist() == arrays["train_labels"].tolist()

    np.savez_compressed(tmp_path / "named.npz", **arrays)  # no class_names: "0".."2"
    assert load_dataset(tmp_path / "named.npz").class_names == ("0", "1", "2")

    gray = {key: arrays[key][..., 0] for key in ("train_images", "test_images")}
    np.savez(tmp_path / "plain.npz", **gray)
    ds = load_dataset(tmp_path / "plain.npz")
    assert (ds.labelled, ds.class_names, ds.channels) == (False, (), 1)
    assert ds.test_images.shape == (5, 16, 16)


@pytest.mark.parametrize(("change", "match"), [
    ({"train_images": np.zeros((4, 16, 16), np.float32)},
     "train_images must be uint8 0..255, got float32"),
    ({"test_images": np.zeros((4, 30, 30), np.uint8)}, "test_images: images are 30x30"),
    ({"test_images": np.zeros((4, 16, 16, 4), np.uint8)}, r"neither \(N, H, W\) grayscale"),
    ({"test_images": np.zeros((0, 16, 16, 3), np.uint8)}, "holds 0 images"),
    ({"test_labels": np.array([0, 1, 2, 3, 0])}, r"test_labels must be in 0..2 .* found 3"),
    ({"train_labels": -np.ones(12, np.int64)}, "train_labels must be in 0..2 .* found -1"),
    ({"test_labels": np.zeros(4, np.int64)}, r"test_labels must be integers of shape \(5,\)"),
    ({"test_labels": None}, "one split has labels and the other not"),
    ({"images": np.zeros((4, 16, 16), np.uint8)}, "holds class_names, images, test_images"),
    ({"class_names": np.array([1, 2, 3])}, "class_names must be a 1-D array"),
])
def test_npz_errors(tmp_path: Path, change: dict, match: str) -> None:
    arrays = {**_arrays(), "class_names": np.array(["a", "b", "c"]), **change}
    np.savez(tmp_path / "bad.npz", **{k: v for k, v in arrays.items() if v is not None})
    _one_line_error(lambda: load_dataset(tmp_path / "bad.npz"), match)


def test_npz_that_is_not_a_zip_or_is_truncated(tmp_path: Path) -> None:
    np.savez(tmp_path / "good.npz", **_arrays())
    (tmp_path / "cut.npz").write_bytes((tmp_path / "good.npz").read_bytes()[:500])
    _one_line_error(lambda: load_dataset(tmp_path / "cut.npz"), "cut.npz")
    np.save(tmp_path / "one.npy", np.zeros((4, 16, 16), np.uint8))
    (tmp_path / "one.npy").rename(tmp_path / "one.npz")
    _one_line_error(lambda: load_dataset(tmp_path / "one.npz"), "is not a zip archive")


def test_npz_header_declaring_more_images_than_it_holds(tmp_path: Path) -> None:
    np.savez(tmp_path / "a.npz", **_arrays())
    raw = (tmp_path / "a.npz").read_bytes()  # np.savez stores members uncompressed
    patched = raw.replace(b"(12, 16, 16, 3)", b"(99999,16,16,3)", 1)  # the same length
    assert patched != raw
    (tmp_path / "b.npz").write_bytes(patched)
    _one_line_error(lambda: load_dataset(tmp_path / "b.npz"),
                    r"train_images.npy declares \(99999, 16, 16, 3\) uint8 .* the file is corrupt")


# ---------------------------------------------------------------- IDX directories


def test_idx_directory_named_by_content(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = write_dataset(tmp_path / "digits", n_train=20, n_test=10)
    ds = load_dataset(root)
    assert (ds.name, ds.source, ds.class_names) == ("digits", "idx", tuple("0123456789"))
    images, labels = synthetic_digits(20, seed=0)
    np.testing.assert_array_equal(ds.train_images, images)
    assert ds.train_labels is not None and ds.train_labels.tolist() == labels.tolist()

    register(monkeypatch, root, "fashion-mnist")
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in root.iterdir():  # level 1, no file name: other bytes, the same content
        (copy / path.name).write_bytes(gzip.compress(gzip.decompress(path.read_bytes()),
                                                     compresslevel=1, mtime=0))
    for directory in (root, copy):
        named = load_dataset(directory)
        assert (named.name, named.class_names) == ("fashion-mnist", FASHION)
        np.testing.assert_array_equal(named.test_images, ds.test_images)
    write_idx(copy / "t10k-labels-idx1-ubyte.gz", np.zeros(10, np.uint8))
    assert load_dataset(copy).name == "copy"  # parses, but is another content
    # A registered name given is a promise of that release's content, and is checked.
    assert load_dataset(root, "fashion-mnist").name == "fashion-mnist"
    with pytest.raises(DataError, match="does not hold the mnist release"):
        load_dataset(root, "mnist")


def test_idx_of_another_size_and_an_unusable_one(tmp_path: Path) -> None:
    root = tmp_path / "big"
    root.mkdir()
    for prefix, n in (("train", 6), ("t10k", 3)):
        write_idx(root / f"{prefix}-images-idx3-ubyte", np.full((n, 32, 32), 7, np.uint8))
        write_idx(root / f"{prefix}-labels-idx1-ubyte", np.arange(n, dtype=np.uint8) % 3)
    ds = load_dataset(root)
    assert ds.train_images.shape == (6, 32, 32) and ds.class_names == ("0", "1", "2")
    write_idx(root / "t10k-images-idx3-ubyte", np.zeros((3, 30, 30), np.uint8))
    _one_line_error(lambda: load_dataset(root), "t10k-images-idx3-ubyte: images are 30x30")
    (root / "t10k-images-idx3-ubyte").unlink()
    _one_line_error(lambda: load_dataset(root), "t10k-images-idx3-ubyte.gz is missing")


def test_real_mnist_is_named_mnist() -> None:
    shared = [p / "shared" / "data" / "mnist" for p in Path(__file__).resolve().parents]
    found = [p for p in shared if (p / "train-images-idx3-ubyte.gz").is_file()]
    if not found:
        pytest.skip("real MNIST not found in shared/data/mnist above the tests")
    ds = load_dataset(found[0])
    assert (ds.name, ds.num_classes, len(ds.train_images), len(ds.test_images)) == \
        ("mnist", 10, 60000, 10000)
    assert np.bincount(ds.test_labels).tolist()[:3] == [980, 1135, 1032]  # type: ignore[arg-type]


# ---------------------------------------------------------------- Dataset, hash, cache


def _dataset(**change: object) -> Dataset:
    arrays = _arrays()
    fields = {"name": "toys", "source": "npz", "train_images": arrays["train_images"],
              "train_labels": arrays["train_labels"].astype(np.int64),
              "test_images": arrays["test_images"],
              "test_labels": arrays["test_labels"].astype(np.int64),
              "class_names": ("a", "b", "c"), **change}
    return Dataset(**fields)  # type: ignore[arg-type]


def test_content_hash_follows_content_only() -> None:
    base = _dataset()
    assert _dataset(name="other", source="folder").content_hash == base.content_hash
    image = base.train_images.copy()
    image[3, 1, 2, 0] ^= 1  # one pixel
    labels = base.test_labels.copy()  # type: ignore[union-attr]
    labels[0] = (labels[0] + 1) % 3  # one label
    changed = [_dataset(train_images=image), _dataset(test_labels=labels),
               _dataset(class_names=("a", "b", "d")),
               _dataset(train_images=base.test_images, test_images=base.train_images,
                        train_labels=base.test_labels, test_labels=base.train_labels)]
    hashes = {base.content_hash} | {d.content_hash for d in changed}
    assert len(hashes) == 5 and all(len(h) == 64 for h in hashes)
    described = json.loads(json.dumps(base.describe()))
    assert described == {"name": "toys", "source": "npz", "content_sha256": base.content_hash,
                         "image_size": 16, "channels": 3, "train": 12, "test": 5,
                         "class_names": ["a", "b", "c"]}


def test_folder_and_npz_of_the_same_content_hash_alike(tmp_path: Path) -> None:
    _write(tmp_path / "f", [f"{s}/{c}/{i}.png" for s in ("train", "test") for c in "xy"
                            for i in range(2)], size=16)
    folder = load_dataset(tmp_path / "f")
    np.savez(tmp_path / "f.npz", train_images=folder.train_images, test_images=folder.test_images,
             train_labels=folder.train_labels, test_labels=folder.test_labels,
             class_names=np.array(folder.class_names))
    assert load_dataset(tmp_path / "f.npz").content_hash == folder.content_hash


@pytest.mark.parametrize(("change", "match"), [
    ({"test_labels": None}, "one split has labels and the other not"),
    ({"class_names": ()}, "0 class names for labelled images"),
    ({"class_names": ("a", "a", "b")}, "class names repeat"),
    ({"train_labels": np.arange(12, dtype=np.int64)}, "train labels must be in 0..2, found 3"),
    ({"test_labels": np.zeros(5, np.int32)}, r"test labels must be int64 \(5,\)"),
    ({"train_images": np.zeros((12, 16, 16), np.uint8)}, "both splits must match"),
    ({"test_images": np.zeros((0, 16, 16, 3), np.uint8), "test_labels": np.zeros(0, np.int64)},
     "the test split has no images"),
    ({"train_images": np.zeros((12, 16, 16, 3), np.float64)}, "must be uint8 0..255"),
])
def test_dataset_validation(change: dict, match: str) -> None:
    message = _one_line_error(lambda: _dataset(**change), match)
    assert message.startswith("toys (npz): ")
    with pytest.raises(UsageError, match="unknown split 'valid'"):
        _dataset().split("valid")  # type: ignore[arg-type]


def test_cache_decodes_once_and_never_returns_stale_data(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "c"
    _write(root, [f"{i}.png" for i in range(12)], size=16)
    monkeypatch.setattr(datasets, "SETTLE_NS", 3600 * 10**9)  # all files are fresh: racy
    fresh = load_dataset(root)
    assert load_dataset(root) is not fresh
    monkeypatch.setattr(datasets, "SETTLE_NS", 0)
    first = load_dataset(root)
    assert load_dataset(root) is first and load_dataset(str(root)) is first
    assert not first.train_images.flags.writeable  # shared: nobody may change it
    path = root / sorted(os.listdir(root))[0]
    stamp = path.stat().st_mtime_ns
    image = np.asarray(Image.open(path)).copy()
    image[0, 0] ^= 1
    Image.fromarray(image).save(path)  # the same size, maybe within one clock tick
    os.utime(path, ns=(stamp, stamp + 1))
    changed = load_dataset(root)
    assert changed is not first and changed.content_hash != first.content_hash


@pytest.mark.parametrize("dtype", [np.uint16, np.int64])
def test_integer_images_holding_bytes_are_read_as_uint8(tmp_path: Path, dtype: type) -> None:
    images = np.random.default_rng(0).integers(0, 256, (6, 16, 16)).astype(np.uint8)
    np.savez(tmp_path / "bytes.npz", train_images=images, test_images=images[:2])
    np.savez(tmp_path / "wide.npz", train_images=images.astype(dtype),
             test_images=images[:2].astype(dtype))
    wide = load_dataset(tmp_path / "wide.npz")
    assert wide.train_images.dtype == np.uint8
    assert wide.content_hash == load_dataset(tmp_path / "bytes.npz").content_hash


@pytest.mark.parametrize(("images", "advice"), [
    (np.full((6, 16, 16), 0.5), r"float64 holding 0..0.5 \(convert with \(x \* 255\)"),
    (np.full((6, 16, 16), 200.0), r"float64 holding 0..200 \(convert with x.round\(\)"),
    (np.full((6, 16, 16), 65535, np.uint16), r"uint16 holding 0..65535 \(rescale them to 0..255"),
])
def test_other_images_get_advice_that_fits_their_values(tmp_path: Path, images: np.ndarray,
                                                        advice: str) -> None:
    images[0] = 0
    np.savez(tmp_path / "bad.npz", train_images=images, test_images=images[:2])
    _one_line_error(lambda: load_dataset(tmp_path / "bad.npz"),
                    "train_images must be uint8 0..255, got " + advice)
