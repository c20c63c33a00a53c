"""Virtual tissue experiments: "what would this tissue look like if these genes were up?"

A starting expression state (a spot, the mean of a cluster, or of a sample) is perturbed
(fold change, knock-out, set to a quantile of the data, or interpolated towards another state)
and tiles are generated for the control and every variant with identical noise: the same seed
gives the same noise whatever the expression, so each (control, variant) pair differs only
by what the expression changed. Changes are paired differences with a t interval, the tests of
all variants x measures adjusted together (Holm), beside the control's seed-to-seed spread, over
a named unit of replication (:mod:`stmdit.experiments.statistics`): ``replicates: seeds`` repeats
one expression over seeds (the model's change for that exact expression); ``replicates: spots``
perturbs up to ``max_spots`` spots of a cluster or sample, each its own control, over the seeds
(the region's change; each spot draws noise of its own).

Measured per tile: haematoxylin and eosin (and brown pigment) density by colour deconvolution,
nuclei per area (counted on the haematoxylin channel with a watershed that separates touching
nuclei, on tiles large enough for it: :func:`stmdit.stain.nuclei_unavailable`), the
morphology-feature vector (distance to the control), and, with an expression predictor, the
expression read back as the predictor reads any tile (:func:`~stmdit.predictor.readback.read_expression`:
its training grid, the spot crop at its training spot diameter, 3 x 3 sub-spots), each tile
alone: a generated tile has no generated neighbourhood, so it has no neighbours (never tiles of
other seeds or states). The report is the template ``templates/simulate_report.html.j2``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from jinja2 import Environment, PackageLoader
from pydantic import AfterValidator, Field, model_validator

from stmdit import defaults
from stmdit.config import ConfigModel, Count, PathStr, Probability
from stmdit.data.readers.convention import read_anndata
from stmdit.data.store import DatasetStore
from stmdit.errors import InputFileError
from stmdit.experiments.statistics import (
    ALPHA,
    adjust_changes,
    describe_replicates,
    replicate_change,
)
from stmdit.generate import spot_generator
from stmdit.genesets import marker_programmes
from stmdit.io import save_figure, write_json, write_text
from stmdit.pipeline import STMDiTPipeline
from stmdit.plotting import plt, save_tile_grid
from stmdit.predictor import load_predictor
from stmdit.predictor.readback import read_expression
from stmdit.stain import count_nuclei, deconvolve, nuclei_unavailable
from stmdit.tiles import to_tensor, to_uint8

logger = logging.getLogger(__name__)

MODES = ("fold_change", "knockout", "quantile", "set")
# The spots of a region drawn as replicates (``replicates: spots``) are a fixed seeded choice,
# so that a rerun, or another variant list, compares the same spots.
SPOT_CHOICE_SEED = 0
NO_NEIGHBOURS = (
    "read without neighbours: a virtual experiment generates each tile alone, with no generated "
    "neighbourhood, so the predictor gets its zero neighbour vector and never pools tiles of other "
    "seeds or states"
)


# -- expression states ---------------------------------------------------------------------


def _counts(adata: ad.AnnData) -> np.ndarray:
    x = adata.layers["counts"] if "counts" in adata.layers else adata.X
    return np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float64)


def start_rows(
    adata: ad.AnnData,
    spot: str | None = None,
    cluster: tuple[str, str] | None = None,
    sample: str | None = None,
) -> tuple[np.ndarray, str]:
    """The rows of a start state's spots and its label: a spot (obs name), a cluster
    (``(obs column, value)``) or a sample; exactly one must be given."""
    given = [x is not None for x in (spot, cluster, sample)]
    if sum(given) != 1:
        raise ValueError("give exactly one of spot, cluster (column, value) or sample")
    if spot is not None:
        if spot not in adata.obs_names:
            raise KeyError(f"spot {spot!r} is not in the data (e.g. {list(adata.obs_names[:3])})")
        rows, label = np.flatnonzero(adata.obs_names == spot), f"spot {spot}"
    elif cluster is not None:
        column, value = cluster
        if column not in adata.obs:
            raise KeyError(f"obs has no column {column!r}; columns are {list(adata.obs.columns)}")
        rows, label = (
            np.flatnonzero(adata.obs[column].astype(str).to_numpy() == str(value)),
            f"{column}={value}",
        )
    else:
        rows, label = (
            np.flatnonzero(adata.obs["sample_id"].astype(str).to_numpy() == str(sample)),
            f"sample {sample}",
        )
    if len(rows) == 0:
        raise ValueError(f"no spots match {label}")
    return rows, label


def start_state(
    adata: ad.AnnData,
    spot: str | None = None,
    cluster: tuple[str, str] | None = None,
    sample: str | None = None,
) -> ad.AnnData:
    """One expression state to perturb: a spot (obs name), the mean counts of a cluster
    (``(obs column, value)``) or of a sample; exactly one must be given."""
    rows, label = start_rows(adata, spot, cluster, sample)
    mean = _counts(adata[rows]).mean(axis=0, keepdims=True)
    state = ad.AnnData(
        mean.astype(np.float32),
        var=pd.DataFrame(index=adata.var_names.copy()),
        obs=pd.DataFrame({"state": [label], "n_spots": [len(rows)]}, index=["control"]),
    )
    state.layers["counts"] = state.X.copy()
    return state


@dataclass
class Perturbation:
    """A change to some genes: ``genes`` and/or a named ``gene_set``; ``mode`` ``fold_change``
    (multiply by ``value``), ``knockout`` (set to 0), ``quantile`` (set each gene to its
    ``value`` quantile over the reference spots) or ``set`` (set to ``value`` counts)."""

    genes: list[str] = field(default_factory=list)
    gene_set: str | None = None
    mode: str = "fold_change"
    value: float = 2.0

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"perturbation mode must be one of {MODES}; got {self.mode!r}")
        if not self.genes and not self.gene_set:
            raise ValueError("a perturbation needs genes or a gene_set")
        if self.mode == "fold_change" and not (np.isfinite(self.value) and self.value >= 0):
            raise ValueError(f"a fold change must be a finite number >= 0; got {self.value}")
        if self.mode == "quantile" and not 0 <= self.value <= 1:
            raise ValueError(f"a quantile must be in [0, 1]; got {self.value}")
        if self.mode == "set" and not (np.isfinite(self.value) and self.value >= 0):
            raise ValueError(f"a count must be >= 0; got {self.value}")

    def describe(self) -> str:
        what = self.gene_set or ",".join(self.genes[:4]) + ("..." if len(self.genes) > 4 else "")
        return {
            "fold_change": f"{what} x{self.value:g}",
            "knockout": f"{what} knocked out",
            "quantile": f"{what} at q{self.value:g}",
            "set": f"{what} = {self.value:g}",
        }[self.mode]


def resolve_genes(p: Perturbation, var_names, gene_sets: dict[str, list[str]] | None = None) -> list[str]:
    """The perturbation's genes that the data has (case-insensitive), or an error naming the rest."""
    names = list(p.genes)
    if p.gene_set:
        sets = gene_sets or {}
        if p.gene_set not in sets:
            raise KeyError(f"unknown gene set {p.gene_set!r}; known sets are {sorted(sets)}")
        names += list(sets[p.gene_set])
    lookup = {g.upper(): g for g in map(str, var_names)}
    found = [lookup[n.upper()] for n in names if n.upper() in lookup]
    missing = [n for n in names if n.upper() not in lookup]
    if not found:
        raise ValueError(f"none of the genes {names[:8]} is in the data")
    if missing:
        logger.warning("genes not in the data, ignored: %s", missing[:10])
    return list(dict.fromkeys(found))


