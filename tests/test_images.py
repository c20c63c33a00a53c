import importlib.util
import os
import sys

import numpy as np
import pytest
import tifffile
from PIL import Image

from stmdit.data.images import (
    open_image,
    saturation,
    tissue_fraction,
    tissue_fractions,
    tissue_mask,
    tissue_threshold,
    unusable_reason,
)

MPP = 0.5  # written into the test TIFF's resolution tags


def smooth_rgb(h: int, w: int) -> np.ndarray:
    """An image without detail finer than ~40 px, so that every resampling path (block means of
    a lower level, Lanczos from level 0) gives nearly the same pixels."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r = 128 + 100 * np.sin(xx / 37.0) * np.cos(yy / 53.0)
    g = 128 + 90 * np.cos(xx / 61.0 + yy / 47.0)
    b = 40 + 200 * xx / w
    return np.stack([r, g, b], axis=-1).clip(0, 255).astype(np.uint8)


def block_mean(a: np.ndarray, k: int) -> np.ndarray:
    h, w = a.shape[0] // k * k, a.shape[1] // k * k
    return a[:h, :w].reshape(h // k, k, w // k, k, 3).mean(axis=(1, 3)).round().astype(np.uint8)


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory):
    """A tiled, zlib-compressed pyramidal TIFF with 3 levels (1, 1/2, 1/4) and 0.5 um/px tags,
    laid out as HEST and libvips write it (reduced levels as further top-level pages)."""
    full = smooth_rgb(1200, 1600)
    path = tmp_path_factory.mktemp("tiff") / "slide.tif"
    with tifffile.TiffWriter(path) as tw:
        opts = {"tile": (128, 128), "photometric": "rgb", "compression": "zlib"}
        tw.write(full, resolution=(1e4 / MPP, 1e4 / MPP), resolutionunit="CENTIMETER", **opts)
        tw.write(block_mean(full, 2), subfiletype=1, **opts)
        tw.write(block_mean(full, 4), subfiletype=1, **opts)
    return path, full


def record_levels(img):
    """Make ``img`` remember which pyramid levels its reads touch."""
    seen = []
    read = img._read_level

    def spy(level, *box):
        seen.append(level)
        return read(level, *box)

    img._read_level = spy
    return seen


def test_tiff_metadata_levels_and_exact_level0_reads(pyramid):
    path, full = pyramid
    img = open_image(path)
    assert (img.width, img.height) == (1600, 1200)
    assert img.mpp == pytest.approx(MPP)
    assert img.level_sizes == [(1600, 1200), (800, 600), (400, 300)]
    seen = record_levels(img)
    np.testing.assert_array_equal(img.read_region(100, 200, 300, 150), full[200:350, 100:400])
    assert seen == [0]


def test_tiff_downsampled_read_uses_a_lower_level_and_matches_the_full_crop(pyramid):
    path, full = pyramid
    img = open_image(path)
    seen = record_levels(img)
    out = img.read_region(400, 240, 480, 480, out_size=120)  # 4 level-0 px per output px
    assert out.shape == (120, 120, 3) and out.dtype == np.uint8
    assert seen and set(seen) == {2}
    expected = np.asarray(
        Image.fromarray(full[240:720, 400:880]).resize((120, 120), Image.Resampling.LANCZOS)
    )
    assert np.abs(out.astype(float) - expected).mean() < 2.0
    # 3 px per output px: level 1 (2x) is the coarsest level that still suffices.
    seen.clear()
    img.read_region(400, 240, 360, 360, out_size=120)
    assert set(seen) == {1}


def test_tiff_reads_pad_outside_the_image_with_white(pyramid):
    path, full = pyramid
    img = open_image(path)
    corner = img.read_region(-50, -30, 100, 100)
    assert (corner[:30] == 255).all() and (corner[:, :50] == 255).all()
    np.testing.assert_array_equal(corner[30:, 50:], full[:70, :50])
    edge = img.read_region(1550, 1150, 100, 100)
    np.testing.assert_array_equal(edge[:50, :50], full[1150:, 1550:])
    assert (edge[50:] == 255).all() and (edge[:, 50:] == 255).all()
    assert (img.read_region(5000, 5000, 64, 64, out_size=16) == 255).all()
    assert (
        img.contains(0, 0, 1600, 1200)
        and not img.contains(1550, 0, 100, 10)
        and not img.contains(-1, 0, 5, 5)
    )


def test_fractional_coordinates_and_thumbnail(pyramid):
    path, full = pyramid
    img = open_image(path)
    shifted = img.read_region(100.5, 200.5, 64, 64)
    assert shifted.shape == (64, 64, 3)
    between = (full[200:264, 100:164].astype(float) + full[201:265, 101:165]) / 2
    assert np.abs(shifted - between).mean() < 2.0
    seen = record_levels(img)
    thumb, scale = img.thumbnail(400)
    assert thumb.shape == (300, 400, 3) and scale == pytest.approx(0.25)
    assert set(seen) == {2}


def test_openslide_backend_reads_the_same_pixels(pyramid):
    pytest.importorskip("openslide")
    path, full = pyramid
    img = open_image(path, backend="openslide")
    assert img.level_sizes == [(1600, 1200), (800, 600), (400, 300)] and img.mpp == pytest.approx(MPP)
    np.testing.assert_array_equal(img.read_region(100, 200, 300, 150), full[200:350, 100:400])
    corner = img.read_region(-10, -10, 20, 20)
    assert (corner[:10] == 255).all()
    tiff = open_image(path).read_region(400, 240, 480, 480, out_size=120)
    assert np.abs(img.read_region(400, 240, 480, 480, out_size=120).astype(float) - tiff).mean() < 1.0


def test_missing_openslide_names_the_package(tmp_path, monkeypatch):
    slide = tmp_path / "case.svs"
    slide.write_bytes(b"not a slide")
    monkeypatch.setitem(sys.modules, "openslide", None)
    with pytest.raises(ImportError, match=r"case\.svs.*pip install openslide-python openslide-bin"):
        open_image(slide)


def test_pixel_size_from_tags_argument_or_nowhere(tmp_path):
    rgb = smooth_rgb(64, 64)
    screen = tmp_path / "screen.tif"  # 72 dpi: what writers put in files that never saw a scanner
    tifffile.imwrite(screen, rgb, photometric="rgb", resolution=(72, 72), resolutionunit="INCH")
    assert open_image(screen).mpp is None
    assert open_image(screen, mpp=0.25).mpp == 0.25
    png = tmp_path / "tile.png"
    Image.fromarray(rgb).save(png, dpi=(300, 300))  # PNG/JPEG density is ignored
    assert open_image(png).mpp is None
    ome = tmp_path / "cells.ome.tif"
    tifffile.imwrite(ome, rgb, photometric="rgb", metadata={"PhysicalSizeX": 0.2125, "PhysicalSizeY": 0.2125})
    assert open_image(ome).mpp == pytest.approx(0.2125)
    tagged = tmp_path / "tagged.tif"
    tifffile.imwrite(
        tagged, rgb, photometric="rgb", resolution=(1e4 / MPP, 1e4 / MPP), resolutionunit="CENTIMETER"
    )
    with pytest.warns(UserWarning, match=r"tagged\.tif.*states 0\.5 um/px"):
        assert open_image(tagged, mpp=1.0).mpp == pytest.approx(MPP)


def test_pil_images_are_cached_and_transparency_is_white(tmp_path):
    rgba = np.zeros((40, 60, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:20, :, 3] = 255  # top half opaque red, bottom half transparent
    path = tmp_path / "half.png"
    Image.fromarray(rgba, "RGBA").save(path)
    img = open_image(path, mpp=1.0)
    out = img.read_region(0, 0, 60, 40)
    assert (out[:20] == [200, 0, 0]).all() and (out[20:] == 255).all()
    assert img.read_region(10, 10, 20, 20, out_size=5).shape == (5, 5, 3)


def test_open_image_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothing\.tif"):
        open_image(tmp_path / "nothing.tif")
    odd = tmp_path / "slide.xyz"
    odd.write_bytes(b"")
    with pytest.raises(ValueError, match=r"slide\.xyz.*unsupported"):
        open_image(odd)
    img = open_image(_write_png(tmp_path / "a.png", smooth_rgb(8, 8)))
    with pytest.raises(ValueError, match=r"a\.png.*positive"):
        img.read_region(0, 0, 0, 5)


def test_undecodable_tiff_says_what_to_install(tmp_path):
    if importlib.util.find_spec("imagecodecs") is not None:
        pytest.skip("imagecodecs is installed, so JPEG tiles decode")
    path = tmp_path / "jpeg.tif"
    Image.fromarray(smooth_rgb(64, 64)).save(path, compression="jpeg")
    with pytest.raises(RuntimeError, match=r"jpeg\.tif: cannot decode.*pip install imagecodecs"):
        open_image(path).read_region(0, 0, 8, 8)


def _write_png(path, rgb):
    Image.fromarray(rgb).save(path)
    return path


def synthetic_section(h=300, w=400, seed=0) -> np.ndarray:
    """Off-white glass with a pink/purple elliptical 'section' textured with nuclei."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 238, dtype=np.float32) + rng.normal(0, 3, (h, w, 3))
    yy, xx = np.mgrid[0:h, 0:w]
    inside = ((yy - h / 2) / (h / 3)) ** 2 + ((xx - w / 2) / (w / 3)) ** 2 < 1
    img[inside] = [215, 140, 190] + rng.normal(0, 10, (inside.sum(), 3))
    nuclei = inside & (rng.random((h, w)) < 0.05)
    img[nuclei] = [90, 60, 150]
    return img.clip(0, 255).astype(np.uint8), inside


