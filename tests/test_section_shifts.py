"""Shifted windows: ``denoise_canvas`` with one window grid per phase (the grid moves from step
to step), in memory and out of core, resumable; the seam grid of a fixed grid spread out."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import random_window_pipe
from stmdit import make_sampling_scheduler
from stmdit.diffusion import Condition
from stmdit.sections import canvas
from stmdit.sections.metrics import seam_score
from stmdit.sections.seamless import (
    denoise_canvas,
    grid_offsets,
    patch_phase_grid,
    position_noise,
    window_grid,
    window_schedule,
)
from stmdit.tiles import to_uint8

S, STRIDE = 16, 10  # the tiny model's tile side; the grid's stride
H, W, PAD = 36, 40, STRIDE  # the section; padded by a stride on each side for the shifted grids
OFFSETS = grid_offsets(STRIDE, 4)
GRIDS = [window_grid(H + 2 * PAD, W + 2 * PAD, S, STRIDE, offset) for offset in OFFSETS]
KWARGS = {"seed": 3, "num_inference_steps": 3, "guidance_scale_morphology": 1.5, "guidance_scale_ge": 2.0,
          "batch_size": 4, "progress": False}  # fmt: skip
SHIFTED = {"origin": (-PAD, -PAD), **KWARGS}


@pytest.fixture(scope="module")
def pipes():
    return {"ddim": random_window_pipe(True), "dpm-solver++": random_window_pipe(False)}


def conditions(grid, seed: int = 1) -> Condition:
    g = torch.Generator().manual_seed(seed)
    return Condition(
        morphology=torch.randn(len(grid), 6, generator=g), ge=torch.randn(len(grid), 5, generator=g)
    )


def phase_inputs(seed: int = 1):
    """Per-phase Conditions and GE masks (some windows without GE) of GRIDS."""
    conds = [conditions(grid, seed + k) for k, grid in enumerate(GRIDS)]
    masks = [[i % 3 != 1 for i in range(len(grid))] for grid in GRIDS]
    return conds, masks


def steps_seen():
    calls = []
    return calls, lambda done, total: calls.append((done, total))


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(canvas, "ROW_CHUNK", 16)


def test_grids_and_offsets():
    # The offsets: in [0, stride), each axis's spread evenly (one per stride / count), first (0, 0).
    offsets = grid_offsets(23)
    assert offsets[0] == (0, 0) and len(set(offsets)) == 8
    for axis in (0, 1):  # floor(k * 23 / 8): one in every eighth of the stride
        assert sorted(o[axis] for o in offsets) == [0, 2, 5, 8, 11, 14, 17, 20]
    with pytest.raises(ValueError, match="power of two"):
        grid_offsets(23, 6)
    # An unmoved grid is window_grid's; a moved one starts at the offset, edge windows flush.
    assert window_grid(100, 70, 32, 24, (0, 0)) == window_grid(100, 70, 32, 24)
    assert window_grid(100, 70, 32, 24, (5, 20)) == [(y, x) for y in (0, 5, 29, 53, 68) for x in (0, 20, 38)]
    for grid in GRIDS:  # every phase covers the padded canvas
        covered = torch.zeros(H + 2 * PAD, W + 2 * PAD)
        for y, x in grid:
            covered[y : y + S, x : x + S] += 1
        assert (covered > 0).all()


def test_patch_phase_grids_and_the_schedule():
    h, w, window, stride, patch = 120, 100, 32, 23, 4
    union = patch_phase_grid(h, w, window, stride, (5, 17), patch)
    moved = [window_grid(h, w, window, stride, ((5 + j) % stride, (17 + j) % stride)) for j in range(patch)]
    assert union == sorted(set().union(*moved)) and len(union) == len(set(union))
    # Inside the canvas (away from the flush edge windows) windows begin at every patch phase.
    for axis in (0, 1):
        starts = {c[axis] for c in union if 0 < c[axis] < (h, w)[axis] - window}
        assert {v % patch for v in starts} == set(range(patch))
    assert patch_phase_grid(h, w, window, stride, (5, 17), 1) == window_grid(h, w, window, stride, (5, 17))
    # 10 steps over 4 offsets, the last 3 in patch-phase grids: one per offset those steps use.
    offsets = grid_offsets(stride, 4)
    grids, order = window_schedule(h, w, window, stride, offsets, patch, 10, 3)
    assert order == [0, 1, 2, 3, 0, 1, 2, 4, 5, 6]
    assert grids[:4] == [window_grid(h, w, window, stride, o) for o in offsets]
    assert grids[4:] == [patch_phase_grid(h, w, window, stride, offsets[i], patch) for i in (3, 0, 1)]
    assert window_schedule(h, w, window, stride, offsets, patch, 5, 0)[1] == [0, 1, 2, 3, 0]
    with pytest.raises(ValueError, match="patch_phase_steps"):
        window_schedule(h, w, window, stride, offsets, patch, 5, 6)


def test_phase_order_chooses_each_steps_grid(pipes, small_chunks, tmp_path):
    pipe, (conds, masks) = pipes["ddim"], phase_inputs()
    h, w = H + 2 * PAD, W + 2 * PAD
    cycled = denoise_canvas(pipe, h, w, conds, GRIDS, ge_available=masks, **SHIFTED)
    same = denoise_canvas(pipe, h, w, conds, GRIDS, ge_available=masks, phase_order=[0, 1, 2], **SHIFTED)
    assert torch.equal(same, cycled)
    reordered = denoise_canvas(pipe, h, w, conds, GRIDS, ge_available=masks, phase_order=[3, 3, 0], **SHIFTED)
    assert not torch.allclose(reordered, cycled, atol=1e-3)
    on_disk = denoise_canvas(pipe, h, w, conds, GRIDS, ge_available=masks, phase_order=[3, 3, 0],
                             workdir=tmp_path / "w", **SHIFTED)  # fmt: skip
    assert torch.equal(on_disk.load(), reordered.float())
    for bad in ([0, 1], [0, 1, 4], [0, -1, 2]):
        with pytest.raises(ValueError, match="phase_order needs one phase index"):
            denoise_canvas(pipe, h, w, conds, GRIDS, ge_available=masks, phase_order=bad, **SHIFTED)


def test_one_phase_is_the_fixed_grid(pipes):
    """A list of one grid, or of the same grid repeated, is the fixed-grid canvas exactly."""
    pipe, corners = pipes["ddim"], window_grid(H, W, S, STRIDE)
    cond, mask = conditions(corners), [i % 2 == 0 for i in range(len(corners))]
    fixed = denoise_canvas(pipe, H, W, cond, corners, ge_available=mask, **KWARGS)
    assert torch.equal(denoise_canvas(pipe, H, W, [cond], [corners], ge_available=[mask], **KWARGS), fixed)
    repeated = denoise_canvas(pipe, H, W, [cond] * 3, [corners] * 3, ge_available=[mask] * 3, **KWARGS)
    assert torch.equal(repeated, fixed)


def test_padding_does_not_change_the_noise():
    """A denoiser predicting zero noise steps every pixel by itself: the section cropped from the
    padded canvas (origin at minus the padding) is the unpadded canvas, to the bit."""

    class Zero(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(()))
            self.config = SimpleNamespace(ge_injection="none", in_channels=3, out_channels=3, sample_size=S)

        def forward(self, x, t, **kwargs):
            return x * 0

    pipe = SimpleNamespace(transformer=Zero(), scheduler=make_sampling_scheduler(pixel_space=True))
    kwargs = {"seed": 5, "num_inference_steps": 2, "progress": False}
    plain = denoise_canvas(pipe, H, W, Condition(), window_grid(H, W, S, STRIDE), **kwargs)
    padded = denoise_canvas(pipe, H + 2 * PAD, W + 2 * PAD, [Condition()] * len(GRIDS), GRIDS,
                            origin=(-PAD, -PAD), **kwargs)  # fmt: skip
    assert torch.equal(padded[:, PAD:-PAD, PAD:-PAD], plain)
    noise = position_noise(5, -PAD, -PAD, H + 2 * PAD, W + 2 * PAD, 3)
    assert torch.equal(noise[:, PAD:-PAD, PAD:-PAD], position_noise(5, 0, 0, H, W, 3))
    # Without the origin the padded canvas' noise is another crop.
    unshifted = denoise_canvas(pipe, H + 2 * PAD, W + 2 * PAD, [Condition()] * len(GRIDS), GRIDS, **kwargs)
    assert not torch.allclose(unshifted[:, PAD:-PAD, PAD:-PAD], plain)


@pytest.mark.parametrize("sampler", ["ddim", "dpm-solver++"])
def test_shifted_out_of_core_equals_in_memory(pipes, sampler, small_chunks, tmp_path):
    pipe, (conds, masks) = pipes[sampler], phase_inputs()
    h, w = H + 2 * PAD, W + 2 * PAD
    calls_memory, on_step = steps_seen()
    reference = denoise_canvas(pipe, h, w, conds, GRIDS, ge_available=masks, on_step=on_step, **SHIFTED)
    calls, on_step = steps_seen()
    result = denoise_canvas(pipe, h, w, conds, GRIDS, ge_available=masks, workdir=tmp_path / "w", on_step=on_step,
                            **SHIFTED)  # fmt: skip
    print(
        f"{sampler}: shifted out of core vs in memory, max |diff| {float((result.load() - reference).abs().max()):.1e}"
    )
    assert torch.equal(result.load(), reference.float())
    assert calls == calls_memory == [(1, 3), (2, 3), (3, 3)]
    # The phases matter: the fixed first grid gives another canvas.
    fixed = denoise_canvas(pipe, h, w, conds[0], GRIDS[0], ge_available=masks[0], **SHIFTED)
    assert not torch.allclose(fixed, reference, atol=1e-3)
    # A crop of the canvas on disk reads as the tensor's crop.
    crop = result.crop(PAD, PAD, H, W)
    assert crop.shape == (3, H, W) and torch.equal(crop.load(), reference[:, PAD:-PAD, PAD:-PAD].float())
    assert torch.equal(crop.rows(5, 30), reference[:, PAD + 5 : PAD + 30, PAD:-PAD].float())


class Interrupted(Exception):
    pass


def test_a_shifted_run_resumes(pipes, small_chunks, tmp_path):
    pipe, (conds, masks), workdir = pipes["dpm-solver++"], phase_inputs(), tmp_path / "w"
    h, w = H + 2 * PAD, W + 2 * PAD
    reference = denoise_canvas(pipe, h, w, conds, GRIDS, ge_available=masks, **SHIFTED)

    def stop_after_one(done, total):
        if done == 1:
            raise Interrupted

    with pytest.raises(Interrupted):
        denoise_canvas(pipe, h, w, conds, GRIDS, ge_available=masks, workdir=workdir, on_step=stop_after_one,
                       **SHIFTED)  # fmt: skip
    calls, on_step = steps_seen()
    resumed = denoise_canvas(pipe, h, w, conds, GRIDS, ge_available=masks, workdir=workdir, on_step=on_step,
                             **SHIFTED)  # fmt: skip
    assert calls == [(2, 3), (3, 3)]
    assert torch.equal(resumed.load(), reference.float())
    # Other grids (the phases in another order) or another origin: started over.
    for changes in ({"corners": GRIDS[::-1], "conds": conds[::-1], "masks": masks[::-1]}, {"origin": (0, 0)}):
        calls, on_step = steps_seen()
        kwargs = {**SHIFTED, "origin": changes.get("origin", SHIFTED["origin"])}
        denoise_canvas(pipe, h, w, changes.get("conds", conds), changes.get("corners", GRIDS),
                       ge_available=changes.get("masks", masks), workdir=workdir, on_step=on_step, **kwargs)  # fmt: skip
        assert calls == [(1, 3), (2, 3), (3, 3)], changes
    # The same grids in another order of steps: started over, not the finished canvas of before.
    denoise_canvas(pipe, h, w, conds, GRIDS, ge_available=masks, workdir=workdir, **SHIFTED)
    calls, on_step = steps_seen()
    reordered = denoise_canvas(pipe, h, w, conds, GRIDS, ge_available=masks, workdir=workdir, on_step=on_step,
                               phase_order=[3, 3, 0], **SHIFTED)  # fmt: skip
    assert calls == [(1, 3), (2, 3), (3, 3)]
    expected = denoise_canvas(pipe, h, w, conds, GRIDS, ge_available=masks, phase_order=[3, 3, 0], **SHIFTED)
    assert torch.equal(reordered.load(), expected.float())


def test_bad_phases_are_refused(pipes):
    pipe, (conds, _) = pipes["ddim"], phase_inputs()
    h, w = H + 2 * PAD, W + 2 * PAD
    with pytest.raises(ValueError, match="one grid, Condition and GE mask per phase"):
        denoise_canvas(pipe, h, w, conds[:2], GRIDS, **SHIFTED)
    with pytest.raises(ValueError, match="condition rows"):
        denoise_canvas(pipe, h, w, conds[::-1], GRIDS, **SHIFTED)
    with pytest.raises(ValueError, match="uncovered"):
        denoise_canvas(pipe, h, w, [conds[0], Condition()], [GRIDS[0], [(0, 0)]], **SHIFTED)


class SmoothPrior(torch.nn.Module):
    """The posterior mean for x0 = a flat colour per window (its GE row) plus a smooth
    component of variance ``v``: at high noise a window predicts its own colour, at low noise
    what it sees (blurred). Neighbouring windows disagree in colour, so a fixed grid leaves
    ramps in its overlaps, the same places at every step: a grid of seams at the stride."""

    def __init__(self, alphas_cumprod: torch.Tensor, v: float = 0.2, blur: float = 1.5):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.config = SimpleNamespace(ge_injection="xattn", in_channels=3, out_channels=3, sample_size=S + 6)
        self.alphas_cumprod, self.v = alphas_cumprod, v
        r = torch.arange(-3.0, 4.0)
        g = torch.exp(-(r**2) / (2 * blur**2))
        self.kernel = (torch.outer(g, g) / g.sum() ** 2).expand(3, 1, 7, 7)

    def forward(self, x, t, morphology=None, ge=None, ge_tokens=None, ge_mask=None, drop_morphology=None,
                drop_ge=None):  # fmt: skip
        mu = ge[:, :3, None, None]
        abar = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        gain = abar * self.v / (abar * self.v + 1 - abar)
        seen = F.conv2d(F.pad(x / abar.sqrt() - mu, (3,) * 4, mode="replicate"), self.kernel, groups=3)
        x0 = mu + gain * seen
        return (x - abar.sqrt() * x0) / (1 - abar).sqrt()


def test_shifted_grids_spread_the_seams_of_a_fixed_grid():
    """22 px windows every 16 px (the trained model's 32 / 23 scaled) on a 150 px section: the
    seam score at the stride falls by more than half with the grid shifted (about 1.25 to 0.35)."""
    window, stride, side, steps = S + 6, 16, 150, 20
    scheduler = make_sampling_scheduler(pixel_space=True)
    pipe = SimpleNamespace(transformer=SmoothPrior(scheduler.alphas_cumprod), scheduler=scheduler)
    kwargs = {"num_inference_steps": steps, "progress": False, "guidance_scale_morphology": 1.0,
              "guidance_scale_ge": 1.0, "batch_size": 64}  # fmt: skip

    def colours(corners, pad: int = 0) -> Condition:
        """The colour field at the window centres (section coordinates)."""
        c = torch.tensor(corners, dtype=torch.float32) - pad + window / 2
        phase = torch.tensor([[0.0, 2.0, 4.0]])
        field = torch.sin(c[:, :1] / 10.3 + phase) + torch.cos(c[:, 1:] / 12.7 + 1.7 * phase)
        return Condition(ge=0.5 * torch.tanh(2 * field))

    def score(image: torch.Tensor) -> dict:
        pixels = to_uint8(((image + 1) / 2).clamp(0, 1)[None])[0]
        return seam_score(pixels, tile=window, glass_edges=False)

    scores = {"fixed": [], "shifted": []}
    for seed in (0, 1):
        corners = window_grid(side, side, window, stride)
        fixed = denoise_canvas(pipe, side, side, colours(corners), corners, seed=seed, **kwargs)
        pad = stride
        grids = [window_grid(side + 2 * pad, side + 2 * pad, window, stride, o) for o in grid_offsets(stride)]
        shifted = denoise_canvas(pipe, side + 2 * pad, side + 2 * pad, [colours(g, pad) for g in grids], grids,
                                 seed=seed, origin=(-pad, -pad), **kwargs)[:, pad:-pad, pad:-pad]  # fmt: skip
        scores["fixed"].append(score(fixed))
        scores["shifted"].append(score(shifted))
    print({k: [(round(s["score"], 3), s["period"]) for s in v] for k, v in scores.items()})
    for fixed, shifted in zip(scores["fixed"], scores["shifted"], strict=True):
        assert fixed["period"] % stride == 0 and fixed["score"] > 0.5  # the fixed grid's seams
        assert shifted["score"] < 0.5 * fixed["score"]


class PatchGridPrior(SmoothPrior):
    """:class:`SmoothPrior` whose x0 also carries a DiT's patch grid: a step of ``strength`` at
    every ``patch``-th column and row of the window, counted from the window's own corner (the
    walkthrough's model shows 1.5x the edge energy at its patch borders)."""

    def __init__(self, alphas_cumprod: torch.Tensor, patch: int, strength: float):
        super().__init__(alphas_cumprod)
        n = self.config.sample_size
        line = (torch.arange(n) % patch < patch // 2).float() - 0.5
        self.grid = strength * (line[:, None] + line[None, :])

    def forward(self, x, t, ge=None, **kwargs):
        abar = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        eps = super().forward(x, t, ge=ge, **kwargs)
        x0 = (x - (1 - abar).sqrt() * eps) / abar.sqrt() + self.grid
        return (x - abar.sqrt() * x0) / (1 - abar).sqrt()


def test_patch_phase_steps_even_out_the_models_patch_grid():
    """22 px windows every 15 px with a patch grid of 4 px (the trained model's 32 / 23 / 4
    scaled): shifted windows leave the patch grid of the last steps' windows (it restarts at
    every window, so it repeats at the stride); fusing the last quarter of the steps from every
    patch phase (what a section does) brings the seam score down to the level of the same model
    without a patch grid. (With a grid twice as strong, 0.06, a residue is left: about 0.5
    against 0.3 without a grid and 0.9 shifted.)"""
    window, stride, patch, side, steps = S + 6, 15, 4, 150, 20
    scheduler = make_sampling_scheduler(pixel_space=True)
    kwargs = {"num_inference_steps": steps, "progress": False, "guidance_scale_morphology": 1.0,
              "guidance_scale_ge": 1.0, "batch_size": 64, "origin": (-stride, -stride)}  # fmt: skip
    padded = side + 2 * stride

    def colours(corners) -> Condition:
        c = torch.tensor(corners, dtype=torch.float32) - stride + window / 2
        phase = torch.tensor([[0.0, 2.0, 4.0]])
        field = torch.sin(c[:, :1] / 10.3 + phase) + torch.cos(c[:, 1:] / 12.7 + 1.7 * phase)
        return Condition(ge=0.5 * torch.tanh(2 * field))

    def score(model, seed: int, patch_phase_steps: int) -> float:
        pipe = SimpleNamespace(transformer=model, scheduler=scheduler)
        grids, order = window_schedule(padded, padded, window, stride, grid_offsets(stride), patch, steps,
                                       patch_phase_steps)  # fmt: skip
        image = denoise_canvas(pipe, padded, padded, [colours(g) for g in grids], grids, seed=seed,
                               phase_order=order, **kwargs)[:, stride:-stride, stride:-stride]  # fmt: skip
        pixels = to_uint8(((image + 1) / 2).clamp(0, 1)[None])[0]
        return seam_score(pixels, tile=window, glass_edges=False)["score"]

    artefact = PatchGridPrior(scheduler.alphas_cumprod, patch, strength=0.03)
    for seed in (0, 1):
        plain = score(SmoothPrior(scheduler.alphas_cumprod), seed, 0)
        shifted, patch_phases = score(artefact, seed, 0), score(artefact, seed, steps // 4)
        print(f"seed {seed}: seam score without a patch grid {plain:.3f}; with one, shifted {shifted:.3f}, "
              f"the last quarter in patch phases {patch_phases:.3f}")  # fmt: skip
        assert shifted > 2 * plain  # about 0.8 against 0.2-0.3
        assert patch_phases < 0.5 * shifted and patch_phases < 1.2 * plain


@pytest.mark.slow
def test_a_section_is_drawn_in_shifted_windows_by_default(tiny_pipe, her2st_store, tmp_path):
    """synthesize_seamless shifts its grid by default (recorded), the same pixels in memory and out
    of core (the padded canvas on disk, read through its crop); shift_windows=False: the fixed grid."""
    from stmdit.sections.synthesis import section_canvas, section_settings, synthesize_seamless

    kwargs = {"steps": 1, "progress": False}
    shifted = synthesize_seamless(tiny_pipe, her2st_store, "C2", **kwargs)
    settings = shifted.settings
    assert settings["shift_windows"] and settings["padding_px"] == settings["stride"] == 23
    assert settings["window_offsets_px"] == [list(o) for o in grid_offsets(23)]
    # One step: it is the last quarter, fused from the patch-phase grid of the first offset.
    assert settings["patch_phase_steps"] == 1 and settings["phase_order"] == [8]
    assert len(settings["n_windows_per_phase"]) == 9
    assert (
        settings["n_windows"] == settings["n_windows_per_phase"][8] > 3 * settings["n_windows_per_phase"][0]
    )
    on_disk = synthesize_seamless(tiny_pipe, her2st_store, "C2", workdir=tmp_path / "w", **kwargs)
    assert on_disk.virtual.shape == shifted.virtual.shape
    assert int(abs(on_disk.virtual.astype(int) - shifted.virtual).max()) <= 1
    fixed = section_canvas(tiny_pipe, her2st_store, "C2")
    assert fixed.pad == 0 and not fixed.shifted
    record = section_settings(tiny_pipe, fixed, 0, 2.0, 1.5, 1, np.ones(len(fixed.corners), bool))
    assert not record["shift_windows"] and "window_offsets_px" not in record
    assert record["n_windows"] == len(fixed.corners) < settings["n_windows"]  # the padded canvas has more
