"""Our samplers against diffusers' implementations of the same methods, in float64.

On a small analytic model, the exact noise predictor of Gaussian data N(mu, 0.5^2 I) (defined for
any real t), each sampler and the diffusers scheduler of the same method start from the same
state and walk the same noise levels with the same injected noise. Every network call (its t and
its input x_t, in the network's VP units) and the final x_0 agree to 1e-6 relative (in fact to
~1e-12):
- ddim, eta 0, 0.5, 1        ~ DDIMScheduler, "leading" spacing, set_alpha_to_one
- ddpm, beta_tilde / beta    ~ DDPMScheduler, fixed_small / fixed_large, on our timesteps
- dpmpp-2m / dpmpp-2m-sde    ~ DPMSolverMultistepScheduler, (sde-)dpmsolver++, order 2, midpoint,
                               final sigma 0 (the last step is first order, as ours)
- euler / heun               ~ EulerDiscreteScheduler / HeunDiscreteScheduler on Karras levels
diffusers keeps its tables in float32: they are replaced by our float64 alphas_cumprod before
set_timesteps and by float64 sigmas after (checked first to equal its float32 ones), and while
it walks its module sees torch.float32 as float64: the Euler and DPM-Solver `step` casts the
sample to float32, which alone costs up to 1e-4 relative. Its noise (`randn_tensor`) is replaced
by the draws of a twin of our generator.
diffusers starts Euler and Heun from init_noise_sigma = sigma_max, not sqrt(1 + sigma_max^2), so
the walks are compared from the same given state, not from its prior.
Separately, the ladders: timesteps(T, K) against the "linspace" spacing (they differ only where
i (T - 1) / (K - 1) is an exact tie at .5, a known discrepancy), karras_sigmas against
_convert_to_karras, logsnr_sigmas against _convert_to_lu (evenly spaced log sigma).
diffusers is a dev dependency for these tests only; the package does not import it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from fractions import Fraction
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
)
from diffusers.schedulers import scheduling_ddim, scheduling_ddpm, scheduling_dpmsolver_multistep

from latentdiffusion.diffusion import NoiseSchedule, VPDenoiser, sample
from latentdiffusion.diffusion.denoiser import logsnr_sigmas, noise_levels, timesteps
from latentdiffusion.diffusion.samplers import (
    SAMPLERS,
    ddim_sample,
    dpmpp_2m_sample,
    dpmpp_2m_sde_sample,
    heun_sample,
)
from latentdiffusion.diffusion.schedule import ScheduleConfig
from latentdiffusion.rng import randn

pytestmark = pytest.mark.filterwarnings(  # numpy 2 about torch's Tensor.__array__, in diffusers
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")

RTOL, ATOL = 1e-6, 1e-9  # relative, and a floor for entries near 0 (the data are of order 1)
SPREAD = 0.5
LINEAR = NoiseSchedule.from_config(ScheduleConfig())  # the post's: linear, T = 1000
COSINE = NoiseSchedule.from_config(ScheduleConfig(kind="cosine", num_timesteps=100))
SCHEDULES = pytest.mark.parametrize("schedule", [LINEAR, COSINE], ids=["linear", "cosine"])
MU = torch.linspace(-1.5, 2.0, 18, dtype=torch.float64).view(1, 2, 3, 3)


class GaussianNoise:
    """The exact noise predictor (x_t, t) -> noise for data N(MU, SPREAD^2 I), for real t.

    t maps to sigma = sqrt((1 - alpha_bar) / alpha_bar) linearly in log sigma between grid
    points (the denoiser's and diffusers' _sigma_to_t interpolation). In VE units x = x_t
    sqrt(1 + sigma^2), E[x_0 | x] = MU + SPREAD^2 / (SPREAD^2 + sigma^2) (x - MU), so the noise
    is sigma / (SPREAD^2 + sigma^2) (x - MU). Every call (t, x_t) is recorded.
    """

    def __init__(self, schedule: NoiseSchedule) -> None:
        alphas_cumprod = schedule.alphas_cumprod
        self.log_sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt().log()
        self.calls: list[tuple[float, torch.Tensor]] = []

    def __call__(self, x_t: torch.Tensor, t: Any) -> torch.Tensor:
        # A network embeds t in float32 (diffusers hands it float32 timesteps, ours float64).
        t = torch.as_tensor(t).float().double().reshape(-1)
        assert (t == t[0]).all(), "one level per batch in these tests"
        low = t.floor().long().clamp(0, len(self.log_sigmas) - 2)
        fraction = t - low
        log_sigma = self.log_sigmas[low] * (1 - fraction) + self.log_sigmas[low + 1] * fraction
        sigma = log_sigma.exp().view(-1, 1, 1, 1)
        x = x_t * (1 + sigma.square()).sqrt()
        self.calls.append((float(t[0]), x_t.clone()))
        return (sigma / (SPREAD**2 + sigma.square()) * (x - MU)).to(x_t.dtype)


def _noise(seed: int = 0) -> torch.Tensor:
    """(3, 2, 3, 3) float64 unit noise, x_T of the VP samplers."""
    return torch.randn(3, 2, 3, 3, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


def _float64_tables(scheduler: Any, schedule: NoiseSchedule) -> Any:
    """Replace diffusers' float32 tables by ours in float64 (before set_timesteps)."""
    scheduler.betas = schedule.betas.clone()
    scheduler.alphas = schedule.alphas.clone()
    scheduler.alphas_cumprod = schedule.alphas_cumprod.clone()
    one = torch.tensor(1.0, dtype=torch.float64)
    if isinstance(scheduler, DDIMScheduler):
        assert scheduler.config.set_alpha_to_one
        scheduler.final_alpha_cumprod = one
    if isinstance(scheduler, DDPMScheduler):
        scheduler.one = one
    if isinstance(scheduler, DPMSolverMultistepScheduler):
        scheduler.alpha_t = scheduler.alphas_cumprod.sqrt()
        scheduler.sigma_t = (1 - scheduler.alphas_cumprod).sqrt()
        scheduler.lambda_t = scheduler.alpha_t.log() - scheduler.sigma_t.log()
    return scheduler


