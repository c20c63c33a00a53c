"""Single-cell tables (Xenium-like) and their aggregation into pseudo-spots."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.spatial import cKDTree

from stmdit.data.readers.convention import (
    ReaderError,
    assemble,
    concat_samples,
    coordinates,
    file_stem,
    grid_centres,
    meta_value,
    open_checked_image,
    positive,
    read_anndata,
    read_json,
    require_file,
    scanpy_library,
)
from stmdit.data.readers.h5ad import anndata_sample

_PIXEL_SIZE_KEYS = (
    "pixel_size_um_estimated",
    "pixel_size_um_embedded",
    "pixel_size_um",
    "mpp",
    "microns_per_pixel",
)


def _find_metadata(paths: Sequence[Path]) -> Path | None:
    for path in paths:
        stem = file_stem(path)
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
    require_file(h5ad, "cell table (h5ad)")
    require_file(image, "image")
    meta_path = Path(metadata) if metadata is not None else _find_metadata([h5ad, image])
    meta = read_json(require_file(meta_path, "metadata JSON")) if meta_path is not None else {}
    img = open_checked_image(image)
    key, meta_mpp = meta_value(meta, _PIXEL_SIZE_KEYS)
    if mpp is not None:
        mpp, mpp_source = positive(mpp, "read_cell_table", "mpp"), "argument"
    elif meta_mpp is not None:
        mpp, mpp_source = meta_mpp, f"{meta_path}: {key}"
    elif img.mpp is not None:
        mpp, mpp_source = img.mpp, f"{image}: resolution metadata"
    else:
        where = f"none of {list(_PIXEL_SIZE_KEYS)} in {meta_path}" if meta_path else "no metadata JSON found"
        raise ReaderError(
            f"pixel size unknown for {h5ad}: {where}, and {image} has no resolution metadata. Pass "
            "mpp=<microns per pixel of the image>, e.g. read_cell_table(..., mpp=0.5)"
        )
    adata = read_anndata(h5ad, "a cell table (AnnData .h5ad)")
    for key_name in (x_key, y_key):
        if key_name not in adata.obs:
            raise ReaderError(
                f"{h5ad}: obs has no {key_name!r} column; columns are {list(adata.obs.columns)} (set x_key / y_key)"
            )
    centres = (
        coordinates(adata.obs[x_key], h5ad, f"obs[{x_key!r}]"),
        coordinates(adata.obs[y_key], h5ad, f"obs[{y_key!r}]"),
        f"obs {x_key}/{y_key}",
    )
    _, cell_px = meta_value(meta, ("cell_diameter",))
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
    sample_id = sample_id or str(meta.get("sample") or file_stem(h5ad))
    return anndata_sample(adata, h5ad, img, 1.0, sample_id, patient_id, info, centres=centres)


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
    diameter_um = positive(diameter_um, "aggregate_to_pseudospots", "diameter_um")
    spacing_um = (
        diameter_um if spacing_um is None else positive(spacing_um, "aggregate_to_pseudospots", "spacing_um")
    )
    if "counts" not in adata.layers:
        raise ReaderError("aggregate_to_pseudospots needs raw counts in layers['counts']; this data has none")
    samples = adata.uns.get("stmdit", {}).get("samples", {})
    parts = []
    for sample_id in adata.obs["sample_id"].astype(str).unique():
        if sample_id not in samples:
            raise ReaderError(f"uns['stmdit']['samples'] has no entry for sample {sample_id!r}")
        info = dict(samples[sample_id])
        cells = adata[adata.obs["sample_id"].astype(str).to_numpy() == sample_id]
        mpp = float(info["mpp"])
        radius, spacing = diameter_um / 2 / mpp, spacing_um / mpp
        xy = cells.obs[["x_px", "y_px"]].to_numpy(dtype=np.float64)
        lo, hi = xy.min(axis=0) - spacing / 2, xy.max(axis=0) + spacing / 2
        xs, ys, rows, cols = grid_centres(lo[0], hi[0], lo[1], hi[1], spacing, grid)
        members = cKDTree(xy).query_ball_point(np.column_stack([xs, ys]), r=radius)
        n_cells = np.array([len(m) for m in members])
        keep = np.flatnonzero(n_cells > 0)
        if len(keep) == 0:
            raise ReaderError(
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
        part = assemble(
            summed.tocsr(),
            True,
            barcodes,
            obs,
            adata.var.copy(),
            sample_id,
            patients[0] if len(patients) else None,
            info,
        )
        # The cells' image (it may live outside any file, e.g. in a SpatialData store) shows the spots too.
        cell_images = adata.uns.get("spatial", {}).get(sample_id, {})
        if "hires" in cell_images.get("images", {}):
            part.uns["spatial"][sample_id] = scanpy_library(
                info,
                obs[["x_px", "y_px"]].to_numpy(),
                cell_images["images"]["hires"],
                cell_images["scalefactors"]["tissue_hires_scalef"],
            )
        parts.append(part)
    return parts[0] if len(parts) == 1 else concat_samples(parts)
