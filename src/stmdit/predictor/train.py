"""Training the expression predictor: genes, targets, the fit, leave-one-patient-out folds, and
the ``stmdit train-predictor`` command."""

from __future__ import annotations

import copy
import logging
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from stmdit.data.store import DatasetStore
from stmdit.encoders.factory import build_morphology_encoder, describe
from stmdit.predictor.features import ContextFeatures, context_features, spot_crops, take_rows
from stmdit.predictor.genes import PAPER_GENE_SELECTION, PAPER_N_GENES, select_predictor_genes
from stmdit.predictor.graph import DEEPSPOT_RULE, check_rule, neighbour_index
from stmdit.predictor.model import PREDICTION_KEY, ExpressionPredictor, PredictorFit
from stmdit.predictor.pseudocounts import fit_zero_calibration
from stmdit.predictor.spots import SpotSet, expression_targets, per_gene_pearson, require_counts
from stmdit.predictor.storage import save_predictor

logger = logging.getLogger(__name__)

NEIGHBOUR_RADIUS = 1  # DeepSpot's radius_neighbors in its examples and its inference default


def _default_device(device) -> torch.device:
    return (
        torch.device(device)
        if device is not None
        else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )


def fit_predictor(
    features: ContextFeatures,
    targets: np.ndarray,
    genes: Sequence[str],
    val: tuple[ContextFeatures, np.ndarray] | None = None,
    epochs: int = 100,
    batch_size: int = 256,
    lr: float = 1e-4,
    weight_decay: float = 1e-6,
    patience: int = 10,
    seed: int = 0,
    model_kwargs: dict | None = None,
    provenance: dict | None = None,
    device=None,
    progress: bool = True,
) -> PredictorFit:
    """Train an :class:`ExpressionPredictor` on precomputed features and log1p CP10k targets.

    Targets are standardised with their own mean and std (kept in the model). MSE loss, AdamW
    (DeepSpot: lr 1e-4, weight decay 1e-6). The neighbour slots of a training batch are as many
    as the most neighbours of a training spot (DeepSpot's ``max_n_neighbors``), which the
    model's default ``neighbour_padding="zeros"`` fills with zero features as DeepSpot's
    dataloader does. With ``val`` = (features, targets), training stops
    after ``patience`` epochs without a lower validation loss and the best epoch's weights are
    kept; without it all ``epochs`` run. Deterministic for a given ``seed`` on one device
    (weights, shuffling and dropout draw from a private seeded RNG state).
    """
    targets = np.asarray(targets, dtype=np.float32)
    genes = [str(g) for g in genes]
    if targets.shape != (len(features), len(genes)):
        raise ValueError(
            f"targets must be (n_spots, n_genes) = ({len(features)}, {len(genes)}); got {targets.shape}"
        )
    if not np.isfinite(targets).all():
        raise ValueError("targets contain NaN or infinite values")
    if val is not None and (val[0].dim != features.dim or np.shape(val[1]) != (len(val[0]), len(genes))):
        raise ValueError(
            f"validation features/targets must be ({len(val[0])}, {features.dim}) / ({len(val[0])}, {len(genes)})"
        )
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1; got {epochs}, {batch_size}")
    device = _default_device(device)
    features = features.compact()
    mean, std = targets.mean(0), np.maximum(targets.std(0), 1e-3)
    z = torch.from_numpy((targets - mean) / std)
    z_val = (
        torch.from_numpy(((np.asarray(val[1], np.float32) - mean) / std).astype(np.float32)) if val else None
    )

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        model = ExpressionPredictor(
            genes=genes, input_dim=features.dim, provenance=provenance, **(model_kwargs or {})
        )
        model.set_scaler(mean, std)
        model.to(device)
        optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        order = torch.Generator().manual_seed(seed)
        history = {"train_loss": [], "val_loss": [], "best_epoch": None, "epochs_run": 0}
        best, best_state, waited = math.inf, None, 0
        for epoch in tqdm(range(epochs), desc="training predictor", unit="epoch", disable=not progress):
            model.train()
            total = 0.0
            for rows in torch.randperm(len(features), generator=order).split(batch_size):
                loss = nn.functional.mse_loss(model(*features.batch(rows, device)), z[rows].to(device))
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                total += float(loss.detach()) * len(rows)
            history["train_loss"].append(total / len(features))
            history["epochs_run"] = epoch + 1
            if val is None:
                continue
            loss_val = _loss(model, val[0], z_val, batch_size, device)
            history["val_loss"].append(loss_val)
            if loss_val < best:
                best, best_state, waited = loss_val, copy.deepcopy(model.state_dict()), 0
                history["best_epoch"] = epoch + 1
            else:
                waited += 1
                if waited >= patience:
                    break
        if best_state is not None:
            model.load_state_dict(best_state)
        else:
            history["best_epoch"] = history["epochs_run"]
    return PredictorFit(model.eval(), history)


