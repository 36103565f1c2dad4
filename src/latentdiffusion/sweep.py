"""Quality against cost: sample and score each (sampler, NFE) pair on one run's denoiser.

`R/sweep.json` holds one entry per pair (FID, KID, precision/recall, samples/s) plus the
Validation row at the same N, the floor every FID is compared with. Entries are written as they
finish and kept across calls with the same models, N and seed, so an interrupted sweep continues.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from . import checkpoint, data, evaluation, generation, plots
from . import distributed as dist
from .config import SamplingConfig, config_hash
from .diffusion import SAMPLERS
from .errors import UsageError
from .fileio import write_json
from .metrics import evaluate_images
from .rundir import RunDir

log = logging.getLogger(__name__)
SCORES = ("fid", "kid_mean", "kid_std", "precision", "recall")


def pairs(samplers: Sequence[str], nfes: Sequence[int]) -> list[str]:
    """Sampler specs 'NAME-STEPS' with the most steps whose model calls fit each NFE budget."""
    unknown = [name for name in samplers if name not in SAMPLERS]
    if unknown:
        raise UsageError(f"unknown sampler {unknown[0]!r} (choose from {', '.join(SAMPLERS)})")
    if not nfes or any(n <= 0 for n in nfes):
        raise UsageError("--nfe needs positive integers")
    specs = [f"{name}-{SAMPLERS[name].steps_for(nfe)}" for name in samplers for nfe in nfes]
    return list(dict.fromkeys(specs))  # heun at NFE 5 and 6 is the same pair


def _load(path: Path, key: str) -> dict[str, Any] | None:
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) and found.get("key") == key else None


def run_sweep(run: RunDir, data_dir: str | Path | None, samplers: Sequence[str],
              nfes: Sequence[int], num_samples: int, *, seed: int, device: torch.device,
              batch_size: int = 500, progress: bool = True) -> dict[str, Any]:
    """Score every pair (resuming a sweep of the same models, N and seed); returns sweep.json."""
    specs = pairs(samplers, nfes)
    if num_samples <= 0 or batch_size <= 0:
        raise UsageError("the number of samples and the batch size must be > 0")
    headers = {name: checkpoint.load(run.model(name), kind=kind)[1]
               for name, kind in (("classifier", "classifier"), ("vae", "vae"),
                                  ("diffusion", "unet"))}
    key = config_hash(*map(checkpoint.model_hash_of, headers.values()), num_samples, seed)
    path = run.root / "sweep.json"
    sweep = _load(path, key) or {"key": key, "n": num_samples, "seed": seed, "results": {}}
    classifier, reference = evaluation.reference(data_dir, run, device)
    if "validation" not in sweep:
        test_images, test_labels = data.load_split(data_dir, "test")
        sweep["validation"] = _scores(evaluate_images(
            classifier, test_images[:num_samples], reference, test_labels[:num_samples], device))
    for spec in specs:
        if spec in sweep["results"]:
            continue
        start = time.perf_counter()
        images = generation.generate(run, "diffusion", num_samples, seed, sampler=spec,
                                 sampling=SamplingConfig(samplers=(spec,)), device=device,
                                 batch_size=batch_size, progress=progress)
        seconds = time.perf_counter() - start
        scores = _scores(evaluate_images(classifier, images, reference, None, device))
        nfe = generation.model_calls(run, spec, device)
        sweep["results"][spec] = {"sampler": spec.rpartition("-")[0], "nfe": nfe,
                                  "seconds": seconds, "samples_per_second": num_samples / seconds,
                                  **scores}
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


def plot(sweep: dict[str, Any], path: Path) -> None:
    """FID against NFE, one line per sampler, the Validation FID as the floor."""
    lines: dict[str, list[tuple[int, float]]] = {}
    for entry in sweep["results"].values():
        lines.setdefault(entry["sampler"], []).append((entry["nfe"], entry["fid"]))
    plots.save_lines({name: sorted(points) for name, points in lines.items()},
                     floor=("Validation", sweep["validation"]["fid"]), path=path,
                     xlabel="model calls per sample (NFE)",
                     ylabel=f"FID (N = {sweep['n']:,})")


def table(sweep: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The sweep as a table: head and rows, sorted by sampler and NFE."""
    head = ["Sampler", "NFE", "FID", "FID / Validation", "KID (mean ± std)",
            "Precision / Recall", "Samples/s"]
    floor = sweep["validation"]["fid"]
    rows = [[spec, str(e["nfe"]), f"{e['fid']:.3f}", f"{e['fid'] / floor:.2f}x",
             f"{e['kid_mean']:.4f} ± {e['kid_std']:.4f}",
             f"{e['precision']:.3f} / {e['recall']:.3f}", f"{e['samples_per_second']:.0f}"]
            for spec, e in sorted(sweep["results"].items(),
                                  key=lambda item: (item[1]["sampler"], item[1]["nfe"]))]
    rows.append(["Validation (test set)", "", f"{floor:.3f}", "1.00x", "", "", ""])
    return head, rows


def summary(sweep: dict[str, Any]) -> dict[str, Any]:
    """The CLI's JSON: FID and samples/s per pair, the floor and N."""
    return {"n": sweep["n"], "validation_fid": sweep["validation"]["fid"],
            "results": {spec: {k: (round(v, 4) if isinstance(v, float) else v)
                               for k, v in e.items() if k in ("nfe", "fid",
                                                              "samples_per_second")}
                        for spec, e in sweep["results"].items()},
            "figure": "figures/sweep.png"}
