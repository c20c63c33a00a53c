"""The readers' and prepare's AnnData in scanpy's and squidpy's hands: every library plots with
``sc.pl.spatial`` over its own image, with the spots on the tissue, and squidpy builds a spatial
graph; the written h5ad is portable (no absolute path inside, images embedded)."""

import os
import warnings

import matplotlib

matplotlib.use("Agg")

import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import squidpy as sq

from stmdit.data.images import tissue_mask, tissue_threshold
from stmdit.data.readers import (
    aggregate_to_pseudospots,
    concat_samples,
    read_cell_table,
    read_legacy_st,
    read_spatial_h5ad,
    read_spatialdata,
    read_visium,
)
from stmdit.data.readers.convention import ReaderError, read_h5ad
from stmdit.data.store import PrepareConfig, prepare


def tissue_under_spots(image, xy, diameter):
    """Tissue fraction of the image in a square of two spot diameters around each centre (the
    pixel-level mask is patchy inside tissue: fat, pale stroma)."""
    mask = tissue_mask(image, tissue_threshold(image))
    r = max(2, round(diameter))
    return np.array(
        [mask[max(0, int(y) - r) : int(y) + r + 1, max(0, int(x) - r) : int(x) + r + 1].mean() for x, y in xy]
    )


def check_scanpy_ready(adata, min_on_tissue=0.9, has_glass=True):
    """Each library: centres scaled by tissue_hires_scalef inside the hires image and mostly on
    tissue pixels; sc.pl.spatial draws it on both images; squidpy's graph stays within libraries."""
    libraries = list(adata.obs["sample_id"].astype(str).unique())
    assert libraries and set(libraries) <= set(adata.uns["spatial"])
    np.testing.assert_array_equal(adata.obsm["spatial"], adata.obs[["x_px", "y_px"]].to_numpy())
    for library in libraries:
        sub = adata[adata.obs["sample_id"].astype(str) == library]
        entry = adata.uns["spatial"][library]
        scale = entry["scalefactors"]
        assert scale["spot_diameter_fullres"] > 0
        for key in ("hires", "lowres"):
            image = entry["images"][key]
            xy = sub.obsm["spatial"] * scale[f"tissue_{key}_scalef"]
            h, w = image.shape[:2]
            assert ((xy >= 0) & (xy < [w, h])).all(), f"{library} {key}: spots outside the image"
        hires = entry["images"]["hires"]
        on_tissue = tissue_under_spots(hires, sub.obsm["spatial"] * scale["tissue_hires_scalef"],
                                       scale["spot_diameter_fullres"] * scale["tissue_hires_scalef"])  # fmt: skip
        # Control: the same spots on the image turned by 180 degrees land on glass more often.
        control = tissue_under_spots(hires[::-1, ::-1], sub.obsm["spatial"] * scale["tissue_hires_scalef"],
                                     scale["spot_diameter_fullres"] * scale["tissue_hires_scalef"])  # fmt: skip
        assert (on_tissue > 0.1).mean() >= min_on_tissue, f"{library}: {on_tissue} tissue under the spots"
        if has_glass:
            assert (on_tissue > 0.1).mean() > (control > 0.1).mean()
        for key in ("hires", "lowres"):
            axes = sc.pl.spatial(sub, library_id=library, img_key=key, show=False)
            assert axes[0].get_images(), f"{library}: no image drawn"
            plt.close("all")
    adata = adata.copy()
    adata.obs["sample_id"] = adata.obs["sample_id"].astype("category")
    sq.gr.spatial_neighbors(adata, coord_type="generic", n_neighs=6, library_key="sample_id")
    graph = adata.obsp["spatial_connectivities"].tocoo()
    samples = adata.obs["sample_id"].to_numpy()
    assert graph.nnz > 0 and (samples[graph.row] == samples[graph.col]).all()


@pytest.fixture(scope="module")
def her2st(test_data):
    d = test_data / "her2st" / "C2"
    return read_legacy_st(d / "counts.tsv.gz", d / "spots.tsv", d / "he.jpg")


@pytest.fixture(scope="module")
def visium(test_data):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the black hires placeholder
        return read_visium(test_data / "visium_spaceranger_1.0.0", sample_id="V1")


@pytest.fixture(scope="module")
def xenium(test_data):
    d = test_data / "xenium_deepspot_example"
    return read_cell_table(d / "NCBI858.h5ad", d / "NCBI858.jpg", mpp=2.0, x_key="y_pixel", y_key="x_pixel")


def test_her2st_reader_output_in_scanpy_and_squidpy(her2st):
    check_scanpy_ready(her2st)
    # Space Ranger's hires convention: the longer side is 2,000 px.
    assert max(her2st.uns["spatial"]["C2"]["images"]["hires"].shape[:2]) == 2000


