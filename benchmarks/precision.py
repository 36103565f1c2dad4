"""Milliseconds per training step and samples per second of each model in fp32 and bf16 (fp16 on
CUDA only), with each one's share of the chip's peak and the kernels that ran.

    python benchmarks/precision.py [--device cpu|cuda] [--threads 2] [--steps 30] [--out FILE]

Synthetic inputs at the --preset's sizes (default: the default preset's, MNIST's 28x28x1 images
and 8x8x4 latents) and batch sizes, changed by --set; no data needed. A training step is one
step of the library's `fit` (autocast forward and loss, backward, gradient clipping, fused AdamW
on float32 master weights, fp16's GradScaler), timed between the starts of consecutive loss
calls; sampling is one forward at batch 500: the denoiser's UNet, the VAE's decoder, the
classifier's features. Each figure is the median of --steps timings, taken in 3 rounds of
every precision in turn, each after 3 warm-up ones; the load average before and after is
recorded (the machine may be shared).

FLOPs are counted by torch.utils.flop_counter.FlopCounterMode on the forward (2 per
multiply-add of the convs, linears and matmuls); a training step counts 3x its forward (the
backward computes the gradients of the inputs and of the weights, each about a forward). The
share of peak is FLOPs / seconds / peak, with the peak
- CPU: threads x clock x FLOPs per cycle per core. The clock is /proc/cpuinfo's "cpu MHz" (what
  a VM reports, usually the base clock; boost may be higher). FLOPs per cycle: 32 in fp32,
  assuming AVX-512 on two 256-bit FMA pipes (AMD Zen 4: 2 pipes x 8 lanes x 2); 64 in bf16 with
  avx512_bf16 (VDPBF16PS: two bf16 products per fp32 lane), fp32's 32 without it.
- CUDA: a table of dense (no sparsity) H100 / H200 figures; null for other GPUs.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from common import emit, parser
from latentdiffusion.diffusion import NoiseSchedule
from latentdiffusion.diffusion.objective import diffusion_loss, make_objective
from latentdiffusion.models import VAE, Classifier, UNet, to_device
from latentdiffusion.models.autoencoder_losses import vae_loss
from latentdiffusion.run import recipe
from latentdiffusion.run.config import ImageShape, TrainConfig, for_images
from latentdiffusion.run.keys import StageKey
from latentdiffusion.run.precision import Precision, autocast, cpu_has_bf16
from latentdiffusion.run.presets import preset
from latentdiffusion.run.training import Batch, fit, init_model

WARM_UP = 3
ROUNDS = 3
SAMPLE_BATCH = 500
CPU_FLOPS_PER_CYCLE = {"fp32": 32, "bf16": 64}  # per core; bf16's needs avx512_bf16
# Dense tensor-core peaks (fp32: the CUDA cores), SXM parts, from NVIDIA's data sheets.
GPU_PEAKS = {"H100": {"fp32": 67e12, "bf16": 989e12, "fp16": 989e12},
             "H200": {"fp32": 67e12, "bf16": 989e12, "fp16": 989e12}}

Work = Callable[[nn.Module], torch.Tensor]
Loss = Callable[[nn.Module, Batch], torch.Tensor]


def _cpu_mhz() -> float | None:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    clocks = [float(line.split(":")[1]) for line in lines if line.startswith("cpu MHz")]
    return clocks[0] if clocks else None


def peak_flops(precision: Precision, device: torch.device, threads: int) -> float | None:
    """The chip's FLOP/s in `precision` (the docstring's formula), None when not known."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((p[precision] for chip, p in GPU_PEAKS.items() if chip in name), None)
    mhz = _cpu_mhz()
    per_cycle = CPU_FLOPS_PER_CYCLE["bf16" if precision == "bf16" and cpu_has_bf16() else "fp32"]
    return None if mhz is None else threads * mhz * 1e6 * per_cycle


def forward_flops(model: nn.Module, work: Work) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        work(model)
    return int(counter.get_total_flops())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step_seconds(cls: type[nn.Module], model_config: object, loss: Loss,
                       data: tuple[torch.Tensor, ...], batch_size: int, precision: Precision,
                       device: torch.device, steps: int) -> list[float]:
    """Seconds between the starts of consecutive loss calls in the library's `fit`."""
    starts: list[float] = []

    def timed(model: nn.Module, batch: Batch) -> torch.Tensor:
        _sync(device)
        starts.append(time.perf_counter())
        return loss(model, batch)

    config = TrainConfig(steps=WARM_UP + steps + 1, batch_size=batch_size, lr=1e-4,
                         checkpoint_every=10**6, checkpoint_seconds=1e9,
                         validate_every=10**6, precision=precision)
    with tempfile.TemporaryDirectory() as state:
        fit(init_model(cls, model_config, 0), timed, data, None, config, state_dir=Path(state),
            kind=cls.kind, key=StageKey.of(train=config), model_config=model_config,  # type: ignore[attr-defined]
            device=device, progress=False)
    return [b - a for a, b in zip(starts[WARM_UP:], starts[WARM_UP + 1:], strict=False)]


@torch.inference_mode()
def forward_seconds(model: nn.Module, work: Work, precision: Precision, device: torch.device,
                    steps: int) -> list[float]:
    times = []
    for i in range(WARM_UP + steps):
        _sync(device)
        start = time.perf_counter()
        with autocast(precision, device):
            work(model)
        _sync(device)
        if i >= WARM_UP:
            times.append(time.perf_counter() - start)
    return times


