"""Frozen, typed configs for every component, the presets, and their (de)serialisation.

Every checkpoint stores its component's config as JSON (nanoGPT-style), and every stage of a run
is keyed by the hash of the configs it was made from, so a changed value redoes exactly the work
that depends on it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, get_args, get_origin

from .errors import UsageError

ScheduleName = Literal["linear", "cosine"]
VarianceName = Literal["beta_tilde", "beta"]
NormName = Literal["group", "instance"]
LatentMode = Literal["sample", "mean"]
LatentNorm = Literal["global", "channel"]
LrDecay = Literal["constant", "cosine"]
PredictionName = Literal["noise", "v"]
TimestepSampling = Literal["uniform", "importance"]
ObjectiveKind = Literal["vp", "flow"]
TimeDensity = Literal["uniform", "logit-normal"]
ClassifierTask = Literal["labels", "rotation"]
# Images one set may hold: generating and scoring keep them and their features in memory.
MAX_SAMPLES = 1_000_000
# Image sizes the models take: square, a multiple of 4 (the classifier pools twice) in this range.
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 16, 64


def _check_image(obj: Any) -> None:
    """The image_size and image_channels fields of a model config."""
    name = type(obj).__name__
    size = obj.image_size
    if size % 4 or not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
        raise UsageError(f"{name}.image_size must be a multiple of 4 from {MIN_IMAGE_SIZE} to "
                         f"{MAX_IMAGE_SIZE}, got {size}")
    if obj.image_channels not in (1, 3):
        raise UsageError(f"{name}.image_channels must be 1 or 3, got {obj.image_channels}")


def _validate(obj: Any, positive: tuple[str, ...] = (), unit: tuple[str, ...] = (),
              nonnegative: tuple[str, ...] = ()) -> None:
    """Raise UsageError for non-finite floats, non-positive `positive`, negative `nonnegative`
    and out-of-[0, 1) `unit`."""
    name = type(obj).__name__
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        values = value if isinstance(value, tuple) else (value,)
        for v in values:
            if isinstance(v, float) and not math.isfinite(v):
                raise UsageError(f"{name}.{f.name} must be finite, got {v}")
            if f.name in positive and isinstance(v, (int, float)) and v <= 0:
                raise UsageError(f"{name}.{f.name} must be > 0, got {v}")
            if f.name in nonnegative and v < 0:
                raise UsageError(f"{name}.{f.name} must be >= 0, got {v}")
            if f.name in unit and not 0.0 <= v < 1.0:
                raise UsageError(f"{name}.{f.name} must be in [0, 1), got {v}")
        hint = typing.get_type_hints(type(obj)).get(f.name)
        if get_origin(hint) is Literal and value not in get_args(hint):
            choices = ", ".join(map(str, get_args(hint)))
            raise UsageError(f"{name}.{f.name}: unknown value {value!r} (choose from {choices})")


@dataclass(frozen=True)
class TrainConfig:
    """How one model is optimised; shared by the classifier, the VAE and the denoiser."""

    epochs: int = 5
    batch_size: int = 128  # global batch: split across ranks under torchrun
    lr: float = 1e-3
    weight_decay: float = 0.0
    adam_beta2: float = 0.999  # AdamW's second-moment decay; 0.99 adapts faster in short runs
    lr_decay: LrDecay = "cosine"
    warmup_steps: int = 0
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    # 0 disables the EMA; the EMA weights are what the stage exports. The decay at step n is
    # min(ema_decay, (1 + n) / (10 + n)): an average over roughly the last 10% of the steps
    # until the cap binds (0.999 binds from step ~9,000 on).
    ema_decay: float = 0.0
    # A crash-safe checkpoint is saved after `checkpoint_every` optimizer steps or
    # `checkpoint_seconds` of wall time, whichever comes first (and at the end). Saving changes
    # no trained number, so neither is part of the stage key.
    checkpoint_every: int = 500
    checkpoint_seconds: float = 60.0
    seed: int = 0

    def __post_init__(self) -> None:
        _validate(self, positive=("epochs", "batch_size", "lr", "checkpoint_every",
                                  "checkpoint_seconds"),
                  unit=("ema_decay", "adam_beta2"), nonnegative=("seed",))
        if self.weight_decay < 0 or self.warmup_steps < 0 or self.grad_clip < 0:
            raise UsageError("TrainConfig: weight_decay, warmup_steps, grad_clip must be >= 0")


@dataclass(frozen=True)
class ClassifierConfig:
    """CNN whose penultimate `feature_dim` layer is the FID feature space (as in the post)."""

    channels: int = 32  # width of the first stage; the second has twice as many
    feature_dim: int = 128
    dropout: float = 0.25
    augment_shift: int = 2  # random translation in pixels during training
    image_size: int = 28  # images (image_channels, image_size, image_size), from the data set
    image_channels: int = 1
    # "labels": the data set's classes. "rotation" (unlabelled data): which of 4 quarter turns
    # an image was given, a self-supervised task (models/classifier.py).
    task: ClassifierTask = "labels"
    num_classes: int = 10

    def __post_init__(self) -> None:
        _validate(self, positive=("channels", "feature_dim"), unit=("dropout",))
        _check_image(self)
        if self.num_classes < 2:
            raise UsageError(f"ClassifierConfig.num_classes must be >= 2, got {self.num_classes}")
        if self.task == "rotation" and self.num_classes != 4:
            raise UsageError("ClassifierConfig: the rotation task has num_classes = 4")

    @property
    def data_classes(self) -> int:
        """The data set's classes it predicts; 0 for the rotation task, whose outputs are not
        classes of the data."""
        return self.num_classes if self.task == "labels" else 0


@dataclass(frozen=True)
class VAEConfig:
    """Conv VAE: images are padded to `padded_size` and halved len(channels) times
    (MNIST: 28 -> 32 -> 16 -> 8)."""

    latent_channels: int = 4
    channels: tuple[int, ...] = (32, 64)
    kl_weight: float = 1e-4  # beta of the KL term per latent element, see models/vae.py
    image_size: int = 28
    image_channels: int = 1

    def __post_init__(self) -> None:
        _validate(self, positive=("latent_channels", "channels"))
        _check_image(self)
        if self.kl_weight < 0:
            raise UsageError(f"VAEConfig.kl_weight must be >= 0, got {self.kl_weight}")
        if not 1 <= len(self.channels) <= 4:
            raise UsageError("VAEConfig.channels must have 1 to 4 entries")

    @property
    def padded_size(self) -> int:
        """The image size rounded up to a multiple of 2**(levels + 1): an even latent size."""
        unit = 2 ** (len(self.channels) + 1)
        return -(-self.image_size // unit) * unit

    @property
    def latent_size(self) -> int:
        return self.padded_size // 2 ** len(self.channels)


@dataclass(frozen=True)
class UNetConfig:
    """Denoiser over latents; every conv block adds a projection of the time embedding."""

    in_channels: int = 4
    latent_size: int = 8
    channels: tuple[int, ...] = (64, 128)  # one level per entry, halving resolution in between
    blocks_per_level: int = 1
    time_dim: int = 64  # width of the sinusoidal embedding
    norm: NormName = "group"  # the post used InstanceNorm2d; see models/unet.py for why not
    groups: int = 8
    # 0: unconditional. K > 0: a class label in 0..K-1 (or K, "no label") is embedded and added
    # to the time embedding (classifier-free guidance, diffusion/guidance.py).
    num_classes: int = 0

    def __post_init__(self) -> None:
        _validate(self, positive=("in_channels", "latent_size", "channels", "blocks_per_level",
                                  "time_dim", "groups"))
        if not self.channels:
            raise UsageError("UNetConfig.channels needs at least one level")
        if self.num_classes < 0:
            raise UsageError(f"UNetConfig.num_classes must be >= 0, got {self.num_classes}")
        if self.time_dim % 2:
            raise UsageError("UNetConfig.time_dim must be even")
        if self.latent_size % 2 ** (len(self.channels) - 1):
            raise UsageError("UNetConfig: latent_size must be divisible by 2**(levels - 1)")
        if any(c % self.groups for c in self.channels):
            raise UsageError("UNetConfig: every channel count must be divisible by groups")


@dataclass(frozen=True)
class ScheduleConfig:
    """Variance schedule of the forward process (post: linear, 1e-4 .. 2e-2, T = 1000)."""

    kind: ScheduleName = "linear"
    num_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 2e-2
    cosine_s: float = 0.008

    def __post_init__(self) -> None:
        _validate(self, positive=("num_timesteps", "beta_start", "beta_end", "cosine_s"))
        if not self.beta_start < self.beta_end < 1:
            raise UsageError("ScheduleConfig: need 0 < beta_start < beta_end < 1")


@dataclass(frozen=True)
class ObjectiveConfig:
    """The denoiser's process, training target and loss weights (see diffusion/objective.py).

    kind="vp" is the post's process: prediction="noise", min_snr_gamma=0, t drawn uniformly in
    the post; the VP presets use "v" with min-SNR-2 and t drawn in proportion to its weight,
    which reach a given FID in far fewer CPU-minutes (README, ablation). kind="flow" is flow
    matching on the straight path (IADB, rectified flow), which reads only the time density
    fields below.
    """

    prediction: PredictionName = "noise"  # vp
    min_snr_gamma: float = 0.0  # vp: 0 = uniform weights over t
    # vp: "importance" draws t with probability proportional to its loss weight and divides the
    # weight back out; the same expected loss with less gradient noise (objective.py).
    timestep_sampling: TimestepSampling = "uniform"
    kind: ObjectiveKind = "vp"
    time_density: TimeDensity = "logit-normal"  # flow: t = sigmoid(logit_mean + logit_std z)
    logit_mean: float = 0.0
    logit_std: float = 1.0
    # A class-conditional model (unet.num_classes > 0) is trained on the "no label" index with
    # this probability, so one network is both D_cond and D_uncond (Ho & Salimans 2022).
    label_dropout: float = 0.1

    def __post_init__(self) -> None:
        _validate(self, positive=("logit_std",), unit=("label_dropout",))
        if self.min_snr_gamma < 0:
            raise UsageError("ObjectiveConfig.min_snr_gamma must be >= 0, "
                             f"got {self.min_snr_gamma}")


@dataclass(frozen=True)
class GuideConfig:
    """The guide of autoguidance (Karras et al. 2024): a smaller denoiser trained for fewer
    epochs, with the same objective on the same latents. Sampling with scale s uses
        D_s(x, sigma) = D_guide(x, sigma) + s (D(x, sigma) - D_guide(x, sigma)),
    which pushes each step away from the errors the weaker model makes more of (diffuse,
    in-between shapes), with no labels, and narrows the data's variety far less than
    classifier-free guidance (README, autoguidance). The guide's UNet is the denoiser's with
    `channels`; its training the denoiser's with `epochs`."""

    channels: tuple[int, ...] = ()  # () = no guide
    epochs: int = 1

    def __post_init__(self) -> None:
        _validate(self, positive=("channels", "epochs"))


