"""Pseudo-label counts that the GE encoders read like measured spots: the calibrated per-spot
sparsification by hand, unknown (not predicted) panel genes, and on held-out her2st spots the
check that a spot's pseudo-label embeds closer to its own measured embedding than to others'."""

import json
import re
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from cf_reference import TINY, Reference, write_folder
from stmdit.encoders.cancerfoundation import CancerFoundationEncoder
from stmdit.encoders.expression import PanelExpressionEncoder, align_to_panel
from stmdit.predictor import SpotSet, build_predictor_encoder, context_features, train_predictor
from stmdit.predictor.pseudocounts import fit_zero_calibration, pseudo_counts, zero_probability

README = Path(__file__).resolve().parents[1] / "README.md"
SMALL = {"hidden_dim": 32, "n_phi": 3, "n_rho": 3}


# -- the conversion by hand ----------------------------------------------------------------------


def test_zero_calibration_is_the_measured_zero_fraction_per_predicted_level():
    predicted = np.array([[0.1, 0.2, 3.0, 4.0], [0.3, 0.4, 5.0, 6.0]])
    measured = np.array([[0.0, 0.0, 1.0, 0.0], [0.0, 2.0, 3.0, 4.0]])  # low level: 3 of 4 zero; high: 1 of 4
    cal = fit_zero_calibration(predicted, measured, "spots", n_bins=2)
    np.testing.assert_allclose(cal["edges"], [0.1, np.median(predicted), 6.0])
    np.testing.assert_allclose(cal["zero_fraction"], [0.75, 0.25])
    assert cal["measured_zero_fraction"] == 0.5 and cal["source"] == "spots"
    # Levels outside the fitted range fall into the end bins.
    np.testing.assert_allclose(
        zero_probability(np.array([[-1.0, 0.0, 2.0, 99.0]]), cal), [[0.75, 0.75, 0.25, 0.25]]
    )


def test_each_spot_loses_its_expected_number_of_undetected_genes_on_its_lowest_predictions():
    cal = {"edges": [0.0, 1.0, 10.0], "zero_fraction": [0.9, 0.1]}
    predicted = np.array([[0.5, 2.0, 0.2, 3.0], [2.0, 3.0, 4.0, 5.0], [0.5, 0.5, 0.5, -0.1]])
    counts = pseudo_counts(predicted, cal)
    # Spot 0: 0.9 + 0.1 + 0.9 + 0.1 = 2 zeros, on its two lowest genes; spot 1: 0.4 -> none;
    # spot 2: 3.6 -> 4, all (the negative prediction is clipped to 0 first).
    expected = np.expm1(np.clip(predicted, 0, None)).astype(np.float32)
    expected[0, [0, 2]] = 0
    expected[2] = 0
    np.testing.assert_allclose(counts, expected, rtol=1e-6)
    np.testing.assert_allclose(
        pseudo_counts(predicted, None), np.expm1(np.clip(predicted, 0, None)), rtol=1e-6
    )


def test_panel_genes_a_pseudo_label_lacks_are_unknown_not_zero():
    panel = ["A", "B", "C"]
    obs = pd.DataFrame(
        {"expression_source": ["measured", "predicted"], "library_size": [1e4, 1e4]}, index=["m", "p"]
    )
    adata = ad.AnnData(
        np.array([[5.0, 1.0], [7.0, 2.0]], np.float32), obs=obs, var=pd.DataFrame(index=["A", "B"])
    )
    counts, _, alignment = align_to_panel(adata, panel)
    assert counts[0, 2] == 0 and np.isnan(counts[1, 2]) and alignment.predicted_rows == 1
    assert "unknown (NaN, left out by the encoder) in the 1 predicted spots" in alignment.summary()
    # The panel encoder puts an unknown gene at its training mean (standardised 0) ...
    encoder = PanelExpressionEncoder(genes=panel)
    encoder.mean.copy_(torch.tensor([1.0, 2.0, 3.0]))
    z = encoder(torch.from_numpy(counts), torch.tensor([1e4, 1e4]))["ge"]
    assert z[1, 2] == 0 and z[0, 2] == -3.0
    # ... and CancerFoundation leaves it out of the sequence (as a gene outside its panel).
    cf = CancerFoundationEncoder(ntoken=10, n_bins=5, max_seq_len=8, nlayers=1, nheads=2, embsize=8, d_hid=8,
                                 genes=panel, gene_ids=[3, 4, 5], binning_seed=0)  # fmt: skip
    ids, values = cf.tokenize(counts)
    assert ids[0].tolist() == [0, 3, 4, 5] and ids[1].tolist() == [0, 3, 4, 1]
    assert values[1, 3] == -2.0  # padding value


# -- held-out her2st spots -----------------------------------------------------------------------


def own_spot_fraction(pseudo: np.ndarray, measured: np.ndarray) -> float:
    """Mean over spots i of the fraction of other spots j with cos(pseudo_i, measured_i) >
    cos(pseudo_i, measured_j): 1 when every pseudo-label is nearest its own spot, 0.5 by chance."""
    p = pseudo / np.linalg.norm(pseudo, axis=1, keepdims=True)
    m = measured / np.linalg.norm(measured, axis=1, keepdims=True)
    sim = p @ m.T
    own = np.diag(sim)
    return float(((own[:, None] > sim).sum(axis=1) / (len(sim) - 1)).mean())


