"""``stmdit pseudolabel``: pseudo spatial transcriptomics for H&E-only slides (PTPL).

Most tissue has H&E and no spatial transcriptomics. As in the paper (DeepSpot pseudo-labels on
TCGA), a grid of pseudo-spots is laid over the detected tissue of each slide, the expression
predictor reads every pseudo-spot's tile in context (its sub-spots and neighbours), and the
predicted expression becomes an AnnData in the readers' convention, ready for ``stmdit
prepare`` (format ``pseudolabels``), training (``obs['expression_source'] == 'predicted'``) and
out-of-distribution evaluation.

Predicted values are log1p CP10k (clipped at 0). ``X`` keeps them; ``layers['counts']`` holds the
corresponding CP10k values (``expm1``) with ``obs['library_size'] = 1e4``, so every GE encoder
normalises them back to exactly the predicted log1p CP10k. They are not counts: the
``counts_are_predicted`` flag and the predictor's provenance say so.

Slides are processed one at a time and each result is written atomically
(``<out>/<sample_id>.h5ad``), so an interrupted run resumes without redoing finished slides or
keeping partial ones; under ``accelerate launch`` each process takes every N-th slide.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated, ClassVar

import numpy as np
import scipy.sparse as sp
from pydantic import BeforeValidator, Field
from tqdm.auto import tqdm

from stmdit.config import ConfigModel, Count, PathStr, PositiveFloat, Probability
from stmdit.errors import ConfigError
from stmdit.io import atomic_path, path_inside

logger = logging.getLogger(__name__)

CP10K = 1e4


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
    protocol (:func:`stmdit.data.readers.read_he_slide`)."""

    config_name: ClassVar[str] = "pseudolabel config"

    predictor: PathStr
    slides: Annotated[list[Annotated[SlideSpec, BeforeValidator(_slide_mapping)]], Field(min_length=1)]
    out: PathStr = "pseudolabels"
    tile_px: Annotated[int, Field(ge=8)] = 64
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


def pseudolabel_slide(spec: dict, predictor, encoder, cfg: PseudolabelConfig, progress: bool = True):
    """Pseudo-spots of one H&E-only slide with their predicted expression (AnnData)."""
    from stmdit.data.readers import read_he_slide
    from stmdit.data.tiling import SpotTiler
    from stmdit.encoders.predictor import context_features

    provenance = predictor.config.provenance or {}
    diameters = provenance.get("spot_diameter_um") or [None]
    tile_um = provenance.get("tile_um")
    if tile_um is None:
        raise ValueError("the predictor does not record the tile size it was trained on (provenance tile_um)")
    keys = ("spot_diameter_um", "spacing_um", "background_threshold", "min_tissue_fraction")
    geometry = {k: spec.get(k, getattr(cfg, k)) for k in keys if spec.get(k, getattr(cfg, k)) is not None}
    slide = read_he_slide(spec["path"], mpp=spec.get("mpp"), sample_id=spec["sample_id"],
                          patient_id=spec.get("patient_id"), **geometry)  # fmt: skip
    if slide.n_obs == 0:
        raise ValueError(
            f"{spec['path']}: no pseudo-spot on tissue; check the slide and background_threshold"
        )
    tiler = SpotTiler(slide, float(tile_um), cfg.tile_px)
    tiles = np.concatenate([tiler.read(np.arange(i, min(i + 256, slide.n_obs)))[0]
                            for i in tqdm(range(0, slide.n_obs, 256), desc=f"tiles {spec['sample_id']}",
                                          disable=not progress, leave=False)])  # fmt: skip
    tiler.close()
    # The crop the predictor reads is the spot size it was trained on, whatever the grid's pitch.
    crop_um = float(diameters[0]) if len(diameters) == 1 and diameters[0] else float(tile_um)
    feats = context_features(tiles, slide.obs, float(tile_um), crop_um, encoder, batch_size=cfg.batch_size,
                             progress=progress)  # fmt: skip
    # log1p CP10k is never negative; a regressor's small excursions below 0 are clipped.
    predicted = np.clip(predictor.predict_features(feats), 0.0, None)

    out = predictor.to_anndata(predicted, obs=slide.obs)
    out.layers["counts"] = sp.csr_matrix(np.expm1(predicted).astype(np.float32))
    out.obs["library_size"] = CP10K
    out.obs["expression_source"] = "predicted"
    meta = dict(slide.uns["stmdit"]["samples"][spec["sample_id"]])
    meta.update(counts_available=True, counts_are_predicted=True, source_format="pseudolabels",
                predictor=provenance, predictor_crop_um=crop_um, predictor_tile_um=float(tile_um))  # fmt: skip
    out.uns["stmdit"] = {"samples": {spec["sample_id"]: _json_safe(meta)}}
    return out


def _json_safe(value):
    """uns must be writable to h5ad: nested dicts of strings, numbers and lists."""
    import json

    return json.loads(json.dumps(value, default=str))


def pseudolabel(cfg: PseudolabelConfig, progress: bool = True) -> list[Path]:
    """Pseudo-label every slide not done yet; returns the AnnData paths of all slides."""
    from stmdit.distributed import process_state
    from stmdit.encoders.predictor import load_predictor

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
        if encoder is None:
            raise ValueError(f"{cfg.predictor} records no morphology encoder to rebuild")
        encoder.to(state.device)
        predictor.to(state.device)
        for i in tqdm(mine, desc=f"slides (process {state.process_index})", disable=not progress):
            adata = pseudolabel_slide(specs[i], predictor, encoder, cfg, progress=progress)
            with atomic_path(paths[i]) as tmp:
                adata.write_h5ad(tmp)
            logger.info("%s: %d pseudo-spots", paths[i], adata.n_obs)
    state.wait_for_everyone()
    return paths


def read_pseudolabels(h5ad: str | os.PathLike, sample_id: str | None = None, patient_id: str | None = None):
    """A ``stmdit pseudolabel`` result as a reader output (for ``stmdit prepare``)."""
    import anndata as ad

    path = Path(h5ad)
    if not path.is_file():
        raise FileNotFoundError(f"pseudo-label file {path} does not exist; run `stmdit pseudolabel` first")
    adata = ad.read_h5ad(path)
    samples = adata.uns.get("stmdit", {}).get("samples", {})
    if len(samples) != 1 or adata.obs.get("expression_source") is None:
        raise ValueError(
            f"{path} is not a `stmdit pseudolabel` output (uns['stmdit']['samples'], obs['expression_source'])"
        )
    ((sid, meta),) = samples.items()
    if sample_id is not None and sample_id != sid:
        adata.obs["sample_id"] = sample_id
        adata.obs_names = [f"{sample_id}:{b}" for b in adata.obs["barcode"]]
        adata.uns["stmdit"] = {"samples": {sample_id: meta}}
    if patient_id is not None:
        adata.obs["patient_id"] = patient_id
    return adata
