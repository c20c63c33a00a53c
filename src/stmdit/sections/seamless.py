"""Seamless virtual sections: overlapping windows denoised jointly (MultiDiffusion).

:mod:`stmdit.sections.mosaic` pastes one independent tile per spot, so neighbouring tiles
share nothing but a cross-fade: a gland that reaches the edge of one tile does not continue
into the next. Here the model's tile-sized windows tile a larger canvas with overlap and are
denoised *together* (MultiDiffusion, Bar-Tal et al. 2023): at every sampling step each
window's guided model output is predicted, the overlapping predictions are fused into one
canvas-sized output (a weighted mean per pixel), and ONE scheduler step updates the whole
canvas. Every overlap pixel is thus pulled towards agreement by all windows that see it, at
every step, so structure continues across window borders instead of being blended afterwards.

Pieces:

* :func:`window_grid`: window corners covering the canvas exactly, the last row and column
  flush with its edges.
* :func:`grid_offsets`: shifted windows. A fixed grid averages several windows' predictions
  in its overlaps, at the same places every step, so detail is smoothed there and sharp at the
  window centres: a grid of soft seams at the stride. Moving the grid from step to step
  (SpotDiffusion, DemoFusion's shifted windows) spreads that evenly: :func:`window_grid` with
  an ``offset`` per phase, :func:`denoise_canvas` with one grid (conditions, GE mask) per
  phase, step ``k`` in phase ``k % phases``. Each grid covers the whole canvas (windows flush
  with the edges fill what the move uncovers), so pad the canvas (a stride each side) and give
  ``origin`` to keep the noise of the region of interest (:mod:`stmdit.sections.synthesis`).
* :func:`patch_phase_grid`: a trained DiT's prediction shows its patch grid (edges at patch
  borders; the walkthrough's model: 1.5x the edge energy there). The patch grid starts afresh
  in every window, so on a canvas it repeats at the stride, where one grid's windows begin, and
  the last steps' grids leave it in the image. Fusing a step from the union of ``patch`` copies
  of its grid moved diagonally by 0 .. patch - 1 pixels averages every patch phase at every
  pixel, which evens the patch grid out (``phase_order`` of :func:`denoise_canvas` says which
  steps; :mod:`stmdit.sections.synthesis` does it for the last quarter).
* :func:`position_noise`: the initial noise depends only on ``(seed, absolute position)``:
  fixed blocks, each from its own generator, cropped. A rerun, another window batch size or a
  sub-region reproduces the same noise.
* :func:`interpolate_expression`: each window's GE condition is the expression at its centre,
  a Gaussian-kernel mean of the spots' **log1p CP10k** values (the scale the panel encoder
  normalises to; :func:`stmdit.encoders.expression.log1p_cp10k` makes it from counts).
  :func:`expression_for_encoder` turns the result back into pseudo-counts with a declared
  library size, so ``pipe.encode_expression`` reproduces exactly the interpolated log1p CP10k
  (CancerFoundation bins ranks per spot, which the monotone round trip preserves). Use a
  bandwidth tied to the spot pitch (:func:`pitch_um`; ``pitch / 2`` is a good default).
  Centres with no spot within ``radius`` bandwidths are masked: pass the mask as
  ``ge_available`` to :func:`denoise_canvas` and those windows are guided without GE (null GE
  embedding, morphology or unconditional guidance only), or leave them out of ``corners``.
* :func:`denoise_canvas`: the joint loop. It works in the model's own space, whatever
  :func:`stmdit.diffusion.sample` denoises: pixels for pixel-space models; latents for latent
  models, which it returns undecoded (decoding a large latent canvas, in windows, is left to
  the caller). Guidance is the project's own :func:`~stmdit.diffusion.guided_prediction`
  (learned-variance channels are dropped there, as in ``sample``). With ``known`` and
  ``keep`` it imposes a known canvas where ``keep`` is 1 (RePaint, Lugmayr et al. 2022): after
  every step the state is blended with the known canvas noised to the step's timestep with the
  same initial noise, and after the last step with the known canvas itself (region edits,
  :mod:`stmdit.sections.edits`).

Schedulers on a canvas-shaped state: DPM-Solver++ keeps its history in canvas-shaped tensors
and is otherwise elementwise. DDIM with x0 clipped to [-1, 1] is elementwise too; it is
stepped with ``clip_sample`` (the same clamp) instead of diffusers' thresholding, whose
``torch.quantile`` refuses more than 2**24 elements. Dynamic thresholding takes its percentile
over the whole canvas rather than per tile, so it is refused (not equivalent to tile sampling).

Memory: by default the canvas state, one numerator, the weights, the noise (and ``known`` and
``keep``) and the scheduler's history live in memory, a few canvases of float32 on the model's
device, so memory grows with the section. With ``workdir`` :func:`denoise_canvas` runs out of
core (:mod:`stmdit.sections.canvas`): state, history and imposition inputs live in zarr arrays
in that folder, and each step takes the windows in row order, holding only a strip of rows:
those the current batch of windows touches plus the rolling numerator of rows not yet final
(about a window's height plus what one batch spans, rounded to 64-row chunks). A row gets the
scheduler update as soon as no remaining window covers it. Memory then grows with the canvas
*width*, not its height (a very wide section is best turned on its side), plus the per-window
conditions, which stay in memory. The result is the in-memory one to float rounding (the
same windows, batches and elementwise updates; tests pin it). Each step writes the other of
two state buffers and then records its completion atomically, so a killed run rerun with the
same folder and settings resumes after the last completed step and gives the same canvas;
other settings (seed, steps, windows, conditions, guidance, scheduler, weights, inputs) in
the same folder start over, replacing what it held. :func:`decode_canvas` turns such a
canvas into uint8 pixels in a zarr array, band by band as well.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from typing import NamedTuple

import anndata as ad
import numpy as np
import pandas as pd
import torch
from diffusers import DDIMScheduler
from scipy.spatial import cKDTree

from stmdit import defaults
from stmdit.diffusion import Condition, guided_prediction, noise_level, x0_threshold_of
from stmdit.encoders.vae import decode_latents, vae_scale
from stmdit.io import writing
from stmdit.precision import current_default
from stmdit.sections.canvas import (
    BandStepper,
    CanvasWorkdir,
    DiskCanvas,
    RowBuffer,
    chunk_end,
    create_array,
    history_length,
    input_digest,
    ready_rows,
    row_chunks,
    tensors_digest,
    uncovered_row,
)
from stmdit.sections.metrics import pitch_um
from stmdit.sections.mosaic import blend_window
from stmdit.tiles import to_uint8

__all__ = [
    "DiskCanvas",
    "decode_canvas",
    "denoise_canvas",
    "expression_for_encoder",
    "grid_offsets",
    "interpolate_expression",
    "patch_phase_grid",
    "pitch_um",
    "position_noise",
    "window_grid",
    "window_schedule",
]

NOISE_BLOCK = 64  # canvas pixels (or latents) per side of one noise block
WEIGHTS = ("cosine", "uniform")


# -- geometry and noise ---------------------------------------------------------------------------------


def window_grid(
    height: int, width: int, window: int, stride: int, offset: tuple[int, int] = (0, 0)
) -> list[tuple[int, int]]:
    """Top-left corners ``(y0, x0)`` of ``window``-sized windows every ``stride`` pixels,
    row-major, plus a last row and column flush with the canvas edge, so every pixel is covered.

    ``offset`` ``(dy, dx)`` (>= 0) moves the grid: its rows start at ``dy + k * stride`` (its
    columns at ``dx + k * stride``), with a first row (column) flush with the top (left) edge
    where the move uncovered it. ``(0, 0)``: the unmoved grid."""
    if window < 1 or not 1 <= stride <= window:
        raise ValueError(f"need window >= 1 and 1 <= stride <= window; got window {window}, stride {stride}")
    if height < window or width < window:
        raise ValueError(f"the canvas ({height} x {width}) is smaller than one window ({window} x {window})")
    if min(offset) < 0:
        raise ValueError(f"the grid offset must be >= 0; got {tuple(offset)}")

    def starts(n: int, d: int) -> list[int]:
        return sorted({0, *range(int(d), n - window + 1, stride), n - window})

    return [(y, x) for y in starts(height, offset[0]) for x in starts(width, offset[1])]


def grid_offsets(stride: int, count: int = 8) -> list[tuple[int, int]]:
    """``count`` grid offsets ``(dy, dx)`` in ``[0, stride)``, one per denoising step in turn
    (shifted windows, :func:`denoise_canvas` with a list of grids): the first ``count`` points
    of the unscrambled 2-D Sobol sequence scaled by ``stride`` (floored). For a power of two
    ``count`` each axis's offsets are spread evenly over the stride (one in each
    ``stride / count`` interval), also over every aligned run of half, a quarter ... of the
    steps, so the window overlaps fall on every part of the stride in turn. The first is
    ``(0, 0)``, the unmoved grid."""
    from scipy.stats import qmc

    if stride < 1 or count < 1 or count & (count - 1):
        raise ValueError(f"need stride >= 1 and a power of two count; got stride {stride}, count {count}")
    points = qmc.Sobol(d=2, scramble=False).random(count)
    return [(int(dy), int(dx)) for dy, dx in np.floor(points * stride).astype(int)]


def patch_phase_grid(
    height: int, width: int, window: int, stride: int, offset: tuple[int, int], patch: int
) -> list[tuple[int, int]]:
    """The union of the :func:`window_grid` s moved by ``offset + (j, j)`` (modulo ``stride``)
    for ``j = 0 .. patch - 1``, row-major without repeats: together their windows begin at every
    phase of the patch grid on both axes, so a pixel's fused prediction averages all ``patch``
    positions within a patch instead of one (the module docstring). ``patch = 1``: the grid."""
    if patch < 1:
        raise ValueError(f"the patch size must be >= 1; got {patch}")
    moved = (((offset[0] + j) % stride, (offset[1] + j) % stride) for j in range(patch))
    return sorted({corner for o in moved for corner in window_grid(height, width, window, stride, o)})


def window_schedule(
    height: int,
    width: int,
    window: int,
    stride: int,
    offsets: Sequence[tuple[int, int]],
    patch: int,
    steps: int,
    patch_phase_steps: int,
) -> tuple[list[list[tuple[int, int]]], list[int]]:
    """Shifted windows for ``steps`` steps: ``(grids, order)``, :func:`denoise_canvas`'s
    ``corners`` and ``phase_order``. Step ``k`` is denoised in the grid moved by
    ``offsets[k % len(offsets)]``, the last ``patch_phase_steps`` steps in that offset's
    :func:`patch_phase_grid`; ``grids`` holds each grid used once."""
    if not 0 <= patch_phase_steps <= steps:
        raise ValueError(f"patch_phase_steps must be in [0, steps ({steps})]; got {patch_phase_steps}")
    grids = [window_grid(height, width, window, stride, offset) for offset in offsets]
    unions: dict[int, int] = {}  # offset index -> the index of its patch-phase grid in grids
    order = []
    for k in range(steps):
        i = k % len(offsets)
        if k >= steps - patch_phase_steps:
            if i not in unions:
                unions[i] = len(grids)
                grids.append(patch_phase_grid(height, width, window, stride, offsets[i], patch))
            i = unions[i]
        order.append(i)
    return grids, order


def _block_generator(seed: int, row: int, col: int) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{row}:{col}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def position_noise(
    seed: int, y0: int, x0: int, h: int, w: int, channels: int, block: int = NOISE_BLOCK
) -> torch.Tensor:
    """Standard normal noise (channels, h, w) for the canvas region at ``(y0, x0)``: the canvas
    is cut into ``block``-sized blocks, block ``(r, c)`` drawn from a generator seeded by a hash
    of ``(seed, r, c)``, and the region is cropped from them. It depends only on the seed, the
    absolute position, ``channels`` and ``block``."""
    out = torch.empty(channels, h, w)
    for r in range(y0 // block, (y0 + h - 1) // block + 1):
        for c in range(x0 // block, (x0 + w - 1) // block + 1):
            noise = torch.randn((channels, block, block), generator=_block_generator(seed, r, c))
            ya, yb = max(y0, r * block), min(y0 + h, (r + 1) * block)
            xa, xb = max(x0, c * block), min(x0 + w, (c + 1) * block)
            out[:, ya - y0 : yb - y0, xa - x0 : xb - x0] = noise[
                :, ya - r * block : yb - r * block, xa - c * block : xb - c * block
            ]
    return out


# -- expression at window centres ---------------------------------------------------------------------


def interpolate_expression(
    spot_xy: np.ndarray,
    spot_expression: np.ndarray,
    centres_xy: np.ndarray,
    bandwidth: float,
    radius: float = 3.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Expression at ``centres_xy`` (M, 2): the mean of the spots' normalised expression
    (N, G; log1p CP10k) weighted by ``exp(-d^2 / (2 bandwidth^2))``, over the spots within
    ``radius * bandwidth``. Positions share one unit (e.g. microns).

    Returns ``(values (M, G) float32, mask (M,) bool)``; a centre with no spot in range is
    False in the mask and zero in ``values`` (give it no GE condition, see the module docstring).
    """
    if bandwidth <= 0:
        raise ValueError(f"bandwidth must be > 0; got {bandwidth}")
    spot_xy, centres_xy = np.asarray(spot_xy, float), np.asarray(centres_xy, float)
    spot_expression = np.asarray(spot_expression, np.float64)
    if len(spot_xy) != len(spot_expression):
        raise ValueError(f"{len(spot_xy)} spot positions but {len(spot_expression)} expression rows")
    values = np.zeros((len(centres_xy), spot_expression.shape[1]), np.float32)
    mask = np.zeros(len(centres_xy), bool)
    neighbours = cKDTree(spot_xy).query_ball_point(centres_xy, r=radius * bandwidth)
    for i, near in enumerate(neighbours):
        if not near:
            continue
        d2 = ((spot_xy[near] - centres_xy[i]) ** 2).sum(axis=1)
        weights = np.exp(-d2 / (2 * bandwidth**2))
        values[i] = weights @ spot_expression[near] / weights.sum()
        mask[i] = True
    return values, mask