@pytest.fixture(scope="module")
def c4(her2st_store):
    """A predictor trained on C2 and C3 (DeepSpot's 5,000 seurat_v3_paper HVGs, a small network, 20
    short epochs), its predictions for the unseen C4 as pseudo-labels, and C4's measured spots."""
    torch.set_num_threads(1)
    train = SpotSet.from_store(her2st_store, split=None, samples=["C2", "C3"])
    test = SpotSet.from_store(her2st_store, split=None, samples=["C4"])
    encoder = build_predictor_encoder("stain", train)
    fit = train_predictor(
        train, encoder, epochs=20, batch_size=64, lr=1e-3, model_kwargs=SMALL, progress=False
    )
    features = context_features(
        test.tiles, test.adata.obs, test.tile_um, test.spot_diameter_um, encoder, progress=False
    )
    predicted = np.clip(fit.predictor.predict_features(features), 0, None)
    pseudo = ad.AnnData(predicted, obs=test.adata.obs.copy(), var=pd.DataFrame(index=fit.predictor.genes))
    pseudo.layers["counts"] = pseudo_counts(predicted, fit.predictor.config.provenance["zero_calibration"])
    pseudo.obs["library_size"] = 1e4
    pseudo.obs["expression_source"] = "predicted"
    return train.adata, test.adata, pseudo


def readme_number(label: str) -> float:
    pattern = r"\s+".join(map(re.escape, label.split())) + r":\s+(\d\.\d\d)"  # the text may wrap
    match = re.search(pattern, README.read_text())
    assert match, f"README.md states no '{label}: 0.xx'"
    return float(match.group(1))


def test_pseudo_labels_have_the_zero_fraction_of_measured_spots(c4):
    _, measured, pseudo = c4
    truth = align_to_panel(measured, list(pseudo.var_names))[0]
    measured_zeros, pseudo_zeros = (truth == 0).mean(), (pseudo.layers["counts"] == 0).mean()
    print(
        f"C4, predictor genes: measured zero fraction {measured_zeros:.3f}, pseudo-labels {pseudo_zeros:.3f}"
    )
    assert abs(pseudo_zeros - measured_zeros) < 0.05 and (np.expm1(pseudo.X) == 0).mean() < 0.05


def test_pseudo_label_embeds_nearest_its_own_measured_spot(c4):
    """The panel encoder's embedding of a C4 spot's pseudo-label against the measured C4 spots:
    own spot vs the others, the shuffled-spot control, and missing genes filled with 0 (the
    former handling). README.md states the fraction; this checks it."""
    train, measured, pseudo = c4
    panel = PanelExpressionEncoder.fit(train, n_genes=256)  # chosen on measured genes: some are not predicted

    def embed(adata):
        return panel.encode(adata, warn_missing=False)[0]["ge"].numpy()

    target = embed(measured)
    fraction = own_spot_fraction(embed(pseudo), target)
    shuffled = [own_spot_fraction(embed(pseudo)[np.random.default_rng(s).permutation(pseudo.n_obs)], target)
                for s in range(5)]  # fmt: skip
    zero_filled = pseudo.copy()
    zero_filled.obs["expression_source"] = "measured"  # unknown genes read as 0
    filled = own_spot_fraction(embed(zero_filled), target)
    print(f"panel encoder, C4: own spot {fraction:.3f}; shuffled {np.round(shuffled, 3).tolist()}; "
          f"missing genes as 0: {filled:.3f}")  # fmt: skip
    assert fraction > max(shuffled) + 0.12 and fraction > filled + 0.08
    assert abs(fraction - readme_number("own-spot fraction, panel encoder")) < 0.03


def test_cancerfoundation_reads_pseudo_labels_through_the_same_path(c4, test_data, tmp_path):
    """A tiny random-weights CancerFoundation (real on-disk format): pseudo-labels encode with
    their unknown genes left out. Random weights carry no biology, so its own-spot fraction is
    reported, not required (README.md)."""
    train, measured, pseudo = c4
    vocab = test_data / "cancerfoundation_assets" / "vocab.json"
    args = {**TINY, "max_seq_len": 257}
    reference = Reference(len(json.loads(vocab.read_text())), **args)
    folder = write_folder(tmp_path / "cf", vocab, reference.official_state_dict(), args=args)
    cf = CancerFoundationEncoder.from_cancerfoundation(folder, adata=train, binning_seed=0)
    outputs, alignment = cf.encode(pseudo, warn_missing=False)
    assert (
        alignment.predicted_rows == pseudo.n_obs and alignment.missing
    )  # cell_ranger genes not all predicted
    counts = align_to_panel(pseudo, cf.genes)[0]
    ids = cf.tokenize(counts)[0]
    n_known = (~np.isnan(counts)).sum(axis=1)
    assert ((ids[:, 1:] != cf.config.pad_token_id).sum(dim=1).numpy() == n_known).all()
    fraction = own_spot_fraction(
        outputs["ge"].numpy(), cf.encode(measured, warn_missing=False)[0]["ge"].numpy()
    )
    print(f"random-weights CancerFoundation, C4: own spot {fraction:.3f} (chance 0.5)")
    assert 0.4 < fraction < 0.6
