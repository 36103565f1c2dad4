"""Retrain part of a finished run with some config values changed and score its samples: the
quick way to compare an autoencoder or a denoiser change on the run's own classifier.

    python benchmarks/variant.py --base runs/fashion --out bench-out/variant/se1 \\
        --set vae.scale_equivariance=1 --set diffusion_train.steps=3000 --train vae,diffusion \\
        -n 2000 --samples ddpm-20,ddpm-50 --autoguidance 1

--base is a run directory made by `ldm run` (its config, data set and models are the start);
--set changes its config as `ldm run --set` does. --train names the models trained again in
--out, in order: `vae` (then its latents are encoded again), `diffusion`, `guide`; the others
are copied from --base. Prints the reconstruction FID of the test images and, per sampler and
autoguidance scale, FID, precision and recall of n samples (seed 1), each against the base
run's classifier and data.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np

from common import emit, setup
from latentdiffusion import Pipeline
from latentdiffusion.data import load_dataset
from latentdiffusion.data.prepare import PrepareConfig
from latentdiffusion.run import recipe, scores, stages
from latentdiffusion.run.config import RunConfig
from latentdiffusion.run.rundir import RunDir, read_manifest, recorded_preparation
from latentdiffusion.schema import from_dict

MODELS = ("vae", "diffusion", "guide")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--base", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--train", default="diffusion", help="comma-separated: vae, diffusion, guide")
    p.add_argument("-n", "--num-samples", type=int, default=2000)
    p.add_argument("--samples", default="ddpm-20", help="comma-separated samplers")
    p.add_argument("--autoguidance", default="1", help="comma-separated guide scales (1: off)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    train = [name for name in args.train.split(",") if name]
    if unknown := sorted(set(train) - set(MODELS)):
        p.error(f"--train: unknown {', '.join(unknown)} (choose from {', '.join(MODELS)})")
    device = setup(args)
    manifest = read_manifest(args.base / "run.json")
    c = recipe.apply_sets(from_dict(RunConfig, manifest["config"]), args.set)
    args.out.mkdir(parents=True, exist_ok=True)
    copied = ["run.json", "classifier.safetensors"] + [
        f"{name}.safetensors" for name in MODELS if name not in train]
    if "vae" not in train:
        copied.append("latents.safetensors")
    for name in copied:
        if (args.base / name).exists():  # a run without a guide has no guide.safetensors
            shutil.copy(args.base / name, args.out / name)
    run = RunDir(args.out)
    # the data as the base run prepared it, loaded once for every stage and score
    dataset = load_dataset(manifest["data_dir"], None,
                           recorded_preparation(manifest) or PrepareConfig())
    result: dict = {"benchmark": "variant", "base": str(args.base), "sets": args.set,
                    "train": train, "n": args.num_samples}
    for name in train:  # each stage as `ldm run` calls it
        start = time.perf_counter()
        if name == "vae":
            stages.train_vae(dataset, run, c.vae, c.vae_train, device=device, progress=False,
                             augment=c.augment)
            stages.encode(dataset, run, c.latent_mode, c.latent_norm, device=device,
                          seed=c.vae_train.seed, augment=c.augment)
        else:
            unet, train_config = ((c.unet, c.diffusion_train) if name == "diffusion"
                                  else (c.guide_unet, c.guide_train))
            stages.train_diffusion(run, unet, c.schedule, c.objective, train_config,
                                   device=device, progress=False, name=name,
                                   train_limit=c.train_limit)
        result[f"{name}_seconds"] = time.perf_counter() - start
    pipeline = Pipeline.load(args.out, device="cpu")

    def score(images: np.ndarray) -> dict:
        return scores.evaluate(dataset, run, images, None, device=device)

    # the test images' reconstructions, N = the test split
    result["reconstruction_fid"] = score(pipeline.decode(pipeline.encode(dataset.test_images)))[
        "fid"]
    for sampler in args.samples.split(","):
        for scale in map(float, args.autoguidance.split(",")):
            found = score(pipeline.sample(args.num_samples, sampler=sampler, seed=1,
                                        autoguidance=scale))
            result[f"{sampler}@{scale:g}"] = {k: found[k] for k in ("fid", "precision",
                                                                    "recall")}
    emit(result)


if __name__ == "__main__":
    main()
