"""Diffusion math without weights: variance schedules, the forward process, the denoiser form
and the samplers."""

from .denoiser import Denoiser, VPDenoiser, noise_levels
from .samplers import SAMPLERS, model_calls, parse_sampler, sample
from .schedule import NoiseSchedule

__all__ = ["SAMPLERS", "Denoiser", "NoiseSchedule", "VPDenoiser", "model_calls", "noise_levels",
           "parse_sampler", "sample"]
