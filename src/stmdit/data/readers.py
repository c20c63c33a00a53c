"""Readers for the spatial data users bring, all returning AnnData in one convention.

Formats: 10x Visium Space Ranger ``outs/`` (:func:`read_visium`), HEST-1k samples
(:func:`read_hest`), an AnnData with scanpy-style ``obsm['spatial']`` and a separate image
(:func:`read_spatial_h5ad`), legacy ST such as her2st or STNet (:func:`read_legacy_st`),
single-cell tables such as Xenium (:func:`read_cell_table`, then
:func:`aggregate_to_pseudospots`), and H&E-only slides (:func:`read_he_slide`). Several
samples join with :func:`concat_samples`.

The convention
--------------
``X`` and ``layers["counts"]``
    Raw integer counts, spots x genes, as a CSR matrix (``X`` is a copy of the layer, so
    normalising ``X`` in place leaves the counts intact). Input that is not integer counts
    (e.g. an already normalised matrix) is never rounded or altered: it stays in ``X``,
    ``layers["counts"]`` is left out, ``counts_available`` is False and a warning says so.
    Non-numeric, NaN, infinite or negative values are errors.
``var``
    Gene symbols as ``var_names``. Duplicated symbols are made unique (``GENE``,
    ``GENE-1``, ...) with a warning; the original symbol stays in ``var["gene_symbol"]`` and
    Ensembl ids, where the source has them, in ``var["gene_ids"]``.
``obs``
    ``sample_id`` (categorical), ``patient_id`` (categorical, always present, NaN when the
    source does not say), ``barcode`` (the spot's id in the source files), ``x_px`` and
    ``y_px`` (the spot centre in full-resolution pixels of the sample's coordinate system),
    ``array_row`` and ``array_col`` (the spot's grid position when the source has one, absent
    otherwise). ``obs_names`` are ``"<sample_id>:<barcode>"``, unique across samples.
``uns["stmdit"]["samples"][sample_id]``
    A dict: ``source_format``; ``image_path`` (absolute path of the image the crops come
    from); ``image_scale`` (pixels of that image per full-resolution pixel: 1 for a
    full-resolution image, ``tissue_hires_scalef`` for a Space Ranger hires PNG), so a spot
    lies at ``(x_px * image_scale, y_px * image_scale)`` in the image file; ``mpp``
    (microns per full-resolution pixel); ``spot_diameter_um``; ``spot_pitch_um``
    (centre-to-centre grid distance, NaN when there is no grid); ``counts_available``;
    ``files`` (role -> path of every source file read); plus reader-specific entries
    documented with each reader.

Bad input
---------
Missing files, missing fields, non-numeric / NaN / negative counts and an unknown pixel
size raise errors naming the file and the field. Barcodes: a count profile without a
position cannot be placed on the image and almost always means files from different
sections, so it is an error; positions without counts are dropped (silently for Visium and
HEST, whose position tables list every spot of the capture area by design; with a warning for
legacy ST). Spot centres outside the image: when more than
:data:`MAX_OUTSIDE_FRACTION` of them are outside, the image or the coordinate frame is wrong
and it is an error; fewer are dropped with a warning and counted in ``n_spots_outside_image``.
"""

from __future__ import annotations

import gzip
import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata.utils import make_index_unique
from scipy.spatial import cKDTree

from stmdit.data.images import SlideImage, open_image, tissue_mask, tissue_threshold, unusable_reason

__all__ = [
    "DEEPSPOT_TCGA_SPACING_UM",
    "DEEPSPOT_TCGA_SPOT_UM",
    "LEGACY_ST_PITCH_UM",
    "LEGACY_ST_SPOT_UM",
    "MAX_OUTSIDE_FRACTION",
    "SPACERANGER_FULLRES_SPOT_UM",
    "VISIUM_PITCH_UM",
    "VISIUM_SPOT_UM",
    "aggregate_to_pseudospots",
    "concat_samples",
    "read_cell_table",
    "read_he_slide",
    "read_hest",
    "read_legacy_st",
    "read_spatial_h5ad",
    "read_visium",
]

VISIUM_SPOT_UM = 55.0
VISIUM_PITCH_UM = 100.0
# Space Ranger's spot_diameter_fullres spans "a theoretical 65 um spot" (Space Ranger output
# documentation), not the 55 um capture spot: 55 / spot_diameter_fullres would understate the
# pixel size by 15 %, which the 100 um spot grid of real outs/ folders confirms.
SPACERANGER_FULLRES_SPOT_UM = 65.0
LEGACY_ST_SPOT_UM = 100.0
LEGACY_ST_PITCH_UM = 200.0
# DeepSpot's TCGA pseudo-spots: 160 px spots every 290 px at 20x, i.e. at 0.5 um/px.
DEEPSPOT_TCGA_SPOT_UM = 160 * 0.5
DEEPSPOT_TCGA_SPACING_UM = 290 * 0.5
# HEST-1k patches are 224 px at 0.5 um/px around each spot.
HEST_PATCH_MPP = 0.5

MAX_OUTSIDE_FRACTION = 0.05

_PIXEL_SIZE_KEYS = (
    "pixel_size_um_estimated",
    "pixel_size_um_embedded",
    "pixel_size_um",
    "mpp",
    "microns_per_pixel",
)
_GENERIC_STEMS = {"counts", "count", "matrix", "stdata", "expression", "data", "he", "image"}


# ---------------------------------------------------------------------------------------------
# Shared pieces


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def _stem(path: Path) -> str:
    """The file name without its extension, and without ``.gz`` before it (``counts.tsv.gz``)."""
    name = path.name[:-3] if path.name.lower().endswith(".gz") else path.name
    return Path(name).stem


def _default_sample_id(path: Path) -> str:
    """The file's stem, or its folder's name when the stem is generic (``counts.tsv.gz``)."""
    stem = _stem(path)
    return path.parent.name if stem.lower() in _GENERIC_STEMS else stem


def _check_counts(
    x, source: str, field: str, rows: Sequence[str], genes: Sequence[str]
) -> tuple[sp.csr_matrix, bool]:
    """Validate an expression matrix; return it as CSR and whether it is integer counts.

    Integer-valued floats become integers (the values are unchanged); other values are kept
    exactly as they are.
    """
    if isinstance(x, pd.DataFrame):
        x = x.to_numpy()
    matrix = sp.csr_matrix(x) if not sp.issparse(x) else sp.csr_matrix(x, copy=True)
    if not (np.issubdtype(matrix.dtype, np.number) or matrix.dtype == bool):
        raise ValueError(f"{source}: {field} is not numeric (dtype {matrix.dtype}); expected counts")
    data = matrix.data
    bad = ~np.isfinite(data) if np.issubdtype(data.dtype, np.floating) else np.zeros(data.shape, dtype=bool)
    if bad.any():
        r, c = _position_of(matrix, int(np.flatnonzero(bad)[0]))
        raise ValueError(
            f"{source}: {field} has {data[bad][0]} for spot {rows[r]!r}, gene {genes[c]!r}; counts must be finite"
        )
    if (data < 0).any():
        k = int(np.flatnonzero(data < 0)[0])
        r, c = _position_of(matrix, k)
        raise ValueError(
            f"{source}: {field} has a negative value {data[k]} for spot {rows[r]!r}, gene {genes[c]!r}; "
            "expected raw counts >= 0"
        )
    integral = bool(np.all(data == np.round(data))) if np.issubdtype(data.dtype, np.floating) else True
    if not integral:
        k = int(np.flatnonzero(data != np.round(data))[0])
        r, c = _position_of(matrix, k)
        warnings.warn(
            f"{source}: {field} holds non-integer values (e.g. {data[k]:.6g} for spot {rows[r]!r}, gene "
            f"{genes[c]!r}), so it is not raw counts (normalised?). It is kept unchanged in X; layers['counts'] "
            "is left out and counts_available is False.",
            stacklevel=3,
        )
        return matrix, False
    matrix.eliminate_zeros()
    top = matrix.data.max(initial=0)
    matrix = matrix.astype(np.int32 if top < 2**31 else np.int64)
    return matrix, True


