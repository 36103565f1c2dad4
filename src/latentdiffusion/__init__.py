"""latentdiffusion: a readable latent diffusion pipeline for MNIST-sized digits."""

__version__ = "0.1.0"