def expression_for_encoder(
    log_expression: np.ndarray, genes: Sequence[str], target_sum: float = 1e4
) -> ad.AnnData:
    """Interpolated log1p CP10k (M, G) -> pseudo-counts ``expm1`` with ``obs['library_size']
    = target_sum``, which the GE encoders normalise back to exactly the given values."""
    x = np.expm1(np.asarray(log_expression, np.float64)).clip(min=0).astype(np.float32)
    obs = pd.DataFrame({"library_size": np.full(len(x), float(target_sum))})
    obs.index = obs.index.astype(str)
    return ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=[str(g) for g in genes]))


# -- joint denoising ------------------------------------------------------------------------------------


def _canvas_scheduler(scheduler):
    """The scheduler to step a canvas with: DDIM's clip-to-[-1, 1] as ``clip_sample`` (the
    same clamp, without a quantile over the canvas); dynamic thresholding is refused."""
    threshold = x0_threshold_of(scheduler)
    if threshold is None:
        return scheduler
    if threshold == "dynamic" or not isinstance(scheduler, DDIMScheduler):
        raise ValueError(
            "this pipeline's sampler uses dynamic x0 thresholding, whose percentile is taken per image; "
            "over a canvas it would not be per tile. Sample sections with a clipping sampler: "
            "make_sampling_scheduler(pipe.scheduler, pixel_space=True, x0_threshold='clip')"
        )
    return DDIMScheduler.from_config(
        scheduler.config, thresholding=False, clip_sample=True, clip_sample_range=1.0
    )


