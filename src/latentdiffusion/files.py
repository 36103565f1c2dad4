"""Crash-safe file writes (temp file, fsync, rename), strict JSON, and the .npy headers of an
.npz, read before its arrays are."""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import io
import json
import logging
import math
import os
import stat
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError, LdmError

log = logging.getLogger(__name__)
# What np.load (and npz_headers) raise for a truncated or garbled .npz besides OSError /
# ValueError (zipfile: RuntimeError for an encrypted member, NotImplementedError for an unknown
# compression).
BAD_NPZ = (zipfile.BadZipFile, zlib.error, EOFError, RuntimeError, NotImplementedError)
# The most one file's arrays may take once decoded (MNIST's training images take 47 MB,
# CIFAR-10's 150 MB, 60,000 colour images of 64x64 737 MB): a file whose declared shape asks
# for more is refused from its header, before anything is decoded, so that a small hostile file
# never makes a command allocate gigabytes.
MAX_DECODED_BYTES = 1 << 30


def check_decoded_size(path: str | os.PathLike[str], declared: int) -> None:
    """DataError when the arrays of `path` declare more than MAX_DECODED_BYTES (read from
    its headers, before any array is decoded)."""
    if declared > MAX_DECODED_BYTES:
        raise DataError(f"{path}: its arrays take {declared:,} bytes once decoded, more than "
                        f"the {MAX_DECODED_BYTES:,} one file may hold here; use a subset")


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
    _remove_stale_temps(path)


def _remove_stale_temps(path: Path) -> None:
    """Temp files of `path` left by writers that were killed (SIGKILL runs no cleanup); a
    live writer's is left alone."""
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):
        pid = tmp.name.rpartition("-")[2]
        if pid.isdigit() and not pid_alive(int(pid)):
            with contextlib.suppress(OSError):
                tmp.unlink()


def pid_alive(pid: int) -> bool:
    """Whether a process `pid` runs on this host (0 and below name process groups: no)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # OverflowError: beyond any pid this OS gives
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


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


# The most a JSON file this program writes holds (a run's records are a few kB): a bigger one,
# or a device, pipe or directory, is not one of them and is never read.
MAX_JSON_BYTES = 16 << 20


def load_small_json(path: str | os.PathLike[str]) -> Any:
    """The JSON of a regular file of at most MAX_JSON_BYTES; OSError (FileNotFoundError when
    missing) or ValueError otherwise, before more than that is read."""
    with open(path, "rb", opener=_nonblocking) as f:  # a FIFO must not block the open
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ValueError("not a regular file (a directory, device or pipe)")
        if info.st_size > MAX_JSON_BYTES:
            raise ValueError(f"{info.st_size} bytes, more than a record of this program holds")
        return json.loads(f.read(MAX_JSON_BYTES + 1))


def _nonblocking(path: str, flags: int) -> int:
    return os.open(path, flags | getattr(os, "O_NONBLOCK", 0))


def read_json(path: str | os.PathLike[str], valid: Callable[[Any], bool]) -> Any | None:
    """A state file this program wrote: its JSON if `valid(it)`, else None. Missing is quiet;
    unreadable, garbled or of the wrong layout is logged as a warning, and the caller rebuilds
    the file (a damaged state file must never stop a run)."""
    path = Path(path)
    try:
        value = load_small_json(path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:  # ValueError: JSONDecodeError, UnicodeDecodeError
        log.warning("%s is damaged (%s); rebuilding it", path, str(err)[:80])
        return None
    if not valid(value):
        log.warning("%s is damaged (not the layout this version writes); rebuilding it", path)
        return None
    return value



def write_npz(path: str | os.PathLike[str], **arrays: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)  # type: ignore[arg-type]
    atomic_write(path, buffer.getvalue())


def _arrays_sha256(arrays: dict[str, np.ndarray]) -> str:
    """sha256 of arrays: each one's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name} {array.dtype.str} {array.shape}\n".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def write_checked_npz(path: str | os.PathLike[str], **arrays: np.ndarray) -> None:
    """An .npz of `arrays` and their sha256, for read_checked_npz."""
    write_npz(path, **arrays, content_sha256=np.array(_arrays_sha256(arrays)))


def read_checked_npz(path: str | os.PathLike[str]) -> dict[str, np.ndarray] | None:
    """The arrays write_checked_npz wrote, or None when the file is missing, or (with a
    warning) damaged, edited or of an older layout: a cache is then recomputed, never used."""
    try:
        npz_headers(path)  # bounded before anything is decoded
        with np.load(path, allow_pickle=False) as f:
            arrays = {name: f[name] for name in f.files}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, DataError, *BAD_NPZ) as err:
        log.warning("%s is damaged (%s); recomputing it", path,
                    str(err).removeprefix(f"{path}: ")[:80])
        return None
    if "content_sha256" not in arrays:  # written before caches carried one: no alarm
        log.info("%s is of an older layout; recomputing it", path)
        return None
    stored = str(arrays.pop("content_sha256"))
    if stored != _arrays_sha256(arrays):
        log.warning("%s does not match its checksum (edited or damaged); recomputing it", path)
        return None
    return arrays


def npz_headers(path: str | os.PathLike[str]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of each array of an .npz, from the .npy headers inside the zip.

    Each header is checked against the size the zip records for its member, and their sum
    against MAX_DECODED_BYTES, so a header that declares a billion images, or a small file that
    decompresses to gigabytes, is refused (DataError) before numpy allocates anything. A file that
    is not a zip, or a garbled one, raises OSError, ValueError or one of BAD_NPZ: callers say
    what the file should have been.
    """
    arrays = {}
    with zipfile.ZipFile(path) as archive:
        # The sizes the zip records, each checked against its member's header below.
        check_decoded_size(path, sum(member.file_size for member in archive.infolist()))
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
