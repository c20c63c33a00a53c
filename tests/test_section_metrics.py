"""Seam score and tissue coverage of virtual sections: the formula by hand, phase independence,
separation of seamed mosaics from real her2st tissue, and coverage of a gapped mosaic."""

import numpy as np
import pandas as pd
import pytest

from stmdit.data.images import tissue_mask, tissue_threshold
from stmdit.data.readers.convention import grid_pitch_px
from stmdit.sections.metrics import near_spots, seam_score, tissue_coverage
from stmdit.sections.mosaic import SectionGeometry, assemble_mosaic, read_real_region

GREY, LINE = 128, 100


def lined(height: int, width: int, columns) -> np.ndarray:
    """Flat grey with a 1 px darker vertical line at each of ``columns``."""
    image = np.full((height, width, 3), GREY, np.uint8)
    image[:, list(columns)] = LINE
    return image


# -- the formula by hand ------------------------------------------------------------------------------


def test_seam_score_by_hand():
    # Lines at columns 5, 15, 25, 35 of a 20 x 41 image: g(j) = |100 - 128| = 28 at j = 4, 5, 14, 15,
    # 24, 25, 34, 35 (the borders on each side of a line), 0 at the other 32 of its 40 columns.
    # Periods 8 .. 13 (a third of 41). At p = 10 every j = 4 (mod 10) and j = 5 (mod 10) is an edge:
    # F(4) = F(5) = 28, the other eight residues 0, median 0; the profile's mean is 8 * 28 / 40, so
    # S_10 = 28 / (8 * 28 / 40) = 5. Other periods spread the edges over several residues.
    # The row profile is 0 everywhere (no edges): NaN, so the image's score is the x axis's.
    image = lined(20, 41, range(5, 41, 10))
    result = seam_score(image)
    assert result["score"] == pytest.approx(5.0, rel=1e-6)
    assert (result["axis"], result["period"], result["phase"]) == ("x", 10, 4)
    assert np.isnan(result["y"]["score"]) and result["y"]["period"] is None

    transposed = seam_score(image.transpose(1, 0, 2))
    assert transposed["score"] == pytest.approx(5.0, rel=1e-6)
    assert (transposed["axis"], transposed["period"], transposed["phase"]) == ("y", 10, 4)

    # Glass-glass pairs never count: 40 rows of white glass below change nothing on the x axis.
    with_glass = np.concatenate([image, np.full((40, 41, 3), 255, np.uint8)])
    assert seam_score(with_glass)["x"]["score"] == pytest.approx(5.0, rel=1e-6)
    # Explicit period range: at p = 20 the fold is F(4) = F(5) = F(14) = F(15) = 28, the same score.
    only_20 = seam_score(image, min_period=20, max_period=20)
    assert only_20["score"] == pytest.approx(5.0, rel=1e-6) and only_20["period"] == 20
    # No seams: a flat image has no edges at all.
    assert np.isnan(seam_score(np.full((30, 30, 3), GREY, np.uint8))["score"])


def test_seam_score_does_not_depend_on_the_grid_phase():
    texture = np.random.default_rng(0).integers(90, 200, (240, 240, 3), dtype=np.uint8)
    scores = []
    for phase in range(0, 24, 5):  # a seam grid of period 24 at different offsets
        image = texture.copy()
        image[:, phase::24] //= 2
        result = seam_score(image, tile=24)
        assert (result["axis"], result["period"]) == ("x", 24)
        assert result["phase"] in ((phase - 1) % 24, phase)  # a border of the darker column
        scores.append(result["score"])
    print("scores by phase", np.round(scores, 3))
    assert max(scores) < 1.03 * min(scores) and min(scores) > 1.0
    assert seam_score(texture, tile=24)["score"] < 0.3 * min(scores)


# -- real tissue ---------------------------------------------------------------------------------------

UM_PER_PX, TILE_UM, PITCH_UM = 2.0, 128.0, 200.0  # 64 px tiles on a 100 px pitch (legacy ST)
TILE, PITCH = 64, 100
SIDE = TILE + 48 * 24  # 1216 px: 64 px windows on a 48 px step tile it exactly, and so do 19 tiles