def _window_weight(window: int, weights: str) -> torch.Tensor:
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}; got {weights!r}")
    # A full raised cosine (feather 0.5): largest in the middle, > 0 everywhere.
    w = blend_window(window, 0.5 if weights == "cosine" else 0.0)
    return torch.from_numpy(np.outer(w, w)).float()


def _window_predictions(
    model, batch, corners, window, source, top, t, cond, ge_available, guidance_m, guidance_g, precision
):
    """``(window index, guided prediction in float32)`` for the windows ``batch``, cropped from
    ``source`` (1, C, rows, W): the model input from canvas row ``top`` down."""
    # Windows with and without GE need different guidance branches: predict them apart.
    for with_ge in (True, False):
        rows = [i for i in batch if ge_available[i] == with_ge]
        if not rows:
            continue
        crops = torch.stack(
            [source[0, :, y - top : y - top + window, x : x + window] for y, x in (corners[i] for i in rows)]
        )
        row_cond = cond.rows(rows).to(crops.device, crops.dtype)
        row_cond = row_cond if with_ge else row_cond.without_ge()
        pred = guided_prediction(model, crops, t, row_cond, guidance_m, guidance_g, precision).float()
        yield from zip(rows, pred, strict=True)


def _row_batches(corners, batch_size: int, height: int) -> tuple[list[list[int]], list[int]]:
    """The windows in row-major order in batches, and for each batch the row above which the
    canvas is final once it is summed: the top of the next batch's first window (windows come
    in row order, so none after it reaches higher), the canvas height after the last."""
    order = sorted(range(len(corners)), key=lambda i: corners[i])
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    return batches, [corners[b[0]][0] for b in batches[1:]] + [height]


