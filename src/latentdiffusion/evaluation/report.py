"""report.md and a self-contained report.html (images embedded) of one run.

The report is a list of blocks (headings, paragraphs, tables, figures, lists, code) built once
from the run's records (`sections`), then rendered to Markdown and to HTML.
"""

from __future__ import annotations

import base64
import html
import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import distributed as dist
from ..files import atomic_write
from . import tables


@dataclass(frozen=True)
class Mono:
    """Inline code in a heading or paragraph: a command or a name, shown as typed."""
    text: str


# Text of a heading or paragraph: plain text, or plain text with inline code between.
Text = str | tuple[str | Mono, ...]


@dataclass(frozen=True)
class Heading:
    text: Text
    level: int = 2


@dataclass(frozen=True)
class Paragraph:
    text: Text


@dataclass(frozen=True)
class Table:
    head: list[str]
    rows: list[list[str]]


@dataclass(frozen=True)
class Figure:
    title: str
    path: Path
    captioned: bool = True  # a heading (Markdown) or caption (HTML) of its title


@dataclass(frozen=True)
class Bullets:
    items: list[str]


@dataclass(frozen=True)
class Code:
    text: str
    language: str = ""


Block = Heading | Paragraph | Table | Figure | Bullets | Code


def _git_revision() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5, cwd=Path(__file__).parent)
        return out.stdout.strip() or "none"
    except (OSError, subprocess.SubprocessError):
        return "none"


def _figures(root: Path, metrics: dict[str, Any],
             class_names: list[str]) -> list[tuple[str, Path]]:
    diffusion = [k for k in tables.scored_sets(metrics) if k not in tables.ROW_NAMES]
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
                ("Training curves from the logs: loss against step, and the denoiser's FID "
                 "on its progress samples (N beside it)", root / "figures" / "curves.png"),
                ("Denoiser samples from fixed noise while it trained (one row per step, "
                 "not autoguided)", root / "figures" / "progress-diffusion.png"),
                ("Guide samples from fixed noise while it trained",
                 root / "figures" / "progress-guide.png"),
                ("VAE reconstructions of fixed test images while it trained (one row per step; "
                 "the last row the test images)", root / "figures" / "progress-vae.png"),
                ("Predicted class of generated images",
                 root / "figures" / "class_histogram.png")]
    return [(title, path) for title, path in figures if path.exists()]


def _intro(config: dict[str, Any], preset_name: str, dataset: dict[str, Any]) -> Text:
    name, class_names = dataset["name"], list(dataset.get("class_names") or [])
    c = config["classifier"]
    shape = f"{c['image_size']}x{c['image_size']}" + (" RGB" if c["image_channels"] == 3 else "")
    classes = (f"{len(class_names)} class{'es' if len(class_names) > 1 else ''} "
               f"({', '.join(class_names)})" if class_names else "no labels")
    data_line = (f" ({dataset.get('source', 'idx')}, content sha256 "
                 f"{str(dataset.get('content_sha256', ''))[:16]}): {dataset.get('train', '?')} "
                 f"training and {dataset.get('test', '?')} test images, {shape}, {classes}.")
    if c["task"] == "labels":
        features = (f"the run's classifier features ({c['feature_dim']}-d penultimate layer of a "
                    f"CNN trained on the {len(class_names)} labels)")
        caveat = ("the post's figures come from its own classifier, so compare ratios to the "
                  "Validation row, not raw values." if name == "mnist" else
                  "compare ratios to the Validation row.")
    else:
        features = (f"the features of a rotation-prediction network ({c['feature_dim']}-d "
                    "penultimate layer of a CNN trained, without labels, to tell which of four "
                    "quarter turns an image was given)")
        caveat = ("this data set has no classes to learn (no labels, or one class), so these "
                  "FIDs are NOT comparable with FIDs in "
                  "a classifier's feature space (the post's, or a labelled run's); compare "
                  "ratios to the Validation row within this report only. Class columns are "
                  "n/a.")
    return ("Preset ", Mono(preset_name), ". Data set ", Mono(name),
            f"{data_line} FID is the Fréchet distance between {features} of each set and of "
            f"the training images; {caveat}")


