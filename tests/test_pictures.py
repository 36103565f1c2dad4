"""Pictures of any size and mode (`--image-size S`): resize and centre-crop, modes, EXIF
orientation, the content hash, the on-disk cache and the one-line refusals of bad pictures."""

from __future__ import annotations

import hashlib
import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from latentdiffusion.data import dataset as datasets
from latentdiffusion.data import folder, load_dataset
from latentdiffusion.data.cache import cache_dir
from latentdiffusion.data.prepare import ORIENTATION_TAG, PrepareConfig, prepare_image
from test_cli_errors import CPU, assert_fails, ldm

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def _prepared(path: Path, size: int = 32, background: str = "white") -> np.ndarray:
    with Image.open(path) as image:
        return prepare_image(image, PrepareConfig(size, background))[0]


def _bands(width: int, height: int) -> Image.Image:
    """Left quarter red, middle half blue, right quarter green."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, :] = BLUE
    pixels[:, :width // 4] = RED
    pixels[:, 3 * width // 4:] = GREEN
    return Image.fromarray(pixels)


def _mixed(root: Path, n: int = 24) -> Path:
    """A flat folder of n RGB pictures of different sizes, none of them square."""
    root.mkdir(parents=True)
    for i in range(n):
        _bands(40 + 3 * i, 30 + 2 * i).save(root / f"{i:02d}.png")
    return root


# ---------------------------------------------------------------- resize and crop


def test_a_two_to_one_picture_keeps_its_middle_half(tmp_path: Path) -> None:
    _bands(64, 32).save(tmp_path / "wide.png")
    _bands(64, 32).transpose(Image.Transpose.ROTATE_90).save(tmp_path / "tall.png")
    wide = _prepared(tmp_path / "wide.png")
    assert wide.shape == (32, 32, 3)
    assert (wide == BLUE).all()  # the left and right quarters are cropped away, exactly
    tall = _prepared(tmp_path / "tall.png")
    assert (tall == BLUE).all()


def test_a_large_picture_is_shrunk_antialiased(tmp_path: Path) -> None:
    _bands(256, 128).save(tmp_path / "big.png")
    # A fine checkerboard averages to mid-gray when antialiased; sampling would alias it.
    checker = (np.indices((300, 200)).sum(0) % 2 * 255).astype(np.uint8)
    Image.fromarray(checker).save(tmp_path / "checker.png")
    big = _prepared(tmp_path / "big.png", 16)
    assert big.shape == (16, 16, 3)
    assert (big[:, 4:12] == BLUE).all()  # the middle, away from the crop's edges
    gray = _prepared(tmp_path / "checker.png", 16)
    assert gray.shape == (16, 16)
    assert np.abs(gray.astype(int) - 128).max() <= 3


# ---------------------------------------------------------------- modes and EXIF


def _save(path: Path, mode: str) -> None:
    """A 40x24 picture of one colour in `mode`, transparent where the mode allows it."""
    if mode == "RGBA":
        Image.new("RGBA", (40, 24), (200, 10, 10, 0)).save(path)
    elif mode == "LA":
        Image.new("LA", (40, 24), (90, 0)).save(path)
    elif mode == "P-keyed":
        image = Image.new("P", (40, 24), 3)
        image.putpalette([0, 0, 0] * 3 + [250, 0, 0] + [0, 0, 0] * 252)
        image.save(path, transparency=3)
    elif mode == "P":
        image = Image.new("P", (40, 24), 1)
        image.putpalette([0, 0, 0, 10, 200, 30] + [0, 0, 0] * 254)
        image.save(path)
    elif mode == "I;16":
        Image.fromarray(np.full((24, 40), 0x8000, np.uint16)).save(path)
    elif mode == "1":
        Image.new("1", (40, 24), 1).save(path)
    elif mode == "CMYK":
        Image.new("CMYK", (40, 24), (0, 0, 0, 0)).save(path, quality=100)
    else:
        Image.new(mode, (40, 24), {"L": 77, "RGB": (1, 2, 3)}[mode]).save(path)


@pytest.mark.parametrize(("mode", "suffix", "expected"), [
    ("RGBA", ".png", (16, 32, 48)),  # alpha 0: the background
    ("LA", ".png", (16, 32, 48)),  # gray with alpha on a coloured background: colour
    ("P-keyed", ".png", (16, 32, 48)),
    ("P", ".png", (10, 200, 30)),
    ("RGB", ".png", (1, 2, 3)),
    ("L", ".png", 77),
    ("I;16", ".png", 128),  # 16-bit gray scaled to 8 bits, not clipped at 255
    ("1", ".png", 255),
    ("CMYK", ".jpg", (255, 255, 255)),
])
def test_each_mode_is_converted(tmp_path: Path, mode: str, suffix: str,
                                expected: int | tuple[int, int, int]) -> None:
    path = tmp_path / f"picture{suffix}"
    _save(path, mode)
    got = _prepared(path, 16, background="#102030")
    assert got.dtype == np.uint8
    assert got.shape == ((16, 16) if isinstance(expected, int) else (16, 16, 3))
    assert np.abs(got.astype(int) - np.array(expected)).max() <= 1


def test_gray_transparency_on_a_gray_background_stays_gray(tmp_path: Path) -> None:
    _save(tmp_path / "la.png", "LA")
    got = _prepared(tmp_path / "la.png", 16, background="black")
    assert got.shape == (16, 16)
    assert (got == 0).all()


def _with_orientation(path: Path, image: Image.Image, orientation: int) -> None:
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = orientation
    image.save(path, exif=exif)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_honoured(tmp_path: Path, orientation: int) -> None:
    stored = np.zeros((32, 32, 3), np.uint8)
    stored[:8, :16] = RED  # a mark in the stored picture's top-left
    _with_orientation(tmp_path / "turned.png", Image.fromarray(stored), orientation)
    upright = Image.fromarray(stored).transpose(
        {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_270,
         8: Image.Transpose.ROTATE_90}[orientation])
    assert np.array_equal(_prepared(tmp_path / "turned.png"), np.asarray(upright))
    assert not np.array_equal(np.asarray(upright), stored)


def test_an_orientation_outside_1_to_8_leaves_the_picture_as_stored(tmp_path: Path) -> None:
    stored = _bands(32, 32)
    _with_orientation(tmp_path / "odd.png", stored, 9)
    assert np.array_equal(_prepared(tmp_path / "odd.png"), np.asarray(stored))


# ---------------------------------------------------------------- folders, hashes, cache


def test_mixed_sizes_are_refused_without_image_size_and_read_with_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _mixed(tmp_path / "mixed")
    line = assert_fails(capsys, 1, "data", "verify", "--data-dir", root,
                        match="pass --image-size 28 to resize and centre-crop them all to 28x28")
    assert f"{root / '00.png'}: images are 30x40" in line and f"{root / '01.png'} is 32x43" in line
    square = tmp_path / "square"  # square, usable sizes: the same hint
    square.mkdir()
    for name, side in (("a.png", 32), ("b.png", 48), ("c.png", 32)):
        _bands(side, side).save(square / name)
    assert_fails(capsys, 1, "data", "verify", "--data-dir", square,
                 match=f"{square / 'b.png'} is 48x48 but {square / 'a.png'} is 32x32; every "
                       "image must have the same size, or pass --image-size 32 to resize and "
                       "centre-crop them all to 32x32")
    code, out, err = ldm(capsys, "data", "verify", "--data-dir", root, "--image-size", "32")
    assert code == 0, err
    described = json.loads(out)
    assert described["image_size"] == 32 and described["channels"] == 3
    assert described["prepared"] == {"image_size": 32, "background": "#ffffff"}
    assert described["train"] + described["test"] == 24


def _plain_hash(dataset: datasets.Dataset) -> str:
    """The content hash of a data set read as it is: its arrays and class names only."""
    digest = hashlib.sha256()
    for array in (dataset.train_images, dataset.train_labels, dataset.test_images,
                  dataset.test_labels):
        if array is None:
            digest.update(b"none;")
        else:
            digest.update(f"{array.dtype.str}{array.shape};".encode())
            digest.update(np.ascontiguousarray(array).data)
    digest.update(json.dumps(dataset.class_names).encode())
    return digest.hexdigest()


def test_content_hash_covers_the_settings_and_not_a_plain_folder(tmp_path: Path) -> None:
    root = tmp_path / "same"
    root.mkdir()
    for i in range(12):
        _bands(32, 32).rotate(90 * i).save(root / f"{i}.png")
    plain = load_dataset(root)
    assert plain.content_hash == _plain_hash(plain)
    assert "prepared" not in plain.describe()
    at_32 = load_dataset(root, prepare=PrepareConfig(image_size=32))
    assert np.array_equal(at_32.train_images, plain.train_images)  # nothing to resize...
    assert at_32.content_hash != plain.content_hash  # ... yet prepared: another identity
    at_16 = load_dataset(root, prepare=PrepareConfig(image_size=16))
    black = load_dataset(root, prepare=PrepareConfig(image_size=32, background="black"))
    white = load_dataset(root, prepare=PrepareConfig(image_size=32, background="#FFFFFF"))
    assert len({plain.content_hash, at_32.content_hash, at_16.content_hash,
                black.content_hash}) == 4
    assert white.content_hash == at_32.content_hash  # one colour, two spellings


def _settle_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Files written by the test count as settled (no 2 s wait before they are cached)."""
    monkeypatch.setattr(datasets, "SETTLE_NS", -10**9)
    datasets._CACHE.clear()


