"""The DeepSpot-style expression predictor: architecture against a hand-written reference, the
neighbour graph, context features, learning on simulated and real tissue, DeepSpot weights,
and bad input."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from conftest import median_r_with_shuffled_controls, rewrite_spots
from stmdit.data.synthetic import simulate_tissue
from stmdit.encoders.morphology import StainFeatureEncoder
from stmdit.evaluate.fidelity import DEEPSPOT_N_GRID, fidelity_auc
from stmdit.genesets import MARKER_GENES
from stmdit.predictor import (
    PREDICTION_KEY,
    ContextFeatures,
    ExpressionPredictor,
    SpotSet,
    build_predictor_encoder,
    context_features,
    expression_targets,
    fit_predictor,
    load_predictor,
    neighbour_index,
    per_gene_pearson,
    save_predictor,
    train_predictor,
    train_predictor_command,
)
from stmdit.predictor.genes import select_predictor_genes

SIM_TILE_UM = 64.0  # the simulator's tiles show 64 µm of tissue
SMALL = {"hidden_dim": 32, "n_phi": 3, "n_rho": 3}


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: one thread is faster than several contending on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -- architecture ------------------------------------------------------------------------------


def reference_forward(model: ExpressionPredictor, spot, subspots, neighbours, mask) -> torch.Tensor:
    """The DeepSpot computation written out spot by spot: per phi copy Linear + ReLU, the lower
    middle value over copies; sub-spots summed; neighbours max-pooled over those present
    (zeros if none); per rho copy ReLU + Linear, averaged."""
    n_phi, n_rho = model.config.n_phi, model.config.n_rho

    def phi(x):
        copies = torch.stack([torch.relu(model.phi_weight[c] @ x + model.phi_bias[c]) for c in range(n_phi)])
        return copies.sort(dim=0).values[(n_phi - 1) // 2]

    out = []
    for b in range(spot.shape[0]):
        h_spot = phi(spot[b])
        h_sub = sum(phi(s) for s in subspots[b])
        present = [phi(neighbours[b, k]) for k in range(neighbours.shape[1]) if mask[b, k]]
        h_nb = torch.stack(present).max(dim=0).values if present else torch.zeros_like(h_spot)
        h = torch.relu(torch.cat([h_spot, h_sub, h_nb]))
        out.append(sum(model.rho_weight[c] @ h + model.rho_bias[c] for c in range(n_rho)) / n_rho)
    return torch.stack(out)


def tiny_model(genes=("A", "B", "C"), input_dim=5, seed=0, **kw) -> ExpressionPredictor:
    torch.manual_seed(seed)
    config = {"hidden_dim": 4, "n_phi": 4, "n_rho": 3, **kw}
    return ExpressionPredictor(
        genes=list(genes), input_dim=input_dim, provenance={"test": True}, **config
    ).eval()


def tiny_inputs(b=3, k=4, d=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    mask = torch.tensor([[True, False, True, False], [False] * 4, [True] * 4])[:b, :k]
    return (
        torch.randn(b, d, generator=g),
        torch.randn(b, 9, d, generator=g),
        torch.randn(b, k, d, generator=g),
        mask,
    )


def test_forward_matches_a_hand_written_reference():
    model = tiny_model()
    spot, subspots, neighbours, mask = tiny_inputs()
    with torch.no_grad():
        out = model(spot, subspots, neighbours, mask)
        ref = reference_forward(model, spot, subspots, neighbours, mask)
    assert out.shape == (3, 3)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    # No neighbour slots at all is the same as none present.
    with torch.no_grad():
        empty = model(spot[1:2], subspots[1:2], neighbours[1:2, :0], mask[1:2, :0])
    torch.testing.assert_close(empty, out[1:2])


def test_masked_neighbours_are_ignored_and_dropout_only_acts_in_training():
    model = tiny_model()
    spot, subspots, neighbours, mask = tiny_inputs()
    changed = neighbours.clone()
    changed[~mask] = 1e3  # whatever sits in the padding must not leak into the max
    with torch.no_grad():
        torch.testing.assert_close(
            model(spot, subspots, changed, mask), model(spot, subspots, neighbours, mask)
        )
        changed[0, 0] += 5.0  # a present neighbour does count
        assert not torch.allclose(
            model(spot, subspots, changed, mask)[0], model(spot, subspots, neighbours, mask)[0]
        )
    model.train()
    torch.manual_seed(0)
    a = model(spot, subspots, neighbours, mask)
    b = model(spot, subspots, neighbours, mask)
    assert not torch.allclose(a, b)  # dropout masks differ per call in training
    out = model.predict(spot, subspots, neighbours, mask)  # predict runs in eval mode...
    assert model.training  # ...and leaves the mode as it was
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            out, model(spot, subspots, neighbours, mask) * model.target_std + model.target_mean
        )


def test_save_load_round_trip_keeps_outputs_genes_and_scaler(tmp_path):
    model = tiny_model(genes=("CD3E", "KRT8", "MKI67"))
    model.set_scaler([1.0, 2.0, 3.0], [0.5, 1.5, 2.5])
    inputs = tiny_inputs()
    model.save_pretrained(tmp_path / "p")
    config = json.loads((tmp_path / "p" / "config.json").read_text())
    assert config["genes"] == ["CD3E", "KRT8", "MKI67"] and config["provenance"] == {"test": True}
    loaded = ExpressionPredictor.from_pretrained(tmp_path / "p").eval()
    assert loaded.genes == model.genes
    torch.testing.assert_close(loaded.target_mean, torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(loaded.target_std, torch.tensor([0.5, 1.5, 2.5]))
    torch.testing.assert_close(loaded.predict(*inputs), model.predict(*inputs), rtol=0, atol=0)
    # Predictions as AnnData say what they are.
    values = model.predict(*inputs).numpy()
    obs = pd.DataFrame({"sample_id": ["s"] * 3}, index=["a", "b", "c"])
    out = model.to_anndata(values, obs)
    assert list(out.var_names) == model.genes and list(out.obs_names) == ["a", "b", "c"]
    np.testing.assert_array_equal(out.X, values)
    assert "predicted" in out.uns[PREDICTION_KEY]["values"] and json.loads(
        out.uns[PREDICTION_KEY]["provenance"]
    ) == {"test": True}
    out.write_h5ad(tmp_path / "pred.h5ad")
    assert ad.read_h5ad(tmp_path / "pred.h5ad").uns[PREDICTION_KEY]["predictor"] == "ExpressionPredictor"


def test_training_is_deterministic_for_a_seed_and_early_stops_on_validation():
    g = torch.Generator().manual_seed(0)
    n, d = 120, 6
    spot = torch.randn(n, d, generator=g)
    feats = ContextFeatures(spot, torch.randn(n, 9, d, generator=g), torch.from_numpy(neighbour_index(pd.DataFrame(
        {"array_row": np.arange(n) // 12, "array_col": np.arange(n) % 12}))))  # fmt: skip
    targets = np.stack([spot[:, 0].numpy(), -spot[:, 1].numpy() + 1.0], axis=1)
    val = (feats.subset(np.arange(80, 120)), targets[80:])
    train_feats, train_targets = feats.subset(np.arange(80)), targets[:80]
    kwargs = {"epochs": 40, "batch_size": 16, "lr": 3e-3, "model_kwargs": SMALL, "progress": False, "seed": 3}
    a = fit_predictor(train_feats, train_targets, ["g1", "g2"], val=val, patience=3, **kwargs)
    b = fit_predictor(train_feats, train_targets, ["g1", "g2"], val=val, patience=3, **kwargs)
    for key, value in a.predictor.state_dict().items():
        torch.testing.assert_close(value, b.predictor.state_dict()[key], rtol=0, atol=0)
    h = a.history
    assert len(h["val_loss"]) == h["epochs_run"] and h["best_epoch"] <= h["epochs_run"]
    assert min(h["val_loss"]) == h["val_loss"][h["best_epoch"] - 1]
    assert h["epochs_run"] == 40 or h["epochs_run"] - h["best_epoch"] == 3  # ran out, or stopped by patience
    torch.testing.assert_close(a.predictor.target_mean, torch.from_numpy(train_targets.mean(0)))


# -- the neighbour graph ---------------------------------------------------------------------


def brute_force_neighbours(obs: pd.DataFrame, within) -> list[set[int]]:
    samples = obs["sample_id"].to_numpy()
    rows, cols = obs["array_row"].to_numpy(), obs["array_col"].to_numpy()
    return [{j for j in range(len(obs)) if j != i and samples[j] == samples[i] and within(rows[j] - rows[i], cols[j] - cols[i])}
            for i in range(len(obs))]  # fmt: skip


def as_sets(index: np.ndarray) -> list[set[int]]:
    return [set(row[row >= 0].tolist()) for row in index]


def hex_layout(n_rows=6, n_cols=8, samples=("s1", "s2")) -> pd.DataFrame:
    """Two Visium-like sections on identical array positions: a row's spots 2 columns apart,
    odd rows shifted by one; pixel centres on the true hexagonal geometry (pitch 100 px)."""
    frames = []
    for s in samples:
        r, c = np.divmod(np.arange(n_rows * n_cols), n_cols)
        col = 2 * c + r % 2
        frames.append(pd.DataFrame({"sample_id": s, "array_row": r, "array_col": col,
                                    "x_px": 50.0 * col, "y_px": 100.0 * math.sqrt(3) / 2 * r}))  # fmt: skip
    return pd.concat(frames, ignore_index=True)


def test_hexagonal_grid_neighbours_by_deepspots_box_or_the_ring_of_six():
    obs = hex_layout()
    rows, cols = obs["array_row"].to_numpy(), obs["array_col"].to_numpy()
    # Default, DeepSpot's rule: the box |d row|, |d col| <= 1, which on doubled columns holds the
    # 4 diagonal neighbours only (same sample only, though s1 and s2 share positions).
    index = neighbour_index(obs)
    assert index.shape == (len(obs), 4)
    assert as_sets(index) == brute_force_neighbours(obs, lambda dr, dc: max(abs(dr), abs(dc)) == 1)
    assert as_sets(index) == brute_force_neighbours(obs, lambda dr, dc: abs(dr) == 1 and abs(dc) == 1)
    # The explicit hex_ring rule: the 6 spots one pitch away.
    ring = neighbour_index(obs, rule="hex_ring")
    assert ring.shape == (len(obs), 6)
    counts = (ring >= 0).sum(1)
    interior = (rows > 0) & (rows < 5) & (cols > 1) & (cols < 14)
    assert (counts[interior] == 6).all() and (counts[~interior] < 6).all()
    assert counts[0] == 2  # row 0, col 0: (0, 2) and (1, 1)
    expected = brute_force_neighbours(
        obs, lambda dr, dc: (dr == 0 and abs(dc) == 2) or (abs(dr) == 1 and abs(dc) == 1)
    )
    assert as_sets(ring) == expected
    # Without array coordinates the pixel fallback (1.5 pitches) finds the ring under either rule.
    assert as_sets(neighbour_index(obs.drop(columns=["array_row", "array_col"]))) == expected


def test_square_grid_neighbours_on_her2st(her2st_store):
    obs = her2st_store.spots().obs
    index = neighbour_index(obs)
    assert index.shape[1] == 8
    expected = brute_force_neighbours(obs, lambda dr, dc: max(abs(dr), abs(dc)) == 1)
    assert as_sets(index) == expected
    counts = (index >= 0).sum(1)
    assert counts.max() == 8 and (counts == 8).mean() > 0.5 and counts.min() < 8
    samples = obs["sample_id"].astype(str).to_numpy()
    for i, row in enumerate(index):
        assert (samples[row[row >= 0]] == samples[i]).all()
    # The sections overlap in array coordinates, so a graph that ignored samples would differ.
    grid = obs[["array_row", "array_col"]].astype(int).apply(tuple, axis=1)
    assert grid[samples == "C2"].isin(set(grid[samples == "C3"])).any()


# -- context features ------------------------------------------------------------------------


class MeanColour:
    """An 'encoder' whose features are a crop's mean RGB and its side in pixels."""

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        side = torch.full((images.shape[0], 1), float(images.shape[-1]))
        return torch.cat([images.mean(dim=(2, 3)), side], dim=1)