def _position_of(matrix: sp.csr_matrix, k: int) -> tuple[int, int]:
    row = int(np.searchsorted(matrix.indptr, k, side="right") - 1)
    return row, int(matrix.indices[k])


def _unique_genes(names: Sequence[str], source: str, field: str) -> pd.Index:
    index = pd.Index([str(n) for n in names])
    if index.has_duplicates:
        dup = sorted(set(index[index.duplicated()]))
        warnings.warn(
            f"{source}: {field} has {len(dup)} duplicated gene names (e.g. {dup[:5]}); made unique by appending "
            "-1, -2, ... (original symbols in var['gene_symbol'])",
            stacklevel=3,
        )
        index = make_index_unique(index)
    return index


def _join_barcodes(
    count_ids: Sequence[str],
    position_ids: pd.Index,
    source_counts: Path,
    source_positions: Path,
    warn_extra: bool,
):
    """Row of each count profile in the position table; errors on profiles without one."""
    count_ids = pd.Index([str(b) for b in count_ids])
    if count_ids.has_duplicates:
        dup = sorted(set(count_ids[count_ids.duplicated()]))
        raise ValueError(f"{source_counts}: duplicated spot ids {dup[:5]}")
    if position_ids.has_duplicates:
        dup = sorted(set(position_ids[position_ids.duplicated()]))
        raise ValueError(f"{source_positions}: duplicated spot ids {dup[:5]}")
    where = position_ids.get_indexer(count_ids)
    missing = count_ids[where < 0]
    if len(missing):
        raise ValueError(
            f"{len(missing)} of {len(count_ids)} spots in {source_counts} have no position in {source_positions} "
            f"(e.g. {list(missing[:5])}; the positions have e.g. {list(position_ids[:3])}). Are both files from "
            "the same section, with the same barcode spelling?"
        )
    extra = len(position_ids) - len(count_ids)
    if warn_extra and extra > 0:
        unused = position_ids[~position_ids.isin(count_ids)]
        warnings.warn(
            f"{source_positions}: {extra} spots have no counts in {source_counts} (e.g. {list(unused[:5])}); ignored",
            stacklevel=3,
        )
    return where


