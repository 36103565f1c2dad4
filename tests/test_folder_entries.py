"""What a folder of images holds is read as a viewer shows it, and nothing in it is skipped
silently: transparent pixels are composited onto white, an entry named like an image that is
no regular file is refused."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from latentdiffusion.data import load_dataset
from latentdiffusion.errors import DataError


def _icons(root: Path, mode: str) -> None:
    """Two classes of 16x16 icons whose shape is only in the alpha channel (colour 0)."""
    for k in range(12):
        channels = len(mode)
        pixels = np.zeros((16, 16, channels), np.uint8)
        pixels[4:12, 4:12, -1] = 255  # the shape: opaque black on transparent black
        (root / f"c{k % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels, mode).save(root / f"c{k % 2}" / f"i{k}.png")


@pytest.mark.parametrize(("mode", "shape"), [("RGBA", (16, 16, 3)), ("LA", (16, 16))])
def test_transparent_images_are_composited_onto_white(tmp_path: Path, mode: str,
                                                      shape: tuple[int, ...]) -> None:
    _icons(tmp_path / "icons", mode)
    images = load_dataset(tmp_path / "icons").train_images
    assert images.shape[1:] == shape
    assert (images[:, 4:12, 4:12] == 0).all()  # the shape, black
    assert (images[:, :4] == 255).all()  # the transparent background, white


@pytest.mark.parametrize("make", ["dangling", "device", "fifo"])
def test_an_image_name_that_is_no_regular_file_is_refused(tmp_path: Path, make: str) -> None:
    root = tmp_path / "icons"
    _icons(root, "RGBA")
    odd = root / "c0" / "x.png"
    if make == "dangling":
        odd.symlink_to(tmp_path / "gone.png")
    elif make == "device":
        odd.symlink_to("/dev/zero")
    else:
        os.mkfifo(odd)
    with pytest.raises(DataError, match=r"c0/x.png is not a regular file \(a dangling link"):
        load_dataset(root)
