"""Pictures of any size and mode as the square uint8 images the models take.

`PrepareConfig` says how (`image_size` S: resize so the shorter side is S, then centre-crop
to S x S; `background`: the colour transparent pixels are composited onto). `prepare_image`
does it to one decoded picture, `resize_images` to an array of square images (.npz, IDX).
Resampling is Pillow's Lanczos, after an integer box reduction for large downscales (Pillow's
`reducing_gap`), so a 300-pixel picture shrunk to 32 is antialiased, not aliased.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageColor

from ..errors import DataError, UsageError
from ..files import MAX_DECODED_BYTES
from ..schema import IMAGE_SIZES, check_fields

# The most pixels (W x H, read from the header) one picture may have before it is decoded: a
# 12-megapixel photo decodes to 36 MB, a 50-megapixel one to 200 MB as RGBA. A PNG of a few kB
# can declare 20,000 x 20,000 (a decompression bomb); it is refused from its header.
MAX_PIXELS = 50_000_000
WHITE = (255, 255, 255)
GRAY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
REDUCING_GAP = 2.0  # box-reduce by an integer factor first while the scale is over 2x this
# EXIF orientation (tag 0x0112) -> the transpose that shows the picture upright (as
# ImageOps.exif_transpose does); 1 and values outside 1..8 leave it as stored.
ORIENTATION_TAG = 0x0112
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
            4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
            6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}


@dataclass(frozen=True)
class PrepareConfig:
    """How pictures become a data set's images (`ldm ... --image-size S`, a config's [data])."""

    # 0: keep the images' own size (they must all be one square size of 16..64 pixels); else
    # resize each so its shorter side is S, centre-crop S x S, and apply its EXIF orientation.
    image_size: int = 0
    # What transparent pixels are composited onto: a colour name ("white", "black"), "#rrggbb"
    # or "rgb(r, g, b)".
    background: str = "white"

    def __post_init__(self) -> None:
        check_fields(self, nonnegative=("image_size",))
        if self.image_size and self.image_size not in IMAGE_SIZES:
            raise UsageError(f"PrepareConfig.image_size must be 0 (the images' own size) or a "
                             f"multiple of 4 from {IMAGE_SIZES[0]} to {IMAGE_SIZES[-1]}, got "
                             f"{self.image_size}")
        self.rgb  # noqa: B018 (parses the colour: one UsageError line for a bad one)

    @property
    def rgb(self) -> tuple[int, int, int]:
        try:
            colour = ImageColor.getrgb(self.background)
        except ValueError:
            raise UsageError(f"PrepareConfig.background: unknown colour {self.background!r} "
                             "(a name such as white or black, #rrggbb or rgb(r, g, b))") from None
        return colour[0], colour[1], colour[2]

    @property
    def is_set(self) -> bool:
        """Whether it changes anything from reading images as they are (onto white)."""
        return bool(self.image_size) or self.rgb != WHITE

    def identity(self) -> dict[str, Any]:
        """The settings, normalised ("white" and "#ffffff" are one), for hashes and run.json."""
        red, green, blue = self.rgb
        return {"image_size": self.image_size, "background": f"#{red:02x}{green:02x}{blue:02x}"}


def check_pixels(path: object, size: tuple[int, int]) -> None:
    """DataError for a picture (W, H from its header) of more than MAX_PIXELS."""
    width, height = size
    if width * height > MAX_PIXELS:
        raise DataError(f"{path} is {width}x{height} pixels ({width * height / 1e6:.0f} "
                        f"megapixels), more than the {MAX_PIXELS // 1_000_000} megapixels a "
                        "picture may have here; shrink it first")


def check_prepared_bytes(where: object, count: int, size: int) -> None:
    """DataError when `count` prepared images of size x size x 3 would take more than
    MAX_DECODED_BYTES, before any is decoded."""
    needed = count * size * size * 3
    if needed > MAX_DECODED_BYTES:
        raise DataError(f"{where}: {count} images of {size}x{size}x3 take {needed:,} bytes, more "
                        f"than the {MAX_DECODED_BYTES:,} a data set may hold here; use a subset "
                        "or a smaller --image-size")


def pixels(image: Image.Image, background: tuple[int, int, int] = WHITE) -> np.ndarray:
    """uint8 (H, W) for a grayscale picture, (H, W, 3) for any other: transparency composited
    onto `background`, 16-bit gray scaled to 8 bits, every other mode converted to RGB."""
    return _flatten(_working(image), _is_gray(image), background)


def prepare_image(image: Image.Image, config: PrepareConfig) -> tuple[np.ndarray, bool]:
    """An opened picture (not yet decoded) as uint8 (S, S) or (S, S, 3), and whether it was
    smaller than S (upscaled). Its size must have passed `check_pixels`."""
    size = config.image_size
    width, height = image.size
    side = min(width, height)
    if image.format == "JPEG" and side > 2 * size:  # decode at 1/2, 1/4 or 1/8 (DCT scaling)
        scale = side / (2 * size)
        image.draft(None, (int(width / scale), int(height / scale)))
    upright = _UPRIGHT.get(_orientation(image))
    gray = _is_gray(image)
    work = _working(image)
    width, height = work.size  # after draft
    side = min(width, height)
    box = ((width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2)
    square = work.resize((size, size), Image.Resampling.LANCZOS, box=box,
                         reducing_gap=REDUCING_GAP)  # premultiplied alpha for RGBA and LA
    if upright is not None:  # a centre crop turns with the picture: turn the small square
        square = square.transpose(upright)
    return _flatten(square, gray, config.rgb), min(image.size) < size


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (N, H, H) or (N, H, H, 3) -> (N, S, S[, 3]) with the Lanczos filter."""
    if images.shape[1] == size:
        return images
    out = np.empty((len(images), size, size, *images.shape[3:]), np.uint8)
    for i, image in enumerate(images):
        out[i] = np.asarray(Image.fromarray(image).resize(
            (size, size), Image.Resampling.LANCZOS, reducing_gap=REDUCING_GAP))
    return out