def _make(cls: type, schedule: NoiseSchedule, **config: Any) -> Any:
    scheduler = cls(num_train_timesteps=schedule.num_timesteps,
                    trained_betas=schedule.betas.tolist(), **config)
    return _float64_tables(scheduler, schedule)


def _install_sigmas(scheduler: Any, sigmas: torch.Tensor) -> None:
    """Give the scheduler float64 levels (K + 1,) after checking that they are its float32 ones."""
    assert sigmas.dtype == torch.float64 and sigmas[-1] == 0
    if isinstance(scheduler, HeunDiscreteScheduler):  # levels but the ends come twice
        sigmas = torch.cat([sigmas[:1], sigmas[1:-1].repeat_interleave(2), sigmas[-1:]])
    assert scheduler.sigmas.dtype == torch.float32
    torch.testing.assert_close(scheduler.sigmas.double(), sigmas, rtol=1e-6, atol=0)
    scheduler.sigmas = sigmas.clone()


def _twin_randn(seed: int) -> Callable[..., torch.Tensor]:
    """diffusers' randn_tensor drawing what our samplers draw from Generator().manual_seed(seed):
    float32 normal draws from the CPU generator, cast to the asked dtype."""
    twin = torch.Generator().manual_seed(seed)

    def fake(shape: Sequence[int], generator: Any = None, device: Any = None, dtype: Any = None,
             layout: Any = None) -> torch.Tensor:
        assert generator is None
        return randn(tuple(shape), twin, device or "cpu", dtype or torch.float32)

    return fake


class _TorchWithoutFloat32:
    """torch as a scheduler's module sees it during a walk: float32 is float64."""

    float32 = torch.float64

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


