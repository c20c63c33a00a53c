"""Virtual tissue experiments: perturbation arithmetic, paired noise, measurements, tile editing,
and on the tissue simulator the headline check: raising the lymphocyte programme makes the
generated tissue more lymphocytic, beyond the seed-to-seed spread of the control."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from stmdit.cli import app
from stmdit.data.sources import prepare_synthetic
from stmdit.data.synthetic import CELL_TYPES
from stmdit.evaluate.composition import fit_composition_estimator
from stmdit.experiments.simulate import (
    Perturbation,
    SimulateConfig,
    interpolate,
    paired_change,
    paired_generate,
    perturb,
    render_report,
    run_simulation,
    start_state,
    tile_statistics,
)
from stmdit.genesets import MARKER_GENES
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


def test_paired_change_and_tile_statistics_by_hand():
    change = paired_change(np.array([3.0, 4.0, 5.0]), np.array([1.0, 2.0, 3.0]))
    assert change["mean_change"] == 2.0 and change["ci_low"] == change["ci_high"] == 2.0
    assert change["control_seed_sd"] == 1.0
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


def test_report_is_rendered_from_its_template_and_escaped():
    change = {"mean_change": 0.5, "ci_low": 0.2, "ci_high": 0.8, "control_seed_sd": 0.1, "control_mean": 1.0}
    result = {
        "start_state": "spot <b>7</b>",
        "config": {"seeds": [0, 1, 2], "guidance_ge": 2.0, "guidance_morph": 1.5, "steps": 5},
        "changes": {"CD3E x4": {"eosin": change, "haematoxylin": {**change, "ci_low": -0.05}}},
        "nuclei": "tiles of 16 px are too small for a count of nuclei",
    }
    page = render_report(result)
    assert "spot &lt;b&gt;7&lt;/b&gt;" in page and "<b>7" not in page
    assert "3 seeds" in page and "5 steps" in page
    rows = page.split("<tr>")[2:]
    assert (
        len(rows) == 2
        and "Eosin density" in rows[0]
        and "+0.500" in rows[0]
        and "[+0.200, +0.800]" in rows[0]
    )
    assert rows[0].rstrip().endswith("<td>yes</td></tr>") and "<td>no</td>" in rows[1]  # beyond 0.1 or not
    assert "were not counted: tiles of 16 px" in page


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
    change = paired_change(lymph[1], lymph[0])
    print(
        f"estimated lymphocyte fraction: control {lymph[0].mean():.3f} (seed sd {change['control_seed_sd']:.3f}), "
        f"raised {lymph[1].mean():.3f}; paired change {change['mean_change']:+.3f} "
        f"[{change['ci_low']:+.3f}, {change['ci_high']:+.3f}] over {len(seeds)} seeds"
    )
    assert change["ci_low"] > 0
    assert change["mean_change"] > 3 * change["control_seed_sd"]
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
    page = (tmp_path / "sim" / "report.html").read_text()
    assert page.count("<td>lymphocytes up</td>") == 3  # haematoxylin, eosin, brown
    assert "were not counted: tiles of 16 px" in page


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
