"""Crash-safe file writes (temp file, fsync, rename) and the one-writer lock of a run directory."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .errors import LdmError


def atomic_write(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` so that a crash or full disk leaves the old file (or none)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        reason = "no space left on device" if err.errno == errno.ENOSPC else err.strerror or err
        raise LdmError(f"could not write {path}: {reason}; nothing was replaced") from None
    with contextlib.suppress(OSError):  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def write_npz(path: str | os.PathLike[str], **arrays: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)  # type: ignore[arg-type]
    atomic_write(path, buffer.getvalue())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def run_dir_lock(run_dir: str | os.PathLike[str], enabled: bool = True) -> Iterator[None]:
    """Hold `run_dir/.lock` while writing; a lock left by a dead process is taken over."""
    if not enabled:
        yield
        return
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise LdmError(f"cannot create run directory {run_dir}: {err.strerror}") from None
    if not os.access(run_dir, os.W_OK):
        raise LdmError(f"run directory {run_dir} is not writable")
    lock = run_dir / ".lock"
    me = f"{socket.gethostname()} {os.getpid()}"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                host, pid = lock.read_text().split()
            except (OSError, ValueError):  # empty: its owner died between create and write
                host, pid = socket.gethostname(), "0"
            if host == socket.gethostname() and pid.isdigit() and (
                    int(pid) == 0 or not _pid_alive(int(pid))):
                lock.unlink(missing_ok=True)  # stale: its owner is dead
                continue
            raise LdmError(f"{run_dir} is in use by process {pid} on {host or '?'}; wait for it "
                           f"or pick another --run-dir (delete {lock} if that process is gone)"
                           ) from None
        except OSError as err:
            raise LdmError(f"run directory {run_dir} is not writable ({err.strerror})") from None
        with os.fdopen(fd, "w") as f:
            f.write(me)
        break
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            if lock.read_text() == me:
                lock.unlink()
