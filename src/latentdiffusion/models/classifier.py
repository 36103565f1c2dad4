"""The CNN whose penultimate `feature_dim` layer is the feature space of FID (as in the post).

With labels it classifies them. Without (an unlabelled data set) it learns to tell which of four
rotations an image was turned by (Gidaris et al. 2018): a self-supervised task whose features
still separate shapes, poses and textures, trained on the same images, so FID has a feature
space of this data and not of some other (its numbers do not compare with a classifier's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError
from ..schema import check_fields, check_image

ClassifierTask = Literal["labels", "rotation"]


@dataclass(frozen=True)
class ClassifierConfig:
    """CNN whose penultimate `feature_dim` layer is the FID feature space (as in the post)."""

    channels: int = 32  # width of the first stage; the second has twice as many
    feature_dim: int = 128
    dropout: float = 0.25
    augment_shift: int = 2  # random translation in pixels during training
    image_size: int = 28  # images (image_channels, image_size, image_size), from the data set
    image_channels: int = 1
    # "labels": the data set's classes. "rotation" (unlabelled data): which of 4 quarter turns
    # an image was given, a self-supervised task (models/classifier.py).
    task: ClassifierTask = "labels"
    num_classes: int = 10

    def __post_init__(self) -> None:
        check_fields(self, positive=("channels", "feature_dim"), unit=("dropout",))
        check_image(self)
        if self.num_classes < 2:
            raise UsageError(f"ClassifierConfig.num_classes must be >= 2, got {self.num_classes}")
        if self.task == "rotation" and self.num_classes != 4:
            raise UsageError("ClassifierConfig: the rotation task has num_classes = 4")

    @property
    def data_classes(self) -> int:
        """The data set's classes it predicts; 0 for the rotation task, whose outputs are not
        classes of the data."""
        return self.num_classes if self.task == "labels" else 0


ROTATIONS = 4  # the rotation task's classes: k * 90 degrees, k = 0..3


def _conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class Classifier(nn.Module):
    """Two conv stages (S -> S/2 -> S/4), a `feature_dim` ReLU layer, then the class logits."""

    kind = "classifier"
    config_class = ClassifierConfig
    pixel_mean: torch.Tensor  # (C,) buffers
    pixel_std: torch.Tensor

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = config
        c, size = config.channels, config.image_size // 4
        self.body = nn.Sequential(
            _conv_bn(config.image_channels, c), _conv_bn(c, c), nn.MaxPool2d(2),  # (B, c, S/2, S/2)
            _conv_bn(c, 2 * c), _conv_bn(2 * c, 2 * c), nn.MaxPool2d(2),  # (B, 2c, S/4, S/4)
            nn.Flatten(),
        )
        self.to_features = nn.Sequential(nn.Linear(2 * c * size * size, config.feature_dim),
                                         nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(config.dropout),
                                  nn.Linear(config.feature_dim, config.num_classes))
        # Per-channel pixel mean and std of the training images (set_pixel_stats), saved with
        # the weights; the identity until set.
        self.register_buffer("pixel_mean", torch.zeros(config.image_channels))
        self.register_buffer("pixel_std", torch.ones(config.image_channels))

    def set_pixel_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Normalise inputs by these (C,) statistics of the training images."""
        self.pixel_mean.copy_(mean)
        self.pixel_std.copy_(std)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) in [0, 1] -> (B, feature_dim): the FID feature space."""
        mean, std = self.pixel_mean[:, None, None], self.pixel_std[:, None, None]
        # float32 out of an autocast forward (run/precision.py), a no-op in float32
        return self.to_features(self.body((images - mean) / std)).float()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images)).float()  # (B, num_classes) logits, float32


def pixel_stats(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of (N, C, H, W) images, rounded to 4 decimals (MNIST's are the
    familiar 0.1307 and 0.3081)."""
    sums = torch.zeros(2, images.shape[1], dtype=torch.float64)  # [sum x, sum x^2] per channel
    for chunk in images.split(4096):  # float64 a chunk at a time, not a copy of the whole set
        x = chunk.transpose(0, 1).reshape(images.shape[1], -1).double()  # (C, B H W)
        sums += torch.stack([x.sum(1), x.square().sum(1)])
    n = images.numel() // images.shape[1]
    mean = sums[0] / n
    std = ((sums[1] - n * mean.square()) / max(n - 1, 1)).clamp_min(0).sqrt()  # unbiased
    rounded = [torch.round(v * 1e4) / 1e4 for v in (mean, std)]
    return rounded[0].float(), rounded[1].clamp_min(1e-4).float()


def random_shift(images: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor,
                 max_shift: int) -> torch.Tensor:
    """Training augmentation: translate each (C, H, W) image by (dx, dy) - max_shift pixels,
    filling with black."""
    b, _, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4)
    rows = (dy[:, None] + torch.arange(h, device=images.device))[:, :, None]  # (B, H, 1)
    cols = (dx[:, None] + torch.arange(w, device=images.device))[:, None, :]  # (B, 1, W)
    batch = torch.arange(b, device=images.device)[:, None, None]
    # Advanced indices around a slice put their dimensions first: (B, H, W, C).
    return padded[batch, :, rows, cols].permute(0, 3, 1, 2)  # (B, C, H, W)


def rotate(images: torch.Tensor, quarter_turns: torch.Tensor) -> torch.Tensor:
    """Turn image i of (B, C, S, S) by quarter_turns[i] * 90 degrees (the rotation task)."""
    out = images.clone()
    for k in range(1, ROTATIONS):
        chosen = quarter_turns == k
        out[chosen] = torch.rot90(images[chosen], k, dims=(2, 3))
    return out


@torch.no_grad()
def accuracy(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor,
             batch_size: int = 1000) -> float:
    """Fraction of (N, C, S, S) images whose predicted class is their label (N,)."""
    correct = sum(int((classifier(images[i:i + batch_size]).argmax(1) == labels[i:i + batch_size])
                      .sum()) for i in range(0, len(images), batch_size))
    return correct / max(len(images), 1)
