"""Your own recipe: a RunConfig written as TOML or JSON (`ldm config`), read back from a file
onto a preset (`ldm run --config FILE`) and changed one value at a time (`--set KEY=VALUE`).

Everything here walks the config dataclasses (`dataclasses.fields`, `typing.get_type_hints`),
so a field or section added to config.py is written, read and settable without a change here.
Each value is checked against its field's type hint before the dataclass validates it, so every
mistake is one UsageError that names the full key.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

from ..errors import UsageError
from ..files import atomic_write, strict_json
from ..schema import from_dict, parse_number, to_dict

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, before it joined the standard library
    import tomli as tomllib

FORMATS = ("toml", "json")
MAX_BYTES = 1 << 20  # a run config is a few kB; anything this big is the wrong file
C = TypeVar("C")  # a config dataclass: RunConfig for `ldm`, any other for the tests

# ---------------------------------------------------------------- writing


def dumps(config: Any, fmt: str = "toml", header: str = "") -> str:
    """`config` as TOML (`header` as its first, comment line) or as JSON; no final newline."""
    if fmt == "json":  # JSON has no comments: the header is left out
        return strict_json(to_dict(config), indent=2)
    # One comment line whatever the command line held: a newline would end the comment.
    header = "".join(c if c.isprintable() else repr(c)[1:-1] for c in header)
    lines = [f"# {header}", ""] if header else []
    _write_table(config, "", lines)
    return "\n".join(lines)


def _write_table(obj: Any, prefix: str, lines: list[str]) -> None:
    """The scalars of `obj`, then one [section] per nested dataclass (TOML needs that order)."""
    sections = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            sections.append((f.name, value))
        else:
            lines.append(f"{f.name} = {_toml_value(value)}")
    for name, section in sections:
        lines += ["", f"[{prefix}{name}]"]
        _write_table(section, f"{prefix}{name}.", lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):  # before int: bool is an int
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        # repr: the shortest text that reads back as the identical float (1e-05, 0.008, 1.0)
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(map(_toml_value, value)) + "]"
    raise TypeError(f"no TOML form for {value!r}")  # a config field of a new kind: add it here


def _toml_string(text: str) -> str:
    """A TOML basic string: quote and backslash escaped, control characters as \\uXXXX."""
    escaped = "".join("\\" + c if c in '"\\' else
                      f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else c for c in text)
    return f'"{escaped}"'


# ---------------------------------------------------------------- reading


def read_bytes(path: Path) -> bytes:
    """The bytes of a config file; a one-line UsageError when it cannot be one."""
    suffix = path.suffix.lower().lstrip(".")
    if suffix not in FORMATS:
        raise UsageError(f"{path}: a config file ends in .toml or .json")
    try:
        if path.stat().st_size > MAX_BYTES:
            raise UsageError(f"{path}: over {MAX_BYTES} bytes, too big for a run config")
        return path.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"{path}: is a directory, not a config file") from None
    except OSError as err:
        raise UsageError(f"{path}: cannot read it ({err.strerror or err})") from None


def read(path: Path) -> dict[str, Any]:
    """The table of a .toml or .json config file."""
    raw = read_bytes(path)
    kind = path.suffix.lower().lstrip(".")
    try:
        text = raw.decode("utf-8")
        data = (tomllib.loads(text) if kind == "toml"
                else json.loads(text, object_pairs_hook=_without_duplicates))
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not UTF-8 text") from None
    except (ValueError, RecursionError) as err:  # the decode errors are ValueErrors
        reason = " ".join(str(err).split()) or "nested too deeply"
        raise UsageError(f"{path}: not valid {kind.upper()} ({reason})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a JSON object of config keys, got "
                         f"{type(data).__name__}")
    return data


def _without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object; a key given twice is an error (json keeps the last silently, TOML
    refuses)."""
    data: dict[str, Any] = {}
    for key, value in pairs:
        if key in data:
            raise ValueError(f"key {key!r} given twice")
        data[key] = value
    return data


def load(path: Path, base: C) -> C:
    """`base` with the values of the config file at `path`; keys the file leaves out keep
    `base`'s values."""
    cls, where = type(base), str(path)
    return _build(cls, _merge(to_dict(base), read(path), cls, "", where), where)


def save_copy(path: Path | None, run_dir: Path) -> Path | None:
    """Copy the config file into the run directory as config.toml or config.json; a copy of
    an earlier run's file, which no longer describes the run, goes once this one is written
    (without a file: the copies go; run.json holds the config either way)."""
    target = None
    if path is not None:
        target = run_dir / f"config.{path.suffix.lower().lstrip('.')}"
        atomic_write(target, read_bytes(path))
    for fmt in FORMATS:
        stale = run_dir / f"config.{fmt}"
        if stale != target:
            stale.unlink(missing_ok=True)
    return target


# ---------------------------------------------------------------- --set KEY=VALUE


class _Text(str):
    """A value typed on the command line, to be parsed by its field's type."""