def _guidance_ge(scheduler, t, guidance_scale_ge, guidance_ge_interval) -> float:
    if guidance_ge_interval is not None and not (
        guidance_ge_interval[0] < noise_level(scheduler, t) <= guidance_ge_interval[1]
    ):
        return 1.0
    return guidance_scale_ge


@torch.no_grad()
def denoise_canvas(
    pipe,
    height: int,
    width: int,
    window_conditions: Condition | Sequence[Condition],
    corners: Sequence[tuple[int, int]] | Sequence[Sequence[tuple[int, int]]],
    *,
    seed: int,
    num_inference_steps: int = defaults.STEPS,
    guidance_scale_morphology: float = defaults.GUIDANCE_MORPH,
    guidance_scale_ge: float = defaults.GUIDANCE_GE,
    ge_available: Sequence[bool] | Sequence[Sequence[bool] | None] | None = None,
    guidance_ge_interval: tuple[float, float] | None = None,
    batch_size: int = 8,
    weights: str = "cosine",
    noise: torch.Tensor | None = None,
    precision: str | None = None,
    progress: bool = True,
    known: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
    workdir: str | os.PathLike | None = None,
    on_step: Callable[[int, int], None] | None = None,
    origin: tuple[int, int] = (0, 0),
    phase_order: Sequence[int] | None = None,
) -> torch.Tensor | DiskCanvas:
    """Denoise a (height, width) canvas of the model's space jointly from its windows.

    ``corners``: the windows' top-left corners (:func:`window_grid`), each ``sample_size`` of
    the transformer on a side; together they must cover the canvas. ``window_conditions``:
    one row per window (morphology and/or GE inputs, as :class:`~stmdit.diffusion.Condition`),
    or an empty Condition for unconditional sampling. ``ge_available`` (one bool per window,
    e.g. the mask of :func:`interpolate_expression`): windows marked False are guided without
    their GE row. ``noise``: the initial noise (C, height, width); default
    :func:`position_noise` of ``seed``. ``weights``: ``"cosine"`` (raised cosine, never zero)
    or ``"uniform"`` fusion weights. ``guidance_ge_interval``, ``precision``: as in
    :func:`~stmdit.diffusion.sample`. Windows are predicted ``batch_size`` at a time; the
    result does not depend on it. ``known`` (C, height, width, the model's space) and ``keep``
    (height, width, in [0, 1]; 1: impose ``known``, 0: free, between: a transition band), given
    together: after each step to timestep ``t_prev`` the state becomes ``keep *
    add_noise(known, noise, t_prev) + (1 - keep) * state`` (the same initial ``noise``, so the
    imposed part is what a run towards ``known`` would see), after the last step ``keep * known
    + (1 - keep) * state``; without them nothing is imposed. ``on_step(steps_done,
    total_steps)`` is called after every completed step. Returns the canvas (C, height,
    width) in the weights' dtype: pixels in [-1, 1] for pixel-space models, undecoded latents
    otherwise.

    Shifted windows (a grid that moves from step to step, so that the overlaps, where several
    windows' predictions are averaged, fall elsewhere at every step instead of smoothing the
    same places every time): give ``window_conditions`` as a list of Conditions, one per
    *phase*, ``corners`` as a list of as many grids (e.g. :func:`window_grid` with each of
    :func:`grid_offsets`) and ``ge_available`` as None or a list of as many masks (each None or
    one bool per window of its grid). Step ``k`` is denoised from phase ``k % len(corners)``:
    its windows, their condition rows and GE mask; ``phase_order`` (one phase index per step)
    chooses the phase of each step instead, e.g. to fuse the last steps from
    :func:`patch_phase_grid` s. Every phase's windows must lie inside the canvas and cover it.
    ``origin`` ``(y, x)``: where the canvas' top-left pixel lies in the
    absolute positions of :func:`position_noise` (default noise only), e.g. ``(-pad, -pad)``
    for a canvas padded by ``pad`` on each side, so that the pixels of the unpadded region get
    the noise they have without the padding.

    ``workdir`` (a folder, created if missing): run out of core (module docstring, "Memory")
    and return a :class:`~stmdit.sections.canvas.DiskCanvas` (the float32 canvas in a zarr array
    there) instead of a tensor. ``noise``, ``known`` and ``keep`` may then also be numpy or
    zarr arrays; they are copied into the folder in row bands. A rerun with the same folder and
    settings resumes after the last completed step (a finished run returns at once, calling
    ``on_step`` no more); with other settings it starts over. The settings are everything the
    result depends on: the arguments but ``batch_size``, ``progress`` and ``on_step``, digests
    of the conditions, of ``noise``, ``known`` and ``keep``, and of the model's weights (one pass
    over them per call). Windows are then taken in row-major order (:func:`window_grid`'s);
    DDIM and deterministic DPM-Solver++ are supported.
    """
    model = pipe.transformer
    cfg = model.config
    window, channels = cfg.sample_size, cfg.in_channels
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    phases = _phases(window_conditions, corners, ge_available, window, height, width)
    order = _phase_order(phase_order, len(phases), num_inference_steps)
    origin = (int(origin[0]), int(origin[1]))
    shape = (channels, height, width)
    _check_shapes(noise, known, keep, shape)
    precision = precision or current_default()
    scheduler = _canvas_scheduler(pipe.scheduler)
    weight = _window_weight(window, weights)
    guidance = (guidance_scale_morphology, guidance_scale_ge, guidance_ge_interval)
    if workdir is not None:
        # Public keys only: "_use_default_values" differs between a built and a loaded scheduler.
        config = {k: v for k, v in scheduler.config.items() if not k.startswith("_")}
        # One grid: the settings of a fixed grid as they always were (its work folders resume).
        per_phase = (lambda f: f(phases[0])) if len(phases) == 1 else (lambda f: [f(p) for p in phases])
        settings = {
            "canvas": list(shape), "window": window, "corners": per_phase(lambda p: p.corners),
            "seed": int(seed), "steps": int(num_inference_steps), "guidance": guidance,
            "ge_available": per_phase(lambda p: p.ge_available.tolist()), "weights": weights,
            "precision": precision, "dtype": str(next(model.parameters()).dtype),
            "scheduler": [type(scheduler).__name__, config],
            "conditions": per_phase(lambda p: tensors_digest(p.cond.model_kwargs())),
        }  # fmt: skip
        if origin != (0, 0):
            settings["origin"] = list(origin)
        if phase_order is not None:
            settings["phase_order"] = order
        inputs = {k: v for k, v in (("noise", noise), ("known", known), ("keep", keep)) if v is not None}
        return _denoise_in_bands(
            pipe, scheduler, shape, phases, order, weight, workdir, settings, inputs, origin, progress=progress,
            on_step=on_step, batch_size=batch_size,
        )  # fmt: skip

    denominators = []
    for phase in phases:
        denominator = torch.zeros(height, width)
        for y, x0 in phase.corners:
            denominator[y : y + window, x0 : x0 + window] += weight
        if (denominator == 0).any():
            raise ValueError("the windows leave part of the canvas uncovered; use window_grid")
        denominators.append(denominator)

    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    denominators = [d.to(device) for d in denominators]
    weight = weight.to(device)
    conds = [phase.cond.to(device, dtype) for phase in phases]
    scheduler.set_timesteps(num_inference_steps, device=device)
    if noise is None:
        noise = position_noise(seed, *origin, height, width, channels)
    known, keep = _imposition(known, keep, device, dtype)
    initial = noise[None].to(device, dtype)
    x = initial * scheduler.init_noise_sigma

    steps = scheduler.timesteps
    for step, t in enumerate(pipe.progress_bar(steps) if progress else steps):
        x_in = scheduler.scale_model_input(x, t)
        s_g = _guidance_ge(scheduler, t, guidance_scale_ge, guidance_ge_interval)
        k = order[step]
        corners, cond, ge_available = phases[k].corners, conds[k], phases[k].ge_available
        numerator = torch.zeros(channels, height, width, device=device)
        for start in range(0, len(corners), batch_size):
            batch = range(start, min(start + batch_size, len(corners)))
            for i, pred in _window_predictions(
                model, batch, corners, window, x_in, 0, t, cond, ge_available, guidance_scale_morphology,
                s_g, precision,
            ):  # fmt: skip
                y, x0 = corners[i]
                numerator[:, y : y + window, x0 : x0 + window] += pred * weight
        fused = (numerator / denominators[k])[None].to(dtype)
        x = scheduler.step(fused, t, x).prev_sample
        if known is not None:
            last = step == len(steps) - 1
            target = known if last else _noised(scheduler, known, initial, steps, step)
            x = keep * target + (1 - keep) * x
        if on_step is not None:
            on_step(step + 1, len(steps))
    return x[0]


