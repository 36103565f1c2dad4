"""Images from a run's models: VAE prior samples, diffusion samples decoded by the VAE, and VAE
reconstructions."""

from __future__ import annotations

import functools
from typing import Any, Literal

import numpy as np
import torch

from .. import distributed as dist
from ..data import Dataset
from ..data.images import Split, to_uint8, to_unit_tensor
from ..diffusion import Denoiser, NoiseSchedule, SamplingRequest, levels_only, sample
from ..diffusion.guidance import UNGUIDED, Guidance, GuidedDenoiser, MakeDenoiser, guided
from ..diffusion.objective import Objective, ObjectiveConfig, make_objective
from ..diffusion.schedule import ScheduleConfig
from ..errors import CheckpointError, UsageError
from ..models import VAE, UNet
from ..rng import generator, randn
from ..schema import check_set_size, from_dict
from . import checkpoint, latents
from .precision import Precision, autocast
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


def load_denoiser(run: RunDir, vae_hash: str, device: torch.device,
                  guidance: Guidance = UNGUIDED) -> tuple[Denoiser, dict[str, Any]]:
    """The run's trained denoiser D(x, sigma), whatever its objective, and its model header
    (a conditional model without labels: its unconditional half, the null label); guided by
    the run's guide when `guidance` asks for it."""
    unet, objective, header = load_diffusion(run, vae_hash, device)
    denoiser = objective.denoiser(unet, stored_mean(header, device))
    return with_guide(run, vae_hash, device, denoiser, header, guidance), header


def with_guide(run: RunDir, vae_hash: str, device: torch.device, denoiser: Denoiser,
               header: dict[str, Any], guidance: Guidance) -> Denoiser:
    """`denoiser` (whose model header is `header`) guided by the run's guide at the scale of
    `guidance`; itself unless `guidance` is by the guide."""
    if not guidance.by_guide:
        return denoiser
    guide, objective, guide_header = load_diffusion(run, vae_hash, device, "guide")
    if any(guide_header.get(k) != header.get(k) for k in ("objective", "schedule",
                                                           "latents_hash")):
        raise CheckpointError(f"{run.model('guide')} was trained with another objective, "
                              f"schedule or latents than {run.model('diffusion')}; retrain it "
                              "(ldm train guide)")
    # Both must see the same labels: an unconditional guide of a conditional denoiser (or the
    # reverse) would guide towards what neither was trained for.
    classes = [int(h["config"].get("num_classes", 0)) for h in (guide_header, header)]
    if classes[0] != classes[1]:
        raise CheckpointError(f"{run.model('guide')} is for {classes[0]} classes but "
                              f"{run.model('diffusion')} for {classes[1]}; a guide must be "
                              "trained for the model it guides (ldm train guide)")
    reference = objective.denoiser(guide, stored_mean(guide_header, device))
    return GuidedDenoiser(denoiser, reference, guidance.scale)


def num_classes(run: RunDir) -> int:
    """The classes of the run's denoiser (0: unconditional)."""
    header = checkpoint.load(run.model("diffusion"), kind="unet")[1]
    return int(header["config"].get("num_classes", 0))


def check_conditioning(run: RunDir, request: SamplingRequest) -> None:
    """Labels and guidance of the null label need a class-conditional model, autoguidance an
    unconditional one (UsageError)."""
    unconditional = request.guidance.reference == "unconditional"
    needs_classes = bool(request.labels) or (unconditional and request.guidance.active)
    if not (needs_classes or request.guidance.by_guide):
        return
    classes = num_classes(run)
    if request.guidance.by_guide and classes:
        raise UsageError(f"autoguidance guides an unconditional model, and "
                         f"{run.model('diffusion')} is class-conditional: it has classifier-free "
                         "guidance (--guidance with --labels), no guide")
    if not needs_classes:
        return
    if not classes:
        raise UsageError(f"labels and guidance need a class-conditional model, and "
                         f"{run.model('diffusion')} is unconditional (train it with "
                         "--conditional)")
    request.check_classes(classes)  # each label a class of this model


def nfe(run: RunDir, request: SamplingRequest) -> int:
    """The network evaluations of `request` on the run's denoiser, from its header's schedule
    and objective (no weights are loaded)."""
    header = checkpoint.load(run.model("diffusion"), kind="unet")[1]
    levels = levels_only(from_dict(ObjectiveConfig, header["objective"]),
                         from_dict(ScheduleConfig, header["schedule"]))
    return request.nfe(levels)


