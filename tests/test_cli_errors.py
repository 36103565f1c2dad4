"""The CLI's failure modes: exit code 2 for usage errors, 1 for data/runtime errors, and
exactly one `error: ...` line on stderr (no traceback), run in-process through `main(argv)`."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import socket
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_dataset
from latentdiffusion.cli import main
from latentdiffusion.data.registry import DATASETS

CPU = ["--device", "cpu"]


def ldm(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of `ldm argv`; argparse's usage errors exit via SystemExit."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_fails(capsys: pytest.CaptureFixture[str], code: int, *argv: str | Path,
                 match: str = "") -> str:
    """Run `ldm argv`, expect exit `code` and one `error:` line (containing `match`) only."""
    got, out, err = ldm(capsys, *argv)
    lines = err.splitlines()
    assert got == code, (got, err)
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    assert match in lines[0], (match, lines[0])
    assert out == ""
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(data dir, run dir holding a tiny VAE) trained once for this module."""
    root = tmp_path_factory.mktemp("cli")
    data = write_dataset(root / "data", n_train=48, n_test=20)
    run = root / "run"
    code = main(["train", "vae", "--preset", "tiny", "--data-dir", str(data), "--run-dir",
                 str(run), *CPU, "--quiet"])
    assert code == 0 and (run / "vae.safetensors").is_file()
    return data, run


@pytest.fixture
def samples(tmp_path: Path) -> Path:
    path = tmp_path / "samples.npz"
    np.savez(path, images=np.zeros((8, 28, 28), np.uint8))
    return path


# ---------------------------------------------------------------- data errors (exit 1)


def test_verify_missing_data_dir(capsys: pytest.CaptureFixture[str]) -> None:
    line = assert_fails(capsys, 1, "data", "verify", "--data-dir", "/nonexistent",
                        match="data directory /nonexistent does not exist")
    assert "--data-dir" in line


def test_verify_truncated_gzip(capsys: pytest.CaptureFixture[str], data_dir: Path) -> None:
    path = data_dir / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:200])
    assert_fails(capsys, 1, "data", "verify", "--data-dir", data_dir,
                 match=f"{path}: truncated or corrupt gzip")


def test_verify_synthetic_data_is_not_the_original(capsys: pytest.CaptureFixture[str],
                                                   data_dir: Path) -> None:
    assert_fails(capsys, 1, "data", "verify", "--data-dir", data_dir, "--dataset", "mnist",
                 match="content differs from the original mnist release")


def test_train_on_missing_and_truncated_data(capsys: pytest.CaptureFixture[str],
                                             data_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert_fails(capsys, 1, "train", "classifier", "--preset", "tiny", "--data-dir",
                 tmp_path / "nowhere", "--run-dir", run, *CPU,
                 match=f"data directory {tmp_path / 'nowhere'} does not exist")
    path = data_dir / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-10])
    assert_fails(capsys, 1, "train", "classifier", "--preset", "tiny", "--data-dir", data_dir,
                 "--run-dir", run, *CPU, match=str(path))
    assert not (run / "classifier.safetensors").exists()
    assert not (run / ".lock").exists()


