"""End to end on the her2st sections with tiny models on the CPU: train the expression
predictor, train a no-GE and a GE model, evaluate both, and check the report."""

import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from stmdit.cli import app
from stmdit.diffusion import make_sampling_scheduler
from stmdit.evaluate.run import EvaluateConfig, HeldOut, caveat_lines, evaluate, generate_setting

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
    her2st_store, random_inception_weights, tmp_path, monkeypatch
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
    cards = {name: (Path(folder) / "README.md").read_bytes() for name, folder in eval_cfg["models"].items()}
    output = _invoke(["evaluate", tmp_path / "eval.yaml", "--inception-weights", random_inception_weights])
    assert "report:" in output and "warning:" in output  # 24 tiles are far too few for a stable FID

    report = tmp_path / "report"
    # The model cards with their metrics go to the report; the pipelines' own cards are only read.
    for name, folder in eval_cfg["models"].items():
        assert (Path(folder) / "README.md").read_bytes() == cards[name]
        assert f"model card of {name}: {report / 'model_cards' / f'{name}.md'}" in output
    assert "| ge | " in (report / "model_cards" / "xattn.md").read_text()
    assert "| none | " in (report / "model_cards" / "no_ge.md").read_text()
    metrics = json.loads((report / "metrics.json").read_text())
    assert set(metrics["models"]) == {"no_ge", "xattn"}
    assert set(metrics["models"]["no_ge"]["settings"]) == {"none"}
    assert set(metrics["models"]["xattn"]["settings"]) == {"ge", "null", "shuffled", "ge@4"}
    ge = metrics["models"]["xattn"]["settings"]["ge"]["summary"]
    assert len(ge["fid"]["per_seed"]) == 2 and ge["fid"]["mean"] > 0 and 0 <= ge["fd_morph"]["mean"]
    assert -1 <= ge["fidelity_auc"]["mean"] <= 1 and "fidelity_ratio_to_ceiling" in ge
    low, high = ge["fidelity_auc"]["interval"]  # the gene bootstrap of the seed-mean AUC
    assert -1 <= low < high <= 1
    assert set(metrics["models"]["xattn"]["ge_ablation"]) == {"null", "shuffled"}
    assert {"fid", "fidelity_auc"} <= set(metrics["models"]["xattn"]["ge_ablation"]["null"])
    assert metrics["ceiling"]["auc"] > 0  # the predictor reads real C4 tiles better than chance
    ratio = ge["fidelity_auc"]["mean"] / metrics["ceiling"]["auc"]
    assert ge["fidelity_ratio_to_ceiling"] == pytest.approx(ratio)
    assert any("2048" in w or "images" in w for w in metrics["warnings"])
    # KID from 24 images: subsets of all of them (torch-fidelity's 1000 are too many), said once.
    few = "kid: KID from few images: subsets of 24 images instead of 1000"
    assert sum(w.startswith(few) for w in metrics["warnings"]) == 1
    # Models at the store's 32 px: one ceiling, the store's, and every ratio divides by it.
    assert set(metrics["ceilings"]) == {"32"} and metrics["models"]["xattn"]["ceiling"]["detail_px"] == 32
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
        "fidelity_vs_fd.png",
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
    # Asked to, it also writes the metrics into the pipeline's own card.
    output = _invoke(["evaluate", tmp_path / "again.yaml", "--inception-weights", random_inception_weights,
                      "--update-model-card"])  # fmt: skip
    assert cached.stat().st_mtime_ns == stamp
    own_card = Path(eval_cfg["models"]["no_ge"]) / "README.md"
    assert f"also written to {own_card}" in output and "| none | " in own_card.read_text()
    rerun = json.loads((report / "metrics.json").read_text())["models"]["no_ge"]["settings"]["none"][
        "summary"
    ]
    first = metrics["models"]["no_ge"]["settings"]["none"]["summary"]
    assert rerun["fid"]["per_seed"][0] == first["fid"]["per_seed"][0]
    # One line per kind of caveat: the rank-deficient FID of 24 tiles is one line whatever the
    # number of models, settings, seeds and samples, and names the samples it also concerns.
    rank_lines = [w for w in metrics["warnings"] if w.startswith("fid: FID from") and "rank-deficient" in w]
    assert len(rank_lines) == 1 and f"also for samples {metrics['samples'][0]}," in rank_lines[0]
    assert len(metrics["warnings"]) == len(set(metrics["warnings"])) < 8

    # Offline, without Inception weights: everything but FID/KID, which are marked skipped with
    # the reason and how to enable them, and no download is attempted.
    monkeypatch.delenv("STMDIT_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    monkeypatch.setattr("torch.hub.download_url_to_file", lambda *a, **k: pytest.fail("network access"))
    (tmp_path / "offline.yaml").write_text(yaml.safe_dump({**eval_cfg, "out": str(tmp_path / "offline")}))
    output = _invoke(["evaluate", tmp_path / "offline.yaml"])
    offline = json.loads((tmp_path / "offline" / "metrics.json").read_text())
    assert set(offline["skipped"]) == {"fid", "kid"}
    assert (
        "--inception-weights" in offline["skipped"]["fid"]
        and "--download-weights" in offline["skipped"]["fid"]
    )
    summary = offline["models"]["xattn"]["settings"]["ge"]["summary"]
    assert "fid" not in summary and "kid" not in summary
    assert summary["fd_morph"]["mean"] == pytest.approx(ge["fd_morph"]["mean"])  # same cached tiles
    assert summary["fidelity_auc"]["mean"] == pytest.approx(ge["fidelity_auc"]["mean"])
    assert set(offline["models"]["xattn"]["ge_ablation"]["null"]) == {"fd_morph", "fidelity_auc"}
    assert re.search(r"xattn\s+ge\s+skipped", output)
    page = (tmp_path / "offline" / "report.html").read_text()
    assert page.count('class="skipped">skipped</td>') == 2 * 5  # FID and KID of 5 model settings
    assert "FID: FID and KID skipped" in page and offline["warnings"][0].startswith("FID and KID skipped")
    parser = _Images()
    parser.feed(page)
    assert (
        "fidelity_vs_fd.png" in parser.sources
        and (tmp_path / "offline" / "fidelity_vs_fd.png").stat().st_size > 1000
    )


class RecordingPipe:
    """Stands in for a pipeline: records what each call was given, returns grey tiles."""

    def __init__(self):
        self.scheduler = make_sampling_scheduler(pixel_space=True)
        self.calls = []

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        n = len(kwargs["expression"]) if "expression" in kwargs else kwargs.get("num_images", 0)
        n = n or len(kwargs["morphology"])
        return SimpleNamespace(images=np.full((n, 8, 8, 3), 0.5, np.float32))


@pytest.mark.parametrize(
    ("setting", "expression"),
    [("ge", "own"), ("ge@4", "own"), ("shuffled", "permuted"), ("null", None), ("none", None)],
)
def test_each_setting_draws_with_the_expression_it_names(tmp_path, setting, expression):
    spots = [f"s{i}" for i in range(6)]
    adata = ad.AnnData(np.arange(18, dtype=np.float32).reshape(6, 3), obs=pd.DataFrame(index=spots))
    held = HeldOut(adata, np.zeros((6, 8, 8, 3), np.uint8), 128.0, np.full(6, 100.0), np.array(["A"] * 6))
    cfg = EvaluateConfig(out=str(tmp_path), dataset="d", models={"m": "p"}, batch_size=4)
    pipe = RecordingPipe()
    tiles = generate_setting(pipe, tmp_path, held, setting, 3, cfg, 4.0, tmp_path / setting / "seed3.npy")
    assert tiles.shape == (6, 8, 8, 3)
    given = [name for call in pipe.calls for name in call["expression"].obs_names] if expression else []
    assert all(("expression" in call) == (expression is not None) for call in pipe.calls)
    if expression == "own":
        assert given == spots  # the guidance sweep too: without expression its scale would do nothing
    elif expression == "permuted":
        assert sorted(given) == spots and given != spots


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


def test_evaluate_checks_every_input_before_work_starts(her2st_store, tmp_path):
    pipeline = tmp_path / "pipe"
    pipeline.mkdir()
    (pipeline / "model_index.json").write_text("{}")
    cfg = EvaluateConfig(out=str(tmp_path / "out"), dataset=str(her2st_store.root),
                         models={"ok": str(pipeline), "gone": str(tmp_path / "missing_run" / "pipeline")},
                         predictor=str(tmp_path / "no_predictor"), inception_weights=str(tmp_path / "w.pth"))  # fmt: skip
    with pytest.raises(FileNotFoundError) as err:
        evaluate(cfg, progress=False)
    message = str(err.value)
    assert "models.gone" in message and "missing_run" in message and "models.ok" not in message
    assert "no_predictor" in message and "w.pth" in message
    assert not (tmp_path / "out").exists()


def test_readme_ablations_with_yaml_null_are_valid(tmp_path):
    (tmp_path / "e.yaml").write_text("out: o\ndataset: d\nmodels: {a: b}\nablations: [null, shuffled]\n")
    assert EvaluateConfig.from_yaml(tmp_path / "e.yaml").ablations == ["null", "shuffled"]


def test_caveats_give_one_line_per_kind_with_the_samples_they_concern():
    rank = "FID from 24 real and 24 generated images in a 2048-d feature space: rank-deficient"
    caveats = [{"metric": "fid", "kind": "rank_deficient", "group": group, "text": text}
               for _model in range(3) for _seed in range(2)
               for group, text in ((None, rank), ("P2", "FID from 12 ..."), ("P1", "FID from 12 ..."))]  # fmt: skip
    caveats += [
        {"metric": "kid", "kind": "small_kid_subsets", "group": "P1", "text": "KID subsets of 12"}
    ] * 4
    caveats += [{"metric": "morph", "kind": "extractor", "group": None, "text": "no hash"}] * 6
    assert caveat_lines(caveats) == [
        f"fid: {rank} [also for samples P1, P2, with their own image counts]",
        "kid: KID subsets of 12 [for samples P1, with their own image counts]",
        "morph: no hash",
    ]


def test_report_page_escapes_names_and_marks_skipped_metrics(tmp_path):
    from types import SimpleNamespace

    import anndata as ad
    import numpy as np

    from stmdit.evaluate.report import write_report

    name = "<script>alert(1)</script>"
    summary = {"fd_morph": {"mean": 12.5, "std": 0.0, "per_seed": [12.5]}}
    results = {"n_spots": 2, "samples": ["S<1>"], "config": {"seeds": [0], "steps": 3}, "protocol": {"steps": 3},
               "skipped": {"fid": "FID and KID skipped: no weights.", "kid": "FID and KID skipped: no weights."},
               "warnings": ["FID and KID skipped: no weights.", "fd_morph: few images & more"],
               "models": {name: {"has_ge": False, "settings": {"none": {"guidance_ge": 2.0, "summary": summary,
                         "details": {"seed0": {"image_metrics": {"overall": {"fd_morph": {"protocol": {"n_real": 2}}}}}}}}}}}  # fmt: skip
    tiles = np.zeros((2, 8, 8, 3), np.uint8)
    held = SimpleNamespace(adata=ad.AnnData(np.zeros((2, 1), np.float32)))
    page = write_report(tmp_path, results, tiles, {name: tiles}, held, None, None, [], []).read_text()
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "S&lt;1&gt;" in page and "few images &amp; more" in page
    assert page.count('class="skipped">skipped</td>') == 2 and "<td>12.50</td>" in page
    assert page.count("<li>") == 2 and "FID: FID and KID skipped: no weights." in page


@pytest.fixture(scope="module")
def store_64px(test_data, tmp_path_factory):
    """The her2st sections prepared at 64 px per 128 µm tile (one held out), with a predictor
    trained on its training spots, so the predictor's own grid is 64 px."""
    import warnings

    from conftest import her2st_prepare_config
    from stmdit.data.store import PrepareConfig, prepare
    from stmdit.predictor import SpotSet, build_predictor_encoder, save_predictor, train_predictor

    root = tmp_path_factory.mktemp("her2st_64px")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # C3 and C4 list spot positions without counts
        store = prepare(
            PrepareConfig(**her2st_prepare_config(test_data, root / "store", tile_px=64)), progress=False
        )
    train = SpotSet.from_store(store, split="train")
    encoder = build_predictor_encoder("stain", train)
    small = {"hidden_dim": 64, "n_phi": 2, "n_rho": 2}
    fit = train_predictor(
        train, encoder, n_genes=256, epochs=20, lr=3e-3, seed=0, model_kwargs=small, progress=False
    )
    return store, save_predictor(fit, encoder, root / "predictor")


def _no_ge_pipeline(path, px: int):
    """An untrained pixel-space pipeline drawing px x px tiles (random weights: what its tiles
    show does not matter here, only their resolution)."""
    from stmdit import STMDiT
    from stmdit.encoders.morphology import StainFeatureEncoder
    from stmdit.pipeline import STMDiTPipeline

    morph = StainFeatureEncoder(image_size=px)
    model = STMDiT.from_preset(
        "tiny", in_channels=3, sample_size=px, patch_size=8, morph_dim=morph.output_dim, ge_injection="none"
    )
    generator = torch.Generator().manual_seed(px)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    STMDiTPipeline(model, make_sampling_scheduler(pixel_space=True), None, morph, None).save_pretrained(path)
    return path


class ChannelStatistics:
    """Each tile's channel means and stds: a cheap stand-in for the FID Inception network, whose
    features serve evaluate's KID protocol as any would (the network itself is tested in
    test_image_metrics and end to end above)."""

    protocol = {"extractor": "channel means and stds", "weights_sha256": "none: no weights"}

    def __call__(self, images):
        return torch.cat([images.mean(dim=(2, 3)), images.std(dim=(2, 3))], dim=1)


@pytest.mark.slow
def test_the_ceiling_is_taken_at_the_generated_tiles_resolution_and_kid_follows_torch_fidelity(
    store_64px, tmp_path, monkeypatch
):
    from stmdit.evaluate.fidelity import fidelity_auc
    from stmdit.evaluate.run import held_out_spots
    from stmdit.predictor import context_features, expression_targets, load_predictor
    from stmdit.tiles import resize

    store, predictor_dir = store_64px
    cfg = EvaluateConfig(
        out=str(tmp_path / "report"), dataset=str(store.root), predictor=str(predictor_dir),
        models={"m32": str(_no_ge_pipeline(tmp_path / "m32", 32)), "m64": str(_no_ge_pipeline(tmp_path / "m64", 64))},
        max_spots_per_sample=48, steps=2, n_bootstrap=20, fd_encoder="stain",
    )  # fmt: skip
    assert cfg.kid_subsets == 100 and cfg.kid_subset_size == 1000  # torch-fidelity's defaults
    monkeypatch.setattr("stmdit.evaluate.run.inception_extractor", lambda cfg: (ChannelStatistics(), None))
    results = evaluate(cfg, progress=False)

    # The reference: the predictor reading tiles as they are given, as fidelity did before the rule.
    held = held_out_spots(cfg)
    predictor, encoder = load_predictor(predictor_dir)
    measured = expression_targets(held.adata, predictor.genes)
    assert held.tiles.shape[1] == 64 and len(set(held.samples)) == 1  # one AUC: the mean over samples

    def auc_read_as_given(tiles):
        features = context_features(
            tiles, held.adata.obs, held.tile_um, held.spot_diameter_um, encoder, progress=False
        )
        return fidelity_auc(measured, predictor.predict_features(features), predictor.hvg_order, n_bootstrap=20,
                            gene_protocol=predictor.gene_protocol).auc  # fmt: skip

    at_64 = auc_read_as_given(held.tiles)
    at_32 = auc_read_as_given(resize(resize(held.tiles, 32), 64))
    m32, m64 = results["models"]["m32"], results["models"]["m64"]
    assert (m32["resolution"], m64["resolution"]) == (32, 64)
    # A 64 px model on a 64 px store: the ceiling is what it always was.
    assert results["ceiling"]["detail_px"] == m64["ceiling"]["detail_px"] == 64
    assert results["ceiling"]["auc"] == m64["ceiling"]["auc"] == pytest.approx(at_64, rel=1e-12)
    # A 32 px model: the real tiles reduced to its 32 px, then put on the predictor's 64 px grid.
    assert m32["ceiling"]["detail_px"] == 32 and m32["ceiling"]["auc"] == pytest.approx(at_32, rel=1e-12)
    assert abs(at_32 - at_64) > 0.005 and set(results["ceilings"]) == {"32", "64"}
    assert results["ceilings"]["32"]["auc"] == m32["ceiling"]["auc"]
    # The 32 px model's own tiles go on the same grid (read as given, at 32 px, they score otherwise),
    # and its ratio divides by the ceiling at its resolution.
    fake = np.load(tmp_path / "report" / "generated" / "m32" / "none" / "seed0.npy")
    fidelity = m32["settings"]["none"]["summary"]["fidelity_auc"]["mean"]
    assert fake.shape[1] == 32 and fidelity == pytest.approx(auc_read_as_given(resize(fake, 64)), rel=1e-12)
    assert abs(fidelity - auc_read_as_given(fake)) > 1e-4
    assert at_32 > 0 and m32["settings"]["none"]["summary"]["fidelity_ratio_to_ceiling"] == pytest.approx(
        fidelity / at_32
    )
    assert "first reduced to the generated tiles' resolution" in results["protocol"]["ceiling"]
    page = (tmp_path / "report" / "report.html").read_text()
    assert f"<td>{at_32:.3f} (32 px)</td>" in page and f"<td>{at_64:.3f} (64 px)</td>" in page
    assert "<td>real tiles (ceiling)</td><td>reduced to 32 px</td>" in page

    # KID: 100 subsets by default, of all 48 images (fewer than 1000), with the caveat that says so.
    kid = m32["settings"]["none"]["details"]["seed0"]["image_metrics"]["overall"]["kid"]
    assert (kid["protocol"]["kid_subsets"], kid["protocol"]["kid_subset_size"]) == (100, 48)
    few = [
        w
        for w in results["warnings"]
        if w.startswith("kid: KID from few images: subsets of 48 images instead of 1000")
    ]
    assert len(few) == 1 and "rounding only" in few[0]
    saved = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert few[0] in saved["warnings"] and few[0] in page
