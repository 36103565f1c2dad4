"""Sweeps over one run's denoiser: quality against cost and fidelity against diversity.

`ldm sweep` samples and scores each (sampler, NFE) pair. `R/sweep.json` holds, for the run's
classifier, VAE, N and seed, the Validation row at that N (the floor every FID is compared with)
and one entry per pair (FID, KID, precision/recall, samples/s) for each denoiser the run has had,
so that when the denoiser is retrained with another objective (`ldm run --objective flow`) the
report can set the objectives side by side.

`ldm sweep --guidance 1,1.5,2,3,5` draws a balanced set (sample i asks for class i mod K) of a
conditional run with one sampler at each guidance scale s and scores it: FID against all
training images, the FID of each class against that class's images and their mean, and the
accuracy (how often the run's classifier agrees with the requested label). Larger s raises the
accuracy and, past some point, the FID (Ho & Salimans 2022, fig. 1). `R/guidance.json` holds one
entry per scale for the run's classifier, VAE, denoiser, sampler, N and seed.

Both write their file after each entry, so an interrupted sweep continues.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .. import distributed as dist
from ..data import Dataset
from ..diffusion import SAMPLERS, SamplerChoice, SamplingRequest, parse_sampler
from ..diffusion.denoiser import LADDERS
from ..diffusion.guidance import UNGUIDED, Guidance
from ..diffusion.samplers import MAX_STEPS
from ..errors import UsageError
from ..evaluation import plots
from ..evaluation.classwise import class_fids
from ..evaluation.metrics import evaluate_images
from ..evaluation.tables import guidance_entries, sweep_rows
from ..files import write_json
from ..schema import config_hash
from . import checkpoint, generation, scores
from .rundir import RunDir

log = logging.getLogger(__name__)
SCORES = ("fid", "kid_mean", "kid_std", "precision", "recall")
GUIDANCE_SCORES = ("fid", "accuracy", "fid_class_mean", "fid_per_class", "kid_mean",
                   "precision", "recall")
MIN_SAMPLES = 4  # below it precision and recall (and FID below 2) are undefined


def _model_hashes(run: RunDir) -> dict[str, str]:
    """The model hashes of the run's classifier, VAE and denoiser."""
    return {name: checkpoint.model_hash_at(run.model(name), kind)
            for name, kind in (("classifier", "classifier"), ("vae", "vae"),
                               ("diffusion", "unet"))}


def _generate(run: RunDir, request: SamplingRequest, num_samples: int, seed: int,
              device: torch.device, batch_size: int, progress: bool) -> tuple[Any, float]:
    """One set of the run's denoiser, and the seconds it took."""
    start = time.perf_counter()
    images = generation.generate(run, "diffusion", num_samples, seed, request=request,
                                 device=device, batch_size=batch_size, progress=progress)
    return images, time.perf_counter() - start


def _write(path: Path, sweep: dict[str, Any], plot: Callable[[], None] | None = None) -> None:
    """Rank 0 writes the sweep's JSON (and, when given, its figure)."""
    if dist.is_main():
        write_json(path, sweep)
        if plot is not None:
            plot()


def pairs(samplers: Sequence[str], nfes: Sequence[int], guidance: Guidance = UNGUIDED
          ) -> list[str]:
    """Sampler specs 'NAME-STEPS' with the most steps whose model calls fit each NFE budget
    (its calls and, guided by the guide, the guide's)."""
    unknown = [name for name in samplers if name not in SAMPLERS]
    if unknown:
        raise UsageError(f"unknown sampler {unknown[0]!r} (choose from {', '.join(SAMPLERS)})")
    if not nfes or any(not 0 < n <= MAX_STEPS for n in nfes):
        raise UsageError(f"--nfe needs integers in 1 .. {MAX_STEPS}")
    if guidance.by_guide:
        nfes = guided_budgets(nfes)
    specs = [f"{name}-{SAMPLERS[name].steps_for(nfe)}" for name in samplers for nfe in nfes]
    return list(dict.fromkeys(specs))  # heun at NFE 5 and 6 is the same pair


