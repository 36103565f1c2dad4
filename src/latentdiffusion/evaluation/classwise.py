"""FID per class: each class of a labelled set against that class's training images.

A conditional model asked for a 7 should draw the 7s of the training set, not just any image
the classifier calls a 7: the per-class FID compares the features of the samples that asked for
class c with the statistics of the training images labelled c, and `fid_class_mean` is their mean
over the classes present. The per-class statistics are cached beside the global reference, keyed
by the classifier's hash.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import distributed as dist
from ..files import read_checked_npz, write_checked_npz
from .metrics import FeatureStats, classify_shard, data_classes, frechet_distance


@dataclass(frozen=True)
class ClassReference:
    """Per-class counts (K,), feature means (K, d) and covariances (K, d, d), float64."""

    counts: np.ndarray
    means: np.ndarray
    covs: np.ndarray
    classifier_hash: str

    def save(self, path: Path) -> None:
        write_checked_npz(path, counts=self.counts, means=self.means, covs=self.covs,
                          classifier_hash=np.array(self.classifier_hash))

    @classmethod
    def load(cls, path: Path, classifier_hash: str) -> ClassReference | None:
        """The cached statistics of this classifier; None when missing, of another classifier
        or not as written (checksum and shapes), so they are computed again."""
        f = read_checked_npz(path)
        if f is None or set(f) != {"counts", "means", "covs", "classifier_hash"}:
            return None
        k, d = f["means"].shape if f["means"].ndim == 2 else (-1, -1)
        if (str(f["classifier_hash"]) != classifier_hash
                or (f["counts"].shape, f["covs"].shape) != ((k,), (k, d, d))):
            return None
        return cls(f["counts"], f["means"], f["covs"], classifier_hash)


def _class_stats(features: torch.Tensor, labels: torch.Tensor,
                 num_classes: int) -> list[FeatureStats]:
    """FeatureStats of each class of this rank's (n, d) features, summed over ranks."""
    return [FeatureStats.from_features(features[labels == c]) for c in range(num_classes)]


def _labels_shard(labels: np.ndarray) -> torch.Tensor:
    return torch.tensor(np.asarray(labels, dtype=np.int64)[dist.shard_rows(len(labels))])


def class_reference(classifier: nn.Module, images: np.ndarray, labels: np.ndarray,
                    classifier_hash: str, device: torch.device) -> ClassReference:
    """The per-class statistics of labelled (training) images."""
    features, _ = classify_shard(classifier, images, device)
    stats = _class_stats(features, _labels_shard(labels), data_classes(classifier))
    return ClassReference(np.array([s.n for s in stats]), np.stack([s.mean for s in stats]),
                          np.stack([s.cov for s in stats]), classifier_hash)


def class_fids(classifier: nn.Module, images: np.ndarray, labels: np.ndarray,
               reference: ClassReference, device: torch.device) -> dict[str, object]:
    """`fid_per_class` (K,), None for a class with fewer than 2 samples, and their mean."""
    features, _ = classify_shard(classifier, images, device)
    stats = _class_stats(features, _labels_shard(labels), len(reference.counts))
    per_class: list[float | None] = []
    for c, s in enumerate(stats):
        if s.n < 2 or reference.counts[c] < 2:
            per_class.append(None)
            continue
        per_class.append(frechet_distance(s.mean, s.cov, reference.means[c], reference.covs[c]))
    present = [f for f in per_class if f is not None]
    return {"fid_per_class": per_class,
            "fid_class_mean": float(np.mean(present)) if present else None}