def test_visium_reader_output_keeps_space_rangers_scale_factors(visium, test_data):
    check_scanpy_ready(visium)
    entry = visium.uns["spatial"]["V1"]
    # The hires placeholder is black, so the real lowres PNG (600 px) is the best image there is.
    assert entry["scalefactors"]["tissue_hires_scalef"] == pytest.approx(0.045004502)
    assert entry["images"]["hires"].shape[:2] == (600, 600)
    assert entry["scalefactors"]["spot_diameter_fullres"] == pytest.approx(
        65 / visium.uns["stmdit"]["samples"]["V1"]["mpp"]
    )


def test_xenium_cells_and_pseudospots_in_scanpy_and_squidpy(xenium):
    check_scanpy_ready(xenium)
    # Cells of unknown size: the spot diameter is the median distance to the nearest cell.
    assert 1 < xenium.uns["spatial"]["NCBI858"]["scalefactors"]["spot_diameter_fullres"] < 100
    check_scanpy_ready(aggregate_to_pseudospots(xenium, 55.0))


def test_squidpy_crop_through_read_spatial_h5ad(test_data):
    d = test_data / "squidpy_visium_crop"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # normalised values
        adata = read_spatial_h5ad(d / "test_data.h5ad", d / "test_img.jpg", sample_id="crop")
    check_scanpy_ready(adata, has_glass=False)  # a crop inside the tissue: no glass for the control


def test_concatenated_samples_keep_every_library(her2st, visium, xenium):
    both = concat_samples([her2st, visium, xenium])
    assert set(both.uns["spatial"]) == {"C2", "V1", "NCBI858"}
    check_scanpy_ready(both)


