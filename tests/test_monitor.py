"""Watching a model learn: the stages' JSON-lines logs, progress grids and scores, what they
cost the training (nothing: the same weights), how a killed stage's log resumes, TensorBoard,
the report's figures, and bad input (one line, nothing lost)."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import write_dataset
from latentdiffusion.cli import main
from latentdiffusion.evaluation.metrics import FeatureStats, Reference
from latentdiffusion.run.monitor import MonitorConfig
from latentdiffusion.run.progress import Scorer
from latentdiffusion.run.trainlog import TIMING, TrainLog, read_log

CPU = ["--device", "cpu", "--quiet"]
# The tiny preset with the grids on: every 2 of its 6 steps, the denoiser's scored on 30
# samples, a log line every step.
WATCHED = ["--sample-every", "2", "--score-samples", "30", "--set", "monitor.samples=true",
           "--set", "monitor.log_every=1"]
STAGES = ("classifier", "vae", "diffusion", "guide")


def ldm(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def weights(run: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(run / f"{name}.safetensors")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(data, a tiny run with the grids on, the same run with them off)."""
    root = tmp_path_factory.mktemp("monitor")
    data = write_dataset(root / "data")
    watched, plain = root / "watched", root / "plain"
    base = ["run", "--preset", "tiny", "--data-dir", data, *CPU]
    assert main([str(a) for a in [*base, "--run-dir", watched, *WATCHED]]) == 0
    assert main([str(a) for a in [*base, "--run-dir", plain]]) == 0
    return data, watched, plain


# A line every 3 steps, grids at 5 and 6: the tiny preset's checkpoint at step 4 falls
# between two lines.
SPARSE = ["--sample-every", "5", "--score-samples", "30", "--set", "monitor.samples=true",
          "--set", "monitor.log_every=3"]


