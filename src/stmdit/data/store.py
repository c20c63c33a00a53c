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
duplicated records, and gives the same bytes as an uninterrupted run. Under ``accelerate
launch`` (or ``torchrun``) ``prepare`` shares whole samples among the processes and ``encode``
shards its chunks.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import platform
import shutil
import time
import types
import typing
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from pydantic import AfterValidator, Field, ValidationError, create_model, field_validator
from tqdm.auto import tqdm
from zarr.codecs import ZstdCodec

from stmdit.config import (
    ConfigModel,
    Count,
    NonNegativeFloat,
    PathStr,
    PositiveFloat,
    Probability,
    describe_validation_error,
)
from stmdit.data import readers
from stmdit.data.chunks import ChunkedArray, StoreMismatchError, open_chunks
from stmdit.data.integrity import (
    PREPARED_ARRAYS,
    SPOTS,
    CheckedArray,
    file_digest,
    record_digests,
    require_intact,
)
from stmdit.data.readers import concat_samples
from stmdit.data.readers.convention import read_h5ad, write_h5ad
from stmdit.data.tiling import SpotTiler, open_slide, slide_key, tile_boxes
from stmdit.errors import InputFileError
from stmdit.io import differences, write_json

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STORE_FORMAT = 1
SPLITS = ("train", "val", "test")


# -- provenance ---------------------------------------------------------------------------


class SourceChangedError(StoreMismatchError):
    """A source file changed between an interrupted run and its rerun."""


def source_files(paths, exclude: str | os.PathLike | None = None) -> list[Path]:
    """The files behind ``paths`` (files as they are, folders by their files, hidden ones left out),
    sorted; nothing under ``exclude`` (the output folder)."""
    exclude = Path(exclude).resolve() if exclude is not None else None
    found = set()
    for path in map(Path, paths):
        if path.is_file():
            found.add(path.resolve())
        elif path.is_dir():
            found.update(
                f.resolve()
                for f in path.rglob("*")
                if f.is_file() and not any(p.startswith(".") for p in f.relative_to(path).parts)
            )
    return sorted(f for f in found if exclude is None or not f.is_relative_to(exclude))


def verify_sources(recorded: list[dict], restart_hint: str) -> None:
    """Refuse to resume when a source recorded by :func:`file_digest` has changed.

    Size and digest (by the recorded method) must match. A different modification time with the
    same whole-file SHA-256 is the same content (a copy, a ``touch``) and is accepted; with a
    sampled digest (files above 256 MiB) it is not, since the sample cannot see every byte."""
    for record in recorded:
        path = Path(record["path"])
        if not path.is_file():
            raise SourceChangedError(
                f"source {path} no longer exists; it was read by the interrupted run. "
                f"Restore it, or {restart_hint}"
            )
        now = file_digest(path)
        changed = []
        if now["bytes"] != record["bytes"]:
            changed.append(f"size {record['bytes']} -> {now['bytes']} bytes")
        if now["digest"] != record["digest"]:
            changed.append(f"{record['method']} {record['digest'][:12]}... -> {now['digest'][:12]}...")
        if "mtime_ns" in record and now["mtime_ns"] != record["mtime_ns"] and record["method"] != "sha256":
            changed.append(
                f"modification time changed and its digest ({record['method']}) does not cover every byte"
            )
        if changed:
            raise SourceChangedError(
                f"source {path} changed since this store was started ({'; '.join(changed)}): "
                f"resuming would mix data from both versions. Restore it, or {restart_hint}"
            )


# What ``prepare --restart`` removes: the store's own entries, never other files in the folder.
STORE_ENTRIES = (
    MANIFEST,
    "spots.h5ad",
    "tiles.zarr",
    "tiles.zarr.done",
    "tissue_fraction.zarr",
    "tissue_fraction.zarr.done",
    "features",
    "encoders",
)


def remove_entries(root: Path, entries) -> None:
    for name in entries:
        path = root / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


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
SAMPLE_KEYS = ("format", "split")