def _positive(value, source: str, field: str) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{source}: {field} must be a number; got {value!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{source}: {field} must be a positive number; got {value}")
    return value


def _coordinates(values, source: str, field: str) -> np.ndarray:
    out = pd.to_numeric(pd.Series(np.asarray(values).ravel()), errors="coerce").to_numpy(dtype=np.float64)
    if not np.isfinite(out).all():
        k = int(np.flatnonzero(~np.isfinite(out))[0])
        raise ValueError(
            f"{source}: {field} is missing or not a number at row {k} ({np.asarray(values).ravel()[k]!r})"
        )
    return out


def _inside_image(
    x: np.ndarray, y: np.ndarray, image: SlideImage, scale: float, source: str, fields: str
) -> np.ndarray:
    """Mask of spot centres inside the image; see the module docstring for the policy."""
    xi, yi = x * scale, y * scale
    inside = (xi >= 0) & (yi >= 0) & (xi < image.width) & (yi < image.height)
    n_out = int((~inside).sum())
    if n_out == 0:
        return inside
    msg = (
        f"{n_out} of {len(x)} spot centres ({fields} of {source}, times image scale {scale:.6g}) fall outside "
        f"{image.path} ({image.width} x {image.height} px); e.g. ({xi[~inside][0]:.1f}, {yi[~inside][0]:.1f})"
    )
    if n_out > MAX_OUTSIDE_FRACTION * len(x):
        hint = "Is it the right image, and are the coordinates in its pixel frame and scale?"
        if ((yi >= 0) & (xi >= 0) & (yi < image.width) & (xi < image.height)).all():
            hint = "With x and y swapped every centre would be inside: are the two coordinates exchanged?"
        raise ValueError(f"{msg}. {hint}")
    warnings.warn(msg + "; those spots are dropped", stacklevel=3)
    return inside


def _assemble(
    matrix: sp.csr_matrix,
    is_counts: bool,
    barcodes: Sequence[str],
    obs: pd.DataFrame,
    var: pd.DataFrame,
    sample_id: str,
    patient_id: str | None,
    info: dict,
) -> ad.AnnData:
    barcodes = [str(b) for b in barcodes]
    obs = obs.reset_index(drop=True).copy()
    obs.insert(0, "barcode", barcodes)
    obs.insert(0, "patient_id", pd.Categorical([patient_id] * len(barcodes)))
    obs.insert(0, "sample_id", pd.Categorical([sample_id] * len(barcodes)))
    obs.index = pd.Index([f"{sample_id}:{b}" for b in barcodes])
    if obs.index.has_duplicates:
        raise ValueError(
            f"sample {sample_id}: duplicated spot ids {list(obs.index[obs.index.duplicated()][:5])}"
        )
    adata = ad.AnnData(X=matrix, obs=obs, var=var)
    if is_counts:
        adata.layers["counts"] = matrix.copy()
    info = {
        "spot_pitch_um": float("nan"),
        **info,
        "counts_available": bool(is_counts),
        "image_path": str(Path(info["image_path"]).resolve()),
        "files": {k: str(Path(v).resolve()) for k, v in info["files"].items()},
    }
    adata.uns["stmdit"] = {"samples": {sample_id: info}}
    return adata


def _read_json(path: Path) -> dict:
    try:
        with open(path) as fh:
            data = json.load(fh)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _meta_value(meta: dict, keys: Sequence[str]):
    """First key of ``keys`` whose value is a usable positive number, as (key, value)."""
    for key in keys:
        value = meta.get(key)
        try:
            value = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(value) and value > 0:
            return key, value
    return None, None


def _patient(value) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip() == "":
        return None
    return str(value)


# ---------------------------------------------------------------------------------------------
# Visium


def _read_10x_h5(path: Path) -> tuple[sp.csr_matrix, list[str], pd.DataFrame]:
    """Barcodes x features matrix of a Space Ranger / Cell Ranger (v3+) HDF5, gene expression only."""
    import h5py

    with h5py.File(path, "r") as f:
        if "matrix" not in f:
            raise ValueError(
                f"{path}: no 'matrix' group; expected a Space Ranger feature-barcode matrix (filtered_feature_bc_matrix.h5)"
            )
        g = f["matrix"]
        for key in ("data", "indices", "indptr", "shape", "barcodes", "features/name", "features/id"):
            if key not in g:
                raise ValueError(f"{path}: missing dataset matrix/{key}")
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
        raise ValueError(f"{path}: no 'Gene Expression' features (feature types: {sorted(set(types))})")
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
            table = pd.read_parquet(path)
        except ImportError as err:
            raise ImportError(f"reading {path} needs a parquet engine: `pip install pyarrow`") from err
    else:
        with open(path) as fh:
            has_header = fh.readline().split(",")[0].strip() == "barcode"
        table = pd.read_csv(path, header=0 if has_header else None)
        if not has_header:
            if table.shape[1] != len(columns):
                raise ValueError(
                    f"{path}: {table.shape[1]} columns; a Space Ranger 1.x positions list has {len(columns)}"
                )
            table.columns = columns
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}; found {list(table.columns)}")
    table["barcode"] = table["barcode"].astype(str)
    for col in columns[1:]:
        table[col] = _coordinates(table[col], path, col)
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
    entries: ``mpp_grid`` (the grid's estimate) and ``image_note`` (why an image was
    skipped, empty when none was).
    """
    outs = Path(outs_dir)
    if not outs.is_dir():
        raise FileNotFoundError(f"Space Ranger output folder not found: {outs}")
    if not (outs / "filtered_feature_bc_matrix.h5").exists() and (outs / "outs").is_dir():
        outs = outs / "outs"
    if sample_id is None:
        sample_id = outs.resolve().parent.name if outs.name == "outs" else outs.resolve().name
    h5 = _require_file(outs / "filtered_feature_bc_matrix.h5", "Space Ranger count matrix")
    spatial = outs / "spatial"
    scalefactors_path = _require_file(spatial / "scalefactors_json.json", "Space Ranger scale factors")
    scalefactors = _read_json(scalefactors_path)
    if "spot_diameter_fullres" not in scalefactors:
        raise ValueError(f"{scalefactors_path}: missing 'spot_diameter_fullres'")
    spot_fullres = _positive(
        scalefactors["spot_diameter_fullres"], scalefactors_path, "spot_diameter_fullres"
    )

    matrix, barcodes, var = _read_10x_h5(h5)
    var.index = _unique_genes(var["gene_symbol"], h5, "features/name")
    positions, positions_path = _read_visium_positions(spatial)
    where = _join_barcodes(barcodes, positions.index, h5, positions_path, warn_extra=False)
    pos = positions.iloc[where]
    matrix, is_counts = _check_counts(matrix, str(h5), "matrix/data", barcodes, list(var.index))
    mpp = SPACERANGER_FULLRES_SPOT_UM / spot_fullres
    # Hexagonal grid: a row's neighbours are 2 array columns apart, the next row's 1 column
    # and 1 row; in these units every neighbour is at distance 1 (= 100 um).
    hex_xy = np.column_stack([positions["array_col"] / 2, positions["array_row"] * math.sqrt(3) / 2])
    pitch_px, _ = _grid_pitch_px(hex_xy, positions[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy())
    mpp_grid = VISIUM_PITCH_UM / pitch_px
    if abs(mpp_grid - mpp) > 0.1 * mpp:
        warnings.warn(
            f"{scalefactors_path}: spot_diameter_fullres gives {mpp:.4g} um/px but the spot grid in "
            f"{positions_path} gives {mpp_grid:.4g} um/px (100 um pitch); using the scale factors'",
            stacklevel=2,
        )

    candidates = []
    if image is not None:
        candidates.append((_require_file(Path(image), "full-resolution image"), 1.0, "image"))
    for name, key in (
        ("tissue_hires_image.png", "tissue_hires_scalef"),
        ("tissue_lowres_image.png", "tissue_lowres_scalef"),
    ):
        if (spatial / name).is_file():
            if key not in scalefactors:
                raise ValueError(f"{scalefactors_path}: missing {key!r}, needed to use {spatial / name}")
            candidates.append((spatial / name, _positive(scalefactors[key], scalefactors_path, key), key))
    chosen, notes = None, []
    for path, scale, _ in candidates:
        img = open_image(path)
        reason = unusable_reason(img.thumbnail(512)[0])
        if reason is None:
            chosen = (path, scale, img)
            break
        notes.append(f"{path}: {reason}")
        warnings.warn(f"{path} is unusable ({reason}); trying the next image", stacklevel=2)
    if chosen is None:
        tried = "; ".join(notes) if notes else f"no image given and none in {spatial}"
        raise ValueError(
            f"no usable image for Visium sample {sample_id}: {tried}. Pass image=<full-resolution image>"
        )
    image_path, image_scale, img = chosen

    x = pos["pxl_col_in_fullres"].to_numpy()
    y = pos["pxl_row_in_fullres"].to_numpy()
    inside = _inside_image(x, y, img, image_scale, positions_path, "pxl_col_in_fullres/pxl_row_in_fullres")
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
    return _assemble(matrix[inside], is_counts, barcodes, obs[inside], var, sample_id, patient_id, info)


# ---------------------------------------------------------------------------------------------
# AnnData-based inputs: HEST-1k and scanpy/squidpy-style h5ad


def _h5ad_expression(adata: ad.AnnData) -> tuple[object, str]:
    if "counts" in adata.layers:
        return adata.layers["counts"], "layers['counts']"
    return adata.X, "X"


def _h5ad_centres(adata: ad.AnnData, path: Path) -> tuple[np.ndarray, np.ndarray, str]:
    obs = adata.obs
    if "pxl_col_in_fullres" in obs and "pxl_row_in_fullres" in obs:
        fields = "obs pxl_col_in_fullres/pxl_row_in_fullres"
        return (
            _coordinates(obs["pxl_col_in_fullres"], path, "obs['pxl_col_in_fullres']"),
            _coordinates(obs["pxl_row_in_fullres"], path, "obs['pxl_row_in_fullres']"),
            fields,
        )
    if "spatial" in adata.obsm:
        xy = np.asarray(adata.obsm["spatial"])
        if xy.ndim != 2 or xy.shape[1] < 2:
            raise ValueError(f"{path}: obsm['spatial'] has shape {xy.shape}; expected (n_spots, 2)")
        return (
            _coordinates(xy[:, 0], path, "obsm['spatial'][:, 0]"),
            _coordinates(xy[:, 1], path, "obsm['spatial'][:, 1]"),
            "obsm['spatial']",
        )
    raise ValueError(
        f"{path}: no spot coordinates: expected obs 'pxl_col_in_fullres' and 'pxl_row_in_fullres', or obsm['spatial']"
    )


def _scanpy_scalefactors(adata: ad.AnnData, library_id: str | None, path: Path) -> tuple[str | None, dict]:
    spatial = adata.uns.get("spatial", {})
    if not isinstance(spatial, dict) or not spatial:
        return None, {}
    if library_id is None:
        if len(spatial) > 1:
            raise ValueError(f"{path}: uns['spatial'] has libraries {sorted(spatial)}; pass library_id=")
        library_id = next(iter(spatial))
    if library_id not in spatial:
        raise ValueError(f"{path}: uns['spatial'] has no library {library_id!r}; it has {sorted(spatial)}")
    return library_id, dict(spatial[library_id].get("scalefactors", {}))


def _anndata_sample(
    adata: ad.AnnData,
    path: Path,
    image: SlideImage,
    image_scale: float,
    sample_id: str,
    patient_id: str | None,
    info: dict,
    extra_obs: dict | None = None,
    centres: tuple[np.ndarray, np.ndarray, str] | None = None,
) -> ad.AnnData:
    """The convention's AnnData from an h5ad's expression, spot centres (``centres`` as
    ``(x, y, field names)``, default :func:`_h5ad_centres`) and grid columns."""
    expression, field = _h5ad_expression(adata)
    genes = _unique_genes(adata.var_names, path, "var_names")
    barcodes = [str(b) for b in adata.obs_names]
    matrix, is_counts = _check_counts(expression, str(path), field, barcodes, list(genes))
    x, y, fields = centres if centres is not None else _h5ad_centres(adata, path)
    obs = pd.DataFrame({"x_px": x, "y_px": y})
    for col in ("array_row", "array_col", "in_tissue"):
        if col in adata.obs:
            obs[col] = _coordinates(adata.obs[col], path, f"obs[{col!r}]").astype(np.int64)
    for key, values in (extra_obs or {}).items():
        obs[key] = values
    var = adata.var.copy()
    var.index = genes
    if "gene_symbol" not in var:
        var["gene_symbol"] = [str(g) for g in adata.var_names]
    inside = _inside_image(x, y, image, image_scale, path, fields)
    info = {**info, "n_spots_outside_image": int((~inside).sum())}
    return _assemble(
        matrix[inside], is_counts, np.asarray(barcodes)[inside], obs[inside], var, sample_id, patient_id, info
    )


def read_hest(
    st_h5ad: str | Path,
    wsi: str | Path | None = None,
    patches_h5: str | Path | None = None,
    metadata: str | Path | None = None,
    sample_id: str | None = None,
    spot_diameter_um: float | None = None,
) -> ad.AnnData:
    """A HEST-1k sample: ``st/<id>.h5ad`` with ``wsis/<id>.tif``, ``patches/<id>.h5`` and
    ``metadata/<id>.json``.

    ``wsi``, ``patches_h5`` and ``metadata`` default to those paths beside the ``st`` folder
    when they exist (the WSI is required). Spot centres come from obs ``pxl_col_in_fullres``
    / ``pxl_row_in_fullres`` (else ``obsm['spatial']``) in WSI level-0 pixels; counts from
    ``layers['counts']`` else ``X``.

    Pixel size: the metadata's ``pixel_size_um_estimated`` (HEST's estimate from the spot
    grid), else ``pixel_size_um_embedded``, else the WSI's resolution tags; else an error.
    Spot diameter: ``spot_diameter_um``, else the metadata's ``spot_diameter``, else the
    technology's (Visium 55 um, ST 100 um). ``patient_id`` is the metadata's ``patient``.

    The patches file is checked, not loaded: ``obs["hest_patch"]`` is each spot's row in it
    (-1 when HEST kept no patch), and a warning is given when the patch positions (top-left
    corners of 224 px patches at 0.5 um/px) disagree with the spot centres, which means the
    pixel size or the coordinates are wrong.
    """
    st_h5ad = _require_file(Path(st_h5ad), "HEST expression file (st/<id>.h5ad)")
    stem = _stem(st_h5ad)
    root = st_h5ad.resolve().parent.parent
    wsi = (
        Path(wsi)
        if wsi is not None
        else next((p for p in sorted((root / "wsis").glob(f"{stem}.tif*"))), None)
    )
    if wsi is None:
        raise FileNotFoundError(
            f"no whole-slide image for {st_h5ad}: pass wsi= (HEST keeps it at {root / 'wsis' / (stem + '.tif')})"
        )
    _require_file(wsi, "HEST whole-slide image")
    if patches_h5 is None and (root / "patches" / f"{stem}.h5").is_file():
        patches_h5 = root / "patches" / f"{stem}.h5"
    if metadata is None and (root / "metadata" / f"{stem}.json").is_file():
        metadata = root / "metadata" / f"{stem}.json"
    meta = _read_json(_require_file(Path(metadata), "HEST metadata")) if metadata is not None else {}
    sample_id = sample_id or str(meta.get("id") or stem)

    img = open_image(wsi)
    key, mpp = _meta_value(meta, ("pixel_size_um_estimated", "pixel_size_um_embedded"))
    mpp_source = f"{metadata}: {key}" if key else None
    if mpp is None and img.mpp is not None:
        mpp, mpp_source = img.mpp, f"{wsi}: resolution tags"
    if mpp is None:
        raise ValueError(
            f"pixel size of {wsi} unknown: no pixel_size_um_estimated / pixel_size_um_embedded in "
            f"{metadata or 'the metadata (none given)'} and no resolution tags in the WSI; pass metadata=<HEST json>"
        )
    adata = ad.read_h5ad(st_h5ad)
    technology = str(meta.get("st_technology", ""))
    if spot_diameter_um is None:
        _, spot_diameter_um = _meta_value(meta, ("spot_diameter",))
    if spot_diameter_um is None:
        spot_diameter_um = {"Visium": VISIUM_SPOT_UM, "Spatial Transcriptomics": LEGACY_ST_SPOT_UM}.get(
            technology
        )
    if spot_diameter_um is None:
        raise ValueError(
            f"spot diameter of {st_h5ad} unknown (no 'spot_diameter' in the metadata); pass spot_diameter_um="
        )
    _, pitch = _meta_value(meta, ("inter_spot_dist",))

    extra_obs = {}
    files = {"counts": st_h5ad, "image": wsi}
    if metadata is not None:
        files["metadata"] = Path(metadata)
    if patches_h5 is not None:
        patches_h5 = _require_file(Path(patches_h5), "HEST patches file")
        files["patches"] = patches_h5
        extra_obs["hest_patch"] = _hest_patch_rows(adata, st_h5ad, patches_h5, mpp)
    info = {
        "source_format": "hest",
        "image_path": str(wsi),
        "image_scale": 1.0,
        "mpp": float(mpp),
        "mpp_source": mpp_source,
        "spot_diameter_um": float(spot_diameter_um),
        "spot_pitch_um": float(pitch) if pitch else float("nan"),
        "st_technology": technology,
        "files": files,
    }
    return _anndata_sample(
        adata, st_h5ad, img, 1.0, sample_id, _patient(meta.get("patient")), info, extra_obs
    )


def _hest_patch_rows(adata: ad.AnnData, st_h5ad: Path, patches_h5: Path, mpp: float) -> np.ndarray:
    import h5py

    with h5py.File(patches_h5, "r") as f:
        for key in ("barcode", "coords", "img"):
            if key not in f:
                raise ValueError(
                    f"{patches_h5}: missing dataset {key!r}; expected HEST's img / coords / barcode"
                )
        raw = np.asarray(f["barcode"][:]).reshape(-1)
        coords = np.asarray(f["coords"][:], dtype=np.float64)
        patch_px = int(f["img"].shape[1])
    barcodes = pd.Index([b.decode() if isinstance(b, bytes) else str(b) for b in raw])
    rows = barcodes.get_indexer(pd.Index([str(b) for b in adata.obs_names]))
    unknown = barcodes[~barcodes.isin(adata.obs_names)]
    if len(unknown):
        raise ValueError(
            f"{patches_h5}: {len(unknown)} patch barcodes are not spots of {st_h5ad} (e.g. {list(unknown[:5])})"
        )
    has = rows >= 0
    if has.any():
        x, y, _ = _h5ad_centres(adata, st_h5ad)
        half = (patch_px * HEST_PATCH_MPP / mpp) // 2
        offset = np.hypot(coords[rows[has], 0] + half - x[has], coords[rows[has], 1] + half - y[has])
        if np.median(offset) > max(2.0, 0.05 * 2 * half):
            warnings.warn(
                f"{patches_h5}: patch positions (coords) are {np.median(offset):.1f} px from the spot centres of "
                f"{st_h5ad} at {mpp:.4g} um/px; the pixel size or the coordinates are probably wrong",
                stacklevel=3,
            )
    return rows


def read_spatial_h5ad(
    h5ad: str | Path,
    image: str | Path,
    image_scale: float = 1.0,
    sample_id: str | None = None,
    patient_id: str | None = None,
    library_id: str | None = None,
    spot_diameter_um: float = VISIUM_SPOT_UM,
    spot_pitch_um: float = VISIUM_PITCH_UM,
    mpp: float | None = None,
) -> ad.AnnData:
    """An AnnData with spot centres in ``obsm['spatial']`` (scanpy / squidpy style; obs
    ``pxl_col_in_fullres`` / ``pxl_row_in_fullres`` take precedence) and an image.

    ``image`` holds the spots at ``obsm['spatial'] * image_scale``. Pixel size: ``mpp`` when
    given, else 65 um over ``uns['spatial'][library_id]['scalefactors']
    ['spot_diameter_fullres']`` (Space Ranger's definition, see :func:`read_visium`), else
    the image file's own; else an error. ``spot_diameter_um`` and ``spot_pitch_um`` describe
    the physical spots (Visium's by default). ``sample_id`` defaults to the ``uns['spatial']``
    library id, else the file name. Counts come from ``layers['counts']`` else ``X`` (see the
    module docstring for normalised input).
    """
    h5ad = _require_file(Path(h5ad), "AnnData file")
    image = _require_file(Path(image), "image")
    image_scale = _positive(image_scale, "read_spatial_h5ad", "image_scale")
    adata = ad.read_h5ad(h5ad)
    library, scalefactors = _scanpy_scalefactors(adata, library_id, h5ad)
    img = open_image(image)
    mpp_source = "argument"
    if mpp is None and "spot_diameter_fullres" in scalefactors:
        fullres = _positive(
            scalefactors["spot_diameter_fullres"], h5ad, f"uns['spatial'][{library!r}] spot_diameter_fullres"
        )
        mpp, mpp_source = SPACERANGER_FULLRES_SPOT_UM / fullres, f"{h5ad}: spot_diameter_fullres"
    if mpp is None and img.mpp is not None:
        # One full-resolution pixel spans image_scale pixels of the image file.
        mpp, mpp_source = img.mpp * image_scale, f"{image}: resolution metadata"
    if mpp is None:
        raise ValueError(
            f"pixel size unknown for {h5ad}: no spot_diameter_fullres in uns['spatial'] and no resolution metadata "
            f"in {image}; pass mpp=<microns per full-resolution pixel>"
        )
    info = {
        "source_format": "spatial_h5ad",
        "image_path": str(image),
        "image_scale": image_scale,
        "mpp": _positive(mpp, "read_spatial_h5ad", "mpp"),
        "mpp_source": mpp_source,
        "spot_diameter_um": float(spot_diameter_um),
        "spot_pitch_um": _positive(spot_pitch_um, "read_spatial_h5ad", "spot_pitch_um"),
        "files": {"counts": h5ad, "image": image},
    }
    sample_id = sample_id or library or _stem(h5ad)
    return _anndata_sample(adata, h5ad, img, image_scale, sample_id, patient_id, info)


# ---------------------------------------------------------------------------------------------
# Legacy ST


def _separator(path: Path) -> str:
    return "," if ".csv" in path.name.lower() else "\t"


def _read_counts_table(path: Path) -> pd.DataFrame:
    sep = _separator(path)
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rt") as fh:
        header = fh.readline().rstrip("\r\n").split(sep)
    table = pd.read_csv(path, sep=sep, index_col=0, low_memory=False)
    if len(header) == table.shape[1] + 1:  # pandas renames duplicated columns; keep the file's names
        table.columns = [h.strip('"') for h in header[1:]]
    non_numeric = [
        c for c, dt in zip(table.columns, table.dtypes, strict=True) if not pd.api.types.is_numeric_dtype(dt)
    ]
    if non_numeric:
        col = non_numeric[0]
        values = table[col]
        bad = values[pd.to_numeric(values, errors="coerce").isna() & values.notna()]
        example = f" (spot {bad.index[0]!r}: {bad.iloc[0]!r})" if len(bad) else ""
        raise ValueError(f"{path}: gene column {col!r} is not numeric{example}; expected counts")
    return table


def _looks_like_st_id(values) -> float:
    ids = pd.Series([str(v) for v in values])
    return float(ids.str.fullmatch(r"\d+(\.\d+)?x\d+(\.\d+)?").mean()) if len(ids) else 0.0


def _grid_pitch_px(grid_xy: np.ndarray, pixel_xy: np.ndarray) -> tuple[float, int]:
    """Median pixel distance between grid neighbours one pitch apart, and the number of pairs.

    Falls back to the median nearest-neighbour pixel distance when no two spots are adjacent
    on the grid.
    """
    pairs = np.array(sorted(cKDTree(grid_xy).query_pairs(r=1.0 + 1e-6)), dtype=np.int64).reshape(-1, 2)
    if len(pairs) >= 3:
        d = np.linalg.norm(pixel_xy[pairs[:, 0]] - pixel_xy[pairs[:, 1]], axis=1)
        return float(np.median(d)), len(pairs)
    d, _ = cKDTree(pixel_xy).query(pixel_xy, k=2)
    return float(np.median(d[:, 1])), 0


def read_legacy_st(
    counts: str | Path,
    spots: str | Path,
    image: str | Path,
    sample_id: str | None = None,
    patient_id: str | None = None,
    spot_pitch_um: float = LEGACY_ST_PITCH_UM,
    spot_diameter_um: float = LEGACY_ST_SPOT_UM,
) -> ad.AnnData:
    """Legacy ST (her2st, STNet): a counts table, a spot table and a full-resolution image.

    ``counts``: spots x genes (tab-separated, comma for ``.csv``; gzip allowed), first column
    the spot id ``XxY`` (a table with ids as columns is transposed). ``spots``: columns ``x``
    and ``y`` (grid position, joined to the counts as ``f"{x}x{y}"``) and ``pixel_x``,
    ``pixel_y`` (centre in image pixels); optional ``selected`` (spots with 0 are not under
    tissue and are dropped with a warning).

    The pixel size is estimated from the grid: the median pixel distance between spots one
    grid step apart is ``spot_pitch_um`` (200 um on the ST array), so ``mpp = pitch /
    distance``; it is robust to missing spots and to the array's slight distortion.
    ``sample_id`` defaults to the counts file name (its folder's name when the file is called
    e.g. ``counts.tsv.gz``). Extra ``uns`` entry: ``mpp_grid_pairs`` (pairs used).
    """
    counts, spots, image = Path(counts), Path(spots), Path(image)
    _require_file(counts, "ST counts table")
    _require_file(spots, "ST spot table")
    _require_file(image, "ST image")
    sample_id = sample_id or _default_sample_id(counts)
    table = _read_counts_table(counts)
    if _looks_like_st_id(table.index) < 0.5 and _looks_like_st_id(table.columns) >= 0.5:
        table = table.T
    if _looks_like_st_id(table.index) < 0.5:
        raise ValueError(
            f"{counts}: spot ids (first column) should look like '10x21' (XxY); got {list(table.index[:3])}"
        )
    table.index = [str(i) for i in table.index]

    spot_table = pd.read_csv(spots, sep=_separator(spots))
    needed = ["x", "y", "pixel_x", "pixel_y"]
    missing = [c for c in needed if c not in spot_table.columns]
    if missing:
        raise ValueError(f"{spots}: missing columns {missing}; found {list(spot_table.columns)}")
    gx = _coordinates(spot_table["x"], spots, "x")
    gy = _coordinates(spot_table["y"], spots, "y")
    px = _coordinates(spot_table["pixel_x"], spots, "pixel_x")
    py = _coordinates(spot_table["pixel_y"], spots, "pixel_y")
    ids = pd.Index(
        [
            f"{int(a)}x{int(b)}" if float(a).is_integer() and float(b).is_integer() else f"{a}x{b}"
            for a, b in zip(gx, gy, strict=True)
        ]
    )
    where = _join_barcodes(table.index, ids, counts, spots, warn_extra=True)

    keep = np.ones(len(table), dtype=bool)
    if "selected" in spot_table.columns:
        selected = _coordinates(spot_table["selected"], spots, "selected")[where]
        keep = selected != 0
        if not keep.all():
            warnings.warn(
                f"{spots}: {int((~keep).sum())} spots with counts have selected == 0 (not under tissue); dropped",
                stacklevel=2,
            )
    genes = _unique_genes(table.columns, counts, "gene names (header)")
    matrix, is_counts = _check_counts(table.to_numpy(), str(counts), "counts", list(table.index), list(genes))

    where = where[keep]
    grid_xy = np.column_stack([gx[where], gy[where]])
    pixel_xy = np.column_stack([px[where], py[where]])
    pitch_px, n_pairs = _grid_pitch_px(grid_xy, pixel_xy)
    mpp = _positive(spot_pitch_um, "read_legacy_st", "spot_pitch_um") / pitch_px
    img = open_image(image)
    if img.mpp is not None and abs(img.mpp - mpp) > 0.1 * mpp:
        warnings.warn(
            f"{image} states {img.mpp:.4g} um/px but the spot grid gives {mpp:.4g} um/px ({spot_pitch_um} um pitch); "
            "using the grid's",
            stacklevel=2,
        )
    obs = pd.DataFrame(
        {
            "x_px": pixel_xy[:, 0],
            "y_px": pixel_xy[:, 1],
            "array_row": np.round(grid_xy[:, 1]).astype(np.int64),
            "array_col": np.round(grid_xy[:, 0]).astype(np.int64),
        }
    )
    inside = _inside_image(pixel_xy[:, 0], pixel_xy[:, 1], img, 1.0, spots, "pixel_x/pixel_y")
    info = {
        "source_format": "legacy_st",
        "image_path": str(image),
        "image_scale": 1.0,
        "mpp": float(mpp),
        "mpp_grid_pairs": int(n_pairs),
        "spot_diameter_um": _positive(spot_diameter_um, "read_legacy_st", "spot_diameter_um"),
        "spot_pitch_um": float(spot_pitch_um),
        "n_spots_outside_image": int((~inside).sum()),
        "files": {"counts": counts, "positions": spots, "image": image},
    }
    var = pd.DataFrame({"gene_symbol": [str(c) for c in table.columns]}, index=genes)
    barcodes = np.asarray(table.index)[keep][inside]
    return _assemble(matrix[keep][inside], is_counts, barcodes, obs[inside], var, sample_id, patient_id, info)


# ---------------------------------------------------------------------------------------------
# Single-cell tables and pseudo-spots


def _find_metadata(paths: Sequence[Path]) -> Path | None:
    for path in paths:
        stem = _stem(path)
        for candidate in (path.with_name(stem + ".json"), path.parent.parent / "meta" / (stem + ".json")):
            if candidate.is_file():
                return candidate
    return None


def read_cell_table(
    h5ad: str | Path,
    image: str | Path,
    mpp: float | None = None,
    x_key: str = "x_pixel",
    y_key: str = "y_pixel",
    sample_id: str | None = None,
    patient_id: str | None = None,
    metadata: str | Path | None = None,
) -> ad.AnnData:
    """Single cells (Xenium-like) with centres in ``obs[x_key]``, ``obs[y_key]`` (image pixels).

    One obs per cell; :func:`aggregate_to_pseudospots` turns them into spots. Pixel size:
    ``mpp``, else a metadata JSON (``metadata``, else ``<stem>.json`` beside the h5ad or the
    image, or in a sibling ``meta/`` folder as in DeepSpot's examples) with one of
    ``pixel_size_um_estimated``, ``pixel_size_um_embedded``, ``pixel_size_um``, ``mpp``, else
    the image's resolution metadata; else an error saying how to pass it. ``spot_diameter_um``
    is the metadata's ``cell_diameter`` (DeepSpot gives it in image pixels) times the pixel
    size, else NaN.

    DeepSpot's example data keep the row in ``x_pixel`` (its ``crop_tile`` uses ``y_pixel``
    as the left edge): read them with ``x_key="y_pixel", y_key="x_pixel"``. Swapped axes
    usually put cells outside the image, and the error then says so.
    """
    h5ad, image = Path(h5ad), Path(image)
    _require_file(h5ad, "cell table (h5ad)")
    _require_file(image, "image")
    meta_path = Path(metadata) if metadata is not None else _find_metadata([h5ad, image])
    meta = _read_json(_require_file(meta_path, "metadata JSON")) if meta_path is not None else {}
    img = open_image(image)
    key, meta_mpp = _meta_value(meta, _PIXEL_SIZE_KEYS)
    if mpp is not None:
        mpp, mpp_source = _positive(mpp, "read_cell_table", "mpp"), "argument"
    elif meta_mpp is not None:
        mpp, mpp_source = meta_mpp, f"{meta_path}: {key}"
    elif img.mpp is not None:
        mpp, mpp_source = img.mpp, f"{image}: resolution metadata"
    else:
        where = f"none of {list(_PIXEL_SIZE_KEYS)} in {meta_path}" if meta_path else "no metadata JSON found"
        raise ValueError(
            f"pixel size unknown for {h5ad}: {where}, and {image} has no resolution metadata. Pass "
            "mpp=<microns per pixel of the image>, e.g. read_cell_table(..., mpp=0.5)"
        )
    adata = ad.read_h5ad(h5ad)
    for key_name in (x_key, y_key):
        if key_name not in adata.obs:
            raise ValueError(
                f"{h5ad}: obs has no {key_name!r} column; columns are {list(adata.obs.columns)} (set x_key / y_key)"
            )
    centres = (
        _coordinates(adata.obs[x_key], h5ad, f"obs[{x_key!r}]"),
        _coordinates(adata.obs[y_key], h5ad, f"obs[{y_key!r}]"),
        f"obs {x_key}/{y_key}",
    )
    _, cell_px = _meta_value(meta, ("cell_diameter",))
    files = {"counts": h5ad, "image": image}
    if meta_path is not None:
        files["metadata"] = meta_path
    info = {
        "source_format": "cell_table",
        "image_path": str(image),
        "image_scale": 1.0,
        "mpp": float(mpp),
        "mpp_source": mpp_source,
        "spot_diameter_um": float(cell_px * mpp) if cell_px else float("nan"),
        "files": files,
    }
    sample_id = sample_id or str(meta.get("sample") or _stem(h5ad))
    return _anndata_sample(adata, h5ad, img, 1.0, sample_id, patient_id, info, centres=centres)


def _grid_centres(
    x0: float, x1: float, y0: float, y1: float, spacing: float, grid: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Centres (x, y) and grid indices (row, col) of a grid centred in the box.

    ``hex`` rows are ``spacing * sqrt(3) / 2`` apart and odd rows are shifted by half a step;
    their ``col`` counts half steps, as Visium's ``array_col`` does.
    """
    if grid not in ("hex", "square"):
        raise ValueError(f"grid must be 'hex' or 'square'; got {grid!r}")
    dy = spacing * math.sqrt(3) / 2 if grid == "hex" else spacing
    n_rows = int(max(0.0, y1 - y0) // dy) + 1
    n_cols = int(max(0.0, x1 - x0) // spacing) + 1
    oy = y0 + (y1 - y0 - (n_rows - 1) * dy) / 2
    ox = x0 + (x1 - x0 - (n_cols - 1) * spacing) / 2
    rows, cols = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    rows, cols = rows.ravel(), cols.ravel()
    xs = ox + cols * spacing
    if grid == "hex":
        xs = xs + (rows % 2) * spacing / 2
        cols = 2 * cols + rows % 2
    ys = oy + rows * dy
    return xs, ys, rows, cols


def aggregate_to_pseudospots(
    adata: ad.AnnData, diameter_um: float, spacing_um: float | None = None, grid: str = "hex"
) -> ad.AnnData:
    """Sum the counts of cells into pseudo-spots on a grid over each sample's cells.

    A cell belongs to every disc of diameter ``diameter_um`` that contains its centre
    (``spacing_um`` defaults to the diameter: touching discs, no cell in two spots); cells in
    no disc are dropped and counted. Pseudo-spots with no cell are left out. Needs raw counts
    (sums of normalised values mean nothing). Extra ``obs``: ``n_cells``. Extra ``uns``
    entries: ``n_cells_total``, ``n_cells_dropped``, ``grid``; ``source_format`` gains
    ``+pseudospots``.
    """
    diameter_um = _positive(diameter_um, "aggregate_to_pseudospots", "diameter_um")
    spacing_um = (
        diameter_um if spacing_um is None else _positive(spacing_um, "aggregate_to_pseudospots", "spacing_um")
    )
    if "counts" not in adata.layers:
        raise ValueError("aggregate_to_pseudospots needs raw counts in layers['counts']; this data has none")
    samples = adata.uns.get("stmdit", {}).get("samples", {})
    parts = []
    for sample_id in adata.obs["sample_id"].astype(str).unique():
        if sample_id not in samples:
            raise ValueError(f"uns['stmdit']['samples'] has no entry for sample {sample_id!r}")
        info = dict(samples[sample_id])
        cells = adata[adata.obs["sample_id"].astype(str).to_numpy() == sample_id]
        mpp = float(info["mpp"])
        radius, spacing = diameter_um / 2 / mpp, spacing_um / mpp
        xy = cells.obs[["x_px", "y_px"]].to_numpy(dtype=np.float64)
        lo, hi = xy.min(axis=0) - spacing / 2, xy.max(axis=0) + spacing / 2
        xs, ys, rows, cols = _grid_centres(lo[0], hi[0], lo[1], hi[1], spacing, grid)
        members = cKDTree(xy).query_ball_point(np.column_stack([xs, ys]), r=radius)
        n_cells = np.array([len(m) for m in members])
        keep = np.flatnonzero(n_cells > 0)
        if len(keep) == 0:
            raise ValueError(
                f"sample {sample_id}: no cell lies in any {diameter_um} um pseudo-spot every {spacing_um} um"
            )
        assign = sp.csr_matrix(
            (
                np.ones(int(n_cells[keep].sum()), dtype=np.int64),
                np.concatenate([members[k] for k in keep]).astype(np.int64),
                np.concatenate([[0], np.cumsum(n_cells[keep])]),
            ),
            shape=(len(keep), cells.n_obs),
        )
        counts = sp.csr_matrix(cells.layers["counts"])
        summed = (assign @ counts).astype(counts.dtype)
        assigned = np.zeros(cells.n_obs, dtype=bool)
        assigned[assign.indices] = True
        obs = pd.DataFrame(
            {
                "x_px": xs[keep],
                "y_px": ys[keep],
                "array_row": rows[keep],
                "array_col": cols[keep],
                "n_cells": n_cells[keep],
            }
        )
        info.update(
            source_format=f"{info['source_format']}+pseudospots",
            spot_diameter_um=diameter_um,
            spot_pitch_um=spacing_um,
            grid=grid,
            n_cells_total=int(cells.n_obs),
            n_cells_dropped=int((~assigned).sum()),
        )
        patients = cells.obs["patient_id"].dropna().astype(str).unique() if "patient_id" in cells.obs else []
        barcodes = [f"r{r}c{c}" for r, c in zip(rows[keep], cols[keep], strict=True)]
        parts.append(
            _assemble(
                summed.tocsr(),
                True,
                barcodes,
                obs,
                adata.var.copy(),
                sample_id,
                patients[0] if len(patients) else None,
                info,
            )
        )
    return parts[0] if len(parts) == 1 else concat_samples(parts)


# ---------------------------------------------------------------------------------------------
# H&E-only slides


def read_he_slide(
    path: str | Path,
    spot_diameter_um: float = DEEPSPOT_TCGA_SPOT_UM,
    spacing_um: float = DEEPSPOT_TCGA_SPACING_UM,
    mpp: float | None = None,
    background_threshold: float = 200.0,
    min_tissue_fraction: float = 0.2,
    grid: str = "square",
    sample_id: str | None = None,
    patient_id: str | None = None,
) -> ad.AnnData:
    """An H&E slide without expression: one obs per pseudo-spot over detected tissue, no genes.

    The defaults follow DeepSpot's TCGA protocol (spots of 160 px every 290 px at 20x, i.e.
    80 um and 145 um at 0.5 um/px; tiles whose mean RGB is above 200 dropped as background).
    A grid of spot centres is laid over the tissue's bounding box, and a spot is kept when its
    square tile (side ``spot_diameter_um``) lies inside the slide, its mean RGB is at most
    ``background_threshold`` and at least ``min_tissue_fraction`` of it is tissue
    (:func:`~stmdit.data.images.tissue_mask` on a thumbnail fine enough for a tile to span 16
    px), so no spot lands on blank glass, whether white or grey.

    Pixel size: the slide's own, else ``mpp``, else an error. Extra ``obs``:
    ``tissue_fraction``, ``mean_rgb``. Extra ``uns`` entries: ``background_threshold``,
    ``min_tissue_fraction``, ``grid``.
    """
    path = Path(path)
    img = open_image(path, mpp=mpp)
    if img.mpp is None:
        raise ValueError(f"pixel size unknown for {path}: the file states none; pass mpp=<microns per pixel>")
    d_px = _positive(spot_diameter_um, "read_he_slide", "spot_diameter_um") / img.mpp
    s_px = _positive(spacing_um, "read_he_slide", "spacing_um") / img.mpp
    longest = max(img.width, img.height)
    thumb, scale = img.thumbnail(min(longest, max(512, min(4096, math.ceil(longest * 16 / d_px)))))
    mask = tissue_mask(thumb, tissue_threshold(thumb))
    if not mask.any():
        raise ValueError(
            f"{path}: no tissue detected (the tissue mask is empty); is it an H&E image of a section?"
        )
    ys_t, xs_t = np.nonzero(mask)
    half = d_px / 2
    x0, x1 = max(xs_t.min() / scale, half), min((xs_t.max() + 1) / scale, img.width - half)
    y0, y1 = max(ys_t.min() / scale, half), min((ys_t.max() + 1) / scale, img.height - half)
    if x1 < x0 or y1 < y0:
        raise ValueError(
            f"{path}: the slide ({img.width} x {img.height} px) is smaller than one {spot_diameter_um} um spot"
        )
    xs, ys, rows, cols = _grid_centres(x0, x1, y0, y1, s_px, grid)

    # Tile statistics from integral images of the thumbnail.
    def box_means(values: np.ndarray) -> np.ndarray:
        integral = np.pad(values.astype(np.float64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
        h, w = values.shape
        bx0 = np.clip(np.round((xs - half) * scale).astype(int), 0, w - 1)
        by0 = np.clip(np.round((ys - half) * scale).astype(int), 0, h - 1)
        bx1 = np.clip(np.maximum(np.round((xs + half) * scale).astype(int), bx0 + 1), 1, w)
        by1 = np.clip(np.maximum(np.round((ys + half) * scale).astype(int), by0 + 1), 1, h)
        total = integral[by1, bx1] - integral[by0, bx1] - integral[by1, bx0] + integral[by0, bx0]
        return total / ((bx1 - bx0) * (by1 - by0))

    fraction = box_means(mask)
    mean_rgb = box_means(thumb.mean(axis=-1))
    inside = (xs >= half) & (ys >= half) & (xs + half <= img.width) & (ys + half <= img.height)
    keep = inside & (fraction >= min_tissue_fraction) & (mean_rgb <= background_threshold)
    if not keep.any():
        raise ValueError(
            f"{path}: tissue was detected but no {spot_diameter_um} um tile has mean RGB <= {background_threshold} "
            f"and tissue fraction >= {min_tissue_fraction}"
        )
    obs = pd.DataFrame(
        {
            "x_px": xs[keep],
            "y_px": ys[keep],
            "array_row": rows[keep],
            "array_col": cols[keep],
            "tissue_fraction": fraction[keep],
            "mean_rgb": mean_rgb[keep],
        }
    )
    info = {
        "source_format": "he_slide",
        "image_path": str(path),
        "image_scale": 1.0,
        "mpp": float(img.mpp),
        "spot_diameter_um": float(spot_diameter_um),
        "spot_pitch_um": float(spacing_um),
        "background_threshold": float(background_threshold),
        "min_tissue_fraction": float(min_tissue_fraction),
        "grid": grid,
        "files": {"image": path},
    }
    barcodes = [f"r{r}c{c}" for r, c in zip(rows[keep], cols[keep], strict=True)]
    matrix = sp.csr_matrix((int(keep.sum()), 0), dtype=np.float32)
    return _assemble(
        matrix,
        False,
        barcodes,
        obs,
        pd.DataFrame(index=pd.Index([], dtype=str)),
        sample_id or path.stem,
        patient_id,
        info,
    )


# ---------------------------------------------------------------------------------------------
# Several samples


def concat_samples(adatas: Sequence[ad.AnnData], join: str = "inner") -> ad.AnnData:
    """Concatenate readers' outputs, merging ``uns['stmdit']['samples']``.

    ``join="inner"`` keeps the genes every sample measured; ``"outer"`` keeps all of them,
    and a gene a sample did not measure is 0 there, which reads as "not expressed", so use it
    only for panels known to agree. ``var`` columns are kept where the samples agree.
    ``layers['counts']`` is kept only when every sample has it (a warning says when it is
    dropped). Sample ids must be distinct.
    """
    if not adatas:
        raise ValueError("concat_samples needs at least one AnnData")
    samples: dict[str, dict] = {}
    for a in adatas:
        entries = a.uns.get("stmdit", {}).get("samples")
        if not entries:
            raise ValueError(
                "every AnnData must come from a stmdit reader (uns['stmdit']['samples'] is missing)"
            )
        for sample_id, info in entries.items():
            if sample_id in samples:
                raise ValueError(
                    f"sample id {sample_id!r} appears twice; pass distinct sample_id= to the readers"
                )
            samples[sample_id] = info
    with_counts = ["counts" in a.layers for a in adatas]
    if any(with_counts) and not all(with_counts):
        warnings.warn(
            "some samples have no raw counts, so layers['counts'] is dropped from the concatenation",
            stacklevel=2,
        )
    out = ad.concat(list(adatas), join=join, merge="same", fill_value=0)
    for col in ("sample_id", "patient_id"):
        out.obs[col] = pd.Categorical(out.obs[col].astype(object).where(out.obs[col].notna(), None))
    if out.obs_names.has_duplicates:
        raise ValueError(
            f"duplicated obs names after concatenation: {list(out.obs_names[out.obs_names.duplicated()][:5])}"
        )
    out.uns["stmdit"] = {"samples": samples}
    return out
