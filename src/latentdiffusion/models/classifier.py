"""MNIST CNN whose 128-d penultimate layer is the feature space of FID (as in the post)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ClassifierConfig

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # pixel statistics of the training set in [0, 1]


def _conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class Classifier(nn.Module):
    """Two conv stages (28 -> 14 -> 7), a `feature_dim` ReLU layer, then 10 logits."""

    kind = "classifier"
    config_class = ClassifierConfig

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = config
        c = config.channels
        self.body = nn.Sequential(
            _conv_bn(1, c), _conv_bn(c, c), nn.MaxPool2d(2),  # (B, c, 14, 14)
            _conv_bn(c, 2 * c), _conv_bn(2 * c, 2 * c), nn.MaxPool2d(2),  # (B, 2c, 7, 7)
            nn.Flatten(),
        )
        self.to_features = nn.Sequential(nn.Linear(2 * c * 49, config.feature_dim), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(config.feature_dim, 10))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, 28, 28) in [0, 1] -> (B, feature_dim): the FID feature space."""
        return self.to_features(self.body((images - MNIST_MEAN) / MNIST_STD))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))  # (B, 10) logits


def random_shift(images: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor,
                 max_shift: int) -> torch.Tensor:
    """Training augmentation: translate each (1, H, W) image by (dx, dy) - max_shift pixels,
    filling with black."""
    b, _, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4)
    rows = (dy[:, None] + torch.arange(h, device=images.device))[:, :, None]  # (B, H, 1)
    cols = (dx[:, None] + torch.arange(w, device=images.device))[:, None, :]  # (B, 1, W)
    batch = torch.arange(b, device=images.device)[:, None, None]
    return padded[batch, 0, rows, cols].unsqueeze(1)  # (B, 1, H, W)


@torch.no_grad()
def accuracy(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor,
             batch_size: int = 1000) -> float:
    """Fraction of (N, 1, 28, 28) images whose predicted class is their label (N,)."""
    correct = sum(int((classifier(images[i:i + batch_size]).argmax(1) == labels[i:i + batch_size])
                      .sum()) for i in range(0, len(images), batch_size))
    return correct / max(len(images), 1)