def sample_reader(fmt: str):
    """The reader function of a sample ``format``."""
    return {
        "visium": readers.read_visium,
        "hest": readers.read_hest,
        "legacy_st": readers.read_legacy_st,
        "spatial_h5ad": readers.read_spatial_h5ad,
        "cell_table": readers.read_cell_table,
        "he_slide": readers.read_he_slide,
        "pseudolabels": readers.read_pseudolabels,
    }[fmt]


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
        members = (
            typing.get_args(hints[name])
            if typing.get_origin(hints[name]) in (typing.Union, types.UnionType)
            else (hints[name],)
        )
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
    if "split" in entry and entry["split"] not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}; got {entry['split']!r}")
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
    ``pseudospot_um`` (and optionally ``spacing_um``, ``grid``) for the aggregation.

    Splits: a sample entry may say ``split: train|val|test``, and ``splits`` may name samples or
    patients per split (``{test: [P7_A], val: [P9]}``); see :func:`assign_splits` for how the
    groups nobody named are dealt."""

    config_name: ClassVar[str] = "prepare config"

    out: PathStr
    samples: Annotated[list[Annotated[dict[str, Any], AfterValidator(_check_sample)]], Field(min_length=1)]
    tile_um: PositiveFloat = 128.0
    tile_px: Annotated[int, Field(ge=8)] = 256
    min_tissue: Probability = 0.25
    split_by: str = "patient_id"
    # A YAML list is welcome here.
    split_fractions: Annotated[
        tuple[NonNegativeFloat, NonNegativeFloat, NonNegativeFloat], Field(strict=False)
    ] = (
        0.8,
        0.1,
        0.1,
    )
    splits: dict[Literal["train", "val", "test"], list[str]] = {}
    seed: int = 0
    chunk_rows: Count = 64

    @field_validator("splits")
    @classmethod
    def _each_name_in_one_split(cls, splits: dict[str, list[str]]) -> dict[str, list[str]]:
        seen: dict[str, str] = {}
        for split, names in splits.items():
            for name in names:
                if seen.setdefault(name, split) != split:
                    raise ValueError(f"{name!r} is named in splits.{seen[name]} and splits.{split}")
        return splits

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


def assign_splits(
    obs, key: str, named: dict[str, str], fractions: tuple[float, float, float], seed: int
) -> tuple[np.ndarray, dict]:
    """The split of every spot: named groups where the user named them, the others dealt at random.

    ``named`` maps a sample id or a patient id (or any value of the ``key`` column) to a split.
    Every group of ``key`` (a patient by default) must end up in one split: a group whose spots
    are named for two splits, or named for one and partly not named, is an error that names the
    group and the splits. The groups nobody named are dealt by :func:`make_splits`; the splits
    that received named groups take no random ones (the other fractions are rescaled), unless
    every split was named. Returns the per-spot split and the record for ``uns``.
    """
    groups = obs[key].astype(str).to_numpy()
    columns = [c for c in dict.fromkeys(("sample_id", "patient_id", key)) if c in obs]
    values = {c: obs[c].astype(str).to_numpy() for c in columns}
    known = set().union(*(set(v) for v in values.values()))
    missing = sorted(set(named) - known)
    if missing:
        raise ValueError(
            f"splits name {missing}, which are neither samples nor patients of this dataset "
            f"(samples: {sorted(set(values['sample_id']))})"
        )
    explicit = np.full(len(obs), "", dtype=object)
    for column, vals in values.items():
        for name, split in named.items():
            rows = vals == name
            clash = rows & (explicit != "") & (explicit != split)
            if clash.any():
                raise ValueError(
                    f"{column} {name!r} is named for {split}, but some of its spots are also named "
                    f"for {sorted(set(explicit[clash]))[0]} (through another sample or patient name)"
                )
            explicit[rows] = split
    group_split: dict[str, str] = {}
    for group in dict.fromkeys(groups):
        rows = groups == group
        chosen = sorted(set(explicit[rows]) - {""})
        if not chosen:
            continue
        if len(chosen) > 1 or (explicit[rows] == "").any():
            by_split = {s: sorted(set(values["sample_id"][rows & (explicit == s)])) for s in [*chosen, ""]}
            parts = "; ".join(f"{s}: samples {by_split[s]}" for s in chosen)
            if by_split[""]:
                parts += f"; not named (dealt at random): samples {by_split['']}"
            raise ValueError(
                f"{key} {group!r} would be in two splits ({parts}). A {key} stays in one split: name "
                f"all of its samples for the same split, or set split_by: sample_id to split by section"
            )
        group_split[group] = chosen[0]
    rest = np.isin(groups, list(group_split), invert=True)
    taken = set(group_split.values())
    dealt = np.array([0.0 if s in taken else f for s, f in zip(SPLITS, fractions, strict=True)])
    dealt = tuple(dealt / dealt.sum()) if dealt.sum() > 0 else fractions
    random = make_splits(groups[rest], dealt, seed) if rest.any() else {s: [] for s in SPLITS}
    for split, names in random.items():
        group_split.update(dict.fromkeys(names, split))
    record = {s: sorted(g for g, v in group_split.items() if v == s) for s in SPLITS}
    record["named"] = dict(sorted(named.items()))
    return np.array([group_split[g] for g in groups], dtype=object), record


# -- the store ----------------------------------------------------------------------------


class DatasetStore:
    """Read access to a prepared dataset folder (and the paths ``prepare``/``encode`` write)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self._intact: set[str] = set()  # the files and arrays already checked by this handle

    def _require_intact(self, name: str) -> None:
        """The cheap integrity check of ``name`` (see :mod:`stmdit.data.integrity`), once per handle."""
        if name not in self._intact:
            require_intact(self.root, self.manifest(), [name])
            self._intact.add(name)

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
        self._require_intact(SPOTS)
        return read_h5ad(self.root / SPOTS)

    def tiles(self) -> CheckedArray:
        return self._array("tiles.zarr")

    def _array(self, name: str) -> CheckedArray:
        self._require_intact(name)
        return CheckedArray(open_chunks(self.root / name), self.root, name)

    def feature_path(self, name: str) -> Path:
        return self.root / "features" / f"{name}.zarr"

    def features(self) -> dict[str, dict]:
        """Complete cached features: name -> manifest record."""
        return {k: v for k, v in self.manifest().get("features", {}).items() if v.get("complete")}

    def feature(self, name: str) -> CheckedArray:
        if name not in self.features():
            raise KeyError(f"{self.root} has no complete cached feature {name!r}; run `stmdit encode`")
        return self._array(f"features/{name}.zarr")

    def obs(self, *columns: str) -> pd.DataFrame:
        """Columns of the spots' obs, read alone: without the counts and the other columns, so
        that memory stays small however many spots the store has."""
        import h5py
        from anndata.io import read_elem

        self._require_intact(SPOTS)
        path = self.root / SPOTS
        with h5py.File(path, "r") as f:
            missing = [c for c in columns if c not in f["obs"]]
            if missing:
                raise InputFileError(path, f"obs has no column {missing[0]!r} (it has {sorted(f['obs'])})")
            return pd.DataFrame({c: read_elem(f["obs"][c]) for c in columns})

    def samples(self) -> dict:
        """``uns['stmdit']['samples']`` of the spots: what each sample is and where it came from."""
        import h5py
        from anndata.io import read_elem

        self._require_intact(SPOTS)
        with h5py.File(self.root / SPOTS, "r") as f:
            return read_elem(f["uns"]["stmdit"]["samples"])

    def rows(self, split: str | None = "train", only_kept: bool = True) -> np.ndarray:
        obs = self.obs("keep", "split")
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


