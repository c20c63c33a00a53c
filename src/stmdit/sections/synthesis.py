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
* **Conditions.** Each window's expression is the Gaussian-kernel mean of the spots' log1p
  CP10k over the encoder's panel at the window centre (bandwidth half the spot pitch by
  default, radius 3 bandwidths), encoded by ``pipe.encode_expression``; windows with no spot in
  range are guided without GE. With ``use_morphology`` the real tiles' morphology embeddings
  are interpolated the same way (nearest spot where none is in range).
* **Output.** Pixels outside the real tissue mask, dilated by a quarter window, are white
  (glass); ``tiles`` are crops of the canvas centred at each spot, so the AnnData and
  SpatialData exports read the section as they read a mosaic.

A latent model's canvas is denoised in latents and decoded in the same windows, blended
(:func:`~stmdit.sections.seamless.decode_canvas`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import ndimage
from scipy.spatial import cKDTree

from stmdit import defaults
from stmdit.data.images import tissue_mask
from stmdit.diffusion import Condition
from stmdit.encoders.expression import align_to_panel, log1p_cp10k
from stmdit.encoders.vae import vae_scale
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
    decode_canvas,
    denoise_canvas,
    expression_for_encoder,
    interpolate_expression,
    pitch_um,
    window_grid,
)
from stmdit.tiles import to_tensor, to_uint8

__all__ = ["default_stride", "synthesize_seamless"]

RADIUS = 3.0  # bandwidths: spots farther from a window centre do not condition it
FUSION_WEIGHTS = "cosine"
INTERPOLATION = "gaussian kernel over spots in log1p CP10k, radius 3 bandwidths"


def default_stride(window: int, patch_size: int) -> int:
    """About 3/4 of the window, moved by a pixel or two off a multiple of the patch size when
    that is possible (window borders then fall at different offsets within the patch grid)."""
    base = max(1, round(0.75 * window))
    for candidate in (base, base - 1, base + 1, base - 2, base + 2):
        if 1 <= candidate <= window and candidate % patch_size:
            return candidate
    return base


def _window_conditions(pipe, adata, rows, store, spot_xy, centres, bandwidth, use_morphology):
    """The windows' Condition and the mask of windows with a spot in range."""
    counts, library, _ = align_to_panel(adata[rows], pipe.ge_encoder.genes)
    values, in_range = interpolate_expression(
        spot_xy, log1p_cp10k(counts, library), centres, bandwidth, radius=RADIUS
    )
    ge, _ = pipe.encode_expression(expression_for_encoder(values, pipe.ge_encoder.genes))
    morphology = None
    if use_morphology:
        with torch.no_grad():
            embeds = (
                pipe.encode_morphology(to_tensor(np.asarray(store.tiles().oindex[rows])))
                .float()
                .cpu()
                .numpy()
            )
        morphology, _ = interpolate_expression(spot_xy, embeds, centres, bandwidth, radius=RADIUS)
        _, nearest = cKDTree(spot_xy).query(centres)
        morphology[~in_range] = embeds[nearest[~in_range]]
        morphology = torch.from_numpy(morphology)
    return Condition(morphology=morphology, **{k: v.cpu() for k, v in ge.items()}), in_range


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
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
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
    corners = window_grid(height, width, window, stride)
    centres = (
        np.asarray(geometry.origin_um)
        + (np.asarray(corners)[:, ::-1] * s + window_px / 2) * geometry.um_per_px
    )
    cond, in_range = _window_conditions(pipe, adata, rows, store, spot_xy, centres, bandwidth, use_morphology)

    canvas = denoise_canvas(
        pipe, height, width, cond, corners, seed=int(seed), num_inference_steps=steps,
        guidance_scale_morphology=guidance_morph, guidance_scale_ge=guidance_ge, ge_available=in_range,
        batch_size=batch_size, weights=FUSION_WEIGHTS, progress=progress,
    )  # fmt: skip
    virtual = to_uint8(decode_canvas(pipe.vae, canvas, corners, window, batch_size).cpu()[None])[0]

    real = read_real_region(real_image["path"], real_image["mpp"], real_image["image_scale"], geometry)
    dilation = max(1, window_px // 4)
    coverage = ndimage.binary_dilation(tissue_mask(real), iterations=dilation)
    virtual[~coverage] = 255

    # Each spot's tile: the canvas crop of the window's size centred at the spot, kept inside the canvas.
    cols, rows_px = geometry.to_canvas(spot_xy).T
    r0 = np.clip(np.round(rows_px - window_px / 2).astype(int), 0, geometry.height - window_px)
    c0 = np.clip(np.round(cols - window_px / 2).astype(int), 0, geometry.width - window_px)
    tiles = np.stack([virtual[r : r + window_px, c : c + window_px] for r, c in zip(r0, c0, strict=True)])

    settings = {
        "mode": "seamless",
        **sampling_settings(pipe, store, sample, seed, guidance_ge, guidance_morph, steps, use_morphology),
        "window": window_px,
        "stride": stride * s,
        "pixels_per_model_unit": s,
        "patch_size": patch,
        "n_windows": len(corners),
        "n_windows_without_ge": int((~in_range).sum()),
        "bandwidth_um": float(bandwidth),
        "pitch_um": float(pitch),
        "interpolation": INTERPOLATION,
        "fusion_weights": FUSION_WEIGHTS,
        "mask_dilation_px": dilation,
    }
    return SectionResult(
        sample, virtual, real, coverage, geometry, tiles, obs, tile_um, real_image, settings,
        len(rows), adata[rows].copy(),
    )  # fmt: skip
