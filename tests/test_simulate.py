"""Virtual tissue experiments: perturbation arithmetic, paired noise, measurements, tile editing,
and on the tissue simulator the headline check: raising the lymphocyte programme makes the
generated tissue more lymphocytic, beyond the seed-to-seed spread of the control."""

import json
import warnings
from types import SimpleNamespace

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from pydantic import ValidationError
from typer.testing import CliRunner

from stmdit import (
    PanelExpressionEncoder,
    StainFeatureEncoder,
    STMDiT,
    STMDiTPipeline,
    make_sampling_scheduler,
)
from stmdit.cli import app
from stmdit.data.sources import prepare_synthetic
from stmdit.data.synthetic import CELL_TYPES
from stmdit.evaluate.composition import fit_composition_estimator
from stmdit.experiments.simulate import (
    Perturbation,
    SimulateConfig,
    interpolate,
    measure,
    paired_generate,
    perturb,
    read_back,
    readback_geometry,
    render_report,
    run_simulation,
    start_state,
    summary_lines,
    tile_statistics,
)
from stmdit.experiments.statistics import adjust_changes, describe_replicates, paired_change, replicate_change
from stmdit.genesets import MARKER_GENES
from stmdit.predictor import SpotSet, context_features, load_predictor, neighbour_index
from stmdit.predictor.readback import read_expression
from stmdit.predictor.train import train_predictor_command
from stmdit.train import TrainConfig, Trainer

LYMPHOCYTE = CELL_TYPES.index("lymphocyte")


def small_adata():
    x = np.array([[1.0, 0.0, 4.0], [3.0, 2.0, 0.0], [5.0, 4.0, 2.0]])
    obs = pd.DataFrame({"sample_id": ["s1", "s1", "s2"], "cluster": ["a", "b", "a"]}, index=["p", "q", "r"])
    adata = ad.AnnData(x, obs=obs, var=pd.DataFrame(index=["CD3E", "PTPRC", "COL1A1"]))
    adata.layers["counts"] = adata.X.copy()
    return adata


def test_start_states_and_perturbation_arithmetic():
    adata = small_adata()
    np.testing.assert_array_equal(start_state(adata, spot="q").X, [[3, 2, 0]])
    np.testing.assert_array_equal(start_state(adata, cluster=("cluster", "a")).X, [[3, 2, 3]])
    np.testing.assert_array_equal(start_state(adata, sample="s1").X, [[2, 1, 2]])
    base = start_state(adata, spot="r")
    up = perturb(base, [Perturbation(genes=["cd3e"], value=4)])  # case-insensitive gene names
    np.testing.assert_array_equal(up.X, [[20, 4, 2]])
    np.testing.assert_array_equal(base.X, [[5, 4, 2]])  # the start state is not modified
    ko = perturb(
        base, [Perturbation(gene_set="immune", mode="knockout")], gene_sets={"immune": ["CD3E", "PTPRC"]}
    )
    np.testing.assert_array_equal(ko.X, [[0, 0, 2]])
    q = perturb(base, [Perturbation(genes=["COL1A1"], mode="quantile", value=0.5)], reference=adata)
    np.testing.assert_array_equal(q.X, [[5, 4, 2]])  # the median of 4, 0, 2
    path = interpolate(start_state(adata, spot="p"), base, [0.0, 0.5, 1.0])
    np.testing.assert_allclose(path.X, [[1, 0, 4], [3, 2, 3], [5, 4, 2]])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"genes": ["CD3E"], "mode": "double"}, "mode must be one of"),
        ({"mode": "knockout"}, "needs genes or a gene_set"),
        ({"genes": ["CD3E"], "value": -1}, "fold change must be"),
        ({"genes": ["CD3E"], "mode": "quantile", "value": 1.5}, "quantile must be in"),
    ],
)
def test_perturbations_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Perturbation(**kwargs)


def test_bad_start_states_and_genes_say_what_is_wrong():
    adata = small_adata()
    with pytest.raises(ValueError, match="exactly one of"):
        start_state(adata)
    with pytest.raises(KeyError, match="spot 'z' is not in the data"):
        start_state(adata, spot="z")
    with pytest.raises(ValueError, match="none of the genes"):
        perturb(start_state(adata, spot="p"), [Perturbation(genes=["MKI67"])])
    with pytest.raises(KeyError, match="unknown gene set 'tcells'"):
        perturb(start_state(adata, spot="p"), [Perturbation(gene_set="tcells")])


