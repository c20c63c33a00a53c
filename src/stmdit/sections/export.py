"""``stmdit section``'s files, and a virtual section in the user's own spatial viewers: an AnnData for scanpy and squidpy, and a
SpatialData object for napari-spatialdata and spatialdata-plot.

Both carry the real and the virtual H&E in one frame, so expression overlays them at the same
coordinates:

* **AnnData** (:func:`section_anndata`): the sample's kept spots with their counts, per-spot
  comparisons of the real and the virtual tile, ``obsm['spatial']`` in full-resolution pixels,
  and two libraries in ``uns['spatial']``: ``<sample>`` with the real H&E and
  ``<sample>_virtual`` with the mosaic as their ``hires`` images, at the same scale factors, so
  ``sc.pl.spatial(adata, library_id="C2_virtual", color="ERBB2")`` draws the spots where
  ``library_id="C2"`` draws them. The images span the full-resolution frame from its origin to
  the far corner of the section (scanpy's scale factors have no offset), at most
  :data:`~stmdit.data.readers.convention.HIRES_PX` per side as Space Ranger's hires image.
* **SpatialData** (:func:`section_spatialdata`, extra ``stmdit[spatialdata]``): the real and
  virtual canvases at their own resolution as multiscale images, the spots as circles of their
  diameter, and the table (the AnnData's counts and per-spot columns, ``region`` naming the
  circles), all in the coordinate system ``global`` in the sample's full-resolution pixels.

:func:`section_command` is ``stmdit section``; with an edit config it redraws a region of the
section under edited expression and writes the edit's files beside these
(:mod:`stmdit.sections.editing`).
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm.auto import tqdm

from stmdit import defaults
from stmdit.data.images import tissue_fraction
from stmdit.data.readers.convention import HIRES_PX, scanpy_library, write_h5ad
from stmdit.io import atomic_path, safe_file_name
from stmdit.sections.mosaic import (
    SectionGeometry,
    SectionResult,
    assemble_mosaic,
    read_real_region,
    synthesize_section,
)

__all__ = [
    "COORDINATE_SYSTEM",
    "SECTION_MODES",
    "VIRTUAL_SUFFIX",
    "section_anndata",
    "section_command",
    "section_spatialdata",
    "write_section_files",
]

VIRTUAL_SUFFIX = "_virtual"
SECTION_MODES = ("seamless", "spots")
COORDINATE_SYSTEM = "global"  # spatialdata-io's name for the full-resolution frame
_MIN_PYRAMID_PX = 256  # SpatialData pyramid levels halve until the image is about this small


def frame_geometry(result: SectionResult) -> SectionGeometry:
    """The canvas grown to the full-resolution frame's origin, coarsened to fit ``HIRES_PX``
    (never finer than the section itself)."""
    g = result.geometry
    far = (g.origin_um[0] + g.width * g.um_per_px, g.origin_um[1] + g.height * g.um_per_px)
    um_per_px = max(g.um_per_px, max(far) / HIRES_PX)
    width, height = (max(1, math.ceil(f / um_per_px - 1e-6)) for f in far)
    return SectionGeometry(um_per_px, (0.0, 0.0), width, height)


def spot_comparisons(result: SectionResult) -> pd.DataFrame:
    """Per spot: tissue fraction of the real and the virtual tile and their mean absolute
    difference (RGB, 0-255), each on the canvas footprint of the spot's tile."""
    n = max(1, round(result.tile_um / result.geometry.um_per_px))
    rows = []
    for tile, (cx, cy) in zip(result.tiles, result.centres_px(), strict=True):
        r0, c0 = max(0, round(cy - n / 2)), max(0, round(cx - n / 2))
        real = result.real[r0 : r0 + n, c0 : c0 + n]
        virtual = np.asarray(Image.fromarray(tile).resize(real.shape[1::-1], Image.Resampling.LANCZOS))
        rows.append(
            {
                "tissue_fraction_real": tissue_fraction(real),
                "tissue_fraction_virtual": tissue_fraction(virtual),
                "real_virtual_mean_abs_diff": float(np.abs(real.astype(np.int16) - virtual).mean()),
            }
        )
    return pd.DataFrame(rows, index=result.spots.index)


