"""`ldm run`: every stage in order, each skipped when its output was made under the same stage
key (keys.py: configs and upstream hashes), so a second run is a no-op and an interrupted
one continues. A stage whose key changed starts over; a forced one too."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import distributed as dist
from ..data import Dataset
from ..diffusion import NoiseSchedule, ScheduleConfig, levels_only
from ..errors import UsageError
from ..evaluation import plots, report
from ..evaluation.metrics import random_images
from ..evaluation.samples import load_samples, save_samples
from ..evaluation.tables import scored_sets
from ..files import write_json
from ..schema import from_dict, to_dict
from . import checkpoint, generation, keys, latents, scores, stages, sweeps
from .config import RunConfig
from .progress import TRAINED_STAGES, RunWatch, Scorer, save_figures
from .resume import Resume
from .rundir import RunDir, read_manifest, read_metrics

log = logging.getLogger(__name__)
STAGES = ("classifier", "vae", "encode", "diffusion", "guide", "sample", "evaluate", "report")
# What must be redone when a stage is forced (the stage itself and everything after it that
# reads its output).
DOWNSTREAM = {
    "classifier": ("classifier", "evaluate", "report"),
    "vae": ("vae", "encode", "diffusion", "guide", "sample", "evaluate", "report"),
    "encode": ("encode", "diffusion", "guide", "sample", "evaluate", "report"),
    "diffusion": ("diffusion", "sample", "evaluate", "report"),
    "guide": ("guide", "sample", "evaluate", "report"),
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


def _manifest(run: RunDir) -> dict[str, Any]:
    return read_manifest(run.root / "run.json")


def _made_with(path: Path, kind: str, key: str, *fields: str) -> bool:
    """Whether `path` verifies, holds a file of `kind` made under the stage key and has the
    header `fields` that this version writes."""
    header = checkpoint.peek(path)
    return (header is not None and header.get("kind") == kind and header.get("key") == key
            and all(field in header for field in fields))


@dataclass
class _Run:
    """One `ldm run`: what it runs on, which stages are forced, and what run.json records."""

    config: RunConfig
    run: RunDir
    dataset: Dataset
    device: torch.device
    progress: bool
    forced: set[str]
    preset_name: str
    on_stage: Callable[[StageEvent], None] | None
    records: dict[str, Any]
    command: str = ""  # the `ldm run` command line that made the run, for run.json

    def resume(self, name: str) -> Resume:
        """A forced stage starts over; any other continues a checkpoint with its key."""
        return "off" if name in self.forced else "auto"

    def step(self, name: str, key: str, done: bool, work: Callable[[], str]) -> None:
        skip = done and name not in self.forced
        start = time.perf_counter()
        summary = self.records.get(name, {}).get("summary", "") if skip else work()
        seconds = 0.0 if skip else time.perf_counter() - start
        if not skip:
            self.records[name] = {"key": key, "seconds": seconds, "summary": summary}
            if dist.is_main():
                write_json(self.run.root / "run.json", {
                    "stages": self.records, "preset": self.preset_name,
                    **({"command": self.command} if self.command else {}),
                    "config": to_dict(self.config), "data": self.dataset.describe(),
                    "data_dir": self.dataset.origin, "environment": dist.environment()})
        dist.barrier()  # rank 0 wrote the stage's files; every rank may read them now
        if self.on_stage and dist.is_main():
            self.on_stage(StageEvent(name, skip, seconds, summary))

    def recorded(self, name: str, key: str, *paths: Path) -> bool:
        return self.records.get(name, {}).get("key") == key and all(p.exists() for p in paths)

    @property
    def sets(self) -> list[str]:
        """Random, VAE prior, VAE reconstructions of test, each diffusion sampler."""
        return ["random", "vae-prior", "vae-reconstruction", *self.config.sampling.samplers]

    # ------------------------------------------------------------ each stage's work

    @property
    def watch(self) -> RunWatch:
        return RunWatch(self.config.monitor, self.run, self.config.sampling)

    def classifier(self) -> str:
        c = self.config
        return stages.train_classifier(
            self.dataset, self.run, c.classifier, c.classifier_train, device=self.device,
            resume=self.resume("classifier"), progress=self.progress,
            watch=self.watch).summary()

    def vae(self) -> str:
        c = self.config
        return stages.train_vae(self.dataset, self.run, c.vae, c.vae_train, device=self.device,
                                resume=self.resume("vae"), progress=self.progress,
                                augment=c.augment, watch=self.watch).summary()

    def encode(self) -> str:
        c = self.config
        stages.encode(self.dataset, self.run, c.latent_mode, c.latent_norm, device=self.device,
                      seed=c.vae_train.seed, augment=c.augment)
        return "latents cached"

    def diffusion(self) -> str:
        c = self.config
        watch = self.watch
        if c.monitor.samples and c.monitor.score_samples:  # the reference the evaluation uses
            watch.scorer = Scorer(*scores.reference(self.dataset, self.run, self.device))
        return stages.train_diffusion(
            self.run, c.unet, c.schedule, c.objective, c.diffusion_train, device=self.device,
            resume=self.resume("diffusion"), progress=self.progress,
            train_limit=c.train_limit, watch=watch).summary()

    def guide(self) -> str:
        c = self.config
        return stages.train_diffusion(
            self.run, c.guide_unet, c.schedule, c.objective, c.guide_train, device=self.device,
            resume=self.resume("guide"), progress=self.progress, name="guide",
            train_limit=c.train_limit, watch=self.watch).summary()

    def sample(self) -> str:
        return _sample_all(self.run, self.dataset, self.config, self.device, self.progress)

    def evaluate(self) -> str:
        return scores.evaluate_all(self.run, self.dataset, self.sets,
                                   self.config.eval_samples, self.device,
                                   per_class=bool(self.config.unet.num_classes),
                                   train_limit=self.config.train_limit)

    def report(self) -> str:
        return _report(self.run, self.dataset, self.config, self.preset_name, self.records)


def run_pipeline(config: RunConfig, run_root: Path, dataset: Dataset, *,
                 device: torch.device, force: tuple[str, ...] = (), progress: bool = True,
                 preset_name: str = "custom", on_stage: Callable[[StageEvent], None] | None = None,
                 command: str = "") -> dict[str, Any]:
    """Run (or skip) every stage; returns the metrics written to metrics.json. `command`:
    the command line to record in run.json."""
    for name in force:
        if name not in STAGES:
            raise UsageError(f"--force: unknown stage {name!r} (choose from {', '.join(STAGES)})")
    run = RunDir(run_root)
    RunWatch(config.monitor, run, config.sampling).check(TRAINED_STAGES)
    r = _Run(config, run, dataset, device, progress,
             forced={s for name in force for s in DOWNSTREAM[name]}, preset_name=preset_name,
             on_stage=on_stage, records=_manifest(run)["stages"], command=command)
    c = config

    key = keys.model_key(c.classifier, c.classifier_train, dataset.content_hash).digest
    r.step("classifier", key, _made_with(run.model("classifier"), "classifier", key),
           r.classifier)
    key = keys.model_key(c.vae, c.vae_train, dataset.content_hash, c.augment).digest
    r.step("vae", key, _made_with(run.model("vae"), "vae", key), r.vae)

    vae_hash = checkpoint.model_hash_at(run.model("vae"), "vae")
    key = keys.latents_key(vae_hash, c.latent_mode, c.latent_norm, c.vae_train.seed,
                           c.augment).digest
    # A conditional denoiser needs the labels, which caches made before them lack.
    encoded = _made_with(run.latents, "latents", key) and (
        not c.unet.num_classes or latents.has_labels(run.latents))
    r.step("encode", key, encoded, r.encode)

    latents_hash = checkpoint.load(run.latents, kind="latents")[1]["sha256"]
    key = keys.diffusion_key(c.unet, c.schedule, c.objective, c.diffusion_train,
                             latents_hash, c.train_limit).digest
    # A denoiser of an earlier release lacks its data mean (denoiser.start): trained again, to
    # the same weights.
    made = _made_with(run.model("diffusion"), "unet", key, "data_mean")
    r.step("diffusion", key, made, r.diffusion)

    guide_hash = None
    if c.guide.channels:  # autoguidance's guide: the same stage, a smaller UNet, fewer steps
        key = keys.diffusion_key(c.guide_unet, c.schedule, c.objective, c.guide_train,
                                 latents_hash, c.train_limit).digest
        r.step("guide", key, _made_with(run.model("guide"), "unet", key, "data_mean"), r.guide)
        guide_hash = checkpoint.model_hash_at(run.model("guide"), "unet")

    diffusion_hash = checkpoint.model_hash_at(run.model("diffusion"), "unet")
    sample_key = keys.samples_key(
        vae_hash, diffusion_hash, c.sampling, c.eval_samples, c.objective.kind,
        guide_hash if c.sampling.by_guide else None).digest
    r.step("sample", sample_key, r.recorded("sample", sample_key, *map(run.samples, r.sets)),
           r.sample)

    classifier_hash = checkpoint.model_hash_at(run.model("classifier"), "classifier")
    key = keys.evaluation_key(sample_key, classifier_hash).digest
    metrics_path = run.root / "metrics.json"
    r.step("evaluate", key,
           r.recorded("evaluate", key) and _has_checks(read_metrics(metrics_path)), r.evaluate)
    key = keys.report_key(key, _sweep_results(run), _guidance_results(run)).digest
    r.step("report", key, r.recorded("report", key, run.root / "report.md",
                                     run.root / "report.html"), r.report)
    return read_metrics(metrics_path) or {}  # rank 0 wrote a valid one in the step above


def _has_checks(metrics: dict[str, Any] | None) -> bool:
    """Whether a metrics.json holds the evaluation's checks (older ones are scored again)."""
    return metrics is not None and "warnings" in metrics


