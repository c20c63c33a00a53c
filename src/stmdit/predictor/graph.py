"""The neighbour graph of spots: which spots of the same sample lie within array radius 1.

DeepSpot max-pools the features of a spot's neighbours; this module finds them, on square
grids (legacy ST), Visium's hexagonal grid (doubled columns) or, without array coordinates,
from the pixel centres.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree


def _grid_offsets(radius: int, hexagonal: bool) -> list[tuple[int, int]]:
    """(row, col) steps to the neighbours within ``radius``.

    Square grids (legacy ST, square pseudo-spot grids): the box |drow|, |dcol| <= radius, as
    DeepSpot queries its array coordinates (8 neighbours at radius 1). Hexagonal grids with
    doubled columns (Visium, and the readers' ``hex`` grids, where a row's spots are 2 columns
    apart and odd rows are shifted by 1): spots at most ``radius`` hexagonal steps away, i.e.
    |drow| + max(0, (|dcol| - |drow|) / 2) <= radius with drow + dcol even (6 at radius 1).
    """
    steps = []
    for dr in range(-radius, radius + 1):
        if hexagonal:
            for dc in range(-2 * radius, 2 * radius + 1):
                if (dr + dc) % 2 == 0 and abs(dr) + max(0, (abs(dc) - abs(dr)) // 2) <= radius:
                    steps.append((dr, dc))
        else:
            steps.extend((dr, dc) for dc in range(-radius, radius + 1))
    return [s for s in steps if s != (0, 0)]


def _is_hexagonal(rows: np.ndarray, cols: np.ndarray) -> bool:
    """A doubled-column hexagonal grid: every spot's row + col has the same parity (a square
    grid section of more than one spot never has that)."""
    parity = (rows + cols) % 2
    return len(rows) > 1 and bool((parity == parity[0]).all())


def _array_neighbours(rows: np.ndarray, cols: np.ndarray, radius: int, grid: str | None) -> list[list[int]]:
    hexagonal = _is_hexagonal(rows, cols) if grid is None else grid == "hex"
    where = {(r, c): i for i, (r, c) in enumerate(zip(rows.tolist(), cols.tolist(), strict=True))}
    offsets = _grid_offsets(radius, hexagonal)
    return [
        [j for dr, dc in offsets if (j := where.get((r + dr, c + dc))) is not None and j != i]
        for i, (r, c) in enumerate(zip(rows.tolist(), cols.tolist(), strict=True))
    ]


def _pixel_neighbours(xy: np.ndarray, radius: int) -> list[list[int]]:
    """Spots within (radius + 0.5) pitches, the pitch being the median nearest-spot distance:
    1.5 pitches at radius 1 take in a square grid's diagonals (1.41) and a hexagonal grid's
    ring (1.0) but not the next ring (2.0 and 1.73)."""
    if len(xy) < 2:
        return [[] for _ in range(len(xy))]
    tree = cKDTree(xy)
    nearest = tree.query(xy, k=2)[0][:, 1]
    pitch = float(np.median(nearest))
    if not pitch > 0:
        raise ValueError("spot centres coincide: cannot estimate the spot pitch from x_px, y_px")
    out = []
    for i, found in enumerate(tree.query_ball_point(xy, r=(radius + 0.5) * pitch)):
        found = [j for j in found if j != i]
        out.append(sorted(found, key=lambda j: (float(np.hypot(*(xy[j] - xy[i]))), j)))
    return out


def _numeric(obs: pd.DataFrame, column: str, rows: np.ndarray) -> np.ndarray | None:
    if column not in obs.columns:
        return None
    values = pd.to_numeric(obs[column].iloc[rows], errors="coerce").to_numpy(dtype=np.float64)
    return values if np.isfinite(values).all() else None


def neighbour_index(obs: pd.DataFrame, radius: int = 1, grid: str | None = None) -> np.ndarray:
    """For each spot, the row numbers (into ``obs``) of its neighbours: spots of the same
    ``sample_id`` within array radius ``radius``.

    Returns an int64 array (n_spots, K), K the largest neighbour count, padded with -1.

    Array coordinates (``array_row``, ``array_col``) define the neighbourhood when a sample has
    them for every spot; see :func:`_grid_offsets` for square and hexagonal grids. ``grid``
    forces ``"square"`` or ``"hex"``; by default it is detected per sample (Visium-style
    hexagonal grids have a constant row + col parity). A sample without array coordinates
    falls back to its pixel centres (``x_px``, ``y_px``): spots within 1.5 x the spot pitch (at
    radius 1), which on a regular grid gives the same neighbours. Interior spots have 8
    neighbours on a square grid and 6 on a hexagonal one; edge spots fewer.

    The evaluation passes the obs of generated tiles here, so a generated spot's neighbours are
    the generated tiles of its neighbouring spots.
    """
    if grid not in (None, "square", "hex"):
        raise ValueError(f"grid must be 'square', 'hex' or None (detect); got {grid!r}")
    if int(radius) != radius or radius < 1:
        raise ValueError(f"radius must be a positive integer; got {radius!r}")
    n = len(obs)
    samples = (
        obs["sample_id"].astype(str).to_numpy() if "sample_id" in obs.columns else np.zeros(n, dtype=str)
    )
    lists: list[list[int]] = [[] for _ in range(n)]
    for sample in pd.unique(samples):
        rows = np.flatnonzero(samples == sample)
        arow, acol = _numeric(obs, "array_row", rows), _numeric(obs, "array_col", rows)
        if arow is not None and acol is not None:
            local = _array_neighbours(
                np.round(arow).astype(np.int64), np.round(acol).astype(np.int64), int(radius), grid
            )
        else:
            x, y = _numeric(obs, "x_px", rows), _numeric(obs, "y_px", rows)
            if x is None or y is None:
                raise ValueError(
                    f"sample {sample!r}: neighbours need array_row/array_col or x_px/y_px for every spot; "
                    f"obs has columns {list(obs.columns)}"
                )
            local = _pixel_neighbours(np.column_stack([x, y]), int(radius))
        for i, found in zip(rows, local, strict=True):
            lists[i] = [int(rows[j]) for j in found]
    k = max((len(found) for found in lists), default=0)
    out = np.full((n, k), -1, dtype=np.int64)
    for i, found in enumerate(lists):
        out[i, : len(found)] = found
    return out
