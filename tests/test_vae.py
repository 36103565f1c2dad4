"""The VAE, its KL and reparameterisation, and the FID classifier: shapes and learnability."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from conftest import synthetic_digits
from latentdiffusion.data.images import to_unit_tensor
from latentdiffusion.models import VAE, Classifier
from latentdiffusion.models.autoencoder_losses import vae_loss
from latentdiffusion.models.classifier import ClassifierConfig
from latentdiffusion.models.vae import VAEConfig, kl_to_standard_normal, sample_posterior
from latentdiffusion.run.training import init_model


def _images(n: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = synthetic_digits(n, seed)
    return to_unit_tensor(images), torch.from_numpy(labels).long()


def test_vae_default_config_shapes() -> None:
    config = VAEConfig()
    assert config.latent_size == 8
    model = init_model(VAE, config, seed=0)
    images, _ = _images(3)
    mean, log_variance = model.encode(images)
    assert mean.shape == log_variance.shape == (3, 4, 8, 8)
    decoded = model.decode(mean)
    assert decoded.shape == (3, 1, 28, 28)
    assert decoded.min() >= 0 and decoded.max() <= 1
    far = model.decode(100 * torch.randn(3, 4, 8, 8))  # saturated logits stay in [0, 1]
    assert far.min() >= 0 and far.max() <= 1
    logits, m, lv = model(images, torch.zeros_like(mean))
    assert logits.shape == (3, 1, 28, 28)
    assert torch.allclose(logits, model.decode_logits(mean), atol=1e-6)
    assert torch.equal(m, mean) and torch.equal(lv, log_variance)


def test_vae_other_depths() -> None:
    for channels, size in (((4,), 14), ((4, 8, 8), 4)):  # 28 -> 28 and 28 -> 32
        config = VAEConfig(latent_channels=2, channels=channels)
        assert config.latent_size == size
        model = init_model(VAE, config, seed=0)
        mean, _ = model.encode(torch.rand(2, 1, 28, 28))
        assert mean.shape == (2, 2, size, size)
        assert model.decode(mean).shape == (2, 1, 28, 28)


def test_kl_to_standard_normal() -> None:
    zero = torch.zeros(5)
    assert torch.equal(kl_to_standard_normal(zero, zero), zero)
    mean = torch.tensor([0.5, -1.0, 0.0, 0.0, 2.0])
    log_variance = torch.tensor([0.0, 0.0, 1.0, -1.0, -3.0])
    kl = kl_to_standard_normal(mean, log_variance)
    assert (kl > 0).all()
    # Closed form of KL(N(m, s^2) || N(0, 1)) = log(1/s) + (s^2 + m^2) / 2 - 1/2.
    sigma = torch.exp(0.5 * log_variance)
    expected = torch.log(1 / sigma) + (sigma**2 + mean**2) / 2 - 0.5
    assert torch.allclose(kl, expected, atol=1e-6)
    # And against torch.distributions.
    p = torch.distributions.Normal(mean, sigma)
    q = torch.distributions.Normal(torch.zeros(5), torch.ones(5))
    assert torch.allclose(kl, torch.distributions.kl_divergence(p, q), atol=1e-6)


def test_sample_posterior_is_reparameterisation() -> None:
    g = torch.Generator().manual_seed(0)
    mean, log_variance, noise = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(3))
    z = sample_posterior(mean, log_variance, noise)
    assert torch.allclose(z, mean + torch.exp(log_variance / 2) * noise, atol=1e-6)
    assert torch.equal(sample_posterior(mean, log_variance, torch.zeros_like(noise)), mean)


def _train_steps(loss: Callable[[], torch.Tensor], params: list[torch.Tensor], steps: int,
                 lr: float) -> tuple[float, float]:
    optimizer = torch.optim.Adam(params, lr=lr)
    first = float("nan")
    for i in range(steps):
        value = loss()
        if i == 0:
            first = value.item()
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
    with torch.no_grad():
        last = loss().item()
    return first, last


def test_vae_loss_decreases_on_a_fixed_batch() -> None:
    torch.manual_seed(0)
    model = init_model(VAE, VAEConfig(latent_channels=2, channels=(4, 8)), seed=0)
    images, _ = _images(16)
    noise = torch.randn(16, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    first, last = _train_steps(lambda: vae_loss(model, images, noise, 1e-3),
                               list(model.parameters()), steps=15, lr=1e-2)
    assert last < 0.9 * first, (first, last)


def test_vae_loss_value() -> None:
    model = init_model(VAE, VAEConfig(latent_channels=2, channels=(4, 8)), seed=0)
    images, _ = _images(4)
    noise = torch.randn(4, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    logits, mean, log_variance = model(images, noise)
    expected = (F.binary_cross_entropy_with_logits(logits, images)
                + 0.5 * kl_to_standard_normal(mean, log_variance).mean())
    assert vae_loss(model, images, noise, 0.5).item() == pytest.approx(expected.item(), rel=1e-6)


def test_classifier_shapes_and_loss_decreases() -> None:
    config = ClassifierConfig(channels=4, feature_dim=16, dropout=0.0)
    model = init_model(Classifier, config, seed=0)
    images, labels = _images(20)
    assert model.features(images).shape == (20, 16)
    assert model(images).shape == (20, 10)
    first, last = _train_steps(lambda: F.cross_entropy(model(images), labels),
                               list(model.parameters()), steps=10, lr=1e-2)
    assert last < 0.8 * first, (first, last)
