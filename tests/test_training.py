"""The training loop: learning, determinism, exact resume after SIGKILL, NaN and corrupt files.

Run as a script (`python tests/test_training.py STATE_DIR SLEEP`), this file trains the same
tiny model as the tests, sleeping SLEEP seconds per step: the kill-and-resume test kills it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import TINY_OBJECTIVE, TINY_SCHEDULE, TINY_UNET
from latentdiffusion.diffusion.objective import ObjectiveConfig, diffusion_loss, make_objective
from latentdiffusion.errors import LdmError, UsageError
from latentdiffusion.models import UNet
from latentdiffusion.run.config import TrainConfig
from latentdiffusion.run.keys import StageKey
from latentdiffusion.run.resume import Resume, latest_checkpoint, list_checkpoints
from latentdiffusion.run.training import (
    Batch,
    FitResult,
    adamw,
    ema_update,
    evaluate_loss,
    fit,
    init_model,
    module_tensors,
)

UNET, SCHEDULE, OBJECTIVE = TINY_UNET, TINY_SCHEDULE, TINY_OBJECTIVE
# 32 examples / 8 = 4 steps per epoch, 8 steps (2 epochs); EMA, warm-up and cosine decay on.
CONFIG = TrainConfig(steps=8, batch_size=8, lr=3e-3, warmup_steps=2, ema_decay=0.9,
                     checkpoint_every=1, validate_every=4, seed=3)
TOTAL_STEPS = 8
CPU = torch.device("cpu")


def _data(n: int = 32, seed: int = 0) -> tuple[torch.Tensor]:
    """Latent-like data: a few fixed patterns plus a little noise, scaled to unit variance."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randn(4, 2, 8, 8, generator=g)
    x = patterns[torch.arange(n) % 4] + 0.1 * torch.randn(n, 2, 8, 8, generator=g)
    return (x / x.std(),)


LossFn = Callable[[nn.Module, Batch], torch.Tensor]


def _key(config: TrainConfig) -> StageKey:
    return StageKey.of(model=UNET, train=config, objective=OBJECTIVE)


def _fit(state_dir: Path, *, config: TrainConfig = CONFIG, resume: Resume = "off",
         loss_fn: LossFn | None = None, val: bool = False) -> tuple[nn.Module, FitResult]:
    model = init_model(UNet, UNET, config.seed)
    result = fit(model, loss_fn or diffusion_loss(make_objective(OBJECTIVE, SCHEDULE)), _data(),
                 _data(16, 1) if val else None, config, state_dir=state_dir, kind="unet",
                 key=_key(config), model_config=UNET, device=CPU, resume=resume,
                 progress=False)
    return model, result


def _counting(calls: list[int], sleep: float = 0.0) -> LossFn:
    inner = diffusion_loss(make_objective(OBJECTIVE, SCHEDULE))

    def loss_fn(model: nn.Module, batch: Batch) -> torch.Tensor:
        calls.append(1)
        if sleep:
            time.sleep(sleep)
        return inner(model, batch)

    return loss_fn


