"""`run`: the whole experiment from Python, as `ldm run` runs it (the command builds on the same
functions): the run config from a preset, a config file and overrides, scaled to the data set's
images and checked against it, then every stage under the run directory's lock."""

from __future__ import annotations

import dataclasses
import os
import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import distributed as dist
from ..data import Dataset, load_dataset
from ..data.images import SPLITS
from ..errors import UsageError
from ..run import recipe
from ..run.config import (
    CONDITIONAL_GUIDANCE,
    ImageShape,
    RunConfig,
    conditional,
    for_images,
    image_shape_of,
    with_objective_kind,
)
from ..run.pipeline import STAGES, StageEvent, run_pipeline
from ..run.precision import check_device, parse
from ..run.presets import preset as preset_config
from ..run.rundir import run_dir_lock
from ..run.sweeps import MIN_SAMPLES


@dataclass(frozen=True)
class RunOptions:
    """What makes a run's config, named as `ldm run`'s options: the preset, then the config
    file, seed, objective, conditioning, augmentation, image size and precision, last `sets`
    (KEY=VALUE, as --set)."""

    preset: str = "default"
    config: Path | None = None
    seed: int | None = None
    objective: str | None = None
    conditional: bool = False
    guidance: float | None = None  # with `conditional`: the sets' guidance scale
    augment: str | None = None
    image_size: int | None = None
    sets: tuple[str, ...] = ()
    precision: str | None = None  # every training stage's and the sets' (run/precision.py)

    def resolve(self, shape: ImageShape | None = None) -> RunConfig:
        """The run config for images of `shape` (None: the preset's own); UsageError for a bad
        value or a config that does not fit the data set."""
        r = dataclasses.replace
        config = for_images(preset_config(self.preset), shape or ImageShape())
        if self.config is not None:
            config = recipe.load(self.config, config)
        if self.seed is not None:
            config = r(config, classifier_train=r(config.classifier_train, seed=self.seed),
                       vae_train=r(config.vae_train, seed=self.seed),
                       diffusion_train=r(config.diffusion_train, seed=self.seed),
                       sampling=r(config.sampling, seed=self.seed + 1))
        if self.objective is not None:
            config = r(config, objective=with_objective_kind(config.objective, self.objective))
        if self.image_size is not None:
            config = r(config, data=r(config.data, image_size=self.image_size))
        if self.augment is not None:  # RunConfig checks the value
            config = r(config, augment=self.augment)
        if self.precision is not None:
            p = parse(self.precision)
            config = r(config, classifier_train=r(config.classifier_train, precision=p),
                       vae_train=r(config.vae_train, precision=p),
                       diffusion_train=r(config.diffusion_train, precision=p),  # and the guide
                       sampling=r(config.sampling, precision=p))
        if self.conditional:
            scale = CONDITIONAL_GUIDANCE if self.guidance is None else self.guidance
            config = conditional(config, scale)
        elif self.guidance is not None:
            raise UsageError("--guidance needs --conditional (an unconditional model has "
                             "nothing to guide)")
        config = recipe.apply_sets(config, self.sets)
        made_for = image_shape_of(config.classifier)
        if shape is not None and made_for != shape:
            raise UsageError(f"the config is for images {made_for} but the data set has "
                             f"{shape}; print one for it with `ldm config --data-dir ...`")
        return config

    @property
    def name(self) -> str:
        """The preset, config file and --set values, for the report and run.json."""
        return " + ".join([self.preset, *([str(self.config)] if self.config else []),
                           *(f"--set {item}" for item in self.sets)])

    def argv(self) -> list[str]:
        """These options as `ldm run` takes them."""
        named = [("--preset", self.preset), ("--config", self.config), ("--seed", self.seed),
                 ("--objective", self.objective), ("--guidance", self.guidance),
                 ("--augment", self.augment), ("--image-size", self.image_size),
                 ("--precision", self.precision)]
        words = [w for option, value in named if value is not None
                 for w in (option, str(value))]
        words += ["--conditional"] if self.conditional else []
        return words + [w for item in self.sets for w in ("--set", item)]


def override_items(overrides: Mapping[str, Any] | None) -> tuple[str, ...]:
    """{"unet.channels": (32, 64), "diffusion_train.lr": 4e-3} as --set's KEY=VALUE items."""
    def text(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, (list, tuple)):
            return ",".join(map(text, value))
        return str(value)

    return tuple(f"{key}={text(value)}" for key, value in (overrides or {}).items())


