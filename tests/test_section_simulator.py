"""A seamless section is as faithful to the expression at its spots as a tile per spot: on the
tissue simulator, whose composition behind every spot is known, the composition a CNN reads off
the seamless canvas' crops at the spot centres is within 0.05 of what it reads off the
spots-mode tiles, and both are far from the same crops read against another spot's composition;
and a DeepSpot-style predictor reads the crops' expression (:mod:`stmdit.sections.readback`)."""

import numpy as np
import pytest
import torch

from conftest import SIMULATOR_SAMPLE, one_thread
from stmdit.evaluate.composition import composition_agreement, fit_composition_estimator
from stmdit.pipeline import STMDiTPipeline
from stmdit.predictor import load_predictor
from stmdit.predictor.train import train_predictor_command
from stmdit.sections.mosaic import synthesize_section
from stmdit.sections.readback import real_crops, spot_fidelity
from stmdit.sections.synthesis import synthesize_seamless

STEPS = 10
GUIDANCE_GE = 2.0
GRID = (4, 8, 12, 16)  # top-N genes of the fidelity curve: the predictor reads 16


@pytest.fixture(scope="module")
def drawn(simulator_section):
    """The simulated section drawn seamless and in spots mode, same seed and settings."""
    pipeline, store, data = simulator_section
    pipe = STMDiTPipeline.from_pretrained(pipeline)
    pipe.set_progress_bar_config(disable=True)
    common = {"seed": 0, "steps": STEPS, "guidance_ge": GUIDANCE_GE, "progress": False}
    with one_thread():
        seamless = synthesize_seamless(pipe, store, SIMULATOR_SAMPLE, **common)
        spots = synthesize_section(pipe, store, SIMULATOR_SAMPLE, **common)
    return store, data, seamless, spots


@pytest.mark.slow
def test_canvas_crops_at_spots_carry_the_composition_of_per_spot_tiles(drawn):
    store, data, seamless, spots = drawn
    with one_thread():
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


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:the predictor does not follow DeepSpot's protocol")
def test_spot_fidelity_reads_the_section_at_its_spots(drawn, tmp_path):
    store, _, seamless, spots = drawn
    with one_thread():
        train_predictor_command(store.root, tmp_path / "predictor", n_genes=16, epochs=3, progress=False)
        predictor, encoder = load_predictor(tmp_path / "predictor")
        real = real_crops(seamless)
        read = {name: spot_fidelity(seamless, predictor, encoder, tiles=tiles, n_bootstrap=200, n_grid=GRID)
                for name, tiles in (("seamless", seamless.tiles), ("spots", spots.tiles), ("real", real))}  # fmt: skip
        permuted = real[np.random.default_rng(0).permutation(len(real))]
        shuffled = spot_fidelity(seamless, predictor, encoder, tiles=permuted, n_bootstrap=200, n_grid=GRID)
    print({k: (round(v["auc"], 3), v["interval"]) for k, v in {**read, "shuffled real": shuffled}.items()})
    # The real crops at the spots are the ceiling; the same crops at other spots read far worse.
    assert read["real"]["auc"] > shuffled["auc"] + 0.1
    assert real.shape == seamless.tiles.shape and read["real"]["n_spots"] == len(seamless.spots)
    # The seamless crops are read no worse than the spot tiles: their intervals overlap, or better.
    assert read["seamless"]["interval"][1] >= read["spots"]["interval"][0]
    with pytest.raises(ValueError, match="one per spot"):
        spot_fidelity(seamless, predictor, encoder, tiles=seamless.tiles[:-1])
