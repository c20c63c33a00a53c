"""End to end on the her2st sections with tiny models on the CPU: train the expression
predictor, train a no-GE and a GE model, evaluate both, and check the report."""

import json
import re
import shutil
from html.parser import HTMLParser

import pytest
import yaml
from typer.testing import CliRunner

from stmdit.cli import app
from stmdit.evaluate.run import EvaluateConfig

runner = CliRunner()


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.sources.append(dict(attrs)["src"])


def _invoke(args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.slow
def test_predictor_training_evaluation_and_report_end_to_end(
    her2st_store, random_inception_weights, tmp_path
):
    store = tmp_path / "her2st"
    shutil.copytree(her2st_store.root, store)
    _invoke(["encode", store, "--n-genes", "32"])
    _invoke(["train-predictor", store, "--out", tmp_path / "predictor", "--n-genes", "256", "--epochs", "20"])
    for name, injection in (("no_ge", "none"), ("xattn", "xattn")):
        cfg = {"output_dir": str(tmp_path / name), "max_steps": 4, "batch_size": 8,
               "data": {"source": "store", "path": str(store)},
               "model": {"preset": "tiny", "patch_size": 4, "ge_injection": injection}}  # fmt: skip
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
        _invoke(["train", tmp_path / f"{name}.yaml"])

    eval_cfg = {"out": str(tmp_path / "report"), "dataset": str(store), "split": "test",
                "models": {"no_ge": str(tmp_path / "no_ge" / "pipeline"), "xattn": str(tmp_path / "xattn" / "pipeline")},
                "predictor": str(tmp_path / "predictor"), "max_spots_per_sample": 24, "seeds": [0, 1], "steps": 3,
                "sweep_guidance_ge": [4.0], "kid_subsets": 5, "n_bootstrap": 50, "batch_size": 24}  # fmt: skip
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(eval_cfg))
    output = _invoke(["evaluate", tmp_path / "eval.yaml", "--inception-weights", random_inception_weights])
    assert "report:" in output and "warning:" in output  # 24 tiles are far too few for a stable FID

    report = tmp_path / "report"
    metrics = json.loads((report / "metrics.json").read_text())
    assert set(metrics["models"]) == {"no_ge", "xattn"}
    assert set(metrics["models"]["no_ge"]["settings"]) == {"none"}
    assert set(metrics["models"]["xattn"]["settings"]) == {"ge", "null", "shuffled", "ge@4"}
    ge = metrics["models"]["xattn"]["settings"]["ge"]["summary"]
    assert len(ge["fid"]["per_seed"]) == 2 and ge["fid"]["mean"] > 0 and 0 <= ge["fd_morph"]["mean"]
    assert -1 <= ge["fidelity_auc"]["mean"] <= 1 and "fidelity_ratio_to_ceiling" in ge
    assert set(metrics["models"]["xattn"]["ge_ablation"]) == {"null", "shuffled"}
    assert {"fid", "fidelity_auc"} <= set(metrics["models"]["xattn"]["ge_ablation"]["null"])
    assert metrics["ceiling"]["auc"] > 0  # the predictor reads real C4 tiles better than chance
    ratio = ge["fidelity_auc"]["mean"] / metrics["ceiling"]["auc"]
    assert ge["fidelity_ratio_to_ceiling"] == pytest.approx(ratio)
    assert any("2048" in w or "images" in w for w in metrics["warnings"])
    seed0 = metrics["models"]["xattn"]["settings"]["ge"]["details"]["seed0"]
    assert seed0["image_metrics"]["overall"]["fid"]["protocol"]["n_real"] == metrics["n_spots"] == 24

    html = (report / "report.html").read_text()
    parser = _Images()
    parser.feed(html)
    expected = {
        "samples_grid.png",
        "fidelity_curves.png",
        "gene_scatter.png",
        "ge_ablation.png",
        "guidance_sweep.png",
    }
    assert set(parser.sources) == expected
    for src in parser.sources:
        assert (report / src).stat().st_size > 1000, src
    assert "Protocol" in html and "Read these numbers with care" in html
    assert re.search(r"real tiles \(ceiling\)</td>", html)

    # Generated tiles are cached: a rerun of the same setting reuses them and gives the same numbers.
    cached = report / "generated" / "no_ge" / "none" / "seed0.npy"
    stamp = cached.stat().st_mtime_ns
    (tmp_path / "again.yaml").write_text(yaml.safe_dump({**eval_cfg, "models": {"no_ge": eval_cfg["models"]["no_ge"]},
                                                         "seeds": [0], "sweep_guidance_ge": []}))  # fmt: skip
    _invoke(["evaluate", tmp_path / "again.yaml", "--inception-weights", random_inception_weights])
    assert cached.stat().st_mtime_ns == stamp
    rerun = json.loads((report / "metrics.json").read_text())["models"]["no_ge"]["settings"]["none"][
        "summary"
    ]
    first = metrics["models"]["no_ge"]["settings"]["none"]["summary"]
    assert rerun["fid"]["per_seed"][0] == first["fid"]["per_seed"][0]


def test_evaluate_config_errors(tmp_path):
    with pytest.raises(ValueError, match="models"):
        EvaluateConfig(out=str(tmp_path), dataset=str(tmp_path))
    with pytest.raises(ValueError, match="inputs"):
        EvaluateConfig(out=str(tmp_path), dataset=str(tmp_path), models={"a": "b"}, inputs="text")
    with pytest.raises(ValueError, match="ablations"):
        EvaluateConfig(out=str(tmp_path), dataset=str(tmp_path), models={"a": "b"}, ablations=["zero"])
    (tmp_path / "e.yaml").write_text("out: o\ndataset: d\nmodels: {a: b}\nmodles: {}\n")
    result = runner.invoke(app, ["evaluate", str(tmp_path / "e.yaml")])
    assert result.exit_code == 1 and "line 4: modles: unknown key (did you mean 'models'?)" in result.output
