"""Scoring generated digits against a run's classifier, with the training-set statistics
(the FID reference, overall and per class) cached in the run directory by classifier hash."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import checkpoint, data
from . import distributed as dist
from .classwise import ClassReference, class_fids
from .classwise import class_reference as class_reference_from_images
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


def class_reference(data_dir: str | Path | None, run: RunDir, classifier: Classifier,
                    device: torch.device) -> ClassReference:
    """The training-set statistics of each class, cached by classifier hash."""
    digest = checkpoint.model_hash_of(checkpoint.load(run.model("classifier"),
                                                      kind="classifier")[1])
    cached = ClassReference.load(run.class_reference(digest), digest)
    if cached is None:
        images, labels = data.load_split(data_dir, "train")
        cached = class_reference_from_images(classifier, images, labels, digest, device)
        if dist.is_main():
            cached.save(run.class_reference(digest))
    return cached


def evaluate(data_dir: str | Path | None, run: RunDir, images: np.ndarray,
             labels: np.ndarray | None, *, device: torch.device, seed: int = 0) -> dict:
    """Every metric of one set; with labels also its accuracy and FID per class."""
    classifier, ref = reference(data_dir, run, device)
    result = evaluate_images(classifier, images, ref, labels, device, seed=seed)
    if labels is not None:
        classes = class_reference(data_dir, run, classifier, device)
        result.update(class_fids(classifier, images, labels, classes, device))
    return result
