"""Convolutional VAE (Kingma & Welling 2014): encoder -> (mean, log-variance), decoder -> pixels.

Two architectures: "plain", the blog post's two convs per level, and "resnet", residual blocks
with GroupNorm (the autoencoder of Esser et al. 2021 and Rombach et al. 2022, smaller).

Images are padded to the next multiple of 2**(levels + 1) (VAEConfig.padded_size), so that the
stride-2 stages give an even latent size that the UNet can halve again: MNIST's 28x28 becomes
32x32 and an 8x8 latent (the post's 7x7 cannot be halved cleanly, 4x4 -> 7x7 needs cropping).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError
from ..schema import check_fields, check_image

VAEArch = Literal["plain", "resnet"]
PixelLoss = Literal["bce", "l1", "l2"]


@dataclass(frozen=True)
class VAEConfig:
    """Conv VAE: images are padded to `padded_size` and halved len(channels) times
    (MNIST: 28 -> 32 -> 16 -> 8)."""

    latent_channels: int = 4
    channels: tuple[int, ...] = (32, 64)
    kl_weight: float = 1e-4  # beta of the KL term per latent element, see models/vae.py
    image_size: int = 28
    image_channels: int = 1
    arch: VAEArch = "plain"
    blocks_per_level: int = 1  # "resnet": residual blocks at each resolution, each side
    groups: int = 8  # "resnet": GroupNorm groups; every channel count a multiple of it
    # The per-pixel reconstruction term (models/autoencoder_losses.py): "bce" on the logits,
    # or the mean absolute ("l1") or squared ("l2") error of the decoded pixels in [0, 1].
    loss: PixelLoss = "bce"
    # A patch critic (PatchGAN, hinge loss; Esser et al. 2021) from step `critic_start` on, its
    # term weighted adaptively times `critic_weight`; 0 trains without one.
    critic_weight: float = 0.0
    critic_start: int = 0
    critic_channels: int = 32
    # Scale equivariance (Skorokhodov et al. 2025): the decoder also maps the 2x2-averaged
    # latent to the 2x2-averaged image, at this weight times the pixel loss; 0 trains without.
    scale_equivariance: float = 0.0

    def __post_init__(self) -> None:
        check_fields(self, positive=("latent_channels", "channels", "blocks_per_level", "groups",
                                     "critic_channels"),
                     nonnegative=("critic_weight", "critic_start", "scale_equivariance"))
        check_image(self)
        if self.kl_weight < 0:
            raise UsageError(f"VAEConfig.kl_weight must be >= 0, got {self.kl_weight}")
        if not 1 <= len(self.channels) <= 4:
            raise UsageError("VAEConfig.channels must have 1 to 4 entries")
        if self.arch == "resnet" and any(c % self.groups for c in self.channels):
            raise UsageError(f"VAEConfig.channels must be multiples of groups ({self.groups}) "
                             "for arch resnet")

    @property
    def padded_size(self) -> int:
        """The image size rounded up to a multiple of 2**(levels + 1): an even latent size."""
        unit = 2 ** (len(self.channels) + 1)
        return -(-self.image_size // unit) * unit

    @property
    def latent_size(self) -> int:
        return self.padded_size // 2 ** len(self.channels)


def _conv(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.SiLU())


def _upsample(c_in: int, c_out: int) -> nn.Sequential:
    """(B, c_in, S, S) -> (B, c_out, 2S, 2S) by sub-pixel convolution (Shi et al. 2016)."""
    return nn.Sequential(nn.Conv2d(c_in, 4 * c_out, 3, padding=1), nn.PixelShuffle(2))


class ResBlock(nn.Module):
    """x + Conv(SiLU(GroupNorm(Conv(SiLU(GroupNorm(x)))))): the pre-activation residual block
    of Rombach et al. 2022's autoencoder, at constant width."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(F.silu(self.norm2(h)))  # (B, C, H, W)


def _resnet(config: VAEConfig) -> tuple[nn.Sequential, nn.Sequential]:
    """Encoder and decoder of residual blocks. Like the plain VAE, no layer runs at the padded
    size: a stride-2 conv enters each level and a sub-pixel conv leaves it, the last one
    giving pixel logits."""
    ch, n, groups = config.channels, config.blocks_per_level, config.groups
    encoder: list[tuple[str, nn.Module]] = []
    decoder: list[tuple[str, nn.Module]] = []
    size = config.padded_size
    for level, c in enumerate(ch):
        c_in = config.image_channels if level == 0 else ch[level - 1]
        size //= 2
        names = [f"{size}x{size}_block{i}" for i in range(n)]
        encoder += [(f"{size}x{size}_down", nn.Conv2d(c_in, c, 3, stride=2, padding=1)),
                    *((name, ResBlock(c, groups)) for name in names)]  # (B, c, size, size)
        up: list[tuple[str, nn.Module]] = [(f"{size}x{size}_up", _upsample(c, c_in))]
        # (B, c_in, 2 size, 2 size)
        if level == 0:  # normalise before the logits, as the blocks' outputs are not
            up.insert(0, (f"{size}x{size}_out", nn.Sequential(nn.GroupNorm(groups, c),
                                                                nn.SiLU())))
        decoder = [*((name, ResBlock(c, groups)) for name in names), *up] + decoder
    encoder.append(("latent", nn.Sequential(nn.GroupNorm(groups, ch[-1]), nn.SiLU(),
                                            nn.Conv2d(ch[-1], 2 * config.latent_channels, 3,
                                                      padding=1))))
    decoder.insert(0, ("latent", nn.Conv2d(config.latent_channels, ch[-1], 3, padding=1)))
    return nn.Sequential(OrderedDict(encoder)), nn.Sequential(OrderedDict(decoder))