def sections(root: Path, config: dict[str, Any], preset_name: str, metrics: dict[str, Any],
             records: dict[str, Any], model_hashes: dict[str, str], guided: str,
             sweep: dict[str, Any] | None, guidance: dict[str, Any] | None,
             dataset: dict[str, Any]) -> list[Block]:
    """The report's blocks. `config`: the run config as run.json holds it; `dataset`: the data
    set's `describe()`; `records`: run.json's stages; `guided`: how the diffusion sets were
    guided, for their rows' names."""
    name, class_names = dataset["name"], list(dataset.get("class_names") or [])
    post = name == "mnist"  # the post's figures are of MNIST: beside no other data set's
    head = tables.FID_HEAD if post else tables.FID_HEAD[:-1]
    warnings = metrics.get("warnings", [])
    few = {w["figures"]["set"] for w in warnings if w["code"] == "few-images"}
    blocks: list[Block] = [Heading(f"latentdiffusion run: {root.name} ({name})", 1),
                           Paragraph(_intro(config, preset_name, dataset)),
                           *_checks(warnings),
                           Heading("FID table"),
                           Table(head, tables.fid_rows(metrics, guided, post, few))]
    class_rows = tables.class_rows(metrics)
    if class_rows:
        blocks += [Paragraph("Labelled sets against each class's training images:"),
                   Table(tables.class_head(class_names), class_rows)]
    if guidance:
        blocks += [Heading(("Guidance: fidelity against diversity (",
                            Mono("ldm sweep --guidance"),
                            f", {guidance['sampler']}, N = {guidance['n']:,}, balanced labels)")),
                   Table(*tables.guidance_table(guidance))]
        blocks += _figure_if("Accuracy against FID", root / "figures" / "guidance.png")
    if sweep:
        blocks += [Heading(("Quality against cost: FID of each sampler against its model calls (",
                            Mono("ldm sweep"), f", N = {sweep['n']:,}, seed {sweep['seed']})")),
                   Table(*tables.sweep_table(sweep)),
                   Paragraph("Best of each objective and kind of sampler:"),
                   Table(*tables.best_per_objective(sweep))]
        blocks += _figure_if("FID against NFE", root / "figures" / "sweep.png")
    if "memorisation" in metrics:
        blocks += _memorisation(metrics["memorisation"], root / "figures" / "nearest.png")
    blocks.append(Heading("Figures"))
    blocks += [Figure(title, path) for title, path in _figures(root, metrics, class_names)]
    times = [[stage, f"{r['seconds']:.1f}", r["summary"]] for stage, r in records.items()]
    total = sum(r["seconds"] for r in records.values())
    versions = {**dist.environment(), "git": _git_revision()}
    seeds = {"classifier": config["classifier_train"]["seed"],
             "vae": config["vae_train"]["seed"],
             "diffusion": config["diffusion_train"]["seed"],
             "sampling": config["sampling"]["seed"]}
    hashes = {model: digest[:16] for model, digest in model_hashes.items()}
    blocks += [Heading("Wall time per stage"),
               Table(["Stage", "Seconds", "Summary"], [*times, ["total", f"{total:.1f}", ""]]),
               Heading("Provenance"),
               Bullets([f"versions: {json.dumps(versions)}", f"seeds: {json.dumps(seeds)}",
                        f"model hashes: {json.dumps(hashes)}"]),
               Heading("Config"), Code(json.dumps(config, indent=2), "json")]
    return blocks


def _checks(warnings: list[dict[str, Any]]) -> list[Block]:
    """The checks of the evaluation, above the table they are about."""
    if not warnings:
        return [Heading("Checks"),
                Paragraph("None flagged: the feature network is well above chance on its own "
                          "task, Random scores worst, no set collapsed, and every set has enough "
                          "images for its FID.")]
    return [Heading("Checks: read the table with these in mind"),
            Bullets([f"WARNING: {w['message']}" for w in warnings])]


def _memorisation(m: dict[str, Any], figure: Path) -> list[Block]:
    """How close one set's samples come to the training images, against the test images."""
    quantiles = [f"{q:g}" for q in m["quantiles"]]
    rows = [[f"samples ({m['set']}, N = {m['n']:,})",
             *(f"{d:.3g}" for d in m["sample_quantiles"])],
            [f"test images (N = {m['test_n']:,})", *(f"{d:.3g}" for d in m["test_quantiles"])]]
    text = (f"Distance in the feature space from each image to its nearest of the "
            f"{m['train_n']:,} training images. {m['copies']:.2%} of the samples are closer to a "
            f"training image than 99% of the test images are (distance below "
            f"{m['copy_threshold']:.3g}): about 1% is what a model that does not copy gives, "
            "and a share far above it means the model reproduces training images.")
    blocks: list[Block] = [Heading(f"Memorisation: nearest training images ({m['set']})"),
                           Paragraph(text), Table(["Distance quantile", *quantiles], rows)]
    return blocks + _figure_if("Samples (left of each group of four) and their three nearest "
                               "training images", figure)


