"""`ldm export`: a folder that samples with nothing else: the VAE, the denoiser and its guide
(the run's verified model files, copied: safetensors, never pickled), a config.json (the model
configs, the latent shift and scale, the data mean, the sha256 of each weight file) and a model
card README.md with a sample grid.

Every file has the name it has in a run directory, so a loaded export samples through the same
code, to the same bytes, as the run it came from.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, LdmError, UsageError
from ..evaluation.plots import save_grid
from ..evaluation.samples import load_samples
from ..evaluation.tables import scored_sets
from ..files import atomic_write, load_small_json, write_json
from ..run import checkpoint
from ..run.checkpoint import MAX_CHECKPOINT_BYTES
from ..run.rundir import RunDir, check_replaceable, read_manifest, read_metrics
from ..version import __version__

FORMAT = "latentdiffusion-export"
FORMAT_VERSION = 1
MODELS = {"vae": "vae", "diffusion": "unet", "guide": "unet"}  # name -> checkpoint kind
CONFIG, CARD, GRID = "config.json", "README.md", "samples.png"
_FILES = {CONFIG, CARD, GRID, *(f"{name}.safetensors" for name in MODELS)}


def sha256_of(path: Path) -> str:
    """sha256 of a regular file of at most MAX_CHECKPOINT_BYTES (CheckpointError otherwise)."""
    try:
        info = os.stat(path)  # before opening: a FIFO would wait for a writer
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_CHECKPOINT_BYTES:
        raise CheckpointError(f"{path} is not a weight file of this program (not a regular "
                              "file, or too large)")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_export(path: Path) -> bool:
    """Whether `path` is a folder with an export's config.json (verified or not)."""
    try:
        config = load_small_json(path / CONFIG)
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("format") == FORMAT


def _replaceable(path: Path) -> bool:
    """An earlier export (only its files), or an empty folder."""
    if not path.is_dir() or path.is_symlink():
        return False
    names = set(os.listdir(path))
    temps = {n for n in names if n.startswith(".") and n.split(".tmp-")[0][1:] in _FILES}
    return names - temps <= _FILES and (not names or is_export(path))


def check_out(out: Path) -> None:
    """An export's folder is new, empty or an earlier export: never a run directory or a
    folder of the user's files (UsageError)."""
    check_replaceable(out, "export", _replaceable)


def read_export(path: Path) -> dict[str, Any]:
    """The config.json of the export at `path`, with every weight file it lists present and of
    the sha256 it records (CheckpointError naming what is wrong)."""
    try:
        config = load_small_json(path / CONFIG)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path / CONFIG} is unreadable ({str(err)[:80]}); export the "
                              "run again") from None
    if not isinstance(config, dict):
        config = {}
    models = config.get("models")
    if config.get("format_version") != FORMAT_VERSION or not isinstance(models, dict) \
            or not {"vae", "diffusion"} <= set(models) or not set(models) <= set(MODELS):
        raise CheckpointError(f"{path / CONFIG} is not an export's config this version reads "
                              f"(format version {FORMAT_VERSION}, a vae and a diffusion model)")
    for name, entry in models.items():
        expected = entry.get("sha256") if isinstance(entry, dict) else None
        if sha256_of(path / f"{name}.safetensors") != expected:
            raise CheckpointError(f"{path / f'{name}.safetensors'} does not match the sha256 "
                                  f"in {path / CONFIG}: the export is damaged; export the run "
                                  "again")
    return config  # type: ignore[no-any-return]


