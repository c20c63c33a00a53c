"""The convention every reader's AnnData follows, and the checks and helpers they share.

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
``obsm["spatial"]`` and ``uns["spatial"][sample_id]``
    scanpy's convention, so ``sc.pl.spatial`` and squidpy work: ``obsm["spatial"]`` is ``(x_px, y_px)``; per sample, ``images`` holds ``hires`` (the H&E with its
    longer side at most 2,000 px, as Space Ranger's ``tissue_hires_image.png``) and ``lowres`` (600
    px), and ``scalefactors`` holds ``tissue_hires_scalef``, ``tissue_lowres_scalef`` (image pixels
    per full-resolution pixel) and ``spot_diameter_fullres`` (the spot diameter in full-resolution
    pixels: Space Ranger's own for Visium; for cells of unknown size the median distance to the
    nearest spot). Built by :func:`add_scanpy_spatial`; the sample id is the library id.
``uns["stmdit"]["samples"][sample_id]``
    A dict: ``source_format``; ``image_path`` (absolute path of the image the crops come
    from); ``image_scale`` (pixels of that image per full-resolution pixel: 1 for a
    full-resolution image, ``tissue_hires_scalef`` for a Space Ranger hires PNG), so a spot
    lies at ``(x_px * image_scale, y_px * image_scale)`` in the image file; ``mpp``
    (microns per full-resolution pixel); ``spot_diameter_um``; ``spot_pitch_um``
    (centre-to-centre grid distance, NaN when there is no grid); ``counts_available``;
    ``files`` (role -> path of every source file read); plus reader-specific entries
    documented with each reader.

Files
-----
In memory, paths are absolute. :func:`write_h5ad` writes them relative to the written file
(so a folder moved with its inputs, or a store beside its data, stays readable) and
:func:`read_h5ad` resolves them again.

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

import json
import math
import os
import warnings
import zlib
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata.utils import make_index_unique
from PIL import Image
from scipy.spatial import cKDTree

from stmdit.data.images import SlideImage, open_image
from stmdit.errors import StmditError
from stmdit.io import atomic_path

# Errors on data that cannot be read or used are reported without traceback by the CLI; the
# reading errors of the libraries underneath (h5py, gzip, pandas) are wrapped into this one
# type by :func:`reading`, with the file and what it was expected to hold.
READ_ERRORS = (
    OSError,
    EOFError,
    zlib.error,
    UnicodeDecodeError,
    pd.errors.ParserError,
    pd.errors.EmptyDataError,
)


class ReaderError(StmditError, ValueError):
    """An input file the readers cannot use; the message names the file, the field and what was expected."""


@contextmanager
def reading(path: Path, expected: str):
    """Turn a library's failure to read ``path`` into a :class:`ReaderError` saying what the file
    was expected to be. Missing files stay :class:`FileNotFoundError` (checked before, by name)."""
    try:
        yield
    except (FileNotFoundError, StmditError):  # missing, or already named and explained
        raise
    except READ_ERRORS as err:
        reason = (
            "the file is empty"
            if isinstance(err, pd.errors.EmptyDataError)
            else f"{type(err).__name__}: {err}"
        )
        raise ReaderError(
            f"{path}: cannot be read as {expected} ({reason}); is the file complete and of that kind?"
        ) from err


def open_checked_image(path: Path, **kwargs) -> SlideImage:
    """:func:`~stmdit.data.images.open_image` with a clear error for files that are not images."""
    with reading(Path(path), "an image (TIFF, JPEG, PNG or a whole-slide format)"):
        return open_image(path, **kwargs)


def read_anndata(path: Path, what: str = "an AnnData file (.h5ad)") -> ad.AnnData:
    """``anndata.read_h5ad`` with a clear error for files that are not (complete) h5ad files."""
    with reading(path, what):
        return ad.read_h5ad(path)


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

_GENERIC_STEMS = {"counts", "count", "matrix", "stdata", "expression", "data", "he", "image"}


# ---------------------------------------------------------------------------------------------
# Shared pieces


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def file_stem(path: Path) -> str:
    """The file name without its extension, and without ``.gz`` before it (``counts.tsv.gz``)."""
    name = path.name[:-3] if path.name.lower().endswith(".gz") else path.name
    return Path(name).stem


def default_sample_id(path: Path) -> str:
    """The file's stem, or its folder's name when the stem is generic (``counts.tsv.gz``)."""
    stem = file_stem(path)
    return path.parent.name if stem.lower() in _GENERIC_STEMS else stem


def check_counts(
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
        raise ReaderError(f"{source}: {field} is not numeric (dtype {matrix.dtype}); expected counts")
    data = matrix.data
    bad = ~np.isfinite(data) if np.issubdtype(data.dtype, np.floating) else np.zeros(data.shape, dtype=bool)
    if bad.any():
        r, c = _position_of(matrix, int(np.flatnonzero(bad)[0]))
        raise ReaderError(
            f"{source}: {field} has {data[bad][0]} for spot {rows[r]!r}, gene {genes[c]!r}; counts must be finite"
        )
    if (data < 0).any():
        k = int(np.flatnonzero(data < 0)[0])
        r, c = _position_of(matrix, k)
        raise ReaderError(
            f"{source}: {field} has a negative value {data[k]} for spot {rows[r]!r}, gene {genes[c]!r}; "
            "expected raw counts >= 0"
        )
    _check_not_empty(matrix, source, field, rows)
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


def _check_not_empty(matrix: sp.csr_matrix, source: str, field: str, rows: Sequence[str]) -> None:
    """All-zero input is an error (a wrong file or a failed export); spots without a single
    count are kept, since tiling and pseudo-labels still use them, with a warning naming them."""
    if matrix.shape[0] == 0 or matrix.shape[1] == 0:
        raise ReaderError(
            f"{source}: {field} has {matrix.shape[0]} spots x {matrix.shape[1]} genes; expected at least one of each"
        )
    totals = np.asarray(abs(matrix).sum(axis=1)).ravel()
    empty = np.flatnonzero(totals == 0)
    if len(empty) == len(totals):
        raise ReaderError(
            f"{source}: {field} is all zeros ({matrix.shape[0]} spots x {matrix.shape[1]} genes); expected counts. "
            "Is it the right file (e.g. the filtered matrix, not an empty export)?"
        )
    if len(empty):
        warnings.warn(
            f"{source}: {len(empty)} of {len(totals)} spots have no counts at all in {field} "
            f"(e.g. {[rows[i] for i in empty[:5]]}); kept",
            stacklevel=4,
        )


def _position_of(matrix: sp.csr_matrix, k: int) -> tuple[int, int]:
    row = int(np.searchsorted(matrix.indptr, k, side="right") - 1)
    return row, int(matrix.indices[k])


def unique_genes(names: Sequence[str], source: str, field: str) -> pd.Index:
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


def join_barcodes(
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
        raise ReaderError(f"{source_counts}: duplicated spot ids {dup[:5]}")
    if position_ids.has_duplicates:
        dup = sorted(set(position_ids[position_ids.duplicated()]))
        raise ReaderError(f"{source_positions}: duplicated spot ids {dup[:5]}")
    where = position_ids.get_indexer(count_ids)
    missing = count_ids[where < 0]
    if len(missing):
        raise ReaderError(
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


def positive(value, source: str, field: str) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ReaderError(f"{source}: {field} must be a number; got {value!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ReaderError(f"{source}: {field} must be a positive number; got {value}")
    return value


def coordinates(values, source: str, field: str) -> np.ndarray:
    out = pd.to_numeric(pd.Series(np.asarray(values).ravel()), errors="coerce").to_numpy(dtype=np.float64)
    if not np.isfinite(out).all():
        k = int(np.flatnonzero(~np.isfinite(out))[0])
        raise ReaderError(
            f"{source}: {field} is missing or not a number at row {k} ({np.asarray(values).ravel()[k]!r})"
        )
    return out


def inside_image(
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
        raise ReaderError(f"{msg}. {hint}")
    warnings.warn(msg + "; those spots are dropped", stacklevel=3)
    return inside


def assemble(
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
        raise ReaderError(
            f"sample {sample_id}: duplicated spot ids {list(obs.index[obs.index.duplicated()][:5])}"
        )
    adata = ad.AnnData(X=matrix, obs=obs, var=var)
    if is_counts:
        adata.layers["counts"] = matrix.copy()
    info = {
        "spot_pitch_um": float("nan"),
        **info,
        "counts_available": bool(is_counts),
        "image_path": str(Path(info["image_path"]).resolve()) if info["image_path"] else "",
        "files": {k: str(Path(v).resolve()) for k, v in info["files"].items()},
    }
    adata.uns["stmdit"] = {"samples": {sample_id: info}}
    return add_scanpy_spatial(adata)


def read_json(path: Path) -> dict:
    try:
        with open(path) as fh:
            data = json.load(fh)
    except json.JSONDecodeError as err:
        raise ReaderError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ReaderError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def meta_value(meta: dict, keys: Sequence[str]):
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


def patient_or_none(value) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip() == "":
        return None
    return str(value)


def grid_pitch_px(grid_xy: np.ndarray, pixel_xy: np.ndarray) -> tuple[float, int]:
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


def grid_centres(
    x0: float, x1: float, y0: float, y1: float, spacing: float, grid: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Centres (x, y) and grid indices (row, col) of a grid centred in the box.

    ``hex`` rows are ``spacing * sqrt(3) / 2`` apart and odd rows are shifted by half a step;
    their ``col`` counts half steps, as Visium's ``array_col`` does.
    """
    if grid not in ("hex", "square"):
        raise ReaderError(f"grid must be 'hex' or 'square'; got {grid!r}")
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
        raise ReaderError("concat_samples needs at least one AnnData")
    samples: dict[str, dict] = {}
    for a in adatas:
        entries = a.uns.get("stmdit", {}).get("samples")
        if not entries:
            raise ReaderError(
                "every AnnData must come from a stmdit reader (uns['stmdit']['samples'] is missing)"
            )
        for sample_id, info in entries.items():
            if sample_id in samples:
                raise ReaderError(
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
        raise ReaderError(
            f"duplicated obs names after concatenation: {list(out.obs_names[out.obs_names.duplicated()][:5])}"
        )
    out.uns["stmdit"] = {"samples": samples}
    out.uns["spatial"] = {k: v for a in adatas for k, v in a.uns.get("spatial", {}).items()}
    return add_scanpy_spatial(out)


# -- scanpy's spatial convention and portable h5ad files --------------------------------------

# Space Ranger's tissue_hires_image.png and tissue_lowres_image.png: longer side 2,000 and 600 px.
HIRES_PX = 2000
LOWRES_PX = 600


def _spot_diameter_fullres(info: dict, xy: np.ndarray) -> float:
    """Space Ranger's value when the source has one, else the spot's diameter, else (cells of
    unknown size) the median distance to the nearest spot."""
    if "spot_diameter_fullres" in info:
        return float(info["spot_diameter_fullres"])
    diameter = float(info.get("spot_diameter_um", float("nan"))) / float(info["mpp"])
    if math.isfinite(diameter) and diameter > 0:
        return diameter
    if len(xy) < 2:
        return 1.0
    distance, _ = cKDTree(xy).query(xy, k=2)
    return float(np.median(distance[:, 1]))


def scanpy_library(
    info: dict, xy: np.ndarray, hires: np.ndarray | None = None, hires_scalef: float = 1.0
) -> dict:
    """One ``uns['spatial']`` entry: ``images`` and ``scalefactors`` as scanpy reads them from Space
    Ranger. ``hires`` (with its scale factor, image pixels per full-resolution pixel) is the image
    to show; by default the sample's image (``info['image_path']``) reduced to at most
    :data:`HIRES_PX`. ``xy``: the sample's spot centres in full-resolution pixels."""
    if hires is None and info.get("image_path") and Path(info["image_path"]).is_file():
        with open_checked_image(Path(info["image_path"])) as image:
            hires, thumb_scale = image.thumbnail(HIRES_PX)
        hires_scalef = thumb_scale * float(info.get("image_scale", 1.0))
    scalefactors = {"spot_diameter_fullres": _spot_diameter_fullres(info, xy)}
    if hires is None:
        return {"images": {}, "scalefactors": scalefactors}
    h, w = hires.shape[:2]
    reduce = min(1.0, LOWRES_PX / max(h, w))
    size = (max(1, round(w * reduce)), max(1, round(h * reduce)))
    lowres = (
        np.asarray(Image.fromarray(hires).resize(size, Image.Resampling.LANCZOS)) if reduce < 1 else hires
    )
    scalefactors["tissue_hires_scalef"] = float(hires_scalef)
    scalefactors["tissue_lowres_scalef"] = float(hires_scalef) * size[0] / w
    return {
        "images": {"hires": np.ascontiguousarray(hires), "lowres": np.ascontiguousarray(lowres)},
        "scalefactors": scalefactors,
    }


def add_scanpy_spatial(adata: ad.AnnData) -> ad.AnnData:
    """Add scanpy's spatial convention (see the module docstring) to an AnnData in the readers'
    convention, in place: ``obsm['spatial']`` from ``obs`` ``x_px``/``y_px`` and an
    ``uns['spatial']`` entry for every sample that has none yet. Data without spot positions is
    left as it is."""
    if "x_px" not in adata.obs or "y_px" not in adata.obs or "sample_id" not in adata.obs:
        return adata
    xy = adata.obs[["x_px", "y_px"]].to_numpy(dtype=np.float64)
    adata.obsm["spatial"] = xy
    samples = adata.uns.get("stmdit", {}).get("samples", {})
    spatial = dict(adata.uns.get("spatial", {}))
    sample_ids = adata.obs["sample_id"].astype(str).to_numpy()
    for sample_id in pd.unique(sample_ids):
        if sample_id in spatial or sample_id not in samples:
            continue
        spatial[sample_id] = scanpy_library(samples[sample_id], xy[sample_ids == sample_id])
    adata.uns["spatial"] = spatial
    return adata


def derived_anndata(obs: pd.DataFrame, source: ad.AnnData | None, spot_column: str) -> ad.AnnData:
    """An AnnData of rows made from spots of ``source`` (``obs[spot_column]`` names the spot,
    e.g. generated tiles), each placed at its spot: ``sample_id``, ``x_px``, ``y_px`` and the
    samples' ``uns['stmdit']`` and ``uns['spatial']`` entries are carried over."""
    out = ad.AnnData(obs=obs)
    if source is None or not {"x_px", "y_px", "sample_id"} <= set(source.obs):
        return out
    spots = source.obs.loc[obs[spot_column].to_numpy()]
    for col in ("sample_id", "x_px", "y_px"):
        out.obs[col] = spots[col].to_numpy()
    used = set(spots["sample_id"].astype(str))
    samples = source.uns.get("stmdit", {}).get("samples", {})
    out.uns["stmdit"] = {"samples": {k: v for k, v in samples.items() if k in used}}
    out.uns["spatial"] = {k: v for k, v in source.uns.get("spatial", {}).items() if k in used}
    return add_scanpy_spatial(out)


def _map_paths(samples: dict, change) -> dict:
    out = {}
    for sample_id, info in samples.items():
        info = dict(info)
        if info.get("image_path"):
            info["image_path"] = change(str(info["image_path"]))
        if isinstance(info.get("files"), dict):
            info["files"] = {role: change(str(p)) for role, p in info["files"].items()}
        out[sample_id] = info
    return out


def write_h5ad(adata: ad.AnnData, path: str | os.PathLike) -> Path:
    """Write atomically with scanpy's spatial convention added and the samples' file paths
    relative to ``path``'s folder (the AnnData in memory keeps its absolute paths)."""
    path = Path(path)
    add_scanpy_spatial(adata)
    base = path.resolve().parent
    stmdit = adata.uns.get("stmdit")
    if isinstance(stmdit, dict) and "samples" in stmdit:
        relative = lambda p: os.path.relpath(os.path.abspath(p), base)  # noqa: E731
        adata.uns["stmdit"] = {**stmdit, "samples": _map_paths(stmdit["samples"], relative)}
    try:
        with atomic_path(path) as tmp:
            adata.write_h5ad(tmp)
    finally:
        if stmdit is not None:
            adata.uns["stmdit"] = stmdit
    return path


def read_h5ad(path: str | os.PathLike) -> ad.AnnData:
    """Read an h5ad written by :func:`write_h5ad`, with the samples' paths absolute again."""
    path = Path(path)
    adata = read_anndata(path)
    stmdit = adata.uns.get("stmdit")
    if isinstance(stmdit, dict) and "samples" in stmdit:
        base = path.resolve().parent
        absolute = lambda p: os.path.normpath(os.path.join(base, p))  # noqa: E731
        stmdit["samples"] = _map_paths(stmdit["samples"], absolute)
    return adata