def _denoise_in_bands(
    pipe, scheduler, shape, phases, order, weight, workdir, settings, inputs, origin, *, progress, on_step,
    batch_size,
) -> DiskCanvas:  # fmt: skip
    """:func:`denoise_canvas` out of core (module docstring, "Memory"); arguments checked there.
    Each step takes its phase's windows in row order: which rows are final when is worked out
    per phase (the steps are independent passes over the canvas, state to state)."""
    model = pipe.transformer
    channels, height, width = shape
    window = weight.shape[0]
    for phase in phases:
        row = uncovered_row(phase.corners, window, height, width)
        if row is not None:
            raise ValueError(
                f"the windows leave part of the canvas uncovered (from row {row}); use window_grid"
            )
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    history_len = history_length(scheduler)
    work = CanvasWorkdir(workdir)
    settings = {
        **settings,
        "model": tensors_digest(getattr(model, "module", model).state_dict()),
        "inputs": {
            name: input_digest(name, src, in_unit_range=name == "keep") for name, src in inputs.items()
        },
    }
    total, seed = settings["steps"], settings["seed"]
    guidance_m, guidance_ge, interval = settings["guidance"]
    n_windows = [len(p.corners) for p in phases]
    summary = {"canvas": list(shape), "windows": n_windows[0] if len(phases) == 1 else n_windows, "seed": seed,
               "steps": total}  # fmt: skip
    done = work.begin(settings, history_len, inputs, summary)

    scheduler.set_timesteps(total, device=device)
    timesteps = scheduler.timesteps
    stepper = BandStepper(scheduler, done, device)
    row_batches = [_row_batches(p.corners, batch_size, height) for p in phases]
    conds = [p.cond for p in phases]
    weight = weight.to(device)
    given_noise = work.input("noise") if "noise" in inputs else None
    known, keep = (work.input("known"), work.input("keep")) if "known" in inputs else (None, None)

    def load(array, index) -> torch.Tensor:
        return torch.from_numpy(np.asarray(array[index]))[None].to(device, dtype)

    def noise_rows(a: int, b: int) -> torch.Tensor:
        if given_noise is not None:
            return load(given_noise, np.s_[:, a:b])
        return position_noise(seed, origin[0] + a, origin[1], b - a, width, channels)[None].to(device, dtype)

    remaining = range(done, total)
    for step in pipe.progress_bar(remaining) if progress else remaining:
        t = timesteps[step]
        s_g = _guidance_ge(scheduler, t, guidance_ge, interval)
        k = order[step]
        corners, cond, ge_available = phases[k].corners, conds[k], phases[k].ge_available
        batches, finals = row_batches[k]
        state = work.state(step) if step else None
        target = work.state(step + 1)
        history = (work.history(step), work.history(step + 1)) if history_len else None

        def read_state(a: int, b: int, state=state) -> torch.Tensor:
            if state is None:  # the initial state is the noise, drawn per band
                return noise_rows(a, b) * scheduler.init_noise_sigma
            return load(state, np.s_[:, a:b])

        x = RowBuffer(read_state)
        numerator = RowBuffer(leading=(channels,), width=width, device=device)
        denominator = RowBuffer(width=width, device=device)
        stepper.begin_step()
        present = stepper.history_present()
        for batch, final in zip(batches, finals, strict=True):
            x.extend(chunk_end(max(corners[i][0] for i in batch) + window, height))
            numerator.extend(x.hi)
            denominator.extend(x.hi)
            x_in = scheduler.scale_model_input(x.rows, t)
            for i, pred in _window_predictions(
                model, batch, corners, window, x_in, x.lo, t, cond, ge_available, guidance_m, s_g,
                settings["precision"],
            ):  # fmt: skip
                numerator.region(*corners[i], window, window).add_(pred * weight)
            for i in batch:  # in window order, the in-memory path's order of this sum
                denominator.region(*corners[i], window, window).add_(weight)
            ready = ready_rows(final, height)
            if ready <= x.lo:
                continue
            a = x.lo
            fused = (numerator.release(ready) / denominator.release(ready))[None].to(dtype)
            previous = [load(history[0], np.s_[j, :, a:ready]) if p else None for j, p in enumerate(present)]
            rows, new_history = stepper.step(fused, t, x.release(ready), previous)
            if known is not None:
                known_rows, keep_rows = load(known, np.s_[:, a:ready]), load(keep, np.s_[a:ready])[None]
                if step < total - 1:
                    known_rows = _noised(scheduler, known_rows, noise_rows(a, ready), timesteps, step)
                rows = keep_rows * known_rows + (1 - keep_rows) * rows
            # A failed write names the work folder: the step's buffers are its files, and a rerun
            # resumes there from the last recorded step, whose buffers this step does not touch.
            with writing(work.path):
                target[:, a:ready] = rows[0].float().cpu().numpy()
                for j, h in enumerate(new_history):
                    if h is not None:
                        history[1][j, :, a:ready] = h[0].float().cpu().numpy()
        stepper.end_step()
        work.commit(step + 1)
        if on_step is not None:
            on_step(step + 1, total)
    return work.canvas(total)