def test_context_features_crop_the_spot_its_sub_spots_and_link_neighbours():
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, (12, 40, 40, 3), dtype=np.uint8)
    obs = pd.DataFrame({"sample_id": ["a"] * 6 + ["b"] * 6, "array_row": [0, 0, 0, 1, 1, 1] * 2,
                        "array_col": [0, 1, 2, 0, 1, 2] * 2})  # fmt: skip
    # A 30 µm spot in a 40 µm tile of 40 px: the central 30 px, sub-spots of 10 px.
    feats = context_features(tiles, obs, 40.0, 30.0, MeanColour(), batch_size=5, progress=False)
    assert feats.spot.shape == (12, 4) and feats.subspots.shape == (12, 9, 4) and len(feats) == 12
    crop = tiles[:, 5:35, 5:35].astype(np.float64) / 255
    np.testing.assert_allclose(feats.spot[:, :3].numpy(), crop.mean(axis=(1, 2)), rtol=1e-5)
    assert (feats.spot[:, 3] == 30).all() and (feats.subspots[..., 3] == 10).all()
    for k, (i, j) in enumerate((i, j) for i in range(3) for j in range(3)):  # row-major
        sub = crop[:, 10 * i : 10 * i + 10, 10 * j : 10 * j + 10].mean(axis=(1, 2))
        np.testing.assert_allclose(feats.subspots[:, k, :3].numpy(), sub, rtol=1e-5)
    np.testing.assert_array_equal(feats.neighbours.numpy(), neighbour_index(obs))
    # Model inputs: neighbour features are the neighbours' spot features.
    spot, subspots, neighbours, mask = feats.batch([7])
    present = feats.neighbours[7][feats.neighbours[7] >= 0]
    torch.testing.assert_close(neighbours[0][mask[0]], feats.spot[present])
    # Generated tiles as a float tensor (N, 3, S, S) give the same features.
    generated = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255
    again = context_features(generated, obs, 40.0, 30.0, MeanColour(), progress=False)
    torch.testing.assert_close(again.spot, feats.spot)
    # Per-spot diameters: spots of another size are cropped to theirs.
    mixed = context_features(tiles, obs, 40.0, np.r_[[30.0] * 6, [36.0] * 6], MeanColour(), progress=False)
    assert (mixed.spot[:6, 3] == 30).all() and (mixed.spot[6:, 3] == 36).all()
    # A subset keeps neighbours inside it and drops the others.
    part = feats.subset([0, 1, 6])
    assert as_sets(part.neighbours.numpy()) == [{1}, {0}, set()]


