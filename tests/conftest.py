"""Shared fixtures: tiny synthetic MNIST-format data written by the tests themselves."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from latentdiffusion.data import dataset as datasets
from latentdiffusion.data.idx import write_idx
from latentdiffusion.data.registry import DATASETS
from latentdiffusion.diffusion import NoiseSchedule
from latentdiffusion.diffusion.schedule import ScheduleConfig
from latentdiffusion.models.unet import UNetConfig
from latentdiffusion.run.presets import preset

torch.set_num_threads(1)

# The tiny denoiser of the training and distributed tests. Its betas are noisier than the
# post's over T = 50, so that x_T is close to noise and the model has something to learn fast.
TINY_UNET = UNetConfig(in_channels=2, latent_size=8, channels=(8, 16), time_dim=8, groups=4)
TINY_SCHEDULE = NoiseSchedule.from_config(ScheduleConfig(num_timesteps=50, beta_start=1e-3,
                                                         beta_end=0.2))
TINY_OBJECTIVE = preset("tiny").objective  # the presets' objective


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


def register(monkeypatch: pytest.MonkeyPatch, root: Path, name: str = "mnist") -> None:
    """Make the IDX files in `root` the content of the registered data set `name` (for tests
    of what only a registered release gets)."""
    content = {p.name.removesuffix(".gz"): hashlib.md5(gzip.decompress(p.read_bytes()))
               .hexdigest() for p in root.iterdir()}
    monkeypatch.setitem(DATASETS, name, dataclasses.replace(DATASETS[name], content_md5=content))
    datasets._CACHE.clear()  # the registry changed, not the files


@pytest.fixture(autouse=True)
def prepared_cache(tmp_path_factory: pytest.TempPathFactory,
                   monkeypatch: pytest.MonkeyPatch) -> Path:
    """Prepared folders are cached in a temp directory of each test, never the user's."""
    where = tmp_path_factory.mktemp("prepared")
    monkeypatch.setenv("LDM_PREPARED_CACHE", str(where))
    return where


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return write_dataset(tmp_path / "data")
