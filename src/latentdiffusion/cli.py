"""Command line: `ldm data|train|encode|sample|evaluate|sweep|run`. The only module that
prints."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from tqdm.auto import tqdm

from . import data, evaluation, generation, stages
from . import distributed as dist
from .config import (
    CONDITIONAL_GUIDANCE,
    PRESETS,
    RunConfig,
    SamplingConfig,
    ScheduleConfig,
    conditional,
    preset,
)
from .diffusion import SAMPLERS
from .errors import LdmError, UsageError
from .fileio import run_dir_lock, strict_json, write_json
from .rundir import RunDir
from .statedir import Resume

EPILOG = """examples:
  ldm run --data-dir ~/mnist --run-dir runs/demo --preset quick
  ldm train vae --data-dir ~/mnist --run-dir runs/demo
  ldm sample --run-dir runs/demo --model diffusion --sampler ddim --steps 50 -n 1000 --out d.npz
  ldm evaluate --data-dir ~/mnist --run-dir runs/demo --samples d.npz
  ldm sweep --data-dir ~/mnist --run-dir runs/demo --samplers heun,dpmpp-2m --nfe 5,10,20 -n 2000
  ldm run --data-dir ~/mnist --run-dir runs/cond --conditional
  ldm sample --run-dir runs/cond --model diffusion --labels 7 --guidance 2 -n 100 --out 7.npz
  ldm sweep --data-dir ~/mnist --run-dir runs/cond --samplers ddpm --nfe 25 --guidance 1,2,3
  torchrun --standalone --nproc_per_node=2 -m latentdiffusion train diffusion --run-dir runs/demo
