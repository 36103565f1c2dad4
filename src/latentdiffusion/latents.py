"""The latent data set of the diffusion model: VAE encodings of train and test, and their scale.

Latents are stored unscaled; the diffusion model sees `latents * scale` with
scale = 1 / std(train latents) (Rombach et al. 2022, "scale_by_std"), and its samples are
divided by the same stored scale before decoding.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import checkpoint
from .config import LatentMode
from .data import to_unit_tensor
from .models.vae import VAE, sample_posterior
from .rng import generator, randn

KIND = "latents"


@dataclass(frozen=True)
class LatentSet:
    train: torch.Tensor  # (N, C, S, S), unscaled
    test: torch.Tensor
    scale: float
    vae_hash: str
    mode: LatentMode

    def scaled(self, split: str) -> torch.Tensor:
        return (self.train if split == "train" else self.test) * self.scale


@torch.no_grad()
def encode_images(vae: VAE, images: np.ndarray, mode: LatentMode, seed: int,
                  device: torch.device, batch_size: int = 1000) -> torch.Tensor:
    """uint8 (N, 28, 28) -> latents (N, C, S, S): posterior means or one posterior sample."""
    vae.eval()
    out = []
    for i, start in enumerate(range(0, len(images), batch_size)):
        mean, log_variance = vae.encode(to_unit_tensor(images[start:start + batch_size]).to(device))
        if mode == "sample":
            noise = randn(mean.shape, generator(seed, i), device)
            mean = sample_posterior(mean, log_variance, noise)
        out.append(mean.cpu())
    return torch.cat(out)


def build(vae: VAE, vae_hash: str, train_images: np.ndarray, test_images: np.ndarray,
          mode: LatentMode, seed: int, device: torch.device) -> LatentSet:
    train = encode_images(vae, train_images, mode, seed, device)
    test = encode_images(vae, test_images, mode, seed + 1, device)
    return LatentSet(train, test, 1.0 / float(train.std()), vae_hash, mode)


def save(path: Path, latents: LatentSet, **meta: object) -> str:
    return checkpoint.save(path, {"train": latents.train, "test": latents.test}, KIND,
                           scale=latents.scale, vae_hash=latents.vae_hash, mode=latents.mode,
                           **meta)


def load(path: Path) -> LatentSet:
    tensors, header = checkpoint.load(path, kind=KIND)
    return LatentSet(tensors["train"], tensors["test"], header["scale"], header["vae_hash"],
                     header["mode"])
