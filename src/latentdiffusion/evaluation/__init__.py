"""Scoring and showing samples: FID, KID and precision/recall in a feature network's space, FID
per class, the samples file, figures and the run report."""
