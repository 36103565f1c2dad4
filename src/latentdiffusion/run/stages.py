"""The experiment's training stages as library functions over a run directory: the classifier,
the VAE, the latents (encode) and the denoiser.

Each stage reads what the stages before it wrote and writes one file whose header holds its
stage key (keys.py): everything its output depends on. `fit` continues only checkpoints
with the same key, and `pipeline` compares it to decide what to skip.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed as dist
from ..data import Dataset
from ..data.images import mirror_where, to_unit_tensor
from ..diffusion import NoiseSchedule
from ..diffusion.objective import ObjectiveConfig, diffusion_loss, make_objective
from ..diffusion.schedule import ScheduleConfig
from ..errors import UsageError
from ..models import VAE, Classifier, UNet
from ..models.autoencoder_losses import VAEWithCritic, vae_terms
from ..models.classifier import ClassifierConfig, accuracy, pixel_stats, random_shift, rotate
from ..models.unet import UNetConfig
from ..models.vae import VAEConfig
from ..schema import to_dict
from . import checkpoint, keys, latents
from .config import Augment, LatentMode, LatentNorm, TrainConfig
from .monitor import StageWatch
from .progress import RunWatch
from .resume import Resume
from .rundir import RunDir
from .training import Batch, LossFn, fit, init_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Trained:
    """What one call of a training stage did."""

    header: dict[str, Any]  # the written model file's verified header
    resumed_from: str | None  # the checkpoint it continued, if any
    repaired: bool  # the model file was there but unreadable, and was rebuilt

    def summary(self) -> str:
        """One line for `ldm run`: how the stage ran and its last validation's numbers."""
        how = [f"resumed from {self.resumed_from}"] if self.resumed_from else []
        if self.repaired:
            how.insert(0, "model file was corrupt, rebuilt")
        history = self.header["history"]
        last = ", ".join(f"{k} {v:.4g}" for k, v in history[-1].items()
                         if k not in ("step", "epoch")) if history else "trained"
        return "; ".join([*how, last])


def _train(run: RunDir, name: str, cls: type[nn.Module], model_config: Any,
           train_config: TrainConfig, loss_fn: LossFn, train_data: tuple[torch.Tensor, ...],
           val_data: tuple[torch.Tensor, ...], key: keys.StageKey, device: torch.device,
           resume: Resume, progress: bool,
           val_metrics: Callable[[nn.Module], dict[str, float]] | None = None,
           init: Callable[[nn.Module], None] | None = None,
           export: Callable[[nn.Module], nn.Module] | None = None,
           watch: StageWatch | None = None, **meta: Any) -> Trained:
    """Shared by every model: fit, then export the (EMA) weights with their key and history;
    `export` picks the model to write out of a training-only wrapper (the VAE of its critic)."""
    path = run.model(name)
    corrupt = resume != "off" and path.exists() and checkpoint.peek(path) is None
    if corrupt and dist.is_main():
        log.warning("%s is corrupt or unreadable; rebuilding it from %s", path,
                    run.state_dir(name))
    model = init_model(cls, model_config, train_config.seed)
    if init is not None:  # e.g. buffers computed from the data (a checkpoint overrides them)
        init(model)
    start = time.perf_counter()
    result = fit(model, loss_fn, train_data, val_data, train_config, state_dir=run.state_dir(name),
                 kind=cls.kind, key=key, model_config=model_config,  # type: ignore[attr-defined]
                 device=device, resume=resume, progress=progress, val_metrics=val_metrics,
                 watch=watch)
    seconds = time.perf_counter() - start
    if dist.is_main():
        exported = export(result.model) if export is not None else result.model
        checkpoint.save_model(path, exported, model_config, key=key.digest,
                              key_fields=key.fields, history=result.history,
                              train_seconds=seconds, train_config=to_dict(train_config), **meta)
    dist.barrier()
    header = checkpoint.load(path, kind=cls.kind)[1]  # type: ignore[attr-defined]
    resumed_from = result.resumed_from.name if result.resumed_from else None
    return Trained(header, resumed_from, corrupt)


# ---------------------------------------------------------------- classifier


