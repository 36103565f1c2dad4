"""The latent cache: encoding modes, the normalisation (shift, 1/std scale), the file round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import synthetic_digits
from latentdiffusion.errors import CheckpointError
from latentdiffusion.models import VAE
from latentdiffusion.models.vae import VAEConfig
from latentdiffusion.run import latents
from latentdiffusion.run.config import LatentNorm


def _latent_set(norm: LatentNorm) -> latents.LatentSet:
    torch.manual_seed(0)
    vae = VAE(VAEConfig(latent_channels=2, channels=(4, 8)))
    train, _ = synthetic_digits(30, 0)
    test, _ = synthetic_digits(10, 1)
    return latents.build(vae, "abc123", train, test, "mean", norm, seed=0,
                         device=torch.device("cpu"))


@pytest.fixture
def latent_set() -> latents.LatentSet:
    return _latent_set("channel")


def test_global_scale_makes_training_latents_unit_std() -> None:
    latent_set = _latent_set("global")
    assert latent_set.train.shape == (30, 2, 8, 8) and latent_set.test.shape == (10, 2, 8, 8)
    assert latent_set.shift == (0.0, 0.0) and latent_set.scale[0] == latent_set.scale[1]
    assert latent_set.normalised("train").std().item() == pytest.approx(1.0, rel=1e-5)
    torch.testing.assert_close(latent_set.normalised("test"), latent_set.test * latent_set.scale[0])


def test_channel_norm_standardises_each_channel(latent_set: latents.LatentSet) -> None:
    x0 = latent_set.normalised("train")
    torch.testing.assert_close(x0.mean(dim=(0, 2, 3)), torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(x0.std(dim=(0, 2, 3)), torch.ones(2), atol=1e-5, rtol=0)
    assert latent_set.scale[0] != latent_set.scale[1]  # the channels really differ


@pytest.mark.parametrize("norm", ["global", "channel"])
def test_decoding_inverts_the_stored_normalisation(norm: LatentNorm) -> None:
    latent_set = _latent_set(norm)
    x0 = latent_set.normalised("test")
    back = latents.denormalise(x0, latent_set.shift, latent_set.scale)
    torch.testing.assert_close(back, latent_set.test)


def test_cache_round_trip(latent_set: latents.LatentSet, tmp_path: Path) -> None:
    path = tmp_path / "latents.safetensors"
    latents.save(path, latent_set, key="k")
    loaded, _ = latents.load(path)
    assert torch.equal(loaded.train, latent_set.train) and torch.equal(loaded.test, latent_set.test)
    assert (loaded.shift, loaded.scale) == (latent_set.shift, latent_set.scale)
    assert (loaded.vae_hash, loaded.mode) == ("abc123", "mean")


def test_a_model_file_is_not_a_latent_cache(tmp_path: Path) -> None:
    from latentdiffusion.run import checkpoint

    path = tmp_path / "vae.safetensors"
    checkpoint.save_model(path, VAE(VAEConfig(channels=(4,))), VAEConfig(channels=(4,)), key="k")
    with pytest.raises(CheckpointError, match="expected 'latents'"):
        latents.load(path)


def test_sample_mode_is_seeded_and_differs_from_mean() -> None:
    torch.manual_seed(0)
    vae = VAE(VAEConfig(latent_channels=2, channels=(4, 8)))
    images, _ = synthetic_digits(6, 0)
    cpu = torch.device("cpu")
    mean = latents.encode_images(vae, images, "mean", 0, cpu)
    first = latents.encode_images(vae, images, "sample", 0, cpu)
    again = latents.encode_images(vae, images, "sample", 0, cpu)
    other = latents.encode_images(vae, images, "sample", 1, cpu)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert not torch.allclose(first, mean)
    # Posterior mean and log-variance come from the same encoder: z - mean ~ sigma * noise.
    assert (first - mean).abs().mean() > 0
