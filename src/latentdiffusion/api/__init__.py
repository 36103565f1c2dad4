"""The Python API, the layer between the run directory and the command line: `Pipeline` (a
trained model to sample, encode, decode and score), `run` (the whole experiment) and `export`
(a self-contained folder of a run's models). The `ldm` commands build on these functions."""

from .experiment import run
from .exports import export
from .pipeline import Pipeline, Samples, sampling_request

__all__ = ["Pipeline", "Samples", "export", "run", "sampling_request"]
