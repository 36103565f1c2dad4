"""A sampling request: the sampler and its steps and options, the labels asked for and the
guidance, parsed once where it enters (the command line or the run config) and passed down as
this value to the code that builds the denoiser and runs the sampler."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import UsageError
from .denoiser import Denoiser
from .guidance import UNGUIDED, Guidance, labels_for, listed_labels, parse_labels
from .samplers import SamplerChoice

# Both halves named: a preset's autoguidance is not the user's, their labels may be.
NOT_WITH_LABELS = ("labels ask for a class-conditional model (--conditional, which turns "
                   "autoguidance off), and autoguidance is for unconditional sampling; a "
                   "conditional model has classifier-free guidance (--guidance)")


@dataclass(frozen=True)
class SamplingRequest:
    sampler: SamplerChoice
    # '' (none), 'balanced' (sample i asks for class i mod K), '7' or '0,1,2' (cycled over the
    # sample index); the form is checked here, the classes against the model (`check_classes`)
    labels: str = ""
    guidance: Guidance = UNGUIDED

    def __post_init__(self) -> None:
        listed_labels(self.labels)
        if self.guidance.reference == "unconditional" and self.guidance.active \
                and not self.labels:
            raise UsageError("guidance needs labels to guide towards (--labels)")
        if self.guidance.by_guide and self.labels:
            raise UsageError(NOT_WITH_LABELS)

    @classmethod
    def of(cls, spec: str, *, variance: str = "beta_tilde", eta: float = 0.0, labels: str = "",
           guidance: float = 1.0, autoguidance: float = 1.0) -> SamplingRequest:
        """From the options as the command line and the run config name them: one guidance
        scale of each kind: classifier-free with labels, else autoguidance."""
        if autoguidance != 1.0 and labels:
            raise UsageError(NOT_WITH_LABELS)
        classifier_free = labels or guidance != 1.0
        scale = Guidance(guidance) if classifier_free else Guidance(autoguidance, "guide")
        return cls(SamplerChoice(spec, variance, eta), labels, scale)  # type: ignore[arg-type]

    @property
    def spec(self) -> str:
        return self.sampler.spec

    def check_classes(self, num_classes: int) -> None:
        """UsageError unless every label asked for is a class of a model with `num_classes`."""
        if self.labels:
            parse_labels(self.labels, num_classes)

    def labels_of(self, indices: list[int] | range, num_classes: int) -> np.ndarray | None:
        """(N,) int64 label of each sample index (a function of the index alone), or None."""
        if not self.labels:
            return None
        return np.asarray(labels_for(self.labels, indices, num_classes), dtype=np.int64)

    def nfe(self, levels: Denoiser) -> int:
        """Network evaluations of one run on a denoiser with these levels (no weights are read:
        objective.levels_only will do); a guide's calls count too."""
        return self.guidance.network_calls(self.sampler.model_calls(levels))

    def describe(self) -> str:
        """How it is guided, for a set's name: ", balanced, guidance 2", ", autoguidance 1.5"."""
        if self.labels:
            return f", {self.labels}, guidance {self.guidance.scale:g}"
        return f", autoguidance {self.guidance.scale:g}" if self.guidance.by_guide else ""

    def record(self, nfe: int) -> dict[str, str | int | float]:
        """What a samples file says of how it was made: the sampler, its NFE and the scale."""
        made: dict[str, str | int | float] = {"sampler": self.spec, "nfe": nfe}
        if self.labels:
            made["guidance"] = self.guidance.scale
        if self.guidance.by_guide:
            made["autoguidance"] = self.guidance.scale
        return made
