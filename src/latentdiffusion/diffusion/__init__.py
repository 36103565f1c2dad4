"""Diffusion math without weights: variance schedules, training objectives, the denoiser form,
guidance, the samplers and a sampling request."""

from .denoiser import Denoiser, VPDenoiser, noise_levels
from .objective import ObjectiveConfig, levels_only, make_objective
from .request import SamplingRequest
from .samplers import SAMPLERS, SamplerChoice, parse_sampler, sample
from .schedule import NoiseSchedule, ScheduleConfig

__all__ = ["SAMPLERS", "Denoiser", "NoiseSchedule", "ObjectiveConfig", "SamplerChoice",
           "SamplingRequest", "ScheduleConfig", "VPDenoiser", "levels_only", "make_objective",
           "noise_levels", "parse_sampler", "sample"]
