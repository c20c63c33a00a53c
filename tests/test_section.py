"""Whole-section virtual H&E: tile placement and blending by hand, then a whole her2st section
with a tiny random pipeline (the geometry, the real reference, the cache and the files)."""

import json
import math
import shutil

import anndata as ad
import numpy as np
import pytest
from PIL import Image

from conftest import rewrite_spots
from stmdit import STMDiTPipeline
from stmdit.data.images import tissue_fraction
from stmdit.data.store import DatasetStore
from stmdit.sections.export import section_command, write_section_files
from stmdit.sections.mosaic import (
    SectionGeometry,
    assemble_mosaic,
    blend_window,
    synthesize_section,
)

WHITE = 255


def uniform(value, side: int, n: int = 1) -> np.ndarray:
    return np.broadcast_to(np.asarray(value, np.uint8), (n, side, side, 3)).copy()


# -- geometry by hand --------------------------------------------------------------------------------


def test_tiles_land_at_their_spot_centres_with_their_physical_size():
    # 2 µm per output pixel and 20 µm tiles: every tile is 10 x 10 output pixels, whatever its own pixels.
    geometry = SectionGeometry.covering(np.array([[20.0, 20.0], [60.0, 30.0]]), tile_um=20, um_per_px=2)
    assert geometry == SectionGeometry(2.0, (10.0, 10.0), 30, 15)
    canvas = SectionGeometry(2.0, (0.0, 0.0), 40, 30)
    red, blue = (200, 30, 30), (30, 30, 200)
    tiles = np.concatenate([uniform(red, 16), uniform(blue, 16)])  # 16 px tiles are resized to 10 px
    mosaic, coverage = assemble_mosaic(tiles, np.array([[20.0, 20.0], [60.0, 30.0]]), 20, canvas)
    assert mosaic.shape == (30, 40, 3) and mosaic.dtype == np.uint8
    expected = np.full((30, 40, 3), WHITE, np.uint8)
    expected[5:15, 5:15] = red  # centre (20, 20) µm = pixel (10, 10); 10 px around it
    expected[10:20, 25:35] = blue  # centre (60, 30) µm = pixel (30, 15)
    np.testing.assert_array_equal(mosaic, expected)
    np.testing.assert_array_equal(coverage, (expected != WHITE).any(axis=-1))

    # Off-grid centres snap to the nearest pixel; tiles crossing the canvas edge are clipped.
    mosaic, coverage = assemble_mosaic(uniform(red, 10, 2), np.array([[21.4, 20.0], [2.0, 56.0]]), 20, canvas)
    assert coverage[5:15, 6:16].all() and coverage[23:30, 0:6].all()  # the second: cols -4..5, rows 23..32
    assert coverage.sum() == 10 * 10 + 7 * 6


def test_overlaps_blend_smoothly_and_only_there():
    a, b = 40, 220
    canvas = SectionGeometry(1.0, (0.0, 0.0), 70, 40)
    centres = np.array(
        [[20.0, 20.0], [50.0, 20.0]]
    )  # 40 µm tiles: columns 0..39 and 30..69 overlap in 30..39
    mosaic, coverage = assemble_mosaic(np.concatenate([uniform(a, 40), uniform(b, 40)]), centres, 40, canvas)
    assert coverage.all()
    row = mosaic[20, :, 0].astype(int)
    assert (mosaic[:, :30] == a).all() and (mosaic[:, 40:] == b).all()
    assert ((row[30:40] > a) & (row[30:40] < b)).all() and (np.diff(row[29:41]) > 0).all()
    # The normalised weights sum to 1: two tiles of one value give that value exactly in the overlap.
    same, _ = assemble_mosaic(uniform(a, 40, 2), centres, 40, canvas)
    assert (same == a).all()


def test_blend_window():
    w = blend_window(32)
    assert (w > 0).all() and (w <= 1).all() and np.allclose(w, w[::-1])
    assert (w[8:24] == 1).all() and (np.diff(w[:8]) > 0).all()
    assert (blend_window(8, feather=0) == 1).all()
    with pytest.raises(ValueError, match="feather"):
        blend_window(8, feather=0.6)


# -- a whole section -------------------------------------------------------------------------------------


def c2_extent_px(store, um_per_px: float) -> tuple[int, tuple[int, int]]:
    """The number of kept C2 spots and the (height, width) of a canvas holding their 128 µm tiles."""
    spots = store.spots()
    kept = spots.obs[(spots.obs["sample_id"] == "C2") & spots.obs["keep"]]
    mpp = spots.uns["stmdit"]["samples"]["C2"]["mpp"]
    extent = [(kept[k].max() - kept[k].min()) * mpp + 128 for k in ("y_px", "x_px")]
    return len(kept), tuple(math.ceil(e / um_per_px - 1e-6) for e in extent)


