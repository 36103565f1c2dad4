"""Samplers: plain functions `(denoiser, x, sigmas, *, generator, progress, **options) -> x_0`.

Each walks the decreasing noise levels `sigmas` (K + 1,), ending at 0, from x at sigmas[0], and
sees the model only as the denoiser D(x, sigma) (denoiser.py). With d = (x - D(x, sigma)) / sigma,
the probability-flow ODE is dx/dsigma = d (Karras et al. 2022, eq. 3).
- DDIM (Song et al. 2021), eta in [0, 1]: eta = 0 is Euler's method on that ODE (Karras et al.,
  sec. 4); eta > 0 steps deterministically to sigma_down and adds fresh noise of sigma_up, with
  sigma_up^2 = eta^2 sigma_next^2 (1 - sigma_next^2 / sigma^2), eq. (16) in VE units.
- DDPM (Ho et al. 2020), ancestral: DDIM with eta = 1 draws sigma^2 = beta_tilde (the post's
  choice); variance="beta" keeps that mean and draws beta of the respaced VP step instead.
- Heun (Karras et al. 2022, Alg. 1 without churn): Euler, then the trapezoidal correction on every
  step but the last (2K - 1 model calls).
- DPM-Solver++(2M) (Lu et al. 2022): second-order multistep in lambda = -log sigma from this and
  the previous D; first order on the first and the last step. Its SDE form adds noise
  (k-diffusion `sample_dpmpp_2m_sde`, midpoint).
IADB (Heitz et al. 2023), the post's suggestion, is `ddim` on a flow model: Euler on uniform t,
starting from pure noise at sigma = inf (denoiser.py's limit form). The predicted x_0 is not
clipped: latents are unbounded. One table, SAMPLERS, maps a name to its
function, default spacing of the levels, default steps and model calls per run, and a request
such as 'ddim-50' is parsed once into a `SamplerChoice`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
from tqdm.auto import tqdm

from ..errors import UsageError
from ..rng import Generators, randn
from .denoiser import Denoiser, Spacing, noise_levels

SamplerFunction = Callable[..., torch.Tensor]
VarianceName = Literal["beta_tilde", "beta"]


def _levels(sigmas: torch.Tensor, progress: bool, desc: str) -> Any:
    """(sigma, sigma_next) pairs as floats, with a progress bar."""
    pairs = list(zip(sigmas[:-1].tolist(), sigmas[1:].tolist(), strict=True))
    return tqdm(pairs, desc=desc, disable=not progress, leave=False)


def _unit_noise(x: torch.Tensor, denoised: torch.Tensor, sigma: float) -> torch.Tensor:
    """d = (x - D) / sigma, the predicted noise and dx/dsigma; at sigma = inf the state is the
    limit of x / sigma, the noise itself."""
    return x if math.isinf(sigma) else (x - denoised) / sigma


def _noise_like(x: torch.Tensor, generator: Generators) -> torch.Tensor:
    return randn(x.shape, generator, x.device, x.dtype)


@torch.no_grad()
def ddim_sample(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, eta: float = 0.0,
                generator: Generators = None, progress: bool = False) -> torch.Tensor:
    """DDIM; Euler on the probability-flow ODE when eta = 0."""
    if not 0.0 <= eta <= 1.0:
        raise UsageError(f"eta must be in [0, 1], got {eta}")
    return _ancestral(denoiser, x, sigmas, eta, generator, progress, "ddim")


def _ancestral(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, eta: float,
               generator: Generators, progress: bool, desc: str) -> torch.Tensor:
    """DDIM's steps in VE units: Euler to sigma_down, then fresh noise of sigma_up."""
    for sigma, sigma_next in _levels(sigmas, progress, desc):
        denoised = denoiser(x, sigma)
        d = _unit_noise(x, denoised, sigma)
        if sigma_next == 0:
            x = denoised
            continue
        ratio_squared = (sigma_next / sigma) ** 2
        sigma_up = eta * sigma_next * (1 - ratio_squared) ** 0.5
        sigma_down = sigma_next * (1 - eta**2 * (1 - ratio_squared)) ** 0.5
        x = denoised + sigma_down * d  # Euler from sigma to sigma_down
        if sigma_up > 0:
            x = x + sigma_up * _noise_like(x, generator)
    return x