def perturb(
    state: ad.AnnData,
    perturbations: list[Perturbation],
    reference: ad.AnnData | None = None,
    gene_sets: dict[str, list[str]] | None = None,
) -> ad.AnnData:
    """A perturbed copy of ``state`` (counts); ``reference`` supplies the quantiles."""
    out = state.copy()
    x = _counts(out)
    cols = {g: i for i, g in enumerate(map(str, out.var_names))}
    for p in perturbations:
        genes = resolve_genes(p, out.var_names, gene_sets)
        idx = [cols[g] for g in genes]
        if p.mode == "fold_change":
            x[:, idx] *= p.value
        elif p.mode == "knockout":
            x[:, idx] = 0.0
        elif p.mode == "set":
            x[:, idx] = p.value
        else:
            if reference is None:
                raise ValueError("a quantile perturbation needs reference spots")
            ref = _counts(reference[:, genes])
            x[:, idx] = np.quantile(ref, p.value, axis=0)
    out.X = x.astype(np.float32)
    out.layers["counts"] = out.X.copy()
    out.obs_names = ["; ".join(p.describe() for p in perturbations)]
    return out


def interpolate(a: ad.AnnData, b: ad.AnnData, alphas) -> ad.AnnData:
    """States on the straight line from ``a`` (alpha 0) to ``b`` (alpha 1), one row per alpha."""
    common = a.var_names.intersection(b.var_names)
    if len(common) == 0:
        raise ValueError("the two states share no genes")
    xa, xb = _counts(a[:, common])[:1], _counts(b[:, common])[:1]
    alphas = np.asarray(alphas, dtype=np.float64)
    rows = (1 - alphas[:, None]) * xa + alphas[:, None] * xb
    out = ad.AnnData(
        rows.astype(np.float32),
        var=pd.DataFrame(index=common.copy()),
        obs=pd.DataFrame({"alpha": alphas}, index=[f"alpha={v:g}" for v in alphas]),
    )
    out.layers["counts"] = out.X.copy()
    return out