def _assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def test_fit_lowers_the_loss(tmp_path: Path) -> None:
    config = TrainConfig(steps=24, batch_size=8, lr=1e-2, lr_decay="constant",
                         checkpoint_every=100, validate_every=4, seed=0)
    loss_fn = diffusion_loss(make_objective(ObjectiveConfig(), SCHEDULE))  # noise, uniform t
    initial = evaluate_loss(init_model(UNet, UNET, 0), loss_fn, _data(16, 1), 8, 0, CPU)
    assert initial == pytest.approx(1.0, abs=0.2)  # the zero predictor: E |noise|^2
    _, result = _fit(tmp_path, config=config, val=True, loss_fn=loss_fn)
    history = result.history
    assert [h["step"] for h in history] == list(range(4, 25, 4))
    assert [h["epoch"] for h in history] == list(range(1, 7))  # 32 examples, 4 steps an epoch
    assert all(math.isfinite(h["train_loss"]) and math.isfinite(h["val_loss"]) for h in history)
    assert history[-1]["val_loss"] < 0.8 * initial, (initial, history)
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_fit_lowers_the_presets_v_min_snr_loss_on_the_training_patterns(tmp_path: Path) -> None:
    # Validation patterns differ from the training ones and min-SNR weighs the noisy steps,
    # where x_0 of an unseen pattern cannot be guessed; so score the training patterns.
    config = TrainConfig(steps=120, batch_size=8, lr=1e-2, lr_decay="constant",
                         checkpoint_every=100, seed=0)
    loss_fn = diffusion_loss(make_objective(OBJECTIVE, SCHEDULE))
    initial = evaluate_loss(init_model(UNet, UNET, 0), loss_fn, _data(), 8, 0, CPU)
    model, _ = _fit(tmp_path, config=config, loss_fn=loss_fn)
    final = evaluate_loss(model, loss_fn, _data(), 8, 0, CPU)
    assert final < 0.6 * initial, (initial, final)


def test_the_budget_is_steps_whatever_the_set_size(tmp_path: Path) -> None:
    """A set of 8 examples trains the same 12 steps as one of 48, over 6 times the epochs; each
    epoch sees every example of a fresh permutation once."""
    config = dataclasses.replace(CONFIG, steps=12, validate_every=6)
    seen: dict[int, list[torch.Tensor]] = {8: [], 48: []}
    for n, rows in seen.items():
        data = (torch.arange(n, dtype=torch.float32)[:, None, None, None].expand(n, 2, 8, 8),)

        def loss_fn(model: nn.Module, batch: Batch, rows: list[torch.Tensor] = rows
                    ) -> torch.Tensor:
            rows.append(batch.tensors[0][:, 0, 0, 0].long())
            return model(batch.tensors[0], torch.zeros(len(batch.tensors[0]))).square().mean()

        result = fit(init_model(UNet, UNET, 0), loss_fn, data, None, config,
                     state_dir=tmp_path / str(n), kind="unet", key=_key(config),
                     model_config=UNET, device=CPU, progress=False)
        assert [h["step"] for h in result.history] == [6, 12]
        assert result.history[-1]["epoch"] == 12 * 8 / n
    assert len(seen[8]) == len(seen[48]) == 12
    small = torch.cat(seen[8]).reshape(12, 8)  # one batch is one epoch of 8
    assert all(sorted(epoch.tolist()) == list(range(8)) for epoch in small)
    assert len({tuple(epoch.tolist()) for epoch in small}) > 1  # reshuffled each epoch
    assert sorted(torch.cat(seen[48]).tolist()) == sorted(2 * list(range(48)))


def test_validating_less_often_trains_the_same_weights(tmp_path: Path) -> None:
    config = TrainConfig(steps=20, batch_size=8, lr=1e-2, checkpoint_every=100, seed=0,
                         ema_decay=0.9, validate_every=4)
    every, full = _fit(tmp_path / "every", config=config, val=True)
    sparse_config = dataclasses.replace(config, validate_every=8)
    sparse, part = _fit(tmp_path / "sparse", config=sparse_config, val=True)
    _assert_same_weights(every, sparse)
    _assert_same_weights(full.model, part.model)
    assert [h["step"] for h in part.history] == [8, 16, 20]  # and always after the last step
    assert part.history[-1]["val_loss"] == full.history[-1]["val_loss"]
    assert _key(config).digest == _key(sparse_config).digest  # no trained number changes


def test_same_seed_same_weights_other_seed_differs(tmp_path: Path) -> None:
    model_a, result_a = _fit(tmp_path / "a")
    model_b, result_b = _fit(tmp_path / "b")
    _assert_same_weights(model_a, model_b)
    _assert_same_weights(result_a.model, result_b.model)
    assert result_a.history == result_b.history
    other = CONFIG.__class__(**{**CONFIG.__dict__, "seed": 4})
    model_c, _ = _fit(tmp_path / "c", config=other)
    assert any(not torch.equal(p, q) for p, q in zip(model_a.state_dict().values(),
                                                      model_c.state_dict().values(), strict=True))