def guided_budgets(nfes: Sequence[int]) -> list[int]:
    """The denoiser's share of each NFE budget when every step also calls the guide."""
    if any(n < 2 for n in nfes):
        raise UsageError("--nfe: an autoguided step calls two networks, so every budget must "
                         "be at least 2")
    return [n // 2 for n in nfes]


def load(path: Path) -> dict[str, Any] | None:
    """A sweep.json as `run_sweep` writes it, or None when there is none; a damaged one is
    reported and ignored (the next sweep writes a new one)."""
    if not path.exists():
        return None
    try:
        found = json.loads(path.read_text())
        _check(found)
    except (OSError, ValueError, TypeError, KeyError) as err:
        log.warning("ignoring %s: it is damaged (%s); the next `ldm sweep` rewrites it", path,
                    err or type(err).__name__)
        return None
    return found


def _check(sweep: Any) -> None:
    """Raise ValueError unless `sweep` has the layout and the finite scores `run_sweep` writes."""
    entries = [sweep["validation"]] + [entry for denoiser in sweep["denoisers"].values()
                                       for entry in denoiser["results"].values()]
    for entry in entries:
        if not all(isinstance(entry[k], (int, float)) for k in SCORES):
            raise ValueError("a score is missing or not a number")
    for denoiser in sweep["denoisers"].values():
        for spec, entry in denoiser["results"].items():
            if parse_sampler(spec)[0] != entry["sampler"] or not entry["nfe"] > 0:
                raise ValueError(f"entry {spec!r} does not describe its sampler")
    if not isinstance(sweep["n"], int) or not isinstance(sweep["seed"], int):
        raise ValueError("no N or seed")


def run_sweep(run: RunDir, dataset: Dataset, samplers: Sequence[str],
              nfes: Sequence[int], num_samples: int, *, seed: int, device: torch.device,
              batch_size: int = 500, progress: bool = True,
              autoguidance: float = 1.0) -> dict[str, Any]:
    """Score every pair on the run's denoiser (skipping pairs already scored), guided by the
    run's guide when `autoguidance` > 1 (its entries apart, the guide's calls in the NFE);
    returns the sweep (what R/sweep.json holds)."""
    guidance = Guidance(autoguidance, "guide")
    specs = pairs(samplers, nfes, guidance)
    if num_samples < MIN_SAMPLES or batch_size <= 0:
        raise UsageError(f"a sweep needs -n of at least {MIN_SAMPLES} (every score defined) "
                         "and a batch size > 0")
    requests = [SamplingRequest(SamplerChoice(spec), guidance=guidance) for spec in specs]
    hashes = _model_hashes(run)
    objective = checkpoint.load(run.model("diffusion"), kind="unet")[1]["objective"]
    key = config_hash(hashes["classifier"], hashes["vae"], num_samples, seed, LADDERS)
    path = run.root / "sweep.json"
    sweep = load(path)
    if sweep is None or sweep.get("key") != key:  # another classifier, VAE, N or seed
        sweep = {"key": key, "n": num_samples, "seed": seed, "denoisers": {}}
    classifier, reference = scores.reference(dataset, run, device)
    if "validation" not in sweep:
        test_images = scores.scored_subset(dataset.test_images, None, num_samples)[0]
        sweep["validation"] = _scores(evaluate_images(classifier, test_images, reference, None,
                                                      device))
    name, kind = hashes["diffusion"], objective.get("kind", "vp")
    if guidance.by_guide:  # another denoiser: D guided by this guide at this scale
        guide_hash = checkpoint.model_hash_at(run.model("guide"), "unet")
        name = f"{name}+guide-{guide_hash[:16]}@{autoguidance:g}"
        kind = f"{kind} + autoguidance {autoguidance:g}"
    entry = sweep["denoisers"].setdefault(name, {"objective": kind, "results": {}})
    sweep["current"] = name
    for request in requests:
        spec = request.spec
        if spec in entry["results"]:
            continue
        images, seconds = _generate(run, request, num_samples, seed, device, batch_size,
                                    progress)
        scored = _scores(evaluate_images(classifier, images, reference, None, device))
        nfe = generation.nfe(run, request)
        entry["results"][spec] = {"sampler": request.sampler.name, "nfe": nfe,
                                  "seconds": seconds,
                                  "samples_per_second": num_samples / seconds, **scored}
        log.info("sweep %s (NFE %d): FID %.3f, %.0f samples/s", spec, nfe, scored["fid"],
                 num_samples / seconds)
        _write(path, sweep)  # after each pair: an interrupted sweep continues
    _write(path, sweep, lambda: _plot_sweep(sweep, run.figures / "sweep.png"))
    return sweep


def _scores(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: metrics[k] for k in SCORES}


def _plot_sweep(sweep: dict[str, Any], path: Path) -> None:
    """FID against NFE, one line per sampler (and objective), the Validation FID as the floor."""
    several = len({objective for objective, _, _ in sweep_rows(sweep)}) > 1
    lines: dict[str, list[tuple[int, float]]] = {}
    for objective, _, e in sweep_rows(sweep):
        name = f"{objective}: {e['sampler']}" if several else e["sampler"]
        lines.setdefault(name, []).append((e["nfe"], e["fid"]))
    plots.save_lines({name: sorted(points) for name, points in lines.items()},
                     floor=("Validation", sweep["validation"]["fid"]), path=path,
                     xlabel="model calls per sample (NFE)",
                     ylabel=f"FID (N = {sweep['n']:,})")


def summary(sweep: dict[str, Any]) -> dict[str, Any]:
    """The CLI's JSON: FID and samples/s of each pair on the run's denoiser, the floor and N."""
    current = sweep["denoisers"][sweep["current"]]
    return {"n": sweep["n"], "objective": current["objective"],
            "validation_fid": sweep["validation"]["fid"],
            "results": {spec: {"nfe": e["nfe"], "fid": round(e["fid"], 4),
                               "samples_per_second": round(e["samples_per_second"], 1)}
                        for spec, e in current["results"].items()},
            "figure": "figures/sweep.png"}


# ---------------------------------------------------------------- guidance


def load_guidance(path: Path) -> dict[str, Any] | None:
    """A guidance.json as `run_guidance_sweep` writes it, or None (none, or damaged)."""
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) and isinstance(found.get("results"), dict) else None


