"""Checks of an evaluation: when its numbers cannot be trusted, say so.

A FID table reads the same whether or not the run learnt anything. These checks look at what
the numbers rest on and return findings (a code, one line for the user, the figures behind it):
- the feature network: its held-out score on its own task against chance (1/K for K classes,
  1/4 for the rotation task). A network near chance maps every image to about the same
  features, and every FID in its space is meaningless;
- the Random row: Gaussian pixels must score far worse than the test images and than every set
  the run's models make (the VAE's prior samples aside: the post's baseline, poor by design,
  as they decode latents the small KL weight leaves far from N(0, I)); if not, the feature
  space does not tell noise from data;
- collapse, in pixels (no feature network needed): a set whose images are much closer to each
  other than the data's are (every sample the same), and reconstructions that are nearly flat;
- copies: the share of samples closer to a training image than 99% of the test images are
  (evaluation/memorisation.py), about 1% for a model that does not copy;
- the number of images against the feature dimension: below MIN_N_PER_DIM * d the covariance
  of a set is poorly estimated (of rank at most N - 1 < d when N <= d) and FID is biased
  upwards, so KID, which is unbiased, should be read instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

# A feature network is flagged below chance + CHANCE_MARGIN * (1 - chance): it has closed less
# than a quarter of the gap from guessing to a perfect score (MNIST's classifier: 0.995).
CHANCE_MARGIN = 0.25
# Random must score at least this many times the Validation FID, and worse than every set.
RANDOM_OVER_VALIDATION = 2.0
# Rows that are neither the model's output nor the reference: not compared, not checked.
BASELINES = ("random", "vae-prior", "validation")
# A set whose mean pairwise pixel distance (or whose reconstructions' per-image spread) is
# below this share of the data's is flagged as collapsed.
COLLAPSE_SHARE = 0.25
MIN_N_PER_DIM = 5  # FID with fewer than 5 d images is flagged
# Copies are flagged from 5% of a set: five times what a model that does not copy gives.
COPY_SHARE = 0.05
SPREAD_SUBSET = 500  # images drawn (fixed seed) to measure a set's pairwise distances


@dataclass(frozen=True)
class Finding:
    code: str
    message: str
    figures: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "figures": self.figures}


def feature_network(accuracy: float, num_classes: int, task: str) -> Finding | None:
    """The feature network's held-out accuracy on its task (labels or rotation) against
    chance."""
    chance = 1.0 / num_classes
    floor = chance + CHANCE_MARGIN * (1.0 - chance)
    if accuracy >= floor:
        return None
    what = "rotation" if task == "rotation" else "class"
    return Finding("feature-network-at-chance",
                   f"the feature network's held-out {what} accuracy is {accuracy:.3f}, near "
                   f"chance ({chance:.3f}; flagged below {floor:.3f}): it has learnt too little "
                   "for its features to tell images apart, so every FID here is uninformative",
                   {"accuracy": accuracy, "chance": chance, "floor": floor})


def random_row(fids: dict[str, float | None]) -> Finding | None:
    """The Random row against Validation and the generated sets (`fids`: set name -> FID,
    with "random" and "validation")."""
    random, validation = fids.get("random"), fids.get("validation")
    if random is None or validation is None:
        return None
    better = sorted(name for name, fid in fids.items()
                    if name not in BASELINES and fid is not None and fid >= random)
    if random >= RANDOM_OVER_VALIDATION * validation and not better:
        return None
    against = (f"as well as or better than {', '.join(better)}" if better else
               f"within {RANDOM_OVER_VALIDATION:g}x of Validation ({validation:.4g})")
    return Finding("random-not-worst",
                   f"Gaussian noise (the Random row, FID {random:.4g}) scores {against}: the "
                   "feature space does not separate noise from data, so these FIDs are "
                   "uninformative",
                   {"random": random, "validation": validation, "not_worse_than": better})


def _flat(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W[, C]) -> float32 (N, H * W * C) in [0, 1]."""
    return images.reshape(len(images), -1).astype(np.float32) / 255.0


def pairwise_spread(images: np.ndarray, seed: int = 0) -> float:
    """Mean Euclidean pixel distance between two images of the set (over a fixed subset of at
    most SPREAD_SUBSET; 0 for a single image)."""
    rng = np.random.default_rng(seed)
    chosen = images if len(images) <= SPREAD_SUBSET else images[
        np.sort(rng.choice(len(images), SPREAD_SUBSET, replace=False))]
    x = _flat(chosen).astype(np.float64)
    if len(x) < 2:
        return 0.0
    squared = (x * x).sum(1)
    distances = np.sqrt(np.clip(squared[:, None] + squared[None] - 2 * x @ x.T, 0, None))
    return float(distances.sum() / (len(x) * (len(x) - 1)))  # the diagonal is 0


def image_spread(images: np.ndarray) -> float:
    """Mean standard deviation of the pixels within an image (0 for flat images)."""
    return float(_flat(images).std(axis=1).mean())


def collapse(name: str, images: np.ndarray, data: np.ndarray) -> Finding | None:
    """A set whose images are much closer to each other than the data's images are."""
    spread, reference = pairwise_spread(images), pairwise_spread(data)
    if len(images) < 2 or spread >= COLLAPSE_SHARE * reference:
        return None
    return Finding("samples-alike",
                   f"{name}: all images are alike (mean pairwise pixel distance {spread:.3g}, "
                   f"the data's {reference:.3g}): the model produces nearly one image",
                   {"set": name, "spread": spread, "data_spread": reference})


def flat_reconstructions(images: np.ndarray, data: np.ndarray) -> Finding | None:
    """Reconstructions with far less contrast within each image than the data's images."""
    spread, reference = image_spread(images), image_spread(data)
    if spread >= COLLAPSE_SHARE * reference:
        return None
    return Finding("reconstructions-constant",
                   f"the VAE's reconstructions are nearly constant (pixel spread within an image "
                   f"{spread:.3g}, the data's {reference:.3g}): the autoencoder learnt little, "
                   "and a diffusion model on its latents cannot do better",
                   {"spread": spread, "data_spread": reference})


def copies(memorisation: dict[str, Any]) -> Finding | None:
    """A set with many samples nearer to a training image than test images come."""
    share = memorisation["copies"]
    if share < COPY_SHARE:
        return None
    name = memorisation.get("set", "samples")
    return Finding("copies-training-images",
                   f"{name}: {share:.1%} of {memorisation['n']} samples are closer to a training "
                   f"image than 99% of the test images are (about 1% without copying): the "
                   f"model reproduces its {memorisation['train_n']} training images",
                   {"set": name, "copies": share, "n": memorisation["n"],
                    "train_n": memorisation["train_n"]})


def sample_size(name: str, n: int, dim: int) -> Finding | None:
    """FID of too few images for the feature dimension."""
    if n >= MIN_N_PER_DIM * dim:
        return None
    return Finding("few-images",
                   f"{name}: FID of {n} images in a {dim}-d feature space is unreliable (biased "
                   f"upwards below {MIN_N_PER_DIM * dim} images); read KID, which is unbiased, "
                   "or score against more images (a larger test split)",
                   {"set": name, "n": n, "feature_dim": dim})
