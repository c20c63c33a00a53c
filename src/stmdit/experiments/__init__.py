"""Workflows on top of the pipeline and the predictor (pseudo-labelling H&E-only slides, ...)."""