"""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit code 2
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


MAX_SEED = 2**63  # torch and numpy generators take 64-bit seeds; signed keeps every API happy


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= value < MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be in 0 .. 2**63 - 1, got {value}")
    return value


def _npz_out(text: str) -> Path:
    # The grid goes beside it as .png: any other name would lose the samples to their grid.
    if not text.endswith(".npz"):
        raise argparse.ArgumentTypeError(f"must end in .npz (the samples file; a .png grid is "
                                         f"written beside it), got {text!r}")
    return Path(text)


def _common(p: argparse.ArgumentParser, data_dir: bool = True) -> None:
    if data_dir:
        p.add_argument("--data-dir", metavar="DIR",
                       help=f"directory with the four IDX files (default: ${data.DATA_DIR_ENV} "
                            "or the user cache)")
    p.add_argument("--run-dir", metavar="DIR", default="runs/default", type=Path,
                   help="where stage outputs live")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--quiet", action="store_true", help="no progress bars or stage lines")


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = Parser(prog="ldm", description=__doc__, epilog=EPILOG,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = sub.add_parser("data", help="download or verify a dataset")
    data_sub = p.add_subparsers(dest="action", required=True, parser_class=Parser)
    for action in ("download", "verify"):
        q = data_sub.add_parser(action, formatter_class=fmt)
        q.add_argument("--dataset", default="mnist", help=", ".join(data.DATASETS))
        q.add_argument("--data-dir", metavar="DIR")
        q.add_argument("--quiet", action="store_true")

    p = sub.add_parser("train", help="train one model", formatter_class=fmt)
    p.add_argument("model", choices=("classifier", "vae", "diffusion"))
    _common(p)
    p.add_argument("--preset", default="default", help=", ".join(PRESETS))
    p.add_argument("--epochs", type=_positive)
    p.add_argument("--batch-size", type=_positive, help="global batch size")
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=_seed)
    p.add_argument("--checkpoint-every", type=_positive, metavar="STEPS")
    p.add_argument("--checkpoint-seconds", type=_positive_float, metavar="SECONDS",
                   help="also checkpoint after this much wall time (preset: 60)")
    p.add_argument("--schedule", help="diffusion only: linear or cosine")
    p.add_argument("--objective", help="diffusion only: vp (the post's) or flow (flow matching)")
    p.add_argument("--conditional", action="store_true",
                   help="diffusion only: a class-conditional denoiser (for --labels, --guidance)")
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
    p.add_argument("--seed", type=_seed, default=0)

    p = sub.add_parser("sample", help="generate digits into a samples .npz", formatter_class=fmt)
    _common(p)
    p.add_argument("--model", required=True, choices=("vae", "diffusion"))
    p.add_argument("--sampler", default="ddim", help=f"{', '.join(SAMPLERS)}, or NAME-STEPS")
    p.add_argument("--steps", type=_positive,
                   help="sampler steps (default: " + ", ".join(
                       f"{name} {spec.default_steps or 'all'}" for name, spec in SAMPLERS.items())
                   + ")")
    p.add_argument("--variance", default="beta_tilde", help="ddpm: beta_tilde or beta")
    p.add_argument("--eta", type=float, default=0.0, help="ddim stochasticity, in [0, 1]")
    p.add_argument("-n", "--num-samples", type=_positive, default=1000)
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--batch-size", type=_positive, default=500)
    p.add_argument("--reconstruct", metavar="SPLIT", help="vae only: reconstruct train or test")
    p.add_argument("--labels", default="", metavar="Y",
                   help="conditional diffusion only: a digit (7), a list cycled over the "
                        "samples (0,1,2) or 'balanced' (sample i draws i mod 10); written "
                        "into the .npz")
    p.add_argument("--guidance", type=float, default=1.0, metavar="S",
                   help="classifier-free guidance scale: 1 unguided, 0 unconditional, "
                        "> 1 closer to the label")
    p.add_argument("--out", type=_npz_out, required=True,
                   help="output .npz (a .png grid beside it)")

    p = sub.add_parser("evaluate", help="score a samples file (FID, KID, precision/recall)",
                       formatter_class=fmt)
    _common(p)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--samples", type=Path, metavar="FILE.npz")
    group.add_argument("--baselines", action="store_true", help="the Validation and Random rows")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    p.add_argument("--seed", type=_seed, default=0)

    p = sub.add_parser("sweep", help="FID against model calls for several samplers",
                       formatter_class=fmt)
    _common(p)
    p.add_argument("--samplers", default=",".join(SAMPLERS), help="comma-separated names")
    p.add_argument("--nfe", default="5,10,20,50", help="comma-separated model-call budgets")
    p.add_argument("-n", "--num-samples", type=_positive, default=10_000)
    p.add_argument("--seed", type=_seed, default=1, help="the presets' sampling seed")
    p.add_argument("--batch-size", type=_positive, default=500)
    p.add_argument("--guidance", metavar="S,S,..",
                   help="a conditional model's guidance scales, for one sampler and NFE: FID "
                        "and accuracy per scale (R/guidance.json, figures/guidance.png)")

    p = sub.add_parser("run", help="the whole experiment and its report", formatter_class=fmt)
    _common(p)
    p.add_argument("--preset", default="default", help=", ".join(PRESETS))
    p.add_argument("--seed", type=_seed, help="seed every stage (default: the preset's)")
    p.add_argument("--objective", help="the denoiser's objective: vp (the post's) or flow "
                                       "(flow matching; default: the preset's)")
    p.add_argument("--conditional", action="store_true",
                   help="a class-conditional denoiser; its sets are balanced over the digits "
                        "and guided")
    p.add_argument("--guidance", type=float, metavar="S",
                   help=f"with --conditional: the sets' guidance scale (default "
                        f"{CONDITIONAL_GUIDANCE:g})")
    p.add_argument("--force", action="append", default=[], metavar="STAGE",
                   help="redo STAGE and what depends on it (repeatable)")
    return parser


def _with_seed(config: RunConfig, seed: int | None) -> RunConfig:
    if seed is None:
        return config
    r = dataclasses.replace
    return r(config, classifier_train=r(config.classifier_train, seed=seed),
             vae_train=r(config.vae_train, seed=seed),
             diffusion_train=r(config.diffusion_train, seed=seed),
             sampling=r(config.sampling, seed=seed + 1))


def _with_objective(config: RunConfig, kind: str | None) -> RunConfig:
    if kind is None:
        return config
    # The config checks the value, with the same one-line error as every other.
    objective = dataclasses.replace(config.objective, kind=kind)  # type: ignore[arg-type]
    return dataclasses.replace(config, objective=objective)


def _with_conditional(config: RunConfig, args: argparse.Namespace) -> RunConfig:
    guidance = getattr(args, "guidance", None)
    if not args.conditional:
        if guidance is not None:
            raise UsageError("--guidance needs --conditional (an unconditional model has "
                             "nothing to guide)")
        return config
    return conditional(config, CONDITIONAL_GUIDANCE if guidance is None else guidance)


def _run_config(args: argparse.Namespace) -> RunConfig:
    """The preset with `ldm run`'s or `ldm train`'s overrides; UsageError for a bad value."""
    config = _with_objective(_with_seed(preset(args.preset), args.seed), args.objective)
    return _with_conditional(config, args)


def _train_configs(args: argparse.Namespace) -> tuple[RunConfig, Any, ScheduleConfig]:
    """The preset with the command's overrides; raises UsageError for a bad value."""
    config = _run_config(args)
    field = {"classifier": "classifier_train", "vae": "vae_train",
             "diffusion": "diffusion_train"}[args.model]
    overrides = {k: v for k, v in (("epochs", args.epochs), ("batch_size", args.batch_size),
                                   ("lr", args.lr), ("checkpoint_every", args.checkpoint_every),
                                   ("checkpoint_seconds", args.checkpoint_seconds))
                 if v is not None}
    train_config = dataclasses.replace(getattr(config, field), **overrides)
    schedule = config.schedule
    if args.schedule:
        schedule = dataclasses.replace(schedule, kind=args.schedule)
    return config, train_config, schedule


