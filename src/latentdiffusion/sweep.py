"""Quality against cost: sample and score each (sampler, NFE) pair on one run's denoiser.

`R/sweep.json` holds, for the run's classifier, VAE, N and seed, the Validation row at that N
(the floor every FID is compared with) and one entry per pair (FID, KID, precision/recall,
samples/s) for each denoiser the run has had. Entries are written as they finish, so an
interrupted sweep continues; and when the run's denoiser is retrained with another objective
(`ldm run --objective flow`), the old one's entries stay, so the report can set the objectives
side by side.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from . import checkpoint, evaluation, generation, plots
from . import distributed as dist
from .config import SamplingConfig, config_hash
from .datasets import Dataset
from .diffusion import SAMPLERS, model_calls, parse_sampler
from .diffusion.denoiser import LADDERS
from .diffusion.guidance import network_calls
from .diffusion.samplers import MAX_STEPS
from .errors import UsageError
from .fileio import write_json
from .metrics import evaluate_images
from .rundir import RunDir

log = logging.getLogger(__name__)
SCORES = ("fid", "kid_mean", "kid_std", "precision", "recall")
MIN_SAMPLES = 4  # below it precision and recall (and FID below 2) are undefined


def pairs(samplers: Sequence[str], nfes: Sequence[int]) -> list[str]:
    """Sampler specs 'NAME-STEPS' with the most steps whose model calls fit each NFE budget."""
    unknown = [name for name in samplers if name not in SAMPLERS]
    if unknown:
        raise UsageError(f"unknown sampler {unknown[0]!r} (choose from {', '.join(SAMPLERS)})")
    if not nfes or any(not 0 < n <= MAX_STEPS for n in nfes):
        raise UsageError(f"--nfe needs integers in 1 .. {MAX_STEPS}")
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
    specs = pairs(samplers, guided_budgets(nfes) if autoguidance != 1.0 else nfes)
    if num_samples < MIN_SAMPLES or batch_size <= 0:
        raise UsageError(f"a sweep needs -n of at least {MIN_SAMPLES} (every score defined) "
                         "and a batch size > 0")
    headers = {name: checkpoint.load(run.model(name), kind=kind)[1]
               for name, kind in (("classifier", "classifier"), ("vae", "vae"),
                                  ("diffusion", "unet"))}
    hashes = {name: checkpoint.model_hash_of(header) for name, header in headers.items()}
    sampling = SamplingConfig(autoguidance=autoguidance)  # checks the scale
    denoiser = generation.load_denoiser(run, hashes["vae"], device)[0]  # for each pair's NFE
    key = config_hash(hashes["classifier"], hashes["vae"], num_samples, seed, LADDERS)
    path = run.root / "sweep.json"
    sweep = load(path)
    if sweep is None or sweep.get("key") != key:  # another classifier, VAE, N or seed
        sweep = {"key": key, "n": num_samples, "seed": seed, "denoisers": {}}
    classifier, reference = evaluation.reference(dataset, run, device)
    if "validation" not in sweep:
        test_images = evaluation.scored_subset(dataset.test_images, None, num_samples)[0]
        sweep["validation"] = _scores(evaluate_images(classifier, test_images, reference, None,
                                                      device))
    name, objective = hashes["diffusion"], headers["diffusion"]["objective"].get("kind", "vp")
    if autoguidance != 1.0:  # another denoiser: D guided by this guide at this scale
        guide_hash = checkpoint.model_hash_of(checkpoint.load(run.model("guide"), kind="unet")[1])
        name = f"{name}+guide-{guide_hash[:16]}@{autoguidance:g}"
        objective = f"{objective} + autoguidance {autoguidance:g}"
    entry = sweep["denoisers"].setdefault(name, {"objective": objective, "results": {}})
    sweep["current"] = name
    for spec in specs:
        if spec in entry["results"]:
            continue
        start = time.perf_counter()
        images = generation.generate(run, "diffusion", num_samples, seed, sampler=spec,
                                     sampling=dataclasses.replace(sampling, samplers=(spec,)),
                                     device=device,
                                     batch_size=batch_size, progress=progress)
        seconds = time.perf_counter() - start
        scores = _scores(evaluate_images(classifier, images, reference, None, device))
        nfe = network_calls(model_calls(spec, denoiser), autoguidance)
        entry["results"][spec] = {"sampler": parse_sampler(spec)[0], "nfe": nfe,
                                  "seconds": seconds,
                                  "samples_per_second": num_samples / seconds, **scores}
        log.info("sweep %s (NFE %d): FID %.3f, %.0f samples/s", spec, nfe, scores["fid"],
                 num_samples / seconds)
        if dist.is_main():
            write_json(path, sweep)  # after each pair: an interrupted sweep continues
    if dist.is_main():
        write_json(path, sweep)
        plot(sweep, run.figures / "sweep.png")
    return sweep


def _scores(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: metrics[k] for k in SCORES}


def _rows(sweep: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(objective, spec, entry) of every scored pair, the run's current denoiser first."""
    current = sweep.get("current")
    ordered = sorted(sweep["denoisers"].items(), key=lambda item: item[0] != current)
    return [(denoiser["objective"], spec, e) for _, denoiser in ordered
            for spec, e in sorted(denoiser["results"].items(),
                                  key=lambda item: (item[1]["sampler"], item[1]["nfe"]))]


