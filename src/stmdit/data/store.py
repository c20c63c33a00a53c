"""The prepared-dataset store: one folder per dataset, every frozen feature computed once.

Layout::

    DATASET/
      manifest.json            provenance: sources and their hashes, parameters, versions, stages
      spots.h5ad               every spot: layers counts (as read) and log1p (CP10k); obs with
                               sample_id, patient_id, x_px, y_px, split, tissue_fraction, at_edge, keep
      tiles.zarr               uint8 (N, tile_px, tile_px, 3), row i = spot i
      tissue_fraction.zarr     float32 (N,)
      features/<name>.zarr     cached encoder outputs: latents, morphology, ge[, ge_tokens, ge_mask]
      encoders/                the frozen encoders that made them (save_pretrained folders)

``prepare`` (readers + tiling) and ``encode`` (features) write in row chunks with done-markers
(:mod:`stmdit.data.chunks`): a killed run resumes where it stopped, without partial or
duplicated records, and gives the same bytes as an uninterrupted run. ``encode`` shards its
chunks across processes under ``accelerate launch``.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import os
import platform
import time
import types
import typing
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import anndata as ad
import numpy as np
import scipy.sparse as sp
from pydantic import AfterValidator, Field, ValidationError, create_model, field_validator
from tqdm.auto import tqdm

from stmdit.config import (
    ConfigModel,
    Count,
    NonNegativeFloat,
    PathStr,
    PositiveFloat,
    Probability,
    describe_validation_error,
)
from stmdit.data.chunks import ChunkedArray, StoreMismatchError
from stmdit.io import atomic_path, differences, write_json

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STORE_FORMAT = 1
SPLITS = ("train", "val", "test")


# -- provenance ---------------------------------------------------------------------------


def file_digest(path: str | os.PathLike, full_limit: int = 256 * 2**20, block: int = 8 * 2**20) -> dict:
    """SHA-256 of a source file. Files up to ``full_limit`` bytes are hashed whole; larger ones
    (whole-slide images of several GB) by their size plus their first, middle and last
    ``block`` bytes, and the record says so."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= full_limit:
            for piece in iter(lambda: f.read(block), b""):
                h.update(piece)
            method = "sha256"
        else:
            h.update(str(size).encode())
            for offset in (0, size // 2, max(0, size - block)):
                f.seek(offset)
                h.update(f.read(block))
            method = f"sha256 of size + 3 x {block // 2**20} MiB samples"
    return {"path": str(path.resolve()), "bytes": size, "digest": h.hexdigest(), "method": method}


def package_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("stmdit", "torch", "diffusers", "anndata", "zarr", "numpy", "tifffile"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


# -- configuration ------------------------------------------------------------------------


SAMPLE_FORMATS = ("visium", "hest", "legacy_st", "spatial_h5ad", "cell_table", "he_slide", "pseudolabels")
# Keys of a sample entry that are not arguments of its reader.
SAMPLE_KEYS = ("format",)


def sample_reader(fmt: str):
    """The reader function of a sample ``format``."""
    from stmdit.data import readers

    if fmt == "pseudolabels":
        from stmdit.pseudolabel import read_pseudolabels

        return read_pseudolabels
    return {"visium": readers.read_visium, "hest": readers.read_hest, "legacy_st": readers.read_legacy_st,
            "spatial_h5ad": readers.read_spatial_h5ad, "cell_table": readers.read_cell_table,
            "he_slide": readers.read_he_slide}[fmt]  # fmt: skip


@functools.cache
def _sample_model(fmt: str) -> type[ConfigModel]:
    """A config model of one sample entry, built from its reader's signature (so the reader
    keeps the only copy of each default): unknown, missing and mistyped arguments are errors."""
    fields: dict = {"format": (Literal[fmt], ...)}
    fields.update(_arguments_of(sample_reader(fmt)))
    if fmt == "cell_table":  # the pseudo-spot aggregation's arguments
        from stmdit.data.readers import aggregate_to_pseudospots

        aggregation = _arguments_of(aggregate_to_pseudospots, skip=("adata", "diameter_um"))
        fields.update(pseudospot_um=(PositiveFloat, ...), **aggregation)
    model = create_model(f"{fmt}_sample", __base__=ConfigModel, **fields)
    model.config_name = f"{fmt} sample"
    return model


def _arguments_of(fn, skip=()) -> dict:
    """pydantic fields for a function's arguments: paths are taken as text, defaults kept."""
    hints = typing.get_type_hints(fn)
    fields = {}
    for name, param in inspect.signature(fn).parameters.items():
        if name in skip:
            continue
        members = typing.get_args(hints[name]) if typing.get_origin(hints[name]) in (typing.Union, types.UnionType) else (hints[name],)  # fmt: skip
        mapped = tuple(dict.fromkeys(PathStr if m in (Path, os.PathLike) or m is str else m for m in members))
        annotation = typing.Union[mapped] if len(mapped) > 1 else mapped[0]  # noqa: UP007 (built from a tuple)
        default = ... if param.default is inspect.Parameter.empty else param.default
        fields[name] = (annotation, default)
    return fields


def _check_sample(entry: dict) -> dict:
    fmt = entry.get("format")
    if fmt is None:
        raise ValueError(f"a sample needs a 'format': one of {', '.join(SAMPLE_FORMATS)}")
    if fmt not in SAMPLE_FORMATS:
        raise ValueError(f"unknown sample format {fmt!r}; use one of {', '.join(SAMPLE_FORMATS)}")
    model = _sample_model(fmt)
    try:
        model.model_validate({k: v for k, v in entry.items() if k not in SAMPLE_KEYS or k == "format"})
    except ValidationError as err:
        raise ValueError(f"{fmt} sample: {describe_validation_error(err, model, inline=True)}") from None
    return entry


class PrepareConfig(ConfigModel):
    """What ``stmdit prepare`` builds. ``samples`` lists reader calls: each a mapping with
    ``format`` (``visium``, ``hest``, ``legacy_st``, ``spatial_h5ad``, ``cell_table``, ``he_slide``,
    ``pseudolabels``: the output of ``stmdit pseudolabel``) and that
    reader's arguments (see :mod:`stmdit.data.readers`); ``cell_table`` also takes
    ``pseudospot_um`` (and optionally ``spacing_um``, ``grid``) for the aggregation."""

    config_name: ClassVar[str] = "prepare config"

    out: PathStr
    samples: Annotated[list[Annotated[dict[str, Any], AfterValidator(_check_sample)]], Field(min_length=1)]
    tile_um: PositiveFloat = 128.0
    tile_px: Annotated[int, Field(ge=8)] = 256
    min_tissue: Probability = 0.25
    split_by: str = "patient_id"
    # A YAML list is welcome here.
    split_fractions: Annotated[tuple[NonNegativeFloat, NonNegativeFloat, NonNegativeFloat], Field(strict=False)] = (
        0.8,
        0.1,
        0.1,
    )
    seed: int = 0
    chunk_rows: Count = 64

    @field_validator("split_fractions")
    @classmethod
    def _fractions_sum_to_one(cls, fractions: tuple[float, float, float]) -> tuple[float, float, float]:
        if abs(sum(fractions) - 1) > 1e-6:
            raise ValueError(f"split_fractions must sum to 1; got {list(fractions)} (sum {sum(fractions):g})")
        return fractions

    def parameters(self) -> dict:
        """Everything that determines the store's content (not where it is written)."""
        d = self.model_dump(exclude={"out"})
        d["split_fractions"] = list(d["split_fractions"])
        return d


# -- reading and splitting -----------------------------------------------------------------


def read_sample(spec: dict) -> ad.AnnData:
    """Run the reader named by ``spec['format']`` with the rest of ``spec`` as arguments."""
    from stmdit.data import readers

    spec = {k: v for k, v in spec.items() if k not in SAMPLE_KEYS or k == "format"}
    fmt = spec.pop("format")
    if fmt == "cell_table":
        diameter = spec.pop("pseudospot_um", None)
        if diameter is None:
            raise ValueError(
                "samples: format cell_table needs pseudospot_um (the pseudo-spot diameter in µm)"
            )
        agg = {k: spec.pop(k) for k in ("spacing_um", "grid") if k in spec}
        return readers.aggregate_to_pseudospots(readers.read_cell_table(**spec), diameter, **agg)
    if fmt not in SAMPLE_FORMATS:
        raise ValueError(f"samples: unknown format {fmt!r}; use one of {', '.join(SAMPLE_FORMATS)}")
    fn = sample_reader(fmt)
    adata = fn(**spec)
    # Which expression a spot carries: measured by the assay, or predicted from H&E (PTPL).
    if "expression_source" not in adata.obs:
        adata.obs["expression_source"] = "measured" if "counts" in adata.layers else "none"
    return adata


def make_splits(groups: np.ndarray, fractions: tuple[float, float, float], seed: int) -> dict[str, list[str]]:
    """Assign whole groups (patients, or samples) to train / val / test.

    Groups are shuffled with ``seed`` and dealt out by target spot share; no group is in two
    splits. With fewer groups than non-empty splits, later splits stay empty (with a warning).
    """
    names, counts = np.unique(groups.astype(str), return_counts=True)
    order = np.random.default_rng(seed).permutation(len(names))
    total = counts.sum()
    targets = np.cumsum(fractions) * total
    out = {s: [] for s in SPLITS}
    running = 0
    for i in order:
        # A group goes to the first split whose cumulative target its midpoint falls under.
        mid = running + counts[i] / 2
        split = SPLITS[int(np.searchsorted(targets, mid, side="right").clip(0, 2))]
        out[split].append(str(names[i]))
        running += counts[i]
    for s in SPLITS:
        out[s].sort()
    empty = [s for s, f in zip(SPLITS, fractions, strict=True) if f > 0 and not out[s]]
    if empty:
        logger.warning(
            "splits %s are empty: %d groups are too few for fractions %s", empty, len(names), fractions
        )
    return out


# -- the store ----------------------------------------------------------------------------


class DatasetStore:
    """Read access to a prepared dataset folder (and the paths ``prepare``/``encode`` write)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def manifest(self) -> dict:
        import json

        if not self.manifest_path.exists():
            raise FileNotFoundError(
                f"{self.root} is not a prepared dataset (no {MANIFEST}); run `stmdit prepare` first"
            )
        return json.loads(self.manifest_path.read_text())

    def write_manifest(self, manifest: dict) -> None:
        write_json(self.manifest_path, manifest)

    def spots(self) -> ad.AnnData:
        return ad.read_h5ad(self.root / "spots.h5ad")

    def tiles(self):
        import zarr

        return zarr.open_array(self.root / "tiles.zarr", mode="r")

    def feature_path(self, name: str) -> Path:
        return self.root / "features" / f"{name}.zarr"

    def features(self) -> dict[str, dict]:
        """Complete cached features: name -> manifest record."""
        return {k: v for k, v in self.manifest().get("features", {}).items() if v.get("complete")}

    def feature(self, name: str):
        import zarr

        if name not in self.features():
            raise KeyError(f"{self.root} has no complete cached feature {name!r}; run `stmdit encode`")
        return zarr.open_array(self.feature_path(name), mode="r")

    def rows(self, split: str | None = "train", only_kept: bool = True) -> np.ndarray:
        obs = self.spots().obs
        mask = np.ones(len(obs), dtype=bool)
        if only_kept:
            mask &= obs["keep"].to_numpy(dtype=bool)
        if split is not None:
            if split not in SPLITS:
                raise ValueError(f"split must be one of {SPLITS} or None; got {split!r}")
            mask &= (obs["split"] == split).to_numpy()
        return np.flatnonzero(mask)


def _check_parameters(manifest: dict, key: str, params: dict, root: Path) -> None:
    old = manifest.get(key)
    if old is not None and old != params:
        diffs = "; ".join(differences(old, params, "store", "now"))
        raise StoreMismatchError(
            f"{root} was made with other {key} ({diffs}); use another folder or delete it to start over"
        )


def _expression_layers(adata: ad.AnnData) -> None:
    """Add layers['log1p'] (log1p CP10k of the counts) when raw counts are present."""
    if "counts" not in adata.layers:
        return
    x = adata.layers["counts"]
    x = x.tocsr() if sp.issparse(x) else sp.csr_matrix(np.asarray(x))
    # Pseudo-labels declare the total they are scaled to (CP10k over all genes, predicted or not).
    totals = (
        adata.obs["library_size"].to_numpy(float)
        if "library_size" in adata.obs
        else np.asarray(x.sum(axis=1)).ravel()
    )
    scale = np.divide(1e4, totals, out=np.zeros_like(totals, dtype=np.float64), where=totals > 0)
    norm = sp.diags(scale) @ x.astype(np.float64)
    norm.data = np.log1p(norm.data)
    adata.layers["log1p"] = norm.astype(np.float32).tocsr()


def prepare(config: PrepareConfig, progress: bool = True) -> DatasetStore:
    """Readers + tiling into ``config.out``; resumes an interrupted run of the same config."""
    from stmdit.data.readers import concat_samples
    from stmdit.data.tiling import SpotTiler, tile_boxes

    store = DatasetStore(config.out)
    store.root.mkdir(parents=True, exist_ok=True)
    manifest = store.manifest() if store.manifest_path.exists() else {"format": STORE_FORMAT, "stages": {}}
    _check_parameters(manifest, "prepare", config.parameters(), store.root)
    manifest["prepare"] = config.parameters()

    spots_path = store.root / "spots.h5ad"
    if manifest["stages"].get("spots") and spots_path.exists():
        adata = ad.read_h5ad(spots_path)
    else:
        parts = [read_sample(s) for s in tqdm(config.samples, desc="reading samples", disable=not progress)]
        adata = parts[0] if len(parts) == 1 else concat_samples(parts)
        boxes, at_edge = tile_boxes(adata, config.tile_um)
        adata.obsm["tile_box"] = boxes
        adata.obs["at_edge"] = at_edge
        key = (
            config.split_by
            if config.split_by in adata.obs and adata.obs[config.split_by].notna().all()
            else "sample_id"
        )
        if key != config.split_by:
            logger.warning("split_by=%r is not known for every spot; splitting by sample_id", config.split_by)
        splits = make_splits(adata.obs[key].to_numpy(), config.split_fractions, config.seed)
        group_split = {g: s for s, gs in splits.items() for g in gs}
        adata.obs["split"] = adata.obs[key].astype(str).map(group_split).astype("category")
        adata.uns["stmdit"]["splits"] = {"by": key, "seed": config.seed, **splits}
        _expression_layers(adata)
        with atomic_path(spots_path) as tmp:
            adata.write_h5ad(tmp)
        sources = sorted({str(v) for s in config.samples for k, v in s.items() if k != "format" and isinstance(v, str)
                          and Path(v).is_file()})  # fmt: skip
        manifest["sources"] = [file_digest(p) for p in sources]
        manifest["versions"] = package_versions()
        manifest["stages"]["spots"] = {"n_spots": adata.n_obs, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        store.write_manifest(manifest)

    n, px = adata.n_obs, config.tile_px
    tiles = ChunkedArray(store.root / "tiles.zarr", (n, px, px, 3), np.uint8, config.chunk_rows)
    tissue = ChunkedArray(store.root / "tissue_fraction.zarr", (n,), np.float32, config.chunk_rows)
    tiler = SpotTiler(adata, config.tile_um, px, boxes=adata.obsm["tile_box"])
    # A kill between the two writes of a chunk leaves one marked and not the other: redo both.
    pending = [c for c in range(tiles.n_chunks) if not (tiles.is_done(c) and tissue.is_done(c))]
    bar = tqdm(total=n, initial=n - sum(tiles.rows(c).stop - tiles.rows(c).start for c in pending),
               desc="tiling", unit="tile", disable=not progress)  # fmt: skip
    for chunk in pending:
        rows = tiles.rows(chunk)
        block, fractions = tiler.read(np.arange(rows.start, rows.stop))
        tiles.write(chunk, block)
        tissue.write(chunk, fractions)
        bar.update(len(block))
    tiler.close()
    bar.close()

    if not manifest["stages"].get("tiles"):
        adata.obs["tissue_fraction"] = np.asarray(tissue.array[:], dtype=np.float32)
        adata.obs["keep"] = adata.obs["tissue_fraction"].to_numpy() >= config.min_tissue
        with atomic_path(spots_path) as tmp:
            adata.write_h5ad(tmp)
        manifest["stages"]["tiles"] = {"kept": int(adata.obs["keep"].sum()), "dropped_background": int((~adata.obs["keep"]).sum()),
                                       "at_edge": int(adata.obs["at_edge"].sum()), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}  # fmt: skip
        store.write_manifest(manifest)
    return store
