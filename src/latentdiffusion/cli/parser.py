"""The `ldm` command line: its parser and argument types."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import NoReturn

from ..data import DATA_DIR_ENV, DATASETS
from ..diffusion import SAMPLERS
from ..run import recipe
from ..run.config import CONDITIONAL_GUIDANCE
from ..run.presets import PRESETS, preset
from ..schema import IMAGE_SIZES, parse_number

# `ldm sample`'s sampler when --sampler is not given.
DEFAULT_SAMPLER = "ddim"

DESCRIPTION = ("Train and evaluate a latent diffusion model: classifier, VAE, denoiser, samples, "
               "FID report. `ldm run` does it all.")
EPILOG = """examples:
  ldm run --data-dir ~/mnist --run-dir runs/demo --preset quick
  ldm train vae --data-dir ~/mnist --run-dir runs/demo
  ldm sample --run-dir runs/demo --model diffusion --sampler ddim --steps 50 -n 1000 --out d.npz
  ldm evaluate --data-dir ~/mnist --run-dir runs/demo --samples d.npz
  ldm sample --run-dir runs/demo --model diffusion -n 100 --format png --out pngs/
  ldm export --run-dir runs/demo --out models/demo --license CC-BY-4.0
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
        value = parse_number(text, int)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = parse_number(text, float)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


MAX_SEED = 2**63  # torch and numpy generators take 64-bit seeds; signed keeps every API happy


def seed_value(text: str) -> int:
    try:
        value = parse_number(text, int)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= value < MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be in 0 .. 2**63 - 1, got {value}")
    return value


def number(text: str) -> float:
    return parse_number(text, float)


number.__name__ = "float"  # argparse names it in its message: "invalid float value: 'x'"


def image_size(text: str) -> int:
    try:
        value = parse_number(text, int)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value and value not in IMAGE_SIZES:
        raise argparse.ArgumentTypeError(f"must be a multiple of 4 from {IMAGE_SIZES[0]} to "
                                         f"{IMAGE_SIZES[-1]} (or 0: the images' own size), "
                                         f"got {value}")
    return value


PRECISION_HELP = ("fp32, bf16 (CPU and CUDA) or fp16 (CUDA only): the autocast dtype of the "
                  "networks' forward passes; weights and optimizer state stay float32")


IMAGE_SIZE_HELP = ("resize each picture so its shorter side is S and centre-crop it to S x S "
                   "(pictures of any size and mode; default: the images' own size, which must "
                   "be one square size of 16 to 64)")


def json_out(text: str) -> Path:
    if not text.endswith(".json"):
        raise argparse.ArgumentTypeError(f"must end in .json, got {text!r}")
    return Path(text)



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
                        f".npz (default: ${DATA_DIR_ENV} or the user cache)")
    p.add_argument("--dataset", metavar="NAME",
                   help=f"a registered IDX data set ({', '.join(DATASETS)}); "
                        "downloaded into the user cache when no --data-dir holds it")
    p.add_argument("--image-size", type=image_size, metavar="S", help=IMAGE_SIZE_HELP)


def _recipe_files(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, metavar="FILE",
                   help="a run config file (.toml or .json, as `ldm config` prints it); keys it "
                        "leaves out keep --preset's values; --seed, --objective, --conditional "
                        "and --set apply on top of it")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="set one value after the preset, --config and the other options, e.g. "
                        "unet.channels=32,64 or diffusion_train.lr=4e-3 (repeatable; "
                        "`ldm config` lists every key)")


def _augment(p: argparse.ArgumentParser, default: str | None = None) -> None:
    p.add_argument("--augment", default=default, metavar="KIND",
                   help="none, or xflip: the VAE and the denoiser also see the training images "
                        "mirrored (for small sets of pictures that may be mirrored, not digits; "
                        "default: the config's)" if default is None else
                        "none, or xflip: also encode the mirrored training images")


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
    _augment(p)
    p.add_argument("--guidance", type=number, metavar="S",
                   help=f"with --conditional: the sets' guidance scale (default "
                        f"{CONDITIONAL_GUIDANCE:g})")
    p.add_argument("--precision", metavar="P",
                   help=f"{PRECISION_HELP}, for every training stage and the sampled sets "
                        "(default: the config's, fp32)")


