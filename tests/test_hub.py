from pathlib import Path

import pytest
import torch
from huggingface_hub.errors import GatedRepoError
from typer.testing import CliRunner

from stmdit import hub
from stmdit.cli import app


def test_gated_repository_error_says_how_to_get_access(monkeypatch):
    def gated(*args, **kwargs):
        raise GatedRepoError.__new__(GatedRepoError)

    monkeypatch.setattr("huggingface_hub.hf_hub_download", gated)
    with pytest.raises(
        hub.WeightsUnavailableError,
        match=r"MahmoodLab/UNI2-h is gated: request access.*huggingface-cli login",
    ):
        hub.hub_file("MahmoodLab/UNI2-h", "pytorch_model.bin")


def test_offline_mode_is_read_when_called(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.offline()
    with pytest.raises(hub.WeightsUnavailableError, match="HF_HUB_OFFLINE is set"):
        hub.hub_snapshot("stabilityai/stable-diffusion-3.5-large", allow_patterns=["vae/*"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert not hub.offline()


def test_local_paths_and_hub_ids_are_told_apart(tmp_path):
    assert hub.is_local(tmp_path)
    assert not hub.is_local("owner/model")
    with pytest.raises(FileNotFoundError, match="neither an existing file or folder"):
        hub.is_local(tmp_path / "missing" / "weights.bin")


def test_weights_command_lists_every_component_and_finds_local_folders(monkeypatch, tmp_path):
    monkeypatch.setenv("STMDIT_UNI2H", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = CliRunner().invoke(app, ["weights"])
    assert result.exit_code == 0
    for name in ("UNI-2h", "CancerFoundation", "Stable Diffusion 3.5 VAE", "PixCell-256"):
        assert name in result.output
    assert f"on this machine: {tmp_path}" in result.output
    assert "gated:   yes" in result.output and "HF_HUB_OFFLINE is set" in result.output


# -- model cards and pushing ----------------------------------------------------------------------------


def tiny_run(tmp_path):
    from stmdit.data.features import FeatureDataset
    from stmdit.train import TrainConfig, Trainer

    g = torch.Generator().manual_seed(0)
    data = FeatureDataset(latents=torch.randn(8, 3, 8, 8, generator=g), morphology=torch.randn(8, 6, generator=g),
                          ge=torch.randn(8, 5, generator=g))  # fmt: skip
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), model={"preset": "tiny", "patch_size": 2}, max_steps=2,
                      batch_size=4, checkpoint_every=2, log_every=1)  # fmt: skip
    Trainer(cfg, data, progress=False).run()
    return tmp_path / "run" / "pipeline"


EVALUATION = {  # one model's entry of evaluate's metrics.json, as evaluate/run.py builds it
    "settings": {
        "ge": {"guidance_ge": 2.0, "summary": {"fid": {"mean": 81.25, "std": 1.5, "per_seed": [79.75, 82.75]},
                                               "kid": {"mean": 0.0123, "std": 0.001, "per_seed": [0.0113, 0.0133]},
                                               "fidelity_auc": {"mean": 0.31, "std": 0.02, "per_seed": [0.29, 0.33]}}},
        "null": {"guidance_ge": 2.0, "summary": {"fid": {"mean": 90.5, "std": 2.0, "per_seed": [88.5, 92.5]}}},
    }
}  # fmt: skip


def test_training_writes_a_model_card_that_evaluate_updates(tmp_path):
    from huggingface_hub import ModelCard

    from stmdit import STMDiTPipeline
    from stmdit.model_card import NO_METRICS, update_model_card

    pipeline = tiny_run(tmp_path)
    card = ModelCard.load(pipeline / "README.md")
    assert card.data.library_name == "diffusers" and card.data.license == "other"
    assert {"stmdit", "spatial-transcriptomics"} <= set(card.data.tags)
    assert (
        "max_steps: 2" in card.text and "| transformer | `STMDiT` |" in card.text and NO_METRICS in card.text
    )

    # What evaluate does by default: the card with its metrics in the report folder, the
    # pipeline's own card untouched.
    trained = (pipeline / "README.md").read_bytes()
    report = update_model_card(pipeline, EVALUATION, target=tmp_path / "report" / "model_cards" / "m.md")
    assert report == tmp_path / "report" / "model_cards" / "m.md"
    assert (pipeline / "README.md").read_bytes() == trained
    assert "| ge | 81.25 ± 1.5 |" in report.read_text() and "max_steps: 2" in report.read_text()

    # With --update-model-card: into the pipeline's own card.
    update_model_card(pipeline, EVALUATION, source="test split of a store, seeds [0, 1]")
    update_model_card(
        pipeline, EVALUATION, source="test split of a store, seeds [0, 1]"
    )  # replaces, not appends
    text = (pipeline / "README.md").read_text()
    assert text.count("| setting |") == 1 and NO_METRICS not in text
    assert "| ge | 81.25 ± 1.5 | 0.0123 ± 0.001 | - | 0.31 ± 0.02 | - |" in text
    assert "| null | 90.5 ± 2 | - | - | - | - |" in text
    assert ModelCard.load(pipeline / "README.md").data.library_name == "diffusers"  # header intact

    # The card travels with the weights: loading and saving elsewhere keeps it, evaluation included.
    STMDiTPipeline.from_pretrained(pipeline).save_pretrained(tmp_path / "copy")
    assert (tmp_path / "copy" / "README.md").read_text() == text
    assert update_model_card("owner/not-a-folder", EVALUATION) is None


def test_training_record_from_a_prepared_store(her2st_store):
    from types import SimpleNamespace

    from stmdit.model_card import render_model_card, training_record

    rows = her2st_store.rows("train")
    split_of = SimpleNamespace(store=her2st_store, indices=rows, split="train")  # what StoreDataset exposes
    record = training_record({"max_steps": 1}, split_of)
    obs = her2st_store.spots().obs.iloc[rows]
    expected = obs["sample_id"].astype(str).value_counts()
    assert {s["sample_id"]: s["spots"] for s in record["data"]["samples"]} == expected.to_dict()
    assert (
        record["data"]["n_spots"] == len(rows) and len(record["data"]["sources"]) == 9
    )  # 3 files x 3 sections
    text = render_model_card(None, record, "run/pipeline", components=[])
    for sample, n in expected.items():
        assert f"| {sample} | {n} | legacy_st |" in text
    assert "datasets:\n- " + her2st_store.root.name in text


def test_push_to_hub_uploads_the_saved_folder_with_its_card(tmp_path, monkeypatch):
    import huggingface_hub

    from stmdit import STMDiTPipeline

    pipe = STMDiTPipeline.from_pretrained(tiny_run(tmp_path))
    uploaded = {}

    def create_repo(repo_id, **kwargs):
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, folder, repo_id, **kwargs):
        uploaded.update(
            {p.relative_to(folder).as_posix(): p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()}
        )
        return f"https://huggingface.co/{repo_id}"

    # The hub client's network calls are replaced; nothing leaves the machine.
    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    monkeypatch.setattr(STMDiTPipeline, "_upload_folder", upload_folder)
    assert pipe.push_to_hub("lab/stmdit-tiny") == "https://huggingface.co/lab/stmdit-tiny"
    assert {"model_index.json", "README.md", "transformer/config.json"} <= set(uploaded)
    assert "max_steps: 2" in uploaded["README.md"].decode()  # the trained card, not diffusers' generic one

    # Offline, the hub client refuses before any request.
    monkeypatch.undo()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(Exception, match="(?i)offline"):
        pipe.push_to_hub("lab/stmdit-tiny")
