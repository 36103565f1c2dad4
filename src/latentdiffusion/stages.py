"""The experiment's stages as library functions over a run directory.

Each stage reads the outputs of the stages before it and writes one file; the file's header
records the config and upstream hashes it was made from (its `key`), which `pipeline` compares
to decide what to skip.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint, data, latents
from . import distributed as dist
from .config import (
    ClassifierConfig,
    LatentMode,
    LatentNorm,
    ObjectiveConfig,
    SamplingConfig,
    ScheduleConfig,
    TrainConfig,
    UNetConfig,
    VAEConfig,
    config_hash,
    from_dict,
    to_dict,
)
from .diffusion import Denoiser, NoiseSchedule, sample, samplers
from .diffusion.objective import diffusion_loss, make_objective
from .errors import CheckpointError, UsageError
from .metrics import Reference, evaluate_images, reference_from_images
from .models import VAE, Classifier, UNet
from .models.vae import vae_loss
from .rng import generator, randn
from .training import Batch, fit, init_model, latest_checkpoint, list_checkpoints

log = logging.getLogger(__name__)
ModelName = Literal["vae", "diffusion"]


@dataclass(frozen=True)
class RunDir:
    """Where each stage of one run keeps its output."""

    root: Path

    def model(self, name: str) -> Path:  # classifier | vae | diffusion
        return self.root / f"{name}.safetensors"

    @property
    def latents(self) -> Path:
        return self.root / "latents.safetensors"

    def state_dir(self, name: str) -> Path:
        return self.root / "checkpoints" / name

    def samples(self, name: str) -> Path:
        return self.root / "samples" / f"{name}.npz"

    def reference(self, classifier_hash: str) -> Path:
        return self.root / "cache" / f"reference-{classifier_hash[:16]}.npz"

    @property
    def figures(self) -> Path:
        return self.root / "figures"


def clear_checkpoints(state_dir: Path) -> None:
    for path in list_checkpoints(state_dir):
        path.unlink(missing_ok=True)


def _train(run: RunDir, name: str, cls: type[nn.Module], model_config: Any,
           train_config: TrainConfig, loss_fn: Callable[[nn.Module, Batch], torch.Tensor],
           train_data: tuple[torch.Tensor, ...], val_data: tuple[torch.Tensor, ...], key: str,
           device: torch.device, resume: bool, progress: bool,
           val_metrics: Callable[[nn.Module], dict[str, float]] | None = None,
           **meta: Any) -> dict[str, Any]:
    """Shared by every model: fit, then export the (EMA) weights with their key and history."""
    state_dir = run.state_dir(name)
    if resume:
        found = latest_checkpoint(state_dir, f"train-state/{cls.kind}")  # type: ignore[attr-defined]
        if found and found[2]["key"] != config_hash(model_config, train_config):
            log.info("%s: config changed since the last checkpoint; starting over", name)
            resume = False
    if not resume and dist.is_main():
        clear_checkpoints(state_dir)
    dist.barrier()
    model = init_model(cls, model_config, train_config.seed)
    start = time.perf_counter()
    result = fit(model, loss_fn, train_data, val_data, train_config, state_dir=state_dir,
                 kind=cls.kind, model_config=model_config, device=device,  # type: ignore[attr-defined]
                 resume=resume, progress=progress, val_metrics=val_metrics)
    seconds = time.perf_counter() - start
    header = dict(key=key, history=result.history, train_seconds=seconds,
                  train_config=to_dict(train_config), **meta)
    if dist.is_main():
        header["sha256"] = checkpoint.save_model(run.model(name), result.model, model_config,
                                                 **header)
    dist.barrier()
    return checkpoint.load(run.model(name), kind=cls.kind)[1]  # type: ignore[attr-defined]


# ---------------------------------------------------------------- classifier


def random_shift(images: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor,
                 max_shift: int) -> torch.Tensor:
    """Translate each (1, H, W) image by (dx, dy) - max_shift pixels, filling with black."""
    b, _, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4)
    rows = (dy[:, None] + torch.arange(h, device=images.device))[:, :, None]  # (B, H, 1)
    cols = (dx[:, None] + torch.arange(w, device=images.device))[:, None, :]  # (B, 1, W)
    batch = torch.arange(b, device=images.device)[:, None, None]
    return padded[batch, 0, rows, cols].unsqueeze(1)  # (B, 1, H, W)


@torch.no_grad()
def accuracy(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor,
             batch_size: int = 1000) -> float:
    correct = sum(int((classifier(images[i:i + batch_size]).argmax(1) == labels[i:i + batch_size])
                      .sum()) for i in range(0, len(images), batch_size))
    return correct / max(len(images), 1)


def train_classifier(data_dir: str | Path | None, run: RunDir, model_config: ClassifierConfig,
                     train_config: TrainConfig, *, device: torch.device, resume: bool = False,
                     progress: bool = True) -> dict[str, Any]:
    train_images, train_labels = data.load_split(data_dir, "train")
    test_images, test_labels = data.load_split(data_dir, "test")
    train_set = (data.to_unit_tensor(train_images), torch.from_numpy(train_labels))
    test_set = (data.to_unit_tensor(test_images).to(device),
                torch.from_numpy(test_labels).to(device))
    shift = model_config.augment_shift

    def loss_fn(model: nn.Module, batch: Batch) -> torch.Tensor:
        images, labels = batch.tensors
        if shift:
            images = random_shift(images, batch.randint(2 * shift + 1),
                                  batch.randint(2 * shift + 1), shift)
        return F.cross_entropy(model(images), labels)

    return _train(run, "classifier", Classifier, model_config, train_config, loss_fn, train_set,
                  (test_set[0].cpu(), test_set[1].cpu()),
                  config_hash(model_config, train_config), device, resume, progress,
                  val_metrics=lambda m: {"val_accuracy": accuracy(m, *test_set)})


# ---------------------------------------------------------------- VAE


def train_vae(data_dir: str | Path | None, run: RunDir, model_config: VAEConfig,
              train_config: TrainConfig, *, device: torch.device, resume: bool = False,
              progress: bool = True) -> dict[str, Any]:
    train_images = data.to_unit_tensor(data.load_split(data_dir, "train")[0])
    test_images = data.to_unit_tensor(data.load_split(data_dir, "test")[0])
    latent_shape = (model_config.latent_channels, model_config.latent_size,
                    model_config.latent_size)

    def loss_fn(model: nn.Module, batch: Batch) -> torch.Tensor:
        return vae_loss(model, batch.tensors[0], batch.randn(*latent_shape),
                        model_config.kl_weight)

    return _train(run, "vae", VAE, model_config, train_config, loss_fn, (train_images,),
                  (test_images,), config_hash(model_config, train_config), device, resume,
                  progress)


def encode(data_dir: str | Path | None, run: RunDir, mode: LatentMode, norm: LatentNorm, *,
           device: torch.device, seed: int = 0) -> dict[str, Any]:
    """Encode train and test once; store latents, their shift and scale, and the VAE hash."""
    vae, vae_header = checkpoint.load_model(run.model("vae"), VAE, device)
    key = config_hash(vae_header["sha256"], mode, norm, seed)
    latent_set = latents.build(vae, vae_header["sha256"], data.load_split(data_dir, "train")[0],
                               data.load_split(data_dir, "test")[0], mode, norm, seed, device)
    if dist.is_main():
        latents.save(run.latents, latent_set, key=key)
    dist.barrier()
    return checkpoint.load(run.latents, kind=latents.KIND)[1]


# ---------------------------------------------------------------- diffusion


def train_diffusion(run: RunDir, model_config: UNetConfig, schedule_config: ScheduleConfig,
                    objective: ObjectiveConfig, train_config: TrainConfig, *,
                    device: torch.device, resume: bool = False,
                    progress: bool = True) -> dict[str, Any]:
    latent_set, latent_header = latents.load(run.latents)  # one read of the cache
    shape = tuple(latent_set.train.shape[1:])
    expected = (model_config.in_channels, model_config.latent_size, model_config.latent_size)
    if shape != expected:
        raise UsageError(f"the latents are {shape} but the UNet config expects {expected}; "
                         "match unet.in_channels / latent_size to the VAE")
    schedule = NoiseSchedule.from_config(schedule_config)
    key = config_hash(model_config, schedule_config, objective, train_config,
                      latent_header["sha256"])
    return _train(run, "diffusion", UNet, model_config, train_config,
                  diffusion_loss(make_objective(objective, schedule)),
                  (latent_set.normalised("train"),), (latent_set.normalised("test"),), key, device,
                  resume, progress, schedule=to_dict(schedule_config),
                  objective=to_dict(objective), shift=latent_set.shift, scale=latent_set.scale,
                  latents_hash=latent_header["sha256"], vae_hash=latent_set.vae_hash)


# ---------------------------------------------------------------- generation


def load_denoiser(run: RunDir, vae_hash: str, device: torch.device
                  ) -> tuple[Denoiser, dict[str, Any]]:
    """The trained denoiser D(x, sigma) of the run, and its model header."""
    unet, header = checkpoint.load_model(run.model("diffusion"), UNet, device)
    if header.get("vae_hash") != vae_hash:
        raise CheckpointError(f"{run.model('diffusion')} was trained on latents of another "
                              "VAE; retrain it (ldm encode, ldm train diffusion)")
    schedule = NoiseSchedule.from_config(from_dict(ScheduleConfig, header["schedule"]))
    objective = make_objective(from_dict(ObjectiveConfig, header["objective"]), schedule)
    return objective.denoiser(unet), header


def model_calls(run: RunDir, sampler: str, device: torch.device) -> int:
    """The NFE of one run of `sampler` ('ddpm-25', 'heun', ...) on the run's denoiser."""
    vae_hash = checkpoint.load(run.model("vae"), kind="vae")[1]["sha256"]
    return samplers.model_calls(sampler, load_denoiser(run, vae_hash, device)[0])


