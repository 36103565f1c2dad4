"""Figures of a run: image grids, reconstructions, schedules, loss curves, class histograms."""

from __future__ import annotations

import io
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..files import atomic_write  # noqa: E402


def tile(images: np.ndarray, rows: int, cols: int, pad: int = 2) -> np.ndarray:
    """uint8 (N, H, W) or (N, H, W, 3) -> one uint8 image of a rows x cols grid (missing cells
    stay black)."""
    n, h, w = images.shape[:3]
    grid = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, *images.shape[3:]),
                    dtype=np.uint8)
    for i in range(min(n, rows * cols)):
        r, c = divmod(i, cols)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h,
             pad + c * (w + pad):pad + c * (w + pad) + w] = images[i]
    return grid


def literal(text: str) -> str:
    """`text` as matplotlib shows it as written: it reads `$...$` as math (a class named
    `$x^{$` was a parse error), so every `$` is escaped; use it for all text from names."""
    return text.replace("$", r"\$")


def _save(fig: plt.Figure, path: Path) -> None:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # A name in a script the font lacks (CJK class names) is drawn as boxes; the report's
        # text shows it, so matplotlib's "Glyph ... missing" warning is no news to the user.
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .* missing from font")
        fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    atomic_write(path, buffer.getvalue())


SCALE = 3  # each pixel of an image grid as SCALE x SCALE pixels of its PNG


def save_image(image: np.ndarray, path: Path) -> None:
    """uint8 (H, W) or (H, W, 3) as a PNG, grayscale or colour, scaled SCALE x."""
    scaled = image.repeat(SCALE, axis=0).repeat(SCALE, axis=1)
    buffer = io.BytesIO()
    plt.imsave(buffer, scaled, cmap="gray", vmin=0, vmax=255, format="png")  # cmap: grayscale
    atomic_write(path, buffer.getvalue())


def save_grid(images: np.ndarray, path: Path, rows: int = 8, cols: int = 9) -> None:
    """The post's 72-image figure (8 x 9) as a PNG, grayscale or colour, scaled 3x."""
    save_image(tile(images, rows, cols), path)


def grid_row(path: Path, row: int, image_size: int, pad: int = 2) -> np.ndarray:
    """Row `row` of a grid save_image wrote (`tile` with `pad`): uint8 (h, W[, 3])."""
    from PIL import Image

    with Image.open(path) as png:
        pixels = np.asarray(png.convert("RGB"))
    top = row * (image_size + pad) * SCALE
    return pixels[top:top + (image_size + 2 * pad) * SCALE]


def save_progress(rows: Sequence[tuple[str, np.ndarray]], path: Path) -> None:
    """Grid rows over training, one under the other, each labelled (e.g. "step 1000")."""
    strip = np.concatenate([pixels for _, pixels in rows])
    height = rows[0][1].shape[0]
    fig, ax = plt.subplots(figsize=(strip.shape[1] / 100 + 1.2, strip.shape[0] / 100 + 0.2))
    ax.imshow(strip, interpolation="nearest")
    ax.set_yticks([height * (i + 0.5) for i in range(len(rows))],
                  [literal(label) for label, _ in rows], fontsize=8)
    ax.set_xticks([])
    for side in ax.spines.values():
        side.set_visible(False)
    _save(fig, path)


