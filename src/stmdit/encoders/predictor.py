"""The expression predictor: spot gene expression from frozen morphology features, DeepSpot-style.

STMDiT needs to read expression back off H&E tiles twice: the transcriptomic-fidelity metric
runs a predictor on generated tiles and compares its output with the expression the tiles were
conditioned on, and the H&E-only extension (PTPL) trains on predicted pseudo-labels. The
predictor follows DeepSpot (Nonchev et al. 2025, github.com/ratschlab/DeepSpot), a deep-sets
model over three views of a spot:

* the **spot**: the central square of the tile with side = the spot diameter (DeepSpot crops
  at the spot diameter);
* its **sub-spots**: that square cut into 3 x 3 non-overlapping crops (row-major; like
  DeepSpot, a remainder of fewer than 3 pixels on the right and bottom is left out), whose
  phi outputs are **summed**;
* its **neighbours**: the spot crops of the spots of the same sample within array radius 1,
  whose phi outputs are **max-pooled** over the neighbours present.

Every crop goes through the frozen morphology encoder (which resizes it to its input size);
phi = Linear -> Dropout -> ReLU in ``n_phi`` independent copies combined by their median, rho =
Dropout -> ReLU -> Linear on the concatenated 3 x hidden vector in ``n_rho`` copies averaged.
Targets are log1p CP10k of highly variable genes, standardised with the training spots' mean
and standard deviation, which travel with the model as buffers.

For GENERATED tiles, :func:`context_features` is called on the generated tiles with the obs of
the spots they were generated for: the sub-spots then come from the generated tile itself and
the neighbours from the generated tiles of the neighbouring spots, exactly as for real tiles.

Where this differs from DeepSpot (``deepspot/spot/model.py``, ``spot/dataloader.py`` and
``utils/utils_image.py`` of its repository):

* neighbours: DeepSpot zero-pads neighbour *features* to the largest neighbour count and
  max-pools over the padding too during training, and at inference encodes a black image for a
  spot without neighbours; here padding is masked out and a spot without neighbours gets a
  zero neighbour vector, in training and inference alike;
* Visium's hexagonal grid: DeepSpot's radius is a box on the array coordinates
  (|dx|, |dy| <= radius), right for square grids (8 neighbours); on Visium's array_row /
  array_col (a row's spots 2 columns apart) that box reaches the 4 diagonal neighbours but not
  the 2 in the same row. Here radius 1 on a hexagonal grid is the ring of the 6 spots one pitch
  away (see :func:`neighbour_index`);
* rho: DeepSpot's rho ends in a Dropout(0.1) on the output, which only acts in training; it is
  left out;
* genes: DeepSpot picks 5,000 genes with scanpy's ``seurat_v3`` (per-sample batch key) on raw
  counts; here :func:`~stmdit.encoders.expression.select_variable_genes` ranks genes by the
  variance of log1p CP10k on the training spots (no batch key, no scanpy dependency).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from tqdm.auto import tqdm

from stmdit.encoders.expression import align_to_panel, log1p_cp10k, select_variable_genes
from stmdit.encoders.factory import build_morphology_encoder, describe
from stmdit.encoders.morphology import images_to_tensor
from stmdit.evaluate.fidelity import pearson_per_gene

logger = logging.getLogger(__name__)

SUBSPOT_GRID = 3  # DeepSpot's n_mini_tiles = 9
ENCODER_FOLDER = "morphology_encoder"
TRAINING_RECORD = "training.json"
PREDICTION_KEY = "stmdit_prediction"


# -- the neighbour graph ------------------------------------------------------------------


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
    return [[j for dr, dc in offsets if (j := where.get((r + dr, c + dc))) is not None and j != i]
            for i, (r, c) in enumerate(zip(rows.tolist(), cols.tolist(), strict=True))]  # fmt: skip


def _pixel_neighbours(xy: np.ndarray, radius: int) -> list[list[int]]:
    """Spots within (radius + 0.5) pitches, the pitch being the median nearest-spot distance:
    1.5 pitches at radius 1 take in a square grid's diagonals (1.41) and a hexagonal grid's
    ring (1.0) but not the next ring (2.0 and 1.73)."""
    from scipy.spatial import cKDTree

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


# -- crops and context features ---------------------------------------------------------------


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


def _take(tiles, rows: np.ndarray):
    """Rows of a tile array: numpy, torch, a zarr array (orthogonal indexing) or a row view."""
    return tiles.oindex[rows] if hasattr(tiles, "oindex") else tiles[rows]


def _square_images(block, source: str) -> torch.Tensor:
    images = images_to_tensor(block)
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(f"{source}: tiles must be square; got {tuple(images.shape[-2:])} px")
    return images


def spot_crops(tiles, tile_um: float, spot_diameter_um: float) -> torch.Tensor:
    """The spot crops (N, 3, side, side) in [0, 1] of tiles (anything
    :func:`~stmdit.encoders.morphology.images_to_tensor` takes): the central square whose side
    is the spot diameter. Used to fit encoders (e.g. the stain statistics) on what they will see."""
    images = _square_images(tiles, "tiles")
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
        """The features of ``rows``; neighbours outside ``rows`` are dropped (become padding)."""
        rows = torch.as_tensor(np.asarray(rows), dtype=torch.long)
        remap = torch.full((len(self) + 1,), -1, dtype=torch.long)  # last entry: padding stays padding
        remap[rows] = torch.arange(len(rows))
        return ContextFeatures(self.spot[rows], self.subspots[rows], remap[self.neighbours[rows]])

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
    (default: computed from ``obs``). Encoding runs in batches of ``batch_size`` spots
    (10 crops each).
    """
    n = len(tiles)
    if n != len(obs):
        raise ValueError(
            f"{n} tiles but {len(obs)} spots in obs; row i of the tiles must be the tile of obs row i"
        )
    if n == 0:
        raise ValueError("no tiles given")
    index = neighbour_index(obs) if neighbours is None else np.asarray(neighbours, dtype=np.int64)
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
            images = _square_images(tiles[lo:hi] if hi - lo == len(chunk) else _take(tiles, chunk), "tiles")
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