@dataclass(frozen=True)
class SamplingConfig:
    """Which sets `ldm run` generates and scores."""

    num_samples: int = 10_000
    # NAME or NAME-STEPS of diffusion/samplers.py's table: "ddpm" (all T steps), "ddpm-25",
    # "ddim-50", "euler-20", "heun-10", "dpmpp-2m-10", "dpmpp-2m-sde-10"
    samplers: tuple[str, ...] = ("ddim-50",)
    variance: VarianceName = "beta_tilde"  # ddpm's
    eta: float = 0.0  # ddim's stochasticity, in [0, 1]
    batch_size: int = 500
    seed: int = 1
    # A conditional model's labels: "" (none: the "no label" index), "balanced" (sample i asks
    # for class i mod K), "7" or "0,1,2" (cycled over i); guidance is the scale s of
    # classifier-free guidance, D_uncond + s (D_cond - D_uncond): 1 unguided, 0 unconditional.
    labels: str = ""
    guidance: float = 1.0
    # Autoguidance's scale s (GuideConfig): 1 the denoiser alone, > 1 guided by the run's guide.
    autoguidance: float = 1.0

    def __post_init__(self) -> None:
        _validate(self, positive=("num_samples", "batch_size"), nonnegative=("seed",))
        if self.autoguidance < 1:
            raise UsageError(f"SamplingConfig.autoguidance must be >= 1, got {self.autoguidance}")
        if self.autoguidance != 1.0 and self.labels:
            raise UsageError("autoguidance is for unconditional sampling; a conditional model "
                             "has classifier-free guidance (--guidance)")
        if self.num_samples > MAX_SAMPLES:
            raise UsageError(f"SamplingConfig.num_samples must be at most {MAX_SAMPLES}, got "
                             f"{self.num_samples}")
        if not self.samplers:
            raise UsageError("SamplingConfig.samplers needs at least one sampler")
        if self.guidance < 0:
            raise UsageError(f"SamplingConfig.guidance must be >= 0, got {self.guidance}")
        if self.guidance != 1.0 and not self.labels:
            raise UsageError("guidance needs labels to guide towards (--labels)")
        from .diffusion.guidance import listed_labels

        listed_labels(self.labels)  # the form: the classes are the model's (RunConfig, sample)
        if not 0.0 <= self.eta <= 1.0:
            raise UsageError(f"SamplingConfig.eta must be in [0, 1], got {self.eta}")
        from .diffusion.samplers import parse_sampler  # here: the diffusion package imports config

        for spec in self.samplers:
            parse_sampler(spec)


