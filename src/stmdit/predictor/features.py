"""Context features: the morphology features of a spot's crop, its 3 x 3 sub-spots and its neighbours.

Every crop goes through a frozen morphology encoder (which resizes it to its input size). Real
tiles from a store and GENERATED tiles are treated alike: for generated tiles the sub-spots
come from each generated tile and the neighbours from the generated tiles of the neighbouring
spots, so pass the generated tiles with the obs of the spots they stand for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from stmdit.encoders.morphology import images_to_tensor
from stmdit.predictor.graph import DEEPSPOT_RULE, neighbour_index

SUBSPOT_GRID = 3  # DeepSpot's n_mini_tiles = 9


def _crop_side(tile_px: int, tile_um: float, spot_diameter_um: float) -> int:
    if not (np.isfinite(spot_diameter_um) and spot_diameter_um > 0):
        raise ValueError(f"spot diameter must be a positive number of µm; got {spot_diameter_um}")
    if not (np.isfinite(tile_um) and tile_um > 0):
        raise ValueError(f"tile_um must be a positive number of µm; got {tile_um}")
    if spot_diameter_um > tile_um * (1 + 1e-6):
        raise ValueError(
            f"the spot ({spot_diameter_um} µm) is larger than the tile ({tile_um} µm); the spot crop must lie in the tile"
        )
    side = min(tile_px, int(round(tile_px * spot_diameter_um / tile_um)))
    if side < SUBSPOT_GRID:
        raise ValueError(
            f"a {spot_diameter_um} µm spot spans only {side} px of a {tile_px} px tile of {tile_um} µm; "
            f"it needs at least {SUBSPOT_GRID} px for the {SUBSPOT_GRID} x {SUBSPOT_GRID} sub-spots"
        )
    return side


def _diameters(spot_diameter_um, n: int) -> np.ndarray:
    d = np.asarray(spot_diameter_um, dtype=np.float64)
    if d.ndim == 0:
        return np.full(n, float(d))
    if d.shape != (n,):
        raise ValueError(f"spot_diameter_um must be one number or one per spot ({n}); got shape {d.shape}")
    return d


def _crops(images: torch.Tensor, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, S, S) tiles -> spot crops (B, 3, side, side) and sub-spot crops (B * 9, 3, q, q),
    q = side // 3, sub-spots of a spot consecutive in row-major order."""
    start = (images.shape[-1] - side) // 2
    spot = images[..., start : start + side, start : start + side]
    q = side // SUBSPOT_GRID
    subspots = [
        spot[..., i * q : (i + 1) * q, j * q : (j + 1) * q]
        for i in range(SUBSPOT_GRID)
        for j in range(SUBSPOT_GRID)
    ]
    return spot, torch.stack(subspots, dim=1).flatten(0, 1)


def take_rows(tiles, rows: np.ndarray):
    """Rows of a tile array: numpy, torch, a zarr array (orthogonal indexing) or a row view."""
    return tiles.oindex[rows] if hasattr(tiles, "oindex") else tiles[rows]


def square_images(block, source: str) -> torch.Tensor:
    images = images_to_tensor(block)
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(f"{source}: tiles must be square; got {tuple(images.shape[-2:])} px")
    return images


def spot_crops(tiles, tile_um: float, spot_diameter_um: float) -> torch.Tensor:
    """The spot crops (N, 3, side, side) in [0, 1] of tiles (anything
    :func:`~stmdit.encoders.morphology.images_to_tensor` takes): the central square whose side
    is the spot diameter. Used to fit encoders (e.g. the stain statistics) on what they will see."""
    images = square_images(tiles, "tiles")
    return _crops(images, _crop_side(images.shape[-1], tile_um, spot_diameter_um))[0]


