"""Scoring generated digits against a run's classifier, with the training-set statistics
(the FID reference) cached in the run directory by classifier hash."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import checkpoint, data
from . import distributed as dist
from .metrics import Reference, evaluate_images, reference_from_images
from .models import Classifier
from .rundir import RunDir


def reference(data_dir: str | Path | None, run: RunDir, device: torch.device
              ) -> tuple[Classifier, Reference]:
    """The run's classifier and the training-set statistics, cached by classifier hash."""
    classifier, header = checkpoint.load_model(run.model("classifier"), Classifier, device)
    digest = checkpoint.model_hash_of(header)
    cached = Reference.load(run.reference(digest), digest)
    if cached is None:
        cached = reference_from_images(classifier, data.load_split(data_dir, "train")[0], digest,
                                       device)
        if dist.is_main():
            cached.save(run.reference(digest))
    return classifier, cached


def evaluate(data_dir: str | Path | None, run: RunDir, images: np.ndarray,
             labels: np.ndarray | None, *, device: torch.device, seed: int = 0) -> dict:
    classifier, ref = reference(data_dir, run, device)
    return evaluate_images(classifier, images, ref, labels, device, seed=seed)