@dataclass(frozen=True)
class RunConfig:
    """Everything `ldm run` does, stage by stage."""

    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    classifier_train: TrainConfig = field(default_factory=TrainConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    vae_train: TrainConfig = field(default_factory=TrainConfig)
    latent_mode: LatentMode = "mean"
    latent_norm: LatentNorm = "channel"  # or "global", the post's single 1/std (latents.py)
    unet: UNetConfig = field(default_factory=UNetConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    diffusion_train: TrainConfig = field(default_factory=TrainConfig)
    guide: GuideConfig = field(default_factory=GuideConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    eval_samples: int = 10_000  # size of the Random and VAE-prior sets

    @property
    def guide_unet(self) -> UNetConfig:
        return dataclasses.replace(self.unet, channels=self.guide.channels)

    @property
    def guide_train(self) -> TrainConfig:
        return dataclasses.replace(self.diffusion_train, epochs=self.guide.epochs)

    def __post_init__(self) -> None:
        _validate(self, positive=("eval_samples",))
        if self.eval_samples > MAX_SAMPLES:
            raise UsageError(f"RunConfig.eval_samples must be at most {MAX_SAMPLES}, got "
                             f"{self.eval_samples}")
        if self.unet.in_channels != self.vae.latent_channels:
            raise UsageError("unet.in_channels must equal vae.latent_channels")
        if self.unet.latent_size != self.vae.latent_size:
            raise UsageError(f"unet.latent_size must equal the VAE's latent size "
                             f"({self.vae.latent_size})")
        image = (self.classifier.image_size, self.classifier.image_channels)
        if image != (self.vae.image_size, self.vae.image_channels):
            raise UsageError("classifier and vae must take the same image_size and "
                             "image_channels")
        if self.unet.num_classes and self.unet.num_classes != self.classifier.data_classes:
            raise UsageError("unet.num_classes must equal the data set's classes "
                             "(classifier.num_classes)")
        if self.sampling.labels and not self.unet.num_classes:
            raise UsageError("sampling.labels needs a class-conditional model (--conditional)")
        if self.sampling.labels:
            from .diffusion.guidance import parse_labels

            parse_labels(self.sampling.labels, self.unet.num_classes)  # each a class of its data
        if self.guide.channels:
            try:
                self.guide_unet  # noqa: B018 (the UNet config checks the widths)
            except UsageError as err:
                raise UsageError(f"guide: {err}") from None
            if self.unet.num_classes:
                raise UsageError("a class-conditional run has classifier-free guidance, not a "
                                 "guide (set guide.channels to nothing)")
        if self.sampling.autoguidance != 1.0 and not self.guide.channels:
            raise UsageError("sampling.autoguidance needs a guide (guide.channels)")


# The presets' denoiser objective: v-prediction with min-SNR-2, t drawn by importance
# (ablation in the README; gamma 2 and 3 beat the paper's 5 with importance sampling).
_OBJECTIVE = ObjectiveConfig(prediction="v", min_snr_gamma=2.0, timestep_sampling="importance")


def _tiny() -> RunConfig:
    """Seconds on synthetic data: for tests only."""
    train = TrainConfig(epochs=1, batch_size=16, lr=2e-3, checkpoint_every=4)
    return RunConfig(
        classifier=ClassifierConfig(channels=4, feature_dim=16),
        classifier_train=train,
        vae=VAEConfig(latent_channels=2, channels=(4, 8)),
        vae_train=train,
        unet=UNetConfig(in_channels=2, channels=(8, 16), time_dim=8, groups=4),
        schedule=ScheduleConfig(num_timesteps=50, beta_start=1e-3, beta_end=0.2),  # ends ~noise
        objective=_OBJECTIVE,
        diffusion_train=dataclasses.replace(train, ema_decay=0.9),
        guide=GuideConfig(channels=(4, 8)),
        sampling=SamplingConfig(num_samples=24, samplers=("ddim-5", "ddpm"), batch_size=16,
                                autoguidance=2.0),
        eval_samples=24,
    )


def _quick() -> RunConfig:
    """About two minutes on 2 CPU cores for MNIST: rough but recognisable digits."""
    return RunConfig(
        classifier=ClassifierConfig(channels=8),
        classifier_train=TrainConfig(epochs=1, batch_size=128, lr=3e-3, weight_decay=1e-4,
                                     warmup_steps=50),
        vae=VAEConfig(channels=(8, 16)),
        # 2 VAE epochs, not 1: one learns shapes but not yet colour (gray reconstructions of
        # colour images, FID 365x -> 10.4x Validation; samples 462x -> 121x); on MNIST the
        # samples score as before (110.8 vs 109.1) for 8 s more (README, own data).
        vae_train=TrainConfig(epochs=2, batch_size=128, lr=8e-3, warmup_steps=50),
        unet=UNetConfig(channels=(16, 32), time_dim=32),
        objective=_OBJECTIVE,
        diffusion_train=TrainConfig(epochs=1, batch_size=256, lr=8e-3, ema_decay=0.99,
                                    warmup_steps=50, weight_decay=1e-4),
        # Autoguidance by an (8, 16) guide of 1 epoch (8 s): `ddpm-20` FID 110.8 -> 95.1 at
        # scale 1.5 (89.4 at 2; 2,000 digits; README, autoguidance).
        guide=GuideConfig(channels=(8, 16), epochs=1),
        sampling=SamplingConfig(num_samples=2000, samplers=("ddpm-20",), autoguidance=1.5),
        eval_samples=2000,
    )


def _default() -> RunConfig:
    """About 12 to 14 minutes on 2 CPU cores for MNIST (see README for the measured figures)."""
    return RunConfig(
        # 2 epochs with 1-pixel shifts at lr 5e-3: 99.47% test accuracy, where 3 epochs with
        # 2-pixel shifts at 3e-3 took 50% longer for 99.42% (README, time budget).
        classifier=ClassifierConfig(channels=16, augment_shift=1),
        classifier_train=TrainConfig(epochs=2, batch_size=128, lr=5e-3, weight_decay=1e-4,
                                     warmup_steps=200),
        vae=VAEConfig(channels=(16, 32)),
        vae_train=TrainConfig(epochs=5, batch_size=128, lr=4e-3, warmup_steps=100),
        # On this VAE's latents one global scale beat per-channel standardisation in both
        # ablations (FID 76.3 vs 85.1 and 173 vs 187; README).
        latent_norm="global",
        unet=UNetConfig(channels=(32, 48), time_dim=32),
        schedule=ScheduleConfig(kind="cosine"),  # with v-prediction: FID 62.5 -> 53.9 (README)
        objective=_OBJECTIVE,
        # Batch 64: 4x the optimizer steps of batch 256 for 1.3x the time per epoch; FID
        # 97.9 -> 64.2 after 3 epochs (README, recipe). 8 epochs instead of 6: FID / Validation
        # 11.3x -> 8.7x (10k).
        diffusion_train=TrainConfig(epochs=8, batch_size=64, lr=8e-3, adam_beta2=0.99,
                                    ema_decay=0.999, warmup_steps=100, weight_decay=1e-4),
        # Respaced ancestral DDPM: better than DDPM-1000 at 1/40 of its cost. The sweep of every
        # sampler at 5 to 50 model calls (README, quality against cost): 20 steps score as 25 or
        # 50 (17.94, 17.80, 17.73 at 10k); no sampler gets near that with fewer.
        # Autoguidance by a UNet of a third of the weights trained 1 epoch (20 s): `ddpm-20`
        # FID 17.94 -> 5.94 at scale 1.5 (10k digits; 5.86 at 2, with less recall; README).
        guide=GuideConfig(channels=(16, 32), epochs=1),
        sampling=SamplingConfig(num_samples=10_000, samplers=("ddpm-20",), autoguidance=1.5),
        eval_samples=10_000,
    )


# `--objective flow` on a VP preset draws t from a logit-normal of std 0.5, not SD3's 1.0 (Esser
# et al. 2024, tuned on 1024-px images): on 8x8 latents the narrower density, which trains the
# middle of the path more and its ends less, took the flow model's `ddpm-20` FID from 25.40 to
# 18.45 at 8 epochs (10k MNIST digits; VP 17.94), and from 118.5 to 65.2 on 32x32 colour digits
# (3 epochs, 2,000 samples; VP 94.6) (README, objectives).
FLOW_LOGIT_STD = 0.5


def with_objective_kind(objective: ObjectiveConfig, kind: str) -> ObjectiveConfig:
    """`objective` switched to `kind` with that kind's time density; unchanged if already it."""
    if kind == objective.kind:
        return objective
    logit_std = FLOW_LOGIT_STD if kind == "flow" else ObjectiveConfig.logit_std
    # The config checks the value, with the same one-line error as every other.
    return dataclasses.replace(objective, kind=kind, logit_std=logit_std)  # type: ignore[arg-type]


# The guidance scale of a conditional `ldm run`'s sample sets (`ldm sweep --guidance` measures
# the trade-off at others). On the default preset (10k MNIST digits, `ddpm-20`): scale 1 FID
# 6.75 at 96.6% accuracy, 1.5 FID 15.9 at 99.6%, 2 FID 30.2 at 99.95% (README, conditional).
CONDITIONAL_GUIDANCE = 1.5


def conditional(config: RunConfig, guidance: float = CONDITIONAL_GUIDANCE) -> RunConfig:
    """The run with a class-conditional denoiser (the classifier's classes) whose sets are
    balanced over the classes and guided at `guidance` (classifier-free: no guide model)."""
    if not config.classifier.data_classes:
        raise UsageError("a class-conditional model needs a data set labelled with 2 classes "
                         "or more")
    r = dataclasses.replace
    return r(config, unet=r(config.unet, num_classes=config.classifier.num_classes),
             guide=GuideConfig(),
             sampling=r(config.sampling, labels="balanced", guidance=guidance, autoguidance=1.0))


@dataclass(frozen=True)
class ImageShape:
    """What a data set's images look like to the models; MNIST's is the default."""

    size: int = 28
    channels: int = 1
    num_classes: int = 10  # 0: unlabelled

    def __str__(self) -> str:
        classes = f"{self.num_classes} classes" if self.num_classes else "no labels"
        return f"{self.size}x{self.size}x{self.channels}, {classes}"


# The latent size the presets aim for: images up to 32 pixels get two VAE levels (28 -> 8x8),
# larger ones a third (64 -> 8x8), so the denoiser's cost hardly grows with the image.
_PRESET_LATENT = 8


def for_images(config: RunConfig, shape: ImageShape) -> RunConfig:
    """A preset scaled to a data set's images: sizes and channels of the classifier and the
    VAE, a VAE level more for large images, the UNet on the latents that gives, and the
    classifier's task (the rotation task for unlabelled data)."""
    r = dataclasses.replace
    image = {"image_size": shape.size, "image_channels": shape.channels}
    task: ClassifierTask = "labels" if shape.num_classes else "rotation"
    classifier = r(config.classifier, **image, task=task, num_classes=shape.num_classes or 4)
    vae = r(config.vae, **image)
    while vae.latent_size > _PRESET_LATENT and len(vae.channels) < 4:
        vae = r(vae, channels=(*vae.channels, 2 * vae.channels[-1]))
    # (a conditional config keeps its class count: RunConfig refuses it for other classes)
    return r(config, classifier=classifier, vae=vae,
             unet=r(config.unet, latent_size=vae.latent_size))


def image_shape_of(c: ClassifierConfig) -> ImageShape:
    """The images and classes a classifier config takes (0 classes: the rotation task)."""
    return ImageShape(c.image_size, c.image_channels, c.data_classes)


PRESETS = {"tiny": _tiny, "quick": _quick, "default": _default}
PresetName = Literal["tiny", "quick", "default"]


def preset(name: str) -> RunConfig:
    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r} (choose from {', '.join(PRESETS)})")
    return PRESETS[name]()


# ---------------------------------------------------------------- (de)serialisation

C = TypeVar("C")


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def from_dict(cls: type[C], data: dict[str, Any]) -> C:
    """Rebuild a (nested) config dataclass from `to_dict` output; unknown keys are an error,
    and an invalid nested config's message starts with its field name ("diffusion_train: ...":
    the run config has three TrainConfigs)."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(data) - names
    if unknown:
        raise UsageError(f"{cls.__name__}: unknown field(s) {', '.join(sorted(unknown))}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            try:
                value = from_dict(hint, value)  # type: ignore[arg-type]
            except UsageError as err:
                raise UsageError(f"{name}: {err}") from None
        elif get_origin(hint) in (tuple, types.GenericAlias) or hint is tuple:
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def config_hash(*parts: Any) -> str:
    """Stable sha256 of configs (dataclasses or plain JSON values)."""
    payload = [to_dict(p) if dataclasses.is_dataclass(p) else p for p in parts]
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()
