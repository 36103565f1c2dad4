"""The denoiser form every sampler sees: D(x, sigma) -> estimate of x_0 (Karras et al. 2022).

x = x_0 + sigma * noise is the variance-exploding (VE) form of a noisy sample, whatever the model
was trained on. A sampler only sees D and a decreasing sequence of noise levels ending at 0, so
any trained objective that provides D works with every sampler.

The VP models of this project (eq. (3) of the post: x_t = sqrt(alpha_bar) x_0 + sqrt(1 - alpha_bar)
noise) are the same process up to scale:
    sigma = sqrt((1 - alpha_bar) / alpha_bar),  x_t = x / sqrt(1 + sigma^2) = sqrt(alpha_bar) x
and their network's output converts to x_0 as
    noise prediction: x_0 = (x_t - sqrt(1 - alpha_bar) noise) / sqrt(alpha_bar) = x - sigma noise
    v prediction:     x_0 = sqrt(alpha_bar) x_t - sqrt(1 - alpha_bar) v
(Karras et al. 2022; k-diffusion `external.py`, EDM `generate.py`). The network was trained on
integer timesteps; a level between two of them is given the log-sigma interpolation of t.

Flow matching / rectified flow (Lipman et al. 2023, Liu et al. 2023) and IADB (Heitz et al. 2023)
take the straight path x_t = (1 - t) x_0 + t noise, t in [0, 1], and predict the velocity
v = noise - x_0. In this form sigma = t / (1 - t), x_t = x / (1 + sigma) and x_0 = x_t - t v.
Its noisiest level, t = 1, is sigma = inf: there a sampler's state holds the limit of x / sigma,
the unit noise itself (`prior`), and the samplers step out of it in the limit form; D there is
the data mean, E[x_0] (FlowDenoiser.mean_at_noise).

Samplers that start at a finite level (the karras and logsnr ladders) start from the data mean
plus noise (`start`), the marginal's first two moments there.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from .schedule import NoiseSchedule

Network = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t) -> prediction
# The top of the `karras` and `logsnr` ladders (EDM's sigma_max): at sigma = 80 the data's share
# of x_t is ~1%, and levels above it only spend steps on noise (a cosine VP model's own top level
# is 20,291); a cap of 20 was worse (docs/samplers.md).
LADDER_SIGMA_MAX = 80.0
# The bottom of those ladders for K steps is min(0.1, 10 / K^2) (or the model's own smallest
# level if higher); from there the sampler's last step jumps to D(x, sigma_min). The latents have
# unit standard deviation, so 0.1 is noise at a tenth of the data's spread. Steps below it refine
# what the decoder cannot see, and a few-step solver needs them higher up: ending at 0.1 brings
# 10-step solvers closer to the converged ODE than ending at the trained 0.0064, while the final
# jump's own error outweighs that gain from about 20 steps on, hence the 1 / K^2 fall
# (benchmarks/ladders.py, docs/samplers.md).
LADDER_SIGMA_MIN, LADDER_FALL = 0.1, 10.0  # bottom: min(LADDER_SIGMA_MIN, LADDER_FALL / K^2)
# The samplers' rules beyond the model, in the key of every sample set and sweep they shape, so
# images made under another rule are made again, not reused: the ladders' ends, their start from
# the data's mean (`start`), and a flow model's D at t = 1 (FlowDenoiser.mean_at_noise).
LADDERS = {"sigma_max": LADDER_SIGMA_MAX, "sigma_min": LADDER_SIGMA_MIN, "fall": LADDER_FALL,
           "start": "data mean", "flow_at_noise": "data mean"}
Prediction = Literal["noise", "v"]
Spacing = Literal["timesteps", "karras", "logsnr"]


class Denoiser(Protocol):
    """What a sampler needs of a trained model."""

    sigma_min: float  # the smallest noise level the model was trained on (ladder_sigma_min)
    sigma_max: float  # the top of the karras and logsnr ladders (at most LADDER_SIGMA_MAX)

    def __call__(self, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) noisy x at level sigma (a float or (B,)) -> (B, C, H, W) x_0 estimate."""
        ...

    def prior(self, noise: torch.Tensor, sigma: float) -> torch.Tensor:
        """A sample of x at level sigma, the sampler's start, from unit `noise` (start)."""
        ...

    def timestep_sigmas(self, num_steps: int | None) -> torch.Tensor:
        """(K,) decreasing levels of the model's own training grid; all of them for None."""
        ...


