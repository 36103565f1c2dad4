"""Train the FID classifier from scratch and report MNIST test accuracy and wall time.

    python benchmarks/classifier.py --data-dir ../shared/data/mnist --run-dir bench-out/default
Bar: accuracy >= 0.992 in <= 180 s on 2 CPU cores.
"""

from __future__ import annotations

import time

from common import emit, load, parser, setup
from latentdiffusion.run import stages
from latentdiffusion.run.rundir import RunDir


def main() -> None:
    args = parser(__doc__ or "").parse_args()
    device = setup(args)
    dataset, config = load(args)
    start = time.perf_counter()
    header = stages.train_classifier(dataset, RunDir(args.run_dir),
                                     config.classifier, config.classifier_train, device=device,
                                     progress=False).header
    seconds = time.perf_counter() - start
    emit({"benchmark": "classifier", "preset": args.preset, "seconds": seconds,
          "train_seconds": header["train_seconds"],
          "test_accuracy": header["history"][-1]["val_accuracy"], "bar_accuracy": 0.992,
          "bar_seconds": 180, "history": header["history"]})


if __name__ == "__main__":
    main()
