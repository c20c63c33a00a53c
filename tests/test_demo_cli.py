import json

import anndata as ad
import numpy as np
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from stmdit.cli import app

runner = CliRunner()


def test_quick_demo_writes_every_promised_file(tmp_path):
    result = runner.invoke(app, ["demo", "--quick", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    for name in ("samples_grid.png", "loss_curves.png", "composition_scatter.png", "metrics.json"):
        assert (tmp_path / name).stat().st_size > 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for setting in ("real_tiles", "ge_only", "morph_ge", "morph_only", "unconditional"):
        assert set(metrics[setting]) >= {"composition_corr", "composition_mae", "fidelity_auc"}
        assert -1 <= metrics[setting]["composition_corr"] <= 1
    assert "protocol" in metrics and metrics["protocol"]["eval_spots"].startswith("16:")
    assert metrics["tile_size"] == metrics["settings"]["tile_size"]
    assert metrics["protocol"]["sampler"].startswith("DDIMScheduler ")  # what sampled (pixel space)
    assert metrics["precision"] in ("fp32", "bf16")
    for setting in ("real_tiles", "ge_only", "unconditional"):
        assert 0 <= metrics[setting]["saturated_fraction"] <= 1
    for run in ("ge", "no_ge"):
        assert (tmp_path / "runs" / run / "pipeline" / "model_index.json").exists()
        assert list((tmp_path / "runs" / run / "checkpoints").iterdir())
    assert "ge_only" in result.output
    with Image.open(tmp_path / "samples_grid.png") as grid:
        assert grid.size[0] > 400

    # --train-seed retrains and redraws on the same data with the same judges.
    other = tmp_path / "train_seed_1"
    result = runner.invoke(app, ["demo", "--quick", "--out", str(other), "--train-seed", "1"])
    assert result.exit_code == 0, result.output
    again = json.loads((other / "metrics.json").read_text())
    assert again["real_tiles"] == metrics["real_tiles"]
    assert again["settings"]["train_seed"] == 1 and again["protocol"]["noise_seed"] == 2
    assert metrics["settings"]["train_seed"] is None and metrics["protocol"]["noise_seed"] == 1
    assert again["ge_only"]["composition_mae"] != metrics["ge_only"]["composition_mae"]


def test_saturated_fraction_counts_pixels_with_any_channel_at_the_gamut_edge():
    from stmdit.demo import saturated_fraction

    tiles = np.full((2, 2, 2, 3), 128, dtype=np.uint8)
    tiles[0, 0, 0, 1] = 0  # one channel at 0
    tiles[1, 1, 1] = 255  # all channels at 255: still one pixel
    assert saturated_fraction(tiles) == 2 / 8
    as_float = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255
    assert saturated_fraction(as_float) == 2 / 8


def test_precision_option_rejects_unknown_names_readably(tmp_path):
    result = runner.invoke(app, ["demo", "--quick", "--out", str(tmp_path), "--precision", "fp16"])
    assert (
        result.exit_code != 0 and "--precision must be one of auto, fp32, bf16; got 'fp16'" in result.output
    )
    assert not (tmp_path / "metrics.json").exists()


def test_train_then_generate_from_the_command_line(tmp_path):
    cfg = {"output_dir": str(tmp_path / "run"), "max_steps": 3, "batch_size": 8, "checkpoint_every": 3,
           "data": {"source": "synthetic", "n_sections": 2, "grid": 4, "tile_size": 16, "n_genes": 12},
           "model": {"preset": "tiny", "patch_size": 4}}  # fmt: skip
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = runner.invoke(app, ["train", str(path)])
    assert result.exit_code == 0, result.output
    assert "pipeline saved" in result.output

    # Expression in, tiles and AnnData out; gene order in the file does not matter.
    from stmdit.data.synthetic import simulate_tissue

    adata = simulate_tissue(n_sections=1, grid=2, tile_size=16, seed=5).adata
    adata = adata[:, ::-1].copy()
    h5ad = tmp_path / "spots.h5ad"
    adata.write_h5ad(h5ad)
    out = tmp_path / "generated"
    result = runner.invoke(app, ["generate", str(tmp_path / "run" / "pipeline"), "--expression", str(h5ad),
                                 "--out", str(out), "--steps", "2", "--images-per-spot", "2", "--batch-size", "3"])  # fmt: skip
    assert result.exit_code == 0, result.output
    generated = ad.read_h5ad(out / "generated.h5ad")
    assert generated.n_obs == 2 * adata.n_obs
    assert set(generated.obs["spot"]) == set(adata.obs_names)
    tile = np.asarray(Image.open(out / generated.obs["tile_path"].iloc[0]))
    assert tile.shape == (16, 16, 3)
    assert generated.uns["stmdit_generate"]["steps"] == 2

    # Same seed, smaller batch: identical tiles (per-spot noise).
    again = tmp_path / "again"
    runner.invoke(app, ["generate", str(tmp_path / "run" / "pipeline"), "--expression", str(h5ad), "--out", str(again),
                        "--steps", "2", "--images-per-spot", "2", "--batch-size", "1"])  # fmt: skip
    for rel in generated.obs["tile_path"]:
        a = np.asarray(Image.open(out / rel), dtype=int)
        b = np.asarray(Image.open(again / rel), dtype=int)
        assert np.abs(a - b).max() <= 1


def test_command_line_errors_are_readable(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    for command in ("train", "prepare", "evaluate", "pseudolabel", "simulate"):
        result = runner.invoke(app, [command, "missing.yaml"])
        assert result.exit_code == 2 and "file 'missing.yaml' does not exist" in result.output, command
        result = runner.invoke(app, [command, "configs"])  # a folder where a file belongs
        assert result.exit_code == 2 and "'configs' is a directory" in result.output, command
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rat: 1\n")
    result = runner.invoke(app, ["train", str(bad)])
    assert (
        result.exit_code == 1 and "learning_rat: unknown key (did you mean 'learning_rate'?)" in result.output
    )
    result = runner.invoke(app, ["generate", str(tmp_path), "--expression", str(tmp_path / "none.h5ad")])
    assert result.exit_code == 1 and "none.h5ad does not exist" in result.output
