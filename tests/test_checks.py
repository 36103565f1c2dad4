"""The checks that say when an evaluation cannot be trusted, and the memorisation check: known
answers on constructed cases, then through `ldm evaluate` and `ldm run` on a tiny run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import synthetic_digits
from latentdiffusion.cli import main
from latentdiffusion.data.images import to_unit_tensor
from latentdiffusion.evaluation import checks
from latentdiffusion.evaluation.memorisation import memorisation
from latentdiffusion.models import Classifier
from latentdiffusion.models.classifier import ClassifierConfig, accuracy, rotate
from latentdiffusion.run.keys import diffusion_key
from latentdiffusion.run.presets import preset
from latentdiffusion.run.training import init_model

CPU = ("--device", "cpu", "--quiet")


def test_a_feature_network_at_its_initialisation_is_flagged() -> None:
    images, labels = synthetic_digits(200, seed=3)
    x = to_unit_tensor(images)
    labelled = init_model(Classifier, ClassifierConfig(channels=4, feature_dim=16), seed=0)
    score = accuracy(labelled.eval(), x, torch.from_numpy(labels.astype(np.int64)))
    found = checks.feature_network(score, 10, "labels")
    assert found is not None and found.code == "feature-network-at-chance"
    turns = torch.arange(len(x)) % 4
    rotation = init_model(Classifier, ClassifierConfig(channels=4, feature_dim=16,
                                                       task="rotation", num_classes=4), seed=0)
    found = checks.feature_network(accuracy(rotation.eval(), rotate(x, turns), turns), 4,
                                   "rotation")
    assert found is not None and "rotation accuracy" in found.message
    # the default run's classifier (99.5%) and a rotation task well learnt pass
    assert checks.feature_network(0.995, 10, "labels") is None
    assert checks.feature_network(0.9, 4, "rotation") is None
    assert checks.feature_network(0.43, 4, "rotation") is not None  # floor 0.4375


def test_random_must_score_worst() -> None:
    assert checks.random_row({"random": 1887.7, "vae-prior": 945.0, "ddpm-20": 5.94,
                              "validation": 1.64}) is None
    # the unlabelled 1,300-picture run: noise scores better than every trained set
    found = checks.random_row({"random": 0.498, "vae-prior": 0.944, "vae-reconstruction": 1.006,
                               "ddpm-20": 0.946, "validation": 0.0774})
    assert found is not None
    assert found.figures["not_worse_than"] == ["ddpm-20", "vae-reconstruction"]
    # the VAE's prior samples are the post's baseline, poor by design: noise may beat them
    assert checks.random_row({"random": 1201.0, "vae-prior": 1230.6, "vae-reconstruction": 4.02,
                              "ddpm-20": 7.84, "validation": 1.76}) is None
    found = checks.random_row({"random": 1.5, "ddpm-20": 1.2, "validation": 1.0})
    assert found is not None and "within 2x of Validation" in found.message


def test_a_set_of_one_image_repeated_has_collapsed() -> None:
    data, _ = synthetic_digits(300, seed=1)
    assert checks.collapse("ddpm-20", np.repeat(data[:1], 300, axis=0), data) is not None
    assert checks.collapse("test images", data[::-1].copy(), data) is None
    flat = np.full_like(data, 128)
    assert checks.flat_reconstructions(flat, data) is not None
    assert checks.flat_reconstructions(data, data) is None
    assert checks.pairwise_spread(data[:1]) == 0.0


def test_few_images_for_the_feature_dimension() -> None:
    found = checks.sample_size("validation", 143, 128)
    assert found is not None and found.figures == {"set": "validation", "n": 143,
                                                   "feature_dim": 128}
    assert checks.sample_size("validation", 10_000, 128) is None
    assert checks.sample_size("validation", 640, 128) is None  # exactly 5 d


def test_memorisation_known_answers() -> None:
    rng = np.random.default_rng(0)
    train, test = rng.normal(size=(500, 8)), rng.normal(size=(200, 8))
    copies = memorisation(train[:100] + 1e-6, test, train)  # samples that are training images
    assert copies["copies"] == 1.0
    assert copies["shown_neighbours"][0][0] == 0  # each sample's nearest is its own original
    fresh = memorisation(rng.normal(size=(1000, 8)), test, train)  # new draws of the data
    assert fresh["copies"] < 0.05
    assert fresh["sample_quantiles"][2] > copies["sample_quantiles"][2]
    assert checks.copies({**copies, "set": "ddpm-20"}) is not None
    assert checks.copies(fresh) is None
    assert len(fresh["shown_neighbours"]) == 16 and len(fresh["shown_neighbours"][0]) == 3


def test_the_train_limit_is_in_the_denoisers_key_only_when_set() -> None:
    c = preset("tiny")
    full = diffusion_key(c.unet, c.schedule, c.objective, c.diffusion_train, "latents")
    assert "train_limit" not in full.fields  # the keys of earlier denoisers stay as they were
    limited = diffusion_key(c.unet, c.schedule, c.objective, c.diffusion_train, "latents", 500)
    assert limited.fields["train_limit"] == 500 and limited.digest != full.digest


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from conftest import write_dataset

    root = tmp_path_factory.mktemp("checks")
    data = write_dataset(root / "data", n_train=96, n_test=40)
    run = root / "run"
    assert main(["run", "--data-dir", str(data), "--run-dir", str(run), "--preset", "tiny",
                 "--set", "train_limit=48", *CPU]) == 0
    return data, run


def test_ldm_run_reports_its_checks(tiny_run: tuple[Path, Path],
                                    capsys: pytest.CaptureFixture[str]) -> None:
    data, run = tiny_run
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["memorisation"]["train_n"] == 48  # the images the denoiser saw
    codes = {w["code"] for w in metrics["warnings"]}
    assert "few-images" in codes  # 24 images in a 16-d space
    report = (run / "report.md").read_text()
    assert "## Checks: read the table with these in mind" in report
    assert report.index("## Checks") < report.index("## FID table")
    assert "(too few images: read KID)" in report and "## Memorisation" in report
    assert (run / "figures" / "nearest.png").is_file()
    environment = json.loads((run / "run.json").read_text())["environment"]
    assert environment["threads"] == torch.get_num_threads() and environment["world_size"] == 1
    # a second run skips every stage and says the warnings again on stderr
    assert main(["run", "--data-dir", str(data), "--run-dir", str(run), "--preset", "tiny",
                 "--set", "train_limit=48", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "[evaluate] skipped" in err
    assert err.count("warning: ") == len({w["message"] for w in metrics["warnings"]})


def test_ldm_evaluate_flags_collapse_and_copies(tiny_run: tuple[Path, Path], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    data, run = tiny_run
    common = ["--data-dir", str(data), "--run-dir", str(run), *CPU]
    train, _ = synthetic_digits(96, seed=0)  # conftest's training images, in file order
    test, _ = synthetic_digits(40, seed=1)
    one = tmp_path / "one.npz"
    np.savez(one, images=np.repeat(train[:1], 200, axis=0))
    assert main(["evaluate", "--samples", str(one), *common]) == 0
    captured = capsys.readouterr()
    codes = {w["code"] for w in json.loads(captured.out)["warnings"]}
    assert "samples-alike" in codes and "warning: samples: all images are alike" in captured.err
    copied = tmp_path / "copied.npz"
    np.savez(copied, images=train[:48])  # the denoiser's own training images
    assert main(["evaluate", "--samples", str(copied), "--nearest", *common]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["memorisation"]["copies"] > 0.9
    assert "copies-training-images" in {w["code"] for w in result["warnings"]}
    assert "of the test images are (about 1% without copying)" in captured.err
    fresh = tmp_path / "fresh.npz"
    np.savez(fresh, images=test)  # unseen images of the data: no copies, not alike
    assert main(["evaluate", "--samples", str(fresh), "--nearest", *common]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["memorisation"]["copies"] < 0.05
    assert not {"samples-alike", "copies-training-images"} & {w["code"] for w in result["warnings"]}
