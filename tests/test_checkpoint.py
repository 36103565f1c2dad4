"""Checkpoints (safetensors + verified JSON header) and crash-safe file writes and locks."""

from __future__ import annotations

import builtins
import errno
import json
import os
import pickle
import shlex
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from latentdiffusion import files
from latentdiffusion.errors import CheckpointError, LdmError
from latentdiffusion.files import atomic_write
from latentdiffusion.models import VAE, Classifier
from latentdiffusion.models.classifier import ClassifierConfig
from latentdiffusion.models.vae import VAEConfig
from latentdiffusion.run import checkpoint
from latentdiffusion.run.rundir import run_dir_lock
from latentdiffusion.schema import to_dict

TINY_VAE = VAEConfig(latent_channels=2, channels=(4, 8))


def _tensors() -> dict[str, torch.Tensor]:
    return {"weight": torch.arange(12, dtype=torch.float32).reshape(3, 4),
            "steps": torch.tensor([7, -1], dtype=torch.int64),
            "half": torch.linspace(0, 1, 5, dtype=torch.bfloat16)}


def _save(path: Path) -> str:
    return checkpoint.save(path, _tensors(), kind="test", step=3, config={"a": [1, 2]},
                           history=[{"loss": 0.5}])


def _header_length(raw: bytes) -> int:
    return int.from_bytes(raw[:8], "little")


# ---------------------------------------------------------------- round trip


def test_save_load_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    digest = _save(path)
    tensors, header = checkpoint.load(path, kind="test")
    assert set(tensors) == {"weight", "steps", "half"}
    for name, expected in _tensors().items():
        assert tensors[name].dtype == expected.dtype
        assert torch.equal(tensors[name], expected)
    assert header == {"kind": "test", "format_version": checkpoint.FORMAT_VERSION, "step": 3,
                      "config": {"a": [1, 2]}, "history": [{"loss": 0.5}], "sha256": digest}
    assert checkpoint.peek(path) == header
    assert checkpoint.load(path)[1]["sha256"] == digest  # kind=None accepts any kind


def test_content_hash_depends_on_values_names_dtypes_and_meta() -> None:
    base = checkpoint.content_hash(_tensors(), {"k": 1})
    assert checkpoint.content_hash(_tensors(), {"k": 1}) == base
    changed = _tensors()
    changed["weight"][0, 0] = 0.5
    assert checkpoint.content_hash(changed, {"k": 1}) != base
    renamed = {("w" if k == "weight" else k): v for k, v in _tensors().items()}
    assert checkpoint.content_hash(renamed, {"k": 1}) != base
    retyped = {**_tensors(), "steps": _tensors()["steps"].to(torch.float64)}
    assert checkpoint.content_hash(retyped, {"k": 1}) != base
    assert checkpoint.content_hash(_tensors(), {"k": 2}) != base


def test_wrong_kind(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    _save(path)
    with pytest.raises(CheckpointError, match="holds a 'test' checkpoint, expected 'vae'") as err:
        checkpoint.load(path, kind="vae")
    assert str(path) in str(err.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.load(tmp_path / "none.safetensors")
    assert checkpoint.peek(tmp_path / "none.safetensors") is None


@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.5, 0.99])
def test_truncated_file(tmp_path: Path, fraction: float) -> None:
    path = tmp_path / "c.safetensors"
    _save(path)
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * fraction)])
    with pytest.raises(CheckpointError) as err:
        checkpoint.load(path, kind="test")
    assert str(path) in str(err.value)
    assert checkpoint.peek(path) is None


