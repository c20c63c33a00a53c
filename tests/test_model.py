import pytest
import torch

from stmdit import PRESETS, STMDiT

MORPH, GE, TOKEN = 24, 20, 12


def tiny(**overrides) -> STMDiT:
    kw = {
        "in_channels": 3,
        "sample_size": 8,
        "patch_size": 2,
        "morph_dim": MORPH,
        "ge_dim": GE,
        "ge_token_dim": TOKEN,
    }
    return STMDiT.from_preset("tiny", **{**kw, **overrides})


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every weight (including the zero-initialised outputs) a random value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def inputs(b=3, pma=False, seed=1):
    g = torch.Generator().manual_seed(seed)
    kw = {"x": torch.randn(b, 3, 8, 8, generator=g), "timestep": torch.tensor([1, 500, 999][:b]),
          "morphology": torch.randn(b, MORPH, generator=g)}  # fmt: skip
    if pma:
        kw["ge_tokens"] = torch.randn(b, 7, TOKEN, generator=g)
        mask = torch.ones(b, 7, dtype=torch.bool)
        mask[0, 4:] = False
        kw["ge_mask"] = mask
    else:
        kw["ge"] = torch.randn(b, GE, generator=g)
    return kw


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds_and_runs_at_tiny_scale(name):
    # Real widths and head counts of each preset, one block deep, on an 8x8 latent.
    model = STMDiT.from_preset(name, depth=1, in_channels=4, sample_size=8, morph_dim=MORPH, ge_dim=GE)
    assert model.config.hidden_size == PRESETS[name]["hidden_size"]
    assert model.config.num_heads == PRESETS[name]["num_heads"]
    x = torch.randn(2, 4, 8, 8)
    out = model(x, torch.tensor([3, 700]), morphology=torch.randn(2, MORPH), ge=torch.randn(2, GE))
    assert out.shape == (2, 4, 8, 8) and out.dtype == torch.float32


def test_preset_dimensions_match_the_reference():
    assert PRESETS["B"] == {"depth": 12, "hidden_size": 768, "num_heads": 12}
    assert PRESETS["XL"] == {"depth": 28, "hidden_size": 1152, "num_heads": 16}
    # PixCell-256 (PixArt-Sigma XL/2, 16 -> 32 channels, UNI-2h captions) has about 608 M parameters.
    with torch.device("meta"):
        xl = STMDiT.from_preset("XL", in_channels=16, out_channels=32, ge_injection="none")
    n = sum(p.numel() for p in xl.parameters())
    assert 600e6 < n < 615e6, n


def test_learned_variance_doubles_output_channels():
    model = tiny(out_channels=6)
    assert model.learns_variance
    assert model(**inputs()).shape == (3, 6, 8, 8)
    with pytest.raises(ValueError, match="out_channels"):
        tiny(out_channels=5)


def test_multi_token_morphology():
    model = tiny(morph_tokens=16)
    out = model(torch.randn(2, 3, 8, 8), 10, morphology=torch.randn(2, 16, MORPH), ge=torch.randn(2, GE))
    assert out.shape == (2, 3, 8, 8)
    with pytest.raises(ValueError, match="morph_tokens"):
        model(torch.randn(2, 3, 8, 8), 10, morphology=torch.randn(2, MORPH))


def test_multi_token_null_replaces_the_embeddings_with_their_position_table():
    """As PixCell's training code: the table is added to the given embeddings and a dropped row
    gets the bare null buffer (the null its weights learned), whether dropped or absent."""
    embedder = tiny(morph_tokens=4).y_embedder
    morphology = torch.randn(2, 4, MORPH, generator=torch.Generator().manual_seed(0))
    null = embedder.y_embedding[None].expand(2, -1, -1)
    with torch.no_grad():
        kept = embedder(morphology, torch.tensor([False, False]), 2)
        mixed = embedder(morphology, torch.tensor([True, False]), 2)
        absent = embedder(None, None, 2)
        torch.testing.assert_close(kept, embedder.y_proj(morphology + embedder.pos_embed))
        torch.testing.assert_close(mixed[0], embedder.y_proj(null)[0])
        torch.testing.assert_close(mixed[1], kept[1])
        torch.testing.assert_close(absent, embedder.y_proj(null))
        assert not torch.allclose(absent, embedder.y_proj(null + embedder.pos_embed))


@pytest.mark.parametrize("injection", ["adaln", "xattn", "adaln+xattn"])
@pytest.mark.parametrize("pooling", ["cls", "pma"])
def test_zero_initialised_ge_layers_reproduce_the_no_ge_model_exactly(injection, pooling):
    base = tiny(ge_injection="none")
    randomize(base)
    with_ge = tiny(ge_injection=injection, ge_pooling=pooling, pma_seeds=3)
    missing, unexpected = with_ge.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected
    assert missing and all(k.startswith(("ge_", "blocks.")) and "ge_" in k for k in missing)
    kw = inputs(pma=pooling == "pma")
    ref = base(kw["x"], kw["timestep"], morphology=kw["morphology"])
    out = with_ge(**kw)
    assert torch.equal(out, ref)
    # ... and the GE pathway is live once its output layers move away from zero.
    randomize(with_ge, seed=5)
    with_ge.load_state_dict(base.state_dict(), strict=False)
    assert not torch.allclose(with_ge(**kw), ref)


