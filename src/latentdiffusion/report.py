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


def _rows(metrics: dict[str, Any], config: RunConfig) -> list[list[str]]:
    rows = []
    guided = (f", {config.sampling.labels}, guidance {config.sampling.guidance:g}"
              if config.sampling.labels else "")
    order = ["random", "vae-prior", "vae-reconstruction",
             *[k for k in metrics if k not in ROW_NAMES], "validation"]
    for name in order:
        if name not in metrics:
            continue
        m = metrics[name]
        post = POST_FID.get(name, POST_FID["diffusion"] if name not in ROW_NAMES else None)
        label = ROW_NAMES.get(name, f"Diffusion ({name}{guided})")
        rows.append([label, str(m["n"]), _num(m["fid"], ".3f"),
                     _num(m["fid_over_validation"], ".1f") + "x",
                     f"{_num(m['kid_mean'], '.4f')} ± {_num(m['kid_std'], '.4f')}",
                     f"{_num(m['precision'], '.3f')} / {_num(m['recall'], '.3f')}",
                     f"{m['class_entropy_bits']:.3f}",
                     f"{m['accuracy']:.4f}" if "accuracy" in m else "",
                     f"{post:.2f}" if post is not None else ""])
    return rows


def _num(value: float | None, spec: str) -> str:
    # metrics.json holds null where a value is undefined (too few images, a zero Validation FID)
    return "n/a" if value is None else format(value, spec)


HEAD = ["Set", "N", "FID", "FID / Validation", "KID (mean ± std)", "Precision / Recall",
        "Class entropy (bits)", "Accuracy", "Post's FID"]


def _class_rows(metrics: dict[str, Any]) -> list[list[str]]:
    """A conditional run's labelled sets: accuracy and FID against each class's digits."""
    rows = []
    for name, m in metrics.items():
        if "fid_class_mean" not in m:
            continue
        per_class = " ".join(_num(f, ".2f") for f in m["fid_per_class"])
        rows.append([ROW_NAMES.get(name, f"Diffusion ({name})"), f"{m['accuracy']:.4f}",
                     _num(m["fid_class_mean"], ".3f"), per_class])
    return rows


CLASS_HEAD = ["Set", "Accuracy", "FID per class (mean)", "FID of classes 0..9"]


def _figures(root: Path, metrics: dict[str, Any]) -> list[tuple[str, Path]]:
    diffusion = [k for k in metrics if k not in ROW_NAMES]
    figures = [("Conditional samples: one row per requested digit 0..9",
                root / "figures" / "class_grid.png")]
    figures += [(f"Diffusion samples ({k}), the post's 8 x 9 grid",
                 root / "samples" / f"{k}.png") for k in diffusion]
    figures += [("VAE: test digits (top) and reconstructions (bottom)",
                 root / "figures" / "reconstructions.png"),
                ("VAE prior samples", root / "samples" / "vae-prior.png"),
                ("Random baseline", root / "samples" / "random.png"),
                ("Noise schedules: alphas_cumprod over t", root / "figures" / "schedules.png"),
                ("Loss curves", root / "figures" / "losses.png"),
                ("Predicted class of generated digits", root / "figures" / "class_histogram.png")]
    return [(title, path) for title, path in figures if path.exists()]


def _html_table(head: list[str], rows: list[list[str]]) -> str:
    e = html.escape
    return ("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows)
            + "</table>")


def write(root: Path, config: RunConfig, preset_name: str, metrics: dict[str, Any],
          records: dict[str, Any], headers: dict[str, dict[str, Any]],
          sweep: dict[str, Any] | None = None,
          guidance: dict[str, Any] | None = None) -> None:
    rows = _rows(metrics, config)
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
    figures = _figures(root, metrics)
    intro = (f"Preset `{preset_name}`. FID is the Fréchet distance between the run's classifier "
             "features (128-d penultimate layer) of each set and of the 60,000 training digits; "
             "the post's figures come from its own classifier, so compare ratios to the "
             "Validation row, not raw values.")

    md = [f"# latentdiffusion run: {root.name}", "", intro, "", "## FID table", "",
          "| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    if class_rows:
        md += ["", "Labelled sets against each class's training digits:", "",
               "| " + " | ".join(CLASS_HEAD) + " |", "|" + "---|" * len(CLASS_HEAD)]
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
    fid_table = _html_table(HEAD, rows)
    time_table = _html_table(["Stage", "Seconds", "Summary"],
                             [[n, f"{s:.1f}", summary] for n, s, summary in times])
    body = [f"<h1>latentdiffusion run: {e(root.name)}</h1>", f"<p>{e(intro)}</p>",
            "<h2>FID table</h2>", fid_table]
    if class_rows:
        body += ["<p>Labelled sets against each class's training digits:</p>",
                 _html_table(CLASS_HEAD, class_rows)]
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