def test_one_flipped_byte_in_tensor_data_fails_the_checksum(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    _save(path)
    raw = path.read_bytes()
    data_start = 8 + _header_length(raw)
    for offset in (data_start, (data_start + len(raw)) // 2, len(raw) - 1):
        garbled = bytearray(raw)
        garbled[offset] ^= 0x01  # one bit: still a well-formed file
        path.write_bytes(bytes(garbled))
        with pytest.raises(CheckpointError, match="does not match its checksum"):
            checkpoint.load(path)


def test_edited_header_fails_the_checksum(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    _save(path)
    raw = path.read_bytes()
    size = _header_length(raw)
    header = json.loads(raw[8:8 + size])
    meta = json.loads(header["__metadata__"]["latentdiffusion"])
    meta["step"] = 4  # an edit by hand that keeps the file well-formed
    header["__metadata__"]["latentdiffusion"] = json.dumps(meta)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + size:])
    with pytest.raises(CheckpointError, match="does not match its checksum"):
        checkpoint.load(path)


def test_plain_safetensors_file_is_not_a_checkpoint(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match="not a latentdiffusion checkpoint"):
        checkpoint.load(path)


def test_other_format_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.safetensors"
    monkeypatch.setattr(checkpoint, "FORMAT_VERSION", 99)
    _save(path)
    monkeypatch.setattr(checkpoint, "FORMAT_VERSION", 1)
    with pytest.raises(CheckpointError, match="format version 99"):
        checkpoint.load(path)


# ---------------------------------------------------------------- never unpickle


class _Payload:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def test_malicious_pickle_is_refused_without_running(tmp_path: Path) -> None:
    # The payload works: unpickling it does create its marker.
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Payload(control)))
    assert control.exists()

    marker = tmp_path / "pwned"
    raw_pickle = tmp_path / "classifier.safetensors"
    raw_pickle.write_bytes(pickle.dumps({"weight": _Payload(marker)}))
    torch_file = tmp_path / "vae.safetensors"
    torch.save({"state_dict": _Payload(marker)}, torch_file)  # a zip holding data.pkl
    for path, cls in ((raw_pickle, Classifier), (torch_file, VAE)):
        with pytest.raises(CheckpointError, match="not a valid latentdiffusion checkpoint"):
            checkpoint.load(path)
        with pytest.raises(CheckpointError):
            checkpoint.load_model(path, cls)  # type: ignore[type-var]
        assert checkpoint.peek(path) is None
    assert not marker.exists()


# ---------------------------------------------------------------- load_model


def test_load_model_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "vae.safetensors"
    torch.manual_seed(0)
    model = VAE(TINY_VAE)
    digest = checkpoint.save_model(path, model, TINY_VAE, key="k")
    loaded, header = checkpoint.load_model(path, VAE)
    assert loaded.config == TINY_VAE and not loaded.training
    assert header["model_hash"] == digest == checkpoint.model_hash_of(header)
    assert header["key"] == "k"
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    with pytest.raises(CheckpointError, match="holds a 'vae' checkpoint, expected 'classifier'"):
        checkpoint.load_model(path, Classifier)


def test_model_hash_is_weights_and_key_not_wall_time(tmp_path: Path) -> None:
    model = VAE(TINY_VAE)
    hashes = [checkpoint.save_model(tmp_path / f"{i}.safetensors", model, TINY_VAE, key=key,
                                    train_seconds=seconds)
              for i, (key, seconds) in enumerate((("k", 1.0), ("k", 2.5), ("other", 1.0)))]
    headers = [checkpoint.load(tmp_path / f"{i}.safetensors")[1] for i in range(3)]
    assert hashes[0] == hashes[1] != hashes[2]  # a resumed run's time does not change it
    assert headers[0]["sha256"] != headers[1]["sha256"]  # the file checksum covers everything
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert checkpoint.save_model(tmp_path / "w.safetensors", model, TINY_VAE, key="k") \
        != hashes[0]


@pytest.mark.parametrize("config", [
    to_dict(VAEConfig(latent_channels=2, channels=(4, 16))),  # weights of the wrong shape
    to_dict(VAEConfig(latent_channels=2, channels=(4, 8, 8))),  # missing weights
    {**to_dict(TINY_VAE), "attention": True},  # a field this version does not know
    {**to_dict(TINY_VAE), "channels": [4, 8, 8, 8, 8]},  # fails VAEConfig's validation
    None,
    ["latent_channels", 2],
])
def test_load_model_with_a_config_that_does_not_fit(tmp_path: Path, config: Any) -> None:
    path = tmp_path / "vae.safetensors"
    # Saved consistently (valid checksum), as a newer or older version would write it.
    checkpoint.save(path, VAE(TINY_VAE).state_dict(), kind="vae", config=config)
    with pytest.raises(CheckpointError, match="does not fit this version's VAE") as err:
        checkpoint.load_model(path, VAE)
    assert str(path) in str(err.value)