def test_tissue_mask_on_a_synthetic_section():
    rgb, truth = synthetic_section()
    mask = tissue_mask(rgb)
    assert mask.shape == truth.shape
    agreement = (mask == truth).mean()
    assert agreement > 0.97
    threshold = tissue_threshold(rgb)
    assert tissue_fraction(rgb[140:160, 190:210], threshold) > 0.95  # inside the section
    assert tissue_fraction(rgb[:20, :20], threshold) < 0.02  # glass


def test_tissue_mask_thresholds_the_median_filtered_saturation():
    """Reference: the 3 x 3 median of the saturation (scipy, reflected edges), thresholded,
    then opening, closing and removal of small objects."""
    from scipy import ndimage

    rgb = synthetic_section(60, 80, seed=3)[0]
    rgb[::7] = 255  # thin glass lines: the median and the morphology both have work to do
    rgb = rgb.astype(float)
    sat = (rgb.max(axis=-1) - rgb.min(axis=-1)) / rgb.max(axis=-1)
    np.testing.assert_allclose(saturation(rgb.astype(np.uint8)), sat, rtol=1e-6)
    for t in (0.1, 0.2, 0.35):
        ref = np.pad(ndimage.median_filter(sat, size=3) > t, 1, mode="edge")
        ref = ndimage.binary_closing(ndimage.binary_opening(ref, np.ones((3, 3))), np.ones((3, 3)))[
            1:-1, 1:-1
        ]
        labels, _ = ndimage.label(ref)
        ref &= np.bincount(labels.ravel())[labels] >= 4
        np.testing.assert_array_equal(tissue_mask(rgb.astype(np.uint8), t), ref)


