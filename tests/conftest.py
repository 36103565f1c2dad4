"""Shared fixtures: tiny synthetic MNIST-format data written by the tests themselves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from latentdiffusion.data import write_idx

torch.set_num_threads(1)


def synthetic_digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Digit d is a bright bar at row 2 + 2d plus noise: learnable, 28x28 uint8."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    images = rng.integers(0, 40, size=(n, 28, 28)).astype(np.uint8)
    for i, d in enumerate(labels):
        images[i, 2 + 2 * d:4 + 2 * d, 4:24] = 255
    return images, labels.astype(np.uint8)


def write_dataset(root: Path, n_train: int = 96, n_test: int = 40, gz: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    for prefix, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        images, labels = synthetic_digits(n, seed)
        write_idx(root / f"{prefix}-images-idx3-ubyte{suffix}", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
    return root


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return write_dataset(tmp_path / "data")