# -- learning ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tissue():
    """Four simulated sections of 12 x 12 spots, two per patient."""
    sim = simulate_tissue(n_sections=4, grid=12, tile_size=32, seed=0)
    sim.adata.obs["patient_id"] = sim.adata.obs["sample_id"].map(
        {"section0": "P1", "section1": "P1", "section2": "P2", "section3": "P2"}
    )
    return SpotSet(sim.adata, sim.tiles, SIM_TILE_UM, SIM_TILE_UM)


def rows_of(spots: SpotSet, *samples: str) -> np.ndarray:
    return np.flatnonzero(spots.adata.obs["sample_id"].isin(samples).to_numpy())


def test_predictor_learns_marker_genes_of_held_out_simulated_sections(tissue):
    train, val, test = (
        tissue.subset(rows_of(tissue, *s)) for s in (("section0", "section1"), ("section2",), ("section3",))
    )
    encoder = build_predictor_encoder("stain", train)
    assert isinstance(encoder, StainFeatureEncoder) and encoder.config.image_size == 32
    fit = train_predictor(train, encoder, n_genes=48, val=val, epochs=30, batch_size=64, lr=1e-3, patience=5,
                          model_kwargs=SMALL, progress=False)  # fmt: skip
    losses = fit.history["train_loss"]
    assert losses[-1] < 0.6 * losses[0]
    markers = {g for genes in MARKER_GENES.values() for g in genes}
    genes = [g for g in fit.predictor.genes if g in markers]
    assert len(genes) >= 20
    features = context_features(test.tiles, test.adata.obs, SIM_TILE_UM, SIM_TILE_UM, encoder, progress=False)
    predicted = fit.predictor.to_anndata(fit.predictor.predict_features(features), test.adata.obs)[:, genes].X
    measured = expression_targets(test.adata, genes)
    r = per_gene_pearson(measured, predicted)
    shuffled = per_gene_pearson(measured, predicted[np.random.default_rng(0).permutation(len(predicted))])
    print(
        f"simulated held-out section: median marker r {np.median(r):.3f}, shuffled {np.median(shuffled):.3f}"
    )
    assert np.median(r) > 0.4 and np.median(r) > np.median(shuffled) + 0.35