class VAE(nn.Module):
    """Images (B, C_img, H, H) in [0, 1] <-> latents (B, C, S, S), S = padded_size / 2**levels."""

    kind = "vae"
    config_class = VAEConfig

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.pad = (config.padded_size - config.image_size) // 2  # on each side
        if config.arch == "resnet":
            self.encoder, self.decoder = _resnet(config)
            return
        ch = config.channels
        # No conv runs at 32x32: the encoder's first conv has stride 2, and the decoder upsamples
        # by sub-pixel convolution (Shi et al. 2016): a conv at S x S makes 4 c channels that
        # PixelShuffle lays out as c channels at 2S x 2S, so each of the 4 output phases has its
        # own 3x3 weights: sharper and cheaper than nearest upsampling + a conv at 2S, the same
        # FLOPs' worth (docs/recipe.md).
        encoder: list[nn.Module] = []
        decoder: list[nn.Module] = []
        for level, c in enumerate(ch):
            c_in = config.image_channels if level == 0 else ch[level - 1]
            encoder += [_conv(c_in, c, stride=2), _conv(c, c)]  # (B, c, S/2, S/2)
            up: list[nn.Module] = [nn.Conv2d(c, 4 * c_in, 3, padding=1), nn.PixelShuffle(2)]
            if level > 0:  # the last layer gives pixel logits
                up.append(nn.SiLU())
            decoder = [_conv(c, c), *up] + decoder  # (B, c_in, 2S, 2S)
        encoder.append(nn.Conv2d(ch[-1], 2 * config.latent_channels, 3, padding=1))
        self.encoder = nn.Sequential(*encoder)
        self.decoder = nn.Sequential(_conv(config.latent_channels, ch[-1]), *decoder)

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C_img, H, H) -> mean, log_variance, each (B, C, S, S)."""
        h = self.encoder(F.pad(images * 2 - 1, (self.pad,) * 4, value=-1.0))
        # float32 out of an autocast forward (run/precision.py): the KL and the reparameterisation
        # take exp(log_variance); .float() of a float32 tensor is the tensor itself.
        mean, log_variance = h.float().chunk(2, dim=1)
        return mean, log_variance.clamp(-30.0, 20.0)

    def decode_logits(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) -> pixel logits (B, C_img, H, H)."""
        logits = self.decoder(latents).float()  # (B, C_img, padded, padded), float32 always
        size = self.config.image_size
        return logits[:, :, self.pad:self.pad + size, self.pad:self.pad + size]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) -> images (B, C_img, H, H) in [0, 1]."""
        return torch.sigmoid(self.decode_logits(latents))

    def last_layer(self) -> torch.Tensor:
        """The weight of the conv that gives the pixel logits: where the critic's adaptive
        weight compares gradients (models/autoencoder_losses.py)."""
        convs = [m for m in self.decoder.modules() if isinstance(m, nn.Conv2d)]
        return convs[-1].weight

    def forward(self, images: torch.Tensor, noise: torch.Tensor, *, half: bool = False
                ) -> tuple[torch.Tensor, ...]:
        """Encode, sample the posterior with `noise`, decode: (logits, mean, log_variance); with
        `half`, also the logits (B, C_img, P/2, P/2) of the 2x2-averaged latent, P the padded
        size (the scale-equivariance term)."""
        mean, log_variance = self.encode(images)
        z = sample_posterior(mean, log_variance, noise)  # (B, C, S, S)
        if not half:
            return self.decode_logits(z), mean, log_variance
        return (self.decode_logits(z), mean, log_variance,
                self.decoder(F.avg_pool2d(z, 2)).float())

    def half_scale(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C_img, H, H) -> the padded images 2x2-averaged, (B, C_img, P/2, P/2):
        what the decoder should give for the 2x2-averaged latent."""
        return F.avg_pool2d(F.pad(images, (self.pad,) * 4, value=0.0), 2)


def sample_posterior(mean: torch.Tensor, log_variance: torch.Tensor,
                     noise: torch.Tensor) -> torch.Tensor:
    """Reparameterisation: z = mean + sigma * noise, with sigma = exp(log_variance / 2)."""
    return mean + torch.exp(0.5 * log_variance) * noise


def kl_to_standard_normal(mean: torch.Tensor, log_variance: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, sigma^2) || N(0, 1)) per element = (mean^2 + sigma^2 - 1 - log sigma^2) / 2."""
    return 0.5 * (mean.square() + log_variance.exp() - 1.0 - log_variance)
