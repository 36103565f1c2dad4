"""The `ldm` commands, each a function of the parsed arguments that returns the JSON it prints."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from .. import data
from .. import distributed as dist
from ..api import export
from ..api.experiment import run_stages, shape_of
from ..api.pipeline import diffusion_samples
from ..data import Dataset, load_dataset
from ..errors import UsageError
from ..evaluation import checks
from ..evaluation.image_files import save_png_folder
from ..evaluation.metrics import random_images
from ..evaluation.samples import load_samples, save_samples
from ..evaluation.tables import scored_sets
from ..files import strict_json, write_json
from ..run import checkpoint, generation, recipe, scores, stages, sweeps
from ..run.config import RunConfig
from ..run.pipeline import StageEvent, refresh_report
from ..run.progress import RunWatch, cached_scorer
from ..run.resume import Resume
from ..run.rundir import RunDir
from .options import (
    guidance_scales,
    integers,
    prepare_of,
    run_config,
    run_options,
    sampling_request,
)


def dataset_of(args: argparse.Namespace) -> Dataset:
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
    return load_dataset(args.data_dir, args.dataset, prepare_of(args))


def _train(args: argparse.Namespace, device: Any) -> str:
    dataset = dataset_of(args) if args.model in ("classifier", "vae") else None
    config, train_config, schedule = args.resolved  # main built them for this data
    run = RunDir(args.run_dir)
    name = args.model
    has_state = any(run.state_dir(name).glob("step-*.safetensors"))
    if not (args.resume or args.force) and (run.model(name).exists() or has_state):
        raise UsageError(f"{run.root} already has a {name} model or checkpoints; pass --resume "
                         "to continue or --force to start over")
    progress = not args.quiet
    resume: Resume = "strict" if args.resume else "off"  # --force: "off" as well
    # The progress FID needs the reference statistics an evaluation cached (no data set here).
    watch = RunWatch(config.monitor, run, config.sampling)
    watch.check((name,))
    watch.scorer = cached_scorer(run, device) if name == "diffusion" else None
    if dataset is not None and name == "classifier":
        trained = stages.train_classifier(dataset, run, config.classifier, train_config,
                                          device=device, resume=resume, progress=progress,
                                          watch=watch)
    elif dataset is not None:
        trained = stages.train_vae(dataset, run, config.vae, train_config, device=device,
                                   resume=resume, progress=progress, augment=config.augment,
                                   watch=watch)
    else:  # the denoiser, or with a smaller UNet autoguidance's guide
        unet = config.guide_unet if name == "guide" else config.unet
        trained = stages.train_diffusion(run, unet, schedule, config.objective, train_config,
                                         device=device, resume=resume, progress=progress,
                                         name=name, train_limit=config.train_limit, watch=watch)
    header = trained.header
    last = header["history"][-1] if header["history"] else {}
    return strict_json({"model": str(run.model(name)), "train_seconds": header["train_seconds"],
                       **last})


def _sample(args: argparse.Namespace, device: Any) -> str | None:
    run = RunDir(args.run_dir)
    labels = None
    made: dict[str, Any] = {}  # which sampler made the set and its model calls (NFE)
    if args.reconstruct:
        if args.model != "vae":
            raise UsageError("--reconstruct works with --model vae")
        if args.reconstruct not in ("train", "test"):
            raise UsageError(f"--reconstruct: unknown split {args.reconstruct!r} (choose from "
                             "train, test)")
        images, labels = generation.reconstruct(dataset_of(args), run, args.reconstruct,
                                                device=device, precision=args.precision)
    else:
        request = sampling_request(args)
        if args.model == "diffusion":  # the function Pipeline.sample calls
            samples = diffusion_samples(run, args.num_samples, request, seed=args.seed,
                                        device=device, batch_size=args.batch_size,
                                        progress=not args.quiet, precision=args.precision)
            images, labels, made = samples.images, samples.labels, samples.made
        else:
            images = generation.generate(run, "vae", args.num_samples, args.seed,
                                         device=device, batch_size=args.batch_size,
                                         progress=not args.quiet, precision=args.precision)
    if not dist.is_main():
        return None
    if args.format == "png":
        save_png_folder(args.out, images, labels, **made)
    else:
        save_samples(args.out, images, labels, **made)
    return strict_json({"out": str(args.out), "n": len(images), **made})


def _evaluate(args: argparse.Namespace, device: Any) -> str:
    run = RunDir(args.run_dir)
    samples = None if args.baselines else load_samples(args.samples)  # a bad file first
    checkpoint.load(run.model("classifier"), kind="classifier")  # then a missing model
    if samples is None:
        dataset = dataset_of(args)
        test_images, test_labels = dataset.split("test")
        result: dict[str, Any] = {
            "validation": scores.evaluate(dataset, run, test_images, test_labels,
                                          device=device, seed=args.seed),
            "random": scores.evaluate(dataset, run,
                                      random_images(dataset.train_images, len(test_images),
                                                    args.seed),
                                      None, device=device, seed=args.seed)}
        found = checks.random_row({name: m["fid"] for name, m in result.items()})
        result["warnings"] = [found.as_dict()] if found else []
    else:
        images, labels = samples
        result = scores.evaluate(dataset_of(args), run, images, labels, device=device,
                                 seed=args.seed, nearest=args.nearest)
    if args.out and dist.is_main():
        write_json(args.out, result)
    _warn(result)
    return strict_json(result)


def _warn(result: dict[str, Any]) -> None:
    """One stderr line per finding of the evaluation's checks (in `result` or its sets)."""
    found = [*result.get("warnings", []),
             *(w for m in result.values() if isinstance(m, dict) for w in m.get("warnings", []))]
    for message in dict.fromkeys(w["message"] for w in found):
        print(f"warning: {message}", file=sys.stderr)


