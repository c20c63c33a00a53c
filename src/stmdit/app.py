"""``stmdit serve``: a local web page for virtual tissue experiments with a trained pipeline.

A pathologist picks a spot of a dataset (or uploads an .h5ad), raises or lowers genes and gene
programmes, and sees the tile the model draws for the spot next to the tile it draws after the
change, from the same noise (a counterfactual pair, :func:`stmdit.simulate.paired_generate`),
for a few seeds, with the measured changes in stain density and nuclei and their spread.

The app is one FastAPI application with a self-contained HTML page (inline CSS and JavaScript,
nothing fetched from elsewhere: it works offline). Only what the configured data folder holds
can be read through it: datasets are chosen by name from the server's own listing, never by
path, and uploads go to a private temporary folder. It binds to 127.0.0.1 by default, refuses
requests whose Host or Origin is not the server itself (DNS rebinding, cross-site posts), and
answers every error as ``{"error": "..."}`` with a readable message.

    python -m stmdit.app --pipeline outputs/demo/runs/ge/pipeline --data data/
"""

from __future__ import annotations

import argparse
import base64
import io
import itertools
import logging
import math
import os
import re
import shutil
import tempfile
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from stmdit.data.synthetic import MARKER_GENES
from stmdit.simulate import (
    Perturbation,
    load_expression_data,
    paired_change,
    paired_generate,
    perturb,
    start_state,
    tile_statistics,
)

logger = logging.getLogger(__name__)

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
# A marker programme with fewer than half its genes in the panel would not be that programme.
MIN_MARKER_SET_FRACTION = 0.5
# Uploads with more genes than any transcriptome would only be a way to exhaust memory.
MAX_UPLOAD_GENES = 60_000
# Requests other than uploads carry a few hundred bytes of JSON.
MAX_JSON_BYTES = 64 * 1024
# Tiles are shown at least this large, enlarged by an integer factor with nearest neighbours
# so that every generated pixel stays a crisp square.
DISPLAY_MIN_PX = 256

MEASUREMENTS = {
    "haematoxylin": "Haematoxylin density (nuclei)",
    "eosin": "Eosin density (cytoplasm, stroma)",
    "brown": "Brown pigment density (melanin)",
    "nuclei_per_100px2": "Nuclei per 100 × 100 px",
}


class AppError(Exception):
    """An error the user can act on: its message is shown on the page as it is."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


# -- requests ------------------------------------------------------------------------------


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
    """What the Generate button sends; every field is checked before anything is computed."""

    model_config = ConfigDict(extra="forbid", strict=True)

    dataset: str = Field(min_length=1, max_length=MAX_NAME_LENGTH)
    sample: str = Field(min_length=1, max_length=MAX_NAME_LENGTH)
    spot: str | None = Field(None, max_length=MAX_NAME_LENGTH)
    start: Literal["spot", "sample"] = "spot"
    changes: list[GeneChange] = Field(default_factory=list, max_length=MAX_CHANGES)
    guidance_ge: float = Field(2.0, ge=0.0, le=GUIDANCE_MAX, allow_inf_nan=False)
    guidance_morph: float = Field(1.5, ge=0.0, le=GUIDANCE_MAX, allow_inf_nan=False)
    use_morphology: bool = False
    seed: int = Field(0, ge=0, le=SEED_MAX)
    n_seeds: int = Field(2, ge=1, le=MAX_SEEDS)
    steps: int | None = Field(None, ge=1, le=MAX_STEPS)


# -- datasets ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    """A selectable dataset: where it is and where it came from (the data folder or an upload)."""

    path: Path
    origin: Literal["data folder", "upload"]
    has_tiles: bool


@dataclass
class _Dataset:
    """A loaded dataset, reduced to what the page offers: spots by sample, and the genes and
    gene sets that the model's panel can see (changing any other gene changes nothing)."""

    adata: ad.AnnData
    tiles: object | None
    tile_rows: np.ndarray
    spots_by_sample: dict[str, list[str]]
    genes: dict[str, str]  # upper-case symbol -> the dataset's spelling, panel genes only
    dataset_genes: frozenset[str]  # upper-case symbols of every gene of the dataset
    gene_sets: dict[str, dict]
    panel_found: int


def _counts_problem(adata: ad.AnnData) -> str | None:
    """Why ``adata`` has no usable counts (layers['counts'] or X), or None when it has."""
    where = "layers['counts']" if "counts" in adata.layers else "X"
    x = adata.layers["counts"] if "counts" in adata.layers else adata.X
    if x is None:
        return "it has no counts: neither layers['counts'] nor X is present"
    values = x.data if sp.issparse(x) else np.asarray(x)
    if values.dtype == bool or not np.issubdtype(values.dtype, np.number):
        return f"{where} is not numeric (dtype {values.dtype}); expected counts"
    if not np.isfinite(values).all():
        return f"{where} has NaN or infinite values; counts must be finite"
    if (values < 0).any():
        return f"{where} has negative values: it looks normalised or scaled, not raw counts"
    return None


def _repeated(names: pd.Index) -> list[str]:
    return [str(n) for n in names[names.duplicated()].unique()[:5]]


def _stored_n_obs(f: h5py.File) -> int | None:
    """The number of spots an .h5ad declares, read without loading it."""
    obs = f.get("obs")
    if isinstance(obs, h5py.Dataset):  # the old compound-table layout
        return obs.shape[0]
    if isinstance(obs, h5py.Group):
        index = obs.get(str(obs.attrs.get("_index", "_index")))
        if isinstance(index, h5py.Dataset):
            return index.shape[0]
    return None


def _inspect_h5ad(path: Path, max_spots: int) -> None:
    """Refuse, before loading it, a file that is not HDF5, reaches into other files (external
    links, virtual datasets: the app would read them for the uploader) or has too many spots."""
    if not h5py.is_hdf5(path):
        raise AppError(400, "the file is not an .h5ad file (AnnData saved with write_h5ad)")
    try:
        with h5py.File(path, "r") as f:
            outside: list[str] = []

            def external_link(name, info):
                if info.type == h5py.h5l.TYPE_EXTERNAL:
                    outside.append(name.decode(errors="replace"))
                    return 1
                return None

            def virtual_dataset(name, obj):
                if isinstance(obj, h5py.Dataset) and obj.is_virtual:
                    outside.append(name)
                    return 1
                return None

            f.id.links.visit(external_link, info=True)
            f.visititems(virtual_dataset)
            n_obs = _stored_n_obs(f)
    except OSError as err:
        raise AppError(400, f"the file cannot be read as HDF5 ({err})") from None
    if outside:
        raise AppError(
            400, f"the file refers to data in other files ({outside[0]}); save it as a self-contained .h5ad"
        )
    if n_obs is None:
        raise AppError(400, "the file has no obs table: it is HDF5 but not an AnnData .h5ad")
    if n_obs > max_spots:
        raise AppError(413, f"the file has {n_obs} spots; this server accepts at most {max_spots} per upload")


