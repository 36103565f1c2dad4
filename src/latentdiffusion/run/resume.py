"""The crash-safe checkpoints of one training run, `R/checkpoints/<model>/step-*.safetensors`.

Besides this run's own checkpoints, the directory may hold
- stale checkpoints: valid ones of this model made under another stage key (or of a run that is
  being started over). They are never resumed, and removed only once this run has written its
  first checkpoint, so a command that fails early loses nothing;
- junk: files that are not valid checkpoints of this model (a truncated write, a file of
  another kind, a user's file). It is skipped, never counted and never deleted.
Rotation keeps the newest KEEP valid checkpoints of this run.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import torch

from ..errors import CheckpointError, UsageError
from . import checkpoint
from .keys import StageKey

log = logging.getLogger(__name__)
KEEP = 2
# "off": start over; "auto" (`ldm run`): continue a checkpoint with this key, else start over;
# "strict" (`--resume`): continue a checkpoint with this key, refuse one of another config.
Resume = Literal["off", "auto", "strict"]


def list_checkpoints(state_dir: Path) -> list[Path]:
    """Files named like training checkpoints, newest first (valid or not)."""
    return sorted(state_dir.glob("step-*.safetensors"), reverse=True)


def latest_checkpoint(state_dir: Path, kind: str) -> tuple[Path, dict, dict] | None:
    """The newest checkpoint of `kind` that verifies; corrupt ones are reported and skipped."""
    for path in list_checkpoints(state_dir):
        try:
            tensors, meta = checkpoint.load(path, kind=kind)
        except CheckpointError as err:
            log.warning("skipping %s", err)
            continue
        return path, tensors, meta
    return None


class StateDir:
    """This run's checkpoints: which one to resume, and writing and rotating new ones.

    Built before training starts, so a refusal (another config under `--resume`) comes before
    anything is written or deleted.
    """

    def __init__(self, root: Path, kind: str, key: StageKey, resume: Resume) -> None:
        self.root, self.kind, self.key = root, kind, key
        self.ours: list[Path] = []  # valid, this key, oldest first
        self.stale: list[Path] = []  # valid, another key (or all, when starting over)
        self.resume_from: tuple[Path, dict[str, torch.Tensor], dict[str, Any]] | None = None
        other: dict[str, Any] | None = None  # the header of the newest stale checkpoint
        for path in list_checkpoints(root):
            try:
                tensors, meta = checkpoint.load(path, kind=kind)
            except CheckpointError as err:
                if resume != "off":
                    log.warning("skipping %s", err)
                continue
            if resume == "off" or meta.get("key") != key.digest:
                self.stale.append(path)
                other = other or meta
                continue
            if self.resume_from is None:  # the newest of this key
                self.resume_from = (path, tensors, meta)
            self.ours.insert(0, path)
        if self.resume_from is None and other is not None and resume != "off":
            changes = key.changes_from(other.get("key_fields"))
            if resume == "strict":
                raise UsageError(f"{root} was made with another config ({changes}); pass "
                                 "--force to start over")
            log.info("%s was made with another config (%s); starting over", root, changes)

    def save(self, step: int, tensors: dict[str, torch.Tensor], **meta: Any) -> Path:
        """Write the checkpoint of `step`, then drop stale and surplus ones (never before)."""
        path = self.root / f"step-{step:09d}.safetensors"
        checkpoint.save(path, tensors, self.kind, key=self.key.digest,
                        key_fields=self.key.fields, step=step, **meta)
        self.ours = [p for p in self.ours if p != path] + [path]
        for old in self.stale + self.ours[:-KEEP]:
            if old not in self.ours[-KEEP:]:
                old.unlink(missing_ok=True)
        self.stale, self.ours = [], self.ours[-KEEP:]
        return path


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """The optimizer's state as checkpoint tensors ("optim.<index>.<key>") and JSON meta."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entries in state["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"optim.{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                    meta: dict) -> None:
    """The inverse of optimizer_tensors."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for name, value in meta["scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    # Saved state is NCHW-contiguous. The fused AdamW kernel walks raw memory, so each state
    # tensor must have its parameter's (channels-last) strides, or elements get silently mixed.
    for group in optimizer.param_groups:
        for param in group["params"]:
            param_state = optimizer.state[param]
            for key, value in param_state.items():
                if torch.is_tensor(value) and value.shape == param.shape:
                    param_state[key] = torch.empty_like(param).copy_(value)
