"""Whole virtual sections on the page: a seamless virtual section drawn beside the real one
(:func:`stmdit.sections.synthesis.synthesize_seamless`), and region edits of it (a polygon
drawn on the page, the gene sliders applied to the spots inside it, the unedited section kept
outside, anchor ``virtual``).

Drawing takes from seconds to minutes, so it runs as a job in a background thread: a POST
starts it and answers 202 with the job's id, the page polls the job's progress (denoising
steps done of the total) and then fetches its images as PNG. One job runs at a time per
server: a second request while one runs is refused with 409 (not queued), so nobody's click
waits behind an unknown number of others. A job also waits for the tile generation of
:mod:`stmdit.web.api` (they share the pipeline and its lock); it is ``queued`` meanwhile.

The last unedited section is kept (one per server); an edit names it by its job id (refused
once another section replaced it) and takes from it the store, sample, seed, steps and guidance,
the geometry that maps the polygon drawn in canvas pixels to microns, and its denoised canvas:
the edit (:func:`stmdit.sections.editing.run_edit`) starts from that canvas for the section's
seed instead of drawing it again, and draws only the other seeds' unedited canvases.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import threading
import time
import uuid
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Literal

import numpy as np
from fastapi import APIRouter, Path
from fastapi.responses import Response
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from stmdit import defaults
from stmdit.encoders.vae import vae_scale
from stmdit.sections.edits import region_mask, region_spots
from stmdit.web.api import (
    GUIDANCE_MAX,
    MAX_CHANGES,
    MAX_NAME_LENGTH,
    MAX_SEEDS,
    MAX_STEPS,
    SEED_MAX,
    GeneChange,
    Generator,
    perturbations,
)
from stmdit.web.datasets import AppError, Datasets

logger = logging.getLogger(__name__)

# Limits of a section request. The canvas size is the cost that grows with the tissue (the
# windows to denoise grow with its area); the default lets a CPU draw a her2st section at the
# model's resolution in minutes, and a server may raise it (create_app's section_max_pixels).
SECTION_MAX_PIXELS = 1024 * 1024
MAX_SECTION_STEPS = MAX_STEPS
MAX_VERTICES = 256
BAND_UM_MAX = 10_000.0
KEEP_JOBS = 16  # finished jobs whose progress and images can still be read
IMAGE_NAMES = ("real", "virtual", "edited", "unedited")


class SectionRequest(BaseModel):
    """What the Draw section button sends."""

    model_config = ConfigDict(extra="forbid", strict=True)

    dataset: str = Field(min_length=1, max_length=MAX_NAME_LENGTH)
    sample: str = Field(min_length=1, max_length=MAX_NAME_LENGTH)
    seed: int = Field(0, ge=0, le=SEED_MAX)
    steps: int | None = Field(None, ge=1, le=MAX_SECTION_STEPS)
    guidance_ge: float = Field(defaults.GUIDANCE_GE, ge=0.0, le=GUIDANCE_MAX, allow_inf_nan=False)
    guidance_morph: float = Field(defaults.GUIDANCE_MORPH, ge=0.0, le=GUIDANCE_MAX, allow_inf_nan=False)


Vertex = Annotated[list[Annotated[float, Field(allow_inf_nan=False)]], Field(min_length=2, max_length=2)]


class EditRequest(BaseModel):
    """What the Apply sliders to region button sends: the drawn section (its job id), the
    polygon in that section's canvas pixels (x right, y down; pixel j spans [j, j + 1)), the
    sliders, optionally the width of the transition band (default half a tile), and the number
    of seeds: the first is the section's (its unedited image is the drawn section), more give
    the measured change an interval, each costing a redraw of the section and of the region."""

    model_config = ConfigDict(extra="forbid", strict=True)

    section: str = Field(min_length=1, max_length=64)
    polygon_px: list[Vertex] = Field(min_length=3, max_length=MAX_VERTICES)
    changes: list[GeneChange] = Field(min_length=1, max_length=MAX_CHANGES)
    band_um: float | None = Field(None, gt=0, le=BAND_UM_MAX, allow_inf_nan=False)
    n_seeds: int = Field(1, ge=1, le=MAX_SEEDS)


def pixels_to_um(polygon_px, geometry) -> list[list[float]]:
    """Canvas pixel coordinates (x, y) -> microns of the sample's frame, the inverse of
    :meth:`~stmdit.sections.mosaic.SectionGeometry.to_canvas`."""
    points = np.asarray(polygon_px, dtype=float).reshape(-1, 2)
    um = np.asarray(geometry.origin_um, dtype=float) + points * float(geometry.um_per_px)
    return um.tolist()


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buffer, format="PNG", compress_level=3)
    return buffer.getvalue()


@dataclass
class Job:
    """One section or edit being drawn; ``images``: name -> PNG bytes once done."""

    id: str
    kind: Literal["section", "edit"]
    total: int
    state: Literal["queued", "running", "done", "failed"] = "queued"
    steps_done: int = 0
    error: str | None = None
    started: float = field(default_factory=time.monotonic)
    seconds: float | None = None
    result: dict = field(default_factory=dict)
    images: dict[str, bytes] = field(default_factory=dict)

    def progress(self, steps_done: int, total: int) -> None:
        self.steps_done, self.total = int(steps_done), max(1, int(total))
        self.state = "running"

    def status(self) -> dict:
        seconds = self.seconds if self.seconds is not None else time.monotonic() - self.started
        return {
            "job": self.id,
            "kind": self.kind,
            "state": self.state,
            "steps_done": self.steps_done,
            "total": self.total,
            "error": self.error,
            "seconds": round(seconds, 2),
            "result": self.result if self.state == "done" else None,
        }


@dataclass
class Drawn:
    """The last unedited section: its job, the request, the prepared store's folder, the
    steps and the SectionResult."""

    job: str
    request: SectionRequest
    path: object
    steps: int
    section: object


class Sections:
    """The section jobs of one server: at most one running, the last ``KEEP_JOBS`` readable,
    and the last unedited section kept for edits."""

    def __init__(self, generator: Generator, datasets: Datasets, max_pixels: int = SECTION_MAX_PIXELS):
        self.generator = generator
        self.datasets = datasets
        self.max_pixels = int(max_pixels)
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._running: Job | None = None
        self._lock = threading.Lock()  # guards the jobs, the running one and the drawn section
        self._drawn: Drawn | None = None

    # -- jobs -------------------------------------------------------------------------------------

    def job(self, job_id: str) -> Job:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise AppError(404, f"unknown job {job_id!r}: it finished long ago or never existed")
        return job

    def start(self, kind: str, total: int, work: Callable[[Job], tuple[dict, dict[str, bytes]]]) -> Job:
        """Run ``work(job)`` (returning the result JSON and the PNGs) in a thread, or refuse
        with 409 while another job runs."""
        with self._lock:
            if self._running is not None:
                busy = self._running
                raise AppError(
                    409,
                    f"a {busy.kind} is being drawn (job {busy.id}, {busy.steps_done} of {busy.total} steps); "
                    "wait until it is done, then try again",
                )
            job = Job(uuid.uuid4().hex[:12], kind, max(1, int(total)))
            self._running = job
            self._jobs[job.id] = job
            while len(self._jobs) > KEEP_JOBS:
                self._jobs.popitem(last=False)
        threading.Thread(
            target=self._run, args=(job, work), name=f"stmdit-{kind}-{job.id}", daemon=True
        ).start()
        return job

    def _run(self, job: Job, work) -> None:
        result, images, error = {}, {}, "interrupted"
        try:
            with self.generator._lock:  # one generation at a time, tiles or sections
                job.state = "running"
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    result, images = work(job)
            error = None
        except AppError as err:
            error = err.message
        except (ValueError, FileNotFoundError) as err:  # the section code's messages say what
            error = str(err).strip("'\"")
        except Exception:
            logger.exception("section job %s failed", job.id)
            error = "unexpected server error; the details are in the server's log"
        finally:
            # The job is done and the server free at once: a client that saw "done" may start the next.
            with self._lock:
                job.seconds = time.monotonic() - job.started
                if error is None:
                    job.result, job.images, job.steps_done = result, images, job.total
                job.error, job.state = error, "failed" if error is not None else "done"
                self._running = None

    # -- sections ---------------------------------------------------------------------------------

    def _store(self, request: SectionRequest):
        """The prepared store of the request's dataset, its Dataset and the sample's record,
        every request check done before anything is drawn."""
        dataset = self.datasets.get(request.dataset)
        source = self.datasets.listing()[request.dataset]
        if not source.path.is_dir():
            raise AppError(
                400,
                f"dataset: {request.dataset!r} is not a prepared dataset (stmdit prepare) with its H&E "
                "images; a whole section needs one",
            )
        if request.sample not in dataset.spots_by_sample:
            raise AppError(404, f"sample: unknown sample {request.sample!r} in dataset {request.dataset!r}")
        samples = dataset.adata.uns.get("stmdit", {}).get("samples", {})
        meta = samples.get(request.sample, {})
        if not meta.get("image_path") or not meta.get("mpp"):
            raise AppError(
                400,
                f"sample: {request.sample!r} has no H&E image in the prepared dataset; a section needs one",
            )
        return source.path, dataset, meta

    def canvas_size(self, dataset, sample: str, meta: dict) -> tuple[int, int]:
        """(width, height) in pixels of the sample's canvas, as synthesize_seamless lays it out
        (the kept spots' extent plus a tile, at the model's tile_um / window pixels)."""
        pipe = self.generator.pipe
        window_px = int(pipe.transformer.config.sample_size) * vae_scale(pipe.vae)
        tile_um = float(dataset.tile_um)
        um_per_px = tile_um / window_px
        spots = dataset.adata.obs_names.isin(dataset.spots_by_sample[sample])
        obs = dataset.adata.obs.loc[spots]
        xy = obs[["x_px", "y_px"]].to_numpy(float) * float(meta["mpp"])
        extent = xy.max(axis=0) - xy.min(axis=0) + tile_um
        width, height = (max(window_px, int(np.ceil(e / um_per_px - 1e-6))) for e in extent)
        return width, height

    def start_section(self, request: SectionRequest) -> Job:
        path, dataset, meta = self._store(request)
        if dataset.tile_um is None or not {"x_px", "y_px"} <= set(dataset.adata.obs):
            raise AppError(400, f"dataset: {request.dataset!r} has no spot positions or tile size")
        width, height = self.canvas_size(dataset, request.sample, meta)
        if width * height > self.max_pixels:
            raise AppError(
                400,
                f"sample: the section of {request.sample!r} would be {width} x {height} pixels at the model's "
                f"resolution; this server draws at most {self.max_pixels:,} pixels (stmdit section draws "
                "larger ones)",
            )
        steps = request.steps or self.generator.steps

        def work(job: Job) -> tuple[dict, dict[str, bytes]]:
            from stmdit.sections.synthesis import synthesize_seamless

            result = synthesize_seamless(
                self.generator.pipe,
                path,
                request.sample,
                seed=request.seed,
                guidance_ge=request.guidance_ge,
                guidance_morph=request.guidance_morph,
                steps=steps,
                progress=False,
                on_step=job.progress,
            )
            with self._lock:
                self._drawn = Drawn(job.id, request, path, steps, result)
            settings = result.settings
            return {
                "dataset": request.dataset,
                "sample": request.sample,
                "seed": request.seed,
                "steps": steps,
                "guidance_ge": request.guidance_ge,
                "guidance_morph": request.guidance_morph,
                "geometry": result.geometry.to_dict(),
                "n_spots": len(result.spots),
                "tile_um": result.tile_um,
                "windows": {k: settings.get(k) for k in ("n_windows", "window", "stride")},
                "images": {name: self.image_url(job.id, name) for name in ("real", "virtual")},
            }, {"real": png_bytes(result.real), "virtual": png_bytes(result.virtual)}

        return self.start("section", steps, work)

    @staticmethod
    def image_url(job_id: str, name: str) -> str:
        return f"/api/section/jobs/{job_id}/{name}.png"

    # -- edits ------------------------------------------------------------------------------------

    def drawn(self, job_id: str) -> Drawn:
        with self._lock:
            drawn = self._drawn
        if drawn is None or drawn.job != job_id:
            raise AppError(
                409 if drawn is not None else 404,
                f"section: {job_id!r} is not the last section drawn on this server"
                + ("; draw the section again" if drawn is not None else "; draw a section first"),
            )
        return drawn

    def start_edit(self, request: EditRequest) -> Job:
        drawn = self.drawn(request.section)
        geometry = drawn.section.geometry
        points = np.asarray(request.polygon_px, dtype=float)
        outside = np.flatnonzero(
            (points[:, 0] < 0)
            | (points[:, 0] > geometry.width)
            | (points[:, 1] < 0)
            | (points[:, 1] > geometry.height)
        )
        if len(outside):
            raise AppError(
                400,
                f"polygon_px[{outside[0]}]: vertex {points[outside[0]].tolist()} lies outside the section's "
                f"{geometry.width} x {geometry.height} pixels",
            )
        dataset = self.datasets.get(drawn.request.dataset)
        changes = perturbations(request.changes, dataset, drawn.request.dataset)
        if not changes:
            raise AppError(400, "changes: every slider is at 0; move one (or knock a gene out) first")
        polygon_um = pixels_to_um(points, geometry)
        region = {"polygon_um": polygon_um}
        if not region_mask(region, geometry).any():
            raise AppError(400, "polygon_px: the polygon holds no pixel centre; draw a larger region")
        spots = drawn.section.spots
        if not region_spots(region, spots, spots[["x_um", "y_um"]].to_numpy(float)).any():
            raise AppError(
                400,
                "polygon_px: no spot centre lies inside the polygon, so the edit would change no "
                "expression; draw it around at least one spot",
            )
        gene_sets = {name: info["genes"] for name, info in dataset.gene_sets.items()}
        steps = drawn.steps
        seeds = list(range(drawn.request.seed, drawn.request.seed + request.n_seeds))

        def work(job: Job) -> tuple[dict, dict[str, bytes]]:
            numbers, edited, unedited = run_edit(
                self.generator.pipe,
                drawn,
                polygon_um,
                changes,
                gene_sets,
                request.band_um,
                seeds,
                job.progress,
            )
            return {
                "section": drawn.job,
                "polygon_px": points.tolist(),
                "polygon_um": polygon_um,
                "perturbation": "; ".join(p.describe() for p in changes),
                "anchor": "virtual",
                "steps": steps,
                **numbers,
                "images": {name: self.image_url(job.id, name) for name in ("edited", "unedited")},
            }, {"edited": png_bytes(edited), "unedited": png_bytes(unedited)}

        # Per seed: the unedited section (the anchor; the drawn one for the first seed), then the
        # region under the edit.
        return self.start("edit", (2 * len(seeds) - 1) * steps, work)


def finite(value):
    """``value`` with every NaN or infinity (an empty band, no interval) as None, for JSON."""
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def run_edit(pipe, drawn: Drawn, polygon_um, changes, gene_sets, band_um, seeds, on_step):
    """The region edit of the drawn section with its sampling settings, anchor ``virtual``:
    :func:`stmdit.sections.editing.run_edit` over ``seeds`` (the first the section's, so its
    unedited image is the drawn section). Returns (numbers, edited image, unedited image)."""
    from stmdit.sections.editing import run_edit as edit_section
    from stmdit.sections.edits import EditConfig

    config = EditConfig(
        region={"polygon_um": polygon_um},
        changes=[dataclasses.asdict(p) for p in changes],
        anchor="virtual",
        band_um=band_um,
        seeds=seeds,
        gene_sets=gene_sets,
    )
    request = drawn.request
    result = edit_section(
        pipe,
        drawn.path,
        request.sample,
        config,
        guidance_ge=request.guidance_ge,
        guidance_morph=request.guidance_morph,
        steps=drawn.steps,
        progress=False,
        on_step=on_step,
        drawn=drawn.section,
    )
    report = result.report
    numbers = {
        "seeds": list(seeds),
        "band_um": report["settings"]["band_um"],
        "region": report["region"],
        "local_change": report["local_change"],
        "measures": report["measures"],
        "statistics": report["statistics"],
        "changes": report["changes"],
        "multiplicity": report["multiplicity"],
        "replicates": report["replicates"],
        "nuclei": report["nuclei"],
        "redrawn_box_px": report["settings"]["redrawn_box_px"],
    }
    return finite(numbers), result.edited, result.unedited


def section_routes(sections: Sections) -> APIRouter:
    api = APIRouter(prefix="/api/section")

    @api.get("/config")
    def config():
        return {
            "max_pixels": sections.max_pixels,
            "max_steps": MAX_SECTION_STEPS,
            "max_vertices": MAX_VERTICES,
        }

    @api.post("", status_code=202)
    def start_section(request: SectionRequest):
        return sections.start_section(request).status()

    @api.post("/edit", status_code=202)
    def start_edit(request: EditRequest):
        return sections.start_edit(request).status()

    @api.get("/jobs/{job_id}")
    def job_status(job_id: Annotated[str, Path(max_length=64)]):
        return sections.job(job_id).status()

    @api.get("/jobs/{job_id}/{name}.png")
    def job_image(job_id: Annotated[str, Path(max_length=64)], name: Annotated[str, Path(max_length=16)]):
        job = sections.job(job_id)
        if name not in IMAGE_NAMES:
            raise AppError(404, f"unknown image {name!r}: the images are {', '.join(IMAGE_NAMES)}")
        if job.state != "done":
            raise AppError(409, f"job {job_id} is {job.state}; its images come once it is done")
        if name not in job.images:
            raise AppError(
                404, f"job {job_id} (a {job.kind}) has no {name} image; it has {', '.join(job.images)}"
            )
        return Response(job.images[name], media_type="image/png", headers={"cache-control": "no-store"})

    return api