@contextmanager
def _float64_steps(scheduler: Any) -> Iterator[None]:
    """Keep `step` in float64: Euler's and DPM-Solver's cast the sample to float32."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys.modules[type(scheduler).__module__], "torch", _TorchWithoutFloat32())
        yield


def _walk_vp(scheduler: Any, network: GaussianNoise, x_t: torch.Tensor,
             **step_options: Any) -> torch.Tensor:
    """The diffusers loop of the VP schedulers (DDIM, DDPM, DPM-Solver): x_t in, x_0 out."""
    with _float64_steps(scheduler):
        for t in scheduler.timesteps:
            x_t = scheduler.step(network(x_t, t), t, x_t, **step_options).prev_sample
    return x_t


def _walk_ve(scheduler: Any, network: GaussianNoise, x: torch.Tensor) -> torch.Tensor:
    """The diffusers loop of the k-diffusion schedulers (Euler, Heun): VE x in, x_0 out."""
    with _float64_steps(scheduler):
        for t in scheduler.timesteps:
            x = scheduler.step(network(scheduler.scale_model_input(x, t), t), t, x).prev_sample
    return x


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype == torch.float64
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL)


def _assert_same_walk(ours: GaussianNoise, theirs: GaussianNoise, x0_ours: torch.Tensor,
                      x0_theirs: torch.Tensor) -> None:
    """Same network calls (t to float32 precision, x_t to RTOL) and the same x_0."""
    assert len(ours.calls) == len(theirs.calls) > 0
    t_ours, t_theirs = [t for t, _ in ours.calls], [t for t, _ in theirs.calls]
    assert t_ours == pytest.approx(t_theirs, rel=1e-6, abs=1e-6)
    for (_, a), (_, b) in zip(ours.calls, theirs.calls, strict=True):
        _close(a, b)
    _close(x0_ours, x0_theirs)


def _ve(x_t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """VP x_t at level sigma -> VE x = x_t sqrt(1 + sigma^2)."""
    return x_t * (1 + sigma.square()).sqrt()


# ---------------------------------------------------------------------------------------------
# DDIM and DDPM


@SCHEDULES
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("num_steps", [1, 10, 50])
def test_ddim_matches_diffusers(schedule: NoiseSchedule, eta: float, num_steps: int,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scheduling_ddim, "randn_tensor", _twin_randn(5))
    scheduler = _make(DDIMScheduler, schedule, clip_sample=False, set_alpha_to_one=True,
                      timestep_spacing="leading", steps_offset=0)
    scheduler.set_timesteps(num_steps)
    # "leading": t = i * (T // K), and the step goes from t to t - T // K (alpha_bar = 1 below 0)
    step = schedule.num_timesteps // num_steps
    assert scheduler.timesteps.tolist() == list(range(step * (num_steps - 1), -1, -step))
    theirs = GaussianNoise(schedule)
    x0_theirs = _walk_vp(scheduler, theirs, _noise(), eta=eta)

    ours = GaussianNoise(schedule)
    denoiser = VPDenoiser(ours, schedule, "noise")
    sigmas = torch.cat([denoiser.sigmas[scheduler.timesteps], torch.zeros(1, dtype=torch.float64)])
    x0_ours = ddim_sample(denoiser, _ve(_noise(), sigmas[0]), sigmas, eta=eta,
                          generator=torch.Generator().manual_seed(5))
    _assert_same_walk(ours, theirs, x0_ours, x0_theirs)


@SCHEDULES
@pytest.mark.parametrize(("variance", "variance_type"),
                         [("beta_tilde", "fixed_small"), ("beta", "fixed_large")])
@pytest.mark.parametrize("num_steps", [None, 2, 7, 25])
def test_ddpm_matches_diffusers(schedule: NoiseSchedule, variance: str, variance_type: str,
                                num_steps: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through sample(): our respaced timesteps as diffusers' custom timesteps. diffusers'
    fixed_large is the respaced step's beta = 1 - alpha_bar_t / alpha_bar_prev, as ours."""
    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", _twin_randn(9))
    scheduler = _make(DDPMScheduler, schedule, clip_sample=False, variance_type=variance_type)
    scheduler.set_timesteps(timesteps=timesteps(schedule.num_timesteps, num_steps))
    theirs = GaussianNoise(schedule)
    x0_theirs = _walk_vp(scheduler, theirs, _noise())

    ours = GaussianNoise(schedule)
    spec = "ddpm" if num_steps is None else f"ddpm-{num_steps}"
    x0_ours = sample(VPDenoiser(ours, schedule, "noise"), _noise(), spec, variance=variance,
                     generator=torch.Generator().manual_seed(9))
    _assert_same_walk(ours, theirs, x0_ours, x0_theirs)


