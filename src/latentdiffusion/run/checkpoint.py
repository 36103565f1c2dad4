"""Checkpoints: tensors in safetensors plus a JSON header (kind, version, config, hash).

Nothing is unpickled, so loading never runs code from the file. The header carries a sha256 of
every tensor and of the metadata; a truncated or garbled file fails the header parse or the hash,
and is never loaded silently.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..errors import CheckpointError, UsageError
from ..files import atomic_write
from ..models import to_device
from ..schema import from_dict, to_dict

FORMAT_VERSION = 1
# The largest file this writes, MNIST's latents.safetensors, is 72 MB; a file far larger is
# not one of ours, and reading it whole could exhaust the memory.
MAX_CHECKPOINT_BYTES = 1 << 30
_META_KEY = "latentdiffusion"


def content_hash(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> str:
    """sha256 over sorted tensor names, dtypes, shapes, bytes and the JSON metadata."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    digest.update(json.dumps(meta, sort_keys=True).encode())
    return digest.hexdigest()


def save(path: str | os.PathLike[str], tensors: dict[str, torch.Tensor], kind: str,
         **meta: Any) -> str:
    """Atomically write a checkpoint of `kind`; returns its content hash."""
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    header = {"kind": kind, "format_version": FORMAT_VERSION, **meta}
    digest = content_hash(tensors, header)
    metadata = {_META_KEY: json.dumps({**header, "sha256": digest})}
    atomic_write(path, st_save(tensors, metadata=metadata))
    return digest


def load(path: str | os.PathLike[str], kind: str | None = None
         ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read and verify a checkpoint; raises CheckpointError naming what is wrong."""
    path = Path(path)
    try:
        data = _read_checked(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist; train that stage first") from None
    except OSError as err:
        raise CheckpointError(f"cannot read {path}: {err.strerror}") from None
    try:
        tensors = st_load(data)
        metadata = _read_metadata(data)
    except (SafetensorError, ValueError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not a valid latentdiffusion checkpoint (corrupt, "
                              f"truncated or another format: {str(err)[:80]})") from None
    if metadata is None:
        raise CheckpointError(f"{path} is a safetensors file but not a latentdiffusion checkpoint")
    header = dict(metadata)
    stored = header.pop("sha256", None)
    if stored != content_hash(tensors, header):
        raise CheckpointError(f"{path} is corrupt: its content does not match its checksum")
    if header.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {header.get('format_version')}, this "
                              f"latentdiffusion reads version {FORMAT_VERSION}")
    if kind is not None and header.get("kind") != kind:
        raise CheckpointError(f"{path} holds a {header.get('kind')!r} checkpoint, expected "
                              f"{kind!r}")
    header["sha256"] = stored
    return tensors, header


def _read_checked(path: Path) -> bytes:
    """The bytes of `path`, after checking it is a regular file of plausible size whose
    safetensors header fits in it: /dev/zero, a pipe or a huge file is never read whole."""
    info = os.stat(path)  # before opening: opening a FIFO would wait for a writer
    if not stat.S_ISREG(info.st_mode):
        raise CheckpointError(f"{path} is not a regular file (a directory, device or pipe); "
                              "point at a checkpoint or delete it")
    if info.st_size > MAX_CHECKPOINT_BYTES:
        raise CheckpointError(f"{path} is {info.st_size} bytes, more than the "
                              f"{MAX_CHECKPOINT_BYTES} a latentdiffusion checkpoint may have; "
                              "not a checkpoint of this program")
    with open(path, "rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
        if 8 + header_size > info.st_size:
            raise CheckpointError(f"{path} is not a valid latentdiffusion checkpoint (corrupt, "
                                  f"truncated or another format: its header claims "
                                  f"{header_size} bytes, the file has {info.st_size})")
        f.seek(0)
        return f.read(info.st_size)


def _read_metadata(data: bytes) -> dict[str, Any] | None:
    # safetensors layout: u64 little-endian header length, then a JSON header.
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    raw = (header.get("__metadata__") or {}).get(_META_KEY)
    return None if raw is None else json.loads(raw)


def peek(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The verified header of a checkpoint, or None when it is missing or invalid."""
    try:
        return load(path)[1]
    except CheckpointError:
        return None


def model_hash(tensors: dict[str, torch.Tensor], key: str) -> str:
    """What identifies a trained model to the stages after it: its weights and its stage key.
    Not the file's checksum, which also covers how long training took: a resumed run must have
    the hash of an uninterrupted one, or every later stage would rerun."""
    return content_hash(tensors, {"key": key})


def model_hash_of(header: dict[str, Any]) -> str:
    """The model hash in a model file's header (the checksum for files written before it)."""
    return str(header.get("model_hash") or header["sha256"])


def model_hash_at(path: str | os.PathLike[str], kind: str) -> str:
    """The model hash of the verified model file at `path` (CheckpointError if it is none)."""
    return model_hash_of(load(path, kind=kind)[1])


def save_model(path: str | os.PathLike[str], model: torch.nn.Module, config: Any, *, key: str,
               **meta: Any) -> str:
    """Weights + config + stage key of a finished stage; returns its model hash."""
    tensors = model.state_dict()
    digest = model_hash(tensors, key)
    save(path, tensors, kind=model.kind,  # type: ignore[arg-type]
         config=to_dict(config), key=key, model_hash=digest, **meta)
    return digest


M = TypeVar("M", bound=torch.nn.Module)


def load_model(path: str | os.PathLike[str], cls: type[M],
               device: torch.device | str = "cpu") -> tuple[M, dict[str, Any]]:
    """Rebuild `cls` from its config and weights; the file must hold a checkpoint of cls.kind."""
    tensors, header = load(path, kind=cls.kind)  # type: ignore[attr-defined]
    try:
        config = from_dict(cls.config_class, header["config"])  # type: ignore[attr-defined]
        model = cls(config)  # type: ignore[call-arg]
        model.load_state_dict(tensors, strict=True)
    except (UsageError, KeyError, TypeError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0][:120]
        raise CheckpointError(f"{path} does not fit this version's {cls.__name__} "
                              f"(incompatible config: {first})") from None
    return to_device(model, device).eval(), header