def section_anndata(result: SectionResult) -> ad.AnnData:
    """The section as an AnnData with the real and the virtual H&E as two scanpy libraries."""
    if result.expression is None:
        raise ValueError("this SectionResult carries no expression; make it with synthesize_section")
    adata = result.expression.copy()
    for col, values in spot_comparisons(result).items():
        adata.obs[col] = values.to_numpy()
    frame = frame_geometry(result)
    mpp = result.real_image["mpp"]
    real = read_real_region(result.real_image["path"], mpp, result.real_image["image_scale"], frame)
    virtual, _ = assemble_mosaic(
        result.tiles, result.spots[["x_um", "y_um"]].to_numpy(), result.tile_um, frame
    )
    info = dict(adata.uns["stmdit"]["samples"][result.sample])
    xy = adata.obs[["x_px", "y_px"]].to_numpy(dtype=np.float64)
    scalef = mpp / frame.um_per_px  # frame pixels per full-resolution pixel
    adata.uns["spatial"] = {
        result.sample: scanpy_library(info, xy, real, scalef),
        result.sample + VIRTUAL_SUFFIX: scanpy_library(info, xy, virtual, scalef),
    }
    adata.uns["stmdit"] = {
        "samples": {result.sample: info},
        "section": {
            "libraries": {"real": result.sample, "virtual": result.sample + VIRTUAL_SUFFIX},
            "geometry": result.geometry.to_dict(),
            "settings": result.settings,
        },
    }
    return adata


def _multiscale(pixels: np.ndarray, transform):
    from spatialdata.models import Image2DModel

    # Always a pyramid (at least one coarser level), so viewers treat every section alike.
    levels = max(1, int(math.log2(max(pixels.shape[:2]) / _MIN_PYRAMID_PX)))
    return Image2DModel.parse(
        np.ascontiguousarray(pixels.transpose(2, 0, 1)),
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"],
        scale_factors=[2] * levels,
        transformations={COORDINATE_SYSTEM: transform},
    )


def section_spatialdata(result: SectionResult, adata: ad.AnnData | None = None):
    """The section as a SpatialData object (see the module docstring); ``adata`` defaults to
    :func:`section_anndata` of ``result``."""
    try:
        from spatialdata import SpatialData
        from spatialdata.models import ShapesModel, TableModel
        from spatialdata.transformations import Identity, Scale, Sequence, Translation
    except ImportError as err:
        raise ImportError(
            "SpatialData export needs the spatialdata extra: pip install 'stmdit[spatialdata]'"
        ) from err
    adata = section_anndata(result) if adata is None else adata
    mpp, g = result.real_image["mpp"], result.geometry
    # Canvas pixel -> full-resolution pixel: scale by the canvas' microns per pixel, then shift to its origin.
    to_fullres = Sequence(
        [
            Scale([g.um_per_px / mpp] * 2, axes=("x", "y")),
            Translation([g.origin_um[0] / mpp, g.origin_um[1] / mpp], axes=("x", "y")),
        ]
    )
    spots = f"{result.sample}_spots"
    diameter = adata.uns["spatial"][result.sample]["scalefactors"]["spot_diameter_fullres"]
    circles = ShapesModel.parse(
        adata.obsm["spatial"],
        geometry=0,
        radius=np.full(adata.n_obs, diameter / 2),
        index=pd.RangeIndex(adata.n_obs),
        transformations={COORDINATE_SYSTEM: Identity()},
    )
    table = ad.AnnData(X=adata.X, obs=adata.obs.copy(), var=adata.var.copy(), layers=dict(adata.layers))
    table.obsm["spatial"] = adata.obsm["spatial"]
    table.obs["region"] = pd.Categorical([spots] * adata.n_obs)
    table.obs["spot_id"] = np.arange(adata.n_obs)
    table.uns["stmdit"] = adata.uns["stmdit"]
    table = TableModel.parse(table, region=spots, region_key="region", instance_key="spot_id")
    return SpatialData(
        images={
            f"{result.sample}_real": _multiscale(result.real, to_fullres),
            f"{result.sample}{VIRTUAL_SUFFIX}": _multiscale(result.virtual, to_fullres),
        },
        shapes={spots: circles},
        tables={"table": table},
    )


def write_section_files(
    result: SectionResult, out: str | os.PathLike, spatialdata: str | os.PathLike | None = None
) -> dict[str, Path]:
    """Write ``<out>/<sample>_section.h5ad`` and, when ``spatialdata`` is given, the SpatialData
    zarr store there (atomically; an existing one is replaced)."""
    adata = section_anndata(result)
    paths = {"anndata": write_h5ad(adata, Path(out) / f"{safe_file_name(result.sample)}_section.h5ad")}
    if spatialdata is not None:
        sdata = section_spatialdata(result, adata)
        target = Path(spatialdata)
        with atomic_path(target) as tmp:
            sdata.write(tmp)
        paths["spatialdata"] = target
    return paths