@torch.no_grad()
def decoded_samples(vae: VAE, unet: UNet, denoiser: Denoiser, labelled: MakeDenoiser,
                    request: SamplingRequest, x_T: torch.Tensor,
                    generators: list[torch.Generator], indices: list[int],
                    shift: tuple[float, ...], scale: tuple[float, ...],
                    progress: bool = False) -> np.ndarray:
    """uint8 images of samples `indices` from their noise x_T (B, C, S, S): `request`'s sampler
    on `denoiser` (`labelled` makes a conditional model's, for the request's labels), decoded
    by the VAE."""
    labels = request.labels_of(indices, unet.config.num_classes)
    if labels is not None:  # (B,) labels of these samples, guided at scale s
        denoiser = guided(labelled, unet, torch.from_numpy(labels).to(x_T.device),
                          unet.null_label, request.guidance.scale)
    x0 = sample(denoiser, x_T, request.sampler, generator=generators, progress=progress)
    return to_uint8(vae.decode(latents.denormalise(x0, shift, scale)))


@torch.no_grad()
def generate(run: RunDir, model: ModelName, num_samples: int, seed: int, *,
             request: SamplingRequest | None = None, device: torch.device,
             batch_size: int = 500, progress: bool = True,
             precision: Precision = "fp32") -> np.ndarray:
    """uint8 (N, H, W) or (N, H, W, 3) images; sample i depends only on (seed, i), not on the
    batch or world size. `request` (diffusion only; default `ddim-50`) says how; `precision`:
    the autocast dtype of the denoiser and the decoder (precision.py)."""
    if num_samples <= 0 or batch_size <= 0:
        raise UsageError("the number of samples and the batch size must be > 0")
    request = request or SamplingRequest.of("ddim-50")
    vae, vae_header = checkpoint.load_model(run.model("vae"), VAE, device)
    check_set_size("-n", num_samples, vae.config.image_size, vae.config.image_channels)
    c, s = vae.config.latent_channels, vae.config.latent_size
    if model == "diffusion":
        check_conditioning(run, request)
        vae_hash = checkpoint.model_hash_of(vae_header)
        unet, objective, header = load_diffusion(run, vae_hash, device)
        data_mean = stored_mean(header, device)
        denoiser = with_guide(run, vae_hash, device, objective.denoiser(unet, data_mean), header,
                              request.guidance)
        labelled = functools.partial(objective.denoiser, data_mean=data_mean, labelled=True)
        shift, scale = tuple(header["shift"]), tuple(header["scale"])
    mine = list(range(dist.rank(), num_samples, dist.world_size()))
    chunks = []  # uint8, each batch's as soon as it is decoded: 1/4 of float32's bytes
    for start in range(0, len(mine), batch_size):
        indices = mine[start:start + batch_size]
        generators = [generator(seed, i) for i in indices]
        x_T = randn((len(indices), c, s, s), generators, device)  # (B, C, S, S)
        if model == "diffusion":
            # Autocast lowers only the networks' convs and linears: the sampler's float32
            # updates stay float32, as each network returns float32.
            with autocast(precision, device):
                chunks.append(decoded_samples(vae, unet, denoiser, labelled, request, x_T,
                                              generators, indices, shift, scale, progress))
        else:
            with autocast(precision, device):
                chunks.append(to_uint8(vae.decode(x_T)))  # the VAE prior N(0, I)
    size, channels = vae.config.image_size, vae.config.image_channels
    item = (size, size) if channels == 1 else (size, size, channels)
    images = np.concatenate(chunks) if chunks else np.empty((0, *item), np.uint8)
    if dist.world_size() == 1:
        return images
    gathered = dist.all_gather_rows(torch.from_numpy(images).to(device)).cpu().numpy()
    order = np.concatenate([np.arange(r, num_samples, dist.world_size())
                            for r in range(dist.world_size())])
    result = np.empty_like(gathered)
    result[order] = gathered
    return result


@torch.no_grad()
def reconstruct(dataset: Dataset, run: RunDir, split: Split, *, device: torch.device,
                batch_size: int = 1000, precision: Precision = "fp32"
                ) -> tuple[np.ndarray, np.ndarray | None]:
    """VAE reconstructions (decoded posterior means) of a split, with its labels if any."""
    vae, header = checkpoint.load_model(run.model("vae"), VAE, device)
    dataset.check_trained_on(header, run.model("vae"))
    images, labels = dataset.split(split)
    out = []
    for start in range(0, len(images), batch_size):
        with autocast(precision, device):
            mean, _ = vae.encode(to_unit_tensor(images[start:start + batch_size]).to(device))
            out.append(vae.decode(mean).cpu())
    return to_uint8(torch.cat(out)), labels
