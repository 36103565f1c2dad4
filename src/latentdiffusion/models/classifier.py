"""MNIST CNN whose 128-d penultimate layer is the feature space of FID (as in the post)."""

from __future__ import annotations

import torch
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
