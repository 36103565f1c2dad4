"""The rules every config dataclass follows: its fields are checked on construction (one
UsageError line each), it round-trips through JSON, and it has a stable hash.

Each component keeps its frozen config beside it (`models/unet.py` has `UNetConfig`, nanoGPT
keeps `GPTConfig` beside `GPT`); every checkpoint stores its config as JSON, and every stage of a
run is keyed by the hash of the configs it was made from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, TypeVar, get_args, get_origin

from .errors import UsageError

# Image sizes the models take: square, a multiple of 4 (the classifier pools twice) in this range.
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 16, 64
IMAGE_SIZES = range(MIN_IMAGE_SIZE, MAX_IMAGE_SIZE + 1, 4)
# Images one set may hold: generating and scoring keep them and their features in memory.
MAX_SAMPLES = 1_000_000
# ... and their uint8 pixels at most this many bytes: 342,392 images of 28x28, 87,381 of
# 32x32x3, 21,845 of 64x64x3 (a set is held whole, and copied once when ranks gather it).
MAX_SET_BYTES = 256 * 2**20


Number = TypeVar("Number", int, float)


def parse_number(text: str, kind: Callable[[str], Number]) -> Number:
    """`kind(text)` (int or float) of ASCII text only: Python also reads other scripts' digits
    ("٣", "３"), which no option or config value of ldm takes (ValueError)."""
    if not text.isascii():
        raise ValueError(f"not an ASCII number: {text!r}")
    return kind(text)


def check_fields(obj: Any, positive: tuple[str, ...] = (), unit: tuple[str, ...] = (),
                 nonnegative: tuple[str, ...] = ()) -> None:
    """Raise UsageError for non-finite floats, non-positive `positive`, negative `nonnegative`,
    out-of-[0, 1) `unit` fields and a `Literal` field holding another value."""
    name = type(obj).__name__
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        values = value if isinstance(value, tuple) else (value,)
        for v in values:
            if isinstance(v, float) and not math.isfinite(v):
                raise UsageError(f"{name}.{f.name} must be finite, got {v}")
            if f.name in positive and isinstance(v, (int, float)) and v <= 0:
                raise UsageError(f"{name}.{f.name} must be > 0, got {v}")
            if f.name in nonnegative and v < 0:
                raise UsageError(f"{name}.{f.name} must be >= 0, got {v}")
            if f.name in unit and not 0.0 <= v < 1.0:
                raise UsageError(f"{name}.{f.name} must be in [0, 1), got {v}")
        hint = typing.get_type_hints(type(obj)).get(f.name)
        if get_origin(hint) is Literal and value not in get_args(hint):
            choices = ", ".join(map(str, get_args(hint)))
            raise UsageError(f"{name}.{f.name}: unknown value {value!r} (choose from {choices})")


def check_image(obj: Any) -> None:
    """The image_size and image_channels fields of a model config."""
    name = type(obj).__name__
    size = obj.image_size
    if size % 4 or not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
        raise UsageError(f"{name}.image_size must be a multiple of 4 from {MIN_IMAGE_SIZE} to "
                         f"{MAX_IMAGE_SIZE}, got {size}")
    if obj.image_channels not in (1, 3):
        raise UsageError(f"{name}.image_channels must be 1 or 3, got {obj.image_channels}")


def check_set_size(key: str, n: int, size: int, channels: int) -> None:
    """UsageError unless a set of `n` images of size x size x channels fits MAX_SAMPLES and
    MAX_SET_BYTES; `key` names the option or field that asked for it."""
    limit = min(MAX_SAMPLES, MAX_SET_BYTES // (size * size * channels))
    if n > limit:
        raise UsageError(f"{key} must be at most {limit} for {size}x{size}x{channels} images "
                         f"(a set holds at most {MAX_SET_BYTES // 2**20} MiB of pixels), got {n}")


C = TypeVar("C")


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def from_dict(cls: type[C], data: dict[str, Any]) -> C:
    """Rebuild a (nested) config dataclass from `to_dict` output; unknown keys are an error,
    and an invalid nested config's message starts with its field name ("diffusion_train: ...":
    the run config has three TrainConfigs)."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(data) - names
    if unknown:
        raise UsageError(f"{cls.__name__}: unknown field(s) {', '.join(sorted(unknown))}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            try:
                value = from_dict(hint, value)  # type: ignore[arg-type]
            except UsageError as err:
                raise UsageError(f"{name}: {err}") from None
        elif get_origin(hint) in (tuple, types.GenericAlias) or hint is tuple:
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def config_hash(*parts: Any) -> str:
    """Stable sha256 of configs (dataclasses or plain JSON values)."""
    payload = [to_dict(p) if dataclasses.is_dataclass(p) else p for p in parts]
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()
