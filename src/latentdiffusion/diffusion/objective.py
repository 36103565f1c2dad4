"""Training objectives: how t is drawn and weighed, how x_0 is corrupted, what the network
predicts, and how the trained network becomes the samplers' denoiser D(x, sigma).

Every objective has one shape (EDM's loss classes, flow_matching's probability paths), and one
loss serves them all: E_t w_t ||network(x_t, time(t)) - target||^2.

VP diffusion (`kind="vp"`, the post's process, eq. (3)):
- "noise": the post's target, eq. (5): the noise that was added (Ho et al. 2020).
- "v": v = sqrt(alpha_bar_t) noise - sqrt(1 - alpha_bar_t) x_0 (Salimans & Ho 2022). The x_0
  implied by a noise prediction, (x_t - sqrt(1 - alpha_bar) noise) / sqrt(alpha_bar), multiplies
  its error by sqrt((1 - alpha_bar) / alpha_bar), ~160 at the noisy end of the post's schedule;
  the x_0 implied by v, sqrt(alpha_bar) x_t - sqrt(1 - alpha_bar) v, never amplifies it.
- Min-SNR-gamma weighting (Hang et al. 2023): the per-t loss is weighed so that, in terms of the
  x_0 error, each t counts min(SNR_t, gamma) with SNR_t = alpha_bar_t / (1 - alpha_bar_t). The
  near-clean steps (huge SNR, easy, low-value) stop dominating the gradient. gamma = 0 turns it
  off (uniform weights, the post's loss).
- Importance sampling of t: the loss is E_t[w_t l_t] over a uniform t. Drawing t with
  probability p_t proportional to w_t and weighing each draw by w_t / (T p_t) has the same
  expectation, but no draw is spent on the near-zero weights at either end of the schedule
  (min-SNR-5 with the cosine schedule: mean weight 0.33, peak 0.83), so the gradient is less
  noisy (docs/recipe.md).

Flow matching (`kind="flow"`; Lipman et al. 2023, Liu et al. 2023, IADB of Heitz et al. 2023):
x_t = (1 - t) x_0 + t noise for t in [0, 1], target the velocity noise - x_0, t drawn uniformly or
logit-normal, t = sigmoid(m + s z) (Esser et al. 2024), which spends the draws on the middle of
the path where the velocity is hardest to predict. The network sees 1000 t, the VP models' scale.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch

from ..errors import UsageError
from ..schema import check_fields
from .denoiser import Denoiser, FlowDenoiser, Network, VPDenoiser
from .schedule import NoiseSchedule, ScheduleConfig

PredictionName = Literal["noise", "v"]
TimestepSampling = Literal["uniform", "importance"]
ObjectiveKind = Literal["vp", "flow"]
TimeDensity = Literal["uniform", "logit-normal"]


@dataclass(frozen=True)
class ObjectiveConfig:
    """The denoiser's process, training target and loss weights (see diffusion/objective.py).

    kind="vp" is the post's process: prediction="noise", min_snr_gamma=0, t drawn uniformly in
    the post; the VP presets use "v" with min-SNR-2 and t drawn in proportion to its weight,
    which reach a given FID in far fewer CPU-minutes (docs/recipe.md). kind="flow" is flow
    matching on the straight path (IADB, rectified flow), which reads only the time density
    fields below.
    """

    prediction: PredictionName = "noise"  # vp
    min_snr_gamma: float = 0.0  # vp: 0 = uniform weights over t
    # vp: "importance" draws t with probability proportional to its loss weight and divides the
    # weight back out; the same expected loss with less gradient noise (objective.py).
    timestep_sampling: TimestepSampling = "uniform"
    kind: ObjectiveKind = "vp"
    time_density: TimeDensity = "logit-normal"  # flow: t = sigmoid(logit_mean + logit_std z)
    logit_mean: float = 0.0
    logit_std: float = 1.0
    # A class-conditional model (unet.num_classes > 0) is trained on the "no label" index with
    # this probability, so one network is both D_cond and D_uncond (Ho & Salimans 2022).
    label_dropout: float = 0.1

    def __post_init__(self) -> None:
        check_fields(self, positive=("logit_std",), unit=("label_dropout",))
        if self.min_snr_gamma < 0:
            raise UsageError("ObjectiveConfig.min_snr_gamma must be >= 0, "
                             f"got {self.min_snr_gamma}")


def target(objective: ObjectiveConfig, schedule: NoiseSchedule, x0: torch.Tensor,
           noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the network should output for x_t = add_noise(x0, noise, t); shapes (B, C, H, W)."""
    if objective.prediction == "noise":
        return noise
    alpha_bar = schedule.alpha_bar(t, x0)
    return alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0  # v


