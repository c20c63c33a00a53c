"""An AnnData with scanpy-style spot centres (``obsm['spatial']``) and a separate image."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from stmdit.data.images import SlideImage
from stmdit.data.readers.convention import (
    SPACERANGER_FULLRES_SPOT_UM,
    VISIUM_PITCH_UM,
    VISIUM_SPOT_UM,
    ReaderError,
    assemble,
    check_counts,
    coordinates,
    file_stem,
    inside_image,
    open_checked_image,
    positive,
    read_anndata,
    require_file,
    unique_genes,
)


def _h5ad_expression(adata: ad.AnnData) -> tuple[object, str]:
    if "counts" in adata.layers:
        return adata.layers["counts"], "layers['counts']"
    return adata.X, "X"


def h5ad_centres(adata: ad.AnnData, path: Path) -> tuple[np.ndarray, np.ndarray, str]:
    obs = adata.obs
    if "pxl_col_in_fullres" in obs and "pxl_row_in_fullres" in obs:
        fields = "obs pxl_col_in_fullres/pxl_row_in_fullres"
        return (
            coordinates(obs["pxl_col_in_fullres"], path, "obs['pxl_col_in_fullres']"),
            coordinates(obs["pxl_row_in_fullres"], path, "obs['pxl_row_in_fullres']"),
            fields,
        )
    if "spatial" in adata.obsm:
        xy = np.asarray(adata.obsm["spatial"])
        if xy.ndim != 2 or xy.shape[1] < 2:
            raise ReaderError(f"{path}: obsm['spatial'] has shape {xy.shape}; expected (n_spots, 2)")
        return (
            coordinates(xy[:, 0], path, "obsm['spatial'][:, 0]"),
            coordinates(xy[:, 1], path, "obsm['spatial'][:, 1]"),
            "obsm['spatial']",
        )
    raise ReaderError(
        f"{path}: no spot coordinates: expected obs 'pxl_col_in_fullres' and 'pxl_row_in_fullres', or obsm['spatial']"
    )


def _scanpy_scalefactors(adata: ad.AnnData, library_id: str | None, path: Path) -> tuple[str | None, dict]:
    spatial = adata.uns.get("spatial", {})
    if not isinstance(spatial, dict) or not spatial:
        return None, {}
    if library_id is None:
        if len(spatial) > 1:
            raise ReaderError(f"{path}: uns['spatial'] has libraries {sorted(spatial)}; pass library_id=")
        library_id = next(iter(spatial))
    if library_id not in spatial:
        raise ReaderError(f"{path}: uns['spatial'] has no library {library_id!r}; it has {sorted(spatial)}")
    return library_id, dict(spatial[library_id].get("scalefactors", {}))


def anndata_sample(
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
    ``(x, y, field names)``, default :func:`h5ad_centres`) and grid columns."""
    expression, field = _h5ad_expression(adata)
    genes = unique_genes(adata.var_names, path, "var_names")
    barcodes = [str(b) for b in adata.obs_names]
    matrix, is_counts = check_counts(expression, str(path), field, barcodes, list(genes))
    x, y, fields = centres if centres is not None else h5ad_centres(adata, path)
    obs = pd.DataFrame({"x_px": x, "y_px": y})
    for col in ("array_row", "array_col", "in_tissue"):
        if col in adata.obs:
            obs[col] = coordinates(adata.obs[col], path, f"obs[{col!r}]").astype(np.int64)
    for key, values in (extra_obs or {}).items():
        obs[key] = values
    var = adata.var.copy()
    var.index = genes
    if "gene_symbol" not in var:
        var["gene_symbol"] = [str(g) for g in adata.var_names]
    inside = inside_image(x, y, image, image_scale, path, fields)
    info = {**info, "n_spots_outside_image": int((~inside).sum())}
    return assemble(
        matrix[inside], is_counts, np.asarray(barcodes)[inside], obs[inside], var, sample_id, patient_id, info
    )


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
    h5ad = require_file(Path(h5ad), "AnnData file")
    image = require_file(Path(image), "image")
    image_scale = positive(image_scale, "read_spatial_h5ad", "image_scale")
    adata = read_anndata(h5ad)
    library, scalefactors = _scanpy_scalefactors(adata, library_id, h5ad)
    img = open_checked_image(image)
    mpp_source = "argument"
    if mpp is None and "spot_diameter_fullres" in scalefactors:
        fullres = positive(
            scalefactors["spot_diameter_fullres"], h5ad, f"uns['spatial'][{library!r}] spot_diameter_fullres"
        )
        mpp, mpp_source = SPACERANGER_FULLRES_SPOT_UM / fullres, f"{h5ad}: spot_diameter_fullres"
    if mpp is None and img.mpp is not None:
        # One full-resolution pixel spans image_scale pixels of the image file.
        mpp, mpp_source = img.mpp * image_scale, f"{image}: resolution metadata"
    if mpp is None:
        raise ReaderError(
            f"pixel size unknown for {h5ad}: no spot_diameter_fullres in uns['spatial'] and no resolution metadata "
            f"in {image}; pass mpp=<microns per full-resolution pixel>"
        )
    info = {
        "source_format": "spatial_h5ad",
        "image_path": str(image),
        "image_scale": image_scale,
        "mpp": positive(mpp, "read_spatial_h5ad", "mpp"),
        "mpp_source": mpp_source,
        "spot_diameter_um": float(spot_diameter_um),
        "spot_pitch_um": positive(spot_pitch_um, "read_spatial_h5ad", "spot_pitch_um"),
        "files": {"counts": h5ad, "image": image},
    }
    sample_id = sample_id or library or file_stem(h5ad)
    return anndata_sample(adata, h5ad, img, image_scale, sample_id, patient_id, info)
