"""Scoring a run's sets against its classifier (the feature network), with the training-set
statistics (the FID reference, overall and per class) cached in the run directory by
classifier hash: `ldm evaluate` and the evaluate stage of `ldm run`."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .. import distributed as dist
from ..data import Dataset
from ..errors import UsageError
from ..evaluation.classwise import ClassReference, class_fids
from ..evaluation.classwise import class_reference as class_reference_from_images
from ..evaluation.metrics import Reference, data_classes, evaluate_images, reference_from_images
from ..evaluation.samples import load_samples
from ..files import write_json
from ..models import Classifier
from . import checkpoint
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
    digest = checkpoint.model_hash_at(run.model("classifier"), "classifier")
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


def evaluate_all(run: RunDir, dataset: Dataset, sets: list[str],
                  eval_samples: int, device: torch.device, per_class: bool = False) -> str:
    """Every set's metrics into R/metrics.json; with `per_class` (a conditional run), also the
    FID of each class of every labelled set (Validation's is their floor)."""
    classifier, ref = reference(dataset, run, device)  # loaded once for all sets
    classes = class_reference(dataset, run, classifier, device) if per_class else None
    results: dict[str, Any] = {}

    def score(images: np.ndarray, labels: np.ndarray | None) -> dict[str, Any]:
        result = evaluate_images(classifier, images, ref, labels, device)
        if classes is not None and labels is not None:
            result.update(class_fids(classifier, images, labels, classes, device))
        return result

    for name in sets:
        results[name] = score(*load_samples(run.samples(name)))
    # The reconstruction row's eval_samples test images: FID is biased upwards at small N, so
    # Validation must have the N of the rows it is the floor of.
    test_images, test_labels = dataset.split("test")
    if not data_classes(classifier):
        test_labels = None
    results["validation"] = score(*scored_subset(test_images, test_labels,
                                                            eval_samples))
    floor = results["validation"]["fid"]
    for entry in results.values():
        entry["fid_over_validation"] = entry["fid"] / floor if floor > 0 else float("inf")
    if dist.is_main():
        write_json(run.root / "metrics.json", results)
    return ", ".join(f"{k} FID {v['fid']:.3g}" for k, v in results.items())
