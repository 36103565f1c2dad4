"""Guidance as one wrapper around any denoiser: D_s = D_ref + s (D - D_ref) (EDM2's
`denoise()`), where the reference D_ref is one of two models.

- Classifier-free guidance (Ho & Salimans 2022): a class-conditional network trained with labels
  dropped to a null label y_0 some of the time is both D(x, sigma, y) and D_ref = D(x, sigma, y_0).
  s = 1 is the conditional model, s = 0 the unconditional one, s > 1 trades diversity for
  samples the classifier agrees with. The two are evaluated in one doubled batch.
- Autoguidance (Karras et al. 2024): D_ref is a smaller denoiser of the same process trained for
  fewer steps (the run's guide). Where the two differ, the strong one is more often right, and
  the step goes further its way; it needs no labels.
The samplers, `VPDenoiser` and `FlowDenoiser` never see a label: the labels are bound to the
network (`functools.partial`) before the objective turns it into a denoiser.

Which label sample i asks for is a function of i alone (`labels_for`), so a labelled set, like
an unlabelled one, does not depend on the batch size or the number of processes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from ..errors import UsageError
from ..schema import parse_number
from .denoiser import Denoiser, Network

BALANCED = "balanced"


def listed_labels(spec: str) -> tuple[int, ...]:
    """The labels a spec lists: '7' -> (7,), '0,1,2' -> (0, 1, 2); '' and 'balanced' -> ().

    The form alone, for a config that does not know its classes yet: integers from 0 up."""
    if spec in ("", BALANCED):
        return ()
    try:
        labels = tuple(parse_number(part, int) for part in spec.split(","))
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
Reference = Literal["unconditional", "guide"]


@dataclass(frozen=True)
class Guidance:
    """A guidance scale s and what D is pushed away from: the same network at the null label
    (classifier-free) or the run's small guide (autoguidance). s = 1 is D alone: off."""

    scale: float = 1.0
    reference: Reference = "unconditional"

    @property
    def active(self) -> bool:
        return self.scale != 1.0

    @property
    def by_guide(self) -> bool:
        """Whether sampling needs the run's guide model."""
        return self.active and self.reference == "guide"

    def network_calls(self, model_calls: int) -> int:
        """The NFE of `model_calls` guided steps: a guide is a second network each step (the
        classifier-free reference is the same network, in the same doubled batch)."""
        return 2 * model_calls if self.by_guide else model_calls


UNGUIDED = Guidance()


def with_labels(network: LabelledNetwork, labels: torch.Tensor) -> Network:
    """The (x_t, t) network of the rows whose labels are `labels` (B,)."""
    return functools.partial(network, labels=labels)


def _twice(sigma: float | torch.Tensor) -> float | torch.Tensor:
    """A level for the doubled batch: a (B,) sigma becomes (2B,)."""
    if isinstance(sigma, torch.Tensor) and sigma.ndim == 1:
        return torch.cat([sigma, sigma])
    return sigma


@dataclass
class GuidedDenoiser:
    """D_s(x, sigma) = D_ref(x, sigma) + s (D(x, sigma) - D_ref(x, sigma)), EDM2's `denoise()`.

    Its levels and start are D's. At s = 1 it is exactly D, at s = 0 exactly D_ref, each with
    one call. `both`, when given, evaluates D and D_ref of one network in one doubled batch:
    rows [x; x] with labels [y; null] (classifier-free guidance), split in two after the call.
    """

    denoiser: Denoiser  # D
    reference: Denoiser  # D_ref
    scale: float
    both: Denoiser | None = None  # 2B rows: [D's; D_ref's]

    def __post_init__(self) -> None:
        self.sigma_min, self.sigma_max = self.denoiser.sigma_min, self.denoiser.sigma_max

    def __call__(self, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        if self.scale == 1.0:
            return self.denoiser(x, sigma)
        if self.scale == 0.0:
            return self.reference(x, sigma)
        if self.both is not None:
            denoised, reference = self.both(torch.cat([x, x]), _twice(sigma)).chunk(2)
        else:
            denoised, reference = self.denoiser(x, sigma), self.reference(x, sigma)
        # lerp(a, b, s) = a + s (b - a); it returns b exactly at s = 1 and a at s = 0
        return torch.lerp(reference, denoised, self.scale)

    def prior(self, noise: torch.Tensor, sigma: float) -> torch.Tensor:
        return self.denoiser.prior(noise, sigma)

    def timestep_sigmas(self, num_steps: int | None) -> torch.Tensor:
        return self.denoiser.timestep_sigmas(num_steps)


def guided(make_denoiser: MakeDenoiser, network: LabelledNetwork,
                    labels: torch.Tensor, null_label: int, scale: float) -> GuidedDenoiser:
    """The guided denoiser of a conditional network for the rows' `labels` (B,) long: D at y,
    D_ref at the null label."""
    null = torch.full_like(labels, null_label)
    return GuidedDenoiser(make_denoiser(with_labels(network, labels)),
                          make_denoiser(with_labels(network, null)), scale,
                          both=make_denoiser(with_labels(network, torch.cat([labels, null]))))
