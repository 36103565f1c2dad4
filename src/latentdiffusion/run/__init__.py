"""One run directory and what makes it: the run config and presets, stage keys, checkpoints,
the training loop, the stages, generation, scoring, sweeps and the `ldm run` pipeline."""