# ---------------------------------------------------------------------------------------------
# DPM-Solver++(2M) and its SDE form


def _dpm_scheduler(schedule: NoiseSchedule, num_steps: int, **config: Any) -> Any:
    """diffusers' "linspace" timesteps (integer, unevenly spaced in lambda), float64 levels."""
    scheduler = _make(DPMSolverMultistepScheduler, schedule, solver_order=2,
                      solver_type="midpoint", final_sigmas_type="zero", **config)
    scheduler.set_timesteps(num_steps)
    sigmas = ((1 - scheduler.alphas_cumprod) / scheduler.alphas_cumprod).sqrt()
    _install_sigmas(scheduler, torch.cat([sigmas[scheduler.timesteps], sigmas.new_zeros(1)]))
    return scheduler


@SCHEDULES
@pytest.mark.parametrize("num_steps", [1, 2, 3, 10, 20])
@pytest.mark.parametrize("final", [{}, {"lower_order_final": False}, {"euler_at_final": True}],
                         ids=["default", "no-lower-order-final", "euler-at-final"])
def test_dpmpp_2m_matches_diffusers(schedule: NoiseSchedule, num_steps: int,
                                    final: dict[str, bool]) -> None:
    """With final sigma 0 diffusers takes the last step first order whatever lower_order_final
    and euler_at_final say, as ours; for solver_order 2 lower_order_second changes nothing."""
    scheduler = _dpm_scheduler(schedule, num_steps, algorithm_type="dpmsolver++", **final)
    theirs = GaussianNoise(schedule)
    x0_theirs = _walk_vp(scheduler, theirs, _noise())

    ours = GaussianNoise(schedule)
    denoiser = VPDenoiser(ours, schedule, "noise")
    sigmas = scheduler.sigmas
    x0_ours = dpmpp_2m_sample(denoiser, _ve(_noise(), sigmas[0]), sigmas)
    _assert_same_walk(ours, theirs, x0_ours, x0_theirs)


