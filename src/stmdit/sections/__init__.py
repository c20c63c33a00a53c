"""Whole-section virtual tissue: synthesis of every spot of a section (:mod:`.mosaic`) and the
files it is written to (:mod:`.export`)."""
