"""Class labels and classifier-free guidance: label dropout in training, the guided denoiser,
labels that depend on the sample index alone, and the conditional run end to end."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_OBJECTIVE, TINY_SCHEDULE, TINY_UNET, register, write_dataset
from latentdiffusion.cli import main
from latentdiffusion.diffusion import sample
from latentdiffusion.diffusion.denoiser import FlowDenoiser
from latentdiffusion.diffusion.guidance import guided, labels_for, parse_labels, with_labels
from latentdiffusion.diffusion.objective import diffusion_loss, make_objective
from latentdiffusion.errors import UsageError
from latentdiffusion.evaluation.samples import load_samples
from latentdiffusion.models import UNet
from latentdiffusion.models.unet import UNetConfig
from latentdiffusion.rng import generator
from latentdiffusion.run.config import (
    CONDITIONAL_GUIDANCE,
    ImageShape,
    SamplingConfig,
    TrainConfig,
    conditional,
    for_images,
)
from latentdiffusion.run.keys import StageKey
from latentdiffusion.run.presets import preset
from latentdiffusion.run.training import Batch, fit, init_model
from test_cli_errors import assert_fails

CPU = torch.device("cpu")
COND_UNET = UNetConfig(**{**TINY_UNET.__dict__, "num_classes": 10})


# ---------------------------------------------------------------- labels reach the network


def test_unconditional_unet_is_unchanged_and_conditional_adds_one_table() -> None:
    plain = init_model(UNet, TINY_UNET, 0)
    conditional = init_model(UNet, COND_UNET, 0)
    names = set(dict(plain.named_parameters()))
    assert not any("label" in name for name in names)
    extra = set(dict(conditional.named_parameters())) - names
    assert extra == {"label_embedding.weight"}
    assert conditional.label_embedding.weight.shape == (11, 4 * TINY_UNET.time_dim)  # K + null
    # The shared weights are drawn first, in the same order: same values.
    for name, value in plain.state_dict().items():
        assert torch.equal(value, conditional.state_dict()[name]), name
    x, t = torch.randn(3, 2, 8, 8), torch.tensor([1.0, 10.0, 40.0])
    with pytest.raises(ValueError, match="unconditional"):
        plain(x, t, torch.zeros(3, dtype=torch.long))
    torch.nn.init.normal_(conditional.out[-1].weight)  # not the zero predictor
    null = conditional(x, t, torch.full((3,), 10))
    assert torch.equal(conditional(x, t), null)  # no labels = the null label
    assert not torch.allclose(conditional(x, t, torch.tensor([0, 1, 2])), null)


def test_the_key_names_the_label_count() -> None:
    plain, conditional = StageKey.of(model=TINY_UNET), StageKey.of(model=COND_UNET)
    assert (plain.fields["model.num_classes"], conditional.fields["model.num_classes"]) == (0, 10)
    assert plain.digest != conditional.digest


class _Spy(torch.nn.Module):
    """A network that records the labels it was given and predicts zeros."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x_t: torch.Tensor, t: torch.Tensor,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is not None:
            self.seen.append(labels)
        return torch.zeros_like(x_t)


def _batch(n: int, step: int, shard: slice = slice(None)) -> Batch:
    x0 = torch.randn(n, 2, 4, 4, generator=generator(0, 1))
    labels = torch.arange(n) % 10
    return Batch((x0[shard], labels[shard]), n, shard, generator(7, step), CPU)


def _dropped_labels(n: int, step: int, p: float, shard: slice = slice(None)) -> torch.Tensor:
    spy = _Spy()
    loss = diffusion_loss(make_objective(TINY_OBJECTIVE, TINY_SCHEDULE), 10, p)
    loss(spy, _batch(n, step, shard))
    return spy.seen[0]


