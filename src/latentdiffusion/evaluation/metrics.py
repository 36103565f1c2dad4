"""Sample-quality metrics in the classifier's feature space.

- FID (Heusel et al. 2017): |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)), with moments in
  float64 and tr (S_a S_b)^(1/2) = sum sqrt(eig(S_a^(1/2) S_b S_a^(1/2))) from symmetric
  eigen-decompositions (no scipy.linalg.sqrtm).
- KID (Binkowski et al. 2018): unbiased MMD^2, cubic polynomial kernel, over seeded subsets.
- Precision / recall (Kynkaanniemi et al. 2019): k-NN balls around real / generated features.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import distributed as dist
from ..data.images import to_unit_tensor
from ..errors import DataError
from ..files import read_checked_npz, write_checked_npz

REFERENCE_SUBSET = 10_000  # real features kept for KID and precision/recall
PR_NEIGHBOURS = 3  # k of the k-NN balls of precision and recall


@dataclass(frozen=True)
class FeatureStats:
    """Count, mean (d,) and covariance (d, d) of features, all float64."""

    n: int
    mean: np.ndarray
    cov: np.ndarray

    @classmethod
    def from_features(cls, features: torch.Tensor) -> FeatureStats:
        """Sums in float64, all-reduced across ranks: each rank passes its own rows."""
        x = features.detach().to(torch.float64)
        sums = torch.cat([torch.tensor([float(len(x))], dtype=torch.float64),
                          x.sum(0), (x.T @ x).reshape(-1)])  # [n, sum x, sum x x^T]
        totals = dist.all_reduce_sum(sums.cpu()).numpy()
        n, d = int(totals[0]), x.shape[1]
        mean = totals[1:1 + d] / max(n, 1)  # zeros for an empty set (a class never drawn)
        cov = (totals[1 + d:].reshape(d, d) - n * np.outer(mean, mean)) / max(n - 1, 1)
        return cls(n, mean, cov)


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    eigenvalues, eigenvectors = np.linalg.eigh(matrix)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ eigenvectors.T


def frechet_distance(mean_a: np.ndarray, cov_a: np.ndarray, mean_b: np.ndarray,
                     cov_b: np.ndarray) -> float:
    """Frechet distance of two Gaussians; S_a^(1/2) S_b S_a^(1/2) is similar to S_a S_b."""
    diff = mean_a - mean_b
    sqrt_a = _sqrt_psd(cov_a)
    middle = sqrt_a @ cov_b @ sqrt_a
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt)


def _cube(x: np.ndarray) -> np.ndarray:
    return x * x * x  # several times faster than x ** 3 on large arrays


def kernel_inception_distance(real: np.ndarray, fake: np.ndarray, num_subsets: int = 100,
                              subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Mean and std of the unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3 over random subsets."""
    rng = np.random.default_rng(seed)
    m = min(subset_size, len(real), len(fake))
    d = real.shape[1]
    values = []
    for _ in range(num_subsets):
        x = real[rng.choice(len(real), m, replace=False)].astype(np.float64)
        y = fake[rng.choice(len(fake), m, replace=False)].astype(np.float64)
        k_xx, k_yy, k_xy = (_cube(a @ b.T / d + 1) for a, b in ((x, x), (y, y), (x, y)))
        off_diagonal = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
        values.append(off_diagonal - 2 * k_xy.mean())
    return float(np.mean(values)), float(np.std(values))


def _knn_radii(x: torch.Tensor, k: int, chunk: int = 1000) -> torch.Tensor:
    """Distance of each row to its k-th nearest other row."""
    # topk is several times faster than kthvalue on the CPU; index k skips the point itself.
    radii = [torch.cdist(x[i:i + chunk], x).topk(k + 1, dim=1, largest=False).values[:, k]
             for i in range(0, len(x), chunk)]
    return torch.cat(radii)