def _sweep(args: argparse.Namespace, device: Any) -> str:
    if args.guidance is not None:
        return _guidance_sweep(args, device)
    result = sweeps.run_sweep(RunDir(args.run_dir), dataset_of(args), args.samplers.split(","),
                       integers(args.nfe, "--nfe"), args.num_samples, seed=args.seed,
                       device=device, batch_size=args.batch_size, progress=not args.quiet,
                       autoguidance=args.autoguidance)
    refreshed = refresh_report(args.run_dir, dataset_of(args)) if dist.is_main() else False
    return strict_json({"sweep": str(args.run_dir / "sweep.json"), "report_updated": refreshed,
                       **sweeps.summary(result)})


def _guidance_sweep(args: argparse.Namespace, device: Any) -> str:
    specs = sweeps.pairs(args.samplers.split(","), integers(args.nfe, "--nfe"))
    result = sweeps.run_guidance_sweep(RunDir(args.run_dir), dataset_of(args), specs[0],
                                guidance_scales(args.guidance, specs), args.num_samples,
                                seed=args.seed, device=device, batch_size=args.batch_size,
                                progress=not args.quiet)
    refreshed = refresh_report(args.run_dir, dataset_of(args)) if dist.is_main() else False
    return strict_json({"guidance": str(args.run_dir / "guidance.json"),
                        "report_updated": refreshed, **sweeps.guidance_summary(result)})


def _run(args: argparse.Namespace, device: Any) -> str:
    def show(event: StageEvent) -> None:
        if not args.quiet:
            status = "skipped (up to date)" if event.skipped else f"{event.seconds:.1f} s"
            tqdm.write(f"[{event.name}] {status}: {event.summary}", file=sys.stderr)

    # The config main built for this data; the stages under the lock, as `latentdiffusion.run`
    metrics = run_stages(args.resolved, args.run_dir, dataset_of(args), run_options(args),
                         device=device, force=args.force, progress=not args.quiet,
                         on_stage=show, command=shlex.join(["ldm", *args.argv]))
    _warn(metrics)
    summary = {name: {"n": m["n"], "fid": round(m["fid"], 4)}
               for name, m in scored_sets(metrics).items()}
    return strict_json({"run_dir": str(args.run_dir), "report": str(args.run_dir / "report.html"),
                       "fid": summary})


def config_command(args: argparse.Namespace, argv: Sequence[str]) -> str:
    header = f"ldm {shlex.join(argv)}; run it with: ldm run --config FILE"
    shape = shape_of(dataset_of(args)) if args.data_dir or args.dataset else None
    return recipe.dumps(run_config(args, shape), args.format, header)


def data_command(args: argparse.Namespace) -> str:
    if args.action == "verify":
        if args.dataset is None:  # any source, described by content (no published checksum)
            return strict_json(load_dataset(args.data_dir, prepare=prepare_of(args)).describe())
        if args.image_size:
            raise UsageError("--image-size describes any data without --dataset; --dataset "
                             "checks the release's files as they are")
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


def dispatch(args: argparse.Namespace, device: Any) -> str | None:
    if args.command == "train":
        return _train(args, device)
    if args.command == "encode":
        # The config checks both choices, with the same one-line error as every other value.
        options = RunConfig(latent_mode=args.latent_mode, latent_norm=args.latent_norm,
                            augment=args.augment)
        header = stages.encode(dataset_of(args), RunDir(args.run_dir), options.latent_mode,
                               options.latent_norm, device=device, seed=args.seed,
                               augment=options.augment)
        return strict_json({"latents": str(args.run_dir / "latents.safetensors"),
                           "shift": header["shift"], "scale": header["scale"],
                           "mode": header["mode"]})
    if args.command == "sample":
        return _sample(args, device)
    if args.command == "evaluate":
        return _evaluate(args, device)
    if args.command == "sweep":
        return _sweep(args, device)
    if args.command == "export":
        return strict_json(export(args.run_dir, args.out, license=args.license))
    return _run(args, device)

