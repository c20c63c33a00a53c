"""``stmdit evaluate``: several models on the same held-out spots and seeds, as the paper's table.

For every model (a pipeline folder) and setting, tiles are generated for the held-out spots of
a prepared dataset with per-spot noise that depends only on (seed, spot), so all models and
settings see identical noise. Settings of a GE model: ``ge`` (the spot's measured expression),
and the GE ablations ``null`` (expression removed: the GE null) and ``shuffled`` (another
held-out spot's expression); a no-GE model has the single setting ``none``. Optionally the GE
guidance scale is swept.

Numbers, each with its protocol:

* image metrics against the real tiles of the same spots (resized to the model's resolution):
  FID and KID on Inception features and FD in the morphology encoder's feature space;
* transcriptomic fidelity: the expression predictor applied to the generated tiles, compared
  with the spot's measured expression, as DeepSpot's AUC per test sample (then averaged); the
  predictor on the real tiles gives the ceiling. Sub-spots come from the generated tile itself
  and neighbours from the generated tiles of the neighbouring spots (every held-out spot of a
  sample is generated). In the ``shuffled`` setting the comparison is still with the spot's own
  measured expression, so a model that follows its GE loses fidelity there. One rule reads
  every tile (:mod:`stmdit.predictor.readback`): on the predictor's training pixel grid, and for
  the ceiling of a model the real tiles are first reduced to the model's resolution, so its
  ratio to the ceiling compares tiles of equal detail (one ceiling per resolution).
* the GE-ablation deltas: metric(ablated) - metric(ge), per metric and ablation.

Generated tiles are saved (``generated/<model>/<setting>/seed<k>.npy``) and reused, so an
interrupted evaluation continues where it stopped.

Everything is written under ``out``; the evaluated pipelines, the dataset and the predictor are
only read. Each model's card with its metrics table goes to ``out/model_cards/<model>.md``; the
pipeline's own ``README.md`` is updated too only with ``update_model_card`` (a pipeline on a
read-only share can be evaluated, and two evaluations of one model do not race on its card).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, ClassVar, Literal

import numpy as np
from pydantic import AfterValidator, BeforeValidator, Field
from tqdm.auto import tqdm

from stmdit import defaults
from stmdit.config import ConfigModel, Count, NonNegativeInt, PathStr
from stmdit.evaluate.fidelity import bootstrap_interval, ceiling_ratio, fidelity_auc
from stmdit.io import safe_file_name, save_npy, write_json
from stmdit.model_card import update_model_card
from stmdit.tiles import resize, to_tensor, to_uint8

logger = logging.getLogger(__name__)


def _file_name_safe(names: dict[str, str]) -> dict[str, str]:
    """Model names become folder names under ``out/generated``."""
    for name in names:
        if safe_file_name(name) != name:
            raise ValueError(
                f"model name {name!r} cannot be a folder name; use letters, digits, '.', '_' and '-' "
                f"(e.g. {safe_file_name(name)!r})"
            )
    return names


def _interval(bounds: tuple[float, float]) -> tuple[float, float]:
    if not 0 <= bounds[0] < bounds[1]:
        raise ValueError(f"must be [low, high] with 0 <= low < high; got {list(bounds)}")
    return bounds


class EvaluateConfig(ConfigModel):
    """What ``stmdit evaluate`` compares. ``models`` maps a name to a pipeline folder."""

    config_name: ClassVar[str] = "evaluate config"

    out: PathStr
    dataset: PathStr
    models: Annotated[dict[str, PathStr], Field(min_length=1), AfterValidator(_file_name_safe)]
    predictor: PathStr | None = None
    split: str = "test"
    samples: list[str] | None = None
    max_spots_per_sample: Count | None = None
    seeds: Annotated[list[int], Field(min_length=1)] = [0]
    inputs: Literal["both", "ge_only"] = "both"
    guidance_morph: float = defaults.GUIDANCE_MORPH
    guidance_ge: float = defaults.GUIDANCE_GE
    # GE guidance only at noise levels sigma in (low, high] (interval guidance); None: every step.
    guidance_ge_interval: Annotated[tuple[float, float], AfterValidator(_interval)] | None = None
    steps: Count = defaults.STEPS
    # YAML reads a bare `null` as nothing; here it can only mean the "null" ablation.
    ablations: list[
        Annotated[Literal["null", "shuffled"], BeforeValidator(lambda v: "null" if v is None else v)]
    ] = [
        "null",
        "shuffled",
    ]
    sweep_guidance_ge: list[float] = []
    inception_weights: PathStr | None = None
    # FID/KID weights are never fetched unless asked: without them those two metrics are skipped.
    download_weights: bool = False
    fd_encoder: str = "store"
    # torch-fidelity's defaults; a set smaller than the subset size gives smaller subsets, warned about.
    kid_subsets: Count = 100
    kid_subset_size: Count = 1000
    n_bootstrap: NonNegativeInt = 1000
    batch_size: Count = 16
    grid_spots: Count = 8
    scatter_genes: list[str] = []
    # Also write the metrics into each pipeline's own README.md; by default the pipelines are only
    # read and the cards go to out/model_cards/ (MODEL_CARDS).
    update_model_card: bool = False


# Where an evaluation's report folder keeps each model's card: <out>/model_cards/<model>.md.
MODEL_CARDS = "model_cards"


def model_card_path(out: str | os.PathLike, name: str) -> Path:
    """The card with its metrics of the model ``name`` in the report folder ``out``."""
    return Path(out) / MODEL_CARDS / f"{name}.md"


@dataclass
class HeldOut:
    """The evaluated spots: their AnnData (counts), real tiles and geometry."""

    adata: object
    tiles: np.ndarray
    tile_um: float
    spot_diameter_um: np.ndarray
    samples: np.ndarray


def held_out_spots(cfg: EvaluateConfig) -> HeldOut:
    from stmdit.predictor import SpotSet

    spots = SpotSet.from_store(cfg.dataset, split=cfg.split, samples=cfg.samples)
    if len(spots) == 0:
        raise ValueError(f"{cfg.dataset}: split {cfg.split!r} has no kept spots to evaluate on")
    rows = np.arange(len(spots))
    if cfg.max_spots_per_sample:
        # The first spots of each sample in reading order: a contiguous patch, so neighbours stay.
        sample = spots.adata.obs["sample_id"].astype(str).to_numpy()
        rows = np.concatenate(
            [np.flatnonzero(sample == s)[: cfg.max_spots_per_sample] for s in dict.fromkeys(sample)]
        )
        spots = spots.subset(rows)
    tiles = np.asarray(spots.tiles[np.arange(len(spots))])
    diam = np.broadcast_to(np.asarray(spots.spot_diameter_um, dtype=float), (len(spots),)).copy()
    return HeldOut(
        spots.adata, tiles, spots.tile_um, diam, spots.adata.obs["sample_id"].astype(str).to_numpy()
    )


def check_inputs(cfg: EvaluateConfig) -> None:
    """Every folder and file the evaluation reads exists, before any work starts."""
    from stmdit.evaluate.image_metrics import INCEPTION_WEIGHTS_ENV

    problems = []
    if not (Path(cfg.dataset) / "manifest.json").is_file():
        problems.append(f"dataset {cfg.dataset} is not a prepared dataset (no manifest.json)")
    for name, folder in cfg.models.items():
        if not (Path(folder) / "model_index.json").is_file():
            problems.append(f"models.{name}: {folder} is not a pipeline folder (no model_index.json)")
    if cfg.predictor and not (Path(cfg.predictor) / "config.json").is_file():
        problems.append(f"predictor {cfg.predictor} is not a predictor folder (no config.json)")
    weights = cfg.inception_weights or os.environ.get(INCEPTION_WEIGHTS_ENV)
    if weights and not Path(weights).expanduser().is_file():
        given = "inception_weights" if cfg.inception_weights else INCEPTION_WEIGHTS_ENV
        problems.append(f"{given}: the Inception weights file {weights} does not exist")
    if problems:
        raise FileNotFoundError("evaluate cannot start: " + "; ".join(problems))


def inception_extractor(cfg: EvaluateConfig):
    """(the FID Inception network, None) or (None, why FID and KID are skipped and how to enable them)."""
    from stmdit.evaluate.image_metrics import InceptionFeatures
    from stmdit.hub import WeightsUnavailableError

    try:
        return InceptionFeatures(cfg.inception_weights, download=cfg.download_weights), None
    except (WeightsUnavailableError, ImportError) as err:
        how = (
            "pass --inception-weights FILE (or set inception_weights, or STMDIT_INCEPTION_WEIGHTS), or "
            "--download-weights to fetch it"
        )
        return None, f"FID and KID skipped: {err} To compute them, {how}."


def caveat_lines(caveats: list[dict]) -> list[str]:
    """One line per kind of caveat (per metric), however many models, settings, seeds and samples
    share it: the overall instance's text, and the samples it also concerns."""
    kinds: dict[tuple, list[dict]] = {}
    for caveat in caveats:
        kinds.setdefault((caveat["metric"], caveat["kind"]), []).append(caveat)
    lines = []
    for (metric, _), found in kinds.items():
        overall = [c for c in found if c["group"] is None]
        groups = sorted({str(c["group"]) for c in found if c["group"] is not None})
        line = (f"{metric}: " if metric else "") + (overall or found)[0]["text"]
        if groups:
            line += (
                f" [{'also ' if overall else ''}for samples {', '.join(groups)}, with their own image counts]"
            )
        lines.append(line)
    return lines


