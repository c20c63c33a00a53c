import json

import numpy as np
import pytest
from scipy.integrate import trapezoid

from stmdit.evaluate.fidelity import (
    DEEPSPOT_N_GRID,
    bootstrap_interval,
    ceiling_ratio,
    fidelity_auc,
    fidelity_auc_from_scores,
    pearson_per_gene,
    rank_genes_by_variance,
)

SPAN = DEEPSPOT_N_GRID[-1] - DEEPSPOT_N_GRID[0]


def test_pearson_per_gene_matches_numpy_and_marks_constant_genes():
    rng = np.random.default_rng(0)
    measured = rng.normal(size=(40, 6))
    predicted = 0.5 * measured + rng.normal(size=(40, 6))
    measured[:, 2] = 0.1  # constant measured gene; 0.1 is not exact in binary, so its mean rounds
    predicted[:, 4] = 3.0  # constant predicted gene
    r = pearson_per_gene(measured, predicted)
    assert np.isnan(r[[2, 4]]).all()
    for g in (0, 1, 3, 5):
        assert r[g] == pytest.approx(np.corrcoef(measured[:, g], predicted[:, g])[0, 1], abs=1e-12)


def test_pearson_per_gene_rejects_what_has_no_correlation():
    with pytest.raises(ValueError, match="one shape"):
        pearson_per_gene(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="at least 2 spots"):
        pearson_per_gene(np.zeros((1, 3)), np.zeros((1, 3)))
    with pytest.raises(ValueError, match="finite"):
        pearson_per_gene(np.full((3, 2), np.nan), np.zeros((3, 2)))


@pytest.mark.parametrize("c", [0.0, 0.27, -0.1])
def test_flat_curve_gives_its_value_as_normalised_auc(c):
    result = fidelity_auc_from_scores(np.full(5000, c), n_bootstrap=20)
    np.testing.assert_array_equal(result.n_values, DEEPSPOT_N_GRID)
    np.testing.assert_allclose(result.median_r, c)
    assert result.auc == result.auc_normalised == pytest.approx(c)
    assert result.auc_raw == pytest.approx(c * SPAN)
    assert result.bootstrap_mean == pytest.approx(c) and result.bootstrap_std == pytest.approx(0, abs=1e-15)


def test_step_curve_integrates_by_the_trapezoidal_rule():
    r = np.r_[np.ones(500), np.zeros(4500)]
    result = fidelity_auc_from_scores(r, n_bootstrap=0)
    # Median of the top N: 1 up to N = 500, then 0.5 at N = 1000 (500 ones, 500 zeros), then 0.
    np.testing.assert_allclose(result.median_r, [1, 1, 1, 1, 1, 1, 1, 0.5, 0, 0, 0])
    expected_raw = 400 * 1 + 500 * (1 + 0.5) / 2 + 1000 * (0.5 + 0) / 2
    assert result.auc_raw == pytest.approx(expected_raw)
    assert result.auc == pytest.approx(expected_raw / SPAN)
    x = (result.n_values - 100) / SPAN
    assert result.auc == pytest.approx(trapezoid(result.median_r, x))
    assert result.auc_raw == pytest.approx(trapezoid(result.median_r, result.n_values))
    raw = fidelity_auc_from_scores(r, n_bootstrap=0, normalise=False)
    assert raw.auc == raw.auc_raw == pytest.approx(expected_raw) and raw.protocol["headline"].startswith(
        "raw"
    )


def test_nan_genes_count_as_zero_and_are_reported():
    rng = np.random.default_rng(1)
    r = rng.uniform(-0.2, 0.8, size=3000)
    with_nan = r.copy()
    with_nan[::7] = np.nan
    zeroed = np.nan_to_num(with_nan, nan=0.0)
    a = fidelity_auc_from_scores(with_nan, n_bootstrap=50)
    b = fidelity_auc_from_scores(zeroed, n_bootstrap=50)
    assert a.auc == b.auc and a.bootstrap_mean == b.bootstrap_mean
    assert a.protocol["n_nan_genes"] == len(r[::7]) and np.isnan(a.gene_r[0])


def test_gene_order_picks_the_top_genes():
    r = np.r_[np.zeros(4000), np.ones(1000)]  # the informative genes are the last columns
    assert fidelity_auc_from_scores(r, n_bootstrap=0).median_r[0] == 0
    ranked = fidelity_auc_from_scores(r, gene_order=np.arange(5000)[::-1], n_bootstrap=0)
    assert ranked.median_r[0] == 1 and ranked.protocol["gene_ranking"].startswith("given gene_order")
    with pytest.raises(ValueError, match="distinct indices"):
        fidelity_auc_from_scores(r, gene_order=[0, 0, 1])
    with pytest.raises(ValueError, match="integer"):
        fidelity_auc_from_scores(r, gene_order=[0.5, 1.5])


def test_variance_ranking_breaks_ties_by_column_order():
    rng = np.random.default_rng(2)
    base = rng.normal(size=(30, 1))
    measured = np.hstack([base, 3 * base, base, 3 * base, 2 * base])  # variances 1, 9, 1, 9, 4 (x var)
    np.testing.assert_array_equal(rank_genes_by_variance(measured), [1, 3, 4, 0, 2])


