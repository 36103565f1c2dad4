"""Every registered sampler against known answers: the one-point and the Gaussian data set, whose
exact denoisers are known; the post's eq. (6) walk; determinism; model calls; the name table."""

from __future__ import annotations

import math

import pytest
import torch

from latentdiffusion.diffusion import SAMPLERS, NoiseSchedule, VPDenoiser, parse_sampler, sample
from latentdiffusion.diffusion.denoiser import (
    FlowDenoiser,
    karras_sigmas,
    noise_levels,
    timesteps,
)
from latentdiffusion.diffusion.samplers import dpmpp_2m_sample, heun_sample
from latentdiffusion.diffusion.schedule import ScheduleConfig
from latentdiffusion.errors import UsageError
from latentdiffusion.models import UNet
from latentdiffusion.models.unet import UNetConfig
from latentdiffusion.rng import generator
from latentdiffusion.run.training import init_model

SCHEDULE = NoiseSchedule.from_config(ScheduleConfig())  # linear, T = 1000
COSINE = NoiseSchedule.from_config(ScheduleConfig(kind="cosine", num_timesteps=100))
X0 = torch.tensor([1.5, -0.5, 0.25, -2.0], dtype=torch.float64).view(1, 1, 2, 2)
NAMES = list(SAMPLERS)