def _coverage(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor,
              chunk: int = 1000) -> float:
    """Fraction of points inside at least one ball (centre, radius)."""
    inside = [(torch.cdist(points[i:i + chunk], centres) <= radii[None]).any(dim=1)
              for i in range(0, len(points), chunk)]
    return float(torch.cat(inside).float().mean())


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Precision: fake inside the real manifold; recall: real inside the fake manifold."""
    real_t, fake_t = torch.from_numpy(real).float(), torch.from_numpy(fake).float()
    precision = _coverage(fake_t, real_t, _knn_radii(real_t, k))
    recall = _coverage(real_t, fake_t, _knn_radii(fake_t, k))
    return precision, recall


@torch.no_grad()
def classify(classifier: nn.Module, images: np.ndarray, device: torch.device,
             batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, H, W[, 3]) -> features (N, d) float32 and predicted classes (N,), on the CPU."""
    classifier.eval()
    features, predictions = [], []
    for start in range(0, len(images), batch_size):
        x = to_unit_tensor(images[start:start + batch_size]).to(device)
        f = classifier.features(x)  # type: ignore[operator]
        features.append(f.cpu())
        predictions.append(classifier.head(f).argmax(1).cpu())  # type: ignore[operator]
    if not features:
        raise DataError("no images to evaluate")
    return torch.cat(features), torch.cat(predictions)


@dataclass(frozen=True)
class Reference:
    """Training-set statistics, cached on disk and keyed by the classifier's hash."""

    stats: FeatureStats
    subset: np.ndarray  # (<= 10k, d) float32 real features for KID and precision/recall
    classifier_hash: str

    def save(self, path: Path) -> None:
        write_checked_npz(path, n=np.array(self.stats.n), mean=self.stats.mean,
                          cov=self.stats.cov, subset=self.subset,
                          classifier_hash=np.array(self.classifier_hash))

    @classmethod
    def load(cls, path: Path, classifier_hash: str) -> Reference | None:
        """The cached statistics of this classifier; None when missing, of another classifier
        or not as written (checksum and shapes), so they are computed again."""
        f = read_checked_npz(path)
        if f is None or set(f) != {"n", "mean", "cov", "subset", "classifier_hash"}:
            return None
        d = f["mean"].shape[-1] if f["mean"].ndim == 1 else -1
        shapes = (f["n"].shape, f["mean"].shape, f["cov"].shape, f["subset"].shape[1:])
        if str(f["classifier_hash"]) != classifier_hash or shapes != ((), (d,), (d, d), (d,)):
            return None
        return cls(FeatureStats(int(f["n"]), f["mean"], f["cov"]), f["subset"], classifier_hash)


