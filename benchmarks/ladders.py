"""How far a few-step ODE solver lands from the converged ODE, for ladders with other ends.

    python benchmarks/ladders.py --data-dir ../shared/data/mnist --run-dir runs/default -n 2000 \\
        --variants dpmpp-2m,logsnr,10,0.0064:dpmpp-2m,logsnr,10,0.1:heun,karras,10,0.1

Each variant is SAMPLER,SPACING,STEPS,SIGMA_MIN (karras or logsnr levels from sigma_max = 80
down to SIGMA_MIN, then 0). Every variant starts from the same N noises as the reference, DDIM
with 500 steps on the model's timestep grid (the ODE's own limit: DDIM-50 to DDIM-1000 differ
by 2% in FID), and reports the RMS distance of its latents to the reference's and the FID of
its decoded images under the run's classifier. The RMS distance measures the solver alone; FID
also rewards errors that happen to look like data, so the ladder's end is chosen by the former
(`denoiser.LADDER_SIGMA_MIN`).
"""

from __future__ import annotations

import time

import torch

from common import emit, parser, setup
from latentdiffusion import data
from latentdiffusion.data import load_dataset
from latentdiffusion.diffusion import SAMPLERS
from latentdiffusion.diffusion.denoiser import noise_levels
from latentdiffusion.evaluation.metrics import FeatureStats, classify, frechet_distance
from latentdiffusion.models import VAE
from latentdiffusion.rng import generator, randn
from latentdiffusion.run import checkpoint, latents, scores
from latentdiffusion.run.generation import load_diffusion, stored_mean
from latentdiffusion.run.rundir import RunDir


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("-n", "--num-samples", type=int, default=2000)
    p.add_argument("--variants", default="dpmpp-2m,logsnr,10,0.1:heun,karras,10,0.1")
    p.add_argument("--reference-steps", type=int, default=500)
    args = p.parse_args()
    device = setup(args)
    run, n = RunDir(args.run_dir), args.num_samples
    dataset = load_dataset(args.data_dir)
    vae, vae_header = checkpoint.load_model(run.model("vae"), VAE, device)
    unet, objective, header = load_diffusion(run, checkpoint.model_hash_of(vae_header), device)
    denoiser = objective.denoiser(unet, stored_mean(header, device))
    shift, scale = tuple(header["shift"]), tuple(header["scale"])
    classifier, reference = scores.reference(dataset, run, device)
    c, s = vae.config.latent_channels, vae.config.latent_size
    noise = randn((n, c, s, s), [generator(0, i) for i in range(n)], device)  # (N, C, S, S)

    def solve(name: str, sigmas: torch.Tensor) -> torch.Tensor:
        out = []
        for start in range(0, n, 500):
            x = denoiser.prior(noise[start:start + 500], float(sigmas[0]))
            out.append(SAMPLERS[name].function(denoiser, x, sigmas))
        return torch.cat(out)

    def fid(x0: torch.Tensor) -> float:
        images = data.to_uint8(torch.cat([vae.decode(latents.denormalise(x0[i:i + 500], shift,
                                                                          scale))
                                          for i in range(0, n, 500)]))
        stats = FeatureStats.from_features(classify(classifier, images, device)[0])
        return frechet_distance(stats.mean, stats.cov, reference.stats.mean,
                                reference.stats.cov)

    start = time.perf_counter()
    exact = solve("ddim", noise_levels(denoiser, "timesteps", args.reference_steps))
    results = {"reference": {"sampler": f"ddim-{args.reference_steps}", "fid": fid(exact),
                             "seconds": time.perf_counter() - start},
               "model_sigma_min": denoiser.sigma_min, "variants": {}}
    for variant in args.variants.split(":"):
        name, spacing, steps, sigma_min = variant.split(",")
        levels = noise_levels(denoiser, spacing, int(steps), float(sigma_min))  # type: ignore[arg-type]
        x0 = solve(name, levels)
        results["variants"][variant] = {
            "nfe": SAMPLERS[name].model_calls(int(steps)),
            "rms_to_reference": (x0 - exact).square().mean().sqrt().item(), "fid": fid(x0)}
    emit({"run_dir": str(run.root), "n": n, **results})


if __name__ == "__main__":
    main()