# -- generation with paired noise ----------------------------------------------------------


def paired_generate(
    pipe,
    states: ad.AnnData,
    seeds,
    morphology=None,
    init_images=None,
    strength: float = 1.0,
    guidance_morph: float = defaults.GUIDANCE_MORPH,
    guidance_ge: float = defaults.GUIDANCE_GE,
    steps: int = defaults.STEPS,
    noise_streams=None,
    progress: bool = False,
) -> np.ndarray:
    """Tiles (n_states, n_seeds, H, W, 3) float in [0, 1]; state i and j share the noise of
    each seed (and, with ``init_images``, the same partially noised tile). ``noise_streams``
    (one integer per state, default all 0) splits the states into groups with noise of their
    own: states of one stream share each seed's noise, other streams draw other noise (the
    spots of ``replicates: spots``). ``progress`` shows the sampler's progress bar over the
    denoising steps of the whole batch."""
    # One call for all (seed, state) pairs: rows are seed-major, every row has its own generator,
    # so row (seed, state) gets exactly the noise of that seed whatever else is in the batch.
    seeds = [int(s) for s in seeds]
    n = states.n_obs
    streams = np.zeros(n, dtype=np.int64) if noise_streams is None else np.asarray(noise_streams)
    if streams.shape != (n,):
        raise ValueError(f"noise_streams needs one integer per state ({n}); got shape {streams.shape}")
    batch = ad.concat(
        [states] * len(seeds), join="inner", keys=[str(i) for i in range(len(seeds))], index_unique=":"
    )
    kwargs = {
        "expression": batch,
        "guidance_morph": guidance_morph,
        "guidance_ge": guidance_ge,
        "num_inference_steps": steps,
        "generator": [spot_generator(s, int(stream)) for s in seeds for stream in streams],
        "output_type": "np",
        "progress": progress,
    }
    if morphology is not None:
        kwargs["morphology"] = morphology
    if init_images is not None:
        kwargs["init_images"], kwargs["strength"] = init_images, strength
    images = pipe(**kwargs).images
    return images.reshape(len(seeds), n, *images.shape[1:]).transpose(1, 0, 2, 3, 4)


# -- measurements --------------------------------------------------------------------------


# What tile_statistics measures, as the page and the report name it. Nuclei are counted per
# 100 x 100 um when the pixel size is known, else per 100 x 100 px, and only on tiles large
# enough for a count to mean something (stain.nuclei_unavailable).
MEASUREMENTS = {
    "haematoxylin": "Haematoxylin density (nuclei)",
    "eosin": "Eosin density (cytoplasm, stroma)",
    "brown": "Brown pigment density (melanin)",
    "nuclei_per_100um2": "Nuclei per 100 × 100 µm",
    "nuclei_per_100px2": "Nuclei per 100 × 100 px",
}