def save_nearest(samples: np.ndarray, train: np.ndarray, neighbours: Sequence[Sequence[int]],
                 path: Path) -> None:
    """Each sample followed by its nearest training images (rows of `neighbours`), two
    groups to a row."""
    groups = [np.concatenate([samples[i:i + 1], train[list(rows)]])
              for i, rows in enumerate(neighbours)]
    images = np.concatenate(groups)
    save_grid(images, path, rows=-(-len(images) // 8), cols=8)


def save_reconstructions(originals: np.ndarray, reconstructions: np.ndarray, path: Path,
                         count: int = 12) -> None:
    """Top row: test images; bottom row: their VAE reconstructions."""
    pairs = np.concatenate([originals[:count], reconstructions[:count]])
    save_grid(pairs, path, rows=2, cols=count)


def save_schedules(schedules: dict[str, np.ndarray], path: Path) -> None:
    """alphas_cumprod over t for each schedule (the post's schedule plot)."""
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for name, alphas_cumprod in schedules.items():
        ax.plot(np.arange(1, len(alphas_cumprod) + 1), alphas_cumprod, label=literal(name))
    ax.set_xlabel("t")
    ax.set_ylabel(r"$\bar\alpha_t$")
    ax.legend()
    ax.grid(alpha=0.3)
    _save(fig, path)


def save_losses(histories: dict[str, Sequence[dict]], path: Path) -> None:
    """Train and validation loss against optimizer steps, one panel per model (against epochs
    for a history recorded without steps)."""
    names = [name for name, history in histories.items() if history]
    fig, axes = plt.subplots(1, max(len(names), 1), figsize=(4 * max(len(names), 1), 3),
                             squeeze=False)
    for ax, name in zip(axes[0], names, strict=False):
        history = histories[name]
        unit = "step" if all("step" in h for h in history) else "epoch"
        x = [h[unit] for h in history]
        ax.plot(x, [h["train_loss"] for h in history], "o-", label="train")
        if "val_loss" in history[0]:
            ax.plot(x, [h["val_loss"] for h in history], "s-", label="validation")
        ax.set_title(literal(name))
        ax.set_xlabel(unit)
        ax.legend()
        ax.grid(alpha=0.3)
    _save(fig, path)


def save_curves(logs: Mapping[str, Sequence[dict]], path: Path) -> None:
    """From each stage's log: the training loss (and validation loss) against the step, and
    the progress FID (N beside it) on a second axis, one panel per stage."""
    names = [name for name, records in logs.items() if records]
    fig, axes = plt.subplots(1, max(len(names), 1), figsize=(4.8 * max(len(names), 1), 3.2),
                             squeeze=False)
    for ax, name in zip(axes[0], names, strict=False):
        records = logs[name]
        ax.plot([r["step"] for r in records], [r["loss"] for r in records], label="train",
                linewidth=1)
        validated = [r for r in records if "val_loss" in r]
        if validated:
            ax.plot([r["step"] for r in validated], [r["val_loss"] for r in validated], "s",
                    label="validation")
        ax.set_title(literal(name))
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        if all(r["loss"] > 0 for r in records):  # the first steps' drop hides the rest
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        scored = [r for r in records if r.get("fid") is not None]
        if scored:
            fid_axis = ax.twinx()
            fid_axis.plot([r["step"] for r in scored], [r["fid"] for r in scored], "o-",
                          color="tab:red", label=f"FID (N = {scored[-1]['score_n']:,})")
            fid_axis.set_yscale("log")
            fid_axis.set_ylabel("FID", color="tab:red")
            fid_axis.legend(loc="upper center", fontsize=7)
        ax.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def save_class_histograms(histograms: dict[str, Sequence[float]], class_names: Sequence[str],
                          path: Path) -> None:
    """Fraction of each predicted class per generated set (uniform: 1 / K each)."""
    k = len(class_names)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * k), 3))
    width = 0.8 / max(len(histograms), 1)
    for i, (name, histogram) in enumerate(histograms.items()):
        ax.bar(np.arange(k) + i * width, histogram, width=width, label=literal(name))
    ax.axhline(1 / k, color="gray", linestyle="--", linewidth=1)
    ax.set_xticks(np.arange(k) + 0.4 - width / 2, [literal(c) for c in class_names],
                  rotation=45 if max(map(len, class_names)) > 2 else 0, ha="right")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("fraction")
    ax.legend(fontsize=7)
    _save(fig, path)


def save_lines(lines: dict[str, Sequence[tuple[float, float]]], floor: tuple[str, float],
               path: Path, xlabel: str, ylabel: str) -> None:
    """One line of (x, y) points per name on a log x axis, and a dashed horizontal floor."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in lines.items():
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, "o-", label=literal(name))
    ax.axhline(floor[1], color="gray", linestyle="--", linewidth=1, label=literal(floor[0]))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(literal(xlabel))
    ax.set_ylabel(literal(ylabel))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    _save(fig, path)


def class_grid(images: np.ndarray, labels: np.ndarray, num_classes: int,
               per_class: int = 10) -> np.ndarray:
    """uint8 (K * per_class, H, W[, 3]): row c holds the first `per_class` images labelled c
    (black where a class has fewer)."""
    rows = np.zeros((num_classes, per_class, *images.shape[1:]), dtype=np.uint8)
    for c in range(num_classes):
        chosen = images[labels == c][:per_class]
        rows[c, :len(chosen)] = chosen
    return rows.reshape(-1, *images.shape[1:])


def save_class_grid(images: np.ndarray, labels: np.ndarray, num_classes: int,
                    path: Path) -> None:
    """A K x 10 grid of a labelled set, one row per requested class."""
    save_grid(class_grid(images, labels, num_classes), path, rows=num_classes, cols=10)


def save_tradeoff(points: Sequence[tuple[float, float, float]], path: Path,
                  xlabel: str) -> None:
    """Accuracy against FID, one point per guidance scale s (labelled), as (s, fid, accuracy)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    _, fids, accuracies = zip(*points, strict=True)
    ax.plot(fids, accuracies, "o-")
    for s, x, y in points:
        ax.annotate(f"s = {s:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(literal(xlabel))
    ax.set_ylabel("accuracy (classifier agrees with the label)")
    ax.grid(alpha=0.3)
    _save(fig, path)
