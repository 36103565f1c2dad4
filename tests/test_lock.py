"""The run directory's lock on hostile `.lock` files: unreadable, garbled, a directory, or
flocked by a live owner that has not written it yet; with fcntl and with the O_EXCL fallback."""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path
from typing import Any

import pytest

from latentdiffusion.errors import LdmError
from latentdiffusion.run import rundir
from latentdiffusion.run.rundir import run_dir_lock

fcntl = pytest.importorskip("fcntl")


@pytest.fixture(params=["flock", "no-fcntl"])
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test runs with fcntl and as on a system without it (the O_EXCL protocol)."""
    if request.param == "no-fcntl":
        monkeypatch.setattr(rundir, "fcntl", None, raising=False)
    return str(request.param)


def _make_unreadable(monkeypatch: pytest.MonkeyPatch, lock: Path) -> None:
    """What a process without permission meets on a mode-000 `lock` of another user: opening
    it fails (creating it exclusively still says it exists), reading it fails."""
    real_open, real_read_text = os.open, Path.read_text

    def fake_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if Path(path) == lock and lock.exists():
            if flags & os.O_CREAT and flags & os.O_EXCL:
                raise FileExistsError(errno.EEXIST, "File exists", str(path))
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    def fake_read_text(self: Path, *args: Any, **kwargs: Any) -> str:
        if self == lock:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_read_text(self, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(Path, "read_text", fake_read_text)


def test_unreadable_lock_of_a_live_owner_counts_as_held(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    run = tmp_path / "run"
    lock = run / ".lock"
    with run_dir_lock(run):
        owner = lock.read_text()
        with monkeypatch.context() as patch:
            _make_unreadable(patch, lock)
            with pytest.raises(LdmError, match="is in use by a process that made it unreadable"):
                with run_dir_lock(run):
                    pass
        assert lock.read_text() == owner  # neither removed nor taken over


def test_flocked_lock_counts_as_held_whatever_it_says(tmp_path: Path) -> None:
    # A live owner between creating and stamping its lock: empty, but flocked.
    run = tmp_path / "run"
    run.mkdir()
    fd = os.open(run / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(LdmError, match="in use by an unknown process"):
            with run_dir_lock(run):
                pass
        assert (run / ".lock").exists()
    finally:
        os.close(fd)
    with run_dir_lock(run):  # the kernel released it with the descriptor: free again
        pass


def test_lock_of_a_pid_no_process_can_have_is_stale(tmp_path: Path, mode: str) -> None:
    run = tmp_path / "run"
    run.mkdir()
    lock = run / ".lock"
    lock.write_text(f"{socket.gethostname()} 99999999999")  # past any pid_t
    with run_dir_lock(run):
        assert lock.read_text() == f"{socket.gethostname()} {os.getpid()}"
    assert not lock.exists()


def test_lock_that_is_a_directory(tmp_path: Path, mode: str) -> None:
    run = tmp_path / "run"
    (run / ".lock").mkdir(parents=True)
    with pytest.raises(LdmError, match="is a directory, not a lock file") as err:
        with run_dir_lock(run):
            pass
    assert str(run / ".lock") in str(err.value)
    assert (run / ".lock").is_dir()


@pytest.mark.parametrize("text", ["hello", "a b c", "\x00\x01\x02"])
def test_garbled_lock(tmp_path: Path, mode: str, text: str) -> None:
    # Not written by latentdiffusion. With fcntl nobody holds it, so it is stale; without,
    # nothing tells whether its writer is alive, so it is held, and the message says so.
    run = tmp_path / "run"
    run.mkdir()
    lock = run / ".lock"
    lock.write_text(text)
    if mode == "flock":
        with run_dir_lock(run):
            assert lock.read_text() == f"{socket.gethostname()} {os.getpid()}"
    else:
        with pytest.raises(LdmError, match="in use by an unknown process"):
            with run_dir_lock(run):
                pass
        assert lock.read_text() == text


def test_second_holder_is_refused_in_both_modes(tmp_path: Path, mode: str) -> None:
    run = tmp_path / "run"
    with run_dir_lock(run):
        with pytest.raises(LdmError, match=f"in use by process {os.getpid()}"):
            with run_dir_lock(run):
                pass
    assert not (run / ".lock").exists()


def test_a_directory_that_refuses_the_lock_file_is_not_writable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    # What a user meets in a directory of root's, or sysfs (`/sys/kernel`) where access() says
    # yes: creating .lock is refused. No lock exists, so no process can be said to hold it.
    run = tmp_path / "run"
    run.mkdir()
    real_open = os.open

    def fake_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if Path(path) == run / ".lock":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)
    with pytest.raises(LdmError, match=f"^run directory {run} is not writable$"):
        with run_dir_lock(run):
            pass
    assert not (run / ".lock").exists()