def test_leave_one_patient_out_gives_a_model_and_test_predictions_per_patient(tissue, tmp_path):
    encoder = build_predictor_encoder("stain", tissue)
    with pytest.warns(UserWarning, match="genes chosen by variance"):
        fit = train_predictor(tissue, encoder, n_genes=24, epochs=6, batch_size=128, lr=1e-3, leave_one_patient_out=True,
                              model_kwargs=SMALL, progress=False, gene_selection="variance")  # fmt: skip
    assert fit.predictor.gene_protocol["method"] == "variance" and fit.predictor.hvg_order is not None
    assert sorted(fit.folds) == ["P1", "P2"] and fit.predictor.config.provenance["n_train_spots"] == len(
        tissue
    )
    for patient, fold in fit.folds.items():
        held_out = tissue.adata.obs["patient_id"] == patient
        assert fold.predictor.config.provenance["held_out_patient"] == patient
        assert set(fold.predictor.config.provenance["train_samples"]).isdisjoint(
            set(tissue.adata.obs["sample_id"][held_out])
        )
        pred = fold.test_predictions
        assert pred.n_obs == held_out.sum() and list(pred.var_names) == fold.predictor.genes
        assert pred.uns[PREDICTION_KEY]["median_pearson"] == fold.history["test_median_pearson"] > 0.2
    out = save_predictor(fit, encoder, tmp_path / "lopo")
    record = json.loads((out / "training.json").read_text())
    assert sorted(record["folds"]) == ["P1", "P2"]
    saved = ad.read_h5ad(out / "folds" / "P2" / "test_predictions.h5ad")
    np.testing.assert_array_equal(saved.X, fit.folds["P2"].test_predictions.X)
    fold_model = ExpressionPredictor.from_pretrained(out / "folds" / "P2")
    assert fold_model.genes == fit.folds["P2"].predictor.genes
    predictor, loaded_encoder = load_predictor(out)
    torch.testing.assert_close(loaded_encoder.mean, encoder.mean)
    torch.testing.assert_close(predictor.rho_weight, fit.predictor.rho_weight)


