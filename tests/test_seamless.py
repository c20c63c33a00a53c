"""Seamless sections: joint (MultiDiffusion) denoising of overlapping windows, pinned to the
single-tile sampler, with position-keyed noise and expression interpolated between spots."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import random_window_pipe
from stmdit import PanelExpressionEncoder, STMDiTPipeline, make_sampling_scheduler
from stmdit.diffusion import Condition, initial_noise, sample
from stmdit.sections import seamless
from stmdit.sections.seamless import (
    decode_canvas,
    denoise_canvas,
    expression_for_encoder,
    interpolate_expression,
    pitch_um,
    position_noise,
    window_grid,
)

S = 16  # the tiny model's tile side
STEPS = 5
GUIDANCE = {"guidance_scale_morphology": 1.5, "guidance_scale_ge": 2.0}


@pytest.fixture(scope="module")
def pipe():
    return random_window_pipe()


def conditions(n: int, seed: int = 1, scale: float = 1.0) -> Condition:
    g = torch.Generator().manual_seed(seed)
    return Condition(morphology=torch.randn(n, 6, generator=g), ge=torch.randn(n, 5, generator=g) * scale)


# -- geometry and noise -----------------------------------------------------------------------------------


def test_window_grid_by_hand():
    corners = window_grid(100, 70, 32, 24)
    assert corners == [(y, x) for y in (0, 24, 48, 68) for x in (0, 24, 38)]
    covered = np.zeros((100, 70), int)
    for y, x in corners:
        covered[y : y + 32, x : x + 32] += 1
    assert (covered > 0).all()
    assert window_grid(32, 32, 32, 8) == [(0, 0)]
    with pytest.raises(ValueError, match=r"\(31 x 70\).*\(32 x 32\)"):
        window_grid(31, 70, 32, 24)
    with pytest.raises(ValueError, match="stride"):
        window_grid(100, 70, 32, 40)


def test_position_noise_depends_only_on_seed_and_position():
    big = position_noise(7, 0, 0, 150, 140, 3, block=64)
    assert big.shape == (3, 150, 140)
    assert abs(float(big.mean())) < 0.02 and abs(float(big.std()) - 1) < 0.02
    # A sub-region crossing block borders, asked for before or after, is the crop.
    sub = position_noise(7, 50, 60, 40, 70, 3, block=64)
    torch.testing.assert_close(sub, big[:, 50:90, 60:130], rtol=0, atol=0)
    torch.testing.assert_close(position_noise(7, 0, 0, 150, 140, 3, block=64), big, rtol=0, atol=0)
    # Another seed, or another position, gives other noise; no two blocks repeat.
    assert not torch.allclose(position_noise(8, 50, 60, 40, 70, 3, block=64), sub)
    assert not torch.allclose(big[:, :64, :64], big[:, 64:128, :64])


# -- expression at window centres --------------------------------------------------------------------


def test_interpolation_by_hand():
    xy = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 20.0]])
    expr = np.array([[1.0, 0.0], [3.0, 2.0], [5.0, 4.0]])
    values, mask = interpolate_expression(xy, expr, np.array([[4.0, 3.0]]), bandwidth=10.0)
    d2 = np.array([16 + 9, 36 + 9, 16 + 289])
    w = np.exp(-d2 / 200.0)
    np.testing.assert_allclose(values[0], w @ expr / w.sum(), rtol=1e-6)
    assert mask.tolist() == [True]

    # A spot far from the others with a small bandwidth: its own value; out of range: masked.
    xy = np.array([[0.0, 0.0], [1000.0, 0.0], [1000.0, 100.0]])
    values, mask = interpolate_expression(xy, expr, np.array([[2.0, 1.0], [500.0, 500.0]]), bandwidth=5.0)
    np.testing.assert_allclose(values[0], expr[0])
    assert mask.tolist() == [True, False] and (values[1] == 0).all()


def test_pitch_of_a_square_grid():
    yy, xx = np.mgrid[0:5, 0:7]
    assert pitch_um(np.c_[xx.ravel(), yy.ravel()] * 100.0 + 37.0) == pytest.approx(100.0)


def test_interpolated_log_expression_survives_the_encoder():
    genes = [f"g{i}" for i in range(5)]
    encoder = PanelExpressionEncoder(genes=genes)  # mean 0, std 1: ge is log1p CP10k itself
    z = np.array([[0.0, 1.5, 3.2, 0.1, 7.0], [2.0, 0.0, 0.0, 4.0, 1.0]], np.float32)
    out, _ = encoder.encode(expression_for_encoder(z, genes))
    torch.testing.assert_close(out["ge"], torch.from_numpy(z), rtol=1e-5, atol=1e-5)


# -- the joint loop -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("pixel_space", [True, False], ids=["ddim-clip", "dpm-solver++"])
@pytest.mark.parametrize("weights", ["cosine", "uniform"])
def test_one_window_is_the_single_tile_sampler(pixel_space, weights):
    pipe = random_window_pipe(pixel_space)
    cond = conditions(1)
    noise = initial_noise((1, 3, S, S), torch.Generator().manual_seed(3))
    reference = sample(pipe.transformer, pipe.scheduler, cond, num_inference_steps=STEPS,
                       generator=torch.Generator().manual_seed(3), progress=False,
                       guidance_morph=1.5, guidance_ge=2.0)[0]  # fmt: skip
    canvas = denoise_canvas(pipe, S, S, cond, [(0, 0)], seed=0, noise=noise[0], num_inference_steps=STEPS,
                            weights=weights, progress=False, **GUIDANCE)  # fmt: skip
    diff = float((canvas - reference).abs().max())
    print(f"one window vs sample ({pixel_space=}, {weights}): max |diff| {diff:.2e}")
    assert float(reference.std()) > 0.05  # a real image, not a constant
    torch.testing.assert_close(canvas, reference, rtol=1e-5, atol=1e-5)


def test_batch_size_does_not_matter_and_reruns_repeat(pipe):
    corners = window_grid(24, 40, S, 8)
    assert len(corners) == 8
    cond = conditions(len(corners))
    ge_available = [True] * 8
    ge_available[5] = False  # one window guided without GE
    kwargs = dict(seed=11, num_inference_steps=STEPS, ge_available=ge_available, progress=False, **GUIDANCE)
    one = denoise_canvas(pipe, 24, 40, cond, corners, batch_size=1, **kwargs)
    three = denoise_canvas(pipe, 24, 40, cond, corners, batch_size=3, **kwargs)
    again = denoise_canvas(pipe, 24, 40, cond, corners, batch_size=3, **kwargs)
    print(f"batch 1 vs 3: max |diff| {float((one - three).abs().max()):.2e}")
    # Only float rounding may differ: CPU kernels pick their blocking by batch shape, and the
    # rounding differences grow over the steps (4e-5 on some CPUs, well under a grey level).
    torch.testing.assert_close(one, three, rtol=1e-4, atol=1e-4)
    assert torch.equal(three, again)
    # The GE mask matters: with GE everywhere the canvas differs.
    everywhere = denoise_canvas(pipe, 24, 40, cond, corners, batch_size=3, **{**kwargs, "ge_available": None})
    assert not torch.allclose(everywhere, three, atol=1e-3)


class SmoothDenoiser(torch.nn.Module):
    """The ideal epsilon for x0 = a flat colour set by the GE row (grey when GE is dropped) plus
    a smooth function of x_t: tiles come out smooth, so a seam is visible as a jump, unlike the
    random transformer's pixel noise."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.config = SimpleNamespace(ge_injection="xattn", in_channels=3, out_channels=3, sample_size=S)
        self.alphas_cumprod = alphas_cumprod
        g = torch.exp(-(torch.arange(-2.0, 3.0) ** 2) / 2)
        self.blur = (torch.outer(g, g) / g.sum() ** 2).expand(3, 1, 5, 5)

    def forward(self, x, t, morphology=None, ge=None, ge_tokens=None, ge_mask=None, drop_morphology=None,
                drop_ge=None):  # fmt: skip
        keep_g = torch.zeros(x.shape[0]) if ge is None else (~drop_ge).float()
        colour = torch.tanh(ge[:, :3]) * keep_g[:, None] if ge is not None else torch.zeros(x.shape[0], 3)
        smooth = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (2,) * 4, mode="replicate"), self.blur,
                                            groups=3)  # fmt: skip
        x0 = 0.6 * colour[:, :, None, None] + 0.3 * torch.tanh(smooth)
        abar = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        return (x - abar.sqrt() * x0) / (1 - abar).sqrt()