def test_evaluate_float_samples(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "float.npz"
    np.savez(path, images=np.zeros((8, 28, 28), np.float32))
    assert_fails(capsys, 1, "evaluate", "--samples", path, "--run-dir", tmp_path / "run", *CPU,
                 match=f"{path}: images must be uint8")


def test_evaluate_missing_samples(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert_fails(capsys, 1, "evaluate", "--samples", tmp_path / "none.npz", "--run-dir",
                 tmp_path / "run", *CPU, match="does not exist")


def test_evaluate_without_a_classifier(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                       samples: Path) -> None:
    assert_fails(capsys, 1, "evaluate", "--samples", samples, "--run-dir", tmp_path / "run",
                 *CPU, match="classifier.safetensors does not exist")


def test_vae_checkpoint_where_the_classifier_is_expected(
        capsys: pytest.CaptureFixture[str], trained: tuple[Path, Path], tmp_path: Path,
        samples: Path) -> None:
    data, trained_run = trained
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(trained_run / "vae.safetensors", run / "classifier.safetensors")
    assert_fails(capsys, 1, "evaluate", "--samples", samples, "--data-dir", data, "--run-dir",
                 run, *CPU, match="holds a 'vae' checkpoint, expected 'classifier'")


def test_corrupt_vae_checkpoint(capsys: pytest.CaptureFixture[str],
                                trained: tuple[Path, Path], tmp_path: Path) -> None:
    _, trained_run = trained
    run = tmp_path / "run"
    run.mkdir()
    raw = bytearray((trained_run / "vae.safetensors").read_bytes())
    raw[-3] ^= 0x10
    (run / "vae.safetensors").write_bytes(bytes(raw))
    assert_fails(capsys, 1, "sample", "--model", "vae", "-n", "2", "--out", tmp_path / "s.npz",
                 "--run-dir", run, *CPU, match="is corrupt")
    assert not (tmp_path / "s.npz").exists()


def test_run_dir_under_a_regular_file(capsys: pytest.CaptureFixture[str], data_dir: Path,
                                      tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert_fails(capsys, 1, "train", "classifier", "--preset", "tiny", "--data-dir", data_dir,
                 "--run-dir", blocker / "run", *CPU, match="cannot create run directory")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_run_dir(capsys: pytest.CaptureFixture[str], data_dir: Path,
                           tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir(mode=0o500)
    try:
        assert_fails(capsys, 1, "train", "classifier", "--preset", "tiny", "--data-dir",
                     data_dir, "--run-dir", run, *CPU, match="not writable")
    finally:
        run.chmod(0o700)


def test_run_dir_in_use(capsys: pytest.CaptureFixture[str], data_dir: Path,
                        tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text(f"{socket.gethostname()} {os.getppid()}")
    assert_fails(capsys, 1, "train", "classifier", "--preset", "tiny", "--data-dir", data_dir,
                 "--run-dir", run, *CPU, match=f"in use by process {os.getppid()}")


# ---------------------------------------------------------------- usage errors (exit 2)


def test_unknown_dataset(capsys: pytest.CaptureFixture[str], data_dir: Path) -> None:
    assert_fails(capsys, 2, "data", "verify", "--dataset", "cifar", "--data-dir", data_dir,
                 match="unknown dataset 'cifar'")


def test_unknown_preset(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert_fails(capsys, 2, "train", "classifier", "--preset", "nope", "--run-dir",
                 tmp_path / "run", *CPU, match="unknown preset 'nope'")


@pytest.mark.parametrize("argv, match", [
    (["train", "classifier", "--steps", "0"], "must be > 0, got 0"),
    (["train", "vae", "--batch-size", "-4"], "must be > 0, got -4"),
    (["train", "vae", "--steps", "two"], "'two' is not an integer"),
    (["sample", "--model", "vae", "-n", "0", "--out", "x.npz"], "must be > 0, got 0"),
    (["sample", "--model", "gan", "--out", "x.npz"], "invalid choice: 'gan'"),
    (["sample", "--model", "vae"], "--out"),
    (["evaluate"], "one of the arguments --samples --baselines is required"),
    (["train", "transformer"], "invalid choice: 'transformer'"),
    (["fly"], "invalid choice: 'fly'"),
])
def test_argparse_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                         argv: list[str], match: str) -> None:
    line = assert_fails(capsys, 2, *argv, "--run-dir", tmp_path / "run", match=match)
    assert "--help" in line
    assert not (tmp_path / "run").exists()  # rejected before anything is written


def test_unknown_sampler(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert_fails(capsys, 2, "sample", "--model", "diffusion", "--sampler", "foo", "--out",
                 tmp_path / "s.npz", "--run-dir", tmp_path / "run", *CPU,
                 match="unknown sampler 'foo'")


@pytest.mark.parametrize(("flag", "value"), [("--latent-norm", "batch"),
                                           ("--latent-mode", "median")])
def test_unknown_latent_option(capsys: pytest.CaptureFixture[str], tmp_path: Path, flag: str,
                               value: str) -> None:
    # Checked before the VAE is read: the run directory does not even exist.
    assert_fails(capsys, 2, "encode", flag, value, "--run-dir", tmp_path / "run", *CPU,
                 match=f"unknown value '{value}'")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_on_a_cpu_only_machine(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert_fails(capsys, 2, "train", "classifier", "--preset", "tiny", "--run-dir",
                 tmp_path / "run", "--device", "cuda", match="CUDA is not available")


def test_unknown_device(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert_fails(capsys, 2, "sample", "--model", "vae", "--out", tmp_path / "s.npz",
                 "--run-dir", tmp_path / "run", "--device", "tpu", match="unknown device 'tpu'")


def test_second_train_needs_resume_or_force(capsys: pytest.CaptureFixture[str],
                                            trained: tuple[Path, Path], tmp_path: Path) -> None:
    data, trained_run = trained
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    before = (run / "vae.safetensors").read_bytes()
    line = assert_fails(capsys, 2, "train", "vae", "--preset", "tiny", "--data-dir", data,
                        "--run-dir", run, *CPU, match="already has a vae model")
    assert "--resume" in line and "--force" in line
    assert (run / "vae.safetensors").read_bytes() == before
    assert not (run / ".lock").exists()


# ---------------------------------------------------------------- success paths


def _real_mnist() -> Path | None:
    """The real MNIST files: $LDM_TEST_MNIST, else shared/data/mnist in a parent directory."""
    if os.environ.get("LDM_TEST_MNIST"):
        return Path(os.environ["LDM_TEST_MNIST"])
    for parent in Path(__file__).resolve().parents:
        candidate = parent / "shared" / "data" / "mnist"
        if candidate.is_dir():
            return candidate
    return None


def test_verify_real_mnist(capsys: pytest.CaptureFixture[str]) -> None:
    root = _real_mnist()
    if root is None or not (root / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("real MNIST not found (set LDM_TEST_MNIST or provide shared/data/mnist)")
    code, out, err = ldm(capsys, "data", "verify", "--data-dir", root, "--dataset", "mnist",
                         "--quiet")
    assert code == 0, err
    assert json.loads(out) == {"train": {"images": [60000, 28, 28], "labels": 60000},
                               "test": {"images": [10000, 28, 28], "labels": 10000}}
    code, out, err = ldm(capsys, "data", "verify", "--data-dir", root)  # named by content
    assert (code, err) == (0, "")
    described = json.loads(out)
    assert {k: described[k] for k in ("name", "source", "train", "test")} == \
        {"name": "mnist", "source": "idx", "train": 60000, "test": 10000}


def test_verify_describes_a_folder_and_an_npz(capsys: pytest.CaptureFixture[str],
                                              tmp_path: Path, data_dir: Path) -> None:
    folder = tmp_path / "shapes"
    for i in range(12):
        (folder / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((16, 16, 3), 20 * i, np.uint8)).save(folder / f"c{i % 2}/{i}.png")
    code, out, err = ldm(capsys, "data", "verify", "--data-dir", folder)
    assert (code, err) == (0, "")
    described = json.loads(out)
    assert (described["name"], described["source"], described["class_names"]) == \
        ("shapes", "folder", ["c0", "c1"])
    assert (described["image_size"], described["channels"]) == (16, 3)
    assert described["train"] + described["test"] == 12
    assert len(described["content_sha256"]) == 64

    npz = tmp_path / "shapes.npz"
    np.savez(npz, train_images=np.zeros((3, 16, 16), np.uint8),
             test_images=np.ones((2, 16, 16), np.uint8))
    code, out, err = ldm(capsys, "data", "verify", "--data-dir", npz)
    assert (code, json.loads(out)["test"], json.loads(out)["class_names"]) == (0, 2, [])
    code, out, err = ldm(capsys, "data", "verify", "--data-dir", data_dir)  # synthetic IDX
    assert (code, json.loads(out)["name"]) == (0, "data")
    # A published release is checked only when named; a folder is not one.
    assert_fails(capsys, 1, "data", "verify", "--data-dir", folder, "--dataset", "mnist",
                 match="train-images-idx3-ubyte.gz is missing")


def test_verify_synthetic_raw_data(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    root = write_dataset(tmp_path / "raw", n_train=12, n_test=7, gz=False)
    content = {path.name: hashlib.md5(path.read_bytes()).hexdigest() for path in root.iterdir()}
    monkeypatch.setitem(DATASETS, "mnist", replace(DATASETS["mnist"], content_md5=content))
    code, out, err = ldm(capsys, "data", "verify", "--data-dir", root, "--dataset", "mnist")
    assert (code, err) == (0, "")
    assert json.loads(out)["test"] == {"images": [7, 28, 28], "labels": 7}


@pytest.mark.parametrize("kind", ["npy", "truncated", "text"])
def test_evaluate_samples_that_are_not_npz(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                           samples: Path, kind: str) -> None:
    path = tmp_path / f"{kind}.npz"
    if kind == "npy":
        np.save(tmp_path / "a.npy", np.zeros((8, 28, 28), np.uint8))
        (tmp_path / "a.npy").rename(path)
    elif kind == "truncated":
        path.write_bytes(samples.read_bytes()[:100])
    else:
        path.write_text("images\n")
    assert_fails(capsys, 1, "evaluate", "--samples", path, "--run-dir", tmp_path / "run", *CPU,
                 match=str(path))


def test_download_without_a_reachable_mirror(capsys: pytest.CaptureFixture[str],
                                             tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    info = DATASETS["mnist"]
    dead = (tmp_path / "offline").as_uri() + "/"
    monkeypatch.setitem(DATASETS, "mnist", replace(info, mirrors=(dead,)))
    assert_fails(capsys, 1, "data", "download", "--data-dir", tmp_path / "d", "--quiet",
                 match="could not download train-images-idx3-ubyte.gz")
    assert not list((tmp_path / "d").iterdir())


def test_download_from_a_local_mirror(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    mirror = write_dataset(tmp_path / "mirror", n_train=12, n_test=7)
    md5 = {name: hashlib.md5((mirror / name).read_bytes()).hexdigest()
           for name in DATASETS["mnist"].md5}
    content = {name.removesuffix(".gz"): hashlib.md5(gzip.decompress((mirror / name).read_bytes()))
               .hexdigest() for name in md5}
    monkeypatch.setitem(DATASETS, "mnist", replace(DATASETS["mnist"], md5=md5, content_md5=content,
                                                   mirrors=(mirror.as_uri() + "/",)))
    code, out, err = ldm(capsys, "data", "download", "--data-dir", tmp_path / "d", "--quiet")
    assert (code, err) == (0, "")
    result = json.loads(out)
    assert result["data_dir"] == str(tmp_path / "d")
    assert result["train"] == {"images": [12, 28, 28], "labels": 12}