@pytest.mark.slow
def test_whole_section_on_her2st(tiny_pipe, her2st_store, tmp_path):
    settings = {
        "pipe": tiny_pipe,
        "dataset": her2st_store,
        "sample": "C2",
        "steps": 2,
        "cache_dir": tmp_path / "cache",
    }
    result = synthesize_section(progress=False, **settings)
    paths = result.save(tmp_path / "out")

    # Default scale: the generated tiles' own (128 µm / 32 px).
    n_kept, (height, width) = c2_extent_px(her2st_store, 4.0)
    assert result.geometry.um_per_px == 4.0 and result.tiles.shape == (n_kept, 32, 32, 3)
    assert result.virtual.shape == result.real.shape == (height, width, 3)

    # Every kept spot has its tile, unchanged (no resampling at this scale, no overlap on legacy ST),
    # at its centre; between spots (200 µm pitch, 128 µm tiles) the canvas is white.
    centres = result.centres_px()
    cols, rows = np.floor(centres).astype(int).T
    assert result.coverage[rows, cols].all()
    for tile, (cx, cy) in zip(result.tiles, centres, strict=True):
        c0, r0 = round(cx - 16), round(cy - 16)
        np.testing.assert_array_equal(result.virtual[r0 : r0 + 32, c0 : c0 + 32], tile)
    assert 0.1 < result.coverage.mean() < 0.6 and (result.virtual[~result.coverage] == WHITE).all()

    # The real side holds tissue and lies where the store's tiles were cut: at each spot it matches
    # the spot's real tile far better than two pixels off.
    assert tissue_fraction(result.real, threshold=0.1) > 0.3  # stained (saturation > 0.1), not glass
    real_tiles = her2st_store.tiles().oindex[result.spots["store_row"].to_numpy()].astype(int)

    padded = np.pad(result.real, ((2, 2), (2, 2), (0, 0)), mode="edge").astype(int)

    def mismatch(shift: int) -> float:
        """Mean |real canvas - store tile| over the spots, the canvas window moved ``shift`` px right."""
        errors = []
        for tile, (cx, cy) in zip(real_tiles, centres, strict=True):
            r0, c0 = round(cy - 16) + 2, round(cx - 16) + 2 + shift  # + 2: the padding
            errors.append(np.abs(padded[r0 : r0 + 32, c0 : c0 + 32] - tile).mean())
        return float(np.mean(errors))

    assert mismatch(0) < 15 and mismatch(0) < 0.6 * mismatch(2)

    # The files: the mosaic at its own pixels, and real | virtual side by side at the same scale.
    record = json.loads(paths["geometry"].read_text())
    assert record["um_per_px"] == 4.0 and (record["width"], record["height"]) == (width, height)
    assert record["settings"]["seed"] == 0 and record["n_spots"] == n_kept
    figure = np.asarray(Image.open(paths["side_by_side"]).convert("RGB"))
    np.testing.assert_array_equal(np.asarray(Image.open(paths["virtual"]).convert("RGB")), result.virtual)
    for name, panel in (("real", result.real), ("virtual", result.virtual)):
        x0, y0, x1, y1 = record["side_by_side_panels"][name]
        assert (x1 - x0, y1 - y0) == (width, height)
        np.testing.assert_array_equal(figure[y0:y1, x0:x1], panel)
    assert figure.shape[1] > 2 * width and figure.shape[0] > height

    # A rerun takes every tile from the cache: nothing generated, the same bytes. (Not timed: at
    # two steps of a tiny model, generating is too small a share of the call to win reliably
    # against a busy machine's noise.)
    before = {k: p.read_bytes() for k, p in paths.items()}
    again = synthesize_section(progress=False, **settings)
    again_paths = again.save(tmp_path / "out")
    assert again.n_generated == 0
    assert {k: p.read_bytes() for k, p in again_paths.items()} == before

    # An interrupted run resumes: only the missing tiles are made, with the same noise per spot,
    # whatever the batch size.
    cached = sorted((tmp_path / "cache").glob("*/*.npy"))
    assert len(cached) == n_kept
    for path in cached[::4]:
        path.unlink()
    resumed = synthesize_section(progress=False, **settings, batch_size=40)
    assert resumed.n_generated == len(cached[::4])
    assert np.abs(resumed.tiles.astype(int) - result.tiles).max() <= 1


