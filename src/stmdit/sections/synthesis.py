"""Seamless whole-section synthesis, the default of ``stmdit section``.

:func:`synthesize_seamless` denoises one canvas over the whole section with the model's
tile-sized windows (:func:`stmdit.sections.seamless.denoise_canvas`, MultiDiffusion), instead of
pasting an independent tile per spot (:func:`stmdit.sections.mosaic.synthesize_section`):

* **Canvas.** At the model's own resolution (``tile_um`` over the model's tile in pixels, which
  for a latent model is ``sample_size`` latents times the VAE's pixels per latent) over the
  kept spots' extent plus half a tile (:meth:`SectionGeometry.covering`); the real H&E of the
  same region is read beside it, and its :func:`~stmdit.data.images.tissue_mask` is the real
  tissue.
* **Windows.** :func:`window_grid` with a stride of about 3/4 of the window, chosen off the
  patch grid where possible (so window borders do not fall on patch borders every time).
  Shifted windows (``shift_windows``, the default of :func:`synthesize_seamless`): the grid
  moves from step to step by the offsets of :func:`~stmdit.sections.seamless.grid_offsets`
  (8 offsets spread evenly over the stride in both axes, in turn), so the overlaps, where
  several windows' predictions are averaged and detail is smoothed, fall elsewhere every step
  instead of leaving a grid of soft seams at the stride. The canvas is then denoised padded by
  one stride on each side (the grids' edge windows, fixed at every step, lie mostly in the
  padding) and cropped back; its noise is the same position noise, so the section's pixels do
  not depend on the padding. The last quarter of the steps (:func:`patch_phase_steps`) is
  fused from its offset's :func:`~stmdit.sections.seamless.patch_phase_grid` (``patch``
  grids moved by 0 .. patch - 1 pixels): otherwise the model's patch grid, which restarts in
  every window, is left at the last grids' stride (on her2st C4 it was most of the residual
  seam score: bench/seams.py).
* **Conditions.** Each window's expression is the Gaussian-kernel mean of the spots' log1p
  CP10k over the encoder's panel at the window centre (bandwidth half the spot pitch by
  default, radius 3 bandwidths), encoded by ``pipe.encode_expression``; windows with no spot in
  range are guided without GE. With ``use_morphology`` the real tiles' morphology embeddings
  are interpolated the same way (nearest spot where none is in range).
* **Output.** Pixels outside the real tissue mask, dilated by a quarter window, or farther
  than :data:`~stmdit.sections.metrics.SPOT_REACH` (0.75) pitches from every spot are white
  (glass); ``tiles`` are crops of the canvas centred at each spot, so the AnnData and
  SpatialData exports read the section as they read a mosaic.

A latent model's canvas is denoised in latents and decoded in the same windows, blended
(:func:`~stmdit.sections.seamless.decode_canvas`).

The pieces are reusable, so that region edits (:mod:`stmdit.sections.editing`) draw their
canvases exactly as a section is drawn: :func:`section_canvas` (everything fixed before any
denoising: geometry, windows, their centres, the real H&E and its tissue), :func:`window_conditions`
(any spot expression, e.g. an edited one, at any window centres), :func:`draw_canvas` (the joint
denoising), :func:`canvas_pixels` (decoding) and :func:`section_result`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import anndata as ad
import numpy as np
import pandas as pd
import torch
from scipy import ndimage
from scipy.spatial import cKDTree

from stmdit import defaults
from stmdit.data.images import tissue_mask
from stmdit.diffusion import Condition
from stmdit.encoders.expression import align_to_panel, log1p_cp10k
from stmdit.encoders.vae import vae_scale
from stmdit.sections.metrics import SPOT_REACH, near_spots
from stmdit.sections.mosaic import (
    SectionGeometry,
    SectionResult,
    as_store,
    check_inputs,
    read_real_region,
    sampling_settings,
    spot_table,
)
from stmdit.sections.seamless import (
    DiskCanvas,
    decode_canvas,
    denoise_canvas,
    expression_for_encoder,
    grid_offsets,
    interpolate_expression,
    pitch_um,
    window_grid,
    window_schedule,
)
from stmdit.tiles import to_tensor, to_uint8

if TYPE_CHECKING:
    from stmdit.data.store import DatasetStore

__all__ = [
    "SectionCanvas",
    "WindowSchedule",
    "canvas_pixels",
    "default_stride",
    "draw_canvas",
    "patch_phase_steps",
    "section_canvas",
    "section_result",
    "section_settings",
    "spot_tiles",
    "synthesize_seamless",
    "window_conditions",
]

RADIUS = 3.0  # bandwidths: spots farther from a window centre do not condition it
FUSION_WEIGHTS = "cosine"
INTERPOLATION = "gaussian kernel over spots in log1p CP10k, radius 3 bandwidths"
OnStep = Callable[[int, int], None]
# The share of the steps, the last ones, fused from every patch phase (bench/seams.py on her2st
# C4: seam score 0.096 with the last step, 0.077 with 3 of 20, 0.073 with 5, real H&E 0.068).
PATCH_PHASE_FRACTION = 0.25


def patch_phase_steps(steps: int) -> int:
    """How many of ``steps`` steps, the last ones, are fused from every patch phase."""
    return min(steps, max(1, math.ceil(PATCH_PHASE_FRACTION * steps)))


class WindowSchedule(NamedTuple):
    """The window grids of a shifted-window denoising (distinct) and each step's index into them
    (``denoise_canvas``'s ``corners`` and ``phase_order``)."""

    grids: list[list[tuple[int, int]]]
    order: list[int]


def default_stride(window: int, patch_size: int) -> int:
    """About 3/4 of the window, moved by a pixel or two off a multiple of the patch size when
    that is possible (window borders then fall at different offsets within the patch grid)."""
    base = max(1, round(0.75 * window))
    for candidate in (base, base - 1, base + 1, base - 2, base + 2):
        if 1 <= candidate <= window and candidate % patch_size:
            return candidate
    return base


@dataclass
class SectionCanvas:
    """A seamless canvas over one sample, before any denoising. Sizes in model units (pixels,
    or latents of ``s`` pixels a side) unless named ``_px``; ``geometry`` is the pixel canvas.
    ``spots``: the kept spots' rows of the store (counts, obs), in the order of ``obs``;
    ``coverage``: the real tissue mask dilated by ``dilation`` pixels, within
    :data:`~stmdit.sections.metrics.SPOT_REACH` pitches of a spot (outside it is glass).
    ``corners``: the fixed window grid over the canvas. Shifted windows (``offsets`` not
    None): the canvas is denoised padded by ``pad`` on each side, in the grids of
    :meth:`schedule`."""

    store: DatasetStore
    sample: str
    spots: ad.AnnData
    obs: pd.DataFrame
    real_image: dict
    tile_um: float
    use_morphology: bool
    spot_xy: np.ndarray
    pitch: float
    bandwidth: float
    geometry: SectionGeometry
    window: int
    patch: int
    s: int
    stride: int
    height: int
    width: int
    corners: list[tuple[int, int]]
    real: np.ndarray
    coverage: np.ndarray
    dilation: int
    pad: int = 0
    offsets: list[tuple[int, int]] | None = None

    @property
    def window_px(self) -> int:
        return self.window * self.s

    @property
    def shifted(self) -> bool:
        return self.offsets is not None

    def schedule(self, steps: int, height: int | None = None, width: int | None = None) -> WindowSchedule:
        """The shifted grids of ``steps`` denoising steps on the padded canvas, or on a padded
        sub-canvas of ``height`` x ``width`` model units (padding included): step ``k`` in
        :func:`window_grid` moved by ``offsets[k % len(offsets)]``, the last
        :func:`patch_phase_steps` in that offset's patch-phase grid
        (:func:`~stmdit.sections.seamless.window_schedule`)."""
        if self.offsets is None:
            raise ValueError("this canvas has a fixed window grid (section_canvas(shift_windows=False))")
        h = self.height + 2 * self.pad if height is None else height
        w = self.width + 2 * self.pad if width is None else width
        return WindowSchedule(
            *window_schedule(
                h, w, self.window, self.stride, self.offsets, self.patch, steps, patch_phase_steps(steps)
            )
        )

    def window_centres_um(self, steps: int) -> np.ndarray | list[np.ndarray]:
        """The centres of the windows the canvas is denoised in: of ``corners``, or of each
        grid of :meth:`schedule` (a list; padded-canvas corners, ``pad`` above and left of this
        canvas)."""
        if self.offsets is None:
            return self.centres_um(self.corners)
        return [self.centres_um(grid, (-self.pad, -self.pad)) for grid in self.schedule(steps).grids]

    def model_geometry(self) -> SectionGeometry:
        """The canvas in model units (a latent canvas: ``s`` times coarser than ``geometry``)."""
        g = self.geometry
        return SectionGeometry(g.um_per_px * self.s, g.origin_um, self.width, self.height)

    def centres_um(self, corners: Sequence[tuple[int, int]], offset: tuple[int, int] = (0, 0)) -> np.ndarray:
        """Window centres (M, 2: x, y) in microns of windows at ``corners`` (model units) of a
        sub-canvas whose top-left corner is at ``offset`` (y, x) of this canvas."""
        yx = np.asarray(corners, float) + np.asarray(offset, float)
        return (
            np.asarray(self.geometry.origin_um)
            + (yx[:, ::-1] * self.s + self.window_px / 2) * self.geometry.um_per_px
        )


def section_canvas(
    pipe,
    dataset,
    sample: str,
    use_morphology: bool = False,
    stride: int | None = None,
    bandwidth_um: float | None = None,
    shift_windows: bool = False,
) -> SectionCanvas:
    """Check the inputs and lay out the seamless canvas of ``sample`` (see the module
    docstring): its geometry, windows and the real H&E under it. ``stride`` in pixels (a
    multiple of the VAE's pixels per latent; default :func:`default_stride`), ``bandwidth_um``
    of the expression interpolation (default half the spot pitch). ``shift_windows``: lay out
    shifted grids too (padding one stride, :func:`~stmdit.sections.seamless.grid_offsets`)."""
    store = as_store(dataset)
    sample = str(sample)
    adata, rows, meta, manifest = check_inputs(pipe, store, sample, use_morphology)
    tile_um = float(manifest["prepare"]["tile_um"])
    cfg = pipe.transformer.config
    # The canvas is denoised in the model's units (pixels, or latents of s pixels a side).
    window, patch, s = int(cfg.sample_size), int(cfg.patch_size), vae_scale(pipe.vae)
    if stride is None:
        stride = default_stride(window, patch)
    elif int(stride) % s:
        raise ValueError(f"stride must be a multiple of the VAE's {s} pixels per latent; got {stride}")
    else:
        stride = int(stride) // s
    window_px = window * s

    obs, real_image = spot_table(adata, rows, meta)
    spot_xy = obs[["x_um", "y_um"]].to_numpy()
    pitch = pitch_um(spot_xy)
    bandwidth = pitch / 2 if bandwidth_um is None else float(bandwidth_um)
    if not bandwidth > 0:
        raise ValueError(f"bandwidth_um must be > 0; got {bandwidth_um}")
    geometry = SectionGeometry.covering(spot_xy, tile_um, tile_um / window_px)
    # A whole number of model units a side, at least one window (a section of one spot is one tile).
    height, width = (max(math.ceil(n / s), window) for n in (geometry.height, geometry.width))
    geometry = SectionGeometry(geometry.um_per_px, geometry.origin_um, width * s, height * s)
    real = read_real_region(real_image["path"], real_image["mpp"], real_image["image_scale"], geometry)
    dilation = max(1, window_px // 4)
    # Glass beyond the real tissue (dilated, so that no tissue edge is cut) and beyond the
    # spots' reach: there the expression says nothing, and some slides' glass looks like tissue.
    coverage = ndimage.binary_dilation(tissue_mask(real), iterations=dilation) & near_spots(
        geometry, spot_xy, SPOT_REACH * pitch
    )
    return SectionCanvas(
        store, sample, adata[rows].copy(), obs, real_image, tile_um, bool(use_morphology), spot_xy, pitch,
        bandwidth, geometry, window, patch, s, stride, height, width, window_grid(height, width, window, stride),
        real, coverage, dilation, stride if shift_windows else 0, grid_offsets(stride) if shift_windows else None,
    )  # fmt: skip


def window_conditions(
    pipe,
    canvas: SectionCanvas,
    centres_um: np.ndarray | Sequence[np.ndarray],
    spots: ad.AnnData | None = None,
) -> tuple[Condition, np.ndarray] | tuple[list[Condition], list[np.ndarray]]:
    """The Condition of windows centred at ``centres_um`` (M, 2) and the mask of those with a
    spot in range: ``spots`` (default the canvas' own; an edited copy for an edit, same spots
    in the same order) interpolated there (see the module docstring). ``centres_um`` a list
    of such arrays (the phases of shifted windows, :meth:`SectionCanvas.window_centres_um`):
    a list of Conditions and one of masks, one per array (encoded together)."""
    if not isinstance(centres_um, np.ndarray):
        sizes = [len(c) for c in centres_um]
        cond, in_range = window_conditions(pipe, canvas, np.concatenate(list(centres_um)), spots)
        bounds = np.cumsum([0, *sizes])
        return (
            [cond.rows(slice(a, b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)],
            [in_range[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)],
        )
    spots = canvas.spots if spots is None else spots
    counts, library, _ = align_to_panel(spots, pipe.ge_encoder.genes)
    values, in_range = interpolate_expression(
        canvas.spot_xy, log1p_cp10k(counts, library), centres_um, canvas.bandwidth, radius=RADIUS
    )
    ge, _ = pipe.encode_expression(expression_for_encoder(values, pipe.ge_encoder.genes))
    morphology = None
    if canvas.use_morphology:
        rows = canvas.obs["store_row"].to_numpy()
        with torch.no_grad():
            tiles = to_tensor(np.asarray(canvas.store.tiles().oindex[rows]))
            embeds = pipe.encode_morphology(tiles).float().cpu().numpy()
        morphology, _ = interpolate_expression(
            canvas.spot_xy, embeds, centres_um, canvas.bandwidth, radius=RADIUS
        )
        _, nearest = cKDTree(canvas.spot_xy).query(centres_um)
        morphology[~in_range] = embeds[nearest[~in_range]]
        morphology = torch.from_numpy(morphology)
    return Condition(morphology=morphology, **{k: v.cpu() for k, v in ge.items()}), in_range


def draw_canvas(
    pipe,
    canvas: SectionCanvas,
    cond: Condition | Sequence[Condition],
    in_range: np.ndarray | Sequence[np.ndarray],
    seed: int,
    *,
    guidance_ge: float = defaults.GUIDANCE_GE,
    guidance_morph: float = defaults.GUIDANCE_MORPH,
    steps: int = defaults.STEPS,
    batch_size: int = 16,
    progress: bool = True,
    on_step: OnStep | None = None,
    workdir: str | os.PathLike | None = None,
) -> torch.Tensor | DiskCanvas:
    """The whole canvas (model's space) denoised from the window conditions ``cond`` and
    ``in_range`` (:func:`window_conditions` at the canvas' windows), noise
    :func:`position_noise` of ``seed``; with ``workdir``, out of core there (resumable,
    :func:`~stmdit.sections.seamless.denoise_canvas`). Lists of Conditions and masks (at
    :meth:`SectionCanvas.window_centres_um` of a shifted canvas): denoised in the grids of
    :meth:`SectionCanvas.schedule` on the padded canvas, cropped back to the canvas."""
    sampling = dict(
        seed=int(seed), num_inference_steps=steps, guidance_scale_morphology=guidance_morph,
        guidance_scale_ge=guidance_ge, ge_available=in_range, batch_size=batch_size, weights=FUSION_WEIGHTS,
        progress=progress, on_step=on_step, workdir=workdir,
    )  # fmt: skip
    if isinstance(cond, Condition):
        return denoise_canvas(pipe, canvas.height, canvas.width, cond, canvas.corners, **sampling)
    p = canvas.pad
    schedule = canvas.schedule(steps)
    if len(cond) != len(schedule.grids):
        raise ValueError(f"{len(cond)} Conditions for the canvas' {len(schedule.grids)} shifted grids")
    padded = denoise_canvas(
        pipe,
        canvas.height + 2 * p,
        canvas.width + 2 * p,
        list(cond),
        schedule.grids,
        origin=(-p, -p),
        phase_order=schedule.order,
        **sampling,
    )
    if isinstance(padded, DiskCanvas):
        return padded.crop(p, p, canvas.height, canvas.width)
    return padded[:, p : p + canvas.height, p : p + canvas.width]


def canvas_pixels(
    pipe, canvas: SectionCanvas, model_canvas: torch.Tensor | DiskCanvas, corners=None, batch_size: int = 16
) -> np.ndarray:
    """A denoised canvas (or sub-canvas, with its ``corners``) as uint8 pixels (H, W, 3); an
    out-of-core canvas is decoded in bands into its workdir and read from there."""
    corners = canvas.corners if corners is None else corners
    pixels = decode_canvas(pipe.vae, model_canvas, corners, canvas.window, batch_size)
    if isinstance(model_canvas, DiskCanvas):
        return np.asarray(pixels)
    return to_uint8(pixels.cpu()[None])[0]


def spot_tiles(canvas: SectionCanvas, image: np.ndarray) -> np.ndarray:
    """Each spot's tile: the crop of ``image`` (the pixel canvas) of the window's size centred
    at the spot, kept inside the canvas."""
    n, g = canvas.window_px, canvas.geometry
    cols, rows = g.to_canvas(canvas.spot_xy).T
    r0 = np.clip(np.round(rows - n / 2).astype(int), 0, g.height - n)
    c0 = np.clip(np.round(cols - n / 2).astype(int), 0, g.width - n)
    return np.stack([image[r : r + n, c : c + n] for r, c in zip(r0, c0, strict=True)])


def section_settings(pipe, canvas: SectionCanvas, seed, guidance_ge, guidance_morph, steps, in_range) -> dict:
    """What the JSON record says about how a seamless section was drawn."""
    return {
        "mode": "seamless",
        **sampling_settings(
            pipe, canvas.store, canvas.sample, seed, guidance_ge, guidance_morph, steps, canvas.use_morphology
        ),  # fmt: skip
        "window": canvas.window_px,
        "stride": canvas.stride * canvas.s,
        "pixels_per_model_unit": canvas.s,
        "patch_size": canvas.patch,
        **_window_counts(canvas, in_range, steps),
        "bandwidth_um": float(canvas.bandwidth),
        "pitch_um": float(canvas.pitch),
        "interpolation": INTERPOLATION,
        "fusion_weights": FUSION_WEIGHTS,
        "mask_dilation_px": canvas.dilation,
        "shift_windows": canvas.shifted,
        **(
            {
                "window_offsets_px": [[dy * canvas.s, dx * canvas.s] for dy, dx in canvas.offsets],
                "padding_px": canvas.pad * canvas.s,
                "patch_phase_steps": patch_phase_steps(steps),
                "phase_order": canvas.schedule(steps).order,
            }
            if canvas.shifted
            else {}
        ),  # fmt: skip
    }


def _window_counts(canvas: SectionCanvas, in_range, steps: int) -> dict:
    """Windows per step and those without GE: of the fixed grid, or per shifted grid (the
    lists, and their means over the steps, each grid weighted by the steps it denoises)."""
    if not isinstance(in_range, list):
        return {"n_windows": len(canvas.corners), "n_windows_without_ge": int((~np.asarray(in_range)).sum())}
    sizes, without = [len(m) for m in in_range], [int((~np.asarray(m)).sum()) for m in in_range]
    order = canvas.schedule(steps).order
    return {"n_windows": round(float(np.mean([sizes[k] for k in order]))),
            "n_windows_without_ge": round(float(np.mean([without[k] for k in order]))),
            "n_windows_per_phase": sizes, "n_windows_without_ge_per_phase": without}  # fmt: skip


def section_result(
    canvas: SectionCanvas, virtual: np.ndarray, settings: dict, model_canvas=None
) -> SectionResult:
    """The :class:`SectionResult` of a drawn virtual image (glass outside ``coverage`` already)."""
    return SectionResult(
        canvas.sample, virtual, canvas.real, canvas.coverage, canvas.geometry, spot_tiles(canvas, virtual),
        canvas.obs, canvas.tile_um, canvas.real_image, settings, len(canvas.obs), canvas.spots.copy(), model_canvas,
    )  # fmt: skip


def synthesize_seamless(
    pipe,
    dataset,
    sample: str,
    seed: int = 0,
    guidance_ge: float = defaults.GUIDANCE_GE,
    guidance_morph: float = defaults.GUIDANCE_MORPH,
    steps: int = defaults.STEPS,
    use_morphology: bool = False,
    stride: int | None = None,
    bandwidth_um: float | None = None,
    batch_size: int = 16,
    progress: bool = True,
    on_step: OnStep | None = None,
    workdir: str | os.PathLike | None = None,
    shift_windows: bool = True,
) -> SectionResult:
    """A seamless virtual section of ``sample`` (see the module docstring).

    Args:
        pipe: an :class:`~stmdit.STMDiTPipeline` with a GE encoder (pixel or latent space).
        dataset: a prepared store (or its folder).
        seed: the canvas noise is :func:`~stmdit.sections.seamless.position_noise` of it.
        guidance_ge, guidance_morph, steps: sampling settings.
        use_morphology: also condition on the real tiles' morphology, interpolated between spots.
        stride: window stride in pixels, a multiple of the VAE's pixels per latent (default
            :func:`default_stride` of the model's window).
        bandwidth_um: Gaussian bandwidth of the interpolation (default half the spot pitch).
        batch_size: windows per forward pass; does not change the result.
        on_step: called as ``on_step(steps_done, total)`` after each denoising step.
        workdir: denoise out of core in this folder (zarr; memory bounded by the canvas'
            width, a killed run resumes at its next step); None: in memory.
        shift_windows: move the window grid from step to step (see the module docstring), so
            that no grid of soft seams at the stride remains; False: one fixed grid.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    canvas = section_canvas(pipe, dataset, sample, use_morphology, stride, bandwidth_um, shift_windows)
    cond, in_range = window_conditions(pipe, canvas, canvas.window_centres_um(steps))
    model_canvas = draw_canvas(
        pipe, canvas, cond, in_range, seed, guidance_ge=guidance_ge, guidance_morph=guidance_morph, steps=steps,
        batch_size=batch_size, progress=progress, on_step=on_step, workdir=workdir,
    )  # fmt: skip
    virtual = canvas_pixels(pipe, canvas, model_canvas, batch_size=batch_size)
    virtual[~canvas.coverage] = 255
    settings = section_settings(pipe, canvas, seed, guidance_ge, guidance_morph, steps, in_range)
    return section_result(canvas, virtual, settings, model_canvas)
