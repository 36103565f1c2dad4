"""report.md and a self-contained report.html (images embedded) of one run."""

from __future__ import annotations

import base64
import html
import json
import platform
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__, guidance_sweep
from .checkpoint import model_hash_of
from .config import RunConfig, to_dict
from .fileio import atomic_write
from .sweep import best_per_objective, table

POST_FID = {"random": 48.43, "vae-prior": 63.49, "diffusion": 6.02, "validation": 0.30}
ROW_NAMES = {"random": "Random", "vae-prior": "VAE (prior samples)",
             "vae-reconstruction": "VAE (test reconstructions)", "validation": "Validation"}


def _git_revision() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5, cwd=Path(__file__).parent)
        return out.stdout.strip() or "none"
    except (OSError, subprocess.SubprocessError):
        return "none"


def _rows(metrics: dict[str, Any], config: RunConfig, post: bool) -> list[list[str]]:
    """One row per set; `post`: with the post's FID of the row (its figures are of MNIST)."""
    rows = []
    guided = (f", {config.sampling.labels}, guidance {config.sampling.guidance:g}"
              if config.sampling.labels else "")
    if config.sampling.autoguidance != 1.0:
        guided = f", autoguidance {config.sampling.autoguidance:g}"
    order = ["random", "vae-prior", "vae-reconstruction",
             *[k for k in metrics if k not in ROW_NAMES], "validation"]
    for name in order:
        if name not in metrics:
            continue
        m = metrics[name]
        post_fid = POST_FID.get(name, POST_FID["diffusion"] if name not in ROW_NAMES else None)
        label = ROW_NAMES.get(name, f"Diffusion ({name}{guided})")
        fid_format = ".3g" if m["fid"] is not None and abs(m["fid"]) < 1 else ".3f"  # not 0.000
        row = [label, str(m["n"]), _num(m["fid"], fid_format),
               _num(m["fid_over_validation"], ".1f") + "x",
               f"{_num(m['kid_mean'], '.4f')} ± {_num(m['kid_std'], '.4f')}",
               f"{_num(m['precision'], '.3f')} / {_num(m['recall'], '.3f')}",
               _num(m["class_entropy_bits"], ".3f"),
               f"{m['accuracy']:.4f}" if "accuracy" in m else "",
               f"{post_fid:.2f}" if post_fid is not None else ""]
        rows.append(row if post else row[:-1])
    return rows


def _num(value: float | None, spec: str) -> str:
    # metrics.json holds null where a value is undefined (too few images, a zero Validation FID)
    return "n/a" if value is None else format(value, spec)


HEAD = ["Set", "N", "FID", "FID / Validation", "KID (mean ± std)", "Precision / Recall",
        "Class entropy (bits)", "Accuracy", "Post's FID"]


def _class_rows(metrics: dict[str, Any]) -> list[list[str]]:
    """A conditional run's labelled sets: accuracy and FID against each class's images."""
    rows = []
    for name, m in metrics.items():
        if "fid_class_mean" not in m:
            continue
        per_class = " ".join(_num(f, ".2f") for f in m["fid_per_class"])
        rows.append([ROW_NAMES.get(name, f"Diffusion ({name})"), f"{m['accuracy']:.4f}",
                     _num(m["fid_class_mean"], ".3f"), per_class])
    return rows


def _class_head(class_names: list[str]) -> list[str]:
    return ["Set", "Accuracy", "FID per class (mean)",
            "FID of classes " + ", ".join(class_names)]


def _figures(root: Path, metrics: dict[str, Any],
             class_names: list[str]) -> list[tuple[str, Path]]:
    diffusion = [k for k in metrics if k not in ROW_NAMES]
    figures = [(f"Conditional samples: one row per requested class ({', '.join(class_names)})",
                root / "figures" / "class_grid.png")]
    figures += [(f"Diffusion samples ({k}), the post's 8 x 9 grid",
                 root / "samples" / f"{k}.png") for k in diffusion]
    figures += [("VAE: test images (top) and reconstructions (bottom)",
                 root / "figures" / "reconstructions.png"),
                ("VAE prior samples", root / "samples" / "vae-prior.png"),
                ("Random baseline", root / "samples" / "random.png"),
                ("Noise schedules: alphas_cumprod over t", root / "figures" / "schedules.png"),
                ("Loss curves", root / "figures" / "losses.png"),
                ("Predicted class of generated images",
                 root / "figures" / "class_histogram.png")]
    return [(title, path) for title, path in figures if path.exists()]


