"""Behavioural tests of the embedded tissue simulator (stmdit.data.synthetic)."""

from __future__ import annotations

import re

import numpy as np
import pytest
from scipy.stats import spearmanr

from stmdit.data.synthetic import (
    CELL_TYPES,
    EOSIN,
    GENE_PANEL,
    HAEMATOXYLIN,
    MARKER_GENES,
    MELANIN,
    SimulatedTissue,
    render_tiles,
    simulate_counts,
    simulate_tissue,
)

TUMOUR, LYMPHOCYTE, STROMA, MELANOCYTIC, BACKGROUND = range(5)


@pytest.fixture(scope="module")
def tissue() -> SimulatedTissue:
    """The default dataset (4 sections of 24 x 24 spots), shared by the read-only tests."""
    return simulate_tissue(seed=0)


def stain_concentrations(tiles: np.ndarray) -> np.ndarray:
    """Per-pixel (H, E, melanin) concentrations by colour deconvolution with the module's stains."""
    optical_density = -np.log(np.maximum(tiles.astype(np.float64), 1.0) / 255.0)
    return optical_density @ np.linalg.inv(np.stack([HAEMATOXYLIN, EOSIN, MELANIN]))


def two_type_mixtures(first: int, second: int, fractions: np.ndarray, repeats: int) -> np.ndarray:
    comp = np.zeros((len(fractions) * repeats, len(CELL_TYPES)))
    comp[:, first] = np.repeat(fractions, repeats)
    comp[:, second] = 1.0 - comp[:, first]
    return comp


def pure_ish(rng: np.random.Generator, per_type: int) -> tuple[np.ndarray, np.ndarray]:
    """Compositions with one type at 0.85-0.95 and the rest spread at random over the others."""
    labels = np.repeat(np.arange(len(CELL_TYPES)), per_type)
    rest = rng.dirichlet(np.ones(len(CELL_TYPES) - 1), len(labels))
    main = rng.uniform(0.85, 0.95, len(labels))
    comp = np.zeros((len(labels), len(CELL_TYPES)))
    for i, k in enumerate(labels):
        comp[i, np.arange(len(CELL_TYPES)) != k] = rest[i] * (1.0 - main[i])
        comp[i, k] = main[i]
    return comp, labels


def colour_features(tiles: np.ndarray) -> np.ndarray:
    pixels = tiles.reshape(len(tiles), -1, 3).astype(np.float64)
    quantiles = np.quantile(pixels, [0.1, 0.5, 0.9], axis=1).transpose(1, 0, 2).reshape(len(tiles), -1)
    return np.concatenate([pixels.mean(axis=1), pixels.std(axis=1), quantiles], axis=1)


# --- constants -------------------------------------------------------------------------------


def test_constants() -> None:
    assert CELL_TYPES == ("tumour", "lymphocyte", "stroma", "melanocytic", "background")
    for vector in (HAEMATOXYLIN, EOSIN, MELANIN):
        assert vector.shape == (3,)
        assert np.isclose(np.linalg.norm(vector), 1.0)
        assert np.all(vector > 0)
    # The three stains must be separable by deconvolution.
    assert abs(np.linalg.det(np.stack([HAEMATOXYLIN, EOSIN, MELANIN]))) > 0.05
    assert 250 <= len(GENE_PANEL) <= 400
    assert len(set(GENE_PANEL)) == len(GENE_PANEL)
    assert all(re.fullmatch(r"[A-Z][A-Z0-9-]*", gene) for gene in GENE_PANEL)
    assert set(MARKER_GENES) == set(CELL_TYPES)
    markers = [gene for genes in MARKER_GENES.values() for gene in genes]
    assert len(set(markers)) == len(markers)
    assert set(markers) <= set(GENE_PANEL)
    assert {"MKI67", "PTPRC", "COL1A1", "PMEL", "HIF1A"} <= set(markers)
    assert {"ACTB", "GAPDH", "B2M"} <= set(GENE_PANEL)


# --- simulate_tissue -------------------------------------------------------------------------


def test_tissue_layout(tissue: SimulatedTissue) -> None:
    adata, tiles = tissue.adata, tissue.tiles
    n = 4 * 24 * 24
    assert adata.shape == (n, len(GENE_PANEL))
    assert list(adata.var_names) == GENE_PANEL
    assert tiles.shape == (n, 32, 32, 3) and tiles.dtype == np.uint8
    assert np.issubdtype(adata.X.dtype, np.integer)
    np.testing.assert_array_equal(adata.layers["counts"], adata.X)
    assert adata.obs["sample_id"].nunique() == 4
    obs = adata.obs
    expected = [
        f"{sample}_{row}x{col}"
        for sample, row, col in zip(obs["sample_id"], obs["array_row"], obs["array_col"], strict=True)
    ]
    assert list(adata.obs_names) == expected
    assert adata.obs_names.is_unique
    # Spot centres sit on the grid with a pitch of two tiles.
    pitch = adata.uns["simulator"]["spot_pitch_px"]
    assert pitch == 64
    np.testing.assert_allclose(obs["x_px"], (obs["array_col"] + 0.5) * pitch)
    np.testing.assert_allclose(obs["y_px"], (obs["array_row"] + 0.5) * pitch)
    assert obs["x_px"].dtype == np.float64
    assert adata.uns["cell_types"] == list(CELL_TYPES)
    assert adata.uns["simulator"]["seed"] == 0
    assert adata.uns["simulator"]["stains"].shape == (4, 3, 3)