def _named_splits(config: PrepareConfig, parts: list[ad.AnnData]) -> dict[str, str]:
    """Sample or patient name -> split, from the sample entries' ``split`` and the ``splits`` lists."""
    named = {name: split for split, names in config.splits.items() for name in names}
    for spec, part in zip(config.samples, parts, strict=True):
        if "split" not in spec:
            continue
        for sample in part.obs["sample_id"].astype(str).unique():
            if named.setdefault(sample, spec["split"]) != spec["split"]:
                raise ValueError(
                    f"sample {sample!r} says split: {spec['split']} but splits.{named[sample]} names it"
                )
    return named


def _source_paths(specs: list[dict]) -> list[str]:
    """The paths a list of sample entries reads. Names are not paths, even when a folder of the
    same name happens to exist."""
    return [
        v
        for spec in specs
        for k, v in spec.items()
        if k not in ("format", "split", "sample_id", "patient_id") and isinstance(v, str)
    ]


def _places(adata: ad.AnnData) -> ad.AnnData:
    """What tiling needs of the spot table (each spot's sample and tile box, the samples' images),
    without the expression and thumbnails that the other processes have no use for."""
    samples = {"samples": adata.uns["stmdit"]["samples"]}
    return ad.AnnData(
        obs=adata.obs[["sample_id"]], obsm={"tile_box": adata.obsm["tile_box"]}, uns={"stmdit": samples}
    )


