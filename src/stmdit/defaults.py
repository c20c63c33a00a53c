"""Sampling defaults, in one place: the pipeline, the command line, ``evaluate``, ``section``,
``simulate``, training's sample grids and the web app all take these unless told otherwise.

Guidance scales follow PixCell's sampling (morphology 1.5); the GE scale of 2.0 is where the
her2st walkthrough's fidelity/realism curve (``stmdit evaluate``'s guidance sweep) is best on
both. Twenty steps are PixCell's default (DPM-Solver++ for latents; DDIM in pixel space, see
:func:`stmdit.diffusion.make_sampling_scheduler`).
"""

GUIDANCE_MORPH = 1.5
GUIDANCE_GE = 2.0
STEPS = 20
# How pixel-space DDIM bounds its x0 predictions to the data range [-1, 1] at each step
# (stmdit.diffusion.make_sampling_scheduler): "clip", or Imagen's "dynamic" thresholding.
X0_THRESHOLD = "clip"
