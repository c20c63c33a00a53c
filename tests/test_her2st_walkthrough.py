"""The examples/her2st walkthrough at a smaller budget: its own configs, run through the CLI
from a scratch folder, must show the GE effect's direction against a shuffled control (the
GE model reads the held-out section C4's own expression better than another spot's)."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from stmdit.cli import app
from stmdit.evaluate.run import EvaluateConfig, evaluate

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "her2st"


def run(*args: str) -> None:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output


@pytest.mark.slow
def test_walkthrough_at_a_small_budget_shows_the_ge_effect_against_shuffled(tmp_path, test_data, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the configs name outputs/her2st/... relative to where they run
    (tmp_path / "outputs" / "her2st").mkdir(parents=True)
    (tmp_path / "outputs" / "her2st" / "data").symlink_to(test_data / "her2st")
    run("prepare", str(EXAMPLE / "prepare.yaml"))
    run("encode", "outputs/her2st/dataset", "--ge-encoder", "panel", "--morphology-encoder", "stain")
    run("train", str(EXAMPLE / "train_ge.yaml"), "--max-steps", "400")
    run("train-predictor", "outputs/her2st/dataset", "--out", "outputs/her2st/predictor", "--epochs", "30")

    cfg = EvaluateConfig.from_yaml(
        EXAMPLE / "eval.yaml",
        models={"ge": "outputs/her2st/runs/ge/pipeline"},
        seeds=[0],
        ablations=["shuffled"],
        sweep_guidance_ge=[],
        n_bootstrap=200,
    )
    results = evaluate(cfg, progress=False)
    settings = results["models"]["ge"]["settings"]
    own = settings["ge"]["summary"]["fidelity_auc"]
    shuffled = settings["shuffled"]["summary"]["fidelity_auc"]
    # The spot's own expression steers the tile towards it: a clear margin over another
    # spot's expression, with separated gene-bootstrap intervals.
    assert own["mean"] > shuffled["mean"] + 0.02, (own, shuffled)
    assert own["interval"][0] > shuffled["interval"][1], (own, shuffled)
    assert results["ceiling"]["auc"] > own["mean"]
