"""The web app's datasets: the data folder's prepared datasets and .h5ad files, and uploads.

Names are looked up in the server's own listing only, so no request can name a path. Uploads
are inspected before anything is loaded (HDF5, self-contained, spots, and the size their
datasets take once decompressed), and only what the app needs is read from them: the counts,
obs and var.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import re
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata.io import read_elem

from stmdit.experiments.simulate import load_expression_data
from stmdit.genesets import gene_sets_in_panel

logger = logging.getLogger(__name__)

# Uploads with more genes than any transcriptome would only be a way to exhaust memory.
MAX_UPLOAD_GENES = 60_000
# An upload's datasets may take at most this many times the upload limit once decompressed:
# counts compress a few fold, so honest files stay well inside it, while a small file that
# decompresses into gigabytes (a compressed array of zeros) is refused before it is read.
MAX_DECOMPRESSION_FACTOR = 10


class AppError(Exception):
    """An error the user can act on: its message is shown on the page as it is."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Source:
    """A selectable dataset: where it is and where it came from (the data folder or an upload)."""

    path: Path
    origin: Literal["data folder", "upload"]
    has_tiles: bool


@dataclass
class Dataset:
    """A loaded dataset, reduced to what the page offers: spots by sample, and the genes and
    gene sets that the model's panel can see (changing any other gene changes nothing)."""

    adata: ad.AnnData
    tiles: object | None
    tile_um: float | None
    tile_rows: np.ndarray
    spots_by_sample: dict[str, list[str]]
    genes: dict[str, str]  # upper-case symbol -> the dataset's spelling, panel genes only
    dataset_genes: frozenset[str]  # upper-case symbols of every gene of the dataset
    gene_sets: dict[str, dict]
    panel_found: int


def counts_problem(adata: ad.AnnData) -> str | None:
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


def keep_mask(obs: pd.DataFrame) -> np.ndarray | None:
    """obs['keep'] (prepared datasets mark background spots False) as booleans, or None when
    there is no such column. Only real booleans or the numbers 0 and 1 are accepted: a string
    such as "no" would otherwise count as kept."""
    if "keep" not in obs:
        return None
    column = obs["keep"]
    values = column.astype(object) if isinstance(column.dtype, pd.CategoricalDtype) else column

    def valid(v) -> bool:
        if isinstance(v, (bool, np.bool_)):
            return True
        return isinstance(v, (int, float, np.integer, np.floating)) and v in (0, 1)

    bad = [v for v in pd.unique(values.to_numpy()) if not valid(v)]
    if bad:
        raise AppError(
            400,
            f"obs['keep'] must hold booleans (True/False) or 0/1; it has {bad[:3]!r} (dtype {column.dtype})",
        )
    return values.to_numpy().astype(bool)


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


def inspect_h5ad(path: Path, max_spots: int, max_uncompressed_bytes: int) -> None:
    """Refuse, before loading it, a file that is not HDF5, reaches into other files (external
    links, virtual datasets: the app would read them for the uploader), has too many spots, or
    whose datasets would take more than ``max_uncompressed_bytes`` once decompressed."""
    if not h5py.is_hdf5(path):
        raise AppError(400, "the file is not an .h5ad file (AnnData saved with write_h5ad)")
    outside: list[str] = []
    uncompressed = 0

    def external_link(name, info):
        if info.type == h5py.h5l.TYPE_EXTERNAL:
            outside.append(name.decode(errors="replace"))
            return 1
        return None

    def dataset(name, obj):
        nonlocal uncompressed
        if isinstance(obj, h5py.Dataset):
            if obj.is_virtual:
                outside.append(name)
                return 1
            uncompressed += obj.size * obj.dtype.itemsize
        return None

    try:
        with h5py.File(path, "r") as f:
            f.id.links.visit(external_link, info=True)
            f.visititems(dataset)
            n_obs = _stored_n_obs(f)
    except OSError as err:
        raise AppError(400, f"the file cannot be read as HDF5 ({err})") from None
    if outside:
        raise AppError(
            400, f"the file refers to data in other files ({outside[0]}); save it as a self-contained .h5ad"
        )
    if uncompressed > max_uncompressed_bytes:
        raise AppError(
            413,
            f"the file's datasets take {uncompressed / 2**20:,.0f} MB once decompressed; this server "
            f"accepts at most {max_uncompressed_bytes / 2**20:,.0f} MB",
        )
    if n_obs is None:
        raise AppError(400, "the file has no obs table: it is HDF5 but not an AnnData .h5ad")
    if n_obs > max_spots:
        raise AppError(413, f"the file has {n_obs} spots; this server accepts at most {max_spots} per upload")


def read_upload(path: Path) -> ad.AnnData:
    """The parts of an .h5ad the app uses: obs, var and the counts (layers['counts'], else X)."""
    with h5py.File(path, "r") as f:
        obs, var = read_elem(f["obs"]), read_elem(f["var"])
        if "layers" in f and "counts" in f["layers"]:
            return ad.AnnData(obs=obs, var=var, layers={"counts": read_elem(f["layers/counts"])})
        return ad.AnnData(read_elem(f["X"]) if "X" in f else None, obs=obs, var=var)


