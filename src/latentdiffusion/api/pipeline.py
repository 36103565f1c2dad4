"""`Pipeline`: a trained model from Python, loaded from a run directory or an export, to
sample (the function `ldm sample` builds on, so the same arguments give the same bytes), encode,
decode and score."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from .. import distributed as dist
from ..data import Dataset, load_dataset
from ..data.images import to_uint8, to_unit_tensor
from ..data.prepare import PrepareConfig
from ..diffusion import SAMPLERS, SamplingRequest
from ..errors import CheckpointError, DataError, UsageError
from ..models import VAE
from ..run import checkpoint, generation, latents, scores
from ..run.config import SamplingConfig
from ..run.precision import Precision, check_device, parse
from ..run.rundir import RunDir, is_run_dir, read_manifest, read_metrics, recorded_preparation
from ..schema import MAX_SAMPLES
from . import exports

log = logging.getLogger(__name__)
MAX_SEED = 2**63  # torch and numpy generators take 64-bit seeds


def sampling_request(sampler: str = "ddim", *, steps: int | None = None,
                     variance: str | None = None, eta: float | None = None, labels: str = "",
                     guidance: float = 1.0, autoguidance: float = 1.0) -> SamplingRequest:
    """One request from `ldm sample`'s options: a sampler name or NAME-STEPS (`steps` appends
    them), ddpm's variance, ddim's eta, the labels (`"7"`, `"0,1,2"`, `"balanced"`) and the
    scales; every value checked (UsageError) before any work."""
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0):
        raise UsageError(f"steps must be an integer > 0, got {steps!r}")
    spec = sampler if steps is None else f"{sampler}-{steps}"
    defaults = SamplingConfig()
    # The run config's checks, with the same one-line errors: the request it makes is ours.
    config = SamplingConfig(variance=variance or defaults.variance,  # type: ignore[arg-type]
                            eta=defaults.eta if eta is None else eta, samplers=(spec,),
                            labels=labels, guidance=guidance, autoguidance=autoguidance)
    request = config.requests[0]
    for option, value in (("eta", eta), ("variance", variance)):
        if value is not None and option not in request.sampler.info.options:
            takes = [n for n, s in SAMPLERS.items() if option in s.options]
            raise UsageError(f"{option} is an option of {', '.join(takes)}, not of "
                             f"{request.sampler.name}")
    return request


@dataclass(frozen=True)
class Samples:
    """A generated set: uint8 images, the labels asked for, and how it was made (the sampler,
    its NFE and the guidance scales, as the samples file records them)."""

    images: np.ndarray
    labels: np.ndarray | None
    made: dict[str, str | int | float]


def diffusion_samples(run: RunDir, num_samples: int, request: SamplingRequest, *, seed: int,
                      device: torch.device, batch_size: int = 500, progress: bool = False,
                      precision: Precision = "fp32") -> Samples:
    """`num_samples` images of the run's denoiser (sample i a function of (seed, i) alone);
    what `ldm sample --model diffusion` and `Pipeline.sample` make."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < MAX_SEED:
        raise UsageError(f"the seed must be an integer in 0 .. 2**63 - 1, got {seed!r}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) \
            or not 0 < num_samples <= MAX_SAMPLES:
        raise UsageError(f"the number of samples (-n) must be an integer in 1 .. {MAX_SAMPLES}, "
                         f"got {num_samples!r}")
    generation.check_conditioning(run, request)
    made = request.record(generation.nfe(run, request))
    labels = (request.labels_of(range(num_samples), generation.num_classes(run))
              if request.labels else None)
    images = generation.generate(run, "diffusion", num_samples, seed, request=request,
                                 device=device, batch_size=batch_size, progress=progress,
                                 precision=precision)
    return Samples(images, labels, made)


class Pipeline:
    """A trained latent diffusion model: `Pipeline.load(path)`, then `sample`, `encode`,
    `decode`, `evaluate` (run directories only) and `info`."""

    def __init__(self, root: Path, kind: Literal["run", "export"], info: dict[str, Any],
                 device: torch.device) -> None:
        self.root, self.kind, self.device = root, kind, device
        self._info = info
        self._run = RunDir(root)

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, device: str = "auto") -> Pipeline:
        """From a run directory (`ldm run`) or an export (`ldm export`); an export's weight files
        are checked against the sha256 its config.json records (CheckpointError when damaged),
        and every model file against its own checksum."""
        root = Path(path)
        resolved = dist.resolve_device(device)
        if exports.is_export(root):
            config = exports.read_export(root)
            info = {key: config.get(key) for key in ("data", "run_config", "fid", "command",
                                                     "license")}
            hashes = {name: m.get("model_hash") for name, m in config["models"].items()}
            pipe = cls(root, "export", {"kind": "export", "path": str(root), **info,
                                        "hashes": hashes}, resolved)
        elif is_run_dir(root):
            pipe = cls(root, "run", _run_info(root), resolved)
        else:
            raise DataError(f"{root} is neither a run directory (`ldm run`) nor an export "
                            "(`ldm export`)")
        for name in ("vae", "diffusion"):  # each verified, and named in any error
            checkpoint.load(pipe._run.model(name), kind=exports.MODELS[name])
        return pipe

    @property
    def info(self) -> dict[str, Any]:
        """The data set (name, source, content hash), the run config, the FID table (N and FID
        per set), the model hashes and the command that trained it."""
        return dict(self._info)

    def sample(self, n: int, *, sampler: str = "ddim", steps: int | None = None, seed: int = 0,
               labels: str = "", guidance: float = 1.0, autoguidance: float = 1.0,
               variance: str | None = None, eta: float | None = None, batch_size: int = 500,
               device: str | None = None, progress: bool = False, return_labels: bool = False,
               precision: str = "fp32") -> np.ndarray | tuple[np.ndarray, np.ndarray | None]:
        """uint8 images (n, H, W) or (n, H, W, 3), the bytes `ldm sample --model diffusion`
        writes with the same options; with `return_labels`, (images, labels asked for).

        `sampler`: a name or NAME-STEPS (`ddim-50`, `dpmpp-2m-5`); `labels` (a conditional
        model): `"7"`, `"0,1,2"` (cycled) or `"balanced"`; `guidance`: classifier-free scale;
        `autoguidance`: the guide's scale (an unconditional model); 1 is off for both;
        `precision`: "fp32", "bf16" or "fp16" (CUDA only), the networks' autocast dtype.
        """
        request = sampling_request(sampler, steps=steps, variance=variance, eta=eta,
                                   labels=labels, guidance=guidance, autoguidance=autoguidance)
        resolved, dtype = self._device(device), parse(precision, "precision")
        check_device(dtype, resolved)
        made = diffusion_samples(self._run, n, request, seed=seed, device=resolved,
                                 batch_size=batch_size, progress=progress, precision=dtype)
        return (made.images, made.labels) if return_labels else made.images

    @torch.no_grad()
    def encode(self, images: np.ndarray, *, batch_size: int = 500) -> torch.Tensor:
        """(N, C, S, S) float32 latents as the denoiser sees them: the VAE's posterior mean of
        uint8 images (N, H, W) or (N, H, W, 3), normalised by the run's latent shift and scale."""
        vae, shift, scale = self._vae()
        config = vae.config
        item = (config.image_size,) * 2 + ((config.image_channels,)
                                           if config.image_channels != 1 else ())
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim < 1 or images.shape[1:] != item:
            raise DataError(f"encode takes uint8 images of shape (N, {', '.join(map(str, item))})"
                            f", got {images.dtype} {images.shape}")
        out = []
        for start in range(0, len(images), batch_size):
            x = to_unit_tensor(images[start:start + batch_size]).to(self.device)
            mean, _ = vae.encode(x)
            out.append(latents.normalise(mean, shift, scale).cpu())
        return torch.cat(out) if out else torch.empty(0, config.latent_channels,
                                                      config.latent_size, config.latent_size)

    @torch.no_grad()
    def decode(self, x0: torch.Tensor | np.ndarray, *, batch_size: int = 500) -> np.ndarray:
        """uint8 images of latents in the denoiser's space (what `encode` returns)."""
        vae, shift, scale = self._vae()
        config = vae.config
        x0 = torch.as_tensor(x0, dtype=torch.float32)
        if tuple(x0.shape[1:]) != (config.latent_channels, config.latent_size,
                                   config.latent_size):
            raise DataError(f"decode takes latents of shape (N, {config.latent_channels}, "
                            f"{config.latent_size}, {config.latent_size}), got "
                            f"{tuple(x0.shape)}")
        chunks = [to_uint8(vae.decode(latents.denormalise(
            x0[start:start + batch_size].to(self.device), shift, scale)))
            for start in range(0, len(x0), batch_size)]
        return np.concatenate(chunks) if chunks else np.empty((0, *x0.shape[2:]), np.uint8)

    def evaluate(self, images: np.ndarray, labels: np.ndarray | None = None, *,
                 data: str | os.PathLike[str] | None = None, dataset: str | None = None,
                 seed: int = 0, nearest: bool = False) -> dict[str, Any]:
        """The dict `ldm evaluate --samples` prints for these images (and labels): FID, KID,
        precision/recall, ... against the run's classifier and data set (default: the data
        the run was trained on, as run.json records it). An export holds no classifier and no
        data: UsageError."""
        if self.kind == "export":
            raise UsageError(f"{self.root} is an export: it holds no classifier (the FID "
                             "feature network) and no data set; evaluate with the run "
                             "directory it came from")
        checkpoint.load(self._run.model("classifier"), kind="classifier")  # missing: say so
        return scores.evaluate(self._dataset(data, dataset), self._run, np.asarray(images),
                               None if labels is None else np.asarray(labels),
                               device=self.device, seed=seed, nearest=nearest)

    # ---------------------------------------------------------------- helpers

    def _device(self, device: str | None) -> torch.device:
        return self.device if device is None else dist.resolve_device(device)

    def _vae(self) -> tuple[VAE, tuple[float, ...], tuple[float, ...]]:
        vae, _ = checkpoint.load_model(self._run.model("vae"), VAE, self.device)
        header = checkpoint.load(self._run.model("diffusion"), kind="unet")[1]
        return vae, tuple(header["shift"]), tuple(header["scale"])

    def _dataset(self, data: str | os.PathLike[str] | None, name: str | None) -> Dataset:
        manifest = read_manifest(self.root / "run.json")
        prepare = recorded_preparation(manifest) or PrepareConfig()
        if data is None and name is None:
            data = manifest.get("data_dir") or None
            if data is None:
                raise UsageError(f"{self.root}/run.json records no data set; pass data=")
        return load_dataset(data, name, prepare)


def _run_info(root: Path) -> dict[str, Any]:
    manifest = read_manifest(root / "run.json")
    hashes = {}
    for name, kind in exports.MODELS.items():
        header = checkpoint.peek(RunDir(root).model(name))
        if header is not None and header.get("kind") == kind:
            hashes[name] = checkpoint.model_hash_of(header)
    if not hashes:
        raise CheckpointError(f"{root} is a run directory without models; train it first "
                              "(ldm run)")
    return {"kind": "run", "path": str(root), "data": manifest.get("data", {}),
            "run_config": manifest.get("config", {}),
            "fid": exports.fid_table(read_metrics(root / "metrics.json")),
            "command": exports.run_command(manifest) if manifest.get("config") else None,
            "license": None, "hashes": hashes}