def _check_command(args: argparse.Namespace) -> None:
    """Every value of the command, before the run directory is created or locked."""
    if args.command == "train":
        _train_configs(args)
    elif args.command == "encode":
        RunConfig(latent_mode=args.latent_mode, latent_norm=args.latent_norm)
    elif args.command == "run":
        from .pipeline import STAGES

        _run_config(args)
        for name in args.force:
            if name not in STAGES:
                raise UsageError(f"--force: unknown stage {name!r} (choose from "
                                 f"{', '.join(STAGES)})")
    elif args.command == "sample" and not args.reconstruct:
        _sampling(args)
    elif args.command == "sample" and (args.labels or args.guidance != 1.0):
        raise UsageError("--labels and --guidance work with --model diffusion")
    elif args.command == "sweep":
        from .sweep import pairs

        specs = pairs(args.samplers.split(","), _integers(args.nfe, "--nfe"))
        if args.guidance is not None:
            _guidance_scales(args.guidance, specs)


def _sampling(args: argparse.Namespace) -> SamplingConfig:
    """`ldm sample`'s options; the config checks the sampler's name, steps, variance, eta,
    labels and guidance before any work."""
    if args.model != "diffusion" and (args.labels or args.guidance != 1.0):
        raise UsageError("--labels and --guidance work with --model diffusion")
    return SamplingConfig(variance=args.variance, eta=args.eta, samplers=(_sampler_spec(args),),
                          labels=args.labels, guidance=args.guidance)


def _guidance_scales(text: str, specs: list[str]) -> list[float]:
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


def _sampler_spec(args: argparse.Namespace) -> str:
    return args.sampler if args.steps is None else f"{args.sampler}-{args.steps}"


def _train(args: argparse.Namespace, device: Any) -> str:
    config, train_config, schedule = _train_configs(args)
    run = RunDir(args.run_dir)
    name = args.model
    has_state = any(run.state_dir(name).glob("step-*.safetensors"))
    if not (args.resume or args.force) and (run.model(name).exists() or has_state):
        raise UsageError(f"{run.root} already has a {name} model or checkpoints; pass --resume "
                         "to continue or --force to start over")
    progress = not args.quiet
    resume: Resume = "strict" if args.resume else "off"  # --force: "off" as well
    if name == "classifier":
        trained = stages.train_classifier(args.data_dir, run, config.classifier, train_config,
                                          device=device, resume=resume, progress=progress)
    elif name == "vae":
        trained = stages.train_vae(args.data_dir, run, config.vae, train_config, device=device,
                                   resume=resume, progress=progress)
    else:
        trained = stages.train_diffusion(run, config.unet, schedule, config.objective,
                                         train_config, device=device, resume=resume,
                                         progress=progress)
    header = trained.header
    last = header["history"][-1] if header["history"] else {}
    return strict_json({"model": str(run.model(name)), "train_seconds": header["train_seconds"],
                       **last})


