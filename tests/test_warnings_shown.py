"""The CLI shows none of Python's own warning text: an expected warning is one clear line (or
nothing, where the next line says it all), any other one a single `warning: ...` line."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
from PIL import Image

from latentdiffusion.cli import main
from latentdiffusion.data import load_dataset
from latentdiffusion.errors import DataError
from latentdiffusion.evaluation import plots
from test_cli_errors import assert_fails


def test_an_image_past_pillows_bomb_limit_gives_only_the_error_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # 9500 x 9500 pixels is past Pillow's warning limit (89M), below its error limit.
    root = tmp_path / "d" / "a"
    root.mkdir(parents=True)
    for k in range(4):
        Image.new("L", (16, 16), 40 * k).save(root / f"{k}.png")
    Image.new("1", (9500, 9500)).save(root / "big.png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # as a fresh process shows it
        with pytest.raises(DataError, match="big.png is 9500x9500 but"):
            load_dataset(tmp_path / "d")
    assert not caught  # the size is checked before decoding: the error line says it all
    assert_fails(capsys, 1, "data", "verify", "--data-dir", tmp_path / "d",
                 match="big.png is 9500x9500 but")


def test_class_names_the_font_lacks_draw_without_a_warning(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plots.save_class_histograms({"ddpm": [0.5, 0.5]}, ["猫", "犬"], tmp_path / "h.png")
    assert (tmp_path / "h.png").stat().st_size > 0


def test_any_other_python_warning_is_one_line(capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    def warn(*args: object) -> None:
        warnings.warn("something\n  odd", UserWarning, stacklevel=1)

    monkeypatch.setattr(sys.modules["latentdiffusion.cli.main"], "config_command", warn)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert main(["config", "--preset", "tiny"]) == 0
    assert capsys.readouterr().err == "warning: something odd\n"
