"""Ablations of the diffusion recipe on a shared classifier + VAE + latents (--run-dir must hold
them, e.g. after benchmarks/diffusion.py): each variant trains its own denoiser in a subfolder
and is scored with the same sampler and N.

    python benchmarks/ablation.py --data-dir ../shared/data/mnist --run-dir bench-out/default \\
        --steps 3748 -n 2000
Variants: the preset (v-prediction with min-SNR weights and t drawn by importance, one global
latent scale, cosine schedule, GroupNorm, EMA, batch 64, DDPM with beta_tilde); the post's noise
target with uniform weights and t; each of v and min-SNR alone; uniformly drawn t; min-SNR-5
(the paper's gamma); AdamW's default beta2 = 0.999; per-channel latent standardisation; the
post's linear schedule; no EMA; InstanceNorm (the post's block); batch 256; and DDPM with
sigma^2 = beta instead of beta_tilde. Flow matching variants (same UNet and latents): the
preset with `kind="flow"` (logit-normal t), with uniform t, at half and at twice the learning
rate, with t drawn toward the noise or the data (logit mean +-0.5: 69% of draws on that side of
t = 0.5), closer to the middle (logit std 0.5 and 0.3), and without EMA.
`--sampler a,b` scores each variant with every sampler named (the first gives `fid`).
"""

from __future__ import annotations

import dataclasses
import shutil
import time

from common import emit, parser, setup
from latentdiffusion.data import load_dataset
from latentdiffusion.diffusion import SamplingRequest
from latentdiffusion.diffusion.objective import ObjectiveConfig
from latentdiffusion.run import stages
from latentdiffusion.run.config import RunConfig
from latentdiffusion.run.generation import generate
from latentdiffusion.run.presets import preset
from latentdiffusion.run.rundir import RunDir
from latentdiffusion.run.scores import evaluate


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--steps", type=int, default=3748, help="denoiser steps (4 MNIST epochs)")
    p.add_argument("-n", "--num-samples", type=int, default=2000)
    p.add_argument("--sampler", default="ddpm-250",
                   help="sampler(s) used for every variant, comma-separated")
    p.add_argument("--variants", help="comma-separated subset to run (default: all)")
    args = p.parse_args()
    device = setup(args)
    config = preset(args.preset)
    r = dataclasses.replace
    c = r(config, diffusion_train=r(config.diffusion_train, steps=args.steps))
    variants: dict[str, tuple[RunConfig, str]] = {
        "baseline": (c, "beta_tilde"),
        "post_objective_noise_uniform": (r(c, objective=ObjectiveConfig()), "beta_tilde"),
        "noise_min_snr": (r(c, objective=r(c.objective, prediction="noise")), "beta_tilde"),
        "v_uniform": (r(c, objective=r(c.objective, min_snr_gamma=0.0)), "beta_tilde"),
        "uniform_timesteps": (r(c, objective=r(c.objective, timestep_sampling="uniform")),
                              "beta_tilde"),
        "min_snr_5": (r(c, objective=r(c.objective, min_snr_gamma=5.0)), "beta_tilde"),
        "adam_beta2_0999": (r(c, diffusion_train=r(c.diffusion_train, adam_beta2=0.999)),
                            "beta_tilde"),
        "channel_latent_scale": (r(c, latent_norm="channel"), "beta_tilde"),
        "linear_schedule": (r(c, schedule=r(c.schedule, kind="linear")), "beta_tilde"),
        "no_ema": (r(c, diffusion_train=r(c.diffusion_train, ema_decay=0.0)), "beta_tilde"),
        "instance_norm": (r(c, unet=r(c.unet, norm="instance")), "beta_tilde"),
        "batch_256": (r(c, diffusion_train=r(c.diffusion_train, batch_size=256)), "beta_tilde"),
        "variance_beta": (c, "beta"),
        "flow": (r(c, objective=r(c.objective, kind="flow")), "beta_tilde"),
        "flow_uniform_time": (r(c, objective=r(c.objective, kind="flow",
                                                time_density="uniform")), "beta_tilde"),
        "flow_lr_half": (r(c, objective=r(c.objective, kind="flow"),
                           diffusion_train=r(c.diffusion_train, lr=c.diffusion_train.lr / 2)),
                         "beta_tilde"),
        "flow_lr_double": (r(c, objective=r(c.objective, kind="flow"),
                             diffusion_train=r(c.diffusion_train, lr=c.diffusion_train.lr * 2)),
                           "beta_tilde"),
        "flow_time_noisier": (r(c, objective=r(c.objective, kind="flow", logit_mean=0.5)),
                              "beta_tilde"),
        "flow_time_cleaner": (r(c, objective=r(c.objective, kind="flow", logit_mean=-0.5)),
                              "beta_tilde"),
        "flow_time_narrow": (r(c, objective=r(c.objective, kind="flow", logit_std=0.5)),
                             "beta_tilde"),
        "flow_time_narrower": (r(c, objective=r(c.objective, kind="flow", logit_std=0.3)),
                               "beta_tilde"),
        "flow_no_ema": (r(c, objective=r(c.objective, kind="flow"),
                          diffusion_train=r(c.diffusion_train, ema_decay=0.0)), "beta_tilde"),
    }
    if args.variants:
        chosen = args.variants.split(",")
        unknown = sorted(set(chosen) - set(variants))
        if unknown:
            p.error(f"unknown variant(s) {', '.join(unknown)} (choose from {', '.join(variants)})")
        if "variance_beta" in chosen and "baseline" not in chosen:
            p.error("variance_beta samples the baseline's denoiser: add baseline")
        variants = {name: variants[name] for name in variants if name in chosen}
    base = RunDir(args.run_dir)
    dataset = load_dataset(args.data_dir)
    validation = evaluate(dataset, base, *dataset.split("test"), device=device)
    result: dict = {"benchmark": "ablation", "steps": args.steps, "n": args.num_samples,
                    "sampler": args.sampler, "validation_fid": validation["fid"]}
    for name, (v, variance) in variants.items():
        run = RunDir(args.run_dir / "ablation" / name)
        run.root.mkdir(parents=True, exist_ok=True)
        for f in ("classifier", "vae"):
            shutil.copy(base.model(f), run.model(f))
        if v.latent_norm == config.latent_norm:
            shutil.copy(base.latents, run.latents)
        else:
            stages.encode(dataset, run, v.latent_mode, v.latent_norm, device=device,
                          seed=v.vae_train.seed)
        start = time.perf_counter()
        if name != "variance_beta":  # same denoiser as the baseline, other sampler variance
            stages.train_diffusion(run, v.unet, v.schedule, v.objective, v.diffusion_train,
                                   device=device, progress=False)
        else:
            shutil.copy(args.run_dir / "ablation" / "baseline" / "diffusion.safetensors",
                        run.model("diffusion"))
        seconds = time.perf_counter() - start
        scores = {}
        for sampler in args.sampler.split(","):
            request = SamplingRequest.of(sampler, variance=variance)
            images = generate(run, "diffusion", args.num_samples, seed=1, request=request,
                              device=device, progress=False)
            m = evaluate(dataset, base, images, None, device=device)
            scores[sampler] = {"fid": m["fid"], "fid_over_validation": m["fid"] / validation["fid"],
                               "class_entropy_bits": m["class_entropy_bits"],
                               "precision": m["precision"], "recall": m["recall"]}
        result[name] = {**next(iter(scores.values())), "train_seconds": seconds,
                        "samplers": scores}
    emit(result)


if __name__ == "__main__":
    main()
