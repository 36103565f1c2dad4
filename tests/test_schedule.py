"""Variance schedules and the forward process q(x_t | x_0)."""

from __future__ import annotations

import math

import pytest
import torch

from latentdiffusion.diffusion import NoiseSchedule
from latentdiffusion.diffusion.schedule import ScheduleConfig, cosine_betas


def _schedule(kind: str, num_timesteps: int = 1000) -> NoiseSchedule:
    return NoiseSchedule.from_config(ScheduleConfig(kind=kind, num_timesteps=num_timesteps))


def test_linear_betas_match_the_post() -> None:
    schedule = _schedule("linear")
    betas = schedule.betas
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    assert betas[0].item() == pytest.approx(1e-4, rel=1e-12)
    assert betas[-1].item() == pytest.approx(2e-2, rel=1e-12)
    steps = betas.diff()
    assert torch.allclose(steps, torch.full_like(steps, (2e-2 - 1e-4) / 999), rtol=1e-9)
    # index t is step t + 1 of the paper: alpha_bar_0 = 1 - beta_1, not 1.
    assert schedule.alphas_cumprod[0].item() == pytest.approx(1 - 1e-4, rel=1e-12)
    expected = torch.cumprod(1 - betas, 0)
    assert torch.equal(schedule.alphas_cumprod, expected)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_alphas_cumprod_strictly_decreasing_in_unit_interval(kind: str) -> None:
    alphas_cumprod = _schedule(kind).alphas_cumprod
    assert (alphas_cumprod > 0).all() and (alphas_cumprod < 1).all()
    assert (alphas_cumprod.diff() < 0).all()


def test_linear_schedule_ends_almost_pure_noise() -> None:
    alphas_cumprod = _schedule("linear").alphas_cumprod
    assert alphas_cumprod[-1].item() < 1e-4  # ~4e-5 for the post's schedule


def test_cosine_matches_closed_form() -> None:
    """alpha_bar(t) = f(t) / f(0), f(t) = cos^2((t/T + s) / (1 + s) * pi / 2), t = 1..T."""
    T, s = 1000, 0.008
    schedule = NoiseSchedule(cosine_betas(T, s))

    def f(t: int) -> float:
        return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2

    raw_betas = [1 - f(t) / f(t - 1) for t in range(1, T + 1)]
    unclipped = [t for t in range(T) if raw_betas[t] < 0.999]
    first_clipped = next((t for t in range(T) if raw_betas[t] >= 0.999), T)
    assert first_clipped > 990  # only the very last levels hit the clip
    alphas_cumprod = schedule.alphas_cumprod
    for t in unclipped:
        if t >= first_clipped:
            break
        assert alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9, abs=1e-12)
    assert schedule.betas.max().item() <= 0.999
    # The paper's form (t / T, not t / (T + 1)): nothing of the signal is left at the end.
    assert alphas_cumprod[-2].item() < 1e-4
    # Spot values against the closed form at t = 1 and at the middle.
    assert alphas_cumprod[0].item() == pytest.approx(f(1) / f(0), rel=1e-12)
    assert alphas_cumprod[499].item() == pytest.approx(f(500) / f(0), rel=1e-9)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_posterior_variance(kind: str) -> None:
    schedule = _schedule(kind)
    ab = schedule.alphas_cumprod
    beta = schedule.betas
    variance = schedule.posterior_variance
    assert variance[0].item() == 0.0
    for t in (1, 2, 10, 500, 999):
        expected = (1 - ab[t - 1]) / (1 - ab[t]) * beta[t]
        assert variance[t].item() == pytest.approx(expected.item(), rel=1e-12)
    assert (variance[1:] > 0).all() and (variance <= beta + 1e-15).all()
    assert torch.equal(schedule.alphas_cumprod_prev[1:], ab[:-1])
    assert schedule.alphas_cumprod_prev[0].item() == 1.0


def test_add_noise_formula_and_per_sample_t() -> None:
    schedule = _schedule("linear")
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 2, 3, 3, generator=g)
    noise = torch.randn(4, 2, 3, 3, generator=g)
    t = torch.tensor([0, 1, 500, 999])
    x_t = schedule.add_noise(x0, noise, t)
    assert x_t.dtype == torch.float32 and x_t.shape == x0.shape
    for i, step in enumerate(t.tolist()):
        ab = schedule.alphas_cumprod[step].item()
        expected = math.sqrt(ab) * x0[i] + math.sqrt(1 - ab) * noise[i]
        assert torch.allclose(x_t[i], expected, atol=1e-6), step


def test_add_noise_at_t0_is_almost_x0() -> None:
    schedule = _schedule("linear")
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(8, 1, 4, 4, generator=g)
    noise = torch.randn(8, 1, 4, 4, generator=g)
    x_t = schedule.add_noise(x0, noise, torch.zeros(8, dtype=torch.long))
    ab0 = schedule.alphas_cumprod[0].item()
    bound = (math.sqrt(1 - ab0) * noise.abs() + (1 - math.sqrt(ab0)) * x0.abs()) + 1e-5
    assert ((x_t - x0).abs() <= bound).all()
    assert (x_t - x0).abs().max().item() < 0.05  # sqrt(1 - ab_0) = 0.01
    assert not torch.equal(x_t, x0)  # t = 0 already carries a little noise
