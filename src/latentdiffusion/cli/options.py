"""What a command's arguments mean: the run config, training configs and sampling request they
make, each checked before any file is touched."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import torch

from ..api.experiment import RunOptions, check_force
from ..api.exports import check_out as check_export_out
from ..api.pipeline import sampling_request as api_sampling_request
from ..data.prepare import PrepareConfig
from ..diffusion import SamplingRequest
from ..diffusion.guidance import Guidance
from ..diffusion.schedule import ScheduleConfig
from ..errors import UsageError
from ..evaluation.image_files import is_png_folder
from ..evaluation.samples import is_samples_file
from ..files import load_small_json
from ..models.classifier import ClassifierConfig
from ..models.vae import VAEConfig
from ..run import checkpoint
from ..run.config import ImageShape, RunConfig, SamplingConfig, image_shape_of
from ..run.precision import Precision, check_device, parse
from ..run.rundir import RunDir, check_replaceable, read_manifest, recorded_preparation
from ..run.sweeps import MIN_SAMPLES, pairs
from ..schema import MAX_SAMPLES, from_dict, parse_number
from .parser import DEFAULT_SAMPLER, monitor_sets


def _earlier_samples(path: Path) -> bool:
    """An earlier `ldm sample --out`: a samples file, or a grid beside one."""
    npz = path.with_suffix(".npz")
    return is_samples_file(npz)


def _earlier_evaluation(path: Path) -> bool:
    """An earlier `ldm evaluate --out`: a small regular file of its JSON (never read whole
    when it is a device, pipe or a big file)."""
    try:
        found = load_small_json(path)
    except (OSError, ValueError):
        return False
    return isinstance(found, dict) and ("fid" in found or "validation" in found)


def check_out(args: argparse.Namespace) -> None:
    """`--out` of `ldm sample` (and its .png grid) or `ldm evaluate` replaces only an earlier
    output of the same command: never a data set, a run's file, an image or anything else the
    user has (UsageError)."""
    if args.command == "sample" and args.format == "png":
        check_replaceable(args.out, "samples folder", is_png_folder)
    elif args.command == "sample":
        if args.out.suffix != ".npz":  # the grid goes beside it as .png: the same name
            raise UsageError(f"--out must end in .npz (the samples file; a .png grid is written "
                             f"beside it; --format png writes a folder), got '{args.out}'")
        check_replaceable(args.out, "samples file", _earlier_samples)
        grid = args.out.with_suffix(".png")
        check_replaceable(grid, "samples grid", _earlier_samples,
                          label=f"{grid} (the grid of --out {args.out})")
    elif args.command == "evaluate" and args.out is not None:
        check_replaceable(args.out, "evaluation file", _earlier_evaluation)
    elif args.command == "export":
        check_export_out(args.out)


def prepare_of(args: argparse.Namespace) -> PrepareConfig:
    """How the command prepares its data: the run config's [data] (its file, --image-size,
    --set data.KEY) for `ldm run`, `ldm train` and `ldm config`; for the others --image-size,
    or without it the settings the run directory's run.json records. UsageError for a bad
    value."""
    if args.command in ("run", "train", "config"):
        return run_config(args).data
    size = getattr(args, "image_size", None)
    if size is None and getattr(args, "run_dir", None) is not None:
        recorded = recorded_preparation(read_manifest(Path(args.run_dir) / "run.json"))
        if recorded is not None:
            return recorded
    return PrepareConfig(image_size=size or 0)


def run_options(args: argparse.Namespace) -> RunOptions:
    """The options of `ldm run`, `ldm train` and `ldm config` that make the run config."""
    return RunOptions(args.preset, args.config, args.seed, args.objective, args.conditional,
                      getattr(args, "guidance", None), args.augment,
                      getattr(args, "image_size", None), (*args.set, *monitor_sets(args)),
                      args.precision)


def run_config(args: argparse.Namespace, shape: ImageShape | None = None) -> RunConfig:
    """The preset scaled to the data set's images (`shape`), then the --config file, --seed,
    --objective, --conditional and last --set (`ldm run`, `ldm train`, `ldm config`);
    UsageError for a bad value or a config that does not fit the data set."""
    return run_options(args).resolve(shape)


def recipe_name(args: argparse.Namespace) -> str:
    """The preset, config file and --set values of a run, for its report and run.json."""
    return run_options(args).name


def train_configs(args: argparse.Namespace, shape: ImageShape | None = None
                  ) -> tuple[RunConfig, Any, ScheduleConfig]:
    """The preset with the command's overrides; raises UsageError for a bad value."""
    if args.model not in ("diffusion", "guide"):  # options the classifier and VAE would ignore
        for option in ("schedule", "objective", "conditional"):
            if getattr(args, option):
                raise UsageError(f"--{option} is an option of `ldm train diffusion`, not of "
                                 f"`ldm train {args.model}`")
    if args.model == "guide":
        check_guide_run(args)
    config = run_config(args, shape)
    if args.model == "guide" and not config.guide.channels:
        raise UsageError("this config has no guide; give it one with --set guide.channels=16,32")
    field = {"classifier": "classifier_train", "vae": "vae_train",
             "diffusion": "diffusion_train", "guide": "guide_train"}[args.model]
    overrides = {k: v for k, v in (("steps", args.steps), ("batch_size", args.batch_size),
                                   ("lr", args.lr), ("checkpoint_every", args.checkpoint_every),
                                   ("checkpoint_seconds", args.checkpoint_seconds))
                 if v is not None}
    train_config = dataclasses.replace(getattr(config, field), **overrides)
    schedule = config.schedule
    if args.schedule:
        schedule = dataclasses.replace(schedule, kind=args.schedule)
    return config, train_config, schedule