def test_load_model_without_config(tmp_path: Path) -> None:
    path = tmp_path / "classifier.safetensors"
    model = Classifier(ClassifierConfig(channels=4, feature_dim=16))
    checkpoint.save(path, model.state_dict(), kind="classifier")
    with pytest.raises(CheckpointError, match="does not fit"):
        checkpoint.load_model(path, Classifier)


# ---------------------------------------------------------------- atomic writes


def _enospc(*args: Any, **kwargs: Any) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_atomic_write_replaces(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "f.bin"
    atomic_write(path, b"one")
    atomic_write(path, b"two")
    assert path.read_bytes() == b"two"
    assert os.listdir(path.parent) == ["f.bin"]


def test_atomic_write_full_disk_at_fsync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                         ) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"previous")
    monkeypatch.setattr(os, "fsync", _enospc)
    with pytest.raises(LdmError, match="no space left on device") as err:
        atomic_write(path, b"new content")
    assert str(path) in str(err.value) and "nothing was replaced" in str(err.value)
    assert path.read_bytes() == b"previous"
    assert os.listdir(tmp_path) == ["f.bin"]  # no temp file left behind


class _FullDiskFile:
    """A file whose writes fail with ENOSPC after `room` bytes (some bytes do get written)."""

    def __init__(self, real: Any, room: int) -> None:
        self.real, self.room = real, room

    def write(self, data: bytes) -> int:
        self.real.write(data[: self.room])
        self.real.flush()
        _enospc()
        return 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def __enter__(self) -> _FullDiskFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.real.close()


def test_atomic_write_full_disk_at_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                         ) -> None:
    path = tmp_path / "model.safetensors"
    _save(path)
    before = path.read_bytes()
    monkeypatch.setattr(files, "open",
                        lambda *a, **k: _FullDiskFile(builtins.open(*a, **k), room=10),
                        raising=False)
    with pytest.raises(LdmError, match="no space left on device") as err:
        checkpoint.save(path, {"x": torch.ones(1000)}, kind="test")
    assert str(path) in str(err.value)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["model.safetensors"]
    monkeypatch.undo()
    assert checkpoint.load(path, kind="test")[1]["step"] == 3  # still a valid checkpoint


def test_atomic_write_full_disk_for_a_new_file(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "fsync", _enospc)
    with pytest.raises(LdmError, match="no space left"):
        files.write_json(tmp_path / "m.json", {"a": 1})
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- run-dir lock


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_lock_refuses_a_second_holder(tmp_path: Path) -> None:
    run = tmp_path / "run"
    lock = run / ".lock"
    with run_dir_lock(run):
        assert lock.read_text() == f"{socket.gethostname()} {os.getpid()}"
        with pytest.raises(LdmError, match=f"in use by process {os.getpid()}") as err:
            with run_dir_lock(run):
                pass
        assert str(lock) in str(err.value)
        assert lock.exists()  # the refused holder did not remove the first one's lock
    assert not lock.exists()
    with run_dir_lock(run):  # free again
        assert lock.exists()


def test_lock_is_released_when_the_body_fails(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with pytest.raises(RuntimeError), run_dir_lock(run):
        raise RuntimeError("boom")
    assert not (run / ".lock").exists()


def test_lock_takes_over_a_stale_lock(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    lock = run / ".lock"
    pid = _dead_pid()
    lock.write_text(f"{socket.gethostname()} {pid}")
    with run_dir_lock(run):
        assert lock.read_text() == f"{socket.gethostname()} {os.getpid()}"
    assert not lock.exists()


@pytest.mark.parametrize("owner", ["other-host.example {dead}", "{host} {alive}"])
def test_lock_held_by_a_live_or_remote_process_is_kept(tmp_path: Path, owner: str) -> None:
    run = tmp_path / "run"
    run.mkdir()
    lock = run / ".lock"
    text = owner.format(host=socket.gethostname(), dead=_dead_pid(), alive=os.getppid())
    lock.write_text(text)
    with pytest.raises(LdmError, match="is in use by process"):
        with run_dir_lock(run):
            pass
    assert lock.read_text() == text  # left for its owner


def test_lock_disabled_touches_nothing(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with run_dir_lock(run, enabled=False):
        pass
    assert not run.exists()


def test_lock_on_a_run_dir_that_cannot_be_created(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(LdmError, match="cannot create run directory") as err:
        with run_dir_lock(blocker / "run"):
            pass
    assert str(blocker / "run") in str(err.value)
