"""Crash-safe file writes (temp file, fsync, rename), the one-writer lock of a run directory
and the .npy headers of an .npz, read before its arrays are."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import math
import os
import socket
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError, LdmError

try:
    import fcntl
except ImportError:  # Windows: the O_EXCL protocol alone, see run_dir_lock
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)
# What np.load (and npz_headers) raise for a truncated or garbled .npz besides OSError /
# ValueError (zipfile: RuntimeError for an encrypted member, NotImplementedError for an unknown
# compression).
BAD_NPZ = (zipfile.BadZipFile, zlib.error, EOFError, RuntimeError, NotImplementedError)


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


def _finite_or_none(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj


def strict_json(obj: Any, **options: Any) -> str:
    """JSON that every parser reads: NaN and infinities (bare NaN / Infinity in Python's
    default output) become null. Code that leaves a value undefined on purpose also says why
    in a field beside it (see metrics.evaluate_images)."""
    return json.dumps(_finite_or_none(obj), allow_nan=False, **options)


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write(path, (strict_json(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: str | os.PathLike[str], valid: Callable[[Any], bool]) -> Any | None:
    """A state file this program wrote: its JSON if `valid(it)`, else None. Missing is quiet;
    unreadable, garbled or of the wrong layout is logged as a warning, and the caller rebuilds
    the file (a damaged state file must never stop a run)."""
    path = Path(path)
    try:
        value = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:  # ValueError: JSONDecodeError, UnicodeDecodeError
        log.warning("%s is damaged (%s); rebuilding it", path, str(err)[:80])
        return None
    if not valid(value):
        log.warning("%s is damaged (not the layout this version writes); rebuilding it", path)
        return None
    return value


def _is_manifest(value: Any) -> bool:
    stages = value.get("stages") if isinstance(value, dict) else None
    return isinstance(stages, dict) and all(isinstance(r, dict) for r in stages.values())


# The fields of each set that `ldm run`'s summary and the report read.
_METRIC_FIELDS = ("n", "fid", "fid_over_validation", "kid_mean", "kid_std", "precision",
                  "recall", "class_entropy_bits", "class_histogram")


def _is_metrics(value: Any) -> bool:
    return (isinstance(value, dict) and "validation" in value
            and all(isinstance(m, dict) and all(k in m for k in _METRIC_FIELDS)
                    and isinstance(m["fid"], (int, float)) for m in value.values()))


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """R/run.json (which config and upstream hashes made each stage); empty when missing or
    damaged, so every stage is checked again against its outputs."""
    manifest = read_json(path, _is_manifest)
    return manifest if manifest is not None else {"stages": {}}


def read_metrics(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """R/metrics.json; None when missing or damaged, so the evaluation is redone."""
    return read_json(path, _is_metrics)  # type: ignore[no-any-return]


def write_npz(path: str | os.PathLike[str], **arrays: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)  # type: ignore[arg-type]
    atomic_write(path, buffer.getvalue())


def npz_headers(path: str | os.PathLike[str]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of each array of an .npz, from the .npy headers inside the zip.

    Each header is checked against the size the zip records for its member, so a header that
    declares a billion images is refused (DataError) before numpy allocates them. A file that
    is not a zip, or a garbled one, raises OSError, ValueError or one of BAD_NPZ: callers say
    what the file should have been.
    """
    arrays = {}
    with zipfile.ZipFile(path) as archive:
        for member in archive.infolist():
            with archive.open(member) as f:
                version = np.lib.format.read_magic(f)
                if version not in ((1, 0), (2, 0)):
                    raise ValueError(f"{member.filename}: .npy format version {version}")
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, _, dtype = read_header(f)
                declared = f.tell() + math.prod(shape) * dtype.itemsize
            if declared != member.file_size and dtype.hasobject:  # pickled, never loaded
                raise DataError(f"{path}: {member.filename} is an array of Python objects "
                                "(pickled), which is never loaded; save strings as str and "
                                "pixels as uint8")
            if declared != member.file_size:
                raise DataError(f"{path}: {member.filename} declares {shape} {dtype} "
                                f"({declared} bytes) but holds {member.file_size} bytes; the "
                                "file is corrupt")
            arrays[member.filename.removesuffix(".npy")] = (shape, dtype)
    return arrays


def _pid_alive(pid: int) -> bool:
    if pid <= 0:  # 0 and below name process groups, never a lock's owner
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # OverflowError: beyond any pid this OS gives
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def _owner_gone(text: str, flock_free: bool) -> bool:
    """Whether a lock whose file says `text` may be taken over.

    `host pid` of this host whose process is dead: yes; of a live process or another host: no
    (a process that does not flock, or one we cannot see). Empty: its owner died between
    creating and writing it. Anything else was not written by latentdiffusion: with fcntl,
    nobody holds the file, so it is taken over; without, nothing tells, so it counts as held.
    """
    parts = text.split()
    if len(parts) == 2 and parts[1].isdigit():
        host, pid = parts
        return host == socket.gethostname() and not _pid_alive(int(pid))
    return not parts or flock_free


