"""Two CPU processes (gloo) against one: training, kill-and-resume, sampling through torchrun.

Training runs in forked worker processes that join a real gloo process group through the same
environment variables torchrun sets (cheap: no second `import torch`); sampling and the CLI
check run under `torchrun --standalone --nproc_per_node=2 -m latentdiffusion`.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import TINY_OBJECTIVE, TINY_SCHEDULE, TINY_UNET, write_dataset
from latentdiffusion import distributed as dist
from latentdiffusion.cli import main
from latentdiffusion.diffusion.objective import diffusion_loss, make_objective
from latentdiffusion.evaluation.samples import load_samples
from latentdiffusion.models import UNet
from latentdiffusion.run import training
from latentdiffusion.run.config import TrainConfig
from latentdiffusion.run.keys import StageKey
from latentdiffusion.run.resume import latest_checkpoint, list_checkpoints
from latentdiffusion.run.training import Batch, fit, init_model

UNET, SCHEDULE, OBJECTIVE = TINY_UNET, TINY_SCHEDULE, TINY_OBJECTIVE
# 32 examples, global batch 8 (4 per rank): 4 steps per epoch, 8 in all.
CONFIG = TrainConfig(steps=8, validate_every=4, batch_size=8, lr=3e-3, warmup_steps=2,
                     ema_decay=0.9, checkpoint_every=1, seed=5)
TOTAL_STEPS = 8
CPU = torch.device("cpu")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TIMEOUT = 120


def _data() -> tuple[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(32, 2, 8, 8, generator=g),)


def _fit(state_dir: Path, resume: bool = False, sleep: float = 0.0
         ) -> tuple[nn.Module, nn.Module, int, list[dict[str, float]]]:
    """Train the tiny UNet; returns (weights, EMA weights, count, history).

    count = 1000 per training step this process ran (validation passes are not counted) plus
    the number of training rows it saw.
    """
    inner = diffusion_loss(make_objective(OBJECTIVE, SCHEDULE))
    calls = [0]

    def loss_fn(model: nn.Module, batch: Batch) -> torch.Tensor:
        if model.training:
            calls[0] += 1000 + len(batch.tensors[0])
        if sleep:
            time.sleep(sleep)
        return inner(model, batch)

    model = init_model(UNet, UNET, CONFIG.seed)
    result = fit(model, loss_fn, _data(), _data(), CONFIG, state_dir=state_dir, kind="unet",
                 key=StageKey.of(model=UNET, train=CONFIG), model_config=UNET, device=CPU,
                 resume="strict" if resume else "off", progress=False)
    return model, result.model, calls[0], result.history


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world: int, port: int, job: Callable[..., None], *args: Any) -> None:
    """What torchrun does for a worker: the env variables, then the project's own init."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init(CPU)
    try:
        assert dist.world_size() == world and dist.rank() == rank
        job(*args)
    finally:
        dist.shutdown()


def _spawn(job: Callable[..., None], *args: Any, world: int = 2, join: bool = True) -> Any:
    context = mp.start_processes(_worker, args=(world, _free_port(), job, *args), nprocs=world,
                                 join=False, start_method="fork")
    if join:
        deadline = time.monotonic() + TIMEOUT
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                for p in context.processes:
                    p.kill()
                pytest.fail("distributed workers timed out")
    return context


def _fit_job(state_dir: Path, out: Path, resume: bool, sleep: float) -> None:
    model, ema, calls, _ = _fit(state_dir, resume, sleep)
    tensors = _weights(model, ema)
    tensors["calls"] = torch.tensor(calls)
    save_file(tensors, str(out / f"rank{dist.rank()}.safetensors"))


