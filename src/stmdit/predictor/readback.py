"""How the expression predictor reads tiles it was not trained on: one rule for all of them.

The predictor learnt from the spot crops of real tiles on one pixel grid, ``tile_px`` pixels per
``tile_um`` µm (its provenance). Whatever it reads later, the held-out real tiles of the
fidelity ceiling, a model's generated tiles (often coarser), the tiles of a virtual experiment,
is first put on that grid (:func:`on_training_grid`), so its morphology encoder sees crops of
the size it learnt from. Generated tiles carry no more detail than their own resolution, so the
real tiles of a ceiling are first reduced to the generated tiles' resolution (``detail_px``): a
ratio to the ceiling then compares tiles of equal detail, not a generator's resolution with the
scanner's. Pseudo-labelling reads slides directly on this grid.

Neighbours are found with the rule and radius the predictor was trained with (its
:attr:`~stmdit.predictor.ExpressionPredictor.neighbour_rule`): DeepSpot's box on the array
coordinates for predictors that record it and for imported DeepSpot weights; the hexagonal
6-ring for predictors trained before the rule was recorded, since they were trained with it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from stmdit.predictor.features import context_features
from stmdit.predictor.graph import neighbour_index
from stmdit.tiles import resize


def training_grid(predictor) -> tuple[float | None, int | None]:
    """``(tile_um, tile_px)`` of the tiles the predictor was trained on; None where its
    provenance does not record them (imported weights)."""
    provenance = predictor.config.provenance or {}
    tile_um, tile_px = provenance.get("tile_um"), provenance.get("tile_px")
    return (
        None if tile_um is None else float(tile_um),
        None if tile_px is None else int(tile_px),
    )


def on_training_grid(tiles: np.ndarray, predictor, detail_px: int | None = None) -> np.ndarray:
    """``uint8`` tiles (N, S, S, 3) as the predictor reads them: with ``detail_px``, first reduced
    to that many pixels (the detail of generated tiles), then resized to the predictor's
    training ``tile_px`` (unchanged when it does not record one)."""
    if detail_px is not None and detail_px < tiles.shape[1]:
        tiles = resize(tiles, int(detail_px))
    tile_px = training_grid(predictor)[1]
    return tiles if tile_px is None else resize(tiles, tile_px)


def read_expression(
    tiles: np.ndarray,
    obs: pd.DataFrame,
    tile_um: float,
    spot_diameter_um,
    predictor,
    encoder,
    neighbours: np.ndarray | None = None,
    detail_px: int | None = None,
) -> np.ndarray:
    """Predicted log1p CP10k (N, n_genes) for ``uint8`` tiles centred on the spots of ``obs``:
    each tile on the predictor's training grid (:func:`on_training_grid`), its spot crop and
    3 x 3 sub-spots at ``spot_diameter_um``, and its neighbours from ``neighbours`` (rows into
    these tiles, -1 padding; by default the spots of ``obs`` that are neighbours under the
    predictor's own rule and radius, see the module docstring)."""
    grid = on_training_grid(np.asarray(tiles), predictor, detail_px)
    if neighbours is None:
        neighbours = neighbour_index(obs, predictor.neighbour_radius, predictor.neighbour_rule)
    features = context_features(
        grid, obs, tile_um, spot_diameter_um, encoder, neighbours=neighbours, progress=False
    )
    return predictor.predict_features(features)
