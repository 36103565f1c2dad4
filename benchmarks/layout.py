"""Milliseconds per training step and per inference batch of each model, NCHW vs channels-last.

    python benchmarks/layout.py --preset default
Synthetic inputs at the preset's sizes and batch sizes; no data or run directory needed. The
library trains and samples channels-last (`models.to_device`); this shows why on this machine.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from common import emit, parser, setup
from latentdiffusion.models import VAE, Classifier, UNet
from latentdiffusion.models.autoencoder_losses import vae_loss
from latentdiffusion.run.config import TrainConfig
from latentdiffusion.run.presets import preset
from latentdiffusion.run.training import adamw

Loss = Callable[[nn.Module], torch.Tensor]


def _milliseconds(work: Callable[[], object], repeats: int) -> float:
    for _ in range(3):
        work()  # warm-up: oneDNN picks and caches its kernels
    start = time.perf_counter()
    for _ in range(repeats):
        work()
    return (time.perf_counter() - start) / repeats * 1e3


def _train_step(model: nn.Module, loss: Loss, repeats: int) -> float:
    optimizer = adamw(model, TrainConfig(lr=1e-4))  # the library's optimizer

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss(model).backward()
        optimizer.step()

    return _milliseconds(step, repeats)


def _inference(model: nn.Module, forward: Loss, repeats: int) -> float:
    with torch.inference_mode():
        return _milliseconds(lambda: forward(model.eval()), repeats)


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args()
    setup(args)
    config = preset(args.preset)
    g = torch.Generator().manual_seed(0)
    c, s = config.unet.in_channels, config.unet.latent_size

    def images(n: int) -> torch.Tensor:
        return torch.rand(n, 1, 28, 28, generator=g)

    def latents(n: int) -> torch.Tensor:
        return torch.randn(n, c, s, s, generator=g)

    def timesteps(n: int) -> torch.Tensor:
        return torch.randint(0, config.schedule.num_timesteps, (n,), generator=g)

    clf_b, vae_b = config.classifier_train.batch_size, config.vae_train.batch_size
    unet_b, sample_b = config.diffusion_train.batch_size, config.sampling.batch_size
    x_clf, y_clf = images(clf_b), torch.randint(0, 10, (clf_b,), generator=g)
    x_vae, z_noise = images(vae_b), latents(vae_b)
    x_unet, t_unet = latents(unet_b), timesteps(unet_b)
    x_sample, t_sample = latents(sample_b), timesteps(sample_b)
    x_eval = images(500)  # metrics.classify's batch
    cases: dict[str, tuple[Callable[[], nn.Module], str, Loss]] = {
        "classifier_train_step": (lambda: Classifier(config.classifier), "train",
                                  lambda m: F.cross_entropy(m(x_clf), y_clf)),
        "classifier_features_500": (lambda: Classifier(config.classifier), "infer",
                                    lambda m: m.features(x_eval)),  # type: ignore[operator]
        "vae_train_step": (lambda: VAE(config.vae), "train",
                           lambda m: vae_loss(m, x_vae, z_noise, config.vae.kl_weight)),  # type: ignore[arg-type]
        "unet_train_step": (lambda: UNet(config.unet), "train",
                            lambda m: m(x_unet, t_unet).square().mean()),
        f"unet_forward_{sample_b}": (lambda: UNet(config.unet), "infer",
                                     lambda m: m(x_sample, t_sample)),
    }
    result: dict = {"benchmark": "layout", "preset": args.preset, "milliseconds": {}}
    for name, (build, mode, work) in cases.items():
        timing = {}
        for layout, memory_format in (("nchw", torch.contiguous_format),
                                      ("channels_last", torch.channels_last)):
            torch.manual_seed(0)
            model = build().to(memory_format=memory_format)  # type: ignore[call-overload]
            run = _train_step if mode == "train" else _inference
            timing[layout] = round(run(model, work, args.repeats), 2)
        timing["speedup"] = round(timing["nchw"] / timing["channels_last"], 2)
        result["milliseconds"][name] = timing
    emit(result)


if __name__ == "__main__":
    main()
