"""An offline tissue simulator: paired H&E-like tiles and spot expression from one hidden state.

Every spot has a hidden composition over :data:`CELL_TYPES`. The same composition drives

* the spot's gene-expression counts (:func:`simulate_counts`): a mixture of per-type mean
  profiles over a panel of real human genes, scaled by a library size and sampled from a
  negative binomial, and
* the spot's image tile (:func:`render_tiles`): the tile area is split among the cell types
  in proportion to the composition and each region is drawn with that type's morphology,
  then coloured by Beer-Lambert mixing of haematoxylin, eosin and melanin optical densities.

Because the composition is known, the simulator is a controlled test of whether a model that
generates images from expression draws the tissue the expression implies. Sections of spots
on a grid, with spatially smooth compositions, come from :func:`simulate_tissue`.

The tile always shows the same physical width of tissue (:data:`_TILE_UM`) whatever its pixel
size, so a larger ``tile_size`` is a higher magnification of the same kind of tissue.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import anndata as ad
import numpy as np
import pandas as pd
from scipy import ndimage

from stmdit import stain
from stmdit.genesets import MARKER_GENES

__all__ = [
    "CELL_TYPES",
    "EOSIN",
    "GENE_PANEL",
    "HAEMATOXYLIN",
    "MELANIN",
    "SimulatedTissue",
    "render_tiles",
    "simulate_counts",
    "simulate_tissue",
]

CELL_TYPES: tuple[str, ...] = ("tumour", "lymphocyte", "stroma", "melanocytic", "background")
_TUMOUR, _LYMPHOCYTE, _STROMA, _MELANOCYTIC, _BACKGROUND = range(len(CELL_TYPES))


def _unit(vector: tuple[float, ...]) -> np.ndarray:
    out = np.asarray(vector, dtype=np.float64)
    out = out / np.linalg.norm(out)
    out.setflags(write=False)
    return out


# Optical density per unit stain concentration (Ruifrok & Johnston 2001, as in
# skimage.color.hed_from_rgb; melanin is brown like DAB). An RGB pixel is
# 255 * exp(-(c_H * HAEMATOXYLIN + c_E * EOSIN + c_M * MELANIN)).
HAEMATOXYLIN: np.ndarray = _unit(stain.HAEMATOXYLIN)
EOSIN: np.ndarray = _unit(stain.EOSIN)
MELANIN: np.ndarray = _unit(stain.DAB)

# ---------------------------------------------------------------------------------------------
# Gene panel
# ---------------------------------------------------------------------------------------------

# The marker programmes (stmdit.genesets) are the simulated cell types' expression programmes.

_HOUSEKEEPING = [
    "ACTB", "GAPDH", "B2M", "TBP", "HPRT1", "PPIA", "UBC", "YWHAZ", "SDHA", "TFRC", "GUSB",
    "HMBS", "PGK1", "EEF1A1", "TUBB", "POLR2A",
]  # fmt: skip

_RIBOSOMAL = [
    *(f"RPL{i}" for i in (
        "3", "4", "5", "6", "7", "7A", "8", "9", "10", "10A", "11", "12", "13", "13A", "14", "15",
        "17", "18", "18A", "19", "21", "22", "23", "23A", "24", "26", "27", "27A", "28", "29",
        "30", "31", "32", "34", "35", "35A", "36", "37", "37A", "38", "39", "41", "P0", "P1", "P2",
    )),
    *(f"RPS{i}" for i in (
        "2", "3", "3A", "4X", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "15A",
        "16", "17", "18", "19", "20", "21", "23", "24", "25", "26", "27", "27A", "28", "29",
    )),
]  # fmt: skip

# Common genes of other compartments (myeloid, endothelium, epidermis, plasma cells, immune
# checkpoints, immediate-early and stress genes, ...): diffuse, type-dependent signal only.
_OTHER = [
    "TPT1", "FTL", "FTH1", "MALAT1", "NEAT1", "TMSB4X", "TMSB10", "MYL6", "HSPA1A", "HSPA8",
    "HSP90AA1", "HSP90AB1", "CALM2", "UBB", "JUN", "FOS", "FOSB", "EGR1", "IER2", "DUSP1",
    "KLF6", "ZFP36", "SOD2", "CST3", "LGALS1", "S100A6", "S100A10", "S100A11", "ANXA1", "ANXA2",
    "IFITM3", "IFITM2", "ISG15", "STAT1", "IRF1", "HLA-A", "HLA-B", "HLA-C", "HLA-DRA",
    "HLA-DRB1", "HLA-DPA1", "HLA-DPB1", "CD74", "APOE", "C1QA", "C1QB", "C1QC", "CD68", "CD14",
    "LYZ", "CD163", "AIF1", "TYROBP", "FCER1G", "PECAM1", "VWF", "CDH5", "CLDN5", "KDR", "ENG",
    "EMCN", "PLVAP", "RGS5", "MCAM", "NOTCH3", "CALD1", "MYH11", "DES", "CNN1", "KRT5", "KRT14",
    "KRT17", "KRT1", "KRT10", "LOR", "FLG", "IVL", "SFN", "PERP", "DSP", "JUP", "ELF3", "CXCL8",
    "IL1B", "TNF", "IL6", "CXCL12", "CCL2", "CCL19", "CCL21", "MMP9", "TIMP1", "TIMP3",
    "SERPINE1", "SERPINF1", "IGFBP7", "IGFBP5", "IGFBP3", "CCN2", "CCN1", "MGP", "CFD", "APOC1",
    "FABP4", "ADIPOQ", "PLIN1", "SPP1", "CD44", "ITGB1", "TGFB1", "TGFBI", "XBP1", "JCHAIN",
    "MZB1", "IGKC", "IGHG1", "IGHM", "CD38", "SDC1", "FOXP3", "CTLA4", "PDCD1", "CD274", "LAG3",
    "TIGIT", "HAVCR2", "IDO1", "CXCL9", "CXCL10", "CXCL13", "GNLY", "PRF1", "KLRD1", "KLRB1",
]  # fmt: skip

GENE_PANEL: list[str] = [
    *(gene for cell_type in CELL_TYPES for gene in MARKER_GENES[cell_type]),
    *_HOUSEKEEPING,
    *_RIBOSOMAL,
    *_OTHER,
]

# The expression model (profiles, dispersions) is a fixed property of the simulated biology,
# not of a dataset: every seed shares it, so a model fitted on one seed transfers to another.
_EXPRESSION_SEED = 20_240_611


@lru_cache(maxsize=1)
def _expression_model() -> tuple[np.ndarray, np.ndarray]:
    """Per-type mean profiles (5, n_genes), each summing to 1, and per-gene NB dispersions."""
    rng = np.random.default_rng(_EXPRESSION_SEED)
    n_genes = len(GENE_PANEL)
    index = {gene: i for i, gene in enumerate(GENE_PANEL)}
    # Gene-wise baseline log level: ribosomal and housekeeping genes are abundant everywhere.
    base = rng.normal(-0.5, 1.0, n_genes)
    for group in (_HOUSEKEEPING, _RIBOSOMAL):
        rows = [index[gene] for gene in group]
        base[rows] = rng.normal(2.0, 0.5, len(rows))
    # Type-specific log-normal deviations give every gene some diffuse signal.
    log_profiles = base[None, :] + rng.normal(0.0, 0.5, (len(CELL_TYPES), n_genes))
    for k, cell_type in enumerate(CELL_TYPES):
        rows = [index[gene] for gene in MARKER_GENES[cell_type]]
        marker_base = rng.normal(0.0, 0.7, len(rows))
        # Markers are ~20x up in their own type and depleted elsewhere; the necrosis
        # programme is weaker (~7x) and less depleted, as stress genes are expressed broadly.
        up, down = (3.0, -1.0) if k != _BACKGROUND else (2.0, -0.5)
        log_profiles[:, rows] = marker_base + down + rng.normal(0.0, 0.3, (len(CELL_TYPES), len(rows)))
        log_profiles[k, rows] = marker_base + up + rng.normal(0.0, 0.3, len(rows))
    profiles = np.exp(log_profiles)
    profiles /= profiles.sum(axis=1, keepdims=True)
    dispersion = np.exp(rng.normal(math.log(0.15), 0.5, n_genes))
    profiles.setflags(write=False)
    dispersion.setflags(write=False)
    return profiles, dispersion


# ---------------------------------------------------------------------------------------------
# Input validation
# ---------------------------------------------------------------------------------------------


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return int(value)


def _check_composition(composition: np.ndarray) -> np.ndarray:
    try:
        comp = np.asarray(composition, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"composition must be a numeric array, got {type(composition).__name__}") from None
    if comp.ndim != 2 or comp.shape[1] != len(CELL_TYPES):
        raise ValueError(
            f"composition must have shape (n_spots, {len(CELL_TYPES)}) with columns {CELL_TYPES}, "
            f"got shape {comp.shape}"
        )
    if not np.all(np.isfinite(comp)):
        raise ValueError("composition must be finite (found NaN or inf)")
    if np.any(comp < 0):
        raise ValueError(f"composition must be non-negative, found minimum {comp.min():.4g}")
    sums = comp.sum(axis=1)
    bad = np.flatnonzero(np.abs(sums - 1.0) > 1e-3)
    if bad.size:
        raise ValueError(
            f"composition rows must sum to 1 (within 1e-3); row {bad[0]} sums to {sums[bad[0]]:.6g}"
        )
    return comp / sums[:, None]


def _check_library_size(library_size: float) -> float:
    message = f"library_size must be a positive finite number, got {library_size!r}"
    if isinstance(library_size, bool):
        raise ValueError(message)
    try:
        value = float(library_size)
    except (TypeError, ValueError):
        raise ValueError(message) from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(message)
    return value


def _check_stain(section_stain: np.ndarray | None, n: int) -> np.ndarray:
    """Stain matrices (n, 3, 3); rows are the H, E and melanin OD vectors of each tile."""
    if section_stain is None:
        return np.broadcast_to(_default_stain(), (n, 3, 3))
    stain = np.asarray(section_stain, dtype=np.float64)
    if stain.shape == (3, 3):
        stain = np.broadcast_to(stain, (n, 3, 3))
    elif stain.shape != (n, 3, 3):
        raise ValueError(
            "section_stain must have shape (3, 3) (rows: haematoxylin, eosin, melanin OD vectors) "
            f"or (n_spots, 3, 3) = ({n}, 3, 3), got shape {stain.shape}"
        )
    if not np.all(np.isfinite(stain)) or np.any(stain < 0):
        raise ValueError("section_stain must contain finite, non-negative optical densities")
    return stain


def _default_stain() -> np.ndarray:
    return np.stack([HAEMATOXYLIN, EOSIN, MELANIN])


# ---------------------------------------------------------------------------------------------
# Expression
# ---------------------------------------------------------------------------------------------


def simulate_counts(composition: np.ndarray, seed: int = 0, library_size: float = 3000.0) -> np.ndarray:
    """Sample gene-expression counts for spots of known composition.

    The mean of spot ``i`` is ``L_i * sum_k composition[i, k] * profile_k`` over
    :data:`GENE_PANEL`, with log-normal library sizes ``L_i`` around ``library_size`` that
    shrink for background-rich spots (glass and necrosis yield few transcripts). Counts are
    gamma-Poisson (negative binomial) with a fixed per-gene dispersion.

    Args:
        composition: (n, 5) non-negative rows summing to 1, columns in :data:`CELL_TYPES` order.
        seed: non-negative integer seed; the same seed gives the same counts.
        library_size: typical total counts of a spot without background.

    Returns:
        (n, len(GENE_PANEL)) int64 counts.
    """
    comp = _check_composition(composition)
    seed = _check_int("seed", seed, 0)
    library_size = _check_library_size(library_size)
    rng = np.random.default_rng(seed)
    profiles, dispersion = _expression_model()
    libraries = library_size * rng.lognormal(0.0, 0.25, len(comp)) * (1.0 - 0.75 * comp[:, _BACKGROUND])
    mean = libraries[:, None] * (comp @ profiles)
    shape = 1.0 / dispersion
    rate = rng.gamma(shape, mean / shape)
    return rng.poisson(rate).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------

_TILE_UM = 64.0  # tissue width shown by one tile, in micrometres
_SUPERSAMPLE = 2  # tiles are drawn at this factor of tile_size, then area-averaged
_CHUNK_PIXELS = 1 << 21  # supersampled pixels rendered at once; bounds memory for big tiles
_EDGE_PAD_UM = 8.0  # nuclei are seeded this far beyond the tile so its borders are not sparse

# Stain concentrations of the ground substance of each region (cytoplasm, matrix, glass),
# indexed by cell type; nuclei, fibres and granules are added on top.
_BASE_H = np.array([0.15, 0.08, 0.03, 0.05, 0.01])
_BASE_E = np.array([0.36, 0.18, 0.10, 0.12, 0.03])
_BASE_M = np.array([0.0, 0.0, 0.0, 0.08, 0.0])


@dataclass(frozen=True)
class _Blobs:
    """A population of elliptical objects (nuclei, granules, debris) of one region type.

    Sizes are semi-axes in micrometres; ``density`` is the expected count over a tile fully
    occupied by the region; ``amplitude`` is the peak stain concentration in ``channel``
    (0 = haematoxylin, 1 = eosin, 2 = melanin); ``rim`` in [0, 1) lightens the centre of
    vesicular nuclei (their chromatin lines the membrane); a fraction ``nucleoli`` of them
    gets a small dark nucleolus.
    """

    region: int
    density: float
    major_um: tuple[float, float]
    aspect: tuple[float, float]
    amplitude: tuple[float, float]
    channel: int = 0
    rim: float = 0.0
    nucleoli: float = 0.0


_NUCLEI = (
    # Tumour: large, pleomorphic, vesicular nuclei.
    _Blobs(_TUMOUR, 22.0, (4.5, 8.5), (0.55, 0.95), (0.8, 1.4), rim=0.55, nucleoli=0.7),
    # Lymphocytes: small, round, solid and very dark, packed tightly.
    _Blobs(_LYMPHOCYTE, 80.0, (2.8, 3.6), (0.85, 1.0), (1.7, 2.1)),
    # Stroma: sparse spindle nuclei (orientation follows the fibres, see _render_chunk).
    _Blobs(_STROMA, 7.0, (5.5, 9.0), (0.18, 0.3), (1.1, 1.5)),
    # Melanocytic: medium, fairly round nuclei with open chromatin.
    _Blobs(_MELANOCYTIC, 20.0, (3.8, 5.2), (0.75, 1.0), (0.9, 1.2), rim=0.35, nucleoli=0.5),
    # Background: a few small pyknotic / karyorrhectic fragments and eosinophilic debris.
    _Blobs(_BACKGROUND, 5.0, (0.6, 2.2), (0.4, 1.0), (0.8, 1.4)),
    _Blobs(_BACKGROUND, 3.0, (1.5, 4.0), (0.4, 1.0), (0.25, 0.5), channel=1),
)

# Melanin granules come in clumps (melanosome-laden cytoplasm, melanophages).
_MELANIN_CLUMPS = 24.0  # clumps per fully melanocytic tile
_GRANULES_PER_CLUMP = 9.0
_CLUMP_SPREAD_UM = 3.0
# Granules and nucleoli are placed around their clump / nucleus, so region and density are unused.
_GRANULE = _Blobs(_MELANOCYTIC, 0.0, (0.6, 1.4), (0.6, 1.0), (1.0, 1.8), channel=2)
_NUCLEOLUS = _Blobs(_TUMOUR, 0.0, (0.7, 1.1), (0.8, 1.0), (0.6, 0.9))
_CHROMATIN_UM = 1.6  # correlation length of the chromatin / cytoplasm micro-texture


@lru_cache(maxsize=16)
def _smooth_basis(size: int, nodes: int) -> np.ndarray:
    """(size, nodes) Gaussian interpolation matrix with unit-norm rows.

    ``B @ Z @ B.T`` for ``Z`` of i.i.d. standard normals (nodes x nodes) is a smooth random
    field on a size x size grid with unit variance and correlation length ~ tile / nodes:
    a cheap stand-in for Gaussian-filtered white noise, computed for many tiles at once by
    batched matrix products.
    """
    # Nodes span [-0.2, 1.2] of the tile width so the field does not fade at the edges.
    spacing = 1.4 / nodes
    centres = -0.2 + (np.arange(nodes) + 0.5) * spacing
    pixels = (np.arange(size) + 0.5) / size
    basis = np.exp(-0.5 * ((pixels[:, None] - centres[None, :]) / (0.9 * spacing)) ** 2)
    basis /= np.linalg.norm(basis, axis=1, keepdims=True)
    basis = basis.astype(np.float32)
    basis.setflags(write=False)
    return basis


def _smooth_fields(rng: np.random.Generator, n: int, size: int, nodes: int) -> np.ndarray:
    basis = _smooth_basis(size, nodes)
    noise = rng.standard_normal((n, nodes, nodes), dtype=np.float32)
    return basis @ noise @ basis.T


def _region_labels(comp: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """Partition each tile among cell types with area fractions equal to the composition.

    A smooth random field is cut at its own quantiles: the pixels below the quantile
    ``c_1`` go to the first type of a random per-tile order, the next ``c_2`` to the second,
    and so on, so areas match the composition exactly and regions are smooth blobs and bands.
    """
    n = len(comp)
    field = _smooth_fields(rng, n, size, 5).reshape(n, -1)
    order = np.argsort(rng.random((n, len(CELL_TYPES))), axis=1)
    cumulative = np.cumsum(np.take_along_axis(comp, order, axis=1), axis=1)[:, :-1]
    ranks = np.rint(cumulative * field.shape[1]).astype(np.int64)
    ordered = np.sort(field, axis=1)
    thresholds = np.take_along_axis(ordered, np.minimum(ranks, field.shape[1] - 1), axis=1)
    thresholds[ranks >= field.shape[1]] = np.inf
    position = (field[:, :, None] >= thresholds[:, None, :]).sum(axis=2)
    return np.take_along_axis(order, position, axis=1).reshape(n, size, size)


def _rasterise(
    total: int,
    size: int,
    tile: np.ndarray,
    cx: np.ndarray,
    cy: np.ndarray,
    major: np.ndarray,
    minor: np.ndarray,
    angle: np.ndarray,
    amplitude: np.ndarray,
    rim: float,
) -> np.ndarray:
    """Sum anti-aliased elliptical blobs into a flat (n * size * size) concentration image.

    Every blob is evaluated on its own square window around its centre (all blobs at once,
    as one (n_blobs, w, w) array) and scattered with ``np.bincount``. Lengths are in
    supersampled pixels.
    """
    if tile.size == 0:
        return np.zeros(total, dtype=np.float64)
    half = math.ceil(float(major.max()) + 1.5)
    offsets = np.arange(-half, half + 1)
    px = np.floor(cx).astype(np.int64)[:, None, None] + offsets[None, None, :]
    py = np.floor(cy).astype(np.int64)[:, None, None] + offsets[None, :, None]
    dx = (px + 0.5 - cx[:, None, None]).astype(np.float32)
    dy = (py + 0.5 - cy[:, None, None]).astype(np.float32)
    cos = np.cos(angle).astype(np.float32)[:, None, None]
    sin = np.sin(angle).astype(np.float32)[:, None, None]
    along = (dx * cos + dy * sin) / major[:, None, None].astype(np.float32)
    across = (dy * cos - dx * sin) / minor[:, None, None].astype(np.float32)
    radius = np.sqrt(along**2 + across**2)
    # (1 - r) * minor approximates the distance to the outline in pixels: a one-pixel ramp.
    coverage = np.clip((1.0 - radius) * minor[:, None, None] + 0.5, 0.0, 1.0)
    if rim:
        coverage *= 1.0 - rim + rim * np.minimum(radius, 1.0) ** 3
    weight = coverage * amplitude[:, None, None]
    keep = (weight > 0) & (px >= 0) & (px < size) & (py >= 0) & (py < size)
    index = (tile[:, None, None] * size + py) * size + px
    return np.bincount(index[keep], weights=weight[keep], minlength=total)


def _region_at(labels: np.ndarray, tile: np.ndarray, cx: np.ndarray, cy: np.ndarray) -> np.ndarray:
    """Region label under each centre (centres beyond the tile take the nearest pixel's)."""
    size = labels.shape[1]
    row = np.clip(cy.astype(np.int64), 0, size - 1)
    col = np.clip(cx.astype(np.int64), 0, size - 1)
    return labels[tile, row, col]


def _draw(
    rng: np.random.Generator,
    spec: _Blobs,
    scale: float,
    n: int,
    size: int,
    tile: np.ndarray,
    cx: np.ndarray,
    cy: np.ndarray,
    angle: np.ndarray | None = None,
) -> np.ndarray:
    """Draw sizes, orientations and amplitudes for blobs at the given centres and rasterise them."""
    count = len(tile)
    major = rng.uniform(*spec.major_um, count) * scale
    minor = major * rng.uniform(*spec.aspect, count)
    if angle is None:
        angle = rng.uniform(0.0, math.pi, count)
    amplitude = rng.uniform(*spec.amplitude, count)
    return _rasterise(n * size * size, size, tile, cx, cy, major, minor, angle, amplitude, spec.rim)


def _scatter(
    rng: np.random.Generator, n: int, density: float, size: int, pad: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Poisson-many uniform centres per tile over the tile grown by ``pad`` pixels per side."""
    area = ((size + 2 * pad) / size) ** 2
    tile = np.repeat(np.arange(n), rng.poisson(density * area, n))
    cx = rng.uniform(-pad, size + pad, len(tile))
    cy = rng.uniform(-pad, size + pad, len(tile))
    return tile, cx, cy


def _render_chunk(
    comp: np.ndarray, stain: np.ndarray, tile_size: int, rng: np.random.Generator
) -> np.ndarray:
    """Render tiles for one chunk of compositions with the given per-tile stain matrices."""
    n = len(comp)
    size = tile_size * _SUPERSAMPLE
    scale = size / _TILE_UM  # supersampled pixels per micrometre
    pad = _EDGE_PAD_UM * scale
    labels = _region_labels(comp, rng, size)

    # Stroma: collagen bundles are wavy bands along a random direction per tile, made by
    # sharpened cosines of the coordinate across that direction, warped by smooth fields at
    # two scales; a second, finer family at a slight angle breaks the regularity.
    fibre_angle = rng.uniform(0.0, math.pi, n)
    coords = np.arange(size, dtype=np.float32) + 0.5
    warp = _smooth_fields(rng, n, size, 3) * (3.0 * scale) + _smooth_fields(rng, n, size, 9) * scale
    fibres = np.zeros((n, size, size), dtype=np.float32)
    for tilt, weight, sharpness, period_um in ((0.0, 0.7, 3, (6.0, 9.0)), (0.12, 0.35, 2, (3.0, 4.5))):
        angle = fibre_angle + tilt * rng.choice([-1.0, 1.0], n)
        sin = np.sin(angle).astype(np.float32)[:, None, None]
        cos = np.cos(angle).astype(np.float32)[:, None, None]
        across = coords[None, :, None] * cos - coords[None, None, :] * sin + warp
        period = rng.uniform(*period_um, (n, 1, 1)).astype(np.float32) * scale
        phase = rng.uniform(0.0, 2 * math.pi, (n, 1, 1)).astype(np.float32)
        fibres += weight * (0.5 + 0.5 * np.cos(2 * math.pi * across / period + phase)) ** sharpness
    fibres *= np.clip(0.7 + 0.4 * _smooth_fields(rng, n, size, 6), 0.0, 1.0)

    # Ground substance per region, with smooth eosin intensity variation across the tile.
    conc_h = _BASE_H.astype(np.float32)[labels]
    conc_e = _BASE_E.astype(np.float32)[labels] * (1.0 + 0.2 * _smooth_fields(rng, n, size, 3))
    conc_e += np.where(labels == _STROMA, 0.8 * fibres, np.float32(0.0))
    conc_m = _BASE_M.astype(np.float32)[labels]
    flat = [conc_h.reshape(-1), conc_e.reshape(-1), conc_m.reshape(-1)]

    # Nuclei and debris: Poisson-many uniform candidates per tile, kept where their centre
    # lies in their region, so counts scale with the region's area.
    for spec in _NUCLEI:
        tile, cx, cy = _scatter(rng, n, spec.density, size, pad)
        keep = _region_at(labels, tile, cx, cy) == spec.region
        tile, cx, cy = tile[keep], cx[keep], cy[keep]
        angle = None
        if spec.region == _STROMA:  # spindle nuclei lie along the fibres
            angle = fibre_angle[tile] + rng.normal(0.0, 0.15, len(tile))
        flat[spec.channel] += _draw(rng, spec, scale, n, size, tile, cx, cy, angle)
        if spec.nucleoli:
            has = rng.random(len(tile)) < spec.nucleoli
            jitter = rng.normal(0.0, scale, (2, int(has.sum())))
            flat[0] += _draw(
                rng, _NUCLEOLUS, scale, n, size, tile[has], cx[has] + jitter[0], cy[has] + jitter[1]
            )

    # Melanin granules scatter around clump centres in the melanocytic region; a granule
    # belongs to its clump even where it spills over the region's edge.
    tile, cx, cy = _scatter(rng, n, _MELANIN_CLUMPS, size, pad)
    keep = _region_at(labels, tile, cx, cy) == _MELANOCYTIC
    per_clump = rng.poisson(_GRANULES_PER_CLUMP, int(keep.sum()))
    tile, cx, cy = (np.repeat(v[keep], per_clump) for v in (tile, cx, cy))
    spread = _CLUMP_SPREAD_UM * scale
    cx = cx + rng.normal(0.0, spread, len(cx))
    cy = cy + rng.normal(0.0, spread, len(cy))
    flat[_GRANULE.channel] += _draw(rng, _GRANULE, scale, n, size, tile, cx, cy)

    # Micro-texture at a fixed physical scale (clumped chromatin, granular cytoplasm), so
    # it looks the same at every tile size, plus a little per-pixel grain.
    nodes = round(_TILE_UM / _CHROMATIN_UM)
    flat[0] *= (1.0 + 0.3 * _smooth_fields(rng, n, size, nodes)).reshape(-1)
    flat[1] *= (1.0 + 0.15 * _smooth_fields(rng, n, size, nodes)).reshape(-1)
    grain = 1.0 + 0.05 * rng.standard_normal(n * size * size, dtype=np.float32)
    conc = np.stack([np.clip(c * grain, 0.0, 3.0) for c in flat], axis=-1).reshape(n, size, size, 3)
    optical_density = np.einsum("nyxk,nkc->nyxc", conc, stain.astype(np.float32))
    # Averaging transmitted light (not optical density) is what a coarser sensor pixel sees.
    rgb = 255.0 * np.exp(-optical_density)
    rgb = rgb.reshape(n, tile_size, _SUPERSAMPLE, tile_size, _SUPERSAMPLE, 3).mean(axis=(2, 4))
    rgb += rng.normal(0.0, 1.5, rgb.shape).astype(np.float32)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def render_tiles(
    composition: np.ndarray,
    tile_size: int = 32,
    seed: int = 0,
    section_stain: np.ndarray | None = None,
) -> np.ndarray:
    """Render H&E-like tiles for arbitrary compositions.

    The tile area is split among cell types in proportion to each row of ``composition`` and
    each region is drawn with its type's morphology (tumour: large pleomorphic vesicular
    nuclei in pink-lilac cytoplasm; lymphocyte: densely packed small dark round nuclei;
    stroma: wavy pink collagen fibres with spindle nuclei; melanocytic: medium nuclei with
    clumps of brown melanin granules in pale cytoplasm; background: near-white glass with
    sparse debris). Colours follow Beer-Lambert mixing of stain optical densities.

    Args:
        composition: (n, 5) non-negative rows summing to 1, columns in :data:`CELL_TYPES` order.
        tile_size: output side in pixels (>= 16); a tile always shows the same tissue width, so
            larger tiles are a higher magnification.
        seed: non-negative integer seed; the same inputs and seed give identical tiles.
        section_stain: optional stain matrix, (3, 3) for all tiles or (n, 3, 3) per tile, whose
            rows are the OD vectors of haematoxylin, eosin and melanin per unit concentration
            (their norms act as staining intensities). Defaults to the unit vectors
            :data:`HAEMATOXYLIN`, :data:`EOSIN`, :data:`MELANIN`.

    Returns:
        (n, tile_size, tile_size, 3) uint8 RGB tiles.
    """
    comp = _check_composition(composition)
    tile_size = _check_int("tile_size", tile_size, 16)
    seed = _check_int("seed", seed, 0)
    stain = _check_stain(section_stain, len(comp))
    out = np.empty((len(comp), tile_size, tile_size, 3), dtype=np.uint8)
    size = tile_size * _SUPERSAMPLE
    chunk = max(1, _CHUNK_PIXELS // (size * size))
    # Chunk i always uses child stream i, so output does not depend on anything but the inputs.
    streams = np.random.SeedSequence(seed).spawn(max(1, -(-len(comp) // chunk)))
    for i, start in enumerate(range(0, len(comp), chunk)):
        stop = start + chunk
        rng = np.random.default_rng(streams[i])
        out[start:stop] = _render_chunk(comp[start:stop], stain[start:stop], tile_size, rng)
    return out


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


@dataclass
class SimulatedTissue:
    """Spots of simulated sections with their expression and image tiles.

    Attributes:
        adata: ``X`` and ``layers["counts"]`` hold raw integer counts (spots x genes) over
            :data:`GENE_PANEL`; ``obs`` has ``sample_id``, ``x_px``/``y_px`` (spot centre in
            an imaginary section image with spot pitch ``2 * tile_size`` px) and
            ``array_row``/``array_col``; ``obsm["composition"]`` is the hidden (n, 5) float32
            composition; ``uns["cell_types"]`` lists :data:`CELL_TYPES` and
            ``uns["simulator"]`` records the parameters and seed, and per section (in
            ``sample_ids`` order) the field length scale, softmax temperature and stain
            matrix (``stains``, (n_sections, 3, 3), rows H, E, melanin).
        tiles: (n, tile_size, tile_size, 3) uint8; row ``i`` is the tile of ``adata.obs_names[i]``.
    """

    adata: ad.AnnData
    tiles: np.ndarray


def _section_composition(
    rng: np.random.Generator, grid: int, length_scale: float, temperature: float
) -> np.ndarray:
    """(grid * grid, 5) compositions: softmax of smooth per-type Gaussian random fields."""
    noise = rng.standard_normal((len(CELL_TYPES), grid, grid))
    fields = ndimage.gaussian_filter(noise, sigma=(0.0, length_scale, length_scale), mode="reflect")
    fields -= fields.mean(axis=(1, 2), keepdims=True)
    spread = fields.std(axis=(1, 2), keepdims=True)
    fields /= np.where(spread > 0, spread, 1.0)
    # Section-level offsets make some types more abundant in some sections than in others.
    logits = (fields + rng.normal(0.0, 0.4, (len(CELL_TYPES), 1, 1))) / temperature
    logits -= logits.max(axis=0, keepdims=True)
    weights = np.exp(logits)
    comp = weights / weights.sum(axis=0, keepdims=True)
    return comp.reshape(len(CELL_TYPES), -1).T


def _section_stain(rng: np.random.Generator) -> np.ndarray:
    """A mildly perturbed stain matrix: slightly shifted hues and staining intensities."""
    vectors = _default_stain() + rng.normal(0.0, 0.03, (3, 3))
    vectors = np.abs(vectors) / np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors * rng.uniform(0.85, 1.15, (3, 1))


def simulate_tissue(
    n_sections: int = 4,
    grid: int = 24,
    tile_size: int = 32,
    seed: int = 0,
    library_size: float = 3000.0,
) -> SimulatedTissue:
    """Simulate ``n_sections`` sections of ``grid`` x ``grid`` spots each.

    Within a section the composition varies smoothly over the (square) spot grid: per-type
    Gaussian random fields with a section-specific length scale (1.5 to 4 spots) plus
    section-level offsets go through a softmax whose section-specific temperature lets
    spots range from nearly pure to well mixed. Each section has its own mild stain variation.

    Args:
        n_sections: number of sections (samples), >= 1.
        grid: spots per side of each section, >= 1.
        tile_size: tile side in pixels, >= 16.
        seed: non-negative integer seed; the whole dataset is a deterministic function of it.
        library_size: typical total counts of a spot without background, > 0.

    Returns:
        A :class:`SimulatedTissue` with ``n_sections * grid**2`` spots.
    """
    n_sections = _check_int("n_sections", n_sections, 1)
    grid = _check_int("grid", grid, 1)
    tile_size = _check_int("tile_size", tile_size, 16)
    seed = _check_int("seed", seed, 0)
    library_size = _check_library_size(library_size)

    layout_stream, count_stream, stain_stream, render_stream = np.random.SeedSequence(seed).spawn(4)
    layout_rng = np.random.default_rng(layout_stream)
    stain_rng = np.random.default_rng(stain_stream)
    render_seeds = np.random.default_rng(render_stream).integers(0, 2**63, n_sections)
    pitch = 2 * tile_size
    rows, cols = np.divmod(np.arange(grid * grid), grid)

    compositions, tiles, obs = [], [], []
    sample_ids, length_scales, temperatures, stains = [], [], [], []
    for s in range(n_sections):
        sample_id = f"section{s}"
        length_scale = float(layout_rng.uniform(1.5, 4.0))
        temperature = float(layout_rng.uniform(0.3, 0.5))
        comp = _section_composition(layout_rng, grid, length_scale, temperature)
        stain = _section_stain(stain_rng)
        compositions.append(comp)
        tiles.append(render_tiles(comp, tile_size, int(render_seeds[s]), stain))
        obs.append(
            pd.DataFrame(
                {
                    "sample_id": sample_id,
                    "x_px": (cols + 0.5) * pitch,
                    "y_px": (rows + 0.5) * pitch,
                    "array_row": rows,
                    "array_col": cols,
                },
                index=[f"{sample_id}_{r}x{c}" for r, c in zip(rows, cols, strict=True)],
            )
        )
        sample_ids.append(sample_id)
        length_scales.append(length_scale)
        temperatures.append(temperature)
        stains.append(stain)

    composition = np.concatenate(compositions)
    count_seed = int(np.random.default_rng(count_stream).integers(0, 2**63))
    counts = simulate_counts(composition, count_seed, library_size)
    obs_frame = pd.concat(obs)
    obs_frame["x_px"] = obs_frame["x_px"].astype(np.float64)
    obs_frame["y_px"] = obs_frame["y_px"].astype(np.float64)
    adata = ad.AnnData(
        X=counts,
        obs=obs_frame,
        var=pd.DataFrame(index=pd.Index(GENE_PANEL, name="gene")),
        layers={"counts": counts.copy()},
        obsm={"composition": composition.astype(np.float32)},
        uns={
            "cell_types": list(CELL_TYPES),
            "simulator": {
                "seed": seed,
                "n_sections": n_sections,
                "grid": grid,
                "tile_size": tile_size,
                "library_size": library_size,
                "spot_pitch_px": pitch,
                "tile_um": _TILE_UM,
                # Per section, in sample_ids order; stains are (n_sections, 3, 3) H/E/melanin rows.
                "sample_ids": sample_ids,
                "length_scales": np.asarray(length_scales),
                "temperatures": np.asarray(temperatures),
                "stains": np.stack(stains),
            },
        },
    )
    return SimulatedTissue(adata=adata, tiles=np.concatenate(tiles))