class _Phase(NamedTuple):
    """The windows of one phase of :func:`denoise_canvas`: corners, condition rows, GE mask."""

    corners: list[tuple[int, int]]
    cond: Condition
    ge_available: np.ndarray


def _phases(window_conditions, corners, ge_available, window: int, height: int, width: int) -> list[_Phase]:
    """:func:`denoise_canvas`'s windows as phases (one for a fixed grid), checked: counts,
    condition rows and masks matching, every window inside the canvas."""
    if isinstance(window_conditions, Condition):
        grids, conditions, masks = [corners], [window_conditions], [ge_available]
    else:
        grids, conditions = list(corners), list(window_conditions)
        masks = [None] * len(grids) if ge_available is None else list(ge_available)
        if not grids or not len(grids) == len(conditions) == len(masks):
            raise ValueError(
                f"shifted windows need one grid, Condition and GE mask per phase; got {len(grids)} grids, "
                f"{len(conditions)} Conditions and {len(masks)} masks"
            )
    phases = []
    for grid, cond, mask in zip(grids, conditions, masks, strict=True):
        grid = [(int(y), int(x0)) for y, x0 in grid]
        n = len(grid)
        if n == 0:
            raise ValueError(f"need at least one window; got {n}")
        if cond.batch_size() not in (None, n):
            raise ValueError(f"{n} windows but {cond.batch_size()} condition rows")
        if any(not (0 <= y <= height - window and 0 <= x0 <= width - window) for y, x0 in grid):
            raise ValueError(
                f"every {window} x {window} window must lie inside the {height} x {width} canvas"
            )
        mask = np.ones(n, bool) if mask is None else np.asarray(mask, bool)
        if mask.shape != (n,):
            raise ValueError(f"ge_available needs one value per window ({n}); got shape {mask.shape}")
        phases.append(_Phase(grid, cond, mask))
    return phases