def _time_checkpoint_job(state_dir: Path, out: Path) -> None:
    """Rank 0's clock says a checkpoint is due after every step, rank 1's says never."""
    if dist.rank() == 1:
        training.time = types.SimpleNamespace(monotonic=lambda: 0.0)  # type: ignore[attr-defined]
    config = dataclasses.replace(CONFIG, checkpoint_every=1000, checkpoint_seconds=1e-9)
    model = init_model(UNet, UNET, config.seed)
    result = fit(model, diffusion_loss(make_objective(OBJECTIVE, SCHEDULE)), _data(), None, config,
                 state_dir=state_dir, kind="unet", key=StageKey.of(model=UNET, train=config),
                 model_config=UNET, device=CPU, progress=False)
    save_file(_weights(model, result.model), str(out / f"rank{dist.rank()}.safetensors"))


def _weights(model: nn.Module, ema: nn.Module) -> dict[str, torch.Tensor]:
    tensors = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    return tensors | {f"ema.{k}": v.contiguous() for k, v in ema.state_dict().items()}


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=atol, rtol=0), (
            name, (a[name] - b[name]).abs().max().item())


def _without_calls(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in tensors.items() if k != "calls"}


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory: pytest.TempPathFactory,
                    one_process_weights: Any) -> tuple[Path, Path]:
    """One uninterrupted 2-process run: (its state dir, its per-rank weights dir).

    After `one_process_weights`, so that the forked workers inherit a warm torch (the first
    optimizer step of a process spends seconds importing torch._dynamo).
    """
    root = tmp_path_factory.mktemp("ddp")
    state_dir, out = root / "state", root / "out"
    out.mkdir()
    _spawn(_fit_job, state_dir, out, False, 0.0)
    return state_dir, out


@pytest.fixture(scope="module")
def one_process_weights(tmp_path_factory: pytest.TempPathFactory
                        ) -> tuple[dict[str, torch.Tensor], list[dict[str, float]]]:
    model, ema, calls, history = _fit(tmp_path_factory.mktemp("single"))
    assert calls == TOTAL_STEPS * (1000 + CONFIG.batch_size)
    return _weights(model, ema), history


def test_two_processes_half_batch_equal_one_process(two_process_run: tuple[Path, Path],
                                                    one_process_weights: Any) -> None:
    _, out = two_process_run
    rank0 = load_file(str(out / "rank0.safetensors"))
    rank1 = load_file(str(out / "rank1.safetensors"))
    # Each process ran every step on half of each global batch.
    half = CONFIG.batch_size // 2
    assert rank0["calls"].item() == rank1["calls"].item() == TOTAL_STEPS * (1000 + half)
    for name in rank0:  # DDP keeps the replicas identical
        assert torch.equal(rank0[name], rank1[name]), name
    single, _ = one_process_weights
    # Float summation order differs (gradients averaged across ranks); Adam rescales it.
    _assert_close(_without_calls(rank0), single, atol=5e-5)
    initial = _weights(init_model(UNet, UNET, CONFIG.seed),
                       init_model(UNet, UNET, CONFIG.seed))
    moved = max((single[k] - initial[k]).abs().max().item() for k in single)
    assert moved > 1e-3  # training did change the weights, so the comparison means something


