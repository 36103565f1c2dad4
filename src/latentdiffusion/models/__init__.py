"""Modules with weights: the FID classifier, the VAE and the denoising UNet."""

from .classifier import Classifier
from .unet import UNet
from .vae import VAE

__all__ = ["Classifier", "UNet", "VAE"]