def _phase_order(phase_order, phases: int, steps: int) -> list[int]:
    """The phase of each step: ``phase_order`` checked, or step ``k`` in phase ``k % phases``."""
    if phase_order is None:
        return [k % phases for k in range(steps)]
    order = [int(k) for k in phase_order]
    if len(order) != steps or any(not 0 <= k < phases for k in order):
        raise ValueError(
            f"phase_order needs one phase index in [0, {phases}) per step ({steps}); got {list(phase_order)}"
        )
    return order


def _check_shapes(noise, known, keep, shape) -> None:
    """``noise`` (C, H, W), ``known`` (C, H, W) and ``keep`` (H, W), the last two together."""
    if noise is not None and tuple(noise.shape) != shape:
        raise ValueError(f"noise must have shape {shape}; got {tuple(noise.shape)}")
    if (known is None) != (keep is None):
        raise ValueError("known and keep go together: give both or neither")
    if known is not None and tuple(known.shape) != shape:
        raise ValueError(
            f"known must have shape {shape} (the canvas, model's space); got {tuple(known.shape)}"
        )
    if keep is not None and tuple(keep.shape) != shape[1:]:
        raise ValueError(f"keep must have shape {shape[1:]} (the canvas); got {tuple(keep.shape)}")


def _imposition(known, keep, device, dtype):
    """``known`` (1, C, H, W) and ``keep`` (1, 1, H, W) on the model's device; shapes checked
    by :func:`_check_shapes`."""
    if known is None:
        return None, None
    keep = keep.detach().float()
    if not torch.isfinite(keep).all() or keep.min() < 0 or keep.max() > 1:
        raise ValueError("keep must lie in [0, 1] (1: impose known, 0: free)")
    return known[None].to(device, dtype), keep[None, None].to(device, dtype)


