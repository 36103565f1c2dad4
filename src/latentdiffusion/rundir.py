"""Where each stage of one run keeps its output, under the run directory R."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunDir:
    root: Path

    def model(self, name: str) -> Path:  # classifier | vae | diffusion
        return self.root / f"{name}.safetensors"

    @property
    def latents(self) -> Path:
        return self.root / "latents.safetensors"

    def state_dir(self, name: str) -> Path:
        return self.root / "checkpoints" / name

    def samples(self, name: str) -> Path:
        return self.root / "samples" / f"{name}.npz"

    def reference(self, classifier_hash: str) -> Path:
        return self.root / "cache" / f"reference-{classifier_hash[:16]}.npz"

    def class_reference(self, classifier_hash: str) -> Path:
        return self.root / "cache" / f"reference-classes-{classifier_hash[:16]}.npz"

    @property
    def figures(self) -> Path:
        return self.root / "figures"