@contextlib.contextmanager
def _step_bar(description: str, enabled: bool):
    """A bar over denoising steps; yields the ``on_step(done, total)`` that moves it."""
    with tqdm(desc=description, unit="step", disable=not enabled) as bar:

        def on_step(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        yield on_step


def section_command(
    pipeline: str | os.PathLike,
    dataset: str | os.PathLike,
    sample: str,
    out: str | os.PathLike,
    seed: int = 0,
    guidance_ge: float = defaults.GUIDANCE_GE,
    guidance_morph: float = defaults.GUIDANCE_MORPH,
    steps: int = defaults.STEPS,
    use_morphology: bool = False,
    um_per_px: float | None = None,
    batch_size: int = 16,
    spatialdata: str | os.PathLike | None = None,
    mode: str = "seamless",
    stride: int | None = None,
    bandwidth_um: float | None = None,
    edit: str | os.PathLike | None = None,
    predictor: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict[str, Path]:
    """``stmdit section``: load the pipeline (on the GPU when there is one), synthesise the
    section and write the figures, the geometry and the section's AnnData to ``out``, and its
    SpatialData to ``spatialdata`` when given. ``mode``: ``"seamless"`` (one canvas denoised
    jointly, out of core in ``out/cache/<sample>_canvas`` where a killed run resumes,
    :func:`~stmdit.sections.synthesis.synthesize_seamless`; ``stride`` and
    ``bandwidth_um`` apply) or ``"spots"`` (a tile per spot, assembled, with its tile cache in
    ``out/cache``; ``um_per_px`` applies). ``edit``: an edit config (YAML,
    :class:`~stmdit.sections.edits.EditConfig`) whose region is redrawn and measured
    (:func:`~stmdit.sections.editing.run_edit`, seamless only; its seeds replace ``seed``),
    ``predictor`` a predictor folder whose read-back it measures too; the edit files go beside
    the section's, which are the first seed's unedited section (anchor ``virtual``; anchor
    ``real`` draws no whole section, so only the edit files are written). Returns the written
    paths by role (side_by_side, virtual, geometry, anndata, spatialdata; edit_record,
    edit_slide, edit_figure)."""
    from stmdit.pipeline import STMDiTPipeline
    from stmdit.sections.editing import run_edit
    from stmdit.sections.edits import EditConfig
    from stmdit.sections.synthesis import synthesize_seamless

    if mode not in SECTION_MODES:
        raise ValueError(f"mode must be one of {SECTION_MODES}; got {mode!r}")
    if mode == "spots" and (stride is not None or bandwidth_um is not None):
        raise ValueError("stride and bandwidth_um apply to mode='seamless' only")
    if mode == "seamless" and um_per_px is not None:
        raise ValueError("um_per_px applies to mode='spots' only (seamless works at the model's resolution)")
    if edit is not None and mode == "spots":
        raise ValueError("--edit redraws a region of the seamless canvas; it does not apply to --mode spots")
    if predictor is not None and edit is None:
        raise ValueError("--predictor reads back an edited region; it applies with --edit only")
    # The edit is read before the pipeline is loaded, so that a bad file fails at once.
    edit_config = EditConfig.from_yaml(edit) if edit is not None else None
    pipe = STMDiTPipeline.from_pretrained(pipeline)
    if torch.cuda.is_available():
        pipe.to("cuda")
    pipe.set_progress_bar_config(disable=True)
    common = {"guidance_ge": guidance_ge, "guidance_morph": guidance_morph, "steps": steps,
              "use_morphology": use_morphology, "batch_size": batch_size}  # fmt: skip
    if edit_config is not None:
        with _step_bar(f"edit {sample}", progress) as on_step:
            edited = run_edit(pipe, dataset, sample, edit_config, stride=stride, bandwidth_um=bandwidth_um,
                              predictor=predictor, progress=False, on_step=on_step, **common)  # fmt: skip
        paths = {}
        if edited.section is not None:
            paths = {**edited.section.save(out), **write_section_files(edited.section, out, spatialdata)}
        return {**paths, **edited.save(out)}
    if mode == "seamless":
        # Out of core under the output folder: memory bounded by the canvas' width, and a
        # killed run resumes at its next step.
        with _step_bar(f"section {sample}", progress) as on_step:
            result = synthesize_seamless(
                pipe,
                dataset,
                sample,
                seed=seed,
                stride=stride,
                bandwidth_um=bandwidth_um,
                progress=False,
                on_step=on_step,
                workdir=Path(out) / "cache" / f"{safe_file_name(sample)}_canvas",
                **common,
            )
    else:
        result = synthesize_section(
            pipe, dataset, sample, seed=seed, um_per_px=um_per_px, cache_dir=Path(out) / "cache", **common
        )
    return {**result.save(out), **write_section_files(result, out, spatialdata)}
