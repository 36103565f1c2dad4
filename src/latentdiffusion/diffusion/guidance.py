"""Classifier-free guidance (Ho & Salimans 2022) as a wrapper around any denoiser.

A class-conditional network trained with labels dropped to a null label y_0 some of the time is
both a conditional and an unconditional model. Guidance of scale s extrapolates from one to the
other in the denoiser form every sampler sees:
    D_s(x, sigma, y) = D(x, sigma, y_0) + s (D(x, sigma, y) - D(x, sigma, y_0))
s = 1 is the conditional model, s = 0 the unconditional one, s > 1 trades diversity for
samples the classifier agrees with. The two are evaluated in one doubled batch: rows [x; x]
with labels [y; y_0], split in two after the call. The samplers, `VPDenoiser` and
`FlowDenoiser` never see a label: the labels are bound to the network (`functools.partial`)
before the objective turns it into a denoiser.

Which label sample i asks for is a function of i alone (`labels_for`), so a labelled set, like
an unlabelled one, does not depend on the batch size or the number of processes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import UsageError
from .denoiser import Denoiser, Network

BALANCED = "balanced"


def listed_labels(spec: str) -> tuple[int, ...]:
    """The labels a spec lists: '7' -> (7,), '0,1,2' -> (0, 1, 2); '' and 'balanced' -> ().

    The form alone, for a config that does not know its classes yet: integers from 0 up."""
    if spec in ("", BALANCED):
        return ()
    try:
        labels = tuple(int(part) for part in spec.split(","))
    except ValueError:
        raise UsageError(f"labels: expected '{BALANCED}' or comma-separated class indices, "
                         f"got {spec!r}") from None
    negative = [y for y in labels if y < 0]
    if negative:
        raise UsageError(f"label {negative[0]} is not a class: classes count from 0")
    return labels


def parse_labels(spec: str, num_classes: int) -> tuple[int, ...]:
    """'7' -> (7,), '0,1,2' -> (0, 1, 2), 'balanced' -> (0, .., K - 1), '' -> () (no labels)."""
    if spec == BALANCED:
        return tuple(range(num_classes))
    labels = listed_labels(spec)
    outside = [y for y in labels if y >= num_classes]
    if outside:
        raise UsageError(f"label {outside[0]} is not a class of this model (0..{num_classes - 1})")
    return labels


def labels_for(spec: str, indices: list[int] | range, num_classes: int) -> list[int]:
    """The label sample i asks for: the spec's labels cycled over the sample index."""
    cycle = parse_labels(spec, num_classes)
    if not cycle:
        raise UsageError("no labels to sample")
    return [cycle[i % len(cycle)] for i in indices]


LabelledNetwork = Callable[..., torch.Tensor]  # (x_t, t, labels) -> prediction
MakeDenoiser = Callable[[Network], Denoiser]  # an objective's `denoiser`


def with_labels(network: LabelledNetwork, labels: torch.Tensor) -> Network:
    """The (x_t, t) network of the rows whose labels are `labels` (B,)."""
    return functools.partial(network, labels=labels)


def _twice(sigma: float | torch.Tensor) -> float | torch.Tensor:
    """A level for the doubled batch: a (B,) sigma becomes (2B,)."""
    if isinstance(sigma, torch.Tensor) and sigma.ndim == 1:
        return torch.cat([sigma, sigma])
    return sigma


class _BaseLevels:
    """A guided denoiser's levels and start: those of the denoiser it is built on (`base`)."""

    sigma_min: float
    sigma_max: float

    @property
    def base(self) -> Denoiser:
        raise NotImplementedError

    def __post_init__(self) -> None:
        self.sigma_min, self.sigma_max = self.base.sigma_min, self.base.sigma_max

    def prior(self, noise: torch.Tensor, sigma: float) -> torch.Tensor:
        return self.base.prior(noise, sigma)

    def timestep_sigmas(self, num_steps: int | None) -> torch.Tensor:
        return self.base.timestep_sigmas(num_steps)


@dataclass
class GuidedDenoiser(_BaseLevels):
    """D_uncond + s (D_cond - D_uncond) for a batch of B rows with fixed labels.

    `both` sees 2B rows, [x; x] with labels [y; null]. At s = 1 and s = 0 only the half that
    counts is evaluated (half the cost; exactly the conditional or unconditional denoiser).
    """

    conditional: Denoiser  # the B rows with their labels y
    unconditional: Denoiser  # the B rows with the null label
    both: Denoiser  # 2B rows: [y; null]
    scale: float

    @property
    def base(self) -> Denoiser:
        return self.conditional

    def __call__(self, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        if self.scale == 1.0:
            return self.conditional(x, sigma)
        if self.scale == 0.0:
            return self.unconditional(x, sigma)
        denoised = self.both(torch.cat([x, x]), _twice(sigma))  # (2B, C, H, W)
        conditional, unconditional = denoised.chunk(2)
        # lerp(a, b, s) = a + s (b - a); it returns b exactly at s = 1 and a at s = 0
        return torch.lerp(unconditional, conditional, self.scale)


def guided(make_denoiser: MakeDenoiser, network: LabelledNetwork, labels: torch.Tensor,
           null_label: int, scale: float) -> GuidedDenoiser:
    """The guided denoiser of a conditional network for the rows' `labels` (B,) long."""
    if scale < 0:
        raise UsageError(f"guidance scale must be >= 0, got {scale}")
    null = torch.full_like(labels, null_label)
    return GuidedDenoiser(make_denoiser(with_labels(network, labels)),
                          make_denoiser(with_labels(network, null)),
                          make_denoiser(with_labels(network, torch.cat([labels, null]))),
                          scale)


@dataclass
class AutoGuidedDenoiser(_BaseLevels):
    """Autoguidance (Karras et al. 2024): D_guide + s (D - D_guide), s >= 1.

    The guide is a weaker denoiser of the same process (config.GuideConfig): where the two
    differ, the strong one is more often right, and the step goes further its way. Both see the
    same rows and levels; the samplers see one denoiser (the strong one's levels and start).
    """

    denoiser: Denoiser
    guide: Denoiser
    scale: float

    @property
    def base(self) -> Denoiser:
        return self.denoiser

    def __call__(self, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        if self.scale == 1.0:
            return self.denoiser(x, sigma)
        return torch.lerp(self.guide(x, sigma), self.denoiser(x, sigma), self.scale)


def network_calls(model_calls: int, autoguidance: float) -> int:
    """The NFE of a sampler's `model_calls` denoiser calls: autoguided, each calls two networks."""
    return model_calls if autoguidance == 1.0 else 2 * model_calls
