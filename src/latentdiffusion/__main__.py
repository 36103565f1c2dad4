"""`python -m latentdiffusion` (also what torchrun launches with -m)."""

import sys

from .cli import main

sys.exit(main())
