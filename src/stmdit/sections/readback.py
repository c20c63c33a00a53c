"""Is a virtual section faithful to the expression it was drawn from, spot by spot?

A seamless section is one canvas, not a tile per spot, so its fidelity is read where the
spots are: :attr:`~stmdit.sections.mosaic.SectionResult.tiles` are the canvas crops of the
model's tile size centred at each spot (in spots mode, the spots' own generated tiles), and
:func:`spot_fidelity` reads them with a DeepSpot-style expression predictor exactly as the
evaluation reads generated tiles (:func:`~stmdit.predictor.readback.read_expression`: the
predictor's training grid, its spot crop and 3 x 3 sub-spots, and the crops at the
neighbouring spots as neighbours), against the spots' measured expression. The same reading of
the real H&E's crops at the same spots (:func:`real_crops`) is the ceiling, at the virtual
section's own resolution.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from stmdit.evaluate.fidelity import DEEPSPOT_N_GRID, bootstrap_interval, fidelity_auc
from stmdit.experiments.simulate import readback_geometry
from stmdit.predictor.readback import read_expression
from stmdit.predictor.spots import expression_targets
from stmdit.sections.mosaic import SectionResult

__all__ = ["real_crops", "spot_fidelity"]


def real_crops(result: SectionResult) -> np.ndarray:
    """Crops (N, n, n, 3) of the real H&E canvas at the spots, ``n`` the virtual tiles' size,
    placed as :func:`~stmdit.sections.synthesis.synthesize_seamless` places the virtual ones
    (centred at the spot, kept inside the canvas)."""
    n = int(result.tiles.shape[1])
    height, width = result.real.shape[:2]
    if height < n or width < n:
        raise ValueError(f"the real canvas ({height} x {width}) is smaller than one tile ({n} px)")
    cols, rows = result.centres_px().T
    r0 = np.clip(np.round(rows - n / 2).astype(int), 0, height - n)
    c0 = np.clip(np.round(cols - n / 2).astype(int), 0, width - n)
    return np.stack([result.real[r : r + n, c : c + n] for r, c in zip(r0, c0, strict=True)])


def spot_fidelity(
    result: SectionResult,
    predictor,
    encoder,
    tiles: np.ndarray | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    n_grid: Sequence[int] = DEEPSPOT_N_GRID,
) -> dict:
    """The DeepSpot fidelity AUC of the section's spot tiles (``tiles``, default
    ``result.tiles``; e.g. :func:`real_crops` for the ceiling) read by ``predictor`` (with its
    morphology ``encoder``) against the spots' measured log1p CP10k; ``n_grid``: the top-N
    gene counts of the curve (DeepSpot's by default; a smaller panel needs smaller N).

    Returns ``auc``, the gene-bootstrap ``interval`` (95%), ``n_spots`` and the reading's
    ``geometry`` (tile width, spot diameter) and fidelity ``protocol``."""
    adata = result.expression
    if adata is None:
        raise ValueError("this SectionResult carries no expression to compare with")
    tiles = result.tiles if tiles is None else np.asarray(tiles)
    if tiles.dtype != np.uint8 or tiles.ndim != 4 or len(tiles) != adata.n_obs:
        raise ValueError(
            f"tiles must be uint8 (N, H, W, 3), one per spot ({adata.n_obs}); got {tiles.dtype} {tiles.shape}"
        )
    measured = expression_targets(adata, predictor.genes, source=f"{result.sample} spots")
    geometry = readback_geometry(predictor, adata, np.arange(adata.n_obs), result.tile_um)
    predicted = read_expression(
        tiles, adata.obs, result.tile_um, geometry["spot_diameter_um"], predictor, encoder
    )
    res = fidelity_auc(
        measured,
        predicted,
        predictor.hvg_order,
        n_grid=n_grid,
        n_bootstrap=n_bootstrap,
        seed=seed,
        gene_protocol=predictor.gene_protocol,
    )
    return {
        "auc": float(res.auc),
        "interval": bootstrap_interval(res.bootstrap_aucs),
        "n_spots": int(adata.n_obs),
        "geometry": {k: geometry[k] for k in ("tile_um", "spot_diameter_um", "spot_diameter_from")},
        "protocol": res.protocol,
    }