def test_fit_returns_ema_and_keeps_two_checkpoints(tmp_path: Path) -> None:
    model, result = _fit(tmp_path)
    assert result.model is not model and not result.model.training
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(),
                                                      result.model.parameters(), strict=True))
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["step-000000008.safetensors", "step-000000007.safetensors"]


def test_fit_updates_the_ema_at_every_step(tmp_path: Path) -> None:
    # A decay of ~0 makes each update copy the model, so the EMA must end on the final weights
    # (an EMA that is never updated would still hold the initial ones).
    config = dataclasses.replace(CONFIG, ema_decay=1e-9)
    model, result = _fit(tmp_path, config=config)
    initial = init_model(UNet, UNET, config.seed)
    for trained, ema in zip(model.parameters(), result.model.parameters(), strict=True):
        torch.testing.assert_close(ema, trained, rtol=0, atol=1e-6)
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), initial.parameters(),
                                                      strict=True))


def test_batch_choice_follows_the_probabilities_whatever_the_world_size() -> None:
    probabilities = torch.tensor([0.1, 0.0, 0.6, 0.3])

    def draw(shard: slice) -> torch.Tensor:
        batch = Batch((), 20_000, shard, torch.Generator().manual_seed(0), CPU)
        return batch.choice(probabilities)

    whole = draw(slice(None))
    frequencies = torch.bincount(whole, minlength=4) / len(whole)
    torch.testing.assert_close(frequencies, probabilities, rtol=0, atol=0.015)
    assert frequencies[1] == 0
    for rank in range(2):  # each of two ranks gets every other draw of the global batch
        assert torch.equal(draw(slice(rank, None, 2)), whole[rank::2])


def test_adamw_takes_beta2_from_the_config() -> None:
    model = nn.Linear(3, 2)
    assert adamw(model, CONFIG).param_groups[0]["betas"] == (0.9, 0.999)
    tuned = adamw(model, TrainConfig(adam_beta2=0.99)).param_groups[0]
    assert tuned["betas"] == (0.9, 0.99)
    with pytest.raises(UsageError, match="adam_beta2 must be in"):
        TrainConfig(adam_beta2=1.0)


def test_ema_update_is_the_convex_combination() -> None:
    ema, model = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    with torch.no_grad():
        for i, (e, m) in enumerate(zip(ema.parameters(), model.parameters(), strict=True)):
            e.fill_(1.0 + i)
            m.fill_(-2.0)
    model.running_mean.fill_(5.0)
    ema_update(module_tensors(ema), module_tensors(model), 0.75)
    assert torch.allclose(ema.weight, torch.full((3,), 0.75 * 1.0 + 0.25 * -2.0))
    assert torch.allclose(ema.bias, torch.full((3,), 0.75 * 2.0 + 0.25 * -2.0))
    assert torch.equal(ema.running_mean, model.running_mean)  # buffers are copied


def _slow_run(state_dir: Path, sleep: float) -> None:
    """Script entry point: the run the kill-and-resume test kills."""
    torch.set_num_threads(1)
    _fit(state_dir, loss_fn=_counting([], sleep))


def test_sigkill_then_resume_is_bit_identical(tmp_path: Path) -> None:
    reference_model, reference = _fit(tmp_path / "reference")

    state_dir = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, __file__, str(state_dir), "0.4"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not (state_dir / "step-000000002.safetensors").exists():
            assert process.poll() is None, process.stderr.read().decode()  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "no checkpoint after 60 s"
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL

    found = latest_checkpoint(state_dir, "train-state/unet")
    assert found is not None
    done = found[2]["step"]
    assert 2 <= done < TOTAL_STEPS

    calls: list[int] = []
    model, result = _fit(state_dir, resume="strict", loss_fn=_counting(calls))
    assert len(calls) == TOTAL_STEPS - done  # it resumed, it did not start over
    _assert_same_weights(model, reference_model)
    _assert_same_weights(result.model, reference.model)
    assert result.history == reference.history


