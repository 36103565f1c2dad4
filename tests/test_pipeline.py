"""End to end: `ldm run --preset tiny` in-process on synthetic data, every CLI stage once."""

from __future__ import annotations

import json
import math
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

from latentdiffusion.cli import main
from latentdiffusion.data.images import to_uint8
from latentdiffusion.diffusion import SamplingRequest, sample
from latentdiffusion.evaluation.samples import load_samples
from latentdiffusion.evaluation.tables import scored_sets
from latentdiffusion.models import VAE
from latentdiffusion.rng import generator, randn
from latentdiffusion.run import checkpoint, latents
from latentdiffusion.run.generation import generate, load_denoiser
from latentdiffusion.run.rundir import RunDir

STAGES = ["classifier", "vae", "encode", "diffusion", "guide", "sample", "evaluate", "report"]


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, str]:
    """Run `ldm run` and return {stage: 'ran' | 'skipped'} from its one-line summaries."""
    assert main(["run", *argv]) == 0
    err = capsys.readouterr().err.replace("\r", "\n")
    assert "Traceback" not in err
    return {m.group(1): "skipped" if "skipped" in m.group(2) else "ran"
            for m in re.finditer(r"^\[(\w+)\] (.*)$", err, flags=re.M)}


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.sources.append(dict(attrs).get("src") or "")


