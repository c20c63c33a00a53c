import gzip
import json

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import tifffile
from PIL import Image
from scipy.spatial import cKDTree

from stmdit.data.images import open_image, tissue_fraction, tissue_threshold, unusable_reason
from stmdit.data.readers import (
    aggregate_to_pseudospots,
    concat_samples,
    read_cell_table,
    read_he_slide,
    read_hest,
    read_legacy_st,
    read_spatial_h5ad,
    read_visium,
)
from stmdit.data.readers.convention import ReaderError
from stmdit.errors import StmditError

# Space Ranger tissue_positions columns, in file order.
POSITION_COLUMNS = [
    "barcode",
    "in_tissue",
    "array_row",
    "array_col",
    "pxl_row_in_fullres",
    "pxl_col_in_fullres",
]


def spot_crops(adata, image, size_px, out_size=32):
    """Crops of side ``size_px`` (full-resolution px) centred on each spot, from ``image``."""
    info = next(iter(adata.uns["stmdit"]["samples"].values()))
    s = info["image_scale"]
    side = size_px * s
    return [
        image.read_region(x * s - side / 2, y * s - side / 2, side, side, out_size=out_size)
        for x, y in zip(adata.obs["x_px"], adata.obs["y_px"], strict=True)
    ]


def within(value, truth, rel=0.10):
    return abs(value - truth) <= rel * truth


def grid_pitch_from_image(gray: np.ndarray) -> float:
    """Period (px) of a repeating pattern: the first autocorrelation peak along x and y."""
    g = gray - gray.mean()
    ac = np.fft.irfft2(np.abs(np.fft.rfft2(g)) ** 2, s=g.shape)
    peaks = []
    for profile in (ac[0, :600], ac[:600, 0]):
        lag = np.arange(len(profile))
        search = (lag > 150) & (lag < 450)
        peaks.append(lag[search][np.argmax(profile[search])])
    return float(np.mean(peaks))


# ---------------------------------------------------------------------------------------------
# Real data


@pytest.fixture(scope="module")
def her2st_c2(test_data):
    d = test_data / "her2st" / "C2"
    adata = read_legacy_st(d / "counts.tsv.gz", d / "spots.tsv", d / "he.jpg", patient_id="C")
    return adata, d, open_image(d / "he.jpg")


def test_her2st_counts_positions_and_pixel_size(her2st_c2):
    adata, d, image = her2st_c2
    assert adata.n_obs == 187 and adata.n_vars == 15706
    info = adata.uns["stmdit"]["samples"]["C2"]
    assert info["source_format"] == "legacy_st" and info["counts_available"]
    assert info["spot_diameter_um"] == 100.0 and info["spot_pitch_um"] == 200.0 and info["image_scale"] == 1.0
    table = pd.read_csv(d / "counts.tsv.gz", sep="\t", index_col=0)
    counts = adata.layers["counts"]
    assert counts.dtype.kind == "i" and counts.sum() == table.to_numpy().sum()
    row = adata.obs_names.get_loc("C2:10x21")
    np.testing.assert_array_equal(counts[row].toarray().ravel(), table.loc["10x21"].to_numpy())
    assert (adata.obs["patient_id"] == "C").all() and adata.obs["sample_id"].cat.categories.tolist() == ["C2"]
    spot = adata.obs.loc["C2:25x13"]
    assert (spot["x_px"], spot["y_px"], spot["array_col"], spot["array_row"]) == (6930.58, 3510.24, 25, 13)

    # Truth: the ST array's printed spots (200 um centre to centre) show through the glass in
    # he.jpg; their period, measured by autocorrelation of a background patch, gives the image's
    # pixel size without the spot table. It is ~290 px, i.e. ~0.69 um/px (the shared data README
    # quotes ~0.78, which this image's own spot pattern contradicts).
    gray = image.read_region(300, 300, 2048, 2048).mean(axis=-1)
    truth = 200.0 / grid_pitch_from_image(gray)
    assert 0.66 < truth < 0.72
    assert within(info["mpp"], truth)


def test_her2st_spots_land_on_tissue(her2st_c2):
    adata, _, image = her2st_c2
    threshold = tissue_threshold(image.thumbnail(1024)[0])
    spot_px = 100 / adata.uns["stmdit"]["samples"]["C2"]["mpp"]
    crops = spot_crops(adata, image, spot_px)
    fractions = np.array([tissue_fraction(c, threshold) for c in crops])
    assert np.median(fractions) > 0.5 and (fractions > 0.1).mean() > 0.95
    assert np.mean([unusable_reason(c) is None for c in crops]) > 0.95
    glass = [(600, 600), (8500, 1000), (1000, 9000), (8800, 9400)]  # corners of the slide, no tissue
    for x, y in glass:
        assert tissue_fraction(image.read_region(x - 70, y - 70, 140, 140, out_size=32), threshold) < 0.05


def test_her2st_positions_without_counts_warn(test_data):
    d = test_data / "her2st" / "C3"
    with pytest.warns(UserWarning, match=r"spots\.tsv: 2 spots have no counts"):
        adata = read_legacy_st(d / "counts.tsv.gz", d / "spots.tsv", d / "he.jpg")
    assert adata.n_obs == 180 and adata.obs["sample_id"].iloc[0] == "C3"
    assert adata.obs["patient_id"].isna().all()