def apply_sets(config: C, items: Sequence[str]) -> C:
    """`config` with each KEY=VALUE of `items` (a later one wins), checked once all are in,
    so that values which must agree (unet.in_channels and vae.latent_channels) can be set
    together."""
    if not items:
        return config
    cls, merged = type(config), to_dict(config)
    keys: dict[str, None] = {}  # in order, each once
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"--set {item!r}: expected KEY=VALUE, e.g. unet.channels=32,64")
        value: Any = _Text(text.strip())
        for name in reversed(key.split(".")):
            value = {name: value}
        merged = _merge(merged, value, cls, "", "--set")
        keys[key] = None
    hints = typing.get_type_hints(cls)
    # A section that fails names the --set keys inside it; the top level's checks name all.
    for section in dict.fromkeys(k.split(".")[0] for k in keys):
        if dataclasses.is_dataclass(hints[section]):
            inside = [k for k in keys if k.split(".")[0] == section]
            _build(hints[section], merged[section], "--set " + ", ".join(inside))
    return _build(cls, merged, "--set " + ", ".join(keys))


# ---------------------------------------------------------------- checking values


def _build(cls: type[C], data: dict[str, Any], where: str) -> C:
    try:
        return from_dict(cls, data)
    except UsageError as err:
        raise UsageError(f"{where}: {err}") from None


def _at(where: str, key: str) -> str:
    """`--set unet.channels` or `cfg.toml: unet.channels`."""
    return f"{where} {key}" if where == "--set" else f"{where}: {key}"


def _merge(base: dict[str, Any], data: dict[str, Any], cls: type, path: str,
           where: str) -> dict[str, Any]:
    """`base` (a `to_dict` of `cls`) with the values of `data`, each checked against its
    field's type; `path` is the key of `cls` in the run config ("" at the top)."""
    names = [f.name for f in dataclasses.fields(cls)]
    hints = typing.get_type_hints(cls)
    merged = dict(base)
    for name, value in data.items():
        key = f"{path}.{name}" if path else name
        if name not in names:
            raise UsageError(f"{where}: unknown key {key} ({path or 'the top level'} has: "
                             f"{', '.join(names)})")
        hint = hints[name]
        section = dataclasses.is_dataclass(hint)
        if section and isinstance(value, dict):
            merged[name] = _merge(base[name], value, hint, key, where)  # type: ignore[arg-type]
        elif section:
            keys = ", ".join(f.name for f in dataclasses.fields(hint))  # type: ignore[arg-type]
            raise UsageError(f"{_at(where, key)}: a section, not a value ({key} has: {keys})")
        elif isinstance(value, dict):
            raise UsageError(f"{_at(where, key)}: a value, not a section")
        else:
            merged[name] = _convert(hint, value, _at(where, key))
    return merged


_NAMES = {int: ("an integer", "integers"), float: ("a number", "numbers"),
          bool: ("true or false", "booleans"), str: ("a string", "strings")}


def _convert(hint: Any, value: Any, at: str) -> Any:
    """`value` (from a file, or `_Text` from --set) as the type `hint`; UsageError at `at`."""
    choices = get_args(hint)
    if get_origin(hint) is Literal:
        for choice in choices:
            if value == choice and isinstance(value, type(choice)):
                return choice  # the choice itself: a plain str, not a _Text
        raise UsageError(f"{at}: unknown value {_shown(value)} (choose from "
                         f"{', '.join(map(str, choices))})")
    if get_origin(hint) is tuple and len(choices) == 2 and choices[1] is Ellipsis:
        plural = _NAMES.get(choices[0], ("", "values"))[1]
        text = isinstance(value, _Text)
        # `--set KEY=` is the empty list (e.g. guide.channels: no guide)
        items = [_Text(v.strip()) for v in value.split(",")] if text and value.strip() else (
            [] if text else value)
        if isinstance(items, (list, tuple)):
            try:
                return tuple(_convert(choices[0], item, at) for item in items)
            except UsageError:
                pass
        expected = f"comma-separated {plural}" if text else f"a list of {plural}"
        raise UsageError(f"{at}: expected {expected}, got {_shown(value)}")
    if hint not in _NAMES:
        raise TypeError(f"{at}: config fields of type {hint} cannot be read yet")
    converted = _scalar(hint, value)
    if converted is None:
        raise UsageError(f"{at}: expected {_NAMES[hint][0]}, got {_shown(value)}")
    return converted


def _shown(value: Any, limit: int = 60) -> str:
    """`value`'s repr, cut short: a file may hold a megabyte where a number belongs."""
    text = repr(str(value) if isinstance(value, _Text) else value)
    return text if len(text) <= limit else text[:limit] + "..."


def _scalar(hint: type, value: Any) -> Any:
    """`value` as an int, float, bool or str; None when it is not one."""
    if isinstance(value, _Text):
        if hint is str:
            return str(value)
        if hint is bool:
            return {"true": True, "false": False}.get(value.lower())
        try:
            return parse_number(value, hint)
        except ValueError:
            return None
    if hint is float and type(value) is int:  # a hand-edited `lr = 1` means 1.0
        return float(value)
    return value if type(value) is hint else None