def shape_of(dataset: Dataset) -> ImageShape:
    """What the models must take; a single class is no classes to learn."""
    classes = dataset.num_classes if dataset.num_classes >= 2 else 0
    return ImageShape(dataset.image_size, dataset.channels, classes)


def check_batches(config: RunConfig, dataset: Dataset, *stages: str) -> None:
    """Every training batch fits the data, before any stage runs (UsageError naming the key)."""
    n = len(dataset.train_images)
    for name in stages:
        batch = getattr(config, f"{name}_train").batch_size
        if batch > n:
            raise UsageError(f"{name}_train.batch_size {batch} is larger than the {n} training "
                             f"images of {dataset.name}")


def check_splits(dataset: Dataset) -> None:
    """Each split holds the MIN_SAMPLES images `ldm run` scores against (the test split: every
    score defined) and looks up (the training split: nearest images), before any stage runs."""
    for split in SPLITS:
        n = len(dataset.split(split)[0])
        if n < MIN_SAMPLES:
            raise UsageError(f"the {split} split of {dataset.name} holds {n} image"
                             f"{'s' if n != 1 else ''}; ldm run needs at least {MIN_SAMPLES} in "
                             "each split (every score defined): give it more images")


def check_force(force: Sequence[str]) -> None:
    for name in force:
        if name not in STAGES:
            raise UsageError(f"--force: unknown stage {name!r} (choose from "
                             f"{', '.join(STAGES)})")


def config_for(options: RunOptions, dataset: Dataset) -> RunConfig:
    """The run config for `dataset`, every training batch and split checked against it."""
    config = options.resolve(shape_of(dataset))
    check_batches(config, dataset, "classifier", "vae", "diffusion")
    check_splits(dataset)
    return config


def run_stages(config: RunConfig, run_dir: Path, dataset: Dataset, options: RunOptions, *,
               device: torch.device, force: Sequence[str] = (), progress: bool = False,
               on_stage: Callable[[StageEvent], None] | None = None, command: str = ""
               ) -> dict[str, Any]:
    """Every stage of a resolved run (`config_for`) under the run directory's lock; the
    metrics of R/metrics.json."""
    for precision in sorted(config.precisions):  # fp16 on the CPU: refused before any work
        check_device(precision, device)
    with run_dir_lock(run_dir, enabled=dist.is_main()):
        if dist.is_main():  # beside run.json's resolved config
            recipe.save_copy(options.config, run_dir)
        return run_pipeline(config, run_dir, dataset, device=device, force=tuple(force),
                            progress=progress, preset_name=options.name, on_stage=on_stage,
                            command=command)


def run(run_dir: str | os.PathLike[str], data: str | os.PathLike[str] | None = None, *,
        dataset: str | None = None, preset: str = "default",
        config: str | os.PathLike[str] | None = None,
        overrides: Mapping[str, Any] | None = None, seed: int | None = None,
        objective: str | None = None, conditional: bool = False, guidance: float | None = None,
        augment: str | None = None, image_size: int | None = None,
        precision: str | None = None, force: Sequence[str] = (), device: str = "auto",
        progress: bool = False,
        on_stage: Callable[[StageEvent], None] | None = None) -> dict[str, Any]:
    """Train, sample, score and report into `run_dir`, as `ldm run` with the same options
    does; returns the metrics (R/metrics.json). Stages already done under the same config are
    skipped, so a second call is a no-op.

    `data`: an IDX directory, a folder of images or an .npz (`dataset` names a registered
    one, already downloaded: `ldm data download`); `overrides`: config keys, as `--set`
    (`{"unet.channels": (32, 64)}`); `precision`: "fp32", "bf16" or "fp16" (CUDA only) for
    every training stage and the sets; `force`: stages to redo, with what depends on them.
    """
    options = RunOptions(preset, None if config is None else Path(config), seed, objective,
                         conditional, guidance, augment, image_size, override_items(overrides),
                         precision)
    prepare = options.resolve().data  # every value, before the data is read
    check_force(force)
    loaded = load_dataset(data, dataset, prepare)
    resolved = config_for(options, loaded)
    where = ["--data-dir", str(data)] if data is not None else []
    where += ["--dataset", dataset] if dataset is not None else []
    command = shlex.join(["ldm", "run", *where, "--run-dir", str(run_dir), *options.argv()])
    resolved_device = dist.resolve_device(device)
    dist.init(resolved_device)
    return run_stages(resolved, Path(run_dir), loaded, options, device=resolved_device,
                      force=force, progress=progress, on_stage=on_stage, command=command)
