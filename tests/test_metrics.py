"""Metrics against known answers and direct computations; samples-file validation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from latentdiffusion.errors import DataError
from latentdiffusion.evaluation.metrics import (
    FeatureStats,
    Reference,
    evaluate_images,
    frechet_distance,
    kernel_inception_distance,
    precision_recall,
    random_images,
    reference_from_images,
)
from latentdiffusion.evaluation.samples import load_samples
from latentdiffusion.models.classifier import ClassifierConfig


def _spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


# ---------------------------------------------------------------- FID


def test_fid_of_identical_statistics_is_zero() -> None:
    rng = np.random.default_rng(0)
    mean, cov = rng.normal(size=12), _spd(rng, 12)
    assert abs(frechet_distance(mean, cov, mean, cov)) < 1e-6


def test_fid_with_equal_covariances_is_squared_mean_distance() -> None:
    rng = np.random.default_rng(1)
    cov = _spd(rng, 10)
    mean_a, mean_b = rng.normal(size=10), rng.normal(size=10)
    expected = float(((mean_a - mean_b) ** 2).sum())
    assert frechet_distance(mean_a, cov, mean_b, cov) == pytest.approx(expected, abs=1e-6)


def test_fid_of_diagonal_gaussians() -> None:
    # Commuting covariances: tr(A + B - 2 (AB)^(1/2)) = sum (sqrt a_i - sqrt b_i)^2.
    a, b = np.array([1.0, 4.0, 9.0, 0.25]), np.array([4.0, 1.0, 9.0, 1.0])
    mean_a, mean_b = np.zeros(4), np.array([0.0, 1.0, 0.0, 2.0])
    expected = 5.0 + float(((np.sqrt(a) - np.sqrt(b)) ** 2).sum())  # 5 = 1^2 + 2^2
    assert frechet_distance(mean_a, np.diag(a), mean_b, np.diag(b)) == pytest.approx(expected)


def test_fid_matches_scipy_sqrtm_and_is_symmetric() -> None:
    rng = np.random.default_rng(2)
    d = 8
    mean_a, mean_b = rng.normal(size=d), rng.normal(size=d)
    cov_a, cov_b = _spd(rng, d), _spd(rng, d)
    covmean = scipy.linalg.sqrtm(cov_a @ cov_b).real
    expected = float(((mean_a - mean_b) ** 2).sum()
                     + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean))
    assert expected > 1.0  # a case where a wrong trace term would show
    assert frechet_distance(mean_a, cov_a, mean_b, cov_b) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(mean_b, cov_b, mean_a, cov_a) == pytest.approx(expected, rel=1e-8)


def test_fid_of_rank_deficient_covariances_is_finite_and_non_negative() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(5, 12))  # 5 samples in 12-d: covariance of rank 4
    stats = FeatureStats.from_features(torch.from_numpy(x))
    value = frechet_distance(stats.mean, stats.cov, stats.mean, stats.cov)
    assert np.isfinite(value) and abs(value) < 1e-6


def test_feature_stats_match_numpy() -> None:
    rng = np.random.default_rng(4)
    x = (rng.normal(size=(50, 6)) * [1, 2, 3, 4, 5, 6] + 10).astype(np.float32)
    stats = FeatureStats.from_features(torch.from_numpy(x))
    assert stats.n == 50
    assert stats.mean.dtype == np.float64 and stats.cov.shape == (6, 6)
    np.testing.assert_allclose(stats.mean, x.astype(np.float64).mean(0), rtol=1e-10)
    np.testing.assert_allclose(stats.cov, np.cov(x.astype(np.float64), rowvar=False),
                               rtol=1e-8, atol=1e-10)


# ---------------------------------------------------------------- KID


def _mmd_loops(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3, written out pair by pair."""
    m, d = len(x), x.shape[1]

    def k(a: np.ndarray, b: np.ndarray) -> float:
        return float((a @ b / d + 1) ** 3)

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_matches_the_pairwise_formula() -> None:
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(9, 3)), rng.normal(loc=0.3, size=(9, 3))
    # One subset of every row: MMD^2 does not depend on the order the rows are drawn in.
    mean, std = kernel_inception_distance(x, y, num_subsets=1, subset_size=9)
    assert mean == pytest.approx(_mmd_loops(x, y), rel=1e-10)
    assert std == 0.0


