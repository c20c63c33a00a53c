"""10x Visium: a Space Ranger ``outs/`` folder."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from stmdit.data.images import unusable_reason
from stmdit.data.readers.convention import (
    SPACERANGER_FULLRES_SPOT_UM,
    VISIUM_PITCH_UM,
    VISIUM_SPOT_UM,
    ReaderError,
    assemble,
    check_counts,
    coordinates,
    grid_pitch_px,
    inside_image,
    join_barcodes,
    open_checked_image,
    positive,
    read_json,
    reading,
    require_file,
    unique_genes,
)


def _read_10x_h5(path: Path) -> tuple[sp.csr_matrix, list[str], pd.DataFrame]:
    """Barcodes x features matrix of a Space Ranger / Cell Ranger (v3+) HDF5, gene expression only."""
    import h5py

    with reading(path, "a Space Ranger feature-barcode matrix (HDF5)"), h5py.File(path, "r") as f:
        if "matrix" not in f:
            raise ReaderError(
                f"{path}: no 'matrix' group; expected a Space Ranger feature-barcode matrix (filtered_feature_bc_matrix.h5)"
            )
        g = f["matrix"]
        for key in ("data", "indices", "indptr", "shape", "barcodes", "features/name", "features/id"):
            if key not in g:
                raise ReaderError(f"{path}: missing dataset matrix/{key}")
        n_features, n_barcodes = (int(v) for v in g["shape"][:])
        data = g["data"][:]
        # Stored features x barcodes, compressed by barcode (CSC); transposing gives barcodes x features as CSR.
        matrix = sp.csc_matrix(
            (data, g["indices"][:], g["indptr"][:]), shape=(n_features, n_barcodes)
        ).T.tocsr()
        barcodes = [b.decode() for b in g["barcodes"][:]]
        names = [b.decode() for b in g["features/name"][:]]
        ids = [b.decode() for b in g["features/id"][:]]
        types = (
            [b.decode() for b in g["features/feature_type"][:]]
            if "features/feature_type" in g
            else ["Gene Expression"] * n_features
        )
    keep = np.array([t == "Gene Expression" for t in types])
    if not keep.any():
        raise ReaderError(f"{path}: no 'Gene Expression' features (feature types: {sorted(set(types))})")
    var = pd.DataFrame(
        {
            "gene_ids": np.asarray(ids)[keep],
            "gene_symbol": np.asarray(names)[keep],
            "feature_types": "Gene Expression",
        }
    )
    return matrix[:, keep], barcodes, var


def _read_visium_positions(spatial: Path) -> tuple[pd.DataFrame, Path]:
    columns = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]
    candidates = [
        spatial / "tissue_positions.parquet",
        spatial / "tissue_positions.csv",
        spatial / "tissue_positions_list.csv",
    ]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise FileNotFoundError(
            f"no spot positions in {spatial}: expected tissue_positions_list.csv (Space Ranger 1.x), "
            "tissue_positions.csv (2.x) or tissue_positions.parquet (3.x)"
        )
    if path.suffix == ".parquet":
        try:
            with reading(path, "a Space Ranger positions table (parquet)"):
                table = pd.read_parquet(path)
        except ImportError as err:
            raise ImportError(f"reading {path} needs a parquet engine: `pip install pyarrow`") from err
    else:
        with reading(path, "a Space Ranger positions table (CSV)"):
            with open(path) as fh:
                has_header = fh.readline().split(",")[0].strip() == "barcode"
            table = pd.read_csv(path, header=0 if has_header else None)
        if not has_header:
            if table.shape[1] != len(columns):
                raise ReaderError(
                    f"{path}: {table.shape[1]} columns; a Space Ranger 1.x positions list has {len(columns)}"
                )
            table.columns = columns
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ReaderError(f"{path}: missing columns {missing}; found {list(table.columns)}")
    table["barcode"] = table["barcode"].astype(str)
    for col in columns[1:]:
        table[col] = coordinates(table[col], path, col)
    return table.set_index("barcode"), path


def read_visium(
    outs_dir: str | Path,
    sample_id: str | None = None,
    image: str | Path | None = None,
    patient_id: str | None = None,
) -> ad.AnnData:
    """A Space Ranger ``outs/`` folder (1.x, 2.x or 3.x layout).

    Reads ``filtered_feature_bc_matrix.h5`` (gene-expression features; symbols as
    ``var_names``, Ensembl ids in ``var["gene_ids"]``), the spot positions and
    ``spatial/scalefactors_json.json``. The image is ``image`` (a full-resolution TIFF or any
    image in full-resolution pixels) when given, else ``spatial/tissue_hires_image.png``,
    else ``spatial/tissue_lowres_image.png``, each mapped through its scale factor. An
    unusable image (Space Ranger writes an all-black placeholder when it had nothing to
    downscale) is skipped with a warning; when none is usable it is an error.

    ``mpp`` is 65 um over ``spot_diameter_fullres`` (10x defines that field for a theoretical
    65 um spot), checked against the spot grid: neighbouring spots are 100 um apart, and a
    disagreement above 10 % is warned about. ``sample_id`` defaults to the folder name (its
    parent's when the folder is called ``outs``). Extra ``obs``: ``in_tissue``. Extra ``uns``
    entries: ``mpp_grid`` (the grid's estimate), ``spot_diameter_fullres`` (Space Ranger's, kept for
    scanpy's scale factors) and ``image_note`` (why an image was
    skipped, empty when none was).
    """
    outs = Path(outs_dir)
    if not outs.is_dir():
        raise FileNotFoundError(f"Space Ranger output folder not found: {outs}")
    if not (outs / "filtered_feature_bc_matrix.h5").exists() and (outs / "outs").is_dir():
        outs = outs / "outs"
    if sample_id is None:
        sample_id = outs.resolve().parent.name if outs.name == "outs" else outs.resolve().name
    h5 = require_file(outs / "filtered_feature_bc_matrix.h5", "Space Ranger count matrix")
    spatial = outs / "spatial"
    scalefactors_path = require_file(spatial / "scalefactors_json.json", "Space Ranger scale factors")
    scalefactors = read_json(scalefactors_path)
    if "spot_diameter_fullres" not in scalefactors:
        raise ReaderError(f"{scalefactors_path}: missing 'spot_diameter_fullres'")
    spot_fullres = positive(scalefactors["spot_diameter_fullres"], scalefactors_path, "spot_diameter_fullres")

    matrix, barcodes, var = _read_10x_h5(h5)
    var.index = unique_genes(var["gene_symbol"], h5, "features/name")
    positions, positions_path = _read_visium_positions(spatial)
    where = join_barcodes(barcodes, positions.index, h5, positions_path, warn_extra=False)
    pos = positions.iloc[where]
    matrix, is_counts = check_counts(matrix, str(h5), "matrix/data", barcodes, list(var.index))
    mpp = SPACERANGER_FULLRES_SPOT_UM / spot_fullres
    # Hexagonal grid: a row's neighbours are 2 array columns apart, the next row's 1 column
    # and 1 row; in these units every neighbour is at distance 1 (= 100 um).
    hex_xy = np.column_stack([positions["array_col"] / 2, positions["array_row"] * math.sqrt(3) / 2])
    pitch_px, _ = grid_pitch_px(hex_xy, positions[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy())
    mpp_grid = VISIUM_PITCH_UM / pitch_px
    if abs(mpp_grid - mpp) > 0.1 * mpp:
        warnings.warn(
            f"{scalefactors_path}: spot_diameter_fullres gives {mpp:.4g} um/px but the spot grid in "
            f"{positions_path} gives {mpp_grid:.4g} um/px (100 um pitch); using the scale factors'",
            stacklevel=2,
        )

    candidates = []
    if image is not None:
        candidates.append((require_file(Path(image), "full-resolution image"), 1.0, "image"))
    for name, key in (
        ("tissue_hires_image.png", "tissue_hires_scalef"),
        ("tissue_lowres_image.png", "tissue_lowres_scalef"),
    ):
        if (spatial / name).is_file():
            if key not in scalefactors:
                raise ReaderError(f"{scalefactors_path}: missing {key!r}, needed to use {spatial / name}")
            candidates.append((spatial / name, positive(scalefactors[key], scalefactors_path, key), key))
    chosen, notes = None, []
    for path, scale, _ in candidates:
        img = open_checked_image(path)
        reason = unusable_reason(img.thumbnail(512)[0])
        if reason is None:
            chosen = (path, scale, img)
            break
        notes.append(f"{path}: {reason}")
        warnings.warn(f"{path} is unusable ({reason}); trying the next image", stacklevel=2)
    if chosen is None:
        tried = "; ".join(notes) if notes else f"no image given and none in {spatial}"
        raise ReaderError(
            f"no usable image for Visium sample {sample_id}: {tried}. Pass image=<full-resolution image>"
        )
    image_path, image_scale, img = chosen

    x = pos["pxl_col_in_fullres"].to_numpy()
    y = pos["pxl_row_in_fullres"].to_numpy()
    inside = inside_image(x, y, img, image_scale, positions_path, "pxl_col_in_fullres/pxl_row_in_fullres")
    obs = pd.DataFrame(
        {
            "x_px": x,
            "y_px": y,
            "array_row": pos["array_row"].to_numpy().astype(np.int64),
            "array_col": pos["array_col"].to_numpy().astype(np.int64),
            "in_tissue": pos["in_tissue"].to_numpy().astype(np.int64),
        }
    )
    info = {
        "source_format": "visium_spaceranger",
        "image_path": str(image_path),
        "image_scale": float(image_scale),
        "mpp": mpp,
        "mpp_grid": mpp_grid,
        "spot_diameter_fullres": spot_fullres,
        "spot_diameter_um": VISIUM_SPOT_UM,
        "spot_pitch_um": VISIUM_PITCH_UM,
        "image_note": "; ".join(notes),
        "n_spots_outside_image": int((~inside).sum()),
        "files": {
            "counts": h5,
            "positions": positions_path,
            "scalefactors": scalefactors_path,
            "image": image_path,
        },
    }
    barcodes = np.asarray(barcodes)[inside]
    return assemble(matrix[inside], is_counts, barcodes, obs[inside], var, sample_id, patient_id, info)
