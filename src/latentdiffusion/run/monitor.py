"""Watching a stage learn: what `fit` does besides training. Every `log_every` steps a line of
the stage's log (trainlog.py); every `sample_every` steps (and at the last) a grid from fixed
inputs with, for the denoiser, a cheap FID and KID (progress.py), all from the EMA weights.

Nothing there draws from the training's random streams (fixed generators, and the global RNG
is forked around each grid), so the trained weights are the same to the last bit with the
monitor on or off: it is no part of any stage key.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import UsageError
from ..schema import MAX_SAMPLES, check_fields
from .trainlog import TrainLog


@dataclass(frozen=True)
class MonitorConfig:
    """What a run shows while it trains; it changes no trained number (in no stage key)."""

    log_every: int = 50  # steps per line of R/logs/<stage>.jsonl (and at each grid, the last)
    samples: bool = True  # progress grids, and the denoiser's scores
    sample_every: int = 1000  # steps between grids (and one after the last step)
    sample_at_epoch_end: bool = False  # a grid after each pass over the data as well
    score_samples: int = 1000  # N of the denoiser's FID and KID at each grid (0: no score)
    tensorboard: bool = False  # also TensorBoard event files (the `tensorboard` extra)
    seed: int = 0  # of the grids' fixed noise

    def __post_init__(self) -> None:
        check_fields(self, positive=("log_every", "sample_every"),
                     nonnegative=("score_samples", "seed"))
        if self.score_samples == 1 or self.score_samples > MAX_SAMPLES:
            raise UsageError(f"MonitorConfig.score_samples must be 0 or 2 to {MAX_SAMPLES}, "
                             f"got {self.score_samples}")

    def grid_due(self, step: int, steps_per_epoch: int, total_steps: int) -> bool:
        """Whether a grid (and score) is taken after optimizer step `step` (1-based)."""
        if not self.samples:
            return False
        return (step == total_steps or step % self.sample_every == 0
                or (self.sample_at_epoch_end and step % steps_per_epoch == 0))


Show = Callable[[nn.Module, int], dict[str, Any]]  # (EMA model, step) -> the grid's scores


@dataclass
class StageWatch:
    """What `fit` does at a stage's log lines and grids: `show` draws the grid (None: the
    stage makes no images, the classifier)."""

    config: MonitorConfig
    log: TrainLog
    show: Show | None = None

    def grid(self, model: nn.Module, step: int) -> dict[str, Any]:
        """The grid of `model` (train/eval mode and the global RNG left as they were)."""
        if self.show is None:
            return {}
        was_training = model.training
        model.eval()
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            scores = self.show(model, step)
        model.train(was_training)
        return scores