def tile_statistics(images: np.ndarray, um_per_px: float | None = None) -> dict[str, np.ndarray]:
    """Interpretable statistics per tile (N, H, W, 3) in [0, 1]: mean haematoxylin, eosin and
    brown (melanin) density by colour deconvolution, and, when the tiles are large enough
    (:func:`stmdit.stain.nuclei_unavailable`), nuclei per area counted by
    :func:`stmdit.stain.count_nuclei` (one threshold over the batch)."""
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).permute(0, 3, 1, 2)
    conc = deconvolve(x).clamp_min(0).numpy()
    stats = {
        "haematoxylin": conc[:, 0].mean(axis=(1, 2)),
        "eosin": conc[:, 1].mean(axis=(1, 2)),
        "brown": conc[:, 2].mean(axis=(1, 2)),
    }
    height, width = images.shape[1:3]
    if nuclei_unavailable(min(height, width), um_per_px) is None:
        counts = count_nuclei(images, um_per_px=um_per_px).astype(float)
        if um_per_px:
            stats["nuclei_per_100um2"] = counts / (height * width * um_per_px**2 / 1e4)
        else:
            stats["nuclei_per_100px2"] = counts / (height * width / 1e4)
    return stats


def read_back(tiles: np.ndarray, predictor, encoder, tile_um: float, spot_diameter_um: float) -> np.ndarray:
    """The expression (N, n_genes; log1p CP10k) ``predictor`` reads off generated tiles (N, H, W, 3)
    in [0, 1]: each tile as the predictor reads any tile
    (:func:`~stmdit.predictor.readback.read_expression`) and alone (:data:`NO_NEIGHBOURS`)."""
    n = len(tiles)
    return read_expression(
        to_uint8(tiles),
        pd.DataFrame(index=pd.RangeIndex(n).astype(str)),
        tile_um,
        spot_diameter_um,
        predictor,
        encoder,
        neighbours=np.full((n, 0), -1, dtype=np.int64),
    )


def readback_geometry(predictor, adata: ad.AnnData, rows: np.ndarray, tile_um: float | None) -> dict:
    """How ``predictor`` reads the generated tiles of a start state (``rows`` of ``adata``): the
    tiles' width (the dataset's ``tile_um``: a generated tile spans what the dataset's tiles
    span) and the spot diameter of the crop, the one the predictor was trained on (its
    provenance) or, when it was trained on several, the start state's spots'."""
    if tile_um is None:
        raise ValueError(
            "reading expression back needs the generated tiles' width in µm: give as data a prepared "
            "dataset (its manifest records tile_um), not an .h5ad"
        )
    trained = [float(d) for d in ((predictor.config.provenance or {}).get("spot_diameter_um") or [])]
    if len(trained) == 1:
        diameter, source = trained[0], "the diameter of the predictor's training spots, from its provenance"
    else:  # the diameters the prepared dataset records for the start state's samples
        info = adata.uns.get("stmdit", {}).get("samples", {})
        samples = (
            set(adata.obs["sample_id"].astype(str).to_numpy()[rows]) if "sample_id" in adata.obs else set()
        )
        recorded = {float(info.get(s, {}).get("spot_diameter_um", np.nan)) for s in samples}
        data = sorted(d for d in recorded if np.isfinite(d))
        if len(data) != 1:
            raise ValueError(
                f"the predictor's provenance records spot diameters {trained or 'none'} (µm) and the start "
                f"state's spots have {data or 'no recorded'} (uns['stmdit']['samples'][...]['spot_diameter_um']): "
                "cannot tell the spot crop to read; start from spots of one diameter, in a prepared dataset"
            )
        diameter, source = data[0], "the start state's spot diameter; the predictor was trained on several"
    if diameter > tile_um:
        raise ValueError(f"the spot ({diameter:g} µm) is larger than the generated tile ({tile_um:g} µm)")
    return {
        "tile_um": float(tile_um),
        "spot_diameter_um": diameter,
        "spot_diameter_from": source,
        "neighbours": NO_NEIGHBOURS,
    }


