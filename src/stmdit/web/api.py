"""The web app's JSON API: the requests it accepts (every field checked before anything is
computed), the counterfactual generation behind the Generate button, and the routes."""

from __future__ import annotations

import base64
import io
import threading
import time
import warnings
from typing import Literal

import anndata as ad
import numpy as np
from fastapi import APIRouter, Query, Request
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from stmdit import defaults
from stmdit.experiments.simulate import (
    MEASUREMENTS,
    Perturbation,
    paired_generate,
    perturb,
    start_state,
    tile_statistics,
)
from stmdit.experiments.statistics import (
    ALPHA,
    CONFIDENCE,
    adjust_changes,
    describe_replicates,
    paired_change,
)
from stmdit.stain import nuclei_unavailable
from stmdit.tiles import to_tensor, to_uint8
from stmdit.web.datasets import AppError, Dataset, Datasets

# Limits of one request: small enough that a CPU answers in seconds and nobody can make the
# server draw thousands of tiles, wide enough for any experiment the page offers.
GUIDANCE_MAX = 10.0
LOG2_FOLD_CHANGE_MAX = 5.0
MAX_SEEDS = 4
MAX_STEPS = 50
MAX_CHANGES = 16
MAX_GENES_CHANGED = 100
MAX_NAME_LENGTH = 200
SEED_MAX = 2**31 - 1 - MAX_SEEDS
# Tiles are shown at least this large, enlarged by an integer factor with nearest neighbours
# so that every generated pixel stays a crisp square.
DISPLAY_MIN_PX = 256


class GeneChange(BaseModel):
    """One slider of the page: a gene or a named gene set, its log2 fold change, knocked out or not."""

    model_config = ConfigDict(extra="forbid", strict=True)

    gene: str | None = Field(None, min_length=1, max_length=64)
    gene_set: str | None = Field(None, min_length=1, max_length=MAX_NAME_LENGTH)
    log2_fold_change: float = Field(
        0.0, ge=-LOG2_FOLD_CHANGE_MAX, le=LOG2_FOLD_CHANGE_MAX, allow_inf_nan=False
    )
    knockout: bool = False

    @model_validator(mode="after")
    def _one_target(self) -> GeneChange:
        if (self.gene is None) == (self.gene_set is None):
            raise ValueError("give either a gene or a gene_set")
        return self


class GenerateRequest(BaseModel):
    """What the Generate button sends."""

    model_config = ConfigDict(extra="forbid", strict=True)

    dataset: str = Field(min_length=1, max_length=MAX_NAME_LENGTH)
    sample: str = Field(min_length=1, max_length=MAX_NAME_LENGTH)
    spot: str | None = Field(None, max_length=MAX_NAME_LENGTH)
    start: Literal["spot", "sample"] = "spot"
    changes: list[GeneChange] = Field(default_factory=list, max_length=MAX_CHANGES)
    guidance_ge: float = Field(defaults.GUIDANCE_GE, ge=0.0, le=GUIDANCE_MAX, allow_inf_nan=False)
    guidance_morph: float = Field(defaults.GUIDANCE_MORPH, ge=0.0, le=GUIDANCE_MAX, allow_inf_nan=False)
    use_morphology: bool = False
    seed: int = Field(0, ge=0, le=SEED_MAX)
    n_seeds: int = Field(2, ge=1, le=MAX_SEEDS)
    steps: int | None = Field(None, ge=1, le=MAX_STEPS)