@torch.no_grad()
def ddpm_sample(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *,
                variance: VarianceName = "beta_tilde", generator: Generators = None,
                progress: bool = False) -> torch.Tensor:
    """Ancestral DDPM: the eq. (6) mean plus noise of beta_tilde (or beta) of each step."""
    if variance == "beta_tilde":
        return _ancestral(denoiser, x, sigmas, 1.0, generator, progress, "ddpm")
    for sigma, sigma_next in _levels(sigmas, progress, "ddpm"):
        denoised = denoiser(x, sigma)
        if sigma_next == 0:  # last step: the mean, as in DDPM
            x = denoised
            continue
        # The eq. (6) mean is DDIM's eta = 1 step: sigma_down = sigma_next^2 / sigma. The VP
        # step's beta = 1 - alpha_bar_t / alpha_bar_s = (sigma^2 - sigma_next^2) / (1 + sigma^2),
        # over alpha_bar_s = 1 / (1 + sigma_next^2) in VE units (defined on the VP path).
        ratio = sigma_next / sigma
        beta = (1 - ratio**2) / (1 / sigma**2 + 1)
        x = denoised + sigma_next * ratio * _unit_noise(x, denoised, sigma)
        x = x + (beta * (1 + sigma_next**2)) ** 0.5 * _noise_like(x, generator)
    return x


@torch.no_grad()
def heun_sample(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *,
                generator: Generators = None, progress: bool = False) -> torch.Tensor:
    """EDM's second-order sampler (deterministic: `generator` is unused)."""
    if math.isinf(sigmas[0]):
        raise ValueError("heun needs finite noise levels (use its karras spacing)")
    for sigma, sigma_next in _levels(sigmas, progress, "heun"):
        d = (x - denoiser(x, sigma)) / sigma
        x_euler = x + (sigma_next - sigma) * d
        if sigma_next == 0:  # the last step stays Euler: D at sigma = 0 is the identity
            x = x_euler
            continue
        d_next = (x_euler - denoiser(x_euler, sigma_next)) / sigma_next
        x = x + (sigma_next - sigma) * (d + d_next) / 2  # trapezoidal rule
    return x


@torch.no_grad()
def dpmpp_2m_sample(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *,
                    generator: Generators = None, progress: bool = False) -> torch.Tensor:
    """DPM-Solver++(2M), data prediction (deterministic: `generator` is unused)."""
    return dpmpp_2m_sde_sample(denoiser, x, sigmas, eta=0.0, progress=progress)


@torch.no_grad()
def dpmpp_2m_sde_sample(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *,
                        eta: float = 1.0, generator: Generators = None,
                        progress: bool = False) -> torch.Tensor:
    """DPM-Solver++(2M) SDE; eta = 0 is the ODE solver DPM-Solver++(2M).

    With lambda = -log sigma and h = lambda_next - lambda (VE units, alpha = 1):
        x_next = (sigma_next / sigma) e^(-eta h) x + (1 - e^(-(1 + eta) h)) D'
                 + sigma_next sqrt(1 - e^(-2 eta h)) noise
    where D' = D + (D - D_prev) / (2 r), r = h_prev / h, from the second step on.
    """
    denoised_prev: torch.Tensor | None = None
    h_prev = 0.0
    desc = "dpmpp-2m-sde" if eta else "dpmpp-2m"
    for sigma, sigma_next in _levels(sigmas, progress, desc):
        denoised = denoiser(x, sigma)
        if sigma_next == 0:  # first order into sigma = 0 (lambda = inf): x_0 = D
            x = denoised
            continue
        h = math.log(sigma / sigma_next)  # inf from sigma = inf: a first-order step
        data_weight = -math.expm1(-(1 + eta) * h)
        estimate = denoised
        if denoised_prev is not None:  # second order from the previous step's D
            estimate = denoised + (denoised - denoised_prev) * (h / h_prev / 2)
        decay = math.exp(-eta * h) if eta else 1.0  # (0 * inf is nan)
        scaled = x if math.isinf(sigma) else x / sigma  # x / sigma: the noise at sigma = inf
        x = sigma_next * decay * scaled + data_weight * estimate
        if eta:
            x = x + sigma_next * (-math.expm1(-2 * eta * h)) ** 0.5 * _noise_like(x, generator)
        denoised_prev, h_prev = denoised, h
    return x


