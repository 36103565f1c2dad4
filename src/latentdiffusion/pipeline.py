"""`ldm run`: every stage in order, each skipped when its output was made from the same config
and upstream hashes, so a second run is a no-op and an interrupted one continues."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import checkpoint, data, plots, report, stages
from . import distributed as dist
from .config import RunConfig, ScheduleConfig, config_hash, to_dict
from .diffusion import NoiseSchedule
from .errors import UsageError
from .fileio import read_manifest, read_metrics, write_json, write_npz
from .metrics import evaluate_images, load_samples, random_images

log = logging.getLogger(__name__)
STAGES = ("classifier", "vae", "encode", "diffusion", "sample", "evaluate", "report")
# What must be redone when a stage is forced (the stage itself and everything after it that
# reads its output).
DOWNSTREAM = {
    "classifier": ("classifier", "evaluate", "report"),
    "vae": ("vae", "encode", "diffusion", "sample", "evaluate", "report"),
    "encode": ("encode", "diffusion", "sample", "evaluate", "report"),
    "diffusion": ("diffusion", "sample", "evaluate", "report"),
    "sample": ("sample", "evaluate", "report"),
    "evaluate": ("evaluate", "report"),
    "report": ("report",),
}


@dataclass
class StageEvent:
    name: str
    skipped: bool
    seconds: float
    summary: str


def _manifest(run: stages.RunDir) -> dict[str, Any]:
    return read_manifest(run.root / "run.json")


def _stored_key(path: Path, kind: str) -> str | None:
    header = checkpoint.peek(path)
    return header.get("key") if header and header.get("kind") == kind else None


def run_pipeline(config: RunConfig, run_root: Path, data_dir: str | Path | None, *,
                 device: torch.device, force: tuple[str, ...] = (), progress: bool = True,
                 preset_name: str = "custom", on_stage: Callable[[StageEvent], None] | None = None
                 ) -> dict[str, Any]:
    """Run (or skip) every stage; returns the metrics written to metrics.json."""
    for name in force:
        if name not in STAGES:
            raise UsageError(f"--force: unknown stage {name!r} (choose from {', '.join(STAGES)})")
    forced = {s for name in force for s in DOWNSTREAM[name]}
    run = stages.RunDir(run_root)
    manifest = _manifest(run)
    records = manifest["stages"]

    def step(name: str, key: str, done: bool, work: Callable[[], str]) -> None:
        skip = done and name not in forced
        start = time.perf_counter()
        summary = records.get(name, {}).get("summary", "") if skip else work()
        seconds = 0.0 if skip else time.perf_counter() - start
        if not skip:
            records[name] = {"key": key, "seconds": seconds, "summary": summary}
            if dist.is_main():
                write_json(run.root / "run.json", {"stages": records, "preset": preset_name,
                                                   "config": to_dict(config)})
        dist.barrier()  # rank 0 wrote the stage's files; every rank may read them now
        if on_stage and dist.is_main():
            on_stage(StageEvent(name, skip, seconds, summary))

    def recorded(name: str, key: str, *paths: Path) -> bool:
        return records.get(name, {}).get("key") == key and all(p.exists() for p in paths)

    c = config
    # 1-2. classifier and VAE
    for name, train_fn, model_cfg, train_cfg in (
            ("classifier", stages.train_classifier, c.classifier, c.classifier_train),
            ("vae", stages.train_vae, c.vae, c.vae_train)):
        key = config_hash(model_cfg, train_cfg)

        def work(fn: Any = train_fn, m: Any = model_cfg, t: Any = train_cfg) -> str:
            header = fn(data_dir, run, m, t, device=device, resume=True, progress=progress)
            return _history_summary(header["history"])

        step(name, key, _stored_key(run.model(name), name) == key, work)  # kind == name

    # 3. latents
    vae_hash = checkpoint.load(run.model("vae"), kind="vae")[1]["sha256"]
    latent_key = config_hash(vae_hash, c.latent_mode, c.latent_norm, c.vae_train.seed)
    step("encode", latent_key, _stored_key(run.latents, "latents") == latent_key,
         lambda: (stages.encode(data_dir, run, c.latent_mode, c.latent_norm, device=device,
                                seed=c.vae_train.seed), "latents cached")[1])

    # 4. diffusion
    latents_hash = checkpoint.load(run.latents, kind="latents")[1]["sha256"]
    diffusion_key = config_hash(c.unet, c.schedule, c.objective, c.diffusion_train,
                                latents_hash)
    step("diffusion", diffusion_key,
         _stored_key(run.model("diffusion"), "unet") == diffusion_key,
         lambda: _history_summary(stages.train_diffusion(
             run, c.unet, c.schedule, c.objective, c.diffusion_train, device=device, resume=True,
             progress=progress)["history"]))

    # 5. samples: Random, VAE prior, VAE reconstructions of test, each diffusion sampler
    diffusion_hash = checkpoint.load(run.model("diffusion"), kind="unet")[1]["sha256"]
    sets = ["random", "vae-prior", "vae-reconstruction", *c.sampling.samplers]
    sample_key = config_hash(vae_hash, diffusion_hash, c.sampling, c.eval_samples)
    paths = [run.samples(s) for s in sets]
    step("sample", sample_key, recorded("sample", sample_key, *paths),
         lambda: _sample_all(run, data_dir, c, device, progress))

    # 6. evaluation
    classifier_hash = checkpoint.load(run.model("classifier"), kind="classifier")[1]["sha256"]
    eval_key = config_hash(sample_key, classifier_hash)
    metrics_path = run.root / "metrics.json"
    step("evaluate", eval_key,
         recorded("evaluate", eval_key) and read_metrics(metrics_path) is not None,
         lambda: _evaluate_all(run, data_dir, sets, c.eval_samples, device))

    # 7. report
    report_paths = (run.root / "report.md", run.root / "report.html")
    step("report", eval_key, recorded("report", eval_key, *report_paths),
         lambda: _report(run, data_dir, c, preset_name, records))
    return read_metrics(metrics_path) or {}  # rank 0 wrote a valid one in the step above


def _history_summary(history: list[dict[str, float]]) -> str:
    if not history:
        return "trained"
    last = history[-1]
    return ", ".join(f"{k} {v:.4g}" for k, v in last.items() if k != "epoch")


def _sample_all(run: stages.RunDir, data_dir: str | Path | None, c: RunConfig,
                device: torch.device, progress: bool) -> str:
    s = c.sampling
    sets: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    train_images = data.load_split(data_dir, "train")[0]
    sets["random"] = (random_images(train_images, c.eval_samples, s.seed), None)
    sets["vae-prior"] = (stages.generate(run, "vae", c.eval_samples, s.seed, device=device,
                                         batch_size=s.batch_size, progress=progress), None)
    reconstructions, test_labels = stages.reconstruct(data_dir, run, "test", device=device)
    n = c.eval_samples
    sets["vae-reconstruction"] = (reconstructions[:n], test_labels[:n])
    timings = {}
    for spec in s.samplers:
        start = time.perf_counter()
        sets[spec] = (stages.generate(run, "diffusion", s.num_samples, s.seed, sampler=spec,
                                      sampling=s, device=device, batch_size=s.batch_size,
                                      progress=progress), None)
        timings[spec] = time.perf_counter() - start
    if dist.is_main():
        for name, (images, labels) in sets.items():
            arrays = {"images": images} if labels is None else {"images": images, "labels": labels}
            write_npz(run.samples(name), **arrays)
            plots.save_grid(images, run.samples(name).with_suffix(".png"))
        write_json(run.root / "samples" / "timings.json",
                   {k: {"seconds": v, "samples_per_second": s.num_samples / v}
                    for k, v in timings.items()})
    return ", ".join(f"{k}: {s.num_samples / v:.0f} samples/s" for k, v in timings.items())


def _evaluate_all(run: stages.RunDir, data_dir: str | Path | None, sets: list[str],
                  eval_samples: int, device: torch.device) -> str:
    classifier, reference = stages.reference(data_dir, run, device)  # loaded once for all sets
    results: dict[str, Any] = {}
    for name in sets:
        images, labels = load_samples(run.samples(name))
        results[name] = evaluate_images(classifier, images, reference, labels, device)
    # The first eval_samples test digits, like the reconstruction row: FID is biased upwards
    # at small N, so Validation must have the N of the rows it is the floor of.
    test_images, test_labels = data.load_split(data_dir, "test")
    n = eval_samples
    results["validation"] = evaluate_images(classifier, test_images[:n], reference,
                                            test_labels[:n], device)
    floor = results["validation"]["fid"]
    for entry in results.values():
        entry["fid_over_validation"] = entry["fid"] / floor if floor > 0 else float("inf")
    if dist.is_main():
        write_json(run.root / "metrics.json", results)
    return ", ".join(f"{k} FID {v['fid']:.3g}" for k, v in results.items())


def _report(run: stages.RunDir, data_dir: str | Path | None, c: RunConfig, preset_name: str,
            records: dict) -> str:
    if not dist.is_main():
        return "written by rank 0"
    figures = run.figures
    headers = {name: checkpoint.load(run.model(name), kind=kind)[1]
               for name, kind in (("classifier", "classifier"), ("vae", "vae"),
                                  ("diffusion", "unet"))}
    plots.save_losses({n: h.get("history", []) for n, h in headers.items()},
                      figures / "losses.png")
    schedules = {kind: NoiseSchedule.from_config(ScheduleConfig(
        kind=kind, num_timesteps=c.schedule.num_timesteps)).alphas_cumprod.numpy()
        for kind in ("linear", "cosine")}
    plots.save_schedules(schedules, figures / "schedules.png")
    metrics = json.loads((run.root / "metrics.json").read_text())
    generated = [k for k in metrics if k != "validation"]
    plots.save_class_histograms({k: metrics[k]["class_histogram"] for k in generated},
                                figures / "class_histogram.png")
    reconstructions, _ = load_samples(run.samples("vae-reconstruction"))
    plots.save_reconstructions(data.load_split(data_dir, "test")[0], reconstructions,
                               figures / "reconstructions.png")
    report.write(run.root, c, preset_name, metrics, records, headers)
    return "report.md, report.html"