def test_a_prepared_folder_is_read_from_the_cache_the_second_time(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prepared_cache: Path) -> None:
    _settle_at_once(monkeypatch)
    root = _mixed(tmp_path / "mixed")
    first = load_dataset(root, prepare=PrepareConfig(image_size=16))
    assert cache_dir() == prepared_cache
    assert len(list(prepared_cache.glob("*.npz"))) == 1
    assert not list(root.glob("*.npz")) and len(list(root.iterdir())) == 24  # data untouched
    datasets._CACHE.clear()  # a new command: only the disk cache is left

    def no_decoding(*args: object) -> None:
        raise AssertionError("decoded again")

    monkeypatch.setattr(folder, "prepare_image", no_decoding)
    second = load_dataset(root, prepare=PrepareConfig(image_size=16))
    assert np.array_equal(second.train_images, first.train_images)
    assert np.array_equal(second.test_images, first.test_images)
    assert second.content_hash == first.content_hash
    with pytest.raises(AssertionError, match="decoded again"):  # other settings: decoded
        load_dataset(root, prepare=PrepareConfig(image_size=20))


def test_a_corrupt_cache_file_is_recomputed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            prepared_cache: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    _settle_at_once(monkeypatch)
    root = _mixed(tmp_path / "mixed")
    first = load_dataset(root, prepare=PrepareConfig(image_size=16))
    (cached,) = prepared_cache.glob("*.npz")
    cached.write_bytes(cached.read_bytes()[:100])
    datasets._CACHE.clear()
    again = load_dataset(root, prepare=PrepareConfig(image_size=16))
    assert np.array_equal(again.train_images, first.train_images)
    assert any("is damaged" in r.getMessage() for r in caplog.records)
    datasets._CACHE.clear()
    caplog.clear()
    monkeypatch.setattr(folder, "prepare_image", None)  # rewritten whole: read, not decoded
    assert np.array_equal(load_dataset(root, prepare=PrepareConfig(image_size=16))
                          .train_images, first.train_images)
    assert not caplog.records