@torch.no_grad()
def _loss(
    model: ExpressionPredictor, features: ContextFeatures, z: torch.Tensor, batch_size: int, device
) -> float:
    model.eval()
    total = 0.0
    for start in range(0, len(features), batch_size):
        rows = torch.arange(start, min(start + batch_size, len(features)))
        total += float(
            nn.functional.mse_loss(model(*features.batch(rows, device)), z[rows].to(device), reduction="sum")
        )
    return total / (len(features) * z.shape[1])


def train_predictor(
    train: SpotSet,
    encoder,
    n_genes: int = PAPER_N_GENES,
    val: SpotSet | None = None,
    epochs: int = 100,
    batch_size: int = 256,
    lr: float = 1e-4,
    seed: int = 0,
    leave_one_patient_out: bool = False,
    patience: int = 10,
    model_kwargs: dict | None = None,
    progress: bool = True,
    device=None,
    gene_selection: str = PAPER_GENE_SELECTION,
    neighbours: str = DEEPSPOT_RULE,
) -> PredictorFit:
    """Encode ``train`` (and ``val``) in context, choose genes, and fit.

    Genes: by default DeepSpot's, the top ``n_genes`` = 5,000 highly variable genes of scanpy's
    ``seurat_v3_paper`` with the sample as batch key on the training spots' raw counts, kept in
    scanpy's selection order; ``gene_selection="seurat_v3"`` (scanpy's other ranking) and
    ``"variance"`` (variance of log1p CP10k) are departures (see
    :func:`~stmdit.predictor.genes.select_predictor_genes`). ``neighbours``: the neighbour rule
    of :func:`~stmdit.predictor.graph.neighbour_index`, by default DeepSpot's box on the array
    coordinates (radius 1); ``"hex_ring"`` is a departure. ``model_kwargs`` may set
    ``neighbour_padding="masked"`` or another ``output_dropout`` (departures too). Every
    departure is warned about and recorded in the provenance (``gene_selection``,
    ``neighbour_rule``, ``protocol_departures``), as are the training tiles' size (``tile_um``,
    ``tile_px``), which pseudo-labelling reads slides at. ``val`` early-stops training (see
    :func:`fit_predictor`).

    ``leave_one_patient_out``: additionally, for every patient of ``train`` (``obs['patient_id']``,
    at least two), a model trained without that patient (genes chosen again on its training
    spots), with its predictions for the held-out spots, in :attr:`PredictorFit.folds`; this
    estimates how the model trained on all patients (:attr:`PredictorFit.predictor`) does on a
    new patient, as DeepSpot evaluates. Morphology features are computed once and shared.
    """
    require_counts(train.adata, "training spots")
    check_rule(neighbours)
    if leave_one_patient_out:
        patients = _patients(train.adata)

    def encode(spots: SpotSet) -> ContextFeatures:
        index = neighbour_index(spots.adata.obs, NEIGHBOUR_RADIUS, neighbours)
        return context_features(
            spots.tiles, spots.adata.obs, spots.tile_um, spots.spot_diameter_um, encoder,
            neighbours=index, progress=progress,
        )  # fmt: skip

    features = encode(train)
    val_features = encode(val) if val is not None and len(val) else None
    d = np.unique(np.asarray(train.spot_diameter_um, dtype=np.float64))
    base = {
        "trained_by": "stmdit train_predictor",
        "morphology_encoder": describe(encoder),
        "tile_um": float(train.tile_um),
        "tile_px": train.tile_px,
        "spot_diameter_um": d.tolist(),
        "neighbour_radius": NEIGHBOUR_RADIUS,
        "neighbour_rule": neighbours,
        "seed": int(seed),
    }
    settings = {
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "patience": patience,
        "model_kwargs": model_kwargs,
        "progress": progress,
        "device": device,
    }

    def fit(rows: np.ndarray, extra: dict) -> PredictorFit:
        adata = train.adata[rows]
        genes, protocol = select_predictor_genes(adata, n_genes, gene_selection)
        targets = expression_targets(adata, genes, source="training spots")
        val_pair = None
        if val_features is not None:
            val_pair = (val_features, expression_targets(val.adata, genes, source="validation spots"))
        samples = sorted(adata.obs["sample_id"].astype(str).unique()) if "sample_id" in adata.obs else []
        provenance = {
            **base,
            **extra,
            "gene_selection": protocol,
            "train_samples": samples,
            "n_train_spots": int(len(rows)),
        }
        result = fit_predictor(
            features.subset(rows), targets, genes, val=val_pair, provenance=provenance, **settings
        )
        departures = result.predictor.protocol_departures
        provenance["protocol_departures"] = departures
        if departures and not extra:
            warnings.warn(
                "the predictor does not follow DeepSpot's protocol: " + "; ".join(departures),
                stacklevel=3,
            )
        # How often a gene predicted at each level is measured as 0, for pseudo-label counts.
        known, measured, source = (
            (*val_pair, "validation spots")
            if val_pair
            else (features.subset(rows), targets, "training spots")
        )
        calibration = fit_zero_calibration(result.predictor.predict_features(known), measured, source)
        result.predictor.register_to_config(provenance={**provenance, "zero_calibration": calibration})
        return result

    result = fit(np.arange(len(train)), {})
    if not leave_one_patient_out:
        return result
    for patient in sorted(set(patients)):
        held_out = np.flatnonzero(patients == patient)
        fold = fit(np.flatnonzero(patients != patient), {"held_out_patient": patient})
        predicted = fold.predictor.predict_features(features.subset(held_out))
        measured = expression_targets(
            train.adata[held_out], fold.predictor.genes, source=f"patient {patient}"
        )
        fold.test_predictions = fold.predictor.to_anndata(predicted, train.adata.obs.iloc[held_out])
        r = float(np.median(per_gene_pearson(measured, predicted)))
        fold.test_predictions.uns[PREDICTION_KEY]["median_pearson"] = r
        fold.history["test_median_pearson"] = r
        result.folds[patient] = fold
    return result


