"""The presets: `tiny` (tests), `quick` (about a minute on 2 CPU cores) and `default` (the full
experiment), each a RunConfig for MNIST that `for_images` scales to other images.

Every training length is a number of optimizer steps, the same for any data set: on MNIST's
60,000 training images the default's classifier trains 936 steps at batch 128 (2 epochs), the
VAE 2,340 (5 epochs), the denoiser 7,496 at batch 64 (8 epochs) and its guide 937 (1 epoch); a
set of 3,000 images gets the same steps over 20 times the epochs (docs/recipe.md)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from ..diffusion.objective import ObjectiveConfig
from ..diffusion.schedule import ScheduleConfig
from ..errors import UsageError
from ..models.classifier import ClassifierConfig
from ..models.unet import UNetConfig
from ..models.vae import VAEConfig
from .config import GuideConfig, RunConfig, SamplingConfig, TrainConfig
from .monitor import MonitorConfig

# The presets' denoiser objective: v-prediction with min-SNR-2, t drawn by importance
# (docs/recipe.md; gamma 2 and 3 beat the paper's 5 with importance sampling).
_OBJECTIVE = ObjectiveConfig(prediction="v", min_snr_gamma=2.0, timestep_sampling="importance")


def _tiny() -> RunConfig:
    """Seconds on synthetic data: for tests only."""
    train = TrainConfig(steps=6, batch_size=16, lr=2e-3, checkpoint_every=4)
    return RunConfig(
        classifier=ClassifierConfig(channels=4, feature_dim=16),
        classifier_train=train,
        vae=VAEConfig(latent_channels=2, channels=(4, 8)),
        vae_train=train,
        unet=UNetConfig(in_channels=2, channels=(8, 16), time_dim=8, groups=4),
        schedule=ScheduleConfig(num_timesteps=50, beta_start=1e-3, beta_end=0.2),  # ends ~noise
        objective=_OBJECTIVE,
        diffusion_train=dataclasses.replace(train, ema_decay=0.9),
        guide=GuideConfig(channels=(4, 8), steps=6),
        sampling=SamplingConfig(num_samples=24, samplers=("ddim-5", "ddpm"), batch_size=16,
                                autoguidance=2.0),
        eval_samples=24,
        monitor=MonitorConfig(samples=False),  # the logs only
    )


def _quick() -> RunConfig:
    """About two minutes on 2 CPU cores for MNIST: rough but recognisable digits."""
    return RunConfig(
        classifier=ClassifierConfig(channels=8),
        classifier_train=TrainConfig(steps=468, batch_size=128, lr=3e-3, weight_decay=1e-4,
                                     warmup_steps=50),
        vae=VAEConfig(channels=(8, 16)),
        # 936 VAE steps, not 468: half learns shapes but not yet colour (gray reconstructions
        # of colour images, FID 365x -> 10.4x Validation; samples 462x -> 121x); on MNIST the
        # samples score as before (110.8 vs 109.1) for 8 s more (docs/recipe.md).
        vae_train=TrainConfig(steps=936, batch_size=128, lr=8e-3, warmup_steps=50),
        unet=UNetConfig(channels=(16, 32), time_dim=32),
        objective=_OBJECTIVE,
        diffusion_train=TrainConfig(steps=234, batch_size=256, lr=8e-3, ema_decay=0.99,
                                    warmup_steps=50, weight_decay=1e-4),
        # Autoguidance by an (8, 16) guide of 234 steps (8 s): `ddpm-20` FID 110.8 -> 95.1 at
        # scale 1.5 (89.4 at 2; 2,000 digits; docs/results.md).
        guide=GuideConfig(channels=(8, 16), steps=234),
        sampling=SamplingConfig(num_samples=2000, samplers=("ddpm-20",), autoguidance=1.5),
        eval_samples=2000,
        # A grid every 100 steps: 3 of the denoiser, each scored on 500 samples (1,000 took
        # 18% of the run's time; docs/monitoring.md).
        monitor=MonitorConfig(sample_every=100, score_samples=500),
    )


def _default() -> RunConfig:
    """About 7 minutes on 2 CPU cores for MNIST (docs/results.md)."""
    return RunConfig(
        # 936 steps (2 MNIST epochs) with 1-pixel shifts at lr 5e-3: 99.47% test accuracy,
        # where 3 epochs with 2-pixel shifts at 3e-3 took 50% longer for 99.42% (docs/recipe.md).
        classifier=ClassifierConfig(channels=16, augment_shift=1),
        classifier_train=TrainConfig(steps=936, batch_size=128, lr=5e-3, weight_decay=1e-4,
                                     warmup_steps=200),
        vae=VAEConfig(channels=(16, 32)),
        vae_train=TrainConfig(steps=2340, batch_size=128, lr=4e-3, warmup_steps=100),
        # On this VAE's latents one global scale beat per-channel standardisation in both
        # ablations (FID 76.3 vs 85.1 and 173 vs 187; docs/recipe.md).
        latent_norm="global",
        unet=UNetConfig(channels=(32, 48), time_dim=32),
        # The cosine schedule with v-prediction: FID 62.5 -> 53.9 (docs/recipe.md).
        schedule=ScheduleConfig(kind="cosine"),
        objective=_OBJECTIVE,
        # Batch 64: 4x the optimizer steps of batch 256 for 1.3x the time per MNIST epoch; FID
        # 97.9 -> 64.2 after 3 epochs (docs/recipe.md). 7,496 steps (8 epochs) instead of 5,622
        # (6): FID / Validation 11.3x -> 8.7x (10k).
        diffusion_train=TrainConfig(steps=7496, batch_size=64, lr=8e-3, adam_beta2=0.99,
                                    ema_decay=0.999, warmup_steps=100, weight_decay=1e-4),
        # Respaced ancestral DDPM: better than DDPM-1000 at 1/40 of its cost. The sweep of every
        # sampler at 5 to 50 model calls (docs/results.md): 20 steps score as 25 or
        # 50 (17.94, 17.80, 17.73 at 10k); no sampler gets near that with fewer.
        # Autoguidance by a UNet of a third of the weights trained 937 steps (20 s): `ddpm-20`
        # FID 17.94 -> 5.94 at scale 1.5 (10k digits; 5.86 at 2, with less recall; docs/results.md).
        guide=GuideConfig(channels=(16, 32), steps=937),
        sampling=SamplingConfig(num_samples=10_000, samplers=("ddpm-20",), autoguidance=1.5),
        eval_samples=10_000,
    )


PRESETS = {"tiny": _tiny, "quick": _quick, "default": _default}
PresetName = Literal["tiny", "quick", "default"]


def preset(name: str) -> RunConfig:
    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r} (choose from {', '.join(PRESETS)})")
    return PRESETS[name]()