class _Datasets:
    """The selectable datasets: prepared datasets (folders with manifest.json) and .h5ad files
    directly inside the data folder, and uploads. Names are looked up in this listing only,
    so no request can name a path. Loaded datasets are cached (a few at a time)."""

    def __init__(
        self,
        data_dir: Path,
        upload_dir: Path,
        panel: list[str],
        gene_sets: dict[str, list[str]],
        min_panel_fraction: float,
        max_spots: int,
        max_uploads: int,
        cache_size: int = 4,
    ):
        self.data_dir = data_dir.resolve()
        self.upload_dir = upload_dir
        self.panel = panel
        self.user_gene_sets = gene_sets
        self.min_panel_fraction = min_panel_fraction
        self.max_spots = max_spots
        self.max_uploads = max_uploads
        self.cache_size = cache_size
        self._uploads: OrderedDict[str, _Source] = OrderedDict()
        self._upload_ids = itertools.count(1)
        self._cache: OrderedDict[tuple, _Dataset] = OrderedDict()
        self._lock = threading.Lock()  # guards the upload listing and the cache
        self._load_lock = threading.Lock()  # one dataset read at a time; the next request finds it cached

    def listing(self) -> dict[str, _Source]:
        """Name -> source, the data folder scanned afresh (new files appear without a restart)."""
        found: dict[str, _Source] = {}
        for entry in sorted(self.data_dir.iterdir()):
            if entry.name.startswith("."):
                continue
            if not entry.resolve().is_relative_to(self.data_dir):
                logger.warning("%s points outside the data folder %s; not offered", entry, self.data_dir)
                continue
            if entry.is_dir() and (entry / "manifest.json").is_file():
                found[entry.name] = _Source(entry, "data folder", (entry / "tiles.zarr").exists())
            elif entry.is_file() and entry.suffix == ".h5ad":
                found[entry.name] = _Source(entry, "data folder", False)
        with self._lock:
            found.update(self._uploads)
        return found

    def get(self, name: str) -> _Dataset:
        source = self.listing().get(name)
        if source is None:
            raise AppError(404, f"unknown dataset {name!r}: choose one of the datasets the page lists")
        return self._load(name, source)

    def _load(self, name: str, source: _Source) -> _Dataset:
        key = (source.path, source.path.stat().st_mtime_ns)
        with self._load_lock:
            with self._lock:
                if key in self._cache:
                    self._cache.move_to_end(key)
                    return self._cache[key]
            try:
                adata, tiles, _ = load_expression_data(source.path)
            except Exception as err:
                logger.exception("cannot read dataset %s", source.path)
                raise AppError(
                    400, f"dataset {name!r} cannot be read ({type(err).__name__}); see the server's log"
                ) from None
            dataset = self._prepare(f"dataset {name!r}", adata, tiles)
            self._remember(key, dataset)
            return dataset

    def _remember(self, key: tuple, dataset: _Dataset) -> None:
        with self._lock:
            self._cache[key] = dataset
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    def _prepare(self, label: str, adata: ad.AnnData, tiles) -> _Dataset:
        """Keep the spots with tissue; check the counts and the overlap with the panel.
        ``label`` names the data in messages ("dataset 'x'", "the uploaded file")."""
        rows = np.arange(adata.n_obs)
        if "keep" in adata.obs:  # prepared datasets mark background (glass) spots
            rows = np.flatnonzero(adata.obs["keep"].to_numpy(dtype=bool))
            adata = adata[rows].copy()
        if adata.n_obs == 0:
            problem = "it has no spots"
        elif _repeated(adata.obs_names):
            problem = (
                f"its spot names (obs_names) repeat, e.g. {_repeated(adata.obs_names)}; make them unique"
            )
        elif _repeated(adata.var_names):
            problem = (
                f"its gene names (var_names) repeat, e.g. {_repeated(adata.var_names)}; make them unique"
            )
        else:
            problem = _counts_problem(adata)
        if problem:
            raise AppError(400, f"{label} cannot be used: {problem}")
        var = {str(g).upper(): str(g) for g in adata.var_names}
        genes = {g.upper(): var[g.upper()] for g in self.panel if g.upper() in var}
        needed = math.ceil(self.min_panel_fraction * len(self.panel))
        if len(genes) < needed:
            raise AppError(
                400,
                f"{label} shares only {len(genes)} of the model's {len(self.panel)} panel genes (at least "
                f"{needed} needed). The panel has e.g. {', '.join(self.panel[:4])}; the data has e.g. "
                f"{', '.join(list(var.values())[:4])}: gene names must be symbols of the same species.",
            )
        samples = adata.obs["sample_id"].astype(str) if "sample_id" in adata.obs else "all spots"
        adata.obs["sample_id"] = samples
        spots_by_sample = {
            str(s): [str(n) for n in adata.obs_names[idx]]
            for s, idx in adata.obs.groupby("sample_id", observed=True).indices.items()
        }
        return _Dataset(
            adata, tiles, rows, spots_by_sample, genes, frozenset(var), self._gene_sets(genes), len(genes)
        )

    def _gene_sets(self, genes: dict[str, str]) -> dict[str, dict]:
        """The simulator's marker programmes whose genes the panel has, then the user's sets."""
        sets = {}
        candidates = [
            (f"{cell_type} markers", members, "marker programme")
            for cell_type, members in MARKER_GENES.items()
        ]
        candidates += [(name, members, "user") for name, members in self.user_gene_sets.items()]
        for name, members, origin in candidates:
            present = list(dict.fromkeys(genes[g.upper()] for g in members if g.upper() in genes))
            needed = MIN_MARKER_SET_FRACTION * len(members) if origin == "marker programme" else 1
            if present and len(present) >= needed:
                sets[name] = {"genes": present, "n_defined": len(members), "origin": origin}
        return sets

    def add_upload(self, path: Path, filename: str) -> tuple[str, _Dataset]:
        """Validate an uploaded file and make it selectable; the oldest uploads make room."""
        try:
            _inspect_h5ad(path, self.max_spots)
            try:
                adata = ad.read_h5ad(path)
            except Exception as err:
                raise AppError(400, f"the file cannot be read as AnnData ({type(err).__name__})") from None
            if adata.n_vars > MAX_UPLOAD_GENES:
                raise AppError(
                    413, f"the file has {adata.n_vars} genes; at most {MAX_UPLOAD_GENES} are accepted"
                )
            dataset = self._prepare("the uploaded file", adata, None)
        except Exception:
            path.unlink(missing_ok=True)
            raise
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(filename).stem)[:60] or "upload"
        source = _Source(path, "upload", False)
        self._remember((path, path.stat().st_mtime_ns), dataset)
        with self._lock:
            name = f"upload {next(self._upload_ids)}: {stem}"
            self._uploads[name] = source
            while len(self._uploads) > self.max_uploads:
                _, old = self._uploads.popitem(last=False)
                old.path.unlink(missing_ok=True)
                for key in [k for k in self._cache if k[0] == old.path]:
                    del self._cache[key]
        return name, dataset

    def new_upload_path(self) -> Path:
        fd, name = tempfile.mkstemp(suffix=".h5ad", dir=self.upload_dir)
        os.close(fd)
        return Path(name)


