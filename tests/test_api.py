"""The Python API on one tiny run: the README's example as a script, `Pipeline.sample` against
`ldm sample` byte for byte, PNG folders and zips scored as their .npz, the export, and bad input
(one exception type in Python, one line in the CLI)."""

from __future__ import annotations

import json
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import latentdiffusion
from conftest import write_dataset
from latentdiffusion import Pipeline
from latentdiffusion.api import export
from latentdiffusion.cli import main
from latentdiffusion.errors import CheckpointError, DataError, UsageError
from latentdiffusion.evaluation import image_files
from latentdiffusion.evaluation.samples import load_samples
from test_cli_errors import CPU, assert_fails, ldm

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(data dir, run dir) of one tiny run made by `latentdiffusion.run` (guide included)."""
    root = tmp_path_factory.mktemp("api")
    data = write_dataset(root / "data")
    metrics = latentdiffusion.run(root / "run", data, preset="tiny", device="cpu")
    assert metrics["validation"]["n"] > 0 and "ddpm" in metrics
    return data, root / "run"


def test_the_readme_example_runs(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    data, run = tiny
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## From Python"):]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None
    script = (code.group(1).replace('"runs/quick"', repr(str(run)))
              .replace('"models/quick"', repr(str(tmp_path / "export")))
              .replace('"../shared/data/mnist"', repr(str(data)))
              .replace('preset="quick"', 'preset="tiny"'))
    assert script.count(str(run)) >= 2  # the run, then its export
    exec(compile(script, "README.md", "exec"), {})  # its own asserts: the same images
    assert (tmp_path / "export" / "config.json").is_file()


@pytest.mark.parametrize("argv", [["--sampler", "ddim", "--steps", "5", "--autoguidance", "2"],
                                  ["--sampler", "dpmpp-2m-5"]])
def test_pipeline_samples_the_bytes_of_ldm_sample(tiny: tuple[Path, Path], tmp_path: Path,
                                                  argv: list[str]) -> None:
    _, run = tiny
    out = tmp_path / "s.npz"
    assert main(["sample", "--run-dir", str(run), "--model", "diffusion", *argv, "-n", "16",
                 "--seed", "3", "--batch-size", "7", "--out", str(out), *CPU, "--quiet"]) == 0
    options = dict(zip(argv[::2], argv[1::2], strict=True))
    images = Pipeline.load(run, device="cpu").sample(
        16, sampler=options["--sampler"], seed=3, batch_size=5,
        steps=int(options["--steps"]) if "--steps" in options else None,
        autoguidance=float(options.get("--autoguidance", 1.0)))
    with np.load(out) as written:
        assert images.dtype == np.uint8 and images.shape == (16, 28, 28)
        assert images.tobytes() == written["images"].tobytes()
        if "--autoguidance" in options:
            assert float(written["autoguidance"]) == 2.0


def test_png_folder_and_zip_score_as_the_npz(tiny: tuple[Path, Path], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    data, run = tiny
    common = ["--run-dir", run, "--model", "diffusion", "--sampler", "ddpm-5", *CPU, "--quiet",
              "-n", "24"]
    assert ldm(capsys, "sample", *common, "--out", tmp_path / "s.npz")[0] == 0
    assert ldm(capsys, "sample", *common, "--format", "png", "--out", tmp_path / "png")[0] == 0
    names = sorted(p.name for p in (tmp_path / "png").iterdir())
    assert names == [f"{i:06d}.png" for i in range(24)] + ["samples.json"]
    meta = json.loads((tmp_path / "png" / "samples.json").read_text())
    assert meta["sampler"] == "ddpm-5" and meta["nfe"] == 5 and meta["n"] == 24
    with zipfile.ZipFile(tmp_path / "s.zip", "w") as archive:
        for name in names:
            archive.write(tmp_path / "png" / name, f"set/{name}")
    scored = {}
    for samples in ("s.npz", "png", "s.zip"):
        code, out, _ = ldm(capsys, "evaluate", "--data-dir", data, "--run-dir", run,
                           "--samples", tmp_path / samples, *CPU)
        assert code == 0
        scored[samples] = json.loads(out)
    assert scored["png"] == scored["s.npz"] == scored["s.zip"]  # every digit of every number
    npz_images = load_samples(tmp_path / "s.npz")[0]
    assert np.array_equal(load_samples(tmp_path / "png")[0], npz_images)
    # A smaller set into the same folder leaves none of the first one's images.
    assert ldm(capsys, "sample", *common[:-2], "-n", "3", "--format", "png",
               "--out", tmp_path / "png")[0] == 0
    assert len(list((tmp_path / "png").glob("*.png"))) == 3


def test_evaluate_in_python_is_ldm_evaluate(tiny: tuple[Path, Path],
                                            capsys: pytest.CaptureFixture[str],
                                            tmp_path: Path) -> None:
    data, run = tiny
    pipe = Pipeline.load(run, device="cpu")
    images = pipe.sample(24, sampler="ddim-5")
    np.savez(tmp_path / "x.npz", images=images)
    code, out, _ = ldm(capsys, "evaluate", "--data-dir", data, "--run-dir", run, "--samples",
                       tmp_path / "x.npz", *CPU)
    assert code == 0
    assert json.loads(json.dumps(pipe.evaluate(images))) == json.loads(out)
    latents = pipe.encode(images)
    assert latents.shape == (24, 2, 8, 8)
    assert pipe.decode(latents).shape == images.shape
    info = pipe.info
    assert info["kind"] == "run" and info["data"]["name"] == "data"
    assert info["fid"]["ddpm"]["n"] > 0 and set(info["hashes"]) == {"vae", "diffusion", "guide"}
    assert info["command"].startswith("ldm run --data-dir")


def test_export_samples_as_the_run(tiny: tuple[Path, Path], tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    _, run = tiny
    out = tmp_path / "model"
    code, printed, _ = ldm(capsys, "export", "--run-dir", run, "--out", out, "--license", "MIT")
    assert code == 0 and json.loads(printed)["out"] == str(out)
    weights = sum((out / f"{m}.safetensors").stat().st_size for m in ("vae", "diffusion", "guide"))
    assert sum(p.stat().st_size for p in out.iterdir()) <= weights + 2**20
    config = json.loads((out / "config.json").read_text())
    assert set(config["models"]) == {"vae", "diffusion", "guide"}
    assert config["latents"]["shift"] and config["data_mean"] is not None
    card = (out / "README.md").read_text()
    for expected in (config["data"]["content_sha256"], "| MIT |", "samples.png",
                     "ldm run --data-dir", f"| ddpm | {config['fid']['ddpm']['n']} |"):
        assert expected in card
    exported = Pipeline.load(out, device="cpu")
    assert exported.info["hashes"] == Pipeline.load(run, device="cpu").info["hashes"]
    for options in ({"sampler": "dpmpp-2m-5"}, {"sampler": "ddpm-5", "autoguidance": 2.0}):
        assert np.array_equal(exported.sample(8, **options),  # type: ignore[arg-type]
                              Pipeline.load(run, device="cpu").sample(8, **options))  # type: ignore[arg-type]
    # The commands that only sample take an export as a run directory.
    assert ldm(capsys, "sample", "--run-dir", out, "--model", "diffusion", "--sampler",
               "dpmpp-2m-5", "-n", "8", "--out", tmp_path / "e.npz", *CPU, "--quiet")[0] == 0
    assert np.array_equal(load_samples(tmp_path / "e.npz")[0],
                          exported.sample(8, sampler="dpmpp-2m-5"))
    with pytest.raises(UsageError, match="export: it holds no classifier"):
        exported.evaluate(np.zeros((4, 28, 28), np.uint8))
    assert ldm(capsys, "export", "--run-dir", run, "--out", out)[0] == 0  # again: replaced


# ---------------------------------------------------------------- bad input


def test_load_refuses_what_is_neither_a_run_nor_an_export(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    for path in (tmp_path, tmp_path / "missing", tmp_path / "notes.txt"):
        with pytest.raises(DataError, match="neither a run directory"):
            Pipeline.load(path)


def test_load_refuses_a_damaged_export(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    _, run = tiny
    export(run, tmp_path / "good")
    missing, altered = tmp_path / "missing", tmp_path / "altered"
    shutil.copytree(tmp_path / "good", missing)
    shutil.copytree(tmp_path / "good", altered)
    (missing / "guide.safetensors").unlink()
    data = bytearray((altered / "diffusion.safetensors").read_bytes())
    data[-1] ^= 1
    (altered / "diffusion.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="guide.safetensors is missing"):
        Pipeline.load(missing)
    with pytest.raises(CheckpointError, match="does not match the sha256"):
        Pipeline.load(altered)


def test_sample_checks_its_arguments(tiny: tuple[Path, Path]) -> None:
    pipe = Pipeline.load(tiny[1], device="cpu")
    for options, match in (({"n": 2.5}, "integer in 1 .. "), ({"n": 0}, "integer in 1 .. "),
                           ({"n": 2, "seed": -1}, "seed must be"),
                           ({"n": 2, "sampler": "ddpm", "eta": 0.5}, "eta is an option of ddim"),
                           ({"n": 2, "labels": "7"}, "need a class-conditional model")):
        with pytest.raises(UsageError, match=match):
            pipe.sample(**options)  # type: ignore[arg-type]


def test_run_checks_its_options_before_reading_data(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="unet.nonsense"):
        latentdiffusion.run(tmp_path / "run", tmp_path / "nowhere", preset="tiny",
                            overrides={"unet.nonsense": 1})
    assert not (tmp_path / "run").exists()


def _png(path: Path, size: int = 28, mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (size, size)).save(path)


def test_evaluate_refuses_bad_folders_and_zips(tiny: tuple[Path, Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    data, run = tiny
    mixed, other = tmp_path / "mixed", tmp_path / "other"
    _png(mixed / "000000.png")
    _png(mixed / "000001.png", size=16)
    _png(other / "000000.png")
    (other / "notes.txt").write_text("not an image")
    outside = tmp_path / "outside.zip"
    with zipfile.ZipFile(outside, "w") as archive:
        archive.writestr("../x.png", (mixed / "000000.png").read_bytes())
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("000000.png", b"\0" * 40_000)
    monkeypatch.setattr(image_files, "MAX_DECODED_BYTES", 30_000)  # the bound, made small
    common = ["evaluate", "--data-dir", data, "--run-dir", run, *CPU, "--samples"]
    for samples, match in ((mixed, "mixed images: 000001.png is 16x16"),
                           (other, "notes.txt is not an image"),
                           (outside, "'../x.png' points outside the archive"),
                           (bomb, "40,000 bytes once decompressed")):
        assert_fails(capsys, 1, *common, samples, match=match)
    gray = tmp_path / "gray"  # of the run's size, but RGB where the run is grayscale
    _png(gray / "000000.png", mode="RGB")
    assert_fails(capsys, 1, *common, gray, match="images are 28x28x3")


def test_out_refuses_folders_of_other_files(tiny: tuple[Path, Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    _, run = tiny
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("mine")
    assert_fails(capsys, 2, "export", "--run-dir", run, "--out", mine,
                 match="not an earlier export")
    assert_fails(capsys, 2, "sample", "--run-dir", run, "--model", "diffusion", "-n", "2",
                 "--format", "png", "--out", mine, *CPU, match="not an earlier samples folder")
    assert_fails(capsys, 2, "export", "--run-dir", run, "--out", run,
                 match="not an earlier export")
    assert sorted(p.name for p in mine.iterdir()) == ["thesis.tex"]