def test_visium_spaceranger_1_falls_back_from_the_black_hires_placeholder(test_data):
    outs = test_data / "visium_spaceranger_1.0.0"
    with pytest.warns(UserWarning, match=r"tissue_hires_image\.png is unusable \(the image is all black\)"):
        adata = read_visium(outs)
    assert adata.shape == (100, 100)
    info = adata.uns["stmdit"]["samples"]["visium_spaceranger_1.0.0"]
    assert info["image_path"].endswith("tissue_lowres_image.png") and "all black" in info["image_note"]
    assert info["image_scale"] == pytest.approx(0.045004502)
    assert info["counts_available"] and adata.layers["counts"].dtype.kind == "i"
    assert (adata.var["gene_ids"].str.startswith("ENSG")).all()
    with h5py.File(outs / "filtered_feature_bc_matrix.h5") as f:
        assert adata.layers["counts"].sum() == f["matrix/data"][:].sum()
    # Truth: Visium spots are 100 um centre to centre; neighbours in one array row are 2 columns
    # apart. The pixel distance between them, from the positions file, gives the pixel size
    # independently of the reader's 65 um / spot_diameter_fullres (Space Ranger's documented
    # definition; 55 um / spot_diameter_fullres = 0.615 would be 15 % below this truth, 0.725).
    pos = pd.read_csv(outs / "spatial" / "tissue_positions_list.csv", header=None)
    xy = {(r[2], r[3]): np.array([r[5], r[4]]) for r in pos.itertuples(index=False)}
    dists = [np.linalg.norm(xy[(r, c + 2)] - p) for (r, c), p in xy.items() if (r, c + 2) in xy]
    truth = 100.0 / np.median(dists)
    assert within(info["mpp"], truth) and within(info["mpp_grid"], truth)

    image = open_image(info["image_path"])
    threshold = tissue_threshold(image.thumbnail(600)[0])
    crops = spot_crops(adata, image, size_px=2 * 55 / info["mpp"], out_size=16)
    fractions = np.array([tissue_fraction(c, threshold) for c in crops])
    assert np.median(fractions) > 0.5 and (fractions > 0.1).mean() > 0.9


def test_squidpy_crop_keeps_normalised_values_untouched(test_data):
    d = test_data / "squidpy_visium_crop"
    with pytest.warns(
        UserWarning, match=r"test_data\.h5ad: X holds non-integer values.*counts_available is False"
    ):
        adata = read_spatial_h5ad(d / "test_data.h5ad", d / "test_img.jpg")
    original = ad.read_h5ad(d / "test_data.h5ad")
    assert adata.shape == (49, 1999) and "counts" not in adata.layers
    np.testing.assert_array_equal(adata.X.toarray(), original.X.toarray())
    info = adata.uns["stmdit"]["samples"]["V1_Adult_Mouse_Brain"]
    assert not info["counts_available"] and info["image_scale"] == 1.0
    np.testing.assert_array_equal(adata.obs[["x_px", "y_px"]].to_numpy(), original.obsm["spatial"])
    # Truth: nearest neighbours on the Visium hexagonal grid are 100 um apart.
    xy = original.obsm["spatial"].astype(float)
    nn = cKDTree(xy).query(xy, k=2)[0][:, 1]
    assert within(info["mpp"], 100.0 / np.median(nn))
    image = open_image(d / "test_img.jpg")
    threshold = tissue_threshold(image.thumbnail(1024)[0])
    crops = spot_crops(adata, image, size_px=55 / info["mpp"])
    assert np.median([tissue_fraction(c, threshold) for c in crops]) > 0.8
    assert all(unusable_reason(c) is None for c in crops)
    assert tissue_fraction(image.read_region(0, 1500, 60, 60), threshold) < 0.05  # grey glass at the left


@pytest.fixture(scope="module")
def xenium(test_data):
    d = test_data / "xenium_deepspot_example"
    # DeepSpot's crop_tile passes y_pixel as the left edge and x_pixel as the top edge, so in
    # this file x_pixel is the row. No file states the pixel size; 2 um/px is an assumption
    # (nuclei are ~3-4 px across), only used to size the pseudo-spots.
    cells = read_cell_table(d / "NCBI858.h5ad", d / "NCBI858.jpg", mpp=2.0, x_key="y_pixel", y_key="x_pixel")
    return cells, d


def test_xenium_cells_need_a_pixel_size_and_the_right_axes(xenium):
    cells, d = xenium
    with pytest.raises(ValueError, match=r"pixel size unknown for .*NCBI858\.h5ad.*NCBI858\.json.*Pass mpp="):
        read_cell_table(d / "NCBI858.h5ad", d / "NCBI858.jpg")
    with pytest.raises(ValueError, match=r"x_pixel/y_pixel of .*NCBI858\.h5ad.*x and y swapped"):
        read_cell_table(d / "NCBI858.h5ad", d / "NCBI858.jpg", mpp=2.0)
    assert cells.n_obs == 200 and cells.n_vars == 338 and "counts" in cells.layers
    info = cells.uns["stmdit"]["samples"]["NCBI858"]
    assert info["mpp_source"] == "argument" and info["spot_diameter_um"] == pytest.approx(20 * 2.0)
    image = open_image(d / "NCBI858.jpg")
    threshold = tissue_threshold(image.thumbnail(1431)[0])
    fractions = [tissue_fraction(c, threshold) for c in spot_crops(cells, image, size_px=20)]
    assert np.median(fractions) > 0.5