# -- generation ----------------------------------------------------------------------------


def _png_data_url(image: np.ndarray) -> str:
    """A tile (H, W, 3) in [0, 1] or uint8 as a PNG data URL, enlarged with nearest neighbours."""
    u8 = image if image.dtype == np.uint8 else (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    h, w = u8.shape[:2]
    factor = max(1, DISPLAY_MIN_PX // max(h, w))
    picture = Image.fromarray(u8).resize((w * factor, h * factor), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _plural(noun: str, names: list[str]) -> str:
    return f"{noun}{'s' if len(names) > 1 else ''} {', '.join(names)}"


def _perturbations(changes: list[GeneChange], dataset: _Dataset, dataset_name: str) -> list[Perturbation]:
    """The page's sliders as simulate.Perturbations, or an error naming every unknown gene and set."""
    not_in_data, not_in_panel, unknown_sets = [], [], []
    for change in changes:
        if change.gene is not None and change.gene.upper() not in dataset.genes:
            (not_in_panel if change.gene.upper() in dataset.dataset_genes else not_in_data).append(
                change.gene
            )
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
    perturbations, touched = [], set()
    for change in changes:
        genes = [dataset.genes[change.gene.upper()]] if change.gene else []
        touched.update(genes or dataset.gene_sets[change.gene_set]["genes"])
        if change.knockout:
            perturbations.append(Perturbation(genes=genes, gene_set=change.gene_set, mode="knockout"))
        elif change.log2_fold_change != 0:
            perturbations.append(
                Perturbation(genes=genes, gene_set=change.gene_set, value=2.0**change.log2_fold_change)
            )
    if len(touched) > MAX_GENES_CHANGED:
        raise AppError(
            400, f"this changes {len(touched)} genes; at most {MAX_GENES_CHANGED} can be changed at once"
        )
    return perturbations


class _Generator:
    """The loaded pipeline and the experiment: one generation at a time (the lock), since a
    second would only halve the speed of the first and double the memory."""

    def __init__(self, pipe, steps: int):
        self.pipe = pipe
        self.steps = steps
        self._lock = threading.Lock()

    def run(self, request: GenerateRequest, datasets: _Datasets) -> dict:
        dataset = datasets.get(request.dataset)
        spots = dataset.spots_by_sample.get(request.sample)
        if spots is None:
            raise AppError(404, f"unknown sample {request.sample!r} in dataset {request.dataset!r}")
        if request.start == "spot" and (request.spot is None or request.spot not in spots):
            raise AppError(
                404, f"unknown spot {request.spot!r} in sample {request.sample!r}: choose a listed spot"
            )
        perturbations = _perturbations(request.changes, dataset, request.dataset)
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
        changed = perturb(control, perturbations, gene_sets=gene_sets) if perturbations else control.copy()
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
        stats = tile_statistics(tiles.reshape(-1, *tiles.shape[2:]))
        measurements = []
        for key, label in MEASUREMENTS.items():
            values = stats[key].reshape(2, len(seeds))
            change = paired_change(values[1], values[0])
            perturbed_sd = float(np.std(values[1], ddof=1)) if len(seeds) > 1 else 0.0
            measurements.append(
                {
                    "key": key,
                    "label": label,
                    "control": values[0].tolist(),
                    "perturbed": values[1].tolist(),
                    "perturbed_mean": float(values[1].mean()),
                    "perturbed_seed_sd": perturbed_sd,
                    **change,
                }
            )
        return {
            "start_state": str(control.obs["state"].iloc[0]),
            "n_spots_averaged": int(control.obs["n_spots"].iloc[0]),
            "perturbation": "; ".join(p.describe() for p in perturbations)
            or "no change (the control, repeated)",
            "seeds": seeds,
            "steps": steps,
            "guidance_ge": request.guidance_ge,
            "guidance_morph": request.guidance_morph,
            "pairs": [
                {"seed": s, "control": _png_data_url(tiles[0, i]), "perturbed": _png_data_url(tiles[1, i])}
                for i, s in enumerate(seeds)
            ],
            "real_tile": _png_data_url(real) if real is not None else None,
            "morphology": {
                "available": dataset.tiles is not None and self.pipe.morphology_encoder is not None,
                "used": morphology is not None,
                "note": note,
            },
            "panel": {"found": dataset.panel_found, "size": len(datasets.panel)},
            "measurements": measurements,
            "seconds": round(seconds, 2),
        }

    def _morphology(self, request: GenerateRequest, dataset: _Dataset, real: np.ndarray | None):
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
        return torch.from_numpy(real).permute(2, 0, 1)[None].float() / 255.0, "used (the spot's real tile)"


# -- the application -----------------------------------------------------------------------


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


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


class _Guard:
    """ASGI middleware: only this server's own Host and Origin, bodies within their size
    limit (counted while they arrive, whatever the headers say), and any unexpected exception
    answered as a short JSON error, logged here with its traceback."""

    def __init__(self, app, allowed_hosts: set[str], max_upload_bytes: int):
        self.app = app
        self.allowed_hosts = allowed_hosts
        self.max_upload_bytes = max_upload_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if (urlsplit("//" + headers.get("host", "")).hostname or "") not in self.allowed_hosts:
            return await _error(403, "requests must address this server as localhost")(scope, receive, send)
        origin = headers.get("origin")
        if origin and urlsplit(origin).hostname not in self.allowed_hosts:  # "null" (sandboxed pages) too
            return await _error(403, "requests from other web sites are refused")(scope, receive, send)
        upload = scope["path"] == "/api/upload"
        # Multipart framing adds a few hundred bytes to the file itself.
        limit = self.max_upload_bytes + MAX_JSON_BYTES if upload else MAX_JSON_BYTES
        too_large = _error(
            413,
            f"the upload is larger than the {self.max_upload_bytes / 2**20:g} MB limit"
            if upload
            else "the request is too large",
        )
        if headers.get("content-length", "").isdigit() and int(headers["content-length"]) > limit:
            return await too_large(scope, receive, send)
        received, started = 0, False

        async def counted_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise _BodyTooLarge
            return message

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except _BodyTooLarge:
            if not started:
                await too_large(scope, receive, send)
        except Exception:
            logger.exception("unexpected error serving %s %s", scope.get("method"), scope["path"])
            if not started:
                message = "unexpected server error; the details are in the server's log"
                await _error(500, message)(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


def create_app(
    pipeline_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    gene_sets: Mapping[str, Sequence[str]] | None = None,
    max_upload_mb: float = 50,
    max_spots: int = 5000,
    min_panel_fraction: float = 0.5,
    max_uploads: int = 8,
    steps: int = 20,
    device: str | None = None,
    allowed_hosts: Sequence[str] = ("127.0.0.1", "localhost", "::1"),
) -> FastAPI:
    """The web app for ``pipeline_dir`` (loaded once, here) over the datasets in ``data_dir``.

    ``gene_sets`` adds named gene lists to the simulator's marker programmes; ``max_upload_mb``,
    ``max_spots`` and ``min_panel_fraction`` (of the GE encoder's panel that an upload must
    share) bound uploads, of which the newest ``max_uploads`` stay selectable; ``steps`` is the
    default number of sampling steps; ``allowed_hosts`` the names the browser may use for the
    server (add the host name when serving beyond localhost).
    """
    from stmdit.pipeline import STMDiTPipeline

    if not (Path(pipeline_dir) / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{pipeline_dir} is not a pipeline folder (no model_index.json); train one, or run stmdit demo"
        )
    data_root = Path(data_dir)
    if not data_root.is_dir():
        raise FileNotFoundError(f"data folder {data_root} does not exist")
    if not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"steps must be in [1, {MAX_STEPS}]; got {steps}")
    pipe = STMDiTPipeline.from_pretrained(str(pipeline_dir))
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if pipe.ge_encoder is None or not pipe.transformer.has_ge:
        raise ValueError(
            f"{pipeline_dir} was trained without gene expression; virtual experiments need a GE model"
        )
    panel = [str(g) for g in pipe.ge_encoder.genes]
    upload_dir = Path(tempfile.mkdtemp(prefix="stmdit-uploads-"))  # mode 0700: private to this user
    datasets = _Datasets(
        data_root,
        upload_dir,
        panel,
        {str(k): [str(g) for g in v] for k, v in (gene_sets or {}).items()},
        min_panel_fraction,
        max_spots,
        max_uploads,
    )
    generator = _Generator(pipe, steps)
    max_upload_bytes = int(max_upload_mb * 2**20)

    @asynccontextmanager
    async def lifespan(_app):
        yield
        shutil.rmtree(upload_dir, ignore_errors=True)

    app = FastAPI(
        title="STMDiT virtual experiments", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.add_middleware(_Guard, allowed_hosts=set(allowed_hosts), max_upload_bytes=max_upload_bytes)

    @app.exception_handler(AppError)
    async def app_error(_request, err: AppError):
        return _error(err.status, err.message)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request, err: RequestValidationError):
        return _error(422, _validation_message(err))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, err: StarletteHTTPException):
        return _error(err.status_code, str(err.detail))

    @app.get("/", response_class=HTMLResponse)
    def page():
        csp = (
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:; "
            "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
        )
        return HTMLResponse(
            _PAGE,
            headers={
                "Content-Security-Policy": csp,
                "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "no-referrer",
            },
        )

    @app.get("/api/health")
    def health():
        return {"status": "ok"}

    @app.get("/api/config")
    def config():
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
                **{
                    k: GenerateRequest.model_fields[k].default
                    for k in ("guidance_ge", "guidance_morph", "seed", "n_seeds")
                },
                "steps": steps,
            },
            "upload": {
                "max_mb": max_upload_mb,
                "max_spots": max_spots,
                "min_panel_fraction": min_panel_fraction,
            },
            "model": {"panel_genes": len(panel), "morphology_encoder": pipe.morphology_encoder is not None},
        }

    @app.get("/api/datasets")
    def list_datasets():
        return {
            "datasets": [
                {"name": name, "origin": s.origin, "tiles": s.has_tiles}
                for name, s in datasets.listing().items()
            ]
        }

    @app.get("/api/samples")
    def list_samples(dataset: str = Query(max_length=MAX_NAME_LENGTH)):
        ds = datasets.get(dataset)
        return {
            "samples": [{"name": s, "n_spots": len(spots)} for s, spots in ds.spots_by_sample.items()],
            "tiles": ds.tiles is not None,
        }

    @app.get("/api/spots")
    def list_spots(
        dataset: str = Query(max_length=MAX_NAME_LENGTH), sample: str = Query(max_length=MAX_NAME_LENGTH)
    ):
        spots = datasets.get(dataset).spots_by_sample.get(sample)
        if spots is None:
            raise AppError(404, f"unknown sample {sample!r} in dataset {dataset!r}")
        return {"spots": spots}

    @app.get("/api/genes")
    def list_genes(dataset: str = Query(max_length=MAX_NAME_LENGTH)):
        ds = datasets.get(dataset)
        return {
            "genes": sorted(ds.genes.values(), key=str.upper),
            "panel_size": len(panel),
            "panel_found": ds.panel_found,
        }

    @app.get("/api/gene-sets")
    def list_gene_sets(dataset: str = Query(max_length=MAX_NAME_LENGTH)):
        return {
            "gene_sets": [{"name": name, **info} for name, info in datasets.get(dataset).gene_sets.items()]
        }

    @app.post("/api/generate")
    def generate(request: GenerateRequest):
        return generator.run(request, datasets)

    @app.post("/api/upload")
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
                raise AppError(413, f"the upload is larger than the {max_upload_mb:g} MB limit")
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

    return app