# -- the model -------------------------------------------------------------------------------


def _linear_init(shape: tuple[int, ...], fan_in: int) -> torch.Tensor:
    """torch.nn.Linear's default initialisation, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), per copy."""
    bound = 1.0 / math.sqrt(fan_in)
    return torch.empty(shape).uniform_(-bound, bound)


class ExpressionPredictor(ModelMixin, ConfigMixin):
    """DeepSpot-style deep sets over morphology features -> standardised log1p CP10k per gene.

    ``genes``: the predicted genes, in output order; ``input_dim``: the morphology feature size;
    ``hidden_dim``: phi's output size (DeepSpot: 512); ``n_phi``/``n_rho``: independent copies of
    phi (combined by the median) and rho (averaged), DeepSpot: 10 each; ``dropout``: DeepSpot's
    p = 0.3; ``provenance``: how the model was made (training data, encoder, source), carried
    into every prediction. Buffers ``target_mean``/``target_std`` undo the standardisation.
    """

    @register_to_config
    def __init__(
        self,
        genes: Sequence[str] = (),
        input_dim: int = 1536,
        hidden_dim: int = 512,
        n_phi: int = 10,
        n_rho: int = 10,
        dropout: float = 0.3,
        provenance: dict | None = None,
    ):
        super().__init__()
        genes = [str(g) for g in genes]
        if not genes:
            raise ValueError("ExpressionPredictor needs a non-empty gene list")
        if len(set(genes)) != len(genes):
            dup = sorted({g for g in genes if genes.count(g) > 1})[:10]
            raise ValueError(f"ExpressionPredictor: duplicated genes {dup}")
        for name, value in (
            ("input_dim", input_dim),
            ("hidden_dim", hidden_dim),
            ("n_phi", n_phi),
            ("n_rho", n_rho),
        ):
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        # The copies' Linear layers stacked along dim 0, so all copies run as one batched matmul.
        self.phi_weight = nn.Parameter(_linear_init((n_phi, hidden_dim, input_dim), input_dim))
        self.phi_bias = nn.Parameter(_linear_init((n_phi, hidden_dim), input_dim))
        self.rho_weight = nn.Parameter(_linear_init((n_rho, len(genes), 3 * hidden_dim), 3 * hidden_dim))
        self.rho_bias = nn.Parameter(_linear_init((n_rho, len(genes)), 3 * hidden_dim))
        self.register_buffer("target_mean", torch.zeros(len(genes)))
        self.register_buffer("target_std", torch.ones(len(genes)))

    @property
    def genes(self) -> list[str]:
        return [str(g) for g in self.config.genes]

    @property
    def n_genes(self) -> int:
        return len(self.config.genes)

    def set_scaler(self, mean, std) -> None:
        """The per-gene mean and standard deviation of the training targets (log1p CP10k)."""
        mean, std = (
            torch.as_tensor(np.asarray(mean), dtype=torch.float32),
            torch.as_tensor(np.asarray(std), dtype=torch.float32),
        )
        if mean.shape != (self.n_genes,) or std.shape != (self.n_genes,):
            raise ValueError(
                f"scaler mean and std must have shape ({self.n_genes},); got {tuple(mean.shape)}, {tuple(std.shape)}"
            )
        if not (std > 0).all():
            raise ValueError("scaler std must be positive")
        self.target_mean.copy_(mean)
        self.target_std.copy_(std)

    def _phi(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., hidden): every copy's Linear -> Dropout -> ReLU, then the median
        over copies (for an even number of copies torch.median takes the lower middle value,
        as DeepSpot's does)."""
        h = torch.einsum("...d,chd->...ch", x, self.phi_weight) + self.phi_bias
        h = nn.functional.relu(nn.functional.dropout(h, self.config.dropout, self.training))
        return h.median(dim=-2).values

    def _rho(self, h: torch.Tensor) -> torch.Tensor:
        """(B, 3 * hidden) -> (B, n_genes): every copy's Dropout (its own mask) -> ReLU -> Linear,
        averaged over copies."""
        h = h.unsqueeze(1).expand(-1, self.config.n_rho, -1)
        h = nn.functional.relu(nn.functional.dropout(h, self.config.dropout, self.training))
        return (torch.einsum("bci,cgi->bcg", h, self.rho_weight) + self.rho_bias).mean(dim=1)

    def _check(self, spot, subspots, neighbours, neighbour_mask) -> None:
        d = self.config.input_dim
        hint = "; were the features made with the morphology encoder this predictor was trained with?"
        if spot.ndim != 2 or spot.shape[1] != d:
            raise ValueError(f"spot features must be (B, {d}); got {tuple(spot.shape)}{hint}")
        b = spot.shape[0]
        if subspots.ndim != 3 or subspots.shape[0] != b or subspots.shape[2] != d or subspots.shape[1] == 0:
            raise ValueError(
                f"sub-spot features must be ({b}, S >= 1, {d}); got {tuple(subspots.shape)}{hint}"
            )
        if neighbours.ndim != 3 or neighbours.shape[0] != b or neighbours.shape[2] != d:
            raise ValueError(f"neighbour features must be ({b}, K, {d}); got {tuple(neighbours.shape)}{hint}")
        if neighbour_mask.dtype != torch.bool or tuple(neighbour_mask.shape) != tuple(neighbours.shape[:2]):
            raise ValueError(
                f"neighbour_mask must be a bool tensor of shape {tuple(neighbours.shape[:2])}; "
                f"got {neighbour_mask.dtype} {tuple(neighbour_mask.shape)}"
            )

    def forward(self, spot: torch.Tensor, subspots: torch.Tensor, neighbours: torch.Tensor,
                neighbour_mask: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """``spot`` (B, D), ``subspots`` (B, 9, D), ``neighbours`` (B, K, D) with
        ``neighbour_mask`` (B, K) True where a neighbour is present -> (B, n_genes) standardised.

        Neighbours are max-pooled over those present; a spot with none gets zeros (phi's outputs
        are >= 0 after its ReLU, so zero is also the smallest value a present neighbour gives).
        """
        self._check(spot, subspots, neighbours, neighbour_mask)
        spot, subspots, neighbours = (t.to(self.phi_weight) for t in (spot, subspots, neighbours))
        neighbour_mask = neighbour_mask.to(spot.device)
        h_spot = self._phi(spot)
        h_sub = self._phi(subspots).sum(dim=1)
        if neighbours.shape[1] == 0:
            h_nb = torch.zeros_like(h_spot)
        else:
            present = neighbour_mask.unsqueeze(-1)
            h_nb = self._phi(neighbours).masked_fill(~present, float("-inf")).amax(dim=1)
            h_nb = torch.where(present.any(dim=1), h_nb, torch.zeros_like(h_nb))
        h = torch.cat([h_spot, h_sub, h_nb], dim=-1)
        return self._rho(h)

    @torch.no_grad()
    def predict(self, spot, subspots, neighbours, neighbour_mask) -> torch.Tensor:
        """As :meth:`forward` in eval mode, unstandardised: predicted log1p CP10k (B, n_genes)."""
        was_training = self.training
        self.eval()
        try:
            z = self(spot, subspots, neighbours, neighbour_mask)
        finally:
            self.train(was_training)
        return z * self.target_std + self.target_mean

    def predict_features(self, features: ContextFeatures, batch_size: int = 1024) -> np.ndarray:
        """Predicted log1p CP10k (N, n_genes) float32 for every spot of ``features``."""
        if features.dim != self.config.input_dim:
            raise ValueError(
                f"features are {features.dim}-d but the predictor takes {self.config.input_dim}-d features; "
                "use the morphology encoder it was trained with"
            )
        device = self.target_mean.device
        out = [self.predict(*features.batch(np.arange(i, min(i + batch_size, len(features))), device)).cpu()
               for i in range(0, len(features), batch_size)]  # fmt: skip
        return torch.cat(out).numpy().astype(np.float32)

    def to_anndata(self, values, obs: pd.DataFrame | None = None) -> ad.AnnData:
        """Predictions as AnnData: ``X`` = predicted log1p CP10k, genes as ``var_names``,
        ``uns['stmdit_prediction']`` saying the values are predictions and by which predictor."""
        values = np.asarray(values, dtype=np.float32)
        if values.ndim != 2 or values.shape[1] != self.n_genes:
            raise ValueError(f"predictions must be (n_spots, {self.n_genes}); got shape {values.shape}")
        if obs is not None and len(obs) != len(values):
            raise ValueError(f"{len(values)} predictions but {len(obs)} rows in obs")
        obs = pd.DataFrame(index=[str(i) for i in range(len(values))]) if obs is None else obs.copy()
        obs.index = obs.index.astype(str)
        out = ad.AnnData(X=values, obs=obs, var=pd.DataFrame(index=pd.Index(self.genes, name="gene")))
        out.uns[PREDICTION_KEY] = {
            "values": "predicted log1p CP10k (not measured expression)",
            "predictor": type(self).__name__,
            "provenance": json.dumps(self.config.provenance or {}, sort_keys=True, default=str),
        }
        return out

    # -- DeepSpot's weights ------------------------------------------------------------------

    @classmethod
    def from_deepspot(cls, path: str | os.PathLike, genes: Sequence[str] | None = None,
                      trust_pickle: bool = False) -> ExpressionPredictor:  # fmt: skip
        """An official DeepSpot model (``final_model.pkl``) as an ExpressionPredictor.

        DeepSpot saves its models with ``torch.save(model)``: a pickled whole LightningModule,
        and unpickling it runs code from the file, so ``trust_pickle`` (CLI ``--trust-pickle``)
        must be given; unpickling also needs the classes it was saved from (the ``deepspot``
        package, ``lightning``, and scikit-learn for its scaler). A plain DeepSpot state dict
        (``model.state_dict()``, e.g. re-saved to avoid pickles) is accepted too, without a scaler.

        Mapped: ``phi_spot.<i>.model.0`` (Linear of Phi = Linear, Dropout, ReLU) -> phi copy i;
        ``rho.<i>.model.2`` (Linear of Rho = Dropout, ReLU, Linear, Dropout(0.1)) -> rho copy i;
        the module's ``scaler`` (sklearn StandardScaler ``mean_``/``scale_``, or RobustScaler
        ``center_``/``scale_``) -> the target scaler. Only the ``spot_subspot_neighbors`` context
        (DeepSpot's default) has this architecture.

        ``genes``: the output genes in order; by default the ``isPredicted`` rows of
        ``info_highly_variable_genes.csv`` (column ``gene_name``) beside the file, as DeepSpot's
        weight folders ship them. Features must come from the morphology model DeepSpot was
        trained with (``image_feature_model`` in ``top_param_overall.yaml``, recorded in the
        provenance when that file is present). Outputs equal DeepSpot's inference
        (``predict_spot_spatial_transcriptomics_from_image_path``) for spots with neighbours; for
        a spot without any, DeepSpot encodes a black tile where this model uses zeros.
        """
        from stmdit.io import load_state_dict_file

        path = Path(path)
        try:
            obj = load_state_dict_file(path, trust_pickle=trust_pickle)
        except (ModuleNotFoundError, AttributeError) as err:
            raise ImportError(
                f"{path} is a pickled DeepSpot module and unpickling it needs the classes it was saved from ({err}). "
                "Install DeepSpot (pip install git+https://github.com/ratschlab/DeepSpot) with lightning and scikit-learn, "
                "or load it once where they are installed and re-save model.state_dict() as .safetensors."
            ) from err
        if isinstance(obj, nn.Module):
            state, scaler = obj.state_dict(), getattr(obj, "scaler", None)
            hparams = dict(getattr(obj, "hparams", None) or {})
        elif isinstance(obj, dict):
            state, scaler, hparams = obj.get("state_dict", obj), None, {}
        else:
            raise TypeError(f"{path} holds a {type(obj).__name__}, not a DeepSpot module or state dict")

        phi_ids = sorted(
            {
                int(k.split(".")[1])
                for k in state
                if k.startswith("phi_spot.") and k.endswith("model.0.weight")
            }
        )
        rho_ids = sorted(
            {int(k.split(".")[1]) for k in state if k.startswith("rho.") and k.endswith("model.2.weight")}
        )
        if not phi_ids or not rho_ids:
            raise ValueError(
                f"{path} does not look like a DeepSpot spot model: no phi_spot.<i>.model.0 / rho.<i>.model.2 weights "
                f"(keys: {sorted(state)[:6]} ...)"
            )
        hidden, input_dim = state[f"phi_spot.{phi_ids[0]}.model.0.weight"].shape
        n_out, rho_in = state[f"rho.{rho_ids[0]}.model.2.weight"].shape
        context = hparams.get("spot_context", "spot_subspot_neighbors")
        if context != "spot_subspot_neighbors" or rho_in != 3 * hidden:
            raise ValueError(
                f"{path}: DeepSpot context {context!r} (rho input {rho_in} = {rho_in // hidden} x {hidden}); only "
                "'spot_subspot_neighbors' (spot, sub-spots and neighbours) maps onto ExpressionPredictor"
            )
        genes = _deepspot_genes(path, n_out) if genes is None else [str(g) for g in genes]
        if len(genes) != n_out:
            raise ValueError(f"{path} predicts {n_out} genes but {len(genes)} gene names were given")
        provenance = {"source": "deepspot", "path": str(path.resolve()), "spot_context": context,
                      "image_feature_model": _deepspot_feature_model(path)}  # fmt: skip
        model = cls(genes=genes, input_dim=int(input_dim), hidden_dim=int(hidden), n_phi=len(phi_ids),
                    n_rho=len(rho_ids), dropout=float(hparams.get("p_phi") or hparams.get("p") or 0.3),
                    provenance=provenance)  # fmt: skip
        with torch.no_grad():
            for c, i in enumerate(phi_ids):
                model.phi_weight[c].copy_(state[f"phi_spot.{i}.model.0.weight"])
                model.phi_bias[c].copy_(state[f"phi_spot.{i}.model.0.bias"])
            for c, i in enumerate(rho_ids):
                model.rho_weight[c].copy_(state[f"rho.{i}.model.2.weight"])
                model.rho_bias[c].copy_(state[f"rho.{i}.model.2.bias"])
        mean, std = _scaler_arrays(scaler, n_out, path)
        model.set_scaler(mean, std)
        return model.eval()


def _deepspot_genes(path: Path, n_out: int) -> list[str]:
    table = path.parent / "info_highly_variable_genes.csv"
    if not table.is_file():
        raise ValueError(
            f"{path}: the output genes are not in the model file; pass genes=[...] ({n_out} names in output order) "
            f"or put DeepSpot's info_highly_variable_genes.csv beside it"
        )
    info = pd.read_csv(table)
    if not {"gene_name", "isPredicted"} <= set(info.columns):
        raise ValueError(f"{table}: needs columns gene_name and isPredicted; has {list(info.columns)}")
    predicted = info["isPredicted"].astype(str).str.lower().isin(["true", "1"])
    return info.loc[predicted, "gene_name"].astype(str).tolist()


def _deepspot_feature_model(path: Path) -> str:
    config = path.parent / "top_param_overall.yaml"
    if not config.is_file():
        return "unknown"
    import yaml

    data = yaml.safe_load(config.read_text()) or {}
    return str(data.get("image_feature_model", "unknown"))


def _scaler_arrays(scaler, n_out: int, path: Path) -> tuple[np.ndarray, np.ndarray]:
    if scaler is None:
        warnings.warn(
            f"{path}: no target scaler (DeepSpot trained with normalize=None); predictions are the model's raw outputs",
            stacklevel=3,
        )
        return np.zeros(n_out), np.ones(n_out)
    centre = getattr(scaler, "mean_", None)
    if centre is None:
        centre = getattr(scaler, "center_", None)
    scale = getattr(scaler, "scale_", None)
    if centre is None:
        raise TypeError(f"{path}: the scaler {type(scaler).__name__} has neither mean_ nor center_")
    centre = np.asarray(centre, dtype=np.float64).ravel()
    scale = np.ones_like(centre) if scale is None else np.asarray(scale, dtype=np.float64).ravel()
    if centre.shape != (n_out,) or scale.shape != (n_out,):
        raise ValueError(f"{path}: the scaler has {centre.size} genes but the model predicts {n_out}")
    return centre, scale


# -- training -----------------------------------------------------------------------------------


class _RowView:
    """Rows of a (zarr) tile array, read lazily: a store's tiles are too large to load whole."""

    def __init__(self, array, rows: np.ndarray):
        self.array, self.rows = array, np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, item):
        rows = self.rows[item]
        return np.asarray(_take(self.array, rows if np.ndim(rows) else int(rows)))


@dataclass
class SpotSet:
    """Spots and their tiles, as the predictor trains and predicts on them.

    ``adata``: obs with ``sample_id`` (``patient_id`` for leave-one-patient-out), array or pixel
    coordinates (for the neighbours), and raw counts in ``layers['counts']`` for training
    targets; ``tiles``: (N, S, S, 3) tiles, row i = spot i; ``tile_um``: the tiles' physical
    side; ``spot_diameter_um``: one number or one per spot.
    """

    adata: ad.AnnData
    tiles: object
    tile_um: float
    spot_diameter_um: float | np.ndarray

    def __post_init__(self):
        if len(self.tiles) != self.adata.n_obs:
            raise ValueError(f"{len(self.tiles)} tiles for {self.adata.n_obs} spots; give one tile per spot")

    def __len__(self) -> int:
        return self.adata.n_obs

    @classmethod
    def from_store(cls, store, split: str | None = "train", samples: Sequence[str] | None = None,
                   only_kept: bool = True) -> SpotSet:  # fmt: skip
        """The spots of a prepared store (a :class:`~stmdit.data.store.DatasetStore` or its folder):
        those of ``split`` (None: all) and of ``samples`` (None: all), kept spots only by default."""
        from stmdit.data.store import DatasetStore

        store = store if isinstance(store, DatasetStore) else DatasetStore(store)
        manifest = store.manifest()
        if not manifest.get("stages", {}).get("tiles"):
            raise ValueError(f"{store.root}: tiling is not finished; run `stmdit prepare` to the end first")
        rows = store.rows(split, only_kept=only_kept)
        adata = store.spots()
        if samples is not None:
            unknown = sorted(set(map(str, samples)) - set(adata.obs["sample_id"].astype(str)))
            if unknown:
                raise ValueError(
                    f"{store.root}: no samples {unknown}; it has {sorted(adata.obs['sample_id'].astype(str).unique())}"
                )
            rows = rows[
                adata.obs["sample_id"].astype(str).iloc[rows].isin([str(s) for s in samples]).to_numpy()
            ]
        adata = adata[rows].copy()
        info = adata.uns["stmdit"]["samples"]
        diameters = np.array(
            [float(info[s].get("spot_diameter_um", np.nan)) for s in adata.obs["sample_id"].astype(str)]
        )
        bad = sorted(set(adata.obs["sample_id"].astype(str)[~np.isfinite(diameters)]))
        if bad:
            raise ValueError(
                f"{store.root}: samples {bad} have no spot diameter (uns['stmdit']['samples'][...]['spot_diameter_um'])"
            )
        return cls(adata, _RowView(store.tiles(), rows), float(manifest["prepare"]["tile_um"]), diameters)

    def subset(self, rows) -> SpotSet:
        rows = np.asarray(rows, dtype=np.int64)
        d = np.asarray(self.spot_diameter_um)
        return SpotSet(
            self.adata[rows].copy(), _RowView(self.tiles, rows), self.tile_um, d if d.ndim == 0 else d[rows]
        )


def require_counts(adata: ad.AnnData, source: str) -> None:
    """Raise when ``adata`` has no raw counts to train on (an H&E-only dataset)."""
    if "counts" not in adata.layers or adata.n_vars == 0:
        raise ValueError(
            f"{source}: no raw counts (layers['counts']); H&E-only data cannot give expression targets. "
            "Train the predictor on spatial transcriptomics and run it on these tiles instead."
        )


def expression_targets(adata: ad.AnnData, genes: Sequence[str], source: str = "spots") -> np.ndarray:
    """Measured log1p CP10k (N, len(genes)) of ``genes``, the library size taken over all genes.

    Needs raw counts; every gene must be measured (a missing gene is an error, not zeros)."""
    require_counts(adata, source)
    counts, library, alignment = align_to_panel(adata, genes, source=source)
    if alignment.missing:
        raise ValueError(
            f"{source}: {len(alignment.missing)} of the predictor's genes are not measured: {alignment.missing[:10]}"
        )
    return log1p_cp10k(counts, library)


def per_gene_pearson(measured: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Pearson r per gene (column) across spots; a gene constant in either is 0 (DeepSpot's NaN -> 0)."""
    return np.nan_to_num(pearson_per_gene(measured, predicted), nan=0.0)


@dataclass
class PredictorFit:
    """A trained predictor and its record.

    ``history``: per-epoch ``train_loss`` (and ``val_loss``), ``best_epoch``, ``epochs_run``.
    ``folds`` (leave-one-patient-out): held-out patient -> the fit without that patient, whose
    ``test_predictions`` are AnnData predictions for the held-out spots, with
    ``uns['stmdit_prediction']['median_pearson']``: the median per-gene Pearson r against the
    measured values (also ``history['test_median_pearson']``).
    """

    predictor: ExpressionPredictor
    history: dict
    folds: dict[str, PredictorFit] = field(default_factory=dict)
    test_predictions: ad.AnnData | None = None


def _default_device(device) -> torch.device:
    return (
        torch.device(device)
        if device is not None
        else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )


def fit_predictor(
    features: ContextFeatures,
    targets: np.ndarray,
    genes: Sequence[str],
    val: tuple[ContextFeatures, np.ndarray] | None = None,
    epochs: int = 100,
    batch_size: int = 256,
    lr: float = 1e-4,
    weight_decay: float = 1e-6,
    patience: int = 10,
    seed: int = 0,
    model_kwargs: dict | None = None,
    provenance: dict | None = None,
    device=None,
    progress: bool = True,
) -> PredictorFit:
    """Train an :class:`ExpressionPredictor` on precomputed features and log1p CP10k targets.

    Targets are standardised with their own mean and std (kept in the model). MSE loss, AdamW
    (DeepSpot: lr 1e-4, weight decay 1e-6). With ``val`` = (features, targets), training stops
    after ``patience`` epochs without a lower validation loss and the best epoch's weights are
    kept; without it all ``epochs`` run. Deterministic for a given ``seed`` on one device
    (weights, shuffling and dropout draw from a private seeded RNG state).
    """
    targets = np.asarray(targets, dtype=np.float32)
    genes = [str(g) for g in genes]
    if targets.shape != (len(features), len(genes)):
        raise ValueError(
            f"targets must be (n_spots, n_genes) = ({len(features)}, {len(genes)}); got {targets.shape}"
        )
    if not np.isfinite(targets).all():
        raise ValueError("targets contain NaN or infinite values")
    if val is not None and (val[0].dim != features.dim or np.shape(val[1]) != (len(val[0]), len(genes))):
        raise ValueError(
            f"validation features/targets must be ({len(val[0])}, {features.dim}) / ({len(val[0])}, {len(genes)})"
        )
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1; got {epochs}, {batch_size}")
    device = _default_device(device)
    mean, std = targets.mean(0), np.maximum(targets.std(0), 1e-3)
    z = torch.from_numpy((targets - mean) / std)
    z_val = (
        torch.from_numpy(((np.asarray(val[1], np.float32) - mean) / std).astype(np.float32)) if val else None
    )

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        model = ExpressionPredictor(
            genes=genes, input_dim=features.dim, provenance=provenance, **(model_kwargs or {})
        )
        model.set_scaler(mean, std)
        model.to(device)
        optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        order = torch.Generator().manual_seed(seed)
        history = {"train_loss": [], "val_loss": [], "best_epoch": None, "epochs_run": 0}
        best, best_state, waited = math.inf, None, 0
        for epoch in tqdm(range(epochs), desc="training predictor", unit="epoch", disable=not progress):
            model.train()
            total = 0.0
            for rows in torch.randperm(len(features), generator=order).split(batch_size):
                loss = nn.functional.mse_loss(model(*features.batch(rows, device)), z[rows].to(device))
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                total += float(loss.detach()) * len(rows)
            history["train_loss"].append(total / len(features))
            history["epochs_run"] = epoch + 1
            if val is None:
                continue
            loss_val = _loss(model, val[0], z_val, batch_size, device)
            history["val_loss"].append(loss_val)
            if loss_val < best:
                best, best_state, waited = loss_val, copy.deepcopy(model.state_dict()), 0
                history["best_epoch"] = epoch + 1
            else:
                waited += 1
                if waited >= patience:
                    break
        if best_state is not None:
            model.load_state_dict(best_state)
        else:
            history["best_epoch"] = history["epochs_run"]
    return PredictorFit(model.eval(), history)


@torch.no_grad()
def _loss(
    model: ExpressionPredictor, features: ContextFeatures, z: torch.Tensor, batch_size: int, device
) -> float:
    model.eval()
    total = 0.0
    for start in range(0, len(features), batch_size):
        rows = torch.arange(start, min(start + batch_size, len(features)))
        total += float(
            nn.functional.mse_loss(model(*features.batch(rows, device)), z[rows].to(device), reduction="sum")
        )
    return total / (len(features) * z.shape[1])


def train_predictor(
    train: SpotSet,
    encoder,
    n_genes: int = 256,
    val: SpotSet | None = None,
    epochs: int = 100,
    batch_size: int = 256,
    lr: float = 1e-4,
    seed: int = 0,
    leave_one_patient_out: bool = False,
    patience: int = 10,
    model_kwargs: dict | None = None,
    progress: bool = True,
    device=None,
) -> PredictorFit:
    """Encode ``train`` (and ``val``) in context, choose genes, and fit.

    Genes: the ``n_genes`` with the highest variance of log1p CP10k over the training spots
    (DeepSpot uses scanpy's ``seurat_v3`` with a per-sample batch key on raw counts; this ranking
    needs no scanpy and ignores batches). ``val`` early-stops training (see :func:`fit_predictor`).

    ``leave_one_patient_out``: additionally, for every patient of ``train`` (``obs['patient_id']``,
    at least two), a model trained without that patient (genes chosen again on its training
    spots), with its predictions for the held-out spots, in :attr:`PredictorFit.folds`; this
    estimates how the model trained on all patients (:attr:`PredictorFit.predictor`) does on a
    new patient, as DeepSpot evaluates. Morphology features are computed once and shared.
    """
    require_counts(train.adata, "training spots")
    if leave_one_patient_out:
        patients = _patients(train.adata)
    features = context_features(
        train.tiles, train.adata.obs, train.tile_um, train.spot_diameter_um, encoder, progress=progress
    )
    val_features = (
        context_features(val.tiles, val.adata.obs, val.tile_um, val.spot_diameter_um, encoder, progress=progress)
        if val is not None and len(val) else None
    )  # fmt: skip
    d = np.unique(np.asarray(train.spot_diameter_um, dtype=np.float64))
    base = {"trained_by": "stmdit train_predictor", "morphology_encoder": describe(encoder),
            "tile_um": float(train.tile_um), "spot_diameter_um": d.tolist(), "neighbour_radius": 1,
            "gene_selection": "top variance of log1p CP10k on the training spots", "seed": int(seed)}  # fmt: skip
    settings = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed, "patience": patience,
                "model_kwargs": model_kwargs, "progress": progress, "device": device}  # fmt: skip

    def fit(rows: np.ndarray, extra: dict) -> PredictorFit:
        adata = train.adata[rows]
        genes = select_variable_genes(adata, n_genes)
        targets = expression_targets(adata, genes, source="training spots")
        val_pair = None
        if val_features is not None:
            val_pair = (val_features, expression_targets(val.adata, genes, source="validation spots"))
        samples = sorted(adata.obs["sample_id"].astype(str).unique()) if "sample_id" in adata.obs else []
        provenance = {**base, **extra, "train_samples": samples, "n_train_spots": int(len(rows))}
        return fit_predictor(
            features.subset(rows), targets, genes, val=val_pair, provenance=provenance, **settings
        )

    result = fit(np.arange(len(train)), {})
    if not leave_one_patient_out:
        return result
    for patient in sorted(set(patients)):
        held_out = np.flatnonzero(patients == patient)
        fold = fit(np.flatnonzero(patients != patient), {"held_out_patient": patient})
        predicted = fold.predictor.predict_features(features.subset(held_out))
        measured = expression_targets(
            train.adata[held_out], fold.predictor.genes, source=f"patient {patient}"
        )
        fold.test_predictions = fold.predictor.to_anndata(predicted, train.adata.obs.iloc[held_out])
        r = float(np.median(per_gene_pearson(measured, predicted)))
        fold.test_predictions.uns[PREDICTION_KEY]["median_pearson"] = r
        fold.history["test_median_pearson"] = r
        result.folds[patient] = fold
    return result


def _patients(adata: ad.AnnData) -> np.ndarray:
    if "patient_id" not in adata.obs or adata.obs["patient_id"].isna().any():
        raise ValueError("leave-one-patient-out needs obs['patient_id'] for every training spot")
    patients = adata.obs["patient_id"].astype(str).to_numpy()
    if len(set(patients)) < 2:
        raise ValueError(
            f"leave-one-patient-out needs at least two patients; the training spots have {sorted(set(patients))}"
        )
    return patients


def build_predictor_encoder(spec: str, train: SpotSet, trust_pickle: bool = False, max_fit_spots: int = 2048):
    """The frozen morphology encoder named by ``spec`` (see :mod:`stmdit.encoders.factory`);
    ``stain`` is fitted on the spot crops of (up to ``max_fit_spots``) training spots, at the
    crop size, since spot and sub-spot crops are what it will encode."""
    kind = str(spec).partition(":")[0].strip().lower()
    if kind != "stain":
        return build_morphology_encoder(spec, trust_pickle=trust_pickle)
    rows = np.linspace(0, len(train) - 1, min(len(train), max_fit_spots)).round().astype(np.int64)
    d = np.asarray(train.spot_diameter_um, dtype=np.float64)
    diameter = float(d) if d.ndim == 0 else float(np.median(d))
    crops = spot_crops(_take(train.tiles, rows), train.tile_um, diameter)
    return build_morphology_encoder("stain", train_tiles=crops, tile_size=crops.shape[-1])


def save_predictor(fit: PredictorFit, encoder, path: str | os.PathLike) -> Path:
    """Write a predictor folder atomically: the model (``save_pretrained``: config.json with genes
    and provenance, safetensors with the weights and scaler), the fitted encoder when it is a
    small fitted one (stain statistics; large pretrained backbones are named in the provenance
    instead), ``training.json``, and for leave-one-patient-out ``folds/<patient>/`` with each
    fold's model and ``test_predictions.h5ad``."""
    from stmdit.encoders.morphology import StainFeatureEncoder
    from stmdit.io import atomic_path

    path = Path(path)
    record = {"history": fit.history, "genes": fit.predictor.genes, "provenance": fit.predictor.config.provenance,
              "folds": {p: f.history for p, f in fit.folds.items()}}  # fmt: skip
    with atomic_path(path) as tmp:
        fit.predictor.save_pretrained(tmp)
        if isinstance(encoder, StainFeatureEncoder):
            encoder.save_pretrained(tmp / ENCODER_FOLDER)
        for patient, fold in fit.folds.items():
            where = tmp / "folds" / _safe_name(patient)
            fold.predictor.save_pretrained(where)
            if fold.test_predictions is not None:
                fold.test_predictions.write_h5ad(where / "test_predictions.h5ad")
        (tmp / TRAINING_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
    return path


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name)) or "patient"


def load_predictor(path: str | os.PathLike, trust_pickle: bool = False):
    """(predictor, morphology encoder) from a folder written by :func:`save_predictor`.

    The encoder is the saved fitted one, else rebuilt from the ``morphology_spec`` recorded in
    the provenance (e.g. ``uni2h:PATH``); None when neither is available."""
    from stmdit.encoders.morphology import StainFeatureEncoder

    path = Path(path)
    predictor = ExpressionPredictor.from_pretrained(path).eval()
    if (path / ENCODER_FOLDER).is_dir():
        return predictor, StainFeatureEncoder.from_pretrained(path / ENCODER_FOLDER).eval()
    spec = (predictor.config.provenance or {}).get("morphology_spec")
    if spec and str(spec).partition(":")[0].lower() != "stain":
        return predictor, build_morphology_encoder(spec, trust_pickle=trust_pickle)
    return predictor, None


def train_predictor_command(
    dataset_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    morphology_encoder: str = "stain",
    n_genes: int = 256,
    epochs: int = 100,
    leave_one_patient_out: bool = False,
    seed: int = 0,
    trust_pickle: bool = False,
    batch_size: int = 256,
    progress: bool = True,
) -> Path:
    """``stmdit train-predictor``: fit the expression predictor on a prepared store.

    Trains on the kept spots of the ``train`` split, early-stops on the ``val`` split when it has
    kept spots, and writes the predictor folder (:func:`save_predictor`) atomically to ``out_dir``.
    Returns ``out_dir``.
    """
    from stmdit.data.store import DatasetStore

    store = DatasetStore(dataset_dir)
    train = SpotSet.from_store(store, "train")
    if len(train) == 0:
        raise ValueError(f"{store.root}: the train split has no kept spots")
    require_counts(train.adata, f"{store.root} (train split)")
    val = SpotSet.from_store(store, "val")
    encoder = build_predictor_encoder(morphology_encoder, train, trust_pickle=trust_pickle)
    if torch.cuda.is_available():
        encoder.to("cuda")
    fit = train_predictor(train, encoder, n_genes=n_genes, val=val if len(val) else None, epochs=epochs,
                          batch_size=batch_size, seed=seed, leave_one_patient_out=leave_one_patient_out,
                          progress=progress)  # fmt: skip
    extra = {"morphology_spec": str(morphology_encoder), "dataset": str(store.root.resolve())}
    for f in (fit, *fit.folds.values()):
        f.predictor.register_to_config(provenance={**(f.predictor.config.provenance or {}), **extra})
    encoder.to("cpu")
    logger.info("predictor: %d genes, best epoch %s", fit.predictor.n_genes, fit.history["best_epoch"])
    return save_predictor(fit, encoder, out_dir)
