"""The Python API against the CLI on a finished run (e.g. the default MNIST run):
- `Pipeline.load(R).sample(...)` against `ldm sample` with the same arguments, byte for byte,
  for `ddpm-20` with autoguidance 1.5 and for `dpmpp-2m-10`;
- `ldm sample --format png` of N images, then `ldm evaluate --samples` of the folder, of a zip
  of it and of the `.npz`: the same FID to the last digit;
- `ldm export`: its size against its weights, and its samples against the run's, loaded with
  no run directory beside it.
Prints one JSON object.

    python benchmarks/api_checks.py --run-dir runs/default --out bench-out/api -n 10000
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np

from latentdiffusion import Pipeline
from latentdiffusion.cli import main as ldm


def _ldm(*argv: str | Path) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = ldm([str(a) for a in argv])
    if code:
        raise SystemExit(f"ldm {' '.join(map(str, argv))} exited {code}")
    return out.getvalue()


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("-n", "--num-samples", type=int, default=10_000)
    p.add_argument("--compare", type=int, default=1000, help="samples compared byte for byte")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    pipe = Pipeline.load(args.run_dir)
    result: dict = {"benchmark": "api_checks", "run_dir": str(args.run_dir)}

    for name, options in {"ddpm-20-autoguidance-1.5": ("--sampler", "ddpm-20",
                                                       "--autoguidance", "1.5"),
                          "dpmpp-2m-10": ("--sampler", "dpmpp-2m-10")}.items():
        npz = args.out / f"{name}.npz"
        _ldm("sample", "--run-dir", args.run_dir, "--model", "diffusion", *options, "-n",
             args.compare, "--seed", 3, "--out", npz, "--quiet")
        with np.load(npz) as saved:
            cli = saved["images"]
        kwargs = {"sampler": options[1], "seed": 3}
        if len(options) > 2:
            kwargs["autoguidance"] = float(options[3])
        api = pipe.sample(args.compare, **kwargs)  # type: ignore[arg-type]
        result[f"sample_{name}_identical"] = bool(np.array_equal(api, cli))

    npz = args.out / "set.npz"
    folder = args.out / "set-png"
    _ldm("sample", "--run-dir", args.run_dir, "--model", "diffusion", "--sampler", "ddpm-20",
         "--autoguidance", "1.5", "-n", args.num_samples, "--out", npz, "--quiet")
    _ldm("sample", "--run-dir", args.run_dir, "--model", "diffusion", "--sampler", "ddpm-20",
         "--autoguidance", "1.5", "-n", args.num_samples, "--format", "png", "--out", folder,
         "--quiet")
    archive = args.out / "set-png.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted(folder.iterdir()):
            z.write(path, path.name)
    data_dir = json.loads((args.run_dir / "run.json").read_text())["data_dir"]
    fids = {kind: json.loads(_ldm("evaluate", "--run-dir", args.run_dir, "--data-dir", data_dir,
                                  "--samples", path, "--quiet"))["fid"]
            for kind, path in (("npz", npz), ("png_folder", folder), ("zip", archive))}
    result["n"] = args.num_samples
    result["fid"] = fids
    result["fid_identical"] = len(set(fids.values())) == 1

    export = args.out / "export"
    _ldm("export", "--run-dir", args.run_dir, "--out", export, "--quiet")
    weights = sum(f.stat().st_size for f in export.glob("*.safetensors"))
    total = sum(f.stat().st_size for f in export.rglob("*") if f.is_file())
    moved = args.out / "export-alone"  # no run directory beside it
    shutil.rmtree(moved, ignore_errors=True)
    shutil.copytree(export, moved)
    alone = Pipeline.load(moved).sample(args.compare, sampler="ddpm-20", autoguidance=1.5,
                                        seed=3)
    ran = pipe.sample(args.compare, sampler="ddpm-20", autoguidance=1.5, seed=3)
    result["export"] = {"bytes": total, "weight_bytes": weights,
                        "extra_bytes": total - weights,
                        "samples_identical": bool(np.array_equal(alone, ran))}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