def _jumps(canvas: torch.Tensor, seam: int) -> tuple[float, float]:
    """Mean |difference| between neighbouring columns/rows across the seam, and elsewhere."""
    dx = (canvas[:, :, 1:] - canvas[:, :, :-1]).abs().mean(dim=(0, 1))
    dy = (canvas[:, 1:, :] - canvas[:, :-1, :]).abs().mean(dim=(0, 2))
    at = (float(dx[seam - 1]) + float(dy[seam - 1])) / 2
    rest = [i for i in range(len(dx)) if i != seam - 1]
    return at, (float(dx[rest].mean()) + float(dy[rest].mean())) / 2


def joint_and_alone(pipe, side: int = 24, seed: int = 5):
    """A 2 x 2 grid of windows overlapping by 8 px, with clearly different GE per window:
    denoised jointly, and each window alone from the same noise it has in the canvas."""
    corners = window_grid(side, side, S, 8)
    assert corners == [(0, 0), (0, 8), (8, 0), (8, 8)]
    cond = conditions(4, seed=2, scale=3.0)
    kwargs = dict(num_inference_steps=STEPS, progress=False, **GUIDANCE)
    joint = denoise_canvas(pipe, side, side, cond, corners, seed=seed, **kwargs)
    alone = [
        denoise_canvas(
            pipe,
            S,
            S,
            Condition(morphology=cond.morphology[[i]], ge=cond.ge[[i]]),
            [(0, 0)],
            seed=seed,
            noise=position_noise(seed, y, x, S, S, 3),
            **kwargs,
        )  # fmt: skip
        for i, (y, x) in enumerate(corners)
    ]
    # The joint overlap (the central 8 x 8) against each window's own result there.
    gaps = [float((joint[:, 8:16, 8:16] - tile[:, 8 - y : 16 - y, 8 - x : 16 - x]).abs().mean())
            for tile, (y, x) in zip(alone, corners, strict=True)]  # fmt: skip
    print(f"overlap mean |joint - alone| per window: {[round(g, 3) for g in gaps]}")
    # Pasted: every pixel from the window whose centre is nearest, so the seams run through the middle.
    seam = side // 2
    pasted = torch.empty_like(joint)
    for tile, (y, x) in zip(alone, corners, strict=True):
        ys, xs = (
            slice(0, seam) if y == 0 else slice(seam, side),
            slice(0, seam) if x == 0 else slice(seam, side),
        )
        pasted[:, ys, xs] = tile[:, ys.start - y : ys.stop - y, xs.start - x : xs.stop - x]
    return joint, pasted, gaps


