"""Images from a run's models: VAE prior samples, diffusion samples decoded by the VAE, VAE
reconstructions, and the samples file every generator writes (`.npz` plus a `.png` grid)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from . import checkpoint, data, latents
from . import distributed as dist
from .config import ObjectiveConfig, SamplingConfig, ScheduleConfig, from_dict
from .datasets import Dataset
from .diffusion import Denoiser, NoiseSchedule, sample, samplers
from .diffusion.guidance import (
    AutoGuidedDenoiser,
    guided,
    labels_for,
    network_calls,
    parse_labels,
)
from .diffusion.objective import Objective, make_objective
from .errors import CheckpointError, UsageError
from .fileio import write_npz
from .models import VAE, UNet
from .rng import generator, randn
from .rundir import RunDir

ModelName = Literal["vae", "diffusion"]


def load_diffusion(run: RunDir, vae_hash: str, device: torch.device, name: str = "diffusion"
                   ) -> tuple[UNet, Objective, dict[str, Any]]:
    """The run's trained UNet (name="guide": autoguidance's guide), its objective and its model
    header."""
    path = run.model(name)
    if name == "guide" and not path.exists():
        raise UsageError(f"autoguidance needs a guide, and {run.root} has none (`ldm train "
                         "guide`, or `ldm run` with guide.channels set)")
    unet, header = checkpoint.load_model(path, UNet, device)
    if header.get("vae_hash") != vae_hash:
        raise CheckpointError(f"{path} was trained on latents of another VAE; retrain it "
                              "(ldm encode, ldm train diffusion)")
    schedule = NoiseSchedule.from_config(from_dict(ScheduleConfig, header["schedule"]))
    objective = make_objective(from_dict(ObjectiveConfig, header["objective"]), schedule)
    return unet, objective, header


def stored_mean(header: dict[str, Any], device: torch.device) -> torch.Tensor | None:
    """(C, S, S) mean of the training x_0 that a diffusion model's header stores, where its
    ladders start (denoiser.start); None for models trained before it was stored."""
    mean = header.get("data_mean")
    return None if mean is None else torch.tensor(mean, dtype=torch.float32, device=device)


def load_denoiser(run: RunDir, vae_hash: str, device: torch.device, autoguidance: float = 1.0
                  ) -> tuple[Denoiser, dict[str, Any]]:
    """The run's trained denoiser D(x, sigma), whatever its objective, and its model header
    (a conditional model without labels: its unconditional half, the null label); with
    `autoguidance` s > 1, D guided by the run's guide at scale s."""
    unet, objective, header = load_diffusion(run, vae_hash, device)
    denoiser = objective.denoiser(unet, stored_mean(header, device))
    return with_guide(run, vae_hash, device, denoiser, header, autoguidance), header


def with_guide(run: RunDir, vae_hash: str, device: torch.device, denoiser: Denoiser,
               header: dict[str, Any], autoguidance: float) -> Denoiser:
    """`denoiser` (whose model header is `header`) guided by the run's guide at scale s =
    `autoguidance`; itself at s = 1."""
    if autoguidance == 1.0:
        return denoiser
    guide, objective, guide_header = load_diffusion(run, vae_hash, device, "guide")
    if any(guide_header.get(k) != header.get(k) for k in ("objective", "schedule",
                                                           "latents_hash")):
        raise CheckpointError(f"{run.model('guide')} was trained with another objective, "
                              f"schedule or latents than {run.model('diffusion')}; retrain it "
                              "(ldm train guide)")
    guide_denoiser = objective.denoiser(guide, stored_mean(guide_header, device))
    return AutoGuidedDenoiser(denoiser, guide_denoiser, autoguidance)


def num_classes(run: RunDir) -> int:
    """The classes of the run's denoiser (0: unconditional)."""
    header = checkpoint.load(run.model("diffusion"), kind="unet")[1]
    return int(header["config"].get("num_classes", 0))


def check_conditioning(run: RunDir, sampling: SamplingConfig) -> None:
    """Labels and guidance need a class-conditional model (UsageError otherwise)."""
    if not (sampling.labels or sampling.guidance != 1.0):
        return
    classes = num_classes(run)
    if not classes:
        raise UsageError(f"labels and guidance need a class-conditional model, and "
                         f"{run.model('diffusion')} is unconditional (train it with "
                         "--conditional)")
    parse_labels(sampling.labels, classes)  # each label a class of this model


def sample_labels(sampling: SamplingConfig, num_samples: int,
                  num_classes: int) -> np.ndarray | None:
    """(N,) int64 label of each sample (a function of its index alone), or None."""
    if not sampling.labels:
        return None
    return np.asarray(labels_for(sampling.labels, range(num_samples), num_classes),
                      dtype=np.int64)