def test_real_her2st_predictions_beat_a_shuffled_control(her2st_store):
    train = SpotSet.from_store(her2st_store, split=None, samples=["C2", "C3"])
    test = SpotSet.from_store(her2st_store, split=None, samples=["C4"])
    assert set(train.adata.obs["sample_id"]) == {"C2", "C3"} and len(test) > 150
    assert train.tile_um == 128.0 and (train.spot_diameter_um == 100.0).all()  # legacy ST: 100 µm spots
    encoder = build_predictor_encoder("stain", train)
    fit = train_predictor(train, encoder, n_genes=100, epochs=30, batch_size=64, lr=1e-3, model_kwargs=SMALL,
                          progress=False)  # fmt: skip
    features = context_features(
        test.tiles, test.adata.obs, test.tile_um, test.spot_diameter_um, encoder, progress=False
    )
    predicted = fit.predictor.predict_features(features)
    measured = expression_targets(test.adata, fit.predictor.genes, source="C4")
    r, shuffled = median_r_with_shuffled_controls(measured, predicted)
    print(
        f"her2st C2+C3 -> C4, top 100 genes: median Pearson {r:.3f}; shuffled spots {np.round(shuffled, 3).tolist()}"
    )
    # DeepSpot's HVGs (seurat_v3_paper) include sparse, high-dispersion ones (immunoglobulins, secreted
    # markers), harder to read from H&E than the top-variance genes this test once used.
    assert r > max(shuffled) + 0.1


