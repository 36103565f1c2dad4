"""Command line: `ldm data|train|encode|sample|evaluate|sweep|run|config`. The only module
that prints."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shlex
import sys
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from . import checkpoint, data, evaluation, generation, recipe, stages
from . import distributed as dist
from .arguments import (
    build_parser,
    check_command,
    guidance_scales,
    integers,
    recipe_name,
    run_config,
    sampler_spec,
    sampling_config,
    train_configs,
)
from .config import ClassifierConfig, ImageShape, RunConfig, VAEConfig, from_dict, image_shape_of
from .datasets import Dataset, load_dataset
from .errors import LdmError, UsageError
from .fileio import run_dir_lock, strict_json, write_json
from .rundir import RunDir
from .statedir import Resume


def _dataset(args: argparse.Namespace) -> Dataset:
    """The command's data set, read once; `ldm run` without --data-dir downloads a registered
    one (MNIST unless --dataset names another) into the user cache first."""
    if getattr(args, "loaded_data", None) is None:
        args.loaded_data = _load_dataset(args)
    return args.loaded_data  # type: ignore[no-any-return]


def _load_dataset(args: argparse.Namespace) -> Dataset:
    name = args.dataset or "mnist"
    if args.command == "run" and not args.data_dir and name in data.DATASETS:
        root = data.resolve_data_dir(None, name)
        if not all((root / f).exists() for f in data.DATASETS[name].md5):
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # every rank would fetch it at once
                raise UsageError(f"{name} is not in {root}; under torchrun, fetch it first "
                                 f"(`ldm data download --dataset {name}`) or pass --data-dir")
            print(f"{name} not found in {root}; downloading it there (use --data-dir DIR to "
                  "point at a copy)", file=sys.stderr)
            data.download(root, name)
    return load_dataset(args.data_dir, args.dataset)


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


def _train(args: argparse.Namespace, device: Any) -> str:
    dataset = _dataset(args) if args.model in ("classifier", "vae") else None
    config, train_config, schedule = args.resolved  # main built them for this data
    run = RunDir(args.run_dir)
    name = args.model
    has_state = any(run.state_dir(name).glob("step-*.safetensors"))
    if not (args.resume or args.force) and (run.model(name).exists() or has_state):
        raise UsageError(f"{run.root} already has a {name} model or checkpoints; pass --resume "
                         "to continue or --force to start over")
    progress = not args.quiet
    resume: Resume = "strict" if args.resume else "off"  # --force: "off" as well
    if dataset is not None and name == "classifier":
        trained = stages.train_classifier(dataset, run, config.classifier, train_config,
                                          device=device, resume=resume, progress=progress)
    elif dataset is not None:
        trained = stages.train_vae(dataset, run, config.vae, train_config, device=device,
                                   resume=resume, progress=progress)
    else:  # the denoiser, or with a smaller UNet autoguidance's guide
        unet = config.guide_unet if name == "guide" else config.unet
        trained = stages.train_diffusion(run, unet, schedule, config.objective, train_config,
                                         device=device, resume=resume, progress=progress,
                                         name=name)
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
        if args.reconstruct not in ("train", "test"):
            raise UsageError(f"--reconstruct: unknown split {args.reconstruct!r} (choose from "
                             "train, test)")
        images, labels = generation.reconstruct(_dataset(args), run, args.reconstruct,
                                                device=device)
    else:
        spec = sampler_spec(args)
        sampling = sampling_config(args)
        if args.model == "diffusion":
            generation.check_conditioning(run, sampling)
            meta = {"sampler": spec,
                    "nfe": generation.model_calls(run, spec, device, sampling.autoguidance)}
            labels = (generation.sample_labels(sampling, args.num_samples,
                                               generation.num_classes(run))
                      if sampling.labels else None)
            if labels is not None:
                meta["guidance"] = sampling.guidance
            if sampling.autoguidance != 1.0:
                meta["autoguidance"] = sampling.autoguidance
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
    samples = None if args.baselines else load_samples(args.samples)  # a bad file first
    checkpoint.load(run.model("classifier"), kind="classifier")  # then a missing model
    if samples is None:
        dataset = _dataset(args)
        test_images, test_labels = dataset.split("test")
        result: dict[str, Any] = {
            "validation": evaluation.evaluate(dataset, run, test_images, test_labels,
                                              device=device, seed=args.seed),
            "random": evaluation.evaluate(dataset, run,
                                          random_images(dataset.train_images, len(test_images),
                                                        args.seed),
                                          None, device=device, seed=args.seed)}
    else:
        images, labels = samples
        result = evaluation.evaluate(_dataset(args), run, images, labels, device=device,
                                     seed=args.seed)
    if args.out and dist.is_main():
        write_json(args.out, result)
    return strict_json(result)


def _sweep(args: argparse.Namespace, device: Any) -> str:
    from .pipeline import refresh_report
    from .sweep import run_sweep, summary

    if args.guidance is not None:
        return _guidance_sweep(args, device)
    result = run_sweep(RunDir(args.run_dir), _dataset(args), args.samplers.split(","),
                       integers(args.nfe, "--nfe"), args.num_samples, seed=args.seed,
                       device=device, batch_size=args.batch_size, progress=not args.quiet,
                       autoguidance=args.autoguidance)
    refreshed = refresh_report(args.run_dir, _dataset(args)) if dist.is_main() else False
    return strict_json({"sweep": str(args.run_dir / "sweep.json"), "report_updated": refreshed,
                       **summary(result)})


def _guidance_sweep(args: argparse.Namespace, device: Any) -> str:
    from .guidance_sweep import run_guidance_sweep, summary
    from .pipeline import refresh_report
    from .sweep import pairs

    specs = pairs(args.samplers.split(","), integers(args.nfe, "--nfe"))
    result = run_guidance_sweep(RunDir(args.run_dir), _dataset(args), specs[0],
                                guidance_scales(args.guidance, specs), args.num_samples,
                                seed=args.seed, device=device, batch_size=args.batch_size,
                                progress=not args.quiet)
    refreshed = refresh_report(args.run_dir, _dataset(args)) if dist.is_main() else False
    return strict_json({"guidance": str(args.run_dir / "guidance.json"),
                        "report_updated": refreshed, **summary(result)})


def _run(args: argparse.Namespace, device: Any) -> str:
    from .pipeline import StageEvent, run_pipeline

    config = args.resolved  # main built it for this data
    if dist.is_main():  # beside run.json's resolved config
        recipe.save_copy(args.config, args.run_dir)

    def show(event: StageEvent) -> None:
        if not args.quiet:
            status = "skipped (up to date)" if event.skipped else f"{event.seconds:.1f} s"
            tqdm.write(f"[{event.name}] {status}: {event.summary}", file=sys.stderr)

    metrics = run_pipeline(config, args.run_dir, _dataset(args), device=device,
                           force=tuple(args.force), progress=not args.quiet,
                           preset_name=recipe_name(args), on_stage=show)
    summary = {name: {"n": m["n"], "fid": round(m["fid"], 4)} for name, m in metrics.items()}
    return strict_json({"run_dir": str(args.run_dir), "report": str(args.run_dir / "report.html"),
                       "fid": summary})


def _config(args: argparse.Namespace, argv: Sequence[str]) -> str:
    header = f"ldm {shlex.join(argv)}; run it with: ldm run --config FILE"
    shape = shape_of(_dataset(args)) if args.data_dir or args.dataset else None
    return recipe.dumps(run_config(args, shape), args.format, header)


def _data_command(args: argparse.Namespace) -> str:
    if args.action == "verify":
        if args.dataset is None:  # any source, described by content (no published checksum)
            from .datasets import load_dataset

            return strict_json(load_dataset(args.data_dir).describe())
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
            output = _data_command(args)
        elif args.command == "config":  # touches no file and no device
            output = _config(args, sys.argv[1:] if argv is None else argv)
        else:
            check_command(args)  # every value, before any data is read
            device = dist.resolve_device(args.device)
            # The config for the data (it must fit), before the run dir exists.
            if args.command == "run":
                args.resolved = run_config(args, shape_of(_dataset(args)))
                check_batches(args.resolved, _dataset(args), "classifier", "vae", "diffusion")
            elif args.command == "train" and args.model in ("classifier", "vae"):
                args.resolved = train_configs(args, shape_of(_dataset(args)))
                config, train_config, _ = args.resolved
                check_batches(dataclasses.replace(config, **{f"{args.model}_train": train_config}),
                              _dataset(args), args.model)
            elif args.command == "train":
                args.resolved = train_configs(args, run_shape(RunDir(args.run_dir)))
            dist.init(device)
            writes = args.command in ("train", "encode", "run", "sweep")
            with run_dir_lock(args.run_dir, enabled=writes and dist.is_main()):
                output = _dispatch(args, device)
        if output is not None and dist.is_main():
            _print(output)
        return 0
    except LdmError as err:
        _say(f"error: {err}")
        return err.exit_code
    except KeyboardInterrupt:
        _say("interrupted; checkpoints are kept: rerun with --resume (ldm run resumes by itself)")
        return 130
    finally:
        dist.shutdown()


def _print(output: str) -> None:
    """The command's result on stdout; a reader that stops early (`| head`) is no error."""
    try:
        print(output, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit


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
        header = stages.encode(_dataset(args), RunDir(args.run_dir), options.latent_mode,
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
