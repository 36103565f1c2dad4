"""What the denoiser is trained to predict, how the loss weighs each t, and the way back to noise.

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
  noisy. Measured: FID 56.8 -> 45.0 after the same 3 epochs (README, ablation).
Samplers take a noise predictor; `noise_predictor` converts a v-network into one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..config import ObjectiveConfig
from .schedule import NoiseSchedule

Network = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t) -> prediction


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


def diffusion_loss(objective: ObjectiveConfig, schedule: NoiseSchedule, network: Network,
                   x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                   probabilities: torch.Tensor) -> torch.Tensor:
    """E_t w_t ||target - network(x_t, t)||^2 over a uniform t, estimated from t (B,) drawn from
    `probabilities` (T,) and noise like x0 (B, C, S, S); the post's eq. (5) when the target is
    the noise, w_t = 1 and t is drawn uniformly."""
    prediction = network(schedule.add_noise(x0, noise, t), t)
    squared_error = (prediction - target(objective, schedule, x0, noise, t)).square()
    weight = sample_weight(objective, schedule, t, probabilities)  # (B,)
    return (weight * squared_error.mean((1, 2, 3))).mean()


def noise_predictor(network: Network, objective: ObjectiveConfig,
                    schedule: NoiseSchedule) -> Network:
    """The network as a noise predictor: noise = sqrt(alpha_bar) v + sqrt(1 - alpha_bar) x_t."""
    if objective.prediction == "noise":
        return network

    def predict_noise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha_bar = schedule.alpha_bar(t, x_t)
        return alpha_bar.sqrt() * network(x_t, t) + (1 - alpha_bar).sqrt() * x_t

    return predict_noise