def test_tile_statistics_by_hand():
    white = np.ones((1, 32, 32, 3), np.float32)
    dots = white.copy()
    for cy, cx in ((8, 8), (8, 24), (24, 16)):
        dots[0, cy - 2 : cy + 3, cx - 2 : cx + 3] = [0.3, 0.2, 0.5]  # three purple nuclei
    stats = tile_statistics(np.concatenate([white, dots]))
    assert stats["haematoxylin"][0] == pytest.approx(0.0, abs=1e-6) and stats["haematoxylin"][1] > 0.05
    assert stats["nuclei_per_100px2"].tolist() == pytest.approx([0, 3 / (32 * 32 / 1e4)])
    # With the pixel size known (0.5 um per pixel: the tile is 16 um wide), per 100 x 100 um.
    scaled = tile_statistics(np.concatenate([white, dots]), um_per_px=0.5)
    assert "nuclei_per_100px2" not in scaled
    assert scaled["nuclei_per_100um2"][1] == pytest.approx(3 / (16 * 16 / 1e4))
    # Too small a tile, or too coarse pixels: no count at all rather than noise.
    assert "nuclei_per_100px2" not in tile_statistics(dots[:, :16, :16])
    assert set(tile_statistics(dots, um_per_px=4.0)) == {"haematoxylin", "eosin", "brown"}


def report_result(changes: dict, n_seeds: int = 3) -> dict:
    """What measure and run_simulation give render_report, for the changes given."""
    return {
        "start_state": "spot <b>7</b>",
        "config": {"seeds": list(range(n_seeds)), "guidance_ge": 2.0, "guidance_morph": 1.5, "steps": 5},
        "replicates": describe_replicates("seeds", 1, n_seeds),
        "changes": changes,
        "multiplicity": adjust_changes([c for change in changes.values() for c in change.values()], 0.05),
        "nuclei": "tiles of 16 px are too small for a count of nuclei",
    }


def test_report_is_rendered_from_its_template_and_escaped():
    control = np.array([[1.0, 1.1, 0.9]])
    changes = {
        "CD3E x4": {
            "eosin": replicate_change(control + [[0.5, 0.6, 0.55]], control, "seeds"),
            "haematoxylin": replicate_change(control + [[0.5, -0.4, 0.1]], control, "seeds"),
        }
    }
    page = render_report(report_result(changes))
    assert "spot &lt;b&gt;7&lt;/b&gt;" in page and "<b>7" not in page
    assert "3 seeds" in page and "5 steps" in page
    assert "over 3 seeds: the model&#39;s change for this exact expression" in page
    rows = page.split("<tr>")[2:]
    eosin = changes["CD3E x4"]["eosin"]
    assert len(rows) == 2 and "Eosin density" in rows[0] and "+0.550" in rows[0]
    assert f"[{eosin['ci_low']:+.3f}, {eosin['ci_high']:+.3f}]" in rows[0]
    # Survives Holm over the 2 tests, beyond the control's seed sd of 0.1; the other neither.
    assert (
        eosin["survives_holm"]
        and "<td>yes</td>" in rows[0]
        and rows[0].rstrip().endswith("<td>yes</td></tr>")
    )
    assert rows[1].count("<td>no</td>") == 2 and "survives Holm" in page and "t interval" in page
    assert "were not counted: tiles of 16 px" in page


def test_report_with_one_seed_says_there_is_no_interval():
    control = np.array([[1.0]])
    changes = {"up": {"eosin": replicate_change(control + 0.5, control, "seeds")}}
    result = report_result(changes, n_seeds=1)
    assert result["multiplicity"]["n_tests"] == 0
    page = render_report(result)
    row = page.split("<tr>")[2]
    assert "+0.500" in row and "<td>no interval with one seed</td>" in row and row.count("n/a") == 4
    assert "give at least two seeds" in page
    assert summary_lines(result)[1] == "up: eosin +0.500 (no interval)"