def loss_weight(objective: ObjectiveConfig, schedule: NoiseSchedule,
                t: torch.Tensor) -> torch.Tensor:
    """(B,) weight of each sample's mean squared error; all ones without min-SNR."""
    alphas_cumprod = schedule.alphas_cumprod.to(t.device)[t]
    if not objective.min_snr_gamma:
        return torch.ones_like(alphas_cumprod, dtype=torch.float32)
    snr = alphas_cumprod / (1 - alphas_cumprod)
    clipped = snr.clamp(max=objective.min_snr_gamma)
    # ||noise error||^2 = SNR ||x0 error||^2 and ||v error||^2 = (SNR + 1) ||x0 error||^2.
    denominator = snr if objective.prediction == "noise" else snr + 1
    return (clipped / denominator).float()


def timestep_probabilities(objective: ObjectiveConfig, schedule: NoiseSchedule) -> torch.Tensor:
    """(T,) probabilities of drawing each t in training: uniform, or proportional to w_t."""
    num_timesteps = schedule.num_timesteps
    if objective.timestep_sampling == "uniform":
        return torch.full((num_timesteps,), 1.0 / num_timesteps)
    weights = loss_weight(objective, schedule, torch.arange(num_timesteps)).double()
    return (weights / weights.sum()).float()


def sample_weight(objective: ObjectiveConfig, schedule: NoiseSchedule, t: torch.Tensor,
                  probabilities: torch.Tensor) -> torch.Tensor:
    """(B,) weight of each draw t ~ probabilities: w_t / (T p_t), so E[weight * l_t] equals the
    uniform-t loss E_t[w_t l_t]; w_t itself when t is uniform."""
    p_t = probabilities.to(t.device)[t]
    return loss_weight(objective, schedule, t) / (schedule.num_timesteps * p_t)


class Draws(Protocol):
    """A batch of x_0 (`tensors[0]`), for a conditional model its labels (`tensors[1]`), and
    the step's randomness (training.Batch)."""

    tensors: tuple[torch.Tensor, ...]

    def randn(self, *shape: int) -> torch.Tensor: ...

    def rand(self) -> torch.Tensor: ...

    def choice(self, probabilities: torch.Tensor) -> torch.Tensor: ...


class Objective(Protocol):
    def draw(self, draws: Draws) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) times t and (B,) loss weights of one batch."""
        ...

    def corrupt(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t, (B, C, H, W)."""
        ...

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network should output at x_t, (B, C, H, W)."""
        ...

    def network_time(self, t: torch.Tensor) -> torch.Tensor:
        """The (B,) time the network is conditioned on."""
        ...

    def denoiser(self, network: Network, data_mean: torch.Tensor | None = None,
                 labelled: bool = False) -> Denoiser:
        """The trained network as D(x, sigma), for every sampler; `data_mean` (C, H, W) of the
        training x_0 is where the ladders start (denoiser.start) and, for a network that sees
        no labels, the flow model's D at t = 1."""
        ...