def test_resume_without_checkpoints_starts_over(tmp_path: Path) -> None:
    calls: list[int] = []
    _fit(tmp_path, resume="strict", loss_fn=_counting(calls))
    assert len(calls) == TOTAL_STEPS


def test_resume_of_a_finished_run_does_nothing(tmp_path: Path) -> None:
    model_a, _ = _fit(tmp_path)
    calls: list[int] = []
    model_b, _ = _fit(tmp_path, resume="strict", loss_fn=_counting(calls))
    assert calls == []
    _assert_same_weights(model_a, model_b)


def test_resume_with_another_config_is_refused(tmp_path: Path) -> None:
    _fit(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    other = dataclasses.replace(CONFIG, lr=1e-3)
    with pytest.raises(UsageError, match=r"was made with another config \(train.lr: 0.003 -> "
                                         r"0.001\); pass --force to start over"):
        _fit(tmp_path, config=other, resume="strict")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_nan_loss_stops_naming_the_step(tmp_path: Path) -> None:
    inner = diffusion_loss(make_objective(OBJECTIVE, SCHEDULE))
    calls: list[int] = []

    def loss_fn(model: nn.Module, batch: Batch) -> torch.Tensor:
        calls.append(1)
        loss = inner(model, batch)
        return loss * float("nan") if len(calls) == 4 else loss

    with pytest.raises(LdmError, match=r"loss became nan at step 3\b") as info:
        _fit(tmp_path, loss_fn=loss_fn)
    assert "step-000000003.safetensors" in str(info.value)  # the last good checkpoint
    assert len(calls) == 4
    # Nothing was saved for the bad step, and the last checkpoint resumes.
    assert list_checkpoints(tmp_path)[0].name == "step-000000003.safetensors"


def test_nan_before_any_checkpoint(tmp_path: Path) -> None:
    def loss_fn(model: nn.Module, batch: Batch) -> torch.Tensor:
        return model(batch.tensors[0], torch.zeros(len(batch.tensors[0]), dtype=torch.long)
                     ).sum() * float("inf")

    with pytest.raises(LdmError, match="at step 0.*no checkpoint yet"):
        _fit(tmp_path, loss_fn=loss_fn)


def test_corrupt_newest_checkpoint_is_skipped(tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    state_dir = tmp_path / "run"
    config = CONFIG.__class__(**{**CONFIG.__dict__, "checkpoint_every": 3})
    _fit(state_dir, config=config)  # checkpoints at steps 6 and 8 remain
    reference_model, reference = _fit(tmp_path / "reference", config=config)
    newest, previous = list_checkpoints(state_dir)
    assert (newest.name, previous.name) == ("step-000000008.safetensors",
                                            "step-000000006.safetensors")
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # truncated, as by a full disk

    calls: list[int] = []
    with caplog.at_level(logging.WARNING, logger="latentdiffusion.training"):
        model, result = _fit(state_dir, config=config, resume="strict", loss_fn=_counting(calls))
    assert len(calls) == 2  # resumed from step 6
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("step-000000008.safetensors" in r.getMessage() for r in warnings)
    _assert_same_weights(model, reference_model)
    _assert_same_weights(result.model, reference.model)
    # The rewritten step 8 verifies again.
    assert latest_checkpoint(state_dir, "train-state/unet")[0].name == newest.name  # type: ignore[index]


def test_garbled_checkpoint_is_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _fit(tmp_path)
    newest = list_checkpoints(tmp_path)[0]
    data = bytearray(newest.read_bytes())
    data[-5] ^= 0xFF  # one flipped byte in the tensor data: only the checksum can tell
    newest.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="latentdiffusion.training"):
        found = latest_checkpoint(tmp_path, "train-state/unet")
    assert found is not None and found[2]["step"] == 7
    assert any("corrupt" in r.getMessage() for r in caplog.records)


if __name__ == "__main__":
    _slow_run(Path(sys.argv[1]), float(sys.argv[2]))
