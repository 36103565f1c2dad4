"""Kill -9 in the denoiser's training, rerun, and compare with an uninterrupted run.

Copies a finished run directory (`--reference`, made by `ldm run` with `--preset`) without
its denoiser, guide, samples and everything after them, runs `ldm run` on the copy, sends
SIGKILL once `logs/diffusion.jsonl` reaches `--kill-at` steps, runs `ldm run` again to the
end, and compares: the denoiser's and the guide's weights (to the bit), every sample set, and
`logs/diffusion.jsonl` line for line without its wall-clock fields. Prints one JSON object.

    python benchmarks/kill_resume.py --data-dir ../shared/data/mnist \\
        --reference bench-out/monitor/with --out bench-out/kill --kill-at 3000
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from safetensors.torch import load_file

from latentdiffusion.run.trainlog import TIMING, read_log

REDONE = ("diffusion", "guide")


def copy_before_diffusion(reference: Path, out: Path) -> None:
    """The reference run up to its latents: models, caches and the earlier stages' logs."""
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(reference, out, ignore=shutil.ignore_patterns(
        "samples", "metrics.json", "report.*", "diffusion*", "guide*"))
    for name in REDONE:
        shutil.rmtree(out / "checkpoints" / name, ignore_errors=True)
        shutil.rmtree(out / "logs" / "tensorboard" / name, ignore_errors=True)


def command(data_dir: str, run_dir: Path, preset: str) -> list[str]:
    return [sys.executable, "-m", "latentdiffusion", "run", "--data-dir", data_dir,
            "--run-dir", str(run_dir), "--preset", preset, "--device", "cpu", "--quiet"]


def last_step(log: Path) -> int:
    try:
        records = read_log(log, warn=False)
    except Exception:  # noqa: BLE001 (a line being written)
        return 0
    return records[-1]["step"] if records else 0


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--reference", type=Path, required=True, help="a finished run directory")
    p.add_argument("--preset", default="default")
    p.add_argument("--out", type=Path, default=Path("bench-out/kill"))
    p.add_argument("--kill-at", type=int, default=3000, help="denoiser steps before the kill")
    args = p.parse_args()
    copy_before_diffusion(args.reference, args.out)
    log = args.out / "logs" / "diffusion.jsonl"
    process = subprocess.Popen(command(args.data_dir, args.out, args.preset),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while last_step(log) < args.kill_at and process.poll() is None:
        time.sleep(0.5)
    killed_at = last_step(log)
    process.send_signal(signal.SIGKILL)
    process.wait()
    checkpoints = sorted(p.name for p in (args.out / "checkpoints" / "diffusion").glob("*"))
    start = time.perf_counter()
    rerun = subprocess.run(command(args.data_dir, args.out, args.preset), capture_output=True,
                           text=True)
    stages = json.loads((args.out / "run.json").read_text())["stages"]
    ours, theirs = (read_log(r / "logs" / "diffusion.jsonl") for r in (args.out, args.reference))
    weights = {}
    for name in REDONE:
        a, b = (load_file(r / f"{name}.safetensors") for r in (args.out, args.reference))
        weights[name] = a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    samples = sorted(p.name for p in (args.reference / "samples").glob("*.npz"))
    result = {
        "command": " ".join(sys.argv),
        "killed_after_step": killed_at,
        "checkpoints_left": checkpoints,
        "rerun_exit_code": rerun.returncode,
        "rerun_seconds": round(time.perf_counter() - start, 1),
        "rerun_diffusion": stages["diffusion"]["summary"],
        "rerun_error": rerun.stderr[-500:] if rerun.returncode else "",
        "same_weights": weights,
        "same_samples": {n: bool(np.array_equal(np.load(args.out / "samples" / n)["images"],
                                                np.load(args.reference / "samples" / n)["images"]))
                         for n in samples},
        "log_lines": [len(ours), len(theirs)],
        "same_log_without_timing": without_timing(ours) == without_timing(theirs),
    }
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