def _sweep_results(run: RunDir) -> dict[str, Any] | None:
    """R/sweep.json of `ldm sweep`, when there is one."""
    return sweeps.load(run.root / "sweep.json")


def _guidance_results(run: RunDir) -> dict[str, Any] | None:
    """R/guidance.json of `ldm sweep --guidance`, when there is one."""
    return sweeps.load_guidance(run.root / "guidance.json")


def refresh_report(run_root: Path, dataset: Dataset) -> bool:
    """Write the report of a finished run again (after a sweep); False when there is none."""
    run = RunDir(run_root)
    manifest = _manifest(run)
    if "report" not in manifest["stages"] or "config" not in manifest:
        return False
    config = from_dict(RunConfig, manifest["config"])
    _report(run, dataset, config, manifest.get("preset", "custom"), manifest["stages"])
    return True


def _sample_all(run: RunDir, dataset: Dataset, c: RunConfig,
                device: torch.device, progress: bool) -> str:
    s = c.sampling
    sets: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    sets["random"] = (random_images(dataset.train_images, c.eval_samples, s.seed), None)
    sets["vae-prior"] = (generation.generate(run, "vae", c.eval_samples, s.seed, device=device,
                                             batch_size=s.batch_size, progress=progress,
                                             precision=s.precision), None)
    reconstructions, test_labels = generation.reconstruct(dataset, run, "test", device=device,
                                                          precision=s.precision)
    if not c.classifier.data_classes:  # labels the feature network cannot check
        test_labels = None
    sets["vae-reconstruction"] = scores.scored_subset(reconstructions, test_labels,
                                                      c.eval_samples)
    levels = levels_only(c.objective, c.schedule)  # the denoiser's levels, for each set's NFE
    made: dict[str, dict[str, str | int | float]] = {}  # how each diffusion set was made
    seconds: dict[str, float] = {}
    for request in s.requests:
        start = time.perf_counter()
        sets[request.spec] = (
            generation.generate(run, "diffusion", s.num_samples, s.seed, request=request,
                                device=device, batch_size=s.batch_size, progress=progress,
                                precision=s.precision),
            request.labels_of(range(s.num_samples), c.unet.num_classes))
        seconds[request.spec] = time.perf_counter() - start
        made[request.spec] = request.record(request.nfe(levels))
    if dist.is_main():
        for name, (images, labels) in sets.items():
            save_samples(run.samples(name), images, labels, **made.get(name, {}))
        write_json(run.root / "samples" / "timings.json",
                   {k: {"seconds": v, "nfe": made[k]["nfe"],
                        "samples_per_second": s.num_samples / v} for k, v in seconds.items()})
    return ", ".join(f"{k}: {s.num_samples / v:.0f} samples/s (NFE {made[k]['nfe']})"
                     for k, v in seconds.items())