def start(noise: torch.Tensor, sigma: float, data_mean: torch.Tensor | None) -> torch.Tensor:
    """x at a finite level sigma from unit noise: data_mean + sqrt(1 + sigma^2) noise.

    The marginal of x = x_0 + sigma noise has mean E[x_0] and, for the unit-variance latents,
    std sqrt(1 + sigma^2). At the top of the ladders (sigma = 80) the mean is 1% of x, yet it is
    no detail: the latents' mean image (RMS 0.82 on MNIST) is left out of N(0, sigma^2) and the
    ODE carries the error to the end. `data_mean` (C, H, W) is the training latents' mean,
    stored with the model; None starts from 0.
    """
    x = noise * (1 + sigma**2) ** 0.5
    return x if data_mean is None else x + data_mean.to(x)


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


@dataclass
class VPDenoiser:
    """D(x, sigma) of a network trained on the discrete VP process of `schedule`."""

    network: Network
    schedule: NoiseSchedule
    prediction: Prediction = "noise"
    data_mean: torch.Tensor | None = None  # (C, H, W) of the training x_0 (start)

    def __post_init__(self) -> None:
        alphas_cumprod = self.schedule.alphas_cumprod  # (T,) float64
        self.sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()  # (T,) increasing
        self.log_sigmas = self.sigmas.log()
        self.sigma_min = float(self.sigmas[0])
        self.sigma_max = min(float(self.sigmas[-1]), LADDER_SIGMA_MAX)

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """(B,) float64 sigma -> (B,) fractional t, linear in log sigma between grid points;
        exactly the integer t on the grid."""
        log_sigma = sigma.log().clamp(self.log_sigmas[0], self.log_sigmas[-1])
        high = torch.searchsorted(self.log_sigmas, log_sigma).clamp(1, len(self.sigmas) - 1)
        low_value, high_value = self.log_sigmas[high - 1], self.log_sigmas[high]
        fraction = (log_sigma - low_value) / (high_value - low_value)
        return (high - 1) + fraction

    def __call__(self, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float64).expand(x.shape[0])  # (B,)
        alpha = (1 + sigma.square()).rsqrt()  # sqrt(alpha_bar)
        alpha_, sigma_ = alpha.to(x).view(-1, 1, 1, 1), sigma.to(x).view(-1, 1, 1, 1)
        x_t = alpha_ * x  # (B, C, H, W) the network's own input scale
        output = self.network(x_t, _time_like(self.timestep(sigma), x))
        if self.prediction == "noise":
            return x - sigma_ * output
        # sqrt(alpha_bar) x_t - sqrt(1 - alpha_bar) v with sqrt(1 - alpha_bar) = sigma alpha
        return alpha_ * (x_t - sigma_ * output)

    def prior(self, noise: torch.Tensor, sigma: float) -> torch.Tensor:
        """x_t = noise at the model's own top level (eq. (3) with the data forgotten), i.e.
        x = noise sqrt(1 + sigma^2); below it, `start` from the data mean. (At the top, where
        the timestep samplers begin, the mean is 5e-5 of x: left out, their images stay as
        they were.)"""
        if sigma >= float(self.sigmas[-1]):
            return noise * (1 + sigma**2) ** 0.5
        return start(noise, sigma, self.data_mean)

    def timestep_sigmas(self, num_steps: int | None) -> torch.Tensor:
        return self.sigmas[timesteps(len(self.sigmas), num_steps)]


