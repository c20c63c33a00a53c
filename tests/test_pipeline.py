import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from stmdit import (
    PanelExpressionEncoder,
    StainFeatureEncoder,
    STMDiT,
    STMDiTPipeline,
    make_sampling_scheduler,
)

GENES = [f"G{i}" for i in range(10)]


@pytest.fixture
def adata():
    rng = np.random.default_rng(0)
    x = rng.poisson(5, size=(6, len(GENES))).astype(np.float32)
    return ad.AnnData(
        x, var=pd.DataFrame(index=GENES), obs=pd.DataFrame(index=[f"spot{i}" for i in range(6)])
    )


def make_pipe(adata, ge_injection="adaln+xattn", ge_pooling="cls"):
    ge = PanelExpressionEncoder.fit(adata, n_genes=8, layer=None, code_dim=7)
    morph = StainFeatureEncoder(image_size=16)
    model = STMDiT.from_preset("tiny", in_channels=3, sample_size=16, patch_size=4, morph_dim=morph.output_dim,
                               ge_dim=8, ge_token_dim=8, ge_injection=ge_injection, ge_pooling=ge_pooling)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return STMDiTPipeline(model, make_sampling_scheduler(pixel_space=True), ge, morph, None)


def run(pipe, **kw):
    kw.setdefault("num_inference_steps", 3)
    kw.setdefault("generator", torch.Generator().manual_seed(0))
    return pipe(progress=False, **kw)


def test_expression_in_images_out_in_every_output_type(adata):
    pipe = make_pipe(adata)
    pil = run(pipe, expression=adata[:2])
    assert len(pil.images) == 2 and isinstance(pil.images[0], Image.Image) and pil.images[0].size == (16, 16)
    arr = run(pipe, expression=adata[:2], output_type="np").images
    assert arr.shape == (2, 16, 16, 3) and arr.min() >= 0 and arr.max() <= 1
    np.testing.assert_allclose(np.asarray(pil.images[0]) / 255.0, arr[0], atol=1 / 255 + 1e-6)
    pt = run(pipe, expression=adata[:2], output_type="pt").images
    assert pt.shape == (2, 3, 16, 16)
    assert run(pipe, expression=adata[:2], output_type="latent").images.shape == (2, 3, 16, 16)
    assert pil.expression_alignment.coverage == 1.0


def test_gene_order_does_not_matter_and_missing_genes_are_reported(adata):
    pipe = make_pipe(adata)
    ref = run(pipe, expression=adata[:3], output_type="np").images
    shuffled = adata[:3, list(reversed(GENES))]
    np.testing.assert_array_equal(run(pipe, expression=shuffled, output_type="np").images, ref)
    # With one generator per image, a spot's tile does not depend on what else is in the batch.
    per_row = run(
        pipe,
        expression=adata[:3],
        output_type="np",
        generator=[torch.Generator().manual_seed(i) for i in range(3)],
    )
    series = pd.Series(adata.X[1], index=GENES)
    alone = run(
        pipe, expression=series, output_type="np", generator=[torch.Generator().manual_seed(1)]
    ).images
    np.testing.assert_allclose(alone[0], per_row.images[1], atol=1e-4)
    missing = pipe.ge_encoder.genes[0]
    with pytest.warns(UserWarning, match=f"7/8 panel genes found.*{missing}"):
        out = run(pipe, expression=series.drop(missing))
    assert out.expression_alignment.missing == [missing]


def test_precomputed_embeddings_give_the_same_images(adata):
    pipe = make_pipe(adata)
    tiles = torch.rand(3, 3, 16, 16)
    ref = run(pipe, expression=adata[:3], morphology=tiles, output_type="np").images
    ge, _ = pipe.ge_encoder.encode(adata[:3])
    out = run(
        pipe, expression_embeds=ge, morphology_embeds=pipe.morphology_encoder(tiles), output_type="np"
    ).images
    np.testing.assert_array_equal(out, ref)


