"""UNet noise predictor over VAE latents, after the post's time-conditioned conv blocks.

Each block is conv -> norm -> + Linear(time embedding) -> activation, as in the post, inside a
residual pair. The post normalised with InstanceNorm2d; on 8x8 and 4x4 maps that erases each
channel's spatial mean, so the network cannot predict the mean of the noise; sampling divides
that error by sqrt(alpha_bar_t) ~ 0.006 and samples collapse. GroupNorm normalises over groups
of channels instead and keeps per-channel means (`norm="instance"` is kept for the ablation).

A class-conditional UNet (`num_classes` K > 0) embeds a label y in 0..K (K = "no label", the
null class of classifier-free guidance) in a (K + 1, 4 * time_dim) table and adds it to the time
embedding before its last activation: e = SiLU(MLP(t) + E[y]). An unconditional one has no
table and computes exactly what it did before labels existed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError
from ..schema import check_fields

NormName = Literal["group", "instance"]


@dataclass(frozen=True)
class UNetConfig:
    """Denoiser over latents; every conv block adds a projection of the time embedding."""

    in_channels: int = 4
    latent_size: int = 8
    channels: tuple[int, ...] = (64, 128)  # one level per entry, halving resolution in between
    blocks_per_level: int = 1
    time_dim: int = 64  # width of the sinusoidal embedding
    norm: NormName = "group"  # the post used InstanceNorm2d; see models/unet.py for why not
    groups: int = 8
    # 0: unconditional. K > 0: a class label in 0..K-1 (or K, "no label") is embedded and added
    # to the time embedding (classifier-free guidance, diffusion/guidance.py).
    num_classes: int = 0

    def __post_init__(self) -> None:
        check_fields(self, positive=("in_channels", "latent_size", "channels", "blocks_per_level",
                                  "time_dim", "groups"))
        if not self.channels:
            raise UsageError("UNetConfig.channels needs at least one level")
        if self.num_classes < 0:
            raise UsageError(f"UNetConfig.num_classes must be >= 0, got {self.num_classes}")
        if self.time_dim % 2:
            raise UsageError("UNetConfig.time_dim must be even")
        if self.latent_size % 2 ** (len(self.channels) - 1):
            raise UsageError("UNetConfig: latent_size must be divisible by 2**(levels - 1)")
        if any(c % self.groups for c in self.channels):
            raise UsageError("UNetConfig: every channel count must be divisible by groups")


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """(B,) -> (B, dim) laid out [sin(t w_0..w_{h-1}), cos(t w_0..w_{h-1})], as in the post.

    Frequencies w_i = max_period^(-i / (h - 1)) are computed in log space, h = dim / 2.
    """
    half = dim // 2
    frequencies = torch.exp(-math.log(max_period) / max(half - 1, 1)
                            * torch.arange(half, device=t.device, dtype=torch.float32))
    angles = t.float()[:, None] * frequencies[None]  # (B, h)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def _norm(kind: str, channels: int, groups: int) -> nn.Module:
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    return nn.GroupNorm(groups, channels)


class TimeConvBlock(nn.Module):
    """The post's block: act(norm(conv(x)) + Linear(time_embedding)), with SiLU."""

    def __init__(self, c_in: int, c_out: int, embed_dim: int, norm: str, groups: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm = _norm(norm, c_out, groups)
        self.time_proj = nn.Linear(embed_dim, c_out)

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        return F.silu(self.norm(self.conv(x)) + self.time_proj(embedding)[:, :, None, None])


class ResBlock(nn.Module):
    """Two time-conditioned conv blocks with a (1x1 when needed) skip connection."""

    def __init__(self, c_in: int, c_out: int, embed_dim: int, norm: str, groups: int) -> None:
        super().__init__()
        self.block1 = TimeConvBlock(c_in, c_out, embed_dim, norm, groups)
        self.block2 = TimeConvBlock(c_out, c_out, embed_dim, norm, groups)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.block2(self.block1(x, embedding), embedding)


class UNet(nn.Module):
    """(x_t (B, C, S, S), t (B,)[, labels (B,)]) -> predicted noise (B, C, S, S)."""

    kind = "unet"
    config_class = UNetConfig

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        ch, n, norm, groups = config.channels, config.blocks_per_level, config.norm, config.groups
        embed_dim = 4 * config.time_dim
        self.time_mlp = nn.Sequential(nn.Linear(config.time_dim, embed_dim), nn.SiLU(),
                                      nn.Linear(embed_dim, embed_dim), nn.SiLU())
        self.stem = nn.Conv2d(config.in_channels, ch[0], 3, padding=1)
        self.down = nn.ModuleDict()
        self.up = nn.ModuleDict()
        sizes = [config.latent_size // 2**i for i in range(len(ch))]
        skip_channels = []
        c = ch[0]
        for level, (c_out, size) in enumerate(zip(ch, sizes, strict=True)):
            for i in range(n):
                self.down[f"{size}x{size}_block{i}"] = ResBlock(c, c_out, embed_dim, norm, groups)
                c = c_out
                skip_channels.append(c)
            if level + 1 < len(ch):
                self.down[f"{size}x{size}_down"] = nn.Conv2d(c, c, 3, stride=2, padding=1)
        self.mid = ResBlock(c, c, embed_dim, norm, groups)
        for level in reversed(range(len(ch))):
            size = sizes[level]
            for i in range(n):
                block = ResBlock(c + skip_channels.pop(), ch[level], embed_dim, norm, groups)
                self.up[f"{size}x{size}_block{i}"] = block
                c = ch[level]
            if level > 0:  # nearest upsampling; the next block's convs do the mixing (cheap)
                self.up[f"{size}x{size}_up"] = nn.Upsample(scale_factor=2.0, mode="nearest")
        self.out = nn.Sequential(nn.GroupNorm(groups, c), nn.SiLU(),
                                 nn.Conv2d(c, config.in_channels, 3, padding=1))
        final = self.out[-1]
        assert isinstance(final, nn.Conv2d)
        nn.init.zeros_(final.weight)  # start as the zero predictor
        if final.bias is not None:
            nn.init.zeros_(final.bias)
        if config.num_classes:  # drawn last: the other weights are the unconditional model's
            self.label_embedding = nn.Embedding(config.num_classes + 1, embed_dim)  # row K: null

    @property
    def null_label(self) -> int:
        """The "no label" index of a conditional UNet."""
        return self.config.num_classes

    def embed(self, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """(B,) t and optional (B,) labels -> (B, 4 * time_dim); no labels = the null label."""
        sinusoid = sinusoidal_embedding(t, self.config.time_dim)  # (B, time_dim)
        if not self.config.num_classes:
            if labels is not None:
                raise ValueError("this UNet is unconditional (num_classes = 0); it takes no labels")
            return self.time_mlp(sinusoid)
        if labels is None:
            labels = torch.full_like(t, self.null_label, dtype=torch.long)
        pre_activation = self.time_mlp[:-1](sinusoid)  # MLP(t), before the last SiLU
        return F.silu(pre_activation + self.label_embedding(labels))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        embedding = self.embed(t, labels)  # (B, 4 * dim)
        h = self.stem(x_t)  # (B, ch0, S, S)
        skips = []
        for name, module in self.down.items():
            if name.endswith("_down"):
                h = module(h)  # (B, c, S/2, S/2)
            else:
                h = module(h, embedding)
                skips.append(h)
        h = self.mid(h, embedding)
        for name, module in self.up.items():
            if name.endswith("_up"):
                h = module(h)  # (B, c, 2S, 2S)
            else:
                h = module(torch.cat([h, skips.pop()], dim=1), embedding)
        return self.out(h).float()  # float32 out of an autocast forward (run/precision.py)
