"""The package's layout: imports point one way (no circle, even through imports inside
functions), the lower layers never import the upper ones, and every module reads in one
sitting."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import latentdiffusion

ROOT = Path(latentdiffusion.__file__).parent
PACKAGE = "latentdiffusion"
MAX_LINES = 450
# What each sub-package may import from the others: the layers, bottom to top (the top-level
# modules errors, schema, rng, distributed, files and version are below them all; the package's
# __init__ exports the API, above them all but the command line).
ALLOWED = {
    "data": set(),
    "models": set(),
    "diffusion": set(),
    "evaluation": {"data", "models", "diffusion"},
    "run": {"data", "models", "diffusion", "evaluation"},
    "api": {"data", "models", "diffusion", "evaluation", "run"},
    "cli": {"data", "models", "diffusion", "evaluation", "run", "api"},
}


def _modules() -> dict[str, Path]:
    """Dotted name -> file of every module (a package is its __init__.py)."""
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join([PACKAGE, *parts])] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules that `name` imports anywhere in its file (functions included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            # `from package import module` imports that module; any other name, the module
            # (or package __init__) that defines it
            for alias in node.names:
                targets.add(sub if (sub := f"{base}.{alias.name}") in modules else base)
    return {t for t in targets if t in modules and t != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of `graph`, or None."""
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (ROOT / parts[-1]).is_dir() else ""


def test_the_cycle_finder_finds_a_circle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circle() -> None:
    assert _cycle(_graph()) is None


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_sub_packages_import_only_the_layers_below(package: str) -> None:
    for module, imported in _graph().items():
        if _package(module) != package:
            continue
        reached = {_package(target) for target in imported} - {"", package}
        assert reached <= ALLOWED[package], f"{module} imports {reached - ALLOWED[package]}"


def test_only_the_cli_imports_every_layer() -> None:
    graph = _graph()
    reached = {_package(module): set() for module in graph}
    for module, imported in graph.items():
        reached[_package(module)] |= {_package(t) for t in imported} - {"", _package(module)}
    everyone = set(ALLOWED) - {"cli"}
    assert [p for p, seen in reached.items() if seen >= everyone] == ["cli"]


def test_top_level_and_sizes() -> None:
    top = [p for p in ROOT.glob("*.py")]
    packages = [p for p in ROOT.iterdir() if (p / "__init__.py").exists()]
    assert len(top) <= 8, sorted(p.name for p in top)
    assert len(packages) >= 4
    long = {str(p.relative_to(ROOT)): n for p in ROOT.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long
