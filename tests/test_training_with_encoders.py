"""The trainer with either GE encoder: a pipeline saved after training reloads with its
encoders' configuration and gene list and generates from AnnData."""

import json

import numpy as np
import pytest
import torch

from cf_reference import TINY, Reference, write_folder
from stmdit import CancerFoundationEncoder, PanelExpressionEncoder, STMDiTPipeline
from stmdit.data.sources import load_training_data
from stmdit.encoders.factory import build_ge_encoder, build_morphology_encoder, build_vae
from stmdit.train import TrainConfig, Trainer


@pytest.fixture
def cf_folder(tmp_path, test_data):
    vocab = test_data / "cancerfoundation_assets" / "vocab.json"
    reference = Reference(len(json.loads(vocab.read_text())), **TINY)
    return write_folder(tmp_path / "cancerfoundation", vocab, reference.official_state_dict())


@pytest.mark.parametrize(
    ("ge", "pooling"), [("panel", "cls"), ("panel", "pma"), ("cf", "cls"), ("cf", "pma")]
)
def test_train_with_each_ge_encoder_and_reload_the_pipeline(tmp_path, request, ge, pooling):
    spec = f"cancerfoundation:{request.getfixturevalue('cf_folder')}" if ge == "cf" else "panel"
    model = {"preset": "tiny", "patch_size": 4, "ge_pooling": pooling, "pma_seeds": 2}
    data_spec = {
        "source": "synthetic",
        "n_sections": 2,
        "grid": 4,
        "tile_size": 16,
        "n_genes": 11,
        "ge_encoder": spec,
    }
    data = load_training_data(data_spec, model)
    assert ("ge_tokens" in data.train.tensors) == (pooling == "pma")
    cfg = TrainConfig(
        output_dir=str(tmp_path / "run"), data=data_spec, model=model, max_steps=2, batch_size=4
    )
    result = Trainer(cfg, data.train, ge_encoder=data.ge_encoder, morphology_encoder=data.morphology_encoder,
                     progress=False).run()  # fmt: skip

    pipe = STMDiTPipeline.from_pretrained(result.pipeline_dir)
    expected_class = CancerFoundationEncoder if ge == "cf" else PanelExpressionEncoder
    assert isinstance(pipe.ge_encoder, expected_class)
    assert pipe.ge_encoder.genes == data.ge_encoder.genes and len(pipe.ge_encoder.genes) == 11

    def public(config):
        return {k: v for k, v in config.items() if not k.startswith("_")}

    assert public(pipe.ge_encoder.config) == public(data.ge_encoder.config)
    adata = data.tissue.adata[data.held_out_index[:3]]
    out = pipe(expression=adata[:, ::-1], num_inference_steps=2, output_type="np", progress=False,
               generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert out.images.shape == (3, 16, 16, 3) and out.expression_alignment.coverage == 1.0
    # The reloaded encoder encodes exactly as the one used for training.
    a, _ = pipe.ge_encoder.encode(adata)
    b, _ = data.ge_encoder.encode(adata)
    torch.testing.assert_close(a["ge"], b["ge"])


def test_encoder_specs_fail_clearly(monkeypatch, tmp_path):
    monkeypatch.delenv("STMDIT_CANCERFOUNDATION", raising=False)
    with pytest.raises(ValueError, match="STMDIT_CANCERFOUNDATION"):
        build_ge_encoder("cancerfoundation", None)
    with pytest.raises(ValueError, match="unknown GE encoder 'scgpt'"):
        build_ge_encoder("scgpt", None)
    with pytest.raises(ValueError, match="unknown morphology encoder 'virchow'"):
        build_morphology_encoder("virchow")
    with pytest.raises(
        FileNotFoundError, match="neither an existing file or folder nor a Hugging Face hub id"
    ):
        build_vae(str(tmp_path / "no" / "such" / "vae"))
    assert build_vae("none") is None
    stain = build_morphology_encoder("auto", torch.rand(8, 3, 16, 16))
    assert type(stain).__name__ == "StainFeatureEncoder" and np.isfinite(stain.mean.numpy()).all()