@dataclass
class FlowDenoiser:
    """D(x, sigma) of a network trained on the straight path, conditioned on time_scale * t."""

    network: Network
    time_scale: float = 1000.0  # t in [0, 1] reaches the network on the VP models' 0..T scale
    # The ladders of `karras` and `logsnr` spacing (t = 1 is sigma = inf, which they cannot
    # place) end at EDM's levels: sigma_max = 80 is t = 0.988.
    sigma_min: float = 0.002
    sigma_max: float = LADDER_SIGMA_MAX
    data_mean: torch.Tensor | None = None  # (C, H, W) of the training x_0 (start)
    # At t = 1, x_t is pure noise, so E[x_0 | x_t] = E[x_0] exactly: D is data_mean there, not
    # the network's guess at a level that the logit-normal t almost never trains. Off for
    # label-conditioned rows, whose E[x_0 | y] is their class's mean.
    mean_at_noise: bool = True

    def __call__(self, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float64).expand(x.shape[0])  # (B,)
        t = 1 / (1 + 1 / sigma)  # sigma / (1 + sigma), 1 at sigma = inf
        scale = torch.where(sigma.isinf(), 1.0, 1 / (1 + sigma))  # x_t = x / (1 + sigma)
        x_t = scale.to(x).view(-1, 1, 1, 1) * x  # (B, C, H, W)
        velocity = self.network(x_t, _time_like(self.time_scale * t, x))
        denoised = x_t - t.to(x).view(-1, 1, 1, 1) * velocity
        if self.data_mean is None or not self.mean_at_noise:
            return denoised
        at_noise = sigma.isinf().to(x.device).view(-1, 1, 1, 1)  # (B, 1, 1, 1) rows at t = 1
        return torch.where(at_noise, self.data_mean.to(x), denoised)

    def prior(self, noise: torch.Tensor, sigma: float) -> torch.Tensor:
        """The noise itself at sigma = inf (x_t = noise at t = 1, in the limit form); `start`
        at a finite level."""
        return noise if math.isinf(sigma) else start(noise, sigma, self.data_mean)

    def timestep_sigmas(self, num_steps: int | None) -> torch.Tensor:
        """IADB's levels: t_k = k / K for k = K .. 1 (K = 1000 for None), from sigma = inf."""
        count = num_steps or 1000
        t = torch.arange(count, 0, -1, dtype=torch.float64) / count
        return t / (1 - t)  # inf at t = 1


def _time_like(time: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The network's (B,) time on x's device: float32, or float64 for float64 x (exact tests;
    the UNet embeds it in float32 either way)."""
    return time.to(device=x.device, dtype=torch.promote_types(x.dtype, torch.float32))


def karras_sigmas(num_steps: int, sigma_min: float, sigma_max: float,
                  rho: float = 7.0) -> torch.Tensor:
    """(K,) EDM's levels: sigma_i = (max^(1/rho) + i / (K - 1) (min^(1/rho) - max^(1/rho)))^rho."""
    ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    max_inv, min_inv = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (max_inv + ramp * (min_inv - max_inv)) ** rho


def logsnr_sigmas(num_steps: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """(K,) levels evenly spaced in lambda = -log sigma, half the log-SNR (DPM-Solver's choice)."""
    return torch.linspace(math.log(sigma_max), math.log(sigma_min), num_steps,
                          dtype=torch.float64).exp()


def ladder_sigma_min(denoiser: Denoiser, num_steps: int) -> float:
    """The lowest level of a karras or logsnr ladder of K steps (LADDER_SIGMA_MIN)."""
    return max(denoiser.sigma_min, min(LADDER_SIGMA_MIN, LADDER_FALL / num_steps**2))


def noise_levels(denoiser: Denoiser, spacing: Spacing, num_steps: int | None,
                 sigma_min: float | None = None) -> torch.Tensor:
    """(K + 1,) float64 decreasing noise levels for K steps, ending at 0; a karras or logsnr
    ladder ends at `sigma_min` if given (measurements), else at ladder_sigma_min."""
    if spacing == "timesteps":
        levels = denoiser.timestep_sigmas(num_steps)
    elif num_steps is None:
        raise ValueError(f"spacing {spacing!r} needs a number of steps")
    else:
        ladder = karras_sigmas if spacing == "karras" else logsnr_sigmas
        bottom = ladder_sigma_min(denoiser, num_steps) if sigma_min is None else sigma_min
        levels = ladder(num_steps, bottom, denoiser.sigma_max)
    return torch.cat([levels.double(), levels.new_zeros(1, dtype=torch.float64)])