def _in_use(run_dir: Path, lock: Path, text: str | None) -> LdmError:
    parts = (text or "").split()
    if len(parts) == 2 and parts[1].isdigit():
        owner = f"process {parts[1]} on {parts[0]}"
    elif text is None:
        owner = "a process that made it unreadable to this one"
    else:
        owner = "an unknown process" + (f" (it says {text[:40]!r})" if text.strip() else "")
    return LdmError(f"{run_dir} is in use by {owner}; wait for it or pick another --run-dir "
                    f"(delete {lock} if that process is gone)")


def _open_lock(run_dir: Path, lock: Path) -> int | None:
    """A descriptor of `lock`, created if missing; None when fcntl is missing and it exists."""
    # Without fcntl the file itself is the lock, so only its creator may open it.
    # O_NOFOLLOW: a link at R/.lock must never truncate (or create) a file elsewhere.
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | (0 if fcntl else os.O_EXCL)
    try:
        return os.open(lock, flags, 0o644)
    except FileExistsError:
        return None
    except IsADirectoryError:
        raise LdmError(f"{lock} is a directory, not a lock file; remove it if nothing else uses "
                       f"{run_dir}") from None
    except PermissionError:  # e.g. mode 000 and another user's: its owner may be alive
        raise _in_use(run_dir, lock, None) from None
    except OSError as err:
        if lock.is_symlink():
            raise LdmError(f"{lock} is a symbolic link, not a lock file; remove it if nothing "
                           f"else uses {run_dir}") from None
        raise LdmError(f"run directory {run_dir} is not writable ({err.strerror})") from None


def _read_lock(run_dir: Path, lock: Path) -> str | None:
    """The lock's text; None when it cannot be read."""
    try:
        return lock.read_text(errors="replace")
    except FileNotFoundError:
        return ""  # released meanwhile
    except IsADirectoryError:
        raise LdmError(f"{lock} is a directory, not a lock file; remove it if nothing else uses "
                       f"{run_dir}") from None
    except OSError:
        return None


def _is_current(fd: int, lock: Path) -> bool:
    """Whether `fd` is still the file at `lock` (its holder may have removed it meanwhile)."""
    try:
        a, b = os.fstat(fd), os.stat(lock)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _acquire(run_dir: Path, lock: Path) -> int:
    """Open, lock and stamp `lock` with this host and pid; returns its descriptor."""
    for _ in range(5):
        fd = _open_lock(run_dir, lock)
        if fd is None:  # no fcntl: the existing file is someone's lock unless its owner is gone
            text = _read_lock(run_dir, lock)
            if text is None or not _owner_gone(text, flock_free=False):
                raise _in_use(run_dir, lock, text)
            log.warning("taking over %s, left by %s", lock, text.strip() or "a crashed process")
            lock.unlink(missing_ok=True)
            continue
        flocked = _flock(fd, run_dir, lock) if fcntl is not None else False
        if flocked is None:
            continue
        text = os.read(fd, 256).decode(errors="replace")
        if text and not _owner_gone(text, flock_free=flocked):
            os.close(fd)
            raise _in_use(run_dir, lock, text)
        if text:
            log.warning("taking over %s, left by %s", lock, text.strip()[:40])
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{socket.gethostname()} {os.getpid()}".encode())
        return fd
    raise LdmError(f"could not take {lock}: other processes keep replacing it; try again")


def _flock(fd: int, run_dir: Path, lock: Path) -> bool | None:
    """flock `fd`: True when held, False when the filesystem has no flock; None (fd closed)
    when `fd` is no longer the file at `lock`, so the caller retries."""
    try:
        # The kernel drops a flock when its holder dies, so a held one means a live owner,
        # whatever the file says (or whether we can read it).
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # type: ignore[union-attr]
    except BlockingIOError:
        os.close(fd)
        raise _in_use(run_dir, lock, _read_lock(run_dir, lock)) from None
    except OSError:  # e.g. ENOLCK: the file's content alone decides
        return False
    if _is_current(fd, lock):
        return True
    os.close(fd)  # its holder removed it between our open and flock
    return None


def _release(lock: Path, fd: int) -> None:
    current = _is_current(fd, lock)
    if fcntl is None:  # the file is the lock: close before removing it (Windows needs that)
        os.close(fd)
    # With flock, remove it while still holding it: a process that opened it meanwhile finds
    # it is no longer the current .lock and retries.
    if current:
        with contextlib.suppress(OSError):
            lock.unlink()
    if fcntl is not None:
        os.close(fd)


@contextlib.contextmanager
def run_dir_lock(run_dir: str | os.PathLike[str], enabled: bool = True) -> Iterator[None]:
    """Hold `run_dir/.lock` while writing; a lock left by a dead process is taken over.

    The lock is an flock on the file (released by the kernel when its holder dies) plus the
    holder's `host pid` in it for the message; without fcntl (Windows), creating the file is
    the lock and its content tells whether the holder is gone.
    """
    if not enabled:
        yield
        return
    run_dir = Path(run_dir)
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise LdmError(f"cannot create run directory {run_dir}: {err.strerror}") from None
    if not os.access(run_dir, os.W_OK):
        raise LdmError(f"run directory {run_dir} is not writable")
    lock = run_dir / ".lock"
    try:
        fd = _acquire(run_dir, lock)
        try:
            yield
        finally:
            _release(lock, fd)
    finally:
        if created:  # a command that failed before writing anything leaves no empty run dir
            with contextlib.suppress(OSError):
                run_dir.rmdir()  # refuses when anything was written, by us or anyone