def train_classifier(dataset: Dataset, run: RunDir, model_config: ClassifierConfig,
                     train_config: TrainConfig, *, device: torch.device, resume: Resume = "off",
                     progress: bool = True, watch: RunWatch | None = None) -> Trained:
    """The FID feature network on the data set's labels, or on the rotation task without."""
    _check_images(dataset, model_config.image_size, model_config.image_channels)
    labelled = bool(model_config.data_classes)
    if labelled and (not dataset.labelled or dataset.num_classes != model_config.num_classes):
        raise UsageError(f"the classifier config expects {model_config.num_classes} classes but "
                         f"{dataset.name} has {dataset.num_classes or 'no labels'}")
    train_images = to_unit_tensor(dataset.train_images)
    test_images = to_unit_tensor(dataset.test_images)
    # The rotation task's validation set turns test image i by i mod 4 quarter turns.
    # (torch.tensor copies: the data set's arrays are read-only, shared by the stages)
    test_classes = (torch.tensor(dataset.test_labels) if labelled
                    else torch.arange(len(test_images)) % 4)
    test_inputs = test_images if labelled else rotate(test_images, test_classes)
    train_set = ((train_images, torch.tensor(dataset.train_labels)) if labelled
                 else (train_images,))
    test_set = (test_inputs.to(device), test_classes.to(device))
    shift = model_config.augment_shift

    def loss_fn(model: nn.Module, batch: Batch) -> torch.Tensor:
        images = batch.tensors[0]
        if shift:
            images = random_shift(images, batch.randint(2 * shift + 1),
                                  batch.randint(2 * shift + 1), shift)
        if labelled:
            return F.cross_entropy(model(images), batch.tensors[1])
        quarter_turns = batch.randint(4)
        return F.cross_entropy(model(rotate(images, quarter_turns)), quarter_turns)

    def init(model: nn.Module) -> None:
        assert isinstance(model, Classifier)
        model.set_pixel_stats(*pixel_stats(train_images))

    return _train(run, "classifier", Classifier, model_config, train_config, loss_fn, train_set,
                  (test_set[0].cpu(), test_set[1].cpu()),
                  keys.model_key(model_config, train_config, dataset.content_hash), device,
                  resume, progress, val_metrics=lambda m: {"val_accuracy": accuracy(m, *test_set)},
                  init=init, watch=watch.stage("classifier") if watch else None)


def _check_images(dataset: Dataset, size: int, channels: int) -> None:
    if (dataset.image_size, dataset.channels) != (size, channels):
        raise UsageError(f"{dataset.name} has {dataset.image_size}x{dataset.image_size} images "
                         f"with {dataset.channels} channel(s), but the config is for {size}x{size}"
                         f" with {channels}; make a config for this data set (`ldm config "
                         "--data-dir ...`)")


# ---------------------------------------------------------------- VAE


