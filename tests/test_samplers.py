"""DDPM and DDIM against an analytic noise predictor, determinism and per-sample generators."""

from __future__ import annotations

import pytest
import torch

from latentdiffusion.config import ScheduleConfig, UNetConfig
from latentdiffusion.diffusion import NoiseSchedule, ddim_sample, ddpm_sample, sample
from latentdiffusion.diffusion.samplers import timesteps
from latentdiffusion.models import UNet
from latentdiffusion.rng import generator
from latentdiffusion.training import init_model

SCHEDULE = NoiseSchedule.from_config(ScheduleConfig())  # linear, T = 1000
X0 = torch.tensor([1.5, -0.5, 0.25, -2.0], dtype=torch.float64).view(1, 1, 2, 2)


def oracle(x0: torch.Tensor, schedule: NoiseSchedule = SCHEDULE):
    """The exact noise predictor for a data set of one point x0."""

    def predict(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = schedule.alphas_cumprod[t].to(x_t.dtype).view(-1, 1, 1, 1)
        return (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()

    return predict


def _noise(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 1, 2, 2, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


@pytest.mark.parametrize("num_steps", [1, 2, 10, 1000])
def test_ddim_eta0_recovers_the_single_point(num_steps: int) -> None:
    x0 = ddim_sample(oracle(X0), SCHEDULE, _noise(3), num_steps=num_steps, eta=0.0)
    assert torch.allclose(x0, X0.expand(3, -1, -1, -1), atol=1e-6)


@pytest.mark.parametrize("num_steps", [None, 10])
@pytest.mark.parametrize("variance", ["beta_tilde", "beta"])
def test_ddpm_ends_at_the_single_point(num_steps: int | None, variance: str) -> None:
    x0 = ddpm_sample(oracle(X0), SCHEDULE, _noise(3), num_steps=num_steps, variance=variance,
                     generator=torch.Generator().manual_seed(1))
    assert torch.allclose(x0, X0.expand(3, -1, -1, -1), atol=1e-6)


def test_ddim_eta1_with_oracle_also_recovers() -> None:
    x0 = ddim_sample(oracle(X0), SCHEDULE, _noise(2), num_steps=20, eta=1.0,
                     generator=torch.Generator().manual_seed(0))
    assert torch.allclose(x0, X0.expand(2, -1, -1, -1), atol=1e-6)


def test_cosine_schedule_with_oracle() -> None:
    schedule = NoiseSchedule.from_config(ScheduleConfig(kind="cosine", num_timesteps=100))
    x0 = ddim_sample(oracle(X0, schedule), schedule, _noise(2), num_steps=10)
    assert torch.allclose(x0, X0.expand(2, -1, -1, -1), atol=1e-6)


def test_ddim_one_step_queries_the_noisiest_level() -> None:
    seen: list[int] = []

    def spy(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.extend(t.unique().tolist())
        return oracle(X0)(x_t, t)

    ddim_sample(spy, SCHEDULE, _noise(1), num_steps=1)
    assert seen == [999]


def _model() -> UNet:
    config = UNetConfig(in_channels=1, latent_size=4, channels=(4, 8), time_dim=8, groups=4)
    model = init_model(UNet, config, seed=0).eval()
    final = model.out[-1]
    with torch.no_grad():  # leave the zero predictor so that samples depend on the model
        final.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    return model


SMALL = NoiseSchedule.from_config(ScheduleConfig(num_timesteps=20))


def _x_T(seeds: list[int]) -> torch.Tensor:
    return torch.stack([torch.randn(1, 4, 4, generator=generator(7, s)) for s in seeds])


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_samplers_are_deterministic_under_a_generator(sampler: str) -> None:
    model, x_T = _model(), _x_T([0, 1])
    kwargs = dict(eta=1.0)

    def run(seed: int) -> torch.Tensor:
        return sample(model, SMALL, x_T, sampler, None, generator=torch.Generator().manual_seed(
            seed), **kwargs)

    a, b, c = run(0), run(0), run(1)
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3


def test_ddim_eta0_ignores_the_generator() -> None:
    model, x_T = _model(), _x_T([0, 1])
    a = ddim_sample(model, SMALL, x_T, num_steps=5, generator=torch.Generator().manual_seed(0))
    b = ddim_sample(model, SMALL, x_T, num_steps=5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_ddpm_variance_choice_matters() -> None:
    model, x_T = _model(), _x_T([0])
    a = ddpm_sample(model, SMALL, x_T, variance="beta_tilde",
                    generator=torch.Generator().manual_seed(0))
    b = ddpm_sample(model, SMALL, x_T, variance="beta",
                    generator=torch.Generator().manual_seed(0))
    assert (a - b).abs().max() > 1e-4


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_generator_list_makes_rows_independent_of_the_batch(sampler: str) -> None:
    model = _model()

    def run(seeds: list[int]) -> torch.Tensor:
        return sample(model, SMALL, _x_T(seeds), sampler, 10, eta=1.0,
                      generator=[generator(7, s) for s in seeds])

    four, two, reordered = run([0, 1, 2, 3]), run([0, 1]), run([3, 1])
    assert torch.allclose(four[:2], two, atol=1e-6)
    assert torch.allclose(four[[3, 1]], reordered, atol=1e-6)
    assert (four[0] - four[1]).abs().max() > 1e-3  # different generators, different rows
    with pytest.raises(ValueError):
        sample(model, SMALL, _x_T([0, 1]), sampler, 10, eta=1.0, generator=[generator(7, 0)])


@pytest.mark.parametrize("num_steps", [1, 2, 3, 10, 50, 250, 999])
def test_timesteps_properties(num_steps: int) -> None:
    steps = timesteps(1000, num_steps)
    assert len(steps) == num_steps
    assert steps[0] == 999 and steps[-1] == (0 if num_steps > 1 else 999)
    assert all(a > b for a, b in zip(steps, steps[1:], strict=False))
    assert all(isinstance(s, int) and 0 <= s < 1000 for s in steps)


def test_timesteps_all_and_invalid() -> None:
    assert timesteps(1000, None) == list(range(999, -1, -1))
    assert timesteps(1000, 1000) == timesteps(1000, 5000) == list(range(999, -1, -1))
    assert timesteps(10, 4) == [9, 6, 3, 0]
    with pytest.raises(ValueError):
        timesteps(1000, 0)