@pytest.mark.slow
def test_section_command_with_morphology_at_another_scale(tiny_pipe, her2st_store, tmp_path):
    tiny_pipe.save_pretrained(tmp_path / "pipeline")
    paths = section_command(tmp_path / "pipeline", her2st_store.root, "C2", tmp_path / "out", steps=1,
                            use_morphology=True, um_per_px=8.0, batch_size=64, mode="spots")  # fmt: skip
    record = json.loads(paths["geometry"].read_text())
    assert record["um_per_px"] == 8.0 and record["settings"]["use_morphology"] is True
    n_kept, (height, width) = c2_extent_px(her2st_store, 8.0)
    virtual = np.asarray(Image.open(paths["virtual"]))
    assert virtual.shape == (height, width, 3) and record["n_spots"] == n_kept
    # At 8 µm per pixel a 128 µm tile is 16 x 16 px (resized from 32), and legacy ST tiles do not touch.
    assert abs((virtual != WHITE).any(axis=-1).sum() - n_kept * 16 * 16) < 0.01 * n_kept * 16 * 16
    assert len(list((tmp_path / "out" / "cache").glob("*/*.npy"))) == n_kept
    assert paths["anndata"].name == "C2_section.h5ad" and "spatialdata" not in paths


# -- the section in scanpy and SpatialData ----------------------------------------------------------------


