"""Fidelity against diversity: sample and score a conditional run at several guidance scales.

`ldm sweep --guidance 1,1.5,2,3,5` draws a balanced set (sample i asks for class i mod K) with
one sampler at each scale s and scores it: FID against all training images, the FID of each
class against that class's images and their mean, and the accuracy (how often the run's
classifier agrees with the requested label). Larger s raises the accuracy and, past some
point, the FID (Ho & Salimans 2022, fig. 1). `R/guidance.json` holds one entry per scale for
the run's classifier, VAE, denoiser, sampler, N and seed, written as each finishes, so an
interrupted sweep continues; `figures/guidance.png` plots accuracy against FID.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from . import checkpoint, evaluation, generation, plots
from . import distributed as dist
from .classwise import class_fids
from .config import SamplingConfig, config_hash
from .datasets import Dataset
from .diffusion.denoiser import LADDERS
from .diffusion.samplers import uses_ladder
from .errors import UsageError
from .fileio import write_json
from .metrics import evaluate_images
from .rundir import RunDir

log = logging.getLogger(__name__)
SCORES = ("fid", "accuracy", "fid_class_mean", "fid_per_class", "kid_mean", "precision",
          "recall")


def load(path: Path) -> dict[str, Any] | None:
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
    samplings = {s: SamplingConfig(samplers=(spec,), labels="balanced", guidance=s)
                 for s in scales}
    generation.check_conditioning(run, samplings[scales[0]])  # before anything is written
    hashes = [checkpoint.model_hash_of(checkpoint.load(run.model(name), kind=kind)[1])
              for name, kind in (("classifier", "classifier"), ("vae", "vae"),
                                 ("diffusion", "unet"))]
    ladders = [LADDERS] if uses_ladder(spec) else []  # (keys of ddpm sweeps stay as they were)
    key = config_hash(*hashes, spec, num_samples, seed, *ladders)
    path = run.root / "guidance.json"
    sweep = load(path)
    if sweep is None or sweep.get("key") != key:
        sweep = {"key": key, "sampler": spec, "n": num_samples, "seed": seed, "results": {}}
    classifier, reference = evaluation.reference(dataset, run, device)
    classes = evaluation.class_reference(dataset, run, classifier, device)
    for scale, sampling in samplings.items():
        name = f"{scale:g}"
        if name in sweep["results"]:
            continue
        start = time.perf_counter()
        images = generation.generate(run, "diffusion", num_samples, seed, sampler=spec,
                                     sampling=sampling, device=device, batch_size=batch_size,
                                     progress=progress)
        seconds = time.perf_counter() - start
        labels = generation.sample_labels(sampling, num_samples, dataset.num_classes)
        assert labels is not None  # balanced
        metrics = evaluate_images(classifier, images, reference, labels, device)
        metrics.update(class_fids(classifier, images, labels, classes, device))
        sweep["results"][name] = {"guidance": scale, "seconds": seconds,
                                  **{k: metrics[k] for k in SCORES}}
        log.info("guidance %g (%s): FID %.3f, accuracy %.4f", scale, spec, metrics["fid"],
                 metrics["accuracy"])
        if dist.is_main():
            write_json(path, sweep)  # after each scale: an interrupted sweep continues
    if dist.is_main():
        write_json(path, sweep)
        plot(sweep, run.figures / "guidance.png")
    return sweep


def _entries(sweep: dict[str, Any]) -> list[dict[str, Any]]:
    return sorted(sweep["results"].values(), key=lambda e: e["guidance"])


def plot(sweep: dict[str, Any], path: Path) -> None:
    """Accuracy against FID, one point per scale."""
    plots.save_tradeoff([(e["guidance"], e["fid"], e["accuracy"]) for e in _entries(sweep)],
                        path, xlabel=f"FID (N = {sweep['n']:,}, {sweep['sampler']})")


def table(sweep: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """One row per guidance scale: head and rows."""
    head = ["Guidance s", "FID", "FID per class (mean)", "Accuracy", "KID", "Precision / Recall",
            "Seconds"]
    rows = [[f"{e['guidance']:g}", _num(e["fid"], ".3f"), _num(e["fid_class_mean"], ".3f"),
             f"{e['accuracy']:.4f}", _num(e["kid_mean"], ".4f"),
             f"{_num(e['precision'], '.3f')} / {_num(e['recall'], '.3f')}",
             f"{e['seconds']:.0f}"] for e in _entries(sweep)]
    return head, rows


def _num(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def summary(sweep: dict[str, Any]) -> dict[str, Any]:
    """The CLI's JSON: FID, class-mean FID and accuracy per scale."""
    return {"n": sweep["n"], "sampler": sweep["sampler"],
            "results": {f"{e['guidance']:g}": {
                "fid": e["fid"], "fid_class_mean": e["fid_class_mean"],
                "accuracy": e["accuracy"]} for e in _entries(sweep)},
            "figure": "figures/guidance.png"}