def test_label_dropout_rate_determinism_and_sharding() -> None:
    labels = _dropped_labels(20_000, 0, 0.1)
    dropped = labels == 10
    assert abs(dropped.float().mean().item() - 0.1) < 0.01  # 4.5 sigma at n = 20k
    kept = ~dropped
    assert torch.equal(labels[kept], (torch.arange(20_000) % 10)[kept])  # the rest unchanged
    assert torch.equal(_dropped_labels(20_000, 0, 0.1), labels)  # the step's own generator
    assert not torch.equal(_dropped_labels(20_000, 1, 0.1), labels)
    assert not (_dropped_labels(1000, 0, 0.0) == 10).any()
    # Two ranks' shards of the global batch together are the one-process draws.
    halves = [_dropped_labels(64, 3, 0.5, slice(r, None, 2)) for r in range(2)]
    whole = _dropped_labels(64, 3, 0.5)
    assert torch.equal(whole[0::2], halves[0]) and torch.equal(whole[1::2], halves[1])


def test_the_unconditional_loss_draws_nothing_more() -> None:
    """t and the noise come first, so a conditional model sees the same x_t as an unconditional
    one, and an unconditional one leaves its generator where it did before labels."""
    objective = make_objective(TINY_OBJECTIVE, TINY_SCHEDULE)
    plain, conditional = _batch(16, 5), _batch(16, 5)
    diffusion_loss(objective)(_Spy(), plain)
    diffusion_loss(objective, 10, 0.1)(_Spy(), conditional)
    after_plain = torch.rand(1, generator=plain.generator)
    assert not torch.equal(after_plain, torch.rand(1, generator=conditional.generator))
    reference = _batch(16, 5)
    objective.draw(reference)
    reference.randn(2, 4, 4)
    assert torch.equal(after_plain, torch.rand(1, generator=reference.generator))


class _Stop(Exception):
    pass


def test_conditional_training_resumes_exactly(tmp_path: Path) -> None:
    """Kill after 3 of 8 steps and resume: the same weights as an uninterrupted run."""
    g = generator(0)
    data = (torch.randn(32, 2, 8, 8, generator=g), torch.arange(32) % 10)
    config = TrainConfig(steps=8, batch_size=8, lr=3e-3, ema_decay=0.9, checkpoint_every=1,
                         seed=5)
    inner = diffusion_loss(make_objective(TINY_OBJECTIVE, TINY_SCHEDULE), 10, 0.5)

    def train(state_dir: Path, resume: bool = False, stop_at: int = -1) -> torch.nn.Module:
        steps = [0]

        def loss_fn(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
            if model.training:
                if steps[0] == stop_at:
                    raise _Stop
                steps[0] += 1
            return inner(model, batch)

        return fit(init_model(UNet, COND_UNET, 5), loss_fn, data, data, config,
                   state_dir=state_dir, kind="unet", key=StageKey.of(model=COND_UNET, train=config),
                   model_config=COND_UNET, device=CPU, resume="strict" if resume else "off",
                   progress=False).model

    whole = train(tmp_path / "whole")
    with pytest.raises(_Stop):
        train(tmp_path / "killed", stop_at=3)
    resumed = train(tmp_path / "killed", resume=True)
    for name, value in whole.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name


# ---------------------------------------------------------------- the guided denoiser


def _conditional_denoiser() -> tuple[UNet, FlowDenoiser]:
    unet = init_model(UNet, COND_UNET, 0)
    torch.nn.init.normal_(unet.out[-1].weight, std=0.1)
    return unet.eval(), FlowDenoiser(unet)


@pytest.mark.parametrize("sigma", [2.0, math.inf, "per-row"])
def test_guidance_zero_and_one_are_the_unconditional_and_conditional_denoisers(
        sigma: float | str) -> None:
    unet, _ = _conditional_denoiser()
    x = torch.randn(4, 2, 8, 8, generator=generator(0))
    labels = torch.tensor([3, 1, 4, 1])
    level: float | torch.Tensor = torch.tensor([0.5, 1.0, 2.0, 8.0], dtype=torch.float64) \
        if sigma == "per-row" else float(sigma)
    make = FlowDenoiser
    with torch.no_grad():
        conditional = make(with_labels(unet, labels))(x, level)
        unconditional = make(unet)(x, level)  # no labels = the null label
        at = {s: guided(make, unet, labels, 10, s)(x, level) for s in (0.0, 1.0, 2.0)}
    assert torch.equal(at[1.0], conditional)
    assert torch.equal(at[0.0], unconditional)
    assert not torch.allclose(conditional, unconditional)
    # s = 2 from the doubled batch: D_u + 2 (D_c - D_u)
    torch.testing.assert_close(at[2.0], 2 * conditional - unconditional, atol=1e-5, rtol=1e-5)


POINTS = torch.tensor([1.0, -1.0]).view(2, 1, 1, 1).expand(2, 1, 2, 2)  # class 0: +1, 1: -1


def _oracle(x_t: torch.Tensor, time: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The exact velocity of the flow from two equally likely points: D = the point of the
    label, or for the null label (2) the posterior mean of the two."""
    t = (time / 1000).double().view(-1, 1, 1, 1)
    x = x_t.double()
    # log p(x_t | x_0 = p_k) = -|x_t - (1 - t) p_k|^2 / (2 t^2) + const
    logits = torch.stack([-(x - (1 - t) * p).square().sum((1, 2, 3)) / (2 * t.view(-1) ** 2)
                          for p in POINTS.double()], dim=1)  # (B, 2)
    posterior_mean = torch.einsum("bk,kchw->bchw", logits.softmax(1), POINTS.double())
    chosen = POINTS.double()[labels.clamp(max=1)]
    x0 = torch.where((labels == 2).view(-1, 1, 1, 1), posterior_mean, chosen)
    return ((x - x0) / t).float()  # v with x_0 = x_t - t v


def test_guided_oracle_moves_towards_the_requested_point() -> None:
    n = 400
    noise = torch.randn(n, 1, 2, 2, generator=generator(1))
    labels = torch.zeros(n, dtype=torch.long)  # everyone asks for the +1 point
    ends = {}
    for scale in (0.0, 1.0, 3.0):
        denoiser = guided(FlowDenoiser, _oracle, labels, 2, scale)
        ends[scale] = sample(denoiser, noise, "ddim-20").mean((1, 2, 3))
    near_plus = {s: (e > 0).float().mean().item() for s, e in ends.items()}
    assert 0.35 < near_plus[0.0] < 0.65  # unconditional: either point
    assert near_plus[1.0] == 1.0 and near_plus[3.0] == 1.0
    assert (ends[1.0] - 1).abs().max() < 0.05
    # One step from between the points: guidance past 1 overshoots towards the label.
    x = torch.zeros(1, 1, 2, 2)
    steps = [guided(FlowDenoiser, _oracle, labels[:1], 2, s)(x, 1.0).mean().item()
             for s in (0.0, 1.0, 3.0)]
    assert steps[0] == pytest.approx(0.0, abs=1e-6) and steps[0] < steps[1] < steps[2]


def test_labels_depend_on_the_index_alone() -> None:
    assert labels_for("balanced", range(12), 10) == [*range(10), 0, 1]
    assert labels_for("balanced", [13, 4], 10) == [3, 4]
    assert labels_for("balanced", range(14), 12) == [*range(12), 0, 1]
    assert labels_for("0,1,2", range(5), 10) == [0, 1, 2, 0, 1]
    assert labels_for("7", range(3), 10) == [7, 7, 7]
    assert parse_labels("", 10) == ()
    for bad, match in (("11", r"label 11 is not a class of this model \(0..9\)"),
                       ("seven", "comma-separated class indices"),
                       ("-1", "label -1 is not a class: classes count from 0")):
        with pytest.raises(UsageError, match=match):
            parse_labels(bad, 10)


def test_labels_are_checked_against_the_classes_of_the_data_set() -> None:
    # A sampling config alone does not know the classes: it checks the form of its labels.
    assert SamplingConfig(labels="15").labels == "15"
    with pytest.raises(UsageError, match="comma-separated class indices"):
        SamplingConfig(labels="seven")
    # A run config does: its conditional model takes the data set's classes.
    for classes, ok in ((20, True), (10, False)):
        config = conditional(for_images(preset("tiny"), ImageShape(28, 1, classes)))
        sampling = SamplingConfig(labels="15", guidance=config.sampling.guidance)
        if ok:
            assert dataclasses.replace(config, sampling=sampling).sampling.labels == "15"
        else:
            with pytest.raises(UsageError, match=r"label 15 is not a class of this model "
                                                 r"\(0..9\)"):
                dataclasses.replace(config, sampling=sampling)


# ---------------------------------------------------------------- the CLI, end to end


def _stages(err: str) -> dict[str, str]:
    err = err.replace("\r", "\n")
    return {m.group(1): "skipped" if "skipped" in m.group(2) else "ran"
            for m in re.finditer(r"^\[(\w+)\] (.*)$", err, flags=re.M)}


def test_conditional_run_end_to_end(data_dir: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    common = ["--data-dir", str(data_dir), "--run-dir", str(run), "--device", "cpu"]
    # As if the files were MNIST's release, whose report sets the post's FIDs beside its own
    register(monkeypatch, data_dir, "mnist")
    assert main(["run", "--preset", "tiny", "--conditional", "--dataset", "mnist", *common]) == 0
    capsys.readouterr()
    metrics = json.loads((run / "metrics.json").read_text())
    for name in ("ddim-5", "ddpm"):
        images, labels = load_samples(run / "samples" / f"{name}.npz")
        assert labels is not None and list(labels) == [i % 10 for i in range(24)]
        with np.load(run / "samples" / f"{name}.npz") as f:
            assert float(f["guidance"]) == CONDITIONAL_GUIDANCE == 1.5
        entry = metrics[name]
        assert 0.0 <= entry["accuracy"] <= 1.0
        assert len(entry["fid_per_class"]) == 10 and math.isfinite(entry["fid_class_mean"])
    assert "fid_class_mean" in metrics["validation"]  # the per-class floor
    assert (run / "figures" / "class_grid.png").is_file()
    report = (run / "report.md").read_text()
    assert "one row per requested class (0, 1, 2" in report and "guidance 1.5" in report
    assert "Data set `mnist`" in report and "| Post's FID |" in report and "6.02" in report
    header = json.loads((run / "run.json").read_text())["config"]
    assert header["unet"]["num_classes"] == 10

    # The same command again is a no-op; the unconditional model's key differs.
    assert main(["run", "--preset", "tiny", "--conditional", *common]) == 0
    assert set(_stages(capsys.readouterr().err).values()) == {"skipped"}

    # ldm sample with a label and guidance, and ldm evaluate reading the labels back.
    out = tmp_path / "sevens.npz"
    assert main(["sample", "--run-dir", str(run), "--model", "diffusion", "--sampler", "ddim",
                 "--steps", "3", "-n", "5", "--labels", "7", "--guidance", "3", "--out",
                 str(out), "--device", "cpu", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["guidance"] == 3.0
    assert list(load_samples(out)[1]) == [7] * 5  # type: ignore[arg-type]
    assert_fails(capsys, 2, "sample", "--run-dir", run, "--model", "diffusion", "--labels", "10",
                 "--out", tmp_path / "tens.npz", "--device", "cpu",
                 match="label 10 is not a class of this model (0..9)")
    assert main(["evaluate", "--samples", str(out), *common, "--quiet"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert "accuracy" in scores and scores["fid_per_class"][7] is not None
    assert scores["fid_per_class"][0] is None  # no sample asked for a 0

    # The guidance sweep: FID and accuracy per scale, its figure, and the report's table.
    assert main(["sweep", "--samplers", "ddim", "--nfe", "3", "--guidance", "1,2", "-n", "20",
                 *common, "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(summary["results"]) == {"1", "2"} and summary["report_updated"] is True
    sweep = json.loads((run / "guidance.json").read_text())
    assert all(math.isfinite(e["fid"]) and 0 <= e["accuracy"] <= 1
               for e in sweep["results"].values())
    assert (run / "figures" / "guidance.png").is_file()
    assert "Guidance: fidelity against diversity" in (run / "report.md").read_text()


# ---------------------------------------------------------------- bad input: one line, exit 2


@pytest.fixture(scope="module")
def unconditional_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(data dir, run dir) with a tiny VAE, latents and an unconditional denoiser."""
    root = tmp_path_factory.mktemp("unconditional")
    data_dir = write_dataset(root / "data", n_train=48, n_test=20)
    run = root / "run"
    common = ["--data-dir", str(data_dir), "--run-dir", str(run), "--device", "cpu", "--quiet"]
    for argv in (["train", "vae"], ["encode"], ["train", "diffusion"]):
        assert main([*argv, *common, *(["--preset", "tiny"] if "train" in argv else [])]) == 0
    return data_dir, run


SAMPLE = ["sample", "--model", "diffusion", "--sampler", "ddim", "--steps", "2", "-n", "4",
          "--device", "cpu", "--quiet"]


@pytest.mark.parametrize(("options", "match"), [
    (["--labels", "-1"], "error: label -1 is not a class: classes count from 0"),
    (["--labels", "seven"], "error: labels: expected 'balanced' or comma-separated class "
                            "indices"),
    (["--labels", "11"], "error: labels and guidance need a class-conditional model, and "),
    (["--guidance", "2"], "error: guidance needs labels to guide towards (--labels)"),
    (["--labels", "7", "--guidance", "-1"], "error: SamplingConfig.guidance must be >= 0"),
    (["--labels", "7", "--guidance", "1e30"], "error: SamplingConfig.guidance must be at most "
                                              "100, got 1e+30"),
    (["--labels", "7", "--guidance", "1e308"], "SamplingConfig.guidance must be at most 100"),
    (["--autoguidance", "1e39"], "error: SamplingConfig.autoguidance must be at most 100"),
    (["--labels", "7"], "error: labels and guidance need a class-conditional model, and "),
    (["--labels", "7", "--guidance", "3"], "is unconditional (train it with --conditional)"),
])
def test_bad_labels_and_guidance_for_sample(capsys: pytest.CaptureFixture[str],
                                            unconditional_run: tuple[Path, Path],
                                            tmp_path: Path, options: list[str],
                                            match: str) -> None:
    _, run = unconditional_run
    out = tmp_path / "x.npz"
    line = assert_fails(capsys, 2, *SAMPLE, "--run-dir", run, *options, "--out", out)
    assert match in line
    assert not out.exists() and not out.with_suffix(".png").exists()


def test_labels_on_the_vae(capsys: pytest.CaptureFixture[str],
                           unconditional_run: tuple[Path, Path], tmp_path: Path) -> None:
    _, run = unconditional_run
    assert_fails(capsys, 2, "sample", "--model", "vae", "--labels", "3", "--run-dir", run,
                 "--out", tmp_path / "x.npz", "--device", "cpu",
                 match="--labels, --guidance and --autoguidance work with --model diffusion")
    assert_fails(capsys, 2, "sample", "--model", "vae", "--reconstruct", "test", "--guidance",
                 "2", "--run-dir", run, "--out", tmp_path / "x.npz", "--device", "cpu",
                 match="--labels, --guidance and --autoguidance work with --model diffusion")
    assert not (tmp_path / "x.npz").exists()


def test_bad_guidance_sweeps_and_runs(capsys: pytest.CaptureFixture[str],
                                      unconditional_run: tuple[Path, Path]) -> None:
    data_dir, run = unconditional_run
    common = ["--data-dir", data_dir, "--run-dir", run, "--device", "cpu", "--quiet"]
    assert_fails(capsys, 2, "sweep", "--samplers", "ddim,heun", "--nfe", "4", "--guidance",
                 "1,2", *common, match="--guidance sweeps one sampler at one NFE, got 2 pairs")
    assert_fails(capsys, 2, "sweep", "--samplers", "ddim", "--nfe", "4", "--guidance", "1,x",
                 *common, match="--guidance: expected comma-separated numbers")
    assert_fails(capsys, 2, "sweep", "--samplers", "ddim", "--nfe", "4", "--guidance", "1,2",
                 *common, match="labels and guidance need a class-conditional model")
    assert not (run / "guidance.json").exists() and not (run / "cache").exists()
    assert_fails(capsys, 2, "run", "--preset", "tiny", "--guidance", "2", *common,
                 match="--guidance needs --conditional")