def _is_gray(image: Image.Image) -> bool:
    return image.mode in GRAY_MODES


def _working(image: Image.Image) -> Image.Image:
    """L, RGB or RGBA: 8 bits a channel, transparency (an alpha band, or a palette or gray
    colour keyed transparent) as alpha, palettes expanded. Decodes the picture."""
    keyed = "transparency" in image.info and image.mode in ("1", "L", "P", "RGB")
    if image.mode in ALPHA_MODES or keyed:  # (a gray one is told apart by _is_gray)
        return image.convert("RGBA")
    if image.mode.startswith("I"):  # 16-bit gray: Pillow's convert("L") would clip at 255
        return Image.fromarray((np.asarray(image.convert("I")) >> 8).clip(0, 255)
                               .astype(np.uint8))
    if image.mode in ("1", "L"):
        return image if image.mode == "L" else image.convert("L")
    return image if image.mode == "RGB" else image.convert("RGB")


def _flatten(image: Image.Image, gray: bool, background: tuple[int, int, int]) -> np.ndarray:
    """A working-mode image as uint8 (H, W) or (H, W, 3): alpha composited onto `background`,
    as a viewer shows it (dropping alpha would turn an icon drawn only in its alpha into a
    black square). Gray stays gray unless a coloured background shows through."""
    if image.mode == "RGBA":
        ground = Image.new("RGBA", image.size, (*background, 255))
        flat = Image.alpha_composite(ground, image)
        gray = gray and len(set(background)) == 1
        return np.asarray(flat.convert("L" if gray else "RGB"))
    return np.asarray(image.convert("L") if image.mode == "L" else image.convert("RGB"))


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation of an opened picture (1 when it has none); DataError when its
    EXIF data is damaged, rather than guessing which way up the picture is."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            value = image.getexif().get(ORIENTATION_TAG, 1)
        except (OSError, SyntaxError, ValueError, EOFError, KeyError, TypeError,
                IndexError, RecursionError) as err:
            caught.append(warnings.WarningMessage(str(err), UserWarning, "", 0))
    damaged = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    if damaged:
        reason = " ".join(damaged[0].split())
        raise DataError(f"{getattr(image, 'filename', 'an image')}: its EXIF data is damaged "
                        f"({reason}); save the picture again without it")
    return value if isinstance(value, int) else 1


AS_THEY_ARE = PrepareConfig()  # images read as they are, onto white