def check_guide_run(args: argparse.Namespace) -> None:
    """`ldm train guide` is for an unconditional denoiser: a class-conditional one has
    classifier-free guidance and no guide (its config refuses one, so no advice could help)."""
    run = RunDir(args.run_dir)
    if args.conditional:
        which = "--conditional asks for a class-conditional one"
    elif _conditional_denoiser(run):
        which = f"{run.model('diffusion')} is class-conditional"
    else:
        return
    raise UsageError(f"`ldm train guide` trains the guide of an unconditional model, and {which}: "
                     "it has classifier-free guidance (--guidance with --labels), no guide")


def _conditional_denoiser(run: RunDir) -> bool:
    """Whether the run's denoiser file is class-conditional (False when there is none yet)."""
    header = checkpoint.peek(run.model("diffusion"))
    return header is not None and int(header.get("config", {}).get("num_classes", 0)) > 0


def check_command(args: argparse.Namespace) -> None:
    """Every value of the command, before the run directory is created or locked."""
    prepare_of(args)
    if args.command == "train":
        train_configs(args)
    elif args.command == "encode":
        RunConfig(latent_mode=args.latent_mode, latent_norm=args.latent_norm,
                  augment=args.augment)
    elif args.command == "run":
        run_config(args)
        check_force(args.force)
    elif args.command == "sample" and not args.reconstruct:
        sampling_request(args)
    elif args.command == "sample":
        _diffusion_options_only(args)
    if args.command == "sample":
        parse(args.precision)
    if args.command in ("sample", "sweep") and args.num_samples > MAX_SAMPLES:
        raise UsageError(f"-n must be at most {MAX_SAMPLES}, got {args.num_samples}")
    check_out(args)
    if args.command == "sweep":
        guidance = Guidance(args.autoguidance, "guide")
        specs = pairs(args.samplers.split(","), integers(args.nfe, "--nfe"), guidance)
        if args.num_samples < MIN_SAMPLES:
            raise UsageError(f"a sweep needs -n of at least {MIN_SAMPLES} (every score defined)")
        if args.guidance is not None:
            guidance_scales(args.guidance, specs)
            if guidance.by_guide:
                raise UsageError("--guidance sweeps a conditional model; --autoguidance guides "
                                 "an unconditional one: one at a time")
        SamplingConfig(autoguidance=args.autoguidance)


def check_precisions(args: argparse.Namespace, device: torch.device) -> None:
    """Every precision the command computes in runs on `device` (UsageError: fp16 on the CPU),
    checked once its config is resolved and before the run directory is touched."""
    wanted: set[Precision] = set()
    if args.command == "run":
        wanted = args.resolved.precisions
    elif args.command == "train":
        wanted = {args.resolved[1].precision}
    elif args.command == "sample":
        wanted = {parse(args.precision)}
    for precision in sorted(wanted):
        check_device(precision, device)


def sampling_request(args: argparse.Namespace) -> SamplingRequest:
    """`ldm sample`'s options as one request (the API's, `Pipeline.sample`'s); the sampler's
    name, steps, variance, eta, the labels and the scales are checked before any work."""
    if args.model != "diffusion":
        _diffusion_options_only(args)
    return api_sampling_request(args.sampler or DEFAULT_SAMPLER, steps=args.steps,
                                variance=args.variance, eta=args.eta, labels=args.labels,
                                guidance=args.guidance, autoguidance=args.autoguidance)


def _diffusion_options_only(args: argparse.Namespace) -> None:
    """`ldm sample` of the VAE takes no labels, no guidance and no sampler options."""
    if args.labels or args.guidance != 1.0 or args.autoguidance != 1.0:
        raise UsageError("--labels, --guidance and --autoguidance work with --model diffusion")
    if any(getattr(args, o) is not None for o in ("sampler", "steps", "variance", "eta")):
        raise UsageError("--sampler, --steps, --variance and --eta work with --model diffusion")


def guidance_scales(text: str, specs: list[str]) -> list[float]:
    if len(specs) != 1:
        raise UsageError(f"--guidance sweeps one sampler at one NFE, got {len(specs)} pairs "
                         f"({', '.join(specs)})")
    try:
        scales = [parse_number(v, float) for v in text.split(",")]
    except ValueError:
        raise UsageError(f"--guidance: expected comma-separated numbers, got {text!r}") from None
    for scale in scales:
        SamplingConfig(samplers=tuple(specs), labels="balanced", guidance=scale)
    return scales


def integers(text: str, option: str) -> list[int]:
    try:
        return [parse_number(v, int) for v in text.split(",")]
    except ValueError:
        raise UsageError(f"{option}: expected comma-separated integers, got {text!r}") from None


def run_shape(run: RunDir) -> ImageShape:
    """The images and classes of a run's data set, from its classifier file, else its VAE and
    latents files: what `ldm train diffusion`, which reads no images, builds its config for."""
    header = checkpoint.peek(run.model("classifier"))
    if header is not None and header.get("kind") == "classifier":
        return image_shape_of(from_dict(ClassifierConfig, header["config"]))
    header = checkpoint.peek(run.model("vae"))
    if header is None or header.get("kind") != "vae":
        return ImageShape()  # no models yet: the preset as it is (its own error will follow)
    vae = from_dict(VAEConfig, header["config"])
    latents = checkpoint.peek(run.latents) or {}
    classes = int(latents.get("num_classes", 0))  # as `ldm encode` found them
    return ImageShape(vae.image_size, vae.image_channels, classes if classes >= 2 else 0)

