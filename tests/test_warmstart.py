"""Warm-starting STMDiT from PixCell / PixArt checkpoints.

The reference is diffusers' own PixArtTransformer2DModel with random weights everywhere
(including the layers PixArt zero-initialises, so that a dropped or misplaced tensor shows),
saved in the real diffusers format plus PixCell's ``uncond_embedding``. The warm-started
STMDiT, given a GE vector it must ignore (GE layers at zero), has to match its outputs.
"""

import argparse
import json
import re

import huggingface_hub
import pytest
import torch
from diffusers import PixArtTransformer2DModel
from safetensors.torch import load_file, save_file

from stmdit.warmstart import convert_diffusers, detect_layout, load_pixcell

HEADS, HEAD_DIM, LAYERS, CAPTION = 2, 8, 2, 12
HIDDEN = HEADS * HEAD_DIM
INTERPOLATION = 0.5  # deliberately not diffusers' default for sample_size 8 (which is 1)
GE_RE = re.compile(r"(ge_embedder|ge_adaln)\.|blocks\.\d+\.ge_cross_attn\.")


@pytest.fixture(scope="module")
def pixart() -> PixArtTransformer2DModel:
    torch.manual_seed(1)
    model = PixArtTransformer2DModel(
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        in_channels=4,
        out_channels=8,
        num_layers=LAYERS,
        sample_size=8,
        patch_size=2,
        caption_channels=CAPTION,
        cross_attention_dim=HIDDEN,
        use_additional_conditions=False,
        norm_eps=1e-6,
        interpolation_scale=INTERPOLATION,
    )
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def uncond() -> torch.Tensor:
    return torch.randn(1, CAPTION, generator=torch.Generator().manual_seed(2)) / CAPTION**0.5


def save_diffusers(model, folder, extra_tensors=None, **config_updates):
    """save_pretrained, then add tensors to the safetensors file and keys to config.json."""
    model.save_pretrained(folder)
    weights = folder / "diffusion_pytorch_model.safetensors"
    save_file({**load_file(weights), **(extra_tensors or {})}, weights, metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **config_updates}))
    return folder


@pytest.fixture(scope="module")
def hub_folder(tmp_path_factory, pixart, uncond):
    """A PixCell-like hub snapshot: model_index.json at the top, the transformer in its
    subfolder with PixCell's class name, extra config key and null embedding."""
    root = tmp_path_factory.mktemp("pixcell")
    extra = {"caption_projection.uncond_embedding": uncond}
    save_diffusers(
        pixart, root / "transformer", extra, _class_name="PixCellTransformer2DModel", caption_num_tokens=1
    )
    (root / "model_index.json").write_text(json.dumps({"_class_name": "PixCellPipeline"}))
    return root


def original_state_dict(pixart, uncond) -> dict[str, torch.Tensor]:
    """The same weights under original PixArt names, written out by hand (q/k/v and k/v
    stacked on dim 0), with the position table PixArt checkpoints carry."""
    d = {k: v.detach().clone() for k, v in pixart.state_dict().items()}
    sd = {"pos_embed": pixart.pos_embed.pos_embed.clone(), "y_embedder.y_embedding": uncond.clone()}
    for s in ("weight", "bias"):
        sd[f"x_embedder.proj.{s}"] = d[f"pos_embed.proj.{s}"]
        sd[f"t_embedder.mlp.0.{s}"] = d[f"adaln_single.emb.timestep_embedder.linear_1.{s}"]
        sd[f"t_embedder.mlp.2.{s}"] = d[f"adaln_single.emb.timestep_embedder.linear_2.{s}"]
        sd[f"t_block.1.{s}"] = d[f"adaln_single.linear.{s}"]
        sd[f"y_embedder.y_proj.fc1.{s}"] = d[f"caption_projection.linear_1.{s}"]
        sd[f"y_embedder.y_proj.fc2.{s}"] = d[f"caption_projection.linear_2.{s}"]
        sd[f"final_layer.linear.{s}"] = d[f"proj_out.{s}"]
        for i in range(LAYERS):
            src, dst = f"transformer_blocks.{i}", f"blocks.{i}"
            sd[f"{dst}.attn.qkv.{s}"] = torch.cat([d[f"{src}.attn1.to_{c}.{s}"] for c in "qkv"])
            sd[f"{dst}.attn.proj.{s}"] = d[f"{src}.attn1.to_out.0.{s}"]
            sd[f"{dst}.cross_attn.q_linear.{s}"] = d[f"{src}.attn2.to_q.{s}"]
            sd[f"{dst}.cross_attn.kv_linear.{s}"] = torch.cat([d[f"{src}.attn2.to_{c}.{s}"] for c in "kv"])
            sd[f"{dst}.cross_attn.proj.{s}"] = d[f"{src}.attn2.to_out.0.{s}"]
            sd[f"{dst}.mlp.fc1.{s}"] = d[f"{src}.ff.net.0.proj.{s}"]
            sd[f"{dst}.mlp.fc2.{s}"] = d[f"{src}.ff.net.2.{s}"]
    for i in range(LAYERS):
        sd[f"blocks.{i}.scale_shift_table"] = d[f"transformer_blocks.{i}.scale_shift_table"]
    sd["final_layer.scale_shift_table"] = d["scale_shift_table"]
    return sd


