"""The run config: everything `ldm run` does, stage by stage, made of each component's own
config (models/, diffusion/) and the training loop's, and the changes the command line makes to
a preset (its data set's images, the objective, a class-conditional model)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

from ..data.prepare import PrepareConfig
from ..diffusion.objective import ObjectiveConfig
from ..diffusion.request import SamplingRequest
from ..diffusion.samplers import VarianceName
from ..diffusion.schedule import ScheduleConfig
from ..errors import UsageError
from ..models import VAE, Classifier, UNet, parameter_count
from ..models.classifier import ClassifierConfig, ClassifierTask
from ..models.unet import UNetConfig
from ..models.vae import VAEConfig
from ..schema import MAX_SAMPLES, check_fields, check_set_size
from .monitor import MonitorConfig
from .precision import Precision

LatentMode = Literal["sample", "mean"]
LatentNorm = Literal["global", "channel"]
LrDecay = Literal["constant", "cosine"]
# "xflip": the VAE trains on a random half of each batch mirrored, and the denoiser on the
# latents of every training image and of its mirror (encoded once, in the latents file).
Augment = Literal["none", "xflip"]
# The most parameters one model may have: training holds 5 float32 copies (weights, gradients,
# Adam's two moments, the EMA), 1 GB at this bound; the presets' models have 0.2M to 1.6M.
MAX_PARAMETERS = 50_000_000


@dataclass(frozen=True)
class TrainConfig:
    """How one model is optimised; shared by the classifier, the VAE and the denoiser.

    The length is a number of optimizer steps, not epochs: a set of 1,000 images trains as
    many steps as one of 60,000 (over 60 times the epochs), which is what lets a small set
    learn at all (docs/recipe.md, "Training lengths")."""

    steps: int = 2000
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
    # Validate (and record the history) every this many steps and after the last. Validation
    # changes no trained number: not part of the stage key.
    validate_every: int = 1000
    seed: int = 0
    # The forward passes' autocast dtype (precision.py); weights and optimizer stay float32.
    # Part of the stage key only when not "fp32" (keys.py).
    precision: Precision = "fp32"

    def __post_init__(self) -> None:
        check_fields(self, positive=("steps", "batch_size", "lr", "checkpoint_every",
                                  "checkpoint_seconds", "validate_every"),
                  unit=("ema_decay", "adam_beta2"), nonnegative=("seed",))
        if self.weight_decay < 0 or self.warmup_steps < 0 or self.grad_clip < 0:
            raise UsageError("TrainConfig: weight_decay, warmup_steps, grad_clip must be >= 0")


@dataclass(frozen=True)
class GuideConfig:
    """The guide of autoguidance (Karras et al. 2024): a smaller denoiser trained for fewer
    steps, with the same objective on the same latents. Sampling with scale s uses
        D_s(x, sigma) = D_guide(x, sigma) + s (D(x, sigma) - D_guide(x, sigma)),
    which pushes each step away from the errors the weaker model makes more of (diffuse,
    in-between shapes), with no labels, and narrows the data's variety far less than
    classifier-free guidance (diffusion/guidance.py). The guide's UNet is the denoiser's with
    `channels`; its training the denoiser's with `steps`."""

    channels: tuple[int, ...] = ()  # () = no guide
    steps: int = 1000

    def __post_init__(self) -> None:
        check_fields(self, positive=("channels", "steps"))