def measure(
    tiles: np.ndarray,
    names: list[str],
    morphology_encoder=None,
    predictor=None,
    predictor_encoder=None,
    tile_um: float | None = None,
    spot_diameter_um: float | None = None,
    replicates: str = "seeds",
) -> dict:
    """Measure tiles (n_states, n_spots, n_seeds, H, W, 3), state 0 the control, n_spots 1 unless
    ``replicates`` is ``spots``: the tile statistics; per variant and measure the paired change
    (:func:`replicate_change`), all tests adjusted together (Holm, Benjamini-Hochberg beside);
    the morphology-feature distance to the control's tile of the same spot and seed; with a
    predictor, the mean shift of its top genes (:func:`read_back`). ``tile_um`` (the tiles'
    width, when known) also sets the scale of nuclei counts; ``result["nuclei"]`` says why
    nuclei were not counted, or is None when they were."""
    if replicates not in ("seeds", "spots"):
        raise ValueError(f"replicates must be 'seeds' or 'spots'; got {replicates!r}")
    n_states, n_spots, n_seeds = tiles.shape[:3]
    if replicates == "seeds" and n_spots != 1:
        raise ValueError(f"replicates: seeds repeats one expression; got tiles of {n_spots} spots")
    flat = tiles.reshape(-1, *tiles.shape[3:])
    um_per_px = tile_um / flat.shape[2] if tile_um else None
    stats = {k: v.reshape(n_states, n_spots, n_seeds) for k, v in tile_statistics(flat, um_per_px).items()}
    result = {
        "states": names,
        "statistics": {k: v.tolist() for k, v in stats.items()},
        "statistics_axes": ["state", "spot", "seed"],
        "nuclei": nuclei_unavailable(min(flat.shape[1:3]), um_per_px),
        "replicates": describe_replicates(replicates, n_spots, n_seeds),
        "changes": {},
    }
    feats = None
    if morphology_encoder is not None:
        with torch.no_grad():
            feats = morphology_encoder(torch.from_numpy(flat).permute(0, 3, 1, 2).float()).reshape(
                n_states, n_spots, n_seeds, -1
            )
    predicted = None
    if predictor is not None and predictor_encoder is not None:
        if tile_um is None or spot_diameter_um is None:
            raise ValueError("reading expression back needs tile_um and spot_diameter_um (readback_geometry)")
        predicted = read_back(flat, predictor, predictor_encoder, tile_um, spot_diameter_um)
        predicted = predicted.reshape(n_states, n_spots, n_seeds, -1)
    tested = []
    for i in range(1, n_states):
        change = {k: replicate_change(stats[k][i], stats[k][0], replicates) for k in stats}
        tested += list(change.values())
        if feats is not None:
            dist = (feats[i] - feats[0]).norm(dim=-1).numpy()
            between_seeds = None  # the control's tiles of one spot, seed against seed
            if n_seeds > 1:
                pairs = np.triu_indices(n_seeds, 1)
                between_seeds = float(np.mean([torch.cdist(f, f).numpy()[pairs].mean() for f in feats[0]]))
            change["morphology_distance"] = {
                "mean": float(dist.mean()),
                "per_tile": dist.tolist(),
                "control_between_seeds": between_seeds,
            }
        if predicted is not None:
            shift = (predicted[i] - predicted[0]).mean(axis=(0, 1))
            order = np.argsort(-np.abs(shift))[:10]
            change["predicted_expression_shift"] = {predictor.genes[j]: float(shift[j]) for j in order}
        result["changes"][names[i]] = change
    result["multiplicity"] = adjust_changes(tested, alpha=ALPHA)
    return result


# -- the experiment ------------------------------------------------------------------------


