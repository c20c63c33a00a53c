"""Region edits at section scale: imposition in the joint sampler, masks, the edit config and
the edited expression."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from conftest import random_window_pipe
from stmdit.diffusion import Condition
from stmdit.errors import ConfigError
from stmdit.experiments.simulate import Perturbation, perturb
from stmdit.sections.editing import region_statistics
from stmdit.sections.edits import (
    EditConfig,
    edit_canvas,
    edited_expression,
    keep_mask,
    local_change,
    region_mask,
    region_spots,
    transition_band,
)
from stmdit.sections.mosaic import SectionGeometry
from stmdit.sections.seamless import denoise_canvas, window_grid
from stmdit.tiles import to_uint8
from test_seamless import GUIDANCE, STEPS, conditions

SIDE = 32


@pytest.fixture(scope="module")
def pipe():
    return random_window_pipe()


def run(pipe, cond, corners, **kwargs):
    return denoise_canvas(pipe, SIDE, SIDE, cond, corners, seed=5, num_inference_steps=STEPS, progress=False,
                          **GUIDANCE, **kwargs)  # fmt: skip


def grey(canvas: torch.Tensor) -> np.ndarray:
    return to_uint8((canvas + 1) / 2)


# -- imposition in denoise_canvas ------------------------------------------------------------------------


@pytest.mark.parametrize("pixel_space", [True, False], ids=["ddim-clip", "dpm-solver++"])
def test_keep_nothing_is_the_free_run_and_keep_all_is_known(pixel_space):
    pipe = random_window_pipe(pixel_space)
    corners = window_grid(SIDE, SIDE, 16, 8)
    cond = conditions(len(corners))
    free = run(pipe, cond, corners)
    known = torch.rand(3, SIDE, SIDE) * 2 - 1
    zero = run(pipe, cond, corners, known=known, keep=torch.zeros(SIDE, SIDE))
    one = run(pipe, cond, corners, known=known, keep=torch.ones(SIDE, SIDE))
    print(f"keep 0 vs free: {float((zero - free).abs().max()):.2e}; keep 1 vs known: "
          f"{float((one - known).abs().max()):.2e}; free vs known {float((free - known).abs().mean()):.3f}")  # fmt: skip
    torch.testing.assert_close(zero, free, rtol=1e-6, atol=1e-6)
    assert torch.equal(one, known)
    # Half kept: the imposition reaches back into the free half through the shared windows.
    half = torch.zeros(SIDE, SIDE)
    half[:, : SIDE // 2] = 1
    mixed = run(pipe, cond, corners, known=known, keep=half)
    assert torch.equal(mixed[:, :, : SIDE // 2], known[:, :, : SIDE // 2])
    assert not torch.allclose(mixed[:, :, SIDE // 2 :], free[:, :, SIDE // 2 :], atol=1e-3)


def test_imposition_inputs_are_checked(pipe):
    with pytest.raises(ValueError, match="together"):
        run(pipe, Condition(), window_grid(SIDE, SIDE, 16, 8), known=torch.zeros(3, SIDE, SIDE))
    with pytest.raises(ValueError, match=r"known must have shape \(3, 32, 32\)"):
        run(pipe, Condition(), window_grid(SIDE, SIDE, 16, 8), known=torch.zeros(3, 16, 16),
            keep=torch.zeros(SIDE, SIDE))  # fmt: skip
    with pytest.raises(ValueError, match=r"keep must have shape \(32, 32\)"):
        run(pipe, Condition(), window_grid(SIDE, SIDE, 16, 8), known=torch.zeros(3, SIDE, SIDE),
            keep=torch.zeros(3, SIDE, SIDE))  # fmt: skip
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        run(pipe, Condition(), window_grid(SIDE, SIDE, 16, 8), known=torch.zeros(3, SIDE, SIDE),
            keep=torch.full((SIDE, SIDE), 1.5))  # fmt: skip


def test_edits_are_local(pipe):
    corners = window_grid(SIDE, SIDE, 16, 8)
    cond_a = conditions(len(corners), seed=1)
    unedited = run(pipe, cond_a, corners)
    # B: the central windows get other expression.
    ge = cond_a.ge.clone()
    central = [i for i, (y, x) in enumerate(corners) if y == 8 or x == 8]
    ge[central] = torch.randn(len(central), ge.shape[1], generator=torch.Generator().manual_seed(9)) * 3
    cond_b = Condition(morphology=cond_a.morphology, ge=ge)
    region = np.zeros((SIDE, SIDE), bool)
    region[12:20, 12:20] = True
    band_px = 4
    keep = keep_mask(region, band_px)
    band = transition_band(region, band_px)
    edited = edit_canvas(pipe, SIDE, SIDE, corners, cond_b, unedited, keep, seed=5, num_inference_steps=STEPS,
                         progress=False, **GUIDANCE)  # fmt: skip
    a, b = grey(unedited), grey(edited)
    change = local_change(b, a, region, band)
    outside = ~(region | band)
    max_outside = int(np.abs(b.astype(int) - a.astype(int))[outside].max())
    print(f"mean |edited - unedited| /255: {change}; max outside {max_outside} grey levels")
    assert max_outside < 1
    assert change["outside"] == 0
    assert change["inside"] > 0.05 and change["band"] > 0.005
    # Without the imposition the same conditions change the whole canvas.
    free = local_change(grey(run(pipe, cond_b, corners)), a, region, band)
    print(f"the free run with B: {free}")
    assert free["outside"] > 0.01


# -- masks -------------------------------------------------------------------------------------------------


def test_keep_mask_ramps_across_the_band():
    region = np.zeros((40, 50), bool)
    region[15:25, 20:30] = True
    band_px = 6.0
    keep = keep_mask(region, band_px)
    band = transition_band(region, band_px)
    assert keep.dtype == np.float32 and keep.shape == region.shape
    assert (keep[region] == 0).all()
    assert (keep[~(region | band)] == 1).all()
    assert ((keep[band] > 0) & (keep[band] < 1)).all()
    # The band along a row leaving the region to the right: 5 px (distances 1..5 < 6), increasing.
    row = keep[20, 29:]
    assert list(band[20, 30:37]) == [True] * 5 + [False] * 2
    assert (np.diff(row) >= 0).all() and (np.diff(row[:7]) > 0).all()
    np.testing.assert_allclose(row[1:4], (1 - np.cos(np.pi * np.arange(1, 4) / band_px)) / 2, rtol=1e-6)
    # A wider band is wider; an empty region keeps everything; a band must be positive.
    assert transition_band(region, 10).sum() > band.sum()
    assert (keep_mask(np.zeros((4, 4), bool), 2) == 1).all()
    with pytest.raises(ValueError, match="band_px"):
        keep_mask(region, 0)


GEOMETRY = SectionGeometry(um_per_px=2.0, origin_um=(100.0, 50.0), width=20, height=10)


def test_polygon_region_by_hand():
    # x 104.4..120.6 um -> canvas cols 2.2..10.3 (centres 2.5..9.5: cols 2..9);
    # y 52.6..61.4 um -> rows 1.3..5.7 (centres 1.5..5.5: rows 1..5).
    rect = [[104.4, 52.6], [120.6, 52.6], [120.6, 61.4], [104.4, 61.4]]
    mask = region_mask({"polygon_um": rect}, GEOMETRY)
    expected = np.zeros((10, 20), bool)
    expected[1:6, 2:10] = True
    assert mask.sum() == 40
    np.testing.assert_array_equal(mask, expected)
    # A triangle: the lower-left half of the canvas (centres with row > col * 10 / 20).
    tri = region_mask({"polygon_um": [[100, 50], [140, 70], [100, 70]]}, GEOMETRY)
    rows, cols = np.mgrid[0:10, 0:20]
    np.testing.assert_array_equal(tri, rows + 0.5 > (cols + 0.5) / 2)


def spots():
    obs = pd.DataFrame({"cluster": ["a", "b", "a", "c"], "n": [1, 2, 3, 3]}, index=["s0", "s1", "s2", "s3"])
    xy = np.array([[110.0, 60.0], [120.0, 60.0], [130.0, 56.0], [138.0, 68.0]])
    return obs, xy


def disks(xy, radius_um):
    rows, cols = np.mgrid[0:10, 0:20]
    out = np.zeros((10, 20), bool)
    for cx, cy in GEOMETRY.to_canvas(xy):
        out |= (cols + 0.5 - cx) ** 2 + (rows + 0.5 - cy) ** 2 <= (radius_um / 2) ** 2
    return out


def test_spot_and_obs_regions():
    obs, xy = spots()
    one = region_mask({"spots": ["s1"]}, GEOMETRY, obs, xy, 3.0)
    assert one.sum() == 4 and one[4:6, 9:11].all()  # centre (10, 5) px, radius 1.5 px: 2 x 2
    assert region_mask({"spots": ["s1"]}, GEOMETRY, obs, xy, 4.0).sum() == 12
    cluster = region_mask({"obs": {"cluster": "a"}}, GEOMETRY, obs, xy, 5.0)
    np.testing.assert_array_equal(cluster, disks(xy[[0, 2]], 5.0))
    np.testing.assert_array_equal(
        region_mask({"obs": {"n": 3}}, GEOMETRY, obs, xy, 5.0), disks(xy[[2, 3]], 5.0)
    )
    # A disk at the canvas edge is clipped, not wrapped.
    assert region_mask({"spots": ["s3"]}, GEOMETRY, obs, xy, 5.0).sum() == disks(xy[[3]], 5.0).sum() > 0


def test_the_spots_a_region_edits():
    obs, xy = spots()
    # A polygon holds the spots whose centres lie inside it: (110, 60) and (120, 60), not (130, 56).
    polygon = {"polygon_um": [[105, 55], [125, 55], [125, 65], [105, 65]]}
    assert region_spots(polygon, obs, xy).tolist() == [True, True, False, False]
    assert region_spots({"spots": ["s3", "s1"]}, obs, xy).tolist() == [False, True, False, True]
    assert region_spots({"obs": {"cluster": "a"}}, obs, xy).tolist() == [True, False, True, False]


def test_region_statistics_are_means_over_the_region():
    """Purple (nuclear) pixels in a region on pink: the densities are the region's means, and
    what lies outside the region (here a black square) does not count."""
    image = np.full((1, 40, 40, 3), [240, 200, 220], np.uint8)
    image[0, 0:10, 30:40] = 0
    region = np.zeros((40, 40), bool)
    region[10:30, 5:25] = True
    image[0, 10:20, 5:25] = [80, 50, 130]  # the top half of the region purple
    stats = region_statistics(image, region, um_per_px=4.0)
    half = region_statistics(image[:, 10:20, 5:25], np.ones((10, 20), bool), 4.0)
    pink = region_statistics(image[:, 20:30, 5:25], np.ones((10, 20), bool), 4.0)
    for key in ("haematoxylin", "eosin"):
        assert stats[key][0] == pytest.approx((half[key][0] + pink[key][0]) / 2, rel=1e-5)
    assert "nuclei_per_100um2" not in stats  # 4 µm pixels are too coarse to count nuclei


def test_region_errors_name_what_exists():
    obs, xy = spots()
    with pytest.raises(ValueError, match=r"\['s9'\].*'s0', 's1'"):
        region_mask({"spots": ["s1", "s9"]}, GEOMETRY, obs, xy, 3.0)
    with pytest.raises(ValueError, match=r"'clusters'.*\['cluster', 'n'\]"):
        region_mask({"obs": {"clusters": "a"}}, GEOMETRY, obs, xy, 3.0)
    with pytest.raises(ValueError, match=r"cluster = 'z'.*\['a', 'b', 'c'\]"):
        region_mask({"obs": {"cluster": "z"}}, GEOMETRY, obs, xy, 3.0)
    with pytest.raises(ValueError, match="spot_radius_um"):
        region_mask({"spots": ["s1"]}, GEOMETRY)


# -- the config ----------------------------------------------------------------------------------------------


def test_edit_config_from_yaml(tmp_path):
    good = tmp_path / "edit.yaml"
    good.write_text(
        "region:\n  polygon_um: [[0, 0], [100, 0], [100, 80]]\n"
        "changes:\n  - {genes: [ERBB2], mode: fold_change, value: 4}\n  - {gene_set: immune, mode: knockout}\n"
        "anchor: real\nband_um: 32\nseeds: [0, 1]\n"
    )
    config = EditConfig.from_yaml(good)
    assert config.region.polygon_um[2] == [100.0, 80.0] and config.anchor == "real"
    assert config.perturbations()[0] == Perturbation(genes=["ERBB2"], mode="fold_change", value=4)
    assert config.band(128) == 32 and config.seeds == [0, 1]
    minimal = tmp_path / "minimal.yaml"
    minimal.write_text("region: {obs: {cluster: 3}}\nchanges: [{genes: [CD3E], mode: set, value: 0}]\n")
    config = EditConfig.from_yaml(minimal)
    assert config.anchor == "virtual" and config.band(128) == 64 and config.seeds == [0]
    assert config.region.obs == {"cluster": 3}

    def error(text: str) -> str:
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(ConfigError) as err:
            EditConfig.from_yaml(bad)
        print(err.value)
        return str(err.value)

    body = "region: {spots: [s1]}\nchanges: [{genes: [A]}]\n"
    assert "line 3: anchor:" in error(body + "anchor: rael\n")
    message = error(body + "band: 3\n")
    assert "line 3: band: unknown key" in message and "band_um" in message
    assert "band_um" in error(body + "band_um: -1\n")
    assert "exactly one of the keys" in error("region: {spot: [s1]}\nchanges: [{genes: [A]}]\n")
    assert "region.extra: unknown key; known keys here: spots" in error(
        "region: {spots: [s1], extra: 1}\nchanges: [{genes: [A]}]\n"
    )
    assert "line 2: changes: variant 'changes', change 0: unknown keys ['genez']" in error(
        "region: {spots: [s1]}\nchanges: [{genez: [A]}]\n"
    )
    assert "changes" in error("region: {spots: [s1]}\nchanges: []\n")


# -- the edited expression ---------------------------------------------------------------------------------


def test_edited_expression_perturbs_the_region_only():
    rng = np.random.default_rng(0)
    counts = rng.poisson(5, size=(6, 4)).astype(np.float32)
    adata = ad.AnnData(counts, var=pd.DataFrame(index=["G1", "G2", "G3", "G4"]))
    adata.obs_names = [f"s{i}" for i in range(6)]
    in_region = np.array([True, False, True, False, False, True])
    changes = [{"genes": ["G1"], "mode": "fold_change", "value": 3.0}, {"gene_set": "pair", "mode": "knockout"},
               {"genes": ["g4"], "mode": "quantile", "value": 0.9}]  # fmt: skip
    gene_sets = {"pair": ["G2"]}
    out = edited_expression(adata, in_region, changes, gene_sets=gene_sets)
    perturbations = [Perturbation(**c) for c in changes]
    for i in range(6):
        if in_region[i]:
            expected = perturb(adata[[i]], perturbations, reference=adata, gene_sets=gene_sets).X[0]
            np.testing.assert_array_equal(out.X[i], expected)
            assert out.X[i, 1] == 0 and out.X[i, 0] == 3 * counts[i, 0]
        else:
            np.testing.assert_array_equal(out.X[i], counts[i])
    assert out.obs["edited"].tolist() == in_region.tolist()
    assert (adata.X == counts).all()  # the input is left alone
    # A counts layer is where the counts are edited; X (e.g. normalised) is left as it was.
    layered = adata.copy()
    layered.layers["counts"] = layered.X.copy()
    layered.X = np.log1p(layered.X)
    out = edited_expression(layered, in_region, changes, gene_sets=gene_sets)
    np.testing.assert_array_equal(
        out.layers["counts"][in_region], edited_expression(adata, in_region, changes, gene_sets).X[in_region]
    )
    np.testing.assert_array_equal(out.X, layered.X)
    with pytest.raises(ValueError, match="one value per spot"):
        edited_expression(adata, in_region[:3], changes, gene_sets)
