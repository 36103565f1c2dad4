"""Does the model copy its training images? Nearest training neighbours in the feature space.

For each generated image, the distance to its nearest training image; for each test image (a
fresh draw of the data, which cannot be a copy), the same. A model that memorises puts samples
much closer to training images than test images ever are: the share of samples closer than the
1st percentile of the test images' distances ("copies") is about 1% for a model that does not,
and rises towards 1 for one that reproduces its training set (cf. Carlini et al. 2023, who look
for near-duplicates of training images among a diffusion model's samples).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

COPY_PERCENTILE = 1.0  # samples nearer than this percentile of the test images' distances
QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75)
SHOWN = 16  # samples shown with their nearest training images
NEIGHBOURS = 3


def nearest(queries: np.ndarray, references: np.ndarray, k: int = 1, chunk: int = 1000
            ) -> tuple[np.ndarray, np.ndarray]:
    """Distances (N, k) and indices (N, k) of each query row's k nearest reference rows."""
    refs = torch.from_numpy(np.ascontiguousarray(references, dtype=np.float32))
    distances, indices = [], []
    for start in range(0, len(queries), chunk):
        block = torch.from_numpy(np.ascontiguousarray(queries[start:start + chunk],
                                                      dtype=np.float32))
        found = torch.cdist(block, refs).topk(k, dim=1, largest=False)
        distances.append(found.values)
        indices.append(found.indices)
    return torch.cat(distances).numpy(), torch.cat(indices).numpy()


def memorisation(samples: np.ndarray, test: np.ndarray, train: np.ndarray) -> dict[str, Any]:
    """The nearest-training-image distances of samples (N, d) and test images (M, d) against
    the training images (T, d), the share of copies, and the neighbours of the first SHOWN
    samples; JSON-ready."""
    sample_distances, sample_indices = nearest(samples, train, NEIGHBOURS)
    test_distances, _ = nearest(test, train, 1)
    threshold = float(np.percentile(test_distances[:, 0], COPY_PERCENTILE))
    copies = float((sample_distances[:, 0] < threshold).mean())
    return {
        "n": len(samples), "test_n": len(test), "train_n": len(train),
        "copy_threshold": threshold, "copies": copies,
        "sample_quantiles": [float(q) for q in np.quantile(sample_distances[:, 0], QUANTILES)],
        "test_quantiles": [float(q) for q in np.quantile(test_distances[:, 0], QUANTILES)],
        "quantiles": list(QUANTILES),
        "shown_neighbours": sample_indices[:SHOWN].tolist(),  # (SHOWN, NEIGHBOURS) train rows
    }
