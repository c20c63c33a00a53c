"""``stmdit section ... --edit edit.yaml``: a region of a section redrawn under edited
expression, measured against the seed-to-seed spread, and written beside the section's files.

The edit (:class:`~stmdit.sections.edits.EditConfig`) names a region (a polygon in microns of
the sample's frame, spots, or an ``obs`` value), changes in :mod:`stmdit.experiments.simulate`'s
vocabulary and an anchor. :func:`run_edit` lays out the section's seamless canvas as
:func:`~stmdit.sections.synthesis.synthesize_seamless` does, then for every seed of the edit:

* **Region.** :func:`~stmdit.sections.edits.region_mask` on the canvas (a spot's disk has radius
  half the spot pitch, the area a spot stands for, so the spots of a cluster make one region
  without gaps); the edited spots are :func:`~stmdit.sections.edits.region_spots` (for a polygon,
  those whose centres lie inside it). ``keep`` is :func:`~stmdit.sections.edits.keep_mask` with
  the config's band (default half a tile).
* **Unedited and edited images, paired by seed.** Anchor ``virtual``: the unedited image is the
  seed's whole virtual section; the edited one is the region redrawn under the edited
  expression (:func:`~stmdit.sections.edits.edited_expression`, re-interpolated at the window
  centres) with the unedited canvas imposed where ``keep`` is 1 at every step, RePaint-style
  (:func:`~stmdit.sections.edits.edit_canvas`). Anchor ``real``: the real H&E under the canvas,
  in the model's space (pixels mapped to [-1, 1]; a latent model's VAE encodes it in the
  windows it is denoised in, blended with the fusion weights), is imposed instead, and the
  unedited image is the same redraw under the measured expression (what the edit is compared
  with, as simulate compares an edited tile with its reconstruction), so that the change is
  the expression's alone; outside the region and band both equal the real H&E.
* **Only the region is redrawn.** Every redraw denoises the sub-canvas of the region and band
  plus a window of context on each side, with the full canvas' noise there
  (:func:`~stmdit.sections.seamless.position_noise`) and in the shifted window grids the
  section is drawn in (on the sub-canvas padded as the section is): outside it the imposed
  canvas is kept exactly, so nothing further away could change. A latent model's decoded
  redraw is blended into the anchor's pixels with ``keep`` at pixel scale (the VAE decoder
  sees the whole window, so decoded pixels beside the region would otherwise differ slightly).
* **Measurements.** Inside the region, on the edited and the unedited image of every seed:
  haematoxylin, eosin and brown densities and nuclei per area
  (:func:`~stmdit.experiments.simulate.tile_statistics` on the region's bounding box with the
  rest set to white, scaled to the region's area; nuclei with one threshold over all images,
  where the pixel size allows a count); with a predictor, the expression read back from the
  region's spot crops (:func:`~stmdit.experiments.simulate.read_back`). Each measure's paired
  change over the seeds with its t interval beside the unedited images' seed-to-seed sd
  (:func:`~stmdit.experiments.statistics.replicate_change`), the tests adjusted together (Holm);
  and :func:`~stmdit.sections.edits.local_change` (mean absolute difference outside, in the
  band, inside) per seed.

:meth:`EditResult.save` writes ``<sample>_edit.json`` (every number, the edit and the
settings), ``<sample>_edit.ome.tif`` (the first seed's edited image, a pyramidal OME-TIFF as
``<sample>_virtual.ome.tif``) and ``<sample>_edit.png`` (unedited | edited | difference over the
redrawn sub-canvas, the region outlined). With anchor ``virtual`` :attr:`EditResult.section` is
the first seed's unedited section, whose usual files go beside them; anchor ``real`` draws no
whole virtual section.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from stmdit import defaults
from stmdit.encoders.vae import encode_images, vae_scale
from stmdit.experiments.simulate import MEASUREMENTS, read_back, readback_geometry, tile_statistics
from stmdit.experiments.statistics import ALPHA, adjust_changes, describe_replicates, replicate_change
from stmdit.genesets import marker_programmes
from stmdit.io import differences, safe_file_name, save_figure, write_json
from stmdit.sections.edits import (
    EditConfig,
    edit_canvas,
    edited_expression,
    keep_mask,
    local_change,
    region_mask,
    region_spots,
    transition_band,
)
from stmdit.sections.mosaic import SectionResult, blend_window
from stmdit.sections.seamless import window_grid
from stmdit.sections.synthesis import (
    FUSION_WEIGHTS,
    OnStep,
    SectionCanvas,
    canvas_pixels,
    draw_canvas,
    section_canvas,
    section_result,
    section_settings,
    spot_tiles,
    window_conditions,
)
from stmdit.stain import nuclei_unavailable
from stmdit.tiles import to_tensor

__all__ = ["EditResult", "encode_canvas", "region_statistics", "run_edit", "summary_line"]

EDIT_SUFFIX = "_edit"
TOP_GENES = 10  # predicted genes reported besides the edited ones: the largest mean shifts


@dataclass
class EditResult:
    """One region edit over its seeds. ``edited`` and ``unedited``: the first seed's images
    (H, W, 3) uint8 on the canvas (``canvas.geometry``); ``region``, ``band``: bool (H, W);
    ``box``: the redrawn sub-canvas in pixels (y0, x0, height, width); ``report``: the
    measurements, the edit and the settings (the JSON record); ``section``: the first seed's
    unedited virtual section (anchor ``virtual``; None for ``real``)."""

    sample: str
    config: EditConfig
    canvas: SectionCanvas
    edited: np.ndarray
    unedited: np.ndarray
    region: np.ndarray
    band: np.ndarray
    box: tuple[int, int, int, int]
    report: dict = field(default_factory=dict)
    section: SectionResult | None = None

    def save(self, out: str | os.PathLike) -> dict[str, Path]:
        """Write ``<sample>_edit.json``, ``<sample>_edit.ome.tif`` and ``<sample>_edit.png`` to
        ``out``, each atomically; returns them by role (edit_record, edit_slide, edit_figure)."""
        from stmdit.sections.ometiff import write_ome_tiff

        out = Path(out)
        stem = safe_file_name(self.sample) + EDIT_SUFFIX
        paths = {
            "edit_record": out / f"{stem}.json",
            "edit_slide": out / f"{stem}.ome.tif",
            "edit_figure": out / f"{stem}.png",
        }
        height, width = self.edited.shape[:2]
        # The same edit and settings make the same image: a rerun writes the same bytes.
        made_by = json.dumps(
            [self.sample, self.report["edit"], self.report["settings"]], sort_keys=True, default=str
        )
        write_ome_tiff(paths["edit_slide"], lambda y0, y1: self.edited[y0:y1], height, width,
                       self.canvas.geometry.um_per_px, name=f"{self.sample} edited",
                       uuid=str(uuid.uuid5(uuid.NAMESPACE_URL, f"stmdit-edit:{made_by}")))  # fmt: skip
        self._figure(paths["edit_figure"])
        write_json(paths["edit_record"], {**self.report, "files": {k: p.name for k, p in paths.items()}})
        return paths

    def _figure(self, path: Path) -> None:
        from stmdit.plotting import plt

        y0, x0, h, w = self.box
        crop = (slice(y0, y0 + h), slice(x0, x0 + w))
        unedited, edited = self.unedited[crop], self.edited[crop]
        diff = np.abs(edited.astype(np.int16) - unedited).mean(axis=-1)
        u = self.canvas.geometry.um_per_px
        ox, oy = self.canvas.geometry.origin_um
        extent = (ox + x0 * u, ox + (x0 + w) * u, oy + (y0 + h) * u, oy + y0 * u)
        xs, ys = ox + (x0 + np.arange(w) + 0.5) * u, oy + (y0 + np.arange(h) + 0.5) * u
        anchor = self.config.anchor
        titles = (
            "unedited (virtual)" if anchor == "virtual" else "real H&E, region redrawn unedited",
            f"edited: {'; '.join(p.describe() for p in self.config.perturbations())}",
            "|edited - unedited| (grey levels)",
        )
        fig, axes = plt.subplots(1, 3, figsize=(13, 4.6), constrained_layout=True)
        for ax, image, title in zip(axes, (unedited, edited, diff), titles, strict=True):
            shown = ax.imshow(image, extent=extent, cmap="magma", vmin=0, vmax=max(1.0, float(diff.max())))
            ax.contour(xs, ys, self.region[crop], levels=[0.5], colors="cyan", linewidths=1)
            ax.contour(xs, ys, self.region[crop] | self.band[crop], levels=[0.5], colors="cyan", linewidths=0.8,
                       linestyles="--")  # fmt: skip
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("x (µm)", fontsize=8)
        axes[0].set_ylabel("y (µm)", fontsize=8)
        fig.colorbar(shown, ax=axes[2], shrink=0.8)
        seeds = self.report["settings"]["seeds"]
        fig.suptitle(
            f"{self.sample}: region edit, anchor {anchor}, seed {seeds[0]} (region solid, band dashed)",
            fontsize=10,
        )
        save_figure(fig, path)


# -- the anchor in the model's space -----------------------------------------------------------------


@torch.no_grad()
def encode_canvas(vae, pixels: np.ndarray, corners, window: int, batch_size: int = 16) -> torch.Tensor:
    """uint8 pixels (H, W, 3) in the model's space (C, H / s, W / s): mapped to [-1, 1] without a
    VAE; with one, encoded in the windows at ``corners`` (``window`` latents a side; a canvas
    rarely fits a VAE encoder whole), blended with the raised-cosine weights the canvas is fused
    with (the posterior mean, as :func:`~stmdit.encoders.vae.encode_images`)."""
    images = to_tensor(pixels)
    if vae is None:
        return encode_images(None, images)[0]
    s = vae_scale(vae)
    px = window * s
    weight = torch.from_numpy(np.outer(blend_window(window, 0.5), blend_window(window, 0.5))).float()
    height, width = pixels.shape[0] // s, pixels.shape[1] // s
    total = torch.zeros(int(vae.config.latent_channels), height, width)
    denominator = torch.zeros(height, width)
    for start in range(0, len(corners), batch_size):
        batch = corners[start : start + batch_size]
        crops = torch.cat([images[:, :, y * s : y * s + px, x * s : x * s + px] for y, x in batch])
        for (y, x), z in zip(
            batch, encode_images(vae, crops, batch_size=batch_size).float().cpu(), strict=True
        ):
            total[:, y : y + window, x : x + window] += z * weight
            denominator[y : y + window, x : x + window] += weight
    return total / denominator


# -- measurements -------------------------------------------------------------------------------------------


def region_statistics(images: np.ndarray, region: np.ndarray, um_per_px: float) -> dict[str, np.ndarray]:
    """:func:`~stmdit.experiments.simulate.tile_statistics` of the region in each image
    (N, H, W, 3) uint8: on the region's bounding box with the rest set to white (no stain, no
    nuclei), scaled to the region's area, so densities are means over the region and nuclei
    are per area of the region."""
    rows, cols = np.nonzero(region)
    if len(rows) == 0:
        raise ValueError("the region is empty")
    box = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
    inside = region[box]
    crops = np.asarray(images)[:, box[0], box[1]].astype(np.float32) / 255
    crops[:, ~inside] = 1.0
    stats = tile_statistics(crops, um_per_px)
    return {k: v * (inside.size / inside.sum()) for k, v in stats.items()}


def _predicted_changes(
    predictor, control: np.ndarray, edited: np.ndarray, config: EditConfig, gene_sets
) -> dict:
    """Per predicted gene worth reporting (the edited genes the predictor reads, then the
    largest mean shifts), the paired change of the region's mean predicted log1p CP10k."""
    lookup = {str(g).upper(): j for j, g in enumerate(predictor.genes)}
    named = [g for p in config.perturbations() for g in [*p.genes, *gene_sets.get(p.gene_set, [])]]
    order = [lookup[g.upper()] for g in named if g.upper() in lookup]
    shift = (edited - control).mean(axis=0)
    order += [int(j) for j in np.argsort(-np.abs(shift))[:TOP_GENES]]
    return {
        str(predictor.genes[j]): replicate_change(edited[:, j][None], control[:, j][None], "seeds")
        for j in dict.fromkeys(order)
    }