def test_default_genes_are_deepspots_seurat_v3_paper_hvgs_on_her2st(her2st_store):
    """The paper's protocol (DeepSpot's preprocessing notebook): scanpy's seurat_v3_paper top
    5,000 HVGs, here with the sample as batch key, on the training spots' raw counts, in
    scanpy's selection order; the fidelity curve then reaches 5,000."""
    import scanpy as sc

    spots = her2st_store.spots()
    train = spots[spots.obs["sample_id"].isin(["C2", "C3"])]  # the training sections
    genes, protocol = select_predictor_genes(train)
    reference = ad.AnnData(X=train.layers["counts"].copy(), obs=train.obs[["sample_id"]].astype(str),
                           var=pd.DataFrame(index=train.var_names))  # fmt: skip
    table = sc.pp.highly_variable_genes(
        reference, flavor="seurat_v3_paper", n_top_genes=5000, batch_key="sample_id", inplace=False
    )
    assert len(genes) == 5000 and set(genes) == set(table.index[table["highly_variable"].to_numpy()])
    # scanpy's own selection order for this flavour: batches in which a gene is variable, then rank.
    ranked = table.sort_values(["highly_variable_nbatches", "highly_variable_rank"], ascending=[False, True])
    assert genes == list(ranked.index[:5000])
    assert protocol["paper"] and protocol["batch_key"] == "sample_id" and protocol["departures"] == []
    assert (
        protocol["flavor"] == "seurat_v3_paper"
        and "GettingStartedWithDeepSpot_1_preprocessing.ipynb" in (protocol["reference"])
    )
    # The predictor's order drives the top-N curve over DeepSpot's whole grid.
    c4 = spots[spots.obs["sample_id"] == "C4"]
    measured = expression_targets(c4, genes)
    predicted = measured + np.random.default_rng(0).normal(0, 1, measured.shape)
    result = fidelity_auc(measured, predicted, np.arange(5000), n_bootstrap=0, gene_protocol=protocol)
    assert result.n_values.tolist() == list(DEEPSPOT_N_GRID) and result.n_values[-1] == 5000
    assert (
        result.protocol["paper_protocol"] and result.protocol["gene_protocol"]["method"] == "seurat_v3_paper"
    )
    # The variance ranking is an explicit option, recorded as a departure.
    fewer, variance = select_predictor_genes(train, 300, method="variance")
    assert len(fewer) == 300 and not variance["paper"] and len(variance["departures"]) == 2


def test_seurat_v3_picks_other_genes_than_deepspots_flavour_and_is_a_departure(her2st_store):
    """On two her2st sections the two flavours disagree (seurat_v3 promotes genes variable in
    one section only), so following DeepSpot's flavour matters; seurat_v3 stays as an option,
    matching scanpy's, and a predictor saved with it shows the departure when loaded."""
    import scanpy as sc

    spots = her2st_store.spots()
    train = spots[spots.obs["sample_id"].isin(["C2", "C3"])]
    paper, _ = select_predictor_genes(train)
    v3, protocol = select_predictor_genes(train, method="seurat_v3")
    reference = ad.AnnData(X=train.layers["counts"].copy(), obs=train.obs[["sample_id"]].astype(str),
                           var=pd.DataFrame(index=train.var_names))  # fmt: skip
    table = sc.pp.highly_variable_genes(
        reference, flavor="seurat_v3", n_top_genes=5000, batch_key="sample_id", inplace=False
    )
    ranked = table.sort_values(["highly_variable_rank", "highly_variable_nbatches"], ascending=[True, False])
    assert v3 == list(ranked.index[:5000])
    only_v3 = set(v3) - set(paper)
    print(f"her2st C2+C3: {len(only_v3)} of 5000 seurat_v3 genes are not among seurat_v3_paper's")
    assert len(only_v3) > 100
    # seurat_v3's extra genes are variable in one section only; seurat_v3_paper's top genes in both.
    assert (table.loc[sorted(only_v3), "highly_variable_nbatches"] <= 1).all()
    assert protocol["flavor"] == "seurat_v3" and not protocol["paper"]
    assert "seurat_v3_paper" in protocol["departures"][0]
    # A predictor saved under the former default (method seurat_v3, recorded without departures).
    old = {**protocol, "departures": [], "paper": True}
    model = tiny_model(genes=v3[:3])
    model.register_to_config(provenance={"trained_by": "stmdit train_predictor", "gene_selection": old})
    assert not model.gene_protocol["paper"] and "seurat_v3_paper" in model.gene_protocol["departures"][0]
    with pytest.raises(
        ValueError, match="gene selection must be one of seurat_v3_paper, seurat_v3, variance"
    ):
        select_predictor_genes(train, method="cell_ranger")


