"""Diffusion math without weights: variance schedules, the forward process, samplers."""

from .objective import noise_predictor
from .samplers import ddim_sample, ddpm_sample, sample
from .schedule import NoiseSchedule

__all__ = ["NoiseSchedule", "ddim_sample", "ddpm_sample", "noise_predictor", "sample"]
