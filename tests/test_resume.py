"""Resume and start-over on a finished tiny run: a checkpoint is continued only under its own
stage key, a refusal or a failed command loses nothing, rotation counts only valid
checkpoints, and a resume or a repair is invisible downstream."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import write_dataset
from latentdiffusion.cli import main
from latentdiffusion.diffusion.denoiser import LADDERS
from latentdiffusion.run import checkpoint, keys, training
from latentdiffusion.run.config import RunConfig, SamplingConfig
from latentdiffusion.run.presets import PRESETS, preset

CPU = ["--device", "cpu"]
STAGES = ["classifier", "vae", "encode", "diffusion", "sample", "evaluate", "report"]


def ldm(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str]:
    """Exit code and stderr of `ldm argv`, run in-process."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err.replace("\r", "\n")


def events(err: str) -> dict[str, str]:
    """{stage: 'ran' | 'skipped'} from `ldm run`'s stage lines."""
    return {m.group(1): "skipped" if "skipped" in m.group(2) else "ran"
            for m in re.finditer(r"^\[(\w+)\] (.*)$", err, flags=re.M)}


def files(run: Path, *names: str) -> dict[str, bytes]:
    """Every file of the named models and their checkpoints, by path: to compare byte for byte."""
    found = {}
    for name in names:
        for path in [run / f"{name}.safetensors", *(run / "checkpoints" / name).glob("*")]:
            found[str(path.relative_to(run))] = path.read_bytes()
    return found