def _figure_if(title: str, path: Path) -> list[Block]:
    return [Figure(title, path, captioned=False)] if path.exists() else []


# What Markdown would read as markup in a text: raw HTML and entities (written as entities,
# which every Markdown reads), and backslash escapes for the rest: emphasis, links, code spans,
# table cells; `_` only where it can open or close emphasis (never inside a word like a_b).
_MD_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}
_MD_SPECIAL = re.compile(r"[&<>\\`*\[\]|~]|(?<![^\W_])_|_(?![^\W_])")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")


def markdown_escape(text: str) -> str:
    """`text` shown as written in Markdown: on one line, no character read as markup."""
    return _MD_SPECIAL.sub(lambda m: _MD_ENTITIES.get(m[0], "\\" + m[0]),
                           _CONTROL.sub(" ", text))


def _backtick_run(text: str) -> int:
    """The longest run of backticks in `text`: a code fence or span must be longer."""
    return max((len(run) for run in re.findall("`+", text)), default=0)


def _markdown_text(text: Text) -> str:
    """A heading's or paragraph's text: plain parts escaped, inline code as a code span
    (delimited by more backticks than it holds, so a backtick in a name cannot close it)."""
    def code(span: str) -> str:
        span = _CONTROL.sub(" ", span)
        fence = "`" * (_backtick_run(span) + 1)
        pad = " " if span.startswith("`") or span.endswith("`") else ""
        return f"{fence}{pad}{span}{pad}{fence}"

    parts = (text,) if isinstance(text, str) else text
    return "".join(code(p.text) if isinstance(p, Mono) else markdown_escape(p) for p in parts)


def markdown(blocks: list[Block], root: Path) -> str:
    """The blocks as Markdown, one blank line between them; figures link into `root`. Every
    text, cell and caption is escaped (markdown_escape): names from the data set or the run
    directory show as written and never as HTML or table structure."""
    e = markdown_escape

    def render(block: Block) -> str:
        if isinstance(block, Heading):
            return "#" * block.level + " " + _markdown_text(block.text)
        if isinstance(block, Paragraph):
            return _markdown_text(block.text)
        if isinstance(block, Table):
            lines = ["| " + " | ".join(map(e, block.head)) + " |", "|" + "---|" * len(block.head)]
            return "\n".join(lines + ["| " + " | ".join(map(e, row)) + " |" for row in block.rows])
        if isinstance(block, Figure):
            image = f"![{e(block.title)}]({block.path.relative_to(root)})"
            return f"### {e(block.title)}\n\n{image}" if block.captioned else image
        if isinstance(block, Bullets):
            return "\n".join(f"- {e(item)}" for item in block.items)
        fence = "`" * max(3, _backtick_run(block.text) + 1)
        return f"{fence}{block.language}\n{block.text}\n{fence}"

    return "\n\n".join(map(render, blocks)) + "\n"


def page(blocks: list[Block], title: str) -> str:
    """The blocks as one HTML page, every text escaped and every image embedded."""
    e = html.escape

    def text(value: Text) -> str:  # inline code keeps its backticks, as in plain text
        parts = (value,) if isinstance(value, str) else value
        return "".join(f"`{e(p.text)}`" if isinstance(p, Mono) else e(p) for p in parts)

    def render(block: Block) -> str:
        if isinstance(block, Heading):
            return f"<h{block.level}>{text(block.text)}</h{block.level}>"
        if isinstance(block, Paragraph):
            return f"<p>{text(block.text)}</p>"
        if isinstance(block, Table):
            return ("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in block.head) + "</tr>"
                    + "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>"
                              for row in block.rows) + "</table>")
        if isinstance(block, Figure):
            data = base64.b64encode(block.path.read_bytes()).decode()
            image = f'<img src="data:image/png;base64,{data}" alt="{e(block.path.name)}">'
            caption = f"<figcaption>{e(block.title)}</figcaption>" if block.captioned else ""
            return f"<figure>{image}{caption}</figure>"
        if isinstance(block, Bullets):
            return "<ul>" + "".join(f"<li>{e(item)}</li>" for item in block.items) + "</ul>"
        return f"<pre>{e(block.text)}</pre>"

    style = ("body{font-family:sans-serif;max-width:1000px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px}"
             "figure{margin:1em 0}img{max-width:100%}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{e(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(map(render, blocks))}</body></html>")


def write(root: Path, blocks: list[Block]) -> None:
    """report.md and report.html of the run directory `root`."""
    atomic_write(root / "report.md", markdown(blocks, root).encode())
    atomic_write(root / "report.html", page(blocks, f"latentdiffusion {root.name}").encode())