def run_guidance_sweep(run: RunDir, dataset: Dataset, spec: str,
                       scales: Sequence[float], num_samples: int, *, seed: int,
                       device: torch.device, batch_size: int = 500,
                       progress: bool = True) -> dict[str, Any]:
    """Score a balanced set at each guidance scale (skipping scales already scored)."""
    if num_samples <= 0 or batch_size <= 0:
        raise UsageError("the number of samples and the batch size must be > 0")
    requests = {s: SamplingRequest.of(spec, labels="balanced", guidance=s) for s in scales}
    generation.check_conditioning(run, requests[scales[0]])  # before anything is written
    hashes = _model_hashes(run).values()
    # (keys of ddpm sweeps stay as they were)
    ladders = [LADDERS] if requests[scales[0]].sampler.uses_ladder else []
    key = config_hash(*hashes, spec, num_samples, seed, *ladders)
    path = run.root / "guidance.json"
    sweep = load_guidance(path)
    if sweep is None or sweep.get("key") != key:
        sweep = {"key": key, "sampler": spec, "n": num_samples, "seed": seed, "results": {}}
    classifier, reference = scores.reference(dataset, run, device)
    classes = scores.class_reference(dataset, run, classifier, device)
    for scale, request in requests.items():
        name = f"{scale:g}"
        if name in sweep["results"]:
            continue
        images, seconds = _generate(run, request, num_samples, seed, device, batch_size,
                                    progress)
        labels = request.labels_of(range(num_samples), dataset.num_classes)
        assert labels is not None  # balanced
        metrics = evaluate_images(classifier, images, reference, labels, device)
        metrics.update(class_fids(classifier, images, labels, classes, device))
        sweep["results"][name] = {"guidance": scale, "seconds": seconds,
                                  **{k: metrics[k] for k in GUIDANCE_SCORES}}
        log.info("guidance %g (%s): FID %.3f, accuracy %.4f", scale, spec, metrics["fid"],
                 metrics["accuracy"])
        _write(path, sweep)  # after each scale: an interrupted sweep continues
    _write(path, sweep, lambda: _plot_guidance(sweep, run.figures / "guidance.png"))
    return sweep


def _plot_guidance(sweep: dict[str, Any], path: Path) -> None:
    """Accuracy against FID, one point per scale."""
    plots.save_tradeoff([(e["guidance"], e["fid"], e["accuracy"]) for e in guidance_entries(sweep)],
                        path, xlabel=f"FID (N = {sweep['n']:,}, {sweep['sampler']})")


def guidance_summary(sweep: dict[str, Any]) -> dict[str, Any]:
    """The CLI's JSON: FID, class-mean FID and accuracy per scale."""
    return {"n": sweep["n"], "sampler": sweep["sampler"],
            "results": {f"{e['guidance']:g}": {
                "fid": e["fid"], "fid_class_mean": e["fid_class_mean"],
                "accuracy": e["accuracy"]} for e in guidance_entries(sweep)},
            "figure": "figures/guidance.png"}
