"""Mixed precision (run/precision.py): bf16 and fp16 autocast in training and sampling, float32
master weights, the stage key, the refusals, and float32 runs unchanged."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import TINY_OBJECTIVE, TINY_SCHEDULE, TINY_UNET
from latentdiffusion.cli import main
from latentdiffusion.diffusion import SamplingRequest, sample
from latentdiffusion.diffusion.objective import ObjectiveConfig, diffusion_loss, make_objective
from latentdiffusion.errors import LdmError, UsageError
from latentdiffusion.evaluation import metrics
from latentdiffusion.models import VAE, Classifier, UNet
from latentdiffusion.models.classifier import ClassifierConfig
from latentdiffusion.run import checkpoint, generation, keys, precision, training
from latentdiffusion.run.config import SamplingConfig, TrainConfig
from latentdiffusion.run.keys import StageKey
from latentdiffusion.run.presets import preset
from latentdiffusion.run.resume import Resume, latest_checkpoint
from latentdiffusion.run.rundir import RunDir
from latentdiffusion.run.training import Batch, FitResult, evaluate_loss, fit, init_model

CPU = torch.device("cpu")
CONFIG = TrainConfig(steps=8, batch_size=8, lr=3e-3, warmup_steps=2, ema_decay=0.9,
                     checkpoint_every=1, validate_every=4, seed=3)
LossFn = Callable[[nn.Module, Batch], torch.Tensor]
INNER = diffusion_loss(make_objective(TINY_OBJECTIVE, TINY_SCHEDULE))


def _data(n: int = 32, seed: int = 0) -> tuple[torch.Tensor]:
    """A few fixed (2, 8, 8) patterns plus a little noise, scaled to unit variance."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randn(4, 2, 8, 8, generator=g)
    x = patterns[torch.arange(n) % 4] + 0.1 * torch.randn(n, 2, 8, 8, generator=g)
    return (x / x.std(),)


def _fit(state_dir: Path, config: TrainConfig = CONFIG, loss_fn: LossFn = INNER,
         resume: Resume = "off") -> tuple[nn.Module, FitResult]:
    model = init_model(UNet, TINY_UNET, config.seed)
    result = fit(model, loss_fn, _data(), None, config, state_dir=state_dir, kind="unet",
                 key=StageKey.of(model=TINY_UNET, train=config), model_config=TINY_UNET,
                 device=CPU, resume=resume, progress=False)
    return model, result


def _autocast_seen(seen: list[torch.dtype | None], inner: LossFn = INNER) -> LossFn:
    """`inner`, recording the autocast dtype of each call (None: no autocast)."""
    def loss_fn(model: nn.Module, batch: Batch) -> torch.Tensor:
        enabled = torch.is_autocast_enabled("cpu")
        seen.append(torch.get_autocast_dtype("cpu") if enabled else None)
        return inner(model, batch)

    return loss_fn


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_bf16_step_runs_under_autocast_on_the_cpu_and_the_loss_falls(tmp_path: Path) -> None:
    noise_loss = diffusion_loss(make_objective(ObjectiveConfig(), TINY_SCHEDULE))  # E|eps|^2 = 1
    config = dataclasses.replace(CONFIG, steps=24, lr=1e-2, lr_decay="constant", ema_decay=0.0,
                                 checkpoint_every=100, precision="bf16")
    seen: list[torch.dtype | None] = []
    initial = evaluate_loss(init_model(UNet, TINY_UNET, config.seed), noise_loss, _data(), 8, 0,
                            CPU)
    model, result = _fit(tmp_path / "bf16", config, _autocast_seen(seen, noise_loss))
    assert seen == [torch.bfloat16] * 24
    final = evaluate_loss(model, noise_loss, _data(), 8, 0, CPU)
    assert final < 0.8 * initial, (initial, final)
    fp32_model, _ = _fit(tmp_path / "fp32", dataclasses.replace(config, precision="fp32"),
                         noise_loss)
    assert final == pytest.approx(evaluate_loss(fp32_model, noise_loss, _data(), 8, 0, CPU),
                                  rel=0.1)  # bf16 learns as far as float32
    assert model(_data()[0][:2], torch.zeros(2, dtype=torch.long)).dtype == torch.float32