def classify_shard(classifier: nn.Module, images: np.ndarray, device: torch.device
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Under torchrun each rank classifies its contiguous share of the images."""
    return classify(classifier, images[dist.shard_rows(len(images))], device)


def reference_from_images(classifier: nn.Module, images: np.ndarray, classifier_hash: str,
                          device: torch.device, seed: int = 0) -> Reference:
    local, _ = classify_shard(classifier, images, device)
    stats = FeatureStats.from_features(local)
    features = dist.all_gather_rows(local)
    rng = np.random.default_rng(seed)
    keep = rng.choice(len(features), min(REFERENCE_SUBSET, len(features)), replace=False)
    return Reference(stats, features.numpy()[np.sort(keep)], classifier_hash)


def data_classes(classifier: nn.Module) -> int:
    """How many of the data set's classes the feature network predicts; 0 when its task is
    not the labels (the rotation task of unlabelled data), so its predictions say nothing of
    classes."""
    config = getattr(classifier, "config", None)  # a stand-in without one has no classes
    return int(config.data_classes) if config is not None else 0


def check_images(classifier: nn.Module, images: np.ndarray, where: str) -> None:
    """DataError unless `images` have the size and channels the feature network takes."""
    config = getattr(classifier, "config", None)
    if config is None:
        return
    size, channels = config.image_size, config.image_channels
    expected = (size, size) if channels == 1 else (size, size, channels)
    if images.shape[1:] != expected:
        raise DataError(f"{where}: images are {'x'.join(map(str, images.shape[1:]))} but this "
                        f"run's models take {'x'.join(map(str, expected))}")


def evaluate_images(classifier: nn.Module, images: np.ndarray, reference: Reference,
                    labels: np.ndarray | None, device: torch.device, seed: int = 0) -> dict:
    """Every metric of one generated set against the reference; JSON-ready.

    Moments are summed across ranks in float64, so a distributed evaluation equals the
    single-process one; KID and precision/recall use the gathered features.
    """
    check_images(classifier, images, "samples")
    num_classes = data_classes(classifier)
    if labels is not None and not num_classes:
        raise DataError("this run's data set has no labels, so labelled samples cannot be scored")
    if labels is not None and len(labels) and labels.max() >= num_classes:
        raise DataError(f"labels must be classes of this run's data set (0..{num_classes - 1}), "
                        f"found {labels.max()}")
    local_features, local_predictions = classify_shard(classifier, images, device)
    stats = FeatureStats.from_features(local_features)
    features = dist.all_gather_rows(local_features)
    predictions = dist.all_gather_rows(local_predictions)
    n = len(features)  # too few for the feature dimension: checks.sample_size says so
    fake = features.numpy()
    rng = np.random.default_rng(seed)
    if len(fake) > REFERENCE_SUBSET:
        fake = fake[np.sort(rng.choice(len(fake), REFERENCE_SUBSET, replace=False))]
    real = reference.subset
    if len(real) > len(fake):  # precision/recall compare sets of equal size
        real = real[np.sort(rng.choice(len(real), len(fake), replace=False))]
    notes = {}
    fid: float | None = None
    kid_mean: float | None = None
    kid_std: float | None = None
    if n >= 2:  # a covariance, and KID's pairs of distinct samples, need two
        fid = frechet_distance(stats.mean, stats.cov, reference.stats.mean, reference.stats.cov)
        kid_mean, kid_std = kernel_inception_distance(reference.subset, features.numpy(),
                                                      seed=seed)
    else:
        notes["fid_note"] = notes["kid_note"] = "needs at least 2 images"
    precision: float | None = None
    recall: float | None = None
    if len(fake) > PR_NEIGHBOURS:  # each point needs k other points
        precision, recall = precision_recall(real, fake, PR_NEIGHBOURS)
    else:
        notes["precision_recall_note"] = f"needs at least {PR_NEIGHBOURS + 1} images"
    result: dict[str, Any] = {
        "n": n,
        "fid": fid,
        "kid_mean": kid_mean,
        "kid_std": kid_std,
        "precision": precision,
        "recall": recall,
        "class_histogram": None,  # no classes: the feature network's task is not the labels
        "class_entropy_bits": None,
        "classifier_hash": reference.classifier_hash,
        **notes,
    }
    if num_classes:
        counts = np.bincount(predictions.numpy(), minlength=num_classes)[:num_classes]
        histogram = counts / max(counts.sum(), 1)
        nonzero = histogram[histogram > 0]
        result["class_histogram"] = [round(float(h), 6) for h in histogram]
        result["class_entropy_bits"] = float(-(nonzero * np.log2(nonzero)).sum()) + 0.0  # no -0.0
        if labels is not None:
            result["accuracy"] = float((predictions.numpy() == labels).mean())
    return result


def random_images(train_images: np.ndarray, n: int, seed: int) -> np.ndarray:
    """The post's Random row: Gaussian pixels with the training set's mean and std, clipped."""
    mean, std = float(train_images.mean()), float(train_images.std())
    noise = np.random.default_rng(seed).normal(mean, std, size=(n, *train_images.shape[1:]))
    return noise.round().clip(0, 255).astype(np.uint8)
