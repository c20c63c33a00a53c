"""Interval guidance (Kynkäänniemi et al. 2024) for the GE scale: applied only at noise levels in
(low, high], the plain GE condition (scale 1) elsewhere."""

import pytest
import torch

from stmdit import STMDiT
from stmdit.diffusion import Condition, guided_prediction, make_sampling_scheduler, noise_level, sample


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = STMDiT.from_preset("tiny", in_channels=3, sample_size=8, patch_size=2, morph_dim=6, ge_dim=5)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return model.eval()


COND = Condition(morphology=torch.randn(2, 6, generator=torch.Generator().manual_seed(1)),
                 ge=torch.randn(2, 5, generator=torch.Generator().manual_seed(2)))  # fmt: skip


def run(model, **kw):
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    return sample(model, make_sampling_scheduler(), COND, guidance_morph=1.5, num_inference_steps=6, generator=gens,
                  progress=False, **kw)  # fmt: skip


def test_noise_level_is_the_noise_to_signal_ratio():
    sched = make_sampling_scheduler()
    alpha_bar = float(sched.alphas_cumprod[500])
    assert noise_level(sched, 500) == pytest.approx(((1 - alpha_bar) / alpha_bar) ** 0.5)
    assert noise_level(sched, 999) > noise_level(sched, 500) > noise_level(sched, 0)


def test_interval_guidance_matches_a_hand_written_loop(model):
    low, high = 0.5, 3.0
    sched = make_sampling_scheduler()
    sched.set_timesteps(6)
    inside = [low < noise_level(sched, t) <= high for t in sched.timesteps]
    assert any(inside) and not all(inside)  # the interval splits this schedule

    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    x = torch.stack([torch.randn(3, 8, 8, generator=g) for g in gens]) * sched.init_noise_sigma
    for t, guided in zip(sched.timesteps, inside, strict=True):
        eps = guided_prediction(model, sched.scale_model_input(x, t), t, COND, 1.5, 4.0 if guided else 1.0)
        x = sched.step(eps, t, x).prev_sample
    got = run(model, guidance_ge=4.0, guidance_ge_interval=(low, high))
    torch.testing.assert_close(got, x)
    assert not torch.allclose(got, run(model, guidance_ge=4.0), atol=1e-4)
    assert not torch.allclose(got, run(model, guidance_ge=1.0), atol=1e-4)


def test_interval_covering_everything_or_nothing(model):
    torch.testing.assert_close(
        run(model, guidance_ge=4.0, guidance_ge_interval=(0.0, 1e9)), run(model, guidance_ge=4.0)
    )
    torch.testing.assert_close(
        run(model, guidance_ge=4.0, guidance_ge_interval=(1e8, 1e9)), run(model, guidance_ge=1.0)
    )
    with pytest.raises(ValueError, match="guidance_ge_interval must be"):
        run(model, guidance_ge=4.0, guidance_ge_interval=(3.0, 1.0))


def test_the_pipeline_passes_the_interval_to_the_sampler():
    import anndata as ad
    import numpy as np

    from stmdit import PanelExpressionEncoder, STMDiTPipeline

    rng = np.random.default_rng(0)
    spots = ad.AnnData(rng.poisson(5, size=(4, 10)).astype(np.float32))
    spots.var_names = [f"G{i}" for i in range(10)]
    ge = PanelExpressionEncoder.fit(spots, n_genes=8, layer=None, code_dim=7)
    torch.manual_seed(0)
    model = STMDiT.from_preset("tiny", in_channels=3, sample_size=8, patch_size=2, morph_dim=6, ge_dim=8)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    pipe = STMDiTPipeline(model, make_sampling_scheduler(pixel_space=True), ge, None, None)

    def images(guidance_ge=4.0, **kw):
        return pipe(spots, guidance_ge=guidance_ge, num_inference_steps=4, output_type="np", progress=False,
                    generator=torch.Generator().manual_seed(0), **kw).images  # fmt: skip

    outside_everywhere = images(guidance_ge_interval=(1e8, 1e9))
    np.testing.assert_allclose(outside_everywhere, images(guidance_ge=1.0), atol=1e-6)
    assert not np.allclose(outside_everywhere, images(), atol=1e-4)