def test_run_tiny_preset_end_to_end(data_dir: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    argv = ("--data-dir", str(data_dir), "--run-dir", str(run), "--preset", "tiny",
            "--device", "cpu")
    assert _run(capsys, *argv) == dict.fromkeys(STAGES, "ran")

    for name in ("classifier", "vae", "diffusion", "guide", "latents"):
        assert (run / f"{name}.safetensors").is_file()
    guide = checkpoint.peek(run / "guide.safetensors")  # the tiny preset's guide: (4, 8), 6 steps
    assert guide is not None and guide["config"]["channels"] == [4, 8]
    assert guide["train_config"]["steps"] == 6
    for name in ("report.md", "report.html", "metrics.json", "run.json",
                 "figures/losses.png", "figures/schedules.png", "figures/reconstructions.png",
                 "figures/class_histogram.png"):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(scored_sets(metrics)) == {"random", "vae-prior", "vae-reconstruction", "ddim-5",
                                         "ddpm", "validation"}
    assert set(metrics) - set(scored_sets(metrics)) == {"warnings", "memorisation"}
    assert metrics["memorisation"]["set"] == "ddim-5" and metrics["memorisation"]["n"] == 24
    assert metrics["memorisation"]["train_n"] == 96 and 0 <= metrics["memorisation"]["copies"] <= 1
    # 24 images in a 16-d space are fewer than 5 d: every set's FID is flagged, and said so
    few = {w["figures"]["set"] for w in metrics["warnings"] if w["code"] == "few-images"}
    assert few == set(scored_sets(metrics))
    for name, entry in scored_sets(metrics).items():
        for key in ("fid", "kid_mean", "kid_std", "precision", "recall", "class_entropy_bits"):
            assert math.isfinite(entry[key]), (name, key)
        assert len(entry["class_histogram"]) == 10
        assert abs(sum(entry["class_histogram"]) - 1) < 1e-6
    for name in ("random", "vae-prior", "ddim-5", "ddpm"):
        images, labels = load_samples(run / "samples" / f"{name}.npz")
        assert images.shape == (24, 28, 28) and images.dtype == np.uint8 and labels is None
        assert metrics[name]["n"] == 24
    with np.load(run / "samples" / "ddim-5.npz") as saved:  # autoguided: the guide's calls count
        assert (float(saved["autoguidance"]), int(saved["nfe"])) == (2.0, 10)
    _, labels = load_samples(run / "samples" / "vae-reconstruction.npz")
    assert labels is not None and "accuracy" in metrics["vae-reconstruction"]

    page = (run / "report.html").read_text()
    images = _Images()
    images.feed(page)
    assert len(images.sources) >= 6
    assert all(src.startswith("data:image/png;base64,") for src in images.sources)
    assert "Validation" in page and "Random" in page
    # The post's FIDs are of MNIST: beside a data set named otherwise (here by its folder), none.
    assert "Data set `data` (idx" in page and "Post&#x27;s FID" not in page and "6.02" not in page

    # A second run is a no-op; --force diffusion redoes diffusion and what reads it.
    assert _run(capsys, *argv) == dict.fromkeys(STAGES, "skipped")
    before = (run / "vae.safetensors").stat().st_mtime_ns
    events = _run(capsys, *argv, "--force", "diffusion")
    assert [s for s in STAGES if events[s] == "ran"] == ["diffusion", "sample", "evaluate",
                                                         "report"]
    assert (run / "vae.safetensors").stat().st_mtime_ns == before
    guide_weights = checkpoint.load(run / "guide.safetensors", kind="unet")[0]
    events = _run(capsys, *argv, "--force", "guide")
    assert [s for s in STAGES if events[s] == "ran"] == ["guide", "sample", "evaluate", "report"]
    again = checkpoint.load(run / "guide.safetensors", kind="unet")[0]
    assert all(torch.equal(v, again[k]) for k, v in guide_weights.items())  # same seed, weights
    # Another guide scale samples again, with the same models.
    for options in (["--set", "sampling.autoguidance=3"], []):
        events = _run(capsys, *argv, *options)
        assert [s for s in STAGES if events[s] == "ran"] == ["sample", "evaluate", "report"]

    # `ldm sweep` scores each (sampler, NFE) pair, adds its table and figure to the report, and
    # continues a sweep of the same models instead of redoing it.
    sweep_argv = ["sweep", "--samplers", "heun,dpmpp-2m,ddim", "--nfe", "3,4", "-n", "8",
                  "--data-dir", str(data_dir), "--run-dir", str(run), "--quiet"]
    assert main(sweep_argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["report_updated"] is True
    sweep = json.loads((run / "sweep.json").read_text())
    results = sweep["denoisers"][sweep["current"]]["results"]
    assert set(results) == {"heun-2", "dpmpp-2m-3", "dpmpp-2m-4", "ddim-3", "ddim-4"}
    assert [results[k]["nfe"] for k in ("heun-2", "dpmpp-2m-4")] == [3, 4]
    assert sweep["n"] == 8 and sweep["validation"]["fid"] > 0
    assert all(math.isfinite(e["fid"]) and e["samples_per_second"] > 0
               for e in results.values())
    assert (run / "figures" / "sweep.png").is_file()
    assert "Quality against cost" in (run / "report.html").read_text()
    assert "| vp | dpmpp-2m-4 | 4 |" in (run / "report.md").read_text()
    assert main([*sweep_argv[:2], "heun", *sweep_argv[3:]]) == 0  # every pair is already done
    assert json.loads((run / "sweep.json").read_text()) == sweep  # same timings: not redone
    # Autoguided pairs are another denoiser's entries, the guide's calls in their NFE.
    assert main([*sweep_argv[:2], "ddim", "--autoguidance", "2", "--nfe", "4,6",
                 *sweep_argv[5:]]) == 0
    capsys.readouterr()
    guided = json.loads((run / "sweep.json").read_text())
    entry = guided["denoisers"][guided["current"]]
    assert entry["objective"] == "vp + autoguidance 2" and len(guided["denoisers"]) == 2
    assert {k: e["nfe"] for k, e in entry["results"].items()} == {"ddim-2": 4, "ddim-3": 6}
    assert "| vp + autoguidance 2 | ddim-3 | 6 |" in (run / "report.md").read_text()
    (run / "sweep.json").write_text(json.dumps(sweep))  # as before, for the checks below
    events = _run(capsys, *argv)  # the report now has the sweep in its key: only it is redone
    assert [s for s in STAGES if events[s] == "ran"] == ["report"]
    # A damaged sweep.json (hand-edited, or with a score missing) is reported and left out.
    damaged = ('{"results": {"x": 5}}', json.dumps({**sweep, "validation": {"fid": None}}))
    for text, redone in zip(damaged, (["report"], []), strict=True):  # both are no sweep
        (run / "sweep.json").write_text(text)
        events = _run(capsys, *argv)
        assert [s for s in STAGES if events[s] == "ran"] == redone, text
        assert "Quality against cost" not in (run / "report.html").read_text()


def test_each_cli_stage_alone(data_dir: Path, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    run = str(tmp_path / "run")
    common = ["--run-dir", run, "--device", "cpu", "--quiet"]
    data = ["--data-dir", str(data_dir)]
    for model in ("classifier", "vae"):
        assert main(["train", model, "--preset", "tiny", *data, *common]) == 0
    assert main(["encode", *data, *common]) == 0
    assert main(["train", "diffusion", "--preset", "tiny", *common]) == 0
    assert main(["train", "guide", "--preset", "tiny", *common]) == 0
    out = tmp_path / "d.npz"
    assert main(["sample", "--model", "diffusion", "--sampler", "ddim", "--steps", "3", "-n",
                 "10", "--out", str(out), *common]) == 0
    assert out.with_suffix(".png").is_file()
    capsys.readouterr()
    for sampler, nfe in (("heun", 5), ("dpmpp-2m-sde", 3), ("euler", 3), ("ddpm", 3)):
        assert main(["sample", "--model", "diffusion", "--sampler", sampler, "--steps",
                     str(3), "-n", "4", "--out", str(out), *common]) == 0
        assert json.loads(capsys.readouterr().out)["nfe"] == nfe
        with np.load(out) as saved:  # the samples file says how it was made
            assert (str(saved["sampler"]), int(saved["nfe"])) == (f"{sampler}-3", nfe)
    assert main(["sample", "--model", "diffusion", "--sampler", "heun-3", "--autoguidance", "2",
                 "-n", "4", "--out", str(out), *common]) == 0
    assert json.loads(capsys.readouterr().out)["nfe"] == 10  # 5 of the denoiser, 5 of the guide
    with np.load(out) as saved:
        assert float(saved["autoguidance"]) == 2.0
    recon = tmp_path / "r.npz"
    assert main(["sample", "--model", "vae", "--reconstruct", "test", "--out", str(recon),
                 *data, *common]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--samples", str(recon), "--out", str(tmp_path / "r.json"),
                 *data, *common]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 40 and 0 <= result["accuracy"] <= 1
    assert json.loads((tmp_path / "r.json").read_text()) == result
    assert main(["evaluate", "--baselines", *data, *common]) == 0
    baselines = json.loads(capsys.readouterr().out)
    assert set(scored_sets(baselines)) == {"validation", "random"}
    assert isinstance(baselines["warnings"], list)  # the Random row's check
    assert baselines["validation"]["n"] == 40


def test_flow_objective_end_to_end(data_dir: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    """`--objective flow` trains the denoiser on the straight path; a run that switches objective
    retrains the denoiser (never reads one objective's checkpoint as the other) and every
    sampler works on the flow model."""
    run = tmp_path / "run"
    argv = ("--data-dir", str(data_dir), "--run-dir", str(run), "--preset", "tiny",
            "--device", "cpu")
    assert _run(capsys, *argv) == dict.fromkeys(STAGES, "ran")
    vp_weights = (run / "diffusion.safetensors").read_bytes()
    events = _run(capsys, *argv, "--objective", "flow")
    assert [s for s in STAGES if events[s] == "ran"] == STAGES[3:]  # diffusion and after
    guide = checkpoint.peek(run / "guide.safetensors")  # the guide follows the objective
    assert guide is not None and guide["objective"]["kind"] == "flow"
    header = checkpoint.peek(run / "diffusion.safetensors")
    assert header is not None and header["objective"]["kind"] == "flow"
    # The model stores its training x_0's mean, where the samplers' ladders start, and the
    # images `generate` makes come from that denoiser (IADB on the flow model: its first D is
    # that mean).
    latent_set, _ = latents.load(run / "latents.safetensors")
    cpu = torch.device("cpu")
    denoiser, _ = load_denoiser(RunDir(run), header["vae_hash"], cpu)
    assert torch.allclose(denoiser.data_mean, latent_set.normalised("train").mean(dim=0))
    vae, _ = checkpoint.load_model(run / "vae.safetensors", VAE, cpu)
    noise = randn((3, *latent_set.train.shape[1:]), [generator(5, i) for i in range(3)], cpu)
    x0 = sample(denoiser, noise, "ddim-3")
    expected = to_uint8(vae.decode(latents.denormalise(x0, tuple(header["shift"]),
                                                       tuple(header["scale"]))))
    made = generate(RunDir(run), "diffusion", 3, 5, request=SamplingRequest.of("ddim-3"),
                    device=cpu, progress=False)
    assert np.array_equal(made, expected)
    assert (run / "diffusion.safetensors").read_bytes() != vp_weights
    metrics = json.loads((run / "metrics.json").read_text())
    assert all(math.isfinite(metrics[k]["fid"]) for k in ("ddim-5", "ddpm"))
    common = ["--run-dir", str(run), "--device", "cpu", "--quiet", "-n", "4"]
    for sampler in ("heun-3", "dpmpp-2m-3", "dpmpp-2m-sde-3", "ddim-3", "ddim-3", "ddpm-3"):
        out = tmp_path / f"{sampler}.npz"
        assert main(["sample", "--model", "diffusion", "--sampler", sampler, "--out", str(out),
                     *common]) == 0, sampler
        images, _ = load_samples(out)
        assert images.shape == (4, 28, 28) and images.std() > 0
    # A sweep before and after the switch keeps both denoisers: the report sets them side by side.
    sweep_argv = ["sweep", "--samplers", "ddim,ddpm", "--nfe", "3", "-n", "8", "--data-dir",
                  str(data_dir), "--run-dir", str(run), "--quiet"]
    assert main(sweep_argv) == 0
    assert _run(capsys, *argv)["diffusion"] == "ran"  # back to vp: retrained
    assert main(sweep_argv) == 0
    sweep = json.loads((run / "sweep.json").read_text())
    assert sorted(d["objective"] for d in sweep["denoisers"].values()) == ["flow", "vp"]
    report_md = (run / "report.md").read_text()
    for objective, kind in (("flow", "deterministic"), ("flow", "stochastic"),
                            ("vp", "deterministic"), ("vp", "stochastic")):
        assert f"| {objective} | {kind} |" in report_md
    assert main(["run", *argv, "--objective", "edm"]) == 2
    assert "ObjectiveConfig.kind: unknown value 'edm'" in capsys.readouterr().err