# -- the run --------------------------------------------------------------------------------------------------


def _redraw_box(keep: np.ndarray, window: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(y0, x0, h, w) in model units: where ``keep`` < 1 plus a window on each side, within the
    canvas and at least a window a side."""
    rows, cols = np.nonzero(keep < 1)

    def span(lo: int, hi: int, n: int) -> tuple[int, int]:
        a, b = max(0, lo - window), min(n, hi + window)
        if b - a < window:  # grow inside the canvas (it is at least a window a side)
            a = max(0, min(a, n - window))
            b = a + window
        return a, b - a

    (y0, h), (x0, w) = span(rows.min(), rows.max() + 1, height), span(cols.min(), cols.max() + 1, width)
    return int(y0), int(x0), int(h), int(w)


def _check_region(region: np.ndarray, in_region: np.ndarray, canvas: SectionCanvas) -> None:
    g = canvas.geometry
    if not region.any():
        (x0, y0), u = g.origin_um, g.um_per_px
        raise ValueError(
            f"the edit's region lies outside the section's canvas (x {x0:.0f} to {x0 + g.width * u:.0f} µm, "
            f"y {y0:.0f} to {y0 + g.height * u:.0f} µm in the sample's frame)"
        )
    if not in_region.any():
        raise ValueError("no spot centre lies inside the edit's polygon: the edit would change no expression")


def _load_predictor(path, canvas: SectionCanvas, in_region: np.ndarray):
    from stmdit.predictor import load_predictor

    predictor, encoder = load_predictor(path)
    if encoder is None:
        raise ValueError(f"predictor {path}: no morphology encoder (saved or named) to read tiles")
    geometry = readback_geometry(predictor, canvas.spots, np.flatnonzero(in_region), canvas.tile_um)
    return predictor, encoder, geometry


def run_edit(
    pipe,
    dataset,
    sample: str,
    config: EditConfig,
    guidance_ge: float = defaults.GUIDANCE_GE,
    guidance_morph: float = defaults.GUIDANCE_MORPH,
    steps: int = defaults.STEPS,
    use_morphology: bool = False,
    stride: int | None = None,
    bandwidth_um: float | None = None,
    batch_size: int = 16,
    predictor: str | os.PathLike | None = None,
    progress: bool = True,
    on_step: OnStep | None = None,
    drawn: SectionResult | None = None,
) -> EditResult:
    """Redraw the edit's region of ``sample`` for every seed of ``config`` and measure the
    change (see the module docstring). Sampling options as
    :func:`~stmdit.sections.synthesis.synthesize_seamless`; ``predictor``: a predictor folder
    (``stmdit train-predictor``) whose read-back of the region's spots is measured too;
    ``on_step(steps_done, total)``: progress over all the edit's denoising steps; ``drawn``:
    the unedited section of one of the seeds as ``synthesize_seamless`` drew it with these
    settings (anchor virtual), used instead of drawing it again. Every input is checked before
    any denoising."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    # The unedited section is drawn as synthesize_seamless draws it, and so is the region's redraw
    # (a sub-canvas with the anchor imposed around it): in shifted window grids. A fixed grid there
    # drew the region differently from the section around it (a redraw with unchanged expression
    # moved its haematoxylin by about one seed sd on the simulator).
    canvas = section_canvas(pipe, dataset, sample, use_morphology, stride, bandwidth_um, shift_windows=True)
    g, mg, s = canvas.geometry, canvas.model_geometry(), canvas.s
    spot_radius = canvas.pitch / 2
    located = (canvas.obs, canvas.spot_xy, spot_radius)
    region = region_mask(config.region, g, *located)
    in_region = region_spots(config.region, canvas.obs, canvas.spot_xy)
    _check_region(region, in_region, canvas)
    band_um = config.band(canvas.tile_um)
    band = transition_band(region, band_um / g.um_per_px)
    keep_px = keep_mask(region, band_um / g.um_per_px)
    keep = keep_mask(region_mask(config.region, mg, *located), band_um / mg.um_per_px)
    gene_sets = {**marker_programmes(), **config.gene_sets}
    edited_spots = edited_expression(canvas.spots, in_region, config.perturbations(), gene_sets)
    reader = _load_predictor(predictor, canvas, in_region) if predictor is not None else None

    y0, x0, h, w = _redraw_box(keep, canvas.window, canvas.height, canvas.width)
    box_px = (y0 * s, x0 * s, h * s, w * s)
    corners = window_grid(h, w, canvas.window, canvas.stride)  # the box's own: encoding and decoding
    # Denoised padded by the section's padding, which is left free (keep 0): the anchor is
    # imposed at every step where keep is 1, so the free ring reaches no pixel of the region.
    p = canvas.pad
    schedule = canvas.schedule(steps, h + 2 * p, w + 2 * p)
    grids = schedule.grids
    centres = [canvas.centres_um(grid, (y0 - p, x0 - p)) for grid in grids]
    cond_edit, in_range_edit = window_conditions(pipe, canvas, centres, edited_spots)
    px = (slice(y0 * s, (y0 + h) * s), slice(x0 * s, (x0 + w) * s))
    keep_box = torch.zeros(h + 2 * p, w + 2 * p)
    keep_box[p : p + h, p : p + w] = torch.from_numpy(keep[y0 : y0 + h, x0 : x0 + w])
    keep_box_px = keep_px[px][..., None]
    if config.anchor == "virtual":
        cond_full, in_range_full = window_conditions(pipe, canvas, canvas.window_centres_um(steps))
    else:
        cond_unedited, in_range_unedited = window_conditions(pipe, canvas, centres)
        known = encode_canvas(pipe.vae, canvas.real[px], corners, canvas.window, batch_size)

    reused = _reusable(drawn, pipe, canvas, config, guidance_ge, guidance_morph, steps,
                       in_range_full if config.anchor == "virtual" else None)  # fmt: skip
    sampling = {"guidance_ge": guidance_ge, "guidance_morph": guidance_morph, "steps": steps,
                "batch_size": batch_size, "progress": progress}  # fmt: skip
    total = (2 * len(config.seeds) - len(reused)) * steps
    offsets = iter(range(0, total, steps))  # two canvases a seed, each ``steps`` steps

    def counted() -> OnStep | None:
        """``on_step`` of the next canvas, counting on from the canvases drawn before it."""
        offset = next(offsets)
        return None if on_step is None else lambda k, _n: on_step(offset + k, total)

    def redraw(cond, in_range, seed, known_box) -> np.ndarray:
        """The box redrawn with ``known_box`` imposed, as pixels blended into the anchor."""
        known = torch.zeros(known_box.shape[0], h + 2 * p, w + 2 * p)
        known[:, p : p + h, p : p + w] = known_box
        model = edit_canvas(
            pipe, h + 2 * p, w + 2 * p, grids, cond, known, keep_box, seed=int(seed), ge_available=in_range,
            num_inference_steps=steps, guidance_scale_morphology=guidance_morph, guidance_scale_ge=guidance_ge,
            batch_size=batch_size, weights=FUSION_WEIGHTS, progress=progress, origin=(y0 - p, x0 - p),
            phase_order=schedule.order, on_step=counted(),
        )  # fmt: skip
        return canvas_pixels(pipe, canvas, model[:, p : p + h, p : p + w], corners, batch_size)

    def paste(base: np.ndarray, redrawn: np.ndarray) -> np.ndarray:
        out = base.copy()
        if s > 1:  # the decoder saw the region: blend back to the anchor's pixels across the band
            redrawn = np.round(keep_box_px * base[px] + (1 - keep_box_px) * redrawn).astype(np.uint8)
        out[px] = redrawn
        return out

    first, seed_changes, crops, predicted = None, [], [], []
    for seed in config.seeds:
        if config.anchor == "virtual":
            if seed in reused:
                full = reused[seed]
            else:
                full = draw_canvas(
                    pipe, canvas, cond_full, in_range_full, seed, **sampling, on_step=counted()
                )
            unedited = canvas_pixels(pipe, canvas, full, batch_size=batch_size)
            unedited[~canvas.coverage] = 255
            edited = paste(
                unedited, redraw(cond_edit, in_range_edit, seed, full[:, y0 : y0 + h, x0 : x0 + w])
            )
            edited[~canvas.coverage] = 255
            seed_changes.append({"seed": int(seed), **local_change(edited, unedited, region, band)})
        else:
            unedited = paste(canvas.real, redraw(cond_unedited, in_range_unedited, seed, known))
            edited = paste(canvas.real, redraw(cond_edit, in_range_edit, seed, known))
            seed_changes.append({"seed": int(seed), **local_change(edited, unedited, region, band),
                                 "vs_real": local_change(edited, canvas.real, region, band)})  # fmt: skip
        crops.append((unedited[px], edited[px]))
        if reader is not None:
            tiles = [spot_tiles(canvas, image)[in_region] / 255.0 for image in (unedited, edited)]
            predicted.append([read_back(t, reader[0], reader[1], canvas.tile_um, reader[2]["spot_diameter_um"]).mean(axis=0)
                              for t in tiles])  # fmt: skip
        if first is None:
            first = (unedited, edited)

    report = _report(
        canvas, config, region, band, in_region, box_px, crops, seed_changes, predicted, reader, gene_sets
    )
    virtual = config.anchor == "virtual"
    settings = section_settings(pipe, canvas, config.seeds[0], guidance_ge, guidance_morph, steps,
                                in_range_full if virtual else in_range_edit)  # fmt: skip
    section = section_result(canvas, first[0], settings) if virtual else None
    if not virtual:  # no whole canvas was drawn: only the redrawn windows count
        del settings["n_windows"], settings["n_windows_without_ge"]
    report["settings"] = {**settings, "seeds": list(config.seeds), "spot_radius_um": spot_radius,
                          "band_um": band_um, "n_windows_redrawn": max(map(len, grids)),
                          "n_windows_redrawn_without_ge": max(int((~m).sum()) for m in in_range_edit),
                          "redrawn_box_px": dict(zip(("y0", "x0", "height", "width"), box_px, strict=True))}  # fmt: skip
    return EditResult(str(sample), config, canvas, first[1], first[0], region, band, box_px, report, section)


def _reusable(drawn, pipe, canvas, config, guidance_ge, guidance_morph, steps, in_range) -> dict:
    """``{seed: model canvas}`` of a drawn unedited section an edit can start from: anchor
    virtual, one of the edit's seeds, and drawn with the settings the edit would draw it with
    (anything else is refused, naming what differs)."""
    if drawn is None:
        return {}
    if config.anchor != "virtual":
        raise ValueError("a drawn section is the anchor of a virtual edit only; this edit's anchor is real")
    seed = drawn.settings.get("seed")
    if drawn.model_canvas is None or seed not in config.seeds:
        raise ValueError(
            f"the drawn section cannot be reused: it holds no model canvas or its seed {seed} is not among "
            f"the edit's seeds {list(config.seeds)} (draw it with synthesize_seamless)"
        )
    expected = section_settings(pipe, canvas, seed, guidance_ge, guidance_morph, steps, in_range)
    if drawn.sample != canvas.sample or drawn.settings != expected:
        diffs = "; ".join(differences(drawn.settings, expected, "drawn", "edit"))
        raise ValueError(f"the drawn section was made with other settings than this edit's: {diffs}")
    model = drawn.model_canvas
    return {seed: model if isinstance(model, torch.Tensor) else model.load()}


def _report(
    canvas, config, region, band, in_region, box_px, crops, seed_changes, predicted, reader, gene_sets
) -> dict:
    """The JSON record's measurements (see the module docstring)."""
    y0, x0, h, w = box_px
    g = canvas.geometry
    inside = region[y0 : y0 + h, x0 : x0 + w]
    images = np.stack([image for pair in crops for image in pair])  # seed-major: unedited, edited
    stats = region_statistics(images, inside, g.um_per_px)
    stats = {k: v.reshape(len(crops), 2) for k, v in stats.items()}
    changes = {k: replicate_change(v[:, 1][None], v[:, 0][None], "seeds") for k, v in stats.items()}
    multiplicity = adjust_changes(list(changes.values()), alpha=ALPHA)
    rows, cols = np.nonzero(region)
    report = {
        "sample": canvas.sample,
        "edit": config.to_dict(),
        "anchor": config.anchor,
        "compared_with": (
            "the seed's unedited virtual section"
            if config.anchor == "virtual"
            else "the region redrawn inside the real H&E under the measured expression, same seed"
        ),  # fmt: skip
        "region": {
            "n_pixels": int(region.sum()),
            "area_um2": float(region.sum() * g.um_per_px**2),
            "bbox_px": {
                "rows": [int(rows.min()), int(rows.max()) + 1],
                "cols": [int(cols.min()), int(cols.max()) + 1],
            },
            "spots": [str(n) for n in canvas.obs.index[in_region]],
            "band_pixels": int(band.sum()),
        },
        "geometry": g.to_dict(),
        "statistics": {
            k: {"unedited": v[:, 0].tolist(), "edited": v[:, 1].tolist()} for k, v in stats.items()
        },
        "measures": {k: MEASUREMENTS[k] for k in stats},
        "nuclei": nuclei_unavailable(min(np.ptp(rows), np.ptp(cols)) + 1, g.um_per_px),
        "changes": changes,
        "multiplicity": multiplicity,
        "replicates": describe_replicates("seeds", 1, len(crops)),
        "local_change": seed_changes,
        "local_change_means": "mean |edited - unedited| / 255 over RGB: outside the region and band, in the band, inside",
    }
    if reader is not None:
        values = np.asarray(predicted)  # (seeds, 2, genes)
        report["readback"] = reader[2]
        report["predicted_expression"] = _predicted_changes(
            reader[0], values[:, 0], values[:, 1], config, gene_sets
        )
    return report


def summary_line(report: dict) -> str:
    """One line of an edit's record (:attr:`EditResult.report`, or its JSON): the region, each
    measure's paired change with its interval against the seed spread, and the largest mean
    difference outside the region and band."""
    parts = []
    for key in (k for k in MEASUREMENTS if k in report["changes"] and k != "brown"):
        c = report["changes"][key]
        ci = "" if c["ci_low"] is None else f" [{c['ci_low']:+.3g}, {c['ci_high']:+.3g}]"
        beyond = {True: "beyond", False: "within", None: "vs"}[c["beyond_spread"]]
        sd = "" if c["control_seed_sd"] is None else f" {beyond} seed sd {c['control_seed_sd']:.3g}"
        parts.append(f"{key} {c['mean_change']:+.3g}{ci}{sd}")
    outside = [c["outside"] for c in report["local_change"] if not math.isnan(c["outside"])]
    return (
        f"edit of {report['sample']} (anchor {report['anchor']}, {len(report['region']['spots'])} spots, "
        f"{report['replicates']['n']} seeds): "
        + "; ".join(parts)
        + f"; outside region and band mean |diff| {max(outside, default=0.0):.2g}"
    )
