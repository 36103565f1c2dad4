"""Samplers: plain functions of (model, schedule, noise, ..., generator) -> x_0.

Both walk a decreasing subsequence of timesteps t -> s and use the model's noise prediction.
- DDPM (Ho et al. 2020), ancestral: eq. (6) of the post for the mean, sigma_t^2 = beta_tilde_t
  (the post's choice) or beta_t. With fewer steps than T, the betas are respaced over the
  subsequence (Nichol & Dhariwal 2021, sec. 4): beta'_t = 1 - alpha_bar_t / alpha_bar_s.
- DDIM (Song et al. 2021), eq. (12), with eta in [0, 1]: eta = 0 is deterministic.
The predicted x_0 is not clipped: latents are unbounded.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from ..config import SamplerName, VarianceName
from ..rng import Generators, randn
from .schedule import NoiseSchedule

NoisePredictor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t) -> noise


def timesteps(num_timesteps: int, num_steps: int | None) -> list[int]:
    """Evenly spaced, decreasing, from T - 1 down to 0; all T of them when num_steps is None."""
    if num_steps is None or num_steps >= num_timesteps:
        return list(range(num_timesteps - 1, -1, -1))
    if num_steps < 1:
        raise ValueError("num_steps must be >= 1")
    if num_steps == 1:  # linspace(0, T - 1, 1) is [0]: one step must start from pure noise
        return [num_timesteps - 1]
    grid = torch.linspace(0, num_timesteps - 1, num_steps).round().long()
    return sorted(set(grid.tolist()), reverse=True)


def _walk(model: NoisePredictor, schedule: NoiseSchedule, noise: torch.Tensor,
          num_steps: int | None, progress: bool, desc: str,
          update: Callable[[torch.Tensor, torch.Tensor, float, float], torch.Tensor]
          ) -> torch.Tensor:
    alphas_cumprod = schedule.alphas_cumprod.tolist()
    steps = timesteps(schedule.num_timesteps, num_steps)
    x_t = noise
    for i, t in enumerate(tqdm(steps, desc=desc, disable=not progress, leave=False)):
        alpha_bar_s = alphas_cumprod[steps[i + 1]] if i + 1 < len(steps) else 1.0
        t_batch = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long)
        predicted_noise = model(x_t, t_batch)
        x_t = update(x_t, predicted_noise, alphas_cumprod[t], alpha_bar_s)
    return x_t


@torch.no_grad()
def ddpm_sample(model: NoisePredictor, schedule: NoiseSchedule, noise: torch.Tensor, *,
                num_steps: int | None = None, variance: VarianceName = "beta_tilde",
                generator: Generators = None, progress: bool = False) -> torch.Tensor:
    """Ancestral sampling from x_T = `noise` (B, C, H, W)."""

    def update(x_t: torch.Tensor, predicted_noise: torch.Tensor, alpha_bar_t: float,
               alpha_bar_s: float) -> torch.Tensor:
        alpha = alpha_bar_t / alpha_bar_s  # alpha_t of the (respaced) step t -> s
        beta = 1.0 - alpha
        mean = (x_t - beta / (1.0 - alpha_bar_t) ** 0.5 * predicted_noise) / alpha**0.5  # eq. (6)
        if alpha_bar_s == 1.0:  # last step: return the mean, as in DDPM
            return mean
        beta_tilde = (1.0 - alpha_bar_s) / (1.0 - alpha_bar_t) * beta
        sigma = (beta_tilde if variance == "beta_tilde" else beta) ** 0.5
        return mean + sigma * randn(x_t.shape, generator, x_t.device, x_t.dtype)

    return _walk(model, schedule, noise, num_steps, progress, "ddpm", update)


@torch.no_grad()
def ddim_sample(model: NoisePredictor, schedule: NoiseSchedule, noise: torch.Tensor, *,
                num_steps: int | None = 50, eta: float = 0.0, generator: Generators = None,
                progress: bool = False) -> torch.Tensor:
    """DDIM from x_T = `noise`; eta = 1 with all steps matches DDPM with beta_tilde."""

    def update(x_t: torch.Tensor, predicted_noise: torch.Tensor, alpha_bar_t: float,
               alpha_bar_s: float) -> torch.Tensor:
        predicted_x0 = (x_t - (1.0 - alpha_bar_t) ** 0.5 * predicted_noise) / alpha_bar_t**0.5
        # eq. (16): sigma = eta sqrt((1 - a_s) / (1 - a_t)) sqrt(1 - a_t / a_s)
        sigma = eta * ((1 - alpha_bar_s) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_s))**0.5
        direction = (1.0 - alpha_bar_s - sigma**2) ** 0.5 * predicted_noise
        x_s = alpha_bar_s**0.5 * predicted_x0 + direction
        if sigma > 0:
            x_s = x_s + sigma * randn(x_t.shape, generator, x_t.device, x_t.dtype)
        return x_s

    return _walk(model, schedule, noise, num_steps, progress, "ddim", update)


def sample(model: NoisePredictor, schedule: NoiseSchedule, noise: torch.Tensor,
           sampler: SamplerName, num_steps: int | None, *, variance: VarianceName = "beta_tilde",
           eta: float = 0.0, generator: Generators = None, progress: bool = False
           ) -> torch.Tensor:
    """Dispatch on the sampler's name (a Literal, checked by the config)."""
    if sampler == "ddpm":
        return ddpm_sample(model, schedule, noise, num_steps=num_steps, variance=variance,
                           generator=generator, progress=progress)
    return ddim_sample(model, schedule, noise, num_steps=num_steps, eta=eta,
                       generator=generator, progress=progress)