def test_two_process_checkpoint_resumes_in_one_process(two_process_run: tuple[Path, Path],
                                                       one_process_weights: Any,
                                                       tmp_path: Path) -> None:
    state_dir, out = two_process_run
    copy = tmp_path / "state"
    shutil.copytree(state_dir, copy)
    newest = list_checkpoints(copy)[0]
    assert newest.name == f"step-{TOTAL_STEPS:09d}.safetensors"
    newest.unlink()  # as if the 2-process run had stopped one step before the end
    model, ema, calls, history = _fit(copy, resume=True)
    assert calls == 1000 + CONFIG.batch_size  # one step, the whole batch
    rank0 = _without_calls(load_file(str(out / "rank0.safetensors")))
    _assert_close(_weights(model, ema), rank0, atol=5e-5)
    single, single_history = one_process_weights
    _assert_close(_weights(model, ema), single, atol=5e-5)
    assert [h["step"] for h in history] == [4, 8]
    for mine, theirs in zip(history, single_history, strict=True):
        assert mine["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-5)
        assert mine["val_loss"] == pytest.approx(theirs["val_loss"], rel=1e-5)


def test_two_process_sigkill_then_resume(two_process_run: tuple[Path, Path],
                                         tmp_path: Path) -> None:
    state_dir, out = tmp_path / "state", tmp_path / "out"
    out.mkdir()
    context = _spawn(_fit_job, state_dir, out, False, 0.4, join=False)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (state_dir / "step-000000003.safetensors").exists():
            assert all(p.is_alive() for p in context.processes), "a worker died"
            assert time.monotonic() < deadline, "no checkpoint in time"
            time.sleep(0.02)
    finally:
        for p in context.processes:
            p.kill()
            p.join()
    assert all(p.exitcode == -9 for p in context.processes)
    assert not list(out.iterdir())  # killed before the end
    found = latest_checkpoint(state_dir, "train-state/unet")
    assert found is not None and 3 <= found[2]["step"] < TOTAL_STEPS
    done = found[2]["step"]

    _spawn(_fit_job, state_dir, out, True, 0.0)
    resumed = load_file(str(out / "rank0.safetensors"))
    assert resumed["calls"].item() == (TOTAL_STEPS - done) * (1000 + CONFIG.batch_size // 2)
    reference = load_file(str(two_process_run[1] / "rank0.safetensors"))
    _assert_close(_without_calls(resumed), _without_calls(reference), atol=0.0)


def test_rank_zero_decides_when_to_save_by_time(two_process_run: tuple[Path, Path],
                                                tmp_path: Path) -> None:
    # Were each rank to follow its own clock, only rank 0 would reach the checkpoint's barrier
    # and the ranks would deadlock or mix up their collectives.
    state_dir, out = tmp_path / "state", tmp_path / "out"
    out.mkdir()
    _spawn(_time_checkpoint_job, state_dir, out)
    assert [p.name for p in list_checkpoints(state_dir)] == [
        f"step-{TOTAL_STEPS:09d}.safetensors", f"step-{TOTAL_STEPS - 1:09d}.safetensors"]
    rank0 = load_file(str(out / "rank0.safetensors"))
    reference = _without_calls(load_file(str(two_process_run[1] / "rank0.safetensors")))
    _assert_close(rank0, reference, atol=0.0)  # saving by time changed no number
    assert all(torch.equal(rank0[k], v) for k, v in load_file(str(out / "rank1.safetensors")
                                                               ).items())


# ---------------------------------------------------------------- the CLI under torchrun


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(data dir, run dir) with a tiny VAE, latents and diffusion model."""
    root = tmp_path_factory.mktemp("cli")
    data_dir = write_dataset(root / "data")
    run = root / "run"
    common = ["--data-dir", str(data_dir), "--run-dir", str(run), "--device", "cpu", "--quiet"]
    # More VAE steps than the preset's 6, so that different latents decode differently.
    assert main(["train", "vae", "--preset", "tiny", "--steps", "120", *common]) == 0
    assert main(["encode", *common]) == 0
    assert main(["train", "diffusion", "--preset", "tiny", *common]) == 0
    return data_dir, run


def _torchrun(*argv: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", "-m", "latentdiffusion", *argv]
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


SAMPLE = ["sample", "--model", "diffusion", "--sampler", "ddpm", "--steps", "10", "-n", "7",
          "--seed", "3", "--device", "cpu", "--quiet"]


def test_sampling_is_independent_of_world_size_and_batch_size(trained_run: tuple[Path, Path],
                                                              tmp_path: Path) -> None:
    _, run = trained_run
    outputs = {}
    for batch_size in ("3", "500"):
        out = tmp_path / f"one-{batch_size}.npz"
        assert main([*SAMPLE, "--run-dir", str(run), "--batch-size", batch_size,
                     "--out", str(out)]) == 0
        outputs[f"1x{batch_size}"] = load_samples(out)[0]
    out = tmp_path / "two.npz"
    done = _torchrun(*SAMPLE, "--run-dir", str(run), "--batch-size", "2", "--out", str(out))
    assert done.stdout.count('"n": 7') == 1  # only rank 0 writes and prints
    outputs["2x2"] = load_samples(out)[0]

    reference = outputs["1x500"]
    assert reference.shape == (7, 28, 28) and reference.dtype == np.uint8
    as_int = reference.astype(np.int64)
    assert min(np.abs(as_int[i] - as_int[j]).mean() for i in range(7) for j in range(i)) > 0.5
    for name, images in outputs.items():
        assert np.array_equal(images, reference), name


def test_two_process_cli_training_matches_one_process(trained_run: tuple[Path, Path],
                                                      tmp_path: Path) -> None:
    data_dir, run = trained_run
    copy = tmp_path / "run"
    copy.mkdir()
    for name in ("vae.safetensors", "latents.safetensors"):
        shutil.copy(run / name, copy / name)
    _spawn(_cli_job, ["train", "diffusion", "--preset", "tiny", "--run-dir", str(copy),
                      "--device", "cpu", "--quiet"])
    two = load_file(str(copy / "diffusion.safetensors"))
    one = load_file(str(run / "diffusion.safetensors"))
    _assert_close(two, one, atol=1e-4)  # Adam rescales float-order differences of the sums
    assert not (copy / ".lock").exists()


def _cli_job(argv: list[str]) -> None:
    assert main(argv) == 0


def test_ldm_run_under_torchrun(tmp_path: Path) -> None:
    """Every stage of `ldm run` under 2 processes: rank 0 writes, the others wait and read."""
    data_dir = write_dataset(tmp_path / "data")
    run = tmp_path / "run"
    _torchrun("run", "--preset", "tiny", "--data-dir", str(data_dir), "--run-dir", str(run),
              "--device", "cpu", "--quiet")
    for name in ("metrics.json", "report.html", "samples/ddpm.npz", "diffusion.safetensors"):
        assert (run / name).is_file(), name
    assert not (run / ".lock").exists()


@pytest.fixture(scope="module")
def conditional_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run dir with a tiny VAE, labelled latents and a class-conditional diffusion model."""
    root = tmp_path_factory.mktemp("conditional")
    data_dir = write_dataset(root / "data")
    run = root / "run"
    common = ["--data-dir", str(data_dir), "--run-dir", str(run), "--device", "cpu", "--quiet"]
    assert main(["train", "vae", "--preset", "tiny", "--steps", "120", *common]) == 0
    assert main(["encode", *common]) == 0
    assert main(["train", "diffusion", "--preset", "tiny", "--conditional", *common]) == 0
    return run


def test_balanced_guided_sampling_is_independent_of_world_size_and_batch_size(
        conditional_run: Path, tmp_path: Path) -> None:
    """Sample i asks for digit i mod 10 and depends on (seed, i) alone: one process at two
    batch sizes and two processes write the same labels and the same bytes."""
    guided = [*SAMPLE, "-n", "13", "--labels", "balanced", "--guidance", "2",
              "--run-dir", str(conditional_run)]
    outputs = {}
    for batch_size in ("4", "500"):
        out = tmp_path / f"one-{batch_size}.npz"
        assert main([*guided, "--batch-size", batch_size, "--out", str(out)]) == 0
        outputs[f"1x{batch_size}"] = load_samples(out)
    out = tmp_path / "two.npz"
    _torchrun(*guided, "--batch-size", "3", "--out", str(out))
    outputs["2x3"] = load_samples(out)

    images, labels = outputs["1x500"]
    assert labels is not None and labels.tolist() == [i % 10 for i in range(13)]
    for name, (other_images, other_labels) in outputs.items():
        assert other_images.tobytes() == images.tobytes(), name
        assert other_labels is not None and other_labels.tobytes() == labels.tobytes(), name
    unlabelled = tmp_path / "null.npz"
    assert main([*SAMPLE, "-n", "13", "--run-dir", str(conditional_run), "--out",
                 str(unlabelled)]) == 0
    assert not np.array_equal(load_samples(unlabelled)[0], images)  # the labels steer