def test_tissue_fractions_of_a_stack_are_those_of_each_image():
    """Images in a stack do not touch: a section's edge in one tile must not leak into the
    next one's mask (nor its small objects count with the neighbour's)."""
    rgb = synthetic_section(300, 400, seed=1)[0]
    stack = np.stack([rgb[y : y + 40, x : x + 40] for y in range(0, 260, 37) for x in range(0, 360, 53)])
    t = tissue_threshold(rgb)
    expected = [tissue_fraction(tile, t) for tile in stack]
    # glass, the section's edge and tissue, in neighbouring tiles of the stack
    assert min(expected) == 0 and max(expected) > 0.9 and any(0.2 < f < 0.8 for f in expected)
    np.testing.assert_array_equal(tissue_fractions(stack, t), expected)
    np.testing.assert_array_equal(tissue_fractions(stack[::-1], t), expected[::-1])


def test_tissue_mask_on_real_he(test_data):
    """Real H&E: a tile cut from inside tissue is (nearly) all tissue; the Visium lowres image
    has tissue in the middle and glass with fiducial dots around it."""
    for name in ("torchstain_source.png", "torchstain_target.png"):
        rgb = open_image(test_data / "he_tiles" / name).read_region(0, 0, 584, 438)
        assert tissue_fraction(rgb) > 0.9, name
    low = open_image(test_data / "visium_spaceranger_1.0.0" / "spatial" / "tissue_lowres_image.png")
    rgb = low.read_region(0, 0, 600, 600)
    t = tissue_threshold(rgb)
    assert 0.1 < tissue_fraction(rgb, t) < 0.6
    assert tissue_fraction(rgb[250:350, 250:350], t) > 0.5  # centre of the section
    assert tissue_fraction(rgb[20:70, 20:70], t) < 0.02  # glass above the fiducial frame
    assert tissue_fraction(rgb[540:590, 300:350], t) < 0.02  # fiducial dots are grey, not tissue


