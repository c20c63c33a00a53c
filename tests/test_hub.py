import pytest
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