def assert_matches_pixart(model, pixart):
    """Same latents, timesteps and morphology token -> same epsilon and variance channels,
    with a GE vector passed in that the zero-initialised GE layers must not let through."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([17.0, 640.0])
    y = torch.randn(2, CAPTION, generator=g)
    ge = torch.randn(2, model.config.ge_dim, generator=g) * 5
    with torch.no_grad():
        expected = pixart(hidden_states=x, encoder_hidden_states=y[:, None], timestep=t).sample
        got = model(x, t, morphology=y, ge=ge)
    assert got.shape == expected.shape == (2, 8, 8, 8)
    assert expected.abs().mean() > 0.1  # random output layers: the comparison is not of zeros
    torch.testing.assert_close(got[:, :4], expected[:, :4], atol=1e-5, rtol=1e-5)  # epsilon
    torch.testing.assert_close(got[:, 4:], expected[:, 4:], atol=1e-5, rtol=1e-5)  # variance


def test_diffusers_folder_matches_pixart(hub_folder, pixart, uncond):
    model, report = load_pixcell(hub_folder, ge_injection="adaln+xattn", ge_pooling="cls", ge_dim=6)
    assert report.layout == "diffusers" and report.clean
    assert report.initial and report.missing == []
    assert {k for k in model.state_dict() if GE_RE.match(k)} == set(report.initial)
    assert set(report.loaded) | set(report.initial) == set(model.state_dict())
    assert report.config["interpolation_scale"] == INTERPOLATION
    assert (report.config["hidden_size"], report.config["depth"], report.config["out_channels"]) == (
        HIDDEN,
        2,
        8,
    )
    torch.testing.assert_close(model.y_embedder.y_embedding, uncond)
    assert_matches_pixart(model, pixart)
    # The transformer folder itself works as well as the snapshot root above it.
    model2, _ = load_pixcell(hub_folder / "transformer", ge_dim=6)
    torch.testing.assert_close(model2.final_layer.linear.weight, model.final_layer.linear.weight)


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_original_layout_matches_pixart(tmp_path, pixart, uncond, fmt):
    sd = original_state_dict(pixart, uncond)
    if fmt == "pth":
        path = tmp_path / "pixcell_256.pth"
        torch.save({"state_dict": sd, "epoch": 3}, path)  # wrapped, as PixArt/PixCell save it
        overrides = {}  # sample_size comes from the stored pos_embed
    else:
        path = tmp_path / "pixcell_256.safetensors"
        save_file({k: v for k, v in sd.items() if k != "pos_embed"}, path)
        overrides = {"sample_size": 8}
    model, report = load_pixcell(
        path,
        ge_injection="adaln+xattn",
        ge_dim=6,
        num_heads=HEADS,
        interpolation_scale=INTERPOLATION,
        **overrides,
    )
    assert report.layout == "original" and report.clean
    assert report.initial and all(GE_RE.match(k) for k in report.initial) and report.missing == []
    assert ("pos_embed" in report.ignored) == (fmt == "pth")
    assert report.config["mlp_ratio"] == 4.0 and report.config["morph_dim"] == CAPTION
    assert_matches_pixart(model, pixart)


def test_inferred_interpolation_scale_is_checked_against_stored_pos_embed(tmp_path, pixart, uncond):
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": original_state_dict(pixart, uncond)}, path)
    with pytest.warns(UserWarning, match="pos_embed differs"):
        _, report = load_pixcell(path, num_heads=HEADS)
    assert report.config["interpolation_scale"] == 8 / 64
    assert any("interpolation_scale not in the checkpoint" in n for n in report.notes)


def test_unexpected_key_is_reported(tmp_path, pixart):
    folder = save_diffusers(pixart, tmp_path / "extra", {"extra.weight": torch.zeros(3)})
    with pytest.warns(UserWarning, match="extra.weight"):
        _, report = load_pixcell(folder)
    assert report.unexpected == ["extra.weight"]
    assert report.missing == ["y_embedder.y_embedding"]  # plain PixArt has no uncond_embedding


def test_null_interpolation_scale_follows_diffusers(tmp_path, pixart, uncond):
    extra = {"caption_projection.uncond_embedding": uncond}
    _, report = load_pixcell(save_diffusers(pixart, tmp_path / "m", extra, interpolation_scale=None))
    assert report.config["interpolation_scale"] == 1  # max(sample_size // 64, 1), as diffusers builds it
    assert any("diffusers' max(sample_size // 64, 1) = 1 used" in n for n in report.notes)


def pixcell_token_table(dim, num_tokens, base_size, interpolation_scale):
    """PixCell-1024's UNI token position table, written out from its definition: sin-cos of the
    grid positions stretched to the patch grid, divided by the interpolation scale and shifted
    by base_size // num_tokens; [sin, cos] per axis, the first grid coordinate first."""
    side = int(num_tokens**0.5)
    axis = torch.arange(side, dtype=torch.float64) / (side / base_size) / interpolation_scale
    gx, gy = torch.meshgrid(axis, axis, indexing="xy")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def one_axis(pos):
        out = torch.outer(pos.reshape(-1) + base_size // num_tokens, omega)
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([one_axis(gx), one_axis(gy)], dim=1).float()


def test_several_morphology_tokens_match_pixcell_with_its_token_positions(tmp_path, pixart):
    # PixCell-1024 adds its token table to the UNI embeddings before the caption projection,
    # which is what PixArt computes when given the embeddings with the table already added.
    extra = {"caption_projection.uncond_embedding": torch.randn(4, CAPTION)}
    model, report = load_pixcell(
        save_diffusers(pixart, tmp_path / "m", extra, caption_num_tokens=4), ge_dim=6
    )
    assert report.config["morph_tokens"] == 4 and report.clean
    g = torch.Generator().manual_seed(4)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([5.0, 900.0])
    y = torch.randn(2, 4, CAPTION, generator=g)
    table = pixcell_token_table(CAPTION, 4, base_size=8 // 2, interpolation_scale=INTERPOLATION)
    with torch.no_grad():
        expected = pixart(hidden_states=x, encoder_hidden_states=y + table, timestep=t).sample
        got = model(x, t, morphology=y, ge=torch.randn(2, 6, generator=g))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_wrong_shape_raises_naming_the_key(tmp_path, pixart, uncond):
    sd = original_state_dict(pixart, uncond)
    sd["blocks.1.cross_attn.proj.weight"] = torch.zeros(HIDDEN, HIDDEN - 1)
    path = tmp_path / "bad.safetensors"
    save_file(sd, path)
    with pytest.raises(ValueError, match=r"blocks\.1\.cross_attn\.proj\.weight.*\(16, 15\).*\(16, 16\)"):
        load_pixcell(path, num_heads=HEADS, interpolation_scale=INTERPOLATION)


def test_unknown_layout_raises(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"encoder.layer.0.weight": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="unknown checkpoint layout"):
        load_pixcell(path)
    with pytest.raises(ValueError, match="unknown layout 'sd3'"):
        load_pixcell(path, layout="sd3")


def test_layout_detection_and_fusing(pixart):
    sd = pixart.state_dict()
    assert detect_layout(sd) == "diffusers"
    converted, _ = convert_diffusers(sd)
    assert converted["blocks.0.attn.qkv.weight"].shape == (3 * HIDDEN, HIDDEN)
    assert converted["blocks.1.cross_attn.kv_linear.bias"].shape == (2 * HIDDEN,)
    assert detect_layout(converted) == "original"
    del sd["transformer_blocks.0.attn1.to_v.weight"]
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv\.weight.*\['k', 'q'\]"):
        convert_diffusers(sd)


def test_pickled_objects_need_trust(tmp_path, pixart, uncond):
    path = tmp_path / "train_state.pth"
    torch.save({"state_dict": original_state_dict(pixart, uncond), "args": argparse.Namespace(lr=2e-5)}, path)
    with pytest.raises(ValueError, match="runs code.*trust_pickle=True"):
        load_pixcell(path, num_heads=HEADS, interpolation_scale=INTERPOLATION)
    model, report = load_pixcell(path, num_heads=HEADS, interpolation_scale=INTERPOLATION, trust_pickle=True)
    assert report.clean
    assert_matches_pixart(model, pixart)


def test_hub_id_offline_and_uncached_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(OSError, match="HF_HUB_OFFLINE is set.*pass the local folder"):
        load_pixcell("StonyBrook-CVLab/PixCell-256")


def test_missing_local_path_is_not_taken_for_a_hub_id(tmp_path):
    with pytest.raises(
        FileNotFoundError, match="neither an existing file or folder nor a Hugging Face hub id"
    ):
        load_pixcell(str(tmp_path / "no" / "such" / "model.pth"))


def test_training_from_pixcell_starts_exactly_where_pixcell_is(tmp_path, pixart, uncond):
    from stmdit import STMDiT
    from stmdit.data.features import FeatureDataset
    from stmdit.train import TrainConfig, Trainer

    folder = save_diffusers(
        pixart, tmp_path / "pixcell", {"caption_projection.uncond_embedding": uncond}, caption_num_tokens=1
    )
    g = torch.Generator().manual_seed(0)
    data = FeatureDataset(
        latents=torch.randn(8, 4, 8, 8, generator=g),
        morphology=torch.randn(8, CAPTION, generator=g),
        ge=torch.randn(8, 6, generator=g),
    )
    # warmup_steps 10: the one step runs at learning rate 0, so the saved model is the start.
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), init_from=f"pixcell:{folder}", max_steps=1,
                      batch_size=4, warmup_steps=10, model={"ge_injection": "adaln+xattn"})  # fmt: skip
    result = Trainer(cfg, data, progress=False).run()
    model = STMDiT.from_pretrained(result.pipeline_dir / "transformer")
    assert (model.config.hidden_size, model.config.depth, model.config.ge_dim) == (HIDDEN, LAYERS, 6)
    assert_matches_pixart(model, pixart)