def test_fusion_mixes_the_transformer_windows_in_the_overlap(pipe):
    joint, _, gaps = joint_and_alone(pipe)
    assert min(gaps) > 0.05 and float(joint.abs().max()) <= 1.0 + 1e-5


def test_fusion_joins_windows_across_their_borders():
    scheduler = make_sampling_scheduler(pixel_space=True)
    smooth = SimpleNamespace(transformer=SmoothDenoiser(scheduler.alphas_cumprod), scheduler=scheduler)
    joint, pasted, gaps = joint_and_alone(smooth)
    joint_at, joint_rest = _jumps(joint, 12)
    pasted_at, pasted_rest = _jumps(pasted, 12)
    print(f"jump across the seam / elsewhere: joint {joint_at:.3f} / {joint_rest:.3f}, "
          f"pasted {pasted_at:.3f} / {pasted_rest:.3f}")  # fmt: skip
    assert min(gaps) > 0.02
    assert joint_at < 0.5 * pasted_at
    assert joint_at / joint_rest < pasted_at / pasted_rest


def test_bad_windows_are_refused(pipe):
    with pytest.raises(ValueError, match="inside"):
        denoise_canvas(pipe, 20, 20, Condition(), [(0, 8)], seed=0, num_inference_steps=2, progress=False)
    with pytest.raises(ValueError, match="uncovered"):
        denoise_canvas(pipe, 20, 20, Condition(), [(0, 0)], seed=0, num_inference_steps=2, progress=False)
    with pytest.raises(ValueError, match="condition rows"):
        denoise_canvas(pipe, 16, 16, conditions(2), [(0, 0)], seed=0, num_inference_steps=2, progress=False)


def test_windowed_decode_of_a_constant_canvas_is_the_decode_of_one_window(monkeypatch):
    """Windows decoded apart and blended give back a constant canvas exactly, at the VAE's scale."""
    vae = SimpleNamespace(config=SimpleNamespace(block_out_channels=[1, 1]))  # 2 pixels per latent
    monkeypatch.setattr(
        seamless,
        "decode_latents",
        lambda vae, z, batch_size: z[:, :3].repeat_interleave(2, -1).repeat_interleave(2, -2),
    )
    latents = torch.full((16, 14, 14), 0.25)
    corners = window_grid(14, 14, 8, 6)
    for batch_size in (1, 3):
        canvas = decode_canvas(vae, latents, corners, window=8, batch_size=batch_size)
        assert canvas.shape == (3, 28, 28)
        torch.testing.assert_close(canvas, torch.full((3, 28, 28), 0.25))
    # A pixel-space canvas ([-1, 1]) is only rescaled to [0, 1].
    torch.testing.assert_close(
        decode_canvas(None, torch.zeros(3, 5, 7), corners, 8), torch.full((3, 5, 7), 0.5)
    )


def test_dynamic_thresholding_is_refused_on_a_canvas_naming_the_fix(pipe):
    dynamic = make_sampling_scheduler(pipe.scheduler, pixel_space=True, x0_threshold="dynamic")
    canvas_pipe = STMDiTPipeline(pipe.transformer, dynamic)
    with pytest.raises(ValueError, match="x0_threshold='clip'"):
        denoise_canvas(
            canvas_pipe, S, S, Condition(), [(0, 0)], seed=0, num_inference_steps=1, progress=False
        )
