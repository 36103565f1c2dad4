"""`--augment xflip`: mirrored images for the VAE, mirrored latents for the denoiser."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from latentdiffusion.cli import main
from latentdiffusion.data.images import mirror_where, mirrored, to_unit_tensor
from latentdiffusion.models import VAE
from latentdiffusion.models.vae import VAEConfig
from latentdiffusion.run import checkpoint, keys, latents
from latentdiffusion.run.presets import preset


def test_mirrored_reverses_each_row_gray_and_colour() -> None:
    gray = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    assert mirrored(gray)[1, 2].tolist() == gray[1, 2, ::-1].tolist()
    colour = np.arange(2 * 3 * 4 * 3, dtype=np.uint8).reshape(2, 3, 4, 3)
    flipped = mirrored(colour)
    assert flipped[0, 1, 0].tolist() == colour[0, 1, 3].tolist()  # a pixel keeps its RGB
    assert flipped.flags.c_contiguous
    assert np.array_equal(mirrored(flipped), colour)


def test_mirror_where_flips_only_the_chosen_images() -> None:
    images = torch.arange(3 * 1 * 2 * 2, dtype=torch.float32).reshape(3, 1, 2, 2)
    out = mirror_where(images, torch.tensor([True, False, True]))
    assert torch.equal(out[1], images[1])
    assert torch.equal(out[0], images[0].flip(-1)) and torch.equal(out[2], images[2].flip(-1))
    assert out[0, 0, 0].tolist() == [1.0, 0.0]


def test_keys_name_the_augmentation_only_when_there_is_one() -> None:
    c = preset("tiny")
    plain = keys.model_key(c.vae, c.vae_train, "data")
    assert keys.model_key(c.vae, c.vae_train, "data", "none") == plain
    flipped = keys.model_key(c.vae, c.vae_train, "data", "xflip")
    assert flipped.digest != plain.digest and flipped.fields["augment"] == "xflip"
    assert "augment" not in plain.fields
    assert (keys.latents_key("vae", "mean", "global", 0, "xflip").digest
            != keys.latents_key("vae", "mean", "global", 0).digest)


def test_latents_of_mirrored_images_and_the_training_set() -> None:
    config = VAEConfig(latent_channels=2, channels=(4, 8), image_size=16)
    vae = VAE(config).eval()
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (6, 16, 16), dtype=np.uint8)
    test = rng.integers(0, 256, (3, 16, 16), dtype=np.uint8)
    labels = np.arange(6) % 2
    cpu = torch.device("cpu")
    plain = latents.build(vae, "h", train, test, "mean", "global", 0, cpu, labels, labels[:3])
    both = latents.build(vae, "h", train, test, "mean", "global", 0, cpu, labels, labels[:3],
                         mirror=True)
    assert plain.train_mirrored is None and both.train_mirrored is not None
    expected = vae.encode(to_unit_tensor(train).flip(-1))[0]
    torch.testing.assert_close(both.train_mirrored, expected)
    assert torch.equal(both.train, plain.train)
    x0, y = both.training_set(labels=True)
    assert x0.shape == (12, 2, 4, 4) and y.tolist() == [0, 1, 0, 1, 0, 1] * 2
    torch.testing.assert_close(x0[6:], latents.normalise(expected, both.shift, both.scale))
    x0, y = both.training_set(labels=True, limit=2)  # two images and their two mirrors
    assert x0.shape[0] == 4 and y.tolist() == [0, 1, 0, 1]
    (only,) = plain.training_set(labels=False, limit=2)
    assert only.shape[0] == 2


def test_a_run_with_xflip_trains_on_twice_the_latents(data_dir: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    argv = ["run", "--data-dir", str(data_dir), "--run-dir", str(run), "--preset", "tiny",
            "--device", "cpu", "--quiet"]
    assert main([*argv, "--augment", "xflip"]) == 0
    tensors, header = checkpoint.load(run / "latents.safetensors", kind=latents.KIND)
    assert tensors["train_mirrored"].shape == tensors["train"].shape
    assert header["key_fields"]["augment"] == "xflip"
    vae_header = checkpoint.peek(run / "vae.safetensors")
    assert vae_header is not None and vae_header["key_fields"]["augment"] == "xflip"
    unet = checkpoint.peek(run / "diffusion.safetensors")
    assert unet is not None  # 6 steps of 16 over 2 x 96 latents
    assert unet["history"][-1]["epoch"] == pytest.approx(6 * 16 / (2 * 96), abs=1e-3)
    # Without it, the same run retrains the VAE and everything after it.
    assert main([*argv, "--augment", "none"]) == 0
    assert "train_mirrored" not in checkpoint.load(run / "latents.safetensors",
                                                   kind=latents.KIND)[0]


def test_an_unknown_augmentation_is_one_line(data_dir: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["run", "--data-dir", str(data_dir), "--run-dir", str(tmp_path / "r"),
                 "--preset", "tiny", "--augment", "yflip"])
    err = capsys.readouterr().err
    assert code == 2 and "augment: unknown value 'yflip' (choose from none, xflip)" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "r").exists()