@dataclass
class ContextFeatures:
    """Morphology features of spots in context.

    ``spot`` (N, D): the spot crop's features; ``subspots`` (N, 9, D): the sub-spot crops';
    ``neighbours`` (N, K) int64: rows (into these N) of each spot's neighbours, -1 padding.
    Neighbour features are the neighbours' own spot features, gathered per batch.
    """

    spot: torch.Tensor
    subspots: torch.Tensor
    neighbours: torch.Tensor

    def __post_init__(self):
        n = self.spot.shape[0]
        if (
            self.spot.ndim != 2
            or self.subspots.ndim != 3
            or self.subspots.shape[0] != n
            or self.subspots.shape[2] != self.spot.shape[1]
        ):
            raise ValueError(
                f"spot must be (N, D) and subspots (N, S, D); got {tuple(self.spot.shape)} and {tuple(self.subspots.shape)}"
            )
        if self.neighbours.ndim != 2 or self.neighbours.shape[0] != n:
            raise ValueError(
                f"neighbours must be (N, K) row numbers; got {tuple(self.neighbours.shape)} for N = {n}"
            )
        if self.neighbours.numel() and (self.neighbours.max() >= n or self.neighbours.min() < -1):
            raise ValueError(f"neighbour rows must lie in [0, {n}) or be -1 (padding)")

    def __len__(self) -> int:
        return self.spot.shape[0]

    @property
    def dim(self) -> int:
        return self.spot.shape[1]

    def subset(self, rows) -> ContextFeatures:
        """The features of ``rows``; neighbours outside ``rows`` are dropped, and the neighbour
        index is narrowed to the most neighbours a spot of ``rows`` keeps (see :meth:`compact`)."""
        rows = torch.as_tensor(np.asarray(rows), dtype=torch.long)
        remap = torch.full((len(self) + 1,), -1, dtype=torch.long)  # last entry: padding stays padding
        remap[rows] = torch.arange(len(rows))
        index = remap[self.neighbours[rows]]
        return ContextFeatures(self.spot[rows], self.subspots[rows], index).compact()

    def compact(self) -> ContextFeatures:
        """The same features (tensors shared) with each spot's neighbours first, in their order,
        and the index as wide as the most neighbours of any spot: the width is the number of
        neighbour slots, which DeepSpot's zero padding in training fills (its ``max_n_neighbors``)."""
        present = self.neighbours >= 0
        width = int(present.sum(dim=1).max()) if self.neighbours.numel() else 0
        # A stable sort on "absent" moves present neighbours to the front, keeping their order.
        order = torch.sort((~present).to(torch.int8), dim=1, stable=True).indices
        index = torch.gather(self.neighbours, 1, order)[:, :width]
        return ContextFeatures(self.spot, self.subspots, index.contiguous())

    def batch(self, rows, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Model inputs (spot, subspots, neighbours (B, K, D), neighbour_mask (B, K)) of ``rows``."""
        rows = torch.as_tensor(np.asarray(rows), dtype=torch.long)
        index = self.neighbours[rows]
        mask = index >= 0
        neighbours = self.spot[index.clamp_min(0)]
        out = (self.spot[rows], self.subspots[rows], neighbours, mask)
        return tuple(t.to(device) for t in out) if device is not None else out


@torch.no_grad()
def context_features(
    tiles,
    obs: pd.DataFrame,
    tile_um: float,
    spot_diameter_um: float | Sequence[float],
    encoder,
    batch_size: int = 64,
    neighbours: np.ndarray | None = None,
    progress: bool = True,
    neighbour_rule: str = DEEPSPOT_RULE,
    neighbour_radius: int = 1,
) -> ContextFeatures:
    """Encode every spot's crop and sub-spot crops and link its neighbours.

    ``tiles``: N tiles centred on the spots, row i = ``obs`` row i: uint8 (N, S, S, 3) (numpy,
    a zarr array, or a store's row view), float NHWC in [0, 1], or a float tensor (N, 3, S, S).
    Real tiles from a store and GENERATED tiles are treated alike: for generated tiles the
    sub-spots come from each generated tile and the neighbours from the generated tiles of the
    neighbouring spots, so pass the generated tiles with the obs of the spots they stand for.
    ``tile_um``: the physical side of a tile; ``spot_diameter_um``: the spot diameter (one
    number, or one per spot); the spot crop is the central square of that side.
    ``encoder``: a frozen morphology encoder, ``encoder(images (B, 3, H, W) in [0, 1]) -> (B, D)``;
    it resizes crops to its input size. ``neighbours``: a precomputed :func:`neighbour_index`
    (default: computed from ``obs`` with ``neighbour_rule`` and ``neighbour_radius``; to read
    tiles with a trained predictor, use :func:`~stmdit.predictor.readback.read_expression`,
    which takes both from the predictor). Encoding runs in batches of ``batch_size`` spots
    (10 crops each).
    """
    n = len(tiles)
    if n != len(obs):
        raise ValueError(
            f"{n} tiles but {len(obs)} spots in obs; row i of the tiles must be the tile of obs row i"
        )
    if n == 0:
        raise ValueError("no tiles given")
    index = (
        neighbour_index(obs, neighbour_radius, neighbour_rule)
        if neighbours is None
        else np.asarray(neighbours, dtype=np.int64)
    )
    if index.ndim != 2 or index.shape[0] != n:
        raise ValueError(f"neighbours must be (n_spots, K) = ({n}, K); got shape {index.shape}")
    diameters = _diameters(spot_diameter_um, n)
    if hasattr(encoder, "eval"):
        encoder.eval()
    spot_out: list[torch.Tensor | None] = [None] * n
    sub_out: list[torch.Tensor | None] = [None] * n
    bar = tqdm(total=n, desc="morphology features", unit="spot", disable=not progress)
    # Spots with another crop side (samples with another spot diameter) go in their own batches.
    for diameter in np.unique(diameters):
        rows = np.flatnonzero(diameters == diameter)
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            lo, hi = int(chunk[0]), int(chunk[-1]) + 1
            images = square_images(
                tiles[lo:hi] if hi - lo == len(chunk) else take_rows(tiles, chunk), "tiles"
            )
            spot, subspots = _crops(images, _crop_side(images.shape[-1], tile_um, float(diameter)))
            f_spot, f_sub = _encode(encoder, spot), _encode(encoder, subspots)
            f_sub = f_sub.view(len(chunk), SUBSPOT_GRID**2, -1)
            for j, i in enumerate(chunk):
                spot_out[i], sub_out[i] = f_spot[j], f_sub[j]
            bar.update(len(chunk))
    bar.close()
    return ContextFeatures(torch.stack(spot_out), torch.stack(sub_out), torch.from_numpy(index))


def _encode(encoder, images: torch.Tensor) -> torch.Tensor:
    out = encoder(images)
    if out.ndim != 2 or out.shape[0] != images.shape[0]:
        raise ValueError(
            f"the morphology encoder must return one vector per image, (B, D); got {tuple(out.shape)} "
            "(a TimmMorphologyEncoder needs grid=1 here)"
        )
    return out.detach().float().cpu()