def test_an_npz_is_resized_to_image_size(tmp_path: Path,
                                         caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (10, 16, 16), dtype=np.uint8)
    np.savez(tmp_path / "small.npz", train_images=images, test_images=images[:4])
    plain = load_dataset(tmp_path / "small.npz")
    larger = load_dataset(tmp_path / "small.npz", prepare=PrepareConfig(image_size=32))
    assert larger.train_images.shape == (10, 32, 32) and larger.test_images.shape == (4, 32, 32)
    assert larger.content_hash != plain.content_hash
    assert any("upscaled to 32x32" in r.getMessage() for r in caplog.records)
    flat = np.full((6, 32, 32, 3), 77, np.uint8)
    np.savez(tmp_path / "flat.npz", train_images=flat, test_images=flat)
    smaller = load_dataset(tmp_path / "flat.npz", prepare=PrepareConfig(image_size=16))
    assert smaller.train_images.shape == (6, 16, 16, 3) and (smaller.train_images == 77).all()


# ---------------------------------------------------------------- bad pictures


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height and holds a few bytes of pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(bytes(2000))) + chunk(b"IEND", b""))


def _with_bad(tmp_path: Path, name: str, content: bytes | None = None) -> Path:
    root = _mixed(tmp_path / "pics", n=6)
    if content is not None:
        (root / name).write_bytes(content)
    return root


def _jpeg_bytes() -> bytes:
    noise = np.random.default_rng(0).integers(0, 256, (80, 100, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "JPEG")
    return buffer.getvalue()


def _hostile_exif() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30)).save(buffer, "PNG",
                                    exif=b"MM\x00\x2a\x00\x00\x00\x08\xff\xff" + bytes(10))
    return buffer.getvalue()


