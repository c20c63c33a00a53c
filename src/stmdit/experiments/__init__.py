"""Workflows on top of the pipeline: virtual perturbations, virtual sections, pseudo-labels."""