@SCHEDULES
@pytest.mark.parametrize("num_steps", [2, 10, 20])
def test_dpmpp_2m_sde_matches_diffusers(schedule: NoiseSchedule, num_steps: int,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """diffusers draws noise on the last step too (times sigma_next = 0): one draw after ours."""
    monkeypatch.setattr(scheduling_dpmsolver_multistep, "randn_tensor", _twin_randn(2))
    scheduler = _dpm_scheduler(schedule, num_steps, algorithm_type="sde-dpmsolver++")
    theirs = GaussianNoise(schedule)
    x0_theirs = _walk_vp(scheduler, theirs, _noise())

    ours = GaussianNoise(schedule)
    denoiser = VPDenoiser(ours, schedule, "noise")
    sigmas = scheduler.sigmas
    x0_ours = dpmpp_2m_sde_sample(denoiser, _ve(_noise(), sigmas[0]), sigmas, eta=1.0,
                                  generator=torch.Generator().manual_seed(2))
    _assert_same_walk(ours, theirs, x0_ours, x0_theirs)


# ---------------------------------------------------------------------------------------------
# Euler and Heun on Karras levels


def _karras_scheduler(cls: type, schedule: NoiseSchedule, num_steps: int) -> Any:
    """Karras levels from diffusers' own _convert_to_karras, in float64."""
    scheduler = _make(cls, schedule, use_karras_sigmas=True, timestep_spacing="linspace")
    scheduler.set_timesteps(num_steps)
    sigmas = ((1 - scheduler.alphas_cumprod) / scheduler.alphas_cumprod).sqrt().numpy()
    levels = scheduler._convert_to_karras(in_sigmas=sigmas[[-1, 0]], num_inference_steps=num_steps)
    _install_sigmas(scheduler, torch.cat([torch.from_numpy(levels), torch.zeros(1).double()]))
    return scheduler


@SCHEDULES
@pytest.mark.parametrize("num_steps", [2, 5, 20])
def test_euler_matches_diffusers(schedule: NoiseSchedule, num_steps: int) -> None:
    scheduler = _karras_scheduler(EulerDiscreteScheduler, schedule, num_steps)
    sigmas = scheduler.sigmas
    x = _ve(_noise(), sigmas[0])  # diffusers' own start would be noise * sigma_max
    theirs = GaussianNoise(schedule)
    x0_theirs = _walk_ve(scheduler, theirs, x)

    ours = GaussianNoise(schedule)
    assert SAMPLERS["euler"].function is ddim_sample  # Euler is DDIM with eta = 0
    x0_ours = SAMPLERS["euler"].function(VPDenoiser(ours, schedule, "noise"), x, sigmas)
    _assert_same_walk(ours, theirs, x0_ours, x0_theirs)


@SCHEDULES
@pytest.mark.parametrize("num_steps", [2, 5, 10])
def test_heun_matches_diffusers(schedule: NoiseSchedule, num_steps: int) -> None:
    """2K - 1 network calls on both sides: the last step (to sigma = 0) is Euler's."""
    scheduler = _karras_scheduler(HeunDiscreteScheduler, schedule, num_steps)
    sigmas = torch.cat([scheduler.sigmas[::2], scheduler.sigmas[-1:]])  # undo the doubling
    x = _ve(_noise(), sigmas[0])
    theirs = GaussianNoise(schedule)
    x0_theirs = _walk_ve(scheduler, theirs, x)

    ours = GaussianNoise(schedule)
    x0_ours = heun_sample(VPDenoiser(ours, schedule, "noise"), x, sigmas)
    assert len(ours.calls) == SAMPLERS["heun"].model_calls(num_steps)
    _assert_same_walk(ours, theirs, x0_ours, x0_theirs)


# ---------------------------------------------------------------------------------------------
# The comparison can fail


def test_the_comparison_sees_a_wrong_solver_or_ladder() -> None:
    """First order on DPM-Solver's levels, or its levels moved by 1e-5, is caught."""
    scheduler = _dpm_scheduler(LINEAR, 10, algorithm_type="dpmsolver++")
    theirs = GaussianNoise(LINEAR)
    x0_theirs = _walk_vp(scheduler, theirs, _noise())
    sigmas = scheduler.sigmas
    for sampler, levels in ((ddim_sample, sigmas), (dpmpp_2m_sample, sigmas * (1 + 1e-5))):
        ours = GaussianNoise(LINEAR)
        x0_ours = sampler(VPDenoiser(ours, LINEAR, "noise"), _ve(_noise(), levels[0]), levels)
        with pytest.raises(AssertionError):
            _assert_same_walk(ours, theirs, x0_ours, x0_theirs)


# ---------------------------------------------------------------------------------------------
# The ladders


def _ties(num_timesteps: int, num_steps: int) -> set[int]:
    """The i (T - 1) / (K - 1) that are exact halves: rounding them is up to float error."""
    points = (Fraction(i * (num_timesteps - 1), num_steps - 1) for i in range(num_steps))
    return {int(p) for p in points if p.denominator == 2}


@pytest.mark.parametrize("num_timesteps", [1000, 100, 20])
def test_timesteps_match_the_linspace_spacing_but_for_ties(num_timesteps: int) -> None:
    """timesteps(T, K) is DDIM's "linspace" spacing (diffusers, and round(linspace(...)) in
    the DDIM paper's code) except where i (T - 1) / (K - 1) is exactly n + 1/2: there ours
    (torch.linspace in float32) and diffusers' (np.linspace in float64) may round apart."""
    scheduler = DDIMScheduler(num_train_timesteps=num_timesteps, timestep_spacing="linspace")
    for num_steps in range(2, num_timesteps + 1):
        scheduler.set_timesteps(num_steps)
        theirs, ours = scheduler.timesteps.tolist(), timesteps(num_timesteps, num_steps)
        assert len(ours) == len(theirs) == num_steps
        ties = _ties(num_timesteps, num_steps)
        for a, b in zip(ours, theirs, strict=True):
            assert a == b or (min(a, b) in ties and abs(a - b) == 1), (num_steps, a, b)


@pytest.mark.xfail(strict=True, reason="known: at exact .5 ties timesteps(T, K) rounds apart "
                   "from diffusers' linspace spacing (float32 torch.linspace vs float64 numpy)")
def test_timesteps_match_the_linspace_spacing_at_ties() -> None:
    scheduler = DDIMScheduler(num_train_timesteps=1000, timestep_spacing="linspace")
    scheduler.set_timesteps(27)  # i = 13: 13 * 999 / 26 = 499.5
    assert timesteps(1000, 27) == scheduler.timesteps.tolist()


@SCHEDULES
@pytest.mark.parametrize("num_steps", [1, 2, 5, 10, 50])
def test_karras_levels_match_diffusers(schedule: NoiseSchedule, num_steps: int) -> None:
    """karras_sigmas on the model's range = Euler's and Heun's use_karras_sigmas levels."""
    denoiser = VPDenoiser(GaussianNoise(schedule), schedule, "noise")
    # diffusers' whole range (ours is capped at 80 and raised at the bottom for few steps)
    denoiser.sigma_max = float(denoiser.sigmas[-1])
    ours = noise_levels(denoiser, "karras", num_steps, denoiser.sigma_min)
    for cls in (EulerDiscreteScheduler, HeunDiscreteScheduler):
        scheduler = _make(cls, schedule, use_karras_sigmas=True)
        in_sigmas = denoiser.sigmas.flip(0).numpy()  # decreasing, as set_timesteps passes them
        theirs = scheduler._convert_to_karras(in_sigmas=in_sigmas, num_inference_steps=num_steps)
        torch.testing.assert_close(ours[:-1], torch.from_numpy(theirs), rtol=1e-12, atol=0)
        if num_steps > 1:  # (for one step diffusers' range is [sigma_min, sigma_min])
            scheduler.set_timesteps(num_steps)  # the float32 table of the full path
            levels = scheduler.sigmas if cls is EulerDiscreteScheduler else torch.cat(
                [scheduler.sigmas[::2], scheduler.sigmas[-1:]])
            torch.testing.assert_close(levels.double(), ours, rtol=1e-6, atol=0)


@SCHEDULES
@pytest.mark.parametrize("num_steps", [2, 5, 10, 50])
def test_logsnr_levels_match_diffusers_lu_lambdas(schedule: NoiseSchedule,
                                                  num_steps: int) -> None:
    """logsnr_sigmas = DPM-Solver's use_lu_lambdas levels: evenly spaced log sigma from
    sigma_max to sigma_min (diffusers then rounds their timesteps; we do not)."""
    denoiser = VPDenoiser(GaussianNoise(schedule), schedule, "noise")
    ours = logsnr_sigmas(num_steps, denoiser.sigma_min, float(denoiser.sigmas[-1]))
    scheduler = _make(DPMSolverMultistepScheduler, schedule, use_lu_lambdas=True)
    log_sigmas = denoiser.log_sigmas.flip(0).numpy()
    theirs = np.exp(scheduler._convert_to_lu(in_lambdas=log_sigmas, num_inference_steps=num_steps))
    torch.testing.assert_close(ours, torch.from_numpy(theirs), rtol=1e-12, atol=0)
    scheduler.set_timesteps(num_steps)
    torch.testing.assert_close(scheduler.sigmas[:-1].double(), ours, rtol=1e-6, atol=0)