def _html_table(head: list[str], rows: list[list[str]]) -> str:
    e = html.escape
    return ("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows)
            + "</table>")


def write(root: Path, config: RunConfig, preset_name: str, metrics: dict[str, Any],
          records: dict[str, Any], headers: dict[str, dict[str, Any]],
          sweep: dict[str, Any] | None = None,
          guidance: dict[str, Any] | None = None, *,
          dataset: dict[str, Any]) -> None:
    """`dataset`: the data set's `describe()` (run.json's "data")."""
    name, class_names = dataset["name"], list(dataset.get("class_names") or [])
    post = name == "mnist"  # the post's figures are of MNIST: beside no other data set's
    rows = _rows(metrics, config, post)
    head = HEAD if post else HEAD[:-1]
    class_rows = _class_rows(metrics)
    guidance_head, guidance_rows = guidance_sweep.table(guidance) if guidance else ([], [])
    guidance_title = (f"Guidance: fidelity against diversity (`ldm sweep --guidance`, "
                      f"{guidance['sampler']}, N = {guidance['n']:,}, balanced labels)"
                      if guidance else "")
    guidance_figure = root / "figures" / "guidance.png"
    sweep_head, sweep_rows = table(sweep) if sweep else ([], [])
    best_head, best_rows = best_per_objective(sweep) if sweep else ([], [])
    sweep_title = (f"Quality against cost: FID of each sampler against its model calls "
                   f"(`ldm sweep`, N = {sweep['n']:,}, seed {sweep['seed']})" if sweep else "")
    sweep_figure = root / "figures" / "sweep.png"
    versions = {"latentdiffusion": __version__, "torch": torch.__version__,
                "numpy": np.__version__, "python": platform.python_version(),
                "git": _git_revision()}
    times = [(name, r["seconds"], r["summary"]) for name, r in records.items()]
    seeds = {"classifier": config.classifier_train.seed, "vae": config.vae_train.seed,
             "diffusion": config.diffusion_train.seed, "sampling": config.sampling.seed}
    hashes = {name: model_hash_of(h)[:16] for name, h in headers.items()}
    figures = _figures(root, metrics, class_names)
    c = config.classifier
    shape = f"{c.image_size}x{c.image_size}" + (" RGB" if c.image_channels == 3 else "")
    classes = (f"{len(class_names)} class{'es' if len(class_names) > 1 else ''} "
               f"({', '.join(class_names)})" if class_names else "no labels")
    data_line = (f"Data set `{name}` ({dataset.get('source', 'idx')}, content sha256 "
                 f"{str(dataset.get('content_sha256', ''))[:16]}): {dataset.get('train', '?')} "
                 f"training and {dataset.get('test', '?')} test images, {shape}, {classes}.")
    if c.task == "labels":
        features = (f"the run's classifier features ({c.feature_dim}-d penultimate layer of a "
                    f"CNN trained on the {len(class_names)} labels)")
        caveat = ("the post's figures come from its own classifier, so compare ratios to the "
                  "Validation row, not raw values." if name == "mnist" else
                  "compare ratios to the Validation row.")
    else:
        features = (f"the features of a rotation-prediction network ({c.feature_dim}-d "
                    "penultimate layer of a CNN trained, without labels, to tell which of four "
                    "quarter turns an image was given)")
        caveat = ("this data set has no classes to learn (no labels, or one class), so these "
                  "FIDs are NOT comparable with FIDs in "
                  "a classifier's feature space (the post's, or a labelled run's); compare "
                  "ratios to the Validation row within this report only. Class columns are "
                  "n/a.")
    intro = (f"Preset `{preset_name}`. {data_line} FID is the Fréchet distance between "
             f"{features} of each set and of the training images; {caveat}")

    md = [f"# latentdiffusion run: {root.name} ({name})", "", intro, "", "## FID table", "",
          "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    class_head = _class_head(class_names)
    if class_rows:
        md += ["", "Labelled sets against each class's training images:", "",
               "| " + " | ".join(class_head) + " |", "|" + "---|" * len(class_head)]
        md += ["| " + " | ".join(r) + " |" for r in class_rows]
    if guidance:
        md += ["", "## " + guidance_title, "", "| " + " | ".join(guidance_head) + " |",
               "|" + "---|" * len(guidance_head)]
        md += ["| " + " | ".join(r) + " |" for r in guidance_rows]
        if guidance_figure.exists():
            md += ["", f"![Accuracy against FID]({guidance_figure.relative_to(root)})"]
    if sweep:
        md += ["", "## " + sweep_title, "", "| " + " | ".join(sweep_head) + " |",
               "|" + "---|" * len(sweep_head)]
        md += ["| " + " | ".join(r) + " |" for r in sweep_rows]
        md += ["", "Best of each objective and kind of sampler:", "",
               "| " + " | ".join(best_head) + " |", "|" + "---|" * len(best_head)]
        md += ["| " + " | ".join(r) + " |" for r in best_rows]
        if sweep_figure.exists():
            md += ["", f"![FID against NFE]({sweep_figure.relative_to(root)})"]
    md += ["", "## Figures", ""]
    md += [f"### {title}\n\n![{title}]({path.relative_to(root)})\n" for title, path in figures]
    md += ["## Wall time per stage", "", "| Stage | Seconds | Summary |", "|---|---|---|"]
    md += [f"| {n} | {s:.1f} | {summary} |" for n, s, summary in times]
    md += [f"| total | {sum(s for _, s, _ in times):.1f} | |", "", "## Provenance", "",
           f"- versions: {json.dumps(versions)}", f"- seeds: {json.dumps(seeds)}",
           f"- model hashes: {json.dumps(hashes)}", "", "## Config", "", "```json",
           json.dumps(to_dict(config), indent=2), "```", ""]
    atomic_write(root / "report.md", "\n".join(md).encode())

    def img(path: Path) -> str:
        data = base64.b64encode(path.read_bytes()).decode()
        return f'<img src="data:image/png;base64,{data}" alt="{html.escape(path.name)}">'

    e = html.escape
    fid_table = _html_table(head, rows)
    time_table = _html_table(["Stage", "Seconds", "Summary"],
                             [[n, f"{s:.1f}", summary] for n, s, summary in times])
    body = [f"<h1>latentdiffusion run: {e(root.name)} ({e(name)})</h1>", f"<p>{e(intro)}</p>",
            "<h2>FID table</h2>", fid_table]
    if class_rows:
        body += ["<p>Labelled sets against each class's training images:</p>",
                 _html_table(class_head, class_rows)]
    if guidance:
        body += [f"<h2>{e(guidance_title)}</h2>", _html_table(guidance_head, guidance_rows)]
        if guidance_figure.exists():
            body.append(f"<figure>{img(guidance_figure)}</figure>")
    if sweep:
        body += [f"<h2>{e(sweep_title)}</h2>", _html_table(sweep_head, sweep_rows),
                 "<p>Best of each objective and kind of sampler:</p>",
                 _html_table(best_head, best_rows)]
        if sweep_figure.exists():
            body.append(f"<figure>{img(sweep_figure)}</figure>")
    body.append("<h2>Figures</h2>")
    body += [f"<figure>{img(path)}<figcaption>{e(title)}</figcaption></figure>"
             for title, path in figures]
    body += ["<h2>Wall time per stage</h2>", time_table, "<h2>Provenance</h2>",
             f"<pre>versions: {e(json.dumps(versions))}\nseeds: {e(json.dumps(seeds))}\n"
             f"model hashes: {e(json.dumps(hashes))}</pre>",
             "<h2>Config</h2>", f"<pre>{e(json.dumps(to_dict(config), indent=2))}</pre>"]
    style = ("body{font-family:sans-serif;max-width:1000px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px}"
             "figure{margin:1em 0}img{max-width:100%}")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>latentdiffusion "
            f"{e(root.name)}</title><style>{style}</style></head><body>{''.join(body)}"
            "</body></html>")
    atomic_write(root / "report.html", page.encode())
