"""Encode latents, train the latent diffusion model, sample and score against the Validation row.

    python benchmarks/diffusion.py --data-dir ../shared/data/mnist --run-dir bench-out/default \\
        --samplers ddim-50,ddpm -n 10000
Needs the run's classifier and VAE (benchmarks/classifier.py, benchmarks/vae.py). Bars: training
<= 600 s on 2 cores; FID <= 10x Validation; DDIM-50 within 15% of DDPM-1000; 10k DDIM-50
digits (decoding included) in <= 120 s. Also prints the UNet's FLOPs per sample and step.
"""

from __future__ import annotations

import dataclasses
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from common import emit, parser, setup
from latentdiffusion.data import load_dataset
from latentdiffusion.diffusion import SamplingRequest
from latentdiffusion.models import UNet
from latentdiffusion.run import stages
from latentdiffusion.run.generation import generate
from latentdiffusion.run.presets import preset
from latentdiffusion.run.rundir import RunDir
from latentdiffusion.run.scores import evaluate


def unet_flops(config) -> int:  # type: ignore[no-untyped-def]
    """Forward FLOPs of one sample at one timestep (2 per multiply-add)."""
    model = UNet(config).eval()
    x = torch.zeros(1, config.in_channels, config.latent_size, config.latent_size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, torch.zeros(1, dtype=torch.long))
    return int(counter.get_total_flops())


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--samplers", default="ddim-50,ddpm")
    p.add_argument("-n", "--num-samples", type=int, default=10_000)
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--steps", type=int, help="override the preset's denoiser steps")
    args = p.parse_args()
    device = setup(args)
    config = preset(args.preset)
    train_config = config.diffusion_train
    if args.steps:
        train_config = dataclasses.replace(train_config, steps=args.steps)
    run = RunDir(args.run_dir)
    dataset = load_dataset(args.data_dir)
    result: dict = {"benchmark": "diffusion", "preset": args.preset,
                    "unet_parameters": sum(p.numel() for p in UNet(config.unet).parameters()),
                    "unet_flops_per_sample_step": unet_flops(config.unet)}
    if not args.skip_train:
        start = time.perf_counter()
        stages.encode(dataset, run, config.latent_mode, config.latent_norm, device=device,
                      seed=config.vae_train.seed)
        result["encode_seconds"] = time.perf_counter() - start
        start = time.perf_counter()
        header = stages.train_diffusion(run, config.unet, config.schedule, config.objective,
                                        train_config, device=device, progress=False).header
        result["train_seconds"] = time.perf_counter() - start
        result["history"] = header["history"]
    validation = evaluate(dataset, run, *dataset.split("test"), device=device)
    result["validation_fid"] = validation["fid"]
    for spec in args.samplers.split(","):
        start = time.perf_counter()
        images = generate(run, "diffusion", args.num_samples, seed=1,
                          request=SamplingRequest.of(spec), device=device, progress=False)
        seconds = time.perf_counter() - start
        m = evaluate(dataset, run, images, None, device=device)
        result[spec] = {"n": m["n"], "fid": m["fid"], "fid_over_validation":
                        m["fid"] / validation["fid"], "kid_mean": m["kid_mean"],
                        "precision": m["precision"], "recall": m["recall"],
                        "class_entropy_bits": m["class_entropy_bits"],
                        "seconds": seconds, "samples_per_second": args.num_samples / seconds}
    emit(result)


if __name__ == "__main__":
    main()