def fid_table(metrics: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """{set: {"n", "fid"}} of a run's metrics.json (empty without one)."""
    return {name: {"n": m["n"], "fid": m["fid"]}
            for name, m in scored_sets(metrics or {}).items()}


def run_command(manifest: dict[str, Any]) -> str:
    """The command that trained a run, as run.json records it (or rebuilds it from its preset
    and data for a run.json without one)."""
    if manifest.get("command"):
        return str(manifest["command"])
    preset = str(manifest.get("preset", "default")).split(" + ")[0]
    return f"ldm run --data-dir {manifest.get('data_dir', '...')} --preset {preset}"


def export(run_dir: str | os.PathLike[str], out: str | os.PathLike[str], *,
           license: str = "unspecified") -> dict[str, Any]:
    """Write the export of the run at `run_dir` into `out` (new, empty or an earlier export);
    returns what it wrote: the folder, each file's bytes and the total."""
    run, out = RunDir(Path(run_dir)), Path(out)
    check_out(out)
    headers = {}
    for name, kind in MODELS.items():
        if name == "guide" and not run.model(name).exists():
            continue
        headers[name] = checkpoint.load(run.model(name), kind=kind)[1]  # verified
    manifest = read_manifest(run.root / "run.json")
    metrics = read_metrics(run.root / "metrics.json")
    if not manifest.get("config") or metrics is None:
        raise UsageError(f"{run.root} is not a finished run (no run.json or metrics.json); "
                         "finish it with `ldm run` first")
    diffusion = headers["diffusion"]
    config = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "latentdiffusion": __version__,
        "license": license, "data": manifest.get("data", {}), "command": run_command(manifest),
        "fid": fid_table(metrics), "run_config": manifest["config"],
        "latents": {"shift": diffusion["shift"], "scale": diffusion["scale"]},
        "data_mean": diffusion.get("data_mean"),
        "models": {name: {"file": f"{name}.safetensors", "kind": header["kind"],
                          "model_hash": checkpoint.model_hash_of(header),
                          "config": header["config"]} for name, header in headers.items()}}
    out.mkdir(parents=True, exist_ok=True)
    for name in MODELS:
        target = out / f"{name}.safetensors"
        if name not in headers:
            target.unlink(missing_ok=True)  # an earlier export's guide, of another run
            continue
        data = run.model(name).read_bytes()
        atomic_write(target, data)
        config["models"][name]["sha256"] = hashlib.sha256(data).hexdigest()
    grid = _grid(run, manifest, out / GRID)
    atomic_write(out / CARD, model_card(config, grid).encode())
    write_json(out / CONFIG, config)  # last: an export without it is no export
    sizes = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.name in _FILES}
    return {"out": str(out), "files": sizes, "bytes": sum(sizes.values())}


def _grid(run: RunDir, manifest: dict[str, Any], path: Path) -> bool:
    """The grid of the run's first diffusion set at `path`; False when the run has none."""
    samplers = manifest["config"].get("sampling", {}).get("samplers") or []
    for name in samplers:
        try:
            images, _ = load_samples(run.samples(name))
        except LdmError:
            continue
        save_grid(images, path)
        return True
    path.unlink(missing_ok=True)
    return False


def model_card(config: dict[str, Any], grid: bool) -> str:
    """The export's README.md: what it was trained on and how, its FID table and samples."""
    data = config["data"]
    shape = config["models"]["vae"]["config"]
    lines = [
        f"# Latent diffusion model of {data.get('name', 'an unnamed data set')}", "",
        "A latentdiffusion export: the VAE, the denoiser"
        + (" and its autoguidance guide" if "guide" in config["models"] else "")
        + " as safetensors, and config.json.", "",
        "```python", "from latentdiffusion import Pipeline",
        'pipe = Pipeline.load("this folder")',
        'images = pipe.sample(16, sampler="ddim", steps=50, seed=0)  # uint8', "```", "",
        "| field | value |", "|---|---|",
        f"| data set | {data.get('name', '?')} ({data.get('source', '?')}) |",
        f"| data content sha256 | `{data.get('content_sha256', '?')}` |",
        f"| images | {shape['image_size']}x{shape['image_size']}, "
        f"{shape['image_channels']} channel(s) |",
        f"| trained with | `{config['command']}` |",
        f"| licence | {config['license']} |",
        f"| latentdiffusion | {config['latentdiffusion']} |", "",
        "## FID", "",
        "In the feature space of the run's classifier (not part of the export), against the "
        "test split; N images per set.", "",
        "| set | N | FID |", "|---|---:|---:|",
        *(f"| {name} | {m['n']} | {m['fid']:.4g} |" for name, m in config["fid"].items()), ""]
    if grid:
        lines += ["## Samples", "", f"![samples]({GRID})", ""]
    lines += ["## Files", "", "| file | sha256 |", "|---|---|",
              *(f"| {m['file']} | `{m['sha256']}` |" for m in config["models"].values()), ""]
    return "\n".join(lines)