# The largest guidance scale s: D_uncond + s (D_cond - D_uncond) far past the scales worth
# sampling (docs/guidance.md), and before float32 overflows it (s = 1e30 gives NaN images).
MAX_GUIDANCE = 100.0


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
    # The autocast dtype of the sets' networks: the denoiser, the VAE's decoder (and its encoder
    # for the reconstructions). Encoding the latents and the feature network stay float32.
    precision: Precision = "fp32"

    def __post_init__(self) -> None:
        check_fields(self, positive=("num_samples", "batch_size"), nonnegative=("seed",))
        if self.autoguidance < 1:
            raise UsageError(f"SamplingConfig.autoguidance must be >= 1, got {self.autoguidance}")
        if self.num_samples > MAX_SAMPLES:
            raise UsageError(f"SamplingConfig.num_samples must be at most {MAX_SAMPLES}, got "
                             f"{self.num_samples}")
        if not self.samplers:
            raise UsageError("SamplingConfig.samplers needs at least one sampler")
        if self.guidance < 0:
            raise UsageError(f"SamplingConfig.guidance must be >= 0, got {self.guidance}")
        for scale in ("guidance", "autoguidance"):
            if getattr(self, scale) > MAX_GUIDANCE:
                raise UsageError(f"SamplingConfig.{scale} must be at most {MAX_GUIDANCE:g}, got "
                                 f"{getattr(self, scale):g}")
        if not 0.0 <= self.eta <= 1.0:
            raise UsageError(f"SamplingConfig.eta must be in [0, 1], got {self.eta}")
        self.requests  # noqa: B018 (parses every sampler, the labels and the scales)

    @property
    def by_guide(self) -> bool:
        """Whether its sets are guided by the run's guide (autoguidance)."""
        return self.requests[0].guidance.by_guide

    @cached_property
    def requests(self) -> tuple[SamplingRequest, ...]:
        """One parsed request per sampler, in order."""
        return tuple(SamplingRequest.of(spec, variance=self.variance, eta=self.eta,
                                        labels=self.labels, guidance=self.guidance,
                                        autoguidance=self.autoguidance)
                     for spec in self.samplers)


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
    # The denoiser and its guide train on the latents of the first N training images (0: all):
    # a small training set, to see whether the model copies it (the report's memorisation check).
    train_limit: int = 0
    # Mirrored training images for the VAE and the denoiser (not the classifier, whose features
    # score the run): for small sets of pictures that may be mirrored, never for digits or text.
    augment: Augment = "none"
    # How a folder's pictures (or an .npz's images) are prepared: --image-size, background.
    data: PrepareConfig = field(default_factory=PrepareConfig)
    # What the run shows while it trains (logs, progress grids, scores): no trained number.
    monitor: MonitorConfig = field(default_factory=MonitorConfig)

    @property
    def precisions(self) -> set[Precision]:
        """Every precision the run computes in: its training stages' and its sets'."""
        return {self.classifier_train.precision, self.vae_train.precision,
                self.diffusion_train.precision, self.sampling.precision}

    @property
    def guide_unet(self) -> UNetConfig:
        return dataclasses.replace(self.unet, channels=self.guide.channels)

    @property
    def guide_train(self) -> TrainConfig:
        return dataclasses.replace(self.diffusion_train, steps=self.guide.steps)

    def __post_init__(self) -> None:
        check_fields(self, positive=("eval_samples",), nonnegative=("train_limit",))
        image = (self.classifier.image_size, self.classifier.image_channels)
        check_set_size("RunConfig.eval_samples", self.eval_samples, *image)
        check_set_size("RunConfig: sampling.num_samples", self.sampling.num_samples, *image)
        if self.unet.in_channels != self.vae.latent_channels:
            raise UsageError("unet.in_channels must equal vae.latent_channels")
        if self.unet.latent_size != self.vae.latent_size:
            raise UsageError(f"unet.latent_size must equal the VAE's latent size "
                             f"({self.vae.latent_size})")
        if image != (self.vae.image_size, self.vae.image_channels):
            raise UsageError("classifier and vae must take the same image_size and "
                             "image_channels")
        if self.unet.num_classes and self.unet.num_classes != self.classifier.data_classes:
            raise UsageError("unet.num_classes must equal the data set's classes "
                             "(classifier.num_classes)")
        if self.sampling.labels and not self.unet.num_classes:
            raise UsageError("sampling.labels needs a class-conditional model (--conditional)")
        for request in self.sampling.requests:
            request.check_classes(self.unet.num_classes)  # each label a class of its data
        if self.guide.channels:
            try:
                self.guide_unet  # noqa: B018 (the UNet config checks the widths)
            except UsageError as err:
                raise UsageError(f"guide: {err}") from None
            if self.unet.num_classes:
                raise UsageError("a class-conditional run has classifier-free guidance, not a "
                                 "guide (set guide.channels to nothing)")
        if self.sampling.by_guide and not self.guide.channels:
            raise UsageError("sampling.autoguidance needs a guide (guide.channels)")
        self._check_parameters()

    def _check_parameters(self) -> None:
        """Each model at most MAX_PARAMETERS, counted before any weight exists (UsageError)."""
        models = {"classifier": (Classifier, self.classifier), "vae": (VAE, self.vae),
                  "unet": (UNet, self.unet)}
        if self.guide.channels:
            models["guide"] = (UNet, self.guide_unet)
        for name, (model, config) in models.items():
            count = parameter_count(model, config)
            if count > MAX_PARAMETERS:
                raise UsageError(f"{name} would have {count:,} parameters, more than the "
                                 f"{MAX_PARAMETERS:,} a model may have here; give it fewer or "
                                 "narrower channels")



# `--objective flow` on a VP preset draws t from a logit-normal of std 0.5, not SD3's 1.0 (Esser
# et al. 2024, tuned on 1024-px images): on 8x8 latents the narrower density, which trains the
# middle of the path more and its ends less, scores better on MNIST and on colour digits
# (docs/recipe.md).
FLOW_LOGIT_STD = 0.5


def with_objective_kind(objective: ObjectiveConfig, kind: str) -> ObjectiveConfig:
    """`objective` switched to `kind` with that kind's time density; unchanged if already it."""
    if kind == objective.kind:
        return objective
    logit_std = FLOW_LOGIT_STD if kind == "flow" else ObjectiveConfig.logit_std
    # The config checks the value, with the same one-line error as every other.
    return dataclasses.replace(objective, kind=kind, logit_std=logit_std)  # type: ignore[arg-type]


# The guidance scale of a conditional `ldm run`'s sample sets: higher accuracy for some FID
# (`ldm sweep --guidance` measures the trade-off at other scales; docs/guidance.md).
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