def test_kid_near_zero_for_same_distribution_and_positive_when_shifted() -> None:
    rng = np.random.default_rng(6)
    real = rng.normal(size=(400, 16)).astype(np.float32)
    same = rng.normal(size=(400, 16)).astype(np.float32)
    same_mean, same_std = kernel_inception_distance(real, same, num_subsets=10,
                                                    subset_size=200)
    shifted_mean, _ = kernel_inception_distance(real, same + 0.5, num_subsets=10,
                                                subset_size=200)
    assert abs(same_mean) < 0.05 and same_std < 0.05
    assert shifted_mean > 0.5
    # Seeded: the same call gives the same numbers.
    assert kernel_inception_distance(real, same, num_subsets=10, subset_size=200) \
        == (same_mean, same_std)


# ---------------------------------------------------------------- precision / recall


def test_precision_recall_same_distribution_near_one() -> None:
    rng = np.random.default_rng(7)
    real = rng.normal(size=(400, 2)).astype(np.float32)
    fake = rng.normal(size=(400, 2)).astype(np.float32)
    precision, recall = precision_recall(real, fake)
    assert precision > 0.9 and recall > 0.9
    assert precision_recall(real, real) == (1.0, 1.0)


def test_precision_recall_disjoint_sets_are_zero() -> None:
    rng = np.random.default_rng(8)
    real = rng.normal(size=(100, 4)).astype(np.float32)
    assert precision_recall(real, real + 50) == (0.0, 0.0)


def test_precision_without_recall_for_a_collapsed_generator() -> None:
    rng = np.random.default_rng(9)
    real = rng.normal(size=(300, 2)).astype(np.float32)
    fake = real[np.argsort(np.linalg.norm(real, axis=1))[:100]]  # only the densest third
    precision, recall = precision_recall(real, fake)
    assert precision == 1.0  # every generated point is a real point
    assert recall < 0.6  # but most of the real set is not covered


# ---------------------------------------------------------------- evaluate_images


class _PixelFeatures(nn.Module):
    """A stand-in classifier: features are 8 mean intensities of row bands."""

    def __init__(self, task: str = "labels") -> None:
        super().__init__()
        self.config = ClassifierConfig(task=task, num_classes=10 if task == "labels" else 4)  # type: ignore[arg-type]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0, :24].reshape(len(x), 8, 3 * 28).mean(-1)

    def head(self, f: torch.Tensor) -> torch.Tensor:
        return torch.cat([f, torch.zeros(len(f), 2)], dim=1)  # class = brightest band


def test_evaluate_images_against_its_own_reference() -> None:
    rng = np.random.default_rng(10)
    images = rng.integers(0, 256, size=(120, 28, 28)).astype(np.uint8)
    classifier = _PixelFeatures()
    reference = reference_from_images(classifier, images, "abc", torch.device("cpu"))
    assert reference.stats.n == 120 and reference.subset.shape == (120, 8)
    labels = classifier.head(classifier.features(
        torch.from_numpy(images).float().div(255).unsqueeze(1))).argmax(1).numpy()
    result = evaluate_images(classifier, images, reference, labels, torch.device("cpu"))
    assert result["n"] == 120 and result["classifier_hash"] == "abc"
    assert abs(result["fid"]) < 1e-6
    assert result["precision"] == 1.0 and result["recall"] == 1.0
    assert result["accuracy"] == 1.0
    assert sum(result["class_histogram"]) == pytest.approx(1.0)
    assert result["class_histogram"][8:] == [0.0, 0.0]
    dark = (images // 4).astype(np.uint8)
    worse = evaluate_images(classifier, dark, reference, None, torch.device("cpu"))
    assert worse["fid"] > 0.01 and "accuracy" not in worse
    assert worse["kid_mean"] > result["kid_mean"]


def test_evaluate_images_checks_shape_and_classes() -> None:
    images = np.random.default_rng(12).integers(0, 256, size=(20, 28, 28)).astype(np.uint8)
    labelled, unlabelled = _PixelFeatures(), _PixelFeatures("rotation")
    cpu = torch.device("cpu")
    reference = reference_from_images(labelled, images, "abc", cpu)
    with pytest.raises(DataError, match="images are 32x32x3 but this run's models take 28x28"):
        evaluate_images(labelled, np.zeros((4, 32, 32, 3), np.uint8), reference, None, cpu)
    with pytest.raises(DataError, match=r"classes of this run's data set \(0..9\), found 10"):
        evaluate_images(labelled, images[:2], reference, np.array([3, 10]), cpu)
    # The rotation task's predictions are not classes of the data: no class columns.
    result = evaluate_images(unlabelled, images, reference, None, cpu)
    assert result["class_histogram"] is None and result["class_entropy_bits"] is None
    assert abs(result["fid"]) < 1e-6 and "accuracy" not in result
    with pytest.raises(DataError, match="has no labels"):
        evaluate_images(unlabelled, images, reference, np.zeros(20, np.int64), cpu)


def test_reference_cache_round_trip_and_corrupt_cache(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    stats = FeatureStats(5, rng.normal(size=3), _spd(rng, 3))
    subset = rng.normal(size=(5, 3)).astype(np.float32)
    path = tmp_path / "ref.npz"
    Reference(stats, subset, "hash-1").save(path)
    loaded = Reference.load(path, "hash-1")
    assert loaded is not None and loaded.stats.n == 5
    np.testing.assert_array_equal(loaded.stats.cov, stats.cov)
    np.testing.assert_array_equal(loaded.subset, subset)
    assert Reference.load(path, "hash-2") is None  # another classifier's cache
    assert Reference.load(tmp_path / "missing.npz", "hash-1") is None
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])  # an interrupted write by another tool
    assert Reference.load(path, "hash-1") is None