def load_gene_sets(path: str | os.PathLike) -> dict[str, list[str]]:
    """Gene sets from a YAML (or JSON, a subset of YAML) file mapping set names to lists of gene symbols."""
    import yaml

    sets = yaml.safe_load(Path(path).read_text())
    if not isinstance(sets, dict) or not all(
        isinstance(v, list) and all(isinstance(g, str) for g in v) for v in sets.values()
    ):
        raise ValueError(
            f"{path}: gene sets must map names to lists of gene symbols, "
            "e.g. {proliferation: [MKI67, TOP2A]}"
        )
    return {str(k): v for k, v in sets.items()}


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
    import uvicorn

    if cpu_threads is not None:
        torch.set_num_threads(cpu_threads)

    loopback = host in ("127.0.0.1", "localhost", "::1")
    if not loopback:
        logger.warning(
            "serving on %s: the app has no login, so anyone who can reach this address can use it", host
        )
        options.setdefault("allowed_hosts", ("127.0.0.1", "localhost", "::1", host))
    app = create_app(pipeline_dir, data_dir, gene_sets=gene_sets, **options)
    uvicorn.run(app, host=host, port=port, log_level="info")


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m stmdit.app``: the same as ``stmdit serve``."""
    parser = argparse.ArgumentParser(prog="python -m stmdit.app", description=serve.__doc__)
    parser.add_argument(
        "--pipeline", required=True, help="pipeline folder (as written by training or stmdit demo)"
    )
    parser.add_argument("--data", required=True, help="folder of .h5ad files and prepared datasets")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--gene-sets", help="YAML or JSON file: set name -> list of gene symbols")
    parser.add_argument("--steps", type=int, default=20, help="default sampling steps")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--max-upload-mb", type=float, default=50)
    parser.add_argument("--max-spots", type=int, default=5000, help="most spots an upload may have")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    serve(
        args.pipeline,
        args.data,
        host=args.host,
        port=args.port,
        gene_sets=load_gene_sets(args.gene_sets) if args.gene_sets else None,
        steps=args.steps,
        cpu_threads=args.threads or None,
        max_upload_mb=args.max_upload_mb,
        max_spots=args.max_spots,
    )


_PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>STMDiT · virtual tissue experiments</title>
<style>
  :root {
    --ink: #1d2030; --muted: #5f6577; --line: #dde0e8; --bg: #f4f5f8; --card: #fff;
    --accent: #6b2f86; --err: #a8231b; --err-bg: #fdeceb; --up: #1f6f43; --down: #1d4f9a;
  }
  * { box-sizing: border-box; }
  body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
         color: var(--ink); background: var(--bg); }
  header { background: #2b1d3a; color: #fff; padding: 12px 24px; display: flex; flex-wrap: wrap;
           align-items: baseline; gap: 18px; }
  header h1 { font-size: 18px; margin: 0; font-weight: 600; letter-spacing: .2px; }
  header .sub { color: #d7c9e4; font-size: 13px; }
  main { display: grid; grid-template-columns: minmax(320px, 380px) 1fr; gap: 20px; padding: 20px 24px;
         align-items: start; }
  @media (max-width: 900px) { main { grid-template-columns: 1fr; } }
  .card { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 14px 16px;
          margin-bottom: 14px; }
  .card h2 { font-size: 13px; text-transform: uppercase; letter-spacing: .6px; color: var(--accent);
             margin: 0 0 10px; }
  label.field { display: block; margin: 8px 0 3px; font-weight: 600; font-size: 13px; }
  select, input[type=text], input[type=number] { width: 100%; padding: 6px 8px; border: 1px solid #c9cdd8;
          border-radius: 5px; font: inherit; background: #fff; color: inherit; }
  input[type=range] { width: 100%; accent-color: var(--accent); }
  .hint, .muted { color: var(--muted); font-size: 12.5px; }
  .row { display: flex; gap: 10px; align-items: center; }
  .row > * { flex: 1; }
  .radio { display: flex; gap: 14px; margin-top: 4px; }
  .radio label, label.check { font-weight: normal; display: inline-flex; gap: 5px; align-items: center; }
  details { margin-top: 10px; border-top: 1px dashed var(--line); padding-top: 8px; }
  summary { cursor: pointer; color: var(--accent); font-weight: 600; font-size: 13px; }
  button { font: inherit; border-radius: 5px; border: 1px solid #c9cdd8; background: #fff; padding: 6px 12px;
           cursor: pointer; color: inherit; }
  button:hover { border-color: var(--accent); }
  button.primary { background: var(--accent); color: #fff; border-color: var(--accent); width: 100%;
                   padding: 10px; font-size: 15px; font-weight: 600; margin-top: 12px; }
  button.primary:disabled { opacity: .6; cursor: progress; }
  button.remove { border: none; color: var(--muted); padding: 0 4px; font-size: 16px; line-height: 1; }
  .change { padding: 7px 0 4px; border-bottom: 1px solid #eef0f4; }
  .change:last-child { border-bottom: none; }
  .change .head, .change .controls { display: flex; gap: 10px; align-items: center; }
  .change .name { flex: 1; font-weight: 600; }
  .change .name small { color: var(--muted); font-weight: normal; }
  .change .controls input[type=range] { flex: 1; }
  .change output { flex: 0 0 128px; white-space: nowrap; text-align: right; font-size: 12.5px;
                   font-variant-numeric: tabular-nums; color: var(--muted); }
  .change.off output { color: #b5b8c2; }
  .change.active output { color: var(--accent); font-weight: 600; }
  .change.ko output { color: var(--err); font-weight: 600; }
  .empty { color: var(--muted); font-style: italic; padding: 4px 0; }
  #error { background: var(--err-bg); color: var(--err); border: 1px solid #f1b7b2; border-radius: 8px;
           padding: 10px 14px; margin-bottom: 14px; white-space: pre-wrap; font-weight: 500; }
  #status { color: var(--muted); margin-bottom: 10px; min-height: 20px; }
  .summary { display: grid; grid-template-columns: max-content 1fr; gap: 3px 12px; margin: 0 0 14px; }
  .summary dt { color: var(--muted); }
  .summary dd { margin: 0; font-weight: 500; }
  .tiles { display: flex; flex-wrap: wrap; gap: 14px; }
  .pair { background: #fafafc; border: 1px solid var(--line); border-radius: 8px; padding: 8px 10px 10px; }
  .pair h3 { margin: 0 0 6px; font-size: 13px; font-weight: 600; }
  .pair .two { display: flex; gap: 8px; }
  figure { margin: 0; text-align: center; }
  figcaption { font-size: 12px; color: var(--muted); margin-top: 3px; }
  img.tile { display: block; width: 168px; height: 168px; image-rendering: pixelated; border-radius: 4px;
             border: 1px solid #cfd3dc; background: #fff; }
  .real { margin-bottom: 14px; display: flex; gap: 14px; align-items: center; }
  table { border-collapse: collapse; width: 100%; margin-top: 16px; font-variant-numeric: tabular-nums; }
  th, td { text-align: left; padding: 6px 10px; border-bottom: 1px solid var(--line); }
  th { font-size: 12px; text-transform: uppercase; letter-spacing: .4px; color: var(--muted);
       font-weight: 600; }
  td.num { text-align: right; white-space: nowrap; }
  td.up { color: var(--up); font-weight: 600; }
  td.down { color: var(--down); font-weight: 600; }
  .placeholder { color: var(--muted); max-width: 640px; }
  .busy::after { content: ""; display: inline-block; width: 12px; height: 12px; margin-left: 8px;
                 vertical-align: -1px; border: 2px solid var(--accent); border-right-color: transparent;
                 border-radius: 50%; animation: spin .8s linear infinite; }
  @keyframes spin { to { transform: rotate(360deg); } }
</style>
</head>
<body>
<header>
  <h1>STMDiT · virtual tissue experiments</h1>
  <span class="sub">What would this tissue look like if these genes changed? Same noise, two expression
    states.</span>
</header>
<main>
  <aside>
    <section class="card" aria-labelledby="h-tissue">
      <h2 id="h-tissue">1 · Tissue</h2>
      <label class="field" for="dataset">Dataset</label>
      <select id="dataset"></select>
      <div id="coverage" class="hint"></div>
      <label class="field" for="sample">Sample</label>
      <select id="sample"></select>
      <label class="field" for="spot">Spot</label>
      <div class="row">
        <input id="spot-filter" type="text" placeholder="filter spots" aria-label="filter spots">
        <select id="spot"></select>
      </div>
      <label class="field">Start from</label>
      <div class="radio" role="radiogroup">
        <label><input type="radio" name="start" value="spot" checked> this spot</label>
        <label><input type="radio" name="start" value="sample"> mean of its sample</label>
      </div>
      <div id="morph-row" hidden>
        <label class="check" style="margin-top:8px"><input type="checkbox" id="use-morphology">
          also condition on the real tile's morphology</label>
      </div>
      <details>
        <summary>Upload an .h5ad</summary>
        <p class="hint" id="upload-hint"></p>
        <input type="file" id="upload-file" accept=".h5ad" aria-label="h5ad file to upload">
        <button id="upload-button" type="button" style="margin-top:6px">Upload</button>
      </details>
    </section>
    <section class="card" aria-labelledby="h-change">
      <h2 id="h-change">2 · Expression change</h2>
      <div class="hint">Sliders set the log2 fold change (0 = unchanged, +1 = doubled, −1 = halved).</div>
      <label class="field">Gene programmes</label>
      <div id="gene-sets"></div>
      <label class="field" for="gene-input">Genes</label>
      <div class="row">
        <input id="gene-input" type="text" list="gene-list" placeholder="e.g. MKI67" autocomplete="off">
        <button id="add-gene" type="button" style="flex:0 0 auto">Add</button>
      </div>
      <datalist id="gene-list"></datalist>
      <div id="genes"></div>
      <button id="reset" type="button" style="margin-top:8px">Reset all changes</button>
    </section>
    <section class="card" aria-labelledby="h-sampling">
      <h2 id="h-sampling">3 · Sampling</h2>
      <label class="field" for="guidance-ge">Expression guidance
        <output id="guidance-ge-out"></output></label>
      <input type="range" id="guidance-ge" min="0" step="0.5">
      <label class="field" for="guidance-morph">Morphology guidance
        <output id="guidance-morph-out"></output></label>
      <input type="range" id="guidance-morph" min="0" step="0.5">
      <div class="row">
        <div><label class="field" for="seed">First seed</label>
          <input type="number" id="seed" min="0" step="1"></div>
        <div><label class="field" for="n-seeds">Seeds</label><select id="n-seeds"></select></div>
        <div><label class="field" for="steps">Steps</label>
          <input type="number" id="steps" min="1" step="1"></div>
      </div>
      <button id="generate" class="primary" type="button">Generate</button>
    </section>
  </aside>
  <section aria-live="polite">
    <div id="error" role="alert" hidden></div>
    <div id="status"></div>
    <div id="results">
      <p class="placeholder">Choose a spot, set the expression change and press <b>Generate</b>. For
      every seed the model draws a <b>control</b> tile from the unchanged expression and a <b>perturbed</b>
      tile from the changed one, from the same noise: the difference between the two is due to the
      expression change alone.</p>
    </div>
  </section>
</main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const state = { config: null, datasets: [], spots: [], genes: new Map() };

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (value === true) node.setAttribute(key, "");
    else if (value !== false && value !== null && value !== undefined) node.setAttribute(key, value);
  }
  node.append(...children);
  return node;
}

async function api(path, options) {
  let response;
  try {
    response = await fetch(path, options);
  } catch (err) {
    throw new Error("The server cannot be reached. Is stmdit serve still running?");
  }
  let body = null;
  try { body = await response.json(); } catch (err) { body = null; }
  if (!response.ok) {
    const fallback = `The server answered ${response.status} ${response.statusText}.`;
    throw new Error(body && typeof body.error === "string" ? body.error : fallback);
  }
  if (body === null) throw new Error("The server's answer could not be read.");
  return body;
}

function showError(message) {
  const box = $("error");
  box.textContent = message.charAt(0).toUpperCase() + message.slice(1);
  box.hidden = false;
}
function clearError() { $("error").hidden = true; $("error").textContent = ""; }
function setStatus(text, busy = false) {
  $("status").textContent = text;
  $("status").classList.toggle("busy", busy);
}
const guarded = (fn) => async (...args) => {
  try { await fn(...args); } catch (err) { showError(err.message); setStatus(""); }
};
const query = (params) => new URLSearchParams(params).toString();
const startMode = () => document.querySelector("input[name=start]:checked").value;
const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;

function fold(lfc) {
  const times = Math.pow(2, lfc);
  const sign = lfc > 0 ? "+" : lfc < 0 ? "−" : "±";
  const factor = times >= 10 ? times.toFixed(0) : times.toPrecision(2);
  return `log2 ${sign}${Math.abs(lfc).toFixed(2)} (×${factor})`;
}

function changeRow({ label, detail, kind, key, removable }) {
  const max = state.config.limits.log2_fold_change_max;
  const range = el("input", { type: "range", min: -max, max: max, step: 0.25, value: 0,
                              "aria-label": `log2 fold change of ${label}` });
  const out = el("output", { text: fold(0) });
  const ko = el("input", { type: "checkbox", "aria-label": `knock out ${label}` });
  const row = el("div", { class: "change off", "data-kind": kind, "data-key": key });
  const update = () => {
    const lfc = Number(range.value);
    range.disabled = ko.checked;
    out.textContent = ko.checked ? "knocked out" : fold(lfc);
    row.classList.toggle("ko", ko.checked);
    row.classList.toggle("active", !ko.checked && lfc !== 0);
    row.classList.toggle("off", !ko.checked && lfc === 0);
  };
  range.addEventListener("input", update);
  ko.addEventListener("change", update);
  const remove = removable
    ? el("button", { type: "button", class: "remove", title: `remove ${label}`,
                     "aria-label": `remove ${label}`, onclick: () => row.remove() }, "×")
    : "";
  const name = el("span", { class: "name" }, label, detail ? el("small", { text: ` ${detail}` }) : "");
  row.append(el("div", { class: "head" }, name, el("label", { class: "check" }, ko, "knock out"), remove),
             el("div", { class: "controls" }, range, out));
  return row;
}

function collectChanges() {
  const changes = [];
  for (const row of document.querySelectorAll(".change")) {
    const lfc = Number(row.querySelector("input[type=range]").value);
    const knockout = row.querySelector("input[type=checkbox]").checked;
    if (!knockout && lfc === 0) continue;
    const target = row.dataset.kind === "set" ? { gene_set: row.dataset.key } : { gene: row.dataset.key };
    changes.push({ ...target, log2_fold_change: lfc, knockout });
  }
  return changes;
}

async function loadConfig() {
  state.config = await api("/api/config");
  const { limits, defaults, upload, model } = state.config;
  const guidance = [["guidance-ge", defaults.guidance_ge], ["guidance-morph", defaults.guidance_morph]];
  for (const [id, value] of guidance) {
    const range = $(id);
    range.max = limits.guidance_max;
    range.value = value;
    const show = () => { $(id + "-out").textContent = Number(range.value).toFixed(1); };
    range.addEventListener("input", show);
    show();
  }
  $("seed").value = defaults.seed;
  $("seed").max = limits.seed_max;
  $("steps").value = defaults.steps;
  $("steps").max = limits.max_steps;
  $("n-seeds").replaceChildren(...Array.from({ length: limits.max_seeds }, (_, i) =>
    el("option", { value: i + 1, text: String(i + 1), selected: i + 1 === defaults.n_seeds })));
  $("upload-hint").textContent =
    "Raw counts in layers['counts'] or X, samples from obs['sample_id']; at most " +
    `${upload.max_mb} MB and ${upload.max_spots} spots, sharing at least ` +
    `${Math.round(upload.min_panel_fraction * 100)}% of the model's ${model.panel_genes} panel genes.`;
}

async function loadDatasets(select) {
  state.datasets = (await api("/api/datasets")).datasets;
  $("dataset").replaceChildren(...state.datasets.map((d) =>
    el("option", { value: d.name, text: d.name + (d.tiles ? " · with tiles" : "") })));
  if (!state.datasets.length) {
    showError("No datasets yet: put .h5ad files or prepared datasets in the data folder, or upload one.");
    return;
  }
  $("dataset").value = select || state.datasets[0].name;
  await onDataset();
}

async function onDataset() {
  clearError();
  const dataset = { dataset: $("dataset").value };
  const [samples, genes, sets] = await Promise.all([
    api("/api/samples?" + query(dataset)), api("/api/genes?" + query(dataset)),
    api("/api/gene-sets?" + query(dataset))]);
  $("coverage").textContent =
    `${genes.panel_found} of the model's ${genes.panel_size} panel genes are in this dataset.`;
  $("sample").replaceChildren(...samples.samples.map((s) =>
    el("option", { value: s.name, text: `${s.name} (${plural(s.n_spots, "spot")})` })));
  $("gene-list").replaceChildren(...genes.genes.map((g) => el("option", { value: g })));
  state.genes = new Map(genes.genes.map((g) => [g.toUpperCase(), g]));
  const setRows = sets.gene_sets.map((s) => changeRow({
    label: s.name, kind: "set", key: s.name,
    detail: `${s.genes.length < s.n_defined ? s.genes.length + "/" : ""}${plural(s.n_defined, "gene")}` }));
  const none = el("div", { class: "empty", text: "none in this panel" });
  $("gene-sets").replaceChildren(...(setRows.length ? setRows : [none]));
  for (const row of $("genes").querySelectorAll(".change")) {
    if (!state.genes.has(row.dataset.key.toUpperCase())) row.remove();
  }
  const morphology = samples.tiles && state.config.model.morphology_encoder;
  $("morph-row").hidden = !morphology;
  if (!morphology) $("use-morphology").checked = false;
  await onSample();
}

async function onSample() {
  const params = { dataset: $("dataset").value, sample: $("sample").value };
  state.spots = (await api("/api/spots?" + query(params))).spots;
  showSpots();
}

function showSpots() {
  const needle = $("spot-filter").value.trim().toLowerCase();
  const shown = needle ? state.spots.filter((s) => s.toLowerCase().includes(needle)) : state.spots;
  const previous = $("spot").value;
  $("spot").replaceChildren(...shown.map((s) => el("option", { value: s, text: s })));
  if (shown.includes(previous)) $("spot").value = previous;
}

function addGene() {
  const typed = $("gene-input").value.trim();
  if (!typed) return;
  const gene = state.genes.get(typed.toUpperCase());
  if (!gene) {
    showError(`Unknown gene ${typed}: it is not in the model's gene panel for this dataset. ` +
              "Pick one from the list.");
    return;
  }
  clearError();
  if (!$("genes").querySelector(`.change[data-key="${CSS.escape(gene)}"]`)) {
    $("genes").append(changeRow({ label: gene, kind: "gene", key: gene, removable: true }));
  }
  $("gene-input").value = "";
}

function resetChanges() {
  $("genes").replaceChildren();
  for (const row of document.querySelectorAll(".change")) {
    row.querySelector("input[type=range]").value = 0;
    const ko = row.querySelector("input[type=checkbox]");
    ko.checked = false;
    ko.dispatchEvent(new Event("change"));
  }
}

async function generate() {
  clearError();
  const body = {
    dataset: $("dataset").value, sample: $("sample").value, spot: $("spot").value || null,
    start: startMode(), changes: collectChanges(), use_morphology: $("use-morphology").checked,
    guidance_ge: Number($("guidance-ge").value), guidance_morph: Number($("guidance-morph").value),
    seed: Number($("seed").value), n_seeds: Number($("n-seeds").value), steps: Number($("steps").value),
  };
  $("generate").disabled = true;
  setStatus("Generating…", true);
  try {
    const result = await api("/api/generate", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    renderResult(result);
    setStatus(`Done in ${result.seconds.toFixed(result.seconds < 1 ? 2 : 1)} s.`);
  } finally {
    $("generate").disabled = false;
  }
}

const number = (v) => (Math.abs(v) >= 100 ? v.toFixed(0) : Math.abs(v) >= 1 ? v.toFixed(2) : v.toFixed(3));
const signed = (v) => (v > 0 ? "+" : v < 0 ? "−" : "") + number(Math.abs(v));

function tile(src, caption) {
  return el("figure", {}, el("img", { class: "tile", src: src, alt: caption }),
            el("figcaption", { text: caption }));
}

function renderResult(r) {
  const n = r.seeds.length;
  const summary = el("dl", { class: "summary" });
  const add = (term, value) => summary.append(el("dt", { text: term }), el("dd", { text: value }));
  const averaged = r.n_spots_averaged > 1 ? ` (mean of ${r.n_spots_averaged} spots)` : "";
  add("Start state", r.start_state + averaged);
  add("Change", r.perturbation);
  add("Real tile's morphology", r.morphology.note);
  add("Sampling", `${plural(n, "seed")} (${r.seeds.join(", ")}), ${r.steps} steps, ` +
                  `guidance: expression ${r.guidance_ge}, morphology ${r.guidance_morph}`);
  add("Gene panel", `${r.panel.found} of ${r.panel.size} panel genes measured in this dataset`);

  const parts = [summary];
  if (r.real_tile) {
    parts.push(el("div", { class: "real" }, tile(r.real_tile, "Real tile of the spot"),
      el("p", { class: "muted", text: "The measured tissue, for reference. The generated tiles are new " +
                                      "draws from the expression, not edits of this tile." })));
  }
  const pairs = el("div", { class: "tiles", id: "pairs" });
  for (const p of r.pairs) {
    pairs.append(el("div", { class: "pair" }, el("h3", { text: `Seed ${p.seed}` }),
      el("div", { class: "two" }, tile(p.control, "Control"), tile(p.perturbed, "Perturbed"))));
  }
  parts.push(pairs);

  const headings = ["Measured on the tiles", "Control", "Perturbed", "Change", "95% interval"];
  const table = el("table", { id: "measurements" },
                   el("thead", {}, el("tr", {}, ...headings.map((t) => el("th", { text: t })))));
  const tbody = el("tbody");
  const spread = (mean, sd) => (n > 1 ? `${number(mean)} ± ${number(sd)}` : number(mean));
  for (const m of r.measurements) {
    const sure = n > 1 && (m.ci_low > 0 || m.ci_high < 0);
    const direction = sure ? (m.mean_change > 0 ? " up" : " down") : "";
    const interval = n > 1 ? `${signed(m.ci_low)} … ${signed(m.ci_high)}` : "n/a (1 seed)";
    tbody.append(el("tr", {},
      el("td", { text: m.label }),
      el("td", { class: "num", text: spread(m.control_mean, m.control_seed_sd) }),
      el("td", { class: "num", text: spread(m.perturbed_mean, m.perturbed_seed_sd) }),
      el("td", { class: "num" + direction, text: signed(m.mean_change) }),
      el("td", { class: "num", text: interval })));
  }
  table.append(tbody);
  const note = `Control and perturbed: mean ± standard deviation over the ${plural(n, "seed")} (the ` +
    "seed-to-seed spread). Change: mean of the paired differences (perturbed − control) with a bootstrap " +
    "95% interval over seeds, coloured when the interval excludes zero. More seeds give a surer answer.";
  parts.push(table, el("p", { class: "muted", text: note }));
  $("results").replaceChildren(...parts);
}

async function upload() {
  clearError();
  const file = $("upload-file").files[0];
  if (!file) { showError("Choose an .h5ad file to upload first."); return; }
  const form = new FormData();
  form.append("file", file);
  setStatus(`Uploading ${file.name}…`, true);
  const result = await api("/api/upload", { method: "POST", body: form });
  await loadDatasets(result.dataset);
  setStatus(`Uploaded ${result.dataset}: ${plural(result.n_spots, "spot")}, ` +
            `${result.panel_found} of ${result.panel_size} panel genes.`);
}

$("dataset").addEventListener("change", guarded(onDataset));
$("sample").addEventListener("change", guarded(onSample));
$("spot-filter").addEventListener("input", showSpots);
$("add-gene").addEventListener("click", addGene);
$("gene-input").addEventListener("keydown", (e) => { if (e.key === "Enter") addGene(); });
$("reset").addEventListener("click", resetChanges);
$("generate").addEventListener("click", guarded(generate));
$("upload-button").addEventListener("click", guarded(upload));
for (const radio of document.querySelectorAll("input[name=start]")) {
  radio.addEventListener("change", () => {
    const fromSpot = startMode() === "spot";
    $("use-morphology").disabled = !fromSpot;
    if (!fromSpot) $("use-morphology").checked = false;
  });
}
guarded(async () => { await loadConfig(); await loadDatasets(); setStatus("Ready."); })();
</script>
</body>
</html>
"""

if __name__ == "__main__":
    main()