def test_composition_covers_all_types(tissue: SimulatedTissue) -> None:
    comp = tissue.adata.obsm["composition"]
    assert comp.dtype == np.float32 and comp.shape == (len(tissue.adata), 5)
    assert np.all(comp >= 0)
    np.testing.assert_allclose(comp.sum(axis=1), 1.0, atol=1e-5)
    dominant_share = np.bincount(comp.argmax(axis=1), minlength=5) / len(comp)
    assert np.all(dominant_share > 0.08), dominant_share
    # Diverse: both nearly pure and well mixed spots are common.
    assert (comp.max(axis=1) > 0.85).mean() > 0.15
    assert (comp.max(axis=1) < 0.6).mean() > 0.15


def test_composition_is_spatially_smooth(tissue: SimulatedTissue) -> None:
    adata = tissue.adata
    rng = np.random.default_rng(0)
    for sample in adata.obs["sample_id"].unique():
        mask = (adata.obs["sample_id"] == sample).to_numpy()
        rows = adata.obs["array_row"].to_numpy()[mask]
        cols = adata.obs["array_col"].to_numpy()[mask]
        grid = np.zeros((rows.max() + 1, cols.max() + 1, 5))
        grid[rows, cols] = adata.obsm["composition"][mask]
        neighbours = np.corrcoef(grid[:, :-1].ravel(), grid[:, 1:].ravel())[0, 1]
        flat = grid.reshape(-1, 5)
        first, second = rng.integers(0, len(flat), (2, 2000))
        random_pairs = np.corrcoef(flat[first].ravel(), flat[second].ravel())[0, 1]
        assert neighbours > 0.6, (sample, neighbours)
        assert neighbours > random_pairs + 0.4, (sample, neighbours, random_pairs)


def test_markers_follow_composition(tissue: SimulatedTissue) -> None:
    counts = np.asarray(tissue.adata.X)
    comp = tissue.adata.obsm["composition"]
    assert counts.min() >= 0
    fraction = counts / counts.sum(axis=1, keepdims=True)
    for k, cell_type in enumerate(CELL_TYPES):
        columns = [GENE_PANEL.index(gene) for gene in MARKER_GENES[cell_type]]
        rho = spearmanr(fraction[:, columns].sum(axis=1), comp[:, k])[0]
        assert rho > 0.5, (cell_type, rho)
    # Background (glass, necrosis) yields fewer transcripts.
    totals = counts.sum(axis=1)
    background = comp[:, BACKGROUND] > 0.7
    tissue_rich = comp[:, BACKGROUND] < 0.1
    assert totals[background].mean() < 0.6 * totals[tissue_rich].mean()


def test_simulate_tissue_is_deterministic() -> None:
    first = simulate_tissue(n_sections=2, grid=6, seed=5)
    again = simulate_tissue(n_sections=2, grid=6, seed=5)
    other = simulate_tissue(n_sections=2, grid=6, seed=6)
    np.testing.assert_array_equal(first.tiles, again.tiles)
    np.testing.assert_array_equal(first.adata.X, again.adata.X)
    np.testing.assert_array_equal(first.adata.obsm["composition"], again.adata.obsm["composition"])
    assert list(first.adata.obs_names) == list(again.adata.obs_names)
    assert not np.array_equal(first.tiles, other.tiles)
    assert not np.array_equal(first.adata.X, other.adata.X)
    assert not np.array_equal(first.adata.obsm["composition"], other.adata.obsm["composition"])


# --- simulate_counts -------------------------------------------------------------------------


def test_simulate_counts() -> None:
    comp = np.random.default_rng(0).dirichlet(np.ones(5), 50)
    counts = simulate_counts(comp, seed=1)
    assert counts.shape == (50, len(GENE_PANEL))
    assert np.issubdtype(counts.dtype, np.integer) and counts.min() >= 0
    np.testing.assert_array_equal(counts, simulate_counts(comp, seed=1))
    assert not np.array_equal(counts, simulate_counts(comp, seed=2))
    # Library size scales the totals.
    assert simulate_counts(comp, seed=1, library_size=300.0).sum() < 0.2 * counts.sum()


# --- render_tiles ----------------------------------------------------------------------------


def test_render_is_deterministic_and_sized() -> None:
    comp = np.random.default_rng(0).dirichlet(np.ones(5), 6)
    tiles = render_tiles(comp, seed=3)
    assert tiles.shape == (6, 32, 32, 3) and tiles.dtype == np.uint8
    np.testing.assert_array_equal(tiles, render_tiles(comp, seed=3))
    assert not np.array_equal(tiles, render_tiles(comp, seed=4))
    for size in (16, 64, 128, 256):
        assert render_tiles(comp[:2], tile_size=size).shape == (2, size, size, 3)
    assert render_tiles(np.zeros((0, 5)), tile_size=32).shape == (0, 32, 32, 3)


