"""Modules with weights: the FID classifier, the VAE and the denoising UNet."""

import functools
from typing import Any, TypeVar

import torch
from torch import nn

from .classifier import Classifier
from .unet import UNet
from .vae import VAE

__all__ = ["Classifier", "UNet", "VAE", "parameter_count", "to_device"]

M = TypeVar("M", bound=nn.Module)


def to_device(model: M, device: torch.device | str) -> M:
    """Move `model` to `device` with channels-last (NHWC) conv weights.

    oneDNN's conv kernels are faster in that layout on the default preset's maps, about even on
    the quick preset's narrow ones (benchmarks/layout.py). Each conv's output follows its
    weights' layout, so inputs need no conversion.
    """
    return model.to(device=device, memory_format=torch.channels_last)  # type: ignore[call-overload]


@functools.lru_cache(maxsize=256)
def parameter_count(model: type[nn.Module], config: Any) -> int:
    """The parameters `model(config)` has, counted on the meta device: no weight is allocated,
    so a config asking for terabytes is measured in milliseconds."""
    with torch.device("meta"):
        return sum(p.numel() for p in model(config).parameters())