@pytest.fixture(scope="module")
def simulator_model(tmp_path_factory):
    """A GE-conditioned STMDiT trained briefly on simulated tissue, with its data."""
    torch.manual_seed(0)
    data = prepare_synthetic(n_sections=4, grid=16, tile_size=16, n_genes=64, seed=1)
    cfg = TrainConfig(
        output_dir=str(tmp_path_factory.mktemp("sim") / "run"),
        model={"preset": "tiny", "hidden_size": 96, "depth": 3, "num_heads": 4, "patch_size": 2},
        max_steps=400,
        batch_size=64,
        learning_rate=1e-3,
        warmup_steps=30,
        ema_decay=0.99,
        p_drop_morphology=0.5,
        checkpoint_every=400,
        keep_checkpoints=1,
    )
    result = Trainer(
        cfg,
        data.train,
        ge_encoder=data.ge_encoder,
        morphology_encoder=data.morphology_encoder,
        resume=False,
        progress=False,
    ).run()
    from stmdit.pipeline import STMDiTPipeline

    return STMDiTPipeline.from_pretrained(result.pipeline_dir), data, result.pipeline_dir


@pytest.mark.slow
def test_raising_the_lymphocyte_programme_makes_tiles_more_lymphocytic(simulator_model):
    pipe, data, _ = simulator_model
    composition = np.asarray(data.adata.obsm["composition"])
    estimator = fit_composition_estimator(
        data.tiles[data.train_index], composition[data.train_index], epochs=4, progress=False
    )
    held_out_sample = str(data.adata.obs["sample_id"].iloc[data.held_out_index[0]])
    control = start_state(data.adata, sample=held_out_sample)
    raised = perturb(control, [Perturbation(gene_set="lymphocyte", value=8)], gene_sets=MARKER_GENES)
    states = ad.concat([control, raised], keys=["control", "lymphocyte x8"], index_unique=":")
    seeds = range(8)
    tiles = paired_generate(pipe, states, seeds, guidance_ge=2.0, steps=20)
    assert tiles.shape == (2, 8, 16, 16, 3)
    estimated = estimator.predict(torch.from_numpy(tiles.reshape(-1, 16, 16, 3)).permute(0, 3, 1, 2).float())
    lymph = estimated.reshape(2, len(seeds), -1)[:, :, LYMPHOCYTE]
    change = replicate_change(lymph[1][None], lymph[0][None], "seeds")
    print(
        f"estimated lymphocyte fraction: control {lymph[0].mean():.3f} (seed sd {change['control_seed_sd']:.3f}), "
        f"raised {lymph[1].mean():.3f}; paired change {change['mean_change']:+.3f} "
        f"[{change['ci_low']:+.3f}, {change['ci_high']:+.3f}] over {len(seeds)} seeds"
    )
    assert change["ci_low"] > 0
    assert change["mean_change"] > 3 * change["control_seed_sd"]
    # The README's numbers (virtual tissue experiments), within a rounding and platform tolerance.
    readme = {
        "control_mean": 0.052,
        "mean_change": 0.032,
        "ci_low": 0.024,
        "ci_high": 0.040,
        "control_seed_sd": 0.008,
    }
    for key, value in readme.items():
        assert change[key] == pytest.approx(value, abs=0.002), key
    assert lymph[1].mean() == pytest.approx(0.083, abs=0.002)
    # Same seed, same expression: identical tiles (the pairing is exact).
    again = paired_generate(
        pipe, ad.concat([control, control], keys=["a", "b"], index_unique=":"), [3], guidance_ge=2.0, steps=20
    )
    np.testing.assert_array_equal(again[0], again[1])


@pytest.mark.slow
def test_editing_a_real_tile_keeps_its_layout(simulator_model):
    pipe, data, _ = simulator_model
    spot = int(data.held_out_index[5])
    tile = data.tiles[spot : spot + 1]
    state = start_state(data.adata, spot=str(data.adata.obs_names[spot]))
    original = tile[0].permute(1, 2, 0).numpy()

    def similarity(strength):
        edited = paired_generate(pipe, state, range(4), init_images=tile, strength=strength, steps=20)[0]
        return np.mean([np.corrcoef(original.ravel(), e.ravel())[0, 1] for e in edited])

    # With linear betas a strength of 0.3 already leaves little of a 16 px tile; 0.1 keeps it.
    light, full = similarity(0.1), similarity(1.0)
    assert light > 0.6 and light > full + 0.3


