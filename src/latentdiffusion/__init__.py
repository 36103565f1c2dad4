"""latentdiffusion: a readable latent diffusion pipeline for small images (MNIST and the like).

The Python API: `Pipeline.load(path)` (a run directory or an export) to sample, encode, decode
and score, and `run(run_dir, data=...)`, the whole experiment as `ldm run` runs it.
"""

from .api import Pipeline, run
from .version import __version__

# `run` the function replaces `run` the sub-package as an attribute; the sub-package's modules
# import as always (`from latentdiffusion.run import checkpoint`).
__all__ = ["Pipeline", "__version__", "run"]
