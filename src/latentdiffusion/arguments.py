"""What the command line means: the `ldm` parser, its argument types, and the run config a
command's arguments make (validated before any file is touched)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any, NoReturn

from . import data, recipe
from .config import (
    CONDITIONAL_GUIDANCE,
    MAX_SAMPLES,
    PRESETS,
    ImageShape,
    RunConfig,
    SamplingConfig,
    ScheduleConfig,
    conditional,
    for_images,
    image_shape_of,
    preset,
    with_objective_kind,
)
from .diffusion import SAMPLERS, parse_sampler
from .errors import DataError, UsageError
from .fileio import BAD_NPZ, npz_headers

DESCRIPTION = ("Train and evaluate a latent diffusion model: classifier, VAE, denoiser, samples, "
               "FID report. `ldm run` does it all.")
EPILOG = """examples:
  ldm run --data-dir ~/mnist --run-dir runs/demo --preset quick
  ldm train vae --data-dir ~/mnist --run-dir runs/demo
  ldm sample --run-dir runs/demo --model diffusion --sampler ddim --steps 50 -n 1000 --out d.npz
  ldm evaluate --data-dir ~/mnist --run-dir runs/demo --samples d.npz
  ldm sweep --data-dir ~/mnist --run-dir runs/demo --samplers heun,dpmpp-2m --nfe 5,10,20 -n 2000
  ldm config --preset quick > my.toml      # edit it, then:
  ldm run --data-dir ~/mnist --run-dir runs/mine --config my.toml --set diffusion_train.lr=4e-3
  ldm run --data-dir ~/mnist --run-dir runs/cond --conditional
  ldm sample --run-dir runs/cond --model diffusion --labels 7 --guidance 2 -n 100 --out 7.npz
  ldm sweep --data-dir ~/mnist --run-dir runs/cond --samplers ddpm --nfe 25 --guidance 1,2,3
  torchrun --standalone --nproc_per_node=2 -m latentdiffusion train diffusion --run-dir runs/demo
"""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit code 2
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


MAX_SEED = 2**63  # torch and numpy generators take 64-bit seeds; signed keeps every API happy


def seed_value(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= value < MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be in 0 .. 2**63 - 1, got {value}")
    return value


def npz_out(text: str) -> Path:
    # The grid goes beside it as .png: any other name would lose the samples to their grid.
    if not text.endswith(".npz"):
        raise argparse.ArgumentTypeError(f"must end in .npz (the samples file; a .png grid is "
                                         f"written beside it), got {text!r}")
    return Path(text)


def json_out(text: str) -> Path:
    if not text.endswith(".json"):
        raise argparse.ArgumentTypeError(f"must end in .json, got {text!r}")
    return Path(text)


# what a samples file holds
SAMPLES_KEYS = {"images", "labels", "sampler", "nfe", "guidance", "autoguidance"}


def check_replaceable(path: Path, kind: str) -> None:
    """An existing --out may only be an earlier output of the same command: never a data set,
    a run's record or any other file the user has (UsageError)."""
    if not path.exists() and not path.is_symlink():
        return
    ours = False
    try:
        if kind == "samples":
            ours = path.is_file() and set(npz_headers(path)) <= SAMPLES_KEYS
        else:
            found = json.loads(path.read_text())
            ours = isinstance(found, dict) and ("fid" in found or "validation" in found)
    except (OSError, ValueError, DataError, *BAD_NPZ):
        ours = False
    if not ours:
        raise UsageError(f"--out {path} exists and is not an earlier {kind} file of ldm; "
                         "it is left as it is: pick another --out")


def _common(p: argparse.ArgumentParser, data_dir: bool = True) -> None:
    if data_dir:
        _data_options(p)
    p.add_argument("--run-dir", metavar="DIR", default="runs/default", type=Path,
                   help="where stage outputs live")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--quiet", action="store_true", help="no progress bars or stage lines")


