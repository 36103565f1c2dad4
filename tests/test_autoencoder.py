"""The VAE's architectures, pixel losses and patch critic: shapes, known values, learning,
determinism and exact resume of the critic's training wrapper."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import synthetic_digits, write_dataset
from latentdiffusion import distributed as dist
from latentdiffusion.data import load_dataset
from latentdiffusion.data.images import to_unit_tensor
from latentdiffusion.errors import UsageError
from latentdiffusion.models import VAE
from latentdiffusion.models.autoencoder_losses import (
    ADAPTIVE_EPS,
    ADAPTIVE_MAX,
    PatchCritic,
    VAEWithCritic,
    adaptive_weight,
    hinge_critic_loss,
    reconstruction_loss,
    vae_loss,
    vae_terms,
)
from latentdiffusion.models.vae import VAEConfig
from latentdiffusion.run import checkpoint, keys, stages
from latentdiffusion.run.config import TrainConfig
from latentdiffusion.run.keys import StageKey
from latentdiffusion.run.presets import preset
from latentdiffusion.run.rundir import RunDir
from latentdiffusion.run.training import Batch, fit, init_model

CPU = torch.device("cpu")
RESNET = VAEConfig(latent_channels=2, channels=(4, 8), groups=4, arch="resnet")
CRITIC = VAEConfig(latent_channels=2, channels=(4, 8), groups=4, arch="resnet", loss="l1",
                   critic_weight=0.5, critic_start=3, critic_channels=4)


def _images(n: int = 16, seed: int = 0) -> torch.Tensor:
    return to_unit_tensor(synthetic_digits(n, seed)[0])


@pytest.mark.parametrize(("channels", "size"), [((4,), 14), ((4, 8), 8), ((4, 8, 8), 4)])
def test_resnet_shapes(channels: tuple[int, ...], size: int) -> None:
    config = VAEConfig(latent_channels=2, channels=channels, groups=4, arch="resnet",
                       blocks_per_level=2)
    assert config.latent_size == size  # the plain VAE's latent size rules
    model = init_model(VAE, config, seed=0)
    mean, log_variance = model.encode(_images(3))
    assert mean.shape == log_variance.shape == (3, 2, size, size)
    decoded = model.decode(mean)
    assert decoded.shape == (3, 1, 28, 28) and 0 <= decoded.min() <= decoded.max() <= 1
    logits, m, _ = model(_images(3), torch.zeros_like(mean))
    assert torch.allclose(logits, model.decode_logits(m), atol=1e-6)
    assert model.last_layer().shape == (4, channels[0], 3, 3)  # 4 sub-pixel phases of 1 channel


def test_resnet_colour_images() -> None:
    config = VAEConfig(latent_channels=3, channels=(8, 16), groups=4, arch="resnet",
                       image_size=32, image_channels=3)
    model = init_model(VAE, config, seed=0)
    mean, _ = model.encode(torch.rand(2, 3, 32, 32))
    assert mean.shape == (2, 3, 8, 8)
    assert model.decode(mean).shape == (2, 3, 32, 32)


def test_plain_is_the_default_and_keeps_its_weight_names() -> None:
    assert VAEConfig().arch == "plain" and VAEConfig().loss == "bce"
    names = list(init_model(VAE, VAEConfig(), seed=0).state_dict())
    assert names[:2] == ["encoder.0.0.weight", "encoder.0.0.bias"]  # the post's layout


@pytest.mark.parametrize(("fields", "message"), [
    ({"arch": "unet"}, r"VAEConfig.arch: unknown value 'unet' \(choose from plain, resnet\)"),
    ({"loss": "l3"}, r"VAEConfig.loss: unknown value 'l3' \(choose from bce, l1, l2\)"),
    ({"arch": "resnet", "channels": (12, 24)}, r"multiples of groups \(8\)"),
    ({"critic_weight": -1.0}, r"VAEConfig.critic_weight must be >= 0"),
    ({"scale_equivariance": -0.5}, r"VAEConfig.scale_equivariance must be >= 0"),
    ({"blocks_per_level": 0}, r"VAEConfig.blocks_per_level must be > 0"),
])
def test_bad_config_is_one_usage_error(fields: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message) as info:
        VAEConfig(**fields)
    assert "\n" not in str(info.value)


def test_plain_channels_need_no_groups() -> None:
    VAEConfig(channels=(12, 24))  # groups only matter to the resnet


def test_reconstruction_losses() -> None:
    logits = torch.tensor([[0.0, 2.0], [-1.0, 3.0]])
    images = torch.tensor([[0.5, 1.0], [0.0, 0.25]])
    pixels = torch.sigmoid(logits)
    assert torch.equal(reconstruction_loss(logits, images, "bce"),
                       F.binary_cross_entropy_with_logits(logits, images))
    assert reconstruction_loss(logits, images, "l1").item() == pytest.approx(
        (pixels - images).abs().mean().item())
    assert reconstruction_loss(logits, images, "l2").item() == pytest.approx(
        ((pixels - images) ** 2).mean().item())
    assert reconstruction_loss(torch.zeros(3), torch.full((3,), 0.5), "l1").item() == 0.0


@pytest.mark.parametrize("arch", ["plain", "resnet"])
def test_scale_equivariance_term_is_the_half_size_decode_against_the_half_size_image(
        arch: str) -> None:
    config = VAEConfig(latent_channels=2, channels=(4, 8), groups=4, arch=arch, loss="l1")
    model = init_model(VAE, config, seed=0)
    images = _images(4)
    noise = torch.randn(4, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    half = model.half_scale(images)
    # 28 -> padded 32 (2 zero pixels a side) -> 2x2 means: (4, 1, 16, 16)
    assert half.shape == (4, 1, 16, 16)
    padded = F.pad(images, (2, 2, 2, 2))
    assert half[0, 0, 3, 5].item() == pytest.approx(padded[0, 0, 6:8, 10:12].mean().item())
    plain, kl, logits = vae_terms(model, images, noise, "l1")
    weighted, kl_w, logits_w = vae_terms(model, images, noise, "l1", scale_equivariance=0.5)
    assert torch.equal(kl, kl_w) and torch.equal(logits, logits_w)
    mean, log_variance = model.encode(images)
    z = mean + torch.exp(0.5 * log_variance) * noise  # (4, 2, 8, 8)
    expected = (torch.sigmoid(model.decoder(F.avg_pool2d(z, 2))) - half).abs().mean()
    assert weighted.item() == pytest.approx(plain.item() + 0.5 * expected.item(), rel=1e-5)
    assert VAEConfig().scale_equivariance == 0.0  # off unless asked for


def test_the_vae_key_holds_scale_equivariance_only_when_on() -> None:
    c = preset("default")
    # The digest of the key made before the option existed: off keeps it.
    assert keys.model_key(c.vae, c.vae_train, "abc").digest == (
        "dd300b1fcb72556387b932ed975b8b5b4d74489caade6b5a68dff9b136366df7")
    on = dataclasses.replace(c.vae, scale_equivariance=0.5)
    assert keys.model_key(on, c.vae_train, "abc").fields["model.scale_equivariance"] == 0.5


def test_hinge_critic_loss() -> None:
    # real logits above 1 and fake below -1 cost nothing; 0 costs 1 on each side
    assert hinge_critic_loss(torch.tensor([2.0]), torch.tensor([-3.0])).item() == 0.0
    assert hinge_critic_loss(torch.zeros(4), torch.zeros(4)).item() == 1.0


def test_adaptive_weight_is_the_ratio_of_gradient_norms() -> None:
    w = torch.ones(2, 2, requires_grad=True)
    a, b = torch.tensor([[3.0, 0.0], [0.0, 4.0]]), torch.full((2, 2), 0.5)
    # d/dw sum(a w) = a (norm 5), d/dw sum(b w^2) = 2 b w = 1 (norm 2)
    weight = adaptive_weight((a * w).sum(), (b * w * w).sum(), w)
    assert weight.item() == pytest.approx(5.0 / (2.0 + ADAPTIVE_EPS))
    assert not weight.requires_grad
    # a critic with no gradient at w: the clamp keeps the weight finite
    assert adaptive_weight((a * w).sum(), (0 * w).sum(), w).item() == ADAPTIVE_MAX


def test_patch_critic_shape() -> None:
    assert PatchCritic(1, 4)(torch.rand(2, 1, 28, 28)).shape == (2, 1, 7, 7)


def _train(model: nn.Module, loss: Callable[[], torch.Tensor], steps: int, lr: float
           ) -> tuple[float, float]:
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    values = []
    for _ in range(steps):
        value = loss()
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        values.append(value.item())
    return values[0], values[-1]


@pytest.mark.parametrize("pixel_loss", ["bce", "l1", "l2"])
def test_resnet_loss_falls_on_a_fixed_batch(pixel_loss: str) -> None:
    model = init_model(VAE, RESNET, seed=0)
    images = _images(16)
    noise = torch.randn(16, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    first, last = _train(model, lambda: vae_loss(model, images, noise, 1e-3, pixel_loss),
                         steps=15, lr=1e-2)
    assert last < 0.8 * first, (first, last)


def test_critic_joins_at_its_start_step_and_trains_only_itself_by_its_hinge_loss() -> None:
    model = init_model(VAEWithCritic, CRITIC, seed=0).train()
    images = _images(8)
    noise = torch.randn(8, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    for step in range(CRITIC.critic_start):  # before the start: the VAE's loss, no critic
        assert int(model.step) == step
        loss = model(images, noise)
        assert loss.item() == pytest.approx(vae_loss(model.autoencoder, images, noise,
                                                     CRITIC.kl_weight, "l1").item())
    with torch.no_grad():  # validation neither counts nor uses the critic
        model(images, noise)
    assert int(model.step) == CRITIC.critic_start
    model.zero_grad()
    model(images, noise).backward()
    critic_grads = [p.grad.clone() for p in model.critic.parameters()]  # type: ignore[union-attr]
    assert all(g.abs().sum() > 0 for g in critic_grads[::2])  # the weights (the last bias's
    # gradient cancels: -1/2 from the real side, +1/2 from the fake one)
    # The critic's gradient is that of its hinge loss alone: the generator term leaves it be.
    model.zero_grad()
    fakes = model.autoencoder.decode(model.autoencoder.encode(images)[0]
                                     + torch.exp(0.5 * model.autoencoder.encode(images)[1])
                                     * noise)
    hinge_critic_loss(model.critic(images), model.critic(fakes.detach())).backward()
    for expected, p in zip(critic_grads, model.critic.parameters(), strict=True):
        assert torch.allclose(p.grad, expected, atol=1e-6)  # type: ignore[arg-type]


def _critic_fit(state_dir: Path, resume: str = "off", stop_at: int | None = None
                ) -> nn.Module:
    """fit() of the wrapper on 32 images: 4 steps an epoch, 2 epochs, the critic from step 3;
    `stop_at` raises in the loss at that step (a crash after its checkpoint)."""
    config = TrainConfig(steps=8, batch_size=8, lr=3e-3, ema_decay=0.9, checkpoint_every=1,
                         seed=2)
    model = init_model(VAEWithCritic, CRITIC, config.seed)
    calls = []

    def loss_fn(m: nn.Module, batch: Batch) -> torch.Tensor:
        if m.training:
            calls.append(1)
            if stop_at is not None and len(calls) > stop_at:
                raise KeyboardInterrupt
        return m(batch.tensors[0], batch.randn(2, 8, 8))

    fit(model, loss_fn, (_images(32),), (_images(8, 1),), config, state_dir=state_dir,
        kind="vae", key=StageKey.of(model=CRITIC, train=config), model_config=CRITIC,
        device=CPU, resume=resume, progress=False)  # type: ignore[arg-type]
    return model


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_critic_training_is_deterministic_and_resumes_exactly(tmp_path: Path) -> None:
    reference = _critic_fit(tmp_path / "a")
    assert int(reference.step) == 8  # type: ignore[arg-type]
    assert _same(reference, _critic_fit(tmp_path / "b"))
    with pytest.raises(KeyboardInterrupt):
        _critic_fit(tmp_path / "c", stop_at=5)  # after the critic joined
    assert _same(reference, _critic_fit(tmp_path / "c", resume="strict"))


def test_the_stage_exports_the_autoencoder_alone(tmp_path: Path) -> None:
    dataset = load_dataset(write_dataset(tmp_path / "data"))
    run = RunDir(tmp_path / "run")
    train = TrainConfig(steps=6, batch_size=16, lr=2e-3, checkpoint_every=4)
    stages.train_vae(dataset, run, CRITIC, train, device=CPU, progress=False)
    tensors, header = checkpoint.load(run.model("vae"), kind="vae")
    assert not any(name.startswith(("critic", "autoencoder", "step")) for name in tensors)
    vae, _ = checkpoint.load_model(run.model("vae"), VAE)  # safetensors, as every stage's
    assert vae.config == CRITIC and header["history"]


def test_the_critic_is_refused_under_several_processes(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    dataset = load_dataset(write_dataset(tmp_path / "data"))
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    with pytest.raises(UsageError, match="vae.critic_weight > 0 trains in one process only"):
        stages.train_vae(dataset, RunDir(tmp_path / "run"), CRITIC,
                         TrainConfig(steps=6, batch_size=16), device=CPU, progress=False)
    assert not (tmp_path / "run").exists()