def _sample(args: argparse.Namespace, device: Any) -> str | None:
    run = RunDir(args.run_dir)
    labels = None
    meta: dict[str, Any] = {}  # which sampler made the set and its model calls (NFE)
    if args.reconstruct:
        if args.model != "vae":
            raise UsageError("--reconstruct works with --model vae")
        images, labels = generation.reconstruct(args.data_dir, run, args.reconstruct, device=device)
    else:
        spec = _sampler_spec(args)
        sampling = _sampling(args)
        if args.model == "diffusion":
            generation.check_conditioning(run, sampling)
            meta = {"sampler": spec, "nfe": generation.model_calls(run, spec, device)}
            labels = generation.sample_labels(sampling, args.num_samples)
            if labels is not None:
                meta["guidance"] = sampling.guidance
        images = generation.generate(run, args.model, args.num_samples, args.seed, sampler=spec,
                                 sampling=sampling, device=device, batch_size=args.batch_size,
                                 progress=not args.quiet)
    if not dist.is_main():
        return None
    try:
        generation.save_samples(args.out, images, labels, **meta)
    except LdmError as err:  # its "nothing was replaced" is about the grid alone
        if not args.out.exists():
            raise
        raise LdmError(f"{args.out} was written, but its grid was not ({err})") from None
    return strict_json({"out": str(args.out), "n": len(images), **meta})


def _evaluate(args: argparse.Namespace, device: Any) -> str:
    from .metrics import load_samples, random_images

    run = RunDir(args.run_dir)
    if args.baselines:
        test_images, test_labels = data.load_split(args.data_dir, "test")
        train_images = data.load_split(args.data_dir, "train")[0]
        result: dict[str, Any] = {
            "validation": evaluation.evaluate(args.data_dir, run, test_images, test_labels,
                                              device=device, seed=args.seed),
            "random": evaluation.evaluate(args.data_dir, run,
                                          random_images(train_images, len(test_images),
                                                        args.seed),
                                          None, device=device, seed=args.seed)}
    else:
        images, labels = load_samples(args.samples)
        result = evaluation.evaluate(args.data_dir, run, images, labels, device=device,
                                     seed=args.seed)
    if args.out and dist.is_main():
        write_json(args.out, result)
    return strict_json(result)