@dataclass
class VPObjective:
    """The post's discrete VP process with noise or v targets and min-SNR weights."""

    config: ObjectiveConfig
    schedule: NoiseSchedule
    probabilities: torch.Tensor = field(init=False)  # (T,) of drawing each t

    def __post_init__(self) -> None:
        self.probabilities = timestep_probabilities(self.config, self.schedule)

    def draw(self, draws: Draws) -> tuple[torch.Tensor, torch.Tensor]:
        t = draws.choice(self.probabilities)  # (B,) long
        return t, sample_weight(self.config, self.schedule, t, self.probabilities)

    def corrupt(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.schedule.add_noise(x0, noise, t)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return target(self.config, self.schedule, x0, noise, t)

    def network_time(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def denoiser(self, network: Network, data_mean: torch.Tensor | None = None,
                 labelled: bool = False) -> Denoiser:
        return VPDenoiser(network, self.schedule, self.config.prediction, data_mean)


@dataclass
class FlowObjective:
    """The straight path from data (t = 0) to noise (t = 1), velocity target."""

    config: ObjectiveConfig
    time_scale: float = 1000.0

    def draw(self, draws: Draws) -> tuple[torch.Tensor, torch.Tensor]:
        z = draws.randn()  # (B,)
        if self.config.time_density == "uniform":
            t = 0.5 * (1 + torch.erf(z / math.sqrt(2)))  # Phi(z) ~ U(0, 1)
        else:  # logit-normal
            t = torch.sigmoid(self.config.logit_mean + self.config.logit_std * z)
        return t, torch.ones_like(t)

    def corrupt(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.view(-1, 1, 1, 1).to(x0.dtype)
        return (1 - t) * x0 + t * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return noise - x0  # d x_t / dt

    def network_time(self, t: torch.Tensor) -> torch.Tensor:
        return self.time_scale * t

    def denoiser(self, network: Network, data_mean: torch.Tensor | None = None,
                 labelled: bool = False) -> Denoiser:
        return FlowDenoiser(network, self.time_scale, data_mean=data_mean,
                            mean_at_noise=not labelled)


def make_objective(config: ObjectiveConfig, schedule: NoiseSchedule) -> Objective:
    """The objective of a config; `schedule` is the VP process's (unused by flow)."""
    if config.kind == "flow":
        return FlowObjective(config)
    return VPObjective(config, schedule)


def drop_labels(labels: torch.Tensor, keep: torch.Tensor, null_label: int) -> torch.Tensor:
    """(B,) labels with those where `keep` (B,) is False replaced by the null label."""
    return torch.where(keep, labels, torch.full_like(labels, null_label))


def diffusion_loss(objective: Objective, num_classes: int = 0, label_dropout: float = 0.0
                   ) -> Callable[[Callable[..., torch.Tensor], Draws], torch.Tensor]:
    """E_t w_t ||network(x_t, time(t)[, y]) - target||^2 over the objective's draws of t; the
    post's eq. (5) for the VP objective with the noise target, uniform t and w_t = 1.

    With `num_classes` K > 0 the network also sees the label y (`tensors[1]`), replaced by the
    null label K with probability `label_dropout`; that draw comes after t and the noise, so an
    unconditional model (K = 0) makes exactly the draws it made before labels existed.
    """

    def loss(network: Callable[..., torch.Tensor], draws: Draws) -> torch.Tensor:
        x0 = draws.tensors[0]  # (B, C, S, S) normalised latents
        t, weight = objective.draw(draws)  # (B,), (B,)
        noise = draws.randn(*x0.shape[1:])  # (B, C, S, S)
        inputs = (objective.corrupt(x0, noise, t), objective.network_time(t))
        if num_classes:
            keep = draws.rand() >= label_dropout  # (B,) P(keep) = 1 - p
            labels = drop_labels(draws.tensors[1].long(), keep, num_classes)
            prediction = network(*inputs, labels)
        else:
            prediction = network(*inputs)
        squared_error = (prediction - objective.target(x0, noise, t)).square()
        return (weight * squared_error.mean((1, 2, 3))).mean()

    return loss


def _no_network(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    raise RuntimeError("this denoiser has no weights: it gives noise levels only")


def levels_only(config: ObjectiveConfig, schedule: ScheduleConfig) -> Denoiser:
    """A denoiser of this objective and schedule without a network: its noise levels, which
    decide a sampler's steps and NFE, with no weights read."""
    return make_objective(config, NoiseSchedule.from_config(schedule)).denoiser(_no_network)
