"""The latent data set of the diffusion model: VAE encodings of train and test, and their scale.

Latents are stored as encoded; the diffusion model sees x_0 = (latents - shift) * scale and its
samples are mapped back with latents = x_0 / scale + shift before decoding, with the same stored
numbers. Two normalisations, each (C,) per channel:
- "global": shift 0, scale 1 / std over all training latents (Rombach et al. 2022,
  "scale_by_std"; the post's choice of a single factor);
- "channel": shift = mean and scale = 1 / std of each channel. A low-KL VAE leaves its channels
  with means of +-2 std and unequal spreads; standardising each one gives every channel the same
  signal-to-noise ratio at every t, which the noise schedule assumes. On the default preset's
  VAE "global" scores better (docs/recipe.md), so the presets use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.images import mirrored, to_unit_tensor
from ..models.vae import VAE, sample_posterior
from ..rng import generator, randn
from . import checkpoint
from .config import LatentMode, LatentNorm

KIND = "latents"


@dataclass(frozen=True)
class LatentSet:
    train: torch.Tensor  # (N, C, S, S), as encoded
    test: torch.Tensor
    shift: tuple[float, ...]  # (C,)
    scale: tuple[float, ...]  # (C,)
    vae_hash: str
    mode: LatentMode
    # (N,) int64 class labels of each split, for class-conditional models; None in caches
    # written before labels were kept
    train_labels: torch.Tensor | None = None
    test_labels: torch.Tensor | None = None
    # (N, C, S, S) the latents of the mirrored training images (`--augment xflip`), or None
    train_mirrored: torch.Tensor | None = None

    def normalised(self, split: str) -> torch.Tensor:
        """x_0 of the diffusion model for the train or test split."""
        return normalise(self.train if split == "train" else self.test, self.shift, self.scale)

    def training_set(self, labels: bool, limit: int = 0) -> tuple[torch.Tensor, ...]:
        """The denoiser's training tensors: x_0 (N, C, S, S) and, with `labels`, (N,) labels;
        the first `limit` images only when given; each followed by its mirror's when cached."""
        parts = [(self.train, self.train_labels)]
        if self.train_mirrored is not None:
            parts.append((self.train_mirrored, self.train_labels))
        tensors: list[tuple[torch.Tensor, ...]] = []
        for latents, label in parts:
            chosen: tuple[torch.Tensor, ...] = (normalise(latents, self.shift, self.scale),)
            if labels:
                assert label is not None  # checked by the caller
                chosen += (label,)
            tensors.append(tuple(t[:limit] if limit else t for t in chosen))
        return tuple(torch.cat(columns) for columns in zip(*tensors, strict=True))


def _per_channel(values: tuple[float, ...], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)


def normalise(latents: torch.Tensor, shift: tuple[float, ...],
              scale: tuple[float, ...]) -> torch.Tensor:
    """(B, C, S, S) latents -> x_0 = (latents - shift) * scale."""
    return (latents - _per_channel(shift, latents)) * _per_channel(scale, latents)


def denormalise(x0: torch.Tensor, shift: tuple[float, ...],
                scale: tuple[float, ...]) -> torch.Tensor:
    """(B, C, S, S) x_0 -> latents = x_0 / scale + shift, the inverse of `normalise`."""
    return x0 / _per_channel(scale, x0) + _per_channel(shift, x0)


def statistics(train: torch.Tensor, norm: LatentNorm) -> tuple[tuple[float, ...], ...]:
    """(shift, scale), each (C,), of the training latents (N, C, S, S)."""
    channels = train.shape[1]
    if norm == "global":
        return (0.0,) * channels, (1.0 / float(train.std()),) * channels
    shift = train.mean(dim=(0, 2, 3)).tolist()
    scale = (1.0 / train.std(dim=(0, 2, 3))).tolist()
    return tuple(shift), tuple(scale)


@torch.no_grad()
def encode_images(vae: VAE, images: np.ndarray, mode: LatentMode, seed: int,
                  device: torch.device, batch_size: int = 1000) -> torch.Tensor:
    """uint8 (N, H, W) or (N, H, W, 3) -> latents (N, C, S, S): posterior means or one posterior
    sample."""
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
          mode: LatentMode, norm: LatentNorm, seed: int, device: torch.device,
          train_labels: np.ndarray | None = None,
          test_labels: np.ndarray | None = None, mirror: bool = False) -> LatentSet:
    """Encode both splits (and, with `mirror`, the mirrored training images) and take the
    normalisation's statistics over every training latent."""
    train = encode_images(vae, train_images, mode, seed, device)
    test = encode_images(vae, test_images, mode, seed + 1, device)
    flipped = encode_images(vae, mirrored(train_images), mode, seed + 2, device) if mirror else None
    shift, scale = statistics(train if flipped is None else torch.cat([train, flipped]), norm)
    return LatentSet(train, test, shift, scale, vae_hash, mode, _labels(train_labels),
                     _labels(test_labels), flipped)


def _labels(labels: np.ndarray | None) -> torch.Tensor | None:
    return None if labels is None else torch.from_numpy(labels.astype(np.int64))


def save(path: Path, latents: LatentSet, **meta: object) -> str:
    tensors = {"train": latents.train, "test": latents.test}
    if latents.train_labels is not None and latents.test_labels is not None:
        tensors.update(train_labels=latents.train_labels, test_labels=latents.test_labels)
    if latents.train_mirrored is not None:
        tensors["train_mirrored"] = latents.train_mirrored
    return checkpoint.save(path, tensors, KIND, shift=list(latents.shift),
                           scale=list(latents.scale), vae_hash=latents.vae_hash,
                           mode=latents.mode, **meta)


def load(path: Path) -> tuple[LatentSet, dict]:
    """The cached latents and the file's header (its sha256 keys the diffusion stage)."""
    tensors, header = checkpoint.load(path, kind=KIND)
    return LatentSet(tensors["train"], tensors["test"], tuple(header["shift"]),
                     tuple(header["scale"]), header["vae_hash"], header["mode"],
                     tensors.get("train_labels"), tensors.get("test_labels"),
                     tensors.get("train_mirrored")), header


def has_labels(path: Path) -> bool:
    """Whether a latent cache keeps the labels a class-conditional model trains on."""
    return load(path)[0].train_labels is not None
