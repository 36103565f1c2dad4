"""Autoguidance (Karras et al. 2024): the guided denoiser, what a guide that errs further the
same way does to the samples, the config's rules and the refusals of a run without a fitting
guide."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch

from conftest import write_dataset
from latentdiffusion.cli import main
from latentdiffusion.diffusion import sample
from latentdiffusion.diffusion.denoiser import FlowDenoiser
from latentdiffusion.diffusion.guidance import GuidedDenoiser
from latentdiffusion.errors import UsageError
from latentdiffusion.run import generation
from latentdiffusion.run.config import GuideConfig, SamplingConfig, conditional
from latentdiffusion.run.keys import samples_key
from latentdiffusion.run.presets import preset
from latentdiffusion.run.recipe import apply_sets
from test_cli_errors import assert_fails


def gaussian_velocity(spread: float):
    """The exact flow network of data N(0, spread^2) per element: v = (x_t - E[x_0 | x_t]) / t,
    E[x_0 | x_t] = (1 - t) c^2 x_t / ((1 - t)^2 c^2 + t^2) on x_t = (1 - t) x_0 + t noise."""

    def velocity(x_t: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        t = (time / 1000).double().view(-1, 1, 1, 1)
        c2 = spread**2
        x0 = (1 - t) * c2 * x_t.double() / ((1 - t) ** 2 * c2 + t**2)
        return ((x_t.double() - x0) / t).float()

    return velocity


def test_autoguidance_is_the_guide_plus_s_times_the_difference() -> None:
    strong, weak = FlowDenoiser(gaussian_velocity(1.0)), FlowDenoiser(gaussian_velocity(2.0))
    x = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    for sigma in (0.5, 3.0, torch.tensor([0.2, 1.0, 9.0], dtype=torch.float64)):
        assert torch.equal(GuidedDenoiser(strong, weak, 1.0)(x, sigma), strong(x, sigma))
        guided = GuidedDenoiser(strong, weak, 2.5)(x, sigma)
        expected = weak(x, sigma) + 2.5 * (strong(x, sigma) - weak(x, sigma))
        torch.testing.assert_close(guided, expected)
        assert not torch.allclose(guided, strong(x, sigma))
    # The samplers see the strong denoiser's levels and start.
    guided_denoiser = GuidedDenoiser(strong, weak, 2.0)
    assert (guided_denoiser.sigma_min, guided_denoiser.sigma_max) == (strong.sigma_min,
                                                                      strong.sigma_max)
    assert torch.equal(guided_denoiser.timestep_sigmas(5), strong.timestep_sigmas(5))
    assert torch.equal(guided_denoiser.prior(x, 4.0), strong.prior(x, 4.0))


def _sample_std(denoiser: FlowDenoiser | GuidedDenoiser) -> float:
    """The std of the samples: for Gaussian data every D is linear in x, so the ODE maps unit
    noise to a multiple of itself, and that multiple is the std."""
    return sample(denoiser, torch.ones(1, 1, 1, 1), "ddim-200").item()


def test_a_guide_that_errs_further_the_same_way_corrects_the_samples() -> None:
    """Data N(0, 1): a denoiser that learnt spread 1.2 samples std 1.2; guided by one that
    learnt 1.6 (the same error, larger), the samples move towards the data's std."""
    exact, strong, weak = (FlowDenoiser(gaussian_velocity(c)) for c in (1.0, 1.2, 1.6))
    assert _sample_std(exact) == pytest.approx(1.0, abs=0.01)
    assert _sample_std(strong) == pytest.approx(1.2, abs=0.01)
    stds = [_sample_std(GuidedDenoiser(strong, weak, s)) for s in (1.0, 1.25, 1.5, 3.0)]
    errors = [abs(std - 1.0) for std in stds]
    assert errors[0] > errors[1] > errors[2]  # closer the stronger the guidance, up to a point
    assert errors[2] < 0.2 * errors[0]
    assert stds[3] < 0.8  # too strong: past the data, to too little spread
    # A guide erring the other way pushes the samples further off.
    opposite = FlowDenoiser(gaussian_velocity(0.9))
    assert abs(_sample_std(GuidedDenoiser(strong, opposite, 2.0)) - 1.0) > errors[0]


def test_the_config_rules() -> None:
    default = preset("default")
    assert default.guide.channels and default.sampling.autoguidance > 1
    assert default.guide_unet == dataclasses.replace(default.unet, channels=(16, 32))
    assert default.guide_train == dataclasses.replace(default.diffusion_train, steps=937)
    with pytest.raises(UsageError, match="autoguidance must be >= 1"):
        SamplingConfig(autoguidance=0.5)
    with pytest.raises(UsageError, match="autoguidance is for unconditional sampling"):
        SamplingConfig(labels="balanced", autoguidance=2.0)
    with pytest.raises(UsageError, match=r"sampling.autoguidance needs a guide \(guide.channels"):
        dataclasses.replace(default, guide=GuideConfig())
    with pytest.raises(UsageError, match="guide: UNetConfig: every channel count must be "
                                         "divisible by groups"):
        dataclasses.replace(default, guide=GuideConfig(channels=(12, 20)))
    with pytest.raises(UsageError, match="GuideConfig.steps must be > 0"):
        GuideConfig(channels=(8,), steps=0)
    # A class-conditional run has classifier-free guidance instead of a guide.
    run = conditional(default)
    assert not run.guide.channels and run.sampling.autoguidance == 1.0
    with pytest.raises(UsageError, match="class-conditional run has classifier-free guidance"):
        dataclasses.replace(run, guide=GuideConfig(channels=(16, 32)))


