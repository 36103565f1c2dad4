"""Modules with weights: the FID classifier, the VAE and the denoising UNet."""

from typing import TypeVar

import torch
from torch import nn

from .classifier import Classifier
from .unet import UNet
from .vae import VAE

__all__ = ["Classifier", "UNet", "VAE", "to_device"]

M = TypeVar("M", bound=nn.Module)


def to_device(model: M, device: torch.device | str) -> M:
    """Move `model` to `device` with channels-last (NHWC) conv weights.

    oneDNN's conv kernels are faster in that layout on the default preset's maps, about even on
    the quick preset's narrow ones (benchmarks/layout.py). Each conv's output follows its
    weights' layout, so inputs need no conversion.
    """
    return model.to(device=device, memory_format=torch.channels_last)  # type: ignore[call-overload]
