"""Region edits at section scale: change the expression of one region of a section and redraw
only that region, the rest of the canvas kept as it was.

An edit is a region (a polygon in microns of the sample's frame, a list of spots, or the spots
of an ``obs`` value such as a cluster), a list of changes in the vocabulary of
:mod:`stmdit.experiments.simulate` (fold change, knockout, quantile, set; genes or gene sets)
and an anchor, the canvas to keep outside the region: ``virtual`` (the unedited virtual
canvas, same seed) or ``real`` (the real H&E mapped to the model's space, pixel models).

* :func:`region_mask`: the region rasterised on the canvas (:class:`~stmdit.sections.mosaic.SectionGeometry`),
  a pixel in the region when its centre is (polygon: inside it; spots: within the spot radius
  of a selected spot).
* :func:`region_spots`: the spots whose expression the edit changes (polygon: the spots whose
  centres lie inside it; spots and an obs value: the spots they name).
* :func:`keep_mask`: 1 outside the region and a transition band around it, 0 inside the
  region, a raised cosine of the distance to the region across the band.
* :func:`edited_expression`: the spots in the region perturbed by :func:`~stmdit.experiments.simulate.perturb`.
* :func:`edit_canvas`: :func:`~stmdit.sections.seamless.denoise_canvas` with the edited
  conditions and the anchor imposed where ``keep`` is 1 (RePaint-style), so the region is drawn
  in agreement with what surrounds it; :func:`local_change` measures what changed where.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, ClassVar, Literal

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from matplotlib.path import Path as PolygonPath
from pydantic import AfterValidator, Discriminator, Field, Tag, TypeAdapter
from scipy.ndimage import distance_transform_edt

from stmdit.config import ConfigModel, PositiveFloat
from stmdit.experiments.simulate import Perturbation, _perturbations, perturb
from stmdit.sections.mosaic import SectionGeometry
from stmdit.sections.seamless import denoise_canvas

__all__ = [
    "EditConfig",
    "ObsRegion",
    "PolygonRegion",
    "SpotsRegion",
    "edit_canvas",
    "edited_expression",
    "keep_mask",
    "local_change",
    "region_mask",
    "region_spots",
    "transition_band",
]

REGION_KEYS = ("polygon_um", "spots", "obs")


# -- the config ---------------------------------------------------------------------------------------


class PolygonRegion(ConfigModel):
    """``region: {polygon_um: [[x, y], ...]}``: vertices in microns of the sample's frame."""

    tag: ClassVar[str] = "polygon_um"
    polygon_um: Annotated[
        list[Annotated[list[float], Field(min_length=2, max_length=2)]], Field(min_length=3)
    ]


class SpotsRegion(ConfigModel):
    """``region: {spots: [names]}``: the disks of these spots (obs names)."""

    tag: ClassVar[str] = "spots"
    spots: Annotated[list[str], Field(min_length=1)]


class ObsRegion(ConfigModel):
    """``region: {obs: {column: value}}``: the disks of the spots whose ``obs[column]`` is ``value``
    (compared as text, so a cluster given as 3 matches a column holding "3")."""

    tag: ClassVar[str] = "obs"
    obs: Annotated[dict[str, str | int], Field(min_length=1, max_length=1)]


def _region_kind(value) -> str | None:
    keys = set(value) if isinstance(value, dict) else {k for k in REGION_KEYS if hasattr(value, k)}
    found = keys & set(REGION_KEYS)
    return next(iter(found)) if len(found) == 1 else None


Region = Annotated[
    Annotated[PolygonRegion, Tag("polygon_um")]
    | Annotated[SpotsRegion, Tag("spots")]
    | Annotated[ObsRegion, Tag("obs")],
    Discriminator(
        _region_kind,
        custom_error_type="region_kind",
        custom_error_message="a region has exactly one of the keys polygon_um, spots or obs",
    ),
]
_REGION = TypeAdapter(Region)


