"""The `ldm` command line (also `python -m latentdiffusion`)."""

from .main import main

__all__ = ["main"]
