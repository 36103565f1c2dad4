"""A small set the quick preset learns, and a set whose feature network cannot learn its task,
to see the report's checks say which is which.

Writes two small data sets and runs `ldm run` on each:
- `shapes/`: a labelled folder of colour shapes, 32x32 (a square, a circle or a triangle in a
  random bright colour, size and place on a dark ground), 1,000 of each, run with `--preset
  quick`;
- `textures.npz`: about 1,300 unlabelled colour 32x32 pictures of smooth random texture, which
  has no up or down, so the rotation task of unlabelled data cannot be learnt; run with
  `--preset default`.
Prints one JSON object: per run, its FID table (N, FID, ratio to Validation) and the codes of
the warnings its evaluation raised.

    python benchmarks/unlearnt.py --out bench-out/unlearnt
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from latentdiffusion.cli import main as ldm

SHAPES = ("square", "circle", "triangle")


def shape_image(kind: str, rng: np.random.Generator, size: int = 32) -> Image.Image:
    """One shape of a random bright colour, size and place on a dark random ground."""
    ground = tuple(int(v) for v in rng.integers(0, 60, 3))
    colour = tuple(int(v) for v in rng.integers(140, 256, 3))
    image = Image.new("RGB", (size, size), ground)
    half = int(rng.integers(6, 12))
    cx, cy = (int(v) for v in rng.integers(half + 1, size - half - 1, 2))
    box = (cx - half, cy - half, cx + half, cy + half)
    draw = ImageDraw.Draw(image)
    if kind == "square":
        draw.rectangle(box, fill=colour)
    elif kind == "circle":
        draw.ellipse(box, fill=colour)
    else:
        draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)],
                     fill=colour)
    return image


def write_shapes(root: Path, per_class: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for kind in SHAPES:
        (root / kind).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            shape_image(kind, rng).save(root / kind / f"{i:05d}.png")
    return root


def textures(n: int, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """uint8 (n, size, size, 3): colour noise on a 4x4 grid, upsampled smoothly."""
    coarse = rng.uniform(0, 255, size=(n, 4, 4, 3)).astype(np.uint8)
    return np.stack([np.asarray(Image.fromarray(c).resize((size, size), Image.BICUBIC))
                     for c in coarse])


def run(data: Path, run_dir: Path, preset: str) -> dict:
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # its own JSON: this prints one object
        code = ldm(["run", "--data-dir", str(data), "--run-dir", str(run_dir), "--preset",
                    preset, "--quiet"])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    table = {name: {"n": m["n"], "fid": m["fid"], "over_validation": m["fid_over_validation"]}
             for name, m in metrics.items() if name not in ("warnings", "memorisation")}
    return {"exit": code, "seconds": round(time.perf_counter() - start, 1), "fid": table,
            "warnings": [w["code"] for w in metrics["warnings"]]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    shapes = write_shapes(args.out / "shapes", 1000, args.seed)
    pictures = args.out / "textures.npz"
    rng = np.random.default_rng(args.seed + 1)
    np.savez(pictures, train_images=textures(1200, rng), test_images=textures(143, rng))
    result = {"shapes, quick preset": run(shapes, args.out / "run-shapes", "quick"),
              "textures, default preset": run(pictures, args.out / "run-textures", "default")}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