def _changes(changes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    _perturbations({"changes": changes})  # simulate's checks: each entry builds a Perturbation
    return changes


class EditConfig(ConfigModel):
    """One region edit: where (``region``), what (``changes``, simulate's perturbations), what
    to keep outside (``anchor``), how wide the transition is (``band_um``; None: half a tile,
    :meth:`band`) and the seeds to draw it with."""

    config_name: ClassVar[str] = "edit config"

    region: Region
    changes: Annotated[list[dict[str, Any]], Field(min_length=1), AfterValidator(_changes)]
    anchor: Literal["virtual", "real"] = "virtual"
    band_um: PositiveFloat | None = None
    seeds: Annotated[list[int], Field(min_length=1)] = [0]
    gene_sets: dict[str, list[str]] = {}

    def perturbations(self) -> list[Perturbation]:
        return [Perturbation(**c) for c in self.changes]

    def band(self, tile_um: float) -> float:
        """The band width in microns: ``band_um``, or half a tile of ``tile_um``."""
        return self.band_um if self.band_um is not None else tile_um / 2


# -- masks ---------------------------------------------------------------------------------------------


def _pixel_centres(geometry: SectionGeometry) -> np.ndarray:
    """Canvas coordinates (H * W, 2: col, row) of every pixel centre, row-major."""
    rows, cols = np.mgrid[0 : geometry.height, 0 : geometry.width]
    return np.c_[cols.ravel() + 0.5, rows.ravel() + 0.5]


def _selected_spots(region, spots_obs: pd.DataFrame) -> np.ndarray:
    names = spots_obs.index.astype(str)
    if isinstance(region, SpotsRegion):
        missing = [s for s in region.spots if s not in set(names)]
        if missing:
            raise ValueError(f"spots not in the data: {missing[:5]}; spots are e.g. {list(names[:5])}")
        return np.isin(names, region.spots)
    ((column, value),) = region.obs.items()
    if column not in spots_obs.columns:
        raise ValueError(f"obs has no column {column!r}; columns are {list(map(str, spots_obs.columns))}")
    values = spots_obs[column].astype(str).to_numpy()
    selected = values == str(value)
    if not selected.any():
        raise ValueError(f"no spot has {column} = {value!r}; values are {sorted(set(values))[:20]}")
    return selected


def _as_region(region):
    return _REGION.validate_python(region) if isinstance(region, dict) else region


def region_spots(region, spots_obs: pd.DataFrame, spot_xy_um: np.ndarray) -> np.ndarray:
    """bool (N,): the spots of ``spots_obs`` (indexed by name, in the order of ``spot_xy_um``
    (N, 2: x, y microns)) that the region holds: for a polygon those whose centres lie inside
    it, for spots and an obs value those it names."""
    region = _as_region(region)
    if isinstance(region, PolygonRegion):
        return PolygonPath(np.asarray(region.polygon_um, float)).contains_points(
            np.asarray(spot_xy_um, float)
        )
    return _selected_spots(region, spots_obs)


def region_mask(
    region,
    geometry: SectionGeometry,
    spots_obs: pd.DataFrame | None = None,
    spot_xy_um: np.ndarray | None = None,
    spot_radius_um: float | None = None,
) -> np.ndarray:
    """The region (an :class:`EditConfig` region or its dict) as a bool (height, width) canvas
    mask: a polygon holds the pixels whose centres lie inside it; spots and an obs value hold
    the pixels within ``spot_radius_um`` of a selected spot (``spots_obs``: one row per spot,
    indexed by name, in the order of ``spot_xy_um`` (N, 2: x, y microns))."""
    region = _as_region(region)
    centres = _pixel_centres(geometry)
    if isinstance(region, PolygonRegion):
        vertices = geometry.to_canvas(np.asarray(region.polygon_um, float))
        mask = PolygonPath(vertices).contains_points(centres)
        return mask.reshape(geometry.height, geometry.width)
    if spots_obs is None or spot_xy_um is None or spot_radius_um is None:
        raise ValueError("a spots or obs region needs spots_obs, spot_xy_um and spot_radius_um")
    if spot_radius_um <= 0 or len(spots_obs) != len(spot_xy_um):
        raise ValueError(
            f"need spot_radius_um > 0 and one position per spot; got {spot_radius_um}, "
            f"{len(spot_xy_um)} positions for {len(spots_obs)} spots"
        )
    selected = _selected_spots(region, spots_obs)
    radius_px = spot_radius_um / geometry.um_per_px
    mask = np.zeros((geometry.height, geometry.width), bool)
    for cx, cy in geometry.to_canvas(np.asarray(spot_xy_um, float)[selected]):
        r0, r1 = max(0, int(cy - radius_px)), min(geometry.height, int(np.ceil(cy + radius_px)) + 1)
        c0, c1 = max(0, int(cx - radius_px)), min(geometry.width, int(np.ceil(cx + radius_px)) + 1)
        rows, cols = np.mgrid[r0:r1, c0:c1]
        mask[r0:r1, c0:c1] |= (cols + 0.5 - cx) ** 2 + (rows + 0.5 - cy) ** 2 <= radius_px**2
    return mask


def _distance_to(region: np.ndarray, band_px: float) -> np.ndarray:
    if band_px <= 0:
        raise ValueError(f"band_px must be > 0; got {band_px}")
    region = np.asarray(region, bool)
    if not region.any():
        return np.full(region.shape, np.inf)
    return distance_transform_edt(~region)


def keep_mask(region: np.ndarray, band_px: float) -> np.ndarray:
    """float32 (H, W): 0 in the region, 1 at ``band_px`` pixels from it and beyond, and
    ``(1 - cos(pi d / band_px)) / 2`` at distance ``d`` (pixel centres) across the band."""
    d = np.clip(_distance_to(region, band_px) / band_px, 0, 1)
    return ((1 - np.cos(np.pi * d)) / 2).astype(np.float32)


def transition_band(region: np.ndarray, band_px: float) -> np.ndarray:
    """bool (H, W): the pixels outside the region less than ``band_px`` from it."""
    d = _distance_to(region, band_px)
    return (d > 0) & (d < band_px)


# -- expression ----------------------------------------------------------------------------------------


def edited_expression(
    adata_spots: ad.AnnData,
    in_region: np.ndarray,
    changes: Sequence[Perturbation | dict],
    gene_sets: dict[str, list[str]] | None = None,
    reference: ad.AnnData | None = None,
) -> ad.AnnData:
    """A copy of ``adata_spots`` whose spots in the region (bool, one per spot) have the
    ``changes`` applied by :func:`~stmdit.experiments.simulate.perturb`, spot by spot (quantiles
    over ``reference``, default all of ``adata_spots``); the counts (layer ``counts`` when
    present, else ``X``) of the other spots are unchanged. ``obs['edited']`` marks the region."""
    in_region = np.asarray(in_region, bool)
    if in_region.shape != (adata_spots.n_obs,):
        raise ValueError(f"in_region needs one value per spot ({adata_spots.n_obs}); got {in_region.shape}")
    perturbations = [c if isinstance(c, Perturbation) else Perturbation(**c) for c in changes]
    reference = adata_spots if reference is None else reference
    rows = np.flatnonzero(in_region)
    new = np.concatenate(
        [perturb(adata_spots[[i]], perturbations, reference, gene_sets).X for i in rows]
    ) if len(rows) else np.zeros((0, adata_spots.n_vars), np.float32)  # fmt: skip
    out = adata_spots.copy()
    key = "counts" if "counts" in out.layers else None
    x = out.layers[key] if key else out.X
    if sp.issparse(x):
        x = x.tolil()
        x[rows] = new
        x = x.tocsr()
    else:
        x = np.array(x, dtype=np.result_type(x.dtype, np.float32))
        x[rows] = new
    if key:
        out.layers[key] = x
    else:
        out.X = x
    out.obs["edited"] = in_region
    return out


# -- the edited canvas --------------------------------------------------------------------------------


def edit_canvas(
    pipe,
    height: int,
    width: int,
    corners: Sequence[tuple[int, int]],
    conditions_edited,
    known: torch.Tensor,
    keep: torch.Tensor | np.ndarray,
    *,
    seed: int,
    **kwargs,
) -> torch.Tensor:
    """The canvas redrawn with the edited window conditions, ``known`` (the anchor, model's
    space) imposed where ``keep`` (:func:`keep_mask`) is 1: :func:`denoise_canvas` with
    ``known`` and ``keep`` (``kwargs``: its other options). Use the unedited run's seed for a
    virtual anchor, so the imposed part is what that run saw."""
    keep = torch.as_tensor(np.asarray(keep, np.float32)) if isinstance(keep, np.ndarray) else keep
    return denoise_canvas(
        pipe, height, width, conditions_edited, corners, seed=seed, known=known, keep=keep, **kwargs
    )


def local_change(
    edited_uint8: np.ndarray, unedited_uint8: np.ndarray, region: np.ndarray, band: np.ndarray
) -> dict[str, float]:
    """Mean absolute difference (grey levels / 255) between two uint8 canvases (H, W[, 3]):
    ``outside`` the region and band, in the ``band`` and ``inside`` the region (NaN if empty)."""
    edited, unedited = np.asarray(edited_uint8), np.asarray(unedited_uint8)
    if edited.shape != unedited.shape or edited.shape[:2] != np.shape(region):
        raise ValueError(f"canvases {edited.shape} and {unedited.shape} and region {np.shape(region)} differ")
    diff = np.abs(edited.astype(np.float64) - unedited.astype(np.float64)) / 255
    diff = diff.mean(axis=-1) if diff.ndim == 3 else diff
    region, band = np.asarray(region, bool), np.asarray(band, bool)

    def mean(where: np.ndarray) -> float:
        return float(diff[where].mean()) if where.any() else float("nan")

    return {"outside": mean(~(region | band)), "band": mean(band & ~region), "inside": mean(region)}