def test_haematoxylin_increases_with_lymphocytes() -> None:
    fractions = np.linspace(0.0, 1.0, 5)
    for partner in (STROMA, TUMOUR, BACKGROUND):
        tiles = render_tiles(two_type_mixtures(LYMPHOCYTE, partner, fractions, 30), seed=partner)
        haematoxylin = stain_concentrations(tiles)[..., 0].reshape(len(fractions), -1).mean(axis=1)
        assert np.all(np.diff(haematoxylin) > 0), (partner, haematoxylin)


def test_melanin_increases_with_melanocytic_fraction() -> None:
    fractions = np.linspace(0.0, 1.0, 5)
    for partner in (TUMOUR, STROMA, LYMPHOCYTE):
        tiles = render_tiles(two_type_mixtures(MELANOCYTIC, partner, fractions, 30), seed=partner)
        pixels = tiles.reshape(len(fractions), -1, 3).astype(np.float64)
        melanin = stain_concentrations(tiles)[..., 2].reshape(len(fractions), -1).mean(axis=1)
        # Brown: red clearly above blue.
        brown = ((pixels[..., 0] - pixels[..., 2]) > 25).mean(axis=1)
        assert np.all(np.diff(melanin) > 0), (partner, melanin)
        assert np.all(np.diff(brown) > 0), (partner, brown)


def test_background_is_bright_and_lymphocytes_dark() -> None:
    eye = np.eye(5)
    background = render_tiles(np.repeat(eye[[BACKGROUND]], 20, axis=0), seed=1)
    lymphocytes = render_tiles(np.repeat(eye[[LYMPHOCYTE]], 20, axis=0), seed=1)
    assert background.mean() > 230
    assert background.mean() - lymphocytes.mean() > 60


def test_dominant_type_is_recognisable_at_32px() -> None:
    """A nearest-centroid classifier on colour statistics recognises the dominant type."""
    train_comp, train_labels = pure_ish(np.random.default_rng(0), 40)
    test_comp, test_labels = pure_ish(np.random.default_rng(1), 40)
    train = colour_features(render_tiles(train_comp, seed=10))
    test = colour_features(render_tiles(test_comp, seed=11))
    mean, std = train.mean(axis=0), train.std(axis=0)
    train, test = (train - mean) / std, (test - mean) / std
    centroids = np.stack([train[train_labels == k].mean(axis=0) for k in range(5)])
    predicted = np.argmin(((test[:, None, :] - centroids[None]) ** 2).sum(axis=2), axis=1)
    assert (predicted == test_labels).mean() > 0.9


def test_section_stain_changes_colour() -> None:
    comp = np.repeat(np.eye(5)[[LYMPHOCYTE]], 10, axis=0)
    stain = np.stack([HAEMATOXYLIN, EOSIN, MELANIN])
    weak = render_tiles(comp, seed=2, section_stain=stain * 0.7)
    strong = render_tiles(comp, seed=2, section_stain=stain * 1.3)
    per_tile = np.broadcast_to(stain * 1.3, (10, 3, 3))
    assert weak.mean() > strong.mean() + 10
    np.testing.assert_array_equal(strong, render_tiles(comp, seed=2, section_stain=per_tile))


# --- validation ------------------------------------------------------------------------------

GOOD = np.full((3, 5), 0.2)


@pytest.mark.parametrize(
    ("call", "argument"),
    [
        (lambda: render_tiles(np.full((3, 4), 0.25)), "composition"),
        (lambda: render_tiles(np.full(5, 0.2)), "composition"),
        (lambda: render_tiles(np.array([[1.2, -0.2, 0, 0, 0]])), "composition"),
        (lambda: render_tiles(np.full((2, 5), 0.3)), "composition"),
        (lambda: render_tiles(np.array([[np.nan, 1, 0, 0, 0]])), "composition"),
        (lambda: render_tiles(GOOD, tile_size=8), "tile_size"),
        (lambda: render_tiles(GOOD, tile_size=32.0), "tile_size"),
        (lambda: render_tiles(GOOD, seed=-1), "seed"),
        (lambda: render_tiles(GOOD, section_stain=np.ones((2, 3))), "section_stain"),
        (lambda: render_tiles(GOOD, section_stain=-np.ones((3, 3))), "section_stain"),
        (lambda: simulate_counts(np.full((2, 5), 0.1)), "composition"),
        (lambda: simulate_counts(GOOD, library_size=0.0), "library_size"),
        (lambda: simulate_counts(GOOD, seed=1.5), "seed"),
        (lambda: simulate_tissue(n_sections=0), "n_sections"),
        (lambda: simulate_tissue(grid=0), "grid"),
        (lambda: simulate_tissue(tile_size=15), "tile_size"),
        (lambda: simulate_tissue(library_size=-5.0), "library_size"),
    ],
)
def test_bad_input_names_the_argument(call, argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        call()