def test_morphology_only_ge_only_unconditional_and_broadcast(adata):
    pipe = make_pipe(adata)
    tile = Image.fromarray((np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8))
    assert len(run(pipe, morphology=tile).images) == 1
    assert len(run(pipe, num_images=3).images) == 3
    # One tile shared by four spots' expression.
    assert len(run(pipe, expression=adata[:4], morphology=tile).images) == 4
    assert len(run(pipe, expression=adata[:2], num_images_per_spot=3).images) == 6


def test_pma_pipeline_uses_gene_tokens(adata):
    pipe = make_pipe(adata, ge_injection="xattn", ge_pooling="pma")
    a = run(pipe, expression=adata[:2], output_type="np").images
    b = run(pipe, expression=adata[2:4], output_type="np").images
    assert a.shape == (2, 16, 16, 3) and not np.allclose(a, b)


def test_whole_pipeline_saves_and_loads_as_one_folder(adata, tmp_path):
    pipe = make_pipe(adata)
    tiles = torch.rand(2, 3, 16, 16)
    ref = run(pipe, expression=adata[:2], morphology=tiles, output_type="np").images
    pipe.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"model_index.json", "transformer", "scheduler", "ge_encoder",
                                                   "morphology_encoder"}  # fmt: skip
    loaded = STMDiTPipeline.from_pretrained(tmp_path)
    assert loaded.ge_encoder.genes == pipe.ge_encoder.genes and loaded.vae is None
    assert loaded.scheduler.config.thresholding
    np.testing.assert_array_equal(
        run(loaded, expression=adata[:2], morphology=tiles, output_type="np").images, ref
    )


def test_bad_calls_say_what_is_wrong(adata):
    pipe = make_pipe(adata)
    no_ge = make_pipe(adata, ge_injection="none")
    with pytest.raises(ValueError, match="trained without gene expression"):
        run(no_ge, expression=adata[:1])
    with pytest.raises(ValueError, match="expression or expression_embeds, not both"):
        run(pipe, expression=adata[:1], expression_embeds=torch.zeros(1, 8))
    with pytest.raises(ValueError, match="different numbers of spots"):
        run(pipe, expression=adata[:2], morphology=torch.rand(3, 3, 16, 16))
    with pytest.raises(ValueError, match="output_type"):
        run(pipe, expression=adata[:1], output_type="jpeg")
    with pytest.raises(ValueError, match=r"ge must have shape \(1, ge_dim=8\)"):
        run(pipe, expression_embeds=torch.zeros(1, 5))
    with pytest.raises(ValueError, match="float images must lie in"):
        run(pipe, morphology=torch.full((1, 3, 16, 16), 255.0))


def test_sampling_progress_is_diffusers_progress_bar(adata, capsys, random_inception_weights):
    pipe = make_pipe(adata)
    kw = {"expression": adata[:2], "num_inference_steps": 3, "generator": torch.Generator().manual_seed(0)}
    pipe(**kw)
    assert "3/3" in capsys.readouterr().err  # one bar step per denoising step
    pipe.set_progress_bar_config(disable=True)
    quiet = pipe(**{**kw, "generator": torch.Generator().manual_seed(0)}, output_type="np").images
    assert capsys.readouterr().err == ""
    pipe.set_progress_bar_config(disable=False)
    assert pipe(**{**kw, "generator": torch.Generator().manual_seed(0)}, output_type="np", progress=False)
    assert capsys.readouterr().err == ""  # progress=False: no bar whatever the configuration
    np.testing.assert_array_equal(quiet, run(pipe, expression=adata[:2], output_type="np").images)

    from stmdit.evaluate.image_metrics import InceptionFeatures

    tiles = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    InceptionFeatures(random_inception_weights, batch_size=2, download=False)(tiles)
    assert "Inception features" in capsys.readouterr().err
    InceptionFeatures(random_inception_weights, batch_size=2, download=False, progress=False)(tiles)
    assert "Inception features" not in capsys.readouterr().err
