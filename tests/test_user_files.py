"""Nothing of the user's is replaced: a run directory must be new, empty or a run's, and an
--out replaces only an earlier output of its command, never a run's own file."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from latentdiffusion.evaluation.samples import save_samples
from latentdiffusion.files import atomic_write
from test_cli_errors import CPU, assert_fails

SAMPLE = ["sample", "--model", "vae", "-n", "4", *CPU]


def _run_dir(root: Path) -> Path:
    """A run directory as a run leaves it (what marks it: run.json)."""
    (root / "samples").mkdir(parents=True)
    (root / "run.json").write_text('{"stages": {}}')
    return root


@pytest.mark.parametrize("run_dir", ["", ".", "mine"])
def test_run_dir_of_the_users_files_is_refused(capsys: pytest.CaptureFixture[str],
                                               data_dir: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               run_dir: str) -> None:
    folder = tmp_path / "work"
    (folder / "mine").mkdir(parents=True)
    for target in (folder, folder / "mine"):
        (target / "report.html").write_text("mine")
        (target / "metrics.json").write_text("{}")
    monkeypatch.chdir(folder)
    assert_fails(capsys, 2, "train", "classifier", "--preset", "tiny", "--data-dir", data_dir,
                 "--run-dir", run_dir, *CPU, match="holds files that are not a run's "
                 "(metrics.json, ")
    assert sorted(os.listdir(folder / "mine")) == ["metrics.json", "report.html"]
    assert (folder / "report.html").read_text() == "mine"


def test_grid_beside_a_new_samples_file_is_not_replaced(capsys: pytest.CaptureFixture[str],
                                                        tmp_path: Path) -> None:
    (tmp_path / "fig.png").write_text("mine")
    assert_fails(capsys, 2, *SAMPLE, "--run-dir", _run_dir(tmp_path / "R"), "--out",
                 tmp_path / "fig.npz", match="fig.png (the grid of --out")
    assert (tmp_path / "fig.png").read_text() == "mine"


def test_out_never_replaces_a_runs_own_file(capsys: pytest.CaptureFixture[str],
                                            tmp_path: Path) -> None:
    run = _run_dir(tmp_path / "R")
    images = np.zeros((2, 28, 28), np.uint8)
    save_samples(run / "samples" / "ddpm.npz", images)  # a samples file, but the run's
    before = (run / "samples" / "ddpm.npz").read_bytes()
    assert_fails(capsys, 2, *SAMPLE, "--run-dir", run, "--out", run / "samples" / "ddpm.npz",
                 match="is a file of the run directory")
    assert (run / "samples" / "ddpm.npz").read_bytes() == before
    (run / "metrics.json").write_text('{"validation": {"fid": 1}}')
    assert_fails(capsys, 2, "evaluate", "--run-dir", run, "--samples", run / "samples" /
                 "ddpm.npz", "--out", run / "metrics.json", *CPU,
                 match="is a file of the run directory")


@pytest.mark.parametrize("kind", ["zero", "fifo"])
def test_evaluate_out_that_is_a_device_or_pipe_is_never_read(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, kind: str) -> None:
    out = tmp_path / "e.json"
    if kind == "zero":
        out.symlink_to("/dev/zero")
    else:
        os.mkfifo(out)
    assert_fails(capsys, 2, "evaluate", "--run-dir", tmp_path / "R", "--samples",
                 tmp_path / "s.npz", "--out", out, *CPU,
                 match="exists and is not an earlier evaluation file")


def test_temp_files_of_killed_writers_are_removed(tmp_path: Path) -> None:
    dead, live = tmp_path / ".report.html.tmp-2147483647", tmp_path / ".report.html.tmp-1"
    other = tmp_path / ".report.md.tmp-2147483647"
    for leftover in (dead, live, other):
        leftover.write_text("partial")
    atomic_write(tmp_path / "report.html", b"report")
    assert not dead.exists()  # no process has that pid: its writer was killed
    assert live.exists() and other.exists()  # a live writer's, another file's