def _data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", metavar="PATH",
                   help="the data set: a directory with the four IDX files, a folder of "
                        "images (one subfolder per class, or flat when unlabelled) or an "
                        f".npz (default: ${data.DATA_DIR_ENV} or the user cache)")
    p.add_argument("--dataset", metavar="NAME",
                   help=f"a registered IDX data set ({', '.join(data.DATASETS)}); "
                        "downloaded into the user cache when no --data-dir holds it")


def _recipe_files(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, metavar="FILE",
                   help="a run config file (.toml or .json, as `ldm config` prints it); keys it "
                        "leaves out keep --preset's values; --seed, --objective, --conditional "
                        "and --set apply on top of it")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="set one value after the preset, --config and the other options, e.g. "
                        "unet.channels=32,64 or diffusion_train.lr=4e-3 (repeatable; "
                        "`ldm config` lists every key)")


def _recipe(p: argparse.ArgumentParser) -> None:
    """The options that make `ldm run`'s config (and `ldm config`'s, which prints it)."""
    p.add_argument("--preset", default="default",
                   help=f"{', '.join(PRESETS)}; with --config, the values the file leaves out")
    _recipe_files(p)
    p.add_argument("--seed", type=seed_value, help="seed every stage (default: the preset's)")
    p.add_argument("--objective", help="the denoiser's objective: vp (the post's) or flow "
                                       "(flow matching; default: the preset's)")
    p.add_argument("--conditional", action="store_true",
                   help="a class-conditional denoiser; its sets are balanced over the "
                        "classes and guided")
    p.add_argument("--guidance", type=float, metavar="S",
                   help=f"with --conditional: the sets' guidance scale (default "
                        f"{CONDITIONAL_GUIDANCE:g})")


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = Parser(prog="ldm", description=DESCRIPTION, epilog=EPILOG,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = sub.add_parser("data", help="download or verify a dataset")
    data_sub = p.add_subparsers(dest="action", required=True, parser_class=Parser)
    q = data_sub.add_parser("download", formatter_class=fmt,
                            help="fetch a registered dataset's IDX files")
    q.add_argument("--dataset", default="mnist", help=", ".join(data.DATASETS))
    q.add_argument("--data-dir", metavar="DIR")
    q.add_argument("--quiet", action="store_true")
    q = data_sub.add_parser("verify",  # no defaults worth showing
                            help="check a dataset against its release, or describe any data")
    q.add_argument("--dataset", metavar="NAME",
                   help=f"check the IDX files' content against this release "
                        f"({', '.join(data.DATASETS)}); without it, print what --data-dir "
                        "holds (IDX files, a folder of images or an .npz) and its content hash")
    q.add_argument("--data-dir", metavar="PATH",
                   help="IDX directory, folder of images or .npz (default: "
                        f"${data.DATA_DIR_ENV} or the user cache)")
    q.add_argument("--quiet", action="store_true")

    p = sub.add_parser("train", help="train one model", formatter_class=fmt)
    p.add_argument("model", choices=("classifier", "vae", "diffusion", "guide"),
                   help="guide: autoguidance's smaller denoiser (the config's guide)")
    _common(p)
    p.add_argument("--preset", default="default", help=", ".join(PRESETS))
    p.add_argument("--epochs", type=positive)
    p.add_argument("--batch-size", type=positive, help="global batch size")
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=seed_value)
    p.add_argument("--checkpoint-every", type=positive, metavar="STEPS")
    p.add_argument("--checkpoint-seconds", type=positive_float, metavar="SECONDS",
                   help="also checkpoint after this much wall time (preset: 60)")
    p.add_argument("--schedule", help="diffusion only: linear or cosine")
    p.add_argument("--objective", help="diffusion only: vp (the post's) or flow (flow matching)")
    p.add_argument("--conditional", action="store_true",
                   help="diffusion only: a class-conditional denoiser (for --labels, --guidance)")
    _recipe_files(p)
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue the newest checkpoint made with the same config")
    again.add_argument("--force", action="store_true",
                       help="start over (the old model and checkpoints stay until replaced)")

    p = sub.add_parser("encode", help="cache the VAE latents of train and test",
                       formatter_class=fmt)
    _common(p)
    latents_default = preset("default")  # as `ldm run` encodes them
    p.add_argument("--latent-mode", default=latents_default.latent_mode,
                   help="mean (posterior mean) or sample")
    p.add_argument("--latent-norm", default=latents_default.latent_norm,
                   help="global (one 1/std factor) or channel (standardise each channel)")
    p.add_argument("--seed", type=seed_value, default=0)

    p = sub.add_parser("sample", help="generate images into a samples .npz", formatter_class=fmt)
    _common(p)
    p.add_argument("--model", required=True, choices=("vae", "diffusion"))
    p.add_argument("--sampler", default="ddim", help=f"{', '.join(SAMPLERS)}, or NAME-STEPS")
    p.add_argument("--steps", type=positive,
                   help="sampler steps (default: " + ", ".join(
                       f"{name} {spec.default_steps or 'all'}" for name, spec in SAMPLERS.items())
                   + ")")
    p.add_argument("--variance", help="ddpm only: beta_tilde (default) or beta")
    p.add_argument("--eta", type=float, help="ddim only: stochasticity in [0, 1] (default 0)")
    p.add_argument("-n", "--num-samples", type=positive, default=1000)
    p.add_argument("--seed", type=seed_value, default=0)
    p.add_argument("--batch-size", type=positive, default=500)
    p.add_argument("--reconstruct", metavar="SPLIT", help="vae only: reconstruct train or test")
    p.add_argument("--labels", default="", metavar="Y",
                   help="conditional diffusion only: a class index (7), a list cycled over "
                        "the samples (0,1,2) or 'balanced' (sample i draws class i mod K, of "
                        "the model's K); written into the .npz")
    p.add_argument("--guidance", type=float, default=1.0, metavar="S",
                   help="classifier-free guidance scale: 1 unguided, 0 unconditional, "
                        "> 1 closer to the label")
    p.add_argument("--autoguidance", type=float, default=1.0, metavar="S",
                   help="autoguidance scale with the run's guide (`ldm train guide`): 1 off, "
                        "> 1 guided")
    p.add_argument("--out", type=npz_out, required=True,
                   help="output .npz (a .png grid beside it)")

    p = sub.add_parser("evaluate", help="score a samples file (FID, KID, precision/recall)",
                       formatter_class=fmt)
    _common(p)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--samples", type=Path, metavar="FILE.npz")
    group.add_argument("--baselines", action="store_true", help="the Validation and Random rows")
    p.add_argument("--out", type=json_out, help="also write the JSON here (.json)")
    p.add_argument("--seed", type=seed_value, default=0)

    p = sub.add_parser("sweep", help="FID against model calls for several samplers",
                       formatter_class=fmt)
    _common(p)
    p.add_argument("--samplers", default=",".join(SAMPLERS), help="comma-separated names")
    p.add_argument("--nfe", default="5,10,20,50", help="comma-separated model-call budgets")
    p.add_argument("-n", "--num-samples", type=positive, default=10_000)
    p.add_argument("--seed", type=seed_value, default=1, help="the presets' sampling seed")
    p.add_argument("--batch-size", type=positive, default=500)
    p.add_argument("--guidance", metavar="S,S,..",
                   help="a conditional model's guidance scales, for one sampler and NFE: FID "
                        "and accuracy per scale (R/guidance.json, figures/guidance.png)")
    p.add_argument("--autoguidance", type=float, default=1.0, metavar="S",
                   help="sample every pair with the run's guide at this scale (1: off); --nfe "
                        "then counts the guide's calls too")

    p = sub.add_parser("run", help="the whole experiment and its report", formatter_class=fmt)
    _common(p)
    _recipe(p)
    p.add_argument("--force", action="append", default=[], metavar="STAGE",
                   help="redo STAGE and what depends on it (repeatable)")

    p = sub.add_parser("config", help="print the run config `ldm run` would run with the same "
                                      "options (TOML or JSON), to edit and pass to --config",
                       formatter_class=fmt)
    _recipe(p)
    p.add_argument("--format", choices=recipe.FORMATS, default="toml")
    _data_options(p)  # to scale the preset to a data set's images; MNIST's without
    return parser


