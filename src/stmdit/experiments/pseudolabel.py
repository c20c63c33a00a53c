"""``stmdit pseudolabel``: pseudo spatial transcriptomics for H&E-only slides (PTPL).

Most tissue has H&E and no spatial transcriptomics. As in the paper (DeepSpot pseudo-labels on
TCGA), a grid of pseudo-spots is laid over the detected tissue of each slide, the expression
predictor reads every pseudo-spot's tile in context (its sub-spots and neighbours), and the
predicted expression becomes an AnnData in the readers' convention, ready for ``stmdit
prepare`` (format ``pseudolabels``), training (``obs['expression_source'] == 'predicted'``) and
out-of-distribution evaluation.

Predicted values are log1p CP10k (clipped at 0). ``X`` keeps them; ``layers['counts']`` holds
what the GE encoders read: CP10k values (``expm1``) with each spot's expected number of
undetected genes set to 0 on its lowest predictions, as measured spots have them, and
``obs['library_size'] = 1e4`` declared (see :mod:`stmdit.predictor.pseudocounts`). They are not
counts: the ``counts_are_predicted`` flag and the predictor's provenance say so.

Slides are processed one at a time and each result is written atomically
(``<out>/<sample_id>.h5ad``), so an interrupted run resumes without redoing finished slides or
keeping partial ones; under ``accelerate launch`` each process takes every N-th slide.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Annotated, ClassVar

import numpy as np
import scipy.sparse as sp
from pydantic import BeforeValidator, Field
from tqdm.auto import tqdm

from stmdit.config import ConfigModel, Count, PathStr, PositiveFloat, Probability
from stmdit.data.readers import read_he_slide
from stmdit.data.readers.convention import write_h5ad
from stmdit.data.tiling import SpotTiler
from stmdit.distributed import process_state
from stmdit.errors import ConfigError
from stmdit.io import path_inside
from stmdit.predictor import context_features, load_predictor
from stmdit.predictor.pseudocounts import CP10K, pseudo_counts
from stmdit.predictor.readback import training_grid

logger = logging.getLogger(__name__)


class SlideGeometry(ConfigModel):
    """Pseudo-spot geometry; unset entries take :func:`stmdit.data.readers.read_he_slide`'s
    defaults (DeepSpot's TCGA protocol)."""

    spot_diameter_um: PositiveFloat | None = None
    spacing_um: PositiveFloat | None = None
    background_threshold: Annotated[float, Field(ge=0.0, le=255.0)] | None = None
    min_tissue_fraction: Probability | None = None


class SlideSpec(SlideGeometry):
    """One slide given as a mapping: its path, pixel size and ids, and its own geometry."""

    path: PathStr
    mpp: PositiveFloat | None = None
    sample_id: str | None = None
    patient_id: str | None = None


def _slide_mapping(item):
    """A slide given as a bare path is ``{path: ...}``."""
    return {"path": os.fspath(item)} if isinstance(item, (str, os.PathLike)) else item


class PseudolabelConfig(SlideGeometry):
    """Slides are paths, or mappings with ``path`` and optionally ``mpp``, ``sample_id``,
    ``patient_id`` and per-slide geometry (``spot_diameter_um``, ``spacing_um``,
    ``background_threshold``, ``min_tissue_fraction``). Geometry defaults to DeepSpot's TCGA
    protocol (:func:`stmdit.data.readers.read_he_slide`). Tiles are read at the predictor's
    training resolution (its provenance ``tile_um`` and ``tile_px``); ``tile_px`` may only
    repeat the predictor's value, and is needed for a predictor that does not record one."""

    config_name: ClassVar[str] = "pseudolabel config"

    predictor: PathStr
    slides: Annotated[list[Annotated[SlideSpec, BeforeValidator(_slide_mapping)]], Field(min_length=1)]
    out: PathStr = "pseudolabels"
    tile_px: Annotated[int, Field(ge=8)] | None = None
    batch_size: Count = 64
    trust_pickle: bool = False

    def slide_specs(self) -> list[dict]:
        specs = []
        for item in self.slides:
            spec = item.model_dump(exclude_none=True)
            spec.setdefault("sample_id", Path(spec["path"]).stem)
            specs.append(spec)
        ids = [s["sample_id"] for s in specs]
        if len(ids) != len(set(ids)):
            raise ConfigError(f"pseudolabel: slide sample ids repeat ({ids}); give each a sample_id")
        return specs


def predictor_resolution(predictor, tile_px: int | None = None) -> tuple[float, int]:
    """(tile_um, tile_px) at which slides are read: the predictor's training grid.

    The rule every reader of the predictor follows (:mod:`stmdit.predictor.readback`): tiles are
    read on the grid the predictor was trained on, ``tile_px`` pixels per ``tile_um`` µm
    (:func:`~stmdit.predictor.readback.training_grid`). ``stmdit evaluate`` resizes real and
    generated tiles onto that grid; a slide is read on it directly, so a different ``tile_px`` is
    refused: read at another pixel size and then put on the grid, it could only lose detail (a
    4x coarser crop at 64 px for a predictor trained on 256 px tiles)."""
    tile_um, trained_px = training_grid(predictor)
    if tile_um is None:
        raise ValueError("the predictor does not record the tile size it was trained on (provenance tile_um)")
    if trained_px is None and tile_px is None:
        raise ValueError(
            f"the predictor does not record the tile size in pixels it was trained on (provenance tile_px); "
            f"set tile_px to the pixels of its {tile_um:g} µm training tiles"
        )
    if trained_px is not None and tile_px is not None and int(tile_px) != trained_px:
        raise ValueError(
            f"tile_px {tile_px} does not match the predictor's training tiles: it was trained on {trained_px} px per "
            f"{tile_um:g} µm tile ({tile_um / trained_px:.3g} µm/px), and tile_px {tile_px} would read slides at "
            f"{tile_um / tile_px:.3g} µm/px; leave tile_px unset to read at the predictor's resolution"
        )
    return tile_um, int(trained_px if trained_px is not None else tile_px)


def pseudolabel_slide(spec: dict, predictor, encoder, cfg: PseudolabelConfig, progress: bool = True):
    """Pseudo-spots of one H&E-only slide with their predicted expression (AnnData)."""
    provenance = predictor.config.provenance or {}
    diameters = provenance.get("spot_diameter_um") or [None]
    tile_um, tile_px = predictor_resolution(predictor, cfg.tile_px)
    keys = ("spot_diameter_um", "spacing_um", "background_threshold", "min_tissue_fraction")
    geometry = {k: spec.get(k, getattr(cfg, k)) for k in keys if spec.get(k, getattr(cfg, k)) is not None}
    slide = read_he_slide(
        spec["path"],
        mpp=spec.get("mpp"),
        sample_id=spec["sample_id"],
        patient_id=spec.get("patient_id"),
        **geometry,
    )
    if slide.n_obs == 0:
        raise ValueError(
            f"{spec['path']}: no pseudo-spot on tissue; check the slide and background_threshold"
        )
    tiler = SpotTiler(slide, tile_um, tile_px)
    tiles = np.concatenate(
        [
            tiler.read(np.arange(i, min(i + 256, slide.n_obs)))[0]
            for i in tqdm(
                range(0, slide.n_obs, 256),
                desc=f"tiles {spec['sample_id']}",
                disable=not progress,
                leave=False,
            )
        ]
    )
    tiler.close()
    # The crop the predictor reads is the spot size it was trained on, whatever the grid's pitch.
    crop_um = float(diameters[0]) if len(diameters) == 1 and diameters[0] else float(tile_um)
    # Neighbours by the rule and radius the predictor was trained with.
    feats = context_features(
        tiles,
        slide.obs,
        float(tile_um),
        crop_um,
        encoder,
        batch_size=cfg.batch_size,
        progress=progress,
        neighbour_rule=predictor.neighbour_rule,
        neighbour_radius=predictor.neighbour_radius,
    )
    # log1p CP10k is never negative; a regressor's small excursions below 0 are clipped.
    predicted = np.clip(predictor.predict_features(feats), 0.0, None)

    out = predictor.to_anndata(predicted, obs=slide.obs)
    calibration = provenance.get("zero_calibration")
    if calibration is None:
        warnings.warn(
            f"{cfg.predictor}: no zero calibration in the predictor (trained before it existed, or imported): "
            "pseudo-label counts stay dense, unlike measured spots; retrain it with stmdit train-predictor",
            stacklevel=2,
        )
    out.layers["counts"] = sp.csr_matrix(pseudo_counts(predicted, calibration))
    out.obs["library_size"] = CP10K
    out.obs["expression_source"] = "predicted"
    meta = dict(slide.uns["stmdit"]["samples"][spec["sample_id"]])
    meta.update(
        counts_available=True,
        counts_are_predicted=True,
        source_format="pseudolabels",
        predictor=provenance,
        predictor_crop_um=crop_um,
        predictor_tile_um=tile_um,
        predictor_tile_px=tile_px,
        counts_sparsified=calibration is not None,
    )
    out.uns["stmdit"] = {"samples": {spec["sample_id"]: _json_safe(meta)}}
    return out


def _json_safe(value):
    """uns must be writable to h5ad: nested dicts of strings, numbers and lists."""
    return json.loads(json.dumps(value, default=str))


def pseudolabel(cfg: PseudolabelConfig, progress: bool = True) -> list[Path]:
    """Pseudo-label every slide not done yet; returns the AnnData paths of all slides."""
    state = process_state()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    specs = cfg.slide_specs()
    paths = [path_inside(out, s["sample_id"], suffix=".h5ad") for s in specs]
    mine = [
        i
        for i in range(len(specs))
        if i % state.num_processes == state.process_index and not paths[i].exists()
    ]
    logger.info("process %d of %d: %d slide(s) to label", state.process_index, state.num_processes, len(mine))
    if mine:
        predictor, encoder = load_predictor(cfg.predictor, trust_pickle=cfg.trust_pickle)
        predictor_resolution(predictor, cfg.tile_px)  # a mismatch stops here, before any slide is read
        if encoder is None:
            raise ValueError(f"{cfg.predictor} records no morphology encoder to rebuild")
        encoder.to(state.device)
        predictor.to(state.device)
        for i in tqdm(mine, desc=f"slides (process {state.process_index})", disable=not progress):
            adata = pseudolabel_slide(specs[i], predictor, encoder, cfg, progress=progress)
            write_h5ad(adata, paths[i])
            logger.info("%s: %d pseudo-spots", paths[i], adata.n_obs)
    state.wait_for_everyone()
    return paths
