"""What watching a run learn costs: `ldm run` with the progress grids and scores (the preset's
monitor) and with `--no-progress-samples` (the logs only), into two run directories.

Prints one JSON object: the wall time of each and their ratio, the seconds of each stage,
whether every model's weights and every sample set are the same to the bit, both FID
tables, and the denoiser's progress FIDs (step, FID, N) from its log. With `--compare-to
DIR`, also whether the weights equal those of DIR, a run made with the same preset by another
version of the code.

    python benchmarks/monitor_cost.py --data-dir ../shared/data/mnist --out bench-out/monitor
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from safetensors.torch import load_file

from latentdiffusion.run.trainlog import read_log

MODELS = ("classifier", "vae", "diffusion", "guide")


def run(data_dir: str, run_dir: Path, preset: str, *extra: str) -> float:
    """Seconds of one `ldm run` in a fresh process."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "latentdiffusion", "run", "--data-dir", data_dir,
                    "--run-dir", str(run_dir), "--preset", preset, "--device", "cpu",
                    "--quiet", *extra], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def same_weights(a: Path, b: Path) -> dict[str, bool]:
    result = {}
    for name in MODELS:
        if (a / f"{name}.safetensors").exists():
            ours, theirs = (load_file(r / f"{name}.safetensors") for r in (a, b))
            result[name] = ours.keys() == theirs.keys() and all(ours[k].equal(theirs[k])
                                                                 for k in ours)
    return result


def same_samples(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in (a / "samples").glob("*.npz"))
    return all(np.array_equal(np.load(a / "samples" / n)["images"],
                              np.load(b / "samples" / n)["images"]) for n in names)


def fid_table(run_dir: Path) -> dict[str, dict[str, float]]:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {name: {"n": m["n"], "fid": m["fid"]} for name, m in metrics.items()
            if isinstance(m, dict) and "fid" in m}


def stage_seconds(run_dir: Path) -> dict[str, float]:
    stages = json.loads((run_dir / "run.json").read_text())["stages"]
    return {name: round(record["seconds"], 1) for name, record in stages.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--out", type=Path, default=Path("bench-out/monitor"))
    p.add_argument("--preset", default="default")
    p.add_argument("--compare-to", type=Path, help="a run directory of the same preset")
    args = p.parse_args()
    watched, plain = args.out / "with", args.out / "without"
    seconds = {"with": run(args.data_dir, watched, args.preset),
               "without": run(args.data_dir, plain, args.preset, "--no-progress-samples")}
    scored = [r for r in read_log(watched / "logs" / "diffusion.jsonl") if "fid" in r]
    result = {
        "command": " ".join(sys.argv),
        "preset": args.preset,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "ratio": round(seconds["with"] / seconds["without"], 4),
        "stage_seconds": {"with": stage_seconds(watched), "without": stage_seconds(plain)},
        "same_weights": same_weights(watched, plain),
        "same_samples": same_samples(watched, plain),
        "fid": {"with": fid_table(watched), "without": fid_table(plain)},
        "progress_fid": [[r["step"], round(r["fid"], 3), r["score_n"]] for r in scored],
    }
    if args.compare_to is not None:
        result["same_weights_as_compared"] = same_weights(watched, args.compare_to)
        result["fid_compared"] = fid_table(args.compare_to)
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