@pytest.fixture(scope="module")
def c2_section(tiny_pipe, her2st_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("section")
    result = synthesize_section(tiny_pipe, her2st_store, "C2", steps=1, um_per_px=8.0, progress=False)
    return result, write_section_files(result, out, spatialdata=out / "C2.zarr")


def grey_at(image, xy, r=1):
    """Mean grey level of the (2r+1)^2 pixels around each point (x, y)."""
    return np.array([image[int(y) - r : int(y) + r + 1, int(x) - r : int(x) + r + 1].mean() for x, y in xy])


def test_section_anndata_overlays_expression_on_real_and_virtual_at_the_same_coordinates(
    c2_section, her2st_store
):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scanpy as sc

    result, paths = c2_section
    adata = sc.read_h5ad(paths["anndata"])
    assert adata.n_obs == len(result.spots) and set(adata.uns["spatial"]) == {"C2", "C2_virtual"}
    real, virtual = (adata.uns["spatial"][k] for k in ("C2", "C2_virtual"))
    assert real["scalefactors"] == virtual["scalefactors"]
    assert real["images"]["hires"].shape == virtual["images"]["hires"].shape
    xy = adata.obsm["spatial"] * real["scalefactors"]["tissue_hires_scalef"]

    # The virtual image holds each spot's generated tile at the spot: its grey level there follows the
    # tile's own centre, and the real image follows the store's real tile; 3 pixels off, much less so.
    tile_grey = result.tiles[:, 12:20, 12:20].mean(axis=(1, 2, 3))
    store_grey = (
        her2st_store.tiles()
        .oindex[result.spots["store_row"].to_numpy()][:, 12:20, 12:20]
        .mean(axis=(1, 2, 3))
    )
    for image, truth in ((virtual["images"]["hires"], tile_grey), (real["images"]["hires"], store_grey)):
        here = np.corrcoef(grey_at(image, xy), truth)[0, 1]
        off = np.corrcoef(grey_at(image, xy + [3, 0]), truth)[0, 1]
        assert here > 0.6 and here > off + 0.3

    # scanpy draws the spots at the same place on both images.
    gene = adata.var_names[np.argmax(np.asarray(adata.X.sum(axis=0)).ravel())]
    offsets = {}
    for library in ("C2", "C2_virtual"):
        ax = sc.pl.spatial(adata, library_id=library, color=gene, show=False)[0]
        assert ax.get_images()
        # scanpy draws the spots as one circle path each, in image pixels.
        paths_ = ax.collections[0].get_paths()
        offsets[library] = np.array([(c.vertices.min(axis=0) + c.vertices.max(axis=0)) / 2 for c in paths_])
        plt.close("all")
    np.testing.assert_allclose(offsets["C2"], offsets["C2_virtual"])
    # scanpy draws in the order of the colour values: compare as sets of points.
    drawn, spots = (a[np.lexsort(a.T)] for a in (offsets["C2"], xy))
    np.testing.assert_allclose(drawn, spots, atol=0.05)

    # Per-spot comparisons of the real and the virtual tile.
    assert {"tissue_fraction_real", "tissue_fraction_virtual", "real_virtual_mean_abs_diff"} <= set(adata.obs)
    assert (adata.obs["real_virtual_mean_abs_diff"] > 0).all()


def test_section_spatialdata_round_trip_in_one_coordinate_system(c2_section):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import spatialdata
    import spatialdata_plot  # noqa: F401 (registers the .pl accessor)
    from spatialdata.transformations import get_transformation

    result, paths = c2_section
    sdata = spatialdata.read_zarr(paths["spatialdata"])
    assert set(sdata.images) == {"C2_real", "C2_virtual"} and set(sdata.shapes) == {"C2_spots"}
    for name in (*sdata.images, *sdata.shapes):
        assert set(get_transformation(sdata[name], get_all=True)) == {"global"}
    np.testing.assert_array_equal(sdata["C2_real"]["scale0"]["image"].values.transpose(1, 2, 0), result.real)
    np.testing.assert_array_equal(
        sdata["C2_virtual"]["scale0"]["image"].values.transpose(1, 2, 0), result.virtual
    )

    # The spots, the table and the images agree: each circle is at its spot's full-resolution pixel, and
    # the images' transformation takes the spot's canvas pixel there.
    table = sdata.tables["table"]
    circles = sdata["C2_spots"]
    assert (
        table.uns["spatialdata_attrs"]["region"] == "C2_spots" and (table.obs["region"] == "C2_spots").all()
    )
    centres = np.column_stack([circles.geometry.x, circles.geometry.y])[table.obs["spot_id"].to_numpy()]
    mpp = result.real_image["mpp"]
    np.testing.assert_allclose(centres, result.spots[["x_um", "y_um"]].to_numpy() / mpp)
    np.testing.assert_allclose(circles["radius"], 100 / mpp / 2)  # legacy ST: 100 µm spots
    affine = get_transformation(sdata["C2_virtual"], "global").to_affine_matrix(("x", "y"), ("x", "y"))
    canvas = np.column_stack([result.centres_px(), np.ones(len(centres))])
    np.testing.assert_allclose((canvas @ affine.T)[:, :2], centres, atol=1e-6)
    assert (
        table.n_obs == len(result.spots)
        and table.layers["counts"].sum() == result.expression.layers["counts"].sum()
    )

    # spatialdata-plot renders both layers over the same extent of the coordinate system.
    extents = {}
    for name in ("C2_real", "C2_virtual"):
        fig, ax = plt.subplots()
        sdata.pl.render_images(name).pl.show(coordinate_systems="global", ax=ax)
        extents[name] = (*ax.get_xlim(), *ax.get_ylim())
        plt.close(fig)
    assert extents["C2_real"] == extents["C2_virtual"]
    g = result.geometry
    x0, x1, y1, y0 = extents["C2_real"]
    np.testing.assert_allclose([x0, y0], np.array(g.origin_um) / mpp, atol=g.um_per_px / mpp)
    np.testing.assert_allclose(
        [x1 - x0, y1 - y0], np.array([g.width, g.height]) * g.um_per_px / mpp, rtol=0.02
    )


# -- bad input --------------------------------------------------------------------------------------------


@pytest.fixture
def store_without_image(her2st_store, tmp_path):
    root = tmp_path / "store"
    shutil.copytree(her2st_store.root, root)
    adata = ad.read_h5ad(root / "spots.h5ad")
    del adata.uns["stmdit"]["samples"]["C2"]["image_path"]
    rewrite_spots(root, adata)
    return DatasetStore(root)


def test_clear_errors(tiny_pipe, her2st_store, store_without_image):
    with pytest.raises(ValueError, match=r"no sample 'Z9'; it has \['C2', 'C3', 'C4'\]"):
        synthesize_section(tiny_pipe, her2st_store, "Z9")
    with pytest.raises(ValueError, match="sample 'C2' has no H&E image"):
        synthesize_section(tiny_pipe, store_without_image, "C2")
    no_ge = STMDiTPipeline(
        tiny_pipe.transformer, tiny_pipe.scheduler, None, tiny_pipe.morphology_encoder, None
    )
    with pytest.raises(ValueError, match="needs a ge_encoder"):
        synthesize_section(no_ge, her2st_store, "C2")
    no_morph = STMDiTPipeline(tiny_pipe.transformer, tiny_pipe.scheduler, tiny_pipe.ge_encoder, None, None)
    with pytest.raises(ValueError, match="use_morphology needs a pipeline with a morphology_encoder"):
        synthesize_section(no_morph, her2st_store, "C2", use_morphology=True)
    with pytest.raises(FileNotFoundError, match="not a prepared dataset"):
        synthesize_section(tiny_pipe, her2st_store.root / "missing", "C2")