def plot(sweep: dict[str, Any], path: Path) -> None:
    """FID against NFE, one line per sampler (and objective), the Validation FID as the floor."""
    several = len({objective for objective, _, _ in _rows(sweep)}) > 1
    lines: dict[str, list[tuple[int, float]]] = {}
    for objective, _, e in _rows(sweep):
        name = f"{objective}: {e['sampler']}" if several else e["sampler"]
        lines.setdefault(name, []).append((e["nfe"], e["fid"]))
    plots.save_lines({name: sorted(points) for name, points in lines.items()},
                     floor=("Validation", sweep["validation"]["fid"]), path=path,
                     xlabel="model calls per sample (NFE)",
                     ylabel=f"FID (N = {sweep['n']:,})")


def table(sweep: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Every scored pair as a table: head and rows."""
    head = ["Objective", "Sampler", "NFE", "FID", "FID / Validation", "KID (mean ± std)",
            "Precision / Recall", "Samples/s"]
    floor = sweep["validation"]["fid"]
    rows = [[objective, spec, str(e["nfe"]), f"{e['fid']:.3f}", f"{e['fid'] / floor:.2f}x",
             f"{e['kid_mean']:.4f} ± {e['kid_std']:.4f}",
             f"{e['precision']:.3f} / {e['recall']:.3f}", f"{e['samples_per_second']:.0f}"]
            for objective, spec, e in _rows(sweep)]
    rows.append(["", "Validation (test set)", "", f"{floor:.3f}", "1.00x", "", "", ""])
    return head, rows


def best_per_objective(sweep: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """One row per objective and kind of sampler: its lowest FID and at what cost."""
    head = ["Objective", "Sampler kind", "Best pair", "NFE", "FID", "FID / Validation"]
    floor = sweep["validation"]["fid"]
    best: dict[tuple[str, str], tuple[str, dict[str, Any]]] = {}
    for objective, spec, e in _rows(sweep):
        kind = "stochastic" if SAMPLERS[e["sampler"]].stochastic else "deterministic"
        if (objective, kind) not in best or e["fid"] < best[objective, kind][1]["fid"]:
            best[objective, kind] = (spec, e)
    rows = [[objective, kind, spec, str(e["nfe"]), f"{e['fid']:.3f}", f"{e['fid'] / floor:.2f}x"]
            for (objective, kind), (spec, e) in sorted(best.items())]
    return head, rows


def summary(sweep: dict[str, Any]) -> dict[str, Any]:
    """The CLI's JSON: FID and samples/s of each pair on the run's denoiser, the floor and N."""
    current = sweep["denoisers"][sweep["current"]]
    return {"n": sweep["n"], "objective": current["objective"],
            "validation_fid": sweep["validation"]["fid"],
            "results": {spec: {"nfe": e["nfe"], "fid": round(e["fid"], 4),
                               "samples_per_second": round(e["samples_per_second"], 1)}
                        for spec, e in current["results"].items()},
            "figure": "figures/sweep.png"}
