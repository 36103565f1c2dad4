"""Scoring generated images against a run's classifier (its feature network), with the
training-set statistics (the FID reference, overall and per class) cached in the run directory
by classifier hash."""

from __future__ import annotations

import numpy as np
import torch

from . import checkpoint
from . import distributed as dist
from .classwise import ClassReference, class_fids
from .classwise import class_reference as class_reference_from_images
from .datasets import Dataset
from .errors import UsageError
from .metrics import Reference, evaluate_images, reference_from_images
from .models import Classifier
from .rundir import RunDir


def reference(dataset: Dataset, run: RunDir, device: torch.device
              ) -> tuple[Classifier, Reference]:
    """The run's classifier and the training-set statistics, cached by classifier hash."""
    classifier, header = checkpoint.load_model(run.model("classifier"), Classifier, device)
    dataset.check_trained_on(header, run.model("classifier"))
    digest = checkpoint.model_hash_of(header)
    cached = Reference.load(run.reference(digest), digest)
    if cached is None:
        cached = reference_from_images(classifier, dataset.train_images, digest, device)
        if dist.is_main():
            cached.save(run.reference(digest))
    return classifier, cached


def class_reference(dataset: Dataset, run: RunDir, classifier: Classifier,
                    device: torch.device) -> ClassReference:
    """The training-set statistics of each class, cached by classifier hash."""
    digest = checkpoint.model_hash_of(checkpoint.load(run.model("classifier"),
                                                      kind="classifier")[1])
    cached = ClassReference.load(run.class_reference(digest), digest)
    if cached is None:
        if dataset.train_labels is None:
            raise UsageError(f"{dataset.name} has no labels: no FID per class")
        cached = class_reference_from_images(classifier, dataset.train_images,
                                             dataset.train_labels, digest, device)
        if dist.is_main():
            cached.save(run.class_reference(digest))
    return cached


def evaluate(dataset: Dataset, run: RunDir, images: np.ndarray,
             labels: np.ndarray | None, *, device: torch.device, seed: int = 0) -> dict:
    """Every metric of one set; with labels (of a labelled data set) also its accuracy and FID
    per class."""
    classifier, ref = reference(dataset, run, device)
    result = evaluate_images(classifier, images, ref, labels, device, seed=seed)
    if labels is not None and "accuracy" in result:
        classes = class_reference(dataset, run, classifier, device)
        result.update(class_fids(classifier, images, labels, classes, device))
    return result


def validation_rows(count: int, n: int) -> np.ndarray:
    """Indices of the `n` of `count` test images a run scores (the Validation and
    reconstruction rows): all of them when n >= count, else a fixed random subset in file
    order, since a data set sorted by class (an image folder) would otherwise be scored on its
    first classes only."""
    if n >= count:
        return np.arange(count)
    return np.sort(np.random.default_rng(0).choice(count, n, replace=False))


def scored_subset(images: np.ndarray, labels: np.ndarray | None, n: int
                  ) -> tuple[np.ndarray, np.ndarray | None]:
    """The `n` rows of a test-set-ordered set that a run scores (validation_rows), with their
    labels when there are any."""
    rows = validation_rows(len(images), n)
    return images[rows], None if labels is None else labels[rows]
