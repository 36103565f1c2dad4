"""Write a folder of pictures of every size and mode, for `--image-size` (docs/data.md).

2,000 pictures (by default) of 20 to 300 pixels a side, never square: RGB and CMYK JPEGs,
RGBA PNGs (the shape opaque on a transparent ground), palette PNGs (some with a transparent
colour), 16-bit gray PNGs and JPEGs stored turned with an EXIF orientation that turns them
upright. Each holds one shape (circle, square or triangle: its class folder) in one colour on
another, near the centre, so the centre crop keeps it and a classifier can learn it. The same
seed writes the same files. Prints a JSON summary.

    python benchmarks/mixed_folder.py --out /tmp/mixed
    ldm run --data-dir /tmp/mixed --image-size 32 --run-dir runs/mixed --preset default
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("circle", "square", "triangle")
# How each picture is stored, and how often.
KINDS = {"rgb-jpeg": 0.35, "rgba-png": 0.20, "palette-png": 0.15, "cmyk-jpeg": 0.12,
         "gray16-png": 0.06, "exif-jpeg": 0.12}
ORIENTATION_TAG = 0x0112
# EXIF orientation -> how the stored pixels are turned from upright (the inverse of the
# transpose a viewer applies: orientation 6 is shown turned 90 degrees clockwise).
STORED_TURN = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90,
               8: Image.Transpose.ROTATE_270}


def picture(rng: np.random.Generator, shape: str, size: tuple[int, int]
            ) -> tuple[Image.Image, tuple[int, int, int], tuple[int, int, int]]:
    """An RGB picture of `size` (W, H) with `shape` near its centre; its ground and ink."""
    ground = tuple(int(v) for v in rng.integers(0, 256, 3))
    ink = tuple(int(255 - v + rng.integers(-40, 41)) % 256 for v in ground)
    image = Image.new("RGB", size, ground)  # type: ignore[arg-type]
    width, height = size
    side = min(width, height)
    radius = side * rng.uniform(0.2, 0.35)
    x = width / 2 + side * rng.uniform(-0.1, 0.1)
    y = height / 2 + side * rng.uniform(-0.1, 0.1)
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=ink)
    elif shape == "square":
        draw.rectangle((x - radius, y - radius, x + radius, y + radius), fill=ink)
    else:
        draw.polygon([(x, y - radius), (x + radius, y + radius * 0.8),
                      (x - radius, y + radius * 0.8)], fill=ink)
    return image, ground, ink  # type: ignore[return-value]


def save(image: Image.Image, kind: str, ground: tuple[int, int, int], path: Path,
         rng: np.random.Generator) -> tuple[Path, str]:
    """Store `image` as `kind`; the file and the mode Pillow opens it in."""
    if kind.endswith("jpeg"):
        path = path.with_suffix(".jpg")
    if kind == "rgb-jpeg":
        image.save(path, quality=90)
    elif kind == "cmyk-jpeg":
        image.convert("CMYK").save(path, quality=90)
    elif kind == "exif-jpeg":
        orientation = int(rng.choice(list(STORED_TURN)))
        exif = Image.Exif()
        exif[ORIENTATION_TAG] = orientation
        image.transpose(STORED_TURN[orientation]).save(path, quality=90, exif=exif)
    elif kind == "rgba-png":  # the ground transparent: composited onto the background
        pixels = np.asarray(image)
        alpha = np.where((pixels == ground).all(axis=2), 0, 255).astype(np.uint8)
        Image.fromarray(np.dstack([pixels, alpha])).save(path)
    elif kind == "palette-png":
        paletted = image.quantize(colors=4, dither=Image.Dither.NONE)
        if rng.random() < 0.5:  # the ground's colour transparent
            ground_index = int(np.bincount(np.asarray(paletted).ravel()).argmax())
            paletted.save(path, transparency=ground_index)
        else:
            paletted.save(path)
    else:  # gray16-png
        gray = np.asarray(image.convert("L")).astype(np.uint16) * 257
        Image.fromarray(gray).save(path)
    with Image.open(path) as opened:
        return path, opened.mode


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="the folder to write (class folders)")
    p.add_argument("-n", "--count", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    start = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    kinds, weights = list(KINDS), np.array(list(KINDS.values()))
    modes: Counter[str] = Counter()
    stored: Counter[str] = Counter()
    sizes = []
    for i in range(args.count):
        shape = CLASSES[i % len(CLASSES)]
        width, height = (int(v) for v in rng.integers(20, 301, 2))
        if width == height:
            height = height - 1 if height > 20 else height + 1  # never square
        image, ground, _ = picture(rng, shape, (width, height))
        kind = kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))]
        (args.out / shape).mkdir(parents=True, exist_ok=True)
        _, mode = save(image, kind, ground, args.out / shape / f"{i:05d}.png", rng)
        modes[mode] += 1
        stored[kind] += 1
        sizes.append((width, height))
    widths, heights = zip(*sizes, strict=True)
    print(json.dumps({"out": str(args.out), "count": args.count, "classes": list(CLASSES),
                      "kinds": dict(sorted(stored.items())), "modes": dict(sorted(modes.items())),
                      "sizes": {"distinct": len(set(sizes)), "width": [min(widths), max(widths)],
                                "height": [min(heights), max(heights)],
                                "smaller_than_32": sum(min(s) < 32 for s in sizes)},
                      "seconds": round(time.perf_counter() - start, 1)}))


if __name__ == "__main__":
    main()
