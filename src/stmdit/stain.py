"""Colour deconvolution of H&E (Ruifrok & Johnston, 2001).

RGB -> optical density (Beer-Lambert) -> stain concentrations by the inverse of the stain
matrix. The third stain is DAB-like brown, which also captures melanin pigment.

Also the project's one Otsu threshold, and the nuclei counter built on the haematoxylin
channel: Otsu's threshold, then scikit-image's watershed to separate touching nuclei.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from skimage.filters import threshold_otsu
from skimage.morphology import h_maxima
from skimage.segmentation import watershed

# Optical-density vectors (R, G, B) from Ruifrok & Johnston, as in scikit-image's rgb2hed.
HAEMATOXYLIN = (0.650, 0.704, 0.286)
EOSIN = (0.072, 0.990, 0.105)
DAB = (0.268, 0.570, 0.776)


def stain_matrix() -> torch.Tensor:
    m = torch.tensor([HAEMATOXYLIN, EOSIN, DAB], dtype=torch.float32)
    return m / m.norm(dim=1, keepdim=True)


def optical_density(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> optical density, 0 for white light."""
    return -torch.log(images.clamp(1.0 / 255.0, 1.0))


def deconvolve(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> (B, 3, H, W) haematoxylin, eosin and brown concentrations."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (batch, 3, height, width); got {tuple(images.shape)}")
    od = optical_density(images.float())
    inverse = torch.linalg.inv(stain_matrix()).to(od.device)
    return torch.einsum("bchw,cs->bshw", od, inverse)


# -- nuclei ---------------------------------------------------------------------------------

# When a density of nuclei means something. A nucleus (about 5-10 um across) must span at
# least MIN_NUCLEUS_PX pixels for two touching nuclei to be told apart, which bounds the pixel
# size at MAX_NUCLEI_UM_PER_PX; and a tile must be at least MIN_NUCLEI_TILE_PX pixels wide to
# hold more than a handful of nuclei. Below either, a count per area is noise (16 px tiles gave
# "0" or "39 +- 55 per 100 x 100 px"), so callers report it as unavailable instead.
MIN_NUCLEUS_PX = 4.0
# Objects narrower than this are debris or noise, not nuclei (used when the pixel size is known).
MIN_NUCLEUS_UM = 4.0
MAX_NUCLEI_UM_PER_PX = 2.0
MIN_NUCLEI_TILE_PX = 32
# Haematoxylin (optical density along its stain vector) below which a pixel is never nuclear
# whatever Otsu says: glass is about 0.02, pink cytoplasm 0.03, a pale nucleus 0.7. Without it a
# batch with no nuclei would have its background noise split in two and counted.
MIN_NUCLEAR_HAEMATOXYLIN = 0.25


def otsu_threshold(
    values: np.ndarray, bins: int = 256, value_range: tuple[float, float] | None = None
) -> float:
    """Otsu's threshold of ``values`` (scikit-image's, on a ``bins``-bin histogram over
    ``value_range``, default the values' own range); ``inf`` when all values are equal."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if value_range is None:
        if values.size == 0 or values.min() == values.max():
            return float("inf")
        value_range = (float(values.min()), float(values.max()))
    hist, edges = np.histogram(values, bins=bins, range=value_range)
    if np.count_nonzero(hist) < 2:
        return float("inf")
    return float(threshold_otsu(hist=(hist, (edges[:-1] + edges[1:]) / 2)))


def haematoxylin(images: np.ndarray) -> np.ndarray:
    """(N, H, W) haematoxylin concentration of tiles (N, H, W, 3), float in [0, 1] or uint8."""
    images = np.asarray(images)
    x = images.astype(np.float32) / 255.0 if images.dtype == np.uint8 else images.astype(np.float32)
    return (
        deconvolve(torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2))[:, 0].clamp_min(0).numpy()
    )


def nuclei_unavailable(tile_px: int, um_per_px: float | None = None) -> str | None:
    """Why nuclei per area cannot be measured on tiles ``tile_px`` wide, or None when they can."""
    if tile_px < MIN_NUCLEI_TILE_PX:
        return (
            f"tiles of {tile_px} px are too small for a count of nuclei "
            f"(at least {MIN_NUCLEI_TILE_PX} px wide are needed)"
        )
    if um_per_px is not None and um_per_px > MAX_NUCLEI_UM_PER_PX:
        return (
            f"at {um_per_px:.2g} um per pixel a nucleus spans too few pixels "
            f"to tell touching nuclei apart (at most {MAX_NUCLEI_UM_PER_PX:g} um per pixel is needed)"
        )
    return None


def segment_nuclei(h: np.ndarray, threshold: float, min_diameter_px: float = MIN_NUCLEUS_PX) -> np.ndarray:
    """Label image of the nuclei in one haematoxylin map (H, W).

    Pixels above ``threshold`` are nuclear; objects smaller than half a disc of
    ``min_diameter_px`` are dropped; touching nuclei are separated by a watershed on the
    distance to the background, from one marker per distance maximum (h-maxima of height
    0.5 px, so that a neck narrower than either nucleus splits them and a round nucleus gives
    one marker however its pixels fall; larger for larger nuclei, whose outlines are rougher).
    """
    mask = h > threshold
    min_area = max(2, int(np.pi * (min_diameter_px / 2) ** 2 / 2))
    objects, _ = ndimage.label(mask)
    mask &= (np.bincount(objects.ravel()) >= min_area)[objects]
    if not mask.any():
        return np.zeros(h.shape, dtype=np.int32)
    distance = ndimage.distance_transform_edt(mask)
    markers = ndimage.label(h_maxima(distance, max(0.5, min_diameter_px / 8)))[0]
    return watershed(-distance, markers, mask=mask).astype(np.int32)


def count_nuclei(
    images: np.ndarray, um_per_px: float | None = None, threshold: float | None = None
) -> np.ndarray:
    """Nuclei per tile (N,) of tiles (N, H, W, 3), by :func:`segment_nuclei` on the
    haematoxylin channel; nuclei are at least :data:`MIN_NUCLEUS_UM` wide when the pixel size
    ``um_per_px`` is known, else :data:`MIN_NUCLEUS_PX` pixels. ``threshold`` defaults to Otsu's over the whole batch (never below
    :data:`MIN_NUCLEAR_HAEMATOXYLIN`), so that tiles compared with each other (a control and
    its perturbation) are cut at the same density."""
    h = haematoxylin(images)
    if threshold is None:
        threshold = max(otsu_threshold(h), MIN_NUCLEAR_HAEMATOXYLIN)
    min_diameter_px = MIN_NUCLEUS_UM / um_per_px if um_per_px else MIN_NUCLEUS_PX
    return np.array([int(segment_nuclei(t, threshold, min_diameter_px).max()) for t in h])