def with_seed(config: RunConfig, seed: int | None) -> RunConfig:
    if seed is None:
        return config
    r = dataclasses.replace
    return r(config, classifier_train=r(config.classifier_train, seed=seed),
             vae_train=r(config.vae_train, seed=seed),
             diffusion_train=r(config.diffusion_train, seed=seed),
             sampling=r(config.sampling, seed=seed + 1))


def with_objective(config: RunConfig, kind: str | None) -> RunConfig:
    if kind is None:
        return config
    return dataclasses.replace(config, objective=with_objective_kind(config.objective, kind))


def with_conditional(config: RunConfig, args: argparse.Namespace) -> RunConfig:
    guidance = getattr(args, "guidance", None)
    if not args.conditional:
        if guidance is not None:
            raise UsageError("--guidance needs --conditional (an unconditional model has "
                             "nothing to guide)")
        return config
    return conditional(config, CONDITIONAL_GUIDANCE if guidance is None else guidance)


def run_config(args: argparse.Namespace, shape: ImageShape | None = None) -> RunConfig:
    """The preset scaled to the data set's images (`shape`), then the --config file, --seed,
    --objective, --conditional and last --set (`ldm run`, `ldm train`, `ldm config`);
    UsageError for a bad value or a config that does not fit the data set."""
    config = for_images(preset(args.preset), shape or ImageShape())
    if args.config is not None:
        config = recipe.load(args.config, config)
    config = with_objective(with_seed(config, args.seed), args.objective)
    config = recipe.apply_sets(with_conditional(config, args), args.set)
    made_for = image_shape_of(config.classifier)
    if shape is not None and made_for != shape:
        raise UsageError(f"the config is for images {made_for} but the data set has {shape}; "
                         "print one for it with `ldm config --data-dir ...`")
    return config


