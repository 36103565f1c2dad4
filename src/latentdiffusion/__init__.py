"""latentdiffusion: a readable latent diffusion pipeline for small images (MNIST and the like)."""

__version__ = "0.1.0"