def test_ge_changes_the_output_and_null_drop_matches_absent_ge():
    model = tiny(ge_injection="adaln+xattn")
    randomize(model)
    kw = inputs()
    a = model(**kw)
    b = model(**{**kw, "ge": kw["ge"] + 1})
    assert not torch.allclose(a, b)
    dropped = model(**kw, drop_ge=torch.ones(3, dtype=torch.bool))
    absent = model(kw["x"], kw["timestep"], morphology=kw["morphology"])
    torch.testing.assert_close(dropped, absent)
    half = model(**kw, drop_ge=torch.tensor([True, False, False]))
    torch.testing.assert_close(half[1:], a[1:])
    torch.testing.assert_close(half[:1], absent[:1])


def test_morphology_drop_uses_the_null_buffer():
    model = tiny()
    randomize(model)
    kw = inputs()
    dropped = model(**kw, drop_morphology=torch.ones(3, dtype=torch.bool))
    absent = model(kw["x"], kw["timestep"], ge=kw["ge"])
    torch.testing.assert_close(dropped, absent)
    assert "y_embedder.y_embedding" in model.state_dict()


def test_pma_respects_the_padding_mask():
    model = tiny(ge_injection="xattn", ge_pooling="pma", pma_seeds=2)
    randomize(model)
    kw = inputs(pma=True)
    out = model(**kw)
    # Changing padded tokens (row 0, positions 4..6) changes nothing; changing a real one does.
    poked = kw["ge_tokens"].clone()
    poked[0, 5] += 10
    torch.testing.assert_close(model(**{**kw, "ge_tokens": poked}), out)
    poked[0, 1] += 10
    assert not torch.allclose(model(**{**kw, "ge_tokens": poked})[0], out[0])


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny()
    randomize(model)
    kw = inputs()

    def grads():
        model.zero_grad()
        model(**kw).square().mean().backward()
        return [None if p.grad is None else p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.enable_gradient_checkpointing()
    assert model.gradient_checkpointing
    assert sum(g is not None for g in plain) > 20
    for a, b in zip(plain, grads(), strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b)


def test_save_load_roundtrip_gives_identical_outputs(tmp_path):
    model = tiny(ge_pooling="pma", pma_seeds=2)
    randomize(model)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    loaded = STMDiT.from_pretrained(tmp_path)
    kw = inputs(pma=True)
    assert torch.equal(model(**kw), loaded(**kw))
    assert loaded.config.ge_pooling == "pma"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"x": torch.randn(3, 4, 8, 8)}, r"x must have shape \(batch, 3, 8, 8\)"),
        ({"x": torch.randn(3, 3, 16, 16)}, r"x must have shape"),
        ({"ge": torch.randn(3, GE + 1)}, r"ge must have shape \(3, ge_dim=20\)"),
        ({"morphology": torch.randn(3, MORPH + 2)}, r"morphology must have shape"),
        ({"timestep": torch.tensor([1, 2])}, r"timestep must be a scalar or have shape \(3,\)"),
        ({"drop_ge": torch.zeros(3)}, r"drop_ge must be a bool tensor"),
        ({"ge": None, "ge_tokens": torch.randn(3, 5, TOKEN)}, r"ge_pooling='cls' reads the encoder vector"),
    ],
)
def test_bad_inputs_name_what_was_expected(change, message):
    model = tiny()
    with pytest.raises(ValueError, match=message):
        model(**{**inputs(), **change})


def test_bad_inputs_for_pma_and_no_ge_models():
    pma = tiny(ge_pooling="pma")
    kw = inputs(pma=True)
    with pytest.raises(ValueError, match="ge_tokens must have shape"):
        pma(**{**kw, "ge_tokens": torch.randn(3, 7, TOKEN + 1)})
    empty = kw["ge_mask"].clone()
    empty[2] = False
    with pytest.raises(ValueError, match=r"ge_mask rows \[2\] have no valid token"):
        pma(**{**kw, "ge_mask": empty})
    with pytest.raises(ValueError, match="ge_injection='none'"):
        tiny(ge_injection="none")(**inputs())
    with pytest.raises(ValueError, match="ge_injection must be one of"):
        tiny(ge_injection="film")
    with pytest.raises(ValueError, match="unknown preset"):
        STMDiT.from_preset("XXL")


def test_loading_a_missing_or_corrupt_checkpoint_fails_clearly(tmp_path):
    with pytest.raises(OSError):
        STMDiT.from_pretrained(tmp_path / "nowhere")
    model = tiny()
    model.save_pretrained(tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(Exception, match=r"(?i)safetensors|header|deserializ|unable to load|incomplete"):
        STMDiT.from_pretrained(tmp_path)