@pytest.fixture(scope="module")
def real_region(test_data):
    """A 1216 px (2.4 mm) region at 2 µm/px from the middle of her2st C2's spots."""
    root = test_data / "her2st" / "C2"
    spots = pd.read_csv(root / "spots.tsv", sep="\t")
    pitch_px, _ = grid_pitch_px(
        spots[["x", "y"]].to_numpy(float), spots[["pixel_x", "pixel_y"]].to_numpy(float)
    )
    mpp = PITCH_UM / pitch_px
    cx, cy = (spots[k].median() * mpp for k in ("pixel_x", "pixel_y"))
    half = SIDE * UM_PER_PX / 2
    geometry = SectionGeometry(UM_PER_PX, (cx - half, cy - half), SIDE, SIDE)
    return read_real_region(root / "he.jpg", mpp, 1.0, geometry), geometry


def paste(real: np.ndarray, geometry: SectionGeometry, centres_px: np.ndarray, sources_px: np.ndarray):
    """assemble_mosaic of the TILE px windows of ``real`` centred at ``sources_px`` placed at ``centres_px``."""
    tiles = np.stack(
        [real[y - TILE // 2 : y + TILE // 2, x - TILE // 2 : x + TILE // 2] for x, y in sources_px]
    )
    centres_um = np.asarray(centres_px, float) * UM_PER_PX + np.array(geometry.origin_um)
    return assemble_mosaic(tiles, centres_um, TILE_UM, geometry)


def grid(start: int, step: int) -> np.ndarray:
    """Centres (N, 2: x, y) of a square grid of TILE px tiles inside the region."""
    axis = np.arange(start, SIDE - TILE // 2 + 1, step)
    return np.array([(x, y) for y in axis for x in axis])


def test_seam_score_separates_seamed_mosaics_from_real_tissue(real_region):
    real, geometry = real_region
    assert 0.5 < (~(real > 220).all(axis=-1)).mean() < 0.99  # mostly tissue, with some glass

    # Overlapping windows (64 px on a 48 px step) blended back: the real image again.
    windows = grid(TILE // 2, 48)
    reassembled, coverage = paste(real, geometry, windows, windows)
    assert coverage.all() and np.abs(reassembled.astype(int) - real).max() <= 1

    # A regular tiling with the tiles shuffled among the positions: seams without gaps.
    tiling = grid(TILE // 2, TILE)
    order = np.random.default_rng(0).permutation(len(tiling))
    shuffled, coverage = paste(real, geometry, tiling, tiling[order])
    assert coverage.all()

    # Spots mode: each tile cut around its own position, on a 200 µm pitch, glass in between.
    spots = grid(TILE // 2, PITCH)
    gapped, coverage = paste(real, geometry, spots, spots)
    assert 0.3 < coverage.mean() < 0.5

    s = {name: seam_score(image) for name, image in
         (("real", real), ("reassembled", reassembled), ("shuffled", shuffled), ("gapped", gapped))}  # fmt: skip
    inside = seam_score(gapped, glass_edges=False)
    for name, r in [*s.items(), ("gapped, tissue pairs only", inside)]:
        print(
            f"{name:>26}: score {r['score']:.3f}, every {r['period']} px along {r['axis']} (phase {r['phase']})"
        )
    # Measured: real 0.175, reassembled 0.175, shuffled 2.42 (period 64), gapped 4.66 (period 100),
    # gapped with tissue pairs only 0.35.
    real_score = s["real"]["score"]
    assert s["reassembled"]["score"] == pytest.approx(real_score, rel=0.1)
    assert real_score < 0.4
    assert s["shuffled"]["score"] > 5 * real_score and s["shuffled"]["period"] in (TILE, 2 * TILE)
    assert s["gapped"]["score"] > 5 * real_score and s["gapped"]["period"] == PITCH
    # Inside tissue alone the gapped mosaic is the real tissue, cut: no seams beyond the noise.
    assert inside["score"] < 3 * real_score

    # Crops of the shuffled mosaic at other grid phases score about the same.
    crops = [
        seam_score(shuffled[dy : dy + 1024, dx : dx + 1024])["score"]
        for dx, dy in ((0, 0), (13, 40), (50, 7))
    ]
    print("shuffled crops at three phases", np.round(crops, 3))
    assert max(crops) < 1.25 * min(crops)


# -- coverage -------------------------------------------------------------------------------------------


def test_tissue_coverage():
    # Real tissue: rows 10..49, columns 0..59 of a 60 x 80 canvas (2400 px). Virtual: two 20 x 20
    # tiles at rows 0..19 / columns 0..19 (200 px of it over the real tissue: rows 10..19) and rows
    # 30..49 / columns 40..59 (all 400 over it): (200 + 400) / 2400 = 0.25.
    real_mask = np.zeros((60, 80), bool)
    real_mask[10:50, 0:60] = True
    geometry = SectionGeometry(1.0, (0.0, 0.0), 80, 60)
    tile = np.zeros((2, 20, 20, 3), np.uint8)
    tile[..., 0], tile[..., 1], tile[..., 2] = 150, 60, 140  # H&E-like purple
    mosaic, coverage = assemble_mosaic(tile, np.array([[10.0, 10.0], [50.0, 40.0]]), 20, geometry)
    assert tissue_coverage(coverage, real_mask) == 0.25
    # From the image: tissue_mask's 3 x 3 median drops the corner pixel of a tile (4 of its 9
    # neighbours are tissue) except at the canvas edge: the five corners inside the real tissue.
    assert tissue_coverage(mosaic, real_mask) == (600 - 5) / 2400
    full = np.broadcast_to(tile[0, :1, :1], (60, 80, 3))
    assert tissue_coverage(full, real_mask) == 1.0
    assert np.isnan(tissue_coverage(full, np.zeros((60, 80), bool)))
    with pytest.raises(ValueError, match=r"\(60, 80\).*\(60, 81\)"):
        tissue_coverage(mosaic, np.zeros((60, 81), bool))


def test_tissue_coverage_of_a_gapped_mosaic_of_real_tissue(real_region):
    real, geometry = real_region
    real_mask, threshold = tissue_mask(real), tissue_threshold(real)
    spots = grid(TILE // 2, PITCH)
    gapped, coverage = paste(real, geometry, spots, spots)
    # The tiles are the real pixels: covered real tissue is real tissue under a tile (the mask of a
    # cut-out differs from the whole only within a pixel or two of the cuts).
    expected = (coverage & real_mask).sum() / real_mask.sum()
    measured = tissue_coverage(gapped, real_mask, threshold)
    print(f"coverage of real tissue: {measured:.3f} (tile placements: {expected:.3f})")
    assert measured == pytest.approx(expected, abs=0.02)
    assert tissue_coverage(real, real_mask) == 1.0
    assert tissue_coverage(gapped, real) == measured  # the real image's threshold by default


# -- bad input ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "image",
    [np.zeros((20, 20, 3), np.float32), np.zeros((20, 20), np.uint8), np.zeros((20, 20, 4), np.uint8)],
)
def test_seam_score_rejects_what_is_not_rgb_uint8(image):
    with pytest.raises(ValueError, match=r"RGB uint8 array of shape \(H, W, 3\)"):
        seam_score(image)


def test_bad_masks_and_periods():
    image = lined(20, 40, [5])
    with pytest.raises(ValueError, match=r"mask must be a bool array of shape \(20, 40\)"):
        seam_score(image, mask=np.ones((20, 41), bool))
    with pytest.raises(ValueError, match="min_period"):
        seam_score(image, min_period=1)
    with pytest.raises(ValueError, match=r"bool tissue mask \(H, W\) or an RGB uint8 image"):
        tissue_coverage(image, np.ones((20, 40), np.float32))


def test_near_spots_is_the_disks_of_reach_around_the_spots():
    geometry = SectionGeometry(2.0, (100.0, 50.0), 20, 10)  # 2 µm per pixel, origin (100, 50) µm
    mask = near_spots(geometry, np.array([[111.0, 61.0]]), reach_um=6.0)  # pixel (row 5, col 5)
    rows, cols = np.nonzero(mask)
    # Pixel centres within 3 px of the spot's pixel: a disk of radius 3 around (5, 5).
    assert (
        ((rows - 5) ** 2 + (cols - 5) ** 2 <= 9).all() and mask.sum() == 29 and mask[5, 8] and not mask[5, 9]
    )
    assert not near_spots(
        geometry, np.array([[0.0, 0.0]]), 6.0
    ).any()  # a spot off the canvas reaches nothing
    with pytest.raises(ValueError, match="reach_um"):
        near_spots(geometry, np.array([[111.0, 61.0]]), 0)