def test_simulate_command_writes_grids_measurements_and_a_report(simulator_model, tmp_path):
    _, data, pipeline_dir = simulator_model
    h5ad = tmp_path / "held_out.h5ad"
    data.adata[data.held_out_index].copy().write_h5ad(h5ad)
    cfg = {
        "pipeline": str(pipeline_dir),
        "data": str(h5ad),
        "out": str(tmp_path / "sim"),
        "sample": str(data.adata.obs["sample_id"].iloc[data.held_out_index[0]]),
        "variants": {
            "lymphocytes up": [{"gene_set": "lymphocyte markers", "value": 8}],  # a named programme
            "stroma off": [{"gene_set": "my stroma", "mode": "knockout"}],
        },  # the config's own set
        "gene_sets": {"my stroma": MARKER_GENES["stroma"]},
        "seeds": [0, 1, 2],
        "steps": 5,
        "interpolate_to": {"spot": str(data.adata.obs_names[data.held_out_index[0]])},
        "alphas": [0.5, 1.0],
    }
    (tmp_path / "sim.yaml").write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(app, ["simulate", str(tmp_path / "sim.yaml")])
    assert result.exit_code == 0, result.output
    assert "lymphocytes up: haematoxylin" in result.output
    for name in ("counterfactuals.png", "changes.png", "simulation.json", "report.html"):
        assert (tmp_path / "sim" / name).stat().st_size > 500
    import json

    report = json.loads((tmp_path / "sim" / "simulation.json").read_text())
    assert report["states"][0] == "control" and len(report["states"]) == 5  # control, 2 variants, 2 alphas
    assert report["changes"]["lymphocytes up"]["morphology_distance"]["mean"] > 0
    assert "too small" in report["nuclei"] and "nuclei_per_100px2" not in report["statistics"]  # 16 px tiles
    # 4 variants x 3 measures adjusted together; a sample's mean says what the seeds are over.
    assert report["multiplicity"]["method"] == "Holm" and report["multiplicity"]["n_tests"] == 12
    assert report["replicates"]["description"] == "over 3 seeds: the model's change for this exact expression"
    assert "replicates: spots" in report["replicates"]["region"]
    page = (tmp_path / "sim" / "report.html").read_text()
    assert page.count("<td>lymphocytes up</td>") == 3  # haematoxylin, eosin, brown
    assert "were not counted: tiles of 16 px" in page and "survives Holm" in page


def test_progress_shows_a_bar_over_the_sampling_only_when_asked(simulator_model, tmp_path, capfd):
    _, data, pipeline_dir = simulator_model
    h5ad = tmp_path / "held_out.h5ad"
    data.adata[data.held_out_index].copy().write_h5ad(h5ad)
    spot = str(data.adata.obs_names[data.held_out_index[0]])
    variants = {"up": [{"gene_set": "tumour markers", "value": 4}]}
    for progress in (False, True):
        cfg = SimulateConfig(
            pipeline=str(pipeline_dir),
            data=str(h5ad),
            out=str(tmp_path / str(progress)),
            spot=spot,
            variants=variants,
            seeds=[0, 1],
            steps=3,
        )
        capfd.readouterr()
        result = run_simulation(cfg, progress=progress)
        shown = capfd.readouterr().err
        assert ("sampling" in shown and "3/3" in shown) == progress, shown
        assert list(result["changes"]) == ["up"]


def test_a_start_spot_cannot_replicate_over_spots():
    with pytest.raises(ValidationError, match="replicates: spots draws spots of a cluster or a sample"):
        SimulateConfig(pipeline="p", data="d.h5ad", out="o", spot="s1", replicates="spots")


# -- reading expression back, and spots as replicates, on real her2st tiles ----------------------


@pytest.fixture(scope="module")
def her2st_predictor(her2st_store, tmp_path_factory):
    """A small expression predictor trained on the her2st store (100 µm spots, 128 µm tiles)."""
    out = tmp_path_factory.mktemp("predictor") / "predictor"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # 20 genes: not DeepSpot's protocol, said so
        train_predictor_command(her2st_store.root, out, n_genes=20, epochs=2, progress=False)
    return out