def test_xenium_pseudospots_sum_the_cells_they_cover(xenium):
    cells, _ = xenium
    spots = aggregate_to_pseudospots(cells, diameter_um=100.0, spacing_um=100.0)
    info = spots.uns["stmdit"]["samples"]["NCBI858"]
    assert info["source_format"] == "cell_table+pseudospots" and info["n_cells_total"] == 200
    assert spots.obs["n_cells"].min() >= 1
    assert spots.obs["n_cells"].sum() + info["n_cells_dropped"] == 200  # touching discs: no cell twice
    radius = 100.0 / 2 / info["mpp"]
    cxy = cells.obs[["x_px", "y_px"]].to_numpy()
    counts = cells.layers["counts"].toarray()
    for i in np.argsort(-spots.obs["n_cells"].to_numpy())[:5]:
        centre = spots.obs[["x_px", "y_px"]].to_numpy()[i]
        members = np.flatnonzero(np.hypot(*(cxy - centre).T) <= radius)
        assert len(members) == spots.obs["n_cells"].iloc[i]
        np.testing.assert_array_equal(spots.layers["counts"][i].toarray().ravel(), counts[members].sum(0))
    assert spots.layers["counts"].sum() == counts.sum() - _dropped_counts(cells, spots)
    wide = aggregate_to_pseudospots(cells, diameter_um=150.0, spacing_um=100.0, grid="square")
    assert wide.obs["n_cells"].sum() > 200 - wide.uns["stmdit"]["samples"]["NCBI858"]["n_cells_dropped"]


def _dropped_counts(cells, spots):
    """Counts of the cells outside every pseudo-spot disc."""
    info = spots.uns["stmdit"]["samples"]["NCBI858"]
    radius = info["spot_diameter_um"] / 2 / info["mpp"]
    centres = spots.obs[["x_px", "y_px"]].to_numpy()
    d, _ = cKDTree(centres).query(cells.obs[["x_px", "y_px"]].to_numpy())
    return cells.layers["counts"][d > radius].sum()


def test_he_tiles_as_he_only_slides(test_data):
    for name in ("torchstain_source.png", "torchstain_target.png"):
        path = test_data / "he_tiles" / name
        with pytest.raises(ValueError, match=rf"pixel size unknown for .*{name}.*pass mpp="):
            read_he_slide(path)
        adata = read_he_slide(path, mpp=0.5)  # assumed 20x: the tiles do not say
        assert adata.n_vars == 0 and adata.n_obs >= 2
        info = adata.uns["stmdit"]["samples"][path.stem]
        assert (
            info["spot_diameter_um"] == 80.0
            and info["spot_pitch_um"] == 145.0
            and not info["counts_available"]
        )
        assert (adata.obs["tissue_fraction"] > 0.8).all() and (adata.obs["mean_rgb"] <= 200).all()
        image = open_image(path)
        for crop in spot_crops(adata, image, size_px=160):
            assert unusable_reason(crop) is None


def test_he_slide_grid_stays_off_the_glass(test_data):
    path = test_data / "xenium_deepspot_example" / "NCBI858.jpg"
    adata = read_he_slide(path, spot_diameter_um=40.0, spacing_um=60.0, mpp=2.0)
    image = open_image(path)
    threshold = tissue_threshold(image.thumbnail(1431)[0])
    fractions = np.array([tissue_fraction(c, threshold) for c in spot_crops(adata, image, size_px=20)])
    assert adata.n_obs > 50 and np.median(fractions) > 0.3
    x, y = adata.obs["x_px"].to_numpy(), adata.obs["y_px"].to_numpy()
    assert not ((x < 100) & (y > 900)).any()  # the glass at the bottom left of the section
    d = np.diff(np.sort(np.unique(x)))
    assert d.min() == pytest.approx(30.0)  # 60 um spacing at 2 um/px


def test_concatenating_samples_merges_uns_and_survives_h5ad(her2st_c2, xenium, test_data, tmp_path):
    c2 = her2st_c2[0]
    cells, _ = xenium
    he = read_he_slide(test_data / "he_tiles" / "torchstain_source.png", mpp=0.5)
    both = concat_samples([c2, cells])
    assert set(both.uns["stmdit"]["samples"]) == {"C2", "NCBI858"}
    assert both.n_obs == c2.n_obs + cells.n_obs and 0 < both.n_vars < 338 and "counts" in both.layers
    assert both.obs["patient_id"].isna().sum() == cells.n_obs
    with pytest.warns(UserWarning, match="layers\\['counts'\\] is dropped"):
        three = concat_samples([c2, cells, he])
    assert three.n_vars == 0 and "counts" not in three.layers
    with pytest.raises(ValueError, match="'C2' appears twice"):
        concat_samples([c2, c2])
    three.write_h5ad(tmp_path / "three.h5ad")
    back = ad.read_h5ad(tmp_path / "three.h5ad")
    assert back.uns["stmdit"]["samples"]["C2"]["mpp"] == c2.uns["stmdit"]["samples"]["C2"]["mpp"]
    assert back.uns["stmdit"]["samples"]["NCBI858"]["files"]["metadata"].endswith("NCBI858.json")
    assert back.obs["sample_id"].value_counts().to_dict() == three.obs["sample_id"].value_counts().to_dict()


