"""Stage keys: everything a stage's output depends on, as named parts and one digest.

A key is a flat dict of JSON values, e.g. {"schedule.kind": "cosine", "train.lr": 0.008,
"latents": "<sha256 of the latents file>"}, and the digest of that dict. Every key is built
here and nowhere else: `fit` stores it in each checkpoint and continues only a checkpoint with
the same digest, the stage stores it in its output file, `ldm run` compares it to decide what
to skip, and the named parts let a refusal say what changed.

How often a run saves or validates (`checkpoint_every`, `checkpoint_seconds`, `validate_every`)
is not part of a key: neither changes a trained number, so a run may resume with another
cadence. A config field added later is part of a key only when it is not its default (the
precision when not "fp32"), so the keys of runs made before it stay as they were.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from ..diffusion.denoiser import LADDERS
from ..diffusion.objective import ObjectiveConfig
from ..diffusion.schedule import ScheduleConfig
from ..models.unet import UNetConfig
from ..schema import config_hash, to_dict
from .config import Augment, LatentMode, LatentNorm, SamplingConfig, TrainConfig

NOT_IN_KEY = frozenset({"checkpoint_every", "checkpoint_seconds", "validate_every"})
LEFT_OUT_AT = {"precision": "fp32", "scale_equivariance": 0.0}  # field -> value left out
_HASH_LENGTH = 64  # a sha256 in hex; shortened when a message names it


@dataclass(frozen=True)
class StageKey:
    fields: dict[str, Any]  # flat: "<part>.<config field>" or "<part>" -> JSON value

    @classmethod
    def of(cls, **parts: Any) -> StageKey:
        """Configs (dataclasses) become "<part>.<field>" entries; other values stay as they are."""
        fields: dict[str, Any] = {}
        for name, part in parts.items():
            if dataclasses.is_dataclass(part):
                fields.update({f"{name}.{k}": v for k, v in to_dict(part).items()
                               if _in_key(k, v)})
            else:
                fields[name] = part
        return cls(json.loads(json.dumps(fields)))  # tuples -> lists, as a JSON header holds them

    @property
    def digest(self) -> str:
        return config_hash(self.fields)

    def changes_from(self, old_fields: dict[str, Any] | None) -> str:
        """'schedule.kind: cosine -> linear, ...': what differs from an older key's fields."""
        if not isinstance(old_fields, dict):
            return "made by an older latentdiffusion"
        names = sorted(set(old_fields) | set(self.fields))
        changed = [f"{name}: {_show(old_fields.get(name))} -> {_show(self.fields.get(name))}"
                   for name in names if old_fields.get(name) != self.fields.get(name)]
        return ", ".join(changed) or "same fields, another digest"


def _in_key(field: str, value: Any) -> bool:
    return field not in NOT_IN_KEY and not (field in LEFT_OUT_AT and LEFT_OUT_AT[field] == value)


def _show(value: Any) -> str:
    if value is None:
        return "(none)"
    if isinstance(value, str):
        return value[:12] if len(value) == _HASH_LENGTH else value
    return json.dumps(value)


def _augmented(augment: Augment) -> dict[str, Any]:
    """The augmentation as a key part only when there is one (other keys stay as they were)."""
    return {"augment": augment} if augment != "none" else {}


def model_key(model: Any, train: TrainConfig, data_hash: str,
              augment: Augment = "none") -> StageKey:
    """The classifier and the VAE: their configs, the content hash of the data set and the
    VAE's augmentation."""
    return StageKey.of(model=model, train=train, data=data_hash, **_augmented(augment))


def latents_key(vae_hash: str, mode: LatentMode, norm: LatentNorm, seed: int,
                augment: Augment = "none") -> StageKey:
    return StageKey.of(vae=vae_hash, mode=mode, norm=norm, seed=seed, **_augmented(augment))


def diffusion_key(unet: UNetConfig, schedule: ScheduleConfig, objective: ObjectiveConfig,
                  train: TrainConfig, latents_hash: str, train_limit: int = 0) -> StageKey:
    """With the limit on the training latents only when there is one (the keys of denoisers
    trained on all of them stay as they were)."""
    limit = {"train_limit": train_limit} if train_limit else {}
    return StageKey.of(model=unet, schedule=schedule, objective=objective, train=train,
                       latents=latents_hash, **limit)


def samples_key(vae_hash: str, diffusion_hash: str, sampling: SamplingConfig,
                eval_samples: int, objective: str = "vp", guide_hash: str | None = None
                ) -> StageKey:
    """With the samplers' rules (denoiser.LADDERS) when a sampler uses a ladder or the model is
    a flow model, whose D at t = 1 they set (so sets of VP timestep samplers keep their key),
    and with the guide when the sets are autoguided."""
    uses_rules = objective == "flow" or any(r.sampler.uses_ladder for r in sampling.requests)
    extra: dict[str, Any] = {"ladders": LADDERS} if uses_rules else {}
    if guide_hash is not None:
        extra["guide"] = guide_hash
    return StageKey.of(vae=vae_hash, diffusion=diffusion_hash, sampling=sampling,
                       eval_samples=eval_samples, **extra)


def evaluation_key(samples_digest: str, classifier_hash: str) -> StageKey:
    return StageKey.of(samples=samples_digest, classifier=classifier_hash)


def report_key(evaluation_digest: str, sweep: dict[str, Any] | None,
               guidance: dict[str, Any] | None = None) -> StageKey:
    """The report shows the evaluation and, when `ldm sweep` wrote them, the sweep and the
    guidance sweep."""
    if guidance is None:
        return StageKey.of(evaluation=evaluation_digest, sweep=config_hash(sweep))
    return StageKey.of(evaluation=evaluation_digest, sweep=config_hash(sweep),
                       guidance=config_hash(guidance))