@pytest.fixture(scope="module")
def her2st_pipeline(her2st_store, tmp_path_factory):
    """A tiny untrained pixel-space pipeline on the store's genes and 32 px tiles, with random
    weights (a zero-initialised DiT would ignore its condition)."""
    ge = PanelExpressionEncoder.fit(her2st_store.spots(), n_genes=32)
    morphology = StainFeatureEncoder(image_size=32)
    model = STMDiT.from_preset(
        "tiny", in_channels=3, sample_size=32, patch_size=8, morph_dim=morphology.output_dim, ge_dim=32
    )
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    path = tmp_path_factory.mktemp("pipeline") / "pipeline"
    STMDiTPipeline(model, make_sampling_scheduler(pixel_space=True), ge, morphology, None).save_pretrained(
        path
    )
    return path, ge.genes


def test_real_tiles_read_through_simulate_as_through_evaluate(her2st_store, her2st_predictor):
    predictor, encoder = load_predictor(her2st_predictor)
    spots = SpotSet.from_store(her2st_store, split=None, samples=["C4"])
    rows = np.arange(12)
    tiles, obs = np.asarray(spots.tiles[rows]), spots.adata.obs.iloc[rows]
    diameters = np.asarray(spots.spot_diameter_um)[rows]
    geometry = readback_geometry(predictor, spots.adata, rows, spots.tile_um)
    assert (geometry["tile_um"], geometry["spot_diameter_um"]) == (128.0, 100.0)  # not the 128 µm tile
    simulated = read_back(
        tiles / 255.0, predictor, encoder, geometry["tile_um"], geometry["spot_diameter_um"]
    )

    # Evaluate's path (read_expression with the store's obs), given the same (no) neighbours.
    alone = np.full((len(rows), 0), -1)
    evaluated = read_expression(tiles, obs, spots.tile_um, diameters, predictor, encoder, neighbours=alone)
    np.testing.assert_allclose(simulated, evaluated, rtol=1e-5, atol=1e-6)
    # A spot read alone in evaluate's path has no neighbours either.
    single = read_expression(tiles[:1], obs.iloc[:1], spots.tile_um, diameters[:1], predictor, encoder)
    np.testing.assert_allclose(simulated[:1], single, rtol=1e-5, atol=1e-6)
    # The store's spots have neighbours and the predictor reads them: simulate reads none, and says so.
    pooled = read_expression(tiles, obs, spots.tile_um, diameters, predictor, encoder)
    assert np.abs(pooled - evaluated).max() > 1e-3
    assert geometry["neighbours"].startswith("read without neighbours")

    # The old read: tiles in a row 1e6 px apart, so tile k pooled tiles k - 1 and k + 1 (other
    # seeds, or the other state at a boundary), and the whole tile read as a 128 µm spot.
    old_obs = pd.DataFrame({"sample_id": "virtual", "x_px": np.arange(len(rows)) * 1e6, "y_px": 0.0})
    assert set(neighbour_index(old_obs)[5]) == {4, 6}
    old = predictor.predict_features(context_features(tiles, old_obs, 128.0, 128.0, encoder, progress=False))
    assert np.abs(old - evaluated).max() > 0.05

    # measure reads the tiles of an experiment that way: 2 states x 1 spot x 3 seeds.
    result = measure(
        (tiles[:6] / 255.0).reshape(2, 1, 3, 32, 32, 3),
        ["control", "variant"],
        predictor=predictor,
        predictor_encoder=encoder,
        tile_um=128.0,
        spot_diameter_um=100.0,
    )
    expected = (simulated[3:6] - simulated[:3]).mean(axis=0)
    shift = result["changes"]["variant"]["predicted_expression_shift"]
    assert len(shift) == 10
    for gene, value in shift.items():
        assert value == pytest.approx(expected[predictor.genes.index(gene)], abs=1e-5)


def test_the_spot_diameter_comes_from_the_provenance_else_the_data():
    adata = small_adata()
    adata.uns["stmdit"] = {"samples": {"s1": {"spot_diameter_um": 55.0}, "s2": {"spot_diameter_um": 100.0}}}

    def trained_on(*diameters):
        return SimpleNamespace(config=SimpleNamespace(provenance={"spot_diameter_um": list(diameters)}))

    assert readback_geometry(trained_on(100.0), adata, np.array([0]), 128.0)["spot_diameter_um"] == 100.0
    several = readback_geometry(trained_on(55.0, 100.0), adata, np.array([0, 1]), 128.0)
    assert several["spot_diameter_um"] == 55.0 and "start state" in several["spot_diameter_from"]
    with pytest.raises(ValueError, match=r"spot diameters \[55.0, 100.0\].*\[55.0, 100.0\].*one diameter"):
        readback_geometry(trained_on(55.0, 100.0), adata, np.array([0, 2]), 128.0)
    with pytest.raises(ValueError, match="give as data a prepared dataset"):
        readback_geometry(trained_on(100.0), adata, np.array([0]), None)
    with pytest.raises(ValueError, match="larger than the generated tile"):
        readback_geometry(trained_on(100.0), adata, np.array([0]), 64.0)


