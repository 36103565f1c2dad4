"""Own data end to end: a labelled folder of 32x32 colour PNGs and an unlabelled .npz, each
through `ldm run --preset tiny`, and the data's content in every stage key."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from latentdiffusion.cli import main
from latentdiffusion.data import load_dataset
from latentdiffusion.errors import DataError
from latentdiffusion.evaluation.samples import load_samples
from latentdiffusion.evaluation.tables import scored_sets
from latentdiffusion.run.scores import validation_rows

CLASSES = ("red", "green", "blue")


def _discs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (n, 32, 32, 3): a disc of the label's colour on black, at a random place."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % len(CLASSES)
    images = np.zeros((n, 32, 32, 3), np.uint8)
    rows, cols = np.mgrid[:32, :32]
    for i, label in enumerate(labels):
        y, x = rng.integers(10, 22, size=2)
        images[i][(rows - y) ** 2 + (cols - x) ** 2 < rng.integers(16, 64)] = 0
        images[i][(rows - y) ** 2 + (cols - x) ** 2 < rng.integers(16, 64), label] = 220
    return images, labels


def _stages(err: str) -> dict[str, str]:
    return {m.group(1): "skipped" if "skipped" in m.group(2) else "ran"
            for m in re.finditer(r"^\[(\w+)\] (.*)$", err.replace("\r", "\n"), flags=re.M)}


def _is_colour(png: Path) -> bool:
    pixels = np.asarray(Image.open(png).convert("RGB")).astype(int)
    return bool((np.abs(pixels[..., 0] - pixels[..., 1]) > 30).any())


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A labelled ImageFolder: one subfolder per class, no test/ split (a hold-out is made)."""
    images, labels = _discs(120, seed=0)
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        (tmp_path / "discs" / CLASSES[label]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(tmp_path / "discs" / CLASSES[label] / f"{i:03d}.png")
    return tmp_path / "discs"


def test_labelled_colour_folder_end_to_end(folder: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    argv = ["run", "--preset", "tiny", "--data-dir", str(folder), "--run-dir", str(run),
            "--device", "cpu"]
    assert main(argv) == 0
    capsys.readouterr()
    for name in ("random", "vae-prior", "vae-reconstruction", "ddim-5", "ddpm"):
        images, _ = load_samples(run / "samples" / f"{name}.npz")
        assert images.shape[1:] == (32, 32, 3) and images.dtype == np.uint8
    assert _is_colour(run / "figures" / "reconstructions.png")  # the test images, in colour
    metrics = json.loads((run / "metrics.json").read_text())
    assert len(metrics["ddpm"]["class_histogram"]) == 3
    assert 0 <= metrics["validation"]["accuracy"] <= 1  # a classifier of the folder's labels
    dataset = load_dataset(folder)
    recorded = json.loads((run / "run.json").read_text())["data"]
    assert recorded["content_sha256"] == dataset.content_hash
    assert recorded["class_names"] == sorted(CLASSES) and recorded["source"] == "folder"
    report = (run / "report.md").read_text()
    assert "Data set `discs` (folder" in report and "32x32 RGB, 3 classes (blue, green, red)" \
        in report
    assert "digit" not in report.lower() and "Post's FID" not in report

    # Changing one pixel of the data set is another data set: everything is redone.
    path = next((folder / "red").glob("*.png"))
    pixels = np.asarray(Image.open(path)).copy()
    pixels[0, 0] = 255 - pixels[0, 0]
    Image.fromarray(pixels).save(path)
    assert main(argv) == 0
    stages = _stages(capsys.readouterr().err)
    assert stages["classifier"] == stages["vae"] == stages["diffusion"] == "ran"


def test_unlabelled_npz_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    train, _ = _discs(96, seed=1)
    test, _ = _discs(40, seed=2)
    path = tmp_path / "discs.npz"
    np.savez(path, train_images=train, test_images=test)
    run = tmp_path / "run"
    argv = ["run", "--preset", "tiny", "--data-dir", str(path), "--run-dir", str(run),
            "--device", "cpu"]
    assert main(argv) == 0
    capsys.readouterr()
    images, labels = load_samples(run / "samples" / "ddpm.npz")
    assert images.shape == (24, 32, 32, 3) and labels is None
    _, labels = load_samples(run / "samples" / "vae-reconstruction.npz")
    assert labels is None
    header = json.loads((run / "run.json").read_text())["config"]["classifier"]
    assert header["task"] == "rotation" and header["num_classes"] == 4
    metrics = json.loads((run / "metrics.json").read_text())
    for entry in scored_sets(metrics).values():  # rotations are not classes: no class columns
        assert entry["class_histogram"] is None and "accuracy" not in entry
        assert entry["fid"] is not None
    report = (run / "report.md").read_text()
    assert "rotation-prediction network" in report and "NOT comparable" in report
    assert not (run / "figures" / "class_histogram.png").exists()
    # Data of the same shape but other content is not this run's: not encoded, reconstructed
    # or scored with its models.
    other = tmp_path / "other.npz"
    np.savez(other, train_images=255 - train, test_images=test)
    latents = (run / "latents.safetensors").read_bytes()
    for command in (["encode"], ["sample", "--model", "vae", "--reconstruct", "test", "--out",
                                 str(tmp_path / "r.npz")]):
        assert main([*command, "--data-dir", str(other), "--run-dir", str(run), "--device",
                     "cpu"]) == 2
        assert "vae.safetensors was trained on another data set than other" in \
            capsys.readouterr().err
    assert (run / "latents.safetensors").read_bytes() == latents
    # A conditional model needs labels this data set does not have: one line, nothing made.
    assert main([*argv[:-4], "--run-dir", str(tmp_path / "cond"), "--device", "cpu",
                 "--conditional"]) == 2
    assert capsys.readouterr().err.strip() == \
        "error: a class-conditional model needs a data set labelled with 2 classes or more"
    assert not (tmp_path / "cond").exists()


def test_config_of_another_data_set_is_refused(folder: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "mnist.toml"
    assert main(["config", "--preset", "tiny"]) == 0  # MNIST's shape: 28x28x1, 10 classes
    config.write_text(capsys.readouterr().out)
    assert main(["run", "--config", str(config), "--data-dir", str(folder), "--run-dir",
                 str(tmp_path / "run"), "--device", "cpu"]) == 2
    line = capsys.readouterr().err.strip()
    assert line == ("error: the config is for images 28x28x1, 10 classes but the data set has "
                    "32x32x3, 3 classes; print one for it with `ldm config --data-dir ...`")
    assert not (tmp_path / "run").exists()
    # The config printed for the folder runs on it: same stage keys as the scaled preset.
    assert main(["config", "--preset", "tiny", "--data-dir", str(folder)]) == 0
    config.write_text(capsys.readouterr().out)
    assert "image_size = 32" in config.read_text() and "image_channels = 3" in config.read_text()


def test_conditional_run_on_three_classes(folder: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert main(["run", "--preset", "tiny", "--conditional", "--data-dir", str(folder),
                 "--run-dir", str(run), "--device", "cpu", "--quiet",
                 "--set", "eval_samples=6"]) == 0  # fewer than the 11 test images
    capsys.readouterr()
    images, labels = load_samples(run / "samples" / "ddpm.npz")
    assert labels is not None and list(labels) == [i % 3 for i in range(24)]  # balanced over K
    metrics = json.loads((run / "metrics.json").read_text())
    assert len(metrics["ddpm"]["fid_per_class"]) == 3
    # The folder's test split is read class by class and the run scores 6 of its images: a
    # subset across the classes, with each image's own label (not the first 6 images).
    test_images, test_labels = load_dataset(folder).split("test")
    assert test_labels is not None and len(test_images) == 11
    _, reconstruction_labels = load_samples(run / "samples" / "vae-reconstruction.npz")
    assert reconstruction_labels is not None and len(set(reconstruction_labels.tolist())) > 1
    assert np.array_equal(reconstruction_labels, test_labels[validation_rows(11, 6)])
    grid = np.asarray(Image.open(run / "figures" / "class_grid.png"))
    assert grid.shape[0] * 10 < grid.shape[1] * 4  # 3 rows of 10 cells: wider than tall
    assert "FID of classes blue, green, red" in (run / "report.md").read_text()
    assert main(["sample", "--run-dir", str(run), "--model", "diffusion", "--labels", "3",
                 "-n", "2", "--out", str(tmp_path / "x.npz"), "--device", "cpu"]) == 2
    assert "label 3 is not a class of this model (0..2)" in capsys.readouterr().err


def test_validation_rows_are_a_fixed_subset_across_the_classes() -> None:
    labels = np.repeat(np.arange(10), 100)  # sorted by class, as a folder is read
    rows = validation_rows(len(labels), 200)
    assert len(set(rows.tolist())) == 200 and (np.diff(rows) > 0).all()  # distinct, file order
    assert np.array_equal(rows, validation_rows(len(labels), 200))  # the same every time
    counts = np.bincount(labels[rows], minlength=10)
    assert counts.min() >= 10  # every class scored, not the first two
    assert np.array_equal(validation_rows(50, 200), np.arange(50))  # all when n >= count


# ---------------------------------------------------------------- QA round: nothing is lost


def test_outputs_never_replace_other_files(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data.npz"
    train, _ = _discs(8, seed=3)
    np.savez(data, train_images=train, test_images=train[:2])
    record = tmp_path / "run.json"
    record.write_text('{"stages": {}}')
    before = data.read_bytes(), record.read_bytes()
    run = ["--run-dir", str(tmp_path / "run"), "--device", "cpu"]
    assert main(["sample", "--model", "vae", "-n", "2", "--out", str(data), *run]) == 2
    assert "exists and is not an earlier samples file" in capsys.readouterr().err
    assert main(["evaluate", "--samples", str(data), "--out", str(record), *run]) == 2
    assert "exists and is not an earlier evaluation file" in capsys.readouterr().err
    assert main(["evaluate", "--samples", str(data), "--out", str(tmp_path / "a.png"),
                 *run]) == 2
    assert (data.read_bytes(), record.read_bytes()) == before
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("setting", "line"), [
    ("vae_train.batch_size=97", "error: vae_train.batch_size 97 is larger than the 96 "
                                "training images of discs"),
    ("eval_samples=10000000000", "error: --set eval_samples: RunConfig.eval_samples must be at "
                                 "most 342392 for 28x28x1 images (a set holds at most 256 MiB "
                                 "of pixels), got 10000000000"),
])
def test_a_run_that_cannot_finish_is_refused_first(tmp_path: Path, setting: str, line: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    train, _ = _discs(96, seed=1)
    np.savez(tmp_path / "discs.npz", train_images=train, test_images=train[:8])
    assert main(["run", "--preset", "tiny", "--data-dir", str(tmp_path / "discs.npz"),
                 "--run-dir", str(tmp_path / "run"), "--device", "cpu",
                 "--set", setting]) == 2
    assert capsys.readouterr().err.strip() == line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("train", "test", "line"), [
    (96, 1, "error: the test split of few holds 1 image; ldm run needs at least 4 in each split "
            "(every score defined): give it more images"),
    (1, 8, "error: the train split of few holds 1 image; ldm run needs at least 4 in each split "
           "(every score defined): give it more images"),
])
def test_a_split_too_small_to_score_is_refused_first(tmp_path: Path, train: int, test: int,
                                                     line: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    images, _ = _discs(96, seed=1)
    np.savez(tmp_path / "few.npz", train_images=images[:train], test_images=images[:test])
    batches = [f"--set={name}_train.batch_size=1" for name in ("classifier", "vae", "diffusion")]
    assert main(["run", "--preset", "tiny", "--data-dir", str(tmp_path / "few.npz"),
                 "--run-dir", str(tmp_path / "run"), "--device", "cpu", *batches]) == 2
    assert capsys.readouterr().err.strip() == line
    assert not (tmp_path / "run").exists()


def test_a_pickled_npz_array_is_named_not_called_corrupt(tmp_path: Path) -> None:
    train, labels = _discs(6, seed=4)
    path = tmp_path / "objects.npz"
    np.savez(path, train_images=train, test_images=train[:3], train_labels=labels,
             test_labels=labels[:3], class_names=np.array(CLASSES, dtype=object))
    with pytest.raises(DataError, match="class_names.npy is an array of Python objects"):
        load_dataset(path)


def test_config_copies_follow_the_latest_run(tmp_path: Path, folder: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    toml, json_file = tmp_path / "a.toml", tmp_path / "a.json"
    assert main(["config", "--preset", "tiny", "--data-dir", str(folder)]) == 0
    toml.write_text(capsys.readouterr().out)
    assert main(["config", "--preset", "tiny", "--data-dir", str(folder), "--format",
                 "json"]) == 0
    json_file.write_text(capsys.readouterr().out)
    common = ["run", "--data-dir", str(folder), "--run-dir", str(run), "--device", "cpu",
              "--quiet"]
    assert main([*common, "--config", str(toml)]) == 0
    assert (run / "config.toml").is_file()
    assert main([*common, "--config", str(json_file)]) == 0  # same values: every stage skipped
    assert (run / "config.json").is_file() and not (run / "config.toml").exists()
    assert main([*common, "--preset", "tiny"]) == 0
    assert not list(run.glob("config.*"))  # no file made this run: run.json alone says it


def test_a_registered_name_on_other_data_says_what_to_do(folder: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        load_dataset(folder, "fashion-mnist")
    assert str(err.value) == (f"{folder} holds images, not the IDX files of fashion-mnist; "
                              "leave out --dataset to read it as a folder of images")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"run `ldm data download --dataset fashion-mnist "
                                        f"--data-dir {empty}`"):
        load_dataset(empty, "fashion-mnist")


def test_torchrun_does_not_download_from_every_rank(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("LDM_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["run", "--preset", "tiny", "--run-dir", str(tmp_path / "run"), "--device",
                 "cpu"]) == 2
    assert "under torchrun, fetch it first (`ldm data download --dataset mnist`)" in \
        capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    assert not (tmp_path / "cache" / "latentdiffusion").exists()  # nothing fetched
