"""Values that parse but cannot run are refused from the config, before anything is allocated:
models by their parameter count, schedules by their length, sets by their pixels, data sets by
their classes; and generation keeps uint8 pixels per batch, never float for the whole set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_dataset
from latentdiffusion.cli.main import main
from latentdiffusion.data.images import to_uint8
from latentdiffusion.data.npz import read_npz
from latentdiffusion.errors import DataError
from latentdiffusion.run import generation
from latentdiffusion.run.rundir import RunDir


@pytest.mark.parametrize(("setting", "line"), [
    ("unet.channels=100000,100000", "error: --set unet.channels: unet would have "
                                    "1,210,040,201,346 parameters, more than the 50,000,000 a "
                                    "model may have here; give it fewer or narrower channels"),
    ("vae.channels=30000,30000", "error: --set vae.channels: vae would have"),
    ("schedule.num_timesteps=1000000000", "error: --set schedule.num_timesteps: "
                                          "ScheduleConfig.num_timesteps must be at most 10000, "
                                          "got 1000000000"),
    ("eval_samples=1000000", "error: --set eval_samples: RunConfig.eval_samples must be at most "
                             "342392 for 28x28x1 images"),
    ("sampling.num_samples=342393", "error: --set sampling.num_samples: RunConfig: "
                                    "sampling.num_samples must be at most 342392"),
])
def test_a_config_that_cannot_run_is_refused(setting: str, line: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "--preset", "tiny", "--set", setting]) == 2
    err = capsys.readouterr().err
    assert err.startswith(line) and err.count("\n") == 1


def test_the_largest_set_depends_on_the_image_size(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "--preset", "tiny", "--set", "eval_samples=342392"]) == 0
    capsys.readouterr()


def test_a_stray_label_far_above_the_classes_is_refused(tmp_path: Path) -> None:
    images = np.zeros((8, 16, 16), np.uint8)
    labels = np.arange(8) % 2
    labels[5] = 9999
    path = tmp_path / "stray.npz"
    np.savez(path, train_images=images, train_labels=labels, test_images=images[:2],
             test_labels=labels[:2])
    with pytest.raises(DataError, match="labels go up to 9999, more than the 1000 classes"):
        read_npz(path)


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory with a tiny VAE only: what `ldm sample --model vae` needs."""
    root = tmp_path_factory.mktemp("limits")
    data = write_dataset(root / "data", n_train=48, n_test=24)
    assert main(["train", "vae", "--preset", "tiny", "--data-dir", str(data), "--run-dir",
                 str(root / "run"), "--device", "cpu", "--quiet"]) == 0
    return root / "run"


def test_a_set_past_the_largest_is_refused_before_sampling(
        vae_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "big.npz"
    assert main(["sample", "--run-dir", str(vae_run), "--model", "vae", "-n", "1000000",
                 "--out", str(out), "--device", "cpu", "--quiet"]) == 2
    assert capsys.readouterr().err == ("error: -n must be at most 342392 for 28x28x1 images "
                                       "(a set holds at most 256 MiB of pixels), got 1000000\n")
    assert not out.exists()


def test_generation_keeps_uint8_per_batch(vae_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each batch is decoded and made uint8 at once: float pixels never exist for the whole
    set, whose memory is then a quarter of theirs."""
    converted: list[int] = []

    def counting(images: torch.Tensor) -> np.ndarray:
        converted.append(len(images))
        return to_uint8(images)

    monkeypatch.setattr(generation, "to_uint8", counting)
    images = generation.generate(RunDir(vae_run), "vae", 10, 0, device=torch.device("cpu"),
                                 batch_size=4, progress=False)
    assert converted == [4, 4, 2]
    assert images.dtype == np.uint8 and images.shape == (10, 28, 28)


@pytest.mark.parametrize("option", [["--sampler", "heun"], ["--steps", "3"],
                                    ["--eta", "0.5"], ["--variance", "beta"]])
def test_sampler_options_with_the_vae_are_refused(option: list[str], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """The VAE samples its prior: a sampler option given with it would be ignored."""
    assert main(["sample", "--run-dir", str(tmp_path / "run"), "--model", "vae", *option,
                 "-n", "4", "--out", str(tmp_path / "x.npz"), "--device", "cpu"]) == 2
    assert capsys.readouterr().err == ("error: --sampler, --steps, --variance and --eta work "
                                       "with --model diffusion\n")
    assert not (tmp_path / "x.npz").exists()


def test_labels_on_a_guided_preset_name_the_conditional_model(
        capsys: pytest.CaptureFixture[str]) -> None:
    """The tiny preset's autoguidance is not the user's: the line says what labels need."""
    assert main(["config", "--preset", "tiny", "--set", "sampling.labels=1"]) == 2
    assert "labels ask for a class-conditional model (--conditional" in capsys.readouterr().err