def test_fidelity_auc_ranks_by_measured_variance_by_default():
    rng = np.random.default_rng(3)
    scale = np.repeat([3.0, 1.0], 600)  # the first 600 genes vary most
    measured = rng.normal(size=(80, 1200)) * scale
    predicted = measured.copy()
    predicted[:, 600:] = rng.normal(size=(80, 600))  # only the most variable genes are predicted
    result = fidelity_auc(measured, predicted, n_bootstrap=0)
    order = rank_genes_by_variance(measured)
    same = fidelity_auc_from_scores(pearson_per_gene(measured, predicted), order, n_bootstrap=0)
    assert result.auc == same.auc
    assert result.median_r[0] == pytest.approx(1.0)
    assert result.protocol["gene_ranking"].startswith("variance of the measured values")
    assert result.protocol["n_spots"] == 80


def test_fewer_genes_than_the_grid_caps_n_at_the_gene_count():
    result = fidelity_auc_from_scores(np.full(700, 0.3), n_bootstrap=5)
    np.testing.assert_array_equal(result.n_values, [100, 150, 200, 250, 300, 400, 500, 700])
    assert result.protocol["grid_capped"] and result.protocol["grid_used"][-1] == 700
    assert result.protocol["n_genes_ranked"] == 700
    assert result.auc == pytest.approx(0.3) and result.auc_raw == pytest.approx(0.3 * 600)
    no_bootstrap = fidelity_auc_from_scores(np.full(700, 0.3), n_bootstrap=0).to_dict()
    assert json.loads(json.dumps(no_bootstrap))["bootstrap_std"] is None
    with pytest.raises(ValueError, match="one point"):
        fidelity_auc_from_scores(np.full(100, 0.3))
    full = fidelity_auc_from_scores(np.full(6000, 0.3), n_bootstrap=0)
    assert not full.protocol["grid_capped"] and full.protocol["n_genes_ranked"] == 5000


def test_bootstrap_is_deterministic_for_a_seed_and_varies_with_r():
    rng = np.random.default_rng(4)
    r = rng.uniform(-0.3, 0.9, size=5000)
    a = fidelity_auc_from_scores(r, n_bootstrap=300, seed=7)
    b = fidelity_auc_from_scores(r, n_bootstrap=300, seed=7)
    c = fidelity_auc_from_scores(r, n_bootstrap=300, seed=8)
    np.testing.assert_array_equal(a.bootstrap_aucs, b.bootstrap_aucs)
    assert not np.array_equal(a.bootstrap_aucs, c.bootstrap_aucs)
    assert a.bootstrap_aucs.shape == (300,) and a.bootstrap_std > 0
    assert abs(a.bootstrap_mean - a.auc) < 4 * a.bootstrap_std
    assert a.protocol["bootstrap"]["replicates"] == 300 and a.protocol["bootstrap"]["seed"] == 7