def _report(run: RunDir, dataset: Dataset, c: RunConfig, preset_name: str,
            records: dict) -> str:
    if not dist.is_main():
        return "written by rank 0"
    figures = run.figures
    models = [("classifier", "classifier"), ("vae", "vae"), ("diffusion", "unet")]
    headers = {name: checkpoint.load(run.model(name), kind=kind)[1]
               for name, kind in models + ([("guide", "unet")] if c.guide.channels else [])}
    plots.save_losses({n: h.get("history", []) for n, h in headers.items()},
                      figures / "losses.png")
    save_figures(run, c.vae.image_size)
    schedules = {kind: NoiseSchedule.from_config(ScheduleConfig(
        kind=kind, num_timesteps=c.schedule.num_timesteps)).alphas_cumprod.numpy()
        for kind in ("linear", "cosine")}
    plots.save_schedules(schedules, figures / "schedules.png")
    metrics = read_metrics(run.root / "metrics.json") or {}  # the evaluate stage wrote it
    generated = [k for k in scored_sets(metrics) if k != "validation"]
    if metrics["validation"]["class_histogram"] is not None:  # the feature network has classes
        plots.save_class_histograms({k: metrics[k]["class_histogram"] for k in generated},
                                    dataset.class_names, figures / "class_histogram.png")
    reconstructions, _ = load_samples(run.samples("vae-reconstruction"))
    originals = scores.scored_subset(dataset.test_images, None, c.eval_samples)[0]
    plots.save_reconstructions(originals, reconstructions, figures / "reconstructions.png")
    if "memorisation" in metrics:  # the set's first samples beside their nearest training images
        m = metrics["memorisation"]
        images, _ = load_samples(run.samples(m["set"]))
        plots.save_nearest(images, dataset.train_images, m["shown_neighbours"],
                           figures / "nearest.png")
    if c.unet.num_classes:  # one row per requested class, from the first sampler's set
        images, labels = load_samples(run.samples(c.sampling.samplers[0]))
        if labels is not None:
            plots.save_class_grid(images, labels, c.unet.num_classes, figures / "class_grid.png")
    hashes = {name: checkpoint.model_hash_of(header) for name, header in headers.items()}
    guided = c.sampling.requests[0].describe()
    report.write(run.root, report.sections(
        run.root, to_dict(c), preset_name, metrics, records, hashes, guided,
        _sweep_results(run), _guidance_results(run), dataset=dataset.describe()))
    return "report.md, report.html"