def top_ops(model: nn.Module, work: Work, precision: Precision, device: torch.device,
            n: int = 5) -> list[dict[str, float | str]]:
    """The n ops of most self time over 3 forward + backward passes: which kernels run."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    for _ in range(2):  # warm-up, outside the profile
        with autocast(precision, device):
            work(model).backward()
    with profile(activities=activities) as prof:
        for _ in range(3):
            with autocast(precision, device):
                work(model).backward()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:n]
    return [{"op": e.key, "ms": round(getattr(e, key) / 3e3, 2)} for e in events]


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--steps", type=int, default=30,
                   help=f"timed repetitions of each figure, in {ROUNDS} rounds")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    start_load = os.getloadavg()  # (1, 5, 15 minutes)
    # The preset at MNIST's images and classes, with the --set changes
    config = recipe.apply_sets(for_images(preset(args.preset), ImageShape()), args.set)
    precisions: list[Precision] = ["fp32", "bf16"] + (["fp16"] if device.type == "cuda" else [])
    g = torch.Generator().manual_seed(0)
    size, c, s = config.vae.image_size, config.unet.in_channels, config.unet.latent_size
    images = torch.rand(SAMPLE_BATCH, 1, size, size, generator=g)  # 500 >= every batch size
    latents = torch.randn(SAMPLE_BATCH, c, s, s, generator=g)
    labels = torch.randint(0, 10, (SAMPLE_BATCH,), generator=g)
    t = torch.randint(0, config.schedule.num_timesteps, (SAMPLE_BATCH,), generator=g)
    schedule = NoiseSchedule.from_config(config.schedule)
    on = {k: v.to(device) for k, v in (("x", images), ("z", latents), ("t", t))}
    vae = config.vae
    models: dict[str, tuple] = {  # name: (class, config, loss, data, batch, sampling forward)
        "classifier": (Classifier, config.classifier,
                       lambda m, b: F.cross_entropy(m(b.tensors[0]), b.tensors[1]),
                       (images, labels), config.classifier_train.batch_size,
                       lambda m: m.features(on["x"])),
        "vae": (VAE, vae, lambda m, b: vae_loss(m, b.tensors[0], b.randn(c, s, s),
                                                vae.kl_weight, vae.loss),
                (images,), config.vae_train.batch_size, lambda m: m.decode(on["z"])),
        "unet": (UNet, config.unet, diffusion_loss(make_objective(config.objective, schedule)),
                 (latents,), config.diffusion_train.batch_size, lambda m: m(on["z"], on["t"])),
    }
    result: dict = {"benchmark": "precision", "preset": args.preset, "sets": args.set,
                    "device": str(device), "steps": args.steps,
                    "kernels": {"mkldnn": torch.backends.mkldnn.is_available(),
                                "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                                "cpu_bf16_instructions": cpu_has_bf16(),
                                "cpu_mhz": _cpu_mhz()},
                    "peak_tflops": {q: (None if (f := peak_flops(q, device, args.threads))
                                        is None else round(f / 1e12, 3)) for q in precisions},
                    "models": {}}
    if device.type == "cuda":
        result["kernels"]["gpu"] = torch.cuda.get_device_name(device)
    for name, spec in models.items():
        result["models"][name] = measure(*spec, precisions, device, args.threads, args.steps,
                                         profile_ops=name == "unet")
    result["load_average"] = [start_load, os.getloadavg()]
    emit(result)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


def measure(cls: type[nn.Module], model_config: object, loss: Loss,
            data: tuple[torch.Tensor, ...], batch: int, sampling: Work,
            precisions: list[Precision], device: torch.device, threads: int, steps: int,
            profile_ops: bool) -> dict:
    """One model's FLOPs and, per precision, its step time, sampling rate and share of peak."""
    model = to_device(init_model(cls, model_config, 0), device)
    first = tuple(x[:batch].to(device) for x in data)

    def train_forward(m: nn.Module) -> torch.Tensor:
        return loss(m, _batch(first, device))

    step_flops = 3 * forward_flops(model.train(), train_forward)
    sample_flops = forward_flops(model.eval(), sampling)
    entry: dict = {"batch_size": batch, "train_gflops_per_step": round(step_flops / 1e9, 3),
                   f"sampling_gflops_per_{SAMPLE_BATCH}": round(sample_flops / 1e9, 3)}
    # Rounds of every precision in turn: a change of load on a shared machine hits them all.
    train: dict[str, list[float]] = {p: [] for p in precisions}
    infer: dict[str, list[float]] = {p: [] for p in precisions}
    for _ in range(ROUNDS):
        for precision in precisions:
            train[precision] += train_step_seconds(cls, model_config, loss, data, batch,
                                                   precision, device, steps // ROUNDS)
            infer[precision] += forward_seconds(model.eval(), sampling, precision, device,
                                                steps // ROUNDS)
    for precision in precisions:
        ms = statistics.median(train[precision]) * 1e3
        sample_ms = statistics.median(infer[precision]) * 1e3
        peak = peak_flops(precision, device, threads)
        entry[precision] = {
            "train_ms_per_step": round(ms, 2),
            "samples_per_second": round(SAMPLE_BATCH / sample_ms * 1e3, 1),
            "train_share_of_peak": None if peak is None else round(
                step_flops / (ms / 1e3) / peak, 4),
            "sampling_share_of_peak": None if peak is None else round(
                sample_flops / (sample_ms / 1e3) / peak, 4)}
        if profile_ops:
            entry[precision]["top_ops_train"] = top_ops(model.train(), train_forward, precision,
                                                        device)
    return entry


def _batch(tensors: tuple[torch.Tensor, ...], device: torch.device) -> Batch:
    """The whole of `tensors` as one batch with fixed randomness."""
    n = len(tensors[0])
    return Batch(tensors, n, slice(None), torch.Generator().manual_seed(0), device)


if __name__ == "__main__":
    main()