@torch.no_grad()
def generate(run: RunDir, model: ModelName, num_samples: int, seed: int, *,
             sampler: str = "ddim-50", sampling: SamplingConfig | None = None,
             device: torch.device, batch_size: int = 500, progress: bool = True) -> np.ndarray:
    """uint8 (N, 28, 28) digits; sample i depends only on (seed, i), not on batch or world size."""
    if num_samples <= 0 or batch_size <= 0:
        raise UsageError("the number of samples and the batch size must be > 0")
    sampling = sampling or SamplingConfig()
    vae, vae_header = checkpoint.load_model(run.model("vae"), VAE, device)
    c, s = vae.config.latent_channels, vae.config.latent_size
    if model == "diffusion":
        denoiser, header = load_denoiser(run, vae_header["sha256"], device)
        shift, scale = tuple(header["shift"]), tuple(header["scale"])
    mine = list(range(dist.rank(), num_samples, dist.world_size()))
    chunks = []
    for start in range(0, len(mine), batch_size):
        indices = mine[start:start + batch_size]
        generators = [generator(seed, i) for i in indices]
        x_T = randn((len(indices), c, s, s), generators, device)  # (B, C, S, S)
        if model == "diffusion":
            x0 = sample(denoiser, x_T, sampler, variance=sampling.variance, eta=sampling.eta,
                        generator=generators, progress=progress)
            chunks.append(vae.decode(latents.denormalise(x0, shift, scale)).cpu())
        else:
            chunks.append(vae.decode(x_T).cpu())  # the VAE prior N(0, I)
    images = torch.cat(chunks) if chunks else torch.empty(0, 1, 28, 28)
    gathered = dist.all_gather_rows(images.to(device)).cpu()
    order = np.concatenate([np.arange(r, num_samples, dist.world_size())
                            for r in range(dist.world_size())])
    result = torch.empty_like(gathered)
    result[torch.from_numpy(order)] = gathered
    return data.to_uint8(result)


