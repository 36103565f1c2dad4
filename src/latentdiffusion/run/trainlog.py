"""A training stage's log: R/logs/<stage>.jsonl, one JSON object a line, which any tool reads
(pandas.read_json(path, lines=True)); with `tensorboard`, the same scalars and the progress
grids as TensorBoard event files in R/logs/tensorboard/<stage>/.

A line holds the step, the passes over the data so far (epoch), the mean loss and its parts
since the line before, the learning rate, the mean gradient norm (before clipping), training
samples/s, the seconds since the stage started, and the validation numbers and progress scores
when they were taken at that step. A resumed stage continues its log: lines after the step of
the checkpoint it continues are dropped (they are trained again), so a killed-and-resumed
stage's log equals an uninterrupted one's line for line, except the wall-clock fields (TIMING).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from ..errors import DataError, LdmError, UsageError
from ..files import atomic_write, strict_json

log = logging.getLogger(__name__)
TIMING = ("samples_per_second", "elapsed_seconds")  # wall clock: differ from run to run
_TENSORBOARD_HINT = 'pip install "latentdiffusion[tensorboard]"'


def check_tensorboard() -> None:
    """UsageError unless TensorBoard's writer imports (the optional extra)."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise UsageError(f"--tensorboard needs the tensorboard package: {_TENSORBOARD_HINT}"
                         ) from None


def _record(line: str) -> dict[str, Any] | None:
    """The record of one line, or None when it is not a log record."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("step"), int):
        return None
    return record


def read_log(path: Path, *, warn: bool = True) -> list[dict[str, Any]]:
    """The records of a log ([] when there is none). A damaged last line, a write cut short
    by a kill, is dropped (with a warning); any other line that is not a record is a
    DataError, and nothing is changed."""
    return _parse(path, warn)[0]


def _parse(path: Path, warn: bool) -> tuple[list[dict[str, Any]], bool]:
    """read_log's records, and whether a damaged last line was dropped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return [], False
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path} is not a training log (JSON lines): {err}; move it away "
                        "or delete it") from None
    records, damaged = [], False
    for number, line in enumerate(lines, 1):
        record = _record(line)
        if record is not None:
            records.append(record)
        elif number == len(lines):
            damaged = True
            if warn:
                log.warning("%s: its last line is incomplete (a stage killed while writing "
                            "it); dropped", path)
        elif line.strip():
            raise DataError(f"{path} line {number} is not a training log record (a JSON "
                            "object with a step); move the file away or delete it")
    return records, damaged


def check_log(path: Path) -> None:
    """Before a run touches anything: the log reads (DataError) and its folder is writable
    (LdmError)."""
    read_log(path, warn=False)
    folder = next((p for p in (path.parent, *path.parents) if p.exists()), Path("."))
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists()
                                                     and not os.access(path, os.W_OK)):
        raise LdmError(f"cannot write the training log {path}: permission denied")


@dataclass
class LogInterval:
    """Sums over the steps since the stage's last log line (saved in each checkpoint, so a
    resumed stage writes the lines an uninterrupted one would)."""

    steps: int = 0
    loss: float = 0.0
    parts: dict[str, float] = field(default_factory=dict)
    grad_norm: float = 0.0
    examples: int = 0
    seconds: float = 0.0  # of training steps only (not validation or grids)

    def add(self, loss: float, parts: dict[str, float], grad_norm: float, examples: int,
            seconds: float) -> None:
        self.steps += 1
        self.loss += loss
        for name, value in parts.items():
            self.parts[name] = self.parts.get(name, 0.0) + value
        self.grad_norm += grad_norm
        self.examples += examples
        self.seconds += seconds

    def record(self) -> dict[str, float]:
        """The means of a log line."""
        n = max(self.steps, 1)
        return {"loss": self.loss / n, **{k: v / n for k, v in self.parts.items()},
                "grad_norm": self.grad_norm / n,
                "samples_per_second": self.examples / self.seconds if self.seconds else 0.0}


class TrainLog:
    """Appends a stage's records; `start` first, at the step training starts from."""

    def __init__(self, path: Path, tensorboard: bool = False) -> None:
        self.path = path
        self.tensorboard = tensorboard
        self._file: IO[str] | None = None
        self._writer: Any = None

    def start(self, step: int) -> None:
        """Keep the records up to `step` (0: a new stage, an empty log) and open for appending."""
        records, damaged = _parse(self.path, warn=True)
        kept = [r for r in records if r["step"] <= step]
        if kept != records or damaged:
            atomic_write(self.path, "".join(strict_json(r) + "\n" for r in kept).encode())
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close)
        except OSError as err:
            raise LdmError(f"cannot write the training log {self.path}: "
                           f"{err.strerror or err}") from None
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard drops the events a killed run wrote after `step`.
            self._writer = SummaryWriter(str(self.path.parent / "tensorboard" / self.path.stem),
                                         purge_step=step + 1 if step else None)

    def write(self, record: dict[str, Any]) -> None:
        """One line, flushed: a killed stage loses at most the line it was writing."""
        assert self._file is not None, "TrainLog.start first"
        self._file.write(strict_json(record) + "\n")
        self._file.flush()
        if self._writer is not None:
            for name, value in record.items():
                if name != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._writer.add_scalar(name, value, record["step"])

    def image(self, step: int, grid: np.ndarray) -> None:
        """A progress grid, uint8 (H, W) or (H, W, 3), to TensorBoard (the PNG is the
        monitor's)."""
        if self._writer is not None:
            image = grid if grid.ndim == 3 else grid[..., None]
            self._writer.add_image("samples", image, step, dataformats="HWC")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            if self._file is not None:
                self._file.close()
        if self._writer is not None:
            self._writer.close()
        self._file = self._writer = None
