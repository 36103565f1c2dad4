"""A run directory R: where each stage keeps its output, the records `ldm run` reads back
(run.json, metrics.json), and the lock that lets one process at a time write there."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data.prepare import PrepareConfig
from ..errors import LdmError, UsageError
from ..evaluation.tables import scored_sets
from ..files import pid_alive, read_json
from ..schema import from_dict

try:
    import fcntl
except ImportError:  # Windows: the O_EXCL protocol alone, see run_dir_lock
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunDir:
    root: Path

    def model(self, name: str) -> Path:  # classifier | vae | diffusion
        return self.root / f"{name}.safetensors"

    @property
    def latents(self) -> Path:
        return self.root / "latents.safetensors"

    def state_dir(self, name: str) -> Path:
        return self.root / "checkpoints" / name

    def samples(self, name: str) -> Path:
        return self.root / "samples" / f"{name}.npz"

    def reference(self, classifier_hash: str) -> Path:
        return self.root / "cache" / f"reference-{classifier_hash[:16]}.npz"

    def class_reference(self, classifier_hash: str) -> Path:
        return self.root / "cache" / f"reference-classes-{classifier_hash[:16]}.npz"

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    def log(self, name: str) -> Path:
        """A training stage's JSON-lines log (trainlog.py)."""
        return self.root / "logs" / f"{name}.jsonl"

    def progress(self, name: str, step: int) -> Path:
        """A training stage's sample grid at `step` (monitor.py)."""
        return self.figures / "progress" / f"{name}-{step}.png"


# What the stages write in a run directory R: these folders, and these files beside the models.
# Only the stages replace them; no --out may.
_RUN_FOLDERS = frozenset({"samples", "cache", "checkpoints", "figures", "logs"})
_RUN_FILES = frozenset({"run.json", "metrics.json", "report.md", "report.html", "sweep.json",
                        "guidance.json", "config.toml", "config.json", ".lock"})
# What only latentdiffusion puts in a folder: one of them makes it a run directory.
_RUN_MARKERS = ("run.json", ".lock", "checkpoints",
                *(f"{m}.safetensors" for m in ("classifier", "vae", "latents", "diffusion",
                                                "guide")))


def is_run_dir(path: Path) -> bool:
    """Whether `path` is a folder a latentdiffusion command made a run directory."""
    return path.is_dir() and any(os.path.lexists(path / m) for m in _RUN_MARKERS)


def check_run_dir(path: Path) -> None:
    """A run directory to write in must be new, empty or a run's: never a folder of the user's
    files, which the stages would replace (UsageError)."""
    try:
        entries = sorted(os.listdir(path))
    except OSError:  # missing (made later) or not a folder (its own error follows)
        return
    if entries and not is_run_dir(path):
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise UsageError(f"--run-dir {path} holds files that are not a run's ({shown}); they "
                         "are left as they are: pick a new or empty --run-dir")


def check_replaceable(path: Path, what: str, ours: Callable[[Path], bool],
                      label: str | None = None) -> None:
    """`path`, which a command's --out writes, is missing or `ours(path)` (an earlier `what`
    of that command), and in no case a run's own file (R/metrics.json, R/samples/x.npz), which
    its stages would then take for their output (UsageError). `label`: how the message names
    it (default: `--out PATH`)."""
    label = label or f"--out {path}"
    absolute = Path(os.path.abspath(path))
    parent = absolute.parent
    run = (parent if absolute.name in _RUN_FILES and is_run_dir(parent) else
           parent.parent if parent.name in _RUN_FOLDERS and is_run_dir(parent.parent) else None)
    if os.path.lexists(path) and not ours(path):
        raise UsageError(f"{label} exists and is not an earlier {what} of ldm; it is left as "
                         "it is: pick another --out")
    if run is not None:
        raise UsageError(f"{label} is a file of the run directory {run}, which only its stages "
                         "write; it is left as it is: pick another --out")


def _is_record(record: Any) -> bool:
    """A stage's record in run.json as `ldm run` writes it: its key, seconds and summary."""
    return (isinstance(record, dict) and isinstance(record.get("key"), str)
            and isinstance(record.get("seconds"), (int, float))
            and not isinstance(record["seconds"], bool) and math.isfinite(record["seconds"])
            and isinstance(record.get("summary"), str))


def _is_manifest(value: Any) -> bool:
    stages = value.get("stages") if isinstance(value, dict) else None
    return (isinstance(stages, dict) and all(map(_is_record, stages.values()))
            and isinstance(value.get("config", {}), dict))


# The fields of each set that `ldm run`'s summary and the report read.
_METRIC_FIELDS = ("n", "fid", "fid_over_validation", "kid_mean", "kid_std", "precision",
                  "recall", "class_entropy_bits", "class_histogram")


def _is_metrics(value: Any) -> bool:
    return (isinstance(value, dict) and "validation" in value
            and all(isinstance(m, dict) and all(k in m for k in _METRIC_FIELDS)
                    and isinstance(m["fid"], (int, float))
                    for m in scored_sets(value).values()))


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """R/run.json (which config and upstream hashes made each stage); empty when missing or
    damaged, so every stage is checked again against its outputs."""
    manifest = read_json(path, _is_manifest)
    return manifest if manifest is not None else {"stages": {}}


def recorded_preparation(manifest: dict[str, Any]) -> PrepareConfig | None:
    """How a run prepared its data (its run.json's config.data, checked again), or None when
    the manifest records none."""
    recorded = manifest.get("config", {}).get("data")
    return from_dict(PrepareConfig, recorded) if isinstance(recorded, dict) else None


def read_metrics(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """R/metrics.json; None when missing or damaged, so the evaluation is redone."""
    return read_json(path, _is_metrics)  # type: ignore[no-any-return]



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
        return host == socket.gethostname() and not pid_alive(int(pid))
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
    except PermissionError:
        if not os.path.lexists(lock):  # nothing to open: the directory refused to create it
            raise LdmError(f"run directory {run_dir} is not writable") from None
        raise _in_use(run_dir, lock, None) from None  # e.g. mode 000 and another user's
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
    check_run_dir(run_dir)
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
