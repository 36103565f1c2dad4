"""Mixed precision: the dtype the networks' matrix products and convolutions run in.

- "fp32": everything float32 and no autocast context at all, so a run is bit-identical to one
  made without this module.
- "bf16" / "fp16": `torch.autocast` around the networks' forward passes. Weights, gradients,
  AdamW's moments and the EMA stay float32 (master weights); every network returns float32
  (models/ cast their outputs), so losses, noise schedules, sampler updates and metrics keep
  float32 (FID's sums float64). Autocast lowers only its listed ops (conv, linear, matmul, ...):
  elementwise arithmetic on float32 tensors stays float32.
- fp16 keeps 10 mantissa bits but a 5-bit exponent (largest 65504, smallest normal 6.1e-5), so
  small gradients underflow: a GradScaler multiplies the loss by S (65536 at first) before
  backward and divides the gradients by S; a step whose gradients overflow is skipped and S is
  halved, and S doubles after 2000 good steps. bf16 has float32's exponent and needs none.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Literal, get_args

import torch

from ..errors import UsageError

log = logging.getLogger(__name__)

Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# CPU flags of native bf16 arithmetic: x86's AVX-512 BF16 dot products and AMX tiles, aarch64's
# BF16 extension. Without them oneDNN converts bf16 to float32 around each product.
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def parse(value: Any, where: str = "--precision") -> Precision:
    """`value` as a Precision; UsageError naming `where` for anything else."""
    if value not in PRECISIONS:
        raise UsageError(f"{where}: unknown value {value!r} (choose from "
                         f"{', '.join(PRECISIONS)})")
    return value  # type: ignore[no-any-return]


def autocast(precision: Precision, device: torch.device) -> AbstractContextManager[Any]:
    """The context of a network's forward pass: nothing for fp32, else torch's autocast."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def grad_scaler(precision: Precision, device: torch.device) -> torch.amp.GradScaler:
    """fp16's loss scaling; for fp32 and bf16 a disabled scaler, whose `scale` returns the loss
    itself and whose `step` is `optimizer.step()`."""
    enabled = precision == "fp16"
    if not hasattr(torch.amp, "GradScaler"):  # torch < 2.3: CUDA's only (disabled elsewhere)
        return torch.cuda.amp.GradScaler(enabled=enabled and device.type == "cuda")
    return torch.amp.GradScaler(device.type, enabled=enabled)


@functools.lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """Whether /proc/cpuinfo lists a native bf16 instruction (False where it cannot be read).
    torch.backends.cpu.get_cpu_capability() says "AVX512" with or without them."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    flags = {flag for line in text.splitlines() if line.startswith(("flags", "Features"))
             for flag in line.partition(":")[2].split()}
    return bool(flags & BF16_CPU_FLAGS)


def check_device(precision: Precision, device: torch.device) -> None:
    """UsageError where `precision` cannot run on `device`; one warning where it runs slowly.

    fp16 is refused on the CPU: torch runs it there, but without fp16 arithmetic (AMX-FP16) it
    is slower than float32 and no more accurate than bf16. bf16 on a CPU without bf16
    instructions runs, emulated, with a warning.
    """
    if precision == "fp32":
        return
    if device.type == "cpu":
        if precision == "fp16":
            raise UsageError("fp16 needs a CUDA GPU; on the CPU use bf16")
        if not cpu_has_bf16():
            _warn_emulated_bf16()
    elif device.type == "cuda":
        if precision == "bf16" and not _cuda_bf16():
            raise UsageError("bf16 needs a CUDA GPU of compute capability 8.0 or newer; on this "
                             "one use fp16")
    else:
        raise UsageError(f"{precision} runs on the CPU and CUDA GPUs; on {device.type} use fp32")


def _cuda_bf16() -> bool:
    """Whether the GPU computes in bf16 (compute capability 8.0 or newer), emulation not
    counted."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch < 2.4, which counts no emulation
        return torch.cuda.is_bf16_supported()


@functools.lru_cache(maxsize=1)
def _warn_emulated_bf16() -> None:
    log.warning("this CPU has no bf16 instructions (avx512_bf16, amx_bf16): bf16 is emulated "
                "and likely slower than fp32")