def test_the_guide_is_in_the_sets_key_only_when_they_are_guided() -> None:
    plain, guided = SamplingConfig(), SamplingConfig(autoguidance=2.0)
    base = samples_key("v", "d", plain, 10)
    assert "guide" not in base.fields
    assert samples_key("v", "d", guided, 10, guide_hash="g").fields["guide"] == "g"
    assert (samples_key("v", "d", guided, 10, guide_hash="g").digest
            != samples_key("v", "d", guided, 10, guide_hash="h").digest)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(data dir, run dir) with a tiny VAE, latents and a VP denoiser, no guide yet."""
    root = tmp_path_factory.mktemp("autoguidance")
    data_dir = write_dataset(root / "data", n_train=48, n_test=20)
    run = root / "run"
    common = ["--data-dir", str(data_dir), "--run-dir", str(run), "--device", "cpu", "--quiet",
              "--preset", "tiny"]
    for argv in (["train", "vae"], ["encode"], ["train", "diffusion"]):
        assert main([*argv, *common[:-2], *(common[-2:] if "train" in argv else [])]) == 0
    return data_dir, run


SAMPLE = ["sample", "--model", "diffusion", "--sampler", "ddim-2", "-n", "4", "--device", "cpu",
          "--quiet"]


def test_guided_sampling_refuses_a_missing_or_unfitting_guide(
        capsys: pytest.CaptureFixture[str], tiny_run: tuple[Path, Path], tmp_path: Path) -> None:
    data_dir, run = tiny_run
    out = tmp_path / "x.npz"
    assert_fails(capsys, 2, *SAMPLE, "--run-dir", run, "--autoguidance", "2", "--out", out,
                 match="autoguidance needs a guide, and")
    assert_fails(capsys, 2, *SAMPLE, "--run-dir", run, "--autoguidance", "0.5", "--out", out,
                 match="SamplingConfig.autoguidance must be >= 1")
    assert_fails(capsys, 2, "sweep", "--samplers", "ddim", "--nfe", "2", "-n", "4",
                 "--autoguidance", "0", "--data-dir", data_dir, "--run-dir", run,
                 match="SamplingConfig.autoguidance must be >= 1")
    assert_fails(capsys, 2, "sweep", "--samplers", "ddim", "--nfe", "4,1", "-n", "4",
                 "--autoguidance", "2", "--data-dir", data_dir, "--run-dir", run,
                 match="every budget must be at least 2")
    assert_fails(capsys, 2, "train", "guide", "--preset", "tiny", "--set", "guide.channels=6",
                 "--run-dir", run, match="guide: UNetConfig: every channel count")
    # A guide of another objective is never used to guide this denoiser.
    assert main(["train", "guide", "--preset", "tiny", "--objective", "flow", "--run-dir",
                 str(run), "--device", "cpu", "--quiet"]) == 0
    capsys.readouterr()
    assert_fails(capsys, 1, *SAMPLE, "--run-dir", run, "--autoguidance", "2", "--out", out,
                 match="was trained with another objective, schedule or latents than")
    assert not out.exists() and not out.with_suffix(".png").exists()


def test_set_turns_the_guide_off() -> None:
    """`--set guide.channels=` is the empty list: no guide (with autoguidance back to 1)."""
    off = apply_sets(preset("default"), ["guide.channels=", "sampling.autoguidance=1"])
    assert off.guide.channels == () and off.sampling.autoguidance == 1.0
    with pytest.raises(UsageError, match="sampling.autoguidance needs a guide"):
        apply_sets(preset("default"), ["guide.channels="])
    with pytest.raises(UsageError, match="UNetConfig.channels needs at least one level"):
        apply_sets(preset("default"), ["unet.channels="])


def test_a_conditional_run_has_no_guide(capsys: pytest.CaptureFixture[str],
                                        tiny_run: tuple[Path, Path], tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """`ldm train guide` refuses a class-conditional run (the config refuses a guide there, so
    advice to give it one led in a circle), and a guide never guides a conditional denoiser."""
    data_dir, unconditional = tiny_run
    common = ["--preset", "tiny", "--device", "cpu", "--quiet"]
    assert_fails(capsys, 2, "train", "guide", "--conditional", *common, "--run-dir",
                 unconditional, match="and --conditional asks for a class-conditional one")
    run = tmp_path / "run"
    shutil.copytree(unconditional, run)
    for path in run.glob("guide*"):
        path.unlink()
    shutil.rmtree(run / "checkpoints" / "guide", ignore_errors=True)
    # A guide trained for the unconditional denoiser, then the denoiser retrained conditional.
    assert main(["train", "guide", *common, "--run-dir", str(run)]) == 0
    assert main(["train", "diffusion", "--conditional", "--force", *common, "--run-dir",
                 str(run), "--data-dir", str(data_dir)]) == 0
    capsys.readouterr()
    assert_fails(capsys, 2, "train", "guide", "--force", *common, "--run-dir", run,
                 match="diffusion.safetensors is class-conditional: it has classifier-free")
    out = tmp_path / "x.npz"
    assert_fails(capsys, 2, *SAMPLE, "--run-dir", run, "--autoguidance", "2", "--out", out,
                 match="autoguidance guides an unconditional model, and")
    # The guide's header is checked against the denoiser's whoever calls it.
    monkeypatch.setattr(generation, "check_conditioning", lambda *args: None)
    assert_fails(capsys, 1, *SAMPLE, "--run-dir", run, "--autoguidance", "2", "--out", out,
                 match="guide.safetensors is for 0 classes but")
    assert not out.exists()