@torch.no_grad()
def reconstruct(data_dir: str | Path | None, run: RunDir, split: data.Split, *,
                device: torch.device, batch_size: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """VAE reconstructions (decoded posterior means) of a split, with its true labels."""
    vae, _ = checkpoint.load_model(run.model("vae"), VAE, device)
    images, labels = data.load_split(data_dir, split)
    out = []
    for start in range(0, len(images), batch_size):
        mean, _ = vae.encode(data.to_unit_tensor(images[start:start + batch_size]).to(device))
        out.append(vae.decode(mean).cpu())
    return data.to_uint8(torch.cat(out)), labels


# ---------------------------------------------------------------- evaluation


def reference(data_dir: str | Path | None, run: RunDir, device: torch.device
              ) -> tuple[Classifier, Reference]:
    """The run's classifier and the training-set statistics, cached by classifier hash."""
    classifier, header = checkpoint.load_model(run.model("classifier"), Classifier, device)
    digest = header["sha256"]
    cached = Reference.load(run.reference(digest), digest)
    if cached is None:
        cached = reference_from_images(classifier, data.load_split(data_dir, "train")[0], digest,
                                       device)
        if dist.is_main():
            cached.save(run.reference(digest))
    return classifier, cached


def evaluate(data_dir: str | Path | None, run: RunDir, images: np.ndarray,
             labels: np.ndarray | None, *, device: torch.device, seed: int = 0) -> dict:
    classifier, ref = reference(data_dir, run, device)
    return evaluate_images(classifier, images, ref, labels, device, seed=seed)
