"""Measurements of a virtual section image that need no knowledge of how it was made.

* :func:`seam_score`: how strongly the image shows a periodic grid of seams (window or tile
  borders) along its rows or columns, wherever that grid lies.
* :func:`tissue_coverage`: the fraction of the real section's tissue that virtual tissue
  covers, both on the same canvas.
* :func:`near_spots`: the part of a canvas within reach of the measured spots, where the
  expression says what the tissue is. The real tissue a virtual section is measured against
  (and the part a seamless section draws) is the real tissue mask within ``SPOT_REACH``
  pitches of a spot: a tissue mask alone counts tinted glass as tissue on some slides (her2st
  C4's pink glass: 88% of its canvas), while spots are kept only on tissue.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import distance_transform_edt
from scipy.spatial import cKDTree

from stmdit.data.images import tissue_mask, tissue_threshold

__all__ = ["GLASS_LEVEL", "SPOT_REACH", "near_spots", "pitch_um", "seam_score", "tissue_coverage"]

# A pixel whose three channels all exceed this is glass (or the white background of a mosaic).
GLASS_LEVEL = 220
# Pitches from the nearest spot that still belong to the spots' tissue: every point of a square
# grid's cell lies within pitch / sqrt(2) of a corner spot (a hexagonal grid's within pitch / sqrt(3)).
SPOT_REACH = 0.75


def _check_rgb(image: np.ndarray, name: str) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(
            f"{name} must be an RGB uint8 array of shape (H, W, 3); got {image.dtype} {image.shape}"
        )
    return image


def _edge_profile(grey: np.ndarray, tissue: np.ndarray, min_tissue: float, glass_edges: bool) -> np.ndarray:
    """g(j) along the second axis (NaN where excluded); see :func:`seam_score`."""
    valid = (tissue[:, 1:] | tissue[:, :-1]) if glass_edges else (tissue[:, 1:] & tissue[:, :-1])
    step = np.abs(np.diff(grey, axis=1))
    counts = valid.sum(axis=0)
    sums = np.where(valid, step, 0.0).sum(axis=0)
    kept = counts >= max(1.0, min_tissue * grey.shape[0])
    return np.where(kept, sums / np.maximum(counts, 1), np.nan)


def _fold_scores(profile: np.ndarray, periods: range) -> tuple[np.ndarray, np.ndarray]:
    """S_p and the peak residue r*_p of ``profile`` for each period p (NaN: nothing to fold)."""
    kept = np.flatnonzero(np.isfinite(profile))
    scores, phases = np.full(len(periods), np.nan), np.zeros(len(periods), int)
    if len(kept) == 0 or not profile[kept].mean() > 0:
        return scores, phases
    values, scale = profile[kept], profile[kept].mean()
    for i, p in enumerate(periods):
        residues = kept % p
        n = np.bincount(residues, minlength=p)
        used = n >= max(1.0, n.max() / 2)
        if used.sum() < 2:
            continue
        folded = np.bincount(residues, weights=values, minlength=p)[used] / n[used]
        scores[i] = (folded.max() - np.median(folded)) / scale
        phases[i] = np.flatnonzero(used)[np.argmax(folded)]
    return scores, phases


def seam_score(
    image: np.ndarray,
    min_period: int = 8,
    max_period: int | None = None,
    tile: int | None = None,
    mask: np.ndarray | None = None,
    min_tissue: float = 0.1,
    glass_edges: bool = True,
    period_tolerance: float = 0.9,
) -> dict:
    """How strongly an RGB uint8 image (H, W, 3) shows a periodic grid of seams, of any phase.

    For columns (axis ``"x"``; rows, axis ``"y"``, are the same on the transposed image):

    1. ``I`` = the mean of the R, G and B values (float); ``T`` = the tissue mask: ``mask`` if
       given (bool, (H, W)), else the pixels that are not glass (not all three channels > 220).
    2. Edge profile, for j = 0 .. W - 2, over the rows i where the pixel pair
       ``(i, j), (i, j + 1)`` is *valid*:
       ``g(j) = mean over valid i of |I[i, j + 1] - I[i, j]|``.
       With ``glass_edges`` (default) a pair is valid when at least one of its pixels is tissue,
       so the border of a tile against glass (the gaps of a legacy-ST mosaic) is an edge;
       without, both must be tissue, so only seams inside tissue count. Glass-glass pairs never
       count, so glass neither dilutes the profile nor adds edges. Columns with fewer than
       ``max(1, min_tissue * H)`` valid rows are excluded. ``g(j)`` is the edge strength of the
       border between columns j and j + 1.
    3. For each integer period p in ``[min_period, max_period]``, fold the kept columns: for
       each residue r, ``n_p(r)`` = the number of kept j with ``j mod p == r`` and
       ``F_p(r)`` = the mean of their ``g(j)``; residues with ``n_p(r) < max_r n_p(r) / 2``
       are left out (a few columns among glass are too noisy to compare), and
       ``S_p = (max_r F_p(r) - median_r F_p(r)) / (mean of g(j) over all kept j)``.
       A seam grid of period p and phase r adds edge strength to every ``g(j)`` with
       ``j mod p == r``, so it raises ``F_p(r)`` alone, while tissue without seams folds to a
       nearly flat ``F_p`` (S_p of a few tenths, most at long periods, which average fewer
       columns). A grid of period p shows as strongly at 2p, 3p, ... and at half strength
       at p / 2.
    4. The axis score is ``max_p S_p`` (NaN when no period can be folded: too few columns, or
       no edges at all); the image's ``score`` is the larger axis score.

    ``max_period`` defaults to ``1.5 * tile`` when ``tile`` (the window side in pixels) is
    given, else to a third of the axis length (at least three repeats); it is capped at half
    the profile length. The reported ``period`` is the smallest p of the winning axis with
    ``S_p >= period_tolerance * score`` (the fundamental rather than a multiple that noise
    lifted a little higher) and ``phase`` its peak residue r: the seams lie between columns
    (or rows) ``r + k * period`` and ``r + k * period + 1``.

    A single long straight tissue/glass border (the cut edge of a canvas full of tissue) is an
    edge too and, on an axis with few kept columns, can score high: pass ``mask`` or
    ``glass_edges=False`` to measure inside tissue only.

    Returns ``{"score", "axis", "period", "phase", "x": {...}, "y": {...}}``, the last two
    with the ``score``, ``period`` and ``phase`` of each axis.
    """
    image = _check_rgb(image, "image")
    if mask is None:
        tissue = ~(image > GLASS_LEVEL).all(axis=-1)
    else:
        tissue = np.asarray(mask)
        if tissue.dtype != bool or tissue.shape != image.shape[:2]:
            raise ValueError(
                f"mask must be a bool array of shape {image.shape[:2]} (the image's H, W); "
                f"got {tissue.dtype} {tissue.shape}"
            )
    if min_period < 2:
        raise ValueError(f"min_period must be >= 2; got {min_period}")
    grey = image.astype(np.float32).mean(axis=-1)
    per_axis = {}
    for axis, (g, t) in {"x": (grey, tissue), "y": (grey.T, tissue.T)}.items():
        n = g.shape[1] - 1  # profile length
        top = max_period if max_period is not None else int(1.5 * tile) if tile else g.shape[1] // 3
        periods = range(min_period, min(top, n // 2) + 1)
        scores, phases = _fold_scores(_edge_profile(g, t, min_tissue, glass_edges), periods)
        if np.isnan(scores).all():
            per_axis[axis] = {"score": float("nan"), "period": None, "phase": None}
            continue
        best = np.nanmax(scores)
        i = int(np.flatnonzero(scores >= period_tolerance * best)[0])
        per_axis[axis] = {"score": float(best), "period": periods[i], "phase": int(phases[i])}
    axis = max(per_axis, key=lambda a: -np.inf if np.isnan(per_axis[a]["score"]) else per_axis[a]["score"])
    return {**per_axis[axis], "axis": axis, **per_axis}


def _as_mask_input(value: np.ndarray, name: str) -> np.ndarray:
    """``value`` when it is a bool (H, W) mask or an RGB uint8 (H, W, 3) image, else ValueError."""
    value = np.asarray(value)
    if (value.ndim == 2 and value.dtype == bool) or (
        value.ndim == 3 and value.shape[-1] == 3 and value.dtype == np.uint8
    ):
        return value
    raise ValueError(
        f"{name} must be a bool tissue mask (H, W) or an RGB uint8 image (H, W, 3); got {value.dtype} {value.shape}"
    )


def _as_mask(value: np.ndarray, name: str, threshold: float | None) -> np.ndarray:
    value = _as_mask_input(value, name)
    return value if value.ndim == 2 else tissue_mask(value, threshold)


def tissue_coverage(virtual: np.ndarray, real_mask: np.ndarray, threshold: float | None = None) -> float:
    """The fraction of the real section's tissue that virtual tissue covers, on one canvas.

    ``coverage = |V & R| / |R|`` with R the real tissue mask and V the virtual one (glass and
    the white background of a mosaic are not tissue). Each is given as a bool (H, W) mask or
    as an RGB uint8 (H, W, 3) image, whose mask is then
    :func:`stmdit.data.images.tissue_mask` with the saturation ``threshold``. The default
    threshold is the real image's :func:`~stmdit.data.images.tissue_threshold` when
    ``real_mask`` is an image (one threshold for both, as for crops of one slide), else the
    virtual image's own. NaN when the real mask holds no tissue.
    """
    real = np.asarray(real_mask)
    if threshold is None and real.ndim == 3:
        threshold = tissue_threshold(_as_mask_input(real, "real_mask"))
    v = _as_mask(virtual, "virtual", threshold)
    r = _as_mask(real, "real_mask", threshold)
    if v.shape != r.shape:
        raise ValueError(f"virtual {v.shape} and real_mask {r.shape} must cover the same canvas (H, W)")
    n = int(r.sum())
    return float((v & r).sum() / n) if n else float("nan")


def near_spots(geometry, spot_xy_um: np.ndarray, reach_um: float) -> np.ndarray:
    """bool (height, width) of a canvas (:class:`~stmdit.sections.mosaic.SectionGeometry`): the
    pixels whose centres lie within ``reach_um`` of a spot centre (N, 2: x, y microns)."""
    if not reach_um > 0:
        raise ValueError(f"reach_um must be > 0; got {reach_um}")
    spots = np.zeros((geometry.height, geometry.width), bool)
    cols, rows = np.floor(geometry.to_canvas(np.asarray(spot_xy_um, float))).astype(int).T
    inside = (rows >= 0) & (rows < geometry.height) & (cols >= 0) & (cols < geometry.width)
    spots[rows[inside], cols[inside]] = True
    if not spots.any():
        return spots
    return distance_transform_edt(~spots) * geometry.um_per_px <= reach_um


def pitch_um(spot_xy: np.ndarray) -> float:
    """The spot pitch: the median distance from each spot (N, 2) to its nearest neighbour."""
    spot_xy = np.asarray(spot_xy, dtype=float)
    if len(spot_xy) < 2:
        raise ValueError("the pitch needs at least two spots")
    distances, _ = cKDTree(spot_xy).query(spot_xy, k=2)
    return float(np.median(distances[:, 1]))
