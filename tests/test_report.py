"""The report's renderers: every name shows as written, in Markdown as in HTML."""

from __future__ import annotations

import re
from pathlib import Path

from latentdiffusion.evaluation.report import (
    Bullets,
    Code,
    Figure,
    Heading,
    Mono,
    Paragraph,
    Table,
    markdown,
    page,
)

HOSTILE = ["<img src=x onerror=alert(1)>", '"><svg onload=alert(2)>',
           "<script>alert(1)</script>", "a|b", "two\nlines", "[x](javascript:alert(1))",
           "`tick", "*bold*", "_under_", "back\\slash", "&lt;"]


def _blocks(tmp_path: Path) -> list:
    figure = tmp_path / "figures" / "class_grid.png"
    figure.parent.mkdir()
    figure.write_bytes(b"png")
    names = ", ".join(HOSTILE)
    return [Heading(f"latentdiffusion run: {HOSTILE[0]} (x)", 1),
            Paragraph(("Preset ", Mono("tiny"), ". Data set ", Mono("a`b\nc"), f": {names}.")),
            Table(["Set", f"FID of classes {names}"], [[HOSTILE[3], HOSTILE[4]]]),
            Figure(f"Conditional samples ({names})", figure),
            Bullets([HOSTILE[2]]), Code('{"a": "```"}', "json")]


def test_markdown_escapes_every_text_cell_and_caption(tmp_path: Path) -> None:
    md = markdown(_blocks(tmp_path), tmp_path)
    for raw in ("<img", "<svg", "<script", "[x](", "*bold*", "_under_"):
        assert raw not in md
    assert "\\`tick" in md and "back\\\\slash" in md and "&amp;lt;" in md
    assert "``a`b c``" in md  # inline code: a longer fence, on one line
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert len(table) == 3 and all(len(re.findall(r"(?<!\\)\|", line)) == 3 for line in table)
    assert "a\\|b | two lines" in table[2]
    assert "````json\n" in md and md.rstrip().endswith("````")  # the fence outlasts the text
    assert "![Conditional samples (" in md and "](figures/class_grid.png)" in md


def test_markdown_keeps_normal_text(tmp_path: Path) -> None:
    blocks = [Heading(("Quality (", Mono("ldm sweep"), ", N = 1,000)")),
              Paragraph("Noise schedules: alphas_cumprod over t"),
              Table(["Stage", "Summary"], [["vae", "train_loss 0.7, val_loss 0.69"]])]
    assert markdown(blocks, tmp_path) == ("## Quality (`ldm sweep`, N = 1,000)\n\n"
                                          "Noise schedules: alphas_cumprod over t\n\n"
                                          "| Stage | Summary |\n|---|---|\n"
                                          "| vae | train_loss 0.7, val_loss 0.69 |\n")


def test_html_escapes_every_text(tmp_path: Path) -> None:
    html = page(_blocks(tmp_path), HOSTILE[0])
    for raw in ("<img src=x", "<svg", "<script"):
        assert raw not in html
    assert "`tiny`" in html
