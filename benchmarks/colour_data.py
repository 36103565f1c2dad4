"""Write a colour data set for the own-data checks: MNIST digits tinted on coloured grounds.

Image i is digit i of MNIST padded to 32x32, its strokes in a bright random colour over a dark
random background (colours drawn per image from `--seed`), so colour, not only shape, must be
learned. Writes a labelled folder of PNGs (`OUT/colour-mnist/train/<digit>/*.png`, `.../test/`)
and an unlabelled `OUT/colour-mnist.npz` of the same images, and prints a JSON summary.

    python benchmarks/colour_data.py --data-dir ../shared/data/mnist --out bench-out/colour
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from latentdiffusion.data import load_dataset


def tint(digits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 (N, 28, 28) -> uint8 (N, 32, 32, 3): strokes in one colour, ground in another."""
    alpha = np.pad(digits, ((0, 0), (2, 2), (2, 2))).astype(np.float32)[..., None] / 255
    n = len(digits)
    ground = rng.uniform(0, 110, size=(n, 1, 1, 3))
    stroke = rng.uniform(140, 255, size=(n, 1, 1, 3))
    return (ground * (1 - alpha) + stroke * alpha).round().astype(np.uint8)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True, help="MNIST IDX directory")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--train", type=int, default=60_000, help="training images to write")
    p.add_argument("--test", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    mnist = load_dataset(args.data_dir, "mnist")
    arrays = {}
    for split, n in (("train", args.train), ("test", args.test)):
        digits, labels = mnist.split(split)  # type: ignore[arg-type]
        images = tint(digits[:n], rng)
        arrays[f"{split}_images"] = images
        for i, (image, label) in enumerate(zip(images, labels[:n], strict=True)):
            folder = args.out / "colour-mnist" / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{i:05d}.png")
    np.savez(args.out / "colour-mnist.npz", **arrays)
    print(json.dumps({"folder": str(args.out / "colour-mnist"),
                      "npz": str(args.out / "colour-mnist.npz"),
                      "train": args.train, "test": args.test,
                      "seconds": round(time.perf_counter() - start, 1)}))


if __name__ == "__main__":
    main()