def test_unusable_images():
    assert unusable_reason(np.zeros((50, 50, 3), np.uint8)) == "the image is all black"
    assert "single colour" in unusable_reason(np.full((50, 50, 3), 128, np.uint8))
    white = np.full((50, 50, 3), 240, np.uint8) + np.random.default_rng(0).integers(
        0, 12, (50, 50, 3)
    ).astype(np.uint8)
    assert unusable_reason(white) == "no tissue was detected in the image"
    assert unusable_reason(synthetic_section()[0]) is None
    assert saturation(np.zeros((2, 2, 3), np.uint8)).max() == 0


def test_visium_black_placeholder_is_unusable(test_data):
    hires = open_image(test_data / "visium_spaceranger_1.0.0" / "spatial" / "tissue_hires_image.png")
    assert unusable_reason(hires.thumbnail(256)[0]) == "the image is all black"


def test_pil_regions_are_resampled_from_the_decoded_image_like_a_patch(pyramid, tmp_path):
    """A JPEG/PNG is resampled straight from its decoded image, a TIFF from a patch cut with a
    margin: the same pixels give the same tiles (inside, at the edge, across it)."""
    path, full = pyramid
    png = open_image(_write_png(tmp_path / "full.png", full), mpp=MPP)
    tiff = open_image(path)
    for box in [
        (100.5, 200.25, 256, 256),
        (0, 0, 300, 300),
        (1400.5, 1000, 200, 200),
        (1500, 1100, 200, 200),
    ]:
        a = png.read_region(*box, out_size=256).astype(int)
        b = tiff.read_region(*box, out_size=256).astype(int)
        assert np.abs(a - b).max() <= 2 and np.mean(a != b) < 0.01, box  # float rounding in Pillow's weights


def test_pil_thumbnail_is_a_block_mean_then_lanczos(tmp_path):
    """Thumbnails reduce by whole blocks down to within 2x of their size: at an integer
    factor that is exactly the block mean."""
    full = smooth_rgb(1200, 1600)
    thumb, scale = open_image(_write_png(tmp_path / "full.png", full), mpp=1.0).thumbnail(400)
    assert thumb.shape == (300, 400, 3) and scale == 0.25
    reference = full.reshape(300, 4, 400, 4, 3).astype(int).sum(axis=(1, 3))
    np.testing.assert_array_equal(thumb, (reference + 8) // 16)  # Pillow rounds halves up


def test_images_open_on_one_file_share_its_decode(tmp_path, monkeypatch):
    path = _write_png(tmp_path / "a.png", smooth_rgb(40, 60))
    decodes = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: decodes.append(a[0]) or real_open(*a, **k))
    first, second = open_image(path, mpp=1.0), open_image(path, mpp=1.0)
    np.testing.assert_array_equal(first.read_region(0, 0, 60, 40), second.read_region(0, 0, 60, 40))
    assert len(decodes) == 3  # two headers, one decode
    _write_png(path, 255 - smooth_rgb(40, 60))  # a changed file is decoded anew
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))  # coarse clocks
    np.testing.assert_array_equal(
        open_image(path, mpp=1.0).read_region(0, 0, 60, 40), 255 - smooth_rgb(40, 60)
    )
