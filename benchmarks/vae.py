"""Train the VAE and measure its bars against the run's classifier (train it first with
benchmarks/classifier.py on the same --run-dir).

    python benchmarks/vae.py --data-dir ../shared/data/mnist --run-dir bench-out/default
    python benchmarks/vae.py --data-dir /usr/share/datasets/fashion-mnist --run-dir F \
        --set vae.arch=resnet --set vae.loss=l1
Bars: <= 240 s; classifier accuracy on test reconstructions >= 0.985; reconstruction FID
<= 2x Validation FID. Also reports the VAE-prior and Random rows.
"""

from __future__ import annotations

import json
import time

from common import emit, load, parser, setup
from latentdiffusion.evaluation.metrics import random_images
from latentdiffusion.run import stages
from latentdiffusion.run.checkpoint import peek
from latentdiffusion.run.generation import generate, reconstruct
from latentdiffusion.run.recipe import dumps
from latentdiffusion.run.rundir import RunDir
from latentdiffusion.run.scores import evaluate


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--skip-train", action="store_true", help="evaluate the existing VAE")
    args = p.parse_args()
    device = setup(args)
    dataset, config = load(args)
    run = RunDir(args.run_dir)
    start = time.perf_counter()
    if not args.skip_train:
        stages.train_vae(dataset, run, config.vae, config.vae_train, device=device,
                         progress=False)
    train_seconds = time.perf_counter() - start
    recon, labels = reconstruct(dataset, run, "test", device=device)
    prior = generate(run, "vae", 10_000, seed=1, device=device, progress=False)

    def score(images, labels=None):  # type: ignore[no-untyped-def]
        m = evaluate(dataset, run, images, labels, device=device)
        return {k: m[k] for k in ("n", "fid", "kid_mean", "precision", "recall", "accuracy",
                                  "class_entropy_bits") if k in m}

    validation = score(dataset.test_images, dataset.test_labels)
    reconstruction = score(recon, labels)
    header = peek(run.model("vae")) or {}
    emit({"benchmark": "vae", "preset": args.preset, "set": args.set,
          "vae": json.loads(dumps(config.vae, "json")),
          "vae_train": json.loads(dumps(config.vae_train, "json")),
          "steps": config.vae_train.epochs * (len(dataset.train_images)
                                               // config.vae_train.batch_size),
          "train_seconds": train_seconds, "stage_train_seconds": header.get("train_seconds"),
          "history": header.get("history"),
          "bar_seconds": 240, "validation": validation, "reconstruction": reconstruction,
          "reconstruction_fid_over_validation": reconstruction["fid"] / validation["fid"],
          "bar_fid_ratio": 2.0, "bar_reconstruction_accuracy": 0.985,
          "prior": score(prior), "random": score(random_images(dataset.train_images, 10_000, 1))})


if __name__ == "__main__":
    main()
