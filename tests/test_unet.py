"""The denoising UNet and its sinusoidal time embedding."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from latentdiffusion.models import UNet, to_device
from latentdiffusion.models.unet import UNetConfig, sinusoidal_embedding
from latentdiffusion.run.training import init_model

TINY = UNetConfig(in_channels=2, latent_size=8, channels=(8, 16), time_dim=8, groups=4)


def _expected_embedding(t: float, dim: int, max_period: float = 10_000.0) -> list[float]:
    half = dim // 2
    frequencies = [max_period ** (-i / (half - 1)) for i in range(half)]
    return [math.sin(t * w) for w in frequencies] + [math.cos(t * w) for w in frequencies]


def test_sinusoidal_embedding_layout() -> None:
    t = torch.tensor([0, 1, 7, 500])
    embedding = sinusoidal_embedding(t, 8)
    assert embedding.shape == (4, 8) and embedding.dtype == torch.float32
    # t = 0: all sines 0 and all cosines 1, so the first half is sin and the second cos.
    assert embedding[0].tolist() == [0.0] * 4 + [1.0] * 4
    for row, value in enumerate(t.tolist()):
        expected = torch.tensor(_expected_embedding(value, 8))
        assert torch.allclose(embedding[row], expected, atol=1e-5), value
    # First frequency 1 (sin(t) at column 0), last 1 / max_period (column half - 1).
    assert embedding[1, 0].item() == pytest.approx(math.sin(1.0), abs=1e-6)
    assert embedding[3, 3].item() == pytest.approx(math.sin(500 / 10_000), abs=1e-6)
    assert embedding[3, 7].item() == pytest.approx(math.cos(500 / 10_000), abs=1e-6)
    assert embedding[2, 4].item() == pytest.approx(math.cos(7.0), abs=1e-6)


def test_sinusoidal_embedding_other_period_and_width() -> None:
    t = torch.tensor([3, 999])
    embedding = sinusoidal_embedding(t, 16, max_period=100.0)
    for row, value in enumerate(t.tolist()):
        expected = torch.tensor(_expected_embedding(value, 16, 100.0))
        assert torch.allclose(embedding[row], expected, atol=1e-4), value


def _perturb_output(model: UNet, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    final = model.out[-1]
    with torch.no_grad():
        final.weight.copy_(0.1 * torch.randn(final.weight.shape, generator=g))
        final.bias.copy_(0.1 * torch.randn(final.bias.shape, generator=g))


@pytest.mark.parametrize("norm", ["group", "instance"])
def test_unet_shapes_and_time_dependence(norm: str) -> None:
    config = UNetConfig(**{**TINY.__dict__, "norm": norm})
    model = init_model(UNet, config, seed=0).eval()
    x = torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 10, 49])
    with torch.no_grad():
        out = model(x, t)
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0  # zero-initialised last conv: the zero predictor

    _perturb_output(model)
    with torch.no_grad():
        a = model(x, torch.full((3,), 5))
        b = model(x, torch.full((3,), 40))
        c = model(x, torch.full((3,), 5))
    assert a.shape == x.shape and torch.isfinite(a).all()
    assert torch.equal(a, c)
    assert (a - b).abs().max() > 1e-4


def test_unet_output_depends_on_t_after_one_step() -> None:
    model = init_model(UNet, TINY, seed=0)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 2, 8, 8, generator=g)
    target = torch.randn(4, 2, 8, 8, generator=g)
    t = torch.tensor([1, 2, 3, 4])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    F.mse_loss(model(x, t), target).backward()
    optimizer.step()
    with torch.no_grad():
        a, b = model(x, torch.zeros(4, dtype=torch.long)), model(x, torch.full((4,), 900))
    assert (a - b).abs().max() > 1e-5


def test_unet_batch_rows_are_independent() -> None:
    model = init_model(UNet, TINY, seed=0).eval()
    _perturb_output(model)
    x = torch.randn(4, 2, 8, 8, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([3, 1, 4, 1])
    with torch.no_grad():
        full = model(x, t)
        half = model(x[:2], t[:2])
    assert torch.allclose(full[:2], half, atol=1e-6)


def test_unet_other_sizes() -> None:
    config = UNetConfig(in_channels=4, latent_size=16, channels=(8, 8, 16), blocks_per_level=2,
                        time_dim=4, groups=4)
    model = init_model(UNet, config, seed=0)
    x = torch.randn(2, 4, 16, 16)
    assert model(x, torch.tensor([0, 1])).shape == x.shape


def test_channels_last_layout_keeps_the_outputs() -> None:
    g = torch.Generator().manual_seed(0)
    model = init_model(UNet, TINY, 0).eval()
    with torch.no_grad():
        for p in model.parameters():  # the zero-initialised output conv would hide the body
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    x_t, t = torch.randn(5, 2, 8, 8, generator=g), torch.tensor([0, 3, 10, 30, 49])
    with torch.no_grad():
        expected = model(x_t, t)
        moved = to_device(model, "cpu")
        assert moved.stem.weight.is_contiguous(memory_format=torch.channels_last)
        assert torch.allclose(moved(x_t, t), expected, atol=1e-5)
