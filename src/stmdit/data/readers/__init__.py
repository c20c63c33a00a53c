"""Readers for the spatial data users bring, all returning AnnData in one convention
(:mod:`stmdit.data.readers.convention`), one module per technology.

Formats: 10x Visium Space Ranger ``outs/`` (:func:`read_visium`), HEST-1k samples
(:func:`read_hest`), an AnnData with scanpy-style ``obsm['spatial']`` and a separate image
(:func:`read_spatial_h5ad`), legacy ST such as her2st or STNet (:func:`read_legacy_st`),
single-cell tables such as Xenium (:func:`read_cell_table`, then
:func:`aggregate_to_pseudospots`), H&E-only slides (:func:`read_he_slide`), ``stmdit pseudolabel`` results (:func:`read_pseudolabels`) and SpatialData objects such as spatialdata-io's
Visium and Xenium (:func:`read_spatialdata`). Several
samples join with :func:`concat_samples`.
"""

from stmdit.data.readers.cell_table import aggregate_to_pseudospots, read_cell_table
from stmdit.data.readers.convention import (
    DEEPSPOT_TCGA_SPACING_UM,
    DEEPSPOT_TCGA_SPOT_UM,
    LEGACY_ST_PITCH_UM,
    LEGACY_ST_SPOT_UM,
    MAX_OUTSIDE_FRACTION,
    SPACERANGER_FULLRES_SPOT_UM,
    VISIUM_PITCH_UM,
    VISIUM_SPOT_UM,
    concat_samples,
)
from stmdit.data.readers.h5ad import read_spatial_h5ad
from stmdit.data.readers.he_slide import read_he_slide
from stmdit.data.readers.hest import read_hest
from stmdit.data.readers.legacy_st import read_legacy_st
from stmdit.data.readers.pseudolabels import read_pseudolabels
from stmdit.data.readers.spatialdata import read_spatialdata
from stmdit.data.readers.visium import read_visium

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
    "read_pseudolabels",
    "read_spatial_h5ad",
    "read_spatialdata",
    "read_visium",
]