@pytest.fixture(scope="module")
def sparse(runs: tuple[Path, Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The watched run with a log line every 3 steps."""
    run = tmp_path_factory.mktemp("sparse") / "run"
    assert main([str(a) for a in ["run", "--preset", "tiny", "--data-dir", runs[0], *CPU,
                                  "--run-dir", run, *SPARSE]]) == 0
    return run


def test_the_grids_and_scores_change_no_trained_number(runs: tuple[Path, Path, Path]) -> None:
    _, watched, plain = runs
    for name in STAGES:
        ours, theirs = weights(watched, name), weights(plain, name)
        assert ours.keys() == theirs.keys()
        assert all(ours[k].equal(theirs[k]) for k in ours), name
    for name in ("ddim-5", "ddpm"):  # and so the samples
        a, b = (np.load(r / "samples" / f"{name}.npz")["images"] for r in (watched, plain))
        assert np.array_equal(a, b)


def test_each_stage_logs_its_steps_and_the_grids_it_drew(runs: tuple[Path, Path, Path]) -> None:
    _, watched, plain = runs
    for name in STAGES:
        records = read_log(watched / "logs" / f"{name}.jsonl")
        assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
        assert all(np.isfinite(r["loss"]) and r["grad_norm"] > 0 and r["lr"] > 0
                   for r in records)
        assert "val_loss" in records[-1]  # validated after the last step
        drawn = [r["step"] for r in records if "grid" in r]
        assert drawn == ([] if name == "classifier" else [2, 4, 6])
        for step in drawn:
            assert (watched / "figures" / "progress" / f"{name}-{step}.png").exists()
    vae = read_log(watched / "logs" / "vae.jsonl")
    assert all({"reconstruction", "kl"} <= set(r) for r in vae)  # the loss's parts
    scored = [r for r in read_log(watched / "logs" / "diffusion.jsonl") if "fid" in r]
    assert [r["score_n"] for r in scored] == [30, 30, 30]
    assert all(r["fid"] >= 0 and np.isfinite(r["kid"]) for r in scored)
    assert not any("fid" in r for r in read_log(watched / "logs" / "guide.jsonl"))
    # The tiny preset draws no grids: its logs hold one line at the last (validated) step.
    assert [r["step"] for r in read_log(plain / "logs" / "diffusion.jsonl")] == [6]
    assert not (plain / "figures" / "progress").exists()


def test_a_line_holds_the_means_of_the_steps_since_the_last(
        runs: tuple[Path, Path, Path], sparse: Path) -> None:
    every_step = read_log(runs[1] / "logs" / "vae.jsonl")
    lines = read_log(sparse / "logs" / "vae.jsonl")
    assert [r["step"] for r in lines] == [3, 5, 6]  # every 3 steps and at each grid
    for line, steps in zip(lines, (every_step[:3], every_step[3:5], every_step[5:]),
                           strict=True):
        for field in ("loss", "reconstruction", "kl", "grad_norm"):
            assert line[field] == pytest.approx(np.mean([r[field] for r in steps]), rel=1e-12)


def test_the_report_shows_the_curves_and_the_grids_over_time(
        runs: tuple[Path, Path, Path]) -> None:
    _, watched, plain = runs
    for name in ("curves", "progress-vae", "progress-diffusion", "progress-guide"):
        assert (watched / "figures" / f"{name}.png").exists(), name
    report = (watched / "report.md").read_text()
    assert "figures/curves.png" in report and "figures/progress-diffusion.png" in report
    assert (plain / "figures" / "curves.png").exists()
    assert not (plain / "figures" / "progress-diffusion.png").exists()


def test_a_killed_stage_resumes_its_log_line_for_line(
        runs: tuple[Path, Path, Path], sparse: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """As if killed while writing the line after step 6, before its checkpoint: the rerun
    continues the step-4 checkpoint (between two lines: the sums since the last line are in
    it), drops the lines after it and the damaged one, and writes the same lines and weights
    as the uninterrupted run."""
    data, watched = runs[0], sparse
    run = tmp_path / "run"
    shutil.copytree(watched, run)
    for name in ("diffusion", "guide"):
        (run / f"{name}.safetensors").unlink()
    (run / "checkpoints" / "diffusion" / "step-000000006.safetensors").unlink()
    shutil.rmtree(run / "checkpoints" / "guide")
    log = run / "logs" / "diffusion.jsonl"
    with open(log, "a") as f:
        f.write('{"step": 7, "loss": 0.1')  # cut short by the kill
    code, err = ldm(capsys, "run", "--preset", "tiny", "--data-dir", data, "--run-dir", run,
                    *CPU, *SPARSE)
    assert code == 0, err
    assert "last line is incomplete" in err
    uninterrupted = read_log(watched / "logs" / "diffusion.jsonl")
    assert without_timing(read_log(log)) == without_timing(uninterrupted)
    assert all(weights(run, "diffusion")[k].equal(v)
               for k, v in weights(watched, "diffusion").items())


def test_tensorboard_holds_the_logs_scalars(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = write_dataset(tmp_path / "data")
    run = tmp_path / "run"
    assert main([str(a) for a in ["run", "--preset", "tiny", "--data-dir", data, *CPU,
                                  "--run-dir", run, *WATCHED, "--tensorboard"]]) == 0
    records = read_log(run / "logs" / "diffusion.jsonl")
    events = EventAccumulator(str(run / "logs" / "tensorboard" / "diffusion"))
    events.Reload()
    for field in ("loss", "grad_norm", "fid", "val_loss"):
        logged = [(r["step"], r[field]) for r in records if field in r]
        read_back = [(e.step, e.value) for e in events.Scalars(field)]
        assert [s for s, _ in read_back] == [s for s, _ in logged], field
        assert [v for _, v in read_back] == pytest.approx([v for _, v in logged], rel=1e-6)
    assert len(events.Images("samples")) == 3


def test_a_missing_tensorboard_is_one_line(runs: tuple[Path, Path, Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    code, err = ldm(capsys, "run", "--preset", "tiny", "--data-dir", runs[0], "--run-dir",
                    tmp_path / "run", *CPU, "--tensorboard")
    assert code == 2
    assert err.strip().splitlines() == [
        'error: --tensorboard needs the tensorboard package: pip install '
        '"latentdiffusion[tensorboard]"']
    assert not (tmp_path / "run" / "classifier.safetensors").exists()


def test_a_log_that_is_not_json_lines_stops_the_run_before_anything(
        runs: tuple[Path, Path, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    shutil.copytree(runs[2], run)
    text = "step,loss\n1,0.5\n2,0.4\n"  # somebody's CSV where the log goes
    (run / "logs" / "diffusion.jsonl").write_text(text)
    before = (run / "classifier.safetensors").read_bytes()
    code, err = ldm(capsys, "run", "--preset", "tiny", "--data-dir", runs[0], "--run-dir", run,
                    *CPU, "--force", "classifier")
    assert code == 1
    assert len(err.strip().splitlines()) == 1 and "diffusion.jsonl line 1" in err
    assert (run / "logs" / "diffusion.jsonl").read_text() == text
    assert (run / "classifier.safetensors").read_bytes() == before  # not trained again


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write any folder")
def test_an_unwritable_log_folder_is_one_line(runs: tuple[Path, Path, Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    shutil.copytree(runs[2], run)
    (run / "logs").chmod(0o500)
    try:
        code, err = ldm(capsys, "run", "--preset", "tiny", "--data-dir", runs[0],
                        "--run-dir", run, *CPU, "--force", "classifier")
    finally:
        (run / "logs").chmod(0o700)
    assert code == 1 and len(err.strip().splitlines()) == 1 and "permission" in err


@pytest.mark.parametrize("argv", [["--sample-every", "0"], ["--sample-every", "-5"],
                                  ["--score-samples", "-1"], ["--set", "monitor.log_every=0"],
                                  ["--set", "monitor.score_samples=1"]])
def test_bad_monitor_values_are_one_line(argv: list[str], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    code, err = ldm(capsys, "run", "--preset", "tiny", "--data-dir", tmp_path,
                    "--run-dir", tmp_path / "run", *CPU, *argv)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_grids_are_due_every_k_steps_at_epoch_ends_and_at_the_last() -> None:
    config = MonitorConfig(sample_every=4)
    assert [s for s in range(1, 11) if config.grid_due(s, 3, 10)] == [4, 8, 10]
    epochs = MonitorConfig(sample_every=100, sample_at_epoch_end=True)
    assert [s for s in range(1, 11) if epochs.grid_due(s, 3, 10)] == [3, 6, 9, 10]
    assert not any(MonitorConfig(samples=False).grid_due(s, 3, 10) for s in range(1, 11))


class _Identity(torch.nn.Module):
    """A feature network whose features are the pixels (2x2 grayscale: 4-d)."""

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return features


def test_the_progress_score_of_the_reference_images_is_zero() -> None:
    images = np.random.default_rng(0).integers(0, 256, (500, 2, 2), dtype=np.uint8)
    features = torch.from_numpy(images.reshape(500, 4).astype(np.float32) / 255)
    stats = FeatureStats.from_features(features)
    scorer = Scorer(_Identity(), Reference(stats, features.numpy(), "x"))  # type: ignore[arg-type]
    same = scorer(images, torch.device("cpu"))
    assert same["fid"] == pytest.approx(0.0, abs=1e-9) and same["score_n"] == 500
    other = scorer(np.clip(images.astype(int) + 60, 0, 255).astype(np.uint8), torch.device("cpu"))
    assert other["fid"] > 0.01 and other["kid"] > same["kid"]


def test_a_log_keeps_its_lines_up_to_the_resumed_step(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "x.jsonl"
    first = TrainLog(path)
    first.start(0)
    for step in (1, 2, 3):
        first.write({"step": step, "loss": 1.0 / step})
    first.close()
    again = TrainLog(path)
    again.start(2)  # a checkpoint at step 2
    again.write({"step": 3, "loss": 0.25})
    again.close()
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}, {"step": 3, "loss": 0.25}]
    fresh = TrainLog(path)
    fresh.start(0)  # a stage trained from the start: a new log
    fresh.close()
    assert path.read_text() == ""