# ---------------------------------------------------------------------------------------------
# Synthetic inputs in the real layouts


def section_image(h=600, w=800, seed=0):
    """Off-white glass with a textured pink section in the middle (an ellipse)."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 236, dtype=np.float32) + rng.normal(0, 3, (h, w, 3))
    yy, xx = np.mgrid[0:h, 0:w]
    inside = ((yy - h / 2) / (h * 0.4)) ** 2 + ((xx - w / 2) / (w * 0.4)) ** 2 < 1
    img[inside] = [214, 138, 188] + rng.normal(0, 10, (inside.sum(), 3))
    img[inside & (rng.random((h, w)) < 0.05)] = [90, 60, 150]
    return img.clip(0, 255).astype(np.uint8)


def write_visium(root, n=12, layout="1.x", genes=None, barcodes_in_positions=None, hires=None, lowres=True):
    """A Space Ranger outs/ folder: n spots on a hex grid over a synthetic section."""
    root.mkdir(parents=True, exist_ok=True)
    spatial = root / "spatial"
    spatial.mkdir(exist_ok=True)
    genes = genes or [f"GENE{i}" for i in range(5)]
    barcodes = [f"AAAC{i:04d}-1" for i in range(n)]
    rng = np.random.default_rng(0)
    counts = rng.poisson(3, size=(n, len(genes)))
    m = sp.csc_matrix(counts.T)
    with h5py.File(root / "filtered_feature_bc_matrix.h5", "w") as f:
        g = f.create_group("matrix")
        g["data"], g["indices"], g["indptr"] = m.data.astype(np.int32), m.indices, m.indptr
        g["shape"] = np.array(m.shape, dtype=np.int32)
        g["barcodes"] = np.array([b.encode() for b in barcodes])
        g["features/name"] = np.array([s.encode() for s in genes])
        g["features/id"] = np.array([f"ENSG{i:011d}".encode() for i in range(len(genes))])
        g["features/feature_type"] = np.array([b"Gene Expression"] * len(genes))
    # Full resolution 4000 x 3000 px; lowres scale 0.2 -> the 800 x 600 image.
    rows = [
        (b, 1, 10 + i // 4, 2 * (i % 4) + (i // 4) % 2, 1300 + 150 * (i // 4), 1500 + 160 * (i % 4))
        for i, b in enumerate(barcodes_in_positions or barcodes)
    ]
    table = pd.DataFrame(
        rows,
        columns=POSITION_COLUMNS,
    )
    if layout == "1.x":
        table.to_csv(spatial / "tissue_positions_list.csv", header=False, index=False)
    else:
        table.to_csv(spatial / "tissue_positions.csv", index=False)
    scalefactors = {"spot_diameter_fullres": 100.0, "tissue_hires_scalef": 0.5, "tissue_lowres_scalef": 0.2}
    (spatial / "scalefactors_json.json").write_text(json.dumps(scalefactors))
    if lowres:
        Image.fromarray(section_image()).save(spatial / "tissue_lowres_image.png")
    if hires is not None:
        Image.fromarray(hires).save(spatial / "tissue_hires_image.png")
    return root, barcodes, genes, counts


def test_visium_2x_layout_and_full_resolution_tiff(tmp_path):
    outs, barcodes, genes, counts = write_visium(tmp_path / "sampleA" / "outs", layout="2.x")
    full = np.asarray(Image.fromarray(section_image()).resize((4000, 3000)))
    tif = tmp_path / "fullres.tif"
    tifffile.imwrite(tif, full, tile=(256, 256), photometric="rgb")
    adata = read_visium(tmp_path / "sampleA", image=tif)
    info = adata.uns["stmdit"]["samples"]["sampleA"]
    assert info["image_scale"] == 1.0 and info["image_path"] == str(tif.resolve())
    assert info["mpp"] == pytest.approx(65 / 100.0)  # Space Ranger: spot_diameter_fullres spans 65 um
    assert list(adata.obs["barcode"]) == barcodes and list(adata.var_names) == genes
    np.testing.assert_array_equal(adata.layers["counts"].toarray(), counts)
    assert adata.obs["x_px"].iloc[1] == 1660 and adata.obs["y_px"].iloc[1] == 1300
    lowres = read_visium(outs)
    assert lowres.uns["stmdit"]["samples"]["sampleA"]["image_scale"] == 0.2


def test_visium_errors_name_the_file_and_field(tmp_path):
    outs, barcodes, _, _ = write_visium(tmp_path / "missing_h5")
    (outs / "filtered_feature_bc_matrix.h5").unlink()
    with pytest.raises(FileNotFoundError, match=r"filtered_feature_bc_matrix\.h5"):
        read_visium(outs)
    outs, barcodes, _, _ = write_visium(tmp_path / "no_scalefactors")
    (outs / "spatial" / "scalefactors_json.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"scalefactors_json\.json"):
        read_visium(outs)
    outs, barcodes, _, _ = write_visium(tmp_path / "no_positions")
    (outs / "spatial" / "tissue_positions_list.csv").unlink()
    with pytest.raises(FileNotFoundError, match=r"tissue_positions_list\.csv.*tissue_positions\.csv"):
        read_visium(outs)
    # Count profiles whose barcode is absent from the positions: different sections.
    others = [f"GGGG{i:04d}-1" for i in range(12)]
    outs, *_ = write_visium(tmp_path / "mismatch", barcodes_in_positions=others)
    with pytest.raises(
        ValueError, match=r"12 of 12 spots in .*filtered_feature_bc_matrix\.h5 have no position"
    ):
        read_visium(outs)
    # Every image unusable: a black hires placeholder and no lowres.
    outs, *_ = write_visium(tmp_path / "black", hires=np.zeros((100, 100, 3), np.uint8), lowres=False)
    with pytest.warns(UserWarning, match="all black"):
        with pytest.raises(
            ValueError, match=r"no usable image .*tissue_hires_image\.png: the image is all black"
        ):
            read_visium(outs)
    # Duplicated symbols are made unique; the Ensembl ids tell them apart.
    outs, *_ = write_visium(tmp_path / "dups", genes=["A", "B", "A", "C", "A"])
    with pytest.warns(UserWarning, match=r"features/name has 1 duplicated gene names \(e\.g\. \['A'\]\)"):
        adata = read_visium(outs)
    assert list(adata.var_names) == ["A", "B", "A-1", "C", "A-2"]
    assert list(adata.var["gene_symbol"]) == ["A", "B", "A", "C", "A"] and adata.var["gene_ids"].is_unique


def test_visium_parquet_needs_pyarrow_or_reads(tmp_path):
    outs, barcodes, _, _ = write_visium(tmp_path / "v3")
    table = pd.read_csv(outs / "spatial" / "tissue_positions_list.csv", header=None)
    table.columns = POSITION_COLUMNS
    (outs / "spatial" / "tissue_positions_list.csv").unlink()
    try:
        table.to_parquet(outs / "spatial" / "tissue_positions.parquet")
    except ImportError:
        (outs / "spatial" / "tissue_positions.parquet").write_bytes(b"PAR1")
        with pytest.raises(ImportError, match=r"tissue_positions\.parquet.*pip install pyarrow"):
            read_visium(outs)
        return
    assert list(read_visium(outs).obs["barcode"]) == barcodes


def write_legacy(root, counts=None, spots=None, image=None):
    """her2st-style files: counts (spots x genes, XxY ids), spots table, full-resolution image."""
    root.mkdir(parents=True, exist_ok=True)
    grid = [(x, y) for y in range(3, 7) for x in range(3, 8)]
    ids = [f"{x}x{y}" for x, y in grid]
    if counts is None:
        counts = pd.DataFrame(
            np.random.default_rng(1).poisson(4, size=(len(ids), 4)),
            index=ids,
            columns=["G1", "G2", "G3", "G4"],
        )
    if spots is None:
        pitch = 100.0  # px per 200 um step -> 2 um/px
        spots = pd.DataFrame(
            {
                "x": [x for x, _ in grid],
                "y": [y for _, y in grid],
                "pixel_x": [x * pitch - 50 for x, _ in grid],
                "pixel_y": [y * pitch - 100 for _, y in grid],
                "selected": 1,
            }
        )
    counts.to_csv(root / "counts.tsv.gz", sep="\t")
    spots.to_csv(root / "spots.tsv", sep="\t", index=False)
    Image.fromarray(image if image is not None else section_image()).save(root / "he.png")
    return root / "counts.tsv.gz", root / "spots.tsv", root / "he.png", counts, spots


def test_legacy_st_synthetic_pixel_size_and_ids(tmp_path):
    c, s, i, counts, _ = write_legacy(tmp_path / "A1")
    adata = read_legacy_st(c, s, i)
    info = adata.uns["stmdit"]["samples"]["A1"]  # the folder's name: counts.tsv.gz is a generic name
    assert info["mpp"] == pytest.approx(2.0) and info["mpp_grid_pairs"] > 20
    np.testing.assert_array_equal(adata.layers["counts"].toarray(), counts.to_numpy())
    np.testing.assert_array_equal(adata.X.toarray(), counts.to_numpy())
    adata.X.data[:] = 0  # X is a copy: normalising it in place leaves the counts intact
    assert adata.layers["counts"].sum() == counts.to_numpy().sum()


def test_legacy_st_bad_inputs_name_the_file_and_field(tmp_path):
    c, s, i, counts, spots = write_legacy(tmp_path / "ok")
    with pytest.raises(FileNotFoundError, match=r"ST spot table not found: .*nope\.tsv"):
        read_legacy_st(c, tmp_path / "nope.tsv", i)
    # A spot with counts but no position.
    extra = pd.concat([counts, pd.DataFrame([[1, 2, 3, 4]], index=["30x30"], columns=counts.columns)])
    c2, s2, i2, *_ = write_legacy(tmp_path / "unplaced", counts=extra)
    with pytest.raises(
        ValueError, match=r"1 of 21 spots in .*counts\.tsv\.gz have no position in .*spots\.tsv.*30x30"
    ):
        read_legacy_st(c2, s2, i2)
    # Non-numeric, negative and missing values.
    bad = counts.astype(object)
    bad.iloc[2, 1] = "abc"
    c3, s3, i3, *_ = write_legacy(tmp_path / "text", counts=bad)
    with pytest.raises(
        ValueError, match=r"counts\.tsv\.gz: gene column 'G2' is not numeric \(spot '5x3': 'abc'\)"
    ):
        read_legacy_st(c3, s3, i3)
    neg = counts.copy()
    neg.iloc[4, 3] = -2
    c4, s4, i4, *_ = write_legacy(tmp_path / "negative", counts=neg)
    with pytest.raises(
        ValueError, match=r"counts\.tsv\.gz: counts has a negative value -2 for spot '7x3', gene 'G4'"
    ):
        read_legacy_st(c4, s4, i4)
    nan = counts.astype(float)
    nan.iloc[0, 0] = np.nan
    c5, s5, i5, *_ = write_legacy(tmp_path / "nan", counts=nan)
    with pytest.raises(ValueError, match=r"counts\.tsv\.gz: counts has nan for spot '3x3', gene 'G1'"):
        read_legacy_st(c5, s5, i5)
    # Duplicated gene names: made unique with a warning; counts untouched.
    dup = counts.copy()
    dup.columns = ["G1", "G2", "G1", "G4"]
    c6, s6, i6, *_ = write_legacy(tmp_path / "dup", counts=dup)
    with pytest.warns(UserWarning, match=r"counts\.tsv\.gz: gene names \(header\) has 1 duplicated"):
        adata = read_legacy_st(c6, s6, i6)
    assert list(adata.var_names) == ["G1", "G2", "G1-1", "G4"]
    np.testing.assert_array_equal(adata.layers["counts"].toarray(), dup.to_numpy())
    # Missing pixel columns.
    c7, s7, i7, *_ = write_legacy(tmp_path / "cols", spots=spots.drop(columns=["pixel_y"]))
    with pytest.raises(ValueError, match=r"spots\.tsv: missing columns \['pixel_y'\]"):
        read_legacy_st(c7, s7, i7)


def test_spots_outside_the_image(tmp_path):
    _, _, _, counts, spots = write_legacy(tmp_path / "base")
    far = spots.copy()
    far["pixel_x"] += 5000  # another image's coordinates
    c, s, i, *_ = write_legacy(tmp_path / "far", spots=far)
    with pytest.raises(
        ValueError, match=r"20 of 20 spot centres \(pixel_x/pixel_y of .*spots\.tsv.*fall outside .*he\.png"
    ):
        read_legacy_st(c, s, i)
    # One spot of many off the edge: dropped with a warning, counted.
    grid = [(x, y) for y in range(1, 12) for x in range(1, 12)]
    ids = [f"{x}x{y}" for x, y in grid]
    many = pd.DataFrame(np.ones((len(ids), 2), dtype=int), index=ids, columns=["A", "B"])
    table = pd.DataFrame(
        {"x": [x for x, _ in grid], "y": [y for _, y in grid], "pixel_x": [x * 60.0 for x, _ in grid]}
    ).assign(pixel_y=[y * 50.0 for _, y in grid])
    table.loc[table.index[-1], "pixel_x"] = 900.0
    c, s, i, *_ = write_legacy(tmp_path / "edge", counts=many, spots=table)
    with pytest.warns(UserWarning, match=r"1 of 121 spot centres .*those spots are dropped"):
        adata = read_legacy_st(c, s, i)
    assert adata.n_obs == 120 and adata.uns["stmdit"]["samples"]["edge"]["n_spots_outside_image"] == 1


def test_empty_tissue_and_unknown_pixel_size(tmp_path):
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((400, 400, 3), 245, np.uint8)).save(blank)
    with pytest.raises(ValueError, match=r"blank\.png: no tissue detected \(the tissue mask is empty\)"):
        read_he_slide(blank, mpp=0.5)
    with pytest.raises(ValueError, match=r"pixel size unknown for .*blank\.png"):
        read_he_slide(blank)


def test_cell_table_pixel_size_from_json_and_bad_keys(tmp_path):
    cells = ad.AnnData(
        X=np.random.default_rng(2).poisson(2, size=(30, 3)),
        obs=pd.DataFrame(
            {"x_pixel": np.linspace(250, 550, 30), "y_pixel": np.linspace(200, 400, 30)},
            index=[f"c{i}" for i in range(30)],
        ),
        var=pd.DataFrame(index=["A", "B", "C"]),
    )
    cells.write_h5ad(tmp_path / "S1.h5ad")
    Image.fromarray(section_image()).save(tmp_path / "S1.jpg")
    (tmp_path / "S1.json").write_text(json.dumps({"pixel_size_um_estimated": 0.2737, "cell_diameter": 20}))
    adata = read_cell_table(tmp_path / "S1.h5ad", tmp_path / "S1.jpg")
    info = adata.uns["stmdit"]["samples"]["S1"]
    assert info["mpp"] == pytest.approx(0.2737) and "S1.json: pixel_size_um_estimated" in info["mpp_source"]
    with pytest.raises(ValueError, match=r"S1\.h5ad: obs has no 'x_um' column"):
        read_cell_table(tmp_path / "S1.h5ad", tmp_path / "S1.jpg", x_key="x_um")
    normalised = cells.copy()
    normalised.X = normalised.X / 3.0
    normalised.write_h5ad(tmp_path / "S2.h5ad")
    with pytest.warns(UserWarning, match=r"S2\.h5ad: X holds non-integer values"):
        s2 = read_cell_table(tmp_path / "S2.h5ad", tmp_path / "S1.jpg", mpp=0.5)
    with pytest.raises(ValueError, match=r"needs raw counts in layers\['counts'\]"):
        aggregate_to_pseudospots(s2, 55.0)


def write_hest(root, sample="TENX999", mpp=0.5, drop_patches=(0, 5), meta_mpp=None):
    """A HEST-1k sample in its published layout: st/, wsis/, patches/, metadata/."""
    for sub in ("st", "wsis", "patches", "metadata"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    full = section_image(1600, 2000, seed=3)
    with tifffile.TiffWriter(root / "wsis" / f"{sample}.tif") as tw:
        opts = {"tile": (256, 256), "photometric": "rgb", "compression": "zlib"}
        tw.write(full, resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER", **opts)
        tw.write(full[::2, ::2], subfiletype=1, **opts)
        tw.write(full[::4, ::4], subfiletype=1, **opts)
    pitch = 100 / mpp  # Visium: 100 um centre to centre
    rows = []
    for r in range(4):
        for c in range(5):
            x, y = 600 + c * pitch + (r % 2) * pitch / 2, 450 + r * pitch * np.sqrt(3) / 2
            rows.append((f"BC{r}{c}-1", r, 2 * c + r % 2, x, y))
    obs = pd.DataFrame(
        rows, columns=["barcode", "array_row", "array_col", "pxl_col_in_fullres", "pxl_row_in_fullres"]
    )
    obs = obs.set_index("barcode")
    obs["in_tissue"] = 1
    counts = np.random.default_rng(4).poisson(5, size=(len(obs), 6)).astype(np.float32)
    adata = ad.AnnData(X=sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=[f"G{i}" for i in range(6)]))
    adata.obsm["spatial"] = obs[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy()
    adata.uns["spatial"] = {
        "ST": {
            "images": {"downscaled_fullres": full[::10, ::10]},
            "scalefactors": {"tissue_downscaled_fullres_scalef": 0.1, "spot_diameter_fullres": 55 / mpp},
        }
    }
    adata.write_h5ad(root / "st" / f"{sample}.h5ad")
    keep = [i for i in range(len(obs)) if i not in drop_patches]
    half = 224 * 0.5 / mpp // 2
    coords = (adata.obsm["spatial"][keep] - half).astype(np.int64)
    with h5py.File(root / "patches" / f"{sample}.h5", "w") as f:
        f["img"] = np.stack([full[y : y + 224, x : x + 224] for x, y in coords])
        f["coords"] = coords
        f["barcode"] = np.array([[b.encode()] for b in obs.index[keep]])
    meta = {
        "id": sample,
        "pixel_size_um_estimated": meta_mpp or mpp,
        "pixel_size_um_embedded": mpp,
        "spot_diameter": 55.0,
        "inter_spot_dist": 100.0,
        "patient": "Patient 7",
        "st_technology": "Visium",
        "treatment_comment": float("nan"),
    }
    (root / "metadata" / f"{sample}.json").write_text(json.dumps(meta))
    return root / "st" / f"{sample}.h5ad", counts, full


def test_hest_sample_in_its_published_layout(tmp_path):
    st, counts, full = write_hest(tmp_path / "hest")
    adata = read_hest(st)
    info = adata.uns["stmdit"]["samples"]["TENX999"]
    assert info["mpp"] == 0.5 and "pixel_size_um_estimated" in info["mpp_source"]
    assert (
        info["spot_diameter_um"] == 55.0
        and info["spot_pitch_um"] == 100.0
        and info["st_technology"] == "Visium"
    )
    assert set(info["files"]) == {"counts", "image", "metadata", "patches"}
    assert (adata.obs["patient_id"] == "Patient 7").all()
    np.testing.assert_array_equal(adata.layers["counts"].toarray(), counts)
    assert adata.layers["counts"].dtype.kind == "i"
    assert list(adata.obs["hest_patch"][:7]) == [-1, 0, 1, 2, 3, -1, 4]
    wsi = open_image(info["image_path"])
    with h5py.File(tmp_path / "hest" / "patches" / "TENX999.h5") as f:
        patch = f["img"][2]
    x, y = adata.obs.iloc[3][["x_px", "y_px"]]
    np.testing.assert_array_equal(wsi.read_region(x - 112, y - 112, 224, 224), patch)
    threshold = tissue_threshold(wsi.thumbnail(800)[0])
    assert all(tissue_fraction(c, threshold) > 0.8 for c in spot_crops(adata, wsi, 110))


def test_hest_pixel_size_problems(tmp_path):
    st, *_ = write_hest(tmp_path / "wrong", meta_mpp=0.25)
    with pytest.warns(
        UserWarning, match=r"TENX999\.h5: patch positions \(coords\) are .* px from the spot centres"
    ):
        read_hest(st)
    st, *_ = write_hest(tmp_path / "untagged")
    (tmp_path / "untagged" / "metadata" / "TENX999.json").unlink()
    wsi = tmp_path / "untagged" / "wsis" / "TENX999.tif"
    tifffile.imwrite(wsi, section_image(), photometric="rgb")  # no resolution tags
    with pytest.raises(ValueError, match=r"pixel size of .*TENX999\.tif unknown.*pass metadata="):
        read_hest(st)
    wsi.unlink()
    with pytest.raises(FileNotFoundError, match=r"no whole-slide image for .*TENX999\.h5ad"):
        read_hest(st)


def test_gzip_header_with_quotes(tmp_path):
    """Tables written by R quote their header; the gene names come out unquoted."""
    c, s, i, counts, _ = write_legacy(tmp_path / "R")
    text = gzip.open(c, "rt").read().splitlines()
    text[0] = "\t".join(f'"{h}"' for h in text[0].split("\t"))
    with gzip.open(c, "wt") as fh:
        fh.write("\n".join(text) + "\n")
    assert list(read_legacy_st(c, s, i).var_names) == list(counts.columns)


def test_all_zero_and_partly_empty_counts(tmp_path):
    _, _, _, counts, _ = write_legacy(tmp_path / "base")
    c, s, i, *_ = write_legacy(tmp_path / "zeros", counts=counts * 0)
    with pytest.raises(
        ReaderError, match=r"zeros/counts\.tsv\.gz: counts is all zeros \(20 spots x 4 genes\)"
    ):
        read_legacy_st(c, s, i)
    some = counts.copy()
    some.loc[["4x3", "6x5"]] = 0
    c, s, i, *_ = write_legacy(tmp_path / "some", counts=some)
    with pytest.warns(
        UserWarning, match=r"counts\.tsv\.gz: 2 of 20 spots have no counts at all .*\['4x3', '6x5'\]"
    ):
        adata = read_legacy_st(c, s, i)
    assert adata.n_obs == 20 and adata[["some:4x3"]].layers["counts"].sum() == 0


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_unreadable_inputs_name_the_file_and_what_was_expected(tmp_path):
    outs, *_ = write_visium(tmp_path / "truncated_h5")
    truncate(outs / "filtered_feature_bc_matrix.h5")
    with pytest.raises(
        ReaderError,
        match=r"filtered_feature_bc_matrix\.h5: cannot be read as a Space Ranger feature-barcode matrix",
    ):
        read_visium(outs)

    not_hdf5 = tmp_path / "notes.h5ad"
    not_hdf5.write_text("barcode,x,y\n")
    Image.fromarray(section_image()).save(tmp_path / "he.png")
    with pytest.raises(ReaderError, match=r"notes\.h5ad: cannot be read as an AnnData file \(\.h5ad\)"):
        read_spatial_h5ad(not_hdf5, tmp_path / "he.png", mpp=1.0)
    with pytest.raises(ReaderError, match=r"notes\.h5ad: cannot be read as a cell table"):
        read_cell_table(not_hdf5, tmp_path / "he.png", mpp=1.0)

    c, s, i, *_ = write_legacy(tmp_path / "truncated_gz")
    truncate(c, 0.6)
    with pytest.raises(ReaderError, match=r"truncated_gz/counts\.tsv\.gz: cannot be read as a counts table"):
        read_legacy_st(c, s, i)

    c, s, i, *_ = write_legacy(tmp_path / "empty_spots")
    s.write_text("")
    with pytest.raises(
        ReaderError, match=r"empty_spots/spots\.tsv: cannot be read as a spot table .*the file is empty"
    ):
        read_legacy_st(c, s, i)
    outs, *_ = write_visium(tmp_path / "empty_positions")
    (outs / "spatial" / "tissue_positions_list.csv").write_text("")
    with pytest.raises(ReaderError, match=r"tissue_positions_list\.csv: cannot be read .*the file is empty"):
        read_visium(outs)

    not_image = tmp_path / "he.jpg"
    not_image.write_text("not an image")
    with pytest.raises(StmditError, match=r"he\.jpg: cannot decode it as an image"):
        read_he_slide(not_image, mpp=0.5)

    no_spots = ad.AnnData(X=sp.csr_matrix((0, 3)), var=pd.DataFrame(index=["A", "B", "C"]))
    no_spots.obsm["spatial"] = np.zeros((0, 2))
    no_spots.write_h5ad(tmp_path / "none.h5ad")
    with pytest.raises(
        ReaderError, match=r"none\.h5ad: X has 0 spots x 3 genes; expected at least one of each"
    ):
        read_spatial_h5ad(tmp_path / "none.h5ad", tmp_path / "he.png", mpp=1.0)