def _slide_owners(adata: ad.AnnData, n_processes: int) -> np.ndarray:
    """The process that tiles each spot: the slides, in row order, dealt round-robin, so that each
    slide is decoded by one process and the shares stay even whatever order the samples come in."""
    slides = {s: slide_key(v["image_path"]) for s, v in adata.uns["stmdit"]["samples"].items()}
    slides = adata.obs["sample_id"].astype(str).map(slides)
    return pd.factorize(slides)[0] % n_processes


def prepare(config: PrepareConfig, progress: bool = True, restart: bool = False) -> DatasetStore:
    """Readers + tiling into ``config.out``; resumes an interrupted run of the same config from the
    same (unchanged) sources. ``restart`` removes what an earlier run wrote there and starts over.

    Under ``accelerate launch`` or ``torchrun`` the processes share the work by whole samples:
    each reads its share of the sample entries (round-robin) and tiles the spots of its share of
    the slides, so that each image is decoded by one process; the main process alone assembles
    and writes the spot table and the manifest. The store is the one a single process writes."""
    from stmdit.distributed import broadcast_from_main, gather_to_main, process_state, wait_patiently

    state = process_state()
    rank, world, main = state.process_index, state.num_processes, state.is_main_process
    store = DatasetStore(config.out)
    if restart and main:
        remove_entries(store.root, STORE_ENTRIES)
    store.root.mkdir(parents=True, exist_ok=True)
    wait_patiently(state)
    manifest = store.manifest() if store.manifest_path.exists() else {"format": STORE_FORMAT, "stages": {}}
    _check_parameters(manifest, "prepare", config.parameters(), store.root)
    if manifest.get("sources") and main:
        verify_sources(manifest["sources"], "start over with `stmdit prepare --restart`")
    manifest["prepare"] = config.parameters()
    spots_path = store.root / "spots.h5ad"
    spots_done = bool(manifest["stages"].get("spots")) and spots_path.exists()
    mine = list(range(rank, len(config.samples), world))  # this process's sample entries

    # Decoding a section's image is the floor of prepare's cost; it runs on a second thread
    # (Pillow releases the GIL), followed by the slide's tissue threshold, while the counts are
    # parsed (the reader's own thumbnail of the image waits for and reuses that decode), and the
    # next chunk's tiles are cut while the previous chunk is compressed and written.
    # Only this process's first sample's slide: the tiler opens each next one while it cuts the
    # tiles of the one before, and releases each when done, so that at most two are held in memory.
    background = ThreadPoolExecutor(2)
    first = config.samples[mine[0]].get("image") if mine else None
    opened = (
        {slide_key(first): background.submit(open_slide, first)}
        if not spots_done and isinstance(first, str) and Path(first).is_file()
        else {}
    )
    if not spots_done:
        # Digests first: a file that changes while it is read shows up on the rerun.
        specs = [config.samples[k] for k in mine]
        sources = [file_digest(p) for p in source_files(_source_paths(specs), exclude=store.root)]
        parts = [read_sample(s) for s in tqdm(specs, desc="reading samples", disable=not progress)]
        logger.info("process %d of %d: read sample entries %s of %d", rank, world, mine, len(config.samples))
        # Splits are dealt over every sample's spots, so the main process assembles the table.
        gathered = gather_to_main((mine, sources, parts), state)
    if not spots_done and main:
        parts = [part for _, _, ps in gathered for part in ps]
        parts = [parts[i] for i in np.argsort([k for ks, _, _ in gathered for k in ks])]  # config order
        named = _named_splits(config, parts)
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
        split, splits = assign_splits(adata.obs, key, named, config.split_fractions, config.seed)
        adata.obs["split"] = pd.Categorical(split.astype(str))
        adata.uns["stmdit"]["splits"] = {"by": key, "seed": config.seed, **splits}
        _expression_layers(adata)
        write_h5ad(adata, spots_path)
        # As source_files orders them, each file once (entries of two processes may share one).
        manifest["sources"] = sorted(
            {d["path"]: d for _, found, _ in gathered for d in found}.values(), key=lambda d: Path(d["path"])
        )
        record_digests(store.root, manifest, [SPOTS])
        manifest["versions"] = package_versions()
        manifest["stages"]["spots"] = {"n_spots": adata.n_obs, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        store.write_manifest(manifest)
    parts = gathered = adata = None  # the readers' outputs (thumbnails included): in spots.h5ad now
    if main:
        if spots_done:
            require_intact(store.root, manifest, [SPOTS])
        # Read back even when just written, as a resumed run reads it: the table with tissue
        # fractions is then written from the same object, to the same bytes (anndata reads
        # uns's keys in another order than the readers built them in).
        adata = read_h5ad(spots_path)

    px = config.tile_px

    def arrays(n: int) -> tuple[ChunkedArray, ChunkedArray]:
        # zstd at level 1: H&E pixels compress as well (33 vs 32 MB on her2st C2) as at zarr's
        # default level 3, in a third of the time, which was as long as decoding the section's image.
        rows, zstd = config.chunk_rows, ZstdCodec(level=1)
        tiles = ChunkedArray(store.root / "tiles.zarr", (n, px, px, 3), np.uint8, rows, compressors=zstd)
        return tiles, ChunkedArray(store.root / "tissue_fraction.zarr", (n,), np.float32, rows)

    if main:  # the main process creates the arrays, the others open them
        tiles, tissue = arrays(adata.n_obs)
    places = broadcast_from_main(_places(adata) if main else None, state)
    if not main:
        tiles, tissue = arrays(places.n_obs)

    owner = _slide_owners(places, world)
    own = np.flatnonzero(owner == rank)
    tiler = SpotTiler(places[own], config.tile_um, px, boxes=places.obsm["tile_box"][own], opened=opened)
    # A kill between the two writes of a chunk leaves one marked and not the other: redo both.
    pending = [
        c
        for c in range(tiles.n_chunks)
        if not (tiles.is_done(c) and tissue.is_done(c)) and (owner[tiles.rows(c)] == rank).any()
    ]
    bar = tqdm(
        total=len(own),
        initial=len(own) - sum(int((owner[tiles.rows(c)] == rank).sum()) for c in pending),
        desc="tiling" if world == 1 else f"tiling (process {rank})",
        unit="tile",
        disable=not progress,
    )

    def write(chunk: int, block: np.ndarray, fractions: np.ndarray) -> None:
        tiles.write(chunk, block)
        tissue.write(chunk, fractions)

    # A chunk that straddles slides of two processes is written by the main process at the end,
    # from the rows each of them cut: each chunk file has one writer, each slide one decoder.
    shared: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    writing = None
    try:
        for chunk in pending:
            rows = np.arange(tiles.rows(chunk).start, tiles.rows(chunk).stop)
            ours = owner[rows] == rank
            block, fractions = tiler.read(np.searchsorted(own, rows[ours]))
            bar.update(len(block))
            if not ours.all():
                shared[chunk] = (ours, block, fractions)
                continue
            if writing is not None:
                writing.result()  # one write in flight: memory stays at two chunks
            writing = background.submit(write, chunk, block, fractions)
        if writing is not None:
            writing.result()
    finally:
        tiler.close()
        background.shutdown()
        bar.close()
    slides = tiler.opened_samples
    logger.info(
        "process %d of %d: tiled %d chunks, opened the slides of %s", rank, world, len(pending), slides
    )

    gathered = gather_to_main((shared, len(pending)), state)
    if main:
        for chunk in sorted({c for cuts, _ in gathered for c in cuts}):
            rows = tiles.rows(chunk)
            block = np.empty((rows.stop - rows.start, px, px, 3), np.uint8)
            fractions = np.empty(rows.stop - rows.start, np.float32)
            for cuts, _ in gathered:
                if chunk in cuts:
                    ours, cut, measured = cuts[chunk]
                    block[ours], fractions[ours] = cut, measured
            write(chunk, block, fractions)
        rewritten = any(count for _, count in gathered)
    gathered = shared = None

    if main and not manifest["stages"].get("tiles"):
        adata.obs["tissue_fraction"] = np.asarray(tissue.array[:], dtype=np.float32)
        adata.obs["keep"] = adata.obs["tissue_fraction"].to_numpy() >= config.min_tissue
        write_h5ad(adata, spots_path)
        manifest["stages"]["tiles"] = {
            "kept": int(adata.obs["keep"].sum()),
            "dropped_background": int((~adata.obs["keep"]).sum()),
            "at_edge": int(adata.obs["at_edge"].sum()),
            "processes": world,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        record_digests(store.root, manifest, [SPOTS, *PREPARED_ARRAYS])
        store.write_manifest(manifest)
    elif main and rewritten:  # chunks rewritten after `stmdit check --repair`
        record_digests(store.root, manifest, PREPARED_ARRAYS)
        store.write_manifest(manifest)
    wait_patiently(state)  # the manifest is complete for every process that returns
    return store