def model_calls(run: RunDir, sampler: str, device: torch.device, autoguidance: float = 1.0
                ) -> int:
    """The network evaluations (NFE) of one run of `sampler` ('ddpm-25', 'heun', ...) on the
    run's denoiser; autoguided, the guide's count too (it is smaller: each costs less)."""
    vae_hash = checkpoint.model_hash_of(checkpoint.load(run.model("vae"), kind="vae")[1])
    calls = samplers.model_calls(sampler, load_denoiser(run, vae_hash, device)[0])
    return network_calls(calls, autoguidance)


@torch.no_grad()
def generate(run: RunDir, model: ModelName, num_samples: int, seed: int, *,
             sampler: str = "ddim-50", sampling: SamplingConfig | None = None,
             device: torch.device, batch_size: int = 500, progress: bool = True) -> np.ndarray:
    """uint8 (N, H, W) or (N, H, W, 3) images; sample i depends only on (seed, i), not on the
    batch or world size."""
    if num_samples <= 0 or batch_size <= 0:
        raise UsageError("the number of samples and the batch size must be > 0")
    sampling = sampling or SamplingConfig()
    vae, vae_header = checkpoint.load_model(run.model("vae"), VAE, device)
    c, s = vae.config.latent_channels, vae.config.latent_size
    if model == "diffusion":
        check_conditioning(run, sampling)
        vae_hash = checkpoint.model_hash_of(vae_header)
        unet, objective, header = load_diffusion(run, vae_hash, device)
        data_mean = stored_mean(header, device)
        denoiser = with_guide(run, vae_hash, device, objective.denoiser(unet, data_mean), header,
                              sampling.autoguidance)
        labelled = functools.partial(objective.denoiser, data_mean=data_mean, labelled=True)
        shift, scale = tuple(header["shift"]), tuple(header["scale"])
    mine = list(range(dist.rank(), num_samples, dist.world_size()))
    chunks = []
    for start in range(0, len(mine), batch_size):
        indices = mine[start:start + batch_size]
        generators = [generator(seed, i) for i in indices]
        x_T = randn((len(indices), c, s, s), generators, device)  # (B, C, S, S)
        if model == "diffusion":
            if sampling.labels:  # (B,) labels of these samples, guided at scale s
                labels = torch.tensor(labels_for(sampling.labels, indices, unet.config.num_classes),
                                      device=device)
                denoiser = guided(labelled, unet, labels, unet.null_label, sampling.guidance)
            x0 = sample(denoiser, x_T, sampler, variance=sampling.variance, eta=sampling.eta,
                        generator=generators, progress=progress)
            chunks.append(vae.decode(latents.denormalise(x0, shift, scale)).cpu())
        else:
            chunks.append(vae.decode(x_T).cpu())  # the VAE prior N(0, I)
    size = vae.config.image_size
    images = torch.cat(chunks) if chunks else torch.empty(0, vae.config.image_channels, size, size)
    gathered = dist.all_gather_rows(images.to(device)).cpu()
    order = np.concatenate([np.arange(r, num_samples, dist.world_size())
                            for r in range(dist.world_size())])
    result = torch.empty_like(gathered)
    result[torch.from_numpy(order)] = gathered
    return data.to_uint8(result)


@torch.no_grad()
def reconstruct(dataset: Dataset, run: RunDir, split: data.Split, *, device: torch.device,
                batch_size: int = 1000) -> tuple[np.ndarray, np.ndarray | None]:
    """VAE reconstructions (decoded posterior means) of a split, with its labels if any."""
    vae, header = checkpoint.load_model(run.model("vae"), VAE, device)
    dataset.check_trained_on(header, run.model("vae"))
    images, labels = dataset.split(split)
    out = []
    for start in range(0, len(images), batch_size):
        mean, _ = vae.encode(data.to_unit_tensor(images[start:start + batch_size]).to(device))
        out.append(vae.decode(mean).cpu())
    return data.to_uint8(torch.cat(out)), labels


def save_samples(path: Path, images: np.ndarray, labels: np.ndarray | None = None,
                 **meta: str | int | float) -> None:
    """The samples file (`images` uint8 (N, H, W[, 3]), optional `labels` (N,), and `meta` such as
    the `sampler` and its `nfe` as 0-d arrays) and a .png grid."""
    from .plots import save_grid  # matplotlib: only when writing

    arrays = {"images": images} if labels is None else {"images": images, "labels": labels}
    write_npz(path, **arrays, **{k: np.asarray(v) for k, v in meta.items()})
    save_grid(images, path.with_suffix(".png"))