def test_prepare_writes_a_portable_scanpy_ready_h5ad(test_data, tmp_path):
    xen = test_data / "xenium_deepspot_example"
    samples = [
        {"format": "visium", "outs_dir": str(test_data / "visium_spaceranger_1.0.0"), "sample_id": "V1"},
        {"format": "legacy_st", "counts": str(test_data / "her2st/C2/counts.tsv.gz"),
         "spots": str(test_data / "her2st/C2/spots.tsv"), "image": str(test_data / "her2st/C2/he.jpg")},
        {"format": "cell_table", "h5ad": str(xen / "NCBI858.h5ad"), "image": str(xen / "NCBI858.jpg"), "mpp": 2.0,
         "x_key": "y_pixel", "y_key": "x_pixel", "pseudospot_um": 55.0},
    ]  # fmt: skip
    config = PrepareConfig(out=str(tmp_path / "store"), samples=samples, tile_um=128.0, tile_px=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        store = prepare(config, progress=False)
    spots_h5ad = store.root / "spots.h5ad"
    plain = sc.read_h5ad(spots_h5ad)  # what a scanpy user gets
    check_scanpy_ready(plain)
    for info in plain.uns["stmdit"]["samples"].values():
        assert not os.path.isabs(info["image_path"])
        assert all(not os.path.isabs(p) for p in info["files"].values())
    resolved = read_h5ad(spots_h5ad)  # what stmdit gets: the files again
    for info in resolved.uns["stmdit"]["samples"].values():
        assert os.path.isfile(info["image_path"]) and all(os.path.isfile(p) for p in info["files"].values())


# -- SpatialData input --------------------------------------------------------------------------------


def visium_spatialdata(visium):
    """spatialdata-io's Visium layout: circles of radius spot_diameter_fullres / 2 in full-resolution
    pixels, an image element reaching full resolution through Scale(1 / scalef)."""
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity, Scale

    entry = visium.uns["spatial"]["V1"]
    scalef, diameter = (
        entry["scalefactors"]["tissue_hires_scalef"],
        entry["scalefactors"]["spot_diameter_fullres"],
    )
    image = Image2DModel.parse(entry["images"]["hires"].transpose(2, 0, 1), dims=("c", "y", "x"),
                               transformations={"global": Scale([1 / scalef, 1 / scalef], axes=("x", "y"))})  # fmt: skip
    circles = ShapesModel.parse(visium.obsm["spatial"], geometry=0, radius=np.full(visium.n_obs, diameter / 2),
                                index=pd.RangeIndex(visium.n_obs), transformations={"global": Identity()})  # fmt: skip
    table = ad.AnnData(X=visium.layers["counts"], obs=pd.DataFrame(index=visium.obs["barcode"].to_numpy()),
                       var=pd.DataFrame(index=visium.var_names))  # fmt: skip
    table.obs["region"] = pd.Categorical(["V1_spots"] * visium.n_obs)
    table.obs["spot_id"] = np.arange(visium.n_obs)
    table = TableModel.parse(table, region="V1_spots", region_key="region", instance_key="spot_id")
    return SpatialData(
        images={"V1_hires_image": image}, shapes={"V1_spots": circles}, tables={"table": table}
    )


def xenium_spatialdata(xenium, pixel_size=2.0):
    """spatialdata-io's Xenium layout: cell circles in microns reaching the image's pixels through
    Scale(1 / pixel_size); the image itself is the coordinate system."""
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity, Scale

    entry = xenium.uns["spatial"]["NCBI858"]
    assert entry["scalefactors"]["tissue_hires_scalef"] == 1.0  # the 1431 px image itself
    image = Image2DModel.parse(entry["images"]["hires"].transpose(2, 0, 1), dims=("c", "y", "x"),
                               transformations={"global": Identity()})  # fmt: skip
    radius_um = np.random.default_rng(0).uniform(4, 8, xenium.n_obs)  # cells of several sizes
    circles = ShapesModel.parse(xenium.obsm["spatial"] * pixel_size, geometry=0, radius=radius_um,
                                index=pd.Index([f"cell{i}" for i in range(xenium.n_obs)]),
                                transformations={"global": Scale([1 / pixel_size] * 2, axes=("x", "y"))})  # fmt: skip
    table = ad.AnnData(X=xenium.layers["counts"], obs=pd.DataFrame(index=xenium.obs["barcode"].to_numpy()),
                       var=pd.DataFrame(index=xenium.var_names))  # fmt: skip
    table.obs["region"] = pd.Categorical(["cell_circles"] * xenium.n_obs)
    table.obs["cell_id"] = [f"cell{i}" for i in range(xenium.n_obs)]
    table = TableModel.parse(table, region="cell_circles", region_key="region", instance_key="cell_id")
    return SpatialData(
        images={"morphology_focus": image}, shapes={"cell_circles": circles}, tables={"table": table}
    )


def test_read_spatialdata_visium_layout_from_a_zarr_store(visium, tmp_path):
    visium_spatialdata(visium).write(tmp_path / "V1.zarr")
    adata = read_spatialdata(tmp_path / "V1.zarr", sample_id="V1")
    info, reference = adata.uns["stmdit"]["samples"]["V1"], visium.uns["stmdit"]["samples"]["V1"]
    scalef = visium.uns["spatial"]["V1"]["scalefactors"]["tissue_hires_scalef"]
    # Positions in the image element's pixels, and its pixel size: full resolution times the scale factor.
    np.testing.assert_allclose(adata.obsm["spatial"], visium.obsm["spatial"] * scalef, rtol=1e-9)
    assert info["mpp"] == pytest.approx(reference["mpp"] / scalef) and info["spot_diameter_um"] == 55.0
    np.testing.assert_array_equal(adata.layers["counts"].toarray(), visium.layers["counts"].toarray())
    assert list(adata.var_names) == list(visium.var_names) and info["image_element"] == "V1_hires_image"
    check_scanpy_ready(adata)


def test_read_spatialdata_xenium_layout_in_microns(xenium):
    adata = read_spatialdata(xenium_spatialdata(xenium), sample_id="NCBI858")
    info = adata.uns["stmdit"]["samples"]["NCBI858"]
    np.testing.assert_allclose(adata.obsm["spatial"], xenium.obsm["spatial"], rtol=1e-9)
    assert info["mpp"] == pytest.approx(2.0) and 8 < info["spot_diameter_um"] < 16
    check_scanpy_ready(adata)
    check_scanpy_ready(aggregate_to_pseudospots(adata, 55.0))
    with pytest.raises(ReaderError, match=r"no table 'cells'; it has \['table'\]"):
        read_spatialdata(xenium_spatialdata(xenium), table="cells")


def test_generated_h5ad_places_each_tile_at_its_spot(visium, tmp_path):
    import torch

    from stmdit import (
        PanelExpressionEncoder,
        StainFeatureEncoder,
        STMDiT,
        STMDiTPipeline,
        make_sampling_scheduler,
    )
    from stmdit.data.readers.convention import write_h5ad
    from stmdit.generate import generate_tiles

    torch.manual_seed(0)
    ge = PanelExpressionEncoder.fit(visium, n_genes=16)
    morph = StainFeatureEncoder(image_size=16)
    model = STMDiT.from_preset("tiny", in_channels=3, sample_size=16, patch_size=8, morph_dim=morph.output_dim,
                               ge_dim=ge.output_dim, ge_token_dim=ge.token_dim)  # fmt: skip
    STMDiTPipeline(model, make_sampling_scheduler(pixel_space=True), ge, morph, None).save_pretrained(
        tmp_path / "pipe"
    )
    write_h5ad(visium, tmp_path / "data" / "V1.h5ad")
    spots = list(visium.obs_names[[3, 40, 77]])
    target = generate_tiles(tmp_path / "pipe", tmp_path / "data" / "V1.h5ad", tmp_path / "out", spots=spots, steps=1,
                            images_per_spot=2)  # fmt: skip
    generated = sc.read_h5ad(target)
    assert generated.n_obs == 6 and list(generated.obs["sample_id"].unique()) == ["V1"]
    np.testing.assert_array_equal(
        generated.obsm["spatial"], np.repeat(visium[spots].obsm["spatial"], 2, axis=0)
    )
    assert generated.uns["spatial"]["V1"]["scalefactors"] == visium.uns["spatial"]["V1"]["scalefactors"]
    assert not os.path.isabs(generated.uns["stmdit"]["samples"]["V1"]["image_path"])
    axes = sc.pl.spatial(generated, library_id="V1", show=False)
    assert axes[0].get_images()
    plt.close("all")