def recipe_name(args: argparse.Namespace) -> str:
    """The preset, config file and --set values of a run, for its report and run.json."""
    return " + ".join([args.preset, *([str(args.config)] if args.config else []),
                       *(f"--set {item}" for item in args.set)])


def train_configs(args: argparse.Namespace, shape: ImageShape | None = None
                  ) -> tuple[RunConfig, Any, ScheduleConfig]:
    """The preset with the command's overrides; raises UsageError for a bad value."""
    if args.model not in ("diffusion", "guide"):  # options the classifier and VAE would ignore
        for option in ("schedule", "objective", "conditional"):
            if getattr(args, option):
                raise UsageError(f"--{option} is an option of `ldm train diffusion`, not of "
                                 f"`ldm train {args.model}`")
    config = run_config(args, shape)
    if args.model == "guide" and not config.guide.channels:
        raise UsageError("this config has no guide; give it one with --set guide.channels=16,32")
    field = {"classifier": "classifier_train", "vae": "vae_train",
             "diffusion": "diffusion_train", "guide": "guide_train"}[args.model]
    overrides = {k: v for k, v in (("epochs", args.epochs), ("batch_size", args.batch_size),
                                   ("lr", args.lr), ("checkpoint_every", args.checkpoint_every),
                                   ("checkpoint_seconds", args.checkpoint_seconds))
                 if v is not None}
    train_config = dataclasses.replace(getattr(config, field), **overrides)
    schedule = config.schedule
    if args.schedule:
        schedule = dataclasses.replace(schedule, kind=args.schedule)
    return config, train_config, schedule