def _model_resolution(pipe) -> int:
    size = pipe.transformer.config.sample_size
    if pipe.vae is None:
        return size
    return size * 2 ** (len(pipe.vae.config.block_out_channels) - 1)


def generate_setting(
    pipe,
    folder: str,
    held: HeldOut,
    setting: str,
    seed: int,
    cfg: EvaluateConfig,
    guidance_ge: float,
    path: Path,
) -> np.ndarray:
    """Tiles (N, R, R, 3) uint8 for every held-out spot under one setting; cached at ``path``
    with a record of what made them, so a rerun with other parameters regenerates."""
    import json

    from stmdit.generate import spot_generator

    n = held.adata.n_obs
    if setting in ("null", "none"):
        order, expression = None, None  # the GE null embedding, or a model without GE
    elif setting == "shuffled":
        order, expression = np.random.default_rng(seed).permutation(n), "another spot's"
    else:  # "ge" and the guidance sweep's "ge@<scale>"
        order, expression = np.arange(n), "the spot's own"
    made_by = {
        "pipeline": str(Path(folder).resolve()),
        "scheduler": {
            "class": type(pipe.scheduler).__name__,
            **{k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")},
        },
        "setting": setting,
        "expression": expression,
        "seed": seed,
        "inputs": cfg.inputs,
        "guidance_morph": cfg.guidance_morph,
        "guidance_ge": guidance_ge,
        "steps": cfg.steps,
        "spots": list(map(str, held.adata.obs_names)),
    }
    if cfg.guidance_ge_interval is not None:
        made_by["guidance_ge_interval"] = list(cfg.guidance_ge_interval)
    record = path.with_suffix(".json")
    if path.exists() and record.exists() and json.loads(record.read_text()) == made_by:
        return np.load(path)
    interval = None if cfg.guidance_ge_interval is None else tuple(cfg.guidance_ge_interval)
    out = []
    for start in tqdm(
        range(0, n, cfg.batch_size), desc=f"{path.parent.parent.name}/{setting}/seed{seed}", leave=False
    ):
        idx = np.arange(start, min(start + cfg.batch_size, n))
        kwargs = {}
        if order is not None:
            kwargs["expression"] = held.adata[order[idx]]
        if cfg.inputs == "both":
            kwargs["morphology"] = to_tensor(held.tiles[idx])
        if not kwargs:
            kwargs["num_images"] = len(idx)
        images = pipe(
            **kwargs,
            guidance_morph=cfg.guidance_morph,
            guidance_ge=guidance_ge,
            num_inference_steps=cfg.steps,
            generator=[spot_generator(seed, int(i)) for i in idx],
            output_type="np",
            progress=False,
            guidance_ge_interval=interval,
        ).images
        out.append(to_uint8(images))
    tiles = np.concatenate(out)
    save_npy(path, tiles)
    write_json(record, made_by)
    return tiles


def _settings(pipe, cfg: EvaluateConfig) -> list[tuple[str, float]]:
    if not pipe.transformer.has_ge:
        return [("none", cfg.guidance_ge)]
    out = [("ge", cfg.guidance_ge)] + [(a, cfg.guidance_ge) for a in cfg.ablations]
    out += [(f"ge@{s:g}", s) for s in cfg.sweep_guidance_ge if s != cfg.guidance_ge]
    return out


def _fidelity(
    predictor,
    encoder,
    tiles_u8: np.ndarray,
    held: HeldOut,
    measured: np.ndarray,
    n_bootstrap: int,
    detail_px: int | None = None,
) -> dict:
    """DeepSpot AUC per sample of the predictor reading these tiles against the measured
    expression. The tiles are read as :func:`stmdit.predictor.readback.read_expression` reads
    every tile: on the predictor's training grid, after reducing them to ``detail_px`` pixels
    (real tiles for the ceiling of generated tiles of that resolution)."""
    from stmdit.predictor.readback import read_expression

    predicted = read_expression(
        tiles_u8,
        held.adata.obs,
        held.tile_um,
        held.spot_diameter_um,
        predictor,
        encoder,
        detail_px=detail_px,
    )
    per_sample, replicates = {}, []
    for sample in dict.fromkeys(held.samples):
        rows = held.samples == sample
        if rows.sum() < 3:
            continue
        res = fidelity_auc(
            measured[rows],
            predicted[rows],
            predictor.hvg_order,
            n_bootstrap=n_bootstrap,
            gene_protocol=predictor.gene_protocol,
        )
        per_sample[sample] = res.to_dict()
        replicates.append(res.bootstrap_aucs)
    if not per_sample:
        raise ValueError("fidelity needs at least 3 spots in some sample")
    aucs = [r["auc"] for r in per_sample.values()]
    # Every sample's bootstrap draws the same gene ranks (one seed), so replicates pair up and
    # their mean over samples is the bootstrap of the mean AUC.
    boot = np.mean(replicates, axis=0)
    return {
        "auc": float(np.mean(aucs)),
        "interval": bootstrap_interval(boot),
        "bootstrap_aucs": boot,
        "per_sample": per_sample,
        "predicted": predicted,
        "protocol": next(iter(per_sample.values()))["protocol"],
    }


def _ceiling_record(fidelity: dict, detail_px: int, store_px: int) -> dict:
    """A ceiling as ``metrics.json`` keeps it: the fidelity on the real tiles at ``detail_px``."""
    tiles = (
        f"real tiles at the store's {store_px} px"
        if detail_px == store_px
        else f"real tiles reduced from {store_px} to {detail_px} px (the generated tiles' resolution)"
    )
    kept = {k: v for k, v in fidelity.items() if k not in ("predicted", "bootstrap_aucs")}
    return {"detail_px": detail_px, "tiles": tiles, **kept}


def _mean_std(values: list[float | None]) -> dict:
    """Mean and std over seeds; a metric withheld for every seed (too few images) stays None."""
    arr = np.asarray([np.nan if v is None else v for v in values], dtype=float)
    if np.isnan(arr).all():
        return {"mean": None, "std": None, "per_seed": values}
    return {"mean": float(np.nanmean(arr)), "std": float(np.nanstd(arr)), "per_seed": values}


def _deltas(ablated: dict, reference: dict) -> dict:
    """metric(ablated) - metric(reference) for every metric both have a value for."""
    out = {}
    for metric, entry in reference.items():
        other = ablated.get(metric)
        if isinstance(entry, dict) and isinstance(other, dict) and None not in (entry["mean"], other["mean"]):
            out[metric] = other["mean"] - entry["mean"]
    return out


def evaluate(cfg: EvaluateConfig, progress: bool = True) -> dict:
    """Run the evaluation and write ``metrics.json`` and the HTML report into ``cfg.out``."""
    from stmdit.data.encode import load_encoders
    from stmdit.data.store import DatasetStore
    from stmdit.evaluate.image_metrics import MorphologyFeatures, compute_image_metrics
    from stmdit.evaluate.report import write_report
    from stmdit.pipeline import STMDiTPipeline
    from stmdit.predictor import expression_targets, load_predictor

    check_inputs(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    held = held_out_spots(cfg)
    store = DatasetStore(cfg.dataset)
    if cfg.fd_encoder == "store":
        fd_encoder = load_encoders(store)["morphology_encoder"]
    else:
        from stmdit.encoders.factory import build_morphology_encoder

        fd_encoder = build_morphology_encoder(cfg.fd_encoder, to_tensor(held.tiles))
    if fd_encoder is None:
        raise ValueError(
            f"{cfg.dataset} has no saved morphology encoder for FD; run `stmdit encode` or set fd_encoder"
        )
    inception, skipped = inception_extractor(cfg)
    extractors = {"morph": MorphologyFeatures(fd_encoder, type(fd_encoder).__name__)}
    if inception is not None:
        extractors["inception"] = inception
    reference = (
        f"real tiles of the same {held.adata.n_obs} held-out spots ({cfg.split} split of {cfg.dataset}; "
        f"{held.tile_um:g} µm tiles, resized to each model's resolution)"
    )

    predictor = encoder = measured = None
    store_px = int(held.tiles.shape[1])
    results: dict = {
        "models": {},
        "config": cfg.to_dict(),
        "n_spots": int(held.adata.n_obs),
        "samples": sorted(set(held.samples)),
        "skipped": {},
    }
    if skipped:
        results["skipped"] = {"fid": skipped, "kid": skipped}
    if cfg.predictor:
        predictor, encoder = load_predictor(cfg.predictor)
        if encoder is None:
            raise ValueError(
                f"{cfg.predictor} records no morphology encoder to rebuild; retrain it with stmdit train-predictor"
            )
        measured = expression_targets(held.adata, predictor.genes, source=f"{cfg.dataset} spots")
        ceiling = _fidelity(predictor, encoder, held.tiles, held, measured, cfg.n_bootstrap)
        # The ceiling at the store's resolution; a model at a coarser one is compared with the
        # real tiles reduced to its resolution (``ceilings``, by detail in px).
        results["ceiling"] = _ceiling_record(ceiling, store_px, store_px)
        results["ceilings"] = {str(store_px): results["ceiling"]}
        results["predictor"] = {
            "path": str(cfg.predictor),
            "genes": len(predictor.genes),
            "gene_protocol": predictor.gene_protocol,
        }
        predictions = {"real": ceiling["predicted"]}

    samples_for_grid: dict[str, np.ndarray] = {}
    real_caches: dict[int, dict] = {}  # resolution -> real-tile features, shared by models and settings
    for name, folder in tqdm(cfg.models.items(), desc="models", disable=not progress):
        pipe = STMDiTPipeline.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        size = _model_resolution(pipe)
        real = resize(held.tiles, size)
        real_cache = real_caches.setdefault(size, {})
        model_res = {
            "pipeline": str(folder),
            "resolution": size,
            "has_ge": bool(pipe.transformer.has_ge),
            "settings": {},
        }
        ceiling = None
        if predictor is not None:
            detail = min(size, store_px)  # generated tiles carry no more detail than their pixels
            if str(detail) not in results["ceilings"]:
                real_fidelity = _fidelity(
                    predictor, encoder, held.tiles, held, measured, cfg.n_bootstrap, detail_px=detail
                )
                results["ceilings"][str(detail)] = _ceiling_record(real_fidelity, detail, store_px)
            ceiling = results["ceilings"][str(detail)]
            model_res["ceiling"] = {k: ceiling[k] for k in ("detail_px", "tiles", "auc", "interval")}
        for setting, s_g in _settings(pipe, cfg):
            seeds = cfg.seeds if "@" not in setting else cfg.seeds[:1]
            per_seed = {"fid": [], "kid": [], "fd_morph": [], "fidelity_auc": []}
            replicates = []  # per seed: the fidelity AUC's bootstrap replicates (same gene draws)
            details = {}
            for seed in seeds:
                path = out / "generated" / name / setting / f"seed{seed}.npy"
                fake = generate_setting(pipe, folder, held, setting, seed, cfg, s_g, path)
                if seed == seeds[0] and setting in ("ge", "none"):
                    samples_for_grid[name] = fake[: cfg.grid_spots]
                metrics = compute_image_metrics(
                    real,
                    fake,
                    extractors,
                    kid_subsets=cfg.kid_subsets,
                    kid_subset_size=cfg.kid_subset_size,
                    per_group=held.samples,
                    reference=reference,
                    seed=seed,
                    real_cache=real_cache,
                )
                overall = metrics["overall"]
                if inception is not None:
                    per_seed["fid"].append(overall["fid"]["value"])
                    per_seed["kid"].append(overall["kid"]["mean"])
                per_seed["fd_morph"].append(overall["fd_morph"]["value"])
                details[f"seed{seed}"] = {"image_metrics": metrics}
                if predictor is not None:
                    fid_res = _fidelity(predictor, encoder, fake, held, measured, cfg.n_bootstrap)
                    per_seed["fidelity_auc"].append(fid_res["auc"])
                    replicates.append(fid_res["bootstrap_aucs"])
                    details[f"seed{seed}"]["fidelity"] = {
                        k: v for k, v in fid_res.items() if k not in ("predicted", "bootstrap_aucs")
                    }
                    if seed == seeds[0]:
                        predictions[f"{name}/{setting}"] = fid_res["predicted"]
            summary = {k: _mean_std(v) for k, v in per_seed.items() if v}
            if replicates:
                # 95% gene-bootstrap interval of the seed-mean AUC (the seeds share the draws).
                summary["fidelity_auc"]["interval"] = bootstrap_interval(np.mean(replicates, axis=0))
            # The ratio to the ceiling at the model's own resolution; a ceiling at or below zero
            # means nothing, and the report then shows no ratio.
            if "fidelity_auc" in summary and ceiling is not None and ceiling["auc"] > 0:
                summary["fidelity_ratio_to_ceiling"] = ceiling_ratio(
                    summary["fidelity_auc"]["mean"], ceiling["auc"]
                )
            model_res["settings"][setting] = {"guidance_ge": s_g, "summary": summary, "details": details}
        settings = model_res["settings"]
        if "ge" in settings:
            model_res["ge_ablation"] = {
                ablation: _deltas(settings[ablation]["summary"], settings["ge"]["summary"])
                for ablation in cfg.ablations
            }
        results["models"][name] = model_res
        source = f"{cfg.split} split of {cfg.dataset}, seeds {cfg.seeds}"
        card = update_model_card(folder, model_res, source=source, target=model_card_path(out, name))
        model_res["model_card"] = str(card)
        if cfg.update_model_card:
            model_res["pipeline_card"] = str(update_model_card(folder, model_res, source=source))
        del pipe

    sources = set(held.adata.obs.get("expression_source", ["measured"]))
    if sources == {"predicted"}:
        results["ood"] = {
            "cohort": f"{cfg.dataset} ({cfg.split} split): H&E-only slides with pseudo-labels as expression",
            "reference": "the cohort's own real tiles of the same pseudo-spots",
            "fidelity_note": "expression is predicted, so 'fidelity' here is consistency with the pseudo-labels",
            "delta_ood": {
                name: m["ge_ablation"]["null"].get("fid")
                for name, m in results["models"].items()
                if "null" in m.get("ge_ablation", {})
            },
            "models": {
                name: m["settings"].get("ge", m["settings"].get("none"))["summary"]
                for name, m in results["models"].items()
            },
        }
    results["warnings"] = ([skipped] if skipped else []) + caveat_lines(
        [
            c
            for m in results["models"].values()
            for s in m["settings"].values()
            for d in s["details"].values()
            for c in d["image_metrics"]["caveats"]
        ]
    )
    for ceiling in results.get("ceilings", {}).values():
        if not ceiling["auc"] > 0:
            results["warnings"].append(
                f"the real-tile fidelity ceiling is {ceiling['auc']:.3f} on the {ceiling['tiles']}: the predictor "
                "does not read expression from these tiles, so fidelity AUCs and their ratios to it are not "
                "informative"
            )
    if "ceiling" in results and results["ceiling"]["protocol"]["departures"]:
        results["warnings"].append(
            "fidelity AUC departs from DeepSpot's protocol: "
            + "; ".join(results["ceiling"]["protocol"]["departures"])
        )
    results["protocol"] = {
        "spots": reference,
        "noise": "per spot: torch.Generator seeded by (seed, spot index); identical across models and settings",
        "inputs": cfg.inputs,
        "guidance": {
            "morph": cfg.guidance_morph,
            "ge": cfg.guidance_ge,
            "ge_interval": cfg.guidance_ge_interval,
        },
        "steps": cfg.steps,
        "settings": {
            "ge": "the spot's measured expression",
            "null": "expression removed (GE null embedding)",
            "shuffled": "another held-out spot's expression (fixed permutation per seed)",
            "none": "no-GE model",
        },
        "ge_ablation": "metric(ablated) - metric(ge); positive for FID/KID/FD and negative for fidelity mean GE helps",
        "fidelity": "predictor on generated tiles (sub-spots from the tile, neighbours from the generated tiles of "
        "neighbouring spots) against the spot's measured log1p CP10k; DeepSpot AUC per sample, mean over samples. "
        "Every tile, real or generated, is read on the predictor's training pixel grid (its provenance tile_px; "
        "stmdit.predictor.readback)",
        "ceiling": "the predictor on the real tiles of the same spots, first reduced to the generated tiles' "
        "resolution (a model's, at most the store's), then put on its training grid as generated tiles are: a "
        "model's fidelity / ceiling divides by the ceiling at its own resolution (models.<name>.ceiling, "
        "ceilings.<px>); the top-level ceiling is the one at the store's resolution",
    }
    write_json(out / "metrics.json", results)
    real_grid = held.tiles[: cfg.grid_spots]
    write_report(
        out,
        results,
        real_grid,
        samples_for_grid,
        held,
        measured,
        predictions if predictor else None,
        predictor.genes if predictor else [],
        cfg.scatter_genes,
    )
    return results