class Datasets:
    """The selectable datasets: prepared datasets (folders with manifest.json) and .h5ad files
    directly inside the data folder, and uploads. Loaded datasets are cached (a few at a time)."""

    def __init__(
        self,
        data_dir: Path,
        upload_dir: Path,
        panel: list[str],
        gene_sets: dict[str, list[str]],
        min_panel_fraction: float,
        max_spots: int,
        max_uploads: int,
        max_upload_bytes: int,
        cache_size: int = 4,
    ):
        self.data_dir = data_dir.resolve()
        self.upload_dir = upload_dir
        self.panel = panel
        self.user_gene_sets = gene_sets
        self.min_panel_fraction = min_panel_fraction
        self.max_spots = max_spots
        self.max_uploads = max_uploads
        self.max_uncompressed_bytes = MAX_DECOMPRESSION_FACTOR * max_upload_bytes
        self.cache_size = cache_size
        self._uploads: OrderedDict[str, Source] = OrderedDict()
        self._upload_ids = itertools.count(1)
        self._cache: OrderedDict[tuple, Dataset] = OrderedDict()
        self._lock = threading.Lock()  # guards the upload listing and the cache
        self._load_lock = threading.Lock()  # one dataset read at a time; the next request finds it cached

    def listing(self) -> dict[str, Source]:
        """Name -> source, the data folder scanned afresh (new files appear without a restart)."""
        found: dict[str, Source] = {}
        for entry in sorted(self.data_dir.iterdir()):
            if entry.name.startswith("."):
                continue
            if not entry.resolve().is_relative_to(self.data_dir):
                logger.warning("%s points outside the data folder %s; not offered", entry, self.data_dir)
                continue
            if entry.is_dir() and (entry / "manifest.json").is_file():
                found[entry.name] = Source(entry, "data folder", (entry / "tiles.zarr").exists())
            elif entry.is_file() and entry.suffix == ".h5ad":
                found[entry.name] = Source(entry, "data folder", False)
        with self._lock:
            found.update(self._uploads)
        return found

    def get(self, name: str) -> Dataset:
        source = self.listing().get(name)
        if source is None:
            raise AppError(404, f"unknown dataset {name!r}: choose one of the datasets the page lists")
        return self._load(name, source)

    def _load(self, name: str, source: Source) -> Dataset:
        key = (source.path, source.path.stat().st_mtime_ns)
        with self._load_lock:
            with self._lock:
                if key in self._cache:
                    self._cache.move_to_end(key)
                    return self._cache[key]
            try:
                adata, tiles, tile_um = load_expression_data(source.path)
            except Exception as err:
                logger.exception("cannot read dataset %s", source.path)
                raise AppError(
                    400, f"dataset {name!r} cannot be read ({type(err).__name__}); see the server's log"
                ) from None
            dataset = self._prepare(f"dataset {name!r}", adata, tiles, tile_um)
            self._remember(key, dataset)
            return dataset

    def _remember(self, key: tuple, dataset: Dataset) -> None:
        with self._lock:
            self._cache[key] = dataset
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    def _prepare(self, label: str, adata: ad.AnnData, tiles, tile_um: float | None) -> Dataset:
        """Keep the spots with tissue; check the counts and the overlap with the panel.
        ``label`` names the data in messages ("dataset 'x'", "the uploaded file")."""
        rows = np.arange(adata.n_obs)
        try:
            keep = keep_mask(adata.obs)
        except AppError as err:
            raise AppError(400, f"{label} cannot be used: {err.message}") from None
        if keep is not None:
            rows = np.flatnonzero(keep)
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
            problem = counts_problem(adata)
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
        return Dataset(
            adata,
            tiles,
            tile_um,
            rows,
            spots_by_sample,
            genes,
            frozenset(var),
            gene_sets_in_panel(genes, self.user_gene_sets),
            len(genes),
        )

    def add_upload(self, path: Path, filename: str) -> tuple[str, Dataset]:
        """Validate an uploaded file and make it selectable; the oldest uploads make room."""
        try:
            inspect_h5ad(path, self.max_spots, self.max_uncompressed_bytes)
            try:
                adata = read_upload(path)
            except Exception as err:
                raise AppError(400, f"the file cannot be read as AnnData ({type(err).__name__})") from None
            if adata.n_vars > MAX_UPLOAD_GENES:
                raise AppError(
                    413, f"the file has {adata.n_vars} genes; at most {MAX_UPLOAD_GENES} are accepted"
                )
            dataset = self._prepare("the uploaded file", adata, None, None)
        except Exception:
            path.unlink(missing_ok=True)
            raise
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(filename).stem)[:60] or "upload"
        source = Source(path, "upload", False)
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
