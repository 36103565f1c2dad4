"""Helpers shared by the benchmark scripts (each prints one JSON object on stdout)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--data-dir", default=os.environ.get("LDM_DATA_DIR"),
                   help="MNIST directory (default $LDM_DATA_DIR)")
    p.add_argument("--run-dir", type=Path, default=Path("bench-out/default"))
    p.add_argument("--preset", default="default")
    p.add_argument("--threads", type=int, default=2,
                   help="torch CPU threads (2: the machine the docs measure on)")
    return p


def setup(args: argparse.Namespace) -> torch.device:
    torch.set_num_threads(args.threads)
    return torch.device("cpu")


def emit(result: dict) -> None:
    result["machine"] = {"threads": torch.get_num_threads(), "torch": torch.__version__,
                         "cpu_count": os.cpu_count()}
    json.dump(result, sys.stdout, indent=2)
    print()
