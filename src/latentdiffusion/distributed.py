"""torchrun support: process-group setup, rank helpers and float64 reductions.

Launch with `torchrun --nproc_per_node=N -m latentdiffusion ...`; torchrun sets RANK,
WORLD_SIZE and LOCAL_RANK. Without them everything runs as a single process.
"""

from __future__ import annotations

import os
import platform
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .errors import UsageError
from .version import __version__


def environment() -> dict[str, Any]:
    """What decides whether two runs agree bit for bit: the processes, the threads of each (the
    order of float sums) and the library versions."""
    return {"world_size": world_size(), "threads": torch.get_num_threads(),
            "latentdiffusion": __version__, "torch": torch.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' | 'mps'; under torchrun 'cuda' means cuda:LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available on this machine "
                             "(use --device cpu)")
        if name == "cuda" and "LOCAL_RANK" in os.environ:
            name = f"cuda:{os.environ['LOCAL_RANK']}"
    elif name == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps: MPS is not available on this machine")
    elif name not in ("cpu", "mps"):
        raise UsageError(f"unknown device {name!r} (choose from auto, cpu, cuda, cuda:N, mps)")
    return torch.device(name)


def init(device: torch.device) -> None:
    """Join the process group when launched by torchrun (nccl on CUDA, gloo on CPU)."""
    if "WORLD_SIZE" not in os.environ or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def shard_rows(n: int) -> slice:
    """This rank's contiguous share of n rows (gathering the shares in rank order restores n)."""
    return slice(rank() * n // world_size(), (rank() + 1) * n // world_size())


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum across ranks in place (identity in a single process); gloo reduces float64 exactly."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def main_decides(flag: bool, device: torch.device) -> bool:
    """Rank 0's `flag` on every rank: for decisions that depend on its clock, such as when to
    save, which every rank must take alike."""
    if not dist.is_initialized():
        return flag
    decision = torch.tensor([int(flag)], device=device)
    dist.broadcast(decision, src=0)
    return bool(decision.item())


def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate each rank's (n_r, ...) rows in rank order (n_r may differ by one)."""
    if not dist.is_initialized():
        return tensor
    count = torch.tensor([tensor.shape[0]], device=tensor.device)
    counts = [torch.zeros_like(count) for _ in range(world_size())]
    dist.all_gather(counts, count)
    longest = int(max(c.item() for c in counts))
    padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.zeros_like(padded) for _ in counts]
    dist.all_gather(gathered, padded)
    return torch.cat([g[: int(c.item())] for g, c in zip(gathered, counts, strict=True)])