def check_command(args: argparse.Namespace) -> None:
    """Every value of the command, before the run directory is created or locked."""
    if args.command == "train":
        train_configs(args)
    elif args.command == "encode":
        RunConfig(latent_mode=args.latent_mode, latent_norm=args.latent_norm)
    elif args.command == "run":
        from .pipeline import STAGES

        run_config(args)
        for name in args.force:
            if name not in STAGES:
                raise UsageError(f"--force: unknown stage {name!r} (choose from "
                                 f"{', '.join(STAGES)})")
    elif args.command == "sample" and not args.reconstruct:
        sampling_config(args)
    elif args.command == "sample" and (args.labels or args.guidance != 1.0
                                       or args.autoguidance != 1.0):
        raise UsageError("--labels, --guidance and --autoguidance work with --model diffusion")
    if args.command in ("sample", "sweep") and args.num_samples > MAX_SAMPLES:
        raise UsageError(f"-n must be at most {MAX_SAMPLES}, got {args.num_samples}")
    if args.command == "sample":
        check_replaceable(args.out, "samples")
    elif args.command == "evaluate" and args.out is not None:
        check_replaceable(args.out, "evaluation")
    elif args.command == "sweep":
        from .sweep import MIN_SAMPLES, guided_budgets, pairs

        nfes = integers(args.nfe, "--nfe")
        specs = pairs(args.samplers.split(","),
                      guided_budgets(nfes) if args.autoguidance != 1.0 else nfes)
        if args.num_samples < MIN_SAMPLES:
            raise UsageError(f"a sweep needs -n of at least {MIN_SAMPLES} (every score defined)")
        if args.guidance is not None:
            guidance_scales(args.guidance, specs)
            if args.autoguidance != 1.0:
                raise UsageError("--guidance sweeps a conditional model; --autoguidance guides "
                                 "an unconditional one: one at a time")
        SamplingConfig(autoguidance=args.autoguidance)


def sampling_config(args: argparse.Namespace) -> SamplingConfig:
    """`ldm sample`'s options; the config checks the sampler's name, steps, variance, eta,
    labels and guidance before any work."""
    if args.model != "diffusion" and (args.labels or args.guidance != 1.0
                                      or args.autoguidance != 1.0):
        raise UsageError("--labels, --guidance and --autoguidance work with --model diffusion")
    spec = sampler_spec(args)
    name = parse_sampler(spec)[0]
    for option in ("eta", "variance"):  # an option the sampler would ignore is a mistake
        if getattr(args, option) is not None and option not in SAMPLERS[name].options:
            takes = [n for n, s in SAMPLERS.items() if option in s.options]
            raise UsageError(f"--{option} is an option of {', '.join(takes)}, not of {name}")
    defaults = SamplingConfig()
    return SamplingConfig(variance=args.variance or defaults.variance,
                          eta=defaults.eta if args.eta is None else args.eta, samplers=(spec,),
                          labels=args.labels, guidance=args.guidance,
                          autoguidance=args.autoguidance)


def guidance_scales(text: str, specs: list[str]) -> list[float]:
    if len(specs) != 1:
        raise UsageError(f"--guidance sweeps one sampler at one NFE, got {len(specs)} pairs "
                         f"({', '.join(specs)})")
    try:
        scales = [float(v) for v in text.split(",")]
    except ValueError:
        raise UsageError(f"--guidance: expected comma-separated numbers, got {text!r}") from None
    for scale in scales:
        SamplingConfig(samplers=tuple(specs), labels="balanced", guidance=scale)
    return scales


def sampler_spec(args: argparse.Namespace) -> str:
    return args.sampler if args.steps is None else f"{args.sampler}-{args.steps}"


def integers(text: str, option: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise UsageError(f"{option}: expected comma-separated integers, got {text!r}") from None