def _perturbations(variants: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """Each variant entry must build a :class:`Perturbation` (its own checks apply)."""
    known = [f.name for f in dataclasses.fields(Perturbation)]
    for name, entries in variants.items():
        for i, entry in enumerate(entries):
            unknown = sorted(set(entry) - set(known))
            if unknown:
                raise ValueError(
                    f"variant {name!r}, change {i}: unknown keys {unknown}; use {', '.join(known)}"
                )
            try:
                Perturbation(**entry)
            except ValueError as err:
                raise ValueError(f"variant {name!r}, change {i}: {err}") from None
    return variants


class StateSpec(ConfigModel):
    """A target state for ``interpolate_to``: exactly one of a spot, a cluster or a sample."""

    spot: str | None = None
    cluster: Annotated[list[str], Field(min_length=2, max_length=2)] | None = None
    sample: str | None = None


class SimulateConfig(ConfigModel):
    """``stmdit simulate``: a pipeline, data, a start state and variants to compare with it."""

    config_name: ClassVar[str] = "simulate config"

    pipeline: PathStr
    data: PathStr
    out: PathStr
    spot: str | None = None
    cluster: Annotated[list[str], Field(min_length=2, max_length=2)] | None = None
    sample: str | None = None
    variants: Annotated[dict[str, list[dict[str, Any]]], AfterValidator(_perturbations)] = {}
    interpolate_to: StateSpec | None = None
    alphas: Annotated[list[Probability], Field(min_length=1)] = [0.25, 0.5, 0.75, 1.0]
    seeds: Annotated[list[int], Field(min_length=1)] = list(range(8))
    use_morphology: bool = False
    edit_strength: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    guidance_morph: float = defaults.GUIDANCE_MORPH
    guidance_ge: float = defaults.GUIDANCE_GE
    steps: Count = defaults.STEPS
    gene_sets: dict[str, list[str]] = {}
    predictor: PathStr | None = None
    # The unit of replication: "seeds" (one expression, the model's change for it) or, for a
    # cluster or a sample, "spots" (up to max_spots of its spots, each perturbed: the region's change).
    replicates: Literal["seeds", "spots"] = "seeds"
    max_spots: Count = 16

    @model_validator(mode="after")
    def _spots_need_a_region(self) -> SimulateConfig:
        if self.replicates == "spots" and self.spot is not None:
            raise ValueError(
                "replicates: spots draws spots of a cluster or a sample; a start spot is one "
                "expression: use replicates: seeds, or give cluster or sample"
            )
        return self


def load_expression_data(path: str | os.PathLike):
    """(AnnData with counts, tiles or None, tile_um or None) from a prepared store or an h5ad."""
    path = Path(path)
    if (path / "manifest.json").exists():
        store = DatasetStore(path)
        return store.spots(), store.tiles(), float(store.manifest()["prepare"]["tile_um"])
    if not (path.suffix == ".h5ad" and path.is_file()):
        raise FileNotFoundError(f"{path} is neither a prepared dataset folder nor an .h5ad file")
    if not h5py.is_hdf5(path):  # h5py's own error would not name the file
        raise InputFileError(
            path, "not an HDF5 file; expected an .h5ad written by anndata, or a prepared dataset folder"
        )
    # A damaged HDF5 file (truncated, say) gets the shared reader's error, which names it too.
    return read_anndata(path, "an .h5ad written by anndata"), None, None


def _state_keys(spec: SimulateConfig | StateSpec) -> dict:
    """The spot, cluster and sample of a config's start state or of ``interpolate_to``."""
    return {
        "spot": spec.spot,
        "cluster": tuple(spec.cluster) if spec.cluster else None,
        "sample": spec.sample,
    }


def _variant_states(
    control: ad.AnnData, cfg: SimulateConfig, reference: ad.AnnData, gene_sets: dict, target
) -> dict[str, ad.AnnData]:
    """The control and its variants (the config's perturbations, then the path to ``target``)."""
    variants = {"control": control}
    for name, spec in cfg.variants.items():
        variants[name] = perturb(
            control, [Perturbation(**p) for p in spec], reference=reference, gene_sets=gene_sets
        )
    if target is not None:
        path = interpolate(control, target, cfg.alphas)
        for i, name in enumerate(path.obs_names):
            variants[f"towards {target.obs['state'].iloc[0]} {name}"] = path[i : i + 1]
    return variants


def run_simulation(cfg: SimulateConfig, progress: bool = True) -> dict:
    """Generate the control and every variant over the seeds (and, with ``replicates: spots``,
    over spots of the region), measure, and write a report. ``progress`` shows a progress bar
    over the sampling, the bulk of the work."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    adata, tiles, tile_um = load_expression_data(cfg.data)
    # The named marker programmes ("lymphocyte markers", ...) beside the config's own sets.
    gene_sets = {**marker_programmes(), **cfg.gene_sets}
    start = _state_keys(cfg)
    rows, label = start_rows(adata, **start)
    target = start_state(adata, **_state_keys(cfg.interpolate_to)) if cfg.interpolate_to else None
    if cfg.replicates == "spots":
        chosen = np.random.default_rng(SPOT_CHOICE_SEED).choice(
            rows, size=min(cfg.max_spots, len(rows)), replace=False
        )
        controls = [start_state(adata, spot=str(adata.obs_names[r])) for r in np.sort(chosen)]
    else:
        controls = [start_state(adata, **start)]
    per_spot = [_variant_states(c, cfg, adata, gene_sets, target) for c in controls]
    names = list(per_spot[0])
    n_spots, n_states = len(controls), len(names)
    keys = [f"{k}:{name}" for k in range(n_spots) for name in names]
    states = ad.concat(
        [variants[name] for variants in per_spot for name in names], join="inner", keys=keys, index_unique=":"
    )
    states.obs_names = keys

    predictor = predictor_encoder = readback = None
    if cfg.predictor:  # before the sampling, so that a predictor that cannot read the tiles fails first
        predictor, predictor_encoder = load_predictor(cfg.predictor)
        if predictor_encoder is None:
            raise ValueError(
                f"predictor {cfg.predictor}: no morphology encoder (saved or named) to read tiles"
            )
        readback = readback_geometry(predictor, adata, rows, tile_um)
    pipe = STMDiTPipeline.from_pretrained(cfg.pipeline)
    morphology = init = real = None
    if (cfg.use_morphology or cfg.edit_strength) and cfg.spot is None:
        raise ValueError("morphology conditioning and tile editing start from a real spot: give spot")
    if cfg.use_morphology or cfg.edit_strength:
        if tiles is None:
            raise ValueError(f"{cfg.data} has no tiles; morphology and editing need a prepared dataset")
        real = np.asarray(tiles[int(rows[0])])
        real_t = to_tensor(real)
        morphology = real_t if cfg.use_morphology else None
        init = real_t if cfg.edit_strength else None
    generated = paired_generate(
        pipe,
        states,
        cfg.seeds,
        morphology=morphology,
        init_images=init,
        strength=cfg.edit_strength or 1.0,
        guidance_morph=cfg.guidance_morph,
        guidance_ge=cfg.guidance_ge,
        steps=cfg.steps,
        noise_streams=np.repeat(np.arange(n_spots), n_states),
        progress=progress,
    )
    # (n_spots * n_states, n_seeds, ...) spot-major -> (n_states, n_spots, n_seeds, ...)
    generated = generated.reshape(n_spots, n_states, *generated.shape[1:]).swapaxes(0, 1)
    result = measure(
        generated,
        names,
        morphology_encoder=pipe.morphology_encoder,
        predictor=predictor,
        predictor_encoder=predictor_encoder,
        tile_um=tile_um,
        spot_diameter_um=readback["spot_diameter_um"] if readback else None,
        replicates=cfg.replicates,
    )
    result["config"] = cfg.to_dict()
    if cfg.replicates == "spots":
        result["start_state"] = f"{label}: {n_spots} of its {len(rows)} spots, each its own control"
        result["replicates"]["spots"] = [str(adata.obs_names[r]) for r in np.sort(chosen)]
    elif len(rows) > 1:
        result["start_state"] = f"{label} (mean of {len(rows)} spots)"
        result["replicates"]["region"] = (
            "replicates: spots gives the region's change, over its spots and seeds"
        )
    else:
        result["start_state"] = label
    if readback:
        result["readback"] = readback
    _save_grid(generated, names, cfg, result, real if init is not None else None, out / "counterfactuals.png")
    _plot_changes(result, out / "changes.png")
    write_json(out / "simulation.json", result)
    write_text(out / "report.html", render_report(result))
    return result


def _save_grid(generated, names, cfg, result, real, path: Path) -> None:
    """One row per state: its tiles over the seeds (``replicates: spots``: over the spots, first
    seed). Editing: the original, its reconstruction (the control re-drawn under its own
    expression) and each edit (the same partial re-draw under the perturbed expression)."""
    if cfg.replicates == "spots":
        rows = [(name, generated[i, :, 0]) for i, name in enumerate(names)]
        titles = [f"{spot}, seed {cfg.seeds[0]}" for spot in result["replicates"]["spots"]]
    else:
        rows = [(name, generated[i, 0]) for i, name in enumerate(names)]
        titles = [f"seed {s}" for s in cfg.seeds]
    if real is not None:
        rows = [
            ("original", np.repeat(real[None] / 255.0, len(cfg.seeds), axis=0)),
            ("reconstruction", generated[0, 0]),
        ]
        rows += [(f"edit: {name}", generated[i, 0]) for i, name in enumerate(names) if i > 0]
    save_tile_grid(rows, path, column_titles=titles)


def change_rows(result: dict) -> list[dict]:
    """One row per variant and measure with an interval: the variant, the measure's name and its
    change (:func:`replicate_change`, with the multiplicity adjustment when there was a test)."""
    return [
        {"variant": variant, "key": key, "measure": MEASUREMENTS.get(key, key), **c}
        for variant, change in result["changes"].items()
        for key, c in change.items()
        if isinstance(c, dict) and "mean_change" in c
    ]


def summary_lines(result: dict) -> list[str]:
    """The measured changes as lines of text: per variant, each measure's change and interval."""
    lines = [f"start: {result['start_state']}; changes {result['replicates']['description']}"]
    parts = {variant: [] for variant in result["changes"]}
    for row in change_rows(result):
        ci = "(no interval)" if row["ci_low"] is None else f"[{row['ci_low']:+.3f}, {row['ci_high']:+.3f}]"
        parts[row["variant"]].append(f"{row['key']} {row['mean_change']:+.3f} {ci}")
    return lines + [f"{variant}: " + "; ".join(shown) for variant, shown in parts.items()]


def render_report(result: dict) -> str:
    """report.html (templates/simulate_report.html.j2): the experiment, its image grids and the
    measured changes with their intervals, what they are over, and which survive Holm."""
    environment = Environment(
        loader=PackageLoader("stmdit.experiments", "templates"),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return environment.get_template("simulate_report.html.j2").render(
        result=result, config=result["config"], rows=change_rows(result)
    )


def _plot_changes(result: dict, path: Path) -> None:
    variants = list(result["changes"])
    if not variants:
        return
    keys = [k for k in MEASUREMENTS if k in result["changes"][variants[0]]]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        changes = [result["changes"][v][key] for v in variants]
        mean = [c["mean_change"] for c in changes]
        errors = None  # no interval with one replicate
        if changes[0]["ci_low"] is not None:
            errors = np.abs(
                [[c["ci_low"] for c in changes], [c["ci_high"] for c in changes]] - np.array(mean)
            )
        ax.bar(range(len(variants)), mean, yerr=errors, capsize=3)
        spread = changes[0]["control_seed_sd"]
        if spread is not None:
            ax.axhspan(-spread, spread, color="grey", alpha=0.2, label="control seed-to-seed sd")
        ax.axhline(0, color="black", linewidth=0.5)
        ax.set_xticks(range(len(variants)), [v[:18] for v in variants], rotation=30, ha="right", fontsize=7)
        ax.set_title(f"change in {MEASUREMENTS[key]}", fontsize=8)
    if changes[0]["control_seed_sd"] is not None:
        axes[0, 0].legend(fontsize=6)
    save_figure(fig, path)
