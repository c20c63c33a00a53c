"""``stmdit serve``: a local web page for virtual tissue experiments with a trained pipeline.

A pathologist picks a spot of a dataset (or uploads an .h5ad), raises or lowers genes and gene
programmes, and sees the tile the model draws for the spot next to the tile it draws after the
change, from the same noise (a counterfactual pair,
:func:`stmdit.experiments.simulate.paired_generate`), for a few seeds, with the measured changes
in stain density and nuclei and their spread. Below, a whole virtual section is drawn beside
the real one (two views that pan and zoom together), and the same sliders can be applied to a
region drawn on it (:mod:`stmdit.web.sections`: background jobs with progress, one at a time).

One FastAPI application: the page is static files of this package (``static/``: HTML, CSS and
JavaScript, nothing fetched from elsewhere, so it works offline), the JSON API is
:mod:`stmdit.web.api`, the datasets :mod:`stmdit.web.datasets`, and :mod:`stmdit.web.guard`
refuses requests whose Host or Origin is not the server itself (DNS rebinding, cross-site
posts) and sets the security headers. Only what the configured data folder holds can be read
through it, and uploads go to a private temporary folder. It binds to 127.0.0.1 by default and
answers every error as ``{"error": "..."}`` with a readable message.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from stmdit import defaults
from stmdit.pipeline import STMDiTPipeline
from stmdit.web.api import MAX_STEPS, Generator, routes
from stmdit.web.datasets import AppError, Datasets
from stmdit.web.guard import Guard, error
from stmdit.web.sections import SECTION_MAX_PIXELS, Sections, section_routes

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def _validation_message(err: RequestValidationError) -> str:
    """Pydantic's errors as one readable line: 'guidance_ge: Input should be ...'."""
    parts = []
    for e in err.errors():
        if e.get("type") == "json_invalid":
            return "the request body is not valid JSON"
        where = ""
        for x in e.get("loc", ()):
            if x not in ("body", "query"):
                where += f"[{x}]" if isinstance(x, int) else f".{x}" if where else str(x)
        message = str(e.get("msg", "invalid value")).removeprefix("Value error, ")
        parts.append(f"{where or 'request'}: {message}")
    return "; ".join(parts[:6]) or "invalid request"


def create_app(
    pipeline_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    gene_sets: Mapping[str, Sequence[str]] | None = None,
    max_upload_mb: float = 50,
    max_spots: int = 5000,
    min_panel_fraction: float = 0.5,
    max_uploads: int = 8,
    steps: int = defaults.STEPS,
    device: str | None = None,
    allowed_hosts: Sequence[str] = LOOPBACK_HOSTS,
    section_max_pixels: int = SECTION_MAX_PIXELS,
) -> FastAPI:
    """The web app for ``pipeline_dir`` (loaded once, here) over the datasets in ``data_dir``.

    ``gene_sets`` adds named gene lists to the marker programmes (:mod:`stmdit.genesets`);
    ``max_upload_mb``, ``max_spots`` and ``min_panel_fraction`` (of the GE encoder's panel that
    an upload must share) bound uploads, of which the newest ``max_uploads`` stay selectable;
    an upload's datasets may take at most ten times ``max_upload_mb`` once decompressed;
    ``steps`` is the default number of sampling steps; ``allowed_hosts`` the names the browser
    may use for the server (add the host name when serving beyond localhost);
    ``section_max_pixels`` bounds the canvas of a whole virtual section (:mod:`stmdit.web.sections`).
    """
    if not (Path(pipeline_dir) / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{pipeline_dir} is not a pipeline folder (no model_index.json); train one, or run stmdit demo"
        )
    data_root = Path(data_dir)
    if not data_root.is_dir():
        raise FileNotFoundError(f"data folder {data_root} does not exist")
    if not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"steps must be in [1, {MAX_STEPS}]; got {steps}")
    if section_max_pixels < 1:
        raise ValueError(f"section_max_pixels must be >= 1; got {section_max_pixels}")
    pipe = STMDiTPipeline.from_pretrained(str(pipeline_dir))
    pipe.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if pipe.ge_encoder is None or not pipe.transformer.has_ge:
        raise ValueError(
            f"{pipeline_dir} was trained without gene expression; virtual experiments need a GE model"
        )
    panel = [str(g) for g in pipe.ge_encoder.genes]
    max_upload_bytes = int(max_upload_mb * 2**20)
    upload_dir = Path(tempfile.mkdtemp(prefix="stmdit-uploads-"))  # mode 0700: private to this user
    datasets = Datasets(
        data_root,
        upload_dir,
        panel,
        {str(k): [str(g) for g in v] for k, v in (gene_sets or {}).items()},
        min_panel_fraction,
        max_spots,
        max_uploads,
        max_upload_bytes,
    )

    @asynccontextmanager
    async def lifespan(_app):
        yield
        shutil.rmtree(upload_dir, ignore_errors=True)

    app = FastAPI(
        title="STMDiT virtual experiments", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.add_middleware(Guard, allowed_hosts=set(allowed_hosts), max_upload_bytes=max_upload_bytes)

    @app.exception_handler(AppError)
    async def app_error(_request, err: AppError):
        return error(err.status, err.message)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request, err: RequestValidationError):
        return error(422, _validation_message(err))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, err: StarletteHTTPException):
        return error(err.status_code, str(err.detail))

    @app.get("/")
    def page():
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    upload_limits = {
        "max_mb": max_upload_mb,
        "max_spots": max_spots,
        "min_panel_fraction": min_panel_fraction,
    }
    generator = Generator(pipe, steps)
    app.include_router(routes(datasets, generator, panel, pipe.morphology_encoder is not None, upload_limits))
    app.state.sections = Sections(generator, datasets, section_max_pixels)
    app.include_router(section_routes(app.state.sections))
    return app


def serve(
    pipeline_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    host: str = "127.0.0.1",
    port: int = 8000,
    gene_sets: Mapping[str, Sequence[str]] | None = None,
    cpu_threads: int | None = 1,
    **options,
) -> None:
    """Run the app with uvicorn until interrupted; ``options`` go to :func:`create_app`.

    ``cpu_threads`` limits torch's threads on the CPU (None: torch's default). One is fastest
    for the small models a CPU serves: their layers are too small to gain from splitting, and
    on a busy machine the threads' waiting on each other made generation 10-30x slower.
    """
    if cpu_threads is not None:
        torch.set_num_threads(cpu_threads)
    if host not in LOOPBACK_HOSTS:
        logger.warning(
            "serving on %s: the app has no login, so anyone who can reach this address can use it", host
        )
        options.setdefault("allowed_hosts", (*LOOPBACK_HOSTS, host))
    app = create_app(pipeline_dir, data_dir, gene_sets=gene_sets, **options)
    uvicorn.run(app, host=host, port=port, log_level="info")
