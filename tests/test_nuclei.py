"""The nuclei counter (stain.py): Otsu on the haematoxylin channel, then a watershed that
separates touching nuclei; and when a count per area is reported at all."""

import numpy as np
import pytest
from scipy import ndimage

from stmdit.stain import (
    MAX_NUCLEI_UM_PER_PX,
    MIN_NUCLEI_TILE_PX,
    count_nuclei,
    haematoxylin,
    nuclei_unavailable,
    otsu_threshold,
    segment_nuclei,
)

# A haematoxylin-stained nucleus on white glass, RGB in [0, 1].
NUCLEUS_RGB = np.array([0.30, 0.22, 0.55])


def tile(discs, size=96, noise=0.02, seed=0):
    """An (H, W, 3) tile with a nucleus for each (row, column, radius) disc, with pixel noise."""
    yy, xx = np.mgrid[:size, :size]
    nuclear = np.zeros((size, size), bool)
    for cy, cx, r in discs:
        nuclear |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    rgb = np.ones((size, size, 3))
    rgb[nuclear] = NUCLEUS_RGB
    rgb += np.random.default_rng(seed).normal(0, noise, rgb.shape)
    return np.clip(rgb, 0, 1).astype(np.float32), nuclear


def test_two_overlapping_discs_are_two_nuclei():
    image, nuclear = tile([(48, 38, 10), (48, 54, 10)])  # centres 16 px apart, radius 10: they overlap
    assert ndimage.label(nuclear)[1] == 1  # one connected blob: labelling alone would count 1
    assert count_nuclei(image[None]).tolist() == [2]


def test_count_against_a_hand_made_reference():
    discs = [
        (12, 12, 5), (12, 80, 6), (84, 14, 5),  # three isolated nuclei
        (40, 20, 7), (40, 32, 7),  # a touching pair
        (70, 50, 6), (70, 60, 6),  # another pair
        (30, 60, 6), (30, 71, 6), (41, 66, 6),  # three in a cluster
    ]  # fmt: skip
    image, nuclear = tile(discs)
    assert ndimage.label(nuclear)[1] == 6
    h = haematoxylin(image[None])
    labels = segment_nuclei(h[0], otsu_threshold(h))
    assert labels.max() == 10
    # Every disc centre lies in its own nucleus.
    centre_labels = [labels[cy, cx] for cy, cx, _ in discs]
    assert 0 not in centre_labels and len(set(centre_labels)) == 10


def test_batch_threshold_blank_tiles_and_specks():
    blank, _ = tile([])
    busy, _ = tile([(20, 20, 6), (60, 60, 6)])
    specks, _ = tile([(20, 20, 1), (50, 50, 1)], noise=0)  # single pixels: no nucleus that small
    specks[50, 50] = busy[20, 20]
    counts = count_nuclei(np.stack([blank, busy, specks]))
    assert counts.tolist() == [0, 2, 0]
    assert count_nuclei(blank[None]).tolist() == [0]  # nothing to threshold: no nuclei, not noise
    u8 = (np.stack([blank, busy]) * 255).round().astype(np.uint8)
    assert count_nuclei(u8).tolist() == [0, 2]


def test_otsu_threshold_by_hand():
    values = np.r_[np.full(50, 0.1), np.full(30, 0.9)]
    # Ten bins over [0, 1]: the classes are bin 1 (centre 0.15) and bin 9; the split is after bin 1.
    assert otsu_threshold(values, bins=10, value_range=(0, 1)) == pytest.approx(0.15)
    assert otsu_threshold(np.full(5, 0.3)) == np.inf


def test_count_per_area_only_on_large_enough_tiles():
    assert nuclei_unavailable(256) is None
    assert nuclei_unavailable(MIN_NUCLEI_TILE_PX, um_per_px=MAX_NUCLEI_UM_PER_PX) is None
    assert "16 px" in nuclei_unavailable(16)
    assert "um per pixel" in nuclei_unavailable(64, um_per_px=4.0)
