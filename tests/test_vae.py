import pytest
import torch
from diffusers import AutoencoderKL

from stmdit import STMDiT, STMDiTPipeline, make_sampling_scheduler
from stmdit.encoders.vae import SD35_SCALE, SD35_SHIFT, decode_latents, encode_images, load_vae


def tiny_sd35_like_vae():
    """The SD3.5 VAE's structure (16 latent channels, shift and scale factors) at small width."""
    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                         latent_channels=16, norm_num_groups=4, sample_size=16, shift_factor=SD35_SHIFT,
                         scaling_factor=SD35_SCALE, use_quant_conv=False, use_post_quant_conv=False).eval()  # fmt: skip


@pytest.fixture
def vae_folder(tmp_path):
    vae = tiny_sd35_like_vae()
    vae.save_pretrained(tmp_path / "model" / "vae")
    return tmp_path / "model", vae


def test_vae_loads_from_a_model_folder_or_the_vae_folder(vae_folder):
    root, vae = vae_folder
    for source in (root, root / "vae"):
        loaded = load_vae(source)
        assert loaded.config.shift_factor == SD35_SHIFT and loaded.config.scaling_factor == SD35_SCALE
        assert not any(p.requires_grad for p in loaded.parameters())
    with pytest.raises(FileNotFoundError, match="has no VAE"):
        load_vae(root.parent)


def test_latents_use_shift_and_scale_and_decode_back(vae_folder):
    root, vae = vae_folder
    loaded = load_vae(root)
    images = torch.rand(3, 3, 16, 16)
    z = encode_images(loaded, images, batch_size=2)
    assert z.shape == (3, 16, 8, 8)
    with torch.no_grad():
        mean = vae.encode(images * 2 - 1).latent_dist.mean
        torch.testing.assert_close(z, (mean - SD35_SHIFT) * SD35_SCALE)
        expected = ((vae.decode(mean).sample + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(decode_latents(loaded, z), expected, atol=1e-5, rtol=1e-5)


def test_pixel_space_codec_has_the_same_interface():
    images = torch.rand(2, 3, 8, 8)
    z = encode_images(None, images)
    torch.testing.assert_close(z, images * 2 - 1)
    torch.testing.assert_close(decode_latents(None, z), images)


def test_pipeline_with_a_vae_saves_and_loads_as_one_folder(vae_folder, tmp_path):
    root, _ = vae_folder
    vae = load_vae(root)
    model = STMDiT.from_preset("tiny", in_channels=16, sample_size=8, patch_size=2, morph_dim=4, ge_dim=3)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    pipe = STMDiTPipeline(model, make_sampling_scheduler(), vae=vae)
    kw = {"expression_embeds": torch.randn(2, 3), "morphology_embeds": torch.randn(2, 4), "num_inference_steps": 2,
          "output_type": "np", "progress": False}  # fmt: skip
    out = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    assert out.shape == (2, 16, 16, 3)
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = STMDiTPipeline.from_pretrained(tmp_path / "pipe")
    assert loaded.vae.config.scaling_factor == SD35_SCALE
    torch.testing.assert_close(torch.from_numpy(loaded(generator=torch.Generator().manual_seed(0), **kw).images),
                               torch.from_numpy(out))  # fmt: skip
