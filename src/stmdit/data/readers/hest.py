"""HEST-1k samples: ``st/<id>.h5ad`` with its whole-slide image, patches and metadata."""

from __future__ import annotations

import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from stmdit.data.readers.convention import (
    HEST_PATCH_MPP,
    LEGACY_ST_SPOT_UM,
    VISIUM_SPOT_UM,
    ReaderError,
    file_stem,
    meta_value,
    open_checked_image,
    patient_or_none,
    read_anndata,
    read_json,
    reading,
    require_file,
)
from stmdit.data.readers.h5ad import anndata_sample, h5ad_centres


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
    st_h5ad = require_file(Path(st_h5ad), "HEST expression file (st/<id>.h5ad)")
    stem = file_stem(st_h5ad)
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
    require_file(wsi, "HEST whole-slide image")
    if patches_h5 is None and (root / "patches" / f"{stem}.h5").is_file():
        patches_h5 = root / "patches" / f"{stem}.h5"
    if metadata is None and (root / "metadata" / f"{stem}.json").is_file():
        metadata = root / "metadata" / f"{stem}.json"
    meta = read_json(require_file(Path(metadata), "HEST metadata")) if metadata is not None else {}
    sample_id = sample_id or str(meta.get("id") or stem)

    img = open_checked_image(wsi)
    key, mpp = meta_value(meta, ("pixel_size_um_estimated", "pixel_size_um_embedded"))
    mpp_source = f"{metadata}: {key}" if key else None
    if mpp is None and img.mpp is not None:
        mpp, mpp_source = img.mpp, f"{wsi}: resolution tags"
    if mpp is None:
        raise ReaderError(
            f"pixel size of {wsi} unknown: no pixel_size_um_estimated / pixel_size_um_embedded in "
            f"{metadata or 'the metadata (none given)'} and no resolution tags in the WSI; pass metadata=<HEST json>"
        )
    adata = read_anndata(st_h5ad, "a HEST expression file (AnnData .h5ad)")
    technology = str(meta.get("st_technology", ""))
    if spot_diameter_um is None:
        _, spot_diameter_um = meta_value(meta, ("spot_diameter",))
    if spot_diameter_um is None:
        spot_diameter_um = {"Visium": VISIUM_SPOT_UM, "Spatial Transcriptomics": LEGACY_ST_SPOT_UM}.get(
            technology
        )
    if spot_diameter_um is None:
        raise ReaderError(
            f"spot diameter of {st_h5ad} unknown (no 'spot_diameter' in the metadata); pass spot_diameter_um="
        )
    _, pitch = meta_value(meta, ("inter_spot_dist",))

    extra_obs = {}
    files = {"counts": st_h5ad, "image": wsi}
    if metadata is not None:
        files["metadata"] = Path(metadata)
    if patches_h5 is not None:
        patches_h5 = require_file(Path(patches_h5), "HEST patches file")
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
    return anndata_sample(
        adata, st_h5ad, img, 1.0, sample_id, patient_or_none(meta.get("patient")), info, extra_obs
    )


def _hest_patch_rows(adata: ad.AnnData, st_h5ad: Path, patches_h5: Path, mpp: float) -> np.ndarray:
    import h5py

    with reading(patches_h5, "a HEST patches file (HDF5)"), h5py.File(patches_h5, "r") as f:
        for key in ("barcode", "coords", "img"):
            if key not in f:
                raise ReaderError(
                    f"{patches_h5}: missing dataset {key!r}; expected HEST's img / coords / barcode"
                )
        raw = np.asarray(f["barcode"][:]).reshape(-1)
        coords = np.asarray(f["coords"][:], dtype=np.float64)
        patch_px = int(f["img"].shape[1])
    barcodes = pd.Index([b.decode() if isinstance(b, bytes) else str(b) for b in raw])
    rows = barcodes.get_indexer(pd.Index([str(b) for b in adata.obs_names]))
    unknown = barcodes[~barcodes.isin(adata.obs_names)]
    if len(unknown):
        raise ReaderError(
            f"{patches_h5}: {len(unknown)} patch barcodes are not spots of {st_h5ad} (e.g. {list(unknown[:5])})"
        )
    has = rows >= 0
    if has.any():
        x, y, _ = h5ad_centres(adata, st_h5ad)
        half = (patch_px * HEST_PATCH_MPP / mpp) // 2
        offset = np.hypot(coords[rows[has], 0] + half - x[has], coords[rows[has], 1] + half - y[has])
        if np.median(offset) > max(2.0, 0.05 * 2 * half):
            warnings.warn(
                f"{patches_h5}: patch positions (coords) are {np.median(offset):.1f} px from the spot centres of "
                f"{st_h5ad} at {mpp:.4g} um/px; the pixel size or the coordinates are probably wrong",
                stacklevel=3,
            )
    return rows