def nonnegative(text: str) -> int:
    try:
        value = parse_number(text, int)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _monitor(p: argparse.ArgumentParser) -> None:
    """What a training shows: --set monitor.KEY with names of their own."""
    p.add_argument("--sample-every", type=positive, metavar="STEPS",
                   help="a progress grid (and the denoiser's FID) every STEPS steps (default: "
                        "the config's monitor.sample_every)")
    p.add_argument("--score-samples", type=nonnegative, metavar="N",
                   help="samples of each progress FID/KID (0: grids only; default 1000)")
    p.add_argument("--no-progress-samples", action="store_true",
                   help="no progress grids or scores while training (the logs stay)")
    p.add_argument("--tensorboard", action="store_true",
                   help="also write TensorBoard event files in R/logs/tensorboard (needs "
                        'pip install "latentdiffusion[tensorboard]")')


def monitor_sets(args: argparse.Namespace) -> list[str]:
    """The --set items of _monitor's options."""
    items = [f"monitor.{key}={value}" for key, value in
             (("sample_every", getattr(args, "sample_every", None)),
              ("score_samples", getattr(args, "score_samples", None))) if value is not None]
    items += ["monitor.samples=false"] if getattr(args, "no_progress_samples", False) else []
    return items + (["monitor.tensorboard=true"] if getattr(args, "tensorboard", False) else [])


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = Parser(prog="ldm", description=DESCRIPTION, epilog=EPILOG,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = sub.add_parser("data", help="download or verify a dataset")
    data_sub = p.add_subparsers(dest="action", required=True, parser_class=Parser)
    q = data_sub.add_parser("download", formatter_class=fmt,
                            help="fetch a registered dataset's IDX files")
    q.add_argument("--dataset", default="mnist", help=", ".join(DATASETS))
    q.add_argument("--data-dir", metavar="DIR")
    q.add_argument("--quiet", action="store_true")
    q = data_sub.add_parser("verify",  # no defaults worth showing
                            help="check a dataset against its release, or describe any data")
    q.add_argument("--dataset", metavar="NAME",
                   help=f"check the IDX files' content against the published data set "
                        f"({', '.join(DATASETS)}); without it, print what --data-dir "
                        "holds (IDX files, a folder of images or an .npz) and its content hash")
    q.add_argument("--data-dir", metavar="PATH",
                   help="IDX directory, folder of images or .npz (default: "
                        f"${DATA_DIR_ENV} or the user cache)")
    q.add_argument("--image-size", type=image_size, metavar="S",
                   help=f"without --dataset: {IMAGE_SIZE_HELP}")
    q.add_argument("--quiet", action="store_true")

    p = sub.add_parser("train", help="train one model", formatter_class=fmt)
    p.add_argument("model", choices=("classifier", "vae", "diffusion", "guide"),
                   help="guide: autoguidance's smaller denoiser (the config's guide)")
    _common(p)
    p.add_argument("--preset", default="default", help=", ".join(PRESETS))
    p.add_argument("--steps", type=positive, help="optimizer steps (the training length)")
    p.add_argument("--batch-size", type=positive, help="global batch size")
    p.add_argument("--lr", type=number)
    p.add_argument("--seed", type=seed_value)
    p.add_argument("--checkpoint-every", type=positive, metavar="STEPS")
    p.add_argument("--checkpoint-seconds", type=positive_float, metavar="SECONDS",
                   help="also checkpoint after this much wall time (preset: 60)")
    p.add_argument("--schedule", help="diffusion only: linear or cosine")
    p.add_argument("--objective", help="diffusion only: vp (the post's) or flow (flow matching)")
    p.add_argument("--conditional", action="store_true",
                   help="diffusion only: a class-conditional denoiser (for --labels, --guidance)")
    p.add_argument("--precision", metavar="P",
                   help=f"{PRECISION_HELP} (default: the config's, fp32)")
    _augment(p)
    _recipe_files(p)
    _monitor(p)
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
    _augment(p, default="none")

    p = sub.add_parser("sample", help="generate images into a samples .npz or a folder of PNGs",
                       formatter_class=fmt)
    _common(p)
    p.add_argument("--model", required=True, choices=("vae", "diffusion"))
    # No defaults in the parser (None): a sampler option given with --model vae is told apart.
    p.add_argument("--sampler", help=f"{', '.join(SAMPLERS)}, or NAME-STEPS (default "
                   f"{DEFAULT_SAMPLER})")
    p.add_argument("--steps", type=positive,
                   help="sampler steps (default: " + ", ".join(
                       f"{name} {spec.default_steps or 'all'}" for name, spec in SAMPLERS.items())
                   + ")")
    p.add_argument("--variance", help="ddpm only: beta_tilde (default) or beta")
    p.add_argument("--eta", type=number, help="ddim only: stochasticity in [0, 1] (default 0)")
    p.add_argument("-n", "--num-samples", type=positive, default=1000)
    p.add_argument("--seed", type=seed_value, default=0)
    p.add_argument("--batch-size", type=positive, default=500)
    p.add_argument("--reconstruct", metavar="SPLIT", help="vae only: reconstruct train or test")
    p.add_argument("--labels", default="", metavar="Y",
                   help="conditional diffusion only: a class index (7), a list cycled over "
                        "the samples (0,1,2) or 'balanced' (sample i draws class i mod K, of "
                        "the model's K); written into the .npz")
    p.add_argument("--guidance", type=number, default=1.0, metavar="S",
                   help="classifier-free guidance scale: 1 unguided, 0 unconditional, "
                        "> 1 closer to the label")
    p.add_argument("--autoguidance", type=number, default=1.0, metavar="S",
                   help="autoguidance scale with the run's guide (`ldm train guide`): 1 off, "
                        "> 1 guided")
    p.add_argument("--precision", default="fp32", metavar="P", help=PRECISION_HELP)
    p.add_argument("--format", choices=("npz", "png"), default="npz",
                   help="npz: one samples file (a .png grid beside it); png: a folder of one "
                        "PNG per image (000000.png, ...) and samples.json")
    p.add_argument("--out", type=Path, required=True, metavar="PATH",
                   help="the output .npz, or with --format png a folder (new, empty or an "
                        "earlier one of these)")

    p = sub.add_parser("evaluate", help="score a samples file (FID, KID, precision/recall)",
                       formatter_class=fmt)
    _common(p)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--samples", type=Path, metavar="PATH",
                       help="a samples .npz, a folder of images or a .zip of images (the run's "
                            "size and channels; nothing is resized)")
    group.add_argument("--baselines", action="store_true", help="the Validation and Random rows")
    p.add_argument("--nearest", action="store_true",
                   help="with --samples: how close the samples come to the training images "
                        "(memorisation: nearest neighbours in the feature space)")
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
    p.add_argument("--autoguidance", type=number, default=1.0, metavar="S",
                   help="sample every pair with the run's guide at this scale (1: off); --nfe "
                        "then counts the guide's calls too")

    p = sub.add_parser("run", help="the whole experiment and its report", formatter_class=fmt)
    _common(p)
    _recipe(p)
    _monitor(p)
    p.add_argument("--force", action="append", default=[], metavar="STAGE",
                   help="redo STAGE and what depends on it (repeatable)")

    p = sub.add_parser("export", help="a self-contained folder of a run's models (weights, "
                                      "config.json, model card) for Pipeline.load",
                       formatter_class=fmt)
    _common(p, data_dir=False)
    p.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="the folder (new, empty or an earlier export)")
    p.add_argument("--license", default="unspecified", metavar="TEXT",
                   help="the licence the model card states, e.g. CC-BY-4.0")

    p = sub.add_parser("config", help="print the run config `ldm run` would run with the same "
                                      "options (TOML or JSON), to edit and pass to --config",
                       formatter_class=fmt)
    _recipe(p)
    p.add_argument("--format", choices=recipe.FORMATS, default="toml")
    _data_options(p)  # to scale the preset to a data set's images; MNIST's without
    return parser