def _integers(text: str, option: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise UsageError(f"{option}: expected comma-separated integers, got {text!r}") from None


def _sweep(args: argparse.Namespace, device: Any) -> str:
    from .pipeline import refresh_report
    from .sweep import run_sweep, summary

    if args.guidance is not None:
        return _guidance_sweep(args, device)
    result = run_sweep(RunDir(args.run_dir), args.data_dir, args.samplers.split(","),
                       _integers(args.nfe, "--nfe"), args.num_samples, seed=args.seed,
                       device=device, batch_size=args.batch_size, progress=not args.quiet)
    refreshed = refresh_report(args.run_dir, args.data_dir) if dist.is_main() else False
    return strict_json({"sweep": str(args.run_dir / "sweep.json"), "report_updated": refreshed,
                       **summary(result)})


def _guidance_sweep(args: argparse.Namespace, device: Any) -> str:
    from .guidance_sweep import run_guidance_sweep, summary
    from .pipeline import refresh_report
    from .sweep import pairs

    specs = pairs(args.samplers.split(","), _integers(args.nfe, "--nfe"))
    result = run_guidance_sweep(RunDir(args.run_dir), args.data_dir, specs[0],
                                _guidance_scales(args.guidance, specs), args.num_samples,
                                seed=args.seed, device=device, batch_size=args.batch_size,
                                progress=not args.quiet)
    refreshed = refresh_report(args.run_dir, args.data_dir) if dist.is_main() else False
    return strict_json({"guidance": str(args.run_dir / "guidance.json"),
                        "report_updated": refreshed, **summary(result)})


def _run(args: argparse.Namespace, device: Any) -> str:
    from .pipeline import StageEvent, run_pipeline

    config = _run_config(args)
    root = data.resolve_data_dir(args.data_dir)
    if not args.data_dir and not all((root / f).exists() for f in data.DATASETS["mnist"].md5):
        print(f"MNIST not found in {root}; downloading it there (use --data-dir DIR to point at "
              "a copy)", file=sys.stderr)
        data.download(root)

    def show(event: StageEvent) -> None:
        if not args.quiet:
            status = "skipped (up to date)" if event.skipped else f"{event.seconds:.1f} s"
            tqdm.write(f"[{event.name}] {status}: {event.summary}", file=sys.stderr)

    metrics = run_pipeline(config, args.run_dir, root, device=device, force=tuple(args.force),
                           progress=not args.quiet, preset_name=args.preset, on_stage=show)
    summary = {name: {"n": m["n"], "fid": round(m["fid"], 4)} for name, m in metrics.items()}
    return strict_json({"run_dir": str(args.run_dir), "report": str(args.run_dir / "report.html"),
                       "fid": summary})


def _data(args: argparse.Namespace) -> str:
    if args.action == "verify":
        return strict_json(data.verify(args.data_dir, args.dataset))
    bars: list[tqdm] = []  # made at the first byte: a refused directory prints no empty bar

    def progress(done: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(unit="B", unit_scale=True, disable=args.quiet))
        bars[0].total = total or None
        bars[0].n = done
        bars[0].refresh()

    root = data.download(args.data_dir, args.dataset, progress)
    for bar in bars:
        bar.close()
    return strict_json({"data_dir": str(root), **data.verify(root, args.dataset)})


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # usage errors (2) and --help (0), for in-process callers
        return exit_.code if isinstance(exit_.code, int) else 2
    quiet = getattr(args, "quiet", False)
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s",
                        stream=sys.stderr, force=True)
    try:
        output: str | None
        if args.command == "data":
            output = _data(args)
        else:
            _check_command(args)
            device = dist.resolve_device(args.device)
            dist.init(device)
            writes = args.command in ("train", "encode", "run", "sweep")
            with run_dir_lock(args.run_dir, enabled=writes and dist.is_main()):
                output = _dispatch(args, device)
        if output is not None and dist.is_main():
            print(output)
        return 0
    except LdmError as err:
        _say(f"error: {err}")
        return err.exit_code
    except KeyboardInterrupt:
        _say("interrupted; checkpoints are kept: rerun with --resume (ldm run resumes by itself)")
        return 130
    finally:
        dist.shutdown()


def _say(line: str) -> None:
    """Print a last line on a line of its own: close the progress bars the failure left open
    (their frames live on in the exception), which ends or clears their line."""
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
    print(line, file=sys.stderr)


def _dispatch(args: argparse.Namespace, device: Any) -> str | None:
    if args.command == "train":
        return _train(args, device)
    if args.command == "encode":
        # The config checks both choices, with the same one-line error as every other value.
        options = RunConfig(latent_mode=args.latent_mode, latent_norm=args.latent_norm)
        header = stages.encode(args.data_dir, RunDir(args.run_dir), options.latent_mode,
                               options.latent_norm, device=device, seed=args.seed)
        return strict_json({"latents": str(args.run_dir / "latents.safetensors"),
                           "shift": header["shift"], "scale": header["scale"],
                           "mode": header["mode"]})
    if args.command == "sample":
        return _sample(args, device)
    if args.command == "evaluate":
        return _evaluate(args, device)
    if args.command == "sweep":
        return _sweep(args, device)
    return _run(args, device)


if __name__ == "__main__":
    sys.exit(main())
