"""H&E-only slides: pseudo-spots over detected tissue, no expression."""

from __future__ import annotations

import math
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from stmdit.data.images import tissue_mask, tissue_threshold
from stmdit.data.readers.convention import (
    DEEPSPOT_TCGA_SPACING_UM,
    DEEPSPOT_TCGA_SPOT_UM,
    ReaderError,
    assemble,
    grid_centres,
    open_checked_image,
    positive,
)


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
    img = open_checked_image(path, mpp=mpp)
    if img.mpp is None:
        raise ReaderError(
            f"pixel size unknown for {path}: the file states none; pass mpp=<microns per pixel>"
        )
    d_px = positive(spot_diameter_um, "read_he_slide", "spot_diameter_um") / img.mpp
    s_px = positive(spacing_um, "read_he_slide", "spacing_um") / img.mpp
    longest = max(img.width, img.height)
    thumb, scale = img.thumbnail(min(longest, max(512, min(4096, math.ceil(longest * 16 / d_px)))))
    mask = tissue_mask(thumb, tissue_threshold(thumb))
    if not mask.any():
        raise ReaderError(
            f"{path}: no tissue detected (the tissue mask is empty); is it an H&E image of a section?"
        )
    ys_t, xs_t = np.nonzero(mask)
    half = d_px / 2
    x0, x1 = max(xs_t.min() / scale, half), min((xs_t.max() + 1) / scale, img.width - half)
    y0, y1 = max(ys_t.min() / scale, half), min((ys_t.max() + 1) / scale, img.height - half)
    if x1 < x0 or y1 < y0:
        raise ReaderError(
            f"{path}: the slide ({img.width} x {img.height} px) is smaller than one {spot_diameter_um} um spot"
        )
    xs, ys, rows, cols = grid_centres(x0, x1, y0, y1, s_px, grid)

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
        raise ReaderError(
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
    return assemble(
        matrix,
        False,
        barcodes,
        obs,
        pd.DataFrame(index=pd.Index([], dtype=str)),
        sample_id or path.stem,
        patient_id,
        info,
    )
