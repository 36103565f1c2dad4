"""What an image set must look like (shapes, labels) and its pixels as tensors.

Images are uint8 (N, H, W) grayscale or (N, H, W, 3) RGB with H == W, a side in IMAGE_SIZES;
the models see float (N, C, H, W) in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch

from ..errors import DataError
from ..schema import IMAGE_SIZES

Split = Literal["train", "test"]
SPLITS: tuple[Split, ...] = ("train", "test")
# The most classes a data set may have (ImageNet's count): the classifier, the class histograms
# and the conditional denoiser's label table grow with it, and a stray label (9999 among digits)
# would otherwise make 10,000 classes and a 2.5 GB report.
MAX_CLASSES = 1000
# The one-line advice for arrays that are almost right.
TO_UINT8 = "convert with (x * 255).round().clip(0, 255).astype(np.uint8)"
DROP_CHANNEL = "drop the last axis: images[..., 0]"


class Splits(NamedTuple):
    """A source's arrays, in the order of `Dataset`'s fields."""

    train_images: np.ndarray
    train_labels: np.ndarray | None
    test_images: np.ndarray
    test_labels: np.ndarray | None
    class_names: tuple[str, ...]



def image_shape_problem(shape: tuple[int, ...]) -> str | None:
    """Why images of shape (H, W) or (H, W, C) cannot be used, or None when they can."""
    if len(shape) not in (2, 3) or shape[2:] not in ((), (3,)):
        hint = f" ({DROP_CHANNEL})" if shape[2:] == (1,) else ""
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


def mirrored(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W) or (N, H, W, 3) mirrored left to right (axis 2 is W in both)."""
    return np.ascontiguousarray(images[:, :, ::-1])


def mirror_where(images: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) with the images where `where` (B,) is True mirrored left to right."""
    return torch.where(where.view(-1, 1, 1, 1), images.flip(-1), images)



def default_class_names(labels: Sequence[np.ndarray], where: object) -> tuple[str, ...]:
    """str(k) for k in 0..max label, for labels that come without names."""
    top = max((int(split.max()) for split in labels if split.size), default=-1)
    if top >= MAX_CLASSES:
        raise DataError(f"{where}: labels go up to {top}, more than the {MAX_CLASSES} classes "
                        "this toolkit takes")
    return tuple(str(k) for k in range(top + 1))


# ---------------------------------------------------------------- folders of images
