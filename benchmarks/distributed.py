"""Training throughput of 1 vs N processes under torchrun (CPU, gloo), same global batch.

    python benchmarks/distributed.py --data-dir ../shared/data/mnist --run-dir bench-out/ddp \\
        --nproc 2 --steps 937
Needs a run directory with latents (any benchmark above makes one; it is copied). Each process
gets threads = cores / processes, so both settings use the whole machine.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

from common import emit, parser
from latentdiffusion.run import checkpoint


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--source", default="bench-out/default", help="run dir holding latents")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=937, help="denoiser steps")
    args = p.parse_args()
    result: dict = {"benchmark": "distributed", "steps": args.steps}
    cores = os.cpu_count() or 1
    for nproc in (1, args.nproc):
        run = args.run_dir / f"nproc{nproc}"
        shutil.rmtree(run, ignore_errors=True)
        run.mkdir(parents=True)
        for name in ("vae.safetensors", "latents.safetensors"):
            shutil.copy(os.path.join(args.source, name), run / name)
        env = {**os.environ, "OMP_NUM_THREADS": str(max(cores // nproc, 1))}
        command = ["torchrun", "--standalone", f"--nproc_per_node={nproc}", "-m",
                   "latentdiffusion", "train", "diffusion", "--run-dir", str(run), "--preset",
                   args.preset, "--steps", str(args.steps), "--device", "cpu", "--quiet"]
        start = time.perf_counter()
        subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        header = checkpoint.load(run / "diffusion.safetensors", kind="unet")[1]
        train = header["train_config"]
        examples = train["steps"] * train["batch_size"]
        result[f"nproc_{nproc}"] = {
            "wall_seconds": wall, "train_seconds": header["train_seconds"],
            "samples_per_second": examples / header["train_seconds"],
            "final": header["history"][-1]}
    emit(result)


if __name__ == "__main__":
    sys.exit(main())
