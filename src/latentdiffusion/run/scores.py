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
from ..evaluation import checks
from ..evaluation.classwise import ClassReference, class_fids
from ..evaluation.classwise import class_reference as class_reference_from_images
from ..evaluation.memorisation import memorisation
from ..evaluation.metrics import (
    Reference,
    classify,
    data_classes,
    evaluate_images,
    reference_from_images,
)
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
             labels: np.ndarray | None, *, device: torch.device, seed: int = 0,
             nearest: bool = False) -> dict:
    """Every metric of one set, and the checks that say when they cannot be trusted
    (`warnings`); with labels (of a labelled data set) also its accuracy and FID per class;
    with `nearest`, how close the set comes to the training images (`memorisation`)."""
    classifier, ref = reference(dataset, run, device)
    result = evaluate_images(classifier, images, ref, labels, device, seed=seed)
    if labels is not None and "accuracy" in result:
        classes = class_reference(dataset, run, classifier, device)
        result.update(class_fids(classifier, images, labels, classes, device))
    findings = [feature_network_check(run),
                checks.collapse("samples", images, dataset.test_images),
                checks.sample_size("samples", result["n"], ref.stats.mean.shape[0])]
    result["warnings"] = [f.as_dict() for f in findings if f is not None]
    if nearest:
        result["memorisation"] = memorisation_of(classifier, images, dataset, device)
        found = checks.copies(result["memorisation"])
        result["warnings"] += [found.as_dict()] if found else []
    return result


def feature_network_check(run: RunDir) -> checks.Finding | None:
    """The run's feature network: its last held-out accuracy on its own task against chance."""
    header = checkpoint.load(run.model("classifier"), kind="classifier")[1]
    history = header.get("history") or [{}]
    accuracy = history[-1].get("val_accuracy")
    if accuracy is None:
        return None
    config = header["config"]
    return checks.feature_network(float(accuracy), int(config["num_classes"]),
                                  str(config.get("task", "labels")))


def memorisation_of(classifier: Classifier, images: np.ndarray, dataset: Dataset,
                    device: torch.device, train_limit: int = 0) -> dict[str, Any]:
    """Nearest training images of `images` and of the test images in the classifier's feature
    space; the training images are the first `train_limit` (0: all), those a denoiser with
    that limit saw."""
    train = dataset.train_images[:train_limit] if train_limit else dataset.train_images
    features = [classify(classifier, x, device)[0].numpy()
                for x in (images, dataset.test_images, train)]
    return memorisation(*features)


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


def evaluate_all(run: RunDir, dataset: Dataset, sets: list[str], eval_samples: int,
                 device: torch.device, per_class: bool = False, train_limit: int = 0) -> str:
    """Every set's metrics into R/metrics.json, with the checks of the evaluation (`warnings`)
    and the memorisation check of the first diffusion set; with `per_class` (a conditional
    run), also the FID of each class of every labelled set (Validation's is their floor)."""
    classifier, ref = reference(dataset, run, device)  # loaded once for all sets
    classes = class_reference(dataset, run, classifier, device) if per_class else None
    results: dict[str, Any] = {}
    loaded: dict[str, np.ndarray] = {}

    def score(name: str, images: np.ndarray, labels: np.ndarray | None) -> None:
        result = evaluate_images(classifier, images, ref, labels, device)
        if classes is not None and labels is not None:
            result.update(class_fids(classifier, images, labels, classes, device))
        results[name], loaded[name] = result, images

    for name in sets:
        score(name, *load_samples(run.samples(name)))
    # The reconstruction row's eval_samples test images: FID is biased upwards at small N, so
    # Validation must have the N of the rows it is the floor of.
    test_images, test_labels = dataset.split("test")
    if not data_classes(classifier):
        test_labels = None
    score("validation", *scored_subset(test_images, test_labels, eval_samples))
    floor = results["validation"]["fid"]
    for entry in results.values():
        entry["fid_over_validation"] = entry["fid"] / floor if floor > 0 else float("inf")
    findings: list[checks.Finding | None] = [*_checks(run, results, loaded,
                                                      ref.stats.mean.shape[0])]
    metrics: dict[str, Any] = dict(results)
    generated = [name for name in sets if name not in BASELINE_SETS]
    if generated:
        metrics["memorisation"] = {"set": generated[0], **memorisation_of(
            classifier, loaded[generated[0]], dataset, device, train_limit)}
        findings.append(checks.copies(metrics["memorisation"]))
    metrics["warnings"] = [f.as_dict() for f in findings if f is not None]
    if dist.is_main():
        write_json(run.root / "metrics.json", metrics)
    return ", ".join(f"{k} FID {v['fid']:.3g}" for k, v in results.items())


BASELINE_SETS = ("random", "vae-prior", "vae-reconstruction")


def _checks(run: RunDir, results: dict[str, Any], images: dict[str, np.ndarray],
            feature_dim: int) -> list[checks.Finding]:
    """Every check of one run's evaluation, in the order a reader should see them."""
    data = images["validation"]
    found = [feature_network_check(run),
             checks.random_row({name: r["fid"] for name, r in results.items()})]
    found += [checks.collapse(name, x, data) for name, x in images.items()
              if name not in (*checks.BASELINES, "vae-reconstruction")]
    if "vae-reconstruction" in images:
        found.append(checks.flat_reconstructions(images["vae-reconstruction"], data))
    found += [checks.sample_size(name, r["n"], feature_dim) for name, r in results.items()]
    return [f for f in found if f is not None]