def test_the_gene_bootstrap_interval_covers_the_population_auc():
    """The 95% interval reported beside a fidelity AUC, checked by simulation: genes are a sample
    of a population in which the more variable genes (quantile u near 1) are better predicted,
    r = 0.05 + 0.4 u^2 + noise; the estimand is the population's AUC (medians over the top
    fraction N / G of all genes, from two million). Over 400 samples of G = 400 genes the
    interval holds it about 95% of the time, and a value 0.05 off far less often."""
    genes, grid = 400, [10, 25, 50, 100, 200, 400]
    rng = np.random.default_rng(0)

    def sample(n: int):
        u = rng.random(n)
        return u, 0.05 + 0.4 * u**2 + 0.15 * rng.standard_normal(n)

    u, r = sample(2_000_000)
    ranked = r[np.argsort(-u)]
    n = np.asarray(grid)
    curve = [np.median(ranked[: len(ranked) * k // genes]) for k in n]
    truth = trapezoid(curve, (n - n[0]) / (n[-1] - n[0]))
    covered, covered_off = [], []
    for k in range(400):
        u, r = sample(genes)
        fit = fidelity_auc_from_scores(r, np.argsort(-u), n_grid=grid, n_bootstrap=300, seed=k)
        low, high = bootstrap_interval(fit.bootstrap_aucs)
        covered.append(low <= truth <= high)
        covered_off.append(low <= truth + 0.05 <= high)
    print(f"population AUC {truth:.3f}: covered {np.mean(covered):.3f}, 0.05 off {np.mean(covered_off):.3f}")
    assert 0.92 <= np.mean(covered) <= 0.98  # binomial sd at 400 samples: 0.011
    assert np.mean(covered_off) < 0.2


def test_protocol_describes_the_number_and_serialises():
    result = fidelity_auc_from_scores(np.linspace(0, 0.5, 5000), n_bootstrap=10)
    protocol = result.protocol
    for key in (
        "grid_used",
        "normalisation",
        "nan_handling",
        "gene_ranking",
        "bootstrap",
        "integration",
        "headline",
    ):
        assert key in protocol
    assert "(N - N_min) / (N_max - N_min)" in protocol["normalisation"]
    summary = json.loads(json.dumps(result.to_dict()))
    assert summary["auc"] == pytest.approx(result.auc) and summary["curve"]["n"] == list(DEEPSPOT_N_GRID)


def test_ceiling_ratio_compares_like_with_like():
    assert ceiling_ratio(0.267, 0.326) == pytest.approx(0.819, abs=1e-3)
    generated = fidelity_auc_from_scores(np.full(5000, 0.2), n_bootstrap=0)
    real = fidelity_auc_from_scores(np.full(5000, 0.25), n_bootstrap=0)
    assert ceiling_ratio(generated, real) == pytest.approx(0.8)
    shorter = fidelity_auc_from_scores(np.full(3000, 0.25), n_bootstrap=0)
    with pytest.raises(ValueError, match="computed differently"):
        ceiling_ratio(generated, shorter)
    with pytest.raises(ValueError, match="positive"):
        ceiling_ratio(0.2, 0.0)


def test_protocol_lists_every_departure_from_deepspot():
    rng = np.random.default_rng(0)
    measured = rng.normal(size=(30, 300))
    predicted = measured + rng.normal(size=measured.shape)
    # No gene protocol and no order: genes ranked per sample, and the grid stops at 300 genes.
    result = fidelity_auc(measured, predicted, n_bootstrap=0)
    departures = result.protocol["departures"]
    assert not result.protocol["paper_protocol"] and len(departures) == 3
    assert "records no gene selection" in departures[0] and "ranked by variance" in departures[1]
    assert "stops at N = 300" in departures[2]
    # The predictor's order and protocol: only the predictor's own departure (its 300 genes) remains,
    # stated once.
    short = {"method": "seurat_v3", "batch_key": "sample_id", "n_genes": 300, "order": "seurat_v3 rank",
             "departures": ["300 genes instead of DeepSpot's 5000"]}  # fmt: skip
    result = fidelity_auc(measured, predicted, np.arange(300), n_bootstrap=0, gene_protocol=short)
    assert result.protocol["departures"] == ["300 genes instead of DeepSpot's 5000"]
    assert result.protocol["gene_ranking"] == "the predictor's gene order (seurat_v3 rank)"
    # The paper's protocol on 5,000 genes: no departure.
    measured = rng.normal(size=(30, 5000))
    paper = {**short, "n_genes": 5000, "departures": []}
    result = fidelity_auc(measured, measured + rng.normal(size=measured.shape), np.arange(5000), n_bootstrap=0,
                          gene_protocol=paper)  # fmt: skip
    assert result.protocol["paper_protocol"] and result.protocol["departures"] == []
    assert result.protocol["grid_used"][-1] == 5000


def test_the_demo_reads_tiles_on_the_predictors_grid_and_its_numbers_stay_at_equal_resolution():
    from stmdit.data.sources import prepare_synthetic
    from stmdit.demo import DemoSettings, _fidelity, _fit_predictor
    from stmdit.predictor import context_features, expression_targets
    from stmdit.predictor.readback import training_grid
    from stmdit.tiles import resize, to_tensor, to_uint8

    settings = DemoSettings.quick()
    data = prepare_synthetic(n_sections=2, grid=8, tile_size=settings.tile_size, n_genes=32, seed=0)
    predictor_fit = _fit_predictor(data, settings, progress=False)
    fit, encoder = predictor_fit
    tile_um = float(data.adata.uns["simulator"]["tile_um"])
    assert training_grid(fit.predictor) == (tile_um, settings.tile_size)
    held = data.held_out_index
    adata, tiles = data.adata[held], data.tiles[held]

    # Before the shared rule, the demo read its tiles as they came; at the tile size the predictor
    # learnt from, the shared rule gives the same numbers.
    features = context_features(to_uint8(tiles), adata.obs, tile_um, tile_um, encoder, progress=False)
    before = fidelity_auc(expression_targets(adata, fit.predictor.genes), fit.predictor.predict_features(features),
                          n_bootstrap=200, seed=0)  # fmt: skip
    now = _fidelity(predictor_fit, tiles, adata, tile_um)
    assert now.auc == before.auc and np.array_equal(now.bootstrap_aucs, before.bootstrap_aucs)
    # Tiles of another size are put on the predictor's grid first (read as given, they score otherwise).
    coarse = resize(to_uint8(tiles), settings.tile_size // 2)
    on_grid = _fidelity(predictor_fit, to_tensor(resize(coarse, settings.tile_size)), adata, tile_um)
    assert _fidelity(predictor_fit, to_tensor(coarse), adata, tile_um).auc == on_grid.auc
    features = context_features(coarse, adata.obs, tile_um, tile_um, encoder, progress=False)
    as_given = fidelity_auc(
        expression_targets(adata, fit.predictor.genes), fit.predictor.predict_features(features)
    )
    assert abs(as_given.auc - on_grid.auc) > 1e-4