def test_predictors_saved_before_the_reference_options_load_with_their_own_rules(tmp_path):
    """A predictor folder from before output_dropout, neighbour_padding and neighbour_rule were
    recorded loads, predicts as before, reads neighbours with the hexagonal ring it was trained
    with, and lists that as a departure; one saved now records DeepSpot's rule."""
    model = tiny_model()
    model.register_to_config(provenance={"trained_by": "stmdit train_predictor", "neighbour_radius": 1})
    model.save_pretrained(tmp_path / "old")
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    for key in ("output_dropout", "neighbour_padding"):
        del config[key]
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    old = ExpressionPredictor.from_pretrained(tmp_path / "old").eval()
    assert old.config.output_dropout == 0.1 and old.config.neighbour_padding == "zeros"
    inputs = tiny_inputs()
    torch.testing.assert_close(old.predict(*inputs), model.predict(*inputs), rtol=0, atol=0)
    assert old.neighbour_rule == "hex_ring" and old.neighbour_radius == 1
    assert any("'hex_ring'" in d for d in old.protocol_departures)
    assert any("records no gene selection" in d for d in old.protocol_departures)
    now = tiny_model()
    now.register_to_config(
        provenance={"trained_by": "stmdit train_predictor", "neighbour_rule": "deepspot_box"}
    )
    assert now.neighbour_rule == "deepspot_box" and not any("hex_ring" in d for d in now.protocol_departures)
    assert tiny_model().neighbour_rule == "deepspot_box"  # hand-built: DeepSpot's rule
    masked = tiny_model(neighbour_padding="masked", output_dropout=0.2)
    assert sum("masked" in d or "output dropout" in d for d in masked.protocol_departures) == 2
    with pytest.raises(ValueError, match="neighbour_padding must be one of zeros, masked"):
        tiny_model(neighbour_padding="max")


def test_read_expression_finds_neighbours_with_the_predictors_rule():
    """Tiles of a Visium-like grid read through read_expression: a predictor recording DeepSpot's
    box pools the 4 diagonal neighbours, one trained with the ring (an older predictor) the 6,
    each exactly as its own features give."""
    from stmdit.predictor.readback import read_expression

    obs = hex_layout(n_rows=4, n_cols=5, samples=("s1",))
    tiles = np.random.default_rng(0).integers(0, 256, (len(obs), 40, 40, 3), dtype=np.uint8)
    outputs = {}
    for rule in ("deepspot_box", "hex_ring"):
        model = tiny_model(input_dim=4)
        model.register_to_config(provenance={"trained_by": "test", "neighbour_rule": rule, "tile_um": 40.0})
        features = context_features(tiles, obs, 40.0, 30.0, MeanColour(), progress=False,
                                    neighbours=neighbour_index(obs, rule=rule))  # fmt: skip
        outputs[rule] = read_expression(tiles, obs, 40.0, 30.0, model, MeanColour())
        np.testing.assert_allclose(outputs[rule], model.predict_features(features), rtol=1e-6)
    assert not np.allclose(outputs["deepspot_box"], outputs["hex_ring"])