def test_noise_streams_give_groups_of_states_noise_of_their_own(her2st_store, her2st_pipeline):
    pipe = STMDiTPipeline.from_pretrained(her2st_pipeline[0])
    spot = start_state(her2st_store.spots(), spot=str(her2st_store.spots().obs_names[0]))
    twice = ad.concat([spot, spot], keys=["a", "b"], index_unique=":")
    shared = paired_generate(pipe, twice, [0, 1], steps=2)
    np.testing.assert_array_equal(shared[0], shared[1])
    streams = paired_generate(pipe, twice, [0, 1], steps=2, noise_streams=[0, 1])
    np.testing.assert_array_equal(streams[0], shared[0])  # stream 0 is the default noise
    assert np.abs(streams[1] - streams[0]).mean() > 0.01
    with pytest.raises(ValueError, match="one integer per state"):
        paired_generate(pipe, twice, [0], steps=2, noise_streams=[0])


def test_spots_as_replicates_give_the_regions_change_read_back_by_the_predictor(
    her2st_store, her2st_pipeline, her2st_predictor, tmp_path
):
    pipeline, genes = her2st_pipeline
    cfg = SimulateConfig(
        pipeline=str(pipeline),
        data=str(her2st_store.root),
        out=str(tmp_path / "sim"),
        sample="C4",
        variants={"up": [{"genes": genes[:8], "value": 8.0}], "same": [{"genes": genes[:1], "value": 1.0}]},
        replicates="spots",
        max_spots=3,
        seeds=[0, 1],
        steps=2,
        predictor=str(her2st_predictor),
    )
    result = run_simulation(cfg, progress=False)
    replicates = result["replicates"]
    assert replicates["unit"] == "spots" and replicates["n"] == 3 and len(replicates["spots"]) == 3
    assert replicates["description"].startswith("over 3 spots x 2 seeds: the region's change")
    assert result["start_state"].startswith("sample C4: 3 of its")
    statistics = np.asarray(result["statistics"]["eosin"])
    assert statistics.shape == (3, 3, 2)  # states x spots x seeds
    # Every spot is its own control: an unchanged expression draws the same tiles (the same noise).
    assert result["changes"]["same"]["eosin"]["mean_change"] == 0.0
    # The interval is the t interval over the spots' mean changes over the seeds.
    per_spot = statistics.mean(axis=2)
    up = result["changes"]["up"]["eosin"]
    assert up["ci_low"] == pytest.approx(paired_change(per_spot[1], per_spot[0])["ci_low"])
    assert up["n"] == 3 and up["control_seed_sd"] == pytest.approx(
        np.sqrt(statistics[0].var(axis=1, ddof=1).mean())
    )
    assert (
        result["readback"]["spot_diameter_um"] == 100.0
        and len(result["changes"]["up"]["predicted_expression_shift"]) == 10
    )
    saved = json.loads((tmp_path / "sim" / "simulation.json").read_text())
    assert saved["replicates"]["spots"] == replicates["spots"] and saved["multiplicity"]["n_tests"] == 6
    page = " ".join((tmp_path / "sim" / "report.html").read_text().split())
    assert "the region&#39;s change" in page and "read without neighbours" in page
    assert "the spot crop of 100.0 µm (the diameter of the predictor&#39;s training spots" in page

    # An .h5ad has no tile width to read the tiles at: said before any sampling.
    h5ad = tmp_path / "c4.h5ad"
    her2st_store.spots().write_h5ad(h5ad)
    with pytest.raises(ValueError, match="give as data a prepared dataset"):
        run_simulation(cfg.model_copy(update={"data": str(h5ad), "pipeline": "not read"}), progress=False)