def test_null_interpolation_scale_of_pixcell_256_is_its_training_half(tmp_path, uncond):
    """PixCell-256's config.json leaves interpolation_scale null; it was trained with
    pe_interpolation 0.5, where diffusers would build 1. The loaded model must compute what the
    0.5 model computes, and the report says which value was taken."""
    torch.manual_seed(4)
    kwargs = dict(num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4, out_channels=8,
                  num_layers=1, sample_size=32, patch_size=2, caption_channels=CAPTION, cross_attention_dim=HIDDEN,
                  use_additional_conditions=False, norm_eps=1e-6)  # fmt: skip
    reference = PixArtTransformer2DModel(**kwargs, interpolation_scale=0.5).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    extra = {"caption_projection.uncond_embedding": uncond}
    folder = save_diffusers(reference, tmp_path / "pixcell256", extra, _class_name="PixCellTransformer2DModel",
                            interpolation_scale=None)  # fmt: skip

    def outputs(model):
        g = torch.Generator().manual_seed(5)
        x, y = torch.randn(2, 4, 32, 32, generator=g), torch.randn(2, CAPTION, generator=g)
        t = torch.tensor([17.0, 640.0])
        with torch.no_grad():
            if isinstance(model, PixArtTransformer2DModel):
                return model(hidden_states=x, encoder_hidden_states=y[:, None], timestep=t).sample
            return model(x, t, morphology=y, ge=torch.randn(2, model.config.ge_dim, generator=g))

    model, report = load_pixcell(folder, ge_dim=6)
    assert report.config["interpolation_scale"] == 0.5 and report.clean
    assert any("PixCell-256's pe_interpolation 0.5 used" in n for n in report.notes)
    assert "PixCell-256's pe_interpolation 0.5" in str(report)
    torch.testing.assert_close(outputs(model), outputs(reference), atol=1e-5, rtol=1e-5)
    # diffusers' rule (1) gives another position table and other outputs: the choice matters.
    wrong, wrong_report = load_pixcell(folder, ge_dim=6, interpolation_scale=1)
    assert not torch.allclose(outputs(wrong), outputs(reference), atol=1e-3)
    assert not any("interpolation_scale" in n for n in wrong_report.notes)  # given explicitly: no note
