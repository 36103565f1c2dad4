"""Images of any allowed size and 1 or 3 channels: conversions, models, presets, grids."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from latentdiffusion.data.images import to_uint8, to_unit_tensor
from latentdiffusion.errors import UsageError
from latentdiffusion.evaluation.plots import class_grid, tile
from latentdiffusion.models import VAE, Classifier, UNet
from latentdiffusion.models.classifier import ClassifierConfig, pixel_stats, random_shift, rotate
from latentdiffusion.models.vae import VAEConfig
from latentdiffusion.run.config import (
    ImageShape,
    RunConfig,
    conditional,
    for_images,
    image_shape_of,
)
from latentdiffusion.run.presets import PRESETS, preset
from latentdiffusion.run.training import init_model

SHAPES = [ImageShape(16, 1, 10), ImageShape(20, 3, 0), ImageShape(32, 3, 5),
          ImageShape(44, 1, 2), ImageShape(64, 3, 0)]


@pytest.mark.parametrize("channels", [1, 3])
def test_unit_tensor_round_trip(channels: int) -> None:
    shape = (5, 12, 12) if channels == 1 else (5, 12, 12, 3)
    images = np.random.default_rng(0).integers(0, 256, size=shape).astype(np.uint8)
    unit = to_unit_tensor(images)
    assert unit.shape == (5, channels, 12, 12) and unit.dtype == torch.float32
    if channels == 3:  # channel c of the tensor is the last axis' c of the array
        assert torch.equal(unit[2, 1], torch.from_numpy(images[2, :, :, 1]).float() / 255)
    back = to_uint8(unit)
    assert back.shape == shape and back.dtype == np.uint8
    np.testing.assert_array_equal(back, images)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_models_take_the_data_shape(shape: ImageShape) -> None:
    config = for_images(preset("tiny"), shape)
    assert image_shape_of(config.classifier) == shape
    s, c = shape.size, shape.channels
    images = torch.rand(2, c, s, s)
    vae = init_model(VAE, config.vae, seed=0)
    mean, _ = vae.encode(images)
    latent = config.vae.latent_size
    assert mean.shape == (2, config.vae.latent_channels, latent, latent)
    assert latent % 2 == 0 and latent <= 8  # the UNet halves it; the presets keep it small
    assert vae.decode(mean).shape == (2, c, s, s)
    classifier = init_model(Classifier, config.classifier, seed=0)
    assert classifier(images).shape == (2, shape.num_classes or 4)
    assert classifier.features(images).shape == (2, config.classifier.feature_dim)
    unet = init_model(UNet, config.unet, seed=0)
    assert unet(mean, torch.tensor([3, 7])).shape == mean.shape


def test_mnist_shape_leaves_every_preset_unchanged() -> None:
    for name in PRESETS:
        assert for_images(preset(name), ImageShape()) == preset(name)
        assert preset(name).vae.latent_size == 8  # 28 is padded to 32, as in every release


def test_unlabelled_data_gets_the_rotation_task() -> None:
    config = for_images(preset("quick"), ImageShape(32, 3, 0))
    assert config.classifier.task == "rotation" and config.classifier.num_classes == 4
    with pytest.raises(UsageError, match="needs a data set labelled with 2 classes or more"):
        conditional(config)
    labelled = conditional(for_images(preset("quick"), ImageShape(32, 3, 5)))
    assert labelled.unet.num_classes == 5 and labelled.sampling.labels == "balanced"


@pytest.mark.parametrize(("field", "value", "match"), [
    ("image_size", 30, "multiple of 4 from 16 to 64"),
    ("image_size", 68, "multiple of 4 from 16 to 64"),
    ("image_size", 12, "multiple of 4 from 16 to 64"),
    ("image_channels", 2, "must be 1 or 3"),
])
def test_bad_image_fields(field: str, value: int, match: str) -> None:
    for cls in (ClassifierConfig, VAEConfig):
        with pytest.raises(UsageError, match=match):
            cls(**{field: value})


def test_run_config_keeps_its_models_on_one_image_shape() -> None:
    config = preset("tiny")
    with pytest.raises(UsageError, match="same image_size"):
        dataclasses.replace(config, vae=dataclasses.replace(config.vae, image_channels=3))
    with pytest.raises(UsageError, match="latent size"):
        RunConfig(vae=VAEConfig(image_size=64))  # a 16x16 latent, the UNet's is 8
    with pytest.raises(UsageError, match="rotation task has num_classes = 4"):
        ClassifierConfig(task="rotation", num_classes=10)


def test_pixel_stats_are_per_channel_and_rounded() -> None:
    images = torch.zeros(4, 3, 8, 8)
    images[:, 1] = 0.5
    images[:, 2, :4] = 1.0  # half the pixels: mean 0.5, std ~0.5
    mean, std = pixel_stats(images)
    assert mean.tolist() == pytest.approx([0.0, 0.5, 0.5])
    assert std[0] == pytest.approx(1e-4) and std[1] == pytest.approx(1e-4)  # clamped, not 0
    assert std[2].item() == pytest.approx(0.5010, abs=1e-6)  # sqrt(256 / 255) / 2, 4 decimals
    classifier = init_model(Classifier, ClassifierConfig(image_size=16, image_channels=3), 0)
    classifier.set_pixel_stats(mean, std)
    assert torch.equal(classifier.state_dict()["pixel_mean"], mean)  # saved with the weights


def test_random_shift_moves_every_channel_together() -> None:
    images = torch.zeros(2, 3, 6, 6)
    images[:, :, 2, 3] = torch.tensor([0.2, 0.4, 0.6])
    shifted = random_shift(images, torch.tensor([0, 2]), torch.tensor([1, 1]), max_shift=1)
    assert shifted.shape == images.shape
    # dx = 0: one pixel right; dx = 2: one pixel left; dy = 1: no vertical move
    assert shifted[0, :, 2, 4].tolist() == pytest.approx([0.2, 0.4, 0.6])
    assert shifted[1, :, 2, 2].tolist() == pytest.approx([0.2, 0.4, 0.6])
    assert float(shifted.sum()) == pytest.approx(2 * 1.2)


def test_rotate_turns_each_image_by_its_quarter_turns() -> None:
    images = torch.arange(2 * 16, dtype=torch.float32).reshape(2, 1, 4, 4)
    images = torch.cat([images, images])  # (4, 1, 4, 4)
    turns = torch.tensor([0, 1, 2, 3])
    out = rotate(images, turns)
    for i, k in enumerate(turns.tolist()):
        assert torch.equal(out[i], torch.rot90(images[i], k, dims=(1, 2)))
    assert torch.equal(rotate(out, (4 - turns) % 4), images)  # turned back


def test_colour_grids() -> None:
    images = np.zeros((6, 4, 4, 3), np.uint8)
    images[:, :, :, 0] = 255  # red
    grid = tile(images, rows=2, cols=3, pad=1)
    assert grid.shape == (2 * 5 + 1, 3 * 5 + 1, 3)
    assert grid[1, 1].tolist() == [255, 0, 0] and grid[0, 0].tolist() == [0, 0, 0]
    labels = np.array([2, 0, 2, 1, 0, 2])
    rows = class_grid(images, labels, num_classes=3, per_class=4)
    assert rows.shape == (12, 4, 4, 3)
    assert rows[3].max() == 0 and rows[8].max() == 255  # class 0 has 2 images, class 2 has 3
