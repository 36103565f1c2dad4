"""Seeds and generators: every random draw in the project goes through an explicit generator."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def derive_seed(seed: int, *keys: int) -> int:
    """A well-mixed 63-bit seed for (seed, *keys), e.g. (run seed, sample index)."""
    state = np.random.SeedSequence([seed & 0xFFFFFFFF, *keys]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & (2**63 - 1)


def generator(seed: int, *keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, *keys))


Generators = torch.Generator | Sequence[torch.Generator] | None


def randn(shape: Sequence[int], generators: Generators, device: torch.device | str = "cpu",
          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise of `shape`; a list of generators gives row i from generator i.

    Drawing on the CPU and moving makes the numbers independent of the device; one generator
    per sample makes them independent of the batch size and of the number of processes.
    """
    if isinstance(generators, Sequence):
        if len(generators) != shape[0]:
            raise ValueError(f"{len(generators)} generators for a batch of {shape[0]}")
        rows = [torch.randn(tuple(shape[1:]), generator=g) for g in generators]
        noise = torch.stack(rows) if rows else torch.empty(tuple(shape))
    else:
        noise = torch.randn(tuple(shape), generator=generators)
    return noise.to(device=device, dtype=dtype)