def png_data_url(image: np.ndarray) -> str:
    """A tile (H, W, 3) in [0, 1] or uint8 as a PNG data URL, enlarged with nearest neighbours."""
    u8 = image if image.dtype == np.uint8 else to_uint8(image)
    h, w = u8.shape[:2]
    factor = max(1, DISPLAY_MIN_PX // max(h, w))
    picture = Image.fromarray(u8).resize((w * factor, h * factor), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _plural(noun: str, names: list[str]) -> str:
    return f"{noun}{'s' if len(names) > 1 else ''} {', '.join(names)}"


def perturbations(changes: list[GeneChange], dataset: Dataset, dataset_name: str) -> list[Perturbation]:
    """The page's sliders as simulate's Perturbations, or an error naming every unknown gene and set."""
    not_in_data, not_in_panel, unknown_sets = [], [], []
    for change in changes:
        if change.gene is not None and change.gene.upper() not in dataset.genes:
            in_data = change.gene.upper() in dataset.dataset_genes
            (not_in_panel if in_data else not_in_data).append(change.gene)
        if change.gene_set is not None and change.gene_set not in dataset.gene_sets:
            unknown_sets.append(change.gene_set)
    problems = []
    if not_in_data:
        problems.append(f"unknown {_plural('gene', not_in_data)}: not in dataset {dataset_name!r}")
    if not_in_panel:
        one = len(not_in_panel) == 1
        problems.append(
            f"{_plural('gene', not_in_panel)} {'is' if one else 'are'} not in the model's gene panel, "
            f"so changing {'it' if one else 'them'} would not change the tile"
        )
    if unknown_sets:
        known = ", ".join(dataset.gene_sets) or "none"
        problems.append(f"unknown {_plural('gene set', unknown_sets)}; the known sets are {known}")
    if problems:
        raise AppError(400, "; ".join(problems))
    result, touched = [], set()
    for change in changes:
        genes = [dataset.genes[change.gene.upper()]] if change.gene else []
        touched.update(genes or dataset.gene_sets[change.gene_set]["genes"])
        if change.knockout:
            result.append(Perturbation(genes=genes, gene_set=change.gene_set, mode="knockout"))
        elif change.log2_fold_change != 0:
            result.append(
                Perturbation(genes=genes, gene_set=change.gene_set, value=2.0**change.log2_fold_change)
            )
    if len(touched) > MAX_GENES_CHANGED:
        raise AppError(
            400, f"this changes {len(touched)} genes; at most {MAX_GENES_CHANGED} can be changed at once"
        )
    return result


def measurements(tiles: np.ndarray, n_seeds: int, um_per_px: float | None) -> tuple[list[dict], dict]:
    """The measured tile statistics of the (control, perturbed) x seeds tiles, with their paired
    changes over the seeds (t interval, paired t test, Holm over the measures); nuclei per area
    as a row that says why it was not measured, when it was not."""
    flat = tiles.reshape(-1, *tiles.shape[2:])
    stats = tile_statistics(flat, um_per_px)
    rows = []
    for key, values in stats.items():
        values = values.reshape(2, n_seeds)
        rows.append(
            {
                "key": key,
                "label": MEASUREMENTS[key],
                "control": values[0].tolist(),
                "perturbed": values[1].tolist(),
                "perturbed_mean": float(values[1].mean()),
                "perturbed_sd": float(np.std(values[1], ddof=1)) if n_seeds > 1 else None,
                **paired_change(values[1], values[0], CONFIDENCE),
            }
        )
    multiplicity = adjust_changes(rows, alpha=ALPHA)
    note = nuclei_unavailable(min(flat.shape[1:3]), um_per_px)
    if note is not None:
        rows.append({"key": "nuclei", "label": "Nuclei per area", "note": f"not measured: {note}"})
    return rows, multiplicity


class Generator:
    """The loaded pipeline and the experiment: one generation at a time (the lock), since a
    second would only halve the speed of the first and double the memory."""

    def __init__(self, pipe, steps: int):
        self.pipe = pipe
        self.steps = steps
        self._lock = threading.Lock()

    def run(self, request: GenerateRequest, datasets: Datasets) -> dict:
        dataset = datasets.get(request.dataset)
        spots = dataset.spots_by_sample.get(request.sample)
        if spots is None:
            raise AppError(404, f"unknown sample {request.sample!r} in dataset {request.dataset!r}")
        if request.start == "spot" and (request.spot is None or request.spot not in spots):
            raise AppError(
                404, f"unknown spot {request.spot!r} in sample {request.sample!r}: choose a listed spot"
            )
        changes = perturbations(request.changes, dataset, request.dataset)
        real = None
        if dataset.tiles is not None and request.start == "spot":
            row = dataset.tile_rows[int(np.flatnonzero(dataset.adata.obs_names == request.spot)[0])]
            real = np.asarray(dataset.tiles[int(row)])
        morphology, note = self._morphology(request, dataset, real)

        gene_sets = {name: info["genes"] for name, info in dataset.gene_sets.items()}
        if request.start == "spot":
            control = start_state(dataset.adata, spot=request.spot)
        else:
            control = start_state(dataset.adata, sample=request.sample)
        changed = perturb(control, changes, gene_sets=gene_sets) if changes else control.copy()
        changed.obs_names = ["perturbed"]
        states = ad.concat([control, changed], join="inner")
        seeds = list(range(request.seed, request.seed + request.n_seeds))
        steps = request.steps or self.steps

        with self._lock:
            began = time.perf_counter()
            with warnings.catch_warnings():  # panel genes absent from the data are reported on the page
                warnings.simplefilter("ignore", UserWarning)
                tiles = paired_generate(
                    self.pipe,
                    states,
                    seeds,
                    morphology=morphology,
                    steps=steps,
                    guidance_morph=request.guidance_morph,
                    guidance_ge=request.guidance_ge,
                )
            seconds = time.perf_counter() - began
        # The generated tiles show what the model was trained on: the dataset's tile width, when known.
        um_per_px = dataset.tile_um / tiles.shape[3] if dataset.tile_um else None
        rows, multiplicity = measurements(tiles, len(seeds), um_per_px)
        return {
            "start_state": str(control.obs["state"].iloc[0]),
            "n_spots_averaged": int(control.obs["n_spots"].iloc[0]),
            "perturbation": "; ".join(p.describe() for p in changes) or "no change (the control, repeated)",
            "seeds": seeds,
            "steps": steps,
            "guidance_ge": request.guidance_ge,
            "guidance_morph": request.guidance_morph,
            "pairs": [
                {"seed": s, "control": png_data_url(tiles[0, i]), "perturbed": png_data_url(tiles[1, i])}
                for i, s in enumerate(seeds)
            ],
            "real_tile": png_data_url(real) if real is not None else None,
            "morphology": {
                "available": dataset.tiles is not None and self.pipe.morphology_encoder is not None,
                "used": morphology is not None,
                "note": note,
            },
            "panel": {"found": dataset.panel_found, "size": len(datasets.panel)},
            "measurements": rows,
            "replicates": describe_replicates("seeds", 1, len(seeds)),
            "multiplicity": multiplicity,
            "seconds": round(seconds, 2),
        }

    def _morphology(self, request: GenerateRequest, dataset: Dataset, real: np.ndarray | None):
        """The real tile as a morphology condition when asked for and possible, and a note saying which."""
        if not request.use_morphology:
            if dataset.tiles is None:
                return None, "not available (this dataset has no tiles)"
            return None, "not used (expression only)"
        if self.pipe.morphology_encoder is None:
            raise AppError(
                400,
                "this pipeline has no morphology encoder: untick 'also condition on the real tile's "
                "morphology'",
            )
        if dataset.tiles is None:
            raise AppError(
                400, f"dataset {request.dataset!r} has no tiles, so there is no real morphology to use"
            )
        if real is None:
            raise AppError(
                400, "the morphology of a real tile needs a spot as the start state, not a sample mean"
            )
        return to_tensor(real), "used (the spot's real tile)"


def routes(
    datasets: Datasets, generator: Generator, panel: list[str], morphology_encoder: bool, upload_limits: dict
) -> APIRouter:
    """The /api routes over ``datasets``; ``upload_limits`` (max_mb, max_spots,
    min_panel_fraction) are shown on the page and bound uploads."""
    api = APIRouter(prefix="/api")
    max_upload_bytes = int(upload_limits["max_mb"] * 2**20)

    @api.get("/health")
    def health():
        return {"status": "ok"}

    @api.get("/config")
    def config():
        defaults = {
            k: GenerateRequest.model_fields[k].default for k in ("guidance_ge", "guidance_morph", "seed")
        }
        return {
            "limits": {
                "guidance_max": GUIDANCE_MAX,
                "log2_fold_change_max": LOG2_FOLD_CHANGE_MAX,
                "max_seeds": MAX_SEEDS,
                "max_steps": MAX_STEPS,
                "max_changes": MAX_CHANGES,
                "max_genes_changed": MAX_GENES_CHANGED,
                "seed_max": SEED_MAX,
            },
            "defaults": {
                **defaults,
                "n_seeds": GenerateRequest.model_fields["n_seeds"].default,
                "steps": generator.steps,
            },
            "upload": upload_limits,
            "model": {"panel_genes": len(panel), "morphology_encoder": morphology_encoder},
        }

    @api.get("/datasets")
    def list_datasets():
        return {
            "datasets": [
                {"name": name, "origin": s.origin, "tiles": s.has_tiles}
                for name, s in datasets.listing().items()
            ]
        }

    @api.get("/samples")
    def list_samples(dataset: str = Query(max_length=MAX_NAME_LENGTH)):
        ds = datasets.get(dataset)
        return {
            "samples": [{"name": s, "n_spots": len(spots)} for s, spots in ds.spots_by_sample.items()],
            "tiles": ds.tiles is not None,
        }

    @api.get("/spots")
    def list_spots(
        dataset: str = Query(max_length=MAX_NAME_LENGTH), sample: str = Query(max_length=MAX_NAME_LENGTH)
    ):
        spots = datasets.get(dataset).spots_by_sample.get(sample)
        if spots is None:
            raise AppError(404, f"unknown sample {sample!r} in dataset {dataset!r}")
        return {"spots": spots}

    @api.get("/genes")
    def list_genes(dataset: str = Query(max_length=MAX_NAME_LENGTH)):
        ds = datasets.get(dataset)
        return {
            "genes": sorted(ds.genes.values(), key=str.upper),
            "panel_size": len(panel),
            "panel_found": ds.panel_found,
        }

    @api.get("/gene-sets")
    def list_gene_sets(dataset: str = Query(max_length=MAX_NAME_LENGTH)):
        return {
            "gene_sets": [{"name": name, **info} for name, info in datasets.get(dataset).gene_sets.items()]
        }

    @api.post("/generate")
    def generate(request: GenerateRequest):
        return generator.run(request, datasets)

    @api.post("/upload")
    async def upload(request: Request):
        form = await request.form(max_files=1, max_fields=1)
        try:
            item = form.get("file")
            if not isinstance(item, UploadFile):
                raise AppError(400, "send the .h5ad file as the multipart form field 'file'")
            target = datasets.new_upload_path()
            size = 0
            with target.open("wb") as out:
                while chunk := await item.read(2**20):
                    size += len(chunk)
                    if size > max_upload_bytes:
                        break
                    out.write(chunk)
            if size > max_upload_bytes:
                target.unlink()
                raise AppError(413, f"the upload is larger than the {upload_limits['max_mb']:g} MB limit")
            name, ds = await run_in_threadpool(datasets.add_upload, target, item.filename or "upload.h5ad")
        finally:
            await form.close()
        return {
            "dataset": name,
            "n_spots": int(ds.adata.n_obs),
            "samples": list(ds.spots_by_sample),
            "panel_found": ds.panel_found,
            "panel_size": len(panel),
        }

    return api