def _patients(adata: ad.AnnData) -> np.ndarray:
    if "patient_id" not in adata.obs or adata.obs["patient_id"].isna().any():
        raise ValueError("leave-one-patient-out needs obs['patient_id'] for every training spot")
    patients = adata.obs["patient_id"].astype(str).to_numpy()
    if len(set(patients)) < 2:
        raise ValueError(
            f"leave-one-patient-out needs at least two patients; the training spots have {sorted(set(patients))}"
        )
    return patients


def build_predictor_encoder(spec: str, train: SpotSet, trust_pickle: bool = False, max_fit_spots: int = 2048):
    """The frozen morphology encoder named by ``spec`` (see :mod:`stmdit.encoders.factory`);
    ``stain`` is fitted on the spot crops of (up to ``max_fit_spots``) training spots, at the
    crop size, since spot and sub-spot crops are what it will encode."""
    kind = str(spec).partition(":")[0].strip().lower()
    if kind != "stain":
        return build_morphology_encoder(spec, trust_pickle=trust_pickle)
    rows = np.linspace(0, len(train) - 1, min(len(train), max_fit_spots)).round().astype(np.int64)
    d = np.asarray(train.spot_diameter_um, dtype=np.float64)
    diameter = float(d) if d.ndim == 0 else float(np.median(d))
    crops = spot_crops(take_rows(train.tiles, rows), train.tile_um, diameter)
    return build_morphology_encoder("stain", train_tiles=crops, tile_size=crops.shape[-1])


def train_predictor_command(
    dataset_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    morphology_encoder: str = "stain",
    n_genes: int | None = None,
    epochs: int = 100,
    leave_one_patient_out: bool = False,
    seed: int = 0,
    trust_pickle: bool = False,
    batch_size: int = 256,
    progress: bool = True,
    gene_selection: str | None = None,
    neighbours: str = DEEPSPOT_RULE,
) -> Path:
    """``stmdit train-predictor``: fit the expression predictor on a prepared store.

    Trains on the kept spots of the ``train`` split, early-stops on the ``val`` split when it has
    kept spots, and writes the predictor folder (:func:`save_predictor`) atomically to ``out_dir``.
    ``n_genes`` and ``gene_selection`` default (None) to DeepSpot's protocol (5,000
    seurat_v3_paper HVGs, see :func:`train_predictor`), ``neighbours`` to DeepSpot's box rule.
    Returns ``out_dir``.
    """
    store = DatasetStore(dataset_dir)
    train = SpotSet.from_store(store, "train")
    if len(train) == 0:
        raise ValueError(f"{store.root}: the train split has no kept spots")
    require_counts(train.adata, f"{store.root} (train split)")
    val = SpotSet.from_store(store, "val")
    encoder = build_predictor_encoder(morphology_encoder, train, trust_pickle=trust_pickle)
    if torch.cuda.is_available():
        encoder.to("cuda")
    genes = {"n_genes": n_genes, "gene_selection": gene_selection}
    fit = train_predictor(
        train,
        encoder,
        val=val if len(val) else None,
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        leave_one_patient_out=leave_one_patient_out,
        progress=progress,
        neighbours=neighbours,
        **{k: v for k, v in genes.items() if v is not None},
    )
    extra = {"morphology_spec": str(morphology_encoder), "dataset": str(store.root.resolve())}
    for f in (fit, *fit.folds.values()):
        f.predictor.register_to_config(provenance={**(f.predictor.config.provenance or {}), **extra})
    encoder.to("cpu")
    logger.info("predictor: %d genes, best epoch %s", fit.predictor.n_genes, fit.history["best_epoch"])
    return save_predictor(fit, encoder, out_dir)
