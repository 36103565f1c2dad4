"""Variance schedules and the forward process q(x_t | x_0) of DDPM (Ho et al. 2020).

Timesteps are 0-based: index t here is step t + 1 of the paper and the post, so
alphas_cumprod[0] = 1 - betas[0] and alphas_cumprod[T - 1] is the noisiest level.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from ..errors import UsageError
from ..schema import check_fields

ScheduleName = Literal["linear", "cosine"]
# The most levels T a schedule may have: 10x the usual 1000, as many as a sampler may take steps.
MAX_TIMESTEPS = 10_000


@dataclass(frozen=True)
class ScheduleConfig:
    """Variance schedule of the forward process (post: linear, 1e-4 .. 2e-2, T = 1000)."""

    kind: ScheduleName = "linear"
    num_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 2e-2
    cosine_s: float = 0.008

    def __post_init__(self) -> None:
        check_fields(self, positive=("num_timesteps", "beta_start", "beta_end", "cosine_s"))
        if self.num_timesteps > MAX_TIMESTEPS:
            raise UsageError(f"ScheduleConfig.num_timesteps must be at most {MAX_TIMESTEPS}, got "
                             f"{self.num_timesteps}")
        if not self.beta_start < self.beta_end < 1:
            raise UsageError("ScheduleConfig: need 0 < beta_start < beta_end < 1")


def linear_betas(num_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal (2021), eq. (17): alphas_cumprod(t) = f(t) / f(0) for t = 1..T with
    f(t) = cos^2((t / T + s) / (1 + s) * pi / 2), betas clipped at 0.999.

    The post's snippet divides t by T + 1 instead of T, so its last level keeps a little signal;
    this is the paper's form, where alphas_cumprod reaches ~0 at t = T.
    """
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    alphas_cumprod = f / f[0]
    betas = 1 - alphas_cumprod[1:] / alphas_cumprod[:-1]
    return betas.clamp(max=max_beta)


@dataclass(frozen=True)
class NoiseSchedule:
    """betas (T,) float64 and everything derived from them."""

    betas: torch.Tensor

    @classmethod
    def from_config(cls, config: ScheduleConfig) -> NoiseSchedule:
        if config.kind == "cosine":
            return cls(cosine_betas(config.num_timesteps, config.cosine_s))
        return cls(linear_betas(config.num_timesteps, config.beta_start, config.beta_end))

    @property
    def num_timesteps(self) -> int:
        return len(self.betas)

    @property
    def alphas(self) -> torch.Tensor:
        return 1.0 - self.betas

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return torch.cumprod(self.alphas, dim=0)  # alpha_bar_t

    @property
    def alphas_cumprod_prev(self) -> torch.Tensor:
        return torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])

    @property
    def posterior_variance(self) -> torch.Tensor:
        """beta_tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) * beta_t (0 at t = 0)."""
        return (1 - self.alphas_cumprod_prev) / (1 - self.alphas_cumprod) * self.betas

    def alpha_bar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """alphas_cumprod at (B,) long t, as (B, 1, 1, 1) with the dtype and device of `like`."""
        return self.alphas_cumprod.to(like.device)[t].to(like.dtype).view(-1, 1, 1, 1)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Eq. (3): x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise; t is (B,) long."""
        alpha_bar = self.alpha_bar(t, x0)
        return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise
