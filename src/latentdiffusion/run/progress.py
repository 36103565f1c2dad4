"""The progress grids of the stages that make images, R/figures/progress/<stage>-<step>.png:
the VAE's reconstructions of fixed test images, a denoiser's decoded samples from fixed noise
with the run's sampler; and the denoiser's cheap FID and KID of `score_samples` such samples
against the run's cached reference statistics (the feature network's training-set ones)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data.images import to_uint8, to_unit_tensor
from ..diffusion.objective import Objective
from ..evaluation import plots
from ..evaluation.metrics import (
    FeatureStats,
    Reference,
    classify,
    frechet_distance,
    kernel_inception_distance,
)
from ..models import VAE, Classifier
from ..rng import generator, randn
from . import checkpoint, generation
from .config import SamplingConfig
from .monitor import MonitorConfig, Show, StageWatch
from .precision import autocast
from .rundir import RunDir
from .trainlog import TrainLog, check_log, check_tensorboard, read_log

GRID_ROWS = GRID_COLS = 8  # a progress grid: 64 images
RECONSTRUCTED = 32  # the VAE's grid: 4 rows of reconstructions over 4 rows of their originals
TRAINED_STAGES = ("classifier", "vae", "diffusion", "guide")  # each with a log
KID_SUBSETS = 10  # KID's subsets of min(N, 1000) pairs while training (the evaluation's: 100)


def _save(run: RunDir, name: str, step: int, images: np.ndarray,
          train_log: TrainLog) -> dict[str, Any]:
    """Write the grid; its path (relative to the run directory) for the log line."""
    grid = plots.tile(images, GRID_ROWS, GRID_COLS)
    path = run.progress(name, step)
    plots.save_image(grid, path)
    train_log.image(step, grid)
    return {"grid": path.relative_to(run.root).as_posix()}


def reconstructions(run: RunDir, name: str, test_images: np.ndarray, train_log: TrainLog,
                    autoencoder: Callable[[nn.Module], nn.Module] | None = None) -> Show:
    """The VAE's grid: its reconstructions (decoded posterior means) of the first test images
    over the images themselves; `autoencoder` picks the VAE out of a training wrapper."""
    originals = test_images[:RECONSTRUCTED]
    inputs = to_unit_tensor(originals)  # (32, C, H, W)

    def show(model: nn.Module, step: int) -> dict[str, Any]:
        vae = autoencoder(model) if autoencoder is not None else model
        device = next(vae.parameters()).device
        mean, _ = vae.encode(inputs.to(device))  # type: ignore[operator]
        decoded = to_uint8(vae.decode(mean))  # type: ignore[operator]
        return _save(run, name, step, np.concatenate([decoded, originals]), train_log)

    return show


@dataclass(frozen=True)
class Scorer:
    """The run's feature network and its training-set statistics (scores.reference)."""

    classifier: Classifier
    reference: Reference

    def __call__(self, images: np.ndarray, device: torch.device) -> dict[str, Any]:
        features, _ = classify(self.classifier, images, device)  # (N, d)
        stats = FeatureStats.from_features(features)
        fid = frechet_distance(stats.mean, stats.cov, self.reference.stats.mean,
                               self.reference.stats.cov)
        kid, _ = kernel_inception_distance(self.reference.subset, features.numpy(),
                                           num_subsets=KID_SUBSETS)
        return {"fid": fid, "kid": kid, "score_n": len(images)}


def samples(run: RunDir, name: str, objective: Objective, data_mean: torch.Tensor,
            shift: tuple[float, ...], scale: tuple[float, ...], sampling: SamplingConfig,
            config: MonitorConfig, train_log: TrainLog, scorer: Scorer | None) -> Show:
    """A denoiser's grid: decoded samples from fixed noise with the run's first sampler, not
    autoguided (the guide trains after the denoiser); with `scorer`, their FID and KID."""
    request = dataclasses.replace(sampling, autoguidance=1.0).requests[0]
    count = max(GRID_ROWS * GRID_COLS, config.score_samples if scorer else 0)
    labelled = functools.partial(objective.denoiser, data_mean=data_mean, labelled=True)

    @functools.cache
    def vae() -> VAE:
        return checkpoint.load_model(run.model("vae"), VAE, data_mean.device)[0]

    def show(unet: nn.Module, step: int) -> dict[str, Any]:
        device = data_mean.device
        denoiser = objective.denoiser(unet, data_mean)
        chunks = []
        for start in range(0, count, sampling.batch_size):
            indices = list(range(start, min(start + sampling.batch_size, count)))
            generators = [generator(config.seed, i) for i in indices]  # the same at every grid
            x_T = randn((len(indices), *data_mean.shape), generators, device)  # (B, C, S, S)
            with autocast(sampling.precision, device):  # as the sample stage samples
                chunks.append(generation.decoded_samples(
                    vae(), unet, denoiser, labelled, request, x_T,  # type: ignore[arg-type]
                    generators, indices, shift, scale))
        images = np.concatenate(chunks)
        found = _save(run, name, step, images[:GRID_ROWS * GRID_COLS], train_log)
        if scorer is None:
            return found
        return {**found, **scorer(images[:config.score_samples], device)}

    return show


@dataclass
class RunWatch:
    """How a run shows its stages' progress: `ldm run` and `ldm train` make one, and each
    training stage asks it for its StageWatch. `scorer` scores the denoiser's grids (None:
    grids only)."""

    config: MonitorConfig
    run: RunDir
    sampling: SamplingConfig
    scorer: Scorer | None = None

    def check(self, names: tuple[str, ...]) -> None:
        """Before any stage runs: each named stage's log reads and can be written, and
        TensorBoard imports when it is asked for (one-line errors)."""
        for name in names:
            check_log(self.run.log(name))
        if self.config.tensorboard:
            check_tensorboard()

    def stage(self, name: str, show: Callable[[TrainLog], Show] | None = None) -> StageWatch:
        """`name`'s log, and its grid made by `show` (given the log, for TensorBoard)."""
        train_log = TrainLog(self.run.log(name), self.config.tensorboard)
        return StageWatch(self.config, train_log, show(train_log) if show else None)

    def vae(self, test_images: np.ndarray,
            autoencoder: Callable[[nn.Module], nn.Module] | None) -> StageWatch:
        return self.stage("vae", lambda train_log: reconstructions(
            self.run, "vae", test_images, train_log, autoencoder))

    def denoiser(self, name: str, objective: Objective, data_mean: torch.Tensor,
                 shift: tuple[float, ...], scale: tuple[float, ...]) -> StageWatch:
        """The denoiser's (scored) or its guide's (grids only) watch."""
        scorer = self.scorer if name == "diffusion" else None
        return self.stage(name, lambda train_log: samples(
            self.run, name, objective, data_mean, shift, scale, self.sampling, self.config,
            train_log, scorer))


def cached_scorer(run: RunDir, device: torch.device) -> Scorer | None:
    """The run's feature network with the reference statistics an earlier evaluation cached;
    None when either is missing (`ldm train diffusion` has no data set to compute them)."""
    path = run.model("classifier")
    if checkpoint.peek(path) is None:
        return None
    classifier, header = checkpoint.load_model(path, Classifier, device)
    digest = checkpoint.model_hash_of(header)
    reference = Reference.load(run.reference(digest), digest)
    return Scorer(classifier, reference) if reference is not None else None


MAX_FIGURE_ROWS = 16  # of a stage's grids-over-time figure: the last and evenly spread others


def save_figures(run: RunDir, image_size: int) -> None:
    """From the stages' logs: R/figures/curves.png (loss and FID against step) and for each
    stage with grids R/figures/progress-<stage>.png (the first row of each grid the log names,
    one row per step; the VAE's ends with the test images it reconstructs)."""
    logs = {name: read_log(run.log(name), warn=False) for name in TRAINED_STAGES}
    if any(logs.values()):
        plots.save_curves(logs, run.figures / "curves.png")
    for name, records in logs.items():
        grids = [(r["step"], run.root / r["grid"]) for r in records
                 if isinstance(r.get("grid"), str) and (run.root / r["grid"]).exists()]
        if not grids:
            continue
        shown = [grids[round(i)] for i in np.linspace(0, len(grids) - 1,
                                                       min(len(grids), MAX_FIGURE_ROWS))]
        rows = [(f"step {step}", plots.grid_row(path, 0, image_size)) for step, path in shown]
        if name == "vae":
            rows.append(("test images", plots.grid_row(shown[-1][1], RECONSTRUCTED // GRID_COLS,
                                                       image_size)))
        plots.save_progress(rows, run.figures / f"progress-{name}.png")