def test_command_writes_a_loadable_predictor_folder(her2st_store, tmp_path):
    with pytest.warns(UserWarning, match="does not follow DeepSpot's protocol.*20 genes instead of"):
        out = train_predictor_command(
            her2st_store.root, tmp_path / "predictor", n_genes=20, epochs=2, progress=False
        )
    assert (out / "config.json").is_file() and (out / "morphology_encoder" / "config.json").is_file()
    record = json.loads((out / "training.json").read_text())
    assert (
        len(record["genes"]) == 20 and record["history"]["epochs_run"] <= 2 and record["history"]["val_loss"]
    )
    predictor, encoder = load_predictor(out)
    provenance = predictor.config.provenance
    assert provenance["morphology_spec"] == "stain" and provenance["dataset"] == str(
        her2st_store.root.resolve()
    )
    # What pseudo-labelling and evaluation need: the training tiles' size and the HVG order.
    assert (provenance["tile_um"], provenance["tile_px"]) == (128.0, 32)
    train = her2st_store.spots()[her2st_store.rows("train")]
    assert predictor.genes == select_predictor_genes(train, 20)[0]
    assert (
        predictor.gene_protocol["method"] == "seurat_v3_paper"
        and predictor.gene_protocol["batch_key"] == "sample_id"
    )
    # DeepSpot's neighbour rule, recorded; the only departure is the short gene list.
    assert provenance["neighbour_rule"] == "deepspot_box" and predictor.neighbour_rule == "deepspot_box"
    assert predictor.protocol_departures == provenance["protocol_departures"]
    assert len(provenance["protocol_departures"]) == 1 and "20 genes" in provenance["protocol_departures"][0]
    np.testing.assert_array_equal(predictor.hvg_order, np.arange(20))
    test = SpotSet.from_store(her2st_store, "test")
    feats = context_features(
        test.tiles, test.adata.obs, test.tile_um, test.spot_diameter_um, encoder, progress=False
    )
    assert predictor.predict_features(feats).shape == (len(test), 20)
    with pytest.raises(ValueError, match="at least two patients"):
        train_predictor_command(her2st_store.root, tmp_path / "lopo", n_genes=20, epochs=1, leave_one_patient_out=True,
                                progress=False)  # fmt: skip
    assert not (tmp_path / "lopo").exists()


# -- bad input --------------------------------------------------------------------------------------


def test_bad_inputs_give_clear_errors(tissue, tmp_path):
    model = tiny_model()
    spot, subspots, neighbours, mask = tiny_inputs()
    with pytest.raises(ValueError, match=r"spot features must be \(B, 5\).*morphology encoder"):
        model(spot[:, :4], subspots, neighbours, mask)
    with pytest.raises(ValueError, match="sub-spot features"):
        model(spot, subspots[:2], neighbours, mask)
    with pytest.raises(ValueError, match="neighbour_mask must be a bool"):
        model(spot, subspots, neighbours, mask.float())
    with pytest.raises(ValueError, match="duplicated genes"):
        ExpressionPredictor(genes=["A", "A"], input_dim=3)
    feats = ContextFeatures(torch.zeros(2, 4), torch.zeros(2, 9, 4), torch.full((2, 1), -1))
    with pytest.raises(ValueError, match="use the morphology encoder it was trained with"):
        model.predict_features(feats)
    with pytest.raises(ValueError, match="12 tiles but 11 spots"):
        context_features(np.zeros((12, 40, 40, 3), np.uint8), pd.DataFrame({"x_px": range(11), "y_px": 0.0}), 40.0, 30.0,
                         MeanColour(), progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="larger than the tile"):
        context_features(np.zeros((2, 40, 40, 3), np.uint8), pd.DataFrame({"x_px": [0.0, 1.0], "y_px": 0.0}), 40.0, 55.0,
                         MeanColour(), progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="one tile per spot"):
        SpotSet(tissue.adata, tissue.tiles[:5], SIM_TILE_UM, SIM_TILE_UM)
    with pytest.raises(ValueError, match="not measured: \\['NOT_A_GENE'\\]"):
        expression_targets(tissue.adata, ["CD3E", "NOT_A_GENE"])
    he_only = tissue.adata.copy()
    del he_only.layers["counts"]
    with pytest.raises(ValueError, match="no raw counts.*H&E-only"):
        train_predictor(
            SpotSet(he_only, tissue.tiles, SIM_TILE_UM, SIM_TILE_UM), MeanColour(), progress=False
        )
    with pytest.raises(ValueError, match="x_px/y_px"):
        neighbour_index(pd.DataFrame({"sample_id": ["a", "a"]}))


def test_command_refuses_a_store_without_counts(her2st_store, tmp_path):
    copy = Path(shutil.copytree(her2st_store.root, tmp_path / "he_only"))
    adata = ad.read_h5ad(copy / "spots.h5ad")
    for layer in ("counts", "log1p"):
        del adata.layers[layer]
    rewrite_spots(copy, adata)
    with pytest.raises(ValueError, match="no raw counts.*H&E-only"):
        train_predictor_command(copy, tmp_path / "out", epochs=1, progress=False)
    assert not (tmp_path / "out").exists()
