"""The training objectives: targets, min-SNR weights, the straight path, the one loss, and the
denoiser built from the network."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from conftest import TINY_UNET
from latentdiffusion.diffusion import NoiseSchedule, VPDenoiser, sample
from latentdiffusion.diffusion.objective import (
    FlowObjective,
    ObjectiveConfig,
    diffusion_loss,
    loss_weight,
    make_objective,
    sample_weight,
    target,
    timestep_probabilities,
)
from latentdiffusion.diffusion.schedule import ScheduleConfig
from latentdiffusion.errors import UsageError
from latentdiffusion.models import UNet
from latentdiffusion.run.config import TrainConfig
from latentdiffusion.run.keys import StageKey
from latentdiffusion.run.training import Batch, fit, init_model

SCHEDULE = NoiseSchedule.from_config(ScheduleConfig())  # linear, T = 1000
NOISE, V = ObjectiveConfig("noise"), ObjectiveConfig("v")


def _example(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(5, 2, 4, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(5, 2, 4, 4, generator=g, dtype=torch.float64)
    return x0, noise, torch.tensor([0, 10, 300, 700, 999])


def test_noise_target_is_the_noise() -> None:
    x0, noise, t = _example()
    assert torch.equal(target(NOISE, SCHEDULE, x0, noise, t), noise)


def test_v_target_formula_and_its_unit_scale() -> None:
    x0, noise, t = _example()
    alpha_bar = SCHEDULE.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0
    torch.testing.assert_close(target(V, SCHEDULE, x0, noise, t), expected)
    # At t = 0 v is ~noise, at t = T - 1 it is ~ -x_0.
    v = target(V, SCHEDULE, x0, noise, t)
    torch.testing.assert_close(v[0], noise[0], atol=0.05, rtol=0)  # sqrt(1 - a) = 0.01
    torch.testing.assert_close(v[-1], -x0[-1], atol=0.05, rtol=0)  # sqrt(a) = 0.006


@pytest.mark.parametrize("objective", [NOISE, V])
def test_oracle_network_gives_the_true_x0_as_denoiser(objective: ObjectiveConfig) -> None:
    x0, noise, t = _example(1)
    alpha_bar = SCHEDULE.alpha_bar(t, x0)
    x = SCHEDULE.add_noise(x0, noise, t) / alpha_bar.sqrt()  # VE units: x0 + sigma noise
    oracle = target(objective, SCHEDULE, x0, noise, t)
    denoiser = VPDenoiser(lambda x_t, t_: oracle, SCHEDULE, objective.prediction)
    sigma = ((1 - alpha_bar) / alpha_bar).sqrt().view(-1)
    torch.testing.assert_close(denoiser(x, sigma), x0)


def test_v_oracle_for_one_point_lets_ddim_recover_it() -> None:
    point = torch.tensor([0.5, -1.0, 2.0]).view(1, 3, 1, 1)

    def v_oracle(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha_bar = SCHEDULE.alphas_cumprod[t.round().long()].float().view(-1, 1, 1, 1)
        noise = (x_t - alpha_bar.sqrt() * point) / (1 - alpha_bar).sqrt()
        return alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * point

    noise = torch.randn(4, 3, 1, 1, generator=torch.Generator().manual_seed(0))
    x0 = sample(VPDenoiser(v_oracle, SCHEDULE, "v"), noise, "ddim-20")
    torch.testing.assert_close(x0, point.expand_as(x0), atol=1e-3, rtol=0)


def test_uniform_weights_without_min_snr() -> None:
    t = torch.arange(0, 1000, 37)
    assert torch.equal(loss_weight(NOISE, SCHEDULE, t), torch.ones(len(t)))
    assert torch.equal(loss_weight(V, SCHEDULE, t), torch.ones(len(t)))


def test_min_snr_weights() -> None:
    gamma = 5.0
    t = torch.arange(1000)
    alpha_bar = SCHEDULE.alphas_cumprod
    snr = alpha_bar / (1 - alpha_bar)
    noise_w = loss_weight(ObjectiveConfig("noise", gamma), SCHEDULE, t).double()
    v_w = loss_weight(ObjectiveConfig("v", gamma), SCHEDULE, t).double()
    torch.testing.assert_close(noise_w, snr.clamp(max=gamma) / snr, rtol=1e-6, atol=0)
    torch.testing.assert_close(v_w, snr.clamp(max=gamma) / (snr + 1), rtol=1e-6, atol=0)
    # Noisy steps (SNR < gamma) keep weight 1 on the noise target; clean ones are damped.
    noisy = snr < gamma
    assert torch.allclose(noise_w[noisy], torch.ones(int(noisy.sum()), dtype=torch.float64))
    assert noise_w[0] < 0.01 and v_w[0] < 0.01
    # Both weigh the x_0 error by min(SNR, gamma): noise error = SNR x0 error, v = (SNR + 1).
    torch.testing.assert_close(noise_w * snr, v_w * (snr + 1), rtol=1e-6, atol=0)


def test_uniform_timesteps_keep_the_loss_weights() -> None:
    objective = ObjectiveConfig("v", 5.0)
    probabilities = timestep_probabilities(objective, SCHEDULE)
    assert torch.equal(probabilities, torch.full((1000,), 1e-3))
    t = torch.arange(0, 1000, 7)
    torch.testing.assert_close(sample_weight(objective, SCHEDULE, t, probabilities),
                               loss_weight(objective, SCHEDULE, t))


def test_importance_sampling_draws_t_by_weight_and_is_unbiased() -> None:
    objective = ObjectiveConfig("v", 5.0, timestep_sampling="importance")
    t = torch.arange(1000)
    weights = loss_weight(objective, SCHEDULE, t).double()
    probabilities = timestep_probabilities(objective, SCHEDULE).double()
    torch.testing.assert_close(probabilities.sum(), torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(probabilities, weights / weights.sum(), rtol=1e-6, atol=0)
    assert probabilities.argmax() == weights.argmax() and probabilities[0] < 1e-5
    # E_p[weight(t) l_t] = (1/T) sum_t w_t l_t for any per-t loss l: the objective is unchanged.
    per_t_loss = torch.rand(1000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    draw_weights = sample_weight(objective, SCHEDULE, t, probabilities.float()).double()
    torch.testing.assert_close((probabilities * draw_weights * per_t_loss).sum(),
                               (weights * per_t_loss).mean(), rtol=1e-5, atol=0)


def test_bad_objective_values() -> None:
    with pytest.raises(UsageError, match="prediction"):
        ObjectiveConfig("x0")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="min_snr_gamma"):
        ObjectiveConfig("v", -1.0)
    with pytest.raises(UsageError, match="timestep_sampling"):
        ObjectiveConfig("v", 5.0, timestep_sampling="stratified")  # type: ignore[arg-type]


FLOW = ObjectiveConfig(kind="flow")


def _batch(x0: torch.Tensor, seed: int = 0) -> Batch:
    return Batch((x0,), len(x0), slice(None), torch.Generator().manual_seed(seed),
                 torch.device("cpu"))


def test_vp_loss_is_the_written_out_formula() -> None:
    """The VP objective keeps the loss it had: t drawn by importance, then the noise, then
    E w_t ||v - network(x_t, t)||^2."""
    objective = ObjectiveConfig("v", 2.0, timestep_sampling="importance")
    x0 = _example(2)[0].float()

    def network(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x_t) * (t.float() / 1000).view(-1, 1, 1, 1)

    ours = diffusion_loss(make_objective(objective, SCHEDULE))(network, _batch(x0))
    batch = _batch(x0)
    probabilities = timestep_probabilities(objective, SCHEDULE)
    t = batch.choice(probabilities)
    noise = batch.randn(*x0.shape[1:])
    alpha_bar = SCHEDULE.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    x_t = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise
    v = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0
    weight = sample_weight(objective, SCHEDULE, t, probabilities)
    expected = (weight * (network(x_t, t) - v).square().mean((1, 2, 3))).mean()
    torch.testing.assert_close(ours, expected)


def test_flow_path_and_target() -> None:
    objective = make_objective(FLOW, SCHEDULE)
    x0, noise, _ = _example(3)
    ones = torch.ones(len(x0), dtype=torch.float64)
    torch.testing.assert_close(objective.corrupt(x0, noise, 0 * ones), x0)
    torch.testing.assert_close(objective.corrupt(x0, noise, ones), noise)
    t, step = torch.full((len(x0),), 0.3, dtype=torch.float64), 1e-6
    velocity = (objective.corrupt(x0, noise, t + step) - objective.corrupt(x0, noise, t)) / step
    torch.testing.assert_close(objective.target(x0, noise, t), velocity, rtol=1e-5, atol=1e-5)
    # The oracle velocity gives the true x_0 through the denoiser, at any level.
    x_t = objective.corrupt(x0, noise, t)
    denoiser = objective.denoiser(lambda x, time: noise - x0)
    sigma = t / (1 - t)
    torch.testing.assert_close(denoiser(x_t * (1 + sigma.view(-1, 1, 1, 1)), sigma), x0)


@pytest.mark.parametrize("density", ["uniform", "logit-normal"])
def test_flow_time_densities(density: str) -> None:
    objective = FlowObjective(ObjectiveConfig(kind="flow", time_density=density))  # type: ignore[arg-type]
    t, weight = objective.draw(_batch(torch.zeros(20_000, 1, 1, 1)))
    assert t.shape == (20_000,) and torch.equal(weight, torch.ones(20_000))
    assert 0 < float(t.min()) and float(t.max()) < 1
    assert abs(float(t.median()) - 0.5) < 0.02
    spread = float(((t > 0.25) & (t < 0.75)).float().mean())
    assert abs(spread - (0.5 if density == "uniform" else 0.728)) < 0.02  # 2 Phi(logit 0.75) - 1
    assert torch.equal(objective.network_time(t), 1000 * t)


def test_training_a_tiny_flow_model_lowers_its_loss(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    patterns = torch.randn(4, 2, 8, 8, generator=g)
    x = patterns[torch.arange(32) % 4] + 0.1 * torch.randn(32, 2, 8, 8, generator=g)
    data = (x / x.std(),)
    loss_fn = diffusion_loss(make_objective(FLOW, SCHEDULE))
    config = TrainConfig(steps=24, batch_size=8, lr=1e-2, lr_decay="constant",
                         checkpoint_every=100, validate_every=4)
    model = init_model(UNet, TINY_UNET, 0)
    result = fit(model, loss_fn, data, data, config, state_dir=tmp_path, kind="unet",
                 key=StageKey.of(model=TINY_UNET, train=config, objective=FLOW),
                 model_config=TINY_UNET, device=torch.device("cpu"), progress=False)
    history = result.history
    assert history[0]["train_loss"] == pytest.approx(2.0, rel=0.3)  # E|noise - x_0|^2 at init
    assert history[-1]["train_loss"] < 0.9 * history[0]["train_loss"]
    assert history[-1]["val_loss"] < 0.85 * history[0]["train_loss"]


def test_bad_flow_values() -> None:
    with pytest.raises(UsageError, match="kind"):
        ObjectiveConfig(kind="edm")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="logit_std"):
        dataclasses.replace(FLOW, logit_std=0.0)
    with pytest.raises(UsageError, match="time_density"):
        dataclasses.replace(FLOW, time_density="cosine")  # type: ignore[arg-type]
