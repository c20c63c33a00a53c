"""Sampling defaults, in one place: the pipeline, the command line, ``evaluate``, ``section``,
``simulate``, training's sample grids and the web app all take these unless told otherwise.

Guidance scales follow PixCell's sampling (morphology 1.5); the GE scale of 2.0 is the
evaluation protocol's (``stmdit evaluate``'s guidance sweep draws the fidelity/realism trade-off
around it). Twenty DPM-Solver++ steps are PixCell's default.
"""

GUIDANCE_MORPH = 1.5
GUIDANCE_GE = 2.0
STEPS = 20
