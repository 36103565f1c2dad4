"""Hostile arguments and files (issue #19, round 2): each gives one `error:` line or a warning
and a rebuilt file, never a traceback, and leaves what the user had in place."""

from __future__ import annotations

from pathlib import Path

import pytest

from test_cli_errors import CPU, assert_fails

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
    assert_fails(capsys, 1, "data", "download", "--data-dir", target, "--quiet",
                 match=f"cannot download into {target}: it exists and is not a directory")
    assert target.read_text() == "mine"


def test_verify_a_regular_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    target = tmp_path / "mnist"
    target.write_text("mine")
    assert_fails(capsys, 1, "data", "verify", "--data-dir", target,
                 match=f"data directory {target} is not a directory")


def test_lock_that_is_a_directory(capsys: pytest.CaptureFixture[str], data_dir: Path,
                                  tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / ".lock").mkdir(parents=True)
    assert_fails(capsys, 1, "train", "classifier", "--preset", "tiny", "--data-dir", data_dir,
                 "--run-dir", run, *CPU, match=f"{run / '.lock'} is a directory")
    assert (run / ".lock").is_dir()
