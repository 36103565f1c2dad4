"""Hostile arguments and files (issue #19, round 2): each gives one `error:` line or a warning
and a rebuilt file, never a traceback, and leaves what the user had in place."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from tqdm.auto import tqdm

from conftest import write_dataset
from latentdiffusion.cli import main
from latentdiffusion.errors import LdmError
from latentdiffusion.evaluation.samples import load_samples
from latentdiffusion.files import strict_json, write_json
from latentdiffusion.run import stages
from latentdiffusion.run.rundir import read_manifest, read_metrics
from test_cli_errors import CPU, assert_fails, ldm

# ---------------------------------------------------------------- arguments


@pytest.mark.parametrize("argv", [
    ["train", "vae"], ["encode"], ["sample", "--model", "vae", "--out", "x.npz"],
    ["evaluate", "--baselines"], ["run"]])
@pytest.mark.parametrize("seed", ["18446744073709551616", "9223372036854775808", "-1"])
def test_seed_out_of_range(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                           argv: list[str], seed: str) -> None:
    assert_fails(capsys, 2, *argv, "--seed", seed, "--run-dir", tmp_path / "run", *CPU,
                 match=f"argument --seed: must be in 0 .. 2**63 - 1, got {seed}")
    assert not (tmp_path / "run").exists()


def test_download_into_a_regular_file(capsys: pytest.CaptureFixture[str],
                                      tmp_path: Path) -> None:
    target = tmp_path / "mnist"
    target.write_text("mine")
    assert_fails(capsys, 1, "data", "download", "--data-dir", target,  # no empty bar either
                 match=f"cannot download into {target}: it exists and is not a directory")
    assert target.read_text() == "mine"


def test_verify_a_regular_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    target = tmp_path / "mnist"
    target.write_text("mine")
    assert_fails(capsys, 1, "data", "verify", "--data-dir", target,
                 match=f"{target} is not a directory, nor a regular file ending in .npz")
    assert_fails(capsys, 1, "data", "verify", "--data-dir", target, "--dataset", "mnist",
                 match=f"data directory {target} is not a directory")


def test_lock_that_is_a_directory(capsys: pytest.CaptureFixture[str], data_dir: Path,
                                  tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / ".lock").mkdir(parents=True)
    assert_fails(capsys, 1, "train", "classifier", "--preset", "tiny", "--data-dir", data_dir,
                 "--run-dir", run, *CPU, match=f"{run / '.lock'} is a directory")
    assert (run / ".lock").is_dir()


# ---------------------------------------------------------------- damaged state files


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(data dir, run dir of a finished `ldm run --preset tiny`), made once for this module."""
    root = tmp_path_factory.mktemp("hostile")
    data = write_dataset(root / "data", n_train=48, n_test=24)
    run = root / "run"
    assert main(["run", "--preset", "tiny", "--data-dir", str(data), "--run-dir", str(run),
                 *CPU, "--quiet"]) == 0
    return data, run


@pytest.mark.parametrize("content", ["{}", "[]", "null", '{"stages": []}',
                                     '{"stages": {"vae": 3}}', "\x00garbled", "",
                                     '{"stages": {"classifier": {}}}',
                                     '{"stages": {"vae": {"key": "k", "summary": ""}}}',
                                     '{"stages": {"vae": {"key": "k", "seconds": 1}}}',
                                     '{"stages": {}, "config": 3}'])
def test_damaged_manifest_reads_as_empty(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                         content: str) -> None:
    path = tmp_path / "run.json"
    path.write_text(content)
    assert read_manifest(path) == {"stages": {}}
    assert caplog.messages[-1].startswith(f"{path} is damaged (")
    assert caplog.messages[-1].endswith("); rebuilding it")


@pytest.mark.parametrize("content", ["{garbled", "[]", "{}", '{"validation": {"n": 1}}',
                                     '{"validation": 3}'])
def test_damaged_metrics_read_as_missing(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                         content: str) -> None:
    path = tmp_path / "metrics.json"
    path.write_text(content)
    assert read_metrics(path) is None
    assert caplog.messages[-1].startswith(f"{path} is damaged (")


def test_missing_state_files_are_quiet(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert read_manifest(tmp_path / "run.json") == {"stages": {}}
    assert read_metrics(tmp_path / "metrics.json") is None
    assert caplog.messages == []


@pytest.mark.parametrize(("name", "content"), [
    ("run.json", "{}"), ("run.json", '{"stages": []}'), ("metrics.json", "{garbled"),
    ("metrics.json", '{"validation": {"n": 1}}')])
def test_damaged_state_file_is_reported_and_rebuilt(
        capsys: pytest.CaptureFixture[str], tiny_run: tuple[Path, Path], tmp_path: Path,
        name: str, content: str) -> None:
    data, finished = tiny_run
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / name).write_text(content)
    model = (run / "diffusion.safetensors").read_bytes()
    code, out, err = ldm(capsys, "run", "--preset", "tiny", "--data-dir", data, "--run-dir", run,
                         *CPU, "--quiet")
    assert code == 0, err
    reported = [line for line in err.splitlines() if "damaged" in line]
    assert len(reported) == 1 and reported[0].startswith(f"warning: {run / name} is damaged ("), err
    assert reported[0].endswith("; rebuilding it") and "Traceback" not in err
    assert json.loads(out)["fid"]["validation"]["n"] == 24
    # Rebuilt: the stages that reran are recorded (trained ones were found by their hashes).
    assert {"sample", "evaluate"} <= json.loads((run / "run.json").read_text())["stages"].keys()
    assert json.loads((run / "metrics.json").read_text()).keys() == json.loads(
        (finished / "metrics.json").read_text()).keys()
    assert (run / "diffusion.safetensors").read_bytes() == model  # not retrained