@dataclass(frozen=True)
class SamplerInfo:
    """What `SAMPLERS` knows of one sampler."""

    function: SamplerFunction
    spacing: Spacing  # default placement of the noise levels (denoiser.noise_levels)
    default_steps: int | None  # None: every level of the model's training grid
    second_order: bool = False  # two model calls per step but the last
    stochastic: bool = False  # draws fresh noise at each step (at its default options)
    options: tuple[str, ...] = ()  # the keyword options it takes (SamplerChoice's fields)

    def model_calls(self, num_steps: int) -> int:
        """Function evaluations (NFE) of one run of K steps."""
        return 2 * num_steps - 1 if self.second_order else num_steps

    def steps_for(self, model_calls: int) -> int:
        """The most steps whose NFE is at most `model_calls` (at least one)."""
        return max(1, (model_calls + 1) // 2 if self.second_order else model_calls)


SAMPLERS: dict[str, SamplerInfo] = {
    "ddpm": SamplerInfo(ddpm_sample, "timesteps", None, stochastic=True, options=("variance",)),
    "ddim": SamplerInfo(ddim_sample, "timesteps", 50, options=("eta",)),
    "euler": SamplerInfo(ddim_sample, "karras", 20),  # DDIM with eta = 0 is Euler
    "heun": SamplerInfo(heun_sample, "karras", 10, second_order=True),
    "dpmpp-2m": SamplerInfo(dpmpp_2m_sample, "logsnr", 10),
    "dpmpp-2m-sde": SamplerInfo(dpmpp_2m_sde_sample, "logsnr", 10, stochastic=True),
}


MAX_STEPS = 10_000  # ten times the VP models' grid: more is a typo, not a sampler


def parse_sampler(spec: str) -> tuple[str, int | None]:
    """'ddim-50' -> ('ddim', 50); 'dpmpp-2m' -> ('dpmpp-2m', None), meaning its default steps."""
    name, _, steps = spec.rpartition("-")
    if not (steps.isascii() and steps.isdigit()):
        name, steps = spec, ""
    if name not in SAMPLERS:
        raise UsageError(f"unknown sampler {name!r} (choose from {', '.join(SAMPLERS)})")
    if steps and not 0 < int(steps) <= MAX_STEPS:
        raise UsageError(f"sampler {spec!r}: steps must be an integer in 1 .. {MAX_STEPS}")
    return name, int(steps) if steps else SAMPLERS[name].default_steps


@dataclass(frozen=True)
class SamplerChoice:
    """A sampler request such as 'ddim-50' with its options, parsed once where it enters."""

    spec: str  # as given ('ddpm-20', 'heun'): it names a sample set
    variance: VarianceName = "beta_tilde"  # ddpm's
    eta: float = 0.0  # ddim's
    name: str = field(init=False)  # a key of SAMPLERS
    steps: int | None = field(init=False)  # None: every level of the model's grid

    def __post_init__(self) -> None:
        name, steps = parse_sampler(self.spec)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "steps", steps)
        if self.variance not in get_args(VarianceName):
            raise UsageError(f"unknown variance {self.variance!r} (choose from "
                             f"{', '.join(get_args(VarianceName))})")
        if not 0.0 <= self.eta <= 1.0:
            raise UsageError(f"eta must be in [0, 1], got {self.eta}")

    @property
    def info(self) -> SamplerInfo:
        return SAMPLERS[self.name]

    @property
    def uses_ladder(self) -> bool:
        """Whether its levels lie on a karras or logsnr ladder (denoiser.LADDERS)."""
        return self.info.spacing != "timesteps"

    def levels(self, denoiser: Denoiser) -> torch.Tensor:
        """(K + 1,) its noise levels on this denoiser, ending at 0."""
        return noise_levels(denoiser, self.info.spacing, self.steps)

    def model_calls(self, denoiser: Denoiser) -> int:
        """Its NFE on this denoiser (whose grid decides 'ddpm' with every step); the denoiser's
        levels alone are read, so one without weights will do (objective.levels_only)."""
        return self.info.model_calls(len(self.levels(denoiser)) - 1)


def sample(denoiser: Denoiser, noise: torch.Tensor, sampler: SamplerChoice | str, *,
           generator: Generators = None, progress: bool = False, **options: Any) -> torch.Tensor:
    """Run `sampler` from unit `noise` (B, C, H, W); a spec such as 'ddpm-25' is parsed with
    `options` (those it does not take are ignored)."""
    if isinstance(sampler, str):
        sampler = SamplerChoice(sampler, **options)
    sigmas = sampler.levels(denoiser)  # (K + 1,)
    x = denoiser.prior(noise, float(sigmas[0]))
    kwargs = {k: getattr(sampler, k) for k in sampler.info.options}
    return sampler.info.function(denoiser, x, sigmas, generator=generator, progress=progress,
                                 **kwargs)