def oracle(x0: torch.Tensor, schedule: NoiseSchedule = SCHEDULE, spread: float = 0.0):
    """The exact noise predictor (x_t, t) -> noise for data N(x0, spread^2 I): one point at 0.

    With sigma^2 = (1 - a) / a, E[x_0 | x] = x0 + spread^2 / (spread^2 + sigma^2) (x - x0) in VE
    units x = x_t / sqrt(a); the noise is (x - E[x_0 | x]) / sigma.
    """

    def predict(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t_floor = t.floor().long()  # fractional t: interpolate alpha_bar in log sigma
        sigmas = ((1 - schedule.alphas_cumprod) / schedule.alphas_cumprod).sqrt()
        low, high = sigmas[t_floor], sigmas[(t_floor + 1).clamp(max=len(sigmas) - 1)]
        fraction = (t.double() - t_floor).view(-1)
        sigma = (low.log() * (1 - fraction) + high.log() * fraction).exp().view(-1, 1, 1, 1)
        x = x_t * (1 + sigma.square()).sqrt()
        denoised = x0 + spread**2 / (spread**2 + sigma.square()) * (x - x0)
        return ((x - denoised) / sigma).to(x_t.dtype)

    return predict


def _noise(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 1, 2, 2, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("num_steps", [1, 2, 10])
@pytest.mark.parametrize("schedule", [SCHEDULE, COSINE], ids=["linear", "cosine"])
def test_every_sampler_recovers_the_single_point(name: str, num_steps: int,
                                                 schedule: NoiseSchedule) -> None:
    denoiser = VPDenoiser(oracle(X0, schedule), schedule, "noise")
    x0 = sample(denoiser, _noise(3), f"{name}-{num_steps}",
                generator=torch.Generator().manual_seed(1))
    assert torch.allclose(x0, X0.expand(3, -1, -1, -1), atol=1e-6)


def test_v_prediction_denoiser_recovers_the_single_point() -> None:
    def v_oracle(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        noise = oracle(X0)(x_t, t)
        alpha_bar = SCHEDULE.alphas_cumprod[t.round().long()].view(-1, 1, 1, 1)
        return alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * X0  # v, on the grid

    x0 = sample(VPDenoiser(v_oracle, SCHEDULE, "v"), _noise(2), "ddim-20")
    assert torch.allclose(x0, X0.expand(2, -1, -1, -1), atol=1e-6)


def test_the_denoiser_asks_the_network_for_grid_timesteps_exactly() -> None:
    seen: list[float] = []

    def spy(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.extend(t.unique().tolist())
        return oracle(X0)(x_t, t)

    sample(VPDenoiser(spy, SCHEDULE, "noise"), _noise(1), "ddim-4")
    assert seen == [999.0, 666.0, 333.0, 0.0]


def _gaussian_error(name: str, num_steps: int) -> float:
    """Distance to the exact ODE solution for Gaussian data N(X0, 0.5^2): along the flow,
    x - X0 scales with sqrt(0.5^2 + sigma^2), so x_0 = X0 + (x - X0) 0.5 / sqrt(0.25 + s^2)."""
    denoiser = VPDenoiser(oracle(X0, SCHEDULE, spread=0.5), SCHEDULE, "noise")
    # The solver's order on one fixed range (the default bottom rises for few steps)
    sigmas = noise_levels(denoiser, SAMPLERS[name].spacing, num_steps, denoiser.sigma_min)
    x = denoiser.prior(_noise(4), float(sigmas[0]))
    exact = X0 + (x - X0) * 0.5 / math.sqrt(0.25 + float(sigmas[0]) ** 2)
    return float((SAMPLERS[name].function(denoiser, x, sigmas) - exact).abs().max())


def test_higher_order_solvers_converge_faster_on_gaussian_data() -> None:
    euler = [_gaussian_error("euler", k) for k in (10, 20, 40)]
    heun = [_gaussian_error("heun", k) for k in (10, 20, 40)]
    dpmpp = [_gaussian_error("dpmpp-2m", k) for k in (10, 20, 40)]
    assert euler[0] > euler[1] > euler[2] > 0
    assert 1.5 < euler[0] / euler[1] < 2.5 and 1.5 < euler[1] / euler[2] < 2.5  # first order
    assert heun[0] / heun[1] > 3.5 and heun[1] / heun[2] > 3.5  # second order
    assert dpmpp[1] / dpmpp[2] > 3.5
    assert dpmpp[1] < euler[1] / 5  # at the same 20 model calls
    assert _gaussian_error("ddim", 40) < 1.5 * euler[2]  # ddim is Euler too, on the t grid


def _paper_walk(network, schedule: NoiseSchedule, x_T: torch.Tensor, num_steps: int, eta: float,
                ddpm: bool, generator_: torch.Generator) -> torch.Tensor:
    """The VP updates written out from the papers, on the respaced timesteps: DDPM eq. (6) with
    sigma^2 = beta_tilde, DDIM eq. (12) with eq. (16)'s sigma."""
    alphas_cumprod = schedule.alphas_cumprod.tolist()
    steps = timesteps(schedule.num_timesteps, num_steps)
    x_t = x_T
    for i, t in enumerate(steps):
        a_t = alphas_cumprod[t]
        a_s = alphas_cumprod[steps[i + 1]] if i + 1 < len(steps) else 1.0
        noise = network(x_t, torch.full((len(x_t),), float(t)))
        if ddpm:
            beta = 1 - a_t / a_s
            x_t = (x_t - beta / (1 - a_t) ** 0.5 * noise) / (1 - beta) ** 0.5
            sigma = ((1 - a_s) / (1 - a_t) * beta) ** 0.5
        else:
            x0 = (x_t - (1 - a_t) ** 0.5 * noise) / a_t**0.5
            sigma = eta * ((1 - a_s) / (1 - a_t) * (1 - a_t / a_s)) ** 0.5
            x_t = a_s**0.5 * x0 + (1 - a_s - sigma**2) ** 0.5 * noise
        if a_s < 1.0 and sigma > 0:
            x_t = x_t + sigma * torch.randn(x_t.shape, generator=generator_).to(x_t)
    return x_t


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


@pytest.mark.parametrize(("spec", "eta", "ddpm"),
                         [("ddpm-7", 1.0, True), ("ddpm", 1.0, True), ("ddim-5", 0.0, False),
                          ("ddim-5", 0.5, False)])
def test_ddpm_and_ddim_follow_the_papers_updates(spec: str, eta: float, ddpm: bool) -> None:
    model, x_T = _model(), _x_T([0, 1])
    with torch.no_grad():
        ours = sample(VPDenoiser(model, SMALL, "noise"), x_T, spec, eta=eta,
                      generator=torch.Generator().manual_seed(3))
        steps = parse_sampler(spec)[1]
        paper = _paper_walk(model, SMALL, x_T, steps or 20, eta, ddpm,
                            torch.Generator().manual_seed(3))
    assert torch.allclose(ours, paper, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_samplers_are_deterministic_under_a_generator(name: str) -> None:
    denoiser, x_T = VPDenoiser(_model(), SMALL, "noise"), _x_T([0, 1])

    def run(seed: int) -> torch.Tensor:
        return sample(denoiser, x_T, f"{name}-5", eta=1.0,
                      generator=torch.Generator().manual_seed(seed))

    a, b, c = run(0), run(0), run(1)
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)
    stochastic = name in ("ddpm", "ddim", "dpmpp-2m-sde")  # ddim with the eta = 1 given
    assert ((a - c).abs().max() > 1e-3) == stochastic


def test_ddpm_variance_choice_matters() -> None:
    denoiser, x_T = VPDenoiser(_model(), SMALL, "noise"), _x_T([0])
    a = sample(denoiser, x_T, "ddpm", variance="beta_tilde",
               generator=torch.Generator().manual_seed(0))
    b = sample(denoiser, x_T, "ddpm", variance="beta", generator=torch.Generator().manual_seed(0))
    assert (a - b).abs().max() > 1e-4


@pytest.mark.parametrize("name", ["ddpm", "dpmpp-2m-sde"])
def test_generator_list_makes_rows_independent_of_the_batch(name: str) -> None:
    denoiser = VPDenoiser(_model(), SMALL, "noise")

    def run(seeds: list[int]) -> torch.Tensor:
        return sample(denoiser, _x_T(seeds), f"{name}-10",
                      generator=[generator(7, s) for s in seeds])

    four, two, reordered = run([0, 1, 2, 3]), run([0, 1]), run([3, 1])
    assert torch.allclose(four[:2], two, atol=1e-6)
    assert torch.allclose(four[[3, 1]], reordered, atol=1e-6)
    assert (four[0] - four[1]).abs().max() > 1e-3  # different generators, different rows
    with pytest.raises(ValueError):
        sample(denoiser, _x_T([0, 1]), f"{name}-10", generator=[generator(7, 0)])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("num_steps", [1, 4, 9])
def test_model_calls_match_the_table(name: str, num_steps: int) -> None:
    calls = 0
    inner = VPDenoiser(oracle(X0), SCHEDULE, "noise")

    def counting(x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return inner(x, sigma)

    sigmas = noise_levels(inner, SAMPLERS[name].spacing, num_steps)
    SAMPLERS[name].function(counting, inner.prior(_noise(1), float(sigmas[0])), sigmas)
    assert calls == SAMPLERS[name].model_calls(num_steps)
    assert SAMPLERS[name].model_calls(SAMPLERS[name].steps_for(calls)) == calls


def test_heun_steps_for_a_budget() -> None:
    heun = SAMPLERS["heun"]
    assert [heun.steps_for(n) for n in (5, 10, 19, 20, 50)] == [3, 5, 10, 10, 25]
    assert [SAMPLERS["euler"].steps_for(n) for n in (5, 10)] == [5, 10]


def test_karras_levels_follow_edm() -> None:
    sigmas = karras_sigmas(5, 0.002, 80.0)
    assert sigmas[0] == pytest.approx(80.0) and sigmas[-1] == pytest.approx(0.002)
    ramp = (sigmas ** (1 / 7)).diff()
    assert torch.allclose(ramp, ramp[0].expand(4))  # equal steps in sigma^(1/rho)
    denoiser = VPDenoiser(oracle(X0), SCHEDULE, "noise")
    levels = noise_levels(denoiser, "logsnr", 6)
    assert levels[-1] == 0 and levels[0] == pytest.approx(denoiser.sigma_max)
    assert torch.allclose(levels[:-1].log().diff(), levels[:-1].log().diff()[0].expand(5))


def test_karras_and_logsnr_ladders_stop_at_sigma_80() -> None:
    """Levels above EDM's sigma_max = 80 only spend steps on noise (README, samplers)."""
    cosine = VPDenoiser(oracle(X0, COSINE), COSINE, "noise")
    assert float(cosine.sigmas[-1]) > 1000 and cosine.sigma_max == 80.0
    for spacing in ("karras", "logsnr"):
        levels = noise_levels(cosine, spacing, 50)  # type: ignore[arg-type]
        assert levels[0] == pytest.approx(80.0) and levels[-2] == pytest.approx(cosine.sigma_min)
    assert noise_levels(cosine, "timesteps", 10)[0] == cosine.sigmas[-1]  # the grid is whole
    linear = VPDenoiser(oracle(X0), SCHEDULE, "noise")  # its top level, 157, is also capped
    assert linear.sigma_max == 80.0


@pytest.mark.parametrize("spacing", ["karras", "logsnr"])
def test_few_step_ladders_end_higher(spacing: str) -> None:
    """The bottom of a K-step ladder is min(0.1, 10 / K^2), never below the model's own
    smallest level: few steps are not spent below the decoder's resolution (README, samplers)."""
    schedule = NoiseSchedule.from_config(ScheduleConfig(kind="cosine"))
    cosine = VPDenoiser(oracle(X0, schedule), schedule, "noise")  # its smallest level: 0.0064
    flow = FlowDenoiser(oracle(X0))  # 0.002
    for denoiser, bottoms in ((cosine, {5: 0.1, 10: 0.1, 20: 0.025, 50: cosine.sigma_min}),
                              (flow, {10: 0.1, 20: 0.025, 50: 0.004, 100: 0.002})):
        for num_steps, bottom in bottoms.items():
            levels = noise_levels(denoiser, spacing, num_steps)  # type: ignore[arg-type]
            assert len(levels) == num_steps + 1 and levels[-1] == 0
            assert levels[-2] == pytest.approx(bottom) and levels[0] == pytest.approx(80.0)
            assert (levels.diff() < 0).all()


def test_parse_sampler() -> None:
    assert parse_sampler("ddim-50") == ("ddim", 50)
    assert parse_sampler("ddpm") == ("ddpm", None)  # every timestep
    assert parse_sampler("dpmpp-2m") == ("dpmpp-2m", SAMPLERS["dpmpp-2m"].default_steps)
    assert parse_sampler("dpmpp-2m-sde-12") == ("dpmpp-2m-sde", 12)
    for bad in ("ddim-\u00b2", "ddim-0", "nope", "ddim-x", "dpmpp-", ""):
        with pytest.raises(UsageError):
            parse_sampler(bad)


def test_eta_outside_the_unit_interval_is_refused() -> None:
    denoiser = VPDenoiser(oracle(X0), SCHEDULE, "noise")
    for eta in (2.0, -1.0):
        with pytest.raises(UsageError, match="eta"):
            sample(denoiser, _noise(1), "ddim-5", eta=eta)


def test_heun_and_dpmpp_ignore_the_generator() -> None:
    denoiser, x_T = VPDenoiser(_model(), SMALL, "noise"), _x_T([0])
    for function in (heun_sample, dpmpp_2m_sample):
        sigmas = noise_levels(denoiser, "karras", 4)
        x = denoiser.prior(x_T, float(sigmas[0]))
        a = function(denoiser, x, sigmas, generator=torch.Generator().manual_seed(0))
        b = function(denoiser, x, sigmas, generator=torch.Generator().manual_seed(1))
        assert torch.equal(a, b)


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


def flow_oracle(x0: torch.Tensor):
    """The exact velocity (x_t, 1000 t) -> noise - x_0 of the straight path for one point x0."""

    def predict(x_t: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        t = (time.double() / 1000).view(-1, 1, 1, 1)
        return ((x_t - x0) / t).to(x_t.dtype)  # noise = (x_t - (1 - t) x0) / t

    return predict


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("num_steps", [1, 3, 10])
def test_every_sampler_recovers_the_single_point_on_the_straight_path(name: str,
                                                                      num_steps: int) -> None:
    x0 = sample(FlowDenoiser(flow_oracle(X0)), _noise(3), f"{name}-{num_steps}",
                generator=torch.Generator().manual_seed(1))
    assert torch.allclose(x0, X0.expand(3, -1, -1, -1), atol=1e-6)


def test_ddim_on_a_flow_model_is_iadb() -> None:
    """Heitz et al. 2023, Alg. 2: x_alpha = (1 - alpha) noise + alpha x_0, the network gives
    D = x_0 - noise at (x_alpha, alpha), and x <- x + (alpha_{k+1} - alpha_k) D with
    alpha_k = k / K. Our flow network predicts v = noise - x_0 = -D at t = 1 - alpha."""
    weight = torch.randn(1, 1, 2, 2, generator=torch.Generator().manual_seed(5),
                         dtype=torch.float64)

    def velocity(x_t: torch.Tensor, time: torch.Tensor) -> torch.Tensor:  # any smooth network
        return torch.tanh(weight * x_t) + (time.double() / 1000).view(-1, 1, 1, 1) * x_t / 2

    noise, num_steps = _noise(4), 12
    x = noise.clone()
    for k in range(num_steps):
        alpha, alpha_next = k / num_steps, (k + 1) / num_steps
        t = torch.full((len(x),), 1000 * (1 - alpha), dtype=torch.float64)
        x = x + (alpha_next - alpha) * -velocity(x, t)
    ours = sample(FlowDenoiser(velocity), noise, f"ddim-{num_steps}")
    assert torch.allclose(ours, x, rtol=1e-6, atol=1e-9)  # the network sees float32 time
    assert (ours - noise).abs().max() > 0.1
    sigmas = FlowDenoiser(velocity).timestep_sigmas(4)
    assert torch.isinf(sigmas[0]) and torch.allclose(sigmas[1:], torch.tensor([3.0, 1.0, 1 / 3],
                                                                               dtype=torch.float64))


def test_priors_have_the_spread_of_the_noisy_data() -> None:
    """At level sigma, x = x_0 + sigma noise of unit-variance data has std sqrt(1 + sigma^2);
    each denoiser's prior, started from unit noise, must match it (the flow prior's old
    x = noise (1 + sigma) was 1.2% off at sigma = 80)."""
    noise = torch.randn(200_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for denoiser in (VPDenoiser(oracle(X0), SCHEDULE, "noise"), FlowDenoiser(flow_oracle(X0))):
        for sigma in (0.5, 5.0, 80.0):
            spread = float(denoiser.prior(noise, sigma).std())
            expected = (1 + sigma**2) ** 0.5
            assert abs(spread / expected - 1) < 0.01, (type(denoiser).__name__, sigma)
    assert torch.equal(FlowDenoiser(flow_oracle(X0)).prior(noise, math.inf), noise)


def gaussian_flow_oracle(x0: torch.Tensor, spread: float):
    """The exact velocity (x_t, 1000 t) -> E[noise - x_0 | x_t] for data N(x0, spread^2 I)."""

    def predict(x_t: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        t = (time.double() / 1000).view(-1, 1, 1, 1)
        sigma, x = t / (1 - t), x_t / (1 - t)  # VE units
        denoised = x0 + spread**2 / (spread**2 + sigma.square()) * (x - x0)
        return ((x_t - denoised) / t).to(x_t.dtype)  # x_0 = x_t - t v

    return predict


@pytest.mark.parametrize("name", [n for n in NAMES if SAMPLERS[n].spacing != "timesteps"
                                  and not SAMPLERS[n].stochastic])
@pytest.mark.parametrize("kind", ["vp", "flow"])
def test_ladders_start_from_the_data_mean(name: str, kind: str) -> None:
    """Data N(X0, 0.5^2 I): D(X0, sigma) = X0 at every level, so the ODE holds x = E[x_0]
    still, and a ladder started from zero noise at the data mean ends on it exactly. Started
    from 0, as before, it ends short: the exact ODE gives X0 (1 - 0.5 / sqrt(0.25 + 80^2))."""

    def make(mean: torch.Tensor | None) -> VPDenoiser | FlowDenoiser:
        if kind == "vp":
            return VPDenoiser(oracle(X0, spread=0.5), SCHEDULE, "noise", data_mean=mean)
        return FlowDenoiser(gaussian_flow_oracle(X0, 0.5), data_mean=mean)

    zero = torch.zeros_like(X0)  # (1, 1, 2, 2) unit noise of 0
    assert torch.allclose(sample(make(X0[0]), zero, f"{name}-10"), X0, atol=1e-9)
    short = (X0 - sample(make(None), zero, f"{name}-10")) / X0  # 10 steps: within 2x of it
    exact = 0.5 / (0.25 + 80**2) ** 0.5
    assert (short > exact / 2).all() and (short < 2 * exact).all(), short


def test_the_flow_denoiser_at_pure_noise_is_the_data_mean() -> None:
    """At t = 1 (sigma = inf) x_t is pure noise, so E[x_0 | x_t] = E[x_0]: the data mean, not
    the network's guess (here X0), for the rows at that level; labelled rows keep the network's
    (their E[x_0 | y] is their class's mean)."""
    mean, noise = torch.full((1, 2, 2), 0.3, dtype=torch.float64), _noise(3)
    known = FlowDenoiser(flow_oracle(X0), data_mean=mean)
    assert torch.equal(known(noise, math.inf), mean.expand_as(noise))
    rows = known(noise, torch.tensor([math.inf, 2.0, math.inf], dtype=torch.float64))
    assert torch.equal(rows[[0, 2]], mean.expand(2, -1, -1, -1))
    assert torch.allclose(rows[1], X0[0])
    for network_guess in (FlowDenoiser(flow_oracle(X0)),
                          FlowDenoiser(flow_oracle(X0), data_mean=mean, mean_at_noise=False)):
        assert torch.allclose(network_guess(noise, math.inf), X0.expand_as(noise))


def test_timestep_samplers_start_where_they_did() -> None:
    """At the VP model's own top level, where ddpm and ddim begin, the prior leaves the data
    mean out (5e-5 of x there), so their images are those of models without a stored mean."""
    noise, mean = _noise(2), torch.full((1, 2, 2), 3.0, dtype=torch.float64)
    with_mean = VPDenoiser(oracle(X0), SCHEDULE, "noise", data_mean=mean)
    top = float(with_mean.timestep_sigmas(None)[0])
    assert torch.equal(with_mean.prior(noise, top), noise * (1 + top**2) ** 0.5)
    assert torch.equal(with_mean.prior(noise, 80.0), noise * (1 + 80.0**2) ** 0.5 + mean)
