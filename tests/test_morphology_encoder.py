import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image

from stmdit.encoders.morphology import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    UNI2H_KWARGS,
    UNI2H_MODEL,
    StainFeatureEncoder,
    TimmMorphologyEncoder,
    _resolve_layers,
    images_to_tensor,
)
from stmdit.hub import WeightsUnavailableError
from stmdit.io import UntrustedPickleError

NARROW = {"embed_dim": 48, "depth": 2, "num_heads": 4}


class PickledNote:
    """Stands for any Python object in a checkpoint, which only full unpickling can restore."""


def narrow_uni(seed=0):
    """UNI-2h's exact timm structure (SwiGLU MLP, 8 register tokens, LayerScale, no class
    position embedding) at small width, randomly initialised."""
    torch.manual_seed(seed)
    model = timm.create_model(
        UNI2H_MODEL, pretrained=False, **_resolve_layers({**UNI2H_KWARGS, **NARROW})
    ).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def reference_embedding(model, images):
    x = F.interpolate(images, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        return model(x)


@pytest.fixture
def uni_folder(tmp_path):
    model = narrow_uni()
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    return tmp_path, model


def test_uni2h_structure_loads_from_a_local_folder_and_matches_timm(uni_folder):
    folder, model = uni_folder
    state = model.state_dict()
    assert state["reg_token"].shape == (1, 8, 48) and "blocks.0.ls1.gamma" in state and "cls_token" in state
    enc = TimmMorphologyEncoder.uni2h(folder, **NARROW)
    images = torch.rand(3, 3, 256, 256)
    out = enc(images)
    assert out.shape == (3, 48) and enc.output_dim == 48 and enc.num_tokens == 1
    torch.testing.assert_close(out, reference_embedding(model, images))


def test_four_by_four_grid_embeds_each_crop(uni_folder):
    folder, model = uni_folder
    enc = TimmMorphologyEncoder.uni2h(folder, grid=4, **NARROW)
    images = torch.rand(2, 3, 128, 128)
    out = enc(images)
    assert out.shape == (2, 16, 48) and enc.num_tokens == 16
    # Token 6 is row 1, column 2 of the 4 x 4 grid of 32 px crops.
    crop = images[:, :, 32:64, 64:96]
    torch.testing.assert_close(out[:, 6], reference_embedding(model, crop))


def test_timm_encoder_roundtrips_through_save_pretrained(uni_folder, tmp_path):
    folder, _ = uni_folder
    enc = TimmMorphologyEncoder.uni2h(folder, **NARROW)
    enc.save_pretrained(tmp_path / "saved")
    loaded = TimmMorphologyEncoder.from_pretrained(tmp_path / "saved")
    images = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(loaded(images), enc(images))
    assert loaded.config.model_kwargs["reg_tokens"] == 8


def test_any_timm_backbone_by_name_from_a_local_file(tmp_path):
    backbone = timm.create_model("resnet18", pretrained=False, num_classes=0).eval()
    from safetensors.torch import save_file

    save_file(backbone.state_dict(), tmp_path / "model.safetensors")
    enc = TimmMorphologyEncoder.from_timm("resnet18", weights=tmp_path)
    assert enc(torch.rand(1, 3, 64, 64)).shape == (1, 512)


def test_weights_that_do_not_fit_or_need_pickle_are_refused(uni_folder, tmp_path):
    folder, _ = uni_folder
    with pytest.raises(ValueError, match="does not match the vit_giant_patch14_224 backbone"):
        TimmMorphologyEncoder.uni2h(folder, embed_dim=48, depth=3, num_heads=4)
    evil = tmp_path / "evil"
    evil.mkdir()
    state = dict(narrow_uni().state_dict())
    state["note"] = PickledNote()  # a custom class: not loadable with weights_only=True
    torch.save(state, evil / "pytorch_model.bin")
    with pytest.raises(UntrustedPickleError, match="trust_pickle=True"):
        TimmMorphologyEncoder.uni2h(evil, **NARROW)
    with pytest.raises(ValueError, match="unexpected \\['note'\\]"):
        TimmMorphologyEncoder.uni2h(evil, trust_pickle=True, **NARROW)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds none of"):
        TimmMorphologyEncoder.uni2h(tmp_path / "empty", **NARROW)


def test_hub_id_offline_without_cache_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(
        WeightsUnavailableError,
        match=r"not in the local cache and HF_HUB_OFFLINE is set.*huggingface-cli download",
    ):
        TimmMorphologyEncoder.uni2h("MahmoodLab/UNI2-h", **NARROW)


def test_images_to_tensor_accepts_the_usual_forms():
    arr = (np.random.default_rng(0).random((8, 8, 3)) * 255).astype(np.uint8)
    a = images_to_tensor(Image.fromarray(arr))
    b = images_to_tensor(arr)
    c = images_to_tensor(torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 255)
    assert a.shape == (1, 3, 8, 8)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)
    with pytest.raises(ValueError, match="RGB"):
        images_to_tensor(np.zeros((8, 8)))
    with pytest.raises(ValueError, match="share a size"):
        images_to_tensor([arr, arr[:4]])


def test_stain_features_track_haematoxylin_and_standardise():
    white = torch.ones(4, 3, 16, 16)
    purple = torch.tensor([0.35, 0.2, 0.55]).view(1, 3, 1, 1).expand(4, 3, 16, 16).clone()
    enc = StainFeatureEncoder(image_size=16)
    raw_white, raw_purple = enc.raw_features(white), enc.raw_features(purple)
    assert raw_purple[:, 0].mean() > raw_white[:, 0].mean() + 0.5  # mean haematoxylin density
    tiles = torch.rand(64, 3, 16, 16)
    enc.fit(tiles)
    z = enc(tiles)
    assert z.shape == (64, enc.output_dim)
    torch.testing.assert_close(z.mean(0), torch.zeros(enc.output_dim), atol=1e-4, rtol=0)