def _noised(scheduler, known, noise, steps, step):
    """``known`` noised to the timestep that step ``step`` leads to: DDIM steps to ``t -
    num_train_timesteps // num_inference_steps``, a multistep solver to the next timestep."""
    if isinstance(scheduler, DDIMScheduler):
        ratio = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        t_prev = steps[step] - ratio
    else:
        t_prev = steps[step + 1]
    return scheduler.add_noise(known, noise, t_prev.reshape(1).to(noise.device))


@torch.no_grad()
def decode_canvas(vae, canvas: torch.Tensor | DiskCanvas, corners, window: int, batch_size: int = 16):
    """A denoised (C, H, W) canvas as (3, H * s, W * s) pixels in [0, 1], s = :func:`vae_scale`.

    A pixel-space canvas is only rescaled. A latent canvas is decoded in the windows it was
    denoised in (``corners``, ``window`` latents a side; a whole canvas rarely fits a VAE
    decoder), blended with the raised-cosine weights the denoising fused with.

    A :class:`~stmdit.sections.canvas.DiskCanvas` (out-of-core :func:`denoise_canvas`) is
    decoded in row bands into ``pixels.zarr`` in its folder, returned: a zarr array of uint8
    (H * s, W * s, 3), the same pixels :func:`stmdit.tiles.to_uint8` makes of the in-memory
    result (windows taken in row-major order)."""
    if isinstance(canvas, DiskCanvas):
        return _decode_in_bands(vae, canvas, corners, window, batch_size)
    if vae is None:
        return ((canvas.float() + 1) / 2).clamp(0, 1)
    s = vae_scale(vae)
    px, (_, height, width) = window * s, canvas.shape
    weight = _window_weight(px, "cosine").to(canvas.device)
    pixels = torch.zeros(3, height * s, width * s, device=canvas.device)
    denominator = torch.zeros(height * s, width * s, device=canvas.device)
    for start in range(0, len(corners), batch_size):
        batch = corners[start : start + batch_size]
        crops = torch.stack([canvas[:, y : y + window, x : x + window] for y, x in batch])
        for (y, x), tile in zip(batch, decode_latents(vae, crops, batch_size).float(), strict=True):
            pixels[:, y * s : y * s + px, x * s : x * s + px] += tile.to(canvas.device) * weight
            denominator[y * s : y * s + px, x * s : x * s + px] += weight
    return pixels / denominator


def _decode_in_bands(vae, canvas: DiskCanvas, corners, window: int, batch_size: int):
    """:func:`decode_canvas` of a canvas on disk: rows are decoded, blended and written as soon
    as no remaining window covers them, so memory holds a strip of rows, not the section."""
    _, height, width = canvas.shape
    s = vae_scale(vae)
    path = canvas.workdir / "pixels.zarr"
    pixels = create_array(path, (height * s, width * s, 3), np.uint8, row_axis=0, compressors="auto")
    if vae is None:
        with writing(path):
            for a, b in row_chunks(height):
                pixels[a:b] = to_uint8(((canvas.rows(a, b) + 1) / 2).clamp(0, 1))
        return pixels
    corners = [(int(y), int(x)) for y, x in corners]
    px = window * s
    weight = _window_weight(px, "cosine")
    latents = RowBuffer(canvas.rows)
    numerator = RowBuffer(leading=(3,), width=width * s, scale=s)
    denominator = RowBuffer(width=width * s, scale=s)
    batches, finals = _row_batches(corners, batch_size, height)
    for batch, final in zip(batches, finals, strict=True):
        latents.extend(chunk_end(max(corners[i][0] for i in batch) + window, height))
        numerator.extend(latents.hi)
        denominator.extend(latents.hi)
        crops = torch.stack([latents.region(*corners[i], window, window) for i in batch])
        for i, tile in zip(batch, decode_latents(vae, crops, batch_size).float(), strict=True):
            y, x = corners[i]
            numerator.region(y * s, x * s, px, px).add_(tile.cpu() * weight)
            denominator.region(y * s, x * s, px, px).add_(weight)
        ready = ready_rows(final, height)
        if ready > latents.lo:
            a = latents.lo
            latents.release(ready)
            with writing(path):
                pixels[a * s : ready * s] = to_uint8(numerator.release(ready) / denominator.release(ready))
    return pixels
