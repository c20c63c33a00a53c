"""The neighbour graph of spots: which spots of the same sample count as a spot's neighbours.

DeepSpot max-pools the features of a spot's neighbours; this module finds them. Two rules:

* ``"deepspot_box"`` (default, DeepSpot's): every spot of the same sample with
  |Δ array_row| <= radius and |Δ array_col| <= radius, on every grid, as DeepSpot's
  ``compute_neighbors`` (``deepspot/utils/utils_dataloader.py``) queries its array
  coordinates. On a square grid (legacy ST) that is the 8 spots around; on Visium's hexagonal
  grid, whose rows hold their spots 2 columns apart (doubled columns), it is the 4 diagonal
  neighbours only: the 2 spots of the same row are 2 columns away and outside the box.
* ``"hex_ring"`` (an explicit departure, the rule STMDiT used before it recorded one): the
  same box on square grids, but on doubled-column hexagonal grids the spots at most ``radius``
  hexagonal steps away (the ring of 6 at radius 1).

Without array coordinates, a sample's neighbours come from its pixel centres under either
rule (spots within ``radius + 0.5`` pitches): DeepSpot's box on a square grid, the 6-ring on a
hexagonal one, where the box on array coordinates is not defined without them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

DEEPSPOT_RULE = "deepspot_box"
NEIGHBOUR_RULES = (DEEPSPOT_RULE, "hex_ring")


def check_rule(rule: str) -> str:
    if rule not in NEIGHBOUR_RULES:
        raise ValueError(f"neighbour rule must be one of {', '.join(NEIGHBOUR_RULES)}; got {rule!r}")
    return rule


def _grid_offsets(radius: int, hexagonal: bool) -> list[tuple[int, int]]:
    """(row, col) steps to the neighbours within ``radius``.

    Not ``hexagonal``: the box |drow|, |dcol| <= radius (DeepSpot's query). ``hexagonal``, for
    doubled-column grids (a row's spots 2 columns apart, odd rows shifted by 1): spots at most
    ``radius`` hexagonal steps away, |drow| + max(0, (|dcol| - |drow|) / 2) <= radius with
    drow + dcol even (6 at radius 1).
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


def _array_neighbours(rows: np.ndarray, cols: np.ndarray, radius: int, rule: str) -> list[list[int]]:
    hexagonal = rule == "hex_ring" and _is_hexagonal(rows, cols)
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


def neighbour_index(obs: pd.DataFrame, radius: int = 1, rule: str = DEEPSPOT_RULE) -> np.ndarray:
    """For each spot, the row numbers (into ``obs``) of its neighbours: spots of the same
    ``sample_id`` within ``radius`` under ``rule`` (see the module docstring).

    Returns an int64 array (n_spots, K), K the largest neighbour count, padded with -1.

    Array coordinates (``array_row``, ``array_col``) define the neighbourhood when a sample has
    them for every spot. ``rule="deepspot_box"`` (DeepSpot's): the box |Δrow|, |Δcol| <= radius
    on any grid (8 interior neighbours on a square grid, 4 on Visium's doubled columns);
    ``rule="hex_ring"``: the box on square grids and the ring of 6 on grids detected as
    doubled-column hexagonal (a constant row + col parity). A sample without array coordinates
    falls back to its pixel centres (``x_px``, ``y_px``) under either rule: spots within 1.5 x
    the spot pitch (at radius 1).

    The evaluation passes the obs of generated tiles here, so a generated spot's neighbours are
    the generated tiles of its neighbouring spots.
    """
    check_rule(rule)
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
                np.round(arow).astype(np.int64), np.round(acol).astype(np.int64), int(radius), rule
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