# ---------------------------------------------------------------- outputs


@pytest.mark.parametrize("out", ["x.png", "x", "x.npz.png"])
def test_sample_out_must_be_an_npz(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                   out: str) -> None:
    target = tmp_path / out
    target.write_text("the user's file")
    assert_fails(capsys, 2, "sample", "--model", "vae", "--out", target, "--run-dir",
                 tmp_path / "run", *CPU, match="--out must end in .npz")
    assert target.read_text() == "the user's file"


def test_sample_whose_grid_cannot_be_written(capsys: pytest.CaptureFixture[str],
                                             tiny_run: tuple[Path, Path], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    _, run = tiny_run
    out = tmp_path / "s.npz"
    (tmp_path / "s.png").mkdir()  # the grid's name is taken by a directory: refused at once
    sample = ["sample", "--model", "vae", "-n", "3", "--out", out, "--run-dir", run, *CPU,
              "--quiet"]
    assert_fails(capsys, 2, *sample, match="(the grid of --out")
    assert not out.exists()
    (tmp_path / "s.png").rmdir()

    def full_disk(path: Path, *images: np.ndarray, **arrays: np.ndarray) -> None:
        raise LdmError(f"could not write {path}: no space left on device; nothing was replaced")

    monkeypatch.setattr("latentdiffusion.evaluation.samples.save_grid",
                        lambda images, path: full_disk(path))
    line = assert_fails(capsys, 1, *sample, match=f"{out} was written, but its grid was not "
                        "(could not write")
    assert str(tmp_path / "s.png") in line
    assert load_samples(out)[0].shape == (3, 28, 28)  # as the line says
    monkeypatch.setattr("latentdiffusion.evaluation.samples.write_npz", full_disk)
    line = assert_fails(capsys, 1, *sample, match=f"could not write {out}: no space left")
    assert "was written" not in line  # the earlier file is intact, and the line says so


@pytest.mark.parametrize("argv", [
    ["train", "classifier", "--preset", ""], ["train", "vae", "--lr", "nan"],
    ["train", "diffusion", "--schedule", "quadratic"], ["run", "--preset", ""],
    ["run", "--force", "everything"], ["encode", "--latent-norm", "batch"]])
def test_bad_values_are_refused_before_the_run_dir_exists(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: list[str]) -> None:
    assert_fails(capsys, 2, *argv, "--run-dir", tmp_path / "run", *CPU, "--quiet")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("failure", [LdmError("the disk is on fire"), KeyboardInterrupt()])
def test_last_line_is_not_printed_on_a_progress_bar(
        capsys: pytest.CaptureFixture[str], data_dir: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, failure: BaseException) -> None:
    def train_until_failure(*args: object, **kwargs: object) -> None:
        bar = tqdm(total=10, desc="classifier")  # like training's bar: stderr, \r updates
        bar.update(3)
        raise failure

    monkeypatch.setattr(stages, "train_classifier", train_until_failure)
    code, _, err = ldm(capsys, "train", "classifier", "--preset", "tiny", "--data-dir",
                       data_dir, "--run-dir", tmp_path / "run", *CPU)
    assert code == (130 if isinstance(failure, KeyboardInterrupt) else 1)
    last = err.splitlines()[-1]
    assert last.startswith(("error: the disk is on fire", "interrupted; ")), repr(err)


def test_evaluate_one_image_prints_strict_json(capsys: pytest.CaptureFixture[str],
                                               tiny_run: tuple[Path, Path],
                                               tmp_path: Path) -> None:
    data, run = tiny_run
    path = tmp_path / "one.npz"
    np.savez(path, images=np.zeros((1, 28, 28), np.uint8))
    code, out, err = ldm(capsys, "evaluate", "--samples", path, "--data-dir", data, "--run-dir",
                         run, *CPU, "--quiet", "--out", tmp_path / "one.json")

    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON")

    assert code == 0, err
    for text in (out, (tmp_path / "one.json").read_text()):
        result = json.loads(text, parse_constant=refuse)
        assert result["n"] == 1
        assert (result["fid"], result["fid_note"]) == (None, "needs at least 2 images")
        assert result["kid_mean"] is None and result["precision"] is None
        assert result["precision_recall_note"] == "needs at least 4 images"


def test_strict_json_writes_null_for_nan_and_infinity(tmp_path: Path) -> None:
    value = {"a": float("nan"), "b": [1.5, float("inf"), -float("inf")], "c": "NaN"}
    assert strict_json(value) == '{"a": null, "b": [1.5, null, null], "c": "NaN"}'
    write_json(tmp_path / "m.json", value)
    assert json.loads((tmp_path / "m.json").read_text())["b"] == [1.5, None, None]


def test_failed_command_leaves_no_empty_run_dir(capsys: pytest.CaptureFixture[str],
                                                tmp_path: Path) -> None:
    run = tmp_path / "new-run"
    assert_fails(capsys, 1, "train", "classifier", "--preset", "tiny", "--data-dir",
                 tmp_path / "nowhere", "--run-dir", run, *CPU, match="does not exist")
    assert not run.exists()


# ---------------------------------------------------------------- round 3 (QA of the fixes)


def test_samples_file_that_is_a_device_is_never_read(capsys: pytest.CaptureFixture[str],
                                                     tmp_path: Path) -> None:
    link = tmp_path / "zero.npz"
    link.symlink_to("/dev/zero")  # reading it whole would never end
    assert_fails(capsys, 1, "evaluate", "--samples", link, "--run-dir", tmp_path / "run", *CPU,
                 match=f"{link} is not a regular file")


@pytest.mark.parametrize(("argv", "match"), [
    (["--nfe", "99999999999999999999"], "--nfe needs integers in 1 .. 10000"),
    (["--nfe", "3", "-n", "2"], "a sweep needs -n of at least 4"),
    (["--samplers", "ddim-3"], "unknown sampler 'ddim-3'"),
])
def test_sweep_refuses_what_it_cannot_score(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                            argv: list[str], match: str) -> None:
    run = tmp_path / "run"
    run.mkdir()
    defaults = {"--samplers": "heun", "--nfe": "3", "-n": "8"}
    for option, value in zip(argv[::2], argv[1::2], strict=True):
        defaults[option] = value
    assert_fails(capsys, 2, "sweep", "--run-dir", run, *CPU,
                 *[v for pair in defaults.items() for v in pair], match=match)
    assert list(run.iterdir()) == []  # nothing written


@pytest.mark.parametrize(("argv", "match"), [
    (["--sampler", "ddpm", "--eta", "0.5"], "eta is an option of ddim, not of ddpm"),
    (["--sampler", "heun", "--variance", "beta"], "variance is an option of ddpm, not of heun"),
    (["--sampler", "ddim-20000"], "steps must be an integer in 1 .. 10000"),
])
def test_sampler_options_it_would_ignore(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                         argv: list[str], match: str) -> None:
    out = tmp_path / "s.npz"
    assert_fails(capsys, 2, "sample", "--model", "diffusion", *argv, "--out", out,
                 "--run-dir", tmp_path / "run", *CPU, match=match)
    assert not out.exists() and not (tmp_path / "run").exists()


def test_lock_that_is_a_symlink_leaves_its_target_alone(capsys: pytest.CaptureFixture[str],
                                                        data_dir: Path, tmp_path: Path) -> None:
    run, victim = tmp_path / "run", tmp_path / "victim.txt"
    run.mkdir()
    victim.write_text("important user data")
    (run / ".lock").symlink_to(victim)
    assert_fails(capsys, 1, "train", "classifier", "--preset", "tiny", "--data-dir", data_dir,
                 "--run-dir", run, *CPU, match=f"{run / '.lock'} is a symbolic link")
    assert victim.read_text() == "important user data"
    dangling = tmp_path / "run2"
    dangling.mkdir()
    (dangling / ".lock").symlink_to(tmp_path / "nowhere")
    assert_fails(capsys, 1, "train", "classifier", "--preset", "tiny", "--data-dir", data_dir,
                 "--run-dir", dangling, *CPU, match="is a symbolic link")
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("option", [["--schedule", "cosine"], ["--objective", "flow"],
                                    ["--conditional"]])
def test_diffusion_options_on_another_model(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                            option: list[str]) -> None:
    assert_fails(capsys, 2, "train", "vae", "--preset", "tiny", *option, "--run-dir",
                 tmp_path / "run", *CPU,
                 match=f"{option[0]} is an option of `ldm train diffusion`, not of `ldm train vae`")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("option", "value", "match"), [
    ("-n", "٤", "argument -n/--num-samples: '٤' is not an integer"),
    ("--seed", "٣", "argument --seed: '٣' is not an integer"),
    ("--steps", "３", "argument --steps: '３' is not an integer"),
    ("--labels", "١", "labels: expected 'balanced' or comma-separated class indices"),
    ("--guidance", "１", "argument --guidance: invalid float value: '１'")])
def test_digits_of_other_scripts_are_refused(capsys: pytest.CaptureFixture[str],
                                             tmp_path: Path, option: str, value: str,
                                             match: str) -> None:
    assert_fails(capsys, 2, "sample", "--model", "diffusion", option, value, "--out",
                 tmp_path / "x.npz", "--run-dir", tmp_path / "run", *CPU, match=match)
