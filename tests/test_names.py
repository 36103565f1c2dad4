"""Names from the user's data are shown as written: a `$` in a class name is no matplotlib
math, and a file or class folder whose name is not UTF-8 is read (shown with U+FFFD)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from latentdiffusion.cli import main
from latentdiffusion.data import load_dataset
from latentdiffusion.evaluation import plots

NOT_UTF8 = b"bad\xff\xfe"  # what a Latin-1 system or a damaged archive leaves behind


def test_class_names_with_dollars_are_drawn_literally(tmp_path: Path) -> None:
    # `$...$` is matplotlib's math: `\nocommand` and `x^{` were parse errors in the report.
    names = ["$\\nocommand$", "$x^{$", "a\\$b"]
    path = tmp_path / "h.png"
    plots.save_class_histograms({"$ddim$": [0.2, 0.3, 0.5]}, names, path)
    plots.save_lines({"$x^{$": [(1.0, 2.0), (2.0, 1.0)]}, ("$v$", 1.0), tmp_path / "l.png",
                     "$x^{$", "$y")
    assert path.stat().st_size > 0 and (tmp_path / "l.png").stat().st_size > 0
    assert plots.literal("a$b\\$c") == "a\\$b\\\\$c"


def _image(path: bytes, k: int) -> None:
    pixels = np.full((16, 16), 20 * k % 256, np.uint8)
    Image.fromarray(pixels).save(path.decode("utf-8", "surrogateescape"), format="PNG")


def _folder(root: Path, classes: list[bytes], extra: bytes | None = None) -> Path:
    for c in classes:
        folder = os.fsencode(root) + b"/" + c
        try:
            os.makedirs(folder)
        except OSError:  # a filesystem that takes only UTF-8 names
            pytest.skip("this filesystem refuses names that are not UTF-8")
        for k in range(12):
            _image(folder + b"/%d.png" % k, k)
    if extra is not None:
        _image(os.fsencode(root) + b"/" + extra, 99)
    return root


def test_a_file_name_that_is_not_utf8_is_read(tmp_path: Path) -> None:
    root = _folder(tmp_path / "d", [b"a", b"b"], extra=b"a/" + NOT_UTF8 + b".png")
    dataset = load_dataset(root)
    assert len(dataset.train_images) + len(dataset.test_images) == 25


def test_a_class_folder_named_not_utf8_is_shown_with_replacement_characters(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _folder(tmp_path / "d", [NOT_UTF8, b"ok"])
    assert load_dataset(root).class_names == ("bad\ufffd\ufffd", "ok")
    assert main(["data", "verify", "--data-dir", str(root)]) == 0
    out = capsys.readouterr().out
    assert json.loads(out)["class_names"] == ["bad\ufffd\ufffd", "ok"]
    out.encode()  # printable and writable as UTF-8: no lone surrogates
