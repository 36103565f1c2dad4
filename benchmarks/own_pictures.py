"""The default recipe on data sets other than MNIST digits: how far each set's reconstructions and
samples are from its Validation row, in the run's own feature network.

Sets (each `ldm run --preset default` in its own run directory under --out):
- `fashion`: Fashion-MNIST (60,000 + 10,000 clothes, 28x28 gray; `apt-get install
  dataset-fashion-mnist` puts the IDX files in /usr/share/datasets/fashion-mnist);
- `shapes`: a labelled folder of 3,000 colour shapes, 32x32 (benchmarks/unlearnt.py's);
- `mixed`: 2,000 pictures of 20 to 300 pixels in every mode (benchmarks/mixed_folder.py),
  read with `--image-size 32`;
- `mnist`: the digits themselves (--mnist-dir).
Prints one JSON object: per set, the minutes of `ldm run`, Validation, the reconstructions'
and the headline samples' FID and ratio to Validation, the classifier's accuracy on the
reconstructions, the samples' recall and class entropy, and the report's warnings.

    python benchmarks/own_pictures.py --out bench-out/own --sets fashion,shapes,mixed,mnist
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import sys
import time
from pathlib import Path

from latentdiffusion.cli import main as ldm
from unlearnt import write_shapes

SETS = ("fashion", "shapes", "mixed", "mnist")
HERE = Path(__file__).parent


def _data(name: str, args: argparse.Namespace) -> list[str]:
    """The `ldm run` options that read set `name`, writing the set first where it is made."""
    if name == "fashion":
        return ["--dataset", "fashion-mnist", "--data-dir", str(args.fashion_dir)]
    if name == "mnist":
        return ["--data-dir", str(args.mnist_dir)]
    if name == "shapes":
        root = args.out / "shapes"
        if not root.exists():
            write_shapes(root, 1000, args.seed)
        return ["--data-dir", str(root)]
    root = args.out / "mixed"
    if not root.exists():
        subprocess.run([sys.executable, str(HERE / "mixed_folder.py"), "--out", str(root),
                        "--seed", str(args.seed)], check=True, stdout=subprocess.DEVNULL)
    return ["--data-dir", str(root), "--image-size", "32"]


def _row(metrics: dict, name: str) -> dict:
    m = metrics[name]
    keep = ("n", "fid", "fid_over_validation", "recall", "precision", "accuracy",
            "class_entropy_bits")
    return {k: round(m[k], 4) if isinstance(m[k], float) else m[k] for k in keep if k in m}


def run(name: str, args: argparse.Namespace) -> dict:
    run_dir = args.out / f"run-{name}"
    argv = ["run", *_data(name, args), "--run-dir", str(run_dir), "--preset", args.preset,
            "--quiet", *[f"--set={item}" for item in args.set]]
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # its own JSON: this prints one object
        code = ldm(argv)
    minutes = (time.perf_counter() - start) / 60
    if code:
        return {"exit": code}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    headline = json.loads((run_dir / "run.json").read_text())["config"]["sampling"]["samplers"][0]
    return {"exit": code, "minutes": round(minutes, 2),
            "validation": _row(metrics, "validation"),
            "reconstructions": _row(metrics, "vae-reconstruction"),
            "headline": {"sampler": headline, **_row(metrics, headline)},
            "warnings": [w["code"] for w in metrics["warnings"]]}


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--sets", default=",".join(SETS), help=", ".join(SETS))
    p.add_argument("--preset", default="default")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="passed to every `ldm run`")
    p.add_argument("--fashion-dir", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    p.add_argument("--mnist-dir", type=Path, default=Path("../shared/data/mnist"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    chosen = args.sets.split(",")
    unknown = sorted(set(chosen) - set(SETS))
    if unknown:
        p.error(f"unknown set(s) {', '.join(unknown)} (choose from {', '.join(SETS)})")
    args.out.mkdir(parents=True, exist_ok=True)
    print(json.dumps({"benchmark": "own_pictures", "preset": args.preset, "set": args.set,
                      **{name: run(name, args) for name in chosen}}, indent=2))


if __name__ == "__main__":
    main()