def train_vae(dataset: Dataset, run: RunDir, model_config: VAEConfig,
              train_config: TrainConfig, *, device: torch.device, resume: Resume = "off",
              progress: bool = True, augment: Augment = "none",
              watch: RunWatch | None = None) -> Trained:
    """The VAE on the training images; with `augment` "xflip", a random half of each batch
    mirrored."""
    _check_images(dataset, model_config.image_size, model_config.image_channels)
    train_images = to_unit_tensor(dataset.train_images)
    test_images = to_unit_tensor(dataset.test_images)
    latent_shape = (model_config.latent_channels, model_config.latent_size,
                    model_config.latent_size)

    key = keys.model_key(model_config, train_config, dataset.content_hash, augment)

    def images_and_noise(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        images, noise = batch.tensors[0], batch.randn(*latent_shape)
        if augment == "xflip":  # drawn after the noise: without it, the same numbers as before
            images = mirror_where(images, batch.rand() < 0.5)
        return images, noise

    if model_config.critic_weight and dist.world_size() > 1:
        # Its adaptive weight takes gradients inside the forward pass, which DDP's one
        # gradient reduction per backward does not cover.
        raise UsageError("vae.critic_weight > 0 trains in one process only; train the VAE "
                         "without torchrun (`ldm train vae`), then run the rest under it")
    if model_config.critic_weight:  # the wrapper's forward is the whole loss
        def critic_loss_fn(model: nn.Module, batch: Batch) -> torch.Tensor:
            loss = model(*images_and_noise(batch))
            assert isinstance(model, VAEWithCritic)  # (one process: no DDP around it)
            batch.record(**model.terms)
            return loss

        return _train(run, "vae", VAEWithCritic, model_config, train_config, critic_loss_fn,
                      (train_images,), (test_images,), key, device, resume, progress,
                      export=_autoencoder,
                      watch=watch.vae(dataset.test_images, _autoencoder) if watch else None)

    def loss_fn(model: nn.Module, batch: Batch) -> torch.Tensor:
        images, noise = images_and_noise(batch)
        reconstruction, kl, _ = vae_terms(model, images, noise, model_config.loss,
                                          model_config.scale_equivariance)
        batch.record(reconstruction=reconstruction, kl=kl)
        return reconstruction + model_config.kl_weight * kl

    return _train(run, "vae", VAE, model_config, train_config, loss_fn, (train_images,),
                  (test_images,), key, device, resume, progress,
                  watch=watch.vae(dataset.test_images, None) if watch else None)


def _autoencoder(wrapper: nn.Module) -> nn.Module:
    assert isinstance(wrapper, VAEWithCritic)
    return wrapper.autoencoder


def encode(dataset: Dataset, run: RunDir, mode: LatentMode, norm: LatentNorm, *,
           device: torch.device, seed: int = 0, augment: Augment = "none") -> dict[str, Any]:
    """Encode train and test once (and the mirrored training images with `augment` "xflip");
    store latents, their shift and scale, and the VAE hash."""
    vae, vae_header = checkpoint.load_model(run.model("vae"), VAE, device)
    dataset.check_trained_on(vae_header, run.model("vae"))  # latents of the VAE's own data
    vae_hash = checkpoint.model_hash_of(vae_header)
    key = keys.latents_key(vae_hash, mode, norm, seed, augment)
    latent_set = latents.build(vae, vae_hash, dataset.train_images, dataset.test_images, mode,
                               norm, seed, device, dataset.train_labels, dataset.test_labels,
                               mirror=augment == "xflip")
    if dist.is_main():
        latents.save(run.latents, latent_set, key=key.digest, key_fields=key.fields,
                     num_classes=dataset.num_classes, class_names=list(dataset.class_names))
    dist.barrier()
    return checkpoint.load(run.latents, kind=latents.KIND)[1]


# ---------------------------------------------------------------- diffusion


def train_diffusion(run: RunDir, model_config: UNetConfig, schedule_config: ScheduleConfig,
                    objective: ObjectiveConfig, train_config: TrainConfig, *,
                    device: torch.device, resume: Resume = "off", progress: bool = True,
                    name: str = "diffusion", train_limit: int = 0,
                    watch: RunWatch | None = None) -> Trained:
    """The denoiser on the cached latents (of the first `train_limit` training images, when
    given); name="guide" for autoguidance's guide (config.GuideConfig), the same stage with a
    smaller UNet and fewer steps."""
    latent_set, latent_header = latents.load(run.latents)  # one read of the cache
    shape = tuple(latent_set.train.shape[1:])
    expected = (model_config.in_channels, model_config.latent_size, model_config.latent_size)
    if shape != expected:
        raise UsageError(f"the latents are {shape} but the UNet config expects {expected}; "
                         "match unet.in_channels / latent_size to the VAE")
    schedule = NoiseSchedule.from_config(schedule_config)
    key = keys.diffusion_key(model_config, schedule_config, objective, train_config,
                             latent_header["sha256"], train_limit)
    test_set: tuple[torch.Tensor, ...] = (latent_set.normalised("test"),)
    if model_config.num_classes:  # a conditional model also sees each latent's label
        if latent_set.train_labels is None or latent_set.test_labels is None:
            raise UsageError(f"{run.latents} was cached without labels; rerun `ldm encode` "
                             "for a class-conditional model")
        test_set += (latent_set.test_labels,)
    train_set = latent_set.training_set(bool(model_config.num_classes), train_limit)
    made = make_objective(objective, schedule)
    loss = diffusion_loss(made, model_config.num_classes, objective.label_dropout)
    data_mean = train_set[0].mean(dim=0)  # (C, S, S): denoiser.start
    stage_watch = watch.denoiser(name, made, data_mean.to(device), latent_set.shift,
                                 latent_set.scale) if watch else None
    return _train(run, name, UNet, model_config, train_config, loss, train_set, test_set,
                  key, device, resume, progress, watch=stage_watch,
                  schedule=to_dict(schedule_config),
                  objective=to_dict(objective), shift=latent_set.shift, scale=latent_set.scale,
                  data_mean=data_mean.tolist(),
                  latents_hash=latent_header["sha256"], vae_hash=latent_set.vae_hash)
