"""Pyramidal OME-TIFF virtual slides: what QuPath and napari read back, written in bands."""

import math
import time
import tracemalloc
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import tifffile
import zarr

from stmdit.sections.ometiff import write_ome_tiff


def structured_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Noise on gradients: every pixel differs from its neighbours, and the channels differ."""
    rng = np.random.default_rng(seed)
    rows = np.linspace(0, 160, height)[:, None]
    cols = np.linspace(0, 90, width)[None, :]
    base = np.stack(np.broadcast_arrays(rows + cols, 200 - rows, 60 + cols + rows / 2), axis=-1)
    return np.clip(base + rng.integers(0, 60, (height, width, 3)), 0, 255).astype(np.uint8)


def reference_halve(image: np.ndarray) -> np.ndarray:
    """2x2 means over the pixels that exist (an odd edge has 2 or 1), rounded half up."""
    h, w, _ = image.shape
    hh, hw = -(-h // 2), -(-w // 2)
    total = np.zeros((2 * hh, 2 * hw, 3))
    total[:h, :w] = image
    count = np.zeros((2 * hh, 2 * hw, 1))
    count[:h, :w] = 1
    sums = total.reshape(hh, 2, hw, 2, 3).sum(axis=(1, 3))
    counts = count.reshape(hh, 2, hw, 2, 1).sum(axis=(1, 3))
    return np.floor(sums / counts + 0.5).astype(np.uint8)


def slicing(image: np.ndarray):
    return lambda y0, y1: image[y0:y1]


def read_levels(path) -> list[np.ndarray]:
    with tifffile.TiffFile(path) as tif:
        return [level.asarray() for level in tif.series[0].levels]


def test_round_trip_pyramid_metadata_and_lazy_read(tmp_path):
    image = structured_image(999, 1301)
    path = tmp_path / "virtual.ome.tif"
    info = write_ome_tiff(
        path, slicing(image), 999, 1301, 0.25, tile=128, band_rows=128, min_level_px=100, name="C2 virtual"
    )

    shapes = [[999, 1301], [500, 651], [250, 326], [125, 163], [63, 82]]
    assert info == {"path": str(path), "levels": shapes, "um_per_px": [0.25, 0.5, 1.0, 2.0, 4.0], "tile": 128}
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome
        levels = tif.series[0].levels
        assert [list(level.shape) for level in levels] == [[h, w, 3] for h, w in shapes]
        np.testing.assert_array_equal(levels[0].asarray(), image)
        expected = image
        for k, level in enumerate(levels[1:], start=1):
            expected = reference_halve(expected)
            np.testing.assert_array_equal(level.asarray(), expected, err_msg=f"level {k}")
            page = level.keyframe
            assert page.subfiletype == 1
            px_per_cm = page.tags["XResolution"].value
            assert page.tags["ResolutionUnit"].value == 3  # centimetre
            assert px_per_cm[0] / px_per_cm[1] == pytest.approx(1e4 / (0.25 * 2**k))
        page = levels[0].keyframe
        assert (page.tilewidth, page.tilelength) == (128, 128)
        assert page.photometric == tifffile.PHOTOMETRIC.RGB
        assert page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        pixels = next(el for el in ET.fromstring(tif.ome_metadata).iter() if el.tag.endswith("Pixels"))
        image_el = next(el for el in ET.fromstring(tif.ome_metadata).iter() if el.tag.endswith("Image"))
    assert float(pixels.get("PhysicalSizeX")) == float(pixels.get("PhysicalSizeY")) == 0.25
    assert pixels.get("PhysicalSizeXUnit") == pixels.get("PhysicalSizeYUnit") == "µm"
    assert image_el.get("Name") == "C2 virtual"

    # napari's tifffile path: the pyramid as a zarr group read lazily, level by level.
    with tifffile.imread(path, aszarr=True) as store:
        group = zarr.open(store, mode="r")
        np.testing.assert_array_equal(group["1"][:], reference_halve(image))
        np.testing.assert_array_equal(group["0"][200:300, 1000:1100], image[200:300, 1000:1100])


@pytest.mark.parametrize("band_rows", [5, 37, 48, 1000])
def test_levels_do_not_depend_on_band_rows(tmp_path, band_rows):
    """Bands smaller than a tile, or than 2**k rows, or not aligned to either, give the same pyramid."""
    image = structured_image(301, 263, seed=1)
    path = tmp_path / "small.ome.tif"
    write_ome_tiff(path, slicing(image), 301, 263, 0.5, tile=32, band_rows=band_rows, min_level_px=40)
    levels = read_levels(path)
    assert [lv.shape[:2] for lv in levels] == [(301, 263), (151, 132), (76, 66), (38, 33)]
    expected = image
    for k, level in enumerate(levels):
        np.testing.assert_array_equal(level, expected, err_msg=f"level {k}")
        expected = reference_halve(expected)


def test_source_is_read_in_bands_once_per_level(tmp_path):
    image = structured_image(1000, 300)
    calls = []

    def read_band(y0, y1):
        calls.append((y0, y1))
        return image[y0:y1]

    info = write_ome_tiff(tmp_path / "bands.ome.tif", read_band, 1000, 300, 1.0, tile=64, band_rows=128)
    assert max(y1 - y0 for y0, y1 in calls) <= 128
    covered = np.zeros(1000, int)
    for y0, y1 in calls:
        covered[y0:y1] += 1
    assert (covered == len(info["levels"])).all()  # every row, once per level
    assert len(info["levels"]) == 3


def test_peak_memory_stays_a_few_bands_for_a_large_section(tmp_path):
    side, band_rows = 6000, 256

    def read_band(y0, y1):  # pixels drawn from their indices: no full image exists anywhere
        rows = (np.arange(y0, y1) % 256).astype(np.uint8)[:, None]
        cols = (np.arange(side) % 256).astype(np.uint8)[None, :]
        band = np.empty((y1 - y0, side, 3), np.uint8)
        band[..., 0] = rows + cols
        band[..., 1] = (rows * 3) ^ cols
        band[..., 2] = cols // 2 + rows // 2
        return band

    band_bytes = band_rows * side * 3
    start = time.perf_counter()
    tracemalloc.start()
    try:
        info = write_ome_tiff(tmp_path / "big.ome.tif", read_band, side, side, 0.5, band_rows=band_rows)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    seconds = time.perf_counter() - start
    # The docstring claims about three bands (2.5 to 3 measured); the whole image is 108 MB.
    assert peak < 4 * band_bytes < side * side * 3 / 4, f"peak {peak / 1e6:.1f} MB"
    assert len(info["levels"]) == 6
    with tifffile.TiffFile(tmp_path / "big.ome.tif") as tif:
        level = tif.series[0].levels[1]
        np.testing.assert_array_equal(level.asarray()[:300], reference_halve(read_band(0, 600)))
    assert seconds < 60


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (
            lambda band: band.astype(np.float32),
            r"read_band\(0, 64\) returned shape \(64, 200, 3\) dtype float32",
        ),
        (lambda band: band[:, :199], r"read_band\(0, 64\) returned shape \(64, 199, 3\)"),
        (lambda band: band[..., 0], r"rows \[0, 64\) as shape \(64, 200, 3\) dtype uint8"),
    ],
)
def test_wrong_bands_are_named(tmp_path, bad, message):
    image = structured_image(100, 200)
    with pytest.raises(ValueError, match=message):
        write_ome_tiff(
            tmp_path / "x.ome.tif", lambda y0, y1: bad(image[y0:y1]), 100, 200, 1.0, tile=64, band_rows=64
        )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"um_per_px": 0.0}, "um_per_px"),
        ({"um_per_px": -1.0}, "um_per_px"),
        ({"um_per_px": math.nan}, "um_per_px"),
        ({"um_per_px": math.inf}, "um_per_px"),
        ({"height": 0}, "height and width"),
        ({"width": 0}, "height and width"),
        ({"band_rows": 0}, "band_rows"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, message):
    args = {"height": 10, "width": 10, "um_per_px": 1.0, **kwargs}
    with pytest.raises(ValueError, match=message):
        write_ome_tiff(tmp_path / "x.ome.tif", slicing(structured_image(10, 10)), **args)
    assert list(tmp_path.iterdir()) == []


def failing_after(image: np.ndarray, calls_allowed: int):
    """A source whose read number ``calls_allowed + 1`` (in level 0 or a later level) returns a bad band."""
    calls = []

    def read_band(y0, y1):
        calls.append((y0, y1))
        band = image[y0:y1]
        return band if len(calls) <= calls_allowed else band[:, :-1]

    return read_band


@pytest.mark.parametrize("calls_allowed", [3, 12])  # 8 bands per level: level 0 and level 1
def test_failure_midway_leaves_nothing(tmp_path, calls_allowed):
    image = structured_image(512, 300)
    out = tmp_path / "slides"
    out.mkdir()
    with pytest.raises(ValueError, match="read_band"):
        write_ome_tiff(
            out / "x.ome.tif", failing_after(image, calls_allowed), 512, 300, 1.0, tile=64, band_rows=64
        )
    assert list(out.iterdir()) == []


def test_writing_over_an_existing_slide_replaces_it_whole(tmp_path):
    path = tmp_path / "x.ome.tif"
    big, small = structured_image(700, 900, seed=2), structured_image(200, 150, seed=3)
    write_ome_tiff(path, slicing(big), 700, 900, 1.0, tile=64)

    # A failed overwrite keeps the old slide as it was.
    before = path.read_bytes()
    with pytest.raises(ValueError):
        write_ome_tiff(path, failing_after(small, 1), 200, 150, 1.0, tile=64, band_rows=64)
    assert path.read_bytes() == before

    write_ome_tiff(path, slicing(small), 200, 150, 2.0, tile=64, min_level_px=100)
    fresh = tmp_path / "fresh.ome.tif"
    write_ome_tiff(fresh, slicing(small), 200, 150, 2.0, tile=64, min_level_px=100)
    assert path.stat().st_size == fresh.stat().st_size  # nothing of the bigger slide is left
    levels = read_levels(path)
    assert [lv.shape for lv in levels] == [(200, 150, 3), (100, 75, 3)]
    np.testing.assert_array_equal(levels[0], small)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh.ome.tif", "x.ome.tif"]
