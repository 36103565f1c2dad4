"""Helpers shared by the benchmark scripts (each prints one JSON object on stdout)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from latentdiffusion.data import Dataset, load_dataset
from latentdiffusion.run import recipe
from latentdiffusion.run.config import ImageShape, RunConfig, for_images
from latentdiffusion.run.presets import preset


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--data-dir", default=os.environ.get("LDM_DATA_DIR"),
                   help="MNIST directory (default $LDM_DATA_DIR)")
    p.add_argument("--run-dir", type=Path, default=Path("bench-out/default"))
    p.add_argument("--dataset", default=None,
                   help="a registered data set's name (mnist, fashion-mnist); default: named "
                        "by the files' content")
    p.add_argument("--preset", default="default")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="change one config value, as `ldm run --set` (repeatable)")
    p.add_argument("--threads", type=int, default=2,
                   help="torch CPU threads (2: the machine the docs measure on)")
    return p


def setup(args: argparse.Namespace) -> torch.device:
    torch.set_num_threads(args.threads)
    return torch.device("cpu")


def load(args: argparse.Namespace) -> tuple[Dataset, RunConfig]:
    """The data set, and the preset scaled to its images with the --set changes (as `ldm run`)."""
    dataset = load_dataset(args.data_dir, args.dataset)
    classes = dataset.num_classes if dataset.labelled else 0
    config = for_images(preset(args.preset),
                        ImageShape(dataset.image_size, dataset.channels, classes))
    return dataset, recipe.apply_sets(config, args.set)


def emit(result: dict) -> None:
    result["machine"] = {"threads": torch.get_num_threads(), "torch": torch.__version__,
                         "cpu_count": os.cpu_count()}
    json.dump(result, sys.stdout, indent=2)
    print()
