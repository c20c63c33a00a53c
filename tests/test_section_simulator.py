"""A seamless section is as faithful to the expression at its spots as a tile per spot: on the
tissue simulator, whose composition behind every spot is known, the composition a CNN reads off
the seamless canvas' crops at the spot centres is within 0.05 of what it reads off the
spots-mode tiles, and both are far from the same crops read against another spot's composition."""

import numpy as np
import pytest
import torch

from conftest import SIMULATOR_SAMPLE, one_thread
from stmdit.evaluate.composition import composition_agreement, fit_composition_estimator
from stmdit.pipeline import STMDiTPipeline
from stmdit.sections.mosaic import synthesize_section
from stmdit.sections.synthesis import synthesize_seamless

STEPS = 10
GUIDANCE_GE = 2.0


@pytest.mark.slow
def test_canvas_crops_at_spots_carry_the_composition_of_per_spot_tiles(simulator_section):
    pipeline, store, data = simulator_section
    pipe = STMDiTPipeline.from_pretrained(pipeline)
    pipe.set_progress_bar_config(disable=True)
    common = {"seed": 0, "steps": STEPS, "guidance_ge": GUIDANCE_GE, "progress": False}
    with one_thread():
        seamless = synthesize_seamless(pipe, store, SIMULATOR_SAMPLE, **common)
        spots = synthesize_section(pipe, store, SIMULATOR_SAMPLE, **common)
        composition = np.asarray(data.adata.obsm["composition"])
        estimator = fit_composition_estimator(
            data.tiles[data.train_index], composition[data.train_index], epochs=4, progress=False
        )
    # The store names spots its own way; the grid position finds each one's simulated composition.
    held = data.adata.obs.iloc[data.held_out_index]
    row_of = {
        (r, c): i for i, r, c in zip(data.held_out_index, held["array_row"], held["array_col"], strict=True)
    }
    placed = store.spots().obs.loc[seamless.spots.index, ["array_row", "array_col"]].astype(int)
    truth = composition[[row_of[rc] for rc in placed.itertuples(index=False, name=None)]]
    assert seamless.spots.index.equals(spots.spots.index) and len(set(map(tuple, truth))) == len(truth)

    def agreement(tiles: np.ndarray, true: np.ndarray) -> dict:
        images = torch.from_numpy(tiles.astype(np.float32) / 255).permute(0, 3, 1, 2)
        return composition_agreement(true, estimator.predict(images))

    canvas, per_spot = agreement(seamless.tiles, truth), agreement(spots.tiles, truth)
    shuffled = agreement(seamless.tiles, truth[np.random.default_rng(0).permutation(len(truth))])
    mae, corr = "composition_mae", "composition_corr"
    print(
        f"composition MAE: seamless crops {canvas[mae]:.3f}, spot tiles {per_spot[mae]:.3f}, "
        f"shuffled {shuffled[mae]:.3f}; corr {canvas[corr]:.3f} / {per_spot[corr]:.3f} / {shuffled[corr]:.3f}"
    )
    assert abs(canvas[mae] - per_spot[mae]) <= 0.05
    assert shuffled[mae] > canvas[mae] and canvas[corr] > shuffled[corr] + 0.2
