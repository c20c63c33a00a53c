"""Legacy ST (her2st, STNet): a counts table, a spot table and a full-resolution image."""

from __future__ import annotations

import gzip
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from stmdit.data.readers.convention import (
    LEGACY_ST_PITCH_UM,
    LEGACY_ST_SPOT_UM,
    ReaderError,
    assemble,
    check_counts,
    coordinates,
    default_sample_id,
    grid_pitch_px,
    inside_image,
    join_barcodes,
    open_checked_image,
    positive,
    reading,
    require_file,
    unique_genes,
)


def _separator(path: Path) -> str:
    return "," if ".csv" in path.name.lower() else "\t"


def _read_counts_table(path: Path) -> pd.DataFrame:
    sep = _separator(path)
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with reading(path, "a counts table (spots x genes)"), opener(path, "rt") as fh:
        header = fh.readline().rstrip("\r\n").split(sep)
    with reading(path, "a counts table (spots x genes)"):
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
        raise ReaderError(f"{path}: gene column {col!r} is not numeric{example}; expected counts")
    return table


def _looks_like_st_id(values) -> float:
    ids = pd.Series([str(v) for v in values])
    return float(ids.str.fullmatch(r"\d+(\.\d+)?x\d+(\.\d+)?").mean()) if len(ids) else 0.0


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
    require_file(counts, "ST counts table")
    require_file(spots, "ST spot table")
    require_file(image, "ST image")
    sample_id = sample_id or default_sample_id(counts)
    table = _read_counts_table(counts)
    if _looks_like_st_id(table.index) < 0.5 and _looks_like_st_id(table.columns) >= 0.5:
        table = table.T
    if _looks_like_st_id(table.index) < 0.5:
        raise ReaderError(
            f"{counts}: spot ids (first column) should look like '10x21' (XxY); got {list(table.index[:3])}"
        )
    table.index = [str(i) for i in table.index]

    with reading(spots, "a spot table (x, y, pixel_x, pixel_y)"):
        spot_table = pd.read_csv(spots, sep=_separator(spots))
    needed = ["x", "y", "pixel_x", "pixel_y"]
    missing = [c for c in needed if c not in spot_table.columns]
    if missing:
        raise ReaderError(f"{spots}: missing columns {missing}; found {list(spot_table.columns)}")
    gx = coordinates(spot_table["x"], spots, "x")
    gy = coordinates(spot_table["y"], spots, "y")
    px = coordinates(spot_table["pixel_x"], spots, "pixel_x")
    py = coordinates(spot_table["pixel_y"], spots, "pixel_y")
    ids = pd.Index(
        [
            f"{int(a)}x{int(b)}" if float(a).is_integer() and float(b).is_integer() else f"{a}x{b}"
            for a, b in zip(gx, gy, strict=True)
        ]
    )
    where = join_barcodes(table.index, ids, counts, spots, warn_extra=True)

    keep = np.ones(len(table), dtype=bool)
    if "selected" in spot_table.columns:
        selected = coordinates(spot_table["selected"], spots, "selected")[where]
        keep = selected != 0
        if not keep.all():
            warnings.warn(
                f"{spots}: {int((~keep).sum())} spots with counts have selected == 0 (not under tissue); dropped",
                stacklevel=2,
            )
    genes = unique_genes(table.columns, counts, "gene names (header)")
    matrix, is_counts = check_counts(table.to_numpy(), str(counts), "counts", list(table.index), list(genes))

    where = where[keep]
    grid_xy = np.column_stack([gx[where], gy[where]])
    pixel_xy = np.column_stack([px[where], py[where]])
    pitch_px, n_pairs = grid_pitch_px(grid_xy, pixel_xy)
    mpp = positive(spot_pitch_um, "read_legacy_st", "spot_pitch_um") / pitch_px
    img = open_checked_image(image)
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
    inside = inside_image(pixel_xy[:, 0], pixel_xy[:, 1], img, 1.0, spots, "pixel_x/pixel_y")
    info = {
        "source_format": "legacy_st",
        "image_path": str(image),
        "image_scale": 1.0,
        "mpp": float(mpp),
        "mpp_grid_pairs": int(n_pairs),
        "spot_diameter_um": positive(spot_diameter_um, "read_legacy_st", "spot_diameter_um"),
        "spot_pitch_um": float(spot_pitch_um),
        "n_spots_outside_image": int((~inside).sum()),
        "files": {"counts": counts, "positions": spots, "image": image},
    }
    var = pd.DataFrame({"gene_symbol": [str(c) for c in table.columns]}, index=genes)
    barcodes = np.asarray(table.index)[keep][inside]
    return assemble(matrix[keep][inside], is_counts, barcodes, obs[inside], var, sample_id, patient_id, info)