# ---------------------------------------------------------------- samples files


def _images(n: int = 4) -> np.ndarray:
    return np.zeros((n, 28, 28), dtype=np.uint8)


def test_load_samples_valid(tmp_path: Path) -> None:
    path = tmp_path / "s.npz"
    np.savez(path, images=_images(), labels=np.array([0, 9, 3, 3], dtype=np.uint8))
    images, labels = load_samples(path)
    assert images.shape == (4, 28, 28) and images.dtype == np.uint8
    assert labels is not None and labels.dtype == np.int64 and labels.tolist() == [0, 9, 3, 3]
    np.savez(path, images=_images())
    assert load_samples(path)[1] is None


@pytest.mark.parametrize("arrays, match", [
    ({"images": _images().astype(np.float32)}, "must be uint8"),
    ({"images": np.zeros((4, 32, 30), np.uint8)}, r"shape \(N, H, H\) or \(N, H, H, 3\)"),
    ({"images": np.zeros((4, 784), np.uint8)}, r"shape \(N, H, H\)"),
    ({"images": np.zeros((4, 32, 32, 4), np.uint8)}, r"shape \(N, H, H\) or \(N, H, H, 3\)"),
    ({"images": np.zeros((0, 28, 28), np.uint8)}, "N > 0"),
    ({"samples": _images()}, "no 'images' array"),
    ({"images": _images(), "labels": np.array([0, -1, 2, 3])}, "labels must be >= 0"),
    ({"images": _images(), "labels": np.array([0, 1, 2])}, "labels must be integers"),
    ({"images": _images(), "labels": np.zeros(4, np.float32)}, "labels must be integers"),
])
def test_load_samples_rejects(tmp_path: Path, arrays: dict, match: str) -> None:
    path = tmp_path / "s.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=match) as err:
        load_samples(path)
    assert str(path) in str(err.value)


def test_load_samples_rejects_files_that_are_not_npz(tmp_path: Path) -> None:
    text = tmp_path / "notes.npz"
    text.write_text("not an npz file\n")
    npy = tmp_path / "array.npy"
    np.save(npy, _images())
    saved = tmp_path / "s.npz"
    np.savez(saved, images=_images(50))
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(saved.read_bytes()[:300])
    garbled = tmp_path / "garbled.npz"
    raw = bytearray(saved.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # inside the image data: the member's CRC no longer matches
    garbled.write_bytes(bytes(raw))
    for path in (text, npy, truncated, garbled, tmp_path / "missing.npz", tmp_path):
        with pytest.raises(DataError) as err:
            load_samples(path)
        assert str(path) in str(err.value)


def test_random_images_match_training_statistics() -> None:
    rng = np.random.default_rng(12)
    train = rng.integers(60, 140, size=(50, 28, 28)).astype(np.uint8)
    out = random_images(train, 200, seed=3)
    assert out.shape == (200, 28, 28) and out.dtype == np.uint8
    assert abs(float(out.mean()) - float(train.mean())) < 1.0
    assert abs(float(out.std()) - float(train.std())) < 1.0
    np.testing.assert_array_equal(out, random_images(train, 200, seed=3))
    assert not np.array_equal(out, random_images(train, 200, seed=4))