def assert_same_weights(run: Path, other: Path, name: str = "diffusion") -> None:
    ours, theirs = (load_file(r / f"{name}.safetensors") for r in (run, other))
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key].equal(theirs[key]), key


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(data dir, run dir) of one finished `ldm run --preset tiny`."""
    root = tmp_path_factory.mktemp("resume")
    data = write_dataset(root / "data")
    run = root / "run"
    assert main(["run", "--preset", "tiny", "--data-dir", str(data), "--run-dir", str(run),
                 *CPU, "--quiet"]) == 0
    return data, run


@pytest.fixture
def run(finished: tuple[Path, Path], tmp_path: Path) -> Path:
    """A copy of the finished run for one test to change."""
    copy = tmp_path / "run"
    shutil.copytree(finished[1], copy)
    return copy


def _with_preset(monkeypatch: pytest.MonkeyPatch, **changes: object) -> None:
    """Make `--preset tiny` mean the tiny preset with `changes`."""
    changed = dataclasses.replace(preset("tiny"), **changes)  # type: ignore[arg-type]
    monkeypatch.setitem(PRESETS, "tiny", lambda: changed)


def _tiny() -> RunConfig:
    return preset("tiny")


# Each change under a finished diffusion stage, and the part of the refusal that names it.
NAMED = {"schedule": "schedule.kind: linear -> cosine",
         "objective": "objective.prediction: v -> noise",
         "latent_norm": "latents: ", "vae": "latents: "}


def _change(change: str, cli: Callable[..., None], monkeypatch: pytest.MonkeyPatch
            ) -> list[str]:
    """Make `change` as a user would; returns what `ldm train diffusion` needs besides."""
    if change == "schedule":
        return ["--schedule", "cosine"]
    if change == "objective":
        _with_preset(monkeypatch, objective=dataclasses.replace(_tiny().objective,
                                                                 prediction="noise"))
    elif change == "latent_norm":
        cli("encode", "--latent-norm", "global")  # the tiny preset's is "channel"
    else:  # another VAE, then its latents
        cli("train", "vae", "--preset", "tiny", "--force", "--lr", "0.001")
        cli("encode", "--latent-norm", "channel")
    return []


@pytest.mark.parametrize("change", list(NAMED))
def test_resume_under_another_upstream_is_refused_and_keeps_every_file(
        change: str, finished: tuple[Path, Path], run: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    data = finished[0]
    common = ["--data-dir", data, "--run-dir", run, *CPU, "--quiet"]

    def cli(*argv: str) -> None:
        code, err = ldm(capsys, *argv, *common)
        assert code == 0, err

    before = files(run, "diffusion")
    extra = _change(change, cli, monkeypatch)
    code, err = ldm(capsys, "train", "diffusion", "--preset", "tiny", "--resume", *extra,
                    *common)
    assert code == 2, err
    assert err.splitlines() == [err.strip()], err  # one line
    assert err.startswith(f"error: {run}/checkpoints/diffusion was made with another config (")
    assert NAMED[change] in err and err.strip().endswith("); pass --force to start over")
    assert files(run, "diffusion") == before


def _diffusion_header(run: Path) -> dict:
    return checkpoint.load(run / "diffusion.safetensors", kind="unet")[1]


@pytest.mark.parametrize("change", [
    {"schedule": dataclasses.replace(_tiny().schedule, kind="cosine")},
    {"objective": dataclasses.replace(_tiny().objective, prediction="noise")},
    {"latent_norm": "global"},
    {"vae_train": dataclasses.replace(_tiny().vae_train, lr=1e-3)},
], ids=["schedule", "objective", "latent_norm", "vae"])
def test_run_retrains_a_stage_whose_upstream_changed_from_step_zero(
        change: dict, finished: tuple[Path, Path], run: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    old = _diffusion_header(run)
    _with_preset(monkeypatch, **change)
    code, err = ldm(capsys, "run", "--preset", "tiny", "--data-dir", finished[0], "--run-dir",
                    run, *CPU)
    assert code == 0, err
    assert events(err)["diffusion"] == "ran"
    assert "resumed unet" not in err
    assert "unet step 6:" in err  # it trained the steps, it did not copy the old history
    new = _diffusion_header(run)
    assert new["key"] != old["key"]
    assert new["history"][0]["step"] == 6
    assert new["history"][0]["train_loss"] != old["history"][0]["train_loss"]
    for path in (run / "checkpoints" / "diffusion").glob("step-*.safetensors"):
        assert checkpoint.load(path)[1]["key"] == new["key"], path  # no old checkpoint left


def test_run_force_starts_the_stage_over(finished: tuple[Path, Path], run: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    code, err = ldm(capsys, "run", "--preset", "tiny", "--data-dir", finished[0], "--run-dir",
                    run, *CPU, "--force", "diffusion")
    assert code == 0, err
    assert "resumed unet" not in err and "unet step 6:" in err
    # Deterministic: started over with the same config, it ends on the same weights.
    assert_same_weights(run, finished[1])


def test_a_bad_batch_size_deletes_nothing(finished: tuple[Path, Path], run: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--preset", "tiny", "--data-dir", finished[0], "--run-dir", run, *CPU, "--quiet",
              "--batch-size", "100000"]
    before = files(run, "vae")
    for again in ("--resume", "--force"):  # checked before any checkpoint is read or removed
        code, err = ldm(capsys, "train", "vae", again, *common)
        assert (code, err) == (2, "error: vae_train.batch_size 100000 is larger than the 96 "
                                  "training images of data\n")
        assert files(run, "vae") == before
    code, err = ldm(capsys, "train", "vae", "--resume", *common[:-1], "32")
    assert code == 2 and "(train.batch_size: 16 -> 32)" in err, err
    assert files(run, "vae") == before


def test_starting_over_keeps_the_old_checkpoints_until_a_new_one_exists(
        finished: tuple[Path, Path], run: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    before = files(run, "diffusion")

    def interrupted(*args: object) -> float:
        raise KeyboardInterrupt  # Ctrl-C during the first step, before any checkpoint

    with monkeypatch.context() as patch:
        patch.setattr(training, "lr_at", interrupted)
        code, _ = ldm(capsys, "train", "diffusion", "--preset", "tiny", "--force",
                      "--run-dir", run, *CPU, "--quiet")
    assert code == 130
    assert files(run, "diffusion") == before
    # Started over with another config, its first checkpoint replaces the old ones.
    code, err = ldm(capsys, "train", "diffusion", "--preset", "tiny", "--force", "--lr", "1e-3",
                    "--run-dir", run, *CPU, "--quiet")
    assert code == 0, err
    key = _diffusion_header(run)["key"]
    states = sorted((run / "checkpoints" / "diffusion").iterdir())
    assert [p.name for p in states] == ["step-000000004.safetensors",
                                        "step-000000006.safetensors"]
    assert all(checkpoint.load(p)[1]["key"] == key for p in states)


def test_rotation_keeps_two_valid_checkpoints_and_leaves_junk_alone(
        finished: tuple[Path, Path], run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    states = run / "checkpoints" / "diffusion"
    (states / "step-000000006.safetensors").unlink()  # as if killed before the last step
    junk = states / "step-000009999.safetensors"
    junk.write_bytes(b"not a checkpoint")
    code, err = ldm(capsys, "train", "diffusion", "--preset", "tiny", "--resume", "--run-dir",
                    run, *CPU)
    assert code == 0, err
    assert "skipping" in err and "resumed unet from step-000000004" in err
    assert sorted(p.name for p in states.iterdir()) == [
        "step-000000004.safetensors", "step-000000006.safetensors", junk.name]
    assert junk.read_bytes() == b"not a checkpoint"
    assert_same_weights(run, finished[1])  # the resume was exact


def test_a_resumed_stage_reruns_nothing_downstream(finished: tuple[Path, Path], run: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    (run / "classifier.safetensors").unlink()  # killed after step 4 of 6
    (run / "checkpoints" / "classifier" / "step-000000006.safetensors").unlink()
    code, err = ldm(capsys, "run", "--preset", "tiny", "--data-dir", finished[0], "--run-dir",
                    run, *CPU)
    assert code == 0, err
    assert "resumed classifier from step-000000004" in err
    ran = events(err)
    assert [s for s in STAGES if ran[s] == "ran"] == ["classifier"]
    old, new = (checkpoint.load(r / "classifier.safetensors")[1] for r in (finished[1], run))
    assert new["model_hash"] == old["model_hash"]  # not the file checksum: its wall time differs
    assert_same_weights(run, finished[1], "classifier")
    for name in ("metrics.json", "report.md"):
        assert (run / name).read_bytes() == (finished[1] / name).read_bytes(), name


def test_a_corrupt_model_is_rebuilt_from_its_checkpoint_and_says_so(
        finished: tuple[Path, Path], run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = run / "diffusion.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x10
    path.write_bytes(bytes(raw))
    code, err = ldm(capsys, "run", "--preset", "tiny", "--data-dir", finished[0], "--run-dir",
                    run, *CPU)
    assert code == 0, err
    line = next(x for x in err.splitlines() if x.startswith("[diffusion]"))
    assert "model file was corrupt, rebuilt; resumed from step-000000006" in line, line
    assert f"{path} is corrupt" in err
    ran = events(err)
    assert [s for s in STAGES if ran[s] == "ran"] == ["diffusion"]  # same weights, same hash
    assert json.loads((run / "run.json").read_text())["stages"]["diffusion"]["summary"] in line


def test_time_based_checkpoints_change_no_number(finished: tuple[Path, Path], run: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert {preset(name).diffusion_train.checkpoint_seconds for name in PRESETS} == {60.0}
    code, err = ldm(capsys, "train", "diffusion", "--preset", "tiny", "--force",
                    "--checkpoint-every", "1000", "--checkpoint-seconds", "1e-9",
                    "--run-dir", run, *CPU, "--quiet")
    assert code == 0, err
    states = run / "checkpoints" / "diffusion"
    # Saved after every step by time (step 5), not only at the end (6) as the steps say.
    assert sorted(p.name for p in states.iterdir()) == ["step-000000005.safetensors",
                                                        "step-000000006.safetensors"]
    tensors, meta = checkpoint.load(states / "step-000000006.safetensors")
    assert "rng.numpy" not in tensors and "rng" not in meta  # only torch's RNG is used
    assert_same_weights(run, finished[1])
    # The cadence is not part of the stage key: `ldm run` keeps the model.
    assert _diffusion_header(run)["key"] == _diffusion_header(finished[1])["key"]


def test_sampling_accepts_a_resumed_vae_and_refuses_another(
        finished: tuple[Path, Path], run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--data-dir", finished[0], "--run-dir", run, *CPU, "--quiet"]
    sample = ["sample", "--model", "diffusion", "--sampler", "ddim", "--steps", "2", "-n", "2",
              "--out", run / "s.npz", *common]
    (run / "vae.safetensors").unlink()  # killed after step 4 of 6
    (run / "checkpoints" / "vae" / "step-000000006.safetensors").unlink()
    code, err = ldm(capsys, "train", "vae", "--preset", "tiny", "--resume", *common)
    assert code == 0, err
    code, err = ldm(capsys, *sample)  # the same weights: the denoiser's VAE
    assert code == 0, err
    code, err = ldm(capsys, "train", "vae", "--preset", "tiny", "--force", "--lr", "1e-3",
                    *common)
    assert code == 0, err
    code, err = ldm(capsys, *sample)
    assert code == 1 and "was trained on latents of another VAE" in err, err


def test_sets_of_ladder_samplers_are_keyed_by_the_ladder_rule(monkeypatch: pytest.MonkeyPatch
                                                               ) -> None:
    """A set sampled on karras or logsnr levels is made again when the ladders' rule changes;
    a set of timestep samplers keeps its key."""
    def key(*samplers: str) -> keys.StageKey:
        return keys.samples_key("vae", "unet", SamplingConfig(samplers=samplers), 100)

    def flow_key(*samplers: str) -> keys.StageKey:  # the rule sets a flow model's D at t = 1
        return keys.samples_key("vae", "unet", SamplingConfig(samplers=samplers), 100, "flow")

    grid, ladder, flow_grid = key("ddpm-20"), key("ddpm-20", "dpmpp-2m-10"), flow_key("ddpm-20")
    assert "ladders" not in grid.fields and ladder.fields["ladders"] == LADDERS
    assert flow_grid.fields["ladders"] == LADDERS
    monkeypatch.setitem(LADDERS, "sigma_min", 0.05)
    assert key("ddpm-20").digest == grid.digest
    assert key("ddpm-20", "dpmpp-2m-10").digest != ladder.digest
    assert flow_key("ddpm-20").digest != flow_grid.digest


def test_a_denoiser_without_its_data_mean_is_trained_again(
        finished: tuple[Path, Path], run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A denoiser of an earlier release lacks the data mean its samplers start from: `ldm run`
    trains it again, to the same weights, and keeps the sets of VP timestep samplers."""
    path = run / "diffusion.safetensors"
    tensors, header = checkpoint.load(path, kind="unet")
    written = ("kind", "format_version", "sha256", "data_mean")  # checkpoint.save adds the first 3
    checkpoint.save(path, tensors, kind="unet", **{k: v for k, v in header.items()
                                                   if k not in written})
    assert "data_mean" not in _diffusion_header(run)
    code, err = ldm(capsys, "run", "--preset", "tiny", "--data-dir", finished[0], "--run-dir",
                    run, *CPU)
    assert code == 0, err
    ran = events(err)
    assert ran["diffusion"] == "ran" and ran["sample"] == "skipped", ran
    assert _diffusion_header(run)["data_mean"] == header["data_mean"]
    assert_same_weights(run, finished[1], "diffusion")