@pytest.mark.parametrize(("name", "content", "match"), [
    ("bomb.png", _png_header_only(20_000, 20_000),
     "bomb.png is 20000x20000 pixels (400 megapixels), more than the 50 megapixels"),
    ("cut.jpg", _jpeg_bytes()[:1500], "cut.jpg: not a readable PNG or JPEG image"),
    ("text.png", b"not a picture at all", "text.png: not a readable PNG or JPEG image"),
    ("exif.png", _hostile_exif(), "exif.png: its EXIF data is damaged"),
])
def test_a_bad_picture_is_one_line_and_no_run_dir(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, content: bytes,
        match: str) -> None:
    root = _with_bad(tmp_path, name, content)
    run = tmp_path / "run"
    assert_fails(capsys, 1, "run", "--preset", "tiny", "--data-dir", root, "--image-size", "16",
                 "--run-dir", run, *CPU, match=match)
    assert not run.exists()
    assert sorted(p.name for p in root.iterdir()) == sorted(
        [f"{i:02d}.png" for i in range(6)] + [name])  # nothing written beside the pictures


@pytest.mark.parametrize(("argv", "match"), [
    (["--image-size", "10"], "argument --image-size: must be a multiple of 4 from 16 to 64"),
    (["--image-size", "100"], "argument --image-size: must be a multiple of 4 from 16 to 64"),
    (["--image-size", "30"], "got 30"),
    (["--set", "data.image_size=30"], "PrepareConfig.image_size must be 0 (the images' own "
                                      "size) or a multiple of 4 from 16 to 64, got 30"),
    (["--set", "data.background=nocolour"], "PrepareConfig.background: unknown colour "
                                            "'nocolour'"),
])
def test_bad_settings_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                   argv: list[str], match: str) -> None:
    root = _mixed(tmp_path / "pics", n=6)
    run = tmp_path / "run"
    assert_fails(capsys, 2, "run", "--preset", "tiny", "--data-dir", root, *argv,
                 "--run-dir", run, *CPU, match=match)
    assert not run.exists()


def test_pictures_smaller_than_s_are_upscaled_with_one_warning(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _mixed(tmp_path / "pics", n=6)  # 40x30 up to 55x40
    code, out, err = ldm(capsys, "data", "verify", "--data-dir", root, "--image-size", "36")
    assert code == 0
    assert json.loads(out)["image_size"] == 36
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: {root}: 3 of 6 images are smaller than 36x36; they were "
                        "upscaled (blurrier than the rest)"]


def test_a_config_file_carries_image_size(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    root = _mixed(tmp_path / "pics", n=6)
    code, out, err = ldm(capsys, "config", "--preset", "tiny", "--data-dir", root,
                         "--image-size", "16", "--set", "data.background=black")
    assert code == 0, err
    assert '[data]\nimage_size = 16\nbackground = "black"' in out
    assert "image_size = 16" in out.split("[classifier]")[1].split("[")[0]  # scaled to it
    config = tmp_path / "mine.toml"
    config.write_text(out)
    # The file alone prepares the folder (a mixed one, refused without it) and fits it.
    code, again, err = ldm(capsys, "config", "--preset", "tiny", "--data-dir", root,
                           "--config", config)
    assert code == 0, err
    assert again.split("\n", 1)[1] == out.split("\n", 1)[1]  # (the first line: the command)
    assert_fails(capsys, 2, "config", "--data-dir", root, "--config", config, "--image-size",
                 "20", match="the config is for images 16x16x3, no labels but the data set "
                             "has 20x20x3")


def test_a_mixed_folder_runs_end_to_end_and_later_commands_prepare_it_alike(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`ldm run --image-size 16` (with mirroring) on pictures of 100 sizes; `ldm sample
    --reconstruct` then reads the run's own preparation from run.json."""
    root = _mixed(tmp_path / "pics", n=100)  # 1 in 10 held out: a test split of about 10
    run = tmp_path / "run"
    code, _, err = ldm(capsys, "run", "--preset", "tiny", "--data-dir", root, "--run-dir", run,
                       "--image-size", "16", "--augment", "xflip", *CPU)
    assert code == 0, err
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["config"]["data"]["image_size"] == 16
    assert manifest["config"]["augment"] == "xflip"
    assert manifest["data"]["image_size"] == 16 and manifest["data"]["channels"] == 3
    out = tmp_path / "recon.npz"
    code, _, err = ldm(capsys, "sample", "--model", "vae", "--reconstruct", "test", "--run-dir",
                       run, "--data-dir", root, "--out", out, *CPU)
    assert code == 0, err
    with np.load(out) as saved:
        assert saved["images"].shape[1:] == (16, 16, 3)