def test_master_weights_optimizer_state_and_ema_stay_float32_under_bf16(tmp_path: Path) -> None:
    model, result = _fit(tmp_path, dataclasses.replace(CONFIG, precision="bf16"))
    found = latest_checkpoint(tmp_path, "train-state/unet")
    assert found is not None
    tensors = found[1]
    for prefix in ("model.", "ema.", "optim."):
        floats = {k: t.dtype for k, t in tensors.items()
                  if k.startswith(prefix) and t.is_floating_point()}
        assert floats and set(floats.values()) == {torch.float32}, (prefix, floats)
    assert {p.dtype for p in [*model.parameters(), *result.model.parameters()]} == {torch.float32}
    assert "grad_scaler" not in found[2]  # bf16 needs no loss scaling


def _cpu_fp16_autocast() -> bool:
    with warnings.catch_warnings():  # an older torch warns and runs float32
        warnings.simplefilter("ignore")
        with torch.autocast("cpu", dtype=torch.float16):
            return bool((torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float16)


def test_fp16_with_the_grad_scaler_resumes_exactly(tmp_path: Path) -> None:
    """The CLI refuses fp16 on the CPU; the library runs it (slowly), which tests the scaler.
    A loss 1000x larger overflows fp16's gradients at the first scale (65536), so the first
    steps are skipped and the scale halves: a resume must restore it to give the same weights."""
    if not _cpu_fp16_autocast():
        pytest.skip("this torch has no fp16 autocast on the CPU (torch < 2.4 falls back to "
                    "float32), so the scaler would see float32 gradients")
    config = dataclasses.replace(CONFIG, precision="fp16")

    def loud(model: nn.Module, batch: Batch) -> torch.Tensor:
        return 1e3 * INNER(model, batch)

    reference, _ = _fit(tmp_path / "reference", config, loud)
    found = latest_checkpoint(tmp_path / "reference", "train-state/unet")
    assert found is not None and found[2]["grad_scaler"]["scale"] < 65536.0, found[2]

    calls: list[int] = []

    def crashing(model: nn.Module, batch: Batch) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return loud(model, batch)

    with pytest.raises(KeyboardInterrupt):
        _fit(tmp_path / "crashed", config, crashing)
    resumed, _ = _fit(tmp_path / "crashed", config, loud, resume="strict")
    assert _same_weights(resumed, reference)


def test_fp16_on_the_cpu_is_refused_and_bf16_without_instructions_warns(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(UsageError, match="^fp16 needs a CUDA GPU; on the CPU use bf16$"):
        precision.check_device("fp16", CPU)
    with pytest.raises(UsageError, match="on mps use fp32"):
        precision.check_device("bf16", torch.device("mps"))
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    precision._warn_emulated_bf16.cache_clear()
    with caplog.at_level(logging.WARNING, logger="latentdiffusion.run.precision"):
        for _ in range(3):
            precision.check_device("bf16", CPU)
        precision.check_device("fp32", CPU)
    assert len(caplog.records) == 1 and "no bf16 instructions" in caplog.records[0].message
    precision._warn_emulated_bf16.cache_clear()


def test_the_stage_key_holds_the_precision_only_when_not_fp32() -> None:
    c = preset("default")
    # Digests of keys made before the precision existed: fp32 keeps them.
    assert keys.model_key(c.classifier, c.classifier_train, "abc").digest == (
        "35f685d3df95920e874b6de082763f3cb2ee25f39c481afe9a342227a2a6798f")
    assert keys.diffusion_key(c.unet, c.schedule, c.objective, c.diffusion_train, "lat"
                              ).digest == (
        "678ed3efb97d7ea096ef752d3de63b4180eccfaac5955d48f62a432412fd0f3e")
    assert keys.samples_key("v", "d", c.sampling, c.eval_samples).digest == (
        "8f280a03c713e1080f6f9580f196e2736969ecf7ebc6f145478ea5a7b4e01cd7")
    bf16 = dataclasses.replace(c.diffusion_train, precision="bf16")
    key = keys.diffusion_key(c.unet, c.schedule, c.objective, bf16, "lat")
    assert key.fields["train.precision"] == "bf16"
    assert not any("precision" in name for name in keys.diffusion_key(
        c.unet, c.schedule, c.objective, c.diffusion_train, "lat").fields)
    sets = keys.samples_key("v", "d", SamplingConfig(precision="bf16"), 10)
    assert sets.fields["sampling.precision"] == "bf16"


def test_a_resume_under_another_precision_is_refused(tmp_path: Path) -> None:
    _fit(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(UsageError, match=r"another config \(train.precision: \(none\) -> bf16\)"):
        _fit(tmp_path, dataclasses.replace(CONFIG, precision="bf16"), resume="strict")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_nan_in_a_bf16_step_stops_training_naming_the_step(tmp_path: Path) -> None:
    seen: list[torch.dtype | None] = []

    def poisoned(model: nn.Module, batch: Batch) -> torch.Tensor:
        if len(seen) == 5:  # step 4 (its call is recorded): NaN through the bf16 network
            batch.tensors = (batch.tensors[0] * float("nan"),)
        return INNER(model, batch)

    with pytest.raises(LdmError, match=r"loss became nan at step 4\b"):
        _fit(tmp_path, dataclasses.replace(CONFIG, precision="bf16"),
             _autocast_seen(seen, poisoned))
    assert seen == [torch.bfloat16] * 5


def test_fid_moments_stay_float64_for_features_of_a_bf16_forward(
        monkeypatch: pytest.MonkeyPatch) -> None:
    config = ClassifierConfig(image_size=16, channels=4, feature_dim=8)
    classifier = init_model(Classifier, config, 0).eval()
    classifier.set_pixel_stats(torch.tensor([0.5]), torch.tensor([0.02]))  # features of scale 1
    images = torch.randint(0, 256, (64, 16, 16), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0)).numpy()
    reference = metrics.reference_from_images(classifier, images[:32], "h", CPU)
    dimmer = images[32:] // 3  # a set unlike the reference: a FID well above 0
    inputs: list[str] = []
    distance = metrics.frechet_distance

    def recording(*args: object) -> float:
        inputs.extend(str(a.dtype) for a in args)  # type: ignore[attr-defined]
        return distance(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(metrics, "frechet_distance", recording)
    with precision.autocast("bf16", CPU):
        features = metrics.classify(classifier, images, CPU)[0]
        scored = metrics.evaluate_images(classifier, dimmer, reference, None, CPU)
    assert features.dtype == torch.float32
    assert inputs == ["float64"] * 4
    stats = metrics.FeatureStats.from_features(features.bfloat16())  # even given bf16 rows
    assert stats.mean.dtype == stats.cov.dtype == "float64"
    fp32 = metrics.evaluate_images(classifier, dimmer, reference, None, CPU)["fid"]
    assert fp32 > 1e-3 and scored["fid"] == pytest.approx(fp32, rel=0.05)  # nearly the same


def test_sampler_updates_stay_float32_under_autocast() -> None:
    """A denoiser of elementwise float32 arithmetic (D(x, s) = x / (1 + s^2)) gives the same
    bits under bf16 autocast: autocast reaches only the networks' convs and linears."""

    class Shrink:
        sigma_min, sigma_max = 0.01, 80.0

        def __call__(self, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
            s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1, 1)
            return (x / (1 + s**2)).float()

        def prior(self, noise: torch.Tensor, sigma: float) -> torch.Tensor:
            return noise * (1 + sigma**2) ** 0.5

        def timestep_sigmas(self, num_steps: int | None) -> torch.Tensor:
            return torch.linspace(80.0, 0.01, num_steps or 10, dtype=torch.float64)

    noise = torch.randn(4, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    plain = sample(Shrink(), noise, "heun-5")  # type: ignore[arg-type]
    with precision.autocast("bf16", CPU):
        cast = sample(Shrink(), noise, "heun-5")  # type: ignore[arg-type]
    assert plain.dtype == cast.dtype == torch.float32 and torch.equal(plain, cast)


class _Unscaled:
    """The training step before mixed precision: loss.backward(), then optimizer.step()."""

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        pass

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.step()

    def update(self) -> None:
        pass

    def is_enabled(self) -> bool:
        return False


def test_float32_training_is_unchanged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[torch.dtype | None] = []
    model, result = _fit(tmp_path / "new", loss_fn=_autocast_seen(seen))
    assert seen == [None] * CONFIG.steps  # no autocast context at all
    assert not precision.grad_scaler("fp32", CPU).is_enabled()
    monkeypatch.setattr(training, "autocast", lambda *_: contextlib.nullcontext())
    monkeypatch.setattr(training, "grad_scaler", lambda *_: _Unscaled())
    plain_model, plain = _fit(tmp_path / "plain")
    assert _same_weights(model, plain_model) and _same_weights(result.model, plain.model)
    assert result.history == plain.history
    found = latest_checkpoint(tmp_path / "new", "train-state/unet")
    assert found is not None and "grad_scaler" not in found[2]


def test_the_cli_refuses_an_unknown_or_unrunnable_precision_in_one_line(
        data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    cases = [(["run", "--preset", "tiny", "--precision", "fp8"], "--precision: unknown value "
              "'fp8' (choose from fp32, bf16, fp16)"),
             (["train", "vae", "--preset", "tiny", "--precision", "half"], "unknown value"),
             (["sample", "--model", "vae", "--out", str(tmp_path / "s.npz"), "--precision",
               "bf17"], "unknown value 'bf17'"),
             (["run", "--preset", "tiny", "--set", "sampling.precision=fp8"],
              "--set sampling.precision: unknown value 'fp8'"),
             (["train", "vae", "--preset", "tiny", "--precision", "fp16"],
              "fp16 needs a CUDA GPU; on the CPU use bf16")]
    data = ["--data-dir", str(data_dir)]
    for argv, message in cases:
        capsys.readouterr()
        extra = data if argv[0] != "sample" else []
        code = main([*argv, *extra, "--run-dir", str(run), "--device", "cpu", "--quiet"])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and err.startswith("error: "), (argv, err)
        assert message in err and "Traceback" not in err, (argv, err)
    assert not run.exists()


def _recording(method: Callable[..., torch.Tensor], name: str,
               seen: list[tuple[str, bool]]) -> Callable[..., torch.Tensor]:
    """`method`, recording (name, whether autocast is on) at each call."""
    def spy(self: nn.Module, *args: object, **kwargs: object) -> torch.Tensor:
        seen.append((name, torch.is_autocast_enabled("cpu")))
        return method(self, *args, **kwargs)

    return spy


def test_ldm_run_with_bf16_keys_every_training_stage_and_the_sets(
        data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    assert main(["run", "--data-dir", str(data_dir), "--run-dir", str(run), "--preset", "tiny",
                 "--precision", "bf16", "--device", "cpu", "--quiet"]) == 0
    config = json.loads((run / "run.json").read_text())["config"]
    assert {config[k]["precision"] for k in ("classifier_train", "vae_train", "diffusion_train",
                                             "sampling")} == {"bf16"}
    for name in ("classifier", "vae", "diffusion", "guide"):
        header = checkpoint.peek(run / f"{name}.safetensors")
        assert header is not None and header["key_fields"]["train.precision"] == "bf16", name
    fids = json.loads((run / "metrics.json").read_text())
    assert all(v["fid"] is not None for k, v in fids.items() if k in ("ddim-5", "ddpm"))

    # Sampling autocasts the denoiser and the decoder, and its images are nearly float32's.
    seen: list[tuple[str, bool]] = []
    for cls, name in ((UNet, "forward"), (VAE, "decode_logits")):
        monkeypatch.setattr(cls, name, _recording(getattr(cls, name), name, seen))
    images = {p: generation.generate(RunDir(run), "diffusion", 8, 0, device=CPU,
                                     request=SamplingRequest.of("ddim-5"), progress=False,
                                     precision=p) for p in ("bf16", "fp32")}
    assert set(seen) == {("forward", True), ("decode_logits", True), ("forward", False),
                         ("decode_logits", False)}
    difference = np.abs(images["bf16"].astype(int) - images["fp32"].astype(int))
    assert difference.mean() < 4, difference.mean()  # of 255
